//! Restarts lose nothing: a clean reopen, and the real binary killed with SIGKILL mid-writes.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;
use common::{wg_key, TestController};
use serde_json::{json, Value};

#[tokio::test]
async fn nodes_keys_addresses_and_serial_survive_a_restart() {
    let c = TestController::new().await;
    let key = c
        .enrollment_key(json!({"reusable": true, "max_uses": 3, "auto_approve": true}))
        .await;
    let (a, cred_a) = c.register_ok(&key, 1, "a").await;
    let (b, _) = c.register_ok(&key, 2, "b").await;
    c.admin(Method::POST, &format!("/api/v1/nodes/{b}/revoke"), None)
        .await;
    let before_nodes = c.admin(Method::GET, "/api/v1/nodes", None).await.body;
    let before_map = c.netmap(&cred_a).await;
    let before_key = c.state.signing_key.to_bytes();

    let c = c.restart().await;
    assert_eq!(
        c.admin(Method::GET, "/api/v1/nodes", None).await.body,
        before_nodes
    );
    assert_eq!(
        c.state.signing_key.to_bytes(),
        before_key,
        "same signing key"
    );
    let after_map = c.netmap(&cred_a).await;
    assert_eq!(after_map, before_map, "same netmap, same serial");
    // The key's use count and the IPAM high-water mark persisted: one use left, next is .3.
    let r = c.register(&key, 3, "c").await;
    assert_eq!(r.body["addresses"][0], "10.77.0.3/16", "{}", r.text);
    c.register(&key, 4, "d")
        .await
        .assert_error(403, "enrollment_key_used_up");
    assert!(c.netmap(&cred_a).await.serial > after_map.serial);
    assert_eq!(a, 1);
    let v = c.admin(Method::GET, "/api/v1/audit/verify", None).await;
    assert_eq!(v.body["ok"], true);
}

#[tokio::test]
async fn reopening_with_a_different_overlay_is_refused() {
    let c = TestController::new().await;
    let mut config = c.config.clone();
    c.state.store.close().await;
    config.overlay.ipv4 = "10.78.0.0/16".parse().expect("net");
    let e = skymesh_controller::open(&config, skymesh_controller::Clock::System)
        .await
        .err()
        .expect("must refuse");
    assert!(e.to_string().contains("overlay_ipv4"), "{e}");
}

#[tokio::test]
async fn a_policy_change_across_restart_moves_the_serial() {
    let c = TestController::new().await;
    let s1 = c.state.store.serial().await.expect("serial");
    let mut c = c.restart().await;
    assert_eq!(
        c.state.store.serial().await.expect("serial"),
        s1,
        "same policy: same serial"
    );
    c.config.policy.rules = vec![skymesh_controller::policy::Rule {
        from: vec!["hq".into()],
        to: vec!["*".into()],
    }];
    let c = c.restart().await;
    assert_eq!(c.state.store.serial().await.expect("serial"), s1 + 1);
}

// ---- the real binary, killed with SIGKILL ----

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_skymesh-controller");

fn start(data: &Path) -> Server {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--stun-port",
            "0",
            "--relay-port",
            "0",
            "--data-dir",
        ])
        .arg(data)
        // Hundreds of registrations from one address: a durability test, not the limiter's.
        .args(["--register-per-minute", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn controller");
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read");
    // Keep draining so the server never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Server { child, addr }
}

/// A minimal HTTP/1.1 client over a loopback socket (one request per connection).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {resp:?}")))?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

fn admin_token(data: &Path) -> String {
    let out = Command::new(BIN)
        .args(["admin-token", "create", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()
        .expect("admin-token create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

#[test]
fn kill_9_during_registrations_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let token = admin_token(&data);
    let server = start(&data);
    let (status, key) = http(
        server.addr,
        "POST",
        "/api/v1/enrollment-keys",
        Some(&token),
        Some(&json!({"reusable": true, "max_uses": 1_000_000, "auto_approve": true})),
    )
    .expect("create key");
    assert_eq!(status, 201, "{key}");
    let key = key["key"].as_str().expect("key").to_owned();

    // Writers register nodes as fast as they can; every 201 is recorded as acknowledged.
    let acked = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.addr;
    let writers: Vec<_> = (0..4u32)
        .map(|w| {
            let (acked, stop, key) = (acked.clone(), stop.clone(), key.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = json!({"enrollment_key": key, "public_key": wg_key(w * 1_000_000 + i), "name": format!("w{w}-{i}")});
                    match http(addr, "POST", "/api/v1/register", None, Some(&body)) {
                        Ok((201, b)) => acked.lock().expect("lock").push((
                            b["node_id"].as_u64().expect("id"),
                            b["addresses"][0].as_str().expect("addr").to_owned(),
                        )),
                        Ok((s, b)) => panic!("unexpected {s}: {b}"),
                        Err(_) => break, // server killed mid-request: not acknowledged
                    }
                }
            })
        })
        .collect();
    while acked.lock().expect("lock").len() < 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut server = server;
    server.child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL
    server.child.wait().expect("wait");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 100);

    let server = start(&data);
    let (status, nodes) =
        http(server.addr, "GET", "/api/v1/nodes", Some(&token), None).expect("nodes");
    assert_eq!(status, 200);
    let stored: Vec<(u64, String)> = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().expect("id"),
                format!("{}/16", n["ipv4"].as_str().expect("ip")),
            )
        })
        .collect();
    for a in &acked {
        assert!(
            stored.contains(a),
            "acknowledged registration {a:?} lost after kill -9"
        );
    }
    // The database is consistent: the chain verifies and the next registration continues.
    let (_, v) = http(
        server.addr,
        "GET",
        "/api/v1/audit/verify",
        Some(&token),
        None,
    )
    .expect("verify");
    assert_eq!(v["ok"], true, "{v}");
    let (status, r) = http(
        server.addr,
        "POST",
        "/api/v1/register",
        None,
        Some(&json!({"enrollment_key": key, "public_key": wg_key(u32::MAX), "name": "after"})),
    )
    .expect("register");
    assert_eq!(status, 201, "{r}");
    let ip = r["addresses"][0].as_str().expect("addr").to_owned();
    assert!(
        !stored.iter().any(|(_, a)| *a == ip),
        "address {ip} reused after restart"
    );
}

#[test]
fn the_admin_token_cli_creates_expiring_tokens_lists_and_revokes_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("admin-token")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "warn")
            .output()
            .expect("admin-token");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, token, err) = cli(&["create", "--read-only", "--expires-in", "90d"]);
    assert!(ok && token.trim().starts_with("sma_"), "{err}");
    assert!(err.contains("expiring at"), "{err}");
    let (ok, _, err) = cli(&["create", "--expires-in", "9x"]);
    assert!(!ok && err.contains("unknown unit"), "{err}");
    let (ok, list, err) = cli(&["list"]);
    assert!(ok, "{err}");
    let row = list.lines().nth(1).expect("one token");
    assert!(row.starts_with("1\tReadOnly\t"), "{list}");
    assert!(!row.ends_with("\t-\t-"), "expiry shown: {list}");
    let (ok, _, err) = cli(&["revoke", "1"]);
    assert!(ok, "{err}");
    let (_, list, _) = cli(&["list"]);
    assert!(
        !list.lines().nth(1).expect("row").ends_with("\t-"),
        "{list}"
    );
    let (ok, _, err) = cli(&["revoke", "7"]);
    assert!(!ok && err.contains("not found"), "{err}");
}
