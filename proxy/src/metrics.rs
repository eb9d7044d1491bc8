//! Prometheus metrics with Istio's names, labels and buckets, so existing Grafana and Kiali
//! dashboards work unchanged: `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, `istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total`,
//! `istio_tcp_received_bytes_total`. Served on the metrics port at `/stats/prometheus` (as
//! Istio's sidecars do) and `/metrics`.
//!
//! Peer identity needs mTLS (the zero-trust issue); until then the peer's side of the labels
//! is `unknown`, as Istio reports for plaintext peers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Istio's request-duration buckets (milliseconds).
pub const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];
/// Istio's request/response size buckets (bytes).
pub const SIZE_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0];

/// Istio's standard labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Labels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

/// Who this proxy's workload is (for the labels of its own side).
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
    pub principal: String,
}

type Hist = Family<Labels, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone)]
struct CacheKey {
    peer: String,
    cluster: String,
    authority: String,
    grpc: bool,
    status: u16,
    grpc_status: String,
    flags: String,
}

type HandleCache = std::collections::HashMap<u64, Vec<(CacheKey, Arc<Handles>)>>;

#[derive(Debug)]
struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub duration: Hist,
    pub request_bytes: Hist,
    pub response_bytes: Hist,
    pub tcp_opened: Family<Labels, Counter>,
    pub tcp_closed: Family<Labels, Counter>,
    pub tcp_sent: Family<Labels, Counter>,
    pub tcp_received: Family<Labels, Counter>,
    pub workload: Workload,
    /// By a hash of the key's parts, so a lookup allocates nothing.
    cache: std::sync::RwLock<HandleCache>,
    pub wasm: WasmMetrics,
}

/// A wasm plugin, by the name its filter has (`namespace.name` of the WasmPlugin).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: String,
}

/// Per-plugin metrics of the wasm filters.
#[derive(Debug, Default, Clone)]
pub struct WasmMetrics {
    /// Callbacks into the plugin.
    pub calls: Family<PluginLabel, Counter>,
    /// Callbacks that failed (trap, panic, deadline, bad result).
    pub errors: Family<PluginLabel, Counter>,
    /// VMs started (the first, the pool growing, fresh ones after failures).
    pub vm_starts: Family<PluginLabel, Counter>,
    /// Time spent in the plugin's callbacks.
    pub time: Family<PluginLabel, Counter<f64>>,
    /// Linear memory of the plugin's pooled VMs.
    pub memory: Family<PluginLabel, prometheus_client::metrics::gauge::Gauge>,
}

fn durations() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn sizes() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// One exchange to label.
#[derive(Debug, Clone)]
pub struct Exchange<'a> {
    /// `inbound|...` clusters are the destination side; everything else the source side.
    pub cluster: Option<&'a str>,
    /// The authority the request named (the destination service when the cluster does not).
    pub authority: &'a str,
    pub grpc: bool,
    pub status: u16,
    pub grpc_status: Option<&'a str>,
    pub flags: &'a str,
    /// The mTLS peer's SPIFFE ID (a downstream connection with mTLS), else `None`.
    pub peer_principal: Option<&'a str>,
}

