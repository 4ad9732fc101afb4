//! Failover visibility and control: a socket `/var/run/skymesh/<iface>.status` (0600) and an
//! optional Prometheus text endpoint (`--metrics-listen`, loopback addresses only). Both talk
//! to the data plane through the same command channel as the UAPI.
//!
//! The socket protocol is one JSON request line per connection, answered with one JSON
//! document, then the connection closes:
//!
//! - `"status"` → a [`StatusReport`] (what `skymesh-agent status` prints);
//! - `{"set_peer_paths":{"public_key":"<base64>","endpoints":[{"addr":"198.18.1.2:51820",
//!   "priority":0}]}}` → `{"errno":0}`: the candidate endpoints of a skymesh peer (the
//!   extension for processes that drive the device from outside, e.g. from a netmap; an
//!   empty list returns the peer to standard roaming). Bad requests get `{"error":"…"}`
//!   and change nothing.
//! - `{"set_stun_servers":{"servers":["198.18.0.1:3478","198.18.0.1:3479"]}}` → `{"errno":0}`:
//!   the STUN reflectors endpoint discovery asks from every uplink socket (at most
//!   [`MAX_STUN_SERVERS`]; an empty list stops discovery).

use std::fmt::Write as _;
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use skymesh_agent_core::key::Key;
use skymesh_agent_core::path::RemoteEndpoint;

use crate::device::Command;
use crate::paths::StatusReport;
use crate::sys::EventFd;

pub(crate) const STATUS_DIR: &str = "/var/run/skymesh";
/// Most STUN reflectors a device takes.
pub(crate) const MAX_STUN_SERVERS: usize = skymesh_agent_core::discovery::MAX_SERVERS;

pub(crate) fn socket_path(iface: &str) -> PathBuf {
    Path::new(STATUS_DIR).join(format!("{iface}.status"))
}

/// Asks the data plane for a snapshot.
fn snapshot(tx: &Sender<Command>, wake: &EventFd) -> io::Result<StatusReport> {
    let (rtx, rrx) = mpsc::sync_channel(1);
    tx.send(Command::Status(rtx))
        .map_err(|_| io::Error::other("data plane stopped"))?;
    wake.notify()?;
    rrx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| io::Error::other("data plane did not answer"))
}

/// The bound status socket; the file is removed on drop.
pub(crate) struct StatusSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl StatusSocket {
    pub(crate) fn bind(iface: &str) -> anyhow::Result<StatusSocket> {
        std::fs::create_dir_all(STATUS_DIR).with_context(|| format!("creating {STATUS_DIR}"))?;
        let path = socket_path(iface);
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                bail!("{} is in use by a running device", path.display());
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener = crate::sys::bind_private_unix(&path)
            .with_context(|| format!("binding {}", path.display()))?;
        Ok(StatusSocket { listener, path })
    }

