//! The load tool behind `vcn bench`: drives a running service (or one it
//! starts in-process) over gRPC and measures, in one run, what each
//! operation costs against the floor of any RPC on the same machine.
//!
//! A round runs each operation for a set time at a set concurrency (tasks
//! in flight, spread over a set number of HTTP/2 connections):
//! - `health`: grpc.health.v1 Check, the floor (no key, no vault);
//! - `issue`: IssueCard of single-use cards;
//! - `authorize`: Authorize on a pool of fresh multi-use cards, each task
//!   on its own cards (no two tasks on one card at once);
//! - `authorize_hot`: Authorize with every task on one multi-use card;
//! - `detokenize`: Detokenize of numbers issued earlier in the run;
//! - `lifecycle`: a disposable card's whole life, timed as one call:
//!   IssueCard of a single-use card, then the one Authorize it takes. With
//!   a short `--retention` (in-process server) the retention pass then
//!   deletes it and its records, so the vault stays the same size however
//!   long the run: the steady state a soak needs.
//!
//! With `fill`, a first round runs on the vault as it is, the tool then
//! issues `fill` more cards, and a second round runs on the full vault.
//!
//! With the server's process watched (in-process, or `--server-pid`), each
//! operation also reports the server's CPU per call (`srv µs`) and, of
//! that, its storage engine's own threads' (`eng µs`: flushes and
//! compactions, which earlier rounds' writes may have left, so a read-only
//! operation can show some).
//!
//! After the rounds it checks what the service answered: the hot card's
//! spent equals the sum of the approvals it got and never exceeds its cap;
//! each pool card's spent equals its approvals; single-use cards attacked by
//! several authorisations at once are approved exactly once. Card numbers
//! and CVVs stay in memory only: nothing printed or written has them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use zeroize::Zeroizing;

use crate::api::pb;
use crate::api::pb::authorization_service_client::AuthorizationServiceClient;
use crate::api::pb::card_service_client::CardServiceClient;
use tonic_health::pb::health_client::HealthClient;

/// The funding card every bench card is issued for (a test number).
const FUNDING: &str = "4111111111111111";
/// Amount of every bench authorisation, in cents.
const AMOUNT: i64 = 100;
/// Cap of the pool's multi-use cards: never reached in a run.
const POOL_CAP: i64 = 1_000_000_000_000;
/// How many issued cards are kept (a uniform sample) for Detokenize.
const SAMPLE: usize = 100_000;
/// Single-use cards checked for double approval, and attempts on each.
const SINGLE_USE_CHECKS: usize = 32;
const SINGLE_USE_ATTEMPTS: usize = 4;

/// One operation the tool measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Op {
    Health,
    Issue,
    Authorize,
    AuthorizeHot,
    Detokenize,
    Lifecycle,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Health,
        Op::Issue,
        Op::Authorize,
        Op::AuthorizeHot,
        Op::Detokenize,
        Op::Lifecycle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Health => "health",
            Op::Issue => "issue",
            Op::Authorize => "authorize",
            Op::AuthorizeHot => "authorize_hot",
            Op::Detokenize => "detokenize",
            Op::Lifecycle => "lifecycle",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Calls in flight at once.
    pub concurrency: usize,
    /// HTTP/2 connections they share.
    pub connections: usize,
    /// How long each operation runs in a round.
    pub duration: Duration,
    /// Cards to issue between a first and a second round (0: one round).
    pub fill: u64,
    /// After a fill, how long at most to wait for the server to go idle
    /// (the engine's compactions of what the fill wrote) before the second
    /// round: a vault that grew over months is measured, not one still
    /// digesting the last 20 minutes. Zero measures at once.
    pub settle: Duration,
    /// Multi-use cards in the `authorize` pool (rounded up to a multiple of
    /// `concurrency`, so that no two tasks share a card).
    pub pool_cards: usize,
    /// The hot card's cap, in cents (each authorisation is 1.00 EUR).
    pub hot_cap: i64,
    /// The operations, in order (health first gives the floor).
    pub ops: Vec<Op>,
    /// Times each round is run (operations interleaved); the summary
    /// gives the median of each figure over them, which a noisy machine
    /// needs.
    pub repeat: usize,
    /// Progress on standard error.
    pub verbose: bool,
    /// The server process to watch for CPU and memory: its pid, and the
    /// name prefix of threads in it that are not the server's (the load
    /// tool's own, when the server runs in-process).
    pub server_process: Option<Watched>,
}

/// A process whose CPU time and memory the run reports.
#[derive(Debug, Clone)]
pub struct Watched {
    pub pid: u32,
    /// Threads whose names start with this are left out of its CPU time.
    pub exclude_threads: Option<String>,
}

impl Watched {
    /// This process, less the load tool's runtime threads: the in-process
    /// server.
    pub fn in_process() -> Watched {
        Watched {
            pid: std::process::id(),
            exclude_threads: Some(LOAD_THREADS.to_string()),
        }
    }

    /// CPU time (user + system) the server has used, in microseconds.
    pub fn cpu_us(&self) -> Option<u64> {
        self.cpu().map(|c| c.total_us)
    }

    /// The server's CPU time, in microseconds: all of it, and the part its
    /// storage engine's own threads used.
    pub fn cpu(&self) -> Option<ServerCpu> {
        let total = proc_cpu_us(&format!("/proc/{}/stat", self.pid))?;
        let mut threads = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{}/task", self.pid)).ok()? {
            let Ok(entry) = entry else { continue };
            let dir = entry.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let cpu = proc_cpu_us(&dir.join("stat").to_string_lossy()).unwrap_or(0);
            let tid = entry.file_name().to_string_lossy().parse().unwrap_or(0);
            threads.push((tid, comm.trim_end().to_string(), cpu));
        }
        Some(self.split(total, &threads))
    }

    /// Splits the process's `total` over its `threads` (id, name, CPU µs).
    fn split(&self, total: u64, threads: &[(u32, String, u64)]) -> ServerCpu {
        let (mut excluded, mut engine) = (0, 0);
        for (tid, name, cpu) in threads {
            let exclude = self.exclude_threads.as_deref();
            if exclude.is_some_and(|p| name.starts_with(p)) {
                excluded += cpu;
            } else if !serves(name) && *tid != self.pid {
                engine += cpu;
            }
        }
        ServerCpu {
            total_us: total.saturating_sub(excluded),
            engine_us: engine,
        }
    }

    /// Resident memory now and at its peak, in bytes.
    pub fn rss_bytes(&self) -> (Option<u64>, Option<u64>) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok();
        let field = |name: &str| -> Option<u64> {
            let line = status.as_deref()?.lines().find(|l| l.starts_with(name))?;
            Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// A watched server's CPU time so far, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCpu {
    /// All its threads (less the load tool's, in-process).
    pub total_us: u64,
    /// The storage engine's own threads, those running now: fjall's
    /// flushes and compactions, sled's I/O threads. (A thread that exited
    /// is in `total_us` only: fjall 2 flushes each memtable on a thread of
    /// its own.) Work the calls of one round left in the engine (a
    /// compaction) may land in a later round.
    pub engine_us: u64,
}

