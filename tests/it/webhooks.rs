//! Webhooks: card events POSTed to a receiver, signed the Standard Webhooks
//! way, in order, retried while the receiver fails, and not lost when the
//! server restarts before they could be delivered.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use vcn::api::pb;
use vcn::webhooks::WebhookConfig;

use crate::support::*;

/// One POST as the receiver saw it.
#[derive(Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    /// What the receiver answered.
    accepted: bool,
}

/// A minimal HTTP/1.1 receiver: answers 500 to the first `fail_first`
/// requests, and 503 to every request while `down` is set.
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Received>>>,
    down: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (s, d) = (seen.clone(), down.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (s, d, count) = (s.clone(), d.clone(), count.clone());
                tokio::spawn(async move {
                    let (r, mut w) = conn.into_split();
                    let mut r = BufReader::new(r);
                    loop {
                        let mut headers = Vec::new();
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.trim_end().to_string();
                            if line.is_empty() {
                                break;
                            }
                            headers.push(line);
                        }
                        let header = |name: &str| {
                            headers
                                .iter()
                                .find_map(|h| {
                                    let (k, v) = h.split_once(':')?;
                                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                                })
                                .unwrap_or_default()
                        };
                        let len: usize = header("content-length").parse().unwrap_or(0);
                        let mut body = vec![0; len];
                        if r.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let accepted = n >= fail_first && !d.load(Ordering::SeqCst);
                        s.lock().unwrap().push(Received {
                            id: header("webhook-id"),
                            timestamp: header("webhook-timestamp"),
                            signature: header("webhook-signature"),
                            body,
                            accepted,
                        });
                        let status = if accepted {
                            "200 OK"
                        } else {
                            "500 Internal Server Error"
                        };
                        let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Receiver { port, seen, down }
    }

    /// The accepted deliveries, waiting until there are at least `n`.
    async fn accepted(&self, n: usize) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let got: Vec<Received> = self
                .seen
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.accepted)
                .cloned()
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} of {n} deliveries after 30 s: {:?}",
                got.len(),
                self.seen.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.id,
            if self.accepted { "accepted" } else { "refused" },
            String::from_utf8_lossy(&self.body)
        )
    }
}

fn hook_config(port: u16) -> WebhookConfig {
    WebhookConfig {
        name: "bank".into(),
        url: format!("http://127.0.0.1:{port}/hooks/vcn"),
        secret_file: None,
        owners: vec![],
        timeout_ms: 2000,
    }
}

