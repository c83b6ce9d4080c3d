//! The `classifier` world: decides per request whether it reads or writes. It runs on
//! the request path, so each thread keeps one configured instance per plugin version
//! (reused call after call, dropped after a trap or once its version is gone), each call
//! has the short [`CLASSIFY_DEADLINE`], and a breaker skips a plugin that keeps failing.
//! It never reuses a trapped instance and never lets a plugin failure escape as a panic.
//!
//! The WIT contract makes `classify` a function of method, path, host and configuration,
//! so each instance remembers its answers in a small fixed table ([`Memo`]): a request
//! seen before is answered without a call. The table never grows (a new request takes
//! the slot of an old one) and goes with its instance: a new version or configuration,
//! or a trap, starts from nothing.

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
    memo: Memo,
}

/// Slots of an instance's [`Memo`]: a power of two.
const MEMO_SLOTS: usize = 1024;
/// Requests whose method, host and path together are longer are not remembered (a
/// slot holds at most this many bytes, so a memo holds at most 256 KiB).
const MEMO_KEY_MAX: usize = 256;

/// An instance's answers, by request: a direct-mapped table of [`MEMO_SLOTS`] slots.
/// Colliding requests take each other's slot, which costs a call, never a wrong answer:
/// a hit compares the whole request. So a client sending endless new paths only makes
/// every request a call, as without a memo; it cannot grow memory or steer an answer.
#[derive(Default)]
struct Memo {
    /// Empty until the first answer is remembered.
    slots: Vec<Option<Remembered>>,
}

struct Remembered {
    hash: u64,
    method_len: u16,
    host_len: u16,
    /// Method, host and path, one after the other.
    key: Box<[u8]>,
    kind: Kind,
}

impl Memo {
    fn hash(method: &str, path: &str, host: &str) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = foldhash::fast::FixedState::with_seed(0x6b65_7977_6179).build_hasher();
        h.write(method.as_bytes());
        h.write_u8(0xff);
        h.write(host.as_bytes());
        h.write_u8(0xff);
        h.write(path.as_bytes());
        h.finish()
    }

    fn slot(hash: u64) -> usize {
        (hash >> 32) as usize & (MEMO_SLOTS - 1)
    }

    fn get(&self, hash: u64, method: &str, path: &str, host: &str) -> Option<Kind> {
        let r = self.slots.get(Self::slot(hash))?.as_ref()?;
        let (m, h) = (usize::from(r.method_len), usize::from(r.host_len));
        (r.hash == hash
            && m == method.len()
            && h == host.len()
            && r.key.len() == m + h + path.len()
            && &r.key[..m] == method.as_bytes()
            && &r.key[m..m + h] == host.as_bytes()
            && &r.key[m + h..] == path.as_bytes())
        .then_some(r.kind)
    }

    fn put(&mut self, hash: u64, method: &str, path: &str, host: &str, kind: Kind) {
        let len = method.len() + host.len() + path.len();
        if len > MEMO_KEY_MAX {
            return;
        }
        if self.slots.is_empty() {
            self.slots.resize_with(MEMO_SLOTS, || None);
        }
        let mut key = Vec::with_capacity(len);
        key.extend_from_slice(method.as_bytes());
        key.extend_from_slice(host.as_bytes());
        key.extend_from_slice(path.as_bytes());
        self.slots[Self::slot(hash)] = Some(Remembered {
            hash,
            // Both fit: the key is at most MEMO_KEY_MAX bytes.
            method_len: method.len() as u16,
            host_len: host.len() as u16,
            key: key.into_boxed_slice(),
            kind,
        });
    }
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

    /// Classifies one request with this thread's instance (made on first use), or with
    /// the answer that instance gave the same request before.
    pub fn classify(&self, method: &str, path: &str, host: &str) -> Result<Kind, PluginError> {
        let hash = Memo::hash(method, path, host);
        let known = CLASSIFIERS.with(|cache| {
            let cache = cache.borrow();
            let t = cache.iter().find(|t| t.id == self.meta.id)?;
            t.memo.get(hash, method, path, host)
        });
        if let Some(kind) = known {
            self.meta.remembered.fetch_add(1, Ordering::Relaxed);
            return Ok(kind);
        }
        self.call(method, path, host, Some(hash)).result
    }

    /// Classifies one request with a call, neither asking nor filling the memo: for a
    /// classifier whose answers depend on more than the request.
    pub fn classify_each_time(
        &self,
        method: &str,
        path: &str,
        host: &str,
    ) -> Result<Kind, PluginError> {
        self.call(method, path, host, None).result
    }

    /// Calls the plugin (never the memo), with what it wrote to stdout and stderr:
    /// `keyway plugin classify`.
    pub fn classify_traced(&self, method: &str, path: &str, host: &str) -> Traced<Kind> {
        self.call(method, path, host, None)
    }

    /// One call; with `memo`, the request's hash, a successful answer is remembered.
    fn call(&self, method: &str, path: &str, host: &str, memo: Option<u64>) -> Traced<Kind> {
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
                        memo: Memo::default(),
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
            let kind = match called {
                Ok(WasmKind::Read) => Kind::Read,
                Ok(WasmKind::Write) => Kind::Write,
                Err(e) => {
                    let err = PluginError::from_call(e, &t.store);
                    // A trapped instance is never reused.
                    cache.swap_remove(at);
                    return Err(err);
                }
            };
            if let Some(hash) = memo {
                t.memo.put(hash, method, path, host, kind);
            }
            Ok(kind)
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
