//! `skymesh-impair`: userspace UDP impairment relay (see the library docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Parser;
use skymesh_impair::profile::Profile;
use skymesh_impair::relay::{Relay, RelayConfig};

/// Relays UDP from clients on --listen to --target and back, impaired by a profile.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address clients send to.
    #[arg(long, env = "SKYMESH_IMPAIR_LISTEN")]
    listen: SocketAddr,
    /// Where datagrams are forwarded.
    #[arg(long, env = "SKYMESH_IMPAIR_TARGET")]
    target: SocketAddr,
    /// Local address for the per-client upstream sockets.
    #[arg(long, env = "SKYMESH_IMPAIR_UPSTREAM_BIND")]
    upstream_bind: Option<SocketAddr>,
    /// Built-in profile: clean, starlink.
    #[arg(
        long,
        env = "SKYMESH_IMPAIR_PROFILE",
        default_value = "clean",
        conflicts_with = "profile_file"
    )]
    profile: String,
    /// YAML profile file (see configs/impair-starlink.yaml).
    #[arg(long, env = "SKYMESH_IMPAIR_PROFILE_FILE")]
    profile_file: Option<PathBuf>,
    /// UDP control socket (`blackhole [up|down|both] on|off|toggle`, `status`).
    #[arg(long, env = "SKYMESH_IMPAIR_CONTROL")]
    control: Option<SocketAddr>,
    /// Seed for all random draws (default: from the OS).
    #[arg(long, env = "SKYMESH_IMPAIR_SEED")]
    seed: Option<u64>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skymesh-impair: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_profile(args: &Args) -> anyhow::Result<Profile> {
    if let Some(path) = &args.profile_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading profile {}", path.display()))?;
        return Profile::from_yaml(&text).with_context(|| format!("profile {}", path.display()));
    }
    match Profile::builtin(&args.profile) {
        Some(p) => Ok(p),
        None => bail!(
            "unknown profile {:?}; built-in profiles: {}",
            args.profile,
            Profile::BUILTIN.join(", ")
        ),
    }
}

#[tokio::main]
async fn try_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let profile = load_profile(&args)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let relay = Relay::bind(RelayConfig {
        listen: args.listen,
        target: args.target,
        upstream_bind: args.upstream_bind,
        control: args.control,
        profile,
        seed,
    })
    .await
    .context("binding sockets")?;
    let listen = relay.local_addr()?;
    let control = match relay.control_addr() {
        Some(addr) => addr?.to_string(),
        None => "none".to_string(),
    };
    // One machine-readable line for scripts and tests (ports may be ephemeral).
    println!(
        "ready listen={listen} control={control} target={} seed={seed}",
        args.target
    );
    let switches = relay.control();
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("installing SIGUSR1 handler")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let run = relay.run();
    tokio::pin!(run);
    loop {
        tokio::select! {
            res = &mut run => return res.context("relay failed"),
            _ = usr1.recv() => {
                let on = switches.toggle_blackhole();
                tracing::info!(blackhole = on, "SIGUSR1: blackhole toggled");
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: exiting");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
