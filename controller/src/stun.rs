//! The controller's STUN reflector: answers Binding requests (RFC 8489) on two UDP ports with
//! the address each request came from. Agents send them from their WireGuard sockets to learn
//! the address their carrier's NAT gives that socket; asking both ports tells them whether
//! the mapping is endpoint-independent (peers can punch through to it) or not.
//!
//! It holds no state and authenticates nobody, like any public STUN server: a response says
//! only what the sender's own packet already showed. Against reflection abuse (a forged source
//! address), a response is at most 52 bytes and responses are capped at
//! [`RESPONSES_PER_SECOND`] per port; anything that is not a well-formed Binding request is
//! dropped without an answer.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use skymesh_proto::stun::{self, Message};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// Most responses one port sends per second (a fleet of 10,000 agents asking every 20 s from
/// two sockets is 1,000/s).
pub const RESPONSES_PER_SECOND: u32 = 5_000;

/// Binds `ip:port` and `ip:port+1` (`port` 0: none). Binding happens before the API is
/// announced, so a port in use is a start-up error, not a silent gap.
pub fn bind(ip: IpAddr, port: u16) -> io::Result<Vec<UdpSocket>> {
    if port == 0 {
        return Ok(Vec::new());
    }
    let second = port
        .checked_add(1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no port after 65535"))?;
    [port, second]
        .into_iter()
        .map(|p| UdpSocket::bind(SocketAddr::new(ip, p)))
        .collect()
}

/// Serves every socket on the current tokio runtime until the tasks are aborted, counting
/// answers and drops in `metrics` (`/metrics`).
pub fn spawn(sockets: Vec<UdpSocket>, metrics: Arc<Metrics>) -> io::Result<Vec<JoinHandle<()>>> {
    sockets
        .into_iter()
        .map(|s| {
            s.set_nonblocking(true)?;
            let sock = tokio::net::UdpSocket::from_std(s)?;
            Ok(tokio::spawn(serve(sock, metrics.clone())))
        })
        .collect()
}

/// The answer to one datagram: the response length written into `out`, or `None` to drop.
pub fn answer(datagram: &[u8], from: SocketAddr, out: &mut [u8]) -> Option<usize> {
    match stun::decode(datagram) {
        Ok(Message::BindingRequest { txid }) => Some(stun::encode_response(&txid, from, out)),
        _ => None,
    }
}

async fn serve(sock: tokio::net::UdpSocket, metrics: Arc<Metrics>) {
    let mut buf = [0u8; 1500];
    let mut out = [0u8; stun::MAX_RESPONSE_LEN];
    let mut window = Instant::now();
    let mut budget = RESPONSES_PER_SECOND;
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let now = Instant::now();
        if now.duration_since(window) >= Duration::from_secs(1) {
            window = now;
            budget = RESPONSES_PER_SECOND;
        }
        let Some(len) = answer(&buf[..n], from, &mut out).filter(|_| budget > 0) else {
            metrics.stun_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        budget -= 1;
        if sock.send_to(&out[..len], from).await.is_ok() {
            metrics.stun_answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_request_is_answered_with_the_sender_address_and_garbage_is_not() {
        let mut req = [0u8; stun::REQUEST_LEN];
        let n = stun::encode_request(&[7; 12], &mut req);
        let from: SocketAddr = "198.18.4.2:51820".parse().expect("addr");
        let mut out = [0u8; stun::MAX_RESPONSE_LEN];
        let len = answer(&req[..n], from, &mut out).expect("answered");
        assert_eq!(
            stun::decode(&out[..len]),
            Ok(Message::BindingResponse {
                txid: [7; 12],
                mapped: from
            })
        );
        assert_eq!(answer(b"hello", from, &mut out), None);
        // A response sent to us (reflection loop) is not answered either.
        assert_eq!(answer(&out[..len], from, &mut out.clone()), None);
    }

    #[tokio::test]
    async fn the_reflector_answers_on_both_ports_over_real_sockets() {
        let socks = bind("127.0.0.1".parse().expect("ip"), 0).expect("bind");
        assert!(socks.is_empty(), "port 0 means off");
        // Ephemeral ports for the test: bind two sockets directly.
        let a = UdpSocket::bind("127.0.0.1:0").expect("a");
        let b = UdpSocket::bind("127.0.0.1:0").expect("b");
        let ports = [
            a.local_addr().expect("a").port(),
            b.local_addr().expect("b").port(),
        ];
        let metrics = Arc::new(Metrics::default());
        let tasks = spawn(vec![a, b], metrics.clone()).expect("spawn");
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("client");
        let me = client.local_addr().expect("local");
        for port in ports {
            let mut req = [0u8; stun::REQUEST_LEN];
            let n = stun::encode_request(&[port as u8; 12], &mut req);
            client
                .send_to(&req[..n], ("127.0.0.1", port))
                .await
                .expect("send");
            let mut buf = [0u8; 128];
            let (len, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .expect("answer in time")
                .expect("recv");
            assert_eq!(
                stun::decode(&buf[..len]),
                Ok(Message::BindingResponse {
                    txid: [port as u8; 12],
                    mapped: me
                })
            );
        }
        assert_eq!(metrics.stun_answered.load(Ordering::Relaxed), 2);
        for t in tasks {
            t.abort();
        }
    }
}
