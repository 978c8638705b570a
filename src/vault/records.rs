//! What the vault stores, and under which keys.
//!
//! Records are protobuf messages (prost), so fields can be added later
//! without a migration. Keys are prefixed by kind:
//!
//! | key | value |
//! |---|---|
//! | `c/` card id | [`CardRecord`] (numbers sealed) |
//! | `p/` index version, HMAC(virtual number) | [`index_value`]: card id, 0, owner (older entries: card id) |
//! | `f/` index version, HMAC(funding number) | empty: a number known as a real card |
//! | `t/` transaction id | [`TxnRecord`] |
//! | `r/` reversal id | [`ReversalRecord`] |
//! | `o/` owner, 0, newest-first time, card id | empty: the owner's list |
//! | `i/` owner, 0, idempotency key | [`IdempotencyRecord`] |
//! | `m/` name | vault metadata (key check values per version) |
//! | `e/` owner, 0, sequence (u64 BE) | [`EventRecord`]: the owner's events |
//! | `n/` owner | the owner's last event sequence (u64 BE) |

use prost::Message;
use time::OffsetDateTime;

use crate::domain::card::{CardId, CardPolicy, CardState, Expiry};
use crate::domain::{Card, Currency, Mcc, MerchantId, Money, Owner};
use crate::vault::crypto::Sealed;
use crate::vault::{VaultError, Write};

pub fn card_key(id: &CardId) -> Vec<u8> {
    [b"c/", id.as_str().as_bytes()].concat()
}

pub fn pan_key(version: u32, hmac: &[u8; 32]) -> Vec<u8> {
    [&b"p/"[..], &version.to_be_bytes(), hmac].concat()
}

/// Ends the card id in a number index value, before the owner. A card id
/// is `vc_` and hex digits and an owner has no control characters
/// ([`crate::domain::text::parse_ident`]), so neither can hold it (the
/// owner-keyed entries end the owner with the same byte).
pub const INDEX_SEPARATOR: u8 = 0;

/// The value of a card's number index entry (`p/`): its id, then
/// [`INDEX_SEPARATOR`] and its owner, which never changes, so that an
/// authorisation knows whose event sequence to lock without reading the
/// card first. Entries written before the owner was added hold the id
/// alone; [`parse_index_value`] reads both.
pub fn index_value(id: &CardId, owner: &Owner) -> Vec<u8> {
    [
        id.as_str().as_bytes(),
        &[INDEX_SEPARATOR],
        owner.as_str().as_bytes(),
    ]
    .concat()
}

/// The card id and, when the entry holds one, the owner of a number index
/// value, as stored bytes (unchecked: the caller parses them). An entry of
/// the id alone (written before [`index_value`] added the owner) has no
/// owner. A purge tombstone is not a card's entry: check
/// [`crate::vault::purge::tombstone_until`] first (its id part is never a
/// card id, so comparing it with one is safe).
pub fn parse_index_value(value: &[u8]) -> (&[u8], Option<&[u8]>) {
    match value.iter().position(|&b| b == INDEX_SEPARATOR) {
        Some(at) => (&value[..at], Some(&value[at + 1..])),
        None => (value, None),
    }
}

pub fn funding_key(version: u32, hmac: &[u8; 32]) -> Vec<u8> {
    [&b"f/"[..], &version.to_be_bytes(), hmac].concat()
}

pub fn txn_key(transaction_id: &str) -> Vec<u8> {
    [b"t/", transaction_id.as_bytes()].concat()
}

pub fn reversal_key(reversal_id: &str) -> Vec<u8> {
    [b"r/", reversal_id.as_bytes()].concat()
}

/// The prefix of one owner's list entries.
pub fn owner_prefix(owner: &Owner) -> Vec<u8> {
    [b"o/", owner.as_str().as_bytes(), b"\0"].concat()
}

