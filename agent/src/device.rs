//! The data plane: one thread owns the TUN device, the UDP sockets, every peer's boringtun
//! [`Tunn`] and the allowed-IPs table, so nothing on the packet path takes a lock. It polls
//! (epoll) the TUN fd, the UDP sockets, a control eventfd (UAPI requests from the control
//! thread) and a signalfd, and ticks the WireGuard timers every [`TICK`]. Packet buffers are
//! owned by the device and reused; nothing on the steady-state path allocates or logs.

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
use skymesh_agent_core::key::Key;
use skymesh_agent_core::uapi::{errno, DeviceInfo, PeerChange, PeerInfo, SetRequest, Setting};

use crate::sys::{self, Epoll, EventFd, SignalFd, Tun};
use crate::uplink::Uplinks;

/// Timer resolution for `Tunn::update_timers` (boringtun's own device uses 250 ms; WireGuard's
/// shortest timer is the 5 s rekey timeout, so 100 ms keeps retransmits on time).
const TICK: Duration = Duration::from_millis(100);
/// Handshake messages per second before cookies are demanded. The device checks MAC1 on
/// initiations before the peer's `Tunn` checks again, so each initiation counts twice.
const HANDSHAKE_RATE_LIMIT: u64 = 2 * 100;
/// Largest datagram / IP packet handled (TUN MTU ≤ 65535).
const BUF_LEN: usize = 65_536;
/// Packets drained from one fd before going back to epoll, so one busy fd cannot starve others.
const BATCH: usize = 64;

const TOKEN_TUN: u64 = 0;
const TOKEN_CTL: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_UDP: u64 = 3; // + uplink index

/// A request from the control (UAPI) thread.
pub(crate) enum Command {
    /// `get=1`.
    Get(SyncSender<DeviceInfo>),
    /// `set=1`, answered with the errno (0 = applied).
    Set(SetRequest, SyncSender<i32>),
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
}

struct Peer {
    public_key: Key,
    preshared_key: Option<Key>,
    persistent_keepalive: u16,
    endpoint: Option<SocketAddr>,
    /// 24-bit index: boringtun puts it in the top bits of every session's receiver index.
    index: u32,
    /// `None` while the device has no private key.
    tunn: Option<Box<Tunn>>,
    tx_bytes: u64,
    rx_bytes: u64,
    last_handshake: Option<SystemTime>,
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
    rx_buf: Box<[u8]>,
    tx_buf: Box<[u8]>,
}

/// Handles the control thread uses to reach the data plane.
pub(crate) struct Control {
    pub(crate) wake: Arc<EventFd>,
}

