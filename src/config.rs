//! The service's configuration: a TOML file (`--config`), overridden by
//! command-line flags. Every setting has a default, so `vcn serve` runs with
//! no file at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::card::PolicyBounds;
use crate::domain::number::NumberPlan;
use crate::vault::embedded::{EngineKind, EngineOptions};
use crate::vault::postgres_store::{describe_url, PostgresOptions};
use crate::vault::VaultConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Start a new, empty vault even though this keys directory has served
    /// one before (see [`crate::installation`]). A flag, not a file setting.
    #[serde(skip)]
    pub new_vault: bool,
    /// Where the vault keeps its data with the embedded store.
    pub data_dir: PathBuf,
    /// The embedded store's engine for a new data directory: "fjall3" (the
    /// default), "fjall" (fjall 2) or "sled". A directory that holds a vault
    /// keeps the engine it was made with (recorded in it), whatever this
    /// says.
    pub engine: EngineKind,
    /// The storage engine: unset for the embedded one (in `data_dir`), or
    /// a PostgreSQL URL (`postgres://user:password@host:port/db`) shared by
    /// several instances.
    pub store: Option<StoreUrl>,
    /// Connections to PostgreSQL each instance keeps at most.
    pub postgres_pool_size: usize,
    /// Bound on connecting to PostgreSQL and on each of its round trips, in
    /// milliseconds: past it a call fails with UNAVAILABLE.
    pub postgres_timeout_ms: u64,
    /// Where the master key and the clients file live.
    pub keys_dir: PathBuf,
    /// Create a development master key when none exists and the data
    /// directory is new. Set false in production: a missing key then stops
    /// the server instead.
    pub dev_keys: bool,
    /// Digits of the funding card kept at the front of a virtual number: 6 or 8.
    pub bin_length: usize,
    /// Digits placed after the BIN in every virtual number, to keep them out
    /// of the bank's real card ranges ("" for none, at most 6 digits).
    pub range_prefix: String,
    /// Validity of a card issued without valid_until.
    pub default_validity_days: i64,
    /// Furthest valid_until a card may be given.
    pub max_validity_days: i64,
    /// Wrong CVVs or expiries in a row that block a card.
    pub max_failed_verifications: u32,
    /// How long a closed, used or expired card stays detokenisable (so late
    /// refunds and chargebacks still map) before it is purged (13 months).
    pub retention_days: i64,
    /// How long a purged card's number stays reserved before it may be
    /// issued again (13 months).
    pub quarantine_days: i64,
    /// How often the retention pass runs, in minutes (0: never).
    pub purge_every_minutes: u64,
    /// Retention and quarantine both this long, and the retention pass four
    /// times as often, instead of the day and minute settings above: time
    /// compressed for the load tool's lifecycle soak (`vcn bench
    /// --retention`). Not a file setting.
    #[serde(skip)]
    pub compressed_retention: Option<std::time::Duration>,
    /// The embedded engine's cache, in MiB: bounds the server's memory.
    pub cache_capacity_mib: u64,
    /// While writes arrive together, how long (in microseconds) the
    /// embedded store and the audit journal let a commit round gather more
    /// before making it durable: fewer, fuller rounds cost less CPU per
    /// write, at up to this much added latency. A lone write never waits.
    /// 0: no wait.
    pub commit_delay_us: u64,
    /// Threads that run requests (the async runtime's workers); 0: one per
    /// core. The embedded store reads on these threads, so a read that
    /// misses the page cache holds one while the disk answers: where the
    /// vault is larger than what the page cache keeps, more threads than
    /// cores keep the disk busy and the other calls moving (BENCHMARKS.md,
    /// session 11: with 8 on 2 cores, a 10 M-card vault's Detokenize p50
    /// was 1.24x its empty-vault figure in one run and 2.74x in another,
    /// where compactions took the CPU; 2 threads gave 2.93x, and 4.32x on
    /// session 12's day). At most [`MAX_WORKER_THREADS`].
    pub worker_threads: usize,
    /// Largest request message accepted, in bytes (RESOURCE_EXHAUSTED past it).
    pub max_message_bytes: usize,
    /// Longest a call may take, in milliseconds (DEADLINE_EXCEEDED past it;
    /// a shorter client deadline wins).
    pub request_timeout_ms: u64,
    /// Calls in flight on one connection; more are refused at once with
    /// RESOURCE_EXHAUSTED, so one noisy client cannot starve the others.
    pub max_concurrent_per_connection: usize,
    /// Calls in flight over all connections; more are refused with
    /// RESOURCE_EXHAUSTED instead of queueing without bound.
    pub max_concurrent_requests: usize,
    /// On SIGTERM: how long health reports NOT_SERVING while calls are still
    /// taken, so load balancers can move traffic away first.
    pub drain_grace_ms: u64,
    /// Then: how long calls in flight get to finish before the server stops.
    pub drain_timeout_ms: u64,
    /// Where Prometheus metrics are served over plain HTTP
    /// (`GET /metrics`), e.g. "127.0.0.1:9464". Unset: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Log lines as "text" (for people) or "json" (one object per line, for
    /// collectors). RUST_LOG picks the level (default info).
    pub log_format: LogFormat,
    /// The append-only audit log (JSON lines, HMAC-chained). Default:
    /// `audit.log` beside the data directory.
    pub audit_log: Option<PathBuf>,
    /// Failed lookups (unknown numbers, wrong CVVs or expiries, unknown
    /// numbers to Detokenize) one client may make per minute; past it the
    /// client's switch calls are refused (RESOURCE_EXHAUSTED) until the
    /// minute is over, and logged and audited.
    pub max_failed_lookups_per_minute: u32,
    /// Failed authentications (missing or unknown API key) one address may
    /// make per minute; past it every call from that address is refused
    /// until the minute is over.
    pub max_failed_auth_per_minute: u32,
    /// TLS on the gRPC port: the server's certificate chain and private
    /// key (PEM). Both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A CA (PEM) whose client certificates are accepted (mTLS). A client
    /// presenting a certificate registered with `vcn client add --cert`
    /// needs no API key. Needs tls_cert and tls_key.
    pub tls_client_ca: Option<PathBuf>,
    /// Allow plain-text gRPC on an address other than loopback. Off: such
    /// a configuration is refused (API keys and card numbers would cross
    /// the network in clear).
    pub allow_plaintext: bool,
    /// This instance's name in the audit log. Instances sharing one
    /// PostgreSQL database need distinct names (each seals its own entries
    /// into its own log).
    pub instance_name: String,
    /// Card events POSTed to the bank's web app, signed (Standard
    /// Webhooks): `[[webhooks]]` tables with name, url and optionally
    /// secret_file, owners and timeout_ms. See [`crate::webhooks`].
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// gRPC-Web for browsers (`[grpc_web]`): off unless enabled.
    pub grpc_web: GrpcWebConfig,
}

