//! The UAPI control socket, `/var/run/wireguard/<iface>.sock`, served like wireguard-go: one
//! thread accepts, one short-lived thread per connection reads whole requests (up to the blank
//! line), parses them with the core's parser and hands typed commands to the data plane.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use skymesh_agent_core::uapi::{errno, Operation, SetRequest};

use crate::device::Command;
use crate::sys::EventFd;

/// Directory of UAPI sockets, as for wireguard-go and `wg`.
pub(crate) const SOCKET_DIR: &str = "/var/run/wireguard";
/// Largest accepted request; a full `wg setconf` with thousands of peers stays far below.
const MAX_REQUEST: u64 = 32 << 20;

pub(crate) fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// The listening socket.
pub(crate) struct UapiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl UapiSocket {
    /// Binds `/var/run/wireguard/<iface>.sock` (mode 0600). An existing socket file is removed
    /// only if nothing answers on it.
    pub(crate) fn bind(iface: &str) -> anyhow::Result<UapiSocket> {
        std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
        let path = socket_path(iface);
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                bail!("{} is in use by a running device", path.display());
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let listener = crate::sys::bind_private_unix(&path)
            .with_context(|| format!("binding {}", path.display()))?;
        Ok(UapiSocket { listener, path })
    }

    /// Serves forever on the current thread.
    pub(crate) fn serve(&self, tx: Sender<Command>, wake: Arc<EventFd>) {
        for conn in self.listener.incoming() {
            let Ok(conn) = conn else { continue };
            let tx = tx.clone();
            let wake = wake.clone();
            let spawned = std::thread::Builder::new()
                .name("uapi-conn".into())
                .spawn(move || {
                    if let Err(e) = handle_connection(conn, &tx, &wake) {
                        tracing::debug!(error = %e, "UAPI connection ended");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot spawn UAPI connection thread");
            }
        }
    }
}

impl UapiSocket {
    /// Removes the socket file (at shutdown).
    pub(crate) fn remove_file(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn handle_connection(conn: UnixStream, tx: &Sender<Command>, wake: &EventFd) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn).take(MAX_REQUEST);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let Some(op) = Operation::parse(line.trim_end_matches('\n')) else {
            // wireguard-go closes the connection on an unknown operation.
            return Ok(());
        };
        let mut body = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(()); // client went away mid-request: apply nothing
            }
            if line == "\n" {
                break;
            }
            body.push_str(&line);
        }
        let answer = match op {
            Operation::Get => {
                let (rtx, rrx) = mpsc::sync_channel(1);
                match send(tx, wake, Command::Get(rtx)).and_then(|()| recv(rrx)) {
                    Ok(info) => info.to_uapi(),
                    Err(_) => format!("errno={}\n\n", errno::IO),
                }
            }
            Operation::Set => {
                let code = match SetRequest::parse(&body) {
                    Ok(req) => {
                        let (rtx, rrx) = mpsc::sync_channel(1);
                        send(tx, wake, Command::Set(req, rtx))
                            .and_then(|()| recv(rrx))
                            .unwrap_or(errno::IO)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "UAPI set refused");
                        e.errno()
                    }
                };
                format!("errno={code}\n\n")
            }
        };
        writer.write_all(answer.as_bytes())?;
    }
}

fn send(tx: &Sender<Command>, wake: &EventFd, cmd: Command) -> io::Result<()> {
    tx.send(cmd)
        .map_err(|_| io::Error::other("data plane stopped"))?;
    wake.notify()
}

fn recv<T>(rx: mpsc::Receiver<T>) -> io::Result<T> {
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| io::Error::other("data plane did not answer"))
}
