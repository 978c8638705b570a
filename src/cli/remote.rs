//! Client commands: call a running service over gRPC.
//!
//! The server comes from `--server` or VCN_SERVER, the API key from
//! VCN_API_KEY only (a flag value would land in shell history). Output is
//! a readable listing, or JSON with `--json`. A card number given as `-`
//! is read from standard input.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::api::pb;
use crate::api::pb::admin_service_client::AdminServiceClient;
use crate::api::pb::authorization_service_client::AuthorizationServiceClient;
use crate::api::pb::card_service_client::CardServiceClient;
use crate::cli::{fail, EXIT_DECLINED, EXIT_UNAVAILABLE, EXIT_USAGE};
use crate::domain::Money;

#[derive(Args, Debug)]
pub struct Connection {
    /// The service's address.
    #[arg(
        long,
        env = "VCN_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    server: String,
    /// For an https:// server: the CA certificate (PEM) to trust, when the
    /// server's certificate is not from a public CA.
    #[arg(long, env = "VCN_CA", global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// For mTLS: this client's certificate (PEM), registered with
    /// `vcn client add --cert`; no API key is needed then.
    #[arg(long, env = "VCN_CERT", global = true, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// For mTLS: the private key (PEM) of --cert. (The API key, if any,
    /// comes from VCN_API_KEY, never from a flag.)
    #[arg(long, env = "VCN_CERT_KEY", global = true, value_name = "FILE")]
    cert_key: Option<PathBuf>,
    /// Print JSON instead of a listing.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// Issue and manage cards (needs a cards or admin key).
    Card {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: CardCommand,
    },
    /// Authorise a payment on a virtual number (needs a switch key).
    Authorize {
        #[command(flatten)]
        conn: Connection,
        /// The virtual card number, or - to read it from standard input.
        #[arg(long)]
        pan: String,
        /// Printed expiry, MM/YY or MM/YYYY.
        #[arg(long)]
        expiry: String,
        #[arg(long)]
        cvv: String,
        /// Amount and currency, e.g. 12.50EUR.
        #[arg(long)]
        amount: String,
        #[arg(long, default_value = "")]
        merchant: String,
        #[arg(long, default_value = "")]
        mcc: String,
        /// The transaction's id [default: a new random one].
        #[arg(long)]
        txn: Option<String>,
    },
    /// Reverse all or part of an approved authorisation (needs a switch key).
    Reverse {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        txn: String,
        /// Amount to reverse [default: all that is left].
        #[arg(long)]
        amount: Option<String>,
        #[arg(long, default_value = "")]
        reversal_id: String,
    },
    /// Save a consistent online backup of the vault (needs an admin key).
    /// Card numbers stay sealed in it; keep it like the data directory.
    Backup {
        #[command(flatten)]
        conn: Connection,
        /// The file to write (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Show the funding card of a virtual number (needs a switch key).
    Detokenize {
        #[command(flatten)]
        conn: Connection,
        /// The virtual card number, or - to read it from standard input.
        #[arg(long)]
        pan: String,
    },
    /// Print an owner's card events as they happen (needs a cards key):
    /// first those stored after --after, then new ones. Reconnects with
    /// the last cursor if the connection drops. With --json, one JSON
    /// object per line.
    Watch {
        #[command(flatten)]
        conn: Connection,
        /// Whose cards [default: the key's own owner, for a pinned key].
        #[arg(long, default_value = "")]
        owner: String,
        /// The cursor of the last event already seen [default: from the
        /// first event].
        #[arg(long, default_value = "")]
        after: String,
        /// Exit after this many events [default: never].
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CardCommand {
    /// Issue a virtual card for a funding card.
    Issue {
        /// The real card's number, or - to read it from standard input.
        #[arg(
            long,
            required_unless_present = "funding_card",
            conflicts_with = "funding_card"
        )]
        funding_pan: Option<String>,
        /// Instead of --funding-pan: the same funding card as this earlier
        /// card of the owner (no real number needed).
        #[arg(long, value_name = "CARD_ID")]
        funding_card: Option<String>,
        #[arg(long, default_value = "")]
        owner: String,
        /// Total spend limit, e.g. 50.00EUR.
        #[arg(long)]
        limit: String,
        /// Limit per transaction, e.g. 20.00EUR.
        #[arg(long)]
        per_txn: Option<String>,
        /// Approvals allowed [default: 1].
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Validity from now: 30m, 12h, 7d.
        #[arg(long, conflicts_with = "valid_until")]
        valid_for: Option<String>,
        /// Last valid day (YYYY-MM-DD, end of day UTC) or an RFC 3339 time.
        #[arg(long)]
        valid_until: Option<String>,
        #[arg(long, default_value = "", conflicts_with = "lock_first_merchant")]
        merchant: String,
        #[arg(long)]
        lock_first_merchant: bool,
        #[arg(long = "mcc-allow", value_delimiter = ',')]
        mcc_allow: Vec<String>,
        #[arg(long = "mcc-block", value_delimiter = ',')]
        mcc_block: Vec<String>,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Show one card.
    Get {
        card_id: String,
    },
    /// List an owner's cards, newest first.
    List {
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    Pause {
        card_id: String,
    },
    Resume {
        card_id: String,
    },
    Close {
        card_id: String,
    },
    /// Change a card's limits.
    Limits {
        card_id: String,
        #[arg(long)]
        limit: Option<String>,
        /// 0 removes the per-transaction limit (e.g. 0EUR).
        #[arg(long)]
        per_txn: Option<String>,
    },
}

/// A failure to report: its exit code and sentence.
struct Failure(u8, String);

/// The canonical name of a gRPC status code, as in the gRPC spec.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Whether a status means the service could not do the work (exit 3),
/// rather than refusing this request (exit 2).
fn is_service_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::Cancelled
            | Code::Aborted
            | Code::DataLoss
    )
}

/// A status as a sentence a person can act on, ending with the gRPC code.
fn sentence(s: &Status) -> String {
    let lead = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => "the request was refused",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "this API key may not do that",
        Code::Unauthenticated => "the API key was not accepted",
        Code::FailedPrecondition => "that cannot be done now",
        Code::ResourceExhausted => "the service is busy or the request too large",
        Code::Unavailable => "the service is unavailable",
        Code::DeadlineExceeded => "the service did not answer in time",
        Code::Unimplemented => "the service does not offer this call (an older version?)",
        _ => "the call failed",
    };
    let message = s.message().trim();
    let message = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    format!("{lead}{message} (gRPC {})", code_name(s.code()))
}

