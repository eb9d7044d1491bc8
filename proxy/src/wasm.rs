//! Wasm HTTP filters at run time: for each listener, its chain of proxy-wasm filters, each a
//! compiled module (trellis-wasm-host) with a pool of VMs. A stream borrows one VM per filter
//! for its lifetime and gives it back (a VM is never created per request; the pool grows to
//! the concurrency). Filters are built — module read, sha256 verified, compiled once, a first
//! VM started so on_configure runs — while a configuration is applied: a bad module or a
//! refused configuration NACKs the update and the old chain keeps serving. A chain whose
//! configuration did not change is kept (VMs, shared data and all).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trellis_wasm_host::{CompiledModule, Host, Limits, PluginConfig, Vm, VmError};

use crate::config::listener::{FailPolicy, WasmCode, WasmFilterConfig};
use crate::config::{ListenerKind, Snapshot};
use crate::metrics::{PluginLabel, WasmMetrics};

/// VMs kept per filter beyond those in use.
const POOL: usize = 64;

/// A filter ready to run.
pub struct WasmFilter {
    pub config: WasmFilterConfig,
    host: Host,
    module: Arc<CompiledModule>,
    plugin: PluginConfig,
    pool: Mutex<Vec<Vm>>,
    /// Failures: (when the filter may try a fresh VM again, the next backoff). Fail-closed
    /// filters never do once failed.
    failed: Mutex<Option<(Instant, Duration)>>,
    metrics: WasmMetrics,
    label: PluginLabel,
}

impl std::fmt::Debug for WasmFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmFilter").field("name", &self.config.name).field("sha256", &self.module.sha256).finish()
    }
}

impl WasmFilter {
    /// Loads, verifies and compiles the module and starts a first VM.
    pub fn build(
        host: &Host,
        config: &WasmFilterConfig,
        fetched: &Fetched,
        metrics: &WasmMetrics,
    ) -> Result<WasmFilter, String> {
        let what = format!("wasm filter {}", config.name);
        let module = match &config.code {
            WasmCode::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| format!("{what}: cannot read {path}: {e}"))?;
                host.load(&bytes, config.sha256.as_deref())
            }
            WasmCode::Inline(b) => host.load(b, config.sha256.as_deref()),
            WasmCode::Builtin(b) => host.load(b, None),
            WasmCode::Remote { sha256, .. } if host.has_module(sha256) => {
                host.compiled(sha256).ok_or(trellis_wasm_host::LoadError::Invalid("evicted".into()))
            }
            WasmCode::Remote { uri, sha256 } => {
                let bytes = fetched
                    .get(sha256)
                    .cloned()
                    .or_else(|| host.cached_bytes(sha256).map(Arc::new))
                    .ok_or_else(|| format!("{what}: module {uri} was not fetched"))?;
                host.load(&bytes, Some(sha256))
            }
        }
        .map_err(|e| format!("{what}: {e}"))?;
        let plugin = PluginConfig {
            name: config.name.clone(),
            root_id: config.root_id.clone(),
            vm_id: config.vm_id.clone(),
            configuration: config.configuration.clone(),
            vm_configuration: Vec::new(),
        };
        let first =
            Vm::start(host, module.clone(), plugin.clone(), Limits::default()).map_err(|e| format!("{what}: {e}"))?;
        let label = PluginLabel { plugin: config.name.clone() };
        metrics.vm_starts.get_or_create(&label).inc();
        Ok(WasmFilter {
            config: config.clone(),
            host: host.clone(),
            module,
            plugin,
            pool: Mutex::new(vec![first]),
            failed: Mutex::new(None),
            metrics: metrics.clone(),
            label,
        })
    }

    /// A VM for one stream.
    pub fn take(&self) -> Result<Vm, VmError> {
        if let Some((retry_at, _)) = *self.failed.lock().unwrap_or_else(|p| p.into_inner())
            && (self.config.policy == FailPolicy::Closed || Instant::now() < retry_at)
        {
            return Err(VmError::Poisoned { plugin: self.config.name.clone() });
        }
        if let Some(vm) = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(vm);
        }
        self.metrics.vm_starts.get_or_create(&self.label).inc();
        Vm::start(&self.host, self.module.clone(), self.plugin.clone(), Limits::default())
    }

    /// Runs one callback, counting it, its time and its failure.
    pub fn call<T>(&self, f: impl FnOnce() -> Result<T, VmError>) -> Result<T, VmError> {
        let t = Instant::now();
        let r = f();
        self.metrics.calls.get_or_create(&self.label).inc();
        self.metrics.time.get_or_create(&self.label).inc_by(t.elapsed().as_secs_f64());
        if r.is_err() {
            self.metrics.errors.get_or_create(&self.label).inc();
        }
        r
    }

    /// Gives a VM back. A failed one is dropped and the failure recorded: fail-closed filters
    /// stay failed; fail-reload ones wait 100 ms, doubling to 10 s, before a fresh VM.
    pub fn give_back(&self, vm: Vm) {
        if vm.poisoned() {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            let backoff =
                failed.map(|(_, b)| (b * 2).min(Duration::from_secs(10))).unwrap_or(Duration::from_millis(100));
            *failed = Some((Instant::now() + backoff, backoff));
            return;
        }
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut vm = vm;
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL {
            let bytes = vm.memory_bytes() as i64;
            pool.push(vm);
            let total: i64 = bytes.max(0) * pool.len() as i64;
            self.metrics.memory.get_or_create(&self.label).set(total);
        }
    }

    pub fn sha256(&self) -> &str {
        &self.module.sha256
    }
}

