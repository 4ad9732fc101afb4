//! Admin endpoints: enrollment keys, nodes, audit log.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use skymesh_proto::NodeId;

use super::extract::{AdminAuth, ApiJson, ApiPath, ApiQuery};
use super::node::{validate_name, validate_routes};
use super::AppState;
use crate::audit::{AuditEntry, ChainHead};
use crate::error::{ApiError, ErrorBody};
use crate::policy::validate_tag;
use crate::store::{
    AdminTokenInfo, EnrollmentKeyInfo, NewEnrollmentKey, NodePatch, NodeRecord, NodeSeen, Scope,
};

fn validate_tags(tags: &[String]) -> Result<(), ApiError> {
    if tags.len() > 32 {
        return Err(ApiError::unprocessable("at most 32 `tags`"));
    }
    tags.iter()
        .try_for_each(|t| validate_tag(t).map_err(ApiError::unprocessable))
}

/// Longest accepted duration (~100 years), so the arithmetic and the database's i64 cannot
/// overflow.
const MAX_SECS: u64 = 100 * 365 * 24 * 3600;

/// Uses of a reusable enrollment key created without `max_uses`.
pub(super) const DEFAULT_REUSABLE_MAX_USES: u32 = 100;

/// Body of `POST /api/v1/enrollment-keys`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentKey {
    #[serde(default)]
    pub description: String,
    /// `false` (default): one-off, usable once. `true`: usable up to `max_uses` times.
    #[serde(default)]
    pub reusable: bool,
    /// Reusable keys only; omitted means 100 (`DEFAULT_REUSABLE_MAX_USES`): a leaked key
    /// must not be able to drain the address pool. Ask for more explicitly.
    pub max_uses: Option<u32>,
    /// The key stops working this many seconds from now.
    pub expires_in_secs: Option<u64>,
    /// Tags applied to every node registered with this key.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Nodes registered with this key are approved at once instead of staying `pending`.
    #[serde(default)]
    pub auto_approve: bool,
    /// With `auto_approve`: advertised routes inside one of these prefixes are approved at
    /// registration too. Other routes (all of them when this is empty) wait for an admin.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub auto_approve_routes: Vec<IpNet>,
    /// Nodes registered with this key expire this many seconds after registering.
    pub node_ttl_secs: Option<u64>,
}

/// The created key; `key` is the secret and is shown only here.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedEnrollmentKey {
    pub key: String,
    #[serde(flatten)]
    pub info: EnrollmentKeyInfo,
}

/// Create an enrollment key.
#[utoipa::path(post, path = "/api/v1/enrollment-keys", tag = "enrollment",
    security(("admin_token" = [])),
    request_body = CreateEnrollmentKey,
    responses(
        (status = 201, body = CreatedEnrollmentKey),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub(super) async fn create_enrollment_key(
    State(state): State<AppState>,
    auth: AdminAuth,
    ApiJson(req): ApiJson<CreateEnrollmentKey>,
) -> Result<(StatusCode, Json<CreatedEnrollmentKey>), ApiError> {
    let actor = auth.writer()?;
    validate_tags(&req.tags)?;
    if req.description.chars().count() > 256 {
        return Err(ApiError::unprocessable(
            "`description` is limited to 256 characters",
        ));
    }
    match (req.reusable, req.max_uses) {
        (_, Some(0)) => return Err(ApiError::unprocessable("`max_uses` must be at least 1")),
        (false, Some(n)) if n != 1 => {
            return Err(ApiError::unprocessable(
                "a one-off key (`reusable: false`) has `max_uses` 1; set `reusable: true`",
            ))
        }
        _ => {}
    }
    for (field, v) in [
        ("expires_in_secs", req.expires_in_secs),
        ("node_ttl_secs", req.node_ttl_secs),
    ] {
        if v.is_some_and(|s| s == 0 || s > MAX_SECS) {
            return Err(ApiError::unprocessable(format!(
                "`{field}` must be between 1 and {MAX_SECS}"
            )));
        }
    }
    if !req.auto_approve_routes.is_empty() && !req.auto_approve {
        return Err(ApiError::unprocessable(
            "`auto_approve_routes` needs `auto_approve: true`",
        ));
    }
    validate_routes(&state, "auto_approve_routes", &req.auto_approve_routes)?;
    let now = state.clock.now();
    let mut tags = req.tags.clone();
    tags.sort();
    tags.dedup();
    let new = NewEnrollmentKey {
        description: req.description,
        reusable: req.reusable,
        max_uses: Some(if req.reusable {
            req.max_uses.unwrap_or(DEFAULT_REUSABLE_MAX_USES)
        } else {
            1
        }),
        expires_at: req.expires_in_secs.map(|s| now + s),
        tags,
        auto_approve: req.auto_approve,
        auto_approve_routes: crate::store::normalized_routes(&req.auto_approve_routes),
        node_ttl_secs: req.node_ttl_secs,
    };
    let (info, key) = state.store.create_enrollment_key(&actor, &new, now).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollmentKey { key, info }),
    ))
}

