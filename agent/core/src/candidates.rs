//! Netmap → failover candidates: which endpoints of each peer the device's path selection may
//! use, and at which of the *peer's* tiers, plus the minimal set of per-peer updates between
//! two netmaps (only peers whose candidates changed are touched).
//!
//! Tier of an endpoint: the priority the peer declared for the uplink behind it (its
//! `uplinks[].priority`, carried in [`Endpoint::priority`]). An older peer declares none; then
//! the tier follows the kind, in the order of the example configs (satellite 0, terrestrial 1,
//! cellular 2, unknown 3). An older controller's `reflexive` endpoint (the peer's TCP source
//! address as seen from HQ; today's nodes announce STUN-learned ones) claims no tier: it goes one tier behind the peer's
//! worst declared one, a last resort when the local addresses are unreachable.

use std::collections::BTreeMap;

use skymesh_proto::{Endpoint, NetMap, PeerEntry, UplinkKind, WgPublicKey, REFLEXIVE_UPLINK};

use crate::path::RemoteEndpoint;

/// Tier of an endpoint whose owner declared no priority.
fn kind_tier(kind: UplinkKind) -> u8 {
    match kind {
        UplinkKind::Satellite => 0,
        UplinkKind::Terrestrial => 1,
        UplinkKind::Cellular => 2,
        UplinkKind::Unknown => 3,
    }
}

fn declared_tier(e: &Endpoint) -> u8 {
    e.priority.unwrap_or_else(|| kind_tier(e.kind))
}

/// The peer's candidate endpoints with tiers, sorted by (tier, address), one per address
/// (the best tier wins). Empty when the peer reported no endpoint.
pub fn candidates(peer: &PeerEntry) -> Vec<RemoteEndpoint> {
    let local = peer
        .endpoints
        .iter()
        .filter(|e| e.uplink != REFLEXIVE_UPLINK);
    let worst = local.clone().map(declared_tier).max();
    let mut out: Vec<RemoteEndpoint> = peer
        .endpoints
        .iter()
        .map(|e| RemoteEndpoint {
            addr: e.addr,
            priority: if e.uplink == REFLEXIVE_UPLINK {
                worst.map_or(kind_tier(e.kind), |w| w.saturating_add(1))
            } else {
                declared_tier(e)
            },
        })
        .collect();
    out.sort_by_key(|e| (e.priority, e.addr));
    let mut seen = Vec::with_capacity(out.len());
    out.retain(|e| {
        let fresh = !seen.contains(&e.addr);
        seen.push(e.addr);
        fresh
    });
    out
}

/// What the device was last told, per peer key.
pub type SentCandidates = BTreeMap<WgPublicKey, Vec<RemoteEndpoint>>;

