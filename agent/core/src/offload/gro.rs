//! TCP (and optionally UDP) coalescing ("GRO in userspace") for packets written to a TUN with
//! `IFF_VNET_HDR`: consecutive segments of one flow in a batch become one super-packet with a virtio-net header
//! (`GSO_TCPV4/6`, `gso_size`, `NEEDS_CSUM` and the pseudo-header sum in the TCP checksum
//! field), so the kernel runs its stack once per super-packet instead of once per segment.
//!
//! Rules follow wireguard-go `tun/offload_linux.go` (`tcpGRO`), which follows the kernel's GRO
//! self-tests: same addresses, ports and ACK number; IPv4 without options or fragmentation, same
//! TOS, TTL and DF and a valid header checksum (the merged header is rebuilt, which would
//! launder a corrupt one); IPv6 with the same version/traffic class/flow label word and hop limit;
//! same TCP header length and options; flags exactly ACK or ACK|PSH, PSH only on the last
//! segment; payload not empty; contiguous sequence numbers (append, or prepend of an
//! out-of-order predecessor); every segment as big as the first except a shorter last one; both
//! packets' checksums verified before merging (a merged packet gets its checksum recomputed by
//! the kernel, which would otherwise hide corruption); at most 65,535 bytes of IP packet.
//! Everything else passes through untouched with a zero virtio-net header, and a TCP/UDP packet
//! that cannot merge (a pure ACK, FIN, RST...) closes its connection's items so that nothing
//! after it merges into what came before it (the kernel flushes the flow the same way).
//!
//! UDP (opt-in with [`Gro::with_udp`], for a TUN that accepted `TUN_F_USO4|6`): same addresses
//! and ports, only the flow's latest item may grow (no sequence numbers, so no reordering), the
//! same size rules, verified checksums (an IPv4 datagram without a checksum is not merged), and
//! the result is a `GSO_UDP_L4` super-datagram.
//!
//! Flows are found by a reverse linear scan of this batch's items: a batch holds a few flows,
//! and the common in-order case matches the last item at once. No allocation once
//! [`Gro::new`] has reserved the batch size.

use super::checksum::{self, add, l4_checksum, pseudo_header};
use super::vnet::{
    VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, IPPROTO_TCP, IPPROTO_UDP, L4,
    MAX_IP_LEN, VNET_HDR_LEN,
};
use thiserror::Error;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

#[derive(Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u8; 4],
    ack: [u8; 4],
    v6: bool,
    l4: L4,
}

impl FlowKey {
    /// Same connection whatever the ACK number.
    fn same_conn(&self, other: &FlowKey) -> bool {
        self.src == other.src
            && self.dst == other.dst
            && self.ports == other.ports
            && self.v6 == other.v6
            && self.l4 == other.l4
    }
}

enum Candidate {
    Seg(Seg),
    /// A TCP/UDP packet that cannot merge; its connection must not merge across it.
    Barrier(FlowKey),
    Other,
}

#[derive(Clone, Copy)]
struct Item {
    key: FlowKey,
    /// Index of the buffer holding the (growing) head packet.
    buf: usize,
    /// Sequence number of the first payload byte.
    seq: u32,
    /// Payload bytes held so far.
    payload: u32,
    gso_size: u16,
    merged: u16,
    ip_hdr_len: u16,
    l4_hdr_len: u16,
    psh: bool,
    /// A checksum failed: the item is sent as it is and never merged into.
    dead: bool,
}

/// Facts about one candidate segment.
#[derive(Clone, Copy)]
struct Seg {
    key: FlowKey,
    seq: u32,
    payload: u16,
    ip_hdr_len: u16,
    l4_hdr_len: u16,
    psh: bool,
}

/// Caller mistakes; nothing is changed when one is returned.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum GroError {
    #[error("offset {0} leaves no room for the {VNET_HDR_LEN}-byte virtio-net header")]
    NoHeadroom(usize),
    #[error("{bufs} buffers but {lens} lengths and room for {out} output indices")]
    SizeMismatch {
        bufs: usize,
        lens: usize,
        out: usize,
    },
    #[error("packet {index} of {len} bytes at offset {offset} overflows its {cap}-byte buffer")]
    Overflow {
        index: usize,
        len: usize,
        offset: usize,
        cap: usize,
    },
}

/// Reusable coalescing state (one per writer thread).
pub struct Gro {
    items: Vec<Item>,
    udp: bool,
}

