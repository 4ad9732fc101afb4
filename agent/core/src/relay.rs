//! Using a relay: keeping this node bound to it from every uplink socket, and the addresses
//! relayed paths go by.
//!
//! A relayed path to a peer is an ordinary candidate of the peer's path agent, one tier below
//! its worst direct one, with a *virtual* remote address in 240.0.0.0/16 (reserved, never a
//! real endpoint) that encodes the peer's slot in the device. The driver turns a send to such
//! an address into a relay `SEND` frame and a `DELIVER` from the relay into a datagram from
//! it, so path selection, probes, handshakes and roaming work on it unchanged.
//!
//! Binding: a `BIND` from each socket of the relay's address family, repeated every
//! [`REFRESH`] once answered (which also keeps the NAT mapping open), retried with back-off
//! ([`RETRY`] doubling to [`RETRY_MAX`]) while not; a socket unanswered for [`BOUND_FOR`]
//! counts as unbound. Sans-IO: time comes in, frames go out through
//! [`RelayClient::poll_transmit`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use skymesh_proto::relay::{self, TOKEN_LEN};

use crate::discovery::Transmit;

/// Time between two `BIND`s of a bound socket (below the common 30 s UDP NAT timeout).
pub const REFRESH: Duration = Duration::from_secs(20);
/// First retry of an unanswered `BIND`.
pub const RETRY: Duration = Duration::from_secs(1);
/// Longest retry interval.
pub const RETRY_MAX: Duration = Duration::from_secs(8);
/// A socket whose last `BOUND` is older than this is no longer bound (three refreshes lost).
pub const BOUND_FOR: Duration = Duration::from_secs(65);

/// Port of virtual relayed addresses (any fixed value: only the address carries the slot).
const VIRTUAL_PORT: u16 = 1;

/// The virtual remote address of the relayed path to the peer in device slot `slot`.
pub fn virtual_addr(slot: usize) -> Option<SocketAddr> {
    let s = u16::try_from(slot).ok()?;
    let [hi, lo] = s.to_be_bytes();
    Some(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(240, 0, hi, lo)),
        VIRTUAL_PORT,
    ))
}

/// The peer slot a virtual relayed address stands for (`None` for a real address).
#[inline]
pub fn virtual_slot(addr: SocketAddr) -> Option<usize> {
    match addr.ip() {
        IpAddr::V4(v4) if v4.octets()[..2] == [240, 0] => Some(usize::from(u16::from_be_bytes([
            v4.octets()[2],
            v4.octets()[3],
        ]))),
        _ => None,
    }
}

#[derive(Debug)]
struct Socket {
    index: usize,
    v6: bool,
    bound_at: Option<Instant>,
    next: Option<Instant>,
    retry: Duration,
}

/// Binding state towards one relay; see the module doc.
#[derive(Debug)]
pub struct RelayClient {
    server: Option<SocketAddr>,
    key: [u8; 32],
    token: [u8; TOKEN_LEN],
    sockets: Vec<Socket>,
}

impl RelayClient {
    /// `sockets`: `(index, is_ipv6)` of every uplink socket; `key`: this node's public key.
    pub fn new(sockets: &[(usize, bool)], key: [u8; 32]) -> RelayClient {
        RelayClient {
            server: None,
            key,
            token: [0; TOKEN_LEN],
            sockets: sockets
                .iter()
                .map(|&(index, v6)| Socket {
                    index,
                    v6,
                    bound_at: None,
                    next: None,
                    retry: RETRY,
                })
                .collect(),
        }
    }

    /// Sets (or with `None` clears) the relay and this node's token; binds at once.
    pub fn configure(&mut self, server: Option<(SocketAddr, [u8; TOKEN_LEN])>, now: Instant) {
        let (addr, token) = server.map_or((None, [0; TOKEN_LEN]), |(a, t)| (Some(a), t));
        if addr == self.server && token == self.token {
            return;
        }
        self.server = addr;
        self.token = token;
        for s in &mut self.sockets {
            s.bound_at = None;
            s.retry = RETRY;
            s.next = addr.filter(|a| a.is_ipv6() == s.v6).map(|_| now);
        }
    }

    /// This node's public key changed (key rotation): bind again under the new one.
    pub fn set_key(&mut self, key: [u8; 32], now: Instant) {
        if key != self.key {
            self.key = key;
            for s in self.sockets.iter_mut().filter(|s| s.next.is_some()) {
                s.bound_at = None;
                s.next = Some(now);
            }
        }
    }

