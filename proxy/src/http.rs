//! The HTTP path: a downstream connection (HTTP/1.1 or h2c, told apart by the connection
//! preface) → virtual host by authority → first matching route → direct response, redirect,
//! or a weighted cluster → a host → the upstream, bodies streamed both ways.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;

use crate::config::route::{Action, Forward, HashPolicy, HeaderOps, PathMatch, Redirect, RequestView};
use crate::upstream::{self, UpstreamError};
use crate::{BoxBody, Proxy, boxed};

/// What the access log and metrics learn about one request.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub status: u16,
    pub flags: &'static str,
    pub cluster: Option<String>,
    pub upstream_host: Option<String>,
    pub route: Option<String>,
    /// Request body bytes received from the client.
    pub request_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// From sending upstream to the response headers.
    pub upstream_ms: Option<u64>,
}

/// The request as it arrived, for the access log and metrics.
#[derive(Debug, Clone)]
pub struct Info {
    pub method: http::Method,
    pub path: String,
    pub protocol: &'static str,
    pub authority: String,
    pub user_agent: Option<String>,
    pub x_forwarded_for: Option<String>,
    pub request_id: Option<String>,
    pub grpc: bool,
    /// The downstream connection's mTLS peer.
    pub mtls: Option<Arc<crate::tls::PeerIdentity>>,
}

/// A finished exchange, handed to [`Proxy::finish`].
#[derive(Debug)]
pub struct Finished {
    pub info: Info,
    pub outcome: Outcome,
    pub peer: SocketAddr,
    pub start: std::time::SystemTime,
    pub started: Instant,
    pub sent: u64,
    pub grpc_status: Option<String>,
}

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
];

/// Maximum size of a request's or response's header block (Envoy's default is 60 KiB).
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Serves one downstream connection until it closes or `drain` fires (then in-flight
/// requests finish and the connection closes gracefully).
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: Arc<str>,
    stream: crate::tls::Io,
    peer: SocketAddr,
    mtls: Option<Arc<crate::tls::PeerIdentity>>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let _ = stream.tcp().set_nodelay(true);
    let local = stream.tcp().local_addr().ok().map(LocalAddr);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (proxy, listener) = (proxy.clone(), listener.clone());
        if let Some(l) = local {
            req.extensions_mut().insert(l);
        }
        if let Some(m) = &mtls {
            req.extensions_mut().insert(m.clone());
        }
        async move { Ok::<_, Infallible>(handle(proxy, &listener, peer, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(100);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_HEADER_BYTES as u32);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "downstream connection ended with an error");
            }
            return;
        }
        _ = drain.wait_for(|d| *d) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// The address the downstream connection reached (a request extension; filters see it as
/// `destination.address` / `destination.port`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalAddr(pub SocketAddr);

/// The authority a request names: from an absolute URI (HTTP/2, proxies) or the Host header.
pub(crate) fn request_authority<B>(req: &Request<B>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or_default()
}

