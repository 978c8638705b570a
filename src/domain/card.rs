//! A virtual card as the decision sees it: its policy (limits, uses, locks,
//! validity), its state and its counters. No secrets: the numbers live in
//! the vault, sealed.

use std::fmt;

use time::OffsetDateTime;

use crate::domain::{FieldError, Mcc, MerchantId, Money, Owner};

/// A card's public identifier: `vc_` and 24 lowercase hex digits (96 random
/// bits), so ids can be neither guessed nor told apart by age.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardId(String);

impl CardId {
    const PREFIX: &'static str = "vc_";
    const HEX_LEN: usize = 24;
    /// Random bytes that make an id.
    pub const RANDOM_BYTES: usize = Self::HEX_LEN / 2;

    pub fn from_random(bytes: &[u8; Self::RANDOM_BYTES]) -> CardId {
        CardId(format!("{}{}", Self::PREFIX, hex::encode(bytes)))
    }

    pub fn parse(field: &str, s: &str) -> Result<CardId, FieldError> {
        if s.is_empty() {
            return Err(FieldError::new(field, "is required"));
        }
        let ok = s.strip_prefix(Self::PREFIX).is_some_and(|h| {
            h.len() == Self::HEX_LEN && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if !ok {
            return Err(FieldError::new(
                field,
                "must be a card id as returned by IssueCard (vc_ and 24 hex digits)",
            ));
        }
        Ok(CardId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a card is in its life. `Used` and `Closed` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardState {
    Active,
    Paused,
    Blocked,
    Used,
    Closed,
}

impl CardState {
    pub fn is_final(self) -> bool {
        matches!(self, CardState::Used | CardState::Closed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CardState::Active => "active",
            CardState::Paused => "paused",
            CardState::Blocked => "blocked",
            CardState::Used => "used",
            CardState::Closed => "closed",
        }
    }
}

/// The expiry printed on the card: the month of its `valid_until`, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub month: u8,
    /// Four digits.
    pub year: u16,
}

impl Expiry {
    pub fn of(valid_until: OffsetDateTime) -> Expiry {
        let utc = valid_until.to_offset(time::UtcOffset::UTC);
        Expiry {
            month: u8::from(utc.month()),
            year: u16::try_from(utc.year()).unwrap_or(0),
        }
    }

    /// Parses an expiry as a switch sends it: month 1-12; a two-digit year
    /// is read as 20YY.
    pub fn parse(month: u32, year: u32) -> Result<Expiry, FieldError> {
        let month = u8::try_from(month)
            .ok()
            .filter(|m| (1..=12).contains(m))
            .ok_or_else(|| FieldError::new("expiry_month", "must be 1 to 12"))?;
        let year = match year {
            0..=99 => 2000 + year,
            2000..=2999 => year,
            _ => {
                return Err(FieldError::new(
                    "expiry_year",
                    "must be a year, four digits (two are read as 20YY)",
                ))
            }
        };
        Ok(Expiry {
            month,
            year: year as u16,
        })
    }

    /// `MMYY`, as used in the CVV derivation.
    pub fn mmyy(self) -> String {
        format!("{:02}{:02}", self.month, self.year % 100)
    }
}

/// What a card may be used for. Set at issue; the limits can change later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardPolicy {
    /// Total the card may spend over its life. Positive.
    pub spend_limit: Money,
    /// Cap on one authorisation, in the same currency. Positive when set.
    pub per_transaction_limit: Option<Money>,
    /// Approvals allowed, at least 1.
    pub max_uses: u32,
    /// After this instant every authorisation is declined (54).
    pub valid_until: OffsetDateTime,
    /// The only merchant allowed, when set.
    pub merchant_id: Option<MerchantId>,
    /// The first approved merchant becomes `merchant_id`.
    pub lock_to_first_merchant: bool,
    /// When not empty, only these merchant categories are allowed.
    pub allowed_mccs: Vec<Mcc>,
    /// These merchant categories are never allowed.
    pub blocked_mccs: Vec<Mcc>,
}

/// What a policy is built from, as parsed from a request.
#[derive(Debug, Clone)]
pub struct PolicyInput {
    pub spend_limit: Money,
    pub per_transaction_limit: Option<Money>,
    /// 0 means 1.
    pub max_uses: u32,
    /// None: `now + default_validity`.
    pub valid_until: Option<OffsetDateTime>,
    pub merchant_id: Option<MerchantId>,
    pub lock_to_first_merchant: bool,
    pub allowed_mccs: Vec<Mcc>,
    pub blocked_mccs: Vec<Mcc>,
}

/// Bounds set by the service's configuration.
#[derive(Debug, Clone, Copy)]
pub struct PolicyBounds {
    pub default_validity: time::Duration,
    pub max_validity: time::Duration,
}

impl CardPolicy {
    pub fn new(
        input: PolicyInput,
        now: OffsetDateTime,
        bounds: PolicyBounds,
    ) -> Result<CardPolicy, FieldError> {
        if !input.spend_limit.is_positive() {
            return Err(FieldError::new(
                "spend_limit.amount_minor",
                "must be greater than 0",
            ));
        }
        check_per_transaction_limit(input.spend_limit, input.per_transaction_limit)?;
        let valid_until = match input.valid_until {
            None => now + bounds.default_validity,
            Some(t) if t <= now => {
                return Err(FieldError::new("valid_until", "must be in the future"))
            }
            Some(t) if t > now + bounds.max_validity => {
                return Err(FieldError::new(
                    "valid_until",
                    format!(
                        "must be at most {} days ahead",
                        bounds.max_validity.whole_days()
                    ),
                ))
            }
            Some(t) => t,
        };
        Ok(CardPolicy {
            spend_limit: input.spend_limit,
            per_transaction_limit: input.per_transaction_limit,
            max_uses: input.max_uses.max(1),
            valid_until,
            merchant_id: input.merchant_id,
            lock_to_first_merchant: input.lock_to_first_merchant,
            allowed_mccs: input.allowed_mccs,
            blocked_mccs: input.blocked_mccs,
        })
    }
}

fn check_per_transaction_limit(spend: Money, per_txn: Option<Money>) -> Result<(), FieldError> {
    if let Some(p) = per_txn {
        if !p.same_currency(spend) {
            return Err(FieldError::new(
                "per_transaction_limit.currency",
                "must be the spend_limit's currency",
            ));
        }
        if !p.is_positive() {
            return Err(FieldError::new(
                "per_transaction_limit.amount_minor",
                "must be greater than 0",
            ));
        }
    }
    Ok(())
}

/// Why a lifecycle change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// The card is in a state that does not allow it.
    State {
        state: CardState,
        action: &'static str,
    },
    /// A new value is not acceptable.
    Field(FieldError),
}

impl fmt::Display for ChangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeError::State { state, action } => {
                write!(f, "card is {}: cannot {action} it", state.as_str())
            }
            ChangeError::Field(e) => e.fmt(f),
        }
    }
}

