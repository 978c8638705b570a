//! The real `vcn` binary, as an operator and a newcomer use it.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const VCN: &str = env!("CARGO_BIN_EXE_vcn");

/// A `vcn serve` process in `dir`, logging at TRACE to `dir/serve.log`.
pub struct Served {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The engine under test for a server in `dir`: `--engine` for the
/// embedded one, else `--store` with a database created for `dir` on first
/// use (so a restart in the same directory finds its data).
fn store_args(dir: &Path) -> Vec<String> {
    if let crate::engine::Engine::Embedded(kind) = crate::engine::engine() {
        return vec!["--engine".into(), kind.name().into()];
    }
    let remembered = dir.join("store-url");
    let url = match std::fs::read_to_string(&remembered) {
        Ok(u) => u,
        Err(_) => {
            let url = crate::engine::fresh_store()
                .expect("a store for the postgres engine")
                .expose()
                .to_string();
            std::fs::write(&remembered, &url).unwrap();
            url
        }
    };
    vec!["--store".into(), url]
}

pub fn serve(dir: &Path) -> Served {
    serve_with(dir, &[])
}

/// `vcn serve` in `dir` with extra arguments.
pub fn serve_with(dir: &Path, extra: &[&str]) -> Served {
    let port = free_port();
    let log = dir.join("serve.log");
    let child = Command::new(VCN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(store_args(dir))
        .args(extra)
        .current_dir(dir)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Served { child, port, log }
}

impl Served {
    /// SIGTERM, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// SIGTERM, and asserts a clean exit (showing the end of its log if not).
    pub fn terminate_cleanly(self) {
        let log = self.log.clone();
        let status = self.terminate();
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "the server exited with {status} on SIGTERM:\n{}",
                tail.join("\n")
            );
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn vcn(dir: &Path, port: u16, key: &str, args: &[&str]) -> Output {
    Command::new(VCN)
        .args(args)
        .current_dir(dir)
        .env("VCN_SERVER", format!("http://127.0.0.1:{port}"))
        .env("VCN_API_KEY", key)
        .output()
        .unwrap()
}

fn last_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn cli_drives_a_real_server_and_no_secret_reaches_its_logs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = serve(d);
    let port = server.port;

    let add = |name: &str, role: &str| {
        let o = vcn(d, port, "", &["client", "add", name, "--role", role]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        last_line(&o)
    };
    let web = add("web", "cards");
    let switch = add("switch", "switch");
    assert!(web.starts_with("vcn_") && switch.starts_with("vcn_"));

    let card = json(&vcn(
        d,
        port,
        &web,
        &[
            "card",
            "issue",
            "--funding-pan",
            "5555555555554444",
            "--owner",
            "alice",
            "--limit",
            "50.00EUR",
            "--uses",
            "2",
            "--json",
        ],
    ));
    let pan = card["pan"].as_str().unwrap().to_string();
    let cvv = card["cvv"].as_str().unwrap().to_string();
    let expiry = card["expiry"].as_str().unwrap().to_string();
    let card_id = card["card_id"].as_str().unwrap().to_string();
    assert_eq!(&pan[..6], "555555");

    let pay = |txn: &str, amount: &str, key: &str| {
        vcn(
            d,
            port,
            key,
            &[
                "authorize",
                "--pan",
                &pan,
                "--expiry",
                &expiry,
                "--cvv",
                &cvv,
                "--amount",
                amount,
                "--merchant",
                "shop",
                "--mcc",
                "5411",
                "--txn",
                txn,
                "--json",
            ],
        )
    };
    let ok = pay("t1", "12.50EUR", &switch);
    let ok = json(&ok);
    assert_eq!(
        (ok["approved"].as_bool(), ok["response_code"].as_str()),
        (Some(true), Some("00"))
    );
    assert_eq!(ok["funding_pan"], "5555555555554444");
    assert_eq!(ok["remaining"]["amount_minor"], 3750);

    // A decline exits 1, a usage error 2, an unreachable service 3.
    let declined = pay("t2", "40.00EUR", &switch);
    assert_eq!(declined.status.code(), Some(1));
    let wrong_role = pay("t3", "1.00EUR", &web);
    assert_eq!(wrong_role.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong_role.stderr).contains("(gRPC PERMISSION_DENIED)"));
    let bad_amount = pay("t4", "1.001EUR", &switch);
    assert_eq!(bad_amount.status.code(), Some(2));
    let nowhere = Command::new(VCN)
        .args(["card", "get", &card_id])
        .env("VCN_SERVER", format!("http://127.0.0.1:{}", free_port()))
        .env("VCN_API_KEY", &web)
        .output()
        .unwrap();
    assert_eq!(nowhere.status.code(), Some(3));

    let detok = json(&vcn(
        d,
        port,
        &switch,
        &["detokenize", "--pan", &pan, "--json"],
    ));
    assert_eq!(detok["funding_pan"], "5555555555554444");
    let listed = json(&vcn(
        d,
        port,
        &web,
        &["card", "list", "--owner", "alice", "--json"],
    ));
    assert_eq!(
        listed["cards"][0]["card_id"].as_str(),
        Some(card_id.as_str())
    );
    assert_eq!(listed["cards"][0]["spent"]["amount_minor"], 1250);
    let text = vcn(d, port, &web, &["card", "get", &card_id]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("12.50 EUR"));

    let log_path = server.log.clone();
    let status = server.terminate();
    assert!(
        status.success(),
        "SIGTERM must end the server cleanly: {status:?}"
    );

    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(
        log.contains("authorisation decided"),
        "the log was captured at TRACE"
    );
    assert!(
        !log.contains('\x1b'),
        "no colour codes in a log written to a file"
    );
    assert!(
        log.contains(&format!("{}******{}", &pan[..6], &pan[12..])),
        "masked numbers are logged"
    );
    let master = std::fs::read_to_string(d.join("keys/master.key")).unwrap();
    for secret in [
        pan.as_str(),
        "5555555555554444",
        web.as_str(),
        switch.as_str(),
        master.trim(),
        &web[4..20],
    ] {
        assert!(
            !log.contains(secret),
            "a secret ({}...) reached the log",
            &secret[..4]
        );
    }
    for line in log.lines().filter(|l| l.to_lowercase().contains("cvv")) {
        assert!(!line.contains(&cvv), "a CVV reached the log: {line}");
    }
}

#[test]
fn keygen_writes_a_private_key_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(VCN)
        .args(["keygen", "--keys-dir", "k"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    let path = dir.path().join("k/master.key");
    let before = std::fs::read(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = Command::new(VCN)
        .args(["keygen", "--keys-dir", "k"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// `vcn watch` as a child process, its stdout lines handed over as they come.
struct Watcher {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watcher {
    fn start(dir: &Path, port: u16, key: &str, args: &[&str]) -> Watcher {
        let mut child = Command::new(VCN)
            .arg("watch")
            .args(args)
            .current_dir(dir)
            .env("VCN_SERVER", format!("http://127.0.0.1:{port}"))
            .env("VCN_API_KEY", key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watcher { child, lines }
    }

    /// The next `n` events it printed (JSON lines).
    fn take(&self, n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                let line = self
                    .lines
                    .recv_timeout(Duration::from_secs(15))
                    .unwrap_or_else(|_| panic!("vcn watch printed only {i} of {n} events"));
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
            })
            .collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cardholder's day through the CLI: issue, pay, decline, refund, close,
/// with `vcn watch` printing each as it happens; a watcher restarted with
/// its last cursor gets exactly what it missed. Amounts in JPY and BHD show
/// their own minor units; errors are sentences with the gRPC code.
#[test]
fn cli_issues_pays_lists_closes_and_watches_as_a_user_would() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = serve(d);
    let port = server.port;
    let add = |name: &str, role: &str| {
        last_line(&vcn(d, port, "", &["client", "add", name, "--role", role]))
    };
    let (web, switch) = (add("web", "cards"), add("switch", "switch"));

    let watcher = Watcher::start(d, port, &web, &["--owner", "bob", "--json"]);
    let issue = |limit: &str, extra: &[&str]| {
        let mut args = vec![
            "card",
            "issue",
            "--funding-pan",
            "5555555555554444",
            "--owner",
            "bob",
            "--limit",
            limit,
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&vcn(d, port, &web, &args))
    };
    let eur = issue(
        "50.00EUR",
        &["--uses", "3", "--per-txn", "20.00EUR", "--valid-for", "7d"],
    );
    let yen = issue("5000JPY", &[]);
    let dinar = issue("1.500BHD", &["--valid-until", "2030-01-31"]);
    assert_eq!(yen["spend_limit"]["amount_minor"], 5000);
    assert_eq!(dinar["spend_limit"]["amount_minor"], 1500);
    assert_eq!(dinar["spend_limit"]["text"], "1.500 BHD");
    assert_eq!(eur["per_transaction_limit"]["text"], "20.00 EUR");

    let pay = |card: &Value, txn: &str, amount: &str| {
        vcn(
            d,
            port,
            &switch,
            &[
                "authorize",
                "--pan",
                card["pan"].as_str().unwrap(),
                "--expiry",
                card["expiry"].as_str().unwrap(),
                "--cvv",
                card["cvv"].as_str().unwrap(),
                "--amount",
                amount,
                "--merchant",
                "cafe-9",
                "--mcc",
                "5814",
                "--txn",
                txn,
                "--json",
            ],
        )
    };
    let ok = json(&pay(&eur, "p1", "12.50EUR"));
    assert_eq!(ok["remaining"]["text"], "37.50 EUR");
    let over = pay(&eur, "p2", "25.00EUR");
    assert_eq!(over.status.code(), Some(1), "a decline exits 1");
    let over: Value = serde_json::from_slice(&over.stdout).unwrap();
    assert_eq!(over["response_code"], "61");
    let yen_ok = json(&pay(&yen, "p3", "1200JPY"));
    assert_eq!(yen_ok["remaining"]["text"], "3800 JPY");
    let dinar_ok = json(&pay(&dinar, "p4", "0.250BHD"));
    assert_eq!(dinar_ok["remaining"]["text"], "1.250 BHD");
    let refund = json(&vcn(
        d,
        port,
        &switch,
        &["reverse", "--txn", "p1", "--amount", "2.50EUR", "--json"],
    ));
    assert_eq!(refund["remaining"]["amount_minor"], 4000);
    let eur_id = eur["card_id"].as_str().unwrap();
    let closed = json(&vcn(d, port, &web, &["card", "close", eur_id, "--json"]));
    assert_eq!(closed["state"], "CARD_STATE_CLOSED");

    // The listing: a table with the amounts in each currency's units.
    let list = vcn(d, port, &web, &["card", "list", "--owner", "bob"]);
    assert!(list.status.success());
    let table = String::from_utf8_lossy(&list.stdout);
    let header = table.lines().next().unwrap();
    for col in ["CARD", "NUMBER", "STATE", "SPENT", "REMAINING", "USES"] {
        assert!(header.contains(col), "{header}");
    }
    for amount in ["3800 JPY", "1.250 BHD", "40.00 EUR", "closed"] {
        assert!(table.contains(amount), "{amount} in\n{table}");
    }
    let listed = json(&vcn(
        d,
        port,
        &web,
        &["card", "list", "--owner", "bob", "--json"],
    ));
    assert_eq!(listed["cards"].as_array().unwrap().len(), 3);

    // The watcher saw every change, in order, as it happened.
    let events = watcher.take(11);
    let kinds: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "issued",
            "issued",
            "issued",
            "authorized",
            "authorized",
            "authorized",
            "used",
            "authorized",
            "used",
            "reversed",
            "closed"
        ]
    );
    assert_eq!(events[3]["approved"], true);
    assert_eq!(events[3]["amount"]["text"], "12.50 EUR");
    assert_eq!(events[3]["merchant_id"], "cafe-9");
    assert_eq!(
        (
            events[4]["approved"].as_bool(),
            events[4]["response_code"].as_str()
        ),
        (Some(false), Some("61"))
    );
    assert_eq!(events[5]["remaining"]["text"], "3800 JPY");
    assert_eq!(events[7]["amount"]["text"], "0.250 BHD");
    assert_eq!(events[9]["amount"]["text"], "2.50 EUR");
    assert_eq!(events[10]["state"], "closed");
    for e in &events {
        let text = e.to_string();
        for secret in [eur["pan"].as_str().unwrap(), "5555555555554444"] {
            assert!(
                !text.contains(secret),
                "an event carries a full number: {text}"
            );
        }
    }
    drop(watcher);

    // Restarted after the 5th event: exactly the 6 that followed, then exit.
    let cursor = events[4]["cursor"].as_str().unwrap();
    let again = vcn(
        d,
        port,
        &web,
        &[
            "watch", "--owner", "bob", "--after", cursor, "--count", "6", "--json",
        ],
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let resumed: Vec<Value> = String::from_utf8_lossy(&again.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(resumed, events[5..].to_vec());
    // The text form: one line per event.
    let text = vcn(d, port, &web, &["watch", "--owner", "bob", "--count", "4"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(
        text.lines().nth(3).unwrap().contains("AUTHORIZED"),
        "{text}"
    );
    assert!(text.contains("12.50 EUR APPROVED 00"), "{text}");

    // Errors: a sentence with the gRPC code; usage 2, unreachable 3.
    let missing = vcn(
        d,
        port,
        &web,
        &["card", "get", "vc_000000000000000000000000"],
    );
    assert_eq!(missing.status.code(), Some(2));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.starts_with("vcn: not found: card vc_") && err.trim_end().ends_with("(gRPC NOT_FOUND)"),
        "{err}"
    );
    let bad_cursor = vcn(
        d,
        port,
        &web,
        &["watch", "--owner", "bob", "--after", "nope"],
    );
    assert_eq!(bad_cursor.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_cursor.stderr).contains("after_cursor"));
    let bad_limit = vcn(
        d,
        port,
        &web,
        &[
            "card",
            "issue",
            "--funding-pan",
            "5555555555554444",
            "--owner",
            "bob",
            "--limit",
            "1.5JPY",
        ],
    );
    assert_eq!(bad_limit.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_limit.stderr).contains("--limit"));
    let nowhere = Command::new(VCN)
        .args(["watch", "--owner", "bob"])
        .env("VCN_SERVER", format!("http://127.0.0.1:{}", free_port()))
        .env("VCN_API_KEY", &web)
        .output()
        .unwrap();
    assert_eq!(nowhere.status.code(), Some(3));
}

/// GET `path` over plain HTTP; the status line and body. Waits a little
/// for the port (the metrics listener opens just after the gRPC one).
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "metrics port: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of one sample line (`name{labels} value`), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// An operator's view: Prometheus metrics on their own port, JSON logs with
/// a request id and the client's name on every RPC, no card number in them.
#[test]
fn metrics_and_json_logs_show_an_operator_what_happens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let metrics_port = free_port();
    std::fs::write(
        d.join("vcn.toml"),
        format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\nlog_format = \"json\"\n"),
    )
    .unwrap();
    let server = serve_with(d, &["--config", "vcn.toml"]);
    let port = server.port;
    let add = |name: &str, role: &str| {
        last_line(&vcn(d, port, "", &["client", "add", name, "--role", role]))
    };
    let (web, switch) = (add("web", "cards"), add("switch", "switch"));
    let issue = || {
        json(&vcn(
            d,
            port,
            &web,
            &[
                "card",
                "issue",
                "--funding-pan",
                "4111111111111111",
                "--owner",
                "ops",
                "--limit",
                "20.00EUR",
                "--json",
            ],
        ))
    };
    let (card, other) = (issue(), issue());
    let pay = |txn: &str, amount: &str| {
        vcn(
            d,
            port,
            &switch,
            &[
                "authorize",
                "--pan",
                card["pan"].as_str().unwrap(),
                "--expiry",
                card["expiry"].as_str().unwrap(),
                "--cvv",
                card["cvv"].as_str().unwrap(),
                "--amount",
                amount,
                "--txn",
                txn,
            ],
        )
    };
    assert_eq!(pay("m1", "30.00EUR").status.code(), Some(1));
    assert!(pay("m2", "5.00EUR").status.success());
    let paused = vcn(
        d,
        port,
        &web,
        &["card", "pause", other["card_id"].as_str().unwrap()],
    );
    assert!(paused.status.success());
    let missing = vcn(
        d,
        port,
        &web,
        &["card", "get", "vc_000000000000000000000000"],
    );
    assert_eq!(missing.status.code(), Some(2));

    let (status, text) = http_get(metrics_port, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        sample(
            &text,
            r#"vcn_authorizations_total{reason="approved",response_code="00"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"vcn_authorizations_total{reason="insufficient_funds",response_code="51"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"vcn_rpc_duration_seconds_count{code="OK",method="AuthorizationService/Authorize"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"vcn_rpc_duration_seconds_count{code="NOT_FOUND",method="CardService/GetCard"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, r#"vcn_store_update_duration_seconds_count"#).unwrap_or(0.0) >= 5.0,
        "{text}"
    );
    if crate::engine::engine().is_embedded() {
        assert!(
            sample(&text, "vcn_store_flush_duration_seconds_count").unwrap_or(0.0) >= 1.0,
            "{text}"
        );
    }
    assert!(
        sample(&text, "vcn_vault_size_bytes").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    {
        use crate::engine::Engine::Embedded;
        use vcn::vault::embedded::EngineKind::{Fjall, Fjall3};
        let engine = crate::engine::engine();
        if engine == Embedded(Fjall) || engine == Embedded(Fjall3) {
            // What the cache setting does not bound: the vault's first
            // writes are in fjall's write buffer; no segment (no filter)
            // yet. fjall 3 keeps its filters in its cache: the gauge says 0.
            assert!(
                sample(&text, r#"vcn_engine_memory_bytes{part="write_buffers"}"#).unwrap_or(0.0)
                    > 0.0,
                "{text}"
            );
            let filters = sample(&text, r#"vcn_engine_memory_bytes{part="filters"}"#);
            assert!(filters.is_some(), "{text}");
            if engine == Embedded(Fjall3) {
                assert_eq!(filters, Some(0.0), "{text}");
            }
        }
    }
    assert!(http_get(metrics_port, "/nope").0.contains("404"));
    // The audit log keeps up: every operation's entry is sealed into the
    // file within moments (the sealer runs every 200 ms), and the lag
    // gauge is there for alerting.
    let start = Instant::now();
    loop {
        let (_, text) = http_get(metrics_port, "/metrics");
        let sealed = sample(&text, "vcn_audit_sealed_total").unwrap_or(0.0);
        // Two issues, two authorisations, one pause.
        if sealed >= 5.0 {
            assert!(sample(&text, "vcn_audit_lag_seconds").is_some(), "{text}");
            assert_eq!(sample(&text, "vcn_audit_seal_failures_total"), Some(0.0));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "audit entries not sealed: {sealed}\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Cards by state are counted at start (then every minute).
    let log_path = server.log.clone();
    assert!(server.terminate().success());
    let first_log = std::fs::read_to_string(&log_path).unwrap();
    let server = serve_with(d, &["--config", "vcn.toml"]);
    let start = Instant::now();
    let counted = loop {
        let (_, text) = http_get(metrics_port, "/metrics");
        if sample(&text, r#"vcn_cards{state="paused"}"#) == Some(1.0) {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cards never counted: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        sample(&counted, r#"vcn_cards{state="used"}"#),
        Some(1.0),
        "{counted}"
    );
    assert_eq!(
        sample(&counted, r#"vcn_cards{state="closed"}"#),
        Some(0.0),
        "{counted}"
    );
    drop(server);

    // Every log line is JSON; every RPC has a request id, its method and, once
    // authenticated, the client's name.
    let lines: Vec<Value> = first_log
        .lines()
        // (the development key notice is printed, not logged)
        .filter(|l| !l.starts_with("vcn: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let answered: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "rpc answered")
        .collect();
    assert!(answered.len() >= 6, "{first_log}");
    let mut ids = std::collections::HashSet::new();
    for l in &answered {
        let span = &l["span"];
        assert!(
            span["request_id"].as_str().is_some_and(|s| !s.is_empty()),
            "{l}"
        );
        assert!(
            ids.insert(span["request_id"].as_str().unwrap().to_string()),
            "request ids are unique"
        );
    }
    let authorize = answered
        .iter()
        .find(|l| l["span"]["method"] == "AuthorizationService/Authorize")
        .expect("an Authorize RPC logged");
    assert_eq!(authorize["span"]["client"], "switch");
    assert_eq!(authorize["code"], "OK");
    let decided = lines
        .iter()
        .find(|l| l["message"] == "authorisation decided")
        .expect("the decision logged");
    assert_eq!(
        decided["span"]["client"], "switch",
        "vault logs carry the RPC's span: {decided}"
    );
    let pan = card["pan"].as_str().unwrap();
    assert!(!first_log.contains(pan) && !first_log.contains("4111111111111111"));
}

/// The README's walk-through, run as written against a real server.
#[test]
fn readme_walkthrough_runs_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("walkthrough start marker");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("walkthrough end marker");
    let script: String = readme[start..end]
        .split("```")
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, block)| {
            block
                .trim_start_matches("bash")
                .trim_start_matches("sh")
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        script.contains("vcn card issue"),
        "the walk-through issues a card"
    );

    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let bin_dir = Path::new(VCN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("VCN_SERVER", format!("http://127.0.0.1:{}", server.port))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "walk-through failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("APPROVED 00"), "{out}");
    assert!(out.contains("DECLINED 65"), "{out}");
    assert!(out.contains("funding 4111111111111111"), "{out}");
    assert!(out.contains("state      used"), "card get: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("CARD ") && l.contains("REMAINING")),
        "card list prints a table: {out}"
    );
    let watched: Vec<_> = out
        .lines()
        .filter(|l| l.contains("[cursor "))
        .map(|l| l.split_whitespace().nth(1).unwrap_or_default())
        .collect();
    assert_eq!(
        watched,
        ["ISSUED", "AUTHORIZED", "USED", "AUTHORIZED"],
        "vcn watch: {out}"
    );
    assert!(out.contains("12.50 EUR APPROVED 00"), "{out}");
    assert!(out.contains("DECLINED 65 (card_used)"), "{out}");
    assert!(server.terminate().success());
}

/// Every acknowledged write is on disk before the reply: SIGKILL right
/// after the replies loses none of them.
#[test]
fn kill_9_right_after_the_replies_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = serve(d);
    let add = |name: &str, role: &str| {
        last_line(&vcn(
            d,
            server.port,
            "",
            &["client", "add", name, "--role", role],
        ))
    };
    let (web, switch) = (add("web", "cards"), add("switch", "switch"));
    let card = json(&vcn(
        d,
        server.port,
        &web,
        &[
            "card",
            "issue",
            "--funding-pan",
            "4111111111111111",
            "--owner",
            "alice",
            "--limit",
            "100.00EUR",
            "--uses",
            "10",
            "--json",
        ],
    ));
    let (pan, cvv, expiry) = (
        card["pan"].as_str().unwrap(),
        card["cvv"].as_str().unwrap(),
        card["expiry"].as_str().unwrap(),
    );
    let pay = |port: u16, txn: &str| {
        json(&vcn(
            d,
            port,
            &switch,
            &[
                "authorize",
                "--pan",
                pan,
                "--expiry",
                expiry,
                "--cvv",
                cvv,
                "--amount",
                "1.00EUR",
                "--txn",
                txn,
                "--json",
            ],
        ))
    };
    let mut auth_ids = Vec::new();
    for i in 0..5 {
        let r = pay(server.port, &format!("k{i}"));
        assert_eq!(r["approved"], true);
        auth_ids.push(r["authorization_id"].as_str().unwrap().to_string());
    }
    let paused = vcn(
        d,
        server.port,
        &web,
        &["card", "pause", card["card_id"].as_str().unwrap()],
    );
    assert!(paused.status.success());
    drop(server); // SIGKILL, no chance to flush

    let server = serve(d);
    let after = json(&vcn(
        d,
        server.port,
        &web,
        &["card", "get", card["card_id"].as_str().unwrap(), "--json"],
    ));
    assert_eq!(after["spent"]["amount_minor"], 500);
    assert_eq!(after["uses"], 5);
    assert_eq!(after["state"], "CARD_STATE_PAUSED");
    let again = pay(server.port, "k0");
    assert_eq!(
        again["authorization_id"].as_str(),
        Some(auth_ids[0].as_str()),
        "the retry finds the first answer"
    );
}