/// A listener's filters with the built-in modules its routes need: fault where Envoy's fault
/// filter sits, mirror and retry last (next to the router, retry innermost so it sees the
/// upstream's answer first). Each gets the per-route configs of the route table, by route name.
fn with_builtins(
    filters: &[WasmFilterConfig],
    fault_at: Option<usize>,
    auth: Option<&(usize, Vec<serde_json::Value>)>,
    table: Option<&crate::config::route::RouteTable>,
) -> Vec<WasmFilterConfig> {
    let mut out = filters.to_vec();
    // Positions are among the listener's own wasm filters; auth (the RBAC filters) comes
    // before fault when both sit at one position, as the control plane orders them.
    let mut fault_at = fault_at;
    if let Some((at, stages)) = auth {
        out.insert((*at).min(out.len()), auth_filter(stages));
        fault_at = fault_at.map(|f| if f >= *at { f + 1 } else { f });
    }
    let Some(table) = table else { return out };
    let (mut fault, mut retry, mut mirror) = (serde_json::Map::new(), serde_json::Map::new(), serde_json::Map::new());
    for r in table.virtual_hosts.iter().flat_map(|vh| &vh.routes) {
        if let Some(f) = &r.builtins.fault {
            fault.insert(r.name.clone(), f.clone());
        }
        if let Some(p) = &r.builtins.retry {
            retry.insert(r.name.clone(), p.clone());
        }
        if !r.builtins.mirror.is_empty() {
            mirror.insert(r.name.clone(), serde_json::Value::from(r.builtins.mirror.clone()));
        }
    }
    let builtin = |name: &str, code: &'static [u8], routes: serde_json::Map<String, serde_json::Value>| {
        let id = format!("trellis.builtin.{name}");
        WasmFilterConfig {
            name: id.clone(),
            root_id: String::new(),
            vm_id: id,
            code: WasmCode::Builtin(code),
            sha256: None,
            configuration: serde_json::json!({ "routes": routes }).to_string().into_bytes(),
            // A failing built-in is skipped (no fault, mirror or retry) rather than failing
            // requests.
            policy: FailPolicy::Open,
        }
    };
    if !fault.is_empty() {
        let at = fault_at.unwrap_or(out.len()).min(out.len());
        out.insert(at, builtin("fault", crate::builtins::FAULT, fault));
    }
    if !mirror.is_empty() {
        out.push(builtin("mirror", crate::builtins::MIRROR, mirror));
    }
    if !retry.is_empty() {
        out.push(builtin("retry", crate::builtins::RETRY, retry));
    }
    out
}

