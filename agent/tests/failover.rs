//! Carrier-aware failover end to end (issue 5): two agents in two namespaces joined by two
//! veth pairs, "sat" (198.18.N.0/24, tier 0) and "terr" (198.18.N+1.0/24, tier 1), each agent
//! with one socket per uplink and the other as a managed peer; a 100 pps ping over the
//! overlay measures the longest gap while the test cuts, blackholes and restores the sat link.
//! The scenarios run one at a time (a shared lock) so their gap figures do not compete for
//! the two CPUs.

mod common;

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// Prometheus endpoint of agent a, on the loopback of its namespace.
const METRICS: &str = "127.0.0.1:9101";

/// Fail-back hold time of the test agents (the product default is 30 s).
const HOLD_MS: u64 = 3_000;

struct Mesh {
    net: Pair,
    ia: String,
    ib: String,
    _pa: Proc,
    _pb: Proc,
    _dir: tempfile::TempDir,
    /// Overlay address of b.
    b4: String,
    /// The switch namespace between a and b, if the links go through one.
    _mid: Option<Netns>,
}

fn uplinks_yaml(sat: &str, terr: &str, peer_key: &str, peer_sat: &str, peer_terr: &str) -> String {
    format!(
        "uplinks:\n\
         - name: sat\n  interface: {sat}\n  kind: satellite\n  priority: 0\n\
         - name: terr\n  interface: {terr}\n  kind: terrestrial\n  priority: 1\n\
         failover:\n  failback_hold_ms: {HOLD_MS}\n\
         peers:\n\
         - public_key: {peer_key}\n  endpoints:\n\
         \x20 - addr: \"{peer_sat}\"\n    priority: 0\n\
         \x20 - addr: \"{peer_terr}\"\n    priority: 1\n"
    )
}

/// Two agents with two uplinks each, peered, overlay 10.97.S.1 ↔ 10.97.S.2, traffic flowing.
fn mesh(tag: &str, subnet: u8) -> Mesh {
    mesh_on(tag, subnet, false)
}

/// [`mesh`] with the peers' candidate endpoints on the IPv6 (`v6`) or IPv4 underlay.
fn mesh_on(tag: &str, subnet: u8, v6: bool) -> Mesh {
    mesh_with(pair(tag, subnet), None, subnet, v6)
}

/// [`mesh`] whose links run through a switch namespace (a bridge per link): taking one
/// end's link down is seen by that end alone, as a field unit's unplugged dish is.
fn mesh_switched(tag: &str, subnet: u8) -> Mesh {
    let a = Netns::new(&format!("{tag}a"));
    let b = Netns::new(&format!("{tag}b"));
    let mid = Netns::new(&format!("{tag}m"));
    let mk = |name: &str, third: u8| {
        let br = format!("{name}br");
        mid.ip(&["link", "add", &br, "type", "bridge"]);
        mid.ip(&["link", "set", &br, "up"]);
        for (ns, h) in [(&a, 1u8), (&b, 2u8)] {
            let end = format!("{name}{}", if h == 1 { "a" } else { "b" });
            let port = format!("{name}m{h}");
            ok(
                "ip",
                &[
                    "link", "add", &end, "netns", &ns.name, "type", "veth", "peer", "name", &port,
                    "netns", &mid.name,
                ],
            );
            mid.ip(&["link", "set", &port, "master", &br]);
            mid.ip(&["link", "set", &port, "up"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("198.18.{third}.{h}/24"),
                "dev",
                &end,
            ]);
            ns.ip(&["link", "set", &end, "up"]);
        }
        (format!("198.18.{third}.1"), format!("198.18.{third}.2"))
    };
    let sat = mk("sat", subnet);
    let terr = mk("terr", subnet + 1);
    mesh_with(Pair { a, b, sat, terr }, Some(mid), subnet, false)
}

