//! TLS on the gRPC port: the switch identified by its client certificate
//! (mTLS, no API key), API keys still accepted over TLS, unregistered
//! certificates and plain text refused, and plain text on a non-loopback
//! address refused at start.

use std::sync::Arc;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use vcn::api::pb;
use vcn::api::pb::authorization_service_client::AuthorizationServiceClient;
use vcn::api::pb::card_service_client::CardServiceClient;
use vcn::clients::Role;
use vcn::server::Service;

use crate::support::*;

async fn tls_channel(
    server: &TestServer,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
    key: Option<&str>,
) -> Chan {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    let header = key.map(|k| format!("Bearer {k}").parse().unwrap());
    InterceptedService::new(channel, Bearer(header))
}

#[tokio::test]
async fn the_switch_is_identified_by_its_certificate_over_mtls() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let certs = vcn::certs::dev(
        &dir.path().join("certs"),
        &["switch".into(), "stranger".into()],
    )
    .unwrap();
    let config = vcn::config::Config {
        tls_cert: Some(certs.server_cert.clone()),
        tls_key: Some(certs.server_key.clone()),
        tls_client_ca: Some(certs.ca.clone()),
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let (_, switch_cert, switch_key) = &certs.clients[0];
    let fp = vcn::certs::fingerprint_pem_file(switch_cert).unwrap();
    vcn::clients::add_cert(&server.keys_dir(), "switch", Role::Switch, None, &fp).unwrap();
    let web = server.add_client("web", Role::Cards, None);

    // An API key over TLS, without a client certificate.
    let mut cards = CardServiceClient::new(tls_channel(&server, &certs.ca, None, Some(&web)).await);
    let card = issue(&mut cards, issue_req("alice", 500)).await;
    // The switch: its certificate, no key.
    let mut switch = AuthorizationServiceClient::new(
        tls_channel(&server, &certs.ca, Some((switch_cert, switch_key)), None).await,
    );
    assert!(
        authorize(&mut switch, auth_req(&card, "t1", 100))
            .await
            .approved
    );
    let d = switch
        .detokenize(pb::DetokenizeRequest {
            pan: card.pan.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.funding_pan, FUNDING);
    // The certificate's client has its role only.
    let mut as_cards = CardServiceClient::new(
        tls_channel(&server, &certs.ca, Some((switch_cert, switch_key)), None).await,
    );
    assert_eq!(
        as_cards
            .get_card(pb::GetCardRequest {
                card_id: card.card.as_ref().unwrap().card_id.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // A certificate of the right CA that nobody registered: refused.
    let (_, sc, sk) = &certs.clients[1];
    let mut stranger = AuthorizationServiceClient::new(
        tls_channel(&server, &certs.ca, Some((sc, sk)), None).await,
    );
    assert_status(
        stranger
            .detokenize(pb::DetokenizeRequest {
                pan: card.pan.clone(),
            })
            .await,
        Code::Unauthenticated,
        "not registered",
    );
    // Plain text to the TLS port gets nowhere.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = CardServiceClient::new(InterceptedService::new(
            ch,
            Bearer(Some(format!("Bearer {web}").parse().unwrap())),
        ));
        assert!(c.issue_card(issue_req("alice", 100)).await.is_err());
    }
    drop((cards, switch, as_cards, stranger));
    let (_dir, config) = server.stop().await;
    let entries = vcn::audit::read_entries(&config.audit_path()).unwrap();
    let detok = entries.iter().find(|e| e.action == "detokenize").unwrap();
    assert_eq!(
        (detok.client.as_str(), detok.role.as_str()),
        ("switch", "switch")
    );
}

#[tokio::test]
async fn plain_text_on_a_non_loopback_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = |c: vcn::config::Config| async move {
        match Service::open(&c).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    };
    let exposed = vcn::config::Config {
        listen: "0.0.0.0:50051".parse().unwrap(),
        ..config_in(dir.path())
    };
    let e = open(exposed.clone()).await.unwrap_err();
    assert!(
        e.contains("not a loopback address") && e.contains("tls_cert"),
        "{e}"
    );
    let allowed = vcn::config::Config {
        allow_plaintext: true,
        ..exposed.clone()
    };
    open(allowed).await.unwrap();
    let certs = vcn::certs::dev(&dir.path().join("certs"), &[]).unwrap();
    let with_tls = vcn::config::Config {
        tls_cert: Some(certs.server_cert),
        tls_key: Some(certs.server_key),
        ..exposed
    };
    open(with_tls).await.unwrap();
}

