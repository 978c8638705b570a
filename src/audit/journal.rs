//! The pending journal: where audit entries written on their own (a read
//! such as Detokenize, a refusal, a key operation of the running server)
//! wait, durable, until the sealer chains them into the audit log.
//!
//! Files: `<dir>/<prefix>.<generation>.jsonl`, mode 0600, one pending
//! [`Entry`] per line (no sequence, no MAC yet; masked numbers only, like
//! every entry), and `<prefix>.lock`, held while the journal is open so two
//! processes never write one journal. A generation is preallocated (zeros)
//! when it is created, so a round's sync commits no metadata; the zeros
//! past the last round are never read, and are cut off at a clean stop or
//! at the next start.
//!
//! Group commit, as the sled committer does it: a caller queues its lines
//! and waits (a tokio watch channel) for the round they land in; a
//! dedicated thread takes everything queued since its last round, writes
//! it with one `write` and one `sync_data`, and wakes that round's waiters
//! at once. No lock is held across the sync and the sync never runs on a
//! tokio worker. Before writing, the thread checks that the filesystem
//! keeps its margin free (the vault's own rule): a full disk refuses the
//! round ("full") instead of meeting ENOSPC half way. A write or sync that
//! fails fails the whole round with the reason; the failed round is cut
//! off the file and writing goes on in a new generation (after a failed
//! sync the file cannot be trusted any more).
//!
//! Only what was acknowledged is sealed: the sealer reads a generation
//! being written up to the length of its last durable round. A crash in
//! the middle of a round can leave a torn tail, never acknowledged: at open
//! every generation not yet sealed is cut back to its last complete entry.
//! Each process writes a generation of its own, after every existing one.
//!
//! Rotation: past `rotate_bytes` the writer starts the next generation
//! (created, and its directory synced, before anything is written in it).
//! The sealer records how far it sealed (generation, offset) in the head it
//! keeps in the store; once that head has moved past a generation (only
//! possible once a newer one exists), the generation is deleted. A
//! generation before the recorded head found at open is deleted too (a
//! crash between the head update and the deletion).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use super::{AuditError, Entry};
use crate::vault::gather::Gather;

/// A generation is closed and the next one started past this size.
pub const DEFAULT_ROTATE_BYTES: u64 = 1024 * 1024;
/// What one read of the sealer takes from a generation at most (it reads
/// more when a single line is longer).
const READ_CHUNK: u64 = 256 * 1024;

/// Where the journal is, and how it behaves.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// File names start with this (`audit-pending`).
    pub prefix: String,
    pub rotate_bytes: u64,
    /// Free space the filesystem must keep for a round to be written.
    pub margin: u64,
    /// How long a round may gather appends while they arrive together
    /// (the vault's rule: [`crate::vault::gather`]).
    pub commit_delay: Duration,
}

impl JournalConfig {
    /// The journal `<dir>/<prefix>.<generation>.jsonl`, rotated at
    /// [`DEFAULT_ROTATE_BYTES`], keeping the vault's write margin free.
    pub fn new(dir: impl Into<PathBuf>, prefix: impl Into<String>) -> JournalConfig {
        JournalConfig {
            dir: dir.into(),
            prefix: prefix.into(),
            rotate_bytes: DEFAULT_ROTATE_BYTES,
            margin: crate::vault::embedded::WRITE_MARGIN,
            commit_delay: crate::vault::gather::DEFAULT_COMMIT_DELAY,
        }
    }

    /// The file of generation `generation`.
    pub fn file(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{}.{generation}.jsonl", self.prefix))
    }

    fn lock_file(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.prefix))
    }

    /// The generations on disk, in order.
    pub fn generations(&self) -> std::io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir)? {
            let name = item?.file_name();
            let generation = name
                .to_str()
                .and_then(|n| n.strip_prefix(self.prefix.as_str()))
                .and_then(|n| n.strip_prefix('.'))
                .and_then(|n| n.strip_suffix(".jsonl"))
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u64>().ok());
            out.extend(generation);
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// A place in the journal: everything before `offset` in generation
/// `generation`, and every generation before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub generation: u64,
    pub offset: u64,
}

/// A generation's readable length: the end of its last durable round.
/// Closed: no more is written to it.
#[derive(Debug, Clone, Copy)]
struct Generation {
    len: u64,
    closed: bool,
}

