//! PostgreSQL backend (sqlx): for several controller replicas sharing one database.
//!
//! Concurrency model: every write that appends to the audit log (admin changes, registrations,
//! key rotation, the expiry sweep, start-up settings) first takes one transaction-scoped
//! advisory lock, `WRITE_LOCK`, so these writes are serialised across *all* replicas exactly
//! as SQLite's `BEGIN IMMEDIATE` serialises them inside one process. Under the lock each
//! statement of a READ COMMITTED transaction sees every earlier committed write, so the IPAM
//! high-water mark, enrollment key use counts and the audit chain head are read-check-written
//! without races; unique constraints (addresses, `audit_log.seq`, public keys) are the second
//! line of defence. Node reports (endpoints, status) skip the global lock: they lock their
//! node row instead, so thousands of agents reconnecting do not queue behind admin writes.
//! Lock order everywhere: advisory lock, node row, `node_status` row, `counters` rows.
//!
//! The topology `serial` is a row in `counters`, bumped with `UPDATE … RETURNING` inside the
//! writing transaction: the row lock is held until commit, so serials are committed in order
//! and are monotonic across replicas. Each bump also queues `NOTIFY skymesh_serial` (delivered
//! only on commit), which every replica's [`ChangeFeed`] turns into a wake-up of its netmap
//! streams. Snapshots are read in one REPEATABLE READ transaction, so the serial and the nodes
//! they are read with always agree.

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::time::Duration;

use skymesh_proto::{NodeId, NodeState, RegisterRequest};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row as _, Transaction};

use super::{
    guard_routes, Actor, EnrollmentKeyInfo, NewEnrollmentKey, NodeAuth, NodePatch, NodeRecord,
    RouteChange, Scope, Stats, StoreError, StoreOptions,
};
use crate::audit::{self, AuditEntry, ChainError, ChainHead};
use crate::ipam::{Allocator, Pools};
use crate::netmap::TopoNode;
use crate::routes::RouteGuard;
use crate::secrets;

mod live;
use crate::store::rows;

use rows::{corrupt, key_from_row, node_from_row, state_str, to_i64, to_json, to_u64};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations_pg");

/// Key of the advisory lock serialising audited writes across replicas ("skymesh" + 1).
const WRITE_LOCK: i64 = 0x736b_796d_6573_6801;

/// The channel every serial bump is announced on; the payload is the new serial.
pub const CHANGES_CHANNEL: &str = "skymesh_serial";

const NODE_COLUMNS: &str = "id, name, public_key, ipv4, ipv6, state, tags, endpoints, \
     advertised_routes, approved_routes, enrollment_key_id, created_at, expires_at";
const KEY_COLUMNS: &str = "id, description, reusable, max_uses, uses, expires_at, tags, \
     auto_approve, auto_approve_routes, node_ttl_secs, created_at, revoked_at";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Enrollment-key checks of unauthenticated registrations (one connection, opened on
    /// first use): a flood of junk keys queues behind itself, not behind everyone else.
    probe: PgPool,
    pools: Pools,
    guard: RouteGuard,
}

/// Wakes a replica when any replica (itself included) committed a serial bump.
#[derive(Debug)]
pub struct ChangeFeed {
    listener: PgListener,
}

impl ChangeFeed {
    /// Waits for the next change notification. Returns `Ok(None)` when the connection was
    /// lost and re-established: notifications may have been missed, so the caller should
    /// re-read the serial. Returns an error once the store is closed.
    pub async fn next(&mut self) -> Result<Option<u64>, StoreError> {
        match self.listener.try_recv().await? {
            // An unparsable payload still means "something changed": report serial 0.
            Some(n) => Ok(Some(n.payload().parse().unwrap_or(0))),
            None => Ok(None),
        }
    }
}

async fn bump_serial(tx: &mut Transaction<'_, Postgres>) -> Result<u64, StoreError> {
    let v: i64 = sqlx::query_scalar(
        "UPDATE counters SET value = value + 1 WHERE name = 'serial' RETURNING value",
    )
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGES_CHANNEL)
        .bind(v.to_string())
        .execute(&mut **tx)
        .await?;
    to_u64(v)
}

