//! Operator configuration of uplinks and failover tuning, parsed into validated values.
//!
//! YAML field names are the Rust field names; durations are integer milliseconds in fields
//! ending in `_ms`, so a value never needs a unit parser and an error names the field.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bound on uplinks per node: keeps per-peer path tables small and scans cheap.
pub const MAX_UPLINKS: usize = 16;

/// What kind of carrier an uplink is. Informational for status and metrics; the ranking
/// itself uses [`UplinkConfig::priority`], which the operator sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkKind {
    /// LEO/GEO satellite (Starlink, OneWeb, VSAT).
    Satellite,
    /// Fibre, DSL, a local carrier's wired line.
    Terrestrial,
    /// LTE / 5G.
    Cellular,
}

impl UplinkKind {
    /// Stable lowercase name, as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkKind::Satellite => "satellite",
            UplinkKind::Terrestrial => "terrestrial",
            UplinkKind::Cellular => "cellular",
        }
    }
}

/// One local uplink as declared in the agent config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Operator name, unique per node (`starlink`, `fibre`, `lte`).
    pub name: String,
    /// Network interface the uplink's socket is bound to (SO_BINDTODEVICE), if any.
    #[serde(default)]
    pub interface: Option<String>,
    /// Source address the uplink's socket is bound to, if any.
    #[serde(default)]
    pub source_address: Option<IpAddr>,
    /// Carrier kind.
    pub kind: UplinkKind,
    /// Operator tier: lower is preferred. Traffic uses the healthy uplink with the lowest tier;
    /// RTT only breaks ties inside a tier.
    #[serde(default)]
    pub priority: u8,
    /// Per-uplink probe settings; omitted fields take the defaults documented on
    /// [`ProbeSettings`].
    #[serde(default)]
    pub probe: ProbeSettings,
    /// The carrier bills by volume (satellite, cellular): idle probing on paths through this
    /// uplink is paced to `probe_budget_bytes_per_hour`.
    #[serde(default)]
    pub metered: bool,
    /// Probe bytes per hour and per peer this uplink may carry while idle (requests and
    /// replies, both ends' probes). Only with `metered: true`; default
    /// [`DEFAULT_PROBE_BUDGET_BYTES_PER_HOUR`].
    #[serde(default)]
    pub probe_budget_bytes_per_hour: Option<u64>,
}

/// Default probe budget of a metered uplink: 20 kB per hour and peer, about 14 MB a month for
/// a 25-node mesh: noise next to a satellite plan, yet a backup is still re-proven every
/// few minutes.
pub const DEFAULT_PROBE_BUDGET_BYTES_PER_HOUR: u64 = 20_000;

/// Probe cadence for paths leaving through one uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSettings {
    /// Interval between probes while a path is suspect (the active path has heard nothing while
    /// traffic is pending, a probe went unanswered, or we are searching for any working path).
    /// Default 200 ms: three probes fit inside the 700 ms distress timeout, so a blackhole is
    /// declared after three unanswered probes and well under one second.
    pub fast_interval_ms: u64,
    /// Interval between probes on a backup path, and round-trip checks on a healthy active path.
    /// Default 1 s: keeps a backup's health at most ~3 s stale for a probe budget of one small
    /// packet per second per path, which is negligible even on a metered cellular uplink.
    pub backup_interval_ms: u64,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            fast_interval_ms: 200,
            backup_interval_ms: 1_000,
        }
    }
}

