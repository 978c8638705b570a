//! IssueCard and the card lifecycle.

use std::sync::Arc;

use tonic::Code;
use vcn::api::pb::{self, CardState};

use crate::support::*;

#[tokio::test]
async fn a_new_number_keeps_bin_and_length_is_luhn_valid_and_comes_with_cvv_and_expiry() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let mut seen = std::collections::HashSet::new();
    for (funding, len) in [
        (FUNDING, 16),
        ("378282246310005", 15),
        ("4222222222222", 13),
        ("4000000000000000006", 19),
    ] {
        for _ in 0..5 {
            let r = issue(
                &mut cards,
                pb::IssueCardRequest {
                    funding_pan: funding.into(),
                    ..issue_req("alice", 5000)
                },
            )
            .await;
            assert_eq!(r.pan.len(), len);
            assert_eq!(&r.pan[..6], &funding[..6]);
            assert_ne!(r.pan, funding);
            assert!(luhn_ok(&r.pan), "{}", r.pan);
            assert!(seen.insert(r.pan.clone()), "numbers must not repeat");
            assert!(r.cvv.len() == 3 && r.cvv.bytes().all(|b| b.is_ascii_digit()));
            let card = r.card.as_ref().unwrap();
            assert_eq!(
                card.masked_pan,
                format!(
                    "{}{}{}",
                    &r.pan[..6],
                    "*".repeat(len - 10),
                    &r.pan[len - 4..]
                )
            );
            assert_eq!(card.last4, &r.pan[len - 4..]);
            assert_eq!(
                (card.expiry_month, card.expiry_year),
                (r.expiry_month, r.expiry_year)
            );
            assert!(r.expiry_year >= 2026 && (1..=12).contains(&r.expiry_month));
        }
    }
}

#[tokio::test]
async fn card_fields_reflect_the_request_and_expiry_is_the_month_of_valid_until() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    // 2027-03-31T23:00:00Z
    let valid_until = prost_types::Timestamp {
        seconds: 1_806_534_000,
        nanos: 0,
    };
    let r = issue(
        &mut cards,
        pb::IssueCardRequest {
            per_transaction_limit: eur(2000),
            max_uses: 3,
            valid_until: Some(valid_until),
            merchant_id: "shop-9".into(),
            allowed_mccs: vec!["5411".into(), "5999".into()],
            blocked_mccs: vec!["7995".into()],
            ..issue_req("bob", 5000)
        },
    )
    .await;
    assert_eq!((r.expiry_month, r.expiry_year), (3, 2027));
    let c = get(&mut cards, &r.card.as_ref().unwrap().card_id).await;
    assert_eq!(c.owner, "bob");
    assert_eq!(c.state, CardState::Active as i32);
    assert_eq!(
        (
            amount(&c.spend_limit),
            amount(&c.spent),
            amount(&c.remaining)
        ),
        (5000, 0, 5000)
    );
    assert_eq!(amount(&c.per_transaction_limit), 2000);
    assert_eq!((c.max_uses, c.uses), (3, 0));
    assert_eq!(c.valid_until, Some(valid_until));
    assert_eq!(c.merchant_id, "shop-9");
    assert_eq!(c.allowed_mccs, ["5411", "5999"]);
    assert_eq!(c.blocked_mccs, ["7995"]);
    assert!(c.created_at.is_some());
}

#[tokio::test]
async fn max_uses_zero_is_single_use_and_unset_valid_until_is_the_default() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let r = issue(&mut cards, issue_req("alice", 100)).await;
    let c = r.card.unwrap();
    assert_eq!(c.max_uses, 1);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let days = (c.valid_until.unwrap().seconds - now) as f64 / 86400.0;
    assert!(
        (29.9..30.1).contains(&days),
        "default validity is 30 days, got {days}"
    );
}

