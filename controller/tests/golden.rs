//! Golden netmaps: a fixed scenario driven through the API must produce byte-identical netmap
//! payloads, checked into `tests/golden/`. Regenerate with `SKYMESH_BLESS=1 cargo test --test golden`
//! and review the diff.

mod common;

use std::path::PathBuf;

use axum::http::{Method, StatusCode};
use common::{wg_key, TestController};
use serde_json::json;
use skymesh_controller::policy::{PolicyConfig, Rule};

fn rule(from: &str, to: &str) -> Rule {
    Rule {
        from: vec![from.into()],
        to: vec![to.into()],
    }
}

#[tokio::test]
async fn netmaps_match_the_golden_files() {
    let c = TestController::with_config(|cfg| {
        cfg.policy = PolicyConfig {
            rules: vec![rule("hq", "*"), rule("embassy", "embassy")],
        };
    })
    .await;
    let hq_key = c
        .enrollment_key(json!({"auto_approve": true, "tags": ["hq"]}))
        .await;
    let field_key = c
        .enrollment_key(json!({"reusable": true, "auto_approve": true, "tags": ["field"]}))
        .await;
    let manual_key = c
        .enrollment_key(json!({"reusable": true, "tags": ["embassy"]}))
        .await;

    let register = |key: &str, i: u32, name: &str, extra: serde_json::Value| {
        let mut body = json!({"enrollment_key": key, "public_key": wg_key(i), "name": name});
        if let Some(o) = extra.as_object() {
            for (k, v) in o {
                body[k] = v.clone();
            }
        }
        let c = &c;
        async move {
            let r = c
                .call(Method::POST, "/api/v1/register", None, Some(body))
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
            (
                r.body["node_id"].as_u64().expect("id"),
                r.body["credential"].as_str().expect("cred").to_owned(),
            )
        }
    };
    let (_, hq) = register(
        &hq_key,
        1,
        "hq",
        json!({"endpoints": [
        {"addr": "198.18.0.10:51820", "uplink": "fibre", "kind": "terrestrial"},
        {"addr": "[fd00:198:18::10]:51820", "uplink": "fibre", "kind": "terrestrial"}]}),
    )
    .await;
    let (_, field1) = register(
        &field_key,
        2,
        "field-1",
        json!({"endpoints": [
        {"addr": "198.18.1.2:51820", "uplink": "starlink", "kind": "satellite"},
        {"addr": "198.18.2.2:51820", "uplink": "lte", "kind": "cellular"}]}),
    )
    .await;
    register(&field_key, 3, "field-2", json!({})).await;
    let (emb1_id, emb1) = register(
        &manual_key,
        4,
        "embassy-1",
        json!({
        "routes": ["192.168.50.0/24", "fd00:50::/64"],
        "endpoints": [{"addr": "198.18.3.4:51820", "uplink": "local-isp", "kind": "terrestrial"}]}),
    )
    .await;
    let (emb2_id, _) = register(&manual_key, 5, "embassy-2", json!({})).await;
    let (emb3_id, _) = register(&manual_key, 6, "embassy-3", json!({})).await;
    let (_, pending) = register(&manual_key, 7, "embassy-pending", json!({})).await;

    for (id, body) in [
        (
            emb1_id,
            json!({"approve": true, "approved_routes": ["192.168.50.0/24"]}),
        ),
        (emb2_id, json!({"approve": true})),
        (emb3_id, json!({"approve": true})),
    ] {
        let r = c
            .admin(Method::PATCH, &format!("/api/v1/nodes/{id}"), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    c.admin(
        Method::POST,
        &format!("/api/v1/nodes/{emb3_id}/revoke"),
        None,
    )
    .await;

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("SKYMESH_BLESS").is_some();
    for (name, cred) in [
        ("hq", &hq),
        ("field-1", &field1),
        ("embassy-1", &emb1),
        ("embassy-pending", &pending),
    ] {
        let map = c.netmap(cred).await;
        let got = serde_json::to_string_pretty(&map).expect("json") + "\n";
        let path = dir.join(format!("netmap-{name}.json"));
        if bless {
            std::fs::write(&path, &got).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with SKYMESH_BLESS=1 to create)",
                path.display()
            )
        });
        assert_eq!(
            got,
            want,
            "netmap for {name} differs from {}",
            path.display()
        );
    }
    // Determinism: the signed payload is identical across requests at the same serial.
    let r1 = c.call(Method::GET, "/api/v1/netmap", Some(&hq), None).await;
    let r2 = c.call(Method::GET, "/api/v1/netmap", Some(&hq), None).await;
    assert_eq!(r1.body["payload"], r2.body["payload"]);
}
