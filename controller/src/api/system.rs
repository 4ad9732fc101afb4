//! Health, metrics and the OpenAPI document.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Serialize;

use super::extract::AdminAuth;
use super::AppState;
use crate::error::ApiError;

#[derive(Clone)]
pub(super) struct OpenApiJson(pub(super) Arc<String>);

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Health {
    status: &'static str,
    serial: u64,
}

/// Liveness and database reachability.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, body = Health), (status = 500, body = crate::error::ErrorBody)))]
pub(super) async fn healthz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    let serial = state.store.serial().await?;
    Ok(Json(Health {
        status: "ok",
        serial,
    }))
}

/// Prometheus metrics (text exposition format).
///
/// Besides the controller's own counters, per node (from its last report):
/// `skymesh_node_last_seen_age_seconds`, `skymesh_node_netmap_age_seconds`,
/// `skymesh_node_netmap_serial`, `skymesh_node_uplink_up{uplink,kind}`,
/// `skymesh_node_path_uplink{peer,uplink,kind} 1` (the local uplink carrying traffic to each
/// peer), `skymesh_node_path_switches_total{peer}`, `skymesh_node_path_rtt_seconds` and
/// `skymesh_node_path_loss_ratio{peer,uplink,remote}`.
///
/// These name nodes, who peers with whom and each unit's carrier address, so an API token is
/// required (a read-only one suffices: give Prometheus its own, `admin-token create
/// --read-only`, as `authorization: { credentials: ... }`).
#[utoipa::path(get, path = "/metrics", tag = "system",
    security(("admin_token" = [])),
    responses(
        (status = 200, content_type = "text/plain; version=0.0.4", body = String),
        (status = 401, body = crate::error::ErrorBody),
    ))]
pub(super) async fn metrics(
    State(state): State<AppState>,
    _auth: AdminAuth,
) -> Result<impl IntoResponse, ApiError> {
    let stats = state.store.stats().await?;
    // Two queries whatever the fleet size: nodes, then every node's last contact.
    let mut seen = state.store.nodes_seen().await?;
    let nodes: Vec<_> = state
        .store
        .nodes()
        .await?
        .into_iter()
        .filter(|n| n.state != skymesh_proto::NodeState::Revoked)
        .map(|n| {
            let s = seen.remove(&n.id);
            (n, s)
        })
        .collect();
    let mut body = state.metrics.render(&stats);
    body.push_str(&crate::metrics::render_nodes(&nodes, state.clock.now()));
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    ))
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system",
    responses((status = 200, content_type = "application/json", body = Object)))]
pub(super) async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.as_str().to_owned(),
    )
}
