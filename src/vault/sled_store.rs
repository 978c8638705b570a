//! The embedded engine: one sled tree, striped key locks, group commit.
//!
//! An update locks the stripes of its keys (in a fixed order, so two
//! updates never deadlock), reads, decides and queues its writes, then
//! releases the locks and waits for durability. A dedicated committer
//! thread takes everything queued since its last round, applies it to sled
//! as ONE atomic batch, then calls `Db::flush` (one write and sync of
//! sled's log) and wakes every writer of that round at once. No lock is
//! held across the sync and the sync never runs on a tokio worker. (sled
//! 0.34's own `flush_async` was seen to hang under tokio, hence the thread.)
//!
//! Why queue instead of applying each update's batch in the caller: in
//! sled 0.34 a batch takes a process-wide write lock that `Db::flush`
//! holds for reading across its whole I/O, so a batch applied while a flush
//! is in flight blocks until the sync is done, and it blocks the tokio
//! worker it runs on (and, parking_lot's lock being fair, every `get`
//! behind it). The committer never applies while it flushes, so callers
//! only ever wait on memory.
//!
//! Writes queued but not yet applied live in an overlay that reads consult
//! first, so an update sees every update to its keys before it. Why
//! answering before one's own reads are durable is never done: an update
//! waits for the round its writes are in; one that writes nothing waits for
//! the latest round, which holds or follows everything it could have read;
//! rounds are applied and flushed in order, and sled's flush makes
//! everything applied before it durable.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::vault::store::{Decide, Store, StoreError, Write};

const STRIPES: usize = 4096;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache, in bytes: what bounds the process's memory.
    pub cache_capacity: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_capacity: 256 * 1024 * 1024,
        }
    }
}

/// How far the committer has got, shared with the waiters.
#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Every round up to this one is applied and durable.
    upto: u64,
    /// The last failed flush: the rounds it covered, and why.
    failed: Option<(u64, u64, String)>,
    /// Set when a round could not be applied: the store takes no more
    /// writes (what was decided on the lost writes cannot be trusted).
    broken: Option<String>,
}

/// Writes waiting for the committer.
struct Pending {
    /// The round being collected.
    round: u64,
    /// Its writes, in order.
    writes: Vec<Write>,
    /// The latest queued value of every key not yet applied to sled, and
    /// its round (None: deleted).
    overlay: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    /// Set when the store failed: see [`Flushed::broken`].
    broken: Option<String>,
    /// Updates with writes in the round being collected.
    updates: u64,
    /// The committer is asleep waiting for writes.
    idle: bool,
    stop: bool,
}

/// Counters for measuring group commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Rounds applied and flushed.
    pub rounds: u64,
    /// Updates (with writes) in them.
    pub updates: u64,
}

/// State shared between writers and the committer thread.
struct Commit {
    pending: Mutex<Pending>,
    wake: Condvar,
    flushed: watch::Sender<Flushed>,
    stats: Mutex<CommitStats>,
}

