//! Authorize, Reverse and Detokenize: every response code, retries,
//! reversals.

use tonic::Code;
use vcn::api::pb::{self, CardState};

use crate::support::*;

/// Asserts a decline with `code` that consumed nothing of `card` (the
/// card the request was meant for).
async fn declined(
    cards: &mut Cards,
    switch: &mut Switch,
    card: &pb::IssueCardResponse,
    req: pb::AuthorizeRequest,
    code: &str,
) -> pb::AuthorizeResponse {
    let id = card.card.as_ref().unwrap().card_id.clone();
    let before = get(cards, &id).await;
    let r = authorize(switch, req).await;
    assert!(!r.approved, "expected {code}, got approval");
    assert_eq!(r.response_code, code, "{}", r.decline_reason);
    assert!(r.funding_pan.is_empty(), "no funding number on a decline");
    assert!(r.authorization_id.is_empty());
    let after = get(cards, &id).await;
    assert_eq!(
        (amount(&after.spent), after.uses),
        (amount(&before.spent), before.uses),
        "{code} consumed the card"
    );
    r
}

#[tokio::test]
async fn approval_returns_the_funding_number_and_debits_the_cap() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 2,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let r = authorize(&mut switch, auth_req(&card, "t1", 1250)).await;
    assert!(r.approved);
    assert_eq!(
        (r.response_code.as_str(), r.decline_reason.as_str()),
        ("00", "approved")
    );
    assert_eq!(r.funding_pan, FUNDING);
    assert!(r.authorization_id.starts_with("au_"));
    assert_eq!(r.card_id, card.card.as_ref().unwrap().card_id);
    assert_eq!(amount(&r.remaining), 3750);
    let c = get(&mut cards, &r.card_id).await;
    assert_eq!(
        (amount(&c.spent), c.uses, c.state),
        (1250, 1, CardState::Active as i32)
    );
}

