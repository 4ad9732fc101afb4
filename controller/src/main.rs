//! `skymesh-controller`: serve the API, create admin tokens, verify the audit log.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use skymesh_controller::config::{Config, DatabaseConfig};
use skymesh_controller::store::postgres::redact_url;
use skymesh_controller::store::{Actor, Scope, Store};
use skymesh_controller::{open, Clock};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "skymesh-controller", version, about = "skymesh controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API.
    Serve(Box<ServeArgs>),
    /// Manage admin API tokens.
    AdminToken {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Args)]
struct CommonArgs {
    /// YAML configuration file.
    #[arg(long, env = "SKYMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the database and signing key (overrides `data_dir` in the config).
    #[arg(long, env = "SKYMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL, e.g. postgres://skymesh:pw@db:5432/skymesh (overrides `database.url`);
    /// without one, SQLite in the data dir. Replicas share one database.
    #[arg(long, env = "SKYMESH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on (overrides `listen` in the config).
    #[arg(long, env = "SKYMESH_LISTEN")]
    listen: Option<SocketAddr>,
    /// MTU handed to agents (overrides `mtu`).
    #[arg(long, env = "SKYMESH_MTU")]
    mtu: Option<u16>,
    /// Signing key file (overrides `signing_key`; default: controller-signing.key in the data
    /// dir). Every replica must use the same key.
    #[arg(long, env = "SKYMESH_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// Overlay IPv4 prefix (overrides `overlay.ipv4`; fixed at first start).
    #[arg(long, env = "SKYMESH_OVERLAY_IPV4")]
    overlay_ipv4: Option<ipnet::Ipv4Net>,
    /// Overlay IPv6 ULA prefix (overrides `overlay.ipv6`; fixed at first start).
    #[arg(long, env = "SKYMESH_OVERLAY_IPV6")]
    overlay_ipv6: Option<ipnet::Ipv6Net>,
    /// Largest accepted request body in bytes (overrides `max_body_bytes`).
    #[arg(long, env = "SKYMESH_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// UDP port of the STUN reflector on the listen address; it and the next port answer
    /// agents' endpoint discovery (overrides `stun_port`; 0 = off; default 3478).
    #[arg(long, env = "SKYMESH_STUN_PORT")]
    stun_port: Option<u16>,
    /// UDP port of the relay on the listen address, for nodes that cannot reach each other
    /// directly (overrides `relay_port`; 0 = off; default 3480).
    #[arg(long, env = "SKYMESH_RELAY_PORT")]
    relay_port: Option<u16>,
    /// A node's IPv4 routes together cover at most one /N (overrides `max_route_prefix_v4`).
    #[arg(long, env = "SKYMESH_MAX_ROUTE_PREFIX_V4")]
    max_route_prefix_v4: Option<u8>,
    /// A node's IPv6 routes together cover at most one /N (overrides `max_route_prefix_v6`).
    #[arg(long, env = "SKYMESH_MAX_ROUTE_PREFIX_V6")]
    max_route_prefix_v6: Option<u8>,
    /// Open connections at most (overrides `limits.max_connections`).
    #[arg(long, env = "SKYMESH_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Open connections per source address (overrides `limits.max_connections_per_source`).
    #[arg(long, env = "SKYMESH_MAX_CONNECTIONS_PER_SOURCE")]
    max_connections_per_source: Option<usize>,
    /// Seconds to send request headers, and idle between requests (overrides
    /// `limits.header_timeout_secs`).
    #[arg(long, env = "SKYMESH_HEADER_TIMEOUT_SECS")]
    header_timeout_secs: Option<u64>,
    /// Seconds to send a request body (overrides `limits.body_timeout_secs`).
    #[arg(long, env = "SKYMESH_BODY_TIMEOUT_SECS")]
    body_timeout_secs: Option<u64>,
    /// Registrations per source address per minute, 0 = unlimited (overrides
    /// `limits.register_per_minute`).
    #[arg(long, env = "SKYMESH_REGISTER_PER_MINUTE")]
    register_per_minute: Option<u32>,
    /// PEM certificate chain: serve HTTPS (rustls). Without it the API is plain HTTP.
    #[arg(long, env = "SKYMESH_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "SKYMESH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (it is stored hashed and cannot be shown again).
    Create {
        #[command(flatten)]
        common: CommonArgs,
        /// Create a read-only token (GET endpoints only).
        #[arg(long, env = "SKYMESH_READ_ONLY")]
        read_only: bool,
        /// The token stops working after this long: seconds, or a number with s, m, h or d
        /// (`90d`). Without it the token never expires.
        #[arg(long, env = "SKYMESH_TOKEN_EXPIRES_IN", value_parser = parse_duration_secs)]
        expires_in: Option<u64>,
    },
    /// List tokens: id, scope, created, expires, revoked (unix seconds).
    List {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Revoke a token by id; it is refused from then on.
    Revoke {
        #[command(flatten)]
        common: CommonArgs,
        /// The token's id (see `list`).
        id: u64,
    },
}

/// `90d`, `12h`, `30m`, `45s` or plain seconds, as seconds (1 s to ~100 years).
fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90d, 12h, 30m or 3600"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?}: use s, m, h or d")),
    };
    let secs = n.saturating_mul(mult);
    if !(1..=100 * 365 * 86_400).contains(&secs) {
        return Err(format!("{s:?} is outside 1 s to 100 years"));
    }
    Ok(secs)
}

