//! `skymesh-agent up FILE` / `down FILE`, in the manner of wg-quick: the interface is named
//! after the file (`/etc/skymesh/sm0.conf` → `sm0`). `up` starts the device as a detached
//! process (`skymesh-agent device IFACE --foreground`, own process group, log in
//! `/run/skymesh/IFACE.log`), configures it over the UAPI, then sets MTU, addresses, link up and
//! one device route per allowed IP over netlink. Everything it adds is recorded in
//! `/run/skymesh/IFACE.state.json`; `down` removes exactly that and stops the device.

use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use skymesh_agent_core::wgquick::WgQuickConfig;

use crate::netlink::Rtnl;
use crate::uapi_server::socket_path;
use crate::{sys, uapi_client};

const STATE_DIR: &str = "/run/skymesh";
/// Overlay MTU when the file sets none: 1500 − 80 (IPv6 + UDP + WireGuard), as wg-quick.
const DEFAULT_MTU: u32 = 1420;
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// What `up` changed, so that `down` undoes exactly that.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct UpState {
    iface: String,
    pid: u32,
    addresses: Vec<IpNet>,
    routes: Vec<IpNet>,
}

fn iface_of(config: &Path) -> anyhow::Result<String> {
    let name = config
        .file_stem()
        .and_then(|s| s.to_str())
        .context("the config file name must be IFACE.conf")?;
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_=+.-".contains(&b))
    {
        bail!("{name:?} is not a valid interface name (1-15 of [a-zA-Z0-9_=+.-])");
    }
    Ok(name.to_owned())
}

fn state_path(iface: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{iface}.state.json"))
}

