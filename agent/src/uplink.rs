//! The device's UDP sockets, all on the listen port. Always one wildcard socket per address
//! family (`0.0.0.0:port`, `[::]:port`): stock WireGuard peers and peers without candidate
//! paths use them, so routing picks the way out exactly as before. With an uplink config
//! (issue 5), one more socket per uplink, bound to its interface (`SO_BINDTODEVICE`) and/or
//! source address; every socket then has `SO_REUSEADDR` so they can share the port, and the
//! kernel delivers a datagram to the socket bound to the device it arrived on. A datagram's
//! socket therefore tells which uplink it came in on, and sending through an uplink's socket
//! makes it leave through that uplink. One uplink may have neither interface nor source
//! address: it is the wildcard sockets themselves (routing decides), which is what `run` uses
//! when no uplink is declared, so every node gets path selection over its peers' candidates.

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};

use skymesh_agent_core::path::{UplinkConfig, UplinkId};
use skymesh_agent_core::relay;
use skymesh_proto::relay as frames;

use crate::sys;

struct Socket {
    sock: UdpSocket,
    v6: bool,
    uplink: Option<UplinkId>,
    /// `UDP_SEGMENT` works on this socket; cleared at its first EIO/EINVAL (no GSO on the
    /// route), after which batches go out with `sendmmsg`.
    gso: Cell<bool>,
}

impl Socket {
    fn new(sock: UdpSocket, v6: bool, uplink: Option<UplinkId>) -> Socket {
        // Best effort: without UDP_GRO every receive is one datagram, which is still correct.
        let _ = sys::enable_udp_gro(&sock);
        Socket {
            sock,
            v6,
            uplink,
            gso: Cell::new(true),
        }
    }

    /// Sends `buf` as datagrams of `seg` bytes (the last may be shorter).
    fn send_segments(&self, to: SocketAddr, buf: &[u8], seg: usize) -> io::Result<usize> {
        if buf.len() <= seg {
            return self.sock.send_to(buf, to);
        }
        if self.gso.get() {
            match u16::try_from(seg) {
                Ok(s) => match sys::send_gso(&self.sock, to, buf, s) {
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                        tracing::info!(error = %e, "UDP GSO refused; sending batches with sendmmsg");
                        self.gso.set(false);
                    }
                    r => return r,
                },
                Err(_) => self.gso.set(false),
            }
        }
        sys::send_mmsg(&self.sock, to, buf, seg)
    }
}

pub(crate) struct Uplinks {
    port: u16,
    sockets: Vec<Socket>,
    /// Socket indexes of each uplink (`[IPv4, IPv6]`), in [`UplinkId`] order. An uplink bound
    /// to a source address has a socket of that family only; one bound to an interface alone
    /// has both (IPv6 where the host has it), so its IPv6 paths leave through it too.
    by_uplink: Vec<[Option<usize>; 2]>,
    /// The uplink without interface or source address, if any: it owns the wildcard sockets.
    routed: Option<UplinkId>,
    /// The relay that sends to virtual relayed addresses go through (see
    /// `skymesh_agent_core::relay`), and the peers' public keys by device slot.
    relay: Option<SocketAddr>,
    relay_keys: Vec<Option<[u8; 32]>>,
    /// Where relayed datagrams are framed (allocated once, reused).
    relay_buf: std::cell::RefCell<Box<[u8]>>,
}

