//! Controller configuration: YAML file, overridden by `SKYMESH_*` environment variables and
//! command-line flags (flags win). Everything is parsed into typed values at load and checked
//! once by [`Config::validate`]; errors name the file and the field.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::policy::PolicyConfig;

/// Starlink (and carrier-grade NAT in general) uses 100.64.0.0/10; the overlay must not.
pub const CGNAT: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);

/// Default overlay: a /16 from 10/8 that is rarely used by site LANs, and a ULA /64.
pub const DEFAULT_OVERLAY_V4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 77, 0, 0), 16);
pub const DEFAULT_OVERLAY_V6: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd7a, 0x5c3e, 0x77, 0, 0, 0, 0, 0), 64);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Directory holding the SQLite database (unless `database` is set) and the controller's
    /// signing key (unless `signing_key` is set).
    pub data_dir: PathBuf,
    /// PostgreSQL instead of the embedded SQLite: for several controller replicas.
    pub database: Option<DatabaseConfig>,
    /// The controller's Ed25519 signing key file (created 0600 if missing). Default:
    /// `controller-signing.key` in `data_dir`. Replicas must all use the same key.
    pub signing_key: Option<PathBuf>,
    pub overlay: OverlayConfig,
    /// MTU handed to agents for the overlay interface (WireGuard over IPv6 needs 80 bytes).
    pub mtu: u16,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// A node's IPv4 subnet routes together may cover at most as many addresses as one
    /// prefix of this length (default 16: one /16).
    pub max_route_prefix_v4: u8,
    /// The same for IPv6 routes (default 48: one /48).
    pub max_route_prefix_v6: u8,
    pub limits: LimitsConfig,
    pub policy: PolicyConfig,
    /// UDP port of the STUN reflector (on the API's listen address), which agents ask for
    /// their NAT-mapped address; the next port answers too, so an agent can tell an
    /// endpoint-independent NAT mapping from an endpoint-dependent one. 0 turns it off.
    pub stun_port: u16,
    /// UDP port of the relay (on the listen address) that forwards WireGuard ciphertext
    /// between nodes that cannot reach each other directly. 0 turns it off.
    pub relay_port: u16,
}

/// `limits:` — what one client, or all of them together, may hold of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections at most; past it new connections are closed at once.
    pub max_connections: usize,
    /// Open connections from one source address at most (behind a reverse proxy, the proxy
    /// is one source: raise it there).
    pub max_connections_per_source: usize,
    /// A client must send a request's headers within this many seconds (also the idle time
    /// allowed between requests on a kept-alive connection, and the TLS handshake time).
    pub header_timeout_secs: u64,
    /// A client must send a request's body within this many seconds.
    pub body_timeout_secs: u64,
    /// Registrations accepted per source address per minute (all of them at once, then
    /// evenly spread); 0: unlimited.
    pub register_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 256,
            header_timeout_secs: 10,
            body_timeout_secs: 10,
            register_per_minute: 60,
        }
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(invalid(
                "limits.max_connections",
                format!("{} is outside 1..=1000000", self.max_connections),
            ));
        }
        if !(1..=self.max_connections).contains(&self.max_connections_per_source) {
            return Err(invalid(
                "limits.max_connections_per_source",
                format!(
                    "{} is outside 1..={} (limits.max_connections)",
                    self.max_connections_per_source, self.max_connections
                ),
            ));
        }
        for (field, v) in [
            ("limits.header_timeout_secs", self.header_timeout_secs),
            ("limits.body_timeout_secs", self.body_timeout_secs),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(field, format!("{v} is outside 1..=3600")));
            }
        }
        Ok(())
    }
}

/// `database:` — a shared PostgreSQL database.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:5432/dbname` (libpq-style parameters such as
    /// `?sslmode=require` or `?host=/run/postgresql` are understood).
    pub url: String,
    /// Connections this controller keeps in its pool (plus one for change notifications and one for enrollment-key checks).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    10
}

impl DatabaseConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: default_max_connections(),
        }
    }
}

/// Debug output never shows the database password.
impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &crate::store::postgres::redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlayConfig {
    pub ipv4: Ipv4Net,
    pub ipv6: Ipv6Net,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        Self {
            ipv4: DEFAULT_OVERLAY_V4,
            ipv6: DEFAULT_OVERLAY_V6,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("/var/lib/skymesh-controller"),
            database: None,
            signing_key: None,
            overlay: OverlayConfig::default(),
            mtu: 1380,
            max_body_bytes: 64 * 1024,
            max_route_prefix_v4: crate::routes::DEFAULT_MAX_ROUTE_PREFIX_V4,
            max_route_prefix_v6: crate::routes::DEFAULT_MAX_ROUTE_PREFIX_V6,
            limits: LimitsConfig::default(),
            policy: PolicyConfig::default(),
            stun_port: skymesh_proto::stun::DEFAULT_PORT,
            relay_port: crate::relay::DEFAULT_PORT,
        }
    }
}