/// Threads that run the service's own work, named by the service: the
/// runtime's workers and blocking threads (`tokio-rt-worker` by default,
/// `vcn-server` in-process) and the service's threads (`vcn-committer`,
/// `vcn-audit-journal`, `vcn-log`). The rest, less the main thread, are the
/// storage engine's.
fn serves(thread_name: &str) -> bool {
    thread_name.starts_with("tokio-rt-worker") || thread_name.starts_with("vcn-")
}

/// How often the wait after a fill looks at the server's CPU.
const SETTLE_STEP: Duration = Duration::from_secs(10);

/// A server that used under 5 % of one core over `over` is idle: its
/// compactions are done (a spaced card count may still come).
fn went_idle(cpu_used_us: u64, over: Duration) -> bool {
    u128::from(cpu_used_us) * 20 < over.as_micros()
}

/// The thread name of the load tool's runtime.
pub const LOAD_THREADS: &str = "vcn-bench-load";

/// utime + stime of a /proc stat file, in microseconds.
fn proc_cpu_us(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(ticks * 1_000_000 / hz)
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: 64,
            connections: 4,
            duration: Duration::from_secs(10),
            fill: 0,
            settle: Duration::ZERO,
            pool_cards: 1024,
            hot_cap: POOL_CAP,
            ops: Op::ALL.to_vec(),
            repeat: 1,
            verbose: false,
            server_process: None,
        }
    }
}

/// The service to drive.
#[derive(Clone)]
pub struct Target {
    /// e.g. http://127.0.0.1:50051
    pub url: String,
    /// API key of a client with role cards (or admin).
    pub cards_key: String,
    /// API key of a client with role switch.
    pub switch_key: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.url)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot reach {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("an API key is not valid metadata")]
    BadKey,
    #[error("setting up the run failed: {0}")]
    Setup(String),
    #[error("starting the in-process server failed: {0}")]
    Start(String),
}

/// One operation's figures in one round.
#[derive(Debug, Clone, Serialize)]
pub struct OpResult {
    pub op: Op,
    /// Calls answered as expected.
    pub calls: u64,
    /// Calls that failed or got an answer they should not have.
    pub errors: u64,
    /// Declines that were expected (the hot card's cap reached).
    pub declined: u64,
    pub seconds: f64,
    /// (calls + declined) per second.
    pub throughput: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// throughput / the health floor's in the same round.
    pub ratio_to_floor: Option<f64>,
    /// The server's CPU time (user + system, all its threads) per call,
    /// in microseconds, when its process is watched: what an operation
    /// costs, steadier on a shared machine than throughput.
    pub server_cpu_us_per_call: Option<f64>,
    /// Of that, what the storage engine's own threads used (flushes and
    /// compactions, [`ServerCpu::engine_us`]), per call: work the round's
    /// own calls may not have caused, left over from earlier writes.
    pub engine_cpu_us_per_call: Option<f64>,
    /// The first error seen, if any (a status code and message: never a
    /// card number).
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// 0 before the fill, 1 after it.
    pub phase: usize,
    /// Which repeat of the phase's round this is (from 1).
    pub repeat: usize,
    /// Cards this run had issued when the round started.
    pub cards_issued_before: u64,
    pub ops: Vec<OpResult>,
    /// Seconds since the run started, at the end of this round.
    pub at_s: f64,
    /// The server's resident memory at the end of this round, when its
    /// process is watched.
    pub server_rss_bytes: Option<u64>,
}

