//! The data plane: one thread owns the TUN device, the UDP sockets, every peer's boringtun
//! [`Tunn`] and the allowed-IPs table, so nothing on the packet path takes a lock. It polls
//! (epoll) the TUN fd, the UDP sockets, a control eventfd (UAPI requests from the control
//! thread) and a signalfd, and ticks the WireGuard timers every [`TICK`]. Packet buffers are
//! owned by the device and reused; nothing on the steady-state path allocates or logs.
//!
//! With an uplinks file (issue 5) the device also drives one sans-IO [`PathAgent`] per
//! skymesh-managed peer (see
//! `paths.rs`): one socket per uplink, netlink link events on the same epoll, probes inside
//! the peer's session, and the epoll timeout is the earlier of the WireGuard tick and the
//! agents' `poll_timeout`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use skymesh_agent_core::allowed_ips::AllowedIps;
use skymesh_agent_core::discovery::Discovery;
use skymesh_agent_core::key::Key;
use skymesh_agent_core::offload::{finish_checksum, Offload, VnetHdr, VNET_HDR_LEN};
use skymesh_agent_core::path::{
    LinkState, PathAgent, PathEvent, PathId, ProbeMessage, RemoteEndpoint, Role, UplinkId,
};
use skymesh_agent_core::relay::{self as relay_paths, RelayClient};
use skymesh_agent_core::uapi::{errno, DeviceInfo, PeerChange, PeerInfo, SetRequest, Setting};
use skymesh_proto::relay::{self as relay_frames, Frame};
use skymesh_proto::stun;

use crate::fastpath::{FastStats, RxBatch, TxBufs, GSO_MAX_BYTES, GSO_MAX_SEGS, MAX_SEGS};
use crate::netlink::{self, LinkChange, LinkMonitor};
use crate::paths::{self, FailoverSetup, PeerPaths, StatusReport, PROBE_PACKET_LEN};
use crate::sys::{self, Epoll, EventFd, SignalFd, Tun, TunOffload};
use crate::uplink::Uplinks;

/// Timer resolution for `Tunn::update_timers` (boringtun's own device uses 250 ms; WireGuard's
/// shortest timer is the 5 s rekey timeout, so 100 ms keeps retransmits on time).
const TICK: Duration = Duration::from_millis(100);
/// Handshake messages per second before cookies are demanded. The device checks MAC1 on
/// initiations before the peer's `Tunn` checks again, so each initiation counts twice.
const HANDSHAKE_RATE_LIMIT: u64 = 2 * 100;
/// Largest datagram / IP packet handled (TUN MTU ≤ 65535), and the most a `UDP_GRO` receive
/// returns.
const BUF_LEN: usize = 65_536;
/// Reads drained from one fd before going back to epoll, so one busy fd cannot starve others
/// (each read may be a 64 KiB super-packet or a GRO batch of datagrams).
const BATCH: usize = 64;
/// WireGuard message type of transport data.
const MSG_DATA: u8 = 4;
/// Set to `1` to run without TUN offloads (for measurements and old kernels).
const NO_OFFLOAD_ENV: &str = "SKYMESH_NO_OFFLOAD";

const TOKEN_TUN: u64 = 0;
const TOKEN_CTL: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_NETLINK: u64 = 3;
const TOKEN_UDP: u64 = 4; // + socket index

/// A request from the control (UAPI) thread.
pub(crate) enum Command {
    /// `get=1`.
    Get(SyncSender<DeviceInfo>),
    /// `set=1`, answered with the errno (0 = applied).
    Set(SetRequest, SyncSender<i32>),
    /// Candidate endpoints of a skymesh peer (from the netmap or the uplinks file). Kept for
    /// a peer added later; an empty list makes the peer unmanaged again (standard roaming).
    /// Answered with 0, or `errno::INVALID` without an uplinks config (then the first
    /// endpoint becomes the peer's endpoint if it has none, and nothing else changes).
    SetPeerPaths {
        /// The peer's public key.
        key: Key,
        /// Its endpoints; the tier is the peer's priority for the uplink behind each.
        endpoints: Vec<RemoteEndpoint>,
        /// Errno (0 = applied).
        reply: SyncSender<i32>,
    },
    /// Path and uplink status for `skymesh-agent status` and metrics.
    Status(SyncSender<StatusReport>),
    /// The STUN reflectors endpoint discovery asks (an empty list stops it).
    SetStunServers(Vec<SocketAddr>),
    /// The relay and this node's token for it (`None`: no relay).
    SetRelay(Option<(SocketAddr, [u8; relay_frames::TOKEN_LEN])>),
}

/// Counters of dropped input, kept per device; logged at shutdown and on demand.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DropCounters {
    /// Datagrams that are not WireGuard messages.
    pub(crate) malformed: u64,
    /// Handshake initiations with a bad MAC1 or from unknown keys.
    pub(crate) bad_handshake: u64,
    /// Messages for an unknown receiver index.
    pub(crate) unknown_index: u64,
    /// Messages that failed in boringtun (decryption, replay, expired session).
    pub(crate) rejected: u64,
    /// Decrypted packets whose source address is not an allowed IP of the sending peer.
    pub(crate) bad_source: u64,
    /// TUN packets with no matching allowed IP.
    pub(crate) no_route: u64,
    /// TUN packets for a peer without endpoint or session key.
    pub(crate) no_endpoint: u64,
    /// Cookie replies sent because of load.
    pub(crate) cookies_sent: u64,
    /// Send or TUN write failures.
    pub(crate) io_errors: u64,
    /// Authenticated probe replies that matched no outstanding probe on their path.
    pub(crate) probe_unmatched: u64,
    /// Authenticated path notices not acted on (duplicate, overtaken, on a link that is down).
    pub(crate) notice_ignored: u64,
    /// Probes not sent: no session yet (a handshake went instead) or the socket refused them.
    pub(crate) probes_not_sent: u64,
    /// TUN frames with a bad virtio-net header or that cannot be segmented.
    pub(crate) bad_tun_frame: u64,
}

struct Peer {
    public_key: Key,
    preshared_key: Option<Key>,
    persistent_keepalive: u16,
    endpoint: Option<SocketAddr>,
    /// The uplink socket the endpoint is reached through (`None`: the wildcard socket).
    via: Option<UplinkId>,
    /// Failover state of a skymesh-managed peer (`None`: standard roaming).
    paths: Option<Box<PeerPaths>>,
    /// 24-bit index: boringtun puts it in the top bits of every session's receiver index.
    index: u32,
    /// `None` while the device has no private key.
    tunn: Option<Box<Tunn>>,
    tx_bytes: u64,
    rx_bytes: u64,
    last_handshake: Option<SystemTime>,
    /// The handshake initiation in flight, while there is no session: path probing sends
    /// this same message on every candidate path (see `drive_peer`).
    init: Option<Initiation>,
}

/// A handshake initiation as sent, and when it was made.
#[derive(Clone, Copy)]
struct Initiation {
    msg: [u8; INIT_LEN],
    at: Instant,
}

/// Size of a WireGuard handshake initiation.
const INIT_LEN: usize = 148;
/// WireGuard's REKEY_TIMEOUT: an initiation unanswered this long is replaced by a new one.
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// With several uplinks, how long a new initiation goes only to the path it was made for (the
/// agent's first choice) before copies go to the other probed paths. Longer than the 700 ms
/// distress timeout: a pair whose first choice works settles there exactly as without copies
/// (with 250 ms, the failover tests' pairs sometimes settled on the backup uplink). A node with
/// one uplink (the default) copies at once.
const INIT_FANOUT: Duration = Duration::from_millis(1000);

impl Initiation {
    /// Keeps `out` if it is a handshake initiation.
    fn capture(out: &[u8], at: Instant) -> Option<Initiation> {
        let msg: [u8; INIT_LEN] = out.try_into().ok()?;
        (msg[0] == 1).then_some(Initiation { msg, at })
    }
}

