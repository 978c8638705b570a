//! The audit log: every operation and refusal is in it with who, what,
//! when, where and the outcome; the chain shows any edit, deletion,
//! insertion or reordering; an operation whose entry cannot be written
//! fails; a truncated log stops the server.

use std::sync::Arc;

use tonic::Code;
use vcn::api::pb;
use vcn::audit::{self, Entry, Verdict};
use vcn::clients::Role;
use vcn::server::Service;

use crate::support::*;

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A server that did a bit of everything, stopped; its log's entries.
async fn busy_server() -> (Arc<tempfile::TempDir>, vcn::config::Config, Vec<String>) {
    let server = TestServer::start().await;
    let web = server.add_client("web", Role::Cards, None);
    let sw = server.add_client("sw", Role::Switch, None);
    let mut cards = server.cards_as(&web).await;
    let mut switch = server.switch_as(&sw).await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 5,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let id = card.card.as_ref().unwrap().card_id.clone();
    assert!(
        authorize(&mut switch, auth_req(&card, "t1", 100))
            .await
            .approved
    );
    let wrong_cvv = pb::AuthorizeRequest {
        cvv: format!("{:03}", (card.cvv.parse::<u32>().unwrap() + 1) % 1000),
        ..auth_req(&card, "t2", 100)
    };
    assert!(!authorize(&mut switch, wrong_cvv).await.approved);
    let unknown = pb::AuthorizeRequest {
        pan: "4000000000000002".into(),
        ..auth_req(&card, "t3", 100)
    };
    assert_eq!(authorize(&mut switch, unknown).await.response_code, "14");
    switch
        .detokenize(pb::DetokenizeRequest {
            pan: card.pan.clone(),
        })
        .await
        .unwrap();
    cards
        .update_card_limits(pb::UpdateCardLimitsRequest {
            card_id: id.clone(),
            spend_limit: eur(6000),
            ..Default::default()
        })
        .await
        .unwrap();
    for f in ["pause", "resume", "close"] {
        let r = pb::CardRef {
            card_id: id.clone(),
        };
        match f {
            "pause" => cards.pause_card(r).await.map(|_| ()),
            "resume" => cards.resume_card(r).await.map(|_| ()),
            _ => cards.close_card(r).await.map(|_| ()),
        }
        .unwrap();
    }
    // Refusals: an unknown key, and a cards client at the switch's service.
    let mut intruder = server.switch_as("vcn_not-a-key").await;
    assert_status(
        intruder
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone(),
            })
            .await,
        Code::Unauthenticated,
        "unknown API key",
    );
    let mut wrong_role = server.switch_as(&web).await;
    assert_eq!(
        wrong_role
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    drop((cards, switch, intruder, wrong_role));
    let (dir, config) = server.stop().await;
    (dir, config, vec![card.pan, card.cvv, id])
}

#[tokio::test]
async fn every_operation_and_refusal_is_audited_without_secrets() {
    let (_dir, config, secrets) = busy_server().await;
    let (pan, cvv, id) = (&secrets[0], &secrets[1], &secrets[2]);
    let path = config.audit_path();
    let entries = audit::read_entries(&path).unwrap();
    let find = |action: &str, outcome: &str| -> &Entry {
        entries
            .iter()
            .find(|e| e.action == action && e.outcome.starts_with(outcome))
            .unwrap_or_else(|| panic!("no {action} {outcome} in {entries:#?}"))
    };
    let masked = format!("{}******{}", &pan[..6], &pan[12..]);
    let issued = find("issue", "ok");
    assert_eq!(
        (issued.client.as_str(), issued.role.as_str()),
        ("web", "cards")
    );
    assert_eq!(
        (issued.card_id.as_str(), issued.pan.as_str()),
        (id.as_str(), masked.as_str())
    );
    assert!(issued.origin.starts_with("127.0.0.1:"), "{issued:?}");
    let approved = find("authorize", "approved 00");
    assert_eq!(
        (approved.client.as_str(), approved.card_id.as_str()),
        ("sw", id.as_str())
    );
    assert!(
        approved.detail.contains("transaction_id=t1"),
        "{approved:?}"
    );
    find("authorize", "declined");
    let unknown = find("authorize", "declined 14");
    assert_eq!(unknown.pan, "400000******0002");
    let detok = find("detokenize", "ok");
    assert_eq!(
        (detok.client.as_str(), detok.card_id.as_str()),
        ("sw", id.as_str())
    );
    for action in ["update_limits", "pause", "resume", "close"] {
        assert_eq!(find(action, "ok").card_id, *id);
    }
    let intruder = find("authenticate", "refused: unknown API key");
    assert!(intruder.origin.starts_with("127.0.0.1:"), "{intruder:?}");
    let wrong_role = find("authenticate", "refused: wrong role");
    assert_eq!(wrong_role.client, "web");
    // Times are RFC 3339; the sequence is dense from 1.
    assert!(time::OffsetDateTime::parse(
        &issued.time,
        &time::format_description::well_known::Rfc3339
    )
    .is_ok());
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    // No full number or CVV in the log, only masked ones.
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        !contains(&bytes, pan),
        "a full card number is in the audit log"
    );
    assert!(
        !contains(&bytes, FUNDING),
        "a funding number is in the audit log"
    );
    assert!(!contains(&bytes, &format!("\"{cvv}\"")));
    let key = audit::load_key(&config.keys_dir, false).unwrap();
    assert_eq!(
        audit::verify(&path, &key).unwrap(),
        Verdict::Intact(entries.len() as u64)
    );
}