async fn admin_token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    let actor = Actor("cli".into());
    match command {
        TokenCommand::Create {
            common,
            read_only,
            expires_in,
        } => {
            let config = load_config(&common)?;
            let store = open_store(&config).await?;
            let scope = if read_only {
                Scope::ReadOnly
            } else {
                Scope::Admin
            };
            let now = now();
            let expires_at = expires_in.map(|s| now + s);
            let (id, token) = store
                .create_admin_token(&actor, scope, expires_at, now)
                .await?;
            store.close().await;
            match expires_at {
                Some(t) => eprintln!(
                    "created {scope:?} token {id}, expiring at {t} (unix); it is shown only once:"
                ),
                None => eprintln!("created {scope:?} token {id}; it is shown only once:"),
            }
            println!("{token}");
        }
        TokenCommand::List { common } => {
            let config = load_config(&common)?;
            let store = open_store(&config).await?;
            let tokens = store.admin_tokens().await?;
            store.close().await;
            let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |t| t.to_string());
            println!("id\tscope\tcreated_at\texpires_at\trevoked_at");
            for t in tokens {
                println!(
                    "{}\t{:?}\t{}\t{}\t{}",
                    t.id,
                    t.scope,
                    t.created_at,
                    opt(t.expires_at),
                    opt(t.revoked_at)
                );
            }
        }
        TokenCommand::Revoke { common, id } => {
            let config = load_config(&common)?;
            let store = open_store(&config).await?;
            let result = store.revoke_admin_token(&actor, id, now()).await;
            store.close().await;
            result.with_context(|| format!("revoking admin token {id}"))?;
            eprintln!("revoked admin token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the audit log's hash chain; exits non-zero if it is broken.
    Verify {
        #[command(flatten)]
        common: CommonArgs,
    },
}

fn load_config(common: &CommonArgs) -> anyhow::Result<Config> {
    let mut config = match &common.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = &common.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(url) = &common.database_url {
        match &mut config.database {
            Some(db) => db.url = url.clone(),
            None => config.database = Some(DatabaseConfig::new(url.clone())),
        }
    }
    Ok(config)
}

/// Where the data lives, for messages (the database password is never shown).
fn database_name(config: &Config) -> String {
    match &config.database {
        Some(db) => redact_url(&db.url),
        None => format!("SQLite in {}", config.data_dir.display()),
    }
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    config.validate()?;
    skymesh_controller::open_store(config)
        .await
        .with_context(|| format!("opening the database ({})", database_name(config)))
}

fn now() -> u64 {
    Clock::System.now()
}

/// The command that creates an admin token for this database, naming this very binary so it
/// can be pasted as is (also when run through `cargo run`). The database password is not
/// repeated: it comes from the same config file or `SKYMESH_DATABASE_URL`.
fn token_hint(config: &Config) -> String {
    let exe = std::env::args()
        .next()
        .unwrap_or_else(|| "skymesh-controller".into());
    match &config.database {
        Some(db) => format!(
            "{exe} admin-token create --database-url '{}'",
            redact_url(&db.url)
        ),
        None => format!(
            "{exe} admin-token create --data-dir {}",
            config.data_dir.display()
        ),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = load_config(&args.common)?;
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.mtu {
        config.mtu = v;
    }
    if let Some(v) = args.overlay_ipv4 {
        config.overlay.ipv4 = v;
    }
    if let Some(v) = args.overlay_ipv6 {
        config.overlay.ipv6 = v;
    }
    if let Some(v) = args.max_body_bytes {
        config.max_body_bytes = v;
    }
    if let Some(v) = args.max_route_prefix_v4 {
        config.max_route_prefix_v4 = v;
    }
    if let Some(v) = args.max_route_prefix_v6 {
        config.max_route_prefix_v6 = v;
    }
    let limits = &mut config.limits;
    if let Some(v) = args.max_connections {
        limits.max_connections = v;
    }
    if let Some(v) = args.max_connections_per_source {
        limits.max_connections_per_source = v;
    }
    if let Some(v) = args.header_timeout_secs {
        limits.header_timeout_secs = v;
    }
    if let Some(v) = args.body_timeout_secs {
        limits.body_timeout_secs = v;
    }
    if let Some(v) = args.register_per_minute {
        limits.register_per_minute = v;
    }
    if let Some(v) = args.signing_key {
        config.signing_key = Some(v);
    }
    if let Some(v) = args.stun_port {
        config.stun_port = v;
    }
    if let Some(v) = args.relay_port {
        config.relay_port = v;
    }
    let state = open(&config, Clock::System)
        .await
        .context("starting the controller")?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            skymesh_controller::server::tls_config(cert, key)
                .context("loading the TLS certificate")?,
        ),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let stun = skymesh_controller::stun::bind(addr.ip(), config.stun_port).with_context(|| {
        format!(
            "binding the STUN ports {addr_ip}:{}",
            config.stun_port,
            addr_ip = addr.ip()
        )
    })?;
    let stun_ports: Vec<u16> = stun
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    let mut state = state.with_stun_ports(stun_ports.clone());
    let relay = skymesh_controller::relay::bind(addr.ip(), config.relay_port)
        .with_context(|| format!("binding the relay port {}:{}", addr.ip(), config.relay_port))?;
    if let Some(r) = &relay {
        state = state.with_relay(r.local_addr()?.port());
    }
    let store = state.store.clone();
    // Write errors are ignored: a closed stdout (detached service) must not kill the server.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "skymesh-controller listening on {scheme}://{addr}");
    let _ = writeln!(
        out,
        "  data: {}  controller key: {}",
        database_name(&config),
        state.controller_public_key()
    );
    if let [first, second] = stun_ports.as_slice() {
        let _ = writeln!(
            out,
            "  STUN (endpoint discovery): udp/{first} and udp/{second}"
        );
    }
    if let Some(r) = &state.relay {
        let _ = writeln!(out, "  relay: udp/{}", r.port);
    }
    let _ = writeln!(out, "  get an admin token: {}", token_hint(&config));
    let _ = out.flush();
    drop(out);
    tracing::info!(%addr, "serving");
    let sweeper = tokio::spawn(skymesh_controller::run_expiry_sweeper(state.clone()));
    let mut reflectors = skymesh_controller::stun::spawn(stun, state.metrics.clone())
        .context("starting the STUN reflector")?;
    if let Some(r) = relay {
        reflectors.push(
            skymesh_controller::relay::spawn(r, state.clone()).context("starting the relay")?,
        );
    }
    skymesh_controller::server::serve(listener, state, tls, shutdown_signal())
        .await
        .context("serving")?;
    sweeper.abort();
    for r in reflectors {
        r.abort();
    }
    store.close().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

async fn try_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args).await.map(|()| ExitCode::SUCCESS),
        Command::AdminToken { command } => admin_token(command).await,
        Command::Audit {
            command: AuditCommand::Verify { common },
        } => {
            let config = load_config(&common)?;
            let store = open_store(&config).await?;
            let result = store.verify_audit().await?;
            store.close().await;
            match result {
                Ok(head) => {
                    println!(
                        "audit chain ok: {} entries, head {}",
                        head.entries, head.head
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("audit chain BROKEN: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(try_main()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
