//! What nodes tell the controller after joining, on PostgreSQL (see `../sqlite/live.rs` for
//! the model). These writes append nothing to the audit log, so they do not take the global
//! write lock: they lock the node's row (`FOR UPDATE` when rewriting it, `FOR KEY SHARE` when
//! only touching `node_status`, which still keeps a concurrent delete from orphaning a row).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use skymesh_proto::{Endpoint, NodeId, NodeState, StatusReport, WgPublicKey};
use sqlx::Row as _;

use super::{append_audit, bump_serial, PgStore};
use crate::store::rows::{corrupt, seen_from_row, to_i64, to_json, to_u64};
use crate::store::{
    guard_routes, stored_endpoints, Actor, NodeRecord, NodeSeen, RouteChange, StoreError,
};

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

impl PgStore {
    async fn touch_in(
        tx: &mut Tx,
        id: NodeId,
        seen_from: Option<IpAddr>,
        now: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_status (node_id, last_seen, seen_from) VALUES ($1, $2, $3) \
             ON CONFLICT (node_id) DO UPDATE SET last_seen = excluded.last_seen, \
             seen_from = COALESCE(excluded.seen_from, node_status.seen_from)",
        )
        .bind(to_i64(id.0))
        .bind(to_i64(now))
        .bind(seen_from.map(|ip| ip.to_string()))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Records that the node was heard from `seen_from`; replaces its local endpoints and/or
    /// advertised routes when given. Returns whether the serial was bumped.
    ///
    /// A route change is checked against every other node and audited, so it needs the write
    /// lock, which comes before the node's row lock: the first attempt runs without it and,
    /// finding the routes changed, rolls back and runs again with it.
    pub async fn report_endpoints(
        &self,
        id: NodeId,
        local: Option<&[Endpoint]>,
        routes: Option<&[IpNet]>,
        seen_from: Option<IpAddr>,
        now: u64,
    ) -> Result<bool, StoreError> {
        let routes = routes.map(crate::store::normalized_routes);
        let report = |locked| self.report_endpoints_in(locked, id, local, &routes, seen_from, now);
        match report(false).await? {
            Some(changed) => Ok(changed),
            None => report(true)
                .await?
                .ok_or_else(|| corrupt("route change needs the lock it holds")),
        }
    }

    /// `None`: the routes changed and `locked` is false.
    async fn report_endpoints_in(
        &self,
        locked: bool,
        id: NodeId,
        local: Option<&[Endpoint]>,
        routes: &Option<Vec<IpNet>>,
        seen_from: Option<IpAddr>,
        now: u64,
    ) -> Result<Option<bool>, StoreError> {
        let mut tx = if locked {
            self.begin_write().await?
        } else {
            self.pool.begin().await?
        };
        let mut node = Self::node_in(&mut tx, id).await?;
        Self::touch_in(&mut tx, id, seen_from, now).await?;
        let local = local.map_or_else(|| node.endpoints.clone(), <[Endpoint]>::to_vec);
        let endpoints = stored_endpoints(&local);
        let mut changed = endpoints != node.endpoints;
        node.endpoints = endpoints;
        if let Some(routes) = routes.as_ref().filter(|r| **r != node.advertised_routes) {
            if !locked {
                tx.rollback().await?;
                return Ok(None);
            }
            let change = RouteChange {
                node: Some(id),
                endpoints: &node.endpoints,
                advertised: Some(("routes", routes)),
                approved: None,
            };
            if let Err(e) = guard_routes(&self.guard, &Self::live_nodes_in(&mut tx).await?, &change)
            {
                tx.rollback().await?;
                let actor = Actor(format!("node:{id}"));
                return Err(self
                    .refuse_routes(&actor, Some(id), &node.name, routes, e, now)
                    .await);
            }
            // Approval covers a prefix only while it is still advertised.
            node.approved_routes.retain(|r| routes.contains(r));
            append_audit(
                &mut tx,
                now,
                &Actor(format!("node:{id}")),
                "node.routes_advertise",
                Some(&format!("node:{id}")),
                serde_json::json!({
                    "advertised_routes": routes, "approved_routes": node.approved_routes,
                }),
            )
            .await?;
            node.advertised_routes.clone_from(routes);
            changed = true;
        }
        if changed {
            sqlx::query(
                "UPDATE nodes SET endpoints = $1, advertised_routes = $2, approved_routes = $3 \
                 WHERE id = $4",
            )
            .bind(to_json(&node.endpoints)?)
            .bind(to_json(&node.advertised_routes)?)
            .bind(to_json(&node.approved_routes)?)
            .bind(to_i64(id.0))
            .execute(&mut *tx)
            .await?;
            // A pending node is in no netmap: its reports must not wake every stream.
            if node.state != NodeState::Pending {
                bump_serial(&mut tx).await?;
            }
        }
        tx.commit().await?;
        Ok(Some(changed && node.state != NodeState::Pending))
    }

    /// Stores the node's latest status report (replacing the previous one).
    pub async fn report_status(
        &self,
        id: NodeId,
        report: &StatusReport,
        seen_from: Option<IpAddr>,
        now: u64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT id FROM nodes WHERE id = $1 FOR KEY SHARE")
                .bind(to_i64(id.0))
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound("node"));
        }
        Self::touch_in(&mut tx, id, seen_from, now).await?;
        sqlx::query("UPDATE node_status SET reported_at = $1, report = $2 WHERE node_id = $3")
            .bind(to_i64(now))
            .bind(to_json(report)?)
            .bind(to_i64(id.0))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn node_seen(&self, id: NodeId) -> Result<Option<NodeSeen>, StoreError> {
        sqlx::query(
            "SELECT last_seen, seen_from, reported_at, report FROM node_status \
             WHERE node_id = $1",
        )
        .bind(to_i64(id.0))
        .fetch_optional(&self.pool)
        .await?
        .map(|row| seen_from_row(&row))
        .transpose()
    }

    /// Every node's last contact and report, in one query (metrics scrapes).
    pub async fn nodes_seen(&self) -> Result<HashMap<NodeId, NodeSeen>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, last_seen, seen_from, reported_at, report FROM node_status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    NodeId(to_u64(row.try_get("node_id")?)?),
                    seen_from_row(row)?,
                ))
            })
            .collect()
    }

    /// Replaces the node's WireGuard public key (the node rotated it), bumping the serial.
    /// Audited, so it takes the global write lock.
    pub async fn rotate_key(
        &self,
        id: NodeId,
        key: &WgPublicKey,
        now: u64,
    ) -> Result<NodeRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut node = Self::node_in(&mut tx, id).await?;
        if node.state == NodeState::Revoked {
            return Err(StoreError::NodeRevoked);
        }
        if node.public_key == *key {
            return Ok(node);
        }
        let taken: Option<i64> = sqlx::query_scalar("SELECT id FROM nodes WHERE public_key = $1")
            .bind(key.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(StoreError::DuplicatePublicKey);
        }
        let old = node.public_key;
        sqlx::query("UPDATE nodes SET public_key = $1 WHERE id = $2")
            .bind(key.to_string())
            .bind(to_i64(id.0))
            .execute(&mut *tx)
            .await?;
        node.public_key = *key;
        bump_serial(&mut tx).await?;
        append_audit(
            &mut tx,
            now,
            &Actor(format!("node:{id}")),
            "node.rotate_key",
            Some(&format!("node:{id}")),
            serde_json::json!({ "old_public_key": old.to_string(), "public_key": key.to_string() }),
        )
        .await?;
        tx.commit().await?;
        Ok(node)
    }
}
