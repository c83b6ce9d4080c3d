//! The WebAssembly plugin host: every wasmtime decision keyway makes lives here.
//!
//! - **Engine**: one per process, component model on, *epoch interruption* on. A ticker
//!   thread advances the epoch every [`TICK`]; each call gets a deadline of a few ticks,
//!   so a plugin that loops is interrupted (a trap), never waited for.
//! - **Memory**: each store has a [`Limiter`] refusing growth past [`MEMORY_LIMIT`]; the
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

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use wasmtime::component::{Component, Linker, Resource, ResourceTable, ResourceType};
use wasmtime::{Engine, ResourceLimiter, Store, StoreContextMut, Trap};
use wasmtime_wasi::p2::{DynOutputStream, OutputStream, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Generated bindings for the three worlds of `wit/policy.wit`.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    /// `world health`.
    pub mod health {
        wasmtime::component::bindgen!({ world: "health", path: "../wit" });
    }
    /// `world promotion`.
    pub mod promotion {
        wasmtime::component::bindgen!({ world: "promotion", path: "../wit" });
    }
    /// `world classifier`.
    pub mod classifier {
        wasmtime::component::bindgen!({ world: "classifier", path: "../wit" });
    }
}

use bindings::classifier::exports::keyway::policy::request_classifier::Kind as WasmKind;

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

// === engine ===

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).unwrap_or_else(|e| {
            // The configuration above is static; failing here is a build problem.
            panic!("keyway's wasmtime configuration is invalid: {e}")
        });
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("keyway-plugin-epoch".into())
            .spawn(move || {
                let _ = TICKER.set(std::thread::current());
                let mut idle = 0u64;
                loop {
                    std::thread::sleep(TICK);
                    match ticker.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => return,
                    }
                    if CALLED.swap(false, Ordering::SeqCst) {
                        idle = 0;
                        continue;
                    }
                    idle += 1;
                    // Park only after longer than any deadline: a call still running
                    // then has already been interrupted.
                    if idle > 2 * ticks(POLICY_DEADLINE) {
                        PARKED.store(true, Ordering::SeqCst);
                        if !CALLED.load(Ordering::SeqCst) {
                            std::thread::park();
                        }
                        PARKED.store(false, Ordering::SeqCst);
                        idle = 0;
                    }
                }
            })
            .ok();
        engine
    })
}

/// Set by every plugin call; the ticker parks after a quiet spell and the next call
/// wakes it. Either the ticker sees `CALLED` before parking or the call sees `PARKED` and
/// unparks it (both `SeqCst`), so no call ever runs without a ticking epoch.
static CALLED: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicBool = AtomicBool::new(false);
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();

/// Arms a store's deadline for one call (and makes sure the epoch ticks).
fn arm(store: &mut Store<PluginState>, deadline: Duration) {
    CALLED.store(true, Ordering::SeqCst);
    if PARKED.load(Ordering::SeqCst) {
        if let Some(t) = TICKER.get() {
            t.unpark();
        }
    }
    store.set_epoch_deadline(ticks(deadline));
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() / TICK.as_micros()).max(1) as u64 + 1
}

// === store state ===

/// Per-store state: an empty WASI context, the captured output and the memory limiter.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    out: Capture,
}

// === captured output ===

/// A plugin's stdout and stderr (one buffer, in the order written): the first
/// [`OUTPUT_LIMIT`] bytes are kept, the rest only counted.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<CaptureBuf>>);

#[derive(Default)]
struct CaptureBuf {
    kept: Vec<u8>,
    dropped: usize,
}

impl Capture {
    fn push(&self, bytes: &[u8]) {
        if let Ok(mut b) = self.0.lock() {
            let room = OUTPUT_LIMIT.saturating_sub(b.kept.len());
            let n = room.min(bytes.len());
            b.kept.extend_from_slice(&bytes[..n]);
            b.dropped += bytes.len() - n;
        }
    }

    fn clear(&self) {
        if let Ok(mut b) = self.0.lock() {
            b.kept.clear();
            b.dropped = 0;
        }
    }

    /// The output as text (lossy UTF-8), saying how much was not kept.
    fn text(&self) -> String {
        let Ok(b) = self.0.lock() else {
            return String::new();
        };
        let mut t = String::from_utf8_lossy(&b.kept).into_owned();
        if b.dropped > 0 {
            t.push_str(&format!("… ({} more bytes not kept)", b.dropped));
        }
        t
    }
}

