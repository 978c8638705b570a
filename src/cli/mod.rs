//! The `vcn` command line: the server and its operator commands, and a
//! client for the gRPC API.
//!
//! Exit codes: 0 done; 1 declined (an authorisation or reversal said no);
//! 2 usage or input error; 3 the service could not be reached or failed.

mod bench;
mod remote;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::clients::{self, Role};
use crate::config::{Config, LogFormat, StoreUrl};
use crate::server;
use crate::vault::embedded::EngineKind;
use crate::vault::keyfile;
use crate::vault::postgres_store::PostgresStore;

pub const EXIT_DECLINED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNAVAILABLE: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "vcn",
    version,
    about = "Single-use virtual card numbers: issue, authorise, detokenise"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gRPC service.
    Serve {
        /// Address to listen on [default: 127.0.0.1:50051].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Where the vault keeps its data [default: ./data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The embedded engine of a new data directory: fjall3, fjall or
        /// sled [default: fjall3]. An existing one keeps its own.
        #[arg(long, env = "VCN_ENGINE")]
        engine: Option<EngineKind>,
        /// Where the master key and clients live [default: ./keys].
        #[arg(long)]
        keys_dir: Option<PathBuf>,
        /// Keep the vault in this PostgreSQL database
        /// (postgres://user:password@host:port/db), shared with other
        /// instances, instead of the embedded engine in --data-dir.
        #[arg(long, env = "VCN_STORE", hide_env_values = true)]
        store: Option<String>,
        /// A TOML configuration file; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start a new, empty vault even though this keys directory has
        /// served one before (by default an empty store is then refused).
        #[arg(long)]
        new_vault: bool,
    },
    /// Bring a PostgreSQL store's schema up to date and exit (`serve` does
    /// the same at start).
    Migrate {
        /// The database (postgres://user:password@host:port/db).
        #[arg(long, env = "VCN_STORE", hide_env_values = true)]
        store: Option<String>,
        /// A TOML configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a new 256-bit master key (mode 0600); never overwrites one.
    /// With --components N, write N key components for N custodians
    /// instead (split knowledge): the key is their XOR, and no one
    /// component tells anything about it. Prints the key check value.
    Keygen {
        #[arg(long, default_value = "keys")]
        keys_dir: PathBuf,
        /// Split the key into this many components (2 to 9).
        #[arg(long, default_value_t = 1)]
        components: usize,
    },
    /// Key rotation: add a version, re-encrypt, see what needs which
    /// version, retire one.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Certificates for TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The audit log: verify its chain, export it for a SIEM.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Restore a backup (from `vcn backup`) into an empty data directory,
    /// with the server stopped. The keys directory must hold the master key
    /// the backup was made with.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "keys")]
        keys_dir: PathBuf,
        /// The engine of the restored vault: fjall3, fjall or sled (a
        /// backup is the same for all: restoring is how a vault changes
        /// engine).
        #[arg(long, env = "VCN_ENGINE", default_value_t = EngineKind::default())]
        engine: EngineKind,
    },
    /// Manage API clients.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Measure the service under load (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Remote(remote::RemoteCommand),
}

