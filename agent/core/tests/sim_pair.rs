//! Both ends of a pair, each with a satellite and a terrestrial uplink, over a simulated
//! underlay where only like-to-like paths route (satellite ⇄ satellite, terrestrial ⇄
//! terrestrial; the cross paths have no route, as in the end-to-end topology). Node A is the
//! chooser, B the follower. Failures are taken at either end, seen by that end only, and the
//! other end must move within one round trip of the backup path (the path notice), whatever
//! its role and whether or not data flows from the follower.

#[path = "sim/timeline.rs"]
mod timeline;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use skymesh_agent_core::path::{
    LinkState, NoticeRejected, PathAgent, PathConfig, PathEvent, PathId, PathNotice, ProbeSettings,
    RemoteEndpoint, Role, SwitchReason, UplinkConfig, UplinkId, UplinkKind, ValidPathConfig,
    MAX_BACKOFF,
};
use timeline::{InFlight, Script};

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

const A: usize = 0;
const B: usize = 1;
const SAT: u8 = 0;
const TERR: u8 = 1;
/// One-way latency contributed by each end's uplink: satellite paths 20 ms one way, terrestrial
/// 30 ms.
const HALF: [Duration; 2] = [Duration::from_millis(10), Duration::from_millis(15)];
/// Round trip of the terrestrial backup path.
const BACKUP_RTT: Duration = Duration::from_millis(60);
/// Slack on "within one RTT": the notice is sent in the same step as the switch, so only
/// event ordering inside one instant is left.
const BOUND: Duration = Duration::from_millis(5);
/// A probe, reply or notice on the wire over IPv4: 20 IP + 8 UDP + 32 WireGuard + 48 inner.
const WIRE_BYTES: u64 = 108;
const DATA_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy)]
enum Packet {
    Data,
    Request(u64),
    Reply(u64, u16),
    Notice(PathNotice),
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    from: usize,
    from_uplink: u8,
    to_uplink: u8,
    packet: Packet,
}

struct Pair {
    t0: Instant,
    now: Instant,
    agents: [PathAgent; 2],
    addrs: [[SocketAddr; 2]; 2],
    up: [[bool; 2]; 2],
    /// Packets leaving / arriving on an uplink vanish silently.
    blackhole_out: [[bool; 2]; 2],
    blackhole_in: [[bool; 2]; 2],
    /// Each end streams data to the other at 100 pps while set.
    streams: [bool; 2],
    next_data: Instant,
    /// Probes sent before this instant find no session: the driver reports them not sent.
    session_at: Instant,
    flights: InFlight<Flight>,
    script: Script<Pair>,
    events: Vec<(Instant, usize, SwitchReason, Option<PathId>)>,
    /// Data arrivals per end.
    data_rx: [Vec<Instant>; 2],
    /// Probe-protocol bytes carried by each end's uplinks (sent or received), with the time.
    probe_bytes: Vec<(Instant, usize, u8)>,
    /// Notices sent: when, by which end, what, on which of its paths.
    notices: Vec<(Instant, usize, PathNotice, PathId)>,
}

fn config(metered_sat: bool, sat_priority: u8) -> ValidPathConfig {
    let uplink = |name: &str, kind, priority, metered| UplinkConfig {
        name: name.into(),
        interface: None,
        source_address: None,
        kind,
        priority,
        probe: ProbeSettings::default(),
        metered,
        probe_budget_bytes_per_hour: None,
    };
    PathConfig {
        uplinks: vec![
            uplink("starlink", UplinkKind::Satellite, sat_priority, metered_sat),
            uplink("fibre", UplinkKind::Terrestrial, 1 - sat_priority, false),
        ],
        failover: Default::default(),
    }
    .validate()
    .expect("valid")
}

impl Pair {
    /// Satellite preferred (tier 0) on both ends, unmetered.
    fn new() -> Self {
        Self::with(false, 0)
    }

