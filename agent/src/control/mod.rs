//! Joining the mesh and staying in it: `skymesh-agent join` and `skymesh-agent run`.
//!
//! Model: this process is the control plane of one node. It owns the state directory
//! ([`state`]), starts the data-plane device (`skymesh-agent device IFACE`, a child process) and
//! feeds it netmaps: every event from the controller's SSE stream goes through the sans-IO
//! [`NetmapGuard`] (signature against the pinned key, our node id, no rollback), and what it
//! accepts is applied with `plan()` (only changed peers) and persisted as the fail-static cache.
//!
//! Fail-static: the cached netmap is applied before the controller is contacted, and losing
//! the controller never removes anything; the loop reconnects with jittered exponential
//! backoff and resumes from the held serial. Staleness shows in the logs and in `status`.
//! Revocation (a `revoked` event, or the credential refused) is the one thing that stops it.

pub(crate) mod client;
pub(crate) mod config;
mod dev;
pub(crate) mod failover;
pub(crate) mod state;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand_core::{OsRng, RngCore as _};
use skymesh_agent_core::control::{backoff, Accepted, AgentState, NetmapGuard, STATE_VERSION};
use skymesh_agent_core::key::Key;
use skymesh_agent_core::path::PathConfig;
use skymesh_proto::{
    ControllerPublicKey, Endpoint, EndpointsReport, NetMap, RegisterRequest, RotateKeyRequest,
    StreamEvent, WgPublicKey,
};

use self::client::{is_credential_refused, Client, ControllerOptions};
use self::failover::{ControlStatus, Liveness, PathFeed};
use self::state::{Cache, StateDir, MAX_CACHED_DELTAS};

/// How often the agent reports status (and re-reports endpoints) to the controller.
const REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// Retry interval while the reports have not got through yet.
const FIRST_REPORT_RETRY: Duration = Duration::from_secs(2);
/// How often the reporter looks at the device's paths (a path switch is reported at once)
/// and rewrites the control-status file `skymesh-agent status` reads.
/// Also how soon a new netmap's STUN and relay settings reach the device and what discovery
/// found is announced: 250 ms keeps join → first packet through a NAT well under a second.
const PATH_POLL: Duration = Duration::from_millis(250);
/// Fallback re-read of the uplinks' addresses; netlink notifications trigger one at once.
const ADDRESS_POLL: Duration = Duration::from_secs(5);
/// The uplinks file `run` writes for its device (`device --uplinks`), in the state dir.
const UPLINKS_FILE: &str = "uplinks.yaml";

/// Everything `join` needs.
#[derive(Debug, Clone)]
pub(crate) struct JoinSettings {
    pub(crate) controller: ControllerOptions,
    pub(crate) enroll_key: String,
    /// Expected controller signing key; `None` = trust on first use.
    pub(crate) controller_key: Option<ControllerPublicKey>,
    pub(crate) name: String,
    pub(crate) state_dir: PathBuf,
    pub(crate) iface: String,
    pub(crate) run: RunSettings,
}

/// Everything `run` needs beyond the state directory.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunSettings {
    pub(crate) listen_port: u16,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) routes: Vec<ipnet::IpNet>,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) allow_http: bool,
    /// Rotate the WireGuard key this often while running (`None`: only on demand).
    pub(crate) rotate_every: Option<Duration>,
    /// Uplinks and failover tuning (validated). `join`/`run` put
    /// [`failover::routed_uplinks`] here when none is declared; `None` (tests only): no path
    /// selection, standard roaming.
    pub(crate) uplinks: Option<PathConfig>,
}

fn public_key(private: &Key) -> WgPublicKey {
    let secret = boringtun::x25519::StaticSecret::from(private.0);
    WgPublicKey(boringtun::x25519::PublicKey::from(&secret).to_bytes())
}

fn generate_key() -> Key {
    let mut k = [0u8; 32];
    OsRng.fill_bytes(&mut k);
    Key(boringtun::x25519::StaticSecret::from(k).to_bytes())
}

