//! STUN Binding (RFC 8489) — just what endpoint discovery needs: a request, a success response
//! carrying XOR-MAPPED-ADDRESS, and FINGERPRINT on both, so standard STUN tools interoperate.
//!
//! STUN shares the WireGuard socket (the mapping learned must be the one WireGuard traffic
//! uses). The two never collide: a WireGuard message starts with a type 1–4 and three zero
//! bytes, while every STUN message carries the magic cookie `0x2112A442` at offset 4 and has a
//! type whose second byte is non-zero for a Binding response (`0x0101`) and whose first two
//! bits are zero. [`is_stun`] is the cheap test; [`decode`] the full one.
//!
//! Parsing never panics on any input (property-tested); MESSAGE-INTEGRITY is not checked:
//! a Binding response only tells a node its own address, and a forged one can at most make
//! it announce a wrong candidate, which then fails its connectivity check like any other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie at offset 4 of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// The default STUN port (RFC 8489 §18.5).
pub const DEFAULT_PORT: u16 = 3478;
/// Bytes of a Binding request as [`encode_request`] writes it (header + FINGERPRINT).
pub const REQUEST_LEN: usize = HEADER_LEN + 8;
/// Room for any response [`encode_response`] writes (IPv6 XOR-MAPPED-ADDRESS + FINGERPRINT).
pub const MAX_RESPONSE_LEN: usize = HEADER_LEN + 4 + 20 + 8;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_FINGERPRINT: u16 = 0x8028;
/// XORed into the CRC-32 of FINGERPRINT ("STUN" in ASCII).
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// A 96-bit transaction ID.
pub type TransactionId = [u8; 12];

/// What [`decode`] found in a well-formed STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A Binding request: answer it with [`encode_response`].
    BindingRequest { txid: TransactionId },
    /// A Binding success response: the address the server saw the request come from.
    BindingResponse {
        txid: TransactionId,
        mapped: SocketAddr,
    },
    /// Any other well-formed STUN message (other methods, error responses, indications).
    Other { txid: TransactionId },
}

/// Why a datagram is not a usable STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message (header, magic cookie or length)")]
    NotStun,
    #[error("attribute runs past the end of the message")]
    Truncated,
    #[error("FINGERPRINT does not match the message")]
    BadFingerprint,
    #[error("Binding response without a usable (XOR-)MAPPED-ADDRESS")]
    NoAddress,
}

/// Cheap test for demultiplexing a shared socket: the first two bits zero, the magic cookie at
/// offset 4 and a length that matches the datagram.
#[inline]
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN
        && datagram[0] & 0xC0 == 0
        && datagram[4..8] == MAGIC_COOKIE.to_be_bytes()
        && usize::from(u16::from_be_bytes([datagram[2], datagram[3]])) + HEADER_LEN
            == datagram.len()
}

/// Writes a Binding request with FINGERPRINT into `buf` and returns its length
/// ([`REQUEST_LEN`]). `buf` must hold at least [`REQUEST_LEN`] bytes.
pub fn encode_request(txid: &TransactionId, buf: &mut [u8]) -> usize {
    header(BINDING_REQUEST, txid, &mut buf[..HEADER_LEN]);
    finish_with_fingerprint(buf, HEADER_LEN)
}

/// Writes the Binding success response to `txid` telling the client it was seen at `seen`
/// (XOR-MAPPED-ADDRESS, then FINGERPRINT) and returns its length. `buf` must hold at least
/// [`MAX_RESPONSE_LEN`] bytes. Never longer than needed: 40 bytes for IPv4, 52 for IPv6, so a
/// reflector never sends more than a minimal 28-byte request plus one address.
pub fn encode_response(txid: &TransactionId, seen: SocketAddr, buf: &mut [u8]) -> usize {
    header(BINDING_SUCCESS, txid, &mut buf[..HEADER_LEN]);
    let port = seen.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let (family, addr_len) = match seen.ip() {
        IpAddr::V4(_) => (1u8, 4usize),
        IpAddr::V6(_) => (2u8, 16usize),
    };
    let mut at = HEADER_LEN;
    buf[at..at + 2].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    buf[at + 2..at + 4].copy_from_slice(&(4 + addr_len as u16).to_be_bytes());
    buf[at + 4] = 0;
    buf[at + 5] = family;
    buf[at + 6..at + 8].copy_from_slice(&port.to_be_bytes());
    let key = xor_key(txid);
    match seen.ip() {
        IpAddr::V4(v4) => {
            for (i, b) in v4.octets().iter().enumerate() {
                buf[at + 8 + i] = b ^ key[i];
            }
        }
        IpAddr::V6(v6) => {
            for (i, b) in v6.octets().iter().enumerate() {
                buf[at + 8 + i] = b ^ key[i];
            }
        }
    }
    at += 8 + addr_len;
    finish_with_fingerprint(buf, at)
}