impl Commit {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding it; if something did, the state is
        // still consistent (every change is a single assignment or push).
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct SledStore {
    db: sled::Db,
    /// Striped locks that serialise updates touching the same keys.
    locks: Box<[Mutex<()>]>,
    commit: Arc<Commit>,
    committer: Option<JoinHandle<()>>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, options: &SledOptions) -> Result<SledStore, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_capacity)
            .mode(sled::Mode::HighThroughput)
            // The committer flushes after every round; sled's own periodic
            // flush would only hold its lock against the committer's batch.
            .flush_every_ms(None);
        // sled releases its file lock when its last background task ends,
        // which can be a moment after the previous handle was dropped (a
        // restart in the same process): wait for it briefly.
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(e) if is_lock_error(&e) && tries < 60 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(describe_open_error(dir, e)),
            }
        };
        let (tx, _) = watch::channel(Flushed::default());
        let commit = Arc::new(Commit {
            pending: Mutex::new(Pending {
                round: 1,
                writes: Vec::new(),
                overlay: HashMap::new(),
                broken: None,
                updates: 0,
                idle: false,
                stop: false,
            }),
            wake: Condvar::new(),
            flushed: tx,
            stats: Mutex::new(CommitStats::default()),
        });
        let committer = {
            let (db, commit) = (db.clone(), commit.clone());
            std::thread::Builder::new()
                .name("vcn-committer".into())
                .spawn(move || commit_loop(&db, &commit))
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start the committer thread: {e}"))
                })?
        };
        Ok(SledStore {
            db,
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            commit,
            committer: Some(committer),
        })
    }

    /// Whether the store holds any data (tells a fresh installation from
    /// an existing one).
    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Rounds and updates committed so far (updates per round is how well
    /// group commit shares its syncs).
    pub fn stats(&self) -> CommitStats {
        *self.commit.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stripes(&self, keys: &[Vec<u8>]) -> Vec<usize> {
        let mut s: Vec<usize> = keys
            .iter()
            .map(|k| {
                let mut h = DefaultHasher::new();
                k.hash(&mut h);
                (h.finish() as usize) % STRIPES
            })
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// The synchronous part of an update: lock, read, decide, queue.
    /// Returns the round to wait for.
    fn stage(&self, keys: &[Vec<u8>], decide: &mut Decide<'_>) -> Result<u64, StoreError> {
        let _guards: Vec<MutexGuard<'_, ()>> = self
            .stripes(keys)
            .into_iter()
            // A poisoned stripe only means a decision panicked; the lock
            // still orders updates, so take it.
            .map(|i| self.locks[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        // Queued values first. No other update can queue these keys while
        // we hold their stripes, and the committer removes a value from the
        // overlay only after applying it to sled, so a miss here is found
        // in sled.
        let mut values: Vec<Option<Option<Vec<u8>>>> = {
            let p = self.commit.pending();
            if let Some(reason) = &p.broken {
                return Err(broken_error(reason));
            }
            keys.iter()
                .map(|k| p.overlay.get(k).map(|(_, v)| v.clone()))
                .collect()
        };
        for (k, v) in keys.iter().zip(values.iter_mut()) {
            if v.is_none() {
                *v = Some(self.db.get(k).map_err(io_error)?.map(|v| v.to_vec()));
            }
        }
        let values: Vec<Option<Vec<u8>>> = values.into_iter().map(Option::flatten).collect();
        let writes = decide(&values);
        let mut p = self.commit.pending();
        if let Some(reason) = &p.broken {
            // What we read may have been lost with the failed round.
            return Err(broken_error(reason));
        }
        if writes.is_empty() {
            // Nothing to write, but what was read may itself still be on
            // its way to disk: wait for the latest round.
            return Ok(if p.writes.is_empty() {
                p.round - 1
            } else {
                p.round
            });
        }
        let round = p.round;
        for w in writes {
            match &w {
                Write::Put(k, v) => p.overlay.insert(k.clone(), (round, Some(v.clone()))),
                Write::Delete(k) => p.overlay.insert(k.clone(), (round, None)),
            };
            p.writes.push(w);
        }
        p.updates += 1;
        let wake = p.idle;
        drop(p);
        if wake {
            self.commit.wake.notify_one();
        }
        Ok(round)
    }

    async fn wait_durable(&self, round: u64) -> Result<(), StoreError> {
        let done = |f: &Flushed| {
            f.upto >= round
                || f.broken.is_some()
                || f.failed
                    .as_ref()
                    .is_some_and(|(lo, hi, _)| (*lo..=*hi).contains(&round))
        };
        let state = {
            let now = self.commit.flushed.borrow();
            if now.upto >= round {
                return Ok(());
            }
            done(&now).then(|| now.clone())
        };
        let state = match state {
            Some(s) => s,
            None => {
                let mut rx = self.commit.flushed.subscribe();
                let s = rx
                    .wait_for(done)
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable("the committer thread has stopped".into())
                    })?
                    .clone();
                s
            }
        };
        if state.upto >= round {
            return Ok(());
        }
        if let Some((_, _, reason)) = state
            .failed
            .filter(|(lo, hi, _)| (*lo..=*hi).contains(&round))
        {
            return Err(StoreError::Unavailable(format!(
                "could not make the write durable: {reason}"
            )));
        }
        Err(broken_error(&state.broken.unwrap_or_default()))
    }
}

fn broken_error(reason: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the vault stopped taking writes after a storage failure ({reason}); restart the service"
    ))
}

