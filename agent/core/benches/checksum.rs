//! Internet checksum throughput: RFC 1071 reference loop vs 64-bit scalar vs SSE2 vs AVX2,
//! on a minimal packet, an MTU-sized packet and a 64 KiB super-packet.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use skymesh_agent_core::offload::checksum;

fn bench(c: &mut Criterion) {
    let data: Vec<u8> = (0..65_536u32 + 1).map(|i| (i * 7 + 3) as u8).collect();
    let mut g = c.benchmark_group("checksum");
    for len in [64usize, 1500, 65_536] {
        // Start one byte in so the SIMD loads are unaligned, as packet payloads usually are.
        let buf = &data[1..1 + len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("reference", len), buf, |b, d| {
            b.iter(|| checksum::sum_reference(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("scalar64", len), buf, |b, d| {
            b.iter(|| checksum::sum_wide(black_box(d)))
        });
        if checksum::sum_sse2(buf).is_some() {
            g.bench_with_input(BenchmarkId::new("sse2", len), buf, |b, d| {
                b.iter(|| checksum::sum_sse2(black_box(d)))
            });
        }
        if checksum::sum_avx2(buf).is_some() {
            g.bench_with_input(BenchmarkId::new("avx2", len), buf, |b, d| {
                b.iter(|| checksum::sum_avx2(black_box(d)))
            });
        }
        g.bench_with_input(BenchmarkId::new("dispatch", len), buf, |b, d| {
            b.iter(|| checksum::sum(black_box(d)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