/// Why a round failed (given to each of its waiters).
#[derive(Debug, Clone)]
struct Failure {
    path: PathBuf,
    reason: String,
}

impl From<Failure> for AuditError {
    fn from(f: Failure) -> AuditError {
        AuditError::Journal {
            path: f.path,
            reason: f.reason,
        }
    }
}

/// A round's outcome, once written: None while pending.
type Outcome = Option<Result<(), Failure>>;

/// Lines waiting for the writer thread.
struct Queue {
    /// The round being collected.
    buf: Vec<u8>,
    /// Appends in it.
    appends: u64,
    done: watch::Sender<Outcome>,
    /// The writer is asleep waiting for lines.
    idle: bool,
    stop: bool,
}

struct Shared {
    config: JournalConfig,
    /// Held (flock) while open.
    _lock: fs::File,
    queue: Mutex<Queue>,
    wake: Condvar,
    generations: Mutex<BTreeMap<u64, Generation>>,
    /// Fault injection: every round fails.
    fail_writes: AtomicBool,
    /// Rounds written, and how many of them gathered for the commit delay.
    rounds: AtomicU64,
    gathered: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these; every change is a single
    // assignment or insert, so the state is consistent regardless.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The open journal: appends (any task), reads and deletions (the sealer).
pub struct Journal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Journal({})",
            self.shared
                .config
                .dir
                .join(&self.shared.config.prefix)
                .display()
        )
    }
}

fn io_reason(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::StorageFull {
        "the filesystem is full (no space left on device): free space or grow it".into()
    } else {
        e.to_string()
    }
}