fn log_path(iface: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{iface}.log"))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Starts `skymesh-agent device IFACE --foreground` detached and waits until its UAPI socket
/// answers. Returns the child's pid.
pub(crate) fn spawn_detached_device(iface: &str, log: Option<&Path>) -> anyhow::Result<u32> {
    spawn_detached_device_with(iface, log, None)
}

/// [`spawn_detached_device`] with an uplinks file (`device --uplinks FILE`: failover).
pub(crate) fn spawn_detached_device_with(
    iface: &str,
    log: Option<&Path>,
    uplinks: Option<&Path>,
) -> anyhow::Result<u32> {
    let exe = std::env::current_exe().context("locating own executable")?;
    let out = match log {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => Stdio::null(),
    };
    let mut cmd = Command::new(exe);
    cmd.args(["device", iface, "--foreground"]);
    if let Some(u) = uplinks {
        cmd.arg("--uplinks").arg(u);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out)
        .process_group(0)
        .spawn()
        .context("starting the device process")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the device process exited during start-up ({status})");
        }
        if std::os::unix::net::UnixStream::connect(socket_path(iface)).is_ok() {
            return Ok(child.id());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the device did not serve its UAPI socket within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_device(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    // SIGTERM lets the device remove its socket file; it exits within one poll interval.
    if let Err(e) = sys::terminate(raw) {
        tracing::warn!(pid, error = %e, "cannot signal the device");
        return;
    }
    let deadline = Instant::now() + START_TIMEOUT;
    while pid_alive(pid) && Instant::now() < deadline {
        // A zombie (our own child) also counts as gone once it stops running.
        if std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `skymesh-agent up FILE`.
pub(crate) fn up(config_path: &Path) -> anyhow::Result<()> {
    let iface = iface_of(config_path)?;
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config =
        WgQuickConfig::parse(&text).with_context(|| format!("{}", config_path.display()))?;
    for p in &config.peers {
        if let Some(n) = p.allowed_ips.iter().find(|n| n.prefix_len() == 0) {
            bail!(
                "{}: AllowedIPs {n}: a default route through the tunnel needs policy routing, \
                 which `up` does not do; split it (e.g. 0.0.0.0/1, 128.0.0.0/1) and route the \
                 endpoint outside the tunnel",
                config_path.display()
            );
        }
    }
    let state_file = state_path(&iface);
    if let Ok(old) = std::fs::read_to_string(&state_file) {
        if let Ok(old) = serde_json::from_str::<UpState>(&old) {
            if pid_alive(old.pid) {
                bail!("{iface} is already up (pid {}); run down first", old.pid);
            }
        }
    }
    std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let pid = spawn_detached_device(&iface, Some(&log_path(&iface)))?;
    let mut state = UpState {
        iface: iface.clone(),
        pid,
        addresses: Vec::new(),
        routes: Vec::new(),
    };
    match configure(&config, &mut state) {
        Ok(()) => {
            write_state(&state_file, &state)?;
            tracing::info!(%iface, pid, addresses = state.addresses.len(), routes = state.routes.len(), "up");
            Ok(())
        }
        Err(e) => {
            undo(&state);
            Err(e)
        }
    }
}

fn configure(config: &WgQuickConfig, state: &mut UpState) -> anyhow::Result<()> {
    uapi_client::set(&state.iface, &config.set_request())?;
    let index = sys::if_index(&state.iface).context("looking up the new interface")?;
    let mut nl = Rtnl::open().context("opening netlink")?;
    let mtu = config.interface.mtu.unwrap_or(DEFAULT_MTU);
    nl.set_link_up(index, mtu)
        .with_context(|| format!("setting {} up with MTU {mtu}", state.iface))?;
    for addr in &config.interface.addresses {
        nl.add_address(index, *addr)
            .with_context(|| format!("adding address {addr}"))?;
        state.addresses.push(*addr);
    }
    let mut nets: Vec<IpNet> = config
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect();
    nets.sort();
    nets.dedup();
    for net in nets {
        match nl.add_route(index, net) {
            Ok(()) => state.routes.push(net),
            // Already there, e.g. the prefix route of an interface address: not ours to remove.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("adding route {net}")),
        }
    }
    Ok(())
}

fn write_state(path: &Path, state: &UpState) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        serde_json::to_writer_pretty(&mut f, state)?;
        io::Write::write_all(&mut f, b"\n")?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Removes recorded routes and addresses (already-gone ones are fine) and stops the device.
fn undo(state: &UpState) {
    if let (Ok(index), Ok(mut nl)) = (sys::if_index(&state.iface), Rtnl::open()) {
        for net in state.routes.iter().rev() {
            if let Err(e) = nl.del_route(index, *net) {
                tracing::warn!(route = %net, error = %e, "route already gone");
            }
        }
        for addr in state.addresses.iter().rev() {
            if let Err(e) = nl.del_address(index, *addr) {
                tracing::warn!(address = %addr, error = %e, "address already gone");
            }
        }
    }
    stop_device(state.pid);
}

/// `skymesh-agent down FILE`.
pub(crate) fn down(config_path: &Path) -> anyhow::Result<()> {
    let iface = iface_of(config_path)?;
    let state_file = state_path(&iface);
    let text = std::fs::read_to_string(&state_file)
        .with_context(|| format!("{iface} is not up ({} missing)", state_file.display()))?;
    let state: UpState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", state_file.display()))?;
    if state.iface != iface {
        bail!("{} belongs to {}", state_file.display(), state.iface);
    }
    undo(&state);
    std::fs::remove_file(&state_file)
        .with_context(|| format!("removing {}", state_file.display()))?;
    // The device's log was created by `up` too.
    let _ = std::fs::remove_file(log_path(&iface));
    tracing::info!(%iface, "down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_name_comes_from_the_file_name() {
        assert_eq!(
            iface_of(Path::new("/etc/skymesh/sm0.conf")).ok(),
            Some("sm0".into())
        );
        assert!(iface_of(Path::new("/x/this-name-is-far-too-long.conf")).is_err());
        assert!(iface_of(Path::new("/x/bad name.conf")).is_err());
    }

    #[test]
    fn state_round_trips_and_refuses_unknown_fields() {
        let s = UpState {
            iface: "sm0".into(),
            pid: 42,
            addresses: vec!["10.0.0.1/24".parse().expect("net")],
            routes: vec!["10.0.1.0/24".parse().expect("net")],
        };
        let text = serde_json::to_string(&s).expect("serialize");
        assert_eq!(serde_json::from_str::<UpState>(&text).expect("parse"), s);
        assert!(serde_json::from_str::<UpState>(
            r#"{"iface":"a","pid":1,"addresses":[],"routes":[],"x":1}"#
        )
        .is_err());
    }
}
