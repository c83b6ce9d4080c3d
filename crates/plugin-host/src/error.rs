//! [`PluginError`]: how a plugin call failed, in words an operator can act on (never a
//! wasm backtrace). It classifies failures; it never logs or counts them (see `meta`).

use wasmtime::{Store, Trap};

use crate::engine::PluginState;
use crate::output::panic_message;
use crate::MEMORY_LIMIT;

/// How a plugin call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginError {
    /// It ran past its deadline and was interrupted.
    Timeout,
    /// It tried to grow its memory past the limit.
    Memory,
    /// It trapped (a panic, an unreachable, a bad memory access...).
    Trap(String),
    /// It answered something keyway cannot use.
    InvalidOutput(String),
}

impl PluginError {
    /// The `kind` label of `keyway_plugin_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Timeout => "timeout",
            PluginError::Memory => "memory",
            PluginError::Trap(_) => "trap",
            PluginError::InvalidOutput(_) => "invalid-output",
        }
    }

    /// Classifies a failed call. A trap is described by the guest's panic message when
    /// its output has one, else by the trap itself: never by a wasm backtrace.
    pub(crate) fn from_call(err: wasmtime::Error, store: &Store<PluginState>) -> Self {
        if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            PluginError::Timeout
        } else if store.data().limiter.refused {
            PluginError::Memory
        } else if let Some(msg) = panic_message(&store.data().out.text()) {
            PluginError::Trap(msg)
        } else if let Some(trap) = err.downcast_ref::<Trap>() {
            PluginError::Trap(trap.to_string())
        } else {
            PluginError::Trap(err.root_cause().to_string())
        }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginError::Timeout => write!(f, "interrupted at its deadline"),
            PluginError::Memory => {
                write!(f, "exceeded its memory limit of {} MiB", MEMORY_LIMIT >> 20)
            }
            PluginError::Trap(t) => write!(f, "trapped: {t}"),
            PluginError::InvalidOutput(w) => write!(f, "returned an unusable answer: {w}"),
        }
    }
}
