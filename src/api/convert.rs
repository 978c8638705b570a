//! Wire messages to domain values and back. Every parser names the field it
//! rejects, as the client spelled it.

use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::api::pb;
use crate::domain::card::PolicyInput;
use crate::domain::text::parse_ident;
use crate::domain::{
    Card, CardState, Cvv, Expiry, FieldError, Mcc, MerchantId, Money, Owner, Pan, PanError,
};
use crate::vault::records::{state_from_code, EventKind, EventRecord};
use crate::vault::{AuthorizeRequest, IssueRequest, Presented, ReverseRequest};

/// Longest transaction, reversal and idempotency id accepted.
pub const MAX_ID_LEN: usize = 64;

/// A card number field: any malformation is a field error.
pub fn parse_pan(field: &str, s: &str) -> Result<Pan, FieldError> {
    Pan::parse(s).map_err(|e| FieldError::new(field, e.reason()))
}

/// A Money field; `required` says whether it may be absent.
pub fn parse_money(
    field: &str,
    m: Option<&pb::Money>,
    required: bool,
) -> Result<Option<Money>, FieldError> {
    match m {
        None if required => Err(FieldError::new(field, "is required")),
        None => Ok(None),
        Some(m) => Money::parse(m.amount_minor, &m.currency)
            .map(Some)
            .map_err(|e| e.within(field)),
    }
}

pub fn parse_time(field: &str, t: &prost_types::Timestamp) -> Result<OffsetDateTime, FieldError> {
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .map_err(|_| FieldError::new(field, "is out of range"))
}

pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: 0,
    }
}

fn optional_id(field: &str, s: &str) -> Result<Option<String>, FieldError> {
    if s.is_empty() {
        return Ok(None);
    }
    parse_ident(field, s, MAX_ID_LEN).map(Some)
}

/// Parses IssueCardRequest; `owner` is the owner already resolved from the
/// request and the caller, and `funding` the funding number of
/// `funding_card_id` when the request gives one instead of `funding_pan`.
pub fn issue_request(
    r: &pb::IssueCardRequest,
    owner: Owner,
    funding: Option<Pan>,
) -> Result<IssueRequest, FieldError> {
    let funding_pan = match funding {
        Some(p) => p,
        None => parse_pan("funding_pan", &r.funding_pan)?,
    };
    let spend_limit = parse_money("spend_limit", r.spend_limit.as_ref(), true)?
        .ok_or_else(|| FieldError::new("spend_limit", "is required"))?;
    if !spend_limit.is_positive() {
        return Err(FieldError::new(
            "spend_limit.amount_minor",
            "must be greater than 0",
        ));
    }
    let policy = PolicyInput {
        spend_limit,
        per_transaction_limit: parse_money(
            "per_transaction_limit",
            r.per_transaction_limit.as_ref(),
            false,
        )?,
        max_uses: r.max_uses,
        valid_until: r
            .valid_until
            .as_ref()
            .map(|t| parse_time("valid_until", t))
            .transpose()?,
        merchant_id: MerchantId::parse_optional("merchant_id", &r.merchant_id)?,
        lock_to_first_merchant: r.lock_to_first_merchant,
        allowed_mccs: Mcc::parse_list("allowed_mccs", &r.allowed_mccs)?,
        blocked_mccs: Mcc::parse_list("blocked_mccs", &r.blocked_mccs)?,
    };
    Ok(IssueRequest {
        funding_pan,
        owner,
        policy,
        idempotency_key: optional_id("idempotency_key", &r.idempotency_key)?,
    })
}

pub fn authorize_request(r: &pb::AuthorizeRequest) -> Result<AuthorizeRequest, FieldError> {
    let transaction_id = parse_ident("transaction_id", &r.transaction_id, MAX_ID_LEN)?;
    let pan = match Pan::parse(&r.pan) {
        Ok(p) => Presented::Pan(p),
        // Well-formed but failing Luhn: not malformed, just not a card (14).
        Err(PanError::Luhn) => Presented::BadLuhn(Zeroizing::new(r.pan.clone())),
        Err(e) => return Err(FieldError::new("pan", e.reason())),
    };
    let expiry = Expiry::parse(r.expiry_month, r.expiry_year)?;
    let cvv = Cvv::parse(&r.cvv).map_err(|reason| FieldError::new("cvv", reason))?;
    let amount = parse_money("amount", r.amount.as_ref(), true)?
        .ok_or_else(|| FieldError::new("amount", "is required"))?;
    let merchant_id = MerchantId::parse_optional("merchant_id", &r.merchant_id)?;
    let mcc = if r.mcc.is_empty() {
        None
    } else {
        Some(Mcc::parse(&r.mcc).map_err(|e| e.within("mcc"))?)
    };
    Ok(AuthorizeRequest {
        transaction_id,
        pan,
        expiry,
        cvv,
        amount,
        merchant_id,
        mcc,
    })
}

