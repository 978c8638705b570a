//! What was acknowledged survives a restart; the vault refuses the wrong key.

use std::sync::Arc;

use vcn::api::pb::{self, CardState};
use vcn::server::{Service, StartError};

use crate::support::*;

#[tokio::test]
async fn cards_transactions_and_clients_survive_a_restart() {
    let server = TestServer::start().await;
    let cards_key = server.add_client("web", vcn::clients::Role::Cards, None);
    let switch_key = server.add_client("sw", vcn::clients::Role::Switch, None);
    let (mut cards, mut switch) = (
        server.cards_as(&cards_key).await,
        server.switch_as(&switch_key).await,
    );
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 3,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let id = card.card.as_ref().unwrap().card_id.clone();
    let first = authorize(&mut switch, auth_req(&card, "t1", 1200)).await;
    assert!(first.approved);
    cards
        .pause_card(pb::CardRef {
            card_id: id.clone(),
        })
        .await
        .unwrap();
    drop((cards, switch));

    let server = server.restart().await;
    let (mut cards, mut switch) = (
        server.cards_as(&cards_key).await,
        server.switch_as(&switch_key).await,
    );
    let c = get(&mut cards, &id).await;
    assert_eq!(
        (amount(&c.spent), c.uses, c.state),
        (1200, 1, CardState::Paused as i32)
    );
    // The retry of an acknowledged transaction still gets its first answer.
    let again = authorize(&mut switch, auth_req(&card, "t1", 1200)).await;
    assert_eq!(
        (again.approved, again.authorization_id.as_str()),
        (true, first.authorization_id.as_str())
    );
    let d = switch
        .detokenize(pb::DetokenizeRequest {
            pan: card.pan.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.funding_pan, FUNDING);
    // The CVV still verifies after the restart (derived, not stored).
    cards
        .resume_card(pb::CardRef {
            card_id: id.clone(),
        })
        .await
        .unwrap();
    assert!(
        authorize(&mut switch, auth_req(&card, "t2", 100))
            .await
            .approved
    );
    server.stop().await;
}

#[tokio::test]
async fn the_wrong_master_key_is_refused_at_start() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    issue(&mut cards, issue_req("alice", 100)).await;
    drop(cards);
    let (dir, config) = server.stop().await;

    std::fs::remove_file(config.keys_dir.join("master.key")).unwrap();
    // A missing key on an existing vault is not replaced by a new one.
    match Service::open(&config).await {
        Err(e @ StartError::KeyLostForVault(..)) => assert!(e.to_string().contains("restore")),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("started without its key"),
    }
    assert!(!config.keys_dir.join("master.key").exists());
    // Another key is refused by its check value.
    vcn::vault::keyfile::generate(&config.keys_dir).unwrap();
    match Service::open(&config).await {
        Err(e) => assert!(
            e.to_string()
                .contains("not the one this vault was written with"),
            "{e}"
        ),
        Ok(_) => panic!("started with the wrong key"),
    }
    let _ = Arc::strong_count(&dir);
}

#[tokio::test]
async fn production_config_without_dev_keys_refuses_to_invent_a_key() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        dev_keys: false,
        ..config_in(dir.path())
    };
    match TestServer::try_start_with(dir, config.clone()).await {
        Err(e) => assert!(e.to_string().contains("vcn keygen"), "{e}"),
        Ok(_) => panic!("started without a key"),
    }
    assert!(!config.keys_dir.join("master.key").exists());
}
