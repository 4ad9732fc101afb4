//! The one error type every handler returns, and its stable JSON body.
//!
//! Client mistakes get a 4xx with `{"error": {"code", "message"}}`; the message is written for
//! the caller. Internal failures are logged in full and shown only as `internal`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_body`, `duplicate_public_key`.
    pub code: String,
    /// Human-readable explanation for the caller.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }
    /// 429: the caller exceeded a per-credential or per-address limit.
    pub fn too_many(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// Logs `err` and returns an opaque 500.
    pub fn internal(err: &dyn std::error::Error) -> Self {
        tracing::error!(error = %err, source = ?err.source(), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see controller logs",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use StoreError as E;
        match e {
            E::NotFound(what) => Self::not_found(format!("{what} not found")),
            E::InvalidEnrollmentKey => Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_enrollment_key",
                e.to_string(),
            ),
            E::EnrollmentKeyRevoked => Self::forbidden("enrollment_key_revoked", e.to_string()),
            E::EnrollmentKeyExpired => Self::forbidden("enrollment_key_expired", e.to_string()),
            E::EnrollmentKeyUsedUp => Self::forbidden("enrollment_key_used_up", e.to_string()),
            E::DuplicatePublicKey => {
                Self::new(StatusCode::CONFLICT, "duplicate_public_key", e.to_string())
            }
            E::NodeRevoked => Self::new(StatusCode::CONFLICT, "node_revoked", e.to_string()),
            E::RouteNotAdvertised(_) => Self::unprocessable(e.to_string()),
            E::RouteRefused(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "route_refused",
                e.to_string(),
            ),
            E::PoolExhausted => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "address_pool_exhausted",
                e.to_string(),
            ),
            E::Db(ref inner) => Self::internal(inner),
            E::Corrupt(_) | E::Config(_) => Self::internal(&e),
        }
    }
}
