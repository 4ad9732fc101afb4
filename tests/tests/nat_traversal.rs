//! Reachability without declared endpoints: one flat segment, and units behind carrier-grade
//! NAT (root only: network namespaces, nftables NAT, TUN). Topologies in `skymesh_e2e::nat`.
//!
//! Every node runs `skymesh-agent join --controller URL --enroll-key KEY` and nothing else: no
//! `--endpoint`, no uplinks.

use std::time::{Duration, Instant};

use skymesh_e2e::nat::{
    active_remote, controller_with_key, overlay_v4, public_key_of, status, Topology,
};
use skymesh_e2e::{ping_once, run, wait_for, wait_until};

#[test]
fn plain_join_behind_two_carrier_nats_reaches_every_node_and_the_units_go_direct() {
    let Some(mut t) = Topology::build(false) else {
        return;
    };
    let (hqns, ua, ub) = (t.ns(0).to_owned(), t.ns(3).to_owned(), t.ns(4).to_owned());
    let (c, key) = controller_with_key(&hqns, "198.18.0.2:8080", 10);
    let url = "http://198.18.0.2:8080";
    let started = Instant::now();
    t.join(0, url, &key, "hq");
    t.join(3, url, &key, "unit-a");
    t.join(4, url, &key, "unit-b");
    let (addrs, _) = wait_for(Duration::from_secs(20), "three approved nodes", || {
        let a = ["hq", "unit-a", "unit-b"].map(|n| overlay_v4(&c, &hqns, n));
        a.iter()
            .all(Option::is_some)
            .then(|| a.map(Option::unwrap_or_default))
    });
    let [hq, a, b] = addrs;

    // The controller saw each unit's NAT-mapped address through STUN: A's carrier address.
    let (_, t_refl) = wait_for(
        Duration::from_secs(20),
        "A's reflexive endpoint at HQ",
        || {
            let nodes = c.api(&hqns, "GET", "/api/v1/nodes", None);
            let text = nodes.to_string();
            text.contains("\"198.18.1.2:").then_some(())
        },
    );
    eprintln!("reflexive endpoint of unit A known to HQ after {t_refl:?}");

    // Full mesh, including unit ⇄ unit through both NATs (hole punching).
    let mut took = Vec::new();
    for (from, to, what) in [
        (&ua, &b, "unit A → unit B"),
        (&ub, &a, "unit B → unit A"),
        (&hqns, &a, "HQ → unit A"),
        (&hqns, &b, "HQ → unit B"),
        (&ua, &hq, "unit A → HQ"),
        (&ub, &hq, "unit B → HQ"),
    ] {
        let d = wait_until(Duration::from_secs(30), what, || ping_once(from, to));
        took.push((what, d));
    }
    eprintln!("join → full mesh in {:?}: {took:?}", started.elapsed());

    // The units' path is direct: A sends to B's NAT (198.18.2.2), not through anyone else.
    let b_key = public_key_of(&c, &hqns, "unit-b");
    // (The relay may carry the first packets; the punched direct path replaces it.)
    let (_, to_direct) = wait_for(
        Duration::from_secs(15),
        "A's path to B going direct",
        || active_remote(&ua, &t.iface(3), &b_key).filter(|r| r.starts_with("198.18.2.2:")),
    );
    eprintln!("unit A → unit B direct through both NATs {to_direct:?} after the first ping");
    // HQ sees it too: the unit's status report carries its uplink's reflexive address and
    // NAT kind (GET /api/v1/nodes/{id}).
    let id = c
        .api(&hqns, "GET", "/api/v1/nodes", None)
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "unit-a").cloned())
        .and_then(|n| n["id"].as_u64())
        .expect("unit-a id");
    let (uplink, _) = wait_for(Duration::from_secs(40), "unit A's NAT kind at HQ", || {
        let d = c.api(&hqns, "GET", &format!("/api/v1/nodes/{id}"), None);
        let u = d["seen"]["status"]["uplinks"][0].clone();
        (u["nat"] == "endpoint-independent").then_some(u)
    });
    assert!(
        uplink["reflexive"].to_string().contains("198.18.1.2:"),
        "{uplink}"
    );
    // Each unit sees an endpoint-independent mapping of its one uplink.
    let st = status(&ua, &t.iface(3));
    let disc = st["device"]["discovery"]
        .as_array()
        .or_else(|| st["discovery"].as_array())
        .cloned()
        .unwrap_or_default();
    assert!(
        disc.iter().any(|d| d["nat"] == "endpoint-independent"
            && d["reflexive"]
                .as_str()
                .is_some_and(|r| r.starts_with("198.18.1.2:"))),
        "discovery status: {disc:?}"
    );
}

