//! The widget's state and what changes it: plain code, no egui, no network.
//!
//! The view reads a [`Model`] and turns clicks into [`Command`]s; the
//! backend answers with [`Reply`]s, which [`Model::apply`] folds in. Time
//! comes in as an argument, so the reveal timeout is tested without waiting.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use vcn::api::pb;
use vcn::domain::Money;

use crate::config::{FundingCard, Settings};
use crate::form::{Form, FormError};
use crate::secret::Revealed;

/// Something for the backend to do.
#[derive(Debug)]
pub enum Command {
    /// Load the cardholder's cards.
    Refresh,
    Issue(Box<pb::IssueCardRequest>),
    Change(Action, String),
}

/// A change to one card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Close,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Pause => "Pause",
            Action::Resume => "Resume",
            Action::Close => "Close",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Close => "close",
        }
    }
}

/// What the backend has to say.
#[derive(Debug)]
pub enum Reply {
    /// The cardholder's cards, newest first.
    Cards(Result<Vec<pb::Card>, String>),
    /// The answer to an Issue (it carries the new number and CVV).
    Issued(Result<Box<pb::IssueCardResponse>, String>),
    Changed(Action, String, Result<Box<pb::Card>, String>),
    /// An event that happened while the widget runs.
    Event(Box<pb::CardEvent>),
    /// A card as it is now (after an event about it).
    Card(Box<pb::Card>),
    Live(Live),
}

/// Whether live updates (WatchEvents) are flowing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    Connecting,
    Connected,
    /// Lost; the backend retries.
    Lost(String),
    /// Refused for good (e.g. a wrong key): no retry.
    Refused(String),
}

/// A line in the notification area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub id: u64,
    pub text: String,
    /// A declined purchase or a blocked card: shown in warning colours.
    pub warning: bool,
}

/// At most this many notices are kept (oldest dropped).
const MAX_NOTICES: usize = 5;

pub struct Model {
    pub funding: Vec<String>,
    pub form: Form,
    pub form_error: Option<FormError>,
    /// An IssueCard call is in flight.
    pub issuing: bool,
    /// The new card's number, expiry and CVV, while they may be shown.
    pub revealed: Option<Revealed>,
    /// The card issued last (masked), once its number is hidden again.
    pub last_issued: Option<pb::Card>,
    pub reveal_for: Duration,
    /// A detail of the shown card was copied to the clipboard.
    copied: bool,
    /// The clipboard is to be emptied (the copied detail was hidden).
    clear_clipboard: bool,
    pub cards: Vec<pb::Card>,
    /// Cards whose change is in flight.
    pub busy: HashSet<String>,
    /// A card whose Close was clicked once and waits for confirmation.
    pub confirm_close: Option<String>,
    pub notices: VecDeque<Notice>,
    next_notice: u64,
    /// The last failure, in plain words, until dismissed or superseded.
    pub error: Option<String>,
    pub live: Live,
    /// The card list was loaded at least once.
    pub loaded: bool,
    funding_cards: Vec<FundingCard>,
}

impl Model {
    pub fn new(settings: &Settings) -> Model {
        Model {
            funding: settings
                .funding_cards
                .iter()
                .map(FundingCard::display)
                .collect(),
            form: Form::new(settings.currency.code()),
            form_error: None,
            issuing: false,
            revealed: None,
            last_issued: None,
            reveal_for: settings.reveal_for,
            copied: false,
            clear_clipboard: false,
            cards: Vec::new(),
            busy: HashSet::new(),
            confirm_close: None,
            notices: VecDeque::new(),
            next_notice: 0,
            error: None,
            live: Live::Connecting,
            loaded: false,
            funding_cards: settings.funding_cards.clone(),
        }
    }

    /// Generate was clicked: the request to send, or None (the form is
    /// wrong, said in `form_error`, or a card is already being made).
    pub fn generate(&mut self, now: OffsetDateTime) -> Option<Command> {
        if self.issuing {
            return None;
        }
        match self.form.request(&self.funding_cards, now) {
            Ok(req) => {
                self.form_error = None;
                self.error = None;
                self.hide();
                self.last_issued = None;
                self.issuing = true;
                Some(Command::Issue(Box::new(req)))
            }
            Err(e) => {
                self.form_error = Some(e);
                None
            }
        }
    }

    /// A card's Pause/Resume/Close was clicked. Close asks once more first.
    pub fn change(&mut self, action: Action, card_id: &str) -> Option<Command> {
        if self.busy.contains(card_id) {
            return None;
        }
        if action == Action::Close && self.confirm_close.as_deref() != Some(card_id) {
            self.confirm_close = Some(card_id.to_string());
            return None;
        }
        self.confirm_close = None;
        self.busy.insert(card_id.to_string());
        Some(Command::Change(action, card_id.to_string()))
    }

