//! Persistence. Domain types here are backend-neutral; all SQL lives in one file per backend.
//!
//! [`Store`] is an enum over backends: embedded SQLite (one controller) and PostgreSQL (one or
//! several replicas sharing the database, see [`postgres`]). Every mutation runs in one write transaction that also bumps the topology
//! `serial` (when netmaps can change) and appends to the audit chain, so a crash leaves either
//! all of a change or none of it.

pub mod postgres;
mod rows;
mod sqlite;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use serde::Serialize;
use skymesh_proto::{Endpoint, NodeId, NodeState, RegisterRequest, StatusReport, WgPublicKey};

pub use postgres::{ChangeFeed, PgStore};
pub(crate) use sqlite::stored_endpoints;
pub use sqlite::{SqliteStore, DB_FILE};

use crate::audit::{AuditEntry, ChainHead};
use crate::ipam::Pools;
use crate::netmap::TopoNode;
use crate::routes::{RouteError, RouteGuard};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("unknown enrollment key")]
    InvalidEnrollmentKey,
    #[error("enrollment key has been revoked")]
    EnrollmentKeyRevoked,
    #[error("enrollment key has expired")]
    EnrollmentKeyExpired,
    #[error("enrollment key has no uses left")]
    EnrollmentKeyUsedUp,
    #[error("a node with this public key is already registered")]
    DuplicatePublicKey,
    #[error("node is revoked; register it again with a new key")]
    NodeRevoked,
    #[error("route {0} was not advertised by the node")]
    RouteNotAdvertised(IpNet),
    #[error(transparent)]
    RouteRefused(#[from] RouteError),
    #[error("overlay address pool exhausted")]
    PoolExhausted,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Config(String),
}

/// The refusal when the database was initialised with another controller signing key.
fn key_mismatch(have: &str, want: &str) -> String {
    format!(
        "the database was initialised by a controller whose signing public key is {have}, but \
         this controller's key is {want}; every replica must use the same signing key (copy \
         controller-signing.key from the first replica's data dir, or pass --signing-key)"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Admin,
    ReadOnly,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::ReadOnly => "read_only",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "admin" => Ok(Scope::Admin),
            "read_only" => Ok(Scope::ReadOnly),
            other => Err(rows::corrupt(format!("token scope {other:?}"))),
        }
    }
}

/// An admin API token as listed (the secret is never shown again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AdminTokenInfo {
    pub id: u64,
    pub scope: Scope,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds after which the token is refused; `null`: never.
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

/// Who made a change, as written to the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEnrollmentKey {
    pub description: String,
    pub reusable: bool,
    pub max_uses: Option<u32>,
    pub expires_at: Option<u64>,
    pub tags: Vec<String>,
    pub auto_approve: bool,
    pub auto_approve_routes: Vec<IpNet>,
    pub node_ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EnrollmentKeyInfo {
    pub id: u64,
    pub description: String,
    pub reusable: bool,
    /// `null`: unlimited (keys created before the default of 100 uses for reusable keys).
    pub max_uses: Option<u32>,
    pub uses: u32,
    /// Unix seconds.
    pub expires_at: Option<u64>,
    pub tags: Vec<String>,
    pub auto_approve: bool,
    /// Advertised routes inside one of these prefixes are approved at registration (only
    /// with `auto_approve`); any other route waits for an admin.
    #[schema(value_type = Vec<String>)]
    pub auto_approve_routes: Vec<IpNet>,
    /// Nodes registered with this key expire this many seconds after registering.
    pub node_ttl_secs: Option<u64>,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
}

impl EnrollmentKeyInfo {
    /// Refuses a revoked, expired or used-up key.
    fn check_usable(&self, now: u64) -> Result<(), StoreError> {
        if self.revoked_at.is_some() {
            return Err(StoreError::EnrollmentKeyRevoked);
        }
        if self.expires_at.is_some_and(|t| now >= t) {
            return Err(StoreError::EnrollmentKeyExpired);
        }
        let limit = if self.reusable {
            self.max_uses
        } else {
            Some(1)
        };
        if limit.is_some_and(|m| self.uses >= m) {
            return Err(StoreError::EnrollmentKeyUsedUp);
        }
        Ok(())
    }
}

