//! Helpers for skymesh end-to-end tests and measurements: locating the workspace binaries,
//! starting a real controller on a temp data dir, and calling its API.
//!
//! The binaries are the ones `cargo build --workspace` produced (`target/debug` unless
//! `SKYMESH_BIN_DIR` says otherwise); the tests refuse to run with a clear message otherwise.

pub mod nat;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Directory holding `skymesh-controller` and `skymesh-agent`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SKYMESH_BIN_DIR") {
        return d.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
}

/// The path of a workspace binary; an error naming the build command if it is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: run `cargo build -p skymesh-controller -p skymesh-agent` first \
             (or set SKYMESH_BIN_DIR)",
            p.display()
        );
    }
    Ok(p)
}

/// A controller process on a temp data dir; killed on drop.
pub struct Controller {
    pub child: Child,
    pub url: String,
    pub admin_token: String,
    pub data_dir: tempfile::TempDir,
    /// The CA file to trust when serving HTTPS.
    pub ca: Option<PathBuf>,
}

/// A TLS certificate and key for the controller, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Controller {
    /// Starts `skymesh-controller serve` (optionally inside netns `ns`) listening on `listen`
    /// and creates an admin token.
    pub fn start(ns: Option<&str>, listen: &str) -> anyhow::Result<Self> {
        Self::start_with(ns, listen, None)
    }

    /// Like [`Controller::start`], serving HTTPS when `tls` is given.
    pub fn start_with(
        ns: Option<&str>,
        listen: &str,
        tls: Option<&TlsFiles>,
    ) -> anyhow::Result<Self> {
        Self::start_args(ns, listen, tls, &[])
    }

    /// Like [`Controller::start_with`], with extra `serve` flags.
    pub fn start_args(
        ns: Option<&str>,
        listen: &str,
        tls: Option<&TlsFiles>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir()?;
        let exe = binary("skymesh-controller")?;
        let mut cmd = in_ns(ns, &exe);
        cmd.args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir.path())
            .args(extra);
        // Outside a namespace several controllers may run at once: no fixed STUN ports.
        if ns.is_none() {
            cmd.args(["--stun-port", "0", "--relay-port", "0"]);
        }
        if let Some(t) = tls {
            cmd.arg("--tls-cert")
                .arg(&t.cert)
                .arg("--tls-key")
                .arg(&t.key);
        }
        // Its log, for tests that print it when they fail (`Controller::log`).
        let log = std::fs::File::create(data_dir.path().join("controller.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info,skymesh_controller=debug");
        let child = cmd.spawn().context("starting the controller")?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{listen}");
        let mut c = Controller {
            child,
            url,
            admin_token: String::new(),
            data_dir,
            ca: tls.map(|t| t.cert.clone()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = c
                .curl(ns)
                .args(["-sf", "-o", "/dev/null", &format!("{}/healthz", c.url)])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("controller did not answer /healthz within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = in_ns(ns, &exe)
            .args(["admin-token", "create", "--data-dir"])
            .arg(c.data_dir.path())
            .output()
            .context("creating an admin token")?;
        let text = String::from_utf8_lossy(&out.stdout);
        c.admin_token = text
            .split_whitespace()
            .find(|w| w.starts_with("sma_"))
            .context("admin-token create printed no token")?
            .to_string();
        Ok(c)
    }

    /// `curl` (in `ns`) trusting this controller's certificate.
    pub fn curl(&self, ns: Option<&str>) -> Command {
        let mut cmd = in_ns(ns, "curl");
        if let Some(ca) = &self.ca {
            cmd.arg("--cacert").arg(ca);
        }
        cmd
    }

    /// One admin API call through `curl` in `ns`: `method` on `path` with an optional JSON
    /// body; the JSON answer, or `Null` when the body is not JSON.
    pub fn api(
        &self,
        ns: &str,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        let mut cmd = self.curl(Some(ns));
        cmd.args([
            "-sS",
            "-X",
            method,
            "-H",
            &format!("Authorization: Bearer {}", self.admin_token),
        ]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
        }
        cmd.arg(format!("{}{path}", self.url));
        serde_json::from_str(&run(&mut cmd)).unwrap_or(serde_json::Value::Null)
    }

    /// What the controller logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("controller.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `cmd` run inside netns `ns` (or directly).
pub fn in_ns(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Runs `cmd`; panics with its stderr unless it succeeds; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS…`, which must succeed.
pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Whether the test runs as root (namespaces, TUN).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Set to `1` to skip, with the reason printed, the end-to-end tests whose requirements are
/// missing (a developer without root). `.ci/run` and `scripts/test` never set it.
pub const SKIP_ROOT_TESTS: &str = "SKYMESH_SKIP_ROOT_TESTS";

/// Fails the calling test with the reason unless it runs as root and every program in
/// `tools` is on `PATH` (or in `~/.cargo/bin`). Returns `false` only when something is missing
/// and [`SKIP_ROOT_TESTS`]`=1` opts out: the test then returns without testing anything.
#[must_use = "return from the test when it is false"]
pub fn require_root(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (network namespaces, TUN devices)".to_string());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    for tool in tools {
        if !dirs.iter().any(|d| d.join(tool).is_file()) {
            missing.push(format!("`{tool}`"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join(", ");
    if std::env::var(SKIP_ROOT_TESTS).as_deref() == Ok("1") {
        eprintln!("skipped ({SKIP_ROOT_TESTS}=1): this end-to-end test needs {missing}");
        return false;
    }
    panic!(
        "this end-to-end test needs {missing}: run `sudo scripts/test` (scripts/install-deps \
         installs the tools), or set {SKIP_ROOT_TESTS}=1 to skip it"
    );
}

/// Polls `f` every 50 ms until it returns `Some` or `limit` passes (then panics naming
/// `what`); returns the value and the time it took.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, t0.elapsed());
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_for`] a condition; returns the time it took.
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    wait_for(limit, what, || f().then_some(())).1
}

/// One ping from netns `ns` to `dst` (1 s timeout): whether it was answered.
pub fn ping_once(ns: &str, dst: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1", dst])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Percentile (0..=100) of a sorted slice.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