    /// Hides the new card's details now (their memory is wiped).
    pub fn hide(&mut self) {
        if let Some(r) = self.revealed.take() {
            if let Some(card) = self.cards.iter().find(|c| c.card_id == r.card_id) {
                self.last_issued = Some(card.clone());
            }
        }
        // What was copied goes with it: the number does not outlive its
        // reveal time on the clipboard either.
        self.clear_clipboard |= std::mem::take(&mut self.copied);
    }

    /// A detail of the shown card was put on the clipboard.
    pub fn copied(&mut self) {
        self.copied = self.revealed.is_some();
    }

    /// Whether the clipboard is to be emptied now (once).
    pub fn take_clear_clipboard(&mut self) -> bool {
        std::mem::take(&mut self.clear_clipboard)
    }

    /// Hides the details once their time is up; returns how long until
    /// that happens otherwise (for a repaint then).
    pub fn tick(&mut self, now: Instant) -> Option<Duration> {
        let r = self.revealed.as_ref()?;
        if r.expired(now, self.reveal_for) {
            self.hide();
            None
        } else {
            Some(r.left(now, self.reveal_for))
        }
    }

    pub fn dismiss(&mut self, notice: u64) {
        self.notices.retain(|n| n.id != notice);
    }

    fn notify(&mut self, text: String, warning: bool) {
        self.next_notice += 1;
        self.notices.push_front(Notice {
            id: self.next_notice,
            text,
            warning,
        });
        self.notices.truncate(MAX_NOTICES);
    }

    /// Puts `card` in the list (replacing its old row, or newest first).
    fn upsert(&mut self, card: pb::Card) {
        match self.cards.iter_mut().find(|c| c.card_id == card.card_id) {
            Some(row) => *row = card,
            None => self.cards.insert(0, card),
        }
    }

    pub fn apply(&mut self, reply: Reply, now: Instant) {
        match reply {
            Reply::Cards(Ok(cards)) => {
                self.cards = cards;
                self.loaded = true;
            }
            Reply::Cards(Err(e)) => self.error = Some(format!("Could not load your cards: {e}")),
            Reply::Issued(result) => {
                self.issuing = false;
                match result {
                    Ok(mut resp) => {
                        match Revealed::take(&mut resp, now) {
                            Some(r) => {
                                if let Some(card) = resp.card.take() {
                                    self.upsert(card);
                                }
                                self.revealed = Some(r);
                            }
                            None => self.error = Some(
                                "Could not make a card: the service's answer had no valid number"
                                    .into(),
                            ),
                        }
                    }
                    Err(e) => self.error = Some(format!("Could not make a card: {e}")),
                }
            }
            Reply::Changed(action, card_id, result) => {
                self.busy.remove(&card_id);
                match result {
                    Ok(card) => self.upsert(*card),
                    Err(e) => {
                        self.error = Some(format!("Could not {} the card: {e}", action.verb()))
                    }
                }
            }
            Reply::Event(ev) => self.event(&ev),
            Reply::Card(card) => self.upsert(*card),
            Reply::Live(live) => self.live = live,
        }
    }

    /// A live event: the row follows it at once (the backend fetches the
    /// whole card next), and purchases, refunds, blocks and expiries are
    /// announced.
    fn event(&mut self, ev: &pb::CardEvent) {
        use pb::CardEventType as T;
        if let Some(row) = self.cards.iter_mut().find(|c| c.card_id == ev.card_id) {
            row.state = ev.state;
            if let (Some(remaining), Some(limit)) = (&ev.remaining, &row.spend_limit) {
                row.remaining = Some(remaining.clone());
                row.spent = Some(pb::Money {
                    amount_minor: limit.amount_minor - remaining.amount_minor,
                    currency: limit.currency.clone(),
                });
            }
        }
        let card = last4_of(&ev.masked_pan);
        let amount = money(&ev.amount);
        let at = if ev.merchant_id.is_empty() {
            String::new()
        } else {
            format!(" at {}", ev.merchant_id)
        };
        match T::try_from(ev.r#type) {
            Ok(T::Authorized) if ev.approved => self.notify(
                format!(
                    "Purchase: {amount}{at} with card {card}, approved. {} left.",
                    money(&ev.remaining)
                ),
                false,
            ),
            Ok(T::Authorized) => self.notify(
                format!(
                    "Declined: {amount}{at} with card {card} ({}).",
                    ev.decline_reason.replace('_', " ")
                ),
                true,
            ),
            Ok(T::Reversed) => {
                self.notify(format!("Refund: {amount}{at} back on card {card}."), false)
            }
            Ok(T::Blocked) => self.notify(
                format!(
                    "Card {card} is blocked after wrong security codes. Resume it if that was you."
                ),
                true,
            ),
            Ok(T::Expired) => self.notify(format!("Card {card} has expired."), true),
            _ => {}
        }
    }
}

