//! The agent's side of the controller stream, without I/O: which signed netmaps and deltas to
//! accept, and the persisted state format.
//!
//! [`NetmapGuard`] holds the pinned controller key, our node id and the last accepted netmap.
//! Every event from the stream (or the cache) goes through [`NetmapGuard::handle_event`]:
//! the signature is checked against the pinned key (never the key named in the envelope), then
//! the netmap must be for our node and must not roll the serial back; a delta must start at the
//! serial held. Anything refused leaves the held netmap untouched, so a forged or replayed
//! message can at worst delay an update, never install an older or foreign view.
//!
//! An equal serial is accepted only if the content is identical (a reconnect re-sending the
//! current netmap); the same serial with different content is refused as a forgery.

use serde::{Deserialize, Serialize};
use skymesh_proto::{
    ApplyError, NetMap, NodeId, SignedDelta, SignedNetMap, StreamEvent, VerifyError, VerifyingKey,
};

/// What an accepted event asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Apply this netmap (plan against the device, then persist the signed form).
    Apply(NetMap),
    /// Already held; nothing to do.
    Unchanged,
    /// The controller says we were revoked: stop using the mesh credential.
    Revoked,
    /// An event type this agent does not know; ignored.
    Ignored,
}

/// Why an event was refused. The held netmap is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("signature check failed: {0}")]
    Signature(#[from] VerifyError),
    #[error("netmap is for node {got}, we are node {ours}")]
    WrongNode { ours: NodeId, got: NodeId },
    #[error("rollback refused: serial {got} is older than the held serial {held}")]
    Rollback { held: u64, got: u64 },
    #[error("serial {serial} re-sent with different content")]
    Conflicting { serial: u64 },
    #[error("delta cannot be applied: {0}")]
    Delta(#[from] ApplyError),
    #[error("delta received but no netmap is held")]
    NoBase,
}

/// The verifier and holder of the current netmap.
#[derive(Debug, Clone)]
pub struct NetmapGuard {
    pinned: VerifyingKey,
    node_id: NodeId,
    held: Option<NetMap>,
}

impl NetmapGuard {
    pub fn new(pinned: VerifyingKey, node_id: NodeId) -> Self {
        NetmapGuard {
            pinned,
            node_id,
            held: None,
        }
    }

    /// The last accepted netmap.
    pub fn held(&self) -> Option<&NetMap> {
        self.held.as_ref()
    }

    /// The serial to resume the stream from (`since`).
    pub fn serial(&self) -> Option<u64> {
        self.held.as_ref().map(|m| m.serial)
    }

    /// Checks a full signed netmap (from the stream, `GET /netmap` or the cache).
    pub fn handle_netmap(&mut self, signed: &SignedNetMap) -> Result<Accepted, Rejected> {
        let map = signed.verify(&self.pinned)?;
        self.accept(map)
    }

    /// Checks a signed delta against the held netmap.
    pub fn handle_delta(&mut self, signed: &SignedDelta) -> Result<Accepted, Rejected> {
        let delta = signed.verify(&self.pinned)?;
        if delta.node_id != self.node_id {
            return Err(Rejected::WrongNode {
                ours: self.node_id,
                got: delta.node_id,
            });
        }
        let held = self.held.as_ref().ok_or(Rejected::NoBase)?;
        if delta.serial < held.serial {
            return Err(Rejected::Rollback {
                held: held.serial,
                got: delta.serial,
            });
        }
        let map = delta.apply(held)?;
        self.accept(map)
    }

    pub fn handle_event(&mut self, event: &StreamEvent) -> Result<Accepted, Rejected> {
        match event {
            StreamEvent::Netmap(s) => self.handle_netmap(s),
            StreamEvent::Delta(d) => self.handle_delta(d),
            StreamEvent::Revoked => Ok(Accepted::Revoked),
            StreamEvent::Unknown => Ok(Accepted::Ignored),
        }
    }

    fn accept(&mut self, map: NetMap) -> Result<Accepted, Rejected> {
        if map.node.node_id != self.node_id {
            return Err(Rejected::WrongNode {
                ours: self.node_id,
                got: map.node.node_id,
            });
        }
        if let Some(held) = &self.held {
            if map.serial < held.serial {
                return Err(Rejected::Rollback {
                    held: held.serial,
                    got: map.serial,
                });
            }
            if map.serial == held.serial {
                return if map == *held {
                    Ok(Accepted::Unchanged)
                } else {
                    Err(Rejected::Conflicting { serial: map.serial })
                };
            }
        }
        self.held = Some(map.clone());
        Ok(Accepted::Apply(map))
    }
}

/// `state.json` in the state directory: who we are to the controller. Holds secrets (the
/// credential), so it is written 0600 and refused if group/world readable. The WireGuard
/// private key is in its own file (`private.key`), the last good signed netmap in
/// `netmap.json` (re-verified on load, so an edited cache is refused like a forged stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    /// Format version; bump on incompatible change.
    pub version: u32,
    pub controller_url: String,
    /// The pinned controller signing key (base64 Ed25519).
    pub controller_key: skymesh_proto::ControllerPublicKey,
    pub node_id: NodeId,
    pub name: String,
    /// Node credential (`smn_…`), sent as `Authorization: Bearer`.
    pub credential: String,
    /// WireGuard interface name.
    pub iface: String,
}

