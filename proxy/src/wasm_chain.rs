//! Running a listener's wasm filter chain around the router: each filter, in order, sees the
//! request headers (and may change them, or answer locally); the router forwards; each filter,
//! in reverse order, sees the response headers. The headers a filter sees are the request's
//! own, with Envoy's pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`), and the
//! standard properties `request.*` and `source.*` in Envoy's encodings.
//!
//! Bodies: when a filter handles bodies, each data frame passes through its body callback
//! (request frames in chain order, response frames in reverse); a filter that returns Pause
//! before the end sees the body buffered up to the next frame (at most 1 MiB, Envoy's default
//! buffer limit), and Content-Length is dropped since a filter may change the length. The
//! streams end (on_log, on_done, on_delete; VMs back to the pool) when the last body is done.
//!
//! Content-Length is kept, as Envoy does: a filter that changes a body's length removes it in
//! its headers callback.
//!
//! Properties: `route_name` / `cluster_name` (and their `xds.` forms) from the route the
//! request matches before the filters run (a filter changing the headers re-routes, as
//! Envoy's route-cache clearing does); `response.code` and `response.flags` (Envoy's bits)
//! before the response callbacks.
//!
//! Pausing: a filter that pauses the request or response headers holds the stream until it
//! resumes it (or answers) — from the answer of an http call it made (performed through the
//! cluster's pool, `crate::callout`) or from its root context's ticks, which run while it
//! waits — for at most 5 minutes. Calls made without pausing are fire and forget.
//!
//! Re-sending (retry): a filter that calls `trellis.retain_request` on the request headers has
//! the request (its body up to 1 MiB) kept; one that calls `trellis.resend` on the response
//! headers has that response dropped and the request sent again after the delay it gave; the
//! new response goes through the response callbacks from the innermost filter again.
//!
//! Failures follow the filter's policy: fail open skips the filter, fail closed answers 503
//! (during a body already on its way, the stream is reset instead). A failed VM is dropped;
//! the next stream gets a fresh one.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use trellis_wasm_host::abi::StreamType;
use trellis_wasm_host::{Action, Pairs, SharedProperties, Stream};

use crate::config::listener::FailPolicy;
use crate::http::{Outcome, local_reply, route_request};
use crate::wasm::WasmFilter;
use crate::{BoxBody, Runtime};

struct Active {
    filter: Arc<WasmFilter>,
    /// The VM the stream's context lives in (shared with other streams).
    vm: Arc<crate::wasm::VmSlot>,
    id: u32,
    /// Whether the filter wants the response headers callback (`Vm::handles_response_headers`).
    responds: bool,
}

/// Header maps handed to filters come back here when their stream ends (`Chain`'s drop) and
/// are filled again for the next one: built anew, a map cost two allocations per header (name
/// and value) on every request of every chain — most of the chain's allocations.
mod spare {
    use std::cell::RefCell;
    use std::sync::Arc;

    use trellis_wasm_host::Pairs;

    /// Maps kept per thread, and the most bytes one may hold to be kept.
    const KEEP: usize = 64;
    const KEEP_BYTES: usize = 16 << 10;

    thread_local!(static SPARE: RefCell<Vec<Arc<Pairs>>> = const { RefCell::new(Vec::new()) });

    /// A map to fill: the caller holds the only reference.
    pub(super) fn take() -> Arc<Pairs> {
        SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default()
    }

    /// Keeps `map` for reuse when nothing else refers to it.
    pub(super) fn give(map: Arc<Pairs>) {
        let bytes = || map.iter().map(|(k, v)| k.capacity() + v.capacity()).sum::<usize>();
        if Arc::strong_count(&map) == 1 && Arc::weak_count(&map) == 0 && bytes() <= KEEP_BYTES {
            SPARE.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < KEEP {
                    s.push(map);
                }
            });
        }
    }

    /// Writes pairs over a reused map's entries (reusing their buffers), dropping what is left
    /// over when done.
    pub(super) struct Filler<'a> {
        map: &'a mut Pairs,
        n: usize,
    }

    impl<'a> Filler<'a> {
        pub(super) fn new(map: &'a mut Arc<Pairs>) -> Filler<'a> {
            Filler { map: Arc::make_mut(map), n: 0 }
        }

        pub(super) fn put(&mut self, k: &str, v: &[u8]) {
            match self.map.get_mut(self.n) {
                Some((key, value)) => {
                    key.clear();
                    key.push_str(k);
                    value.clear();
                    value.extend_from_slice(v);
                }
                None => self.map.push((k.to_owned(), v.to_vec())),
            }
            self.n += 1;
        }
    }

    impl Drop for Filler<'_> {
        fn drop(&mut self) {
            self.map.truncate(self.n);
        }
    }
}

