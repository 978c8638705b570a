//! gRPC-Web (`[grpc_web]`): a browser's calls over plain HTTP/1.1 reach
//! CardService through the same key check and limits as native gRPC, and
//! CORS is answered for the configured origins only.

use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS,
};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Status};
use tonic_web::{GrpcWebCall, GrpcWebClientLayer, GrpcWebClientService};
use vcn::api::pb;
use vcn::api::pb::card_service_client::CardServiceClient;
use vcn::clients::Role;
use vcn::config::{Config, GrpcWebConfig};

use crate::support::*;

const BANK: &str = "http://bank.example:5173";
const OTHER: &str = "http://evil.example";

fn web_config(dir: &std::path::Path) -> Config {
    Config {
        grpc_web: GrpcWebConfig {
            enabled: true,
            allowed_origins: vec![BANK.into()],
        },
        ..config_in(dir)
    }
}

/// What a browser page adds to each call: its key and its origin.
#[derive(Clone)]
struct Page {
    key: MetadataValue<tonic::metadata::Ascii>,
    origin: MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for Page {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.key.clone());
        req.metadata_mut().insert("origin", self.origin.clone());
        Ok(req)
    }
}

type Http1 = Client<HttpConnector, GrpcWebCall<tonic::body::Body>>;
type WebCards = CardServiceClient<InterceptedService<GrpcWebClientService<Http1>, Page>>;

/// The generated CardService client speaking gRPC-Web over an HTTP/1.1-only
/// client (hyper without HTTP/2), as a page from `origin` would.
fn web_cards(server: &TestServer, key: &str, origin: &str) -> WebCards {
    let http1: Http1 = Client::builder(TokioExecutor::new()).build_http();
    let web = tower::ServiceBuilder::new()
        .layer(GrpcWebClientLayer::new())
        .service(http1);
    let page = Page {
        key: format!("Bearer {key}").parse().expect("key header"),
        origin: origin.parse().expect("origin header"),
    };
    let uri = format!("http://{}", server.addr).parse().expect("uri");
    CardServiceClient::with_origin(InterceptedService::new(web, page), uri)
}

fn cards_of(owner: &str) -> pb::ListCardsRequest {
    pb::ListCardsRequest {
        owner: owner.into(),
        ..Default::default()
    }
}

/// A raw HTTP/1.1 request (for preflights and hand-built gRPC-Web frames).
async fn raw(server: &TestServer, req: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let (mut parts, body) = req.into_parts();
    parts.uri = format!("http://{}{}", server.addr, parts.uri)
        .parse()
        .expect("uri");
    let res = client
        .request(Request::from_parts(parts, body))
        .await
        .expect("HTTP/1.1 request");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (Response::from_parts(parts, ()), body)
}

fn preflight(origin: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::OPTIONS)
        .uri("/vcn.v1.CardService/ListCards")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web,x-user-agent",
        )
        .body(Full::default())
        .expect("request")
}

fn header(res: &Response<()>, name: impl http::header::AsHeaderName) -> &str {
    res.headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header"))
        .unwrap_or("")
}

/// A gRPC-Web request built by hand: one length-prefixed message frame.
fn grpc_web_post(
    path: &str,
    key: &str,
    origin: Option<&str>,
    msg: &impl Message,
) -> Request<Full<Bytes>> {
    let body = msg.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((body.len() as u32).to_be_bytes());
    frame.extend(body);
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {key}"));
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    req.body(Full::new(Bytes::from(frame))).expect("request")
}

/// The frames of a gRPC-Web answer: the messages and the trailer block.
fn frames(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut messages, mut trailers) = (Vec::new(), String::new());
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let data = body[5..5 + len].to_vec();
        if body[0] & 0x80 != 0 {
            trailers = String::from_utf8(data).expect("trailers are text");
        } else {
            messages.push(data);
        }
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "a truncated frame");
    (messages, trailers)
}

