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
pub mod backend;
pub mod balance;
pub mod body;
pub mod classify;
pub mod cluster;
pub mod error;
pub mod forward;
pub mod frontdoor;
pub mod h1;
pub mod headers;
pub mod health;
mod http_conn;
pub mod limits;
pub mod load;
pub mod plugin;
pub mod probers;
pub mod proxy_protocol;
pub mod router;
pub mod server;
pub mod sni;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod workers;

// The crates under the data plane, under the names its modules use: the configuration
// (`keyway-config`) and the coordinator with its write permits and stores
// (`keyway-coord`).
pub use keyway_config as config;
pub use keyway_coord::{etcd, failover, oneshot, permit, unix_ms};

pub use config::Config;
