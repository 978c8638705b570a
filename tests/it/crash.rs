//! Fault injection: the real `vcn` binary under a mixed concurrent load,
//! SIGKILLed at random moments 20 times, restarted each time, and checked
//! against everything its clients saw acknowledged.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vcn::api::pb::authorization_service_client::AuthorizationServiceClient;
use vcn::api::pb::card_service_client::CardServiceClient;
use vcn::api::pb::{self, CardState};

use crate::binary::{serve, vcn};
use crate::support::{eur, Bearer, Cards, Switch};

const KILLS: usize = 20;
const WORKERS: usize = 32;

/// A small deterministic generator; the seed is printed so a failing run
/// can be replayed with VCN_CRASH_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone)]
struct CardModel {
    id: String,
    pan: String,
    cvv: String,
    month: u32,
    year: u32,
    cap: i64,
    max_uses: u32,
    /// Acknowledged approvals: transaction id, amount, authorization id.
    approvals: Vec<(String, i64, String)>,
    /// Acknowledged reversals: reversal id, amount.
    reversals: Vec<(String, i64)>,
    closed: bool,
    /// Touched since the last check.
    dirty: bool,
}

#[derive(Default)]
struct Model {
    cards: Vec<CardModel>,
    /// Requests sent whose answer never came (the server died): they may or
    /// may not have happened; after the restart their retry decides.
    unknown_issues: Vec<pb::IssueCardRequest>,
    unknown_auths: Vec<(usize, pb::AuthorizeRequest)>,
    unknown_reversals: Vec<(usize, pb::ReverseRequest)>,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    checks: AtomicU64,
    /// Detokenize calls sent, and those answered.
    detokenize_sent: AtomicU64,
    detokenized: AtomicU64,
}

pub async fn connect(
    port: u16,
    key: &str,
) -> Option<tonic::service::interceptor::InterceptedService<Channel, Bearer>> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .ok()?;
    let header = format!("Bearer {key}").parse().ok();
    Some(tonic::service::interceptor::InterceptedService::new(
        channel,
        Bearer(header),
    ))
}

fn auth_request(card: &CardModel, txn: String, amount: i64) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        transaction_id: txn,
        pan: card.pan.clone(),
        expiry_month: card.month,
        expiry_year: card.year,
        cvv: card.cvv.clone(),
        amount: eur(amount),
        merchant_id: "shop".into(),
        mcc: "5411".into(),
    }
}

fn card_from(r: pb::IssueCardResponse, req: &pb::IssueCardRequest) -> CardModel {
    let c = r.card.unwrap_or_default();
    CardModel {
        id: c.card_id,
        pan: r.pan,
        cvv: r.cvv,
        month: r.expiry_month,
        year: r.expiry_year,
        cap: req.spend_limit.as_ref().map_or(0, |m| m.amount_minor),
        max_uses: req.max_uses.max(1),
        approvals: vec![],
        reversals: vec![],
        closed: false,
        dirty: true,
    }
}

