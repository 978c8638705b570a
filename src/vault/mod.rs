//! The vault: cards, their sealed numbers and their transactions, over a
//! [`Store`]. Every operation that changes a card runs inside one
//! [`Store::update`], so it is atomic, isolated per card and durable before
//! it returns.

pub mod chaos;
pub mod crypto;
pub mod embedded;
pub mod events;
pub mod gather;
pub mod keyfile;
pub mod postgres_store;
pub mod purge;
pub mod records;
pub mod store;

use std::sync::{Arc, RwLock};

use time::OffsetDateTime;

use crate::audit::{Actor, Event, Recorder};
use crate::domain::card::{ChangeError, PolicyBounds, PolicyInput};
use crate::domain::decision::{self, Attempt, ResponseCode};
use crate::domain::number::NumberPlan;
use crate::domain::{
    Card, CardId, CardPolicy, CardState, Cvv, Expiry, FieldError, Mcc, MerchantId, Money, Owner,
    Pan,
};
use crate::vault::crypto::{CryptoError, Keyring, RandomDigits};
use crate::vault::events::{Delivered, EventHub};
use crate::vault::records::{
    append_events, card_key, decode, event_seq_key, funding_key, funding_prefix, idempotency_key,
    index_value, kcv_key, owner_key, owner_prefix, pan_key, pan_prefix, parse_index_value,
    reversal_key, txn_key, version_or_1, CardRecord, EventKind, EventRecord, IdempotencyRecord,
    ReversalRecord, TxnRecord, CARD_PREFIX, KCV_PREFIX, KEY_CHECK_VALUE,
};
pub use crate::vault::store::{Store, StoreError, Write};

/// Everything that can go wrong in a vault operation, by what the caller
/// should do about it. The gRPC layer maps each to one status code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    #[error("{0}")]
    InvalidArgument(FieldError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => VaultError::Unavailable(m),
            StoreError::Corrupt(m) => VaultError::Internal(m),
        }
    }
}

impl From<FieldError> for VaultError {
    fn from(e: FieldError) -> Self {
        VaultError::InvalidArgument(e)
    }
}

impl From<ChangeError> for VaultError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Field(f) => VaultError::InvalidArgument(f),
            state => VaultError::FailedPrecondition(state.to_string()),
        }
    }
}

fn crypto_error(card_id: &str) -> impl Fn(CryptoError) -> VaultError + '_ {
    move |e| {
        tracing::error!(card_id, error = %e, "a sealed card number failed to open");
        VaultError::Internal(format!(
            "the sealed numbers of card {card_id} cannot be opened"
        ))
    }
}

/// The vault's settings (from the service configuration).
#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub plan: NumberPlan,
    pub bounds: PolicyBounds,
    /// Wrong CVVs or expiries in a row that block a card.
    pub max_failed_verifications: u32,
    /// How long an ended card stays detokenisable before it is purged.
    pub retention: time::Duration,
    /// How long a purged card's number stays reserved.
    pub quarantine: time::Duration,
    /// This instance's name in the audit log (instances sharing a
    /// database each seal their own entries).
    pub audit_instance: String,
}

/// Where the vault gets the time: the system clock in service, a fixed or
/// moving one in tests.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        let now = OffsetDateTime::now_utc();
        now.replace_nanosecond(0).unwrap_or(now)
    })
}

/// Who is asking: any owner (the bank's app, admins) or one owner (a
/// cardholder's widget). Another owner's card is simply not found.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Any,
    Owner(&'a Owner),
}

impl Scope<'_> {
    fn allows(&self, owner: &Owner) -> bool {
        match self {
            Scope::Any => true,
            Scope::Owner(o) => *o == owner,
        }
    }
}

/// A request for a new card, parsed.
#[derive(Debug)]
pub struct IssueRequest {
    pub funding_pan: Pan,
    pub owner: Owner,
    pub policy: PolicyInput,
    pub idempotency_key: Option<String>,
}

/// A new card with its number and CVV: the only time they leave the vault.
#[derive(Debug)]
pub struct IssuedCard {
    pub card: Card,
    pub pan: Pan,
    pub cvv: Cvv,
    /// True when an idempotency key returned a card issued earlier.
    pub replayed: bool,
}

/// The card number of an authorisation: a valid one, or digits that fail
/// the Luhn check (answered 14, but still part of the retry fingerprint).
pub enum Presented {
    Pan(Pan),
    BadLuhn(zeroize::Zeroizing<String>),
}

impl Presented {
    fn digits(&self) -> &str {
        match self {
            Presented::Pan(p) => p.expose(),
            Presented::BadLuhn(s) => s,
        }
    }

    fn masked(&self) -> String {
        crate::domain::pan::mask(self.digits())
    }
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Presented({})", self.masked())
    }
}

/// An authorisation request, parsed.
#[derive(Debug)]
pub struct AuthorizeRequest {
    pub transaction_id: String,
    pub pan: Presented,
    pub expiry: Expiry,
    pub cvv: Cvv,
    pub amount: Money,
    pub merchant_id: Option<MerchantId>,
    pub mcc: Option<Mcc>,
}

/// The answer to an authorisation.
#[derive(Debug)]
pub struct AuthorizeOutcome {
    pub code: ResponseCode,
    pub card_id: Option<CardId>,
    pub authorization_id: Option<String>,
    /// The real card number, only when approved.
    pub funding_pan: Option<Pan>,
    pub remaining: Option<Money>,
    /// True when this answers a retry of a transaction decided before.
    pub replayed: bool,
}

#[derive(Debug)]
pub struct ReverseRequest {
    pub transaction_id: String,
    /// None: everything not yet reversed.
    pub amount: Option<Money>,
    pub reversal_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseOutcome {
    pub reversed: bool,
    /// 00 reversed, 12 not an approved authorisation, 13 bad amount,
    /// 94 reversal id reused with other content.
    pub response_code: &'static str,
    pub remaining: Option<Money>,
}

#[derive(Debug)]
pub struct Detokenized {
    pub funding_pan: Pan,
    pub card_id: CardId,
    pub state: CardState,
}

/// What a card number's index entry says: the card, and the owner's bytes
/// when the entry carries them (entries written before it did do not).
/// The owner is parsed only by the one caller that needs it
/// ([`Indexed::owner`]), not on every lookup (Detokenize has no use for it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Indexed {
    id: CardId,
    owner: Option<Vec<u8>>,
}

impl Indexed {
    /// A number index value that is not a tombstone.
    fn parse(value: &[u8]) -> Result<Indexed, VaultError> {
        let (id, owner) = parse_index_value(value);
        let id = std::str::from_utf8(id)
            .ok()
            .and_then(|s| CardId::parse("card_id", s).ok())
            .ok_or_else(|| {
                VaultError::Internal("a stored number index entry is unreadable".into())
            })?;
        Ok(Indexed {
            id,
            owner: owner.map(<[u8]>::to_vec),
        })
    }

    /// The owner the entry carries; none for an entry written before it
    /// did, or one that does not parse (then it is read from the card).
    fn owner(&self) -> Option<Owner> {
        let o = std::str::from_utf8(self.owner.as_deref()?).ok()?;
        Owner::parse("owner", o).ok()
    }
}

/// How many numbers to draw before giving up on a crowded BIN.
const MAX_NUMBER_DRAWS: usize = 32;

/// What still needs one key version (see [`Vault::key_usage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub version: u32,
    /// Cards whose data key is wrapped under this version's KEK.
    pub sealed: u64,
    /// Card number index entries under this version's index key.
    pub pan_index: u64,
    /// Funding number index entries under this version's index key.
    pub funding_index: u64,
    /// Live cards (not used, closed or expired) whose printed CVV derives
    /// from this version's CVV key.
    pub live_cvv: u64,
}

impl KeyUsage {
    /// Records that cannot be served without this version.
    pub fn total(&self) -> u64 {
        self.sealed + self.pan_index + self.funding_index + self.live_cvv
    }
}

/// What a re-encryption pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reencrypted {
    pub cards: u64,
    pub moved: u64,
}