    fn with(metered_sat: bool, sat_priority: u8) -> Self {
        let t0 = Instant::now();
        let addr = |end: usize, uplink: u8| -> SocketAddr {
            SocketAddr::from(([198, 18, uplink + 1, end as u8 + 1], 51820))
        };
        let addrs = [[addr(A, SAT), addr(A, TERR)], [addr(B, SAT), addr(B, TERR)]];
        let cfg = config(metered_sat, sat_priority);
        let agent = |peer: usize, seed: u64| {
            let remotes = [SAT, TERR].map(|u| RemoteEndpoint {
                addr: addrs[peer][usize::from(u)],
                priority: if u == SAT {
                    sat_priority
                } else {
                    1 - sat_priority
                },
            });
            PathAgent::new(&cfg, &remotes, seed, t0)
        };
        let mut agents = [agent(B, 11), agent(A, 12)];
        agents[B].set_role(Role::Follower, t0);
        let mut pair = Self {
            t0,
            now: t0,
            agents,
            addrs,
            up: [[true; 2]; 2],
            blackhole_out: [[false; 2]; 2],
            blackhole_in: [[false; 2]; 2],
            streams: [false; 2],
            next_data: t0,
            session_at: t0,
            flights: InFlight::default(),
            script: Script::default(),
            events: Vec::new(),
            data_rx: [Vec::new(), Vec::new()],
            probe_bytes: Vec::new(),
            notices: Vec::new(),
        };
        pair.drain(A);
        pair.drain(B);
        pair
    }

    fn at(&mut self, t: Instant, f: impl FnOnce(&mut Pair) + 'static) {
        self.script.at(t, f);
    }

    /// The physical link goes down (or up) and that end's netlink tells its agent at once.
    fn set_link(&mut self, end: usize, uplink: u8, up: bool) {
        self.up[end][usize::from(uplink)] = up;
        let state = if up { LinkState::Up } else { LinkState::Down };
        let now = self.now;
        self.agents[end].handle_link_event(UplinkId(uplink), state, now);
        self.drain(end);
    }

    /// The path `end` sees for a packet between its `uplink` and the peer's `peer_uplink`.
    fn path(&self, end: usize, uplink: u8, peer_uplink: u8) -> PathId {
        PathId {
            uplink: UplinkId(uplink),
            remote: self.addrs[1 - end][usize::from(peer_uplink)],
        }
    }

    fn peer_uplink_of(&self, end: usize, p: PathId) -> u8 {
        if p.remote == self.addrs[1 - end][0] {
            SAT
        } else {
            TERR
        }
    }

    /// The active path of `end` as (its uplink, the peer's uplink).
    fn active(&self, end: usize) -> Option<(u8, u8)> {
        self.agents[end]
            .active_path()
            .map(|p| (p.uplink.0, self.peer_uplink_of(end, p)))
    }

    fn send(&mut self, from: usize, from_uplink: u8, to_uplink: u8, packet: Packet) {
        let u = usize::from(from_uplink);
        if !self.up[from][u] {
            return;
        }
        if !matches!(packet, Packet::Data) {
            self.probe_bytes.push((self.now, from, from_uplink));
        }
        if self.blackhole_out[from][u] || from_uplink != to_uplink {
            return; // vanishes, or no route between a satellite and a terrestrial address
        }
        let latency = HALF[u] + HALF[usize::from(to_uplink)];
        let flight = Flight {
            from,
            from_uplink,
            to_uplink,
            packet,
        };
        self.flights.push(self.now + latency, flight);
    }

    fn drain(&mut self, end: usize) {
        while let Some(tx) = self.agents[end].poll_transmit() {
            if self.now < self.session_at {
                self.agents[end].handle_probe_not_sent(tx.path, tx.nonce);
                continue;
            }
            let to = self.peer_uplink_of(end, tx.path);
            self.send(end, tx.path.uplink.0, to, Packet::Request(tx.nonce));
        }
        while let Some(n) = self.agents[end].poll_notice() {
            self.notices.push((self.now, end, n.notice, n.path));
            let to = self.peer_uplink_of(end, n.path);
            self.send(end, n.path.uplink.0, to, Packet::Notice(n.notice));
        }
        while let Some(PathEvent::PathChanged { to, reason, .. }) = self.agents[end].poll_event() {
            self.events.push((self.now, end, reason, to));
        }
    }

    fn arrive(&mut self, f: Flight) {
        let to = 1 - f.from;
        let u = usize::from(f.to_uplink);
        if !self.up[to][u] || self.blackhole_in[to][u] {
            return;
        }
        let now = self.now;
        if !matches!(f.packet, Packet::Data) {
            self.probe_bytes.push((now, to, f.to_uplink));
        }
        let path = self.path(to, f.to_uplink, f.from_uplink);
        let agent = &mut self.agents[to];
        match f.packet {
            Packet::Data => {
                agent.handle_peer_data(path, now);
                self.data_rx[to].push(now);
            }
            Packet::Request(nonce) => {
                agent.handle_authenticated_rx(path, now);
                let pace = agent.probe_pace(path).as_secs() as u16;
                self.send(to, f.to_uplink, f.from_uplink, Packet::Reply(nonce, pace));
            }
            Packet::Reply(nonce, pace) => {
                let _ = agent.handle_probe_reply(path, nonce, now);
                agent.handle_probe_pace(path, secs(u64::from(pace)));
            }
            Packet::Notice(notice) => {
                let _ = agent.handle_path_notice(path, notice, now);
            }
        }
        self.drain(to);
    }