/// `skymesh-agent join`: generate a key locally, register, pin the controller key, save state.
pub(crate) fn join(s: &JoinSettings) -> anyhow::Result<()> {
    let dir = StateDir::open(&s.state_dir)?;
    if dir.load_state()?.is_some() {
        bail!(
            "{} already holds a joined node; use `skymesh-agent run` (or another --state-dir)",
            dir.path().display()
        );
    }
    let key = match dir.load_key()? {
        Some(k) => k, // a previous join failed after generating it: reuse, never re-export
        None => {
            let k = generate_key();
            dir.save_key(&k)?;
            k
        }
    };
    let client = Client::new(&s.controller)?;
    let resp = client.register(&RegisterRequest {
        enrollment_key: s.enroll_key.clone(),
        public_key: public_key(&key),
        name: s.name.clone(),
        endpoints: failover::local_endpoints(&s.run, &s.iface),
        routes: s.run.routes.clone(),
    })?;
    match &s.controller_key {
        Some(expected) if *expected != resp.controller_public_key => bail!(
            "the controller signs with {}, not the expected {expected}: refusing to pin it \
             (node {} was registered and should be revoked by an admin)",
            resp.controller_public_key,
            resp.node_id
        ),
        Some(_) => {}
        None => tracing::warn!(
            key = %resp.controller_public_key,
            "no --controller-key given: trusting the controller's signing key on first use; \
             compare it with the key the controller printed at start"
        ),
    }
    dir.save_state(&AgentState {
        version: STATE_VERSION,
        controller_url: s.controller.url.clone(),
        controller_key: resp.controller_public_key,
        node_id: resp.node_id,
        name: s.name.clone(),
        credential: resp.credential,
        iface: s.iface.clone(),
    })?;
    tracing::info!(node = %resp.node_id, state = ?resp.state, addresses = ?resp.addresses, "joined");
    Ok(())
}

/// The running node: device child, stream loop, reporter.
pub(crate) fn run(state_dir: &Path, settings: &RunSettings) -> anyhow::Result<()> {
    let dir = StateDir::open(state_dir)?;
    let st = dir.load_state()?.with_context(|| {
        format!(
            "{} holds no joined node; run `join` first",
            state_dir.display()
        )
    })?;
    let key = dir
        .load_key()?
        .with_context(|| format!("{}: private key missing", state_dir.display()))?;
    let client = Client::new(&ControllerOptions {
        url: st.controller_url.clone(),
        ca: settings.ca.clone(),
        allow_http: settings.allow_http,
    })?;
    let mut guard = NetmapGuard::new(st.controller_key.0, st.node_id);
    let mut cache = dir.load_cache()?;
    let restored = cache.restore(&mut guard);

    let uplinks_file = match &settings.uplinks {
        Some(p) => {
            let yaml = serde_yaml::to_string(p).context("serialising the uplinks")?;
            dir.write(UPLINKS_FILE, yaml.as_bytes())?;
            Some(dir.path().join(UPLINKS_FILE))
        }
        None => {
            let _ = std::fs::remove_file(dir.path().join(UPLINKS_FILE));
            None
        }
    };
    let device = Device::start(
        &st.iface,
        &dir.path().join("device.log"),
        uplinks_file.as_deref(),
    )?;
    dev::set_identity(&st.iface, key, Some(settings.listen_port))?;
    let mut applied = dev::Applied::new(PathFeed::new(settings.uplinks.is_some()));
    let live = Liveness::new(
        std::fs::metadata(dir.path().join(state::CACHE_FILE))
            .and_then(|m| m.modified())
            .ok()
            .filter(|_| guard.held().is_some()),
    );
    if let Some(map) = guard.held() {
        let n = applied.apply(&st.iface, map)?;
        tracing::info!(
            serial = map.serial,
            peers = map.peers.len(),
            changed = n,
            entries = restored,
            "fail-static: applied the cached netmap"
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        map: Mutex::new(guard.held().cloned()),
        live,
    });
    let reporter = {
        let (client, st, stop, shared) = (client.clone(), st.clone(), stop.clone(), shared.clone());
        let settings = settings.clone();
        std::thread::Builder::new()
            .name("report".into())
            .spawn(move || report_loop(&client, &st, &settings, &stop, &shared))
            .context("spawning the reporter")?
    };
    if let Some(every) = settings.rotate_every {
        let (client, dir, st, stop) = (client.clone(), dir.clone(), st.clone(), stop.clone());
        std::thread::Builder::new()
            .name("rotate".into())
            .spawn(move || rotation_loop(&client, &dir, &st, every, &stop))
            .context("spawning the key rotation thread")?;
    }
    let result = stream_loop(
        &client,
        &dir,
        &st,
        &mut guard,
        &mut cache,
        &mut applied,
        &shared,
    );
    stop.store(true, Ordering::Relaxed);
    drop(reporter); // detached: it sleeps in short steps and exits on `stop`
    drop(device);
    let _ = std::fs::remove_file(failover::control_status_path(&st.iface));
    result
}

