//! What one client may take of the controller: netmap streams per node, status reports per
//! node, registrations per source address, connections in total and per source, and time
//! to send headers; and that a flood of idle connections or junk registrations does not
//! starve legitimate requests. The flood tests run the real binary on loopback.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use common::{wg_key, TestController};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tower::ServiceExt as _;

async fn open_stream(tc: &TestController, credential: &str) -> axum::response::Response {
    let req = Request::builder()
        .uri("/api/v1/netmap/stream")
        .header(header::AUTHORIZATION, format!("Bearer {credential}"))
        .body(Body::empty())
        .expect("request");
    tc.app().oneshot(req).await.expect("infallible")
}

/// A controller with two approved nodes; their credentials.
async fn two_nodes() -> (TestController, String, String) {
    let tc = TestController::new().await;
    let key = tc
        .enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await;
    let (_, a) = tc.register_ok(&key, 1, "a").await;
    let (_, b) = tc.register_ok(&key, 2, "b").await;
    (tc, a, b)
}

#[tokio::test]
async fn a_third_netmap_stream_of_one_node_is_refused_with_429_until_one_closes() {
    let (tc, a, b) = two_nodes().await;
    let first = open_stream(&tc, &a).await;
    let second = open_stream(&tc, &a).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::OK);
    let third = open_stream(&tc, &a).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        open_stream(&tc, &b).await.status(),
        StatusCode::OK,
        "another node's streams are counted apart"
    );
    drop(first);
    assert_eq!(open_stream(&tc, &a).await.status(), StatusCode::OK);
    drop(second);
}

