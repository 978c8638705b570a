//! The card form: what the cardholder typed, turned into an IssueCard
//! request with the vcn domain parsers, or a message naming the field.

use std::fmt;

use time::OffsetDateTime;
use vcn::api::pb;
use vcn::domain::{Currency, MerchantId, Money};

use crate::config::FundingCard;

/// How long the new number lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Hour,
    Day,
    Week,
    /// As typed in the custom field: `30m`, `12h`, `3d`.
    Custom,
}

impl Validity {
    pub const ALL: [Validity; 4] = [
        Validity::Hour,
        Validity::Day,
        Validity::Week,
        Validity::Custom,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Validity::Hour => "1 hour",
            Validity::Day => "1 day",
            Validity::Week => "7 days",
            Validity::Custom => "Custom",
        }
    }
}

/// What the form holds, as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    /// Index into the configured funding cards.
    pub funding: usize,
    /// `50`, `12.50` (a comma is read as the decimal point).
    pub amount: String,
    /// ISO 4217 code.
    pub currency: String,
    pub validity: Validity,
    pub custom: String,
    /// Only this shop may use the number (empty: any).
    pub merchant: String,
    /// The first shop the number is used at becomes its only one.
    pub lock_first: bool,
}

impl Form {
    pub fn new(currency: &str) -> Form {
        Form {
            funding: 0,
            amount: String::new(),
            currency: currency.to_string(),
            validity: Validity::Day,
            custom: String::new(),
            merchant: String::new(),
            lock_first: false,
        }
    }

    /// The request to send, or what is wrong with the form.
    pub fn request(
        &self,
        cards: &[FundingCard],
        now: OffsetDateTime,
    ) -> Result<pb::IssueCardRequest, FormError> {
        let funding = cards
            .get(self.funding)
            .ok_or_else(|| FormError::new("Funding card", "choose one of your cards"))?;
        let amount = self.amount.trim().replace(',', ".");
        if amount.is_empty() {
            return Err(FormError::new(
                "Amount",
                "enter the most the shop may charge",
            ));
        }
        let currency = Currency::parse(&self.currency.trim().to_ascii_uppercase())
            .map_err(|_| FormError::new("Currency", "must be a currency code such as EUR"))?;
        let not_a_number = || FormError::new("Amount", "must be a number such as 25 or 12.50");
        if !amount.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(not_a_number());
        }
        let limit = Money::parse_human(&format!("{amount}{}", currency.code())).map_err(|e| {
            if e.reason.contains("decimal places") {
                FormError::new("Amount", e.reason)
            } else {
                not_a_number()
            }
        })?;
        if !limit.is_positive() {
            return Err(FormError::new("Amount", "must be more than 0"));
        }
        let valid_until = now + self.lifetime()?;
        let merchant = self.merchant.trim();
        let merchant_id = MerchantId::parse_optional("merchant", merchant)
            .map_err(|e| FormError::new("Shop", e.reason))?;
        if merchant_id.is_some() && self.lock_first {
            return Err(FormError::new(
                "Shop",
                "name a shop or lock to the first shop, not both",
            ));
        }
        Ok(pb::IssueCardRequest {
            funding_card_id: funding.card_id.as_str().to_string(),
            owner: String::new(), // the widget's key is pinned to its owner
            spend_limit: Some(pb::Money {
                amount_minor: limit.amount_minor(),
                currency: limit.currency().code().to_string(),
            }),
            max_uses: 1,
            valid_until: Some(vcn::api::convert::timestamp(valid_until)),
            merchant_id: merchant_id
                .map(|m| m.as_str().to_string())
                .unwrap_or_default(),
            lock_to_first_merchant: self.lock_first,
            ..Default::default()
        })
    }

    /// How long the number lives.
    pub fn lifetime(&self) -> Result<time::Duration, FormError> {
        Ok(match self.validity {
            Validity::Hour => time::Duration::hours(1),
            Validity::Day => time::Duration::days(1),
            Validity::Week => time::Duration::days(7),
            Validity::Custom => parse_lifetime(&self.custom)?,
        })
    }
}

/// `30m`, `12h`, `3d` (a space before the unit is fine).
pub fn parse_lifetime(s: &str) -> Result<time::Duration, FormError> {
    let bad = || {
        FormError::new(
            "Valid for",
            "must be minutes, hours or days, e.g. 30m, 12h or 3d",
        )
    };
    let s = s.trim();
    let unit_at = s.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(bad)?;
    let n: i64 = s[..unit_at].trim().parse().map_err(|_| bad())?;
    if n <= 0 {
        return Err(FormError::new("Valid for", "must be more than 0"));
    }
    let span = match &s[unit_at..] {
        "m" | "min" => time::Duration::minutes(n),
        "h" => time::Duration::hours(n),
        "d" => time::Duration::days(n),
        _ => return Err(bad()),
    };
    Ok(span)
}

