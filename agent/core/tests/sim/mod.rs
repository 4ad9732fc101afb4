//! Deterministic network simulator for [`PathAgent`]: virtual clock, seeded RNG, one agent with
//! N uplinks against a scripted remote peer that answers probes and echoes a 100 pps ping over
//! the path the sender chose. Every impairment is a per-uplink, per-direction [`Channel`].
//!
//! Shared by the scenario tests (`tests/sim_*.rs`) and the `failover_sim` example.

#![allow(dead_code, unreachable_pub)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skymesh_agent_core::path::{
    FailoverSettings, LinkState, PathAgent, PathConfig, PathEvent, PathId, ProbeSettings,
    RemoteEndpoint, SwitchReason, UplinkConfig, UplinkId, UplinkKind, ValidPathConfig,
};

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

pub fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

/// Two-state Gilbert-Elliott loss: Good/Bad states with per-packet transition probabilities
/// and a loss probability in each.
#[derive(Debug, Clone, Copy)]
pub struct GilbertElliott {
    pub p_good_to_bad: f64,
    pub p_bad_to_good: f64,
    pub loss_good: f64,
    pub loss_bad: f64,
    pub bad: bool,
}

impl GilbertElliott {
    fn lose(&mut self, rng: &mut StdRng) -> bool {
        let flip = if self.bad {
            self.p_bad_to_good
        } else {
            self.p_good_to_bad
        };
        if rng.gen_bool(flip) {
            self.bad = !self.bad;
        }
        rng.gen_bool(if self.bad {
            self.loss_bad
        } else {
            self.loss_good
        })
    }
}

/// Starlink-like pattern: every 15 s a reconfiguration with a handover loss burst, then a
/// +140 ms spike, then a +75 ms spike.
#[derive(Debug, Clone, Copy)]
pub struct Starlink {
    /// Offset of the first reconfiguration after t0.
    pub phase: Duration,
    /// Upper bound of the handover loss burst at each reconfiguration (drawn uniformly).
    pub max_burst: Duration,
}

impl Starlink {
    const CYCLE: Duration = Duration::from_secs(15);

    /// Extra latency and whether the packet falls in the handover burst.
    fn effect(&self, since_t0: Duration, burst_of_cycle: Duration) -> (Duration, bool) {
        if since_t0 < self.phase {
            return (Duration::ZERO, false);
        }
        let in_cycle = Duration::from_nanos(
            ((since_t0 - self.phase).as_nanos() % Self::CYCLE.as_nanos()) as u64,
        );
        let burst = in_cycle < burst_of_cycle;
        let extra = if in_cycle < ms(400) {
            ms(140)
        } else if in_cycle < ms(1000) {
            ms(75)
        } else {
            Duration::ZERO
        };
        (extra, burst)
    }
}

/// One direction of one uplink.
#[derive(Debug, Clone)]
pub struct Channel {
    pub latency: Duration,
    pub jitter: Duration,
    pub loss: f64,
    pub gilbert: Option<GilbertElliott>,
    pub starlink: Option<Starlink>,
    pub blackhole: bool,
}

impl Channel {
    pub fn new(latency: Duration, jitter: Duration) -> Self {
        Self {
            latency,
            jitter,
            loss: 0.0,
            gilbert: None,
            starlink: None,
            blackhole: false,
        }
    }
}

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Agent to peer.
    Out,
    /// Peer to agent.
    In,
}

#[derive(Debug, Clone)]
pub struct Link {
    pub name: &'static str,
    pub kind: UplinkKind,
    pub priority: u8,
    /// Physical state; `detected` is what the agent was told.
    pub up: bool,
    pub out: Channel,
    pub inb: Channel,
    /// Per 15-s cycle handover burst lengths, drawn lazily.
    bursts: BTreeMap<u64, Duration>,
}

impl Link {
    pub fn new(name: &'static str, kind: UplinkKind, priority: u8, one_way: Duration) -> Self {
        let ch = Channel::new(one_way, ms(2));
        Self {
            name,
            kind,
            priority,
            up: true,
            out: ch.clone(),
            inb: ch,
            bursts: BTreeMap::new(),
        }
    }

