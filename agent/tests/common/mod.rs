//! Helpers for the end-to-end tests: network namespaces created and destroyed by the test
//! (unique names, no default route, 198.18.0.0/15 underlay), processes killed on drop, and
//! polling instead of sleeping. Every test needs root and the stock tools; a missing tool is a
//! failure with a clear message, never a skip.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub(crate) const AGENT: &str = env!("CARGO_BIN_EXE_skymesh-agent");

/// `PATH` plus `~/.cargo/bin`, where `cargo install boringtun-cli` puts its binary.
pub(crate) fn path_env() -> String {
    let mut p = std::env::var("PATH").unwrap_or_default();
    if let Ok(home) = std::env::var("HOME") {
        p = format!("{p}:{home}/.cargo/bin");
    }
    p
}

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    path_env()
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Panics (fails the test) unless we are root and every tool is installed.
pub(crate) fn require(tools: &[&str]) {
    // SAFETY-free check: /proc/self/status Uid line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"));
    assert!(
        root,
        "this end-to-end test needs root (network namespaces, TUN devices)"
    );
    for t in tools {
        assert!(
            which(t).is_some(),
            "this end-to-end test needs `{t}` (apt-get install --no-install-recommends \
             wireguard-go wireguard-tools iperf3 iputils-ping iproute2 jq; \
             cargo install --locked boringtun-cli --version 0.7.1)"
        );
    }
}

/// A short name unique to this process and call: `<tag><pid%10000>-<n>`.
pub(crate) fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}-{}",
        std::process::id() % 10000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", path_env())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    out
}

