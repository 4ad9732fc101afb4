//! GRO coalescing into super-packets, checked field by field and as a round trip through
//! GSO split (what the kernel does with the frames we write).

mod offload_util;

use offload_util::*;
use proptest::prelude::*;
use skymesh_agent_core::offload::vnet::{F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};
use skymesh_agent_core::offload::{Gro, VnetHdr};

#[test]
fn forty_four_in_order_segments_become_one_super_packet_and_split_back_exactly() {
    for v6 in [false, true] {
        let f = flow(v6);
        let mut sizes = vec![1448; 43];
        sizes.push(600);
        let segs = stream(&f, 7, &sizes, true);
        let frames = gro(&segs);
        assert_eq!(frames.len(), 1);
        let (h, pkt) = &frames[0];
        let iph: u16 = if v6 { 40 } else { 20 };
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert_eq!(h.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
        assert_eq!(h.gso_size, 1448);
        assert_eq!((h.csum_start, h.csum_offset), (iph, 16));
        assert_eq!(h.hdr_len, iph + 32);
        assert_eq!(pkt.len(), usize::from(iph) + 32 + 43 * 1448 + 600);
        if !v6 {
            assert!(ipv4_ok(pkt));
        }
        assert_eq!(resegment(&frames[0]), segs);
    }
}

#[test]
fn interleaved_flows_coalesce_separately_and_keep_their_order() {
    let a = flow(false);
    let mut b = flow(false);
    b.sport = 40_001;
    let sa = stream(&a, 1, &[1000; 4], false);
    let sb = stream(&b, 9, &[1000; 4], false);
    let mixed: Vec<_> = sa
        .iter()
        .zip(&sb)
        .flat_map(|(x, y)| [x.clone(), y.clone()])
        .collect();
    let frames = gro(&mixed);
    assert_eq!(frames.len(), 2);
    assert_eq!(resegment(&frames[0]), sa);
    assert_eq!(resegment(&frames[1]), sb);
}

#[test]
fn packets_that_must_not_coalesce_pass_through_unchanged() {
    let f = flow(false);
    let base = stream(&f, 1, &[1000; 2], false);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push((
        "SYN",
        tcp_packet(&f, 501, 1001, SYN | ACK, &payload(1000, 1)),
    ));
    let mut ttl = f.clone();
    ttl.ttl = 63;
    cases.push(("TTL", tcp_packet(&ttl, 501, 1001, ACK, &payload(1000, 1))));
    let mut tos = f.clone();
    tos.tos = 0x10;
    cases.push(("TOS", tcp_packet(&tos, 501, 1001, ACK, &payload(1000, 1))));
    let mut ack = f.clone();
    ack.ack += 1;
    cases.push((
        "ACK number",
        tcp_packet(&ack, 501, 1001, ACK, &payload(1000, 1)),
    ));
    let mut opts = f.clone();
    opts.tcp_opts[11] = 3;
    cases.push((
        "TCP options",
        tcp_packet(&opts, 501, 1001, ACK, &payload(1000, 1)),
    ));
    cases.push(("gap", tcp_packet(&f, 501, 1002, ACK, &payload(1000, 1))));
    cases.push(("empty payload", tcp_packet(&f, 501, 1001, ACK, &[])));
    cases.push((
        "bigger than first",
        tcp_packet(&f, 501, 1001, ACK, &payload(1001, 1)),
    ));
    let mut bad = tcp_packet(&f, 501, 1001, ACK, &payload(1000, 1));
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    cases.push(("bad checksum", bad));
    let mut bad_ip = tcp_packet(&f, 501, 1001, ACK, &payload(1000, 1));
    bad_ip[5] ^= 0x01; // IP id: not covered by the TCP checksum
    cases.push(("bad IPv4 header checksum", bad_ip));
    let udp = udp_packet(&f, 3, &payload(1000, 1));
    cases.push(("UDP", udp));
    for (what, pkt) in cases {
        let input = vec![base[0].clone(), pkt.clone()];
        let frames = gro(&input);
        assert_eq!(frames.len(), 2, "{what} must not merge");
        assert_eq!(frames[0], (VnetHdr::default(), base[0].clone()), "{what}");
        assert_eq!(frames[1], (VnetHdr::default(), pkt), "{what}");
    }
}

#[test]
fn a_head_with_a_bad_checksum_is_sent_alone_and_the_next_segment_starts_afresh() {
    let f = flow(false);
    let mut s = stream(&f, 1, &[1000; 3], false);
    s[0][60] ^= 0x01;
    let (mut bufs, mut lens) = load(&s);
    let mut out = [0usize; 3];
    let (n, stats) = Gro::new(3)
        .coalesce(&mut bufs, &mut lens, OFF, &mut out)
        .expect("coalesce");
    assert_eq!((n, stats.merged, stats.bad_checksum), (2, 1, 1));
    assert_eq!(&bufs[0][OFF..OFF + lens[0]], &s[0][..]);
    let frames = gro(&s);
    assert_eq!(frames[0], (VnetHdr::default(), s[0].clone()));
    assert_eq!(resegment(&frames[1]), s[1..].to_vec());
}

#[test]
fn a_pure_ack_or_fin_of_the_connection_stops_merging_across_it() {
    let f = flow(false);
    let s = stream(&f, 1, &[1000; 3], false);
    for (what, barrier) in [
        ("pure ACK", tcp_packet(&f, 9, 1001, ACK, &[])),
        ("FIN", tcp_packet(&f, 9, 1001, ACK | FIN, &[])),
    ] {
        let batch = vec![s[0].clone(), barrier.clone(), s[1].clone(), s[2].clone()];
        let frames = gro(&batch);
        assert_eq!(frames.len(), 3, "{what}");
        assert_eq!(frames[0], (VnetHdr::default(), s[0].clone()), "{what}");
        assert_eq!(frames[1], (VnetHdr::default(), barrier), "{what}");
        assert_eq!(resegment(&frames[2]), s[1..].to_vec(), "{what}");
    }
}

#[test]
fn nothing_is_appended_after_a_psh_or_a_short_segment() {
    let f = flow(true);
    let after_psh = stream(&f, 1, &[1000, 1000], true);
    let more = tcp_packet(&f, 0, 2001, ACK, &payload(1000, 2));
    let frames = gro(&[after_psh[0].clone(), after_psh[1].clone(), more.clone()]);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1].1, more);

    let short = stream(&f, 1, &[1000, 500], false);
    let more = tcp_packet(&f, 0, 1501, ACK, &payload(500, 2));
    let frames = gro(&[short[0].clone(), short[1].clone(), more.clone()]);
    assert_eq!(frames.len(), 2);
    assert_eq!(resegment(&frames[0]), short);
}

