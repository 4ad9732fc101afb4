//! Pure impairment model: a [`Profile`] (what to do to packets) and an [`Impairment`] (one
//! direction's state) that takes `now` and a packet length and returns a [`Verdict`]. No
//! sockets, no clock reads: the relay's I/O loop feeds it, tests drive it with virtual time.
//!
//! Effects, applied in this order: blackhole (runtime switch), scheduled outages, Starlink
//! handover bursts and outages, Gilbert-Elliott bursty loss, random loss, then delay (latency +
//! uniform jitter + Starlink spikes), then the optional rate limit (serialisation delay with a
//! bounded queue, tail drop).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// A profile as written in YAML. Durations are integer milliseconds (`*_ms`), probabilities
/// are fractions in `[0, 1]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Constant one-way delay.
    #[serde(default)]
    pub latency_ms: u64,
    /// Extra delay drawn uniformly from `[0, jitter_ms]` per packet (may reorder, as netem).
    #[serde(default)]
    pub jitter_ms: u64,
    /// Independent random loss probability.
    #[serde(default)]
    pub loss: f64,
    /// Two-state bursty loss.
    #[serde(default)]
    pub gilbert_elliott: Option<GilbertElliottConfig>,
    /// Scheduled outages (every packet dropped), relative to relay start.
    #[serde(default)]
    pub outages: Vec<OutageConfig>,
    /// Rate limit in kbit/s; packets queue behind each other.
    #[serde(default)]
    pub rate_kbps: Option<u64>,
    /// Longest queueing delay under the rate limit before tail drop.
    #[serde(default)]
    pub queue_limit_ms: Option<u64>,
    /// Starlink reconfiguration pattern.
    #[serde(default)]
    pub starlink: Option<StarlinkConfig>,
}

/// Gilbert-Elliott parameters: per-packet transition probabilities and per-state loss.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GilbertElliottConfig {
    /// P(good → bad) per packet.
    pub p_good_to_bad: f64,
    /// P(bad → good) per packet; mean burst length is `1 / p_bad_to_good` packets.
    pub p_bad_to_good: f64,
    /// Loss probability in the good state.
    #[serde(default)]
    pub loss_good: f64,
    /// Loss probability in the bad state.
    #[serde(default = "one")]
    pub loss_bad: f64,
}

fn one() -> f64 {
    1.0
}

/// An outage: from `start_ms` for `duration_ms`, repeated every `every_ms` if given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutageConfig {
    /// Offset of the first outage from relay start.
    pub start_ms: u64,
    /// Length of each outage.
    pub duration_ms: u64,
    /// Period, if the outage repeats.
    #[serde(default)]
    pub every_ms: Option<u64>,
}

/// Starlink's 15-s reconfiguration pattern. Defaults follow published measurements: a
/// handover loss burst at the start of each cycle, then RTT spikes of ~+140 ms and ~+75 ms,
/// and now and then a 1-2 s outage (obstruction). Delays are per direction: the relay applies
/// the pattern to both directions with a shared schedule, so the default per-direction
/// spikes (70 ms, 38 ms) give the published RTT spikes.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StarlinkConfig {
    /// Reconfiguration period.
    pub cycle_ms: u64,
    /// Offset of the first reconfiguration from relay start.
    pub phase_ms: u64,
    /// Longest handover loss burst at each reconfiguration (length drawn uniformly from
    /// `[0, max]` per cycle).
    pub handover_burst_max_ms: u64,
    /// First spike: extra delay and how long it lasts after the reconfiguration.
    pub spike1_ms: u64,
    /// Length of the first spike.
    pub spike1_len_ms: u64,
    /// Second spike, right after the first.
    pub spike2_ms: u64,
    /// Length of the second spike.
    pub spike2_len_ms: u64,
    /// Probability that a cycle contains an outage.
    pub outage_probability: f64,
    /// Shortest outage.
    pub outage_min_ms: u64,
    /// Longest outage.
    pub outage_max_ms: u64,
}

