//! Every RPC observed: a request id (the caller's `x-request-id`, or a new
//! one), a tracing span carrying it, the method and (once authenticated)
//! the client's name, one log line when it is answered, and its latency in
//! `vcn_rpc_duration_seconds`. The request id is echoed in the response's
//! `x-request-id` header.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use tracing::Instrument;

/// Methods with their own label; anything else is "other" (a client
/// cannot grow the metrics by calling made-up paths).
const METHODS: &[&str] = &[
    "/vcn.v1.CardService/IssueCard",
    "/vcn.v1.CardService/GetCard",
    "/vcn.v1.CardService/ListCards",
    "/vcn.v1.CardService/UpdateCardLimits",
    "/vcn.v1.CardService/PauseCard",
    "/vcn.v1.CardService/ResumeCard",
    "/vcn.v1.CardService/CloseCard",
    "/vcn.v1.CardService/WatchEvents",
    "/vcn.v1.AuthorizationService/Authorize",
    "/vcn.v1.AuthorizationService/Reverse",
    "/vcn.v1.AuthorizationService/Detokenize",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

fn method_label(path: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == path)
        .map(|m| m.rsplit_once("v1.").map_or(*m, |(_, short)| short))
        .unwrap_or("other")
}

/// gRPC status names by number, for labels and logs.
fn code_label(code: &str) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    code.parse::<usize>()
        .ok()
        .and_then(|n| NAMES.get(n).copied())
        .unwrap_or("UNKNOWN")
}

/// A caller's request id, if it is a sane one (1-64 of `A-Za-z0-9._-`).
fn given_request_id(v: Option<&http::HeaderValue>) -> Option<String> {
    let s = v?.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ok.then(|| s.to_string())
}

/// A new request id: a per-process random prefix and a counter (unique
/// without a system call per request).
fn new_request_id() -> String {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 6];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        hex::encode(b)
    });
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Observe<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let method = method_label(req.uri().path());
        let request_id =
            given_request_id(req.headers().get("x-request-id")).unwrap_or_else(new_request_id);
        // `client` is filled in by the authenticator once it knows.
        let span = tracing::info_span!(
            "rpc",
            method,
            request_id = %request_id,
            client = tracing::field::Empty
        );
        let call = {
            let _in = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let mut result = call.await;
                // A call answered with an error is "trailers only": its
                // status is in the headers. Otherwise it is OK so far (a
                // stream's own end is not timed here).
                let code = match &mut result {
                    Ok(res) => {
                        if let Ok(v) = http::HeaderValue::from_str(&request_id) {
                            res.headers_mut().insert("x-request-id", v);
                        }
                        res.headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .map_or("OK", code_label)
                    }
                    Err(_) => "UNKNOWN",
                };
                let elapsed = started.elapsed();
                if let Some(m) = crate::metrics::get() {
                    m.rpc_duration
                        .with_label_values(&[method, code])
                        .observe(elapsed.as_secs_f64());
                }
                tracing::info!(
                    code,
                    elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                    "rpc answered"
                );
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_named() {
        assert_eq!(
            method_label("/vcn.v1.AuthorizationService/Authorize"),
            "AuthorizationService/Authorize"
        );
        assert_eq!(method_label("/made/up"), "other");
        assert_eq!(code_label("7"), "PERMISSION_DENIED");
        assert_eq!(code_label("x"), "UNKNOWN");
        let id = |s: &str| given_request_id(Some(&http::HeaderValue::from_str(s).unwrap()));
        assert_eq!(id("abc-123_x.y"), Some("abc-123_x.y".into()));
        assert_eq!(id("has space"), None);
        assert_eq!(id(&"a".repeat(65)), None);
        assert_ne!(new_request_id(), new_request_id());
    }
}
