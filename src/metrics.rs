//! Prometheus metrics, served as text on their own HTTP port
//! (`metrics_listen` in the configuration; off unless set).
//!
//! | metric | what |
//! |---|---|
//! | `vcn_authorizations_total{response_code,reason}` | decisions (retries answered from the log not counted) |
//! | `vcn_rpc_duration_seconds{method,code}` | time to the response headers of each RPC |
//! | `vcn_cards{state}` | cards by state (counted at start, then every minute, or less often when counting takes over 1/30 of the time: [`next_count_after`]) |
//! | `vcn_vault_size_bytes` | the storage engine's size on disk |
//! | `vcn_engine_memory_bytes{part}` | the embedded engine's memory outside its cache: `filters` (grows with the keys), `write_buffers` (bounded) |
//! | `vcn_store_flush_duration_seconds` | one group-commit fsync of the embedded engine |
//! | `vcn_store_update_duration_seconds` | one storage update, durable (PostgreSQL: the commit) |
//! | `vcn_event_watchers` | WatchEvents streams open |
//!
//! The registry is process-wide, so the storage engine can record into it
//! without being handed anything.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::domain::decision::ResponseCode;

/// Latency buckets, in seconds: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    /// One counter per response code, resolved once: the authorisation
    /// path only increments an atomic.
    authorizations: Vec<(ResponseCode, IntCounter)>,
    pub rpc_duration: HistogramVec,
    pub cards: IntGaugeVec,
    pub vault_size_bytes: IntGauge,
    /// The embedded engine's memory outside its block cache, by part: what
    /// of the process's memory the cache setting does not bound.
    pub engine_memory_bytes: IntGaugeVec,
    pub flush_duration: Histogram,
    pub update_duration: Histogram,
    pub event_watchers: IntGauge,
    /// Age of the oldest audit entry not yet chained into the log file, at
    /// the sealer's last pass: how far the tamper-evident log trails the
    /// operations (they are durable in the vault meanwhile).
    pub audit_lag_seconds: prometheus::Gauge,
    /// Audit entries chained into the log file.
    pub audit_sealed: IntCounter,
    /// Sealer passes that failed (the entries stay in the vault and are
    /// retried): a full disk or an unwritable log file.
    pub audit_seal_failures: IntCounter,
}