impl wasmtime_wasi::cli::IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always writable: what does not fit is counted, never waited for.
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for Capture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The message of a Rust panic in `output` ("panicked at src/lib.rs:9:5: the message"),
/// without the hint lines that follow it.
fn panic_message(output: &str) -> Option<String> {
    let at = output.find("panicked at ")?;
    let rest = &output[at..];
    let mut lines = rest.lines();
    let mut msg = lines.next()?.trim_end().to_string();
    for line in lines {
        if line.starts_with("note: ") || line.starts_with("stack backtrace") {
            break;
        }
        if !msg.ends_with(':') {
            msg.push('\n');
        } else {
            msg.push(' ');
        }
        msg.push_str(line);
    }
    Some(msg.trim_end().chars().take(MAX_REASON_BYTES).collect())
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Refuses memory growth past the limit and remembers that it did.
struct Limiter {
    max: usize,
    refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

fn new_store(deadline: Duration) -> Store<PluginState> {
    let out = Capture::default();
    let mut store = Store::new(
        engine(),
        PluginState {
            wasi: WasiCtx::builder()
                .stdout(out.clone())
                .stderr(out.clone())
                .build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                max: MEMORY_LIMIT,
                refused: false,
            },
            out,
        },
    );
    store.limiter(|s| &mut s.limiter);
    arm(&mut store, deadline);
    store.epoch_deadline_trap();
    store
}

fn linker() -> Result<Linker<PluginState>, String> {
    let mut linker = Linker::new(engine());
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
        .map_err(|e| format!("cannot provide WASI: {e}"))?;
    // No stdin for plugins: getting it traps (a policy reads nothing, and WASI's
    // blocking read would start a Tokio runtime, which panics on keyway's async workers).
    linker.allow_shadowing(true);
    linker
        .instance("wasi:cli/stdin@0.2.12")
        .and_then(|mut i| {
            i.func_new("get-stdin", |_store, _ty, _params, _results| {
                Err(wasmtime::format_err!("keyway plugins have no stdin"))
            })
        })
        .map_err(|e| format!("cannot restrict stdin: {e}"))?;
    // stdout and stderr are captured (`Capture`). The blocking calls on output streams
    // (and dropping one) are answered here, synchronously: wasmtime-wasi's versions
    // block on a Tokio runtime, which panics on an async worker (the classifier runs
    // on the request path). A captured stream never has to wait.
    linker
        .instance("wasi:io/streams@0.2.12")
        .and_then(|mut i| {
            i.resource(
                "output-stream",
                ResourceType::host::<DynOutputStream>(),
                |mut store: StoreContextMut<'_, PluginState>, rep| {
                    let own = Resource::<DynOutputStream>::new_own(rep);
                    store.data_mut().table.delete(own)?;
                    Ok(())
                },
            )?;
            i.func_wrap(
                "[method]output-stream.blocking-write-and-flush",
                |mut store: StoreContextMut<'_, PluginState>,
                 (s, bytes): (Resource<DynOutputStream>, Vec<u8>)| {
                    Ok((write_now(store.data_mut(), &s, bytes)?,))
                },
            )?;
            i.func_wrap(
                "[method]output-stream.blocking-write-zeroes-and-flush",
                |mut store: StoreContextMut<'_, PluginState>,
                 (s, len): (Resource<DynOutputStream>, u64)| {
                    let zeroes = vec![0u8; len.min(OUTPUT_LIMIT as u64) as usize];
                    Ok((write_now(store.data_mut(), &s, zeroes)?,))
                },
            )?;
            i.func_wrap(
                "[method]output-stream.blocking-flush",
                |mut store: StoreContextMut<'_, PluginState>,
                 (s,): (Resource<DynOutputStream>,)| {
                    Ok((write_now(store.data_mut(), &s, Vec::new())?,))
                },
            )
        })
        .map_err(|e| format!("cannot capture plugin output: {e}"))?;
    Ok(linker)
}