/// One operation over the repeats of a phase: the median of each figure.
#[derive(Debug, Clone, Serialize)]
pub struct OpSummary {
    pub op: Op,
    pub repeats: usize,
    pub throughput: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// Median of the per-repeat ratios to the floor.
    pub ratio_to_floor: Option<f64>,
    pub server_cpu_us_per_call: Option<f64>,
    pub engine_cpu_us_per_call: Option<f64>,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummary {
    pub phase: usize,
    pub cards_issued_before: u64,
    pub ops: Vec<OpSummary>,
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

fn summarise(rounds: &[Round]) -> Vec<PhaseSummary> {
    let mut out: Vec<PhaseSummary> = Vec::new();
    for r in rounds {
        if out.last().is_none_or(|p| p.phase != r.phase) {
            out.push(PhaseSummary {
                phase: r.phase,
                cards_issued_before: r.cards_issued_before,
                ops: Vec::new(),
            });
        }
    }
    for p in &mut out {
        let of_phase: Vec<&Round> = rounds.iter().filter(|r| r.phase == p.phase).collect();
        let ops: Vec<Op> = of_phase
            .first()
            .map(|r| r.ops.iter().map(|o| o.op).collect())
            .unwrap_or_default();
        for op in ops {
            let each: Vec<&OpResult> = of_phase
                .iter()
                .flat_map(|r| r.ops.iter().filter(|o| o.op == op))
                .collect();
            let m = |f: &dyn Fn(&OpResult) -> u64| median(each.iter().map(|o| f(o)).collect());
            p.ops.push(OpSummary {
                op,
                repeats: each.len(),
                throughput: median(each.iter().map(|o| o.throughput).collect()).unwrap_or(0.0),
                p50_us: m(&|o| o.p50_us).unwrap_or(0),
                p99_us: m(&|o| o.p99_us).unwrap_or(0),
                p999_us: m(&|o| o.p999_us).unwrap_or(0),
                ratio_to_floor: median(each.iter().filter_map(|o| o.ratio_to_floor).collect()),
                server_cpu_us_per_call: median(
                    each.iter()
                        .filter_map(|o| o.server_cpu_us_per_call)
                        .collect(),
                ),
                engine_cpu_us_per_call: median(
                    each.iter()
                        .filter_map(|o| o.engine_cpu_us_per_call)
                        .collect(),
                ),
                errors: each.iter().map(|o| o.errors).sum(),
            });
        }
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct Fill {
    pub cards: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Seconds waited after the fill for the server to go idle.
    pub settle_seconds: f64,
    /// CPU seconds the server used during that wait (when watched).
    pub settle_server_cpu_s: Option<f64>,
}

/// What the service's answers add up to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    pub hot_cap: i64,
    pub hot_approved_sum: i64,
    pub hot_approvals: u64,
    pub hot_spent: i64,
    pub hot_uses: u32,
    pub pool_cards_checked: u64,
    /// Pool cards whose spent differs from the approvals they got.
    pub pool_mismatches: u64,
    pub single_use_cards_checked: u64,
    /// Single-use cards approved more than once (or never).
    pub single_use_violations: u64,
    /// Everything adds up.
    pub ok: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub os: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub target: String,
    pub repeat: usize,
    pub concurrency: usize,
    pub connections: usize,
    pub duration_s: f64,
    pub fill: u64,
    pub pool_cards: usize,
    pub hot_cap: i64,
}

/// Sizes of an in-process server's vault and process.
#[derive(Debug, Clone, Serialize)]
pub struct Footprint {
    pub data_dir: String,
    /// Bytes allocated on disk by the data directory.
    pub data_dir_bytes: u64,
    /// Cards in the vault (issued by this run, plus `cards_before`).
    pub cards: u64,
    pub bytes_per_card: f64,
    /// sled's cache setting.
    pub cache_mib: u64,
    /// Peak resident memory of this process (server and load tool).
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub started_at: String,
    pub machine: Machine,
    pub settings: Settings,
    pub rounds: Vec<Round>,
    /// Medians over the repeats, per phase (before and after a fill).
    pub summary: Vec<PhaseSummary>,
    pub fill: Option<Fill>,
    pub checks: Checks,
    /// Cards this run issued in all (rounds, pools, fill and checks).
    pub cards_issued: u64,
    pub footprint: Option<Footprint>,
}

impl Report {
    /// Errors across every round and the fill.
    pub fn errors(&self) -> u64 {
        self.rounds
            .iter()
            .flat_map(|r| &r.ops)
            .map(|o| o.errors)
            .sum::<u64>()
            + self.fill.as_ref().map_or(0, |f| f.errors)
    }

    /// True when nothing failed and every check adds up.
    pub fn passed(&self) -> bool {
        self.errors() == 0 && self.checks.ok
    }

    /// A readable table.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let st = &self.settings;
        s.push_str(&format!(
            "vcn bench: {} | {} in flight over {} connections | {:.1}s per operation | {} cores ({})\n",
            st.target, st.concurrency, st.connections, st.duration_s, self.machine.cores, self.machine.cpu
        ));
        for r in &self.rounds {
            s.push_str(&format!(
                "\n{} round {} (cards issued by this run before it: {}; ended at {:.0}s{})\n",
                if r.phase == 0 { "first" } else { "after-fill" },
                r.repeat,
                r.cards_issued_before,
                r.at_s,
                r.server_rss_bytes
                    .map(|b| format!(", server RSS {}", mib(b)))
                    .unwrap_or_default()
            ));
            s.push_str(&format!(
                "{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7} {:>8} {:>8} {:>7}\n",
                "operation",
                "calls/s",
                "p50 ms",
                "p99 ms",
                "p999 ms",
                "max ms",
                "floor",
                "errors",
                "declined",
                "srv µs",
                "eng µs"
            ));
            for o in &r.ops {
                s.push_str(&format!(
                    "{:<14} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>7} {:>8} {:>8} {:>7}\n",
                    o.op.name(),
                    o.throughput,
                    o.p50_us as f64 / 1000.0,
                    o.p99_us as f64 / 1000.0,
                    o.p999_us as f64 / 1000.0,
                    o.max_us as f64 / 1000.0,
                    o.ratio_to_floor
                        .map(|r| format!("{:.0}%", r * 100.0))
                        .unwrap_or_else(|| "-".into()),
                    o.errors,
                    o.declined,
                    cpu_text(o.server_cpu_us_per_call),
                    cpu_text(o.engine_cpu_us_per_call)
                ));
                if let Some(e) = &o.first_error {
                    s.push_str(&format!("    first error: {e}\n"));
                }
            }
        }
        if st.repeat > 1 {
            for p in &self.summary {
                s.push_str(&format!(
                    "\nmedian of {} repeats, {} (cards issued before: {})\n",
                    st.repeat,
                    if p.phase == 0 {
                        "first rounds"
                    } else {
                        "after the fill"
                    },
                    p.cards_issued_before
                ));
                s.push_str(&format!(
                    "{:<14} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7} {:>8} {:>7}\n",
                    "operation",
                    "calls/s",
                    "p50 ms",
                    "p99 ms",
                    "p999 ms",
                    "floor",
                    "errors",
                    "srv µs",
                    "eng µs"
                ));
                for o in &p.ops {
                    s.push_str(&format!(
                        "{:<14} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>7} {:>8} {:>7}\n",
                        o.op.name(),
                        o.throughput,
                        o.p50_us as f64 / 1000.0,
                        o.p99_us as f64 / 1000.0,
                        o.p999_us as f64 / 1000.0,
                        o.ratio_to_floor
                            .map(|r| format!("{:.0}%", r * 100.0))
                            .unwrap_or_else(|| "-".into()),
                        o.errors,
                        cpu_text(o.server_cpu_us_per_call),
                        cpu_text(o.engine_cpu_us_per_call)
                    ));
                }
            }
        }
        if let Some(f) = &self.fill {
            s.push_str(&format!(
                "\nfill: {} cards in {:.1}s ({:.0}/s), {} errors\n",
                f.cards, f.seconds, f.per_second, f.errors
            ));
            if f.settle_seconds > 0.0 {
                s.push_str(&format!(
                    "then waited {:.0}s for the server to go idle (server CPU meanwhile: {})\n",
                    f.settle_seconds,
                    f.settle_server_cpu_s
                        .map_or("not watched".to_string(), |c| format!("{c:.1}s"))
                ));
            }
        }
        if let Some(fp) = &self.footprint {
            s.push_str(&format!(
                "vault: {} cards, {:.1} MiB on disk ({:.0} bytes/card), cache {} MiB, peak RSS {}\n",
                fp.cards,
                fp.data_dir_bytes as f64 / 1048576.0,
                fp.bytes_per_card,
                fp.cache_mib,
                fp.peak_rss_bytes
                    .map(|b| format!("{:.0} MiB", b as f64 / 1048576.0))
                    .unwrap_or_else(|| "-".into())
            ));
        }
        let c = &self.checks;
        s.push_str(&format!(
            "checks: hot card spent {} of cap {} = sum of {} approvals {}; {} pool cards, {} mismatches; {} single-use cards x{} attempts, {} violations => {}\n",
            c.hot_spent,
            c.hot_cap,
            c.hot_approvals,
            c.hot_approved_sum,
            c.pool_cards_checked,
            c.pool_mismatches,
            c.single_use_cards_checked,
            SINGLE_USE_ATTEMPTS,
            c.single_use_violations,
            if c.ok { "OK" } else { "FAILED" }
        ));
        for p in &c.problems {
            s.push_str(&format!("    {p}\n"));
        }
        s
    }
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / 1048576.0)
}

fn cpu_text(us: Option<f64>) -> String {
    us.map(|u| format!("{u:.0}")).unwrap_or_else(|| "-".into())
}

/// Adds the bearer key to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Chan = InterceptedService<Channel, Bearer>;
type Cards = CardServiceClient<Chan>;
type Switch = AuthorizationServiceClient<Chan>;

/// One connection's clients.
#[derive(Clone)]
struct Conn {
    cards: Cards,
    switch: Switch,
    health: HealthClient<Channel>,
}

/// A card the run issued: kept in memory only, never printed.
struct Secret {
    card_id: String,
    pan: Zeroizing<String>,
    cvv: Zeroizing<String>,
    month: u32,
    year: u32,
}

impl Secret {
    fn from_response(r: pb::IssueCardResponse) -> Secret {
        Secret {
            card_id: r.card.map(|c| c.card_id).unwrap_or_default(),
            pan: Zeroizing::new(r.pan),
            cvv: Zeroizing::new(r.cvv),
            month: r.expiry_month,
            year: r.expiry_year,
        }
    }

