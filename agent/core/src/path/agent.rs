//! [`PathAgent`]: path selection towards one remote peer.

mod notice;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::config::{FailoverTiming, ProbeTiming, ValidPathConfig};
use super::probe::NonceSource;
use super::state::{Health, Outstanding, PathState, STREAK_RESTARTS_HOLD};
use super::{
    LinkState, NoticeTransmit, PathEvent, PathHealth, PathId, PathStats, ProbeId, ProbeTransmit,
    RemoteEndpoint, Role, SwitchReason, SwitchRecord, UnmatchedReply, UplinkId,
};
use notice::NoticeSender;

/// While no path is proven, every path is probed at its fast cadence for this long, then at its
/// backup cadence: finds a working path within one RTT after an outage, without spending five
/// probes a second forever on a peer that is simply offline.
const SEARCH_FAST_WINDOW: Duration = Duration::from_secs(10);

/// Unanswered probes in a row after which a path that does not carry traffic is probed with
/// exponential back-off, while another path works. Twice the default `distress_probes`: the
/// path has been declared failed and had a second round of fast probes before probing slows,
/// so a lost probe or a short outage never puts a good backup into back-off.
pub const BACKOFF_AFTER: u32 = 6;

/// In back-off, a dead path waits this fraction of the time it has been dead before its next
/// probe (at least the backup interval): the recovery of a path is noticed within a quarter of
/// its outage, and the probes of an hour-long outage drop from ~11 000 (fast cadence) to ~60.
const BACKOFF_DIVISOR: u32 = 4;

/// Longest back-off interval of a dead path: one minute, about 60 probes an hour (13 kB with
/// replies over IPv4, against ~11 000 probes an hour when dead paths were probed fast), yet a
/// path that silently comes back is found within a minute even when its peer does not probe
/// it first (a packet from the peer on the path ends the back-off at once). Metered uplinks
/// stretch it further to their pace.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Bytes one probe, reply or notice occupies on an uplink over IPv6 (40 IP + 8 UDP + 32
/// WireGuard data header and tag + 48 for the 44-byte inner packet padded to 16); over IPv4 it
/// is 20 bytes less. The pace of a metered uplink is computed with this upper bound.
pub const PROBE_WIRE_BYTES: u64 = 128;

/// Longest pace a metered uplink asks for, whatever its budget: a backup is re-proven at
/// least every ten minutes.
const MAX_PACE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
struct UplinkState {
    up: bool,
    /// The address family the uplink is bound to (its `source_address`), `None` for both: an
    /// uplink bound to an IPv4 source has no path to an IPv6 endpoint, and vice versa.
    family_v6: Option<bool>,
    priority: u8,
    probe: ProbeTiming,
}

/// Ranking of a path; lower is better. Derived `Ord` compares fields in order: operator tier
/// (local uplink priority, then remote endpoint priority), then smoothed RTT (unmeasured =
/// `Duration::MAX`), then the path id so ties break deterministically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    tier: (u8, u8),
    rtt: Duration,
    id: PathId,
}

/// Chooses the path to one remote peer among local uplinks × the peer's endpoints.
///
/// See the [module documentation](super) for the model, the policy and the driver contract.
#[derive(Debug)]
pub struct PathAgent {
    uplinks: Vec<UplinkState>,
    failover: FailoverTiming,
    paths: Vec<PathState>,
    active: Option<usize>,
    /// While the active path is unproven or failed, probes due before this instant use the
    /// fast cadence on every path (see [`SEARCH_FAST_WINDOW`]).
    search_until: Option<Instant>,
    nonces: NonceSource,
    next_probe_id: u64,
    transmits: VecDeque<ProbeTransmit>,
    events: VecDeque<PathEvent>,
    switch_count: u64,
    last_switch: Option<SwitchRecord>,
    /// The latest `now` passed in; upgrade deadlines at or before it were acted on or deferred.
    last_now: Instant,
    role: Role,
    notices: VecDeque<NoticeTransmit>,
    notice_out: NoticeSender,
    /// Sequence number of the last notice from the peer that was acted on.
    notice_in: Option<u64>,
}

/// How long a direct path must stay proven before traffic leaves a relayed path for it.
pub(crate) const RELAY_UPGRADE_HOLD: Duration = Duration::from_secs(1);

/// Most peer-reflexive paths a peer keeps (a peer roaming between NAT ports adds one each).
pub(crate) const MAX_LEARNED: usize = 4;

impl PathAgent {
    /// Creates the agent for one peer. Every uplink is assumed up until the driver reports
    /// otherwise; every path is probed at once. `nonce_seed` must come from the OS CSPRNG.
    pub fn new(
        config: &ValidPathConfig,
        remotes: &[RemoteEndpoint],
        nonce_seed: u64,
        now: Instant,
    ) -> Self {
        let uplinks = config
            .uplinks
            .iter()
            .map(|u| UplinkState {
                up: true,
                family_v6: u.config.source_address.map(|a| a.is_ipv6()),
                priority: u.config.priority,
                probe: u.probe,
            })
            .collect();
        let mut nonces = NonceSource::new(nonce_seed);
        let epoch = (nonces.next_nonce() >> 32) as u32;
        let mut agent = Self {
            uplinks,
            failover: config.failover,
            paths: Vec::new(),
            active: None,
            search_until: None,
            nonces,
            next_probe_id: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            switch_count: 0,
            last_switch: None,
            last_now: now,
            role: Role::Chooser,
            notices: VecDeque::new(),
            notice_out: NoticeSender::new(epoch),
            notice_in: None,
        };
        agent.set_remote_endpoints(remotes, now);
        agent
    }