pub(crate) fn local_reply(status: StatusCode, body: &str) -> Response<BoxBody> {
    let mut r = Response::new(boxed(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Handles one request; never fails (errors become local replies with Envoy's flags).
/// Metrics and the access log are recorded when the response body ends.
pub async fn handle(
    proxy: Arc<Proxy>,
    listener: &str,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<BoxBody> {
    let start = std::time::SystemTime::now();
    let started = Instant::now();
    if !req.headers().contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(new_request_id()))
    {
        req.headers_mut().insert("x-request-id", v);
    }
    let h = req.headers();
    // What only the access log reads is copied only when it is on.
    let logging = proxy.access_log.enabled();
    let text = |n: &str| if logging { h.get(n).and_then(|v| v.to_str().ok()).map(String::from) } else { None };
    let info = Info {
        method: req.method().clone(),
        path: if logging {
            req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default()
        } else {
            String::new()
        },
        protocol: match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        authority: request_authority(&req).to_string(),
        user_agent: text("user-agent"),
        x_forwarded_for: text("x-forwarded-for"),
        request_id: text("x-request-id"),
        grpc: h.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
        mtls: req.extensions().get::<Arc<crate::tls::PeerIdentity>>().cloned(),
    };
    let rt = proxy.runtime.load_full();
    let chain = rt.filters.get(listener).cloned().unwrap_or_default();
    let (resp, outcome) = if chain.is_empty() {
        route_request(&rt, listener, peer, req).await
    } else {
        crate::wasm_chain::run(&rt, &chain, listener, peer, req).await
    };
    let (parts, body) = resp.into_parts();
    let header_grpc_status = parts.headers.get("grpc-status").and_then(|v| v.to_str().ok()).map(String::from);
    let body = crate::body::Finish::new(body, move |sent, trailer_grpc_status| {
        proxy.finish(&Finished {
            info,
            outcome,
            peer,
            start,
            started,
            sent,
            grpc_status: trailer_grpc_status.or(header_grpc_status),
        });
    });
    Response::from_parts(parts, boxed(body))
}

/// A request body the router can forward.
pub(crate) trait ProxyBody:
    hyper::body::Body<Data = Bytes, Error: Into<crate::BoxError>> + Send + Sync + Unpin + 'static
{
}

impl<B> ProxyBody for B where
    B: hyper::body::Body<Data = Bytes, Error: Into<crate::BoxError>> + Send + Sync + Unpin + 'static
{
}

pub(crate) async fn route_request<B: ProxyBody>(
    rt: &Arc<crate::Runtime>,
    listener: &str,
    peer: SocketAddr,
    mut req: Request<B>,
) -> (Response<BoxBody>, Outcome) {
    let mut outcome = Outcome::default();
    let route = match matched_route(rt, listener, &req) {
        Ok(r) => r,
        Err(why) => {
            outcome.status = 404;
            outcome.flags = "NR";
            return (local_reply(StatusCode::NOT_FOUND, why), outcome);
        }
    };
    outcome.route = Some(route.name.clone());
    match &route.action {
        Action::Direct { status, body } => {
            let mut r = Response::new(boxed(Full::new(body.clone())));
            *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            apply_response_ops(r.headers_mut(), &route.headers);
            outcome.status = *status;
            outcome.flags = "DR";
            (r, outcome)
        }
        Action::Redirect(rd) => {
            let uri = req.uri();
            let location = redirect_location(
                rd,
                uri.scheme_str().unwrap_or("http"),
                request_authority(&req),
                uri.path(),
                uri.query(),
            );
            let mut r = local_reply(StatusCode::from_u16(rd.code).unwrap_or(StatusCode::MOVED_PERMANENTLY), "");
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            apply_response_ops(r.headers_mut(), &route.headers);
            outcome.status = rd.code;
            (r, outcome)
        }
        Action::Forward(fwd) => {
            let upgrade = is_upgrade(&req);
            let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
            let (resp, o) = forward(rt, fwd, &route.headers, &route.matcher.path, peer, req, outcome).await;
            if let (Some(down), true) = (downstream_upgrade, resp.0.status() == StatusCode::SWITCHING_PROTOCOLS) {
                let (mut resp, up) = resp;
                if let Some(up) = up {
                    tokio::spawn(tunnel(down, up));
                }
                apply_response_ops(resp.headers_mut(), &route.headers);
                return (resp, o);
            }
            (resp.0, o)
        }
    }
}

/// The route `req` takes on `listener` (`Err`: why none, for the 404 body).
pub(crate) fn matched_route<'r, B>(
    rt: &'r crate::Runtime,
    listener: &str,
    req: &Request<B>,
) -> Result<&'r crate::config::route::Route, &'static str> {
    let route_name =
        rt.snapshot.listeners.get(listener).and_then(|l| l.route_name()).ok_or("listener has no routes")?;
    let table = rt.snapshot.routes.get(route_name).ok_or("route configuration not received yet")?;
    let authority = request_authority(req);
    let view = RequestView {
        method: req.method(),
        authority,
        scheme: req.uri().scheme_str().unwrap_or("http"),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    table.virtual_host(authority).and_then(|vh| vh.route(&view)).ok_or("")
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

async fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = (down.await, up.await) else { return };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
}

fn redirect_location(rd: &Redirect, scheme: &str, authority: &str, path: &str, query: Option<&str>) -> String {
    let scheme = rd.scheme.as_deref().unwrap_or(scheme);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
        _ => (authority, None),
    };
    // As Envoy: a new host drops the request's port unless a port is given too.
    let port = match (&rd.host, rd.port) {
        (_, Some(p)) => Some(p.to_string()),
        (Some(_), None) => None,
        (None, None) => port.map(String::from),
    };
    let host = rd.host.as_deref().unwrap_or(host);
    let mut path = rd.path.clone().unwrap_or_else(|| path.to_string());
    if let Some(p) = &rd.prefix_rewrite {
        path = p.clone();
    }
    let mut out = format!("{scheme}://{host}");
    if let Some(p) = port.filter(|p| !((scheme == "http" && p == "80") || (scheme == "https" && p == "443"))) {
        out.push(':');
        out.push_str(&p);
    }
    out.push_str(&path);
    if let (Some(q), false) = (query, rd.strip_query || rd.path.as_deref().is_some_and(|p| p.contains('?'))) {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Envoy's order: removals, then additions (appended, or replacing).
fn edit_headers(h: &mut HeaderMap, remove: &[HeaderName], add: &[(HeaderName, HeaderValue, bool)]) {
    for n in remove {
        h.remove(n);
    }
    for (n, v, append) in add {
        if *append {
            h.append(n.clone(), v.clone());
        } else {
            h.insert(n.clone(), v.clone());
        }
    }
}

fn apply_request_ops(h: &mut HeaderMap, ops: &HeaderOps) {
    edit_headers(h, &ops.request_remove, &ops.request_add);
}

fn apply_response_ops(h: &mut HeaderMap, ops: &HeaderOps) {
    edit_headers(h, &ops.response_remove, &ops.response_add);
}

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in HOP_BY_HOP.iter() {
        if keep_upgrade && (*n == header::UPGRADE || *n == header::CONNECTION) {
            continue;
        }
        // `te: trailers` is how gRPC clients say they accept trailers; keep exactly that.
        if *n == header::TE && h.get(n).is_some_and(|v| v == "trailers") {
            continue;
        }
        h.remove(n);
    }
}

fn hash_key<B>(policies: &[HashPolicy], req: &Request<B>, peer: SocketAddr, query: Option<&str>) -> upstream::HashKey {
    let mut key: Option<u64> = None;
    for p in policies {
        let part: Option<Vec<u8>> = match p {
            HashPolicy::Header(n) => req.headers().get(n).map(|v| v.as_bytes().to_vec()),
            HashPolicy::Cookie(name) => req
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then(|| v.as_bytes().to_vec())
                }),
            HashPolicy::SourceIp => Some(peer.ip().to_string().into_bytes()),
            HashPolicy::Query(name) => query.and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then(|| v.as_bytes().to_vec())
                })
            }),
        };
        if let Some(part) = part {
            let h = upstream::lb::hash64(&part);
            key = Some(key.map_or(h, |k| k.rotate_left(1) ^ h));
        }
    }
    key
}

