//! AuthorizationService: the switch's hot path (role `switch`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::auth::actor;
use crate::api::convert;
use crate::api::limiter::FailureLimiter;
use crate::api::pb::{self, authorization_service_server::AuthorizationService};
use crate::audit::{Actor, Event};
use crate::domain::decision::ResponseCode;
use crate::domain::{Pan, PanError};
use crate::vault::{Vault, VaultError};

pub struct SwitchApi {
    vault: Arc<Vault>,
    /// Failed lookups per client (enumeration): None for no limit.
    lookups: Option<Arc<FailureLimiter>>,
}

impl SwitchApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        SwitchApi {
            vault,
            lookups: None,
        }
    }

    /// Refuses a client past `limiter`'s failed lookups per minute.
    pub fn with_lookup_limit(mut self, limiter: Arc<FailureLimiter>) -> Self {
        self.lookups = Some(limiter);
        self
    }

    /// Refuses a client that made too many failed lookups this minute.
    async fn check_lookups(&self, who: &Actor, action: &'static str) -> Result<(), Status> {
        let Some(l) = &self.lookups else {
            return Ok(());
        };
        if !l.blocked(&who.client) {
            return Ok(());
        }
        let _ = self
            .vault
            .record(who, &Event::new(action, "refused: too many failed lookups"))
            .await;
        Err(Status::resource_exhausted(format!(
            "client {} made more than {} failed lookups (unknown numbers, wrong CVV or expiry) this minute: refused until the minute is over",
            who.client,
            l.max_per_minute()
        )))
    }

    /// Counts a failed lookup of `who`, logging when it reaches the limit.
    fn failed_lookup(&self, who: &Actor) {
        if let Some(l) = &self.lookups {
            if l.failed(&who.client) {
                tracing::warn!(client = %who.client, origin = %who.origin, limit = l.max_per_minute(), "client reached its failed lookups per minute: refusing it until the minute is over");
            }
        }
    }
}

#[tonic::async_trait]
impl AuthorizationService for SwitchApi {
    async fn authorize(
        &self,
        req: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let who = actor(&req)?;
        self.check_lookups(&who, "authorize").await?;
        let r = convert::authorize_request(req.get_ref())?;
        let o = self.vault.authorize(&r, &who).await?;
        let failed = matches!(
            o.code,
            ResponseCode::UnknownCard | ResponseCode::WrongCvv | ResponseCode::WrongExpiry
        );
        if failed && !o.replayed {
            self.failed_lookup(&who);
        }
        Ok(Response::new(pb::AuthorizeResponse {
            approved: o.code.is_approved(),
            response_code: o.code.code().to_string(),
            decline_reason: o.code.reason().to_string(),
            authorization_id: o.authorization_id.unwrap_or_default(),
            card_id: o
                .card_id
                .map(|c| c.as_str().to_string())
                .unwrap_or_default(),
            funding_pan: o
                .funding_pan
                .map(|p| p.expose().to_string())
                .unwrap_or_default(),
            remaining: o.remaining.map(convert::money),
        }))
    }

    async fn reverse(
        &self,
        req: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        let r = convert::reverse_request(req.get_ref())?;
        let o = self.vault.reverse(&r, &actor(&req)?).await?;
        Ok(Response::new(pb::ReverseResponse {
            reversed: o.reversed,
            response_code: o.response_code.to_string(),
            remaining: o.remaining.map(convert::money),
        }))
    }

    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let who = actor(&req)?;
        self.check_lookups(&who, "detokenize").await?;
        let pan = match Pan::parse(&req.get_ref().pan) {
            Ok(p) => p,
            // Not a card number at all: it was never issued.
            Err(PanError::Luhn) => {
                self.failed_lookup(&who);
                let e = VaultError::NotFound("card number".into());
                let masked = crate::domain::pan::mask(&req.get_ref().pan);
                let event = Event::new("detokenize", format!("error: {e}")).pan(masked);
                self.vault.record(&who, &event).await?;
                return Err(e.into());
            }
            Err(e) => return Err(Status::invalid_argument(format!("pan: {}", e.reason()))),
        };
        let d = match self.vault.detokenize(&pan, &who).await {
            Ok(d) => d,
            Err(e) => {
                if matches!(e, VaultError::NotFound(_)) {
                    self.failed_lookup(&who);
                }
                return Err(e.into());
            }
        };
        Ok(Response::new(pb::DetokenizeResponse {
            funding_pan: d.funding_pan.expose().to_string(),
            card_id: d.card_id.as_str().to_string(),
            state: convert::state(d.state) as i32,
        }))
    }
}