#[tokio::test]
async fn verify_names_the_first_edited_deleted_inserted_or_moved_entry() {
    let (dir, config, _) = busy_server().await;
    let path = config.audit_path();
    let key = audit::load_key(&config.keys_dir, false).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 10, "{}", lines.len());
    let check = |name: &str, edited: Vec<String>, want_line: usize| {
        let p = dir.path().join(format!("{name}.log"));
        std::fs::write(&p, edited.join("\n") + "\n").unwrap();
        match audit::verify(&p, &key).unwrap() {
            Verdict::Broken { line, reason } => {
                assert_eq!(line, want_line, "{name}: {reason}")
            }
            Verdict::Intact(_) => panic!("{name} was not detected"),
        }
    };
    let owned = || lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    // Edited: a client name changed.
    let mut e = owned();
    e[4] = e[4]
        .replace("\"client\":\"sw\"", "\"client\":\"web\"")
        .replace("\"client\":\"web\"", "\"client\":\"xx\"");
    check("edited", e, 5);
    // Deleted.
    let mut d = owned();
    d.remove(3);
    check("deleted", d, 4);
    // Inserted: a copy of an entry (a replay), and a forged one.
    let mut i = owned();
    i.insert(6, lines[2].to_string());
    check("inserted", i, 7);
    let mut forged: Entry = serde_json::from_str(lines[5]).unwrap();
    forged.action = "detokenize".into();
    let mut f = owned();
    f[5] = serde_json::to_string(&forged).unwrap();
    check("forged", f, 6);
    // Reordered.
    let mut r = owned();
    r.swap(2, 3);
    check("reordered", r, 3);

    // The command line says the same, and exits 1.
    let mut d = owned();
    d.remove(1);
    let p = dir.path().join("cli.log");
    std::fs::write(&p, d.join("\n") + "\n").unwrap();
    let keys = config.keys_dir.to_str().unwrap().to_string();
    let o = std::process::Command::new(crate::binary::VCN)
        .args([
            "audit",
            "verify",
            "--log",
            p.to_str().unwrap(),
            "--keys-dir",
            &keys,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("BROKEN at line 2"));
    let o = std::process::Command::new(crate::binary::VCN)
        .args([
            "audit",
            "verify",
            "--log",
            path.to_str().unwrap(),
            "--keys-dir",
            &keys,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // Export for a SIEM: JSON lines, filtered by time.
    let o = std::process::Command::new(crate::binary::VCN)
        .args([
            "audit",
            "export",
            "--log",
            path.to_str().unwrap(),
            "--since",
            "2000-01-01T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let exported: Vec<Entry> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), lines.len());
    let o = std::process::Command::new(crate::binary::VCN)
        .args([
            "audit",
            "export",
            "--log",
            path.to_str().unwrap(),
            "--since",
            "2999-01-01T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(o.status.success() && o.stdout.is_empty());
}

#[tokio::test]
async fn a_truncated_log_stops_the_server() {
    let (dir, config, _) = busy_server().await;
    let path = config.audit_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    match Service::open(&config).await {
        Err(e) => assert!(e.to_string().contains("truncated"), "{e}"),
        Ok(_) => panic!("started on a truncated audit log"),
    }
    std::fs::write(&path, &text).unwrap();
    let server = TestServer::start_with(dir, config).await;
    server.stop().await;
}

#[tokio::test]
async fn an_operation_whose_audit_entry_cannot_be_written_fails() {
    let (server, chaos) = TestServer::start_chaos(config_in).await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(&mut cards, issue_req("alice", 500)).await;
    // A read on its own would succeed: its audit entry (written on its
    // own, to the instance's pending journal) cannot be written, so the
    // number is not returned.
    let journal = server
        .vault
        .audit_journal()
        .expect("the server writes entries on their own to its journal");
    journal.set_fail_writes(true);
    let r = switch
        .detokenize(pb::DetokenizeRequest {
            pan: card.pan.clone(),
        })
        .await;
    let err = r.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("audit"), "{}", err.message());
    journal.set_fail_writes(false);
    // An operation's entry is in its own store batch: when the store
    // cannot write, the operation fails with it.
    chaos.set_fail_updates(true);
    let err = cards.issue_card(issue_req("alice", 500)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    chaos.set_fail_updates(false);
    switch
        .detokenize(pb::DetokenizeRequest { pan: card.pan })
        .await
        .unwrap();
    drop((cards, switch, journal));
    let (_dir, config) = server.stop().await;
    // Only what was acknowledged is in the log: one detokenisation.
    let entries = audit::read_entries(&config.audit_path()).unwrap();
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.action == "detokenize" && e.outcome == "ok")
            .count(),
        1,
        "{entries:#?}"
    );
}

#[tokio::test]
async fn a_failed_seal_neither_loses_nor_duplicates_entries() {
    let (server, chaos) = TestServer::start_chaos(config_in).await;
    let (mut cards, _) = server.clients().await;
    for _ in 0..20 {
        issue(&mut cards, issue_req("alice", 500)).await;
    }
    // The sealer appends to the file, then cannot remove the entries from
    // the store: they must not be sealed a second time.
    chaos.set_fail_updates(true);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    chaos.set_fail_updates(false);
    issue(&mut cards, issue_req("bob", 500)).await;
    drop(cards);
    let (_dir, config) = server.stop().await;
    let path = config.audit_path();
    let entries = sealed_once(&path, &config.keys_dir);
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.action == "issue" && e.outcome == "ok")
            .count(),
        21
    );
}

#[tokio::test]
async fn entries_written_on_their_own_are_sealed_once_across_a_stop_with_the_head_behind() {
    let (server, chaos) = TestServer::start_chaos(config_in).await;
    let (mut cards, mut switch) = server.clients().await;
    let card = issue(&mut cards, issue_req("alice", 500)).await;
    for _ in 0..10 {
        detokenize(&mut switch, &card.pan).await;
    }
    // The vault cannot record the head: the sealer goes on appending to
    // the file, and the server stops with the head behind the file.
    chaos.set_fail_updates(true);
    for _ in 0..10 {
        detokenize(&mut switch, &card.pan).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop((cards, switch));
    let (dir, config) = server.stop().await;
    drop(chaos); // it holds the store open
    let sealed = audit::read_entries(&config.audit_path()).unwrap();
    assert_eq!(
        sealed.iter().filter(|e| e.action == "detokenize").count(),
        20,
        "sealed while the head could not be recorded"
    );
    // The next start finds them in the file, not only in the journal.
    let server = TestServer::start_with(dir, config).await;
    let sw = server.add_client("sw-after", Role::Switch, None);
    let mut switch = server.switch_as(&sw).await;
    for _ in 0..5 {
        detokenize(&mut switch, &card.pan).await;
    }
    drop(switch);
    let (_dir, config) = server.stop().await;
    let path = config.audit_path();
    let entries = sealed_once(&path, &config.keys_dir);
    assert_eq!(
        entries.iter().filter(|e| e.action == "detokenize").count(),
        25
    );
}

async fn detokenize(switch: &mut Switch, pan: &str) {
    switch
        .detokenize(pb::DetokenizeRequest { pan: pan.into() })
        .await
        .unwrap();
}

/// The entries of the audit log at `path`, asserting its chain holds under
/// the key in `keys_dir` and that no entry is in it twice.
pub fn sealed_once(path: &std::path::Path, keys_dir: &std::path::Path) -> Vec<Entry> {
    let key = audit::load_key(keys_dir, false).unwrap();
    let entries = audit::read_entries(path).unwrap();
    assert_eq!(
        audit::verify(path, &key).unwrap(),
        Verdict::Intact(entries.len() as u64)
    );
    let mut ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), entries.len(), "an audit entry was sealed twice");
    entries
}
