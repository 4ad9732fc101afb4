//! Joins the control plane to the device's carrier-aware failover (issues 4 and 5).
//!
//! - Endpoints: without `endpoints:` in the config, the node announces one per uplink: the
//!   uplink's address (its `source_address`, else the first address on its interface, IPv4
//!   first) with the listen port, the uplink's name and kind, and its tier as `priority` so
//!   peers rank their paths to us by *our* preference.
//! - Peer paths: every applied netmap is turned into per-peer candidates
//!   ([`skymesh_agent_core::candidates`], pure) and only the peers whose candidates changed
//!   are sent to the device (`set_peer_paths` on its status socket).
//! - Status: the device's path state (active uplink, RTT/loss per path, switches) and the
//!   netmap's staleness go into the report HQ receives, and into a small control-status file
//!   next to the status socket that `skymesh-agent status` shows.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use skymesh_agent_core::candidates::{candidate_updates, SentCandidates};
use skymesh_agent_core::path::{PathConfig, UplinkKind as CoreKind};
use skymesh_agent_core::uapi::DeviceInfo;
use skymesh_proto::{
    Endpoint, NetMap, PathHealth, PathReport, PeerStatus, StatusReport, UplinkKind, UplinkReport,
};

use super::{dev, RunSettings};
use crate::paths;

pub(crate) fn proto_kind(k: CoreKind) -> UplinkKind {
    match k {
        CoreKind::Satellite => UplinkKind::Satellite,
        CoreKind::Terrestrial => UplinkKind::Terrestrial,
        CoreKind::Cellular => UplinkKind::Cellular,
    }
}

/// Whether a peer could ever reach us at `a`: not loopback, link-local or unspecified.
fn usable(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_unspecified()
        }
    }
}

/// The addresses an uplink announces: its source address; or the interface's first usable
/// IPv4 address and its first usable IPv6 address (both matter on a satellite link: Starlink's
/// IPv4 is carrier-grade NAT, its IPv6 is globally reachable); or, for the uplink without
/// either (routing decides), every usable address of every interface but the overlay's own.
fn uplink_addresses(source: Option<IpAddr>, interface: Option<&str>, overlay: &str) -> Vec<IpAddr> {
    if let Some(a) = source {
        return vec![a];
    }
    let Ok(mut nl) = crate::netlink::Rtnl::open() else {
        return Vec::new();
    };
    let Some(interface) = interface else {
        let own = crate::sys::if_index(overlay).ok();
        let mut all: Vec<IpAddr> = nl
            .all_addresses()
            .unwrap_or_default()
            .into_iter()
            .filter(|(index, a)| Some(*index) != own && usable(a))
            .map(|(_, a)| a)
            .collect();
        all.dedup();
        return all;
    };
    let Some(addrs) = crate::sys::if_index(interface)
        .ok()
        .and_then(|index| nl.addresses(index).ok())
    else {
        return Vec::new();
    };
    let v4 = addrs.iter().filter(|a| usable(a)).find(|a| a.is_ipv4());
    let v6 = addrs.iter().filter(|a| usable(a)).find(|a| a.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

/// The endpoints this node announces: `endpoints:` as configured (each given the tier of the
/// uplink of the same name), else one per uplink that has an address now.
/// `overlay` is this node's WireGuard interface, whose addresses are never announced.
pub(crate) fn local_endpoints(settings: &RunSettings, overlay: &str) -> Vec<Endpoint> {
    let uplinks = settings.uplinks.as_ref().map(|p| p.uplinks.as_slice());
    let uplinks = uplinks.unwrap_or_default();
    if !settings.endpoints.is_empty() {
        let mut eps = settings.endpoints.clone();
        for e in &mut eps {
            if e.priority.is_none() {
                e.priority = uplinks
                    .iter()
                    .find(|u| u.name == e.uplink)
                    .map(|u| u.priority);
            }
        }
        return eps;
    }
    let eps: Vec<Endpoint> = uplinks
        .iter()
        .flat_map(|u| {
            uplink_addresses(u.source_address, u.interface.as_deref(), overlay)
                .into_iter()
                .map(|addr| Endpoint {
                    addr: SocketAddr::new(addr, settings.listen_port),
                    uplink: u.name.clone(),
                    kind: proto_kind(u.kind),
                    priority: Some(u.priority),
                })
        })
        .collect();
    if eps.len() > skymesh_proto::MAX_ENDPOINTS {
        tracing::warn!(
            found = eps.len(),
            "more uplink addresses than a node may announce; announcing the first {}",
            skymesh_proto::MAX_ENDPOINTS
        );
    }
    eps.into_iter().take(skymesh_proto::MAX_ENDPOINTS).collect()
}

/// The controller's host in `url` (`https://hq.example:8443/x` → `hq.example`,
/// `http://[fd00::1]:80` → `fd00::1`).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    let host = authority.split_once(':').map_or(authority, |(h, _)| h);
    (!host.is_empty()).then_some(host)
}

/// The controller's addresses (resolved now) on each of `ports`, IPv4 first: its STUN
/// reflectors and its relay. Empty when the host does not resolve.
pub(crate) fn controller_addrs(controller_url: &str, ports: &[u16]) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let Some(host) = url_host(controller_url) else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = ports
        .iter()
        .flat_map(|&p| (host, p).to_socket_addrs().into_iter().flatten())
        .collect();
    out.sort_by_key(|a| (a.is_ipv6(), a.port()));
    out.dedup();
    out.truncate(crate::status::MAX_STUN_SERVERS);
    out
}

