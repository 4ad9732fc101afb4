//! `skymesh-agent`: the skymesh node agent. Today: a userspace WireGuard device compatible with
//! wireguard-go's UAPI (`device`), and wg-quick style `up`/`down`.

use std::process::ExitCode;
use std::sync::{mpsc, Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod control;
mod device;
mod fastpath;
mod netlink;
mod paths;
mod status;
mod sys;
mod uapi_client;
mod uapi_server;
mod updown;
mod uplink;

/// Counts allocations per thread; the data plane reports its own in `skymesh-agent status`.
#[global_allocator]
static GLOBAL: sys::CountingAlloc = sys::CountingAlloc;

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
        /// Uplinks file (YAML, see configs/agent-uplinks.yaml): one socket per uplink and
        /// carrier-aware failover for the peers it lists. Needs --foreground.
        #[arg(long, env = "SKYMESH_UPLINKS")]
        uplinks: Option<std::path::PathBuf>,
        /// Serve Prometheus metrics on this loopback address (e.g. 127.0.0.1:9101).
        #[arg(long, env = "SKYMESH_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Show per peer the active uplink, per-path RTT/loss, switch count and last switch reason
    /// (from /var/run/skymesh/IFACE.status).
    Status {
        /// Interface; optional when one device runs.
        #[arg(env = "SKYMESH_IFACE")]
        iface: Option<String>,
        /// Print the raw JSON report.
        #[arg(long, env = "SKYMESH_STATUS_JSON")]
        json: bool,
    },
    /// Bring up an interface from a wg-quick style file: start the device, apply keys and
    /// peers, set addresses, MTU and routes. The interface is named after the file.
    Up {
        /// Path to IFACE.conf.
        #[arg(env = "SKYMESH_CONFIG")]
        config: std::path::PathBuf,
    },
    /// Join the mesh: generate the WireGuard key here, register with an enrollment key, pin
    /// the controller's signing key, save the state (0600), then run.
    Join(Box<JoinArgs>),
    /// Run a joined node (from --state-dir, or --config which joins first if needed):
    /// start the device, apply the cached netmap (fail-static), follow the controller's stream.
    Run(RunArgs),
    /// Generate a new WireGuard key pair, register its public key, install it.
    RotateKey(RunArgs),
    /// Undo exactly what `up` did for this file, and stop the device.
    Down {
        /// Path to IFACE.conf.
        #[arg(env = "SKYMESH_CONFIG")]
        config: std::path::PathBuf,
    },
}

/// Flags of `join`.
#[derive(clap::Args, Debug)]
struct JoinArgs {
    /// Controller URL (https://…; http:// needs --allow-http).
    #[arg(long, env = "SKYMESH_CONTROLLER")]
    controller: String,
    /// Enrollment key (`sme_…`).
    #[arg(long, env = "SKYMESH_ENROLL_KEY")]
    enroll_key: String,
    /// Expected controller signing key (base64 Ed25519); without it: trust on first use.
    #[arg(long, env = "SKYMESH_CONTROLLER_KEY")]
    controller_key: Option<skymesh_proto::ControllerPublicKey>,
    /// Node name (default: the host name).
    #[arg(long, env = "SKYMESH_NAME")]
    name: Option<String>,
    #[arg(long, env = "SKYMESH_STATE_DIR", default_value = "/var/lib/skymesh")]
    state_dir: std::path::PathBuf,
    #[arg(long, env = "SKYMESH_IFACE", default_value = "sm0")]
    iface: String,
    #[command(flatten)]
    run: RunFlags,
}