impl Metrics {
    pub fn new(workload: Workload) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let duration: Hist = Family::new_with_constructor(durations);
        let request_bytes: Hist = Family::new_with_constructor(sizes);
        let response_bytes: Hist = Family::new_with_constructor(sizes);
        let tcp_opened = Family::<Labels, Counter>::default();
        let tcp_closed = Family::<Labels, Counter>::default();
        let tcp_sent = Family::<Labels, Counter>::default();
        let tcp_received = Family::<Labels, Counter>::default();
        registry.register("istio_requests", "Requests handled by the proxy", requests.clone());
        registry.register("istio_request_duration_milliseconds", "Request duration (ms)", duration.clone());
        registry.register("istio_request_bytes", "Request size (bytes)", request_bytes.clone());
        registry.register("istio_response_bytes", "Response size (bytes)", response_bytes.clone());
        registry.register("istio_tcp_connections_opened", "TCP connections opened", tcp_opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", tcp_closed.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the peer on TCP connections", tcp_sent.clone());
        registry.register("istio_tcp_received_bytes", "Bytes received on TCP connections", tcp_received.clone());
        let wasm = WasmMetrics::default();
        registry.register("trellis_wasm_calls", "Callbacks into a wasm plugin", wasm.calls.clone());
        registry.register("trellis_wasm_errors", "Failed callbacks of a wasm plugin", wasm.errors.clone());
        registry.register("trellis_wasm_vm_starts", "VMs started for a wasm plugin", wasm.vm_starts.clone());
        registry.register("trellis_wasm_time_seconds", "Time spent in a wasm plugin's callbacks", wasm.time.clone());
        registry.register(
            "trellis_wasm_memory_bytes",
            "Linear memory of a wasm plugin's pooled VMs",
            wasm.memory.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            workload,
            cache: Default::default(),
            wasm,
        }
    }

    /// Istio's labels for one exchange.
    pub fn labels(&self, e: &Exchange<'_>) -> Labels {
        let unknown = || "unknown".to_string();
        let me = &self.workload;
        let inbound = e.cluster.is_some_and(|c| c.starts_with("inbound|"));
        // outbound|PORT|SUBSET|HOST → HOST; else the authority without its port.
        let service = e
            .cluster
            .filter(|c| c.starts_with("outbound|"))
            .and_then(|c| c.splitn(4, '|').nth(3))
            .map(String::from)
            .unwrap_or_else(|| {
                let a = e.authority;
                match a.rsplit_once(':') {
                    Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
                    _ => a.to_string(),
                }
            });
        let mut parts = service.split('.');
        let service_name = parts.next().filter(|s| !s.is_empty()).map(String::from).unwrap_or_else(unknown);
        let service_namespace = if service.ends_with(".svc.cluster.local") {
            parts.next().map(String::from).unwrap_or_else(unknown)
        } else {
            unknown()
        };
        let (src, dst) = if inbound { (None, Some(me)) } else { (Some(me), None) };
        let side = |w: Option<&Workload>, f: fn(&Workload) -> &String| {
            w.map(|w| f(w).clone()).filter(|v| !v.is_empty()).unwrap_or_else(unknown)
        };
        // On the destination side the mTLS peer says who the source is (its namespace from its
        // SPIFFE ID; its workload name would need Istio's metadata exchange).
        let peer = e.peer_principal.filter(|_| inbound);
        let peer_namespace = peer
            .and_then(|p| p.strip_prefix("spiffe://"))
            .and_then(|p| p.split('/').skip_while(|s| *s != "ns").nth(1))
            .map(String::from);
        Labels {
            reporter: if inbound { "destination" } else { "source" }.into(),
            source_workload: side(src, |w| &w.name),
            source_workload_namespace: peer_namespace.unwrap_or_else(|| side(src, |w| &w.namespace)),
            source_principal: peer.map(String::from).unwrap_or_else(|| side(src, |w| &w.principal)),
            source_app: side(src, |w| &w.app),
            source_version: side(src, |w| &w.version),
            source_cluster: side(src, |w| &w.cluster),
            destination_workload: side(dst, |w| &w.name),
            destination_workload_namespace: side(dst, |w| &w.namespace),
            destination_principal: side(dst, |w| &w.principal),
            destination_app: side(dst, |w| &w.app),
            destination_version: side(dst, |w| &w.version),
            destination_service: if service.is_empty() { unknown() } else { service.clone() },
            destination_service_name: service_name,
            destination_service_namespace: service_namespace,
            destination_cluster: side(dst, |w| &w.cluster),
            request_protocol: if e.grpc { "grpc" } else { "http" }.into(),
            response_code: e.status.to_string(),
            grpc_response_status: e.grpc_status.unwrap_or("").to_string(),
            response_flags: e.flags.to_string(),
            connection_security_policy: match (inbound, peer.is_some()) {
                (true, true) => "mutual_tls",
                (true, false) => "none",
                (false, _) => "unknown",
            }
            .into(),
        }
    }

    pub fn record_request(&self, e: &Exchange<'_>, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        let h = self.handles(e);
        h.requests.inc();
        h.duration.observe(duration_ms);
        h.request_bytes.observe(request_bytes as f64);
        h.response_bytes.observe(response_bytes as f64);
    }

    /// The four series of an exchange, looked up by a short key (building Istio's 21 labels
    /// and hashing them four times per request would cost more than the request).
    fn handles(&self, e: &Exchange<'_>) -> Arc<Handles> {
        let cluster = e.cluster.unwrap_or("");
        // The authority only matters when the cluster does not name the service.
        let authority = if cluster.starts_with("outbound|") { "" } else { e.authority };
        let grpc_status = e.grpc_status.unwrap_or("");
        let peer = e.peer_principal.unwrap_or("");
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (cluster, authority, e.grpc, e.status, grpc_status, e.flags, peer).hash(&mut h);
            h.finish()
        };
        let same = |k: &CacheKey| {
            k.peer == peer
                && k.cluster == cluster
                && k.authority == authority
                && k.grpc == e.grpc
                && k.status == e.status
                && k.grpc_status == grpc_status
                && k.flags == e.flags
        };
        if let Some(bucket) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(&hash)
            && let Some((_, h)) = bucket.iter().find(|(k, _)| same(k))
        {
            return h.clone();
        }
        let key = CacheKey {
            peer: peer.to_string(),
            cluster: cluster.to_string(),
            authority: authority.to_string(),
            grpc: e.grpc,
            status: e.status,
            grpc_status: grpc_status.to_string(),
            flags: e.flags.to_string(),
        };
        let l = self.labels(e);
        let h = Arc::new(Handles {
            requests: self.requests.get_or_create_owned(&l),
            duration: self.duration.get_or_create_owned(&l),
            request_bytes: self.request_bytes.get_or_create_owned(&l),
            response_bytes: self.response_bytes.get_or_create_owned(&l),
        });
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear(); // bounded: label sets are bounded by config, but authorities are not
        }
        cache.entry(hash).or_default().push((key, h.clone()));
        h
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Metrics filters define (`proxy_define_metric`), appended to an OpenMetrics text before its
/// `# EOF`: counters as `wasmcustom_NAME_total`, gauges as `wasmcustom_NAME` (Envoy's
/// `wasmcustom.` prefix; characters Prometheus does not allow become `_`).
fn filter_metrics(text: &mut String, metrics: &trellis_wasm_host::state::Metrics) {
    use std::fmt::Write;
    use trellis_wasm_host::abi::MetricType;
    let eof = text.strip_suffix("# EOF\n").map(str::len);
    if let Some(n) = eof {
        text.truncate(n);
    }
    let values = metrics.values.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (name, kind, value) in values {
        let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        match kind {
            MetricType::Counter => {
                let _ = write!(text, "# TYPE wasmcustom_{clean} counter\nwasmcustom_{clean}_total {value}\n");
            }
            MetricType::Gauge => {
                let _ = write!(text, "# TYPE wasmcustom_{clean} gauge\nwasmcustom_{clean} {value}\n");
            }
            MetricType::Histogram => {}
        }
    }
    text.push_str("# EOF\n");
}

