//! Carrier-aware path selection: which local uplink × remote endpoint carries traffic to a peer.
//!
//! # Model
//!
//! One [`PathAgent`] per remote peer. A *path* ([`PathId`]) is a local uplink ([`UplinkId`],
//! declared in the agent config, see [`UplinkConfig`]) paired with one of the peer's endpoints
//! ([`RemoteEndpoint`], from the netmap). The agent is a sans-IO state machine: it never reads
//! the clock, opens a socket or sleeps. The driver feeds it inputs with the current time and
//! drains its outputs:
//!
//! | input                                   | when                                              |
//! |-----------------------------------------|---------------------------------------------------|
//! | [`PathAgent::handle_link_event`]        | netlink says an uplink's link/address went up/down |
//! | [`PathAgent::handle_probe_reply`]       | WireGuard decrypted a probe reply on a path        |
//! | [`PathAgent::handle_authenticated_rx`]  | WireGuard decrypted data/keepalive on a path       |
//! | [`PathAgent::handle_peer_data`]         | the same, for data (a follower mirrors its path)   |
//! | [`PathAgent::handle_data_sent`]         | a data packet was sent to the peer                 |
//! | [`PathAgent::handle_timeout`]           | the instant from [`PathAgent::poll_timeout`] came  |
//! | [`PathAgent::set_remote_endpoints`]     | the netmap changed the peer's endpoints            |
//! | [`PathAgent::handle_path_notice`]       | WireGuard decrypted a path notice on a path        |
//! | [`PathAgent::handle_probe_pace`]        | a probe reply carried the peer's pace              |
//! | [`PathAgent::handle_probe_not_sent`]    | a probe could not be sent (no session, send error) |
//!
//! After every input the driver drains [`PathAgent::poll_transmit`] (probes to send),
//! [`PathAgent::poll_notice`] (path notices to send), [`PathAgent::poll_event`] (path changes
//! to apply) and re-arms its one timer to [`PathAgent::poll_timeout`]. The per-packet inputs (`handle_data_sent`,
//! `handle_authenticated_rx`, `handle_peer_data`) never allocate and can only move the timer
//! to at least a fast interval from now, so the packet loop may re-arm lazily; only
//! `handle_peer_data` on a [`Role::Follower`] can emit an event (drain `poll_event` after it).
//!
//! # Policy
//!
//! - **Ranking.** Paths are ranked by operator tier (local uplink `priority`, then the remote
//!   endpoint's priority; lower is preferred), then smoothed RTT (unmeasured = `Duration::MAX`).
//!   The score is a struct with derived `Ord`.
//! - **Demotion on link-down, at once.** A link-down event moves traffic in the same call, to
//!   the best proven path (or, with none proven, the best path on a link still up).
//! - **Demotion on distress.** A path is in distress when (a) nothing authenticated arrived on
//!   it for `distress_timeout` (700 ms by default) while we were waiting for the peer (data or
//!   probes sent since the last authenticated packet), or (b) its probes went unanswered for
//!   twice that long even though inbound data still flows (a one-way failure; slower, because
//!   a bloated queue delays replies without losing them); in both cases at least
//!   `distress_probes` (3) probes must have gone unanswered. On long-RTT paths (GEO) the
//!   timeouts stretch to twice the smoothed RTT (a) and twice the RTO (b). A distressed active
//!   path is replaced at once by the best proven path; if none is proven it is kept and every
//!   path is probed fast.
//! - **Promotion only on proof.** A path becomes healthy only when a probe reply with the
//!   nonce of a probe sent on that very path comes back on it. Inbound data proves only one
//!   direction, so it keeps an active path from looking silent but never promotes one.
//! - **Fail-back after a hold time.** A path in a better tier takes over only once it has been
//!   continuously healthy for `failback_hold` (30 s by default); inside a tier, a path must be
//!   faster by a margin for that long. Any distress or link-down restarts the hold.
//! - **Hysteresis.** Starlink's 15-s reconfiguration spikes (+140 ms, +75 ms) delay replies
//!   but never silence a path for 700 ms, and its handover loss bursts are shorter than that,
//!   so neither causes a switch; a flapping link never stays healthy for the hold time, so
//!   traffic does not flip back and forth.
//! - **Probe budget.** Backup paths, and round-trip checks on a healthy active path, cost one
//!   probe per `backup_interval` (1 s). The active path is probed fast (`fast_interval`,
//!   200 ms) only while it is suspect: traffic is pending and the peer has been silent for a
//!   fast interval. Any path whose probe is overdue is probed fast until answered or failed,
//!   so a lost probe is told from an outage within the distress timeout. Backups are probed
//!   fast while the active path has two unanswered probes, so the switch goes to a path proven
//!   moments ago. While no path is proven, every path is probed fast for 10 s, then at the
//!   backup cadence (an offline peer costs one probe per second per path).
//! - **Telling the peer.** Whenever this end moves traffic on its own (link-down, distress,
//!   recovery; for the chooser also fail-back and lower RTT) it sends a [`PathNotice`] on the
//!   new path, inside the WireGuard session, and a second copy a fast interval later. The
//!   peer, chooser or follower, moves to the path the notice arrived on at once
//!   ([`SwitchReason::PeerNotice`]) and, after a link-down or distress notice, marks the
//!   paths that shared the failed path's remote endpoint (for distress also its local
//!   uplink) failed, so it does not fail back before they are proven again. A cut seen by
//!   one end alone thus moves both ends within one one-way delay of the backup path, and a
//!   quiet pair (no data to follow) still fails back on both ends. Each notice carries the
//!   sender's epoch (random per agent) and a counter; the receiver ignores any notice not
//!   newer than the last it acted on, so a duplicate or a notice overtaken by a newer one on
//!   another path moves nothing. Authenticity comes from WireGuard, as for probes.
//! - **Dead paths back off.** A path that does not carry traffic and has gone
//!   [`BACKOFF_AFTER`] probes unanswered while another path works is probed after a quarter
//!   of the time it has been dead (at least the backup interval, at most [`MAX_BACKOFF`]):
//!   probe times grow geometrically, and a path that comes back is found within a quarter of
//!   its outage. A link or address event on its uplink, or any authenticated packet from the
//!   peer on the path, ends the back-off.
//! - **Metered uplinks keep a budget.** An uplink marked `metered` has a probe budget in
//!   bytes per hour and peer ([`UplinkConfig::probe_budget_bytes_per_hour`]). Backups on it
//!   are probed no more often than the *pace* that fits both ends' probe exchanges on its
//!   paths into the budget ([`PROBE_WIRE_BYTES`] per packet), and every reply to the peer's
//!   probes on such a path carries that pace ([`PathAgent::probe_pace`]), which the peer
//!   honours. Probing while a path is suspect (overdue replies, distress, search) is not
//!   paced: detection keeps its speed, and those bursts are a few probes per event. A metered
//!   uplink that carries the traffic is probed like any other.
//! - **Loss means loss.** A path's loss ratio counts only probes sent on it whose fate is
//!   known: probes the driver could not send, replies that came back on another path and
//!   probes in flight across a link change are left out.
//! - **Fail-back hold restarts on outages.** A reply that comes after two or more unanswered
//!   probes in a row marks an outage, not random loss: the path's hold restarts. A fail-back
//!   that would go to tier 1 while tier 0 becomes eligible within a quarter of the hold waits
//!   for tier 0, so recovery is one switch, not a staircase.
//!
//! With the defaults a silent blackhole under traffic is declared 700 ms after the peer fell
//! silent and traffic moves in the same step; the simulation tests and the `failover_sim`
//! example measure the distribution.
//!
//! # Driver contract: probes are authenticated
//!
//! Probes must never let an attacker move traffic. The driver therefore:
//!
//! 1. Sends each [`ProbeTransmit`] *inside the WireGuard session* of the peer: an inner
//!    IPv4/UDP datagram to port [`PROBE_UDP_PORT`], payload [`ProbeMessage::Request`] with the
//!    transmit's nonce, encrypted with the peer's current session and written to the uplink
//!    socket of `path.uplink`, addressed to `path.remote`. (The skymesh agent leaves the inner
//!    addresses at `0.0.0.0`: the receiver recognises probes by protocol, port and payload
//!    once WireGuard has authenticated the sender, so the addresses carry no meaning.) Without
//!    a session it starts a handshake on that path instead of queueing the probe: a probe
//!    flushed seconds later would yield a bogus RTT sample.
//! 2. On receipt of a decrypted probe request (before the TUN device), answers with
//!    [`ProbeMessage::Reply`] inside the same session, from the socket it arrived on, to the
//!    source address it came from. Probe packets must not update the peer's WireGuard endpoint
//!    (no roaming on probes): only the sender's path choice decides where data goes, so a probe
//!    on a backup path cannot drag the data path there.
//! 3. Calls [`PathAgent::handle_probe_reply`] only for replies that WireGuard authenticated,
//!    with the path they arrived on. The agent accepts a reply only if its nonce matches a
//!    probe still outstanding on that same path; anything else is returned as
//!    [`UnmatchedReply`] (count it, drop it) and changes nothing. It passes the reply's pace
//!    to [`PathAgent::handle_probe_pace`], and answers requests with the pace from
//!    [`PathAgent::probe_pace`] for the path they arrived on. Path notices
//!    ([`PathAgent::poll_notice`]) travel like probes, and only authenticated ones reach
//!    [`PathAgent::handle_path_notice`].
//! 4. Calls [`PathAgent::handle_peer_data`] for every data packet WireGuard authenticated,
//!    and [`PathAgent::handle_authenticated_rx`] for authenticated keepalives and probe
//!    requests; never for anything WireGuard did not authenticate.
//! 5. Seeds the agent's nonce source from the OS CSPRNG.
//!
//! Both ends agree on the path: one end of each pair is the [`Role::Chooser`], the other a
//! [`Role::Follower`] that sends over the path the chooser's data arrives on. The chooser in
//! turn follows a follower that left a path the chooser has not heard from for a fast
//! interval (see [`PathAgent::handle_peer_data`]), so a failure that only the follower can
//! see costs one detection, not two. Probes and
//! probe replies never go through [`PathAgent::handle_peer_data`], so a probe on a backup
//! path cannot drag the data path there.
//!
//! A stock WireGuard peer does not answer probes: the agent then sees only authenticated data,
//! never proves a path and keeps its first choice unless that uplink goes down, and standard
//! WireGuard roaming applies on the peer's side.

