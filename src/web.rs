//! gRPC-Web for browsers (`[grpc_web]` in the configuration): web banking
//! pages call the gRPC services directly, over HTTP/1.1 or HTTP/2.
//!
//! One layer, outermost, in front of everything else the server does to a
//! call, so the deadline, load shedding, concurrency limits, logging,
//! metrics and the API-key check see an ordinary gRPC call:
//!
//! 1. [`OriginGate`]: a request whose `Origin` is not listed is refused
//!    (403, `grpc-status` 7) before anything else and gets no CORS headers,
//!    preflight or not. Requests without `Origin` (servers, the CLI) pass.
//! 2. CORS (tower-http) for the listed origins: preflights are answered,
//!    and answers expose the gRPC status headers to the page.
//! 3. tonic-web translates gRPC-Web to gRPC and back; native gRPC over
//!    HTTP/2 passes through unchanged.
//! 4. tonic's `RecoverError`, so a call refused by a limit (an error, not
//!    a response) still reaches the browser as a gRPC-Web status with CORS
//!    headers instead of a bare HTTP/2 error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, ORIGIN};
use http::{Method, Request, Response, StatusCode};
use tonic::body::Body;
use tonic::service::{RecoverError, RecoverErrorLayer};
use tonic_web::{GrpcWebLayer, GrpcWebService};
use tower::util::Either;
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

use crate::config::{ConfigError, GrpcWebConfig};

/// Request headers a gRPC-Web client sends (connect-web, grpc-web,
/// improbable-eng) besides the API key.
const ALLOW_HEADERS: [&str; 6] = [
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "x-request-id",
    "connect-protocol-version",
    "connect-timeout-ms",
];
/// Response headers the page may read: the status, and the request id for
/// support calls.
const EXPOSE_HEADERS: [&str; 4] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-request-id",
];
/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(3600);

/// The gRPC-Web layer of the server: a pass-through when `[grpc_web]` is off.
#[derive(Clone, Debug)]
pub struct WebLayer {
    /// The allowed origins; None: gRPC-Web is off.
    origins: Option<Arc<[HeaderValue]>>,
}

impl WebLayer {
    /// The layer the configuration asks for (its origins checked).
    pub fn new(config: &GrpcWebConfig) -> Result<WebLayer, ConfigError> {
        let origins = config.origins()?;
        if !config.enabled {
            return Ok(WebLayer { origins: None });
        }
        let origins = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o).map_err(|_| {
                    ConfigError::Invalid(format!(
                        "grpc_web.allowed_origins: {o:?} is not a header value"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WebLayer {
            origins: Some(origins.into()),
        })
    }

    /// Whether gRPC-Web is served (the server must then accept HTTP/1.1).
    pub fn enabled(&self) -> bool {
        self.origins.is_some()
    }
}

fn cors(origins: &[HeaderValue]) -> CorsLayer {
    let mut allow: Vec<HeaderName> = vec![AUTHORIZATION, CONTENT_TYPE];
    allow.extend(ALLOW_HEADERS.map(HeaderName::from_static));
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([Method::POST])
        .allow_headers(allow)
        .expose_headers(EXPOSE_HEADERS.map(HeaderName::from_static))
        .max_age(PREFLIGHT_MAX_AGE)
}

/// The service a [`WebLayer`] makes: the gRPC-Web stack, or the inner
/// service itself when gRPC-Web is off.
pub type WebService<S> = Either<OriginGate<Cors<GrpcWebService<RecoverError<S>>>>, S>;

impl<S> tower::Layer<S> for WebLayer {
    type Service = WebService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        match &self.origins {
            None => Either::Right(inner),
            Some(origins) => {
                let stack = tower::ServiceBuilder::new()
                    .layer(cors(origins))
                    .layer(GrpcWebLayer::new())
                    .layer(RecoverErrorLayer::new())
                    .service(inner);
                Either::Left(OriginGate {
                    inner: stack,
                    origins: origins.clone(),
                })
            }
        }
    }
}

/// Refuses requests from origins that are not listed (see the module).
#[derive(Clone, Debug)]
pub struct OriginGate<S> {
    inner: S,
    origins: Arc<[HeaderValue]>,
}

impl<S, B> tower::Service<Request<B>> for OriginGate<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match req.headers().get(ORIGIN) {
            Some(origin) if !self.origins.contains(origin) => {
                tracing::warn!(
                    origin = %String::from_utf8_lossy(origin.as_bytes()),
                    path = req.uri().path(),
                    "gRPC-Web call from an origin not in grpc_web.allowed_origins refused"
                );
                let mut res = Response::new(Body::empty());
                *res.status_mut() = StatusCode::FORBIDDEN;
                let headers = res.headers_mut();
                headers.insert("grpc-status", HeaderValue::from_static("7"));
                headers.insert(
                    "grpc-message",
                    HeaderValue::from_static("origin not allowed: see grpc_web.allowed_origins"),
                );
                Box::pin(std::future::ready(Ok(res)))
            }
            _ => Box::pin(self.inner.call(req)),
        }
    }
}