/// Runs and requires success; returns stdout.
pub(crate) fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted (after killing its processes) on drop.
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    pub(crate) fn new(tag: &str) -> Netns {
        let name = unique(&format!("sm3{tag}"));
        ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS…`, must succeed.
    pub(crate) fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ok("ip", &a)
    }

    /// Runs a command inside the namespace, returning its output.
    pub(crate) fn exec(&self, args: &[&str]) -> Output {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs a command inside the namespace and requires success.
    pub(crate) fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command with stdin inside the namespace and requires success.
    pub(crate) fn exec_stdin(&self, args: &[&str], stdin: &str) -> String {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .env("PATH", path_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process in the namespace; killed when the guard drops.
    pub(crate) fn spawn(&self, args: &[&str], log: &Path) -> Proc {
        let f = std::fs::File::create(log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .env("PATH", path_env())
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .spawn()
            .expect("spawn in netns");
        Proc {
            child,
            log: log.to_owned(),
        }
    }

    /// Pings `dst` from this namespace: `count` probes, true if all were answered.
    pub(crate) fn ping(&self, dst: &str, count: u32) -> bool {
        let c = count.to_string();
        self.exec(&["ping", "-c", &c, "-i", "0.1", "-W", "2", "-q", dst])
            .status
            .success()
    }

    /// Pings until one answer or `timeout`.
    pub(crate) fn ping_until(&self, dst: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self
                .exec(&["ping", "-c", "1", "-W", "1", "-q", dst])
                .status
                .success()
            {
                return true;
            }
        }
        false
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let pids = run("ip", &["netns", "pids", &self.name]);
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = run("kill", &[pid]);
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A child process, killed on drop.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Proc {
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for exit.
    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = run("kill", &["-TERM", &self.child.id().to_string()]);
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < end, "process did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    /// SIGTERM first so devices remove their socket files, SIGKILL after 2 s.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = run("kill", &["-TERM", &self.child.id().to_string()]);
            let end = Instant::now() + Duration::from_secs(2);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn socket_path(iface: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{iface}.sock"))
}

/// Waits until the UAPI socket of `iface` accepts connections.
pub(crate) fn wait_socket(iface: &str, proc: &mut Proc) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if std::os::unix::net::UnixStream::connect(socket_path(iface)).is_ok() {
            return;
        }
        if let Some(s) = proc.child.try_wait().expect("wait") {
            panic!(
                "device exited ({s}) before serving its socket:\n{}",
                proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no UAPI socket for {iface}:\n{}", proc.log_text());
}

/// Sends raw UAPI text and returns the answer (up to the blank line).
pub(crate) fn uapi(iface: &str, request: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut c = std::os::unix::net::UnixStream::connect(socket_path(iface)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(b"\n\n") {
        let n = c.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).expect("utf8")
}

pub(crate) struct Keys {
    pub(crate) private: String,
    pub(crate) public: String,
}

pub(crate) fn genkey() -> Keys {
    let private = ok("wg", &["genkey"]).trim().to_owned();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(private.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("wg pubkey");
    Keys {
        private,
        public: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    }
}

/// Two namespaces joined by two veth pairs, "sat" (198.18.N.1/2 + fd00:N::1/2) and "terr"
/// (198.18.N+1.x), no default route.
pub(crate) struct Pair {
    pub(crate) a: Netns,
    pub(crate) b: Netns,
    pub(crate) sat: (String, String),
    pub(crate) terr: (String, String),
}

pub(crate) fn pair(tag: &str, subnet: u8) -> Pair {
    let a = Netns::new(&format!("{tag}a"));
    let b = Netns::new(&format!("{tag}b"));
    let mk = |name: &str, third: u8| {
        let va = format!("{name}a");
        let vb = format!("{name}b");
        ok(
            "ip",
            &[
                "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
                &b.name,
            ],
        );
        let a4 = format!("198.18.{third}.1");
        let b4 = format!("198.18.{third}.2");
        a.ip(&["addr", "add", &format!("{a4}/24"), "dev", &va]);
        b.ip(&["addr", "add", &format!("{b4}/24"), "dev", &vb]);
        a.ip(&[
            "addr",
            "add",
            &format!("fd00:{third}::1/64"),
            "dev",
            &va,
            "nodad",
        ]);
        b.ip(&[
            "addr",
            "add",
            &format!("fd00:{third}::2/64"),
            "dev",
            &vb,
            "nodad",
        ]);
        a.ip(&["link", "set", &va, "up"]);
        b.ip(&["link", "set", &vb, "up"]);
        (a4, b4)
    };
    let sat = mk("sat", subnet);
    let terr = mk("terr", subnet + 1);
    Pair { a, b, sat, terr }
}

/// Gives `iface` in `ns` an overlay address pair and brings it up with MTU 1420.
pub(crate) fn overlay(ns: &Netns, iface: &str, v4: &str, v6: &str) {
    ns.ip(&["addr", "add", v4, "dev", iface]);
    ns.ip(&["addr", "add", v6, "dev", iface, "nodad"]);
    ns.ip(&["link", "set", iface, "mtu", "1420", "up"]);
}

/// `wg setconf IFACE <config>` inside `ns`.
pub(crate) fn setconf(ns: &Netns, iface: &str, config: &str) {
    ns.exec_stdin(&["wg", "setconf", iface, "/dev/stdin"], config);
}

pub(crate) fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("skymesh-agent-test")
        .tempdir()
        .expect("tempdir")
}

/// Points `ia` (in `net.a`, port 51820) and `ib` (in `net.b`, port 51821) at each other over
/// the sat link with `wg setconf`, each allowing the other's `{v4}.1`/`{v4}.2` address, and
/// gives them the overlay addresses `{v4}.1/24`, `{v6}1/64` and `{v4}.2/24`, `{v6}2/64`.
pub(crate) fn connect_over_sat(
    net: &Pair,
    (ia, ka): (&str, &Keys),
    (ib, kb): (&str, &Keys),
    v4: &str,
    v6: &str,
) {
    let conf = |me: &Keys, port: u16, peer: &Keys, peer_ip: &str, peer_port: u16, allowed: u8| {
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {port}\n[Peer]\nPublicKey = {}\n\
             Endpoint = {peer_ip}:{peer_port}\nAllowedIPs = {v4}.{allowed}/32\n",
            me.private, peer.public
        )
    };
    setconf(&net.a, ia, &conf(ka, 51820, kb, &net.sat.1, 51821, 2));
    setconf(&net.b, ib, &conf(kb, 51821, ka, &net.sat.0, 51820, 1));
    overlay(&net.a, ia, &format!("{v4}.1/24"), &format!("{v6}1/64"));
    overlay(&net.b, ib, &format!("{v4}.2/24"), &format!("{v6}2/64"));
}