/// The request headers as filters see them, with Envoy's pseudo-headers.
fn request_pairs<B>(req: &Request<B>) -> Arc<Pairs> {
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut map = spare::take();
    let mut headers = spare::Filler::new(&mut map);
    headers.put(":method", req.method().as_str().as_bytes());
    headers.put(":path", path.as_bytes());
    headers.put(":authority", crate::http::request_authority(req).as_bytes());
    headers.put(":scheme", req.uri().scheme_str().unwrap_or("http").as_bytes());
    for (k, v) in req.headers() {
        if k != header::HOST {
            headers.put(k.as_str(), v.as_bytes());
        }
    }
    drop(headers);
    map
}

/// The properties every filter of a request shares (those in the headers — `request.path`,
/// `request.headers.*`, ... — the host reads from the headers each filter sees), computed when a
/// filter reads one.
#[derive(Debug)]
struct RequestInfo {
    peer: SocketAddr,
    local: Option<SocketAddr>,
    version: http::Version,
    time_nanos: i64,
    route: Option<String>,
    cluster: Option<String>,
    /// The mTLS peer, when the connection is mTLS.
    mtls: Option<Arc<crate::tls::PeerIdentity>>,
}

impl trellis_wasm_host::Properties for RequestInfo {
    fn get(&self, path: &str) -> Option<Vec<u8>> {
        let int = |v: i64| Some(v.to_le_bytes().to_vec());
        match path {
            "source.address" => Some(self.peer.to_string().into_bytes()),
            "source.port" => int(i64::from(self.peer.port())),
            "destination.address" => self.local.map(|l| l.to_string().into_bytes()),
            "destination.port" => self.local.and_then(|l| int(i64::from(l.port()))),
            "connection.mtls" => Some(vec![u8::from(self.mtls.is_some())]),
            "connection.uri_san_peer_certificate" | "source.principal" => {
                self.mtls.as_ref().map(|m| m.principal.as_bytes().to_vec())
            }
            "source.namespace" => self.mtls.as_ref().and_then(|m| m.namespace()).map(|n| n.as_bytes().to_vec()),
            "request.protocol" => Some(
                match self.version {
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                }
                .into(),
            ),
            "request.time" => int(self.time_nanos),
            _ => self.name(path).map(|n| n.as_bytes().to_vec()),
        }
    }

    /// The names most filters read on every request, without an allocation.
    fn get_into(&self, path: &str, out: &mut Vec<u8>) -> bool {
        match self.name(path) {
            Some(n) => out.extend_from_slice(n.as_bytes()),
            None => return self.get(path).map(|v| out.extend_from_slice(&v)).is_some(),
        }
        true
    }
}

impl RequestInfo {
    /// `route_name` / `cluster_name` (and their `xds.` forms).
    fn name(&self, path: &str) -> Option<&str> {
        match path {
            "route_name" | "xds.route_name" => self.route.as_deref(),
            "cluster_name" | "xds.cluster_name" => self.cluster.as_deref(),
            _ => None,
        }
    }
}

fn request_properties<B>(
    req: &Request<B>,
    peer: SocketAddr,
    route: Option<String>,
    cluster: Option<String>,
) -> SharedProperties {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64);
    SharedProperties(Arc::new(RequestInfo {
        peer,
        local: req.extensions().get::<crate::http::LocalAddr>().map(|l| l.0),
        version: req.version(),
        time_nanos: now.unwrap_or(0),
        route,
        cluster,
        mtls: req.extensions().get::<Arc<crate::tls::PeerIdentity>>().cloned(),
    }))
}

/// The properties of a response every filter shares.
#[derive(Debug)]
struct ResponseInfo {
    code: u16,
    flags: u64,
    upstream: Option<String>,
}

impl trellis_wasm_host::Properties for ResponseInfo {
    fn get(&self, path: &str) -> Option<Vec<u8>> {
        match path {
            "upstream.address" => self.upstream.as_ref().map(|u| u.as_bytes().to_vec()),
            "upstream.port" => {
                let port = self.upstream.as_ref()?.rsplit_once(':')?.1.parse::<i64>().ok()?;
                Some(port.to_le_bytes().to_vec())
            }
            _ => self.word(path).map(|w| w.to_vec()),
        }
    }

