//! Conversions between database rows (SQLite and PostgreSQL alike) and domain types.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use skymesh_proto::{NodeId, NodeState};
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::store::{AdminTokenInfo, EnrollmentKeyInfo, NodeRecord, NodeSeen, Scope, StoreError};

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(crate) fn to_i64(v: u64) -> i64 {
    // Values are unix seconds, counters and ids: far below i64::MAX.
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt(format!("negative value {v}")))
}

pub(crate) fn opt_u64(v: Option<i64>) -> Result<Option<u64>, StoreError> {
    v.map(to_u64).transpose()
}

pub(crate) fn json<T: DeserializeOwned, R>(row: &R, col: &str) -> Result<T, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> bool: Decode<'a, R::Database> + Type<R::Database>,
{
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| corrupt(format!("column {col}: {e}")))
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(corrupt)
}

pub(crate) fn parse<T: FromStr, R>(row: &R, col: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> bool: Decode<'a, R::Database> + Type<R::Database>,
{
    let text: String = row.try_get(col)?;
    text.parse()
        .map_err(|e| corrupt(format!("column {col} = {text:?}: {e}")))
}

pub(crate) fn state_str(s: NodeState) -> Result<&'static str, StoreError> {
    match s {
        NodeState::Pending => Ok("pending"),
        NodeState::Approved => Ok("approved"),
        NodeState::Revoked => Ok("revoked"),
        NodeState::Unknown => Err(corrupt("unknown node state")),
    }
}

pub(crate) fn node_from_row<R>(row: &R) -> Result<NodeRecord, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> bool: Decode<'a, R::Database> + Type<R::Database>,
{
    let state: String = row.try_get("state")?;
    let state = match state.as_str() {
        "pending" => NodeState::Pending,
        "approved" => NodeState::Approved,
        "revoked" => NodeState::Revoked,
        other => return Err(corrupt(format!("node state {other:?}"))),
    };
    Ok(NodeRecord {
        id: NodeId(to_u64(row.try_get("id")?)?),
        name: row.try_get("name")?,
        public_key: parse(row, "public_key")?,
        state,
        ipv4: parse::<Ipv4Addr, _>(row, "ipv4")?,
        ipv6: parse::<Ipv6Addr, _>(row, "ipv6")?,
        tags: json(row, "tags")?,
        endpoints: json(row, "endpoints")?,
        advertised_routes: json(row, "advertised_routes")?,
        approved_routes: json(row, "approved_routes")?,
        enrollment_key_id: opt_u64(row.try_get("enrollment_key_id")?)?,
        created_at: to_u64(row.try_get("created_at")?)?,
        expires_at: opt_u64(row.try_get("expires_at")?)?,
    })
}

/// An `admin_tokens` row (`id, scope, created_at, expires_at, revoked_at`).
pub(crate) fn token_from_row<R>(row: &R) -> Result<AdminTokenInfo, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> Option<i64>: Decode<'a, R::Database> + Type<R::Database>,
{
    let scope: String = row.try_get("scope")?;
    Ok(AdminTokenInfo {
        id: to_u64(row.try_get("id")?)?,
        scope: Scope::parse(&scope)?,
        created_at: to_u64(row.try_get("created_at")?)?,
        expires_at: opt_u64(row.try_get("expires_at")?)?,
        revoked_at: opt_u64(row.try_get("revoked_at")?)?,
    })
}

pub(crate) fn key_from_row<R>(row: &R) -> Result<EnrollmentKeyInfo, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> bool: Decode<'a, R::Database> + Type<R::Database>,
{
    let max_uses: Option<i64> = row.try_get("max_uses")?;
    Ok(EnrollmentKeyInfo {
        id: to_u64(row.try_get("id")?)?,
        description: row.try_get("description")?,
        reusable: row.try_get("reusable")?,
        max_uses: max_uses
            .map(|m| u32::try_from(m).map_err(|_| corrupt("max_uses")))
            .transpose()?,
        uses: u32::try_from(row.try_get::<i64, _>("uses")?).map_err(|_| corrupt("uses"))?,
        expires_at: opt_u64(row.try_get("expires_at")?)?,
        tags: json(row, "tags")?,
        auto_approve: row.try_get("auto_approve")?,
        auto_approve_routes: json(row, "auto_approve_routes")?,
        node_ttl_secs: opt_u64(row.try_get("node_ttl_secs")?)?,
        created_at: to_u64(row.try_get("created_at")?)?,
        revoked_at: opt_u64(row.try_get("revoked_at")?)?,
    })
}

/// A `node_status` row (`last_seen, seen_from, reported_at, report`).
pub(crate) fn seen_from_row<R>(row: &R) -> Result<NodeSeen, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'a> Option<String>: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> Option<i64>: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
{
    let seen_from: Option<String> = row.try_get("seen_from")?;
    let report: Option<String> = row.try_get("report")?;
    Ok(NodeSeen {
        last_seen: to_u64(row.try_get("last_seen")?)?,
        seen_from: seen_from
            .map(|s| {
                s.parse()
                    .map_err(|e| corrupt(format!("seen_from {s:?}: {e}")))
            })
            .transpose()?,
        reported_at: opt_u64(row.try_get("reported_at")?)?,
        status: report
            .map(|s| serde_json::from_str(&s).map_err(|e| corrupt(format!("report: {e}"))))
            .transpose()?,
    })
}
