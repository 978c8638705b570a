//! The widget's window, driven through egui_kittest (no GPU, no display)
//! against a real vcn server started in-process.

mod support;

use std::time::Duration;

use egui_kittest::kittest::Queryable;
use support::*;
use vcn::api::pb;

#[test]
fn generate_shows_the_number_the_service_issued() {
    let server = Server::start();
    let key = server.widget_key(OWNER);
    let (mut h, _clock) = harness(settings(&server.url(), &key, &server.funding_card));
    wait_for(&mut h, "the card list (the enrolment card only)", |h| {
        shows(h, "closed")
    });

    click(&mut h, "7 days");
    type_into(&mut h, "Shop", "shop-1");
    let pan = generate(&mut h, "25");

    // Copy number puts the digits on the clipboard (in the frame that
    // handles the click).
    h.get_by_label("Copy number").click();
    let mut copied = Vec::new();
    for _ in 0..3 {
        h.step();
        copied.extend(copied_texts(&h));
    }
    assert_eq!(copied, vec![pan.clone()]);

    // The number on screen is one the service issued, for the configured
    // funding card, with what the form said.
    let mut switch = server.switch();
    let found = server
        .rt
        .block_on(switch.detokenize(pb::DetokenizeRequest { pan: pan.clone() }))
        .expect("the number on screen is a known virtual number")
        .into_inner();
    assert_eq!(found.funding_pan, FUNDING);
    let card = server.get_card(&key, &found.card_id);
    assert_eq!(card.owner, OWNER);
    let limit = card.spend_limit.expect("limit");
    assert_eq!((limit.amount_minor, limit.currency.as_str()), (2500, "EUR"));
    assert_eq!(card.merchant_id, "shop-1");
    let days = (card.valid_until.expect("valid_until").seconds
        - card.created_at.expect("created_at").seconds) as f64
        / 86_400.0;
    assert!((days - 7.0).abs() < 0.01, "valid for {days} days");

    // Expiry and CVV on screen are the card's: the switch approves with them.
    let expiry = after(&h, "Expires ").expect("expiry on screen");
    let cvv = after(&h, "CVV ").expect("cvv on screen");
    let (mm, yy) = expiry.split_once('/').expect("MM/YY");
    assert_eq!(mm.parse::<u32>().unwrap(), card.expiry_month);
    assert_eq!(2000 + yy.parse::<u32>().unwrap(), card.expiry_year);
    let auth = server
        .rt
        .block_on(switch.authorize(pb::AuthorizeRequest {
            transaction_id: "t-1".into(),
            pan: pan.clone(),
            expiry_month: card.expiry_month,
            expiry_year: card.expiry_year,
            cvv,
            amount: Some(pb::Money {
                amount_minor: 1000,
                currency: "EUR".into(),
            }),
            merchant_id: "shop-1".into(),
            mcc: "5411".into(),
        }))
        .expect("authorize")
        .into_inner();
    assert!(auth.approved, "{}", auth.decline_reason);

    // The list shows the new card, by its last 4 digits.
    assert!(shows(&h, &format!("•••• {}", &pan[pan.len() - 4..])));
}

#[test]
fn the_number_is_hidden_after_the_reveal_time() {
    let server = Server::start();
    let key = server.widget_key(OWNER);
    let mut s = settings(&server.url(), &key, &server.funding_card);
    s.reveal_for = Duration::from_secs(60);
    let (mut h, clock) = harness(s);
    wait_for(&mut h, "the card list", |h| shows(h, "closed"));
    let pan = generate(&mut h, "10");
    let grouped = number_on_screen(&h).expect("number");

    h.get_by_label("Copy CVV").click();
    settle(&mut h);

    clock.advance(Duration::from_secs(59));
    h.step();
    assert_eq!(
        number_on_screen(&h).as_deref(),
        Some(grouped.as_str()),
        "still shown at 59 s"
    );
    assert!(shows(&h, "Hidden in 1 s"));

    clock.advance(Duration::from_secs(1));
    h.step();
    let cleared = copied_texts(&h);
    h.step();
    assert_eq!(number_on_screen(&h), None, "hidden at 60 s");
    assert_eq!(
        cleared,
        vec![String::new()],
        "the copied CVV leaves the clipboard"
    );
    assert!(!shows(&h, &pan) && !shows(&h, "CVV 1") && after(&h, "CVV ").is_none());
    let masked = format!("{}******{}", &pan[..6], &pan[pan.len() - 4..]);
    assert!(
        shows(&h, &format!("{masked}  (hidden)")),
        "{:?}",
        labels(&h)
    );
}

