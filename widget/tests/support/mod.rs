//! A real vcn server in-process on 127.0.0.1:0 (temporary directory), the
//! widget in an egui_kittest harness pointed at it, and helpers to wait for
//! what the window shows.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::accesskit::Role as A11y;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use vcn::api::pb;
use vcn::api::pb::authorization_service_client::AuthorizationServiceClient;
use vcn::api::pb::card_service_client::CardServiceClient;
use vcn::clients::{self, Role};
use vcn::config::Config;
use vcn::domain::CardId;
use vcn_widget::config::{ApiKey, FundingCard, Settings};
use vcn_widget::{Clock, ManualClock, WidgetApp};

pub const FUNDING: &str = "4111111111111111";
pub const OWNER: &str = "alice";

#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Cards = CardServiceClient<InterceptedService<Channel, Bearer>>;
pub type Switch = AuthorizationServiceClient<InterceptedService<Channel, Bearer>>;

pub struct Server {
    pub addr: SocketAddr,
    /// A card the bank issued to OWNER on FUNDING: the widget names its
    /// funding card by this id.
    pub funding_card: String,
    pub config: Config,
    pub rt: Runtime,
    _dir: TempDir,
}

impl Server {
    pub fn start() -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().join("data"),
            keys_dir: dir.path().join("keys"),
            ..Config::default()
        };
        let addr = rt.block_on(async {
            let service = vcn::server::Service::open(&config)
                .await
                .expect("server opens");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(service.serve(listener, std::future::pending()));
            addr
        });
        let mut server = Server {
            addr,
            funding_card: String::new(),
            config,
            rt,
            _dir: dir,
        };
        server.funding_card = server.enrol(OWNER);
        server
    }

    /// What the bank does once per funding card: issue a card on it (with
    /// the real number, through a full cards key), whose id the widget
    /// then uses.
    pub fn enrol(&self, owner: &str) -> String {
        let n = clients::list(&self.config.keys_dir)
            .map(|l| l.len())
            .unwrap_or(0);
        let key = clients::add(
            &self.config.keys_dir,
            &format!("bank{n}"),
            Role::Cards,
            None,
        )
        .expect("add client");
        let mut c = self.cards(&key);
        let r = self
            .rt
            .block_on(c.issue_card(pb::IssueCardRequest {
                funding_pan: FUNDING.into(),
                owner: owner.into(),
                spend_limit: Some(pb::Money {
                    amount_minor: 100,
                    currency: "EUR".into(),
                }),
                ..Default::default()
            }))
            .expect("enrol the funding card")
            .into_inner();
        let id = r.card.expect("card").card_id;
        // Closed at once: it only names the funding card (until it is
        // purged), and shows in the widget's list as a closed row.
        self.rt
            .block_on(c.close_card(pb::CardRef {
                card_id: id.clone(),
            }))
            .expect("close the enrolment card");
        id
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A cards key pinned to `owner`, as a cardholder's widget gets.
    pub fn widget_key(&self, owner: &str) -> String {
        let n = clients::list(&self.config.keys_dir)
            .map(|l| l.len())
            .unwrap_or(0);
        clients::add(
            &self.config.keys_dir,
            &format!("widget{n}"),
            Role::Cards,
            Some(owner),
        )
        .expect("add client")
    }

    fn channel(&self, key: &str) -> InterceptedService<Channel, Bearer> {
        let channel = self.rt.block_on(async {
            Channel::from_shared(self.url())
                .expect("uri")
                .connect()
                .await
                .expect("connect")
        });
        let header = format!("Bearer {key}").parse().expect("header");
        InterceptedService::new(channel, Bearer(header))
    }

    pub fn cards(&self, key: &str) -> Cards {
        CardServiceClient::new(self.channel(key))
    }

    pub fn switch(&self) -> Switch {
        let n = clients::list(&self.config.keys_dir)
            .map(|l| l.len())
            .unwrap_or(0);
        let key = clients::add(
            &self.config.keys_dir,
            &format!("switch{n}"),
            Role::Switch,
            None,
        )
        .expect("add client");
        AuthorizationServiceClient::new(self.channel(&key))
    }

    pub fn get_card(&self, key: &str, card_id: &str) -> pb::Card {
        let mut c = self.cards(key);
        self.rt
            .block_on(c.get_card(pb::GetCardRequest {
                card_id: card_id.into(),
            }))
            .expect("get card")
            .into_inner()
    }
}

