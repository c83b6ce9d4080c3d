//! The engine and everything a call runs in: one process-wide [`Engine`] with epoch
//! interruption and its ticker thread, per-call deadlines, stores with an empty WASI
//! context and a memory limiter, and the linker that withholds stdin and answers the
//! blocking output calls synchronously. It never loads a file and never calls a plugin.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::component::{Linker, Resource, ResourceTable, ResourceType};
use wasmtime::{Engine, ResourceLimiter, Store, StoreContextMut};
use wasmtime_wasi::p2::bindings::sync::io::streams::StreamError as WasiStreamError;
use wasmtime_wasi::p2::{DynOutputStream, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::output::Capture;
use crate::{MEMORY_LIMIT, OUTPUT_LIMIT, POLICY_DEADLINE, TICK};

pub(crate) fn engine() -> &'static Engine {
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
pub(crate) fn arm(store: &mut Store<PluginState>, deadline: Duration) {
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

/// Per-store state: an empty WASI context, the captured output and the memory limiter.
pub(crate) struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) out: Capture,
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
pub(crate) struct Limiter {
    max: usize,
    pub(crate) refused: bool,
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

pub(crate) fn new_store(deadline: Duration) -> Store<PluginState> {
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

pub(crate) fn linker() -> Result<Linker<PluginState>, String> {
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