/// `411111******1234` → `•••• 1234`.
pub fn last4_of(masked: &str) -> String {
    let tail = &masked[masked.len().saturating_sub(4)..];
    format!("•••• {tail}")
}

/// `10.50 EUR`; the raw fields if the currency is unknown; "" if unset.
pub fn money(m: &Option<pb::Money>) -> String {
    match m {
        None => String::new(),
        Some(m) => match Money::parse(m.amount_minor, &m.currency) {
            Ok(x) => x.to_string(),
            Err(_) => format!("{} {}", m.amount_minor, m.currency),
        },
    }
}

/// A card state in words.
pub fn state_word(state: i32) -> &'static str {
    match pb::CardState::try_from(state) {
        Ok(pb::CardState::Active) => "active",
        Ok(pb::CardState::Paused) => "paused",
        Ok(pb::CardState::Blocked) => "blocked",
        Ok(pb::CardState::Used) => "used",
        Ok(pb::CardState::Closed) => "closed",
        _ => "unknown",
    }
}

/// The changes a card in `state` can take.
pub fn actions_for(state: i32) -> &'static [Action] {
    match pb::CardState::try_from(state) {
        Ok(pb::CardState::Active) => &[Action::Pause, Action::Close],
        Ok(pb::CardState::Paused) | Ok(pb::CardState::Blocked) => &[Action::Resume, Action::Close],
        _ => &[],
    }
}