/// A virtual card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub id: CardId,
    pub owner: Owner,
    /// First 6 and last 4 digits of the virtual number.
    pub masked_pan: String,
    pub last4: String,
    /// Printed expiry, fixed at issue from `policy.valid_until`.
    pub expiry: Expiry,
    pub policy: CardPolicy,
    pub state: CardState,
    /// Approved minus reversed, in the spend limit's currency.
    pub spent: Money,
    /// Approvals so far.
    pub uses: u32,
    /// Wrong CVVs or expiries in a row; reset by an approval or a resume.
    pub failed_verifications: u32,
    pub created_at: OffsetDateTime,
}

impl Card {
    /// What the card may still spend (never below zero).
    pub fn remaining(&self) -> Money {
        let left = self
            .policy
            .spend_limit
            .amount_minor()
            .saturating_sub(self.spent.amount_minor())
            .max(0);
        Money::new(left, self.policy.spend_limit.currency())
    }

    pub fn pause(&mut self) -> Result<(), ChangeError> {
        match self.state {
            CardState::Active | CardState::Paused => {
                self.state = CardState::Paused;
                Ok(())
            }
            state => Err(ChangeError::State {
                state,
                action: "pause",
            }),
        }
    }

    /// Makes a paused or blocked card active again, clearing the count of
    /// failed verifications. Resuming an active card changes nothing.
    pub fn resume(&mut self) -> Result<(), ChangeError> {
        match self.state {
            CardState::Active | CardState::Paused | CardState::Blocked => {
                self.state = CardState::Active;
                self.failed_verifications = 0;
                Ok(())
            }
            state => Err(ChangeError::State {
                state,
                action: "resume",
            }),
        }
    }

