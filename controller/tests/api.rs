//! API behaviour against a real SQLite database in a temp dir, via `app(state).oneshot(..)`.

mod common;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use common::{wg_key, TestController};
use serde_json::{json, Value};
use skymesh_controller::policy::{PolicyConfig, Rule};
use skymesh_controller::store::{Actor, Scope};

/// Counts of nodes and audit entries: "nothing half-written" means these do not move.
async fn footprint(c: &TestController) -> (usize, usize, u64) {
    let nodes = c.admin(Method::GET, "/api/v1/nodes", None).await;
    let audit = c.admin(Method::GET, "/api/v1/audit?limit=1000", None).await;
    let serial = c.state.store.serial().await.expect("serial");
    (
        nodes.body.as_array().expect("nodes").len(),
        audit.body.as_array().expect("audit").len(),
        serial,
    )
}

#[tokio::test]
async fn malformed_registration_bodies_get_4xx_json_errors_and_change_nothing() {
    let c = TestController::new().await;
    let key = c.enrollment_key(json!({"reusable": true})).await;
    let before = footprint(&c).await;

    let raw = |body: &str, content_type: Option<&str>| {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/register");
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        b.body(Body::from(body.to_owned())).expect("request")
    };
    c.raw(raw("{\"enrollment_key\": ", Some("application/json")))
        .await
        .assert_error(400, "malformed_json");
    c.raw(raw("not json at all", Some("application/json")))
        .await
        .assert_error(400, "malformed_json");
    c.raw(raw("{}", None))
        .await
        .assert_error(415, "unsupported_media_type");

    let good = json!({"enrollment_key": key, "public_key": wg_key(1), "name": "a"});
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    for (what, body, needle) in [
        ("wrong type", with("name", json!(5)), "name"),
        ("unknown field", with("colour", json!("red")), "colour"),
        (
            "bad base64 key",
            with("public_key", json!("%%%not-base64%%%")),
            "public_key",
        ),
        ("short key", with("public_key", json!("AAAA")), "32"),
        (
            "missing field",
            json!({"enrollment_key": key, "name": "a"}),
            "public_key",
        ),
        (
            "endpoints not a list",
            with("endpoints", json!("sat")),
            "endpoints",
        ),
        (
            "bad endpoint addr",
            with(
                "endpoints",
                json!([{"addr": "x", "uplink": "s", "kind": "satellite"}]),
            ),
            "addr",
        ),
    ] {
        let r = c
            .call(Method::POST, "/api/v1/register", None, Some(body))
            .await;
        r.assert_error(422, "invalid_body");
        assert!(r.text.contains(needle), "{what}: {}", r.text);
    }
    // A number where an enum name belongs: serde_json reports it as a syntax error (400).
    let r = c
        .call(
            Method::POST,
            "/api/v1/register",
            None,
            Some(with(
                "endpoints",
                json!([{"addr": "198.18.0.1:1", "uplink": "s", "kind": 3}]),
            )),
        )
        .await;
    assert!(
        r.status.is_client_error() && r.text.contains("kind"),
        "{}",
        r.text
    );
    for (what, body) in [
        ("empty name", with("name", json!(""))),
        ("control chars in name", with("name", json!("a\u{7}b"))),
        (
            "route with host bits",
            with("routes", json!(["192.168.1.1/24"])),
        ),
        (
            "route overlapping overlay",
            with("routes", json!(["10.77.5.0/24"])),
        ),
        ("default route", with("routes", json!(["0.0.0.0/0"]))),
        (
            "unspecified endpoint",
            with(
                "endpoints",
                json!([{"addr": "0.0.0.0:51820", "uplink": "s", "kind": "satellite"}]),
            ),
        ),
    ] {
        let r = c
            .call(Method::POST, "/api/v1/register", None, Some(body))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}: {}",
            r.text
        );
        assert_eq!(r.code(), "invalid_body", "{what}");
    }

    let huge = json!({"enrollment_key": key, "public_key": wg_key(1), "name": "a".repeat(100_000)});
    c.call(Method::POST, "/api/v1/register", None, Some(huge))
        .await
        .assert_error(413, "body_too_large");

    assert_eq!(
        footprint(&c).await,
        before,
        "failed requests must not write anything"
    );
    // The key is still usable: none of the failures consumed it.
    c.register_ok(&key, 1, "a").await;
}

