//! Running the service: open keys, vault and clients, serve gRPC (with
//! health and reflection) until told to stop, then drain and flush.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::api::admin::AdminApi;
use crate::api::auth::Authenticator;
use crate::api::cards::CardApi;
use crate::api::limiter::FailureLimiter;
use crate::api::pb::admin_service_server::AdminServiceServer;
use crate::api::pb::authorization_service_server::AuthorizationServiceServer;
use crate::api::pb::card_service_server::CardServiceServer;
use crate::api::switch::SwitchApi;
use crate::clients::{ClientsError, Registry, Role};
use crate::config::{Config, ConfigError};
use crate::installation;
use crate::vault::crypto::Keyring;
use crate::vault::keyfile::{self, KeyFileError};
use crate::vault::postgres_store::PostgresStore;
use crate::vault::{system_clock, Store, StoreError, Vault, VaultError};

/// How often the health check asks the storage engine whether it serves.
const PROBE_EVERY: Duration = Duration::from_millis(1000);
/// How often cards are counted by state for metrics (a scan of the cards).
const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// Why the service could not start (or stopped with an error). Each says
/// what is wrong and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keys(#[from] KeyFileError),
    #[error("master key missing for an existing vault: {0}. The data in {1} can only be read with the key it was written with; restore that key")]
    KeyLostForVault(KeyFileError, String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Clients(#[from] ClientsError),
    #[error(transparent)]
    Installation(#[from] crate::installation::InstallationError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Webhook(#[from] crate::webhooks::WebhookError),
}

/// The TLS settings of `config`, files read now (so a missing or bad file
/// stops the start, naming it).
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, StartError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |what: &str, p: &Path| {
        std::fs::read(p).map_err(|e| StartError::Tls(format!("{what} {}: {e}", p.display())))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("tls_cert", cert)?,
        read("tls_key", key)?,
    ));
    if let Some(ca) = &config.tls_client_ca {
        // Clients without a certificate may still use an API key.
        tls = tls
            .client_ca_root(Certificate::from_pem(read("tls_client_ca", ca)?))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// Whether `dir` already holds data (an existing installation).
fn has_data(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Loads the master key, or creates a development one on a fresh
/// installation when the configuration allows it. `existing` tells whether
/// the vault (described by `vault`) already holds data.
fn load_keys(config: &Config, existing: bool, vault: String) -> Result<Keyring, StartError> {
    match keyfile::load_all(&config.keys_dir) {
        Ok(masters) => Keyring::from_masters(&masters).ok_or_else(|| {
            StartError::Keys(KeyFileError::Missing {
                path: keyfile::master_key_path(&config.keys_dir),
                dir: config.keys_dir.display().to_string(),
            })
        }),
        Err(e @ KeyFileError::Missing { .. }) => {
            if existing {
                return Err(StartError::KeyLostForVault(e, vault));
            }
            if !config.dev_keys {
                return Err(e.into());
            }
            let path = keyfile::generate(&config.keys_dir)?;
            eprintln!(
                "vcn: no master key found; created a DEVELOPMENT master key at {} (mode 0600). \
                 For production, generate keys with `vcn keygen` and set dev_keys = false.",
                path.display()
            );
            Ok(Keyring::single(&keyfile::load(&config.keys_dir)?))
        }
        Err(e) => Err(e.into()),
    }
}

/// Loads every key version in `keys_dir` (a re-read for a rotation).
pub fn load_keyring(keys_dir: &Path) -> Result<Keyring, StartError> {
    let masters = keyfile::load_all(keys_dir)?;
    Keyring::from_masters(&masters).ok_or_else(|| {
        StartError::Keys(KeyFileError::Missing {
            path: keyfile::master_key_path(keys_dir),
            dir: keys_dir.display().to_string(),
        })
    })
}

/// Re-reads the keys directory into the running vault (what SIGHUP does):
/// a new version found there becomes the current one for new records,
/// and the records of older versions are re-encrypted in the background.
/// A keyring whose check values do not match the vault's is refused and
/// the old one stays in force.
pub async fn reload_keys(vault: &Arc<Vault>, keys_dir: &Path) -> Result<(), StartError> {
    let keys = load_keyring(keys_dir)?;
    vault.reload_keys(Arc::new(keys)).await?;
    spawn_reencrypt(vault.clone());
    Ok(())
}

/// Moves the records of older key versions to the current one, in the
/// background, when more than one version is loaded.
pub fn spawn_reencrypt(vault: Arc<Vault>) {
    if vault.keys().versions().count() < 2 {
        return;
    }
    tokio::spawn(async move {
        match vault.reencrypt_all().await {
            Ok(r) => tracing::info!(
                cards = r.cards,
                moved = r.moved,
                "background re-encryption finished"
            ),
            Err(e) => tracing::error!(error = %e, "background re-encryption failed"),
        }
    });
}

/// Opens the vault of `config` (its keys and store), as the server and
/// the offline key commands do. An empty store on an installation that
/// had a vault is refused (see [`crate::installation`]).
pub async fn open_vault(
    config: &Config,
    wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
) -> Result<Vault, StartError> {
    let vault_config = config.vault()?;
    let (keys, store, existing, describe) = match &config.store {
        None => {
            // Check the key and the installation before the engine creates
            // the data directory.
            let recorded = installation::recorded(&config.keys_dir)?;
            let existing = has_data(&config.data_dir);
            let describe = config.data_dir.display().to_string();
            installation::check(recorded, &describe, existing, config.new_vault)?;
            let keys = load_keys(config, existing, describe.clone())?;
            (keys, open_store(config).await?, existing, describe)
        }
        Some(url) => {
            let store = open_store(config).await?;
            // The marker first, then the store (see `installation::Recorded`).
            let recorded = installation::recorded(&config.keys_dir)?;
            let existing = crate::vault::store_has_vault(store.as_ref()).await?;
            installation::check(recorded, &url.describe(), existing, config.new_vault)?;
            (
                load_keys(config, existing, url.describe())?,
                store,
                existing,
                url.describe(),
            )
        }
    };
    let check_value = keys.current().check_value().to_string();
    let store: Arc<dyn Store> = Arc::new(crate::metrics::Metered(wrap(store)));
    let vault = Vault::open(store, Arc::new(keys), vault_config, system_clock()).await?;
    if !existing {
        installation::record(&config.keys_dir, &describe, &check_value)?;
    }
    Ok(vault)
}

/// Where the running server's audit entries written on their own wait to
/// be sealed (see [`crate::audit::journal`]): with the embedded engine, in
/// the data directory beside the vault, so a full data disk refuses them
/// as it refuses the vault's writes, under the same margin; with
/// PostgreSQL, beside this instance's audit log. (Offline commands write
/// their entries to the store, for whichever server seals them.)
pub fn audit_journal(config: &Config) -> crate::audit::JournalConfig {
    let journal = match &config.store {
        None => crate::audit::JournalConfig::new(&config.data_dir, "audit-pending"),
        Some(_) => {
            let log = config.audit_path();
            let dir = log
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            let stem = log.file_stem().and_then(|s| s.to_str()).unwrap_or("audit");
            crate::audit::JournalConfig::new(dir, format!("{stem}-pending"))
        }
    };
    crate::audit::JournalConfig {
        commit_delay: config.embedded().commit_delay,
        ..journal
    }
}

/// Opens the configured storage engine: the embedded store in `data_dir`
/// (on the engine it was made with, or `engine` for a new one), or the
/// PostgreSQL database of `store` (its schema brought up to date).
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    Ok(match &config.store {
        None => crate::vault::embedded::open(&config.data_dir, config.engine, &config.embedded())?,
        Some(url) => {
            let store = PostgresStore::open(url.expose(), &config.postgres()).await?;
            tracing::info!(store = store.describe(), "vault in PostgreSQL");
            Arc::new(store)
        }
    })
}

/// Runs the retention pass every `every` (see [`crate::vault::purge`]).
async fn purge_periodically(vault: Arc<Vault>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = vault.purge(time::OffsetDateTime::now_utc()).await {
            tracing::error!(error = %e, "the retention pass failed; it will run again");
        }
    }
}

/// How often pending audit entries are chained into the log file.
const AUDIT_SEAL_EVERY: Duration = Duration::from_millis(200);

/// Writes the refused calls the interceptors hand over, in batches. When
/// `stop` fires it writes what is queued and ends.
async fn audit_refusals(
    vault: Arc<Vault>,
    mut rx: tokio::sync::mpsc::Receiver<(crate::audit::Actor, crate::audit::Event)>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    tokio::pin!(stop);
    let mut stopping = false;
    loop {
        let first = if stopping {
            match rx.try_recv() {
                Ok(e) => e,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
                _ = &mut stop => {
                    stopping = true;
                    continue;
                }
            }
        };
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if let Err(e) = vault.record_batch(&batch).await {
            tracing::error!(error = %e, refused = batch.len(), "refused calls could not be audited");
        }
    }
}

/// Keeps the health service in step with the storage engine: NOT_SERVING
/// while it cannot be reached, SERVING again once it can.
async fn watch_store(vault: Arc<Vault>, health: tonic_health::server::HealthReporter) {
    let mut serving = true;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let result = vault.ping().await;
        if result.is_ok() == serving {
            continue;
        }
        serving = result.is_ok();
        let status = match &result {
            Ok(()) => {
                tracing::info!("the vault's storage is reachable again: serving");
                tonic_health::ServingStatus::Serving
            }
            Err(e) => {
                tracing::error!(error = %e, "the vault's storage is unreachable: not serving");
                tonic_health::ServingStatus::NotServing
            }
        };
        set_health(&health, status).await;
    }
}