/// A route list as stored: sorted, without duplicates.
pub(crate) fn normalized_routes(routes: &[IpNet]) -> Vec<IpNet> {
    let mut routes = routes.to_vec();
    routes.sort();
    routes.dedup();
    routes
}

/// The audit target of a route change: the node, or the name of one being registered.
fn route_target(node: Option<NodeId>, name: &str) -> String {
    node.map_or_else(|| format!("node-name:{name}"), |id| format!("node:{id}"))
}

/// A node's route change, checked by [`guard_routes`] inside the write transaction.
pub(crate) struct RouteChange<'a> {
    /// `None` for a node being registered.
    pub node: Option<NodeId>,
    /// The node's endpoints after the change.
    pub endpoints: &'a [Endpoint],
    /// The new advertised set and the request field it came from.
    pub advertised: Option<(&'static str, &'a [IpNet])>,
    /// The new approved set and the request field it came from.
    pub approved: Option<(&'static str, &'a [IpNet])>,
}

/// Checks a route change against every other non-revoked node in `nodes` (see
/// [`crate::routes`]): advertised routes must stay clear of other nodes' approved routes,
/// approved ones of their advertised routes too; neither may cover the controller or any
/// node's endpoint.
pub(crate) fn guard_routes(
    guard: &RouteGuard,
    nodes: &[NodeRecord],
    change: &RouteChange<'_>,
) -> Result<(), RouteError> {
    let others: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| n.state != NodeState::Revoked && Some(n.id) != change.node)
        .collect();
    let endpoints: Vec<std::net::IpAddr> = others
        .iter()
        .flat_map(|n| &n.endpoints)
        .chain(change.endpoints)
        .map(|e| e.addr.ip())
        .collect();
    let approved: Vec<(NodeId, IpNet)> = others
        .iter()
        .flat_map(|n| n.approved_routes.iter().map(|r| (n.id, *r)))
        .collect();
    if let Some((field, routes)) = change.advertised {
        crate::routes::check(field, routes, &approved, &endpoints, guard)?;
    }
    if let Some((field, routes)) = change.approved {
        let mut held = approved;
        held.extend(
            others
                .iter()
                .flat_map(|n| n.advertised_routes.iter().map(|r| (n.id, *r))),
        );
        crate::routes::check(field, routes, &held, &endpoints, guard)?;
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub public_key: WgPublicKey,
    pub state: NodeState,
    #[schema(value_type = String)]
    pub ipv4: Ipv4Addr,
    #[schema(value_type = String)]
    pub ipv6: Ipv6Addr,
    pub tags: Vec<String>,
    pub endpoints: Vec<Endpoint>,
    #[schema(value_type = Vec<String>)]
    pub advertised_routes: Vec<IpNet>,
    #[schema(value_type = Vec<String>)]
    pub approved_routes: Vec<IpNet>,
    pub enrollment_key_id: Option<u64>,
    pub created_at: u64,
    pub expires_at: Option<u64>,
}

impl NodeRecord {
    pub fn to_topo(&self) -> TopoNode {
        TopoNode {
            name: self.name.clone(),
            public_key: self.public_key,
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            state: self.state,
            tags: self.tags.clone(),
            endpoints: self.endpoints.clone(),
            approved_routes: self.approved_routes.clone(),
            expires_at: self.expires_at,
        }
    }
}

/// When a node was last heard from, and what it last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct NodeSeen {
    /// Unix seconds of the last authenticated request (register, stream, report).
    pub last_seen: u64,
    /// The source address of that request as the controller saw it (behind a reverse proxy:
    /// the proxy's address).
    #[schema(value_type = Option<String>)]
    pub seen_from: Option<std::net::IpAddr>,
    /// Unix seconds of the last status report.
    pub reported_at: Option<u64>,
    pub status: Option<StatusReport>,
}

