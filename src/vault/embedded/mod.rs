//! The embedded store: one key-value engine in the data directory
//! (fjall 3 for new vaults, [`fjall3_engine`]; fjall 2, [`fjall_engine`],
//! and sled, [`sled_engine`], for vaults made before or when configured),
//! striped key locks, group commit by a committer thread.
//! Everything here is the same for every engine; an [`Engine`] only reads,
//! applies a batch, and makes what it applied durable.
//!
//! An update locks the stripes of its keys (in a fixed order, so two
//! updates never deadlock), reads, decides and queues its writes in the
//! round being collected, then releases the locks and waits for that round.
//! A dedicated committer thread takes everything queued since its last
//! round, applies it to the engine as ONE atomic batch, makes it durable
//! (one write and sync of the engine's log) and wakes every writer of the
//! round at once. No lock is held across the sync and the sync never runs
//! on a tokio worker. (sled 0.34's own `flush_async` was seen to hang under
//! tokio, hence the thread.)
//!
//! Why queue instead of applying each update's batch in the caller: in
//! sled 0.34 a batch takes a process-wide lock that `Db::flush` holds
//! across its whole I/O, so a batch applied while a flush is in flight
//! blocks until the sync is done, and it blocks the tokio worker it runs on.
//! The committer never applies while it flushes, so callers only ever wait
//! on memory, whatever the engine.
//!
//! Writes queued but not yet applied live in an overlay that updates
//! consult first, so an update sees every update to its keys before it.
//! Nobody is answered before what they read is durable: an update waits
//! for the round its writes are in; one that writes nothing waits for the
//! latest round, which holds or follows everything it could have read;
//! rounds are applied and flushed in order, and the engine's flush makes
//! everything applied before it durable. When a round cannot be applied or
//! flushed, it and every round queued after it (which may have been
//! decided on its writes) fail together, and updates still deciding on
//! what was discarded fail too (the overlay's generation tells them).
//!
//! The disk filling up: before applying a round, the committer checks that
//! the data directory's filesystem keeps [`WRITE_MARGIN`] free. When it
//! does not, the round is refused (UNAVAILABLE, "full") without the engine
//! meeting ENOSPC, so it stays healthy and reads keep working; writes are
//! refused at once until the space is there again, and then simply resume.
//!
//! A write error the engine does meet (an I/O error, or a disk filled
//! faster than the margin) leaves it refusing every later write, even once
//! space returns (sled's state, fjall's "poisoned"). So the store marks
//! itself broken: writes are refused at once with a message saying why,
//! reads keep working from the open database, and once the filesystem has
//! room again the next write reopens the engine, which recovers to its last
//! durable state (never acknowledged writes are gone, as they were never
//! acknowledged).
//!
//! A backup (`export`) holds the barrier alone: the committer applies each
//! round under a shared hold of it, so an export never sees a round half
//! applied (sled's iterators are not snapshots).
//!
//! The audit sealer scans pending entries by key, and their keys begin with
//! the time their update decided. [`EmbeddedStore::settled_before`] tells
//! it the time before which no update is still deciding or queued, so it
//! can start its scan there instead of walking every entry it already
//! sealed and deleted (an LSM keeps those as tombstones until compaction).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::vault::gather::{Gather, DEFAULT_COMMIT_DELAY};
use crate::vault::store::{Decide, EngineMemory, Entries, ExportSink, Store, StoreError, Write};

pub mod fjall3_engine;
pub mod fjall_engine;
pub mod sled_engine;

pub use fjall3_engine::Fjall3;
pub use fjall_engine::Fjall;
pub use sled_engine::Sled;

/// What the embedded store needs of a key-value engine: reads, an atomic
/// batch, and a flush that makes every batch applied before it durable.
/// Called from the committer thread and from request paths; never async.
pub trait Engine: Send + Sync + Sized + 'static {
    /// The engine's name, as the configuration and logs spell it.
    const NAME: &'static str;
    /// Opens (or creates) the engine's files in `dir`. A directory another
    /// process has open is refused with [`in_use`]'s error.
    fn open(dir: &Path, options: &EngineOptions) -> Result<Self, StoreError>;
    /// The applied value of one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// As [`Store::scan`], over applied values.
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StoreError>;
    /// Applies `writes` atomically: visible to reads at once, durable at
    /// the next `flush`.
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// Makes everything applied so far durable (a write and sync).
    fn flush(&self) -> Result<(), StoreError>;
    /// Every entry in key order. The store holds its barrier meanwhile.
    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError>;
    /// Bytes the engine's files take.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
    /// Its memory outside the block cache, when it can say.
    fn memory(&self) -> Option<EngineMemory> {
        None
    }
}

/// The refusal of a data directory another process has open.
pub(crate) fn in_use(dir: &Path) -> StoreError {
    StoreError::Unavailable(format!(
        "the data directory {} is in use by another process (is another `vcn serve` running?)",
        dir.display()
    ))
}

/// An engine's failure to open the vault in `dir`, as the operator is
/// told: what to do about a corrupt vault, and where it is.
pub(crate) fn opening(dir: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Corrupt(msg) => StoreError::Corrupt(format!(
            "the vault in {} is corrupt ({msg}); restore it from a backup",
            dir.display()
        )),
        StoreError::Unavailable(msg) => {
            StoreError::Unavailable(format!("cannot open the vault in {}: {msg}", dir.display()))
        }
    }
}

/// An engine's error whose I/O cause is the disk filling up, as the caller
/// is told ([`DISK_FULL`]); None for any other cause.
pub(crate) fn disk_full(io: Option<&std::io::Error>) -> Option<StoreError> {
    io.filter(|io| io.kind() == std::io::ErrorKind::StorageFull)
        .map(|_| StoreError::Unavailable(DISK_FULL.into()))
}

/// A fjall engine that refuses writes after one failed ("poisoned"), as
/// the caller is told.
pub(crate) const POISONED: &str =
    "an earlier write to the vault failed, so it takes no more until it is reopened";

