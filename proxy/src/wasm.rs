//! Wasm HTTP filters at run time: for each listener, its chain of proxy-wasm filters, each a
//! compiled module (trellis-wasm-host) with a few VMs — one per worker thread at most — each
//! hosting the contexts of many streams, as Envoy's per-worker VMs do (a VM is never created
//! per request, and memory does not grow with concurrency). Filters are built — module read, sha256 verified, compiled once, a first
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

/// Callbacks per time measurement (`WasmFilter::call`).
const TIME_SAMPLE: u64 = 8;

/// Whether call number `n` is timed: one in [`TIME_SAMPLE`], spread by a multiplicative hash
/// rather than every eighth call — a filter makes the same few calls per request in a fixed
/// order (two or three), and a fixed stride would time the same kind of call every time.
fn sampled(n: u64) -> bool {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - TIME_SAMPLE.trailing_zeros()) == 0
}

/// One VM of a filter, shared by the streams that run on it (each its own context), as
/// Envoy shares a VM per worker thread. Callbacks lock it; they are short.
#[derive(Debug)]
pub struct VmSlot {
    vm: Mutex<Vm>,
    /// When the root context last had a tick.
    last_tick: Mutex<Option<Instant>>,
    /// The calls its contexts have out.
    pub calls: crate::callout::Calls,
}

impl VmSlot {
    fn new(vm: Vm) -> Arc<VmSlot> {
        Arc::new(VmSlot { vm: Mutex::new(vm), last_tick: Mutex::new(None), calls: Default::default() })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the root context's tick if its period has passed since the last one (several
    /// streams may wait on one VM; the root context still ticks at its own period).
    pub fn tick_if_due(&self, filter: &WasmFilter) -> Result<(), VmError> {
        let mut vm = self.lock();
        let Some(period) = vm.tick_period() else { return Ok(()) };
        let mut last = self.last_tick.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now < t + period) {
            return Ok(());
        }
        *last = Some(now);
        filter.call(|| vm.on_tick())
    }
}

