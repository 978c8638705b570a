//! WatchEvents: every change reported once, in order, resumable by cursor.

use std::collections::HashSet;
use std::time::Duration;

use tonic::Code;
use tonic::Streaming;
use vcn::api::pb;
use vcn::api::pb::CardEventType as T;
use vcn::clients::Role;

use crate::support::*;

pub async fn watch(cards: &mut Cards, owner: &str, after: &str) -> Streaming<pb::CardEvent> {
    cards
        .watch_events(pb::WatchEventsRequest {
            owner: owner.into(),
            after_cursor: after.into(),
        })
        .await
        .expect("watch")
        .into_inner()
}

/// The next `n` events, each within a few seconds.
pub async fn take(stream: &mut Streaming<pb::CardEvent>, n: usize) -> Vec<pb::CardEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(e))) => out.push(e),
            Ok(other) => panic!("stream ended after {} events: {other:?}", out.len()),
            Err(_) => panic!(
                "only {} of {n} events arrived: {:?}",
                out.len(),
                kinds(&out)
            ),
        }
    }
    out
}

/// Asserts nothing more arrives for a while.
async fn quiet(stream: &mut Streaming<pb::CardEvent>) {
    if let Ok(e) = tokio::time::timeout(Duration::from_millis(700), stream.message()).await {
        panic!("unexpected event: {e:?}");
    }
}

