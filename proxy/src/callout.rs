//! Calls filters make — `proxy_http_call`, `proxy_grpc_call`, `proxy_grpc_stream` — sent to a
//! cluster by name through the same upstream pools, load balancers and circuit breakers as
//! routed requests. Every answer (an http call's response; a gRPC call's message or failure; a
//! gRPC stream's initial metadata, each message as it arrives, its trailing metadata and close)
//! is delivered to the VM context that made the call while that context exists — the root
//! context, or a stream's whether or not it paused — as Envoy does. A call whose stream ended
//! still runs to its end (a mirror's shadow request) with nobody told; the gRPC streams of a
//! finished stream context are reset.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use trellis_wasm_host::{Callout, GrpcOp, Pairs, Vm};

use crate::wasm::{VmSlot, WasmFilter};
use crate::{BoxBody, Runtime};

/// Most response body bytes a call's answer keeps (and most bytes of one gRPC message).
const MAX_BODY: usize = 4 << 20;

/// The answer: (headers with `:status`, body, trailers); `None` when the call failed.
pub type Answer = Option<(Pairs, Vec<u8>, Pairs)>;

/// A call's answer, or one part of a gRPC stream's, to deliver to the filter.
#[derive(Debug)]
pub enum Delivery {
    Http(Answer),
    GrpcInitialMetadata(Pairs),
    /// A unary call's answer (its end: no close follows a call that succeeded), or one of a
    /// stream's messages.
    GrpcMessage(Vec<u8>),
    GrpcTrailingMetadata(Pairs),
    /// The end of a call that failed or of a stream: grpc-status and grpc-message.
    GrpcClose(u32, String),
}

impl Delivery {
    /// Hands the answer to the filter's context that made the call (nothing happens when
    /// that context is gone or cancelled the call).
    pub fn deliver(self, vm: &mut Vm, context: u32, token: u32) -> Result<(), trellis_wasm_host::VmError> {
        match self {
            Delivery::Http(a) => vm.on_http_call_response(context, token, a),
            Delivery::GrpcInitialMetadata(m) => vm.on_grpc_initial_metadata(token, m),
            Delivery::GrpcMessage(m) => vm.on_grpc_message(token, m),
            Delivery::GrpcTrailingMetadata(m) => vm.on_grpc_trailing_metadata(token, m),
            Delivery::GrpcClose(status, message) => vm.on_grpc_close(token, status, message),
        }
    }
}

/// The calls of one VM in flight: where the messages of its open gRPC streams go, how many
/// calls each context has out, and a wake-up for the streams waiting on answers.
#[derive(Debug, Default)]
pub struct Calls {
    streams: Mutex<HashMap<u32, mpsc::UnboundedSender<GrpcOp>>>,
    in_flight: Mutex<HashMap<u32, usize>>,
    /// Notified after every answer delivered to the VM.
    pub answered: tokio::sync::Notify,
}

impl Calls {
    /// Calls context `context` has in flight.
    pub fn in_flight(&self, context: u32) -> usize {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).get(&context).copied().unwrap_or(0)
    }

    fn count(&self, context: u32, up: bool) {
        let mut m = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(context).or_default();
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
        if *n == 0 {
            m.remove(&context);
        }
    }

    /// Hands what the VM's filters asked of their gRPC streams to those streams; a stream no
    /// longer open in the VM (cancelled, its context gone) loses its sender and is reset.
    pub fn route_grpc_ops(&self, vm: &mut Vm) {
        let (ops, ended) = (vm.take_grpc_ops(), vm.take_grpc_ended());
        if ops.is_empty() && ended.is_empty() {
            return;
        }
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        for (token, op) in ops {
            if let Some(tx) = streams.get(&token) {
                let _ = tx.send(op);
            }
        }
        for token in ended {
            streams.remove(&token);
        }
    }
}

/// Starts the calls context `context` of the VM in `slot` made (the VM is locked by the
/// caller) and passes on what its filters asked of open gRPC streams. Call it after every
/// callback that may have made calls.
pub fn start(rt: &Arc<Runtime>, filter: &Arc<WasmFilter>, slot: &Arc<VmSlot>, vm: &mut Vm, context: u32) {
    for call in vm.take_callouts_for(context) {
        let ops = match &call {
            Callout::Grpc { stream: true, token, .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                slot.calls.streams.lock().unwrap_or_else(|p| p.into_inner()).insert(*token, tx);
                Some(rx)
            }
            _ => None,
        };
        spawn_call(rt.clone(), filter.clone(), slot.clone(), context, call, ops);
    }
    slot.calls.route_grpc_ops(vm);
}