/// Owner list entry: newest first, then by id.
pub fn owner_key(owner: &Owner, created_at: OffsetDateTime, id: &CardId) -> Vec<u8> {
    let newest_first = u64::MAX - created_at.unix_timestamp().max(0) as u64;
    [
        owner_prefix(owner),
        newest_first.to_be_bytes().to_vec(),
        id.as_str().as_bytes().to_vec(),
    ]
    .concat()
}

pub fn idempotency_key(owner: &Owner, key: &str) -> Vec<u8> {
    [b"i/", owner.as_str().as_bytes(), b"\0", key.as_bytes()].concat()
}

/// The prefix of one owner's events.
pub fn event_prefix(owner: &Owner) -> Vec<u8> {
    [b"e/", owner.as_str().as_bytes(), b"\0"].concat()
}

/// One event of an owner: its sequence number, big-endian, so key order is
/// event order.
pub fn event_key(owner: &Owner, seq: u64) -> Vec<u8> {
    [event_prefix(owner), seq.to_be_bytes().to_vec()].concat()
}

/// The sequence number of an event key under `prefix`.
pub fn event_seq(prefix: &[u8], key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(prefix)?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// The highest sequence number of an owner's events that the retention
/// pass deleted: a watcher behind it resumes after it, not at a gap.
pub fn event_floor_key(owner: &Owner) -> Vec<u8> {
    [b"x/", owner.as_str().as_bytes()].concat()
}

/// The owner and sequence number of any event key (`e/owner\0seq`).
pub fn event_owner_seq(key: &[u8]) -> Option<(&[u8], u64)> {
    let rest = key.strip_prefix(b"e/")?;
    let (owner, seq) = rest.split_at(rest.len().checked_sub(9)?);
    let seq = seq.strip_prefix(b"\0")?;
    Some((owner, u64::from_be_bytes(seq.try_into().ok()?)))
}

/// The last sequence number given to an owner's events. Every update that
/// records an event names this key, so one owner's events are numbered
/// one at a time, in commit order, with no gaps.
pub fn event_seq_key(owner: &Owner) -> Vec<u8> {
    [b"n/", owner.as_str().as_bytes()].concat()
}

/// The check value of key version 1 (the name predates rotation).
pub const KEY_CHECK_VALUE: &[u8] = b"m/key-check-value";
/// The prefix of the check values of key versions 2 and up.
pub const KCV_PREFIX: &[u8] = b"m/kcv/";

/// Where the check value of key `version` is recorded.
pub fn kcv_key(version: u32) -> Vec<u8> {
    if version == 1 {
        KEY_CHECK_VALUE.to_vec()
    } else {
        [KCV_PREFIX, &version.to_be_bytes()[..]].concat()
    }
}

/// The prefix of the number index entries of one key version.
pub fn pan_prefix(version: u32) -> Vec<u8> {
    [&b"p/"[..], &version.to_be_bytes()].concat()
}

/// The prefix of the funding index entries of one key version.
pub fn funding_prefix(version: u32) -> Vec<u8> {
    [&b"f/"[..], &version.to_be_bytes()].concat()
}

pub const CARD_PREFIX: &[u8] = b"c/";

#[derive(Clone, PartialEq, Message)]
pub struct SealedRecord {
    #[prost(uint32, tag = "1")]
    pub key_version: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub wrapped_dek: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub funding_pan: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub token_pan: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CardRecord {
    #[prost(string, tag = "1")]
    pub card_id: String,
    #[prost(string, tag = "2")]
    pub owner: String,
    #[prost(string, tag = "3")]
    pub masked_pan: String,
    #[prost(string, tag = "4")]
    pub last4: String,
    /// 1 active, 2 paused, 3 blocked, 4 used, 5 closed.
    #[prost(uint32, tag = "5")]
    pub state: u32,
    #[prost(string, tag = "6")]
    pub currency: String,
    #[prost(int64, tag = "7")]
    pub spend_limit: i64,
    #[prost(int64, tag = "8")]
    pub spent: i64,
    #[prost(int64, optional, tag = "9")]
    pub per_transaction_limit: Option<i64>,
    #[prost(uint32, tag = "10")]
    pub max_uses: u32,
    #[prost(uint32, tag = "11")]
    pub uses: u32,
    #[prost(int64, tag = "12")]
    pub valid_until: i64,
    #[prost(string, tag = "13")]
    pub merchant_id: String,
    #[prost(bool, tag = "14")]
    pub lock_to_first_merchant: bool,
    #[prost(string, repeated, tag = "15")]
    pub allowed_mccs: Vec<String>,
    #[prost(string, repeated, tag = "16")]
    pub blocked_mccs: Vec<String>,
    #[prost(int64, tag = "17")]
    pub created_at: i64,
    #[prost(uint32, tag = "18")]
    pub failed_verifications: u32,
    #[prost(uint32, tag = "19")]
    pub expiry_month: u32,
    #[prost(uint32, tag = "20")]
    pub expiry_year: u32,
    #[prost(message, optional, tag = "21")]
    pub sealed: Option<SealedRecord>,
    /// Whether the EXPIRED event was recorded (once per card).
    #[prost(bool, tag = "22")]
    pub expiry_announced: bool,
    /// When a closed or used card was first seen ended (Unix seconds; 0:
    /// not yet): the retention pass purges it `retention` later.
    #[prost(int64, tag = "23")]
    pub ended_at: i64,
    /// The key version whose CVV key derives this card's CVV (0: version
    /// 1, records written before rotation existed).
    #[prost(uint32, tag = "24")]
    pub cvv_key_version: u32,
}

/// What an [`EventRecord`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Issued = 1,
    Authorized = 2,
    Reversed = 3,
    Paused = 4,
    Resumed = 5,
    Blocked = 6,
    Used = 7,
    Closed = 8,
    Expired = 9,
    LimitsChanged = 10,
}

impl EventKind {
    pub const ALL: [EventKind; 10] = [
        EventKind::Issued,
        EventKind::Authorized,
        EventKind::Reversed,
        EventKind::Paused,
        EventKind::Resumed,
        EventKind::Blocked,
        EventKind::Used,
        EventKind::Closed,
        EventKind::Expired,
        EventKind::LimitsChanged,
    ];

    pub fn from_code(code: u32) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| *k as u32 == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Issued => "issued",
            EventKind::Authorized => "authorized",
            EventKind::Reversed => "reversed",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Blocked => "blocked",
            EventKind::Used => "used",
            EventKind::Closed => "closed",
            EventKind::Expired => "expired",
            EventKind::LimitsChanged => "limits_changed",
        }
    }
}

