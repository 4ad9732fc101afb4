//! Randomised scripts of link failures on three uplinks; the simulator checks the invariants
//! at every step (an active path whenever an uplink is up and only on an up link, no optional
//! switch inside the hold time, timers always advancing).

mod sim;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sim::*;
use skymesh_agent_core::path::{FailoverSettings, SwitchReason, UplinkKind};

fn three_uplinks(seed: u64) -> Sim {
    Sim::new(
        seed,
        vec![
            Link::new("starlink", UplinkKind::Satellite, 0, ms(20)),
            Link::new("fibre", UplinkKind::Terrestrial, 1, ms(30)),
            Link::new("lte", UplinkKind::Cellular, 2, ms(45)),
        ],
        FailoverSettings::default(),
    )
}

#[test]
fn random_failures_on_three_uplinks_keep_the_invariants_for_100_seeds() {
    let mut total_switches = 0;
    for seed in 0..100 {
        let mut rng = StdRng::seed_from_u64(10_000 + seed);
        let mut sim = three_uplinks(seed);
        let mut t = sim.t0 + secs(2);
        let mut down = [false; 3];
        let mut holed = [false; 3];
        while t < sim.t0 + secs(180) {
            let u = rng.gen_range(0..3u8);
            let i = usize::from(u);
            let action = match rng.gen_range(0..4) {
                0 => {
                    down[i] = !down[i];
                    if down[i] {
                        Action::LinkDown(u)
                    } else {
                        Action::LinkUp(u)
                    }
                }
                1 => {
                    holed[i] = !holed[i];
                    Action::Blackhole(u, holed[i])
                }
                2 => {
                    let mut ch = Channel::new(ms(rng.gen_range(10..200)), ms(rng.gen_range(0..30)));
                    ch.loss = rng.gen_range(0.0..0.1);
                    Action::SetChannel(u, if rng.gen_bool(0.5) { Dir::Out } else { Dir::In }, ch)
                }
                _ => Action::Traffic(rng.gen_bool(0.7)),
            };
            sim.at(t, action);
            t += ms(rng.gen_range(50..8_000));
        }
        sim.run_until(sim.t0 + secs(200));
        // Whatever happened, an upgrade never followed another switch within the hold time
        // (checked per step), and every forced switch had a cause on the path it left.
        for pair in sim.switches.windows(2) {
            if pair[1].reason == SwitchReason::Failback {
                assert!(pair[1].at - pair[0].at >= sim.hold, "seed {seed}: {pair:?}");
            }
        }
        total_switches += sim.switches.len();
    }
    assert!(
        total_switches > 300,
        "the scripts really moved traffic: {total_switches}"
    );
}

#[test]
fn after_chaos_ends_traffic_settles_on_the_preferred_uplink() {
    for seed in 0..30 {
        let mut rng = StdRng::seed_from_u64(20_000 + seed);
        let mut sim = three_uplinks(seed);
        let mut t = sim.t0 + secs(2);
        while t < sim.t0 + secs(60) {
            let u = rng.gen_range(0..3u8);
            let on = rng.gen_bool(0.5);
            sim.at(t, Action::Blackhole(u, on));
            if rng.gen_bool(0.3) {
                sim.at(
                    t,
                    if on {
                        Action::LinkDown(u)
                    } else {
                        Action::LinkUp(u)
                    },
                );
            }
            t += ms(rng.gen_range(100..5_000));
        }
        let end = sim.t0 + secs(61);
        for u in 0..3 {
            sim.at(end, Action::Blackhole(u, false));
            sim.at(end, Action::LinkUp(u));
        }
        sim.run_until(end + secs(40));
        assert_eq!(
            sim.active_uplink(),
            Some(0),
            "seed {seed}: {:?}",
            sim.switches
        );
        let settled = sim.switches_since(end + secs(35));
        assert!(settled.is_empty(), "seed {seed}: {settled:?}");
    }
}

#[test]
fn recovery_of_both_better_tiers_fails_back_in_one_step_to_the_best() {
    let mut sim = three_uplinks(31);
    sim.run_until(sim.t0 + secs(5));
    let t = sim.t0 + secs(10);
    sim.at(t, Action::LinkDown(0));
    sim.at(t, Action::LinkDown(1));
    // Fibre back first, the dish 2 s later: one fail-back, straight to the dish.
    sim.at(t + secs(5), Action::LinkUp(1));
    sim.at(t + secs(7), Action::LinkUp(0));
    sim.run_until(t + secs(60));
    // Two link-down events in the same instant: two forced moves, ending on LTE.
    let sw = sim.switches_since(t);
    assert_eq!(sw.len(), 3, "{sw:?}");
    assert_eq!(sw[1].reason, SwitchReason::LinkDown);
    assert_eq!(sw[1].to.map(|p| p.uplink.0), Some(2));
    let sw = &sw[1..];
    assert_eq!(sw[1].reason, SwitchReason::Failback);
    assert_eq!(sw[1].to.map(|p| p.uplink.0), Some(0));
    assert!(sw[1].at - (t + secs(7)) >= secs(30));
}