/// Parses a STUN message. A FINGERPRINT, when present, must match; unknown attributes are
/// skipped (a Binding response needs only the mapped address).
pub fn decode(msg: &[u8]) -> Result<Message, StunError> {
    if !is_stun(msg) {
        return Err(StunError::NotStun);
    }
    let kind = u16::from_be_bytes([msg[0], msg[1]]);
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&msg[8..HEADER_LEN]);
    let mut xor_mapped = None;
    let mut mapped = None;
    let mut at = HEADER_LEN;
    while at < msg.len() {
        let Some(head) = msg.get(at..at + 4) else {
            return Err(StunError::Truncated);
        };
        let typ = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = msg.get(at + 4..at + 4 + len).ok_or(StunError::Truncated)?;
        match typ {
            ATTR_XOR_MAPPED_ADDRESS => xor_mapped = address(value, Some(&txid)),
            ATTR_MAPPED_ADDRESS => mapped = address(value, None),
            ATTR_FINGERPRINT => {
                // The last attribute; the CRC covers everything before it, with the header's
                // length already counting the FINGERPRINT itself.
                let want = value
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| StunError::BadFingerprint)?;
                if at + 8 != msg.len() || crc32(&msg[..at]) ^ FINGERPRINT_XOR != want {
                    return Err(StunError::BadFingerprint);
                }
            }
            _ => {}
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    if at != msg.len() {
        return Err(StunError::Truncated);
    }
    Ok(match kind {
        BINDING_REQUEST => Message::BindingRequest { txid },
        BINDING_SUCCESS => Message::BindingResponse {
            txid,
            mapped: xor_mapped.or(mapped).ok_or(StunError::NoAddress)?,
        },
        _ => Message::Other { txid },
    })
}

fn header(kind: u16, txid: &TransactionId, buf: &mut [u8]) {
    buf[0..2].copy_from_slice(&kind.to_be_bytes());
    buf[2..4].copy_from_slice(&0u16.to_be_bytes());
    buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    buf[8..HEADER_LEN].copy_from_slice(txid);
}

/// Appends FINGERPRINT after `len` bytes of message, fixing the header's length first (the
/// CRC covers the length that includes the FINGERPRINT).
fn finish_with_fingerprint(buf: &mut [u8], len: usize) -> usize {
    let total = len + 8;
    let body = (total - HEADER_LEN) as u16;
    buf[2..4].copy_from_slice(&body.to_be_bytes());
    let crc = crc32(&buf[..len]) ^ FINGERPRINT_XOR;
    buf[len..len + 2].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    buf[len + 2..len + 4].copy_from_slice(&4u16.to_be_bytes());
    buf[len + 4..total].copy_from_slice(&crc.to_be_bytes());
    total
}

/// The XOR key of XOR-MAPPED-ADDRESS: the magic cookie then the transaction ID.
fn xor_key(txid: &TransactionId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..].copy_from_slice(txid);
    key
}