impl Journal {
    /// Opens the journal of `config`, sealed up to `sealed` (what the head
    /// in the store records): deletes the generations before it, cuts the
    /// torn tail a crash left off the others, and starts a generation of
    /// this process's own after all of them.
    pub fn open(config: JournalConfig, sealed: Pos) -> Result<Journal, AuditError> {
        let err = |path: &Path, e: std::io::Error| AuditError::Journal {
            path: path.to_path_buf(),
            reason: io_reason(&e),
        };
        fs::create_dir_all(&config.dir).map_err(|e| err(&config.dir, e))?;
        let lock_file = acquire_lock(&config)?;
        let mut generations = BTreeMap::new();
        for g in config.generations().map_err(|e| err(&config.dir, e))? {
            let path = config.file(g);
            if g < sealed.generation {
                // Sealed, and the head saying so is durable.
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "a sealed audit journal generation could not be deleted; retrying later");
                        generations.insert(
                            g,
                            Generation {
                                len: 0,
                                closed: true,
                            },
                        );
                    }
                }
                continue;
            }
            let len = repair(&path).map_err(|e| err(&path, e))?;
            generations.insert(g, Generation { len, closed: true });
        }
        let first = generations
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(sealed.generation)
            + 1;
        let (generation, file) =
            create_generation(&config, first).map_err(|e| err(&config.file(first), e))?;
        generations.insert(
            generation,
            Generation {
                len: 0,
                closed: false,
            },
        );
        let shared = Arc::new(Shared {
            config,
            _lock: lock_file,
            queue: Mutex::new(Queue {
                buf: Vec::new(),
                appends: 0,
                done: watch::channel(None).0,
                idle: false,
                stop: false,
            }),
            wake: Condvar::new(),
            generations: Mutex::new(generations),
            fail_writes: AtomicBool::new(false),
            rounds: AtomicU64::new(0),
            gathered: AtomicU64::new(0),
        });
        let writer = Writer {
            shared: shared.clone(),
            generation,
            file: Some(file),
            len: 0,
        };
        let handle = std::thread::Builder::new()
            .name("vcn-audit-journal".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::Journal {
                path: shared.config.dir.clone(),
                reason: format!("cannot start the journal's writer thread: {e}"),
            })?;
        Ok(Journal {
            shared,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Appends `lines` (complete JSON lines) and returns once they are
    /// durable, or with the reason they are not.
    pub async fn append(&self, lines: Vec<u8>) -> Result<(), AuditError> {
        let mut rx = {
            let mut q = lock(&self.shared.queue);
            if q.stop {
                return Err(self.stopped());
            }
            if q.buf.is_empty() {
                q.buf = lines;
            } else {
                q.buf.extend_from_slice(&lines);
            }
            q.appends += 1;
            let rx = q.done.subscribe();
            let wake = q.idle;
            drop(q);
            if wake {
                self.shared.wake.notify_one();
            }
            rx
        };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| self.stopped())?
            .clone();
        match outcome {
            Some(Err(f)) => Err(f.into()),
            _ => Ok(()),
        }
    }

    fn stopped(&self) -> AuditError {
        AuditError::Journal {
            path: self.shared.config.dir.clone(),
            reason: "the journal's writer has stopped".into(),
        }
    }

    /// Fault injection (tests, drills): while set, every round fails.
    pub fn set_fail_writes(&self, fail: bool) {
        self.shared.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Rounds written so far, and how many of them gathered for the
    /// commit delay first.
    pub fn rounds(&self) -> (u64, u64) {
        (
            self.shared.rounds.load(Ordering::Relaxed),
            self.shared.gathered.load(Ordering::Relaxed),
        )
    }

    pub fn config(&self) -> &JournalConfig {
        &self.shared.config
    }

    /// The durable entries after `from`, at most `limit`, each with the
    /// place just after it, and where reading stopped (past closed
    /// generations read to their end, and past unreadable lines).
    pub fn read(&self, from: Pos, limit: usize) -> Result<(Vec<(Entry, Pos)>, Pos), AuditError> {
        let mut pos = from;
        let mut out = Vec::new();
        loop {
            let (here, next) = {
                let g = lock(&self.shared.generations);
                (
                    g.get(&pos.generation).copied(),
                    g.range(pos.generation + 1..).next().map(|(n, _)| *n),
                )
            };
            let Some(here) = here else {
                // Not on disk (deleted once sealed, or lost): the next one.
                match next {
                    Some(n) => {
                        pos = Pos {
                            generation: n,
                            offset: 0,
                        };
                        continue;
                    }
                    None => break,
                }
            };
            let path = self.shared.config.file(pos.generation);
            while pos.offset < here.len && out.len() < limit {
                let (bytes, whole) = self.read_lines(&path, pos.offset, here.len)?;
                let mut start = 0;
                while out.len() < limit {
                    let Some(n) = bytes[start..].iter().position(|&b| b == b'\n') else {
                        break;
                    };
                    let end = start + n + 1;
                    let after = Pos {
                        generation: pos.generation,
                        offset: pos.offset + end as u64,
                    };
                    match serde_json::from_slice::<Entry>(&bytes[start..end - 1]) {
                        Ok(e) => out.push((e, after)),
                        Err(e) => {
                            tracing::error!(path = %path.display(), offset = pos.offset + start as u64, error = %e, "an unreadable line of the audit journal was skipped");
                        }
                    }
                    start = end;
                }
                if start == 0 {
                    // No complete line left. In a closed generation that is
                    // a torn end (cut at open, so only if damaged since):
                    // nothing can follow it. In the one being written, the
                    // durable length always ends a line: the file was cut.
                    if whole && here.closed {
                        tracing::error!(path = %path.display(), offset = pos.offset, "the audit journal ends in an incomplete line: skipped");
                        pos.offset = here.len;
                    }
                    break;
                }
                pos.offset += start as u64;
            }
            if out.len() < limit && pos.offset >= here.len && here.closed {
                if let Some(n) = next {
                    pos = Pos {
                        generation: n,
                        offset: 0,
                    };
                    continue;
                }
            }
            break;
        }
        Ok((out, pos))
    }

    /// Bytes of `path` from `from` on, up to `len`: at least one complete
    /// line when there is one; and whether they reach the end.
    fn read_lines(&self, path: &Path, from: u64, len: u64) -> Result<(Vec<u8>, bool), AuditError> {
        let mut chunk = READ_CHUNK;
        loop {
            let end = len.min(from.saturating_add(chunk));
            let bytes = read_range(path, from, end).map_err(|e| AuditError::Journal {
                path: path.to_path_buf(),
                reason: io_reason(&e),
            })?;
            let whole = end >= len || (bytes.len() as u64) < end - from;
            if whole || bytes.contains(&b'\n') {
                return Ok((bytes, whole));
            }
            chunk = chunk.saturating_mul(2);
        }
    }

    /// Deletes the generations before `generation`: the caller has made
    /// durable a head past them.
    pub fn remove_before(&self, generation: u64) {
        let old: Vec<u64> = lock(&self.shared.generations)
            .range(..generation)
            .filter(|(_, g)| g.closed)
            .map(|(n, _)| *n)
            .collect();
        for g in old {
            let path = self.shared.config.file(g);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %path.display(), error = %e, "a sealed audit journal generation could not be deleted; retrying later");
                }
                _ => {
                    lock(&self.shared.generations).remove(&g);
                }
            }
        }
    }
}

