//! Authentication and roles: every RPC but health carries
//! `authorization: Bearer <api key>`; the key names a client; the client's
//! role says which service it may call.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::api::limiter::FailureLimiter;
use crate::audit::{Actor, Event};
use crate::clients::{Client, Registry, Role};
use crate::domain::Owner;
use crate::vault::Scope;

/// Checks the key and role of every call to one service, and hands the
/// client to the handler in the request's extensions.
#[derive(Clone)]
pub struct Authenticator {
    registry: Arc<Registry>,
    /// Roles allowed to call the service this guards.
    allowed: &'static [Role],
    /// The service's name, for messages and logs.
    service: &'static str,
    /// Where refused calls are handed for the audit log (the interceptor
    /// cannot wait for a write: a task writes them in batches).
    audit: Option<AuditSink>,
    /// Failed authentications per address: None for no limit.
    peers: Option<Arc<FailureLimiter>>,
}

/// The channel to the task that writes refused calls to the audit log.
pub type AuditSink = tokio::sync::mpsc::Sender<(Actor, Event)>;

impl Authenticator {
    pub fn new(registry: Arc<Registry>, service: &'static str, allowed: &'static [Role]) -> Self {
        Authenticator {
            registry,
            allowed,
            service,
            audit: None,
            peers: None,
        }
    }

    /// Refuses an address past `limiter`'s failed authentications per
    /// minute (shared by every service's interceptor).
    pub fn with_peer_limit(mut self, limiter: Arc<FailureLimiter>) -> Self {
        self.peers = Some(limiter);
        self
    }

    /// Counts a failed authentication from `ip`.
    fn failed_auth(&self, ip: &str) {
        if let Some(l) = &self.peers {
            if l.failed(ip) {
                tracing::warn!(%ip, limit = l.max_per_minute(), "address reached its failed authentications per minute: refusing it until the minute is over");
            }
        }
    }

    /// Audits every refused call through `sink`.
    pub fn with_audit(mut self, sink: AuditSink) -> Self {
        self.audit = Some(sink);
        self
    }

    fn audit_refusal(&self, client: &str, role: &str, peer: &str, outcome: String) {
        let Some(sink) = &self.audit else { return };
        let entry = (
            Actor::new(client, role, peer),
            Event::new("authenticate", outcome).detail(format!("service={}", self.service)),
        );
        if sink.try_send(entry).is_err() {
            tracing::error!(%peer, "audit backlog full: a refused call could not be audited");
        }
    }
}

/// The authenticated client of a request.
#[derive(Clone)]
struct Caller(Arc<Client>);

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let ip = req
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        if let Some(l) = self.peers.as_ref().filter(|l| l.blocked(&ip)) {
            self.audit_refusal(
                "-",
                "-",
                &peer,
                "refused: too many failed authentications".into(),
            );
            return Err(Status::resource_exhausted(format!(
                "more than {} failed authentications from this address this minute: refused until the minute is over",
                l.max_per_minute()
            )));
        }
        // A registered client certificate (mTLS) identifies the client
        // without a key.
        let by_cert = req
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| crate::certs::fingerprint_der(c)))
            .map(|fp| (self.registry.authenticate_cert(&fp), fp));
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if let Some((Some(client), _)) = &by_cert {
            return self.admit(req, client.clone(), &peer);
        }
        let key = header.and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
        let Some(key) = key.map(str::trim).filter(|k| !k.is_empty()) else {
            if let Some((None, fp)) = &by_cert {
                tracing::warn!(%peer, service = self.service, cert = &fp[..16], "call with an unregistered client certificate and no API key refused");
                self.audit_refusal(
                    "-",
                    "-",
                    &peer,
                    "refused: unregistered client certificate".into(),
                );
                self.failed_auth(&ip);
                return Err(Status::unauthenticated(
                    "client certificate not registered (register it with `vcn client add NAME --role ROLE --cert FILE`) and no API key",
                ));
            }
            tracing::warn!(%peer, service = self.service, "call without an API key refused");
            self.audit_refusal("-", "-", &peer, "refused: missing API key".into());
            self.failed_auth(&ip);
            return Err(Status::unauthenticated(
                "missing API key: send metadata `authorization: Bearer <api key>`",
            ));
        };
        let Some(client) = self.registry.authenticate(key) else {
            tracing::warn!(%peer, service = self.service, "call with an unknown API key refused");
            self.audit_refusal("-", "-", &peer, "refused: unknown API key".into());
            self.failed_auth(&ip);
            return Err(Status::unauthenticated("unknown API key"));
        };
        self.admit(req, client, &peer)
    }
}

impl Authenticator {
    /// Checks the role of an identified client and admits the call.
    fn admit(
        &self,
        mut req: Request<()>,
        client: Arc<Client>,
        peer: &str,
    ) -> Result<Request<()>, Status> {
        // The RPC's span (crate::observe) names the client from here on.
        tracing::Span::current().record("client", client.name.as_str());
        if !self.allowed.contains(&client.role) {
            tracing::warn!(%peer, client = %client.name, role = client.role.as_str(), service = self.service, "call refused: wrong role");
            self.audit_refusal(
                &client.name,
                client.role.as_str(),
                peer,
                "refused: wrong role".into(),
            );
            let roles: Vec<_> = self.allowed.iter().map(|r| r.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "client {} has role {}; {} needs role {}",
                client.name,
                client.role.as_str(),
                self.service,
                roles.join(" or ")
            )));
        }
        req.extensions_mut().insert(Caller(client));
        Ok(req)
    }
}

/// The client that made a request (set by [`Authenticator`]).
pub fn caller<T>(req: &Request<T>) -> Result<Arc<Client>, Status> {
    req.extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .ok_or_else(|| Status::unauthenticated("no authenticated client"))
}

/// Who made a request and from where, for the audit log.
pub fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let client = caller(req)?;
    let origin = req
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into());
    Ok(Actor::new(&client.name, client.role.as_str(), &origin))
}

/// Which cards a client may see: a client pinned to an owner sees that
/// owner's only.
pub fn scope(client: &Client) -> Scope<'_> {
    match (&client.role, &client.owner) {
        (Role::Cards, Some(owner)) => Scope::Owner(owner),
        _ => Scope::Any,
    }
}

/// The owner a request acts for: the one it names, which a pinned client
/// may leave empty and may not set to another owner.
pub fn resolve_owner(client: &Client, requested: &str) -> Result<Owner, Status> {
    match scope(client) {
        Scope::Owner(own) if requested.is_empty() || requested == own.as_str() => Ok(own.clone()),
        Scope::Owner(_) => Err(Status::permission_denied(format!(
            "client {} acts for one owner only: leave owner empty or give its own",
            client.name
        ))),
        Scope::Any => Owner::parse("owner", requested).map_err(Status::from),
    }
}
