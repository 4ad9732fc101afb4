//! Reachability without declared endpoints, across carrier-grade NAT (root only: network
//! namespaces, nftables NAT, TUN).
//!
//! Topology (unique names per run, torn down on drop; nothing routes out of the machine):
//!
//! ```text
//!   ua 100.64.1.2 ── nata (masquerade) 198.18.1.2 ──┐
//!                                                    wan (router) ── hq 198.18.0.2: controller + HQ agent
//!   ub 100.64.2.2 ── natb (masquerade) 198.18.2.2 ──┘
//! ```
//!
//! The carrier NATs are nftables `masquerade` with a firewall that lets in only replies, as a
//! carrier-grade NAT does (nothing listens on its own address; an unsolicited datagram is
//! dropped before conntrack commits an entry for it).
//!
//! Every node runs `skymesh-agent join --controller URL --enroll-key KEY` and nothing else: no
//! `--endpoint`, no uplinks. The units sit behind their own carrier NAT (addresses from
//! Starlink's 100.64.0.0/10), with no inbound forwarding.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skymesh_e2e::{
    binary, in_ns, ip, ping_once, require_root, run, wait_for, wait_until, Controller,
};

struct Topology {
    /// Prefix of every name (interfaces too: the UAPI socket path is shared by namespaces).
    prefix: String,
    names: Vec<String>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for f in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                    eprintln!("===== {}\n{text}", f.path().display());
                }
            }
        }
        for ns in &self.names {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sysctl(ns: &str, key: &str) {
    run(in_ns(Some(ns), "sysctl").args(["-qw", key]));
}

/// A veth pair `a` (in `ns_a`, address `addr_a`) ⇄ `b` (in `ns_b`, `addr_b`), both up.
fn link(ns_a: &str, a: &str, addr_a: &str, ns_b: &str, b: &str, addr_b: &str) {
    ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
    ip(&["link", "set", a, "netns", ns_a]);
    ip(&["link", "set", b, "netns", ns_b]);
    ip(&["-n", ns_a, "addr", "add", addr_a, "dev", a]);
    ip(&["-n", ns_b, "addr", "add", addr_b, "dev", b]);
    ip(&["-n", ns_a, "link", "set", a, "up"]);
    ip(&["-n", ns_b, "link", "set", b, "up"]);
}

/// Writes `rules` to a file and loads them with `nft -f` in `ns`.
fn nft(ns: &str, rules: &str, dir: &Path) {
    let file = dir.join(format!("{ns}.nft"));
    std::fs::write(&file, rules).expect("nft file");
    run(in_ns(Some(ns), "nft").arg("-f").arg(&file));
}

impl Topology {
    /// Builds the namespaces; `hard_b`: unit B's carrier NAT is endpoint-dependent. `None`
    /// only when root or a tool is missing and the opt-out is set (see `require_root`).
    fn build(hard_b: bool) -> Option<Topology> {
        if !require_root(&["ip", "nft", "ping", "curl", "sysctl"]) {
            return None;
        }
        let p = format!("nt{}{}", std::process::id() % 10_000, u8::from(hard_b));
        let names: Vec<String> = ["hq", "nata", "natb", "ua", "ub", "wan"]
            .iter()
            .map(|n| format!("{p}{n}"))
            .collect();
        let t = Topology {
            prefix: p.clone(),
            names: names.clone(),
            children: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for ns in &names {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let [hq, nata, natb, ua, ub, wan] = [0, 1, 2, 3, 4, 5].map(|i| names[i].as_str());
        link(
            wan,
            &format!("{p}w0"),
            "198.18.0.1/24",
            hq,
            &format!("{p}h0"),
            "198.18.0.2/24",
        );
        link(
            wan,
            &format!("{p}w1"),
            "198.18.1.1/24",
            nata,
            &format!("{p}n1"),
            "198.18.1.2/24",
        );
        link(
            wan,
            &format!("{p}w2"),
            "198.18.2.1/24",
            natb,
            &format!("{p}n2"),
            "198.18.2.2/24",
        );
        link(
            nata,
            &format!("{p}l1"),
            "100.64.1.1/24",
            ua,
            &format!("{p}u1"),
            "100.64.1.2/24",
        );
        link(
            natb,
            &format!("{p}l2"),
            "100.64.2.1/24",
            ub,
            &format!("{p}u2"),
            "100.64.2.2/24",
        );
        for ns in [wan, nata, natb] {
            sysctl(ns, "net.ipv4.ip_forward=1");
        }
        // Default routes only towards our own NAT and "internet" namespaces.
        ip(&["-n", hq, "route", "add", "default", "via", "198.18.0.1"]);
        ip(&["-n", nata, "route", "add", "default", "via", "198.18.1.1"]);
        ip(&["-n", natb, "route", "add", "default", "via", "198.18.2.1"]);
        ip(&["-n", ua, "route", "add", "default", "via", "100.64.1.1"]);
        ip(&["-n", ub, "route", "add", "default", "via", "100.64.2.1"]);
        for (ns, oif, hard) in [
            (nata, format!("{p}n1"), false),
            (natb, format!("{p}n2"), hard_b),
        ] {
            let rules = format!(
                "table ip carrier {{\n  chain post {{\n    type nat hook postrouting priority srcnat;\n    \
                 oifname \"{oif}\" masquerade{}\n  }}\n  \
                 chain forward {{\n    type filter hook forward priority filter; policy drop;\n    \
                 ct state established,related accept\n    iifname != \"{oif}\" accept\n  }}\n  \
                 chain input {{\n    type filter hook input priority filter; policy drop;\n    \
                 ct state established,related accept\n    iifname != \"{oif}\" accept\n  }}\n}}\n",
                if hard { " random" } else { "" }
            );
            nft(ns, &rules, t.dir.path());
        }
        Some(t)
    }

    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The overlay interface of the agent in namespace `i`.
    fn iface(&self, i: usize) -> String {
        format!("{}s{i}", self.prefix)
    }

    /// `skymesh-agent join` in `ns` with nothing but the controller, key and name.
    fn join(&mut self, ns_index: usize, url: &str, key: &str, name: &str) -> PathBuf {
        let state = self.dir.path().join(name);
        let iface = self.iface(ns_index);
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log");
        let child = in_ns(
            Some(&self.names[ns_index]),
            binary("skymesh-agent").expect("agent"),
        )
        .args([
            "join",
            "--controller",
            url,
            "--enroll-key",
            key,
            "--allow-http",
        ])
        .args(["--name", name, "--iface", &iface, "--state-dir"])
        .arg(&state)
        .env("SKYMESH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("join");
        self.children.push(child);
        state
    }
}

/// `skymesh-agent status IFACE --json` in `ns`.
fn status(ns: &str, iface: &str) -> Value {
    let out = in_ns(Some(ns), binary("skymesh-agent").expect("agent"))
        .args(["status", iface, "--json"])
        .output()
        .expect("status");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The overlay IPv4 address of node `name`, once the controller has approved it.
fn overlay_v4(c: &Controller, hqns: &str, name: &str) -> Option<String> {
    let nodes = c.api(hqns, "GET", "/api/v1/nodes", None);
    let node = nodes
        .as_array()
        .or_else(|| nodes["nodes"].as_array())?
        .iter()
        .find(|n| n["name"] == name)?
        .clone();
    let v4 = node["ipv4"].as_str().map(str::to_owned).or_else(|| {
        node["addresses"]
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .find(|a| !a.contains(':'))
            .map(|a| a.split('/').next().unwrap_or(a).to_owned())
    })?;
    Some(v4)
}

/// The active remote address unit `ns` uses towards the peer with `peer_key`.
fn active_remote(ns: &str, iface: &str, peer_key: &str) -> Option<String> {
    let st = status(ns, iface);
    st["device"]["peers"]
        .as_array()
        .or_else(|| st["peers"].as_array())?
        .iter()
        .find(|p| p["public_key"] == peer_key)?["active_remote"]
        .as_str()
        .map(str::to_owned)
}

fn public_key_of(c: &Controller, hqns: &str, name: &str) -> String {
    let nodes = c.api(hqns, "GET", "/api/v1/nodes", None);
    nodes
        .as_array()
        .or_else(|| nodes["nodes"].as_array())
        .and_then(|a| a.iter().find(|n| n["name"] == name))
        .and_then(|n| n["public_key"].as_str())
        .map(str::to_owned)
        .unwrap_or_default()
}

#[test]
fn plain_join_behind_two_carrier_nats_reaches_every_node_and_the_units_go_direct() {
    let Some(mut t) = Topology::build(false) else {
        return;
    };
    let (hqns, ua, ub) = (t.ns(0).to_owned(), t.ns(3).to_owned(), t.ns(4).to_owned());
    let c = Controller::start(Some(&hqns), "198.18.0.2:8080").expect("controller");
    let key = c.api(
        &hqns,
        "POST",
        "/api/v1/enrollment-keys",
        Some(&json!({"reusable": true, "auto_approve": true, "max_uses": 10})),
    );
    let key = key["key"].as_str().expect("enrollment key").to_owned();
    let url = "http://198.18.0.2:8080";
    let started = Instant::now();
    t.join(0, url, &key, "hq");
    t.join(3, url, &key, "unit-a");
    t.join(4, url, &key, "unit-b");
    let (addrs, _) = wait_for(Duration::from_secs(20), "three approved nodes", || {
        let a = ["hq", "unit-a", "unit-b"].map(|n| overlay_v4(&c, &hqns, n));
        a.iter()
            .all(Option::is_some)
            .then(|| a.map(Option::unwrap_or_default))
    });
    let [hq, a, b] = addrs;

    // The controller saw each unit's NAT-mapped address through STUN: A's carrier address.
    let (_, t_refl) = wait_for(
        Duration::from_secs(20),
        "A's reflexive endpoint at HQ",
        || {
            let nodes = c.api(&hqns, "GET", "/api/v1/nodes", None);
            let text = nodes.to_string();
            text.contains("\"198.18.1.2:").then_some(())
        },
    );
    eprintln!("reflexive endpoint of unit A known to HQ after {t_refl:?}");

    // Full mesh, including unit ⇄ unit through both NATs (hole punching).
    let mut took = Vec::new();
    for (from, to, what) in [
        (&ua, &b, "unit A → unit B"),
        (&ub, &a, "unit B → unit A"),
        (&hqns, &a, "HQ → unit A"),
        (&hqns, &b, "HQ → unit B"),
        (&ua, &hq, "unit A → HQ"),
        (&ub, &hq, "unit B → HQ"),
    ] {
        let d = wait_until(Duration::from_secs(30), what, || ping_once(from, to));
        took.push((what, d));
    }
    eprintln!("join → full mesh in {:?}: {took:?}", started.elapsed());

    // The units' path is direct: A sends to B's NAT (198.18.2.2), not through anyone else.
    let b_key = public_key_of(&c, &hqns, "unit-b");
    let remote = wait_for(Duration::from_secs(10), "A's active path to B", || {
        active_remote(&ua, &t.iface(3), &b_key)
    })
    .0;
    assert!(
        remote.starts_with("198.18.2.2:"),
        "unit A reaches unit B at {remote}, not B's carrier NAT address"
    );
    // HQ sees it too: the unit's status report carries its uplink's reflexive address and
    // NAT kind (GET /api/v1/nodes/{id}).
    let id = c
        .api(&hqns, "GET", "/api/v1/nodes", None)
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "unit-a").cloned())
        .and_then(|n| n["id"].as_u64())
        .expect("unit-a id");
    let (uplink, _) = wait_for(Duration::from_secs(40), "unit A's NAT kind at HQ", || {
        let d = c.api(&hqns, "GET", &format!("/api/v1/nodes/{id}"), None);
        let u = d["seen"]["status"]["uplinks"][0].clone();
        (u["nat"] == "endpoint-independent").then_some(u)
    });
    assert!(
        uplink["reflexive"].to_string().contains("198.18.1.2:"),
        "{uplink}"
    );
    // Each unit sees an endpoint-independent mapping of its one uplink.
    let st = status(&ua, &t.iface(3));
    let disc = st["device"]["discovery"]
        .as_array()
        .or_else(|| st["discovery"].as_array())
        .cloned()
        .unwrap_or_default();
    assert!(
        disc.iter().any(|d| d["nat"] == "endpoint-independent"
            && d["reflexive"]
                .as_str()
                .is_some_and(|r| r.starts_with("198.18.1.2:"))),
        "discovery status: {disc:?}"
    );
}

#[test]
fn a_unit_behind_hard_nat_is_told_so_and_announces_no_useless_reflexive_address() {
    let Some(mut t) = Topology::build(true) else {
        return;
    };
    let (hqns, ub) = (t.ns(0).to_owned(), t.ns(4).to_owned());
    let c = Controller::start(Some(&hqns), "198.18.0.2:8080").expect("controller");
    let key = c.api(
        &hqns,
        "POST",
        "/api/v1/enrollment-keys",
        Some(&json!({"reusable": true, "auto_approve": true, "max_uses": 10})),
    );
    let key = key["key"].as_str().expect("enrollment key").to_owned();
    let url = "http://198.18.0.2:8080";
    t.join(0, url, &key, "hq");
    t.join(4, url, &key, "unit-b");
    let (hq, _) = wait_for(Duration::from_secs(20), "HQ approved", || {
        overlay_v4(&c, &hqns, "hq")
    });
    // HQ is public: B reaches it (B's NAT keeps the mapping its own packets opened).
    wait_until(Duration::from_secs(30), "unit B → HQ", || {
        ping_once(&ub, &hq)
    });
    let (disc, _) = wait_for(Duration::from_secs(20), "B's NAT kind", || {
        let st = status(&ub, &t.iface(4));
        let d = st["device"]["discovery"]
            .as_array()
            .or_else(|| st["discovery"].as_array())
            .cloned()
            .unwrap_or_default();
        d.iter()
            .any(|d| d["nat"] == "endpoint-dependent")
            .then_some(d)
    });
    assert!(
        disc.iter().all(|d| d["reflexive"].is_null()),
        "a hard NAT's reflexive address is useless to peers: {disc:?}"
    );
    let nodes = c.api(&hqns, "GET", "/api/v1/nodes", None).to_string();
    assert!(
        !nodes.contains("\"198.18.2.2:"),
        "B's NAT address must not be announced: {nodes}"
    );
}