async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    health
        .set_service_status(
            <CardServiceServer<CardApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <AuthorizationServiceServer<SwitchApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health.set_service_status("", status).await;
}

/// The opened service, ready to serve.
pub struct Service {
    /// The vault every handler shares.
    pub vault: Arc<Vault>,
    /// Registered clients, reloaded when the clients file changes.
    pub registry: Arc<Registry>,
    /// The limits and drain settings of the configuration.
    limits: Limits,
    /// Where Prometheus metrics are served over HTTP, if anywhere.
    metrics_listen: Option<std::net::SocketAddr>,
    /// Chains the vault's pending audit entries into the audit log.
    pub audit: Arc<crate::audit::Sealer>,
    /// TLS (and mTLS) on the port, when configured.
    tls: Option<ServerTlsConfig>,
    /// Where card events are POSTed, each by its own task.
    webhooks: Vec<crate::webhooks::Hook>,
    /// gRPC-Web for browsers (a pass-through when off).
    web: crate::web::WebLayer,
}

/// What bounds the server's work (see the fields of [`Config`]).
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_message_bytes: usize,
    request_timeout: Duration,
    per_connection: usize,
    overall: usize,
    drain_grace: Duration,
    drain_timeout: Duration,
    /// How often the retention pass runs (None: never).
    purge_every: Option<Duration>,
    failed_lookups: u32,
    failed_auth: u32,
}

