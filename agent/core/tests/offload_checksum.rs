//! The fast checksum paths equal the RFC 1071 reference on any length and alignment, and the
//! RFC 1624 incremental updates equal a full recompute.

use proptest::prelude::*;
use skymesh_agent_core::offload::checksum::{
    self, add, ipv4_header_fix, ipv4_set_id, ipv4_set_total_len, l4_checksum, pseudo_header_v4,
    pseudo_header_v6, sum_reference, tcp_set_flags, tcp_set_seq, update_u16, update_u32,
};

fn all_paths_agree(data: &[u8]) {
    let r = sum_reference(data);
    assert_eq!(checksum::sum_wide(data), r, "wide, len {}", data.len());
    assert_eq!(checksum::sum(data), r, "dispatch, len {}", data.len());
    if let Some(s) = checksum::sum_sse2(data) {
        assert_eq!(s, r, "sse2, len {}", data.len());
    }
    if let Some(s) = checksum::sum_avx2(data) {
        assert_eq!(s, r, "avx2, len {}", data.len());
    }
}

#[test]
fn every_length_up_to_600_at_every_alignment_matches_the_reference() {
    let buf: Vec<u8> = (0..700u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for start in 0..32 {
        for len in 0..600 {
            all_paths_agree(&buf[start..start + len]);
        }
    }
}

#[test]
fn carries_out_of_every_lane_are_folded_back() {
    // All-0xff words make every lane carry on every add.
    for len in [63, 64, 65, 127, 128, 129, 1500, 65_535, 65_536, 200_001] {
        all_paths_agree(&vec![0xff; len]);
        let mut v = vec![0xff; len];
        if let Some(b) = v.last_mut() {
            *b = 0x01;
        }
        all_paths_agree(&v);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn simd_and_wide_equal_reference(
        data in proptest::collection::vec(any::<u8>(), 0..9000),
        start in 0usize..64,
    ) {
        let start = start.min(data.len());
        all_paths_agree(&data[start..]);
    }

    #[test]
    fn splitting_at_an_even_offset_and_adding_is_the_whole_sum(
        data in proptest::collection::vec(any::<u8>(), 0..4000),
        cut in 0usize..4000,
    ) {
        let cut = (cut.min(data.len())) & !1;
        let whole = sum_reference(&data);
        let parts = add(checksum::sum(&data[..cut]), checksum::sum(&data[cut..]));
        // 0x0000 and 0xffff are the same number in ones' complement.
        prop_assert!(parts == whole || (parts, whole) == (0, 0xffff) || (parts, whole) == (0xffff, 0));
    }

    #[test]
    fn incremental_u16_and_u32_updates_equal_recompute(
        mut words in proptest::collection::vec(any::<u16>(), 4..64),
        idx in 0usize..64,
        new16 in any::<u16>(),
        new32 in any::<u32>(),
    ) {
        let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
        let idx = idx % (words.len() - 1);
        let before = !sum_reference(&bytes(&words));
        let old16 = words[idx];
        words[idx] = new16;
        let full = !sum_reference(&bytes(&words));
        prop_assert_eq!(update_u16(before, old16, new16), full);

        let old32 = (u32::from(words[idx]) << 16) | u32::from(words[idx + 1]);
        words[idx] = (new32 >> 16) as u16;
        words[idx + 1] = new32 as u16;
        let full32 = !sum_reference(&bytes(&words));
        prop_assert_eq!(update_u32(full, old32, new32), full32);
    }

    #[test]
    fn ipv4_field_rewrites_keep_the_header_checksum_exact(
        mut hdr in proptest::collection::vec(any::<u8>(), 20..=20),
        len in any::<u16>(),
        id in any::<u16>(),
    ) {
        hdr[0] = 0x45;
        ipv4_header_fix(&mut hdr);
        let mut inc = hdr.clone();
        ipv4_set_total_len(&mut inc, len);
        ipv4_set_id(&mut inc, id);
        let mut full = inc.clone();
        ipv4_header_fix(&mut full);
        prop_assert_eq!(&inc, &full);
        prop_assert_eq!(sum_reference(&inc), 0xffff);
    }

    #[test]
    fn tcp_seq_and_flag_rewrites_keep_the_tcp_checksum_exact(
        src in any::<[u8; 4]>(),
        dst in any::<[u8; 4]>(),
        mut seg in proptest::collection::vec(any::<u8>(), 20..1600),
        seq in any::<u32>(),
        flags in any::<u8>(),
    ) {
        let pseudo = pseudo_header_v4(src, dst, 6, seg.len() as u16);
        seg[16] = 0;
        seg[17] = 0;
        let c = l4_checksum(pseudo, &seg);
        seg[16..18].copy_from_slice(&c.to_be_bytes());
        prop_assert_eq!(l4_checksum(pseudo, &seg), 0);

        tcp_set_seq(&mut seg, seq);
        tcp_set_flags(&mut seg, flags);
        let inc = u16::from_be_bytes([seg[16], seg[17]]);
        seg[16] = 0;
        seg[17] = 0;
        let full = l4_checksum(pseudo, &seg);
        prop_assert_eq!(inc, full);
    }

    #[test]
    fn pseudo_headers_equal_the_sum_of_their_bytes(
        s4 in any::<[u8; 4]>(), d4 in any::<[u8; 4]>(),
        s6 in any::<[u8; 16]>(), d6 in any::<[u8; 16]>(),
        proto in any::<u8>(), len in any::<u32>(),
    ) {
        let mut b = Vec::new();
        b.extend_from_slice(&s4);
        b.extend_from_slice(&d4);
        b.extend_from_slice(&[0, proto]);
        b.extend_from_slice(&(len as u16).to_be_bytes());
        let r = sum_reference(&b);
        let p = pseudo_header_v4(s4, d4, proto, len as u16);
        prop_assert!(p == r || (p, r) == (0xffff, 0) || (p, r) == (0, 0xffff));

        let mut b = Vec::new();
        b.extend_from_slice(&s6);
        b.extend_from_slice(&d6);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, proto]);
        let r = sum_reference(&b);
        let p = pseudo_header_v6(&s6, &d6, proto, len);
        prop_assert!(p == r || (p, r) == (0xffff, 0) || (p, r) == (0, 0xffff));
    }
}
