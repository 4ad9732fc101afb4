//! Per-path liveness state: health, probes in flight, silence clocks and distress deadlines.

use std::time::{Duration, Instant};

use super::config::{FailoverTiming, ProbeTiming};
use super::stats::{LossWindow, RttEstimator};
use super::PathId;

/// Probes remembered per path while waiting for their reply. A reply to an older probe than
/// this is ignored (and the probe counted lost): at the fast cadence that is 3.2 s of probes,
/// beyond any RTT we would still call healthy, even a loaded GEO link's.
const OUTSTANDING: usize = 16;

/// Unanswered probes (counting the one just answered) that mark an outage rather than random
/// loss and restart a path's fail-back hold. Three means two lost in a row: at Starlink's ~1 %
/// random loss that happens once in ten thousand probes, while any outage long enough to
/// matter (≥ ~400 ms at the fast cadence) produces it.
pub(super) const STREAK_RESTARTS_HOLD: u32 = 3;

/// An unanswered probe older than this is counted lost in the loss statistics.
const PROBE_LOSS_AGE: Duration = Duration::from_secs(5);

/// Cap on the RTT-derived stretch of timeouts, so a path with a pathological RTT estimate is
/// still declared dead in bounded time.
const MAX_RTO: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Health {
    /// Never answered a probe since it appeared or its link came up.
    Unproven,
    /// Answered a probe, no distress since `since`.
    Healthy { since: Instant },
    /// Declared in distress at `at`; only a new probe reply clears it.
    Failed { at: Instant },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Outstanding {
    pub(super) nonce: u64,
    pub(super) sent_at: Instant,
}

#[derive(Debug, Clone)]
pub(super) struct PathState {
    pub(super) id: PathId,
    pub(super) remote_priority: u8,
    pub(super) created: Instant,
    pub(super) health: Health,
    /// Last authenticated packet of any kind (data, keepalive, probe reply) on this path.
    pub(super) last_rx: Option<Instant>,
    /// First data or probe sent after `last_rx`: how long we have been waiting for the peer.
    pub(super) silent_since: Option<Instant>,
    pub(super) last_probe_at: Option<Instant>,
    /// Probes sent since the last probe reply, when the first was sent, and when the
    /// `distress_probes`-th was sent.
    pub(super) unanswered: u32,
    pub(super) first_unanswered_at: Option<Instant>,
    pub(super) nth_unanswered_at: Option<Instant>,
    pub(super) outstanding: [Option<Outstanding>; OUTSTANDING],
    pub(super) rtt: RttEstimator,
    pub(super) loss: LossWindow,
    pub(super) probes_sent: u64,
    pub(super) replies: u64,
    pub(super) last_reply: Option<Instant>,
    /// Since when this path has been better than the active path by the RTT margin.
    pub(super) better_since: Option<Instant>,
    /// Learned from the peer's authenticated traffic (a peer-reflexive address: the port its
    /// NAT gave it towards us), not listed in the netmap; kept across netmap updates.
    pub(super) learned: bool,
    /// Least spacing between probes the peer asked for on this path (its uplink is metered).
    pub(super) peer_pace: Duration,
}

impl PathState {
    pub(super) fn new(id: PathId, remote_priority: u8, now: Instant) -> Self {
        Self {
            id,
            remote_priority,
            created: now,
            health: Health::Unproven,
            last_rx: None,
            silent_since: None,
            last_probe_at: None,
            unanswered: 0,
            first_unanswered_at: None,
            nth_unanswered_at: None,
            outstanding: [None; OUTSTANDING],
            rtt: RttEstimator::default(),
            loss: LossWindow::default(),
            probes_sent: 0,
            replies: 0,
            last_reply: None,
            better_since: None,
            learned: false,
            peer_pace: Duration::ZERO,
        }
    }

    /// Forgets liveness evidence (link went down or came back); keeps RTT history and counters.
    pub(super) fn reset_liveness(&mut self, now: Instant) {
        self.created = now;
        self.health = Health::Unproven;
        self.silent_since = None;
        self.last_probe_at = None;
        self.clear_unanswered();
        self.better_since = None;
        // Probes in flight across a link change say nothing about the path's loss.
        self.outstanding = [None; OUTSTANDING];
    }

    /// Forgets the streak of unanswered probes (a reply, or fresh evidence from the peer).
    pub(super) fn clear_unanswered(&mut self) {
        self.unanswered = 0;
        self.first_unanswered_at = None;
        self.nth_unanswered_at = None;
    }

    /// The slot of the outstanding probe with this nonce.
    pub(super) fn outstanding_slot(&self, nonce: u64) -> Option<usize> {
        self.outstanding
            .iter()
            .position(|o| o.is_some_and(|o| o.nonce == nonce))
    }

    /// Drops the outstanding probe with this nonce without counting it lost; whether it was
    /// outstanding here.
    pub(super) fn forget_probe(&mut self, nonce: u64) -> bool {
        match self.outstanding_slot(nonce) {
            Some(slot) => {
                self.outstanding[slot] = None;
                true
            }
            None => false,
        }
    }

    pub(super) fn is_healthy(&self) -> bool {
        matches!(self.health, Health::Healthy { .. })
    }

    /// Bound on how long a reply may plausibly take on this path.
    pub(super) fn probe_timeout(&self, probe: &ProbeTiming) -> Duration {
        let rto = self.rtt.rto().unwrap_or(Duration::ZERO).min(MAX_RTO);
        probe.fast_interval.max(rto)
    }

    /// Inbound silence that counts as distress. Stretched to twice the smoothed RTT on
    /// long-RTT paths (GEO) so a reply still in flight is not mistaken for a dead path. Not
    /// stretched by the RTT *variation*: a Starlink spike inflates it for a minute and would
    /// slow detection of a real blackhole to seconds, while the spike itself never silences a
    /// path for the distress timeout.
    pub(super) fn silence_timeout(&self, failover: &FailoverTiming) -> Duration {
        let srtt = self.rtt.smoothed().unwrap_or(Duration::ZERO).min(MAX_RTO);
        failover.distress_timeout.max(srtt * 2)
    }

    /// Round-trip silence (probes unanswered although inbound data may flow) that counts as
    /// distress: twice the inbound timeout, and twice the RTO. Only one-way failures need
    /// this rule, and a bloated uplink queue delays probe replies without losing them, so it
    /// errs on the slow side.
    pub(super) fn round_trip_timeout(&self, failover: &FailoverTiming) -> Duration {
        let rto = self.rtt.rto().unwrap_or(Duration::ZERO).min(MAX_RTO);
        (failover.distress_timeout * 2).max(rto * 2)
    }

    /// When this path is declared in distress if nothing arrives before; `None` when it is
    /// not on its way to distress (or already failed).
    pub(super) fn distress_deadline(
        &self,
        failover: &FailoverTiming,
        probe: &ProbeTiming,
    ) -> Option<Instant> {
        if matches!(self.health, Health::Failed { .. })
            || self.unanswered < failover.distress_probes
        {
            return None;
        }
        let nth = self.nth_unanswered_at?;
        // Inbound silence while we wait: nothing authenticated at all; the last counted probe
        // had at least half a fast interval to come back.
        let silent = self
            .silent_since
            .map(|s| (s + self.silence_timeout(failover)).max(nth + probe.fast_interval / 2));
        // Round-trip silence: the last counted probe had a full probe timeout.
        let round_trip = self
            .first_unanswered_at
            .map(|f| (f + self.round_trip_timeout(failover)).max(nth + self.probe_timeout(probe)));
        match (silent, round_trip) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn expire_outstanding(&mut self, now: Instant) {
        for slot in &mut self.outstanding {
            if slot.is_some_and(|o| now.saturating_duration_since(o.sent_at) >= PROBE_LOSS_AGE) {
                *slot = None;
                self.loss.record(true);
            }
        }
    }

    pub(super) fn record_probe(&mut self, out: Outstanding, distress_probes: u32) {
        let now = out.sent_at;
        let slot = match self.outstanding.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                // Full: the oldest probe is given up on and counted lost.
                let oldest = self
                    .outstanding
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, o)| o.map(|o| o.sent_at))
                    .map_or(0, |(i, _)| i);
                self.loss.record(true);
                oldest
            }
        };
        self.outstanding[slot] = Some(out);
        self.probes_sent += 1;
        self.last_probe_at = Some(now);
        self.unanswered = self.unanswered.saturating_add(1);
        self.first_unanswered_at.get_or_insert(now);
        if self.unanswered == distress_probes {
            self.nth_unanswered_at = Some(now);
        }
        self.silent_since.get_or_insert(now);
    }
}