pub struct Vault {
    store: Arc<dyn Store>,
    /// The keyring, replaced whole when keys are reloaded (rotation).
    keys: RwLock<Arc<Keyring>>,
    config: VaultConfig,
    clock: Clock,
    events: Arc<EventHub>,
    /// Makes the audit entry each operation writes with its own writes.
    audit: Recorder,
}

impl Vault {
    /// Opens the vault over `store`, checking that `keys` are the ones its
    /// data was written with (a wrong master key is refused here, before
    /// anything is served).
    pub async fn open(
        store: Arc<dyn Store>,
        keys: Arc<Keyring>,
        config: VaultConfig,
        clock: Clock,
    ) -> Result<Vault, VaultError> {
        check_keys(store.as_ref(), &keys).await?;
        let audit = Recorder::new(&config.audit_instance);
        Ok(Vault {
            store,
            keys: RwLock::new(keys),
            config,
            clock,
            events: Arc::new(EventHub::default()),
            audit,
        })
    }

    /// The store under the vault (the audit sealer shares it).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Sends the audit entries written on their own (reads, refusals, key
    /// operations) to `journal` instead of the store (the running
    /// server's; see [`crate::audit::journal`]).
    pub fn set_audit_journal(&mut self, journal: Arc<crate::audit::Journal>) {
        self.audit.attach_journal(journal);
    }

    /// The journal entries written on their own go to, if any.
    pub fn audit_journal(&self) -> Option<Arc<crate::audit::Journal>> {
        self.audit.journal().cloned()
    }

