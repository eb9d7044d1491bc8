//! trellis-proxy: the data plane. It takes Envoy v3 configuration from the control plane over
//! Delta ADS ([`xds`]), converts it into immutable snapshots ([`config`]), and serves with them:
//! listeners ([`listeners`]) running the HTTP router ([`http`]) or a TCP proxy ([`tcp`]) to
//! clusters with load balancing, circuit breakers and outlier detection ([`upstream`]). An
//! admin port ([`admin`]) shows what it runs.
//!
//! The data path reads one [`Runtime`] per request (an `Arc` loaded from an `ArcSwap`), so a
//! request sees one configuration from start to end. Only the xDS client replaces it.
//! Depends on envoy-types, hyper, tonic; nothing from the control plane.

pub mod access_log;
pub mod admin;
pub mod agent;
pub mod body;
pub mod bootstrap;
pub mod builtins;
pub mod callout;
pub mod config;
pub mod control;
pub mod http;
pub mod identity;
pub mod listeners;
pub mod metrics;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod wasm;
pub mod wasm_chain;
pub mod xds;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::config::Snapshot;
use crate::upstream::Clusters;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends or receives.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Temporary module caches are `TMPDIR/trellis-proxy-wasm-PID`.
const TEMP_CACHE: &str = "trellis-proxy-wasm-";

/// Removes temporary module caches of trellis-proxy processes that are gone (killed before
/// they could clean up).
fn remove_stale_caches() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(TEMP_CACHE).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The hidden subcommand of the trellis-proxy binary that compiles a module out of process:
/// `trellis-proxy __compile-wasm IN.wasm OUT.cwasm`.
pub const COMPILE_WASM: &str = "__compile-wasm";

/// Boxes any body.
pub fn boxed<B>(b: B) -> BoxBody
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

/// The configuration one request runs with.
#[derive(Debug, Default)]
pub struct Runtime {
    pub snapshot: Arc<Snapshot>,
    pub clusters: Clusters,
    /// Wasm filter chains by listener.
    pub filters: wasm::Chains,
    /// The TLS server side of inbound listeners with mTLS, by listener.
    pub tls_servers: BTreeMap<String, Arc<tls::ServerSide>>,
}

/// Counts open downstream connections (for draining on shutdown).
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    open: AtomicU64,
}

/// Decrements on drop.
#[derive(Debug)]
pub struct OpenConnection(Arc<ConnectionTracker>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ConnectionTracker {
    pub fn open(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::SeqCst);
        OpenConnection(self.clone())
    }

    pub fn count(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }
}

/// Request counters by listener (the Prometheus metrics build on these).
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub responses_5xx: AtomicU64,
    pub tcp_opened: AtomicU64,
    pub tcp_closed: AtomicU64,
    /// Plaintext connections a listener requiring mTLS closed.
    pub plaintext_refused: AtomicU64,
    /// Downstream TLS handshakes that failed (bad or missing client certificate, ...).
    pub tls_handshake_failed: AtomicU64,
}

/// The proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    pub runtime: ArcSwap<Runtime>,
    pub listeners: tokio::sync::Mutex<listeners::Listeners>,
    apply_lock: tokio::sync::Mutex<()>,
    xds: std::sync::Mutex<xds::XdsStatus>,
    received: std::sync::Mutex<BTreeSet<&'static str>>,
    pub connections: Arc<ConnectionTracker>,
    pub stats: Stats,
    pub node_id: String,
    pub metrics: metrics::Metrics,
    pub access_log: access_log::AccessLog,
    /// The wasm host, made when the first wasm filter arrives.
    pub(crate) wasm_host: std::sync::OnceLock<trellis_wasm_host::Host>,
    /// Where the wasm host keeps fetched and compiled modules (bootstrap `wasmCacheDir`).
    pub wasm_cache_dir: std::sync::OnceLock<std::path::PathBuf>,
    /// Who this proxy is (filters see it as `node.*`).
    workload: metrics::Workload,
    /// Its certificate from the mesh CA (when the bootstrap gives it a token) and the trust
    /// bundles: what mTLS presents and verifies against.
    pub mesh: Arc<tls::MeshState>,
}

impl Proxy {
    pub fn new(node_id: &str, workload: metrics::Workload, access_log: access_log::AccessLog) -> Arc<Proxy> {
        Arc::new(Proxy {
            runtime: ArcSwap::from_pointee(Runtime::default()),
            listeners: tokio::sync::Mutex::new(listeners::Listeners::default()),
            apply_lock: tokio::sync::Mutex::new(()),
            xds: std::sync::Mutex::new(xds::XdsStatus::default()),
            received: std::sync::Mutex::new(BTreeSet::new()),
            connections: Arc::new(ConnectionTracker::default()),
            stats: Stats::default(),
            node_id: node_id.to_string(),
            metrics: metrics::Metrics::new(workload.clone()),
            workload,
            mesh: Arc::default(),
            access_log,
            wasm_host: std::sync::OnceLock::new(),
            wasm_cache_dir: std::sync::OnceLock::new(),
        })
    }