#[test]
fn certs_dev_and_client_add_cert_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(crate::binary::VCN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let o = run(&["certs", "dev", "--out", "c", "--client", "switch"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "ca.pem",
        "server.pem",
        "server.key",
        "switch.pem",
        "switch.key",
    ] {
        assert!(dir.path().join("c").join(f).exists(), "{f}");
    }
    let o = run(&[
        "client",
        "add",
        "switch",
        "--role",
        "switch",
        "--cert",
        "c/switch.pem",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("needs no API key") && !out.contains("vcn_"),
        "{out}"
    );
    let o = run(&[
        "client",
        "add",
        "other",
        "--role",
        "switch",
        "--cert",
        "c/switch.key",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no PEM certificate"));
}

/// Runs the real `vcn` client (off the runtime's thread: the server runs
/// on it) with `env` set and VCN_API_KEY only when given.
async fn cli(args: Vec<String>, api_key: Option<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let mut c = std::process::Command::new(crate::binary::VCN);
        c.args(&args)
            .env_remove("VCN_API_KEY")
            .env_remove("VCN_SERVER");
        if let Some(k) = api_key {
            c.env("VCN_API_KEY", k);
        }
        c.output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_cli_speaks_tls_with_a_key_and_mtls_with_a_certificate() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let certs = vcn::certs::dev(&dir.path().join("certs"), &["switch".into()]).unwrap();
    let config = vcn::config::Config {
        tls_cert: Some(certs.server_cert.clone()),
        tls_key: Some(certs.server_key.clone()),
        tls_client_ca: Some(certs.ca.clone()),
        ..config_in(dir.path())
    };
    let server = TestServer::start_with(dir, config).await;
    let (_, switch_cert, switch_key) = &certs.clients[0];
    let fp = vcn::certs::fingerprint_pem_file(switch_cert).unwrap();
    vcn::clients::add_cert(&server.keys_dir(), "switch", Role::Switch, None, &fp).unwrap();
    let web = server.add_client("web", Role::Cards, None);
    let url = format!("https://localhost:{}", server.addr.port());
    let s = |p: &std::path::Path| p.display().to_string();
    let args = |extra: &[&str]| -> Vec<String> { extra.iter().map(|a| a.to_string()).collect() };

    // A cards key over TLS, the CA given as a flag.
    let o = cli(
        [
            args(&[
                "card",
                "issue",
                "--funding-pan",
                FUNDING,
                "--owner",
                "alice",
            ]),
            args(&["--limit", "5.00EUR", "--json", "--server", &url]),
            vec!["--ca".into(), s(&certs.ca)],
        ]
        .concat(),
        Some(web.clone()),
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let issued: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pan = issued["pan"]
        .as_str()
        .expect("pan in --json output")
        .to_string();

    // The switch by its certificate alone: no API key in the environment.
    let o = cli(
        [
            args(&["detokenize", "--pan", &pan, "--json", "--server", &url]),
            vec!["--ca".into(), s(&certs.ca), "--cert".into(), s(switch_cert)],
            vec!["--cert-key".into(), s(switch_key)],
        ]
        .concat(),
        None,
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["funding_pan"], FUNDING);

    // Without the CA the server's certificate is not trusted: the service
    // cannot be reached (exit 3), and the message says so.
    let o = cli(
        args(&["card", "list", "--owner", "alice", "--server", &url]),
        Some(web.clone()),
    )
    .await;
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A certificate without its key is a usage error (exit 2).
    let o = cli(
        [
            args(&["detokenize", "--pan", &pan, "--server", &url]),
            vec!["--ca".into(), s(&certs.ca), "--cert".into(), s(switch_cert)],
        ]
        .concat(),
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--cert-key"));
    server.stop().await;
}