#[tokio::test]
async fn every_decline_code() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let multi = |n| pb::IssueCardRequest {
        max_uses: n,
        ..issue_req("alice", 5000)
    };
    let card = issue(&mut cards, multi(10)).await;

    // 14: unknown number (valid Luhn) and a number failing Luhn.
    let unknown = pb::AuthorizeRequest {
        pan: "4111119999999994".into(),
        ..auth_req(&card, "u1", 100)
    };
    assert!(luhn_ok(&unknown.pan));
    let r = declined(&mut cards, &mut switch, &card, unknown, "14").await;
    assert!(r.card_id.is_empty());
    let mut bad_luhn = auth_req(&card, "u2", 100);
    bad_luhn.pan.replace_range(
        15..16,
        if bad_luhn.pan.ends_with('0') {
            "1"
        } else {
            "0"
        },
    );
    declined(&mut cards, &mut switch, &card, bad_luhn, "14").await;

    // 54: expiry month or year not the card's.
    declined(
        &mut cards,
        &mut switch,
        &card,
        pb::AuthorizeRequest {
            expiry_month: card.expiry_month % 12 + 1,
            ..auth_req(&card, "e1", 100)
        },
        "54",
    )
    .await;
    // N7: wrong CVV. (Two failures so far; an approval resets the count.)
    let wrong_cvv = format!("{:03}", (card.cvv.parse::<u32>().unwrap() + 1) % 1000);
    declined(
        &mut cards,
        &mut switch,
        &card,
        pb::AuthorizeRequest {
            cvv: wrong_cvv.clone(),
            ..auth_req(&card, "c1", 100)
        },
        "N7",
    )
    .await;
    assert!(
        authorize(&mut switch, auth_req(&card, "ok1", 100))
            .await
            .approved
    );
    // 13: amount not positive, or in another currency.
    declined(
        &mut cards,
        &mut switch,
        &card,
        pb::AuthorizeRequest {
            amount: eur(0),
            ..auth_req(&card, "a1", 0)
        },
        "13",
    )
    .await;
    declined(
        &mut cards,
        &mut switch,
        &card,
        pb::AuthorizeRequest {
            amount: eur(-5),
            ..auth_req(&card, "a2", 0)
        },
        "13",
    )
    .await;
    declined(
        &mut cards,
        &mut switch,
        &card,
        pb::AuthorizeRequest {
            amount: Some(pb::Money {
                amount_minor: 100,
                currency: "USD".into(),
            }),
            ..auth_req(&card, "a3", 0)
        },
        "13",
    )
    .await;
    // 61: over the per-transaction limit; 51: over what remains.
    let limited = issue(
        &mut cards,
        pb::IssueCardRequest {
            per_transaction_limit: eur(1000),
            ..multi(5)
        },
    )
    .await;
    declined(
        &mut cards,
        &mut switch,
        &limited,
        auth_req(&limited, "p1", 1001),
        "61",
    )
    .await;
    assert!(
        authorize(&mut switch, auth_req(&limited, "p2", 1000))
            .await
            .approved
    );
    declined(
        &mut cards,
        &mut switch,
        &card,
        auth_req(&card, "f1", 4901),
        "51",
    )
    .await;
    let r = authorize(&mut switch, auth_req(&card, "f2", 4900)).await;
    assert!(r.approved);
    assert_eq!(amount(&r.remaining), 0);
    declined(
        &mut cards,
        &mut switch,
        &card,
        auth_req(&card, "f3", 1),
        "51",
    )
    .await;

    // 62: paused. 05: closed.
    let c2 = issue(&mut cards, multi(5)).await;
    let c2_id = c2.card.as_ref().unwrap().card_id.clone();
    cards
        .pause_card(pb::CardRef {
            card_id: c2_id.clone(),
        })
        .await
        .unwrap();
    let r = declined(&mut cards, &mut switch, &c2, auth_req(&c2, "s1", 100), "62").await;
    assert_eq!(r.decline_reason, "card_paused");
    cards
        .resume_card(pb::CardRef {
            card_id: c2_id.clone(),
        })
        .await
        .unwrap();
    assert!(
        authorize(&mut switch, auth_req(&c2, "s2", 100))
            .await
            .approved
    );
    cards
        .close_card(pb::CardRef {
            card_id: c2_id.clone(),
        })
        .await
        .unwrap();
    declined(&mut cards, &mut switch, &c2, auth_req(&c2, "s3", 100), "05").await;

    // 65: a single-use card used once.
    let single = issue(&mut cards, issue_req("alice", 5000)).await;
    assert!(
        authorize(&mut switch, auth_req(&single, "u-1", 100))
            .await
            .approved
    );
    let r = declined(
        &mut cards,
        &mut switch,
        &single,
        auth_req(&single, "u-2", 100),
        "65",
    )
    .await;
    assert_eq!(r.decline_reason, "card_used");
    assert_eq!(
        get(&mut cards, &single.card.unwrap().card_id).await.state,
        CardState::Used as i32
    );

    // 94: a transaction id seen before with different content.
    let r = authorize(
        &mut switch,
        pb::AuthorizeRequest {
            amount: eur(200),
            ..auth_req(&card, "ok1", 100)
        },
    )
    .await;
    assert_eq!(r.response_code, "94");
    assert!(!r.approved);
}

#[tokio::test]
async fn past_valid_until_declines_54() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let soon = time::OffsetDateTime::now_utc().unix_timestamp() + 2;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            valid_until: Some(prost_types::Timestamp {
                seconds: soon,
                nanos: 0,
            }),
            ..issue_req("alice", 5000)
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let r = authorize(&mut switch, auth_req(&card, "late", 100)).await;
    assert_eq!(
        (r.response_code.as_str(), r.decline_reason.as_str()),
        ("54", "card_expired")
    );
    assert_eq!(
        amount(&get(&mut cards, &card.card.unwrap().card_id).await.spent),
        0
    );
}