    /// What a retry policy reads on every response, without an allocation.
    fn get_into(&self, path: &str, out: &mut Vec<u8>) -> bool {
        match self.word(path) {
            Some(w) => out.extend_from_slice(&w),
            None => return self.get(path).map(|v| out.extend_from_slice(&v)).is_some(),
        }
        true
    }
}

impl ResponseInfo {
    /// `response.code` / `response.flags`, 8 bytes little-endian as in Envoy.
    fn word(&self, path: &str) -> Option<[u8; 8]> {
        match path {
            "response.code" => Some(i64::from(self.code).to_le_bytes()),
            "response.flags" => Some(self.flags.to_le_bytes()),
            _ => None,
        }
    }
}

fn response_properties(resp: &Response<BoxBody>, outcome: &Outcome) -> SharedProperties {
    SharedProperties(Arc::new(ResponseInfo {
        code: resp.status().as_u16(),
        flags: flag_bits(outcome.flags),
        upstream: outcome.upstream_host.clone(),
    }))
}

/// Writes the filter's view of the request back into it.
/// Headers a filter leaves must fit what the proxy accepts from clients (Envoy's 60 KiB).
fn check_size(pairs: &Pairs) -> Result<(), String> {
    let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > crate::http::MAX_HEADER_BYTES {
        return Err(format!(
            "a filter set {size} bytes of headers, over the {}-byte limit",
            crate::http::MAX_HEADER_BYTES
        ));
    }
    Ok(())
}

fn apply_request<B>(req: &mut Request<B>, pairs: &Pairs) -> Result<(), String> {
    check_size(pairs)?;
    let mut headers = http::HeaderMap::new();
    let (mut path, mut authority) = (None, None);
    for (k, v) in pairs {
        match k.as_str() {
            ":path" => path = Some(String::from_utf8_lossy(v).into_owned()),
            ":authority" => authority = Some(v.clone()),
            ":method" => {
                *req.method_mut() = http::Method::from_bytes(v).map_err(|_| "a filter set an invalid :method")?;
            }
            k if k.starts_with(':') => {}
            k => {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("a filter set an invalid header name {k:?}"))?;
                let value = HeaderValue::from_bytes(v).map_err(|_| format!("a filter set an invalid value for {k}"))?;
                headers.append(name, value);
            }
        }
    }
    if let Some(a) = authority {
        headers.insert(header::HOST, HeaderValue::from_bytes(&a).map_err(|_| "a filter set an invalid :authority")?);
    }
    if let Some(p) = path {
        let uri: Uri = p.parse().map_err(|_| format!("a filter set an invalid :path {p:?}"))?;
        *req.uri_mut() = uri;
    }
    *req.headers_mut() = headers;
    Ok(())
}

fn response_pairs(resp: &Response<BoxBody>) -> Arc<Pairs> {
    let mut map = spare::take();
    let mut pairs = spare::Filler::new(&mut map);
    pairs.put(":status", resp.status().as_str().as_bytes());
    for (k, v) in resp.headers() {
        pairs.put(k.as_str(), v.as_bytes());
    }
    drop(pairs);
    map
}

fn apply_response(resp: &mut Response<BoxBody>, pairs: &Pairs) -> Result<(), String> {
    check_size(pairs)?;
    let mut headers = http::HeaderMap::new();
    for (k, v) in pairs {
        if k == ":status" {
            let s = std::str::from_utf8(v).ok().and_then(|s| s.parse::<u16>().ok());
            *resp.status_mut() =
                s.and_then(|s| StatusCode::from_u16(s).ok()).ok_or("a filter set an invalid :status")?;
        } else if !k.starts_with(':') {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("a filter set an invalid header name {k:?}"))?;
            let value = HeaderValue::from_bytes(v).map_err(|_| format!("a filter set an invalid value for {k}"))?;
            headers.append(name, value);
        }
    }
    *resp.headers_mut() = headers;
    Ok(())
}

fn local(l: &trellis_wasm_host::LocalResponse) -> Response<BoxBody> {
    let mut r = Response::new(crate::boxed(http_body_util::Full::new(bytes::Bytes::from(l.body.clone()))));
    *r.status_mut() = StatusCode::from_u16(l.status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in &l.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
            r.headers_mut().append(n, v);
        }
    }
    if l.grpc_status >= 0 {
        r.headers_mut().insert("grpc-status", HeaderValue::from(l.grpc_status));
    }
    r
}

