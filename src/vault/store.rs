//! The storage trait: what the vault needs of an engine, and nothing more.
//!
//! Keys and values are bytes; the vault decides what they mean. The one
//! primitive that matters is [`Store::update`]: read some keys, decide,
//! write all or nothing, serialised with every other update of the same
//! keys, durable before it returns. The authorisation decision runs inside
//! it. The embedded store ([`super::embedded`], on fjall, fjall3 or sled) does it
//! with key locks and group commit; PostgreSQL ([`super::postgres_store`])
//! with row locks in serialisable transactions, shared by several processes.

use async_trait::async_trait;

/// One write of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The engine cannot take writes or reads now (disk full, I/O error,
    /// database gone). Nothing of the failed update was acknowledged.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored bytes are not what the engine expects.
    #[error("storage corrupt: {0}")]
    Corrupt(String),
}

/// What `update` asks of its caller: given the current values of the keys
/// it named (None where absent), the writes to make. It may be called more
/// than once (an engine may retry on a conflict); only the writes of the
/// last call are applied, so it must not have effects of its own beyond
/// recording its outcome.
pub type Decide<'a> = dyn FnMut(&[Option<Vec<u8>>]) -> Vec<Write> + Send + 'a;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The committed value of one key.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` entries whose keys start with `prefix`, in key order,
    /// after `after` (exclusive) when given.
    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError>;

    /// Reads `keys`, calls `decide` with their values and applies the
    /// writes it returns, atomically and in isolation from every other
    /// update naming any of the same keys. Writes may also go to keys not
    /// named (fresh keys no other update can be deciding on). When this
    /// returns Ok, the writes, and everything the decision read, are
    /// durable.
    async fn update(&self, keys: &[Vec<u8>], decide: &mut Decide<'_>) -> Result<(), StoreError>;

    /// Makes everything written so far durable.
    async fn sync(&self) -> Result<(), StoreError>;

    /// Whether the engine can serve now: the health check asks it every
    /// second. An embedded engine is always there.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Hands every entry, in key order, to `sink`, as of one instant: no
    /// update is half in it. Returns how many entries there were.
    async fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        let _ = sink;
        Err(StoreError::Unavailable(
            "this storage engine has no built-in backup: use the database's own tools (pg_dump)"
                .into(),
        ))
    }

    /// How much room the vault takes, in bytes, when the engine can say
    /// (for metrics).
    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// What the engine keeps in memory outside its block cache, when it
    /// can say (for metrics): the part of the process's memory that grows
    /// with the vault instead of staying within `cache_capacity_mib`.
    fn memory(&self) -> Option<EngineMemory> {
        None
    }

    /// A time before which every update this process has begun is visible
    /// to `scan` (or has failed), when the engine can say: the audit sealer
    /// starts its scan of pending entries there rather than at the first
    /// (pending keys begin with their decision's time). None: scan all.
    fn settled_before(&self) -> Option<std::time::SystemTime> {
        None
    }
}

/// An embedded engine's memory outside its block cache, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineMemory {
    /// Bloom filters, held whole in memory for every on-disk segment
    /// (fjall 2): they grow with the number of keys, about 10 bits a key
    /// in the deeper levels.
    pub filters: u64,
    /// Memtables, the active one and those sealed and waiting to be
    /// flushed: bounded by the engine's write-buffer limit, not by size.
    pub write_buffers: u64,
}

/// Entries (key, value) in key order, as a scan returns them.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Receives one exported entry (key, value).
pub type ExportSink<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + Send + 'a;

/// The lock stripes (out of `stripes`) that `keys` fall in, sorted and
/// without repeats: taking them in this order, two updates never deadlock.
pub(crate) fn lock_stripes(keys: &[Vec<u8>], stripes: usize) -> Vec<usize> {
    use std::hash::{Hash, Hasher};
    let mut s: Vec<usize> = keys
        .iter()
        .map(|k| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.hash(&mut h);
            (h.finish() as usize) % stripes
        })
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}
