//! Debug for the messages that carry a full card number or a CVV: numbers
//! masked to first 6 and last 4, CVVs hidden. The derived Debug of these
//! messages is switched off in build.rs, so a stray `{:?}` cannot leak.

use std::fmt;

use crate::api::pb;
use crate::domain::pan::mask;

const HIDDEN: &str = "***";

fn cvv(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        HIDDEN
    }
}

impl fmt::Debug for pb::IssueCardRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueCardRequest")
            .field("funding_pan", &mask(&self.funding_pan))
            .field("owner", &self.owner)
            .field("spend_limit", &self.spend_limit)
            .field("per_transaction_limit", &self.per_transaction_limit)
            .field("max_uses", &self.max_uses)
            .field("valid_until", &self.valid_until)
            .field("merchant_id", &self.merchant_id)
            .field("lock_to_first_merchant", &self.lock_to_first_merchant)
            .field("allowed_mccs", &self.allowed_mccs)
            .field("blocked_mccs", &self.blocked_mccs)
            .field("idempotency_key", &self.idempotency_key)
            .finish()
    }
}

impl fmt::Debug for pb::IssueCardResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueCardResponse")
            .field("card", &self.card)
            .field("pan", &mask(&self.pan))
            .field("expiry_month", &self.expiry_month)
            .field("expiry_year", &self.expiry_year)
            .field("cvv", &cvv(&self.cvv))
            .finish()
    }
}

impl fmt::Debug for pb::AuthorizeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeRequest")
            .field("transaction_id", &self.transaction_id)
            .field("pan", &mask(&self.pan))
            .field("expiry_month", &self.expiry_month)
            .field("expiry_year", &self.expiry_year)
            .field("cvv", &cvv(&self.cvv))
            .field("amount", &self.amount)
            .field("merchant_id", &self.merchant_id)
            .field("mcc", &self.mcc)
            .finish()
    }
}

impl fmt::Debug for pb::AuthorizeResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeResponse")
            .field("approved", &self.approved)
            .field("response_code", &self.response_code)
            .field("decline_reason", &self.decline_reason)
            .field("authorization_id", &self.authorization_id)
            .field("card_id", &self.card_id)
            .field("funding_pan", &mask(&self.funding_pan))
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl fmt::Debug for pb::DetokenizeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetokenizeRequest")
            .field("pan", &mask(&self.pan))
            .finish()
    }
}

impl fmt::Debug for pb::DetokenizeResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetokenizeResponse")
            .field("funding_pan", &mask(&self.funding_pan))
            .field("card_id", &self.card_id)
            .field("state", &self.state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_messages_debug_masked() {
        let pan = "4111111111111111";
        let shown = format!(
            "{:?} {:?} {:?} {:?} {:?} {:?}",
            pb::IssueCardRequest {
                funding_pan: pan.into(),
                ..Default::default()
            },
            pb::IssueCardResponse {
                pan: pan.into(),
                cvv: "123".into(),
                ..Default::default()
            },
            pb::AuthorizeRequest {
                pan: pan.into(),
                cvv: "123".into(),
                ..Default::default()
            },
            pb::AuthorizeResponse {
                funding_pan: pan.into(),
                ..Default::default()
            },
            pb::DetokenizeRequest { pan: pan.into() },
            pb::DetokenizeResponse {
                funding_pan: pan.into(),
                ..Default::default()
            },
        );
        assert!(!shown.contains(pan), "{shown}");
        assert!(!shown.contains("123"), "{shown}");
        assert_eq!(shown.matches("411111******1111").count(), 6, "{shown}");
        // Malformed input is masked whole, never echoed.
        let odd = format!(
            "{:?}",
            pb::DetokenizeRequest {
                pan: "4111-1111-1111-1111".into()
            }
        );
        assert!(!odd.contains("1111-1111"), "{odd}");
    }
}
