//! The number index entry carries the card's owner, so an authorisation
//! locks the owner's event sequence without reading the card first; an
//! entry written before it did (the card id alone) still authorises,
//! detokenises, moves on key rotation and is tombstoned on purge.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tempfile::TempDir;
use zeroize::Zeroizing;

use super::*;
use crate::config::Config;
use crate::vault::crypto::KEY_LEN;
use crate::vault::embedded::{EngineOptions, Fjall3Store};
use crate::vault::records::event_seq_key;
use crate::vault::store::{Decide, ExportSink};

const FUNDING: &str = "4111111111111111";

/// A store that counts the reads of card records (`c/`) made with `get`,
/// that is outside an update: the reads an authorisation can spare.
struct CountingStore {
    inner: Arc<dyn Store>,
    card_gets: AtomicU64,
}

#[async_trait]
impl Store for CountingStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if key.starts_with(CARD_PREFIX) {
            self.card_gets.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(key).await
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.inner.scan(prefix, after, limit).await
    }

    async fn update(&self, keys: &[Vec<u8>], decide: &mut Decide<'_>) -> Result<(), StoreError> {
        self.inner.update(keys, decide).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.inner.sync().await
    }

    async fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        self.inner.export(sink).await
    }
}

struct Fixture {
    vault: Vault,
    store: Arc<CountingStore>,
    _dir: TempDir,
}

fn master(byte: u8) -> crypto::MasterKey {
    Zeroizing::new([byte; KEY_LEN])
}

/// A vault over fjall 3 (the default engine) in a temporary directory,
/// under key version 1.
async fn open() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let engine = Fjall3Store::open(dir.path(), &EngineOptions::default()).unwrap();
    let store = Arc::new(CountingStore {
        inner: Arc::new(engine),
        card_gets: AtomicU64::new(0),
    });
    let vault = Vault::open(
        store.clone(),
        Arc::new(Keyring::single(&master(7))),
        Config::default().vault().unwrap(),
        system_clock(),
    )
    .await
    .unwrap();
    Fixture {
        vault,
        store,
        _dir: dir,
    }
}

fn actor() -> Actor {
    Actor::new("test", "admin", "-")
}

fn eur(n: i64) -> Money {
    Money::parse(n, "EUR").unwrap()
}

fn alice() -> Owner {
    Owner::parse("owner", "alice").unwrap()
}

async fn issue(vault: &Vault) -> IssuedCard {
    let req = IssueRequest {
        funding_pan: Pan::parse(FUNDING).unwrap(),
        owner: alice(),
        policy: PolicyInput {
            spend_limit: eur(10_000),
            per_transaction_limit: None,
            max_uses: 10,
            valid_until: None,
            merchant_id: None,
            lock_to_first_merchant: false,
            allowed_mccs: vec![],
            blocked_mccs: vec![],
        },
        idempotency_key: None,
    };
    vault.issue(req, &actor()).await.unwrap()
}

async fn authorize(vault: &Vault, card: &IssuedCard, txn: &str) -> AuthorizeOutcome {
    let req = AuthorizeRequest {
        transaction_id: txn.into(),
        pan: Presented::Pan(card.pan.clone()),
        expiry: card.card.expiry,
        cvv: Cvv::parse(card.cvv.expose()).unwrap(),
        amount: eur(100),
        merchant_id: None,
        mcc: None,
    };
    vault.authorize(&req, &actor()).await.unwrap()
}

/// The key of `card`'s number index entry under key `version`.
fn index_key(vault: &Vault, card: &IssuedCard, version: u32) -> Vec<u8> {
    pan_key(
        version,
        &vault.keys().pan_index(version, &card.pan).unwrap(),
    )
}

async fn put(store: &dyn Store, key: &[u8], value: Vec<u8>) {
    let key = key.to_vec();
    store
        .update(std::slice::from_ref(&key), &mut |_| {
            vec![Write::Put(key.clone(), value.clone())]
        })
        .await
        .unwrap();
}

/// Rewrites `card`'s index entry (version 1) as it was written before
/// entries carried the owner: the card id alone.
async fn make_old_entry(f: &Fixture, card: &IssuedCard) {
    let key = index_key(&f.vault, card, 1);
    put(
        f.store.as_ref(),
        &key,
        card.card.id.as_str().as_bytes().to_vec(),
    )
    .await;
}

/// The owner's last event sequence number.
async fn event_seq(store: &dyn Store, owner: &Owner) -> u64 {
    let v = store.get(&event_seq_key(owner)).await.unwrap().unwrap();
    u64::from_be_bytes(v.try_into().unwrap())
}

/// Card records read outside updates while `authorize` runs once.
async fn card_reads_of_authorize(f: &Fixture, card: &IssuedCard, txn: &str) -> u64 {
    let before = f.store.card_gets.load(Ordering::SeqCst);
    assert!(authorize(&f.vault, card, txn).await.code.is_approved());
    f.store.card_gets.load(Ordering::SeqCst) - before
}

#[tokio::test]
async fn issue_writes_the_owner_into_the_index_entry() {
    let f = open().await;
    let card = issue(&f.vault).await;
    let value = f.store.get(&index_key(&f.vault, &card, 1)).await.unwrap();
    assert_eq!(value, Some(index_value(&card.card.id, &alice())));
    let found = f.vault.find_card(&card.pan).await.unwrap();
    assert_eq!(
        found.map(|i| (i.owner(), i.id)),
        Some((Some(alice()), card.card.id.clone()))
    );
}

