//! `configs/agent.yaml`: the same settings as `join`'s flags, so a router image can ship a file
//! and join on first boot (`skymesh-agent run --config FILE` joins if the state directory holds
//! no node yet, then runs).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::Deserialize;
use skymesh_agent_core::path::{FailoverSettings, PathConfig, UplinkConfig};
use skymesh_proto::{ControllerPublicKey, Endpoint};

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/skymesh")
}

fn default_iface() -> String {
    "sm0".into()
}

fn default_listen_port() -> u16 {
    51820
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ControllerSection {
    /// `https://hq.example:8443` (or `http://` with `allow_http: true`).
    pub(crate) url: String,
    /// Expected signing key (base64 Ed25519); absent = trust on first use, with a warning.
    #[serde(default)]
    pub(crate) key: Option<ControllerPublicKey>,
    /// PEM CA or certificate to trust for HTTPS (pinning).
    #[serde(default)]
    pub(crate) ca: Option<PathBuf>,
    #[serde(default)]
    pub(crate) allow_http: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentConfig {
    pub(crate) controller: ControllerSection,
    /// Enrollment key; only used for the first join.
    #[serde(default)]
    pub(crate) enroll_key: Option<String>,
    pub(crate) name: String,
    #[serde(default = "default_state_dir")]
    pub(crate) state_dir: PathBuf,
    #[serde(default = "default_iface")]
    pub(crate) iface: String,
    #[serde(default = "default_listen_port")]
    pub(crate) listen_port: u16,
    /// This node's uplinks as reachable by peers (local address and WireGuard port). Without
    /// it, they are derived from `uplinks` (each uplink's address and `listen_port`).
    #[serde(default)]
    pub(crate) endpoints: Vec<Endpoint>,
    /// Local uplinks for carrier-aware failover (the schema of configs/agent-uplinks.yaml).
    #[serde(default)]
    pub(crate) uplinks: Vec<UplinkConfig>,
    /// Failover tuning; needs `uplinks`.
    #[serde(default)]
    pub(crate) failover: Option<FailoverSettings>,
    /// LAN prefixes this node offers to route (an admin approves them).
    #[serde(default)]
    pub(crate) routes: Vec<IpNet>,
    /// Rotate the WireGuard key this often while running, seconds (absent: on demand only).
    #[serde(default)]
    pub(crate) rotate_key_every_secs: Option<u64>,
}

impl AgentConfig {
    /// Parses and validates the file; errors name the field.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        let c: AgentConfig = serde_yaml::from_str(text)?;
        c.path_config()?;
        Ok(c)
    }

    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    /// The failover config (`uplinks` + `failover`), validated; `None` without uplinks.
    pub(crate) fn path_config(&self) -> anyhow::Result<Option<PathConfig>> {
        path_config(&self.uplinks, self.failover)
    }
}

/// Validates `uplinks` + `failover` (from agent.yaml or an `--uplinks` file).
pub(crate) fn path_config(
    uplinks: &[UplinkConfig],
    failover: Option<FailoverSettings>,
) -> anyhow::Result<Option<PathConfig>> {
    if uplinks.is_empty() {
        if failover.is_some() {
            anyhow::bail!("failover: needs `uplinks`");
        }
        return Ok(None);
    }
    let config = PathConfig {
        uplinks: uplinks.to_vec(),
        failover: failover.unwrap_or_default(),
    };
    config.clone().validate()?;
    Ok(Some(config))
}

/// An `--uplinks FILE` for `join`/`run`: `uplinks:` and `failover:` only.
pub(crate) fn load_uplinks_file(path: &Path) -> anyhow::Result<PathConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let c: PathConfig =
        serde_yaml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    path_config(&c.uplinks, Some(c.failover))
        .with_context(|| format!("{}", path.display()))?
        .with_context(|| {
            format!(
                "{}: uplinks: at least one uplink is required",
                path.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/agent.yaml");
        let c = AgentConfig::load(&path).expect("configs/agent.yaml parses");
        assert_eq!(c.iface, "sm0");
        let paths = c.path_config().expect("valid").expect("uplinks given");
        assert!(paths.uplinks.len() >= 2);
    }

    #[test]
    fn uplink_errors_name_the_field() {
        let base = "controller: {url: 'http://x'}\nname: a\n";
        let ok = format!(
            "{base}uplinks:\n- {{name: sat, interface: eth1, kind: satellite}}\n\
             - {{name: terr, interface: eth2, kind: terrestrial, priority: 1}}\n\
             failover: {{failback_hold_ms: 5000}}\n"
        );
        let c = AgentConfig::parse(&ok).expect("valid");
        let p = c.path_config().expect("valid").expect("some");
        assert_eq!(p.failover.failback_hold_ms, 5000);
        let cases = [
            (ok.replace("name: terr", "name: sat"), "uplinks[1].name"),
            (ok.replace("kind: satellite", "kind: pigeon"), "pigeon"),
            (ok.replace("failback_hold_ms", "hold_ms"), "hold_ms"),
            (
                ok.replace("failback_hold_ms: 5000", "distress_timeout_ms: 5"),
                "failover.distress_timeout_ms",
            ),
            (
                format!("{base}failover: {{}}\n"),
                "failover: needs `uplinks`",
            ),
        ];
        for (text, field) in cases {
            let e = AgentConfig::parse(&text).expect_err(field);
            assert!(format!("{e:#}").contains(field), "{field}: {e:#}");
        }
    }

    #[test]
    fn unknown_or_mistyped_fields_are_refused_by_name() {
        let e = AgentConfig::parse("controller: {url: 'http://x'}\nname: a\ncolour: red\n")
            .expect_err("unknown field");
        assert!(e.to_string().contains("colour"), "{e}");
        let e = AgentConfig::parse("controller: {url: 'http://x'}\nname: a\nlisten_port: big\n")
            .expect_err("bad type");
        assert!(e.to_string().contains("listen_port"), "{e}");
        let e = AgentConfig::parse("controller: {url: 'http://x', key: 'nope'}\nname: a\n")
            .expect_err("bad key");
        assert!(
            e.to_string().contains("controller") && e.to_string().contains("32"),
            "{e}"
        );
    }
}
