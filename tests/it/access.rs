//! Authentication, roles and owner pinning.

use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vcn::api::pb;
use vcn::api::pb::authorization_service_client::AuthorizationServiceClient;
use vcn::api::pb::card_service_client::CardServiceClient;
use vcn::clients::Role;

use crate::support::*;

#[tokio::test]
async fn missing_or_wrong_keys_are_unauthenticated() {
    let server = TestServer::start().await;
    server.add_client("web", Role::Cards, None);
    let mut anon = CardServiceClient::new(server.channel(None).await);
    assert_status(
        anon.issue_card(issue_req("a", 100)).await,
        Code::Unauthenticated,
        "authorization: Bearer",
    );
    let mut wrong = server.cards_as("vcn_0000").await;
    assert_status(
        wrong.issue_card(issue_req("a", 100)).await,
        Code::Unauthenticated,
        "unknown API key",
    );
    let mut anon_switch = AuthorizationServiceClient::new(server.channel(None).await);
    assert_status(
        anon_switch
            .detokenize(pb::DetokenizeRequest {
                pan: FUNDING.into(),
            })
            .await,
        Code::Unauthenticated,
        "API key",
    );
}

#[tokio::test]
async fn health_needs_no_key_and_reports_serving() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel(None).await);
    for service in ["", "vcn.v1.CardService", "vcn.v1.AuthorizationService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

#[tokio::test]
async fn roles_decide_which_service_a_client_may_call() {
    let server = TestServer::start().await;
    let cards_key = server.add_client("web", Role::Cards, None);
    let switch_key = server.add_client("sw", Role::Switch, None);
    let admin_key = server.add_client("ops", Role::Admin, None);
    let mut cards = server.cards_as(&cards_key).await;
    let card = issue(&mut cards, issue_req("alice", 5000)).await;

    // cards may not authorise, switch may not issue.
    let mut as_cards = server.switch_as(&cards_key).await;
    assert_status(
        as_cards.authorize(auth_req(&card, "t1", 100)).await,
        Code::PermissionDenied,
        "role switch",
    );
    assert_status(
        as_cards
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone(),
            })
            .await,
        Code::PermissionDenied,
        "role switch",
    );
    let mut as_switch = server.cards_as(&switch_key).await;
    assert_status(
        as_switch.issue_card(issue_req("alice", 100)).await,
        Code::PermissionDenied,
        "role cards or admin",
    );

    // admin may use all of CardService, for any owner, but not authorise.
    let mut admin = server.cards_as(&admin_key).await;
    let id = card.card.as_ref().unwrap().card_id.clone();
    assert_eq!(get(&mut admin, &id).await.owner, "alice");
    admin
        .pause_card(pb::CardRef {
            card_id: id.clone(),
        })
        .await
        .unwrap();
    issue(&mut admin, issue_req("zed", 100)).await;
    let mut admin_switch = server.switch_as(&admin_key).await;
    assert_status(
        admin_switch.authorize(auth_req(&card, "t2", 100)).await,
        Code::PermissionDenied,
        "role switch",
    );

    // The refused authorisations changed nothing.
    let c = get(&mut cards, &id).await;
    assert_eq!((amount(&c.spent), c.uses), (0, 0));
}

#[tokio::test]
async fn a_pinned_client_sees_and_changes_only_its_owners_cards() {
    let server = TestServer::start().await;
    let (mut bank, _) = server.clients().await;
    let widget_key = server.add_client("widget-alice", Role::Cards, Some("alice"));
    let mut widget = server.cards_as(&widget_key).await;

    let bobs = issue(&mut bank, issue_req("bob", 100))
        .await
        .card
        .unwrap()
        .card_id;
    // Issue with the owner left empty: the pinned owner.
    let mine = issue(&mut widget, issue_req("", 100)).await.card.unwrap();
    assert_eq!(mine.owner, "alice");
    issue(&mut widget, issue_req("alice", 100)).await;
    assert_status(
        widget.issue_card(issue_req("bob", 100)).await,
        Code::PermissionDenied,
        "one owner",
    );

    assert_status(
        widget
            .get_card(pb::GetCardRequest {
                card_id: bobs.clone(),
            })
            .await,
        Code::NotFound,
        &bobs,
    );
    assert_status(
        widget
            .close_card(pb::CardRef {
                card_id: bobs.clone(),
            })
            .await,
        Code::NotFound,
        &bobs,
    );
    assert_status(
        widget
            .update_card_limits(pb::UpdateCardLimitsRequest {
                card_id: bobs.clone(),
                spend_limit: eur(1),
                per_transaction_limit: None,
            })
            .await,
        Code::NotFound,
        &bobs,
    );
    assert_eq!(
        get(&mut bank, &bobs).await.state,
        pb::CardState::Active as i32,
        "bob's card untouched"
    );

    let list = widget
        .list_cards(pb::ListCardsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.cards.len(), 2);
    assert!(list.cards.iter().all(|c| c.owner == "alice"));
    assert_status(
        widget
            .list_cards(pb::ListCardsRequest {
                owner: "bob".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "one owner",
    );
    widget
        .pause_card(pb::CardRef {
            card_id: mine.card_id,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_removed_client_is_refused_without_a_restart() {
    let server = TestServer::start().await;
    let key = server.add_client("temp", Role::Cards, None);
    let mut c = server.cards_as(&key).await;
    issue(&mut c, issue_req("alice", 100)).await;
    vcn::clients::remove(&server.keys_dir(), "temp").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_status(
        c.issue_card(issue_req("alice", 100)).await,
        Code::Unauthenticated,
        "unknown API key",
    );
}

#[tokio::test]
async fn reflection_lists_the_services_for_an_authenticated_client() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = TestServer::start().await;
    let key = server.add_client("web", Role::Cards, None);
    let mut client = ServerReflectionClient::new(server.channel(Some(&key)).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "vcn.v1.CardService",
        "vcn.v1.AuthorizationService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}
