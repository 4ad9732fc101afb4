//! Serving over a real socket: HTTPS with a self-signed certificate (rcgen) on 127.0.0.1, plain
//! HTTP when no certificate is given, and the source address recorded from the connection.

mod common;

use std::path::Path;

use common::{wg_key, TestController};
use serde_json::json;
use skymesh_controller::server::{self, TlsError};
use tokio::sync::oneshot;

fn write_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, reqwest::Certificate) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("self-signed cert");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    let root = reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).expect("root");
    (cert, key, root)
}

/// Starts `serve` on an ephemeral 127.0.0.1 port; the returned sender stops it.
fn start(
    tc: &TestController,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
) -> (
    std::net::SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let state = tc.state.clone();
    let task = tokio::spawn(async move {
        server::serve(listener, state, tls, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    (addr, stop, task)
}

#[tokio::test]
async fn https_with_a_self_signed_certificate_serves_the_api_and_plain_http_is_refused_there() {
    let tc = TestController::new().await;
    let (cert, key, root) = write_cert(tc.dir.path());
    let tls = server::tls_config(&cert, &key).expect("tls config");
    let (addr, stop, task) = start(&tc, Some(tls));

    let client = reqwest::Client::builder()
        .add_root_certificate(root)
        .build()
        .expect("client");
    let r = client
        .get(format!("https://127.0.0.1:{}/healthz", addr.port()))
        .send()
        .await
        .expect("https request");
    assert_eq!(r.status(), 200);

    // An agent registering over HTTPS: the controller records the connection's source.
    let enroll = tc
        .enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await;
    let r = client
        .post(format!("https://127.0.0.1:{}/api/v1/register", addr.port()))
        .json(
            &json!({"enrollment_key": enroll, "public_key": wg_key(1), "name": "hq",
            "endpoints": [{"addr": "198.18.0.1:51820", "uplink": "fibre", "kind": "terrestrial"}]}),
        )
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201);
    let node: serde_json::Value = r.json().await.expect("json");
    let id = node["node_id"].as_u64().expect("id");
    let detail = tc
        .admin(
            axum::http::Method::GET,
            &format!("/api/v1/nodes/{id}"),
            None,
        )
        .await;
    assert_eq!(
        detail.body["seen"]["seen_from"], "127.0.0.1",
        "{}",
        detail.text
    );
    // The connection's source is recorded as where the node was seen, never guessed as a
    // UDP endpoint (nodes announce what STUN shows them).
    let eps = detail.body["endpoints"].as_array().expect("endpoints");
    assert_eq!(eps.len(), 1, "{}", detail.text);
    assert_eq!(eps[0]["addr"], "198.18.0.1:51820");

    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", addr.port()))
        .send()
        .await;
    assert!(
        plain.map(|r| r.status() != 200).unwrap_or(true),
        "plain HTTP must not be served on the TLS port"
    );
    // An untrusted client (no pinned root) fails the handshake.
    assert!(reqwest::Client::new()
        .get(format!("https://127.0.0.1:{}/healthz", addr.port()))
        .send()
        .await
        .is_err());

    stop.send(()).expect("stop");
    task.await.expect("server task");
}

#[tokio::test]
async fn without_a_certificate_the_api_is_plain_http_and_shutdown_ends_open_streams() {
    let tc = TestController::new().await;
    let enroll = tc
        .enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await;
    let (_, cred) = tc.register_ok(&enroll, 1, "hq").await;
    let (addr, stop, task) = start(&tc, None);
    let base = format!("http://{addr}");
    let r = reqwest::get(format!("{base}/healthz")).await.expect("http");
    assert_eq!(r.status(), 200);
    let mut stream = reqwest::Client::new()
        .get(format!("{base}/api/v1/netmap/stream"))
        .bearer_auth(&cred)
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await.expect("chunk").expect("first event");
    assert!(String::from_utf8_lossy(&first).contains("event: netmap"));

    stop.send(()).expect("stop");
    // Graceful shutdown must not hang on the open stream.
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("shutdown within the drain time")
        .expect("server task");
}

#[test]
fn unusable_certificate_files_are_refused_with_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, _) = write_cert(dir.path());
    let missing = dir.path().join("nope.pem");
    assert!(matches!(
        server::tls_config(&missing, &key),
        Err(TlsError::Read { path, .. }) if path == missing
    ));
    // The certificate file holds no key.
    assert!(matches!(
        server::tls_config(&cert, &cert),
        Err(TlsError::NoKey { .. })
    ));
    assert!(matches!(
        server::tls_config(&key, &key),
        Err(TlsError::NoCertificate { .. })
    ));
    // A key that does not match the certificate.
    let other = rcgen::generate_simple_self_signed(vec!["x".into()]).expect("cert");
    let other_key = dir.path().join("other.pem");
    std::fs::write(&other_key, other.key_pair.serialize_pem()).expect("write");
    assert!(server::tls_config(&cert, &other_key).is_err());
}
