//! Packet builders shared by the offload tests: every checksum comes from the RFC 1071
//! reference, never from the code under test.
#![allow(dead_code)]

use skymesh_agent_core::offload::checksum::sum_reference;
use skymesh_agent_core::offload::vnet::{F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6};
use skymesh_agent_core::offload::{
    split, BatchSink, Gro, GsoPlan, L4Csum, Offload, VnetHdr, VNET_HDR_LEN,
};

pub(crate) const ACK: u8 = 0x10;
pub(crate) const PSH: u8 = 0x08;
pub(crate) const FIN: u8 = 0x01;
pub(crate) const CWR: u8 = 0x80;
pub(crate) const SYN: u8 = 0x02;

#[derive(Clone, Debug)]
pub(crate) struct Flow {
    pub(crate) v6: bool,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) ack: u32,
    pub(crate) ttl: u8,
    pub(crate) tos: u8,
    pub(crate) tcp_opts: Vec<u8>,
}

pub(crate) fn flow(v6: bool) -> Flow {
    Flow {
        v6,
        sport: 40_000,
        dport: 5201,
        ack: 0x1122_3344,
        ttl: 64,
        tos: 0,
        // NOP NOP timestamp, as Linux sends on every segment.
        tcp_opts: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
    }
}

pub(crate) fn addrs(v6: bool) -> (Vec<u8>, Vec<u8>) {
    if v6 {
        let mut s = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut d = s.clone();
        d[15] = 2;
        s[2] = 0x5a;
        d[2] = 0x5a;
        (s, d)
    } else {
        (vec![10, 77, 0, 1], vec![10, 77, 0, 2])
    }
}

