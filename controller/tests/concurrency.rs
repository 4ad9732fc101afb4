//! 100 registrations at once must never produce a duplicate address or lose a use count.

mod common;

use std::collections::HashSet;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use common::{wg_key, TestController};
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hundred_concurrent_registrations_get_distinct_addresses() {
    let c = TestController::new().await;
    // 100 uses for 110 attempts: exactly 100 must succeed, and the key's counter must agree.
    let key = c
        .enrollment_key(json!({"reusable": true, "max_uses": 100, "auto_approve": true}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..110u32 {
        let app = c.app();
        let body = json!({"enrollment_key": key, "public_key": wg_key(i), "name": format!("n{i}")});
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri("/api/v1/register")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .expect("req");
            let resp = app.oneshot(req).await.expect("infallible");
            let status = resp.status();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&bytes).expect("json"),
            )
        }));
    }
    let mut v4 = HashSet::new();
    let mut v6 = HashSet::new();
    let mut ids = HashSet::new();
    let mut refused = 0;
    for t in tasks {
        let (status, body) = t.await.expect("task");
        match status {
            StatusCode::CREATED => {
                let addrs = body["addresses"].as_array().expect("addresses");
                assert!(
                    v4.insert(addrs[0].as_str().expect("v4").to_owned()),
                    "dup v4 {body}"
                );
                assert!(
                    v6.insert(addrs[1].as_str().expect("v6").to_owned()),
                    "dup v6 {body}"
                );
                assert!(ids.insert(body["node_id"].as_u64().expect("id")));
            }
            StatusCode::FORBIDDEN => {
                assert_eq!(body["error"]["code"], "enrollment_key_used_up");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((v4.len(), refused), (100, 10));
    let keys = c.admin(Method::GET, "/api/v1/enrollment-keys", None).await;
    assert_eq!(keys.body[0]["uses"], 100);
    // Addresses are exactly hosts 1..=100: dense, no gaps from the refused attempts.
    let expected: HashSet<String> = (1..=100u32)
        .map(|i| format!("10.77.{}.{}/16", i / 256, i % 256))
        .collect();
    assert_eq!(v4, expected);
    let v = c.admin(Method::GET, "/api/v1/audit/verify", None).await;
    assert_eq!(v.body["ok"], true, "{}", v.text);
}
