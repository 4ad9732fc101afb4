//! Two path agents, one per end of a peer pair, over a simulated underlay. Node A (the
//! chooser) has a Starlink uplink (tier 0) and a fibre uplink (tier 1); node B (the follower)
//! has one uplink and endpoint. A pings B at 100 pps; B echoes over its own active path.
//! Checks that both ends agree on the path, that probes never drag the data path, and that a
//! failover on A is mirrored by B within one packet.

#[path = "sim/timeline.rs"]
mod timeline;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use skymesh_agent_core::path::{
    LinkState, PathAgent, PathConfig, PathEvent, PathId, ProbeSettings, RemoteEndpoint, Role,
    SwitchReason, UplinkConfig, UplinkId, UplinkKind,
};
use timeline::{InFlight, Script};

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

const PING: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    A,
    B,
}

#[derive(Debug, Clone, Copy)]
enum Packet {
    Data,
    ProbeRequest(u64),
    ProbeReply(u64),
}

/// One underlay path is identified by A's uplink index (B has a single uplink).
#[derive(Debug, Clone, Copy)]
struct Flight {
    to: Node,
    a_uplink: u8,
    packet: Packet,
}

struct Underlay {
    latency: [Duration; 2],
    blackhole: [bool; 2],
    up: [bool; 2],
}

struct TwoEnds {
    t0: Instant,
    now: Instant,
    a: PathAgent,
    b: PathAgent,
    net: Underlay,
    a_addrs: [SocketAddr; 2],
    b_addr: SocketAddr,
    flights: InFlight<Flight>,
    next_ping: Instant,
    script: Script<TwoEnds>,
    events: Vec<(Instant, Node, PathEvent)>,
    echoes: Vec<Instant>,
    /// Data packets B sent on a path other than the one A chose, after B had seen A's choice.
    disagreements: u64,
}

fn config(uplinks: &[(&str, UplinkKind, u8)]) -> skymesh_agent_core::path::ValidPathConfig {
    PathConfig {
        uplinks: uplinks
            .iter()
            .map(|&(name, kind, priority)| UplinkConfig {
                name: name.into(),
                interface: None,
                source_address: None,
                kind,
                priority,
                probe: ProbeSettings::default(),
                metered: false,
                probe_budget_bytes_per_hour: None,
            })
            .collect(),
        failover: Default::default(),
    }
    .validate()
    .expect("valid")
}

impl TwoEnds {
    fn new() -> Self {
        let t0 = Instant::now();
        let a_addrs: [SocketAddr; 2] = [
            "198.18.1.1:51820".parse().expect("addr"),
            "198.18.2.1:51820".parse().expect("addr"),
        ];
        let b_addr: SocketAddr = "198.18.9.1:51820".parse().expect("addr");
        let a = PathAgent::new(
            &config(&[
                ("starlink", UplinkKind::Satellite, 0),
                ("fibre", UplinkKind::Terrestrial, 1),
            ]),
            &[RemoteEndpoint {
                addr: b_addr,
                priority: 0,
            }],
            1,
            t0,
        );
        // B's view: A's starlink endpoint is A's tier 0, its fibre endpoint tier 1. B's own
        // ranking would pick the same, but B follows A whatever it would pick.
        let mut b = PathAgent::new(
            &config(&[("fibre", UplinkKind::Terrestrial, 0)]),
            &[
                RemoteEndpoint {
                    addr: a_addrs[1],
                    priority: 0,
                },
                RemoteEndpoint {
                    addr: a_addrs[0],
                    priority: 1,
                },
            ],
            2,
            t0,
        );
        b.set_role(Role::Follower, t0);
        let mut sim = Self {
            t0,
            now: t0,
            a,
            b,
            net: Underlay {
                latency: [ms(20), ms(30)],
                blackhole: [false; 2],
                up: [true; 2],
            },
            a_addrs,
            b_addr,
            flights: InFlight::default(),
            next_ping: t0,
            script: Script::default(),
            events: Vec::new(),
            echoes: Vec::new(),
            disagreements: 0,
        };
        sim.drain();
        sim
    }

