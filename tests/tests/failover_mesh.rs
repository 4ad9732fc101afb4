//! Join and failover as one system (issues 4 and 5), in network namespaces (root only).
//!
//! Topology (names `smcp<pid>…`, torn down on drop, no default routes):
//! - `…c`: the controller on a bridge, 198.18.180.254/24; each node has a control link on it
//!   (198.18.180.1 and .2);
//! - `…a` and `…b`: two field units joined by two direct veth pairs, their uplinks:
//!   `sat` (198.18.182.0/24 and fd00:182::/64, satellite, tier 0) and `terr` (198.19.182.0/24,
//!   terrestrial, tier 1).
//!
//! Both nodes join with an enrollment key via `skymesh-agent run --config` whose `uplinks:`
//! declare the two links and no `endpoints:` (derived from the uplinks). The controller
//! distributes the endpoints with the nodes' tiers, the agents feed them to their devices'
//! path selection. The scenario: traffic on sat; sat cut on `a` → a 100 pps ping continues on
//! terr (longest gap < 1 s); the API shows a's path to b on terr (kind terrestrial); sat back
//! → fail-back after the (test) hold time, and the API shows sat again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skymesh_e2e::{binary, in_ns, ip, ping_once, require_root, run, wait_for, Controller};

/// Fail-back hold of the test agents (the product default is 30 s).
const HOLD_MS: u64 = 3_000;
const CONTROLLER: &str = "198.18.180.254:18480";

/// Kills every process in the namespaces, deletes them and the agents' socket files.
struct Cleanup {
    namespaces: Vec<String>,
    ifaces: Vec<String>,
    logs: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut files: Vec<_> = std::fs::read_dir(&self.logs)
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default();
            files.sort();
            // The control logs, and each node's device log in its state dir.
            let devices: Vec<PathBuf> = files.iter().map(|d| d.join("device.log")).collect();
            files.extend(devices);
            for f in files
                .iter()
                .filter(|f| f.extension().is_some_and(|e| e == "log") && f.is_file())
            {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                eprintln!("===== {}\n{text}", f.display());
            }
        }
        for ns in &self.namespaces {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for i in &self.ifaces {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{i}.sock"));
            let _ = std::fs::remove_file(format!("/var/run/skymesh/{i}.status"));
            let _ = std::fs::remove_file(format!("/var/run/skymesh/{i}.control.json"));
        }
    }
}

/// A 100 pps ping for `secs` seconds: (longest gap between replies, sent, received).
fn ping_gaps(ns: String, dst: String, secs: u32) -> std::thread::JoinHandle<(Duration, u64, u64)> {
    std::thread::spawn(move || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-n", "-D", "-i", "0.01", "-W", "1",
            ])
            .args(["-w", &secs.to_string(), &dst])
            .output()
            .expect("ping");
        let text = String::from_utf8_lossy(&out.stdout);
        let stamps: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect();
        let gap = stamps
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0.0f64, f64::max);
        let sent = text
            .lines()
            .find_map(|l| l.split(" packets transmitted").next()?.trim().parse().ok())
            .unwrap_or(0);
        (Duration::from_secs_f64(gap), sent, stamps.len() as u64)
    })
}

struct Node {
    ns: String,
    iface: String,
    child: Child,
}

impl Node {
    fn start(ns: &str, iface: &str, config: &Path, log: &Path) -> Node {
        let exe = binary("skymesh-agent").expect("agent binary");
        let log = std::fs::File::create(log).expect("log");
        let child = in_ns(Some(ns), exe)
            .args(["run", "--config"])
            .arg(config)
            .env("SKYMESH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run");
        Node {
            ns: ns.to_owned(),
            iface: iface.to_owned(),
            child,
        }
    }

