//! The vault's protections, checked on the bytes it writes.

use std::sync::Arc;

use prost::Message;
use tonic::Code;
use vcn::api::pb;
use vcn::config::Config;
use vcn::domain::CardId;
use vcn::vault::records::{card_key, CardRecord};
use vcn::vault::Write;

use crate::support::*;

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn no_card_number_is_stored_in_clear() {
    let server = TestServer::start().await;
    let (mut cards, mut switch) = server.clients().await;
    let fundings = ["4111111111111111", "5555555555554444", "378282246310005"];
    let mut numbers: Vec<String> = fundings.iter().map(|s| s.to_string()).collect();
    for (k, f) in fundings.iter().enumerate() {
        for i in 0..10 {
            let card = issue(
                &mut cards,
                pb::IssueCardRequest {
                    funding_pan: f.to_string(),
                    max_uses: 2,
                    ..issue_req("alice", 5000)
                },
            )
            .await;
            authorize(&mut switch, auth_req(&card, &format!("t{k}-{i}"), 100)).await;
            numbers.push(card.pan.clone());
        }
    }
    drop((cards, switch));
    let (_dir, config) = server.stop().await;
    let bytes = bytes_at_rest(&config);
    assert!(
        bytes.len() > 10_000,
        "the scan must read the vault's data ({} bytes)",
        bytes.len()
    );
    assert!(
        contains(&bytes, "vc_"),
        "sanity: card ids are in the bytes the scan reads"
    );
    // Sanity: the scan reads stored values too, not only keys (every
    // card's masked number is stored in its record).
    let masked = format!("{}******{}", &numbers[3][..6], &numbers[3][12..]);
    assert!(
        contains(&bytes, &masked),
        "sanity: stored record values are in the bytes the scan reads"
    );
    for n in &numbers {
        if let Some(at) = bytes.windows(n.len()).position(|w| w == n.as_bytes()) {
            let ctx =
                String::from_utf8_lossy(&bytes[at.saturating_sub(40)..(at + 40).min(bytes.len())])
                    .to_string();
            panic!(
                "{}... found in clear in the data directory: {ctx:?}",
                &n[..6]
            );
        }
    }
}

async fn edit_record(config: &Config, id: &str, edit: impl FnOnce(&mut CardRecord)) {
    let store = open_store(config).await;
    let key = card_key(&CardId::parse("card_id", id).unwrap());
    let mut rec = CardRecord::decode(&store.get(&key).await.unwrap().unwrap()[..]).unwrap();
    edit(&mut rec);
    let bytes = rec.encode_to_vec();
    store
        .update(&[], &mut |_| vec![Write::Put(key.clone(), bytes.clone())])
        .await
        .unwrap();
}

async fn read_record(config: &Config, id: &str) -> CardRecord {
    let store = open_store(config).await;
    let key = card_key(&CardId::parse("card_id", id).unwrap());
    CardRecord::decode(&store.get(&key).await.unwrap().unwrap()[..]).unwrap()
}

#[tokio::test]
async fn a_flipped_ciphertext_byte_is_an_error_never_a_wrong_number() {
    let server = TestServer::start().await;
    let cards_key = server.add_client("web", vcn::clients::Role::Cards, None);
    let switch_key = server.add_client("sw", vcn::clients::Role::Switch, None);
    let mut cards = server.cards_as(&cards_key).await;
    let card = issue(
        &mut cards,
        pb::IssueCardRequest {
            max_uses: 2,
            ..issue_req("alice", 5000)
        },
    )
    .await;
    let id = card.card.as_ref().unwrap().card_id.clone();
    drop(cards);
    let (dir, config) = server.stop().await;
    edit_record(&config, &id, |r| {
        let s = r.sealed.as_mut().unwrap();
        let last = s.funding_pan.len() - 1;
        s.funding_pan[last] ^= 0x01;
    })
    .await;

    let server = TestServer::start_with(dir, config).await;
    let mut switch = server.switch_as(&switch_key).await;
    assert_status(
        switch
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone(),
            })
            .await,
        Code::Internal,
        &id,
    );
    assert_status(
        switch.authorize(auth_req(&card, "t1", 100)).await,
        Code::Internal,
        &id,
    );
    // The failed authorisation debited nothing, and other cards still work.
    let mut cards = server.cards_as(&cards_key).await;
    assert_eq!(amount(&get(&mut cards, &id).await.spent), 0);
    let other = issue(&mut cards, issue_req("alice", 100)).await;
    assert!(
        authorize(&mut switch, auth_req(&other, "t2", 100))
            .await
            .approved
    );
}

#[tokio::test]
async fn ciphertext_copied_onto_another_record_fails_to_open() {
    let server = TestServer::start().await;
    let switch_key = server.add_client("sw", vcn::clients::Role::Switch, None);
    let (mut cards, _) = server.clients().await;
    let a = issue(
        &mut cards,
        pb::IssueCardRequest {
            funding_pan: "5555555555554444".into(),
            ..issue_req("alice", 100)
        },
    )
    .await;
    let b = issue(&mut cards, issue_req("bob", 100)).await;
    let (a_id, b_id) = (
        a.card.unwrap().card_id,
        b.card.as_ref().unwrap().card_id.clone(),
    );
    drop(cards);
    let (dir, config) = server.stop().await;
    let a_sealed = read_record(&config, &a_id).await.sealed;
    edit_record(&config, &b_id, |r| r.sealed = a_sealed).await;

    let server = TestServer::start_with(dir, config).await;
    let mut switch = server.switch_as(&switch_key).await;
    // b's number must not reveal a's funding card: the card id is bound in.
    assert_status(
        switch
            .detokenize(pb::DetokenizeRequest { pan: b.pan.clone() })
            .await,
        Code::Internal,
        &b_id,
    );
    let d = switch
        .detokenize(pb::DetokenizeRequest { pan: a.pan.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.funding_pan, "5555555555554444");
    let _ = Arc::strong_count(&server.dir);
}
