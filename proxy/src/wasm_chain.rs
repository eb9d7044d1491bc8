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
//! Failures follow the filter's policy: fail open skips the filter, fail closed answers 503
//! (during a body already on its way, the stream is reset instead). A failed VM is dropped;
//! the next stream gets a fresh one. Not yet: http callouts through filters (a filter that
//! pauses for a callout is treated as a failure).

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame};

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use trellis_wasm_host::{Action, Pairs, Stream, Vm};

use crate::config::listener::FailPolicy;
use crate::http::{Outcome, local_reply, route_request};
use crate::wasm::WasmFilter;
use crate::{BoxBody, Runtime};

struct Active {
    filter: Arc<WasmFilter>,
    vm: Vm,
    id: u32,
}

fn request_stream<B>(req: &Request<B>, peer: SocketAddr) -> Stream {
    let authority = crate::http::request_authority(req);
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
    let scheme = req.uri().scheme_str().unwrap_or("http").to_string();
    let mut headers: Pairs = vec![
        (":method".into(), req.method().as_str().as_bytes().to_vec()),
        (":path".into(), path.as_bytes().to_vec()),
        (":authority".into(), authority.as_bytes().to_vec()),
        (":scheme".into(), scheme.as_bytes().to_vec()),
    ];
    for (k, v) in req.headers() {
        if k != header::HOST {
            headers.push((k.as_str().to_string(), v.as_bytes().to_vec()));
        }
    }
    let mut s = Stream { request_headers: headers, ..Default::default() };
    let p = &mut s.properties;
    p.insert("request.path".into(), path.as_bytes().to_vec());
    p.insert("request.url_path".into(), req.uri().path().as_bytes().to_vec());
    p.insert("request.method".into(), req.method().as_str().as_bytes().to_vec());
    p.insert("request.host".into(), authority.into_bytes());
    p.insert("request.scheme".into(), scheme.into_bytes());
    if let Some(id) = req.headers().get("x-request-id") {
        p.insert("request.id".into(), id.as_bytes().to_vec());
    }
    p.insert("source.address".into(), peer.to_string().into_bytes());
    p.insert("source.port".into(), i64::from(peer.port()).to_le_bytes().to_vec());
    s
}

/// Writes the filter's view of the request back into it.
fn apply_request<B>(req: &mut Request<B>, pairs: &Pairs) -> Result<(), String> {
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

fn response_pairs(resp: &Response<BoxBody>) -> Pairs {
    let mut pairs: Pairs = vec![(":status".into(), resp.status().as_str().as_bytes().to_vec())];
    pairs.extend(resp.headers().iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())));
    pairs
}

fn apply_response(resp: &mut Response<BoxBody>, pairs: &Pairs) -> Result<(), String> {
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
    for mut a in active {
        let (vm, id) = (&mut a.vm, a.id);
        let _ = a.filter.call(|| vm.finish_stream(id));
        a.filter.give_back(a.vm);
    }
}

/// The filters of one stream, finished when the last user (the run, a body) lets go.
struct Chain(Vec<Active>);

impl Drop for Chain {
    fn drop(&mut self) {
        done(std::mem::take(&mut self.0));
    }
}

type Shared = Arc<Mutex<Chain>>;

/// Most body bytes a filter may hold back.
const BODY_BUFFER_LIMIT: usize = 1 << 20;

/// A request or response body passed through the filters' body callbacks.
struct FilteredBody {
    inner: BoxBody,
    chain: Shared,
    request: bool,
    /// Per filter: what it asked to see more of.
    buffered: Vec<Vec<u8>>,
    trailers: Option<http::HeaderMap>,
    ended: bool,
}

impl FilteredBody {
    fn new(inner: BoxBody, chain: Shared, request: bool) -> FilteredBody {
        let n = chain.lock().unwrap_or_else(|p| p.into_inner()).0.len();
        FilteredBody { inner, chain, request, buffered: vec![Vec::new(); n], trailers: None, ended: false }
    }

