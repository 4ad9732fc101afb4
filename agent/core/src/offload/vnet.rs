//! `struct virtio_net_hdr` (include/uapi/linux/virtio_net.h), the 10-byte prefix Linux TUN puts
//! before every packet once `IFF_VNET_HDR` is set and offloads are enabled with `TUNSETOFFLOAD`.
//!
//! The fields are in host byte order (legacy virtio; we never call `TUNSETVNETLE/BE`).
//! [`VnetHdr::decode`] reads the bytes; [`VnetHdr::classify`] checks every field against the
//! packet that follows and returns what the data path must do as an [`Offload`]. `hdr_len` is
//! only bounds-checked: Linux sets it to the whole first packet for forwarded GRO skbs, so the
//! header length is recomputed from the TCP data offset, as wireguard-go does.

use thiserror::Error;

/// `sizeof(struct virtio_net_hdr)`.
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: checksum from `csum_start` to the end, store at
/// `csum_start + csum_offset`; the field holds the pseudo-header sum (CHECKSUM_PARTIAL).
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was already verified.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_F_RSC_INFO`.
pub const F_RSC_INFO: u8 = 4;

/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO, IP fragmentation; never enabled by us).
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO, `TUN_F_USO4/6`).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: the TCP stream uses ECN (CWR kept on the first segment only).
pub const GSO_ECN: u8 = 0x80;

pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
/// Largest IP packet (IPv4 total length, or IPv6 header + payload length) we accept or build.
pub(crate) const MAX_IP_LEN: usize = 65_535;

/// The decoded header, field for field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Transport protocol of a segmentation job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub(crate) fn proto(self) -> u8 {
        match self {
            L4::Tcp => IPPROTO_TCP,
            L4::Udp => IPPROTO_UDP,
        }
    }

    /// Offset of the checksum field inside the L4 header.
    pub fn csum_offset(self) -> u16 {
        match self {
            L4::Tcp => 16,
            L4::Udp => 6,
        }
    }
}

/// A validated segmentation job: every offset is inside the packet it was built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GsoPlan {
    pub l4: L4,
    pub v6: bool,
    /// IP header length = offset of the L4 header.
    pub ip_hdr_len: u16,
    /// IP + L4 header length, recomputed from the packet.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Payload bytes of the whole super-packet.
    pub payload_len: u32,
}

impl GsoPlan {
    /// Number of segments the split produces.
    pub fn segments(&self) -> usize {
        (self.payload_len as usize)
            .div_ceil(usize::from(self.gso_size))
            .max(1)
    }

    /// Length of the largest segment (what each output buffer must hold).
    pub fn max_segment_len(&self) -> usize {
        usize::from(self.hdr_len) + (self.payload_len as usize).min(usize::from(self.gso_size))
    }
}

/// What the data path has to do with a packet read from TUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// Ready to send as it is.
    None,
    /// Finish the checksum (`gso::finish_checksum`) then send.
    Checksum { start: u16, offset: u16 },
    /// Split into segments (`gso::split`).
    Segment(GsoPlan),
}

/// Why a virtio-net header or its packet was refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum VnetError {
    #[error("buffer of {0} bytes is shorter than the {VNET_HDR_LEN}-byte virtio-net header")]
    ShortHeader(usize),
    #[error("unknown virtio-net header flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("unsupported virtio-net gso_type {0:#04x}")]
    UnsupportedGsoType(u8),
    #[error(
        "checksum at csum_start {start} + csum_offset {offset} lies outside the {len}-byte packet"
    )]
    ChecksumOutOfPacket { start: u16, offset: u16, len: usize },
    #[error("packet of {0} bytes is not a well-formed IPv4/IPv6 packet")]
    NotIp(usize),
    #[error("gso_type {gso_type:#04x} does not match IP version {version}")]
    VersionMismatch { gso_type: u8, version: u8 },
    #[error("IP length field says {header} bytes but the packet has {actual}")]
    LengthMismatch { header: usize, actual: usize },
    #[error("packet larger than {MAX_IP_LEN} bytes ({0})")]
    TooLarge(usize),
    #[error("IP protocol {found} does not match gso_type (expected {expected})")]
    ProtocolMismatch { expected: u8, found: u8 },
    #[error("IPv4 fragment cannot be segmented")]
    Fragment,
    #[error("csum_start {got} differs from the L4 header offset {expected}")]
    CsumStartMismatch { expected: u16, got: u16 },
    #[error("csum_offset {got} is wrong for the protocol (expected {expected})")]
    CsumOffsetMismatch { expected: u16, got: u16 },
    #[error("L4 header truncated or with an invalid length")]
    BadL4Header,
    #[error("hdr_len {hdr_len} exceeds the {len}-byte packet")]
    HdrLenOutOfPacket { hdr_len: u16, len: usize },
    #[error("gso_size is 0")]
    ZeroGsoSize,
}

impl VnetHdr {
    /// Reads the 10 header bytes from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, VnetError> {
        if buf.len() < VNET_HDR_LEN {
            return Err(VnetError::ShortHeader(buf.len()));
        }
        let u = |at: usize| u16::from_ne_bytes([buf[at], buf[at + 1]]);
        Ok(Self {
            flags: buf[0],
            gso_type: buf[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The 10 header bytes, host byte order.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// Checks every field against `pkt` (the IP packet after the header) and says what to do.
    pub fn classify(&self, pkt: &[u8]) -> Result<Offload, VnetError> {
        if self.flags & !(F_NEEDS_CSUM | F_DATA_VALID | F_RSC_INFO) != 0 {
            return Err(VnetError::UnknownFlags(self.flags));
        }
        let needs_csum = self.flags & F_NEEDS_CSUM != 0;
        if needs_csum {
            let at = usize::from(self.csum_start) + usize::from(self.csum_offset);
            if usize::from(self.csum_start) >= pkt.len() || at + 2 > pkt.len() {
                return Err(VnetError::ChecksumOutOfPacket {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: pkt.len(),
                });
            }
        }
        if usize::from(self.hdr_len) > pkt.len() {
            return Err(VnetError::HdrLenOutOfPacket {
                hdr_len: self.hdr_len,
                len: pkt.len(),
            });
        }
        let gso = self.gso_type & !GSO_ECN;
        let (l4, want_v6) = match gso {
            GSO_NONE if self.gso_type == GSO_NONE => {
                return Ok(if needs_csum {
                    Offload::Checksum {
                        start: self.csum_start,
                        offset: self.csum_offset,
                    }
                } else {
                    Offload::None
                });
            }
            GSO_TCPV4 => (L4::Tcp, Some(false)),
            GSO_TCPV6 => (L4::Tcp, Some(true)),
            GSO_UDP_L4 if self.gso_type & GSO_ECN == 0 => (L4::Udp, None),
            _ => return Err(VnetError::UnsupportedGsoType(self.gso_type)),
        };
        if self.gso_size == 0 {
            return Err(VnetError::ZeroGsoSize);
        }
        let ip = parse_ip(pkt)?;
        if let Some(v6) = want_v6 {
            if v6 != ip.v6 {
                return Err(VnetError::VersionMismatch {
                    gso_type: self.gso_type,
                    version: if ip.v6 { 6 } else { 4 },
                });
            }
        }
        if ip.proto != l4.proto() {
            return Err(VnetError::ProtocolMismatch {
                expected: l4.proto(),
                found: ip.proto,
            });
        }
        if ip.fragment {
            return Err(VnetError::Fragment);
        }
        if needs_csum {
            if self.csum_start != ip.hdr_len {
                return Err(VnetError::CsumStartMismatch {
                    expected: ip.hdr_len,
                    got: self.csum_start,
                });
            }
            if self.csum_offset != l4.csum_offset() {
                return Err(VnetError::CsumOffsetMismatch {
                    expected: l4.csum_offset(),
                    got: self.csum_offset,
                });
            }
        }
        let l4_off = usize::from(ip.hdr_len);
        let l4_len = match l4 {
            L4::Tcp => {
                let doff = *pkt.get(l4_off + 12).ok_or(VnetError::BadL4Header)?;
                usize::from(doff >> 4) * 4
            }
            L4::Udp => {
                let len = pkt
                    .get(l4_off + 4..l4_off + 6)
                    .ok_or(VnetError::BadL4Header)?;
                if usize::from(u16::from_be_bytes([len[0], len[1]])) != pkt.len() - l4_off {
                    return Err(VnetError::BadL4Header);
                }
                8
            }
        };
        if l4_len < 8 || (l4 == L4::Tcp && l4_len < 20) || l4_off + l4_len > pkt.len() {
            return Err(VnetError::BadL4Header);
        }
        let hdr_len = l4_off + l4_len;
        Ok(Offload::Segment(GsoPlan {
            l4,
            v6: ip.v6,
            ip_hdr_len: ip.hdr_len,
            hdr_len: hdr_len as u16,
            gso_size: self.gso_size,
            payload_len: (pkt.len() - hdr_len) as u32,
        }))
    }
}

/// The IP facts segmentation and coalescing need.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IpInfo {
    pub(crate) v6: bool,
    pub(crate) hdr_len: u16,
    pub(crate) proto: u8,
    pub(crate) fragment: bool,
    pub(crate) options: bool,
}

/// Parses the IP header; the length field must match the packet exactly. IPv6 extension
/// headers are reported through `proto` (segmentation then refuses the packet).
pub(crate) fn parse_ip(pkt: &[u8]) -> Result<IpInfo, VnetError> {
    if pkt.len() > MAX_IP_LEN {
        return Err(VnetError::TooLarge(pkt.len()));
    }
    match pkt.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if ihl < 20 || pkt.len() < ihl {
                return Err(VnetError::NotIp(pkt.len()));
            }
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            if total != pkt.len() {
                return Err(VnetError::LengthMismatch {
                    header: total,
                    actual: pkt.len(),
                });
            }
            Ok(IpInfo {
                v6: false,
                hdr_len: ihl as u16,
                proto: pkt[9],
                // MF set or a non-zero fragment offset.
                fragment: pkt[6] & 0x20 != 0 || (pkt[6] & 0x1f) != 0 || pkt[7] != 0,
                options: ihl != 20,
            })
        }
        Some(6) => {
            if pkt.len() < 40 {
                return Err(VnetError::NotIp(pkt.len()));
            }
            let payload = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            if payload + 40 != pkt.len() {
                return Err(VnetError::LengthMismatch {
                    header: payload + 40,
                    actual: pkt.len(),
                });
            }
            Ok(IpInfo {
                v6: true,
                hdr_len: 40,
                proto: pkt[6],
                fragment: false,
                options: false,
            })
        }
        _ => Err(VnetError::NotIp(pkt.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_bytes() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 72,
            gso_size: 1428,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::decode(&h.to_bytes()), Ok(h));
        assert_eq!(VnetHdr::decode(&[0; 9]), Err(VnetError::ShortHeader(9)));
    }

    #[test]
    fn unknown_flags_and_ufo_are_refused() {
        let pkt = [0u8; 60];
        let h = VnetHdr {
            flags: 0x40,
            ..VnetHdr::default()
        };
        assert_eq!(h.classify(&pkt), Err(VnetError::UnknownFlags(0x40)));
        let h = VnetHdr {
            gso_type: GSO_UDP,
            gso_size: 100,
            ..VnetHdr::default()
        };
        assert_eq!(
            h.classify(&pkt),
            Err(VnetError::UnsupportedGsoType(GSO_UDP))
        );
    }

    #[test]
    fn needs_csum_pointing_past_the_packet_is_refused() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert!(matches!(
            h.classify(&[0u8; 37]),
            Err(VnetError::ChecksumOutOfPacket { .. })
        ));
        assert_eq!(
            h.classify(&[0u8; 38]),
            Ok(Offload::Checksum {
                start: 20,
                offset: 16
            })
        );
    }
}
