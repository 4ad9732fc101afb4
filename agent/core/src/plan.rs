//! Netmap → device plan: the minimal change that turns what the device has into what the
//! controller's netmap says it should have.
//!
//! `plan(desired, observed)` is pure. Its output is an ordinary UAPI [`SetRequest`] without
//! `replace_peers`, so the same code path applies it as applies `wg set`, and peers that did not
//! change are not named at all: their sessions, counters and timers are left alone. Applying the
//! plan twice changes nothing the second time (the plan of an applied plan is empty).
//!
//! Endpoints: the netmap lists every candidate endpoint of a peer; which one carries traffic is
//! the path selector's decision, and an existing peer may also have roamed to an address the
//! controller has not seen yet. So the plan sets an endpoint only for a new peer, or when the
//! device's current endpoint is not among the peer's candidates *and* the peer has not been
//! heard from on it (`last_handshake == (0, 0)`).

use std::collections::BTreeMap;

use ipnet::IpNet;
use skymesh_proto::{NetMap, PeerEntry};

use crate::key::Key;
use crate::uapi::{DeviceInfo, PeerChange, PeerInfo, SetRequest};

/// Knobs of the plan that do not come from the netmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Persistent keepalive for every mesh peer, seconds (0 = off). Field routers sit behind
    /// CGNAT (Starlink), whose UDP mappings expire in tens of seconds: 25 s is what wg-quick
    /// users set for the same reason.
    pub persistent_keepalive: u16,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            persistent_keepalive: 25,
        }
    }
}

/// The peer changes that make `observed` match `desired`; an empty request when they match.
pub fn plan(desired: &NetMap, observed: &DeviceInfo, opts: PlanOptions) -> SetRequest {
    let have: BTreeMap<Key, &PeerInfo> = observed.peers.iter().map(|p| (p.public_key, p)).collect();
    let want: BTreeMap<Key, &PeerEntry> = desired
        .peers
        .iter()
        .map(|p| (Key(*p.public_key.as_bytes()), p))
        .collect();

    let mut peers = Vec::new();
    for (key, entry) in &want {
        let allowed = sorted(&entry.allowed_ips);
        match have.get(key) {
            None => {
                let mut c = PeerChange::new(*key);
                // The peer's preferred endpoint (its declared tier), not the lowest address.
                c.endpoint = crate::candidates::candidates(entry).first().map(|e| e.addr);
                c.persistent_keepalive = Some(opts.persistent_keepalive);
                c.replace_allowed_ips = true;
                c.allowed_ips = allowed;
                peers.push(c);
            }
            Some(cur) => {
                let mut c = PeerChange::new(*key);
                let mut changed = false;
                if sorted(&cur.allowed_ips) != allowed {
                    c.replace_allowed_ips = true;
                    c.allowed_ips = allowed;
                    changed = true;
                }
                let known = |a| entry.endpoints.iter().any(|e| e.addr == a);
                let never_heard = cur.last_handshake == (0, 0);
                let endpoint_stale = match cur.endpoint {
                    None => true,
                    Some(a) => !known(a) && never_heard,
                };
                if endpoint_stale {
                    if let Some(e) = crate::candidates::candidates(entry).first() {
                        c.endpoint = Some(e.addr);
                        changed = true;
                    }
                }
                if cur.persistent_keepalive != opts.persistent_keepalive {
                    c.persistent_keepalive = Some(opts.persistent_keepalive);
                    changed = true;
                }
                if changed {
                    peers.push(c);
                }
            }
        }
    }
    // Removals go first: a removed peer's allowed IPs may have moved to a new peer in this
    // same request (a key rotation is "remove old key, add new key, same addresses"), and
    // removing the old peer after the add must not take the moved prefixes with it.
    let removals = have.keys().filter(|k| !want.contains_key(k)).map(|key| {
        let mut c = PeerChange::new(*key);
        c.remove = true;
        c
    });
    peers.splice(0..0, removals);
    SetRequest {
        peers,
        ..SetRequest::default()
    }
}

