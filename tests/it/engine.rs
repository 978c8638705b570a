//! Which storage engine the suite runs against, and the PostgreSQL servers
//! the tests use.
//!
//! - `VCN_TEST_ENGINE` picks the engine every test body runs against:
//!   `fjall3` (the default, as for a new vault), `fjall` (fjall 2, and
//!   `sled`: the engines of older vaults), or `postgres`. With PostgreSQL
//!   each test gets a fresh database on the server named by
//!   `VCN_TEST_POSTGRES_URL` (a superuser URL, e.g. the throwaway cluster
//!   `.ci/postgres.sh` starts), so tests stay independent and parallel.
//! - Tests that exist only for PostgreSQL (tests/it/postgres.rs) need that
//!   URL, or the server binaries (`VCN_TEST_PG_BIN`, else Debian's
//!   /usr/lib/postgresql/*/bin) to run a cluster of their own. Locally they
//!   skip with a message saying so when neither is there; with `CI=true`
//!   they fail instead.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vcn::config::StoreUrl;
use vcn::vault::embedded::EngineKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The embedded store on this engine.
    Embedded(EngineKind),
    Postgres,
}

impl Engine {
    pub fn is_embedded(self) -> bool {
        matches!(self, Engine::Embedded(_))
    }
}

pub fn engine() -> Engine {
    match std::env::var("VCN_TEST_ENGINE").as_deref() {
        Ok("postgres") => Engine::Postgres,
        Ok("") | Err(_) => Engine::Embedded(EngineKind::default()),
        Ok(other) => match other.parse() {
            Ok(kind) => Engine::Embedded(kind),
            Err(_) => panic!("VCN_TEST_ENGINE={other}: expected fjall, fjall3, sled or postgres"),
        },
    }
}

/// The embedded engine a new test vault is made on (the default one when
/// the suite runs against PostgreSQL, for the tests that are embedded only).
pub fn embedded_kind() -> EngineKind {
    match engine() {
        Engine::Embedded(kind) => kind,
        Engine::Postgres => EngineKind::default(),
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says why a test skips, past the test harness's output capture (which
/// would hide it for a test that passes).
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// The PostgreSQL server the tests may use, or None (the caller skips).
/// Panics when it must be there: under `CI=true`, or when the suite was
/// asked to run against PostgreSQL.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("VCN_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            let why = format!(
                "{test} needs a PostgreSQL server: set VCN_TEST_POSTGRES_URL to a superuser URL \
                 (`source .ci/postgres.sh && pg_start` starts a throwaway one)"
            );
            if in_ci() || engine() == Engine::Postgres {
                panic!("{why}");
            }
            skipped(&why);
            None
        }
    }
}

/// `url` with its database replaced by `db` (URL form only).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").expect("a postgres:// URL") + 3;
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..authority_end])
}

/// A new, empty database on `admin_url`'s server; its URL.
pub fn create_database(admin_url: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let db = format!(
        "vcn_t_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let admin = admin_url.to_string();
    let name = db.clone();
    // Its own thread and runtime: callable from sync and async tests alike.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("connect to VCN_TEST_POSTGRES_URL");
            let conn = tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create a test database");
            drop(client);
            let _ = conn.await;
        })
    })
    .join()
    .expect("create database thread");
    with_database(admin_url, &db)
}

/// The store for a new test's configuration: None for the embedded one,
/// else a fresh database.
pub fn fresh_store() -> Option<StoreUrl> {
    match engine() {
        Engine::Embedded(_) => None,
        Engine::Postgres => {
            let admin = postgres_url("the suite with VCN_TEST_ENGINE=postgres")?;
            Some(StoreUrl::new(create_database(&admin)))
        }
    }
}

/// Where PostgreSQL's programs are, or None.
pub fn pg_bin() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("VCN_TEST_PG_BIN") {
        if !d.is_empty() {
            let d = PathBuf::from(d);
            return d.join("pg_ctl").exists().then_some(d);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

/// The database behind `url` as `pg_dump` writes it, with every bytea
/// (`\x` followed by hex) also decoded, so a scan of the result sees the
/// stored bytes themselves, not only their hex spelling.
pub fn dump_database(url: &str) -> Vec<u8> {
    let bin = pg_bin()
        .map(|b| b.join("pg_dump"))
        .unwrap_or_else(|| PathBuf::from("pg_dump"));
    let out = Command::new(&bin)
        .args(["--no-owner", "--dbname", url])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = out.stdout;
    let mut decoded = Vec::new();
    let mut i = 0;
    while i + 1 < dump.len() {
        if dump[i] == b'\\' && dump[i + 1] == b'x' {
            let start = i + 2;
            let mut end = start;
            while end < dump.len() && dump[end].is_ascii_hexdigit() {
                end += 1;
            }
            let hex_len = (end - start) & !1;
            if let Ok(bytes) = hex::decode(&dump[start..start + hex_len]) {
                decoded.extend(bytes);
                decoded.push(b'\n');
            }
            i = end;
        } else {
            i += 1;
        }
    }
    [dump, decoded].concat()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A PostgreSQL cluster of the test's own, on 127.0.0.1, that the test can
/// crash and bring back. Stopped and removed on drop.
pub struct PgCluster {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    root: bool,
    frozen: std::sync::atomic::AtomicBool,
}

impl PgCluster {
    /// Starts one, or None (the caller skips) when PostgreSQL's programs
    /// are not installed; under `CI=true` that is a failure.
    pub fn start(test: &str) -> Option<PgCluster> {
        let Some(bin) = pg_bin() else {
            let why = format!(
                "{test} needs PostgreSQL's server programs (Debian: apt-get install postgresql, \
                 or set VCN_TEST_PG_BIN)"
            );
            if in_ci() {
                panic!("{why}");
            }
            skipped(&why);
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let root = is_root();
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown the cluster's directory to postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cluster = PgCluster {
            dir,
            bin,
            port,
            root,
            frozen: std::sync::atomic::AtomicBool::new(false),
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        cluster.resume();
        Some(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut cmd = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", path.display()));
        assert!(
            out.status.success(),
            "{program} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        let mut all = vec!["-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    /// The superuser URL of database `postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Crashes the server (immediate shutdown: no checkpoint, connections
    /// cut), as a power cut or a killed process would.
    pub fn crash(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Starts the server (again) on the same port and data, and waits
    /// until it accepts connections (after crash recovery).
    pub fn resume(&self) {
        let log = self.dir.path().join("server.log");
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.path().display()
        );
        self.pg_ctl(&[
            "-l",
            log.to_str().unwrap(),
            "-o",
            &opts,
            "-w",
            "-t",
            "60",
            "start",
        ]);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "PostgreSQL did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl PgCluster {
    /// The server's processes: the postmaster and its children.
    fn processes(&self) -> Vec<String> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .expect("postmaster.pid of a running server");
        let main = pid_file.lines().next().unwrap_or("").trim().to_string();
        let mut pids = vec![main.clone()];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
            if after.split_whitespace().nth(1) == Some(main.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        pids
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .args(self.processes())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} the server's processes");
    }

    /// Makes the server unresponsive without closing anything (SIGSTOP to
    /// all its processes), as a hung host or a dropped link would.
    pub fn freeze(&self) {
        self.signal("-STOP");
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.frozen.load(Ordering::SeqCst) {
            let _ = Command::new("kill")
                .arg("-CONT")
                .args(self.processes())
                .status();
        }
        let data = self.data();
        let path = self.bin.join("pg_ctl");
        let mut cmd = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let _ = cmd
            .args([
                "-D",
                data.to_str().unwrap_or(""),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
