//! Subnet-route hijack: a node may not advertise, and an admin or an enrollment key may not
//! approve, a route that equals, contains or sits inside another node's route, covers the
//! controller or an announced endpoint, or exceeds the per-node size limit. Runs on SQLite,
//! or on PostgreSQL with `SKYMESH_TEST_DATABASE=postgres`.

mod common;

use axum::http::{Method, StatusCode};
use common::{wg_key, Resp, TestController};
use ipnet::IpNet;
use proptest::prelude::*;
use serde_json::{json, Value};

async fn register(c: &TestController, key: &str, i: u32, name: &str, extra: Value) -> Resp {
    let mut body = json!({"enrollment_key": key, "public_key": wg_key(i), "name": name});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    c.call(Method::POST, "/api/v1/register", None, Some(body))
        .await
}

async fn advertise(c: &TestController, credential: &str, routes: &[&str]) -> Resp {
    c.call(
        Method::POST,
        "/api/v1/node/endpoints",
        Some(credential),
        Some(json!({"endpoints": [], "routes": routes})),
    )
    .await
}

async fn approve(c: &TestController, id: u64, routes: &[&str]) -> Resp {
    c.admin(
        Method::PATCH,
        &format!("/api/v1/nodes/{id}"),
        Some(json!({"approved_routes": routes})),
    )
    .await
}

#[track_caller]
fn assert_refused(r: &Resp, field: &str, needle: &str) {
    r.assert_error(422, "route_refused");
    let msg = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("`{field}`")),
        "field not named: {msg}"
    );
    assert!(msg.contains(needle), "{needle:?} not in {msg}");
}