struct LocalKey {
    key: Key,
    secret: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
}

/// The data-plane state; see the module doc.
pub(crate) struct Device {
    iface: String,
    tun: Tun,
    epoll: Epoll,
    ctl: Arc<EventFd>,
    ctl_rx: Receiver<Command>,
    signals: SignalFd,
    uplinks: Uplinks,
    fwmark: u32,
    local: Option<LocalKey>,
    peers: Vec<Option<Peer>>,
    free_slots: Vec<usize>,
    by_key: HashMap<Key, usize>,
    by_index: HashMap<u32, usize>,
    allowed: AllowedIps<u32>,
    drops: DropCounters,
    /// UDP receive buffer (one datagram, or a GRO batch of them).
    rx_buf: Box<[u8]>,
    /// Control-path messages (handshakes, probes, cookie replies, keepalives).
    tx_buf: Box<[u8]>,
    offload: TunOffload,
    txb: TxBufs,
    rxb: RxBatch,
    fast: FastStats,
    /// Allocations this thread made while building status reports (excluded from the count
    /// the report shows).
    status_allocs: u64,
    failover: Option<Failover>,
    /// Reflexive address and NAT kind of every uplink socket (STUN on the WireGuard sockets).
    discovery: Discovery,
    /// Binding to the relay (the relay candidates go through is the uplinks', set while bound).
    relay: RelayClient,
}

/// Failover state shared by all managed peers.
struct Failover {
    setup: FailoverSetup,
    /// Candidate endpoints by peer key, including peers not (yet) configured.
    candidates: HashMap<Key, Vec<RemoteEndpoint>>,
    names: Vec<String>,
    /// Per uplink: the interface index (once known) and whether it is up.
    links: Vec<(Option<u32>, bool)>,
    monitor: LinkMonitor,
    /// When some agent's `poll_timeout` may be due (earliest known).
    deadline: Option<Instant>,
    min_fast: Duration,
    /// Per uplink: probe-protocol bytes (probes, replies, path notices) sent and received.
    probe_bytes: Vec<paths::ProbeBytes>,
}

/// Handles the control thread uses to reach the data plane.
pub(crate) struct Control {
    pub(crate) wake: Arc<EventFd>,
}

impl Device {
    /// Creates TUN `iface` (MTU 1420, as wireguard-go) and binds a random UDP port. The
    /// shutdown signals must already be blocked ([`SignalFd::block_signals`]).
    pub(crate) fn new(
        iface: &str,
        ctl_rx: Receiver<Command>,
        setup: Option<FailoverSetup>,
    ) -> anyhow::Result<(Device, Control)> {
        use anyhow::Context as _;
        let offload = std::env::var(NO_OFFLOAD_ENV).map_or(true, |v| v != "1");
        let (tun, offload) =
            Tun::create(iface, offload).with_context(|| format!("creating TUN {iface}"))?;
        tracing::info!(
            vnet_hdr = offload.vnet_hdr,
            tso = offload.tso,
            uso = offload.uso,
            "TUN offloads"
        );
        sys::set_mtu(iface, 1420).with_context(|| format!("setting MTU of {iface}"))?;
        let epoll = Epoll::new().context("epoll_create")?;
        let ctl = Arc::new(EventFd::new().context("eventfd")?);
        let signals = SignalFd::new().context("signalfd")?;
        let specs: Vec<_> = setup
            .as_ref()
            .map(|s| s.config.uplinks().cloned().collect())
            .unwrap_or_default();
        let uplinks = Uplinks::bind(0, 0, &specs).context("binding UDP sockets")?;
        let failover = match setup {
            Some(setup) => {
                let monitor = LinkMonitor::open().context("rtnetlink link monitor")?;
                epoll.add(monitor.raw_fd(), TOKEN_NETLINK)?;
                let links = specs
                    .iter()
                    .map(|u| match &u.interface {
                        Some(i) => (sys::if_index(i).ok(), netlink::link_running(i)),
                        None => (None, true),
                    })
                    .collect();
                Some(Failover {
                    candidates: setup.peers.clone(),
                    names: specs.iter().map(|u| u.name.clone()).collect(),
                    links,
                    monitor,
                    deadline: None,
                    min_fast: setup.min_fast_interval(),
                    probe_bytes: vec![paths::ProbeBytes::default(); specs.len()],
                    setup,
                })
            }
            None => None,
        };
        epoll.add(tun.raw_fd(), TOKEN_TUN)?;
        epoll.add(ctl.raw_fd(), TOKEN_CTL)?;
        epoll.add(signals.raw_fd(), TOKEN_SIGNAL)?;
        let discovery = Discovery::new(&uplinks.discovery_sockets(), nonce_seed());
        let relay = RelayClient::new(&uplinks.discovery_sockets(), [0; 32]);
        let dev = Device {
            iface: iface.to_owned(),
            tun,
            epoll,
            ctl: ctl.clone(),
            ctl_rx,
            signals,
            uplinks,
            fwmark: 0,
            local: None,
            peers: Vec::new(),
            free_slots: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            allowed: AllowedIps::new(),
            drops: DropCounters::default(),
            rx_buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            tx_buf: vec![0u8; BUF_LEN + 64].into_boxed_slice(),
            offload,
            txb: TxBufs::new(),
            rxb: RxBatch::new(offload.uso),
            fast: FastStats::default(),
            status_allocs: 0,
            discovery,
            relay,
            failover,
        };
        dev.register_uplinks()?;
        Ok((dev, Control { wake: ctl }))
    }

    fn register_uplinks(&self) -> io::Result<()> {
        for (i, fd) in self.uplinks.fds() {
            self.epoll.add(fd, TOKEN_UDP + i as u64)?;
        }
        Ok(())
    }