/// Failover tuning, shared by every peer of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverSettings {
    /// A path is in distress when nothing authenticated arrived on it for this long while we
    /// were waiting (traffic or probes pending) and at least `distress_probes` probes went
    /// unanswered. Default 700 ms: longer than Starlink's reconfiguration spikes (+140 ms) and
    /// its handover loss bursts (tens to a few hundred ms), short enough that detection plus the
    /// switch stays under one second (issue 5: blackhole p50 ≤ 1 s).
    pub distress_timeout_ms: u64,
    /// Unanswered probes required (together with the timeout) before a path is declared in
    /// distress. Default 3: a single or double probe loss at Starlink's ~1 % random loss never
    /// fails a path (three in a row at 1 % is one in a million).
    pub distress_probes: u32,
    /// A better-tier path must have been continuously healthy this long before traffic fails
    /// back to it. Default 30 s: two full Starlink 15-s reconfiguration cycles, so a link that
    /// flaps or recovers only briefly never pulls traffic back.
    pub failback_hold_ms: u64,
    /// Inside one tier, a path must have a smoothed RTT lower than the active path by at least
    /// this margin (and by a quarter of the active RTT), continuously for `failback_hold_ms`,
    /// before traffic moves to it. Default 20 ms: above typical Starlink jitter.
    pub rtt_switch_margin_ms: u64,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        Self {
            distress_timeout_ms: 700,
            distress_probes: 3,
            failback_hold_ms: 30_000,
            rtt_switch_margin_ms: 20,
        }
    }
}

/// Everything the path selector needs from the operator: uplinks and tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    /// Local uplinks, in any order.
    pub uplinks: Vec<UplinkConfig>,
    /// Failover tuning.
    #[serde(default)]
    pub failover: FailoverSettings,
}

/// Why a [`PathConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `uplinks` is empty.
    #[error("uplinks: at least one uplink is required")]
    NoUplinks,
    /// More than [`MAX_UPLINKS`] uplinks.
    #[error("uplinks: {0} uplinks given, at most {MAX_UPLINKS} are supported")]
    TooManyUplinks(usize),
    /// An uplink name is empty.
    #[error("uplinks[{index}].name: must not be empty")]
    EmptyName {
        /// Position in the list.
        index: usize,
    },
    /// Two uplinks share a name.
    #[error("uplinks[{index}].name: duplicate uplink name {name:?}")]
    DuplicateName {
        /// Position of the second occurrence.
        index: usize,
        /// The repeated name.
        name: String,
    },
    /// A field is outside its allowed range.
    #[error("{field}: {reason}")]
    OutOfRange {
        /// Dotted path of the field.
        field: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Validated probe cadence of one uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProbeTiming {
    pub(crate) fast_interval: Duration,
    pub(crate) backup_interval: Duration,
    /// Probe budget in bytes per hour and peer, for metered uplinks.
    pub(crate) budget_per_hour: Option<u64>,
}

/// Validated failover tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FailoverTiming {
    pub(crate) distress_timeout: Duration,
    pub(crate) distress_probes: u32,
    pub(crate) failback_hold: Duration,
    pub(crate) rtt_switch_margin: Duration,
}

/// A [`PathConfig`] that passed validation. Only this type can build a
/// [`PathAgent`](super::PathAgent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathConfig {
    pub(crate) uplinks: Vec<ValidUplink>,
    pub(crate) failover: FailoverTiming,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValidUplink {
    pub(crate) config: UplinkConfig,
    pub(crate) probe: ProbeTiming,
}

impl ValidPathConfig {
    /// The uplinks in [`UplinkId`](super::UplinkId) order (the order of the config file).
    pub fn uplinks(&self) -> impl Iterator<Item = &UplinkConfig> {
        self.uplinks.iter().map(|u| &u.config)
    }

    /// The id of the uplink named `name`.
    pub fn uplink_id(&self, name: &str) -> Option<super::UplinkId> {
        self.uplinks
            .iter()
            .position(|u| u.config.name == name)
            .and_then(|i| u8::try_from(i).ok())
            .map(super::UplinkId)
    }
}

impl TryFrom<PathConfig> for ValidPathConfig {
    type Error = ConfigError;

    fn try_from(config: PathConfig) -> Result<Self, ConfigError> {
        config.validate()
    }
}

fn range_error(field: String, reason: &'static str) -> ConfigError {
    ConfigError::OutOfRange { field, reason }
}

