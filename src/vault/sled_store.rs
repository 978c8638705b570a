//! The embedded engine: one sled tree, striped key locks, group commit by a
//! committer thread.
//!
//! An update locks the stripes of its keys (in a fixed order, so two
//! updates never deadlock), reads, decides and queues its writes in the
//! round being collected, then releases the locks and waits for that round.
//! A dedicated committer thread takes everything queued since its last
//! round, applies it to sled as ONE atomic batch, calls `Db::flush` (one
//! write and sync of sled's log) and wakes every writer of the round at
//! once. No lock is held across the sync and the sync never runs on a
//! tokio worker. (sled 0.34's own `flush_async` was seen to hang under
//! tokio, hence the thread.)
//!
//! Why queue instead of applying each update's batch in the caller: in
//! sled 0.34 a batch takes a process-wide lock that `Db::flush` holds
//! across its whole I/O, so a batch applied while a flush is in flight
//! blocks until the sync is done, and it blocks the tokio worker it runs on.
//! The committer never applies while it flushes, so callers only ever wait
//! on memory.
//!
//! Writes queued but not yet applied live in an overlay that updates
//! consult first, so an update sees every update to its keys before it.
//! Nobody is answered before what they read is durable: an update waits
//! for the round its writes are in; one that writes nothing waits for the
//! latest round, which holds or follows everything it could have read;
//! rounds are applied and flushed in order, and sled's flush makes
//! everything applied before it durable. When a round cannot be applied or
//! flushed, it and every round queued after it (which may have been
//! decided on its writes) fail together, and updates still deciding on
//! what was discarded fail too (the overlay's generation tells them).
//!
//! The disk filling up: before applying a round, the committer checks that
//! the data directory's filesystem keeps [`WRITE_MARGIN`] free. When it
//! does not, the round is refused (UNAVAILABLE, "full") without sled ever
//! meeting ENOSPC, so sled stays healthy and reads keep working; writes are
//! refused at once until the space is there again, and then simply resume.
//!
//! A write error sled does meet (an I/O error, or a disk filled faster than
//! the margin) leaves sled refusing every later write, even once space
//! returns. So the store marks itself broken: writes are refused at once
//! with a message saying why, reads keep working from the open database,
//! and once the filesystem has room again the next write reopens sled,
//! which recovers to its last durable state (never acknowledged writes are
//! gone, as they were never acknowledged).
//!
//! A backup (`export`) holds the barrier alone: the committer applies each
//! round under a shared hold of it, so an export never sees a round half
//! applied (sled's iterators are not snapshots).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::vault::gather::{Gather, DEFAULT_COMMIT_DELAY};
use crate::vault::store::{Decide, ExportSink, Store, StoreError, Write};

const STRIPES: usize = 4096;

/// Free space the data directory's filesystem must keep for writes to be
/// taken: a round is refused rather than let sled run out of room mid-write
/// (what reads need, sled's page rewrites and its segment growth come out
/// of it).
pub const WRITE_MARGIN: u64 = 4 * 1024 * 1024;
/// Free space the data directory's filesystem needs before a broken store
/// tries to reopen (sled writes its log in segments of this order).
const REOPEN_FREE_BYTES: u64 = 4 * 1024 * 1024;
/// A file of reserved space beside the database. When a write error breaks
/// the store, it is deleted, so sled has room for the small writes its
/// reads need (a page consolidation) and for reopening: reads keep working
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

/// A checkpoint written into sled and, once sled has made it durable, into
/// a file beside it (`vcn-epoch`). sled recovers a damaged log silently, to
/// the last record it can read: a truncated or corrupted database file
/// would come back with acknowledged writes missing and no error. The file
/// holds the last checkpoint sled had on disk; if sled opens with an older
/// one, it lost durable writes, and the store refuses to open.
const EPOCH_KEY: &[u8] = b"m/durable-epoch";
const EPOCH_FILE: &str = "vcn-epoch";
const EPOCH_EVERY: Duration = Duration::from_secs(1);

