//! The relay's wire format: UDP frames between a node's WireGuard socket and a relay that
//! forwards WireGuard datagrams between nodes that cannot reach each other directly. The
//! relay never holds a key: what it forwards is WireGuard ciphertext, addressed by the
//! WireGuard public keys of the two ends.
//!
//! Every frame starts with [`MAGIC`] (`0xFF 'S' 'R'`) and a type byte; neither a WireGuard
//! message (type 1–4, then three zero bytes) nor STUN (first two bits zero) starts that way,
//! so relay frames share the WireGuard socket.
//!
//! - `BIND` (node → relay): `key[32] token[16]`. The token is the controller's HMAC of the
//!   key (handed to the node in its signed netmap); the relay answers `BOUND` and from then on
//!   knows the node at the frame's source address. Refreshed every 20–26 s, which also keeps
//!   the NAT mapping open.
//! - `BOUND` (relay → node): `key[32]`. Never longer than the `BIND` it answers.
//! - `SEND` (node → relay): `to[32] datagram…`, from a bound address only.
//! - `DELIVER` (relay → node): `from[32] datagram…`, exactly the size of the `SEND`.

/// First three bytes of every relay frame.
pub const MAGIC: [u8; 3] = [0xFF, b'S', b'R'];
/// Frame header before the key: magic and type.
pub const HEADER_LEN: usize = 4;
/// Bytes a relayed datagram grows by (header and one key).
pub const OVERHEAD: usize = HEADER_LEN + 32;
/// Length of the token in `BIND`.
pub const TOKEN_LEN: usize = 16;
/// Length of a `BIND` frame.
pub const BIND_LEN: usize = OVERHEAD + TOKEN_LEN;

/// A parsed relay frame (borrowing the datagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Bind {
        key: [u8; 32],
        token: [u8; TOKEN_LEN],
    },
    Bound {
        key: [u8; 32],
    },
    Send {
        to: [u8; 32],
        datagram: &'a [u8],
    },
    Deliver {
        from: [u8; 32],
        datagram: &'a [u8],
    },
}

const BIND: u8 = 1;
const BOUND: u8 = 2;
const SEND: u8 = 3;
const DELIVER: u8 = 4;

/// Whether `datagram` is a relay frame (cheap: three bytes).
#[inline]
pub fn is_frame(datagram: &[u8]) -> bool {
    datagram.len() >= OVERHEAD && datagram[..3] == MAGIC
}

/// Parses a frame; `None` for anything malformed (never panics).
pub fn parse(datagram: &[u8]) -> Option<Frame<'_>> {
    if !is_frame(datagram) {
        return None;
    }
    let key: [u8; 32] = datagram[HEADER_LEN..OVERHEAD].try_into().ok()?;
    let rest = &datagram[OVERHEAD..];
    match datagram[3] {
        BIND if rest.len() == TOKEN_LEN => Some(Frame::Bind {
            key,
            token: rest.try_into().ok()?,
        }),
        BOUND if rest.is_empty() => Some(Frame::Bound { key }),
        SEND if !rest.is_empty() => Some(Frame::Send {
            to: key,
            datagram: rest,
        }),
        DELIVER if !rest.is_empty() => Some(Frame::Deliver {
            from: key,
            datagram: rest,
        }),
        _ => None,
    }
}

fn header(kind: u8, key: &[u8; 32], out: &mut [u8]) {
    out[..3].copy_from_slice(&MAGIC);
    out[3] = kind;
    out[HEADER_LEN..OVERHEAD].copy_from_slice(key);
}

/// Writes a `BIND` into `out` (at least [`BIND_LEN`] bytes); returns its length.
pub fn encode_bind(key: &[u8; 32], token: &[u8; TOKEN_LEN], out: &mut [u8]) -> usize {
    header(BIND, key, out);
    out[OVERHEAD..BIND_LEN].copy_from_slice(token);
    BIND_LEN
}

/// Writes a `BOUND` into `out` (at least [`OVERHEAD`] bytes); returns its length.
pub fn encode_bound(key: &[u8; 32], out: &mut [u8]) -> usize {
    header(BOUND, key, out);
    OVERHEAD
}

/// Writes the header of a `SEND` to `to` into `out[..OVERHEAD]`; the datagram follows it.
pub fn encode_send_header(to: &[u8; 32], out: &mut [u8]) {
    header(SEND, to, out);
}

/// Writes the header of a `DELIVER` from `from` into `out[..OVERHEAD]`.
pub fn encode_deliver_header(from: &[u8; 32], out: &mut [u8]) {
    header(DELIVER, from, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_never_look_like_wireguard_or_stun() {
        let mut buf = [0u8; 128];
        let n = encode_bind(&[1; 32], &[2; 16], &mut buf);
        assert_eq!(
            parse(&buf[..n]),
            Some(Frame::Bind {
                key: [1; 32],
                token: [2; 16]
            })
        );
        let n = encode_bound(&[3; 32], &mut buf);
        assert_eq!(parse(&buf[..n]), Some(Frame::Bound { key: [3; 32] }));
        encode_send_header(&[4; 32], &mut buf);
        buf[OVERHEAD..OVERHEAD + 5].copy_from_slice(b"hello");
        assert_eq!(
            parse(&buf[..OVERHEAD + 5]),
            Some(Frame::Send {
                to: [4; 32],
                datagram: b"hello"
            })
        );
        encode_deliver_header(&[5; 32], &mut buf);
        assert_eq!(
            parse(&buf[..OVERHEAD + 5]),
            Some(Frame::Deliver {
                from: [5; 32],
                datagram: b"hello"
            })
        );
        // A BOUND is never longer than the BIND it answers (no amplification).
        const { assert!(OVERHEAD <= BIND_LEN) };
        // WireGuard messages and STUN never parse.
        for first in [1u8, 2, 3, 4, 0x00, 0x01] {
            let mut m = [0u8; 64];
            m[0] = first;
            assert_eq!(parse(&m), None);
        }
        // Truncated or wrongly sized frames do not either.
        assert_eq!(parse(&buf[..OVERHEAD]), None); // DELIVER without a datagram
        let n = encode_bind(&[1; 32], &[2; 16], &mut buf);
        assert_eq!(parse(&buf[..n - 1]), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..120)) {
            let _ = parse(&data);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&data);
            let _ = parse(&framed);
        }
    }
}