/// Counters of one [`Gro::coalesce`] call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroStats {
    /// Packets merged into another one.
    pub merged: usize,
    /// Packets left unmerged because their TCP checksum was wrong (the kernel drops them).
    pub bad_checksum: usize,
}

impl Item {
    fn new(buf: usize, seg: &Seg, dead: bool) -> Self {
        Self {
            key: seg.key,
            buf,
            seq: seg.seq,
            payload: u32::from(seg.payload),
            gso_size: seg.payload,
            merged: 0,
            ip_hdr_len: seg.ip_hdr_len,
            l4_hdr_len: seg.l4_hdr_len,
            psh: seg.psh,
            dead,
        }
    }
}

enum Fit {
    Append,
    Prepend,
}

impl Gro {
    /// State for batches of up to `batch` packets without allocating.
    pub fn new(batch: usize) -> Self {
        Self {
            items: Vec::with_capacity(batch),
            udp: false,
        }
    }

    /// Also coalesce UDP datagrams (`GSO_UDP_L4`); only when TUN accepted `TUN_F_USO4|6`.
    pub fn with_udp(mut self, on: bool) -> Self {
        self.udp = on;
        self
    }

    /// Coalesces a batch in place. Packet `i` is `bufs[i][offset..offset + lens[i]]`; the
    /// `VNET_HDR_LEN` bytes before it receive its virtio-net header. On return `out[..n]` lists,
    /// in arrival order, the buffers to write to TUN (from `offset - VNET_HDR_LEN`, `lens[i] +
    /// VNET_HDR_LEN` bytes); buffers merged into another one are not listed.
    pub fn coalesce<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        lens: &mut [usize],
        offset: usize,
        out: &mut [usize],
    ) -> Result<(usize, GroStats), GroError> {
        if offset < VNET_HDR_LEN {
            return Err(GroError::NoHeadroom(offset));
        }
        if lens.len() != bufs.len() || out.len() < bufs.len() {
            return Err(GroError::SizeMismatch {
                bufs: bufs.len(),
                lens: lens.len(),
                out: out.len(),
            });
        }
        for (index, (b, &len)) in bufs.iter_mut().zip(lens.iter()).enumerate() {
            let cap = b.as_mut().len();
            if offset + len > cap {
                return Err(GroError::Overflow {
                    index,
                    len,
                    offset,
                    cap,
                });
            }
        }
        self.items.clear();
        let mut n = 0;
        let mut stats = GroStats::default();
        let zero = VnetHdr::default().to_bytes();
        for i in 0..bufs.len() {
            let seg = {
                let pkt = &bufs[i].as_mut()[offset..offset + lens[i]];
                candidate(pkt, self.udp)
            };
            let seg = match seg {
                Candidate::Seg(seg) => Some(seg),
                Candidate::Barrier(key) => {
                    // A packet of the same connection that cannot merge (pure ACK, FIN, RST,
                    // options...): nothing after it may merge into what came before it.
                    for it in self.items.iter_mut().filter(|it| it.key.same_conn(&key)) {
                        it.dead = true;
                    }
                    None
                }
                Candidate::Other => None,
            };
            if let Some(seg) = seg {
                match self.try_merge(bufs, lens, offset, i, &seg, &mut stats) {
                    Merge::Done => {
                        stats.merged += 1;
                        continue;
                    }
                    Merge::BadPacket if seg.key.l4 == L4::Udp => {
                        // Kept as a dead item so that no later datagram merges past it.
                        stats.bad_checksum += 1;
                        self.items.push(Item::new(i, &seg, true));
                    }
                    Merge::BadPacket => stats.bad_checksum += 1,
                    Merge::Insert => self.items.push(Item::new(i, &seg, false)),
                }
            }
            bufs[i].as_mut()[offset - VNET_HDR_LEN..offset].copy_from_slice(&zero);
            out[n] = i;
            n += 1;
        }
        for item in self.items.iter().filter(|it| it.merged > 0) {
            let buf = bufs[item.buf].as_mut();
            finish_super_packet(
                &mut buf[offset - VNET_HDR_LEN..offset + lens[item.buf]],
                item,
            );
        }
        Ok((n, stats))
    }

    fn try_merge<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        lens: &mut [usize],
        offset: usize,
        i: usize,
        seg: &Seg,
        stats: &mut GroStats,
    ) -> Merge {
        for k in (0..self.items.len()).rev() {
            let item = self.items[k];
            if item.key != seg.key {
                continue;
            }
            // UDP has no sequence numbers: only the flow's latest item may grow, or datagrams
            // would be reordered.
            let last_chance = seg.key.l4 == L4::Udp;
            if item.dead {
                if last_chance {
                    break;
                }
                continue;
            }
            let (before, rest) = bufs.split_at_mut(i);
            let head_buf = before[item.buf].as_mut();
            let pkt_buf = rest[0].as_mut();
            let head_len = lens[item.buf];
            let pkt = &pkt_buf[offset..offset + lens[i]];
            let fit = {
                let head = &head_buf[offset..offset + head_len];
                match fits(head, pkt, &item, seg) {
                    Some(f) => f,
                    None if last_chance => break,
                    None => continue,
                }
            };
            let new_len = head_len + usize::from(seg.payload);
            if new_len > MAX_IP_LEN || offset + new_len > head_buf.len() {
                if last_chance {
                    break;
                }
                continue;
            }
            if item.merged == 0 && !l4_checksum_ok(&head_buf[offset..offset + head_len], &item) {
                self.items[k].dead = true;
                stats.bad_checksum += 1;
                if last_chance {
                    break;
                }
                continue;
            }
            if !l4_checksum_ok(pkt, &item) {
                return Merge::BadPacket;
            }
            let hdrs = usize::from(item.ip_hdr_len + item.l4_hdr_len);
            let it = &mut self.items[k];
            match fit {
                Fit::Append => {
                    head_buf[offset + head_len..offset + new_len].copy_from_slice(&pkt[hdrs..]);
                    if seg.psh {
                        it.psh = true;
                        head_buf[offset + usize::from(item.ip_hdr_len) + 13] |= TCP_PSH;
                    }
                }
                Fit::Prepend => {
                    let start = offset + hdrs;
                    head_buf
                        .copy_within(start..offset + head_len, start + usize::from(seg.payload));
                    head_buf[offset..offset + pkt.len()].copy_from_slice(pkt);
                    if item.psh {
                        head_buf[offset + usize::from(item.ip_hdr_len) + 13] |= TCP_PSH;
                    }
                    it.seq = seg.seq;
                    it.gso_size = it.gso_size.max(seg.payload);
                }
            }
            it.payload += u32::from(seg.payload);
            it.merged += 1;
            lens[item.buf] = new_len;
            return Merge::Done;
        }
        Merge::Insert
    }
}