#[tokio::test]
async fn status_reports_past_the_per_node_burst_are_refused() {
    let (tc, a, b) = two_nodes().await;
    let report = json!({"serial": 1, "peers": []});
    let send = |cred: String| {
        let tc = &tc;
        let report = report.clone();
        async move {
            tc.call(
                Method::POST,
                "/api/v1/node/status",
                Some(&cred),
                Some(report),
            )
            .await
        }
    };
    for _ in 0..skymesh_controller::api::STATUS_BURST {
        let r = send(a.clone()).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    }
    send(a.clone()).await.assert_error(429, "rate_limited");
    assert_eq!(send(b).await.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn registrations_past_the_per_source_limit_are_refused_before_the_key_is_looked_up() {
    let tc = TestController::with_config(|c| c.limits.register_per_minute = 5).await;
    let from = |ip: &str, i: u32| {
        let body = json!({"enrollment_key": "sme_junk", "public_key": wg_key(i), "name": "x"});
        Request::builder()
            .method(Method::POST)
            .uri("/api/v1/register")
            .header(header::CONTENT_TYPE, "application/json")
            .extension(ConnectInfo(SocketAddr::new(ip.parse().expect("ip"), 4000)))
            .body(Body::from(body.to_string()))
            .expect("request")
    };
    for i in 0..5 {
        tc.raw(from("198.18.9.9", i))
            .await
            .assert_error(401, "invalid_enrollment_key");
    }
    tc.raw(from("198.18.9.9", 5))
        .await
        .assert_error(429, "rate_limited");
    // IPv6 sources count by /64.
    for i in 0..5 {
        let ip = format!("2001:db8:9::{i}");
        tc.raw(from(&ip, 10 + i)).await;
    }
    tc.raw(from("2001:db8:9::ff", 20))
        .await
        .assert_error(429, "rate_limited");
    tc.raw(from("198.18.9.10", 6))
        .await
        .assert_error(401, "invalid_enrollment_key");
}

/// The real controller binary on a free loopback port; killed on drop.
struct Binary {
    child: Child,
    addr: SocketAddr,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// Starts `serve` with `args`, under `prlimit --nofile=N` when `nofile` is given.
    async fn start(args: &[&str], nofile: Option<u64>) -> Self {
        let exe = env!("CARGO_BIN_EXE_skymesh-controller");
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let out = Command::new(exe)
            .args(["admin-token", "create", "--data-dir"])
            .arg(&data)
            .output()
            .expect("admin-token create");
        let admin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(admin.starts_with("sma_"), "no token: {out:?}");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        // Tests run side by side: no fixed UDP ports (STUN, relay).
        cmd.args(["serve", "--listen", &addr.to_string(), "--data-dir"])
            .arg(&data)
            .args(["--stun-port", "0", "--relay-port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting the controller (is prlimit installed?): {e}"));
        let b = Binary {
            child,
            addr,
            admin,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.healthz().await.is_none() {
            assert!(Instant::now() < deadline, "controller did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b
    }

    /// `GET /healthz` on a new connection from 127.0.0.1: the time to the full response.
    async fn healthz(&self) -> Option<Duration> {
        let t = Instant::now();
        let mut s = TcpStream::connect(self.addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf)
            .starts_with("HTTP/1.1 200")
            .then(|| t.elapsed())
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An idle connection from `source` (a loopback address): connected, sends nothing.
async fn idle_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(source.parse().expect("ip"), 0))?;
    s.connect(to).await
}

#[tokio::test]
async fn healthz_answers_within_a_second_while_twice_the_fd_limit_of_idle_connections_are_held() {
    const NOFILE: u64 = 256;
    let ctl = Binary::start(
        &[
            "--max-connections",
            "200",
            "--max-connections-per-source",
            "40",
            // Long enough that the caps, not the timeout, keep the controller alive here.
            "--header-timeout-secs",
            "120",
        ],
        Some(NOFILE),
    )
    .await;
    // 2 × NOFILE + 8 connections from four loopback sources, all held open.
    let mut held = Vec::new();
    for i in 0..(2 * NOFILE + 8) {
        let source = format!("127.0.0.{}", 2 + i % 4);
        match idle_from(&source, ctl.addr).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("connection {i} from {source}: {e}"),
        }
    }
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let took = ctl
            .healthz()
            .await
            .expect("/healthz answered during the idle flood");
        worst = worst.max(took);
    }
    eprintln!(
        "idle flood: {} connections held, /healthz worst of 20: {worst:?}",
        held.len()
    );
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    drop(held);
}

#[tokio::test]
async fn a_connection_that_sends_no_headers_is_closed_after_the_header_timeout() {
    let ctl = Binary::start(&["--header-timeout-secs", "1"], None).await;
    let mut s = idle_from("127.0.0.1", ctl.addr).await.expect("connect");
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5 s");
    // hyper may answer 408 before closing; either way the connection ends.
    let mut rest = Vec::new();
    if n.is_ok_and(|n| n > 0) {
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_thousand_junk_registrations_do_not_delay_a_nodes_endpoint_report_by_100_ms() {
    // The junk comes from one address: the per-source registration limit is off so every
    // request reaches the enrollment-key lookup (the worst case for the store).
    let ctl = Binary::start(
        &[
            "--register-per-minute",
            "0",
            "--max-connections-per-source",
            "4096",
        ],
        None,
    )
    .await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let key: serde_json::Value = http
        .post(ctl.url("/api/v1/enrollment-keys"))
        .bearer_auth(&ctl.admin)
        .json(&json!({"auto_approve": true}))
        .send()
        .await
        .expect("key")
        .json()
        .await
        .expect("key json");
    let reg: serde_json::Value = http
        .post(ctl.url("/api/v1/register"))
        .json(&json!({"enrollment_key": key["key"], "public_key": wg_key(1), "name": "node"}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("register json");
    let cred = reg["credential"].as_str().expect("credential").to_owned();
    let report = |port: u16| {
        let http = http.clone();
        let url = ctl.url("/api/v1/node/endpoints");
        let cred = cred.clone();
        async move {
            let t = Instant::now();
            let r = http
                .post(url)
                .bearer_auth(cred)
                .json(&json!({"endpoints": [{"addr": format!("198.18.0.7:{port}"),
                                              "uplink": "sat", "kind": "satellite"}]}))
                .send()
                .await
                .expect("report");
            assert_eq!(r.status(), reqwest::StatusCode::NO_CONTENT);
            t.elapsed()
        }
    };
    let mut quiet = Vec::new();
    for i in 0..10 {
        quiet.push(report(40_000 + i).await);
    }
    quiet.sort();
    let baseline = quiet[quiet.len() / 2];

    // The junk is sent from a thread and runtime of its own, so the measured reports do not
    // queue behind the junk's client-side work in this test's runtime.
    let url = ctl.url("/api/v1/register");
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let junk = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let c = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client");
            let tasks: Vec<_> = (0..1000u32)
                .map(|i| {
                    let c = c.clone();
                    let url = url.clone();
                    tokio::spawn(async move {
                        let body = json!({"enrollment_key": format!("sme_junk{i}"),
                                          "public_key": wg_key(10_000 + i), "name": "junk"});
                        c.post(url).json(&body).send().await.map(|r| r.status())
                    })
                })
                .collect();
            let _ = go_tx.send(());
            let mut refused = 0;
            for t in tasks {
                if let Ok(Ok(s)) = t.await {
                    assert_eq!(s, reqwest::StatusCode::UNAUTHORIZED);
                    refused += 1;
                }
            }
            refused
        })
    });
    go_rx.recv().expect("junk started");
    let started = Instant::now();
    let mut loaded = Vec::new();
    for i in 0..10 {
        loaded.push(report(41_000 + i).await);
    }
    let refused = junk.join().expect("junk thread");
    let junk_took = started.elapsed();
    let worst = loaded.iter().max().copied().unwrap_or_default();
    eprintln!(
        "junk registrations: {refused}/1000 answered 401 in {junk_took:?}; endpoint report \
         median {baseline:?} quiet, worst {worst:?} under junk (delay {:?})",
        worst.saturating_sub(baseline)
    );
    assert_eq!(refused, 1000);
    assert!(
        worst.saturating_sub(baseline) <= Duration::from_millis(100),
        "endpoint report delayed {:?} by the junk (quiet {baseline:?}, loaded {loaded:?})",
        worst.saturating_sub(baseline)
    );
}
