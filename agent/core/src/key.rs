//! 32-byte WireGuard keys (private, public, preshared) as parsed from the UAPI (lowercase hex)
//! and from wg-quick files (base64). The key type carries no crypto: deriving a public key is
//! the driver's business (it owns the x25519 implementation).

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Length of every WireGuard key in bytes.
pub const KEY_LEN: usize = 32;

/// A 32-byte key. `Debug` never prints the bytes, so private keys do not leak into logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; KEY_LEN]);

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Hex keys are exactly 64 hex digits.
    #[error("a hex key is 64 hex digits, got {0} characters")]
    HexLength(usize),
    /// A character outside `[0-9a-fA-F]`.
    #[error("invalid hex digit in key")]
    HexDigit,
    /// Base64 keys are exactly 44 characters ending in `=`.
    #[error("a base64 key is 44 characters, got {0}")]
    Base64Length(usize),
    /// Not valid base64 for 32 bytes.
    #[error("invalid base64 key")]
    Base64,
}

impl Key {
    /// The all-zero key, which the UAPI uses to mean "remove".
    pub const ZERO: Key = Key([0; KEY_LEN]);

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        // Not secret-dependent timing in any way that matters: zero is a sentinel, not a secret.
        self.0.iter().all(|b| *b == 0)
    }

    /// Parses 64 hex digits (either case), as the UAPI sends them.
    pub fn from_hex(s: &str) -> Result<Key, KeyError> {
        let bytes = s.as_bytes();
        if bytes.len() != 2 * KEY_LEN {
            return Err(KeyError::HexLength(bytes.len()));
        }
        let mut out = [0u8; KEY_LEN];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Ok(Key(out))
    }

    /// Parses standard base64 (44 characters), as wg-quick files and `wg genkey` write them.
    pub fn from_base64(s: &str) -> Result<Key, KeyError> {
        if s.len() != 44 {
            return Err(KeyError::Base64Length(s.len()));
        }
        let mut out = [0u8; KEY_LEN];
        match STANDARD.decode_slice(s, &mut out) {
            Ok(KEY_LEN) => Ok(Key(out)),
            _ => Err(KeyError::Base64),
        }
    }

    /// Lowercase hex, as the UAPI expects.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(2 * KEY_LEN);
        for b in self.0 {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        s
    }

    /// Standard base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

fn hex_val(c: u8) -> Result<u8, KeyError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(KeyError::HexDigit),
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hex_and_base64_of_the_same_key_agree() {
        // From the WireGuard cross-platform UAPI documentation example.
        let hex = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
        let k = Key::from_hex(hex).expect("valid hex");
        assert_eq!(k.to_hex(), hex);
        assert_eq!(Key::from_base64(&k.to_base64()).expect("round trip"), k);
        assert_eq!(
            k.to_base64(),
            "6EtabScXwQA6E7QxVwNT26ypFGzxUMX4V1aA/rpSAno="
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert_eq!(Key::from_hex("abc"), Err(KeyError::HexLength(3)));
        assert_eq!(Key::from_hex(&"g".repeat(64)), Err(KeyError::HexDigit));
        assert_eq!(Key::from_base64("short"), Err(KeyError::Base64Length(5)));
        assert_eq!(Key::from_base64(&"!".repeat(44)), Err(KeyError::Base64));
        // 44 chars of valid base64 that decode to 33 bytes are not a key.
        assert!(Key::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").is_err());
    }

    #[test]
    fn debug_does_not_print_key_material() {
        let k = Key([0xab; 32]);
        assert_eq!(format!("{k:?}"), "Key(..)");
    }

    proptest! {
        #[test]
        fn any_key_round_trips_through_hex_and_base64(bytes in any::<[u8; 32]>()) {
            let k = Key(bytes);
            prop_assert_eq!(Key::from_hex(&k.to_hex()), Ok(k));
            prop_assert_eq!(Key::from_hex(&k.to_hex().to_uppercase()), Ok(k));
            prop_assert_eq!(Key::from_base64(&k.to_base64()), Ok(k));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,80}") {
            let _ = Key::from_hex(&s);
            let _ = Key::from_base64(&s);
        }
    }
}
