//! keyway's WebAssembly plugin host: every wasmtime decision keyway makes lives in this
//! crate, behind plain input and output types of its own ([`Backend`], [`Probe`],
//! [`Health`], [`Kind`], [`PromotionCandidate`], [`PromotionDecision`]).
//! It owns the engine, deadlines, memory limits, WASI restrictions, instance reuse,
//! output capture, plugin errors and the generated bindings of `wit/policy.wit`. It must
//! never depend on keyway's configuration, health or proxy types (keyway converts at its
//! call sites), never open a socket or a file other than the plugin it is asked to load,
//! and never panic on anything a plugin does.
//!
//! - **Engine**: one per process, component model on, *epoch interruption* on. A ticker
//!   thread advances the epoch every [`TICK`]; each call gets a deadline of a few ticks,
//!   so a plugin that loops is interrupted (a trap), never waited for.
//! - **Memory**: each store has a limiter refusing growth past [`MEMORY_LIMIT`]; the
//!   plugin's allocation then fails inside the guest and the call traps. The limiter
//!   remembers that it refused, so the error is reported as `memory`.
//! - **Capabilities**: plugins get WASI preview 2 with an *empty* context — no files, no
//!   sockets, no environment, no arguments, no stdin — only so ordinary Rust `std` code
//!   links. Clocks and randomness remain, which a policy cannot misuse.
//! - **Output**: a plugin's stdout and stderr go into a buffer of [`OUTPUT_LIMIT`] bytes
//!   per call (the rest is counted, not kept). A trap reports the guest's panic message
//!   from it rather than a wasm backtrace, and the log line of a failed call carries the
//!   output. The blocking stream calls are answered synchronously here (wasmtime-wasi's
//!   own would start a Tokio runtime, which panics on keyway's async workers).
//! - **Compilation** happens once, when a plugin is loaded (config load or reload), never
//!   on the request path. Loading also instantiates the plugin and runs its `configure`,
//!   so a plugin that refuses its configuration is refused before it can be used.
//! - **Instances**: the request classifier keeps one pre-configured instance per thread
//!   and plugin, reused call after call; health and promotion policies instantiate per
//!   call (they run once per probe). After any trap or interruption the instance is
//!   discarded and a fresh one is made on the next call.
//! - **Errors** never escape as panics: every failure is a [`PluginError`], counted in
//!   `keyway_plugin_errors_total{plugin,kind}` and logged at most once a minute per plugin
//!   and kind (with the number of failures not logged since); the caller then applies
//!   the cluster's `on_error` rule.
//!
//! The pooling allocator is not used yet: instantiation is off the request path except
//! for a classifier's first call on each thread.
//!
//! | module | owns |
//! | --- | --- |
//! | `engine` | the engine, the epoch ticker, stores, the memory limiter, the WASI linker |
//! | `output` | capturing a plugin's stdout and stderr; finding its panic message |
//! | `error` | [`PluginError`]: how a call failed |
//! | `meta` | [`PluginMeta`] (what `/status` shows), error counting and rate-limited logs |
//! | `load` | reading, compiling (cached by hash), linking and configuring a plugin |
//! | `health`, `classifier`, `promotion` | one world each: its input types and its calls |

#![deny(missing_docs)]

use std::time::Duration;

mod classifier;
mod engine;
mod error;
mod health;
mod load;
mod meta;
mod output;
mod promotion;

pub use classifier::{classifier_instances_on_this_thread, ClassifierPlugin, Kind};
pub use error::PluginError;
pub use health::{Backend, Health, HealthPlugin, HealthVerdict, Probe, Role};
pub use meta::{PluginMeta, Traced};
pub use promotion::{PromotionCandidate, PromotionDecision, PromotionPlugin};

/// Generated bindings for the three worlds of `wit/policy.wit`.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    /// `world health`.
    pub mod health {
        wasmtime::component::bindgen!({ world: "health", path: "../../wit" });
    }
    /// `world promotion`.
    pub mod promotion {
        wasmtime::component::bindgen!({ world: "promotion", path: "../../wit" });
    }
    /// `world classifier`.
    pub mod classifier {
        wasmtime::component::bindgen!({ world: "classifier", path: "../../wit" });
    }
}

/// Epoch tick: the granularity of plugin deadlines. 5 ms keeps the ticker's wake-ups
/// (200/s while plugins are in use, none when idle) off the request path's budget while
/// still cutting a runaway classifier within a few ticks of its 20 ms deadline.
pub const TICK: Duration = Duration::from_millis(5);
/// Memory one plugin instance may use.
pub const MEMORY_LIMIT: usize = 64 << 20;
/// Deadline of one classifier call (per request: must be short).
pub const CLASSIFY_DEADLINE: Duration = Duration::from_millis(20);
/// Deadline of one health or promotion call, instantiation and `configure` included.
pub const POLICY_DEADLINE: Duration = Duration::from_millis(500);
/// Largest plugin file accepted.
const MAX_PLUGIN_BYTES: u64 = 64 << 20;
/// Longest health reason accepted from a plugin.
pub const MAX_REASON_BYTES: usize = 1024;
/// Bytes of a plugin's stdout and stderr kept per call.
pub const OUTPUT_LIMIT: usize = 4096;
/// A plugin's failures of one kind (and its output) are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Unix milliseconds of `at` (0 before the epoch).
pub(crate) fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

macro_rules! debug_by_name {
    ($($t:ty),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({}, {})", stringify!($t), self.meta.name, self.meta.hash)
            }
        }
    )*};
}
debug_by_name!(HealthPlugin, ClassifierPlugin, PromotionPlugin);

// Plugins are shared by every worker thread.
const _: () = {
    const fn check<T: Send + Sync>() {}
    check::<HealthPlugin>();
    check::<ClassifierPlugin>();
    check::<PromotionPlugin>();
};