/// An engine's ENOSPC, as the caller is told.
pub(crate) const DISK_FULL: &str =
    "the data directory's filesystem is full (no space left on device): free space or grow it";

/// The first key a scan of `prefix` after `after` (exclusive) can return.
pub(crate) fn scan_start(prefix: &[u8], after: Option<&[u8]>) -> Vec<u8> {
    match after {
        Some(a) => [a, &[0]].concat(),
        None => prefix.to_vec(),
    }
}

/// An engine's ordered iterator from [`scan_start`], cut where keys stop
/// starting with `prefix` or at `limit` entries.
pub(crate) fn take_prefixed<K, V, Err>(
    iter: impl Iterator<Item = Result<(K, V), Err>>,
    prefix: &[u8],
    limit: usize,
    error: impl Fn(Err) -> StoreError,
) -> Result<Entries, StoreError>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut out = Vec::new();
    for item in iter {
        let (k, v) = item.map_err(&error)?;
        if !k.as_ref().starts_with(prefix) || out.len() >= limit {
            break;
        }
        out.push((k.as_ref().to_vec(), v.as_ref().to_vec()));
    }
    Ok(out)
}

/// Hands every entry of an engine's ordered iterator to `sink`; how many.
pub(crate) fn export_all<K, V, Err>(
    iter: impl Iterator<Item = Result<(K, V), Err>>,
    sink: &mut ExportSink<'_>,
    error: impl Fn(Err) -> StoreError,
) -> Result<u64, StoreError>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut n = 0;
    for item in iter {
        let (k, v) = item.map_err(&error)?;
        sink(k.as_ref(), v.as_ref())?;
        n += 1;
    }
    Ok(n)
}

