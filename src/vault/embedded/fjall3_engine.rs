//! fjall 3 under the embedded store: the engine `fjall3`, the default for
//! new vaults.
//!
//! The same LSM design as fjall 2 ([`super::fjall_engine`]), in a new
//! on-disk format, so a vault made on one is never opened by the other
//! (the data directory records its engine). What it changes for the
//! vault: fjall 3 keeps the bloom filters and block indexes of all but its
//! first levels in its block cache, where fjall 2 holds every segment's
//! filter whole in memory, about 8 bytes a card (BENCHMARKS.md, session
//! 9). So the server's memory stays bounded by the cache setting as the
//! vault grows.
//!
//! A round's batch goes to fjall's journal and memtable, and
//! `persist(SyncData)` makes the journal durable (one write and sync per
//! round). Memtables are flushed and compacted by fjall's own threads.
//! fjall 3 locks its directory itself; this engine also holds
//! [`LOCK_FILE`], which lets a reopen in the same process wait for the
//! previous instance to finish closing.

use std::fs::File;
use std::path::Path;

use fjall3::config::PartitioningPolicy;
use fjall3::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

// fjall 3 gets the same share of the configured cache as fjall 2: its
// decoded blocks weigh more than they count too.
use crate::vault::embedded::fjall_engine::{block_cache_bytes, lock};
use crate::vault::embedded::{export_all, scan_start, take_prefixed, Engine, EngineOptions};
use crate::vault::store::{EngineMemory, Entries, ExportSink, StoreError, Write};

/// The one keyspace the vault's keys live in.
const KEYSPACE: &str = "vault";

/// One memtable, before it is sealed and flushed: fjall 2's size, where it
/// was measured (session 8: 4 MiB cost every write 20-30 % more, 64 was no
/// faster), instead of fjall 3's 64 MiB. Memtables are memory the cache
/// setting does not cover. (fjall 3.1 has no working limit on all
/// memtables together: its `max_write_buffer_size` is a deprecated no-op.)
const MEMTABLE: u64 = 16 * 1024 * 1024;

/// Which levels split each table's block index and bloom filter into 4 KiB
/// partitions under a small top-level index that stays in memory: all but
/// L0 (fjall 3's default: L3 and deeper). A point read then brings one
/// partition of each into the cache. Unpartitioned, L1 and L2 tables keep
/// their index and filter whole, hundreds of KiB each, outside memory
/// (only L0's are pinned): a random read over a large vault misses the
/// cache and reads, checksums and searches the whole block, which is what
/// a profile of Detokenize after a 2 M-card fill showed. Measured in
/// turns, not a clear fix: Detokenize's server CPU after such a fill was
/// 1.1-2.5x its empty-vault figure with this, 1.8-2.8x without it
/// (BENCHMARKS.md, session 10).
const PARTITIONED: [bool; 2] = [false, true];

/// One open fjall 3 database, its keyspace, and the directory's lock.
pub struct Fjall3 {
    db: Database,
    keyspace: Keyspace,
    /// The data directory (for its size on disk).
    dir: std::path::PathBuf,
    /// Dropped (unlocked) after the database, which waits for fjall's
    /// threads (fields drop in declaration order).
    _lock: File,
}

impl Engine for Fjall3 {
    const NAME: &'static str = "fjall3";

    fn open(dir: &Path, options: &EngineOptions) -> Result<Fjall3, StoreError> {
        let lock = lock(dir)?;
        let db = Database::builder(dir)
            .cache_size(block_cache_bytes(options))
            .open()
            .map_err(|e| describe_open_error(dir, e))?;
        let keyspace = db
            .keyspace(KEYSPACE, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(MEMTABLE)
                    .index_block_partitioning_policy(PartitioningPolicy::new(PARTITIONED))
                    .filter_block_partitioning_policy(PartitioningPolicy::new(PARTITIONED))
            })
            .map_err(|e| describe_open_error(dir, e))?;
        Ok(Fjall3 {
            db,
            keyspace,
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .keyspace
            .get(key)
            .map_err(io_error)?
            .map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        let start = scan_start(prefix, after);
        take_prefixed(
            self.keyspace.range(start..).map(|g| g.into_inner()),
            prefix,
            limit,
            io_error,
        )
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for w in writes {
            match w {
                Write::Put(k, v) => batch.insert(&self.keyspace, k, v),
                Write::Delete(k) => batch.remove(&self.keyspace, k),
            }
        }
        batch.commit().map_err(io_error)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncData).map_err(io_error)
    }

    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        use fjall3::Readable;
        // A snapshot: what later rounds write is not in it.
        let snapshot = self.db.snapshot();
        export_all(
            snapshot.iter(&self.keyspace).map(|g| g.into_inner()),
            sink,
            io_error,
        )
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(crate::vault::embedded::directory_size(&self.dir))
    }

    /// The filters and indexes past the first levels are in the block
    /// cache, so they are not counted here; the memtables are.
    fn memory(&self) -> Option<EngineMemory> {
        Some(EngineMemory {
            filters: 0,
            write_buffers: self.db.write_buffer_size(),
        })
    }
}

fn io_error(e: fjall3::Error) -> StoreError {
    // The disk filling up, however deep fjall wrapped it.
    let io = match &e {
        fjall3::Error::Io(io) | fjall3::Error::Storage(fjall3::LsmError::Io(io)) => Some(io),
        _ => None,
    };
    if let Some(full) = crate::vault::embedded::disk_full(io) {
        return full;
    }
    match e {
        fjall3::Error::Storage(fjall3::LsmError::Io(_)) | fjall3::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        fjall3::Error::Storage(_)
        | fjall3::Error::JournalRecovery(_)
        | fjall3::Error::Decompress(_)
        | fjall3::Error::InvalidTrailer
        | fjall3::Error::InvalidTag(_)
        | fjall3::Error::Unrecoverable => StoreError::Corrupt(e.to_string()),
        fjall3::Error::Poisoned => StoreError::Unavailable(crate::vault::embedded::POISONED.into()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn describe_open_error(dir: &Path, e: fjall3::Error) -> StoreError {
    if matches!(e, fjall3::Error::Locked) {
        return crate::vault::embedded::in_use(dir);
    }
    crate::vault::embedded::opening(dir, io_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::embedded::fjall_engine::LOCK_FILE;

    /// Writes land in the write buffer; the figure the gauge shows for
    /// fjall 3 has no filters (they are in its cache).
    #[test]
    fn memory_reports_write_buffers_and_no_pinned_filters() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Fjall3::open(dir.path(), &EngineOptions::default()).unwrap();
        let writes = (0..10_000u32)
            .map(|i| Write::Put(format!("c/card-{i:08}").into_bytes(), vec![7; 100]))
            .collect();
        engine.apply(writes).unwrap();
        let m = engine.memory().unwrap();
        assert!(m.write_buffers > 10_000 * 100, "{m:?}");
        assert_eq!(m.filters, 0);
        assert!(dir.path().join(LOCK_FILE).exists());
    }
}