impl Uplinks {
    /// Binds `0.0.0.0:port` and `[::]:port` (IPv6 only if available); port 0 picks one port
    /// for both. With `uplinks`, also one socket per uplink on the same port.
    pub(crate) fn bind(port: u16, mark: u32, uplinks: &[UplinkConfig]) -> io::Result<Uplinks> {
        let reuse = !uplinks.is_empty();
        let v4 = sys::udp_socket_on(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            mark,
            None,
            reuse,
        )?;
        let port = v4.local_addr()?.port();
        let mut sockets = vec![Socket::new(v4, false, None)];
        match sys::udp_socket_on(
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            mark,
            None,
            reuse,
        ) {
            Ok(sock) => sockets.push(Socket::new(sock, true, None)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            // IPv6 may be disabled; the device then works over IPv4 only.
            Err(e) => tracing::warn!(error = %e, "no IPv6 UDP socket; IPv4 underlay only"),
        }
        let mut by_uplink = Vec::with_capacity(uplinks.len());
        let mut routed = None;
        for (i, u) in uplinks.iter().enumerate() {
            let err = |e: io::Error| {
                io::Error::new(
                    e.kind(),
                    format!("binding the socket of uplink {:?}: {e}", u.name),
                )
            };
            let id = u8::try_from(i).ok().map(UplinkId);
            let addrs: Vec<IpAddr> = match (u.source_address, &u.interface) {
                (Some(ip), _) => vec![ip],
                (None, Some(_)) => vec![
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                ],
                // Neither: the host's routing table picks the way out, through the wildcard
                // sockets (the uplink `run` uses when none is declared). Two such uplinks
                // could not be told apart.
                (None, None) if routed.is_none() => {
                    routed = id;
                    by_uplink.push([Some(0), (sockets.len() > 1).then_some(1)]);
                    continue;
                }
                (None, None) => {
                    return Err(err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "only one uplink may go without an interface or a source_address",
                    )))
                }
            };
            let mut slots = [None, None];
            for ip in addrs {
                let sock = match sys::udp_socket_on(
                    SocketAddr::new(ip, port),
                    mark,
                    u.interface.as_deref(),
                    true,
                ) {
                    Ok(s) => s,
                    // IPv6 disabled on the host: the interface's IPv4 socket alone.
                    Err(e) if ip.is_ipv6() && u.source_address.is_none() => {
                        tracing::warn!(uplink = %u.name, error = %e, "no IPv6 socket on this uplink");
                        continue;
                    }
                    Err(e) => return Err(err(e)),
                };
                slots[usize::from(ip.is_ipv6())] = Some(sockets.len());
                sockets.push(Socket::new(sock, ip.is_ipv6(), id));
            }
            by_uplink.push(slots);
        }
        Ok(Uplinks {
            port,
            sockets,
            by_uplink,
            routed,
            relay: None,
            relay_keys: Vec::new(),
            relay_buf: std::cell::RefCell::new(
                vec![0u8; 65_536 + frames::OVERHEAD].into_boxed_slice(),
            ),
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `(index, fd)` of every socket, for polling.
    pub(crate) fn fds(&self) -> impl Iterator<Item = (usize, RawFd)> + '_ {
        self.sockets
            .iter()
            .enumerate()
            .map(|(i, u)| (i, u.sock.as_raw_fd()))
    }

    pub(crate) fn set_mark(&self, mark: u32) -> io::Result<()> {
        self.sockets
            .iter()
            .try_for_each(|u| sys::set_mark(&u.sock, mark))
    }

    /// The uplink socket `i` belongs to (`None` for the wildcard sockets).
    #[inline]
    pub(crate) fn uplink_of(&self, i: usize) -> Option<UplinkId> {
        self.sockets.get(i).and_then(|s| s.uplink.or(self.routed))
    }

    /// Sets the relay that virtual relayed addresses go through (`None`: sends to them fail).
    pub(crate) fn set_relay(&mut self, relay: Option<SocketAddr>) {
        self.relay = relay;
    }

    /// The relay that relayed candidates go through now (set while it is bound).
    pub(crate) fn relay(&self) -> Option<SocketAddr> {
        self.relay
    }

    /// Takes over the relay and peer keys of the sockets these replace (a new listen port).
    pub(crate) fn adopt_relay(&mut self, old: Uplinks) {
        self.relay = old.relay;
        self.relay_keys = old.relay_keys;
    }

    /// Records the public key of the peer in `slot` (or forgets it), for relay framing.
    pub(crate) fn set_relay_key(&mut self, slot: usize, key: Option<[u8; 32]>) {
        if self.relay_keys.len() <= slot {
            self.relay_keys.resize(slot + 1, None);
        }
        self.relay_keys[slot] = key;
    }

    /// Where a datagram for `to` really goes: a virtual relayed address becomes the relay and
    /// the peer's key to frame it with; any other address is itself.
    #[inline]
    fn route(&self, to: SocketAddr) -> io::Result<(SocketAddr, Option<[u8; 32]>)> {
        let Some(slot) = relay::virtual_slot(to) else {
            return Ok((to, None));
        };
        match (self.relay, self.relay_keys.get(slot).copied().flatten()) {
            (Some(server), Some(key)) => Ok((server, Some(key))),
            _ => Err(io::ErrorKind::AddrNotAvailable.into()),
        }
    }

    /// Sends `buf` (datagrams of `seg` bytes) to `to` on `s`, each framed as a relay `SEND`
    /// to `key` when given.
    fn transmit(
        &self,
        s: &Socket,
        to: SocketAddr,
        key: Option<[u8; 32]>,
        buf: &[u8],
        seg: usize,
    ) -> io::Result<usize> {
        let Some(key) = key else {
            return s.send_segments(to, buf, seg);
        };
        let mut out = self.relay_buf.borrow_mut();
        frames::encode_send_header(&key, &mut out);
        let mut sent = 0;
        for d in buf.chunks(seg.max(1)) {
            let n = frames::OVERHEAD + d.len();
            out[frames::OVERHEAD..n].copy_from_slice(d);
            sent += s.sock.send_to(&out[..n], to)?;
        }
        Ok(sent)
    }

    /// Whether socket `i` is an IPv6 one.
    pub(crate) fn is_v6(&self, i: usize) -> bool {
        self.sockets.get(i).is_some_and(|s| s.v6)
    }

    /// `(index, is_ipv6)` of the sockets endpoint discovery asks from: every uplink's (the
    /// mapping a peer must use is the one of the socket WireGuard sends from).
    pub(crate) fn discovery_sockets(&self) -> Vec<(usize, bool)> {
        (0..self.sockets.len())
            .filter(|&i| self.uplink_of(i).is_some())
            .map(|i| (i, self.sockets[i].v6))
            .collect()
    }

    /// Receives on socket `i`: `(bytes, source, segment size)`, see [`sys::recv_gro`].
    #[inline]
    pub(crate) fn recv_gro(
        &self,
        i: usize,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, usize)> {
        match self.sockets.get(i) {
            Some(u) => sys::recv_gro(&u.sock, buf),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// The socket a peer's traffic leaves through: its uplink's (when of `to`'s family) or the
    /// wildcard socket of the family — the same choice as [`Uplinks::send_on`]/[`Uplinks::send`].
    fn socket_for(&self, via: Option<UplinkId>, to: SocketAddr) -> Option<&Socket> {
        if let Some(s) = via.and_then(|u| self.uplink_socket(u, to)) {
            return Some(s);
        }
        self.sockets
            .iter()
            .find(|u| u.uplink.is_none() && u.v6 == to.is_ipv6())
    }

    /// Sends `buf` (datagrams of `seg` bytes back to back, the last may be shorter) to `to`
    /// through the peer's socket with one GSO `sendmsg` (or `sendmmsg` where GSO is refused).
    /// At most 64 datagrams and 64 KiB per call.
    #[inline]
    pub(crate) fn send_segments(
        &self,
        via: Option<UplinkId>,
        to: SocketAddr,
        buf: &[u8],
        seg: usize,
    ) -> io::Result<usize> {
        let (to, key) = self.route(to)?;
        match self.socket_for(via, to) {
            Some(s) => self.transmit(s, to, key, buf, seg),
            None => Err(io::ErrorKind::AddrNotAvailable.into()),
        }
    }

    /// Whether UDP GSO still works on every socket (for the status report).
    pub(crate) fn gso(&self) -> bool {
        self.sockets.iter().all(|s| s.gso.get())
    }

    /// Sends through socket `i` (a reply on the socket the request came in on).
    #[inline]
    pub(crate) fn send_via(&self, i: usize, to: SocketAddr, buf: &[u8]) -> io::Result<usize> {
        let (real, key) = self.route(to)?;
        match self.sockets.get(i) {
            Some(u) if u.v6 == real.is_ipv6() => self.transmit(u, real, key, buf, buf.len()),
            _ => self.send(to, buf),
        }
    }

    /// The socket of `uplink` for `to`'s address family, if it has one.
    #[inline]
    fn uplink_socket(&self, uplink: UplinkId, to: SocketAddr) -> Option<&Socket> {
        let i = self.by_uplink.get(usize::from(uplink.0))?[usize::from(to.is_ipv6())]?;
        self.sockets.get(i)
    }

    /// Sends through the socket of `uplink` (of `to`'s family; the wildcard socket where the
    /// uplink has none, as for a path the path agent would not build).
    #[inline]
    pub(crate) fn send_on(
        &self,
        uplink: UplinkId,
        to: SocketAddr,
        buf: &[u8],
    ) -> io::Result<usize> {
        if usize::from(uplink.0) >= self.by_uplink.len() {
            return Err(io::ErrorKind::AddrNotAvailable.into());
        }
        let (real, key) = self.route(to)?;
        match self.uplink_socket(uplink, real) {
            Some(s) => self.transmit(s, real, key, buf, buf.len()),
            None => self.send(to, buf),
        }
    }

    /// Sends through the wildcard socket of `to`'s address family.
    #[inline]
    pub(crate) fn send(&self, to: SocketAddr, buf: &[u8]) -> io::Result<usize> {
        let (real, key) = self.route(to)?;
        match self
            .sockets
            .iter()
            .find(|u| u.uplink.is_none() && u.v6 == real.is_ipv6())
        {
            Some(u) => self.transmit(u, real, key, buf, buf.len()),
            None => Err(io::ErrorKind::AddrNotAvailable.into()),
        }
    }
}
