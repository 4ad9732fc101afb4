//! Netmap deltas and the live-update stream's events.
//!
//! A [`NetMapDelta`] turns the netmap at `from_serial` into the one at `serial`: peers added or
//! changed (whole entries, keyed by node id), peers removed (by id), and the self entry if it
//! changed. It is signed like a full netmap but under its own domain-separation context
//! ([`DELTA_SIGNING_CONTEXT`]), so a delta can never be passed off as a full netmap or back.
//!
//! [`diff`] and [`NetMapDelta::apply`] are inverse: `diff(a, b).apply(a) == b` for any two
//! netmaps of the same node with `a.serial < b.serial` (a property test checks it).

use std::collections::BTreeMap;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::signed::{sign_payload, verify_payload};
use crate::{ControllerPublicKey, NetMap, NodeId, PeerEntry, SelfNode, VerifyError};

/// Domain-separation prefix for deltas.
pub const DELTA_SIGNING_CONTEXT: &[u8] = b"skymesh-netmap-delta-v1\0";

/// The change from the netmap at `from_serial` to the one at `serial`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetMapDelta {
    pub from_serial: u64,
    pub serial: u64,
    /// The receiving node's own id: a delta for another node is refused on apply.
    pub node_id: NodeId,
    /// Present when the self entry changed (addresses, MTU, tags, expiry, name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<SelfNode>,
    /// Peers that are new or whose entry changed, whole, sorted by node id.
    #[serde(default)]
    pub upsert: Vec<PeerEntry>,
    /// Peers that left this node's view, sorted.
    #[serde(default)]
    pub remove: Vec<NodeId>,
}

/// Why a delta cannot be applied to the netmap held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("delta is for node {delta}, this netmap is node {held}")]
    WrongNode { held: NodeId, delta: NodeId },
    #[error("delta starts at serial {from}, but the netmap held is serial {held}")]
    SerialMismatch { held: u64, from: u64 },
    #[error("delta does not move the serial forward ({from} -> {to})")]
    NotForward { from: u64, to: u64 },
}

/// The delta from `old` to `new` (both for the same node).
pub fn diff(old: &NetMap, new: &NetMap) -> NetMapDelta {
    let old_peers: BTreeMap<NodeId, &PeerEntry> =
        old.peers.iter().map(|p| (p.node_id, p)).collect();
    let new_ids: std::collections::BTreeSet<NodeId> = new.peers.iter().map(|p| p.node_id).collect();
    let mut upsert: Vec<PeerEntry> = new
        .peers
        .iter()
        .filter(|p| old_peers.get(&p.node_id) != Some(p))
        .cloned()
        .collect();
    upsert.sort_by_key(|p| p.node_id);
    let remove = old_peers
        .keys()
        .filter(|id| !new_ids.contains(id))
        .copied()
        .collect();
    NetMapDelta {
        from_serial: old.serial,
        serial: new.serial,
        node_id: new.node.node_id,
        node: (old.node != new.node).then(|| new.node.clone()),
        upsert,
        remove,
    }
}

impl NetMapDelta {
    /// True when applying it changes nothing but the serial.
    pub fn is_empty(&self) -> bool {
        self.node.is_none() && self.upsert.is_empty() && self.remove.is_empty()
    }

    /// Applies the delta to `held`, returning the new netmap; `held` is left untouched on error.
    pub fn apply(&self, held: &NetMap) -> Result<NetMap, ApplyError> {
        if held.node.node_id != self.node_id {
            return Err(ApplyError::WrongNode {
                held: held.node.node_id,
                delta: self.node_id,
            });
        }
        if held.serial != self.from_serial {
            return Err(ApplyError::SerialMismatch {
                held: held.serial,
                from: self.from_serial,
            });
        }
        if self.serial <= self.from_serial {
            return Err(ApplyError::NotForward {
                from: self.from_serial,
                to: self.serial,
            });
        }
        let mut peers: BTreeMap<NodeId, PeerEntry> =
            held.peers.iter().map(|p| (p.node_id, p.clone())).collect();
        for id in &self.remove {
            peers.remove(id);
        }
        for p in &self.upsert {
            peers.insert(p.node_id, p.clone());
        }
        Ok(NetMap {
            serial: self.serial,
            node: self.node.clone().unwrap_or_else(|| held.node.clone()),
            peers: peers.into_values().collect(),
        })
    }
}

/// A delta as sent on the stream: the exact JSON bytes signed, like [`crate::SignedNetMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignedDelta {
    /// The exact JSON bytes of a [`NetMapDelta`] that were signed.
    pub payload: String,
    /// Ed25519 signature over `DELTA_SIGNING_CONTEXT || payload`, standard base64.
    pub signature: String,
    /// Informative only — receivers verify against their pinned key.
    pub public_key: ControllerPublicKey,
}

/// Serialises and signs `delta`.
pub fn sign_delta(delta: &NetMapDelta, key: &SigningKey) -> Result<SignedDelta, serde_json::Error> {
    let payload = serde_json::to_string(delta)?;
    let (signature, public_key) = sign_payload(DELTA_SIGNING_CONTEXT, &payload, key);
    Ok(SignedDelta {
        signature,
        payload,
        public_key,
    })
}

impl SignedDelta {
    /// Checks the signature against the `pinned` key, then parses the payload.
    pub fn verify(&self, pinned: &VerifyingKey) -> Result<NetMapDelta, VerifyError> {
        verify_payload(
            DELTA_SIGNING_CONTEXT,
            &self.payload,
            &self.signature,
            &self.public_key,
            pinned,
        )?;
        serde_json::from_str(&self.payload).map_err(VerifyError::Payload)
    }
}