/// `local` plus an endpoint per uplink socket whose reflexive address STUN found (with the
/// uplink's kind and tier), without duplicates: behind no NAT the two are the same address.
pub(crate) fn with_reflexive(
    mut local: Vec<Endpoint>,
    discovered: &[crate::paths::DiscoveryStatus],
    settings: &RunSettings,
) -> Vec<Endpoint> {
    let uplinks = settings.uplinks.as_ref().map(|p| p.uplinks.as_slice());
    for d in discovered {
        let (Some(addr), Some(u)) = (
            d.reflexive,
            uplinks.and_then(|us| us.iter().find(|u| u.name == d.uplink)),
        ) else {
            continue;
        };
        if local.iter().any(|e| e.addr == addr) || local.len() >= skymesh_proto::MAX_ENDPOINTS {
            continue;
        }
        local.push(Endpoint {
            addr,
            uplink: u.name.clone(),
            kind: proto_kind(u.kind),
            priority: Some(u.priority),
        });
    }
    local
}

/// The uplink `join`/`run` use when none is declared: no interface, no source address, so
/// the host's routing table picks the way out (the device's wildcard sockets). It still gets
/// path selection over every candidate endpoint of a peer, STUN discovery and announcing every
/// interface address.
pub(crate) fn routed_uplinks() -> skymesh_agent_core::path::PathConfig {
    skymesh_agent_core::path::PathConfig {
        uplinks: vec![skymesh_agent_core::path::UplinkConfig {
            name: "default".into(),
            interface: None,
            source_address: None,
            kind: CoreKind::Terrestrial,
            priority: 0,
            probe: Default::default(),
            metered: false,
            probe_budget_bytes_per_hour: None,
        }],
        failover: Default::default(),
    }
}

/// Keeps the device's per-peer candidates in step with the netmap.
#[derive(Debug, Default)]
pub(crate) struct PathFeed {
    enabled: bool,
    sent: SentCandidates,
}

impl PathFeed {
    /// Feeds only when the device runs with uplinks (otherwise peers roam as in WireGuard).
    pub(crate) fn new(enabled: bool) -> PathFeed {
        PathFeed {
            enabled,
            sent: SentCandidates::new(),
        }
    }