    pub fn channel(&mut self, dir: Dir) -> &mut Channel {
        match dir {
            Dir::Out => &mut self.out,
            Dir::In => &mut self.inb,
        }
    }
}

/// A scripted change at a point in virtual time.
#[derive(Debug, Clone)]
pub enum Action {
    /// Physical link down and the agent told at once (netlink carrier loss).
    LinkDown(u8),
    /// Physical link up and the agent told.
    LinkUp(u8),
    /// Packets vanish silently in both directions (the agent is told nothing).
    Blackhole(u8, bool),
    /// Packets vanish silently in one direction.
    BlackholeDir(u8, Dir, bool),
    /// Replace a channel's model.
    SetChannel(u8, Dir, Channel),
    /// Inject a probe reply the peer never sent.
    ForgeReply { uplink: u8, nonce: u64 },
    /// Re-deliver the last genuine reply nonce seen on `from`, claiming it came on `on`.
    ReplayLastReply { from: u8, on: u8 },
    /// Start or stop the 100 pps ping.
    Traffic(bool),
}

#[derive(Debug, Clone, Copy)]
enum Packet {
    ProbeRequest { nonce: u64 },
    ProbeReply { nonce: u64 },
    Ping,
    Echo,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    path: PathId,
    dir: Dir,
    packet: Packet,
}

/// A recorded path change.
#[derive(Debug, Clone, Copy)]
pub struct Switch {
    pub at: Instant,
    pub from: Option<PathId>,
    pub to: Option<PathId>,
    pub reason: SwitchReason,
}

pub struct Sim {
    pub t0: Instant,
    pub now: Instant,
    pub agent: PathAgent,
    pub links: Vec<Link>,
    pub remote: SocketAddr,
    pub hold: Duration,
    rng: StdRng,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    flights: BTreeMap<u64, Flight>,
    seq: u64,
    script: Vec<(Instant, Action)>,
    pub traffic: bool,
    next_ping: Instant,
    pub switches: Vec<Switch>,
    /// Arrival times of ping echoes at the agent.
    pub echoes: Vec<Instant>,
    pub pings_sent: u64,
    pub probes_sent: Vec<(Instant, PathId)>,
    pub rejected_replies: u64,
    last_reply_nonce: BTreeMap<u8, u64>,
    /// Count of steps, to catch a state machine that stops advancing time.
    steps: u64,
}

pub const PING_INTERVAL: Duration = Duration::from_millis(10);

/// Satellite (tier 0, ~40 ms RTT) and terrestrial (tier 1, ~60 ms RTT), peer with one endpoint.
pub fn sat_and_terrestrial(seed: u64) -> Sim {
    Sim::new(
        seed,
        vec![
            Link::new("starlink", UplinkKind::Satellite, 0, ms(20)),
            Link::new("fibre", UplinkKind::Terrestrial, 1, ms(30)),
        ],
        FailoverSettings::default(),
    )
}

impl Sim {
    pub fn new(seed: u64, links: Vec<Link>, failover: FailoverSettings) -> Self {
        // The only clock read: a base for virtual time, never consulted again.
        let t0 = Instant::now();
        let config = PathConfig {
            uplinks: links
                .iter()
                .map(|l| UplinkConfig {
                    name: l.name.to_string(),
                    interface: None,
                    source_address: None,
                    kind: l.kind,
                    priority: l.priority,
                    probe: ProbeSettings::default(),
                    metered: false,
                    probe_budget_bytes_per_hour: None,
                })
                .collect(),
            failover,
        };
        let config: ValidPathConfig = config.validate().expect("valid sim config");
        let remote: SocketAddr = "198.18.200.1:51820".parse().expect("addr");
        let mut rng = StdRng::seed_from_u64(seed);
        let agent = PathAgent::new(
            &config,
            &[RemoteEndpoint {
                addr: remote,
                priority: 0,
            }],
            rng.gen(),
            t0,
        );
        let mut sim = Self {
            t0,
            now: t0,
            agent,
            links,
            remote,
            hold: Duration::from_millis(failover.failback_hold_ms),
            rng,
            queue: BinaryHeap::new(),
            flights: BTreeMap::new(),
            seq: 0,
            script: Vec::new(),
            traffic: true,
            next_ping: t0,
            switches: Vec::new(),
            echoes: Vec::new(),
            pings_sent: 0,
            probes_sent: Vec::new(),
            rejected_replies: 0,
            last_reply_nonce: BTreeMap::new(),
            steps: 0,
        };
        sim.drain();
        sim
    }

