//! skymesh controller: enrollment, IPAM, tag policy and signed netmaps behind a REST API,
//! on embedded SQLite, or on PostgreSQL shared by several replicas.
//!
//! Layout: pure logic in [`ipam`], [`policy`], [`netmap`], [`audit`]; persistence in [`store`];
//! HTTP in [`api`]. [`open`] wires them from a [`config::Config`].

pub mod api;
pub mod audit;
pub mod config;
pub mod error;
pub mod ipam;
pub mod limit;
pub mod metrics;
pub mod netmap;
pub mod policy;
pub mod relay;
pub mod routes;
pub mod secrets;
pub mod server;
pub mod signing;
pub mod store;
pub mod stun;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use api::{app, openapi, AppState};

use crate::config::Config;
use crate::ipam::Pools;
use crate::policy::Policy;
use crate::store::{ChangeFeed, Store, StoreError, StoreOptions};

/// The only place the controller reads the time (unix seconds). Tests use `Manual`.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn now(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            Clock::Manual(t) => t.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Key(#[from] signing::KeyFileError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// Store options derived from the configuration.
pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        pools: Pools {
            v4: config.overlay.ipv4,
            v6: config.overlay.ipv6,
        },
        policy_fingerprint: Policy::new(&config.policy).fingerprint(),
        controller_public_key: None,
        route_guard: routes::RouteGuard {
            limits: routes::RouteLimits {
                max_prefix_v4: config.max_route_prefix_v4,
                max_prefix_v6: config.max_route_prefix_v6,
            },
            // An unspecified listen address names no address to protect.
            protected: Some(config.listen.ip())
                .filter(|ip| !ip.is_unspecified())
                .into_iter()
                .collect(),
        },
    }
}

/// Opens the configured store: PostgreSQL when `database` is set, else SQLite in the data
/// directory (created if missing). The configuration must have been validated.
pub async fn open_store(config: &Config) -> Result<Store, OpenError> {
    open_store_with(config, store_options(config)).await
}

async fn open_store_with(config: &Config, opts: StoreOptions) -> Result<Store, OpenError> {
    Ok(match &config.database {
        Some(db) => Store::open_postgres(&db.url, db.max_connections, &opts).await?,
        None => {
            signing::ensure_data_dir(&config.data_dir)?;
            Store::open_sqlite(&config.data_dir, &opts).await?
        }
    })
}

/// Opens the store, loads or creates the signing key (and pins its public key in the
/// database), and returns the application state. With PostgreSQL it also starts following
/// changes committed by other replicas (see [`follow_changes`]).
pub async fn open(config: &Config, clock: Clock) -> Result<AppState, OpenError> {
    config.validate()?;
    let key = match &config.signing_key {
        Some(path) => signing::load_or_create_file(path)?,
        None => signing::load_or_create(&config.data_dir)?,
    };
    // The key is checked in the same transaction as the other settings, first: a replica
    // started with another key is refused before it writes anything.
    let opts = StoreOptions {
        controller_public_key: Some(
            skymesh_proto::ControllerPublicKey(key.verifying_key()).to_string(),
        ),
        ..store_options(config)
    };
    let store = open_store_with(config, opts).await?;
    // Subscribed before any request is served, so no replica's change can slip past.
    let feed = store.change_feed().await?;
    let state = AppState::new(
        store,
        key,
        Policy::new(&config.policy),
        config.mtu,
        config.max_body_bytes,
        config.limits,
        clock,
    );
    if let Some(feed) = feed {
        tokio::spawn(follow_changes(state.clone(), feed));
    }
    Ok(state)
}

/// Runs until shutdown or the store closes: wakes this replica's netmap streams whenever any
/// replica commits a serial bump (PostgreSQL `LISTEN`), exactly as a local write does.
pub async fn follow_changes(state: AppState, mut feed: ChangeFeed) {
    let mut closing = state.closing();
    let changes = state.subscribe();
    loop {
        let next = tokio::select! {
            n = feed.next() => n,
            _ = closing.wait_for(|c| *c) => return,
        };
        match next {
            // Our own commit (already published) or an older one: nothing to do.
            Ok(Some(serial)) if serial != 0 && serial <= *changes.borrow() => continue,
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::warn!("database notification connection lost and re-established");
            }
            Err(StoreError::Db(sqlx::Error::PoolClosed)) => return,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for database change notifications failed");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        // Read the serial rather than trusting the payload: after a reconnect or error a
        // notification may have been missed.
        if let Err(e) = state.publish().await {
            tracing::warn!(error = %e.message, "publishing a replica's change failed");
        }
    }
}

/// Runs forever: once a second, folds node expiries into the serial (see
/// [`store::Store::sweep_expired`]). Spawned by `serve`.
pub async fn run_expiry_sweeper(state: AppState) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match state.store.sweep_expired(state.clock.now()).await {
            Ok(ids) if !ids.is_empty() => {
                tracing::info!(nodes = ?ids, "nodes expired");
                if let Err(e) = state.publish().await {
                    tracing::warn!(error = %e.message, "publishing expiries failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
    }
}