fn kinds(events: &[pb::CardEvent]) -> Vec<T> {
    events
        .iter()
        .map(|e| T::try_from(e.r#type).unwrap_or(T::Unspecified))
        .collect()
}

#[tokio::test]
async fn each_change_is_reported_with_what_a_cardholder_needs() {
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
    let id = card.card.as_ref().unwrap().card_id.clone();
    let mut live = watch(&mut cards, "alice", "").await;
    let issued = take(&mut live, 1).await;
    assert_eq!(kinds(&issued), [T::Issued]);
    assert_eq!(issued[0].card_id, id);
    assert_eq!(issued[0].masked_pan, card.card.as_ref().unwrap().masked_pan);

    assert!(
        authorize(&mut switch, auth_req(&card, "t1", 1250))
            .await
            .approved
    );
    let declined = authorize(&mut switch, auth_req(&card, "t2", 9999)).await;
    assert_eq!(declined.response_code, "51");
    // A retry of t1 is answered again but is not a new event.
    authorize(&mut switch, auth_req(&card, "t1", 1250)).await;
    switch
        .reverse(pb::ReverseRequest {
            transaction_id: "t1".into(),
            amount: eur(250),
            reversal_id: String::new(),
        })
        .await
        .unwrap();
    cards
        .pause_card(pb::CardRef {
            card_id: id.clone(),
        })
        .await
        .unwrap();
    cards
        .resume_card(pb::CardRef {
            card_id: id.clone(),
        })
        .await
        .unwrap();
    cards
        .update_card_limits(pb::UpdateCardLimitsRequest {
            card_id: id.clone(),
            spend_limit: eur(6000),
            per_transaction_limit: None,
        })
        .await
        .unwrap();
    assert!(
        authorize(&mut switch, auth_req(&card, "t3", 100))
            .await
            .approved
    );

    let got = take(&mut live, 8).await;
    assert_eq!(
        kinds(&got),
        [
            T::Authorized,
            T::Authorized,
            T::Reversed,
            T::Paused,
            T::Resumed,
            T::LimitsChanged,
            T::Authorized,
            T::Used,
        ]
    );
    let (ok, no) = (&got[0], &got[1]);
    assert!(ok.approved && !no.approved);
    assert_eq!(
        (ok.response_code.as_str(), no.response_code.as_str()),
        ("00", "51")
    );
    assert_eq!(no.decline_reason, "insufficient_funds");
    assert_eq!(ok.amount, eur(1250));
    assert_eq!(ok.remaining, eur(3750));
    assert_eq!(
        (ok.merchant_id.as_str(), ok.mcc.as_str()),
        ("shop-1", "5411")
    );
    assert_eq!(ok.transaction_id, "t1");
    assert_eq!(got[2].amount, eur(250));
    assert_eq!(got[2].remaining, eur(4000));
    assert_eq!(got[3].state, pb::CardState::Paused as i32);
    assert_eq!(got[5].remaining, eur(5000));
    assert_eq!(got[7].state, pb::CardState::Used as i32);
    assert!(got.iter().all(|e| e.owner == "alice" && e.card_id == id));
    assert!(got.iter().all(|e| e.occurred_at.is_some()));
    let cursors: Vec<_> = issued
        .iter()
        .chain(&got)
        .map(|e| e.cursor.clone())
        .collect();
    let mut sorted = cursors.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(cursors, sorted, "cursors increase");

    // Closing a card is one event; closing it again changes nothing.
    let other = issue(&mut cards, issue_req("alice", 100)).await;
    for _ in 0..2 {
        cards
            .close_card(pb::CardRef {
                card_id: other.card.as_ref().unwrap().card_id.clone(),
            })
            .await
            .unwrap();
    }
    assert_eq!(kinds(&take(&mut live, 2).await), [T::Issued, T::Closed]);
    quiet(&mut live).await;
}

#[tokio::test]
async fn reconnecting_with_the_last_cursor_gets_every_missed_event_once() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 100,
            ..issue_req("alice", 100_000)
        },
    )
    .await;
    let mut live = watch(&mut cards, "alice", "").await;
    for i in 0..3 {
        authorize(&mut switch, auth_req(&card, &format!("a{i}"), 100)).await;
    }
    let first = take(&mut live, 4).await;
    let cursor = first[3].cursor.clone();
    drop(live);

    // While nobody listens: more payments, and a server restart.
    for i in 3..6 {
        authorize(&mut switch, auth_req(&card, &format!("a{i}"), 100)).await;
    }
    let server = server.restart().await;
    let mut cards = server
        .cards_as(&server.add_client("web-again", Role::Cards, None))
        .await;
    let mut switch = server
        .switch_as(&server.add_client("switch-again", Role::Switch, None))
        .await;
    for i in 6..8 {
        authorize(&mut switch, auth_req(&card, &format!("a{i}"), 100)).await;
    }

    let mut again = watch(&mut cards, "alice", &cursor).await;
    let missed = take(&mut again, 5).await;
    let txns: Vec<_> = missed.iter().map(|e| e.transaction_id.as_str()).collect();
    assert_eq!(txns, ["a3", "a4", "a5", "a6", "a7"]);
    assert!(missed[0].cursor > cursor);
    // And then live.
    authorize(&mut switch, auth_req(&card, "a8", 100)).await;
    let next = take(&mut again, 1).await;
    assert_eq!(next[0].transaction_id, "a8");
    quiet(&mut again).await;

    // The whole history, from the start, is the same events.
    let mut all = watch(&mut cards, "alice", "").await;
    let history = take(&mut all, 10).await;
    let cursors: Vec<_> = history.iter().map(|e| e.cursor.clone()).collect();
    let seen: Vec<_> = first
        .iter()
        .chain(&missed)
        .chain(&next)
        .map(|e| e.cursor.clone())
        .collect();
    assert_eq!(cursors, seen);
}

#[tokio::test]
async fn concurrent_payments_reach_a_live_watcher_in_cursor_order_exactly_once() {
    let server = TestServer::start().await;
    let (mut cards, switch) = server.clients().await;
    let mut issued = Vec::new();
    for _ in 0..4 {
        issued.push(
            issue(
                &mut cards,
                pb::IssueCardRequest {
                    max_uses: 100,
                    ..issue_req("alice", 1_000_000)
                },
            )
            .await,
        );
    }
    let mut live = watch(&mut cards, "alice", "").await;
    assert_eq!(kinds(&take(&mut live, 4).await), [T::Issued; 4]);

    let mut tasks = Vec::new();
    let mut expected = HashSet::new();
    for (c, card) in issued.iter().enumerate() {
        for i in 0..12 {
            let txn = format!("c{c}-{i}");
            expected.insert(txn.clone());
            let (mut switch, req) = (switch.clone(), auth_req(card, &txn, 100));
            tasks.push(tokio::spawn(async move {
                assert!(authorize(&mut switch, req).await.approved);
            }));
        }
    }
    let got = take(&mut live, expected.len()).await;
    for t in tasks {
        t.await.unwrap();
    }
    quiet(&mut live).await;
    let txns: HashSet<_> = got.iter().map(|e| e.transaction_id.clone()).collect();
    assert_eq!(txns, expected, "each payment exactly once");
    assert!(
        got.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "in cursor order"
    );

    // Resuming from any delivered cursor gives exactly what followed it.
    let mut resumed = watch(&mut cards, "alice", &got[20].cursor).await;
    let rest = take(&mut resumed, got.len() - 21).await;
    assert_eq!(
        rest.iter().map(|e| &e.cursor).collect::<Vec<_>>(),
        got[21..].iter().map(|e| &e.cursor).collect::<Vec<_>>()
    );
    quiet(&mut resumed).await;
}