/// Serves `/stats/prometheus` and `/metrics` on `addr`.
pub async fn serve(proxy: Arc<crate::Proxy>, addr: SocketAddr) -> Result<(), String> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("metrics: cannot bind {addr}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    async move {
                        let r = match req.uri().path() {
                            "/stats/prometheus" | "/metrics" => {
                                let mut text = proxy.metrics.encode();
                                if let Some(host) = proxy.wasm_host.get() {
                                    filter_metrics(&mut text, &host.metrics());
                                }
                                let mut r = Response::new(Full::new(Bytes::from(text)));
                                r.headers_mut().insert(
                                    http::header::CONTENT_TYPE,
                                    http::HeaderValue::from_static(
                                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    ),
                                );
                                r
                            }
                            _ => {
                                let mut r = Response::new(Full::new(Bytes::from_static(b"GET /stats/prometheus\n")));
                                *r.status_mut() = StatusCode::NOT_FOUND;
                                r
                            }
                        };
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_requests_are_reported_by_the_source_with_istio_names() {
        let m = Metrics::new(Workload {
            name: "productpage-v1".into(),
            namespace: "bookinfo".into(),
            app: "productpage".into(),
            version: "v1".into(),
            cluster: "Kubernetes".into(),
            principal: String::new(),
        });
        let e = Exchange {
            cluster: Some("outbound|9080|v2|reviews.bookinfo.svc.cluster.local"),
            authority: "reviews:9080",
            grpc: false,
            status: 200,
            grpc_status: None,
            flags: "-",
            peer_principal: None,
        };
        m.record_request(&e, 3.2, 10, 2000);
        let text = m.encode();
        let line = text.lines().find(|l| l.starts_with("istio_requests_total{")).expect(&text);
        for want in [
            "reporter=\"source\"",
            "source_workload=\"productpage-v1\"",
            "source_app=\"productpage\"",
            "destination_service=\"reviews.bookinfo.svc.cluster.local\"",
            "destination_service_name=\"reviews\"",
            "destination_service_namespace=\"bookinfo\"",
            "destination_workload=\"unknown\"",
            "response_code=\"200\"",
            "response_flags=\"-\"",
        ] {
            assert!(line.contains(want), "{want} missing from {line}");
        }
        assert!(line.ends_with(" 1"), "{line}");
        assert!(text.contains("istio_request_duration_milliseconds_bucket{") && text.contains("le=\"5.0\""), "{text}");
        assert!(text.contains("istio_response_bytes_bucket{"), "{text}");
    }

    #[test]
    fn inbound_requests_are_reported_by_the_destination() {
        let m =
            Metrics::new(Workload { name: "reviews-v1".into(), namespace: "bookinfo".into(), ..Default::default() });
        let l = m.labels(&Exchange {
            cluster: Some("inbound|9080||"),
            authority: "reviews.bookinfo.svc.cluster.local:9080",
            grpc: true,
            status: 200,
            grpc_status: Some("0"),
            flags: "-",
            peer_principal: None,
        });
        assert_eq!((l.reporter.as_str(), l.destination_workload.as_str()), ("destination", "reviews-v1"));
        assert_eq!((l.source_workload.as_str(), l.request_protocol.as_str()), ("unknown", "grpc"));
        assert_eq!(l.destination_service, "reviews.bookinfo.svc.cluster.local");
        assert_eq!(l.connection_security_policy, "none");
        // Over mTLS the peer's identity names the source.
        let l = m.labels(&Exchange {
            cluster: Some("inbound|9080||"),
            authority: "reviews.bookinfo.svc.cluster.local:9080",
            grpc: false,
            status: 200,
            grpc_status: None,
            flags: "-",
            peer_principal: Some("spiffe://cluster.local/ns/frontend/sa/productpage"),
        });
        assert_eq!(l.connection_security_policy, "mutual_tls");
        assert_eq!(l.source_principal, "spiffe://cluster.local/ns/frontend/sa/productpage");
        assert_eq!(l.source_workload_namespace, "frontend");
    }
}