    /// The wasm host (started on first use).
    pub fn wasm_host(&self) -> Result<trellis_wasm_host::Host, String> {
        if let Some(h) = self.wasm_host.get() {
            return Ok(h.clone());
        }
        let h = trellis_wasm_host::Host::new().map_err(|e| format!("cannot start the wasm host: {e}"))?;
        // Compiled artifacts go to the cache directory — a private temporary one when none is
        // configured — and modules compile in a helper process (this binary's
        // `__compile-wasm`), so the compiler's working memory is never this process's.
        let dir = self.wasm_cache_dir.get_or_init(|| {
            remove_stale_caches();
            std::env::temp_dir().join(format!("{TEMP_CACHE}{}", std::process::id()))
        });
        h.set_cache_dir(dir)?;
        // Envoy's `node` attribute, the parts filters read.
        let w = &self.workload;
        for (path, value) in [
            ("node.id", self.node_id.as_str()),
            ("node.cluster", w.cluster.as_str()),
            ("node.metadata.NAMESPACE", w.namespace.as_str()),
            ("node.metadata.WORKLOAD_NAME", w.name.as_str()),
            ("node.metadata.CLUSTER_ID", w.cluster.as_str()),
        ] {
            h.set_property(path, value.as_bytes().to_vec());
        }
        if let Ok(exe) = std::env::current_exe()
            && exe.file_name().is_some_and(|n| n == "trellis-proxy")
        {
            h.set_compiler(vec![exe.into_os_string(), COMPILE_WASM.into()]);
        }
        Ok(self.wasm_host.get_or_init(|| h).clone())
    }

    pub(crate) fn set_xds(&self, f: impl FnOnce(&mut xds::XdsStatus)) {
        f(&mut self.xds.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn xds_status(&self) -> xds::XdsStatus {
        self.xds.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn mark_received(&self, type_url: &'static str) {
        self.received.lock().unwrap_or_else(|p| p.into_inner()).insert(type_url);
    }

    /// Ready once clusters and listeners have arrived, and the endpoints and routes they
    /// name.
    pub fn ready(&self) -> bool {
        let received = self.received.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let rt = self.runtime.load();
        let snap = &rt.snapshot;
        received.contains(config::CLUSTER_TYPE)
            && received.contains(config::LISTENER_TYPE)
            && snap.eds_names().iter().all(|n| snap.endpoints.contains_key(n))
            && snap.rds_names().iter().all(|n| snap.routes.contains_key(n))
    }

    /// One HTTP exchange finished (the response body ended, or the client went away).
    pub fn finish(&self, r: &http::Finished) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if r.outcome.status >= 500 {
            self.stats.responses_5xx.fetch_add(1, Ordering::Relaxed);
        }
        let duration = r.started.elapsed();
        let exchange = metrics::Exchange {
            cluster: r.outcome.cluster.as_deref(),
            authority: &r.info.authority,
            grpc: r.info.grpc,
            status: r.outcome.status,
            grpc_status: r.grpc_status.as_deref(),
            flags: r.outcome.flags,
            peer_principal: r.info.mtls.as_ref().map(|m| m.principal.as_str()),
        };
        let received = r.outcome.request_bytes.load(Ordering::Relaxed);
        self.metrics.record_request(&exchange, duration.as_secs_f64() * 1000.0, received, r.sent);
        if self.access_log.enabled() {
            self.access_log.write(&access_log::Entry {
                start: Some(r.start),
                method: r.info.method.as_str(),
                path: &r.info.path,
                protocol: r.info.protocol,
                status: r.outcome.status,
                flags: r.outcome.flags,
                bytes_received: received,
                bytes_sent: r.sent,
                duration_ms: duration.as_millis() as u64,
                upstream_service_time_ms: r.outcome.upstream_ms,
                x_forwarded_for: r.info.x_forwarded_for.as_deref(),
                user_agent: r.info.user_agent.as_deref(),
                request_id: r.info.request_id.as_deref(),
                authority: &r.info.authority,
                upstream_host: r.outcome.upstream_host.as_deref(),
                upstream_cluster: r.outcome.cluster.as_deref(),
                route_name: r.outcome.route.as_deref(),
                downstream_remote: Some(r.peer),
            });
        }
    }

    /// A TCP connection to `cluster` opened (through listener `listener`).
    pub fn tcp_opened(&self, cluster: &str) {
        self.stats.tcp_opened.fetch_add(1, Ordering::Relaxed);
        let l = self.tcp_labels(cluster, "-");
        self.metrics.tcp_opened.get_or_create(&l).inc();
    }

    /// A TCP connection closed with `flags`, after `sent` bytes to the client and `received`
    /// from it.
    pub fn tcp_closed(&self, cluster: &str, flags: &str, sent: u64, received: u64) {
        self.stats.tcp_closed.fetch_add(1, Ordering::Relaxed);
        let l = self.tcp_labels(cluster, flags);
        self.metrics.tcp_closed.get_or_create(&l).inc();
        self.metrics.tcp_sent.get_or_create(&l).inc_by(sent);
        self.metrics.tcp_received.get_or_create(&l).inc_by(received);
    }

    fn tcp_labels(&self, cluster: &str, flags: &str) -> metrics::Labels {
        let mut l = self.metrics.labels(&metrics::Exchange {
            cluster: Some(cluster),
            authority: "",
            grpc: false,
            status: 0,
            grpc_status: None,
            flags,
            peer_principal: None,
        });
        l.request_protocol = "tcp".into();
        l.response_code = String::new();
        l
    }

    /// Stops accepting, lets in-flight requests finish (at most `grace`), then returns.
    pub async fn shutdown(&self, grace: Duration) {
        self.listeners.lock().await.drain_all();
        let deadline = tokio::time::Instant::now() + grace;
        while self.connections.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