/// A filter ready to run: its compiled module and its VMs — one per worker thread at most
/// (more only when streams on different threads contend), each hosting many streams' contexts.
/// A VM is never created per request.
pub struct WasmFilter {
    pub config: WasmFilterConfig,
    host: Host,
    module: Arc<CompiledModule>,
    plugin: PluginConfig,
    slots: Mutex<Vec<Arc<VmSlot>>>,
    next: std::sync::atomic::AtomicUsize,
    max_slots: usize,
    /// Failures: (when the filter may try a fresh VM again, the next backoff). Fail-closed
    /// filters never do once failed.
    failed: Mutex<Option<(Instant, Duration)>>,
    /// Whether `failed` is set or a VM is poisoned (the healthy path takes no lock).
    troubled: std::sync::atomic::AtomicBool,
    metrics: WasmMetrics,
    label: PluginLabel,
    /// This plugin's counters (looked up once, not per callback).
    calls: prometheus_client::metrics::counter::Counter,
    errors: prometheus_client::metrics::counter::Counter,
    time: prometheus_client::metrics::counter::Counter<f64>,
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
            WasmCode::Remote { uri, sha256 } => match host.compiled(sha256) {
                Some(compiled) => Ok(compiled),
                None => {
                    let bytes = fetched
                        .get(sha256)
                        .cloned()
                        .or_else(|| host.cached_bytes(sha256).map(Arc::new))
                        .ok_or_else(|| format!("{what}: module {uri} was not fetched"))?;
                    host.load(&bytes, Some(sha256))
                }
            },
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
        // One VM per runtime worker at most.
        let max_slots =
            tokio::runtime::Handle::try_current().map(|h| h.metrics().num_workers()).unwrap_or(1).clamp(1, 64);
        let filter = WasmFilter {
            config: config.clone(),
            host: host.clone(),
            module,
            plugin,
            slots: Mutex::new(vec![VmSlot::new(first)]),
            next: std::sync::atomic::AtomicUsize::new(0),
            max_slots,
            failed: Mutex::new(None),
            troubled: std::sync::atomic::AtomicBool::new(false),
            calls: metrics.calls.get_or_create(&label).clone(),
            errors: metrics.errors.get_or_create(&label).clone(),
            time: metrics.time.get_or_create(&label).clone(),
            metrics: metrics.clone(),
            label,
        };
        filter.record_memory();
        Ok(filter)
    }

    /// The VM a new stream runs on.
    pub fn take(&self) -> Result<Arc<VmSlot>, VmError> {
        let troubled = self.troubled.load(std::sync::atomic::Ordering::Acquire);
        if troubled
            && let Some((retry_at, _)) = *self.failed.lock().unwrap_or_else(|p| p.into_inner())
            && (self.config.policy == FailPolicy::Closed || Instant::now() < retry_at)
        {
            return Err(VmError::Poisoned { plugin: self.config.name.clone() });
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // A failed VM takes no new streams (those on it fail by their filter's policy).
        if troubled {
            slots.retain(|s| s.vm.try_lock().map(|vm| !vm.poisoned()).unwrap_or(true));
        }
        if !slots.is_empty() {
            let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % slots.len();
            let busy = slots[i].vm.try_lock().is_err();
            if !(busy && slots.len() < self.max_slots) {
                return Ok(slots[i].clone());
            }
        }
        self.metrics.vm_starts.get_or_create(&self.label).inc();
        let slot = VmSlot::new(Vm::start(&self.host, self.module.clone(), self.plugin.clone(), Limits::default())?);
        slots.push(slot.clone());
        drop(slots);
        self.record_memory();
        Ok(slot)
    }

    /// Runs one callback, counting it, its time and its failure. The time is measured on one
    /// callback in [`TIME_SAMPLE`] and counted for all of them (two clock reads per callback
    /// were a tenth of a four-filter chain's cost).
    pub fn call<T>(&self, f: impl FnOnce() -> Result<T, VmError>) -> Result<T, VmError> {
        let timed = sampled(self.calls.inc());
        let t = timed.then(Instant::now);
        let r = f();
        if let Some(t) = t {
            self.time.inc_by(t.elapsed().as_secs_f64() * TIME_SAMPLE as f64);
        }
        if r.is_err() {
            self.errors.inc();
        }
        r
    }

    /// A stream on `slot` ended: a failed VM is recorded (fail-closed filters stay failed;
    /// fail-reload ones wait 100 ms, doubling to 10 s, before a fresh VM); a healthy one
    /// clears the record.
    pub fn finished(&self, slot: &VmSlot) {
        let poisoned = slot.lock().poisoned();
        self.finished_with(poisoned);
    }

    /// [`WasmFilter::finished`] when the caller knows whether the VM is poisoned.
    pub fn finished_with(&self, poisoned: bool) {
        use std::sync::atomic::Ordering;
        if !poisoned && !self.troubled.load(Ordering::Acquire) {
            return;
        }
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if poisoned {
            let backoff =
                failed.map(|(_, b)| (b * 2).min(Duration::from_secs(10))).unwrap_or(Duration::from_millis(100));
            *failed = Some((Instant::now() + backoff, backoff));
            self.troubled.store(true, Ordering::Release);
        } else {
            // A stream ended well on a healthy VM: the filter recovered (poisoned VMs were
            // dropped by `take`).
            *failed = None;
            let any_poisoned = self
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|s| s.vm.try_lock().map(|vm| vm.poisoned()).unwrap_or(false));
            self.troubled.store(any_poisoned, Ordering::Release);
        }
    }

    fn record_memory(&self) {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let total: usize = slots.iter().filter_map(|s| s.vm.try_lock().ok().map(|mut vm| vm.memory_bytes())).sum();
        self.metrics.memory.get_or_create(&self.label).set(total as i64);
    }

    pub fn sha256(&self) -> &str {
        &self.module.sha256
    }

    fn slots(&self) -> Vec<Arc<VmSlot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Ticks the root contexts of a filter's VMs at their period while no stream waits on them
/// (a waiting stream drives them itself), and performs the calls root contexts make,
/// delivering the answers to them. Ends when the filter is gone (replaced or removed).
pub fn spawn_ticker(filter: &Arc<WasmFilter>, proxy: std::sync::Weak<crate::Proxy>) {
    let weak = Arc::downgrade(filter);
    tokio::spawn(async move {
        loop {
            let period = {
                let Some(f) = weak.upgrade() else { return };
                f.slots().iter().filter_map(|s| s.vm.try_lock().ok().and_then(|vm| vm.tick_period())).min()
            };
            // Without ticks asked for, look again now and then (a configuration may ask).
            tokio::time::sleep(period.unwrap_or(Duration::from_millis(500)).max(Duration::from_millis(1))).await;
            let (Some(f), Some(proxy)) = (weak.upgrade(), proxy.upgrade()) else { return };
            for slot in f.slots() {
                if slot.tick_if_due(&f).is_err() {
                    continue;
                }
                let rt = proxy.runtime.load_full();
                crate::callout::start(&rt, &f, &slot, &mut slot.lock(), trellis_wasm_host::vm::ROOT_CONTEXT);
            }
        }
    });
}

/// The root id (a WasmPlugin's `pluginName`) that makes a plugin replace a built-in module:
/// `trellis.builtin.fault`, `.retry`, `.mirror` or `.auth`. The replacement runs in the
/// built-in's place with the configuration trellis-proxy generates for it.
pub const REPLACES_BUILTIN: &str = "trellis.builtin.";

