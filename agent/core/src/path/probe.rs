//! Probe payload carried inside the WireGuard session, and the nonce source.
//!
//! A probe is a 16-byte UDP payload sent *inside* the tunnel to the peer's overlay address on
//! [`PROBE_UDP_PORT`]. The peer answers with a reply echoing the nonce, inside the tunnel,
//! from the same local socket to the source address the request came from (so the reply
//! travels back over the path being probed). Layout, all integers big-endian:
//!
//! ```text
//! 0..4   magic  "SMPB"
//! 4      version (1)
//! 5      kind    (1 = request, 2 = reply)
//! 6..8   reserved, zero on send, ignored on receipt
//! 8..16  nonce   (u64)
//! ```

/// UDP port, on the peer's overlay address, where probe requests are addressed inside the tunnel.
/// The data plane intercepts it before the TUN device; it never reaches applications.
pub const PROBE_UDP_PORT: u16 = 51_899;

/// Length of an encoded probe payload.
pub const PROBE_LEN: usize = 16;

const MAGIC: [u8; 4] = *b"SMPB";
const VERSION: u8 = 1;

/// A decoded probe payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMessage {
    /// Asks the peer to echo `nonce` back over the same path.
    Request {
        /// Chosen by the prober (a seeded generator in the path agent).
        nonce: u64,
    },
    /// Echo of a request's nonce.
    Reply {
        /// The request's nonce.
        nonce: u64,
    },
}

/// Why bytes were not a probe payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeDecodeError {
    /// Not exactly [`PROBE_LEN`] bytes.
    #[error("probe payload must be {PROBE_LEN} bytes, got {0}")]
    Length(usize),
    /// Wrong magic.
    #[error("not a skymesh probe (bad magic)")]
    Magic,
    /// Unsupported version.
    #[error("unsupported probe version {0}")]
    Version(u8),
    /// Unknown kind byte.
    #[error("unknown probe kind {0}")]
    Kind(u8),
}

impl ProbeMessage {
    /// Writes the payload into a caller-owned buffer.
    pub fn encode(self, out: &mut [u8; PROBE_LEN]) {
        let (kind, nonce) = match self {
            ProbeMessage::Request { nonce } => (1, nonce),
            ProbeMessage::Reply { nonce } => (2, nonce),
        };
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = kind;
        out[6..8].copy_from_slice(&[0, 0]);
        out[8..16].copy_from_slice(&nonce.to_be_bytes());
    }

    /// Parses a payload received on [`PROBE_UDP_PORT`]. Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProbeDecodeError> {
        let bytes: &[u8; PROBE_LEN] = bytes
            .try_into()
            .map_err(|_| ProbeDecodeError::Length(bytes.len()))?;
        if bytes[0..4] != MAGIC {
            return Err(ProbeDecodeError::Magic);
        }
        if bytes[4] != VERSION {
            return Err(ProbeDecodeError::Version(bytes[4]));
        }
        let mut nonce = [0u8; 8];
        nonce.copy_from_slice(&bytes[8..16]);
        let nonce = u64::from_be_bytes(nonce);
        match bytes[5] {
            1 => Ok(ProbeMessage::Request { nonce }),
            2 => Ok(ProbeMessage::Reply { nonce }),
            k => Err(ProbeDecodeError::Kind(k)),
        }
    }

    /// The reply a responder sends for this message, `None` if it is already a reply.
    pub fn reply(self) -> Option<ProbeMessage> {
        match self {
            ProbeMessage::Request { nonce } => Some(ProbeMessage::Reply { nonce }),
            ProbeMessage::Reply { .. } => None,
        }
    }
}

/// Nonce generator (SplitMix64) seeded by the driver from the OS CSPRNG.
///
/// Nonces bind a reply to one request on one path; they need to be unique and hard to guess,
/// not secret: authenticity comes from WireGuard, which the probe travels inside.
#[derive(Debug, Clone)]
pub(crate) struct NonceSource(u64);

impl NonceSource {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_nonce(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_round_trip() {
        let mut buf = [0u8; PROBE_LEN];
        for msg in [
            ProbeMessage::Request { nonce: 0 },
            ProbeMessage::Request { nonce: u64::MAX },
            ProbeMessage::Reply {
                nonce: 0x0123_4567_89ab_cdef,
            },
        ] {
            msg.encode(&mut buf);
            assert_eq!(ProbeMessage::decode(&buf), Ok(msg));
        }
        assert_eq!(
            ProbeMessage::Request { nonce: 7 }.reply(),
            Some(ProbeMessage::Reply { nonce: 7 })
        );
        assert_eq!(ProbeMessage::Reply { nonce: 7 }.reply(), None);
    }

    #[test]
    fn malformed_payloads_are_rejected_with_the_reason() {
        let mut buf = [0u8; PROBE_LEN];
        ProbeMessage::Request { nonce: 9 }.encode(&mut buf);
        assert_eq!(
            ProbeMessage::decode(&buf[..15]),
            Err(ProbeDecodeError::Length(15))
        );
        assert_eq!(ProbeMessage::decode(&[]), Err(ProbeDecodeError::Length(0)));
        let mut bad = buf;
        bad[0] = b'X';
        assert_eq!(ProbeMessage::decode(&bad), Err(ProbeDecodeError::Magic));
        let mut bad = buf;
        bad[4] = 2;
        assert_eq!(
            ProbeMessage::decode(&bad),
            Err(ProbeDecodeError::Version(2))
        );
        let mut bad = buf;
        bad[5] = 3;
        assert_eq!(ProbeMessage::decode(&bad), Err(ProbeDecodeError::Kind(3)));
    }

    #[test]
    fn nonces_differ_and_depend_on_the_seed() {
        let mut a = NonceSource::new(1);
        let mut b = NonceSource::new(2);
        let xs: Vec<u64> = (0..1000).map(|_| a.next_nonce()).collect();
        let mut sorted = xs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), xs.len());
        assert_ne!(xs[0], b.next_nonce());
    }
}