fn failed(filter: &WasmFilter, why: &str, mut outcome: Outcome) -> (Response<BoxBody>, Outcome) {
    tracing::warn!(filter = %filter.config.name, error = %why, "wasm filter failed; failing closed");
    outcome.status = 503;
    outcome.flags = "WF";
    (local_reply(StatusCode::SERVICE_UNAVAILABLE, "wasm filter failed"), outcome)
}

fn done(active: Vec<Active>) {
    for a in active {
        {
            let mut vm = a.vm.lock();
            let _ = a.filter.call(|| vm.finish_stream(a.id));
            // Its gRPC streams are reset.
            a.vm.calls.route_grpc_ops(&mut vm);
            a.filter.finished_with(vm.poisoned());
        }
    }
}

/// Whether stream `id` in `vm` will get no more callbacks after its request headers, as far
/// as the VM knows: the module needs no stream end (`trellis.body_interest`), has no body
/// still to see, no gRPC stream open, no request kept for a re-send and no local reply. With
/// no response-headers callback and no call out in flight either, [`run`] finishes such a
/// stream right away (`proxy_on_delete`, as [`done`]).
fn quiet(vm: &trellis_wasm_host::Vm, id: u32, end_of_stream: bool) -> bool {
    let (request_body, response_body) = vm.handles_bodies();
    vm.state().end_interest == (false, false)
        && (end_of_stream || !request_body)
        && !response_body
        && !vm.state().grpc_open.values().any(|g| g.context == id)
        && vm.stream(id).is_some_and(|s| !s.retain_request && s.local_response.is_none())
}

/// The filters of one stream, finished when the last user (the run, a body) lets go; and the
/// header maps handed to them, reused once the stream is over.
struct Chain(Vec<Active>, Vec<Arc<Pairs>>);

impl Drop for Chain {
    fn drop(&mut self) {
        done(std::mem::take(&mut self.0));
        for map in self.1.drain(..) {
            spare::give(map);
        }
    }
}

type Shared = Arc<Mutex<Chain>>;

fn lock(chain: &Shared) -> std::sync::MutexGuard<'_, Chain> {
    chain.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most body bytes a filter may hold back.
const BODY_BUFFER_LIMIT: usize = 1 << 20;

/// A request or response body passed through the filters' body callbacks.
struct FilteredBody {
    inner: BoxBody,
    chain: Shared,
    rt: Arc<Runtime>,
    request: bool,
    /// Per filter: what it asked to see more of.
    buffered: Vec<Vec<u8>>,
    trailers: Option<http::HeaderMap>,
    ended: bool,
}

impl FilteredBody {
    fn new(inner: BoxBody, chain: Shared, rt: Arc<Runtime>, request: bool) -> FilteredBody {
        let n = lock(&chain).0.len();
        FilteredBody { inner, chain, rt, request, buffered: vec![Vec::new(); n], trailers: None, ended: false }
    }

    /// Runs `chunk` through the filters; `None` when a filter holds it back for now.
    fn filter(&mut self, chunk: Bytes, end: bool) -> Result<Option<Bytes>, crate::BoxError> {
        let mut chain = lock(&self.chain);
        let n = chain.0.len();
        let order: Vec<usize> = if self.request { (0..n).collect() } else { (0..n).rev().collect() };
        let request = self.request;
        let mut data = chunk.to_vec();
        for i in order {
            let a = &mut chain.0[i];
            let slot = a.vm.clone();
            let mut vm = slot.lock();
            let handles = if request { vm.handles_bodies().0 } else { vm.handles_bodies().1 };
            if !handles {
                continue;
            }
            let buf = &mut self.buffered[i];
            buf.extend_from_slice(&data);
            if buf.len() > BODY_BUFFER_LIMIT {
                let name = &a.filter.config.name;
                return Err(format!("wasm filter {name}: body over the {BODY_BUFFER_LIMIT}-byte buffer limit").into());
            }
            let (filter, id) = (&a.filter, a.id);
            if let Some(s) = vm.stream_mut(id) {
                if request {
                    s.request_body = std::mem::take(buf);
                } else {
                    s.response_body = std::mem::take(buf);
                }
            }
            let r = filter.call(|| if request { vm.on_request_body(id, end) } else { vm.on_response_body(id, end) });
            crate::callout::start(&self.rt, filter, &slot, &mut vm, id);
            let answered = vm.stream(id).is_some_and(|s| s.local_response.is_some());
            let out =
                vm.stream_mut(id)
                    .map(|s| {
                        if request { std::mem::take(&mut s.request_body) } else { std::mem::take(&mut s.response_body) }
                    })
                    .unwrap_or_default();
            match r {
                Ok(_) if answered => {
                    let name = &filter.config.name;
                    return Err(format!("wasm filter {name}: a local reply after the headers were sent").into());
                }
                Ok(Action::Pause) if !end => {
                    *buf = out;
                    return Ok(None);
                }
                Ok(_) => data = out,
                Err(e) if filter.config.policy == FailPolicy::Open => {
                    tracing::warn!(filter = %filter.config.name, error = %e, "wasm filter failed on a body; failing open");
                    data = out;
                }
                Err(e) => return Err(e.to_string().into()),
            }
        }
        Ok(Some(Bytes::from(data)))
    }