enum Merge {
    Done,
    Insert,
    BadPacket,
}

/// Parses a GRO candidate: IPv4 (no options, not a fragment, valid header checksum) or IPv6
/// (L4 right after the fixed header), length fields exact, non-empty payload; TCP with flags
/// ACK or ACK|PSH; UDP (when enabled) with an exact length field and, over IPv4, a checksum
/// present to verify. Other TCP/UDP packets whose ports can be read are barriers.
fn candidate(pkt: &[u8], udp: bool) -> Candidate {
    let Ok(ip) = super::vnet::parse_ip(pkt) else {
        return Candidate::Other;
    };
    let iph = usize::from(ip.hdr_len);
    let l4 = match ip.proto {
        IPPROTO_TCP => L4::Tcp,
        IPPROTO_UDP if udp => L4::Udp,
        _ => return Candidate::Other,
    };
    if ip.fragment || pkt.len() < iph + 8 {
        return Candidate::Other;
    }
    let mut key = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        ports: [0; 4],
        ack: [0; 4],
        v6: ip.v6,
        l4,
    };
    if ip.v6 {
        key.src.copy_from_slice(&pkt[8..24]);
        key.dst.copy_from_slice(&pkt[24..40]);
    } else {
        key.src[..4].copy_from_slice(&pkt[12..16]);
        key.dst[..4].copy_from_slice(&pkt[16..20]);
    }
    key.ports.copy_from_slice(&pkt[iph..iph + 4]);
    match segment(pkt, &ip, &mut key) {
        Some(seg) => Candidate::Seg(seg),
        None => Candidate::Barrier(key),
    }
}

