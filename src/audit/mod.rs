//! The audit log (PCI DSS requirement 10): who did what, when, from where,
//! with what outcome, on which card (card id and masked number only).
//!
//! How an entry is written without serialising the hot path:
//! 1. An operation that writes (issue, authorise, reverse, a limit change,
//!    pause, close, ...) puts a *pending* entry under a fresh key (`a/`
//!    instance, time, counter) in the very same [`Store::update`] batch as
//!    its own writes, so the entry is atomic and durable with the
//!    operation: an operation whose entry cannot be written fails, and an
//!    acknowledged operation always has its entry. No lock is shared
//!    between operations and no fsync is added (the engine's group commit
//!    carries the entry).
//! 2. An entry written on its own (a read such as Detokenize, a refusal,
//!    an error, a key operation of the running server) has no batch to go
//!    in. It is appended to the instance's *pending journal* instead (see
//!    [`journal`]): an append-only file of JSON lines, mode 0600, where a
//!    dedicated thread writes every entry queued since its last round with
//!    one write and one `sync_data` and then wakes that round's callers.
//!    The caller replies only once its entry is durable; when it cannot be
//!    written (a full disk, an I/O error) the call fails, saying why. A
//!    read costs one shared sync, and nothing in the store. (Offline
//!    commands, which have no sealer running, still put theirs in the
//!    store, as in 1.)
//! 3. One sealer per instance takes pending entries (from the store in key
//!    order and from the journal in file order, merged by time), gives
//!    each the next sequence number and an HMAC-SHA256 over its content
//!    and the previous entry's MAC (under `audit.key`, a key of its own),
//!    appends them to the append-only JSON-lines file, syncs it, and then,
//!    in one store update, removes the store's entries and records the new
//!    head: last sequence and MAC, and how far the journal is sealed
//!    (generation and offset). A crash in between is recovered at start:
//!    lines already in the file are not sealed twice (their store entries
//!    are removed, and the journal's mark moves past the last of its
//!    entries found in the file). The journal rotates into numbered
//!    generations; a generation is deleted once a durable head has moved
//!    past it. A torn journal tail (a round a crash interrupted, never
//!    acknowledged) is cut off at start, never sealed.
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
use std::time::{Duration, Instant, SystemTime};

use ring::hmac;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::vault::keyfile;
use crate::vault::store::{Store, StoreError, Write};

pub mod journal;

pub use journal::{Journal, JournalConfig};