mod agent;
mod config;
mod probe;
mod state;
mod stats;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use agent::{PathAgent, BACKOFF_AFTER, MAX_BACKOFF, PROBE_WIRE_BYTES};
pub use config::{
    ConfigError, FailoverSettings, PathConfig, ProbeSettings, UplinkConfig, UplinkKind,
    ValidPathConfig, DEFAULT_PROBE_BUDGET_BYTES_PER_HOUR, MAX_UPLINKS,
};
pub use probe::{
    NoticeCause, PathNotice, ProbeDecodeError, ProbeMessage, PROBE_LEN, PROBE_UDP_PORT,
};

/// Index of a local uplink in the config's `uplinks` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UplinkId(pub u8);

/// One of the peer's endpoints, as distributed by the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteEndpoint {
    /// Underlay address and port.
    pub addr: SocketAddr,
    /// The peer's tier for the uplink behind this endpoint; lower is preferred.
    pub priority: u8,
}

/// A path: local uplink × remote endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathId {
    /// Local uplink (socket) the packets leave through.
    pub uplink: UplinkId,
    /// Peer endpoint they are addressed to.
    pub remote: SocketAddr,
}

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uplink#{}->{}", self.uplink.0, self.remote)
    }
}

/// Link state of an uplink as reported by netlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Carrier and address present.
    Up,
    /// Carrier lost or address removed.
    Down,
}

