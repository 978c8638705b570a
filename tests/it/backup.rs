//! Online backup under load, and restore: every card comes back, and the
//! copy is consistent (no authorisation half in it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vcn::api::pb;
use vcn::api::pb::authorization_service_client::AuthorizationServiceClient;
use vcn::api::pb::card_service_client::CardServiceClient;

use crate::binary::{serve, serve_with, vcn};
use crate::crash::connect;
use crate::support::eur;

fn key(d: &std::path::Path, name: &str, role: &str) -> String {
    let o = vcn(d, 0, "", &["client", "add", name, "--role", role]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_online_backup_under_load_restores_every_card_consistently() {
    if crate::engine::engine() == crate::engine::Engine::Postgres {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: vcn backup is the embedded engine's; PostgreSQL uses pg_dump"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let server = serve(&d);
    let (admin, web, switch) = (
        key(&d, "ops", "admin"),
        key(&d, "web", "cards"),
        key(&d, "sw", "switch"),
    );
    let mut cards = CardServiceClient::new(connect(server.port, &web).await.unwrap());
    let mut issued = Vec::new();
    for i in 0..40 {
        let req = pb::IssueCardRequest {
            funding_pan: "4111111111111111".into(),
            owner: format!("o{}", i % 4),
            spend_limit: eur(1_000_000),
            max_uses: 10_000,
            ..Default::default()
        };
        issued.push(cards.issue_card(req).await.unwrap().into_inner());
    }

    // Load: authorisations on all cards from 8 tasks, recording each
    // acknowledged approval.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(usize, pb::AuthorizeRequest, String)>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut s = AuthorizationServiceClient::new(connect(server.port, &switch).await.unwrap());
        let (stop, acked, issued) = (stop.clone(), acked.clone(), issued.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let i = (w * 7 + n) % issued.len();
                let c = &issued[i];
                let req = pb::AuthorizeRequest {
                    transaction_id: format!("w{w}-{n}"),
                    pan: c.pan.clone(),
                    expiry_month: c.expiry_month,
                    expiry_year: c.expiry_year,
                    cvv: c.cvv.clone(),
                    amount: eur(100 + (n as i64 % 9)),
                    merchant_id: "shop".into(),
                    mcc: "5411".into(),
                };
                if let Ok(r) = s.authorize(req.clone()).await {
                    let r = r.into_inner();
                    assert!(r.approved, "{}", r.response_code);
                    acked.lock().unwrap().push((i, req, r.authorization_id));
                }
            }
        }));
    }
    // Some load first (a busy machine may need a while).
    let waited = std::time::Instant::now();
    while acked.lock().unwrap().len() < 30 && waited.elapsed() < std::time::Duration::from_secs(20)
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before_backup = acked.lock().unwrap().len();
    let file = d.join("vault.vcnbak");
    let (d2, f2, a2, port) = (d.clone(), file.clone(), admin.clone(), server.port);
    let out = tokio::task::spawn_blocking(move || {
        vcn(&d2, port, &a2, &["backup", "--out", f2.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A cards key may not take backups.
    let (d3, port) = (d.clone(), server.port);
    let (w2, f3) = (web.clone(), d.join("nope.vcnbak"));
    let denied = tokio::task::spawn_blocking(move || {
        vcn(&d3, port, &w2, &["backup", "--out", f3.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert_eq!(
        denied.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    // And more after it.
    let waited = std::time::Instant::now();
    while acked.lock().unwrap().len() < before_backup + 10
        && waited.elapsed() < std::time::Duration::from_secs(20)
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    server.terminate_cleanly();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > before_backup && before_backup > 20,
        "load too light: {before_backup} then {}",
        acked.len()
    );

    // Restore into a new data directory, on the other embedded engine (how
    // a vault changes engine), and serve it: the server opens it as what
    // it is, whatever engine it was told to make new vaults on.
    use vcn::vault::embedded::EngineKind;
    let other = match crate::engine::embedded_kind() {
        EngineKind::Fjall | EngineKind::Fjall3 => EngineKind::Sled,
        EngineKind::Sled => EngineKind::Fjall,
    };
    let restore = vcn(
        &d,
        0,
        "",
        &[
            "restore",
            "--from",
            file.to_str().unwrap(),
            "--data-dir",
            "restored",
            "--engine",
            other.name(),
        ],
    );
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    let again = vcn(
        &d,
        0,
        "",
        &[
            "restore",
            "--from",
            file.to_str().unwrap(),
            "--data-dir",
            "restored",
        ],
    );
    assert_eq!(
        again.status.code(),
        Some(2),
        "restore refuses a data directory that holds data"
    );
    let server = serve_with(&d, &["--data-dir", "restored"]);
    assert_eq!(
        vcn::vault::embedded::engine_of(&d.join("restored")).unwrap(),
        Some(other),
        "the restored vault keeps the engine it was restored on"
    );
    let mut cards = CardServiceClient::new(connect(server.port, &web).await.unwrap());
    let mut sw = AuthorizationServiceClient::new(connect(server.port, &switch).await.unwrap());

    let mut spent = Vec::new();
    for c in &issued {
        let id = c.card.as_ref().unwrap().card_id.clone();
        let got = cards
            .get_card(pb::GetCardRequest { card_id: id })
            .await
            .expect("every card is restored")
            .into_inner();
        spent.push(got.spent.unwrap().amount_minor);
        let d = sw
            .detokenize(pb::DetokenizeRequest { pan: c.pan.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.funding_pan, "4111111111111111");
    }
    // Which approvals are in the copy: a retry replays those (same id).
    let mut in_copy = vec![0i64; issued.len()];
    for (k, (i, req, auth_id)) in acked.iter().enumerate() {
        let r = sw.authorize(req.clone()).await.unwrap().into_inner();
        let present = &r.authorization_id == auth_id;
        if k < before_backup {
            assert!(
                present,
                "an approval acknowledged before the backup is missing from it"
            );
        }
        if present {
            in_copy[*i] += req.amount.as_ref().unwrap().amount_minor;
        }
    }
    assert_eq!(
        spent, in_copy,
        "each card's spent equals the approvals in the copy: the copy is consistent"
    );
    server.terminate_cleanly();
}
