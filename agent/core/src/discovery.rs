//! Endpoint discovery: learns each WireGuard socket's server-reflexive address (what the
//! carrier's NAT turns it into) with STUN Binding requests sent from that same socket, and
//! tells an endpoint-independent mapping (any peer can reach the address a reflector saw:
//! hole punching works) from an endpoint-dependent one (every destination gets another port).
//!
//! Sans-IO: the driver hands in the sockets, the reflectors, time and the STUN datagrams that
//! arrive on the sockets; it sends what [`Discovery::poll_transmit`] writes. The model:
//!
//! - A *round* asks every reflector of the socket's family from every socket. Rounds repeat
//!   every [`ROUND_MIN`]–[`ROUND_MAX`] (random in between, so a fleet does not synchronise):
//!   below the 30 s UDP idle timeout common on carriers, so the round also keeps the NAT
//!   mapping the peers were told about alive. A netlink address event starts a round at once.
//! - A request unanswered after [`RTO`] is sent again, doubling, [`TRIES`] times in all
//!   (RFC 8489 §6.2.1, shortened: a round that fails is retried by the next one anyway).
//! - Two reflectors (the controller answers on two ports) that see the same address mean an
//!   endpoint-independent mapping; different addresses mean endpoint-dependent ("hard") NAT,
//!   whose reflexive address is useless to peers and is not announced.
//! - A socket whose whole round went unanswered forgets its mapping (the carrier moved it or
//!   the reflector is gone), so a stale address is not announced for ever.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use skymesh_proto::stun::{self, Message, TransactionId};

/// Shortest time between two rounds.
pub const ROUND_MIN: Duration = Duration::from_secs(20);
/// Longest time between two rounds (30 s is a common carrier UDP timeout; Starlink's is not
/// published).
pub const ROUND_MAX: Duration = Duration::from_secs(26);
/// First retransmission timeout of a request (RFC 8489's default RTO is 500 ms).
pub const RTO: Duration = Duration::from_millis(500);
/// Transmissions of one request before it counts as lost.
pub const TRIES: u8 = 3;
/// Most reflectors used (each costs one request per socket per round).
pub const MAX_SERVERS: usize = 4;

/// What a socket's mapping looks like from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NatKind {
    /// No reflector answered (yet), or only one did: the mapping's behaviour is unknown.
    #[default]
    Unknown,
    /// Every reflector saw the same address: peers can punch through to it.
    EndpointIndependent,
    /// Reflectors saw different addresses: a symmetric ("hard") NAT; only a relay helps.
    EndpointDependent,
}

impl NatKind {
    /// Stable name for reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NatKind::Unknown => "unknown",
            NatKind::EndpointIndependent => "endpoint-independent",
            NatKind::EndpointDependent => "endpoint-dependent",
        }
    }
}

/// A datagram to send: `len` bytes written into the caller's buffer, from socket `socket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub socket: usize,
    pub to: SocketAddr,
    pub len: usize,
}

/// What discovery knows about one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The driver's socket index.
    pub socket: usize,
    /// The reflexive address to announce: set only when the mapping is not known to be
    /// endpoint-dependent.
    pub reflexive: Option<SocketAddr>,
    pub nat: NatKind,
}

#[derive(Debug)]
struct Socket {
    index: usize,
    v6: bool,
    /// Per reflector (same order as `Discovery::servers`): the address it saw, this round.
    seen: Vec<Option<SocketAddr>>,
    mapping: Mapping,
}

#[derive(Debug)]
struct Request {
    socket: usize,
    server: usize,
    txid: TransactionId,
    tries: u8,
    due: Instant,
}

/// The discovery state of one device; see the module doc.
#[derive(Debug)]
pub struct Discovery {
    sockets: Vec<Socket>,
    servers: Vec<SocketAddr>,
    pending: Vec<Request>,
    next_round: Option<Instant>,
    /// xorshift64* state for transaction IDs and round jitter (seeded by the driver).
    rng: u64,
    /// Bumped whenever a socket's [`Mapping`] changes.
    generation: u64,
}

