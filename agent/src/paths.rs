//! Driver glue for carrier-aware failover (issue 5): the uplinks config file, the per-peer
//! [`PathAgent`] state the device keeps, the in-tunnel probe packet, and the status report.
//!
//! The device (see `device.rs`) is the driver of the sans-IO `skymesh_agent_core::path`
//! agents: it feeds them authenticated receptions (with the uplink socket and source they
//! came from), data sends, netlink link events and timeouts, sends their probes inside the
//! peer's WireGuard session on the probed path, and applies their path changes by switching
//! the peer's endpoint and uplink socket.
//!
//! A probe travels as an inner IPv4/UDP datagram (`0.0.0.0 → 0.0.0.0`, destination port
//! [`PROBE_UDP_PORT`], payload [`ProbeMessage`]) encrypted with the peer's session. The
//! receiving device recognises it by protocol, port and payload right after WireGuard
//! authenticated the sender, before the allowed-IPs source check and the TUN: the inner
//! addresses carry no meaning (the device does not own the interface addresses), and only a
//! holder of the peer's session keys can produce one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use skymesh_agent_core::key::Key;
use skymesh_agent_core::path::{
    FailoverSettings, PathAgent, PathConfig, PathHealth, PathId, ProbeMessage, RemoteEndpoint,
    UplinkConfig, ValidPathConfig, PROBE_LEN, PROBE_UDP_PORT,
};

/// The `--uplinks` file: the node's uplinks, failover tuning, and (until the controller
/// distributes them, issue 4) candidate endpoints of skymesh peers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UplinksFile {
    /// Local uplinks, in [`skymesh_agent_core::path::UplinkId`] order.
    uplinks: Vec<UplinkConfig>,
    #[serde(default)]
    failover: FailoverSettings,
    /// Skymesh peers and their candidate endpoints.
    #[serde(default)]
    peers: Vec<PeerPathsFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerPathsFile {
    /// Base64 WireGuard public key.
    public_key: String,
    endpoints: Vec<EndpointFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    addr: SocketAddr,
    /// The peer's tier for the uplink behind this endpoint; lower is preferred.
    #[serde(default)]
    priority: u8,
}

/// A loaded and validated uplinks file.
#[derive(Debug, Clone)]
pub(crate) struct FailoverSetup {
    pub(crate) config: ValidPathConfig,
    pub(crate) peers: HashMap<Key, Vec<RemoteEndpoint>>,
}

impl FailoverSetup {
    /// Parses the YAML text; errors name the field (and line, for syntax errors).
    pub(crate) fn parse(text: &str) -> anyhow::Result<FailoverSetup> {
        let file: UplinksFile = serde_yaml::from_str(text)?;
        let config = PathConfig {
            uplinks: file.uplinks,
            failover: file.failover,
        }
        .validate()?;
        let mut peers = HashMap::new();
        for (i, p) in file.peers.into_iter().enumerate() {
            let key = Key::from_base64(&p.public_key)
                .map_err(|e| anyhow::anyhow!("peers[{i}].public_key: {e}"))?;
            if p.endpoints.is_empty() {
                anyhow::bail!("peers[{i}].endpoints: at least one endpoint is required");
            }
            let eps = p
                .endpoints
                .iter()
                .map(|e| RemoteEndpoint {
                    addr: e.addr,
                    priority: e.priority,
                })
                .collect();
            if peers.insert(key, eps).is_some() {
                anyhow::bail!("peers[{i}].public_key: duplicate peer");
            }
        }
        Ok(FailoverSetup { config, peers })
    }

    pub(crate) fn load(path: &Path) -> anyhow::Result<FailoverSetup> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The shortest fast probe interval of any uplink: per-packet inputs can bring a peer's
    /// next timeout no closer than this.
    pub(crate) fn min_fast_interval(&self) -> Duration {
        self.config
            .uplinks()
            .map(|u| Duration::from_millis(u.probe.fast_interval_ms))
            .min()
            .unwrap_or(Duration::from_millis(200))
    }
}

