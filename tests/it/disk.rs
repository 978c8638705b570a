//! Disk faults: a full filesystem, and data directories that must not be
//! opened.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tonic::Code;
use vcn::api::pb;

use crate::support::*;

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts, or explains why it cannot: on CI (CI=true) that is a failure.
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(Tmpfs(at.to_path_buf()));
        }
        let why = "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): the full-disk test needs a real small filesystem";
        assert!(std::env::var("CI").is_err(), "{why}");
        eprintln!("SKIPPED: {why}");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_clearly_keeps_reads_resumes_and_loses_nothing() {
    if crate::engine::engine() == crate::engine::Engine::Postgres {
        // PostgreSQL's disk is the database server's: its full-disk
        // behaviour is the connection-loss case in postgres.rs.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the full-disk test is for the embedded engine"
        );
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let data = dir.path().join("data");
    let Some(fs) = Tmpfs::mount(&data, "24m") else {
        return;
    };
    let config = config_in(dir.path());
    let server = TestServer::start_with(dir.clone(), config).await;
    let switch_key = server.add_client("sw", vcn::clients::Role::Switch, None);
    let (mut cards, _) = server.clients().await;
    let mut switch = server.switch_as(&switch_key).await;
    let mut issued = Vec::new();
    for _ in 0..30 {
        issued.push(issue(&mut cards, issue_req("alice", 5000)).await);
    }

    // Something else fills the disk.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 256 * 1024];
        while f.write_all(&chunk).and_then(|_| f.sync_all()).is_ok() {}
    }
    let refusal = loop {
        assert!(issued.len() < 20_000, "the filesystem never filled up");
        match cards.issue_card(issue_req("alice", 5000)).await {
            Ok(r) => issued.push(r.into_inner()),
            Err(s) => break s,
        }
    };
    assert_eq!(refusal.code(), Code::Unavailable, "{}", refusal.message());
    assert!(
        refusal.message().contains("full"),
        "the message says why: {}",
        refusal.message()
    );

    // Writes are refused, clearly, naming the cause.
    let first = &issued[0].clone();
    let err = switch
        .authorize(auth_req(first, "full-1", 100))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // The audit sealer writes too, so which write met the full disk first
    // (and so the exact wording) depends on timing: either says why.
    assert!(
        ["full", "refused", "reopen"]
            .iter()
            .any(|w| err.message().contains(w)),
        "{}",
        err.message()
    );
    // Reads keep working while the disk is full: the store refuses writes
    // while the filesystem is below its free-space margin, so the engine never
    // meets ENOSPC and stays healthy.
    for card in issued.iter().rev().take(10) {
        let id = &card.card.as_ref().unwrap().card_id;
        assert_eq!(&get(&mut cards, id).await.card_id, id, "GetCard while full");
    }
    let listed = cards
        .list_cards(pb::ListCardsRequest {
            owner: "alice".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("ListCards while full: {s:?}"))
        .into_inner();
    assert_eq!(listed.cards.len(), 5);
    // Detokenize reads too, but reveals a card number, so its audit entry
    // must be written first (PCI DSS 10.2, issue 3): refused while nothing
    // can be written, saying why, never answered unaudited.
    let err = switch
        .detokenize(pb::DetokenizeRequest {
            pan: issued[0].pan.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("audit") && err.message().contains("full"),
        "{}",
        err.message()
    );
    // Still refused: the reads did not open the way for writes.
    let err = cards
        .issue_card(issue_req("alice", 5000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());

    // Space returns: writes resume, without a restart. (Bounded retries:
    // if a write did meet the full disk inside the engine, the store reopens it,
    // at most once a second.)
    std::fs::remove_file(&filler).unwrap();
    let mut resumed = None;
    for _ in 0..50 {
        match switch
            .authorize(auth_req(&issued[1], "resumed-1", 100))
            .await
        {
            Ok(r) => {
                resumed = Some(r.into_inner());
                break;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    let resumed = resumed.expect("writes resumed once space returned");
    assert!(resumed.approved, "{resumed:?}");
    let after = issue(&mut cards, issue_req("alice", 5000)).await;
    let d = switch
        .detokenize(pb::DetokenizeRequest {
            pan: after.pan.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.funding_pan, FUNDING);
    issued.push(after);

    // Nothing acknowledged was lost or corrupted, across a restart too.
    drop((cards, switch));
    // (Stopping may report the failed flush of writes it never acknowledged.)
    let (dir, config) = (server.dir.clone(), server.config.clone());
    let mut server = server;
    server.begin_stop();
    let _ = server.stopped().await;
    drop(server);
    let server = TestServer::start_with(dir, config).await;
    let cards_key = server.add_client("web-after", vcn::clients::Role::Cards, None);
    let mut cards = server.cards_as(&cards_key).await;
    let mut switch = server.switch_as(&switch_key).await;
    for card in &issued {
        let id = &card.card.as_ref().unwrap().card_id;
        assert_eq!(&get(&mut cards, id).await.card_id, id);
    }
    assert!(
        authorize(&mut switch, auth_req(first, "after-full", 100))
            .await
            .approved,
        "writes work again"
    );
    assert!(issue(&mut cards, issue_req("alice", 100))
        .await
        .card
        .is_some());
    let d = switch
        .detokenize(pb::DetokenizeRequest {
            pan: issued.last().unwrap().pan.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.funding_pan, FUNDING);
    server.stop().await;
    drop(fs);
}

fn embedded_only(test: &str) -> bool {
    if crate::engine::engine() == crate::engine::Engine::Postgres {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test} is about the embedded engine's files"
        );
        return false;
    }
    true
}

/// How far a file holds data: past its last non-zero byte is only room
/// the engine set aside (fjall allocates its journal ahead).
fn data_end(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// The file holding the most data the engine wrote under `dir` (sled's
/// `db`; fjall's journal or a segment), leaving out the store's own small
/// files, and how far its data goes.
fn largest_engine_file(dir: &Path) -> (PathBuf, u64) {
    fn walk(dir: &Path, best: &mut Option<(u64, PathBuf)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, best);
                continue;
            }
            if e.file_name().to_string_lossy().starts_with("vcn-") {
                continue;
            }
            let end = data_end(&path);
            if best.as_ref().is_none_or(|(l, _)| end > *l) {
                *best = Some((end, path));
            }
        }
    }
    let mut best = None;
    walk(dir, &mut best);
    let (end, path) = best.expect("the engine's files");
    (path, end)
}

/// A vault with some cards, stopped cleanly; returns its directory and
/// configuration.
async fn stopped_vault_with_cards(n: usize) -> (Arc<tempfile::TempDir>, vcn::config::Config) {
    let server = TestServer::start().await;
    let (mut cards, _) = server.clients().await;
    for _ in 0..n {
        issue(&mut cards, issue_req("alice", 100)).await;
    }
    drop(cards);
    server.stop().await
}

fn refused(r: Result<TestServer, vcn::server::StartError>) -> String {
    match r {
        Ok(_) => panic!("the server started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_truncated_or_corrupted_database_file_is_refused_not_silently_shortened() {
    if !embedded_only("the truncation test") {
        return;
    }
    for damage in ["truncate", "overwrite"] {
        let (dir, config) = stopped_vault_with_cards(150).await;
        let (db, size) = largest_engine_file(&config.data_dir);
        match damage {
            "truncate" => std::fs::OpenOptions::new()
                .write(true)
                .open(&db)
                .unwrap()
                .set_len(size / 2)
                .unwrap(),
            _ => {
                use std::io::{Seek, SeekFrom, Write};
                let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
                f.seek(SeekFrom::Start(size / 3)).unwrap();
                f.write_all(&vec![0x5a; 4096]).unwrap();
            }
        }
        let msg = refused(TestServer::try_start_with(dir, config).await);
        assert!(
            msg.contains("truncated or corrupted") && msg.contains("restore"),
            "{damage}: {msg}"
        );
    }
}

#[tokio::test]
async fn an_existing_installation_never_starts_on_an_empty_or_missing_data_directory() {
    if !embedded_only("the missing data directory test") {
        return;
    }
    let (dir, config) = stopped_vault_with_cards(3).await;
    std::fs::rename(&config.data_dir, dir.path().join("data.moved")).unwrap();
    let msg = refused(TestServer::try_start_with(dir.clone(), config.clone()).await);
    assert!(
        msg.contains("refusing to start an empty vault") && msg.contains("--new-vault"),
        "{msg}"
    );
    assert!(
        !config.data_dir.exists(),
        "nothing was created in its place"
    );

    // Moved back: it starts, with its cards.
    std::fs::rename(dir.path().join("data.moved"), &config.data_dir).unwrap();
    let server = TestServer::start_with(dir.clone(), config.clone()).await;
    let (mut cards, _) = server.clients().await;
    let list = cards
        .list_cards(pb::ListCardsRequest {
            owner: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.into_inner().cards.len(), 3);
    drop(cards);
    let (dir, config) = server.stop().await;

    // --new-vault starts a fresh one on purpose.
    std::fs::remove_dir_all(&config.data_dir).unwrap();
    let fresh = vcn::config::Config {
        new_vault: true,
        ..config
    };
    let server = TestServer::start_with(dir, fresh).await;
    let (mut cards, _) = server.clients().await;
    let list = cards
        .list_cards(pb::ListCardsRequest {
            owner: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(list.into_inner().cards.is_empty());
}

#[tokio::test]
async fn a_data_directory_that_cannot_be_one_is_refused_with_its_name() {
    if !embedded_only("the unusable data directory test") {
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = config_in(dir.path());
    std::fs::write(&config.data_dir, "not a directory").unwrap();
    let msg = refused(TestServer::try_start_with(dir, config.clone()).await);
    assert!(
        msg.contains(&config.data_dir.display().to_string()),
        "{msg}"
    );
}