impl Discovery {
    /// `sockets`: `(index, is_ipv6)` of every socket to discover. `seed` must be random
    /// (transaction IDs are what ties a response to a request).
    pub fn new(sockets: &[(usize, bool)], seed: u64) -> Discovery {
        Discovery {
            sockets: sockets
                .iter()
                .map(|&(index, v6)| Socket {
                    index,
                    v6,
                    seen: Vec::new(),
                    mapping: Mapping {
                        socket: index,
                        reflexive: None,
                        nat: NatKind::Unknown,
                    },
                })
                .collect(),
            servers: Vec::new(),
            pending: Vec::new(),
            next_round: None,
            rng: seed | 1,
            generation: 0,
        }
    }

    /// Sets the reflectors (at most [`MAX_SERVERS`] are used). A changed list starts a round;
    /// an empty one stops discovery and forgets every mapping.
    pub fn set_servers(&mut self, servers: &[SocketAddr], now: Instant) {
        let servers: Vec<SocketAddr> = servers.iter().take(MAX_SERVERS).copied().collect();
        if servers == self.servers {
            return;
        }
        self.servers = servers;
        self.pending.clear();
        for s in &mut self.sockets {
            s.seen = vec![None; self.servers.len()];
        }
        if self.servers.is_empty() {
            self.next_round = None;
            for i in 0..self.sockets.len() {
                self.set_mapping(i, None, NatKind::Unknown);
            }
        } else {
            self.next_round = Some(now);
        }
    }

    /// Starts a round at once (an address or route changed under us).
    pub fn rediscover(&mut self, now: Instant) {
        if !self.servers.is_empty() {
            self.next_round = Some(now);
        }
    }

    /// When [`Discovery::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retransmit = self.pending.iter().map(|r| r.due).min();
        match (self.next_round, retransmit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts due rounds and marks due requests for (re)transmission.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_round.is_some_and(|t| t <= now) {
            self.start_round(now);
        }
        let mut lost = false;
        self.pending.retain(|r| {
            let keep = r.tries < TRIES || r.due > now;
            lost |= !keep;
            keep
        });
        if lost {
            self.settle_finished_sockets();
        }
    }

    /// The next request due: written into `buf` (at least [`stun::REQUEST_LEN`] bytes).
    pub fn poll_transmit(&mut self, buf: &mut [u8], now: Instant) -> Option<Transmit> {
        let r = self
            .pending
            .iter_mut()
            .find(|r| r.due <= now && r.tries < TRIES)?;
        r.tries += 1;
        r.due = now + RTO * (1u32 << (r.tries - 1));
        let len = stun::encode_request(&r.txid, buf);
        let socket = self.sockets[r.socket].index;
        Some(Transmit {
            socket,
            to: self.servers[r.server],
            len,
        })
    }

    /// A STUN datagram that arrived on socket `socket` from `from`. Returns whether it
    /// answered one of our requests (anything else is ignored and changes nothing).
    pub fn handle_response(&mut self, from: SocketAddr, datagram: &[u8]) -> bool {
        let Ok(Message::BindingResponse { txid, mapped }) = stun::decode(datagram) else {
            return false;
        };
        let Some(pos) = self
            .pending
            .iter()
            .position(|r| r.txid == txid && self.servers.get(r.server) == Some(&from))
        else {
            return false;
        };
        let r = self.pending.swap_remove(pos);
        let s = &mut self.sockets[r.socket];
        if let Some(slot) = s.seen.get_mut(r.server) {
            *slot = Some(mapped);
        }
        self.settle_finished_sockets();
        true
    }