    /// Runs until SIGTERM/SIGINT. Returns the drop counters for the shutdown log.
    pub(crate) fn run(mut self) -> anyhow::Result<DropCounters> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        let mut next_tick = Instant::now() + TICK;
        tracing::info!(iface = %self.iface, port = self.uplinks.port(), "device running");
        loop {
            let now = Instant::now();
            if now >= next_tick {
                self.tick();
                next_tick = now + TICK;
            }
            self.drive_paths(now);
            self.drive_discovery(now);
            self.drive_relay(now);
            let wake = match self.failover.as_ref().and_then(|f| f.deadline) {
                Some(d) => d.min(next_tick),
                None => next_tick,
            };
            let wait = wake.saturating_duration_since(Instant::now());
            let timeout = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX).max(1);
            let n = self.epoll.wait(&mut events, timeout)?;
            for ev in &events[..n] {
                match ev.u64 {
                    TOKEN_TUN => self
                        .handle_tun()
                        .map_err(|e| anyhow::anyhow!("TUN {} unusable: {e}", self.iface))?,
                    TOKEN_CTL => self.handle_control(),
                    TOKEN_NETLINK => self.handle_netlink(),
                    TOKEN_SIGNAL => {
                        if let Some(sig) = self.signals.read() {
                            tracing::info!(signal = sig, "shutting down");
                            return Ok(self.drops);
                        }
                    }
                    t => self.handle_udp((t - TOKEN_UDP) as usize),
                }
            }
        }
    }

    fn handle_control(&mut self) {
        self.ctl.drain();
        while let Ok(cmd) = self.ctl_rx.try_recv() {
            match cmd {
                Command::Get(reply) => {
                    let _ = reply.send(self.info());
                }
                Command::Set(req, reply) => {
                    let code = match self.apply(req) {
                        Ok(()) => 0,
                        Err(code) => code,
                    };
                    let _ = reply.send(code);
                }
                Command::SetPeerPaths {
                    key,
                    endpoints,
                    reply,
                } => {
                    let _ = reply.send(self.set_peer_paths(key, endpoints));
                }
                Command::Status(reply) => {
                    let _ = reply.send(self.status());
                }
                Command::SetStunServers(servers) => {
                    self.discovery.set_servers(&servers, Instant::now());
                    self.drive_discovery(Instant::now());
                }
                Command::SetRelay(relay) => {
                    self.relay.configure(relay, Instant::now());
                    self.drive_relay(Instant::now());
                }
            }
        }
    }

    // ---------------------------------------------------------------- packet path

    /// Reads and encapsulates up to [`BATCH`] TUN frames. Err only when the TUN is unusable
    /// (deleted from outside): then the device stops, as wireguard-go does.
    fn handle_tun(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for _ in 0..BATCH {
            let n = match self.tun.read(&mut self.txb.frame) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.fast.tun_reads += 1;
            self.handle_tun_frame(n, now);
        }
        Ok(())
    }

    /// One TUN frame: split a super-packet into segments (or finish a partial checksum), look
    /// the peer up once, encrypt every segment into one buffer and send runs of equal-sized
    /// datagrams with one GSO `sendmsg` each through the peer's current socket.
    fn handle_tun_frame(&mut self, n: usize, now: Instant) {
        // The packets to encrypt: `frame[start..n]` alone, or `segs` segments of the arena.
        let (start, segs) = if self.offload.vnet_hdr {
            let frame = &mut self.txb.frame[..n];
            let job = VnetHdr::decode(frame).and_then(|h| h.classify(&frame[VNET_HDR_LEN..]));
            match job {
                Ok(Offload::None) => (VNET_HDR_LEN, 0),
                Ok(Offload::Checksum { start, offset }) => {
                    finish_checksum(&mut frame[VNET_HDR_LEN..], start, offset);
                    (VNET_HDR_LEN, 0)
                }
                Ok(Offload::Segment(plan)) if plan.segments() <= MAX_SEGS => {
                    match self.txb.split(n, &plan) {
                        Ok(k) => {
                            self.fast.tun_super += 1;
                            (0, k)
                        }
                        Err(_) => {
                            self.drops.bad_tun_frame += 1;
                            return;
                        }
                    }
                }
                Ok(Offload::Segment(_)) | Err(_) => {
                    self.drops.bad_tun_frame += 1;
                    return;
                }
            }
        } else {
            (0, 0)
        };
        let txb = &mut self.txb;
        let first = if segs == 0 {
            &txb.frame[start..n]
        } else {
            txb.segment(0)
        };
        let Some(dst) = Tunn::dst_address(first) else {
            self.drops.no_route += 1;
            return;
        };
        let Some(slot) = self.allowed.lookup(dst) else {
            self.drops.no_route += 1;
            return;
        };
        let Some(peer) = self.peers.get_mut(slot as usize).and_then(Option::as_mut) else {
            self.drops.no_route += 1;
            return;
        };
        let Some(tunn) = peer.tunn.as_mut() else {
            self.drops.no_endpoint += 1;
            return;
        };
        let mut tx = TxRun {
            uplinks: &self.uplinks,
            via: peer.via,
            ep: peer.endpoint,
            drops: &mut self.drops,
            fast: &mut self.fast,
            sent: 0,
            datagrams: 0,
        };
        // Pending run of equal-sized datagrams in `txb.out[run_start..off]`.
        let (mut off, mut run_start, mut run, mut size, mut closed) = (0, 0, 0, 0, false);
        for i in 0..segs.max(1) {
            let pt = if segs == 0 {
                &txb.frame[start..n]
            } else {
                let (o, l) = txb.segs[i];
                &txb.arena[o as usize..(o + l) as usize]
            };
            let (kind, len) = match tunn.encapsulate(pt, &mut txb.out[off..]) {
                TunnResult::WriteToNetwork(out) => (out[0], out.len()),
                TunnResult::Err(_) => {
                    tx.drops.rejected += 1;
                    continue;
                }
                // Queued until the handshake completes.
                _ => continue,
            };
            if kind != MSG_DATA {
                // No session yet: a handshake initiation, sent on its own after the run.
                tx.send(&txb.out[run_start..off], size, run);
                run = 0;
                tx.send(&txb.out[off..off + len], len, 1);
                continue;
            }
            // A run ends at a shorter datagram, at the kernel's segment limits, or before a
            // longer one.
            if run > 0
                && (closed
                    || len > size
                    || run == GSO_MAX_SEGS
                    || off + len - run_start > GSO_MAX_BYTES)
            {
                tx.send(&txb.out[run_start..off], size, run);
                run = 0;
            }
            if run == 0 {
                run_start = off;
                size = len;
            }
            closed = len < size;
            run += 1;
            off += len;
        }
        tx.send(&txb.out[run_start..off], size, run);
        peer.tx_bytes += tx.sent;
        if tx.datagrams > 0 {
            if let (Some(pp), Some(f)) = (peer.paths.as_mut(), self.failover.as_mut()) {
                pp.agent.handle_data_sent(now);
                // The agent may now want a probe a fast interval from now.
                let soon = now + f.min_fast;
                f.deadline = Some(f.deadline.map_or(soon, |d| d.min(soon)));
            }
        }
    }

    /// Receives up to [`BATCH`] times on socket `uplink` (each receive may be a `UDP_GRO`
    /// batch of one sender's datagrams), handles every datagram, then writes the decrypted
    /// packets to TUN coalesced.
    fn handle_udp(&mut self, uplink: usize) {
        // Taken out so that datagrams can borrow it while `self` handles them (an empty box
        // does not allocate).
        let mut buf = std::mem::take(&mut self.rx_buf);
        for _ in 0..BATCH {
            let (n, src, seg) = match self.uplinks.recv_gro(uplink, &mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A pending socket error is consumed by the failing call; keep draining.
                Err(_) => {
                    self.drops.io_errors += 1;
                    continue;
                }
            };
            self.fast.rx_recvs += 1;
            if n == 0 {
                self.drops.malformed += 1;
                continue;
            }
            // IPv4-mapped sources cannot occur (v6 socket is V6ONLY), so `src` is canonical.
            let seg = if seg == 0 { n } else { seg };
            for datagram in buf[..n].chunks(seg) {
                self.fast.rx_packets += 1;
                self.handle_datagram(uplink, datagram, src);
            }
        }
        self.rx_buf = buf;
        self.flush_rx();
    }

    /// Writes the decrypted packets waiting in the RX batch to TUN.
    fn flush_rx(&mut self) {
        let (writes, merged, errors) = self.rxb.flush(&self.tun, self.offload.vnet_hdr);
        self.fast.tun_writes += writes;
        self.fast.gro_merged += merged;
        self.drops.io_errors += errors;
    }

    fn handle_datagram(&mut self, uplink: usize, datagram: &[u8], src: SocketAddr) {
        let n = datagram.len();
        // Relay frames and STUN answers share the socket (one byte compare for transport data).
        if datagram.first() == Some(&relay_frames::MAGIC[0]) {
            self.handle_relay_frame(uplink, datagram, src);
            return;
        }
        if datagram.first() != Some(&MSG_DATA) && stun::is_stun(datagram) {
            if !self.discovery.handle_response(src, datagram) {
                self.drops.malformed += 1;
            }
            return;
        }
        let slot = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => {
                self.drops.malformed += 1;
                return;
            }
            Ok(Packet::HandshakeInit(p)) => {
                let Some(local) = self.local.as_ref() else {
                    self.drops.bad_handshake += 1;
                    return;
                };
                // MAC1 (and MAC2 under load) before the expensive DH of the anonymous parse.
                match local
                    .rate_limiter
                    .verify_packet(Some(src.ip()), datagram, &mut self.tx_buf)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        self.drops.cookies_sent += 1;
                        if self.uplinks.send_via(uplink, src, cookie).is_err() {
                            self.drops.io_errors += 1;
                        }
                        return;
                    }
                    Err(_) => {
                        self.drops.bad_handshake += 1;
                        return;
                    }
                }
                let Ok(half) = parse_handshake_anon(&local.secret, &local.public, &p) else {
                    self.drops.bad_handshake += 1;
                    return;
                };
                match self.by_key.get(&Key(half.peer_static_public)) {
                    Some(&slot) => slot,
                    None => {
                        self.drops.bad_handshake += 1;
                        return;
                    }
                }
            }
            Ok(Packet::HandshakeResponse(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&s) => s,
                None => {
                    self.drops.unknown_index += 1;
                    return;
                }
            },
            Ok(Packet::PacketCookieReply(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&s) => s,
                None => {
                    self.drops.unknown_index += 1;
                    return;
                }
            },
            Ok(Packet::PacketData(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&s) => s,
                None => {
                    self.drops.unknown_index += 1;
                    return;
                }
            },
        };
        let is_cookie = datagram[0] == 3;
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            self.drops.unknown_index += 1;
            return;
        };
        let Some(tunn) = peer.tunn.as_mut() else {
            self.drops.rejected += 1;
            return;
        };
        let mut authenticated = false;
        let mut data = false;
        let mut probe = None;
        if self.rxb.is_full() {
            let (writes, merged, errors) = self.rxb.flush(&self.tun, self.offload.vnet_hdr);
            self.fast.tun_writes += writes;
            self.fast.gro_merged += merged;
            self.drops.io_errors += errors;
        }
        // Decrypted into the RX batch; kept there (`keep`) only if it goes to TUN.
        let mut keep = None;
        let mut res = tunn.decapsulate(Some(src.ip()), datagram, self.rxb.next_buf());
        loop {
            match res {
                TunnResult::Done => authenticated = true,
                TunnResult::Err(WireGuardError::UnderLoad) => self.drops.cookies_sent += 1,
                TunnResult::Err(_) => self.drops.rejected += 1,
                TunnResult::WriteToNetwork(out) => {
                    authenticated = true;
                    match self.uplinks.send_via(uplink, src, out) {
                        Ok(sent) => peer.tx_bytes += sent as u64,
                        Err(_) => self.drops.io_errors += 1,
                    }
                    // Flush packets queued while the handshake was in flight.
                    res = tunn.decapsulate(None, &[], &mut self.tx_buf);
                    continue;
                }
                TunnResult::WriteToTunnelV4(pkt, from) => {
                    authenticated = true;
                    // Probes are answered or consumed here, before the source check and the
                    // TUN: WireGuard has authenticated the peer (see `paths.rs`).
                    if let Some(p) = paths::parse_probe(pkt) {
                        probe = Some(p);
                    } else if self.allowed.lookup_v4(from) == Some(slot as u32) {
                        data = true;
                        keep = Some(pkt.len());
                    } else {
                        self.drops.bad_source += 1;
                    }
                }
                TunnResult::WriteToTunnelV6(pkt, from) => {
                    authenticated = true;
                    if self.allowed.lookup_v6(from) == Some(slot as u32) {
                        data = true;
                        keep = Some(pkt.len());
                    } else {
                        self.drops.bad_source += 1;
                    }
                }
            }
            break;
        }
        if let Some(len) = keep {
            self.rxb.commit(len);
        }
        if !authenticated {
            return;
        }
        peer.rx_bytes += n as u64;
        let path = self.uplinks.uplink_of(uplink).map(|u| PathId {
            uplink: u,
            remote: src,
        });
        let mut drive = false;
        let mut pace = Duration::ZERO;
        if let (Some(_), Some(f), Some(u)) = (probe, self.failover.as_mut(), path) {
            f.probe_bytes[usize::from(u.uplink.0)].rx += n as u64;
        }
        match (peer.paths.as_mut(), path) {
            (Some(pp), Some(path)) => {
                let now = Instant::now();
                match probe {
                    Some(ProbeMessage::Reply { nonce, pace_secs }) => {
                        match pp.agent.handle_probe_reply(path, nonce, now) {
                            Ok(rtt) => {
                                tracing::trace!(%path, ?rtt, "probe reply");
                                drive = true;
                            }
                            Err(e) => {
                                tracing::trace!(%path, error = %e, "probe reply ignored");
                                pp.unmatched_replies += 1;
                                self.drops.probe_unmatched += 1;
                            }
                        }
                        pp.agent
                            .handle_probe_pace(path, Duration::from_secs(pace_secs.into()));
                    }
                    Some(ProbeMessage::Request { .. }) => {
                        pp.agent.handle_authenticated_rx(path, now);
                        pace = pp.agent.probe_pace(path);
                    }
                    Some(ProbeMessage::Notice(notice)) => {
                        match pp.agent.handle_path_notice(path, notice, now) {
                            Ok(()) => {
                                tracing::info!(%path, cause = notice.cause.as_str(), "path notice from peer");
                                drive = true;
                            }
                            Err(e) => {
                                tracing::debug!(%path, error = %e, "path notice ignored");
                                self.drops.notice_ignored += 1;
                            }
                        }
                    }
                    None if data => {
                        pp.agent.handle_peer_data(path, now);
                        // A follower moves to the chooser's path: apply it now.
                        drive = pp.agent.active_path() != pp.applied;
                    }
                    None => pp.agent.handle_authenticated_rx(path, now),
                }
            }
            (Some(_), None) => {}
            (None, _) => {
                // Roaming: an authenticated message moves the endpoint (not a cookie reply,
                // which only proves the sender saw our MAC1; not a probe, which must not move
                // traffic).
                if !is_cookie && probe.is_none() && peer.endpoint != Some(src) {
                    peer.endpoint = Some(src);
                    peer.via = None;
                }
            }
        }
        if let Some(reply) = probe.and_then(|p| p.reply(paths::pace_secs(pace))) {
            // Answer on the path it came in on, inside the same session.
            let mut inner = [0u8; PROBE_PACKET_LEN];
            paths::build_probe(reply, &mut inner);
            if let TunnResult::WriteToNetwork(out) = tunn.encapsulate(&inner, &mut self.tx_buf) {
                match self.uplinks.send_via(uplink, src, out) {
                    Ok(sent) => {
                        peer.tx_bytes += sent as u64;
                        if let (Some(f), Some(u)) = (self.failover.as_mut(), path) {
                            f.probe_bytes[usize::from(u.uplink.0)].tx += sent as u64;
                        }
                    }
                    Err(_) => self.drops.io_errors += 1,
                }
            }
        }
        if drive {
            self.drive_peer(slot);
        }
    }

    fn tick(&mut self) {
        if let Some(local) = &self.local {
            local.rate_limiter.reset_count();
        }
        let now = SystemTime::now();
        for peer in self.peers.iter_mut().flatten() {
            let Some(tunn) = peer.tunn.as_mut() else {
                continue;
            };
            // Remember the handshake time while a session exists: `wg show` must still report
            // it after the session has expired.
            if let Some(since) = tunn.time_since_last_handshake() {
                peer.last_handshake = now.checked_sub(since);
            }
            match tunn.update_timers(&mut self.tx_buf) {
                TunnResult::WriteToNetwork(out) => {
                    if let Some(i) = Initiation::capture(out, Instant::now()) {
                        peer.init = Some(i);
                    }
                    if let Some(ep) = peer.endpoint {
                        match send_to(&self.uplinks, peer.via, ep, out) {
                            Ok(sent) => peer.tx_bytes += sent as u64,
                            Err(_) => self.drops.io_errors += 1,
                        }
                    }
                }
                TunnResult::Err(_) | TunnResult::Done => {}
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
    }

    // ---------------------------------------------------------------- control path

    fn info(&mut self) -> DeviceInfo {
        let mut ips: HashMap<u32, Vec<ipnet::IpNet>> = HashMap::new();
        for (net, slot) in self.allowed.entries() {
            ips.entry(slot).or_default().push(net);
        }
        let now = SystemTime::now();
        let mut peers = Vec::with_capacity(self.by_key.len());
        for (slot, peer) in self.peers.iter_mut().enumerate() {
            let Some(peer) = peer else { continue };
            if let Some(since) = peer
                .tunn
                .as_ref()
                .and_then(|t| t.time_since_last_handshake())
            {
                peer.last_handshake = now.checked_sub(since);
            }
            let last = peer
                .last_handshake
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
            peers.push(PeerInfo {
                public_key: peer.public_key,
                preshared_key: peer.preshared_key,
                endpoint: peer.endpoint,
                last_handshake: last,
                tx_bytes: peer.tx_bytes,
                rx_bytes: peer.rx_bytes,
                persistent_keepalive: peer.persistent_keepalive,
                allowed_ips: ips.remove(&(slot as u32)).unwrap_or_default(),
            });
        }
        DeviceInfo {
            private_key: self.local.as_ref().map(|l| l.key),
            listen_port: self.uplinks.port(),
            fwmark: self.fwmark,
            peers,
        }
    }

    /// Applies a parsed request atomically: the only step that can fail (binding a new port)
    /// runs first, and nothing is changed if it fails.
    fn apply(&mut self, req: SetRequest) -> Result<(), i32> {
        let new_mark = match req.fwmark {
            Some(Setting::Set(m)) => m,
            Some(Setting::Clear) => 0,
            None => self.fwmark,
        };
        let new_uplinks = match req.listen_port {
            Some(p) if p == 0 || p != self.uplinks.port() => {
                let specs: Vec<_> = self
                    .failover
                    .as_ref()
                    .map(|f| f.setup.config.uplinks().cloned().collect())
                    .unwrap_or_default();
                Some(Uplinks::bind(p, new_mark, &specs).map_err(|e| {
                    tracing::warn!(port = p, error = %e, "cannot bind listen port");
                    if e.kind() == io::ErrorKind::AddrInUse {
                        errno::PORT_IN_USE
                    } else {
                        errno::IO
                    }
                })?)
            }
            _ => None,
        };
        if new_mark != self.fwmark && new_uplinks.is_none() {
            self.uplinks.set_mark(new_mark).map_err(|e| {
                tracing::warn!(error = %e, "cannot set fwmark");
                errno::IO
            })?;
        }
        // From here on nothing fails.
        self.fwmark = new_mark;
        if let Some(u) = new_uplinks {
            for (_, fd) in self.uplinks.fds() {
                let _ = self.epoll.delete(fd);
            }
            let old = std::mem::replace(&mut self.uplinks, u);
            self.uplinks.adopt_relay(old);
            if let Err(e) = self.register_uplinks() {
                tracing::error!(error = %e, "cannot poll new UDP sockets");
            }
            tracing::info!(port = self.uplinks.port(), "listening");
        }
        match req.private_key {
            Some(Setting::Set(k)) => self.set_private_key(Some(k)),
            Some(Setting::Clear) => self.set_private_key(None),
            None => {}
        }
        if req.replace_peers {
            let keep: Vec<Key> = req.peers.iter().map(|p| p.public_key).collect();
            let gone: Vec<Key> = self
                .by_key
                .keys()
                .filter(|k| !keep.contains(k))
                .copied()
                .collect();
            for k in gone {
                self.remove_peer(&k);
            }
        }
        let sections = req.peers.len();
        let mut seen = std::collections::HashSet::new();
        for change in req.peers {
            // Reset a kept peer to defaults only at its first section in this request.
            let reset = req.replace_peers && seen.insert(change.public_key);
            self.apply_peer(change, reset);
        }
        tracing::info!(
            sections,
            peers = self.by_key.len(),
            allowed_ips = self.allowed.len(),
            "configuration applied"
        );
        Ok(())
    }

    fn set_private_key(&mut self, key: Option<Key>) {
        if self.local.as_ref().map(|l| l.key) == key {
            return;
        }
        self.local = key.map(|k| {
            let secret = StaticSecret::from(k.0);
            let public = PublicKey::from(&secret);
            LocalKey {
                key: k,
                rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
                secret,
                public,
            }
        });
        // A peer with our own public key cannot be talked to; wireguard-go drops it.
        if let Some(own) = self.local.as_ref().map(|l| Key(l.public.to_bytes())) {
            self.remove_peer(&own);
            self.relay.set_key(own.0, Instant::now());
        }
        let now = Instant::now();
        for slot in 0..self.peers.len() {
            self.rebuild_tunn(slot);
            if let Some(peer) = self.peers[slot].as_mut() {
                if let Some(pp) = peer.paths.as_mut() {
                    pp.agent
                        .set_role(role_for(self.local.as_ref(), &peer.public_key), now);
                }
            }
        }
        tracing::info!(has_key = self.local.is_some(), "private key changed");
    }

    /// (Re)creates a peer's `Tunn` from its configuration, dropping its sessions.
    fn rebuild_tunn(&mut self, slot: usize) {
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        peer.tunn = self.local.as_ref().map(|l| {
            Box::new(Tunn::new(
                l.secret.clone(),
                PublicKey::from(peer.public_key.0),
                peer.preshared_key.map(|k| k.0),
                (peer.persistent_keepalive != 0).then_some(peer.persistent_keepalive),
                peer.index,
                Some(l.rate_limiter.clone()),
            ))
        });
    }

    fn fresh_index(&self) -> u32 {
        use rand_core::RngCore as _;
        loop {
            let mut b = [0u8; 4];
            // getrandom failing means the OS RNG is broken; index uniqueness is not a secret,
            // so falling back to a counter-like value is safe.
            if rand_core::OsRng.try_fill_bytes(&mut b).is_err() {
                b = (self.by_index.len() as u32 + 1).to_le_bytes();
            }
            let idx = u32::from_le_bytes(b) & 0x00ff_ffff;
            if !self.by_index.contains_key(&idx) {
                return idx;
            }
        }
    }

    fn remove_peer(&mut self, key: &Key) {
        let Some(slot) = self.by_key.remove(key) else {
            return;
        };
        if let Some(peer) = self.peers[slot].take() {
            self.by_index.remove(&peer.index);
        }
        self.allowed.retain(|_, s| *s as usize != slot);
        self.uplinks.set_relay_key(slot, None);
        self.free_slots.push(slot);
        tracing::debug!(peer = %key.to_base64(), "peer removed");
    }

    fn apply_peer(&mut self, change: PeerChange, reset: bool) {
        if let Some(own) = self.local.as_ref().map(|l| Key(l.public.to_bytes())) {
            if own == change.public_key {
                return;
            }
        }
        if change.remove {
            self.remove_peer(&change.public_key);
            return;
        }
        let slot = match self.by_key.get(&change.public_key) {
            Some(&slot) => {
                if reset {
                    // `replace_peers` means "exactly these peers with exactly these settings":
                    // fields the request leaves out go back to their defaults, but a peer whose
                    // keys do not change keeps its sessions.
                    if let Some(p) = self.peers[slot].as_mut() {
                        if change.preshared_key.is_none() && p.preshared_key.is_some() {
                            p.preshared_key = None;
                            p.tunn = None;
                        }
                        if change.persistent_keepalive.is_none() && p.persistent_keepalive != 0 {
                            p.persistent_keepalive = 0;
                            p.tunn = None;
                        }
                        if change.endpoint.is_none() && p.paths.is_none() {
                            p.endpoint = None;
                            p.via = None;
                        }
                    }
                    self.allowed.retain(|_, s| *s as usize != slot);
                }
                slot
            }
            None if change.update_only => return,
            None => {
                let index = self.fresh_index();
                let peer = Peer {
                    public_key: change.public_key,
                    preshared_key: None,
                    persistent_keepalive: 0,
                    endpoint: None,
                    via: None,
                    paths: None,
                    index,
                    tunn: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    last_handshake: None,
                    init: None,
                };
                let slot = match self.free_slots.pop() {
                    Some(s) => {
                        self.peers[s] = Some(peer);
                        s
                    }
                    None => {
                        self.peers.push(Some(peer));
                        self.peers.len() - 1
                    }
                };
                self.by_key.insert(change.public_key, slot);
                self.by_index.insert(index, slot);
                self.uplinks.set_relay_key(slot, Some(change.public_key.0));
                self.attach_paths(slot);
                tracing::debug!(peer = %change.public_key.to_base64(), "peer added");
                slot
            }
        };
        let Some(peer) = self.peers[slot].as_mut() else {
            return;
        };
        let mut rebuild = peer.tunn.is_none();
        if let Some(psk) = change.preshared_key {
            let psk = psk.into_option();
            if psk != peer.preshared_key {
                peer.preshared_key = psk;
                rebuild = true;
            }
        }
        let mut keepalive_on = false;
        if let Some(ka) = change.persistent_keepalive {
            if ka != peer.persistent_keepalive {
                peer.persistent_keepalive = ka;
                rebuild = true;
                keepalive_on = ka != 0;
            }
        }
        if let Some(ep) = change.endpoint {
            if peer.paths.is_none() {
                peer.endpoint = Some(ep);
                peer.via = None;
            } else {
                // A managed peer's endpoint follows its path agent.
                tracing::debug!(peer = %change.public_key.to_base64(), "endpoint of a managed peer ignored");
            }
        }
        if change.replace_allowed_ips {
            self.allowed.retain(|_, s| *s as usize != slot);
        }
        for net in change.allowed_ips {
            self.allowed.insert(net, slot as u32);
        }
        if rebuild {
            self.rebuild_tunn(slot);
        }
        // As wireguard-go: turning persistent keepalive on starts the session right away.
        if keepalive_on {
            self.kick(slot);
        }
    }

    // ---------------------------------------------------------------- failover

    /// Gives a peer its path agent if candidate endpoints are known for it.
    fn attach_paths(&mut self, slot: usize) {
        let Some(f) = self.failover.as_mut() else {
            return;
        };
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(eps) = f.candidates.get(&peer.public_key) else {
            return;
        };
        let now = Instant::now();
        let eps = Self::candidates_with_relay(self.uplinks.relay(), eps, slot);
        let mut agent = PathAgent::new(&f.setup.config, &eps, nonce_seed(), now);
        for (i, &(_, up)) in f.links.iter().enumerate() {
            if let (false, Ok(id)) = (up, u8::try_from(i)) {
                agent.handle_link_event(UplinkId(id), LinkState::Down, now);
            }
        }
        agent.set_role(role_for(self.local.as_ref(), &peer.public_key), now);
        tracing::info!(
            peer = %peer.public_key.to_base64(),
            role = ?agent.role(),
            paths = agent.path_stats().count(),
            "peer managed by failover"
        );
        peer.paths = Some(Box::new(PeerPaths {
            agent,
            applied: None,
            unmatched_replies: 0,
        }));
        self.drive_peer(slot);
    }

    /// Sets (or, with an empty list, clears) a peer's candidate endpoints.
    fn set_peer_paths(&mut self, key: Key, endpoints: Vec<RemoteEndpoint>) -> i32 {
        let slot = self.by_key.get(&key).copied();
        let Some(f) = self.failover.as_mut() else {
            // No uplinks config: one socket, standard WireGuard. The best endpoint becomes the
            // peer's endpoint if it has none; roaming does the rest.
            let best = endpoints.iter().min_by_key(|e| e.priority).map(|e| e.addr);
            if let Some(p) = slot.and_then(|s| self.peers[s].as_mut()) {
                if p.endpoint.is_none() {
                    p.endpoint = best;
                }
            }
            return 0;
        };
        let now = Instant::now();
        if endpoints.is_empty() {
            f.candidates.remove(&key);
            if let Some(p) = slot.and_then(|s| self.peers[s].as_mut()) {
                p.paths = None;
                p.via = None;
            }
            return 0;
        }
        f.candidates.insert(key, endpoints.clone());
        let Some(slot) = slot else { return 0 };
        let managed = match self.peers[slot].as_mut().and_then(|p| p.paths.as_mut()) {
            Some(pp) => {
                let eps = Self::candidates_with_relay(self.uplinks.relay(), &endpoints, slot);
                pp.agent.set_remote_endpoints(&eps, now);
                true
            }
            None => false,
        };
        if managed {
            self.drive_peer(slot);
        } else {
            self.attach_paths(slot);
        }
        0
    }

    /// Sends the STUN requests endpoint discovery has due (at most a few per socket per
    /// 20 s; checked on every wake-up, so within one WireGuard tick of being due).
    fn drive_discovery(&mut self, now: Instant) {
        if self.discovery.poll_timeout().is_none_or(|t| t > now) {
            return;
        }
        self.discovery.handle_timeout(now);
        while let Some(t) = self.discovery.poll_transmit(&mut self.tx_buf, now) {
            if self
                .uplinks
                .send_via(t.socket, t.to, &self.tx_buf[..t.len])
                .is_err()
            {
                self.drops.io_errors += 1;
            }
        }
    }

    /// Sends due relay `BIND`s and, when the relay became bound or unbound, gives every managed
    /// peer its relayed candidate or takes it away.
    fn drive_relay(&mut self, now: Instant) {
        if self.relay.poll_timeout().is_some_and(|t| t <= now) {
            while let Some(t) = self.relay.poll_transmit(&mut self.tx_buf, now) {
                if self
                    .uplinks
                    .send_via(t.socket, t.to, &self.tx_buf[..t.len])
                    .is_err()
                {
                    self.drops.io_errors += 1;
                }
            }
        }
        let bound = self.relay.bound_server(now);
        if bound != self.uplinks.relay() {
            tracing::info!(relay = ?bound, "relay binding changed");
            self.uplinks.set_relay(bound);
            self.refresh_relay_candidates(now);
        }
    }

    /// A relay frame from `src`: the relay's `BOUND`, or a peer's datagram it `DELIVER`s
    /// (handled as coming from the peer's virtual relayed address). Anything else, or anything
    /// not from the configured relay, is dropped.
    fn handle_relay_frame(&mut self, uplink: usize, datagram: &[u8], src: SocketAddr) {
        if Some(src) != self.relay.server() {
            self.drops.malformed += 1;
            return;
        }
        match relay_frames::parse(datagram) {
            Some(Frame::Bound { key }) => {
                self.relay.handle_bound(uplink, src, &key, Instant::now());
            }
            Some(Frame::Deliver { from, datagram }) if (1..=4).contains(&datagram[0]) => match self
                .by_key
                .get(&Key(from))
                .and_then(|&slot| relay_paths::virtual_addr(slot))
            {
                Some(virt) => self.handle_datagram(uplink, datagram, virt),
                None => self.drops.unknown_index += 1,
            },
            _ => self.drops.malformed += 1,
        }
    }

    /// A peer's candidates as its path agent gets them: the netmap's, plus the relayed path
    /// one tier below its worst one while the relay is bound.
    fn candidates_with_relay(
        relayed: Option<SocketAddr>,
        eps: &[RemoteEndpoint],
        slot: usize,
    ) -> Vec<RemoteEndpoint> {
        let mut out = eps.to_vec();
        if let (Some(_), Some(addr)) = (relayed, relay_paths::virtual_addr(slot)) {
            let worst = eps.iter().map(|e| e.priority).max().unwrap_or(0);
            out.push(RemoteEndpoint {
                addr,
                priority: worst.saturating_add(1),
            });
        }
        out
    }

    fn refresh_relay_candidates(&mut self, now: Instant) {
        let Some(f) = self.failover.as_ref() else {
            return;
        };
        let relayed = self.uplinks.relay();
        for slot in 0..self.peers.len() {
            let Some(peer) = self.peers[slot].as_mut() else {
                continue;
            };
            let (Some(pp), Some(eps)) = (peer.paths.as_mut(), f.candidates.get(&peer.public_key))
            else {
                continue;
            };
            pp.agent
                .set_remote_endpoints(&Self::candidates_with_relay(relayed, eps, slot), now);
        }
        for slot in 0..self.peers.len() {
            self.drive_peer(slot);
        }
    }

    /// Runs due path-agent timers (called from the event loop on every wake-up).
    fn drive_paths(&mut self, now: Instant) {
        let Some(f) = self.failover.as_mut() else {
            return;
        };
        if f.deadline.is_none_or(|d| d > now) {
            return;
        }
        f.deadline = None;
        for slot in 0..self.peers.len() {
            let Some(pp) = self.peers[slot].as_mut().and_then(|p| p.paths.as_mut()) else {
                continue;
            };
            if pp.agent.poll_timeout().is_some_and(|t| t <= now) {
                pp.agent.handle_timeout(now);
            }
            self.drive_peer(slot);
        }
    }

    /// Drains a peer's agent: sends its probes inside the peer's session on the probed path,
    /// applies path changes, and folds its next timeout into the device's.
    fn drive_peer(&mut self, slot: usize) {
        let Some(f) = self.failover.as_mut() else {
            return;
        };
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(pp) = peer.paths.as_mut() else {
            return;
        };
        let multi_uplink = f.links.len() > 1;
        while let Some(tx) = pp.agent.poll_transmit() {
            let Some(tunn) = peer.tunn.as_mut() else {
                pp.agent.handle_probe_not_sent(tx.path, tx.nonce);
                continue;
            };
            tracing::trace!(path = %tx.path, probe = tx.probe_id.0, "probe");
            let (out, is_probe) = if tunn.time_since_last_handshake().is_none() {
                // No session: the probe becomes a handshake initiation on the probed path. The
                // probe is not queued (boringtun would flush it once the session is up, and its
                // late reply would count as a huge RTT sample); the agent counts it as
                // unanswered. Every path gets the *same* initiation until REKEY_TIMEOUT (a
                // connectivity check, as ICE does): the first copy to reach the peer wins, it
                // drops the others as replays, and its answer comes back on a path that works.
                // Both ends doing this at once is what opens two NATs (hole punching).
                let now = Instant::now();
                let init = match peer
                    .init
                    .filter(|i| now.duration_since(i.at) < REKEY_TIMEOUT)
                {
                    // With several uplinks, the first path probed (the agent's first choice)
                    // has it alone for a while, so a pair with several working paths settles
                    // on its preferred uplink. With one uplink there is no such choice to
                    // protect: every candidate (private, reflexive, relayed) is checked at
                    // once, and the best proven one wins.
                    Some(i) if multi_uplink && now.duration_since(i.at) < INIT_FANOUT => {
                        TunnResult::Done
                    }
                    Some(i) => {
                        self.tx_buf[..INIT_LEN].copy_from_slice(&i.msg);
                        TunnResult::WriteToNetwork(&mut self.tx_buf[..INIT_LEN])
                    }
                    None => {
                        let r = tunn.format_handshake_initiation(&mut self.tx_buf, true);
                        if let TunnResult::WriteToNetwork(out) = &r {
                            peer.init = Initiation::capture(out, now);
                        }
                        r
                    }
                };
                (init, false)
            } else {
                let mut inner = [0u8; PROBE_PACKET_LEN];
                paths::build_probe(ProbeMessage::Request { nonce: tx.nonce }, &mut inner);
                (tunn.encapsulate(&inner, &mut self.tx_buf), true)
            };
            let sent = match out {
                // A session that expired makes boringtun queue the probe behind a handshake.
                TunnResult::WriteToNetwork(out) if is_probe && paths::is_transport_data(out) => {
                    send_probe_packet(&self.uplinks, tx.path, out, &mut f.probe_bytes)
                }
                TunnResult::WriteToNetwork(out) => {
                    let _ = send_probe_packet(&self.uplinks, tx.path, out, &mut f.probe_bytes);
                    None
                }
                _ => None,
            };
            match sent {
                Some(n) => peer.tx_bytes += n,
                None => {
                    self.drops.probes_not_sent += 1;
                    pp.agent.handle_probe_not_sent(tx.path, tx.nonce);
                }
            }
        }
        while let Some(n) = pp.agent.poll_notice() {
            let Some(tunn) = peer.tunn.as_mut() else {
                continue;
            };
            let mut inner = [0u8; PROBE_PACKET_LEN];
            paths::build_probe(ProbeMessage::Notice(n.notice), &mut inner);
            // Without a session there is nobody to tell; the probes start a handshake.
            if let TunnResult::WriteToNetwork(out) = tunn.encapsulate(&inner, &mut self.tx_buf) {
                if paths::is_transport_data(out) {
                    if let Some(sent) =
                        send_probe_packet(&self.uplinks, n.path, out, &mut f.probe_bytes)
                    {
                        peer.tx_bytes += sent;
                    }
                    tracing::info!(path = %describe(&f.names, Some(n.path)), cause = n.notice.cause.as_str(), "path notice sent");
                }
            }
        }
        while let Some(PathEvent::PathChanged { from, to, reason }) = pp.agent.poll_event() {
            if let Some(to) = to {
                peer.endpoint = Some(to.remote);
                peer.via = Some(to.uplink);
            }
            pp.applied = to;
            tracing::info!(
                peer = %peer.public_key.to_base64(),
                from = %describe(&f.names, from),
                to = %describe(&f.names, to),
                reason = reason.as_str(),
                switches = pp.agent.switch_count(),
                "path changed"
            );
        }
        if let Some(t) = pp.agent.poll_timeout() {
            f.deadline = Some(f.deadline.map_or(t, |d| d.min(t)));
        }
    }

    /// Netlink link/address notifications: uplinks going down or up.
    fn handle_netlink(&mut self) {
        let Some(f) = self.failover.as_mut() else {
            return;
        };
        let mut changes = Vec::new();
        if let Err(e) = f.monitor.drain(|c| changes.push(c)) {
            // Overrun: re-read the state of every interface uplink.
            tracing::warn!(error = %e, "netlink monitor overrun; re-reading link states");
            for u in f.setup.config.uplinks() {
                if let Some(name) = &u.interface {
                    changes.push(LinkChange::Link {
                        index: sys::if_index(name).unwrap_or(0),
                        name: name.clone(),
                        running: netlink::link_running(name),
                    });
                }
            }
        }
        if changes
            .iter()
            .any(|c| matches!(c, LinkChange::Address { .. }))
        {
            self.discovery.rediscover(Instant::now());
        }
        let mut events = Vec::new();
        for c in &changes {
            for (i, u) in f.setup.config.uplinks().enumerate() {
                let (idx, up) = &mut f.links[i];
                let now_up = match c {
                    LinkChange::Link {
                        index,
                        name,
                        running,
                    } if u.interface.as_deref() == Some(name.as_str()) => {
                        *idx = Some(*index);
                        *running
                    }
                    LinkChange::Removed { index } if *idx == Some(*index) => {
                        *idx = None;
                        false
                    }
                    LinkChange::Address { addr, added, .. } if u.source_address == Some(*addr) => {
                        *added
                    }
                    _ => continue,
                };
                if now_up != *up {
                    *up = now_up;
                    tracing::info!(uplink = %u.name, up = now_up, "uplink state changed");
                    if let Ok(id) = u8::try_from(i) {
                        let state = if now_up {
                            LinkState::Up
                        } else {
                            LinkState::Down
                        };
                        events.push((UplinkId(id), state));
                    }
                }
            }
        }
        if events.is_empty() {
            return;
        }
        let now = Instant::now();
        for slot in 0..self.peers.len() {
            let Some(pp) = self.peers[slot].as_mut().and_then(|p| p.paths.as_mut()) else {
                continue;
            };
            for &(id, state) in &events {
                pp.agent.handle_link_event(id, state, now);
            }
            self.drive_peer(slot);
        }
    }

    fn status(&mut self) -> StatusReport {
        let allocs_before = sys::thread_allocations();
        let now = Instant::now();
        let (uplinks, names) = match &self.failover {
            Some(f) => (
                f.setup
                    .config
                    .uplinks()
                    .zip(&f.links)
                    .zip(&f.probe_bytes)
                    .map(|((u, &(_, up)), b)| paths::UplinkStatus {
                        name: u.name.clone(),
                        kind: u.kind.as_str().to_owned(),
                        priority: u.priority,
                        interface: u.interface.clone(),
                        up,
                        metered: u.metered,
                        probe_tx_bytes: b.tx,
                        probe_rx_bytes: b.rx,
                    })
                    .collect(),
                f.names.as_slice(),
            ),
            None => (Vec::new(), &[][..]),
        };
        let peers = self
            .peers
            .iter()
            .flatten()
            .map(|p| {
                let mut st = paths::PeerStatus {
                    public_key: p.public_key.to_base64(),
                    endpoint: p.endpoint,
                    role: None,
                    active_uplink: None,
                    active_remote: None,
                    switch_count: 0,
                    last_switch_reason: None,
                    last_switch_secs_ago: None,
                    unmatched_probe_replies: 0,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    paths: Vec::new(),
                };
                if let Some(pp) = &p.paths {
                    let (active, switches, reason, ago, paths) =
                        paths::peer_path_status(pp, names, now);
                    st.role = Some(
                        match pp.agent.role() {
                            Role::Chooser => "chooser",
                            Role::Follower => "follower",
                        }
                        .to_owned(),
                    );
                    st.active_uplink = active;
                    st.active_remote = pp.agent.active_path().map(|a| a.remote);
                    st.switch_count = switches;
                    st.last_switch_reason = reason;
                    st.last_switch_secs_ago = ago;
                    st.unmatched_probe_replies = pp.unmatched_replies;
                    st.paths = paths;
                }
                st
            })
            .collect();
        let fast = self.fast;
        let dataplane = paths::DataplaneStatus {
            allocations: allocs_before.saturating_sub(self.status_allocs),
            tun_offload: self.offload.tso,
            tun_uso: self.offload.uso,
            udp_gso: self.uplinks.gso(),
            tun_reads: fast.tun_reads,
            tun_super_packets: fast.tun_super,
            tx_packets: fast.tx_packets,
            tx_sends: fast.tx_sends,
            rx_recvs: fast.rx_recvs,
            rx_packets: fast.rx_packets,
            tun_writes: fast.tun_writes,
            gro_merged: fast.gro_merged,
        };
        let discovery = self
            .discovery
            .mappings()
            .map(|m| paths::DiscoveryStatus {
                uplink: self
                    .uplinks
                    .uplink_of(m.socket)
                    .and_then(|u| names.get(usize::from(u.0)))
                    .cloned()
                    .unwrap_or_default(),
                ipv6: self.uplinks.is_v6(m.socket),
                reflexive: m.reflexive,
                nat: m.nat.as_str().to_owned(),
            })
            .collect();
        let report = StatusReport {
            iface: self.iface.clone(),
            listen_port: self.uplinks.port(),
            uplinks,
            peers,
            dataplane,
            discovery,
        };
        self.status_allocs += sys::thread_allocations() - allocs_before;
        report
    }

    /// Sends a handshake initiation to a peer with a known endpoint.
    fn kick(&mut self, slot: usize) {
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let (Some(ep), Some(tunn)) = (peer.endpoint, peer.tunn.as_mut()) else {
            return;
        };
        if let TunnResult::WriteToNetwork(out) =
            tunn.format_handshake_initiation(&mut self.tx_buf, false)
        {
            if let Some(i) = Initiation::capture(out, Instant::now()) {
                peer.init = Some(i);
            }
            match send_to(&self.uplinks, peer.via, ep, out) {
                Ok(sent) => peer.tx_bytes += sent as u64,
                Err(_) => self.drops.io_errors += 1,
            }
        }
    }
}

/// Sends the runs of datagrams of one TUN frame to one peer.
struct TxRun<'a> {
    uplinks: &'a Uplinks,
    via: Option<UplinkId>,
    ep: Option<SocketAddr>,
    drops: &'a mut DropCounters,
    fast: &'a mut FastStats,
    /// Bytes sent.
    sent: u64,
    /// Datagrams sent.
    datagrams: u64,
}