#[tokio::test]
async fn enrollment_key_limits_are_enforced_without_consuming_uses_on_failure() {
    let c = TestController::new().await;

    c.register("sme_nonexistent", 1, "x")
        .await
        .assert_error(401, "invalid_enrollment_key");

    let one_off = c.enrollment_key(json!({})).await;
    c.register_ok(&one_off, 1, "first").await;
    c.register(&one_off, 2, "second")
        .await
        .assert_error(403, "enrollment_key_used_up");

    let two_uses = c
        .enrollment_key(json!({"reusable": true, "max_uses": 2}))
        .await;
    c.register_ok(&two_uses, 3, "a").await;
    c.register(&two_uses, 3, "dup")
        .await
        .assert_error(409, "duplicate_public_key");
    c.register(&two_uses, 1, "dup-of-other-key-node")
        .await
        .assert_error(409, "duplicate_public_key");
    // The duplicate attempts did not use up the second use.
    c.register_ok(&two_uses, 4, "b").await;
    c.register(&two_uses, 5, "c")
        .await
        .assert_error(403, "enrollment_key_used_up");

    let expiring = c
        .enrollment_key(json!({"reusable": true, "expires_in_secs": 60}))
        .await;
    c.advance(59);
    c.register_ok(&expiring, 6, "in-time").await;
    c.advance(1);
    c.register(&expiring, 7, "late")
        .await
        .assert_error(403, "enrollment_key_expired");

    let revoked = c.enrollment_key(json!({"reusable": true})).await;
    let keys = c.admin(Method::GET, "/api/v1/enrollment-keys", None).await;
    let id = keys.body.as_array().expect("list").last().expect("key")["id"]
        .as_u64()
        .expect("id");
    assert!(!keys.text.contains(&revoked), "secrets are never listed");
    let r = c
        .admin(
            Method::DELETE,
            &format!("/api/v1/enrollment-keys/{id}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.body["revoked_at"].is_u64());
    c.register(&revoked, 8, "x")
        .await
        .assert_error(403, "enrollment_key_revoked");
    c.admin(Method::DELETE, "/api/v1/enrollment-keys/999", None)
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn enrollment_key_settings_are_validated() {
    let c = TestController::new().await;
    for bad in [
        json!({"reusable": false, "max_uses": 3}),
        json!({"reusable": true, "max_uses": 0}),
        json!({"expires_in_secs": 0}),
        json!({"tags": ["Not Valid"]}),
        json!({"node_ttl_secs": 0}),
    ] {
        let r = c
            .admin(Method::POST, "/api/v1/enrollment-keys", Some(bad.clone()))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            r.text
        );
    }
    c.admin(
        Method::POST,
        "/api/v1/enrollment-keys",
        Some(json!({"max_usez": 1})),
    )
    .await
    .assert_error(422, "invalid_body");
    let r = c
        .admin(
            Method::POST,
            "/api/v1/enrollment-keys",
            Some(
                json!({"reusable": true, "max_uses": 5, "tags": ["field", "field", "a"],
                        "auto_approve": true, "description": "field units"}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert!(r.body["key"].as_str().expect("key").starts_with("sme_"));
    assert_eq!(r.body["tags"], json!(["a", "field"]));
    assert_eq!(r.body["max_uses"], json!(5));
    // A reusable key without `max_uses` is finite too: a leaked key cannot drain the pool.
    let r = c
        .admin(
            Method::POST,
            "/api/v1/enrollment-keys",
            Some(json!({"reusable": true})),
        )
        .await;
    assert_eq!(r.body["max_uses"], json!(100), "{}", r.text);
}

#[tokio::test]
async fn tokens_are_checked_and_read_only_tokens_cannot_write() {
    let c = TestController::new().await;
    c.call(Method::GET, "/api/v1/nodes", None, None)
        .await
        .assert_error(401, "unauthorized");
    c.call(Method::GET, "/api/v1/nodes", Some("sma_wrong"), None)
        .await
        .assert_error(401, "unauthorized");
    let r = c
        .raw(
            Request::builder()
                .uri("/api/v1/nodes")
                .header(header::AUTHORIZATION, "Basic Zm9vOmJhcg==")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
    r.assert_error(401, "unauthorized");

    let (_, ro) = c
        .state
        .store
        .create_admin_token(&Actor("test".into()), Scope::ReadOnly, None, common::T0)
        .await
        .expect("ro token");
    let r = c.call(Method::GET, "/api/v1/nodes", Some(&ro), None).await;
    assert_eq!(r.status, StatusCode::OK);
    c.call(
        Method::POST,
        "/api/v1/enrollment-keys",
        Some(&ro),
        Some(json!({})),
    )
    .await
    .assert_error(403, "read_only_token");

    // A node credential is not an admin token, and an admin token is not a node credential.
    let key = c.enrollment_key(json!({})).await;
    let (_, cred) = c.register_ok(&key, 1, "n").await;
    c.call(Method::GET, "/api/v1/nodes", Some(&cred), None)
        .await
        .assert_error(401, "unauthorized");
    c.call(Method::GET, "/api/v1/netmap", Some(&c.admin.clone()), None)
        .await
        .assert_error(401, "unauthorized");
    c.call(Method::GET, "/api/v1/netmap", Some("smn_forged"), None)
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn pending_nodes_get_no_peers_until_approved_and_revoked_nodes_are_cut_off() {
    let c = TestController::new().await;
    let auto = c
        .enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await;
    let manual = c.enrollment_key(json!({"reusable": true})).await;
    let (a, cred_a) = c.register_ok(&auto, 1, "a").await;
    let (b, cred_b) = c.register_ok(&auto, 2, "b").await;
    let r = c.register(&manual, 3, "p").await;
    assert_eq!(r.body["state"], "pending");
    let p = r.body["node_id"].as_u64().expect("id");
    let cred_p = r.body["credential"].as_str().expect("cred").to_owned();

    let ids = |m: &skymesh_proto::NetMap| m.peers.iter().map(|p| p.node_id.0).collect::<Vec<_>>();
    let m_a = c.netmap(&cred_a).await;
    assert_eq!(ids(&m_a), vec![b]);
    assert!(
        c.netmap(&cred_p).await.peers.is_empty(),
        "pending: no peers"
    );

    let r = c
        .admin(
            Method::PATCH,
            &format!("/api/v1/nodes/{p}"),
            Some(json!({"approve": true})),
        )
        .await;
    assert_eq!(r.body["state"], "approved", "{}", r.text);
    let m_a2 = c.netmap(&cred_a).await;
    assert!(m_a2.serial > m_a.serial, "approval moves the serial");
    assert_eq!(ids(&m_a2), vec![b, p]);
    assert_eq!(ids(&c.netmap(&cred_p).await), vec![a, b]);

    let r = c
        .admin(Method::POST, &format!("/api/v1/nodes/{b}/revoke"), None)
        .await;
    assert_eq!(r.body["state"], "revoked", "{}", r.text);
    let m_a3 = c.netmap(&cred_a).await;
    assert!(m_a3.serial > m_a2.serial);
    assert_eq!(ids(&m_a3), vec![p]);
    c.call(Method::GET, "/api/v1/netmap", Some(&cred_b), None)
        .await
        .assert_error(403, "node_revoked");
    // A revoked node's key stays blocked and it cannot be edited back to life.
    c.register(&auto, 2, "b-again")
        .await
        .assert_error(409, "duplicate_public_key");
    c.admin(
        Method::PATCH,
        &format!("/api/v1/nodes/{b}"),
        Some(json!({"approve": true})),
    )
    .await
    .assert_error(409, "node_revoked");
}

#[tokio::test]
async fn addresses_of_revoked_and_deleted_nodes_are_never_reused() {
    let c = TestController::new().await;
    let key = c
        .enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await;
    let (a, _) = c.register_ok(&key, 1, "a").await;
    let (b, _) = c.register_ok(&key, 2, "b").await;
    c.admin(Method::POST, &format!("/api/v1/nodes/{a}/revoke"), None)
        .await;
    let r = c
        .admin(Method::DELETE, &format!("/api/v1/nodes/{b}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    c.admin(Method::GET, &format!("/api/v1/nodes/{b}"), None)
        .await
        .assert_error(404, "not_found");
    c.admin(Method::DELETE, &format!("/api/v1/nodes/{b}"), None)
        .await
        .assert_error(404, "not_found");
    // The deleted node's key may register again, but gets a fresh id and fresh addresses.
    let r = c.register(&key, 2, "b2").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["node_id"], json!(3));
    assert_eq!(
        r.body["addresses"],
        json!(["10.77.0.3/16", "fd7a:5c3e:77::3/64"])
    );
}

#[tokio::test]
async fn node_patch_validates_and_applies_tags_routes_and_expiry() {
    let c = TestController::with_config(|cfg| {
        cfg.policy = PolicyConfig {
            rules: vec![Rule {
                from: vec!["hq".into()],
                to: vec!["embassy".into()],
            }],
        };
    })
    .await;
    let key = c
        .enrollment_key(json!({"reusable": true, "auto_approve": true}))
        .await;
    let (hq, cred_hq) = c.register_ok(&key, 1, "hq").await;
    let r = c
        .call(
            Method::POST,
            "/api/v1/register",
            None,
            Some(json!({"enrollment_key": key, "public_key": wg_key(2), "name": "embassy",
                        "routes": ["192.168.50.0/24"],
                        "endpoints": [{"addr": "198.18.2.1:51820", "uplink": "sat", "kind": "satellite"},
                                      {"addr": "198.18.3.1:51820", "uplink": "fibre", "kind": "terrestrial"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let emb = r.body["node_id"].as_u64().expect("id");
    assert!(
        c.netmap(&cred_hq).await.peers.is_empty(),
        "untagged: policy hides them"
    );

    let patch = |id: u64, body: Value| {
        let c = &c;
        async move {
            c.admin(Method::PATCH, &format!("/api/v1/nodes/{id}"), Some(body))
                .await
        }
    };
    patch(emb, json!({"approve": false}))
        .await
        .assert_error(422, "invalid_body");
    patch(emb, json!({"approved_routes": ["10.9.0.0/16"]}))
        .await
        .assert_error(422, "invalid_body");
    patch(emb, json!({"tags": ["BAD TAG"]}))
        .await
        .assert_error(422, "invalid_body");
    patch(emb, json!({"nmae": "typo"}))
        .await
        .assert_error(422, "invalid_body");
    patch(999, json!({"name": "x"}))
        .await
        .assert_error(404, "not_found");
    c.admin(Method::PATCH, "/api/v1/nodes/abc", Some(json!({})))
        .await
        .assert_error(400, "invalid_path");

    let r = patch(hq, json!({"tags": ["hq"]})).await;
    assert_eq!(r.body["tags"], json!(["hq"]), "{}", r.text);
    let r = patch(
        emb,
        json!({"tags": ["embassy"], "approved_routes": ["192.168.50.0/24"], "name": "embassy-1"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let m = c.netmap(&cred_hq).await;
    assert_eq!(m.peers.len(), 1);
    let peer = &m.peers[0];
    assert_eq!(peer.name, "embassy-1");
    assert_eq!(
        peer.allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>(),
        vec!["10.77.0.2/32", "fd7a:5c3e:77::2/128", "192.168.50.0/24"]
    );
    assert_eq!(peer.endpoints.len(), 2);
    assert_eq!(peer.endpoints[0].uplink, "sat");
    assert_eq!(
        peer.endpoints[1].kind,
        skymesh_proto::UplinkKind::Terrestrial
    );

    // Expiry: set by the admin, enforced on the node's credential and on its peers' maps.
    let r = patch(emb, json!({"expires_at": common::T0 + 100})).await;
    assert_eq!(r.body["expires_at"], json!(common::T0 + 100), "{}", r.text);
    c.advance(100);
    assert!(
        c.netmap(&cred_hq).await.peers.is_empty(),
        "expired peer is gone"
    );
    let r = patch(emb, json!({"expires_at": null})).await;
    assert_eq!(r.body["expires_at"], Value::Null, "{}", r.text);
    assert_eq!(c.netmap(&cred_hq).await.peers.len(), 1);

    let serial = c.state.store.serial().await.expect("serial");
    let r = patch(hq, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        c.state.store.serial().await.expect("serial"),
        serial,
        "empty patch writes nothing"
    );
}

#[tokio::test]
async fn nodes_from_a_key_with_a_ttl_expire_and_are_refused() {
    let c = TestController::new().await;
    let key = c
        .enrollment_key(json!({"reusable": true, "auto_approve": true, "node_ttl_secs": 3600}))
        .await;
    let (_, cred) = c.register_ok(&key, 1, "temp").await;
    assert_eq!(
        c.netmap(&cred).await.node.expires_at,
        Some(common::T0 + 3600)
    );
    let permanent = c.enrollment_key(json!({"auto_approve": true})).await;
    let (_, other) = c.register_ok(&permanent, 2, "other").await;
    assert_eq!(c.netmap(&other).await.peers.len(), 1);
    assert!(c
        .state
        .store
        .sweep_expired(common::T0 + 3599)
        .await
        .expect("sweep")
        .is_empty());
    c.advance(3600);
    c.call(Method::GET, "/api/v1/netmap", Some(&cred), None)
        .await
        .assert_error(403, "node_expired");
    // Expiry moves the serial (once), so agents syncing by serial see the peer leave.
    let before = c.netmap(&other).await;
    let expired = c
        .state
        .store
        .sweep_expired(common::T0 + 3600)
        .await
        .expect("sweep");
    assert_eq!(expired.iter().map(|n| n.0).collect::<Vec<_>>(), vec![1]);
    assert!(c
        .state
        .store
        .sweep_expired(common::T0 + 3601)
        .await
        .expect("sweep")
        .is_empty());
    let after = c.netmap(&other).await;
    assert_eq!(after.serial, before.serial + 1);
    assert!(after.peers.is_empty() && before.peers.is_empty());
    let log = c.admin(Method::GET, "/api/v1/audit", None).await;
    assert!(log.text.contains("\"node.expire\""), "{}", log.text);
}

#[tokio::test]
async fn netmaps_are_signed_by_the_key_returned_at_registration() {
    let c = TestController::new().await;
    let key = c.enrollment_key(json!({"auto_approve": true})).await;
    let r = c.register(&key, 1, "n").await;
    let pinned: skymesh_proto::ControllerPublicKey =
        serde_json::from_value(r.body["controller_public_key"].clone()).expect("key");
    let cred = r.body["credential"].as_str().expect("cred");
    let resp = c
        .call(Method::GET, "/api/v1/netmap", Some(cred), None)
        .await;
    let signed: skymesh_proto::SignedNetMap = serde_json::from_value(resp.body).expect("signed");
    let map = signed
        .verify(&pinned.0)
        .expect("verifies with the pinned key");
    assert_eq!(map.node.addresses[0].to_string(), "10.77.0.1/16");
    let other = skymesh_proto::SigningKey::from_bytes(&[9; 32]);
    assert!(signed.verify(&other.verifying_key()).is_err());
    let mut tampered = signed.clone();
    tampered.payload = tampered.payload.replace("10.77.0.1", "10.77.0.9");
    assert!(tampered.verify(&pinned.0).is_err());
}

#[tokio::test]
async fn every_route_is_in_the_openapi_31_document() {
    let c = TestController::new().await;
    let r = c
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.body;
    assert!(
        doc["openapi"].as_str().expect("version").starts_with("3.1"),
        "{}",
        doc["openapi"]
    );

    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    // The required endpoints are all documented...
    for (m, p) in [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/openapi.json"),
        ("POST", "/api/v1/enrollment-keys"),
        ("GET", "/api/v1/enrollment-keys"),
        ("DELETE", "/api/v1/enrollment-keys/{id}"),
        ("POST", "/api/v1/register"),
        ("GET", "/api/v1/nodes"),
        ("GET", "/api/v1/nodes/{id}"),
        ("PATCH", "/api/v1/nodes/{id}"),
        ("DELETE", "/api/v1/nodes/{id}"),
        ("POST", "/api/v1/nodes/{id}/revoke"),
        ("GET", "/api/v1/netmap"),
        ("GET", "/api/v1/audit"),
        ("GET", "/api/v1/audit/verify"),
    ] {
        assert!(
            documented.contains(&(m.to_owned(), p.to_owned())),
            "{m} {p} missing from the OpenAPI document"
        );
    }
    // The signed netmap's payload format is documented too.
    for schema in [
        "NetMap",
        "SelfNode",
        "PeerEntry",
        "SignedNetMap",
        "ErrorBody",
        // What HQ sees of a node's failover (issue 5).
        "NodeDetail",
        "StatusReport",
        "PathReport",
        "UplinkReport",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} missing"
        );
    }
    // ...every documented operation is served by the router (routes are registered through
    // utoipa-axum, so the router cannot hold an undocumented route)...
    for (m, p) in &documented {
        let path = p.replace("{id}", "1");
        let method = Method::from_bytes(m.as_bytes()).expect("method");
        let r = c.call(method, &path, None, None).await;
        assert!(
            !matches!(r.code(), "route_not_found" | "method_not_allowed"),
            "{m} {p} is documented but not routed: {}",
            r.text
        );
    }
    // ...and undocumented paths/methods are not routed.
    c.call(Method::GET, "/api/v1/secret", None, None)
        .await
        .assert_error(404, "route_not_found");
    c.call(Method::PUT, "/api/v1/register", None, None)
        .await
        .assert_error(405, "method_not_allowed");
}

#[tokio::test]
async fn audit_log_records_admin_changes_and_verifies() {
    let c = TestController::new().await;
    let key = c.enrollment_key(json!({"auto_approve": false})).await;
    let (id, _) = c.register_ok(&key, 1, "n").await;
    c.admin(
        Method::PATCH,
        &format!("/api/v1/nodes/{id}"),
        Some(json!({"approve": true})),
    )
    .await;
    let log = c.admin(Method::GET, "/api/v1/audit", None).await;
    let actions: Vec<&str> = log
        .body
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(
        actions,
        [
            "admin_token.create",
            "enrollment_key.create",
            "node.register",
            "node.update"
        ]
    );
    let e = &log.body[3];
    assert_eq!(e["actor"], "admin-token:1");
    assert_eq!(e["target"], format!("node:{id}"));
    assert_eq!(e["at"], json!(common::T0));
    let page = c
        .admin(Method::GET, "/api/v1/audit?after=2&limit=1", None)
        .await;
    assert_eq!(page.body.as_array().expect("page").len(), 1);
    assert_eq!(page.body[0]["seq"], 3);
    c.admin(Method::GET, "/api/v1/audit?limit=0", None)
        .await
        .assert_error(400, "invalid_query");
    c.admin(Method::GET, "/api/v1/audit?after=-1", None)
        .await
        .assert_error(400, "invalid_query");
    let v = c.admin(Method::GET, "/api/v1/audit/verify", None).await;
    assert_eq!(v.body["ok"], true, "{}", v.text);
    assert_eq!(v.body["head"]["entries"], 4);
}

#[tokio::test]
async fn healthz_and_metrics_report_state_and_metrics_need_a_token() {
    let c = TestController::new().await;
    let key = c.enrollment_key(json!({"auto_approve": true})).await;
    let (n, _) = c.register_ok(&key, 1, "n").await;
    c.register(&key, 2, "m").await; // refused: one-off key used up
                                    // Per-node last contact, each node's own: "p" registers 7 s after "n".
    let key2 = c.enrollment_key(json!({"auto_approve": true})).await;
    c.advance(7);
    let (p, _) = c.register_ok(&key2, 3, "p").await;
    c.advance(2);
    let h = c.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(h.body["status"], "ok");
    // Metrics name nodes, peers and carrier addresses: a token is needed, read-only will do.
    c.call(Method::GET, "/metrics", None, None)
        .await
        .assert_error(401, "unauthorized");
    let (_, auditor) = c
        .state
        .store
        .create_admin_token(&Actor("test".into()), Scope::ReadOnly, None, common::T0)
        .await
        .expect("read-only token");
    let m = c.call(Method::GET, "/metrics", Some(&auditor), None).await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text);
    for line in [
        "skymesh_registrations_total 2".to_owned(),
        "skymesh_registrations_refused_total 1".to_owned(),
        "skymesh_nodes{state=\"approved\"} 2".to_owned(),
        "skymesh_topology_serial 3".to_owned(),
        format!("skymesh_node_last_seen_age_seconds{{node=\"{n}\",name=\"n\"}} 9"),
        format!("skymesh_node_last_seen_age_seconds{{node=\"{p}\",name=\"p\"}} 2"),
    ] {
        assert!(
            m.text.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            m.text
        );
    }
}

#[tokio::test]
async fn admin_tokens_expire_are_listed_and_revoked_and_every_change_is_audited() {
    let c = TestController::new().await;
    let create = |body: Value| {
        let c = &c;
        async move {
            c.admin(Method::POST, "/api/v1/admin-tokens", Some(body))
                .await
        }
    };
    let r = create(json!({"scope": "read_only", "expires_in_secs": 60})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let short = r.body["token"].as_str().expect("token").to_owned();
    let short_id = r.body["id"].as_u64().expect("id");
    assert_eq!(r.body["expires_at"], json!(common::T0 + 60));
    let r = create(json!({"scope": "admin"})).await;
    let second = r.body["token"].as_str().expect("token").to_owned();
    let second_id = r.body["id"].as_u64().expect("id");
    create(json!({"scope": "admin", "expires_in_secs": 0}))
        .await
        .assert_error(422, "invalid_body");
    create(json!({"scope": "root"}))
        .await
        .assert_error(422, "invalid_body");
    // A read-only token cannot mint tokens.
    c.call(
        Method::POST,
        "/api/v1/admin-tokens",
        Some(&short),
        Some(json!({"scope": "admin"})),
    )
    .await
    .assert_error(403, "read_only_token");

    let list = c.admin(Method::GET, "/api/v1/admin-tokens", None).await;
    assert_eq!(
        list.body.as_array().expect("list").len(),
        3,
        "{}",
        list.text
    );
    assert!(!list.text.contains("sma_"), "secrets are never listed");

    // Expiry: accepted until the second it expires.
    c.advance(59);
    let ok = c
        .call(Method::GET, "/api/v1/nodes", Some(&short), None)
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    c.advance(1);
    c.call(Method::GET, "/api/v1/nodes", Some(&short), None)
        .await
        .assert_error(401, "unauthorized");

    // Revocation: refused at once; revoking again is harmless; unknown ids are 404.
    let r = c
        .admin(
            Method::DELETE,
            &format!("/api/v1/admin-tokens/{second_id}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["revoked_at"], json!(common::T0 + 60));
    c.call(Method::GET, "/api/v1/nodes", Some(&second), None)
        .await
        .assert_error(401, "unauthorized");
    c.admin(Method::DELETE, "/api/v1/admin-tokens/999", None)
        .await
        .assert_error(404, "not_found");

    let audit = c.admin(Method::GET, "/api/v1/audit?limit=1000", None).await;
    let actions: Vec<_> = audit
        .body
        .as_array()
        .expect("audit")
        .iter()
        .map(|e| (e["action"].clone(), e["target"].clone()))
        .collect();
    for (action, id) in [
        ("admin_token.create", short_id),
        ("admin_token.create", second_id),
        ("admin_token.revoke", second_id),
    ] {
        let target = json!(format!("admin-token:{id}"));
        assert!(
            actions.contains(&(json!(action), target)),
            "{action} {id} not in {actions:?}"
        );
    }
}
