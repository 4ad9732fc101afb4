//! The audit log's hash chain. Pure; the store reads and writes the rows.
//!
//! Each entry's hash is `sha256(prev_hash || canonical(entry))`, with 32 zero bytes before the
//! first entry and `canonical` the compact JSON array `[seq, at, actor, action, target, detail]`
//! (`detail` is itself stored as canonical JSON: serde_json objects serialise with sorted keys).
//! Editing any field of an old entry, deleting or reordering one breaks the chain at that point.
//! Truncating the newest entries is detectable only against a head hash recorded elsewhere:
//! `audit verify` prints the head so operators can anchor it (e.g. in a ticket or a log shipper).

use serde::Serialize;
use sha2::{Digest, Sha256};

pub const GENESIS: [u8; 32] = [0; 32];

/// One audit entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// Who: `admin-token:<id>`, `cli`, `enrollment-key:<id>`.
    pub actor: String,
    /// What: e.g. `node.approve`, `enrollment_key.create`.
    pub action: String,
    /// The object acted on, e.g. `node:12`.
    pub target: Option<String>,
    /// Canonical JSON with the change's details.
    pub detail: String,
    /// Hex.
    pub prev_hash: String,
    /// Hex.
    pub hash: String,
}

pub fn entry_hash(
    prev: &[u8; 32],
    seq: u64,
    at: u64,
    actor: &str,
    action: &str,
    target: Option<&str>,
    detail: &str,
) -> [u8; 32] {
    let canonical = serde_json::json!([seq, at, actor, action, target, detail]).to_string();
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical.as_bytes());
    h.finalize().into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("entry {found} follows entry {prev}: entries were deleted or reordered")]
    Gap { prev: u64, found: u64 },
    #[error("entry {seq}: prev_hash does not match the previous entry's hash")]
    BrokenLink { seq: u64 },
    #[error("entry {seq}: hash does not match its content (entry was edited)")]
    BadHash { seq: u64 },
}

/// The result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ChainHead {
    pub entries: u64,
    /// Hex hash of the newest entry (all zeros when empty).
    pub head: String,
}

/// Verifies a chain one entry at a time (so a long log need not be held in memory).
#[derive(Debug, Clone)]
pub struct Verifier {
    prev_hash: [u8; 32],
    prev_seq: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Self {
            prev_hash: GENESIS,
            prev_seq: 0,
        }
    }
}

impl Verifier {
    /// Checks the next entry, in `seq` order.
    pub fn push(&mut self, e: &AuditEntry) -> Result<(), ChainError> {
        if e.seq != self.prev_seq + 1 {
            return Err(ChainError::Gap {
                prev: self.prev_seq,
                found: e.seq,
            });
        }
        if e.prev_hash != hex::encode(self.prev_hash) {
            return Err(ChainError::BrokenLink { seq: e.seq });
        }
        let h = entry_hash(
            &self.prev_hash,
            e.seq,
            e.at,
            &e.actor,
            &e.action,
            e.target.as_deref(),
            &e.detail,
        );
        if e.hash != hex::encode(h) {
            return Err(ChainError::BadHash { seq: e.seq });
        }
        self.prev_hash = h;
        self.prev_seq = e.seq;
        Ok(())
    }

    pub fn finish(&self) -> ChainHead {
        ChainHead {
            entries: self.prev_seq,
            head: hex::encode(self.prev_hash),
        }
    }
}

/// Checks a whole chain, given in `seq` order.
pub fn verify<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
) -> Result<ChainHead, ChainError> {
    let mut v = Verifier::default();
    for e in entries {
        v.push(e)?;
    }
    Ok(v.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let detail = format!("{{\"n\":{seq}}}");
                let h = entry_hash(&prev, seq, 100 + seq, "cli", "x", Some("node:1"), &detail);
                let e = AuditEntry {
                    seq,
                    at: 100 + seq,
                    actor: "cli".into(),
                    action: "x".into(),
                    target: Some("node:1".into()),
                    detail,
                    prev_hash: hex::encode(prev),
                    hash: hex::encode(h),
                };
                prev = h;
                e
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        let c = chain(3);
        let head = verify(&c).expect("intact");
        assert_eq!(head.entries, 3);
        assert_eq!(head.head, c[2].hash);
        assert_eq!(verify(&[]).expect("empty").entries, 0);
    }

    #[test]
    fn edits_deletions_and_reorders_are_detected() {
        let mut edited = chain(3);
        edited[1].actor = "someone-else".into();
        assert_eq!(verify(&edited), Err(ChainError::BadHash { seq: 2 }));

        let mut deleted = chain(3);
        deleted.remove(1);
        assert_eq!(verify(&deleted), Err(ChainError::Gap { prev: 1, found: 3 }));

        // Deleting an entry and renumbering the rest still breaks the links.
        let mut renumbered = chain(3);
        renumbered.remove(1);
        renumbered[1].seq = 2;
        assert_eq!(verify(&renumbered), Err(ChainError::BrokenLink { seq: 2 }));

        // Rewriting an entry's hash to match its edit breaks the next entry's link.
        let mut rehashed = chain(3);
        rehashed[0].detail = "{}".into();
        let h = entry_hash(&GENESIS, 1, 101, "cli", "x", Some("node:1"), "{}");
        rehashed[0].hash = hex::encode(h);
        assert_eq!(verify(&rehashed), Err(ChainError::BrokenLink { seq: 2 }));
    }
}