impl Limits {
    fn of(c: &Config) -> Limits {
        Limits {
            max_message_bytes: c.max_message_bytes,
            request_timeout: Duration::from_millis(c.request_timeout_ms),
            per_connection: c.max_concurrent_per_connection,
            overall: c.max_concurrent_requests,
            drain_grace: Duration::from_millis(c.drain_grace_ms),
            drain_timeout: Duration::from_millis(c.drain_timeout_ms),
            purge_every: c.purge_every(),
            failed_lookups: c.max_failed_lookups_per_minute,
            failed_auth: c.max_failed_auth_per_minute,
        }
    }
}

impl Service {
    pub async fn open(config: &Config) -> Result<Service, StartError> {
        Self::open_with(config, |store| store).await
    }

    /// Opens the service with its store wrapped by `wrap` (fault injection
    /// in tests: see [`crate::vault::chaos`]).
    pub async fn open_with(
        config: &Config,
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> Result<Service, StartError> {
        let tls = tls_config(config)?;
        let web = crate::web::WebLayer::new(&config.grpc_web)?;
        // Settings are checked before the vault is opened, so a bad one
        // stops the start without touching data.
        let webhooks = config
            .webhooks
            .iter()
            .map(|c| crate::webhooks::Hook::open(c, &config.keys_dir))
            .collect::<Result<Vec<_>, _>>()?;
        let mut vault = open_vault(config, wrap).await?;
        let audit = crate::audit::Sealer::open(
            vault.store(),
            &config.keys_dir,
            &config.audit_path(),
            &config.instance_name,
            Some(audit_journal(config)),
        )
        .await?;
        if let Some(journal) = audit.journal() {
            vault.set_audit_journal(journal);
        }
        let registry = Registry::open(&config.keys_dir)?;
        if registry.is_empty() {
            tracing::warn!(
                "no API clients registered yet: add one with `vcn client add NAME --role cards|switch|admin`"
            );
        }
        Ok(Service {
            vault: Arc::new(vault),
            registry: Arc::new(registry),
            limits: Limits::of(config),
            metrics_listen: config.metrics_listen,
            audit: Arc::new(audit),
            tls,
            webhooks,
            web,
        })
    }

    /// Serves on `listener` until `shutdown` completes. Then it drains:
    /// health turns NOT_SERVING while calls are still taken for
    /// `drain_grace_ms`, then it stops taking calls, gives those in flight
    /// up to `drain_timeout_ms`, and makes the vault durable.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let addr = listener.local_addr().ok();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<CardServiceServer<CardApi>>().await;
        health
            .set_serving::<AuthorizationServiceServer<SwitchApi>>()
            .await;

        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        // Refused calls are audited by a task (the interceptor is sync).
        let (refusals, refused) = tokio::sync::mpsc::channel(4096);
        let (stop_auditor, auditor_stop) = tokio::sync::oneshot::channel();
        let auditor = tokio::spawn(audit_refusals(self.vault.clone(), refused, auditor_stop));
        let sealer = tokio::spawn(self.audit.clone().run(AUDIT_SEAL_EVERY));
        let (stop_hooks, hooks_stop) = tokio::sync::watch::channel(false);
        let hooks: Vec<_> = std::mem::take(&mut self.webhooks)
            .into_iter()
            .map(|h| {
                tokio::spawn(crate::webhooks::run(
                    self.vault.clone(),
                    h,
                    hooks_stop.clone(),
                ))
            })
            .collect();
        let peers = Arc::new(FailureLimiter::new(self.limits.failed_auth));
        const ANY: &[Role] = &[Role::Cards, Role::Switch, Role::Admin];
        let reflection = InterceptedService::new(
            reflection,
            Authenticator::new(self.registry.clone(), "ServerReflection", ANY)
                .with_audit(refusals.clone())
                .with_peer_limit(peers.clone()),
        );

        let limits = self.limits;
        let max = limits.max_message_bytes;
        let cards = InterceptedService::new(
            CardServiceServer::new(CardApi::new(self.vault.clone())).max_decoding_message_size(max),
            Authenticator::new(
                self.registry.clone(),
                "CardService",
                &[Role::Cards, Role::Admin],
            )
            .with_audit(refusals.clone())
            .with_peer_limit(peers.clone()),
        );
        let admin = InterceptedService::new(
            AdminServiceServer::new(AdminApi::new(self.vault.clone()))
                .max_decoding_message_size(max),
            Authenticator::new(self.registry.clone(), "AdminService", &[Role::Admin])
                .with_audit(refusals.clone())
                .with_peer_limit(peers.clone()),
        );
        let switch = InterceptedService::new(
            AuthorizationServiceServer::new(
                SwitchApi::new(self.vault.clone())
                    .with_lookup_limit(Arc::new(FailureLimiter::new(limits.failed_lookups))),
            )
            .max_decoding_message_size(max),
            Authenticator::new(
                self.registry.clone(),
                "AuthorizationService",
                &[Role::Switch],
            )
            .with_audit(refusals)
            .with_peer_limit(peers),
        );

        // The vault's gauges are sampled only where they are served: the
        // card count reads every card record, which on a large vault is
        // seconds of CPU and a sweep of the engine's cache, for no reader.
        let (metrics_server, sampler) = match self.metrics_listen {
            Some(at) => {
                let listener = crate::metrics::bind(at)
                    .await
                    .map_err(|source| StartError::Listen { addr: at, source })?;
                (
                    Some(tokio::spawn(crate::metrics::serve(listener))),
                    Some(tokio::spawn(crate::metrics::sample_vault(
                        self.vault.clone(),
                        SAMPLE_EVERY,
                    ))),
                )
            }
            None => (None, None),
        };
        if let Some(addr) = addr {
            tracing::info!(%addr, "vcn serving gRPC");
        }
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(watch_store(self.vault.clone(), health.clone()));
        let purger = limits
            .purge_every
            .map(|every| tokio::spawn(purge_periodically(self.vault.clone(), every)));
        // Records left on an older key version (a rotation before a
        // restart) move to the current one while serving.
        spawn_reencrypt(self.vault.clone());
        let stop_watching = watcher.abort_handle();
        let drain = {
            let health = health.clone();
            let vault = self.vault.clone();
            async move {
                shutdown.await;
                tracing::info!(grace = ?limits.drain_grace, "shutting down: health is NOT_SERVING, still taking calls");
                // Event streams never finish on their own: end them now
                // (UNAVAILABLE; clients reconnect with their last cursor).
                vault.events().stop();
                stop_watching.abort();
                set_health(&health, tonic_health::ServingStatus::NotServing).await;
                tokio::time::sleep(limits.drain_grace).await;
                tracing::info!("no longer taking calls; draining calls in flight");
                let _ = draining_tx.send(());
            }
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls.clone() {
            builder = builder
                .tls_config(tls)
                .map_err(|e| StartError::Tls(e.to_string()))?;
        }
        let served = builder
            .concurrency_limit_per_connection(limits.per_connection)
            .load_shed(true)
            .accept_http1(self.web.enabled())
            .layer(self.web.clone())
            .layer(crate::observe::ObserveLayer)
            .layer(tower::util::MapResponseLayer::new(standard_status_codes))
            .layer(tower::load_shed::LoadShedLayer::new())
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                limits.overall,
            ))
            .layer(crate::deadline::DeadlineLayer {
                max: limits.request_timeout,
            })
            .add_service(health_service)
            .add_service(reflection)
            .add_service(cards)
            .add_service(switch)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, drain);
        tokio::pin!(served);
        let bound = async {
            if draining_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(limits.drain_timeout).await;
        };
        let served = tokio::select! {
            r = &mut served => r,
            () = bound => {
                tracing::warn!(timeout = ?limits.drain_timeout, "calls still in flight after the drain timeout: stopping anyway");
                Ok(())
            }
        };
        watcher.abort();
        if let Some(p) = &purger {
            p.abort();
        }
        if let Some(s) = sampler {
            s.abort();
        }
        if let Some(m) = metrics_server {
            m.abort();
        }
        sealer.abort();
        // A POST in flight is cut off; its event is sent again at the next
        // start (same webhook-id).
        let _ = stop_hooks.send(true);
        for h in hooks {
            h.abort();
        }
        let _ = stop_auditor.send(());
        let _ = auditor.await;
        // Whatever happened, make what was written durable before exiting,
        // and seal what the audit log still lacks.
        let synced = self.vault.sync().await;
        if let Err(e) = self.audit.seal_all().await {
            tracing::error!(error = %e, "audit entries left unsealed: they are sealed at the next start");
        }
        served?;
        synced?;
        tracing::info!("vcn stopped");
        Ok(())
    }
}

/// A request message over the size limit is OUT_OF_RANGE in tonic, where
/// gRPC's convention (grpc-go, grpc-java, and what clients classify for
/// retries) is RESOURCE_EXHAUSTED. Rewrite that case only.
fn standard_status_codes<B>(mut res: http::Response<B>) -> http::Response<B> {
    let headers = res.headers_mut();
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .unwrap_or_default();
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let rewrite = match code {
        "11" if message.contains("message length too large") => Some("8"),
        _ => None,
    };
    if let Some(new) = rewrite {
        headers.insert("grpc-status", http::HeaderValue::from_static(new));
    }
    res
}

/// Binds the configured address and serves until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), StartError> {
    let service = Service::open(&config).await?;
    tokio::spawn(reload_on_sighup(
        service.vault.clone(),
        config.keys_dir.clone(),
    ));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    service.serve(listener, shutdown_signal()).await
}

/// Reloads the keys directory on every SIGHUP (key rotation without a
/// restart).
async fn reload_on_sighup(vault: Arc<Vault>, keys_dir: std::path::PathBuf) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP: key reload needs a restart");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the keys directory");
        if let Err(e) = reload_keys(&vault, &keys_dir).await {
            tracing::error!(error = %e, "keys not reloaded; the keys in force stay");
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
