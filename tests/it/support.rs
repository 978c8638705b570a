//! A real server on 127.0.0.1:0 in a temporary directory, and clients for it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use vcn::api::pb;
use vcn::api::pb::authorization_service_client::AuthorizationServiceClient;
use vcn::api::pb::card_service_client::CardServiceClient;
use vcn::clients::{self, Role};
use vcn::config::Config;
use vcn::server::{Service, StartError};
use vcn::vault::chaos::ChaosStore;

pub const FUNDING: &str = "4111111111111111";

#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Chan = InterceptedService<Channel, Bearer>;
pub type Cards = CardServiceClient<Chan>;
pub type Switch = AuthorizationServiceClient<Chan>;

pub struct TestServer {
    pub addr: SocketAddr,
    /// The running server's vault, for tests that drive it directly (and
    /// to drive key rotation as SIGHUP does).
    pub vault: Arc<vcn::vault::Vault>,
    pub dir: Arc<TempDir>,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), StartError>>>,
}

/// A configuration in `dir`, on the engine under test (a fresh database
/// for PostgreSQL).
pub fn config_in(dir: &Path) -> Config {
    Config {
        data_dir: dir.join("data"),
        keys_dir: dir.join("keys"),
        engine: crate::engine::embedded_kind(),
        store: crate::engine::fresh_store(),
        ..Config::default()
    }
}

/// Everything the vault's engine holds at rest, as bytes to scan: the embedded engine's
/// files, or a `pg_dump` of the database (its bytea values decoded).
pub fn bytes_at_rest(config: &Config) -> Vec<u8> {
    match &config.store {
        None => all_bytes(&config.data_dir),
        Some(url) => crate::engine::dump_database(url.expose()),
    }
}

fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

/// The configured engine's store, opened directly (the server stopped),
/// for tests that read or tamper with records.
pub async fn open_store(config: &Config) -> Arc<dyn vcn::vault::Store> {
    match vcn::server::open_store(config).await {
        Ok(s) => s,
        Err(e) => panic!("open the store: {e}"),
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let config = config_in(dir.path());
        Self::start_with(dir, config).await
    }

    /// Starts a server with `config` (its directories inside `dir`).
    pub async fn start_with(dir: Arc<TempDir>, config: Config) -> TestServer {
        Self::try_start_with(dir, config)
            .await
            .expect("server starts")
    }

    pub async fn try_start_with(
        dir: Arc<TempDir>,
        config: Config,
    ) -> Result<TestServer, StartError> {
        let service = Service::open(&config).await?;
        Ok(Self::serve(service, dir, config).await)
    }

    /// Starts a server whose store can be slowed or failed on demand.
    pub async fn start_chaos(
        config: impl FnOnce(&Path) -> Config,
    ) -> (TestServer, Arc<ChaosStore>) {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let config = config(dir.path());
        let mut chaos = None;
        let service = Service::open_with(&config, |inner| {
            let c = ChaosStore::new(inner);
            chaos = Some(c.clone());
            c
        })
        .await
        .expect("server starts");
        let server = Self::serve(service, dir, config).await;
        (server, chaos.expect("store wrapped"))
    }

    async fn serve(service: Service, dir: Arc<TempDir>, config: Config) -> TestServer {
        let vault = service.vault.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(service.serve(listener, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            vault,
            dir,
            config,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Tells the server to shut down, without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the server to have stopped, and how it ended.
    pub async fn stopped(&mut self) -> Result<(), StartError> {
        match self.task.take() {
            Some(task) => task.await.expect("server task"),
            None => Ok(()),
        }
    }

    /// Stops the server cleanly and waits until its vault is closed.
    pub async fn stop(mut self) -> (Arc<TempDir>, Config) {
        self.shutdown().await;
        (self.dir.clone(), self.config.clone())
    }

    async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server stops cleanly");
        }
    }

    /// Restarts on the same directories.
    pub async fn restart(self) -> TestServer {
        let (dir, config) = self.stop().await;
        TestServer::start_with(dir, config).await
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.config.keys_dir.clone()
    }

    pub fn add_client(&self, name: &str, role: Role, owner: Option<&str>) -> String {
        clients::add(&self.config.keys_dir, name, role, owner).expect("add client")
    }

    pub async fn channel(&self, key: Option<&str>) -> Chan {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let header = key.map(|k| format!("Bearer {k}").parse().expect("header"));
        InterceptedService::new(channel, Bearer(header))
    }

    pub async fn cards_as(&self, key: &str) -> Cards {
        CardServiceClient::new(self.channel(Some(key)).await)
    }

    pub async fn switch_as(&self, key: &str) -> Switch {
        AuthorizationServiceClient::new(self.channel(Some(key)).await)
    }

    /// A cards client and a switch client, freshly registered.
    pub async fn clients(&self) -> (Cards, Switch) {
        let n = clients::list(&self.config.keys_dir)
            .map(|l| l.len())
            .unwrap_or(0);
        let cards = self.add_client(&format!("web{n}"), Role::Cards, None);
        let switch = self.add_client(&format!("switch{n}"), Role::Switch, None);
        (self.cards_as(&cards).await, self.switch_as(&switch).await)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn eur(n: i64) -> Option<pb::Money> {
    Some(pb::Money {
        amount_minor: n,
        currency: "EUR".into(),
    })
}

pub fn issue_req(owner: &str, limit: i64) -> pb::IssueCardRequest {
    pb::IssueCardRequest {
        funding_pan: FUNDING.into(),
        owner: owner.into(),
        spend_limit: eur(limit),
        ..Default::default()
    }
}

pub async fn issue(cards: &mut Cards, req: pb::IssueCardRequest) -> pb::IssueCardResponse {
    cards.issue_card(req).await.expect("issue").into_inner()
}

/// An authorisation that passes every check of `card` for `amount` cents.
pub fn auth_req(card: &pb::IssueCardResponse, txn: &str, amount: i64) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        transaction_id: txn.into(),
        pan: card.pan.clone(),
        expiry_month: card.expiry_month,
        expiry_year: card.expiry_year,
        cvv: card.cvv.clone(),
        amount: eur(amount),
        merchant_id: "shop-1".into(),
        mcc: "5411".into(),
    }
}

pub async fn authorize(switch: &mut Switch, req: pb::AuthorizeRequest) -> pb::AuthorizeResponse {
    switch.authorize(req).await.expect("authorize").into_inner()
}

pub async fn get(cards: &mut Cards, card_id: &str) -> pb::Card {
    cards
        .get_card(pb::GetCardRequest {
            card_id: card_id.into(),
        })
        .await
        .expect("get card")
        .into_inner()
}

/// Asserts a call failed with `code` and a message naming `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} naming {needle:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "{:?} does not name {needle:?}",
                s.message()
            );
        }
    }
}

pub fn luhn_ok(digits: &str) -> bool {
    vcn::domain::pan::luhn_valid(digits)
}

pub fn amount(m: &Option<pb::Money>) -> i64 {
    m.as_ref().map(|m| m.amount_minor).expect("money present")
}

/// Waits for calls made side by side, each of which must either succeed or
/// be shed with RESOURCE_EXHAUSTED: how many were served, how many shed.
pub async fn served_and_shed(tasks: Vec<JoinHandle<Result<(), Status>>>) -> (usize, usize) {
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                shed += 1;
            }
        }
    }
    (ok, shed)
}