impl Device {
    /// Creates TUN `iface` (MTU 1420, as wireguard-go) and binds a random UDP port. The
    /// shutdown signals must already be blocked ([`SignalFd::block_signals`]).
    pub(crate) fn new(iface: &str, ctl_rx: Receiver<Command>) -> anyhow::Result<(Device, Control)> {
        use anyhow::Context as _;
        let tun = Tun::create(iface).with_context(|| format!("creating TUN {iface}"))?;
        sys::set_mtu(iface, 1420).with_context(|| format!("setting MTU of {iface}"))?;
        let epoll = Epoll::new().context("epoll_create")?;
        let ctl = Arc::new(EventFd::new().context("eventfd")?);
        let signals = SignalFd::new().context("signalfd")?;
        let uplinks = Uplinks::bind(0, 0).context("binding UDP socket")?;
        epoll.add(tun.raw_fd(), TOKEN_TUN)?;
        epoll.add(ctl.raw_fd(), TOKEN_CTL)?;
        epoll.add(signals.raw_fd(), TOKEN_SIGNAL)?;
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
            let wait = next_tick.saturating_duration_since(Instant::now());
            let timeout = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX).max(1);
            let n = self.epoll.wait(&mut events, timeout)?;
            for ev in &events[..n] {
                match ev.u64 {
                    TOKEN_TUN => self
                        .handle_tun()
                        .map_err(|e| anyhow::anyhow!("TUN {} unusable: {e}", self.iface))?,
                    TOKEN_CTL => self.handle_control(),
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
            }
        }
    }

    // ---------------------------------------------------------------- packet path

    /// Reads and encapsulates up to [`BATCH`] packets. Err only when the TUN is unusable
    /// (deleted from outside): then the device stops, as wireguard-go does.
    fn handle_tun(&mut self) -> io::Result<()> {
        for _ in 0..BATCH {
            let n = match self.tun.read(&mut self.rx_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let pkt = &self.rx_buf[..n];
            let Some(dst) = Tunn::dst_address(pkt) else {
                self.drops.no_route += 1;
                continue;
            };
            let Some(slot) = self.allowed.lookup(dst) else {
                self.drops.no_route += 1;
                continue;
            };
            let Some(peer) = self.peers.get_mut(slot as usize).and_then(Option::as_mut) else {
                self.drops.no_route += 1;
                continue;
            };
            let Some(tunn) = peer.tunn.as_mut() else {
                self.drops.no_endpoint += 1;
                continue;
            };
            match tunn.encapsulate(pkt, &mut self.tx_buf) {
                TunnResult::WriteToNetwork(out) => match peer.endpoint {
                    Some(ep) => match self.uplinks.send(ep, out) {
                        Ok(sent) => peer.tx_bytes += sent as u64,
                        Err(_) => self.drops.io_errors += 1,
                    },
                    None => self.drops.no_endpoint += 1,
                },
                TunnResult::Err(_) => self.drops.rejected += 1,
                _ => {}
            }
        }
        Ok(())
    }

    fn handle_udp(&mut self, uplink: usize) {
        for _ in 0..BATCH {
            let (n, src) = match self.uplinks.recv(uplink, &mut self.rx_buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A pending socket error is consumed by the failing call; keep draining.
                Err(_) => {
                    self.drops.io_errors += 1;
                    continue;
                }
            };
            // IPv4-mapped sources cannot occur (v6 socket is V6ONLY), so `src` is canonical.
            self.handle_datagram(uplink, n, src);
        }
    }

    fn handle_datagram(&mut self, uplink: usize, n: usize, src: SocketAddr) {
        let datagram = &self.rx_buf[..n];
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
        let mut res = tunn.decapsulate(Some(src.ip()), datagram, &mut self.tx_buf);
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
                    if self.allowed.lookup_v4(from) == Some(slot as u32) {
                        if self.tun.write(pkt).is_err() {
                            self.drops.io_errors += 1;
                        }
                    } else {
                        self.drops.bad_source += 1;
                    }
                }
                TunnResult::WriteToTunnelV6(pkt, from) => {
                    authenticated = true;
                    if self.allowed.lookup_v6(from) == Some(slot as u32) {
                        if self.tun.write(pkt).is_err() {
                            self.drops.io_errors += 1;
                        }
                    } else {
                        self.drops.bad_source += 1;
                    }
                }
            }
            break;
        }
        if authenticated {
            peer.rx_bytes += n as u64;
            // Roaming: an authenticated message moves the endpoint (not a cookie reply, which
            // only proves the sender saw our MAC1).
            if !is_cookie && peer.endpoint != Some(src) {
                peer.endpoint = Some(src);
            }
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
                    if let Some(ep) = peer.endpoint {
                        match self.uplinks.send(ep, out) {
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
                Some(Uplinks::bind(p, new_mark).map_err(|e| {
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
            self.uplinks = u;
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
        }
        for slot in 0..self.peers.len() {
            self.rebuild_tunn(slot);
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
                        if change.endpoint.is_none() {
                            p.endpoint = None;
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
                    index,
                    tunn: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    last_handshake: None,
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
            peer.endpoint = Some(ep);
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
            match self.uplinks.send(ep, out) {
                Ok(sent) => peer.tx_bytes += sent as u64,
                Err(_) => self.drops.io_errors += 1,
            }
        }
    }
}
