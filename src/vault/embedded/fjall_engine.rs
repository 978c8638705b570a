//! fjall 2 under the embedded store: the engine `fjall`, of vaults made
//! before fjall 3 ([`super::fjall3_engine`]) was the default, and of new
//! ones when configured.
//!
//! An LSM tree: a round's batch goes to fjall's journal and memtable, and
//! `persist(SyncData)` makes the journal durable (one write and sync per
//! round, as with sled). Memtables are flushed to sorted segments and
//! compacted by fjall's own threads, off the commit path.
//!
//! fjall does not lock its directory against a second process, so this
//! engine holds an exclusive lock on [`LOCK_FILE`] for as long as it is
//! open: two servers on one data directory would corrupt it.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use fjall::{AbstractTree, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use fs2::FileExt;

use crate::vault::embedded::{export_all, scan_start, take_prefixed, Engine, EngineOptions};
use crate::vault::store::{EngineMemory, Entries, ExportSink, StoreError, Write};

/// Held locked while the engine is open.
pub const LOCK_FILE: &str = "vcn-fjall.lock";
/// fjall's own marker of a keyspace: there means the directory holds a
/// fjall vault.
pub const MARKERS: &[&str] = &["version"];
/// The one partition the vault's keys live in.
const PARTITION: &str = "vault";

/// One open fjall keyspace, its partition, and the directory's lock.
pub struct Fjall {
    keyspace: Keyspace,
    part: PartitionHandle,
    /// The data directory (for its size on disk).
    dir: std::path::PathBuf,
    /// Dropped (unlocked) after the keyspace, which waits for fjall's
    /// threads (fields drop in declaration order).
    _lock: File,
}

/// fjall's block cache holds blocks decoded, at about twice the size it
/// counts them at (heaptrack, BENCHMARKS.md): it is given this share of the
/// configured cache, so the process stays near the setting.
pub(crate) fn block_cache_bytes(options: &EngineOptions) -> u64 {
    (options.cache_capacity / 2).max(8 * 1024 * 1024)
}

pub(crate) fn lock(dir: &Path) -> Result<File, StoreError> {
    crate::vault::embedded::create_data_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    // A reopen in the same process may find the previous engine still
    // closing (its drop waits for fjall's threads): wait for it briefly.
    for _ in 0..60 {
        if file.try_lock_exclusive().is_ok() {
            return Ok(file);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(crate::vault::embedded::in_use(dir))
}

impl Engine for Fjall {
    const NAME: &'static str = "fjall";

    fn open(dir: &Path, options: &EngineOptions) -> Result<Fjall, StoreError> {
        let lock = lock(dir)?;
        let keyspace = fjall::Config::new(dir)
            .cache_size(block_cache_bytes(options))
            .open()
            .map_err(|e| describe_open_error(dir, e))?;
        let part = keyspace
            .open_partition(PARTITION, PartitionCreateOptions::default())
            .map_err(|e| describe_open_error(dir, e))?;
        Ok(Fjall {
            keyspace,
            part,
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.part.get(key).map_err(io_error)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        let start = scan_start(prefix, after);
        take_prefixed(self.part.range(start..), prefix, limit, io_error)
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut batch = self.keyspace.batch();
        for w in writes {
            match w {
                Write::Put(k, v) => batch.insert(&self.part, k, v),
                Write::Delete(k) => batch.remove(&self.part, k),
            }
        }
        batch.commit().map_err(io_error)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.keyspace
            .persist(PersistMode::SyncData)
            .map_err(io_error)
    }

    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        // A snapshot: what later rounds write is not in it.
        export_all(self.part.snapshot().iter(), sink, |e| io_error(e.into()))
    }

    /// The data directory's files (fjall's own figure leaves out its
    /// journals).
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(crate::vault::embedded::directory_size(&self.dir))
    }

    /// fjall 2 keeps every segment's bloom filter whole in memory, outside
    /// the block cache (about 8 bytes a card, BENCHMARKS.md), and its
    /// memtables up to the keyspace's write-buffer limit.
    fn memory(&self) -> Option<EngineMemory> {
        Some(EngineMemory {
            filters: self.part.tree.bloom_filter_size() as u64,
            write_buffers: self.keyspace.write_buffer_size(),
        })
    }
}

fn io_error(e: fjall::Error) -> StoreError {
    // The disk filling up, however deep fjall wrapped it.
    let io = match &e {
        fjall::Error::Io(io) | fjall::Error::Storage(fjall::LsmError::Io(io)) => Some(io),
        _ => None,
    };
    if let Some(full) = crate::vault::embedded::disk_full(io) {
        return full;
    }
    match e {
        fjall::Error::Storage(
            fjall::LsmError::InvalidChecksum(_)
            | fjall::LsmError::Decompress(_)
            | fjall::LsmError::Decode(_)
            | fjall::LsmError::Unrecoverable,
        )
        | fjall::Error::Decode(_)
        | fjall::Error::JournalRecovery(_) => StoreError::Corrupt(e.to_string()),
        fjall::Error::Poisoned => StoreError::Unavailable(crate::vault::embedded::POISONED.into()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn describe_open_error(dir: &Path, e: fjall::Error) -> StoreError {
    crate::vault::embedded::opening(dir, io_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figures behind `vcn_engine_memory_bytes`: writes sit in the
    /// write buffer until a memtable is flushed to a segment, whose bloom
    /// filter then stays in memory (one per segment, sized by its keys).
    #[test]
    fn memory_reports_write_buffers_then_the_filters_of_flushed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Fjall::open(dir.path(), &EngineOptions::default()).unwrap();
        assert_eq!(engine.memory().unwrap().filters, 0, "no segment yet");
        let writes = (0..10_000u32)
            .map(|i| Write::Put(format!("c/card-{i:08}").into_bytes(), vec![7; 100]))
            .collect();
        engine.apply(writes).unwrap();
        let before = engine.memory().unwrap();
        assert!(before.write_buffers > 10_000 * 100, "{before:?}");
        assert_eq!(before.filters, 0, "{before:?}");

        engine.part.rotate_memtable_and_wait().unwrap();
        let after = engine.memory().unwrap();
        // 10 000 keys at 10 bits or more each.
        assert!(after.filters >= 10_000 * 10 / 8, "{after:?}");
        assert!(after.write_buffers < before.write_buffers, "{after:?}");
    }
}
