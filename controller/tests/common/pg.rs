//! A throw-away PostgreSQL cluster for the tests of one test binary: `initdb` into a temp dir,
//! `postgres` listening only on a unix socket in that dir (no TCP at all), one fresh database
//! per test. As root the server runs as the `postgres` user (it refuses to run as root).
//!
//! Teardown without relying on destructors (statics are never dropped): the server runs under
//! a small `sh` supervisor whose stdin is a pipe held by this process. When the test binary
//! exits — normally, on panic or killed — the pipe closes, and the supervisor stops the server
//! (fast shutdown) and removes the directory.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::Connection as _;

pub struct Cluster {
    dir: PathBuf,
    /// Closing this (at process exit) stops the server.
    _lifeline: Mutex<ChildStdin>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

const SUPERVISOR: &str = r#"
"$@" >"$PGDIR/postgres.log" 2>&1 &
pid=$!
read -r _ || true
kill -INT "$pid" 2>/dev/null
wait "$pid"
rm -rf "$PGDIR"
"#;

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian layout), or `$SKYMESH_PG_BIN`.
fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SKYMESH_PG_BIN") {
        return d.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: \
             apt-get install --no-install-recommends postgresql (or set SKYMESH_PG_BIN)"
        ),
    }
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("run id");
    assert!(
        out.status.success(),
        "as root the tests run PostgreSQL as user `postgres`, which does not exist \
         (installing the postgresql package creates it)"
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

/// The command prefix that drops root to `postgres` (empty when not root).
fn as_postgres() -> Vec<String> {
    if running_as_root() {
        let (uid, gid) = (id_of("-u"), id_of("-g"));
        vec![
            "setpriv".into(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
            "--".into(),
        ]
    } else {
        Vec::new()
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn log_tail(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()))
}

/// Runs `program` as the `postgres` user when we are root.
fn command(prefix: &[String], program: &Path) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// An `initdb`-ed data directory, made once per PostgreSQL version and copied by each test
/// binary: `initdb` takes seconds, a copy a fraction of one. Built under a temporary name and
/// renamed into place, so a concurrent or interrupted build is never used half-made.
fn template(bin: &Path, prefix: &[String]) -> PathBuf {
    let version = bin
        .parent()
        .and_then(Path::file_name)
        .map_or_else(|| "custom".into(), |v| v.to_string_lossy().into_owned());
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = root.join(format!("skymesh-pg-template-v1-{version}"));
    if path.join("PG_VERSION").exists() {
        return path;
    }
    let building = root.join(format!(
        "skymesh-pg-template-building-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(&building).expect("create template dir");
    std::fs::set_permissions(&building, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    if !prefix.is_empty() {
        std::os::unix::fs::chown(&building, Some(id_of("-u")), Some(id_of("-g"))).expect("chown");
    }
    let out = command(prefix, &bin.join("initdb"))
        .arg("-D")
        .arg(&building)
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if std::fs::rename(&building, &path).is_err() {
        // Another test binary finished first; use its template.
        let _ = std::fs::remove_dir_all(&building);
    }
    path
}

impl Cluster {
    fn start() -> Cluster {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!("skymesh-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("create cluster dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let prefix = as_postgres();
        if !prefix.is_empty() {
            std::os::unix::fs::chown(&dir, Some(id_of("-u")), Some(id_of("-g"))).expect("chown");
        }
        let data = dir.join("data");
        let template = template(&bin, &prefix);
        let out = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .output()
            .expect("run cp");
        assert!(
            out.status.success(),
            "copying the cluster template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Durability settings off: these tests are about concurrency and semantics, not power
        // loss, and fsync per commit would dominate their run time.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("sh")
            .args(&prefix)
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .env("PGDIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn postgres supervisor");
        let lifeline = child.stdin.take().expect("piped stdin");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .arg("-q")
                .arg("-h")
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "postgres exited ({status}) during start-up: {}",
                    log_tail(&dir.join("postgres.log"))
                );
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready after 30 s: {}",
                log_tail(&dir.join("postgres.log"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Cluster {
            dir,
            _lifeline: Mutex::new(lifeline),
        }
    }

    /// The URL of database `name` over the cluster's unix socket.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost/{name}?host={}",
            self.dir.display()
        )
    }
}

/// The shared cluster of this test binary, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(Cluster::start)
}

/// A new, empty database in the shared cluster; returns its URL.
pub async fn fresh_database() -> String {
    let c = cluster();
    let name = format!("skymesh_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let mut conn = sqlx::PgConnection::connect(&c.url("postgres"))
        .await
        .expect("connect to the test cluster");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    conn.close().await.expect("close");
    c.url(&name)
}