impl PathConfig {
    /// Checks every field and returns the validated configuration; nothing is partially applied.
    pub fn validate(self) -> Result<ValidPathConfig, ConfigError> {
        if self.uplinks.is_empty() {
            return Err(ConfigError::NoUplinks);
        }
        if self.uplinks.len() > MAX_UPLINKS {
            return Err(ConfigError::TooManyUplinks(self.uplinks.len()));
        }
        let f = self.failover;
        if !(100..=60_000).contains(&f.distress_timeout_ms) {
            return Err(range_error(
                "failover.distress_timeout_ms".into(),
                "must be between 100 and 60000",
            ));
        }
        if !(1..=100).contains(&f.distress_probes) {
            return Err(range_error(
                "failover.distress_probes".into(),
                "must be between 1 and 100",
            ));
        }
        if f.failback_hold_ms > 3_600_000 {
            return Err(range_error(
                "failover.failback_hold_ms".into(),
                "must be at most 3600000 (one hour)",
            ));
        }
        if f.rtt_switch_margin_ms > 10_000 {
            return Err(range_error(
                "failover.rtt_switch_margin_ms".into(),
                "must be at most 10000",
            ));
        }
        let mut names = BTreeSet::new();
        let mut uplinks = Vec::with_capacity(self.uplinks.len());
        for (index, uplink) in self.uplinks.into_iter().enumerate() {
            if uplink.name.is_empty() {
                return Err(ConfigError::EmptyName { index });
            }
            if !names.insert(uplink.name.clone()) {
                return Err(ConfigError::DuplicateName {
                    index,
                    name: uplink.name,
                });
            }
            let p = uplink.probe;
            if !(20..=10_000).contains(&p.fast_interval_ms) {
                return Err(range_error(
                    format!("uplinks[{index}].probe.fast_interval_ms"),
                    "must be between 20 and 10000",
                ));
            }
            if !(p.fast_interval_ms..=60_000).contains(&p.backup_interval_ms) {
                return Err(range_error(
                    format!("uplinks[{index}].probe.backup_interval_ms"),
                    "must be at least fast_interval_ms and at most 60000",
                ));
            }
            // Distress needs `distress_probes` probes inside the timeout on the active path.
            let needed = p
                .fast_interval_ms
                .saturating_mul(u64::from(f.distress_probes));
            if needed > f.distress_timeout_ms {
                return Err(range_error(
                    format!("uplinks[{index}].probe.fast_interval_ms"),
                    "times failover.distress_probes must not exceed failover.distress_timeout_ms",
                ));
            }
            let budget_per_hour = match (uplink.metered, uplink.probe_budget_bytes_per_hour) {
                (false, Some(_)) => {
                    return Err(range_error(
                        format!("uplinks[{index}].probe_budget_bytes_per_hour"),
                        "needs metered: true",
                    ))
                }
                (false, None) => None,
                (true, None) => Some(DEFAULT_PROBE_BUDGET_BYTES_PER_HOUR),
                (true, Some(b)) if (1_000..=100_000_000).contains(&b) => Some(b),
                (true, Some(_)) => {
                    return Err(range_error(
                        format!("uplinks[{index}].probe_budget_bytes_per_hour"),
                        "must be between 1000 and 100000000",
                    ))
                }
            };
            uplinks.push(ValidUplink {
                probe: ProbeTiming {
                    fast_interval: Duration::from_millis(p.fast_interval_ms),
                    backup_interval: Duration::from_millis(p.backup_interval_ms),
                    budget_per_hour,
                },
                config: uplink,
            });
        }
        Ok(ValidPathConfig {
            uplinks,
            failover: FailoverTiming {
                distress_timeout: Duration::from_millis(f.distress_timeout_ms),
                distress_probes: f.distress_probes,
                failback_hold: Duration::from_millis(f.failback_hold_ms),
                rtt_switch_margin: Duration::from_millis(f.rtt_switch_margin_ms),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<PathConfig, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn full_config_parses_and_validates() {
        let cfg = parse(
            "uplinks:\n\
             - name: starlink\n  interface: eth1\n  kind: satellite\n  priority: 0\n\
             - name: fibre\n  source_address: 198.18.0.2\n  kind: terrestrial\n  priority: 1\n  probe:\n    backup_interval_ms: 2000\n\
             failover:\n  failback_hold_ms: 10000\n",
        )
        .expect("parses");
        let valid = cfg.validate().expect("valid");
        assert_eq!(valid.uplinks.len(), 2);
        assert_eq!(valid.uplink_id("fibre"), Some(crate::path::UplinkId(1)));
        assert_eq!(
            valid.uplinks[1].probe.backup_interval,
            Duration::from_secs(2)
        );
        assert_eq!(
            valid.uplinks[1].probe.fast_interval,
            Duration::from_millis(200)
        );
        assert_eq!(valid.failover.failback_hold, Duration::from_secs(10));
        assert_eq!(valid.failover.distress_probes, 3);
    }

    #[test]
    fn unknown_field_is_refused_and_named() {
        let err = parse("uplinks:\n- name: a\n  kind: satellite\n  prio: 1\n")
            .expect_err("must be refused");
        assert!(err.to_string().contains("prio"), "{err}");
        let err = parse("uplinks: []\nfailover:\n  hold: 1\n").expect_err("must be refused");
        assert!(err.to_string().contains("hold"), "{err}");
    }

    #[test]
    fn unknown_kind_is_refused() {
        let err =
            parse("uplinks:\n- name: a\n  kind: carrier_pigeon\n").expect_err("must be refused");
        assert!(err.to_string().contains("carrier_pigeon"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let cfg = parse("uplinks: []\n").expect("parses");
        assert_eq!(cfg.validate(), Err(ConfigError::NoUplinks));

        let cfg = parse("uplinks:\n- name: a\n  kind: satellite\n- name: a\n  kind: cellular\n")
            .expect("parses");
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::DuplicateName {
                index: 1,
                name: "a".into()
            })
        );

        let cfg =
            parse("uplinks:\n- name: a\n  kind: satellite\n  probe:\n    fast_interval_ms: 0\n")
                .expect("parses");
        let err = cfg.validate().expect_err("must be refused");
        assert!(
            err.to_string()
                .contains("uplinks[0].probe.fast_interval_ms"),
            "{err}"
        );

        let cfg =
            parse("uplinks:\n- name: a\n  kind: satellite\n  probe:\n    fast_interval_ms: 400\n")
                .expect("parses");
        let err = cfg.validate().expect_err("must be refused");
        assert!(err.to_string().contains("distress_timeout_ms"), "{err}");

        let cfg = parse("uplinks:\n- name: ''\n  kind: satellite\n").expect("parses");
        assert_eq!(cfg.validate(), Err(ConfigError::EmptyName { index: 0 }));

        let cfg =
            parse("uplinks:\n- name: a\n  kind: satellite\n  probe_budget_bytes_per_hour: 5000\n")
                .expect("parses");
        let err = cfg
            .validate()
            .expect_err("a budget without metered is refused");
        assert!(err.to_string().contains("needs metered"), "{err}");
        let cfg = parse("uplinks:\n- name: a\n  kind: satellite\n  metered: true\n  probe_budget_bytes_per_hour: 10\n")
            .expect("parses");
        let err = cfg.validate().expect_err("a tiny budget is refused");
        assert!(
            err.to_string()
                .contains("uplinks[0].probe_budget_bytes_per_hour"),
            "{err}"
        );
    }

    #[test]
    fn metered_uplinks_get_the_default_budget() {
        let cfg = parse("uplinks:\n- name: a\n  kind: satellite\n  metered: true\n- name: b\n  kind: cellular\n  metered: true\n  probe_budget_bytes_per_hour: 50000\n- name: c\n  kind: terrestrial\n")
            .expect("parses");
        let valid = cfg.validate().expect("valid");
        let budgets: Vec<_> = valid
            .uplinks
            .iter()
            .map(|u| u.probe.budget_per_hour)
            .collect();
        assert_eq!(
            budgets,
            vec![
                Some(DEFAULT_PROBE_BUDGET_BYTES_PER_HOUR),
                Some(50_000),
                None
            ]
        );
    }
}