pub const AUDIT_KEY_FILE: &str = "audit.key";
const PENDING: &[u8] = b"a/";
const HEAD: &[u8] = b"m/audit-head/";
/// Pending entries sealed per batch.
const BATCH: usize = 256;
/// How often the sealer scans every pending entry in the store instead of
/// starting where the store says nothing earlier can still arrive
/// ([`Store::settled_before`]), besides at start, at shutdown and after the
/// wall clock was seen to step back: a backstop, so what a clock step
/// hid from the shorter scans is sealed late, never lost. Rare, because on
/// an LSM (fjall) a scan from the first walks every entry deleted since the
/// last compaction: seconds after millions of writes.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(3600);

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
    /// What this entry's MAC should be (what `verify` checks): the one
    /// [`Entry::seal`] gives it.
    fn mac(&self, key: &hmac::Key) -> String {
        let mut sealed = self.clone();
        sealed.seal(key);
        sealed.mac
    }

    /// Sets `mac` and returns the entry's line (without the newline),
    /// serialising the entry once: the MAC covers the entry with `mac`
    /// empty, and the line is those same bytes with the MAC put in (`mac`
    /// is the last field, and hex needs no escaping).
    fn seal(&mut self, key: &hmac::Key) -> Vec<u8> {
        const UNSIGNED_END: &[u8] = b"\"mac\":\"\"}";
        self.mac.clear();
        let mut line = serde_json::to_vec(&*self).unwrap_or_default();
        let mac = hex::encode(hmac::sign(key, &line).as_ref());
        if line.ends_with(UNSIGNED_END) {
            line.truncate(line.len() - 2);
            line.extend_from_slice(mac.as_bytes());
            line.extend_from_slice(b"\"}");
            self.mac = mac;
        } else {
            self.mac = mac;
            line = serde_json::to_vec(&*self).unwrap_or_default();
        }
        line
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
    #[error("audit journal {path}: {reason}")]
    Journal { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes pending entries: what every operation puts in its batch, and
/// the entries written on their own (into the journal, when it has one).
#[derive(Debug)]
pub struct Recorder {
    prefix: Vec<u8>,
    counter: AtomicU64,
    journal: Option<Arc<Journal>>,
}

impl Recorder {
    pub fn new(instance: &str) -> Recorder {
        Recorder {
            prefix: pending_prefix(instance),
            counter: AtomicU64::new(0),
            journal: None,
        }
    }

    /// Entries written on their own go to `journal` from now on (the
    /// running server's; without one they go to the store).
    pub fn attach_journal(&mut self, journal: Arc<Journal>) {
        self.journal = Some(journal);
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// The write of a pending entry, to go in an operation's batch.
    pub fn write(&self, actor: &Actor, event: &Event) -> Write {
        let (key, entry) = self.entry(actor, event);
        Write::Put(key, serde_json::to_vec(&entry).unwrap_or_default())
    }

    /// A new pending entry and its key in the store (its id is the key's
    /// suffix: time, then a counter, so ids sort in time order).
    fn entry(&self, actor: &Actor, event: &Event) -> (Vec<u8>, Entry) {
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
        (key, entry)
    }

    /// Writes one entry on its own, durably (for reads and refusals).
    pub async fn record(
        &self,
        store: &dyn Store,
        actor: &Actor,
        event: &Event,
    ) -> Result<(), AuditError> {
        self.record_all(store, &[(actor, event)]).await
    }

    /// Writes entries on their own, durably, together: appended to the
    /// journal in one round (group commit with every other writer), or,
    /// without a journal, put in the store in one update.
    pub async fn record_all(
        &self,
        store: &dyn Store,
        entries: &[(&Actor, &Event)],
    ) -> Result<(), AuditError> {
        match &self.journal {
            Some(journal) => {
                let mut lines = Vec::with_capacity(entries.len() * 384);
                for (actor, event) in entries {
                    let (_, entry) = self.entry(actor, event);
                    serde_json::to_writer(&mut lines, &entry).map_err(|e| AuditError::Journal {
                        path: journal.config().dir.clone(),
                        reason: format!("cannot encode an entry: {e}"),
                    })?;
                    lines.push(b'\n');
                }
                journal.append(lines).await
            }
            None => {
                let writes: Vec<Write> = entries.iter().map(|(a, e)| self.write(a, e)).collect();
                Ok(store.update(&[], &mut |_| writes.clone()).await?)
            }
        }
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

/// The end of the chain, as the vault records it (`m/audit-head/<instance>`),
/// and how far the instance's journal is sealed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    mac: String,
    /// The journal is sealed up to here (absent in heads written before
    /// the journal existed: nothing of it sealed).
    #[serde(default)]
    journal_generation: u64,
    #[serde(default)]
    journal_offset: u64,
}

impl Head {
    fn journal(&self) -> journal::Pos {
        journal::Pos {
            generation: self.journal_generation,
            offset: self.journal_offset,
        }
    }

    fn with_journal(mut self, pos: journal::Pos) -> Head {
        self.journal_generation = pos.generation;
        self.journal_offset = pos.offset;
        self
    }
}

/// The sealer's state: the end of the chain in the file (and how far the
/// journal is sealed), and pending keys already in the file whose removal
/// from the store failed (removed with the next batch, never sealed twice).
#[derive(Debug, Default)]
struct SealState {
    head: Head,
    undeleted: std::collections::HashSet<Vec<u8>>,
    /// Where the next scan of the store's pending entries starts (after
    /// this key; None: at the first). Every entry before it was sealed,
    /// and none can still arrive there: deleted entries are not walked
    /// again, which an LSM engine (fjall) keeps as tombstones a while.
    resume: Option<Vec<u8>>,
    /// When the store was last scanned from its first pending entry.
    full_scan: Option<Instant>,
    /// The wall-clock time the last pass began: a pass that begins
    /// earlier saw the clock step back, and scans from the first.
    last_pass: Option<SystemTime>,
}

/// The sealer: chains pending entries into the log file.
pub struct Sealer {
    store: Arc<dyn Store>,
    key: hmac::Key,
    path: PathBuf,
    instance: String,
    /// The instance's pending journal (the running server's).
    journal: Option<Arc<Journal>>,
    /// The chain's end, and the single chainer's lock (owned by the
    /// blocking thread while it appends: see `seal_once`).
    head: Arc<tokio::sync::Mutex<SealState>>,
    /// Serialises appends with the file handle. Shared with the blocking
    /// thread that writes and syncs it (never a tokio worker).
    file: Arc<Mutex<Option<fs::File>>>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({})", self.path.display())
    }
}

impl Sealer {
    /// Opens the log of `instance` at `path`, checking it against the head
    /// the vault recorded (a truncated or replaced log is refused) and
    /// finishing a seal a crash interrupted. With `journal`, opens the
    /// instance's pending journal too (see [`Sealer::journal`]).
    pub async fn open(
        store: Arc<dyn Store>,
        keys_dir: &Path,
        path: &Path,
        instance: &str,
        journal: Option<JournalConfig>,
    ) -> Result<Sealer, AuditError> {
        let last = last_entry(path)?;
        let key = load_key(keys_dir, last.is_none())?;
        let hk = head_key(instance);
        let stored: Head = match store.get(&hk).await? {
            Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
            None => Head::default(),
        };
        let (file_seq, file_mac) = last
            .as_ref()
            .map(|e| (e.seq, e.mac.clone()))
            .unwrap_or_default();
        if file_seq < stored.seq || (file_seq == stored.seq && file_mac != stored.mac) {
            return Err(AuditError::Truncated {
                path: path.to_path_buf(),
                file: file_seq,
                head: stored.seq,
            });
        }
        let journal = match journal {
            Some(config) => Some(Arc::new(Journal::open(config, stored.journal())?)),
            None => None,
        };
        let sealer = Sealer {
            store,
            key,
            path: path.to_path_buf(),
            instance: instance.to_string(),
            journal,
            head: Arc::new(tokio::sync::Mutex::new(SealState {
                head: stored.clone(),
                undeleted: Default::default(),
                resume: None,
                full_scan: None,
                last_pass: None,
            })),
            file: Arc::new(Mutex::new(None)),
        };
        if file_seq > stored.seq {
            // Sealed into the file, but the head was not updated (a crash,
            // or a store refusing writes): remove those entries from the
            // store, and move the journal's mark past those from it.
            let sealed: std::collections::HashSet<String> = read_entries(path)?
                .into_iter()
                .filter(|e| e.seq > stored.seq)
                .map(|e| e.id)
                .collect();
            let prefix = pending_prefix(instance);
            let mut writes: Vec<Write> = sealed
                .iter()
                .filter_map(|id| hex::decode(id).ok())
                .map(|suffix| Write::Delete([prefix.clone(), suffix].concat()))
                .collect();
            let mut mark = stored.journal();
            if let Some(j) = &sealer.journal {
                // The sealer takes the journal in order, so what it sealed
                // ends with the last of its entries found in the file.
                let mut pos = stored.journal();
                loop {
                    let (entries, end) = j.read(pos, BATCH)?;
                    for (e, after) in &entries {
                        if sealed.contains(&e.id) {
                            mark = *after;
                        }
                    }
                    if entries.is_empty() && end == pos {
                        break;
                    }
                    pos = end;
                }
            }
            let head = Head {
                seq: file_seq,
                mac: file_mac,
                ..Head::default()
            }
            .with_journal(mark);
            writes.push(Write::Put(
                hk.clone(),
                serde_json::to_vec(&head).unwrap_or_default(),
            ));
            sealer
                .store
                .update(std::slice::from_ref(&hk), &mut |_| writes.clone())
                .await?;
            if let Some(j) = &sealer.journal {
                j.remove_before(head.journal_generation);
            }
            sealer.head.lock().await.head = head;
        }
        Ok(sealer)
    }

    /// The pending journal, for the vault to write entries on their own to.
    pub fn journal(&self) -> Option<Arc<Journal>> {
        self.journal.clone()
    }

    /// Seals up to one batch of pending entries (from the store and from
    /// the journal); returns how many.
    pub async fn seal_once(&self) -> Result<usize, AuditError> {
        self.seal_pass(false).await
    }

    /// One pass: the store's pending entries from the resume point, or from
    /// the first when `full`, when the store cannot say where nothing more
    /// can arrive, or every [`FULL_SCAN_EVERY`].
    async fn seal_pass(&self, full: bool) -> Result<usize, AuditError> {
        let mut state = self.head.clone().lock_owned().await;
        let prefix = pending_prefix(&self.instance);
        // Read before the scan: whatever the scan misses began after it.
        let settled = self.store.settled_before();
        let now = SystemTime::now();
        let clock_stepped_back = state.last_pass.is_some_and(|last| now < last);
        if clock_stepped_back {
            tracing::warn!(
                "the wall clock stepped back: the audit sealer scans every pending entry"
            );
        }
        state.last_pass = Some(now);
        let full = full
            || settled.is_none()
            || clock_stepped_back
            || state
                .full_scan
                .is_none_or(|t| t.elapsed() >= FULL_SCAN_EVERY);
        let after = if full { None } else { state.resume.clone() };
        let mut pending = self.store.scan(&prefix, after.as_deref(), BATCH).await?;
        let scanned_full_batch = pending.len() >= BATCH;
        let from = state.head.journal();
        let (mut journaled, mut journal_end) = match &self.journal {
            Some(j) => j.read(from, BATCH)?,
            None => (Vec::new(), from),
        };
        // Merge the two in time order (ids begin with the time): when one
        // source filled its batch, the other's entries after its last one
        // wait for the next pass, as that source may have more before them.
        let store_last = (pending.len() >= BATCH)
            .then(|| pending.last().map(|(k, _)| hex::encode(&k[prefix.len()..])))
            .flatten();
        let journal_last = (journaled.len() >= BATCH)
            .then(|| journaled.last().map(|(e, _)| e.id.clone()))
            .flatten();
        let cutoff = match (store_last, journal_last) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let store_limited = scanned_full_batch || cutoff.is_some();
        if let Some(cutoff) = &cutoff {
            pending.retain(|(k, _)| hex::encode(&k[prefix.len()..]) <= *cutoff);
            if let Some(n) = journaled.iter().position(|(e, _)| e.id > *cutoff) {
                journal_end = match n {
                    0 => from,
                    n => journaled[n - 1].1,
                };
                journaled.truncate(n);
            }
        }
        let mut batch: Vec<Entry> = Vec::with_capacity(pending.len() + journaled.len());
        for (key, value) in &pending {
            if state.undeleted.contains(key) {
                continue;
            }
            match serde_json::from_slice::<Entry>(value) {
                Ok(e) => batch.push(e),
                Err(_) => {
                    tracing::error!("an unreadable pending audit entry was sealed as such")
                }
            }
        }
        let count = pending.len() + journaled.len();
        batch.extend(journaled.into_iter().map(|(e, _)| e));
        batch.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(m) = crate::metrics::get() {
            let oldest = batch
                .first()
                .and_then(|e| OffsetDateTime::parse(&e.time, &Rfc3339).ok());
            let lag = oldest.map_or(0.0, |t| {
                (OffsetDateTime::now_utc() - t).as_seconds_f64().max(0.0)
            });
            m.audit_lag_seconds.set(lag);
        }
        // Where the next pass starts: no later than where the store says
        // entries may still arrive, and, when this pass left entries for
        // the next, no later than the last it seals.
        let resume = {
            let settled = settled.map(|t| {
                let nanos = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                [prefix.as_slice(), &nanos.to_be_bytes()].concat()
            });
            let this_pass = if store_limited {
                pending.last().map(|(k, _)| k.clone()).or(after.clone())
            } else {
                settled.clone()
            };
            match (settled, this_pass) {
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            }
        };
        if pending.is_empty() && batch.is_empty() && journal_end == from {
            state.resume = resume;
            if full {
                state.full_scan = Some(Instant::now());
            }
            return Ok(0);
        }
        let mut lines = Vec::new();
        let mut next = state.head.clone().with_journal(journal_end);
        for mut e in batch {
            e.seq = next.seq + 1;
            e.prev = next.mac.clone();
            lines.extend(e.seal(&self.key));
            lines.push(b'\n');
            next.seq = e.seq;
            next.mac = e.mac;
        }
        // The file is the chain once the lines are in it: the head moves
        // past them, and their store entries are never sealed again, in the
        // same step as the write. That step runs on a blocking thread (the
        // sync never holds up a tokio worker) which owns the chain's lock:
        // if this call is cancelled meanwhile (the server stopping), the
        // step still completes whole, and the next pass sees it.
        let sealed = next.seq - state.head.seq;
        let keys: Vec<Vec<u8>> = pending.iter().map(|(k, _)| k.clone()).collect();
        let (file, path, head) = (self.file.clone(), self.path.clone(), next.clone());
        let failed = |reason: String| AuditError::File {
            path: self.path.clone(),
            reason,
        };
        let mut state = tokio::task::spawn_blocking(move || {
            if !lines.is_empty() {
                append_to(&file, &path, &lines)?;
            }
            state.head = head;
            state.undeleted.extend(keys);
            Ok::<_, std::io::Error>(state)
        })
        .await
        .map_err(|e| failed(format!("the writing thread failed: {e}")))?
        .map_err(|e| failed(e.to_string()))?;
        if sealed > 0 {
            if let Some(m) = crate::metrics::get() {
                m.audit_sealed.inc_by(sealed);
            }
        }
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
        state.resume = resume;
        if full {
            state.full_scan = Some(Instant::now());
        }
        // The head past them is durable: sealed generations can go.
        if let Some(j) = &self.journal {
            j.remove_before(next.journal_generation);
        }
        Ok(count)
    }

    /// Seals until nothing is pending, from the store's first pending
    /// entry (at shutdown, and wherever everything must be in the log).
    pub async fn seal_all(&self) -> Result<(), AuditError> {
        if self.seal_pass(true).await? > 0 {
            self.seal_pending().await?;
        }
        Ok(())
    }

    /// Seals until a pass finds nothing (from the resume point).
    async fn seal_pending(&self) -> Result<(), AuditError> {
        while self.seal_once().await? > 0 {}
        Ok(())
    }

    /// Seals in the background, every `every`.
    pub async fn run(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.seal_pending().await {
                if let Some(m) = crate::metrics::get() {
                    m.audit_seal_failures.inc();
                }
                tracing::error!(error = %e, "audit entries could not be sealed into the log; retrying (they are kept in the vault)");
            }
        }
    }
}

/// Opens the log at `path` on first use (mode 0600), appends `lines` and
/// syncs them.
fn append_to(file: &Mutex<Option<fs::File>>, path: &Path, lines: &[u8]) -> std::io::Result<()> {
    let mut guard = file.lock().unwrap_or_else(|e| e.into_inner());
    let f = match guard.as_mut() {
        Some(f) => f,
        None => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir)?;
            }
            guard.insert(
                fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)?,
            )
        }
    };
    f.write_all(lines).and_then(|_| f.sync_data())
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
            ..Head::default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::chaos::ChaosStore;
    use crate::vault::embedded::{EngineOptions, Fjall3Store};

    /// The sealer writes each line from the bytes its MAC covers: the line
    /// must be what serialising the sealed entry gives, and its MAC the one
    /// `verify` recomputes, whatever the fields hold (quotes, escapes,
    /// non-ASCII, an empty or a long previous MAC).
    #[test]
    fn a_sealed_line_is_the_entry_serialised_with_the_mac_verify_expects() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"test audit key");
        for (detail, prev) in [
            ("", ""),
            ("transaction_id=t-1 \"quoted\" \\ back\\slash", "00ff"),
            (
                "ünïcode ✓ and a\nnewline and a \u{1} control",
                &"ab".repeat(32),
            ),
            ("\"mac\":\"\"}", "x"),
        ] {
            let mut e = Entry {
                seq: 7,
                time: "2026-11-23T10:00:00Z".into(),
                id: "0001".into(),
                client: "switch".into(),
                role: "switch".into(),
                origin: "127.0.0.1:1".into(),
                action: "authorize".into(),
                outcome: "approved".into(),
                card_id: "card_1".into(),
                pan: "411111******1111".into(),
                detail: detail.into(),
                prev: prev.into(),
                mac: "stale".into(),
            };
            let line = e.seal(&key);
            assert_eq!(line, serde_json::to_vec(&e).unwrap(), "{detail:?}");
            // The MAC is HMAC-SHA256 over the entry with `mac` empty.
            let unsigned = Entry {
                mac: String::new(),
                ..e.clone()
            };
            let expected = hmac::sign(&key, &serde_json::to_vec(&unsigned).unwrap());
            assert_eq!(e.mac, hex::encode(expected.as_ref()), "{detail:?}");
            assert_eq!(e.mac(&key), e.mac, "verify recomputes the same");
            assert_eq!(e.mac.len(), 64);
            let back: Entry = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, e);
        }
    }

    /// A vault store (that can be made to fail), a keys directory, an
    /// audit log and a journal directory.
    struct Fixture {
        dir: tempfile::TempDir,
        chaos: Arc<ChaosStore>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store = Fjall3Store::open(
                &dir.path().join("data"),
                &EngineOptions {
                    cache_capacity: 8 * 1024 * 1024,
                    ..EngineOptions::default()
                },
            )
            .unwrap();
            Fixture {
                chaos: ChaosStore::new(Arc::new(store)),
                dir,
            }
        }

        fn log(&self) -> PathBuf {
            self.dir.path().join("audit.log")
        }

        fn journal_config(&self, rotate_bytes: u64) -> JournalConfig {
            JournalConfig {
                rotate_bytes,
                margin: 0,
                ..JournalConfig::new(self.dir.path().join("data"), "audit-pending")
            }
        }

        /// Opens the sealer (and its journal), and a recorder writing to
        /// that journal.
        async fn open(&self, rotate_bytes: u64) -> (Sealer, Recorder) {
            let sealer = Sealer::open(
                self.chaos.clone(),
                &self.dir.path().join("keys"),
                &self.log(),
                "i1",
                Some(self.journal_config(rotate_bytes)),
            )
            .await
            .unwrap();
            let mut recorder = Recorder::new("i1");
            recorder.attach_journal(sealer.journal().unwrap());
            (sealer, recorder)
        }

        /// Writes entry `n` on its own (to the journal).
        async fn record(&self, recorder: &Recorder, n: usize) -> Result<(), AuditError> {
            recorder
                .record(self.chaos.as_ref(), &Actor::system("test"), &event(n))
                .await
        }

        /// Writes entry `n` as an operation does, in a store batch.
        async fn record_in_store(&self, recorder: &Recorder, n: usize) {
            let w = recorder.write(&Actor::system("test"), &event(n));
            self.chaos
                .update(&[], &mut |_| vec![w.clone()])
                .await
                .unwrap();
        }

        /// Writes entries `ns` in order, each in a store batch where
        /// `in_store` says so and through the journal otherwise.
        async fn record_mixed(
            &self,
            recorder: &Recorder,
            ns: std::ops::Range<usize>,
            in_store: fn(usize) -> bool,
        ) {
            for n in ns {
                if in_store(n) {
                    self.record_in_store(recorder, n).await;
                } else {
                    self.record(recorder, n).await.unwrap();
                }
            }
        }

        /// The numbers of the sealed entries, in the log's order, after
        /// checking the chain.
        fn sealed(&self) -> Vec<usize> {
            let entries = read_entries(&self.log()).unwrap_or_default();
            if !entries.is_empty() {
                let key = load_key(&self.dir.path().join("keys"), false).unwrap();
                assert_eq!(
                    verify(&self.log(), &key).unwrap(),
                    Verdict::Intact(entries.len() as u64)
                );
            }
            let mut ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), entries.len(), "an entry was sealed twice");
            entries
                .iter()
                .map(|e| e.detail.strip_prefix("n=").unwrap().parse().unwrap())
                .collect()
        }

        fn generations(&self) -> Vec<u64> {
            self.journal_config(0).generations().unwrap()
        }
    }

    fn event(n: usize) -> Event {
        Event::new("detokenize", "ok")
            .pan("411111******1111".into())
            .detail(format!("n={n}"))
    }

    /// The server aborts the sealing task when it stops, then seals what
    /// is left. A pass cancelled while its lines are being written must
    /// still complete whole (the head moves past them), or the next pass
    /// seals the same entries again.
    /// Passes start where the store says nothing earlier can still arrive,
    /// not after the last entry sealed: an entry decided before one that is
    /// sealed, but committed after it (its update was slow), is sealed by
    /// the next pass, not left behind until a full scan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_entry_committed_after_a_later_one_was_sealed_is_sealed_by_the_next_pass() {
        let f = Fixture::new();
        let (sealer, recorder) = f.open(DEFAULT_ROTATE).await;
        let recorder = Arc::new(recorder);
        f.record_in_store(&recorder, 0).await;
        sealer.seal_once().await.unwrap();
        let (began_tx, began_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let slow = {
            let (chaos, recorder) = (f.chaos.clone(), recorder.clone());
            tokio::spawn(async move {
                chaos
                    .update(&[b"slow".to_vec()], &mut |_| {
                        let w = recorder.write(&Actor::system("test"), &event(1));
                        let _ = began_tx.send(());
                        let _ = release_rx.lock().unwrap().recv();
                        vec![w]
                    })
                    .await
                    .unwrap();
            })
        };
        tokio::task::spawn_blocking(move || began_rx.recv().unwrap())
            .await
            .unwrap();
        f.record_in_store(&recorder, 2).await;
        assert_eq!(sealer.seal_once().await.unwrap(), 1);
        assert_eq!(f.sealed(), [0, 2]);
        release_tx.send(()).unwrap();
        slow.await.unwrap();
        assert_eq!(sealer.seal_once().await.unwrap(), 1, "the late entry");
        assert_eq!(f.sealed(), [0, 2, 1], "sealed after the later one");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pass_cancelled_while_writing_completes_and_nothing_is_sealed_twice() {
        let f = Fixture::new();
        let (sealer, recorder) = f.open(DEFAULT_ROTATE).await;
        f.record_mixed(&recorder, 0..10, |n| n % 2 == 0).await;
        // Hold the log's file, so the pass waits inside its write.
        let (file, (locked_tx, locked_rx), (release_tx, release_rx)) = (
            sealer.file.clone(),
            std::sync::mpsc::channel(),
            std::sync::mpsc::channel::<()>(),
        );
        let holder = std::thread::spawn(move || {
            let _held = file.lock().unwrap();
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        locked_rx.recv().unwrap();
        let pass =
            tokio::time::timeout(std::time::Duration::from_millis(300), sealer.seal_once()).await;
        assert!(
            pass.is_err(),
            "the pass waited for the file and was cancelled"
        );
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        sealer.seal_all().await.unwrap();
        assert_eq!(f.sealed(), (0..10).collect::<Vec<_>>());
        assert!(f.chaos.scan(PENDING, None, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn journal_entries_are_sealed_in_order_with_a_valid_chain() {
        let f = Fixture::new();
        let (sealer, recorder) = f.open(DEFAULT_ROTATE).await;
        // More than a batch, some of them in store batches in between.
        let in_store = |n| n % 7 == 3;
        f.record_mixed(&recorder, 0..101, in_store).await;
        sealer.seal_all().await.unwrap();
        f.record_mixed(&recorder, 101..600, in_store).await;
        // Concurrent callers share rounds, and each still waits for its own.
        let recorder = Arc::new(recorder);
        let tasks: Vec<_> = (600..700)
            .map(|n| {
                let (f_store, r) = (f.chaos.clone(), recorder.clone());
                tokio::spawn(async move {
                    r.record(f_store.as_ref(), &Actor::system("test"), &event(n))
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        sealer.seal_all().await.unwrap();
        let sealed = f.sealed();
        assert_eq!(&sealed[..600], (0..600).collect::<Vec<_>>());
        let mut last: Vec<usize> = sealed[600..].to_vec();
        last.sort_unstable();
        assert_eq!(last, (600..700).collect::<Vec<_>>());
        // Nothing is left pending, in the store or the journal.
        assert!(f.chaos.scan(PENDING, None, 10).await.unwrap().is_empty());
        assert_eq!(sealer.seal_once().await.unwrap(), 0);
        // No card number in the journal, only the masked one.
        for g in f.generations() {
            let text = fs::read_to_string(f.journal_config(0).file(g)).unwrap();
            assert!(!text.contains("4111111111111111"));
        }
        // The journal's files are the service's alone.
        use std::os::unix::fs::PermissionsExt;
        let g = *f.generations().last().unwrap();
        let mode = fs::metadata(f.journal_config(0).file(g))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// The journal gathers its rounds as the vault's committer does: a
    /// lone writer never waits, writers arriving together share rounds
    /// that waited for the commit delay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn journal_rounds_gather_only_while_writers_arrive_together() {
        let f = Fixture::new();
        let config = JournalConfig {
            commit_delay: std::time::Duration::from_millis(50),
            ..f.journal_config(DEFAULT_ROTATE)
        };
        let journal = Arc::new(Journal::open(config, journal::Pos::default()).unwrap());
        for n in 0..5 {
            let line = format!("{}\n", serde_json::to_string(&n).unwrap());
            journal.append(line.into_bytes()).await.unwrap();
        }
        assert_eq!(journal.rounds(), (5, 0));
        let tasks: Vec<_> = (0..64)
            .map(|n| {
                let j = journal.clone();
                tokio::spawn(async move {
                    for k in 0..3 {
                        j.append(format!("{}\n", n * 10 + k).into_bytes())
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (rounds, gathered) = journal.rounds();
        assert!(gathered > 0, "{rounds} rounds, none gathered");
        assert!(rounds - 5 <= 192 / 4, "{rounds} rounds for 192 appends");
    }

    #[tokio::test]
    async fn a_crash_between_the_append_and_the_head_update_does_not_seal_twice() {
        let f = Fixture::new();
        let (sealer, recorder) = f.open(DEFAULT_ROTATE).await;
        for n in 0..5 {
            f.record_in_store(&recorder, n).await;
        }
        for n in 5..25 {
            f.record(&recorder, n).await.unwrap();
        }
        // The entries reach the file, the head update fails.
        f.chaos.set_fail_updates(true);
        assert!(sealer.seal_once().await.is_err());
        assert_eq!(f.sealed(), (0..25).collect::<Vec<_>>());
        // Still running: the next pass does not seal them again either.
        for n in 25..28 {
            f.record(&recorder, n).await.unwrap();
        }
        assert!(sealer.seal_once().await.is_err());
        assert_eq!(f.sealed(), (0..28).collect::<Vec<_>>());
        // A crash: the sealer's memory is gone, the head in the vault is
        // the one before all this.
        drop((sealer, recorder));
        f.chaos.set_fail_updates(false);
        let (sealer, recorder) = f.open(DEFAULT_ROTATE).await;
        sealer.seal_all().await.unwrap();
        assert_eq!(f.sealed(), (0..28).collect::<Vec<_>>());
        assert!(f.chaos.scan(PENDING, None, 10).await.unwrap().is_empty());
        for n in 28..31 {
            f.record(&recorder, n).await.unwrap();
        }
        sealer.seal_all().await.unwrap();
        drop((sealer, recorder));
        // And once more from a clean stop.
        let (sealer, _recorder) = f.open(DEFAULT_ROTATE).await;
        sealer.seal_all().await.unwrap();
        assert_eq!(f.sealed(), (0..31).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_torn_last_journal_line_is_cut_off_and_never_sealed() {
        let f = Fixture::new();
        let (sealer, recorder) = f.open(DEFAULT_ROTATE).await;
        for n in 0..5 {
            f.record(&recorder, n).await.unwrap();
        }
        drop((sealer, recorder));
        // A crash in the middle of the next round: half a line, and a
        // block the filesystem had not written yet.
        let g = *f.generations().last().unwrap();
        let path = f.journal_config(0).file(g);
        let good = fs::metadata(&path).unwrap().len();
        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":0,\"time\":\"2025-01-01T00:00:00Z\",\"id\":\"ab")
            .unwrap();
        file.write_all(&[0u8; 100]).unwrap();
        drop(file);
        let (sealer, recorder) = f.open(DEFAULT_ROTATE).await;
        assert_eq!(fs::metadata(&path).unwrap().len(), good, "cut at open");
        for n in 5..8 {
            f.record(&recorder, n).await.unwrap();
        }
        sealer.seal_all().await.unwrap();
        assert_eq!(f.sealed(), (0..8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn rotation_deletes_sealed_generations_and_loses_nothing() {
        let f = Fixture::new();
        // Two or three entries a generation.
        let (sealer, recorder) = f.open(600).await;
        for n in 0..40 {
            f.record(&recorder, n).await.unwrap();
            if n % 10 == 9 {
                assert!(f.generations().len() > 3, "{:?}", f.generations());
                sealer.seal_all().await.unwrap();
                // Only the generation being written is left.
                assert_eq!(f.generations().len(), 1, "{:?}", f.generations());
            }
        }
        for n in 40..50 {
            f.record(&recorder, n).await.unwrap();
        }
        // Sealed, but a crash comes before the sealed generations are
        // deleted (kept here aside and put back).
        let kept: Vec<(PathBuf, Vec<u8>)> = f
            .generations()
            .iter()
            .map(|g| f.journal_config(0).file(*g))
            .map(|p| (p.clone(), fs::read(&p).unwrap()))
            .collect();
        sealer.seal_all().await.unwrap();
        drop((sealer, recorder));
        for (p, bytes) in &kept {
            fs::write(p, bytes).unwrap();
        }
        let (sealer, recorder) = f.open(600).await;
        for (p, _) in &kept[..kept.len() - 1] {
            assert!(!p.exists(), "{} not deleted at open", p.display());
        }
        for n in 50..55 {
            f.record(&recorder, n).await.unwrap();
        }
        sealer.seal_all().await.unwrap();
        assert_eq!(f.sealed(), (0..55).collect::<Vec<_>>());
        assert_eq!(f.generations().len(), 1, "{:?}", f.generations());
    }

    #[tokio::test]
    async fn a_failed_journal_round_fails_its_callers_and_is_never_sealed() {
        let f = Fixture::new();
        let (sealer, recorder) = f.open(DEFAULT_ROTATE).await;
        f.record(&recorder, 0).await.unwrap();
        let journal = sealer.journal().unwrap();
        journal.set_fail_writes(true);
        let e = f.record(&recorder, 1).await.unwrap_err();
        assert!(e.to_string().contains("audit journal"), "{e}");
        journal.set_fail_writes(false);
        f.record(&recorder, 2).await.unwrap();
        sealer.seal_all().await.unwrap();
        drop((sealer, recorder, journal));
        // A full filesystem refuses the round, saying so.
        let sealer = Sealer::open(
            f.chaos.clone(),
            &f.dir.path().join("keys"),
            &f.log(),
            "i1",
            Some(JournalConfig {
                margin: u64::MAX / 2,
                ..f.journal_config(DEFAULT_ROTATE)
            }),
        )
        .await
        .unwrap();
        let mut recorder = Recorder::new("i1");
        recorder.attach_journal(sealer.journal().unwrap());
        let e = f.record(&recorder, 3).await.unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        sealer.seal_all().await.unwrap();
        assert_eq!(f.sealed(), vec![0, 2]);
    }

    #[test]
    fn a_head_written_before_the_journal_still_parses() {
        let head: Head = serde_json::from_str(r#"{"seq":7,"mac":"ab"}"#).unwrap();
        assert_eq!((head.seq, head.journal()), (7, journal::Pos::default()));
    }

    const DEFAULT_ROTATE: u64 = journal::DEFAULT_ROTATE_BYTES;
}