async fn audit_actions(c: &TestController) -> Vec<String> {
    let r = c.admin(Method::GET, "/api/v1/audit?limit=1000", None).await;
    r.body
        .as_array()
        .expect("audit")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_captured_node_cannot_take_another_nodes_lan_with_or_without_auto_approve() {
    let c = TestController::with_config(|cfg| {
        cfg.listen = "198.18.0.1:8443".parse().expect("listen");
    })
    .await;
    let field_key = c
        .enrollment_key(json!({"reusable": true, "auto_approve": true,
                               "auto_approve_routes": ["192.168.0.0/16"]}))
        .await;
    let pending_key = c.enrollment_key(json!({"reusable": true})).await;

    // The embassy's LAN, approved by the key (inside its allowed prefix).
    let r = register(
        &c,
        &field_key,
        1,
        "embassy",
        json!({"routes": ["192.168.50.0/24"],
               "endpoints": [{"addr": "198.19.2.1:51820", "uplink": "sat", "kind": "satellite"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let embassy = r.body["node_id"].as_u64().expect("id");
    let node = c
        .admin(Method::GET, &format!("/api/v1/nodes/{embassy}"), None)
        .await;
    assert_eq!(node.body["approved_routes"], json!(["192.168.50.0/24"]));
    let owner = format!("node {embassy}");

    // Registering with the same LAN, half of it, or a supernet: refused, with and without
    // auto-approve, and nothing is written.
    let nodes_before = c.state.store.nodes().await.expect("nodes").len();
    for (i, (key, route)) in [
        (&field_key, "192.168.50.0/24"),
        (&field_key, "192.168.50.0/25"),
        (&pending_key, "192.168.50.128/25"),
        (&pending_key, "192.168.0.0/16"),
    ]
    .into_iter()
    .enumerate()
    {
        let r = register(&c, key, 10 + i as u32, "thief", json!({"routes": [route]})).await;
        assert_refused(&r, "routes", &owner);
    }
    assert_eq!(
        c.state.store.nodes().await.expect("nodes").len(),
        nodes_before
    );

    // An enrolled node re-advertising: both halves, a supernet, the controller, an endpoint,
    // or more space than one /16.
    let (_, thief) = c.register_ok(&field_key, 20, "thief").await;
    let r = advertise(&c, &thief, &["192.168.50.0/25", "192.168.50.128/25"]).await;
    assert_refused(&r, "routes", &owner);
    assert_refused(
        &advertise(&c, &thief, &["192.168.0.0/17"]).await,
        "routes",
        &owner,
    );
    assert_refused(
        &advertise(&c, &thief, &["198.18.0.0/24"]).await,
        "routes",
        "198.18.0.1",
    );
    assert_refused(
        &advertise(&c, &thief, &["198.19.2.0/24"]).await,
        "routes",
        "198.19.2.1",
    );
    assert_refused(
        &advertise(&c, &thief, &["64.0.0.0/5"]).await,
        "routes",
        "max_route_prefix_v4",
    );
    assert_refused(
        &advertise(&c, &thief, &["10.1.0.0/16", "10.1.2.0/24"]).await,
        "routes",
        "10.1.2.0/24",
    );

    // An auto-approving key without `auto_approve_routes` approves the node, not its routes.
    let plain_auto = c.enrollment_key(json!({"auto_approve": true})).await;
    let r = register(
        &c,
        &plain_auto,
        30,
        "site",
        json!({"routes": ["10.40.0.0/24"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["state"], "approved");
    let site = r.body["node_id"].as_u64().expect("id");
    let node = c
        .admin(Method::GET, &format!("/api/v1/nodes/{site}"), None)
        .await;
    assert_eq!(node.body["advertised_routes"], json!(["10.40.0.0/24"]));
    assert_eq!(node.body["approved_routes"], json!([]));

    // Admin approval: another node advertising an overlapping prefix blocks it, both ways.
    let r = advertise(&c, &thief, &["10.40.0.0/25"]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_refused(
        &approve(&c, site, &["10.40.0.0/24"]).await,
        "approved_routes",
        "10.40.0.0/25",
    );
    let thief_id = c
        .state
        .store
        .nodes()
        .await
        .expect("nodes")
        .iter()
        .find(|n| n.name == "thief")
        .expect("thief")
        .id
        .0;
    assert_refused(
        &approve(&c, thief_id, &["10.40.0.0/25"]).await,
        "approved_routes",
        "10.40.0.0/24",
    );
    // Once the thief withdraws, the site's LAN is approved.
    assert_eq!(
        advertise(&c, &thief, &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        approve(&c, site, &["10.40.0.0/24"]).await.status,
        StatusCode::OK
    );

    // The enrollment key's allowed prefixes are checked and need auto_approve.
    let r = c
        .admin(
            Method::POST,
            "/api/v1/enrollment-keys",
            Some(json!({"auto_approve_routes": ["192.168.0.0/16"]})),
        )
        .await;
    r.assert_error(422, "invalid_body");
    let r = c
        .admin(
            Method::POST,
            "/api/v1/enrollment-keys",
            Some(json!({"auto_approve": true, "auto_approve_routes": ["10.77.0.0/24"]})),
        )
        .await;
    r.assert_error(422, "invalid_body");
    assert!(r.text.contains("auto_approve_routes"), "{}", r.text);

    // Every route change is audited: advertised, approved, refused.
    let actions = audit_actions(&c).await;
    for a in [
        "node.routes_refused",
        "node.routes_advertise",
        "node.update",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    let refused = actions
        .iter()
        .filter(|a| *a == "node.routes_refused")
        .count();
    assert_eq!(refused, 4 + 6 + 2, "{actions:?}");
}

#[tokio::test]
async fn a_pending_nodes_endpoint_reports_do_not_bump_the_serial() {
    let c = TestController::new().await;
    let key = c.enrollment_key(json!({"reusable": true})).await;
    let (_, cred) = c.register_ok(&key, 1, "pending").await;
    let serial = c.state.store.serial().await.expect("serial");
    for port in 51820..51830 {
        let r = c
            .call(
                Method::POST,
                "/api/v1/node/endpoints",
                Some(&cred),
                Some(json!({"endpoints": [{"addr": format!("198.18.0.9:{port}"),
                                           "uplink": "sat", "kind": "satellite"}]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    }
    assert_eq!(c.state.store.serial().await.expect("serial"), serial);
}

/// One step of the property test: node `node` advertises `routes`, or the admin approves them.
#[derive(Debug, Clone)]
enum Op {
    Advertise { node: usize, routes: Vec<usize> },
    Approve { node: usize, routes: Vec<usize> },
}

/// A small universe of prefixes that nest and overlap in every way, plus ones in the overlay.
const UNIVERSE: &[&str] = &[
    "192.168.0.0/16",
    "192.168.50.0/24",
    "192.168.50.0/25",
    "192.168.50.128/25",
    "192.168.51.0/24",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.77.3.0/24",
    "fd00:1::/48",
    "fd00:1:0:5::/64",
    "fd7a:5c3e:77::/80",
];

fn op() -> impl Strategy<Value = Op> {
    let routes = proptest::collection::vec(0..UNIVERSE.len(), 0..4);
    prop_oneof![
        (0..3usize, routes.clone()).prop_map(|(node, routes)| Op::Advertise { node, routes }),
        (0..3usize, routes).prop_map(|(node, routes)| Op::Approve { node, routes }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn approved_routes_stay_pairwise_disjoint_and_outside_the_overlay(
        ops in proptest::collection::vec(op(), 1..16)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let c = TestController::new().await;
            let key = c.enrollment_key(json!({"reusable": true, "auto_approve": true})).await;
            let mut nodes = Vec::new();
            for i in 0..3 {
                nodes.push(c.register_ok(&key, i, &format!("n{i}")).await);
            }
            let overlay = [
                c.config.overlay.ipv4.into(),
                IpNet::from(c.config.overlay.ipv6),
            ];
            for op in ops {
                let r = match &op {
                    Op::Advertise { node, routes } => {
                        let routes: Vec<&str> = routes.iter().map(|i| UNIVERSE[*i]).collect();
                        advertise(&c, &nodes[*node].1, &routes).await
                    }
                    Op::Approve { node, routes } => {
                        let routes: Vec<&str> = routes.iter().map(|i| UNIVERSE[*i]).collect();
                        approve(&c, nodes[*node].0, &routes).await
                    }
                };
                assert!(
                    r.status.is_success() || r.status == StatusCode::UNPROCESSABLE_ENTITY,
                    "{op:?}: {} {}", r.status, r.text
                );
                let approved: Vec<IpNet> = c.state.store.nodes().await.expect("nodes")
                    .iter()
                    .flat_map(|n| n.approved_routes.clone())
                    .collect();
                for (i, a) in approved.iter().enumerate() {
                    for o in &overlay {
                        assert!(!a.contains(o) && !o.contains(a), "{a} overlaps the overlay");
                    }
                    for b in &approved[i + 1..] {
                        assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap after {op:?}");
                    }
                }
            }
        });
    }
}