impl Default for StarlinkConfig {
    fn default() -> Self {
        Self {
            cycle_ms: 15_000,
            phase_ms: 0,
            handover_burst_max_ms: 150,
            spike1_ms: 70,
            spike1_len_ms: 400,
            spike2_ms: 38,
            spike2_len_ms: 600,
            outage_probability: 0.05,
            outage_min_ms: 1_000,
            outage_max_ms: 2_000,
        }
    }
}

/// Why a profile was refused; names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ProfileError {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong.
    pub reason: &'static str,
}

fn err(field: impl Into<String>, reason: &'static str) -> ProfileError {
    ProfileError {
        field: field.into(),
        reason,
    }
}

fn probability(field: &str, p: f64) -> Result<f64, ProfileError> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(err(field, "must be a probability between 0 and 1"))
    }
}

/// A validated profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    latency: Duration,
    jitter: Duration,
    loss: f64,
    gilbert: Option<GilbertElliottConfig>,
    outages: Vec<Outage>,
    rate_bps: Option<u64>,
    queue_limit: Duration,
    starlink: Option<StarlinkConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outage {
    start: Duration,
    duration: Duration,
    every: Option<Duration>,
}

impl Outage {
    fn covers(&self, t: Duration) -> bool {
        if t < self.start {
            return false;
        }
        let since = t - self.start;
        let into = match self.every {
            Some(every) => Duration::from_nanos((since.as_nanos() % every.as_nanos()) as u64),
            None => since,
        };
        into < self.duration
    }
}

/// Default queue bound under a rate limit: a typical router buffer.
const DEFAULT_QUEUE_LIMIT: Duration = Duration::from_millis(200);

impl TryFrom<ProfileConfig> for Profile {
    type Error = ProfileError;

    fn try_from(c: ProfileConfig) -> Result<Self, ProfileError> {
        if c.latency_ms > 60_000 {
            return Err(err("latency_ms", "must be at most 60000"));
        }
        if c.jitter_ms > 60_000 {
            return Err(err("jitter_ms", "must be at most 60000"));
        }
        let loss = probability("loss", c.loss)?;
        if let Some(g) = c.gilbert_elliott {
            probability("gilbert_elliott.p_good_to_bad", g.p_good_to_bad)?;
            probability("gilbert_elliott.p_bad_to_good", g.p_bad_to_good)?;
            probability("gilbert_elliott.loss_good", g.loss_good)?;
            probability("gilbert_elliott.loss_bad", g.loss_bad)?;
        }
        let mut outages = Vec::with_capacity(c.outages.len());
        for (i, o) in c.outages.iter().enumerate() {
            if o.duration_ms == 0 {
                return Err(err(format!("outages[{i}].duration_ms"), "must be positive"));
            }
            if let Some(every) = o.every_ms {
                if every <= o.duration_ms {
                    return Err(err(
                        format!("outages[{i}].every_ms"),
                        "must be longer than duration_ms",
                    ));
                }
            }
            outages.push(Outage {
                start: Duration::from_millis(o.start_ms),
                duration: Duration::from_millis(o.duration_ms),
                every: o.every_ms.map(Duration::from_millis),
            });
        }
        if c.rate_kbps == Some(0) {
            return Err(err("rate_kbps", "must be positive"));
        }
        if c.queue_limit_ms.is_some() && c.rate_kbps.is_none() {
            return Err(err("queue_limit_ms", "only meaningful with rate_kbps"));
        }
        if let Some(s) = c.starlink {
            if s.cycle_ms < 1_000 {
                return Err(err("starlink.cycle_ms", "must be at least 1000"));
            }
            if s.spike1_len_ms + s.spike2_len_ms > s.cycle_ms {
                return Err(err(
                    "starlink.spike2_len_ms",
                    "spikes must fit in one cycle (spike1_len_ms + spike2_len_ms <= cycle_ms)",
                ));
            }
            if s.handover_burst_max_ms >= s.cycle_ms {
                return Err(err(
                    "starlink.handover_burst_max_ms",
                    "must be shorter than cycle_ms",
                ));
            }
            probability("starlink.outage_probability", s.outage_probability)?;
            if s.outage_min_ms > s.outage_max_ms {
                return Err(err(
                    "starlink.outage_min_ms",
                    "must not exceed outage_max_ms",
                ));
            }
            if s.outage_max_ms >= s.cycle_ms {
                return Err(err(
                    "starlink.outage_max_ms",
                    "must be shorter than cycle_ms",
                ));
            }
        }
        Ok(Profile {
            latency: Duration::from_millis(c.latency_ms),
            jitter: Duration::from_millis(c.jitter_ms),
            loss,
            gilbert: c.gilbert_elliott,
            outages,
            rate_bps: c.rate_kbps.map(|k| k * 1000),
            queue_limit: c
                .queue_limit_ms
                .map_or(DEFAULT_QUEUE_LIMIT, Duration::from_millis),
            starlink: c.starlink,
        })
    }
}

