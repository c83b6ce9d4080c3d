//! The `classifier` world: decides per request whether it reads or writes. It runs on
//! the request path, so each thread keeps one configured instance per plugin version
//! (reused call after call, dropped after a trap or once its version is gone), each call
//! has the short [`CLASSIFY_DEADLINE`], and a breaker skips a plugin that keeps failing.
//! It never reuses a trapped instance and never lets a plugin failure escape as a panic.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::Store;

use crate::bindings;
use crate::bindings::classifier::exports::keyway::policy::request_classifier::Kind as WasmKind;
use crate::engine::{arm, PluginState};
use crate::error::PluginError;
use crate::load::{configured_for_call, load_world};
use crate::meta::{PluginMeta, Traced};
use crate::CLASSIFY_DEADLINE;

/// What a classifier says a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// It only reads: any healthy backend may serve it.
    Read,
    /// It writes: only the primary may serve it.
    Write,
}

/// A loaded request-classifier plugin.
pub struct ClassifierPlugin {
    /// Facts for `/status`.
    pub meta: PluginMeta,
    pre: bindings::classifier::ClassifierPre<PluginState>,
    failures_in_a_row: std::sync::atomic::AtomicU32,
    open_until: Mutex<Option<std::time::Instant>>,
    /// Threads' instances of this version hold a `Weak` of it: once the version is
    /// dropped (swapped out and no request uses it), they are freed.
    alive: Arc<()>,
}

/// Consecutive classifier failures that open the breaker...
const BREAKER_FAILURES: u32 = 3;
/// ...for this long: calls skip the plugin and `on_error` applies at once, so a plugin
/// that loops costs requests its deadline a few times, not on every request.
const BREAKER_OPEN: Duration = Duration::from_secs(5);

/// A thread's configured instance of one classifier version.
struct ThreadInstance {
    id: u64,
    alive: std::sync::Weak<()>,
    store: Store<PluginState>,
    bindings: bindings::classifier::Classifier,
}

thread_local! {
    /// One configured instance per (thread, plugin version): the per-request pool. A
    /// handful of entries at most, so a scan beats hashing.
    static CLASSIFIERS: RefCell<Vec<ThreadInstance>> = const { RefCell::new(Vec::new()) };
}

/// How many classifier instances this thread holds (diagnostics and tests: after a hot
/// swap, the old version's instances go with the next call of the new one).
pub fn classifier_instances_on_this_thread() -> usize {
    CLASSIFIERS.with(|c| c.borrow().len())
}

impl ClassifierPlugin {
    /// Compiles, links and configures the plugin at `path` with `config` (JSON).
    pub fn load(path: &Path, config: &str) -> Result<Arc<Self>, String> {
        let (meta, pre) = load_world::<bindings::classifier::Classifier>(path, config)?;
        Ok(Arc::new(Self {
            meta,
            pre,
            failures_in_a_row: std::sync::atomic::AtomicU32::new(0),
            open_until: Mutex::new(None),
            alive: Arc::new(()),
        }))
    }

    /// Classifies one request with this thread's instance (made on first use).
    pub fn classify(&self, method: &str, path: &str, host: &str) -> Result<Kind, PluginError> {
        self.classify_traced(method, path, host).result
    }

    /// [`Self::classify`], with what the plugin wrote to stdout and stderr.
    pub fn classify_traced(&self, method: &str, path: &str, host: &str) -> Traced<Kind> {
        if self.failures_in_a_row.load(Ordering::Relaxed) >= BREAKER_FAILURES {
            let now = std::time::Instant::now();
            if let Ok(mut open) = self.open_until.lock() {
                match *open {
                    Some(until) if now < until => {
                        return Traced {
                            result: Err(PluginError::Trap(
                                "skipped: the plugin failed repeatedly (breaker open)".into(),
                            )),
                            output: String::new(),
                        };
                    }
                    // Half-open: this call tries the plugin again.
                    _ => *open = Some(now + BREAKER_OPEN),
                }
            }
        }
        self.meta.calls.fetch_add(1, Ordering::Relaxed);
        let mut output = String::new();
        let result = CLASSIFIERS.with(|cache| {
            let mut cache = cache.borrow_mut();
            let at = match cache.iter().position(|t| t.id == self.meta.id) {
                Some(at) => at,
                None => {
                    // First call of this version on this thread: instances of versions
                    // that are gone (hot-swapped out) are dropped now.
                    cache.retain(|t| t.alive.strong_count() > 0);
                    let (store, bindings) = configured_for_call::<bindings::classifier::Classifier>(
                        &self.pre,
                        &self.meta.config,
                    )?;
                    cache.push(ThreadInstance {
                        id: self.meta.id,
                        alive: Arc::downgrade(&self.alive),
                        store,
                        bindings,
                    });
                    cache.len() - 1
                }
            };
            let t = &mut cache[at];
            arm(&mut t.store, CLASSIFY_DEADLINE);
            t.store.data().out.clear();
            let called = t.bindings.keyway_policy_request_classifier().call_classify(
                &mut t.store,
                method,
                path,
                host,
            );
            output = t.store.data().out.text();
            match called {
                Ok(WasmKind::Read) => Ok(Kind::Read),
                Ok(WasmKind::Write) => Ok(Kind::Write),
                Err(e) => {
                    let err = PluginError::from_call(e, &t.store);
                    // A trapped instance is never reused.
                    cache.swap_remove(at);
                    Err(err)
                }
            }
        });
        let traced = Traced { result, output };
        self.meta.record(&traced);
        match &traced.result {
            Ok(_) => {
                self.failures_in_a_row.store(0, Ordering::Relaxed);
            }
            Err(_) => {
                if self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 == BREAKER_FAILURES {
                    if let Ok(mut open) = self.open_until.lock() {
                        *open = Some(std::time::Instant::now() + BREAKER_OPEN);
                    }
                }
            }
        }
        traced
    }
}