/// A form field that is not right, and why, in plain words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormError {
    pub field: &'static str,
    pub reason: String,
}

impl FormError {
    fn new(field: &'static str, reason: impl Into<String>) -> FormError {
        FormError {
            field,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FormError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcn::domain::CardId;

    fn cards() -> Vec<FundingCard> {
        vec![FundingCard {
            label: "Visa".into(),
            card_id: CardId::parse("card_id", "vc_0123456789abcdef01234567").unwrap(),
        }]
    }

    fn form(amount: &str) -> Form {
        Form {
            amount: amount.into(),
            ..Form::new("EUR")
        }
    }

    const NOW: OffsetDateTime = time::macros::datetime!(2026-01-01 12:00 UTC);

    #[test]
    fn a_filled_form_becomes_a_single_use_request() {
        let r = form("12,50").request(&cards(), NOW).unwrap();
        assert_eq!(r.funding_card_id, "vc_0123456789abcdef01234567");
        assert!(r.funding_pan.is_empty());
        let limit = r.spend_limit.unwrap();
        assert_eq!((limit.amount_minor, limit.currency.as_str()), (1250, "EUR"));
        assert_eq!(r.max_uses, 1);
        assert_eq!(r.owner, "");
        let until = r.valid_until.unwrap();
        assert_eq!(
            until.seconds,
            (NOW + time::Duration::days(1)).unix_timestamp()
        );
        assert_eq!(r.merchant_id, "");
        let yen = Form {
            currency: "JPY".into(),
            ..form("1000")
        };
        assert_eq!(
            yen.request(&cards(), NOW)
                .unwrap()
                .spend_limit
                .unwrap()
                .amount_minor,
            1000
        );
    }

    #[test]
    fn validity_presets_and_custom() {
        let mut f = form("5");
        for (v, d) in [
            (Validity::Hour, time::Duration::hours(1)),
            (Validity::Day, time::Duration::days(1)),
            (Validity::Week, time::Duration::days(7)),
        ] {
            f.validity = v;
            assert_eq!(f.lifetime().unwrap(), d);
        }
        f.validity = Validity::Custom;
        for (s, d) in [
            ("30m", time::Duration::minutes(30)),
            ("12h", time::Duration::hours(12)),
            ("3 d", time::Duration::days(3)),
        ] {
            f.custom = s.into();
            assert_eq!(f.lifetime().unwrap(), d, "{s}");
        }
        for bad in ["", "3", "d", "0d", "-1h", "3w", "1.5h"] {
            f.custom = bad.into();
            assert_eq!(
                f.request(&cards(), NOW).unwrap_err().field,
                "Valid for",
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_input_names_the_field() {
        let field = |f: Form| f.request(&cards(), NOW).unwrap_err().field;
        assert_eq!(field(form("")), "Amount");
        assert_eq!(field(form("abc")), "Amount");
        assert_eq!(field(form("0")), "Amount");
        assert_eq!(field(form("-5")), "Amount");
        let e = form("1.001").request(&cards(), NOW).unwrap_err();
        assert_eq!(e.to_string(), "Amount: EUR has 2 decimal places");
        assert_eq!(
            field(Form {
                currency: "EURO".into(),
                ..form("5")
            }),
            "Currency"
        );
        assert_eq!(
            field(Form {
                funding: 3,
                ..form("5")
            }),
            "Funding card"
        );
        assert_eq!(
            field(Form {
                merchant: "bad\tshop".into(),
                ..form("5")
            }),
            "Shop"
        );
        assert_eq!(
            field(Form {
                merchant: "shop-1".into(),
                lock_first: true,
                ..form("5")
            }),
            "Shop"
        );
    }

    #[test]
    fn merchant_lock() {
        let r = Form {
            merchant: " shop-1 ".into(),
            ..form("5")
        }
        .request(&cards(), NOW)
        .unwrap();
        assert_eq!(r.merchant_id, "shop-1");
        let r = Form {
            lock_first: true,
            ..form("5")
        }
        .request(&cards(), NOW)
        .unwrap();
        assert!(r.lock_to_first_merchant && r.merchant_id.is_empty());
    }
}