/// Identifies one probe (diagnostics; the reply is matched by nonce).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeId(pub u64);

/// A probe the driver must send (see the module documentation for how).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTransmit {
    /// Path to send it on.
    pub path: PathId,
    /// Probe number.
    pub probe_id: ProbeId,
    /// Nonce to carry in [`ProbeMessage::Request`]; the reply must echo it.
    pub nonce: u64,
}

/// A path notice the driver must send, like a probe, inside the peer's session on `path`
/// (payload [`ProbeMessage::Notice`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoticeTransmit {
    /// Path to send it on: the path this end moved to.
    pub path: PathId,
    /// The notice.
    pub notice: PathNotice,
}

/// Why a path notice was ignored. The driver counts these; none of them changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoticeRejected {
    /// The path is not one of this peer's paths.
    #[error("path notice on a path this peer does not have")]
    UnknownPath,
    /// The path's uplink is down.
    #[error("path notice on an uplink that is down")]
    LinkDown,
    /// Not newer than the last notice acted on (a duplicate, a replay or overtaken).
    #[error("path notice older than the last one acted on")]
    Stale,
}

/// Why traffic moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchReason {
    /// First choice after start.
    Initial,
    /// The active path's uplink went down.
    LinkDown,
    /// The active path stopped answering.
    Distress,
    /// Traffic resumes after every uplink was down.
    Recovered,
    /// A better-tier path was healthy for the hold time.
    Failback,
    /// A same-tier path was faster by the margin for the hold time.
    LowerRtt,
    /// The netmap removed the active path's endpoint.
    EndpointRemoved,
    /// A follower moved to the path the chooser's data arrived on.
    PeerChoice,
    /// The peer's [`PathNotice`] said it left the path; moved to the one the notice came on.
    PeerNotice,
}

