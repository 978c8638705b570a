//! The audit log (PCI DSS requirement 10): who did what, when, from where,
//! with what outcome, on which card (card id and masked number only).
//!
//! How an entry is written without serialising the hot path:
//! 1. The operation puts a *pending* entry under a fresh key (`a/`
//!    instance, time, counter) in the very same [`Store::update`] batch as
//!    its own writes, so the entry is atomic and durable with the
//!    operation: an operation whose entry cannot be written fails, and an
//!    acknowledged operation always has its entry. Reads (Detokenize) and
//!    refusals write their entry in an update of their own before replying.
//!    No lock is shared between operations and no fsync is added (the
//!    engine's group commit carries the entry).
//! 2. One sealer per instance takes pending entries in key order, gives
//!    each the next sequence number and an HMAC-SHA256 over its content
//!    and the previous entry's MAC (under `audit.key`, a key of its own),
//!    appends them to the append-only JSON-lines file, syncs it, and then
//!    removes them from the store together with the new head (last
//!    sequence and MAC) in one update. A crash in between is recovered at
//!    start: lines already in the file are not sealed twice.
//!
//! `vcn audit verify` recomputes the chain and names the first entry that
//! was edited, deleted, inserted or moved; the head kept in the vault
//! catches a truncated tail at start.

use std::fs;
use std::io::{BufRead, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::hmac;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::vault::keyfile;
use crate::vault::store::{Store, StoreError, Write};

pub const AUDIT_KEY_FILE: &str = "audit.key";
const PENDING: &[u8] = b"a/";
const HEAD: &[u8] = b"m/audit-head/";
/// Pending entries sealed per batch.
const BATCH: usize = 256;

/// Who acted, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The client's registered name ("-" when unknown).
    pub client: String,
    pub role: String,
    /// The peer's address.
    pub origin: String,
}

impl Actor {
    pub fn new(client: &str, role: &str, origin: &str) -> Actor {
        Actor {
            client: client.to_string(),
            role: role.to_string(),
            origin: origin.to_string(),
        }
    }

    /// The service itself, or an operator's command on this machine.
    pub fn system(what: &str) -> Actor {
        Actor::new(what, "operator", "local")
    }
}

/// What happened. `pan` is a masked number (first 6, last 4) only.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub action: &'static str,
    pub outcome: String,
    pub card_id: String,
    pub pan: String,
    pub detail: String,
}

impl Event {
    pub fn new(action: &'static str, outcome: impl Into<String>) -> Event {
        Event {
            action,
            outcome: outcome.into(),
            ..Event::default()
        }
    }

    pub fn card(mut self, card_id: &str) -> Event {
        self.card_id = card_id.to_string();
        self
    }

