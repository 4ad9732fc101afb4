//! Live netmap updates: `GET /api/v1/netmap/stream?since=<serial>`, Server-Sent Events.
//!
//! Why SSE: it is one long-lived HTTP GET, so it passes the same proxies, TLS and bearer-token
//! authentication as the rest of the API, needs no upgrade handshake, and the agent only
//! listens (its reports go through ordinary POSTs). Each SSE event carries one
//! [`StreamEvent`] as JSON in `data:`, its variant as `event:` and the netmap serial as `id:`.
//!
//! Model: every committed change bumps the topology `serial`; [`AppState::publish`] (run after
//! each mutating request and by the expiry sweeper) pushes the new serial into a `watch`
//! channel. Each stream task wakes, takes the one cached [`crate::netmap::Topology`] snapshot
//! for that serial (loaded once for all streams), computes its node's netmap (pure), and sends
//! a signed delta against the netmap it last sent — or nothing if its view did not change.
//!
//! Resume: the first event is a delta when `since` (or the SSE `Last-Event-ID` header) names a
//! serial whose snapshot is still held in memory ([`super::TOPOLOGY_HISTORY`] of them),
//! and a full signed netmap otherwise (unknown, forged, too old, or after a controller restart).
//! A delta is computed against the netmap that snapshot gives *now*; a node expiry falls in a
//! serial bump of its own, so both sides agree on it.
//!
//! Liveness: an SSE comment every [`KEEPALIVE`] lets both ends notice a dead connection (the
//! agent reconnects when it hears nothing for a few intervals). A revoked or deleted node gets
//! a `revoked` event and the stream ends; its credential is refused from then on.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::Stream;
use serde::Deserialize;
use skymesh_proto::{diff, sign_delta, sign_netmap, NetMap, NodeId, NodeState, StreamEvent};
use tokio::sync::mpsc;

use super::extract::{ApiQuery, NodeCredential, SeenFrom};
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::netmap;

/// Interval of SSE keep-alive comments.
pub(super) const KEEPALIVE: Duration = Duration::from_secs(15);

/// Query of `GET /api/v1/netmap/stream`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct StreamQuery {
    /// The serial of the netmap the client holds; omitted: send a full netmap first.
    since: Option<u64>,
}

/// Live signed netmap updates for this node, as Server-Sent Events.
///
/// Events (`event:` name, JSON `data:` tagged by `type`, `id:` = serial):
/// `netmap` (a full `SignedNetMap`), `delta` (a `SignedDelta` from `from_serial` to `serial`,
/// signed over `"skymesh-netmap-delta-v1\0" || payload`), `revoked` (then the stream ends).
/// The first event is a delta if `since` (or `Last-Event-ID`) is a serial the controller still
/// holds, else a full netmap. Keep-alive comments every 15 s.
#[utoipa::path(get, path = "/api/v1/netmap/stream", tag = "node",
    security(("node_credential" = [])),
    params(StreamQuery),
    responses(
        (status = 200, description = "text/event-stream of StreamEvent", body = StreamEvent,
            content_type = "text/event-stream"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "node revoked or expired", body = ErrorBody),
        (status = 429, description = "this node already holds 2 streams", body = ErrorBody),
    ))]
