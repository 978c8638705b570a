//! The one secret the widget shows: a new card's full number, expiry and
//! CVV, from the moment the service answers until the reveal time is up.
//!
//! Number and CVV are held in the vcn domain types, which wipe their memory
//! on drop and print masked (`Debug` of [`Revealed`] shows first 6 + last 4
//! and no CVV). Nothing here is ever written to disk or to a log.

use std::fmt;
use std::time::{Duration, Instant};

use vcn::api::pb;
use vcn::domain::{Cvv, Pan};
use zeroize::{Zeroize, Zeroizing};

/// A freshly issued card's details, shown for a limited time.
pub struct Revealed {
    pub card_id: String,
    pan: Pan,
    cvv: Cvv,
    expiry_month: u32,
    expiry_year: u32,
    shown_at: Instant,
}

impl Revealed {
    /// Takes the number and CVV out of the service's answer, wiping the
    /// answer's copies. `None` if the answer is not a card the widget can show.
    pub fn take(resp: &mut pb::IssueCardResponse, now: Instant) -> Option<Revealed> {
        let pan = Pan::parse(&resp.pan).ok();
        let cvv = Cvv::parse(&resp.cvv).ok();
        resp.pan.zeroize();
        resp.cvv.zeroize();
        let card_id = resp.card.as_ref()?.card_id.clone();
        Some(Revealed {
            card_id,
            pan: pan?,
            cvv: cvv?,
            expiry_month: resp.expiry_month,
            expiry_year: resp.expiry_year,
            shown_at: now,
        })
    }

    /// The number in groups of four, as printed on a card.
    pub fn grouped_number(&self) -> Zeroizing<String> {
        group(self.pan.expose())
    }

    /// The number as digits only, for the clipboard.
    pub fn number(&self) -> Zeroizing<String> {
        Zeroizing::new(self.pan.expose().to_string())
    }

    pub fn masked(&self) -> String {
        self.pan.masked()
    }

    pub fn cvv(&self) -> Zeroizing<String> {
        Zeroizing::new(self.cvv.expose().to_string())
    }

    /// MM/YY, as merchants ask for it.
    pub fn expiry(&self) -> String {
        format!("{:02}/{:02}", self.expiry_month, self.expiry_year % 100)
    }

    /// Whether the reveal time is up at `now`.
    pub fn expired(&self, now: Instant, reveal_for: Duration) -> bool {
        now.saturating_duration_since(self.shown_at) >= reveal_for
    }

    /// How long until it is hidden (zero once it is due).
    pub fn left(&self, now: Instant, reveal_for: Duration) -> Duration {
        reveal_for.saturating_sub(now.saturating_duration_since(self.shown_at))
    }
}

impl fmt::Debug for Revealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revealed")
            .field("card_id", &self.card_id)
            .field("pan", &self.pan)
            .field("cvv", &self.cvv)
            .finish_non_exhaustive()
    }
}

/// `4111111111111111` → `4111 1111 1111 1111`.
pub fn group(digits: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(digits.len() + digits.len() / 4));
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> pb::IssueCardResponse {
        pb::IssueCardResponse {
            card: Some(pb::Card {
                card_id: "c1".into(),
                ..Default::default()
            }),
            pan: "4111112345678909".into(),
            expiry_month: 3,
            expiry_year: 2027,
            cvv: "123".into(),
        }
    }

    #[test]
    fn takes_the_secrets_out_of_the_answer() {
        let mut resp = answer();
        let now = Instant::now();
        let r = Revealed::take(&mut resp, now).unwrap();
        assert!(resp.pan.is_empty() && resp.cvv.is_empty(), "answer wiped");
        assert_eq!(r.grouped_number().as_str(), "4111 1123 4567 8909");
        assert_eq!(r.number().as_str(), "4111112345678909");
        assert_eq!(r.expiry(), "03/27");
        assert_eq!(r.cvv().as_str(), "123");
        let debug = format!("{r:?}");
        assert!(!debug.contains("4111112345678909"), "{debug}");
        assert!(debug.contains("411111******8909"), "{debug}");
        assert!(!debug.contains("123\""), "{debug}");
    }

    #[test]
    fn hidden_once_the_time_is_up() {
        let now = Instant::now();
        let r = Revealed::take(&mut answer(), now).unwrap();
        let t = Duration::from_secs(60);
        assert!(!r.expired(now + Duration::from_secs(59), t));
        assert_eq!(
            r.left(now + Duration::from_secs(59), t),
            Duration::from_secs(1)
        );
        assert!(r.expired(now + t, t));
        assert_eq!(r.left(now + Duration::from_secs(600), t), Duration::ZERO);
    }

    #[test]
    fn an_answer_without_a_valid_number_is_not_shown() {
        let mut bad = answer();
        bad.pan = "12".into();
        assert!(Revealed::take(&mut bad, Instant::now()).is_none());
        assert!(bad.pan.is_empty());
    }
}