fn segment(pkt: &[u8], ip: &super::vnet::IpInfo, key: &mut FlowKey) -> Option<Seg> {
    // The merged header is rebuilt, so a corrupt one would be laundered: the kernel would have
    // dropped it (inet_gro_receive checks it too).
    if ip.options || (!ip.v6 && checksum::sum_wide(&pkt[..20]) != 0xffff) {
        return None;
    }
    let iph = usize::from(ip.hdr_len);
    let (l4h, seq, psh) = match key.l4 {
        L4::Tcp => {
            let tcph = usize::from(*pkt.get(iph + 12)? >> 4) * 4;
            if tcph < 20 || pkt.len() < iph + tcph {
                return None;
            }
            let psh = match pkt[iph + 13] {
                TCP_ACK => false,
                f if f == TCP_ACK | TCP_PSH => true,
                _ => return None,
            };
            key.ack.copy_from_slice(&pkt[iph + 8..iph + 12]);
            let seq = u32::from_be_bytes([pkt[iph + 4], pkt[iph + 5], pkt[iph + 6], pkt[iph + 7]]);
            (tcph, seq, psh)
        }
        L4::Udp => {
            let h = &pkt[iph..iph + 8];
            if usize::from(u16::from_be_bytes([h[4], h[5]])) != pkt.len() - iph
                || (!ip.v6 && h[6] == 0 && h[7] == 0)
            {
                return None;
            }
            (8, 0, false)
        }
    };
    let payload = pkt.len() - iph - l4h;
    if payload == 0 {
        return None;
    }
    Some(Seg {
        key: *key,
        seq,
        payload: payload as u16,
        ip_hdr_len: ip.hdr_len,
        l4_hdr_len: l4h as u16,
        psh,
    })
}

fn ip_headers_match(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        a[..4] == b[..4] && a[7] == b[7]
    } else {
        a[1] == b[1] && a[6] >> 5 == b[6] >> 5 && a[8] == b[8]
    }
}

fn fits(head: &[u8], pkt: &[u8], item: &Item, seg: &Seg) -> Option<Fit> {
    if seg.l4_hdr_len != item.l4_hdr_len
        || seg.ip_hdr_len != item.ip_hdr_len
        || !ip_headers_match(head, pkt, item.key.v6)
    {
        return None;
    }
    // Nothing follows a short segment, and none is bigger than the first.
    let can_append = item.payload % u32::from(item.gso_size) == 0 && seg.payload <= item.gso_size;
    if item.key.l4 == L4::Udp {
        return can_append.then_some(Fit::Append);
    }
    let opts = usize::from(item.ip_hdr_len) + 20..usize::from(item.ip_hdr_len + item.l4_hdr_len);
    if head[opts.clone()] != pkt[opts] {
        return None;
    }
    if seg.seq == item.seq.wrapping_add(item.payload) {
        // Nor anything after a PSH.
        return (can_append && !item.psh).then_some(Fit::Append);
    }
    if seg.seq.wrapping_add(u32::from(seg.payload)) == item.seq {
        if seg.psh
            || seg.payload < item.gso_size
            || (seg.payload > item.gso_size && item.merged > 0)
        {
            return None;
        }
        return Some(Fit::Prepend);
    }
    None
}

fn l4_checksum_ok(pkt: &[u8], item: &Item) -> bool {
    let iph = usize::from(item.ip_hdr_len);
    let proto = item.key.l4.proto();
    let pseudo = pseudo_header(pkt, item.key.v6, proto, (pkt.len() - iph) as u32);
    l4_checksum(pseudo, &pkt[iph..]) == 0
}

/// `frame` is the virtio-net header followed by the merged packet.
fn finish_super_packet(frame: &mut [u8], item: &Item) {
    let iph = usize::from(item.ip_hdr_len);
    let l4 = item.key.l4;
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: match (l4, item.key.v6) {
            (L4::Udp, _) => GSO_UDP_L4,
            (L4::Tcp, true) => GSO_TCPV6,
            (L4::Tcp, false) => GSO_TCPV4,
        },
        hdr_len: item.ip_hdr_len + item.l4_hdr_len,
        gso_size: item.gso_size,
        csum_start: item.ip_hdr_len,
        csum_offset: l4.csum_offset(),
    };
    frame[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
    let pkt = &mut frame[VNET_HDR_LEN..];
    let l4_len = pkt.len() - iph;
    if item.key.v6 {
        pkt[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        let total = pkt.len() as u16;
        pkt[2..4].copy_from_slice(&total.to_be_bytes());
        checksum::ipv4_header_fix(&mut pkt[..iph]);
    }
    if l4 == L4::Udp {
        pkt[iph + 4..iph + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    let pseudo = add(
        pseudo_header(pkt, item.key.v6, l4.proto(), 0),
        checksum::fold64(l4_len as u64),
    );
    let at = iph + usize::from(l4.csum_offset());
    pkt[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
}