    fn a_path(&self, uplink: u8) -> PathId {
        PathId {
            uplink: UplinkId(uplink),
            remote: self.b_addr,
        }
    }

    fn b_path(&self, a_uplink: u8) -> PathId {
        PathId {
            uplink: UplinkId(0),
            remote: self.a_addrs[usize::from(a_uplink)],
        }
    }

    fn a_uplink_of_b_path(&self, p: PathId) -> u8 {
        if p.remote == self.a_addrs[0] {
            0
        } else {
            1
        }
    }

    fn at(&mut self, t: Instant, f: impl FnOnce(&mut TwoEnds) + 'static) {
        self.script.at(t, f);
    }

    fn send(&mut self, to: Node, a_uplink: u8, packet: Packet) {
        let u = usize::from(a_uplink);
        if !self.net.up[u] || self.net.blackhole[u] {
            return;
        }
        let flight = Flight {
            to,
            a_uplink,
            packet,
        };
        self.flights.push(self.now + self.net.latency[u], flight);
    }

    fn drain(&mut self) {
        while let Some(tx) = self.a.poll_transmit() {
            self.send(Node::B, tx.path.uplink.0, Packet::ProbeRequest(tx.nonce));
        }
        while let Some(tx) = self.b.poll_transmit() {
            let u = self.a_uplink_of_b_path(tx.path);
            self.send(Node::A, u, Packet::ProbeRequest(tx.nonce));
        }
        while let Some(e) = self.a.poll_event() {
            self.events.push((self.now, Node::A, e));
        }
        while let Some(e) = self.b.poll_event() {
            self.events.push((self.now, Node::B, e));
        }
    }

    fn arrive(&mut self, f: Flight) {
        let now = self.now;
        if !self.net.up[usize::from(f.a_uplink)] {
            return;
        }
        match (f.to, f.packet) {
            (Node::B, Packet::Data) => {
                self.b.handle_peer_data(self.b_path(f.a_uplink), now);
                // Echo over B's own active path.
                if let Some(p) = self.b.active_path() {
                    let u = self.a_uplink_of_b_path(p);
                    if u != f.a_uplink {
                        self.disagreements += 1;
                    }
                    self.b.handle_data_sent(now);
                    self.send(Node::A, u, Packet::Data);
                }
            }
            (Node::A, Packet::Data) => {
                self.a.handle_peer_data(self.a_path(f.a_uplink), now);
                self.echoes.push(now);
            }
            (Node::B, Packet::ProbeRequest(n)) => {
                self.b.handle_authenticated_rx(self.b_path(f.a_uplink), now);
                self.send(Node::A, f.a_uplink, Packet::ProbeReply(n));
            }
            (Node::A, Packet::ProbeRequest(n)) => {
                self.a.handle_authenticated_rx(self.a_path(f.a_uplink), now);
                self.send(Node::B, f.a_uplink, Packet::ProbeReply(n));
            }
            (Node::A, Packet::ProbeReply(n)) => {
                let _ = self.a.handle_probe_reply(self.a_path(f.a_uplink), n, now);
            }
            (Node::B, Packet::ProbeReply(n)) => {
                let _ = self.b.handle_probe_reply(self.b_path(f.a_uplink), n, now);
            }
        }
    }

    fn run_until(&mut self, end: Instant) {
        loop {
            let next = timeline::next_instant(
                end,
                [
                    Some(self.next_ping),
                    self.a.poll_timeout(),
                    self.b.poll_timeout(),
                    self.flights.next_at(),
                    self.script.next_at(),
                ],
            );
            let Some(now) = next else {
                self.now = end;
                return;
            };
            self.now = now;
            while let Some(step) = self.script.pop_due(now) {
                step(self);
            }
            while let Some(f) = self.flights.pop_due(now) {
                self.arrive(f);
            }
            while self.next_ping <= now {
                if let Some(p) = self.a.active_path() {
                    self.a.handle_data_sent(now);
                    self.send(Node::B, p.uplink.0, Packet::Data);
                }
                self.next_ping += PING;
            }
            for agent in [&mut self.a, &mut self.b] {
                if agent.poll_timeout().is_some_and(|t| t <= now) {
                    agent.handle_timeout(now);
                }
            }
            self.drain();
        }
    }