/// Current [`AgentState::version`].
pub const STATE_VERSION: u32 = 1;

/// Reconnect delay after `failures` consecutive failures: exponential from 500 ms, capped at
/// 30 s, with full jitter drawn from `jitter` ∈ [0, 1) so a controller restart is not met by
/// every agent at the same instant.
pub fn backoff(failures: u32, jitter: f64) -> std::time::Duration {
    let base_ms = 500u64.saturating_mul(1u64 << failures.min(6));
    let cap_ms = base_ms.min(30_000);
    let j = jitter.clamp(0.0, 1.0);
    // Half fixed, half jittered: never a zero delay, still spread out.
    std::time::Duration::from_millis(cap_ms / 2 + ((cap_ms / 2) as f64 * j) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::{
        diff, sign_delta, sign_netmap, ControllerPublicKey, PeerEntry, SelfNode, SigningKey,
        WgPublicKey,
    };

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn map(node: u64, serial: u64, peers: &[u64]) -> NetMap {
        NetMap {
            serial,
            node: SelfNode {
                node_id: NodeId(node),
                name: "me".into(),
                addresses: vec!["10.77.0.1/16".parse().expect("net")],
                mtu: 1380,
                tags: vec![],
                expires_at: None,
                stun_ports: Vec::new(),
                relay: None,
            },
            peers: peers
                .iter()
                .map(|&id| PeerEntry {
                    node_id: NodeId(id),
                    name: format!("p{id}"),
                    public_key: WgPublicKey([id as u8; 32]),
                    allowed_ips: vec![],
                    endpoints: vec![],
                    tags: vec![],
                    routes: vec![],
                })
                .collect(),
        }
    }

    fn guard() -> NetmapGuard {
        NetmapGuard::new(key(1).verifying_key(), NodeId(1))
    }

    #[test]
    fn a_signed_netmap_then_a_delta_are_applied_in_order() {
        let mut g = guard();
        let m5 = map(1, 5, &[2]);
        let got = g.handle_netmap(&sign_netmap(&m5, &key(1)).expect("sign"));
        assert_eq!(got.expect("accepted"), Accepted::Apply(m5.clone()));
        let m7 = map(1, 7, &[2, 3]);
        let d = sign_delta(&diff(&m5, &m7), &key(1)).expect("sign");
        assert_eq!(
            g.handle_delta(&d).expect("accepted"),
            Accepted::Apply(m7.clone())
        );
        assert_eq!(g.serial(), Some(7));
        // The same netmap again (reconnect) is a no-op.
        let again = sign_netmap(&m7, &key(1)).expect("sign");
        assert_eq!(g.handle_netmap(&again).expect("ok"), Accepted::Unchanged);
    }

    #[test]
    fn forged_rolled_back_foreign_or_conflicting_netmaps_are_refused_and_change_nothing() {
        let mut g = guard();
        let m5 = map(1, 5, &[2]);
        g.handle_netmap(&sign_netmap(&m5, &key(1)).expect("sign"))
            .expect("accepted");

        let mut forged = sign_netmap(&map(1, 9, &[6]), &key(2)).expect("sign");
        assert!(matches!(
            g.handle_netmap(&forged),
            Err(Rejected::Signature(_))
        ));
        forged.public_key = ControllerPublicKey(key(1).verifying_key());
        assert!(matches!(
            g.handle_netmap(&forged),
            Err(Rejected::Signature(_))
        ));

        let old = sign_netmap(&map(1, 4, &[]), &key(1)).expect("sign");
        assert!(matches!(
            g.handle_netmap(&old),
            Err(Rejected::Rollback { held: 5, got: 4 })
        ));
        let foreign = sign_netmap(&map(9, 8, &[]), &key(1)).expect("sign");
        assert!(matches!(
            g.handle_netmap(&foreign),
            Err(Rejected::WrongNode { .. })
        ));
        let same_serial = sign_netmap(&map(1, 5, &[3]), &key(1)).expect("sign");
        assert!(matches!(
            g.handle_netmap(&same_serial),
            Err(Rejected::Conflicting { serial: 5 })
        ));
        assert_eq!(g.held(), Some(&m5), "held netmap untouched");
    }

    #[test]
    fn deltas_must_start_at_the_held_serial_and_be_signed_as_deltas() {
        let mut g = guard();
        let d = sign_delta(&diff(&map(1, 5, &[]), &map(1, 6, &[2])), &key(1)).expect("sign");
        assert!(matches!(g.handle_delta(&d), Err(Rejected::NoBase)));
        g.handle_netmap(&sign_netmap(&map(1, 3, &[]), &key(1)).expect("sign"))
            .expect("accepted");
        assert!(matches!(
            g.handle_delta(&d),
            Err(Rejected::Delta(ApplyError::SerialMismatch {
                held: 3,
                from: 5
            }))
        ));
        // A netmap signature over the delta payload does not verify as a delta.
        let as_netmap = sign_netmap(&map(1, 6, &[2]), &key(1)).expect("sign");
        let cross = SignedDelta {
            payload: d.payload.clone(),
            signature: as_netmap.signature,
            public_key: d.public_key,
        };
        assert!(matches!(
            g.handle_delta(&cross),
            Err(Rejected::Signature(_))
        ));
        assert_eq!(g.serial(), Some(3));
    }

    #[test]
    fn revoked_and_unknown_events_are_reported_not_applied() {
        let mut g = guard();
        assert_eq!(
            g.handle_event(&StreamEvent::Revoked).expect("ok"),
            Accepted::Revoked
        );
        assert_eq!(
            g.handle_event(&StreamEvent::Unknown).expect("ok"),
            Accepted::Ignored
        );
        assert!(g.held().is_none());
    }

    #[test]
    fn backoff_grows_to_a_cap_and_jitter_spreads_it() {
        use std::time::Duration;
        assert_eq!(backoff(0, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(0, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(3, 0.0), Duration::from_millis(2_000));
        assert_eq!(backoff(30, 0.999), backoff(60, 0.999));
        assert!(backoff(30, 0.999) <= Duration::from_secs(30));
        assert!(backoff(30, 0.0) >= Duration::from_secs(15));
    }

    #[test]
    fn state_file_refuses_unknown_fields() {
        let json = r#"{"version":1,"controller_url":"http://127.0.0.1:8080",
            "controller_key":"O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=",
            "node_id":3,"name":"n","credential":"smn_x","iface":"sm0","colour":1}"#;
        // JSON is YAML: the dev-dependency parser reads it.
        let e = serde_yaml::from_str::<AgentState>(json).expect_err("unknown field");
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