    /// Sends the changed peers' candidates; returns how many peers were updated. A peer the
    /// device refused is retried with the next netmap.
    pub(crate) fn sync(&mut self, iface: &str, map: &NetMap) -> usize {
        if !self.enabled {
            return 0;
        }
        let mut n = 0;
        for (key, eps) in candidate_updates(&self.sent, map) {
            match dev::set_peer_paths(iface, &key, &eps) {
                Ok(()) => {
                    tracing::debug!(peer = %key, candidates = eps.len(), "peer paths set");
                    if eps.is_empty() {
                        self.sent.remove(&key);
                    } else {
                        self.sent.insert(key, eps);
                    }
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(peer = %key, error = %format!("{e:#}"), "setting peer paths failed")
                }
            }
        }
        n
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether the netmap stream is up, and when the controller last confirmed our netmap.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    connected: AtomicBool,
    /// Unix seconds; 0 = never.
    confirmed_at: AtomicU64,
}

impl Liveness {
    /// Starts from the cache file's age when the agent comes up from its cache.
    pub(crate) fn new(cache_written: Option<SystemTime>) -> Liveness {
        let at = cache_written
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Liveness {
            connected: AtomicBool::new(false),
            confirmed_at: AtomicU64::new(at),
        }
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.confirmed_at.store(unix_now(), Ordering::Relaxed);
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// 0 while connected; seconds since the last confirmation otherwise (`None`: never).
    pub(crate) fn netmap_age_secs(&self) -> Option<u64> {
        if self.connected() {
            return Some(0);
        }
        match self.confirmed_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(unix_now().saturating_sub(at)),
        }
    }
}

fn health(s: &str) -> PathHealth {
    match s {
        "unproven" => PathHealth::Unproven,
        "healthy" => PathHealth::Healthy,
        "failed" => PathHealth::Failed,
        "link_down" => PathHealth::LinkDown,
        _ => PathHealth::Unknown,
    }
}

/// The report for HQ: the netmap's peers as the device sees them (UAPI `info`), with the
/// failover state of managed peers (`fo`) and the netmap's staleness.
pub(crate) fn status_report(
    info: &DeviceInfo,
    map: &NetMap,
    fo: Option<&paths::StatusReport>,
    uplinks: Option<&PathConfig>,
    netmap_age_secs: Option<u64>,
) -> StatusReport {
    let kind_of = |name: &str| {
        uplinks
            .and_then(|p| p.uplinks.iter().find(|u| u.name == name))
            .map(|u| proto_kind(u.kind))
    };
    let peers = map
        .peers
        .iter()
        .filter_map(|entry| {
            let p = info
                .peers
                .iter()
                .find(|p| p.public_key.0 == *entry.public_key.as_bytes())?;
            let managed = fo.and_then(|r| {
                let key = entry.public_key.to_string();
                r.peers
                    .iter()
                    .find(|x| x.public_key == key && x.role.is_some())
            });
            let mut status = PeerStatus {
                node_id: entry.node_id,
                last_handshake: (p.last_handshake.0 != 0).then_some(p.last_handshake.0),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                // Unmanaged: the peer's own uplink behind the endpoint WireGuard roams to.
                uplink: p.endpoint.and_then(|a| {
                    entry
                        .endpoints
                        .iter()
                        .find(|e| e.addr == a)
                        .map(|e| e.uplink.clone())
                }),
                endpoint: p.endpoint,
                uplink_kind: None,
                switch_count: 0,
                last_switch_reason: None,
                last_switch_secs_ago: None,
                paths: Vec::new(),
            };
            if let Some(m) = managed {
                // Managed: our local uplink carrying the traffic.
                status.uplink = m.active_uplink.clone();
                status.uplink_kind = m.active_uplink.as_deref().and_then(kind_of);
                status.endpoint = m.active_remote.or(status.endpoint);
                status.switch_count = m.switch_count;
                status.last_switch_reason = m.last_switch_reason.clone();
                status.last_switch_secs_ago = m.last_switch_secs_ago.map(|s| s as u64);
                status.paths = m
                    .paths
                    .iter()
                    .map(|x| PathReport {
                        uplink: x.uplink.clone(),
                        kind: kind_of(&x.uplink).unwrap_or(UplinkKind::Unknown),
                        remote: x.remote,
                        health: health(&x.health),
                        active: x.active,
                        rtt_us: x.rtt_ms.map(|ms| (ms * 1e3) as u64),
                        loss_permille: (x.loss.clamp(0.0, 1.0) * 1000.0) as u16,
                    })
                    .collect();
            }
            Some(status)
        })
        .collect();
    let uplinks = fo
        .map(|r| {
            r.uplinks
                .iter()
                .map(|u| {
                    let found = r.discovery.iter().filter(|d| d.uplink == u.name);
                    UplinkReport {
                        name: u.name.clone(),
                        kind: kind_of(&u.name).unwrap_or(UplinkKind::Unknown),
                        priority: u.priority,
                        up: u.up,
                        reflexive: found.clone().filter_map(|d| d.reflexive).collect(),
                        // The IPv4 socket's verdict: IPv6 paths are rarely NATed.
                        nat: found
                            .clone()
                            .find(|d| !d.ipv6)
                            .or_else(|| found.clone().next())
                            .map(|d| d.nat.clone()),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    StatusReport {
        serial: map.serial,
        peers,
        netmap_age_secs,
        uplinks,
    }
}

/// Which local uplink carries each managed peer: a change triggers an immediate report.
pub(crate) fn active_paths(fo: &paths::StatusReport) -> Vec<(String, Option<String>)> {
    fo.peers
        .iter()
        .filter(|p| p.role.is_some())
        .map(|p| (p.public_key.clone(), p.active_uplink.clone()))
        .collect()
}

/// What the control process tells `skymesh-agent status` (a file next to the status socket,
/// rewritten every second while it runs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ControlStatus {
    pub(crate) node_id: u64,
    pub(crate) controller: String,
    /// Whether the netmap stream to the controller is up.
    pub(crate) controller_connected: bool,
    pub(crate) serial: Option<u64>,
    pub(crate) netmap_age_secs: Option<u64>,
    /// Unix seconds of this file's content.
    pub(crate) updated_at: u64,
}

pub(crate) fn control_status_path(iface: &str) -> PathBuf {
    std::path::Path::new(crate::status::STATUS_DIR).join(format!("{iface}.control.json"))
}

impl ControlStatus {
    pub(crate) fn new(
        node_id: u64,
        controller: &str,
        live: &Liveness,
        serial: Option<u64>,
    ) -> ControlStatus {
        ControlStatus {
            node_id,
            controller: controller.to_owned(),
            controller_connected: live.connected(),
            serial,
            netmap_age_secs: live.netmap_age_secs(),
            updated_at: unix_now(),
        }
    }

    /// Atomic replace (temp file + rename); failures are logged once by the caller.
    pub(crate) fn write(&self, iface: &str) -> std::io::Result<()> {
        let path = control_status_path(iface);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)
    }

    /// The file of `iface`'s control process, if one ever ran.
    pub(crate) fn read(iface: &str) -> Option<ControlStatus> {
        let text = std::fs::read_to_string(control_status_path(iface)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Seconds since the control process last wrote the file.
    pub(crate) fn written_secs_ago(&self) -> u64 {
        unix_now().saturating_sub(self.updated_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_reports_zero_age_while_connected_and_the_cache_age_before() {
        let an_hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
        let l = Liveness::new(Some(an_hour_ago));
        let age = l.netmap_age_secs().expect("from the cache");
        assert!((3599..=3601).contains(&age), "{age}");
        l.set_connected(true);
        assert_eq!(l.netmap_age_secs(), Some(0));
        l.set_connected(false);
        assert!(l.netmap_age_secs().expect("known") <= 1);
        assert_eq!(Liveness::new(None).netmap_age_secs(), None);
    }

    #[test]
    fn the_controller_host_is_taken_from_its_url() {
        assert_eq!(url_host("https://hq.example:8443/api"), Some("hq.example"));
        assert_eq!(url_host("http://198.18.0.1:8080"), Some("198.18.0.1"));
        assert_eq!(url_host("http://[fd00::1]:80/"), Some("fd00::1"));
        assert_eq!(url_host("https://u:p@hq.example"), Some("hq.example"));
        assert_eq!(url_host("http://:80"), None);
        assert_eq!(
            controller_addrs("http://198.18.0.1:8080", &[3478, 3479]),
            vec![
                "198.18.0.1:3478".parse().expect("addr"),
                "198.18.0.1:3479".parse().expect("addr")
            ]
        );
        assert!(controller_addrs("http://198.18.0.1:8080", &[]).is_empty());
    }

    #[test]
    fn configured_endpoints_get_the_tier_of_their_uplink() {
        let uplinks: PathConfig = serde_yaml::from_str(
            "uplinks:\n- {name: sat, source_address: 198.18.1.1, kind: satellite, priority: 2}\n\
             - {name: terr, source_address: 198.19.1.1, kind: terrestrial, priority: 0}\n",
        )
        .expect("yaml");
        let mut s = RunSettings {
            listen_port: 51999,
            uplinks: Some(uplinks),
            ..RunSettings::default()
        };
        // Derived from the uplinks: address, listen port, name, kind, tier.
        let eps = local_endpoints(&s, "sm-test0");
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].addr, "198.18.1.1:51999".parse().expect("addr"));
        assert_eq!(
            (eps[0].uplink.as_str(), eps[0].kind, eps[0].priority),
            ("sat", UplinkKind::Satellite, Some(2))
        );
        assert_eq!(
            (eps[1].uplink.as_str(), eps[1].kind, eps[1].priority),
            ("terr", UplinkKind::Terrestrial, Some(0))
        );
        // Given explicitly: kept, tier filled in from the uplink of the same name.
        s.endpoints = vec![Endpoint {
            addr: "198.18.77.9:51820".parse().expect("addr"),
            uplink: "terr".into(),
            kind: UplinkKind::Terrestrial,
            priority: None,
        }];
        let eps = local_endpoints(&s, "sm-test0");
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].priority, Some(0));
    }
}