impl Drop for Journal {
    /// Writes what is queued, then stops the writer.
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_all();
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
    }
}

/// Takes the journal's lock, waiting briefly for a previous holder in this
/// process to let go (a restart in the same process).
fn acquire_lock(config: &JournalConfig) -> Result<fs::File, AuditError> {
    use fs2::FileExt;
    let path = config.lock_file();
    let err = |reason: String| AuditError::Journal {
        path: path.clone(),
        reason,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| err(io_reason(&e)))?;
    for _ in 0..60 {
        match file.try_lock_exclusive() {
            Ok(()) => return Ok(file),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(err(format!("cannot lock: {e}"))),
        }
    }
    Err(err(
        "in use by another process (is another `vcn serve` running on this data directory or audit log?)"
            .into(),
    ))
}

/// Cuts a generation back to the end of its last complete entry (what
/// follows is a round a crash interrupted, never acknowledged); returns
/// its length.
fn repair(path: &Path) -> std::io::Result<u64> {
    let data = fs::read(path)?;
    let mut valid = 0;
    let mut start = 0;
    while let Some(n) = data[start..].iter().position(|&b| b == b'\n') {
        let end = start + n + 1;
        if serde_json::from_slice::<Entry>(&data[start..end - 1]).is_ok() {
            valid = end;
        }
        start = end;
    }
    if valid < data.len() {
        if data[valid..].iter().all(|&b| b == 0) {
            // The unused, preallocated rest of a generation.
        } else {
            tracing::warn!(path = %path.display(), cut = data.len() - valid, "the audit journal ends in a torn write (a crash during a round never acknowledged): cut off");
        }
        let f = fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(valid as u64)?;
        f.sync_all()?;
    }
    Ok(valid as u64)
}

/// Creates generation `generation` (or the first free one after it), and
/// makes its name durable.
///
/// The file is filled with `rotate_bytes` of zeros first, made durable:
/// rounds then overwrite blocks already allocated and written, so their
/// `sync_data` has no metadata to commit (an append grows the file, and on
/// ext4 every such sync is a journal commit too: about 40 % more per sync
/// on the machine it was measured on). Without the room for it, the file
/// simply grows. Readers never see the zeros: they read up to the end of
/// the last durable round, and a start cuts them off.
fn create_generation(
    config: &JournalConfig,
    mut generation: u64,
) -> std::io::Result<(u64, fs::File)> {
    loop {
        let path = config.file(generation);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                if let Err(e) = preallocate(&f, config.rotate_bytes) {
                    tracing::debug!(path = %path.display(), error = %e, "audit journal generation not preallocated");
                    f.set_len(0)?;
                }
                fs::File::open(&config.dir)?.sync_all()?;
                return Ok((generation, f));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => generation += 1,
            Err(e) => return Err(e),
        }
    }
}

