//! Node-facing endpoints: registration and the signed netmap.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ipnet::IpNet;
use skymesh_proto::{
    sign_netmap, Endpoint, EndpointsReport, RegisterRequest, RegisterResponse, RotateKeyRequest,
    SignedNetMap, StatusReport,
};

use super::extract::{ApiJson, NodeCredential, SeenFrom};
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::netmap;

pub(super) const MAX_ENDPOINTS: usize = skymesh_proto::MAX_ENDPOINTS;
pub(super) const MAX_ROUTES: usize = 64;
const MAX_STATUS_PEERS: usize = 4096;

/// Checks a node name: 1–63 characters, no control characters.
pub(super) fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.chars().count() > 63 || name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "`name` must be 1-63 characters without control characters",
        ));
    }
    Ok(())
}

fn validate_register(state: &AppState, req: &RegisterRequest) -> Result<(), ApiError> {
    validate_name(&req.name)?;
    if req.enrollment_key.is_empty() || req.enrollment_key.len() > 256 {
        return Err(ApiError::unprocessable(
            "`enrollment_key` must be 1-256 characters",
        ));
    }
    validate_endpoints(&req.endpoints)?;
    validate_routes(state, "routes", &req.routes)
}

fn validate_endpoints(endpoints: &[Endpoint]) -> Result<(), ApiError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(ApiError::unprocessable(format!(
            "at most {MAX_ENDPOINTS} `endpoints`"
        )));
    }
    for e in endpoints {
        if e.uplink.is_empty() || e.uplink.len() > 32 || e.uplink.chars().any(char::is_control) {
            return Err(ApiError::unprocessable(
                "`endpoints[].uplink` must be 1-32 characters",
            ));
        }
        if e.addr.port() == 0 || e.addr.ip().is_unspecified() || e.addr.ip().is_multicast() {
            return Err(ApiError::unprocessable(format!(
                "`endpoints[].addr` {} is not a usable unicast address and port",
                e.addr
            )));
        }
    }
    Ok(())
}

/// The checks a route list passes on its own (`field` names it in errors); what it may
/// overlap is the store's business ([`crate::routes`]).
pub(super) fn validate_routes(
    state: &AppState,
    field: &str,
    routes: &[IpNet],
) -> Result<(), ApiError> {
    if routes.len() > MAX_ROUTES {
        return Err(ApiError::unprocessable(format!(
            "at most {MAX_ROUTES} `{field}`"
        )));
    }
    let pools = state.store.pools();
    for r in routes {
        if *r != r.trunc() {
            return Err(ApiError::unprocessable(format!(
                "`{field}`: route {r} has host bits set; did you mean {}?",
                r.trunc()
            )));
        }
        let overlaps_overlay = match r {
            IpNet::V4(n) => n.contains(&pools.v4.network()) || pools.v4.contains(&n.network()),
            IpNet::V6(n) => n.contains(&pools.v6.network()) || pools.v6.contains(&n.network()),
        };
        if overlaps_overlay || r.prefix_len() == 0 {
            return Err(ApiError::unprocessable(format!(
                "`{field}`: route {r} overlaps the overlay network or is a default route"
            )));
        }
    }
    Ok(())
}

/// Register a node with an enrollment key.
///
/// The node keeps its WireGuard private key; it sends the public key. The returned `credential`
/// is shown once. Nodes registered with a key that does not auto-approve stay `pending`.
#[utoipa::path(post, path = "/api/v1/register", tag = "node",
    request_body = RegisterRequest,
    responses(
        (status = 201, body = RegisterResponse),
        (status = 401, description = "unknown enrollment key", body = ErrorBody),
        (status = 403, description = "enrollment key revoked, expired or used up", body = ErrorBody),
        (status = 409, description = "public key already registered", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "malformed body (bad key, unknown field, ...), or a route \
            refused (`route_refused`)", body = ErrorBody),
        (status = 429, description = "too many registrations from this address \
            (`limits.register_per_minute`)", body = ErrorBody),
    ))]
