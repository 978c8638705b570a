//! The shared engine: one PostgreSQL table that several `vcn serve`
//! processes use at once.
//!
//! The table mirrors the trait: `vcn_kv (key BYTEA PRIMARY KEY, value BYTEA
//! NOT NULL)`. `get` is a point read, `scan` a range read on the primary key
//! (`key >= prefix AND key < successor(prefix) ORDER BY key`).
//!
//! An update is one SERIALIZABLE transaction: `SELECT ... FOR UPDATE` of the
//! named keys, the decision, the writes (`INSERT ... ON CONFLICT (key) DO
//! UPDATE`, `DELETE`), `COMMIT`. The database serialises it with every other
//! update of the same keys on any instance; when it cannot (SQLSTATE 40001
//! serialisation failure, 40P01 deadlock, 23505 a racing insert of the same
//! key) nothing was committed and the whole transaction, decision included,
//! is run again after a short jittered back-off, a bounded number of times.
//! Within one process, updates of the same keys first queue on striped
//! async locks, so a hot card costs the database at most one contender per
//! instance instead of one per request: the retries come only from other
//! instances. COMMIT returns once the commit is durable (PostgreSQL's
//! default `synchronous_commit = on`), so `sync` has nothing to do.
//!
//! Nothing here needs a feature that CockroachDB or YugabyteDB lack: no
//! advisory locks, no LISTEN/NOTIFY, no sequences, no triggers, no stored
//! procedures, no server-side session settings.
//!
//! Failures: every round trip and every wait for a connection is bounded by
//! `timeout`; a lost connection or an unreachable server is
//! `StoreError::Unavailable`. Before COMMIT is sent such an update is safe to
//! run again on a fresh connection (it is, once); when the connection fails
//! during COMMIT the outcome is unknown and the update reports Unavailable,
//! so nothing is ever acknowledged that was not committed.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls};

use crate::vault::store::{Decide, Store, StoreError, Write};

const STRIPES: usize = 1024;

/// One versioned schema change, in `migrations/`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every schema change, oldest first. A migration once released is never
/// edited: a change is a new file with the next version.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "kv",
    sql: include_str!("../../migrations/0001_kv.sql"),
}];

const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS vcn_schema_migrations (
    version    BIGINT PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

const SELECT_FOR_UPDATE: &str = "SELECT key, value FROM vcn_kv WHERE key = ANY($1) FOR UPDATE";
const UPSERT: &str =
    "INSERT INTO vcn_kv (key, value) SELECT * FROM UNNEST($1::BYTEA[], $2::BYTEA[]) \
     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";
const DELETE: &str = "DELETE FROM vcn_kv WHERE key = ANY($1)";
const GET: &str = "SELECT value FROM vcn_kv WHERE key = $1";
const SCAN_BOUNDED: &str =
    "SELECT key, value FROM vcn_kv WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3";
const SCAN_OPEN: &str = "SELECT key, value FROM vcn_kv WHERE key >= $1 ORDER BY key LIMIT $2";

/// Engine settings.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections this process keeps open at most.
    pub pool_size: usize,
    /// Bound on connecting, on waiting for a free connection and on each
    /// round trip: past it a call fails with Unavailable instead of hanging.
    pub timeout: Duration,
    /// Times one update is tried at most when the database reports a
    /// conflict (40001, 40P01, 23505).
    pub max_attempts: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            timeout: Duration::from_secs(5),
            max_attempts: 40,
        }
    }
}

/// Why one attempt failed, by what to do next.
#[derive(Debug)]
enum Failure {
    /// The database refused to serialise it; nothing was committed. Try the
    /// whole transaction again.
    Conflict(String),
    /// The connection failed before COMMIT was sent; nothing was
    /// committed. The connection is dropped; another may work (after a
    /// restart of the database, pooled connections are dead).
    Connection(String),
    /// No answer in time: the server is unresponsive. Nothing of an update
    /// was committed if it was not the COMMIT. The connection is dropped and
    /// the call fails now rather than wait as long again.
    Timeout(String),
    /// Give up with this error (includes a COMMIT whose outcome is unknown).
    Fatal(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Fatal(e)
    }
}

