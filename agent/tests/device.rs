//! End-to-end tests of `skymesh-agent device` in network namespaces, driven only by the stock
//! `wg` tool and raw UAPI writes: handshake and ping over IPv4 and IPv6, endpoint changes of an
//! existing peer, roaming, `wg show dump` counters, bad UAPI input, many peers, shutdown.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

struct Agents {
    net: Pair,
    ia: String,
    ib: String,
    ka: Keys,
    kb: Keys,
    pa: Proc,
    pb: Proc,
    _dir: tempfile::TempDir,
}

fn start_agent(ns: &Netns, iface: &str, dir: &std::path::Path) -> Proc {
    let log = dir.join(format!("{iface}.log"));
    let mut p = ns.spawn(&[AGENT, "device", iface, "--foreground"], &log);
    wait_socket(iface, &mut p);
    p
}

/// Two agents over the "sat" link; a knows b's endpoint, b learns a's from the handshake.
fn two_agents(tag: &str, subnet: u8) -> Agents {
    let net = pair(tag, subnet);
    let dir = tmpdir();
    let ia = unique("sm3i");
    let ib = unique("sm3i");
    let pa = start_agent(&net.a, &ia, dir.path());
    let pb = start_agent(&net.b, &ib, dir.path());
    let ka = genkey();
    let kb = genkey();
    setconf(
        &net.a,
        &ia,
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n[Peer]\nPublicKey = {}\n\
             Endpoint = {}:51821\nAllowedIPs = 10.96.3.2/32, fd77:3::2/128\n",
            ka.private, kb.public, net.sat.1
        ),
    );
    setconf(
        &net.b,
        &ib,
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51821\n[Peer]\nPublicKey = {}\n\
             AllowedIPs = 10.96.3.1/32, fd77:3::1/128\n",
            kb.private, ka.public
        ),
    );
    overlay(&net.a, &ia, "10.96.3.1/24", "fd77:3::1/64");
    overlay(&net.b, &ib, "10.96.3.2/24", "fd77:3::2/64");
    Agents {
        net,
        ia,
        ib,
        ka,
        kb,
        pa,
        pb,
        _dir: dir,
    }
}

/// The peer line of `wg show IFACE dump` (after the interface line), split on tabs.
fn dump_peer(ns: &Netns, iface: &str) -> Vec<String> {
    let out = ns.exec_ok(&["wg", "show", iface, "dump"]);
    let line = out.lines().nth(1).expect("a peer line in wg show dump");
    line.split('\t').map(str::to_owned).collect()
}