/// `blocking-write-and-flush` on a stream that never waits (a [`Capture`]).
fn write_now(
    state: &mut PluginState,
    s: &Resource<DynOutputStream>,
    bytes: Vec<u8>,
) -> wasmtime::Result<Result<(), WasiStreamError>> {
    let stream = state.table.get_mut(s)?;
    let written = if bytes.is_empty() {
        Ok(())
    } else {
        stream.write(bytes.into())
    };
    match written.and_then(|()| stream.flush()) {
        Ok(()) => Ok(Ok(())),
        Err(StreamError::Trap(e)) => Err(e),
        Err(_) => Ok(Err(WasiStreamError::Closed)),
    }
}

use wasmtime_wasi::p2::bindings::sync::io::streams::StreamError as WasiStreamError;

// === errors ===

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
    fn from_call(err: wasmtime::Error, store: &Store<PluginState>) -> Self {
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

// === shared plugin facts ===

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
    id: u64,
    calls: AtomicU64,
    errors: AtomicU64,
    logged: Mutex<Vec<LogSlot>>,
}

/// When a plugin's lines of one kind were last logged, and how many were not since.
struct LogSlot {
    kind: &'static str,
    last: std::time::Instant,
    unlogged: u64,
}

/// One call's answer and what the plugin wrote meanwhile.
#[derive(Debug)]
pub struct Traced<T> {
    /// The answer, or how the call failed.
    pub result: Result<T, PluginError>,
    /// The plugin's stdout and stderr during the call (at most [`OUTPUT_LIMIT`] bytes).
    pub output: String,
}

impl PluginMeta {
    /// Calls made.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Calls that failed.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Whether a line of `kind` may be logged now (at most once per [`LOG_EVERY`]), and
    /// how many were held back since the last one.
    fn may_log(&self, kind: &'static str) -> Option<u64> {
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
    fn record<T>(&self, traced: &Traced<T>) {
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
        })
    }
}

