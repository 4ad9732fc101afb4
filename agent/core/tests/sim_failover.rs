//! Scenario tests of carrier-aware failover in the deterministic simulator (virtual time).
//! Uplink 0 = Starlink (tier 0, ~40 ms RTT), uplink 1 = fibre (tier 1, ~60 ms RTT).

mod sim;

use sim::*;
use skymesh_agent_core::path::{FailoverSettings, PathHealth, SwitchReason, UplinkKind};

const SAT: u8 = 0;
const TERR: u8 = 1;

/// Starts on the satellite and lets it settle: probed, proven, RTT measured.
fn settled(seed: u64) -> Sim {
    let mut sim = sat_and_terrestrial(seed);
    sim.run_until(sim.t0 + secs(5));
    assert_eq!(sim.active_uplink(), Some(SAT));
    assert_eq!(sim.switches.len(), 1, "only the initial choice");
    assert_eq!(sim.switches[0].reason, SwitchReason::Initial);
    sim
}

#[test]
fn start_prefers_the_satellite_tier_and_proves_both_paths() {
    let mut sim = settled(1);
    sim.run_for(secs(5));
    let stats: Vec<_> = sim.agent.path_stats().collect();
    assert_eq!(stats.len(), 2);
    for s in &stats {
        assert_eq!(s.health, PathHealth::Healthy, "{s:?}");
        let rtt = s.smoothed_rtt.expect("measured");
        assert!(rtt >= ms(40) && rtt <= ms(70), "{rtt:?}");
    }
    assert!(stats[SAT as usize].active);
    assert_eq!(sim.agent.switch_count(), 0);
}

#[test]
fn link_down_on_satellite_fails_over_to_terrestrial_at_once() {
    let mut sim = settled(2);
    let cut = sim.t0 + secs(10);
    sim.at(cut, Action::LinkDown(SAT));
    sim.run_until(cut + secs(5));
    let sw = sim.switches_since(cut);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].at, cut, "switch in the same step as the link event");
    assert_eq!(sw[0].reason, SwitchReason::LinkDown);
    assert_eq!(sim.active_uplink(), Some(TERR));
    // Only the echoes already in flight on the dead link are lost: one RTT plus a ping.
    let gap = sim.longest_echo_gap(cut, cut + secs(5));
    assert!(gap <= ms(120), "ping gap {gap:?}");
    assert_eq!(
        sim.agent.last_switch().map(|s| s.reason),
        Some(SwitchReason::LinkDown)
    );
}

#[test]
fn silent_blackhole_fails_over_within_one_second() {
    let mut sim = settled(3);
    let cut = sim.t0 + secs(10);
    sim.at(cut, Action::Blackhole(SAT, true));
    sim.run_until(cut + secs(5));
    let sw = sim.switches_since(cut);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::Distress);
    let after = sw[0].at - cut;
    assert!(
        after >= ms(600) && after <= ms(1000),
        "switched {after:?} after the cut"
    );
    let gap = sim.longest_echo_gap(cut, cut + secs(5));
    assert!(gap <= ms(1000), "ping gap {gap:?}");
    assert_eq!(sim.active_uplink(), Some(TERR));
    let sat = sim.agent.path_stats().next().expect("sat path");
    assert_eq!(sat.health, PathHealth::Failed);
}

#[test]
fn silent_blackhole_without_traffic_is_detected_by_probes_within_three_seconds() {
    let mut sim = settled(4);
    sim.at(sim.t0 + secs(6), Action::Traffic(false));
    let cut = sim.t0 + secs(10);
    sim.at(cut, Action::Blackhole(SAT, true));
    sim.run_until(cut + secs(10));
    let sw = sim.switches_since(cut);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::Distress);
    let after = sw[0].at - cut;
    assert!(after <= secs(3), "idle detection took {after:?}");
    // Idle and healthy: round-trip checks only, one per second per path.
    let idle_probes = sim.probes_on(SAT, sim.t0 + secs(7), cut);
    assert!(idle_probes <= 3, "{idle_probes} probes in 3 s of idle");
}

#[test]
fn starlink_profile_alone_causes_no_switch_over_ten_minutes() {
    let mut sim = sat_and_terrestrial(5);
    sim.set_both(SAT, starlink_channel(ms(3_000), ms(250)));
    sim.run_until(sim.t0 + secs(600));
    assert_eq!(sim.active_uplink(), Some(SAT));
    assert_eq!(sim.agent.switch_count(), 0, "{:?}", sim.switches);
    let sat = sim.agent.path_stats().next().expect("sat path");
    // The profile really was applied: the loss and spikes were seen.
    assert!(sat.loss_ratio < 0.2, "{sat:?}");
    let lost_pings = sim.pings_sent - sim.echoes.len() as u64;
    assert!(
        lost_pings > sim.pings_sent / 100,
        "expected >1 % ping loss, lost {lost_pings} of {}",
        sim.pings_sent
    );
}