    fn authorize(&self, txn: String) -> pb::AuthorizeRequest {
        pb::AuthorizeRequest {
            transaction_id: txn,
            pan: self.pan.to_string(),
            expiry_month: self.month,
            expiry_year: self.year,
            cvv: self.cvv.to_string(),
            amount: Some(eur(AMOUNT)),
            merchant_id: "bench-shop".into(),
            mcc: "5411".into(),
        }
    }
}

fn eur(n: i64) -> pb::Money {
    pb::Money {
        amount_minor: n,
        currency: "EUR".into(),
    }
}

fn issue_request(owner: usize, cap: i64, uses: u32) -> pb::IssueCardRequest {
    pb::IssueCardRequest {
        funding_pan: FUNDING.into(),
        owner: format!("bench-{}", owner % 1024),
        spend_limit: Some(eur(cap)),
        max_uses: uses,
        ..Default::default()
    }
}

/// An authorisation the run expected approved, declined: an error naming
/// the response code.
fn declined(r: &pb::AuthorizeResponse) -> Outcome {
    Outcome::Error(format!(
        "declined {} ({})",
        r.response_code, r.decline_reason
    ))
}

/// The outcome of one call.
enum Outcome {
    Ok,
    /// An expected decline (counted apart from calls).
    Declined,
    Error(String),
}

fn status_text(s: &Status) -> String {
    let mut m = s.message().to_string();
    m.truncate(200);
    format!("{:?}: {m}", s.code())
}

/// A uniform sample of the cards issued so far (reservoir sampling).
struct Sample {
    cards: Vec<Arc<Secret>>,
    seen: u64,
    rng: u64,
}

impl Sample {
    fn add(&mut self, s: Secret) {
        self.seen += 1;
        if self.cards.len() < SAMPLE {
            self.cards.push(Arc::new(s));
            return;
        }
        let j = next_random(&mut self.rng) % self.seen;
        if (j as usize) < SAMPLE {
            self.cards[j as usize] = Arc::new(s);
        }
    }
}

/// xorshift64*: plenty for spreading load; not for anything secret.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (nanos ^ u64::from(std::process::id())) | 1
}

/// When a batch of calls stops.
#[derive(Clone)]
enum Until {
    Time(Instant),
    /// After this many calls in all (shared counter).
    Count(Arc<AtomicU64>, u64),
}

impl Until {
    /// Whether task `task`, having made `made` calls, makes another. A
    /// timed round's task 0 always makes its first, however late it
    /// starts: a starved machine gives a slow figure, not none.
    fn next(&self, task: usize, made: u64) -> bool {
        match self {
            Until::Time(t) => (task == 0 && made == 0) || Instant::now() < *t,
            Until::Count(n, max) => n.fetch_add(1, Ordering::Relaxed) < *max,
        }
    }
}

struct Driven {
    calls: u64,
    errors: u64,
    declined: u64,
    seconds: f64,
    hist: Histogram<u64>,
    first_error: Option<String>,
}

fn histogram() -> Histogram<u64> {
    // 1 us to 10 minutes, 3 significant digits; cannot fail with these
    // bounds, but fall back to an auto-resizing one rather than panic.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| {
        let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!());
        h.auto(true);
        h
    })
}