/// Something that happened to a card, stored in the same write as the
/// change itself. Never a full card number.
#[derive(Clone, PartialEq, Message)]
pub struct EventRecord {
    /// [`EventKind`] as a number.
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    #[prost(string, tag = "2")]
    pub card_id: String,
    #[prost(string, tag = "3")]
    pub owner: String,
    #[prost(int64, tag = "4")]
    pub occurred_at: i64,
    #[prost(string, tag = "5")]
    pub masked_pan: String,
    /// The card's state after the event (as in [`CardRecord::state`]).
    #[prost(uint32, tag = "6")]
    pub state: u32,
    #[prost(string, tag = "7")]
    pub currency: String,
    #[prost(int64, tag = "8")]
    pub remaining: i64,
    /// The amount asked (authorisations) or given back (reversals), in
    /// `amount_currency`.
    #[prost(int64, optional, tag = "9")]
    pub amount: Option<i64>,
    #[prost(string, tag = "10")]
    pub amount_currency: String,
    #[prost(string, tag = "11")]
    pub transaction_id: String,
    #[prost(bool, tag = "12")]
    pub approved: bool,
    #[prost(string, tag = "13")]
    pub response_code: String,
    #[prost(string, tag = "14")]
    pub reason: String,
    #[prost(string, tag = "15")]
    pub merchant_id: String,
    #[prost(string, tag = "16")]
    pub mcc: String,
}

