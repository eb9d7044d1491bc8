//! The admin port (loopback only): `/ready`, `/config_dump` (what the proxy runs, as JSON),
//! `/clusters` (hosts with health and ejection state, Envoy's text format), `/stats`,
//! `/xds` (control-plane connection), `/certs` (the workload certificate: SPIFFE ID, serial,
//! validity, renewals), and `POST /logging?level=LEVEL` to change the log
//! level at run time.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

use crate::Proxy;
use crate::config::ListenerKind;
use crate::config::route::Action;

/// Changes the log filter (e.g. `debug`, `info,trellis_proxy=trace`).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Serves the admin API on `addr` until the process ends. Refuses non-loopback addresses.
pub async fn serve(proxy: Arc<Proxy>, addr: SocketAddr, set_level: SetLogLevel) -> Result<(), String> {
    if !addr.ip().is_loopback() {
        return Err(format!("admin: {addr} is not a loopback address; the admin port must stay local"));
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("admin: cannot bind {addr}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (proxy, set_level) = (proxy.clone(), set_level.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (proxy, set_level) = (proxy.clone(), set_level.clone());
                    async move { Ok::<_, Infallible>(handle(&proxy, &set_level, req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn handle(proxy: &Proxy, set_level: &SetLogLevel, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("").to_string();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => {
            if proxy.ready() {
                text(StatusCode::OK, "LIVE\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n".into())
            }
        }
        (&Method::GET, "/config_dump") => {
            let mut r = text(StatusCode::OK, serde_json::to_string_pretty(&config_dump(proxy)).unwrap_or_default());
            r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            r
        }
        (&Method::GET, "/clusters") => text(StatusCode::OK, clusters(proxy)),
        (&Method::GET, "/certs") => {
            let rt = proxy.runtime.load();
            let bundle = rt.snapshot.trust_bundles.get(crate::xds::ROOT_CA).map(|b| b.as_ref());
            let certs =
                proxy.mesh.identity.get().map(|i| i.certs_json(bundle)).unwrap_or_else(|| json!({"certificates": []}));
            let mut r = text(StatusCode::OK, serde_json::to_string_pretty(&certs).unwrap_or_default());
            r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            r
        }
        (&Method::GET, "/stats") => text(StatusCode::OK, stats(proxy)),
        (&Method::GET, "/xds") => {
            text(StatusCode::OK, serde_json::to_string_pretty(&proxy.xds_status()).unwrap_or_default())
        }
        (&Method::POST, "/logging") => {
            let level = query.split('&').find_map(|kv| kv.strip_prefix("level=")).unwrap_or("");
            match set_level(level) {
                Ok(()) => text(StatusCode::OK, format!("log level: {level}\n")),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin: GET /ready /config_dump /clusters /stats /xds; POST /logging?level=LEVEL\n".into(),
        ),
    }
}

fn mesh_tls_json(m: &crate::config::tls::MeshTls) -> Value {
    json!({
        "roots": m.roots,
        "peerSans": m.sans.iter().map(|s| match s {
            crate::config::tls::SanMatch::Exact(e) => e.clone(),
            crate::config::tls::SanMatch::Prefix(p) => format!("{p}*"),
        }).collect::<Vec<_>>(),
        "alpn": m.alpn,
    })
}

fn config_dump(proxy: &Proxy) -> Value {
    let rt = proxy.runtime.load_full();
    let s = &rt.snapshot;
    let listeners: Vec<Value> = s
        .listeners
        .values()
        .map(|l| {
            let mut v = match &l.kind {
                ListenerKind::Http { route, .. } => {
                    json!({"name": l.name, "address": l.address.to_string(), "http": {"route": route}})
                }
                ListenerKind::Tcp { chains, sni } => json!({"name": l.name, "address": l.address.to_string(), "tcp": {
                    "sni": sni,
                    "chains": chains.iter().map(|c| json!({"serverNames": c.server_names, "clusters": c.clusters, "tlsTerminated": c.terminated})).collect::<Vec<_>>(),
                }}),
            };
            v["transport"] = json!({
                "mtls": l.transport.tls.as_ref().map(|t| mesh_tls_json(&t.mesh)),
                "plaintext": l.transport.plaintext,
            });
            v
        })
        .collect();
    let routes: Vec<Value> = s
        .routes
        .values()
        .map(|t| {
            json!({"name": t.name, "virtualHosts": t.virtual_hosts.iter().map(|v| json!({
                "name": v.name,
                "domains": v.domains.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>(),
                "routes": v.routes.iter().map(|r| json!({
                    "name": r.name,
                    "match": format!("{:?}", r.matcher.path),
                    "builtinFilters": json!({"fault": r.builtins.fault, "retry": r.builtins.retry, "mirror": r.builtins.mirror}),
                    "action": match &r.action {
                        Action::Forward(f) => json!({
                            "clusters": f.clusters.iter().map(|c| json!([c.name, c.weight])).collect::<Vec<_>>(),
                            "timeout": f.timeout.map(|t| format!("{t:?}")),
                            "perTryTimeout": f.per_try_timeout.map(|t| format!("{t:?}")),
                        }),
                        Action::Redirect(rd) => json!({"redirect": rd.code}),
                        Action::Direct { status, .. } => json!({"directResponse": status}),
                    },
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()})
        })
        .collect();
    let clusters: Vec<Value> = s
        .clusters
        .values()
        .map(|c| {
            json!({
                "name": c.name,
                "discovery": format!("{:?}", c.discovery).chars().take(200).collect::<String>(),
                "lb": format!("{:?}", c.lb),
                "connectTimeout": format!("{:?}", c.connect_timeout),
                "limits": format!("{:?}", c.limits),
                "outlierDetection": c.outlier.map(|o| format!("{o:?}")),
                "http2": c.http2,
                "tls": c.tls.as_ref().map(|t| {
                    let mut v = mesh_tls_json(&t.mesh);
                    v["sni"] = json!(t.sni);
                    v
                }),
            })
        })
        .collect();
    json!({
        "version": s.version,
        "ready": proxy.ready(),
        "listeners": listeners,
        "routes": routes,
        "clusters": clusters,
        "endpoints": s.endpoints.iter().map(|(n, g)| (n.clone(), json!(g.iter().map(|g| json!({
            "locality": [g.locality.0, g.locality.1, g.locality.2],
            "priority": g.priority,
            "weight": g.weight,
            "endpoints": g.endpoints.iter().map(|e| e.address()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
        "xds": proxy.xds_status(),
    })
}

fn clusters(proxy: &Proxy) -> String {
    let rt = proxy.runtime.load_full();
    let now = Instant::now();
    let mut out = String::new();
    for (name, c) in &rt.clusters {
        let st = &c.stats;
        let _ = writeln!(out, "{name}::active_requests::{}", c.active_requests.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}::pending_requests::{}", c.pending_requests.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}::connections::{}", c.connections.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}::upstream_rq_total::{}", st.upstream_rq_total.load(Ordering::Relaxed));
        let hosts = c.hosts.load();
        for (level, p) in hosts.priorities.iter().enumerate() {
            for h in p.hosts() {
                let a = &h.address;
                let health = if h.ejected(now) { "/failed_outlier_check" } else { "healthy" };
                let _ = writeln!(out, "{name}::{a}::health_flags::{health}");
                let _ = writeln!(out, "{name}::{a}::priority::{level}");
                let _ = writeln!(out, "{name}::{a}::region::{}", h.locality.0);
                let _ = writeln!(out, "{name}::{a}::zone::{}", h.locality.1);
                let _ = writeln!(out, "{name}::{a}::weight::{}", h.weight);
                let _ = writeln!(out, "{name}::{a}::rq_active::{}", h.active_requests.load(Ordering::Relaxed));
                let _ = writeln!(out, "{name}::{a}::rq_total::{}", h.rq_total.load(Ordering::Relaxed));
                let _ = writeln!(out, "{name}::{a}::rq_error::{}", h.rq_error.load(Ordering::Relaxed));
                let ejections = h.outlier.lock().unwrap_or_else(|p| p.into_inner()).ejections;
                let _ = writeln!(out, "{name}::{a}::ejections::{ejections}");
            }
        }
    }
    out
}

fn stats(proxy: &Proxy) -> String {
    let rt = proxy.runtime.load_full();
    let mut out = String::new();
    let s = &proxy.stats;
    let _ = writeln!(out, "http.downstream_rq_total: {}", s.requests.load(Ordering::Relaxed));
    let _ = writeln!(out, "http.downstream_rq_5xx: {}", s.responses_5xx.load(Ordering::Relaxed));
    let _ = writeln!(out, "tcp.downstream_cx_total: {}", s.tcp_opened.load(Ordering::Relaxed));
    let _ = writeln!(out, "server.downstream_connections_active: {}", proxy.connections.count());
    // Inbound mTLS refusals (Envoy counts them per listener as no_filter_chain_match and
    // ssl.handshake errors; here for the whole proxy).
    let _ = writeln!(out, "listener.mtls.plaintext_refused: {}", s.plaintext_refused.load(Ordering::Relaxed));
    let _ = writeln!(out, "listener.mtls.handshake_failed: {}", s.tls_handshake_failed.load(Ordering::Relaxed));
    for (name, c) in &rt.clusters {
        let st = &c.stats;
        for (k, v) in [
            ("upstream_rq_total", &st.upstream_rq_total),
            ("upstream_rq_5xx", &st.upstream_rq_5xx),
            ("upstream_rq_pending_overflow", &st.upstream_rq_pending_overflow),
            ("upstream_cx_overflow", &st.upstream_cx_overflow),
            ("upstream_cx_total", &st.upstream_cx_total),
            ("upstream_cx_connect_fail", &st.upstream_cx_connect_fail),
            ("outlier_detection.ejections_total", &st.outlier_detection_ejections_total),
        ] {
            let _ = writeln!(out, "cluster.{name}.{k}: {}", v.load(Ordering::Relaxed));
        }
    }
    // Metrics filters define, with Envoy's prefix.
    if let Some(host) = proxy.wasm_host.get() {
        let values = host.metrics().values.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (name, _, value) in values {
            let _ = writeln!(out, "wasmcustom.{name}: {value}");
        }
    }
    out
}