#[tokio::test]
async fn authorize_reads_the_card_before_the_lock_only_for_an_old_entry() {
    let f = open().await;
    let card = issue(&f.vault).await;
    // The owner from the index entry: no card read outside the update.
    assert_eq!(card_reads_of_authorize(&f, &card, "t1").await, 0);
    // The id alone: the owner is read from the card, as before.
    make_old_entry(&f, &card).await;
    assert_eq!(card_reads_of_authorize(&f, &card, "t2").await, 1);
    // Either way the owner's events are numbered in one sequence
    // (issued, then two authorisations).
    assert_eq!(event_seq(f.store.as_ref(), &alice()).await, 3);
}

#[tokio::test]
async fn an_old_index_entry_authorizes_and_detokenizes() {
    let f = open().await;
    let card = issue(&f.vault).await;
    make_old_entry(&f, &card).await;
    assert_eq!(
        f.vault.find_card(&card.pan).await.unwrap(),
        Some(Indexed {
            id: card.card.id.clone(),
            owner: None,
        })
    );
    let o = authorize(&f.vault, &card, "t1").await;
    assert!(o.code.is_approved(), "{:?}", o.code);
    assert_eq!(o.card_id.as_ref(), Some(&card.card.id));
    assert_eq!(o.remaining, Some(eur(9_900)));
    let d = f.vault.detokenize(&card.pan, &actor()).await.unwrap();
    assert_eq!((d.card_id, d.funding_pan.expose()), (card.card.id, FUNDING));
}

#[tokio::test]
async fn an_owner_that_does_not_parse_is_read_from_the_card() {
    let f = open().await;
    let card = issue(&f.vault).await;
    let key = index_key(&f.vault, &card, 1);
    let id = card.card.id.as_str().as_bytes();
    for (i, owner) in [&b""[..], b"a\nb", b"\xff\xfe"].into_iter().enumerate() {
        put(f.store.as_ref(), &key, [id, b"\0", owner].concat()).await;
        let reads = card_reads_of_authorize(&f, &card, &format!("t{i}")).await;
        assert_eq!(reads, 1, "owner {owner:?}");
    }
}

#[tokio::test]
async fn an_index_entry_naming_another_owner_is_refused() {
    let f = open().await;
    let card = issue(&f.vault).await;
    let bob = Owner::parse("owner", "bob").unwrap();
    let key = index_key(&f.vault, &card, 1);
    put(f.store.as_ref(), &key, index_value(&card.card.id, &bob)).await;
    let req = AuthorizeRequest {
        transaction_id: "t1".into(),
        pan: Presented::Pan(card.pan.clone()),
        expiry: card.card.expiry,
        cvv: Cvv::parse(card.cvv.expose()).unwrap(),
        amount: eur(100),
        merchant_id: None,
        mcc: None,
    };
    match f.vault.authorize(&req, &actor()).await {
        Err(VaultError::Internal(m)) => assert!(m.contains("another owner"), "{m}"),
        other => panic!("authorised under another owner's sequence: {other:?}"),
    }
    // Nothing was numbered under bob's sequence, nor written for the card.
    assert_eq!(f.store.get(&event_seq_key(&bob)).await.unwrap(), None);
    assert_eq!(event_seq(f.store.as_ref(), &alice()).await, 1);
}

#[tokio::test]
async fn rotation_moves_an_old_index_entry_to_the_new_format() {
    let f = open().await;
    let card = issue(&f.vault).await;
    make_old_entry(&f, &card).await;
    let masters = BTreeMap::from([(1, master(7)), (2, master(8))]);
    let keys = Keyring::from_masters(&masters).unwrap();
    f.vault.reload_keys(Arc::new(keys)).await.unwrap();
    // Still found under version 1 before the move.
    assert!(authorize(&f.vault, &card, "t1").await.code.is_approved());

    let moved = f.vault.reencrypt_all().await.unwrap();
    assert_eq!((moved.cards, moved.moved), (1, 1));
    let old = index_key(&f.vault, &card, 1);
    let new = index_key(&f.vault, &card, 2);
    assert_eq!(f.store.get(&old).await.unwrap(), None);
    assert_eq!(
        f.store.get(&new).await.unwrap(),
        Some(index_value(&card.card.id, &alice()))
    );
    // Moved with its owner: no card read before the lock any more.
    assert_eq!(card_reads_of_authorize(&f, &card, "t2").await, 0);
    let d = f.vault.detokenize(&card.pan, &actor()).await.unwrap();
    assert_eq!(d.card_id, card.card.id);
    // A second pass has nothing left to move.
    assert_eq!(f.vault.reencrypt_all().await.unwrap().moved, 0);
}

#[tokio::test]
async fn purge_tombstones_an_old_index_entry() {
    let f = open().await;
    let card = issue(&f.vault).await;
    let kept = issue(&f.vault).await;
    make_old_entry(&f, &card).await;
    f.vault
        .close(&card.card.id, Scope::Any, &actor())
        .await
        .unwrap();
    let t0 = OffsetDateTime::now_utc();
    assert_eq!(f.vault.purge(t0).await.unwrap().ended, 1);
    let later = t0 + f.vault.config.retention + time::Duration::days(1);
    assert_eq!(f.vault.purge(later).await.unwrap().cards_purged, 1);

    let value = f.store.get(&index_key(&f.vault, &card, 1)).await.unwrap();
    assert!(
        value.as_deref().and_then(purge::tombstone_until).is_some(),
        "not a tombstone: {value:?}"
    );
    assert_eq!(f.vault.find_card(&card.pan).await.unwrap(), None);
    assert!(f.vault.number_in_use(&card.pan).await.unwrap());
    match f.vault.detokenize(&card.pan, &actor()).await {
        Err(VaultError::NotFound(_)) => {}
        other => panic!("a purged number detokenised: {other:?}"),
    }
    // The other card, in the new format, is untouched.
    assert_eq!(
        f.store.get(&index_key(&f.vault, &kept, 1)).await.unwrap(),
        Some(index_value(&kept.card.id, &alice()))
    );
}
