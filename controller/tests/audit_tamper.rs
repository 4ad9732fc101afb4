//! Editing or deleting audit rows behind the controller's back is detected, both by the API
//! and by the `audit verify` command.

mod common;

use std::process::Command;

use axum::http::Method;
use common::TestController;
use serde_json::json;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::ConnectOptions as _;

async fn tamper(c: &TestController, sql: &str) {
    let mut conn = SqliteConnectOptions::new()
        .filename(c.config.data_dir.join(skymesh_controller::store::DB_FILE))
        .connect()
        .await
        .expect("raw connection");
    let done = sqlx::query(sql).execute(&mut conn).await.expect("tamper");
    assert_eq!(done.rows_affected(), 1, "{sql}");
}

fn cli_verify(c: &TestController) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skymesh-controller"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&c.config.data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run audit verify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

async fn populated() -> TestController {
    let c = TestController::new().await;
    let key = c.enrollment_key(json!({"reusable": true})).await;
    let (id, _) = c.register_ok(&key, 1, "n").await;
    c.admin(
        Method::PATCH,
        &format!("/api/v1/nodes/{id}"),
        Some(json!({"approve": true})),
    )
    .await;
    c.register_ok(&key, 2, "m").await;
    let v = c.admin(Method::GET, "/api/v1/audit/verify", None).await;
    assert_eq!(v.body["ok"], true, "{}", v.text);
    let (ok, out) = cli_verify(&c);
    assert!(ok, "{out}");
    c
}

#[tokio::test]
async fn editing_an_old_entry_is_detected() {
    let c = populated().await;
    tamper(
        &c,
        "UPDATE audit_log SET actor = 'admin-token:99' WHERE seq = 4",
    )
    .await;
    let v = c.admin(Method::GET, "/api/v1/audit/verify", None).await;
    assert_eq!(v.body["ok"], false, "{}", v.text);
    assert!(v.text.contains("entry 4"), "{}", v.text);
    let (ok, out) = cli_verify(&c);
    assert!(!ok && out.contains("BROKEN"), "{out}");
}

#[tokio::test]
async fn deleting_an_entry_is_detected() {
    let c = populated().await;
    tamper(&c, "DELETE FROM audit_log WHERE seq = 2").await;
    let v = c.admin(Method::GET, "/api/v1/audit/verify", None).await;
    assert_eq!(v.body["ok"], false);
    assert!(v.text.contains("deleted"), "{}", v.text);
    assert!(!cli_verify(&c).0);
}

#[tokio::test]
async fn rewriting_an_entry_with_a_fresh_hash_is_detected_at_the_next_link() {
    let c = populated().await;
    tamper(
        &c,
        "UPDATE audit_log SET detail = '{}', hash = lower(hex(randomblob(32))) WHERE seq = 3",
    )
    .await;
    let v = c.admin(Method::GET, "/api/v1/audit/verify", None).await;
    assert_eq!(v.body["ok"], false, "{}", v.text);
}
