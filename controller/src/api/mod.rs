//! The HTTP API (axum). Handlers are thin: parse, authorise, call the store or a pure module,
//! map errors. Every route is registered through `utoipa_axum::routes!`, so a route cannot
//! exist without its OpenAPI operation (and a test checks the document against the router).

mod admin;
mod extract;
mod node;
mod stream;
mod system;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};
use ed25519_dalek::SigningKey;
use skymesh_proto::{ControllerPublicKey, NodeId};
use tokio::sync::{watch, Mutex};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use admin::{
    CreateAdminToken, CreateEnrollmentKey, CreatedAdminToken, CreatedEnrollmentKey, NodeDetail,
    PatchNode,
};

use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::limit::RateLimiter;
use crate::metrics::Metrics;
use crate::netmap::Topology;
use crate::policy::Policy;
use crate::store::Store;
use crate::Clock;

/// Everything handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub signing_key: Arc<SigningKey>,
    pub policy: Policy,
    pub mtu: u16,
    pub max_body_bytes: usize,
    pub limits: LimitsConfig,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// Ports of this controller's STUN reflector, handed to agents in their netmap (empty:
    /// none runs, e.g. in tests that serve the router directly).
    pub stun_ports: Vec<u16>,
    /// This controller's relay, when it runs one (see [`crate::relay`]).
    pub relay: Option<crate::relay::RelayKey>,
    /// The last [`TOPOLOGY_HISTORY`] topology snapshots, newest last: the newest is reused
    /// while the serial is unchanged; older ones let a stream resume with a delta.
    topology: Arc<Mutex<VecDeque<Arc<Topology>>>>,
    /// The newest serial known to have been committed; streams wait on it.
    changes: watch::Sender<u64>,
    /// Set once on shutdown: streams end so graceful shutdown does not wait on them forever.
    closing: watch::Sender<bool>,
    /// Open netmap streams per node (see [`MAX_STREAMS_PER_NODE`]).
    streams: Arc<std::sync::Mutex<HashMap<NodeId, usize>>>,
    /// Status reports per node (see [`STATUS_BURST`]).
    status_limit: Arc<std::sync::Mutex<RateLimiter<NodeId>>>,
    /// Registrations per source address (`None`: unlimited).
    source_limit: Option<Arc<std::sync::Mutex<RateLimiter<IpAddr>>>>,
}

/// Concurrent netmap streams one node credential may hold: one, plus one for a reconnect
/// that arrives before the server noticed the old connection died.
pub const MAX_STREAMS_PER_NODE: usize = 2;

/// Status reports: a node may send this many at once (path switches while a link flaps),
/// then one per [`STATUS_INTERVAL`]; agents report every few seconds at most.
pub const STATUS_BURST: u32 = 10;
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Keys a rate limiter tracks at most (memory bound under an address spray).
const LIMITER_KEYS: usize = 65_536;

/// A held netmap stream slot of one node; released on drop.
pub(crate) struct StreamSlot {
    streams: Arc<std::sync::Mutex<HashMap<NodeId, usize>>>,
    node: NodeId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = streams.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.node);
            }
        }
    }
}

/// How many topology snapshots are kept for delta resumption. A client further behind gets a
/// full netmap, which is always correct, just larger.
pub const TOPOLOGY_HISTORY: usize = 64;

impl AppState {
    pub fn new(
        store: Store,
        signing_key: SigningKey,
        policy: Policy,
        mtu: u16,
        max_body_bytes: usize,
        limits: LimitsConfig,
        clock: Clock,
    ) -> Self {
        // `register_per_minute` at once (a site enrolling its units, many units behind one
        // NAT), then evenly spread over the minute.
        let source_limit = (limits.register_per_minute > 0).then(|| {
            let n = limits.register_per_minute;
            let interval = Duration::from_secs(60) / n;
            Arc::new(std::sync::Mutex::new(RateLimiter::new(
                n,
                interval,
                LIMITER_KEYS,
            )))
        });
        Self {
            store,
            signing_key: Arc::new(signing_key),
            policy,
            mtu,
            max_body_bytes,
            limits,
            metrics: Arc::new(Metrics::default()),
            clock,
            stun_ports: Vec::new(),
            relay: None,
            topology: Arc::new(Mutex::new(VecDeque::with_capacity(TOPOLOGY_HISTORY))),
            changes: watch::Sender::new(0),
            closing: watch::Sender::new(false),
            streams: Arc::default(),
            status_limit: Arc::new(std::sync::Mutex::new(RateLimiter::new(
                STATUS_BURST,
                STATUS_INTERVAL,
                LIMITER_KEYS,
            ))),
            source_limit,
        }
    }