#[tokio::test]
async fn a_page_issues_and_lists_cards_over_http1_grpc_web() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = web_config(dir.path());
    let server = TestServer::start_with(dir, config).await;
    let key = server.add_client("web-banking", Role::Cards, None);
    let mut page = web_cards(&server, &key, BANK);

    let issued = page
        .issue_card(issue_req("alice", 5000))
        .await
        .expect("IssueCard over gRPC-Web")
        .into_inner();
    let card = issued.card.clone().expect("card");
    assert_eq!(issued.pan.len(), FUNDING.len());
    assert!(luhn_ok(&issued.pan));
    assert!(card
        .masked_pan
        .ends_with(&issued.pan[issued.pan.len() - 4..]));

    let listed = page
        .list_cards(cards_of("alice"))
        .await
        .expect("ListCards over gRPC-Web")
        .into_inner();
    assert_eq!(listed.cards.len(), 1);
    assert_eq!(listed.cards[0].card_id, card.card_id);
    assert_eq!(listed.cards[0].masked_pan, card.masked_pan);
    assert!(!listed.cards[0].masked_pan.contains(&issued.pan));

    // The key check applies to gRPC-Web as to gRPC.
    let mut stranger = web_cards(&server, "not-a-key", BANK);
    assert_status(
        stranger.list_cards(cards_of("alice")).await,
        Code::Unauthenticated,
        "unknown API key",
    );
    // A validation error comes back with its field, through the translation.
    assert_status(
        page.issue_card(pb::IssueCardRequest {
            funding_pan: "4111".into(),
            ..issue_req("alice", 5000)
        })
        .await,
        Code::InvalidArgument,
        "funding_pan",
    );

    // Native gRPC over HTTP/2 is served on the same port, unchanged.
    let mut native = server.cards_as(&key).await;
    assert_eq!(
        get(&mut native, &card.card_id).await.masked_pan,
        card.masked_pan
    );

    // On the wire: HTTP/1.1, a gRPC-Web answer, CORS for the page's origin.
    let (res, body) = raw(
        &server,
        grpc_web_post(
            "/vcn.v1.CardService/GetCard",
            &key,
            Some(BANK),
            &pb::GetCardRequest {
                card_id: card.card_id.clone(),
            },
        ),
    )
    .await;
    assert_eq!(res.version(), Version::HTTP_11);
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        header(&res, http::header::CONTENT_TYPE),
        "application/grpc-web+proto"
    );
    assert_eq!(header(&res, ACCESS_CONTROL_ALLOW_ORIGIN), BANK);
    assert!(header(&res, ACCESS_CONTROL_EXPOSE_HEADERS).contains("grpc-status"));
    let (messages, trailers) = frames(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let got = pb::Card::decode(messages[0].as_slice()).expect("a Card");
    assert_eq!(got.masked_pan, card.masked_pan);
}

#[tokio::test]
async fn cors_is_answered_for_the_configured_origins_only() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = web_config(dir.path());
    let server = TestServer::start_with(dir, config).await;
    let key = server.add_client("web-banking", Role::Cards, None);

    let (res, _) = raw(&server, preflight(BANK)).await;
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(header(&res, ACCESS_CONTROL_ALLOW_ORIGIN), BANK);
    assert!(header(&res, ACCESS_CONTROL_ALLOW_METHODS).contains("POST"));
    let allowed = header(&res, ACCESS_CONTROL_ALLOW_HEADERS).to_string();
    for h in [
        "authorization",
        "content-type",
        "x-grpc-web",
        "x-user-agent",
    ] {
        assert!(allowed.contains(h), "{h} not in {allowed}");
    }

    // Another origin: refused, and not one CORS header, so the browser
    // never sends the call.
    let (res, _) = raw(&server, preflight(OTHER)).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let cors: Vec<_> = res
        .headers()
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .collect();
    assert!(cors.is_empty(), "CORS headers for {OTHER}: {cors:?}");

    // Even if a call from there is sent anyway, it is refused before it
    // reaches the service: nothing is issued.
    let (res, _) = raw(
        &server,
        grpc_web_post(
            "/vcn.v1.CardService/IssueCard",
            &key,
            Some(OTHER),
            &issue_req("mallory", 5000),
        ),
    )
    .await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&res, "grpc-status"), "7");
    assert_eq!(header(&res, ACCESS_CONTROL_ALLOW_ORIGIN), "");
    let mut page = web_cards(&server, &key, OTHER);
    assert_status(
        page.issue_card(issue_req("mallory", 5000)).await,
        Code::PermissionDenied,
        "origin not allowed",
    );
    // A server-side gRPC-Web client sends no Origin: it is served.
    let (res, body) = raw(
        &server,
        grpc_web_post(
            "/vcn.v1.CardService/ListCards",
            &key,
            None,
            &cards_of("mallory"),
        ),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(frames(&body).1.contains("grpc-status:0"));
    let mut native = server.cards_as(&key).await;
    let listed = native
        .list_cards(cards_of("mallory"))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.cards.is_empty(), "a call from {OTHER} issued a card");
}

