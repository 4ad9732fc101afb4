//! GSO split of TUN super-packets and the virtio-net header checks, on packets built
//! independently (checksums from the RFC 1071 reference), checked field by field.

mod offload_util;

use offload_util::*;
use proptest::prelude::*;
use skymesh_agent_core::offload::checksum::sum_reference;
use skymesh_agent_core::offload::vnet::{
    F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
};
use skymesh_agent_core::offload::{
    finish_checksum, split, tun_read, BatchSink, GsoError, GsoPlan, L4Csum, Offload, OffloadError,
    VnetError, VnetHdr, L4,
};

#[test]
fn tso4_super_packet_splits_like_the_kernel_would() {
    let f = flow(false);
    let data = payload(64_000 - 52, 7);
    let seq0 = 0xffff_f000; // wraps inside the burst
    let sup = as_partial(
        tcp_packet(&f, 0xfffe, seq0, ACK | PSH | FIN | CWR, &data),
        false,
        6,
    );
    let plan = plan_of(&tso_hdr(false, 1448, 52), &sup);
    assert_eq!(plan.segments(), data.len().div_ceil(1448));
    let segs = split_all(&sup, &plan, L4Csum::Full);
    assert_eq!(segs.len(), plan.segments());
    let mut joined = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let chunk = &data[i * 1448..((i + 1) * 1448).min(data.len())];
        assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
        assert_eq!(
            u16::from_be_bytes([s[4], s[5]]),
            0xfffe_u16.wrapping_add(i as u16)
        );
        assert!(ipv4_ok(s), "IPv4 checksum of segment {i}");
        assert!(l4_ok(s, false, 6), "TCP checksum of segment {i}");
        let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
        assert_eq!(seq, seq0.wrapping_add(i as u32 * 1448));
        let flags = s[33];
        assert_eq!(
            flags & (PSH | FIN) != 0,
            last,
            "PSH/FIN only on the last segment"
        );
        assert_eq!(flags & CWR != 0, i == 0, "CWR only on the first segment");
        assert_eq!(flags & ACK, ACK);
        assert_eq!(&s[52..], chunk);
        // Everything but the rewritten fields is the super-packet's header.
        assert_eq!(&s[12..20], &sup[12..20]);
        assert_eq!(&s[40..52], &sup[40..52]);
        joined.extend_from_slice(&s[52..]);
    }
    assert_eq!(joined, data);
}

#[test]
fn tso6_segments_carry_payload_length_and_valid_checksums() {
    let f = flow(true);
    let data = payload(10_000, 3);
    let sup = as_partial(tcp_packet(&f, 0, 1000, ACK | PSH, &data), true, 6);
    // hdr_len from a forwarded skb covers the whole first packet: it must not be trusted.
    let plan = plan_of(&tso_hdr(true, 1400, 1472), &sup);
    assert_eq!(plan.hdr_len, 72);
    let segs = split_all(&sup, &plan, L4Csum::Full);
    assert_eq!(segs.len(), 8);
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
        assert!(l4_ok(s, true, 6));
        assert_eq!(&s[..4], &sup[..4]);
        assert_eq!(s[40 + 13] & PSH != 0, i == 7);
    }
    assert_eq!(segs[7].len(), 72 + 10_000 - 7 * 1400);
}

#[test]
fn uso_splits_udp_with_per_segment_length_and_checksum() {
    for v6 in [false, true] {
        let f = flow(v6);
        let data = payload(5000, 9);
        let sup = as_partial(udp_packet(&f, 100, &data), v6, 17);
        let iph: u16 = if v6 { 40 } else { 20 };
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: iph + 8,
            gso_size: 1200,
            csum_start: iph,
            csum_offset: 6,
        };
        let plan = plan_of(&hdr, &sup);
        assert_eq!(plan.l4, L4::Udp);
        let segs = split_all(&sup, &plan, L4Csum::Full);
        assert_eq!(segs.len(), 5);
        let mut joined = Vec::new();
        for s in &segs {
            let u = usize::from(iph);
            assert_eq!(
                usize::from(u16::from_be_bytes([s[u + 4], s[u + 5]])),
                s.len() - u
            );
            assert!(l4_ok(s, v6, 17));
            if !v6 {
                assert!(ipv4_ok(s));
            }
            joined.extend_from_slice(&s[u + 8..]);
        }
        assert_eq!(joined, data);
    }
}