/// One worker: random operations until `until`, recording what was
/// acknowledged and what was left unknown. The first failed call means the
/// server is gone: the worker records it as unknown and stops.
async fn worker(
    mut cards: Cards,
    mut switch: Switch,
    model: Arc<Mutex<Model>>,
    counters: Arc<Counters>,
    seed: u64,
    until: Instant,
    tag: String,
) {
    let mut rng = Rng(seed | 1);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let roll = rng.below(100);
        let pick = {
            let m = model.lock().unwrap();
            if m.cards.is_empty() {
                None
            } else {
                Some((rng.below(m.cards.len() as u64) as usize, m.cards.len()))
            }
        };
        if let Some((i, _)) = pick {
            model.lock().unwrap().cards[i].dirty = true;
        }
        counters.ops.fetch_add(1, Ordering::Relaxed);
        match (roll, pick) {
            (0..=4, _) | (_, None) => {
                let uses = [1, 1, 3, 20][rng.below(4) as usize];
                let req = pb::IssueCardRequest {
                    funding_pan: "4111111111111111".into(),
                    owner: format!("crash-{}", rng.below(5)),
                    spend_limit: eur(1000 + rng.below(9000) as i64),
                    max_uses: uses,
                    idempotency_key: format!("{tag}-issue-{n}"),
                    ..Default::default()
                };
                match cards.issue_card(req.clone()).await {
                    Ok(r) => model
                        .lock()
                        .unwrap()
                        .cards
                        .push(card_from(r.into_inner(), &req)),
                    Err(_) => {
                        model.lock().unwrap().unknown_issues.push(req);
                        return;
                    }
                }
            }
            (5..=69, Some((i, _))) => {
                let card = model.lock().unwrap().cards[i].clone();
                let req = auth_request(&card, format!("{tag}-t{n}"), 100 + rng.below(1900) as i64);
                let amount = req.amount.as_ref().map_or(0, |m| m.amount_minor);
                match switch.authorize(req.clone()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.approved {
                            model.lock().unwrap().cards[i].approvals.push((
                                req.transaction_id,
                                amount,
                                r.authorization_id,
                            ));
                        }
                    }
                    Err(_) => {
                        model.lock().unwrap().unknown_auths.push((i, req));
                        return;
                    }
                }
            }
            (75..=79, Some((i, _))) => {
                // A read whose audit entry must be durable before it is
                // answered (the pending journal).
                let pan = model.lock().unwrap().cards[i].pan.clone();
                counters.detokenize_sent.fetch_add(1, Ordering::Relaxed);
                match switch.detokenize(pb::DetokenizeRequest { pan }).await {
                    Ok(r) => {
                        assert_eq!(r.into_inner().funding_pan, "4111111111111111");
                        counters.detokenized.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => return,
                }
            }
            (70..=74, Some((i, _))) => {
                // Retry an acknowledged approval: same answer, no new debit.
                let card = model.lock().unwrap().cards[i].clone();
                if let Some((txn, amount, auth_id)) = card.approvals.first().cloned() {
                    if let Ok(r) = switch.authorize(auth_request(&card, txn, amount)).await {
                        let r = r.into_inner();
                        assert!(
                            r.approved,
                            "a retried approval was declined: {}",
                            r.response_code
                        );
                        assert_eq!(
                            r.authorization_id, auth_id,
                            "a retried approval got a new id"
                        );
                        counters.checks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (80..=91, Some((i, _))) => {
                // Only this worker's own approvals, so no two workers race
                // to reverse the same one (that would rightly answer 13).
                let card = model.lock().unwrap().cards[i].clone();
                let mine = format!("{tag}-");
                if let Some((txn, amount, _)) = card
                    .approvals
                    .iter()
                    .rev()
                    .find(|(t, _, _)| t.starts_with(&mine))
                    .cloned()
                {
                    // Reversed so far, counting reversals whose answer was lost
                    // (they may have happened; their retry must still fit).
                    let prefix = format!("{txn}/");
                    let acked: i64 = card
                        .reversals
                        .iter()
                        .filter(|(r, _)| r.starts_with(&prefix))
                        .map(|(_, a)| a)
                        .sum();
                    let unknown: i64 = model
                        .lock()
                        .unwrap()
                        .unknown_reversals
                        .iter()
                        .filter(|(_, r)| r.reversal_id.starts_with(&prefix))
                        .map(|(_, r)| r.amount.as_ref().map_or(0, |m| m.amount_minor))
                        .sum();
                    let done = acked + unknown;
                    let left = amount - done;
                    if left > 0 {
                        let part = 1 + rng.below(left as u64) as i64;
                        let req = pb::ReverseRequest {
                            transaction_id: txn.clone(),
                            amount: eur(part),
                            reversal_id: format!("{txn}/{tag}-r{n}"),
                        };
                        match switch.reverse(req.clone()).await {
                            Ok(r) => {
                                let r = r.into_inner();
                                assert!(
                                    r.reversed,
                                    "a valid reversal was refused: {}",
                                    r.response_code
                                );
                                model.lock().unwrap().cards[i]
                                    .reversals
                                    .push((req.reversal_id, part));
                            }
                            Err(_) => {
                                model.lock().unwrap().unknown_reversals.push((i, req));
                                return;
                            }
                        }
                    }
                }
            }
            (92..=96, Some((i, _))) => {
                let id = model.lock().unwrap().cards[i].id.clone();
                let r = pb::CardRef { card_id: id };
                let _ = if rng.below(2) == 0 {
                    cards.pause_card(r).await
                } else {
                    cards.resume_card(r).await
                };
            }
            (_, Some((i, _))) => {
                let id = model.lock().unwrap().cards[i].id.clone();
                if cards.close_card(pb::CardRef { card_id: id }).await.is_ok() {
                    model.lock().unwrap().cards[i].closed = true;
                }
            }
        }
    }
}

/// After a restart: settle every unknown request by retrying it (its
/// first answer if it happened, a fresh decision if not), then check every
/// card against the acknowledged history.
async fn settle_and_check(
    cards: &mut Cards,
    switch: &mut Switch,
    model: &Mutex<Model>,
    counters: &Counters,
    all: bool,
) {
    let (issues, auths, reversals) = {
        let mut m = model.lock().unwrap();
        (
            std::mem::take(&mut m.unknown_issues),
            std::mem::take(&mut m.unknown_auths),
            std::mem::take(&mut m.unknown_reversals),
        )
    };
    for req in issues {
        let r = cards
            .issue_card(req.clone())
            .await
            .expect("retrying an issue after restart")
            .into_inner();
        model.lock().unwrap().cards.push(card_from(r, &req));
    }
    for (i, req) in auths {
        let amount = req.amount.as_ref().map_or(0, |m| m.amount_minor);
        let r = switch
            .authorize(req.clone())
            .await
            .expect("retrying an authorisation after restart")
            .into_inner();
        if r.approved {
            model.lock().unwrap().cards[i].approvals.push((
                req.transaction_id,
                amount,
                r.authorization_id,
            ));
        }
    }
    for (i, req) in reversals {
        let amount = req.amount.as_ref().map_or(0, |m| m.amount_minor);
        let r = switch
            .reverse(req.clone())
            .await
            .expect("retrying a reversal after restart")
            .into_inner();
        assert!(
            r.reversed,
            "a retried reversal was refused: {}",
            r.response_code
        );
        model.lock().unwrap().cards[i]
            .reversals
            .push((req.reversal_id, amount));
    }

    let settled = Instant::now();
    // Check every card touched since the last restart, and a sample of the
    // others (all of them at the end of the run).
    let snapshot: Vec<CardModel> = {
        let mut m = model.lock().unwrap();
        let n = m.cards.len();
        let mut picked = Vec::new();
        for (i, c) in m.cards.iter_mut().enumerate() {
            if c.dirty || all || i % (n / 50).max(1) == 0 {
                c.dirty = false;
                picked.push(c.clone());
            }
        }
        picked
    };
    let mut tasks = Vec::new();
    for chunk in snapshot.chunks(snapshot.len().div_ceil(8).max(1)) {
        let (mut cards, mut switch, chunk) = (cards.clone(), switch.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut checks = 0u64;
            for card in &chunk {
                check_card(&mut cards, &mut switch, card).await;
                checks += 6;
            }
            checks
        }));
    }
    let n = snapshot.len();
    for t in tasks {
        counters
            .checks
            .fetch_add(t.await.expect("checker"), Ordering::Relaxed);
    }
    if std::env::var("VCN_CRASH_TIMING").is_ok() {
        let _ = writeln!(
            std::io::stderr(),
            "  checked {n} cards in {:?}",
            settled.elapsed()
        );
    }
}

