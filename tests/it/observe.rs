//! Request ids: taken from the caller or made up, and echoed back. The
//! vault's gauges: sampled only where metrics are served.

use tonic::Request;
use vcn::api::pb;

use crate::support::*;

#[tokio::test]
async fn every_rpc_answers_with_its_request_id() {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    let issued = issue(&mut cards, issue_req("alice", 100)).await;
    let get = |id: Option<&str>| {
        let mut req = Request::new(pb::GetCardRequest {
            card_id: issued.card.as_ref().unwrap().card_id.clone(),
        });
        if let Some(id) = id {
            req.metadata_mut()
                .insert("x-request-id", id.parse().unwrap());
        }
        req
    };
    let given = cards.get_card(get(Some("web-req.42"))).await.unwrap();
    assert_eq!(given.metadata().get("x-request-id").unwrap(), "web-req.42");
    // None given, or one that is not sane: the server makes one up.
    let mut made = Vec::new();
    for id in [None, Some("two words")] {
        let r = cards.get_card(get(id)).await.unwrap();
        let id = r
            .metadata()
            .get("x-request-id")
            .expect("an id")
            .to_str()
            .unwrap()
            .to_string();
        assert!(!id.is_empty() && id != "two words");
        made.push(id);
    }
    assert_ne!(made[0], made[1]);
    // Refused calls carry one too.
    let refused = cards
        .get_card(pb::GetCardRequest {
            card_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert!(refused.metadata().get("x-request-id").is_some());
}

/// The card count behind `vcn_cards` reads every card record: on a large
/// vault, seconds of CPU and a sweep of the engine's cache. A server that
/// serves no metrics must not pay for it; one that does counts at start.
#[tokio::test]
async fn the_cards_are_counted_for_metrics_only_where_metrics_are_served() {
    for listen in [None, Some("127.0.0.1:0".parse().unwrap())] {
        let (server, chaos) = TestServer::start_chaos(|d| vcn::config::Config {
            metrics_listen: listen,
            // No retention pass: it reads every card too.
            purge_every_minutes: 0,
            ..config_in(d)
        })
        .await;
        let waited = std::time::Instant::now();
        let scanned = loop {
            let scans = chaos.card_scans();
            if scans > 0 || waited.elapsed() > std::time::Duration::from_secs(2) {
                break scans;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(scanned > 0, listen.is_some(), "metrics_listen {listen:?}");
        server.stop().await;
    }
}
