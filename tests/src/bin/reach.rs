//! `skymesh-reach`: how long two nodes that just joined take to reach each other, with nothing
//! declared (`join --controller URL --enroll-key KEY` only), in network namespaces (root).
//!
//! Per trial a fresh topology, controller and agents: the clock starts when both netmaps are
//! applied (each node's device holds the other as a peer, polled every 10 ms through
//! `skymesh-agent status`) and stops at the first echo reply over the overlay, from a ping sent
//! every 20 ms (so the resolution is 20 ms). Scenarios: one flat segment (no NAT); two units behind their own
//! carrier NAT (`masquerade`, endpoint-independent) with HQ public: the units punch through;
//! two units behind endpoint-dependent NAT (`masquerade random`): through the relay.
//! Prints a markdown table (p50/p90/p99/max) for `scripts/bench-reach`.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use skymesh_e2e::nat::{controller_with_key, overlay_v4, public_key_of, status, Topology};
use skymesh_e2e::{in_ns, percentile};

#[derive(Parser)]
struct Args {
    /// Trials per scenario.
    #[arg(long, env = "SKYMESH_TRIALS", default_value_t = 20)]
    trials: usize,
}

/// One scenario's topology: namespace indexes of the controller host and of the two nodes
/// measured, the controller's address, and who else joins.
struct Scenario {
    name: &'static str,
    build: fn() -> Option<Topology>,
    controller_ns: usize,
    controller_addr: &'static str,
    /// `(namespace index, node name)`; the first two are measured (first → second).
    nodes: &'static [(usize, &'static str)],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "flat segment, no NAT",
        build: Topology::flat,
        controller_ns: 1,
        controller_addr: "198.18.10.1:8080",
        nodes: &[(2, "n2"), (3, "n3"), (1, "n1")],
    },
    Scenario {
        name: "easy NAT ⇄ easy NAT (hole punching), HQ public",
        build: || Topology::build(false),
        controller_ns: 0,
        controller_addr: "198.18.0.2:8080",
        nodes: &[(3, "unit-a"), (4, "unit-b"), (0, "hq")],
    },
    Scenario {
        name: "hard NAT ⇄ hard NAT, through the controller's relay",
        build: || Topology::nat(true, true),
        controller_ns: 0,
        controller_addr: "198.18.0.2:8080",
        nodes: &[(3, "unit-a"), (4, "unit-b")],
    },
];

/// Milliseconds from now until `ping` (every 20 ms) from `ns` gets its first reply from `dst`.
fn first_reply(ns: &str, dst: &str, limit: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut child = in_ns(Some(ns), "ping")
        .args(["-n", "-i", "0.02", "-W", "1", "-w"])
        .arg(limit.as_secs().to_string())
        .arg(dst)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("ping")?;
    let out = child.stdout.take().context("ping stdout")?;
    let mut took = None;
    for line in BufReader::new(out).lines() {
        if line?.contains("bytes from") {
            took = Some(t0.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    took.with_context(|| format!("{dst} did not answer within {limit:?}"))
}

fn trial(s: &Scenario) -> anyhow::Result<Duration> {
    let Some(mut t) = (s.build)() else {
        bail!("skipped: needs root and the tools");
    };
    let ns = t.ns(s.controller_ns).to_owned();
    let (c, key) = controller_with_key(&ns, s.controller_addr, 3);
    let url = format!("http://{}", s.controller_addr);
    for &(i, name) in s.nodes {
        t.join(i, &url, &key, name);
    }
    let (from, to) = (s.nodes[0], s.nodes[1]);
    // Both approved, then both netmaps applied: each device holds the other as a peer. Waited
    // for generously: right after the previous trial's namespaces were deleted, the kernel's
    // namespace cleanup can hold up creating the next TUN devices for many seconds, which
    // says nothing about skymesh.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dst = loop {
        let keys = (public_key_of(&c, &ns, from.1), public_key_of(&c, &ns, to.1));
        let holds = |i: usize, key: &str| {
            !key.is_empty()
                && status(t.ns(i), &t.iface(i))["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["public_key"] == key))
        };
        if holds(from.0, &keys.1) && holds(to.0, &keys.0) {
            if let Some(b) = overlay_v4(&c, &ns, to.1) {
                break b;
            }
        }
        if Instant::now() > deadline {
            t.dump_logs();
            bail!(
                "{} and {} did not apply each other within 60 s",
                from.1,
                to.1
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = first_reply(t.ns(from.0), &dst, Duration::from_secs(15));
    if took.is_err() {
        t.dump_logs();
        eprintln!("===== controller\n{}", c.log());
    }
    took
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("| scenario | trials | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for s in SCENARIOS {
        let mut took = Vec::with_capacity(args.trials);
        for i in 0..args.trials {
            let d = trial(s).with_context(|| format!("{}: trial {}", s.name, i + 1))?;
            eprintln!("{}: trial {} → {} ms", s.name, i + 1, d.as_millis());
            took.push(d);
        }
        took.sort();
        let ms = |p: f64| percentile(&took, p).as_millis();
        println!(
            "| {} | {} | {} ms | {} ms | {} ms | {} ms |",
            s.name,
            took.len(),
            ms(50.0),
            ms(90.0),
            ms(99.0),
            ms(100.0)
        );
    }
    Ok(())
}
