//! Running a listener's wasm filter chain around the router: each filter, in order, sees the
//! request headers (and may change them, or answer locally); the router forwards; each filter,
//! in reverse order, sees the response headers. The headers a filter sees are the request's
//! own, with Envoy's pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`), and the
//! standard properties `request.*` and `source.*` in Envoy's encodings.
//!
//! Failures follow the filter's policy: fail open skips the filter, fail closed answers 503.
//! A failed VM is dropped; the next stream gets a fresh one. Not yet: bodies and http
//! callouts through filters (a filter that pauses for a callout is treated as a failure).

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
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(String::from))
        .unwrap_or_default();
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
    let (mut resp, mut outcome) = route_request(rt, listener, peer, req).await;
    for a in active.iter_mut().rev() {
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
    done(active);
    (resp, outcome)
}