/// `[grpc_web]`: lets browsers call the services directly over gRPC-Web
/// (HTTP/1.1 or HTTP/2), with CORS answered for the listed origins only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcWebConfig {
    /// Serve gRPC-Web (and accept HTTP/1.1) beside native gRPC.
    pub enabled: bool,
    /// Origins whose pages may call (`scheme://host[:port]`, exactly as a
    /// browser sends them, e.g. "https://bank.example"). A request from any
    /// other origin is refused and gets no CORS headers.
    pub allowed_origins: Vec<String>,
}

impl GrpcWebConfig {
    /// Each allowed origin, checked and in lower case.
    pub fn origins(&self) -> Result<Vec<String>, ConfigError> {
        if self.enabled && self.allowed_origins.is_empty() {
            return Err(ConfigError::Invalid(
                "grpc_web.allowed_origins: list the origins of the web banking pages (e.g. [\"https://bank.example\"]) when grpc_web.enabled is true".into(),
            ));
        }
        self.allowed_origins
            .iter()
            .map(|o| check_origin(o))
            .collect()
    }
}

/// An origin as browsers send it: http or https, a host, an optional port,
/// nothing else (no path, no trailing slash, no wildcard).
fn check_origin(origin: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| {
        ConfigError::Invalid(format!(
            "grpc_web.allowed_origins: {origin:?} {why}; write scheme://host[:port], e.g. \"https://bank.example\""
        ))
    };
    let lower = origin.to_ascii_lowercase();
    let uri: http::Uri = lower.parse().map_err(|_| bad("is not an origin"))?;
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "http" && scheme != "https" {
        return Err(bad("needs the scheme http:// or https://"));
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("has no host"));
    };
    if authority.as_str().contains(['@', '*']) || format!("{scheme}://{authority}") != lower {
        return Err(bad("must be only scheme, host and port"));
    }
    Ok(lower)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            new_vault: false,
            data_dir: PathBuf::from("data"),
            engine: EngineKind::default(),
            store: None,
            postgres_pool_size: 16,
            postgres_timeout_ms: 5000,
            keys_dir: PathBuf::from("keys"),
            dev_keys: true,
            bin_length: 6,
            range_prefix: String::new(),
            default_validity_days: 30,
            max_validity_days: 5 * 366,
            max_failed_verifications: 3,
            retention_days: 396,
            quarantine_days: 396,
            purge_every_minutes: 60,
            compressed_retention: None,
            cache_capacity_mib: 256,
            commit_delay_us: crate::vault::gather::DEFAULT_COMMIT_DELAY.as_micros() as u64,
            worker_threads: 0,
            max_message_bytes: 64 * 1024,
            request_timeout_ms: 10_000,
            max_concurrent_per_connection: 256,
            max_concurrent_requests: 2048,
            drain_grace_ms: 500,
            drain_timeout_ms: 10_000,
            metrics_listen: None,
            log_format: LogFormat::Text,
            audit_log: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            allow_plaintext: false,
            max_failed_lookups_per_minute: 120,
            max_failed_auth_per_minute: 30,
            instance_name: "vcn".into(),
            webhooks: Vec::new(),
            grpc_web: GrpcWebConfig::default(),
        }
    }
}

