//! Loading a plugin: reading the file (bounded), hashing it, compiling it once (reusing
//! the compilation of identical bytes), linking it against one world and proving that
//! it accepts its configuration before anyone relies on it. Nothing here runs on the
//! request path.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use wasmtime::component::{Component, Linker};
use wasmtime::Store;

use crate::bindings;
use crate::engine::{engine, linker, new_store, PluginState};
use crate::error::PluginError;
use crate::meta::PluginMeta;
use crate::{MAX_PLUGIN_BYTES, POLICY_DEADLINE};

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
            remembered: AtomicU64::new(0),
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

/// What the generic loading code needs from each generated world.
pub(crate) trait World: Sized {
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
pub(crate) fn configured<W: World>(
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
pub(crate) fn configured_for_call<W: World>(
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
pub(crate) fn load_world<W: World>(
    path: &Path,
    config: &str,
) -> Result<(PluginMeta, W::Pre), String> {
    let (component, meta) = read_component(path, config)?;
    let pre = W::pre(&linker()?, &component)
        .map_err(|e| format!("{} is not a keyway {}: {e:#}", path.display(), W::EXPECTED))?;
    configured::<W>(&pre, config).map_err(|e| match e {
        Ok(why) => refused(&meta, why),
        Err(e) => format!("plugin {} failed while configuring: {e}", path.display()),
    })?;
    Ok((meta, pre))
}
