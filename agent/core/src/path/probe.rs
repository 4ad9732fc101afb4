//! Probe payload carried inside the WireGuard session, and the nonce source.
//!
//! A probe is a 16-byte UDP payload sent *inside* the tunnel to the peer's overlay address on
//! [`PROBE_UDP_PORT`]. The peer answers with a reply echoing the nonce, inside the tunnel,
//! from the same local socket to the source address the request came from (so the reply
//! travels back over the path being probed). The same port carries path notices: "I left the
//! path we were on; use the one this notice arrived on". Layout, all integers big-endian:
//!
//! ```text
//! 0..4   magic  "SMPB"
//! 4      version (1)
//! 5      kind    (1 = request, 2 = reply, 3 = path notice)
//! 6..8   request: zero on send, ignored on receipt
//!        reply:   pace, u16 seconds: the least spacing the responder asks for between probes
//!                 on this path (its uplink is metered), 0 = none
//!        notice:  cause (6: 1 = link down, 2 = distress, 3 = choice), 7 zero
//! 8..16  request, reply: nonce (u64); notice: sequence (u64, epoch << 32 | counter)
//! ```
//!
//! Agents that predate pacing ignore bytes 6..8 of a reply, and do not decode kind 3 (the
//! device then drops the packet), so the additions need no version bump.

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
        /// Least spacing, in seconds, the responder asks for between probes on this path
        /// (see [`PathAgent::probe_pace`](super::PathAgent::probe_pace)); 0 for none.
        pace_secs: u16,
    },
    /// The sender left the path the pair was on; the receiver should use the path this
    /// notice arrived on (see [`PathAgent::handle_path_notice`](super::PathAgent::handle_path_notice)).
    Notice(PathNotice),
}

/// Why the sender of a [`PathNotice`] moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoticeCause {
    /// One of its uplinks went down (link, address, route).
    LinkDown,
    /// Its distress detector declared the path dead.
    Distress,
    /// A deliberate move (fail-back, lower RTT, recovery): nothing is known to be broken.
    Choice,
}

impl NoticeCause {
    fn code(self) -> u8 {
        match self {
            NoticeCause::LinkDown => 1,
            NoticeCause::Distress => 2,
            NoticeCause::Choice => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(NoticeCause::LinkDown),
            2 => Some(NoticeCause::Distress),
            3 => Some(NoticeCause::Choice),
            _ => None,
        }
    }

    /// Stable snake_case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeCause::LinkDown => "link_down",
            NoticeCause::Distress => "distress",
            NoticeCause::Choice => "choice",
        }
    }
}

/// "Use the path this arrived on": sent by a path agent when it moves traffic, inside the
/// peer's WireGuard session, on the new path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PathNotice {
    /// Sender's epoch (random per agent instance) in the high 32 bits, a counter in the low
    /// 32: a receiver acts on each notice once, and never on one older than the last it
    /// acted on, even when notices sent on different paths arrive out of order.
    pub seq: u64,
    /// Why the sender moved.
    pub cause: NoticeCause,
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
    /// Unknown notice cause byte.
    #[error("unknown path notice cause {0}")]
    Cause(u8),
}

impl ProbeMessage {
    /// Writes the payload into a caller-owned buffer.
    pub fn encode(self, out: &mut [u8; PROBE_LEN]) {
        let (kind, extra, value) = match self {
            ProbeMessage::Request { nonce } => (1, [0, 0], nonce),
            ProbeMessage::Reply { nonce, pace_secs } => (2, pace_secs.to_be_bytes(), nonce),
            ProbeMessage::Notice(n) => (3, [n.cause.code(), 0], n.seq),
        };
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = kind;
        out[6..8].copy_from_slice(&extra);
        out[8..16].copy_from_slice(&value.to_be_bytes());
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
            2 => Ok(ProbeMessage::Reply {
                nonce,
                pace_secs: u16::from_be_bytes([bytes[6], bytes[7]]),
            }),
            3 => {
                let cause =
                    NoticeCause::from_code(bytes[6]).ok_or(ProbeDecodeError::Cause(bytes[6]))?;
                Ok(ProbeMessage::Notice(PathNotice { seq: nonce, cause }))
            }
            k => Err(ProbeDecodeError::Kind(k)),
        }
    }

    /// The reply a responder sends for this message, `None` if it is not a request.
    pub fn reply(self, pace_secs: u16) -> Option<ProbeMessage> {
        match self {
            ProbeMessage::Request { nonce } => Some(ProbeMessage::Reply { nonce, pace_secs }),
            ProbeMessage::Reply { .. } | ProbeMessage::Notice(_) => None,
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
                pace_secs: 185,
            },
            ProbeMessage::Notice(PathNotice {
                seq: (7 << 32) | 3,
                cause: NoticeCause::LinkDown,
            }),
            ProbeMessage::Notice(PathNotice {
                seq: u64::MAX,
                cause: NoticeCause::Choice,
            }),
        ] {
            msg.encode(&mut buf);
            assert_eq!(ProbeMessage::decode(&buf), Ok(msg));
        }
        assert_eq!(
            ProbeMessage::Request { nonce: 7 }.reply(9),
            Some(ProbeMessage::Reply {
                nonce: 7,
                pace_secs: 9
            })
        );
        let reply = ProbeMessage::Reply {
            nonce: 7,
            pace_secs: 0,
        };
        assert_eq!(reply.reply(0), None);
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
        bad[5] = 4;
        assert_eq!(ProbeMessage::decode(&bad), Err(ProbeDecodeError::Kind(4)));
        let mut bad = buf;
        bad[5] = 3;
        bad[6] = 9;
        assert_eq!(ProbeMessage::decode(&bad), Err(ProbeDecodeError::Cause(9)));
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
