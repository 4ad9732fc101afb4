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
            // Sends `n` initiations, paced and draining replies as it goes so neither socket
            // buffer overflows (every initiation gets its reply, in order), all within one
            // rate-limit second. Returns the replies.
            let mut flood = |tunn: &mut Tunn, n: usize| -> Vec<Vec<u8>> {
                let mut replies = Vec::new();
                let mut rx = vec![0u8; 2048];
                sock.set_nonblocking(true).expect("nonblocking");
                for i in 0..n {
                    if let TunnResult::WriteToNetwork(init) =
                        tunn.format_handshake_initiation(&mut buf, true)
                    {
                        sock.send_to(init, &to).expect("send");
                    }
                    if i % 20 == 19 {
                        std::thread::sleep(Duration::from_millis(2));
                        while let Ok(len) = sock.recv(&mut rx) {
                            replies.push(rx[..len].to_vec());
                        }
                    }
                }
                sock.set_nonblocking(false).expect("blocking");
                while let Ok(len) = sock.recv(&mut rx) {
                    replies.push(rx[..len].to_vec());
                }
                replies
            };
            let kind = |r: &[u8]| match (r[0], r.len()) {
                (2, 92) => 2,
                (3, 64) => 3,
                other => panic!("unexpected reply {other:?}"),
            };
            // 600 initiations: far above the 100/s the agent takes before it demands cookies.
            let mut tunn = Tunn::new(secret(&kc.private), agent_public, None, None, 7, None);
            let replies = flood(&mut tunn, 600);
            assert_eq!(replies.len(), 600, "one reply per initiation");
            let responses = replies.iter().filter(|r| kind(r) == 2).count();
            let cookies = replies.iter().filter(|r| kind(r) == 3).count();
            // The reply to the last initiation is a cookie: take it, as a real initiator does.
            let cookie = replies.last().expect("replies");
            assert_eq!(
                cookie[0], 3,
                "the last initiation of the flood got a cookie"
            );
            let mut scratch = vec![0u8; 2048];
            let r = tunn.decapsulate(None, cookie, &mut scratch);
            assert!(matches!(r, TunnResult::Done), "cookie not accepted: {r:?}");
            // Keep the agent under load with another initiator, then send one initiation that
            // carries MAC2 from the cookie.
            let mut flooder = Tunn::new(secret(&kc.private), agent_public, None, None, 9, None);
            let mut second = flood(&mut flooder, 300);
            second.extend(flood(&mut tunn, 1));
            let second_cookies = second.iter().filter(|r| kind(r) == 3).count();
            let answered = second
                .iter()
                .any(|r| kind(r) == 2 && u32::from_le_bytes([r[8], r[9], r[10], r[11]]) >> 8 == 7);
            (responses, cookies, second_cookies, answered)
        });
    assert!(
        responses > 0,
        "some initiations answered before the load threshold"
    );
    assert!(
        cookies > 100,
        "the flood is met with cookies ({cookies} cookies, {responses} responses)"
    );
    assert!(
        responses < 400,
        "the agent did not do DH work for the whole flood ({responses})"
    );
    assert!(
        second_flood_cookies > 0,
        "still under load during the second flood"
    );
    assert!(
        answered_with_cookie,
        "an initiation with a valid MAC2 is answered under load"
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());
}
