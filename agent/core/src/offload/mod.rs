//! Sans-IO building blocks of the offloaded fast path: the Internet checksum (scalar and SIMD),
//! the virtio-net header Linux TUN speaks with `IFF_VNET_HDR`, segmentation of TUN super-packets
//! (GSO) and coalescing of received segments into super-packets (GRO).
//!
//! Model: the driver reads `[virtio_net_hdr | super-packet]` from TUN, calls
//! [`vnet::VnetHdr::classify`], then [`gso::split`] into its per-packet buffers (or
//! [`gso::finish_checksum`]) before encrypting; on receive it decrypts a batch into buffers
//! with `VNET_HDR_LEN` bytes of headroom and calls [`gro::Gro::coalesce`] before writing to TUN.
//! Nothing here allocates per packet, reads the clock or touches a file descriptor.

pub mod checksum;
pub mod gro;
pub mod gso;
pub mod vnet;

pub use gro::{Gro, GroError, GroStats};
pub use gso::{finish_checksum, split, BatchSink, GsoError, L4Csum, SegmentSink};
pub use vnet::{GsoPlan, Offload, VnetError, VnetHdr, L4, VNET_HDR_LEN};

/// Why a frame read from TUN was dropped.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    #[error(transparent)]
    Vnet(#[from] VnetError),
    #[error(transparent)]
    Gso(#[from] GsoError),
}

/// One frame read from an `IFF_VNET_HDR` TUN (`[virtio_net_hdr | IP packet]`) turned into
/// ready-to-encrypt packets in `sink`: split when it is a super-packet, checksum finished when
/// the kernel left it partial, copied as it is otherwise. Returns the number of packets.
///
/// A driver that wants to skip the copy of plain packets calls [`VnetHdr::classify`] itself.
pub fn tun_read(
    frame: &mut [u8],
    csum: L4Csum,
    sink: &mut impl SegmentSink,
) -> Result<usize, OffloadError> {
    let hdr = VnetHdr::decode(frame)?;
    let pkt = &mut frame[VNET_HDR_LEN..];
    match hdr.classify(pkt)? {
        Offload::Segment(plan) => Ok(split(pkt, &plan, csum, sink)?),
        job => {
            if let Offload::Checksum { start, offset } = job {
                finish_checksum(pkt, start, offset);
            }
            let out = sink.next_segment(pkt.len()).ok_or(GsoError::OutOfBuffers {
                written: 0,
                needed: 1,
            })?;
            out.copy_from_slice(pkt);
            Ok(1)
        }
    }
}