fn preallocate(f: &fs::File, bytes: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < bytes {
        let n = zeros
            .len()
            .min(usize::try_from(bytes - at).unwrap_or(zeros.len()));
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_all()
}

fn read_range(path: &Path, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
    let mut f = fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut out = Vec::with_capacity(usize::try_from(to.saturating_sub(from)).unwrap_or(0));
    f.take(to.saturating_sub(from)).read_to_end(&mut out)?;
    Ok(out)
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    generation: u64,
    /// None after a failure: the next round starts a new generation.
    file: Option<fs::File>,
    /// The end of the last durable round in `generation`.
    len: u64,
}

impl Writer {
    fn run(mut self) {
        let mut gather = Gather::new(self.shared.config.commit_delay);
        loop {
            let (buf, done) = {
                let mut q = lock(&self.shared.queue);
                while q.buf.is_empty() && !q.stop {
                    q.idle = true;
                    q = self.shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.idle = false;
                if let Some(wait) = gather.wait_before_taking(q.appends, q.stop) {
                    // Appends keep queueing meanwhile without waking us.
                    drop(q);
                    std::thread::sleep(wait);
                    q = lock(&self.shared.queue);
                    self.shared.gathered.fetch_add(1, Ordering::Relaxed);
                }
                if q.buf.is_empty() {
                    // Stopping, and nothing left to write: the unused
                    // preallocated rest goes.
                    if let Some(f) = &self.file {
                        let _ = f.set_len(self.len);
                    }
                    return;
                }
                self.shared.rounds.fetch_add(1, Ordering::Relaxed);
                gather.taken(std::mem::take(&mut q.appends));
                (
                    std::mem::take(&mut q.buf),
                    std::mem::replace(&mut q.done, watch::channel(None).0),
                )
            };
            let outcome = self.write_round(&buf);
            if let Err(f) = &outcome {
                tracing::error!(path = %f.path.display(), reason = %f.reason, "audit journal round failed: its operations fail");
            }
            done.send_replace(Some(outcome));
        }
    }

    fn failure(&self, reason: String) -> Failure {
        Failure {
            path: self.shared.config.file(self.generation),
            reason,
        }
    }

    fn write_round(&mut self, buf: &[u8]) -> Result<(), Failure> {
        let shared = self.shared.clone();
        let config = &shared.config;
        if shared.fail_writes.load(Ordering::SeqCst) {
            return Err(self.failure("injected write failure (chaos)".into()));
        }
        if let Ok(free) = fs2::available_space(&config.dir) {
            if free < config.margin.saturating_add(buf.len() as u64) {
                return Err(self.failure(format!(
                    "the filesystem is full ({free} bytes free, {} are kept free): \
                     entries are refused until there is room again; free space or grow it",
                    config.margin
                )));
            }
        }
        if self.file.is_none() {
            self.rotate().map_err(|e| self.failure(io_reason(&e)))?;
        }
        let written = match self.file.as_mut() {
            Some(f) => {
                use std::os::unix::fs::FileExt;
                f.write_all_at(buf, self.len).and_then(|()| f.sync_data())
            }
            None => Err(std::io::Error::other("no journal file open")),
        };
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                if let Some(g) = lock(&self.shared.generations).get_mut(&self.generation) {
                    g.len = self.len;
                }
                if self.len >= config.rotate_bytes {
                    if let Err(e) = self.rotate() {
                        tracing::warn!(error = %e, "could not start the next audit journal generation; going on with this one");
                    }
                }
                Ok(())
            }
            Err(e) => {
                let failure = self.failure(io_reason(&e));
                self.abandon();
                Err(failure)
            }
        }
    }

    /// Gives up the current generation after a failed round: cuts the
    /// round off (so a later start does not find it) and closes it at the
    /// end of the last durable round, which is all the sealer reads of it.
    fn abandon(&mut self) {
        if let Some(f) = self.file.take() {
            if let Err(e) = f.set_len(self.len).and_then(|()| f.sync_data()) {
                tracing::warn!(error = %e, "could not cut a failed round off the audit journal (it is not sealed by this process)");
            }
        }
        if let Some(g) = lock(&self.shared.generations).get_mut(&self.generation) {
            g.len = self.len;
            g.closed = true;
        }
    }

    /// Closes the current generation and starts the next.
    fn rotate(&mut self) -> std::io::Result<()> {
        let (generation, file) = create_generation(&self.shared.config, self.generation + 1)?;
        if let Some(old) = &self.file {
            // Its unused preallocated rest (cut at the next start if this
            // does not reach the disk).
            let _ = old.set_len(self.len);
        }
        {
            let mut g = lock(&self.shared.generations);
            if let Some(old) = g.get_mut(&self.generation) {
                old.len = self.len;
                old.closed = true;
            }
            g.insert(
                generation,
                Generation {
                    len: 0,
                    closed: false,
                },
            );
        }
        self.generation = generation;
        self.file = Some(file);
        self.len = 0;
        Ok(())
    }
}
