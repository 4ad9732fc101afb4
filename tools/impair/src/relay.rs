//! The relay: listens on one address, forwards each client's datagrams to the target from a
//! per-client upstream socket and the target's answers back, each direction through its own
//! [`Impairment`]. A single scheduler task releases packets at their delivery instant.
//!
//! Runtime control: a UDP control socket takes one-line commands
//! (`blackhole [up|down|both] on|off|toggle`, `status`) and answers one line; the binary also
//! toggles the blackhole (both directions) on SIGUSR1.
//!
//! This is a test tool: it copies each datagram into a `Vec` on its way through the delay
//! queue, which is fine at benchmark rates of a few thousand packets per second.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::profile::{Impairment, Profile, Verdict};

/// Most clients tracked at once; datagrams from further source addresses are dropped.
pub const MAX_CLIENTS: usize = 1024;

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

/// What the relay needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where clients send to.
    pub listen: SocketAddr,
    /// Where their datagrams go.
    pub target: SocketAddr,
    /// Local address for upstream sockets (default: unspecified address, ephemeral port).
    pub upstream_bind: Option<SocketAddr>,
    /// Control socket address, if any.
    pub control: Option<SocketAddr>,
    /// Impairment applied to both directions (independent per-packet draws, shared schedule).
    pub profile: Profile,
    /// Seed for every random draw.
    pub seed: u64,
}

/// Runtime switches and counters, shared with the control socket and signal handler.
#[derive(Debug, Default)]
pub struct Control {
    /// Blackhole client → target.
    pub blackhole_up: AtomicBool,
    /// Blackhole target → client.
    pub blackhole_down: AtomicBool,
    /// Datagrams forwarded client → target.
    pub forwarded_up: AtomicU64,
    /// Datagrams forwarded target → client.
    pub forwarded_down: AtomicU64,
    /// Datagrams dropped client → target.
    pub dropped_up: AtomicU64,
    /// Datagrams dropped target → client.
    pub dropped_down: AtomicU64,
}

impl Control {
    /// Flips both blackholes (SIGUSR1): on if either was off, else off.
    pub fn toggle_blackhole(&self) -> bool {
        let on = !(self.blackhole_up.load(Ordering::Relaxed)
            && self.blackhole_down.load(Ordering::Relaxed));
        self.blackhole_up.store(on, Ordering::Relaxed);
        self.blackhole_down.store(on, Ordering::Relaxed);
        on
    }

    fn status(&self) -> String {
        let onoff = |b: &AtomicBool| {
            if b.load(Ordering::Relaxed) {
                "on"
            } else {
                "off"
            }
        };
        let mut s = String::new();
        let _ = write!(
            s,
            "ok blackhole_up={} blackhole_down={} forwarded_up={} forwarded_down={} dropped_up={} dropped_down={}",
            onoff(&self.blackhole_up),
            onoff(&self.blackhole_down),
            self.forwarded_up.load(Ordering::Relaxed),
            self.forwarded_down.load(Ordering::Relaxed),
            self.dropped_up.load(Ordering::Relaxed),
            self.dropped_down.load(Ordering::Relaxed),
        );
        s
    }

    /// Executes one control command; returns the one-line answer.
    pub fn command(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (dirs, action): (&[&AtomicBool], &str) = match words.as_slice() {
            ["status"] => return self.status(),
            ["blackhole", action] => (&[&self.blackhole_up, &self.blackhole_down], action),
            ["blackhole", "both", action] => (&[&self.blackhole_up, &self.blackhole_down], action),
            ["blackhole", "up", action] => (&[&self.blackhole_up], action),
            ["blackhole", "down", action] => (&[&self.blackhole_down], action),
            _ => {
                return "error: expected `status` or `blackhole [up|down|both] on|off|toggle`"
                    .to_string()
            }
        };
        for d in dirs {
            let v = match action {
                "on" => true,
                "off" => false,
                "toggle" => !d.load(Ordering::Relaxed),
                _ => return "error: blackhole action must be on, off or toggle".to_string(),
            };
            d.store(v, Ordering::Relaxed);
        }
        self.status()
    }
}

struct Scheduled {
    at: Instant,
    socket: Arc<UdpSocket>,
    dest: Option<SocketAddr>,
    data: Vec<u8>,
}

/// A bound relay, ready to [`run`](Relay::run).
#[derive(Debug)]
pub struct Relay {
    config: RelayConfig,
    listen: Arc<UdpSocket>,
    control_socket: Option<UdpSocket>,
    control: Arc<Control>,
}

impl Relay {
    /// Binds the listen and control sockets.
    pub async fn bind(config: RelayConfig) -> io::Result<Self> {
        let listen = Arc::new(UdpSocket::bind(config.listen).await?);
        let control_socket = match config.control {
            Some(addr) => Some(UdpSocket::bind(addr).await?),
            None => None,
        };
        Ok(Self {
            config,
            listen,
            control_socket,
            control: Arc::new(Control::default()),
        })
    }