/// Whether an event happened while the widget runs (those before are
/// history the card list already shows: skipped, not announced). The
/// service stamps events to the second, so the second the widget started
/// in counts as live: an event in it may be announced although the list
/// already had it, never the other way round.
pub fn is_live(ev: &pb::CardEvent, since: OffsetDateTime) -> bool {
    ev.occurred_at
        .as_ref()
        .is_some_and(|t| t.seconds >= since.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKey;

    fn settings() -> Settings {
        Settings::new(
            "http://127.0.0.1:1",
            ApiKey::new("k"),
            vec![FundingCard {
                label: "Visa".into(),
                card_id: vcn::domain::CardId::parse("card_id", "vc_0123456789abcdef01234567")
                    .unwrap(),
            }],
        )
    }

    fn eur(n: i64) -> Option<pb::Money> {
        Some(pb::Money {
            amount_minor: n,
            currency: "EUR".into(),
        })
    }

    fn card(id: &str, state: pb::CardState) -> pb::Card {
        pb::Card {
            card_id: id.into(),
            masked_pan: "411111******8909".into(),
            state: state as i32,
            spend_limit: eur(5000),
            spent: eur(0),
            remaining: eur(5000),
            ..Default::default()
        }
    }

    fn issued(id: &str) -> Box<pb::IssueCardResponse> {
        Box::new(pb::IssueCardResponse {
            card: Some(card(id, pb::CardState::Active)),
            pan: "4111112345678909".into(),
            expiry_month: 3,
            expiry_year: 2027,
            cvv: "123".into(),
        })
    }

    const NOW: OffsetDateTime = time::macros::datetime!(2026-01-01 12:00 UTC);

    #[test]
    fn generate_reveal_then_hide_after_the_timeout() {
        let mut m = Model::new(&settings());
        assert!(m.generate(NOW).is_none(), "empty amount");
        assert_eq!(m.form_error.as_ref().unwrap().field, "Amount");
        m.form.amount = "50".into();
        let Some(Command::Issue(req)) = m.generate(NOW) else {
            panic!("an issue command")
        };
        assert_eq!(req.spend_limit.unwrap().amount_minor, 5000);
        assert!(m.issuing && m.form_error.is_none());
        assert!(m.generate(NOW).is_none(), "one card at a time");

        let t0 = Instant::now();
        m.apply(Reply::Issued(Ok(issued("c1"))), t0);
        assert!(!m.issuing);
        assert_eq!(m.revealed.as_ref().unwrap().card_id, "c1");
        assert_eq!(m.cards[0].card_id, "c1", "the new card heads the list");
        assert_eq!(
            m.tick(t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(50))
        );
        assert!(m.revealed.is_some());
        m.copied();
        assert!(!m.take_clear_clipboard(), "not while shown");
        assert_eq!(m.tick(t0 + Duration::from_secs(60)), None);
        assert!(m.revealed.is_none(), "hidden after the timeout");
        assert!(
            m.take_clear_clipboard(),
            "the copied number leaves the clipboard"
        );
        assert!(!m.take_clear_clipboard(), "once");
        assert_eq!(
            m.last_issued.as_ref().unwrap().masked_pan,
            "411111******8909"
        );
    }

    #[test]
    fn a_refused_issue_says_why_and_frees_the_button() {
        let mut m = Model::new(&settings());
        m.form.amount = "5".into();
        m.generate(NOW).unwrap();
        m.apply(
            Reply::Issued(Err("the card service refused it: x".into())),
            Instant::now(),
        );
        assert!(!m.issuing);
        assert_eq!(
            m.error.as_deref(),
            Some("Could not make a card: the card service refused it: x")
        );
        assert!(m.generate(NOW).is_some());
    }

    #[test]
    fn close_asks_twice_and_changes_are_one_at_a_time() {
        let mut m = Model::new(&settings());
        m.apply(
            Reply::Cards(Ok(vec![card("c1", pb::CardState::Active)])),
            Instant::now(),
        );
        assert!(m.change(Action::Close, "c1").is_none());
        assert_eq!(m.confirm_close.as_deref(), Some("c1"));
        assert!(matches!(
            m.change(Action::Close, "c1"),
            Some(Command::Change(Action::Close, _))
        ));
        assert!(m.change(Action::Pause, "c1").is_none(), "busy");
        m.apply(
            Reply::Changed(
                Action::Close,
                "c1".into(),
                Ok(Box::new(card("c1", pb::CardState::Closed))),
            ),
            Instant::now(),
        );
        assert!(m.busy.is_empty());
        assert_eq!(state_word(m.cards[0].state), "closed");
        assert!(actions_for(m.cards[0].state).is_empty());
        m.apply(
            Reply::Changed(
                Action::Pause,
                "c1".into(),
                Err("not possible now: closed".into()),
            ),
            Instant::now(),
        );
        assert_eq!(
            m.error.as_deref(),
            Some("Could not pause the card: not possible now: closed")
        );
    }

    #[test]
    fn a_purchase_updates_the_row_and_is_announced() {
        let mut m = Model::new(&settings());
        m.apply(
            Reply::Cards(Ok(vec![card("c1", pb::CardState::Active)])),
            Instant::now(),
        );
        let ev = pb::CardEvent {
            r#type: pb::CardEventType::Authorized as i32,
            card_id: "c1".into(),
            masked_pan: "411111******8909".into(),
            state: pb::CardState::Used as i32,
            remaining: eur(3750),
            amount: eur(1250),
            approved: true,
            response_code: "00".into(),
            merchant_id: "grocer-17".into(),
            ..Default::default()
        };
        m.apply(Reply::Event(Box::new(ev.clone())), Instant::now());
        assert_eq!(
            m.notices[0].text,
            "Purchase: 12.50 EUR at grocer-17 with card •••• 8909, approved. 37.50 EUR left."
        );
        assert!(!m.notices[0].warning);
        assert_eq!(money(&m.cards[0].spent), "12.50 EUR");
        assert_eq!(state_word(m.cards[0].state), "used");
        let declined = pb::CardEvent {
            approved: false,
            decline_reason: "insufficient_funds".into(),
            ..ev
        };
        m.apply(Reply::Event(Box::new(declined)), Instant::now());
        assert!(
            m.notices[0].text.contains("Declined")
                && m.notices[0].text.contains("insufficient funds")
        );
        assert!(m.notices[0].warning);
        for _ in 0..10 {
            m.notify("x".into(), false);
        }
        assert_eq!(m.notices.len(), MAX_NOTICES);
        let id = m.notices[0].id;
        m.dismiss(id);
        assert!(m.notices.iter().all(|n| n.id != id));
    }

    #[test]
    fn history_is_not_live() {
        let at = |secs| pb::CardEvent {
            occurred_at: Some(prost_types::Timestamp {
                seconds: NOW.unix_timestamp() + secs,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert!(!is_live(&at(-1), NOW));
        assert!(is_live(&at(0), NOW));
        let mid_second = NOW + time::Duration::milliseconds(700);
        assert!(is_live(&at(0), mid_second), "stamped to the second");
        assert!(is_live(&at(5), NOW));
        assert!(!is_live(&pb::CardEvent::default(), NOW));
    }
}