fn mesh_with(net: Pair, mid: Option<Netns>, subnet: u8, v6: bool) -> Mesh {
    // Underlay endpoint of host `h` (1 = a, 2 = b) on the link of `third` (see `pair`).
    let ep = |third: u8, h: u8| {
        if v6 {
            format!("[fd00:{third}::{h}]:51820")
        } else {
            format!("198.18.{third}.{h}:51820")
        }
    };
    let dir = tmpdir();
    let ia = unique("sm5f");
    let ib = unique("sm5f");
    let ka = genkey();
    let kb = genkey();
    let fa = dir.path().join("a.yaml");
    let fb = dir.path().join("b.yaml");
    std::fs::write(
        &fa,
        uplinks_yaml(
            "sata",
            "terra",
            &kb.public,
            &ep(subnet, 2),
            &ep(subnet + 1, 2),
        ),
    )
    .expect("write");
    // b learns its peer's endpoints over the status socket extension instead of the file.
    let b_yaml = uplinks_yaml(
        "satb",
        "terrb",
        &ka.public,
        &ep(subnet, 1),
        &ep(subnet + 1, 1),
    );
    let b_yaml = &b_yaml[..b_yaml.find("peers:").expect("peers section")];
    std::fs::write(&fb, b_yaml).expect("write");
    let spawn = |ns: &Netns, iface: &str, file: &std::path::Path, metrics: Option<&str>| {
        let log = format!(
            "SKYMESH_LOG={}",
            std::env::var("SKYMESH_LOG").unwrap_or_else(|_| "info".into())
        );
        let mut args = vec![
            "env",
            &log,
            AGENT,
            "device",
            iface,
            "--foreground",
            "--uplinks",
            file.to_str().expect("utf8 path"),
        ];
        if let Some(m) = metrics {
            args.extend(["--metrics-listen", m]);
        }
        ns.spawn(&args, &dir.path().join(format!("{iface}.log")))
    };
    let mut pa = spawn(&net.a, &ia, &fa, Some(METRICS));
    let mut pb = spawn(&net.b, &ib, &fb, None);
    wait_socket(&ia, &mut pa);
    wait_socket(&ib, &mut pb);
    let o4 = |h: u8| format!("10.97.{subnet}.{h}");
    setconf(
        &net.a,
        &ia,
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n[Peer]\nPublicKey = {}\n\
             AllowedIPs = {}/32\n",
            ka.private,
            kb.public,
            o4(2)
        ),
    );
    setconf(
        &net.b,
        &ib,
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n[Peer]\nPublicKey = {}\n\
             AllowedIPs = {}/32\n",
            kb.private,
            ka.public,
            o4(1)
        ),
    );
    let bad = control(
        &ib,
        "{\"set_peer_paths\":{\"public_key\":\"nope\",\"endpoints\":[]}}",
    );
    assert!(bad.contains("set_peer_paths.public_key"), "{bad}");
    let set = control(
        &ib,
        &format!(
            "{{\"set_peer_paths\":{{\"public_key\":\"{}\",\"endpoints\":[\
             {{\"addr\":\"{}\",\"priority\":0}},{{\"addr\":\"{}\",\"priority\":1}}]}}}}",
            ka.public,
            ep(subnet, 1),
            ep(subnet + 1, 1)
        ),
    );
    assert_eq!(set.trim(), "{\"errno\":0}");
    overlay(
        &net.a,
        &ia,
        &format!("{}/24", o4(1)),
        &format!("fd97:{subnet}::1/64"),
    );
    overlay(
        &net.b,
        &ib,
        &format!("{}/24", o4(2)),
        &format!("fd97:{subnet}::2/64"),
    );
    assert!(
        net.a.ping_until(&o4(2), Duration::from_secs(5)),
        "a: {}\nb: {}",
        pa.log_text(),
        pb.log_text()
    );
    let m = Mesh {
        net,
        ia,
        ib,
        _pa: pa,
        _pb: pb,
        _dir: dir,
        b4: o4(2),
        _mid: mid,
    };
    // Both ends proved the sat path and carry traffic on it.
    m.wait_active(&m.ia, "sat", Duration::from_secs(5));
    m.wait_active(&m.ib, "sat", Duration::from_secs(5));
    m
}

