//! Concurrent authorisations never overspend and never approve twice.

use std::collections::HashSet;

use vcn::api::pb::{self, CardState};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_at_once_on_a_single_use_card_give_exactly_one_approval() {
    let server = TestServer::start().await;
    let (mut cards, switch) = server.clients().await;
    for round in 0..3 {
        let card = issue(&mut cards, issue_req("alice", 5000)).await;
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (mut s, req) = (
                switch.clone(),
                auth_req(&card, &format!("r{round}-t{i}"), 100),
            );
            tasks.push(tokio::spawn(async move {
                s.authorize(req).await.unwrap().into_inner()
            }));
        }
        let mut approved = 0;
        let mut codes = HashSet::new();
        for t in tasks {
            let r = t.await.unwrap();
            approved += usize::from(r.approved);
            codes.insert(r.response_code);
        }
        assert_eq!(approved, 1, "round {round}");
        assert_eq!(codes, HashSet::from(["00".to_string(), "65".to_string()]));
        let c = get(&mut cards, &card.card.unwrap().card_id).await;
        assert_eq!(
            (amount(&c.spent), c.uses, c.state),
            (100, 1, CardState::Used as i32)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_authorisations_never_overspend_a_multi_use_cap() {
    let server = TestServer::start().await;
    let (mut cards, switch) = server.clients().await;
    // 200 attempts of 3.00-9.00 EUR against a 100.00 EUR cap.
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 1000,
            ..issue_req("alice", 10_000)
        },
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..200i64 {
        let (mut s, req) = (
            switch.clone(),
            auth_req(&card, &format!("t{i}"), 300 + (i % 7) * 100),
        );
        tasks.push(tokio::spawn(async move {
            let amount = req.amount.as_ref().unwrap().amount_minor;
            let r = s.authorize(req).await.unwrap().into_inner();
            (r.approved, amount, r.response_code)
        }));
    }
    let mut approved_total = 0;
    let mut approvals = 0;
    for t in tasks {
        let (ok, amount, code) = t.await.unwrap();
        if ok {
            approved_total += amount;
            approvals += 1;
        } else {
            assert_eq!(code, "51");
        }
    }
    let c = get(&mut cards, &card.card.unwrap().card_id).await;
    assert!(approved_total <= 10_000, "overspent: {approved_total}");
    assert!(
        approved_total > 10_000 - 900,
        "stopped early: {approved_total}"
    );
    assert_eq!(
        amount(&c.spent),
        approved_total,
        "spent is the sum of approvals"
    );
    assert_eq!(c.uses, approvals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_one_transaction_debit_once() {
    let server = TestServer::start().await;
    let (mut cards, switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 10,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (mut s, req) = (switch.clone(), auth_req(&card, "same-txn", 1000));
        tasks.push(tokio::spawn(async move {
            s.authorize(req).await.unwrap().into_inner()
        }));
    }
    let mut auth_ids = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.approved);
        assert_eq!(amount(&r.remaining), 4000);
        auth_ids.insert(r.authorization_id);
    }
    assert_eq!(auth_ids.len(), 1, "one authorisation, answered 50 times");
    let c = get(&mut cards, &card.card.unwrap().card_id).await;
    assert_eq!((amount(&c.spent), c.uses), (1000, 1));
}