    /// Runs `chunk` through the filters; `None` when a filter holds it back for now.
    fn filter(&mut self, chunk: Bytes, end: bool) -> Result<Option<Bytes>, crate::BoxError> {
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        let n = chain.0.len();
        let order: Vec<usize> = if self.request { (0..n).collect() } else { (0..n).rev().collect() };
        let request = self.request;
        let mut data = chunk.to_vec();
        for i in order {
            let a = &mut chain.0[i];
            let handles = if request { a.vm.handles_bodies().0 } else { a.vm.handles_bodies().1 };
            if !handles {
                continue;
            }
            let buf = &mut self.buffered[i];
            buf.extend_from_slice(&data);
            if buf.len() > BODY_BUFFER_LIMIT {
                let name = &a.filter.config.name;
                return Err(format!("wasm filter {name}: body over the {BODY_BUFFER_LIMIT}-byte buffer limit").into());
            }
            let (filter, vm, id) = (&a.filter, &mut a.vm, a.id);
            if let Some(s) = vm.stream_mut(id) {
                if request {
                    s.request_body = std::mem::take(buf);
                } else {
                    s.response_body = std::mem::take(buf);
                }
            }
            let r = filter.call(|| if request { vm.on_request_body(id, end) } else { vm.on_response_body(id, end) });
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

/// Runs `chain` around the router.
pub async fn run(
    rt: &Arc<Runtime>,
    chain: &[Arc<WasmFilter>],
    listener: &str,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> (Response<BoxBody>, Outcome) {
    let mut active: Vec<Active> = Vec::new();
    for filter in chain {
        let mut vm = match filter.take() {
            Ok(vm) => vm,
            Err(e) if filter.config.policy == FailPolicy::Open => {
                tracing::warn!(filter = %filter.config.name, error = %e, "wasm filter unavailable; failing open");
                continue;
            }
            Err(e) => {
                done(active);
                return failed(filter, &e.to_string(), Outcome::default());
            }
        };
        let result = filter.call(|| {
            let id = vm.create_stream(request_stream(&req, peer))?;
            Ok((id, vm.on_request_headers(id, true)?))
        });
        let (id, action) = match result {
            Ok(r) => r,
            Err(e) => {
                filter.give_back(vm);
                if filter.config.policy == FailPolicy::Open {
                    tracing::warn!(filter = %filter.config.name, error = %e, "wasm filter failed; failing open");
                    continue;
                }
                done(active);
                return failed(filter, &e.to_string(), Outcome::default());
            }
        };
        let stream = vm.stream(id).cloned().unwrap_or_default();
        if let Some(l) = &stream.local_response {
            let resp = local(l);
            let outcome = Outcome { status: resp.status().as_u16(), flags: "-", ..Default::default() };
            active.push(Active { filter: filter.clone(), vm, id });
            done(active);
            return (resp, outcome);
        }
        let paused_without_answer = action == Action::Pause;
        let applied = if paused_without_answer {
            Err("the filter paused the request (http callouts from filters are not supported yet)".to_string())
        } else {
            apply_request(&mut req, &stream.request_headers)
        };
        if let Err(e) = applied {
            let _ = vm.take_callouts();
            let fail_open = filter.config.policy == FailPolicy::Open;
            active.push(Active { filter: filter.clone(), vm, id });
            if fail_open {
                tracing::warn!(filter = %filter.config.name, error = %e, "wasm filter failed; failing open");
                continue;
            }
            done(active);
            return failed(filter, &e, Outcome::default());
        }
        active.push(Active { filter: filter.clone(), vm, id });
    }
    let (request_bodies, response_bodies) = active.iter().fold((false, false), |(q, r), a| {
        let (aq, ar) = a.vm.handles_bodies();
        (q || aq, r || ar)
    });
    let chain: Shared = Arc::new(Mutex::new(Chain(active)));
    let (mut resp, mut outcome) = if request_bodies {
        let (mut parts, body) = req.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let body = FilteredBody::new(crate::boxed(body), chain.clone(), true);
        route_request(rt, listener, peer, Request::from_parts(parts, body)).await
    } else {
        route_request(rt, listener, peer, req).await
    };
    {
        let mut guard = chain.lock().unwrap_or_else(|p| p.into_inner());
        for a in guard.0.iter_mut().rev() {
            if let Some(s) = a.vm.stream_mut(a.id) {
                s.response_headers = response_pairs(&resp);
            }
            let (filter, vm, id) = (&a.filter, &mut a.vm, a.id);
            match filter.call(|| vm.on_response_headers(id, false)) {
                Ok(_) => {
                    let s = a.vm.stream(a.id).cloned().unwrap_or_default();
                    if let Some(l) = &s.local_response {
                        resp = local(l);
                        outcome.status = resp.status().as_u16();
                        continue;
                    }
                    if let Err(e) = apply_response(&mut resp, &s.response_headers)
                        && (a.filter.config.policy != FailPolicy::Open)
                    {
                        let (r, o) = failed(&a.filter, &e, outcome.clone());
                        (resp, outcome) = (r, o);
                    }
                }
                Err(e) if (a.filter.config.policy != FailPolicy::Open) => {
                    let (r, o) = failed(&a.filter, &e.to_string(), outcome.clone());
                    (resp, outcome) = (r, o);
                }
                Err(_) => {}
            }
        }
    }
    if response_bodies {
        let (mut parts, body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        resp = Response::from_parts(parts, crate::boxed(FilteredBody::new(body, chain.clone(), false)));
    }
    // The streams finish when the last body holding the chain is done.
    drop(chain);
    (resp, outcome)
}