impl SwitchReason {
    /// Stable snake_case name for status output and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchReason::Initial => "initial",
            SwitchReason::LinkDown => "link_down",
            SwitchReason::Distress => "distress",
            SwitchReason::Recovered => "recovered",
            SwitchReason::Failback => "failback",
            SwitchReason::LowerRtt => "lower_rtt",
            SwitchReason::EndpointRemoved => "endpoint_removed",
            SwitchReason::PeerChoice => "peer_choice",
            SwitchReason::PeerNotice => "peer_notice",
        }
    }

    /// Whether the switch left a path that had failed (as opposed to an optional upgrade).
    pub fn is_forced(self) -> bool {
        !matches!(self, SwitchReason::Failback | SwitchReason::LowerRtt)
    }
}

/// Which end of a peer pair picks the path. Both ends run a [`PathAgent`] (probes, stats,
/// link-down and distress reactions); exactly one of them chooses, so traffic in both
/// directions uses one path. Convention for the driver: the node whose WireGuard public key
/// sorts lower is the [`Role::Chooser`] for the pair, the other the [`Role::Follower`]; a
/// stock WireGuard peer follows by its own roaming, so towards it this end is the chooser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Ranks paths, fails over and fails back on its own.
    #[default]
    Chooser,
    /// Sends over the path the chooser's data arrives on ([`PathAgent::handle_peer_data`]);
    /// still moves at once on its own link-down or distress, never upgrades on its own.
    Follower,
}

/// Output of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathEvent {
    /// Traffic to the peer must now use `to` (`None`: no usable path, every uplink is down).
    PathChanged {
        /// Previous path.
        from: Option<PathId>,
        /// New path.
        to: Option<PathId>,
        /// Why.
        reason: SwitchReason,
    },
}

/// One past path change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchRecord {
    /// When it happened.
    pub at: Instant,
    /// Previous path.
    pub from: Option<PathId>,
    /// New path.
    pub to: Option<PathId>,
    /// Why.
    pub reason: SwitchReason,
}

/// Health of a path as shown in status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathHealth {
    /// Not yet answered a probe since it appeared or its link came up.
    Unproven,
    /// Answered a probe and not in distress since.
    Healthy,
    /// In distress; waiting for a probe reply.
    Failed,
    /// Its uplink is down.
    LinkDown,
}

/// Measurements of one path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathStats {
    /// Which path.
    pub path: PathId,
    /// Health.
    pub health: PathHealth,
    /// Whether it carries traffic.
    pub active: bool,
    /// Smoothed probe RTT (RFC 6298), `None` until measured.
    pub smoothed_rtt: Option<Duration>,
    /// RTT variation.
    pub rtt_var: Duration,
    /// Most recent RTT sample.
    pub latest_rtt: Option<Duration>,
    /// Fraction of the probes sent on this path in the last minute (at most the last 64)
    /// that were not answered on it; probes the driver could not send and replies that came
    /// back on another path are not counted.
    pub loss_ratio: f32,
    /// Probes sent on this path.
    pub probes_sent: u64,
    /// Matching replies received.
    pub replies_received: u64,
    /// Probes whose fate is known (answered, or unanswered for the loss timeout) in the loss
    /// window; `loss_ratio` is over these.
    pub loss_samples: u32,
    /// Consecutive unanswered probes; from [`BACKOFF_AFTER`] on, the
    /// path is probed with exponential back-off.
    pub unanswered: u32,
    /// When the next probe on this path is due, if any.
    pub next_probe: Option<Instant>,
    /// When the last reply arrived.
    pub last_reply: Option<Instant>,
}

/// Why a probe reply was ignored. The driver counts these; none of them changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UnmatchedReply {
    /// The path is not one of this peer's paths.
    #[error("probe reply on a path this peer does not have")]
    UnknownPath,
    /// The path's uplink is down.
    #[error("probe reply on an uplink that is down")]
    LinkDown,
    /// No probe with this nonce is outstanding on this path (forged, replayed, answered
    /// already, or sent on another path).
    #[error("probe reply matches no outstanding probe on this path")]
    UnknownNonce,
    /// The nonce belongs to a probe sent on another path: the reply proves neither path, and
    /// that probe leaves the loss statistics.
    #[error("probe reply came back on another path than its probe")]
    OtherPath,
}
