//! skymesh controller: enrollment, IPAM, tag policy and signed netmaps behind a REST API,
//! on embedded SQLite.
//!
//! Layout: pure logic in [`ipam`], [`policy`], [`netmap`], [`audit`]; persistence in [`store`];
//! HTTP in [`api`]. [`open`] wires them from a [`config::Config`].

pub mod api;
pub mod audit;
pub mod config;
pub mod error;
pub mod ipam;
pub mod metrics;
pub mod netmap;
pub mod policy;
pub mod secrets;
pub mod server;
pub mod signing;
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use api::{app, openapi, AppState};

use crate::config::Config;
use crate::ipam::Pools;
use crate::policy::Policy;
use crate::store::{Store, StoreOptions};

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
    }
}

/// Opens the store (creating the data directory), loads or creates the signing key, and
/// returns the application state.
pub async fn open(config: &Config, clock: Clock) -> Result<AppState, OpenError> {
    config.validate()?;
    let key = signing::load_or_create(&config.data_dir)?;
    let store = Store::open_sqlite(&config.data_dir, &store_options(config)).await?;
    Ok(AppState::new(
        store,
        key,
        Policy::new(&config.policy),
        config.mtu,
        config.max_body_bytes,
        clock,
    ))
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
