//! Netmap computation: `compute(&Topology, NodeId, now) -> NetMap`. Pure: no database, no clock.
//!
//! The store loads a [`Topology`] snapshot (with its `serial`) in one read transaction; this
//! module turns it into one node's view. `now` is an argument rather than part of the snapshot
//! so one snapshot can be cached and reused for every request until the serial moves. Output is
//! deterministic: peers sorted by node id (the `BTreeMap` order), tags and routes sorted,
//! endpoints in the order the node reported them (that order is the node's own preference),
//! so the same snapshot always gives byte-identical JSON (golden tests rely on it).
//!
//! Only *active* nodes (approved and not expired) take part: a pending, revoked or expired node
//! gets its own entry but no peers, and is nobody's peer.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use skymesh_proto::{Endpoint, NetMap, NodeId, NodeState, PeerEntry, SelfNode, WgPublicKey};

use crate::policy::Policy;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopoNode {
    pub name: String,
    pub public_key: WgPublicKey,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub state: NodeState,
    /// Sorted, deduplicated.
    pub tags: Vec<String>,
    pub endpoints: Vec<Endpoint>,
    pub approved_routes: Vec<IpNet>,
    pub expires_at: Option<u64>,
}

impl TopoNode {
    pub fn is_active(&self, now: u64) -> bool {
        self.state == NodeState::Approved && self.expires_at.is_none_or(|t| now < t)
    }
}

/// A consistent snapshot of everything a netmap depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub serial: u64,
    pub mtu: u16,
    /// The controller's STUN ports, passed on to every node.
    pub stun_ports: Vec<u16>,
    /// The controller's relay (port and token key), granted to every active node.
    pub relay: Option<crate::relay::RelayKey>,
    pub v4_prefix_len: u8,
    pub v6_prefix_len: u8,
    pub policy: Policy,
    pub nodes: BTreeMap<NodeId, TopoNode>,
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The netmap for `id` at unix time `now` (for expiry), or `None` if there is no such node.
pub fn compute(topology: &Topology, id: NodeId, now: u64) -> Option<NetMap> {
    let me = topology.nodes.get(&id)?;
    let node = SelfNode {
        node_id: id,
        name: me.name.clone(),
        addresses: vec![
            IpNet::new(IpAddr::V4(me.ipv4), topology.v4_prefix_len).ok()?,
            IpNet::new(IpAddr::V6(me.ipv6), topology.v6_prefix_len).ok()?,
        ],
        mtu: topology.mtu,
        tags: me.tags.clone(),
        expires_at: me.expires_at,
        stun_ports: topology.stun_ports.clone(),
        relay: topology
            .relay
            .as_ref()
            .filter(|_| me.is_active(now))
            .map(|r| r.grant(&me.public_key)),
    };
    let mut peers = Vec::new();
    if me.is_active(now) {
        for (&peer_id, peer) in &topology.nodes {
            if peer_id == id
                || !peer.is_active(now)
                || !topology.policy.visible(&me.tags, &peer.tags)
            {
                continue;
            }
            let mut routes = peer.approved_routes.clone();
            routes.sort();
            routes.dedup();
            let mut allowed_ips = Vec::with_capacity(2 + routes.len());
            allowed_ips.push(host(IpAddr::V4(peer.ipv4)));
            allowed_ips.push(host(IpAddr::V6(peer.ipv6)));
            allowed_ips.extend(routes.iter().copied());
            let endpoints = peer.endpoints.clone();
            peers.push(PeerEntry {
                node_id: peer_id,
                name: peer.name.clone(),
                public_key: peer.public_key,
                allowed_ips,
                endpoints,
                tags: peer.tags.clone(),
                routes,
            });
        }
    }
    Some(NetMap {
        serial: topology.serial,
        node,
        peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyConfig, Rule};

    fn node(i: u8, state: NodeState, tags: &[&str]) -> TopoNode {
        TopoNode {
            name: format!("n{i}"),
            public_key: WgPublicKey([i; 32]),
            ipv4: Ipv4Addr::new(10, 77, 0, i),
            ipv6: Ipv6Addr::new(0xfd7a, 0x5c3e, 0x77, 0, 0, 0, 0, u16::from(i)),
            state,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            endpoints: vec![],
            approved_routes: vec![],
            expires_at: None,
        }
    }

    fn topo(nodes: Vec<TopoNode>, policy: Policy) -> Topology {
        Topology {
            serial: 9,
            mtu: 1380,
            stun_ports: Vec::new(),
            relay: None,
            v4_prefix_len: 16,
            v6_prefix_len: 64,
            policy,
            nodes: nodes
                .into_iter()
                .enumerate()
                .map(|(i, n)| (NodeId(i as u64 + 1), n))
                .collect(),
        }
    }

    fn peer_ids(m: &NetMap) -> Vec<u64> {
        m.peers.iter().map(|p| p.node_id.0).collect()
    }

    #[test]
    fn approved_nodes_see_each_other_and_only_approved_unexpired_ones() {
        let mut expired = node(4, NodeState::Approved, &[]);
        expired.expires_at = Some(1_000);
        let t = topo(
            vec![
                node(1, NodeState::Approved, &[]),
                node(2, NodeState::Approved, &[]),
                node(3, NodeState::Pending, &[]),
                expired,
                node(5, NodeState::Revoked, &[]),
            ],
            Policy::default(),
        );
        let m = compute(&t, NodeId(1), 1_000).expect("exists");
        assert_eq!(m.serial, 9);
        assert_eq!(peer_ids(&m), vec![2]);
        assert_eq!(m.node.addresses[0].to_string(), "10.77.0.1/16");
        assert_eq!(m.peers[0].allowed_ips[0].to_string(), "10.77.0.2/32");
        assert_eq!(m.peers[0].allowed_ips[1].to_string(), "fd7a:5c3e:77::2/128");
        for inactive in [3, 4, 5] {
            let m = compute(&t, NodeId(inactive), 1_000).expect("exists");
            assert!(m.peers.is_empty(), "node {inactive} must get no peers");
        }
        assert!(compute(&t, NodeId(99), 1_000).is_none());
    }

    #[test]
    fn policy_limits_peers_and_routes_are_allowed_ips() {
        let mut site = node(3, NodeState::Approved, &["embassy"]);
        site.approved_routes = vec!["192.168.50.0/24".parse().expect("net")];
        let policy = Policy::new(&PolicyConfig {
            rules: vec![Rule {
                from: vec!["hq".into()],
                to: vec!["field".into(), "embassy".into()],
            }],
        });
        let t = topo(
            vec![
                node(1, NodeState::Approved, &["hq"]),
                node(2, NodeState::Approved, &["field"]),
                site,
                node(4, NodeState::Approved, &["field"]),
            ],
            policy,
        );
        assert_eq!(
            peer_ids(&compute(&t, NodeId(1), 1_000).expect("hq")),
            vec![2, 3, 4]
        );
        assert_eq!(
            peer_ids(&compute(&t, NodeId(2), 1_000).expect("field")),
            vec![1]
        );
        let hq = compute(&t, NodeId(1), 1_000).expect("hq");
        let embassy = &hq.peers[1];
        assert_eq!(embassy.routes.len(), 1);
        assert_eq!(embassy.allowed_ips.len(), 3);
        assert_eq!(embassy.allowed_ips[2].to_string(), "192.168.50.0/24");
    }
}
