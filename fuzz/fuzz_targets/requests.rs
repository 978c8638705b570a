//! Arbitrary bytes through request decoding and validation: whatever a
//! client sends, parsing answers with a value or a field error, never a
//! panic. Run: `cargo fuzz run requests -- -max_total_time=60` (see README).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vcn::api::{convert, pb};
use vcn::domain::{Mcc, Money, Owner, Pan};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    match kind % 5 {
        0 => {
            if let Ok(r) = pb::IssueCardRequest::decode(rest) {
                if let Ok(owner) = Owner::parse("owner", &r.owner) {
                    let _ = convert::issue_request(&r, owner, None);
                }
            }
        }
        1 => {
            if let Ok(r) = pb::AuthorizeRequest::decode(rest) {
                let _ = convert::authorize_request(&r);
            }
        }
        2 => {
            if let Ok(r) = pb::ReverseRequest::decode(rest) {
                let _ = convert::reverse_request(&r);
            }
        }
        3 => {
            if let Ok(r) = pb::UpdateCardLimitsRequest::decode(rest) {
                let _ = convert::parse_money("spend_limit", r.spend_limit.as_ref(), false);
                let _ = vcn::domain::CardId::parse("card_id", &r.card_id);
            }
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = Pan::parse(s);
                let _ = Money::parse_human(s);
                let _ = Mcc::parse(s);
                let _ = vcn::domain::pan::mask(s);
            }
        }
    }
});