#[tokio::test]
async fn grpc_web_is_off_by_default() {
    let server = TestServer::start().await;
    let key = server.add_client("web-banking", Role::Cards, None);
    let mut page = web_cards(&server, &key, BANK);
    let err = page
        .list_cards(cards_of("alice"))
        .await
        .expect_err("an HTTP/1.1 gRPC-Web call to a server without grpc_web");
    assert_ne!(err.code(), Code::Ok);
    // Native gRPC is served as ever.
    let mut native = server.cards_as(&key).await;
    assert!(issue(&mut native, issue_req("alice", 100))
        .await
        .card
        .is_some());
}

#[tokio::test]
async fn bad_origins_stop_the_server_at_start() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let mut config = web_config(dir.path());
    config.grpc_web.allowed_origins = vec!["https://bank.example/app".into()];
    let Err(e) = TestServer::try_start_with(dir, config).await else {
        panic!("a server with a bad origin started");
    };
    assert!(e.to_string().contains("grpc_web.allowed_origins"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deadline_and_the_overall_limit_hold_for_grpc_web_calls() {
    let (server, chaos) = TestServer::start_chaos(|d| Config {
        request_timeout_ms: 1000,
        max_concurrent_requests: 2,
        ..web_config(d)
    })
    .await;
    let key = server.add_client("web-banking", Role::Cards, None);

    // Past the server's deadline: DEADLINE_EXCEEDED, as a gRPC-Web answer
    // the page may read.
    chaos.set_update_delay(Duration::from_millis(3000));
    let (res, body) = raw(
        &server,
        grpc_web_post(
            "/vcn.v1.CardService/IssueCard",
            &key,
            Some(BANK),
            &issue_req("alice", 100),
        ),
    )
    .await;
    assert_eq!(header(&res, ACCESS_CONTROL_ALLOW_ORIGIN), BANK);
    let status = header(&res, "grpc-status").to_string();
    let (_, trailers) = frames(&body);
    assert!(
        status == "4" || trailers.contains("grpc-status:4"),
        "headers {:?}, trailers {trailers}",
        res.headers()
    );

    // More calls in flight than max_concurrent_requests: the rest are
    // refused at once with RESOURCE_EXHAUSTED, not queued.
    chaos.set_update_delay(Duration::from_millis(400));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut page = web_cards(&server, &key, BANK);
        tasks.push(tokio::spawn(async move {
            page.issue_card(issue_req("many", 100)).await.map(|_| ())
        }));
    }
    let (ok, shed) = served_and_shed(tasks).await;
    assert!(ok >= 1 && shed >= 1, "{ok} served, {shed} shed");
    chaos.set_update_delay(Duration::ZERO);
    let mut page = web_cards(&server, &key, BANK);
    assert!(page.issue_card(issue_req("after", 100)).await.is_ok());
}
