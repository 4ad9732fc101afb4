//! Request and response bodies the agent exchanges with the controller's node-facing API.
//!
//! Requests the controller receives deny unknown fields (a typo must not be silently ignored);
//! responses the agent receives tolerate them.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{ControllerPublicKey, Endpoint, NodeId, UplinkKind, WgPublicKey};

/// Body of `POST /api/v1/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    /// The enrollment key secret (`sme_…`).
    pub enrollment_key: String,
    /// The node's WireGuard public key; the private key never leaves the node.
    pub public_key: WgPublicKey,
    pub name: String,
    /// The node's uplink endpoints, as it sees them locally.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Subnets the node offers to route (e.g. a site LAN); an admin approves them.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub routes: Vec<IpNet>,
}

/// A node's lifecycle state as stored by the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum NodeState {
    /// Registered, waiting for an admin to approve it: gets no peers, is nobody's peer.
    Pending,
    Approved,
    /// Cut off: credential refused, removed from every netmap. Its key cannot re-register.
    Revoked,
    #[serde(other)]
    Unknown,
}

/// Response of `POST /api/v1/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    pub node_id: NodeId,
    pub state: NodeState,
    /// The node's overlay addresses with the overlay prefix length.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub addresses: Vec<IpNet>,
    /// Secret node credential (`smn_…`), shown once; send it as `Authorization: Bearer`.
    pub credential: String,
    /// The key every netmap is signed with; pin it.
    pub controller_public_key: ControllerPublicKey,
}

/// The `uplink` name of the endpoint the controller derives from the source address it sees
/// (the node's public address behind NAT, e.g. Starlink CGNAT): source IP plus the port of the
/// node's first reported endpoint. Behind a reverse proxy that source is the proxy, so the
/// controller must then be reached directly for this to be useful.
pub const REFLEXIVE_UPLINK: &str = "reflexive";

/// Most endpoints a node may announce (the controller refuses more).
pub const MAX_ENDPOINTS: usize = 16;

/// Body of `POST /api/v1/node/endpoints`: the node's uplinks as it sees them locally, and
/// optionally the subnets it offers to route (replacing what it advertised before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EndpointsReport {
    pub endpoints: Vec<Endpoint>,
    /// `None` leaves the advertised routes alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<String>>))]
    pub routes: Option<Vec<IpNet>>,
}

/// One peer's state as the reporting node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerStatus {
    pub node_id: NodeId,
    /// Unix seconds of the last completed handshake; `None` if never.
    #[serde(default)]
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The uplink (by name) the peer is currently reached over, if any.
    #[serde(default)]
    pub uplink: Option<String>,
    /// The peer endpoint in use, if any.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub endpoint: Option<std::net::SocketAddr>,
    /// Kind of the local uplink in `uplink` (failover-managed peers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_kind: Option<UplinkKind>,
    /// Path switches since the device started (failover-managed peers only).
    #[serde(default)]
    pub switch_count: u64,
    /// Why the last switch happened (`link_down`, `distress`, `failback`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switch_reason: Option<String>,
    /// Seconds since the last switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switch_secs_ago: Option<u64>,
    /// Every candidate path (local uplink × peer endpoint) with its measurements; empty for
    /// peers under standard WireGuard roaming.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathReport>,
}

/// Health of one path as the failover state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PathHealth {
    /// Not yet proven by a probe reply.
    Unproven,
    Healthy,
    /// In distress: probes or traffic went unanswered.
    Failed,
    /// The local uplink's link is down.
    LinkDown,
    #[serde(other)]
    Unknown,
}

/// One path to a peer: a local uplink and one of the peer's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PathReport {
    /// Local uplink name.
    pub uplink: String,
    pub kind: UplinkKind,
    /// The peer's endpoint.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub remote: std::net::SocketAddr,
    pub health: PathHealth,
    /// Whether traffic to the peer uses this path.
    pub active: bool,
    /// Smoothed round-trip time in microseconds, once measured.
    #[serde(default)]
    pub rtt_us: Option<u64>,
    /// Probe loss, per mille (0-1000).
    #[serde(default)]
    pub loss_permille: u16,
}

/// One local uplink of the reporting node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UplinkReport {
    pub name: String,
    pub kind: UplinkKind,
    /// The node's tier for it (lower is preferred).
    pub priority: u8,
    /// Whether its link is up.
    pub up: bool,
    /// Addresses the carrier's NAT maps this uplink's WireGuard socket to, as a STUN
    /// reflector saw them (one per address family; empty while unknown or behind a NAT that
    /// maps every destination differently).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub reflexive: Vec<std::net::SocketAddr>,
    /// How that NAT maps: `endpoint-independent` (peers can punch through),
    /// `endpoint-dependent` (a "hard" NAT: only a relay helps), or `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
}

/// Body of `POST /api/v1/node/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusReport {
    /// The netmap serial the node has applied.
    pub serial: u64,
    pub peers: Vec<PeerStatus>,
    /// Seconds since the controller last confirmed the node's netmap (0 while the netmap
    /// stream is connected): how stale the netmap the node runs on may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netmap_age_secs: Option<u64>,
    /// The node's uplinks (nodes with failover configured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<UplinkReport>,
}

/// Body of `POST /api/v1/node/rotate-key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RotateKeyRequest {
    /// The node's new WireGuard public key.
    pub public_key: WgPublicKey,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_request_refuses_unknown_fields() {
        let e = serde_json::from_str::<RegisterRequest>(
            r#"{"enrollment_key":"k","public_key":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
                "name":"n","colour":"red"}"#,
        )
        .expect_err("unknown field");
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