fn read_component(path: &Path, config: &str) -> Result<(Component, PluginMeta), String> {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if size > MAX_PLUGIN_BYTES {
        return Err(format!(
            "{} is {size} bytes; plugins may be at most {MAX_PLUGIN_BYTES}",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let component = compile(&bytes, digest.as_ref()).map_err(|e| {
        format!(
            "{} is not a WebAssembly component keyway can load: {e:#} (build plugins with `cargo build --target wasm32-wasip2`)",
            path.display()
        )
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    Ok((
        component,
        PluginMeta {
            name,
            path: path.to_path_buf(),
            hash,
            loaded_at: SystemTime::now(),
            config: config.to_string(),
            id: IDS.fetch_add(1, Ordering::Relaxed),
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            logged: Mutex::new(Vec::new()),
        },
    ))
}

/// Compiled components kept for reuse, most recent last.
const COMPILED_KEPT: usize = 16;

/// Compiles `bytes`, or reuses the compilation of identical bytes (by SHA-256): a config
/// reload or a rewritten-but-unchanged file costs no recompilation.
fn compile(bytes: &[u8], digest: &[u8]) -> wasmtime::Result<Component> {
    static COMPILED: Mutex<std::collections::VecDeque<(Vec<u8>, Component)>> =
        Mutex::new(std::collections::VecDeque::new());
    let hit = COMPILED.lock().ok().and_then(|kept| {
        kept.iter()
            .find(|(d, _)| d.as_slice() == digest)
            .map(|(_, c)| c.clone())
    });
    if let Some(c) = hit {
        return Ok(c);
    }
    let c = Component::new(engine(), bytes)?;
    if let Ok(mut kept) = COMPILED.lock() {
        if kept.len() == COMPILED_KEPT {
            kept.pop_front();
        }
        kept.push_back((digest.to_vec(), c.clone()));
    }
    Ok(c)
}

fn refused(meta: &PluginMeta, why: String) -> String {
    format!(
        "plugin {} refused its configuration: {why}",
        meta.path.display()
    )
}

// === per-world glue ===

/// What the generic loading code needs from each generated world.
trait World: Sized {
    /// The generated pre-instantiated form.
    type Pre;
    /// How errors name the expected world.
    const EXPECTED: &'static str;
    fn pre(linker: &Linker<PluginState>, component: &Component) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<PluginState>) -> wasmtime::Result<Self>;
    fn configure(
        &self,
        store: &mut Store<PluginState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>>;
}

macro_rules! world {
    ($ty:ty, $pre:ty, $accessor:ident, $expected:literal) => {
        impl World for $ty {
            type Pre = $pre;
            const EXPECTED: &'static str = $expected;
            fn pre(
                linker: &Linker<PluginState>,
                component: &Component,
            ) -> wasmtime::Result<Self::Pre> {
                linker.instantiate_pre(component).and_then(<$pre>::new)
            }
            fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<PluginState>,
            ) -> wasmtime::Result<Self> {
                pre.instantiate(store)
            }
            fn configure(
                &self,
                store: &mut Store<PluginState>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                self.$accessor().call_configure(store, config)
            }
        }
    };
}

world!(
    bindings::health::Health,
    bindings::health::HealthPre<PluginState>,
    keyway_policy_health_policy,
    "health policy (world `health` of keyway:policy@0.1.0)"
);
world!(
    bindings::classifier::Classifier,
    bindings::classifier::ClassifierPre<PluginState>,
    keyway_policy_request_classifier,
    "request classifier (world `classifier` of keyway:policy@0.1.0)"
);
world!(
    bindings::promotion::Promotion,
    bindings::promotion::PromotionPre<PluginState>,
    keyway_policy_promotion_policy,
    "promotion policy (world `promotion` of keyway:policy@0.1.0)"
);

/// A fresh, configured instance. `Err(Ok(why))`: the plugin refused its configuration.
fn configured<W: World>(
    pre: &W::Pre,
    config: &str,
) -> Result<(Store<PluginState>, W), Result<String, PluginError>> {
    let mut store = new_store(POLICY_DEADLINE);
    let inst =
        W::instantiate(pre, &mut store).map_err(|e| Err(PluginError::from_call(e, &store)))?;
    match inst.configure(&mut store, config) {
        Ok(Ok(())) => Ok((store, inst)),
        Ok(Err(why)) => Err(Ok(why)),
        Err(e) => Err(Err(PluginError::from_call(e, &store))),
    }
}

/// Like [`configured`], for calls: a refused configuration is an unusable answer.
fn configured_for_call<W: World>(
    pre: &W::Pre,
    config: &str,
) -> Result<(Store<PluginState>, W), PluginError> {
    configured::<W>(pre, config).map_err(|e| match e {
        Ok(why) => PluginError::InvalidOutput(format!("configure refused: {why}")),
        Err(e) => e,
    })
}

/// Compiles and links the plugin at `path`, then proves it configures with `config`
/// before anyone relies on it.
fn load_world<W: World>(path: &Path, config: &str) -> Result<(PluginMeta, W::Pre), String> {
    let (component, meta) = read_component(path, config)?;
    let pre = W::pre(&linker()?, &component)
        .map_err(|e| format!("{} is not a keyway {}: {e:#}", path.display(), W::EXPECTED))?;
    configured::<W>(&pre, config).map_err(|e| match e {
        Ok(why) => refused(&meta, why),
        Err(e) => format!("plugin {} failed while configuring: {e}", path.display()),
    })?;
    Ok((meta, pre))
}

// === health ===

/// A loaded health-policy plugin.
pub struct HealthPlugin {
    /// Facts for `/status`.
    pub meta: PluginMeta,
    pre: bindings::health::HealthPre<PluginState>,
}

/// A plugin's health verdict, in the host's terms.
pub type HealthVerdict = (crate::health::Health, String);

impl HealthPlugin {
    /// Compiles, links and configures the plugin at `path` with `config` (JSON).
    pub fn load(path: &Path, config: &str) -> Result<Arc<Self>, String> {
        let (meta, pre) = load_world::<bindings::health::Health>(path, config)?;
        Ok(Arc::new(Self { meta, pre }))
    }

    /// Runs the policy for one backend. `backend` carries its current role; `now_ms` and
    /// every probe's `at-ms` are Unix milliseconds (wall clock), as the WIT says.
    pub fn evaluate(
        &self,
        backend: &crate::config::BackendConfig,
        current: crate::health::Health,
        history: &std::collections::VecDeque<crate::health::Probe>,
        now_ms: u64,
    ) -> Result<HealthVerdict, PluginError> {
        self.evaluate_traced(backend, current, history, now_ms)
            .result
    }

    /// [`Self::evaluate`], with what the plugin wrote to stdout and stderr.
    pub fn evaluate_traced(
        &self,
        backend: &crate::config::BackendConfig,
        current: crate::health::Health,
        history: &std::collections::VecDeque<crate::health::Probe>,
        now_ms: u64,
    ) -> Traced<HealthVerdict> {
        use crate::health::Health as H;
        use bindings::health::keyway::policy::types as t;
        self.meta.calls.fetch_add(1, Ordering::Relaxed);
        let mut output = String::new();
        let result = (|| {
            let (mut store, inst) =
                configured_for_call::<bindings::health::Health>(&self.pre, &self.meta.config)?;
            let wasm_backend = t::Backend {
                id: backend.id.clone(),
                role: match backend.role {
                    crate::config::Role::Primary => t::Role::Primary,
                    crate::config::Role::Replica => t::Role::Replica,
                },
                priority: backend.priority,
                location: backend.location.clone(),
                weight: backend.weight,
            };
            let probes: Vec<t::Probe> = history
                .iter()
                .map(|p| t::Probe {
                    at_ms: crate::unix_ms(p.at_wall),
                    ok: p.ok,
                    status: p.status,
                    latency_us: p.latency.as_micros().min(u128::from(u32::MAX)) as u32,
                    error: p.error.clone(),
                    lag_ms: p.lag_ms,
                })
                .collect();
            let cur = match current {
                H::Healthy => t::Health::Healthy,
                H::Degraded => t::Health::Degraded,
                H::Unknown | H::Unhealthy => t::Health::Unhealthy,
            };
            let called = inst.keyway_policy_health_policy().call_evaluate(
                &mut store,
                &wasm_backend,
                cur,
                &probes,
                now_ms,
            );
            output = store.data().out.text();
            let verdict = called.map_err(|e| PluginError::from_call(e, &store))?;
            if verdict.reason.len() > MAX_REASON_BYTES {
                return Err(PluginError::InvalidOutput(format!(
                    "a reason of {} bytes (at most {MAX_REASON_BYTES})",
                    verdict.reason.len()
                )));
            }
            let health = match verdict.health {
                t::Health::Healthy => H::Healthy,
                t::Health::Degraded => H::Degraded,
                t::Health::Unhealthy => H::Unhealthy,
            };
            Ok((health, verdict.reason))
        })();
        let traced = Traced { result, output };
        self.meta.record(&traced);
        traced
    }
}

// === classifier ===

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
    pub fn classify(
        &self,
        method: &str,
        path: &str,
        host: &str,
    ) -> Result<crate::classify::Kind, PluginError> {
        self.classify_traced(method, path, host).result
    }

    /// [`Self::classify`], with what the plugin wrote to stdout and stderr.
    pub fn classify_traced(
        &self,
        method: &str,
        path: &str,
        host: &str,
    ) -> Traced<crate::classify::Kind> {
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
                Ok(WasmKind::Read) => Ok(crate::classify::Kind::Read),
                Ok(WasmKind::Write) => Ok(crate::classify::Kind::Write),
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

// === promotion ===

/// A loaded promotion-policy plugin.
pub struct PromotionPlugin {
    /// Facts for `/status`.
    pub meta: PluginMeta,
    pre: bindings::promotion::PromotionPre<PluginState>,
}

/// A candidate for promotion, in the host's terms.
#[derive(Clone, Debug)]
pub struct PromotionCandidate {
    /// Backend id.
    pub id: String,
    /// Its priority.
    pub priority: u32,
    /// Its location label.
    pub location: String,
    /// Its `weight`.
    pub weight: u32,
    /// Healthy.
    pub healthy: bool,
    /// Degraded (a standby: promoted only when no candidate is healthy). Ignored when
    /// `healthy`.
    pub degraded: bool,
    /// Last reported lag.
    pub lag_ms: Option<u64>,
    /// Last passing check, Unix milliseconds (0: never).
    pub last_ok_ms: u64,
}

/// A promotion decision, in the host's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromotionDecision {
    /// Keep the current primary.
    Keep,
    /// Promote this backend id (checked to be a candidate).
    Promote(String),
    /// No acceptable candidate.
    None,
}

impl PromotionPlugin {
    /// Compiles, links and configures the plugin at `path` with `config` (JSON).
    pub fn load(path: &Path, config: &str) -> Result<Arc<Self>, String> {
        let (meta, pre) = load_world::<bindings::promotion::Promotion>(path, config)?;
        Ok(Arc::new(Self { meta, pre }))
    }

    /// Asks the policy for a decision. A `promote` naming no candidate is rejected.
    /// `now_ms` is Unix milliseconds, like every candidate's `last_ok_ms`.
    pub fn decide(
        &self,
        primary: Option<&PromotionCandidate>,
        candidates: &[PromotionCandidate],
        now_ms: u64,
    ) -> Result<PromotionDecision, PluginError> {
        self.decide_traced(primary, candidates, now_ms).result
    }

    /// [`Self::decide`], with what the plugin wrote to stdout and stderr.
    pub fn decide_traced(
        &self,
        primary: Option<&PromotionCandidate>,
        candidates: &[PromotionCandidate],
        now_ms: u64,
    ) -> Traced<PromotionDecision> {
        use bindings::promotion::exports::keyway::policy::promotion_policy as p;
        use bindings::promotion::keyway::policy::types as t;
        self.meta.calls.fetch_add(1, Ordering::Relaxed);
        let convert = |c: &PromotionCandidate, role: t::Role| p::Candidate {
            backend: t::Backend {
                id: c.id.clone(),
                role,
                priority: c.priority,
                location: c.location.clone(),
                weight: c.weight,
            },
            health: if c.healthy {
                t::Health::Healthy
            } else if c.degraded {
                t::Health::Degraded
            } else {
                t::Health::Unhealthy
            },
            lag_ms: c.lag_ms,
            last_ok_ms: c.last_ok_ms,
        };
        let mut output = String::new();
        let result = (|| {
            let (mut store, inst) = configured_for_call::<bindings::promotion::Promotion>(
                &self.pre,
                &self.meta.config,
            )?;
            let api = inst.keyway_policy_promotion_policy();
            let prim = primary.map(|c| convert(c, t::Role::Primary));
            let cands: Vec<p::Candidate> = candidates
                .iter()
                .map(|c| convert(c, t::Role::Replica))
                .collect();
            let called = api.call_decide(&mut store, prim.as_ref(), &cands, now_ms);
            output = store.data().out.text();
            let d = called.map_err(|e| PluginError::from_call(e, &store))?;
            Ok(match d {
                p::Decision::Keep => PromotionDecision::Keep,
                p::Decision::None => PromotionDecision::None,
                p::Decision::Promote(id) if candidates.iter().any(|c| c.id == id) => {
                    PromotionDecision::Promote(id)
                }
                p::Decision::Promote(id) => {
                    return Err(PluginError::InvalidOutput(format!(
                        "promote(\"{id}\") names no candidate"
                    )))
                }
            })
        })();
        let traced = Traced { result, output };
        self.meta.record(&traced);
        traced
    }
}

/// Whether a config `policy` value names a plugin file rather than a built-in.
pub fn is_plugin_path(policy: &str) -> bool {
    policy.ends_with(".wasm")
}

/// `on_error`: what a failed plugin call means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Use the native built-in of the same kind.
    Fallback,
    /// The safe answer: classifier → write; health → unhealthy; promotion → no promotion.
    FailClosed,
    /// The permissive answer: classifier → read; health → healthy.
    FailOpen,
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

/// Parses an `on_error` value.
pub fn parse_on_error(text: &str) -> Option<OnError> {
    match text {
        "fallback" => Some(OnError::Fallback),
        "fail-closed" => Some(OnError::FailClosed),
        "fail-open" => Some(OnError::FailOpen),
        _ => None,
    }
}

// Plugins are shared by every worker thread.
const _: () = {
    const fn check<T: Send + Sync>() {}
    check::<HealthPlugin>();
    check::<ClassifierPlugin>();
    check::<PromotionPlugin>();
};

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

    #[test]
    fn the_panic_message_is_found_in_the_output_and_the_buffer_is_bounded() {
        let out = "before\nthread '<unnamed>' (1) panicked at src/lib.rs:9:5:\nno config\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(out).as_deref(),
            Some("panicked at src/lib.rs:9:5: no config")
        );
        assert_eq!(panic_message("just output\n"), None);
        let c = Capture::default();
        c.push(&[b'x'; OUTPUT_LIMIT - 1]);
        c.push(b"yz");
        let t = c.text();
        assert!(t.starts_with(&"x".repeat(OUTPUT_LIMIT - 1)) && t.contains('y'));
        assert!(
            t.ends_with("… (1 more bytes not kept)"),
            "{}",
            &t[OUTPUT_LIMIT - 8..]
        );
        c.clear();
        assert_eq!(c.text(), "");
    }
}