#[test]
fn an_out_of_order_predecessor_is_prepended() {
    let f = flow(false);
    let s = stream(&f, 100, &[800, 800, 800], false);
    let frames = gro(&[s[1].clone(), s[2].clone(), s[0].clone()]);
    assert_eq!(frames.len(), 1);
    let back = resegment(&frames[0]);
    // IPv4 ids are renumbered from the prepended head; everything else is the original.
    assert_eq!(back.len(), 3);
    for (got, want) in back.iter().zip(&s) {
        assert_eq!(got[20..], want[20..]);
        assert!(ipv4_ok(got));
    }
}

#[test]
fn udp_datagrams_coalesce_into_a_uso_super_datagram_when_enabled() {
    for v6 in [false, true] {
        let f = flow(v6);
        let dgrams: Vec<_> = [1200, 1200, 1200, 700]
            .iter()
            .enumerate()
            .map(|(i, &n)| udp_packet(&f, 7 + i as u16, &payload(n, i as u8)))
            .collect();
        let frames = gro_with(&dgrams, true);
        assert_eq!(frames.len(), 1);
        let (h, pkt) = &frames[0];
        assert_eq!(
            (h.gso_type, h.gso_size, h.csum_offset),
            (GSO_UDP_L4, 1200, 6)
        );
        assert_eq!(pkt.len(), if v6 { 40 } else { 20 } + 8 + 4300);
        assert_eq!(resegment(&frames[0]), dgrams);
        // Off by default: a TUN without USO gets them one by one.
        assert_eq!(gro(&dgrams).len(), 4);
    }
}