#[test]
fn partial_mode_leaves_the_pseudo_header_sum_that_finish_checksum_completes() {
    let f = flow(false);
    let data = payload(3000, 1);
    let sup = as_partial(tcp_packet(&f, 1, 5, ACK, &data), false, 6);
    let plan = plan_of(&tso_hdr(false, 1000, 52), &sup);
    for mut s in split_all(&sup, &plan, L4Csum::Partial) {
        let want = sum_reference(&pseudo_bytes(false, 6, s.len() - 20));
        assert_eq!(u16::from_be_bytes([s[36], s[37]]), want);
        assert!(!l4_ok(&s, false, 6));
        finish_checksum(&mut s, 20, 16);
        assert!(l4_ok(&s, false, 6));
    }
}

#[test]
fn needs_csum_without_gso_is_finished_in_place() {
    let f = flow(true);
    let full = udp_packet(&f, 0, &payload(333, 4));
    let mut pkt = as_partial(full.clone(), true, 17);
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_NONE,
        csum_start: 40,
        csum_offset: 6,
        ..VnetHdr::default()
    };
    let Ok(Offload::Checksum { start, offset }) = hdr.classify(&pkt) else {
        panic!("expected a checksum job");
    };
    finish_checksum(&mut pkt, start, offset);
    assert_eq!(pkt, full);
}

#[test]
fn tun_read_handles_plain_partial_and_super_frames() {
    let f = flow(false);
    let plain = udp_packet(&f, 1, &payload(100, 1));
    let sup = as_partial(tcp_packet(&f, 1, 5, ACK, &payload(3000, 1)), false, 6);
    let partial = as_partial(plain.clone(), false, 17);
    let csum_hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 6,
        ..VnetHdr::default()
    };
    let cases = [
        (VnetHdr::default(), plain.clone(), vec![plain.clone()]),
        (csum_hdr, partial, vec![plain.clone()]),
        (
            tso_hdr(false, 1000, 52),
            sup.clone(),
            split_all(
                &sup,
                &plan_of(&tso_hdr(false, 1000, 52), &sup),
                L4Csum::Full,
            ),
        ),
    ];
    for (hdr, pkt, want) in cases {
        let mut frame = [hdr.to_bytes().to_vec(), pkt].concat();
        let mut bufs = vec![[0u8; 2048]; 4];
        let mut lens = [0usize; 4];
        let mut sink = BatchSink::new(&mut bufs, &mut lens, 0);
        let n = tun_read(&mut frame, L4Csum::Full, &mut sink).expect("tun_read");
        let got: Vec<Vec<u8>> = (0..n).map(|i| bufs[i][..lens[i]].to_vec()).collect();
        assert_eq!(got, want);
    }
    let mut short = [0u8; 6];
    let mut bufs = vec![[0u8; 2048]; 1];
    let mut lens = [0usize; 1];
    let mut sink = BatchSink::new(&mut bufs, &mut lens, 0);
    assert_eq!(
        tun_read(&mut short, L4Csum::Full, &mut sink),
        Err(OffloadError::Vnet(VnetError::ShortHeader(6)))
    );
}