    /// The relay, while at least one socket is bound to it.
    pub fn bound_server(&self, now: Instant) -> Option<SocketAddr> {
        self.server.filter(|_| {
            self.sockets.iter().any(|s| {
                s.bound_at
                    .is_some_and(|t| now.saturating_duration_since(t) < BOUND_FOR)
            })
        })
    }

    /// The configured relay (bound or not): frames from it are relay frames.
    pub fn server(&self) -> Option<SocketAddr> {
        self.server
    }

    /// When [`RelayClient::poll_transmit`] has something due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sockets.iter().filter_map(|s| s.next).min()
    }

    /// The next `BIND` due, written into `buf` (at least [`relay::BIND_LEN`] bytes).
    pub fn poll_transmit(&mut self, buf: &mut [u8], now: Instant) -> Option<Transmit> {
        let server = self.server?;
        let s = self
            .sockets
            .iter_mut()
            .find(|s| s.next.is_some_and(|t| t <= now))?;
        // Until answered, the next try backs off; an answer reschedules to REFRESH.
        s.next = Some(now + s.retry);
        s.retry = (s.retry * 2).min(RETRY_MAX);
        let len = relay::encode_bind(&self.key, &self.token, buf);
        Some(Transmit {
            socket: s.index,
            to: server,
            len,
        })
    }

    /// A `BOUND` for `key` arrived on socket `socket` from `from`: returns whether it was the
    /// relay's answer to us (anything else changes nothing).
    pub fn handle_bound(
        &mut self,
        socket: usize,
        from: SocketAddr,
        key: &[u8; 32],
        now: Instant,
    ) -> bool {
        if Some(from) != self.server || *key != self.key {
            return false;
        }
        let Some(s) = self.sockets.iter_mut().find(|s| s.index == socket) else {
            return false;
        };
        s.bound_at = Some(now);
        s.retry = RETRY;
        s.next = Some(now + REFRESH);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::relay::{parse, Frame};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn virtual_addresses_round_trip_and_real_ones_are_not_virtual() {
        for slot in [0usize, 1, 255, 256, 65_535] {
            let a = virtual_addr(slot).expect("fits");
            assert_eq!(virtual_slot(a), Some(slot));
        }
        assert_eq!(virtual_addr(65_536), None);
        assert_eq!(
            virtual_slot("198.18.0.1:51820".parse().expect("addr")),
            None
        );
        assert_eq!(virtual_slot("[fd00::1]:1".parse().expect("addr")), None);
    }

    #[test]
    fn binds_from_every_socket_of_the_relay_family_refreshes_and_backs_off() {
        let t0 = Instant::now();
        let relay_addr: SocketAddr = "198.18.0.2:3480".parse().expect("addr");
        let mut c = RelayClient::new(&[(0, false), (1, true), (2, false)], [5; 32]);
        assert_eq!(
            c.poll_timeout(),
            None,
            "nothing before a relay is configured"
        );
        c.configure(Some((relay_addr, [6; 16])), t0);
        let mut buf = [0u8; 64];
        let mut sent = Vec::new();
        while let Some(t) = c.poll_transmit(&mut buf, t0) {
            assert_eq!(t.to, relay_addr);
            assert_eq!(
                parse(&buf[..t.len]),
                Some(Frame::Bind {
                    key: [5; 32],
                    token: [6; 16]
                })
            );
            sent.push(t.socket);
        }
        assert_eq!(
            sent,
            vec![0, 2],
            "the IPv6 socket cannot reach an IPv4 relay"
        );
        assert_eq!(c.bound_server(t0), None);
        // Socket 0 is answered; socket 2 is not and backs off 1 s, 2 s, 4 s.
        assert!(c.handle_bound(0, relay_addr, &[5; 32], t0 + ms(10)));
        assert!(!c.handle_bound(0, "198.18.9.9:3480".parse().expect("a"), &[5; 32], t0));
        assert!(!c.handle_bound(0, relay_addr, &[7; 32], t0));
        assert_eq!(c.bound_server(t0 + ms(10)), Some(relay_addr));
        let mut retries = Vec::new();
        let mut now = t0;
        while now < t0 + Duration::from_secs(19) {
            while let Some(t) = c.poll_transmit(&mut buf, now) {
                assert_eq!(t.socket, 2, "the bound socket waits for its refresh");
                retries.push(now - t0);
            }
            now += ms(100);
        }
        assert_eq!(retries, vec![ms(1000), ms(3000), ms(7000), ms(15_000)]);
        // The bound socket refreshes after REFRESH; unanswered for BOUND_FOR, it is unbound.
        assert_eq!(c.bound_server(t0 + ms(10) + BOUND_FOR), None);
    }
}
