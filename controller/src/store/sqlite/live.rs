//! What nodes tell the controller after joining: endpoints (with the reflexive address the
//! controller sees), advertised routes, status reports, key rotation.
//!
//! Endpoint and route changes alter netmaps, so they bump the serial (only when something really
//! changed: an agent re-reporting the same uplinks every minute must not wake every stream).
//! Status reports and `last_seen` live in `node_status` and never bump it.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use skymesh_proto::{Endpoint, NodeId, NodeState, StatusReport, WgPublicKey, REFLEXIVE_UPLINK};
use sqlx::Row as _;

use super::{append_audit, bump_serial, SqliteStore};
use crate::store::rows::{seen_from_row, to_i64, to_json, to_u64};
use crate::store::{guard_routes, Actor, NodeRecord, NodeSeen, RouteChange, StoreError};

/// The endpoints to store: what the node announced. Entries named `reflexive` are dropped:
/// older controllers derived one from the API connection's source address, which is no UDP
/// endpoint (another port behind any NAT); nodes now announce what STUN showed them.
pub(crate) fn stored_endpoints(local: &[Endpoint]) -> Vec<Endpoint> {
    local
        .iter()
        .filter(|e| e.uplink != REFLEXIVE_UPLINK)
        .cloned()
        .collect()
}

impl SqliteStore {
    async fn touch_in(
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        id: NodeId,
        seen_from: Option<IpAddr>,
        now: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_status (node_id, last_seen, seen_from) VALUES (?, ?, ?) \
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
    /// advertised routes when given. Returns whether the netmap-visible state changed (and so
    /// the serial was bumped).
    pub async fn report_endpoints(
        &self,
        id: NodeId,
        local: Option<&[Endpoint]>,
        routes: Option<&[IpNet]>,
        seen_from: Option<IpAddr>,
        now: u64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let mut node = Self::node_in(&mut tx, id).await?;
        Self::touch_in(&mut tx, id, seen_from, now).await?;
        let local = local.map_or_else(|| node.endpoints.clone(), <[Endpoint]>::to_vec);
        let endpoints = stored_endpoints(&local);
        let mut changed = endpoints != node.endpoints;
        node.endpoints = endpoints;
        let routes = routes.map(crate::store::normalized_routes);
        let new_routes = routes.filter(|r| *r != node.advertised_routes);
        if let Some(routes) = new_routes {
            let change = RouteChange {
                node: Some(id),
                endpoints: &node.endpoints,
                advertised: Some(("routes", &routes)),
                approved: None,
            };
            if let Err(e) = guard_routes(&self.guard, &Self::live_nodes_in(&mut tx).await?, &change)
            {
                tx.rollback().await?;
                let actor = Actor(format!("node:{id}"));
                return Err(self
                    .refuse_routes(&actor, Some(id), &node.name, &routes, e, now)
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
            node.advertised_routes = routes;
            changed = true;
        }
        if changed {
            sqlx::query(
                "UPDATE nodes SET endpoints = ?, advertised_routes = ?, approved_routes = ? \
                 WHERE id = ?",
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
        Ok(changed && node.state != NodeState::Pending)
    }

    /// Stores the node's latest status report (replacing the previous one).
    pub async fn report_status(
        &self,
        id: NodeId,
        report: &StatusReport,
        seen_from: Option<IpAddr>,
        now: u64,
    ) -> Result<(), StoreError> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        Self::node_in(&mut tx, id).await?;
        Self::touch_in(&mut tx, id, seen_from, now).await?;
        sqlx::query("UPDATE node_status SET reported_at = ?, report = ? WHERE node_id = ?")
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
             WHERE node_id = ?",
        )
        .bind(to_i64(id.0))
        .fetch_optional(&self.read)
        .await?
        .map(|row| seen_from_row(&row))
        .transpose()
    }

    /// Every node's last contact and report, in one query (metrics scrapes).
    pub async fn nodes_seen(&self) -> Result<HashMap<NodeId, NodeSeen>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, last_seen, seen_from, reported_at, report FROM node_status",
        )
        .fetch_all(&self.read)
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
    pub async fn rotate_key(
        &self,
        id: NodeId,
        key: &WgPublicKey,
        now: u64,
    ) -> Result<NodeRecord, StoreError> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let mut node = Self::node_in(&mut tx, id).await?;
        if node.state == NodeState::Revoked {
            return Err(StoreError::NodeRevoked);
        }
        if node.public_key == *key {
            return Ok(node);
        }
        let taken: Option<i64> = sqlx::query_scalar("SELECT id FROM nodes WHERE public_key = ?")
            .bind(key.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(StoreError::DuplicatePublicKey);
        }
        let old = node.public_key;
        sqlx::query("UPDATE nodes SET public_key = ? WHERE id = ?")
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

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::UplinkKind;

    fn ep(addr: &str, uplink: &str) -> Endpoint {
        Endpoint {
            addr: addr.parse().expect("addr"),
            uplink: uplink.into(),
            kind: UplinkKind::Satellite,
            priority: None,
        }
    }

    #[test]
    fn reflexive_guesses_are_not_stored() {
        let local = vec![
            ep("192.168.1.5:51820", "starlink"),
            ep("198.19.7.7:51820", REFLEXIVE_UPLINK),
        ];
        assert_eq!(stored_endpoints(&local), local[..1].to_vec());
        assert!(stored_endpoints(&[]).is_empty());
    }
}