    /// Writes one audit entry on its own, durably: for operations that
    /// write nothing else (reads, refusals, key operations).
    pub async fn record(&self, actor: &Actor, event: &Event) -> Result<(), VaultError> {
        self.audit
            .record(self.store.as_ref(), actor, event)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, action = event.action, "audit entry not written: the operation fails");
                VaultError::Unavailable(format!("the audit log cannot be written: {e}"))
            })
    }

    /// Writes several audit entries on their own, durably and together
    /// (the failed authentications the interceptor hands over).
    pub async fn record_batch(&self, entries: &[(Actor, Event)]) -> Result<(), VaultError> {
        let entries: Vec<(&Actor, &Event)> = entries.iter().map(|(a, e)| (a, e)).collect();
        self.audit
            .record_all(self.store.as_ref(), &entries)
            .await
            .map_err(|e| VaultError::Unavailable(format!("the audit log cannot be written: {e}")))
    }

    /// Records a refused or failed operation. The caller's error stands
    /// either way.
    async fn record_error(&self, actor: &Actor, event: Event, e: &VaultError) {
        let _ = self
            .record(
                actor,
                &Event {
                    outcome: format!("error: {e}"),
                    ..event
                },
            )
            .await;
    }

    /// The keyring in force (cheap: a shared pointer).
    pub fn keys(&self) -> Arc<Keyring> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the keyring while serving (key rotation), after checking
    /// it against the check values the vault recorded. Calls in flight
    /// finish with the keyring they started with.
    pub async fn reload_keys(&self, keys: Arc<Keyring>) -> Result<(), VaultError> {
        check_keys(self.store.as_ref(), &keys).await?;
        let versions: Vec<u32> = keys.versions().collect();
        self.record(
            &Actor::system("vcn"),
            &Event::new("key_reload", "ok").detail(format!(
                "versions={versions:?} current={}",
                keys.current_version()
            )),
        )
        .await?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        tracing::info!(?versions, "keyring reloaded");
        Ok(())
    }

    fn now(&self) -> OffsetDateTime {
        (self.clock)()
    }

    fn random_id(&self, prefix: &str) -> Result<String, VaultError> {
        let mut b = [0u8; CardId::RANDOM_BYTES];
        self.keys()
            .fill_random(&mut b)
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        Ok(format!("{prefix}{}", hex::encode(b)))
    }

    /// The card a number belongs to, under any loaded index key version.
    /// While several versions are loaded a re-encryption may move the entry
    /// from an old version to the newest between two reads, so a miss is
    /// checked once more (a card moves at most once per rotation).
    async fn find_card(&self, pan: &Pan) -> Result<Option<Indexed>, VaultError> {
        let keys = self.keys();
        let passes = if keys.versions().count() > 1 { 2 } else { 1 };
        for _ in 0..passes {
            for v in keys.index_versions() {
                let idx = keys
                    .pan_index(v, pan)
                    .map_err(|e| VaultError::Internal(e.to_string()))?;
                if let Some(value) = self.store.get(&pan_key(v, &idx)).await? {
                    if purge::tombstone_until(&value).is_some() {
                        // A purged card's number: reserved, mapping to nothing.
                        return Ok(None);
                    }
                    return Indexed::parse(&value).map(Some);
                }
            }
        }
        Ok(None)
    }

    /// Whether `pan` may not be issued: a card's number (live, ended or
    /// purged and still in quarantine) or a known funding card.
    pub async fn number_in_use(&self, pan: &Pan) -> Result<bool, VaultError> {
        let keys = self.keys();
        for v in keys.index_versions() {
            let idx = keys
                .pan_index(v, pan)
                .map_err(|e| VaultError::Internal(e.to_string()))?;
            if self.store.get(&pan_key(v, &idx)).await?.is_some() {
                return Ok(true);
            }
        }
        self.is_known_funding(pan).await
    }

    /// Whether `pan` was ever seen as a funding card, under any version.
    async fn is_known_funding(&self, pan: &Pan) -> Result<bool, VaultError> {
        let keys = self.keys();
        let passes = if keys.versions().count() > 1 { 2 } else { 1 };
        for _ in 0..passes {
            for v in keys.index_versions() {
                let idx = keys
                    .pan_index(v, pan)
                    .map_err(|e| VaultError::Internal(e.to_string()))?;
                if self.store.get(&funding_key(v, &idx)).await?.is_some() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    async fn load(&self, id: &CardId) -> Result<CardRecord, VaultError> {
        let bytes = self
            .store
            .get(&card_key(id))
            .await?
            .ok_or_else(|| VaultError::NotFound(format!("card {id}")))?;
        decode("card", &bytes)
    }

    fn issue_fingerprint(
        &self,
        keys: &Keyring,
        version: u32,
        req: &IssueRequest,
    ) -> Result<Vec<u8>, VaultError> {
        let p = &req.policy;
        let money = |m: Option<Money>| {
            m.map(|m| format!("{}{}", m.amount_minor(), m.currency()))
                .unwrap_or_default()
        };
        let mccs = |v: &[Mcc]| v.iter().map(Mcc::to_string).collect::<Vec<_>>().join(",");
        let valid_until = p
            .valid_until
            .map(|t| t.unix_timestamp().to_string())
            .unwrap_or_default();
        keys.fingerprint(
            version,
            &[
                b"issue",
                req.funding_pan.expose().as_bytes(),
                money(Some(p.spend_limit)).as_bytes(),
                money(p.per_transaction_limit).as_bytes(),
                &p.max_uses.max(1).to_be_bytes(),
                valid_until.as_bytes(),
                p.merchant_id
                    .as_ref()
                    .map(MerchantId::as_str)
                    .unwrap_or("")
                    .as_bytes(),
                &[u8::from(p.lock_to_first_merchant)],
                mccs(&p.allowed_mccs).as_bytes(),
                mccs(&p.blocked_mccs).as_bytes(),
            ],
        )
        .map_err(|e| VaultError::Internal(e.to_string()))
    }

    /// The card an idempotency key already made, with its number and CVV.
    async fn replay_issue(
        &self,
        record: &[u8],
        req: &IssueRequest,
        scope: Scope<'_>,
    ) -> Result<IssuedCard, VaultError> {
        let keys = self.keys();
        let idem: IdempotencyRecord = decode("idempotency", record)?;
        let fingerprint =
            self.issue_fingerprint(&keys, version_or_1(idem.fingerprint_version), req);
        if fingerprint.ok().as_ref() != Some(&idem.fingerprint) {
            return Err(VaultError::AlreadyExists(
                "idempotency_key was already used for a card with other parameters".into(),
            ));
        }
        let id = CardId::parse("card_id", &idem.card_id).map_err(|_| {
            VaultError::Internal("a stored idempotency record is unreadable".into())
        })?;
        let rec = self.load(&id).await?;
        let card = rec.card()?;
        if !scope.allows(&card.owner) {
            return Err(VaultError::NotFound(format!("card {id}")));
        }
        let pan = keys
            .open_token(id.as_str(), &rec.sealed()?)
            .map_err(crypto_error(id.as_str()))?;
        let cvv = keys
            .cvv(version_or_1(rec.cvv_key_version), &pan, card.expiry)
            .map_err(crypto_error(id.as_str()))?;
        Ok(IssuedCard {
            card,
            pan,
            cvv,
            replayed: true,
        })
    }

    /// Issues a new virtual card, audited.
    pub async fn issue(&self, req: IssueRequest, actor: &Actor) -> Result<IssuedCard, VaultError> {
        let event = Event::new("issue", "ok").detail(format!("owner={}", req.owner));
        match self.issue_card(req, actor).await {
            Ok(c) if c.replayed => {
                let event = event
                    .card(c.card.id.as_str())
                    .pan(c.card.masked_pan.clone());
                self.record(
                    actor,
                    &Event {
                        outcome: "ok: idempotent replay".into(),
                        ..event
                    },
                )
                .await?;
                Ok(c)
            }
            Ok(c) => Ok(c),
            Err(e) => {
                self.record_error(actor, event, &e).await;
                Err(e)
            }
        }
    }

    async fn issue_card(&self, req: IssueRequest, actor: &Actor) -> Result<IssuedCard, VaultError> {
        let now = self.now();
        let mut policy = CardPolicy::new(req.policy.clone(), now, self.config.bounds)?;
        policy.valid_until = policy
            .valid_until
            .replace_nanosecond(0)
            .unwrap_or(policy.valid_until);
        self.config
            .plan
            .check_len(req.funding_pan.len())
            .map_err(|e| FieldError::new("funding_pan", e.to_string()))?;

        let keys = self.keys();
        let version = keys.current_version();
        let fingerprint = self.issue_fingerprint(&keys, version, &req)?;
        let idem_key = req
            .idempotency_key
            .as_deref()
            .map(|k| idempotency_key(&req.owner, k));
        if let Some(k) = &idem_key {
            if let Some(existing) = self.store.get(k).await? {
                return self
                    .replay_issue(&existing, &req, Scope::Owner(&req.owner))
                    .await;
            }
        }
        if self.find_card(&req.funding_pan).await?.is_some() {
            return Err(FieldError::new(
                "funding_pan",
                "is a virtual card number issued by this service; give the real card's number",
            )
            .into());
        }

        let crypto = |e: CryptoError| VaultError::Internal(e.to_string());
        let funding_idx = keys.pan_index(version, &req.funding_pan).map_err(crypto)?;
        let expiry = Expiry::of(policy.valid_until);

        for _ in 0..MAX_NUMBER_DRAWS {
            let pan = {
                let mut rng = RandomDigits::new(&keys);
                let pan = self
                    .config
                    .plan
                    .candidate(&req.funding_pan, &mut rng)
                    .map_err(|e| FieldError::new("funding_pan", e.to_string()))?;
                if rng.failed {
                    return Err(VaultError::Internal(
                        "the system random number generator failed".into(),
                    ));
                }
                pan
            };
            // The update below reads this number's index entry and funding
            // entry under the current key version, under its lock, and
            // draws again on a hit; only numbers indexed under older key
            // versions need looking up first.
            let older_versions = keys.index_versions().any(|v| v != version);
            if pan == req.funding_pan || (older_versions && self.number_in_use(&pan).await?) {
                continue;
            }
            let idx = keys.pan_index(version, &pan).map_err(crypto)?;
            let id = CardId::parse("card_id", &self.random_id("vc_")?)?;
            let card = Card {
                id: id.clone(),
                owner: req.owner.clone(),
                masked_pan: pan.masked(),
                last4: pan.last4().to_string(),
                expiry,
                spent: Money::new(0, policy.spend_limit.currency()),
                policy: policy.clone(),
                state: CardState::Active,
                uses: 0,
                failed_verifications: 0,
                created_at: now,
            };
            let sealed = keys
                .seal(id.as_str(), &req.funding_pan, &pan)
                .map_err(crypto)?;
            let cvv = keys.cvv(version, &pan, expiry).map_err(crypto)?;
            let mut card_record = CardRecord::new(&card, &sealed);
            card_record.cvv_key_version = version;
            let record = prost::Message::encode_to_vec(&card_record);

            let mut keys = vec![pan_key(version, &idx), funding_key(version, &idx)];
            keys.extend(idem_key.clone());
            let seq_at = keys.len();
            keys.push(event_seq_key(&card.owner));
            let issued_event = EventRecord::of(EventKind::Issued, &card, now);
            enum Outcome {
                Collision,
                IdempotencyRace(Vec<u8>),
                Failed(VaultError),
                Created,
            }
            let mut outcome = Outcome::Collision;
            self.store
                .update(&keys, &mut |v| {
                    if v[0].is_some() || v[1].is_some() {
                        outcome = Outcome::Collision;
                        return vec![];
                    }
                    if let (Some(_), Some(Some(existing))) = (&idem_key, v.get(2)) {
                        outcome = Outcome::IdempotencyRace(existing.clone());
                        return vec![];
                    }
                    let events = match append_events(
                        &card.owner,
                        v[seq_at].as_deref(),
                        vec![issued_event.clone()],
                    ) {
                        Ok(w) => w,
                        Err(e) => {
                            outcome = Outcome::Failed(e);
                            return vec![];
                        }
                    };
                    outcome = Outcome::Created;
                    let event = Event::new("issue", "ok")
                        .card(id.as_str())
                        .pan(card.masked_pan.clone())
                        .detail(format!("owner={}", card.owner));
                    let mut w = vec![
                        self.audit.write(actor, &event),
                        Write::Put(card_key(&id), record.clone()),
                        Write::Put(keys[0].clone(), index_value(&id, &card.owner)),
                        Write::Put(funding_key(version, &funding_idx), vec![]),
                        Write::Put(owner_key(&card.owner, now, &id), vec![]),
                    ];
                    if let Some(k) = &idem_key {
                        let rec = IdempotencyRecord {
                            fingerprint: fingerprint.clone(),
                            card_id: id.as_str().to_string(),
                            fingerprint_version: version,
                        };
                        w.push(Write::Put(k.clone(), prost::Message::encode_to_vec(&rec)));
                    }
                    w.extend(events);
                    w
                })
                .await?;
            match outcome {
                Outcome::Collision => continue,
                Outcome::Failed(e) => return Err(e),
                Outcome::IdempotencyRace(existing) => {
                    return self
                        .replay_issue(&existing, &req, Scope::Owner(&req.owner))
                        .await
                }
                Outcome::Created => {
                    self.events.published(&card.owner);
                    tracing::info!(card_id = %id, pan = %card.masked_pan, owner = %card.owner, "card issued");
                    return Ok(IssuedCard {
                        card,
                        pan,
                        cvv,
                        replayed: false,
                    });
                }
            }
        }
        Err(VaultError::ResourceExhausted(format!(
            "no free card number found for this BIN after {MAX_NUMBER_DRAWS} draws"
        )))
    }

    /// The funding number of `owner`'s card `id`, to issue another card on
    /// the same funding card without the caller holding its number. Another
    /// owner's card and a missing one get the same answer.
    pub async fn funding_of(&self, id: &CardId, owner: &Owner) -> Result<Pan, VaultError> {
        let not_theirs = || {
            VaultError::InvalidArgument(FieldError::new(
                "funding_card_id",
                format!("names no card of owner {owner}"),
            ))
        };
        let rec = match self.load(id).await {
            Ok(r) => r,
            Err(VaultError::NotFound(_)) => return Err(not_theirs()),
            Err(e) => return Err(e),
        };
        if rec.card()?.owner != *owner {
            return Err(not_theirs());
        }
        self.keys()
            .open_funding(id.as_str(), &rec.sealed()?)
            .map_err(crypto_error(id.as_str()))
    }

    pub async fn get(&self, id: &CardId, scope: Scope<'_>) -> Result<Card, VaultError> {
        let card = self.load(id).await?.card()?;
        if !scope.allows(&card.owner) {
            return Err(VaultError::NotFound(format!("card {id}")));
        }
        Ok(card)
    }

    /// One page of an owner's cards, newest first, and the token of the next
    /// page when there is one.
    pub async fn list(
        &self,
        owner: &Owner,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<Card>, String), VaultError> {
        let prefix = owner_prefix(owner);
        let after = if page_token.is_empty() {
            None
        } else {
            let rest = hex::decode(page_token).map_err(|_| {
                FieldError::new("page_token", "is not a token returned by ListCards")
            })?;
            Some([prefix.clone(), rest].concat())
        };
        let entries = self
            .store
            .scan(&prefix, after.as_deref(), page_size + 1)
            .await?;
        let more = entries.len() > page_size;
        let mut cards = Vec::with_capacity(page_size.min(entries.len()));
        for (key, _) in entries.iter().take(page_size) {
            let id = std::str::from_utf8(&key[prefix.len() + 8..])
                .ok()
                .and_then(|s| CardId::parse("card_id", s).ok())
                .ok_or_else(|| {
                    VaultError::Internal("a stored owner list entry is unreadable".into())
                })?;
            cards.push(self.load(&id).await?.card()?);
        }
        let next = match (more, entries.get(page_size.saturating_sub(1))) {
            (true, Some((key, _))) => hex::encode(&key[prefix.len()..]),
            _ => String::new(),
        };
        Ok((cards, next))
    }

    /// Applies a lifecycle change to one card, atomically.
    async fn modify(
        &self,
        id: &CardId,
        scope: Scope<'_>,
        actor: &Actor,
        action: &'static str,
        kind: EventKind,
        change: &(dyn Fn(&mut Card) -> Result<(), ChangeError> + Sync),
    ) -> Result<Card, VaultError> {
        let key = card_key(id);
        // A card's owner never changes: read it first, to lock the owner's
        // event sequence with the card.
        let owner = self.load(id).await?.card()?.owner;
        if !scope.allows(&owner) {
            return Err(VaultError::NotFound(format!("card {id}")));
        }
        let keys = [key.clone(), event_seq_key(&owner)];
        let now = self.now();
        let mut result: Result<Card, VaultError> =
            Err(VaultError::Internal("no decision made".into()));
        let mut published = false;
        self.store
            .update(&keys, &mut |v| {
                published = false;
                let mut step = || -> Result<(Card, Vec<Write>), VaultError> {
                    let bytes = v[0]
                        .as_ref()
                        .ok_or_else(|| VaultError::NotFound(format!("card {id}")))?;
                    let mut rec: CardRecord = decode("card", bytes)?;
                    let mut card = rec.card()?;
                    if !scope.allows(&card.owner) {
                        return Err(VaultError::NotFound(format!("card {id}")));
                    }
                    let before = card.clone();
                    change(&mut card)?;
                    let event = Event::new(action, "ok")
                        .card(id.as_str())
                        .pan(card.masked_pan.clone())
                        .detail(format!("state={}", card.state.as_str()));
                    let audit = self.audit.write(actor, &event);
                    if card == before {
                        return Ok((card, vec![audit]));
                    }
                    rec.set_card(&card);
                    let mut writes = vec![
                        audit,
                        Write::Put(key.clone(), prost::Message::encode_to_vec(&rec)),
                    ];
                    writes.extend(append_events(
                        &card.owner,
                        v[1].as_deref(),
                        vec![EventRecord::of(kind, &card, now)],
                    )?);
                    published = true;
                    Ok((card, writes))
                };
                outcome_writes(&mut result, step())
            })
            .await?;
        match &result {
            Ok(card) => {
                if published {
                    self.events.published(&card.owner);
                }
                tracing::info!(card_id = %id, state = card.state.as_str(), action, "card changed")
            }
            Err(e) => {
                self.record_error(actor, Event::new(action, "").card(id.as_str()), e)
                    .await
            }
        }
        result
    }

    pub async fn pause(
        &self,
        id: &CardId,
        scope: Scope<'_>,
        actor: &Actor,
    ) -> Result<Card, VaultError> {
        self.modify(id, scope, actor, "pause", EventKind::Paused, &Card::pause)
            .await
    }

    pub async fn resume(
        &self,
        id: &CardId,
        scope: Scope<'_>,
        actor: &Actor,
    ) -> Result<Card, VaultError> {
        self.modify(
            id,
            scope,
            actor,
            "resume",
            EventKind::Resumed,
            &Card::resume,
        )
        .await
    }

    pub async fn close(
        &self,
        id: &CardId,
        scope: Scope<'_>,
        actor: &Actor,
    ) -> Result<Card, VaultError> {
        self.modify(id, scope, actor, "close", EventKind::Closed, &Card::close)
            .await
    }

    pub async fn update_limits(
        &self,
        id: &CardId,
        scope: Scope<'_>,
        actor: &Actor,
        spend_limit: Option<Money>,
        per_transaction_limit: Option<Option<Money>>,
    ) -> Result<Card, VaultError> {
        self.modify(
            id,
            scope,
            actor,
            "update_limits",
            EventKind::LimitsChanged,
            &move |c: &mut Card| c.update_limits(spend_limit, per_transaction_limit),
        )
        .await
    }

    fn authorize_fingerprint(
        keys: &Keyring,
        version: u32,
        req: &AuthorizeRequest,
    ) -> Result<Vec<u8>, VaultError> {
        let digits = req.pan.digits();
        keys.fingerprint(
            version,
            &[
                b"authorize",
                req.transaction_id.as_bytes(),
                digits.as_bytes(),
                req.expiry.mmyy().as_bytes(),
                req.cvv.expose().as_bytes(),
                &req.amount.amount_minor().to_be_bytes(),
                req.amount.currency().code().as_bytes(),
                req.merchant_id
                    .as_ref()
                    .map(MerchantId::as_str)
                    .unwrap_or("")
                    .as_bytes(),
                req.mcc.as_ref().map(Mcc::as_str).unwrap_or("").as_bytes(),
            ],
        )
        .map_err(|e| VaultError::Internal(e.to_string()))
    }

    /// Decides one authorisation, exactly once per transaction id.
    pub async fn authorize(
        &self,
        req: &AuthorizeRequest,
        actor: &Actor,
    ) -> Result<AuthorizeOutcome, VaultError> {
        let now = self.now();
        let keys = self.keys();
        let fingerprint = Self::authorize_fingerprint(&keys, keys.current_version(), req)?;
        let indexed = match &req.pan {
            Presented::Pan(p) => self.find_card(p).await?,
            Presented::BadLuhn(_) => None,
        };
        // The card's owner (which never changes), to lock the owner's event
        // sequence with the card: one more key, the owner's own.
        let (card_id, owner) = match indexed {
            Some(i) => {
                let owner = self.owner_of(&i).await?;
                (Some(i.id), Some(owner))
            }
            None => (None, None),
        };
        let authorization_id = self.random_id("au_")?;
        let tkey = txn_key(&req.transaction_id);
        let mut store_keys = vec![tkey.clone()];
        store_keys.extend(card_id.as_ref().map(card_key));
        store_keys.extend(owner.as_ref().map(event_seq_key));
        let mut published = false;

        let mut result: Result<AuthorizeOutcome, VaultError> =
            Err(VaultError::Internal("no decision made".into()));
        self.store
            .update(&store_keys, &mut |v| match self.decide(
                &keys,
                req,
                &fingerprint,
                card_id.as_ref(),
                owner.as_ref(),
                &authorization_id,
                now,
                v,
            ) {
                Ok((outcome, mut writes)) => {
                    // An unknown number writes its transaction only.
                    published = owner.is_some() && writes.len() > 1;
                    writes.push(self.audit.write(actor, &authorize_event(req, Ok(&outcome))));
                    result = Ok(outcome);
                    writes
                }
                Err(e) => {
                    result = Err(e);
                    vec![]
                }
            })
            .await?;
        if let (true, Some(owner), Ok(_)) = (published, &owner, &result) {
            self.events.published(owner);
        }
        if let Err(e) = &result {
            let _ = self.record(actor, &authorize_event(req, Err(e))).await;
        }
        if let Ok(o) = &result {
            if !o.replayed {
                if let Some(m) = crate::metrics::get() {
                    m.authorized(o.code);
                }
            }
            let pan = req.pan.masked();
            tracing::info!(
                transaction_id = %req.transaction_id,
                card_id = o.card_id.as_ref().map(CardId::as_str).unwrap_or(""),
                %pan,
                amount = %req.amount,
                code = o.code.code(),
                reason = o.code.reason(),
                replayed = o.replayed,
                "authorisation decided"
            );
        }
        result
    }

    /// The owner of an indexed card: from its index entry, or, for an
    /// entry written before entries carried it, from the card (one more
    /// read and decode).
    async fn owner_of(&self, indexed: &Indexed) -> Result<Owner, VaultError> {
        match indexed.owner() {
            Some(owner) => Ok(owner),
            None => self.load(&indexed.id).await?.owner(),
        }
    }

    /// The pure part of `authorize`, run under the store's lock: from the
    /// current transaction and card records to the answer and the writes.
    /// `owner` is the owner whose event sequence the update locked.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        keys: &Keyring,
        req: &AuthorizeRequest,
        fingerprint: &[u8],
        card_id: Option<&CardId>,
        owner: Option<&Owner>,
        authorization_id: &str,
        now: OffsetDateTime,
        v: &[Option<Vec<u8>>],
    ) -> Result<(AuthorizeOutcome, Vec<Write>), VaultError> {
        let card_rec = match v.get(1) {
            Some(Some(bytes)) => Some(decode::<CardRecord>("card", bytes)?),
            Some(None) => {
                return Err(VaultError::Internal(
                    "a number index points to a missing card".into(),
                ))
            }
            None => None,
        };
        let funding = |rec: &CardRecord| {
            keys.open_funding(&rec.card_id, &rec.sealed()?)
                .map_err(crypto_error(&rec.card_id))
        };

        // A transaction id seen before: the same request gets the same
        // answer, another request gets 94.
        if let Some(bytes) = &v[0] {
            let t: TxnRecord = decode("transaction", bytes)?;
            let stored_version = version_or_1(t.fingerprint_version);
            let same = if stored_version == keys.current_version() {
                t.fingerprint == fingerprint
            } else {
                // Decided before a key rotation: compare under its version.
                Self::authorize_fingerprint(keys, stored_version, req).ok()
                    == Some(t.fingerprint.clone())
            };
            if !same {
                return Ok((
                    AuthorizeOutcome {
                        code: ResponseCode::DuplicateTransaction,
                        card_id: None,
                        authorization_id: None,
                        funding_pan: None,
                        remaining: None,
                        replayed: false,
                    },
                    vec![],
                ));
            }
            let code = ResponseCode::from_reason(&t.reason).ok_or_else(|| {
                VaultError::Internal("a stored transaction record is unreadable".into())
            })?;
            let currency = crate::domain::Currency::parse(&t.currency).ok();
            let funding_pan = match (&card_rec, code.is_approved()) {
                (Some(rec), true) => Some(funding(rec)?),
                _ => None,
            };
            return Ok((
                AuthorizeOutcome {
                    code,
                    card_id: CardId::parse("card_id", &t.card_id).ok(),
                    authorization_id: Some(t.authorization_id).filter(|s| !s.is_empty()),
                    funding_pan,
                    remaining: t.remaining.zip(currency).map(|(n, c)| Money::new(n, c)),
                    replayed: true,
                },
                vec![],
            ));
        }

        let mut txn = TxnRecord {
            fingerprint: fingerprint.to_vec(),
            amount: req.amount.amount_minor(),
            currency: req.amount.currency().code().to_string(),
            decided_at: now.unix_timestamp(),
            fingerprint_version: keys.current_version(),
            ..Default::default()
        };
        let (Some(mut rec), Some(id), Presented::Pan(pan)) = (card_rec, card_id, &req.pan) else {
            txn.reason = ResponseCode::UnknownCard.reason().to_string();
            let outcome = AuthorizeOutcome {
                code: ResponseCode::UnknownCard,
                card_id: None,
                authorization_id: None,
                funding_pan: None,
                remaining: None,
                replayed: false,
            };
            return Ok((
                outcome,
                vec![Write::Put(
                    txn_key(&req.transaction_id),
                    prost::Message::encode_to_vec(&txn),
                )],
            ));
        };

        let mut card = rec.card()?;
        // The owner came from the number index (or the card, read before
        // the lock): events numbered under another owner's locked sequence
        // would collide, so a record that disagrees is refused.
        if owner != Some(&card.owner) {
            return Err(VaultError::Internal(format!(
                "the number index entry of card {id} names another owner than the card"
            )));
        }
        let cvv_ok = match keys.verify_cvv(
            version_or_1(rec.cvv_key_version),
            pan,
            card.expiry,
            &req.cvv,
        ) {
            Ok(ok) => ok,
            // The CVV key of a card that can no longer approve (final or
            // expired) may be retired: its state or expiry declines it.
            Err(_) if card.state.is_final() || now > card.policy.valid_until => true,
            Err(e) => return Err(crypto_error(id.as_str())(e)),
        };
        let attempt = Attempt {
            expiry: req.expiry,
            cvv_ok,
            amount: req.amount,
            merchant_id: req.merchant_id.as_ref(),
            mcc: req.mcc,
        };
        let before = card.clone();
        let code = decision::authorize(
            &mut card,
            &attempt,
            now,
            self.config.max_failed_verifications,
        );
        // Open the funding number before approving: a record that cannot
        // be opened is an error, never an approval without a number.
        let funding_pan = if code.is_approved() {
            Some(funding(&rec)?)
        } else {
            None
        };
        let remaining = card.remaining();
        let mut events = vec![{
            let mut e = EventRecord::of(EventKind::Authorized, &card, now).with_amount(req.amount);
            e.transaction_id = req.transaction_id.clone();
            e.approved = code.is_approved();
            e.response_code = code.code().to_string();
            e.reason = code.reason().to_string();
            e.merchant_id = req
                .merchant_id
                .as_ref()
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            e.mcc = req.mcc.map(|m| m.to_string()).unwrap_or_default();
            e
        }];
        if card.state != before.state {
            match card.state {
                CardState::Blocked => events.push(EventRecord::of(EventKind::Blocked, &card, now)),
                CardState::Used => events.push(EventRecord::of(EventKind::Used, &card, now)),
                _ => {}
            }
        }
        let announce_expiry = code == ResponseCode::Expired && !rec.expiry_announced;
        if announce_expiry {
            events.push(EventRecord::of(EventKind::Expired, &card, now));
        }
        txn.card_id = id.as_str().to_string();
        txn.reason = code.reason().to_string();
        txn.remaining = Some(remaining.amount_minor());
        if code.is_approved() {
            txn.authorization_id = authorization_id.to_string();
        }
        let mut writes = vec![Write::Put(
            txn_key(&req.transaction_id),
            prost::Message::encode_to_vec(&txn),
        )];
        if card != before || announce_expiry {
            rec.set_card(&card);
            rec.expiry_announced |= announce_expiry;
            writes.push(Write::Put(
                card_key(id),
                prost::Message::encode_to_vec(&rec),
            ));
        }
        writes.extend(append_events(
            &card.owner,
            v.get(2).and_then(|s| s.as_deref()),
            events,
        )?);
        Ok((
            AuthorizeOutcome {
                code,
                card_id: Some(id.clone()),
                authorization_id: code.is_approved().then(|| authorization_id.to_string()),
                funding_pan,
                remaining: Some(remaining),
                replayed: false,
            },
            writes,
        ))
    }

    /// Undoes all or part of an approved authorisation.
    pub async fn reverse(
        &self,
        req: &ReverseRequest,
        actor: &Actor,
    ) -> Result<ReverseOutcome, VaultError> {
        let result = self.reverse_txn(req, actor).await;
        if let Err(e) = &result {
            let event =
                Event::new("reverse", "").detail(format!("transaction_id={}", req.transaction_id));
            self.record_error(actor, event, e).await;
        }
        result
    }

    async fn reverse_txn(
        &self,
        req: &ReverseRequest,
        actor: &Actor,
    ) -> Result<ReverseOutcome, VaultError> {
        let tkey = txn_key(&req.transaction_id);
        let txn: TxnRecord = match self.store.get(&tkey).await? {
            Some(b) => decode("transaction", &b)?,
            None => {
                return Err(VaultError::NotFound(format!(
                    "authorisation with transaction_id {}",
                    req.transaction_id
                )))
            }
        };
        let keys = self.keys();
        let reverse_fingerprint = |version: u32| {
            keys.fingerprint(
                version,
                &[
                    b"reverse",
                    req.transaction_id.as_bytes(),
                    req.amount
                        .map(|m| format!("{}{}", m.amount_minor(), m.currency()))
                        .unwrap_or_default()
                        .as_bytes(),
                ],
            )
            .map_err(|e| VaultError::Internal(e.to_string()))
        };
        let fingerprint = reverse_fingerprint(keys.current_version())?;
        let card_id = CardId::parse("card_id", &txn.card_id).ok();
        let mut store_keys = vec![tkey.clone()];
        store_keys.push(
            card_id
                .as_ref()
                .map(card_key)
                .unwrap_or_else(|| tkey.clone()),
        );
        let rkey = req.reversal_id.as_deref().map(reversal_key);
        store_keys.extend(rkey.clone());
        let owner = match &card_id {
            Some(id) => Some(self.load(id).await?.card()?.owner),
            None => None,
        };
        let seq_at = store_keys.len();
        store_keys.extend(owner.as_ref().map(event_seq_key));
        let now = self.now();
        let mut published = false;

        let mut result: Result<ReverseOutcome, VaultError> =
            Err(VaultError::Internal("no decision made".into()));
        self.store
            .update(&store_keys, &mut |v| {
                published = false;
                let mut step = || -> Result<(ReverseOutcome, Vec<Write>), VaultError> {
                    if let (Some(Some(prev)), Some(_)) = (v.get(2), &rkey) {
                        let r: ReversalRecord = decode("reversal", prev)?;
                        let stored_version = version_or_1(r.fingerprint_version);
                        let same = if stored_version == keys.current_version() {
                            r.fingerprint == fingerprint
                        } else {
                            reverse_fingerprint(stored_version).ok() == Some(r.fingerprint.clone())
                        };
                        if !same {
                            return Ok((
                                ReverseOutcome {
                                    reversed: false,
                                    response_code: "94",
                                    remaining: None,
                                },
                                vec![],
                            ));
                        }
                        let currency = crate::domain::Currency::parse(&r.currency).ok();
                        return Ok((
                            ReverseOutcome {
                                reversed: r.reversed,
                                response_code: static_code(&r.response_code),
                                remaining: r.remaining.zip(currency).map(|(n, c)| Money::new(n, c)),
                            },
                            vec![],
                        ));
                    }
                    let mut txn: TxnRecord = decode(
                        "transaction",
                        v[0].as_deref()
                            .ok_or_else(|| VaultError::Internal("transaction vanished".into()))?,
                    )?;
                    let (Some(id), Some(Some(card_bytes))) = (&card_id, v.get(1)) else {
                        return Ok((
                            ReverseOutcome {
                                reversed: false,
                                response_code: "12",
                                remaining: None,
                            },
                            vec![],
                        ));
                    };
                    let mut rec: CardRecord = decode("card", card_bytes)?;
                    let mut card = rec.card()?;
                    let answer = |reversed: bool, code: &'static str, card: &Card| ReverseOutcome {
                        reversed,
                        response_code: code,
                        remaining: Some(card.remaining()),
                    };
                    let approved = txn.reason == ResponseCode::Approved.reason();
                    let left = txn.amount - txn.reversed;
                    let mut changed = false;
                    let outcome = if !approved {
                        answer(false, "12", &card)
                    } else {
                        let currency = card.policy.spend_limit.currency();
                        let amount = req.amount.unwrap_or(Money::new(left, currency));
                        if req.amount.is_none() && left == 0 {
                            // A full reversal retried: already done.
                            answer(true, "00", &card)
                        } else if amount.currency() != currency
                            || amount.amount_minor() <= 0
                            || amount.amount_minor() > left
                        {
                            answer(false, "13", &card)
                        } else {
                            decision::reverse(&mut card, amount);
                            txn.reversed += amount.amount_minor();
                            changed = true;
                            answer(true, "00", &card)
                        }
                    };
                    let mut writes = vec![];
                    if changed {
                        rec.set_card(&card);
                        writes.push(Write::Put(
                            card_key(id),
                            prost::Message::encode_to_vec(&rec),
                        ));
                        writes.push(Write::Put(
                            tkey.clone(),
                            prost::Message::encode_to_vec(&txn),
                        ));
                        let mut event = EventRecord::of(EventKind::Reversed, &card, now)
                            .with_amount(Money::new(
                                txn.reversed - (txn.amount - left),
                                card.policy.spend_limit.currency(),
                            ));
                        event.transaction_id = req.transaction_id.clone();
                        writes.extend(append_events(
                            &card.owner,
                            v.get(seq_at).and_then(|s| s.as_deref()),
                            vec![event],
                        )?);
                        published = true;
                    }
                    if let Some(k) = &rkey {
                        let r = ReversalRecord {
                            fingerprint: fingerprint.clone(),
                            reversed: outcome.reversed,
                            response_code: outcome.response_code.to_string(),
                            remaining: outcome.remaining.map(Money::amount_minor),
                            currency: card.policy.spend_limit.currency().code().to_string(),
                            fingerprint_version: keys.current_version(),
                            decided_at: now.unix_timestamp(),
                        };
                        writes.push(Write::Put(k.clone(), prost::Message::encode_to_vec(&r)));
                    }
                    Ok((outcome, writes))
                };
                match step() {
                    Ok((o, mut w)) => {
                        let event = Event::new(
                            "reverse",
                            format!(
                                "{} {}",
                                o.response_code,
                                if o.reversed {
                                    "reversed"
                                } else {
                                    "not reversed"
                                }
                            ),
                        )
                        .card(&txn.card_id)
                        .detail(format!(
                            "transaction_id={} amount={}",
                            req.transaction_id,
                            req.amount
                                .map(|m| m.to_string())
                                .unwrap_or_else(|| "all".into())
                        ));
                        w.push(self.audit.write(actor, &event));
                        result = Ok(o);
                        w
                    }
                    Err(e) => {
                        result = Err(e);
                        vec![]
                    }
                }
            })
            .await?;
        if let (true, Some(owner), Ok(_)) = (published, &owner, &result) {
            self.events.published(owner);
        }
        if let Ok(o) = &result {
            tracing::info!(transaction_id = %req.transaction_id, code = o.response_code, reversed = o.reversed, "reversal decided");
        }
        result
    }

    /// The funding card of any number this vault issued, in any state. The
    /// audit entry is durable before the number is returned.
    pub async fn detokenize(&self, pan: &Pan, actor: &Actor) -> Result<Detokenized, VaultError> {
        let event = Event::new("detokenize", "ok").pan(pan.masked());
        match self.detokenize_pan(pan).await {
            Ok(d) => {
                self.record(actor, &event.card(d.card_id.as_str())).await?;
                Ok(d)
            }
            Err(e) => {
                self.record_error(actor, event, &e).await;
                Err(e)
            }
        }
    }

    async fn detokenize_pan(&self, pan: &Pan) -> Result<Detokenized, VaultError> {
        let not_found = || VaultError::NotFound(format!("card number {}", pan.masked()));
        let id = self.find_card(pan).await?.ok_or_else(not_found)?.id;
        let rec = self.load(&id).await?;
        let card = rec.card()?;
        let funding_pan = self
            .keys()
            .open_funding(id.as_str(), &rec.sealed()?)
            .map_err(crypto_error(id.as_str()))?;
        tracing::info!(card_id = %id, pan = %pan.masked(), "number detokenised");
        Ok(Detokenized {
            funding_pan,
            card_id: id,
            state: card.state,
        })
    }

    /// Streams `owner`'s events after sequence number `after` (0: from the
    /// first), then new ones as they happen, until the receiver is dropped.
    pub fn watch(&self, owner: Owner, after: u64) -> tokio::sync::mpsc::Receiver<Delivered> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(events::watch(
            self.store.clone(),
            self.events.clone(),
            owner,
            after,
            tx,
        ));
        rx
    }

    /// Wakes and ends watchers; see [`EventHub`].
    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// How many cards are in each state (a full scan of the cards: for
    /// metrics, now and then, never on a request path).
    pub async fn count_cards_by_state(&self) -> Result<Vec<(CardState, u64)>, VaultError> {
        let states = [
            CardState::Active,
            CardState::Paused,
            CardState::Blocked,
            CardState::Used,
            CardState::Closed,
        ];
        let mut counts = [0u64; 5];
        let prefix = b"c/".to_vec();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(&prefix, after.as_deref(), 1000).await?;
            for (_, value) in &page {
                let rec: CardRecord = decode("card", value)?;
                if let Some(n) = rec
                    .state
                    .checked_sub(1)
                    .and_then(|i| counts.get_mut(i as usize))
                {
                    *n += 1;
                }
            }
            match page.last() {
                Some((k, _)) if page.len() == 1000 => after = Some(k.clone()),
                _ => break,
            }
        }
        Ok(states.into_iter().zip(counts).collect())
    }

    /// The storage engine's size, when it can tell.
    pub async fn size_bytes(&self) -> Result<Option<u64>, VaultError> {
        Ok(self.store.size_bytes().await?)
    }

    /// The engine's memory outside its block cache, when it can say.
    pub fn engine_memory(&self) -> Option<store::EngineMemory> {
        self.store.memory()
    }

    /// Whether the storage engine can serve now (the health check).
    pub async fn ping(&self) -> Result<(), VaultError> {
        Ok(self.store.ping().await?)
    }

    /// Writes a consistent backup of the whole vault to `path`.
    pub async fn backup_to(
        &self,
        path: &std::path::Path,
    ) -> Result<u64, crate::backup::BackupError> {
        crate::backup::write(self.store.as_ref(), path).await
    }

    /// Makes everything written so far durable (used at shutdown).
    pub async fn sync(&self) -> Result<(), VaultError> {
        Ok(self.store.sync().await?)
    }
}

