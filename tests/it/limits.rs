//! Past its limits the service says so (RESOURCE_EXHAUSTED,
//! DEADLINE_EXCEEDED) instead of falling over, keeps serving well-behaved
//! clients, and drains cleanly on shutdown.

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vcn::api::pb;
use vcn::config::Config;

use crate::support::*;

#[tokio::test]
async fn a_call_past_the_server_deadline_gets_deadline_exceeded_and_the_server_goes_on() {
    let (server, chaos) = TestServer::start_chaos(|d| Config {
        request_timeout_ms: 1000,
        ..config_in(d)
    })
    .await;
    let (mut cards, _) = server.clients().await;
    chaos.set_update_delay(Duration::from_millis(3000));
    let err = cards.issue_card(issue_req("alice", 100)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    chaos.set_update_delay(Duration::ZERO);
    assert!(issue(&mut cards, issue_req("alice", 100))
        .await
        .card
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_connection_is_shed_while_another_is_served() {
    let (server, chaos) = TestServer::start_chaos(|d| Config {
        max_concurrent_per_connection: 2,
        ..config_in(d)
    })
    .await;
    let key = server.add_client("web", vcn::clients::Role::Cards, None);
    let flood = server.cards_as(&key).await;
    let mut polite = server.cards_as(&key).await;
    chaos.set_update_delay(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut c = flood.clone();
        tasks.push(tokio::spawn(async move {
            c.issue_card(issue_req("flood", 100)).await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The other connection is not affected by the flood.
    assert!(issue(&mut polite, issue_req("polite", 100))
        .await
        .card
        .is_some());
    let (ok, shed) = served_and_shed(tasks).await;
    assert!(ok >= 2 && shed >= 1, "{ok} served, {shed} shed");
    assert!(
        ok <= 6,
        "the per-connection limit of 2 let {ok} of 12 through at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_overall_limit_calls_are_refused_not_queued() {
    let (server, chaos) = TestServer::start_chaos(|d| Config {
        max_concurrent_requests: 3,
        ..config_in(d)
    })
    .await;
    let key = server.add_client("web", vcn::clients::Role::Cards, None);
    chaos.set_update_delay(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut c = server.cards_as(&key).await;
        tasks.push(tokio::spawn(async move {
            c.issue_card(issue_req("many", 100)).await.map(|_| ())
        }));
    }
    let (ok, shed) = served_and_shed(tasks).await;
    assert!(ok >= 1 && shed >= 1, "{ok} served, {shed} shed");
    chaos.set_update_delay(Duration::ZERO);
    let mut c = server.cards_as(&key).await;
    assert!(
        issue(&mut c, issue_req("after", 100)).await.card.is_some(),
        "serving again once the load is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_reports_not_serving_while_draining_and_finishes_calls_in_flight() {
    let (mut server, chaos) = TestServer::start_chaos(|d| Config {
        drain_grace_ms: 600,
        drain_timeout_ms: 5000,
        ..config_in(d)
    })
    .await;
    let cards_key = server.add_client("web", vcn::clients::Role::Cards, None);
    let cards = server.cards_as(&cards_key).await;
    let mut health = HealthClient::new(server.channel(None).await);
    let serving = |r: tonic::Response<tonic_health::pb::HealthCheckResponse>| r.into_inner().status;
    assert_eq!(
        serving(health.check(HealthCheckRequest::default()).await.unwrap()),
        ServingStatus::Serving as i32
    );

    chaos.set_update_delay(Duration::from_millis(300));
    let mut in_flight = Vec::new();
    for _ in 0..10 {
        let mut c = cards.clone();
        in_flight.push(tokio::spawn(async move {
            c.issue_card(issue_req("drain", 100)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.begin_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Draining: health says NOT_SERVING, calls are still taken.
    for service in ["", "vcn.v1.CardService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(serving(r), ServingStatus::NotServing as i32, "{service:?}");
    }
    let mut late = cards.clone();
    chaos.set_update_delay(Duration::ZERO);
    let late_card = late
        .issue_card(issue_req("drain", 100))
        .await
        .expect("taken during the grace period")
        .into_inner();

    let mut acked = vec![late_card.card.unwrap().card_id];
    for t in in_flight {
        let r = t
            .await
            .unwrap()
            .expect("a call in flight at shutdown finishes");
        acked.push(r.into_inner().card.unwrap().card_id);
    }
    server.stopped().await.expect("clean stop");
    drop(chaos); // it holds the store open

    // Everything acknowledged while draining is on disk.
    let (dir, config) = server.stop().await;
    let server = TestServer::start_with(dir, config).await;
    let mut cards = server.cards_as(&cards_key).await;
    for id in &acked {
        assert_eq!(&get(&mut cards, id).await.card_id, id);
    }
}

#[tokio::test]
async fn an_injected_write_failure_is_unavailable_and_nothing_half_written_remains() {
    let (server, chaos) = TestServer::start_chaos(config_in).await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 5,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    chaos.set_fail_updates(true);
    let err = switch
        .authorize(auth_req(&card, "x1", 100))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("injected write failure"),
        "{}",
        err.message()
    );
    assert_eq!(
        cards
            .issue_card(issue_req("alice", 100))
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    chaos.set_fail_updates(false);
    let c = get(&mut cards, &card.card.as_ref().unwrap().card_id).await;
    assert_eq!((amount(&c.spent), c.uses), (0, 0));
    // The failed transaction id was not recorded: it can be decided now.
    assert!(
        authorize(&mut switch, auth_req(&card, "x1", 100))
            .await
            .approved
    );
    let list = cards
        .list_cards(pb::ListCardsRequest {
            owner: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.into_inner().cards.len(), 1);
}