#[test]
fn a_hand_made_plan_that_contradicts_the_packet_is_refused() {
    let f = flow(false);
    let sup = as_partial(tcp_packet(&f, 1, 5, ACK, &payload(3000, 1)), false, 6);
    let good = plan_of(&tso_hdr(false, 1000, 52), &sup);
    let mut bufs = vec![[0u8; 2048]; 8];
    let mut lens = [0usize; 8];
    for bad in [
        GsoPlan {
            gso_size: 0,
            ..good
        },
        GsoPlan {
            ip_hdr_len: 8,
            ..good
        },
        GsoPlan {
            hdr_len: 30,
            payload_len: 3022,
            ..good
        },
        GsoPlan {
            payload_len: 1,
            ..good
        },
        GsoPlan { v6: true, ..good },
    ] {
        let mut sink = BatchSink::new(&mut bufs, &mut lens, 0);
        assert!(
            matches!(
                split(&sup, &bad, L4Csum::Full, &mut sink),
                Err(GsoError::PlanMismatch { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn running_out_of_output_buffers_is_an_error_not_a_panic() {
    let f = flow(false);
    let sup = as_partial(tcp_packet(&f, 1, 5, ACK, &payload(5000, 1)), false, 6);
    let plan = plan_of(&tso_hdr(false, 1000, 52), &sup);
    let mut bufs = vec![[0u8; 1100]; 3];
    let mut lens = [0usize; 3];
    let mut sink = BatchSink::new(&mut bufs, &mut lens, 0);
    assert_eq!(
        split(&sup, &plan, L4Csum::Full, &mut sink),
        Err(GsoError::OutOfBuffers {
            written: 3,
            needed: 5
        })
    );
    // Buffers too small for one segment.
    let mut small = vec![[0u8; 500]; 8];
    let mut lens = [0usize; 8];
    let mut sink = BatchSink::new(&mut small, &mut lens, 0);
    assert!(split(&sup, &plan, L4Csum::Full, &mut sink).is_err());
}

#[test]
fn headers_that_contradict_the_packet_are_refused_with_the_reason() {
    let f4 = flow(false);
    let tcp4 = as_partial(tcp_packet(&f4, 1, 5, ACK, &payload(3000, 1)), false, 6);
    let h = tso_hdr(false, 1000, 52);
    let with = |g: fn(&mut VnetHdr)| {
        let mut x = h;
        g(&mut x);
        x
    };
    assert!(matches!(
        with(|x| x.gso_type = GSO_TCPV6).classify(&tcp4),
        Err(VnetError::VersionMismatch { .. })
    ));
    assert!(matches!(
        with(|x| x.gso_type = GSO_UDP_L4).classify(&tcp4),
        Err(VnetError::ProtocolMismatch { .. })
    ));
    assert!(matches!(
        with(|x| x.csum_start = 24).classify(&tcp4),
        Err(VnetError::CsumStartMismatch { .. })
    ));
    assert!(matches!(
        with(|x| x.csum_offset = 6).classify(&tcp4),
        Err(VnetError::CsumOffsetMismatch { .. })
    ));
    assert_eq!(
        with(|x| x.gso_size = 0).classify(&tcp4),
        Err(VnetError::ZeroGsoSize)
    );
    assert_eq!(
        with(|x| x.gso_type = GSO_UDP_L4 | GSO_ECN).classify(&tcp4),
        Err(VnetError::UnsupportedGsoType(GSO_UDP_L4 | GSO_ECN))
    );
    assert!(matches!(
        h.classify(&tcp4[..tcp4.len() - 1]),
        Err(VnetError::LengthMismatch { .. })
    ));
    let mut frag = tcp4.clone();
    frag[6] |= 0x20;
    assert_eq!(h.classify(&frag), Err(VnetError::Fragment));
    let mut bad_doff = tcp4.clone();
    bad_doff[32] = 0x40;
    assert_eq!(h.classify(&bad_doff), Err(VnetError::BadL4Header));
    assert!(matches!(
        h.classify(&[0x45; 10]),
        Err(VnetError::ChecksumOutOfPacket { .. })
    ));
    assert_eq!(
        with(|x| x.flags = 0).classify(&[0x75; 60]),
        Err(VnetError::NotIp(60))
    );
    // With ECN the CWR rule applies; accepted.
    assert!(with(|x| x.gso_type = GSO_TCPV4 | GSO_ECN)
        .classify(&tcp4)
        .is_ok());
}

proptest! {
    #[test]
    fn arbitrary_headers_and_bytes_never_panic(
        hdr in any::<[u8; 10]>(),
        mut pkt in proptest::collection::vec(any::<u8>(), 0..3000),
        v6 in any::<bool>(),
        fix_len in any::<bool>(),
    ) {
        // Make a good share of inputs look like IP so the deeper checks are reached.
        if fix_len && pkt.len() >= 40 {
            let n = pkt.len();
            if v6 {
                pkt[0] = 0x60 | (pkt[0] & 0x0f);
                pkt[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
            } else {
                pkt[0] = 0x40 | (pkt[0] & 0x0f);
                pkt[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            }
        }
        let h = VnetHdr::decode(&hdr).expect("10 bytes");
        match h.classify(&pkt) {
            Ok(Offload::Segment(plan)) => {
                let mut bufs = vec![[0u8; 1600]; 8];
                let mut lens = [0usize; 8];
                let mut sink = BatchSink::new(&mut bufs, &mut lens, 0);
                let _ = split(&pkt, &plan, L4Csum::Full, &mut sink);
            }
            Ok(Offload::Checksum { start, offset }) => finish_checksum(&mut pkt, start, offset),
            Ok(Offload::None) | Err(_) => {}
        }
    }
}
