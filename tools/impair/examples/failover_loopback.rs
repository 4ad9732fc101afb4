//! Real-time failover on loopback: the sans-IO `PathAgent` driven by a minimal driver over two
//! `skymesh-impair` relays ("uplinks"), against a UDP responder that answers probes and echoes
//! a 100 pps ping. Each trial blackholes the primary relay through its control socket and
//! measures the time to the switch and the longest ping gap; then heals it and waits for the
//! fail-back (hold shortened to 2 s so trials are quick). No WireGuard here: this checks the
//! state machine and the relay under real timers, not the data plane.
//!
//! `cargo build -p skymesh-impair && cargo run -p skymesh-impair --example failover_loopback
//!  --release [-- TRIALS]` (all traffic stays on 127.0.0.1).

#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use skymesh_agent_core::path::{
    FailoverSettings, PathAgent, PathConfig, PathEvent, ProbeMessage, ProbeSettings,
    RemoteEndpoint, UplinkConfig, UplinkKind, PROBE_LEN,
};

struct Relay {
    child: Child,
    listen: SocketAddr,
    control: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn relay_binary() -> std::path::PathBuf {
    // target/<profile>/examples/failover_loopback -> target/<profile>/skymesh-impair
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    dir.join("skymesh-impair")
}

fn start_relay(target: SocketAddr, profile: &str, seed: u64) -> Relay {
    let mut child = Command::new(relay_binary())
        .args(["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"])
        .args(["--target", &target.to_string(), "--profile", profile])
        .args(["--seed", &seed.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn skymesh-impair (build it first: cargo build -p skymesh-impair)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let field = |name: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .expect("field")
            .parse()
            .expect("addr")
    };
    Relay {
        listen: field("listen="),
        control: field("control="),
        child,
    }
}

fn control(relay: &Relay, cmd: &str) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    sock.send_to(cmd.as_bytes(), relay.control).expect("send");
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("control answer");
    assert!(
        buf[..n].starts_with(b"ok"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// Answers probe requests and echoes everything else, to whoever sent it.
fn responder() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut out = [0u8; PROBE_LEN];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            match ProbeMessage::decode(&buf[..n])
                .ok()
                .and_then(|m| m.reply(0))
            {
                Some(reply) => {
                    reply.encode(&mut out);
                    let _ = sock.send_to(&out, from);
                }
                None => {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        }
    });
    addr
}

struct Outcome {
    switch_after: Duration,
    ping_gap: Duration,
    failback_after: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> ExitCode {
    let trials: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let peer = responder();
    let relays = [
        start_relay(peer, "starlink", 1),
        start_relay(peer, "clean", 2),
    ];
    let sockets: Vec<UdpSocket> = relays
        .iter()
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let config = PathConfig {
        uplinks: vec![
            UplinkConfig {
                name: "starlink".into(),
                interface: None,
                source_address: None,
                kind: UplinkKind::Satellite,
                priority: 0,
                probe: ProbeSettings::default(),
                metered: false,
                probe_budget_bytes_per_hour: None,
            },
            UplinkConfig {
                name: "fibre".into(),
                interface: None,
                source_address: None,
                kind: UplinkKind::Terrestrial,
                priority: 1,
                probe: ProbeSettings::default(),
                metered: false,
                probe_budget_bytes_per_hour: None,
            },
        ],
        failover: FailoverSettings {
            failback_hold_ms: 2_000,
            ..FailoverSettings::default()
        },
    }
    .validate()
    .expect("valid config");
    // The peer's endpoint as the netmap would name it; the driver maps uplink i to relay i.
    let remote: SocketAddr = "198.18.0.1:51820".parse().expect("addr");
    let now = Instant::now();
    let mut agent = PathAgent::new(
        &config,
        &[RemoteEndpoint {
            addr: remote,
            priority: 0,
        }],
        rand::random(),
        now,
    );

    let mut outcomes = Vec::new();
    let mut next_ping = Instant::now();
    let mut last_echo = Instant::now();
    let mut gap = Duration::ZERO;
    let mut phase = 0u8; // 0 settle, 1 cut, 2 healed
    let mut phase_at = Instant::now();
    let mut cut_at = Instant::now();
    let mut switched: Option<Duration> = None;
    let mut buf = [0u8; 2048];
    let mut probe = [0u8; PROBE_LEN];
    while outcomes.len() < trials {
        let now = Instant::now();
        // Inputs: datagrams from either uplink.
        for (i, sock) in sockets.iter().enumerate() {
            let path = skymesh_agent_core::path::PathId {
                uplink: skymesh_agent_core::path::UplinkId(i as u8),
                remote,
            };
            while let Ok(n) = sock.recv(&mut buf) {
                match ProbeMessage::decode(&buf[..n]) {
                    Ok(ProbeMessage::Reply { nonce, .. }) => {
                        let _ = agent.handle_probe_reply(path, nonce, now);
                    }
                    Ok(ProbeMessage::Request { .. } | ProbeMessage::Notice(_)) => {}
                    Err(_) => {
                        agent.handle_peer_data(path, now);
                        if phase == 1 {
                            gap = gap.max(now - last_echo);
                        }
                        last_echo = now;
                    }
                }
            }
        }
        if agent.poll_timeout().is_some_and(|t| t <= now) {
            agent.handle_timeout(now);
        }
        if now >= next_ping {
            if let Some(p) = agent.active_path() {
                agent.handle_data_sent(now);
                let _ = sockets[usize::from(p.uplink.0)]
                    .send_to(b"ping", relays[usize::from(p.uplink.0)].listen);
            }
            next_ping += Duration::from_millis(10);
        }
        while let Some(tx) = agent.poll_transmit() {
            ProbeMessage::Request { nonce: tx.nonce }.encode(&mut probe);
            let u = usize::from(tx.path.uplink.0);
            let _ = sockets[u].send_to(&probe, relays[u].listen);
        }
        while let Some(PathEvent::PathChanged { to, .. }) = agent.poll_event() {
            if phase == 1 && to.is_some_and(|p| p.uplink.0 == 1) && switched.is_none() {
                switched = Some(now - cut_at);
            }
            if phase == 2 && to.is_some_and(|p| p.uplink.0 == 0) {
                outcomes.push(Outcome {
                    switch_after: switched.take().unwrap_or(Duration::MAX),
                    ping_gap: gap,
                    failback_after: now - phase_at,
                });
                phase = 0;
                phase_at = now;
            }
        }
        // The trial script.
        match phase {
            0 if now - phase_at
                >= Duration::from_millis(3_000 + 137 * outcomes.len() as u64 % 1_000) =>
            {
                control(&relays[0], "blackhole on");
                cut_at = Instant::now();
                gap = Duration::ZERO;
                phase = 1;
                phase_at = cut_at;
            }
            1 if now - phase_at >= Duration::from_secs(3) => {
                control(&relays[0], "blackhole off");
                phase = 2;
                phase_at = Instant::now();
            }
            _ => {}
        }
        thread::sleep(Duration::from_micros(500));
    }
    let mut sw: Vec<_> = outcomes.iter().map(|o| o.switch_after).collect();
    let mut gaps: Vec<_> = outcomes.iter().map(|o| o.ping_gap).collect();
    let mut fb: Vec<_> = outcomes.iter().map(|o| o.failback_after).collect();
    sw.sort_unstable();
    gaps.sort_unstable();
    fb.sort_unstable();
    for (name, xs) in [
        ("switch after blackhole", &sw),
        ("longest ping gap", &gaps),
        ("fail-back after heal (hold 2 s)", &fb),
    ] {
        println!(
            "{name:<32} n={} p50={:?} p95={:?} max={:?}",
            xs.len(),
            percentile(xs, 50.0),
            percentile(xs, 95.0),
            xs[xs.len() - 1]
        );
    }
    if percentile(&gaps, 50.0) <= Duration::from_secs(1)
        && percentile(&gaps, 95.0) <= Duration::from_secs(2)
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