#[test]
fn starlink_profile_causes_no_switch_for_many_seeds_over_two_minutes() {
    for seed in 0..20 {
        let mut sim = sat_and_terrestrial(1000 + seed);
        sim.set_both(SAT, starlink_channel(ms(seed * 700), ms(250)));
        sim.run_until(sim.t0 + secs(120));
        assert_eq!(
            sim.agent.switch_count(),
            0,
            "seed {seed}: {:?}",
            sim.switches
        );
    }
}

#[test]
fn micro_outage_shorter_than_threshold_causes_no_switch() {
    let mut sim = settled(6);
    // 500 ms silent outages every 7 s, for a minute: each shorter than the 700 ms threshold.
    for k in 0..8 {
        let t = sim.t0 + secs(10 + 7 * k);
        sim.at(t, Action::Blackhole(SAT, true));
        sim.at(t + ms(500), Action::Blackhole(SAT, false));
    }
    sim.run_until(sim.t0 + secs(70));
    assert_eq!(sim.agent.switch_count(), 0, "{:?}", sim.switches);
    assert_eq!(sim.active_uplink(), Some(SAT));
    // The outages did happen: ping gaps of about 500 ms.
    let gap = sim.longest_echo_gap(sim.t0 + secs(10), sim.t0 + secs(70));
    assert!(gap >= ms(480) && gap < ms(700), "{gap:?}");
}

#[test]
fn bursty_loss_shorter_than_threshold_causes_no_switch() {
    let mut sim = settled(7);
    // Gilbert-Elliott: bursts of ~10 packets (100 ms at 100 pps), ~2 % of the time.
    let mut ch = sim.links[SAT as usize].out.clone();
    ch.gilbert = Some(GilbertElliott {
        p_good_to_bad: 0.002,
        p_bad_to_good: 0.1,
        loss_good: 0.0,
        loss_bad: 0.9,
        bad: false,
    });
    sim.set_both(SAT, ch);
    sim.run_until(sim.t0 + secs(300));
    assert_eq!(sim.agent.switch_count(), 0, "{:?}", sim.switches);
    let lost = sim.pings_sent - sim.echoes.len() as u64;
    assert!(lost > sim.pings_sent / 100, "bursts happened: {lost} lost");
}

#[test]
fn flapping_link_does_not_flip_flop() {
    let mut sim = settled(8);
    // The satellite goes down for 1 s every 4 s for two minutes.
    for k in 0..30 {
        let t = sim.t0 + secs(10 + 4 * k);
        sim.at(t, Action::LinkDown(SAT));
        sim.at(t + secs(1), Action::LinkUp(SAT));
    }
    let stop = sim.t0 + secs(130);
    sim.run_until(stop);
    // One failover, no fail-back while it flaps (never healthy for the 30 s hold).
    let sw = sim.switches_since(sim.t0 + secs(10));
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::LinkDown);
    assert_eq!(sim.active_uplink(), Some(TERR));
    // Once it stops flapping, fail-back comes after the hold time, exactly once.
    sim.run_until(stop + secs(40));
    let sw = sim.switches_since(stop);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::Failback);
    assert!(sw[0].at - (sim.t0 + secs(127)) >= secs(30));
    assert_eq!(sim.active_uplink(), Some(SAT));
}

#[test]
fn silent_flapping_does_not_flip_flop() {
    let mut sim = settled(9);
    // 2 s blackholes every 5 s: each is detected, but the path never holds healthy for 30 s.
    for k in 0..20 {
        let t = sim.t0 + secs(10 + 5 * k);
        sim.at(t, Action::Blackhole(SAT, true));
        sim.at(t + secs(2), Action::Blackhole(SAT, false));
    }
    sim.run_until(sim.t0 + secs(110));
    let sw = sim.switches_since(sim.t0 + secs(10));
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::Distress);
}