/// Inside an update's decision: keeps its outcome in `result` (read once
/// the update returns) and hands the store the writes, none on an error.
fn outcome_writes<T>(
    result: &mut Result<T, VaultError>,
    step: Result<(T, Vec<Write>), VaultError>,
) -> Vec<Write> {
    match step {
        Ok((outcome, writes)) => {
            *result = Ok(outcome);
            writes
        }
        Err(e) => {
            *result = Err(e);
            vec![]
        }
    }
}

/// Checks every version of `keys` against the check value the vault
/// recorded for it (recording it the first time), and that every version
/// the vault recorded and did not retire is loaded.
async fn check_keys(store: &dyn Store, keys: &Keyring) -> Result<(), VaultError> {
    for v in keys.versions() {
        let key = kcv_key(v);
        let ours = keys.check_value(v).unwrap_or_default().as_bytes().to_vec();
        let mut stored = None;
        store
            .update(std::slice::from_ref(&key), &mut |vals| {
                stored = vals[0].clone();
                match &vals[0] {
                    Some(_) => vec![],
                    None => vec![Write::Put(key.clone(), ours.clone())],
                }
            })
            .await?;
        if let Some(s) = stored.filter(|s| *s != ours) {
            let which = if v == 1 {
                "the master key".to_string()
            } else {
                format!("the master key of version {v}")
            };
            return Err(VaultError::FailedPrecondition(format!(
                "{which} (check value {}) is not the one this vault was written with (check value {}): start with the right keys directory",
                keys.check_value(v).unwrap_or_default(),
                String::from_utf8_lossy(&s)
            )));
        }
    }
    let loaded: Vec<u32> = keys.versions().collect();
    for v in recorded_versions(store).await? {
        if !loaded.contains(&v) {
            return Err(VaultError::FailedPrecondition(format!(
                "key version {v} holds data in this vault but is not in the keys directory (it was never retired with `vcn keys retire {v}`): restore its key file or components"
            )));
        }
    }
    Ok(())
}