fn classify(e: &tokio_postgres::Error) -> Failure {
    let Some(db) = e.as_db_error() else {
        // No answer from the server: closed connection, I/O, connect error.
        return Failure::Connection(e.to_string());
    };
    let code = db.code();
    let message = format!("{} (SQLSTATE {})", db.message(), code.code());
    if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::UNIQUE_VIOLATION
        || *code == SqlState::DUPLICATE_TABLE
        || *code == SqlState::DUPLICATE_OBJECT
    {
        Failure::Conflict(message)
    } else if code.code().starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::TOO_MANY_CONNECTIONS
    {
        Failure::Connection(message)
    } else {
        Failure::Fatal(StoreError::Unavailable(format!(
            "database error: {message}"
        )))
    }
}

/// Runs one round trip within `limit`.
async fn timed<T>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(&e)),
        Err(_) => Err(Failure::Timeout(format!(
            "no answer to {what} within {} ms",
            limit.as_millis()
        ))),
    }
}

/// A short random pause before retry `attempt` (1-based): exponential from
/// 1 ms, capped at 50 ms, full jitter.
fn backoff(attempt: u32) -> Duration {
    let cap = (1u64 << attempt.min(6)).min(50);
    let mut b = [0u8; 2];
    // Jitter only; on the (never seen) failure of the system's RNG, the cap.
    let r = match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b) {
        Ok(()) => u64::from(u16::from_le_bytes(b)),
        Err(_) => u64::from(u16::MAX),
    };
    Duration::from_micros(500 + cap * 1000 * r / u64::from(u16::MAX))
}

/// The smallest key greater than every key starting with `prefix`, or None
/// when there is none (a prefix of 0xFF bytes only).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xFF {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

/// Where a connection string points, for messages and logs: host, port,
/// database and user; never the password or any other parameter.
pub fn describe_url(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => describe(&c),
        Err(_) => "a PostgreSQL database (unparsable connection string)".into(),
    }
}

fn describe(c: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            match c.get_ports().get(i).or(c.get_ports().first()) {
                Some(p) => format!("{host}:{p}"),
                None => host,
            }
        })
        .collect();
    format!(
        "PostgreSQL database {} on {} as {}",
        c.get_dbname().unwrap_or("(default)"),
        if hosts.is_empty() {
            "localhost".to_string()
        } else {
            hosts.join(",")
        },
        c.get_user().unwrap_or("(default user)")
    )
}

pub struct PostgresStore {
    /// Attempts of updates the database refused to serialise (and that
    /// were run again), since this store was opened.
    conflicts: AtomicU64,
    pool: Pool,
    /// Striped locks that queue this process's updates of the same keys.
    locks: Box<[Mutex<()>]>,
    options: PostgresOptions,
    describe: String,
}

impl PostgresStore {
    /// Connects to the database at `url` and brings its schema up to date
    /// (see [`MIGRATIONS`]). Fails with Unavailable when it cannot be
    /// reached, naming it without its password.
    pub async fn open(url: &str, options: &PostgresOptions) -> Result<PostgresStore, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Unavailable(format!(
                "the store is not a valid PostgreSQL connection URL: {e}"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("vcn");
        }
        // Notice a silently dead peer (a host gone, a cut link) within a
        // minute even on an idle pooled connection.
        config.keepalives_idle(Duration::from_secs(30));
        let describe = describe(&config);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot set up the pool: {e}")))?;
        let store = PostgresStore {
            conflicts: AtomicU64::new(0),
            pool,
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            options: options.clone(),
            describe,
        };
        store.migrate().await?;
        store.check_durability().await?;
        Ok(store)
    }

