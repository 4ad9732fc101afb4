//! Prometheus metrics, hand-rolled: a few atomic counters plus gauges read from the store at
//! scrape time. Text exposition format 0.0.4.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::Stats;

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
}