/// The device process. A device already serving `iface` (this control process was restarted,
/// e.g. upgraded) is adopted rather than replaced, so sessions are not disturbed: the data
/// plane outlives the control plane (fail-static). A device we started is stopped (SIGTERM)
/// when `run` returns, which only happens on revocation or a fatal error.
struct Device {
    started: Option<u32>,
}

impl Device {
    fn start(iface: &str, log: &Path, uplinks: Option<&Path>) -> anyhow::Result<Self> {
        if std::os::unix::net::UnixStream::connect(crate::uapi_server::socket_path(iface)).is_ok() {
            // Its uplinks are the ones it was started with; a changed uplinks config needs a
            // device restart (which drops sessions), so it is not done behind the operator.
            tracing::info!(%iface, "adopting the running device (keeping its uplinks)");
            return Ok(Device { started: None });
        }
        let pid = crate::updown::spawn_detached_device_with(iface, Some(log), uplinks)
            .with_context(|| format!("starting the device {iface}"))?;
        Ok(Device { started: Some(pid) })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(pid) = self.started.and_then(|p| i32::try_from(p).ok()) {
            let _ = crate::sys::terminate(pid);
        }
    }
}

/// What the stream loop shares with the reporter.
struct Shared {
    /// The netmap applied last.
    map: Mutex<Option<NetMap>>,
    live: Liveness,
}

fn stream_loop(
    client: &Client,
    dir: &StateDir,
    st: &AgentState,
    guard: &mut NetmapGuard,
    cache: &mut Cache,
    applied: &mut dev::Applied,
    shared: &Shared,
) -> anyhow::Result<()> {
    let live = &shared.live;
    let mut failures = 0u32;
    let mut last_contact = Instant::now();
    loop {
        match client.stream(&st.credential, guard.serial()) {
            Ok(mut events) => {
                tracing::info!(since = ?guard.serial(), "netmap stream connected");
                live.set_connected(true);
                failures = 0;
                loop {
                    let event = match events.next_event() {
                        Ok(Some(e)) => e,
                        Ok(None) => {
                            tracing::warn!("netmap stream closed by the controller");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "netmap stream lost");
                            break;
                        }
                    };
                    match guard.handle_event(&event) {
                        Ok(Accepted::Apply(map)) => {
                            record(dir, cache, &event, client, st, guard);
                            apply_logged(applied, &st.iface, &map);
                            if let Ok(mut m) = shared.map.lock() {
                                *m = Some(map);
                            }
                        }
                        Ok(Accepted::Unchanged | Accepted::Ignored) => {}
                        Ok(Accepted::Revoked) => {
                            bail!("the controller revoked this node; leaving the mesh")
                        }
                        Err(e) => tracing::error!(error = %e,
                            held = ?guard.serial(), "refused a netmap update; keeping the current state"),
                    }
                }
                // The connection was alive until now; staleness counts from here.
                last_contact = Instant::now();
                live.set_connected(false);
            }
            Err(e) if is_credential_refused(&e) => {
                return Err(e).context("the controller cut this node off; leaving the mesh");
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), held = ?guard.serial(),
                stale_secs = last_contact.elapsed().as_secs(),
                "controller unreachable; keeping the current netmap (fail-static)"),
        }
        failures = failures.saturating_add(1);
        let jitter = f64::from(OsRng.next_u32()) / f64::from(u32::MAX);
        std::thread::sleep(backoff(failures, jitter));
    }
}

fn apply_logged(applied: &mut dev::Applied, iface: &str, map: &NetMap) {
    match applied.apply(iface, map) {
        Ok(n) => tracing::info!(
            serial = map.serial,
            peers = map.peers.len(),
            changed = n,
            "netmap applied"
        ),
        Err(e) => {
            tracing::error!(serial = map.serial, error = %format!("{e:#}"), "applying the netmap failed")
        }
    }
}

/// Persists an accepted event in the fail-static cache (compacting it now and then).
fn record(
    dir: &StateDir,
    cache: &mut Cache,
    event: &StreamEvent,
    client: &Client,
    st: &AgentState,
    guard: &mut NetmapGuard,
) {
    match event {
        StreamEvent::Netmap(s) => {
            cache.base = Some(s.clone());
            cache.deltas.clear();
        }
        StreamEvent::Delta(d) => {
            cache.deltas.push(d.clone());
            if cache.deltas.len() > MAX_CACHED_DELTAS {
                // Compact: a fresh signed full netmap replaces base + deltas.
                match client.netmap(&st.credential) {
                    Ok(full) => match guard.handle_netmap(&full) {
                        Ok(_) => {
                            cache.base = Some(full);
                            cache.deltas.clear();
                        }
                        Err(e) => tracing::warn!(error = %e, "compaction netmap refused"),
                    },
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "compaction fetch failed"),
                }
            }
        }
        _ => return,
    }
    if let Err(e) = dir.save_cache(cache) {
        tracing::error!(error = %format!("{e:#}"), "saving the netmap cache failed");
    }
}