    /// Refuses a database whose commits are not durable when they return
    /// (`synchronous_commit = off` for this database or user): a reply
    /// could then outlive the write it acknowledges. Engines without the
    /// setting (the query fails) are taken as durable, as they document.
    async fn check_durability(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let shown = timed(
            self.options.timeout,
            "SHOW",
            client.simple_query("SHOW synchronous_commit"),
        )
        .await;
        let value = match shown {
            Ok(messages) => messages.into_iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            }),
            Err(Failure::Connection(m) | Failure::Timeout(m)) => {
                let _ = Object::take(client);
                return Err(self.unavailable(&m));
            }
            Err(_) => None,
        };
        if value.as_deref() == Some("off") {
            return Err(self.unavailable(
                "synchronous_commit is off for it, so a commit can still be lost after it returns \
                 and vcn would acknowledge writes that a crash loses; set it to on \
                 (ALTER DATABASE ... SET synchronous_commit = on)",
            ));
        }
        Ok(())
    }

    /// How many update attempts the database refused to serialise so far
    /// (each was rolled back and run again): the price of contention.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    /// What this store is, for messages (no password).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            let why = match e {
                deadpool_postgres::PoolError::Backend(e) => match classify(&e) {
                    Failure::Conflict(m) | Failure::Connection(m) | Failure::Timeout(m) => m,
                    Failure::Fatal(e) => e.to_string(),
                },
                deadpool_postgres::PoolError::Timeout(_) => format!(
                    "no connection within {} ms",
                    self.options.timeout.as_millis()
                ),
                other => other.to_string(),
            };
            StoreError::Unavailable(format!("cannot reach the {}: {why}", self.describe))
        })
    }

    fn unavailable(&self, why: &str) -> StoreError {
        StoreError::Unavailable(format!("{}: {why}", self.describe))
    }

    /// Applies the migrations this database lacks, each in its own
    /// transaction together with its row in `vcn_schema_migrations`, so
    /// instances starting at once apply each exactly once (the loser of a
    /// race gets a conflict, retries and finds it applied). Returns the
    /// schema version.
    pub async fn migrate(&self) -> Result<i64, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = self.client().await?;
            match self.try_migrate(&mut client).await {
                Ok(v) => return Ok(v),
                Err(Failure::Conflict(m)) if attempt < self.options.max_attempts => {
                    tracing::debug!(attempt, reason = %m, "schema migration raced, retrying");
                }
                Err(Failure::Conflict(m) | Failure::Connection(m) | Failure::Timeout(m)) => {
                    let _ = Object::take(client);
                    return Err(self.unavailable(&format!("cannot apply the schema: {m}")));
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
            drop(client);
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    async fn try_migrate(&self, client: &mut Object) -> Result<i64, Failure> {
        let t = self.options.timeout;
        timed(
            t,
            "CREATE TABLE",
            client.batch_execute(CREATE_MIGRATIONS_TABLE),
        )
        .await?;
        for m in MIGRATIONS {
            let tx = timed(
                t,
                "BEGIN",
                client
                    .build_transaction()
                    .isolation_level(IsolationLevel::Serializable)
                    .start(),
            )
            .await?;
            let done = timed(
                t,
                "SELECT",
                tx.query_opt(
                    "SELECT 1 FROM vcn_schema_migrations WHERE version = $1",
                    &[&m.version],
                ),
            )
            .await?;
            if done.is_none() {
                timed(t, "migration", tx.batch_execute(m.sql)).await?;
                timed(
                    t,
                    "INSERT",
                    tx.execute(
                        "INSERT INTO vcn_schema_migrations (version, name) VALUES ($1, $2)",
                        &[&m.version, &m.name],
                    ),
                )
                .await?;
            }
            timed(t, "COMMIT", tx.commit()).await?;
            if done.is_none() {
                tracing::info!(
                    version = m.version,
                    name = m.name,
                    "applied schema migration"
                );
            }
        }
        let row = timed(
            t,
            "SELECT",
            client.query_one("SELECT max(version) FROM vcn_schema_migrations", &[]),
        )
        .await?;
        let version: Option<i64> = row
            .try_get(0)
            .map_err(|e| Failure::Fatal(StoreError::Corrupt(e.to_string())))?;
        let version = version.unwrap_or(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if version > known {
            return Err(Failure::Fatal(self.unavailable(&format!(
                "its schema is at version {version}, newer than this vcn knows ({known}): upgrade vcn"
            ))));
        }
        Ok(version)
    }

    /// One attempt of an update on `client`.
    async fn try_update(
        &self,
        client: &mut Object,
        keys: &[Vec<u8>],
        decide: &mut Decide<'_>,
    ) -> Result<(), Failure> {
        let t = self.options.timeout;
        let tx = timed(
            t,
            "BEGIN",
            client
                .build_transaction()
                .isolation_level(IsolationLevel::Serializable)
                .start(),
        )
        .await?;
        let mut values: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        if !keys.is_empty() {
            let stmt = timed(t, "PREPARE", tx.prepare_cached(SELECT_FOR_UPDATE)).await?;
            let rows = timed(t, "SELECT FOR UPDATE", tx.query(&stmt, &[&keys])).await?;
            for row in rows {
                let (k, v): (Vec<u8>, Vec<u8>) = match (row.try_get(0), row.try_get(1)) {
                    (Ok(k), Ok(v)) => (k, v),
                    _ => {
                        return Err(StoreError::Corrupt("an unreadable row in vcn_kv".into()).into())
                    }
                };
                for (i, named) in keys.iter().enumerate() {
                    if *named == k {
                        values[i] = Some(v.clone());
                    }
                }
            }
        }
        let writes = decide(&values);
        // The last write of a key wins, as in a sled batch.
        let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for w in writes {
            match w {
                Write::Put(k, v) => last.insert(k, Some(v)),
                Write::Delete(k) => last.insert(k, None),
            };
        }
        let (mut put_keys, mut put_values, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
        for (k, v) in last {
            match v {
                Some(v) => {
                    put_keys.push(k);
                    put_values.push(v);
                }
                None => deletes.push(k),
            }
        }
        if !put_keys.is_empty() {
            let stmt = timed(t, "PREPARE", tx.prepare_cached(UPSERT)).await?;
            timed(t, "INSERT", tx.execute(&stmt, &[&put_keys, &put_values])).await?;
        }
        if !deletes.is_empty() {
            let stmt = timed(t, "PREPARE", tx.prepare_cached(DELETE)).await?;
            timed(t, "DELETE", tx.execute(&stmt, &[&deletes])).await?;
        }
        match tokio::time::timeout(t, tx.commit()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => match classify(&e) {
                // Refused at commit: certainly not committed.
                Failure::Conflict(m) => Err(Failure::Conflict(m)),
                Failure::Connection(m)
                | Failure::Timeout(m)
                | Failure::Fatal(StoreError::Unavailable(m)) => {
                    Err(Failure::Fatal(self.unavailable(&format!(
                        "the commit was not confirmed ({m}); its outcome is unknown"
                    ))))
                }
                Failure::Fatal(e) => Err(Failure::Fatal(e)),
            },
            Err(_) => Err(Failure::Fatal(self.unavailable(&format!(
                "the commit was not confirmed within {} ms; its outcome is unknown",
                t.as_millis()
            )))),
        }
    }

    /// Runs a read on a pooled connection, once more on a fresh one if the
    /// first connection turns out dead (a read is always safe to repeat).
    async fn read<T, F>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: for<'c> Fn(
                &'c Object,
            ) -> std::pin::Pin<
                Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
            > + Send
            + Sync,
        T: Send,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self.client().await?;
            match timed(self.options.timeout, what, f(&client)).await {
                Ok(v) => return Ok(v),
                Err(Failure::Connection(m)) => {
                    let _ = Object::take(client);
                    if attempt >= 2 {
                        return Err(self.unavailable(&m));
                    }
                }
                Err(Failure::Timeout(m)) => {
                    let _ = Object::take(client);
                    return Err(self.unavailable(&m));
                }
                Err(Failure::Conflict(m)) => {
                    if attempt >= self.options.max_attempts {
                        return Err(self.unavailable(&m));
                    }
                    drop(client);
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(Failure::Fatal(e)) => {
                    let _ = Object::take(client);
                    return Err(e);
                }
            }
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        let row = self
            .read("SELECT", |c| {
                let key = key.clone();
                Box::pin(async move {
                    let stmt = c.prepare_cached(GET).await?;
                    c.query_opt(&stmt, &[&key]).await
                })
            })
            .await?;
        match row {
            None => Ok(None),
            Some(r) => r
                .try_get::<_, Vec<u8>>(0)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("an unreadable value in vcn_kv: {e}"))),
        }
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        // The first key to return: the prefix, or just past `after`.
        let mut from = prefix.to_vec();
        if let Some(a) = after {
            let mut past = a.to_vec();
            past.push(0);
            if past > from {
                from = past;
            }
        }
        let upto = prefix_successor(prefix);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .read("SELECT range", |c| {
                let (from, upto) = (from.clone(), upto.clone());
                Box::pin(async move {
                    match upto {
                        Some(upto) => {
                            let stmt = c.prepare_cached(SCAN_BOUNDED).await?;
                            c.query(&stmt, &[&from, &upto, &limit]).await
                        }
                        None => {
                            let stmt = c.prepare_cached(SCAN_OPEN).await?;
                            c.query(&stmt, &[&from, &limit]).await
                        }
                    }
                })
            })
            .await?;
        rows.into_iter()
            .map(|r| match (r.try_get(0), r.try_get(1)) {
                (Ok(k), Ok(v)) => Ok((k, v)),
                _ => Err(StoreError::Corrupt("an unreadable row in vcn_kv".into())),
            })
            .collect()
    }

    async fn update(&self, keys: &[Vec<u8>], decide: &mut Decide<'_>) -> Result<(), StoreError> {
        // Queue behind this process's other updates of the same keys, for
        // a bounded time (a database that stopped answering must not pile
        // up every request for a hot card).
        let mut guards: Vec<MutexGuard<'_, ()>> = Vec::new();
        for i in crate::vault::store::lock_stripes(keys, STRIPES) {
            match tokio::time::timeout(self.options.timeout * 2, self.locks[i].lock()).await {
                Ok(g) => guards.push(g),
                Err(_) => {
                    return Err(self.unavailable(
                        "too many updates of the same card are waiting for the database",
                    ))
                }
            }
        }
        let started = Instant::now();
        let (mut attempt, mut reconnects) = (0u32, 0u32);
        loop {
            attempt += 1;
            let mut client = self.client().await?;
            let why = match self.try_update(&mut client, keys, decide).await {
                Ok(()) => return Ok(()),
                Err(Failure::Fatal(e)) => {
                    let _ = Object::take(client);
                    return Err(e);
                }
                Err(Failure::Timeout(m)) => {
                    let _ = Object::take(client);
                    return Err(self.unavailable(&m));
                }
                Err(Failure::Connection(m)) => {
                    // Dropped, not returned to the pool.
                    let _ = Object::take(client);
                    reconnects += 1;
                    if reconnects > 1 {
                        return Err(self.unavailable(&m));
                    }
                    m
                }
                Err(Failure::Conflict(m)) => {
                    drop(client);
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    m
                }
            };
            if attempt >= self.options.max_attempts || started.elapsed() > self.options.timeout * 2
            {
                tracing::warn!(attempt, reason = %why, "an update kept conflicting; giving up");
                return Err(StoreError::Unavailable(format!(
                    "the database kept refusing to serialise this update ({attempt} attempts, last: {why}); try again"
                )));
            }
            tracing::debug!(attempt, reason = %why, "update conflicted, retrying");
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        let row = self
            .read("SELECT", |c| {
                Box::pin(async move {
                    c.query_one("SELECT pg_total_relation_size('vcn_kv')::BIGINT", &[])
                        .await
                })
            })
            .await?;
        Ok(row
            .try_get::<_, i64>(0)
            .ok()
            .and_then(|n| u64::try_from(n).ok()))
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // Every update returned only after its COMMIT was durable.
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        match timed(
            self.options.timeout,
            "SELECT 1",
            client.simple_query("SELECT 1"),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(Failure::Conflict(m) | Failure::Connection(m) | Failure::Timeout(m)) => {
                let _ = Object::take(client);
                Err(self.unavailable(&m))
            }
            Err(Failure::Fatal(e)) => {
                let _ = Object::take(client);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_successor_bounds_exactly_the_prefix() {
        assert_eq!(prefix_successor(b"o/a\0"), Some(b"o/a\x01".to_vec()));
        assert_eq!(prefix_successor(b"c/"), Some(b"c0".to_vec()));
        assert_eq!(prefix_successor(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"\xff"), None);
        assert_eq!(prefix_successor(b""), None);
    }

    #[test]
    fn descriptions_never_carry_the_password() {
        let d = describe_url("postgres://vcn:s3cret-pw@db.example:6543/vault?sslmode=disable");
        assert_eq!(d, "PostgreSQL database vault on db.example:6543 as vcn");
        let d = describe_url("host=10.0.0.1 user=u password=s3cret-pw dbname=v");
        assert!(!d.contains("s3cret"), "{d}");
        assert!(!describe_url("postgres://u:s3cret@/%%%").contains("s3cret"));
    }

    #[test]
    fn backoff_is_short_and_jittered() {
        let waits: Vec<Duration> = (1..40).map(backoff).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_micros(50_500)));
        assert!(waits.iter().any(|w| *w != waits[0]));
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
        }
    }
}
