//! The agent against a hostile controller (root, one network namespace): a fake controller
//! (a small Python HTTP server in the namespace) streams a forged netmap, a rolled-back one,
//! one for another node, and then a genuine delta. The agent must refuse the first three,
//! keep its cached state, and apply the genuine delta.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skymesh_proto::{
    diff, sign_delta, sign_netmap, NetMap, NodeId, PeerEntry, SelfNode, SigningKey, StreamEvent,
    WgPublicKey,
};

fn map(node: u64, serial: u64, peers: &[u8]) -> NetMap {
    NetMap {
        serial,
        node: SelfNode {
            node_id: NodeId(node),
            name: "me".into(),
            addresses: vec![
                "10.77.0.1/16".parse().expect("net"),
                "fd7a:5c3e:77::1/64".parse().expect("net"),
            ],
            mtu: 1380,
            tags: vec![],
            expires_at: None,
            stun_ports: Vec::new(),
            relay: None,
        },
        peers: peers
            .iter()
            .map(|&i| PeerEntry {
                node_id: NodeId(u64::from(i)),
                name: format!("p{i}"),
                public_key: WgPublicKey([i; 32]),
                allowed_ips: vec![format!("10.77.0.{i}/32").parse().expect("net")],
                endpoints: vec![],
                tags: vec![],
                routes: vec![],
            })
            .collect(),
    }
}

fn b64(k: &[u8; 32]) -> String {
    WgPublicKey(*k).to_string()
}

const FAKE_CONTROLLER: &str = r#"
import http.server, sys, time
events = open(sys.argv[1]).read()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path.startswith("/api/v1/netmap/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(events.encode()); self.wfile.flush()
            time.sleep(60)
        else:
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0")); self.rfile.read(n)
        self.send_response(204); self.end_headers()
http.server.ThreadingHTTPServer(("127.0.0.1", 18099), H).serve_forever()
"#;

#[test]
fn forged_rolled_back_and_foreign_netmaps_are_refused_and_a_genuine_delta_applies() {
    if !skymesh_e2e::require_root(&["ip", "wg", "python3"]) {
        return;
    }
    let agent = skymesh_e2e::binary("skymesh-agent").expect("agent binary");
    let tag = format!("h4f{}", std::process::id() % 100_000);
    let ns = tag.clone();
    let iface = format!("{tag}i");
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip")
        .success());
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            std::thread::sleep(Duration::from_millis(200));
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.1));
            let _ = std::fs::remove_file(format!("/var/run/skymesh/{}.status", self.1));
        }
    }
    let _cleanup = Cleanup(ns.clone(), iface.clone());
    Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "up"])
        .status()
        .expect("lo");

    let good = SigningKey::from_bytes(&[1; 32]);
    let evil = SigningKey::from_bytes(&[2; 32]);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let write = |name: &str, text: &str| {
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(state.join(name))
            .expect("create");
        f.write_all(text.as_bytes()).expect("write");
    };
    use std::os::unix::fs::OpenOptionsExt as _;
    write(
        "state.json",
        &serde_json::json!({
            "version": 1, "controller_url": "http://127.0.0.1:18099",
            "controller_key": skymesh_proto::ControllerPublicKey(good.verifying_key()),
            "node_id": 1, "name": "me", "credential": "smn_test", "iface": iface,
        })
        .to_string(),
    );
    write("private.key", &b64(&[42; 32]));
    let cached = map(1, 5, &[2]);
    write(
        "netmap.json",
        &serde_json::json!({"base": sign_netmap(&cached, &good).expect("sign"), "deltas": []})
            .to_string(),
    );

    // The stream: forged (serial 9, peer 66), rollback (serial 3, peer 77), foreign node
    // (serial 8, peer 88), then the genuine delta 5 → 6 adding peer 3.
    let events = [
        StreamEvent::Netmap(sign_netmap(&map(1, 9, &[66]), &evil).expect("sign")),
        StreamEvent::Netmap(sign_netmap(&map(1, 3, &[77]), &good).expect("sign")),
        StreamEvent::Netmap(sign_netmap(&map(9, 8, &[88]), &good).expect("sign")),
        StreamEvent::Delta(sign_delta(&diff(&cached, &map(1, 6, &[2, 3])), &good).expect("sign")),
    ];
    let mut sse = String::new();
    for e in &events {
        sse.push_str(&format!(
            "event: {}\ndata: {}\n\n",
            e.name(),
            serde_json::to_string(e).expect("json")
        ));
    }
    std::fs::write(dir.path().join("events"), sse).expect("events");
    let script = dir.path().join("fake.py");
    std::fs::write(&script, FAKE_CONTROLLER).expect("script");
    struct Children(Vec<std::process::Child>);
    impl Drop for Children {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut children = Children(Vec::new());
    let fake = Command::new("ip")
        .args(["netns", "exec", &ns, "python3"])
        .arg(&script)
        .arg(dir.path().join("events"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fake controller");
    children.0.push(fake);

    let log = std::fs::File::create(dir.path().join("agent.log")).expect("log");
    let agent = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&agent)
        .args([
            "run",
            "--allow-http",
            "--listen-port",
            "51999",
            "--state-dir",
        ])
        .arg(&state)
        .env("SKYMESH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("agent");
    children.0.push(agent);

    let peers = || {
        Command::new("wg")
            .args(["show", &iface, "peers"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let t0 = Instant::now();
    while !peers().contains(&b64(&[3; 32])) {
        let text = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "genuine delta never applied; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut got = peers();
    got.sort();
    let mut want = vec![b64(&[2; 32]), b64(&[3; 32])];
    want.sort();
    assert_eq!(
        got, want,
        "cached peer kept, genuine peer added, nothing else"
    );
    let log = std::fs::read_to_string(dir.path().join("agent.log")).expect("log");
    assert_eq!(
        log.matches("refused a netmap update").count(),
        3,
        "log:\n{log}"
    );
    assert!(
        log.contains("rollback refused") && log.contains("node 9"),
        "log:\n{log}"
    );
    // The cache now holds the genuine state.
    let cache: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("netmap.json")).expect("cache"))
            .expect("json");
    assert_eq!(cache["deltas"].as_array().map(Vec::len), Some(1));
}
