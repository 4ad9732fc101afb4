//! Client side of the UAPI socket, used by `up` to configure the device it started.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context as _};
use skymesh_agent_core::uapi::SetRequest;

use crate::uapi_server::socket_path;

/// Sends `req` to the device `iface` and checks the answer.
pub(crate) fn set(iface: &str, req: &SetRequest) -> anyhow::Result<()> {
    let path = socket_path(iface);
    let mut conn =
        UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(req.to_uapi().as_bytes())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.ends_with(b"\n\n") {
        let n = conn.read(&mut buf).context("reading UAPI answer")?;
        if n == 0 {
            bail!("device closed the UAPI connection without an answer");
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    match text.trim_end().strip_prefix("errno=") {
        Some("0") => Ok(()),
        Some(e) => bail!("device refused the configuration (errno={e})"),
        None => bail!("unexpected UAPI answer {text:?}"),
    }
}
