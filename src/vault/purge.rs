//! Retention: ended cards stay detokenisable for `retention`, then go; their
//! numbers stay reserved for `quarantine` more.
//!
//! A card ends when it is closed or used (the purge pass that first sees
//! that records the time) or when its `valid_until` passes. `retention`
//! after its end, a pass deletes the card's record and its owner-list
//! entry (and, of every card, the transaction and reversal records and
//! the card events older than `retention`), and replaces its
//! number index entries with tombstones: the number no longer maps to
//! anything (Detokenize: NOT_FOUND, Authorize: 14) but cannot be issued
//! again until `quarantine` after the purge, when a later pass frees it.

use futures_util::{stream, StreamExt, TryStreamExt};
use time::OffsetDateTime;

use crate::domain::{CardId, CardState};
use crate::vault::records::{
    card_key, decode, event_owner_seq, owner_key, pan_key, parse_index_value, CardRecord,
    EventRecord, IdempotencyRecord, ReversalRecord, TxnRecord,
};
use crate::vault::{Vault, VaultError, Write};

/// Index entries of purged numbers start with this, then the big-endian
/// Unix time until which the number stays reserved.
pub const TOMBSTONE: &[u8] = b"purged:";

/// Entries read per scan page.
const PAGE: usize = 1000;
/// Updates a pass keeps in flight at once.
const IN_FLIGHT: usize = 64;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PurgeStats {
    /// Cards seen ending (closed or used) for the first time.
    pub ended: u64,
    pub cards_purged: u64,
    pub numbers_released: u64,
    pub transactions_purged: u64,
    pub reversals_purged: u64,
    pub events_purged: u64,
    pub idempotency_keys_purged: u64,
}

/// Whether an index value is a tombstone still reserving its number at `now`.
pub fn tombstone_until(value: &[u8]) -> Option<i64> {
    let rest = value.strip_prefix(TOMBSTONE)?;
    Some(i64::from_be_bytes(rest.try_into().ok()?))
}