    /// The masked number (never pass a full one).
    pub fn pan(mut self, masked: String) -> Event {
        self.pan = masked;
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Event {
        self.detail = detail.into();
        self
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    /// The pending entry's id (unique).
    pub id: String,
    pub client: String,
    pub role: String,
    pub origin: String,
    pub action: String,
    pub outcome: String,
    #[serde(default)]
    pub card_id: String,
    #[serde(default)]
    pub pan: String,
    #[serde(default)]
    pub detail: String,
    /// The previous entry's MAC (empty for the first).
    pub prev: String,
    /// HMAC-SHA256 of this entry with `mac` empty.
    pub mac: String,
}

impl Entry {
    fn mac(&self, key: &hmac::Key) -> String {
        let mut unsigned = self.clone();
        unsigned.mac = String::new();
        let bytes = serde_json::to_vec(&unsigned).unwrap_or_default();
        hex::encode(hmac::sign(key, &bytes).as_ref())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("audit key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the audit log {path} ends at entry {file} but the vault recorded entry {head} as written: the log was truncated or replaced")]
    Truncated { path: PathBuf, file: u64, head: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes pending entries: what every operation puts in its batch.
#[derive(Debug)]
pub struct Recorder {
    prefix: Vec<u8>,
    counter: AtomicU64,
}

impl Recorder {
    pub fn new(instance: &str) -> Recorder {
        Recorder {
            prefix: pending_prefix(instance),
            counter: AtomicU64::new(0),
        }
    }

    /// The write of a pending entry, to go in an operation's batch.
    pub fn write(&self, actor: &Actor, event: &Event) -> Write {
        let now = OffsetDateTime::now_utc();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(now.unix_timestamp_nanos()).unwrap_or(0);
        let mut key = self.prefix.clone();
        key.extend_from_slice(&nanos.to_be_bytes());
        key.extend_from_slice(&n.to_be_bytes());
        let entry = Entry {
            seq: 0,
            time: now.format(&Rfc3339).unwrap_or_default(),
            id: hex::encode(&key[self.prefix.len()..]),
            client: actor.client.clone(),
            role: actor.role.clone(),
            origin: actor.origin.clone(),
            action: event.action.to_string(),
            outcome: event.outcome.clone(),
            card_id: event.card_id.clone(),
            pan: event.pan.clone(),
            detail: event.detail.clone(),
            prev: String::new(),
            mac: String::new(),
        };
        Write::Put(key, serde_json::to_vec(&entry).unwrap_or_default())
    }

    /// Writes one entry on its own, durably (for reads and refusals).
    pub async fn record(
        &self,
        store: &dyn Store,
        actor: &Actor,
        event: &Event,
    ) -> Result<(), StoreError> {
        let w = self.write(actor, event);
        store.update(&[], &mut |_| vec![w.clone()]).await
    }
}

fn pending_prefix(instance: &str) -> Vec<u8> {
    [PENDING, instance.as_bytes(), b"\0"].concat()
}

fn head_key(instance: &str) -> Vec<u8> {
    [HEAD, instance.as_bytes()].concat()
}

/// The audit key: 64 hex digits in `keys_dir/audit.key`, mode 0600,
/// created on first use (when `may_create`).
pub fn load_key(keys_dir: &Path, may_create: bool) -> Result<hmac::Key, AuditError> {
    let path = keys_dir.join(AUDIT_KEY_FILE);
    let err = |reason: String| AuditError::Key {
        path: path.clone(),
        reason,
    };
    if !path.exists() {
        if !may_create {
            return Err(err(
                "missing: the audit log exists, so its key must be restored to verify or extend it"
                    .into(),
            ));
        }
        let k = keyfile::random_key().map_err(|e| err(e.to_string()))?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(&k[..])));
        keyfile::create_secret_file(&path, text.as_bytes()).map_err(|e| err(e.to_string()))?;
    }
    let text = keyfile::read_secret_file(&path).map_err(err)?;
    let mut k = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), &mut k[..])
        .map_err(|_| err("not an audit key (expected 64 hex digits)".into()))?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &k[..]))
}

