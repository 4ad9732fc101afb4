//! Distribution of failover times over many seeded simulation runs.
//!
//! `cargo run -p skymesh-agent-core --example failover_sim --release [-- TRIALS]`
//!
//! Each trial: Starlink-profile primary (tier 0) and a terrestrial backup, a 100 pps ping,
//! the primary cut at a random time between 5 s and 20 s, either silently (blackhole) or by
//! link-down. Prints p50/p95/p99/max of the time to the switch and of the longest ping gap.
//! Then runs the Starlink profile alone (no cut) for 10 minutes per seed with handover loss
//! bursts up to 250, 400 and 600 ms and counts the switches it caused (should be none).

#![allow(clippy::print_stdout)]

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::process::ExitCode;
use std::time::Duration;

use sim::{failover_trial, ms, percentile, secs, starlink_only_switches};

fn fmt(d: Duration) -> String {
    format!("{:>4} ms", d.as_millis())
}

fn report(name: &str, mut xs: Vec<Duration>) {
    xs.sort_unstable();
    println!(
        "{name:<28} n={:<4} p50={} p95={} p99={} max={}",
        xs.len(),
        fmt(percentile(&xs, 50.0)),
        fmt(percentile(&xs, 95.0)),
        fmt(percentile(&xs, 99.0)),
        fmt(*xs.last().unwrap_or(&Duration::ZERO)),
    );
}

fn main() -> ExitCode {
    let trials: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let mut ok = true;
    for (label, hard) in [("blackhole", false), ("link-down", true)] {
        let mut switch = Vec::new();
        let mut gap = Vec::new();
        let mut missed = 0;
        for seed in 0..trials {
            match failover_trial(seed, hard) {
                Some(t) => {
                    switch.push(t.switch_after);
                    gap.push(t.ping_gap);
                }
                None => missed += 1,
            }
        }
        println!("{label}: {trials} trials, {missed} without a switch");
        if switch.is_empty() {
            ok = false;
            continue;
        }
        report(&format!("{label} switch after cut"), switch);
        report(&format!("{label} longest ping gap"), gap);
        ok &= missed == 0;
    }
    let runs = (trials / 10).max(1);
    for burst in [250, 400, 600] {
        let switches: u64 = (0..runs)
            .map(|seed| starlink_only_switches(seed, secs(600), ms(burst)))
            .sum();
        println!(
            "starlink alone, handover bursts <= {burst} ms: {runs} runs x 10 min, {switches} switches"
        );
        // Bursts near the 700 ms distress timeout are outages by definition; report only.
        ok &= burst >= 600 || switches == 0;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