/// The committer: apply each round as one batch, flush, wake its writers.
fn commit_loop(db: &sled::Db, commit: &Commit) {
    loop {
        let (round, writes, updates) = {
            let mut p = commit.pending();
            while p.writes.is_empty() && !p.stop {
                p.idle = true;
                p = commit.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            p.idle = false;
            if p.writes.is_empty() {
                return; // stopping, and nothing left to write
            }
            let round = p.round;
            p.round += 1;
            let updates = std::mem::take(&mut p.updates);
            (round, std::mem::take(&mut p.writes), updates)
        };
        let mut batch = sled::Batch::default();
        for w in writes {
            match w {
                Write::Put(k, v) => batch.insert(k, v),
                Write::Delete(k) => batch.remove(k),
            }
        }
        if let Err(e) = db.apply_batch(batch) {
            tracing::error!(error = %e, "applying writes to the vault failed; it takes no more writes");
            let reason = e.to_string();
            let mut p = commit.pending();
            p.broken = Some(reason.clone());
            p.overlay.clear();
            p.writes.clear();
            p.updates = 0;
            drop(p);
            commit
                .flushed
                .send_modify(|f| f.broken = Some(reason.clone()));
            continue;
        }
        commit.pending().overlay.retain(|_, (r, _)| *r != round);
        match db.flush() {
            Ok(_) => {
                {
                    let mut st = commit.stats.lock().unwrap_or_else(|e| e.into_inner());
                    st.rounds += 1;
                    st.updates += updates;
                }
                commit.flushed.send_modify(|f| f.upto = round);
            }
            Err(e) => {
                tracing::error!(error = %e, "flushing the vault to disk failed");
                commit.flushed.send_modify(|f| {
                    f.failed = Some((f.upto + 1, round, e.to_string()));
                });
                // Do not spin on a failing disk; the next round retries.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.commit.pending().stop = true;
        self.commit.wake.notify_one();
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
        let _ = self.db.flush();
    }
}

fn io_error(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn describe_open_error(dir: &Path, e: sled::Error) -> StoreError {
    let msg = e.to_string();
    if is_lock_error(&e) {
        return StoreError::Unavailable(format!(
            "the data directory {} is in use by another process (is another `vcn serve` running?)",
            dir.display()
        ));
    }
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(format!(
            "the vault in {} is corrupt ({msg}); restore it from a backup",
            dir.display()
        )),
        _ => StoreError::Unavailable(format!("cannot open the vault in {}: {msg}", dir.display())),
    }
}

#[async_trait]
impl Store for SledStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(io_error)?.map(|v| v.to_vec()))
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        let iter = match after {
            Some(a) => {
                let mut start = a.to_vec();
                start.push(0);
                self.db.range(start..)
            }
            None => self.db.range(prefix.to_vec()..),
        };
        for item in iter {
            let (k, v) = item.map_err(io_error)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    async fn update(&self, keys: &[Vec<u8>], decide: &mut Decide<'_>) -> Result<(), StoreError> {
        let round = self.stage(keys, decide)?;
        self.wait_durable(round).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let round = {
            let p = self.commit.pending();
            if p.writes.is_empty() {
                p.round - 1
            } else {
                p.round
            }
        };
        if round == 0 {
            // Nothing written by this process: what sled recovered is on
            // disk already; flush anyway, it is cheap when clean.
            return self.db.flush().map(|_| ()).map_err(io_error);
        }
        self.wait_durable(round).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Write {
        Write::Put(k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn update_reads_decides_and_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
            let keys = vec![b"a".to_vec()];
            let mut seen = Vec::new();
            s.update(&keys, &mut |v| {
                seen.push(v[0].clone());
                vec![put("a", "1"), put("b", "2")]
            })
            .await
            .unwrap();
            assert_eq!(seen, vec![None]);
            s.update(&keys, &mut |v| {
                assert_eq!(v[0].as_deref(), Some(&b"1"[..]));
                vec![Write::Delete(b"b".to_vec())]
            })
            .await
            .unwrap();
        }
        let s = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
        assert_eq!(s.get(b"a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get(b"b").await.unwrap(), None);
    }

    #[tokio::test]
    async fn scan_is_prefix_bounded_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
        s.update(&[], &mut |_| {
            vec![
                put("o/a1", ""),
                put("o/a2", ""),
                put("o/a3", ""),
                put("o/b1", ""),
                put("p/x", ""),
            ]
        })
        .await
        .unwrap();
        let keys = |v: Vec<(Vec<u8>, Vec<u8>)>| {
            v.into_iter()
                .map(|(k, _)| String::from_utf8(k).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(s.scan(b"o/a", None, 10).await.unwrap()),
            ["o/a1", "o/a2", "o/a3"]
        );
        assert_eq!(
            keys(s.scan(b"o/a", None, 2).await.unwrap()),
            ["o/a1", "o/a2"]
        );
        assert_eq!(
            keys(s.scan(b"o/a", Some(b"o/a2"), 2).await.unwrap()),
            ["o/a3"]
        );
        assert!(s.scan(b"q/", None, 10).await.unwrap().is_empty());
    }

    /// Updates over overlapping pairs of keys, many of them decided on
    /// values still queued for the committer: the total never changes, and
    /// what was acknowledged is what a reopened store holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn transfers_between_overlapping_keys_keep_the_total_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Vec<u8>> = (0..5).map(|i| format!("acct{i}").into_bytes()).collect();
        let read = |v: &Option<Vec<u8>>| -> i64 {
            v.as_deref()
                .map_or(1000, |b| std::str::from_utf8(b).unwrap().parse().unwrap())
        };
        {
            let s = Arc::new(SledStore::open(dir.path(), &SledOptions::default()).unwrap());
            let mut tasks = Vec::new();
            for t in 0..12usize {
                let (s, keys) = (s.clone(), keys.clone());
                tasks.push(tokio::spawn(async move {
                    for n in 0..40usize {
                        let (a, b) = ((t + n) % 5, (t + 2 * n + 1) % 5);
                        if a == b {
                            continue;
                        }
                        let pair = vec![keys[a].clone(), keys[b].clone()];
                        s.update(&pair, &mut |v| {
                            let (x, y) = (read(&v[0]), read(&v[1]));
                            vec![
                                Write::Put(pair[0].clone(), (x - 7).to_string().into_bytes()),
                                Write::Put(pair[1].clone(), (y + 7).to_string().into_bytes()),
                            ]
                        })
                        .await
                        .unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let mut total = 0;
            s.update(&keys, &mut |v| {
                total = v.iter().map(read).sum::<i64>();
                vec![]
            })
            .await
            .unwrap();
            assert_eq!(total, 5000);
            let st = s.stats();
            assert!(st.updates == 384 && st.rounds <= st.updates, "{st:?}");
        }
        let s = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
        let mut total = 0;
        for k in &keys {
            total += read(&s.get(k).await.unwrap());
        }
        assert_eq!(
            total, 5000,
            "the reopened store holds every acknowledged transfer"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_updates_of_one_key_never_lose_an_increment() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path(), &SledOptions::default()).unwrap());
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    s.update(&[b"n".to_vec()], &mut |v| {
                        let n: u64 = v[0]
                            .as_deref()
                            .map_or(0, |b| std::str::from_utf8(b).unwrap().parse().unwrap());
                        vec![put("n", &(n + 1).to_string())]
                    })
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.get(b"n").await.unwrap(), Some(b"400".to_vec()));
        let stats = s.stats();
        assert_eq!(
            stats.updates, 400,
            "every write was flushed before its reply"
        );
        assert!(stats.rounds <= 400);
    }
}