pub fn reverse_request(r: &pb::ReverseRequest) -> Result<ReverseRequest, FieldError> {
    Ok(ReverseRequest {
        transaction_id: parse_ident("transaction_id", &r.transaction_id, MAX_ID_LEN)?,
        amount: parse_money("amount", r.amount.as_ref(), false)?,
        reversal_id: optional_id("reversal_id", &r.reversal_id)?,
    })
}

pub fn money(m: Money) -> pb::Money {
    pb::Money {
        amount_minor: m.amount_minor(),
        currency: m.currency().code().to_string(),
    }
}

pub fn state(s: CardState) -> pb::CardState {
    match s {
        CardState::Active => pb::CardState::Active,
        CardState::Paused => pb::CardState::Paused,
        CardState::Blocked => pb::CardState::Blocked,
        CardState::Used => pb::CardState::Used,
        CardState::Closed => pb::CardState::Closed,
    }
}

/// An event's cursor: opaque to clients (today the owner's sequence
/// number, in hex).
pub fn event_cursor(seq: u64) -> String {
    format!("{seq:016x}")
}

/// The sequence number an `after_cursor` names; empty: 0 (from the first).
pub fn parse_cursor(field: &str, s: &str) -> Result<u64, FieldError> {
    if s.is_empty() {
        return Ok(0);
    }
    if s.len() != 16 {
        return Err(FieldError::new(
            field,
            "is not a cursor returned by WatchEvents",
        ));
    }
    u64::from_str_radix(s, 16)
        .map_err(|_| FieldError::new(field, "is not a cursor returned by WatchEvents"))
}

pub fn event(seq: u64, e: &EventRecord) -> pb::CardEvent {
    use pb::CardEventType as T;
    let kind = match e.kind() {
        Some(EventKind::Issued) => T::Issued,
        Some(EventKind::Authorized) => T::Authorized,
        Some(EventKind::Reversed) => T::Reversed,
        Some(EventKind::Paused) => T::Paused,
        Some(EventKind::Resumed) => T::Resumed,
        Some(EventKind::Blocked) => T::Blocked,
        Some(EventKind::Used) => T::Used,
        Some(EventKind::Closed) => T::Closed,
        Some(EventKind::Expired) => T::Expired,
        Some(EventKind::LimitsChanged) => T::LimitsChanged,
        None => T::Unspecified,
    };
    let money = |n: i64, c: &str| pb::Money {
        amount_minor: n,
        currency: c.to_string(),
    };
    pb::CardEvent {
        cursor: event_cursor(seq),
        r#type: kind as i32,
        card_id: e.card_id.clone(),
        owner: e.owner.clone(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: e.occurred_at,
            nanos: 0,
        }),
        masked_pan: e.masked_pan.clone(),
        state: state_from_code(e.state)
            .map(|s| state(s) as i32)
            .unwrap_or_default(),
        remaining: Some(money(e.remaining, &e.currency)),
        amount: e.amount.map(|n| money(n, &e.amount_currency)),
        transaction_id: e.transaction_id.clone(),
        approved: e.approved,
        response_code: e.response_code.clone(),
        decline_reason: e.reason.clone(),
        merchant_id: e.merchant_id.clone(),
        mcc: e.mcc.clone(),
    }
}