/// The key versions whose check value the vault holds (not retired).
/// Whether `store` holds a vault: a key check value of any version is
/// recorded (version 1's is gone once that version is retired).
pub async fn store_has_vault(store: &dyn Store) -> Result<bool, VaultError> {
    Ok(!recorded_versions(store).await?.is_empty())
}

async fn recorded_versions(store: &dyn Store) -> Result<Vec<u32>, VaultError> {
    let mut out = vec![];
    if store.get(KEY_CHECK_VALUE).await?.is_some() {
        out.push(1);
    }
    for (k, _) in store.scan(KCV_PREFIX, None, 10_000).await? {
        if let Ok(b) = <[u8; 4]>::try_from(&k[KCV_PREFIX.len()..]) {
            out.push(u32::from_be_bytes(b));
        }
    }
    Ok(out)
}

/// Key rotation: what needs which version, moving records to the current
/// version, and retiring a version nothing needs any more.
impl Vault {
    /// Calls `each` for every stored entry under `prefix`, page by page.
    async fn for_each(
        &self,
        prefix: &[u8],
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), VaultError>,
    ) -> Result<(), VaultError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(prefix, after.as_deref(), 512).await?;
            for (k, v) in &page {
                each(k, v)?;
            }
            match page.last() {
                Some((k, _)) if page.len() == 512 => after = Some(k.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// For every loaded or recorded key version, what still needs it.
    pub async fn key_usage(&self) -> Result<Vec<KeyUsage>, VaultError> {
        let keys = self.keys();
        let mut versions: Vec<u32> = keys.versions().collect();
        for v in recorded_versions(self.store.as_ref()).await? {
            if !versions.contains(&v) {
                versions.push(v);
            }
        }
        versions.sort_unstable();
        let mut usage: Vec<KeyUsage> = versions
            .iter()
            .map(|&version| KeyUsage {
                version,
                ..KeyUsage::default()
            })
            .collect();
        let now = self.now().unix_timestamp();
        self.for_each(CARD_PREFIX, |_, bytes| {
            let rec: CardRecord = decode("card", bytes)?;
            let sealed = rec.sealed.as_ref().map(|s| version_or_1(s.key_version));
            let live = !matches!(rec.state, 4 | 5) && rec.valid_until >= now;
            for u in usage.iter_mut() {
                if sealed == Some(u.version) {
                    u.sealed += 1;
                }
                if live && version_or_1(rec.cvv_key_version) == u.version {
                    u.live_cvv += 1;
                }
            }
            Ok(())
        })
        .await?;
        for u in usage.iter_mut() {
            let (mut p, mut f) = (0, 0);
            self.for_each(&pan_prefix(u.version), |_, _| {
                p += 1;
                Ok(())
            })
            .await?;
            self.for_each(&funding_prefix(u.version), |_, _| {
                f += 1;
                Ok(())
            })
            .await?;
            (u.pan_index, u.funding_index) = (p, f);
        }
        Ok(usage)
    }

    /// Moves one card to the current key version: its data key re-wrapped
    /// under the current KEK, its number and funding index entries re-made
    /// under the current index key (the old ones removed), in one update,
    /// so lookups find it at every moment. Its CVV key version is kept (the
    /// CVV is printed on the card). Returns whether anything changed.
    async fn reencrypt_card(&self, keys: &Keyring, id: &CardId) -> Result<bool, VaultError> {
        let current = keys.current_version();
        let crypto = crypto_error(id.as_str());
        let rec = self.load(id).await?;
        let sealed = rec.sealed()?;
        let token = keys.open_token(id.as_str(), &sealed).map_err(&crypto)?;
        let funding = keys.open_funding(id.as_str(), &sealed).map_err(&crypto)?;
        let index = |v: u32| -> Result<(Vec<u8>, Vec<u8>), VaultError> {
            Ok((
                pan_key(v, &keys.pan_index(v, &token).map_err(&crypto)?),
                funding_key(v, &keys.pan_index(v, &funding).map_err(&crypto)?),
            ))
        };
        let (new_p, new_f) = index(current)?;
        let mut names = vec![card_key(id), new_p.clone(), new_f.clone()];
        for v in keys.versions().filter(|&v| v != current) {
            let (p, f) = index(v)?;
            names.push(p);
            names.push(f);
        }
        let id_bytes = id.as_str().as_bytes();
        let mut result: Result<bool, VaultError> = Ok(false);
        self.store
            .update(&names, &mut |vals| {
                let step = || -> Result<Vec<Write>, VaultError> {
                    let Some(bytes) = &vals[0] else {
                        return Ok(vec![]);
                    };
                    let mut rec: CardRecord = decode("card", bytes)?;
                    let sealed = rec.sealed()?;
                    let mut writes = vec![];
                    if sealed.key_version != current {
                        let moved = keys.rewrap(id.as_str(), &sealed).map_err(&crypto)?;
                        rec.sealed = Some(records::SealedRecord {
                            key_version: moved.key_version,
                            wrapped_dek: moved.wrapped_dek,
                            funding_pan: moved.funding_pan,
                            token_pan: moved.token_pan,
                        });
                        writes.push(Write::Put(
                            names[0].clone(),
                            prost::Message::encode_to_vec(&rec),
                        ));
                    }
                    let mut old_p = false;
                    let mut old_f = false;
                    for (i, pair) in vals[3..].chunks(2).enumerate() {
                        // This card's entry, with or without its owner.
                        let ours = pair[0]
                            .as_deref()
                            .is_some_and(|v| parse_index_value(v).0 == id_bytes);
                        if ours {
                            writes.push(Write::Delete(names[3 + 2 * i].clone()));
                            old_p = true;
                        }
                        if pair.get(1).is_some_and(Option::is_some) {
                            writes.push(Write::Delete(names[4 + 2 * i].clone()));
                            old_f = true;
                        }
                    }
                    if old_p || vals[1].is_none() {
                        writes.push(Write::Put(new_p.clone(), index_value(id, &rec.owner()?)));
                    }
                    if old_f || vals[2].is_none() {
                        writes.push(Write::Put(new_f.clone(), vec![]));
                    }
                    Ok(writes)
                };
                match step() {
                    Ok(w) => {
                        result = Ok(!w.is_empty());
                        w
                    }
                    Err(e) => {
                        result = Err(e);
                        vec![]
                    }
                }
            })
            .await?;
        result
    }

    /// Moves every card to the current key version, while the service
    /// serves (each card in its own short update). Cards that fail to move
    /// are logged by id and counted as an error at the end.
    pub async fn reencrypt_all(&self) -> Result<Reencrypted, VaultError> {
        let keys = self.keys();
        let mut done = Reencrypted::default();
        let mut failed = 0u64;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.scan(CARD_PREFIX, after.as_deref(), 256).await?;
            for (k, _) in &page {
                let Some(id) = std::str::from_utf8(&k[CARD_PREFIX.len()..])
                    .ok()
                    .and_then(|s| CardId::parse("card_id", s).ok())
                else {
                    failed += 1;
                    continue;
                };
                done.cards += 1;
                match self.reencrypt_card(&keys, &id).await {
                    Ok(true) => done.moved += 1,
                    Ok(false) => {}
                    Err(e) => {
                        failed += 1;
                        tracing::error!(card_id = %id, error = %e, "card could not be re-encrypted");
                    }
                }
            }
            match page.last() {
                Some((k, _)) if page.len() == 256 => after = Some(k.clone()),
                _ => break,
            }
        }
        tracing::info!(
            cards = done.cards,
            moved = done.moved,
            failed,
            version = keys.current_version(),
            "re-encryption pass done"
        );
        let outcome = if failed > 0 { "error" } else { "ok" };
        self.record(
            &Actor::system("vcn"),
            &Event::new("key_reencrypt", outcome).detail(format!(
                "version={} cards={} moved={} failed={failed}",
                keys.current_version(),
                done.cards,
                done.moved
            )),
        )
        .await?;
        if failed > 0 {
            return Err(VaultError::Internal(format!(
                "{failed} cards could not be re-encrypted (see the log); the old key version is still needed"
            )));
        }
        Ok(done)
    }

    /// Forgets key `version` in the vault: refused while the current
    /// version, or while any record still needs it (saying how many).
    /// After this the vault starts without that version's key.
    pub async fn retire_version(&self, version: u32) -> Result<(), VaultError> {
        let keys = self.keys();
        if version == keys.current_version() {
            return Err(VaultError::FailedPrecondition(format!(
                "key version {version} is the current one: rotate first (`vcn keys rotate`)"
            )));
        }
        let usage = self
            .key_usage()
            .await?
            .into_iter()
            .find(|u| u.version == version)
            .ok_or_else(|| VaultError::NotFound(format!("key version {version}")))?;
        if usage.total() > 0 {
            return Err(VaultError::FailedPrecondition(format!(
                "key version {version} is still needed by {} records ({} cards sealed under it, {} number and {} funding index entries, {} live cards whose CVV derives from it): run `vcn keys reencrypt`, and wait for those cards to end, before retiring it",
                usage.total(),
                usage.sealed,
                usage.pan_index,
                usage.funding_index,
                usage.live_cvv
            )));
        }
        let key = kcv_key(version);
        let audit = self.audit.write(
            &Actor::system("vcn keys retire"),
            &Event::new("key_retire", "ok").detail(format!("version={version}")),
        );
        self.store
            .update(std::slice::from_ref(&key), &mut |_| {
                vec![Write::Delete(key.clone()), audit.clone()]
            })
            .await?;
        tracing::info!(version, "key version retired");
        Ok(())
    }
}