impl Metrics {
    fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let by_code = IntCounterVec::new(
            Opts::new(
                "vcn_authorizations_total",
                "Authorisations decided, by ISO 8583 response code",
            ),
            &["response_code", "reason"],
        )?;
        registry.register(Box::new(by_code.clone()))?;
        let authorizations = ResponseCode::ALL
            .into_iter()
            .map(|c| (c, by_code.with_label_values(&[c.code(), c.reason()])))
            .collect();
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
        };
        let rpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "vcn_rpc_duration_seconds",
                "Time from request to response headers, by gRPC method and status code",
            )
            .buckets(BUCKETS.to_vec()),
            &["method", "code"],
        )?;
        let cards = IntGaugeVec::new(
            Opts::new("vcn_cards", "Cards in the vault, by state"),
            &["state"],
        )?;
        let vault_size_bytes = IntGauge::new(
            "vcn_vault_size_bytes",
            "Size of the vault's storage on disk (embedded engine) or of its table (PostgreSQL)",
        )?;
        let engine_memory_bytes = IntGaugeVec::new(
            Opts::new(
                "vcn_engine_memory_bytes",
                "The embedded engine's memory outside its block cache: bloom filters (grow with the keys) and write buffers (bounded)",
            ),
            &["part"],
        )?;
        let flush_duration = histogram(
            "vcn_store_flush_duration_seconds",
            "One group-commit flush (fsync) of the embedded engine",
        )?;
        let update_duration = histogram(
            "vcn_store_update_duration_seconds",
            "One storage update, from start until durable",
        )?;
        let event_watchers = IntGauge::new("vcn_event_watchers", "WatchEvents streams open")?;
        registry.register(Box::new(rpc_duration.clone()))?;
        registry.register(Box::new(cards.clone()))?;
        registry.register(Box::new(vault_size_bytes.clone()))?;
        registry.register(Box::new(engine_memory_bytes.clone()))?;
        registry.register(Box::new(flush_duration.clone()))?;
        registry.register(Box::new(update_duration.clone()))?;
        registry.register(Box::new(event_watchers.clone()))?;
        let audit_lag_seconds = prometheus::Gauge::new(
            "vcn_audit_lag_seconds",
            "Age of the oldest audit entry not yet sealed into the audit log file (0: none pending)",
        )?;
        let audit_sealed = IntCounter::new(
            "vcn_audit_sealed_total",
            "Audit entries chained into the audit log file",
        )?;
        let audit_seal_failures = IntCounter::new(
            "vcn_audit_seal_failures_total",
            "Audit sealer passes that failed (entries kept in the vault, retried)",
        )?;
        registry.register(Box::new(audit_lag_seconds.clone()))?;
        registry.register(Box::new(audit_sealed.clone()))?;
        registry.register(Box::new(audit_seal_failures.clone()))?;
        Ok(Metrics {
            registry,
            authorizations,
            rpc_duration,
            cards,
            vault_size_bytes,
            engine_memory_bytes,
            flush_duration,
            update_duration,
            event_watchers,
            audit_lag_seconds,
            audit_sealed,
            audit_seal_failures,
        })
    }

    pub fn authorized(&self, code: ResponseCode) {
        if let Some((_, c)) = self.authorizations.iter().find(|(k, _)| *k == code) {
            c.inc();
        }
    }

    /// Everything, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The process's metrics. None only if the registry could not be built
/// (a programming error, reported once in the log).
pub fn get() -> Option<&'static Metrics> {
    static METRICS: OnceLock<Option<Metrics>> = OnceLock::new();
    METRICS
        .get_or_init(|| match Metrics::new() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(error = %e, "metrics unavailable");
                None
            }
        })
        .as_ref()
}