fn sorted(nets: &[IpNet]) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::{Endpoint, NodeId, SelfNode, UplinkKind, WgPublicKey};

    fn entry(id: u8, eps: &[&str]) -> PeerEntry {
        PeerEntry {
            node_id: NodeId(u64::from(id)),
            name: format!("n{id}"),
            public_key: WgPublicKey([id; 32]),
            allowed_ips: vec![
                format!("10.77.0.{id}/32").parse().expect("net"),
                format!("fd7a::{id}/128").parse().expect("net"),
            ],
            endpoints: eps
                .iter()
                .map(|a| Endpoint {
                    addr: a.parse().expect("addr"),
                    uplink: "sat".into(),
                    kind: UplinkKind::Satellite,
                    priority: None,
                })
                .collect(),
            tags: vec![],
            routes: vec![],
        }
    }

    fn netmap(peers: Vec<PeerEntry>) -> NetMap {
        NetMap {
            serial: 1,
            node: SelfNode {
                node_id: NodeId(100),
                name: "me".into(),
                addresses: vec![],
                mtu: 1420,
                tags: vec![],
                expires_at: None,
                stun_ports: Vec::new(),
                relay: None,
            },
            peers,
        }
    }

    /// What the device would report after applying `req` to `dev` (the device's semantics,
    /// reduced to what the plan uses).
    fn apply(dev: &mut DeviceInfo, req: &SetRequest) {
        for c in &req.peers {
            let pos = dev.peers.iter().position(|p| p.public_key == c.public_key);
            if c.remove {
                if let Some(i) = pos {
                    dev.peers.remove(i);
                }
                continue;
            }
            let i = pos.unwrap_or_else(|| {
                dev.peers.push(PeerInfo {
                    public_key: c.public_key,
                    preshared_key: None,
                    endpoint: None,
                    last_handshake: (0, 0),
                    tx_bytes: 0,
                    rx_bytes: 0,
                    persistent_keepalive: 0,
                    allowed_ips: vec![],
                });
                dev.peers.len() - 1
            });
            let p = &mut dev.peers[i];
            if c.endpoint.is_some() {
                p.endpoint = c.endpoint;
            }
            if let Some(k) = c.persistent_keepalive {
                p.persistent_keepalive = k;
            }
            if c.replace_allowed_ips {
                p.allowed_ips.clear();
            }
            p.allowed_ips.extend(c.allowed_ips.iter().copied());
        }
    }

    fn converge(dev: &mut DeviceInfo, want: &NetMap) {
        let req = plan(want, dev, PlanOptions::default());
        apply(dev, &req);
    }

    #[test]
    fn a_rotated_peer_key_is_removed_before_the_new_key_takes_its_addresses() {
        let mut dev = DeviceInfo::default();
        converge(&mut dev, &netmap(vec![entry(1, &["198.18.1.1:51820"])]));
        let mut rotated = entry(1, &["198.18.1.1:51820"]);
        rotated.public_key = WgPublicKey([77; 32]);
        let req = plan(&netmap(vec![rotated]), &dev, PlanOptions::default());
        assert_eq!(req.peers.len(), 2);
        // A device removing the old peer after adding the new one would drop the moved
        // allowed IPs (the peer then gets no traffic until something re-adds them).
        assert!(req.peers[0].remove && req.peers[0].public_key == Key([1; 32]));
        assert!(!req.peers[1].remove && req.peers[1].public_key == Key([77; 32]));
        assert_eq!(req.peers[1].allowed_ips.len(), 2);
    }

    #[test]
    fn an_empty_device_gets_every_peer_with_its_first_endpoint() {
        let want = netmap(vec![
            entry(1, &["198.18.1.1:51820", "198.18.2.1:51820"]),
            entry(2, &[]),
        ]);
        let req = plan(&want, &DeviceInfo::default(), PlanOptions::default());
        assert!(!req.replace_peers);
        assert_eq!(req.peers.len(), 2);
        assert_eq!(
            req.peers[0].endpoint,
            Some("198.18.1.1:51820".parse().expect("addr"))
        );
        assert_eq!(req.peers[1].endpoint, None);
        assert!(req.peers.iter().all(|c| c.replace_allowed_ips
            && c.allowed_ips.len() == 2
            && c.persistent_keepalive == Some(25)));
    }

    #[test]
    fn a_new_peer_gets_the_endpoint_it_prefers_not_the_lowest_address() {
        let mut e = entry(1, &["198.18.1.1:51820", "198.19.1.1:51820"]);
        e.endpoints[0].priority = Some(1); // its Starlink is its backup
        e.endpoints[1].priority = Some(0);
        let req = plan(
            &netmap(vec![e]),
            &DeviceInfo::default(),
            PlanOptions::default(),
        );
        assert_eq!(
            req.peers[0].endpoint,
            Some("198.19.1.1:51820".parse().expect("addr"))
        );
    }

    #[test]
    fn applying_a_plan_converges_and_a_second_plan_is_empty() {
        let want = netmap(vec![entry(1, &["198.18.1.1:51820"]), entry(3, &[])]);
        let mut dev = DeviceInfo::default();
        converge(&mut dev, &want);
        assert_eq!(dev.peers.len(), 2);
        assert_eq!(
            plan(&want, &dev, PlanOptions::default()),
            SetRequest::default()
        );
    }

    #[test]
    fn adding_one_peer_names_only_that_peer() {
        let before = netmap(vec![entry(1, &["198.18.1.1:51820"]), entry(2, &[])]);
        let mut dev = DeviceInfo::default();
        converge(&mut dev, &before);
        let after = netmap(vec![
            entry(1, &["198.18.1.1:51820"]),
            entry(2, &[]),
            entry(3, &["198.18.1.3:51820"]),
        ]);
        let req = plan(&after, &dev, PlanOptions::default());
        assert_eq!(req.peers.len(), 1);
        assert_eq!(req.peers[0].public_key, Key([3; 32]));
    }

    #[test]
    fn a_peer_gone_from_the_netmap_is_removed_and_nothing_else_is_touched() {
        let mut dev = DeviceInfo::default();
        let both = netmap(vec![entry(1, &[]), entry(2, &[])]);
        converge(&mut dev, &both);
        let req = plan(&netmap(vec![entry(2, &[])]), &dev, PlanOptions::default());
        assert_eq!(req.peers.len(), 1);
        assert!(req.peers[0].remove);
        assert_eq!(req.peers[0].public_key, Key([1; 32]));
    }

    #[test]
    fn changed_allowed_ips_are_replaced_in_place() {
        let mut dev = DeviceInfo::default();
        converge(&mut dev, &netmap(vec![entry(1, &[])]));
        let mut e = entry(1, &[]);
        e.allowed_ips.push("192.168.50.0/24".parse().expect("net"));
        let req = plan(&netmap(vec![e]), &dev, PlanOptions::default());
        assert_eq!(req.peers.len(), 1);
        assert!(req.peers[0].replace_allowed_ips && !req.peers[0].remove);
        assert_eq!(req.peers[0].allowed_ips.len(), 3);
        assert_eq!(
            req.peers[0].endpoint, None,
            "endpoint left to the data plane"
        );
    }

    #[test]
    fn a_roamed_endpoint_of_a_live_peer_is_left_alone() {
        let want = netmap(vec![entry(1, &["198.18.1.1:51820"])]);
        let mut dev = DeviceInfo::default();
        converge(&mut dev, &want);
        // The peer roamed (authenticated traffic from a new address the controller has not seen).
        dev.peers[0].endpoint = Some("198.19.9.9:40000".parse().expect("addr"));
        dev.peers[0].last_handshake = (1_700_000_000, 0);
        assert_eq!(
            plan(&want, &dev, PlanOptions::default()),
            SetRequest::default()
        );
        // A peer never heard from is pointed back at a candidate the controller knows.
        dev.peers[0].last_handshake = (0, 0);
        let req = plan(&want, &dev, PlanOptions::default());
        assert_eq!(
            req.peers[0].endpoint,
            Some("198.18.1.1:51820".parse().expect("addr"))
        );
    }

    #[test]
    fn allowed_ips_order_and_host_bits_do_not_count_as_a_change() {
        let mut dev = DeviceInfo::default();
        converge(&mut dev, &netmap(vec![entry(1, &[])]));
        dev.peers[0].allowed_ips.reverse();
        let mut e = entry(1, &[]);
        e.allowed_ips.push("192.168.50.7/24".parse().expect("net"));
        dev.peers[0]
            .allowed_ips
            .push("192.168.50.0/24".parse().expect("net"));
        assert_eq!(
            plan(&netmap(vec![e]), &dev, PlanOptions::default()),
            SetRequest::default()
        );
    }
}
