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

/// How often the engine's epoch advances: the granularity of CPU deadlines (a deadline fires
/// between its value and one tick later). Each tick wakes a thread, on an idle proxy too, so
/// it is kept coarse: 20 ms (a 100 ms deadline fires after 100–120 ms).
pub const EPOCH_TICK: Duration = Duration::from_millis(20);

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
    /// Compiled modules on disk (`SHA256.cwasm`), when set.
    cache_dir: Mutex<Option<std::path::PathBuf>>,
    /// A command that compiles out of process (`CMD... IN OUT`), when set.
    compiler: Mutex<Option<Vec<std::ffi::OsString>>>,
    /// Properties every VM sees (`node.*`), by dotted path.
    properties: Mutex<Arc<HashMap<String, Vec<u8>>>>,
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

/// The engine configuration every host (and the compile helper) uses: modules compiled by
/// one load in another.
fn engine_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // For profiling filters with `perf`: name the compiled functions in /tmp/perf-PID.map.
    if std::env::var_os("TRELLIS_WASM_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

/// Compiles the module in `input` to a loadable artifact in `output`: what the compile helper
/// process runs (trellis-proxy's `__compile-wasm IN OUT`). Compiling takes tens of megabytes
/// the allocator keeps afterwards; in a short-lived process that memory goes back at exit.
pub fn compile_to_file(input: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    let engine = Engine::new(&engine_config())?;
    let bytes = std::fs::read(input)?;
    let artifact = engine.precompile_module(&bytes)?;
    let tmp = output.with_extension("tmp");
    std::fs::write(&tmp, artifact)?;
    std::fs::rename(&tmp, output)?;
    Ok(())
}

impl Host {
    pub fn new() -> anyhow::Result<Host> {
        let engine = Engine::new(&engine_config())?;
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
                cache_dir: Mutex::new(None),
                compiler: Mutex::new(None),
                properties: Mutex::new(Arc::new(HashMap::new())),
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
        // The first tick may come at once, so one more than the deadline needs.
        (d.as_millis().div_ceil(EPOCH_TICK.as_millis())).max(1) as u64 + 1
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
        let module = match self.load_compiled(&actual).or_else(|| self.compile_elsewhere(&actual, bytes)) {
            Some(m) => m,
            None => {
                let m = Module::new(&self.inner.engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
                self.store_compiled(&actual, &m);
                m
            }
        };
        let compiled = Arc::new(CompiledModule { module, sha256: actual.clone(), size: bytes.len() });
        self.inner.modules.lock().unwrap_or_else(|p| p.into_inner()).insert(actual, compiled.clone());
        Ok(compiled)
    }

    /// Keeps compiled modules in `dir` too (`SHA256.cwasm`), so a restarted proxy does not
    /// compile again. The directory is created private (0700); one that others can write is
    /// refused, since loading a compiled module trusts its contents.
    pub fn set_cache_dir(&self, dir: &std::path::Path) -> Result<(), String> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("wasm cache {}: {e}", dir.display()))?;
        let mode =
            std::fs::metadata(dir).map_err(|e| format!("wasm cache {}: {e}", dir.display()))?.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(format!(
                "wasm cache {}: writable by others (mode {:o}); chmod 700 it",
                dir.display(),
                mode & 0o777
            ));
        }
        *self.inner.cache_dir.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_path_buf());
        Ok(())
    }

    /// Compiles modules in a helper process (`command... IN OUT`, e.g. trellis-proxy's own
    /// `__compile-wasm`), so the compiler's memory is not kept by this one. Needs a cache
    /// directory for the artifacts; without one, or when the helper fails (its error is
    /// logged), modules compile in process.
    pub fn set_compiler(&self, command: Vec<std::ffi::OsString>) {
        *self.inner.compiler.lock().unwrap_or_else(|p| p.into_inner()) = Some(command);
    }

    fn compile_elsewhere(&self, sha256: &str, bytes: &[u8]) -> Option<Module> {
        let command = self.inner.compiler.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        let output = self.cache_path(sha256, "cwasm")?;
        let input = output.with_extension("input.wasm");
        if let Err(e) = std::fs::write(&input, bytes) {
            tracing::warn!(error = %e, "cannot hand a module to the compile helper; compiling in process");
            return None;
        }
        let (program, args) = command.split_first()?;
        let status = std::process::Command::new(program).args(args).arg(&input).arg(&output).output();
        let _ = std::fs::remove_file(&input);
        match status {
            Ok(o) if o.status.success() => self.load_compiled(sha256),
            Ok(o) => {
                tracing::warn!(stderr = %String::from_utf8_lossy(&o.stderr).trim(), "the compile helper failed; compiling in process");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot run the compile helper; compiling in process");
                None
            }
        }
    }

    fn cache_path(&self, sha256: &str, ext: &str) -> Option<std::path::PathBuf> {
        let name = if ext == "cwasm" {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.inner.engine.precompile_compatibility_hash().hash(&mut h);
            format!("{sha256}-engine-{:016x}.cwasm", h.finish())
        } else {
            format!("{sha256}.{ext}")
        };
        self.inner.cache_dir.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|d| d.join(name))
    }

    #[allow(unsafe_code)]
    fn load_compiled(&self, sha256: &str) -> Option<Module> {
        let path = self.cache_path(sha256, "cwasm")?;
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was written by `store_compiled` from a module this engine compiled (its
        // name carries the module's sha256 and the engine's compatibility hash — wasmtime version
        // and configuration — so an upgrade never reads an old artifact), in a directory only this user can write (checked in
        // `set_cache_dir`); wasmtime also refuses an artifact of another engine configuration
        // (then we compile again).
        match unsafe { Module::deserialize_file(&self.inner.engine, &path) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::info!(path = %path.display(), error = %e, "compiled module cache entry unusable; compiling again");
                None
            }
        }
    }

    fn store_compiled(&self, sha256: &str, module: &Module) {
        let Some(path) = self.cache_path(sha256, "cwasm") else { return };
        let tmp = path.with_extension("cwasm.tmp");
        let written = module.serialize().map_err(|e| e.to_string()).and_then(|b| {
            std::fs::write(&tmp, b).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| e.to_string())
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled module");
        }
    }

    /// Module bytes kept in the cache directory (`SHA256.wasm`), verified against the name.
    pub fn cached_bytes(&self, sha256: &str) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.cache_path(sha256, "wasm")?).ok()?;
        (sha256_hex(&bytes) == sha256.to_ascii_lowercase()).then_some(bytes)
    }

    /// Keeps module bytes in the cache directory (if there is one).
    pub fn cache_bytes(&self, sha256: &str, bytes: &[u8]) {
        if let Some(path) = self.cache_path(sha256, "wasm") {
            let tmp = path.with_extension("wasm.tmp");
            if let Err(e) = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)) {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache a module");
            }
        }
    }

    /// Whether the module with this sha256 is compiled already (in memory).
    pub fn has_module(&self, sha256: &str) -> bool {
        self.compiled(sha256).is_some()
    }

    /// The module with this sha256, if compiled already (in memory).
    pub fn compiled(&self, sha256: &str) -> Option<Arc<CompiledModule>> {
        self.inner.modules.lock().unwrap_or_else(|p| p.into_inner()).get(&sha256.to_ascii_lowercase()).cloned()
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

    /// Sets a property every VM started from now on sees (dotted path, Envoy's encoding), e.g.
    /// `node.id`.
    pub fn set_property(&self, path: &str, value: Vec<u8>) {
        let mut slot = self.inner.properties.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = (**slot).clone();
        map.insert(path.to_string(), value);
        *slot = Arc::new(map);
    }

    pub(crate) fn properties(&self) -> Arc<HashMap<String, Vec<u8>>> {
        self.inner.properties.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Offers a foreign function to VMs started from now on. A function named like one of the
    /// host's own (`trellis.*`) replaces it: answering `NotFound` plays a host without it.
    pub fn register_foreign_function(&self, name: &str, f: ForeignFunction) {
        let mut slot = self.inner.foreign.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = (**slot).clone();
        map.insert(name.to_string(), f);
        *slot = Arc::new(map);
    }
}