#[test]
fn plain_join_on_one_flat_segment_gives_a_full_mesh_within_seconds() {
    let Some(mut t) = Topology::flat() else {
        return;
    };
    let h1 = t.ns(1).to_owned();
    let (c, key) = controller_with_key(&h1, "198.18.10.1:8080", 3);
    let started = Instant::now();
    for (i, name) in [(1, "n1"), (2, "n2"), (3, "n3")] {
        t.join(i, "http://198.18.10.1:8080", &key, name);
    }
    let (addrs, _) = wait_for(Duration::from_secs(20), "three approved nodes", || {
        let a = ["n1", "n2", "n3"].map(|n| overlay_v4(&c, &h1, n));
        a.iter()
            .all(Option::is_some)
            .then(|| a.map(Option::unwrap_or_default))
    });
    for from in 1..=3 {
        for (to, addr) in addrs.iter().enumerate() {
            if to + 1 != from {
                let what = format!("n{from} → n{}", to + 1);
                wait_until(Duration::from_secs(15), &what, || {
                    ping_once(t.ns(from), addr)
                });
            }
        }
    }
    eprintln!("flat segment: join → full mesh in {:?}", started.elapsed());
}

#[test]
fn a_unit_behind_hard_nat_is_told_so_and_announces_no_useless_reflexive_address() {
    let Some(mut t) = Topology::build(true) else {
        return;
    };
    let (hqns, ub) = (t.ns(0).to_owned(), t.ns(4).to_owned());
    let (c, key) = controller_with_key(&hqns, "198.18.0.2:8080", 10);
    let url = "http://198.18.0.2:8080";
    t.join(0, url, &key, "hq");
    t.join(4, url, &key, "unit-b");
    let (hq, _) = wait_for(Duration::from_secs(20), "HQ approved", || {
        overlay_v4(&c, &hqns, "hq")
    });
    // HQ is public: B reaches it (B's NAT keeps the mapping its own packets opened).
    wait_until(Duration::from_secs(30), "unit B → HQ", || {
        ping_once(&ub, &hq)
    });
    let (disc, _) = wait_for(Duration::from_secs(20), "B's NAT kind", || {
        let st = status(&ub, &t.iface(4));
        let d = st["device"]["discovery"]
            .as_array()
            .or_else(|| st["discovery"].as_array())
            .cloned()
            .unwrap_or_default();
        d.iter()
            .any(|d| d["nat"] == "endpoint-dependent")
            .then_some(d)
    });
    assert!(
        disc.iter().all(|d| d["reflexive"].is_null()),
        "a hard NAT's reflexive address is useless to peers: {disc:?}"
    );
    let nodes = c.api(&hqns, "GET", "/api/v1/nodes", None).to_string();
    assert!(
        !nodes.contains("\"198.18.2.2:"),
        "B's NAT address must not be announced: {nodes}"
    );
}

#[test]
fn two_units_behind_hard_nat_reach_each_other_through_the_relay_which_sees_only_ciphertext() {
    let Some(mut t) = Topology::nat(true, true) else {
        return;
    };
    let (hqns, ua) = (t.ns(0).to_owned(), t.ns(3).to_owned());
    let (c, key) = controller_with_key(&hqns, "198.18.0.2:8080", 10);
    let url = "http://198.18.0.2:8080";
    let started = Instant::now();
    t.join(3, url, &key, "unit-a");
    t.join(4, url, &key, "unit-b");
    let (b, _) = wait_for(Duration::from_secs(20), "unit B approved", || {
        overlay_v4(&c, &hqns, "unit-b")
    });
    let d = wait_until(Duration::from_secs(30), "unit A → unit B", || {
        ping_once(&ua, &b)
    });
    eprintln!(
        "hard NAT ⇄ hard NAT: first ping after {d:?} ({:?} after join)",
        started.elapsed()
    );
    // The path is the relayed one (a virtual 240.0.x.y remote), and the relay counted it.
    let b_key = public_key_of(&c, &hqns, "unit-b");
    wait_for(
        Duration::from_secs(10),
        "A's path to B through the relay",
        || active_remote(&ua, &t.iface(3), &b_key).filter(|r| r.starts_with("240.0.")),
    );
    let metrics = run(skymesh_e2e::in_ns(Some(&hqns), "curl").args([
        "-sS",
        "-H",
        &format!("Authorization: Bearer {}", c.admin_token),
        "http://198.18.0.2:8080/metrics",
    ]));
    let sent: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("skymesh_relay_frames_sent_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(sent > 0, "relay metrics: {metrics}");
}
