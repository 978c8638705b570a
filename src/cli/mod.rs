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
    Keygen {
        #[arg(long, default_value = "keys")]
        keys_dir: PathBuf,
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
            keys_dir,
            store,
            config,
            new_vault,
        } => {
            let mut cfg = match load_config(config, store) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log_format);
            if let Some(l) = listen {
                cfg.listen = l;
            }
            cfg.new_vault = new_vault;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(k) = keys_dir {
                cfg.keys_dir = k;
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
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
            init_logging(cfg.log_format);
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
        Command::Keygen { keys_dir } => match keyfile::generate(&keys_dir) {
            Ok(path) => {
                println!("wrote a new master key to {} (mode 0600)", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, e),
        },
        Command::Client { command } => client_command(command),
        Command::Restore {
            from,
            data_dir,
            keys_dir,
        } => restore(&from, &data_dir, &keys_dir),
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
    match rt.block_on(crate::backup::restore(from, data_dir, Some(&kcv))) {
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

fn client_command(command: ClientCommand) -> ExitCode {
    match command {
        ClientCommand::Add {
            name,
            role,
            owner,
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
