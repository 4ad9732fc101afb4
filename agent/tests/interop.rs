//! Interop with stock wireguard-go in the other namespace, with the agent as initiator and as
//! responder, over IPv4 and IPv6 overlays, configured with stock `wg setconf`.

mod common;

use std::time::Duration;

use common::*;

fn run_pair(agent_on_a: bool, subnet: u8) {
    let net = pair(if agent_on_a { "ga" } else { "gb" }, subnet);
    let dir = tmpdir();
    let ia = unique("sm3g");
    let ib = unique("sm3g");
    let agent = |ns: &Netns, iface: &str| {
        ns.spawn(
            &[AGENT, "device", iface, "--foreground"],
            &dir.path().join(format!("{iface}.log")),
        )
    };
    let wggo = |ns: &Netns, iface: &str| {
        ns.spawn(
            &["wireguard-go", "-f", iface],
            &dir.path().join(format!("{iface}.log")),
        )
    };
    let (mut pa, mut pb) = if agent_on_a {
        (agent(&net.a, &ia), wggo(&net.b, &ib))
    } else {
        (wggo(&net.a, &ia), agent(&net.b, &ib))
    };
    wait_socket(&ia, &mut pa);
    wait_socket(&ib, &mut pb);
    let ka = genkey();
    let kb = genkey();
    setconf(
        &net.a,
        &ia,
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n[Peer]\nPublicKey = {}\n\
             Endpoint = {}:51821\nAllowedIPs = 10.96.4.2/32, fd77:4::2/128\n",
            ka.private, kb.public, net.sat.1
        ),
    );
    setconf(
        &net.b,
        &ib,
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51821\n[Peer]\nPublicKey = {}\n\
             AllowedIPs = 10.96.4.1/32, fd77:4::1/128\n",
            kb.private, ka.public
        ),
    );
    overlay(&net.a, &ia, "10.96.4.1/24", "fd77:4::1/64");
    overlay(&net.b, &ib, "10.96.4.2/24", "fd77:4::2/64");
    assert!(
        net.a.ping_until("10.96.4.2", Duration::from_secs(5)),
        "a: {}\nb: {}",
        pa.log_text(),
        pb.log_text()
    );
    assert!(net.a.ping("10.96.4.2", 5), "IPv4 a→b");
    assert!(net.a.ping("fd77:4::2", 5), "IPv6 a→b");
    assert!(net.b.ping("10.96.4.1", 3), "IPv4 b→a");
    // Both sides report a completed handshake as UNIX time.
    for (ns, iface) in [(&net.a, &ia), (&net.b, &ib)] {
        let hs = ns.exec_ok(&["wg", "show", iface, "latest-handshakes"]);
        let t: u64 = hs
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("handshake time");
        assert!(t > 1_600_000_000, "{iface}: {hs}");
    }
}

#[test]
fn agent_initiates_to_wireguard_go() {
    require(&["ip", "wg", "ping", "wireguard-go"]);
    run_pair(true, 41);
}

#[test]
fn wireguard_go_initiates_to_agent() {
    require(&["ip", "wg", "ping", "wireguard-go"]);
    run_pair(false, 43);
}