fn db_epoch(db: &sled::Db) -> Result<u64, StoreError> {
    Ok(db
        .get(EPOCH_KEY)
        .map_err(io_error)?
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

fn write_epoch_file(dir: &Path, epoch: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{EPOCH_FILE}.tmp"));
    std::fs::write(&tmp, format!("{epoch}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(EPOCH_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes the next checkpoint into sled, makes it durable, then records it
/// beside the database. Never records one sled does not have on disk.
fn checkpoint(db: &sled::Db, dir: &Path, epoch: &mut u64) -> Result<(), String> {
    let next = *epoch + 1;
    db.insert(EPOCH_KEY, &next.to_be_bytes())
        .map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    write_epoch_file(dir, next).map_err(|e| e.to_string())?;
    *epoch = next;
    Ok(())
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache, in bytes: what bounds the process's memory.
    pub cache_capacity: u64,
    /// How long the committer lets a round gather writes before taking it
    /// while the store is busy ([`Gather`]): a round's flush (a write and
    /// a sync of sled's log, on sled's I/O threads) costs the same however
    /// many updates it holds. Zero: take each round at once.
    pub commit_delay: Duration,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
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
    /// The latest queued value of every key not yet applied to sled, and
    /// its round (None: deleted).
    overlay: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    /// Bumped whenever queued writes are discarded: an update that read
    /// before and queues after must fail (it may have read them).
    generation: u64,
    /// Set by a write error: this engine takes no more writes.
    broken: Option<StoreError>,
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
            // Give sled the reserved room for its reads and a reopen.
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
    /// look at the filesystem does not stop writes: sled's own error would.
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

/// One open sled database and its committer thread.
struct Engine {
    db: sled::Db,
    dir: PathBuf,
    /// The last checkpoint; the committer advances it.
    epoch: Arc<AtomicU64>,
    commit: Arc<Commit>,
    committer: Option<JoinHandle<()>>,
}

impl Engine {
    fn open(shared: &Arc<Shared>, options: &SledOptions) -> Result<Engine, StoreError> {
        let dir = &shared.dir;
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
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(describe_open_error(dir, e)),
            }
        };
        let epoch = db_epoch(&db)?;
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
                    move || commit_loop(&db, &commit, &shared, &epoch, delay)
                })
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start the committer thread: {e}"))
                })?
        };
        Ok(Engine {
            db,
            dir: dir.to_path_buf(),
            epoch,
            commit,
            committer: Some(committer),
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The committer applies what is queued, then stops.
        self.commit.pending().stop = true;
        self.commit.wake.notify_one();
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
        let mut epoch = self.epoch.load(Ordering::SeqCst);
        if let Err(e) = checkpoint(&self.db, &self.dir, &mut epoch) {
            tracing::warn!(error = %e, "no checkpoint at close (the vault is consistent as of the last one)");
        }
    }
}

pub struct SledStore {
    shared: Arc<Shared>,
    options: SledOptions,
    /// The open database; replaced when a broken store reopens (None only
    /// if that reopen failed).
    engine: RwLock<Option<Arc<Engine>>>,
    /// Striped locks that serialise updates touching the same keys.
    locks: Box<[Mutex<()>]>,
    /// When a reopen was last tried.
    last_reopen: Mutex<Option<Instant>>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, options: &SledOptions) -> Result<SledStore, StoreError> {
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            barrier: RwLock::new(()),
            broken: AtomicBool::new(false),
            broken_reason: Mutex::new(String::new()),
            low_space: AtomicBool::new(false),
        });
        let engine = Engine::open(&shared, options)?;
        ensure_reserve(dir);
        Ok(SledStore {
            shared,
            options: options.clone(),
            engine: RwLock::new(Some(Arc::new(engine))),
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            last_reopen: Mutex::new(None),
        })
    }

    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
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

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.engine()
            .map(|e| e.db.size_on_disk().unwrap_or(0))
            .unwrap_or(0)
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

    /// Replaces the engine with a freshly opened one: sled recovers to its
    /// last durable state and forgets its write error.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.engine.write().unwrap_or_else(|e| e.into_inner());
        // Drop the failed engine first: sled holds its file lock until then.
        let old = slot.take().map(|e| Arc::downgrade(&e));
        match Engine::open(&self.shared, &self.options) {
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
    fn read<T>(&self, op: impl Fn(&sled::Db) -> sled::Result<T>) -> Result<T, StoreError> {
        match op(&self.engine()?.db) {
            Ok(v) => Ok(v),
            Err(e) => match io_error(e) {
                StoreError::Unavailable(reason) => {
                    self.shared.mark_broken(&StoreError::Unavailable(reason));
                    tracing::warn!("a read failed on the broken vault: reopening it for reads");
                    self.reopen()?;
                    op(&self.engine()?.db).map_err(io_error)
                }
                corrupt => Err(corrupt),
            },
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
        // overlay only after applying it to sled, so a miss here is found
        // in sled.
        let (mut values, generation) = {
            let p = engine.commit.pending();
            if let Some(e) = &p.broken {
                return Err(e.clone());
            }
            let values: Vec<Option<Option<Vec<u8>>>> = keys
                .iter()
                .map(|k| p.overlay.get(k).map(|(_, v)| v.clone()))
                .collect();
            (values, p.generation)
        };
        for (k, v) in keys.iter().zip(values.iter_mut()) {
            if v.is_none() {
                let read = engine
                    .db
                    .get(k)
                    .map_err(|e| self.shared.broke(io_error(e)))?;
                *v = Some(read.map(|v| v.to_vec()));
            }
        }
        let values: Vec<Option<Vec<u8>>> = values.into_iter().map(Option::flatten).collect();
        let writes = decide(&values);
        let mut p = engine.commit.pending();
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
        let waiter = p.done.subscribe();
        let wake = p.idle;
        drop(p);
        if wake {
            engine.commit.wake.notify_one();
        }
        Ok(Some(waiter))
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
        if broken {
            p.broken = Some(err.clone());
        }
        std::mem::replace(&mut p.done, watch::channel(None).0)
    };
    done.send_replace(Some(Err(err.clone())));
    next.send_replace(Some(Err(err)));
}

/// The committer: apply each round as one batch, flush, wake its writers.
fn commit_loop(
    db: &sled::Db,
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
            gather.taken(updates);
            (round, std::mem::take(&mut p.writes), updates, done)
        };
        if let Some(refusal) = shared.short_of_space() {
            discard(commit, &done, refusal, false);
            continue;
        }
        let mut batch = sled::Batch::default();
        for w in writes {
            match w {
                Write::Put(k, v) => batch.insert(k, v),
                Write::Delete(k) => batch.remove(k),
            }
        }
        let applied = {
            let _shared = shared.barrier.read().unwrap_or_else(|e| e.into_inner());
            db.apply_batch(batch)
        };
        if let Err(e) = applied {
            let refusal = shared.broke(io_error(e));
            discard(commit, &done, refusal, true);
            continue;
        }
        commit.pending().overlay.retain(|_, (r, _)| *r != round);
        let started = Instant::now();
        let flushed = db.flush();
        if let Some(m) = crate::metrics::get() {
            m.flush_duration.observe(started.elapsed().as_secs_f64());
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
                    "could not make the write durable: {}",
                    io_error(e)
                )));
                discard(commit, &done, refusal, true);
                // Do not spin on a failing disk.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn io_error(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => StoreError::Unavailable(
            "the data directory's filesystem is full (no space left on device): free space or grow it".into(),
        ),
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
        Ok(self.read(|db| db.get(key))?.map(|v| v.to_vec()))
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.read(|db| {
            let mut out = Vec::new();
            let iter = match after {
                Some(a) => {
                    let mut start = a.to_vec();
                    start.push(0);
                    db.range(start..)
                }
                None => db.range(prefix.to_vec()..),
            };
            for item in iter {
                let (k, v) = item?;
                if !k.starts_with(prefix) || out.len() >= limit {
                    break;
                }
                out.push((k.to_vec(), v.to_vec()));
            }
            Ok(out)
        })
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
        let mut n = 0;
        for item in engine.db.iter() {
            let (k, v) = item.map_err(io_error)?;
            sink(&k, &v)?;
            n += 1;
        }
        Ok(n)
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(Some(self.engine()?.db.size_on_disk().map_err(io_error)?))
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
            // on a blocking thread, for what sled recovered or was given
            // outside rounds.
            None => {
                let db = engine.db.clone();
                tokio::task::spawn_blocking(move || db.flush())
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("flush task failed: {e}")))?
                    .map(|_| ())
                    .map_err(io_error)
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

    /// The commit delay: a writer alone never waits for it; writers
    /// arriving together get rounds that gathered for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_busy_store_lets_rounds_gather_and_a_lone_writer_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let options = SledOptions {
            commit_delay: Duration::from_millis(50),
            ..SledOptions::default()
        };
        let s = Arc::new(SledStore::open(dir.path(), &options).unwrap());
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
