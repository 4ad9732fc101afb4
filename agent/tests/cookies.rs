//! Cookies under load: a flood of valid-MAC1 handshake initiations makes the agent answer with
//! cookie replies instead of doing the Diffie-Hellman work, and an initiator that echoes the
//! cookie (MAC2) still gets its handshake answered while the flood goes on.

mod common;

use std::net::UdpSocket;
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use common::*;
use skymesh_agent_core::key::Key;

/// Runs `f` on a thread that has entered network namespace `ns`; sockets created there belong
/// to that namespace.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns() only changes this thread's network namespace; the fd is valid.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn secret(b64: &str) -> StaticSecret {
    StaticSecret::from(Key::from_base64(b64).expect("wg genkey output").0)
}

#[test]
fn a_handshake_flood_gets_cookie_replies_and_a_cookie_echoing_peer_still_gets_through() {
    require(&["ip", "wg"]);
    let net = pair("c", 39);
    let dir = tmpdir();
    let iface = unique("sm3c");
    let mut agent = net.a.spawn(
        &[AGENT, "device", &iface, "--foreground"],
        &dir.path().join("agent.log"),
    );
    wait_socket(&iface, &mut agent);
    let (ka, kc) = (genkey(), genkey());
    setconf(
        &net.a,
        &iface,
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n[Peer]\nPublicKey = {}\n\
             AllowedIPs = 10.96.9.2/32\n",
            ka.private, kc.public
        ),
    );
    let agent_public = PublicKey::from(&secret(&ka.private));
    let to = format!("{}:51820", net.sat.0);

    let (responses, cookies, second_flood_cookies, answered_with_cookie) =
        in_netns(&net.b.name, || {
            let sock = UdpSocket::bind(format!("{}:0", net.sat.1)).expect("bind in ns b");
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            let mut buf = vec![0u8; 2048];
            let mut rx = vec![0u8; 2048];
            let mut flood = |tunn: &mut Tunn, n: usize| {
                for _ in 0..n {
                    if let TunnResult::WriteToNetwork(init) =
                        tunn.format_handshake_initiation(&mut buf, true)
                    {
                        sock.send_to(init, &to).expect("send");
                    }
                }
            };
            // 600 initiations back to back: far above the 100/s the agent takes before cookies.
            let mut tunn = Tunn::new(secret(&kc.private), agent_public, None, None, 7, None);
            flood(&mut tunn, 600);
            let (mut responses, mut cookies) = (0, 0);
            let mut last: Option<Vec<u8>> = None;
            while let Ok(n) = sock.recv(&mut rx) {
                match (rx[0], n) {
                    (2, 92) => responses += 1,
                    (3, 64) => cookies += 1,
                    other => panic!("unexpected reply {other:?}"),
                }
                last = Some(rx[..n].to_vec());
            }
            // The reply to the last initiation is a cookie: take it, as a real initiator does.
            let cookie = last.expect("replies");
            assert_eq!(cookie[0], 3, "the last initiation of the flood got a cookie");
            let mut scratch = vec![0u8; 2048];
            assert!(matches!(
                tunn.decapsulate(None, &cookie, &mut scratch),
                TunnResult::Done
            ));
            // Keep the agent under load with another initiator, then send one initiation that
            // carries MAC2 from the cookie.
            let mut flooder = Tunn::new(secret(&kc.private), agent_public, None, None, 9, None);
            flood(&mut flooder, 300);
            flood(&mut tunn, 1);
            let (mut second_cookies, mut answered) = (0, false);
            while let Ok(n) = sock.recv(&mut rx) {
                match (rx[0], n) {
                    (3, 64) => second_cookies += 1,
                    (2, 92) => {
                        let receiver = u32::from_le_bytes([rx[8], rx[9], rx[10], rx[11]]);
                        answered |= receiver >> 8 == 7;
                    }
                    other => panic!("unexpected reply {other:?}"),
                }
            }
            (responses, cookies, second_cookies, answered)
        });
    assert!(responses > 0, "some initiations answered before the load threshold");
    assert!(cookies > 100, "the flood is met with cookies ({cookies} cookies, {responses} responses)");
    assert!(responses < 400, "the agent did not do DH work for the whole flood ({responses})");
    assert!(second_flood_cookies > 0, "still under load during the second flood");
    assert!(answered_with_cookie, "an initiation with a valid MAC2 is answered under load");
    assert!(agent.terminate().success(), "{}", agent.log_text());
}
