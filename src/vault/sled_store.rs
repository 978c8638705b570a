//! The embedded engine: one sled tree, striped key locks, group commit.
//!
//! An update locks the stripes of its keys (in a fixed order, so two
//! updates never deadlock), reads, decides and applies its writes as one
//! sled batch (atomic), then releases the locks before it waits for
//! durability. Durability is group commit: a dedicated flusher thread calls
//! `Db::flush` (one fsync of sled's log) for every write made before it
//! started, and wakes all their waiters at once. No lock is held across the
//! sync and the sync never runs on a tokio worker. (sled 0.34's own
//! `flush_async` was seen to hang under tokio, hence the thread.)
//!
//! Why releasing the locks before the sync is safe: a later update that
//! read this one's writes waits for a flush that starts after it, and
//! sled's flush makes everything written before it durable. So nobody is
//! ever acknowledged on the strength of a write that could still be lost.
//!
//! A write error (a full disk, most often) leaves sled refusing every later
//! write, even once space returns. So the store marks itself broken: writes
//! are refused at once with a message saying why, reads keep working from
//! the open database, and once the filesystem has room again the next
//! write reopens sled, which recovers to its last durable state (never
//! acknowledged writes are gone, as they were never acknowledged).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::vault::store::{Decide, ExportSink, Store, StoreError, Write};

const STRIPES: usize = 4096;

/// Free space the data directory's filesystem needs before a broken store
/// tries to reopen (sled writes its log in segments of this order).
const REOPEN_FREE_BYTES: u64 = 4 * 1024 * 1024;
/// A file of reserved space beside the database. When the disk fills, it is
/// deleted, so sled has room for the small writes its reads need (a page
/// consolidation) and for reopening: reads keep working while client
/// writes are refused. It is made again once space returns.
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
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_capacity: 256 * 1024 * 1024,
        }
    }
}

/// How far the flusher has got, shared with the waiters.
#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Every write with a ticket up to this is durable.
    upto: u64,
    /// The last failed flush: the highest ticket it covered, and why.
    failed: Option<(u64, String)>,
}

/// State shared between writers and the flusher thread.
struct Commit {
    /// Tickets handed out: each write takes the next one after applying.
    written: AtomicU64,
    /// Wakes the flusher; the bool asks it to stop.
    wake: Mutex<bool>,
    cond: Condvar,
    flushed: watch::Sender<Flushed>,
}

/// One open sled database and its flusher thread.
struct Engine {
    db: sled::Db,
    dir: PathBuf,
    /// The last checkpoint; the flusher advances it.
    epoch: Arc<AtomicU64>,
    commit: Arc<Commit>,
    flusher: Option<JoinHandle<()>>,
}

impl Engine {
    fn open(dir: &Path, options: &SledOptions) -> Result<Engine, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_capacity)
            .mode(sled::Mode::HighThroughput);
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
        let (tx, _) = watch::channel(Flushed::default());
        let commit = Arc::new(Commit {
            written: AtomicU64::new(0),
            wake: Mutex::new(false),
            cond: Condvar::new(),
            flushed: tx,
        });
        let flusher = {
            let (db, commit, dir, epoch) =
                (db.clone(), commit.clone(), dir.to_path_buf(), epoch.clone());
            std::thread::Builder::new()
                .name("vcn-flusher".into())
                .spawn(move || flush_loop(&db, &commit, &dir, &epoch))
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start the flusher thread: {e}"))
                })?
        };
        Ok(Engine {
            db,
            dir: dir.to_path_buf(),
            epoch,
            commit,
            flusher: Some(flusher),
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        {
            let mut stop = self.commit.wake.lock().unwrap_or_else(|e| e.into_inner());
            *stop = true;
            self.commit.cond.notify_one();
        }
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
        let mut epoch = self.epoch.load(Ordering::SeqCst);
        if let Err(e) = checkpoint(&self.db, &self.dir, &mut epoch) {
            tracing::warn!(error = %e, "no checkpoint at close (the vault is consistent as of the last one)");
        }
    }
}