impl TxRun<'_> {
    /// Sends `count` datagrams of `size` bytes (the last may be shorter) laid end to end in
    /// `buf`; nothing when `count` is 0.
    #[inline]
    fn send(&mut self, buf: &[u8], size: usize, count: usize) {
        if count == 0 {
            return;
        }
        let Some(ep) = self.ep else {
            self.drops.no_endpoint += count as u64;
            return;
        };
        self.fast.tx_sends += 1;
        match self.uplinks.send_segments(self.via, ep, buf, size) {
            Ok(sent) => {
                self.sent += sent as u64;
                self.datagrams += count as u64;
                self.fast.tx_packets += count as u64;
            }
            Err(_) => self.drops.io_errors += 1,
        }
    }
}

/// Sends through the peer's uplink socket, or the wildcard socket of the family.
#[inline]
fn send_to(
    uplinks: &Uplinks,
    via: Option<UplinkId>,
    ep: SocketAddr,
    buf: &[u8],
) -> io::Result<usize> {
    match via {
        Some(u) => uplinks.send_on(u, ep, buf),
        None => uplinks.send(ep, buf),
    }
}

/// The end of a pair whose public key sorts lower chooses the path (see
/// [`Role`]); without a private key this end chooses.
fn role_for(local: Option<&LocalKey>, peer: &Key) -> Role {
    match local {
        Some(l) if l.public.as_bytes() > &peer.0 => Role::Follower,
        _ => Role::Chooser,
    }
}