/// Runs `call(task, seq)` in `concurrency` tasks until `until` says stop.
async fn drive<F, Fut>(concurrency: usize, until: Until, call: F) -> Driven
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let (call, until) = (call.clone(), until.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let (mut calls, mut errors, mut declined) = (0u64, 0u64, 0u64);
            let mut first_error = None;
            let mut seq = 0u64;
            while until.next(task, seq) {
                let t0 = Instant::now();
                let outcome = call(task, seq).await;
                let us = t0.elapsed().as_micros() as u64;
                hist.saturating_record(us.max(1));
                seq += 1;
                match outcome {
                    Outcome::Ok => calls += 1,
                    Outcome::Declined => declined += 1,
                    Outcome::Error(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (hist, calls, errors, declined, first_error)
        }));
    }
    let mut out = Driven {
        calls: 0,
        errors: 0,
        declined: 0,
        seconds: 0.0,
        hist: histogram(),
        first_error: None,
    };
    for t in tasks {
        match t.await {
            Ok((h, c, e, d, f)) => {
                let _ = out.hist.add(&h);
                out.calls += c;
                out.errors += e;
                out.declined += d;
                if out.first_error.is_none() {
                    out.first_error = f;
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert(format!("a load task failed: {e}"));
            }
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    out
}

fn result(op: Op, d: Driven) -> OpResult {
    let q = |p: f64| d.hist.value_at_quantile(p);
    OpResult {
        op,
        calls: d.calls,
        errors: d.errors,
        declined: d.declined,
        seconds: d.seconds,
        throughput: if d.seconds > 0.0 {
            (d.calls + d.declined) as f64 / d.seconds
        } else {
            0.0
        },
        p50_us: q(0.5),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: d.hist.max(),
        ratio_to_floor: None,
        server_cpu_us_per_call: None,
        engine_cpu_us_per_call: None,
        first_error: d.first_error,
    }
}

/// A multi-use card and what the run had approved on it.
struct Tracked {
    card: Secret,
    approved: AtomicI64,
    approvals: AtomicU64,
}

impl Tracked {
    fn new(card: Secret) -> Tracked {
        Tracked {
            card,
            approved: AtomicI64::new(0),
            approvals: AtomicU64::new(0),
        }
    }
}

struct Run {
    opts: Options,
    conns: Vec<Conn>,
    /// Distinguishes this run's transaction ids from any other's.
    run_id: String,
    /// Operations measured so far (part of their transaction ids).
    measurements: u64,
    issued: Arc<AtomicU64>,
    sample: Arc<Mutex<Sample>>,
    hot: Option<Arc<Tracked>>,
    pools: Vec<Arc<Vec<Tracked>>>,
    started: Instant,
}

impl Run {
    fn conn(&self, task: usize) -> Conn {
        self.conns[task % self.conns.len()].clone()
    }

    fn say(&self, msg: impl AsRef<str>) {
        if self.opts.verbose {
            eprintln!("vcn bench: {}", msg.as_ref());
        }
    }

    /// Issues `n` cards (untimed setup), `concurrency` at a time.
    async fn issue_many(&self, n: usize, cap: i64, uses: u32) -> Result<Vec<Secret>, BenchError> {
        let out = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let conns = self.conns.clone();
        let issued = self.issued.clone();
        let sink = out.clone();
        let d = drive(
            self.opts.concurrency.min(n.max(1)),
            Until::Count(Arc::new(AtomicU64::new(0)), n as u64),
            move |task, seq| {
                let mut c = conns[task % conns.len()].cards.clone();
                let (sink, issued) = (sink.clone(), issued.clone());
                async move {
                    match c
                        .issue_card(issue_request(task + seq as usize, cap, uses))
                        .await
                    {
                        Ok(r) => {
                            issued.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut v) = sink.lock() {
                                v.push(Secret::from_response(r.into_inner()));
                            }
                            Outcome::Ok
                        }
                        Err(s) => Outcome::Error(status_text(&s)),
                    }
                }
            },
        )
        .await;
        if d.errors > 0 {
            return Err(BenchError::Setup(format!(
                "issuing cards failed: {}",
                d.first_error.unwrap_or_default()
            )));
        }
        let v = std::mem::take(
            &mut *out
                .lock()
                .map_err(|_| BenchError::Setup("poisoned".into()))?,
        );
        Ok(v)
    }

    async fn round(&mut self, phase: usize, repeat: usize) -> Result<Round, BenchError> {
        let before = self.issued.load(Ordering::Relaxed);
        // The pool of fresh multi-use cards for this round.
        if self.opts.ops.contains(&Op::Authorize) {
            let c = self.opts.concurrency;
            let n = self.opts.pool_cards.max(c).div_ceil(c) * c;
            self.say(format!("issuing {n} multi-use cards for authorize"));
            let cards = self.issue_many(n, POOL_CAP, u32::MAX).await?;
            self.pools
                .push(Arc::new(cards.into_iter().map(Tracked::new).collect()));
        }
        let mut ops = Vec::new();
        for &op in &self.opts.ops.clone() {
            self.say(format!(
                "{} for {:?} (phase {phase}, repeat {repeat})",
                op.name(),
                self.opts.duration
            ));
            let watched = self.opts.server_process.clone();
            let cpu_before = watched.as_ref().and_then(Watched::cpu);
            let mut r = self.measure(op).await?;
            let cpu_after = watched.as_ref().and_then(Watched::cpu);
            if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
                let calls = r.calls + r.declined;
                let per_call =
                    |a: u64, b: u64| (calls > 0).then(|| b.saturating_sub(a) as f64 / calls as f64);
                r.server_cpu_us_per_call = per_call(a.total_us, b.total_us);
                r.engine_cpu_us_per_call = per_call(a.engine_us, b.engine_us);
            }
            ops.push(r);
        }
        let floor = ops
            .iter()
            .find(|o| o.op == Op::Health)
            .map(|o| o.throughput);
        for o in &mut ops {
            o.ratio_to_floor = floor.filter(|f| *f > 0.0).map(|f| o.throughput / f);
        }
        Ok(Round {
            phase,
            repeat,
            cards_issued_before: before,
            ops,
            at_s: self.started.elapsed().as_secs_f64(),
            server_rss_bytes: self
                .opts
                .server_process
                .as_ref()
                .and_then(|w| w.rss_bytes().0),
        })
    }

    async fn measure(&mut self, op: Op) -> Result<OpResult, BenchError> {
        let until = Until::Time(Instant::now() + self.opts.duration);
        let conc = self.opts.concurrency;
        let conns = self.conns.clone();
        // Every measurement has transaction ids of its own: a repeated
        // round must not replay the ids of the one before.
        self.measurements += 1;
        let run_id = format!("{}-{}-", self.run_id, self.measurements);
        let d = match op {
            Op::Health => {
                drive(conc, until, move |task, _| {
                    let mut h = conns[task % conns.len()].health.clone();
                    async move {
                        match h
                            .check(tonic_health::pb::HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                        {
                            Ok(r) if r.get_ref().status == 1 => Outcome::Ok,
                            Ok(r) => {
                                Outcome::Error(format!("health status {}", r.get_ref().status))
                            }
                            Err(s) => Outcome::Error(status_text(&s)),
                        }
                    }
                })
                .await
            }
            Op::Issue => {
                let (issued, sample) = (self.issued.clone(), self.sample.clone());
                drive(conc, until, move |task, seq| {
                    let mut c = conns[task % conns.len()].cards.clone();
                    let (issued, sample) = (issued.clone(), sample.clone());
                    async move {
                        match c
                            .issue_card(issue_request(task + seq as usize, 5000, 1))
                            .await
                        {
                            Ok(r) => {
                                issued.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut s) = sample.lock() {
                                    s.add(Secret::from_response(r.into_inner()));
                                }
                                Outcome::Ok
                            }
                            Err(s) => Outcome::Error(status_text(&s)),
                        }
                    }
                })
                .await
            }
            Op::Authorize => {
                let pool = self
                    .pools
                    .last()
                    .cloned()
                    .ok_or_else(|| BenchError::Setup("no authorize pool".into()))?;
                drive(conc, until, move |task, seq| {
                    let mut s = conns[task % conns.len()].switch.clone();
                    let pool = pool.clone();
                    let i = (task + seq as usize * conc) % pool.len();
                    let txn = format!("{run_id}a-{task}-{seq}");
                    async move {
                        let t = &pool[i];
                        match s.authorize(t.card.authorize(txn)).await {
                            Ok(r) if r.get_ref().approved => {
                                t.approved.fetch_add(AMOUNT, Ordering::Relaxed);
                                t.approvals.fetch_add(1, Ordering::Relaxed);
                                Outcome::Ok
                            }
                            Ok(r) => declined(r.get_ref()),
                            Err(s) => Outcome::Error(status_text(&s)),
                        }
                    }
                })
                .await
            }
            Op::AuthorizeHot => {
                if self.hot.is_none() {
                    let mut cards = self.issue_many(1, self.opts.hot_cap, u32::MAX).await?;
                    let card = cards
                        .pop()
                        .ok_or_else(|| BenchError::Setup("no hot card".into()))?;
                    self.hot = Some(Arc::new(Tracked::new(card)));
                }
                let hot = self
                    .hot
                    .clone()
                    .ok_or_else(|| BenchError::Setup("no hot card".into()))?;
                drive(conc, until, move |task, seq| {
                    let mut s = conns[task % conns.len()].switch.clone();
                    let hot = hot.clone();
                    let txn = format!("{run_id}h-{task}-{seq}");
                    async move {
                        match s.authorize(hot.card.authorize(txn)).await {
                            Ok(r) if r.get_ref().approved => {
                                hot.approved.fetch_add(AMOUNT, Ordering::Relaxed);
                                hot.approvals.fetch_add(1, Ordering::Relaxed);
                                Outcome::Ok
                            }
                            // The cap reached: the answer we want.
                            Ok(r) if r.get_ref().response_code == "51" => Outcome::Declined,
                            Ok(r) => declined(r.get_ref()),
                            Err(s) => Outcome::Error(status_text(&s)),
                        }
                    }
                })
                .await
            }
            Op::Detokenize => {
                let cards: Arc<Vec<Arc<Secret>>> = Arc::new(
                    self.sample
                        .lock()
                        .map(|s| s.cards.clone())
                        .unwrap_or_default(),
                );
                if cards.is_empty() {
                    let mut issued = self.issue_many(conc, 5000, 1).await?;
                    if let Ok(mut s) = self.sample.lock() {
                        for c in issued.drain(..) {
                            s.add(c);
                        }
                    }
                    return Box::pin(self.measure(op)).await;
                }
                let seed = seed();
                drive(conc, until, move |task, seq| {
                    let mut s = conns[task % conns.len()].switch.clone();
                    let mut r = seed ^ ((task as u64) << 32) ^ seq.wrapping_mul(0x9E37_79B9);
                    let card = cards[(next_random(&mut r) % cards.len() as u64) as usize].clone();
                    async move {
                        let req = pb::DetokenizeRequest {
                            pan: card.pan.to_string(),
                        };
                        match s.detokenize(req).await {
                            Ok(r) if r.get_ref().funding_pan == FUNDING => Outcome::Ok,
                            Ok(_) => Outcome::Error("detokenised to another funding card".into()),
                            Err(s) => Outcome::Error(status_text(&s)),
                        }
                    }
                })
                .await
            }
            Op::Lifecycle => {
                let issued = self.issued.clone();
                drive(conc, until, move |task, seq| {
                    let conn = &conns[task % conns.len()];
                    let (mut c, mut s) = (conn.cards.clone(), conn.switch.clone());
                    let issued = issued.clone();
                    let txn = format!("{run_id}l-{task}-{seq}");
                    async move {
                        let card = match c
                            .issue_card(issue_request(task + seq as usize, 5000, 1))
                            .await
                        {
                            Ok(r) => Secret::from_response(r.into_inner()),
                            Err(s) => return Outcome::Error(status_text(&s)),
                        };
                        issued.fetch_add(1, Ordering::Relaxed);
                        match s.authorize(card.authorize(txn)).await {
                            Ok(r) if r.get_ref().approved => Outcome::Ok,
                            Ok(r) => declined(r.get_ref()),
                            Err(s) => Outcome::Error(status_text(&s)),
                        }
                    }
                })
                .await
            }
        };
        Ok(result(op, d))
    }

    async fn fill(&mut self) -> Fill {
        let n = self.opts.fill;
        self.say(format!("filling the vault with {n} cards"));
        let (issued, sample) = (self.issued.clone(), self.sample.clone());
        let conns = self.conns.clone();
        let done = Arc::new(AtomicU64::new(0));
        let progress = {
            let (done, verbose) = (done.clone(), self.opts.verbose);
            tokio::spawn(async move {
                let start = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    if verbose {
                        let d = done.load(Ordering::Relaxed);
                        let s = start.elapsed().as_secs_f64();
                        eprintln!(
                            "vcn bench: fill {d}/{n} ({:.0}/s over {s:.0}s)",
                            d as f64 / s
                        );
                    }
                }
            })
        };
        let d = drive(
            self.opts.concurrency,
            Until::Count(Arc::new(AtomicU64::new(0)), n),
            move |task, seq| {
                let mut c = conns[task % conns.len()].cards.clone();
                let (issued, sample, done) = (issued.clone(), sample.clone(), done.clone());
                async move {
                    match c
                        .issue_card(issue_request(task + seq as usize, 5000, 1))
                        .await
                    {
                        Ok(r) => {
                            issued.fetch_add(1, Ordering::Relaxed);
                            done.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut s) = sample.lock() {
                                s.add(Secret::from_response(r.into_inner()));
                            }
                            Outcome::Ok
                        }
                        Err(s) => Outcome::Error(status_text(&s)),
                    }
                }
            },
        )
        .await;
        progress.abort();
        Fill {
            cards: d.calls,
            errors: d.errors,
            seconds: d.seconds,
            per_second: d.calls as f64 / d.seconds.max(1e-9),
            settle_seconds: 0.0,
            settle_server_cpu_s: None,
        }
    }

    /// Waits up to `settle` for the watched server to go idle: seconds
    /// waited, and the server's CPU seconds meanwhile. Without a watched
    /// server it waits the whole time.
    async fn settle(&self) -> (f64, Option<f64>) {
        let most = self.opts.settle;
        if most.is_zero() {
            return (0.0, None);
        }
        self.say(format!("waiting up to {most:?} for the server to go idle"));
        let server = self.opts.server_process.as_ref();
        let cpu = || server.and_then(Watched::cpu_us);
        let start = Instant::now();
        let first = cpu();
        let mut last = first;
        while start.elapsed() < most {
            let step = SETTLE_STEP.min(most - start.elapsed());
            tokio::time::sleep(step).await;
            let now = cpu();
            if let (Some(before), Some(after)) = (last, now) {
                if went_idle(after.saturating_sub(before), step) {
                    break;
                }
            }
            last = now;
        }
        let waited = start.elapsed().as_secs_f64();
        let used = first
            .zip(cpu())
            .map(|(a, b)| b.saturating_sub(a) as f64 / 1e6);
        self.say(format!("settled after {waited:.0}s"));
        (waited, used)
    }

    async fn get_card(&self, id: &str) -> Result<pb::Card, String> {
        let mut c = self.conn(0).cards;
        c.get_card(pb::GetCardRequest {
            card_id: id.to_string(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| status_text(&s))
    }

    async fn check(&self) -> Checks {
        let mut c = Checks {
            hot_cap: self.opts.hot_cap,
            ..Default::default()
        };
        let spent = |card: &pb::Card| card.spent.as_ref().map_or(0, |m| m.amount_minor);
        if let Some(hot) = &self.hot {
            c.hot_approved_sum = hot.approved.load(Ordering::Relaxed);
            c.hot_approvals = hot.approvals.load(Ordering::Relaxed);
            match self.get_card(&hot.card.card_id).await {
                Ok(card) => {
                    c.hot_spent = spent(&card);
                    c.hot_uses = card.uses;
                    if c.hot_spent != c.hot_approved_sum {
                        c.problems.push(format!(
                            "hot card: spent {} but approvals add up to {}",
                            c.hot_spent, c.hot_approved_sum
                        ));
                    }
                    if c.hot_spent > c.hot_cap {
                        c.problems.push(format!(
                            "hot card: spent {} over its cap {}",
                            c.hot_spent, c.hot_cap
                        ));
                    }
                    if u64::from(c.hot_uses) != c.hot_approvals {
                        c.problems.push(format!(
                            "hot card: {} uses but {} approvals",
                            c.hot_uses, c.hot_approvals
                        ));
                    }
                }
                Err(e) => c.problems.push(format!("hot card: {e}")),
            }
        }
        for pool in &self.pools {
            for t in pool.iter() {
                c.pool_cards_checked += 1;
                match self.get_card(&t.card.card_id).await {
                    Ok(card) if spent(&card) == t.approved.load(Ordering::Relaxed) => {}
                    Ok(card) => {
                        c.pool_mismatches += 1;
                        if c.pool_mismatches <= 3 {
                            c.problems.push(format!(
                                "pool card {}: spent {} but approvals add up to {}",
                                t.card.card_id,
                                spent(&card),
                                t.approved.load(Ordering::Relaxed)
                            ));
                        }
                    }
                    Err(e) => {
                        c.pool_mismatches += 1;
                        c.problems
                            .push(format!("pool card {}: {e}", t.card.card_id));
                    }
                }
            }
        }
        match self.single_use_check().await {
            Ok((checked, violations)) => {
                c.single_use_cards_checked = checked;
                c.single_use_violations = violations;
                if violations > 0 {
                    c.problems.push(format!(
                        "{violations} of {checked} single-use cards were not approved exactly once"
                    ));
                }
            }
            Err(e) => c.problems.push(format!("single-use check: {e}")),
        }
        c.ok = c.problems.is_empty();
        c
    }

    /// Fresh single-use cards, each hit by several authorisations at once:
    /// exactly one may be approved.
    async fn single_use_check(&self) -> Result<(u64, u64), BenchError> {
        let cards = self.issue_many(SINGLE_USE_CHECKS, 5000, 1).await?;
        let mut tasks = Vec::new();
        for (i, card) in cards.into_iter().enumerate() {
            let card = Arc::new(card);
            for a in 0..SINGLE_USE_ATTEMPTS {
                let mut s = self.conn(i + a).switch;
                let req = card.authorize(format!("{}s-{i}-{a}", self.run_id));
                tasks.push((
                    i,
                    tokio::spawn(async move { s.authorize(req).await.map(|r| r.into_inner()) }),
                ));
            }
        }
        let mut approvals = [0u32; SINGLE_USE_CHECKS];
        for (i, t) in tasks {
            match t.await {
                Ok(Ok(r)) if r.approved => approvals[i] += 1,
                Ok(Ok(r)) if r.response_code == "65" => {}
                Ok(Ok(r)) => {
                    return Err(BenchError::Setup(format!(
                        "unexpected answer {} ({})",
                        r.response_code, r.decline_reason
                    )))
                }
                Ok(Err(s)) => return Err(BenchError::Setup(status_text(&s))),
                Err(e) => return Err(BenchError::Setup(e.to_string())),
            }
        }
        let violations = approvals.iter().filter(|n| **n != 1).count() as u64;
        Ok((approvals.len() as u64, violations))
    }
}

async fn connect(target: &Target, n: usize) -> Result<Vec<Conn>, BenchError> {
    let bearer = |key: &str| -> Result<Bearer, BenchError> {
        format!("Bearer {key}")
            .parse()
            .map(Bearer)
            .map_err(|_| BenchError::BadKey)
    };
    let (cards_auth, switch_auth) = (bearer(&target.cards_key)?, bearer(&target.switch_key)?);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let err = |e: tonic::transport::Error| BenchError::Connect {
            url: target.url.clone(),
            reason: e.to_string(),
        };
        // One Channel is one HTTP/2 connection.
        let channel = Channel::from_shared(target.url.clone())
            .map_err(|e| BenchError::Connect {
                url: target.url.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(err)?;
        conns.push(Conn {
            cards: CardServiceClient::new(InterceptedService::new(
                channel.clone(),
                cards_auth.clone(),
            )),
            switch: AuthorizationServiceClient::new(InterceptedService::new(
                channel.clone(),
                switch_auth.clone(),
            )),
            health: HealthClient::new(channel),
        });
    }
    Ok(conns)
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu,
        os: std::env::consts::OS.to_string(),
    }
}

/// Runs the whole measurement against `target`.
pub async fn run(target: &Target, opts: &Options) -> Result<Report, BenchError> {
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut rng = seed();
    let mut run = Run {
        opts: Options {
            concurrency: opts.concurrency.max(1),
            connections: opts.connections.max(1),
            repeat: opts.repeat.max(1),
            ..opts.clone()
        },
        conns: connect(target, opts.connections).await?,
        run_id: format!("b{:08x}", next_random(&mut rng) as u32),
        measurements: 0,
        issued: Arc::new(AtomicU64::new(0)),
        sample: Arc::new(Mutex::new(Sample {
            cards: Vec::new(),
            seen: 0,
            rng,
        })),
        hot: None,
        pools: Vec::new(),
        started: Instant::now(),
    };
    let mut rounds = Vec::new();
    for repeat in 1..=run.opts.repeat {
        rounds.push(run.round(0, repeat).await?);
    }
    let mut fill = None;
    if opts.fill > 0 {
        let mut f = run.fill().await;
        (f.settle_seconds, f.settle_server_cpu_s) = run.settle().await;
        fill = Some(f);
        for repeat in 1..=run.opts.repeat {
            rounds.push(run.round(1, repeat).await?);
        }
    }
    let checks = run.check().await;
    Ok(Report {
        tool: format!("vcn {}", env!("CARGO_PKG_VERSION")),
        started_at,
        machine: machine(),
        settings: Settings {
            target: target.url.clone(),
            repeat: run.opts.repeat,
            concurrency: run.opts.concurrency,
            connections: run.opts.connections,
            duration_s: opts.duration.as_secs_f64(),
            fill: opts.fill,
            pool_cards: opts.pool_cards,
            hot_cap: opts.hot_cap,
        },
        summary: summarise(&rounds),
        rounds,
        fill,
        checks,
        cards_issued: run.issued.load(Ordering::Relaxed),
        footprint: None,
    })
}

/// Peak resident memory of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes allocated on disk under `dir`.
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// A server started by the tool in this process, on its own runtime (so
/// the load and the service do not share one scheduler), on 127.0.0.1:0.
pub struct LocalServer {
    pub target: Target,
    pub data_dir: PathBuf,
    pub cache_mib: u64,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    _temp: Option<tempfile::TempDir>,
}

/// How an in-process server is set up, where it differs from the defaults.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The embedded engine's cache, in MiB.
    pub cache_mib: u64,
    /// The engine of a new data directory.
    pub engine: crate::vault::embedded::EngineKind,
    /// A compressed retention (see
    /// [`crate::config::Config::compressed_retention`]).
    pub retention: Option<Duration>,
    /// The commit delay (`commit_delay_us`), to measure its trade-off.
    pub commit_delay_us: u64,
    /// The server's request threads (`worker_threads`; 0: one per core).
    pub worker_threads: usize,
}

