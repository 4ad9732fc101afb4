//! Sans-IO core of the skymesh agent. Nothing here reads the clock, opens a socket or depends
//! on tokio: every input (packets seen, time, link events) is passed in by the driver.

pub mod allowed_ips;
pub mod candidates;
pub mod control;
pub mod discovery;
pub mod key;
pub mod offload;
pub mod path;
pub mod plan;
pub mod relay;
pub mod uapi;
pub mod wgquick;
