//! Bearer secrets (admin tokens, node credentials, enrollment keys).
//!
//! A secret is a type prefix plus 32 random bytes in URL-safe base64. Only its SHA-256 is stored;
//! lookups go by hash, so the database never holds a usable secret and no secret is compared
//! byte-by-byte in a way that could leak timing about it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand_core::{OsRng, RngCore as _};
use sha2::{Digest, Sha256};

pub const ADMIN_TOKEN_PREFIX: &str = "sma_";
pub const NODE_CREDENTIAL_PREFIX: &str = "smn_";
pub const ENROLLMENT_KEY_PREFIX: &str = "sme_";

/// A fresh secret with the given prefix, and its hash for storage.
pub fn generate(prefix: &str) -> (String, [u8; 32]) {
    let mut raw = [0u8; 32];
    OsRng.fill_bytes(&mut raw);
    let secret = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(raw));
    let h = hash(&secret);
    (secret, h)
}

pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefixed_unique_and_hash_to_what_is_stored() {
        let (a, ha) = generate(ADMIN_TOKEN_PREFIX);
        let (b, _) = generate(ADMIN_TOKEN_PREFIX);
        assert!(a.starts_with("sma_") && a.len() == 4 + 43);
        assert_ne!(a, b);
        assert_eq!(hash(&a), ha);
    }
}