/// A (XOR-)MAPPED-ADDRESS value; `xor` holds the transaction ID for the XOR variant.
fn address(value: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    let key = xor.map(xor_key).unwrap_or([0u8; 16]);
    let port =
        u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ u16::from_be_bytes([key[0], key[1]]);
    let ip = match (value.get(1)?, value.len()) {
        (1, 8) => {
            let mut o = [0u8; 4];
            for (i, b) in o.iter_mut().enumerate() {
                *b = value[4 + i] ^ key[i];
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (2, 20) => {
            let mut o = [0u8; 16];
            for (i, b) in o.iter_mut().enumerate() {
                *b = value[4 + i] ^ key[i];
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// CRC-32 (ISO-HDLC, as zlib), bitwise: STUN messages are tens of bytes and discovery sends a
/// few per minute, so a table buys nothing.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXID: TransactionId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 §2.1: a request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
    /// MESSAGE-INTEGRITY and FINGERPRINT.
    const RFC5769_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74,
        0x65, 0x73, 0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e,
        0x00, 0x01, 0xff, 0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36,
        0x00, 0x06, 0x00, 0x09, 0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20,
        0x20, 0x00, 0x08, 0x00, 0x14, 0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e,
        0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49, 0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5,
        0x7a, 0x3b, 0xcf,
    ];

    /// RFC 5769 §2.2: IPv4 response, mapped address 192.0.2.1:32853.
    const RFC5769_RESPONSE_V4: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1,
        0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
        0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00,
        0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];

    /// RFC 5769 §2.3: IPv6 response, mapped address [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    const RFC5769_RESPONSE_V6: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01,
        0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];

    #[test]
    fn rfc5769_request_is_a_binding_request_with_a_valid_fingerprint() {
        assert!(is_stun(&RFC5769_REQUEST));
        assert_eq!(
            decode(&RFC5769_REQUEST),
            Ok(Message::BindingRequest { txid: TXID })
        );
    }

    #[test]
    fn rfc5769_responses_give_the_mapped_addresses() {
        let v4: SocketAddr = "192.0.2.1:32853".parse().expect("addr");
        let v6: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .expect("addr");
        assert_eq!(
            decode(&RFC5769_RESPONSE_V4),
            Ok(Message::BindingResponse {
                txid: TXID,
                mapped: v4
            })
        );
        assert_eq!(
            decode(&RFC5769_RESPONSE_V6),
            Ok(Message::BindingResponse {
                txid: TXID,
                mapped: v6
            })
        );
    }

    #[test]
    fn a_flipped_bit_breaks_the_fingerprint() {
        let mut m = RFC5769_RESPONSE_V4;
        m[45] ^= 1; // inside XOR-MAPPED-ADDRESS
        assert_eq!(decode(&m), Err(StunError::BadFingerprint));
    }

    #[test]
    fn our_request_and_response_round_trip() {
        let mut buf = [0u8; MAX_RESPONSE_LEN];
        let n = encode_request(&TXID, &mut buf);
        assert_eq!(n, REQUEST_LEN);
        assert_eq!(
            decode(&buf[..n]),
            Ok(Message::BindingRequest { txid: TXID })
        );
        for seen in ["198.18.0.7:51820", "[2001:db8::7]:4500"] {
            let seen: SocketAddr = seen.parse().expect("addr");
            let n = encode_response(&TXID, seen, &mut buf);
            assert!(n <= MAX_RESPONSE_LEN);
            assert_eq!(
                decode(&buf[..n]),
                Ok(Message::BindingResponse {
                    txid: TXID,
                    mapped: seen
                })
            );
        }
    }

    #[test]
    fn wireguard_messages_are_never_taken_for_stun() {
        // Type 1–4 and three zero bytes, of every WireGuard message size.
        for (typ, len) in [(1u8, 148usize), (2, 92), (3, 64), (4, 32), (4, 1452)] {
            let mut m = vec![0u8; len];
            m[0] = typ;
            m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes()); // even with the cookie
            assert!(!is_stun(&m), "type {typ}");
            assert_eq!(decode(&m), Err(StunError::NotStun), "type {typ}");
        }
    }

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = is_stun(&data);
            let _ = decode(&data);
        }

        #[test]
        fn stun_shaped_datagrams_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..120), kind in 0u16..0x3fff) {
            let mut m = vec![0u8; HEADER_LEN];
            m[0..2].copy_from_slice(&kind.to_be_bytes());
            m[2..4].copy_from_slice(&(body.len() as u16).to_be_bytes());
            m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            m.extend_from_slice(&body);
            let _ = decode(&m);
        }
    }
}