/// Appends an entry to the audit chain inside the caller's write transaction (which holds
/// `WRITE_LOCK`, so the head read here is the head this entry extends).
async fn append_audit(
    tx: &mut Transaction<'_, Postgres>,
    now: u64,
    actor: &Actor,
    action: &str,
    target: Option<&str>,
    detail: serde_json::Value,
) -> Result<(), StoreError> {
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?;
    let (prev_seq, prev_hash) = match last {
        None => (0, audit::GENESIS),
        Some((seq, hash)) => {
            let bytes: [u8; 32] = hex::decode(&hash)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| corrupt(format!("audit entry {seq} hash")))?;
            (to_u64(seq)?, bytes)
        }
    };
    let seq = prev_seq + 1;
    let detail = detail.to_string();
    let hash = audit::entry_hash(&prev_hash, seq, now, &actor.0, action, target, &detail);
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, action, target, detail, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(to_i64(seq))
    .bind(to_i64(now))
    .bind(&actor.0)
    .bind(action)
    .bind(target)
    .bind(detail)
    .bind(hex::encode(prev_hash))
    .bind(hex::encode(hash))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `url` with any password replaced by `***`, for logs and error messages: the one in the
/// user info and the `password` / `sslpassword` query parameters libpq also accepts.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k == "password" || k == "sslpassword" => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

impl PgStore {
    /// Connects, runs migrations (sqlx holds an advisory lock meanwhile, so replicas starting
    /// together migrate once) and checks the settings pinned at first start.
    pub async fn open(
        url: &str,
        max_connections: u32,
        opts: &StoreOptions,
    ) -> Result<Self, StoreError> {
        let connect = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            // One more for the `LISTEN` connection, which a `ChangeFeed` holds for good.
            .max_connections(max_connections.saturating_add(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(connect.clone())
            .await?;
        let probe = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy_with(connect);
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Db(e.into()))?;
        let store = Self {
            pool,
            probe,
            pools: opts.pools,
            guard: opts.route_guard.clone(),
        };
        store.check_settings(opts).await?;
        Ok(store)
    }

    /// A transaction holding the cross-replica write lock.
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Subscribes to serial bumps committed by any replica.
    pub async fn change_feed(&self) -> Result<ChangeFeed, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        Ok(ChangeFeed { listener })
    }

