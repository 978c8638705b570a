//! Concurrent authorisations never overspend and never approve twice.

use std::collections::{HashMap, HashSet};

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

/// Several switch connections on the same card at once: new transactions,
/// retries of them on other connections, and reversals racing the
/// approvals they reverse. Repeated; exactly once in every case.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_and_reversals_racing_approvals_across_connections_stay_exactly_once() {
    let server = TestServer::start().await;
    let key = server.add_client("switch-x", vcn::clients::Role::Switch, None);
    let (mut cards, _) = server.clients().await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(server.switch_as(&key).await);
    }
    for round in 0..3 {
        let card = issue(
            &mut cards,
            pb::IssueCardRequest {
                max_uses: 1000,
                ..issue_req("alice", 20_000)
            },
        )
        .await;
        let mut tasks = Vec::new();
        for i in 0..60usize {
            let txn = format!("r{round}-t{i}");
            let amount = 100 + (i as i64 % 5) * 100;
            // The authorisation, and two retries of it, on three connections.
            for k in 0..3 {
                let (mut s, req) = (conns[(i + k) % 4].clone(), auth_req(&card, &txn, amount));
                tasks.push(tokio::spawn(async move {
                    (
                        "auth",
                        req.transaction_id.clone(),
                        s.authorize(req).await.map(|r| r.into_inner()),
                    )
                }));
            }
            // A partial reversal racing it (may arrive before it: then 404).
            let mut s = conns[(i + 3) % 4].clone();
            let rev = pb::ReverseRequest {
                transaction_id: txn.clone(),
                amount: eur(50),
                reversal_id: format!("{txn}-rev"),
            };
            tasks.push(tokio::spawn(async move {
                let r = s.reverse(rev).await.map(|r| pb::AuthorizeResponse {
                    approved: r.get_ref().reversed,
                    response_code: r.get_ref().response_code.clone(),
                    ..Default::default()
                });
                ("rev", txn, r)
            }));
        }
        let mut answers: HashMap<String, HashSet<(bool, String)>> = HashMap::new();
        let mut reversed = 0i64;
        for t in tasks {
            match t.await.unwrap() {
                ("auth", txn, Ok(r)) => {
                    answers
                        .entry(txn)
                        .or_default()
                        .insert((r.approved, r.authorization_id));
                }
                ("rev", _, Ok(r)) if r.approved => reversed += 50,
                ("rev", _, Ok(r)) => {
                    panic!("a reversal of an approval was refused: {}", r.response_code)
                }
                ("rev", _, Err(s)) => {
                    assert_eq!(s.code(), tonic::Code::NotFound, "{}", s.message())
                }
                (_, txn, Err(s)) => panic!("{txn}: {s}"),
                (kind, txn, Ok(_)) => unreachable!("{kind} {txn}"),
            }
        }
        let mut approved_total = 0;
        for (txn, set) in &answers {
            assert_eq!(set.len(), 1, "{txn} got different answers: {set:?}");
            let (ok, _) = set.iter().next().unwrap();
            assert!(ok, "{txn} declined");
            let i: i64 = txn.rsplit('t').next().unwrap().parse().unwrap();
            approved_total += 100 + (i % 5) * 100;
        }
        let c = get(&mut cards, &card.card.unwrap().card_id).await;
        assert_eq!(
            c.uses as usize,
            answers.len(),
            "round {round}: one use per transaction"
        );
        assert_eq!(amount(&c.spent), approved_total - reversed, "round {round}");
    }
}

/// A pause racing authorisations: once the pause is acknowledged, no
/// authorisation sent afterwards is approved, and spent matches approvals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_racing_authorisations_stops_them_once_acknowledged() {
    let server = TestServer::start().await;
    let (mut cards, switch) = server.clients().await;
    for round in 0..3 {
        let card = issue(
            &mut cards,
            pb::IssueCardRequest {
                max_uses: 1000,
                ..issue_req("alice", 100_000)
            },
        )
        .await;
        let id = card.card.as_ref().unwrap().card_id.clone();
        let paused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..120 {
            let (mut s, req, paused) = (
                switch.clone(),
                auth_req(&card, &format!("p{round}-{i}"), 100),
                paused.clone(),
            );
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(i % 40)).await;
                let sent_after_pause = paused.load(std::sync::atomic::Ordering::SeqCst);
                let r = s.authorize(req).await.unwrap().into_inner();
                (sent_after_pause, r.approved, r.response_code)
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(15)).await;
        let mut c2 = cards.clone();
        let state = c2
            .pause_card(pb::CardRef {
                card_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .state;
        assert_eq!(state, CardState::Paused as i32);
        paused.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut approvals = 0;
        for t in tasks {
            let (after, approved, code) = t.await.unwrap();
            if after {
                assert_eq!(
                    (approved, code.as_str()),
                    (false, "62"),
                    "approved after the pause was acknowledged"
                );
            }
            approvals += usize::from(approved);
        }
        let c = get(&mut cards, &id).await;
        assert_eq!(
            (c.uses as usize, amount(&c.spent)),
            (approvals, approvals as i64 * 100)
        );
    }
}
