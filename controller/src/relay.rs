//! The controller's relay: forwards WireGuard datagrams between nodes that cannot reach each
//! other directly (both behind endpoint-dependent NAT), on one UDP port. It never holds a
//! WireGuard key: it sees ciphertext addressed by public key (frames in
//! [`skymesh_proto::relay`]).
//!
//! Who may use it: a node binds with the token its signed netmap carries (an HMAC of its
//! WireGuard key under a key derived from the controller's signing key, so replicas sharing
//! the signing key issue the same tokens), and only while the node is active in the current
//! topology; a revoked node's bindings are dropped at the next topology change. Nothing is
//! answered to an unauthenticated sender, an answer (`BOUND`) is never longer than the request
//! (`BIND`), and a forwarded datagram is exactly as long as the one received: no
//! amplification. Each bound node gets a byte budget per second ([`BYTES_PER_SECOND`]); bindings
//! idle for [`BINDING_IDLE`] are forgotten. Every drop is counted by reason in `/metrics`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use skymesh_proto::relay::{self, Frame, TOKEN_LEN};
use skymesh_proto::{RelayGrant, WgPublicKey};
use tokio::task::JoinHandle;

use crate::AppState;

/// Default UDP port of the relay.
pub const DEFAULT_PORT: u16 = 3480;
/// Bytes per second one bound node may send through the relay (a burst of one second).
pub const BYTES_PER_SECOND: u64 = 64 << 20;
/// A binding not refreshed (nor used) for this long is forgotten; nodes refresh every 20–26 s.
pub const BINDING_IDLE: Duration = Duration::from_secs(90);
/// Most source addresses one node may be bound from at once (one per uplink socket).
const ADDRS_PER_NODE: usize = 8;

/// The relay's port and the key its tokens are made with.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayKey {
    pub port: u16,
    key: [u8; 32],
}

impl std::fmt::Debug for RelayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayKey")
            .field("port", &self.port)
            .finish()
    }
}

impl RelayKey {
    /// Derives the token key from the controller's signing key (domain-separated).
    pub fn new(signing: &SigningKey, port: u16) -> Self {
        let mut h = Sha256::new();
        h.update(b"skymesh-relay-token-key-v1\0");
        h.update(signing.to_bytes());
        Self {
            port,
            key: h.finalize().into(),
        }
    }

    /// The token of the node with WireGuard key `key`.
    pub fn token(&self, key: &[u8; 32]) -> [u8; TOKEN_LEN] {
        let mut out = [0u8; TOKEN_LEN];
        out.copy_from_slice(&self.mac(key).finalize().into_bytes()[..TOKEN_LEN]);
        out
    }

    fn mac(&self, key: &[u8; 32]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; 32 bytes cannot fail.
        let mut m = <Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(b"skymesh-relay-v1\0");
        m.update(key);
        m
    }

    /// Whether `token` is `key`'s (constant time).
    pub fn verify(&self, key: &[u8; 32], token: &[u8; TOKEN_LEN]) -> bool {
        self.mac(key).verify_truncated_left(token).is_ok()
    }

    /// What the netmap of the node with `key` carries.
    pub fn grant(&self, key: &WgPublicKey) -> RelayGrant {
        RelayGrant {
            port: self.port,
            token: base64::engine::general_purpose::STANDARD.encode(self.token(&key.0)),
        }
    }
}

/// Binds the relay's UDP port on `ip` (`port` 0: none).
pub fn bind(ip: IpAddr, port: u16) -> io::Result<Option<UdpSocket>> {
    if port == 0 {
        return Ok(None);
    }
    UdpSocket::bind(SocketAddr::new(ip, port)).map(Some)
}

/// Runs the relay on `sock` until aborted.
pub fn spawn(sock: UdpSocket, state: AppState) -> io::Result<JoinHandle<()>> {
    sock.set_nonblocking(true)?;
    let sock = tokio::net::UdpSocket::from_std(sock)?;
    Ok(tokio::spawn(serve(sock, state)))
}

struct Binding {
    /// Where `DELIVER`s go: the address the node last bound or sent from.
    addr: SocketAddr,
    addrs: Vec<SocketAddr>,
    last: Instant,
    budget: u64,
    window: Instant,
}

/// The relay's state, separate from the socket so that it can be tested without one.
pub struct Relay {
    key: RelayKey,
    /// WireGuard keys of the nodes currently active.
    allowed: HashSet<[u8; 32]>,
    bindings: HashMap<[u8; 32], Binding>,
    by_addr: HashMap<SocketAddr, [u8; 32]>,
}

/// What to do with one received datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `out[..len]` to `to`.
    Reply { to: SocketAddr, len: usize },
    /// Drop it, for this reason (a metric label).
    Drop(&'static str),
}

impl Relay {
    pub fn new(key: RelayKey) -> Self {
        Self {
            key,
            allowed: HashSet::new(),
            bindings: HashMap::new(),
            by_addr: HashMap::new(),
        }
    }