impl Vault {
    /// Every entry under `prefix`, page by page.
    async fn scan_all(
        &self,
        prefix: &[u8],
        mut each: impl FnMut(Vec<u8>, Vec<u8>),
    ) -> Result<(), VaultError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(prefix, after.as_deref(), PAGE).await?;
            let last = page.last().map(|(k, _)| k.clone());
            let full = page.len() == PAGE;
            for (k, v) in page {
                each(k, v);
            }
            match (full, last) {
                (true, Some(k)) => after = Some(k),
                _ => return Ok(()),
            }
        }
    }

    /// One retention pass at `now`. Safe to run while serving: each change
    /// is an update of its own that re-checks what it changes.
    pub async fn purge(&self, now: OffsetDateTime) -> Result<PurgeStats, VaultError> {
        let mut stats = PurgeStats::default();
        let retention = self.config.retention;
        let now_s = now.unix_timestamp();

        // What each card needs, from one scan; then the updates, many at
        // once so that they share the engine's group commits (one at a
        // time, a pass could not keep up with cards ending at the rate a
        // busy switch uses them).
        let mut to_mark = Vec::new();
        let mut to_purge = Vec::new();
        let mut bad = None;
        self.scan_all(b"c/", |_, bytes| {
            let card = match decode::<CardRecord>("card", &bytes).and_then(|r| Ok((r.card()?, r))) {
                Ok(c) => c,
                Err(e) => {
                    bad.get_or_insert(e);
                    return;
                }
            };
            let (card, rec) = card;
            let ended = if card.state.is_final() {
                if rec.ended_at == 0 {
                    to_mark.push(card.id);
                    return;
                }
                rec.ended_at
            } else {
                card.policy.valid_until.unix_timestamp()
            };
            if ended + retention.whole_seconds() <= now_s {
                to_purge.push(card.id);
            }
        })
        .await?;
        if let Some(e) = bad {
            return Err(e);
        }
        stats.ended = to_mark.len() as u64;
        // (Owned ids: futures borrowing from the list would not be Send.)
        stream::iter(to_mark)
            .map(|id| async move { self.mark_ended(&id, now_s).await })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        let purged = stream::iter(to_purge)
            .map(|id| async move { self.purge_card(&id, now).await })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<bool>>()
            .await?;
        stats.cards_purged = purged.into_iter().filter(|p| *p).count() as u64;

        // Numbers whose quarantine is over.
        let mut tombstones = Vec::new();
        self.scan_all(b"p/", |k, v| {
            if tombstone_until(&v).is_some_and(|until| until <= now_s) {
                tombstones.push(k);
            }
        })
        .await?;
        let released = stream::iter(tombstones)
            .map(|key| async move {
                let mut released = false;
                self.store
                    .update(std::slice::from_ref(&key), &mut |v| {
                        released = v[0]
                            .as_deref()
                            .and_then(tombstone_until)
                            .is_some_and(|u| u <= now_s);
                        if released {
                            vec![Write::Delete(key.clone())]
                        } else {
                            vec![]
                        }
                    })
                    .await
                    .map(|()| released)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<bool>>()
            .await?;
        stats.numbers_released = released.into_iter().filter(|r| *r).count() as u64;

        // Transaction and reversal records past retention: retries come
        // within minutes, never a year later. Then the card events past it
        // (WatchEvents and webhooks resume from the oldest one kept).
        let past = |t: i64| t + retention.whole_seconds() <= now_s;
        stats.transactions_purged = self
            .delete_where(
                b"t/",
                |v| decode::<TxnRecord>("transaction", v).is_ok_and(|t| past(t.decided_at)),
                |_| vec![],
            )
            .await?;
        stats.reversals_purged = self
            .delete_where(
                b"r/",
                |v| {
                    // 0: written before reversals recorded their time; kept.
                    decode::<ReversalRecord>("reversal", v)
                        .is_ok_and(|r| r.decided_at > 0 && past(r.decided_at))
                },
                |_| vec![],
            )
            .await?;
        stats.events_purged = self
            .delete_where(
                b"e/",
                |v| decode::<EventRecord>("event", v).is_ok_and(|e| past(e.occurred_at)),
                event_floors,
            )
            .await?;

        // Idempotency keys of cards that are gone.
        let mut keys = Vec::new();
        self.scan_all(b"i/", |k, v| keys.push((k, v))).await?;
        let gone = stream::iter(keys)
            .map(|(k, v)| async move {
                let idem: IdempotencyRecord = decode("idempotency", &v)?;
                let gone = match CardId::parse("card_id", &idem.card_id) {
                    Ok(id) => self.store.get(&card_key(&id)).await?.is_none(),
                    Err(_) => true,
                };
                if gone {
                    self.store
                        .update(&[], &mut |_| vec![Write::Delete(k.clone())])
                        .await?;
                }
                Ok::<bool, VaultError>(gone)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<bool>>()
            .await?;
        stats.idempotency_keys_purged = gone.into_iter().filter(|g| *g).count() as u64;
        if stats != PurgeStats::default() {
            tracing::info!(?stats, "retention pass");
        }
        Ok(stats)
    }

    /// Deletes every entry under `prefix` whose value `old` picks, a page
    /// at a time, each page in one update with the writes `also` gives for
    /// it; returns how many. What `old` picks is by a time that never
    /// changes, so no later write can make a picked entry young again:
    /// deleting what the scan saw needs no re-check.
    async fn delete_where(
        &self,
        prefix: &[u8],
        old: impl Fn(&[u8]) -> bool,
        also: impl Fn(&[Vec<u8>]) -> Vec<Write>,
    ) -> Result<u64, VaultError> {
        let mut keys = Vec::new();
        self.scan_all(prefix, |k, v| {
            if old(&v) {
                keys.push(k);
            }
        })
        .await?;
        for chunk in keys.chunks(PAGE) {
            let mut writes: Vec<Write> = chunk.iter().cloned().map(Write::Delete).collect();
            writes.extend(also(chunk));
            self.store.update(&[], &mut |_| writes.clone()).await?;
        }
        Ok(keys.len() as u64)
    }

    async fn mark_ended(&self, id: &CardId, now_s: i64) -> Result<(), VaultError> {
        let key = card_key(id);
        let mut result = Ok(());
        self.store
            .update(std::slice::from_ref(&key), &mut |v| {
                let Some(bytes) = &v[0] else { return vec![] };
                match decode::<CardRecord>("card", bytes) {
                    Ok(mut rec) if rec.ended_at == 0 => {
                        rec.ended_at = now_s;
                        vec![Write::Put(key.clone(), prost::Message::encode_to_vec(&rec))]
                    }
                    Ok(_) => vec![],
                    Err(e) => {
                        result = Err(e);
                        vec![]
                    }
                }
            })
            .await?;
        result
    }

    /// Deletes one card and tombstones its number. False if it was not
    /// there any more.
    async fn purge_card(&self, id: &CardId, now: OffsetDateTime) -> Result<bool, VaultError> {
        let Some(bytes) = self.store.get(&card_key(id)).await? else {
            return Ok(false);
        };
        let rec: CardRecord = decode("card", &bytes)?;
        let card = rec.card()?;
        let keyring = self.keys();
        let token = keyring
            .open_token(id.as_str(), &rec.sealed()?)
            .map_err(|e| VaultError::Internal(format!("purging card {id}: {e}")))?;
        let mut keys = vec![card_key(id)];
        for v in keyring.index_versions() {
            let idx = keyring
                .pan_index(v, &token)
                .map_err(|e| VaultError::Internal(e.to_string()))?;
            keys.push(pan_key(v, &idx));
        }
        let until = (now + self.config.quarantine).unix_timestamp();
        let tombstone = [TOMBSTONE, &until.to_be_bytes()].concat();
        let owner_entry = owner_key(&card.owner, card.created_at, id);
        let mut purged = false;
        self.store
            .update(&keys, &mut |v| {
                purged = v[0].is_some();
                if !purged {
                    return vec![];
                }
                let mut w = vec![
                    Write::Delete(keys[0].clone()),
                    Write::Delete(owner_entry.clone()),
                ];
                for (k, value) in keys[1..].iter().zip(&v[1..]) {
                    // This card's entry, with or without its owner.
                    let ours = value
                        .as_deref()
                        .is_some_and(|v| parse_index_value(v).0 == id.as_str().as_bytes());
                    if ours {
                        w.push(Write::Put(k.clone(), tombstone.clone()));
                    }
                }
                w
            })
            .await?;
        if purged {
            tracing::info!(card_id = %id, pan = %token.masked(), state = card_state(card.state), "card purged after retention");
        }
        Ok(purged)
    }
}

fn card_state(s: CardState) -> &'static str {
    s.as_str()
}

/// For a page of deleted event keys, each owner's floor: the highest
/// sequence number deleted. Keys are in owner, then sequence order, so the
/// last one of an owner in a page is its highest, and later pages only
/// raise it.
fn event_floors(keys: &[Vec<u8>]) -> Vec<Write> {
    let mut floors: Vec<(&[u8], u64)> = Vec::new();
    for (owner, seq) in keys.iter().filter_map(|k| event_owner_seq(k)) {
        match floors.last_mut() {
            Some((o, s)) if *o == owner => *s = seq,
            _ => floors.push((owner, seq)),
        }
    }
    floors
        .into_iter()
        .map(|(owner, seq)| Write::Put([b"x/", owner].concat(), seq.to_be_bytes().to_vec()))
        .collect()
}