    fn run_until(&mut self, end: Instant) {
        loop {
            let streaming = self.streams.iter().any(|&s| s);
            let next = timeline::next_instant(
                end,
                [
                    self.agents[A].poll_timeout(),
                    self.agents[B].poll_timeout(),
                    self.flights.next_at(),
                    self.script.next_at(),
                    streaming.then_some(self.next_data),
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
            if !streaming {
                self.next_data = now;
            }
            while streaming && self.next_data <= now {
                for end in [A, B] {
                    if !self.streams[end] {
                        continue;
                    }
                    if let Some(p) = self.agents[end].active_path() {
                        self.agents[end].handle_data_sent(now);
                        let to = self.peer_uplink_of(end, p);
                        self.send(end, p.uplink.0, to, Packet::Data);
                    }
                }
                self.next_data += DATA_INTERVAL;
            }
            for end in [A, B] {
                if self.agents[end].poll_timeout().is_some_and(|t| t <= now) {
                    self.agents[end].handle_timeout(now);
                }
                self.drain(end);
            }
        }
    }

    fn switches(&self, end: usize, since: Instant) -> Vec<(Duration, SwitchReason)> {
        self.events
            .iter()
            .filter(|(t, e, _, _)| *e == end && *t >= since)
            .map(|(t, _, r, _)| (*t - since, *r))
            .collect()
    }

    /// Longest gap between data arrivals at `end` around `from..to`.
    fn data_gap(&self, end: usize, from: Instant, to: Instant) -> Duration {
        let rx = &self.data_rx[end];
        let mut prev = rx
            .iter()
            .rev()
            .find(|&&t| t < from)
            .copied()
            .unwrap_or(from);
        let mut gap = Duration::ZERO;
        for &t in rx.iter().filter(|&&t| t >= from && t <= to) {
            gap = gap.max(t - prev);
            prev = t;
        }
        gap
    }

    fn bytes_on(&self, end: usize, uplink: u8, from: Instant, to: Instant) -> u64 {
        let n = self
            .probe_bytes
            .iter()
            .filter(|(t, e, u)| *e == end && *u == uplink && *t >= from && *t < to)
            .count() as u64;
        n * WIRE_BYTES
    }

    fn probes_sent(&self, end: usize, path: PathId) -> u64 {
        self.agents[end]
            .path_stats()
            .find(|s| s.path == path)
            .map_or(0, |s| s.probes_sent)
    }
}

/// Data from A, and from B when `follower_data`; both ends settled on the satellite.
fn settled(follower_data: bool) -> Pair {
    let mut pair = Pair::new();
    pair.streams = [true, follower_data];
    pair.run_until(pair.t0 + secs(10));
    assert_eq!(pair.active(A), Some((SAT, SAT)));
    assert_eq!(pair.active(B), Some((SAT, SAT)));
    pair
}

/// The end that did not take the cut moved within one backup RTT of the cut.
fn assert_other_end_moved(pair: &Pair, cut: Instant, cut_end: usize, within: Duration) {
    let other = 1 - cut_end;
    let own = pair.switches(cut_end, cut);
    assert_eq!(own.first().map(|s| s.0), Some(Duration::ZERO), "{own:?}");
    let moved = pair.switches(other, cut);
    let first = moved.first().expect("the other end moved");
    assert_eq!(first.1, SwitchReason::PeerNotice, "{moved:?}");
    assert!(first.0 <= within, "moved after {:?}: {moved:?}", first.0);
    assert_eq!(pair.active(A), Some((TERR, TERR)));
    assert_eq!(pair.active(B), Some((TERR, TERR)));
}

#[test]
fn hard_cut_at_either_end_moves_the_other_end_within_one_backup_rtt() {
    for cut_end in [A, B] {
        for follower_data in [false, true] {
            let mut pair = settled(follower_data);
            let cut = pair.t0 + secs(10);
            pair.at(cut, move |p| p.set_link(cut_end, SAT, false));
            pair.run_until(cut + secs(3));
            // The notice travels one way on the backup; one RTT is the target.
            assert_other_end_moved(&pair, cut, cut_end, BACKUP_RTT / 2 + BOUND);
            let gap = pair.data_gap(B, cut, cut + secs(3));
            eprintln!(
                "hard cut at {}, follower data {follower_data}: other end moved after {:?}, A→B gap {gap:?}, B→A gap {:?}",
                ["A (chooser)", "B (follower)"][cut_end],
                pair.switches(1 - cut_end, cut)[0].0,
                follower_data.then(|| pair.data_gap(A, cut, cut + secs(3))),
            );
            assert!(gap <= BACKUP_RTT + ms(20), "A→B gap {gap:?}");
            if follower_data {
                let gap = pair.data_gap(A, cut, cut + secs(3));
                assert!(gap <= BACKUP_RTT + ms(20), "B→A gap {gap:?}");
            }
            // Nothing flips back while the link stays down.
            assert_eq!(pair.switches(A, cut).len(), 1);
            assert_eq!(pair.switches(B, cut).len(), 1);
        }
    }
}

#[test]
fn silence_seen_by_one_end_moves_the_other_end_within_one_backup_rtt() {
    // Inbound satellite traffic of one end vanishes; only that end can tell.
    for deaf_end in [A, B] {
        for follower_data in [false, true] {
            let mut pair = settled(follower_data);
            let cut = pair.t0 + secs(10);
            pair.at(cut, move |p| p.blackhole_in[deaf_end][0] = true);
            pair.run_until(cut + secs(5));
            let first = pair
                .events
                .iter()
                .find(|(t, _, _, _)| *t >= cut)
                .copied()
                .expect("someone moved");
            let (t1, detector, reason, _) = first;
            assert_eq!(reason, SwitchReason::Distress, "{:?}", pair.events);
            assert!(t1 - cut <= ms(1_500), "detected after {:?}", t1 - cut);
            let other = pair.switches(1 - detector, t1);
            let moved = other.first().expect("the other end moved");
            eprintln!(
                "deaf end {}, follower data {follower_data}: detected by {} after {:?}, other end moved {:?} later, A→B gap {:?}",
                ["A", "B"][deaf_end],
                ["A", "B"][detector],
                t1 - cut,
                moved.0,
                pair.data_gap(B, cut, cut + secs(5)),
            );
            assert!(
                moved.0 <= BACKUP_RTT / 2 + BOUND,
                "deaf {deaf_end} data {follower_data}: {other:?}"
            );
            assert_eq!(pair.active(A), Some((TERR, TERR)));
            assert_eq!(pair.active(B), Some((TERR, TERR)));
        }
    }
}

#[test]
fn quiet_pair_fails_back_on_both_ends_after_the_hold() {
    // No data from the follower; with and without data from the chooser; the cut at each end.
    for cut_end in [A, B] {
        for chooser_data in [false, true] {
            let mut pair = Pair::new();
            pair.streams = [chooser_data, false];
            pair.run_until(pair.t0 + secs(10));
            let cut = pair.t0 + secs(10);
            let heal = cut + secs(3);
            pair.at(cut, move |p| p.set_link(cut_end, SAT, false));
            pair.at(heal, move |p| p.set_link(cut_end, SAT, true));
            pair.run_until(heal + secs(5));
            assert_eq!(pair.active(A), Some((TERR, TERR)));
            assert_eq!(pair.active(B), Some((TERR, TERR)));
            pair.run_until(heal + secs(35));
            assert_eq!(pair.active(A), Some((SAT, SAT)), "{:?}", pair.events);
            assert_eq!(pair.active(B), Some((SAT, SAT)), "{:?}", pair.events);
            let back = pair.switches(A, heal);
            assert_eq!(back.len(), 1, "{back:?}");
            assert_eq!(back[0].1, SwitchReason::Failback);
            assert!(back[0].0 >= secs(30) && back[0].0 <= secs(33), "{back:?}");
            let b = pair.switches(B, heal);
            assert_eq!(b.len(), 1, "{b:?}");
            assert!(b[0].0 - back[0].0 <= ms(25), "{back:?} {b:?}");
        }
    }
}

#[test]
fn replayed_or_overtaken_notices_move_nothing() {
    let mut pair = settled(false);
    let t = pair.t0 + secs(10);
    pair.at(t, |p| p.set_link(A, SAT, false));
    pair.at(t + secs(1), |p| p.set_link(A, SAT, true));
    pair.run_until(t + secs(40));
    assert_eq!(pair.active(B), Some((SAT, SAT)), "{:?}", pair.events);
    // A's link-down notice (to the terrestrial path), and its fail-back notice after it.
    let sent: Vec<_> = pair.notices.iter().filter(|n| n.1 == A).collect();
    assert!(sent.len() >= 2, "{sent:?}");
    let (_, _, link_down, on) = *sent[0];
    assert_eq!(on, pair.path(A, TERR, TERR));
    // Replayed (or delivered late, after the newer fail-back notice): refused, no move.
    let now = pair.now;
    let b_path = pair.path(B, TERR, TERR);
    assert_eq!(
        pair.agents[B].handle_path_notice(b_path, link_down, now),
        Err(NoticeRejected::Stale)
    );
    assert_eq!(pair.active(B), Some((SAT, SAT)));
    assert_eq!(pair.agents[B].poll_event(), None);
}

#[test]
fn idle_pair_keeps_a_metered_backup_satellite_within_its_probe_budget() {
    // Terrestrial preferred, satellite the metered backup (default budget 20 kB/hour per
    // peer); no data at all.
    let mut pair = Pair::with(true, 1);
    pair.run_until(pair.t0 + secs(7_200));
    assert_eq!(pair.active(A), Some((TERR, TERR)));
    let h1 = pair.bytes_on(A, SAT, pair.t0, pair.t0 + secs(3_600));
    let h2 = pair.bytes_on(A, SAT, pair.t0 + secs(3_600), pair.t0 + secs(7_200));
    let b2 = pair.bytes_on(B, SAT, pair.t0 + secs(3_600), pair.t0 + secs(7_200));
    eprintln!("probe bytes on A's metered satellite: hour 1 {h1}, hour 2 {h2}; B's: {b2}");
    for bytes in [h1, h2, b2] {
        assert!(bytes <= 20_000, "{bytes} bytes/hour");
    }
    // The backup is still proven.
    let backup = pair.path(A, SAT, SAT);
    let s = pair.agents[A]
        .path_stats()
        .find(|s| s.path == backup)
        .expect("path");
    assert!(s.last_reply.is_some_and(|t| pair.now - t <= secs(600)));
}

#[test]
fn probes_on_a_dead_path_decay_and_a_link_event_resets_the_back_off() {
    let mut pair = Pair::new();
    let dead = pair.path(A, SAT, TERR); // no route between A's satellite and B's fibre
    pair.run_until(pair.t0 + secs(60));
    let first_minute = pair.probes_sent(A, dead);
    pair.run_until(pair.t0 + secs(1_800));
    let before = pair.probes_sent(A, dead);
    pair.run_until(pair.t0 + secs(2_400));
    let last_ten_minutes = pair.probes_sent(A, dead) - before;
    eprintln!("dead path probes: first minute {first_minute}, minutes 30-40 {last_ten_minutes}");
    assert!(first_minute <= 30, "{first_minute}");
    assert!(
        last_ten_minutes <= 600 / MAX_BACKOFF.as_secs() + 1,
        "{last_ten_minutes}"
    );
    // A link event on the uplink resets the back-off: probed at once again.
    let t = pair.now;
    pair.at(t, |p| p.set_link(A, SAT, false));
    pair.at(t + secs(1), |p| p.set_link(A, SAT, true));
    let before = pair.probes_sent(A, dead);
    pair.run_until(t + secs(2));
    assert!(pair.probes_sent(A, dead) > before);
    // The healthy satellite path was never slowed: traffic fails back after the hold.
    pair.run_until(t + secs(40));
    assert_eq!(pair.active(A), Some((SAT, SAT)));
}

#[test]
fn a_clean_backup_path_shows_no_loss() {
    // Probes before the session exists are reported not sent; replies never take another
    // path. The clean terrestrial backup shows 0 % loss at both ends.
    let mut pair = Pair::new();
    pair.session_at = pair.t0 + ms(150);
    pair.streams = [true, true];
    pair.run_until(pair.t0 + secs(600));
    for end in [A, B] {
        let backup = pair.path(end, TERR, TERR);
        let s = pair.agents[end]
            .path_stats()
            .find(|s| s.path == backup)
            .expect("path");
        assert!(s.loss_samples >= 32, "{s:?}");
        assert_eq!(s.loss_ratio, 0.0, "{s:?}");
        assert_eq!(s.replies_received, s.probes_sent, "{s:?}");
    }
}
