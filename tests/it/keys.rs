//! Split-knowledge keys and key rotation: components combine at start and
//! a wrong one refuses to start; a rotation keeps every card working, moves
//! every record to the new version, and a retired key is never read again.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use vcn::api::pb;
use vcn::server::Service;
use vcn::vault::keyfile;

use crate::support::*;

fn start_error(r: Result<Service, vcn::server::StartError>) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the service started"),
    }
}

#[tokio::test]
async fn key_components_combine_and_a_wrong_component_refuses_to_start() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = vcn::config::Config {
        dev_keys: false,
        ..config_in(dir.path())
    };
    let g = keyfile::generate_version(&config.keys_dir, 1, 3).unwrap();
    assert!(!config.keys_dir.join("master.key").exists());
    let server = TestServer::start_with(dir.clone(), config.clone()).await;
    assert_eq!(
        server.vault.keys().check_value(1),
        Some(g.check_value.as_str())
    );
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(&mut cards, issue_req("alice", 500)).await;
    assert!(
        authorize(&mut switch, auth_req(&card, "t1", 100))
            .await
            .approved
    );
    drop((cards, switch));
    let (dir, config) = server.stop().await;

    // One custodian brings a wrong component: named, and refused.
    let other = tempfile::tempdir().unwrap();
    keyfile::generate_version(other.path(), 1, 3).unwrap();
    let c2 = keyfile::component_path(&config.keys_dir, 1, 2);
    let saved = std::fs::read(&c2).unwrap();
    std::fs::remove_file(&c2).unwrap();
    std::fs::copy(keyfile::component_path(other.path(), 1, 2), &c2).unwrap();
    let e = start_error(Service::open(&config).await);
    assert!(e.contains("a component is wrong or missing"), "{e}");
    assert!(e.contains(&g.check_value), "the message names the KCV: {e}");
    // A whole other ceremony (its own KCV file) is refused by the vault.
    for i in 1..=3 {
        let p = keyfile::component_path(&config.keys_dir, 1, i);
        std::fs::remove_file(&p).unwrap();
        std::fs::copy(keyfile::component_path(other.path(), 1, i), &p).unwrap();
    }
    std::fs::copy(
        keyfile::kcv_path(other.path(), 1),
        keyfile::kcv_path(&config.keys_dir, 1),
    )
    .unwrap();
    let e = start_error(Service::open(&config).await);
    assert!(e.contains("not the one this vault was written with"), "{e}");
    // A component readable by others is refused.
    let other_c2 = keyfile::component_path(&config.keys_dir, 1, 2);
    std::fs::set_permissions(&other_c2, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = start_error(Service::open(&config).await);
    assert!(e.contains("chmod 600"), "{e}");
    let _ = (dir, saved);
}

