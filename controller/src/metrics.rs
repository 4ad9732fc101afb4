//! Prometheus metrics, hand-rolled: a few atomic counters plus gauges read from the store at
//! scrape time. Text exposition format 0.0.4.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use skymesh_proto::UplinkKind;

use crate::store::{NodeRecord, NodeSeen, Stats};

#[derive(Debug, Default)]
pub struct Metrics {
    /// Responses by status class: 1xx..5xx at indices 0..5.
    responses: [AtomicU64; 5],
    pub registrations: AtomicU64,
    pub registrations_refused: AtomicU64,
    pub netmaps_served: AtomicU64,
    pub topology_loads: AtomicU64,
    pub deltas_served: AtomicU64,
    /// Open netmap streams (a gauge kept in an atomic).
    pub streams_open: AtomicU64,
    /// Relay: frames sent (answers and forwarded datagrams), their bytes, frames dropped, and
    /// nodes bound now.
    pub relay_forwarded: AtomicU64,
    pub relay_bytes: AtomicU64,
    pub relay_dropped: AtomicU64,
    pub relay_bindings: AtomicU64,
    /// STUN reflector: Binding requests answered, datagrams dropped (not a Binding request,
    /// or over the rate limit).
    pub stun_answered: AtomicU64,
    pub stun_dropped: AtomicU64,
}

