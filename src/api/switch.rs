//! AuthorizationService: the switch's hot path (role `switch`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::auth::actor;
use crate::api::convert;
use crate::api::pb::{self, authorization_service_server::AuthorizationService};
use crate::domain::{Pan, PanError};
use crate::vault::{Vault, VaultError};

pub struct SwitchApi {
    vault: Arc<Vault>,
}

impl SwitchApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        SwitchApi { vault }
    }
}

#[tonic::async_trait]
impl AuthorizationService for SwitchApi {
    async fn authorize(
        &self,
        req: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let r = convert::authorize_request(req.get_ref())?;
        let o = self.vault.authorize(&r, &actor(&req)?).await?;
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
        let pan = match Pan::parse(&req.get_ref().pan) {
            Ok(p) => p,
            // Not a card number at all: it was never issued.
            Err(PanError::Luhn) => return Err(VaultError::NotFound("card number".into()).into()),
            Err(e) => return Err(Status::invalid_argument(format!("pan: {}", e.reason()))),
        };
        let d = self.vault.detokenize(&pan, &actor(&req)?).await?;
        Ok(Response::new(pb::DetokenizeResponse {
            funding_pan: d.funding_pan.expose().to_string(),
            card_id: d.card_id.as_str().to_string(),
            state: convert::state(d.state) as i32,
        }))
    }
}
