//! PostgreSQL and controller replicas, against a real throw-away PostgreSQL cluster (see
//! `common/pg.rs`): two controllers ("replicas") share one database, as two processes would.
//! Each replica has its own pool, its own `LISTEN` connection and its own in-memory stream
//! state, so the only path between them is the database — as between two hosts.
//!
//! The rest of the API behaviour runs on PostgreSQL too:
//! `SKYMESH_TEST_DATABASE=postgres cargo test -p skymesh-controller --test api --test live ...`
//! (scripts/test does).

mod common;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use common::TestController;
use http_body_util::BodyExt as _;
use serde_json::json;
use skymesh_proto::{NetMap, StreamEvent};
use tower::ServiceExt as _;

const PUSH_WAIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hundred_concurrent_registrations_across_two_replicas_get_distinct_addresses() {
    let a = TestController::postgres().await;
    let b = a.replica().await;
    let key = a
        .enrollment_key(json!({"reusable": true, "max_uses": 100, "auto_approve": true}))
        .await;
    // 110 attempts for 100 uses, alternating replicas, all in flight at once.
    common::race_registrations_for_100_uses(&[a.app(), b.app()], &key).await;
    for tc in [&a, &b] {
        let keys = tc.admin(Method::GET, "/api/v1/enrollment-keys", None).await;
        assert_eq!(keys.body[0]["uses"], 100);
        let v = tc.admin(Method::GET, "/api/v1/audit/verify", None).await;
        assert_eq!(v.body["ok"], true, "{}", v.text);
    }
    // One serial bump per registration, whichever replica committed it.
    let s0 = 1;
    assert_eq!(a.state.store.serial().await.expect("serial"), s0 + 100);
    assert_eq!(b.state.store.serial().await.expect("serial"), s0 + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_chain_stays_one_chain_under_concurrent_admin_writes_from_two_replicas() {
    let a = TestController::postgres().await;
    let b = a.replica().await;
    let key = a
        .enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await;
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(a.register_ok(&key, i, &format!("n{i}")).await.0);
    }
    let before = a.state.store.stats().await.expect("stats");
    // 60 admin writes at once, half on each replica: key creation, tag edits, key revocation.
    let a = std::sync::Arc::new(a);
    let b = std::sync::Arc::new(b);
    let mut tasks = Vec::new();
    for i in 0..60u32 {
        let tc = if i % 2 == 0 { a.clone() } else { b.clone() };
        let node = nodes[(i % 4) as usize];
        tasks.push(tokio::spawn(async move {
            let r = match i % 3 {
                0 => {
                    tc.admin(
                        Method::POST,
                        "/api/v1/enrollment-keys",
                        Some(json!({"description": format!("k{i}")})),
                    )
                    .await
                }
                1 => {
                    tc.admin(
                        Method::PATCH,
                        &format!("/api/v1/nodes/{node}"),
                        Some(json!({"tags": [format!("t{i}")]})),
                    )
                    .await
                }
                _ => {
                    let created = tc
                        .admin(Method::POST, "/api/v1/enrollment-keys", Some(json!({})))
                        .await;
                    let id = created.body["id"].as_u64().expect("id");
                    tc.admin(
                        Method::DELETE,
                        &format!("/api/v1/enrollment-keys/{id}"),
                        None,
                    )
                    .await
                }
            };
            assert!(r.status.is_success(), "{}", r.text);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let after = a.state.store.stats().await.expect("stats");
    // 20 creations + 20 tag edits + 20 × (create + revoke).
    assert_eq!(after.audit_entries, before.audit_entries + 80);
    // Every tag edit changed netmaps: exactly one serial bump each, no lost update.
    assert_eq!(after.serial, before.serial + 20);
    for tc in [&a, &b] {
        let v = tc.admin(Method::GET, "/api/v1/audit/verify", None).await;
        assert_eq!(v.body["ok"], true, "{}", v.text);
        assert_eq!(v.body["head"]["entries"], after.audit_entries, "{}", v.text);
    }
    let entries = a.state.store.audit_entries(0, 1000).await.expect("audit");
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=after.audit_entries).collect::<Vec<_>>());
}

/// An open SSE stream read event by event.
struct Sse {
    body: Body,
    buf: String,
}

impl Sse {
    async fn open(tc: &TestController, credential: &str) -> Self {
        let req = Request::builder()
            .uri("/api/v1/netmap/stream")
            .header(header::AUTHORIZATION, format!("Bearer {credential}"))
            .body(Body::empty())
            .expect("request");
        let resp = tc.app().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        Sse {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended; panics after `PUSH_WAIT`.
    async fn next(&mut self) -> Option<StreamEvent> {
        tokio::time::timeout(PUSH_WAIT, async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let data: String = block
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim_start)
                        .collect();
                    if data.is_empty() {
                        continue;
                    }
                    return Some(serde_json::from_str(&data).expect("event JSON"));
                }
                let frame = self.body.frame().await?.expect("body frame");
                if let Ok(data) = frame.into_data() {
                    let data: Bytes = data;
                    self.buf
                        .push_str(std::str::from_utf8(&data).expect("utf-8"));
                }
            }
        })
        .await
        .expect("an event within the wait bound")
    }
}

#[tokio::test]
async fn a_change_made_on_one_replica_reaches_a_stream_on_the_other() {
    let a = TestController::postgres().await;
    let b = a.replica().await;
    let key = a
        .enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await;
    let (_, cred) = a.register_ok(&key, 1, "hq").await;
    let (other, _) = a.register_ok(&key, 2, "field-1").await;
    let verifying = b.state.signing_key.verifying_key();
    assert_eq!(
        verifying,
        a.state.signing_key.verifying_key(),
        "one signing key"
    );

    let mut s = Sse::open(&b, &cred).await;
    let held: NetMap = match s.next().await.expect("first event") {
        StreamEvent::Netmap(m) => m.verify(&verifying).expect("verifies"),
        other => panic!("expected a full netmap, got {other:?}"),
    };
    assert_eq!(held.peers.len(), 1);

    // Written through replica A only; B learns of it through LISTEN/NOTIFY alone.
    let (third, _) = a.register_ok(&key, 3, "field-2").await;
    let held = match s.next().await.expect("pushed") {
        StreamEvent::Delta(d) => d
            .verify(&verifying)
            .expect("delta verifies")
            .apply(&held)
            .expect("applies"),
        other => panic!("expected a delta, got {other:?}"),
    };
    let mut peers: Vec<u64> = held.peers.iter().map(|p| p.node_id.0).collect();
    peers.sort_unstable();
    assert_eq!(peers, vec![other, third]);
    assert_eq!(
        held,
        b.netmap(&cred).await,
        "pushed state equals a fresh GET on B"
    );
    assert_eq!(held, a.netmap(&cred).await, "and on A");

    // Revoking the streaming node on A ends its stream on B.
    let me = held.node.node_id.0;
    let r = a
        .admin(Method::POST, &format!("/api/v1/nodes/{me}/revoke"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(matches!(s.next().await, Some(StreamEvent::Revoked)));
    assert!(s.next().await.is_none(), "stream ends after `revoked`");
}

#[tokio::test]
async fn a_replica_with_another_signing_key_is_refused() {
    let a = TestController::postgres().await;
    let key = a
        .enrollment_key(json!({"reusable": true, "auto_approve": true, "tags": ["hq"]}))
        .await;
    let (_, cred) = a.register_ok(&key, 1, "hq").await;
    let before = a.netmap(&cred).await;
    let dir = tempfile::tempdir().expect("tmp");
    // Another key and another policy: the refusal must come before the policy is recorded,
    // or the running replicas' netmaps would change under them.
    let config = skymesh_controller::config::Config {
        data_dir: dir.path().join("data"),
        signing_key: None, // a fresh key in its own data dir
        policy: serde_yaml::from_str("rules: [{from: [hq], to: [field]}]").expect("policy"),
        ..a.config.clone()
    };
    let e = skymesh_controller::open(&config, skymesh_controller::Clock::System)
        .await
        .err()
        .expect("must refuse");
    assert!(e.to_string().contains("signing public key"), "{e}");
    assert!(e.to_string().contains("--signing-key"), "{e}");
    assert_eq!(
        a.netmap(&cred).await,
        before,
        "a refused replica changed nothing (serial, policy)"
    );
    assert_eq!(
        a.replica()
            .await
            .state
            .store
            .serial()
            .await
            .expect("serial"),
        before.serial
    );
    // The rightful key still opens it, after a restart too.
    let a = a.restart().await;
    assert!(a.replica().await.state.store.serial().await.is_ok());
}

#[tokio::test]
async fn a_replica_with_another_overlay_is_refused_naming_the_setting() {
    let a = TestController::postgres().await;
    let config = skymesh_controller::config::Config {
        signing_key: Some(a.signing_key_path()),
        overlay: skymesh_controller::config::OverlayConfig {
            ipv4: "10.78.0.0/16".parse().expect("net"),
            ..a.config.overlay.clone()
        },
        ..a.config.clone()
    };
    let e = skymesh_controller::open(&config, skymesh_controller::Clock::System)
        .await
        .err()
        .expect("must refuse");
    assert!(e.to_string().contains("overlay_ipv4"), "{e}");
}

#[tokio::test]
async fn an_unreachable_database_is_an_error_naming_it_not_a_hang() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = skymesh_controller::config::Config {
        data_dir: dir.path().join("data"),
        database: Some(skymesh_controller::config::DatabaseConfig::new(format!(
            "postgres://postgres@localhost/nope?host={}",
            dir.path().display()
        ))),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let e = skymesh_controller::open(&config, skymesh_controller::Clock::System)
        .await
        .err()
        .expect("no server there");
    assert!(e.to_string().contains("database"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(20));
}
