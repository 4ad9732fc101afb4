//! Segmentation in userspace ("TSO/USO"): one super-packet read from TUN with a
//! [`GsoPlan`] becomes MSS-sized packets written straight into buffers the
//! caller owns, with the same rules as Linux `tcp_gso_segment`/`__udp_gso_segment`:
//!
//! - IPv4 total length / IPv6 payload length per segment; IPv4 id + i; IPv4 header checksum;
//! - TCP seq + i × gso_size; FIN and PSH only on the last segment, CWR only on the first;
//! - UDP length per segment;
//! - the L4 checksum in full ([`L4Csum::Full`]) or as the pseudo-header sum for a device
//!   that finishes it ([`L4Csum::Partial`]); a UDP checksum of 0 is sent as 0xffff.
//!
//! Nothing is allocated; the input is only read.

use super::checksum::{self, add, pseudo_header, sum};
use super::vnet::{GsoPlan, L4};
use thiserror::Error;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// How to leave the L4 checksum of each produced segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Csum {
    /// The complete checksum: the segment is ready for the wire.
    Full,
    /// The folded pseudo-header sum (Linux CHECKSUM_PARTIAL), for a consumer that finishes it.
    Partial,
}

/// Hands out the buffer for each segment in turn.
pub trait SegmentSink {
    /// A buffer of exactly `len` bytes for the next segment, or `None` when out of buffers.
    fn next_segment(&mut self, len: usize) -> Option<&mut [u8]>;
}

/// A [`SegmentSink`] over a batch of fixed buffers: segment `i` goes to
/// `bufs[i][headroom..headroom + lens[i]]`, leaving `headroom` bytes for an outer header.
pub struct BatchSink<'a, B> {
    bufs: &'a mut [B],
    lens: &'a mut [usize],
    headroom: usize,
    filled: usize,
}

impl<'a, B: AsMut<[u8]>> BatchSink<'a, B> {
    pub fn new(bufs: &'a mut [B], lens: &'a mut [usize], headroom: usize) -> Self {
        Self {
            bufs,
            lens,
            headroom,
            filled: 0,
        }
    }

    /// Segments written so far.
    pub fn filled(&self) -> usize {
        self.filled
    }
}

impl<B: AsMut<[u8]>> SegmentSink for BatchSink<'_, B> {
    fn next_segment(&mut self, len: usize) -> Option<&mut [u8]> {
        let i = self.filled;
        if i >= self.bufs.len() || i >= self.lens.len() {
            return None;
        }
        let buf = self.bufs[i]
            .as_mut()
            .get_mut(self.headroom..self.headroom + len)?;
        self.lens[i] = len;
        self.filled += 1;
        Some(buf)
    }
}

/// Why a split stopped.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum GsoError {
    #[error("input of {len} bytes does not match the plan ({expected} bytes)")]
    PlanMismatch { len: usize, expected: usize },
    #[error("out of output buffers after {written} of {needed} segments")]
    OutOfBuffers { written: usize, needed: usize },
}

/// Splits `pkt` (the IP super-packet that was classified into `plan`) into segments written
/// into `sink`; returns the number of segments.
pub fn split(
    pkt: &[u8],
    plan: &GsoPlan,
    csum: L4Csum,
    sink: &mut impl SegmentSink,
) -> Result<usize, GsoError> {
    let hdr_len = usize::from(plan.hdr_len);
    let l4_off = usize::from(plan.ip_hdr_len);
    let expected = hdr_len + plan.payload_len as usize;
    let min_ip = if plan.v6 { 40 } else { 20 };
    let min_l4 = match plan.l4 {
        L4::Tcp => 20,
        L4::Udp => 8,
    };
    // Plans come from `VnetHdr::classify`, but the fields are public: never index past them.
    if pkt.len() != expected || l4_off < min_ip || l4_off + min_l4 > hdr_len || plan.gso_size == 0 {
        return Err(GsoError::PlanMismatch {
            len: pkt.len(),
            expected,
        });
    }
    let needed = plan.segments();
    let mss = usize::from(plan.gso_size);
    let proto = plan.l4.proto();
    let csum_at = l4_off + usize::from(plan.l4.csum_offset());
    // Pseudo-header without the length: the per-segment length is added below.
    let pseudo_base = pseudo_header(pkt, plan.v6, proto, 0);
    let (seq0, id0, flags0) = match plan.l4 {
        L4::Tcp => (
            u32::from_be_bytes([
                pkt[l4_off + 4],
                pkt[l4_off + 5],
                pkt[l4_off + 6],
                pkt[l4_off + 7],
            ]),
            u16::from_be_bytes([pkt[4], pkt[5]]),
            pkt[l4_off + 13],
        ),
        L4::Udp => (0, u16::from_be_bytes([pkt[4], pkt[5]]), 0),
    };
    let payload = &pkt[hdr_len..];
    let mut chunks = payload.chunks(mss.max(1));
    for i in 0..needed {
        let data = chunks.next().unwrap_or(&[]);
        let seg_len = hdr_len + data.len();
        let Some(out) = sink.next_segment(seg_len) else {
            return Err(GsoError::OutOfBuffers { written: i, needed });
        };
        out[..hdr_len].copy_from_slice(&pkt[..hdr_len]);
        out[hdr_len..].copy_from_slice(data);
        let l4_len = seg_len - l4_off;
        if plan.v6 {
            out[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            out[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
            out[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            checksum::ipv4_header_fix(&mut out[..l4_off]);
        }
        match plan.l4 {
            L4::Tcp => {
                let seq = seq0.wrapping_add((i as u32).wrapping_mul(u32::from(plan.gso_size)));
                out[l4_off + 4..l4_off + 8].copy_from_slice(&seq.to_be_bytes());
                let mut flags = flags0;
                if i + 1 != needed {
                    flags &= !(TCP_FIN | TCP_PSH);
                }
                if i != 0 {
                    flags &= !TCP_CWR;
                }
                out[l4_off + 13] = flags;
            }
            L4::Udp => {
                out[l4_off + 4..l4_off + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            }
        }
        let pseudo = add(pseudo_base, fold_len(l4_len));
        out[csum_at] = 0;
        out[csum_at + 1] = 0;
        let value = match csum {
            L4Csum::Partial => pseudo,
            L4Csum::Full => {
                let c = !add(pseudo, sum(&out[l4_off..]));
                if c == 0 && plan.l4 == L4::Udp {
                    0xffff
                } else {
                    c
                }
            }
        };
        out[csum_at..csum_at + 2].copy_from_slice(&value.to_be_bytes());
    }
    Ok(needed)
}

fn fold_len(len: usize) -> u16 {
    checksum::fold64(len as u64)
}

/// Completes a `VIRTIO_NET_HDR_F_NEEDS_CSUM` packet in place: the field at `start + offset`
/// holds the pseudo-header sum; the result is the checksum of `pkt[start..]` with it included,
/// 0 being sent as 0xffff as Linux `skb_checksum_help` does. Bounds come from
/// [`VnetHdr::classify`](super::vnet::VnetHdr::classify); out-of-range values change nothing.
pub fn finish_checksum(pkt: &mut [u8], start: u16, offset: u16) {
    let start = usize::from(start);
    let at = start + usize::from(offset);
    if start >= pkt.len() || at + 2 > pkt.len() {
        return;
    }
    let c = !sum(&pkt[start..]);
    let c = if c == 0 { 0xffff } else { c };
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
}