/// The audit entry of an authorisation.
fn authorize_event(
    req: &AuthorizeRequest,
    outcome: Result<&AuthorizeOutcome, &VaultError>,
) -> Event {
    let detail = format!(
        "transaction_id={} amount={} merchant={} mcc={}",
        req.transaction_id,
        req.amount,
        req.merchant_id
            .as_ref()
            .map(MerchantId::as_str)
            .unwrap_or("-"),
        req.mcc.as_ref().map(Mcc::as_str).unwrap_or("-"),
    );
    let event = Event::new("authorize", "")
        .pan(req.pan.masked())
        .detail(detail);
    match outcome {
        Ok(o) => {
            let verdict = if o.code.is_approved() {
                "approved"
            } else {
                "declined"
            };
            let replay = if o.replayed { " (retry)" } else { "" };
            Event {
                outcome: format!("{verdict} {} {}{replay}", o.code.code(), o.code.reason()),
                ..event
            }
            .card(o.card_id.as_ref().map(CardId::as_str).unwrap_or(""))
        }
        Err(e) => Event {
            outcome: format!("error: {e}"),
            ..event
        },
    }
}

fn static_code(code: &str) -> &'static str {
    ["00", "12", "13", "94"]
        .into_iter()
        .find(|c| *c == code)
        .unwrap_or("12")
}

#[cfg(test)]
mod tests;