fn spawn_call(
    rt: Arc<Runtime>,
    filter: Arc<WasmFilter>,
    slot: Arc<VmSlot>,
    context: u32,
    call: Callout,
    ops: Option<mpsc::UnboundedReceiver<GrpcOp>>,
) {
    let token = call.token();
    slot.calls.count(context, true);
    tokio::spawn(async move {
        // Delivers to the VM, starts what the filter does in answer, wakes waiting streams;
        // false once nothing more is wanted.
        let deliver = |d: Delivery| -> bool {
            let wanted = {
                let mut vm = slot.lock();
                let ok = filter.call(|| d.deliver(&mut vm, context, token)).is_ok();
                start(&rt, &filter, &slot, &mut vm, context);
                ok && vm.grpc_wanted(token)
            };
            slot.calls.answered.notify_waiters();
            wanted
        };
        match call {
            Callout::Http { .. } => {
                deliver(Delivery::Http(http_call(&rt, call).await));
            }
            Callout::Grpc { upstream, service, method, metadata, message, timeout_ms, stream, .. } => {
                let (cluster, authority) = grpc_target(&upstream);
                let headers = grpc_headers(&authority, &service, &method, metadata);
                match ops {
                    Some(ops) if stream => grpc_stream(&rt, &cluster, headers, ops, &deliver).await,
                    _ => {
                        let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
                        let answer = match tokio::time::timeout(timeout, grpc(&rt, &cluster, headers, message)).await {
                            Ok(Ok((0, _, Some(body)))) => Delivery::GrpcMessage(body),
                            // OK without a message is a failure (INTERNAL), as in Envoy.
                            Ok(Ok((0, _, None))) => Delivery::GrpcClose(13, "no response message".into()),
                            Ok(Ok((status, msg, _))) => Delivery::GrpcClose(status, msg),
                            // UNAVAILABLE, as Envoy answers a call that could not be made.
                            Ok(Err(e)) => Delivery::GrpcClose(14, e),
                            Err(_) => Delivery::GrpcClose(4, "deadline exceeded".into()),
                        };
                        deliver(answer);
                    }
                }
            }
        }
        slot.calls.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(&token);
        slot.calls.count(context, false);
        slot.calls.answered.notify_waiters();
    });
}

/// The cluster and `:authority` of a gRPC call: the upstream is a cluster name, or (as Envoy
/// accepts too) a serialized `envoy.config.core.v3.GrpcService` with `envoy_grpc`.
fn grpc_target(upstream: &str) -> (String, String) {
    use envoy_types::pb::envoy::config::core::v3::{GrpcService, grpc_service};
    use prost::Message;
    if upstream.starts_with('\n')
        && let Ok(g) = GrpcService::decode(upstream.as_bytes())
        && let Some(grpc_service::TargetSpecifier::EnvoyGrpc(e)) = g.target_specifier
    {
        let authority = if e.authority.is_empty() { e.cluster_name.clone() } else { e.authority };
        return (e.cluster_name, authority);
    }
    (upstream.to_string(), upstream.to_string())
}

/// The request headers of a gRPC call or stream.
fn grpc_headers(authority: &str, service: &str, method: &str, metadata: Pairs) -> Pairs {
    let mut headers: Pairs = vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), format!("/{service}/{method}").into_bytes()),
        // Envoy's default is the cluster name; `|` is not allowed in a URI authority.
        (":authority".into(), authority.replace('|', "_").into_bytes()),
        ("content-type".into(), b"application/grpc".to_vec()),
        ("te".into(), b"trailers".to_vec()),
    ];
    headers.extend(metadata);
    headers
}

/// A gRPC message with its length prefix (not compressed).
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// The first whole gRPC message at the front of `buf`, taken off it.
fn next_message(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    if buf.len() < 5 {
        return None;
    }
    let n = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + n {
        return None;
    }
    let message = buf[5..5 + n].to_vec();
    buf.drain(..5 + n);
    Some(message)
}