pub(crate) fn pseudo_bytes(v6: bool, proto: u8, l4_len: usize) -> Vec<u8> {
    let (s, d) = addrs(v6);
    let mut b = [s, d].concat();
    if v6 {
        b.extend_from_slice(&(l4_len as u32).to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        b.extend_from_slice(&[0, proto]);
        b.extend_from_slice(&(l4_len as u16).to_be_bytes());
    }
    b
}

/// IP header for `l4_len` bytes of protocol `proto`, IPv4 checksum filled in.
pub(crate) fn ip_header(f: &Flow, proto: u8, id: u16, l4_len: usize) -> Vec<u8> {
    let (s, d) = addrs(f.v6);
    if f.v6 {
        let mut h = vec![0x60 | (f.tos >> 4), f.tos << 4, 0x12, 0x34];
        h.extend_from_slice(&(l4_len as u16).to_be_bytes());
        h.extend_from_slice(&[proto, f.ttl]);
        h.extend_from_slice(&s);
        h.extend_from_slice(&d);
        h
    } else {
        let mut h = vec![0x45, f.tos];
        h.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&[0x40, 0, f.ttl, proto, 0, 0]);
        h.extend_from_slice(&s);
        h.extend_from_slice(&d);
        let c = !sum_reference(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }
}

/// A complete TCP segment with a valid checksum.
pub(crate) fn tcp_packet(f: &Flow, id: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let tcph = 20 + f.tcp_opts.len();
    let mut t = Vec::new();
    t.extend_from_slice(&f.sport.to_be_bytes());
    t.extend_from_slice(&f.dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&f.ack.to_be_bytes());
    t.extend_from_slice(&[((tcph / 4) as u8) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(&f.tcp_opts);
    t.extend_from_slice(payload);
    let c = !sum_reference(&[pseudo_bytes(f.v6, 6, t.len()), t.clone()].concat());
    t[16..18].copy_from_slice(&c.to_be_bytes());
    [ip_header(f, 6, id, t.len()), t].concat()
}

pub(crate) fn udp_packet(f: &Flow, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&f.sport.to_be_bytes());
    u.extend_from_slice(&f.dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut c = !sum_reference(&[pseudo_bytes(f.v6, 17, u.len()), u.clone()].concat());
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    [ip_header(f, 17, id, u.len()), u].concat()
}

/// What Linux TUN hands us for a TSO/USO super-packet: the L4 checksum field holds the
/// pseudo-header sum (CHECKSUM_PARTIAL).
pub(crate) fn as_partial(mut pkt: Vec<u8>, v6: bool, proto: u8) -> Vec<u8> {
    let iph = if v6 { 40 } else { 20 };
    let at = iph + if proto == 6 { 16 } else { 6 };
    let p = sum_reference(&pseudo_bytes(v6, proto, pkt.len() - iph));
    pkt[at..at + 2].copy_from_slice(&p.to_be_bytes());
    pkt
}

pub(crate) fn payload(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

pub(crate) fn tso_hdr(v6: bool, mss: u16, hdr_len: u16) -> VnetHdr {
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len,
        gso_size: mss,
        csum_start: if v6 { 40 } else { 20 },
        csum_offset: 16,
    }
}

pub(crate) fn plan_of(hdr: &VnetHdr, pkt: &[u8]) -> GsoPlan {
    match hdr.classify(pkt) {
        Ok(Offload::Segment(p)) => p,
        other => panic!("expected a segmentation plan, got {other:?}"),
    }
}

pub(crate) fn split_all(pkt: &[u8], plan: &GsoPlan, csum: L4Csum) -> Vec<Vec<u8>> {
    let mut bufs = vec![[0u8; 2048]; 64];
    let mut lens = [0usize; 64];
    let n = {
        let mut sink = BatchSink::new(&mut bufs, &mut lens, 16);
        split(pkt, plan, csum, &mut sink).expect("split")
    };
    (0..n).map(|i| bufs[i][16..16 + lens[i]].to_vec()).collect()
}

pub(crate) fn l4_ok(pkt: &[u8], v6: bool, proto: u8) -> bool {
    let iph = if v6 { 40 } else { 20 };
    sum_reference(
        &[
            pseudo_bytes(v6, proto, pkt.len() - iph),
            pkt[iph..].to_vec(),
        ]
        .concat(),
    ) == 0xffff
}

pub(crate) fn ipv4_ok(pkt: &[u8]) -> bool {
    sum_reference(&pkt[..20]) == 0xffff
}

pub(crate) const OFF: usize = 16;

/// Loads packets into 64 KiB buffers with `OFF` bytes of headroom, as the receive path would.
pub(crate) fn load(pkts: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<usize>) {
    let bufs = pkts
        .iter()
        .map(|p| {
            let mut b = vec![0u8; OFF + 65_535];
            b[OFF..OFF + p.len()].copy_from_slice(p);
            b
        })
        .collect();
    (bufs, pkts.iter().map(Vec::len).collect())
}

/// Runs GRO and returns the frames it would write: (vnet header, packet).
pub(crate) fn gro(pkts: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
    gro_with(pkts, false)
}

pub(crate) fn gro_with(pkts: &[Vec<u8>], udp: bool) -> Vec<(VnetHdr, Vec<u8>)> {
    let (mut bufs, mut lens) = load(pkts);
    let mut out = vec![0usize; pkts.len()];
    let mut g = Gro::new(pkts.len()).with_udp(udp);
    let (n, _) = g
        .coalesce(&mut bufs, &mut lens, OFF, &mut out)
        .expect("coalesce");
    out[..n]
        .iter()
        .map(|&i| {
            let h = VnetHdr::decode(&bufs[i][OFF - VNET_HDR_LEN..]).expect("header");
            (h, bufs[i][OFF..OFF + lens[i]].to_vec())
        })
        .collect()
}

/// What the kernel does with a frame we write: segments it back (the GSO of our own split).
pub(crate) fn resegment((h, pkt): &(VnetHdr, Vec<u8>)) -> Vec<Vec<u8>> {
    match h.classify(pkt).expect("GRO output must classify") {
        Offload::None => vec![pkt.clone()],
        Offload::Segment(plan) => split_all(pkt, &plan, L4Csum::Full),
        Offload::Checksum { .. } => panic!("GRO never emits a bare checksum job"),
    }
}

pub(crate) fn stream(f: &Flow, seq0: u32, sizes: &[usize], psh_last: bool) -> Vec<Vec<u8>> {
    let mut seq = seq0;
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let last = i + 1 == sizes.len();
            let flags = if last && psh_last { ACK | PSH } else { ACK };
            let p = tcp_packet(
                f,
                500u16.wrapping_add(i as u16),
                seq,
                flags,
                &payload(n, i as u8),
            );
            seq = seq.wrapping_add(n as u32);
            p
        })
        .collect()
}