    pub fn path(&self, uplink: u8) -> PathId {
        PathId {
            uplink: UplinkId(uplink),
            remote: self.remote,
        }
    }

    pub fn active_uplink(&self) -> Option<u8> {
        self.agent.active_path().map(|p| p.uplink.0)
    }

    /// Schedules `action` at `at` (absolute virtual time).
    pub fn at(&mut self, at: Instant, action: Action) {
        assert!(at >= self.now, "cannot schedule in the past");
        self.script.push((at, action));
        self.script.sort_by_key(|(t, _)| *t);
    }

    /// Sets a channel model in both directions, now.
    pub fn set_both(&mut self, uplink: u8, ch: Channel) {
        self.links[usize::from(uplink)].out = ch.clone();
        self.links[usize::from(uplink)].inb = ch;
    }

    /// Runs until `self.now == t0 + offset`.
    pub fn run_until(&mut self, end: Instant) {
        loop {
            let mut next = end;
            let mut consider = |t: Option<Instant>| {
                if let Some(t) = t {
                    next = next.min(t);
                }
            };
            consider(self.agent.poll_timeout());
            consider(self.queue.peek().map(|Reverse((t, _))| *t));
            consider(self.script.first().map(|(t, _)| *t));
            if self.traffic {
                consider(Some(self.next_ping));
            }
            assert!(next >= self.now, "time went backwards");
            if next >= end && self.queue.peek().is_none_or(|Reverse((t, _))| *t > end) {
                self.now = end;
                self.step();
                return;
            }
            self.now = next;
            self.step();
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end);
    }