/// The bytes of the files under `dir` (0 for what cannot be read).
pub(crate) fn directory_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => directory_size(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

const STRIPES: usize = 4096;
/// A commit round taking this long (its writers all waiting) is logged.
const SLOW_ROUND: Duration = Duration::from_millis(250);

/// Free space the data directory's filesystem must keep for writes to be
/// taken: a round is refused rather than let the engine run out of room
/// mid-write (what reads need, sled's page rewrites, its segment growth and
/// fjall's journal come out of it).
pub const WRITE_MARGIN: u64 = 4 * 1024 * 1024;
/// Free space the data directory's filesystem needs before a broken store
/// tries to reopen (sled writes its log in segments of this order).
const REOPEN_FREE_BYTES: u64 = 4 * 1024 * 1024;
/// A file of reserved space beside the database. When a write error breaks
/// the store, it is deleted, so the engine has room for the small writes
/// its reads need (sled's page consolidation) and for reopening: reads keep working
/// while client writes are refused. It is made again once space returns.
const RESERVE_FILE: &str = "vcn-reserve";
/// The reserve's size: this, or an eighth of the free space when less.
const RESERVE_BYTES: u64 = 8 * 1024 * 1024;

/// Makes sure the reserve file exists, allocated (not sparse).
fn ensure_reserve(dir: &Path) {
    use fs2::FileExt;
    let path = dir.join(RESERVE_FILE);
    if path.exists() {
        return;
    }
    let size = RESERVE_BYTES.min(fs2::available_space(dir).unwrap_or(0) / 8);
    let made =
        std::fs::File::create(&path).and_then(|f| f.allocate(size).and_then(|_| f.sync_all()));
    if let Err(e) = made {
        tracing::warn!(error = %e, "could not reserve space beside the vault");
        let _ = std::fs::remove_file(&path);
    }
}
/// How often a broken store may try to reopen.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// A checkpoint written into the engine and, once it has made it durable,
/// into a file beside it (`vcn-epoch`). Both engines recover a damaged log
/// silently, to the last record they can read: a truncated or corrupted
/// database file would come back with acknowledged writes missing and no
/// error. The file holds the last checkpoint the engine had on disk; if it
/// opens with an older one, it lost durable writes, and the store refuses
/// to open.
const EPOCH_KEY: &[u8] = b"m/durable-epoch";
const EPOCH_FILE: &str = "vcn-epoch";
const EPOCH_EVERY: Duration = Duration::from_secs(1);

fn db_epoch<E: Engine>(db: &E) -> Result<u64, StoreError> {
    Ok(db
        .get(EPOCH_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

fn read_epoch_file(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join(EPOCH_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().parse().map(Some).map_err(|_| {
            StoreError::Corrupt(format!("{} is not a checkpoint number", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Unavailable(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Replaces `dir/name` with the one line `line`, durably: written beside
/// it, synced, renamed over it, and the directory synced.
fn replace_file(dir: &Path, name: &str, line: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, format!("{line}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes the next checkpoint into the engine, makes it durable, then
/// records it beside the database. Never records one the engine does not
/// have on disk.
fn checkpoint<E: Engine>(db: &E, dir: &Path, epoch: &mut u64) -> Result<(), String> {
    let next = *epoch + 1;
    db.apply(vec![Write::Put(
        EPOCH_KEY.to_vec(),
        next.to_be_bytes().to_vec(),
    )])
    .map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    replace_file(dir, EPOCH_FILE, &next.to_string()).map_err(|e| e.to_string())?;
    *epoch = next;
    Ok(())
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The engine's cache, in bytes: what bounds the process's memory.
    pub cache_capacity: u64,
    /// How long the committer lets a round gather writes before taking it
    /// while the store is busy ([`Gather`]): a round's flush (a write and
    /// a sync of the engine's log) costs the same however many updates it
    /// holds. Zero: take each round at once.
    pub commit_delay: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_capacity: 256 * 1024 * 1024,
            commit_delay: DEFAULT_COMMIT_DELAY,
        }
    }
}

/// A round's outcome, once the committer has it: None while pending.
type Outcome = Option<Result<(), StoreError>>;

/// Writes waiting for the committer.
struct Pending {
    /// The round being collected: its number, writes (in order), how many
    /// updates they came from, and the channel its writers wait on.
    round: u64,
    writes: Vec<Write>,
    updates: u64,
    done: watch::Sender<Outcome>,
    /// The round the committer took last (None once resolved by a
    /// discard): a read-only update with nothing being collected waits for
    /// it, as what it read may be on its way to disk.
    taken: Option<watch::Receiver<Outcome>>,
    /// The latest queued value of every key not yet applied to the engine,
    /// and its round (None: deleted).
    overlay: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    /// Bumped whenever queued writes are discarded: an update that read
    /// before and queues after must fail (it may have read them).
    generation: u64,
    /// Set by a write error: this engine takes no more writes.
    broken: Option<StoreError>,
    /// The committer is asleep waiting for writes.
    idle: bool,
    stop: bool,
    /// Updates deciding now (between reading and queueing), by a number of
    /// their own, with the time they began: what they write is not queued
    /// yet ([`EmbeddedStore::settled_before`]).
    deciding: BTreeMap<u64, SystemTime>,
    /// Numbers for `deciding`.
    next_decision: u64,
    /// When the earliest update queued in the round being collected began.
    collecting_since: Option<SystemTime>,
    /// When the earliest update in the round the committer is applying
    /// began (None once applied or discarded).
    applying_since: Option<SystemTime>,
}

impl Pending {
    /// The time before which every update begun is applied (or failed).
    fn settled_before(&self, now: SystemTime) -> SystemTime {
        [
            self.deciding.values().min().copied(),
            self.collecting_since,
            self.applying_since,
        ]
        .into_iter()
        .flatten()
        .fold(now, SystemTime::min)
    }
}

/// Counters for measuring group commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Rounds applied and flushed.
    pub rounds: u64,
    /// Updates (with writes) in them.
    pub updates: u64,
    /// Rounds the committer let gather for the commit delay first.
    pub gathered: u64,
}

/// State shared between writers and the committer thread.
struct Commit {
    pending: Mutex<Pending>,
    wake: Condvar,
    stats: Mutex<CommitStats>,
}

impl Commit {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding it; if something did, the state is
        // still consistent (every change is a single assignment or push).
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the store and every engine it opens share.
struct Shared {
    /// The data directory.
    dir: PathBuf,
    /// The committer applies each round under a shared hold of this; an
    /// export holds it alone, so it sees no round half-applied.
    barrier: RwLock<()>,
    /// Set by a write error: writes are refused until a reopen succeeds.
    broken: AtomicBool,
    /// Why the store is broken, for the refusal message.
    broken_reason: Mutex<String>,
    /// Set when the filesystem has less than [`WRITE_MARGIN`] free.
    low_space: AtomicBool,
}

impl Shared {
    /// Records a write failure: later writes are refused until a reopen.
    fn mark_broken(&self, e: &StoreError) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            tracing::error!(error = %e, dir = %self.dir.display(), "vault writes failed: refusing writes until the data directory can take them again");
            // Give the engine the reserved room for its reads and a reopen.
            let _ = std::fs::remove_file(self.dir.join(RESERVE_FILE));
        }
        *self.broken_reason.lock().unwrap_or_else(|e| e.into_inner()) = e.to_string();
    }

    /// The error a write gets while the store is broken.
    fn refusal(&self) -> StoreError {
        let reason = self
            .broken_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        StoreError::Unavailable(format!(
            "writes are refused until the vault can write again (reads still work): {reason}"
        ))
    }

    /// Marks the store broken after `e` and returns the refusal to give.
    fn broke(&self, e: StoreError) -> StoreError {
        self.mark_broken(&e);
        self.refusal()
    }

    /// The refusal to give when the filesystem is below the margin (and
    /// records it), or None when there is room (and clears it). A failed
    /// look at the filesystem does not stop writes: the engine's own error
    /// would.
    fn short_of_space(&self) -> Option<StoreError> {
        let free = fs2::available_space(&self.dir).ok()?;
        if free >= WRITE_MARGIN {
            if self.low_space.swap(false, Ordering::SeqCst) {
                tracing::info!(dir = %self.dir.display(), free, "the data directory has room again: taking writes");
            }
            return None;
        }
        if !self.low_space.swap(true, Ordering::SeqCst) {
            tracing::error!(dir = %self.dir.display(), free, margin = WRITE_MARGIN, "the data directory's filesystem is full: refusing writes until it has room (reads still work)");
        }
        Some(StoreError::Unavailable(format!(
            "the data directory's filesystem is full ({free} bytes free, {WRITE_MARGIN} are kept for the vault): \
             writes are refused until there is room again (reads still work); free space or grow it"
        )))
    }
}

/// One open engine and its committer thread.
struct Opened<E: Engine> {
    db: Arc<E>,
    dir: PathBuf,
    /// The last checkpoint; the committer advances it.
    epoch: Arc<AtomicU64>,
    commit: Arc<Commit>,
    committer: Option<JoinHandle<()>>,
}

impl<E: Engine> Opened<E> {
    fn open(shared: &Arc<Shared>, options: &EngineOptions) -> Result<Opened<E>, StoreError> {
        let dir = &shared.dir;
        let db = Arc::new(E::open(dir, options)?);
        let epoch = db_epoch(db.as_ref())?;
        if let Some(recorded) = read_epoch_file(dir)? {
            if epoch < recorded {
                return Err(StoreError::Corrupt(format!(
                    "the vault in {} has lost writes that were durable (its database is at checkpoint {epoch}, \
                     but checkpoint {recorded} was on disk before): the database file was truncated or corrupted. \
                     Do not serve from it: restore the data directory from a backup (vcn restore)",
                    dir.display()
                )));
            }
        }
        let epoch = Arc::new(AtomicU64::new(epoch));
        let commit = Arc::new(Commit {
            pending: Mutex::new(Pending {
                round: 1,
                writes: Vec::new(),
                updates: 0,
                done: watch::channel(None).0,
                taken: None,
                overlay: HashMap::new(),
                generation: 0,
                broken: None,
                idle: false,
                stop: false,
                deciding: BTreeMap::new(),
                next_decision: 0,
                collecting_since: None,
                applying_since: None,
            }),
            wake: Condvar::new(),
            stats: Mutex::new(CommitStats::default()),
        });
        let committer = {
            let (db, commit, shared, epoch) =
                (db.clone(), commit.clone(), shared.clone(), epoch.clone());
            std::thread::Builder::new()
                .name("vcn-committer".into())
                .spawn({
                    let delay = options.commit_delay;
                    move || commit_loop(db.as_ref(), &commit, &shared, &epoch, delay)
                })
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start the committer thread: {e}"))
                })?
        };
        Ok(Opened {
            db,
            dir: dir.to_path_buf(),
            epoch,
            commit,
            committer: Some(committer),
        })
    }
}

impl<E: Engine> Drop for Opened<E> {
    fn drop(&mut self) {
        // The committer applies what is queued, then stops.
        self.commit.pending().stop = true;
        self.commit.wake.notify_one();
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
        let mut epoch = self.epoch.load(Ordering::SeqCst);
        if let Err(e) = checkpoint(self.db.as_ref(), &self.dir, &mut epoch) {
            tracing::warn!(error = %e, "no checkpoint at close (the vault is consistent as of the last one)");
        }
    }
}

/// The embedded store on engine `E`.
pub struct EmbeddedStore<E: Engine> {
    shared: Arc<Shared>,
    options: EngineOptions,
    /// The open database; replaced when a broken store reopens (None only
    /// if that reopen failed).
    engine: RwLock<Option<Arc<Opened<E>>>>,
    /// Striped locks that serialise updates touching the same keys.
    locks: Box<[Mutex<()>]>,
    /// When a reopen was last tried.
    last_reopen: Mutex<Option<Instant>>,
}

/// The store on sled (vaults made before fjall was the default).
pub type SledStore = EmbeddedStore<Sled>;
/// The store on fjall.
pub type FjallStore = EmbeddedStore<Fjall>;
/// The store on fjall 3.
pub type Fjall3Store = EmbeddedStore<Fjall3>;

/// The embedded engines. A data directory keeps the engine it was made
/// with: the configured one only chooses for a new directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// fjall 2, an LSM tree: the engine of vaults made before fjall 3 was
    /// the default (BENCHMARKS.md: 1.4-1.6x the writes a second of sled, a
    /// quarter of its disk, flat latency to 10 M cards), whose bloom
    /// filters are memory outside the cache, about 8 bytes a card.
    Fjall,
    /// sled 0.34, the engine of earlier vaults.
    Sled,
    /// fjall 3: the same design in a new on-disk format, whose filters and
    /// indexes live in its cache, so memory stays bounded by the cache
    /// setting as the vault grows (BENCHMARKS.md, sessions 9 and 12). The
    /// default for new vaults.
    #[default]
    Fjall3,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Fjall => Fjall::NAME,
            EngineKind::Sled => Sled::NAME,
            EngineKind::Fjall3 => Fjall3::NAME,
        }
    }
}

/// Its name as the config file and `--engine` spell it (what
/// [`std::str::FromStr`] parses), so a flag can show the default variant.
impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fjall" => Ok(EngineKind::Fjall),
            "sled" => Ok(EngineKind::Sled),
            "fjall3" => Ok(EngineKind::Fjall3),
            other => Err(format!(
                "unknown engine {other:?}: expected fjall, fjall3 or sled"
            )),
        }
    }
}

/// The file in a data directory that names its engine.
pub const ENGINE_FILE: &str = "vcn-engine";

/// The engine of the vault in `dir`: the one its [`ENGINE_FILE`] names, or
/// for a directory made before that file, the one whose files are there;
/// None for a directory with no vault yet.
pub fn engine_of(dir: &Path) -> Result<Option<EngineKind>, StoreError> {
    let path = dir.join(ENGINE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            return t
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StoreError::Unavailable(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    }
    let has = |markers: &[&str]| markers.iter().any(|m| dir.join(m).exists());
    Ok(if has(sled_engine::MARKERS) {
        Some(EngineKind::Sled)
    } else if has(fjall_engine::MARKERS) {
        Some(EngineKind::Fjall)
    } else {
        None
    })
}

/// Opens the vault in `dir` on its own engine, or creates one on `new`
/// (and records which). Asking for another engine than an existing vault's
/// is not an error: the vault is opened as what it is, and a warning says so.
pub fn open(
    dir: &Path,
    new: EngineKind,
    options: &EngineOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    let existing = engine_of(dir)?;
    let kind = existing.unwrap_or(new);
    if kind != new {
        tracing::warn!(
            dir = %dir.display(),
            engine = kind.name(),
            configured = new.name(),
            "the data directory holds a vault of another engine than the configured one, which applies to new vaults only: opening it as it is"
        );
    }
    if existing.is_none() {
        // Before the engine writes a file: fjall 2 and fjall 3 both write
        // `version`, so a fjall 3 directory that a crash left without the
        // record would be taken for a fjall 2 one.
        record_engine(dir, kind)?;
    }
    let store: Arc<dyn Store> = match kind {
        EngineKind::Fjall => Arc::new(FjallStore::open(dir, options)?),
        EngineKind::Sled => Arc::new(SledStore::open(dir, options)?),
        EngineKind::Fjall3 => Arc::new(Fjall3Store::open(dir, options)?),
    };
    tracing::info!(dir = %dir.display(), engine = kind.name(), "vault opened");
    Ok(store)
}

/// Makes the data directory (and its parents) if it is not there.
pub(crate) fn create_data_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        StoreError::Unavailable(format!(
            "cannot create the data directory {}: {e}",
            dir.display()
        ))
    })
}