    /// The nodes that may bind (active ones); bindings of any other are dropped.
    pub fn set_allowed(&mut self, allowed: HashSet<[u8; 32]>) {
        self.allowed = allowed;
        let gone: Vec<[u8; 32]> = self
            .bindings
            .keys()
            .filter(|k| !self.allowed.contains(*k))
            .copied()
            .collect();
        for k in gone {
            self.unbind(&k);
        }
    }

    fn unbind(&mut self, key: &[u8; 32]) {
        if let Some(b) = self.bindings.remove(key) {
            for a in b.addrs {
                self.by_addr.remove(&a);
            }
        }
    }

    /// Forgets bindings idle since before `now - BINDING_IDLE`.
    pub fn expire(&mut self, now: Instant) {
        let idle: Vec<[u8; 32]> = self
            .bindings
            .iter()
            .filter(|(_, b)| now.saturating_duration_since(b.last) > BINDING_IDLE)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.unbind(&k);
        }
    }

    pub fn bindings(&self) -> usize {
        self.bindings.len()
    }

    /// Handles `datagram` from `from`, writing any answer or forwarded frame into `out`
    /// (at least as long as `datagram`).
    pub fn handle(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        now: Instant,
        out: &mut [u8],
    ) -> Action {
        match relay::parse(datagram) {
            Some(Frame::Bind { key, token }) => {
                if !self.key.verify(&key, &token) {
                    return Action::Drop("bad_token");
                }
                if !self.allowed.contains(&key) {
                    return Action::Drop("not_active");
                }
                if let Some(old) = self.by_addr.get(&from).copied().filter(|k| *k != key) {
                    // Another node behind the same address (a NAT reused the port): the
                    // newer binding wins.
                    if let Some(b) = self.bindings.get_mut(&old) {
                        b.addrs.retain(|a| *a != from);
                    }
                }
                let b = self.bindings.entry(key).or_insert_with(|| Binding {
                    addr: from,
                    addrs: Vec::new(),
                    last: now,
                    budget: BYTES_PER_SECOND,
                    window: now,
                });
                if !b.addrs.contains(&from) {
                    if b.addrs.len() >= ADDRS_PER_NODE {
                        let oldest = b.addrs.remove(0);
                        self.by_addr.remove(&oldest);
                    }
                    b.addrs.push(from);
                }
                b.addr = from;
                b.last = now;
                self.by_addr.insert(from, key);
                Action::Reply {
                    to: from,
                    len: relay::encode_bound(&key, out),
                }
            }
            Some(Frame::Send {
                to,
                datagram: inner,
            }) => {
                let Some(sender) = self.by_addr.get(&from).copied() else {
                    return Action::Drop("unbound");
                };
                let Some(b) = self.bindings.get_mut(&sender) else {
                    return Action::Drop("unbound");
                };
                if now.saturating_duration_since(b.window) >= Duration::from_secs(1) {
                    b.window = now;
                    b.budget = BYTES_PER_SECOND;
                }
                let len = datagram.len() as u64;
                if b.budget < len {
                    return Action::Drop("rate_limited");
                }
                b.budget -= len;
                b.addr = from;
                b.last = now;
                let Some(dst) = self.bindings.get(&to).map(|d| d.addr) else {
                    return Action::Drop("unknown_destination");
                };
                relay::encode_deliver_header(&sender, out);
                out[relay::OVERHEAD..relay::OVERHEAD + inner.len()].copy_from_slice(inner);
                Action::Reply {
                    to: dst,
                    len: relay::OVERHEAD + inner.len(),
                }
            }
            Some(Frame::Bound { .. } | Frame::Deliver { .. }) => Action::Drop("unexpected"),
            None => Action::Drop("malformed"),
        }
    }
}

/// The WireGuard keys of the nodes active in the topology at `serial` or newer.
async fn active_keys(state: &AppState, serial: u64) -> Option<HashSet<[u8; 32]>> {
    let t = state.topology_at_least(serial).await.ok()?;
    let now = state.clock.now();
    Some(
        t.nodes
            .values()
            .filter(|n| n.is_active(now))
            .map(|n| n.public_key.0)
            .collect(),
    )
}

