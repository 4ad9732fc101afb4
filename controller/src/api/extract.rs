//! Extractors whose rejections are [`ApiError`]s, so even malformed requests get the stable
//! JSON error body; and the two authentication extractors (admin token, node credential).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use skymesh_proto::{NodeId, NodeState};

use super::AppState;
use crate::error::ApiError;
use crate::secrets;
use crate::store::{Actor, Scope};

/// `axum::Json` with rejections mapped into the API's error format.
pub(super) struct ApiJson<T>(pub(super) T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    /// The whole body must arrive within `limits.body_timeout_secs` (a client trickling it
    /// byte by byte must not hold a connection and a task for ever).
    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = std::time::Duration::from_secs(state.limits.body_timeout_secs);
        match tokio::time::timeout(limit, axum::Json::<T>::from_request(req, state)).await {
            Ok(Ok(axum::Json(v))) => Ok(ApiJson(v)),
            Ok(Err(r)) => Err(json_rejection(r)),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body did not arrive within {limit:?}"),
            )),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let code = match &r {
        JsonRejection::JsonDataError(_) => "invalid_body",
        JsonRejection::JsonSyntaxError(_) => "malformed_json",
        JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        _ => "bad_request",
    };
    // Never let a rejection become a 5xx: whatever went wrong reading the body is the caller's.
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, code, r.body_text())
}

/// `axum::extract::Path` with rejections mapped into the API's error format.
pub(super) struct ApiPath<T>(pub(super) T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|r: PathRejection| ApiError::bad_request("invalid_path", r.body_text()))
    }
}

/// `axum::extract::Query` with rejections mapped into the API's error format.
pub(super) struct ApiQuery<T>(pub(super) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r: QueryRejection| ApiError::bad_request("invalid_query", r.body_text()))
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <token>` header"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 256)
        .ok_or_else(|| ApiError::unauthorized("Authorization header is not `Bearer <token>`"))
}

/// A caller holding an admin or read-only API token.
#[derive(Debug, Clone, Copy)]
pub(super) struct AdminAuth {
    pub(super) token_id: u64,
    pub(super) scope: Scope,
}

impl AdminAuth {
    /// The audit actor, if this token may make changes.
    pub(super) fn writer(&self) -> Result<Actor, ApiError> {
        match self.scope {
            Scope::Admin => Ok(Actor(format!("admin-token:{}", self.token_id))),
            Scope::ReadOnly => Err(ApiError::forbidden(
                "read_only_token",
                "this token is read-only; changes need an admin token",
            )),
        }
    }
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if !token.starts_with(secrets::ADMIN_TOKEN_PREFIX) {
            return Err(ApiError::unauthorized("not an admin API token"));
        }
        let now = state.clock.now();
        match state.store.admin_token(&secrets::hash(token), now).await? {
            Some((token_id, scope)) => Ok(AdminAuth { token_id, scope }),
            None => Err(ApiError::unauthorized(
                "unknown, revoked or expired API token",
            )),
        }
    }
}

/// A node authenticated by its credential. Pending nodes pass (they get an empty netmap);
/// revoked and expired nodes are refused.
#[derive(Debug, Clone, Copy)]
pub(super) struct NodeCredential {
    pub(super) id: NodeId,
}

impl FromRequestParts<AppState> for NodeCredential {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if !token.starts_with(secrets::NODE_CREDENTIAL_PREFIX) {
            return Err(ApiError::unauthorized("not a node credential"));
        }
        let node = state
            .store
            .node_by_credential(&secrets::hash(token))
            .await?
            .ok_or_else(|| ApiError::unauthorized("unknown node credential"))?;
        if node.state == NodeState::Revoked {
            return Err(ApiError::forbidden(
                "node_revoked",
                "this node has been revoked",
            ));
        }
        if node.expires_at.is_some_and(|t| state.clock.now() >= t) {
            return Err(ApiError::forbidden("node_expired", "this node has expired"));
        }
        Ok(NodeCredential { id: node.id })
    }
}

/// The source address of the TCP connection, when the server was started with connect info
/// (`serve` is; `oneshot` tests insert `ConnectInfo` themselves). Behind a reverse proxy this is
/// the proxy, not the node.
#[derive(Debug, Clone, Copy)]
pub(super) struct SeenFrom(pub(super) Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for SeenFrom {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let addr = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip().to_canonical());
        Ok(SeenFrom(addr))
    }
}