/// Writes [`ENGINE_FILE`], durably (file and directory synced), making the
/// directory first.
fn record_engine(dir: &Path, kind: EngineKind) -> Result<(), StoreError> {
    create_data_dir(dir)?;
    replace_file(dir, ENGINE_FILE, kind.name()).map_err(|e| {
        StoreError::Unavailable(format!(
            "cannot record the vault's engine in {}: {e}",
            dir.join(ENGINE_FILE).display()
        ))
    })
}

impl<E: Engine> EmbeddedStore<E> {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, options: &EngineOptions) -> Result<EmbeddedStore<E>, StoreError> {
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            barrier: RwLock::new(()),
            broken: AtomicBool::new(false),
            broken_reason: Mutex::new(String::new()),
            low_space: AtomicBool::new(false),
        });
        let engine = Opened::<E>::open(&shared, options)?;
        ensure_reserve(dir);
        Ok(EmbeddedStore {
            shared,
            options: options.clone(),
            engine: RwLock::new(Some(Arc::new(engine))),
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            last_reopen: Mutex::new(None),
        })
    }

    fn engine(&self) -> Result<Arc<Opened<E>>, StoreError> {
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::Unavailable(
                    "the vault is closed after a failed reopen; retrying".into(),
                )
            })
    }

    /// Rounds and updates committed so far by the open engine (updates per
    /// round is how well group commit shares its syncs).
    pub fn stats(&self) -> CommitStats {
        self.engine()
            .map(|e| *e.commit.stats.lock().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_default()
    }

    /// Refuses a write while the filesystem is short of room, or while the
    /// store is broken unless the filesystem has room again and a reopen
    /// (at most once a second) succeeds.
    fn writable(&self) -> Result<(), StoreError> {
        if self.shared.low_space.load(Ordering::SeqCst) {
            if let Some(refusal) = self.shared.short_of_space() {
                return Err(refusal);
            }
        }
        if !self.shared.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        let refuse = || self.shared.refusal();
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return Err(refuse());
            }
            *last = Some(Instant::now());
        }
        let free = fs2::available_space(&self.shared.dir).unwrap_or(0);
        if free < REOPEN_FREE_BYTES + RESERVE_BYTES.min(free / 8) {
            return Err(refuse());
        }
        match self.reopen() {
            Ok(()) => {
                ensure_reserve(&self.shared.dir);
                self.shared.broken.store(false, Ordering::SeqCst);
                tracing::info!(dir = %self.shared.dir.display(), free, "vault reopened: taking writes again");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "vault could not be reopened");
                Err(refuse())
            }
        }
    }

    /// Replaces the engine with a freshly opened one: it recovers to its
    /// last durable state and forgets its write error.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.engine.write().unwrap_or_else(|e| e.into_inner());
        // Drop the failed engine first: it holds its file lock until then.
        let old = slot.take().map(|e| Arc::downgrade(&e));
        match Opened::<E>::open(&self.shared, &self.options) {
            Ok(engine) => {
                *slot = Some(Arc::new(engine));
                Ok(())
            }
            Err(e) => {
                // Calls still in flight hold the old engine (that is why it
                // could not be reopened): keep serving reads from it.
                *slot = old.and_then(|w| w.upgrade());
                Err(match e {
                    StoreError::Unavailable(m) if m.contains("in use") => StoreError::Unavailable(
                        "the vault is reopening after a write error (calls still in flight hold it): retry in a moment".into(),
                    ),
                    other => other,
                })
            }
        }
    }

    /// A read, once more on a reopened engine when it failed on a broken
    /// one: after a write error sled may fail a read that would have had to
    /// tidy a page (a write), while a freshly opened engine reads from disk.
    fn read<T>(&self, op: impl Fn(&E) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match op(&self.engine()?.db) {
            Err(StoreError::Unavailable(reason)) => {
                self.reopen_for_reads(reason)?;
                op(&self.engine()?.db)
            }
            other => other,
        }
    }

    /// After a read failed with `reason`: the vault is marked broken (no
    /// writes until it can take them) and reopened, for the read to be
    /// tried once more.
    fn reopen_for_reads(&self, reason: String) -> Result<(), StoreError> {
        self.shared.mark_broken(&StoreError::Unavailable(reason));
        tracing::warn!("a read failed on the broken vault: reopening it for reads");
        self.reopen()
    }

    /// A time before which every update this store has begun is applied
    /// (visible to `scan`) or has failed: the pending audit entries their
    /// decisions wrote, whose keys begin with the time of the decision, are
    /// all in the engine below it. Updates begin after this call or are
    /// counted in it. A wall-clock step backwards breaks the promise, so
    /// the sealer still scans everything now and then.
    pub fn settled_before(&self) -> SystemTime {
        let now = SystemTime::now();
        match self.engine() {
            Ok(e) => e.commit.pending().settled_before(now),
            Err(_) => now,
        }
    }

    /// The synchronous part of an update: lock, read, decide, queue.
    /// Returns what to wait on before answering (None: nothing).
    fn stage(
        &self,
        keys: &[Vec<u8>],
        decide: &mut Decide<'_>,
    ) -> Result<Option<watch::Receiver<Outcome>>, StoreError> {
        self.writable()?;
        let engine = self.engine()?;
        let _guards: Vec<MutexGuard<'_, ()>> = crate::vault::store::lock_stripes(keys, STRIPES)
            .into_iter()
            // A poisoned stripe only means a decision panicked; the lock
            // still orders updates, so take it.
            .map(|i| self.locks[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        // Queued values first. No other update can queue these keys while
        // we hold their stripes, and the committer removes a value from the
        // overlay only after applying it to the engine, so a miss here is
        // found in the engine.
        let mut deciding = Deciding {
            commit: &engine.commit,
            id: None,
        };
        let (mut values, generation) = {
            let mut p = engine.commit.pending();
            if let Some(e) = &p.broken {
                return Err(e.clone());
            }
            let values: Vec<Option<Option<Vec<u8>>>> = keys
                .iter()
                .map(|k| p.overlay.get(k).map(|(_, v)| v.clone()))
                .collect();
            let id = p.next_decision;
            p.next_decision += 1;
            p.deciding.insert(id, SystemTime::now());
            deciding.id = Some(id);
            (values, p.generation)
        };
        for (k, v) in keys.iter().zip(values.iter_mut()) {
            if v.is_none() {
                let read = engine.db.get(k).map_err(|e| self.shared.broke(e))?;
                *v = Some(read.map(|v| v.to_vec()));
            }
        }
        let values: Vec<Option<Vec<u8>>> = values.into_iter().map(Option::flatten).collect();
        let writes = decide(&values);
        let mut p = engine.commit.pending();
        // Out of `deciding` under this lock: queued below, or never.
        let began = deciding
            .id
            .take()
            .and_then(|id| p.deciding.remove(&id))
            .unwrap_or_else(SystemTime::now);
        if let Some(e) = &p.broken {
            return Err(e.clone());
        }
        if p.generation != generation {
            // What we read may have been discarded with a failed round.
            return Err(StoreError::Unavailable(
                "the vault could not write (see the previous error); nothing was changed: retry"
                    .into(),
            ));
        }
        if writes.is_empty() {
            // Nothing to write, but what was read may itself still be on
            // its way to disk: wait for the latest round.
            return Ok(if p.writes.is_empty() {
                p.taken.clone()
            } else {
                Some(p.done.subscribe())
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
        p.collecting_since = Some(p.collecting_since.map_or(began, |t| t.min(began)));
        let waiter = p.done.subscribe();
        let wake = p.idle;
        drop(p);
        if wake {
            engine.commit.wake.notify_one();
        }
        Ok(Some(waiter))
    }
}

/// An update's entry in [`Pending::deciding`] while it reads and decides:
/// removed when dropped (an error, a panic in the decision) unless `stage`
/// already took it out under the lock it queues under.
struct Deciding<'a> {
    commit: &'a Commit,
    id: Option<u64>,
}

impl Drop for Deciding<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.commit.pending().deciding.remove(&id);
        }
    }
}