/// Settings shared by `join`, `run` and `rotate-key`.
#[derive(clap::Args, Debug, Clone)]
struct RunFlags {
    /// WireGuard UDP port.
    #[arg(long, env = "SKYMESH_LISTEN_PORT", default_value_t = 51820)]
    listen_port: u16,
    /// An uplink endpoint to announce: NAME,KIND,ADDR:PORT (KIND: satellite, terrestrial,
    /// cellular). Repeatable.
    #[arg(long = "endpoint", env = "SKYMESH_ENDPOINTS", value_delimiter = ';')]
    endpoints: Vec<String>,
    /// A LAN prefix to offer (admin approves). Repeatable.
    #[arg(long = "route", env = "SKYMESH_ROUTES", value_delimiter = ',')]
    routes: Vec<ipnet::IpNet>,
    /// PEM CA/certificate to trust for the controller's HTTPS (pinning).
    #[arg(long, env = "SKYMESH_CONTROLLER_CA")]
    ca: Option<std::path::PathBuf>,
    /// Allow a plain-HTTP controller URL (labs and tests only).
    #[arg(long, env = "SKYMESH_ALLOW_HTTP")]
    allow_http: bool,
    /// Rotate the WireGuard key this often (seconds) while running.
    #[arg(long, env = "SKYMESH_ROTATE_KEY_EVERY_SECS")]
    rotate_key_every_secs: Option<u64>,
    /// Uplinks file (YAML: `uplinks:` and `failover:` as in configs/agent-uplinks.yaml):
    /// carrier-aware failover; without --endpoint, the announced endpoints are the uplinks'
    /// addresses with the listen port.
    #[arg(long, env = "SKYMESH_UPLINKS")]
    uplinks: Option<std::path::PathBuf>,
}

impl RunFlags {
    fn settings(&self) -> anyhow::Result<control::RunSettings> {
        if self.rotate_key_every_secs == Some(0) {
            anyhow::bail!("--rotate-key-every-secs must be at least 1");
        }
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| parse_endpoint(e))
            .collect::<anyhow::Result<_>>()?;
        Ok(control::RunSettings {
            listen_port: self.listen_port,
            endpoints,
            routes: self.routes.clone(),
            ca: self.ca.clone(),
            allow_http: self.allow_http,
            rotate_every: self
                .rotate_key_every_secs
                .map(std::time::Duration::from_secs),
            uplinks: Some(
                self.uplinks
                    .as_deref()
                    .map(control::config::load_uplinks_file)
                    .transpose()?
                    .unwrap_or_else(control::failover::routed_uplinks),
            ),
        })
    }
}

fn parse_endpoint(s: &str) -> anyhow::Result<skymesh_proto::Endpoint> {
    let mut it = s.splitn(3, ',');
    let (Some(name), Some(kind), Some(addr)) = (it.next(), it.next(), it.next()) else {
        anyhow::bail!("--endpoint {s:?}: expected NAME,KIND,ADDR:PORT");
    };
    let kind = serde_json::from_value(serde_json::Value::String(kind.to_string()))
        .with_context(|| format!("--endpoint {s:?}: kind"))?;
    if kind == skymesh_proto::UplinkKind::Unknown {
        anyhow::bail!("--endpoint {s:?}: kind must be satellite, terrestrial or cellular");
    }
    Ok(skymesh_proto::Endpoint {
        addr: addr
            .parse()
            .with_context(|| format!("--endpoint {s:?}: address"))?,
        uplink: name.to_string(),
        kind,
        priority: None,
    })
}

impl JoinArgs {
    fn settings(&self) -> anyhow::Result<control::JoinSettings> {
        let run = self.run.settings()?;
        let name = match &self.name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .context("reading the host name; pass --name")?,
        };
        Ok(control::JoinSettings {
            controller: control::client::ControllerOptions {
                url: self.controller.clone(),
                ca: run.ca.clone(),
                allow_http: run.allow_http,
            },
            enroll_key: self.enroll_key.clone(),
            controller_key: self.controller_key,
            name,
            state_dir: self.state_dir.clone(),
            iface: self.iface.clone(),
            run,
        })
    }
}

/// Flags of `run` and `rotate-key`.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Agent config file (see configs/agent.yaml); joins first if the state dir is empty.
    #[arg(long, env = "SKYMESH_AGENT_CONFIG", conflicts_with = "state_dir")]
    config: Option<std::path::PathBuf>,
    #[arg(long, env = "SKYMESH_STATE_DIR")]
    state_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    run: RunFlags,
}