impl From<Status> for Failure {
    fn from(s: Status) -> Failure {
        let code = if is_service_failure(s.code()) {
            EXIT_UNAVAILABLE
        } else {
            EXIT_USAGE
        };
        Failure(code, sentence(&s))
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure(EXIT_USAGE, msg.into())
}

type Auth = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;

/// TLS for an https:// server: --ca (VCN_CA, the CA to trust, PEM), and
/// for mTLS --cert and --cert-key (VCN_CERT, VCN_CERT_KEY: the client's
/// certificate and its private key, PEM).
fn client_tls(conn: &Connection) -> Result<tonic::transport::ClientTlsConfig, Failure> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |flag: &str, p: &Option<PathBuf>| -> Result<Option<Vec<u8>>, Failure> {
        match p {
            Some(p) => std::fs::read(p)
                .map(Some)
                .map_err(|e| usage(format!("--{flag} {}: {e}", p.display()))),
            None => Ok(None),
        }
    };
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = read("ca", &conn.ca)? {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    match (read("cert", &conn.cert)?, read("cert-key", &conn.cert_key)?) {
        (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(c, k)),
        (None, None) => {}
        _ => {
            return Err(usage(
                "--cert and --cert-key (VCN_CERT, VCN_CERT_KEY) go together",
            ))
        }
    }
    Ok(tls)
}

async fn connect(conn: &Connection) -> Result<InterceptedService<Channel, Auth>, Failure> {
    connect_with(conn, Some(std::time::Duration::from_secs(30))).await
}

/// `timeout`: how long one call may take (None for a stream that lasts).
async fn connect_with(
    conn: &Connection,
    timeout: Option<std::time::Duration>,
) -> Result<InterceptedService<Channel, Auth>, Failure> {
    let mtls = conn.cert.is_some();
    if !conn.server.starts_with("https://") && (mtls || conn.ca.is_some()) {
        return Err(usage(format!(
            "--ca and --cert need an https:// server, not {}",
            conn.server
        )));
    }
    let header: Option<MetadataValue<_>> = match std::env::var("VCN_API_KEY") {
        Ok(key) if !key.is_empty() => Some(
            format!("Bearer {key}")
                .parse()
                .map_err(|_| usage("VCN_API_KEY is not a valid key"))?,
        ),
        _ if mtls => None,
        _ => {
            return Err(usage(
                "set VCN_API_KEY to the client's API key (vcn client add prints one), or --cert and --cert-key (VCN_CERT, VCN_CERT_KEY) for a client registered by certificate",
            ))
        }
    };
    let endpoint = Channel::from_shared(conn.server.clone())
        .map_err(|_| {
            usage(format!(
                "--server {} is not a URL like http://127.0.0.1:50051",
                conn.server
            ))
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    let mut endpoint = match timeout {
        Some(t) => endpoint.timeout(t),
        None => endpoint,
    };
    if conn.server.starts_with("https://") {
        endpoint = endpoint
            .tls_config(client_tls(conn)?)
            .map_err(|e| usage(format!("TLS: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        Failure(
            EXIT_UNAVAILABLE,
            format!("cannot reach the service at {}: {e}", conn.server),
        )
    })?;
    let auth: Auth = Box::new(move |mut req: Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    Ok(InterceptedService::new(channel, auth))
}

fn money(field: &str, s: &str) -> Result<pb::Money, Failure> {
    let m = Money::parse_human(s).map_err(|e| usage(format!("--{field}: {}", e.reason)))?;
    Ok(pb::Money {
        amount_minor: m.amount_minor(),
        currency: m.currency().code().to_string(),
    })
}

fn show_money(m: Option<&pb::Money>) -> String {
    m.and_then(|m| Money::parse(m.amount_minor, &m.currency).ok())
        .map(|m| m.to_string())
        .unwrap_or_else(|| "-".into())
}

/// Money for scripts: the exact minor units and currency, and the amount
/// as a person reads it ("12.50 EUR", "1000 JPY", "1.500 BHD").
fn money_json(m: Option<&pb::Money>) -> Value {
    m.map(|m| {
        json!({
            "amount_minor": m.amount_minor,
            "currency": m.currency,
            "text": show_money(Some(m)),
        })
    })
    .unwrap_or(Value::Null)
}

fn time_text(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn read_secret(value: &str, what: &str) -> Result<String, Failure> {
    if value != "-" {
        return Ok(value.to_string());
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| usage(format!("cannot read the {what} from standard input: {e}")))?;
    Ok(line.trim().to_string())
}

fn parse_expiry(s: &str) -> Result<(u32, u32), Failure> {
    let bad = || usage("--expiry must be MM/YY or MM/YYYY");
    let (m, y) = s.split_once('/').ok_or_else(bad)?;
    Ok((m.parse().map_err(|_| bad())?, y.parse().map_err(|_| bad())?))
}

fn parse_validity(
    valid_for: Option<&str>,
    valid_until: Option<&str>,
) -> Result<Option<prost_types::Timestamp>, Failure> {
    let at = if let Some(d) = valid_for {
        let (n, unit) = d.split_at(d.len().saturating_sub(1));
        let n: i64 = n
            .parse()
            .map_err(|_| usage("--valid-for must be like 30m, 12h or 7d"))?;
        let span = match unit {
            "m" => time::Duration::minutes(n),
            "h" => time::Duration::hours(n),
            "d" => time::Duration::days(n),
            _ => return Err(usage("--valid-for must be like 30m, 12h or 7d")),
        };
        OffsetDateTime::now_utc() + span
    } else if let Some(u) = valid_until {
        let rfc = time::format_description::well_known::Rfc3339;
        match OffsetDateTime::parse(u, &rfc) {
            Ok(t) => t,
            Err(_) => {
                let day =
                    time::Date::parse(u, time::macros::format_description!("[year]-[month]-[day]"))
                        .map_err(|_| {
                            usage("--valid-until must be YYYY-MM-DD or an RFC 3339 time")
                        })?;
                day.with_hms(23, 59, 59)
                    .map_err(|_| usage("--valid-until is out of range"))?
                    .assume_utc()
            }
        }
    } else {
        return Ok(None);
    };
    Ok(Some(prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: 0,
    }))
}

fn card_json(c: &pb::Card) -> Value {
    json!({
        "card_id": c.card_id,
        "owner": c.owner,
        "masked_pan": c.masked_pan,
        "last4": c.last4,
        "state": pb::CardState::try_from(c.state).map(|s| s.as_str_name()).unwrap_or("CARD_STATE_UNSPECIFIED"),
        "spend_limit": money_json(c.spend_limit.as_ref()),
        "spent": money_json(c.spent.as_ref()),
        "remaining": money_json(c.remaining.as_ref()),
        "per_transaction_limit": money_json(c.per_transaction_limit.as_ref()),
        "max_uses": c.max_uses,
        "uses": c.uses,
        "valid_until": time_text(c.valid_until.as_ref()),
        "expiry_month": c.expiry_month,
        "expiry_year": c.expiry_year,
        "merchant_id": c.merchant_id,
        "lock_to_first_merchant": c.lock_to_first_merchant,
        "allowed_mccs": c.allowed_mccs,
        "blocked_mccs": c.blocked_mccs,
        "created_at": time_text(c.created_at.as_ref()),
    })
}

fn state_word(state: i32) -> String {
    pb::CardState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("CARD_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn card_text(c: &pb::Card) -> String {
    format!(
        "card       {}\nowner      {}\nnumber     {}\nstate      {}\nlimit      {}\nspent      {}\nremaining  {}\nper txn    {}\nuses       {} of {}\nvalid to   {}\nmerchant   {}",
        c.card_id,
        c.owner,
        c.masked_pan,
        state_word(c.state),
        show_money(c.spend_limit.as_ref()),
        show_money(c.spent.as_ref()),
        show_money(c.remaining.as_ref()),
        show_money(c.per_transaction_limit.as_ref()),
        c.uses,
        c.max_uses,
        time_text(c.valid_until.as_ref()),
        if c.merchant_id.is_empty() { "any" } else { &c.merchant_id },
    )
}

fn print(json_out: bool, value: Value, text: String) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        println!("{text}");
    }
}

pub fn run(cmd: RemoteCommand) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_UNAVAILABLE, format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(execute(cmd)) {
        Ok(code) => code,
        Err(Failure(code, msg)) => fail(code, msg),
    }
}

async fn execute(cmd: RemoteCommand) -> Result<ExitCode, Failure> {
    match cmd {
        RemoteCommand::Card { conn, command } => card(&conn, command).await,
        RemoteCommand::Authorize {
            conn,
            pan,
            expiry,
            cvv,
            amount,
            merchant,
            mcc,
            txn,
        } => {
            let (expiry_month, expiry_year) = parse_expiry(&expiry)?;
            let transaction_id = match txn {
                Some(t) => t,
                None => {
                    let mut b = [0u8; 12];
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                        .map_err(|_| {
                            Failure(EXIT_UNAVAILABLE, "random number generator failed".into())
                        })?;
                    format!("cli-{}", hex::encode(b))
                }
            };
            let req = pb::AuthorizeRequest {
                transaction_id: transaction_id.clone(),
                pan: read_secret(&pan, "card number")?,
                expiry_month,
                expiry_year,
                cvv,
                amount: Some(money("amount", &amount)?),
                merchant_id: merchant,
                mcc,
            };
            let mut client = AuthorizationServiceClient::new(connect(&conn).await?);
            let r = client.authorize(req).await?.into_inner();
            let value = json!({
                "transaction_id": transaction_id,
                "approved": r.approved,
                "response_code": r.response_code,
                "decline_reason": r.decline_reason,
                "authorization_id": r.authorization_id,
                "card_id": r.card_id,
                "funding_pan": r.funding_pan,
                "remaining": money_json(r.remaining.as_ref()),
            });
            let verdict = if r.approved { "APPROVED" } else { "DECLINED" };
            let text =
                format!(
                "{verdict} {} ({})\ntransaction {transaction_id}\ncard        {}\nremaining   {}{}",
                r.response_code,
                r.decline_reason,
                if r.card_id.is_empty() { "-" } else { &r.card_id },
                show_money(r.remaining.as_ref()),
                if r.approved {
                    format!("\nauth id     {}\nfunding     {}", r.authorization_id, r.funding_pan)
                } else {
                    String::new()
                }
            );
            print(conn.json, value, text);
            Ok(if r.approved {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DECLINED)
            })
        }
        RemoteCommand::Reverse {
            conn,
            txn,
            amount,
            reversal_id,
        } => {
            let req = pb::ReverseRequest {
                transaction_id: txn,
                amount: amount.map(|a| money("amount", &a)).transpose()?,
                reversal_id,
            };
            let mut client = AuthorizationServiceClient::new(connect(&conn).await?);
            let r = client.reverse(req).await?.into_inner();
            let value = json!({"reversed": r.reversed, "response_code": r.response_code, "remaining": money_json(r.remaining.as_ref())});
            let text = format!(
                "{} {}\nremaining {}",
                if r.reversed {
                    "REVERSED"
                } else {
                    "NOT REVERSED"
                },
                r.response_code,
                show_money(r.remaining.as_ref())
            );
            print(conn.json, value, text);
            Ok(if r.reversed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DECLINED)
            })
        }
        RemoteCommand::Backup { conn, out } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .map_err(|e| usage(format!("--out {}: {e}", out.display())))?;
            let mut client = AdminServiceClient::new(connect(&conn).await?);
            let mut stream = client.backup(pb::BackupRequest {}).await?.into_inner();
            let mut bytes = 0usize;
            let result: Result<(), Failure> = async {
                while let Some(chunk) = stream.message().await? {
                    file.write_all(&chunk.data).map_err(|e| {
                        Failure(EXIT_UNAVAILABLE, format!("writing {}: {e}", out.display()))
                    })?;
                    bytes += chunk.data.len();
                }
                file.sync_all().map_err(|e| {
                    Failure(EXIT_UNAVAILABLE, format!("writing {}: {e}", out.display()))
                })
            }
            .await;
            if let Err(e) = result {
                let _ = std::fs::remove_file(&out);
                return Err(e);
            }
            // Prove the copy whole before saying so.
            crate::backup::Backup::open(&out).map_err(|e| {
                Failure(
                    EXIT_UNAVAILABLE,
                    format!("the backup did not arrive whole: {e}"),
                )
            })?;
            let value = json!({"file": out.display().to_string(), "bytes": bytes});
            print(
                conn.json,
                value,
                format!("backup written to {} ({bytes} bytes)", out.display()),
            );
            Ok(ExitCode::SUCCESS)
        }
        RemoteCommand::Watch {
            conn,
            owner,
            after,
            count,
        } => watch(&conn, owner, after, count).await,
        RemoteCommand::Detokenize { conn, pan } => {
            let req = pb::DetokenizeRequest {
                pan: read_secret(&pan, "card number")?,
            };
            let mut client = AuthorizationServiceClient::new(connect(&conn).await?);
            let r = client.detokenize(req).await?.into_inner();
            let value = json!({"funding_pan": r.funding_pan, "card_id": r.card_id, "state": state_word(r.state)});
            let text = format!(
                "funding {}\ncard    {}\nstate   {}",
                r.funding_pan,
                r.card_id,
                state_word(r.state)
            );
            print(conn.json, value, text);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn card(conn: &Connection, command: CardCommand) -> Result<ExitCode, Failure> {
    let mut client = CardServiceClient::new(connect(conn).await?);
    let card = match command {
        CardCommand::Issue {
            funding_pan,
            funding_card,
            owner,
            limit,
            per_txn,
            uses,
            valid_for,
            valid_until,
            merchant,
            lock_first_merchant,
            mcc_allow,
            mcc_block,
            idempotency_key,
        } => {
            let req = pb::IssueCardRequest {
                funding_pan: match &funding_pan {
                    Some(p) => read_secret(p, "funding card number")?,
                    None => String::new(),
                },
                funding_card_id: funding_card.unwrap_or_default(),
                owner,
                spend_limit: Some(money("limit", &limit)?),
                per_transaction_limit: per_txn.map(|p| money("per-txn", &p)).transpose()?,
                max_uses: uses,
                valid_until: parse_validity(valid_for.as_deref(), valid_until.as_deref())?,
                merchant_id: merchant,
                lock_to_first_merchant: lock_first_merchant,
                allowed_mccs: mcc_allow,
                blocked_mccs: mcc_block,
                idempotency_key,
            };
            let r = client.issue_card(req).await?.into_inner();
            let c = r.card.unwrap_or_default();
            let expiry = format!("{:02}/{:02}", r.expiry_month, r.expiry_year % 100);
            let mut value = card_json(&c);
            value["pan"] = json!(r.pan);
            value["expiry"] = json!(expiry);
            value["cvv"] = json!(r.cvv);
            let text = format!(
                "{}\n\nVirtual card (shown once):\n  number  {}\n  expiry  {expiry}\n  cvv     {}",
                card_text(&c),
                r.pan,
                r.cvv
            );
            print(conn.json, value, text);
            return Ok(ExitCode::SUCCESS);
        }
        CardCommand::Get { card_id } => client.get_card(pb::GetCardRequest { card_id }).await?,
        CardCommand::List {
            owner,
            page_size,
            page_token,
        } => {
            let r = client
                .list_cards(pb::ListCardsRequest {
                    owner,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            let value = json!({
                "cards": r.cards.iter().map(card_json).collect::<Vec<_>>(),
                "next_page_token": r.next_page_token,
            });
            let mut text = format!(
                "{:<28} {:<18} {:<8} {:>14} {:>14} {:>5}",
                "CARD", "NUMBER", "STATE", "SPENT", "REMAINING", "USES"
            );
            for c in &r.cards {
                text.push_str(&format!(
                    "\n{:<28} {:<18} {:<8} {:>14} {:>14} {:>5}",
                    c.card_id,
                    c.masked_pan,
                    state_word(c.state),
                    show_money(c.spent.as_ref()),
                    show_money(c.remaining.as_ref()),
                    format!("{}/{}", c.uses, c.max_uses)
                ));
            }
            if !r.next_page_token.is_empty() {
                text.push_str(&format!("\nmore: --page-token {}", r.next_page_token));
            }
            print(conn.json, value, text);
            return Ok(ExitCode::SUCCESS);
        }
        CardCommand::Pause { card_id } => client.pause_card(pb::CardRef { card_id }).await?,
        CardCommand::Resume { card_id } => client.resume_card(pb::CardRef { card_id }).await?,
        CardCommand::Close { card_id } => client.close_card(pb::CardRef { card_id }).await?,
        CardCommand::Limits {
            card_id,
            limit,
            per_txn,
        } => {
            let req = pb::UpdateCardLimitsRequest {
                card_id,
                spend_limit: limit.map(|l| money("limit", &l)).transpose()?,
                per_transaction_limit: per_txn.map(|p| money("per-txn", &p)).transpose()?,
            };
            client.update_card_limits(req).await?
        }
    }
    .into_inner();
    print(conn.json, card_json(&card), card_text(&card));
    Ok(ExitCode::SUCCESS)
}

fn event_kind(t: i32) -> &'static str {
    use pb::CardEventType as T;
    match T::try_from(t).unwrap_or(T::Unspecified) {
        T::Issued => "issued",
        T::Authorized => "authorized",
        T::Reversed => "reversed",
        T::Paused => "paused",
        T::Resumed => "resumed",
        T::Blocked => "blocked",
        T::Used => "used",
        T::Closed => "closed",
        T::Expired => "expired",
        T::LimitsChanged => "limits_changed",
        T::Unspecified => "unknown",
    }
}

fn event_json(e: &pb::CardEvent) -> Value {
    let mut v = json!({
        "cursor": e.cursor,
        "type": event_kind(e.r#type),
        "card_id": e.card_id,
        "owner": e.owner,
        "occurred_at": time_text(e.occurred_at.as_ref()),
        "masked_pan": e.masked_pan,
        "state": state_word(e.state),
        "remaining": money_json(e.remaining.as_ref()),
    });
    if e.amount.is_some() {
        v["amount"] = money_json(e.amount.as_ref());
        v["transaction_id"] = json!(e.transaction_id);
    }
    if event_kind(e.r#type) == "authorized" {
        v["approved"] = json!(e.approved);
        v["response_code"] = json!(e.response_code);
        v["decline_reason"] = json!(e.decline_reason);
        v["merchant_id"] = json!(e.merchant_id);
        v["mcc"] = json!(e.mcc);
    }
    v
}

/// One line per event: when, what, which card, and the detail that matters.
fn event_text(e: &pb::CardEvent) -> String {
    let kind = event_kind(e.r#type);
    let detail = match kind {
        "authorized" => {
            let verdict = if e.approved { "APPROVED" } else { "DECLINED" };
            let at = if e.merchant_id.is_empty() {
                String::new()
            } else {
                format!(" at {}", e.merchant_id)
            };
            format!(
                "{} {verdict} {} ({}){at}",
                show_money(e.amount.as_ref()),
                e.response_code,
                e.decline_reason
            )
        }
        "reversed" => format!("{} given back", show_money(e.amount.as_ref())),
        _ => format!("now {}", state_word(e.state)),
    };
    format!(
        "{}  {:<14} {:<36} {:<18} {}; remaining {}  [cursor {}]",
        time_text(e.occurred_at.as_ref()),
        kind.to_uppercase(),
        e.card_id,
        e.masked_pan,
        detail,
        show_money(e.remaining.as_ref()),
        e.cursor
    )
}

/// How long `vcn watch` keeps trying to reconnect after losing the service.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(60);

async fn watch(
    conn: &Connection,
    owner: String,
    mut after: String,
    count: Option<u64>,
) -> Result<ExitCode, Failure> {
    let mut seen = 0u64;
    let mut lost_since: Option<std::time::Instant> = None;
    // Never reached: say so at once (exit 3) rather than wait.
    let mut connected = false;
    loop {
        if count.is_some_and(|c| seen >= c) {
            return Ok(ExitCode::SUCCESS);
        }
        let attempt = async {
            let mut client = CardServiceClient::new(connect_with(conn, None).await?);
            let stream = client
                .watch_events(pb::WatchEventsRequest {
                    owner: owner.clone(),
                    after_cursor: after.clone(),
                })
                .await?;
            Ok::<_, Failure>(stream.into_inner())
        };
        let failure = match attempt.await {
            Ok(mut stream) => {
                lost_since = None;
                connected = true;
                loop {
                    match stream.message().await {
                        Ok(Some(e)) => {
                            if conn.json {
                                println!("{}", event_json(&e));
                            } else {
                                println!("{}", event_text(&e));
                            }
                            after = e.cursor.clone();
                            seen += 1;
                            if count.is_some_and(|c| seen >= c) {
                                return Ok(ExitCode::SUCCESS);
                            }
                        }
                        Ok(None) => {
                            break Failure(EXIT_UNAVAILABLE, "the service ended the stream".into())
                        }
                        Err(s) => break Failure::from(s),
                    }
                }
            }
            Err(f) => f,
        };
        // Refused requests end here; a lost service is retried for a while
        // from the last cursor, so nothing is missed or shown twice.
        if failure.0 != EXIT_UNAVAILABLE {
            return Err(failure);
        }
        let since = *lost_since.get_or_insert_with(std::time::Instant::now);
        if !connected || since.elapsed() > RECONNECT_FOR {
            return Err(failure);
        }
        eprintln!("vcn: {}; reconnecting after cursor {after:?}", failure.1);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: i64, c: &str) -> pb::Money {
        pb::Money {
            amount_minor: n,
            currency: c.into(),
        }
    }

    #[test]
    fn amounts_show_each_currency_with_its_own_minor_units() {
        assert_eq!(show_money(Some(&m(1250, "EUR"))), "12.50 EUR");
        assert_eq!(show_money(Some(&m(1000, "JPY"))), "1000 JPY");
        assert_eq!(show_money(Some(&m(1500, "BHD"))), "1.500 BHD");
        assert_eq!(show_money(Some(&m(5, "BHD"))), "0.005 BHD");
        assert_eq!(show_money(None), "-");
        assert_eq!(money_json(Some(&m(1500, "BHD")))["text"], "1.500 BHD");
        let parsed = money("limit", "1.5BHD").ok().map(|p| p.amount_minor);
        assert_eq!(parsed, Some(1500));
        assert!(money("limit", "1.5JPY").is_err());
    }

    #[test]
    fn errors_are_sentences_with_the_grpc_code_and_the_right_exit_code() {
        let f = Failure::from(Status::permission_denied("client web has role cards"));
        assert_eq!(f.0, EXIT_USAGE);
        assert_eq!(
            f.1,
            "this API key may not do that: client web has role cards (gRPC PERMISSION_DENIED)"
        );
        let f = Failure::from(Status::not_found("card vc_1 not found"));
        assert_eq!((f.0, f.1.ends_with("(gRPC NOT_FOUND)")), (EXIT_USAGE, true));
        let f = Failure::from(Status::unavailable("storage unavailable: disk full"));
        assert_eq!(f.0, EXIT_UNAVAILABLE);
        assert!(f.1.starts_with("the service is unavailable: storage"));
        assert_eq!(
            Failure::from(Status::resource_exhausted("busy")).0,
            EXIT_UNAVAILABLE
        );
    }
}