pub(super) async fn register(
    State(state): State<AppState>,
    SeenFrom(seen_from): SeenFrom,
    ApiJson(mut req): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let result = async {
        state.allow_registration(seen_from)?;
        validate_register(&state, &req)?;
        req.endpoints = crate::store::stored_endpoints(&req.endpoints);
        let now = state.clock.now();
        let (node, credential) = state.store.register(&req, now).await?;
        state
            .store
            .report_endpoints(node.id, None, None, seen_from, now)
            .await?;
        let pools = state.store.pools();
        let addresses = vec![
            IpNet::new(node.ipv4.into(), pools.v4.prefix_len())
                .map_err(|e| ApiError::internal(&e))?,
            IpNet::new(node.ipv6.into(), pools.v6.prefix_len())
                .map_err(|e| ApiError::internal(&e))?,
        ];
        tracing::info!(node = %node.id, name = %node.name, state = ?node.state, "node registered");
        Ok(RegisterResponse {
            node_id: node.id,
            state: node.state,
            addresses,
            credential,
            controller_public_key: state.controller_public_key(),
        })
    }
    .await;
    match result {
        Ok(resp) => {
            state.metrics.registrations.fetch_add(1, Ordering::Relaxed);
            Ok((StatusCode::CREATED, Json(resp)))
        }
        Err(e) => {
            state
                .metrics
                .registrations_refused
                .fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// This node's view of the mesh, signed with the controller's Ed25519 key.
///
/// Verify `signature` over `"skymesh-netmap-v1\0" || payload` with the pinned controller key
/// (`SignedNetMap::verify` in skymesh-proto), then parse `payload` as a `NetMap`.
#[utoipa::path(get, path = "/api/v1/netmap", tag = "node",
    security(("node_credential" = [])),
    responses(
        (status = 200, body = SignedNetMap),
        (status = 401, body = ErrorBody),
        (status = 403, description = "node revoked or expired", body = ErrorBody),
    ))]
pub(super) async fn netmap(
    State(state): State<AppState>,
    node: NodeCredential,
) -> Result<Json<SignedNetMap>, ApiError> {
    let topology = state.topology().await?;
    let map = netmap::compute(&topology, node.id, state.clock.now())
        // Deleted between authentication and the snapshot.
        .ok_or_else(|| ApiError::unauthorized("unknown node credential"))?;
    let signed = sign_netmap(&map, &state.signing_key).map_err(|e| ApiError::internal(&e))?;
    state.metrics.netmaps_served.fetch_add(1, Ordering::Relaxed);
    Ok(Json(signed))
}

/// Report this node's uplinks (local addresses) and, optionally, the subnets it offers to route.
///
/// The controller adds a `reflexive` endpoint: the source IP it sees with the port of the first
/// reported endpoint (the node's public address behind NAT). Behind a reverse proxy that source
/// is the proxy. Peers' netmaps change (serial bump, pushed on the stream) only if something
/// changed; newly advertised routes need an admin's approval (`PATCH /api/v1/nodes/{id}`).
#[utoipa::path(post, path = "/api/v1/node/endpoints", tag = "node",
    security(("node_credential" = [])),
    request_body = EndpointsReport,
    responses(
        (status = 204, description = "recorded"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "node revoked or expired", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub(super) async fn report_endpoints(
    State(state): State<AppState>,
    node: NodeCredential,
    SeenFrom(seen_from): SeenFrom,
    ApiJson(report): ApiJson<EndpointsReport>,
) -> Result<StatusCode, ApiError> {
    validate_endpoints(&report.endpoints)?;
    if let Some(routes) = &report.routes {
        validate_routes(&state, "routes", routes)?;
    }
    let changed = state
        .store
        .report_endpoints(
            node.id,
            Some(&report.endpoints),
            report.routes.as_deref(),
            seen_from,
            state.clock.now(),
        )
        .await?;
    if changed {
        tracing::info!(node = %node.id, "node endpoints or routes changed");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Report this node's view of its peers (last handshake, bytes, uplink in use).
///
/// Replaces the previous report; `GET /api/v1/nodes/{id}` shows it with `last_seen`, and
/// `/metrics` exports it (`skymesh_node_path_uplink`, switch counts, path RTT/loss, netmap
/// age). Agents with failover add per peer the local uplink and its kind, every path's
/// health, RTT and loss, the switch count and last switch reason, their uplinks, and how
/// stale their netmap is (`netmap_age_secs`). Agents report at once when a path switches.
#[utoipa::path(post, path = "/api/v1/node/status", tag = "node",
    security(("node_credential" = [])),
    request_body = StatusReport,
    responses(
        (status = 204, description = "recorded"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "node revoked or expired", body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 429, description = "more than 10 reports at once, then 1/s", body = ErrorBody),
    ))]
pub(super) async fn report_status(
    State(state): State<AppState>,
    node: NodeCredential,
    SeenFrom(seen_from): SeenFrom,
    ApiJson(report): ApiJson<StatusReport>,
) -> Result<StatusCode, ApiError> {
    state.allow_status(node.id)?;
    if report.peers.len() > MAX_STATUS_PEERS {
        return Err(ApiError::unprocessable(format!(
            "at most {MAX_STATUS_PEERS} `peers`"
        )));
    }
    validate_status(&report)?;
    state
        .store
        .report_status(node.id, &report, seen_from, state.clock.now())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An uplink name or switch reason as the agent reports it: 1-32 characters, no control
/// characters (they end up in Prometheus labels).
fn short_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && !s.chars().any(char::is_control)
}

fn validate_status(report: &StatusReport) -> Result<(), ApiError> {
    if report.uplinks.len() > MAX_ENDPOINTS {
        return Err(ApiError::unprocessable(format!(
            "at most {MAX_ENDPOINTS} `uplinks`"
        )));
    }
    if report.uplinks.iter().any(|u| !short_label(&u.name)) {
        return Err(ApiError::unprocessable(
            "`uplinks[].name` must be 1-32 characters",
        ));
    }
    if report
        .uplinks
        .iter()
        .any(|u| u.reflexive.len() > 2 || u.nat.as_deref().is_some_and(|n| !short_label(n)))
    {
        return Err(ApiError::unprocessable(
            "`uplinks[].reflexive` holds at most 2 addresses and `uplinks[].nat` 1-32 characters",
        ));
    }
    for p in &report.peers {
        let node = p.node_id;
        let labels = p
            .uplink
            .iter()
            .chain(&p.last_switch_reason)
            .chain(p.paths.iter().map(|x| &x.uplink));
        if labels.clone().any(|l| !short_label(l)) {
            return Err(ApiError::unprocessable(format!(
                "`peers[].uplink`, `peers[].last_switch_reason` and `peers[].paths[].uplink` \
                 of node {node} must be 1-32 characters"
            )));
        }
        // Every local uplink × every endpoint of the peer (reflexive included).
        if p.paths.len() > MAX_ENDPOINTS * (MAX_ENDPOINTS + 1) {
            return Err(ApiError::unprocessable(format!(
                "too many `peers[].paths` for node {node}"
            )));
        }
        if p.paths.iter().any(|x| x.loss_permille > 1000) {
            return Err(ApiError::unprocessable(format!(
                "`peers[].paths[].loss_permille` of node {node} must be at most 1000"
            )));
        }
    }
    Ok(())
}

/// Replace this node's WireGuard public key (key rotation).
///
/// The node generated the new key pair itself; peers get the new key with the next netmap
/// (pushed on the stream). Audited as `node.rotate_key`.
#[utoipa::path(post, path = "/api/v1/node/rotate-key", tag = "node",
    security(("node_credential" = [])),
    request_body = RotateKeyRequest,
    responses(
        (status = 204, description = "rotated (or already this key)"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "node revoked or expired", body = ErrorBody),
        (status = 409, description = "key belongs to another node", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub(super) async fn rotate_key(
    State(state): State<AppState>,
    node: NodeCredential,
    ApiJson(req): ApiJson<RotateKeyRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .store
        .rotate_key(node.id, &req.public_key, state.clock.now())
        .await?;
    tracing::info!(node = %node.id, public_key = %req.public_key, "node rotated its key");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::{NodeId, PathHealth, PathReport, PeerStatus, UplinkKind, UplinkReport};

    fn report() -> StatusReport {
        StatusReport {
            serial: 1,
            peers: vec![PeerStatus {
                node_id: NodeId(2),
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                uplink: Some("fibre".into()),
                endpoint: None,
                uplink_kind: Some(UplinkKind::Terrestrial),
                switch_count: 1,
                last_switch_reason: Some("link_down".into()),
                last_switch_secs_ago: Some(3),
                paths: vec![PathReport {
                    uplink: "fibre".into(),
                    kind: UplinkKind::Terrestrial,
                    remote: "198.19.1.2:51820".parse().expect("addr"),
                    health: PathHealth::Healthy,
                    active: true,
                    rtt_us: Some(900),
                    loss_permille: 0,
                }],
            }],
            netmap_age_secs: Some(0),
            uplinks: vec![UplinkReport {
                name: "fibre".into(),
                kind: UplinkKind::Terrestrial,
                priority: 1,
                up: true,
                reflexive: Vec::new(),
                nat: None,
            }],
        }
    }

    #[test]
    fn failover_status_fields_are_checked_and_named() {
        assert!(validate_status(&report()).is_ok());
        let mut r = report();
        r.peers[0].paths[0].uplink = "x".repeat(33);
        let e = validate_status(&r).expect_err("long uplink");
        assert!(format!("{e:?}").contains("paths[].uplink"), "{e:?}");
        let mut r = report();
        r.peers[0].last_switch_reason = Some("bad\nreason".into());
        assert!(validate_status(&r).is_err());
        let mut r = report();
        r.peers[0].paths[0].loss_permille = 1001;
        let e = validate_status(&r).expect_err("loss");
        assert!(format!("{e:?}").contains("loss_permille"), "{e:?}");
        let mut r = report();
        r.uplinks[0].name = String::new();
        let e = validate_status(&r).expect_err("empty uplink name");
        assert!(format!("{e:?}").contains("uplinks[].name"), "{e:?}");
        let mut r = report();
        let path = r.peers[0].paths[0].clone();
        r.peers[0].paths = vec![path; MAX_ENDPOINTS * (MAX_ENDPOINTS + 1) + 1];
        assert!(validate_status(&r).is_err());
    }
}
