//! Issue 4, controller side: the netmap stream (SSE, deltas, resume, revocation), endpoint and
//! status reports, key rotation and subnet routes, against a real temp-dir SQLite.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use common::{wg_key, TestController};
use http_body_util::BodyExt as _;
use serde_json::json;
use skymesh_proto::{NetMap, NodeId, StreamEvent};
use tower::ServiceExt as _;

/// Generous bound for "pushed quickly" so a loaded CI machine does not flake; the latency
/// target itself is measured by a script, not asserted here.
const PUSH_WAIT: Duration = Duration::from_secs(5);

/// An open SSE stream read event by event.
struct Sse {
    body: Body,
    buf: String,
}

#[derive(Debug)]
struct SseEvent {
    name: String,
    id: Option<u64>,
    event: StreamEvent,
}

impl Sse {
    async fn open(tc: &TestController, credential: &str, query: &str) -> Self {
        let req = Request::builder()
            .uri(format!("/api/v1/netmap/stream{query}"))
            .header(header::AUTHORIZATION, format!("Bearer {credential}"))
            .body(Body::empty())
            .expect("request");
        let resp = tc.app().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/event-stream",
            "SSE content type"
        );
        Sse {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended; panics after `PUSH_WAIT`.
    async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(PUSH_WAIT, self.next_inner())
            .await
            .expect("an event within the wait bound")
    }

    async fn next_inner(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut name, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                let event = serde_json::from_str(&data).expect("event JSON");
                return Some(SseEvent { name, id, event });
            }
            let frame = self.body.frame().await?.expect("body frame");
            if let Ok(data) = frame.into_data() {
                let data: Bytes = data;
                self.buf
                    .push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
    }

    /// Asserts that nothing (but keep-alives) arrives for `d`.
    async fn quiet_for(&mut self, d: Duration) {
        if let Ok(e) = tokio::time::timeout(d, self.next_inner()).await {
            panic!("expected no event, got {e:?}");
        }
    }
}

/// Applies a stream event to the held netmap, verifying it with the controller key.
fn apply(tc: &TestController, held: Option<&NetMap>, e: &SseEvent) -> NetMap {
    let key = tc.state.signing_key.verifying_key();
    let map = match &e.event {
        StreamEvent::Netmap(s) => {
            assert_eq!(e.name, "netmap");
            s.verify(&key).expect("netmap verifies")
        }
        StreamEvent::Delta(s) => {
            assert_eq!(e.name, "delta");
            let d = s.verify(&key).expect("delta verifies");
            d.apply(held.expect("a delta needs a held netmap"))
                .expect("delta applies to the held netmap")
        }
        other => panic!("expected a netmap or delta, got {other:?}"),
    };
    assert_eq!(e.id, Some(map.serial), "SSE id is the serial");
    map
}

fn peer_ids(m: &NetMap) -> Vec<u64> {
    m.peers.iter().map(|p| p.node_id.0).collect()
}

async fn auto_key(tc: &TestController) -> String {
    tc.enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await
}

#[tokio::test]
async fn a_new_peer_is_pushed_as_a_signed_delta_to_an_open_stream() {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (a, cred_a) = tc.register_ok(&key, 1, "hq").await;
    let mut s = Sse::open(&tc, &cred_a, "").await;
    let first = s.next().await.expect("first event");
    assert!(matches!(first.event, StreamEvent::Netmap(_)), "{first:?}");
    let held = apply(&tc, None, &first);
    assert_eq!(held.node.node_id, NodeId(a));
    assert!(held.peers.is_empty());

    let (b, _) = tc.register_ok(&key, 2, "field-1").await;
    let e = s.next().await.expect("pushed");
    assert!(matches!(e.event, StreamEvent::Delta(_)), "{e:?}");
    let held = apply(&tc, Some(&held), &e);
    assert_eq!(peer_ids(&held), vec![b]);
    // The pushed state equals what a fresh GET returns.
    assert_eq!(held, tc.netmap(&cred_a).await);
}

