//! HTTP calls filters make (`proxy_http_call`): sent to a cluster by name through the same
//! upstream pools, load balancers and circuit breakers as routed requests. A call waited for
//! (the filter paused its stream) has its answer delivered to `proxy_on_http_call_response`;
//! a call made by a filter that did not pause (a mirror's shadow request) is fire and forget.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Uri, Version};
use http_body_util::{BodyExt, Full};
use trellis_wasm_host::{Callout, Pairs};

use crate::Runtime;

/// Most response body bytes a call's answer keeps.
const MAX_BODY: usize = 4 << 20;

/// The answer: (headers with `:status`, body, trailers); `None` when the call failed.
pub type Answer = Option<(Pairs, Vec<u8>, Pairs)>;

/// A call's answer, to deliver to the filter.
#[derive(Debug)]
pub enum Delivery {
    Http(Answer),
    /// (grpc-status, grpc-message, the response message if one came).
    Grpc(u32, String, Option<Vec<u8>>),
}

impl Delivery {
    /// Hands the answer to the filter's context that made the call.
    pub fn deliver(
        self,
        vm: &mut trellis_wasm_host::Vm,
        context: u32,
        token: u32,
    ) -> Result<(), trellis_wasm_host::VmError> {
        match self {
            Delivery::Http(a) => vm.on_http_call_response(context, token, a),
            Delivery::Grpc(status, message, body) => vm.on_grpc_response(context, token, status, message, body),
        }
    }
}

/// Performs a call of either kind.
pub async fn perform_any(rt: Arc<Runtime>, call: Callout) -> Delivery {
    match call {
        Callout::Http { .. } => Delivery::Http(http_call(rt, call).await),
        Callout::Grpc { upstream, service, method, metadata, message, timeout_ms, .. } => {
            let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
            let (cluster, authority) = grpc_target(&upstream);
            let call = grpc(&rt, &cluster, &authority, &service, &method, metadata, message);
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok((status, msg, body))) => Delivery::Grpc(status, msg, body),
                // UNAVAILABLE, as Envoy answers a call that could not be made.
                Ok(Err(e)) => Delivery::Grpc(14, e, None),
                Err(_) => Delivery::Grpc(4, "deadline exceeded".into(), None),
            }
        }
    }
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

/// A unary gRPC call to a cluster (HTTP/2): the request message framed, the response's
/// first message and its grpc-status / grpc-message (from the trailers, or the headers of a
/// trailers-only answer).
async fn grpc(
    rt: &Runtime,
    cluster_name: &str,
    authority: &str,
    service: &str,
    method: &str,
    metadata: Pairs,
    message: Vec<u8>,
) -> Result<(u32, String, Option<Vec<u8>>), String> {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut headers: Pairs = vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), format!("/{service}/{method}").into_bytes()),
        // Envoy's default is the cluster name; `|` is not allowed in a URI authority.
        (":authority".into(), authority.replace('|', "_").into_bytes()),
        ("content-type".into(), b"application/grpc".to_vec()),
        ("te".into(), b"trailers".to_vec()),
    ];
    headers.extend(metadata);
    let (resp_headers, body, trailers) = send(rt, cluster_name, headers, framed).await?;
    let get = |pairs: &Pairs, name: &str| {
        pairs.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let status = get(&trailers, "grpc-status").or_else(|| get(&resp_headers, "grpc-status"));
    let http: u16 = get(&resp_headers, ":status").and_then(|s| s.parse().ok()).unwrap_or(0);
    // Without a grpc-status, the HTTP status says it (the gRPC spec's mapping, as Envoy does).
    let status = status.and_then(|s| s.trim().parse::<u32>().ok()).unwrap_or(match http {
        200 => 2,
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    });
    let message = get(&trailers, "grpc-message").or_else(|| get(&resp_headers, "grpc-message")).unwrap_or_default();
    let reply = (body.len() >= 5).then(|| {
        let n = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body[5..(5 + n).min(body.len())].to_vec()
    });
    Ok((status, message, reply))
}

/// Performs an http callout (a gRPC one answers `None`; see [`perform_any`]).
async fn http_call(rt: Arc<Runtime>, call: Callout) -> Answer {
    let Callout::Http { upstream, headers, body, timeout_ms, .. } = call else { return None };
    let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
    match tokio::time::timeout(timeout, send(&rt, &upstream, headers, body)).await {
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

/// Sends calls nobody waits for.
pub fn detach(rt: &Arc<Runtime>, calls: Vec<Callout>) {
    for call in calls {
        let rt = rt.clone();
        tokio::spawn(async move {
            perform_any(rt, call).await;
        });
    }
}

async fn send(
    rt: &Runtime,
    cluster_name: &str,
    headers: Pairs,
    body: Vec<u8>,
) -> Result<(Pairs, Vec<u8>, Pairs), String> {
    let cluster = rt.clusters.get(cluster_name).cloned().ok_or_else(|| format!("no cluster {cluster_name}"))?;
    let _guard = cluster.start_request().map_err(|_| "upstream overflow".to_string())?;
    let host = cluster.pick(None).ok_or("no healthy upstream")?;
    let pseudo =
        |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
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
        .body(crate::boxed(Full::new(Bytes::from(body))))
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
    let resp = match crate::upstream::pool::send(conn, req).await {
        Ok(r) => r,
        Err(e) => {
            cluster.record(&host, None);
            return Err(e.to_string());
        }
    };
    cluster.record(&host, Some(resp.status().as_u16()));
    let (parts, body) = resp.into_parts();
    let mut pairs: Pairs = vec![(":status".into(), parts.status.as_str().as_bytes().to_vec())];
    pairs.extend(parts.headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())));
    let (mut data, mut trailers): (Vec<u8>, Pairs) = (Vec::new(), Vec::new());
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        match frame.into_data() {
            Ok(chunk) if data.len() + chunk.len() > MAX_BODY => return Err("the answer's body is over 4 MiB".into()),
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = t.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect();
                }
            }
        }
    }
    Ok((pairs, data, trailers))
}