/// A funding card id for settings against no server.
pub const NO_CARD: &str = "vc_0123456789abcdef01234567";

pub fn settings(server: &str, key: &str, funding_card: &str) -> Settings {
    Settings::new(
        server,
        ApiKey::new(key),
        vec![FundingCard {
            label: "Visa debit".into(),
            card_id: CardId::parse("card_id", funding_card).expect("card id"),
        }],
    )
}

pub type Ui = Harness<'static, WidgetApp>;

pub fn harness_with(settings: Settings, clock: Arc<dyn Clock>) -> Ui {
    let app = WidgetApp::new(settings, clock);
    Harness::builder()
        .with_size(vcn_widget::WINDOW_SIZE)
        .build_ui_state(|ui, app: &mut WidgetApp| app.show(ui), app)
}

pub fn harness(settings: Settings) -> (Ui, ManualClock) {
    let clock = ManualClock::new();
    (harness_with(settings, Arc::new(clock.clone())), clock)
}

/// Steps the window (as a real one repaints) until `done` holds; fails
/// after a generous bound that only a broken widget reaches.
#[track_caller]
pub fn wait_for(h: &mut Ui, what: &str, done: impl Fn(&Ui) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        h.step();
        if done(h) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the window never showed {what}; it shows {:?}",
            labels(h)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether any text on screen contains `needle`.
pub fn shows(h: &Ui, needle: &str) -> bool {
    labels(h).iter().any(|l| l.contains(needle))
}

/// Every text on screen: the labels' text, the buttons' names.
pub fn labels(h: &Ui) -> Vec<String> {
    h.query_all_by(|n| matches!(n.role(), A11y::Label | A11y::Button))
        .filter_map(|n| {
            let n = n.accesskit_node();
            match n.role() {
                A11y::Label => n.value(),
                _ => n.label(),
            }
        })
        .collect()
}

/// The card number on screen, as printed (groups of four digits).
pub fn number_on_screen(h: &Ui) -> Option<String> {
    labels(h).into_iter().find(|l| {
        let groups: Vec<&str> = l.split(' ').collect();
        groups.len() >= 4
            && groups
                .iter()
                .all(|g| (1..=4).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The text after `prefix` in the label that starts with it.
pub fn after(h: &Ui, prefix: &str) -> Option<String> {
    labels(h)
        .into_iter()
        .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
}

/// Types into the field labelled `label`.
pub fn type_into(h: &mut Ui, label: &str, text: &str) {
    click(h, label);
    h.get_by_label(label).type_text(text);
    settle(h);
}

/// Clicks the button or field named `label`.
pub fn click(h: &mut Ui, label: &str) {
    h.get_by_label(label).click();
    settle(h);
}

/// Runs the queued input, then one more frame, so that what the input
/// changed is laid out (a click's effect shows in the frame after it).
pub fn settle(h: &mut Ui) {
    h.step();
    h.step();
}

/// Fills the amount, presses Generate and waits for the number.
pub fn generate(h: &mut Ui, amount: &str) -> String {
    type_into(h, "Amount", amount);
    click(h, "Generate");
    wait_for(h, "the new card number", |h| number_on_screen(h).is_some());
    number_on_screen(h).expect("number").replace(' ', "")
}

/// What the last frame put on the clipboard.
pub fn copied_texts(h: &Ui) -> Vec<String> {
    h.output()
        .platform_output
        .commands
        .iter()
        .filter_map(|c| match c {
            egui::OutputCommand::CopyText(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}
