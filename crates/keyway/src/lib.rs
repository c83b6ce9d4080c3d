//! keyway: an L7 and TCP proxy for privileged-access-management server farms.
//!
//! This crate is the program: the command line (`main.rs`), the wiring of a running
//! instance (`instance`: the data plane, the admin API and the plugin watcher started
//! together), the admin API and its dashboard, the plugin-file watcher, the demo backends and the plugin
//! scaffold. It depends on `keyway-proxy` alone, which re-exports the configuration and
//! the coordinator. It never holds engine logic: no routing, health or promotion
//! decision is made here. Read `docs/architecture.md` for the crate diagram and the
//! module map.
#![deny(missing_docs)]

pub mod admin;
mod admin_drain;
pub mod dashboard;
pub mod demo;
pub mod instance;
pub mod scaffold;
pub mod watch;

pub use instance::Server;
pub use keyway_proxy::Config;