#[tokio::test]
async fn idempotency_key_returns_the_same_card_for_the_same_owner() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let req = pb::IssueCardRequest {
        idempotency_key: "order-77".into(),
        ..issue_req("alice", 5000)
    };
    let first = issue(&mut cards, req.clone()).await;
    let again = issue(&mut cards, req.clone()).await;
    assert_eq!(
        again.card.as_ref().unwrap().card_id,
        first.card.as_ref().unwrap().card_id
    );
    assert_eq!(
        (again.pan.as_str(), again.cvv.as_str()),
        (first.pan.as_str(), first.cvv.as_str())
    );

    // Another owner with the same key gets a card of its own.
    let other = issue(
        &mut cards,
        pb::IssueCardRequest {
            owner: "bob".into(),
            ..req.clone()
        },
    )
    .await;
    assert_ne!(
        other.card.unwrap().card_id,
        first.card.as_ref().unwrap().card_id
    );

    // The same key with other parameters is refused, not silently replayed.
    assert_status(
        cards
            .issue_card(pb::IssueCardRequest {
                spend_limit: eur(9999),
                ..req
            })
            .await,
        Code::AlreadyExists,
        "idempotency_key",
    );
    let list = cards
        .list_cards(pb::ListCardsRequest {
            owner: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.cards.len(),
        1,
        "one card for alice, however often asked"
    );
}

#[tokio::test]
async fn concurrent_issues_with_one_idempotency_key_make_one_card() {
    let server = TestServer::start().await;
    let (cards, _) = server.clients().await;
    let req = pb::IssueCardRequest {
        idempotency_key: "race".into(),
        ..issue_req("alice", 5000)
    };
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (mut c, r) = (cards.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            c.issue_card(r)
                .await
                .unwrap()
                .into_inner()
                .card
                .unwrap()
                .card_id
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn eight_digit_bin_and_range_prefix_from_config() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        bin_length: 8,
        range_prefix: "99".into(),
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let (mut cards, _) = server.clients().await;
    for _ in 0..5 {
        let r = issue(&mut cards, issue_req("alice", 100)).await;
        assert_eq!(&r.pan[..10], "4111111199");
        assert!(luhn_ok(&r.pan));
    }
    // A 13-digit card leaves too few random digits after 8 + 2.
    assert_status(
        cards
            .issue_card(pb::IssueCardRequest {
                funding_pan: "4222222222222".into(),
                ..issue_req("alice", 100)
            })
            .await,
        Code::InvalidArgument,
        "funding_pan",
    );
}

#[tokio::test]
async fn a_virtual_number_cannot_be_used_as_a_funding_card() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let token = issue(&mut cards, issue_req("alice", 100)).await;
    assert_status(
        cards
            .issue_card(pb::IssueCardRequest {
                funding_pan: token.pan,
                ..issue_req("alice", 100)
            })
            .await,
        Code::InvalidArgument,
        "funding_pan",
    );
}