/// Path state of one skymesh-managed peer.
pub(crate) struct PeerPaths {
    pub(crate) agent: PathAgent,
    /// The path whose endpoint/socket the peer currently sends on.
    pub(crate) applied: Option<PathId>,
    /// Authenticated probe replies that matched no outstanding probe of their path.
    pub(crate) unmatched_replies: u64,
}

/// Probe-protocol bytes (probes, replies, path notices, as sent on the wire) of one uplink.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProbeBytes {
    pub(crate) tx: u64,
    pub(crate) rx: u64,
}

/// The pace to put in a probe reply, in whole seconds (rounded up, saturating).
pub(crate) fn pace_secs(pace: Duration) -> u16 {
    let secs = pace.as_secs() + u64::from(pace.subsec_nanos() > 0);
    u16::try_from(secs).unwrap_or(u16::MAX)
}

/// Whether boringtun's output is a WireGuard transport-data message (type 4), as opposed to
/// a handshake it started while queueing the packet.
pub(crate) fn is_transport_data(out: &[u8]) -> bool {
    out.first() == Some(&4)
}

/// Length of an inner probe packet: IPv4 header, UDP header, payload.
pub(crate) const PROBE_PACKET_LEN: usize = 20 + 8 + PROBE_LEN;

/// Writes the inner IPv4/UDP probe packet carrying `msg`.
pub(crate) fn build_probe(msg: ProbeMessage, out: &mut [u8; PROBE_PACKET_LEN]) {
    out.fill(0);
    out[0] = 0x45; // IPv4, 20-byte header
    out[2..4].copy_from_slice(&(PROBE_PACKET_LEN as u16).to_be_bytes());
    out[8] = 64; // TTL
    out[9] = 17; // UDP
                 // Addresses stay 0.0.0.0 (see the module doc); header checksum over the 20 bytes.
    let mut sum: u32 = 0;
    for w in out[..20].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    out[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    out[20..22].copy_from_slice(&PROBE_UDP_PORT.to_be_bytes());
    out[22..24].copy_from_slice(&PROBE_UDP_PORT.to_be_bytes());
    out[24..26].copy_from_slice(&((8 + PROBE_LEN) as u16).to_be_bytes());
    // UDP checksum 0: none, allowed for IPv4.
    let mut payload = [0u8; PROBE_LEN];
    msg.encode(&mut payload);
    out[28..].copy_from_slice(&payload);
}

/// The probe carried by a decrypted inner packet, if it is one: IPv4, UDP, destination port
/// [`PROBE_UDP_PORT`], a well-formed probe payload. Never panics.
pub(crate) fn parse_probe(pkt: &[u8]) -> Option<ProbeMessage> {
    // Probes carry 0.0.0.0 as both addresses; a packet to port 51899 of a real address (a host
    // in a subnet behind us) is the peer's data, forwarded like any other.
    if pkt.len() < 28 || pkt[0] >> 4 != 4 || pkt[9] != 17 || pkt[12..20] != [0; 8] {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let udp = pkt.get(ihl..)?;
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != PROBE_UDP_PORT {
        return None;
    }
    ProbeMessage::decode(udp.get(8..8 + PROBE_LEN)?).ok()
}

// ---------------------------------------------------------------- status

/// What `skymesh-agent status` and the metrics endpoint show (JSON on the status socket).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StatusReport {
    pub(crate) iface: String,
    pub(crate) listen_port: u16,
    pub(crate) uplinks: Vec<UplinkStatus>,
    pub(crate) peers: Vec<PeerStatus>,
    /// Packet-path offloads and counters (absent from older agents).
    #[serde(default)]
    pub(crate) dataplane: DataplaneStatus,
    /// Endpoint discovery per uplink socket (absent from older agents).
    #[serde(default)]
    pub(crate) discovery: Vec<DiscoveryStatus>,
}

/// What STUN showed one uplink socket: the address the carrier's NAT maps it to (announced
/// to peers) and how that NAT maps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiscoveryStatus {
    pub(crate) uplink: String,
    pub(crate) ipv6: bool,
    /// Absent while unknown, and for an endpoint-dependent ("hard") NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reflexive: Option<SocketAddr>,
    /// `unknown`, `endpoint-independent` or `endpoint-dependent`.
    pub(crate) nat: String,
}

