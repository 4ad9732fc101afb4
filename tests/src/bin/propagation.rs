//! `skymesh-propagation`: how long an admin change takes to reach every connected agent.
//!
//! Starts the real controller on 127.0.0.1, registers N nodes, opens N netmap streams (the
//! "simulated agents": real SSE clients that verify every event's signature), then makes R
//! admin changes that alter every node's netmap (a tag change on one node, so every other
//! node's peer entry for it changes) and records, per stream and change, the time from sending
//! the PATCH to receiving the signed delta. Prints p50/p99/max. Loopback only.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::StreamExt as _;
use serde_json::json;
use skymesh_e2e::{percentile, Controller};
use skymesh_proto::{StreamEvent, VerifyingKey};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Number of simulated agents (streams).
    #[arg(long, env = "SKYMESH_AGENTS", default_value_t = 100)]
    agents: usize,
    /// Number of admin changes to time.
    #[arg(long, env = "SKYMESH_ROUNDS", default_value_t = 20)]
    rounds: usize,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Every simulated agent registers and streams from 127.0.0.1: lift the per-source limits.
    let controller = Controller::start_args(
        None,
        &format!("127.0.0.1:{}", free_port()?),
        None,
        &[
            "--register-per-minute",
            "0",
            "--max-connections-per-source",
            "1000000",
            "--max-connections",
            "1000000",
        ],
    )?;
    let http = reqwest::Client::new();
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(&controller.admin_token);
    let key: serde_json::Value =
        admin(http.post(format!("{}/api/v1/enrollment-keys", controller.url)))
            .json(&json!({"reusable": true, "auto_approve": true, "max_uses": args.agents.max(1)}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
    let enroll = key["key"].as_str().context("key")?.to_string();

    let mut creds = Vec::new();
    let mut pinned: Option<VerifyingKey> = None;
    let mut first_id = 0;
    for i in 0..args.agents {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        k[31] = 0x5a;
        let pk = skymesh_proto::WgPublicKey(k).to_string();
        let r: serde_json::Value = http
            .post(format!("{}/api/v1/register", controller.url))
            .json(&json!({"enrollment_key": enroll, "public_key": pk, "name": format!("sim-{i}")}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if i == 0 {
            first_id = r["node_id"].as_u64().context("node_id")?;
        }
        let ck: skymesh_proto::ControllerPublicKey =
            serde_json::from_value(r["controller_public_key"].clone())?;
        pinned = Some(ck.0);
        creds.push(r["credential"].as_str().context("credential")?.to_string());
    }
    let pinned = pinned.context("no agents")?;

    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant, u64)>();
    for (idx, cred) in creds.iter().enumerate() {
        let resp = http
            .get(format!("{}/api/v1/netmap/stream", controller.url))
            .bearer_auth(cred)
            .send()
            .await?
            .error_for_status()?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                        continue;
                    };
                    let at = Instant::now();
                    let serial = match serde_json::from_str::<StreamEvent>(data) {
                        Ok(StreamEvent::Netmap(s)) => s.verify(&pinned).map(|m| m.serial),
                        Ok(StreamEvent::Delta(d)) => d.verify(&pinned).map(|d| d.serial),
                        _ => continue,
                    };
                    match serial {
                        Ok(s) => {
                            let _ = tx.send((idx, at, s));
                        }
                        Err(e) => eprintln!("stream {idx}: bad signature: {e}"),
                    }
                }
            }
        });
    }
    // Every stream's first (full) netmap.
    let mut seen = vec![false; creds.len()];
    while seen.iter().any(|s| !s) {
        let (idx, _, _) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("waiting for first netmaps")?
            .context("streams ended")?;
        seen[idx] = true;
    }

    let mut latencies = Vec::with_capacity(args.rounds * creds.len());
    for round in 0..args.rounds {
        let t0 = Instant::now();
        admin(http.patch(format!("{}/api/v1/nodes/{first_id}", controller.url)))
            .json(&json!({"tags": [format!("round-{round}")]}))
            .send()
            .await?
            .error_for_status()?;
        let mut got = vec![false; creds.len()];
        while got.iter().any(|g| !g) {
            let (idx, at, _) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .with_context(|| format!("round {round}: not every agent got the change"))?
                .context("streams ended")?;
            if !got[idx] {
                got[idx] = true;
                latencies.push(at.saturating_duration_since(t0));
            }
        }
    }
    if latencies.is_empty() {
        bail!("nothing measured");
    }
    latencies.sort();
    println!(
        "agents={} changes={} deliveries={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
        creds.len(),
        args.rounds,
        latencies.len(),
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    Ok(())
}