impl RunArgs {
    /// The state dir and settings; with --config, joins first when no node is held yet.
    fn resolve(&self) -> anyhow::Result<(std::path::PathBuf, control::RunSettings)> {
        let Some(path) = &self.config else {
            let dir = self
                .state_dir
                .clone()
                .unwrap_or_else(|| "/var/lib/skymesh".into());
            return Ok((dir, self.run.settings()?));
        };
        let c = control::config::AgentConfig::load(path)?;
        if c.rotate_key_every_secs == Some(0) {
            anyhow::bail!(
                "{}: rotate_key_every_secs must be at least 1",
                path.display()
            );
        }
        let run = control::RunSettings {
            listen_port: c.listen_port,
            endpoints: c.endpoints.clone(),
            routes: c.routes.clone(),
            ca: c.controller.ca.clone(),
            allow_http: c.controller.allow_http,
            rotate_every: c.rotate_key_every_secs.map(std::time::Duration::from_secs),
            uplinks: Some(
                c.path_config()?
                    .unwrap_or_else(control::failover::routed_uplinks),
            ),
        };
        let dir = control::state::StateDir::open(&c.state_dir)?;
        if dir.load_state()?.is_none() {
            let enroll_key = c.enroll_key.clone().with_context(|| {
                format!(
                    "{}: `enroll_key` is needed for the first join",
                    path.display()
                )
            })?;
            control::join(&control::JoinSettings {
                controller: control::client::ControllerOptions {
                    url: c.controller.url.clone(),
                    ca: c.controller.ca.clone(),
                    allow_http: c.controller.allow_http,
                },
                enroll_key,
                controller_key: c.controller.key,
                name: c.name.clone(),
                state_dir: c.state_dir.clone(),
                iface: c.iface.clone(),
                run: run.clone(),
            })?;
        }
        Ok((c.state_dir, run))
    }
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
        Cmd::Status { iface, json } => status::print_status(iface.as_deref(), json),
        Cmd::Device {
            iface,
            foreground,
            uplinks,
            metrics_listen,
        } => {
            if foreground && uplinks.is_none() && metrics_listen.is_none() {
                run_device(&iface)
            } else if foreground {
                run_device_with(&iface, uplinks.as_deref(), metrics_listen)
            } else if uplinks.is_some() || metrics_listen.is_some() {
                anyhow::bail!("--uplinks and --metrics-listen need --foreground")
            } else {
                updown::spawn_detached_device(&iface, None).map(|_| ())
            }
        }
        Cmd::Join(args) => {
            let settings = args.settings()?;
            control::join(&settings)?;
            control::run(&settings.state_dir, &settings.run)
        }
        Cmd::Run(args) => {
            let (dir, settings) = args.resolve()?;
            control::run(&dir, &settings)
        }
        Cmd::RotateKey(args) => {
            let (dir, settings) = args.resolve()?;
            control::rotate_key(&dir, &settings)
        }
        Cmd::Up { config } => updown::up(&config),
        Cmd::Down { config } => updown::down(&config),
    }
}

/// Runs the device in the foreground until SIGTERM/SIGINT.
pub(crate) fn run_device(iface: &str) -> anyhow::Result<()> {
    run_device_with(iface, None, None)
}

/// Runs the device in the foreground, with an optional uplinks file (failover) and metrics
/// endpoint, until SIGTERM/SIGINT.
pub(crate) fn run_device_with(
    iface: &str,
    uplinks: Option<&std::path::Path>,
    metrics_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let setup = uplinks.map(paths::FailoverSetup::load).transpose()?;
    let metrics = metrics_listen.map(status::bind_metrics).transpose()?;
    // Before any thread exists, so every thread inherits the mask and the signals arrive
    // only through the data plane's signalfd.
    sys::SignalFd::block_signals().context("blocking SIGTERM/SIGINT")?;
    let (tx, rx) = mpsc::channel();
    let (dev, control) = device::Device::new(iface, rx, setup)?;
    let status_socket = Arc::new(status::StatusSocket::bind(iface)?);
    {
        let (tx, wake, s) = (tx.clone(), control.wake.clone(), status_socket.clone());
        std::thread::Builder::new()
            .name("status".into())
            .spawn(move || s.serve(tx, wake))
            .context("spawning the status thread")?;
    }
    if let Some(listener) = metrics {
        let (tx, wake) = (tx.clone(), control.wake.clone());
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || status::serve_metrics(listener, tx, wake))
            .context("spawning the metrics thread")?;
    }
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
    status_socket.remove_file();
    let drops = result?;
    tracing::info!(?drops, "device stopped");
    Ok(())
}
