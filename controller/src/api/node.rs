//! Node-facing endpoints: registration and the signed netmap.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ipnet::IpNet;
use skymesh_proto::{sign_netmap, RegisterRequest, RegisterResponse, SignedNetMap};

use super::extract::{ApiJson, NodeCredential};
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::netmap;

pub(super) const MAX_ENDPOINTS: usize = 16;
pub(super) const MAX_ROUTES: usize = 64;

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
    if req.endpoints.len() > MAX_ENDPOINTS {
        return Err(ApiError::unprocessable(format!(
            "at most {MAX_ENDPOINTS} `endpoints`"
        )));
    }
    for e in &req.endpoints {
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
    if req.routes.len() > MAX_ROUTES {
        return Err(ApiError::unprocessable(format!(
            "at most {MAX_ROUTES} `routes`"
        )));
    }
    let pools = state.store.pools();
    for r in &req.routes {
        if *r != r.trunc() {
            return Err(ApiError::unprocessable(format!(
                "route {r} has host bits set; did you mean {}?",
                r.trunc()
            )));
        }
        let overlaps_overlay = match r {
            IpNet::V4(n) => n.contains(&pools.v4.network()) || pools.v4.contains(&n.network()),
            IpNet::V6(n) => n.contains(&pools.v6.network()) || pools.v6.contains(&n.network()),
        };
        if overlaps_overlay || r.prefix_len() == 0 {
            return Err(ApiError::unprocessable(format!(
                "route {r} overlaps the overlay network or is a default route"
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
        (status = 422, description = "malformed body (bad key, unknown field, ...)", body = ErrorBody),
    ))]
pub(super) async fn register(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let result = async {
        validate_register(&state, &req)?;
        let (node, credential) = state.store.register(&req, state.clock.now()).await?;
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