#[test]
fn hide_now_hides_at_once() {
    let server = Server::start();
    let key = server.widget_key(OWNER);
    let (mut h, _clock) = harness(settings(&server.url(), &key, &server.funding_card));
    wait_for(&mut h, "the card list", |h| shows(h, "closed"));
    generate(&mut h, "10");
    click(&mut h, "Hide now");
    h.step();
    assert_eq!(number_on_screen(&h), None);
}

#[test]
fn a_bad_amount_is_named_and_nothing_is_issued() {
    let server = Server::start();
    let key = server.widget_key(OWNER);
    let (mut h, _clock) = harness(settings(&server.url(), &key, &server.funding_card));
    wait_for(&mut h, "the card list", |h| shows(h, "closed"));
    type_into(&mut h, "Amount", "12.345");
    click(&mut h, "Generate");
    h.step();
    assert!(
        shows(&h, "Amount: EUR has 2 decimal places"),
        "{:?}",
        labels(&h)
    );
    let mut cards = server.cards(&key);
    let listed = server
        .rt
        .block_on(cards.list_cards(pb::ListCardsRequest::default()))
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = listed.cards.iter().map(|c| c.card_id.as_str()).collect();
    assert_eq!(ids, [server.funding_card.as_str()], "no card was issued");
}

#[test]
fn a_wrong_key_is_said_in_plain_words() {
    let server = Server::start();
    server.widget_key(OWNER);
    let (mut h, _clock) = harness(settings(
        &server.url(),
        "vcn_not_a_key",
        &server.funding_card,
    ));
    wait_for(&mut h, "the refused key", |h| {
        shows(
            h,
            "Could not load your cards: the card service did not accept this widget's key",
        )
    });
    click(&mut h, "Dismiss");
    type_into(&mut h, "Amount", "10");
    click(&mut h, "Generate");
    wait_for(&mut h, "the refused issue", |h| {
        shows(
            h,
            "Could not make a card: the card service did not accept this widget's key",
        )
    });
    assert!(shows(&h, "not connected"));
    assert_eq!(number_on_screen(&h), None);
}

#[test]
fn a_key_not_pinned_to_a_cardholder_is_said_in_plain_words() {
    let server = Server::start();
    let key = vcn::clients::add(
        &server.config.keys_dir,
        "web",
        vcn::clients::Role::Cards,
        None,
    )
    .expect("add client");
    let (mut h, _clock) = harness(settings(&server.url(), &key, &server.funding_card));
    wait_for(&mut h, "the explanation", |h| {
        shows(h, "this widget's key is not tied to a cardholder")
    });
}

#[test]
fn a_stopped_service_is_said_in_plain_words() {
    // A port nobody listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let url = format!("http://{addr}");
    let (mut h, _clock) = harness(settings(&url, "vcn_any", NO_CARD));
    wait_for(&mut h, "the connection error", |h| {
        shows(h, &format!("the card service at {url} cannot be reached"))
    });
    assert!(shows(&h, "offline, retrying"));
}