    /// The end of the body: flush what the filters hold.
    fn flush(&mut self) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        self.ended = true;
        match self.filter(Bytes::new(), true) {
            Ok(Some(out)) if !out.is_empty() => Poll::Ready(Some(Ok(Frame::data(out)))),
            Ok(_) => Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        loop {
            if self.ended {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let end = self.inner.is_end_stream();
                        self.ended = end;
                        match self.filter(chunk, end) {
                            Ok(Some(out)) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                            Ok(None) => continue,
                            Err(e) => return Poll::Ready(Some(Err(e))),
                        }
                    }
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        return self.flush();
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return self.flush(),
            }
        }
    }
}

/// Envoy's response flag bits (StreamInfo::ResponseFlag), for `response.flags`.
fn flag_bits(flags: &str) -> u64 {
    let bit = match flags {
        "UH" => 1,
        "UT" => 2,
        "LR" => 3,
        "UR" => 4,
        "UF" => 5,
        "UC" => 6,
        "UO" => 7,
        "NR" => 8,
        "DI" => 9,
        "FI" => 10,
        "DPE" => 18,
        "NC" => 24,
        _ => return 0,
    };
    1 << bit
}

/// Longest a filter may hold a stream paused.
const MAX_PAUSE: Duration = Duration::from_secs(300);

/// Most re-sends of one request, whatever the filters ask.
const MAX_RESENDS: u32 = 10;

/// Waits until filter `i` resumes (or answers) the stream it paused, driving its root
/// context's ticks while the calls it makes are performed and answered (`crate::callout`).
async fn wait_resumed(rt: &Arc<Runtime>, chain: &Shared, i: usize, which: StreamType) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + MAX_PAUSE;
    let (filter, slot, id) = {
        let c = lock(chain);
        (c.0[i].filter.clone(), c.0[i].vm.clone(), c.0[i].id)
    };
    loop {
        // Registered before looking, so an answer that lands meanwhile is not missed.
        let answered = slot.calls.answered.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        let period = {
            let mut vm = slot.lock();
            if vm.poisoned() {
                return Err("the filter failed while answering a call".into());
            }
            let s = vm.stream(id).ok_or("the stream is gone")?;
            if s.resumed.contains(&which) || s.local_response.is_some() {
                return Ok(());
            }
            crate::callout::start(rt, &filter, &slot, &mut vm, id);
            vm.tick_period()
        };
        if period.is_none() && slot.calls.in_flight(id) == 0 {
            return Err("the filter paused the stream with nothing to resume it (no call out, no timer)".into());
        }
        // Ticks at the root context's period (the VM keeps the schedule across its streams).
        let tick_at = period.map(|p| tokio::time::Instant::now() + p.min(Duration::from_millis(50)));
        tokio::select! {
            _ = answered => {}
            _ = tokio::time::sleep_until(tick_at.unwrap_or(deadline)), if tick_at.is_some() => {
                slot.tick_if_due(&filter).map_err(|e| e.to_string())?;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("the filter held the stream paused for over {MAX_PAUSE:?}"));
            }
        }
    }
}

/// The request kept for re-sending.
struct Kept {
    method: http::Method,
    uri: Uri,
    version: http::Version,
    headers: http::HeaderMap,
    body: Arc<Mutex<KeptBody>>,
}

#[derive(Default)]
struct KeptBody {
    data: Vec<u8>,
    complete: bool,
    overflow: bool,
}

/// Most request body bytes kept for a re-send (Envoy's default buffer limit).
const KEEP_LIMIT: usize = 1 << 20;

impl Kept {
    fn request(&self) -> Option<Request<BoxBody>> {
        let body = self.body.lock().unwrap_or_else(|p| p.into_inner());
        if !body.complete || body.overflow {
            return None;
        }
        let mut r = Request::new(crate::boxed(http_body_util::Full::new(Bytes::from(body.data.clone()))));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        Some(r)
    }
}

