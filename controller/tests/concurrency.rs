//! 100 registrations at once must never produce a duplicate address or lose a use count.

mod common;

use axum::http::Method;
use common::TestController;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hundred_concurrent_registrations_get_distinct_addresses() {
    let c = TestController::new().await;
    // 100 uses for 110 attempts: exactly 100 must succeed, and the key's counter must agree.
    let key = c
        .enrollment_key(json!({"reusable": true, "max_uses": 100, "auto_approve": true}))
        .await;
    common::race_registrations_for_100_uses(&[c.app()], &key).await;
    let keys = c.admin(Method::GET, "/api/v1/enrollment-keys", None).await;
    assert_eq!(keys.body[0]["uses"], 100);
    let v = c.admin(Method::GET, "/api/v1/audit/verify", None).await;
    assert_eq!(v.body["ok"], true, "{}", v.text);
}