/// Where the vault is, for the key commands that read or change it.
#[derive(clap::Args, Debug)]
struct VaultArgs {
    /// A TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The PostgreSQL store (as for `serve`).
    #[arg(long, env = "VCN_STORE", hide_env_values = true)]
    store: Option<String>,
    /// The embedded engine's data directory [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The keys directory [default: ./keys].
    #[arg(long)]
    keys_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Write the next key version (a file, or --components N). New
    /// records use it once the server has reloaded its keys: `kill -HUP`
    /// the server (no downtime) or restart it. Older records are then
    /// re-encrypted in the background.
    Rotate {
        #[arg(long, default_value = "keys")]
        keys_dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        components: usize,
    },
    /// Per key version, how many records still need it. With the embedded
    /// engine the server must be stopped (it holds the data directory);
    /// with PostgreSQL it may run.
    Status {
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Re-encrypt every record under the current key version now (the
    /// server does the same in the background after a reload).
    Reencrypt {
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Retire a key version nothing needs any more: it is forgotten by the
    /// vault and its files are moved to KEYS_DIR/retired/, never read
    /// again (destroy or archive them offline). Refused, with the count,
    /// while records still need it.
    Retire {
        version: u32,
        #[command(flatten)]
        vault: VaultArgs,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Make a development CA, a server certificate for localhost and
    /// 127.0.0.1, and a client certificate per --client: for trying TLS
    /// and mTLS, never for production.
    Dev {
        #[arg(long)]
        out: PathBuf,
        /// A client to make a certificate for (repeat for several).
        #[arg(long = "client")]
        clients: Vec<String>,
    },
}

/// Which audit log, and its key.
#[derive(clap::Args, Debug)]
struct AuditArgs {
    /// A TOML configuration file (for audit_log and keys_dir).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The audit log [default: audit.log beside the data directory].
    #[arg(long)]
    log: Option<PathBuf>,
    /// The keys directory holding audit.key [default: ./keys].
    #[arg(long)]
    keys_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check every entry's MAC and the chain; names the first entry that
    /// was edited, deleted, inserted or moved. Exit 0 intact, 1 broken.
    Verify {
        #[command(flatten)]
        args: AuditArgs,
    },
    /// Write the entries as JSON lines on standard output.
    Export {
        #[command(flatten)]
        args: AuditArgs,
        /// Only entries at or after this time (RFC 3339, e.g.
        /// 2025-01-31T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ClientCommand {
    /// Register a client; its API key is printed once, as the last line.
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Pin a cards client to one cardholder (a widget's key).
        #[arg(long)]
        owner: Option<String>,
        /// Identify the client by this TLS client certificate (PEM) instead
        /// of an API key (mTLS: the server needs tls_client_ca).
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long, default_value = "keys")]
        keys_dir: PathBuf,
    },
    /// List registered clients (never their keys).
    List {
        #[arg(long, default_value = "keys")]
        keys_dir: PathBuf,
    },
    /// Remove a client; its key stops working within a second.
    Remove {
        name: String,
        #[arg(long, default_value = "keys")]
        keys_dir: PathBuf,
    },
}

/// The log filter for `RUST_LOG` (info when unset or unreadable), with
/// sled's own records held at info unless `RUST_LOG` names sled.
///
/// Why: sled 0.34 logs at debug and trace from closures that
/// crossbeam-epoch runs later, possibly on a thread whose thread-locals
/// are being destroyed as it exits (the committer at shutdown, a blocking
/// thread retiring). tracing's formatter then cannot reach its
/// thread-local buffer and panics there, and a panic in a thread-local's
/// destructor aborts the process: `RUST_LOG=trace` made `vcn serve` die
/// with SIGABRT on SIGTERM. A record the filter disables never reaches the
/// formatter.
fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let filter = rust_log
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    if rust_log.is_some_and(|s| s.contains("sled")) {
        return filter;
    }
    match "sled=info".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    }
}

/// Logs to standard error, as `format` says, through a dedicated writer
/// thread: a call's log lines are formatted on its own thread but written
/// by that one, so no tokio worker waits in a `write` to stderr (a pipe
/// to journald or a file: one syscall per line) or on the lock around it.
/// The writer never drops a line: when its queue is full, loggers wait.
/// Colours only on a terminal.
/// Hold the returned guard until the end: dropping it writes what is left.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("vcn-log")
        .finish(std::io::stderr());
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("vcn: {message}");
    ExitCode::from(code)
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            engine,
            keys_dir,
            store,
            config,
            new_vault,
        } => {
            let mut cfg = match load_config(config, store) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _log = init_logging(cfg.log_format);
            if let Some(l) = listen {
                cfg.listen = l;
            }
            cfg.new_vault = new_vault;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(e) = engine {
                cfg.engine = e;
            }
            if let Some(k) = keys_dir {
                cfg.keys_dir = k;
            }
            let rt = match cfg.runtime().build() {
                Ok(rt) => rt,
                Err(e) => return fail(EXIT_UNAVAILABLE, format!("cannot start the runtime: {e}")),
            };
            match rt.block_on(server::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_UNAVAILABLE, e),
            }
        }
        Command::Migrate { store, config } => {
            let cfg = match load_config(config, store) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _log = init_logging(cfg.log_format);
            let Some(url) = cfg.store.clone() else {
                return fail(
                    EXIT_USAGE,
                    "migrate needs a PostgreSQL store: --store postgres://... (or store in --config)",
                );
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(EXIT_UNAVAILABLE, format!("cannot start the runtime: {e}")),
            };
            let migrated = rt.block_on(async {
                PostgresStore::open(url.expose(), &cfg.postgres())
                    .await?
                    .migrate()
                    .await
            });
            match migrated {
                Ok(version) => {
                    println!(
                        "the schema of the {} is at version {version}",
                        url.describe()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_UNAVAILABLE, e),
            }
        }
        Command::Keygen {
            keys_dir,
            components,
        } => match keyfile::generate_version(&keys_dir, 1, components) {
            Ok(g) => {
                print_generated(&g);
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, e),
        },
        Command::Keys { command } => keys_command(command),
        Command::Audit { command } => audit_command(command),
        Command::Certs {
            command: CertsCommand::Dev { out, clients },
        } => match crate::certs::dev(&out, &clients) {
            Ok(d) => {
                println!("CA:     {}", d.ca.display());
                println!(
                    "server: {} {} (localhost, 127.0.0.1)",
                    d.server_cert.display(),
                    d.server_key.display()
                );
                for (name, c, k) in &d.clients {
                    println!("client {name}: {} {}", c.display(), k.display());
                }
                println!("development certificates only: never use this CA in production");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, e),
        },
        Command::Client { command } => client_command(command),
        Command::Restore {
            from,
            data_dir,
            keys_dir,
            engine,
        } => restore(&from, &data_dir, &keys_dir, engine),
        Command::Bench(args) => bench::run(args),
        Command::Remote(cmd) => remote::run(cmd),
    }
}

