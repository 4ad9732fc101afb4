//! Wire types shared by the skymesh controller and agent.
//!
//! Everything here is plain data plus (de)serialisation and signature checks: no I/O, no clock.
//! Wire enums end in `#[serde(other)] Unknown` so an older agent survives a newer controller,
//! and structs that an agent receives do not deny unknown fields for the same reason.

mod api;
mod delta;
mod keys;
mod netmap;
pub mod relay;
mod signed;
pub mod stun;

pub use api::{
    EndpointsReport, NodeState, PathHealth, PathReport, PeerStatus, RegisterRequest,
    RegisterResponse, RotateKeyRequest, StatusReport, UplinkReport, MAX_ENDPOINTS,
    REFLEXIVE_UPLINK,
};
pub use delta::{
    diff, sign_delta, ApplyError, NetMapDelta, SignedDelta, StreamEvent, DELTA_SIGNING_CONTEXT,
};
pub use keys::{ControllerPublicKey, KeyParseError, NodeId, WgPublicKey};
pub use netmap::{Endpoint, NetMap, PeerEntry, RelayGrant, SelfNode, UplinkKind};
pub use signed::{sign_netmap, SignedNetMap, VerifyError, NETMAP_SIGNING_CONTEXT};

/// Re-exported so users of [`SignedNetMap::verify`] need not depend on `ed25519-dalek` directly.
pub use ed25519_dalek::{SigningKey, VerifyingKey};
