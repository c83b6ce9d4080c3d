//! keyway: an L7 proxy for privileged-access-management server farms.
//!
//! The engine lives here; `main.rs` only parses the command line. Read
//! `docs/architecture.md` for the request path and the module map.
#![deny(missing_docs)]

pub mod admin;
pub mod affinity;
pub mod balance;
pub mod body;
pub mod classify;
pub mod cluster;
pub mod config;
pub mod demo;
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
pub mod scaffold;
pub mod server;
pub mod sni;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod watch;

pub use config::Config;

/// Milliseconds since the Unix epoch (0 for times before it).
pub(crate) fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
pub use server::Server;