/// A request body that keeps a copy of what passes (up to [`KEEP_LIMIT`]).
struct Tee {
    inner: BoxBody,
    kept: Arc<Mutex<KeptBody>>,
}

impl Body for Tee {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let end = self.inner.is_end_stream();
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    if kept.data.len() + d.len() > KEEP_LIMIT {
                        kept.overflow = true;
                        kept.data = Vec::new();
                    } else if !kept.overflow {
                        kept.data.extend_from_slice(d);
                    }
                } else {
                    // Trailers are not kept: such a request is not re-sent.
                    kept.overflow = true;
                }
                kept.complete = end;
            }
            Some(Err(_)) => kept.overflow = true,
            None => kept.complete = true,
        }
        drop(kept);
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

fn fail_filter(filter: &WasmFilter, why: &str) -> Option<(Response<BoxBody>, Outcome)> {
    if filter.config.policy == FailPolicy::Open {
        tracing::warn!(filter = %filter.config.name, error = %why, "wasm filter failed; failing open");
        return None;
    }
    Some(failed(filter, why, Outcome::default()))
}

/// Runs `chain` around the router.
pub async fn run(
    rt: &Arc<Runtime>,
    filters: &[Arc<WasmFilter>],
    listener: &str,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> (Response<BoxBody>, Outcome) {
    // The route before the filters, for route_name / cluster_name.
    let (route_name, cluster_name) = match crate::http::matched_route(rt, listener, &req) {
        Ok(r) => {
            let cluster = match &r.action {
                crate::config::route::Action::Forward(f) if f.clusters.len() == 1 => Some(f.clusters[0].name.clone()),
                _ => None,
            };
            (Some(r.name.clone()), cluster)
        }
        Err(_) => (None, None),
    };
    let end_of_stream = req.body().is_end_stream();
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let mut req = req.map(crate::boxed);
    let chain: Shared = Arc::new(Mutex::new(Chain(Vec::new(), Vec::new())));
    let shared = request_properties(&req, peer, route_name, cluster_name);
    // What the filters see, changed by each in turn.
    let mut pairs = request_pairs(&req);
    lock(&chain).1.push(pairs.clone());
    for filter in filters {
        let slot = match filter.take() {
            Ok(slot) => slot,
            Err(e) => match fail_filter(filter, &e.to_string()) {
                None => continue,
                Some(r) => return r,
            },
        };
        let stream =
            Stream { request_headers: pairs.clone(), request_properties: shared.clone(), ..Default::default() };
        let result = {
            let mut vm = slot.lock();
            filter.call(|| {
                let id = vm.create_stream(stream)?;
                Ok((id, vm.on_request_headers(id, end_of_stream)?, vm.handles_response_headers()))
            })
        };
        let (id, action, responds) = match result {
            Ok(r) => r,
            Err(e) => {
                filter.finished(&slot);
                match fail_filter(filter, &e.to_string()) {
                    None => continue,
                    Some(r) => return r,
                }
            }
        };
        let i = {
            let mut c = lock(&chain);
            c.0.push(Active { filter: filter.clone(), vm: slot.clone(), id, responds });
            c.0.len() - 1
        };
        let paused = action == Action::Pause && slot.lock().stream(id).is_some_and(|s| s.local_response.is_none());
        let waited = if paused { wait_resumed(rt, &chain, i, StreamType::HttpRequest).await } else { Ok(()) };
        // Whether the stream has nothing more for this filter, looked at while the VM is
        // locked below (calls out it started are counted once they are started there).
        let over: bool;
        let applied = {
            let mut c = lock(&chain);
            let a = &mut c.0[i];
            let mut vm = a.vm.lock();
            crate::callout::start(rt, &a.filter, &a.vm, &mut vm, id);
            let s = vm.stream(id);
            if let Some(l) = s.and_then(|s| s.local_response.as_ref()) {
                let resp = local(l);
                let outcome = Outcome { status: resp.status().as_u16(), flags: "-", ..Default::default() };
                return (resp, outcome);
            }
            // The request changes only when the filter changed its headers.
            let changed = s.filter(|s| s.request_headers_changed).map(|s| s.request_headers.clone());
            over = !paused && !responds && quiet(&vm, id, end_of_stream);
            drop(vm);
            waited.and_then(|()| match changed {
                Some(map) => {
                    c.1.push(map.clone());
                    pairs = map;
                    apply_request(&mut req, &pairs)
                }
                None => Ok(()),
            })
        };
        if let Err(e) = applied
            && let Some(r) = fail_filter(filter, &e)
        {
            return r;
        }
        // A filter the stream has nothing more for is finished now, while its VM is warm,
        // rather than with the others at the stream's end (it is the chain's last so far).
        if over && slot.calls.in_flight(id) == 0 {
            let finished = lock(&chain).0.pop();
            done(finished.into_iter().collect());
        }
    }
    let (request_bodies, response_bodies, retain) =
        lock(&chain).0.iter().fold((false, false, false), |(q, r, k), a| {
            let vm = a.vm.lock();
            let (aq, ar) = vm.handles_bodies();
            (q || aq, r || ar, k || vm.stream(a.id).is_some_and(|s| s.retain_request))
        });
    // A request that ended with its headers has no body callbacks (as in Envoy).
    if request_bodies && !end_of_stream {
        req = req.map(|b| crate::boxed(FilteredBody::new(b, chain.clone(), rt.clone(), true)));
    }
    let kept = (retain && !upgrade).then(|| {
        let body = Arc::new(Mutex::new(KeptBody { complete: end_of_stream, ..Default::default() }));
        Kept {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        }
    });
    if let Some(k) = &kept
        && !end_of_stream
    {
        let body = k.body.clone();
        req = req.map(|inner| crate::boxed(Tee { inner, kept: body }));
    }
    let (mut resp, mut outcome) = route_request(rt, listener, peer, req).await;
    let mut resends = 0;
    loop {
        let resend = respond(rt, &chain, &mut resp, &mut outcome, kept.is_some() && resends < MAX_RESENDS).await;
        let Some(delay) = resend else { break };
        let Some(again) = kept.as_ref().and_then(Kept::request) else {
            tracing::debug!("a filter asked for a re-send of a request whose body was not kept; the response goes on");
            break;
        };
        resends += 1;
        drop(resp);
        tokio::time::sleep(delay).await;
        (resp, outcome) = route_request(rt, listener, peer, again).await;
    }
    if response_bodies && !resp.body().is_end_stream() {
        let (parts, body) = resp.into_parts();
        resp = Response::from_parts(parts, crate::boxed(FilteredBody::new(body, chain.clone(), rt.clone(), false)));
    }
    // The streams finish when the last body holding the chain is done (and the header maps
    // go back for reuse then, when no one else holds them).
    drop(pairs);
    drop(chain);
    (resp, outcome)
}

/// The response headers through the filters, innermost first. `Some(delay)`: a filter asked
/// for the request to be sent again (only when `can_resend`), and the rest did not see this
/// response.
async fn respond(
    rt: &Arc<Runtime>,
    chain: &Shared,
    resp: &mut Response<BoxBody>,
    outcome: &mut Outcome,
    can_resend: bool,
) -> Option<Duration> {
    let n = {
        let c = lock(chain);
        // No filter takes the response headers callback: nothing to show them.
        if !c.0.iter().any(|a| a.responds) {
            return None;
        }
        c.0.len()
    };
    let mut pairs = response_pairs(resp);
    lock(chain).1.push(pairs.clone());
    let mut shared = response_properties(resp, outcome);
    for i in (0..n).rev() {
        let action = {
            let mut c = lock(chain);
            let a = &mut c.0[i];
            if !a.responds {
                continue;
            }
            let mut vm = a.vm.lock();
            if let Some(s) = vm.stream_mut(a.id) {
                s.response_headers = pairs.clone();
                s.response_headers_changed = false;
                s.resumed.clear();
                s.response_properties = shared.clone();
            }
            let (filter, id) = (&a.filter, a.id);
            filter.call(|| vm.on_response_headers(id, false))
        };
        let filter = lock(chain).0[i].filter.clone();
        let policy = filter.config.policy;
        let mut result = action.map_err(|e| e.to_string());
        if let Ok(Action::Pause) = result {
            let (resend, answered) = {
                let c = lock(chain);
                let vm = c.0[i].vm.lock();
                let s = vm.stream(c.0[i].id);
                (s.and_then(|s| s.resend), s.is_some_and(|s| s.local_response.is_some()))
            };
            if resend.is_none() && !answered {
                result = wait_resumed(rt, chain, i, StreamType::HttpResponse).await.map(|()| Action::Continue);
            }
        }
        let mut c = lock(chain);
        let a = &mut c.0[i];
        let slot = a.vm.clone();
        let mut vm = slot.lock();
        crate::callout::start(rt, &a.filter, &slot, &mut vm, a.id);
        let Some(s) = vm.stream_mut(a.id) else { continue };
        let resend = s.resend.take();
        match result {
            Ok(_) if resend.is_some() && can_resend => return resend.map(|ms| Duration::from_millis(u64::from(ms))),
            Ok(_) => {
                if let Some(l) = &s.local_response {
                    *resp = local(l);
                    outcome.status = resp.status().as_u16();
                    (pairs, shared) = (response_pairs(resp), response_properties(resp, outcome));
                    continue;
                }
                if !s.response_headers_changed {
                    continue;
                }
                pairs = s.response_headers.clone();
                if let Err(e) = apply_response(resp, &pairs)
                    && policy != FailPolicy::Open
                {
                    (*resp, *outcome) = failed(&filter, &e, outcome.clone());
                    (pairs, shared) = (response_pairs(resp), response_properties(resp, outcome));
                }
            }
            Err(e) if policy != FailPolicy::Open => {
                (*resp, *outcome) = failed(&filter, &e, outcome.clone());
                (pairs, shared) = (response_pairs(resp), response_properties(resp, outcome));
            }
            Err(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method("POST").uri("/a?b=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn owned(list: &[(&str, &str)]) -> Pairs {
        list.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn header_maps_are_reused_without_leftovers_and_only_when_no_one_holds_them() {
        let big = request(&[("host", "a.example"), ("x-one", "1"), ("x-two", "2"), ("x-three", "a long value")]);
        let first = request_pairs(&big);
        let want_first = owned(&[
            (":method", "POST"),
            (":path", "/a?b=1"),
            (":authority", "a.example"),
            (":scheme", "http"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("x-three", "a long value"),
        ]);
        assert_eq!(*first, want_first);
        let ptr = Arc::as_ptr(&first);
        spare::give(first);
        // The next map is the same one, refilled: nothing of the first request is left.
        let small = request(&[("host", "b.example"), ("x-two", "zwei")]);
        let second = request_pairs(&small);
        assert_eq!(Arc::as_ptr(&second), ptr);
        assert_eq!(
            *second,
            owned(&[
                (":method", "POST"),
                (":path", "/a?b=1"),
                (":authority", "b.example"),
                (":scheme", "http"),
                ("x-two", "zwei")
            ])
        );
        // A map someone still holds (a filter's stream) is not taken back.
        let held = second.clone();
        spare::give(second);
        let third = request_pairs(&small);
        assert_ne!(Arc::as_ptr(&third), Arc::as_ptr(&held));
        assert_eq!(*held, *third);
    }

    /// The built-in modules' streams after their request headers: which are finished at once
    /// (as `run` decides, with no call out in flight).
    #[test]
    fn streams_with_nothing_more_to_see_are_finished_after_their_request_headers() {
        let host = trellis_wasm_host::Host::new().unwrap();
        let vm = |code: &[u8], config: serde_json::Value| {
            let plugin = trellis_wasm_host::PluginConfig {
                name: "t".into(),
                vm_id: "t".into(),
                configuration: config.to_string().into_bytes(),
                ..Default::default()
            };
            let module = host.load(code, None).unwrap();
            trellis_wasm_host::Vm::start(&host, module, plugin, Default::default()).unwrap()
        };
        let get = request(&[("host", "a.example")]);
        // (module, config, request ends with its headers, expected)
        let mirror = serde_json::json!({"routes": {"r": [{"cluster": "c", "percentage": 0}]}});
        let cases = [
            ("fault", crate::builtins::FAULT, serde_json::json!({}), true, true),
            ("auth", crate::builtins::AUTH, serde_json::json!({"stages": []}), true, true),
            // Mirror reads request bodies: finished early only when there is none.
            ("mirror, no body", crate::builtins::MIRROR, mirror.clone(), true, true),
            ("mirror, a body to come", crate::builtins::MIRROR, mirror, false, false),
            // Retry takes the response headers and the stream's end.
            ("retry", crate::builtins::RETRY, serde_json::json!({}), true, false),
        ];
        for (what, code, config, end_of_stream, want) in cases {
            let mut vm = vm(code, config);
            let stream = Stream { request_headers: request_pairs(&get), ..Default::default() };
            let id = vm.create_stream(stream).unwrap();
            vm.on_request_headers(id, end_of_stream).unwrap();
            let responds = vm.handles_response_headers();
            assert_eq!(!responds && quiet(&vm, id, end_of_stream), want, "{what}");
        }
    }
}