impl Default for LocalOptions {
    fn default() -> Self {
        let config = crate::config::Config::default();
        LocalOptions {
            cache_mib: config.cache_capacity_mib,
            engine: config.engine,
            retention: None,
            commit_delay_us: config.commit_delay_us,
            worker_threads: config.worker_threads,
        }
    }
}

impl LocalServer {
    /// Starts a server over `dir` (a new temporary directory when None),
    /// set up as `options` says.
    pub fn start(dir: Option<&Path>, options: &LocalOptions) -> Result<LocalServer, BenchError> {
        let cache_mib = options.cache_mib;
        let start_err = |e: String| BenchError::Start(e);
        let temp = match dir {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("vcn-bench-")
                    .tempdir()
                    .map_err(|e| start_err(e.to_string()))?,
            ),
        };
        let root = temp
            .as_ref()
            .map(|t| t.path())
            .or(dir)
            .map(Path::to_path_buf)
            .ok_or_else(|| start_err("no data directory".into()))?;
        let config = crate::config::Config {
            data_dir: root.join("data"),
            keys_dir: root.join("keys"),
            cache_capacity_mib: cache_mib,
            engine: options.engine,
            compressed_retention: options.retention,
            commit_delay_us: options.commit_delay_us,
            worker_threads: options.worker_threads,
            ..crate::config::Config::default()
        };
        let tag = format!("{:08x}", next_random(&mut seed()) as u32);
        let add = |name: &str, role| {
            crate::clients::add(&config.keys_dir, &format!("bench-{name}-{tag}"), role, None)
                .map_err(|e| start_err(e.to_string()))
        };
        // The keys directory must exist (with a master key) before clients
        // can be added: open the service first.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let cfg = config.clone();
        let thread = std::thread::Builder::new()
            .name("vcn-bench-server".into())
            .spawn(move || -> Result<(), String> {
                let rt = cfg
                    .runtime()
                    .thread_name("vcn-server")
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async move {
                    let opened = async {
                        let service = crate::server::Service::open(&cfg)
                            .await
                            .map_err(|e| e.to_string())?;
                        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                            .await
                            .map_err(|e| e.to_string())?;
                        let addr = listener.local_addr().map_err(|e| e.to_string())?;
                        Ok::<_, String>((service, listener, addr))
                    }
                    .await;
                    match opened {
                        Ok((service, listener, addr)) => {
                            let _ = ready_tx.send(Ok(addr));
                            service
                                .serve(listener, async {
                                    let _ = stop_rx.await;
                                })
                                .await
                                .map_err(|e| e.to_string())
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.clone()));
                            Err(e)
                        }
                    }
                })
            })
            .map_err(|e| start_err(e.to_string()))?;
        let addr = ready_rx
            .recv()
            .map_err(|_| start_err("the server thread ended".into()))?
            .map_err(start_err)?;
        let cards_key = add("cards", crate::clients::Role::Cards)?;
        let switch_key = add("switch", crate::clients::Role::Switch)?;
        Ok(LocalServer {
            target: Target {
                url: format!("http://{addr}"),
                cards_key,
                switch_key,
            },
            data_dir: config.data_dir,
            cache_mib,
            stop: Some(stop_tx),
            thread: Some(thread),
            _temp: temp,
        })
    }

    /// The vault's size and this process's peak memory, for `cards` cards.
    pub fn footprint(&self, cards: u64) -> Footprint {
        let bytes = disk_bytes(&self.data_dir);
        Footprint {
            data_dir: self.data_dir.display().to_string(),
            data_dir_bytes: bytes,
            cards,
            bytes_per_card: if cards > 0 {
                bytes as f64 / cards as f64
            } else {
                0.0
            },
            cache_mib: self.cache_mib,
            peak_rss_bytes: peak_rss_bytes(),
        }
    }

    /// Stops the server and waits until its vault is closed.
    pub fn stop(mut self) -> Result<(), BenchError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), BenchError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => Err(BenchError::Start(e)),
            Some(Err(_)) => Err(BenchError::Start("the server thread panicked".into())),
            _ => Ok(()),
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_under_a_twentieth_of_a_core_is_idle() {
        let ten_s = Duration::from_secs(10);
        assert!(went_idle(0, ten_s));
        assert!(went_idle(499_999, ten_s));
        assert!(!went_idle(500_000, ten_s), "5 % of a core is still busy");
        assert!(!went_idle(20_000_000, ten_s), "two cores compacting");
        assert!(!went_idle(1, Duration::ZERO));
    }

    #[test]
    fn the_engine_share_is_the_threads_the_service_did_not_name() {
        let server = Watched {
            pid: 100,
            exclude_threads: Some("vcn-bench-load".into()),
        };
        let threads: Vec<(u32, String, u64)> = [
            (100, "vcn", 1),
            (101, "tokio-rt-worker", 10),
            (102, "vcn-server", 20),
            (103, "vcn-committer", 40),
            (104, "vcn-audit-journal", 80),
            (105, "fjall:worker", 1000),
            (106, "sled-io-3", 2000),
            (107, "vcn-bench-load", 4000),
            (108, "compaction", 8000),
        ]
        .into_iter()
        .map(|(t, n, c)| (t, n.to_string(), c))
        .collect();
        // 50 µs of threads that exited: in the total only.
        let split = server.split(15_201, &threads);
        assert_eq!(split.total_us, 11_201, "the load tool's threads left out");
        assert_eq!(
            split.engine_us, 11_000,
            "fjall's, sled's and fjall 2's threads"
        );
    }

    #[test]
    fn a_busy_engine_thread_shows_in_this_process_engine_share() {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (keep_tx, keep_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("fjall:worker".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let stat = format!("/proc/self/task/{}/stat", unsafe { libc::gettid() });
                let used = || proc_cpu_us(&stat).unwrap_or(0);
                let mut x = 0u64;
                while used() < 100_000 {
                    for i in 0..100_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
                let _ = done_tx.send(());
                let _ = keep_rx.recv();
            })
            .unwrap();
        done_rx.recv().unwrap();
        let me = Watched {
            pid: std::process::id(),
            exclude_threads: None,
        };
        let cpu = me.cpu().unwrap();
        assert!(cpu.engine_us >= 100_000, "{cpu:?}");
        assert!(cpu.total_us >= cpu.engine_us, "{cpu:?}");
        drop(keep_tx);
    }

    #[test]
    fn a_timed_round_makes_one_call_however_late_it_starts() {
        let over = Until::Time(Instant::now());
        assert!(over.next(0, 0), "task 0's first call");
        assert!(!over.next(0, 1));
        assert!(!over.next(1, 0));
        let running = Until::Time(Instant::now() + Duration::from_secs(60));
        assert!(running.next(3, 7));
        let counted = Until::Count(Arc::new(AtomicU64::new(0)), 2);
        let made: Vec<bool> = (0..3).map(|_| counted.next(0, 0)).collect();
        assert_eq!(made, [true, true, false], "a count is a count");
    }
}