pub struct SledStore {
    /// The data directory, to reopen from.
    dir: PathBuf,
    options: SledOptions,
    /// The open database; replaced when a broken store reopens (None only
    /// if that reopen failed).
    engine: RwLock<Option<Arc<Engine>>>,
    /// Striped locks that serialise updates touching the same keys.
    locks: Box<[Mutex<()>]>,
    /// Every update applies under a shared hold of this; an export holds it
    /// alone, so it sees no update half-applied.
    barrier: RwLock<()>,
    /// Set by a write error: writes are refused until a reopen succeeds.
    broken: AtomicBool,
    /// Why the store is broken, for the refusal message.
    broken_reason: Mutex<String>,
    /// When a reopen was last tried.
    last_reopen: Mutex<Option<Instant>>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, options: &SledOptions) -> Result<SledStore, StoreError> {
        let engine = Engine::open(dir, options)?;
        ensure_reserve(dir);
        Ok(SledStore {
            dir: dir.to_path_buf(),
            options: options.clone(),
            engine: RwLock::new(Some(Arc::new(engine))),
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            barrier: RwLock::new(()),
            broken: AtomicBool::new(false),
            broken_reason: Mutex::new(String::new()),
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

    /// When broken: refuses the write, unless the filesystem has room again
    /// and a reopen (at most once a second) succeeds.
    fn writable(&self) -> Result<(), StoreError> {
        if !self.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        let refuse = || self.refusal();
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return Err(refuse());
            }
            *last = Some(Instant::now());
        }
        let free = fs2::available_space(&self.dir).unwrap_or(0);
        if free < REOPEN_FREE_BYTES + RESERVE_BYTES.min(free / 8) {
            return Err(refuse());
        }
        match self.reopen() {
            Ok(()) => {
                ensure_reserve(&self.dir);
                self.broken.store(false, Ordering::SeqCst);
                tracing::info!(dir = %self.dir.display(), free, "vault reopened: taking writes again");
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
        drop(slot.take());
        let engine = Engine::open(&self.dir, &self.options).map_err(|e| match e {
            StoreError::Unavailable(m) if m.contains("in use") => StoreError::Unavailable(
                "the vault is reopening after a write error (calls still in flight hold it): retry in a moment".into(),
            ),
            other => other,
        })?;
        *slot = Some(Arc::new(engine));
        Ok(())
    }

    /// A read, once more on a reopened engine when it failed on a broken
    /// one: after a write error sled may fail a read that would have had to
    /// tidy a page (a write), while a freshly opened engine reads from disk.
    fn read<T>(&self, op: impl Fn(&sled::Db) -> sled::Result<T>) -> Result<T, StoreError> {
        match op(&self.engine()?.db) {
            Ok(v) => Ok(v),
            Err(e) => match io_error(e) {
                StoreError::Unavailable(reason) => {
                    self.mark_broken(&StoreError::Unavailable(reason));
                    tracing::warn!("a read failed on the broken vault: reopening it for reads");
                    self.reopen()?;
                    op(&self.engine()?.db).map_err(io_error)
                }
                corrupt => Err(corrupt),
            },
        }
    }

    /// The synchronous part of an update: lock, read, decide, apply, take
    /// a ticket. Returns the engine and the ticket to wait for.
    fn apply(
        &self,
        keys: &[Vec<u8>],
        decide: &mut Decide<'_>,
    ) -> Result<(Arc<Engine>, u64), StoreError> {
        self.writable()?;
        let engine = self.engine()?;
        let _shared = self.barrier.read().unwrap_or_else(|e| e.into_inner());
        let _guards: Vec<MutexGuard<'_, ()>> = crate::vault::store::lock_stripes(keys, STRIPES)
            .into_iter()
            // A poisoned stripe only means a decision panicked; the lock
            // still orders updates, so take it.
            .map(|i| self.locks[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut values = Vec::with_capacity(keys.len());
        for k in keys {
            let value = engine.db.get(k).map_err(|e| self.broke(io_error(e)))?;
            values.push(value.map(|v| v.to_vec()));
        }
        let writes = decide(&values);
        if writes.is_empty() {
            // Nothing to write, but what was read may itself still be in
            // flight to disk: wait for everything written so far.
            let ticket = engine.commit.written.load(Ordering::SeqCst);
            return Ok((engine, ticket));
        }
        let mut batch = sled::Batch::default();
        for w in writes {
            match w {
                Write::Put(k, v) => batch.insert(k, v),
                Write::Delete(k) => batch.remove(k),
            }
        }
        if let Err(e) = engine.db.apply_batch(batch) {
            return Err(self.broke(io_error(e)));
        }
        let ticket = engine.commit.written.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((engine, ticket))
    }

    async fn wait_durable(&self, engine: &Engine, ticket: u64) -> Result<(), StoreError> {
        let commit = &engine.commit;
        if commit.flushed.borrow().upto >= ticket {
            return Ok(());
        }
        {
            let _wake = commit.wake.lock().unwrap_or_else(|e| e.into_inner());
            commit.cond.notify_one();
        }
        let mut rx = commit.flushed.subscribe();
        let state = rx
            .wait_for(|f| f.upto >= ticket || f.failed.as_ref().is_some_and(|(t, _)| *t >= ticket))
            .await
            .map_err(|_| StoreError::Unavailable("the flusher thread has stopped".into()))?
            .clone();
        if state.upto >= ticket {
            return Ok(());
        }
        let reason = state.failed.map(|(_, e)| e).unwrap_or_default();
        Err(self.broke(StoreError::Unavailable(format!(
            "could not make the write durable: {reason}"
        ))))
    }
}

fn flush_loop(db: &sled::Db, commit: &Commit, dir: &Path, epoch: &AtomicU64) {
    let mut done = 0u64;
    let mut last_checkpoint = Instant::now();
    loop {
        {
            let mut stop = commit.wake.lock().unwrap_or_else(|e| e.into_inner());
            while !*stop && commit.written.load(Ordering::SeqCst) <= done {
                stop = commit.cond.wait(stop).unwrap_or_else(|e| e.into_inner());
            }
            if *stop && commit.written.load(Ordering::SeqCst) <= done {
                return;
            }
        }
        let target = commit.written.load(Ordering::SeqCst);
        let started = Instant::now();
        let flushed = db.flush();
        if let Some(m) = crate::metrics::get() {
            m.flush_duration.observe(started.elapsed().as_secs_f64());
        }
        match flushed {
            Ok(_) => {
                done = target;
                commit.flushed.send_modify(|f| f.upto = target);
                if last_checkpoint.elapsed() >= EPOCH_EVERY {
                    last_checkpoint = Instant::now();
                    let mut e = epoch.load(Ordering::SeqCst);
                    match checkpoint(db, dir, &mut e) {
                        Ok(()) => epoch.store(e, Ordering::SeqCst),
                        Err(err) => tracing::error!(error = %err, "writing a checkpoint failed"),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "flushing the vault to disk failed");
                commit
                    .flushed
                    .send_modify(|f| f.failed = Some((target, io_error(e).to_string())));
                // Do not spin on a failing disk; the next write retries.
                std::thread::sleep(Duration::from_millis(50));
                done = target;
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
        let (engine, ticket) = self.apply(keys, decide)?;
        self.wait_durable(&engine, ticket).await
    }

    async fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        let engine = self.engine()?;
        // Writes wait while this copies; a copy of 1 M cards takes seconds.
        let _alone = self.barrier.write().unwrap_or_else(|e| e.into_inner());
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
        let ticket = engine.commit.written.load(Ordering::SeqCst);
        if ticket == 0 {
            return engine.db.flush().map(|_| ()).map_err(io_error);
        }
        self.wait_durable(&engine, ticket).await
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
        assert!(
            s.engine().unwrap().commit.flushed.borrow().upto >= 400,
            "every write was flushed before its reply"
        );
    }
}
