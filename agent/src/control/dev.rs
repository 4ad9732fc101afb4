//! The control loop's handle on the local WireGuard device: UAPI get/set over the device's
//! socket, addresses and routes over netlink. Applying a netmap touches only what changed:
//! peers through `plan()` (no `replace_peers`), routes by set difference.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ipnet::IpNet;
use skymesh_agent_core::plan::{plan, PlanOptions};
use skymesh_agent_core::uapi::{DeviceInfo, SetRequest};
use skymesh_proto::NetMap;

use super::failover::PathFeed;
use crate::netlink::Rtnl;
use crate::uapi_server::socket_path;
use crate::{sys, uapi_client};

/// Reads the device's state (`get=1`).
pub(crate) fn get(iface: &str) -> anyhow::Result<DeviceInfo> {
    let path = socket_path(iface);
    let mut conn =
        UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(b"get=1\n\n")?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"\n\n") {
        let n = conn.read(&mut buf).context("reading UAPI answer")?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(answer).context("UAPI answer is not UTF-8")?;
    match DeviceInfo::parse(&text) {
        Ok(info) => Ok(info),
        Err(errno) => bail!("device refused get (errno={errno})"),
    }
}

/// What the control loop has put on the interface, so the next netmap changes only the rest.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    addresses: BTreeSet<IpNet>,
    routes: BTreeSet<IpNet>,
    mtu: u16,
    /// The peers' failover candidates the device was given.
    feed: PathFeed,
}

impl Applied {
    pub(crate) fn new(feed: PathFeed) -> Applied {
        Applied {
            feed,
            ..Applied::default()
        }
    }

    /// Makes the device match `map`: failover candidates of changed peers (first, so a new
    /// peer starts managed), peers (minimal UAPI set), link, addresses, routes.
    pub(crate) fn apply(&mut self, iface: &str, map: &NetMap) -> anyhow::Result<usize> {
        let paths = self.feed.sync(iface, map);
        if paths > 0 {
            tracing::info!(peers = paths, "peer paths updated");
        }
        let observed = get(iface)?;
        let req = plan(map, &observed, PlanOptions::default());
        let changed = req.peers.len();
        if changed > 0 {
            uapi_client::set(iface, &req)?;
        }
        let index = sys::if_index(iface).with_context(|| format!("looking up {iface}"))?;
        let mut nl = Rtnl::open().context("opening netlink")?;
        if self.mtu != map.node.mtu {
            nl.set_link_up(index, u32::from(map.node.mtu))
                .with_context(|| format!("setting {iface} up"))?;
            self.mtu = map.node.mtu;
        }
        let want: BTreeSet<IpNet> = map.node.addresses.iter().copied().collect();
        for a in want.difference(&self.addresses.clone()) {
            match nl.add_address(index, *a) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).with_context(|| format!("adding address {a}")),
            }
            self.addresses.insert(*a);
        }
        for a in self.addresses.clone().difference(&want) {
            if let Err(e) = nl.del_address(index, *a) {
                tracing::warn!(address = %a, error = %e, "removing address");
            }
            self.addresses.remove(a);
        }
        // Overlay host routes are covered by the addresses' prefix routes; subnet routes of
        // peers (sites) need their own.
        let want: BTreeSet<IpNet> = map
            .peers
            .iter()
            .flat_map(|p| p.routes.iter().copied())
            .collect();
        for r in want.difference(&self.routes.clone()) {
            match nl.add_route(index, *r) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).with_context(|| format!("adding route {r}")),
            }
            self.routes.insert(*r);
        }
        for r in self.routes.clone().difference(&want) {
            if let Err(e) = nl.del_route(index, *r) {
                tracing::warn!(route = %r, error = %e, "removing route");
            }
            self.routes.remove(r);
        }
        Ok(changed)
    }
}

/// Sets the device's private key and listen port.
pub(crate) fn set_identity(
    iface: &str,
    key: skymesh_agent_core::key::Key,
    listen_port: Option<u16>,
) -> anyhow::Result<()> {
    let req = SetRequest {
        private_key: Some(skymesh_agent_core::uapi::Setting::Set(key)),
        listen_port,
        ..SetRequest::default()
    };
    uapi_client::set(iface, &req)
}

/// One request line on the device's status socket (`/var/run/skymesh/IFACE.status`, see
/// `status.rs`), answered with one JSON document.
fn status_request(iface: &str, line: &str) -> anyhow::Result<String> {
    let path = crate::status::socket_path(iface);
    let mut conn =
        UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(line.as_bytes())?;
    conn.write_all(b"\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(body)
}

/// The device's failover status (uplinks, per-peer paths).
pub(crate) fn failover_status(iface: &str) -> anyhow::Result<crate::paths::StatusReport> {
    let body = status_request(iface, "\"status\"")?;
    serde_json::from_str(&body).with_context(|| format!("unexpected status answer: {body}"))
}

/// Sends `req` on the status socket; Ok when the device answers `{"errno":0}`.
fn command(iface: &str, what: &str, req: &serde_json::Value) -> anyhow::Result<()> {
    let body = status_request(iface, &req.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("unexpected answer: {body}"))?;
    match v.get("errno").and_then(serde_json::Value::as_i64) {
        Some(0) => Ok(()),
        _ => bail!("device refused {what}: {body}"),
    }
}

/// Tells the device which STUN reflectors to ask (`SetStunServers`).
pub(crate) fn set_stun_servers(
    iface: &str,
    servers: &[std::net::SocketAddr],
) -> anyhow::Result<()> {
    let req = serde_json::json!({ "set_stun_servers": { "servers": servers } });
    command(iface, "set_stun_servers", &req)
}

/// Tells the device which relay to bind to, with this node's token (`SetRelay`).
pub(crate) fn set_relay(
    iface: &str,
    relay: Option<(std::net::SocketAddr, &str)>,
) -> anyhow::Result<()> {
    let req = match relay {
        Some((server, token)) => {
            serde_json::json!({ "set_relay": { "server": server, "token": token } })
        }
        None => serde_json::json!({ "set_relay": null }),
    };
    command(iface, "set_relay", &req)
}

/// Gives the device a peer's candidate endpoints with the peer's tiers (`SetPeerPaths`); an
/// empty list returns the peer to standard roaming.
pub(crate) fn set_peer_paths(
    iface: &str,
    key: &skymesh_proto::WgPublicKey,
    endpoints: &[skymesh_agent_core::path::RemoteEndpoint],
) -> anyhow::Result<()> {
    let eps: Vec<_> = endpoints
        .iter()
        .map(|e| serde_json::json!({ "addr": e.addr, "priority": e.priority }))
        .collect();
    let req = serde_json::json!({
        "set_peer_paths": { "public_key": key.to_string(), "endpoints": eps }
    });
    command(iface, &format!("set_peer_paths for {key}"), &req)
}