#[test]
fn the_window_stays_responsive_while_the_service_does_not_answer() {
    // A service that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let url = format!("http://{addr}");
    let mut s = settings(&url, "vcn_any", NO_CARD);
    s.call_timeout = Duration::from_secs(5);
    let (mut h, _clock) = harness(s);
    type_into(&mut h, "Amount", "10");
    click(&mut h, "Generate");
    h.step();
    assert!(shows(&h, "Asking the card service…"));

    // While the call hangs, frames keep coming and typing works.
    type_into(&mut h, "Shop", "still-typing");
    assert_eq!(
        h.get_by_label("Shop").value().as_deref(),
        Some("still-typing")
    );
    assert!(
        shows(&h, "Asking the card service…"),
        "the call is still out"
    );

    wait_for(&mut h, "the timeout", |h| {
        shows(
            h,
            &format!(
                "Could not make a card: the card service at {url} did not answer within 5 seconds"
            ),
        )
    });
    assert!(!shows(&h, "Asking the card service…"));
}

#[test]
fn a_purchase_shows_as_a_notification() {
    let server = Server::start();
    let key = server.widget_key(OWNER);
    let (mut h, _clock) = harness(settings(&server.url(), &key, &server.funding_card));
    wait_for(&mut h, "live updates", |h| {
        shows(h, "live") && shows(h, "closed")
    });
    let pan = generate(&mut h, "50");
    let cvv = after(&h, "CVV ").expect("cvv");
    let expiry = after(&h, "Expires ").expect("expiry");
    let (mm, yy) = expiry.split_once('/').expect("MM/YY");

    let mut switch = server.switch();
    let auth = server
        .rt
        .block_on(switch.authorize(pb::AuthorizeRequest {
            transaction_id: "t-77".into(),
            pan,
            expiry_month: mm.parse().unwrap(),
            expiry_year: 2000 + yy.parse::<u32>().unwrap(),
            cvv,
            amount: Some(pb::Money {
                amount_minor: 1250,
                currency: "EUR".into(),
            }),
            merchant_id: "grocer-17".into(),
            mcc: "5411".into(),
        }))
        .expect("authorize")
        .into_inner();
    assert!(auth.approved, "{}", auth.decline_reason);

    wait_for(&mut h, "the purchase notification", |h| {
        shows(h, "Purchase: 12.50 EUR at grocer-17")
    });
    assert!(shows(&h, "approved. 37.50 EUR left."));
    // The row follows: single use, so used, with what was spent.
    wait_for(&mut h, "the used card in the list", |h| shows(h, "used"));
    assert!(shows(&h, "12.50 EUR") && shows(&h, "37.50 EUR"));
}

#[test]
fn pause_resume_and_close_from_the_list() {
    let server = Server::start();
    let key = server.widget_key(OWNER);
    let mut cards = server.cards(&key);
    let issued = server
        .rt
        .block_on(cards.issue_card(pb::IssueCardRequest {
            funding_pan: FUNDING.into(),
            spend_limit: Some(pb::Money {
                amount_minor: 3000,
                currency: "EUR".into(),
            }),
            ..Default::default()
        }))
        .expect("issue")
        .into_inner();
    let id = issued.card.expect("card").card_id;
    let state = |s: &Server| pb::CardState::try_from(s.get_card(&key, &id).state).unwrap();

    let (mut h, _clock) = harness(settings(&server.url(), &key, &server.funding_card));
    wait_for(&mut h, "the card in the list", |h| shows(h, "active"));
    assert!(shows(&h, "30.00 EUR"));

    click(&mut h, "Pause");
    wait_for(&mut h, "the paused card", |h| shows(h, "paused"));
    assert_eq!(state(&server), pb::CardState::Paused);

    click(&mut h, "Resume");
    wait_for(&mut h, "the resumed card", |h| shows(h, "active"));
    assert_eq!(state(&server), pb::CardState::Active);

    click(&mut h, "Close");
    h.step();
    assert_eq!(state(&server), pb::CardState::Active, "close asks first");
    click(&mut h, "Really close?");
    wait_for(&mut h, "the closed card", |h| {
        labels(h).iter().filter(|l| *l == "closed").count() == 2
    });
    assert_eq!(state(&server), pb::CardState::Closed);
    assert!(h.query_by_label("Resume").is_none() && h.query_by_label("Pause").is_none());
}
