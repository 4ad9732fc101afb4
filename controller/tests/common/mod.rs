//! Shared helpers for the controller's integration tests: a controller on a real SQLite
//! database in a temp dir, driven through `app(state).oneshot(..)`.
//!
//! Backends: [`TestController::new`] uses SQLite, or PostgreSQL (a fresh database in a
//! throw-away cluster, see [`pg`]) when `SKYMESH_TEST_DATABASE=postgres`, so any test file can
//! be run against both; [`TestController::postgres`] always uses PostgreSQL.
#![allow(dead_code, unreachable_pub)]

pub mod pg;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use skymesh_controller::config::{Config, DatabaseConfig};
use skymesh_controller::store::{Actor, Scope};
use skymesh_controller::{app, open, AppState, Clock};
use tower::ServiceExt as _;

pub const T0: u64 = 1_800_000_000;

pub struct TestController {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub state: AppState,
    pub clock: Arc<AtomicU64>,
    pub admin: String,
}

/// Returns a WireGuard-style public key string unique to `i`.
pub fn wg_key(i: u32) -> String {
    use base64::Engine as _;
    let mut k = [7u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    base64::engine::general_purpose::STANDARD.encode(k)
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or("<no error code>")
    }
    /// Asserts the status and the stable error body shape.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(self.code(), code, "body: {}", self.text);
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error body needs a message: {}",
            self.text
        );
    }
}

impl TestController {
    pub async fn new() -> Self {
        Self::with_config(|_| {}).await
    }

    /// A controller on PostgreSQL whatever `SKYMESH_TEST_DATABASE` says.
    pub async fn postgres() -> Self {
        Self::on(true, |_| {}).await
    }

    pub async fn with_config(edit: impl FnOnce(&mut Config)) -> Self {
        let postgres = match std::env::var("SKYMESH_TEST_DATABASE").as_deref() {
            Ok("postgres") => true,
            Ok("sqlite") | Err(_) => false,
            Ok(other) => panic!("SKYMESH_TEST_DATABASE={other}: use sqlite or postgres"),
        };
        Self::on(postgres, edit).await
    }

    async fn on(postgres: bool, edit: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        if postgres {
            config.database = Some(DatabaseConfig::new(pg::fresh_database().await));
        }
        edit(&mut config);
        let clock = Arc::new(AtomicU64::new(T0));
        let state = open(&config, Clock::Manual(clock.clone()))
            .await
            .expect("open controller");
        let (_, admin) = state
            .store
            .create_admin_token(&Actor("test".into()), Scope::Admin, None, T0)
            .await
            .expect("admin token");
        Self {
            dir,
            config,
            state,
            clock,
            admin,
        }
    }

    /// A second controller process (replica) on the same PostgreSQL database: its own data
    /// directory, the same signing key file (via `signing_key`), the same clock and admin token.
    pub async fn replica(&self) -> Self {
        assert!(self.config.database.is_some(), "replicas need PostgreSQL");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().join("data"),
            signing_key: Some(self.signing_key_path()),
            ..self.config.clone()
        };
        let state = open(&config, Clock::Manual(self.clock.clone()))
            .await
            .expect("open replica");
        Self {
            dir,
            config,
            state,
            clock: self.clock.clone(),
            admin: self.admin.clone(),
        }
    }

    pub fn signing_key_path(&self) -> std::path::PathBuf {
        self.config.signing_key.clone().unwrap_or_else(|| {
            self.config
                .data_dir
                .join(skymesh_controller::signing::KEY_FILE)
        })
    }

    /// Closes and reopens the controller on the same data directory (a restart).
    pub async fn restart(self) -> Self {
        self.state.store.close().await;
        let state = open(&self.config, Clock::Manual(self.clock.clone()))
            .await
            .expect("reopen controller");
        Self { state, ..self }
    }

    pub fn app(&self) -> Router {
        app(self.state.clone())
    }

    pub fn advance(&self, secs: u64) {
        self.clock
            .fetch_add(secs, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn raw(&self, req: Request<Body>) -> Resp {
        let resp = self.app().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp { status, body, text }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        }
        .expect("request");
        self.raw(req).await
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        self.call(method, path, Some(&self.admin.clone()), body)
            .await
    }

    /// Creates an enrollment key with the given JSON settings; returns the secret.
    pub async fn enrollment_key(&self, settings: Value) -> String {
        let r = self
            .admin(Method::POST, "/api/v1/enrollment-keys", Some(settings))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body["key"].as_str().expect("key").to_owned()
    }

    pub async fn register(&self, key: &str, i: u32, name: &str) -> Resp {
        self.call(
            Method::POST,
            "/api/v1/register",
            None,
            Some(json!({"enrollment_key": key, "public_key": wg_key(i), "name": name})),
        )
        .await
    }

    /// Registers and asserts success; returns (node_id, credential).
    pub async fn register_ok(&self, key: &str, i: u32, name: &str) -> (u64, String) {
        let r = self.register(key, i, name).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        (
            r.body["node_id"].as_u64().expect("id"),
            r.body["credential"].as_str().expect("cred").to_owned(),
        )
    }

    /// Fetches and verifies this node's netmap with the controller key.
    pub async fn netmap(&self, credential: &str) -> skymesh_proto::NetMap {
        let r = self
            .call(Method::GET, "/api/v1/netmap", Some(credential), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let signed: skymesh_proto::SignedNetMap =
            serde_json::from_value(r.body).expect("signed netmap");
        signed
            .verify(&self.state.signing_key.verifying_key())
            .expect("signature verifies")
    }
}

/// 110 registrations with one key limited to 100 uses, all in flight at once, spread over
/// `apps` (replicas) in turn. Asserts that exactly 100 succeed with distinct node ids and
/// distinct addresses, exactly hosts 1..=100 of the default overlay (dense, no gaps from the
/// refused attempts), and that the other 10 are refused as `enrollment_key_used_up`.
pub async fn race_registrations_for_100_uses(apps: &[Router], key: &str) {
    let mut tasks = Vec::new();
    for i in 0..110u32 {
        let app = apps[i as usize % apps.len()].clone();
        let body = json!({"enrollment_key": key, "public_key": wg_key(i), "name": format!("n{i}")});
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri("/api/v1/register")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .expect("req");
            let resp = app.oneshot(req).await.expect("infallible");
            let status = resp.status();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&bytes).expect("json"),
            )
        }));
    }
    let mut v4 = std::collections::HashSet::new();
    let mut v6 = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    let mut refused = 0;
    for t in tasks {
        let (status, body) = t.await.expect("task");
        match status {
            StatusCode::CREATED => {
                let addrs = body["addresses"].as_array().expect("addresses");
                assert!(
                    v4.insert(addrs[0].as_str().expect("v4").to_owned()),
                    "dup v4 {body}"
                );
                assert!(
                    v6.insert(addrs[1].as_str().expect("v6").to_owned()),
                    "dup v6 {body}"
                );
                assert!(
                    ids.insert(body["node_id"].as_u64().expect("id")),
                    "dup id {body}"
                );
            }
            StatusCode::FORBIDDEN => {
                assert_eq!(body["error"]["code"], "enrollment_key_used_up");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((v4.len(), refused), (100, 10));
    let expected: std::collections::HashSet<String> = (1..=100u32)
        .map(|i| format!("10.77.{}.{}/16", i / 256, i % 256))
        .collect();
    assert_eq!(v4, expected, "dense, no gaps from refused attempts");
}