impl Profile {
    /// Parses and validates a YAML profile.
    pub fn from_yaml(text: &str) -> Result<Self, ProfileLoadError> {
        let config: ProfileConfig = serde_yaml::from_str(text)?;
        Ok(Profile::try_from(config)?)
    }

    /// A profile by built-in name: `clean` (no impairment), `starlink` (Starlink-like
    /// primary: ~20 ms one way, 0-5 ms jitter, 0.5 % loss each way (~1 % round trip), the
    /// 15-s pattern with its outages).
    pub fn builtin(name: &str) -> Option<Self> {
        let config = match name {
            "clean" => ProfileConfig::default(),
            "starlink" => ProfileConfig {
                latency_ms: 20,
                jitter_ms: 5,
                loss: 0.005,
                starlink: Some(StarlinkConfig::default()),
                ..ProfileConfig::default()
            },
            _ => return None,
        };
        Profile::try_from(config).ok()
    }

    /// Names accepted by [`Profile::builtin`].
    pub const BUILTIN: &'static [&'static str] = &["clean", "starlink"];
}

/// Why a YAML profile could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileLoadError {
    /// Syntax, type or unknown-field error (names the field and position).
    #[error(transparent)]
    Yaml(#[from] serde_yaml::Error),
    /// A value out of range.
    #[error(transparent)]
    Invalid(#[from] ProfileError),
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it at this instant.
    Deliver(Instant),
    /// Drop it.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The runtime blackhole switch is on.
    Blackhole,
    /// A scheduled outage.
    Outage,
    /// A Starlink handover burst.
    Handover,
    /// A Starlink outage.
    StarlinkOutage,
    /// Gilbert-Elliott loss.
    Burst,
    /// Independent random loss.
    Random,
    /// The rate limiter's queue is full.
    Queue,
}

/// Per-cycle Starlink draws, derived from (schedule seed, cycle number) so both directions of
/// a relay see the same handovers and outages whatever the traffic.
#[derive(Debug, Clone, Copy)]
struct Cycle {
    index: u64,
    burst: Duration,
    outage: Option<(Duration, Duration)>,
}

/// One direction of impairment.
#[derive(Debug)]
pub struct Impairment {
    profile: Profile,
    start: Instant,
    schedule_seed: u64,
    rng: StdRng,
    gilbert_bad: bool,
    blackhole: bool,
    /// When the rate limiter's link becomes free.
    next_free: Instant,
    cycle: Option<Cycle>,
}

impl Impairment {
    /// `schedule_seed` fixes Starlink handovers/outages (share it between directions);
    /// `loss_seed` drives per-packet draws (use a different one per direction).
    pub fn new(profile: Profile, start: Instant, schedule_seed: u64, loss_seed: u64) -> Self {
        Self {
            profile,
            start,
            schedule_seed,
            rng: StdRng::seed_from_u64(loss_seed),
            gilbert_bad: false,
            blackhole: false,
            next_free: start,
            cycle: None,
        }
    }

    /// Turns the silent blackhole on or off.
    pub fn set_blackhole(&mut self, on: bool) {
        self.blackhole = on;
    }

    /// Whether the blackhole is on.
    pub fn blackhole(&self) -> bool {
        self.blackhole
    }

    /// Replaces the profile (runtime control); schedules restart from the same start.
    pub fn set_profile(&mut self, profile: Profile) {
        self.profile = profile;
        self.cycle = None;
        self.gilbert_bad = false;
    }

    fn starlink_cycle(&mut self, s: &StarlinkConfig, since: Duration) -> Option<(Cycle, Duration)> {
        let phase = Duration::from_millis(s.phase_ms);
        if since < phase {
            return None;
        }
        let cycle_len = Duration::from_millis(s.cycle_ms);
        let since = since - phase;
        let index = (since.as_nanos() / cycle_len.as_nanos()) as u64;
        let into = Duration::from_nanos((since.as_nanos() % cycle_len.as_nanos()) as u64);
        let cycle = match self.cycle {
            Some(c) if c.index == index => c,
            _ => {
                let mut r = StdRng::seed_from_u64(
                    self.schedule_seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                let burst = Duration::from_millis(r.gen_range(0..=s.handover_burst_max_ms));
                let outage = r.gen_bool(s.outage_probability).then(|| {
                    let len = r.gen_range(s.outage_min_ms..=s.outage_max_ms);
                    // Anywhere after the spikes, ending inside the cycle.
                    let earliest = s.spike1_len_ms + s.spike2_len_ms;
                    let latest = s.cycle_ms.saturating_sub(len).max(earliest);
                    let at = r.gen_range(earliest..=latest);
                    (Duration::from_millis(at), Duration::from_millis(len))
                });
                let c = Cycle {
                    index,
                    burst,
                    outage,
                };
                self.cycle = Some(c);
                c
            }
        };
        Some((cycle, into))
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`.
    pub fn decide(&mut self, now: Instant, len: usize) -> Verdict {
        if self.blackhole {
            return Verdict::Drop(DropReason::Blackhole);
        }
        let since = now.saturating_duration_since(self.start);
        if self.profile.outages.iter().any(|o| o.covers(since)) {
            return Verdict::Drop(DropReason::Outage);
        }
        let mut extra = Duration::ZERO;
        if let Some(s) = self.profile.starlink {
            if let Some((cycle, into)) = self.starlink_cycle(&s, since) {
                if into < cycle.burst {
                    return Verdict::Drop(DropReason::Handover);
                }
                if cycle
                    .outage
                    .is_some_and(|(at, len)| into >= at && into < at + len)
                {
                    return Verdict::Drop(DropReason::StarlinkOutage);
                }
                let spike1 = Duration::from_millis(s.spike1_len_ms);
                let spike2 = spike1 + Duration::from_millis(s.spike2_len_ms);
                if into < spike1 {
                    extra = Duration::from_millis(s.spike1_ms);
                } else if into < spike2 {
                    extra = Duration::from_millis(s.spike2_ms);
                }
            }
        }
        if let Some(g) = self.profile.gilbert {
            let flip = if self.gilbert_bad {
                g.p_bad_to_good
            } else {
                g.p_good_to_bad
            };
            if self.rng.gen_bool(flip) {
                self.gilbert_bad = !self.gilbert_bad;
            }
            let p = if self.gilbert_bad {
                g.loss_bad
            } else {
                g.loss_good
            };
            if self.rng.gen_bool(p) {
                return Verdict::Drop(DropReason::Burst);
            }
        }
        if self.profile.loss > 0.0 && self.rng.gen_bool(self.profile.loss) {
            return Verdict::Drop(DropReason::Random);
        }
        let jitter = if self.profile.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(
                self.rng
                    .gen_range(0..=self.profile.jitter.as_micros() as u64),
            )
        };
        let mut depart = now;
        if let Some(bps) = self.profile.rate_bps {
            let begin = self.next_free.max(now);
            if begin - now > self.profile.queue_limit {
                return Verdict::Drop(DropReason::Queue);
            }
            let bits = (len as u64).saturating_mul(8);
            let serialise = Duration::from_nanos(bits.saturating_mul(1_000_000_000) / bps);
            self.next_free = begin + serialise;
            depart = self.next_free;
        }
        Verdict::Deliver(depart + self.profile.latency + jitter + extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn profile(yaml: &str) -> Profile {
        Profile::from_yaml(yaml).expect("valid profile")
    }

    #[test]
    fn latency_and_jitter_bound_the_delivery_time() {
        let t0 = Instant::now();
        let mut imp = Impairment::new(profile("latency_ms: 50\njitter_ms: 10\n"), t0, 1, 2);
        let mut min = Duration::MAX;
        let mut max = Duration::ZERO;
        for i in 0..1000 {
            let now = t0 + ms(i);
            match imp.decide(now, 100) {
                Verdict::Deliver(at) => {
                    min = min.min(at - now);
                    max = max.max(at - now);
                }
                Verdict::Drop(r) => panic!("dropped: {r:?}"),
            }
        }
        assert!(min >= ms(50) && min < ms(51), "{min:?}");
        assert!(max > ms(59) && max <= ms(60), "{max:?}");
    }

    #[test]
    fn random_loss_rate_matches_the_profile() {
        let t0 = Instant::now();
        let mut imp = Impairment::new(profile("loss: 0.1\n"), t0, 1, 3);
        let dropped = (0..100_000)
            .filter(|i| {
                matches!(
                    imp.decide(t0 + ms(*i), 100),
                    Verdict::Drop(DropReason::Random)
                )
            })
            .count();
        assert!((9_000..11_000).contains(&dropped), "{dropped}");
    }

    #[test]
    fn gilbert_elliott_loss_comes_in_bursts() {
        let t0 = Instant::now();
        let mut imp = Impairment::new(
            profile("gilbert_elliott:\n  p_good_to_bad: 0.01\n  p_bad_to_good: 0.2\n"),
            t0,
            1,
            4,
        );
        let lost: Vec<bool> = (0..100_000)
            .map(|i| matches!(imp.decide(t0 + ms(i), 100), Verdict::Drop(_)))
            .collect();
        let total = lost.iter().filter(|l| **l).count();
        let bursts = lost.windows(2).filter(|w| !w[0] && w[1]).count();
        let mean_burst = total as f64 / bursts as f64;
        // Stationary bad fraction 0.01/(0.01+0.2) ≈ 4.8 %; mean burst 1/0.2 = 5 packets.
        assert!((3_800..5_800).contains(&total), "{total}");
        assert!((4.0..6.0).contains(&mean_burst), "{mean_burst}");
    }

    #[test]
    fn blackhole_drops_everything_until_switched_off() {
        let t0 = Instant::now();
        let mut imp = Impairment::new(profile("latency_ms: 5\n"), t0, 1, 5);
        imp.set_blackhole(true);
        assert!(imp.blackhole());
        assert_eq!(imp.decide(t0, 10), Verdict::Drop(DropReason::Blackhole));
        imp.set_blackhole(false);
        assert_eq!(imp.decide(t0 + ms(1), 10), Verdict::Deliver(t0 + ms(6)));
    }

    #[test]
    fn scheduled_outages_repeat() {
        let t0 = Instant::now();
        let mut imp = Impairment::new(
            profile("outages:\n- start_ms: 1000\n  duration_ms: 500\n  every_ms: 3000\n"),
            t0,
            1,
            6,
        );
        let dropped = |imp: &mut Impairment, t: u64| {
            matches!(
                imp.decide(t0 + ms(t), 10),
                Verdict::Drop(DropReason::Outage)
            )
        };
        assert!(!dropped(&mut imp, 999));
        assert!(dropped(&mut imp, 1000));
        assert!(dropped(&mut imp, 1499));
        assert!(!dropped(&mut imp, 1500));
        assert!(dropped(&mut imp, 4200));
        assert!(!dropped(&mut imp, 4600));
    }

    #[test]
    fn rate_limit_serialises_and_tail_drops() {
        let t0 = Instant::now();
        // 8 Mbit/s: a 1000-byte packet takes 1 ms; queue bound 10 ms.
        let mut imp = Impairment::new(profile("rate_kbps: 8000\nqueue_limit_ms: 10\n"), t0, 1, 7);
        let mut delivered = Vec::new();
        let mut dropped = 0;
        for _ in 0..20 {
            match imp.decide(t0, 1000) {
                Verdict::Deliver(at) => delivered.push(at - t0),
                Verdict::Drop(DropReason::Queue) => dropped += 1,
                Verdict::Drop(r) => panic!("{r:?}"),
            }
        }
        assert_eq!(delivered[0], ms(1));
        assert_eq!(delivered[4], ms(5));
        assert_eq!(delivered.len(), 11, "{delivered:?}");
        assert_eq!(dropped, 9);
    }

    #[test]
    fn starlink_cycle_has_handover_burst_spikes_and_is_shared_by_both_directions() {
        let t0 = Instant::now();
        let p = profile("starlink:\n  handover_burst_max_ms: 100\n  outage_probability: 0.0\n");
        let mut up = Impairment::new(p.clone(), t0, 42, 1);
        let mut down = Impairment::new(p, t0, 42, 2);
        let mut burst_end = [None, None];
        for (k, imp) in [&mut up, &mut down].into_iter().enumerate() {
            for t in 0..2_000u64 {
                let now = t0 + ms(15_000 * 3 + t);
                match imp.decide(now, 10) {
                    Verdict::Drop(DropReason::Handover) => burst_end[k] = Some(t + 1),
                    Verdict::Drop(r) => panic!("{r:?}"),
                    Verdict::Deliver(at) => {
                        let d = at - now;
                        let expect = if t < 400 {
                            ms(70)
                        } else if t < 1000 {
                            ms(38)
                        } else {
                            ms(0)
                        };
                        assert_eq!(d, expect, "at {t} ms into the cycle");
                    }
                }
            }
        }
        assert_eq!(burst_end[0], burst_end[1], "same handovers both ways");
        assert!(burst_end[0].is_none_or(|b| b <= 101));
    }

    #[test]
    fn builtin_starlink_has_occasional_outages_of_one_to_two_seconds() {
        let t0 = Instant::now();
        let p = Profile::builtin("starlink").expect("builtin");
        let mut imp = Impairment::new(p, t0, 7, 8);
        // One hour, a packet every 10 ms: count outage runs and their lengths.
        let mut runs = Vec::new();
        let mut run = 0u64;
        let mut random = 0u64;
        let n = 360_000u64;
        for i in 0..n {
            match imp.decide(t0 + ms(i * 10), 100) {
                Verdict::Drop(DropReason::StarlinkOutage) => run += 10,
                other => {
                    if run > 0 {
                        runs.push(run);
                        run = 0;
                    }
                    if other == Verdict::Drop(DropReason::Random) {
                        random += 1;
                    }
                }
            }
        }
        // 240 cycles at 5 %: about 12 outages.
        assert!((4..=25).contains(&runs.len()), "{runs:?}");
        assert!(runs.iter().all(|r| (1_000..=2_010).contains(r)), "{runs:?}");
        assert!((n / 400..n / 100).contains(&random), "{random}");
    }

    #[test]
    fn bad_profiles_are_refused_with_the_field_named() {
        for (yaml, field) in [
            ("loss: 1.5\n", "loss"),
            (
                "gilbert_elliott:\n  p_good_to_bad: 2\n  p_bad_to_good: 0.1\n",
                "gilbert_elliott.p_good_to_bad",
            ),
            (
                "outages:\n- start_ms: 0\n  duration_ms: 0\n",
                "outages[0].duration_ms",
            ),
            (
                "outages:\n- start_ms: 0\n  duration_ms: 10\n  every_ms: 5\n",
                "outages[0].every_ms",
            ),
            ("rate_kbps: 0\n", "rate_kbps"),
            ("queue_limit_ms: 5\n", "queue_limit_ms"),
            ("starlink:\n  cycle_ms: 10\n", "starlink.cycle_ms"),
            (
                "starlink:\n  outage_min_ms: 3000\n",
                "starlink.outage_min_ms",
            ),
            ("latency: 5\n", "latency"),
            ("starlink:\n  spike3_ms: 5\n", "spike3_ms"),
        ] {
            let err = Profile::from_yaml(yaml).expect_err(yaml);
            assert!(err.to_string().contains(field), "{yaml}: {err}");
        }
    }
}