    /// Replaces the peer's endpoints (from a new netmap). Paths that remain keep their state;
    /// if the active path disappears, traffic moves at once.
    pub fn set_remote_endpoints(&mut self, remotes: &[RemoteEndpoint], now: Instant) {
        let active_id = self.active.map(|i| self.paths[i].id);
        let mut old = std::mem::take(&mut self.paths);
        for (u, uplink) in self.uplinks.iter().enumerate() {
            let Ok(u) = u8::try_from(u) else { break };
            for r in remotes {
                if uplink.family_v6.is_some_and(|v6| v6 != r.addr.is_ipv6()) {
                    continue; // no socket of that family on this uplink
                }
                let id = PathId {
                    uplink: UplinkId(u),
                    remote: r.addr,
                };
                if self.paths.iter().any(|p| p.id == id) {
                    continue; // duplicate endpoint in the netmap
                }
                let mut state = match old.iter().position(|p| p.id == id) {
                    Some(i) => old.swap_remove(i),
                    None => PathState::new(id, r.priority, now),
                };
                state.remote_priority = r.priority;
                self.paths.push(state);
            }
        }
        // Learned paths stay while their address is not in the netmap (it may be now).
        let listed = self.paths.len();
        for p in old.into_iter().filter(|p| p.learned) {
            if !self.paths[..listed].iter().any(|q| q.id == p.id) {
                self.paths.push(p);
            }
        }
        self.paths.sort_by_key(|p| p.id);
        self.active = active_id.and_then(|id| self.index(id));
        if active_id.is_some() && self.active.is_none() {
            let pick = self.fallback_pick();
            self.switch_from(active_id, pick, SwitchReason::EndpointRemoved, now);
        }
        self.evaluate(now);
    }

    /// The driver saw the uplink's link or address go up or down (netlink).
    pub fn handle_link_event(&mut self, uplink: UplinkId, state: LinkState, now: Instant) {
        let Some(u) = self.uplinks.get_mut(usize::from(uplink.0)) else {
            return;
        };
        let up = state == LinkState::Up;
        if u.up == up {
            return;
        }
        u.up = up;
        for p in self.paths.iter_mut().filter(|p| p.id.uplink == uplink) {
            p.reset_liveness(now);
        }
        if up && self.active.is_none_or(|a| !self.paths[a].is_healthy()) {
            // A returning link during an outage restarts the fast search.
            self.search_until = Some(now + SEARCH_FAST_WINDOW);
        }
        self.evaluate(now);
    }

    /// WireGuard authenticated a packet (data or keepalive) from the peer arriving on `path`.
    /// Cheap enough for the per-packet path: no allocation, a scan of a handful of paths.
    pub fn handle_authenticated_rx(&mut self, path: PathId, now: Instant) {
        let Some(i) = self.index(path).or_else(|| self.learn(path, now)) else {
            return;
        };
        let p = &mut self.paths[i];
        p.last_rx = Some(now);
        p.silent_since = None;
        // Inbound data proves only the peer-to-us direction, so it never promotes a path and
        // never clears a failure: only a probe reply does (round trip). It does end a dead
        // path's back-off: the next probe goes a fast interval from now.
        if p.unanswered >= BACKOFF_AFTER {
            p.unanswered = BACKOFF_AFTER - 1;
            p.last_probe_at = Some(now);
        }
    }

    /// Adds `path`, on which the peer's authenticated traffic arrived from an address its
    /// netmap does not list: the port a NAT mapped it to towards us (ICE's peer-reflexive
    /// candidate). Behind an endpoint-dependent NAT it is the only address that works. Ranked
    /// with the peer's least preferred tier, then probed and promoted like any other path.
    /// At most [`MAX_LEARNED`] are kept (the oldest unproven one makes room). Returns its
    /// index.
    fn learn(&mut self, path: PathId, now: Instant) -> Option<usize> {
        let uplink = self.uplinks.get(usize::from(path.uplink.0))?;
        if uplink
            .family_v6
            .is_some_and(|v6| v6 != path.remote.is_ipv6())
        {
            return None;
        }
        let learned = self.paths.iter().filter(|p| p.learned).count();
        if learned >= MAX_LEARNED {
            let evict = self
                .paths
                .iter()
                .enumerate()
                .filter(|(i, p)| p.learned && Some(*i) != self.active && !p.is_healthy())
                .min_by_key(|(_, p)| p.created)
                .map(|(i, _)| i)?;
            let active_id = self.active.map(|a| self.paths[a].id);
            self.paths.remove(evict);
            self.active = active_id.and_then(|id| self.index(id));
        }
        let tier = self
            .paths
            .iter()
            .map(|p| p.remote_priority)
            .max()
            .unwrap_or(0);
        let mut state = PathState::new(path, tier, now);
        state.learned = true;
        let active_id = self.active.map(|a| self.paths[a].id);
        self.paths.push(state);
        self.paths.sort_by_key(|p| p.id);
        self.active = active_id.and_then(|id| self.index(id));
        self.index(path)
    }

    /// Sets which end of the pair chooses the path (see [`Role`]). Default: [`Role::Chooser`].
    pub fn set_role(&mut self, role: Role, now: Instant) {
        self.role = role;
        self.evaluate(now);
    }

    /// The pair's role of this end.
    pub fn role(&self) -> Role {
        self.role
    }

    /// WireGuard authenticated a *data* packet (not a probe, not a probe reply) from the peer
    /// on `path`. Same as [`handle_authenticated_rx`](Self::handle_authenticated_rx); in
    /// addition a [`Role::Follower`] moves its own traffic to that path at once, so traffic
    /// returns over the path the chooser picked. A path this end has declared failed is not
    /// followed (a one-way failure: the chooser will notice our silence and move).
    ///
    /// A [`Role::Chooser`] moves to the path the follower's data arrives on only when the
    /// follower has clearly left a failing path: that path is proven, our own active path has
    /// heard nothing authenticated for a fast interval, and our last switch is older than the
    /// distress timeout (so data still in flight after our own switch, e.g. at fail-back,
    /// does not pull us back). A follower leaves the chooser's path only on its own link-down
    /// or distress, so this saves the chooser its own detection time in a blackhole that
    /// silences only the follower's inbound direction.
    pub fn handle_peer_data(&mut self, path: PathId, now: Instant) {
        let before = self.active.map(|a| self.paths[a].last_rx);
        self.handle_authenticated_rx(path, now);
        let Some(i) = self.index(path) else { return };
        if self.role == Role::Chooser {
            let Some(a) = self.active else { return };
            let fast = self.uplink_of(a).probe.fast_interval;
            let active_silent = before
                .flatten()
                .is_none_or(|t| now.saturating_duration_since(t) >= fast);
            let settled = self.last_switch.is_none_or(|s| {
                now.saturating_duration_since(s.at) >= self.failover.distress_timeout
            });
            if a != i
                && active_silent
                && settled
                && self.uplink_of(i).up
                && self.paths[i].is_healthy()
            {
                self.switch(Some(i), SwitchReason::PeerChoice, now);
                self.evaluate(now);
            }
            return;
        }
        if self.active == Some(i)
            || !self.uplink_of(i).up
            || matches!(self.paths[i].health, Health::Failed { .. })
        {
            return;
        }
        self.switch(Some(i), SwitchReason::PeerChoice, now);
        self.evaluate(now);
    }