pub fn card(c: &Card) -> pb::Card {
    let p = &c.policy;
    pb::Card {
        card_id: c.id.as_str().to_string(),
        owner: c.owner.as_str().to_string(),
        masked_pan: c.masked_pan.clone(),
        last4: c.last4.clone(),
        state: state(c.state) as i32,
        spend_limit: Some(money(p.spend_limit)),
        spent: Some(money(c.spent)),
        remaining: Some(money(c.remaining())),
        per_transaction_limit: p.per_transaction_limit.map(money),
        max_uses: p.max_uses,
        uses: c.uses,
        valid_until: Some(timestamp(p.valid_until)),
        merchant_id: p
            .merchant_id
            .as_ref()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default(),
        allowed_mccs: p.allowed_mccs.iter().map(|m| m.to_string()).collect(),
        blocked_mccs: p.blocked_mccs.iter().map(|m| m.to_string()).collect(),
        created_at: Some(timestamp(c.created_at)),
        lock_to_first_merchant: p.lock_to_first_merchant,
        expiry_month: u32::from(c.expiry.month),
        expiry_year: u32::from(c.expiry.year),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue() -> pb::IssueCardRequest {
        pb::IssueCardRequest {
            funding_pan: "4111111111111111".into(),
            owner: "cust-1".into(),
            spend_limit: Some(pb::Money {
                amount_minor: 5000,
                currency: "EUR".into(),
            }),
            ..Default::default()
        }
    }

    fn field(r: pb::IssueCardRequest) -> String {
        issue_request(&r, Owner::parse("owner", "cust-1").unwrap(), None)
            .unwrap_err()
            .field
    }

    #[test]
    fn issue_errors_name_the_field() {
        assert!(issue_request(&issue(), Owner::parse("owner", "c").unwrap(), None).is_ok());
        assert_eq!(
            field(pb::IssueCardRequest {
                funding_pan: "4111x".into(),
                ..issue()
            }),
            "funding_pan"
        );
        assert_eq!(
            field(pb::IssueCardRequest {
                funding_pan: "4111111111111112".into(),
                ..issue()
            }),
            "funding_pan"
        );
        assert_eq!(
            field(pb::IssueCardRequest {
                spend_limit: None,
                ..issue()
            }),
            "spend_limit"
        );
        assert_eq!(
            field(pb::IssueCardRequest {
                spend_limit: Some(pb::Money {
                    amount_minor: -1,
                    currency: "EUR".into()
                }),
                ..issue()
            }),
            "spend_limit.amount_minor"
        );
        assert_eq!(
            field(pb::IssueCardRequest {
                spend_limit: Some(pb::Money {
                    amount_minor: 1,
                    currency: "EURO".into()
                }),
                ..issue()
            }),
            "spend_limit.currency"
        );
        assert_eq!(
            field(pb::IssueCardRequest {
                allowed_mccs: vec!["54".into()],
                ..issue()
            }),
            "allowed_mccs[0]"
        );
        assert_eq!(
            field(pb::IssueCardRequest {
                merchant_id: "\n".into(),
                ..issue()
            }),
            "merchant_id"
        );
        assert_eq!(
            field(pb::IssueCardRequest {
                idempotency_key: "k".repeat(65),
                ..issue()
            }),
            "idempotency_key"
        );
        assert_eq!(
            field(pb::IssueCardRequest {
                valid_until: Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0
                }),
                ..issue()
            }),
            "valid_until"
        );
    }

    fn auth() -> pb::AuthorizeRequest {
        pb::AuthorizeRequest {
            transaction_id: "t1".into(),
            pan: "4111111111111111".into(),
            expiry_month: 3,
            expiry_year: 2027,
            cvv: "123".into(),
            amount: Some(pb::Money {
                amount_minor: 100,
                currency: "EUR".into(),
            }),
            merchant_id: "m".into(),
            mcc: "5411".into(),
        }
    }

    #[test]
    fn authorize_errors_name_the_field_and_bad_luhn_is_not_an_error() {
        assert!(authorize_request(&auth()).is_ok());
        assert!(matches!(
            authorize_request(&pb::AuthorizeRequest {
                pan: "4111111111111112".into(),
                ..auth()
            })
            .unwrap()
            .pan,
            Presented::BadLuhn(_)
        ));
        let f = |r: pb::AuthorizeRequest| authorize_request(&r).unwrap_err().field;
        assert_eq!(
            f(pb::AuthorizeRequest {
                transaction_id: "".into(),
                ..auth()
            }),
            "transaction_id"
        );
        assert_eq!(
            f(pb::AuthorizeRequest {
                pan: "41111111abc11111".into(),
                ..auth()
            }),
            "pan"
        );
        assert_eq!(
            f(pb::AuthorizeRequest {
                pan: "".into(),
                ..auth()
            }),
            "pan"
        );
        assert_eq!(
            f(pb::AuthorizeRequest {
                expiry_month: 13,
                ..auth()
            }),
            "expiry_month"
        );
        assert_eq!(
            f(pb::AuthorizeRequest {
                expiry_year: 123456,
                ..auth()
            }),
            "expiry_year"
        );
        assert_eq!(
            f(pb::AuthorizeRequest {
                cvv: "12".into(),
                ..auth()
            }),
            "cvv"
        );
        assert_eq!(
            f(pb::AuthorizeRequest {
                amount: None,
                ..auth()
            }),
            "amount"
        );
        assert_eq!(
            f(pb::AuthorizeRequest {
                amount: Some(pb::Money {
                    amount_minor: 1,
                    currency: "???".into()
                }),
                ..auth()
            }),
            "amount.currency"
        );
        assert_eq!(
            f(pb::AuthorizeRequest {
                mcc: "54111".into(),
                ..auth()
            }),
            "mcc"
        );
        // A negative amount is well-formed: the decision answers it (13).
        assert!(authorize_request(&pb::AuthorizeRequest {
            amount: Some(pb::Money {
                amount_minor: -5,
                currency: "EUR".into()
            }),
            ..auth()
        })
        .is_ok());
    }
}