    fn a_uplink(&self) -> Option<u8> {
        self.a.active_path().map(|p| p.uplink.0)
    }

    fn b_follows(&self) -> Option<u8> {
        self.b.active_path().map(|p| self.a_uplink_of_b_path(p))
    }

    fn switches(&self, node: Node, since: Instant) -> Vec<(Duration, SwitchReason)> {
        self.events
            .iter()
            .filter(|(t, n, _)| *n == node && *t >= since)
            .map(|(t, _, PathEvent::PathChanged { reason, .. })| (*t - since, *reason))
            .collect()
    }
}

#[test]
fn follower_mirrors_the_chooser_and_backup_probes_never_drag_it() {
    let mut sim = TwoEnds::new();
    sim.run_until(sim.t0 + secs(60));
    assert_eq!(sim.a_uplink(), Some(0));
    assert_eq!(sim.b_follows(), Some(0), "B follows A onto A's starlink");
    // B's own ranking preferred A's fibre endpoint; it moved once, to A's choice, at start.
    let b = sim.switches(Node::B, sim.t0 + ms(1));
    assert_eq!(b, vec![(b[0].0, SwitchReason::PeerChoice)], "{b:?}");
    assert!(b[0].0 <= ms(50));
    // A probed its fibre backup every second all along; B never went there.
    assert_eq!(sim.disagreements, 0);
}

#[test]
fn chooser_failover_on_blackhole_is_mirrored_within_one_packet() {
    let mut sim = TwoEnds::new();
    let cut = sim.t0 + secs(10);
    sim.at(cut, |s| s.net.blackhole[0] = true);
    sim.run_until(cut + secs(5));
    let a = sim.switches(Node::A, cut);
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].1, SwitchReason::Distress);
    assert!(a[0].0 <= ms(1000), "{a:?}");
    let b = sim.switches(Node::B, cut);
    assert!(!b.is_empty(), "{b:?}");
    let mirrored = b.last().expect("B moved");
    assert_eq!(sim.b_follows(), Some(1));
    // B moved when A's first packet on fibre arrived: one-way fibre latency after A's switch
    // (or earlier, by its own distress detection).
    assert!(mirrored.0 <= a[0].0 + ms(31), "{a:?} {b:?}");
    let gap = {
        let mut prev = *sim.echoes.iter().rev().find(|&&e| e < cut).expect("echo");
        let mut gap = Duration::ZERO;
        for &e in sim.echoes.iter().filter(|&&e| e >= cut) {
            gap = gap.max(e - prev);
            prev = e;
        }
        gap
    };
    assert!(gap <= ms(1100), "{gap:?}");
}

#[test]
fn chooser_link_down_and_failback_are_mirrored_without_flip_flop() {
    let mut sim = TwoEnds::new();
    let cut = sim.t0 + secs(10);
    sim.at(cut, |s| {
        s.net.up[0] = false;
        let now = s.now;
        s.a.handle_link_event(UplinkId(0), LinkState::Down, now);
    });
    sim.at(cut + secs(3), |s| {
        s.net.up[0] = true;
        let now = s.now;
        s.a.handle_link_event(UplinkId(0), LinkState::Up, now);
    });
    sim.run_until(cut + secs(1));
    assert_eq!((sim.a_uplink(), sim.b_follows()), (Some(1), Some(1)));
    sim.run_until(cut + secs(60));
    assert_eq!((sim.a_uplink(), sim.b_follows()), (Some(0), Some(0)));
    let a = sim.switches(Node::A, cut);
    assert_eq!(
        a.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![SwitchReason::LinkDown, SwitchReason::Failback]
    );
    assert!(a[1].0 >= secs(33));
    // B: one move each way, each right behind A.
    let b = sim.switches(Node::B, cut);
    assert!(b.len() <= 3, "{b:?}");
    assert_eq!(b.last().map(|s| s.1), Some(SwitchReason::PeerChoice));
    assert!(b.last().expect("move").0 - a[1].0 <= ms(25), "{a:?} {b:?}");
    assert_eq!(
        sim.disagreements, 0,
        "B never echoed on a path A was not using"
    );
}
