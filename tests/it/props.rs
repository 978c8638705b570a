//! Property tests: random input never panics a parser, and valid input
//! round-trips.

use proptest::prelude::*;
use vcn::api::{convert, pb};
use vcn::domain::pan::{luhn_check_digit, luhn_valid, mask};
use vcn::domain::{Currency, Expiry, Mcc, Money, Owner, Pan};

fn digits(min: usize, max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(0u8..10, min..=max)
        .prop_map(|v| v.into_iter().map(|d| char::from(b'0' + d)).collect())
}

/// A valid card number: 12-18 random digits and their Luhn digit.
fn valid_pan() -> impl Strategy<Value = String> {
    digits(12, 18).prop_map(|p| format!("{p}{}", luhn_check_digit(&p).unwrap()))
}

fn currency() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "EUR", "USD", "GBP", "JPY", "BHD", "KWD", "CHF", "ISK", "CLP", "TND",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn pan_parse_never_panics(s in ".{0,40}") {
        let _ = Pan::parse(&s);
        let _ = luhn_valid(&s);
        let _ = mask(&s);
    }

    #[test]
    fn valid_pans_round_trip_and_mask_to_six_and_four(p in valid_pan()) {
        let pan = Pan::parse(&p).unwrap();
        prop_assert_eq!(pan.expose(), p.as_str());
        let m = pan.masked();
        prop_assert_eq!(m.len(), p.len());
        prop_assert_eq!(&m[..6], &p[..6]);
        prop_assert_eq!(&m[p.len() - 4..], &p[p.len() - 4..]);
        prop_assert_eq!(m.chars().filter(|c| c.is_ascii_digit()).count(), 10);
        let shown = format!("{:?}", pan);
        prop_assert!(!shown.contains(&p));
    }

    #[test]
    fn any_single_digit_change_breaks_luhn(p in valid_pan(), pos in 0usize..19, d in 0u8..10) {
        let pos = pos % p.len();
        let mut b = p.clone().into_bytes();
        prop_assume!(b[pos] != b'0' + d);
        b[pos] = b'0' + d;
        prop_assert!(!luhn_valid(&String::from_utf8(b).unwrap()));
    }

    #[test]
    fn money_parsers_never_panic(a in any::<i64>(), code in ".{0,5}", human in ".{0,24}") {
        let _ = Money::parse(a, &code);
        let _ = Money::parse_positive(a, &code);
        let _ = Money::parse_human(&human);
        let _ = Currency::parse(&code);
    }

    #[test]
    fn money_display_round_trips_through_the_human_parser(a in 0i64..1_000_000_000_000, c in currency()) {
        let m = Money::parse(a, c).unwrap();
        let shown = m.to_string();
        prop_assert_eq!(Money::parse_human(&shown).unwrap(), m);
        prop_assert_eq!(Money::parse_human(&shown.replace(' ', "")).unwrap(), m);
    }

    #[test]
    fn mcc_parse_never_panics_and_four_digits_round_trip(s in ".{0,6}", d in digits(4, 4)) {
        let _ = Mcc::parse(&s);
        let mcc = Mcc::parse(&d).unwrap();
        prop_assert_eq!(mcc.as_str(), d.as_str());
    }

    #[test]
    fn expiry_parse_is_total_and_valid_ones_round_trip(m in any::<u32>(), y in any::<u32>(), vm in 1u32..=12, vy in 2000u32..2999) {
        let _ = Expiry::parse(m, y);
        let e = Expiry::parse(vm, vy).unwrap();
        prop_assert_eq!((u32::from(e.month), u32::from(e.year)), (vm, vy));
        prop_assert_eq!(e.mmyy().len(), 4);
        prop_assert_eq!(Expiry::parse(vm, vy % 100).unwrap().year, 2000 + (vy % 100) as u16);
    }

    #[test]
    fn request_validation_never_panics(
        pan in ".{0,24}", owner in ".{0,40}", cur in ".{0,4}", amount in any::<i64>(),
        mcc in ".{0,5}", month in any::<u32>(), year in any::<u32>(), cvv in ".{0,5}", txn in ".{0,70}",
        secs in any::<i64>(), uses in any::<u32>(),
    ) {
        let money = Some(pb::Money { amount_minor: amount, currency: cur.clone() });
        let issue = pb::IssueCardRequest {
            funding_pan: pan.clone(),
            owner: owner.clone(),
            spend_limit: money.clone(),
            per_transaction_limit: money.clone(),
            max_uses: uses,
            valid_until: Some(prost_types::Timestamp { seconds: secs, nanos: 0 }),
            merchant_id: owner.clone(),
            allowed_mccs: vec![mcc.clone()],
            blocked_mccs: vec![mcc.clone()],
            idempotency_key: txn.clone(),
            ..Default::default()
        };
        if let Ok(o) = Owner::parse("owner", &owner) {
            if let Err(e) = convert::issue_request(&issue, o, None) {
                prop_assert!(!e.field.is_empty());
                prop_assert!(pan.len() < 13 || !e.to_string().contains(&pan));
            }
        }
        let auth = pb::AuthorizeRequest {
            transaction_id: txn, pan, expiry_month: month, expiry_year: year, cvv,
            amount: money, merchant_id: owner, mcc,
        };
        if let Err(e) = convert::authorize_request(&auth) {
            prop_assert!(!e.field.is_empty());
        }
    }

    #[test]
    fn valid_issue_requests_parse(p in valid_pan(), limit in 1i64..1_000_000, c in currency(), owner in "[a-z0-9-]{1,40}") {
        let req = pb::IssueCardRequest {
            funding_pan: p.clone(),
            owner: owner.clone(),
            spend_limit: Some(pb::Money { amount_minor: limit, currency: c.to_string() }),
            ..Default::default()
        };
        let parsed = convert::issue_request(&req, Owner::parse("owner", &owner).unwrap(), None).unwrap();
        prop_assert_eq!(parsed.funding_pan.expose(), p.as_str());
        prop_assert_eq!(parsed.policy.spend_limit.amount_minor(), limit);
    }
}