    /// Takes one of the node's [`MAX_STREAMS_PER_NODE`] stream slots, or refuses with 429.
    pub(crate) fn stream_slot(&self, node: NodeId) -> Result<StreamSlot, ApiError> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let n = streams.entry(node).or_default();
        if *n >= MAX_STREAMS_PER_NODE {
            return Err(ApiError::too_many(
                "too_many_streams",
                format!(
                    "this node already holds {MAX_STREAMS_PER_NODE} netmap streams; close one \
                     first"
                ),
            ));
        }
        *n += 1;
        Ok(StreamSlot {
            streams: Arc::clone(&self.streams),
            node,
        })
    }

    /// Counts a status report of `node`, or refuses with 429 past [`STATUS_BURST`].
    pub(crate) fn allow_status(&self, node: NodeId) -> Result<(), ApiError> {
        let mut l = self
            .status_limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if l.allow(node, Instant::now()) {
            Ok(())
        } else {
            Err(ApiError::too_many(
                "rate_limited",
                "status reports are limited per node; try again in a second",
            ))
        }
    }

    /// Counts a registration from `source` (unknown: never limited, as in `oneshot` tests),
    /// or refuses with 429 past `limits.register_per_minute`.
    pub(crate) fn allow_registration(&self, source: Option<IpAddr>) -> Result<(), ApiError> {
        let (Some(ip), Some(limit)) = (source, &self.source_limit) else {
            return Ok(());
        };
        let mut l = limit.lock().unwrap_or_else(PoisonError::into_inner);
        if l.allow(crate::limit::source_key(ip), Instant::now()) {
            Ok(())
        } else {
            Err(ApiError::too_many(
                "rate_limited",
                "too many registrations from this address; try again in a second",
            ))
        }
    }

    /// The same state, telling agents about the STUN reflector on `ports` (set once, before
    /// serving: the netmap of every node carries them).
    pub fn with_stun_ports(mut self, ports: Vec<u16>) -> Self {
        self.stun_ports = ports;
        self
    }

    /// The same state, granting every node the relay on `port` (set once, before serving).
    pub fn with_relay(mut self, port: u16) -> Self {
        self.relay = Some(crate::relay::RelayKey::new(&self.signing_key, port));
        self
    }

    /// Ends every open netmap stream (agents reconnect to the next controller instance).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Tells every open stream that the serial may have moved. Called after every mutating
    /// request (a middleware) and by the expiry sweeper; cheap when nothing changed.
    pub async fn publish(&self) -> Result<u64, ApiError> {
        let serial = self.store.serial().await?;
        self.changes.send_if_modified(|held| {
            let newer = serial > *held;
            if newer {
                *held = serial;
            }
            newer
        });
        Ok(serial)
    }

    /// Subscribes to serial changes (see [`AppState::publish`]).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The snapshot at exactly `serial`, if still held in memory.
    pub async fn topology_at(&self, serial: u64) -> Option<Arc<Topology>> {
        let cache = self.topology.lock().await;
        cache.iter().rev().find(|t| t.serial == serial).cloned()
    }

    /// A snapshot at `serial` or newer: from memory if the newest one is recent enough,
    /// else loaded (once, under the lock, however many streams ask at the same time).
    pub async fn topology_at_least(&self, serial: u64) -> Result<Arc<Topology>, ApiError> {
        let mut cache = self.topology.lock().await;
        if let Some(t) = cache.back().filter(|t| t.serial >= serial) {
            return Ok(Arc::clone(t));
        }
        self.load_topology(&mut cache).await
    }

    async fn load_topology(
        &self,
        cache: &mut VecDeque<Arc<Topology>>,
    ) -> Result<Arc<Topology>, ApiError> {
        let (serial, nodes) = self.store.topology_snapshot().await?;
        if let Some(t) = cache.back().filter(|t| t.serial == serial) {
            return Ok(Arc::clone(t));
        }
        self.metrics
            .topology_loads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pools = self.store.pools();
        let t = Arc::new(Topology {
            serial,
            mtu: self.mtu,
            stun_ports: self.stun_ports.clone(),
            relay: self.relay.clone(),
            v4_prefix_len: pools.v4.prefix_len(),
            v6_prefix_len: pools.v6.prefix_len(),
            policy: self.policy.clone(),
            nodes,
        });
        // Serials only grow; a stale read (older than the newest held) is served, not cached.
        if cache.back().is_none_or(|b| b.serial < serial) {
            if cache.len() == TOPOLOGY_HISTORY {
                cache.pop_front();
            }
            cache.push_back(Arc::clone(&t));
        }
        Ok(t)
    }

    pub fn controller_public_key(&self) -> ControllerPublicKey {
        ControllerPublicKey(self.signing_key.verifying_key())
    }

    /// The current topology, from cache if the serial has not moved.
    pub async fn topology(&self) -> Result<Arc<Topology>, ApiError> {
        let serial = self.store.serial().await?;
        let mut cache = self.topology.lock().await;
        if let Some(t) = cache.back().filter(|t| t.serial == serial) {
            return Ok(Arc::clone(t));
        }
        self.load_topology(&mut cache).await
    }
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("admin_token", "Admin or read-only API token (`sma_…`), from `skymesh-controller admin-token create`."),
            ("node_credential", "Node credential (`smn_…`) returned once by `POST /api/v1/register`."),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "skymesh controller API",
        description = "Enrollment, IPAM, policy and signed netmaps for the skymesh WireGuard overlay. \
                       Every error is `{\"error\": {\"code\", \"message\"}}`."
    ),
    modifiers(&SecuritySchemes),
    components(schemas(crate::error::ErrorBody, skymesh_proto::NetMap)),
    tags(
        (name = "system", description = "Health, metrics, this document"),
        (name = "enrollment", description = "Enrollment keys (admin)"),
        (name = "tokens", description = "Admin API tokens (admin)"),
        (name = "nodes", description = "Node management (admin)"),
        (name = "node", description = "Node-facing: registration and netmaps"),
        (name = "audit", description = "Hash-chained audit log"),
    )
)]
struct ApiDoc;

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(system::healthz))
        .routes(routes!(system::metrics))
        .routes(routes!(system::openapi_json))
        .routes(routes!(
            admin::create_enrollment_key,
            admin::list_enrollment_keys
        ))
        .routes(routes!(admin::revoke_enrollment_key))
        .routes(routes!(admin::create_admin_token, admin::list_admin_tokens))
        .routes(routes!(admin::revoke_admin_token))
        .routes(routes!(node::register))
        .routes(routes!(node::netmap))
        .routes(routes!(stream::netmap_stream))
        .routes(routes!(node::report_endpoints))
        .routes(routes!(node::report_status))
        .routes(routes!(node::rotate_key))
        .routes(routes!(admin::list_nodes))
        .routes(routes!(admin::node, admin::patch_node, admin::delete_node))
        .routes(routes!(admin::revoke_node))
        .routes(routes!(admin::audit_log))
        .routes(routes!(admin::audit_verify))
}

/// The OpenAPI document for every route of [`app`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

async fn count_responses(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mutating = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    let resp = next.run(req).await;
    state.metrics.record_status(resp.status().as_u16());
    // Every change commits before its response is built, so publishing here cannot miss one;
    // refused requests wrote nothing.
    if mutating && resp.status().is_success() {
        if let Err(e) = state.publish().await {
            tracing::warn!(error = %e.message, "publishing a topology change failed");
        }
    }
    resp
}

async fn route_not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "route_not_found",
        "no such endpoint; see /api/v1/openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint; see /api/v1/openapi.json",
    )
}

/// The complete application.
pub fn app(state: AppState) -> Router {
    let (router, doc) = routes().split_for_parts();
    let doc_json = Arc::new(doc.to_pretty_json().unwrap_or_default());
    router
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(system::OpenApiJson(doc_json)))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}