/// A database URL. It may carry a password, so it is never shown: `Debug`
/// and [`StoreUrl::describe`] name host, port, database and user only.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct StoreUrl(String);

impl StoreUrl {
    pub fn new(url: impl Into<String>) -> StoreUrl {
        StoreUrl(url.into())
    }

    /// The URL itself, to connect with.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Where it points, without the password.
    pub fn describe(&self) -> String {
        describe_url(&self.0)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let scheme_ok = self.0.starts_with("postgres://") || self.0.starts_with("postgresql://");
        if !scheme_ok || self.0.parse::<tokio_postgres::Config>().is_err() {
            return Err(ConfigError::Invalid(
                "store must be a PostgreSQL URL (postgres://user:password@host:port/database), or unset for the embedded engine".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreUrl({})", self.describe())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.vault()?;
        config.grpc_web.origins()?;
        Ok(config)
    }

    /// The vault's settings, checked.
    pub fn vault(&self) -> Result<VaultConfig, ConfigError> {
        let plan = NumberPlan::new(self.bin_length, &self.range_prefix)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.default_validity_days < 1 || self.max_validity_days < self.default_validity_days {
            return Err(ConfigError::Invalid(
                "default_validity_days must be at least 1 and at most max_validity_days".into(),
            ));
        }
        if self.max_concurrent_per_connection == 0
            || self.max_concurrent_requests == 0
            || self.request_timeout_ms == 0
        {
            return Err(ConfigError::Invalid(
                "max_concurrent_per_connection, max_concurrent_requests and request_timeout_ms must be above 0".into(),
            ));
        }
        if let Some(url) = &self.store {
            url.check()?;
        }
        if self.postgres_pool_size == 0 || self.postgres_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "postgres_pool_size and postgres_timeout_ms must be at least 1".into(),
            ));
        }
        if self.retention_days < 1 || self.quarantine_days < 0 {
            return Err(ConfigError::Invalid(
                "retention_days must be at least 1 and quarantine_days at least 0".into(),
            ));
        }
        if self.commit_delay_us > MAX_COMMIT_DELAY_US {
            return Err(ConfigError::Invalid(format!(
                "commit_delay_us must be at most {MAX_COMMIT_DELAY_US} (it adds up to that much to every write under load)"
            )));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::Invalid(format!(
                "worker_threads must be at most {MAX_WORKER_THREADS} (0: one per core)"
            )));
        }
        if self.max_failed_verifications == 0 {
            return Err(ConfigError::Invalid(
                "max_failed_verifications must be at least 1".into(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key go together: give both, or neither for plain text".into(),
            ));
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError::Invalid(
                "tls_client_ca needs tls_cert and tls_key (mTLS is TLS with client certificates)"
                    .into(),
            ));
        }
        if self.tls_cert.is_none() && !self.listen.ip().is_loopback() && !self.allow_plaintext {
            return Err(ConfigError::Invalid(format!(
                "listen = {} is not a loopback address and TLS is off: set tls_cert and tls_key, or allow_plaintext = true if a TLS proxy or a private network protects it",
                self.listen
            )));
        }
        if self.max_failed_lookups_per_minute == 0 || self.max_failed_auth_per_minute == 0 {
            return Err(ConfigError::Invalid(
                "max_failed_lookups_per_minute and max_failed_auth_per_minute must be at least 1"
                    .into(),
            ));
        }
        let name_ok = !self.instance_name.is_empty()
            && self.instance_name.len() <= 64
            && self
                .instance_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Err(ConfigError::Invalid(
                "instance_name must be 1 to 64 letters, digits, '.', '_' or '-'".into(),
            ));
        }
        Ok(VaultConfig {
            plan,
            bounds: PolicyBounds {
                default_validity: time::Duration::days(self.default_validity_days),
                max_validity: time::Duration::days(self.max_validity_days),
            },
            max_failed_verifications: self.max_failed_verifications,
            retention: self.retention(),
            quarantine: self
                .compressed_retention
                .map_or(time::Duration::days(self.quarantine_days), seconds),
            audit_instance: self.instance_name.clone(),
        })
    }

    /// How long ended cards, transactions and events are kept.
    pub fn retention(&self) -> time::Duration {
        self.compressed_retention
            .map_or(time::Duration::days(self.retention_days), seconds)
    }

    /// How often the retention pass runs (None: never).
    pub fn purge_every(&self) -> Option<std::time::Duration> {
        match self.compressed_retention {
            Some(r) => Some((r / 4).max(std::time::Duration::from_secs(1))),
            None => (self.purge_every_minutes > 0)
                .then(|| std::time::Duration::from_secs(self.purge_every_minutes * 60)),
        }
    }

    /// Where the audit log is written.
    pub fn audit_path(&self) -> PathBuf {
        match &self.audit_log {
            Some(p) => p.clone(),
            None => self.data_dir.with_file_name("audit.log"),
        }
    }

    pub fn postgres(&self) -> PostgresOptions {
        PostgresOptions {
            pool_size: self.postgres_pool_size,
            timeout: std::time::Duration::from_millis(self.postgres_timeout_ms),
            ..PostgresOptions::default()
        }
    }

    /// The embedded store's settings.
    pub fn embedded(&self) -> EngineOptions {
        EngineOptions {
            cache_capacity: self.cache_capacity_mib * 1024 * 1024,
            commit_delay: std::time::Duration::from_micros(self.commit_delay_us),
        }
    }

    /// A builder of the multi-threaded runtime the server runs on, with
    /// `worker_threads` workers (tokio's default, one per core, for 0);
    /// callers may name its threads before building it.
    pub fn runtime(&self) -> tokio::runtime::Builder {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.enable_all();
        if self.worker_threads > 0 {
            b.worker_threads(self.worker_threads);
        }
        b
    }
}

