//! Bad input: INVALID_ARGUMENT naming the field, nothing written, and the
//! server keeps serving.

use tonic::Code;
use vcn::api::pb;

use crate::support::*;

#[tokio::test]
async fn every_malformed_issue_field_is_named_and_nothing_is_written() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let base = || issue_req("val", 5000);
    let past = prost_types::Timestamp {
        seconds: 1_000_000_000,
        nanos: 0,
    };
    let cases: Vec<(pb::IssueCardRequest, &str)> = vec![
        (
            pb::IssueCardRequest {
                funding_pan: "4111a11111111111".into(),
                ..base()
            },
            "funding_pan",
        ),
        (
            pb::IssueCardRequest {
                funding_pan: "4111111111111112".into(),
                ..base()
            },
            "funding_pan",
        ),
        (
            pb::IssueCardRequest {
                funding_pan: "".into(),
                ..base()
            },
            "funding_pan",
        ),
        (
            pb::IssueCardRequest {
                funding_pan: "411111111111".into(),
                ..base()
            },
            "funding_pan",
        ),
        (
            pb::IssueCardRequest {
                spend_limit: Some(pb::Money {
                    amount_minor: 100,
                    currency: "XYZ".into(),
                }),
                ..base()
            },
            "spend_limit.currency",
        ),
        (
            pb::IssueCardRequest {
                spend_limit: eur(-100),
                ..base()
            },
            "spend_limit.amount_minor",
        ),
        (
            pb::IssueCardRequest {
                spend_limit: eur(0),
                ..base()
            },
            "spend_limit.amount_minor",
        ),
        (
            pb::IssueCardRequest {
                spend_limit: None,
                ..base()
            },
            "spend_limit",
        ),
        (
            pb::IssueCardRequest {
                per_transaction_limit: Some(pb::Money {
                    amount_minor: 100,
                    currency: "USD".into(),
                }),
                ..base()
            },
            "per_transaction_limit.currency",
        ),
        (
            pb::IssueCardRequest {
                valid_until: Some(past),
                ..base()
            },
            "valid_until",
        ),
        (
            pb::IssueCardRequest {
                owner: "".into(),
                ..base()
            },
            "owner",
        ),
        (
            pb::IssueCardRequest {
                owner: "x".repeat(1000),
                ..base()
            },
            "owner",
        ),
        (
            pb::IssueCardRequest {
                allowed_mccs: vec!["5411".into(), "541".into()],
                ..base()
            },
            "allowed_mccs[1]",
        ),
        (
            pb::IssueCardRequest {
                blocked_mccs: vec!["abcd".into()],
                ..base()
            },
            "blocked_mccs[0]",
        ),
        (
            pb::IssueCardRequest {
                merchant_id: "m".repeat(65),
                ..base()
            },
            "merchant_id",
        ),
    ];
    for (req, field) in cases {
        let r = cards.issue_card(req).await;
        assert_status(r, Code::InvalidArgument, &format!("{field}:"));
    }
    let list = cards
        .list_cards(pb::ListCardsRequest {
            owner: "val".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.cards.is_empty(),
        "a rejected request left a card behind"
    );
    // Still serving.
    assert!(issue(&mut cards, base()).await.card.is_some());
}

#[tokio::test]
async fn malformed_authorisations_and_ids_are_named() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(&mut cards, issue_req("alice", 5000)).await;
    let base = || auth_req(&card, "t", 100);
    let cases: Vec<(pb::AuthorizeRequest, &str)> = vec![
        (
            pb::AuthorizeRequest {
                transaction_id: "".into(),
                ..base()
            },
            "transaction_id",
        ),
        (
            pb::AuthorizeRequest {
                pan: "4111-1111".into(),
                ..base()
            },
            "pan",
        ),
        (
            pb::AuthorizeRequest {
                expiry_month: 0,
                ..base()
            },
            "expiry_month",
        ),
        (
            pb::AuthorizeRequest {
                expiry_year: 20271,
                ..base()
            },
            "expiry_year",
        ),
        (
            pb::AuthorizeRequest {
                cvv: "1234".into(),
                ..base()
            },
            "cvv",
        ),
        (
            pb::AuthorizeRequest {
                amount: None,
                ..base()
            },
            "amount",
        ),
        (
            pb::AuthorizeRequest {
                amount: Some(pb::Money {
                    amount_minor: 1,
                    currency: "eur".into(),
                }),
                ..base()
            },
            "amount.currency",
        ),
        (
            pb::AuthorizeRequest {
                mcc: "12345".into(),
                ..base()
            },
            "mcc",
        ),
    ];
    for (req, field) in cases {
        assert_status(
            switch.authorize(req).await,
            Code::InvalidArgument,
            &format!("{field}:"),
        );
    }
    // None of them was recorded: the id is still free.
    assert!(authorize(&mut switch, base()).await.approved);

    assert_status(
        cards
            .get_card(pb::GetCardRequest {
                card_id: "nope".into(),
            })
            .await,
        Code::InvalidArgument,
        "card_id:",
    );
    assert_status(
        cards
            .get_card(pb::GetCardRequest {
                card_id: "vc_000000000000000000000000".into(),
            })
            .await,
        Code::NotFound,
        "vc_000000000000000000000000",
    );
    assert_status(
        cards
            .pause_card(pb::CardRef {
                card_id: "vc_000000000000000000000000".into(),
            })
            .await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        cards
            .update_card_limits(pb::UpdateCardLimitsRequest {
                card_id: card.card.unwrap().card_id,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "spend_limit",
    );
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let huge = pb::IssueCardRequest {
        owner: "x".repeat(100 * 1024),
        ..issue_req("big", 100)
    };
    let err = cards.issue_card(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(issue(&mut cards, issue_req("alice", 100))
        .await
        .card
        .is_some());
}
