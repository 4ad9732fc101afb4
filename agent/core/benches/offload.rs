//! GSO split of a 64 KiB TCP super-packet into 1448-byte segments, and GRO coalescing of
//! 44 × 1448-byte segments into one super-packet.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use skymesh_agent_core::offload::checksum::{ipv4_header_fix, l4_checksum, pseudo_header_v4};
use skymesh_agent_core::offload::vnet::{F_NEEDS_CSUM, GSO_TCPV4};
use skymesh_agent_core::offload::{split, BatchSink, Gro, L4Csum, Offload, VnetHdr};

const MSS: usize = 1448;

/// IPv4 + TCP (with a 12-byte timestamp option) segment with valid checksums.
fn tcp4(seq: u32, payload_len: usize) -> Vec<u8> {
    let hdrs = 20 + 32;
    let len = hdrs + payload_len;
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    ipv4_header_fix(&mut p[..20]);
    p[20..22].copy_from_slice(&40_000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&1u32.to_be_bytes());
    p[32] = 8 << 4;
    p[33] = 0x10;
    p[34..36].copy_from_slice(&[0xff, 0xff]);
    p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    for (i, b) in p[hdrs..].iter_mut().enumerate() {
        *b = (i * 31) as u8;
    }
    let c = l4_checksum(
        pseudo_header_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, (len - 20) as u16),
        &p[20..],
    );
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

fn gso(c: &mut Criterion) {
    // 45 segments: 44 × 1448 + a short tail, 65,483 bytes of IP packet.
    let payload = 44 * MSS + 771;
    let sup = tcp4(1, payload);
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 52,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    let Ok(Offload::Segment(plan)) = hdr.classify(&sup) else {
        panic!("bench packet must classify");
    };
    let mut bufs = vec![[0u8; 2048]; 64];
    let mut lens = [0usize; 64];
    let mut g = c.benchmark_group("gso");
    g.throughput(Throughput::Bytes(sup.len() as u64));
    for (name, mode) in [
        ("split_64k_full_csum", L4Csum::Full),
        ("split_64k_partial_csum", L4Csum::Partial),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut sink = BatchSink::new(&mut bufs, &mut lens, 16);
                split(black_box(&sup), &plan, mode, &mut sink)
            })
        });
    }
    g.bench_function("classify_and_split_64k", |b| {
        b.iter(|| {
            let Ok(Offload::Segment(plan)) = hdr.classify(black_box(&sup)) else {
                unreachable!("checked above")
            };
            let mut sink = BatchSink::new(&mut bufs, &mut lens, 16);
            split(&sup, &plan, L4Csum::Full, &mut sink)
        })
    });
    g.finish();
}

fn gro(c: &mut Criterion) {
    const OFF: usize = 16;
    const N: usize = 44;
    let segs: Vec<Vec<u8>> = (0..N).map(|i| tcp4(1 + (i * MSS) as u32, MSS)).collect();
    let mut bufs: Vec<Vec<u8>> = segs
        .iter()
        .map(|s| {
            let mut b = vec![0u8; OFF + 65_535];
            b[OFF..OFF + s.len()].copy_from_slice(s);
            b
        })
        .collect();
    let orig_lens: Vec<usize> = segs.iter().map(Vec::len).collect();
    let mut lens = orig_lens.clone();
    let mut out = vec![0usize; N];
    let mut table = Gro::new(N);
    let mut g = c.benchmark_group("gro");
    g.throughput(Throughput::Bytes(orig_lens.iter().sum::<usize>() as u64));
    g.bench_function("coalesce_44x1448", |b| {
        b.iter(|| {
            // Coalescing only rewrites the head packet's headers and appends after it: restoring
            // that one packet (1.5 KB) and the lengths resets the batch.
            bufs[0][OFF..OFF + segs[0].len()].copy_from_slice(&segs[0]);
            lens.copy_from_slice(&orig_lens);
            let r = table.coalesce(&mut bufs, &mut lens, OFF, &mut out);
            assert!(matches!(r, Ok((1, _))));
        })
    });
    g.finish();
}

criterion_group!(benches, gso, gro);
criterion_main!(benches);
