//! The latency floor of any userspace TUN tunnel, for `scripts/bench`: a TUN ⇄ UDP forwarder
//! with no crypto, no handshake, no timers and no configuration interface. One `poll` loop,
//! the same syscalls a userspace WireGuard needs per packet (TUN read + UDP send one way, UDP
//! receive + TUN write the other), nothing else.
//!
//! Two of these in two network namespaces give the idle round-trip time that process wake-ups
//! and the kernel's TUN and UDP paths alone cost on a machine; the agent's RTT is reported
//! against it as well as against the plain veth. It is a measuring instrument, not a tunnel:
//! it sends cleartext, so it only ever runs inside a benchmark's own namespaces.
//!
//! Usage: `null_relay IFACE LOCAL_PORT PEER_ADDR:PORT` (the interface is created; addresses and
//! link state are left to the caller, as with the agent's `device` command).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{bail, Context};

fn open_tun(name: &str) -> anyhow::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!(
            "interface name {name:?} must be 1..{} bytes",
            libc::IFNAMSIZ - 1
        );
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .context("open /dev/net/tun")?;
    // struct ifreq: the name, then the flags (a short) at the start of the union.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq (40 bytes) at the pointer.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
    }
    Ok(tun)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, iface, port, peer] = &args[..] else {
        bail!("usage: null_relay IFACE LOCAL_PORT PEER_ADDR:PORT");
    };
    let port: u16 = port.parse().with_context(|| format!("bad port {port:?}"))?;
    let peer: SocketAddr = peer.parse().with_context(|| format!("bad peer {peer:?}"))?;
    let mut tun = open_tun(iface)?;
    let local: SocketAddr = if peer.is_ipv4() {
        ([0, 0, 0, 0], port).into()
    } else {
        ([0u16; 8], port).into()
    };
    let udp = UdpSocket::bind(local).with_context(|| format!("bind {local}"))?;
    udp.connect(peer)
        .with_context(|| format!("connect {peer}"))?;
    udp.set_nonblocking(true)?;

    let mut fds = [
        libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: udp.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if fds[0].revents != 0 {
            loop {
                match tun.read(&mut buf) {
                    Ok(n) => {
                        // A full socket buffer drops the packet, as a real tunnel would.
                        let _ = udp.send(&buf[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("TUN read"),
                }
            }
        }
        if fds[1].revents != 0 {
            loop {
                match udp.recv(&mut buf) {
                    Ok(n) => {
                        let _ = tun.write(&buf[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // ICMP port unreachable from a peer not yet up: keep going.
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("UDP receive"),
                }
            }
        }
    }
}