/// A listener's filters with the built-in modules its routes need: auth where the RBAC
/// filters sit, fault where Envoy's fault filter sits, mirror and retry last (next to the
/// router, retry innermost so it sees the upstream's answer first). Each gets the per-route
/// configs of the route table, by route name. A plugin whose root id is
/// `trellis.builtin.KIND` is not run as itself: its module replaces that built-in.
fn with_builtins(
    filters: &[WasmFilterConfig],
    fault_at: Option<usize>,
    auth: Option<&(usize, Vec<serde_json::Value>)>,
    table: Option<&crate::config::route::RouteTable>,
) -> Vec<WasmFilterConfig> {
    let mut out = filters.to_vec();
    let (mut fault_at, mut auth_at) = (fault_at, auth.map(|(at, _)| *at));
    let mut replacements: HashMap<String, WasmFilterConfig> = HashMap::new();
    let mut i = 0;
    while i < out.len() {
        match out[i].root_id.strip_prefix(REPLACES_BUILTIN) {
            Some(kind) => {
                replacements.insert(kind.to_string(), out.remove(i));
                fault_at = fault_at.map(|f| if f > i { f - 1 } else { f });
                auth_at = auth_at.map(|a| if a > i { a - 1 } else { a });
            }
            None => i += 1,
        }
    }
    let builtin = |kind: &str, code: &'static [u8], configuration: serde_json::Value, policy: FailPolicy| {
        let id = format!("trellis.builtin.{kind}");
        let (code, sha256, root_id) = match replacements.get(kind) {
            Some(r) => (r.code.clone(), r.sha256.clone(), r.root_id.clone()),
            None => (WasmCode::Builtin(code), None, String::new()),
        };
        WasmFilterConfig {
            name: id.clone(),
            root_id,
            vm_id: id,
            code,
            sha256,
            configuration: configuration.to_string().into_bytes(),
            policy,
        }
    };
    // Positions are among the listener's own wasm filters; auth (the RBAC filters) comes
    // before fault when both sit at one position, as the control plane orders them. A failing
    // auth module fails closed (it never lets requests through); the others are skipped.
    if let (Some(at), Some((_, stages))) = (auth_at, auth) {
        let f = builtin("auth", crate::builtins::AUTH, serde_json::json!({ "stages": stages }), FailPolicy::Closed);
        out.insert(at.min(out.len()), f);
        fault_at = fault_at.map(|f| if f >= at { f + 1 } else { f });
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
    let routes = |m: serde_json::Map<String, serde_json::Value>| serde_json::json!({ "routes": m });
    if !fault.is_empty() {
        let at = fault_at.unwrap_or(out.len()).min(out.len());
        out.insert(at, builtin("fault", crate::builtins::FAULT, routes(fault), FailPolicy::Open));
    }
    if !mirror.is_empty() {
        out.push(builtin("mirror", crate::builtins::MIRROR, routes(mirror), FailPolicy::Open));
    }
    if !retry.is_empty() {
        out.push(builtin("retry", crate::builtins::RETRY, routes(retry), FailPolicy::Open));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_samples_cover_every_position_of_a_periodic_call_pattern() {
        // A filter making 2 or 3 calls per request: each position is timed about as often.
        for period in [2u64, 3, 4, 8] {
            let mut hits = vec![0u32; period as usize];
            for n in 0..80_000u64 {
                if sampled(n) {
                    hits[(n % period) as usize] += 1;
                }
            }
            let expected = 80_000 / TIME_SAMPLE as u32 / period as u32;
            for h in &hits {
                assert!(h.abs_diff(expected) * 10 < expected, "period {period}: {hits:?}, expected ~{expected}");
            }
        }
    }

    fn user(name: &str, root_id: &str) -> WasmFilterConfig {
        WasmFilterConfig {
            name: name.into(),
            root_id: root_id.into(),
            vm_id: name.into(),
            code: WasmCode::File(format!("/modules/{name}.wasm")),
            sha256: Some("ab".repeat(32)),
            configuration: Vec::new(),
            policy: FailPolicy::Closed,
        }
    }

    #[test]
    fn a_plugin_named_for_a_built_in_replaces_its_module_in_place() {
        let filters = vec![user("a", ""), user("my-auth", "trellis.builtin.auth"), user("b", "")];
        let stage = vec![serde_json::json!({"action": "DENY", "policies": {}})];
        // The RBAC filter sat after `a` and the replacement (position 2 of 3).
        let chain = with_builtins(&filters, None, Some(&(2, stage)), None);
        let names: Vec<&str> = chain.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a", "trellis.builtin.auth", "b"]);
        let auth = &chain[1];
        assert_eq!(auth.code, WasmCode::File("/modules/my-auth.wasm".into()), "the pushed module's code");
        assert_eq!(auth.sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(auth.policy, FailPolicy::Closed, "auth still fails closed");
        assert!(String::from_utf8_lossy(&auth.configuration).contains("\"stages\""), "the generated configuration");
        // Without a replacement: the embedded module.
        let plain = with_builtins(&[user("a", "")], None, Some(&(1, vec![])), None);
        assert!(matches!(plain[1].code, WasmCode::Builtin(_)));
    }
}