    /// Every socket's current mapping.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.sockets.iter().map(|s| &s.mapping)
    }

    /// Changes whenever a mapping changes (for drivers that report only changes).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn start_round(&mut self, now: Instant) {
        self.pending.clear();
        for si in 0..self.sockets.len() {
            let v6 = self.sockets[si].v6;
            self.sockets[si].seen = vec![None; self.servers.len()];
            for vi in 0..self.servers.len() {
                if self.servers[vi].is_ipv6() != v6 {
                    continue;
                }
                let txid = self.txid();
                self.pending.push(Request {
                    socket: si,
                    server: vi,
                    txid,
                    tries: 0,
                    due: now,
                });
            }
        }
        let span = (ROUND_MAX - ROUND_MIN).as_millis() as u64;
        let jitter = Duration::from_millis(self.next_random() % (span + 1));
        self.next_round = Some(now + ROUND_MIN + jitter);
    }

    /// Concludes every socket with no request outstanding.
    fn settle_finished_sockets(&mut self) {
        for si in 0..self.sockets.len() {
            if self.pending.iter().any(|r| r.socket == si) {
                continue;
            }
            let s = &self.sockets[si];
            let seen: Vec<SocketAddr> = s.seen.iter().flatten().copied().collect();
            let (reflexive, nat) = match seen.as_slice() {
                // The whole round went unanswered (or the socket has no reflector of its
                // family): nothing is known any more.
                [] => (None, NatKind::Unknown),
                [one] => (Some(*one), NatKind::Unknown),
                [first, rest @ ..] if rest.iter().all(|a| a == first) => {
                    (Some(*first), NatKind::EndpointIndependent)
                }
                _ => (None, NatKind::EndpointDependent),
            };
            self.set_mapping(si, reflexive, nat);
        }
    }

    fn set_mapping(&mut self, si: usize, reflexive: Option<SocketAddr>, nat: NatKind) {
        let m = &mut self.sockets[si].mapping;
        if m.reflexive != reflexive || m.nat != nat {
            m.reflexive = reflexive;
            m.nat = nat;
            self.generation += 1;
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: statistically fine for IDs that only need to be unpredictable to a
        // blind off-path sender within one request's lifetime (seeded from the OS).
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn txid(&mut self) -> TransactionId {
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.next_random().to_le_bytes());
        t[8..].copy_from_slice(&self.next_random().to_le_bytes()[..4]);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::stun::{encode_response, MAX_RESPONSE_LEN};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    const S1: &str = "198.18.0.1:3478";
    const S2: &str = "198.18.0.1:3479";

    /// Drains every due request; `nat(server)` is the address that reflector sees (None: the
    /// request is lost). Returns how many requests went out.
    fn exchange(
        d: &mut Discovery,
        now: Instant,
        nat: impl Fn(SocketAddr) -> Option<SocketAddr>,
    ) -> usize {
        let mut buf = [0u8; MAX_RESPONSE_LEN];
        let mut sent = Vec::new();
        while let Some(t) = d.poll_transmit(&mut buf, now) {
            let Ok(Message::BindingRequest { txid }) = stun::decode(&buf[..t.len]) else {
                panic!("not a binding request");
            };
            sent.push((t, txid));
        }
        for (t, txid) in &sent {
            if let Some(seen) = nat(t.to) {
                let mut resp = [0u8; MAX_RESPONSE_LEN];
                let n = encode_response(txid, seen, &mut resp);
                assert!(d.handle_response(t.to, &resp[..n]));
            }
        }
        sent.len()
    }

    #[test]
    fn two_reflectors_seeing_one_address_mean_an_endpoint_independent_mapping() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[(0, false), (1, true)], 7);
        d.set_servers(&[addr(S1), addr(S2)], t0);
        d.handle_timeout(t0);
        // Only the IPv4 socket asks: there is no IPv6 reflector.
        assert_eq!(exchange(&mut d, t0, |_| Some(addr("198.18.5.9:40001"))), 2);
        let m: Vec<_> = d.mappings().cloned().collect();
        assert_eq!(m[0].reflexive, Some(addr("198.18.5.9:40001")));
        assert_eq!(m[0].nat, NatKind::EndpointIndependent);
        assert_eq!(m[1].reflexive, None);
    }

    #[test]
    fn reflectors_seeing_different_ports_mean_hard_nat_and_nothing_is_announced() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[(0, false)], 7);
        d.set_servers(&[addr(S1), addr(S2)], t0);
        d.handle_timeout(t0);
        exchange(&mut d, t0, |to| {
            Some(SocketAddr::new(
                "198.18.5.9".parse().expect("ip"),
                40000 + to.port() % 10,
            ))
        });
        let m = d.mappings().next().expect("socket").clone();
        assert_eq!(m.nat, NatKind::EndpointDependent);
        assert_eq!(m.reflexive, None);
    }

    #[test]
    fn lost_requests_are_retried_with_backoff_then_the_mapping_is_forgotten() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[(0, false)], 9);
        d.set_servers(&[addr(S1)], t0);
        d.handle_timeout(t0);
        assert_eq!(exchange(&mut d, t0, |_| Some(addr("198.18.5.9:1"))), 1);
        let g = d.generation();
        assert_eq!(
            d.mappings().next().and_then(|m| m.reflexive),
            Some(addr("198.18.5.9:1"))
        );
        // The next round is 20–26 s later.
        let next = d.poll_timeout().expect("next round");
        assert!(
            next >= t0 + ROUND_MIN && next <= t0 + ROUND_MAX,
            "{:?}",
            next - t0
        );
        // That round goes unanswered: sent at +0, +500 ms, +1.5 s, given up at +3.5 s.
        let mut now = next;
        let mut sends = Vec::new();
        while now < next + ms(5000) {
            d.handle_timeout(now);
            if exchange(&mut d, now, |_| None) > 0 {
                sends.push(now - next);
            }
            now += ms(50);
        }
        assert_eq!(sends, vec![ms(0), ms(500), ms(1500)]);
        assert_eq!(d.mappings().next().and_then(|m| m.reflexive), None);
        assert!(d.generation() > g);
    }

    #[test]
    fn responses_we_did_not_ask_for_change_nothing() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[(0, false)], 11);
        d.set_servers(&[addr(S1)], t0);
        d.handle_timeout(t0);
        let mut buf = [0u8; MAX_RESPONSE_LEN];
        let t = d.poll_transmit(&mut buf, t0).expect("request");
        let Ok(Message::BindingResponse { .. } | Message::BindingRequest { .. }) =
            stun::decode(&buf[..t.len])
        else {
            panic!("request");
        };
        // A forged response with another transaction ID, and a right one from a stranger.
        let n = encode_response(&[1; 12], addr("203.0.113.1:1"), &mut buf);
        assert!(!d.handle_response(addr(S1), &buf[..n]));
        assert!(!d.handle_response(addr("198.18.9.9:3478"), &buf[..n]));
        assert!(!d.handle_response(addr(S1), b"\x01\x01garbage"));
        assert_eq!(d.mappings().next().and_then(|m| m.reflexive), None);
        assert_eq!(d.generation(), 0);
    }

    #[test]
    fn an_address_event_starts_a_round_at_once() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[(0, false)], 13);
        d.set_servers(&[addr(S1)], t0);
        d.handle_timeout(t0);
        exchange(&mut d, t0, |_| Some(addr("198.18.5.9:1")));
        d.rediscover(t0 + ms(1000));
        assert_eq!(d.poll_timeout(), Some(t0 + ms(1000)));
        d.handle_timeout(t0 + ms(1000));
        exchange(&mut d, t0 + ms(1000), |_| Some(addr("198.18.5.10:2")));
        assert_eq!(
            d.mappings().next().and_then(|m| m.reflexive),
            Some(addr("198.18.5.10:2"))
        );
    }

    #[test]
    fn no_reflectors_means_no_traffic_and_no_timer() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[(0, false)], 1);
        d.handle_timeout(t0);
        let mut buf = [0u8; 64];
        assert_eq!(d.poll_transmit(&mut buf, t0), None);
        assert_eq!(d.poll_timeout(), None);
    }
}
