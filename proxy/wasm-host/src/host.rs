//! The host: one wasmtime engine (epoch interruption for CPU deadlines), the linker with every
//! import, a cache of compiled modules by sha256 (a module is compiled once, however many
//! plugins and VMs use it), shared-data spaces by `vm_id`, process-wide metrics and the
//! foreign functions offered to filters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, Linker, Module};

use crate::state::{ForeignFunction, Metrics, SharedSpace, VmState};

/// How often the engine's epoch advances: the granularity of CPU deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// A validated, compiled module.
#[derive(Debug)]
pub struct CompiledModule {
    module: Module,
    /// Hex sha256 of the bytes it was compiled from.
    pub sha256: String,
    pub size: usize,
}

impl CompiledModule {
    pub fn module(&self) -> &Module {
        &self.module
    }
}

/// Why a module was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("module sha256 is {actual}, expected {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
}

struct Inner {
    engine: Engine,
    linker: Linker<VmState>,
    modules: Mutex<HashMap<String, Arc<CompiledModule>>>,
    shared: Mutex<HashMap<String, Arc<SharedSpace>>>,
    metrics: Arc<Metrics>,
    foreign: Mutex<Arc<HashMap<String, ForeignFunction>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The wasm host. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let modules = self.inner.modules.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Host").field("modules", &modules).finish()
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Host {
    pub fn new() -> anyhow::Result<Host> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        crate::imports::define(&mut linker)?;
        let stop = Arc::new(AtomicBool::new(false));
        // The epoch ticker: one thread per host, ends with it.
        let (e, s) = (engine.clone(), stop.clone());
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                e.increment_epoch();
            }
        })?;
        Ok(Host {
            inner: Arc::new(Inner {
                engine,
                linker,
                modules: Mutex::new(HashMap::new()),
                shared: Mutex::new(HashMap::new()),
                metrics: Arc::new(Metrics::default()),
                foreign: Mutex::new(Arc::new(HashMap::new())),
                stop,
            }),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub(crate) fn linker(&self) -> &Linker<VmState> {
        &self.inner.linker
    }

    /// Epoch ticks for a deadline (at least one).
    pub(crate) fn deadline_ticks(&self, d: Duration) -> u64 {
        (d.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
    }

    /// Verifies `bytes` against `expected_sha256` (hex, when given) and compiles them, or
    /// returns the module already compiled from the same bytes.
    pub fn load(&self, bytes: &[u8], expected_sha256: Option<&str>) -> Result<Arc<CompiledModule>, LoadError> {
        let actual = sha256_hex(bytes);
        if let Some(expected) = expected_sha256
            && !expected.eq_ignore_ascii_case(&actual)
        {
            return Err(LoadError::HashMismatch { expected: expected.to_ascii_lowercase(), actual });
        }
        if let Some(m) = self.inner.modules.lock().unwrap_or_else(|p| p.into_inner()).get(&actual) {
            return Ok(m.clone());
        }
        let module = Module::new(&self.inner.engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        let compiled = Arc::new(CompiledModule { module, sha256: actual.clone(), size: bytes.len() });
        self.inner.modules.lock().unwrap_or_else(|p| p.into_inner()).insert(actual, compiled.clone());
        Ok(compiled)
    }

    /// Number of distinct modules compiled.
    pub fn compiled_modules(&self) -> usize {
        self.inner.modules.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub(crate) fn shared_space(&self, vm_id: &str) -> Arc<SharedSpace> {
        self.inner.shared.lock().unwrap_or_else(|p| p.into_inner()).entry(vm_id.to_string()).or_default().clone()
    }

    /// Metrics filters defined, process-wide.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    pub(crate) fn foreign_functions(&self) -> Arc<HashMap<String, ForeignFunction>> {
        self.inner.foreign.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Offers a foreign function to VMs started from now on.
    pub fn register_foreign_function(&self, name: &str, f: ForeignFunction) {
        let mut slot = self.inner.foreign.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = (**slot).clone();
        map.insert(name.to_string(), f);
        *slot = Arc::new(map);
    }
}