async fn wait_until_moved(vault: &vcn::vault::Vault, old: u32) -> vcn::vault::KeyUsage {
    let start = Instant::now();
    loop {
        let usage = vault.key_usage().await.unwrap();
        let u = usage.into_iter().find(|u| u.version == old).unwrap();
        if u.sealed + u.pan_index + u.funding_index == 0 {
            return u;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "re-encryption did not finish: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn rotation_keeps_every_card_working_and_a_retired_key_is_not_read() {
    let server = TestServer::start().await;
    let cards_key = server.add_client("web", vcn::clients::Role::Cards, None);
    let switch_key = server.add_client("sw", vcn::clients::Role::Switch, None);
    let mut cards = server.cards_as(&cards_key).await;
    let mut switch = server.switch_as(&switch_key).await;
    let fundings = ["4111111111111111", "5555555555554444", "378282246310005"];
    let mut old = vec![];
    for (i, f) in fundings.iter().enumerate() {
        let card = issue(
            &mut cards,
            pb::IssueCardRequest {
                funding_pan: f.to_string(),
                max_uses: 10,
                ..issue_req("alice", 10_000)
            },
        )
        .await;
        assert!(
            authorize(&mut switch, auth_req(&card, &format!("a{i}"), 100))
                .await
                .approved
        );
        old.push(card);
    }
    let first_answer = authorize(&mut switch, auth_req(&old[0], "a0", 100)).await;

    // Rotate while serving: a new version in the keys directory, reloaded
    // as SIGHUP does; re-encryption runs in the background.
    let keys_dir = server.keys_dir();
    keyfile::generate_version(&keys_dir, 2, 2).unwrap();
    vcn::server::reload_keys(&server.vault, &keys_dir)
        .await
        .unwrap();
    assert_eq!(server.vault.keys().current_version(), 2);
    let new = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 10,
            ..issue_req("bob", 10_000)
        },
    )
    .await;
    for (i, card) in old.iter().enumerate() {
        assert!(
            authorize(&mut switch, auth_req(card, &format!("b{i}"), 100))
                .await
                .approved
        );
        let d = switch
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.funding_pan, fundings[i]);
    }
    let u = wait_until_moved(&server.vault, 1).await;
    // Only the printed CVVs of the live v1 cards still need version 1.
    assert_eq!(u.live_cvv, 3, "{u:?}");
    let usage = server.vault.key_usage().await.unwrap();
    let v2 = usage.iter().find(|u| u.version == 2).unwrap();
    assert_eq!((v2.sealed, v2.pan_index), (4, 4), "{v2:?}");
    assert_eq!(v2.funding_index, 3, "one entry per distinct funding number");
    // After the move: every card authorises and detokenises; a retry of a
    // transaction decided before the rotation gets its first answer.
    let retried = authorize(&mut switch, auth_req(&old[0], "a0", 100)).await;
    assert_eq!(retried.authorization_id, first_answer.authorization_id);
    assert_eq!(retried.response_code, first_answer.response_code);
    for (i, card) in old.iter().chain([&new]).enumerate() {
        assert!(
            authorize(&mut switch, auth_req(card, &format!("c{i}"), 100))
                .await
                .approved
        );
        switch
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone(),
            })
            .await
            .unwrap();
    }
    // Version 1 cannot be retired while live cards' CVVs derive from it.
    match server.vault.retire_version(1).await {
        Err(e) => assert!(e.to_string().contains("still needed by 3 records"), "{e}"),
        Ok(()) => panic!("retired a needed key"),
    }
    match server.vault.retire_version(2).await {
        Err(e) => assert!(e.to_string().contains("current"), "{e}"),
        Ok(()) => panic!("retired the current key"),
    }
    for card in &old {
        cards
            .close_card(pb::CardRef {
                card_id: card.card.as_ref().unwrap().card_id.clone(),
            })
            .await
            .unwrap();
    }
    drop((cards, switch));
    let (dir, config) = server.stop().await;

    // A key removed without being retired: refused, not silently lost.
    let v1 = keyfile::master_key_path(&config.keys_dir);
    let aside = dir.path().join("aside.key");
    std::fs::rename(&v1, &aside).unwrap();
    let e = start_error(Service::open(&config).await);
    assert!(e.contains("key version 1 holds data"), "{e}");
    std::fs::rename(&aside, &v1).unwrap();

    let server = TestServer::start_with(dir, config).await;
    server.vault.retire_version(1).await.unwrap();
    let moved = keyfile::retire(&server.keys_dir(), 1).unwrap();
    assert!(!v1.exists());
    let (dir, config) = server.stop().await;
    // The retired file is never read again: garbage, world-readable.
    for p in &moved {
        std::fs::write(p, "garbage").unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let server = TestServer::start_with(dir, config).await;
    assert_eq!(server.vault.keys().versions().collect::<Vec<_>>(), vec![2]);
    let mut switch = server.switch_as(&switch_key).await;
    assert!(
        authorize(&mut switch, auth_req(&new, "d0", 100))
            .await
            .approved
    );
    for (i, card) in old.iter().enumerate() {
        let d = switch
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.funding_pan, fundings[i]);
        let r = authorize(&mut switch, auth_req(card, &format!("d{}", i + 1), 100)).await;
        assert_eq!(r.decline_reason, "card_closed");
    }
    assert_status(
        switch
            .detokenize(pb::DetokenizeRequest {
                pan: "4000000000000002".into(),
            })
            .await,
        Code::NotFound,
        "card number",
    );
    server.stop().await;
}

