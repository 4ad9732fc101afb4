//! The device's UDP sockets. Today one per address family on the listen port ("wildcard
//! uplinks"); the failover work binds one per uplink interface. Replies leave through the
//! socket the request arrived on; other traffic takes the first socket of the endpoint's family.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};

use crate::sys;

struct Uplink {
    sock: UdpSocket,
    v6: bool,
}

pub(crate) struct Uplinks {
    port: u16,
    sockets: Vec<Uplink>,
}

impl Uplinks {
    /// Binds `0.0.0.0:port` and `[::]:port` (IPv6 only if available); port 0 picks one port
    /// for both.
    pub(crate) fn bind(port: u16, mark: u32) -> io::Result<Uplinks> {
        let v4 = sys::udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), mark)?;
        let port = v4.local_addr()?.port();
        let mut sockets = vec![Uplink {
            sock: v4,
            v6: false,
        }];
        match sys::udp_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), mark) {
            Ok(sock) => sockets.push(Uplink { sock, v6: true }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            // IPv6 may be disabled; the device then works over IPv4 only.
            Err(e) => tracing::warn!(error = %e, "no IPv6 UDP socket; IPv4 underlay only"),
        }
        Ok(Uplinks { port, sockets })
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

    /// Receives one datagram on uplink `i`.
    #[inline]
    pub(crate) fn recv(&self, i: usize, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self.sockets.get(i) {
            Some(u) => u.sock.recv_from(buf),
            // A stale event for a socket replaced by a listen-port change: nothing to read.
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Sends through uplink `i` (a reply on the uplink the request came in on).
    #[inline]
    pub(crate) fn send_via(&self, i: usize, to: SocketAddr, buf: &[u8]) -> io::Result<usize> {
        match self.sockets.get(i) {
            Some(u) if u.v6 == to.is_ipv6() => u.sock.send_to(buf, to),
            _ => self.send(to, buf),
        }
    }

    /// Sends through the first socket of `to`'s address family.
    #[inline]
    pub(crate) fn send(&self, to: SocketAddr, buf: &[u8]) -> io::Result<usize> {
        match self.sockets.iter().find(|u| u.v6 == to.is_ipv6()) {
            Some(u) => u.sock.send_to(buf, to),
            None => Err(io::ErrorKind::AddrNotAvailable.into()),
        }
    }
}