pub(super) async fn netmap_stream(
    State(state): State<AppState>,
    node: NodeCredential,
    SeenFrom(seen_from): SeenFrom,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Before any work: a credential cannot make the controller recompute netmaps for
    // unlimited streams.
    let slot = state.stream_slot(node.id)?;
    let since = query.since.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    });
    let now = state.clock.now();
    // A new source address (Starlink re-assigned, uplink switched) is a new reflexive endpoint.
    if state
        .store
        .report_endpoints(node.id, None, None, seen_from, now)
        .await?
    {
        state.publish().await?;
    }
    // Subscribe before reading the topology, so a change committed in between still wakes us.
    let mut changes = state.subscribe();
    let mut closing = state.closing();
    let topology = state.topology().await?;
    let current = netmap::compute(&topology, node.id, now)
        .ok_or_else(|| ApiError::unauthorized("unknown node credential"))?;
    let base = match since {
        Some(s) if s == current.serial => Some(current.clone()),
        Some(s) if s < current.serial => state
            .topology_at(s)
            .await
            .and_then(|t| netmap::compute(&t, node.id, now)),
        _ => None,
    };
    let first = first_event(&state, base.as_ref(), &current)?;

    let (tx, mut rx) = mpsc::channel::<Event>(8);
    state.metrics.streams_open.fetch_add(1, Ordering::Relaxed);
    tracing::info!(node = %node.id, ?since, serial = current.serial, "netmap stream opened");
    tokio::spawn(async move {
        let id = node.id;
        if let Some(e) = first {
            if tx.send(e).await.is_err() {
                state.metrics.streams_open.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
        let mut held = current;
        loop {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                () = tx.closed() => break,
                _ = closing.wait_for(|c| *c) => break,
            }
            let serial = *changes.borrow_and_update();
            match next_event(&state, id, &held, serial).await {
                Ok(Next::Send(event, map)) => {
                    held = map;
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
                // Keep `held` (and its serial) as the client has it: the next delta must start
                // from the serial the client holds.
                Ok(Next::Unchanged) => {}
                Ok(Next::Close(event)) => {
                    tracing::info!(node = %id, "node revoked or removed: closing its stream");
                    let _ = tx.send(event).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(node = %id, error = %e.message, "netmap stream update failed")
                }
            }
        }
        state.metrics.streams_open.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(node = %id, "netmap stream closed");
    });
    // The slot lives as long as the response body: freed the moment the client is gone.
    let stream = futures_util::stream::poll_fn(move |cx| {
        let _held = &slot;
        rx.poll_recv(cx).map(|o| o.map(Ok))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEPALIVE)))
}

fn event(e: &StreamEvent, serial: Option<u64>) -> Result<Event, ApiError> {
    let data = serde_json::to_string(e).map_err(|e| ApiError::internal(&e))?;
    let ev = Event::default().event(e.name()).data(data);
    Ok(match serial {
        Some(s) => ev.id(s.to_string()),
        None => ev,
    })
}

fn full(state: &AppState, map: &NetMap) -> Result<Event, ApiError> {
    let signed = sign_netmap(map, &state.signing_key).map_err(|e| ApiError::internal(&e))?;
    state.metrics.netmaps_served.fetch_add(1, Ordering::Relaxed);
    event(&StreamEvent::Netmap(signed), Some(map.serial))
}

fn delta(state: &AppState, old: &NetMap, new: &NetMap) -> Result<Event, ApiError> {
    let d = diff(old, new);
    let signed = sign_delta(&d, &state.signing_key).map_err(|e| ApiError::internal(&e))?;
    state.metrics.deltas_served.fetch_add(1, Ordering::Relaxed);
    event(&StreamEvent::Delta(signed), Some(new.serial))
}

/// The first event: nothing if the client is current, a delta if it can be bridged, else full.
fn first_event(
    state: &AppState,
    base: Option<&NetMap>,
    current: &NetMap,
) -> Result<Option<Event>, ApiError> {
    match base {
        Some(b) if b.serial == current.serial => Ok(None),
        Some(b) => delta(state, b, current).map(Some),
        None => full(state, current).map(Some),
    }
}

enum Next {
    Send(Event, NetMap),
    /// The serial moved but this node's view did not: nothing to send.
    Unchanged,
    Close(Event),
}

async fn next_event(
    state: &AppState,
    id: NodeId,
    held: &NetMap,
    serial: u64,
) -> Result<Next, ApiError> {
    let topology = state.topology_at_least(serial).await?;
    let alive = topology
        .nodes
        .get(&id)
        .is_some_and(|n| n.state != NodeState::Revoked);
    let now = state.clock.now();
    let map = match netmap::compute(&topology, id, now) {
        Some(m) if alive => m,
        _ => return Ok(Next::Close(event(&StreamEvent::Revoked, None)?)),
    };
    if map.serial <= held.serial || (map.node == held.node && map.peers == held.peers) {
        return Ok(Next::Unchanged);
    }
    Ok(Next::Send(delta(state, held, &map)?, map))
}
