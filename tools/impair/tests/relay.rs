//! Runs the real `skymesh-impair` binary on 127.0.0.1 and sends UDP through it.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use skymesh_impair::profile::Profile;

struct Relay {
    child: Child,
    listen: SocketAddr,
    control: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP echo server on loopback; returns its address.
fn echo_server() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind echo");
    let addr = sock.local_addr().expect("addr");
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    addr
}

fn start_relay(target: SocketAddr, profile_yaml: &str) -> Relay {
    let dir = std::env::temp_dir().join(format!("skymesh-impair-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join(format!("{}.yaml", profile_yaml.len()));
    std::fs::write(&file, profile_yaml).expect("write profile");
    let mut child = Command::new(env!("CARGO_BIN_EXE_skymesh-impair"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--seed",
            "1",
        ])
        .arg("--target")
        .arg(target.to_string())
        .arg("--profile-file")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn relay");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let field = |name: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {line:?}"))
            .parse()
            .expect("address")
    };
    Relay {
        listen: field("listen="),
        control: field("control="),
        child,
    }
}

fn control(relay: &Relay, cmd: &str) -> String {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    sock.send_to(cmd.as_bytes(), relay.control).expect("send");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("control answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Sends one datagram and waits up to `wait` for its echo; returns the RTT.
fn ping(client: &UdpSocket, relay: SocketAddr, seq: u32, wait: Duration) -> Option<Duration> {
    client.set_read_timeout(Some(wait)).expect("timeout");
    let sent = Instant::now();
    client.send_to(&seq.to_be_bytes(), relay).expect("send");
    let mut buf = [0u8; 64];
    loop {
        match client.recv(&mut buf) {
            Ok(4) if buf[..4] == seq.to_be_bytes() => return Some(sent.elapsed()),
            Ok(_) => continue, // a late echo of an earlier ping
            Err(_) => return None,
        }
    }
}

#[test]
fn relay_adds_latency_in_both_directions() {
    let relay = start_relay(echo_server(), "latency_ms: 50\n");
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for seq in 0..5 {
        let rtt = ping(&client, relay.listen, seq, Duration::from_secs(2)).expect("echo");
        assert!(
            rtt >= Duration::from_millis(100) && rtt < Duration::from_millis(300),
            "rtt {rtt:?}"
        );
    }
}

#[test]
fn blackhole_on_the_control_socket_silently_cuts_the_path_and_restores_it() {
    let relay = start_relay(echo_server(), "latency_ms: 5\n");
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    assert!(ping(&client, relay.listen, 1, Duration::from_secs(2)).is_some());

    let answer = control(&relay, "blackhole on");
    assert!(
        answer.starts_with("ok blackhole_up=on blackhole_down=on"),
        "{answer}"
    );
    for seq in 2..5 {
        assert_eq!(
            ping(&client, relay.listen, seq, Duration::from_millis(300)),
            None
        );
    }
    let answer = control(&relay, "blackhole off");
    assert!(answer.contains("blackhole_up=off"), "{answer}");
    assert!(ping(&client, relay.listen, 9, Duration::from_secs(2)).is_some());

    // One direction only: the request reaches the echo server, the answer vanishes.
    control(&relay, "blackhole down on");
    assert_eq!(
        ping(&client, relay.listen, 10, Duration::from_millis(300)),
        None
    );
    let status = control(&relay, "status");
    let dropped_down: u64 = status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dropped_down="))
        .expect("counter")
        .parse()
        .expect("number");
    assert!(dropped_down >= 1, "{status}");
    assert!(control(&relay, "nonsense").starts_with("error:"));
}

#[test]
fn sigusr1_toggles_the_blackhole() {
    let relay = start_relay(echo_server(), "latency_ms: 1\n");
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    assert!(ping(&client, relay.listen, 1, Duration::from_secs(2)).is_some());
    let pid = relay.child.id().to_string();
    let kill = |pid: &str| {
        let ok = Command::new("kill")
            .args(["-USR1", pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
    };
    kill(&pid);
    // The signal is handled asynchronously: wait until the control socket reports it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !control(&relay, "status").contains("blackhole_up=on") {
        assert!(Instant::now() < deadline, "SIGUSR1 not handled");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        ping(&client, relay.listen, 2, Duration::from_millis(300)),
        None
    );
    kill(&pid);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !control(&relay, "status").contains("blackhole_up=off") {
        assert!(Instant::now() < deadline, "second SIGUSR1 not handled");
        thread::sleep(Duration::from_millis(10));
    }
    assert!(ping(&client, relay.listen, 3, Duration::from_secs(2)).is_some());
}

#[test]
fn bad_profile_file_is_refused_with_the_field_named() {
    let dir = std::env::temp_dir().join(format!("skymesh-impair-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("bad.yaml");
    std::fs::write(&file, "latency_ms: 5\nloss: 3\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_skymesh-impair"))
        .args(["--listen", "127.0.0.1:0", "--target", "127.0.0.1:9"])
        .arg("--profile-file")
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loss"), "{err}");
    assert!(out.stdout.is_empty(), "no ready line on failure");
}

#[test]
fn example_starlink_profile_parses_and_matches_the_builtin() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/impair-starlink.yaml"
    );
    let text = std::fs::read_to_string(path).expect("configs/impair-starlink.yaml");
    let parsed = Profile::from_yaml(&text).expect("valid profile");
    assert_eq!(Some(parsed), Profile::builtin("starlink"));
}
