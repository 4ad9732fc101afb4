//! The netmap: one node's view of the mesh, as computed by the controller.
//!
//! Receivers tolerate fields they do not know (no `deny_unknown_fields`) and enums end in
//! `Unknown`, so the controller can grow the format without breaking deployed agents.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{NodeId, WgPublicKey};

/// What kind of carrier an uplink runs over; the agent's path selection ranks on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum UplinkKind {
    Satellite,
    Terrestrial,
    Cellular,
    /// Sent by a newer peer or controller; treat as lowest preference.
    #[serde(other)]
    Unknown,
}

/// One candidate address at which a peer can be reached, and over which of its uplinks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Endpoint {
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "198.18.1.2:51820"))]
    pub addr: SocketAddr,
    /// The uplink's name on the node that owns it (e.g. `starlink`, `fibre`).
    pub uplink: String,
    pub kind: UplinkKind,
    /// The owner's tier for this uplink (its `uplinks[].priority`; lower is preferred). Peers
    /// rank their paths to the owner by it. Absent from older agents and for the controller's
    /// `reflexive` endpoint; receivers then fall back to a tier derived from `kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
}

/// The receiving node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SelfNode {
    pub node_id: NodeId,
    pub name: String,
    /// Interface addresses with the overlay prefix length (one IPv4, one IPv6).
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>, example = json!(["10.77.0.1/16"])))]
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    pub tags: Vec<String>,
    /// Unix seconds after which the controller stops serving this node, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// UDP ports on the controller's address that answer STUN Binding requests: the node
    /// learns its NAT-mapped (server-reflexive) address there. Two ports let it tell an
    /// endpoint-independent mapping from an endpoint-dependent one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stun_ports: Vec<u16>,
    /// The controller's relay, when it runs one: its UDP port on the controller's address and
    /// this node's token for binding to it (see `skymesh_proto::relay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayGrant>,
}

/// Permission to use a relay: where it listens and the node's token (base64 of the
/// controller's HMAC of the node's WireGuard key; only this node's netmap carries it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RelayGrant {
    pub port: u16,
    pub token: String,
}

/// One peer the receiving node may talk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerEntry {
    pub node_id: NodeId,
    pub name: String,
    pub public_key: WgPublicKey,
    /// WireGuard allowed IPs: the peer's overlay /32 and /128 plus its approved `routes`.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub allowed_ips: Vec<IpNet>,
    /// Candidate endpoints, sorted; empty if the peer reported none.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Approved subnet routes behind this peer (e.g. an embassy LAN), also in `allowed_ips`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub routes: Vec<IpNet>,
}

/// A node's complete view of the mesh at topology generation `serial`.
///
/// `serial` increases with every change to the controller's topology, so an agent can refuse
/// a netmap whose serial is lower than the one it holds (rollback). Peers are sorted by
/// `node_id`; the controller's output is deterministic for a given topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetMap {
    pub serial: u64,
    pub node: SelfNode,
    pub peers: Vec<PeerEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_uplink_kind_from_a_newer_sender_is_accepted() {
        let e: Endpoint =
            serde_json::from_str(r#"{"addr":"198.18.0.1:51820","uplink":"x","kind":"laser"}"#)
                .expect("unknown kind parses");
        assert_eq!(e.kind, UplinkKind::Unknown);
        let e: Endpoint =
            serde_json::from_str(r#"{"addr":"[fd00::1]:1","uplink":"s","kind":"satellite"}"#)
                .expect("known kind parses");
        assert_eq!(e.kind, UplinkKind::Satellite);
        assert_eq!(e.priority, None);
    }

    #[test]
    fn endpoint_priority_is_optional_and_omitted_when_absent() {
        let e: Endpoint = serde_json::from_str(
            r#"{"addr":"198.18.0.1:51820","uplink":"fibre","kind":"terrestrial","priority":1}"#,
        )
        .expect("parses");
        assert_eq!(e.priority, Some(1));
        let json = serde_json::to_string(&Endpoint {
            priority: None,
            ..e
        })
        .expect("json");
        assert!(!json.contains("priority"), "{json}");
    }

    #[test]
    fn peer_entry_tolerates_missing_optional_and_unknown_fields() {
        let p: PeerEntry = serde_json::from_str(
            r#"{"node_id":3,"name":"a","public_key":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
                "allowed_ips":["10.77.0.3/32"],"future_field":1}"#,
        )
        .expect("parses");
        assert!(p.endpoints.is_empty() && p.routes.is_empty() && p.tags.is_empty());
        assert_eq!(
            p.allowed_ips,
            vec!["10.77.0.3/32".parse::<IpNet>().expect("net")]
        );
    }
}