/// Longest commit delay accepted: 100 ms.
pub const MAX_COMMIT_DELAY_US: u64 = 100_000;

/// The most request threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

fn seconds(d: std::time::Duration) -> time::Duration {
    time::Duration::seconds(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` as a configuration file (written to a temporary
    /// `vcn.toml`, read back by [`Config::load`]).
    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vcn.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn defaults_are_valid_and_files_override_them() {
        assert!(Config::default().vault().is_ok());
        let c =
            load("bin_length = 8\nrange_prefix = \"9\"\nlisten = \"127.0.0.1:6000\"\n").unwrap();
        assert_eq!(
            (c.bin_length, c.range_prefix.as_str(), c.listen.port()),
            (8, "9", 6000)
        );
        assert_eq!(c.max_failed_verifications, 3);
    }

    #[test]
    fn the_commit_delay_reaches_the_store_and_is_bounded() {
        let c = load("commit_delay_us = 250\n").unwrap();
        assert_eq!(
            c.embedded().commit_delay,
            std::time::Duration::from_micros(250)
        );
        let e = load("commit_delay_us = 100001\n").unwrap_err().to_string();
        assert!(e.contains("commit_delay_us must be at most 100000"), "{e}");
    }

    #[test]
    fn worker_threads_reach_the_runtime_and_are_bounded() {
        let c = load("worker_threads = 3\n").unwrap();
        let rt = c.runtime().build().unwrap();
        assert_eq!(rt.metrics().num_workers(), 3);
        let cores = Config::default().runtime().build().unwrap();
        let cores = cores.metrics().num_workers();
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(cores, available, "0: one per core");
        let e = load("worker_threads = 1025\n").unwrap_err().to_string();
        assert!(e.contains("worker_threads must be at most 1024"), "{e}");
    }

    #[test]
    fn a_store_url_is_checked_and_never_shown() {
        let c =
            load("store = \"postgres://vcn:hunter2@127.0.0.1:5432/vcn\"\npostgres_pool_size = 4\n")
                .unwrap();
        assert_eq!(
            c.store.as_ref().map(StoreUrl::expose),
            Some("postgres://vcn:hunter2@127.0.0.1:5432/vcn")
        );
        assert_eq!(c.postgres().pool_size, 4);
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("127.0.0.1:5432"), "{shown}");
        let e = load("store = \"mysql://x@y/z\"\n").unwrap_err().to_string();
        assert!(e.contains("PostgreSQL URL"), "{e}");
    }

    #[test]
    fn grpc_web_is_off_by_default_and_its_origins_are_checked() {
        assert!(!Config::default().grpc_web.enabled);
        let c = load("[grpc_web]\nenabled = true\nallowed_origins = [\"http://localhost:5173\", \"https://Bank.example\"]\n").unwrap();
        assert!(c.grpc_web.enabled);
        assert_eq!(
            c.grpc_web.origins().unwrap(),
            ["http://localhost:5173", "https://bank.example"]
        );
        for (text, says) in [
            ("enabled = true\n", "grpc_web.allowed_origins: list"),
            ("allowed_origins = [\"*\"]\n", "\"*\""),
            (
                "allowed_origins = [\"https://bank.example/\"]\n",
                "only scheme",
            ),
            (
                "allowed_origins = [\"https://bank.example/app\"]\n",
                "only scheme",
            ),
            ("allowed_origins = [\"bank.example\"]\n", "bank.example"),
            (
                "allowed_origins = [\"ftp://bank.example\"]\n",
                "http:// or https://",
            ),
            ("allowd_origins = []\n", "allowd_origins"),
        ] {
            let e = load(&format!("[grpc_web]\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(load("bin_length = 7\n")
            .unwrap_err()
            .to_string()
            .contains("bin_length"));
        assert!(load("bin_lenght = 6\n")
            .unwrap_err()
            .to_string()
            .contains("bin_lenght"));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Config::load(&dir.path().join("none.toml")),
            Err(ConfigError::Read { .. })
        ));
    }
}
