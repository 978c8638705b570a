//! The load tool runs against a test server and reports sane numbers: some
//! throughput for every operation, no errors, no overspend. (No timing
//! assertions: the figures themselves are measured by hand, BENCHMARKS.md.)

use std::time::Duration;

use vcn::bench::{self, Op, Options, Target};
use vcn::clients::Role;

use crate::support::*;

/// The test server, with a cards and a switch client for the tool.
fn target(server: &TestServer) -> Target {
    Target {
        url: format!("http://{}", server.addr),
        cards_key: server.add_client("bench-cards", Role::Cards, None),
        switch_key: server.add_client("bench-switch", Role::Switch, None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_load_tool_measures_every_operation_without_errors_or_overspend() {
    let server = TestServer::start().await;
    let target = target(&server);
    let opts = Options {
        concurrency: 16,
        connections: 2,
        duration: Duration::from_millis(400),
        pool_cards: 32,
        // Ten approvals: small enough that the hot card runs out even on a
        // loaded machine. Its cap must hold.
        hot_cap: 1_000,
        ..Options::default()
    };
    let report = bench::run(&target, &opts).await.expect("bench runs");
    let text = report.text();
    assert_eq!(report.rounds.len(), 1);
    let ops: Vec<Op> = report.rounds[0].ops.iter().map(|o| o.op).collect();
    assert_eq!(ops, Op::ALL.to_vec());
    for o in &report.rounds[0].ops {
        assert!(o.throughput > 0.0 && o.calls > 0, "{text}");
        assert_eq!(o.errors, 0, "{:?}: {:?}\n{text}", o.op, o.first_error);
        assert!(o.p50_us > 0 && o.p50_us <= o.p99_us && o.p99_us <= o.max_us);
        assert!(o.ratio_to_floor.is_some_and(|r| r > 0.0));
    }
    let c = &report.checks;
    assert!(c.ok, "{:?}", c.problems);
    assert_eq!(
        c.hot_spent, c.hot_approved_sum,
        "spent is the sum of approvals"
    );
    assert!(c.hot_spent <= 1_000, "the hot card never exceeds its cap");
    assert!(c.hot_approvals <= 10, "{text}");
    // Once declined for its cap, it had exactly ten approvals. (Whether
    // the round got that far in 400 ms is up to the machine: no timing
    // is asserted.)
    let hot = report.rounds[0]
        .ops
        .iter()
        .find(|o| o.op == Op::AuthorizeHot);
    if hot.is_some_and(|o| o.declined > 0) {
        assert_eq!(c.hot_approvals, 10, "the cap was reached exactly");
    }
    assert_eq!(c.pool_mismatches, 0);
    assert!(c.pool_cards_checked >= 32);
    assert_eq!(
        (c.single_use_cards_checked, c.single_use_violations),
        (32, 0)
    );
    assert!(report.passed());
    // Nothing the tool prints or writes holds a full card number.
    let json = serde_json::to_string(&report).unwrap();
    for out in [&text, &json] {
        assert!(!out.contains(FUNDING), "a full number in the output");
        // (Digits after a decimal point are fractions, not numbers.)
        let longest_digit_run = out
            .split(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|t| !t.contains('.'))
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(longest_digit_run < 13, "a card-number-like run of digits");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_rounds_of_the_lifecycle_never_replay_a_transaction_id() {
    // A disposable card's life (issue, then its one authorisation) run
    // twice: the second round must use fresh transaction ids, or its
    // authorisations come back as duplicates (94) and the hot card's
    // approvals would be counted twice.
    let server = TestServer::start().await;
    let target = target(&server);
    // And a fill between, with the wait for the server to go idle after
    // it: two rounds before, two after.
    let opts = Options {
        concurrency: 8,
        connections: 2,
        duration: Duration::from_millis(300),
        ops: vec![Op::Lifecycle, Op::AuthorizeHot],
        repeat: 2,
        fill: 24,
        settle: Duration::from_secs(1),
        server_process: Some(bench::Watched::in_process()),
        ..Options::default()
    };
    let report = bench::run(&target, &opts).await.expect("bench runs");
    let text = report.text();
    assert_eq!(report.rounds.len(), 4);
    let fill = report.fill.as_ref().expect("a fill");
    assert_eq!((fill.cards, fill.errors), (24, 0), "{text}");
    assert!(fill.settle_seconds >= 1.0, "{text}");
    assert!(fill.settle_server_cpu_s.is_some(), "{text}");
    assert!(text.contains("for the server to go idle"), "{text}");
    for r in &report.rounds {
        for o in &r.ops {
            assert!(o.calls > 0, "{text}");
            assert_eq!(o.errors, 0, "{:?}: {:?}\n{text}", o.op, o.first_error);
            // The watched server's CPU, and its engine threads' share.
            assert!(o.server_cpu_us_per_call.is_some(), "{text}");
            assert!(o.engine_cpu_us_per_call.is_some(), "{text}");
        }
    }
    assert!(text.contains("srv µs  eng µs"), "{text}");
    let c = &report.checks;
    assert!(c.ok, "{:?}", c.problems);
    assert_eq!(c.hot_spent, c.hot_approved_sum, "{text}");
}
