//! Retention: ended cards stay detokenisable for the retention period, are
//! purged after it, and their numbers stay reserved through quarantine.

use time::{Duration, OffsetDateTime};
use tonic::Code;
use vcn::api::pb;
use vcn::domain::Pan;

use crate::support::*;

const DAY: Duration = Duration::days(1);

#[tokio::test]
async fn ended_cards_map_through_retention_then_purge_and_their_numbers_wait_out_quarantine() {
    let server = TestServer::start().await; // retention and quarantine: 396 days
    let (mut cards, mut switch) = server.clients().await;
    let closed = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 2,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let used = issue(
        &mut cards,
        pb::IssueCardRequest {
            idempotency_key: "k1".into(),
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let live = issue(&mut cards, issue_req("alice", 5000)).await; // valid 30 days
    let id = |c: &pb::IssueCardResponse| c.card.as_ref().unwrap().card_id.clone();
    assert!(
        authorize(&mut switch, auth_req(&closed, "t-closed", 100))
            .await
            .approved
    );
    assert!(
        authorize(&mut switch, auth_req(&used, "t-used", 100))
            .await
            .approved
    );
    // A reversal: its record goes with retention too.
    let r = switch
        .reverse(pb::ReverseRequest {
            transaction_id: "t-closed".into(),
            amount: None,
            reversal_id: "rv-closed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.reversed);
    cards
        .close_card(pb::CardRef {
            card_id: id(&closed),
        })
        .await
        .unwrap();
    let vault = server.vault.clone();
    let t0 = OffsetDateTime::now_utc();

    // The first pass notes when the cards ended; nothing goes.
    let s = vault.purge(t0).await.unwrap();
    assert_eq!((s.ended, s.cards_purged), (2, 0));
    // Through retention they still map (refunds, chargebacks).
    let s = vault.purge(t0 + 395 * DAY).await.unwrap();
    assert_eq!(s.cards_purged, 0);
    let d = switch
        .detokenize(pb::DetokenizeRequest {
            pan: closed.pan.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.funding_pan, FUNDING);

    // After it they are purged; the live card is not (its end is later).
    let s = vault.purge(t0 + 397 * DAY).await.unwrap();
    assert_eq!(s.cards_purged, 2, "{s:?}");
    assert!(s.transactions_purged >= 2, "{s:?}");
    assert_eq!(s.idempotency_keys_purged, 1, "{s:?}");
    // Of every card, the reversal records and the card events past
    // retention go too (3 issued, 2 approved, 1 used up, 1 reversed, 1 closed).
    assert_eq!(s.reversals_purged, 1, "{s:?}");
    assert_eq!(s.events_purged, 8, "{s:?}");
    // A watcher from the start resumes after what was deleted, at once
    // (not after waiting out a gap), and sees the next change.
    let mut events = cards
        .watch_events(pb::WatchEventsRequest {
            owner: "alice".into(),
            after_cursor: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    cards
        .pause_card(pb::CardRef { card_id: id(&live) })
        .await
        .unwrap();
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), events.message())
        .await
        .expect("the watcher did not skip the deleted events")
        .unwrap()
        .unwrap();
    assert_eq!(next.r#type, pb::CardEventType::Paused as i32);
    assert_eq!(next.cursor, "0000000000000009");
    for gone in [&closed, &used] {
        assert_status(
            switch
                .detokenize(pb::DetokenizeRequest {
                    pan: gone.pan.clone(),
                })
                .await,
            Code::NotFound,
            "not found",
        );
        assert_status(
            cards
                .get_card(pb::GetCardRequest { card_id: id(gone) })
                .await,
            Code::NotFound,
            &id(gone),
        );
        let r = authorize(
            &mut switch,
            auth_req(gone, &format!("after-{}", id(gone)), 100),
        )
        .await;
        assert_eq!(r.response_code, "14");
        // Still reserved: the issuing path will not hand it out.
        assert!(vault
            .number_in_use(&Pan::parse(&gone.pan).unwrap())
            .await
            .unwrap());
    }
    let list = cards
        .list_cards(pb::ListCardsRequest {
            owner: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.cards
            .iter()
            .map(|c| c.card_id.clone())
            .collect::<Vec<_>>(),
        vec![id(&live)]
    );
    // A retry of a purged transaction is decided anew, not replayed.
    assert_eq!(
        authorize(&mut switch, auth_req(&closed, "t-closed", 100))
            .await
            .response_code,
        "14"
    );

    // Quarantine over: the numbers are free again; the expired live card is
    // purged by then too.
    let s = vault.purge(t0 + 397 * DAY + 397 * DAY).await.unwrap();
    assert!(s.numbers_released >= 2, "{s:?}");
    assert_eq!(s.cards_purged, 1, "{s:?}");
    for gone in [&closed, &used] {
        assert!(!vault
            .number_in_use(&Pan::parse(&gone.pan).unwrap())
            .await
            .unwrap());
    }
}
