//! Runs the repository's harness `scripts/wg-harness` with the agent next to wireguard-go and
//! boringtun-cli: every pair, mixed ones both ways, must pass interop (exit 0), and every
//! failover row with the agent on side a (`wg set` endpoint move) must PASS.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

#[test]
fn harness_interop_and_failover_pass_with_the_agent_against_both_reference_peers() {
    require(&[
        "ip",
        "wg",
        "ping",
        "wireguard-go",
        "boringtun-cli",
        "iperf3",
        "jq",
    ]);
    let harness = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/wg-harness");
    let dir = tmpdir();
    let out_md = dir.path().join("report.md");
    let prefix = format!("s3{}", std::process::id() % 10000);
    let out = Command::new(&harness)
        .env("PATH", path_env())
        .args([
            "--impl",
            &format!("skymesh={AGENT} device {{iface}} --foreground"),
            "--impl",
            "wireguard-go",
            "--impl",
            "boringtun",
            "--mix",
            "--scenarios",
            "interop,failover",
            "--prefix",
            &prefix,
            "--out",
            out_md.to_str().expect("utf8 path"),
        ])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", harness.display()));
    let report = std::fs::read_to_string(&out_md).unwrap_or_default();
    assert!(
        out.status.success(),
        "wg-harness exit {}:\n{report}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // Interop: every pair that involves the agent passes.
    let rows = |section: &str| -> Vec<Vec<String>> {
        let body = report.split(section).nth(1).unwrap_or("");
        body.lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_owned())
                    .collect()
            })
            .collect()
    };
    let interop = rows("### interop");
    let agent_pairs: Vec<_> = interop
        .iter()
        .filter(|r| r[0].contains("skymesh"))
        .collect();
    assert_eq!(
        agent_pairs.len(),
        5,
        "skymesh alone + 4 mixed pairs:\n{report}"
    );
    for r in agent_pairs {
        assert!(
            r.last().is_some_and(|c| c.contains("PASS")),
            "interop row {r:?}\n{report}"
        );
    }

    // Failover with the agent on side a: `skymesh`, `skymesh / wireguard-go`, `skymesh / boringtun`.
    let failover = rows("### failover");
    let side_a: Vec<_> = failover
        .iter()
        .filter(|r| r[0] == "skymesh" || r[0].starts_with("skymesh /"))
        .collect();
    assert_eq!(
        side_a.len(),
        3,
        "failover rows with skymesh on side a:\n{report}"
    );
    for r in side_a {
        assert_eq!(
            r.last().map(String::as_str),
            Some("PASS"),
            "failover row {r:?}\n{report}"
        );
    }
}
