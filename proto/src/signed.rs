//! Signed envelopes: the controller signs the exact JSON bytes it sends.
//!
//! The signature covers `NETMAP_SIGNING_CONTEXT || payload`. The context string separates
//! netmap signatures from any other message the same key signs later (deltas, status acks),
//! so one can never be replayed as the other. The payload is kept as the original string and
//! parsed only after the signature checks out, so there is no re-serialisation ambiguity.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{ControllerPublicKey, NetMap};

/// Domain-separation prefix for full netmaps.
pub const NETMAP_SIGNING_CONTEXT: &[u8] = b"skymesh-netmap-v1\0";

/// A netmap as served by `GET /api/v1/netmap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignedNetMap {
    /// The exact JSON bytes of a [`NetMap`] that were signed.
    pub payload: String,
    /// Ed25519 signature over `NETMAP_SIGNING_CONTEXT || payload`, standard base64.
    pub signature: String,
    /// The key that signed; informative only — receivers verify against their pinned key.
    pub public_key: ControllerPublicKey,
}

/// Why a signed netmap was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("netmap signed by {got}, but the pinned controller key is {pinned}")]
    KeyMismatch {
        /// Base64 of the key named in the envelope.
        got: String,
        /// Base64 of the pinned key.
        pinned: String,
    },
    #[error("signature is not 64 bytes of base64")]
    MalformedSignature,
    #[error("signature does not verify")]
    BadSignature,
    #[error("signed payload is not a valid netmap: {0}")]
    Payload(#[source] serde_json::Error),
}

/// `context || payload`: the bytes an Ed25519 signature of a netmap or delta covers.
fn message(context: &[u8], payload: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + payload.len());
    m.extend_from_slice(context);
    m.extend_from_slice(payload.as_bytes());
    m
}

/// Signs `payload` under `context`: the base64 signature and the signer's public key.
pub(crate) fn sign_payload(
    context: &[u8],
    payload: &str,
    key: &SigningKey,
) -> (String, ControllerPublicKey) {
    let signature = key.sign(&message(context, payload));
    (
        STANDARD.encode(signature.to_bytes()),
        ControllerPublicKey(key.verifying_key()),
    )
}

/// Checks that `signature` over `context || payload` was made by the `pinned` key (and that
/// the informative `claimed` key is the pinned one), before anything parses the payload.
pub(crate) fn verify_payload(
    context: &[u8],
    payload: &str,
    signature: &str,
    claimed: &ControllerPublicKey,
    pinned: &VerifyingKey,
) -> Result<(), VerifyError> {
    if claimed.0 != *pinned {
        return Err(VerifyError::KeyMismatch {
            got: claimed.to_string(),
            pinned: ControllerPublicKey(*pinned).to_string(),
        });
    }
    let sig: [u8; 64] = STANDARD
        .decode(signature)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(VerifyError::MalformedSignature)?;
    pinned
        .verify_strict(&message(context, payload), &Signature::from_bytes(&sig))
        .map_err(|_| VerifyError::BadSignature)
}

/// Serialises and signs `map`.
pub fn sign_netmap(map: &NetMap, key: &SigningKey) -> Result<SignedNetMap, serde_json::Error> {
    let payload = serde_json::to_string(map)?;
    let (signature, public_key) = sign_payload(NETMAP_SIGNING_CONTEXT, &payload, key);
    Ok(SignedNetMap {
        signature,
        payload,
        public_key,
    })
}

impl SignedNetMap {
    /// Checks the signature against the `pinned` controller key and only then parses the payload.
    ///
    /// Rollback protection (refusing a serial lower than the one held) is the caller's job:
    /// it needs state this function does not have.
    pub fn verify(&self, pinned: &VerifyingKey) -> Result<NetMap, VerifyError> {
        verify_payload(
            NETMAP_SIGNING_CONTEXT,
            &self.payload,
            &self.signature,
            &self.public_key,
            pinned,
        )?;
        serde_json::from_str(&self.payload).map_err(VerifyError::Payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeId, SelfNode};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn map(serial: u64) -> NetMap {
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
            peers: vec![],
        }
    }

    #[test]
    fn a_signed_netmap_verifies_against_the_signing_key() {
        let k = key(1);
        let signed = sign_netmap(&map(5), &k).expect("sign");
        assert_eq!(signed.verify(&k.verifying_key()).expect("verifies"), map(5));
    }

    #[test]
    fn a_netmap_signed_by_another_key_is_refused_even_if_it_claims_the_pinned_key() {
        let (good, evil) = (key(1), key(2));
        let mut forged = sign_netmap(&map(5), &evil).expect("sign");
        assert!(matches!(
            forged.verify(&good.verifying_key()),
            Err(VerifyError::KeyMismatch { .. })
        ));
        forged.public_key = ControllerPublicKey(good.verifying_key());
        assert!(matches!(
            forged.verify(&good.verifying_key()),
            Err(VerifyError::BadSignature)
        ));
    }

    #[test]
    fn an_edited_payload_or_mangled_signature_is_refused() {
        let k = key(1);
        let signed = sign_netmap(&map(5), &k).expect("sign");
        let mut edited = signed.clone();
        edited.payload = edited.payload.replace("\"serial\":5", "\"serial\":6");
        assert_ne!(edited.payload, signed.payload);
        assert!(matches!(
            edited.verify(&k.verifying_key()),
            Err(VerifyError::BadSignature)
        ));
        let mut mangled = signed;
        mangled.signature = "AAAA".into();
        assert!(matches!(
            mangled.verify(&k.verifying_key()),
            Err(VerifyError::MalformedSignature)
        ));
    }
}