impl EventRecord {
    /// An event of `kind` about `card` (as it is after the change).
    pub fn of(kind: EventKind, card: &Card, at: OffsetDateTime) -> EventRecord {
        EventRecord {
            kind: kind as u32,
            card_id: card.id.as_str().to_string(),
            owner: card.owner.as_str().to_string(),
            occurred_at: at.unix_timestamp(),
            masked_pan: card.masked_pan.clone(),
            state: state_code(card.state),
            currency: card.spent.currency().code().to_string(),
            remaining: card.remaining().amount_minor(),
            ..Default::default()
        }
    }

    pub fn with_amount(mut self, amount: Money) -> EventRecord {
        self.amount = Some(amount.amount_minor());
        self.amount_currency = amount.currency().code().to_string();
        self
    }

    pub fn kind(&self) -> Option<EventKind> {
        EventKind::from_code(self.kind)
    }
}

/// The writes that append `events` to `owner`'s events, given the current
/// value of [`event_seq_key`] (which the update must have named).
pub fn append_events(
    owner: &Owner,
    seq_value: Option<&[u8]>,
    events: Vec<EventRecord>,
) -> Result<Vec<Write>, VaultError> {
    if events.is_empty() {
        return Ok(vec![]);
    }
    let mut seq =
        match seq_value {
            None => 0,
            Some(b) => u64::from_be_bytes(b.try_into().map_err(|_| {
                VaultError::Internal("a stored event sequence is unreadable".into())
            })?),
        };
    let mut writes = Vec::with_capacity(events.len() + 1);
    for e in events {
        seq += 1;
        writes.push(Write::Put(
            event_key(owner, seq),
            prost::Message::encode_to_vec(&e),
        ));
    }
    writes.push(Write::Put(event_seq_key(owner), seq.to_be_bytes().to_vec()));
    Ok(writes)
}

/// The answer given to one transaction id, kept to answer its retries.
#[derive(Clone, PartialEq, Message)]
pub struct TxnRecord {
    /// Keyed hash of the request's content: a retry must match it.
    #[prost(bytes = "vec", tag = "1")]
    pub fingerprint: Vec<u8>,
    /// Empty for an unknown number.
    #[prost(string, tag = "2")]
    pub card_id: String,
    /// ResponseCode::reason of the decision.
    #[prost(string, tag = "3")]
    pub reason: String,
    #[prost(string, tag = "4")]
    pub authorization_id: String,
    #[prost(int64, tag = "5")]
    pub amount: i64,
    #[prost(string, tag = "6")]
    pub currency: String,
    /// What the card had left after the decision.
    #[prost(int64, optional, tag = "7")]
    pub remaining: Option<i64>,
    /// How much of an approval has been reversed.
    #[prost(int64, tag = "8")]
    pub reversed: i64,
    #[prost(int64, tag = "9")]
    pub decided_at: i64,
    /// The index key version of `fingerprint` (0: version 1).
    #[prost(uint32, tag = "10")]
    pub fingerprint_version: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ReversalRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub fingerprint: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub reversed: bool,
    #[prost(string, tag = "3")]
    pub response_code: String,
    #[prost(int64, optional, tag = "4")]
    pub remaining: Option<i64>,
    #[prost(string, tag = "5")]
    pub currency: String,
    /// The index key version of `fingerprint` (0: version 1).
    #[prost(uint32, tag = "6")]
    pub fingerprint_version: u32,
    /// When it was decided (Unix seconds; 0 in records written before this
    /// field, which the retention pass keeps): retention deletes it after.
    #[prost(int64, tag = "7")]
    pub decided_at: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct IdempotencyRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub fingerprint: Vec<u8>,
    #[prost(string, tag = "2")]
    pub card_id: String,
    /// The index key version of `fingerprint` (0: version 1).
    #[prost(uint32, tag = "3")]
    pub fingerprint_version: u32,
}