#[tokio::test]
async fn merchant_and_mcc_locks_decline_57() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let at =
        |card: &pb::IssueCardResponse, txn: &str, merchant: &str, mcc: &str| pb::AuthorizeRequest {
            merchant_id: merchant.into(),
            mcc: mcc.into(),
            ..auth_req(card, txn, 100)
        };
    let fixed = issue(
        &mut cards,
        pb::IssueCardRequest {
            merchant_id: "shop-1".into(),
            max_uses: 5,
            ..issue_req("a", 5000)
        },
    )
    .await;
    assert_eq!(
        authorize(&mut switch, at(&fixed, "m1", "shop-2", "5411"))
            .await
            .response_code,
        "57"
    );
    assert_eq!(
        authorize(&mut switch, at(&fixed, "m2", "shop-1", "5411"))
            .await
            .response_code,
        "00"
    );

    let first = issue(
        &mut cards,
        pb::IssueCardRequest {
            lock_to_first_merchant: true,
            max_uses: 5,
            ..issue_req("a", 5000)
        },
    )
    .await;
    assert_eq!(
        authorize(&mut switch, at(&first, "l1", "shop-7", "5411"))
            .await
            .response_code,
        "00"
    );
    assert_eq!(
        get(&mut cards, &first.card.as_ref().unwrap().card_id)
            .await
            .merchant_id,
        "shop-7"
    );
    assert_eq!(
        authorize(&mut switch, at(&first, "l2", "shop-8", "5411"))
            .await
            .response_code,
        "57"
    );
    assert_eq!(
        authorize(&mut switch, at(&first, "l3", "shop-7", "5411"))
            .await
            .response_code,
        "00"
    );

    let mccs = issue(
        &mut cards,
        pb::IssueCardRequest {
            allowed_mccs: vec!["5411".into(), "5812".into()],
            blocked_mccs: vec!["5812".into()],
            max_uses: 5,
            ..issue_req("a", 5000)
        },
    )
    .await;
    assert_eq!(
        authorize(&mut switch, at(&mccs, "c1", "s", "7995"))
            .await
            .response_code,
        "57"
    );
    assert_eq!(
        authorize(&mut switch, at(&mccs, "c2", "s", "5812"))
            .await
            .response_code,
        "57"
    );
    assert_eq!(
        authorize(&mut switch, at(&mccs, "c3", "s", ""))
            .await
            .response_code,
        "57"
    );
    let r = authorize(&mut switch, at(&mccs, "c4", "s", "5411")).await;
    assert_eq!(r.response_code, "00");
    assert_eq!(amount(&r.remaining), 4900);
}

#[tokio::test]
async fn three_wrong_cvvs_block_until_resumed() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 5,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let id = card.card.as_ref().unwrap().card_id.clone();
    let wrong = format!("{:03}", (card.cvv.parse::<u32>().unwrap() + 7) % 1000);
    for (i, code) in ["N7", "N7"].iter().enumerate() {
        let r = authorize(
            &mut switch,
            pb::AuthorizeRequest {
                cvv: wrong.clone(),
                ..auth_req(&card, &format!("w{i}"), 100)
            },
        )
        .await;
        assert_eq!(&r.response_code, code);
    }
    let r = authorize(
        &mut switch,
        pb::AuthorizeRequest {
            expiry_year: card.expiry_year + 1,
            ..auth_req(&card, "w3", 100)
        },
    )
    .await;
    assert_eq!(r.response_code, "54");
    assert_eq!(get(&mut cards, &id).await.state, CardState::Blocked as i32);
    let r = authorize(&mut switch, auth_req(&card, "good", 100)).await;
    assert_eq!(
        (r.response_code.as_str(), r.decline_reason.as_str()),
        ("62", "card_blocked")
    );
    let resumed = cards
        .resume_card(pb::CardRef {
            card_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.state, CardState::Active as i32);
    assert!(
        authorize(&mut switch, auth_req(&card, "good2", 100))
            .await
            .approved
    );
}