#[test]
fn keygen_components_and_rotate_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(crate::binary::VCN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let o = run(&["keygen", "--keys-dir", "k", "--components", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let kcv = out
        .lines()
        .find_map(|l| l.strip_prefix("key check value (KCV): "))
        .unwrap_or_else(|| panic!("no KCV printed: {out}"));
    let key = keyfile::load(&dir.path().join("k")).unwrap();
    assert_eq!(kcv, keyfile::check_value(&key));
    for i in 1..=3 {
        let p = keyfile::component_path(&dir.path().join("k"), 1, i);
        assert_eq!(
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let o = run(&["keygen", "--keys-dir", "k", "--components", "3"]);
    assert!(!o.status.success(), "a second keygen must refuse");
    let o = run(&["keys", "rotate", "--keys-dir", "k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("kill -HUP"));
    assert!(dir.path().join("k/master.v2.key").exists());
    assert_eq!(
        keyfile::versions(&dir.path().join("k")).unwrap(),
        vec![1, 2]
    );
    let o = run(&["keygen", "--keys-dir", "k2", "--components", "12"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--components must be 2 to 9"));
}

/// The real binary: `vcn keys rotate` and SIGHUP rotate a running server
/// without a restart; cards keep working; nothing secret reaches the TRACE
/// log; `vcn keys status` then shows nothing sealed under version 1.
#[test]
fn sighup_rotates_a_running_server_and_no_secret_reaches_its_logs() {
    use crate::binary::{serve, vcn};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = serve(d);
    let port = server.port;
    let add = |name: &str, role: &str| {
        let o = vcn(d, port, "", &["client", "add", name, "--role", role]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    let (web, switch) = (add("web", "cards"), add("switch", "switch"));
    let issue = |funding: &str| -> serde_json::Value {
        let o = vcn(
            d,
            port,
            &web,
            &[
                "card",
                "issue",
                "--funding-pan",
                funding,
                "--owner",
                "alice",
                "--limit",
                "50.00EUR",
                "--uses",
                "3",
                "--json",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let pay = |card: &serde_json::Value, txn: &str| {
        let s = |k: &str| card[k].as_str().unwrap().to_string();
        let o = vcn(
            d,
            port,
            &switch,
            &[
                "authorize",
                "--pan",
                &s("pan"),
                "--expiry",
                &s("expiry"),
                "--cvv",
                &s("cvv"),
                "--amount",
                "1.00EUR",
                "--txn",
                txn,
                "--json",
            ],
        );
        assert!(
            o.status.success(),
            "{txn}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let a = issue("5555555555554444");
    pay(&a, "a1");

    let o = vcn(d, port, "", &["keys", "rotate", "--keys-dir", "keys"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    while !std::fs::read_to_string(&server.log)
        .unwrap_or_default()
        .contains("background re-encryption finished")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no re-encryption after SIGHUP: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = issue("4111111111111111");
    pay(&a, "a2");
    pay(&b, "b1");
    for card in [&a, &b] {
        let o = vcn(
            d,
            port,
            &switch,
            &[
                "detokenize",
                "--pan",
                card["pan"].as_str().unwrap(),
                "--json",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let log_path = server.log.clone();
    assert!(server.terminate().success());

    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(log.contains("keyring reloaded"), "the log was captured");
    let mut secrets = vec![web.clone(), switch.clone()];
    for f in ["keys/master.key", "keys/master.v2.key", "keys/audit.key"] {
        secrets.push(
            std::fs::read_to_string(d.join(f))
                .unwrap()
                .trim()
                .to_string(),
        );
    }
    for card in [&a, &b] {
        secrets.push(card["pan"].as_str().unwrap().to_string());
    }
    secrets.push("5555555555554444".into());
    secrets.push("4111111111111111".into());
    for s in &secrets {
        assert!(
            !log.contains(s.as_str()),
            "a secret ({}...) reached the log",
            &s[..4]
        );
    }
    for card in [&a, &b] {
        let cvv = card["cvv"].as_str().unwrap();
        for line in log.lines().filter(|l| l.to_lowercase().contains("cvv")) {
            assert!(!line.contains(cvv), "a CVV reached the log: {line}");
        }
    }

    // Offline: nothing is sealed under version 1 any more; only the live
    // card's CVV still needs it.
    if crate::engine::engine().is_embedded() {
        let o = std::process::Command::new(crate::binary::VCN)
            .args(["keys", "status", "--data-dir", "data", "--keys-dir", "keys"])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let v1: Vec<&str> = out
            .lines()
            .find(|l| l.starts_with("1 "))
            .unwrap_or_else(|| panic!("{out}"))
            .split_whitespace()
            .collect();
        // VERSION SEALED PAN-INDEX FUND-INDEX LIVE-CVV NEEDED-BY
        assert_eq!(&v1[1..6], &["0", "0", "0", "1", "1"], "{out}");
        let o = std::process::Command::new(crate::binary::VCN)
            .args([
                "keys",
                "retire",
                "1",
                "--data-dir",
                "data",
                "--keys-dir",
                "keys",
            ])
            .current_dir(d)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("still needed by 1 records"));
    }
}