/// A stored key version number: 0 (absent in old records) is version 1.
pub fn version_or_1(v: u32) -> u32 {
    v.max(1)
}

pub fn decode<M: Message + Default>(what: &str, bytes: &[u8]) -> Result<M, VaultError> {
    M::decode(bytes)
        .map_err(|_| VaultError::Internal(format!("a stored {what} record is unreadable")))
}

pub fn state_code(s: CardState) -> u32 {
    match s {
        CardState::Active => 1,
        CardState::Paused => 2,
        CardState::Blocked => 3,
        CardState::Used => 4,
        CardState::Closed => 5,
    }
}

pub fn state_from_code(code: u32) -> Option<CardState> {
    Some(match code {
        1 => CardState::Active,
        2 => CardState::Paused,
        3 => CardState::Blocked,
        4 => CardState::Used,
        5 => CardState::Closed,
        _ => return None,
    })
}

fn corrupt(id: &str, what: &str) -> VaultError {
    VaultError::Internal(format!("stored card {id} has an unreadable {what}"))
}

impl CardRecord {
    /// The stored form of a card and its sealed numbers.
    pub fn new(card: &Card, sealed: &Sealed) -> CardRecord {
        let mut r = CardRecord {
            sealed: Some(SealedRecord {
                key_version: sealed.key_version,
                wrapped_dek: sealed.wrapped_dek.clone(),
                funding_pan: sealed.funding_pan.clone(),
                token_pan: sealed.token_pan.clone(),
            }),
            ..Default::default()
        };
        r.set_card(card);
        r
    }

    /// Writes the card's changeable fields into the record.
    pub fn set_card(&mut self, card: &Card) {
        let p = &card.policy;
        self.card_id = card.id.as_str().to_string();
        self.owner = card.owner.as_str().to_string();
        self.masked_pan = card.masked_pan.clone();
        self.last4 = card.last4.clone();
        self.state = state_code(card.state);
        self.currency = p.spend_limit.currency().code().to_string();
        self.spend_limit = p.spend_limit.amount_minor();
        self.spent = card.spent.amount_minor();
        self.per_transaction_limit = p.per_transaction_limit.map(Money::amount_minor);
        self.max_uses = p.max_uses;
        self.uses = card.uses;
        self.valid_until = p.valid_until.unix_timestamp();
        self.merchant_id = p
            .merchant_id
            .as_ref()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default();
        self.lock_to_first_merchant = p.lock_to_first_merchant;
        self.allowed_mccs = p.allowed_mccs.iter().map(|m| m.to_string()).collect();
        self.blocked_mccs = p.blocked_mccs.iter().map(|m| m.to_string()).collect();
        self.created_at = card.created_at.unix_timestamp();
        self.failed_verifications = card.failed_verifications;
        self.expiry_month = u32::from(card.expiry.month);
        self.expiry_year = u32::from(card.expiry.year);
    }

    /// The card's owner, re-parsed (without the rest of the card).
    pub fn owner(&self) -> Result<Owner, VaultError> {
        Owner::parse("owner", &self.owner).map_err(|_| corrupt(&self.card_id, "owner"))
    }

    pub fn sealed(&self) -> Result<Sealed, VaultError> {
        let s = self
            .sealed
            .as_ref()
            .ok_or_else(|| corrupt(&self.card_id, "sealed numbers"))?;
        Ok(Sealed {
            key_version: s.key_version,
            wrapped_dek: s.wrapped_dek.clone(),
            funding_pan: s.funding_pan.clone(),
            token_pan: s.token_pan.clone(),
        })
    }