#[tokio::test]
async fn a_retried_transaction_gets_the_first_answer_and_debits_once() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 5,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let first = authorize(&mut switch, auth_req(&card, "retry-1", 700)).await;
    let again = authorize(&mut switch, auth_req(&card, "retry-1", 700)).await;
    assert!(first.approved && again.approved);
    assert_eq!(again.authorization_id, first.authorization_id);
    assert_eq!(again.funding_pan, FUNDING);
    assert_eq!(amount(&again.remaining), 4300);
    let c = get(&mut cards, &first.card_id).await;
    assert_eq!((amount(&c.spent), c.uses), (700, 1));

    // A retried decline is the same decline, even once it would pass.
    let d1 = authorize(&mut switch, auth_req(&card, "retry-2", 9000)).await;
    cards
        .update_card_limits(pb::UpdateCardLimitsRequest {
            card_id: first.card_id.clone(),
            spend_limit: eur(20000),
            per_transaction_limit: None,
        })
        .await
        .unwrap();
    let d2 = authorize(&mut switch, auth_req(&card, "retry-2", 9000)).await;
    assert_eq!(
        (d1.response_code.as_str(), d2.response_code.as_str()),
        ("51", "51")
    );
    // Unknown numbers are remembered too.
    let u = pb::AuthorizeRequest {
        pan: "4111119999999994".into(),
        ..auth_req(&card, "retry-3", 1)
    };
    assert_eq!(authorize(&mut switch, u.clone()).await.response_code, "14");
    assert_eq!(authorize(&mut switch, u).await.response_code, "14");
}

#[tokio::test]
async fn reversals_restore_the_cap_never_more_than_approved() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(&mut cards, issue_req("alice", 5000)).await;
    let id = card.card.as_ref().unwrap().card_id.clone();
    assert!(
        authorize(&mut switch, auth_req(&card, "t1", 3000))
            .await
            .approved
    );
    let rev = |txn: &str, amt: Option<i64>, rid: &str| pb::ReverseRequest {
        transaction_id: txn.into(),
        amount: amt.and_then(eur),
        reversal_id: rid.into(),
    };

    let r = switch
        .reverse(rev("t1", Some(1000), "r1"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.reversed);
    assert_eq!(
        (r.response_code.as_str(), amount(&r.remaining)),
        ("00", 3000)
    );
    // The same reversal id again: the first answer, no second reversal.
    let r = switch
        .reverse(rev("t1", Some(1000), "r1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.reversed, amount(&r.remaining)), (true, 3000));
    assert_eq!(
        switch
            .reverse(rev("t1", Some(5), "r1"))
            .await
            .unwrap()
            .into_inner()
            .response_code,
        "94"
    );
    // More than is left to reverse: refused.
    let r = switch
        .reverse(rev("t1", Some(2001), ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.reversed, r.response_code.as_str()), (false, "13"));
    // The rest, then a retried full reversal changes nothing.
    let r = switch
        .reverse(rev("t1", None, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.reversed, amount(&r.remaining)), (true, 5000));
    let r = switch
        .reverse(rev("t1", None, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.reversed, amount(&r.remaining)), (true, 5000));
    let c = get(&mut cards, &id).await;
    assert_eq!(
        (amount(&c.spent), c.uses, c.state),
        (0, 1, CardState::Used as i32),
        "a reversal gives back the cap, not the use"
    );

    // A declined authorisation cannot be reversed; an unknown one is not found.
    authorize(&mut switch, auth_req(&card, "t2", 10)).await;
    let r = switch
        .reverse(rev("t2", None, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.reversed, r.response_code.as_str()), (false, "12"));
    assert_status(
        switch.reverse(rev("nope", None, "")).await,
        Code::NotFound,
        "nope",
    );
}

#[tokio::test]
async fn detokenize_maps_any_card_in_any_state() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            funding_pan: "5555555555554444".into(),
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let id = card.card.as_ref().unwrap().card_id.clone();
    cards
        .close_card(pb::CardRef {
            card_id: id.clone(),
        })
        .await
        .unwrap();
    let d = switch
        .detokenize(pb::DetokenizeRequest {
            pan: card.pan.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (d.funding_pan.as_str(), d.card_id.as_str(), d.state),
        ("5555555555554444", id.as_str(), CardState::Closed as i32)
    );
    assert_status(
        switch
            .detokenize(pb::DetokenizeRequest {
                pan: "4111119999999994".into(),
            })
            .await,
        Code::NotFound,
        "411111******9994",
    );
    assert_status(
        switch
            .detokenize(pb::DetokenizeRequest {
                pan: "4111119999999995".into(),
            })
            .await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        switch
            .detokenize(pb::DetokenizeRequest {
                pan: "41111x".into(),
            })
            .await,
        Code::InvalidArgument,
        "pan",
    );
}