/// The last line of the log, parsed (None for an empty or absent log).
fn last_entry(path: &Path) -> Result<Option<Entry>, AuditError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(AuditError::File {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    let mut last = None;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| AuditError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    match last {
        None => Ok(None),
        Some(l) => serde_json::from_str(&l)
            .map(Some)
            .map_err(|e| AuditError::File {
                path: path.to_path_buf(),
                reason: format!("last line is not an audit entry: {e}"),
            }),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Head {
    seq: u64,
    mac: String,
}

/// The sealer's state: the end of the chain in the file, and pending keys
/// already in the file whose removal from the store failed (removed with
/// the next batch, never sealed twice).
#[derive(Debug, Default)]
struct SealState {
    head: Head,
    undeleted: std::collections::HashSet<Vec<u8>>,
}

/// The sealer: chains pending entries into the log file.
pub struct Sealer {
    store: Arc<dyn Store>,
    key: hmac::Key,
    path: PathBuf,
    instance: String,
    /// The chain's end, and the single chainer's lock.
    head: tokio::sync::Mutex<SealState>,
    /// Serialises appends with the file handle.
    file: Mutex<Option<fs::File>>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({})", self.path.display())
    }
}

impl Sealer {
    /// Opens the log of `instance` at `path`, checking it against the head
    /// the vault recorded (a truncated or replaced log is refused) and
    /// finishing a seal a crash interrupted.
    pub async fn open(
        store: Arc<dyn Store>,
        keys_dir: &Path,
        path: &Path,
        instance: &str,
    ) -> Result<Sealer, AuditError> {
        let last = last_entry(path)?;
        let key = load_key(keys_dir, last.is_none())?;
        let hk = head_key(instance);
        let stored: Head = match store.get(&hk).await? {
            Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
            None => Head::default(),
        };
        let file_head = last
            .as_ref()
            .map(|e| Head {
                seq: e.seq,
                mac: e.mac.clone(),
            })
            .unwrap_or_default();
        if file_head.seq < stored.seq
            || (file_head.seq == stored.seq && file_head.mac != stored.mac)
        {
            return Err(AuditError::Truncated {
                path: path.to_path_buf(),
                file: file_head.seq,
                head: stored.seq,
            });
        }
        let sealer = Sealer {
            store,
            key,
            path: path.to_path_buf(),
            instance: instance.to_string(),
            head: tokio::sync::Mutex::new(SealState {
                head: stored.clone(),
                undeleted: Default::default(),
            }),
            file: Mutex::new(None),
        };
        if file_head.seq > stored.seq {
            // Sealed into the file, not yet removed from the store.
            let ids: Vec<String> = read_entries(path)?
                .into_iter()
                .filter(|e| e.seq > stored.seq)
                .map(|e| e.id)
                .collect();
            let prefix = pending_prefix(instance);
            let mut writes: Vec<Write> = ids
                .iter()
                .filter_map(|id| hex::decode(id).ok())
                .map(|suffix| Write::Delete([prefix.clone(), suffix].concat()))
                .collect();
            writes.push(Write::Put(
                hk.clone(),
                serde_json::to_vec(&file_head).unwrap_or_default(),
            ));
            sealer
                .store
                .update(std::slice::from_ref(&hk), &mut |_| writes.clone())
                .await?;
            sealer.head.lock().await.head = file_head;
        }
        Ok(sealer)
    }

    fn append(&self, lines: &[u8]) -> Result<(), AuditError> {
        let err = |e: std::io::Error| AuditError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(err)?;
            }
            let f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.path)
                .map_err(err)?;
            *guard = Some(f);
        }
        let f = guard.as_mut().ok_or_else(|| AuditError::File {
            path: self.path.clone(),
            reason: "not open".into(),
        })?;
        f.write_all(lines).and_then(|_| f.sync_data()).map_err(err)
    }

    /// Seals up to one batch of pending entries; returns how many.
    pub async fn seal_once(&self) -> Result<usize, AuditError> {
        let mut state = self.head.lock().await;
        let prefix = pending_prefix(&self.instance);
        let pending = self.store.scan(&prefix, None, BATCH).await?;
        if let Some(m) = crate::metrics::get() {
            // Keys are in time order: the first is the oldest.
            let oldest = pending
                .first()
                .and_then(|(_, v)| serde_json::from_slice::<Entry>(v).ok())
                .and_then(|e| OffsetDateTime::parse(&e.time, &Rfc3339).ok());
            let lag = oldest.map_or(0.0, |t| {
                (OffsetDateTime::now_utc() - t).as_seconds_f64().max(0.0)
            });
            m.audit_lag_seconds.set(lag);
        }
        if pending.is_empty() {
            return Ok(0);
        }
        let mut lines = Vec::new();
        let mut next = state.head.clone();
        let mut sealed = 0u64;
        for (key, value) in &pending {
            if state.undeleted.contains(key) {
                continue;
            }
            let Ok(mut e) = serde_json::from_slice::<Entry>(value) else {
                tracing::error!("an unreadable pending audit entry was sealed as such");
                continue;
            };
            e.seq = next.seq + 1;
            e.prev = next.mac.clone();
            e.mac = e.mac(&self.key);
            next = Head {
                seq: e.seq,
                mac: e.mac.clone(),
            };
            lines.extend(serde_json::to_vec(&e).unwrap_or_default());
            lines.push(b'\n');
            sealed += 1;
        }
        if !lines.is_empty() {
            self.append(&lines)?;
            if let Some(m) = crate::metrics::get() {
                m.audit_sealed.inc_by(sealed);
            }
        }
        // The file is the chain now: whatever happens to the update below,
        // these entries are never sealed again.
        state.head = next.clone();
        state
            .undeleted
            .extend(pending.iter().map(|(k, _)| k.clone()));
        let hk = head_key(&self.instance);
        let mut writes: Vec<Write> = pending
            .iter()
            .map(|(k, _)| Write::Delete(k.clone()))
            .collect();
        writes.push(Write::Put(
            hk.clone(),
            serde_json::to_vec(&next).unwrap_or_default(),
        ));
        self.store
            .update(std::slice::from_ref(&hk), &mut |_| writes.clone())
            .await?;
        for (k, _) in &pending {
            state.undeleted.remove(k);
        }
        Ok(pending.len())
    }

    /// Seals until nothing is pending (at shutdown).
    pub async fn seal_all(&self) -> Result<(), AuditError> {
        while self.seal_once().await? > 0 {}
        Ok(())
    }

    /// Seals in the background, every `every`.
    pub async fn run(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.seal_all().await {
                if let Some(m) = crate::metrics::get() {
                    m.audit_seal_failures.inc();
                }
                tracing::error!(error = %e, "audit entries could not be sealed into the log; retrying (they are kept in the vault)");
            }
        }
    }
}