/// The auth module with the stages of a listener's RBAC filters. It fails closed: a failing
/// authorization filter never lets requests through.
fn auth_filter(stages: &[serde_json::Value]) -> WasmFilterConfig {
    WasmFilterConfig {
        name: "trellis.builtin.auth".into(),
        root_id: String::new(),
        vm_id: "trellis.builtin.auth".into(),
        code: WasmCode::Builtin(crate::builtins::AUTH),
        sha256: None,
        configuration: serde_json::json!({ "stages": stages }).to_string().into_bytes(),
        policy: FailPolicy::Closed,
    }
}

/// Filter chains by listener name.
pub type Chains = HashMap<String, Vec<Arc<WasmFilter>>>;

/// Module bytes fetched for this update, by sha256.
pub type Fetched = HashMap<String, Arc<Vec<u8>>>;

/// Remote modules a snapshot's listeners need: (uri, sha256).
pub fn remote_modules(snap: &Snapshot) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = snap
        .listeners
        .values()
        .filter_map(|l| match &l.kind {
            ListenerKind::Http { filters, .. } => Some(filters),
            _ => None,
        })
        .flatten()
        .filter_map(|f| match &f.code {
            WasmCode::Remote { uri, sha256 } => Some((uri.clone(), sha256.clone())),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Fetches a module over HTTP (at most 32 MiB, 30 s) and checks its sha256.
pub async fn fetch(uri: &str, sha256: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    const LIMIT: usize = 32 << 20;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = uri.parse().map_err(|e| format!("module URI {uri:?}: {e}"))?;
    let get = async {
        let resp = client.get(uri.clone()).await.map_err(|e| format!("cannot fetch {uri}: {e}"))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), LIMIT);
        let bytes = body.collect().await.map_err(|e| format!("fetching {uri}: {e}"))?.to_bytes();
        if !status.is_success() {
            return Err(format!(
                "fetching {uri}: {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).trim()
            ));
        }
        Ok(bytes.to_vec())
    };
    let bytes = tokio::time::timeout(Duration::from_secs(30), get)
        .await
        .map_err(|_| format!("fetching {uri}: timed out after 30 s"))??;
    let actual = trellis_wasm_host::sha256_hex(&bytes);
    if actual != sha256 {
        return Err(format!("module from {uri}: sha256 is {actual}, the configuration says {sha256}"));
    }
    Ok(bytes)
}

/// The chains of `snap`, reusing unchanged filters of `old`.
pub fn rebuild(
    host: impl Fn() -> Result<Host, String>,
    old: &Chains,
    snap: &Snapshot,
    fetched: &Fetched,
    metrics: &WasmMetrics,
) -> Result<Chains, String> {
    let mut out = Chains::new();
    for (name, l) in &snap.listeners {
        let ListenerKind::Http { filters, fault_at, route, auth, .. } = &l.kind else { continue };
        let filters = with_builtins(filters, *fault_at, auth.as_ref(), snap.routes.get(route).map(|t| &**t));
        if filters.is_empty() {
            continue;
        }
        let mut chain = Vec::new();
        for f in &filters {
            let reused = old.values().flatten().find(|w| w.config == *f).cloned();
            let w = match reused {
                Some(w) => w,
                None => Arc::new(
                    WasmFilter::build(&host()?, f, fetched, metrics).map_err(|e| format!("listener {name}: {e}"))?,
                ),
            };
            chain.push(w);
        }
        out.insert(name.clone(), chain);
    }
    Ok(out)
}