    fn overlay_v4(&self) -> Option<String> {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "-j", "-4", "addr", "show", &self.iface])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v[0]["addr_info"][0]["local"].as_str().map(str::to_string)
    }

    /// `skymesh-agent status IFACE --json` (device paths plus the control process's view).
    fn status(&self) -> Value {
        let exe = binary("skymesh-agent").expect("agent binary");
        let out = Command::new(exe)
            .args(["status", &self.iface, "--json"])
            .output()
            .expect("status");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// The local uplink carrying traffic to the (only) peer, once that path is healthy.
    fn active_uplink(&self) -> Option<String> {
        let p = &self.status()["peers"][0];
        let healthy = p["paths"]
            .as_array()?
            .iter()
            .any(|x| x["active"] == true && x["health"] == "healthy");
        healthy.then(|| p["active_uplink"].as_str().map(str::to_string))?
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the controller shows for `node`'s path to its peer: (uplink, kind).
fn api_path(c: &Controller, ns: &str, node: u64) -> Option<(String, String)> {
    let d = c.api(ns, "GET", &format!("/api/v1/nodes/{node}"), None);
    let p = &d["seen"]["status"]["peers"][0];
    Some((
        p["uplink"].as_str()?.to_string(),
        p["uplink_kind"].as_str()?.to_string(),
    ))
}

fn agent_yaml(name: &str, iface: &str, key: &str, state: &Path) -> String {
    format!(
        "controller: {{url: 'http://{CONTROLLER}', allow_http: true}}\n\
         enroll_key: {key}\nname: {name}\nstate_dir: {}\niface: {iface}\nlisten_port: 51820\n\
         uplinks:\n\
         - {{name: sat, interface: sat, kind: satellite, priority: 0}}\n\
         - {{name: terr, interface: terr, kind: terrestrial, priority: 1}}\n\
         failover: {{failback_hold_ms: {HOLD_MS}}}\n",
        state.display()
    )
}

#[test]
fn joined_field_units_fail_over_to_terrestrial_and_hq_sees_the_path() {
    if !require_root(&["ip", "ping", "curl"]) {
        return;
    }
    let t_start = Instant::now();
    let tag = format!("smcp{}", std::process::id() % 100_000);
    let (c, a, b) = (format!("{tag}c"), format!("{tag}a"), format!("{tag}b"));
    let dir = tempfile::tempdir().expect("tempdir");
    let (ia, ib) = (format!("{tag}a"), format!("{tag}b"));
    for ns in [&c, &a, &b] {
        ip(&["netns", "add", ns]);
    }
    let _cleanup = Cleanup {
        namespaces: vec![c.clone(), a.clone(), b.clone()],
        ifaces: vec![ia.clone(), ib.clone()],
        logs: dir.path().to_owned(),
    };
    for ns in [&c, &a, &b] {
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&["-n", &c, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &c, "addr", "add", "198.18.180.254/24", "dev", "br0"]);
    ip(&["-n", &c, "link", "set", "br0", "up"]);
    for (ns, host, port) in [(&a, "1", "pa"), (&b, "2", "pb")] {
        ip(&[
            "link", "add", "ctl", "netns", ns, "type", "veth", "peer", "name", port, "netns", &c,
        ]);
        ip(&["-n", &c, "link", "set", port, "master", "br0", "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("198.18.180.{host}/24"),
            "dev",
            "ctl",
        ]);
        ip(&["-n", ns, "link", "set", "ctl", "up"]);
    }
    // The sat link is dual-stack (Starlink: CGNAT IPv4, public IPv6): its uplink announces both.
    for (link, net, net6) in [
        ("sat", "198.18.182", Some("fd00:182:")),
        ("terr", "198.19.182", None),
    ] {
        ip(&[
            "link", "add", link, "netns", &a, "type", "veth", "peer", "name", link, "netns", &b,
        ]);
        for (ns, host) in [(&a, "1"), (&b, "2")] {
            let v4 = format!("{net}.{host}/24");
            let v6 = net6.map(|p| format!("{p}:{host}/64"));
            for addr in std::iter::once(v4).chain(v6) {
                ip(&["-n", ns, "addr", "add", &addr, "dev", link, "nodad"]);
            }
            // A deprecated address (being renumbered away), listed before the good one: it
            // must not be announced.
            if let Some(p) = net6.filter(|_| host == "1") {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{p}:99/64"),
                    "dev",
                    link,
                    "nodad",
                    "preferred_lft",
                    "0",
                ]);
            }
            ip(&["-n", ns, "link", "set", link, "up"]);
        }
    }

    // Carrier comes up asynchronously (linkwatch): start the agents on running links.
    wait_for(Duration::from_secs(5), "uplinks running", || {
        [&a, &b]
            .iter()
            .flat_map(|ns| ["sat", "terr"].map(|l| (ns.to_string(), l)))
            .all(|(ns, l)| {
                Command::new("ip")
                    .args(["-n", &ns, "-j", "link", "show", l])
                    .output()
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).contains("\"operstate\":\"UP\"")
                    })
            })
            .then_some(())
    });
    let controller = Controller::start(Some(&c), CONTROLLER).expect("controller");
    let key = controller.api(
        &c,
        "POST",
        "/api/v1/enrollment-keys",
        Some(&json!({"reusable": true, "auto_approve": true, "tags": ["field"]})),
    )["key"]
        .as_str()
        .expect("enrollment key")
        .to_string();
    let start = |ns: &str, iface: &str, name: &str| {
        let cfg = dir.path().join(format!("{name}.yaml"));
        let state = dir.path().join(name);
        std::fs::write(&cfg, agent_yaml(name, iface, &key, &state)).expect("config");
        Node::start(ns, iface, &cfg, &dir.path().join(format!("{name}.log")))
    };
    let na = start(&a, &ia, "field-a");
    let nb = start(&b, &ib, "field-b");

    let limit = Duration::from_secs(20);
    let (b4, _) = wait_for(limit, "b's overlay address", || nb.overlay_v4());
    wait_for(limit, "a's overlay address", || na.overlay_v4());
    let (_, took) = wait_for(limit, "a→b ping", || ping_once(&a, &b4).then_some(()));
    eprintln!("a→b overlay ping {took:?} after both had addresses");
    // Endpoints came from the uplinks (with tiers), and both ends prove the sat path.
    let nodes = controller.api(&c, "GET", "/api/v1/nodes", None);
    let id = |name: &str| {
        nodes
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["id"].as_u64())
            .expect("node id")
    };
    let (a_id, b_id) = (id("field-a"), id("field-b"));
    let a_node = controller.api(&c, "GET", &format!("/api/v1/nodes/{a_id}"), None);
    let eps = a_node["endpoints"].as_array().expect("endpoints");
    for (uplink, addr, kind, prio) in [
        ("sat", "198.18.182.1:51820", "satellite", 0),
        ("sat", "[fd00:182::1]:51820", "satellite", 0),
        ("terr", "198.19.182.1:51820", "terrestrial", 1),
    ] {
        assert!(
            eps.iter().any(|e| e["uplink"] == uplink
                && e["addr"] == addr
                && e["kind"] == kind
                && e["priority"] == prio),
            "endpoint {uplink} missing: {eps:?}"
        );
    }
    assert!(
        !eps.iter().any(|e| e["addr"] == "[fd00:182::99]:51820"),
        "a deprecated address was announced: {eps:?}"
    );
    for n in [&na, &nb] {
        let t0 = Instant::now();
        // With traffic: a follower takes the path the chooser's data arrives on.
        while n.active_uplink().as_deref() != Some("sat") {
            ping_once(&a, &b4);
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{} not on a healthy sat path: {:#}\nits peer: {:#}",
                n.iface,
                n.status(),
                if n.iface == na.iface { &nb } else { &na }.status()["peers"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // `status` shows the control process's view too (rewritten every second).
    let (st, _) = wait_for(
        Duration::from_secs(3),
        "status: controller connected",
        || {
            let st = na.status();
            (st["control"]["controller_connected"] == true).then_some(st)
        },
    );
    assert_eq!(st["control"]["netmap_age_secs"], 0, "{st:#}");
    assert!(st["control"]["serial"].as_u64().is_some(), "{st:#}");
    wait_for(Duration::from_secs(5), "API: a→b on sat", || {
        (api_path(&controller, &c, a_id)? == ("sat".into(), "satellite".into())).then_some(())
    });

    // Cut a's preferred uplink under a 100 pps ping.
    let pinger = ping_gaps(a.clone(), b4.clone(), 5);
    std::thread::sleep(Duration::from_millis(1_000));
    ip(&["-n", &a, "link", "set", "sat", "down"]);
    let cut = Instant::now();
    let (_, api_took) = wait_for(Duration::from_secs(5), "API: a→b on terr", || {
        (api_path(&controller, &c, a_id)? == ("terr".into(), "terrestrial".into())).then_some(())
    });
    let api_took = cut.elapsed().min(api_took + Duration::from_millis(50));
    let (gap, sent, received) = pinger.join().expect("ping thread");
    eprintln!(
        "sat cut: longest ping gap {gap:?} ({received}/{sent} replies); API showed terr \
         {api_took:?} after the cut"
    );
    assert!(sent > 150, "the ping ran ({sent} sent)");
    assert!(gap < Duration::from_secs(1), "failover gap {gap:?} ≥ 1 s");
    assert_eq!(na.active_uplink().as_deref(), Some("terr"));
    let d = controller.api(&c, "GET", &format!("/api/v1/nodes/{a_id}"), None);
    let peer = &d["seen"]["status"]["peers"][0];
    assert_eq!(peer["node_id"], b_id, "{d:#}");
    assert!(peer["switch_count"].as_u64() >= Some(1), "{d:#}");
    assert_eq!(peer["last_switch_reason"], "link_down", "{d:#}");
    let uplinks = d["seen"]["status"]["uplinks"].as_array().expect("uplinks");
    assert!(
        uplinks
            .iter()
            .any(|u| u["name"] == "sat" && u["up"] == false),
        "{uplinks:?}"
    );
    let metrics = run(controller.curl(Some(&c)).args([
        "-sS",
        "-H",
        &format!("Authorization: Bearer {}", controller.admin_token),
        &format!("{}/metrics", controller.url),
    ]));
    let line = format!(
        "skymesh_node_path_uplink{{node=\"{a_id}\",name=\"field-a\",peer=\"{b_id}\",\
         peer_name=\"field-b\",uplink=\"terr\",kind=\"terrestrial\"}} 1"
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");

    // Sat back: fail-back only after the hold time, and HQ sees it.
    let pinger = ping_gaps(a.clone(), b4.clone(), 6);
    ip(&["-n", &a, "link", "set", "sat", "up"]);
    let up = Instant::now();
    let (_, back) = wait_for(Duration::from_secs(HOLD_MS / 1000 + 5), "fail-back", || {
        (na.active_uplink().as_deref() == Some("sat")).then_some(())
    });
    let back = up.elapsed().min(back + Duration::from_millis(100));
    wait_for(Duration::from_secs(5), "API: a→b on sat again", || {
        (api_path(&controller, &c, a_id)? == ("sat".into(), "satellite".into())).then_some(())
    });
    let (gap, sent, received) = pinger.join().expect("ping thread");
    eprintln!(
        "sat restored: fail-back {back:?} after link up (hold {HOLD_MS} ms); longest gap \
         {gap:?} ({received}/{sent} replies)"
    );
    assert!(
        back >= Duration::from_millis(HOLD_MS - 200),
        "failed back after {back:?}, before the {HOLD_MS} ms hold"
    );
    assert!(gap < Duration::from_secs(1), "fail-back gap {gap:?}");

    // The carrier renumbers a's terrestrial uplink: the agent hears it from netlink and
    // re-announces, so HQ (and through the netmap, b) has the new endpoint within a second or
    // two, not at the next 5 s re-read.
    // (Deleting a primary IPv4 address also deletes the secondaries of its subnet: delete first.)
    ip(&["-n", &a, "addr", "del", "198.19.182.1/24", "dev", "terr"]);
    ip(&["-n", &a, "addr", "add", "198.19.182.11/24", "dev", "terr"]);
    let renumbered = Instant::now();
    let (_, took) = wait_for(
        Duration::from_secs(10),
        "API: a's new terr endpoint",
        || {
            let node = controller.api(&c, "GET", &format!("/api/v1/nodes/{a_id}"), None);
            node["endpoints"]
                .as_array()?
                .iter()
                .any(|e| e["uplink"] == "terr" && e["addr"] == "198.19.182.11:51820")
                .then_some(())
        },
    );
    eprintln!("terr renumbered: new endpoint in the API after {took:?}");
    assert!(
        renumbered.elapsed() < Duration::from_millis(2_500),
        "re-announced only after {:?}",
        renumbered.elapsed()
    );
    eprintln!("scenario took {:?}", t_start.elapsed());
    drop((na, nb));
}