/// A nonce seed from the OS CSPRNG (the driver contract of the path agent).
fn nonce_seed() -> u64 {
    use rand_core::RngCore as _;
    let mut b = [0u8; 8];
    // A broken OS RNG leaves the clock as seed: nonces must be unique, and authenticity comes
    // from WireGuard, not from the nonce.
    if rand_core::OsRng.try_fill_bytes(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = t.to_le_bytes();
    }
    u64::from_le_bytes(b)
}

/// Sends a probe-protocol datagram on `path` and counts its bytes on the uplink; the bytes
/// sent, `None` if the socket refused it.
fn send_probe_packet(
    uplinks: &Uplinks,
    path: PathId,
    out: &[u8],
    bytes: &mut [paths::ProbeBytes],
) -> Option<u64> {
    let sent = uplinks.send_on(path.uplink, path.remote, out).ok()? as u64;
    if let Some(b) = bytes.get_mut(usize::from(path.uplink.0)) {
        b.tx += sent;
    }
    Some(sent)
}

fn describe(names: &[String], p: Option<PathId>) -> String {
    match p {
        Some(p) => format!(
            "{}->{}",
            names
                .get(usize::from(p.uplink.0))
                .map_or("?", String::as_str),
            p.remote
        ),
        None => "none".to_owned(),
    }
}
