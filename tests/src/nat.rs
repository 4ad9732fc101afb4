//! Test topologies for reachability without declared endpoints: one flat segment, and units
//! behind carrier-grade NAT (root only: network namespaces, nftables NAT, TUN). Used by
//! `tests/tests/nat_traversal.rs` and the `skymesh-reach` benchmark.
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

use crate::{binary, in_ns, ip, require_root, run, Controller};
use serde_json::Value;

/// Namespaces, agents and logs of one test network; torn down (and logs printed on a panic)
/// on drop.
pub struct Topology {
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
            self.dump_logs();
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

/// A number unique within this process (two digits), so that topologies built one after the
/// other never share a name (a namespace or socket of the previous one may still be going).
fn next_run() -> u32 {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100
}

/// Writes `rules` to a file and loads them with `nft -f` in `ns`.
fn nft(ns: &str, rules: &str, dir: &Path) {
    let file = dir.join(format!("{ns}.nft"));
    std::fs::write(&file, rules).expect("nft file");
    run(in_ns(Some(ns), "nft").arg("-f").arg(&file));
}

impl Topology {
    /// Prints every agent's control and device log (for a failed test or measurement).
    pub fn dump_logs(&self) {
        for f in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            // Each agent's control log, and its device's log in its state dir.
            let device = f.path().join("device.log");
            for log in [f.path(), device] {
                if log.extension().is_some_and(|e| e == "log") && log.is_file() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    eprintln!("===== {}\n{text}", log.display());
                }
            }
        }
    }

    /// [`Topology::nat`] with unit A behind an easy NAT.
    pub fn build(hard_b: bool) -> Option<Topology> {
        Self::nat(false, hard_b)
    }

    /// Builds the namespaces; `hard_a`/`hard_b`: that unit's carrier NAT is
    /// endpoint-dependent (`masquerade random`). `None`
    /// only when root or a tool is missing and the opt-out is set (see `require_root`).
    pub fn nat(hard_a: bool, hard_b: bool) -> Option<Topology> {
        if !require_root(&["ip", "nft", "ping", "curl", "sysctl"]) {
            return None;
        }
        let p = format!(
            "nt{}{}{}{}",
            std::process::id() % 10_000,
            u8::from(hard_a),
            u8::from(hard_b),
            next_run()
        );
        let t = Topology::namespaces(&p, &["hq", "nata", "natb", "ua", "ub", "wan"]);
        let names = t.names.clone();
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
            (nata, format!("{p}n1"), hard_a),
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

    /// Creates namespaces `{prefix}{name}` with loopback up (removed again on drop).
    fn namespaces(prefix: &str, names: &[&str]) -> Topology {
        let t = Topology {
            prefix: prefix.to_owned(),
            names: names.iter().map(|n| format!("{prefix}{n}")).collect(),
            children: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for ns in &t.names {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        t
    }

    pub fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// One flat segment: a bridge in namespace `lan` (0) and three hosts on it (1–3, at
    /// 198.18.10.1–3), no router, no NAT: the simplest network a new user tries first.
    pub fn flat() -> Option<Topology> {
        if !require_root(&["ip", "ping", "curl"]) {
            return None;
        }
        let p = format!("nf{}{}", std::process::id() % 10_000, next_run());
        let t = Topology::namespaces(&p, &["lan", "h1", "h2", "h3"]);
        let names = t.names.clone();
        let lan = names[0].as_str();
        ip(&["-n", lan, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", lan, "link", "set", "br0", "up"]);
        for (i, ns) in names.iter().enumerate().skip(1) {
            let (port, host) = (format!("{p}b{i}"), format!("{p}e{i}"));
            ip(&["link", "add", &port, "type", "veth", "peer", "name", &host]);
            ip(&["link", "set", &port, "netns", lan]);
            ip(&["link", "set", &host, "netns", ns]);
            ip(&["-n", lan, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("198.18.10.{i}/24"),
                "dev",
                &host,
            ]);
            ip(&["-n", ns, "link", "set", &host, "up"]);
        }
        Some(t)
    }

    /// The overlay interface of the agent in namespace `i`.
    pub fn iface(&self, i: usize) -> String {
        format!("{}s{i}", self.prefix)
    }

    /// `skymesh-agent join` in `ns` with nothing but the controller, key and name.
    pub fn join(&mut self, ns_index: usize, url: &str, key: &str, name: &str) -> PathBuf {
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
pub fn status(ns: &str, iface: &str) -> Value {
    let out = in_ns(Some(ns), binary("skymesh-agent").expect("agent"))
        .args(["status", iface, "--json"])
        .output()
        .expect("status");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The overlay IPv4 address of node `name`, once the controller has approved it.
pub fn overlay_v4(c: &Controller, hqns: &str, name: &str) -> Option<String> {
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
pub fn active_remote(ns: &str, iface: &str, peer_key: &str) -> Option<String> {
    let st = status(ns, iface);
    st["device"]["peers"]
        .as_array()
        .or_else(|| st["peers"].as_array())?
        .iter()
        .find(|p| p["public_key"] == peer_key)?["active_remote"]
        .as_str()
        .map(str::to_owned)
}

pub fn public_key_of(c: &Controller, hqns: &str, name: &str) -> String {
    let nodes = c.api(hqns, "GET", "/api/v1/nodes", None);
    nodes
        .as_array()
        .or_else(|| nodes["nodes"].as_array())
        .and_then(|a| a.iter().find(|n| n["name"] == name))
        .and_then(|n| n["public_key"].as_str())
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Starts the controller in namespace `ns` on `addr` and creates a reusable, auto-approving
/// enrollment key for `uses` nodes; returns both.
pub fn controller_with_key(ns: &str, addr: &str, uses: u32) -> (Controller, String) {
    let c = Controller::start(Some(ns), addr).expect("controller");
    let key = c.api(
        ns,
        "POST",
        "/api/v1/enrollment-keys",
        Some(&serde_json::json!({"reusable": true, "auto_approve": true, "max_uses": uses})),
    );
    let key = key["key"].as_str().expect("enrollment key").to_owned();
    (c, key)
}