#[tokio::test]
async fn lifecycle_pause_resume_close_and_limits() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let id = issue(&mut cards, issue_req("alice", 5000))
        .await
        .card
        .unwrap()
        .card_id;
    let r = || pb::CardRef {
        card_id: id.clone(),
    };
    assert_eq!(
        cards.pause_card(r()).await.unwrap().into_inner().state,
        CardState::Paused as i32
    );
    assert_eq!(
        cards.resume_card(r()).await.unwrap().into_inner().state,
        CardState::Active as i32
    );
    let c = cards
        .update_card_limits(pb::UpdateCardLimitsRequest {
            card_id: id.clone(),
            spend_limit: eur(8000),
            per_transaction_limit: eur(100),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            amount(&c.spend_limit),
            amount(&c.remaining),
            amount(&c.per_transaction_limit)
        ),
        (8000, 8000, 100)
    );
    let c = cards
        .update_card_limits(pb::UpdateCardLimitsRequest {
            card_id: id.clone(),
            spend_limit: None,
            per_transaction_limit: eur(0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        c.per_transaction_limit, None,
        "0 removes the per-transaction limit"
    );
    assert_status(
        cards
            .update_card_limits(pb::UpdateCardLimitsRequest {
                card_id: id.clone(),
                spend_limit: Some(pb::Money {
                    amount_minor: 100,
                    currency: "USD".into(),
                }),
                per_transaction_limit: None,
            })
            .await,
        Code::InvalidArgument,
        "spend_limit.currency",
    );
    assert_eq!(
        cards.close_card(r()).await.unwrap().into_inner().state,
        CardState::Closed as i32
    );
    assert_eq!(
        cards.close_card(r()).await.unwrap().into_inner().state,
        CardState::Closed as i32,
        "close is idempotent"
    );
    assert_status(
        cards.resume_card(r()).await,
        Code::FailedPrecondition,
        "closed",
    );
    assert_status(
        cards.pause_card(r()).await,
        Code::FailedPrecondition,
        "closed",
    );
    assert_status(
        cards
            .update_card_limits(pb::UpdateCardLimitsRequest {
                card_id: id.clone(),
                spend_limit: eur(1),
                per_transaction_limit: None,
            })
            .await,
        Code::FailedPrecondition,
        "closed",
    );
}

#[tokio::test]
async fn list_pages_through_an_owners_cards_newest_first() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let mut issued = Vec::new();
    for _ in 0..7 {
        issued.push(
            issue(&mut cards, issue_req("carol", 100))
                .await
                .card
                .unwrap()
                .card_id,
        );
    }
    issue(&mut cards, issue_req("dave", 100)).await;
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = cards
            .list_cards(pb::ListCardsRequest {
                owner: "carol".into(),
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.cards.len() <= 3);
        assert!(page.cards.iter().all(|c| c.owner == "carol"));
        listed.extend(page.cards.into_iter().map(|c| c.card_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut want = issued.clone();
    want.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(got, want, "every card exactly once");
    assert_status(
        cards
            .list_cards(pb::ListCardsRequest {
                owner: "carol".into(),
                page_size: 3,
                page_token: "zz".into(),
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );
}

/// A widget holds no real card number: it names an earlier card of its
/// owner, and the new card gets that card's funding card.
#[tokio::test]
async fn a_card_issued_on_an_earlier_cards_funding_card_needs_no_real_number() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let first = issue(&mut cards, issue_req("alice", 500)).await;
    let first_id = first.card.as_ref().unwrap().card_id.clone();
    let bob_card = issue(&mut cards, issue_req("bob", 500)).await;
    let bob_id = bob_card.card.as_ref().unwrap().card_id.clone();

    // Alice's widget: pinned to alice, given only the card id.
    let widget_key = server.add_client("alice-widget", vcn::clients::Role::Cards, Some("alice"));
    let mut widget = server.cards_as(&widget_key).await;
    let by_ref = |id: &str| pb::IssueCardRequest {
        funding_pan: String::new(),
        funding_card_id: id.into(),
        ..issue_req("alice", 300)
    };
    let second = issue(&mut widget, by_ref(&first_id)).await;
    assert_ne!(second.pan, first.pan);
    assert_eq!(&second.pan[..6], &FUNDING[..6]);
    assert!(luhn_ok(&second.pan));
    // The switch gets the real funding card for it.
    let d = switch
        .detokenize(pb::DetokenizeRequest {
            pan: second.pan.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.funding_pan, FUNDING);
    assert!(
        authorize(&mut switch, auth_req(&second, "ref-1", 100))
            .await
            .approved
    );

    // Another owner's card, a card that does not exist, and both fields at
    // once: refused, naming the field, the same way for the first two.
    let before = list_count(&mut cards, "alice").await;
    for id in [bob_id.as_str(), "vc_000000000000000000000000"] {
        assert_status(
            widget.issue_card(by_ref(id)).await,
            Code::InvalidArgument,
            "funding_card_id",
        );
    }
    assert_status(
        cards
            .issue_card(pb::IssueCardRequest {
                funding_card_id: first_id.clone(),
                ..issue_req("alice", 300)
            })
            .await,
        Code::InvalidArgument,
        "not both",
    );
    assert_status(
        widget.issue_card(by_ref("not an id")).await,
        Code::InvalidArgument,
        "funding_card_id",
    );
    assert_eq!(list_count(&mut cards, "alice").await, before);
    server.stop().await;
}

async fn list_count(cards: &mut Cards, owner: &str) -> usize {
    cards
        .list_cards(pb::ListCardsRequest {
            owner: owner.into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .cards
        .len()
}