/// What an authenticated node credential maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAuth {
    pub id: NodeId,
    pub state: NodeState,
    pub expires_at: Option<u64>,
}

/// An admin's changes to a node; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePatch {
    pub name: Option<String>,
    pub tags: Option<Vec<String>>,
    pub approve: bool,
    pub approved_routes: Option<Vec<IpNet>>,
    pub expires_at: Option<Option<u64>>,
}

/// Counts for the metrics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub serial: u64,
    pub pending: u64,
    pub approved: u64,
    pub revoked: u64,
    pub enrollment_keys: u64,
    pub audit_entries: u64,
}

/// Options fixed when the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub pools: Pools,
    /// Stored; a change across restarts bumps the serial (netmaps depend on policy).
    pub policy_fingerprint: String,
    /// The controller's signing public key: recorded at first start, and a store holding a
    /// different one is refused before anything else is written. `None` for offline commands
    /// that sign nothing (`admin-token create`, `audit verify`).
    pub controller_public_key: Option<String>,
    /// What subnet routes are checked against.
    pub route_guard: RouteGuard,
}

/// A persistence backend.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Opens (creating and migrating if needed) the SQLite database in `data_dir`.
    pub async fn open_sqlite(data_dir: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        Ok(Store::Sqlite(SqliteStore::open(data_dir, opts).await?))
    }

    /// Connects to PostgreSQL at `url` (migrating if needed); replicas share this database.
    pub async fn open_postgres(
        url: &str,
        max_connections: u32,
        opts: &StoreOptions,
    ) -> Result<Self, StoreError> {
        Ok(Store::Postgres(
            PgStore::open(url, max_connections, opts).await?,
        ))
    }

    /// A feed of serial bumps committed by *other* processes sharing the database (replicas),
    /// or `None` when the backend has only one writer process (SQLite: the local publish after
    /// each request is enough).
    pub async fn change_feed(&self) -> Result<Option<ChangeFeed>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => s.change_feed().await.map(Some),
        }
    }

    pub fn pools(&self) -> Pools {
        delegate!(self, s => s.pools())
    }

    /// Creates a token (expiring at `expires_at` when given); returns its id and secret.
    pub async fn create_admin_token(
        &self,
        actor: &Actor,
        scope: Scope,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<(u64, String), StoreError> {
        delegate!(self, s => s.create_admin_token(actor, scope, expires_at, now).await)
    }

    /// The token with this hash, unless revoked or expired at `now`.
    pub async fn admin_token(
        &self,
        hash: &[u8; 32],
        now: u64,
    ) -> Result<Option<(u64, Scope)>, StoreError> {
        delegate!(self, s => s.admin_token(hash, now).await)
    }

    pub async fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>, StoreError> {
        delegate!(self, s => s.admin_tokens().await)
    }

    /// Revokes a token (idempotent), audited as `admin_token.revoke`.
    pub async fn revoke_admin_token(
        &self,
        actor: &Actor,
        id: u64,
        now: u64,
    ) -> Result<AdminTokenInfo, StoreError> {
        delegate!(self, s => s.revoke_admin_token(actor, id, now).await)
    }

    pub async fn create_enrollment_key(
        &self,
        actor: &Actor,
        key: &NewEnrollmentKey,
        now: u64,
    ) -> Result<(EnrollmentKeyInfo, String), StoreError> {
        delegate!(self, s => s.create_enrollment_key(actor, key, now).await)
    }

    pub async fn enrollment_keys(&self) -> Result<Vec<EnrollmentKeyInfo>, StoreError> {
        delegate!(self, s => s.enrollment_keys().await)
    }

    pub async fn revoke_enrollment_key(
        &self,
        actor: &Actor,
        id: u64,
        now: u64,
    ) -> Result<EnrollmentKeyInfo, StoreError> {
        delegate!(self, s => s.revoke_enrollment_key(actor, id, now).await)
    }

    /// Checks and consumes the enrollment key, allocates addresses and inserts the node, all
    /// in one write transaction. Returns the node and its credential (shown once).
    pub async fn register(
        &self,
        req: &RegisterRequest,
        now: u64,
    ) -> Result<(NodeRecord, String), StoreError> {
        delegate!(self, s => s.register(req, now).await)
    }

    pub async fn node_by_credential(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<NodeAuth>, StoreError> {
        delegate!(self, s => s.node_by_credential(hash).await)
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        delegate!(self, s => s.nodes().await)
    }

    pub async fn node(&self, id: NodeId) -> Result<NodeRecord, StoreError> {
        delegate!(self, s => s.node(id).await)
    }

    pub async fn patch_node(
        &self,
        actor: &Actor,
        id: NodeId,
        patch: &NodePatch,
        now: u64,
    ) -> Result<NodeRecord, StoreError> {
        delegate!(self, s => s.patch_node(actor, id, patch, now).await)
    }

    pub async fn revoke_node(
        &self,
        actor: &Actor,
        id: NodeId,
        now: u64,
    ) -> Result<NodeRecord, StoreError> {
        delegate!(self, s => s.revoke_node(actor, id, now).await)
    }

    pub async fn delete_node(&self, actor: &Actor, id: NodeId, now: u64) -> Result<(), StoreError> {
        delegate!(self, s => s.delete_node(actor, id, now).await)
    }

    /// Folds node expiries that happened by `now` into the serial; returns the expired nodes.
    pub async fn sweep_expired(&self, now: u64) -> Result<Vec<NodeId>, StoreError> {
        delegate!(self, s => s.sweep_expired(now).await)
    }

    /// Records contact from `seen_from`; replaces local endpoints and/or advertised routes when
    /// given. Returns whether netmaps changed (serial bumped).
    pub async fn report_endpoints(
        &self,
        id: NodeId,
        local: Option<&[Endpoint]>,
        routes: Option<&[IpNet]>,
        seen_from: Option<std::net::IpAddr>,
        now: u64,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.report_endpoints(id, local, routes, seen_from, now).await)
    }

    pub async fn report_status(
        &self,
        id: NodeId,
        report: &StatusReport,
        seen_from: Option<std::net::IpAddr>,
        now: u64,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.report_status(id, report, seen_from, now).await)
    }

    pub async fn node_seen(&self, id: NodeId) -> Result<Option<NodeSeen>, StoreError> {
        delegate!(self, s => s.node_seen(id).await)
    }

    /// Every node's last contact and report (nodes that never called in are absent).
    pub async fn nodes_seen(
        &self,
    ) -> Result<std::collections::HashMap<NodeId, NodeSeen>, StoreError> {
        delegate!(self, s => s.nodes_seen().await)
    }

    pub async fn rotate_key(
        &self,
        id: NodeId,
        key: &WgPublicKey,
        now: u64,
    ) -> Result<NodeRecord, StoreError> {
        delegate!(self, s => s.rotate_key(id, key, now).await)
    }

    pub async fn serial(&self) -> Result<u64, StoreError> {
        delegate!(self, s => s.serial().await)
    }

    /// The serial and every node, read in one transaction.
    pub async fn topology_snapshot(&self) -> Result<(u64, BTreeMap<NodeId, TopoNode>), StoreError> {
        delegate!(self, s => s.topology_snapshot().await)
    }

    pub async fn audit_entries(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        delegate!(self, s => s.audit_entries(after, limit).await)
    }

    pub async fn verify_audit(
        &self,
    ) -> Result<Result<ChainHead, crate::audit::ChainError>, StoreError> {
        delegate!(self, s => s.verify_audit().await)
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        delegate!(self, s => s.stats().await)
    }

    pub async fn close(&self) {
        delegate!(self, s => s.close().await)
    }
}