#[test]
fn udp_never_merges_past_a_datagram_that_did_not_fit() {
    let f = flow(false);
    let mut other = f.clone();
    other.sport += 1;
    let a = udp_packet(&f, 1, &payload(1000, 1));
    let big = udp_packet(&f, 2, &payload(1100, 2));
    let c = udp_packet(&f, 3, &payload(1000, 3));
    let d = udp_packet(&other, 4, &payload(1000, 4));
    let frames = gro_with(&[a.clone(), big.clone(), c.clone(), d.clone()], true);
    // `big` cannot follow `a`; `c` may follow `big` (smaller), never `a`.
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0], (VnetHdr::default(), a));
    assert_eq!(resegment(&frames[1]), vec![big, c]);
    assert_eq!(frames[2], (VnetHdr::default(), d));

    // IPv4 datagrams without a checksum cannot be verified and are not merged.
    let mut z1 = udp_packet(&f, 1, &payload(1000, 1));
    let mut z2 = udp_packet(&f, 2, &payload(1000, 2));
    for z in [&mut z1, &mut z2] {
        z[26] = 0;
        z[27] = 0;
    }
    assert_eq!(gro_with(&[z1, z2], true).len(), 2);
}

#[test]
fn caller_mistakes_are_errors_and_change_nothing() {
    let f = flow(false);
    let s = stream(&f, 1, &[1000; 2], false);
    let (mut bufs, mut lens) = load(&s);
    let snapshot = bufs.clone();
    let mut g = Gro::new(2);
    let mut out = [0usize; 2];
    assert!(g.coalesce(&mut bufs, &mut lens, 4, &mut out).is_err());
    assert!(g
        .coalesce(&mut bufs, &mut lens, OFF, &mut out[..1])
        .is_err());
    lens[1] = 70_000;
    assert!(g.coalesce(&mut bufs, &mut lens, OFF, &mut out).is_err());
    assert_eq!(bufs, snapshot);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gso_of_gro_gives_back_the_segments_with_valid_checksums(
        v6 in any::<bool>(),
        udp in any::<bool>(),
        mss in 1usize..1500,
        full in 1usize..48,
        tail in 0usize..1500,
        seq0 in any::<u32>(),
        psh in any::<bool>(),
    ) {
        let f = flow(v6);
        let mut sizes = vec![mss; full];
        if tail % mss != 0 {
            sizes.push(tail % mss);
        }
        let iph = if v6 { 40 } else { 20 };
        // Keep within one IP packet so a single super-packet is the expected result.
        while iph + 32 + sizes.iter().sum::<usize>() > 65_535 {
            sizes.pop();
        }
        let (segs, proto) = if udp {
            let d: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| udp_packet(&f, 500u16.wrapping_add(i as u16), &payload(n, i as u8)))
                .collect();
            (d, 17)
        } else {
            (stream(&f, seq0, &sizes, psh), 6)
        };
        let frames = gro_with(&segs, udp);
        prop_assert_eq!(frames.len(), 1);
        let back = resegment(&frames[0]);
        for s in &back {
            prop_assert!(l4_ok(s, v6, proto));
            if !v6 {
                prop_assert!(ipv4_ok(s));
            }
        }
        prop_assert_eq!(back, segs);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever arrives (real segments of two flows, shuffled, some corrupted, plus junk),
    /// GRO never panics, and every frame it emits is either an untouched input with a zero
    /// header or a super-packet whose segments all carry valid checksums.
    #[test]
    fn gro_output_is_always_valid_whatever_the_batch(
        order in proptest::collection::vec(any::<u16>(), 1..40),
        corrupt in proptest::collection::vec(any::<u16>(), 0..4),
        junk in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..4),
        udp in any::<bool>(),
        v6 in any::<bool>(),
    ) {
        let a = flow(v6);
        let mut b = flow(v6);
        b.sport = 1;
        let mut pool = stream(&a, 1, &[900; 20], true);
        pool.extend(stream(&b, 5, &[700; 10], false));
        pool.extend((0..6).map(|i| udp_packet(&a, i, &payload(500, i as u8))));
        let mut batch: Vec<Vec<u8>> = order.iter().map(|&k| pool[usize::from(k) % pool.len()].clone()).collect();
        for &c in &corrupt {
            let n = batch.len();
            let p = &mut batch[usize::from(c) % n];
            let at = usize::from(c) % p.len();
            p[at] ^= 0x20;
        }
        batch.extend(junk);
        for (h, pkt) in gro_with(&batch, udp) {
            if h == VnetHdr::default() {
                prop_assert!(batch.contains(&pkt));
                continue;
            }
            let v6 = pkt[0] >> 4 == 6;
            let proto = if v6 { pkt[6] } else { pkt[9] };
            let segs = resegment(&(h, pkt));
            prop_assert!(segs.len() >= 2);
            for s in &segs {
                prop_assert!(l4_ok(s, v6, proto));
                if !v6 {
                    prop_assert!(ipv4_ok(s));
                }
            }
        }
    }
}