/// List enrollment keys (secrets are never shown again).
#[utoipa::path(get, path = "/api/v1/enrollment-keys", tag = "enrollment",
    security(("admin_token" = [])),
    responses((status = 200, body = Vec<EnrollmentKeyInfo>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_enrollment_keys(
    State(state): State<AppState>,
    _auth: AdminAuth,
) -> Result<Json<Vec<EnrollmentKeyInfo>>, ApiError> {
    Ok(Json(state.store.enrollment_keys().await?))
}

/// Revoke an enrollment key. Nodes already registered with it are not affected.
#[utoipa::path(delete, path = "/api/v1/enrollment-keys/{id}", tag = "enrollment",
    security(("admin_token" = [])),
    params(("id" = u64, Path, description = "Enrollment key id")),
    responses(
        (status = 200, body = EnrollmentKeyInfo),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn revoke_enrollment_key(
    State(state): State<AppState>,
    auth: AdminAuth,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<EnrollmentKeyInfo>, ApiError> {
    let actor = auth.writer()?;
    Ok(Json(
        state
            .store
            .revoke_enrollment_key(&actor, id, state.clock.now())
            .await?,
    ))
}

/// Body of `POST /api/v1/admin-tokens`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdminToken {
    /// `admin` (may change things) or `read_only` (GET endpoints and `/metrics`).
    pub scope: Scope,
    /// The token stops working this many seconds from now; omitted: never.
    pub expires_in_secs: Option<u64>,
}

/// The created token; `token` is the secret and is shown only here.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedAdminToken {
    pub token: String,
    #[serde(flatten)]
    pub info: AdminTokenInfo,
}

/// Create an admin API token (audited as `admin_token.create`).
#[utoipa::path(post, path = "/api/v1/admin-tokens", tag = "tokens",
    security(("admin_token" = [])),
    request_body = CreateAdminToken,
    responses(
        (status = 201, body = CreatedAdminToken),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub(super) async fn create_admin_token(
    State(state): State<AppState>,
    auth: AdminAuth,
    ApiJson(req): ApiJson<CreateAdminToken>,
) -> Result<(StatusCode, Json<CreatedAdminToken>), ApiError> {
    let actor = auth.writer()?;
    if req.expires_in_secs.is_some_and(|s| s == 0 || s > MAX_SECS) {
        return Err(ApiError::unprocessable(format!(
            "`expires_in_secs` must be between 1 and {MAX_SECS}"
        )));
    }
    let now = state.clock.now();
    let expires_at = req.expires_in_secs.map(|s| now + s);
    let (id, token) = state
        .store
        .create_admin_token(&actor, req.scope, expires_at, now)
        .await?;
    let info = AdminTokenInfo {
        id,
        scope: req.scope,
        created_at: now,
        expires_at,
        revoked_at: None,
    };
    Ok((StatusCode::CREATED, Json(CreatedAdminToken { token, info })))
}

/// List admin API tokens (secrets are never shown again).
#[utoipa::path(get, path = "/api/v1/admin-tokens", tag = "tokens",
    security(("admin_token" = [])),
    responses((status = 200, body = Vec<AdminTokenInfo>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_admin_tokens(
    State(state): State<AppState>,
    _auth: AdminAuth,
) -> Result<Json<Vec<AdminTokenInfo>>, ApiError> {
    Ok(Json(state.store.admin_tokens().await?))
}

/// Revoke an admin API token (audited as `admin_token.revoke`); it is refused from now on.
#[utoipa::path(delete, path = "/api/v1/admin-tokens/{id}", tag = "tokens",
    security(("admin_token" = [])),
    params(("id" = u64, Path, description = "Admin token id")),
    responses(
        (status = 200, body = AdminTokenInfo),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn revoke_admin_token(
    State(state): State<AppState>,
    auth: AdminAuth,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<AdminTokenInfo>, ApiError> {
    let actor = auth.writer()?;
    Ok(Json(
        state
            .store
            .revoke_admin_token(&actor, id, state.clock.now())
            .await?,
    ))
}

/// List nodes.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    security(("admin_token" = [])),
    responses((status = 200, body = Vec<NodeRecord>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_nodes(
    State(state): State<AppState>,
    _auth: AdminAuth,
) -> Result<Json<Vec<NodeRecord>>, ApiError> {
    Ok(Json(state.store.nodes().await?))
}

/// A node with what it last reported about itself.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub node: NodeRecord,
    /// Last contact and last status report; `null` if the node never called in after
    /// registering.
    pub seen: Option<NodeSeen>,
    /// Seconds since the node was last heard from (staleness), if ever.
    pub last_seen_secs_ago: Option<u64>,
    /// Seconds since its last status report (`seen.status`: per peer the uplink in use and
    /// its kind, path RTT/loss, switches; its uplinks; its netmap's age at report time).
    pub reported_secs_ago: Option<u64>,
}

/// One node, with its last status report and staleness.
#[utoipa::path(get, path = "/api/v1/nodes/{id}", tag = "nodes",
    security(("admin_token" = [])),
    params(("id" = u64, Path, description = "Node id")),
    responses(
        (status = 200, body = NodeDetail),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
    ))]
pub(super) async fn node(
    State(state): State<AppState>,
    _auth: AdminAuth,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<NodeDetail>, ApiError> {
    let node = state.store.node(NodeId(id)).await?;
    let seen = state.store.node_seen(node.id).await?;
    let now = state.clock.now();
    Ok(Json(NodeDetail {
        last_seen_secs_ago: seen.as_ref().map(|s| now.saturating_sub(s.last_seen)),
        reported_secs_ago: seen
            .as_ref()
            .and_then(|s| s.reported_at)
            .map(|r| now.saturating_sub(r)),
        node,
        seen,
    }))
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Body of `PATCH /api/v1/nodes/{id}`; absent fields are left alone.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchNode {
    pub name: Option<String>,
    /// Replaces the node's tags.
    pub tags: Option<Vec<String>>,
    /// `true` approves a pending node. (To cut a node off, revoke it.)
    pub approve: Option<bool>,
    /// Which of the node's advertised routes peers may send to it; replaces the current set.
    #[schema(value_type = Option<Vec<String>>)]
    pub approved_routes: Option<Vec<IpNet>>,
    /// Unix seconds after which the node is cut off; `null` removes the expiry.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<u64>)]
    pub expires_at: Option<Option<u64>>,
}

/// Update a node: rename, retag, approve, approve routes, set expiry.
#[utoipa::path(patch, path = "/api/v1/nodes/{id}", tag = "nodes",
    security(("admin_token" = [])),
    params(("id" = u64, Path, description = "Node id")),
    request_body = PatchNode,
    responses(
        (status = 200, body = NodeRecord),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "node is revoked", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub(super) async fn patch_node(
    State(state): State<AppState>,
    auth: AdminAuth,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<PatchNode>,
) -> Result<Json<NodeRecord>, ApiError> {
    let actor = auth.writer()?;
    if let Some(name) = &req.name {
        validate_name(name)?;
    }
    if let Some(tags) = &req.tags {
        validate_tags(tags)?;
    }
    if let Some(routes) = &req.approved_routes {
        validate_routes(&state, "approved_routes", routes)?;
    }
    if req.approve == Some(false) {
        return Err(ApiError::unprocessable(
            "`approve` can only be true; to cut a node off, revoke it",
        ));
    }
    if let Some(Some(t)) = req.expires_at {
        if i64::try_from(t).is_err() {
            return Err(ApiError::unprocessable("`expires_at` is out of range"));
        }
    }
    let patch = NodePatch {
        name: req.name,
        tags: req.tags,
        approve: req.approve == Some(true),
        approved_routes: req.approved_routes,
        expires_at: req.expires_at,
    };
    Ok(Json(
        state
            .store
            .patch_node(&actor, NodeId(id), &patch, state.clock.now())
            .await?,
    ))
}

/// Revoke a node: its credential is refused and it leaves every netmap. Irreversible.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/revoke", tag = "nodes",
    security(("admin_token" = [])),
    params(("id" = u64, Path, description = "Node id")),
    responses(
        (status = 200, body = NodeRecord),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn revoke_node(
    State(state): State<AppState>,
    auth: AdminAuth,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<NodeRecord>, ApiError> {
    let actor = auth.writer()?;
    Ok(Json(
        state
            .store
            .revoke_node(&actor, NodeId(id), state.clock.now())
            .await?,
    ))
}

/// Delete a node record. Its addresses are never handed out again.
#[utoipa::path(delete, path = "/api/v1/nodes/{id}", tag = "nodes",
    security(("admin_token" = [])),
    params(("id" = u64, Path, description = "Node id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn delete_node(
    State(state): State<AppState>,
    auth: AdminAuth,
    ApiPath(id): ApiPath<u64>,
) -> Result<StatusCode, ApiError> {
    let actor = auth.writer()?;
    state
        .store
        .delete_node(&actor, NodeId(id), state.clock.now())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    /// Return entries with `seq` greater than this.
    after: Option<u64>,
    /// At most this many entries (1-1000, default 100).
    limit: Option<u32>,
}

/// Audit log entries, oldest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    security(("admin_token" = [])),
    params(AuditQuery),
    responses(
        (status = 200, body = Vec<AuditEntry>),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    ))]
pub(super) async fn audit_log(
    State(state): State<AppState>,
    _auth: AdminAuth,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`limit` must be 1-1000",
        ));
    }
    Ok(Json(
        state
            .store
            .audit_entries(q.after.unwrap_or(0), limit)
            .await?,
    ))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AuditVerification {
    ok: bool,
    /// Present when the chain verifies.
    head: Option<ChainHead>,
    /// Present when it does not: where and how it breaks.
    problem: Option<String>,
}

/// Verify the audit hash chain.
///
/// Returns 200 with `ok: false` and the problem when the chain is broken: the request
/// succeeded, the data did not.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    security(("admin_token" = [])),
    responses((status = 200, body = AuditVerification), (status = 401, body = ErrorBody)))]
pub(super) async fn audit_verify(
    State(state): State<AppState>,
    _auth: AdminAuth,
) -> Result<Json<AuditVerification>, ApiError> {
    Ok(Json(match state.store.verify_audit().await? {
        Ok(head) => AuditVerification {
            ok: true,
            head: Some(head),
            problem: None,
        },
        Err(e) => {
            tracing::error!(error = %e, "audit chain verification failed");
            AuditVerification {
                ok: false,
                head: None,
                problem: Some(e.to_string()),
            }
        }
    }))
}