    /// Processes everything due at `self.now`, then checks invariants.
    fn step(&mut self) {
        self.steps += 1;
        let now = self.now;
        while self.script.first().is_some_and(|(t, _)| *t <= now) {
            let (_, action) = self.script.remove(0);
            self.apply(action);
        }
        while let Some(Reverse((t, id))) = self.queue.peek().copied() {
            if t > now {
                break;
            }
            self.queue.pop();
            let flight = self.flights.remove(&id).expect("flight");
            self.arrive(flight);
        }
        if self.traffic {
            while self.next_ping <= now {
                if let Some(path) = self.agent.active_path() {
                    self.agent.handle_data_sent(now);
                    self.send(path, Dir::Out, Packet::Ping);
                    self.pings_sent += 1;
                }
                self.next_ping += PING_INTERVAL;
            }
        } else {
            self.next_ping = now;
        }
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
            assert!(
                self.agent.poll_timeout().is_none_or(|t| t > now),
                "poll_timeout did not advance past now after handle_timeout"
            );
        }
        self.drain();
        self.check_invariants();
    }

    fn drain(&mut self) {
        while let Some(tx) = self.agent.poll_transmit() {
            self.probes_sent.push((self.now, tx.path));
            self.send(tx.path, Dir::Out, Packet::ProbeRequest { nonce: tx.nonce });
        }
        while let Some(ev) = self.agent.poll_event() {
            let PathEvent::PathChanged { from, to, reason } = ev;
            self.switches.push(Switch {
                at: self.now,
                from,
                to,
                reason,
            });
        }
    }

    fn check_invariants(&self) {
        let any_up = self.links.iter().any(|l| l.up);
        match self.agent.active_path() {
            Some(p) => assert!(
                self.links[usize::from(p.uplink.0)].up,
                "active path {p} is on a link that is down at {:?}",
                self.now - self.t0
            ),
            None => assert!(
                !any_up,
                "no active path although an uplink is up at {:?}",
                self.now - self.t0
            ),
        }
        // No flip-flop: an optional switch (fail-back, lower RTT) never returns traffic to a
        // path that traffic left less than the hold time ago.
        if let Some(last) = self.switches.last() {
            if !last.reason.is_forced() && last.at == self.now {
                let left_recently =
                    self.switches.iter().rev().skip(1).any(|s| {
                        s.from == last.to && s.from.is_some() && last.at - s.at < self.hold
                    });
                assert!(
                    !left_recently,
                    "flip-flop: {:?} back to {:?} within the hold time: {:?}",
                    last.reason, last.to, self.switches
                );
            }
        }
    }

    fn apply(&mut self, action: Action) {
        let now = self.now;
        match action {
            Action::LinkDown(u) => {
                self.links[usize::from(u)].up = false;
                self.agent
                    .handle_link_event(UplinkId(u), LinkState::Down, now);
            }
            Action::LinkUp(u) => {
                self.links[usize::from(u)].up = true;
                self.agent
                    .handle_link_event(UplinkId(u), LinkState::Up, now);
            }
            Action::Blackhole(u, on) => {
                self.links[usize::from(u)].out.blackhole = on;
                self.links[usize::from(u)].inb.blackhole = on;
            }
            Action::BlackholeDir(u, dir, on) => {
                self.links[usize::from(u)].channel(dir).blackhole = on;
            }
            Action::SetChannel(u, dir, ch) => {
                *self.links[usize::from(u)].channel(dir) = ch;
            }
            Action::ForgeReply { uplink, nonce } => {
                if self
                    .agent
                    .handle_probe_reply(self.path(uplink), nonce, now)
                    .is_err()
                {
                    self.rejected_replies += 1;
                }
            }
            Action::ReplayLastReply { from, on } => {
                let nonce = *self.last_reply_nonce.get(&from).expect("a reply was seen");
                if self
                    .agent
                    .handle_probe_reply(self.path(on), nonce, now)
                    .is_err()
                {
                    self.rejected_replies += 1;
                }
            }
            Action::Traffic(on) => {
                self.traffic = on;
                self.next_ping = now;
            }
        }
    }

    /// Puts a packet on the wire, or drops it per the channel model.
    fn send(&mut self, path: PathId, dir: Dir, packet: Packet) {
        let since_t0 = self.now - self.t0;
        let link = &mut self.links[usize::from(path.uplink.0)];
        if !link.up {
            return;
        }
        let cycle = Starlink::cycle_index(link.channel(dir).starlink, since_t0);
        let burst = match cycle {
            Some((c, max)) => *link
                .bursts
                .entry(c)
                .or_insert_with(|| ms(self.rng.gen_range(20..=max.as_millis().max(21) as u64))),
            None => Duration::ZERO,
        };
        let ch = link.channel(dir);
        if ch.blackhole {
            return;
        }
        let mut extra = Duration::ZERO;
        if let Some(s) = ch.starlink {
            let (e, in_burst) = s.effect(since_t0, burst);
            if in_burst {
                return;
            }
            extra = e;
        }
        if let Some(ge) = ch.gilbert.as_mut() {
            if ge.lose(&mut self.rng) {
                return;
            }
        }
        if ch.loss > 0.0 && self.rng.gen_bool(ch.loss) {
            return;
        }
        let jitter = if ch.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(self.rng.gen_range(0..=ch.jitter.as_micros() as u64))
        };
        let at = self.now + ch.latency + jitter + extra;
        self.seq += 1;
        self.flights.insert(self.seq, Flight { path, dir, packet });
        self.queue.push(Reverse((at, self.seq)));
    }

    fn arrive(&mut self, f: Flight) {
        let now = self.now;
        if !self.links[usize::from(f.path.uplink.0)].up {
            return; // lost with the link
        }
        match (f.dir, f.packet) {
            // The scripted peer answers on the path the packet came on.
            (Dir::Out, Packet::ProbeRequest { nonce }) => {
                self.send(f.path, Dir::In, Packet::ProbeReply { nonce })
            }
            (Dir::Out, Packet::Ping) => self.send(f.path, Dir::In, Packet::Echo),
            (Dir::In, Packet::ProbeReply { nonce }) => {
                self.last_reply_nonce.insert(f.path.uplink.0, nonce);
                if self.agent.handle_probe_reply(f.path, nonce, now).is_err() {
                    self.rejected_replies += 1;
                }
            }
            (Dir::In, Packet::Echo) => {
                self.agent.handle_authenticated_rx(f.path, now);
                self.echoes.push(now);
            }
            _ => unreachable!("packet in the wrong direction"),
        }
    }

    /// Longest gap between consecutive ping echoes arriving in `[from, to]`, counting from
    /// the last echo before `from`.
    pub fn longest_echo_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut prev: Option<Instant> = self.echoes.iter().rev().find(|&&t| t < from).copied();
        let mut gap = Duration::ZERO;
        for &t in self.echoes.iter().filter(|&&t| t >= from && t <= to) {
            if let Some(p) = prev {
                gap = gap.max(t - p);
            }
            prev = Some(t);
        }
        gap
    }

    /// Switches at or after `from`.
    pub fn switches_since(&self, from: Instant) -> Vec<Switch> {
        self.switches
            .iter()
            .filter(|s| s.at >= from)
            .copied()
            .collect()
    }

    /// Probes sent on `uplink` in `[from, to)`.
    pub fn probes_on(&self, uplink: u8, from: Instant, to: Instant) -> usize {
        self.probes_sent
            .iter()
            .filter(|(t, p)| p.uplink.0 == uplink && *t >= from && *t < to)
            .count()
    }
}