/// Every entry of the log file, parsed.
pub fn read_entries(path: &Path) -> Result<Vec<Entry>, AuditError> {
    let text = fs::read_to_string(path).map_err(|e| AuditError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| AuditError::File {
                path: path.to_path_buf(),
                reason: format!("line {} is not an audit entry: {e}", i + 1),
            })
        })
        .collect()
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every entry checks out: how many there are.
    Intact(u64),
    /// The first bad entry: its line (from 1) and why.
    Broken { line: usize, reason: String },
}

/// Checks the chain of the log at `path` under `key`.
pub fn verify(path: &Path, key: &hmac::Key) -> Result<Verdict, AuditError> {
    let text = fs::read_to_string(path).map_err(|e| AuditError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut prev = Head::default();
    let mut count = 0u64;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let broken = |reason: String| {
            Ok(Verdict::Broken {
                line: line_no,
                reason,
            })
        };
        let e: Entry = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(_) => return broken("not an audit entry (edited or inserted)".into()),
        };
        if e.mac != e.mac(key) {
            return broken(format!(
                "entry {} fails its MAC: edited, or not written by this service",
                e.seq
            ));
        }
        if e.seq != prev.seq + 1 || e.prev != prev.mac {
            return broken(format!(
                "entry {} does not follow entry {}: entries before it were deleted, or it was moved or inserted",
                e.seq, prev.seq
            ));
        }
        prev = Head {
            seq: e.seq,
            mac: e.mac.clone(),
        };
        count += 1;
    }
    Ok(Verdict::Intact(count))
}

/// Writes the entries at or after `since` as JSON lines, for a SIEM.
pub fn export(
    path: &Path,
    since: Option<OffsetDateTime>,
    out: &mut dyn std::io::Write,
) -> Result<u64, AuditError> {
    let mut n = 0;
    for e in read_entries(path)? {
        let t = OffsetDateTime::parse(&e.time, &Rfc3339).ok();
        if let (Some(since), Some(t)) = (since, t) {
            if t < since {
                continue;
            }
        }
        let line = serde_json::to_string(&e).unwrap_or_default();
        writeln!(out, "{line}").map_err(|err| AuditError::File {
            path: PathBuf::from("-"),
            reason: err.to_string(),
        })?;
        n += 1;
    }
    Ok(n)
}
