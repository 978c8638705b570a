//! The network side: gRPC calls on a tokio runtime in a thread of its own,
//! so the window never waits on the network. Commands go in through a
//! channel; replies come back through another, each followed by a wake-up
//! call (a repaint request) so the window shows them at once.
//!
//! Besides answering commands it follows WatchEvents for the key's owner,
//! reconnecting with the last cursor when the stream drops.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc as tmpsc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use vcn::api::pb;
use vcn::api::pb::card_service_client::CardServiceClient;

use crate::config::Settings;
use crate::model::{is_live, Action, Command, Live, Reply};
use crate::words;

/// Called after each reply is sent (the window's repaint request).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Adds the API key to every call.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = CardServiceClient<InterceptedService<Channel, Bearer>>;

/// The handle the window holds. Dropping it stops the thread's work.
pub struct Backend {
    commands: tmpsc::UnboundedSender<Command>,
    replies: mpsc::Receiver<Reply>,
    _thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts the network thread for `settings`.
    pub fn start(settings: &Settings, wake: Wake) -> Backend {
        let (commands, command_rx) = tmpsc::unbounded_channel();
        let (reply_tx, replies) = mpsc::channel();
        let out = Outbox { tx: reply_tx, wake };
        let conn = Conn {
            server: settings.server.clone(),
            timeout: settings.call_timeout,
        };
        let settings = settings.clone();
        let thread = std::thread::Builder::new()
            .name("vcn-widget-net".into())
            .spawn(move || run(conn, &settings, command_rx, out))
            .ok();
        Backend {
            commands,
            replies,
            _thread: thread,
        }
    }

    pub fn send(&self, command: Command) {
        // The thread only ends when this handle is dropped.
        let _ = self.commands.send(command);
    }

    /// The next reply, if one has come.
    pub fn try_recv(&self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }
}

/// Where replies go.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Reply>,
    wake: Wake,
}

impl Outbox {
    fn send(&self, reply: Reply) {
        if self.tx.send(reply).is_ok() {
            (self.wake)();
        }
    }
}

/// What calls need to know to report failures.
#[derive(Clone)]
struct Conn {
    server: String,
    timeout: Duration,
}

impl Conn {
    /// Runs one unary call with the widget's own time bound.
    async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(words::timed_out(&self.server, self.timeout)),
            Ok(Err(status)) => Err(words::plain(&status, &self.server)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }
}

/// A client for the configured server (connected lazily), or why not.
fn connect(settings: &Settings) -> Result<Client, String> {
    let header: MetadataValue<Ascii> = format!("Bearer {}", settings.api_key.expose())
        .parse()
        .map_err(|_| "the API key has characters that cannot be sent; check api_key".to_string())?;
    let endpoint = Endpoint::from_shared(settings.server.clone())
        .map_err(|_| format!("the server address {} is not valid", settings.server))?
        .connect_timeout(Duration::from_secs(3));
    let channel = endpoint.connect_lazy();
    Ok(CardServiceClient::new(InterceptedService::new(
        channel,
        Bearer(header),
    )))
}

fn run(
    conn: Conn,
    settings: &Settings,
    mut commands: tmpsc::UnboundedReceiver<Command>,
    out: Outbox,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out.send(Reply::Live(Live::Refused(format!(
                "cannot start the network thread: {e}"
            ))));
            return;
        }
    };
    // The channel needs the runtime to exist (it spawns its connection task).
    let client = {
        let _inside = runtime.enter();
        connect(settings)
    };
    runtime.block_on(async move {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                // Every command gets the same answer.
                out.send(Reply::Live(Live::Refused(e.clone())));
                while let Some(cmd) = commands.recv().await {
                    out.send(failed(cmd, e.clone()));
                }
                return;
            }
        };
        let since = OffsetDateTime::now_utc();
        let watcher = tokio::spawn(watch(conn.clone(), client.clone(), out.clone(), since));
        while let Some(cmd) = commands.recv().await {
            tokio::spawn(handle(conn.clone(), client.clone(), out.clone(), cmd));
        }
        watcher.abort();
    });
}

