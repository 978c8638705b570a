//! sled 0.34 under the embedded store: the engine of vaults made before
//! fjall became the default, still opened as sled.

use std::path::Path;
use std::time::Duration;

use crate::vault::embedded::{export_all, scan_start, take_prefixed, Engine, EngineOptions};
use crate::vault::store::{Entries, ExportSink, StoreError, Write};

/// One open sled database.
pub struct Sled {
    db: ::sled::Db,
}

/// Files sled keeps in a data directory: one of them there means the
/// directory holds a sled vault.
pub const MARKERS: &[&str] = &["db", "conf"];

impl Engine for Sled {
    const NAME: &'static str = "sled";

    fn open(dir: &Path, options: &EngineOptions) -> Result<Sled, StoreError> {
        let config = ::sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_capacity)
            .mode(::sled::Mode::HighThroughput)
            // The committer flushes after every round; sled's own periodic
            // flush would only hold its lock against the committer's batch.
            .flush_every_ms(None);
        // sled releases its file lock when its last background task ends,
        // which can be a moment after the previous handle was dropped (a
        // restart in the same process): wait for it briefly.
        let mut tries = 0;
        loop {
            match config.open() {
                Ok(db) => return Ok(Sled { db }),
                Err(e) if is_lock_error(&e) && tries < 60 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(describe_open_error(dir, e)),
            }
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(io_error)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        let start = scan_start(prefix, after);
        take_prefixed(self.db.range(start..), prefix, limit, io_error)
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut batch = ::sled::Batch::default();
        for w in writes {
            match w {
                Write::Put(k, v) => batch.insert(k, v),
                Write::Delete(k) => batch.remove(k),
            }
        }
        self.db.apply_batch(batch).map_err(io_error)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(io_error)
    }

    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        export_all(self.db.iter(), sink, io_error)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(io_error)
    }
}

fn io_error(e: ::sled::Error) -> StoreError {
    match e {
        ::sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        ::sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            StoreError::Unavailable(crate::vault::embedded::DISK_FULL.into())
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn is_lock_error(e: &::sled::Error) -> bool {
    matches!(e, ::sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn describe_open_error(dir: &Path, e: ::sled::Error) -> StoreError {
    let msg = e.to_string();
    if is_lock_error(&e) {
        return crate::vault::embedded::in_use(dir);
    }
    match e {
        ::sled::Error::Corruption { .. } => StoreError::Corrupt(format!(
            "the vault in {} is corrupt ({msg}); restore it from a backup",
            dir.display()
        )),
        _ => StoreError::Unavailable(format!("cannot open the vault in {}: {msg}", dir.display())),
    }
}
