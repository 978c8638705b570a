//! Enumeration defences: failed lookups are counted per client and failed
//! authentications per address; past the limit the client or address is
//! refused, and the refusal is audited.

use std::sync::Arc;

use tonic::Code;
use vcn::api::pb;
use vcn::clients::Role;

use crate::support::*;

#[tokio::test]
async fn a_client_guessing_numbers_is_refused_past_its_limit() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        max_failed_lookups_per_minute: 5,
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let (mut cards, mut guesser) = server.clients().await;
    let honest_key = server.add_client("honest", Role::Switch, None);
    let mut honest = server.switch_as(&honest_key).await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 5,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let guesses = ["4000000000000002", "4000000000000010", "4000000000000028"];
    for (i, pan) in guesses.iter().enumerate() {
        let r = pb::AuthorizeRequest {
            pan: pan.to_string(),
            ..auth_req(&card, &format!("g{i}"), 100)
        };
        assert_eq!(authorize(&mut guesser, r).await.response_code, "14");
    }
    // Unknown numbers to Detokenize and wrong CVVs count too.
    assert_eq!(
        guesser
            .detokenize(pb::DetokenizeRequest {
                pan: "4000000000000036".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let wrong_cvv = pb::AuthorizeRequest {
        cvv: format!("{:03}", (card.cvv.parse::<u32>().unwrap() + 1) % 1000),
        ..auth_req(&card, "g9", 100)
    };
    assert!(!authorize(&mut guesser, wrong_cvv).await.approved);
    // Five failures: the guesser is refused, even with the right details.
    assert_status(
        guesser.authorize(auth_req(&card, "g10", 100)).await,
        Code::ResourceExhausted,
        "failed lookups",
    );
    assert_status(
        guesser
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone(),
            })
            .await,
        Code::ResourceExhausted,
        "failed lookups",
    );
    // Another client is not affected.
    assert!(
        authorize(&mut honest, auth_req(&card, "h1", 100))
            .await
            .approved
    );
    drop((cards, guesser, honest));
    let (_dir, config) = server.stop().await;
    let entries = vcn::audit::read_entries(&config.audit_path()).unwrap();
    assert!(entries
        .iter()
        .any(|e| e.outcome == "refused: too many failed lookups" && e.action == "authorize"));
}

#[tokio::test]
async fn failed_authentication_is_rate_limited_per_address() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        max_failed_auth_per_minute: 3,
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let good = server.add_client("web", Role::Cards, None);
    for i in 0..3 {
        let mut bad = server.cards_as(&format!("vcn_guess{i}")).await;
        assert_status(
            bad.get_card(pb::GetCardRequest {
                card_id: "vc_00".into(),
            })
            .await,
            Code::Unauthenticated,
            "unknown API key",
        );
    }
    // The address is now refused, even with a valid key.
    let mut cards = server.cards_as(&good).await;
    assert_status(
        cards.issue_card(issue_req("alice", 100)).await,
        Code::ResourceExhausted,
        "failed authentications",
    );
    drop(cards);
    let (_dir, config) = server.stop().await;
    let entries = vcn::audit::read_entries(&config.audit_path()).unwrap();
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.outcome == "refused: unknown API key")
            .count(),
        3
    );
    assert!(entries
        .iter()
        .any(|e| e.outcome == "refused: too many failed authentications"));
}
