//! `vcn bench`: the load tool's command line (the logic is in
//! [`crate::bench`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::bench::{self, LocalOptions, LocalServer, Op, Options, Target, Watched};
use crate::cli::{fail, EXIT_UNAVAILABLE, EXIT_USAGE};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A running service to drive [default: start one in-process on a
    /// temporary data directory].
    #[arg(long)]
    server: Option<String>,
    /// With --server: the environment variable holding a cards (or admin)
    /// client's API key.
    #[arg(long, default_value = "VCN_CARDS_KEY")]
    cards_key_env: String,
    /// With --server: the environment variable holding a switch client's
    /// API key.
    #[arg(long, default_value = "VCN_SWITCH_KEY")]
    switch_key_env: String,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections they share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long each operation runs: 500ms, 10s, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Issue this many cards after a first round, then measure again.
    #[arg(long, default_value_t = 0)]
    fill: u64,
    /// After the fill, wait up to this long for the server to go idle
    /// (its compactions done) before measuring again: 0s, 5m.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    settle: Duration,
    /// Multi-use cards the authorize operation spreads over.
    #[arg(long, default_value_t = 1024)]
    pool_cards: usize,
    /// The hot card's cap in cents (each authorisation is 1.00 EUR)
    /// [default: never reached].
    #[arg(long)]
    hot_cap: Option<i64>,
    /// Operations to run, in order (health first: it is the floor).
    #[arg(long, value_enum, value_delimiter = ',')]
    ops: Vec<Op>,
    /// Run each round this many times (operations interleaved) and report
    /// the medians too: ratios on a noisy machine need it.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// In-process server only: keep the vault in this directory (data/
    /// and keys/ inside it) instead of a temporary one.
    #[arg(long, conflicts_with = "server")]
    data_dir: Option<PathBuf>,
    /// In-process server only: the embedded engine's cache in MiB.
    #[arg(long, default_value_t = 256, conflicts_with = "server")]
    cache_mib: u64,
    /// In-process server only: the engine of a new vault (fjall3, fjall or
    /// sled).
    #[arg(long, default_value_t = crate::vault::embedded::EngineKind::default(), conflicts_with = "server")]
    engine: crate::vault::embedded::EngineKind,
    /// In-process server only: keep ended cards, transactions and events
    /// this long (and quarantine numbers as long), with the retention pass
    /// four times as often, instead of 13 months: with `--ops lifecycle`
    /// the vault then stops growing (a soak's steady state).
    #[arg(long, value_parser = parse_duration, conflicts_with = "server")]
    retention: Option<Duration>,
    /// In-process server only: how long a commit round may gather writes
    /// under load, in microseconds (the `commit_delay_us` setting), to
    /// measure its trade-off on this machine [default: the setting's]
    #[arg(long, conflicts_with = "server", value_parser = clap::value_parser!(u64).range(0..=crate::config::MAX_COMMIT_DELAY_US))]
    commit_delay_us: Option<u64>,
    /// In-process server only: its request threads (the `worker_threads`
    /// setting; 0: one per core) [default: the setting's]
    #[arg(long, conflicts_with = "server", value_parser = clap::value_parser!(u16).range(0..=crate::config::MAX_WORKER_THREADS as i64))]
    worker_threads: Option<u16>,
    /// With --server on this machine: the server's process id, to report
    /// its CPU time per call and its memory each round [default with an
    /// in-process server: that server].
    #[arg(long, requires = "server")]
    server_pid: Option<u32>,
    /// No progress lines on standard error.
    #[arg(long)]
    quiet: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 500ms, 10s or 2m");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(bad()),
    }
}

pub fn run(args: BenchArgs) -> ExitCode {
    let opts = Options {
        concurrency: args.concurrency,
        connections: args.connections,
        duration: args.duration,
        fill: args.fill,
        settle: args.settle,
        pool_cards: args.pool_cards,
        hot_cap: args.hot_cap.unwrap_or(Options::default().hot_cap),
        ops: if args.ops.is_empty() {
            Op::ALL.to_vec()
        } else {
            args.ops.clone()
        },
        repeat: args.repeat,
        verbose: !args.quiet,
        server_process: match (&args.server, args.server_pid) {
            (None, _) => Some(Watched::in_process()),
            (Some(_), Some(pid)) => Some(Watched {
                pid,
                exclude_threads: None,
            }),
            (Some(_), None) => None,
        },
    };
    if opts.hot_cap <= 0 || opts.concurrency == 0 || opts.connections == 0 || opts.repeat == 0 {
        return fail(
            EXIT_USAGE,
            "--hot-cap, --concurrency, --connections and --repeat must be above 0",
        );
    }
    let (target, local) = match &args.server {
        Some(url) => {
            let key = |var: &str| {
                std::env::var(var).map_err(|_| {
                    format!("set {var} to a client's API key (or name another variable)")
                })
            };
            match (key(&args.cards_key_env), key(&args.switch_key_env)) {
                (Ok(cards_key), Ok(switch_key)) => (
                    Target {
                        url: url.clone(),
                        cards_key,
                        switch_key,
                    },
                    None,
                ),
                (Err(e), _) | (_, Err(e)) => return fail(EXIT_USAGE, e),
            }
        }
        None => {
            let defaults = LocalOptions::default();
            let options = LocalOptions {
                cache_mib: args.cache_mib,
                engine: args.engine,
                retention: args.retention,
                commit_delay_us: args.commit_delay_us.unwrap_or(defaults.commit_delay_us),
                worker_threads: args
                    .worker_threads
                    .map_or(defaults.worker_threads, usize::from),
            };
            match LocalServer::start(args.data_dir.as_deref(), &options) {
                Ok(s) => {
                    if !args.quiet {
                        eprintln!(
                            "vcn bench: started a server in-process at {} (data in {})",
                            s.target.url,
                            s.data_dir.display()
                        );
                    }
                    (s.target.clone(), Some(s))
                }
                Err(e) => return fail(EXIT_UNAVAILABLE, e),
            }
        }
    };
    // The load tool's own runtime; an in-process server has another.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(bench::LOAD_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_UNAVAILABLE, format!("cannot start the runtime: {e}")),
    };
    let mut report = match rt.block_on(bench::run(&target, &opts)) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_UNAVAILABLE, e),
    };
    drop(rt);
    if let Some(server) = local {
        report.footprint = Some(server.footprint(report.cards_issued));
        if let Err(e) = server.stop() {
            return fail(EXIT_UNAVAILABLE, e);
        }
    }
    print!("{}", report.text());
    if let Some(path) = &args.json_out {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|j| std::fs::write(path, j).map_err(|e| e.to_string()));
        if let Err(e) = written {
            return fail(
                EXIT_UNAVAILABLE,
                format!("cannot write {}: {e}", path.display()),
            );
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        fail(
            EXIT_UNAVAILABLE,
            format!(
                "{} errors; checks {}",
                report.errors(),
                if report.checks.ok { "passed" } else { "FAILED" }
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
