//! Card events, live: replay an owner's stored events after a cursor, then
//! follow new ones as they are written.
//!
//! Why this loses nothing and repeats nothing: every change that reports an
//! event writes it in the same [`Store::update`] as the change, under the
//! owner's own sequence key ([`records::event_seq_key`]), which that update
//! names and so locks. One owner's events are therefore numbered one after
//! the other, each committed before the next is even decided, with no gaps.
//! A watcher only ever asks the store for what comes after the last
//! sequence number it delivered, and delivers only the contiguous run that
//! follows it (a gap would be an event not yet visible: it waits for it).
//! Live delivery is the same scan, woken by a notification from this
//! process's writes (or a short poll, for other processes sharing a
//! PostgreSQL store), so there is no moment between "replay" and "live" in
//! which an event can slip by.
//!
//! Events are made durable ([`Store::sync`]) before they are sent: a watcher
//! never sees an event that a crash could take back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};

use crate::domain::Owner;
use crate::vault::records::{self, decode, EventRecord};
use crate::vault::{Store, StoreError, VaultError};

/// How often a watcher looks for events even without a notification
/// (written by another process on the same PostgreSQL store).
const POLL_EVERY: Duration = Duration::from_millis(1000);
/// Events read from the store at a time.
const PAGE: usize = 256;
/// How long a watcher waits for a missing sequence number to become
/// visible before it reports the store as inconsistent.
const GAP_PATIENCE: Duration = Duration::from_secs(10);

/// Wakes watchers when this process records events, and ends them when the
/// server shuts down.
pub struct EventHub {
    notify: broadcast::Sender<Arc<str>>,
    /// Live watchers: nothing is published while there are none (and no
    /// listener), so the authorisation path pays nothing for this when
    /// nobody watches.
    watchers: AtomicUsize,
    /// Listeners for the server's lifetime (webhook deliverers).
    listeners: AtomicUsize,
    stopping: watch::Sender<bool>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            notify: broadcast::channel(1024).0,
            watchers: AtomicUsize::new(0),
            listeners: AtomicUsize::new(0),
            stopping: watch::channel(false).0,
        }
    }
}

impl EventHub {
    /// Tells watchers of `owner` that new events are committed and durable.
    pub fn published(&self, owner: &Owner) {
        if self.watchers.load(Ordering::Relaxed) > 0 || self.listeners.load(Ordering::Relaxed) > 0 {
            let _ = self.notify.send(Arc::from(owner.as_str()));
        }
    }

    /// The owners whose events are committed, as they are, for as long as
    /// the server runs (webhook delivery).
    pub fn listen(&self) -> broadcast::Receiver<Arc<str>> {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        self.notify.subscribe()
    }

    /// Ends every watch (the server is shutting down); watchers get
    /// UNAVAILABLE and reconnect with their last cursor.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Live watchers now (for metrics).
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

/// One event as delivered: its sequence number and what it says.
pub type Delivered = Result<(u64, EventRecord), VaultError>;

struct Registered(Arc<EventHub>);

impl Drop for Registered {
    fn drop(&mut self) {
        let now = self.0.watchers.fetch_sub(1, Ordering::Relaxed) - 1;
        if let Some(m) = crate::metrics::get() {
            m.event_watchers.set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }
}

/// Streams `owner`'s events with sequence numbers above `after` into `tx`
/// until the receiver is dropped or the hub stops.
/// The highest sequence number of `owner`'s events that the retention pass
/// deleted (0: none): a reader behind it resumes after it.
pub async fn purged_floor(store: &dyn Store, owner: &Owner) -> Result<u64, StoreError> {
    Ok(store
        .get(&records::event_floor_key(owner))
        .await?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

pub async fn watch(
    store: Arc<dyn Store>,
    hub: Arc<EventHub>,
    owner: Owner,
    after: u64,
    tx: mpsc::Sender<Delivered>,
) {
    // Subscribe before the first scan: whatever is committed after the
    // scan starts wakes the loop again.
    let mut notified = hub.notify.subscribe();
    let now = hub.watchers.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(m) = crate::metrics::get() {
        m.event_watchers.set(i64::try_from(now).unwrap_or(i64::MAX));
    }
    let _registered = Registered(hub.clone());
    let mut stopping = hub.stopping.subscribe();
    let prefix = records::event_prefix(&owner);
    let mut last = after;
    let mut gap_since: Option<Instant> = None;
    loop {
        if *stopping.borrow() {
            let _ = tx
                .send(Err(VaultError::Unavailable(
                    "the server is shutting down: reconnect with the last cursor".into(),
                )))
                .await;
            return;
        }
        // Events the retention pass deleted are not a gap: resume after them.
        match purged_floor(store.as_ref(), &owner).await {
            Ok(floor) if floor > last => {
                tracing::info!(owner = %owner, after = last, floor, "events up to the floor were deleted by retention: resuming after it");
                last = floor;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
        let from = (last > 0).then(|| records::event_key(&owner, last));
        let page = match store.scan(&prefix, from.as_deref(), PAGE).await {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let full = page.len() == PAGE;
        let mut batch = Vec::new();
        let mut gap = false;
        for (key, value) in page {
            let Some(seq) = records::event_seq(&prefix, &key) else {
                let _ = tx
                    .send(Err(VaultError::Internal(
                        "a stored event key is unreadable".into(),
                    )))
                    .await;
                return;
            };
            let expected = last + batch.len() as u64 + 1;
            if seq != expected {
                let waited = gap_since.get_or_insert_with(Instant::now).elapsed();
                if waited < GAP_PATIENCE {
                    gap = true;
                    break;
                }
                tracing::error!(owner = %owner, expected, found = seq, "an owner's events have a gap that did not fill; delivering past it");
            }
            match decode::<EventRecord>("event", &value) {
                Ok(e) => batch.push((seq, e)),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if !gap {
            gap_since = None;
        }
        if !batch.is_empty() {
            // Never show an event that a crash could still take back.
            if let Err(e) = store.sync().await {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            for (seq, event) in batch {
                last = seq;
                if tx.send(Ok((seq, event))).await.is_err() {
                    return;
                }
            }
            if full && !gap {
                continue;
            }
        }
        let wait = if gap {
            Duration::from_millis(20)
        } else {
            POLL_EVERY
        };
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                r = notified.recv() => match r {
                    Ok(o) if *o == *owner.as_str() => break,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = &mut sleep => break,
                () = tx.closed() => return,
                _ = stopping.changed() => break,
            }
        }
    }
}
