//! What keyway knows about a loaded plugin ([`PluginMeta`]: name, file, hash, config,
//! calls, errors) and the accounting of its calls: failures counted in
//! `keyway_plugin_errors_total` and logged at most once a minute per plugin and kind.
//! It never runs a plugin.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::error::PluginError;
use crate::LOG_EVERY;

/// What `/status` shows about a loaded plugin, and its error accounting.
pub struct PluginMeta {
    /// File name without extension.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// First 16 hex digits of the file's SHA-256.
    pub hash: String,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// The configuration it was given (JSON).
    pub config: String,
    pub(crate) id: u64,
    pub(crate) calls: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Requests a classifier answered from its memo, without a call.
    pub(crate) remembered: AtomicU64,
    pub(crate) logged: Mutex<Vec<LogSlot>>,
}

/// When a plugin's lines of one kind were last logged, and how many were not since.
pub(crate) struct LogSlot {
    kind: &'static str,
    pub(crate) last: std::time::Instant,
    unlogged: u64,
}

/// One call's answer and what the plugin wrote meanwhile.
#[derive(Debug)]
pub struct Traced<T> {
    /// The answer, or how the call failed.
    pub result: Result<T, PluginError>,
    /// The plugin's stdout and stderr during the call (at most [`crate::OUTPUT_LIMIT`] bytes).
    pub output: String,
}

impl PluginMeta {
    /// Calls made.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Requests a classifier answered from its memo, without a call.
    pub fn remembered(&self) -> u64 {
        self.remembered.load(Ordering::Relaxed)
    }

    /// Calls that failed.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Whether a line of `kind` may be logged now (at most once per [`LOG_EVERY`]), and
    /// how many were held back since the last one.
    pub(crate) fn may_log(&self, kind: &'static str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut slots = self.logged.lock().ok()?;
        match slots.iter_mut().find(|s| s.kind == kind) {
            None => {
                slots.push(LogSlot {
                    kind,
                    last: now,
                    unlogged: 0,
                });
                Some(0)
            }
            Some(s) if now.duration_since(s.last) >= LOG_EVERY => {
                s.last = now;
                Some(std::mem::take(&mut s.unlogged))
            }
            Some(s) => {
                s.unlogged += 1;
                None
            }
        }
    }

    /// Counts a call's failure and logs it (rate-limited), with the plugin's output; or
    /// logs the output of a call that went well (rate-limited too).
    pub(crate) fn record<T>(&self, traced: &Traced<T>) {
        match &traced.result {
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keyway_plugin_errors_total", "plugin" => self.name.clone(), "kind" => e.kind()).increment(1);
                if let Some(unlogged) = self.may_log(e.kind()) {
                    tracing::warn!(plugin = %self.name, kind = e.kind(), error = %e, output = %traced.output, unlogged, "plugin call failed; on_error applies (logged at most once a minute per plugin and kind)");
                }
            }
            Ok(_) if !traced.output.is_empty() => {
                if let Some(unlogged) = self.may_log("output") {
                    tracing::info!(plugin = %self.name, output = %traced.output, unlogged, "plugin wrote output (logged at most once a minute)");
                }
            }
            Ok(_) => {}
        }
    }

    /// `/status` view.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "path": self.path.display().to_string(),
            "sha256": self.hash,
            "loaded_at_unix_ms": crate::unix_ms(self.loaded_at),
            "calls": self.calls(),
            "errors": self.errors(),
            "answers_remembered": self.remembered.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> PluginMeta {
        PluginMeta {
            name: "p".into(),
            path: PathBuf::from("p.wasm"),
            hash: String::new(),
            loaded_at: SystemTime::now(),
            config: String::new(),
            id: 0,
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            remembered: AtomicU64::new(0),
            logged: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn logs_are_rate_limited_per_kind_and_count_what_they_held_back() {
        let m = meta();
        assert_eq!(m.may_log("trap"), Some(0), "the first of a kind is logged");
        assert_eq!(m.may_log("trap"), None);
        assert_eq!(m.may_log("trap"), None);
        assert_eq!(m.may_log("timeout"), Some(0), "kinds are limited apart");
        // A minute later: logged again, saying how many were held back.
        if let Ok(mut slots) = m.logged.lock() {
            for s in slots.iter_mut() {
                s.last -= LOG_EVERY;
            }
        }
        assert_eq!(m.may_log("trap"), Some(2));
        assert_eq!(m.may_log("trap"), None);
        assert_eq!(m.may_log("timeout"), Some(0));
    }
}