    /// Closes the card for good; closing a closed card changes nothing.
    pub fn close(&mut self) -> Result<(), ChangeError> {
        match self.state {
            CardState::Used => Err(ChangeError::State {
                state: CardState::Used,
                action: "close",
            }),
            _ => {
                self.state = CardState::Closed;
                Ok(())
            }
        }
    }

    /// Changes the limits. `per_transaction_limit`: None keeps it, Some(None)
    /// removes it, Some(Some(m)) sets it.
    pub fn update_limits(
        &mut self,
        spend_limit: Option<Money>,
        per_transaction_limit: Option<Option<Money>>,
    ) -> Result<(), ChangeError> {
        if self.state.is_final() {
            return Err(ChangeError::State {
                state: self.state,
                action: "change the limits of",
            });
        }
        let spend = spend_limit.unwrap_or(self.policy.spend_limit);
        if !spend.same_currency(self.policy.spend_limit) {
            return Err(ChangeError::Field(FieldError::new(
                "spend_limit.currency",
                "must be the card's currency",
            )));
        }
        if !spend.is_positive() {
            return Err(ChangeError::Field(FieldError::new(
                "spend_limit.amount_minor",
                "must be greater than 0",
            )));
        }
        if spend.amount_minor() < self.spent.amount_minor() {
            return Err(ChangeError::Field(FieldError::new(
                "spend_limit.amount_minor",
                "must not be below what the card has already spent",
            )));
        }
        let per_txn = per_transaction_limit.unwrap_or(self.policy.per_transaction_limit);
        check_per_transaction_limit(spend, per_txn).map_err(ChangeError::Field)?;
        self.policy.spend_limit = spend;
        self.policy.per_transaction_limit = per_txn;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use time::macros::datetime;

    pub fn eur(n: i64) -> Money {
        Money::parse(n, "EUR").unwrap()
    }

    pub const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);

    pub fn bounds() -> PolicyBounds {
        PolicyBounds {
            default_validity: time::Duration::days(30),
            max_validity: time::Duration::days(5 * 366),
        }
    }

    pub fn input() -> PolicyInput {
        PolicyInput {
            spend_limit: eur(5000),
            per_transaction_limit: None,
            max_uses: 0,
            valid_until: None,
            merchant_id: None,
            lock_to_first_merchant: false,
            allowed_mccs: vec![],
            blocked_mccs: vec![],
        }
    }

    pub fn card(policy: CardPolicy) -> Card {
        Card {
            id: CardId::from_random(&[7; 12]),
            owner: Owner::parse("owner", "cust-1").unwrap(),
            masked_pan: "411111******1234".into(),
            last4: "1234".into(),
            expiry: Expiry::of(policy.valid_until),
            spent: Money::new(0, policy.spend_limit.currency()),
            policy,
            state: CardState::Active,
            uses: 0,
            failed_verifications: 0,
            created_at: NOW,
        }
    }

    #[test]
    fn card_ids_round_trip_and_reject_garbage() {
        let id = CardId::from_random(&[0xab; 12]);
        assert_eq!(id.as_str(), "vc_abababababababababababab");
        assert_eq!(CardId::parse("card_id", id.as_str()).unwrap(), id);
        for bad in [
            "",
            "vc_",
            "vc_ABABABABABABABABABABABAB",
            "xx_abababababababababababab",
            "vc_abab",
        ] {
            assert_eq!(CardId::parse("card_id", bad).unwrap_err().field, "card_id");
        }
    }

    #[test]
    fn policy_defaults_single_use_and_configured_validity() {
        let p = CardPolicy::new(input(), NOW, bounds()).unwrap();
        assert_eq!(p.max_uses, 1);
        assert_eq!(p.valid_until, NOW + time::Duration::days(30));
        let p = CardPolicy::new(
            PolicyInput {
                max_uses: 5,
                ..input()
            },
            NOW,
            bounds(),
        )
        .unwrap();
        assert_eq!(p.max_uses, 5);
    }

