//! Registrations per second against real SQLite (WAL, synchronous=FULL) in a temp dir:
//! the store call alone, and the full HTTP handler path (JSON, validation, store) with 32
//! registrations in flight at once.
//!
//! With `SKYMESH_BENCH_DATABASE_URL=postgres://...` (an empty database) the same runs against
//! PostgreSQL instead (group `registrations_postgres`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use skymesh_controller::config::Config;
use skymesh_controller::store::{Actor, NewEnrollmentKey, Scope};
use skymesh_controller::{app, open, AppState, Clock};
use skymesh_proto::{RegisterRequest, WgPublicKey};
use tower::ServiceExt as _;

fn key(i: u32) -> WgPublicKey {
    let mut k = [3u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    WgPublicKey(k)
}

async fn setup(dir: &std::path::Path) -> (AppState, String) {
    let config = Config {
        data_dir: dir.join("data"),
        database: std::env::var("SKYMESH_BENCH_DATABASE_URL")
            .ok()
            .map(skymesh_controller::config::DatabaseConfig::new),
        ..Config::default()
    };
    let state = open(&config, Clock::System).await.expect("open");
    let actor = Actor("bench".into());
    state
        .store
        .create_admin_token(&actor, Scope::Admin, None, 0)
        .await
        .expect("token");
    let (_, secret) = state
        .store
        .create_enrollment_key(
            &actor,
            &NewEnrollmentKey {
                description: String::new(),
                reusable: true,
                max_uses: None,
                expires_at: None,
                tags: vec!["field".into()],
                auto_approve: true,
                auto_approve_routes: Vec::new(),
                node_ttl_secs: None,
            },
            0,
        )
        .await
        .expect("key");
    (state, secret)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let (state, secret) = rt.block_on(setup(dir.path()));
    let counter = AtomicU32::new(0);

    let backend = if std::env::var_os("SKYMESH_BENCH_DATABASE_URL").is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let mut g = c.benchmark_group(format!("registrations_{backend}"));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(1));
    g.bench_function("store.register (sequential)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let req = RegisterRequest {
                        enrollment_key: secret.clone(),
                        public_key: key(counter.fetch_add(1, Ordering::Relaxed)),
                        name: "bench".into(),
                        endpoints: vec![],
                        routes: vec![],
                    };
                    state.store.register(&req, 0).await.expect("register");
                }
                start.elapsed()
            })
        })
    });

    const BATCH: u32 = 32;
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    g.bench_function("POST /api/v1/register (32 concurrent)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let tasks: Vec<_> = (0..BATCH)
                        .map(|_| {
                            let app = app(state.clone());
                            let body = serde_json::json!({
                                "enrollment_key": secret,
                                "public_key": key(counter.fetch_add(1, Ordering::Relaxed)).to_string(),
                                "name": "bench",
                            });
                            tokio::spawn(async move {
                                let req = Request::builder()
                                    .method(Method::POST)
                                    .uri("/api/v1/register")
                                    .header(header::CONTENT_TYPE, "application/json")
                                    .body(Body::from(body.to_string()))
                                    .expect("req");
                                let resp = app.oneshot(req).await.expect("infallible");
                                assert_eq!(resp.status(), StatusCode::CREATED);
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.expect("task");
                    }
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