#[test]
fn both_uplinks_down_then_one_back_recovers() {
    let mut sim = settled(10);
    let t = sim.t0 + secs(10);
    sim.at(t, Action::LinkDown(SAT));
    sim.at(t + ms(200), Action::LinkDown(TERR));
    sim.at(t + secs(5), Action::LinkUp(TERR));
    sim.run_until(t + secs(4));
    assert_eq!(sim.agent.active_path(), None);
    let sw = sim.switches_since(t);
    assert_eq!(sw.len(), 2, "{sw:?}");
    assert_eq!(sw[1].to, None);
    sim.run_until(t + secs(10));
    assert_eq!(sim.active_uplink(), Some(TERR));
    let sw = sim.switches_since(t + secs(5));
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::Recovered);
    assert_eq!(sw[0].at, t + secs(5));
    // Pings flow again within a round trip or two.
    let first_echo = sim
        .echoes
        .iter()
        .find(|&&e| e > t + secs(5))
        .copied()
        .expect("echo after recovery");
    assert!(first_echo - (t + secs(5)) <= ms(100));
    let terr = sim.agent.path_stats().nth(1).expect("terr path");
    assert_eq!(terr.health, PathHealth::Healthy);
}

#[test]
fn both_uplinks_blackholed_then_one_back_recovers_within_a_second() {
    let mut sim = settled(11);
    let t = sim.t0 + secs(10);
    sim.at(t, Action::Blackhole(SAT, true));
    sim.at(t, Action::Blackhole(TERR, true));
    sim.at(t + secs(4), Action::Blackhole(TERR, false));
    sim.run_until(t + secs(4));
    // Nothing proven anywhere: the agent keeps its path and searches.
    assert_eq!(sim.active_uplink(), Some(SAT));
    sim.run_until(t + secs(6));
    assert_eq!(sim.active_uplink(), Some(TERR));
    let sw = sim.switches_since(t);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert!(sw[0].at - (t + secs(4)) <= ms(300), "{:?}", sw[0].at - t);
}

#[test]
fn asymmetric_loss_outbound_dead_fails_over_within_one_second() {
    let mut sim = settled(12);
    // Our packets vanish towards the peer; the peer's packets still reach us.
    let cut = sim.t0 + secs(10);
    sim.at(cut, Action::BlackholeDir(SAT, Dir::Out, true));
    sim.run_until(cut + secs(5));
    let sw = sim.switches_since(cut);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::Distress);
    assert!(sw[0].at - cut <= ms(1000), "{:?}", sw[0].at - cut);
}

#[test]
fn asymmetric_loss_inbound_dead_with_peer_data_still_flowing_fails_over() {
    // Inbound from the peer dies, while nothing hides it: same as a blackhole for us.
    let mut sim = settled(13);
    let cut = sim.t0 + secs(10);
    sim.at(cut, Action::BlackholeDir(SAT, Dir::In, true));
    sim.run_until(cut + secs(5));
    let sw = sim.switches_since(cut);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert!(sw[0].at - cut <= ms(1000), "{:?}", sw[0].at - cut);
}

#[test]
fn asymmetric_random_loss_on_return_path_below_threshold_causes_no_switch() {
    let mut sim = settled(14);
    let mut ch = sim.links[SAT as usize].inb.clone();
    ch.loss = 0.05;
    sim.links[SAT as usize].inb = ch;
    sim.run_until(sim.t0 + secs(300));
    assert_eq!(sim.agent.switch_count(), 0, "{:?}", sim.switches);
    let sat = sim.agent.path_stats().next().expect("sat");
    assert!(sat.loss_ratio > 0.0 && sat.loss_ratio < 0.2, "{sat:?}");
}

#[test]
fn failback_only_after_hold_time() {
    let mut sim = settled(15);
    let cut = sim.t0 + secs(10);
    sim.at(cut, Action::Blackhole(SAT, true));
    let heal = cut + secs(5);
    sim.at(heal, Action::Blackhole(SAT, false));
    sim.run_until(heal + secs(29));
    assert_eq!(sim.active_uplink(), Some(TERR), "no fail-back before 30 s");
    sim.run_until(heal + secs(35));
    assert_eq!(sim.active_uplink(), Some(SAT));
    let sw = sim.switches_since(heal);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::Failback);
    let after = sw[0].at - heal;
    assert!(after >= secs(30) && after <= secs(32), "{after:?}");
    // No loss on the way back: both paths work at the moment of the switch.
    let gap = sim.longest_echo_gap(sw[0].at - secs(1), sw[0].at + secs(1));
    assert!(gap <= ms(40), "gap {gap:?} during fail-back");
}