#[test]
fn two_agents_ping_over_v4_and_v6_and_survive_an_endpoint_change_of_an_existing_peer() {
    require(&["ip", "wg", "ping"]);
    let t = two_agents("e", 31);
    assert!(
        t.net.a.ping_until("10.96.3.2", Duration::from_secs(5)),
        "{}",
        t.pa.log_text()
    );
    assert!(t.net.a.ping("10.96.3.2", 5), "IPv4 over the tunnel");
    assert!(t.net.a.ping("fd77:3::2", 5), "IPv6 over the tunnel");

    // Counters and handshake time as `wg` reads them: UNIX time, recent, bytes both ways.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for (ns, iface, endpoint) in [
        (&t.net.a, &t.ia, format!("{}:51821", t.net.sat.1)),
        (&t.net.b, &t.ib, format!("{}:51820", t.net.sat.0)),
    ] {
        let p = dump_peer(ns, iface);
        // public-key, psk, endpoint, allowed-ips, latest-handshake, rx, tx, keepalive
        assert_eq!(p[2], endpoint, "{iface} endpoint");
        let hs: u64 = p[4].parse().expect("handshake time");
        assert!(
            hs <= now + 1 && hs + 60 >= now,
            "{iface}: handshake {hs} vs now {now}"
        );
        let rx: u64 = p[5].parse().expect("rx");
        let tx: u64 = p[6].parse().expect("tx");
        // 10 pings of 84 bytes each way plus the handshake: well above 1 KB on the wire.
        assert!(rx > 1000 && tx > 1000, "{iface}: rx {rx} tx {tx}");
    }

    // Move a's endpoint for b to the terrestrial link with `wg set` (boringtun-cli cannot), then
    // cut the satellite link: traffic must keep flowing and b must roam to a's new address.
    t.net.a.exec_ok(&[
        "wg",
        "set",
        &t.ia,
        "peer",
        &t.kb.public,
        "endpoint",
        &format!("{}:51821", t.net.terr.1),
    ]);
    t.net.a.ip(&["link", "set", "sata", "down"]);
    assert!(
        t.net.a.ping("10.96.3.2", 5),
        "IPv4 after the endpoint change"
    );
    assert!(
        t.net.a.ping("fd77:3::2", 3),
        "IPv6 after the endpoint change"
    );
    assert_eq!(
        dump_peer(&t.net.a, &t.ia)[2],
        format!("{}:51821", t.net.terr.1)
    );
    assert_eq!(
        dump_peer(&t.net.b, &t.ib)[2],
        format!("{}:51820", t.net.terr.0),
        "b roamed to a's new source address"
    );

    // An IPv6 underlay endpoint works too.
    t.net.a.exec_ok(&[
        "wg",
        "set",
        &t.ia,
        "peer",
        &t.kb.public,
        "endpoint",
        &format!("[fd00:{}::2]:51821", 32),
    ]);
    assert!(t.net.a.ping("10.96.3.2", 3), "IPv4 over an IPv6 underlay");
    assert_eq!(dump_peer(&t.net.b, &t.ib)[2], "[fd00:32::1]:51820");

    // Changing allowed IPs of an existing peer re-routes: drop 10.96.3.2 from a's table.
    t.net.a.exec_ok(&[
        "wg",
        "set",
        &t.ia,
        "peer",
        &t.kb.public,
        "allowed-ips",
        "fd77:3::2/128",
    ]);
    assert!(
        !t.net.a.ping("10.96.3.2", 1),
        "no route once the allowed IP is gone"
    );
    assert!(t.net.a.ping("fd77:3::2", 2));
}

#[test]
fn bad_uapi_input_gets_an_errno_and_changes_nothing() {
    require(&["ip", "wg", "ping"]);
    let t = two_agents("u", 33);
    assert!(t.net.a.ping_until("10.96.3.2", Duration::from_secs(5)));
    let get = || uapi(&t.ia, "get=1\n\n");
    let before = config_of(&get());
    assert!(
        before.contains("listen_port=51820\npublic_key="),
        "{before}"
    );
    let other = genkey();
    let other_hex = hex_of(&other.public);
    let cases = [
        // A bad key anywhere: nothing before it is applied either.
        (
            format!("set=1\nlisten_port=40000\npublic_key={other_hex}\nallowed_ip=10.96.3.0/24\nendpoint=bogus\n\n"),
            "errno=-22\n\n",
        ),
        ("set=1\nprivate_key=zz\n\n".to_owned(), "errno=-22\n\n"),
        ("set=1\nlisten_port=40001\nno-equals-sign\n\n".to_owned(), "errno=-71\n\n"),
        (
            format!("set=1\nreplace_peers=true\npublic_key={other_hex}\nprotocol_version=2\n\n"),
            "errno=-22\n\n",
        ),
    ];
    for (req, want) in &cases {
        assert_eq!(&uapi(&t.ia, req), want, "request {req:?}");
        assert_eq!(config_of(&get()), before, "after {req:?}");
    }
    assert!(
        t.net.a.ping("10.96.3.2", 2),
        "tunnel still up after bad requests"
    );

    // `wg` itself reports the error and exits non-zero for a refused request: a port that
    // another device in the same namespace holds.
    let holder = unique("sm3h");
    let _h = start_agent(&t.net.a, &holder, t._dir.path());
    t.net
        .a
        .exec_ok(&["wg", "set", &holder, "listen-port", "40003"]);
    let out = t.net.a.exec(&["wg", "set", &t.ia, "listen-port", "40003"]);
    assert!(!out.status.success(), "wg set must fail on a busy port");
    assert_eq!(config_of(&get()), before, "after the busy port");
    assert!(t.net.a.ping("10.96.3.2", 1));

    // The stock wg refuses a malformed key itself before it reaches us.
    let out = t.net.a.exec(&["wg", "set", &t.ia, "peer", "not-a-key"]);
    assert!(!out.status.success());
}