/// The reply a command gets when there is no client at all.
fn failed(cmd: Command, e: String) -> Reply {
    match cmd {
        Command::Refresh => Reply::Cards(Err(e)),
        Command::Issue(_) => Reply::Issued(Err(e)),
        Command::Change(a, id) => Reply::Changed(a, id, Err(e)),
    }
}

async fn handle(conn: Conn, mut client: Client, out: Outbox, cmd: Command) {
    let reply = match cmd {
        Command::Refresh => Reply::Cards(list(&conn, &mut client).await),
        Command::Issue(req) => {
            Reply::Issued(conn.call(client.issue_card(*req)).await.map(Box::new))
        }
        Command::Change(action, card_id) => {
            let r = pb::CardRef {
                card_id: card_id.clone(),
            };
            let result = match action {
                Action::Pause => conn.call(client.pause_card(r)).await,
                Action::Resume => conn.call(client.resume_card(r)).await,
                Action::Close => conn.call(client.close_card(r)).await,
            };
            Reply::Changed(action, card_id, result.map(Box::new))
        }
    };
    out.send(reply);
}

/// Pages of the owner's cards, newest first (at most this many).
const MAX_LISTED: usize = 500;

async fn list(conn: &Conn, client: &mut Client) -> Result<Vec<pb::Card>, String> {
    let mut cards = Vec::new();
    let mut token = String::new();
    loop {
        let page = conn
            .call(client.list_cards(pb::ListCardsRequest {
                owner: String::new(),
                page_size: 100,
                page_token: token,
            }))
            .await?;
        cards.extend(page.cards);
        if page.next_page_token.is_empty() || cards.len() >= MAX_LISTED {
            return Ok(cards);
        }
        token = page.next_page_token;
    }
}

/// Follows the owner's events for as long as the widget runs. Events from
/// before `since` are history and are skipped; each live one is passed on,
/// then its card is fetched so its row shows the truth. On a drop it
/// reconnects after a pause (1 s, doubling to 10 s) with the last cursor,
/// and reloads the list, so nothing is missed; a refused key stops it.
async fn watch(conn: Conn, mut client: Client, out: Outbox, since: OffsetDateTime) {
    let mut cursor = String::new();
    let mut pause = Duration::from_secs(1);
    loop {
        let req = pb::WatchEventsRequest {
            owner: String::new(),
            after_cursor: cursor.clone(),
        };
        let opened = tokio::time::timeout(conn.timeout, client.watch_events(req)).await;
        let problem = match opened {
            Err(_) => words::timed_out(&conn.server, conn.timeout),
            Ok(Err(status))
                if matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied
                ) =>
            {
                out.send(Reply::Live(Live::Refused(words::plain(
                    &status,
                    &conn.server,
                ))));
                return;
            }
            Ok(Err(status)) => words::plain(&status, &conn.server),
            Ok(Ok(stream)) => {
                out.send(Reply::Live(Live::Connected));
                pause = Duration::from_secs(1);
                out.send(Reply::Cards(list(&conn, &mut client).await));
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            cursor = ev.cursor.clone();
                            if !is_live(&ev, since) {
                                continue;
                            }
                            let card_id = ev.card_id.clone();
                            out.send(Reply::Event(Box::new(ev)));
                            let get = client.get_card(pb::GetCardRequest { card_id });
                            if let Ok(card) = conn.call(get).await {
                                out.send(Reply::Card(Box::new(card)));
                            }
                        }
                        Ok(None) => break "the card service ended live updates".to_string(),
                        Err(status) => break words::plain(&status, &conn.server),
                    }
                }
            }
        };
        out.send(Reply::Live(Live::Lost(problem)));
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}