impl Metrics {
    pub fn record_status(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, stats: &Stats) -> String {
        let mut out = String::new();
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP skymesh_http_responses_total HTTP responses by status class."
        );
        let _ = writeln!(out, "# TYPE skymesh_http_responses_total counter");
        for (i, v) in self.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "skymesh_http_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                c(v)
            );
        }
        let counters = [
            (
                "skymesh_registrations_total",
                "Successful node registrations.",
                c(&self.registrations),
            ),
            (
                "skymesh_registrations_refused_total",
                "Registrations refused (bad key, duplicate, ...).",
                c(&self.registrations_refused),
            ),
            (
                "skymesh_netmaps_served_total",
                "Signed netmaps served.",
                c(&self.netmaps_served),
            ),
            (
                "skymesh_topology_loads_total",
                "Topology snapshots loaded from the store (cache misses).",
                c(&self.topology_loads),
            ),
            (
                "skymesh_deltas_served_total",
                "Signed netmap deltas sent on streams.",
                c(&self.deltas_served),
            ),
            (
                "skymesh_stun_answered_total",
                "STUN Binding requests answered (endpoint discovery).",
                c(&self.stun_answered),
            ),
            (
                "skymesh_stun_dropped_total",
                "Datagrams the STUN reflector dropped (not a Binding request, or over its rate).",
                c(&self.stun_dropped),
            ),
            (
                "skymesh_relay_frames_sent_total",
                "Relay frames sent (bind answers and forwarded datagrams).",
                c(&self.relay_forwarded),
            ),
            (
                "skymesh_relay_bytes_sent_total",
                "Bytes the relay sent.",
                c(&self.relay_bytes),
            ),
            (
                "skymesh_relay_dropped_total",
                "Relay frames dropped (bad token, unbound sender, unknown destination, over budget, malformed).",
                c(&self.relay_dropped),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP skymesh_nodes Nodes by state.\n# TYPE skymesh_nodes gauge"
        );
        for (state, v) in [
            ("pending", stats.pending),
            ("approved", stats.approved),
            ("revoked", stats.revoked),
        ] {
            let _ = writeln!(out, "skymesh_nodes{{state=\"{state}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP skymesh_relay_bindings Nodes bound to this controller's relay.\n\
             # TYPE skymesh_relay_bindings gauge\nskymesh_relay_bindings {}",
            c(&self.relay_bindings)
        );
        let gauges = [
            (
                "skymesh_topology_serial",
                "Current topology generation.",
                stats.serial,
            ),
            (
                "skymesh_enrollment_keys_active",
                "Enrollment keys not revoked.",
                stats.enrollment_keys,
            ),
            (
                "skymesh_netmap_streams",
                "Open netmap streams.",
                c(&self.streams_open),
            ),
            (
                "skymesh_audit_entries",
                "Entries in the audit log.",
                stats.audit_entries,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Per-node gauges from what the nodes last reported: last-seen age, netmap age, the uplink
/// each peer path uses (`skymesh_node_path_uplink{node,peer,uplink,kind} 1`), switch counts,
/// path RTT/loss and uplink state. `nodes` pairs each node with its last contact.
pub fn render_nodes(nodes: &[(NodeRecord, Option<NodeSeen>)], now: u64) -> String {
    let mut out = String::new();
    let families = [
        ("skymesh_node_last_seen_age_seconds", "gauge", "Seconds since the node was last heard from."),
        ("skymesh_node_netmap_age_seconds", "gauge", "Staleness of the netmap the node runs on, as of its last report (0: stream connected)."),
        ("skymesh_node_netmap_serial", "gauge", "Netmap serial the node reported as applied."),
        ("skymesh_node_uplink_up", "gauge", "Whether a node's uplink link is up."),
        ("skymesh_node_path_uplink", "gauge", "1 for the local uplink (and its kind) carrying the node's traffic to a peer."),
        ("skymesh_node_path_switches_total", "counter", "Path switches of the node towards a peer since its device started."),
        ("skymesh_node_path_rtt_seconds", "gauge", "Smoothed RTT of one path (node uplink to peer endpoint)."),
        ("skymesh_node_path_loss_ratio", "gauge", "Probe loss of one path."),
        ("skymesh_node_uplink_nat", "gauge", "1 for how the NAT in front of a node's uplink maps (endpoint-independent, endpoint-dependent, unknown), from STUN."),
    ];
    let mut lines: Vec<Vec<String>> = vec![Vec::new(); families.len()];
    let mut names = std::collections::BTreeMap::new();
    for (n, _) in nodes {
        names.insert(n.id, n.name.as_str());
    }
    for (node, seen) in nodes {
        let Some(seen) = seen else { continue };
        let n = format!("node=\"{}\",name=\"{}\"", node.id, label(&node.name));
        lines[0].push(format!("{{{n}}} {}", now.saturating_sub(seen.last_seen)));
        let Some(status) = &seen.status else { continue };
        if let Some(age) = status.netmap_age_secs {
            // The report is itself this old: the netmap has aged at least as much since.
            let since = seen.reported_at.map_or(0, |r| now.saturating_sub(r));
            lines[1].push(format!("{{{n}}} {}", age.saturating_add(since)));
        }
        lines[2].push(format!("{{{n}}} {}", status.serial));
        for u in &status.uplinks {
            lines[3].push(format!(
                "{{{n},uplink=\"{}\",kind=\"{}\"}} {}",
                label(&u.name),
                kind_name(u.kind),
                u8::from(u.up)
            ));
            if let Some(nat) = &u.nat {
                lines[8].push(format!(
                    "{{{n},uplink=\"{}\",nat=\"{}\"}} 1",
                    label(&u.name),
                    label(nat)
                ));
            }
        }
        for p in &status.peers {
            let peer = format!(
                "{n},peer=\"{}\",peer_name=\"{}\"",
                p.node_id,
                label(names.get(&p.node_id).copied().unwrap_or(""))
            );
            if let (Some(uplink), Some(kind)) = (&p.uplink, p.uplink_kind) {
                lines[4].push(format!(
                    "{{{peer},uplink=\"{}\",kind=\"{}\"}} 1",
                    label(uplink),
                    kind_name(kind)
                ));
            }
            if !p.paths.is_empty() {
                lines[5].push(format!("{{{peer}}} {}", p.switch_count));
            }
            for x in &p.paths {
                let l = format!(
                    "{peer},uplink=\"{}\",remote=\"{}\"",
                    label(&x.uplink),
                    x.remote
                );
                if let Some(rtt) = x.rtt_us {
                    lines[6].push(format!("{{{l}}} {}", rtt as f64 / 1e6));
                }
                lines[7].push(format!("{{{l}}} {}", f64::from(x.loss_permille) / 1e3));
            }
        }
    }
    for ((name, kind, help), lines) in families.iter().zip(lines) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for l in lines {
            let _ = writeln!(out, "{name}{l}");
        }
    }
    out
}

fn kind_name(k: UplinkKind) -> &'static str {
    match k {
        UplinkKind::Satellite => "satellite",
        UplinkKind::Terrestrial => "terrestrial",
        UplinkKind::Cellular => "cellular",
        UplinkKind::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges_in_text_format() {
        let m = Metrics::default();
        m.record_status(201);
        m.record_status(404);
        m.record_status(404);
        let text = m.render(&Stats {
            serial: 7,
            approved: 3,
            ..Stats::default()
        });
        assert!(
            text.contains("skymesh_http_responses_total{class=\"2xx\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("skymesh_http_responses_total{class=\"4xx\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("skymesh_nodes{state=\"approved\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE skymesh_topology_serial gauge\nskymesh_topology_serial 7\n"));
    }

    #[test]
    fn node_reports_become_path_uplink_switch_and_staleness_gauges() {
        use skymesh_proto::{
            NodeId, NodeState, PathHealth, PathReport, PeerStatus, StatusReport, UplinkReport,
            WgPublicKey,
        };
        let node = |id: u64, name: &str| NodeRecord {
            id: NodeId(id),
            name: name.into(),
            public_key: WgPublicKey([id as u8; 32]),
            state: NodeState::Approved,
            ipv4: "10.77.0.1".parse().expect("ip"),
            ipv6: "fd7a::1".parse().expect("ip"),
            tags: vec![],
            endpoints: vec![],
            advertised_routes: vec![],
            approved_routes: vec![],
            enrollment_key_id: None,
            created_at: 0,
            expires_at: None,
        };
        let status = StatusReport {
            serial: 9,
            peers: vec![PeerStatus {
                node_id: NodeId(2),
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                uplink: Some("fibre".into()),
                endpoint: None,
                uplink_kind: Some(UplinkKind::Terrestrial),
                switch_count: 3,
                last_switch_reason: Some("link_down".into()),
                last_switch_secs_ago: Some(1),
                paths: vec![PathReport {
                    uplink: "fibre".into(),
                    kind: UplinkKind::Terrestrial,
                    remote: "198.19.1.2:51820".parse().expect("addr"),
                    health: PathHealth::Healthy,
                    active: true,
                    rtt_us: Some(1500),
                    loss_permille: 20,
                }],
            }],
            netmap_age_secs: Some(5),
            uplinks: vec![UplinkReport {
                name: "starlink".into(),
                kind: UplinkKind::Satellite,
                priority: 0,
                up: false,
                reflexive: vec!["198.19.4.4:51820".parse().expect("addr")],
                nat: Some("endpoint-independent".into()),
            }],
        };
        let seen = NodeSeen {
            last_seen: 990,
            seen_from: None,
            reported_at: Some(995),
            status: Some(status),
        };
        let text = render_nodes(
            &[(node(1, "field \"1\""), Some(seen)), (node(2, "hq"), None)],
            1000,
        );
        let n = r#"node="1",name="field \"1\"""#;
        for want in [
            format!("skymesh_node_last_seen_age_seconds{{{n}}} 10\n"),
            format!("skymesh_node_netmap_age_seconds{{{n}}} 10\n"),
            format!("skymesh_node_uplink_up{{{n},uplink=\"starlink\",kind=\"satellite\"}} 0\n"),
            format!(
                "skymesh_node_uplink_nat{{{n},uplink=\"starlink\",nat=\"endpoint-independent\"}} 1\n"
            ),
            format!(
                "skymesh_node_path_uplink{{{n},peer=\"2\",peer_name=\"hq\",uplink=\"fibre\",kind=\"terrestrial\"}} 1\n"
            ),
            format!("skymesh_node_path_switches_total{{{n},peer=\"2\",peer_name=\"hq\"}} 3\n"),
            "skymesh_node_path_rtt_seconds{".to_string(),
            "remote=\"198.19.1.2:51820\"} 0.0015\n".to_string(),
            "# TYPE skymesh_node_path_switches_total counter\n".to_string(),
        ] {
            assert!(text.contains(&want), "missing {want:?} in\n{text}");
        }
        // Node 2 never called in: no gauges for it.
        assert!(!text.contains("node=\"2\""), "{text}");
    }
}