#[tokio::test]
async fn a_change_invisible_to_a_node_sends_it_nothing_and_the_next_delta_still_applies() {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (_, cred_a) = tc.register_ok(&key, 1, "hq").await;
    let pending = tc.enrollment_key(json!({})).await;
    let mut s = Sse::open(&tc, &cred_a, "").await;
    let held = apply(&tc, None, &s.next().await.expect("first"));
    // A pending node is nobody's peer: the serial moves, A's view does not.
    let (p, _) = tc.register_ok(&pending, 2, "pending").await;
    s.quiet_for(Duration::from_millis(300)).await;
    let r = tc
        .admin(
            Method::PATCH,
            &format!("/api/v1/nodes/{p}"),
            Some(json!({"approve": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let held = apply(&tc, Some(&held), &s.next().await.expect("pushed"));
    assert_eq!(peer_ids(&held), vec![p]);
}

#[tokio::test]
async fn resuming_from_a_held_serial_gets_a_delta_and_an_unknown_serial_a_full_netmap() {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (_, cred_a) = tc.register_ok(&key, 1, "hq").await;
    let old = tc.netmap(&cred_a).await;
    let (b, _) = tc.register_ok(&key, 2, "field-1").await;
    tc.netmap(&cred_a).await; // the controller now holds both snapshots

    let mut s = Sse::open(&tc, &cred_a, &format!("?since={}", old.serial)).await;
    let e = s.next().await.expect("first");
    assert!(matches!(e.event, StreamEvent::Delta(_)), "{e:?}");
    assert_eq!(peer_ids(&apply(&tc, Some(&old), &e)), vec![b]);

    // Up to date: nothing to send until something changes. (Each stream is closed before
    // the next: a node may hold only two.)
    drop(s);
    let current = tc.netmap(&cred_a).await;
    let mut s = Sse::open(&tc, &cred_a, &format!("?since={}", current.serial)).await;
    s.quiet_for(Duration::from_millis(300)).await;

    drop(s);
    // A serial the controller never issued (forged, or from before a restart) and one from
    // the future both get a full netmap, never a delta against a state the client cannot have.
    for since in [old.serial - 1, current.serial + 1000] {
        let mut s = Sse::open(&tc, &cred_a, &format!("?since={since}")).await;
        let e = s.next().await.expect("first");
        assert!(
            matches!(e.event, StreamEvent::Netmap(_)),
            "since={since}: {e:?}"
        );
        assert_eq!(apply(&tc, None, &e), current);
    }

    // The SSE standard's Last-Event-ID header works like `since`.
    let req = Request::builder()
        .uri("/api/v1/netmap/stream")
        .header(header::AUTHORIZATION, format!("Bearer {cred_a}"))
        .header("last-event-id", old.serial.to_string())
        .body(Body::empty())
        .expect("request");
    let resp = tc.app().oneshot(req).await.expect("infallible");
    let mut s = Sse {
        body: resp.into_body(),
        buf: String::new(),
    };
    assert!(matches!(
        s.next().await.expect("first").event,
        StreamEvent::Delta(_)
    ));
}

#[tokio::test]
async fn a_bad_query_or_credential_is_refused_before_streaming() {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (_, cred) = tc.register_ok(&key, 1, "hq").await;
    let r = tc
        .call(
            Method::GET,
            "/api/v1/netmap/stream?since=abc",
            Some(&cred),
            None,
        )
        .await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.text);
    let r = tc
        .call(Method::GET, "/api/v1/netmap/stream", Some("smn_nope"), None)
        .await;
    r.assert_error(401, "unauthorized");
}

#[tokio::test]
async fn revoking_a_node_closes_its_stream_refuses_it_and_removes_it_from_peers() {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (_, cred_a) = tc.register_ok(&key, 1, "hq").await;
    let (b, cred_b) = tc.register_ok(&key, 2, "field-1").await;
    let mut sa = Sse::open(&tc, &cred_a, "").await;
    let held = apply(&tc, None, &sa.next().await.expect("first"));
    assert_eq!(peer_ids(&held), vec![b]);
    let mut sb = Sse::open(&tc, &cred_b, "").await;
    apply(&tc, None, &sb.next().await.expect("first"));

    let r = tc
        .admin(Method::POST, &format!("/api/v1/nodes/{b}/revoke"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let e = sb.next().await.expect("revoked event");
    assert_eq!(e.event, StreamEvent::Revoked);
    assert_eq!(e.name, "revoked");
    assert!(sb.next().await.is_none(), "stream ends after `revoked`");
    let held = apply(&tc, Some(&held), &sa.next().await.expect("pushed"));
    assert!(held.peers.is_empty());
    let r = tc
        .call(Method::GET, "/api/v1/netmap/stream", Some(&cred_b), None)
        .await;
    r.assert_error(403, "node_revoked");
}

fn with_source(mut req: Request<Body>, from: &str) -> Request<Body> {
    let addr: SocketAddr = from.parse().expect("addr");
    req.extensions_mut().insert(ConnectInfo(addr));
    req
}

#[tokio::test]
async fn reported_endpoints_reach_peers_the_connection_source_is_no_endpoint_and_a_repeat_changes_nothing(
) {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (_, cred_a) = tc.register_ok(&key, 1, "hq").await;
    let (b, cred_b) = tc.register_ok(&key, 2, "field-1").await;
    let body = json!({"endpoints": [
        {"addr": "192.168.1.5:51820", "uplink": "starlink", "kind": "satellite"},
        {"addr": "198.18.0.2:51820", "uplink": "fibre", "kind": "terrestrial"},
    ]});
    let report = || {
        let req = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/node/endpoints")
            .header(header::AUTHORIZATION, format!("Bearer {cred_b}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        with_source(req, "198.19.40.7:40000")
    };
    let r = tc.raw(report()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let map = tc.netmap(&cred_a).await;
    let eps: Vec<(String, String)> = map.peers[0]
        .endpoints
        .iter()
        .map(|e| (e.uplink.clone(), e.addr.to_string()))
        .collect();
    assert_eq!(
        eps,
        vec![
            ("starlink".into(), "192.168.1.5:51820".into()),
            ("fibre".into(), "198.18.0.2:51820".into()),
        ],
        "the API connection's source (198.19.40.7:40000) is a TCP address, not a UDP \
         endpoint: nodes announce what STUN shows them"
    );
    let serial = map.serial;
    let r = tc.raw(report()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(tc.netmap(&cred_a).await.serial, serial, "no-op report");

    // Bad input changes nothing.
    for bad in [
        json!({"endpoints": [{"addr": "0.0.0.0:1", "uplink": "x", "kind": "cellular"}]}),
        json!({"endpoints": [], "colour": "red"}),
        json!({"endpoints": [], "routes": ["10.77.0.0/24"]}),
    ] {
        let r = tc
            .call(
                Method::POST,
                "/api/v1/node/endpoints",
                Some(&cred_b),
                Some(bad),
            )
            .await;
        r.assert_error(422, r.code());
        assert_eq!(tc.netmap(&cred_a).await.serial, serial);
    }
    let r = tc
        .admin(Method::GET, &format!("/api/v1/nodes/{b}"), None)
        .await;
    assert_eq!(r.body["seen"]["seen_from"], "198.19.40.7", "{}", r.text);
}

#[tokio::test]
async fn status_reports_show_on_the_node_with_staleness() {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (a, cred_a) = tc.register_ok(&key, 1, "hq").await;
    let (b, _) = tc.register_ok(&key, 2, "field-1").await;
    let r = tc
        .admin(Method::GET, &format!("/api/v1/nodes/{a}"), None)
        .await;
    assert_eq!(
        r.body["seen"]["status"],
        serde_json::Value::Null,
        "{}",
        r.text
    );

    let report = json!({"serial": 3, "peers": [{"node_id": b, "last_handshake": common::T0 - 5,
        "rx_bytes": 1000, "tx_bytes": 2000, "uplink": "starlink", "endpoint": "198.18.0.2:51820"}]});
    let r = tc
        .call(
            Method::POST,
            "/api/v1/node/status",
            Some(&cred_a),
            Some(report),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    tc.advance(42);
    let r = tc
        .admin(Method::GET, &format!("/api/v1/nodes/{a}"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["name"], "hq", "node fields stay at the top level");
    assert_eq!(r.body["seen"]["status"]["peers"][0]["rx_bytes"], 1000);
    assert_eq!(r.body["seen"]["status"]["peers"][0]["uplink"], "starlink");
    assert_eq!(r.body["seen"]["reported_at"], common::T0);
    assert_eq!(r.body["last_seen_secs_ago"], 42);

    let r = tc
        .call(
            Method::POST,
            "/api/v1/node/status",
            Some(&cred_a),
            Some(json!({"serial": 3, "peers": [{"node_id": b, "rx_bytes": -1, "tx_bytes": 0}]})),
        )
        .await;
    r.assert_error(422, r.code());
    let r = tc
        .admin(Method::GET, &format!("/api/v1/nodes/{a}"), None)
        .await;
    assert_eq!(
        r.body["seen"]["status"]["peers"][0]["rx_bytes"], 1000,
        "refused report changed nothing"
    );
}

#[tokio::test]
async fn rotating_a_key_updates_peers_is_audited_and_refuses_a_taken_key() {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (_, cred_a) = tc.register_ok(&key, 1, "hq").await;
    let (b, cred_b) = tc.register_ok(&key, 2, "field-1").await;
    let mut s = Sse::open(&tc, &cred_a, "").await;
    let held = apply(&tc, None, &s.next().await.expect("first"));
    assert_eq!(held.peers[0].public_key.to_string(), wg_key(2));

    let r = tc
        .call(
            Method::POST,
            "/api/v1/node/rotate-key",
            Some(&cred_b),
            Some(json!({"public_key": wg_key(99)})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let held = apply(&tc, Some(&held), &s.next().await.expect("pushed"));
    assert_eq!(held.peers[0].public_key.to_string(), wg_key(99));

    let r = tc
        .call(
            Method::POST,
            "/api/v1/node/rotate-key",
            Some(&cred_b),
            Some(json!({"public_key": wg_key(1)})),
        )
        .await;
    r.assert_error(409, "duplicate_public_key");
    let r = tc
        .call(
            Method::POST,
            "/api/v1/node/rotate-key",
            Some(&cred_b),
            Some(json!({"public_key": "not-a-key"})),
        )
        .await;
    r.assert_error(422, r.code());
    assert_eq!(
        tc.netmap(&cred_a).await.peers[0].public_key.to_string(),
        wg_key(99)
    );
    let audit = tc.admin(Method::GET, "/api/v1/audit", None).await;
    let entries = audit.body.as_array().expect("audit list");
    let rotate = entries
        .iter()
        .find(|e| e["action"] == "node.rotate_key")
        .expect("rotation audited");
    assert_eq!(rotate["actor"], format!("node:{b}"));
}

#[tokio::test]
async fn advertised_routes_reach_peers_once_approved_or_at_once_inside_a_keys_allowed_prefixes() {
    let tc = TestController::new().await;
    let key = auto_key(&tc).await;
    let (_, cred_a) = tc.register_ok(&key, 1, "hq").await;
    let (b, cred_b) = tc.register_ok(&key, 2, "embassy").await;
    let r = tc
        .call(
            Method::POST,
            "/api/v1/node/endpoints",
            Some(&cred_b),
            Some(json!({"endpoints": [], "routes": ["192.168.50.0/24"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert!(
        tc.netmap(&cred_a).await.peers[0].routes.is_empty(),
        "not yet approved"
    );
    let r = tc
        .admin(
            Method::PATCH,
            &format!("/api/v1/nodes/{b}"),
            Some(json!({"approved_routes": ["192.168.50.0/24"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let peer = tc.netmap(&cred_a).await.peers[0].clone();
    assert_eq!(peer.routes, vec!["192.168.50.0/24".parse().expect("net")]);
    assert!(peer
        .allowed_ips
        .contains(&"192.168.50.0/24".parse().expect("net")));

    // Withdrawing the advertisement withdraws the approval.
    let r = tc
        .call(
            Method::POST,
            "/api/v1/node/endpoints",
            Some(&cred_b),
            Some(json!({"endpoints": [], "routes": []})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(tc.netmap(&cred_a).await.peers[0].routes.is_empty());

    // A key approves routes at registration only inside the prefixes it names.
    let site_key = tc
        .enrollment_key(json!({"auto_approve": true, "auto_approve_routes": ["192.168.0.0/16"]}))
        .await;
    let r = tc
        .call(
            Method::POST,
            "/api/v1/register",
            None,
            Some(
                json!({"enrollment_key": site_key, "public_key": wg_key(3), "name": "site",
                "routes": ["192.168.60.0/24", "10.60.0.0/24"]}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let map = tc.netmap(&cred_a).await;
    let site = map.peers.iter().find(|p| p.name == "site").expect("site");
    assert_eq!(site.routes, vec!["192.168.60.0/24".parse().expect("net")]);
}