async fn serve(sock: tokio::net::UdpSocket, state: AppState) {
    let Some(key) = state.relay.clone() else {
        return;
    };
    let mut relay = Relay::new(key);
    let mut changes = state.subscribe();
    let serial = *changes.borrow_and_update();
    if let Some(keys) = active_keys(&state, serial).await {
        relay.set_allowed(keys);
    }
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    let mut buf = vec![0u8; 65_536];
    let mut out = vec![0u8; 65_536];
    let m = state.metrics.clone();
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                match relay.handle(&buf[..n], from, Instant::now(), &mut out) {
                    Action::Reply { to, len } => {
                        if sock.send_to(&out[..len], to).await.is_ok() {
                            m.relay_forwarded.fetch_add(1, Ordering::Relaxed);
                            m.relay_bytes.fetch_add(len as u64, Ordering::Relaxed);
                        }
                    }
                    Action::Drop(_) => {
                        m.relay_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            c = changes.changed() => {
                if c.is_err() {
                    return;
                }
                let serial = *changes.borrow_and_update();
                if let Some(keys) = active_keys(&state, serial).await {
                    relay.set_allowed(keys);
                }
            }
            _ = sweep.tick() => relay.expire(Instant::now()),
        }
        m.relay_bindings
            .store(relay.bindings() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RelayKey {
        RelayKey::new(&SigningKey::from_bytes(&[7; 32]), DEFAULT_PORT)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn bind(r: &mut Relay, k: [u8; 32], token: [u8; 16], from: &str) -> Action {
        let mut frame = [0u8; relay::BIND_LEN];
        let n = relay::encode_bind(&k, &token, &mut frame);
        let mut out = [0u8; 128];
        r.handle(&frame[..n], addr(from), Instant::now(), &mut out)
    }

    #[test]
    fn only_active_nodes_with_their_own_token_bind_and_nothing_answers_strangers() {
        let k = key();
        let mut r = Relay::new(k.clone());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        r.set_allowed([a].into_iter().collect());
        // A forged token, another node's token, an inactive node: dropped, no answer.
        assert_eq!(
            bind(&mut r, a, [0; 16], "198.18.1.2:1"),
            Action::Drop("bad_token")
        );
        assert_eq!(
            bind(&mut r, a, k.token(&b), "198.18.1.2:1"),
            Action::Drop("bad_token")
        );
        assert_eq!(
            bind(&mut r, b, k.token(&b), "198.18.2.2:1"),
            Action::Drop("not_active")
        );
        // The genuine one binds; the answer is shorter than the request.
        match bind(&mut r, a, k.token(&a), "198.18.1.2:1") {
            Action::Reply { to, len } => {
                assert_eq!(to, addr("198.18.1.2:1"));
                assert!(len <= relay::BIND_LEN);
            }
            other => panic!("{other:?}"),
        }
        // Revoked (no longer active): its binding goes.
        r.set_allowed(HashSet::new());
        assert_eq!(r.bindings(), 0);
    }

    #[test]
    fn send_is_forwarded_between_bound_nodes_at_the_same_size_and_only_from_bound_addresses() {
        let k = key();
        let mut r = Relay::new(k.clone());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        r.set_allowed([a, b].into_iter().collect());
        bind(&mut r, a, k.token(&a), "198.18.1.2:40000");
        bind(&mut r, b, k.token(&b), "198.18.2.2:50000");
        let mut send = vec![0u8; relay::OVERHEAD + 100];
        relay::encode_send_header(&b, &mut send);
        let mut out = vec![0u8; 256];
        let now = Instant::now();
        match r.handle(&send, addr("198.18.1.2:40000"), now, &mut out) {
            Action::Reply { to, len } => {
                assert_eq!(to, addr("198.18.2.2:50000"));
                assert_eq!(len, send.len(), "no amplification");
                assert_eq!(
                    relay::parse(&out[..len]),
                    Some(Frame::Deliver {
                        from: a,
                        datagram: &send[relay::OVERHEAD..]
                    })
                );
            }
            other => panic!("{other:?}"),
        }
        // From an address that never bound: dropped (a stranger cannot use the relay).
        assert_eq!(
            r.handle(&send, addr("203.0.113.9:1"), now, &mut out),
            Action::Drop("unbound")
        );
        // To a node that is not bound.
        relay::encode_send_header(&[9; 32], &mut send);
        assert_eq!(
            r.handle(&send, addr("198.18.1.2:40000"), now, &mut out),
            Action::Drop("unknown_destination")
        );
        assert_eq!(
            r.handle(b"\xffSR\x09junk", addr("198.18.1.2:40000"), now, &mut out),
            Action::Drop("malformed")
        );
    }

    #[test]
    fn a_node_over_its_byte_budget_is_dropped_until_the_next_second() {
        let k = key();
        let mut r = Relay::new(k.clone());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        r.set_allowed([a, b].into_iter().collect());
        bind(&mut r, a, k.token(&a), "198.18.1.2:1");
        bind(&mut r, b, k.token(&b), "198.18.2.2:1");
        let mut send = vec![0u8; 60_000];
        relay::encode_send_header(&b, &mut send);
        let mut out = vec![0u8; 65_536];
        let t0 = Instant::now();
        let mut sent = 0u64;
        while let Action::Reply { .. } = r.handle(&send, addr("198.18.1.2:1"), t0, &mut out) {
            sent += send.len() as u64;
        }
        assert!(
            sent <= BYTES_PER_SECOND && sent > BYTES_PER_SECOND - 60_000,
            "{sent}"
        );
        let later = t0 + Duration::from_secs(1);
        assert!(matches!(
            r.handle(&send, addr("198.18.1.2:1"), later, &mut out),
            Action::Reply { .. }
        ));
        // Idle bindings expire.
        r.expire(t0 + BINDING_IDLE + Duration::from_secs(2));
        assert_eq!(r.bindings(), 0);
    }
}