async fn check_card(cards: &mut Cards, switch: &mut Switch, card: &CardModel) {
    let c = cards
        .get_card(pb::GetCardRequest {
            card_id: card.id.clone(),
        })
        .await
        .expect("an acknowledged card exists")
        .into_inner();
    let approved: i64 = card.approvals.iter().map(|(_, a, _)| a).sum();
    let reversed: i64 = card.reversals.iter().map(|(_, a)| a).sum();
    let spent = c.spent.as_ref().map_or(-1, |m| m.amount_minor);
    assert_eq!(
        spent,
        approved - reversed,
        "card {}: spent is not approvals minus reversals",
        card.id
    );
    assert!(
        spent <= card.cap,
        "card {}: spent {spent} over the cap {}",
        card.id,
        card.cap
    );
    assert_eq!(
        c.uses as usize,
        card.approvals.len(),
        "card {}: uses",
        card.id
    );
    assert!(
        card.approvals.len() <= card.max_uses as usize,
        "card {}: more approvals than uses",
        card.id
    );
    if card.closed {
        assert_eq!(
            c.state,
            CardState::Closed as i32,
            "card {}: an acknowledged close was lost",
            card.id
        );
    }
    // An acknowledged approval retried gets its first answer.
    if let Some((txn, amount, auth_id)) = card.approvals.last() {
        let r = switch
            .authorize(auth_request(card, txn.clone(), *amount))
            .await
            .expect("retry")
            .into_inner();
        assert_eq!(
            (r.approved, &r.authorization_id),
            (true, auth_id),
            "card {}: retry of {txn}",
            card.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged_and_never_overspends() {
    let started = Instant::now();
    let seed: u64 = std::env::var("VCN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let mut server = serve(&d);
    let add = |name: &str, role: &str| {
        let o = vcn(&d, 0, "", &["client", "add", name, "--role", role]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    };
    let (cards_key, switch_key) = (add("web", "cards"), add("switch", "switch"));
    let model = Arc::new(Mutex::new(Model::default()));
    let counters = Arc::new(Counters::default());

    for kill in 0..KILLS {
        let run_for = Duration::from_millis(300 + rng.below(400));
        let kill_at = Duration::from_millis(50 + rng.below(run_for.as_millis() as u64 - 40));
        let until = Instant::now() + run_for;
        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            let (Some(c), Some(s)) = (
                connect(server.port, &cards_key).await,
                connect(server.port, &switch_key).await,
            ) else {
                panic!("cannot connect to the server after restart {kill}");
            };
            tasks.push(tokio::spawn(worker(
                CardServiceClient::new(c),
                AuthorizationServiceClient::new(s),
                model.clone(),
                counters.clone(),
                rng.next(),
                until,
                format!("k{kill}w{w}"),
            )));
        }
        tokio::time::sleep(kill_at).await;
        drop(server); // SIGKILL
        let t0 = Instant::now();
        for t in tasks {
            t.await.expect("worker");
        }
        let t1 = Instant::now();
        server = serve(&d);
        let t2 = Instant::now();
        let mut cards =
            CardServiceClient::new(connect(server.port, &cards_key).await.expect("connect"));
        let mut switch = AuthorizationServiceClient::new(
            connect(server.port, &switch_key).await.expect("connect"),
        );
        settle_and_check(
            &mut cards,
            &mut switch,
            &model,
            &counters,
            kill + 1 == KILLS,
        )
        .await;
        if std::env::var("VCN_CRASH_TIMING").is_ok() {
            let _ = writeln!(
                std::io::stderr(),
                "cycle {kill}: workers {:?} restart {:?} check {:?}",
                t1 - t0,
                t2 - t1,
                t2.elapsed()
            );
        }
    }
    assert!(server.terminate().success());

    // The audit log came through the kills whole: its chain holds, no
    // entry is in it twice, and every answered Detokenize is in it (those
    // cut off by a kill may be too, nothing more).
    let entries = crate::audit::sealed_once(&d.join("audit.log"), &d.join("keys"));
    let detokenized = entries
        .iter()
        .filter(|e| e.action == "detokenize" && e.outcome == "ok")
        .count() as u64;
    let (answered, sent) = (
        counters.detokenized.load(Ordering::Relaxed),
        counters.detokenize_sent.load(Ordering::Relaxed),
    );
    assert!(
        answered >= 10 && (answered..=sent).contains(&detokenized),
        "{detokenized} detokenisations audited, {answered} answered, {sent} sent"
    );

    let m = model.lock().unwrap();
    let approvals: usize = m.cards.iter().map(|c| c.approvals.len()).sum();
    assert!(
        m.cards.len() > 20 && approvals > 50,
        "the load was too light to prove anything: {} cards, {approvals} approvals",
        m.cards.len()
    );
    let summary = format!(
        "crash test (seed {seed}): {KILLS} kills, {} operations, {} cards, {approvals} approvals, {answered} detokenisations, {} invariant checks, {:.1} s\n",
        counters.ops.load(Ordering::Relaxed),
        m.cards.len(),
        counters.checks.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    // Straight to stderr, so the summary shows even though the test passed.
    let _ = std::io::stderr().write_all(summary.as_bytes());
}