fn value(pairs: &Pairs, name: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// grpc-status and grpc-message from trailers (or the headers of a trailers-only answer);
/// without a grpc-status, the HTTP status says it (the gRPC spec's mapping, as Envoy does).
fn grpc_status(headers: &Pairs, trailers: &Pairs) -> (u32, String) {
    let status = value(trailers, "grpc-status").or_else(|| value(headers, "grpc-status"));
    let http: u16 = value(headers, ":status").and_then(|s| s.parse().ok()).unwrap_or(0);
    let status = status.and_then(|s| s.trim().parse::<u32>().ok()).unwrap_or(match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    });
    let message = value(trailers, "grpc-message").or_else(|| value(headers, "grpc-message")).unwrap_or_default();
    (status, message)
}

/// A unary gRPC call to a cluster (HTTP/2): the request message framed, the response's
/// first message and its grpc-status / grpc-message.
async fn grpc(
    rt: &Runtime,
    cluster_name: &str,
    headers: Pairs,
    message: Vec<u8>,
) -> Result<(u32, String, Option<Vec<u8>>), String> {
    let (resp_headers, mut body, trailers) = send(rt, cluster_name, headers, grpc_frame(&message)).await?;
    let (status, message) = grpc_status(&resp_headers, &trailers);
    Ok((status, message, next_message(&mut body)))
}

/// A gRPC stream to a cluster (HTTP/2), for as long as the filter keeps it: the filter's
/// messages and half-close (`ops`) go out as they come; the answer's initial metadata, each
/// message, the trailing metadata and the close are delivered as they arrive. The filter
/// cancelling it (`ops` closed) resets it with nothing more delivered.
async fn grpc_stream(
    rt: &Runtime,
    cluster_name: &str,
    headers: Pairs,
    mut ops: mpsc::UnboundedReceiver<GrpcOp>,
    deliver: &impl Fn(Delivery) -> bool,
) {
    let (tx, rx) = mpsc::unbounded_channel::<Result<Frame<Bytes>, Infallible>>();
    let body = crate::boxed(StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)));
    let mut out = Some(tx);
    // The filter's messages and half-close go to the request body; false once it cancelled.
    let forward = |op: Option<GrpcOp>, out: &mut Option<mpsc::UnboundedSender<_>>| -> bool {
        match op {
            None => return false,
            Some(GrpcOp::Send { message, end_stream }) => {
                if let Some(tx) = out {
                    let _ = tx.send(Ok(Frame::data(Bytes::from(grpc_frame(&message)))));
                }
                if end_stream {
                    *out = None;
                }
            }
            Some(GrpcOp::Close) => *out = None,
        }
        true
    };
    let opened = open(rt, cluster_name, &headers, body);
    tokio::pin!(opened);
    // The server may wait for a message before it answers: messages go out meanwhile.
    let opened = loop {
        tokio::select! {
            r = &mut opened => break r,
            op = ops.recv() => if !forward(op, &mut out) { return },
        }
    };
    let (resp, _guard) = match opened {
        Ok(r) => r,
        Err(e) => {
            deliver(Delivery::GrpcClose(14, e));
            return;
        }
    };
    let (parts, mut body) = resp.into_parts();
    let headers = pairs(&parts.status, &parts.headers);
    // A trailers-only answer: its headers end the stream (or carry the status).
    let trailers_only = hyper::body::Body::is_end_stream(&body) || value(&headers, "grpc-status").is_some();
    if !deliver(Delivery::GrpcInitialMetadata(if trailers_only { Vec::new() } else { headers.clone() })) {
        return;
    }
    if trailers_only || parts.status != http::StatusCode::OK {
        let (status, message) = grpc_status(&headers, &Vec::new());
        if deliver(Delivery::GrpcTrailingMetadata(headers)) {
            deliver(Delivery::GrpcClose(status, message));
        }
        return;
    }
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        buf.extend_from_slice(&data);
                        while let Some(m) = next_message(&mut buf) {
                            if !deliver(Delivery::GrpcMessage(m)) {
                                return;
                            }
                        }
                        if buf.len() > MAX_BODY {
                            deliver(Delivery::GrpcClose(8, "a message over 4 MiB".into()));
                            return;
                        }
                    }
                    Err(frame) => {
                        let trailers = frame.into_trailers().map(|t| pairs_of(&t)).unwrap_or_default();
                        let (status, message) = grpc_status(&headers, &trailers);
                        if deliver(Delivery::GrpcTrailingMetadata(trailers)) {
                            deliver(Delivery::GrpcClose(status, message));
                        }
                        return;
                    }
                },
                Some(Err(e)) => {
                    deliver(Delivery::GrpcClose(13, format!("stream reset: {e}")));
                    return;
                }
                None => {
                    deliver(Delivery::GrpcClose(13, "the stream ended without trailers".into()));
                    return;
                }
            },
            op = ops.recv() => if !forward(op, &mut out) { return },
        }
    }
}