/// One event of `GET /api/v1/netmap/stream`, the `data:` of an SSE event whose `event:` name is
/// the variant's tag (`netmap`, `delta`, `revoked`). Unknown events from a newer controller
/// parse as `Unknown` and are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StreamEvent {
    /// A full netmap: the first event unless the client's `since` serial could be resumed,
    /// and after any gap the controller cannot bridge with a delta.
    Netmap(crate::SignedNetMap),
    /// A delta against the serial the client holds.
    Delta(SignedDelta),
    /// The node was revoked or deleted; the controller closes the stream after this event.
    Revoked,
    #[serde(other)]
    Unknown,
}

impl StreamEvent {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::Netmap(_) => "netmap",
            StreamEvent::Delta(_) => "delta",
            StreamEvent::Revoked => "revoked",
            StreamEvent::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{sign_netmap, WgPublicKey};

    fn peer(id: u64, name: &str) -> PeerEntry {
        PeerEntry {
            node_id: NodeId(id),
            name: name.into(),
            public_key: WgPublicKey([id as u8; 32]),
            allowed_ips: vec![format!("10.77.0.{id}/32").parse().expect("net")],
            endpoints: vec![],
            tags: vec![],
            routes: vec![],
        }
    }

    fn map(serial: u64, peers: Vec<PeerEntry>) -> NetMap {
        NetMap {
            serial,
            node: SelfNode {
                node_id: NodeId(1),
                name: "hq".into(),
                addresses: vec!["10.77.0.1/16".parse().expect("net")],
                mtu: 1380,
                tags: vec![],
                expires_at: None,
                stun_ports: Vec::new(),
                relay: None,
            },
            peers,
        }
    }

    #[test]
    fn diff_names_only_changed_peers_and_applies_back_to_the_new_map() {
        let old = map(3, vec![peer(2, "a"), peer(3, "b"), peer(4, "c")]);
        let new = map(7, vec![peer(2, "a"), peer(3, "b2"), peer(5, "d")]);
        let d = diff(&old, &new);
        assert_eq!((d.from_serial, d.serial), (3, 7));
        assert_eq!(
            d.upsert.iter().map(|p| p.node_id.0).collect::<Vec<_>>(),
            vec![3, 5]
        );
        assert_eq!(d.remove, vec![NodeId(4)]);
        assert!(d.node.is_none());
        assert_eq!(d.apply(&old).expect("applies"), new);
    }

    #[test]
    fn self_changes_travel_in_the_delta() {
        let old = map(3, vec![]);
        let mut new = map(4, vec![]);
        new.node.tags = vec!["field".into()];
        let d = diff(&old, &new);
        assert_eq!(
            d.node.as_ref().map(|n| n.tags.clone()),
            Some(vec!["field".to_string()])
        );
        assert_eq!(d.apply(&old).expect("applies"), new);
    }

    #[test]
    fn a_delta_from_another_serial_or_node_or_backwards_is_refused() {
        let old = map(3, vec![peer(2, "a")]);
        let new = map(4, vec![]);
        let d = diff(&old, &new);
        assert_eq!(
            d.apply(&map(2, vec![])),
            Err(ApplyError::SerialMismatch { held: 2, from: 3 })
        );
        let mut other = old.clone();
        other.node.node_id = NodeId(9);
        assert!(matches!(d.apply(&other), Err(ApplyError::WrongNode { .. })));
        let back = diff(&new, &old);
        assert!(matches!(
            back.apply(&new),
            Err(ApplyError::NotForward { .. })
        ));
    }

    #[test]
    fn a_signed_delta_verifies_and_a_netmap_signature_cannot_stand_in_for_it() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let d = diff(&map(3, vec![]), &map(4, vec![peer(2, "a")]));
        let signed = sign_delta(&d, &k).expect("sign");
        assert_eq!(signed.verify(&k.verifying_key()).expect("verifies"), d);
        // Same payload bytes signed as a netmap: the context differs, so it must not verify.
        let as_netmap = sign_netmap(&map(4, vec![]), &k).expect("sign");
        let cross = SignedDelta {
            payload: signed.payload.clone(),
            signature: as_netmap.signature,
            public_key: signed.public_key,
        };
        assert!(matches!(
            cross.verify(&k.verifying_key()),
            Err(VerifyError::BadSignature)
        ));
        let mut edited = signed;
        edited.payload = edited.payload.replace("\"serial\":4", "\"serial\":5");
        assert!(matches!(
            edited.verify(&k.verifying_key()),
            Err(VerifyError::BadSignature)
        ));
    }

    #[test]
    fn stream_events_round_trip_and_unknown_events_are_tolerated() {
        let e: StreamEvent = serde_json::from_str(r#"{"type":"revoked"}"#).expect("parses");
        assert_eq!(e, StreamEvent::Revoked);
        let e: StreamEvent = serde_json::from_str(r#"{"type":"future"}"#).expect("parses");
        assert_eq!(e, StreamEvent::Unknown);
        let k = SigningKey::from_bytes(&[1; 32]);
        let full = StreamEvent::Netmap(sign_netmap(&map(1, vec![]), &k).expect("sign"));
        let text = serde_json::to_string(&full).expect("ser");
        assert_eq!(
            serde_json::from_str::<StreamEvent>(&text).expect("de"),
            full
        );
    }
}