#[tokio::test]
async fn a_pinned_client_sees_only_its_owner_and_bad_requests_name_the_field() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let mut widget = server
        .cards_as(&server.add_client("alice-widget", Role::Cards, Some("alice")))
        .await;
    let mut mine = watch(&mut widget, "", "").await;
    let bobs = issue(&mut cards, issue_req("bob", 5000)).await;
    authorize(&mut switch, auth_req(&bobs, "b1", 100)).await;
    let alices = issue(&mut cards, issue_req("alice", 5000)).await;
    let got = take(&mut mine, 1).await;
    assert_eq!(got[0].card_id, alices.card.unwrap().card_id);
    quiet(&mut mine).await;

    assert_status(
        widget
            .watch_events(pb::WatchEventsRequest {
                owner: "bob".into(),
                after_cursor: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "one owner",
    );
    assert_status(
        cards
            .watch_events(pb::WatchEventsRequest {
                owner: String::new(),
                after_cursor: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "owner",
    );
    assert_status(
        cards
            .watch_events(pb::WatchEventsRequest {
                owner: "alice".into(),
                after_cursor: "not-a-cursor".into(),
            })
            .await,
        Code::InvalidArgument,
        "after_cursor",
    );
    // The switch's key cannot watch.
    let mut as_switch = vcn::api::pb::card_service_client::CardServiceClient::new(
        server
            .channel(Some(&server.add_client("sw2", Role::Switch, None)))
            .await,
    );
    assert_status(
        as_switch
            .watch_events(pb::WatchEventsRequest {
                owner: "alice".into(),
                after_cursor: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "role",
    );
}

#[tokio::test]
async fn blocking_and_expiry_are_reported_once() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(&mut cards, issue_req("alice", 5000)).await;
    for i in 0..3 {
        let mut r = auth_req(&card, &format!("w{i}"), 100);
        r.cvv = if card.cvv == "000" { "001" } else { "000" }.into();
        authorize(&mut switch, r).await;
    }
    let soon = time::OffsetDateTime::now_utc().unix_timestamp() + 2;
    let short = issue(
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
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for txn in ["late1", "late2"] {
        let r = authorize(&mut switch, auth_req(&short, txn, 100)).await;
        assert_eq!(r.response_code, "54");
    }
    let mut all = watch(&mut cards, "alice", "").await;
    let got = take(&mut all, 9).await;
    assert_eq!(
        kinds(&got),
        [
            T::Issued,
            T::Authorized,
            T::Authorized,
            T::Authorized,
            T::Blocked,
            T::Issued,
            T::Authorized,
            T::Expired,
            T::Authorized,
        ]
    );
    assert_eq!(got[3].response_code, "N7");
    assert_eq!(got[4].state, pb::CardState::Blocked as i32);
    assert_eq!(got[7].card_id, short.card.unwrap().card_id);
    quiet(&mut all).await;
}

#[tokio::test]
async fn shutting_down_ends_watches_with_unavailable() {
    let mut server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    issue(&mut cards, issue_req("alice", 5000)).await;
    let mut live = watch(&mut cards, "alice", "").await;
    take(&mut live, 1).await;
    server.begin_stop();
    let end = tokio::time::timeout(Duration::from_secs(5), live.message())
        .await
        .expect("the stream ends promptly");
    match end {
        Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        Ok(e) => panic!("expected UNAVAILABLE, got {e:?}"),
    }
    server.stopped().await.expect("clean stop");
}