#[test]
fn failback_hold_is_configurable() {
    let mut sim = Sim::new(
        16,
        vec![
            Link::new("starlink", UplinkKind::Satellite, 0, ms(20)),
            Link::new("fibre", UplinkKind::Terrestrial, 1, ms(30)),
        ],
        FailoverSettings {
            failback_hold_ms: 5_000,
            ..FailoverSettings::default()
        },
    );
    sim.run_until(sim.t0 + secs(5));
    let cut = sim.t0 + secs(10);
    sim.at(cut, Action::LinkDown(SAT));
    sim.at(cut + secs(2), Action::LinkUp(SAT));
    sim.run_until(cut + secs(20));
    let sw = sim.switches_since(cut);
    assert_eq!(sw.len(), 2, "{sw:?}");
    let after = sw[1].at - (cut + secs(2));
    assert!(after >= secs(5) && after <= secs(6), "{after:?}");
}

#[test]
fn forged_probe_reply_does_not_promote() {
    let mut sim = settled(17);
    // Fail the satellite, then make sure only real replies bring it back.
    let cut = sim.t0 + secs(10);
    sim.at(cut, Action::Blackhole(SAT, true));
    sim.run_until(cut + secs(3));
    let sat = sim.agent.path_stats().next().expect("sat");
    assert_eq!(sat.health, PathHealth::Failed);
    let rejected = sim.rejected_replies;
    let replies_before = sat.replies_received;
    // A forged nonce, and a genuine terrestrial reply replayed as if it came on the satellite.
    for k in 0..50 {
        sim.at(
            cut + secs(3) + ms(10 * k),
            Action::ForgeReply {
                uplink: SAT,
                nonce: 0xdead_beef + k,
            },
        );
    }
    sim.at(
        cut + secs(4),
        Action::ReplayLastReply {
            from: TERR,
            on: SAT,
        },
    );
    sim.run_until(cut + secs(40));
    assert_eq!(sim.rejected_replies - rejected, 51);
    let sat = sim.agent.path_stats().next().expect("sat");
    assert_eq!(sat.health, PathHealth::Failed);
    assert_eq!(sat.replies_received, replies_before);
    assert_eq!(sim.active_uplink(), Some(TERR));
    assert_eq!(sim.switches_since(cut).len(), 1);
}

#[test]
fn backup_probe_budget_is_one_per_second_while_healthy() {
    let mut sim = settled(18);
    let from = sim.t0 + secs(10);
    sim.run_until(from + secs(60));
    let backup = sim.probes_on(TERR, from, from + secs(60));
    let active = sim.probes_on(SAT, from, from + secs(60));
    assert!((58..=61).contains(&backup), "backup probes {backup}");
    assert!(active <= 62, "active probes {active}");
}

#[test]
fn same_tier_paths_switch_for_rtt_only_when_clearly_better_for_the_hold_time() {
    let mut sim = Sim::new(
        19,
        vec![
            Link::new("fibre-a", UplinkKind::Terrestrial, 0, ms(40)),
            Link::new("fibre-b", UplinkKind::Terrestrial, 0, ms(45)),
        ],
        FailoverSettings::default(),
    );
    sim.run_until(sim.t0 + secs(60));
    // Initial choice: nothing measured yet, so the tie breaks on the path id; then only a
    // clear and lasting RTT advantage moves traffic.
    assert_eq!(sim.active_uplink(), Some(0));
    assert_eq!(sim.agent.switch_count(), 0);
    // Path A gets 60 ms slower: B is now clearly better, and moves traffic after 30 s.
    let t = sim.now;
    let slow = Channel::new(ms(70), ms(2));
    sim.at(t, Action::SetChannel(0, Dir::Out, slow.clone()));
    sim.at(t, Action::SetChannel(0, Dir::In, slow));
    sim.run_until(t + secs(25));
    assert_eq!(sim.active_uplink(), Some(0));
    sim.run_until(t + secs(40));
    assert_eq!(sim.active_uplink(), Some(1));
    let sw = sim.switches_since(t);
    assert_eq!(sw.len(), 1);
    assert_eq!(sw[0].reason, SwitchReason::LowerRtt);
}