fn json(r: &Received) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test]
async fn events_are_posted_signed_in_order_and_retried() {
    // The receiver fails the first two attempts: the first event must be
    // sent again, with the same id, before anything after it.
    let receiver = Receiver::start(2).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        webhooks: vec![hook_config(receiver.port)],
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 5,
            ..issue_req("alice", 500)
        },
    )
    .await;
    assert!(
        authorize(&mut switch, auth_req(&card, "w1", 200))
            .await
            .approved
    );
    assert!(
        !authorize(&mut switch, auth_req(&card, "w2", 900))
            .await
            .approved
    );

    let got = receiver.accepted(3).await;
    let kinds: Vec<String> = got
        .iter()
        .map(|r| json(r)["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        ["card.issued", "card.authorized", "card.authorized"],
        "{got:?}"
    );
    let auth = json(&got[1]);
    assert_eq!(auth["data"]["approved"], true);
    assert_eq!(auth["data"]["transaction_id"], "w1");
    assert_eq!(auth["data"]["amount"]["amount_minor"], 200);
    assert_eq!(json(&got[2])["data"]["response_code"], "51");

    // Retried with the same id; each event accepted once.
    let all = receiver.seen.lock().unwrap().clone();
    assert!(all.len() >= 5, "{all:?}");
    assert!(all[..2].iter().all(|r| !r.accepted && r.id == got[0].id));
    let mut ids: Vec<&str> = got.iter().map(|r| r.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);

    // Signed under the secret the server made in the keys directory.
    let text = std::fs::read_to_string(server.keys_dir().join("webhook-bank.secret")).unwrap();
    let secret = base64::engine::general_purpose::STANDARD
        .decode(text.trim().strip_prefix("whsec_").unwrap())
        .unwrap();
    for r in &got {
        let ts: i64 = r.timestamp.parse().unwrap();
        let expected = vcn::webhooks::sign(&secret, &r.id, ts, &r.body);
        assert_eq!(r.signature, expected);
        let forged = vcn::webhooks::sign(b"another secret, 24 bytes", &r.id, ts, &r.body);
        assert_ne!(r.signature, forged);
        // Never a card number or CVV in a body.
        let body = String::from_utf8_lossy(&r.body);
        assert!(!body.contains(&card.pan), "{body}");
        assert!(!body.contains(FUNDING), "{body}");
        assert!(!body.contains(&format!("\"{}\"", card.cvv)), "{body}");
        assert_eq!(
            json(r)["data"]["masked_pan"],
            card.card.as_ref().unwrap().masked_pan
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn undelivered_events_survive_a_restart_and_delivered_ones_are_not_resent() {
    let receiver = Receiver::start(0).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        webhooks: vec![hook_config(receiver.port)],
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(&mut cards, issue_req("bob", 500)).await;
    receiver.accepted(1).await;

    // The receiver goes down; the card is used meanwhile, and the server
    // restarts before anything could be delivered.
    receiver.down.store(true, Ordering::SeqCst);
    assert!(
        authorize(&mut switch, auth_req(&card, "r1", 100))
            .await
            .approved
    );
    drop((cards, switch));
    let server = server.restart().await;
    receiver.down.store(false, Ordering::SeqCst);

    // The single-use card's approval is also its last use.
    let got = receiver.accepted(3).await;
    // Give a wrongly re-sent event time to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_after = receiver.accepted(3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(
        got_after.len(),
        3,
        "an event was delivered twice: {got_after:?}"
    );
    let kinds: Vec<_> = got.iter().map(|r| json(r)["type"].clone()).collect();
    assert_eq!(kinds, ["card.issued", "card.authorized", "card.used"]);
    assert_eq!(json(&got[1])["data"]["transaction_id"], "r1");
    server.stop().await;
}

#[tokio::test]
async fn a_receiver_that_never_answers_does_not_hold_up_authorisations() {
    // Accepts connections and never replies.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((c, _)) = listener.accept().await {
            h.lock().unwrap().push(c);
        }
    });
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        webhooks: vec![WebhookConfig {
            timeout_ms: 60_000,
            ..hook_config(port)
        }],
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 100,
            ..issue_req("carol", 10_000)
        },
    )
    .await;
    for i in 0..20 {
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            authorize(&mut switch, auth_req(&card, &format!("h{i}"), 10)),
        )
        .await
        .expect("an authorisation waited for the webhook");
        assert!(r.approved);
    }
    assert!(!held.lock().unwrap().is_empty(), "the hook never connected");
    server.stop().await;
}

#[tokio::test]
async fn events_deleted_by_retention_before_delivery_do_not_stall_the_hook() {
    // The receiver is down while the events happen and while the retention
    // pass deletes them; once it is back, the next event still arrives.
    let receiver = Receiver::start(0).await;
    receiver.down.store(true, Ordering::SeqCst);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        webhooks: vec![hook_config(receiver.port)],
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let (mut cards, _switch) = server.clients().await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 2,
            ..issue_req("carol", 500)
        },
    )
    .await;
    let start = Instant::now();
    while receiver.seen.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "no attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(397);
    let s = server.vault.purge(later).await.unwrap();
    assert_eq!(s.events_purged, 1, "{s:?}");
    receiver.down.store(false, Ordering::SeqCst);
    cards
        .pause_card(pb::CardRef {
            card_id: card.card.as_ref().unwrap().card_id.clone(),
        })
        .await
        .unwrap();
    let got = receiver.accepted(1).await;
    assert_eq!(json(&got[0])["type"], "card.paused", "{got:?}");
    server.stop().await;
}