    /// Address clients send to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listen.local_addr()
    }

    /// Address of the control socket.
    pub fn control_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.control_socket.as_ref().map(UdpSocket::local_addr)
    }

    /// Shared switches and counters.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Relays until an I/O error on the listen socket.
    pub async fn run(self) -> io::Result<()> {
        let start = Instant::now();
        let (tx, rx) = mpsc::unbounded_channel::<Scheduled>();
        tokio::spawn(scheduler(rx));
        if let Some(sock) = self.control_socket {
            tokio::spawn(control_loop(sock, self.control.clone()));
        }
        let RelayConfig {
            target,
            upstream_bind,
            profile,
            seed,
            ..
        } = self.config;
        let mut clients: HashMap<SocketAddr, (Arc<UdpSocket>, Impairment)> = HashMap::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut next_seed = seed;
        loop {
            let (len, from) = self.listen.recv_from(&mut buf).await?;
            let now = Instant::now();
            if !clients.contains_key(&from) {
                if clients.len() >= MAX_CLIENTS {
                    self.control.dropped_up.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let bind = upstream_bind.unwrap_or_else(|| match target {
                    SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                    SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
                });
                let upstream = Arc::new(UdpSocket::bind(bind).await?);
                upstream.connect(target).await?;
                next_seed = next_seed.wrapping_add(2);
                let up = Impairment::new(profile.clone(), start, seed, next_seed);
                let down = Impairment::new(profile.clone(), start, seed, next_seed + 1);
                tracing::info!(%from, upstream = ?upstream.local_addr().ok(), "new client");
                tokio::spawn(downstream(
                    upstream.clone(),
                    self.listen.clone(),
                    from,
                    down,
                    self.control.clone(),
                    tx.clone(),
                ));
                clients.insert(from, (upstream, up));
            }
            let Some((upstream, imp)) = clients.get_mut(&from) else {
                continue;
            };
            imp.set_blackhole(self.control.blackhole_up.load(Ordering::Relaxed));
            match imp.decide(now, len) {
                Verdict::Deliver(at) => {
                    self.control.forwarded_up.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Scheduled {
                        at,
                        socket: upstream.clone(),
                        dest: None,
                        data: buf[..len].to_vec(),
                    });
                }
                Verdict::Drop(_) => {
                    self.control.dropped_up.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn downstream(
    upstream: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    mut imp: Impairment,
    control: Arc<Control>,
    tx: mpsc::UnboundedSender<Scheduled>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let len = match upstream.recv(&mut buf).await {
            Ok(len) => len,
            // ICMP port unreachable from the target surfaces here; keep relaying.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                tracing::warn!(%client, error = %e, "upstream socket failed");
                return;
            }
        };
        imp.set_blackhole(control.blackhole_down.load(Ordering::Relaxed));
        match imp.decide(Instant::now(), len) {
            Verdict::Deliver(at) => {
                control.forwarded_down.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Scheduled {
                    at,
                    socket: listen.clone(),
                    dest: Some(client),
                    data: buf[..len].to_vec(),
                });
            }
            Verdict::Drop(_) => {
                control.dropped_down.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Releases packets at their delivery instant, earliest first.
async fn scheduler(mut rx: mpsc::UnboundedReceiver<Scheduled>) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut packets: HashMap<u64, Scheduled> = HashMap::new();
    let mut seq = 0u64;
    loop {
        let next = heap.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            msg = rx.recv() => {
                let Some(p) = msg else { return };
                seq += 1;
                heap.push(Reverse((p.at, seq)));
                packets.insert(seq, p);
            }
            () = sleep_until(next) => {}
        }
        let now = Instant::now();
        while let Some(Reverse((at, id))) = heap.peek().copied() {
            if at > now {
                break;
            }
            heap.pop();
            if let Some(p) = packets.remove(&id) {
                let res = match p.dest {
                    Some(dest) => p.socket.send_to(&p.data, dest).await,
                    None => p.socket.send(&p.data).await,
                };
                if let Err(e) = res {
                    tracing::debug!(error = %e, "send failed");
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

async fn control_loop(sock: UdpSocket, control: Arc<Control>) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((len, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let answer = match std::str::from_utf8(&buf[..len]) {
            Ok(line) => control.command(line.trim()),
            Err(_) => "error: command must be UTF-8".to_string(),
        };
        tracing::info!(command = %String::from_utf8_lossy(&buf[..len]).trim(), %answer, "control");
        let _ = sock.send_to(answer.as_bytes(), from).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_commands_switch_each_direction() {
        let c = Control::default();
        assert!(c
            .command("status")
            .starts_with("ok blackhole_up=off blackhole_down=off"));
        assert!(c
            .command("blackhole up on")
            .starts_with("ok blackhole_up=on blackhole_down=off"));
        assert!(c
            .command("blackhole down toggle")
            .contains("blackhole_down=on"));
        assert!(c
            .command("blackhole off")
            .starts_with("ok blackhole_up=off blackhole_down=off"));
        assert!(c
            .command("blackhole both on")
            .starts_with("ok blackhole_up=on blackhole_down=on"));
        assert!(!c.toggle_blackhole());
        assert!(c.toggle_blackhole());
        c.blackhole_up.store(false, Ordering::Relaxed);
        assert!(c.toggle_blackhole(), "half on toggles to fully on");
    }

    #[test]
    fn bad_control_commands_change_nothing() {
        let c = Control::default();
        for bad in [
            "",
            "blackhole",
            "blackhole sideways on",
            "blackhole up maybe",
            "reboot",
        ] {
            assert!(c.command(bad).starts_with("error:"), "{bad}");
        }
        assert!(c
            .command("status")
            .contains("blackhole_up=off blackhole_down=off"));
    }
}