    #[test]
    fn policy_rejects_bad_limits_and_validity() {
        let err = |i: PolicyInput| CardPolicy::new(i, NOW, bounds()).unwrap_err().field;
        assert_eq!(
            err(PolicyInput {
                spend_limit: eur(0),
                ..input()
            }),
            "spend_limit.amount_minor"
        );
        assert_eq!(
            err(PolicyInput {
                per_transaction_limit: Some(Money::parse(10, "USD").unwrap()),
                ..input()
            }),
            "per_transaction_limit.currency"
        );
        assert_eq!(
            err(PolicyInput {
                per_transaction_limit: Some(eur(0)),
                ..input()
            }),
            "per_transaction_limit.amount_minor"
        );
        assert_eq!(
            err(PolicyInput {
                valid_until: Some(NOW),
                ..input()
            }),
            "valid_until"
        );
        assert_eq!(
            err(PolicyInput {
                valid_until: Some(NOW + time::Duration::days(6 * 366)),
                ..input()
            }),
            "valid_until"
        );
    }

    #[test]
    fn expiry_is_the_month_of_valid_until() {
        assert_eq!(
            Expiry::of(datetime!(2027-03-31 23:59 UTC)),
            Expiry {
                month: 3,
                year: 2027
            }
        );
        assert_eq!(
            Expiry::of(datetime!(2027-04-01 00:30 +02:00)),
            Expiry {
                month: 3,
                year: 2027
            }
        );
        assert_eq!(
            Expiry::parse(3, 27).unwrap(),
            Expiry {
                month: 3,
                year: 2027
            }
        );
        assert_eq!(Expiry::parse(12, 2030).unwrap().mmyy(), "1230");
        assert_eq!(Expiry::parse(0, 2030).unwrap_err().field, "expiry_month");
        assert_eq!(Expiry::parse(13, 2030).unwrap_err().field, "expiry_month");
        assert_eq!(Expiry::parse(1, 300).unwrap_err().field, "expiry_year");
    }

    #[test]
    fn lifecycle_transitions() {
        let mut c = card(CardPolicy::new(input(), NOW, bounds()).unwrap());
        c.pause().unwrap();
        assert_eq!(c.state, CardState::Paused);
        c.pause().unwrap();
        c.resume().unwrap();
        assert_eq!(c.state, CardState::Active);
        c.state = CardState::Blocked;
        c.failed_verifications = 3;
        assert!(c.pause().is_err());
        c.resume().unwrap();
        assert_eq!((c.state, c.failed_verifications), (CardState::Active, 0));
        c.close().unwrap();
        c.close().unwrap();
        assert_eq!(c.state, CardState::Closed);
        assert!(c.resume().is_err());
        assert!(c.pause().is_err());
        assert!(c.update_limits(Some(eur(10)), None).is_err());
        c.state = CardState::Used;
        assert!(c.close().is_err());
        assert!(c.resume().is_err());
    }

    #[test]
    fn limits_update_keeps_currency_and_stays_above_spent() {
        let mut c = card(CardPolicy::new(input(), NOW, bounds()).unwrap());
        c.spent = eur(3000);
        let field = |e: ChangeError| match e {
            ChangeError::Field(f) => f.field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(c.update_limits(Some(eur(2999)), None).unwrap_err()),
            "spend_limit.amount_minor"
        );
        assert_eq!(
            field(
                c.update_limits(Some(Money::parse(9000, "USD").unwrap()), None)
                    .unwrap_err()
            ),
            "spend_limit.currency"
        );
        c.update_limits(Some(eur(3000)), Some(Some(eur(100))))
            .unwrap();
        assert_eq!(c.remaining(), eur(0));
        assert_eq!(c.policy.per_transaction_limit, Some(eur(100)));
        c.update_limits(None, Some(None)).unwrap();
        assert_eq!(c.policy.per_transaction_limit, None);
        assert_eq!(c.policy.spend_limit, eur(3000));
    }
}
