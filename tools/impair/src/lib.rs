//! skymesh-impair: a userspace UDP impairment relay for tests and benchmarks, standing in for
//! netem (absent on our machines). The impairment logic is pure ([`profile`]); the relay
//! ([`relay`]) is a thin tokio shell around it.

pub mod profile;
pub mod relay;