/// What the fast path runs with and has done (see `fastpath.rs`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DataplaneStatus {
    /// Heap allocations of the data-plane thread since it started, not counting those made
    /// while building status reports: stays flat under traffic (zero per packet).
    pub(crate) allocations: u64,
    /// TUN with `IFF_VNET_HDR` and TSO (super-packets both ways).
    pub(crate) tun_offload: bool,
    /// TUN accepted USO as well (UDP super-datagrams).
    pub(crate) tun_uso: bool,
    /// `UDP_SEGMENT` sends still work on every socket.
    pub(crate) udp_gso: bool,
    pub(crate) tun_reads: u64,
    pub(crate) tun_super_packets: u64,
    pub(crate) tx_packets: u64,
    pub(crate) tx_sends: u64,
    pub(crate) rx_recvs: u64,
    pub(crate) rx_packets: u64,
    pub(crate) tun_writes: u64,
    pub(crate) gro_merged: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct UplinkStatus {
    pub(crate) name: String,
    pub(crate) kind: String,
    pub(crate) priority: u8,
    pub(crate) interface: Option<String>,
    pub(crate) up: bool,
    /// Probes on it are paced to a budget (absent from older agents).
    #[serde(default)]
    pub(crate) metered: bool,
    /// Probe-protocol bytes sent and received on it, all peers together.
    #[serde(default)]
    pub(crate) probe_tx_bytes: u64,
    #[serde(default)]
    pub(crate) probe_rx_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeerStatus {
    pub(crate) public_key: String,
    pub(crate) endpoint: Option<SocketAddr>,
    /// `None` for peers without candidate paths (standard WireGuard roaming).
    pub(crate) role: Option<String>,
    pub(crate) active_uplink: Option<String>,
    pub(crate) active_remote: Option<SocketAddr>,
    pub(crate) switch_count: u64,
    pub(crate) last_switch_reason: Option<String>,
    pub(crate) last_switch_secs_ago: Option<f64>,
    pub(crate) unmatched_probe_replies: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) paths: Vec<PathStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PathStatus {
    pub(crate) uplink: String,
    pub(crate) remote: SocketAddr,
    pub(crate) health: String,
    pub(crate) active: bool,
    pub(crate) rtt_ms: Option<f64>,
    pub(crate) rtt_var_ms: f64,
    pub(crate) loss: f32,
    pub(crate) probes_sent: u64,
    pub(crate) replies: u64,
}

/// The status of one managed peer's paths.
pub(crate) fn peer_path_status(
    pp: &PeerPaths,
    uplink_names: &[String],
    now: Instant,
) -> (
    Option<String>,
    u64,
    Option<String>,
    Option<f64>,
    Vec<PathStatus>,
) {
    let name = |id: PathId| {
        uplink_names
            .get(usize::from(id.uplink.0))
            .cloned()
            .unwrap_or_default()
    };
    let last = pp.agent.last_switch();
    let paths = pp
        .agent
        .path_stats()
        .map(|s| PathStatus {
            uplink: name(s.path),
            remote: s.path.remote,
            health: match s.health {
                PathHealth::Unproven => "unproven",
                PathHealth::Healthy => "healthy",
                PathHealth::Failed => "failed",
                PathHealth::LinkDown => "link_down",
            }
            .to_owned(),
            active: s.active,
            rtt_ms: s.smoothed_rtt.map(|d| d.as_secs_f64() * 1e3),
            rtt_var_ms: s.rtt_var.as_secs_f64() * 1e3,
            loss: s.loss_ratio,
            probes_sent: s.probes_sent,
            replies: s.replies_received,
        })
        .collect();
    (
        pp.agent.active_path().map(name),
        pp.agent.switch_count(),
        last.map(|l| l.reason.as_str().to_owned()),
        last.map(|l| now.saturating_duration_since(l.at).as_secs_f64()),
        paths,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_packets_round_trip_and_other_packets_are_not_probes() {
        let mut pkt = [0u8; PROBE_PACKET_LEN];
        build_probe(ProbeMessage::Request { nonce: 42 }, &mut pkt);
        assert_eq!(parse_probe(&pkt), Some(ProbeMessage::Request { nonce: 42 }));
        // boringtun accepts it as an IPv4 packet of the right length.
        assert_eq!(
            usize::from(u16::from_be_bytes([pkt[2], pkt[3]])),
            PROBE_PACKET_LEN
        );
        let mut other = pkt;
        other[23] ^= 1; // another destination port
        assert_eq!(parse_probe(&other), None);
        let mut tcp = pkt;
        tcp[9] = 6;
        assert_eq!(parse_probe(&tcp), None);
        assert_eq!(parse_probe(&pkt[..30]), None);
        assert_eq!(parse_probe(&[]), None);
        // Port 51899 of a real host (behind a subnet router) is data, not a probe.
        let mut lan = pkt;
        lan[16..20].copy_from_slice(&[192, 168, 50, 7]);
        assert_eq!(parse_probe(&lan), None);
        let mut from = pkt;
        from[12..16].copy_from_slice(&[10, 77, 0, 2]);
        assert_eq!(parse_probe(&from), None);
    }

    #[test]
    fn notices_and_paced_replies_travel_in_probe_packets() {
        use skymesh_agent_core::path::{NoticeCause, PathNotice};
        let mut pkt = [0u8; PROBE_PACKET_LEN];
        let notice = ProbeMessage::Notice(PathNotice {
            seq: (3 << 32) | 9,
            cause: NoticeCause::Distress,
        });
        build_probe(notice, &mut pkt);
        assert_eq!(parse_probe(&pkt), Some(notice));
        let reply = ProbeMessage::Reply {
            nonce: 5,
            pace_secs: pace_secs(Duration::from_millis(184_320)),
        };
        build_probe(reply, &mut pkt);
        assert_eq!(
            parse_probe(&pkt),
            Some(ProbeMessage::Reply {
                nonce: 5,
                pace_secs: 185
            })
        );
        assert_eq!(pace_secs(Duration::ZERO), 0);
        assert_eq!(pace_secs(Duration::from_secs(1 << 20)), u16::MAX);
        assert!(is_transport_data(&[4, 0, 0, 0]));
        assert!(!is_transport_data(&[1, 0, 0, 0]));
        assert!(!is_transport_data(&[]));
    }

    #[test]
    fn example_uplinks_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("configs/") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with("agent-uplinks") && name.ends_with(".yaml") {
                let setup = FailoverSetup::load(&path).expect("example parses");
                assert!(setup.config.uplinks().count() >= 2, "{name}");
                n += 1;
            }
        }
        assert!(n >= 1, "no configs/agent-uplinks*.yaml");
    }

    #[test]
    fn uplinks_file_errors_name_the_field() {
        let ok = "uplinks:\n- name: sat\n  interface: vsat\n  kind: satellite\n\
                  - name: terr\n  interface: vterr\n  kind: terrestrial\n  priority: 1\n\
                  peers:\n- public_key: AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n  endpoints:\n  - addr: 198.18.1.2:51820\n  - addr: 198.18.2.2:51820\n    priority: 1\n";
        let setup = FailoverSetup::parse(ok).expect("valid");
        assert_eq!(setup.peers.len(), 1);
        assert_eq!(setup.config.uplinks().count(), 2);
        let err = FailoverSetup::parse(&ok.replace("kind: satellite", "knd: satellite"))
            .expect_err("unknown field");
        assert!(format!("{err:#}").contains("knd"), "{err:#}");
        let err = FailoverSetup::parse(&ok.replace("AQEBAQEB", "!!")).expect_err("bad key");
        assert!(
            format!("{err:#}").contains("peers[0].public_key"),
            "{err:#}"
        );
        let err =
            FailoverSetup::parse(&ok.replace("198.18.2.2:51820", "nowhere")).expect_err("bad addr");
        assert!(format!("{err:#}").contains("addr"), "{err:#}");
    }
}
