//! CardService: issue and manage cards (role `cards`, or `admin`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::auth::{actor, caller, resolve_owner, scope};
use crate::api::convert::{self, parse_money};
use crate::api::pb::{self, card_service_server::CardService};
use crate::domain::{CardId, FieldError};
use crate::vault::Vault;

/// ListCards page size when the request gives none, and the most it may ask.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

pub struct CardApi {
    vault: Arc<Vault>,
}

impl CardApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        CardApi { vault }
    }
}

fn card_id(s: &str) -> Result<CardId, Status> {
    CardId::parse("card_id", s).map_err(Status::from)
}

type EventStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::CardEvent, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl CardService for CardApi {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let client = caller(&req)?;
        let r = req.get_ref();
        let owner = resolve_owner(&client, &r.owner)?;
        let after = convert::parse_cursor("after_cursor", &r.after_cursor)?;
        tracing::info!(owner = %owner, after, client = %client.name, "watching events");
        let rx = self.vault.watch(owner, after);
        let stream =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |d| {
                match d {
                    Ok((seq, e)) => Ok(convert::event(seq, &e)),
                    Err(e) => Err(Status::from(e)),
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn issue_card(
        &self,
        req: Request<pb::IssueCardRequest>,
    ) -> Result<Response<pb::IssueCardResponse>, Status> {
        let client = caller(&req)?;
        let r = req.get_ref();
        let owner = resolve_owner(&client, &r.owner)?;
        let who = actor(&req)?;
        let funding = match (r.funding_pan.is_empty(), r.funding_card_id.is_empty()) {
            (_, true) => None,
            (true, false) => {
                let id = CardId::parse("funding_card_id", &r.funding_card_id)?;
                Some(self.vault.funding_of(&id, &owner).await?)
            }
            (false, false) => {
                return Err(FieldError::new(
                    "funding_card_id",
                    "give funding_pan or funding_card_id, not both",
                )
                .into())
            }
        };
        let issued = self
            .vault
            .issue(convert::issue_request(r, owner, funding)?, &who)
            .await?;
        Ok(Response::new(pb::IssueCardResponse {
            card: Some(convert::card(&issued.card)),
            pan: issued.pan.expose().to_string(),
            expiry_month: u32::from(issued.card.expiry.month),
            expiry_year: u32::from(issued.card.expiry.year),
            cvv: issued.cvv.expose().to_string(),
        }))
    }

    async fn get_card(
        &self,
        req: Request<pb::GetCardRequest>,
    ) -> Result<Response<pb::Card>, Status> {
        let client = caller(&req)?;
        let card = self
            .vault
            .get(&card_id(&req.get_ref().card_id)?, scope(&client))
            .await?;
        Ok(Response::new(convert::card(&card)))
    }

    async fn list_cards(
        &self,
        req: Request<pb::ListCardsRequest>,
    ) -> Result<Response<pb::ListCardsResponse>, Status> {
        let client = caller(&req)?;
        let r = req.get_ref();
        let owner = resolve_owner(&client, &r.owner)?;
        let size = match r.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let (cards, next) = self
            .vault
            .list(&owner, size as usize, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListCardsResponse {
            cards: cards.iter().map(convert::card).collect(),
            next_page_token: next,
        }))
    }

    async fn update_card_limits(
        &self,
        req: Request<pb::UpdateCardLimitsRequest>,
    ) -> Result<Response<pb::Card>, Status> {
        let client = caller(&req)?;
        let r = req.get_ref();
        let id = card_id(&r.card_id)?;
        let spend_limit = parse_money("spend_limit", r.spend_limit.as_ref(), false)?;
        let per_txn = parse_money(
            "per_transaction_limit",
            r.per_transaction_limit.as_ref(),
            false,
        )?;
        if spend_limit.is_none() && per_txn.is_none() {
            return Err(FieldError::new(
                "spend_limit",
                "give spend_limit, per_transaction_limit or both",
            )
            .into());
        }
        // An amount of 0 removes the per-transaction limit.
        let per_txn = per_txn.map(|m| Some(m).filter(|m| m.amount_minor() != 0));
        let card = self
            .vault
            .update_limits(&id, scope(&client), &actor(&req)?, spend_limit, per_txn)
            .await?;
        Ok(Response::new(convert::card(&card)))
    }

    async fn pause_card(&self, req: Request<pb::CardRef>) -> Result<Response<pb::Card>, Status> {
        let client = caller(&req)?;
        let card = self
            .vault
            .pause(
                &card_id(&req.get_ref().card_id)?,
                scope(&client),
                &actor(&req)?,
            )
            .await?;
        Ok(Response::new(convert::card(&card)))
    }

    async fn resume_card(&self, req: Request<pb::CardRef>) -> Result<Response<pb::Card>, Status> {
        let client = caller(&req)?;
        let card = self
            .vault
            .resume(
                &card_id(&req.get_ref().card_id)?,
                scope(&client),
                &actor(&req)?,
            )
            .await?;
        Ok(Response::new(convert::card(&card)))
    }

    async fn close_card(&self, req: Request<pb::CardRef>) -> Result<Response<pb::Card>, Status> {
        let client = caller(&req)?;
        let card = self
            .vault
            .close(
                &card_id(&req.get_ref().card_id)?,
                scope(&client),
                &actor(&req)?,
            )
            .await?;
        Ok(Response::new(convert::card(&card)))
    }
}
