//! Per-packet costs of the data plane's building blocks: allowed-IPs lookup (1,000 peers) and
//! boringtun encapsulate and encapsulate+decapsulate of a full-size packet. `cargo bench -p skymesh-agent`.

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use skymesh_agent_core::allowed_ips::AllowedIps;

fn table() -> AllowedIps<u32> {
    let mut t = AllowedIps::new();
    for i in 0..1000u32 {
        let v4 = Ipv4Addr::from(0x0a00_0000 | (i << 8));
        t.insert(IpNet::V4(Ipv4Net::new(v4, 24).expect("len")), i);
        let v6 = Ipv6Addr::from((0xfd77u128 << 112) | (u128::from(i) << 64));
        t.insert(IpNet::V6(Ipv6Net::new(v6, 64).expect("len")), i);
    }
    t
}

fn lookup(c: &mut Criterion) {
    let t = table();
    let mut g = c.benchmark_group("allowed_ips");
    g.throughput(Throughput::Elements(1));
    g.bench_function("lookup_v4_1000_peers", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = (i + 7) % 1000;
            black_box(t.lookup_v4(Ipv4Addr::from(0x0a00_0000 | (i << 8) | 9)))
        })
    });
    g.bench_function("lookup_v6_1000_peers", |b| {
        let mut i = 0u128;
        b.iter(|| {
            i = (i + 7) % 1000;
            black_box(t.lookup_v6(Ipv6Addr::from((0xfd77u128 << 112) | (i << 64) | 9)))
        })
    });
    g.finish();
}

fn pair() -> (Tunn, Tunn) {
    let a = StaticSecret::from([1u8; 32]);
    let b = StaticSecret::from([2u8; 32]);
    let (pa, pb) = (PublicKey::from(&a), PublicKey::from(&b));
    let mut ta = Tunn::new(a, pb, None, None, 1, None);
    let mut tb = Tunn::new(b, pa, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let init = match ta.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    };
    let resp = match tb.decapsulate(None, &init, &mut buf2) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no response"),
    };
    let ka = match ta.decapsulate(None, &resp, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no keepalive"),
    };
    let _ = tb.decapsulate(None, &ka, &mut buf2);
    (ta, tb)
}

fn crypto(c: &mut Criterion) {
    let (mut ta, mut tb) = pair();
    // A 1420-byte IPv4 packet from 10.0.0.1 to 10.0.0.2.
    let mut pkt = vec![0u8; 1420];
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&1420u16.to_be_bytes());
    pkt[12..16].copy_from_slice(&[10, 0, 0, 1]);
    pkt[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let mut out = vec![0u8; 2048];
    let mut g = c.benchmark_group("tunn");
    g.throughput(Throughput::Bytes(pkt.len() as u64));
    g.bench_function("encapsulate_1420", |b| {
        b.iter(|| match ta.encapsulate(black_box(&pkt), &mut out) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => 0,
        })
    });
    // Decapsulation needs fresh counters (replays are refused before the AEAD), so measure
    // the round trip; decapsulate alone ≈ round trip − encapsulate.
    let mut dst = vec![0u8; 2048];
    g.bench_function("roundtrip_1420", |b| {
        b.iter(|| {
            let TunnResult::WriteToNetwork(p) = ta.encapsulate(black_box(&pkt), &mut out) else {
                return 0;
            };
            match tb.decapsulate(None, p, &mut dst) {
                TunnResult::WriteToTunnelV4(p, _) => p.len(),
                _ => 0,
            }
        })
    });
    g.finish();
}

criterion_group!(benches, lookup, crypto);
criterion_main!(benches);
