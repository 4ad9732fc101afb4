//! Netmap computation for a 10,000-node mesh: the pure `compute`, and compute + JSON + Ed25519
//! signature (what `GET /api/v1/netmap` does per request once the snapshot is cached).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion};
use skymesh_controller::netmap::{compute, TopoNode, Topology};
use skymesh_controller::policy::{Policy, PolicyConfig, Rule};
use skymesh_proto::{
    sign_netmap, Endpoint, NodeId, NodeState, SigningKey, UplinkKind, WgPublicKey,
};

const NODES: u32 = 10_000;

fn topology(policy: Policy) -> Topology {
    let nodes = (1..=NODES)
        .map(|i| {
            let tag = match i % 100 {
                0 => "hq",
                1..=9 => "embassy",
                _ => "field",
            };
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            let node = TopoNode {
                name: format!("node-{i}"),
                public_key: WgPublicKey(key),
                ipv4: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 77, 0, 0)) + i),
                ipv6: Ipv6Addr::from(
                    u128::from(Ipv6Addr::new(0xfd7a, 0x5c3e, 0x77, 0, 0, 0, 0, 0)) + u128::from(i),
                ),
                state: NodeState::Approved,
                tags: vec![tag.to_owned()],
                endpoints: vec![
                    Endpoint {
                        addr: SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 51820)),
                        uplink: "starlink".into(),
                        kind: UplinkKind::Satellite,
                        priority: Some(0),
                    },
                    Endpoint {
                        addr: SocketAddr::from(([198, 19, (i >> 8) as u8, i as u8], 51820)),
                        uplink: "fibre".into(),
                        kind: UplinkKind::Terrestrial,
                        priority: Some(1),
                    },
                ],
                approved_routes: vec![],
                expires_at: None,
            };
            (NodeId(u64::from(i)), node)
        })
        .collect::<BTreeMap<_, _>>();
    Topology {
        serial: 42,
        mtu: 1380,
        stun_ports: Vec::new(),
        relay: None,
        v4_prefix_len: 16,
        v6_prefix_len: 64,
        policy,
        nodes,
    }
}

fn bench(c: &mut Criterion) {
    let full_mesh = topology(Policy::default());
    let tagged = topology(Policy::new(&PolicyConfig {
        rules: vec![
            Rule {
                from: vec!["hq".into()],
                to: vec!["*".into()],
            },
            Rule {
                from: vec!["embassy".into()],
                to: vec!["embassy".into()],
            },
        ],
    }));
    let key = SigningKey::from_bytes(&[1; 32]);
    let hq = NodeId(100);
    let field = NodeId(1234);

    let mut g = c.benchmark_group("netmap_10k_nodes");
    g.sample_size(20);
    g.bench_function("compute/full_mesh (9,999 peers)", |b| {
        b.iter(|| compute(black_box(&full_mesh), black_box(hq), 0))
    });
    g.bench_function("compute_json_sign/full_mesh (9,999 peers)", |b| {
        b.iter(|| {
            let m = compute(&full_mesh, hq, 0).expect("node exists");
            sign_netmap(&m, &key).expect("sign")
        })
    });
    g.bench_function("compute/policy hq (9,999 peers)", |b| {
        b.iter(|| compute(black_box(&tagged), black_box(hq), 0))
    });
    g.bench_function("compute/policy field unit (100 peers)", |b| {
        b.iter(|| compute(black_box(&tagged), black_box(field), 0))
    });
    g.bench_function("compute_json_sign/policy field unit (100 peers)", |b| {
        b.iter(|| {
            let m = compute(&tagged, field, 0).expect("node exists");
            sign_netmap(&m, &key).expect("sign")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