fn report_loop(
    client: &Client,
    st: &AgentState,
    settings: &RunSettings,
    stop: &AtomicBool,
    shared: &Shared,
) {
    let live = &shared.live;
    let mut next = Instant::now();
    let mut next_poll = Instant::now();
    let mut next_addresses = Instant::now();
    let mut endpoints = failover::local_endpoints(settings, &st.iface);
    // What STUN found per uplink socket (device status), and which reflectors it was given.
    let mut discovered: Vec<crate::paths::DiscoveryStatus> = Vec::new();
    let mut stun_ports: Option<Vec<u16>> = None;
    let mut relay_sent: Option<Option<skymesh_proto::RelayGrant>> = None;
    let mut endpoints_sent = false;
    // Address changes (a carrier renumbering the uplink, DHCP, SLAAC) are re-announced within
    // one loop turn; the poll stays as a fallback for a lost notification.
    let derived = settings.endpoints.is_empty() && settings.uplinks.is_some();
    let mut addr_events = derived
        .then(|| {
            crate::netlink::LinkMonitor::open()
                .map_err(|e| tracing::warn!(error = %e, "no address notifications; polling"))
                .ok()
        })
        .flatten();
    let mut reported_paths = None;
    let mut status_file_ok = true;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut fo = None;
        if now >= next_poll {
            next_poll = now + PATH_POLL;
            let status = ControlStatus::new(
                st.node_id.0,
                &st.controller_url,
                live,
                shared
                    .map
                    .lock()
                    .ok()
                    .and_then(|m| m.as_ref().map(|m| m.serial)),
            );
            match status.write(&st.iface) {
                Ok(()) => status_file_ok = true,
                Err(e) if status_file_ok => {
                    status_file_ok = false;
                    tracing::warn!(error = %e, "writing the control status file failed");
                }
                Err(_) => {}
            }
            if settings.uplinks.is_some() {
                fo = dev::failover_status(&st.iface)
                    .map_err(|e| tracing::debug!(error = %format!("{e:#}"), "device status"))
                    .ok();
                // A path switch (or the first look) is reported at once.
                let active = fo.as_ref().map(failover::active_paths);
                if active.is_some() && active != reported_paths {
                    next = now;
                }
                if let Some(found) = fo.as_ref().map(|f| &f.discovery) {
                    if *found != discovered {
                        discovered.clone_from(found);
                        next_addresses = now;
                    }
                }
            }
            // The reflectors are the controller's host on the ports its netmap lists.
            let ports = shared
                .map
                .lock()
                .ok()
                .and_then(|m| m.as_ref().map(|m| m.node.stun_ports.clone()));
            // The relay: the controller's host on the port its netmap grants, with our token.
            let grant = shared
                .map
                .lock()
                .ok()
                .and_then(|m| m.as_ref().map(|m| m.node.relay.clone()));
            if grant.is_some() && grant != relay_sent {
                let g = grant.clone().flatten();
                let server = g.as_ref().and_then(|g| {
                    failover::controller_addrs(&st.controller_url, &[g.port])
                        .into_iter()
                        .next()
                });
                let arg = server.zip(g.as_ref().map(|g| g.token.as_str()));
                match dev::set_relay(&st.iface, arg) {
                    Ok(()) => {
                        tracing::info!(relay = ?server, "relay set");
                        relay_sent = grant;
                    }
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "setting the relay"),
                }
            }
            if ports.is_some() && ports != stun_ports {
                let ports = ports.unwrap_or_default();
                let servers = failover::controller_addrs(&st.controller_url, &ports);
                match dev::set_stun_servers(&st.iface, &servers) {
                    Ok(()) => {
                        tracing::info!(servers = ?servers, "endpoint discovery (STUN) reflectors set");
                        stun_ports = Some(ports);
                    }
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "setting STUN servers"),
                }
            }
        }
        if let Some(m) = addr_events.as_mut() {
            let mut changed = false;
            let r = m.drain(|c| changed |= matches!(c, crate::netlink::LinkChange::Address { .. }));
            // An overrun (ENOBUFS) lost notifications: look now.
            if changed || r.is_err() {
                next_addresses = now;
            }
        }
        if derived && now >= next_addresses {
            next_addresses = now + ADDRESS_POLL;
            let local = failover::local_endpoints(settings, &st.iface);
            let fresh = failover::with_reflexive(local, &discovered, settings);
            if fresh != endpoints {
                tracing::info!(endpoints = ?fresh, "uplink addresses changed; re-reporting");
                endpoints = fresh;
                endpoints_sent = false;
                next = now;
            }
        }
        if now >= next {
            let mut status_sent = false;
            if !endpoints_sent {
                let report = EndpointsReport {
                    endpoints: endpoints.clone(),
                    routes: Some(settings.routes.clone()),
                };
                match client.report_endpoints(&st.credential, &report) {
                    Ok(()) => endpoints_sent = true,
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "endpoint report failed"),
                }
            }
            let held = shared.map.lock().ok().and_then(|m| m.clone());
            if let (Ok(info), Some(map)) = (dev::get(&st.iface), held) {
                if fo.is_none() && settings.uplinks.is_some() {
                    fo = dev::failover_status(&st.iface).ok();
                }
                let report = failover::status_report(
                    &info,
                    &map,
                    fo.as_ref(),
                    settings.uplinks.as_ref(),
                    live.netmap_age_secs(),
                );
                match client.report_status(&st.credential, &report) {
                    Ok(()) => {
                        status_sent = true;
                        reported_paths = fo.as_ref().map(failover::active_paths);
                    }
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "status report failed"),
                }
            }
            // Until the first reports got through (no netmap yet, controller down), retry soon.
            next = Instant::now()
                + if endpoints_sent && status_sent {
                    REPORT_INTERVAL
                } else {
                    FIRST_REPORT_RETRY
                };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `skymesh-agent rotate-key`: new key pair, registered with the controller, then installed.