    /// The driver sent a data packet to the peer over the active path. Starts the "waiting for
    /// the peer" clock that fast probing and distress detection use. Per-packet cheap.
    pub fn handle_data_sent(&mut self, now: Instant) {
        if let Some(a) = self.active {
            self.paths[a].silent_since.get_or_insert(now);
        }
    }

    /// WireGuard authenticated a probe reply carrying `nonce`, arriving on `path`.
    /// A reply that matches no outstanding probe of that very path changes nothing.
    pub fn handle_probe_reply(
        &mut self,
        path: PathId,
        nonce: u64,
        now: Instant,
    ) -> Result<Duration, UnmatchedReply> {
        let Some(i) = self.index(path) else {
            return Err(UnmatchedReply::UnknownPath);
        };
        if !self.uplinks[usize::from(path.uplink.0)].up {
            return Err(UnmatchedReply::LinkDown);
        }
        let p = &mut self.paths[i];
        let Some(slot) = p.outstanding_slot(nonce) else {
            // A probe of another path answered here (the peer's reply took another route):
            // it proves nothing, and must not count as lost on its own path either.
            for other in &mut self.paths {
                if other.forget_probe(nonce) {
                    return Err(UnmatchedReply::OtherPath);
                }
            }
            return Err(UnmatchedReply::UnknownNonce);
        };
        let Some(out) = p.outstanding[slot].take() else {
            return Err(UnmatchedReply::UnknownNonce);
        };
        let rtt = now.saturating_duration_since(out.sent_at);
        p.rtt.update(rtt);
        p.loss.record(false);
        p.replies += 1;
        p.last_reply = Some(now);
        p.last_rx = Some(now);
        p.silent_since = None;
        if p.unanswered >= STREAK_RESTARTS_HOLD {
            // Two or more probes in a row went unanswered before this one: an outage, not
            // random loss. The path is not "continuously healthy"; its fail-back hold restarts.
            p.health = Health::Unproven;
        }
        p.unanswered = 0;
        p.first_unanswered_at = None;
        p.nth_unanswered_at = None;
        if !p.is_healthy() {
            p.health = Health::Healthy { since: now };
        }
        self.evaluate(now);
        Ok(rtt)
    }

    /// The driver could not send the probe `nonce` on `path` (no session yet, so it started
    /// a handshake instead; or the socket refused it). The probe leaves the loss statistics;
    /// it still counts as unanswered for distress, since the path did not work.
    pub fn handle_probe_not_sent(&mut self, path: PathId, nonce: u64) {
        if let Some(i) = self.index(path) {
            let p = &mut self.paths[i];
            if p.forget_probe(nonce) {
                p.probes_sent = p.probes_sent.saturating_sub(1);
            }
        }
    }

    /// The peer's reply on `path` asked for at least `pace` between probes on it (its uplink
    /// is metered, see [`probe_pace`](Self::probe_pace)). Call it with every authenticated
    /// reply; `Duration::ZERO` lifts the request.
    pub fn handle_probe_pace(&mut self, path: PathId, pace: Duration) {
        if let Some(i) = self.index(path) {
            self.paths[i].peer_pace = pace.min(MAX_PACE);
        }
    }

    /// The pace to put in a reply to the peer's probe arriving on `path`: the least spacing
    /// between probes on it that keeps a metered uplink within its budget, zero when the
    /// uplink is not metered or the path carries the traffic.
    ///
    /// The budget covers every probe exchange (request and reply) on the uplink's paths to
    /// this peer, ours and the peer's: `2 × paths` probers share it.
    pub fn probe_pace(&self, path: PathId) -> Duration {
        match self.index(path) {
            Some(i) if self.active != Some(i) => self.uplink_pace(path.uplink),
            _ => Duration::ZERO,
        }
    }