impl Config {
    /// Parses YAML text; `origin` names the source in errors.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Checks the invariants the rest of the controller relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let v4 = self.overlay.ipv4;
        if v4 != v4.trunc() {
            return Err(invalid(
                "overlay.ipv4",
                format!("{v4} has host bits set; did you mean {}?", v4.trunc()),
            ));
        }
        if v4.prefix_len() > 30 {
            return Err(invalid(
                "overlay.ipv4",
                format!("{v4} is too small; use /30 or larger"),
            ));
        }
        if v4.contains(&CGNAT.network()) || CGNAT.contains(&v4.network()) {
            return Err(invalid(
                "overlay.ipv4",
                format!("{v4} overlaps {CGNAT}, the carrier-grade NAT range Starlink uses"),
            ));
        }
        let v6 = self.overlay.ipv6;
        if v6 != v6.trunc() {
            return Err(invalid(
                "overlay.ipv6",
                format!("{v6} has host bits set; did you mean {}?", v6.trunc()),
            ));
        }
        let ula = Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7);
        if !ula.contains(&v6) {
            return Err(invalid(
                "overlay.ipv6",
                format!("{v6} is not a unique local (fc00::/7) prefix"),
            ));
        }
        if v6.prefix_len() > 120 {
            return Err(invalid(
                "overlay.ipv6",
                format!("{v6} is too small; use /120 or larger"),
            ));
        }
        if !(1280..=9000).contains(&self.mtu) {
            return Err(invalid(
                "mtu",
                format!(
                    "{} is outside 1280..=9000 (IPv6 needs at least 1280)",
                    self.mtu
                ),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(invalid(
                "max_body_bytes",
                format!("{} is outside 1024..=16777216", self.max_body_bytes),
            ));
        }
        if self.stun_port == u16::MAX {
            return Err(invalid(
                "stun_port",
                "65535 leaves no room for the second STUN port (stun_port + 1)",
            ));
        }
        if !(1..=32).contains(&self.max_route_prefix_v4) {
            return Err(invalid(
                "max_route_prefix_v4",
                format!("{} is outside 1..=32", self.max_route_prefix_v4),
            ));
        }
        if !(1..=128).contains(&self.max_route_prefix_v6) {
            return Err(invalid(
                "max_route_prefix_v6",
                format!("{} is outside 1..=128", self.max_route_prefix_v6),
            ));
        }
        self.limits.validate()?;
        if let Some(db) = &self.database {
            db.validate()?;
        }
        self.policy
            .validate()
            .map_err(|message| invalid("policy.rules", message))?;
        Ok(())
    }
}

impl DatabaseConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let scheme = self.url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("postgres" | "postgresql")) {
            return Err(invalid(
                "database.url",
                "must be a postgres:// or postgresql:// URL (without `database`, the embedded \
                 SQLite in data_dir is used)",
            ));
        }
        if let Err(e) = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&self.url)
        {
            return Err(invalid("database.url", e.to_string()));
        }
        if !(1..=1000).contains(&self.max_connections) {
            return Err(invalid(
                "database.max_connections",
                format!("{} is outside 1..=1000", self.max_connections),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<Config, ConfigError> {
        let c = Config::from_yaml(y, Path::new("test.yaml"))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_are_valid_and_stay_clear_of_cgnat() {
        let c = parse("{}").expect("defaults");
        assert_eq!(c, Config::default());
        assert!(!c.overlay.ipv4.contains(&Ipv4Addr::new(100, 64, 0, 1)));
    }

    #[test]
    fn an_overlay_overlapping_cgnat_is_refused_naming_the_field() {
        for net in ["100.64.0.0/16", "100.0.0.0/8", "100.127.255.0/24"] {
            let e = parse(&format!("overlay: {{ ipv4: {net} }}")).expect_err(net);
            assert!(e.to_string().contains("overlay.ipv4"), "{e}");
            assert!(e.to_string().contains("100.64.0.0/10"), "{e}");
        }
        parse("overlay: { ipv4: 100.128.0.0/16 }").expect("just outside CGNAT is fine");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_with_the_field_named() {
        let e = parse("overlay: { ipv4: 10.0.0.0/8, ipv7: x }").expect_err("unknown");
        assert!(e.to_string().contains("ipv7"), "{e}");
        let e = parse("overlay: { ipv4: not-a-cidr }").expect_err("bad cidr");
        assert!(e.to_string().contains("overlay"), "{e}");
        let e = parse("max_route_prefix_v4: 0").expect_err("route cap");
        assert!(e.to_string().contains("`max_route_prefix_v4`"), "{e}");
        let e = parse("max_route_prefix_v6: 129").expect_err("route cap");
        assert!(e.to_string().contains("`max_route_prefix_v6`"), "{e}");
        let e = parse("limits: { max_connections_per_source: 0 }").expect_err("per source");
        assert!(
            e.to_string().contains("limits.max_connections_per_source"),
            "{e}"
        );
        let e = parse("limits: { header_timeout_secs: 0 }").expect_err("timeout");
        assert!(e.to_string().contains("limits.header_timeout_secs"), "{e}");
        let e = parse("mtu: 100").expect_err("mtu");
        assert!(e.to_string().contains("`mtu`"), "{e}");
        let e = parse("overlay: { ipv6: 2001:db8::/64 }").expect_err("not ula");
        assert!(e.to_string().contains("overlay.ipv6"), "{e}");
        let e = parse("overlay: { ipv4: 10.77.0.1/16 }").expect_err("host bits");
        assert!(e.to_string().contains("10.77.0.0/16"), "{e}");
        let e = parse("database: { url: mysql://db/skymesh }").expect_err("not postgres");
        assert!(e.to_string().contains("database.url"), "{e}");
        let e = parse("database: { url: 'postgres://db/x', max_connections: 0 }").expect_err("0");
        assert!(e.to_string().contains("database.max_connections"), "{e}");
        let e = parse("database: { uri: 'postgres://db/x' }").expect_err("typo");
        assert!(e.to_string().contains("uri"), "{e}");
        let c = parse("database: { url: 'postgres://u:pw@db/x' }\nsigning_key: /etc/k")
            .expect("postgres config");
        let db = c.database.as_ref().expect("database");
        assert_eq!(db.max_connections, 10);
        assert!(
            !format!("{c:?}").contains("pw"),
            "password leaked into Debug"
        );
        let e = parse("policy: { rules: [ { from: [], to: [x] } ] }").expect_err("empty");
        assert!(e.to_string().contains("policy.rules"), "{e}");
    }
}
