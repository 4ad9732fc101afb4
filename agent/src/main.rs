//! `skymesh-agent`: the skymesh node agent. Today: a userspace WireGuard device compatible with
//! wireguard-go's UAPI (`device`), and wg-quick style `up`/`down`.

use std::process::ExitCode;
use std::sync::{mpsc, Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod device;
mod netlink;
mod sys;
mod uapi_client;
mod uapi_server;
mod updown;
mod uplink;

#[derive(Parser, Debug)]
#[command(name = "skymesh-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create TUN interface IFACE and serve the WireGuard UAPI on
    /// /var/run/wireguard/IFACE.sock, like `wireguard-go IFACE`.
    Device {
        /// Interface name (1-15 bytes).
        #[arg(env = "SKYMESH_IFACE")]
        iface: String,
        /// Stay in the foreground (otherwise detach once the UAPI socket is up).
        #[arg(short, long, env = "SKYMESH_FOREGROUND")]
        foreground: bool,
    },
    /// Bring up an interface from a wg-quick style file: start the device, apply keys and
    /// peers, set addresses, MTU and routes. The interface is named after the file.
    Up {
        /// Path to IFACE.conf.
        #[arg(env = "SKYMESH_CONFIG")]
        config: std::path::PathBuf,
    },
    /// Undo exactly what `up` did for this file, and stop the device.
    Down {
        /// Path to IFACE.conf.
        #[arg(env = "SKYMESH_CONFIG")]
        config: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKYMESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,boringtun=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("skymesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Device { iface, foreground } => {
            if foreground {
                run_device(&iface)
            } else {
                updown::spawn_detached_device(&iface, None).map(|_| ())
            }
        }
        Cmd::Up { config } => updown::up(&config),
        Cmd::Down { config } => updown::down(&config),
    }
}

/// Runs the device in the foreground until SIGTERM/SIGINT.
pub(crate) fn run_device(iface: &str) -> anyhow::Result<()> {
    // Before any thread exists, so every thread inherits the mask and the signals arrive
    // only through the data plane's signalfd.
    sys::SignalFd::block_signals().context("blocking SIGTERM/SIGINT")?;
    let (tx, rx) = mpsc::channel();
    let (dev, control) = device::Device::new(iface, rx)?;
    let socket = Arc::new(uapi_server::UapiSocket::bind(iface)?);
    let server = socket.clone();
    std::thread::Builder::new()
        .name("uapi".into())
        .spawn(move || server.serve(tx, control.wake))
        .context("spawning the UAPI thread")?;
    let result = dev.run();
    // The TUN closed with `dev`; the UAPI thread stays blocked in accept() until the process
    // exits, so remove the socket file here rather than in its Drop.
    socket.remove_file();
    let drops = result?;
    tracing::info!(?drops, "device stopped");
    Ok(())
}