#[test]
fn blackhole_and_link_down_over_200_seeds_meet_the_failover_budget() {
    for hard in [false, true] {
        let mut switch = Vec::new();
        let mut gap = Vec::new();
        for seed in 0..200 {
            let t = failover_trial(seed, hard).expect("every trial switches");
            switch.push(t.switch_after);
            gap.push(t.ping_gap);
        }
        switch.sort_unstable();
        gap.sort_unstable();
        let (p50, p95, p99) = (
            percentile(&gap, 50.0),
            percentile(&gap, 95.0),
            percentile(&gap, 99.0),
        );
        eprintln!(
            "{}: switch p50={:?} p95={:?} p99={:?}; ping gap p50={p50:?} p95={p95:?} p99={p99:?}",
            if hard { "link-down" } else { "blackhole" },
            percentile(&switch, 50.0),
            percentile(&switch, 95.0),
            percentile(&switch, 99.0),
        );
        if hard {
            // Issue 5: hard cut p50 <= 300 ms, p99 <= 1 s.
            assert!(p50 <= ms(300) && p99 <= ms(1000), "{p50:?} {p99:?}");
        } else {
            // Issue 5: silent blackhole p50 <= 1 s, p95 <= 2 s; we hold every trial under 1 s.
            assert!(p50 <= ms(1000) && p95 <= ms(2000), "{p50:?} {p95:?}");
            assert!(*switch.last().expect("trials") <= ms(1000));
        }
    }
}

#[test]
fn starlink_obstruction_of_1500_ms_fails_over_once_and_fails_back_after_the_hold() {
    // The Starlink profile's occasional 1-2 s outage is longer than the distress timeout, so
    // it is (correctly) treated as a failure: traffic moves within a second and comes back
    // once the dish has been healthy for the hold time. Exactly two switches, never more.
    let mut sim = sat_and_terrestrial(20);
    sim.set_both(SAT, starlink_channel(ms(2_000), ms(150)));
    let cut = sim.t0 + ms(37_300);
    sim.at(cut, Action::Blackhole(SAT, true));
    sim.at(cut + ms(1_500), Action::Blackhole(SAT, false));
    sim.run_until(sim.t0 + secs(120));
    let sw = sim.switches_since(sim.t0 + secs(1));
    assert_eq!(sw.len(), 2, "{sw:?}");
    assert_eq!(sw[0].reason, SwitchReason::Distress);
    assert!(sw[0].at - cut <= ms(1000), "{:?}", sw[0].at - cut);
    assert_eq!(sw[1].reason, SwitchReason::Failback);
    assert!(sw[1].at - (cut + ms(1_500)) >= secs(30));
    // The ping gap is the detection time, not the 1.5 s outage.
    let gap = sim.longest_echo_gap(cut, cut + secs(3));
    assert!(gap <= ms(1000), "{gap:?}");
}

#[test]
fn geo_satellite_with_600_ms_rtt_and_2_percent_loss_causes_no_switch() {
    let mut sim = Sim::new(
        21,
        vec![
            Link::new("geo", UplinkKind::Satellite, 0, ms(300)),
            Link::new("lte", UplinkKind::Cellular, 1, ms(40)),
        ],
        FailoverSettings::default(),
    );
    let mut ch = Channel::new(ms(300), ms(20));
    ch.loss = 0.02;
    sim.set_both(SAT, ch);
    sim.run_until(sim.t0 + secs(300));
    assert_eq!(sim.active_uplink(), Some(SAT));
    assert_eq!(sim.agent.switch_count(), 0, "{:?}", sim.switches);
    // And a blackhole on it is still caught: the silence timeout stretches to twice the
    // smoothed RTT (1.2 s), plus the wait for the third unanswered probe.
    let cut = sim.now;
    sim.at(cut, Action::Blackhole(SAT, true));
    sim.run_until(cut + secs(5));
    let sw = sim.switches_since(cut);
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert!(sw[0].at - cut <= ms(2000), "{:?}", sw[0].at - cut);
}

#[test]
fn terrestrial_failure_while_on_backup_goes_back_to_the_satellite_at_once() {
    let mut sim = settled(22);
    let t = sim.t0 + secs(10);
    // Satellite down, traffic on fibre; satellite back; fibre dies before the hold is over:
    // the recovered satellite is proven, so it takes traffic immediately (a forced switch).
    sim.at(t, Action::LinkDown(SAT));
    sim.at(t + secs(2), Action::LinkUp(SAT));
    sim.at(t + secs(10), Action::Blackhole(TERR, true));
    sim.run_until(t + secs(15));
    let sw = sim.switches_since(t);
    assert_eq!(sw.len(), 2, "{sw:?}");
    assert_eq!(sw[1].reason, SwitchReason::Distress);
    assert!(sw[1].at - (t + secs(10)) <= ms(1000));
    assert_eq!(sim.active_uplink(), Some(SAT));
}