    /// The domain card, re-parsed: a stored record that is not a valid card
    /// is reported, never used.
    pub fn card(&self) -> Result<Card, VaultError> {
        let id = &self.card_id;
        let c = |what: &str| corrupt(id, what);
        let currency = Currency::parse(&self.currency).map_err(|_| c("currency"))?;
        let mccs = |v: &[String]| {
            v.iter()
                .map(|s| Mcc::parse(s))
                .collect::<Result<Vec<_>, _>>()
        };
        let time = |t: i64| OffsetDateTime::from_unix_timestamp(t);
        Ok(Card {
            id: CardId::parse("card_id", id).map_err(|_| c("id"))?,
            owner: self.owner()?,
            masked_pan: self.masked_pan.clone(),
            last4: self.last4.clone(),
            expiry: Expiry {
                month: u8::try_from(self.expiry_month).map_err(|_| c("expiry"))?,
                year: u16::try_from(self.expiry_year).map_err(|_| c("expiry"))?,
            },
            policy: CardPolicy {
                spend_limit: Money::new(self.spend_limit, currency),
                per_transaction_limit: self.per_transaction_limit.map(|n| Money::new(n, currency)),
                max_uses: self.max_uses,
                valid_until: time(self.valid_until).map_err(|_| c("valid_until"))?,
                merchant_id: MerchantId::parse_optional("merchant_id", &self.merchant_id)
                    .map_err(|_| c("merchant"))?,
                lock_to_first_merchant: self.lock_to_first_merchant,
                allowed_mccs: mccs(&self.allowed_mccs).map_err(|_| c("MCC list"))?,
                blocked_mccs: mccs(&self.blocked_mccs).map_err(|_| c("MCC list"))?,
            },
            state: state_from_code(self.state).ok_or_else(|| c("state"))?,
            spent: Money::new(self.spent, currency),
            uses: self.uses,
            failed_verifications: self.failed_verifications,
            created_at: time(self.created_at).map_err(|_| c("created_at"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::purge::TOMBSTONE;

    fn id() -> CardId {
        CardId::from_random(&[0xab; CardId::RANDOM_BYTES])
    }

    #[test]
    fn an_index_value_carries_the_id_then_the_owner() {
        let owner = Owner::parse("owner", "cust 42/é").unwrap();
        let value = index_value(&id(), &owner);
        assert_eq!(
            value,
            [id().as_str().as_bytes(), b"\0", "cust 42/é".as_bytes()].concat()
        );
        assert_eq!(
            parse_index_value(&value),
            (id().as_str().as_bytes(), Some("cust 42/é".as_bytes()))
        );
    }

    #[test]
    fn an_index_value_of_the_id_alone_has_no_owner() {
        // As written before the owner was added.
        let old = id().as_str().as_bytes().to_vec();
        assert_eq!(parse_index_value(&old), (&old[..], None));
        // An empty owner part is an owner that will not parse, not a panic.
        let empty = [&old[..], b"\0"].concat();
        assert_eq!(parse_index_value(&empty), (&old[..], Some(&b""[..])));
        assert!(Owner::parse("owner", "").is_err());
    }

    #[test]
    fn the_separator_is_in_no_card_id_or_owner() {
        let sep = char::from(INDEX_SEPARATOR).to_string();
        assert!(!id().as_str().contains(&sep));
        assert!(CardId::parse("card_id", &format!("vc_{sep}")).is_err());
        assert!(Owner::parse("owner", &format!("a{sep}b")).is_err());
    }

    #[test]
    fn a_tombstone_never_reads_as_a_card_id() {
        // A time's big-endian bytes start with zeros, the separator.
        let tombstone = [TOMBSTONE, &1_700_000_000i64.to_be_bytes()].concat();
        let (id_part, owner_part) = parse_index_value(&tombstone);
        assert!(owner_part.is_some());
        assert!(id_part.starts_with(TOMBSTONE));
        assert_ne!(id_part, id().as_str().as_bytes());
    }
}