fn pairs_of(headers: &http::HeaderMap) -> Pairs {
    headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect()
}

/// `:status` and the headers of an answer.
fn pairs(status: &http::StatusCode, headers: &http::HeaderMap) -> Pairs {
    let mut pairs: Pairs = vec![(":status".into(), status.as_str().as_bytes().to_vec())];
    pairs.extend(pairs_of(headers));
    pairs
}

/// Performs an http callout.
async fn http_call(rt: &Runtime, call: Callout) -> Answer {
    let Callout::Http { upstream, headers, body, timeout_ms, .. } = call else { return None };
    let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
    match tokio::time::timeout(timeout, send(rt, &upstream, headers, body)).await {
        Ok(Ok(answer)) => Some(answer),
        Ok(Err(e)) => {
            tracing::debug!(cluster = %upstream, error = %e, "filter http call failed");
            None
        }
        Err(_) => {
            tracing::debug!(cluster = %upstream, "filter http call timed out");
            None
        }
    }
}

/// Sends a request to a cluster and collects the answer.
async fn send(
    rt: &Runtime,
    cluster_name: &str,
    headers: Pairs,
    body: Vec<u8>,
) -> Result<(Pairs, Vec<u8>, Pairs), String> {
    let (resp, _guard) = open(rt, cluster_name, &headers, crate::boxed(Full::new(Bytes::from(body)))).await?;
    let (parts, mut body) = resp.into_parts();
    let (mut data, mut trailers): (Vec<u8>, Pairs) = (Vec::new(), Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        match frame.into_data() {
            Ok(chunk) if data.len() + chunk.len() > MAX_BODY => return Err("the answer's body is over 4 MiB".into()),
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = pairs_of(&t);
                }
            }
        }
    }
    Ok((pairs(&parts.status, &parts.headers), data, trailers))
}

/// Sends a request to a cluster (one of its hosts, through its pool and circuit breaker);
/// the answer's headers, its body to read, and the request's slot in the circuit breaker.
async fn open(
    rt: &Runtime,
    cluster_name: &str,
    headers: &Pairs,
    body: BoxBody,
) -> Result<(Response<BoxBody>, crate::upstream::RequestGuard), String> {
    let cluster = rt.clusters.get(cluster_name).cloned().ok_or_else(|| format!("no cluster {cluster_name}"))?;
    let guard = cluster.start_request().map_err(|_| "upstream overflow".to_string())?;
    let host = cluster.pick(None).ok_or("no healthy upstream")?;
    let pseudo = |name: &str| value(headers, name);
    let method = pseudo(":method").unwrap_or_else(|| "GET".into());
    let path = pseudo(":path").unwrap_or_else(|| "/".into());
    let authority = pseudo(":authority").ok_or("the call has no :authority")?;
    let http2 = cluster.config.http2;
    let uri: Uri = if http2 { format!("http://{authority}{path}").parse() } else { path.parse() }
        .map_err(|_| format!("bad :path {path:?} or :authority {authority:?}"))?;
    let mut req = Request::builder()
        .method(method.as_str())
        .uri(uri)
        .version(if http2 { Version::HTTP_2 } else { Version::HTTP_11 })
        .body(body)
        .map_err(|e| e.to_string())?;
    for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with(':')) {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
            req.headers_mut().append(n, v);
        }
    }
    if !http2 {
        req.headers_mut().insert(header::HOST, HeaderValue::from_str(&authority).map_err(|e| e.to_string())?);
    }
    let conn = crate::upstream::pool::acquire(&cluster, &host).await.map_err(|e| e.to_string())?;
    match crate::upstream::pool::send(conn, req).await {
        Ok(r) => {
            cluster.record(&host, Some(r.status().as_u16()));
            Ok((r, guard))
        }
        Err(e) => {
            cluster.record(&host, None);
            Err(e.to_string())
        }
    }
}