/// A `get=1` answer without the counters that move with traffic.
fn config_of(get: &str) -> String {
    assert!(get.ends_with("errno=0\n\n"), "{get}");
    get.lines()
        .filter(|l| {
            !l.starts_with("rx_bytes=")
                && !l.starts_with("tx_bytes=")
                && !l.starts_with("last_handshake")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn hex_of(b64: &str) -> String {
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            &format!("echo {b64} | base64 -d | od -An -tx1 | tr -d ' \\n'"),
        ])
        .output()
        .expect("base64");
    String::from_utf8(out.stdout).expect("hex")
}

#[test]
fn peers_can_be_removed_replaced_and_a_thousand_coexist() {
    require(&["ip", "wg", "ping"]);
    let mut t = two_agents("p", 35);
    assert!(t.net.a.ping_until("10.96.3.2", Duration::from_secs(5)));

    // 1000 extra peers, each with its own /32: the real peer keeps working.
    let mut req = String::from("set=1\n");
    for i in 0..1000u32 {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        key[31] = 0x55;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        req.push_str(&format!(
            "public_key={hex}\nallowed_ip=10.200.{}.{}/32\nendpoint=198.18.250.{}:51820\n",
            i / 250,
            i % 250,
            1 + i % 200
        ));
    }
    req.push('\n');
    assert_eq!(uapi(&t.ia, &req), "errno=0\n\n");
    let peers = t.net.a.exec_ok(&["wg", "show", &t.ia, "peers"]);
    assert_eq!(peers.lines().count(), 1001);
    assert!(t.net.a.ping("10.96.3.2", 3), "real peer among 1000 others");

    // replace_peers with only the real peer: the 1000 disappear, the session survives (same
    // handshake time: no new handshake was needed).
    let handshake = |ns: &Netns, i: &str| {
        let out = ns.exec_ok(&["wg", "show", i, "latest-handshakes"]);
        let real = out
            .lines()
            .find(|l| l.starts_with(&t.kb.public))
            .map(str::to_owned);
        real.expect("the real peer is listed")
    };
    let before = handshake(&t.net.a, &t.ia);
    std::thread::sleep(Duration::from_millis(1100));
    setconf(
        &t.net.a,
        &t.ia,
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n[Peer]\nPublicKey = {}\n\
             Endpoint = {}:51821\nAllowedIPs = 10.96.3.2/32, fd77:3::2/128\n",
            t.ka.private, t.kb.public, t.net.sat.1
        ),
    );
    assert_eq!(
        t.net
            .a
            .exec_ok(&["wg", "show", &t.ia, "peers"])
            .lines()
            .count(),
        1
    );
    assert!(t.net.a.ping("10.96.3.2", 2));
    assert_eq!(
        handshake(&t.net.a, &t.ia),
        before,
        "session kept across replace_peers"
    );

    // Remove the peer: traffic stops; add it back (with a PSK on both sides): it resumes.
    t.net
        .a
        .exec_ok(&["wg", "set", &t.ia, "peer", &t.kb.public, "remove"]);
    assert!(t
        .net
        .a
        .exec_ok(&["wg", "show", &t.ia, "peers"])
        .trim()
        .is_empty());
    assert!(!t.net.a.ping("10.96.3.2", 1));
    let psk = ok("wg", &["genpsk"]);
    let dir = tmpdir();
    let psk_file = dir.path().join("psk");
    std::fs::write(&psk_file, psk.trim()).expect("psk file");
    let psk_path = psk_file.to_str().expect("utf8 path");
    t.net.b.exec_ok(&[
        "wg",
        "set",
        &t.ib,
        "peer",
        &t.ka.public,
        "preshared-key",
        psk_path,
    ]);
    t.net.a.exec_ok(&[
        "wg",
        "set",
        &t.ia,
        "peer",
        &t.kb.public,
        "preshared-key",
        psk_path,
        "endpoint",
        &format!("{}:51821", t.net.sat.1),
        "allowed-ips",
        "10.96.3.2/32",
        "persistent-keepalive",
        "1",
    ]);
    assert!(
        t.net.a.ping_until("10.96.3.2", Duration::from_secs(5)),
        "with PSK"
    );
    let show = t.net.a.exec_ok(&["wg", "show", &t.ia]);
    assert!(show.contains("preshared key: (hidden)"), "{show}");
    assert!(
        show.contains("persistent keepalive: every 1 second"),
        "{show}"
    );

    // Listen port change: a reachable again on the new port after b learns it by roaming.
    t.net
        .a
        .exec_ok(&["wg", "set", &t.ia, "listen-port", "51830"]);
    assert!(t.net.a.ping_until("10.96.3.2", Duration::from_secs(5)));
    assert_eq!(
        dump_peer(&t.net.b, &t.ib)[2],
        format!("{}:51830", t.net.sat.0)
    );
    assert!(
        t.net
            .a
            .exec_ok(&["wg", "show", &t.ia, "listen-port"])
            .trim()
            == "51830"
    );

    // SIGTERM: clean exit, TUN and socket gone.
    let status = t.pa.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!socket_path(&t.ia).exists(), "socket file removed");
    let links = t.net.a.ip(&["link", "show"]);
    assert!(!links.contains(&t.ia), "TUN removed: {links}");
    let _ = &mut t.pb;
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_is_not() {
    require(&["ip"]);
    let ns = Netns::new("s");
    let dir = tmpdir();
    let iface = unique("sm3s");
    // Stale: a socket file nobody listens on.
    std::fs::create_dir_all("/var/run/wireguard").expect("dir");
    {
        let l = std::os::unix::net::UnixListener::bind(socket_path(&iface)).expect("bind");
        drop(l);
    }
    assert!(socket_path(&iface).exists());
    let mut p = start_agent(&ns, &iface, dir.path());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(socket_path(&iface))
            .expect("stat")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Live: a second device with the same name in another namespace must refuse to start.
    let ns2 = Netns::new("s");
    let mut second = ns2.spawn(
        &[AGENT, "device", &iface, "--foreground"],
        &dir.path().join("2.log"),
    );
    let status = second.child.wait().expect("wait");
    assert!(!status.success());
    assert!(
        second.log_text().contains("in use"),
        "{}",
        second.log_text()
    );
    assert!(std::os::unix::net::UnixStream::connect(socket_path(&iface)).is_ok());
    // Deleting the interface from outside stops the device (as wireguard-go), socket removed.
    ns.ip(&["link", "del", &iface]);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = p.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < end,
            "device still running without its TUN"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    assert!(p.log_text().contains("unusable"), "{}", p.log_text());
    assert!(!socket_path(&iface).exists());
}

