//! `configs/agent.yaml`: the same settings as `join`'s flags, so a router image can ship a file
//! and join on first boot (`skymesh-agent run --config FILE` joins if the state directory holds
//! no node yet, then runs).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::Deserialize;
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
    /// This node's uplinks as reachable by peers (local address and WireGuard port).
    #[serde(default)]
    pub(crate) endpoints: Vec<Endpoint>,
    /// LAN prefixes this node offers to route (an admin approves them).
    #[serde(default)]
    pub(crate) routes: Vec<IpNet>,
    /// Rotate the WireGuard key this often while running, seconds (absent: on demand only).
    #[serde(default)]
    pub(crate) rotate_key_every_secs: Option<u64>,
}

impl AgentConfig {
    pub(crate) fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }

    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/agent.yaml");
        let c = AgentConfig::load(&path).expect("configs/agent.yaml parses");
        assert_eq!(c.iface, "sm0");
        assert!(!c.endpoints.is_empty());
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
