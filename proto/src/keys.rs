//! Identifiers and public keys, each with one canonical text form (what serde uses too).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A node's identifier, assigned by the controller and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(NodeId)
    }
}

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("not valid base64")]
    Base64,
    #[error("decodes to {0} bytes, expected 32")]
    Length(usize),
    #[error("not a valid Ed25519 public key")]
    Ed25519,
}

fn decode_32(s: &str) -> Result<[u8; 32], KeyParseError> {
    // A 32-byte key is always 44 base64 characters; checking first bounds the decode.
    if s.len() != 44 {
        return match STANDARD.decode(s) {
            Ok(v) => Err(KeyParseError::Length(v.len())),
            Err(_) => Err(KeyParseError::Base64),
        };
    }
    let bytes = STANDARD.decode(s).map_err(|_| KeyParseError::Base64)?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyParseError::Length(bytes.len()))
}

/// A WireGuard (Curve25519) public key, written as standard base64 like `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WgPublicKey(pub [u8; 32]);

impl WgPublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for WgPublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_32(s).map(WgPublicKey)
    }
}

impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({self})")
    }
}

/// The controller's Ed25519 signing public key, in standard base64 (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ControllerPublicKey(pub ed25519_dalek::VerifyingKey);

impl FromStr for ControllerPublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode_32(s)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(ControllerPublicKey)
            .map_err(|_| KeyParseError::Ed25519)
    }
}

impl fmt::Display for ControllerPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for ControllerPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControllerPublicKey({self})")
    }
}

macro_rules! serde_via_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $t {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some("32-byte key, standard base64 (44 characters)"))
                    .min_length(Some(44))
                    .max_length(Some(44))
                    .into()
            }
        }
        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $t {}
    };
}
serde_via_string!(WgPublicKey);
serde_via_string!(ControllerPublicKey);

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    #[test]
    fn wg_key_round_trips_through_text_and_json() {
        let k: WgPublicKey = KEY.parse().expect("valid key");
        assert_eq!(k.to_string(), KEY);
        let json = serde_json::to_string(&k).expect("serialise");
        assert_eq!(json, format!("\"{KEY}\""));
        let back: WgPublicKey = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, k);
    }

    #[test]
    fn wg_key_rejects_bad_base64_and_wrong_length() {
        assert_eq!("!!!".parse::<WgPublicKey>(), Err(KeyParseError::Base64));
        assert_eq!("AAAA".parse::<WgPublicKey>(), Err(KeyParseError::Length(3)));
        let too_long = format!("{}AAAA", &KEY[..43]);
        assert!(too_long.parse::<WgPublicKey>().is_err());
        let e = serde_json::from_str::<WgPublicKey>("\"AAAA\"").expect_err("must fail");
        assert!(e.to_string().contains("expected 32"), "{e}");
    }

    #[test]
    fn node_id_is_a_plain_number_on_the_wire() {
        assert_eq!(serde_json::to_string(&NodeId(7)).expect("ser"), "7");
        assert_eq!("42".parse::<NodeId>(), Ok(NodeId(42)));
    }
}
