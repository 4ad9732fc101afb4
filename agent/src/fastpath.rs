//! Buffers and counters of the offloaded packet path, all allocated once when the device is
//! created (see `device.rs` for the flow):
//!
//! - TX: one TUN frame (`[virtio_net_hdr | super-packet ≤ 64 KiB]`) is split
//!   ([`offload::split`]) into an arena of plaintext segments, which `Tunn::encapsulate` turns
//!   into datagrams written back to back into one send buffer; all but the last datagram of a
//!   super-packet have the same length, so one `sendmsg` with `UDP_SEGMENT` sends up to 64.
//! - RX: a receive returns up to 64 KiB of coalesced datagrams (`UDP_GRO`); each is decrypted
//!   into its own buffer of an [`RxBatch`] with `VNET_HDR_LEN` bytes of headroom; the batch is
//!   coalesced ([`Gro::coalesce`]) and written to TUN one super-packet per `write`.
//!
//! Nothing here allocates after construction.

use std::io;

use skymesh_agent_core::offload::{self, Gro, GsoPlan, L4Csum, SegmentSink, VNET_HDR_LEN};

use crate::sys::Tun;

/// Most segments one TUN super-packet may be split into (a 64 KiB frame with a 64-byte MSS);
/// more is dropped as malformed.
pub(crate) const MAX_SEGS: usize = 1024;
/// Plaintext bytes the segments of one frame can take: 64 KiB of payload plus a copy of the
/// IP and L4 headers (≤ 120 bytes) per segment.
const ARENA_LEN: usize = 65_536 + MAX_SEGS * 128;
/// WireGuard data message overhead: 16-byte header + 16-byte Poly1305 tag (boringtun does not
/// pad).
pub(crate) const WG_OVERHEAD: usize = 32;
/// `UDP_MAX_SEGMENTS` of older kernels (64; 128 since Linux 6.9).
pub(crate) const GSO_MAX_SEGS: usize = 64;
/// Largest UDP payload of one GSO send (65,535 − 20 IPv4 − 8 UDP header bytes).
pub(crate) const GSO_MAX_BYTES: usize = 65_507;
/// TUN frame buffer: header plus the largest IP packet.
const FRAME_LEN: usize = VNET_HDR_LEN + 65_536;
/// Decrypted packets per TUN flush (a GRO receive of 64 KiB holds ~45 datagrams of 1,452 bytes).
pub(crate) const RX_BATCH: usize = 64;
/// Where a decrypted packet starts in its [`RxBatch`] buffer.
pub(crate) const RX_OFF: usize = VNET_HDR_LEN;
const RX_BUF_LEN: usize = RX_OFF + 65_536;

/// TX buffers; see the module doc.
pub(crate) struct TxBufs {
    /// What a TUN read returns.
    pub(crate) frame: Box<[u8]>,
    /// Plaintext segments of the current frame.
    pub(crate) arena: Box<[u8]>,
    /// `(offset, len)` of each segment in `arena`.
    pub(crate) segs: Box<[(u32, u32)]>,
    /// Encrypted datagrams, back to back.
    pub(crate) out: Box<[u8]>,
}

impl TxBufs {
    pub(crate) fn new() -> TxBufs {
        TxBufs {
            frame: vec![0u8; FRAME_LEN].into_boxed_slice(),
            arena: vec![0u8; ARENA_LEN].into_boxed_slice(),
            segs: vec![(0, 0); MAX_SEGS].into_boxed_slice(),
            // Every segment or the whole frame, each with the WireGuard overhead, plus room for
            // a handshake initiation (148 bytes) written after them.
            out: vec![0u8; ARENA_LEN.max(FRAME_LEN) + MAX_SEGS * WG_OVERHEAD + 256]
                .into_boxed_slice(),
        }
    }

    /// Splits the super-packet `frame[VNET_HDR_LEN..n]` into `arena`; returns the segment count.
    pub(crate) fn split(&mut self, n: usize, plan: &GsoPlan) -> Result<usize, offload::GsoError> {
        let mut sink = ArenaSink {
            arena: &mut self.arena,
            segs: &mut self.segs,
            pos: 0,
            n: 0,
        };
        offload::split(&self.frame[VNET_HDR_LEN..n], plan, L4Csum::Full, &mut sink)
    }

    /// Segment `i` of the last split.
    #[inline]
    pub(crate) fn segment(&self, i: usize) -> &[u8] {
        let (o, l) = self.segs[i];
        &self.arena[o as usize..(o + l) as usize]
    }
}