impl Mesh {
    fn status(&self, iface: &str) -> serde_json::Value {
        let out = ok(AGENT, &["status", iface, "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON {e}: {out}"))
    }

    fn peer_status(&self, iface: &str) -> serde_json::Value {
        self.status(iface)["peers"][0].clone()
    }

    fn wait_active(&self, iface: &str, uplink: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            let p = self.peer_status(iface);
            if p["active_uplink"] == uplink
                && p["paths"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|x| x["active"] == true && x["health"] == "healthy")
                })
            {
                return;
            }
            assert!(
                Instant::now() < end,
                "{iface}: active uplink is not a healthy {uplink}: {p:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a 100 pps ping a→b for `secs` seconds.
    fn ping(&self, secs: u32) -> JoinHandle<Gaps> {
        let ns = self.net.a.name.clone();
        let dst = self.b4.clone();
        std::thread::spawn(move || {
            let w = secs.to_string();
            let out = run(
                "ip",
                &[
                    "netns", "exec", &ns, "ping", "-n", "-D", "-i", "0.01", "-w", &w, "-W", "1",
                    &dst,
                ],
            );
            Gaps::parse(&String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Drops the sat underlay in namespace b (both directions), except packets marked 1.
    fn blackhole_sat(&self) {
        let rules = "table inet sm5bh {\n\
             chain in { type filter hook input priority 0; iifname \"satb\" udp dport 51820 drop; }\n\
             chain out { type filter hook output priority 0; oifname \"satb\" udp sport 51820 meta mark != 0x1 drop; }\n\
             }\n";
        self.net.b.exec_stdin(&["nft", "-f", "-"], rules);
    }

    fn restore_sat(&self) {
        self.net
            .b
            .exec_ok(&["nft", "delete", "table", "inet", "sm5bh"]);
    }
}

/// One request on the agent's status/control socket; returns the answer.
fn control(iface: &str, request: &str) -> String {
    use std::io::{Read as _, Write as _};
    let path = format!("/var/run/skymesh/{iface}.status");
    let mut c = std::os::unix::net::UnixStream::connect(&path).expect("connect status socket");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(request.as_bytes()).expect("write");
    c.write_all(b"\n").expect("write");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    out
}

/// Replies of a 100 pps ping: sequence numbers and arrival times (`ping -D`).
struct Gaps {
    seqs: Vec<u32>,
    times: Vec<f64>,
    text: String,
}

impl Gaps {
    fn parse(text: &str) -> Gaps {
        let mut seqs: Vec<u32> = text
            .lines()
            .filter_map(|l| l.split("icmp_seq=").nth(1))
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        let mut times: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("icmp_seq="))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect();
        times.sort_by(f64::total_cmp);
        Gaps {
            seqs,
            times,
            text: text.lines().rev().take(3).collect::<Vec<_>>().join(" | "),
        }
    }

    /// Longest time between two consecutive replies, in ms.
    fn longest_gap_ms(&self) -> u64 {
        self.times
            .windows(2)
            .map(|w| ((w[1] - w[0]) * 1e3) as u64)
            .max()
            .unwrap_or(u64::MAX)
    }

    fn lost_between(&self, from: u32, to: u32) -> usize {
        (from..to)
            .filter(|s| self.seqs.binary_search(s).is_err())
            .count()
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn sat_link_down_moves_traffic_to_terrestrial_within_one_second() {
    require(&["ip", "wg", "ping"]);
    let _g = lock();
    let m = mesh("fa", 51);
    let ping = m.ping(4);
    std::thread::sleep(Duration::from_millis(1_500));
    m.net.a.ip(&["link", "set", "sata", "down"]);
    let gaps = ping.join().expect("ping thread");
    let gap = gaps.longest_gap_ms();
    eprintln!("hard cut: longest gap {gap} ms ({})", gaps.text);
    assert!(gap <= 1_000, "longest gap {gap} ms: {}", gaps.text);
    for iface in [&m.ia, &m.ib] {
        let p = m.peer_status(iface);
        assert_eq!(p["active_uplink"], "terr", "{iface}: {p:#}");
        assert!(p["switch_count"].as_u64() >= Some(1), "{iface}: {p:#}");
    }
    let p = m.peer_status(&m.ia);
    assert_eq!(p["last_switch_reason"], "link_down", "{p:#}");
    // The same, as Prometheus metrics on a's loopback.
    let metrics = m.net.a.exec_ok(&["python3", "-c", FETCH_PY, METRICS]);
    let line = |prefix: &str, needle: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains(needle))
            .unwrap_or_else(|| panic!("no {prefix} {needle} in:\n{metrics}"))
            .to_owned()
    };
    assert!(line("skymesh_uplink_up", "uplink=\"sat\"").ends_with(" 0"));
    assert!(line("skymesh_uplink_up", "uplink=\"terr\"").ends_with(" 1"));
    let terr_path = format!("uplink=\"terr\",remote=\"{}:51820\"", m.net.terr.1);
    assert!(line("skymesh_peer_active_path", &terr_path).ends_with(" 1"));
    assert!(
        line("skymesh_peer_switches_total", "last_reason=\"link_down\"")
            .ends_with(&format!(" {}", p["switch_count"].as_u64().expect("count")))
    );
}

/// IPv6 underlay: an uplink bound to an interface has an IPv6 socket bound to it too, so a
/// path to a peer's IPv6 endpoint leaves and arrives through its own uplink, is proven by
/// probes, and fails over on a hard cut as the IPv4 paths do.
#[test]
fn ipv6_underlay_paths_are_proven_per_uplink_and_fail_over() {
    require(&["ip", "wg", "ping"]);
    let _g = lock();
    let m = mesh_on("f6", 61, true);
    for iface in [&m.ia, &m.ib] {
        let p = m.peer_status(iface);
        let active: Vec<_> = p["paths"]
            .as_array()
            .expect("paths")
            .iter()
            .filter(|x| x["active"] == true)
            .collect();
        assert_eq!(active.len(), 1, "{iface}: {p:#}");
        assert_eq!(active[0]["uplink"], "sat", "{iface}: {p:#}");
        assert!(
            active[0]["remote"]
                .as_str()
                .is_some_and(|r| r.starts_with("[fd00:61::")),
            "{iface}: {p:#}"
        );
        assert_eq!(active[0]["health"], "healthy", "{iface}: {p:#}");
    }
    let ping = m.ping(4);
    std::thread::sleep(Duration::from_millis(1_500));
    m.net.a.ip(&["link", "set", "sata", "down"]);
    let gaps = ping.join().expect("ping thread");
    let gap = gaps.longest_gap_ms();
    eprintln!("IPv6 hard cut: longest gap {gap} ms ({})", gaps.text);
    assert!(gap <= 1_000, "longest gap {gap} ms: {}", gaps.text);
    for iface in [&m.ia, &m.ib] {
        let p = m.peer_status(iface);
        assert_eq!(p["active_uplink"], "terr", "{iface}: {p:#}");
    }
}

/// Fetches http://ARGV1/metrics (never through a proxy) and prints the body.
const FETCH_PY: &str = r#"
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open("http://" + sys.argv[1] + "/metrics", timeout=5).read().decode())
"#;

/// The hard cut taken by one end only (its sat link goes down behind a switch; the other end
/// sees nothing), alternating between a and b, so the chooser and the follower each take it:
/// the path notice moves the other end, and the ping a→b loses about one backup RTT.
#[test]
fn one_sided_hard_cut_at_either_end_moves_both_ends() {
    require(&["ip", "wg", "ping"]);
    let _g = lock();
    let trials: usize = std::env::var("SKYMESH_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let m = mesh_switched("fo", 73);
    let chooser = if m.peer_status(&m.ia)["role"] == "chooser" {
        "a"
    } else {
        "b"
    };
    let role = |end: usize| {
        if ["a", "b"][end] == chooser {
            "chooser"
        } else {
            "follower"
        }
    };
    let mut gaps_by_end: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for k in 0..trials {
        let end = k % 2;
        let (ns, dev, iface, other) = if end == 0 {
            (&m.net.a, "sata", &m.ia, &m.ib)
        } else {
            (&m.net.b, "satb", &m.ib, &m.ia)
        };
        let ping = m.ping(3);
        // Let the ping run on sat before the cut.
        std::thread::sleep(Duration::from_millis(1_000));
        ns.ip(&["link", "set", dev, "down"]);
        let gaps = ping.join().expect("ping thread");
        let gap = gaps.longest_gap_ms();
        let cut = m.peer_status(iface);
        let moved = m.peer_status(other);
        eprintln!(
            "trial {k}: cut at {} ({}), longest gap {gap} ms; other end: {} ({})",
            ["a", "b"][end],
            role(end),
            moved["active_uplink"],
            moved["last_switch_reason"],
        );
        assert_eq!(cut["last_switch_reason"], "link_down", "{cut:#}");
        assert_eq!(moved["active_uplink"], "terr", "{moved:#}");
        assert_eq!(moved["last_switch_reason"], "peer_notice", "{moved:#}");
        let status = m.status(other);
        assert_eq!(status["uplinks"][0]["up"], true, "the other end saw no cut");
        gaps_by_end[end].push(gap);
        ns.ip(&["link", "set", dev, "up"]);
        m.wait_active(&m.ia, "sat", Duration::from_secs(20));
        m.wait_active(&m.ib, "sat", Duration::from_secs(20));
    }
    let mut all: Vec<u64> = gaps_by_end.concat();
    all.sort_unstable();
    let pct = |v: &[u64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    for (end, g) in gaps_by_end.iter_mut().enumerate() {
        g.sort_unstable();
        eprintln!(
            "cut at {} ({}): {} trials, gap p50 {} ms, max {} ms: {g:?}",
            ["a", "b"][end],
            role(end),
            g.len(),
            pct(g, 0.5),
            g.last().copied().unwrap_or(0),
        );
    }
    let (p50, p99) = (pct(&all, 0.5), pct(&all, 0.99));
    eprintln!(
        "one-sided hard cut, {} trials: p50 {p50} ms, p99 {p99} ms",
        all.len()
    );
    assert!(p50 <= 100, "p50 {p50} ms: {all:?}");
    assert!(p99 <= 300, "p99 {p99} ms: {all:?}");
}

#[test]
fn silent_sat_blackhole_moves_traffic_within_two_seconds() {
    require(&["ip", "wg", "ping", "nft"]);
    let _g = lock();
    let m = mesh("fb", 53);
    let ping = m.ping(5);
    std::thread::sleep(Duration::from_millis(1_500));
    m.blackhole_sat();
    if std::env::var_os("SKYMESH_TEST_LOGS").is_some() {
        eprintln!("blackhole at {:?}", std::time::SystemTime::now());
    }
    let gaps = ping.join().expect("ping thread");
    let gap = gaps.longest_gap_ms();
    eprintln!("blackhole: longest gap {gap} ms ({})", gaps.text);
    if std::env::var_os("SKYMESH_TEST_LOGS").is_some() {
        eprintln!("a:\n{}\nb:\n{}", m._pa.log_text(), m._pb.log_text());
    }
    assert!(gap <= 2_000, "longest gap {gap} ms: {}", gaps.text);
    for iface in [&m.ia, &m.ib] {
        let p = m.peer_status(iface);
        assert_eq!(p["active_uplink"], "terr", "{iface}: {p:#}");
    }
    let status = m.status(&m.ia);
    let sat_up = status["uplinks"][0]["up"].clone();
    assert_eq!(sat_up, true, "a blackhole leaves the link up: {status:#}");
}

/// Probe replies (and probes) captured on the sat link, then replayed, corrupted or
/// re-sent as plaintext by an attacker on that link while sat is blackholed: none of them
/// authenticates, so the sat path never turns healthy and traffic stays on terr. When the
/// blackhole ends, traffic fails back after the hold time without losing a packet.
#[test]
fn forged_probe_replies_do_not_move_traffic_and_failback_waits_for_the_hold_time() {
    require(&["ip", "wg", "ping", "nft", "python3"]);
    let _g = lock();
    let m = mesh("fc", 55);
    // Capture a few authenticated probe packets (WireGuard data messages of 76 bytes: a 44-byte
    // inner probe, boringtun does not pad) arriving at a on sat.
    let capture = m.net.a.exec_ok(&["python3", "-c", CAPTURE_PY, "sata"]);
    let captured: Vec<&str> = capture.split_whitespace().collect();
    assert!(captured.len() >= 3, "captured probe packets: {capture}");

    m.blackhole_sat();
    m.wait_active(&m.ia, "terr", Duration::from_secs(3));
    let before = m.peer_status(&m.ia);
    let switches = before["switch_count"].as_u64().expect("count");

    // The attacker on b's side of the sat link sends from b's sat address and port, marked so
    // that the blackhole lets its packets through, for longer than the hold time.
    let ping = m.ping(5);
    let attack_secs = (HOLD_MS / 1000 + 2).to_string();
    let mut args = vec![
        "python3",
        "-c",
        ATTACK_PY,
        m.net.sat.1.as_str(),
        m.net.sat.0.as_str(),
    ];
    args.push(&attack_secs);
    args.extend(captured.iter().copied());
    let sent = m.net.b.exec_ok(&args);
    let gaps = ping.join().expect("ping thread");
    eprintln!("attack: {sent}");
    let after = m.peer_status(&m.ia);
    assert_eq!(after["active_uplink"], "terr", "{after:#}");
    assert_eq!(after["switch_count"].as_u64(), Some(switches), "{after:#}");
    let sat_path = &after["paths"].as_array().expect("paths")[0];
    assert_eq!(sat_path["uplink"], "sat");
    assert_ne!(sat_path["health"], "healthy", "{after:#}");
    let max_seq = gaps.seqs.last().copied().unwrap_or(0);
    assert!(max_seq > 100, "{}", gaps.text);
    assert_eq!(
        gaps.lost_between(1, max_seq),
        0,
        "traffic was disturbed: {}",
        gaps.text
    );

    // Fail-back: sat comes back; traffic returns only after the hold time, without loss.
    let ping = m.ping((HOLD_MS / 1000 + 5) as u32);
    std::thread::sleep(Duration::from_millis(500));
    let restored = Instant::now();
    m.restore_sat();
    std::thread::sleep(Duration::from_millis(HOLD_MS - 500));
    let early = m.peer_status(&m.ia);
    assert_eq!(
        early["active_uplink"], "terr",
        "failed back before the hold time: {early:#}"
    );
    m.wait_active(&m.ia, "sat", Duration::from_secs(4));
    let took = restored.elapsed();
    let gaps = ping.join().expect("ping thread");
    m.wait_active(&m.ib, "sat", Duration::from_secs(2));
    // The chooser failed back after the hold time; the follower followed its notice (or its
    // data, whichever came first).
    for iface in [&m.ia, &m.ib] {
        let p = m.peer_status(iface);
        let want: &[&str] = if p["role"] == "chooser" {
            &["failback"]
        } else {
            &["peer_notice", "peer_choice"]
        };
        let reason = p["last_switch_reason"].as_str().unwrap_or_default();
        assert!(want.contains(&reason), "{iface}: {p:#}");
    }
    assert!(took >= Duration::from_millis(HOLD_MS), "{took:?}");
    let max_seq = gaps.seqs.last().copied().unwrap_or(0);
    assert_eq!(
        gaps.lost_between(1, max_seq),
        0,
        "fail-back lost packets: {}",
        gaps.text
    );
}

/// A stock wireguard-go peer against an agent with two uplinks: not a managed peer, so the
/// agent uses the wildcard socket and standard roaming.
#[test]
fn stock_wireguard_go_peer_roams_against_a_multi_uplink_agent() {
    require(&["ip", "wg", "ping", "wireguard-go"]);
    let _g = lock();
    let net = pair("fe", 57);
    let dir = tmpdir();
    let ia = unique("sm5f");
    let ib = unique("sm5f");
    let ka = genkey();
    let kb = genkey();
    let fa = dir.path().join("a.yaml");
    // The uplinks file lists some other skymesh peer, not the wireguard-go one.
    let other = genkey();
    std::fs::write(
        &fa,
        uplinks_yaml(
            "sata",
            "terra",
            &other.public,
            "198.18.57.9:51820",
            "198.18.58.9:51820",
        ),
    )
    .expect("write");
    let mut pa = net.a.spawn(
        &[
            AGENT,
            "device",
            &ia,
            "--foreground",
            "--uplinks",
            fa.to_str().expect("utf8"),
        ],
        &dir.path().join("a.log"),
    );
    let mut pb = net
        .b
        .spawn(&["wireguard-go", "-f", &ib], &dir.path().join("b.log"));
    wait_socket(&ia, &mut pa);
    wait_socket(&ib, &mut pb);
    connect_over_sat(&net, (&ia, &ka), (&ib, &kb), "10.97.57", "fd97:57::");
    assert!(
        net.a.ping_until("10.97.57.2", Duration::from_secs(5)),
        "a: {}\nb: {}",
        pa.log_text(),
        pb.log_text()
    );
    // wireguard-go moves to a's terrestrial address; the agent roams to b's new source.
    net.b.exec_ok(&[
        "wg",
        "set",
        &ib,
        "peer",
        &ka.public,
        "endpoint",
        &format!("{}:51820", net.terr.0),
    ]);
    net.a.ip(&["link", "set", "sata", "down"]);
    assert!(
        net.b.ping_until("10.97.57.1", Duration::from_secs(5)),
        "b→a over terr"
    );
    assert!(net.a.ping("10.97.57.2", 5), "a→b after roaming");
    let ep = net.a.exec_ok(&["wg", "show", &ia, "endpoints"]);
    assert!(ep.contains(&format!("{}:51821", net.terr.1)), "{ep}");
    let st = ok(AGENT, &["status", &ia, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&st).expect("json");
    assert!(v["peers"][0]["role"].is_null(), "unmanaged peer: {v:#}");
}

/// Captures 6 WireGuard data messages of 76 bytes (probes) arriving on the interface given
/// as argv[1]; prints them in hex, one per line.
const CAPTURE_PY: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((sys.argv[1], 0))
s.settimeout(5)
got = []
end = time.time() + 8
while len(got) < 6 and time.time() < end:
    f = s.recv(2048)
    ip = f[14:]
    if ip[9] != 17: continue
    ihl = (ip[0] & 15) * 4
    udp = ip[ihl:]
    payload = udp[8:]
    if int.from_bytes(udp[2:4], 'big') == 51820 and len(payload) == 76 and payload[0] == 4:
        got.append(payload.hex())
print("\n".join(got))
"#;

/// argv: target ip, unused, seconds, captured packets (hex). Sends, from the sat address and
/// port of the real peer, marked 1: exact replays, copies with a flipped ciphertext byte,
/// and plaintext probe replies, repeatedly.
const ATTACK_PY: &str = r#"
import socket, sys, time, struct
dst = (sys.argv[1], 51820)
secs = float(sys.argv[3])
caps = [bytes.fromhex(h) for h in sys.argv[4:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, 36, 1)  # SO_MARK
me = [l.split()[3].split('/')[0] for l in __import__('subprocess').check_output(['ip','-4','-o','addr','show','satb']).decode().splitlines()][0]
s.bind((me, 51820))
n = 0
end = time.time() + secs
while time.time() < end:
    for c in caps:
        s.sendto(c, dst); n += 1
        bad = bytearray(c); bad[20] ^= 0x40
        s.sendto(bytes(bad), dst); n += 1
    for nonce in range(8):
        ip = bytes([0x45,0,0,44,0,0,0,0,64,17,0,0]) + bytes(8)
        udp = struct.pack('>HHHH', 51899, 51899, 24, 0)
        probe = b'SMPB' + bytes([1, 2, 0, 0]) + struct.pack('>Q', nonce)
        s.sendto(ip + udp + probe, dst); n += 1
    time.sleep(0.05)
print(f"sent {n} forged datagrams")
"#;