/// The updates that bring the device from `sent` to `map`: `(peer, candidates)` for every peer
/// whose candidates changed, an empty list for a peer that lost all its endpoints or left the
/// netmap (back to standard roaming / forgotten). Peers that did not change are not listed.
/// `sent` is not modified: the caller records each update once the device accepted it.
pub fn candidate_updates(
    sent: &SentCandidates,
    map: &NetMap,
) -> Vec<(WgPublicKey, Vec<RemoteEndpoint>)> {
    let mut out = Vec::new();
    let mut present = Vec::with_capacity(map.peers.len());
    for peer in &map.peers {
        present.push(peer.public_key);
        let want = candidates(peer);
        match sent.get(&peer.public_key) {
            Some(have) if *have == want => {}
            None if want.is_empty() => {}
            _ => out.push((peer.public_key, want)),
        }
    }
    for (key, have) in sent {
        if !present.contains(key) && !have.is_empty() {
            out.push((*key, Vec::new()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::{NodeId, SelfNode};

    fn ep(addr: &str, uplink: &str, kind: UplinkKind, priority: Option<u8>) -> Endpoint {
        Endpoint {
            addr: addr.parse().expect("addr"),
            uplink: uplink.into(),
            kind,
            priority,
        }
    }

    fn peer(id: u8, endpoints: Vec<Endpoint>) -> PeerEntry {
        PeerEntry {
            node_id: NodeId(u64::from(id)),
            name: format!("n{id}"),
            public_key: WgPublicKey([id; 32]),
            allowed_ips: vec![format!("10.77.0.{id}/32").parse().expect("net")],
            endpoints,
            tags: vec![],
            routes: vec![],
        }
    }

    fn map(peers: Vec<PeerEntry>) -> NetMap {
        NetMap {
            serial: 1,
            node: SelfNode {
                node_id: NodeId(99),
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

    fn tiers(c: &[RemoteEndpoint]) -> Vec<(String, u8)> {
        c.iter().map(|e| (e.addr.to_string(), e.priority)).collect()
    }

    #[test]
    fn the_peers_declared_priority_orders_its_endpoints_not_the_kind() {
        // This peer prefers its fibre over its Starlink.
        let p = peer(
            1,
            vec![
                ep(
                    "198.18.1.2:51820",
                    "starlink",
                    UplinkKind::Satellite,
                    Some(1),
                ),
                ep(
                    "198.19.1.2:51820",
                    "fibre",
                    UplinkKind::Terrestrial,
                    Some(0),
                ),
            ],
        );
        assert_eq!(
            tiers(&candidates(&p)),
            [
                ("198.19.1.2:51820".into(), 0),
                ("198.18.1.2:51820".into(), 1)
            ]
        );
    }

    #[test]
    fn undeclared_tiers_follow_the_kind_and_reflexive_goes_last() {
        let p = peer(
            1,
            vec![
                ep(
                    "198.18.9.9:51820",
                    REFLEXIVE_UPLINK,
                    UplinkKind::Satellite,
                    None,
                ),
                ep("198.19.1.2:51820", "lte", UplinkKind::Cellular, None),
                ep("198.18.1.2:51820", "starlink", UplinkKind::Satellite, None),
            ],
        );
        assert_eq!(
            tiers(&candidates(&p)),
            [
                ("198.18.1.2:51820".into(), 0),
                ("198.19.1.2:51820".into(), 2),
                ("198.18.9.9:51820".into(), 3)
            ]
        );
        assert!(candidates(&peer(2, vec![])).is_empty());
    }

    #[test]
    fn a_duplicate_address_keeps_its_best_tier() {
        let p = peer(
            1,
            vec![
                ep("198.18.1.2:51820", "a", UplinkKind::Terrestrial, Some(4)),
                ep("198.18.1.2:51820", "b", UplinkKind::Terrestrial, Some(2)),
            ],
        );
        assert_eq!(tiers(&candidates(&p)), [("198.18.1.2:51820".into(), 2)]);
    }

    #[test]
    fn only_changed_peers_are_updated_and_departed_ones_are_cleared() {
        let a = peer(
            1,
            vec![ep("198.18.1.2:51820", "s", UplinkKind::Satellite, Some(0))],
        );
        let b = peer(
            2,
            vec![ep("198.18.2.2:51820", "s", UplinkKind::Satellite, Some(0))],
        );
        let c = peer(3, vec![]);
        let first = candidate_updates(&SentCandidates::new(), &map(vec![a.clone(), b.clone(), c]));
        // A peer without endpoints is never sent: it stays under standard roaming.
        assert_eq!(
            first.iter().map(|(k, _)| k.0[0]).collect::<Vec<_>>(),
            [1, 2]
        );
        let sent: SentCandidates = first.into_iter().collect();
        assert!(candidate_updates(&sent, &map(vec![a.clone(), b.clone()])).is_empty());

        let mut b2 = b.clone();
        b2.endpoints.push(ep(
            "198.19.2.2:51820",
            "f",
            UplinkKind::Terrestrial,
            Some(1),
        ));
        let upd = candidate_updates(&sent, &map(vec![a.clone(), b2]));
        assert_eq!(upd.len(), 1);
        assert_eq!(upd[0].0, b.public_key);
        assert_eq!(upd[0].1.len(), 2);

        let upd = candidate_updates(&sent, &map(vec![a]));
        assert_eq!(upd, vec![(b.public_key, Vec::new())]);
    }
}