#[test]
fn garbage_from_the_network_is_counted_and_dropped_without_harm() {
    require(&["ip", "wg", "ping", "bash"]);
    let mut t = two_agents("g", 37);
    assert!(t.net.a.ping_until("10.96.3.2", Duration::from_secs(5)));
    let target = format!("/dev/udp/{}/51820", t.net.sat.0);
    // Empty-ish, unknown type, truncated handshake, data for an unknown index, a full-size
    // initiation with a bad MAC, a cookie reply for nobody: from b's namespace to a's port.
    let payloads = [
        r"\x01".to_owned(),
        r"\x09\x00\x00\x00hello".to_owned(),
        r"\x01\x00\x00\x00".repeat(10),
        format!(r"\x04\x00\x00\x00\xff\xff\xff\xff{}", r"\x00".repeat(40)),
        format!(r"\x01\x00\x00\x00{}", r"\x41".repeat(144)),
        format!(r"\x03\x00\x00\x00{}", r"\x42".repeat(60)),
    ];
    for p in &payloads {
        t.net
            .b
            .exec_ok(&["bash", "-c", &format!("printf '{p}' > {target}")]);
    }
    // Still up, still forwarding, and the fwmark setting reaches the socket.
    assert!(t.net.a.ping("10.96.3.2", 3));
    t.net.a.exec_ok(&["wg", "set", &t.ia, "fwmark", "1234"]);
    assert_eq!(
        t.net.a.exec_ok(&["wg", "show", &t.ia, "fwmark"]).trim(),
        "0x4d2"
    );
    assert!(t.net.a.ping("10.96.3.2", 2));
    assert!(t.pa.terminate().success());
    let log = t.pa.log_text();
    let counter = |name: &str| -> u64 {
        log.split(&format!("{name}: "))
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} counter in the shutdown log:\n{log}"))
    };
    assert_eq!(counter("malformed"), 3, "{log}");
    assert_eq!(counter("bad_handshake"), 1, "{log}");
    assert_eq!(counter("unknown_index"), 2, "{log}");
    let _ = &mut t.pb;
}
