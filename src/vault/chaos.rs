//! A [`Store`] wrapper that slows or fails the store beneath it on demand,
//! for fault-injection tests and operator drills: a slow disk (deadlines,
//! load shedding, draining with calls in flight) or a failing one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::vault::store::{Decide, ExportSink, Store, StoreError};

pub struct ChaosStore {
    inner: Arc<dyn Store>,
    /// Added before every update, in milliseconds.
    update_delay_ms: AtomicU64,
    /// When set, every update fails as a full disk would.
    fail_updates: AtomicBool,
    /// Scans of the card records so far: what reads every card (the
    /// metrics' card count, the retention pass, re-encryption) shows here.
    card_scans: AtomicU64,
}

impl ChaosStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<ChaosStore> {
        Arc::new(ChaosStore {
            inner,
            update_delay_ms: AtomicU64::new(0),
            fail_updates: AtomicBool::new(false),
            card_scans: AtomicU64::new(0),
        })
    }

    pub fn set_update_delay(&self, d: Duration) {
        self.update_delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_fail_updates(&self, fail: bool) {
        self.fail_updates.store(fail, Ordering::SeqCst);
    }

    /// How many scans of the card records (pages of them) were made.
    pub fn card_scans(&self) -> u64 {
        self.card_scans.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for ChaosStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        if prefix == crate::vault::records::CARD_PREFIX {
            self.card_scans.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.scan(prefix, after, limit).await
    }

    async fn update(&self, keys: &[Vec<u8>], decide: &mut Decide<'_>) -> Result<(), StoreError> {
        let delay = self.update_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.fail_updates.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "injected write failure (chaos store)".into(),
            ));
        }
        self.inner.update(keys, decide).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.inner.sync().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        self.inner.size_bytes().await
    }

    fn memory(&self) -> Option<crate::vault::store::EngineMemory> {
        self.inner.memory()
    }

    async fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        self.inner.export(sink).await
    }

    fn settled_before(&self) -> Option<std::time::SystemTime> {
        self.inner.settled_before()
    }
}