/// Serves `GET /metrics` on `listener` until the task is dropped. A
/// deliberately small HTTP/1.1 responder: one request per connection.
pub async fn serve(listener: TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = stream.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match (head.starts_with("GET "), path) {
                (true, "/metrics") => ("200 OK", get().map(Metrics::render).unwrap_or_default()),
                (true, _) => ("404 Not Found", "try /metrics\n".to_string()),
                _ => ("405 Method Not Allowed", String::new()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Counting the cards scans every card record: on a large vault that is
/// seconds of CPU (about 2 s for 1.56 M cards on the development machine,
/// BENCHMARKS.md) and a sweep of the engine's block cache, which then has
/// to warm up again. So the count is taken at most this small a share of
/// the time: after a count that took `t`, the next waits at least
/// `t * COUNT_SPACING`.
pub const COUNT_SPACING: u32 = 30;

/// When to count the cards again after a count that took `took`: after
/// `every`, or later when counting is slow enough that `every` would spend
/// more than 1/[`COUNT_SPACING`] of the time on it.
pub fn next_count_after(every: Duration, took: Duration) -> Duration {
    every.max(took.saturating_mul(COUNT_SPACING))
}

/// Keeps `vcn_cards`, `vcn_vault_size_bytes` and `vcn_engine_memory_bytes`
/// current: all at start, then the two cheap ones every `every` and the
/// card count as [`next_count_after`] says.
pub async fn sample_vault(vault: Arc<crate::vault::Vault>, every: Duration) {
    let Some(m) = get() else { return };
    let mut count_due = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= count_due {
            let started = tokio::time::Instant::now();
            match vault.count_cards_by_state().await {
                Ok(counts) => {
                    for (state, n) in counts {
                        m.cards
                            .with_label_values(&[state.as_str()])
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "counting cards for metrics failed"),
            }
            let took = started.elapsed();
            let wait = next_count_after(every, took);
            if wait > every {
                tracing::debug!(
                    took_ms = took.as_millis() as u64,
                    next_in_s = wait.as_secs(),
                    "counting the cards for vcn_cards is slow on this vault: counting less often"
                );
            }
            count_due = started + wait;
        }
        if let Ok(Some(bytes)) = vault.size_bytes().await {
            m.vault_size_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Some(mem) = vault.engine_memory() {
            for (part, bytes) in [
                ("filters", mem.filters),
                ("write_buffers", mem.write_buffers),
            ] {
                m.engine_memory_bytes
                    .with_label_values(&[part])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// A store that times its updates into `vcn_store_update_duration_seconds`.
pub struct Metered(pub Arc<dyn crate::vault::Store>);

#[async_trait::async_trait]
impl crate::vault::Store for Metered {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, crate::vault::StoreError> {
        self.0.get(key).await
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, crate::vault::StoreError> {
        self.0.scan(prefix, after, limit).await
    }

    async fn update(
        &self,
        keys: &[Vec<u8>],
        decide: &mut crate::vault::store::Decide<'_>,
    ) -> Result<(), crate::vault::StoreError> {
        let started = std::time::Instant::now();
        let r = self.0.update(keys, decide).await;
        if let Some(m) = get() {
            m.update_duration.observe(started.elapsed().as_secs_f64());
        }
        r
    }

    async fn sync(&self) -> Result<(), crate::vault::StoreError> {
        self.0.sync().await
    }

    async fn ping(&self) -> Result<(), crate::vault::StoreError> {
        self.0.ping().await
    }

    async fn export(
        &self,
        sink: &mut crate::vault::store::ExportSink<'_>,
    ) -> Result<u64, crate::vault::StoreError> {
        self.0.export(sink).await
    }

    async fn size_bytes(&self) -> Result<Option<u64>, crate::vault::StoreError> {
        self.0.size_bytes().await
    }

    fn memory(&self) -> Option<crate::vault::store::EngineMemory> {
        self.0.memory()
    }

    fn settled_before(&self) -> Option<std::time::SystemTime> {
        self.0.settled_before()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quick count keeps the minute; a slow one (a large vault) spaces
    /// the next so that counting stays under 1/30 of the time.
    #[test]
    fn a_slow_card_count_is_taken_less_often() {
        let minute = Duration::from_secs(60);
        assert_eq!(next_count_after(minute, Duration::from_millis(50)), minute);
        assert_eq!(next_count_after(minute, Duration::from_secs(2)), minute);
        assert_eq!(
            next_count_after(minute, Duration::from_secs(3)),
            Duration::from_secs(90)
        );
        assert_eq!(
            next_count_after(minute, Duration::from_secs(20)),
            Duration::from_secs(600)
        );
        assert_eq!(
            next_count_after(minute, Duration::MAX),
            Duration::MAX,
            "no overflow"
        );
    }

    /// The sample Grafana dashboard only charts metrics that exist.
    #[test]
    fn the_dashboard_charts_real_metrics() {
        let m = Metrics::new().unwrap();
        m.rpc_duration
            .with_label_values(&["AuthorizationService/Authorize", "OK"])
            .observe(0.001);
        m.cards.with_label_values(&["active"]).set(1);
        m.authorized(ResponseCode::Approved);
        let text = m.render();
        assert!(
            text.contains(r#"vcn_authorizations_total{reason="approved",response_code="00"} 1"#)
        );
        let dashboard = include_str!("../ops/grafana-dashboard.json");
        let mut names: Vec<&str> = dashboard
            .match_indices("vcn_")
            .map(|(i, _)| {
                let rest = &dashboard[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .filter(|n| *n != "vcn_")
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() >= 6, "{names:?}");
        for name in names {
            assert!(
                text.contains(&format!("\n{name}")) || text.contains(&format!("{name}{{")),
                "{name} is charted but not exported"
            );
        }
    }
}