/// The configuration file (or the defaults), with `--store` over it.
fn load_config(path: Option<PathBuf>, store: Option<String>) -> Result<Config, ExitCode> {
    let mut cfg = match path {
        Some(path) => Config::load(&path).map_err(|e| fail(EXIT_USAGE, e))?,
        None => Config::default(),
    };
    if let Some(s) = store {
        cfg.store = Some(StoreUrl::new(s));
        cfg.vault().map_err(|e| fail(EXIT_USAGE, e))?;
    }
    Ok(cfg)
}

fn restore(
    from: &std::path::Path,
    data_dir: &std::path::Path,
    keys_dir: &std::path::Path,
    engine: EngineKind,
) -> ExitCode {
    let kcv = match keyfile::load(keys_dir) {
        Ok(master) => crate::vault::crypto::Keyring::single(&master)
            .current()
            .check_value()
            .to_string(),
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_UNAVAILABLE, format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(crate::backup::restore(from, data_dir, engine, Some(&kcv))) {
        Ok(n) => {
            if let Err(e) =
                crate::installation::record(keys_dir, &data_dir.display().to_string(), &kcv)
            {
                return fail(EXIT_UNAVAILABLE, e);
            }
            println!("restored {n} entries into {}", data_dir.display());
            ExitCode::SUCCESS
        }
        Err(
            e @ (crate::backup::BackupError::NotEmpty(_)
            | crate::backup::BackupError::WrongKey { .. }),
        ) => fail(EXIT_USAGE, e),
        Err(e) => fail(EXIT_UNAVAILABLE, e),
    }
}

fn print_generated(g: &keyfile::Generated) {
    if g.paths.len() == 1 {
        println!(
            "wrote a new master key (version {}) to {} (mode 0600)",
            g.version,
            g.paths[0].display()
        );
    } else {
        println!(
            "wrote {} key components of master key version {} (mode 0600 each):",
            g.paths.len(),
            g.version
        );
        for p in &g.paths {
            println!("  {}", p.display());
        }
        println!("give each to its own custodian; the service needs all of them at start");
    }
    println!("key check value (KCV): {}", g.check_value);
}

fn vault_config(args: VaultArgs) -> Result<Config, ExitCode> {
    let mut cfg = load_config(args.config, args.store)?;
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(k) = args.keys_dir {
        cfg.keys_dir = k;
    }
    // Key commands never invent a key.
    cfg.dev_keys = false;
    Ok(cfg)
}

fn keys_command(command: KeysCommand) -> ExitCode {
    let (vault_args, action) = match command {
        KeysCommand::Rotate {
            keys_dir,
            components,
        } => {
            let next = keyfile::versions(&keys_dir)
                .ok()
                .into_iter()
                .chain(keyfile::versions(&keys_dir.join(keyfile::RETIRED_DIR)).ok())
                .flatten()
                .max()
                .unwrap_or(0)
                + 1;
            if next == 1 {
                return fail(
                    EXIT_USAGE,
                    format!(
                        "no key in {}: make the first with `vcn keygen`",
                        keys_dir.display()
                    ),
                );
            }
            return match keyfile::generate_version(&keys_dir, next, components) {
                Ok(g) => {
                    print_generated(&g);
                    println!("reload the running server's keys with `kill -HUP <pid>` (or restart it): new records then use version {next}, and older ones are re-encrypted in the background");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_USAGE, e),
            };
        }
        KeysCommand::Status { vault } => (vault, KeysAction::Status),
        KeysCommand::Reencrypt { vault } => (vault, KeysAction::Reencrypt),
        KeysCommand::Retire { version, vault } => (vault, KeysAction::Retire(version)),
    };
    let cfg = match vault_config(vault_args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _log = init_logging(cfg.log_format);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_UNAVAILABLE, format!("cannot start the runtime: {e}")),
    };
    rt.block_on(async {
        let vault = match server::open_vault(&cfg, |s| s).await {
            Ok(v) => v,
            Err(e) => return fail(EXIT_UNAVAILABLE, e),
        };
        let code = match action {
            KeysAction::Status => match vault.key_usage().await {
                Ok(usage) => {
                    let current = vault.keys().current_version();
                    println!(
                        "{:<8} {:>8} {:>10} {:>10} {:>10} {:>10}",
                        "VERSION", "SEALED", "PAN-INDEX", "FUND-INDEX", "LIVE-CVV", "NEEDED-BY"
                    );
                    for u in usage {
                        let mark = if u.version == current { " (current)" } else { "" };
                        println!(
                            "{:<8} {:>8} {:>10} {:>10} {:>10} {:>10}{mark}",
                            u.version,
                            u.sealed,
                            u.pan_index,
                            u.funding_index,
                            u.live_cvv,
                            u.total()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_UNAVAILABLE, e),
            },
            KeysAction::Reencrypt => match vault.reencrypt_all().await {
                Ok(r) => {
                    println!(
                        "re-encrypted {} of {} cards under key version {}",
                        r.moved,
                        r.cards,
                        vault.keys().current_version()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_UNAVAILABLE, e),
            },
            KeysAction::Retire(version) => match vault.retire_version(version).await {
                Ok(()) => match keyfile::retire(&cfg.keys_dir, version) {
                    Ok(moved) => {
                        println!("retired key version {version}; its files were moved where the service never reads them:");
                        for p in moved {
                            println!("  {}", p.display());
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(EXIT_UNAVAILABLE, e),
                },
                Err(e) => fail(EXIT_USAGE, e),
            },
        };
        let _ = vault.sync().await;
        code
    })
}

fn audit_command(command: AuditCommand) -> ExitCode {
    let (args, since) = match command {
        AuditCommand::Verify { args } => (args, None),
        AuditCommand::Export { args, since } => (args, Some(since)),
    };
    let cfg = match load_config(args.config, None) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let log = args.log.unwrap_or_else(|| cfg.audit_path());
    let keys_dir = args.keys_dir.unwrap_or(cfg.keys_dir);
    match since {
        None => {
            let key = match crate::audit::load_key(&keys_dir, false) {
                Ok(k) => k,
                Err(e) => return fail(EXIT_USAGE, e),
            };
            match crate::audit::verify(&log, &key) {
                Ok(crate::audit::Verdict::Intact(n)) => {
                    println!("{}: intact, {n} entries", log.display());
                    ExitCode::SUCCESS
                }
                Ok(crate::audit::Verdict::Broken { line, reason }) => {
                    println!("{}: BROKEN at line {line}: {reason}", log.display());
                    ExitCode::from(EXIT_DECLINED)
                }
                Err(e) => fail(EXIT_USAGE, e),
            }
        }
        Some(since) => {
            let since = match since
                .as_deref()
                .map(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                })
                .transpose()
            {
                Ok(s) => s,
                Err(e) => return fail(EXIT_USAGE, format!("--since: not an RFC 3339 time: {e}")),
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            match crate::audit::export(&log, since, &mut out) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_UNAVAILABLE, e),
            }
        }
    }
}

enum KeysAction {
    Status,
    Reencrypt,
    Retire(u32),
}

fn client_command(command: ClientCommand) -> ExitCode {
    match command {
        ClientCommand::Add {
            name,
            role,
            owner,
            cert: Some(cert),
            keys_dir,
        } => {
            let added = crate::certs::fingerprint_pem_file(&cert)
                .map_err(|e| e.to_string())
                .and_then(|fp| {
                    clients::add_cert(&keys_dir, &name, role, owner.as_deref(), &fp)
                        .map(|()| fp)
                        .map_err(|e| e.to_string())
                });
            match added {
                Ok(fp) => {
                    println!(
                        "added client {name} with role {}, identified by its certificate (SHA-256 {fp}); it needs no API key",
                        role.as_str()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_USAGE, e),
            }
        }
        ClientCommand::Add {
            name,
            role,
            owner,
            cert: None,
            keys_dir,
        } => match clients::add(&keys_dir, &name, role, owner.as_deref()) {
            Ok(key) => {
                let pinned = owner
                    .map(|o| format!(", acting for owner {o} only"))
                    .unwrap_or_default();
                println!("added client {name} with role {}{pinned}.", role.as_str());
                println!("Its API key is below. It is shown only this once: store it now.");
                println!("{key}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, e),
        },
        ClientCommand::List { keys_dir } => match clients::list(&keys_dir) {
            Ok(list) => {
                println!("{:<24} {:<8} {:<24} CREATED", "NAME", "ROLE", "OWNER");
                for c in list {
                    println!(
                        "{:<24} {:<8} {:<24} {}",
                        c.name,
                        c.role.as_str(),
                        c.owner.as_deref().unwrap_or("-"),
                        c.created_at
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, e),
        },
        ClientCommand::Remove { name, keys_dir } => match clients::remove(&keys_dir, &name) {
            Ok(()) => {
                println!("removed client {name}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    /// What `filter` lets through: vcn's records at debug and at trace,
    /// sled's at info and at trace.
    fn lets_through(filter: tracing_subscriber::EnvFilter) -> [bool; 4] {
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            [
                tracing::enabled!(target: "vcn::server", Level::DEBUG),
                tracing::enabled!(target: "vcn::server", Level::TRACE),
                tracing::enabled!(target: "sled::pagecache", Level::INFO),
                tracing::enabled!(target: "sled::pagecache", Level::TRACE),
            ]
        })
    }

    #[test]
    fn sled_records_stay_at_info_unless_rust_log_names_sled() {
        let trace = lets_through(log_filter(Some("trace")));
        assert_eq!(trace, [true, true, true, false]);
        let sled = lets_through(log_filter(Some("info,sled=trace")));
        assert_eq!(sled, [false, false, true, true]);
        // Unset or unreadable: info.
        assert_eq!(lets_through(log_filter(None)), [false, false, true, false]);
        assert_eq!(
            lets_through(log_filter(Some("=["))),
            [false, false, true, false]
        );
    }
}