/// A random UUID v4.
fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut out = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[(x >> 4) as usize] as char);
        out.push(HEX[(x & 0xf) as usize] as char);
    }
    out
}

type ForwardResult = ((Response<BoxBody>, Option<hyper::upgrade::OnUpgrade>), Outcome);

#[allow(clippy::too_many_arguments)]
async fn forward<B: ProxyBody>(
    rt: &crate::Runtime,
    fwd: &Forward,
    route_ops: &HeaderOps,
    matched: &PathMatch,
    peer: SocketAddr,
    req: Request<B>,
    mut outcome: Outcome,
) -> ForwardResult {
    let fail = |status: StatusCode, body: String, flags: &'static str, mut o: Outcome| {
        o.status = status.as_u16();
        o.flags = flags;
        ((local_reply(status, &body), None), o)
    };
    // Weighted cluster.
    let wc = if fwd.clusters.len() == 1 {
        &fwd.clusters[0]
    } else {
        let mut r = rand::rng().random_range(0..fwd.total_weight);
        fwd.clusters
            .iter()
            .find(|c| {
                if r < c.weight {
                    true
                } else {
                    r -= c.weight;
                    false
                }
            })
            .unwrap_or(&fwd.clusters[0])
    };
    outcome.cluster = Some(wc.name.clone());
    let Some(cluster) = rt.clusters.get(&wc.name).cloned() else {
        return fail(StatusCode::SERVICE_UNAVAILABLE, "no cluster".into(), "NC", outcome);
    };
    let guard = match cluster.start_request() {
        Ok(g) => g,
        Err(_) => return fail(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow".into(), "UO", outcome),
    };
    let upgrade = is_upgrade(&req);
    let host = if cluster.original_dst() {
        let authority = request_authority(&req);
        match authority.parse::<SocketAddr>() {
            Ok(_) => Some(Arc::new(upstream::Host::ephemeral(authority))),
            Err(_) => None,
        }
    } else {
        cluster.pick(hash_key(&fwd.hash_policy, &req, peer, req.uri().query()))
    };
    let Some(host) = host else {
        return fail(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream".into(), "UH", outcome);
    };
    outcome.upstream_host = Some(host.address.clone());

    // The upstream request.
    let (mut parts, body) = req.into_parts();
    // The request's URI and Host as they arrived (before the header operations), borrowed from
    // here on: nothing is copied unless something is rewritten.
    let uri = std::mem::take(&mut parts.uri);
    let host_value = parts.headers.get(header::HOST).cloned();
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| host_value.as_ref().and_then(|h| h.to_str().ok()))
        .unwrap_or_default();
    let (path, query) = (uri.path(), uri.query());
    let http2 = cluster.config.http2;
    // The common case — HTTP/1.1 upstream, no rewrite, a request in origin form — keeps the
    // request's URI as it is, without building and parsing it again.
    let rewrite = fwd.prefix_rewrite.is_some() || fwd.regex_rewrite.is_some();
    let keep_uri = !http2 && !rewrite && uri.scheme().is_none() && uri.authority().is_none();
    let pq = if keep_uri {
        String::new()
    } else {
        let mut new_path = path.to_string();
        if let Some(prefix) = &fwd.prefix_rewrite {
            // Replaces the matched prefix; routes with exact or regex matches use regex_rewrite.
            new_path = prefix_rewrite(path, prefix, matched);
        }
        if let Some((re, sub)) = &fwd.regex_rewrite {
            new_path = re.replace_all(&new_path, sub.as_str()).into_owned();
        }
        match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        }
    };
    let host_header = fwd.host_rewrite.as_deref().unwrap_or(authority);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    apply_request_ops(&mut parts.headers, route_ops);
    apply_request_ops(&mut parts.headers, &wc.headers);
    // (Left alone when it is already that one value.)
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let same = matches!((hosts.next(), hosts.next()), (Some(h), None) if h.as_bytes() == host_header.as_bytes());
    if !same && let Ok(v) = HeaderValue::from_str(host_header) {
        parts.headers.insert(header::HOST, v);
    }
    let xff = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.headers.entry("x-forwarded-proto").or_insert(HeaderValue::from_static("http"));
    parts.version = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
    if http2 {
        parts.uri = match Uri::builder().scheme("http").authority(host_header).path_and_query(pq.as_str()).build() {
            Ok(u) => u,
            Err(_) => return fail(StatusCode::BAD_REQUEST, "bad authority".into(), "DPE", outcome),
        };
    } else if !keep_uri {
        parts.uri = match pq.parse::<Uri>() {
            Ok(u) => u,
            Err(_) => return fail(StatusCode::BAD_REQUEST, "bad path".into(), "DPE", outcome),
        };
    } else {
        parts.uri = uri;
    }
    if http2 {
        parts.headers.remove(header::HOST);
    }
    let counted = crate::body::Counted::new(body, outcome.request_bytes.clone());
    let mut upstream_req = Request::from_parts(parts, boxed(counted));
    let sent_at = Instant::now();

    host.active_requests.fetch_add(1, Ordering::Relaxed);
    host.rq_total.fetch_add(1, Ordering::Relaxed);
    let exchange = async {
        let conn = upstream::pool::acquire(&cluster, &host).await?;
        upstream::pool::send(conn, std::mem::take(&mut upstream_req)).await
    };
    // Each attempt (a retry is another attempt) within the per-try timeout, if shorter.
    let timeout = match (fwd.timeout, fwd.per_try_timeout) {
        (Some(t), Some(p)) => Some(t.min(p)),
        (t, p) => t.or(p),
    };
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, exchange).await.map_err(|_| ()),
        None => Ok(exchange.await),
    };
    host.active_requests.fetch_sub(1, Ordering::Relaxed);
    match result {
        Err(()) => {
            cluster.record(&host, Some(504));
            fail(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout".into(), "UT", outcome)
        }
        Ok(Err(e)) => {
            let kind = e.kind();
            if kind != UpstreamError::Overflow {
                cluster.record(&host, None);
            }
            let status = StatusCode::SERVICE_UNAVAILABLE;
            let body = match kind {
                UpstreamError::Overflow => "upstream overflow".to_string(),
                _ => format!("upstream connect error or disconnect/reset before headers. reset reason: {e}"),
            };
            fail(status, body, kind.flag(), outcome)
        }
        Ok(Ok(mut resp)) => {
            outcome.upstream_ms = Some(sent_at.elapsed().as_millis() as u64);
            cluster.record(&host, Some(resp.status().as_u16()));
            let up_upgrade = (resp.status() == StatusCode::SWITCHING_PROTOCOLS).then(|| hyper::upgrade::on(&mut resp));
            strip_hop_by_hop(resp.headers_mut(), up_upgrade.is_some());
            apply_response_ops(resp.headers_mut(), &wc.headers);
            apply_response_ops(resp.headers_mut(), route_ops);
            outcome.status = resp.status().as_u16();
            outcome.flags = "-";
            // The request slot is held until the response headers; the body streams on.
            drop(guard);
            ((resp, up_upgrade), outcome)
        }
    }
}

/// Envoy's prefix rewrite: the matched part of the path is replaced (all of it for exact
/// and regex matches).
fn prefix_rewrite(path: &str, replacement: &str, matched: &PathMatch) -> String {
    match matched {
        PathMatch::Prefix(p) if path.len() >= p.len() => format!("{replacement}{}", &path[p.len()..]),
        _ => replacement.to_string(),
    }
}