    /// Timers: distress deadlines, probe cadence, fail-back hold times, notice copies.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.evaluate(now);
        self.send_due_probes(now);
        // Sending may start a search cadence for other paths; nothing else changes here.
        self.repeat_notice(now);
    }

    /// Next probe to send. The driver wraps it as described in the module documentation.
    pub fn poll_transmit(&mut self) -> Option<ProbeTransmit> {
        self.transmits.pop_front()
    }

    /// Next path change to apply (set the WireGuard endpoint / uplink socket for the peer).
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for (i, p) in self.paths.iter().enumerate() {
            let u = &self.uplinks[usize::from(p.id.uplink.0)];
            if !u.up {
                continue;
            }
            consider(self.next_probe_at(i));
            consider(p.distress_deadline(&self.failover, &u.probe));
            // A past upgrade deadline was either taken or deferred for a better path whose
            // own deadline is in the future (see `consider_upgrade`).
            consider(self.upgrade_deadline(i).filter(|&t| t > self.last_now));
        }
        consider(self.notice_out.repeat_at());
        next
    }

    /// The path carrying traffic, `None` only when every uplink is down or the peer has no
    /// endpoint.
    pub fn active_path(&self) -> Option<PathId> {
        self.active.map(|a| self.paths[a].id)
    }

    /// Number of path changes since creation (the initial choice is not counted).
    pub fn switch_count(&self) -> u64 {
        self.switch_count
    }

    /// The most recent path change.
    pub fn last_switch(&self) -> Option<SwitchRecord> {
        self.last_switch
    }

    /// Measurements of every path, in path order.
    pub fn path_stats(&self) -> impl Iterator<Item = PathStats> + '_ {
        self.paths.iter().enumerate().map(|(i, p)| PathStats {
            path: p.id,
            health: if !self.uplinks[usize::from(p.id.uplink.0)].up {
                PathHealth::LinkDown
            } else {
                match p.health {
                    Health::Unproven => PathHealth::Unproven,
                    Health::Healthy { .. } => PathHealth::Healthy,
                    Health::Failed { .. } => PathHealth::Failed,
                }
            },
            active: self.active_path() == Some(p.id),
            smoothed_rtt: p.rtt.smoothed(),
            rtt_var: p.rtt.var(),
            latest_rtt: p.rtt.latest(),
            loss_ratio: p.loss.ratio(),
            loss_samples: p.loss.samples(),
            probes_sent: p.probes_sent,
            replies_received: p.replies,
            last_reply: p.last_reply,
            unanswered: p.unanswered,
            next_probe: self.next_probe_at(i),
        })
    }

    fn index(&self, id: PathId) -> Option<usize> {
        self.paths.iter().position(|p| p.id == id)
    }

    fn uplink_of(&self, i: usize) -> &UplinkState {
        &self.uplinks[usize::from(self.paths[i].id.uplink.0)]
    }

    fn score(&self, i: usize) -> Score {
        let p = &self.paths[i];
        Score {
            tier: (self.uplink_of(i).priority, p.remote_priority),
            rtt: p.rtt.smoothed().unwrap_or(Duration::MAX),
            id: p.id,
        }
    }

    /// The end of the fast search window, if a search is on (active path unproven or failed).
    fn search_until(&self) -> Option<Instant> {
        let active_proven = self.active.is_some_and(|a| self.paths[a].is_healthy());
        if active_proven {
            None
        } else {
            self.search_until
        }
    }

    /// When path `i` is due for a probe.
    fn next_probe_at(&self, i: usize) -> Option<Instant> {
        let p = &self.paths[i];
        let u = self.uplink_of(i);
        if !u.up {
            return None;
        }
        let Some(last) = p.last_probe_at else {
            return Some(p.created);
        };
        let active = self.active == Some(i);
        // Metered uplinks (ours or the peer's) pace the idle cadence of backups.
        let pace = if active {
            Duration::ZERO
        } else {
            self.uplink_pace(p.id.uplink).max(p.peer_pace)
        };
        if !active && p.unanswered >= BACKOFF_AFTER && self.best_healthy(None).is_some() {
            // A dead spare while another path works: exponential back-off. Each wait is a
            // quarter of the time the path has been dead (probe times grow by 1.25x), so a
            // path that comes back is found within a quarter of its outage.
            let dead_for = p
                .first_unanswered_at
                .map_or(Duration::ZERO, |f| last.saturating_duration_since(f));
            let backoff = (dead_for / BACKOFF_DIVISOR).clamp(
                u.probe.backup_interval,
                MAX_BACKOFF.max(u.probe.backup_interval),
            );
            return Some(last + backoff.max(pace));
        }
        let fast = last + u.probe.fast_interval;
        let slow = last + u.probe.backup_interval.max(pace);
        if self.search_until().is_some_and(|until| fast < until) {
            return Some(fast);
        }
        let mut at = slow;
        // A probe overdue: probe fast until answered or in distress, on any path. On the
        // active path this catches one-way failures that inbound data hides; on a backup it
        // tells a lost probe from an outage within the distress timeout.
        if let Some(f) = p.first_unanswered_at {
            at = at.min((f + p.probe_timeout(&u.probe)).max(fast));
        }
        if self.active == Some(i) {
            // Traffic pending and the peer silent for a fast interval: probe fast.
            if let Some(s) = p.silent_since {
                at = at.min((s + u.probe.fast_interval).max(fast));
            }
        } else if self.active.is_some_and(|a| self.paths[a].unanswered >= 2) {
            // The active path looks suspect: refresh the evidence on backups now, so a
            // switch at distress goes to a path proven a moment ago.
            at = at.min(fast);
        }
        Some(at)
    }

    /// When a better-ranked path becomes eligible to take over from a healthy active path.
    fn upgrade_deadline(&self, i: usize) -> Option<Instant> {
        if self.role != Role::Chooser {
            return None;
        }
        let a = self.active?;
        if a == i || !self.paths[a].is_healthy() {
            return None;
        }
        let Health::Healthy { since } = self.paths[i].health else {
            return None;
        };
        let hold = self.failover.failback_hold;
        let (si, sa) = (self.score(i), self.score(a));
        if si.tier < sa.tier {
            Some(since + hold)
        } else if si.tier == sa.tier {
            self.paths[i]
                .better_since
                .map(|b| (b + hold).max(since + hold))
        } else {
            None
        }
    }

    /// Spacing between probes on each path of a metered uplink that keeps the probes of
    /// both ends within its hourly budget (see [`probe_pace`](Self::probe_pace)).
    fn uplink_pace(&self, uplink: UplinkId) -> Duration {
        let Some(budget) = self
            .uplinks
            .get(usize::from(uplink.0))
            .and_then(|u| u.probe.budget_per_hour)
        else {
            return Duration::ZERO;
        };
        let paths = self.paths.iter().filter(|p| p.id.uplink == uplink).count() as u64;
        // Per hour: `2 × paths` probers, each exchange a request and a reply.
        let exchange_bytes = 2 * PROBE_WIRE_BYTES;
        let per_hour = (budget / (2 * paths.max(1) * exchange_bytes)).max(1);
        (Duration::from_secs(3_600) / u32::try_from(per_hour).unwrap_or(u32::MAX)).min(MAX_PACE)
    }

    fn rtt_clearly_better(&self, candidate: usize, active: usize) -> bool {
        let (Some(c), Some(a)) = (
            self.paths[candidate].rtt.smoothed(),
            self.paths[active].rtt.smoothed(),
        ) else {
            return false;
        };
        let margin = self.failover.rtt_switch_margin.max(a / 4);
        c + margin < a
    }

    fn send_due_probes(&mut self, now: Instant) {
        // A probe on one path can make another due (the active path turning suspect speeds
        // up backups), so repeat until a pass sends nothing. Each path sends at most once per
        // call: after a send its next probe is at least a fast interval away.
        loop {
            let mut sent = false;
            for i in 0..self.paths.len() {
                if self.next_probe_at(i).is_some_and(|due| due <= now) {
                    self.send_probe(i, now);
                    sent = true;
                }
            }
            if !sent {
                break;
            }
        }
    }

    fn send_probe(&mut self, i: usize, now: Instant) {
        let id = ProbeId(self.next_probe_id);
        self.next_probe_id += 1;
        let nonce = self.nonces.next_nonce();
        let distress_probes = self.failover.distress_probes;
        let p = &mut self.paths[i];
        p.record_probe(
            Outstanding {
                nonce,
                sent_at: now,
            },
            distress_probes,
        );
        self.transmits.push_back(ProbeTransmit {
            path: p.id,
            probe_id: id,
            nonce,
        });
    }

    /// Applies distress deadlines, then the selection policy.
    fn evaluate(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        for i in 0..self.paths.len() {
            let u = *self.uplink_of(i);
            let failover = self.failover;
            let p = &mut self.paths[i];
            p.expire_outstanding(now);
            if !u.up {
                continue;
            }
            if p.distress_deadline(&failover, &u.probe)
                .is_some_and(|d| d <= now)
            {
                p.health = Health::Failed { at: now };
                p.better_since = None;
            }
        }
        self.select(now);
        self.update_search(now);
    }

    fn best_healthy(&self, except: Option<usize>) -> Option<usize> {
        (0..self.paths.len())
            .filter(|&i| Some(i) != except && self.uplink_of(i).up && self.paths[i].is_healthy())
            .min_by_key(|&i| self.score(i))
    }

    fn select(&mut self, now: Instant) {
        let Some(a) = self.active else {
            // No active path: any up uplink with a path gets traffic, proven ones first.
            if let Some(p) = self.fallback_pick() {
                let reason = if self.last_switch.is_none() {
                    SwitchReason::Initial
                } else {
                    SwitchReason::Recovered
                };
                self.switch(Some(p), reason, now);
            }
            return;
        };

        if !self.uplink_of(a).up {
            // Link down: move at once, to a proven path if there is one, else to the best
            // path on any link still up (it is probed fast until proven).
            let pick = self.fallback_pick();
            self.switch(pick, SwitchReason::LinkDown, now);
            return;
        }

        match self.paths[a].health {
            Health::Failed { .. } => {
                if let Some(c) = self.best_healthy(Some(a)) {
                    self.switch(Some(c), SwitchReason::Distress, now);
                }
                // Otherwise stay: nothing better is proven; searching probes every path fast.
            }
            Health::Unproven => {
                // A fresh path gets its chance: it is kept until it proves itself or fails.
            }
            // Upgrades are the chooser's call; a follower only leaves paths that fail, or the
            // relay for a direct path (both ends leave it by themselves: with no data flowing
            // the follower would otherwise stay relayed until the chooser sends some).
            Health::Healthy { .. }
                if self.role == Role::Chooser
                    || crate::relay::virtual_slot(self.paths[a].id.remote).is_some() =>
            {
                self.consider_upgrade(a, now)
            }
            Health::Healthy { .. } => {}
        }
    }

    /// Starts the fast search when the active path stops being proven, ends it when it is.
    fn update_search(&mut self, now: Instant) {
        match self.active {
            Some(a) if self.paths[a].is_healthy() => self.search_until = None,
            Some(_) => {
                self.search_until.get_or_insert(now + SEARCH_FAST_WINDOW);
            }
            None => self.search_until = None,
        }
    }

    fn consider_upgrade(&mut self, a: usize, now: Instant) {
        let hold = self.failover.failback_hold;
        let sa = self.score(a);
        let mut best: Option<(Score, usize, SwitchReason)> = None;
        for i in 0..self.paths.len() {
            if i == a {
                continue;
            }
            let up = self.uplink_of(i).up;
            let Health::Healthy { since } = self.paths[i].health else {
                self.paths[i].better_since = None;
                continue;
            };
            if !up {
                continue;
            }
            let si = self.score(i);
            // Off a relay onto a direct path: after a short proof, not the fail-back hold
            // (which guards against returning to a link that failed; the relay is the
            // last resort, and a punched path is what every relayed pair is waiting for).
            let relayed = |p: usize| crate::relay::virtual_slot(self.paths[p].id.remote).is_some();
            let hold_i = if relayed(a) && !relayed(i) {
                hold.min(RELAY_UPGRADE_HOLD)
            } else {
                hold
            };
            let eligible = if si.tier < sa.tier {
                (now >= since + hold_i).then_some(SwitchReason::Failback)
            } else if si.tier == sa.tier && self.rtt_clearly_better(i, a) {
                let b = *self.paths[i].better_since.get_or_insert(now);
                (now >= b + hold && now >= since + hold).then_some(SwitchReason::LowerRtt)
            } else {
                self.paths[i].better_since = None;
                None
            };
            if let Some(reason) = eligible {
                if best.is_none_or(|(s, _, _)| si < s) {
                    best = Some((si, i, reason));
                }
            }
        }
        let Some((best_score, i, reason)) = best else {
            return;
        };
        // Coalesce a staircase (tier 2 → tier 1 → tier 0 a moment later) into one switch: wait
        // for a better-tier path that becomes eligible within a quarter of the hold time.
        let coalesce = hold / 4;
        let better_soon = (0..self.paths.len()).any(|j| {
            let Health::Healthy { since } = self.paths[j].health else {
                return false;
            };
            j != a
                && self.uplink_of(j).up
                && self.score(j).tier < best_score.tier
                && since + hold > now
                && since + hold <= now + coalesce
        });
        if !better_soon {
            self.switch(Some(i), reason, now);
        }
    }

    /// The best proven path, else the best path on a link that is up (failed ones last).
    fn fallback_pick(&self) -> Option<usize> {
        self.best_healthy(None).or_else(|| {
            (0..self.paths.len())
                .filter(|&i| self.uplink_of(i).up)
                .min_by_key(|&i| {
                    (
                        matches!(self.paths[i].health, Health::Failed { .. }),
                        self.score(i),
                    )
                })
        })
    }

    fn switch(&mut self, to: Option<usize>, reason: SwitchReason, now: Instant) {
        let from = self.active.map(|a| self.paths[a].id);
        self.switch_from(from, to, reason, now);
    }

    fn switch_from(
        &mut self,
        from: Option<PathId>,
        to: Option<usize>,
        reason: SwitchReason,
        now: Instant,
    ) {
        let to_id = to.map(|t| self.paths[t].id);
        if from == to_id {
            return;
        }
        self.active = to;
        for p in &mut self.paths {
            p.better_since = None;
        }
        if reason != SwitchReason::Initial {
            self.switch_count += 1;
        }
        let record = SwitchRecord {
            at: now,
            from,
            to: to_id,
            reason,
        };
        self.last_switch = Some(record);
        self.events.push_back(PathEvent::PathChanged {
            from,
            to: to_id,
            reason,
        });
        if let (Some(path), Some(cause)) = (to_id, self.notice_cause(reason)) {
            self.send_notice(path, cause, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::{
        NoticeCause, NoticeRejected, PathConfig, PathNotice, ProbeSettings, UplinkConfig,
        UplinkKind,
    };
    use std::net::SocketAddr;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn config(priorities: &[u8]) -> ValidPathConfig {
        PathConfig {
            uplinks: priorities
                .iter()
                .enumerate()
                .map(|(i, &priority)| UplinkConfig {
                    name: format!("up{i}"),
                    interface: None,
                    source_address: None,
                    kind: UplinkKind::Terrestrial,
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

    fn remote(port: u16, priority: u8) -> RemoteEndpoint {
        RemoteEndpoint {
            addr: SocketAddr::from(([198, 18, 0, 1], port)),
            priority,
        }
    }

    fn path(uplink: u8, port: u16) -> PathId {
        PathId {
            uplink: UplinkId(uplink),
            remote: SocketAddr::from(([198, 18, 0, 1], port)),
        }
    }

    /// Answers every pending probe after `rtt`, on the path it was sent on.
    fn answer_all(agent: &mut PathAgent, now: Instant, rtt: Duration) {
        let mut pending = Vec::new();
        while let Some(tx) = agent.poll_transmit() {
            pending.push(tx);
        }
        for tx in pending {
            agent
                .handle_probe_reply(tx.path, tx.nonce, now + rtt)
                .expect("genuine reply");
        }
    }

    /// Two uplinks (tiers 0 and 1) to one endpoint, both proven at `t0`, traffic on tier 0,
    /// events drained.
    fn proven_agent(t0: Instant) -> PathAgent {
        let mut agent = PathAgent::new(&config(&[0, 1]), &[remote(1, 0)], 7, t0);
        agent.handle_timeout(t0);
        answer_all(&mut agent, t0, ms(1));
        assert_eq!(agent.active_path(), Some(path(0, 1)));
        while agent.poll_event().is_some() {}
        agent
    }

    #[test]
    fn initial_choice_uses_both_tiers_and_is_announced() {
        let t0 = Instant::now();
        let mut agent = PathAgent::new(&config(&[1, 0]), &[remote(1, 1), remote(2, 0)], 7, t0);
        assert_eq!(agent.active_path(), Some(path(1, 2)));
        assert_eq!(
            agent.poll_event(),
            Some(PathEvent::PathChanged {
                from: None,
                to: Some(path(1, 2)),
                reason: SwitchReason::Initial
            })
        );
        assert_eq!(agent.switch_count(), 0);
        // Every one of the four paths is probed at once, each with its own nonce.
        assert_eq!(agent.poll_timeout(), Some(t0));
        agent.handle_timeout(t0);
        let mut probes = Vec::new();
        while let Some(tx) = agent.poll_transmit() {
            probes.push(tx);
        }
        assert_eq!(probes.len(), 4);
        let mut nonces: Vec<u64> = probes.iter().map(|p| p.nonce).collect();
        nonces.sort_unstable();
        nonces.dedup();
        assert_eq!(nonces.len(), 4);
    }

    #[test]
    fn an_uplink_bound_to_a_source_address_only_pairs_with_endpoints_of_its_family() {
        let t0 = Instant::now();
        let uplink = |name: &str, source: Option<&str>| UplinkConfig {
            name: name.into(),
            interface: source.is_none().then(|| format!("{name}0")),
            source_address: source.map(|s| s.parse().expect("addr")),
            kind: UplinkKind::Terrestrial,
            priority: 0,
            probe: ProbeSettings::default(),
            metered: false,
            probe_budget_bytes_per_hour: None,
        };
        let cfg = PathConfig {
            uplinks: vec![
                uplink("v4", Some("198.18.0.2")),
                uplink("v6", Some("fd00:1::2")),
                uplink("dev", None),
            ],
            failover: Default::default(),
        }
        .validate()
        .expect("valid");
        let e4 = SocketAddr::from(([198, 18, 1, 1], 51820));
        let e6: SocketAddr = "[fd00:2::1]:51820".parse().expect("addr");
        let remotes = [
            RemoteEndpoint {
                addr: e4,
                priority: 0,
            },
            RemoteEndpoint {
                addr: e6,
                priority: 0,
            },
        ];
        let agent = PathAgent::new(&cfg, &remotes, 7, t0);
        let mut paths: Vec<(u8, SocketAddr)> = agent
            .path_stats()
            .map(|p| (p.path.uplink.0, p.path.remote))
            .collect();
        paths.sort();
        // The interface-bound uplink has a socket of each family; the others one.
        assert_eq!(paths, vec![(0, e4), (1, e6), (2, e4), (2, e6)]);
    }

    #[test]
    fn replies_that_match_nothing_change_nothing() {
        let t0 = Instant::now();
        let mut agent = PathAgent::new(&config(&[0, 1]), &[remote(1, 0)], 7, t0);
        agent.handle_timeout(t0);
        let a = agent.poll_transmit().expect("probe");
        let b = agent.poll_transmit().expect("probe");
        assert_eq!((a.path, b.path), (path(0, 1), path(1, 1)));
        let later = t0 + ms(20);
        assert_eq!(
            agent.handle_probe_reply(path(0, 9), a.nonce, later),
            Err(UnmatchedReply::UnknownPath)
        );
        assert_eq!(
            agent.handle_probe_reply(a.path, b.nonce, later),
            Err(UnmatchedReply::OtherPath),
            "a nonce sent on another path does not prove this one"
        );
        assert_eq!(
            agent.handle_probe_reply(b.path, b.nonce, later),
            Err(UnmatchedReply::UnknownNonce),
            "nor its own path, once it came back elsewhere"
        );
        assert_eq!(
            agent.handle_probe_reply(a.path, a.nonce ^ 1, later),
            Err(UnmatchedReply::UnknownNonce)
        );
        assert!(agent.path_stats().all(|s| s.health == PathHealth::Unproven));
        assert_eq!(agent.handle_probe_reply(a.path, a.nonce, later), Ok(ms(20)));
        assert_eq!(
            agent.handle_probe_reply(a.path, a.nonce, later),
            Err(UnmatchedReply::UnknownNonce),
            "a replayed reply is not counted twice"
        );
        agent.handle_link_event(UplinkId(1), LinkState::Down, later);
        assert_eq!(
            agent.handle_probe_reply(b.path, b.nonce, later),
            Err(UnmatchedReply::LinkDown)
        );
        let stats: Vec<_> = agent.path_stats().collect();
        assert_eq!(stats[0].health, PathHealth::Healthy);
        assert_eq!(stats[0].replies_received, 1);
        assert_eq!(stats[1].health, PathHealth::LinkDown);
    }

    #[test]
    fn removing_the_active_endpoint_moves_traffic_at_once() {
        let t0 = Instant::now();
        let mut agent = PathAgent::new(&config(&[0]), &[remote(1, 0), remote(2, 1)], 7, t0);
        agent.handle_timeout(t0);
        answer_all(&mut agent, t0, ms(30));
        assert_eq!(agent.active_path(), Some(path(0, 1)));
        while agent.poll_event().is_some() {}
        let t1 = t0 + ms(100);
        agent.set_remote_endpoints(&[remote(2, 1)], t1);
        assert_eq!(
            agent.poll_event(),
            Some(PathEvent::PathChanged {
                from: Some(path(0, 1)),
                to: Some(path(0, 2)),
                reason: SwitchReason::EndpointRemoved
            })
        );
        assert_eq!(agent.poll_event(), None);
        assert_eq!(agent.active_path(), Some(path(0, 2)));
        // The surviving path kept its proof and its RTT.
        let s = agent.path_stats().next().expect("one path");
        assert_eq!(s.health, PathHealth::Healthy);
        assert_eq!(s.smoothed_rtt, Some(ms(30)));
    }

    #[test]
    fn a_direct_path_that_proves_itself_replaces_the_relay_within_about_a_second() {
        let t0 = Instant::now();
        let relayed = crate::relay::virtual_addr(3).expect("slot");
        // Direct (tier 0) and relayed (tier 1); only the relay answers at first.
        let mut agent = PathAgent::new(
            &config(&[0]),
            &[
                remote(1, 0),
                RemoteEndpoint {
                    addr: relayed,
                    priority: 1,
                },
            ],
            7,
            t0,
        );
        let via_relay = PathId {
            uplink: UplinkId(0),
            remote: relayed,
        };
        let mut now = t0;
        let mut direct_from = None;
        while now < t0 + ms(10_000) {
            agent.handle_timeout(now);
            while let Some(tx) = agent.poll_transmit() {
                let punched = now >= t0 + ms(3_000);
                if tx.path == via_relay || punched {
                    agent
                        .handle_probe_reply(tx.path, tx.nonce, now + ms(2))
                        .expect("genuine reply");
                }
            }
            if agent.active_path() == Some(path(0, 1)) && direct_from.is_none() {
                direct_from = Some(now);
            }
            now += ms(10);
        }
        assert_eq!(agent.active_path(), Some(path(0, 1)));
        let moved = direct_from.expect("moved to direct") - (t0 + ms(3_000));
        assert!(moved <= ms(2_500), "relay → direct took {moved:?}");
    }

    #[test]
    fn traffic_from_an_unlisted_nat_port_becomes_a_path_that_is_probed_and_kept() {
        let t0 = Instant::now();
        // The netmap lists only the peer's private address (port 1), which never answers.
        let mut agent = PathAgent::new(&config(&[0]), &[remote(1, 0)], 7, t0);
        agent.handle_timeout(t0);
        while agent.poll_transmit().is_some() {}
        // Its handshake arrives from the port its NAT picked (port 9): learned and probed.
        agent.handle_authenticated_rx(path(0, 9), t0 + ms(10));
        assert_eq!(agent.path_stats().count(), 2);
        // Only the learned path answers; the listed one fails by distress and traffic moves.
        let mut now = t0 + ms(10);
        let mut probed = false;
        while now < t0 + ms(2_000) {
            agent.handle_timeout(now);
            while let Some(tx) = agent.poll_transmit() {
                if tx.path == path(0, 9) {
                    probed = true;
                    agent
                        .handle_probe_reply(tx.path, tx.nonce, now + ms(5))
                        .expect("genuine reply");
                }
            }
            now += ms(10);
        }
        assert!(probed, "the learned path is probed");
        assert_eq!(agent.active_path(), Some(path(0, 9)));
        let t1 = now;
        // A new netmap (still without it) keeps the learned path, and it stays active.
        agent.set_remote_endpoints(&[remote(1, 0), remote(2, 0)], t1 + ms(100));
        assert_eq!(agent.active_path(), Some(path(0, 9)));
        // At most MAX_LEARNED are kept: a roaming flood of new ports does not grow the table.
        for port in 100..120 {
            agent.handle_authenticated_rx(path(0, port), t1 + ms(200));
        }
        let learned = agent.path_stats().count() - 2;
        assert_eq!(learned, MAX_LEARNED);
        assert_eq!(agent.active_path(), Some(path(0, 9)));
    }

    #[test]
    fn chooser_follows_the_follower_off_a_silent_path_but_not_right_after_its_own_switch() {
        let t0 = Instant::now();
        let mut agent = proven_agent(t0);
        // Right after the initial choice: data on the backup does not move the chooser.
        agent.handle_peer_data(path(1, 1), t0 + ms(300));
        assert_eq!(agent.active_path(), Some(path(0, 1)));
        // The active path keeps hearing from the peer: data on the backup does not move it.
        let t1 = t0 + ms(2_000);
        agent.handle_authenticated_rx(path(0, 1), t1);
        agent.handle_peer_data(path(1, 1), t1 + ms(50));
        assert_eq!(agent.active_path(), Some(path(0, 1)));
        // The active path has been silent for a fast interval and the follower's data now
        // arrives on the (proven) backup: the follower left a failing path; follow it.
        agent.handle_peer_data(path(1, 1), t1 + ms(400));
        assert_eq!(agent.active_path(), Some(path(1, 1)));
        assert_eq!(
            agent.poll_event(),
            Some(PathEvent::PathChanged {
                from: Some(path(0, 1)),
                to: Some(path(1, 1)),
                reason: SwitchReason::PeerChoice
            })
        );
    }

    #[test]
    fn path_notices_move_once_and_never_backwards() {
        let t0 = Instant::now();
        let mut agent = proven_agent(t0);
        let notice = |epoch: u64, counter: u64| PathNotice {
            seq: (epoch << 32) | counter,
            cause: NoticeCause::LinkDown,
        };
        let t1 = t0 + ms(500);
        assert_eq!(
            agent.handle_path_notice(path(0, 9), notice(1, 5), t1),
            Err(NoticeRejected::UnknownPath)
        );
        assert_eq!(
            agent.handle_path_notice(path(1, 1), notice(1, 5), t1),
            Ok(())
        );
        assert_eq!(agent.active_path(), Some(path(1, 1)));
        assert_eq!(
            agent.poll_event(),
            Some(PathEvent::PathChanged {
                from: Some(path(0, 1)),
                to: Some(path(1, 1)),
                reason: SwitchReason::PeerNotice
            })
        );
        // The path the peer left is failed: no fail-back to it before it is proven again.
        let left = agent.path_stats().next().expect("path");
        assert_eq!(left.health, PathHealth::Failed);
        // Following a notice is never announced back.
        assert_eq!(agent.poll_notice(), None);
        // A duplicate or an older notice of the same epoch moves nothing.
        for stale in [notice(1, 5), notice(1, 4)] {
            assert_eq!(
                agent.handle_path_notice(path(0, 1), stale, t1 + ms(10)),
                Err(NoticeRejected::Stale)
            );
        }
        assert_eq!(agent.active_path(), Some(path(1, 1)));
        // A restarted peer (new epoch) is heard.
        agent.handle_link_event(UplinkId(1), LinkState::Down, t1 + ms(20));
        while agent.poll_event().is_some() {}
        assert_eq!(
            agent.handle_path_notice(path(1, 1), notice(2, 1), t1 + ms(30)),
            Err(NoticeRejected::LinkDown)
        );
        assert_eq!(
            agent.handle_path_notice(path(0, 1), notice(2, 1), t1 + ms(30)),
            Ok(())
        );
        assert_eq!(agent.active_path(), Some(path(0, 1)));
    }

    #[test]
    fn an_own_move_is_announced_twice_on_the_new_path_with_a_rising_counter() {
        let t0 = Instant::now();
        let mut agent = proven_agent(t0);
        agent.handle_link_event(UplinkId(0), LinkState::Down, t0 + ms(100));
        let first = agent.poll_notice().expect("notice at once");
        assert_eq!(first.path, path(1, 1));
        assert_eq!(first.notice.cause, NoticeCause::LinkDown);
        assert_eq!(agent.poll_notice(), None);
        let again = t0 + ms(300);
        assert_eq!(agent.poll_timeout().map(|t| t <= again), Some(true));
        agent.handle_timeout(again);
        assert_eq!(
            agent.poll_notice(),
            Some(first),
            "the same notice, once more"
        );
        agent.handle_timeout(again + ms(500));
        assert_eq!(agent.poll_notice(), None);
        agent.handle_link_event(UplinkId(0), LinkState::Up, t0 + ms(1_000));
        agent.handle_link_event(UplinkId(1), LinkState::Down, t0 + ms(1_100));
        let next = agent.poll_notice().expect("notice");
        assert_eq!(next.path, path(0, 1));
        assert_eq!(next.notice.seq >> 32, first.notice.seq >> 32);
        assert!(next.notice.seq > first.notice.seq);
    }

    #[test]
    fn poll_timeout_is_always_in_the_future_after_handle_timeout() {
        let t0 = Instant::now();
        let mut agent = PathAgent::new(&config(&[0, 1, 2]), &[remote(1, 0)], 7, t0);
        let mut now = t0;
        for step in 0..2_000u32 {
            let Some(t) = agent.poll_timeout() else {
                panic!("an agent with uplinks up always has a timer")
            };
            assert!(t >= now);
            now = t;
            agent.handle_timeout(now);
            // Answer only uplink 2, and only on even steps: a lossy mess, never a busy loop.
            while let Some(tx) = agent.poll_transmit() {
                if tx.path.uplink == UplinkId(2) && step % 2 == 0 {
                    let _ = agent.handle_probe_reply(tx.path, tx.nonce, now + ms(5));
                }
            }
            assert!(agent.poll_timeout().is_none_or(|t| t > now));
        }
        assert!(
            now - t0 > Duration::from_secs(60),
            "time advanced: {:?}",
            now - t0
        );
    }
}