    /// Serves forever on the current thread (one short request and answer per connection).
    pub(crate) fn serve(&self, tx: Sender<Command>, wake: Arc<EventFd>) {
        for conn in self.listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let read = BufReader::new((&conn).take(1 << 20)).read_line(&mut line);
            let body = match read {
                Ok(_) => answer(line.trim(), &tx, &wake),
                Err(e) => error_json(&e.to_string()),
            };
            let _ = conn.write_all(body.as_bytes());
        }
    }

    pub(crate) fn remove_file(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Status,
    SetPeerPaths {
        public_key: String,
        endpoints: Vec<EndpointJson>,
    },
    SetStunServers {
        servers: Vec<SocketAddr>,
    },
    /// `{"set_relay":{"server":"198.18.0.2:3480","token":"<base64>"}}`, or `null` for none.
    SetRelay(Option<RelayJson>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayJson {
    server: SocketAddr,
    token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointJson {
    addr: SocketAddr,
    #[serde(default)]
    priority: u8,
}

fn error_json(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

/// Hands the data plane a command that needs no answer: `{"errno":0}` once queued.
fn post(tx: &Sender<Command>, wake: &EventFd, cmd: Command) -> String {
    match tx
        .send(cmd)
        .map_err(|_| io::Error::other("data plane stopped"))
        .and_then(|()| wake.notify())
    {
        Ok(()) => serde_json::json!({ "errno": 0 }).to_string(),
        Err(e) => error_json(&e.to_string()),
    }
}

fn answer(line: &str, tx: &Sender<Command>, wake: &EventFd) -> String {
    let req = match serde_json::from_str::<Request>(line) {
        Ok(r) => r,
        Err(e) => return error_json(&format!("bad request: {e}")),
    };
    match req {
        Request::SetRelay(relay) => {
            let relay = match relay {
                None => None,
                Some(r) => {
                    use base64::Engine as _;
                    let token = base64::engine::general_purpose::STANDARD
                        .decode(&r.token)
                        .ok()
                        .and_then(|t| <[u8; skymesh_proto::relay::TOKEN_LEN]>::try_from(t).ok());
                    match token {
                        Some(t) => Some((r.server, t)),
                        None => return error_json("set_relay.token: not 16 bytes of base64"),
                    }
                }
            };
            post(tx, wake, Command::SetRelay(relay))
        }
        Request::SetStunServers { servers } => {
            if servers.len() > MAX_STUN_SERVERS {
                return error_json(&format!(
                    "set_stun_servers.servers: {} given, at most {MAX_STUN_SERVERS}",
                    servers.len()
                ));
            }
            post(tx, wake, Command::SetStunServers(servers))
        }
        Request::Status => match snapshot(tx, wake) {
            Ok(r) => serde_json::to_string(&r).unwrap_or_default(),
            Err(e) => error_json(&e.to_string()),
        },
        Request::SetPeerPaths {
            public_key,
            endpoints,
        } => {
            let key = match Key::from_base64(&public_key) {
                Ok(k) => k,
                Err(e) => return error_json(&format!("set_peer_paths.public_key: {e}")),
            };
            let endpoints = endpoints
                .iter()
                .map(|e| RemoteEndpoint {
                    addr: e.addr,
                    priority: e.priority,
                })
                .collect();
            let (rtx, rrx) = mpsc::sync_channel(1);
            let sent = tx
                .send(Command::SetPeerPaths {
                    key,
                    endpoints,
                    reply: rtx,
                })
                .map_err(|_| io::Error::other("data plane stopped"))
                .and_then(|()| wake.notify());
            match sent.and_then(|()| {
                rrx.recv_timeout(Duration::from_secs(5))
                    .map_err(|_| io::Error::other("data plane did not answer"))
            }) {
                Ok(code) => serde_json::json!({ "errno": code }).to_string(),
                Err(e) => error_json(&e.to_string()),
            }
        }
    }
}

/// Serves Prometheus text on `addr` (must be a loopback address) forever.
pub(crate) fn bind_metrics(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        bail!("--metrics-listen: {addr} is not a loopback address");
    }
    TcpListener::bind(addr).with_context(|| format!("binding metrics endpoint {addr}"))
}

pub(crate) fn serve_metrics(listener: TcpListener, tx: Sender<Command>, wake: Arc<EventFd>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
        // Read the request head (any path answers the metrics).
        let mut reader = BufReader::new(conn.take(16 * 1024));
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" && line != "\n" {
            line.clear();
        }
        let mut conn = reader.into_inner().into_inner();
        let (status, body) = match snapshot(&tx, &wake) {
            Ok(r) => ("200 OK", render_prometheus(&r)),
            Err(e) => ("503 Service Unavailable", format!("# {e}\n")),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// Prometheus text exposition of a status report.
pub(crate) fn render_prometheus(r: &StatusReport) -> String {
    let mut o = String::new();
    let i = &r.iface;
    let _ = writeln!(
        o,
        "# HELP skymesh_uplink_up Whether the uplink's link is up."
    );
    let _ = writeln!(o, "# TYPE skymesh_uplink_up gauge");
    for u in &r.uplinks {
        let _ = writeln!(
            o,
            "skymesh_uplink_up{{iface=\"{i}\",uplink=\"{}\",kind=\"{}\"}} {}",
            u.name,
            u.kind,
            u8::from(u.up)
        );
    }
    let _ = writeln!(
        o,
        "# HELP skymesh_uplink_probe_bytes_total Probe, probe reply and path notice bytes on the uplink, all peers."
    );
    let _ = writeln!(o, "# TYPE skymesh_uplink_probe_bytes_total counter");
    for u in &r.uplinks {
        for (dir, bytes) in [("tx", u.probe_tx_bytes), ("rx", u.probe_rx_bytes)] {
            let _ = writeln!(
                o,
                "skymesh_uplink_probe_bytes_total{{iface=\"{i}\",uplink=\"{}\",metered=\"{}\",direction=\"{dir}\"}} {bytes}",
                u.name, u.metered
            );
        }
    }
    let _ = writeln!(o, "# TYPE skymesh_peer_switches_total counter");
    let _ = writeln!(o, "# TYPE skymesh_peer_active_path gauge");
    let _ = writeln!(o, "# TYPE skymesh_path_rtt_seconds gauge");
    let _ = writeln!(o, "# TYPE skymesh_path_loss_ratio gauge");
    let _ = writeln!(o, "# TYPE skymesh_path_healthy gauge");
    let _ = writeln!(
        o,
        "# TYPE skymesh_peer_unmatched_probe_replies_total counter"
    );
    for p in &r.peers {
        let k = &p.public_key;
        if p.role.is_none() {
            continue;
        }
        let reason = p.last_switch_reason.as_deref().unwrap_or("none");
        let _ = writeln!(
            o,
            "skymesh_peer_switches_total{{iface=\"{i}\",peer=\"{k}\",last_reason=\"{reason}\"}} {}",
            p.switch_count
        );
        let _ = writeln!(
            o,
            "skymesh_peer_unmatched_probe_replies_total{{iface=\"{i}\",peer=\"{k}\"}} {}",
            p.unmatched_probe_replies
        );
        for path in &p.paths {
            let l = format!(
                "iface=\"{i}\",peer=\"{k}\",uplink=\"{}\",remote=\"{}\"",
                path.uplink, path.remote
            );
            let _ = writeln!(
                o,
                "skymesh_peer_active_path{{{l}}} {}",
                u8::from(path.active)
            );
            let _ = writeln!(
                o,
                "skymesh_path_healthy{{{l}}} {}",
                u8::from(path.health == "healthy")
            );
            if let Some(rtt) = path.rtt_ms {
                let _ = writeln!(o, "skymesh_path_rtt_seconds{{{l}}} {}", rtt / 1e3);
            }
            let _ = writeln!(o, "skymesh_path_loss_ratio{{{l}}} {}", path.loss);
        }
    }
    o
}

/// `skymesh-agent status`: reads the status socket and prints a table (or the JSON).
pub(crate) fn print_status(iface: Option<&str>, json: bool) -> anyhow::Result<()> {
    let path = match iface {
        Some(i) => socket_path(i),
        None => {
            let mut found: Vec<PathBuf> = std::fs::read_dir(STATUS_DIR)
                .with_context(|| format!("reading {STATUS_DIR}: is a device running?"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "status"))
                .collect();
            found.sort();
            match found.len() {
                1 => found.remove(0),
                0 => bail!("no device with a status socket in {STATUS_DIR}"),
                _ => bail!("several devices are running; name one: skymesh-agent status IFACE"),
            }
        }
    };
    let mut conn =
        UnixStream::connect(&path).with_context(|| format!("connecting {}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(b"\"status\"\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    let report: StatusReport = serde_json::from_str(&body)
        .with_context(|| format!("unexpected answer from {}: {body}", path.display()))?;
    let control = crate::control::failover::ControlStatus::read(&report.iface);
    let mut out = io::stdout().lock();
    if json {
        let mut v: serde_json::Value = serde_json::from_str(&body)?;
        if let (Some(obj), Some(c)) = (v.as_object_mut(), &control) {
            obj.insert("control".into(), serde_json::to_value(c)?);
        }
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "interface {} (port {})",
        report.iface, report.listen_port
    )?;
    let d = &report.dataplane;
    writeln!(
        out,
        "  data plane: TUN offload {} (USO {}), UDP GSO {}, {} allocations",
        d.tun_offload, d.tun_uso, d.udp_gso, d.allocations
    )?;
    match &control {
        None => writeln!(
            out,
            "  control: none (device driven by hand, not by `run`/`join`)"
        )?,
        Some(c) => {
            let age = c
                .netmap_age_secs
                .map_or("unknown".into(), |a| format!("{a} s"));
            writeln!(
                out,
                "  node {} controller {} {}, netmap serial {}, age {age}{}",
                c.node_id,
                c.controller,
                if c.controller_connected {
                    "connected"
                } else {
                    "UNREACHABLE (fail-static: keeping the last netmap)"
                },
                c.serial.map_or("none".into(), |s| s.to_string()),
                if c.written_secs_ago() > 10 {
                    format!(" (control process silent for {} s)", c.written_secs_ago())
                } else {
                    String::new()
                }
            )?;
        }
    }
    for u in &report.uplinks {
        writeln!(
            out,
            "  uplink {} [{}{}] tier {} {} {} probe bytes {} out {} in",
            u.name,
            u.kind,
            if u.metered { ", metered" } else { "" },
            u.priority,
            u.interface.as_deref().unwrap_or("-"),
            if u.up { "up" } else { "DOWN" },
            u.probe_tx_bytes,
            u.probe_rx_bytes,
        )?;
    }
    for p in &report.peers {
        writeln!(out, "peer {}", p.public_key)?;
        match &p.role {
            None => writeln!(
                out,
                "  endpoint {} (standard roaming)",
                p.endpoint.map_or("-".into(), |e| e.to_string())
            )?,
            Some(role) => {
                writeln!(
                    out,
                    "  role {role}, active uplink {} -> {}, switches {}, last switch {} ({})",
                    p.active_uplink.as_deref().unwrap_or("none"),
                    p.active_remote.map_or("-".into(), |e| e.to_string()),
                    p.switch_count,
                    p.last_switch_reason.as_deref().unwrap_or("-"),
                    p.last_switch_secs_ago
                        .map_or("-".into(), |s| format!("{s:.1} s ago")),
                )?;
                for path in &p.paths {
                    writeln!(
                        out,
                        "  {} {:>8} -> {:<22} {:<9} rtt {} loss {:.0}% probes {}/{}",
                        if path.active { "*" } else { " " },
                        path.uplink,
                        path.remote.to_string(),
                        path.health,
                        path.rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms")),
                        path.loss * 100.0,
                        path.replies,
                        path.probes_sent
                    )?;
                }
            }
        }
    }
    Ok(())
}
