//! keyway's data plane: listeners and the front door, routing, clusters, balancing,
//! health, upstream connections, the request path and the TCP path.
//!
//! It serves clients from one published runtime snapshot and reloads by swapping it.
//! It never starts the admin API or watches files (the `keyway` crate wires those), and
//! it never decides who is primary: the coordinator applies topologies through the
//! `failover::DataPlane` trait. Read `docs/architecture.md` for the request path and
//! the module map.
#![deny(missing_docs)]

pub mod affinity;
pub mod balance;
pub mod body;
pub mod classify;
pub mod cluster;
pub use keyway_config as config;
pub mod error;
pub mod etcd;
pub mod failover;
pub mod forward;
pub mod frontdoor;
pub mod headers;
pub mod health;
mod http_conn;
pub mod limits;
pub mod load;
pub mod oneshot;
pub mod permit;
pub mod plugin;
pub mod proxy_protocol;
pub mod router;
pub mod server;
pub mod sni;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use config::Config;

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