/// Waits for a round's outcome.
async fn wait_round(waiter: Option<watch::Receiver<Outcome>>) -> Result<(), StoreError> {
    let Some(mut rx) = waiter else {
        return Ok(());
    };
    let outcome = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| StoreError::Unavailable("the committer thread has stopped".into()))?
        .clone();
    outcome.unwrap_or(Ok(()))
}

/// Fails the round being committed (`done`) and everything queued after it
/// with `err`, and forgets their writes.
fn discard(commit: &Commit, done: &watch::Sender<Outcome>, err: StoreError, broken: bool) {
    let next = {
        let mut p = commit.pending();
        p.generation += 1;
        p.overlay.clear();
        p.writes.clear();
        p.updates = 0;
        p.round += 1;
        p.taken = None;
        p.collecting_since = None;
        p.applying_since = None;
        if broken {
            p.broken = Some(err.clone());
        }
        std::mem::replace(&mut p.done, watch::channel(None).0)
    };
    done.send_replace(Some(Err(err.clone())));
    next.send_replace(Some(Err(err)));
}

/// The committer: apply each round as one batch, flush, wake its writers.
fn commit_loop<E: Engine>(
    db: &E,
    commit: &Commit,
    shared: &Shared,
    epoch: &AtomicU64,
    delay: Duration,
) {
    let mut last_checkpoint = Instant::now();
    let mut gather = Gather::new(delay);
    loop {
        let (round, writes, updates, done) = {
            let mut p = commit.pending();
            while p.writes.is_empty() && !p.stop {
                p.idle = true;
                p = commit.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            p.idle = false;
            if p.writes.is_empty() {
                return; // stopping, and nothing left to write
            }
            if let Some(wait) = gather.wait_before_taking(p.updates, p.stop) {
                // Writers keep queueing meanwhile (the lock is released;
                // `idle` is false, so they do not wake us).
                drop(p);
                std::thread::sleep(wait);
                p = commit.pending();
                commit
                    .stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .gathered += 1;
            }
            let round = p.round;
            p.round += 1;
            let done = std::mem::replace(&mut p.done, watch::channel(None).0);
            p.taken = Some(done.subscribe());
            let updates = std::mem::take(&mut p.updates);
            p.applying_since = p.collecting_since.take();
            gather.taken(updates);
            (round, std::mem::take(&mut p.writes), updates, done)
        };
        if let Some(refusal) = shared.short_of_space() {
            discard(commit, &done, refusal, false);
            continue;
        }
        let applying = Instant::now();
        let applied = {
            let _shared = shared.barrier.read().unwrap_or_else(|e| e.into_inner());
            db.apply(writes)
        };
        let apply_took = applying.elapsed();
        if let Err(e) = applied {
            let refusal = shared.broke(e);
            discard(commit, &done, refusal, true);
            continue;
        }
        {
            let mut p = commit.pending();
            p.overlay.retain(|_, (r, _)| *r != round);
            p.applying_since = None;
        }
        let started = Instant::now();
        let flushed = db.flush();
        let flush_took = started.elapsed();
        if let Some(m) = crate::metrics::get() {
            m.flush_duration.observe(flush_took.as_secs_f64());
        }
        if apply_took + flush_took >= SLOW_ROUND {
            // Every writer of the round waited this long: say where.
            tracing::warn!(
                engine = E::NAME,
                updates,
                apply_ms = apply_took.as_millis() as u64,
                flush_ms = flush_took.as_millis() as u64,
                "a commit round was slow (apply: the engine's batch, including its own write stalls; flush: the sync)"
            );
        }
        match flushed {
            Ok(_) => {
                {
                    let mut st = commit.stats.lock().unwrap_or_else(|e| e.into_inner());
                    st.rounds += 1;
                    st.updates += updates;
                }
                done.send_replace(Some(Ok(())));
                if last_checkpoint.elapsed() >= EPOCH_EVERY {
                    last_checkpoint = Instant::now();
                    let mut e = epoch.load(Ordering::SeqCst);
                    match checkpoint(db, &shared.dir, &mut e) {
                        Ok(()) => epoch.store(e, Ordering::SeqCst),
                        Err(err) => tracing::error!(error = %err, "writing a checkpoint failed"),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "flushing the vault to disk failed");
                let refusal = shared.broke(StoreError::Unavailable(format!(
                    "could not make the write durable: {e}"
                )));
                discard(commit, &done, refusal, true);
                // Do not spin on a failing disk.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[async_trait]
impl<E: Engine> Store for EmbeddedStore<E> {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|db| db.get(key))
    }

    /// On a blocking thread: a scan may walk far (fjall keeps deleted keys
    /// as tombstones until compaction, and the sealer's scans from the
    /// first pending entry walk every one), and must not hold up a tokio
    /// worker meanwhile. A failure is tried once more after a reopen, the
    /// way `read` does it, and on a blocking thread too.
    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        // The outer error: the scan's task itself failed (it panicked), not
        // the engine, so there is nothing to reopen.
        let scan = |engine: Arc<Opened<E>>| {
            let (p, a) = (prefix.to_vec(), after.map(<[u8]>::to_vec));
            async move {
                tokio::task::spawn_blocking(move || engine.db.scan(&p, a.as_deref(), limit))
                    .await
                    .map_err(|e| {
                        StoreError::Unavailable(format!("a scan of the vault failed: {e}"))
                    })
            }
        };
        match scan(self.engine()?).await? {
            Err(StoreError::Unavailable(reason)) => {
                self.reopen_for_reads(reason)?;
                scan(self.engine()?).await?
            }
            other => other,
        }
    }

    async fn update(&self, keys: &[Vec<u8>], decide: &mut Decide<'_>) -> Result<(), StoreError> {
        let waiter = self.stage(keys, decide)?;
        wait_round(waiter).await
    }

    async fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        let engine = self.engine()?;
        // The committer waits while this copies (writers queue meanwhile);
        // a copy of 1 M cards takes seconds.
        let _alone = self
            .shared
            .barrier
            .write()
            .unwrap_or_else(|e| e.into_inner());
        engine.db.export(sink)
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(Some(self.engine()?.db.size_on_disk()?))
    }

    fn memory(&self) -> Option<EngineMemory> {
        self.engine().ok()?.db.memory()
    }

    fn settled_before(&self) -> Option<SystemTime> {
        Some(EmbeddedStore::settled_before(self))
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let engine = self.engine()?;
        let waiter = {
            let p = engine.commit.pending();
            if p.writes.is_empty() {
                p.taken.clone()
            } else {
                Some(p.done.subscribe())
            }
        };
        match waiter {
            // Nothing queued or in flight: flush anyway (cheap when clean),
            // on a blocking thread, for what the engine recovered or was
            // given outside rounds.
            None => {
                let db = engine.db.clone();
                tokio::task::spawn_blocking(move || db.flush())
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("flush task failed: {e}")))?
            }
            some => wait_round(some).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Write {
        Write::Put(k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    async fn update_reads_decides_and_persists_across_reopen<E: Engine>() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default()).unwrap();
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
        let s = EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default()).unwrap();
        assert_eq!(s.get(b"a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get(b"b").await.unwrap(), None);
    }

    async fn scan_is_prefix_bounded_and_pages<E: Engine>() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default()).unwrap();
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
    async fn transfers_between_overlapping_keys_keep_the_total_across_reopen<E: Engine>() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Vec<u8>> = (0..5).map(|i| format!("acct{i}").into_bytes()).collect();
        let read = |v: &Option<Vec<u8>>| -> i64 {
            v.as_deref()
                .map_or(1000, |b| std::str::from_utf8(b).unwrap().parse().unwrap())
        };
        {
            let s =
                Arc::new(EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default()).unwrap());
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
        let s = EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default()).unwrap();
        let mut total = 0;
        for k in &keys {
            total += read(&s.get(k).await.unwrap());
        }
        assert_eq!(
            total, 5000,
            "the reopened store holds every acknowledged transfer"
        );
    }

    /// The commit delay: a writer alone never waits for it; writers
    /// arriving together get rounds that gathered for it.
    async fn a_busy_store_lets_rounds_gather_and_a_lone_writer_never_waits<E: Engine>() {
        let dir = tempfile::tempdir().unwrap();
        let options = EngineOptions {
            commit_delay: Duration::from_millis(50),
            ..EngineOptions::default()
        };
        let s = Arc::new(EmbeddedStore::<E>::open(dir.path(), &options).unwrap());
        for i in 0..5 {
            s.update(&[format!("lone{i}").into_bytes()], &mut |_| {
                vec![put(&format!("lone{i}"), "x")]
            })
            .await
            .unwrap();
        }
        let alone = s.stats();
        assert_eq!((alone.rounds, alone.updates, alone.gathered), (5, 5, 0));

        let mut tasks = Vec::new();
        for t in 0..32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..4 {
                    let k = format!("busy{t}/{n}");
                    s.update(&[k.clone().into_bytes()], &mut |_| vec![put(&k, "x")])
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let busy = s.stats();
        let (rounds, updates) = (busy.rounds - alone.rounds, busy.updates - alone.updates);
        assert_eq!(updates, 128);
        assert!(busy.gathered > 0, "{busy:?}");
        assert!(
            rounds * 4 <= updates,
            "rounds should gather several writers each: {rounds} rounds for {updates} updates"
        );
        for t in 0..32 {
            assert!(s
                .get(format!("busy{t}/3").as_bytes())
                .await
                .unwrap()
                .is_some());
        }
    }

    async fn concurrent_updates_of_one_key_never_lose_an_increment<E: Engine>() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default()).unwrap());
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

    /// An update still deciding holds `settled_before` at or before the
    /// time it began, whatever completes meanwhile; once it is applied the
    /// store is settled up to now again.
    async fn settled_before_waits_for_an_update_still_deciding<E: Engine>() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default()).unwrap());
        let before = SystemTime::now();
        assert!(
            s.settled_before() >= before,
            "nothing in flight: settled up to now"
        );
        let (began_tx, began_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let slow = {
            let s = s.clone();
            tokio::spawn(async move {
                s.update(&[b"slow".to_vec()], &mut |_| {
                    let _ = began_tx.send(());
                    let _ = release_rx.lock().unwrap().recv();
                    vec![put("slow", "1")]
                })
                .await
                .unwrap();
            })
        };
        tokio::task::spawn_blocking(move || began_rx.recv().unwrap())
            .await
            .unwrap();
        let deciding = SystemTime::now();
        // Another update completes meanwhile: the slow one still holds the
        // mark back.
        s.update(&[b"fast".to_vec()], &mut |_| vec![put("fast", "1")])
            .await
            .unwrap();
        let mark = s.settled_before();
        assert!(
            before <= mark && mark <= deciding,
            "{mark:?} should be when the slow update began, between {before:?} and {deciding:?}"
        );
        release_tx.send(()).unwrap();
        slow.await.unwrap();
        let after = SystemTime::now();
        assert!(s.settled_before() >= after);
        assert_eq!(s.get(b"slow").await.unwrap(), Some(b"1".to_vec()));
    }

    /// A second store on an open data directory is refused, saying why.
    async fn a_directory_in_use_is_refused<E: Engine>() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default()).unwrap();
        let err = EmbeddedStore::<E>::open(dir.path(), &EngineOptions::default())
            .err()
            .expect("a second open must fail");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }

    /// Every test above, on each engine.
    macro_rules! on_every_engine {
        ($( [$($flavor:tt)*] $name:ident ),* $(,)?) => {
            mod on_fjall {
                $( #[tokio::test $($flavor)*] async fn $name() { super::$name::<super::Fjall>().await } )*
            }
            mod on_sled {
                $( #[tokio::test $($flavor)*] async fn $name() { super::$name::<super::Sled>().await } )*
            }
            mod on_fjall3 {
                $( #[tokio::test $($flavor)*] async fn $name() { super::$name::<super::Fjall3>().await } )*
            }
        };
    }

    on_every_engine!(
        [] update_reads_decides_and_persists_across_reopen,
        [] scan_is_prefix_bounded_and_pages,
        [(flavor = "multi_thread", worker_threads = 4)] transfers_between_overlapping_keys_keep_the_total_across_reopen,
        [(flavor = "multi_thread", worker_threads = 4)] a_busy_store_lets_rounds_gather_and_a_lone_writer_never_waits,
        [(flavor = "multi_thread", worker_threads = 4)] concurrent_updates_of_one_key_never_lose_an_increment,
        [(flavor = "multi_thread", worker_threads = 4)] settled_before_waits_for_an_update_still_deciding,
        [] a_directory_in_use_is_refused,
    );

    /// What an engine is shown as (a flag's default) parses back to it.
    #[test]
    fn an_engine_name_shown_parses_back() {
        for kind in [EngineKind::Fjall3, EngineKind::Fjall, EngineKind::Sled] {
            assert_eq!(kind.to_string().parse::<EngineKind>(), Ok(kind));
        }
        assert_eq!(EngineKind::default().to_string(), "fjall3");
    }

    /// A new directory records its engine; an existing one opens as what
    /// it is whatever is asked, also one made before the record existed.
    #[tokio::test]
    async fn a_data_directory_keeps_the_engine_it_was_made_with() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        assert_eq!(engine_of(&d).unwrap(), None);
        {
            let s = open(&d, EngineKind::Sled, &EngineOptions::default()).unwrap();
            s.update(&[], &mut |_| vec![put("k", "v")]).await.unwrap();
        }
        assert_eq!(engine_of(&d).unwrap(), Some(EngineKind::Sled));
        {
            let s = open(&d, EngineKind::Fjall, &EngineOptions::default()).unwrap();
            assert_eq!(s.get(b"k").await.unwrap(), Some(b"v".to_vec()));
        }
        // A vault from before the record: found by sled's own files.
        std::fs::remove_file(d.join(ENGINE_FILE)).unwrap();
        assert_eq!(engine_of(&d).unwrap(), Some(EngineKind::Sled));
        let s = open(&d, EngineKind::Fjall, &EngineOptions::default()).unwrap();
        assert_eq!(s.get(b"k").await.unwrap(), Some(b"v".to_vec()));
        drop(s);
        // And the default makes fjall 3.
        let f = dir.path().join("new");
        open(&f, EngineKind::default(), &EngineOptions::default()).unwrap();
        assert_eq!(engine_of(&f).unwrap(), Some(EngineKind::Fjall3));
        // A fjall 3 vault is recorded as such, and a fjall (2) one asked of
        // it is opened as fjall 3: the two formats are never mixed.
        let f3 = dir.path().join("new3");
        {
            let s = open(&f3, EngineKind::Fjall3, &EngineOptions::default()).unwrap();
            s.update(&[], &mut |_| vec![put("k3", "v3")]).await.unwrap();
        }
        assert_eq!(engine_of(&f3).unwrap(), Some(EngineKind::Fjall3));
        let s = open(&f3, EngineKind::Fjall, &EngineOptions::default()).unwrap();
        assert_eq!(s.get(b"k3").await.unwrap(), Some(b"v3".to_vec()));
        drop(s);
        // The record comes before the engine's first file: a new fjall 3
        // vault whose engine fails to open (here its `keyspaces` is a
        // file) is still recorded as fjall 3, not taken for fjall 2.
        let broken = dir.path().join("broken3");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(broken.join("keyspaces"), "not a directory").unwrap();
        assert!(open(&broken, EngineKind::Fjall3, &EngineOptions::default()).is_err());
        assert_eq!(engine_of(&broken).unwrap(), Some(EngineKind::Fjall3));
        std::fs::write(f.join(ENGINE_FILE), "rocks\n").unwrap();
        assert!(matches!(engine_of(&f), Err(StoreError::Corrupt(m)) if m.contains("rocks")));
    }
}