impl Starlink {
    /// The 15-s cycle a time falls in, with the burst bound, if the pattern is active.
    fn cycle_index(s: Option<Starlink>, since_t0: Duration) -> Option<(u64, Duration)> {
        let s = s?;
        if since_t0 < s.phase {
            return None;
        }
        Some((
            ((since_t0 - s.phase).as_nanos() / Self::CYCLE.as_nanos()) as u64,
            s.max_burst,
        ))
    }
}

/// The Starlink channel used by the tests: ~20 ms one way, 0-5 ms jitter, 1 % random loss,
/// every 15 s a handover burst of up to `max_burst` followed by +140 ms / +75 ms spikes.
/// Applied to each direction, so RTT spikes and loss are about twice the published ones: a
/// harsher test than the real pattern (and than `skymesh-impair --profile starlink`).
pub fn starlink_channel(phase: Duration, max_burst: Duration) -> Channel {
    Channel {
        latency: ms(20),
        jitter: ms(5),
        loss: 0.01,
        gilbert: None,
        starlink: Some(Starlink { phase, max_burst }),
        blackhole: false,
    }
}

/// p-th percentile (nearest rank) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty());
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Result of one blackhole or hard-cut trial.
#[derive(Debug, Clone, Copy)]
pub struct Trial {
    /// Cut to the switch event.
    pub switch_after: Duration,
    /// Longest gap in the 100 pps ping around the cut.
    pub ping_gap: Duration,
}

/// Runs one failover trial: Starlink-profile primary, cut at a random time in [5 s, 20 s),
/// silently (`hard == false`) or by link-down. Returns `None` if no switch happened.
pub fn failover_trial(seed: u64, hard: bool) -> Option<Trial> {
    let mut sim = sat_and_terrestrial(seed);
    sim.set_both(0, starlink_channel(ms(seed % 15_000), ms(250)));
    let cut_ms = 5_000 + sim.rng.gen_range(0..15_000);
    let cut = sim.t0 + ms(cut_ms);
    sim.at(
        cut,
        if hard {
            Action::LinkDown(0)
        } else {
            Action::Blackhole(0, true)
        },
    );
    sim.run_until(cut + secs(5));
    let switch = sim.switches_since(cut).first().copied()?;
    Some(Trial {
        switch_after: switch.at - cut,
        ping_gap: sim.longest_echo_gap(cut, cut + secs(5)),
    })
}

/// Runs the Starlink profile alone on the primary (handover bursts up to `max_burst`, 1 %
/// loss, +140/+75 ms spikes) for `duration`; returns the number of switches it caused.
pub fn starlink_only_switches(seed: u64, duration: Duration, max_burst: Duration) -> u64 {
    let mut sim = sat_and_terrestrial(seed);
    sim.set_both(0, starlink_channel(ms(seed % 15_000), max_burst));
    sim.run_until(sim.t0 + duration);
    sim.agent.switch_count()
}