    /// Pins the controller key (when given) and the overlay prefixes, records the policy: one
    /// transaction under the write lock, key first, so a refused replica writes nothing (a
    /// replica with another key must not replace the policy the others run).
    async fn check_settings(&self, opts: &StoreOptions) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(key) = &opts.controller_public_key {
            pin_setting(&mut tx, "controller_public_key", key, |have| {
                super::key_mismatch(have, key)
            })
            .await?;
        }
        for (name, want) in [
            ("overlay_ipv4", opts.pools.v4.to_string()),
            ("overlay_ipv6", opts.pools.v6.to_string()),
        ] {
            pin_setting(&mut tx, name, &want, |have| {
                format!(
                    "the database was created with {name} = {have}, but the configuration \
                     says {want}; nodes already hold addresses in {have}, so changing the \
                     overlay is not supported"
                )
            })
            .await?;
        }
        let have: Option<String> =
            sqlx::query_scalar("SELECT value FROM settings WHERE name = 'policy'")
                .fetch_optional(&mut *tx)
                .await?;
        if have.as_deref() != Some(opts.policy_fingerprint.as_str()) {
            if have.is_some() {
                // Legitimate for a restart with a new policy; with replicas running, those on
                // the old policy compute different netmaps until they restart too.
                tracing::warn!(
                    "the tag policy differs from the one the last replica started with; every \
                     replica must run the same policy"
                );
            }
            sqlx::query(
                "INSERT INTO settings (name, value) VALUES ('policy', $1) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(&opts.policy_fingerprint)
            .execute(&mut *tx)
            .await?;
            if have.is_some() {
                bump_serial(&mut tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub fn pools(&self) -> Pools {
        self.pools
    }

    pub async fn create_admin_token(
        &self,
        actor: &Actor,
        scope: Scope,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<(u64, String), StoreError> {
        let (token, hash) = secrets::generate(secrets::ADMIN_TOKEN_PREFIX);
        let mut tx = self.begin_write().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO admin_tokens (token_hash, scope, created_at, expires_at) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(&hash[..])
        .bind(scope.as_str())
        .bind(to_i64(now))
        .bind(expires_at.map(to_i64))
        .fetch_one(&mut *tx)
        .await?;
        append_audit(
            &mut tx,
            now,
            actor,
            "admin_token.create",
            Some(&format!("admin-token:{id}")),
            serde_json::json!({ "scope": scope.as_str(), "expires_at": expires_at }),
        )
        .await?;
        tx.commit().await?;
        Ok((to_u64(id)?, token))
    }

    pub async fn admin_token(
        &self,
        hash: &[u8; 32],
        now: u64,
    ) -> Result<Option<(u64, Scope)>, StoreError> {
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT id, scope FROM admin_tokens WHERE token_hash = $1 \
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(&hash[..])
        .bind(to_i64(now))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(id, scope)| Ok((to_u64(id)?, Scope::parse(&scope)?)))
            .transpose()
    }

    pub async fn admin_tokens(&self) -> Result<Vec<super::AdminTokenInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, scope, created_at, expires_at, revoked_at FROM admin_tokens ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::token_from_row).collect()
    }

    pub async fn revoke_admin_token(
        &self,
        actor: &Actor,
        id: u64,
        now: u64,
    ) -> Result<super::AdminTokenInfo, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE admin_tokens SET revoked_at = coalesce(revoked_at, $1) WHERE id = $2 \
             RETURNING id, scope, created_at, expires_at, revoked_at",
        )
        .bind(to_i64(now))
        .bind(to_i64(id))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("admin token"))?;
        let info = rows::token_from_row(&row)?;
        append_audit(
            &mut tx,
            now,
            actor,
            "admin_token.revoke",
            Some(&format!("admin-token:{id}")),
            serde_json::json!({}),
        )
        .await?;
        tx.commit().await?;
        Ok(info)
    }

    pub async fn create_enrollment_key(
        &self,
        actor: &Actor,
        key: &NewEnrollmentKey,
        now: u64,
    ) -> Result<(EnrollmentKeyInfo, String), StoreError> {
        let (secret, hash) = secrets::generate(secrets::ENROLLMENT_KEY_PREFIX);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "INSERT INTO enrollment_keys (key_hash, description, reusable, max_uses, expires_at, \
             tags, auto_approve, auto_approve_routes, node_ttl_secs, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {KEY_COLUMNS}"
        ))
        .bind(&hash[..])
        .bind(&key.description)
        .bind(key.reusable)
        .bind(key.max_uses.map(i64::from))
        .bind(key.expires_at.map(to_i64))
        .bind(to_json(&key.tags)?)
        .bind(key.auto_approve)
        .bind(to_json(&key.auto_approve_routes)?)
        .bind(key.node_ttl_secs.map(to_i64))
        .bind(to_i64(now))
        .fetch_one(&mut *tx)
        .await?;
        let info = key_from_row(&row)?;
        append_audit(
            &mut tx,
            now,
            actor,
            "enrollment_key.create",
            Some(&format!("enrollment-key:{}", info.id)),
            serde_json::json!({
                "reusable": info.reusable, "max_uses": info.max_uses,
                "expires_at": info.expires_at, "tags": info.tags,
                "auto_approve": info.auto_approve,
                "auto_approve_routes": info.auto_approve_routes,
                "node_ttl_secs": info.node_ttl_secs,
            }),
        )
        .await?;
        tx.commit().await?;
        Ok((info, secret))
    }

    pub async fn enrollment_keys(&self) -> Result<Vec<EnrollmentKeyInfo>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM enrollment_keys ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    pub async fn revoke_enrollment_key(
        &self,
        actor: &Actor,
        id: u64,
        now: u64,
    ) -> Result<EnrollmentKeyInfo, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE enrollment_keys SET revoked_at = coalesce(revoked_at, $1) WHERE id = $2 \
             RETURNING {KEY_COLUMNS}"
        ))
        .bind(to_i64(now))
        .bind(to_i64(id))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("enrollment key"))?;
        let info = key_from_row(&row)?;
        append_audit(
            &mut tx,
            now,
            actor,
            "enrollment_key.revoke",
            Some(&format!("enrollment-key:{id}")),
            serde_json::json!({}),
        )
        .await?;
        tx.commit().await?;
        Ok(info)
    }

    pub async fn register(
        &self,
        req: &RegisterRequest,
        now: u64,
    ) -> Result<(NodeRecord, String), StoreError> {
        let key_hash = secrets::hash(&req.enrollment_key);
        // A junk or dead key is refused before the write lock is taken.
        Self::enrollment_key(&self.probe, &key_hash)
            .await?
            .check_usable(now)?;
        let mut tx = self.begin_write().await?;
        // Again under the lock, where uses are counted.
        let key = Self::enrollment_key(&mut *tx, &key_hash).await?;
        key.check_usable(now)?;

        let public_key = req.public_key.to_string();
        let taken: Option<i64> = sqlx::query_scalar("SELECT id FROM nodes WHERE public_key = $1")
            .bind(&public_key)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(StoreError::DuplicatePublicKey);
        }

        let routes = super::normalized_routes(&req.routes);
        let approved_routes = if key.auto_approve {
            crate::routes::auto_approved(&routes, &key.auto_approve_routes)
        } else {
            Vec::new()
        };
        if !routes.is_empty() {
            let change = RouteChange {
                node: None,
                endpoints: &req.endpoints,
                advertised: Some(("routes", &routes)),
                approved: Some(("routes", &approved_routes)),
            };
            if let Err(e) = guard_routes(&self.guard, &Self::live_nodes_in(&mut tx).await?, &change)
            {
                tx.rollback().await?;
                let actor = Actor(format!("enrollment-key:{}", key.id));
                return Err(self
                    .refuse_routes(&actor, None, &req.name, &routes, e, now)
                    .await);
            }
        }

        let next: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'ipam_next' FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        let mut alloc = Allocator {
            next: to_u64(next)?,
        };
        let (ipv4, ipv6) = alloc
            .allocate(&self.pools)
            .map_err(|_| StoreError::PoolExhausted)?;
        sqlx::query("UPDATE counters SET value = $1 WHERE name = 'ipam_next'")
            .bind(to_i64(alloc.next))
            .execute(&mut *tx)
            .await?;

        let (credential, credential_hash) = secrets::generate(secrets::NODE_CREDENTIAL_PREFIX);
        let mut tags = key.tags.clone();
        tags.sort();
        tags.dedup();
        let state = if key.auto_approve {
            NodeState::Approved
        } else {
            NodeState::Pending
        };
        let expires_at = key.node_ttl_secs.map(|ttl| now.saturating_add(ttl));
        let row = sqlx::query(&format!(
            "INSERT INTO nodes (name, public_key, ipv4, ipv6, state, tags, endpoints, \
             advertised_routes, approved_routes, credential_hash, enrollment_key_id, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             RETURNING {NODE_COLUMNS}"
        ))
        .bind(&req.name)
        .bind(&public_key)
        .bind(ipv4.to_string())
        .bind(ipv6.to_string())
        .bind(state_str(state)?)
        .bind(to_json(&tags)?)
        .bind(to_json(&req.endpoints)?)
        .bind(to_json(&routes)?)
        .bind(to_json(&approved_routes)?)
        .bind(&credential_hash[..])
        .bind(to_i64(key.id))
        .bind(to_i64(now))
        .bind(expires_at.map(to_i64))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(ref d) if d.is_unique_violation() => {
                corrupt(format!("registration hit a unique constraint: {d}"))
            }
            other => StoreError::Db(other),
        })?;
        let node = node_from_row(&row)?;

        sqlx::query(
            "INSERT INTO allocated_addresses (ipv4, ipv6, node_id, allocated_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(ipv4.to_string())
        .bind(ipv6.to_string())
        .bind(to_i64(node.id.0))
        .bind(to_i64(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE enrollment_keys SET uses = uses + 1 WHERE id = $1")
            .bind(to_i64(key.id))
            .execute(&mut *tx)
            .await?;
        bump_serial(&mut tx).await?;
        append_audit(
            &mut tx,
            now,
            &Actor(format!("enrollment-key:{}", key.id)),
            "node.register",
            Some(&format!("node:{}", node.id)),
            serde_json::json!({
                "name": node.name, "public_key": public_key, "state": state_str(state)?,
                "ipv4": ipv4.to_string(), "ipv6": ipv6.to_string(), "tags": node.tags,
                "advertised_routes": node.advertised_routes,
                "approved_routes": node.approved_routes,
            }),
        )
        .await?;
        tx.commit().await?;
        Ok((node, credential))
    }

    pub async fn node_by_credential(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<NodeAuth>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE credential_hash = $1"
        ))
        .bind(&hash[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let n = node_from_row(&r)?;
            Ok(NodeAuth {
                id: n.id,
                state: n.state,
                expires_at: n.expires_at,
            })
        })
        .transpose()
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(node_from_row).collect()
    }

    pub async fn node(&self, id: NodeId) -> Result<NodeRecord, StoreError> {
        let row = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"))
            .bind(to_i64(id.0))
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("node"))?;
        node_from_row(&row)
    }

    async fn enrollment_key<'e>(
        db: impl sqlx::Executor<'e, Database = Postgres>,
        hash: &[u8; 32],
    ) -> Result<EnrollmentKeyInfo, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM enrollment_keys WHERE key_hash = $1"
        ))
        .bind(&hash[..])
        .fetch_optional(db)
        .await?
        .ok_or(StoreError::InvalidEnrollmentKey)?;
        key_from_row(&row)
    }

    /// Every node that is not revoked (what routes are checked against); the caller holds
    /// the write lock, so no route changes meanwhile.
    async fn live_nodes_in(
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE state <> 'revoked'"
        ))
        .fetch_all(&mut **tx)
        .await?;
        rows.iter().map(node_from_row).collect()
    }

    /// Audits a refused route change (in its own transaction: the change itself rolled back)
    /// and returns the refusal.
    async fn refuse_routes(
        &self,
        actor: &Actor,
        node: Option<NodeId>,
        name: &str,
        routes: &[ipnet::IpNet],
        refusal: crate::routes::RouteError,
        now: u64,
    ) -> StoreError {
        let audited = async {
            let mut tx = self.begin_write().await?;
            append_audit(
                &mut tx,
                now,
                actor,
                "node.routes_refused",
                Some(&super::route_target(node, name)),
                serde_json::json!({ "routes": routes, "reason": refusal.to_string() }),
            )
            .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        };
        match audited.await {
            Ok(()) => refusal.into(),
            Err(e) => e,
        }
    }

    /// The node, row-locked until the transaction ends (writers read-modify-write it).
    async fn node_in(
        tx: &mut Transaction<'_, Postgres>,
        id: NodeId,
    ) -> Result<NodeRecord, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1 FOR UPDATE"
        ))
        .bind(to_i64(id.0))
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound("node"))?;
        node_from_row(&row)
    }

    pub async fn patch_node(
        &self,
        actor: &Actor,
        id: NodeId,
        patch: &NodePatch,
        now: u64,
    ) -> Result<NodeRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut node = Self::node_in(&mut tx, id).await?;
        if node.state == NodeState::Revoked {
            return Err(StoreError::NodeRevoked);
        }
        let mut detail = serde_json::Map::new();
        if let Some(name) = &patch.name {
            detail.insert("name".into(), name.clone().into());
            node.name = name.clone();
        }
        if let Some(tags) = &patch.tags {
            let mut tags = tags.clone();
            tags.sort();
            tags.dedup();
            detail.insert("tags".into(), tags.clone().into());
            node.tags = tags;
        }
        if patch.approve && node.state == NodeState::Pending {
            detail.insert("approve".into(), true.into());
            node.state = NodeState::Approved;
        }
        if let Some(routes) = &patch.approved_routes {
            if let Some(r) = routes.iter().find(|r| !node.advertised_routes.contains(r)) {
                return Err(StoreError::RouteNotAdvertised(*r));
            }
            let routes = super::normalized_routes(routes);
            let change = RouteChange {
                node: Some(id),
                endpoints: &node.endpoints,
                advertised: None,
                approved: Some(("approved_routes", &routes)),
            };
            if let Err(e) = guard_routes(&self.guard, &Self::live_nodes_in(&mut tx).await?, &change)
            {
                tx.rollback().await?;
                return Err(self
                    .refuse_routes(actor, Some(id), &node.name, &routes, e, now)
                    .await);
            }
            detail.insert("approved_routes".into(), serde_json::json!(routes));
            node.approved_routes = routes;
        }
        if let Some(expires_at) = patch.expires_at {
            detail.insert("expires_at".into(), expires_at.into());
            node.expires_at = expires_at;
        }
        if detail.is_empty() {
            // Nothing to change: no write, no serial bump, no audit entry.
            return Ok(node);
        }
        sqlx::query(
            "UPDATE nodes SET name = $1, tags = $2, state = $3, approved_routes = $4, \
             expires_at = $5 WHERE id = $6",
        )
        .bind(&node.name)
        .bind(to_json(&node.tags)?)
        .bind(state_str(node.state)?)
        .bind(to_json(&node.approved_routes)?)
        .bind(node.expires_at.map(to_i64))
        .bind(to_i64(id.0))
        .execute(&mut *tx)
        .await?;
        bump_serial(&mut tx).await?;
        append_audit(
            &mut tx,
            now,
            actor,
            "node.update",
            Some(&format!("node:{id}")),
            serde_json::Value::Object(detail),
        )
        .await?;
        tx.commit().await?;
        Ok(node)
    }

    pub async fn revoke_node(
        &self,
        actor: &Actor,
        id: NodeId,
        now: u64,
    ) -> Result<NodeRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut node = Self::node_in(&mut tx, id).await?;
        if node.state == NodeState::Revoked {
            return Ok(node);
        }
        sqlx::query("UPDATE nodes SET state = 'revoked' WHERE id = $1")
            .bind(to_i64(id.0))
            .execute(&mut *tx)
            .await?;
        node.state = NodeState::Revoked;
        bump_serial(&mut tx).await?;
        append_audit(
            &mut tx,
            now,
            actor,
            "node.revoke",
            Some(&format!("node:{id}")),
            serde_json::json!({ "public_key": node.public_key.to_string() }),
        )
        .await?;
        tx.commit().await?;
        Ok(node)
    }

    pub async fn delete_node(&self, actor: &Actor, id: NodeId, now: u64) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let node = Self::node_in(&mut tx, id).await?;
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(to_i64(id.0))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM node_status WHERE node_id = $1")
            .bind(to_i64(id.0))
            .execute(&mut *tx)
            .await?;
        bump_serial(&mut tx).await?;
        append_audit(
            &mut tx,
            now,
            actor,
            "node.delete",
            Some(&format!("node:{id}")),
            serde_json::json!({
                "name": node.name, "public_key": node.public_key.to_string(),
                "ipv4": node.ipv4.to_string(), "ipv6": node.ipv6.to_string(),
            }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Bumps the serial (and audits `node.expire`) for every approved node whose expiry fell in
    /// `(last sweep, now]`. Every replica sweeps; the lock and `expiry_swept_at` make each
    /// expiry audited once.
    pub async fn sweep_expired(&self, now: u64) -> Result<Vec<NodeId>, StoreError> {
        let swept: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'expiry_swept_at'")
                .fetch_one(&self.pool)
                .await?;
        if to_u64(swept)? >= now {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let swept: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'expiry_swept_at'")
                .fetch_one(&mut *tx)
                .await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM nodes WHERE state = 'approved' AND expires_at > $1 \
             AND expires_at <= $2 ORDER BY id",
        )
        .bind(swept)
        .bind(to_i64(now))
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query("UPDATE counters SET value = $1 WHERE name = 'expiry_swept_at'")
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
        bump_serial(&mut tx).await?;
        let mut expired = Vec::with_capacity(ids.len());
        for id in ids {
            let id = NodeId(to_u64(id)?);
            append_audit(
                &mut tx,
                now,
                &Actor("system".into()),
                "node.expire",
                Some(&format!("node:{id}")),
                serde_json::json!({}),
            )
            .await?;
            expired.push(id);
        }
        tx.commit().await?;
        Ok(expired)
    }

    pub async fn serial(&self) -> Result<u64, StoreError> {
        let v: i64 = sqlx::query_scalar("SELECT value FROM counters WHERE name = 'serial'")
            .fetch_one(&self.pool)
            .await?;
        to_u64(v)
    }

    pub async fn topology_snapshot(&self) -> Result<(u64, BTreeMap<NodeId, TopoNode>), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let serial: i64 = sqlx::query_scalar("SELECT value FROM counters WHERE name = 'serial'")
            .fetch_one(&mut *tx)
            .await?;
        let rows = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes"))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut nodes = BTreeMap::new();
        for row in &rows {
            let n = node_from_row(row)?;
            nodes.insert(n.id, n.to_topo());
        }
        Ok((to_u64(serial)?, nodes))
    }

    pub async fn audit_entries(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, detail, prev_hash, hash FROM audit_log \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(to_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    seq: to_u64(r.try_get("seq")?)?,
                    at: to_u64(r.try_get("at")?)?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    detail: r.try_get("detail")?,
                    prev_hash: r.try_get("prev_hash")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }

    pub async fn verify_audit(&self) -> Result<Result<ChainHead, ChainError>, StoreError> {
        let mut verifier = audit::Verifier::default();
        let mut after = 0;
        loop {
            let page = self.audit_entries(after, 10_000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for e in &page {
                if let Err(e) = verifier.push(e) {
                    return Ok(Err(e));
                }
            }
        }
        Ok(Ok(verifier.finish()))
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let (serial, pending, approved, revoked, keys, audit): (i64, i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT (SELECT value FROM counters WHERE name = 'serial'), \
                 (SELECT count(*) FROM nodes WHERE state = 'pending'), \
                 (SELECT count(*) FROM nodes WHERE state = 'approved'), \
                 (SELECT count(*) FROM nodes WHERE state = 'revoked'), \
                 (SELECT count(*) FROM enrollment_keys WHERE revoked_at IS NULL), \
                 (SELECT count(*) FROM audit_log)",
            )
            .fetch_one(&self.pool)
            .await?;
        Ok(Stats {
            serial: to_u64(serial)?,
            pending: to_u64(pending)?,
            approved: to_u64(approved)?,
            revoked: to_u64(revoked)?,
            enrollment_keys: to_u64(keys)?,
            audit_entries: to_u64(audit)?,
        })
    }

    pub async fn close(&self) {
        self.probe.close().await;
        self.pool.close().await;
    }
}

/// Inserts `name = want` if unset; refuses (with `mismatch(have)`) a different stored value.
async fn pin_setting(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
    want: &str,
    mismatch: impl FnOnce(&str) -> String,
) -> Result<(), StoreError> {
    let have: Option<String> = sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?;
    match have {
        None => {
            sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2)")
                .bind(name)
                .bind(want)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }
        Some(have) if have == want => Ok(()),
        Some(have) => Err(StoreError::Config(mismatch(&have))),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted_from_database_urls() {
        assert_eq!(
            redact_url("postgres://skymesh:s3cr:et@db.example:5432/skymesh?sslmode=require"),
            "postgres://skymesh:***@db.example:5432/skymesh?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://skymesh@db/x"),
            "postgres://skymesh@db/x"
        );
        assert_eq!(
            redact_url("postgresql:///skymesh?host=/run/postgresql"),
            "postgresql:///skymesh?host=/run/postgresql"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=s&password=hunter2&sslmode=require&sslpassword=k"),
            "postgres://db/x?user=s&password=***&sslmode=require&sslpassword=***"
        );
        assert_eq!(
            redact_url("postgres://u:p@db?password=q"),
            "postgres://u:***@db?password=***"
        );
    }
}