struct ArenaSink<'a> {
    arena: &'a mut [u8],
    segs: &'a mut [(u32, u32)],
    pos: usize,
    n: usize,
}

impl SegmentSink for ArenaSink<'_> {
    fn next_segment(&mut self, len: usize) -> Option<&mut [u8]> {
        let slot = self.segs.get_mut(self.n)?;
        let buf = self.arena.get_mut(self.pos..self.pos + len)?;
        *slot = (self.pos as u32, len as u32);
        self.pos += len;
        self.n += 1;
        Some(buf)
    }
}

/// Decrypted packets waiting for one coalesced TUN write; see the module doc.
pub(crate) struct RxBatch {
    bufs: Vec<Box<[u8]>>,
    lens: Vec<usize>,
    out: Vec<usize>,
    count: usize,
    gro: Gro,
}

impl RxBatch {
    /// `udp`: the TUN accepts `GSO_UDP_L4` writes (USO), so UDP is coalesced too.
    pub(crate) fn new(udp: bool) -> RxBatch {
        RxBatch {
            bufs: (0..RX_BATCH)
                .map(|_| vec![0u8; RX_BUF_LEN].into_boxed_slice())
                .collect(),
            lens: vec![0; RX_BATCH],
            out: vec![0; RX_BATCH],
            count: 0,
            gro: Gro::new(RX_BATCH).with_udp(udp),
        }
    }

    pub(crate) fn is_full(&self) -> bool {
        self.count == RX_BATCH
    }

    /// The buffer the next packet is decrypted into (from [`RX_OFF`]); [`RxBatch::commit`]
    /// keeps it. Call only when not [`RxBatch::is_full`].
    #[inline]
    pub(crate) fn next_buf(&mut self) -> &mut [u8] {
        &mut self.bufs[self.count][RX_OFF..]
    }

    /// Keeps the packet of `len` bytes just decrypted into [`RxBatch::next_buf`].
    #[inline]
    pub(crate) fn commit(&mut self, len: usize) {
        self.lens[self.count] = len;
        self.count += 1;
    }

    /// Writes the batch to TUN: coalesced with virtio-net headers when `vnet_hdr`, one packet
    /// per write otherwise. Returns `(writes, merged packets, failed writes)`.
    pub(crate) fn flush(&mut self, tun: &Tun, vnet_hdr: bool) -> (u64, u64, u64) {
        let n = std::mem::take(&mut self.count);
        if n == 0 {
            return (0, 0, 0);
        }
        let (mut writes, mut errors) = (0, 0);
        let mut write = |pkt: &[u8]| match tun.write(pkt) {
            Ok(_) => writes += 1,
            // A full TUN queue drops the packet, as the kernel does; TCP recovers.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => errors += 1,
            Err(_) => errors += 1,
        };
        if !vnet_hdr {
            for i in 0..n {
                write(&self.bufs[i][RX_OFF..RX_OFF + self.lens[i]]);
            }
            return (writes, 0, errors);
        }
        match self.gro.coalesce(
            &mut self.bufs[..n],
            &mut self.lens[..n],
            RX_OFF,
            &mut self.out[..n],
        ) {
            Ok((k, stats)) => {
                for &i in &self.out[..k] {
                    write(&self.bufs[i][RX_OFF - VNET_HDR_LEN..RX_OFF + self.lens[i]]);
                }
                (writes, stats.merged as u64, errors)
            }
            // Only for caller mistakes (sizes are fixed here): drop the batch, counted.
            Err(_) => (0, 0, n as u64),
        }
    }
}

/// Packet-path counters (plain integers, one thread), shown by `skymesh-agent status`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FastStats {
    /// TUN reads (one frame each, possibly a super-packet).
    pub(crate) tun_reads: u64,
    /// Frames split into segments.
    pub(crate) tun_super: u64,
    /// Datagrams encrypted and sent.
    pub(crate) tx_packets: u64,
    /// `sendmsg`/`sendto` calls that carried them.
    pub(crate) tx_sends: u64,
    /// UDP receives (each possibly many datagrams).
    pub(crate) rx_recvs: u64,
    /// Datagrams received.
    pub(crate) rx_packets: u64,
    /// TUN writes of decrypted packets.
    pub(crate) tun_writes: u64,
    /// Decrypted packets coalesced into another one.
    pub(crate) gro_merged: u64,
}