pub(crate) fn rotate_key(state_dir: &Path, settings: &RunSettings) -> anyhow::Result<()> {
    let dir = StateDir::open(state_dir)?;
    let st = dir
        .load_state()?
        .with_context(|| format!("{} holds no joined node", state_dir.display()))?;
    let client = Client::new(&ControllerOptions {
        url: st.controller_url.clone(),
        ca: settings.ca.clone(),
        allow_http: settings.allow_http,
    })?;
    rotate_with(&client, &dir, &st)
}

/// Generates a key, installs it on the running device, then registers its public half, then
/// saves it. Installing first keeps the gap short: peers that learn the new public key (within
/// milliseconds of the controller accepting it) find the device already answering with it;
/// the other order lets a peer's first handshake hit the old key and wait out the 5 s
/// handshake retry. If the controller refuses, the old key goes back on the device.
/// The new key is written to `private.key.next` before the controller hears of it, so a crash
/// in between leaves the key the controller may already expect on disk (recover by renaming).
fn rotate_with(client: &Client, dir: &StateDir, st: &AgentState) -> anyhow::Result<()> {
    let old = dir.load_key()?;
    let key = generate_key();
    dir.write(NEXT_KEY_FILE, format!("{}\n", key.to_base64()).as_bytes())?;
    let installed = match dev::set_identity(&st.iface, key, None) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %format!("{e:#}"), "device not running; the new key applies at next start");
            false
        }
    };
    let registered = client.rotate_key(
        &st.credential,
        &RotateKeyRequest {
            public_key: public_key(&key),
        },
    );
    if let Err(e) = registered {
        if let (true, Some(old)) = (installed, old) {
            if let Err(e) = dev::set_identity(&st.iface, old, None) {
                tracing::error!(error = %format!("{e:#}"), "restoring the old key on the device failed");
            }
        }
        let _ = std::fs::remove_file(dir.path().join(NEXT_KEY_FILE));
        return Err(e);
    }
    dir.save_key(&key)?;
    let _ = std::fs::remove_file(dir.path().join(NEXT_KEY_FILE));
    tracing::info!(public_key = %public_key(&key), "key rotated");
    Ok(())
}

/// Where a key being rotated waits until the controller has accepted it.
const NEXT_KEY_FILE: &str = "private.key.next";

/// Rotates the key every `every` until `stop`.
fn rotation_loop(
    client: &Client,
    dir: &StateDir,
    st: &AgentState,
    every: Duration,
    stop: &AtomicBool,
) {
    let mut due = Instant::now() + every;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= due {
            match rotate_with(client, dir, st) {
                Ok(()) => due = Instant::now() + every,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "scheduled key rotation failed; retrying in a minute");
                    due = Instant::now() + Duration::from_secs(60);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
