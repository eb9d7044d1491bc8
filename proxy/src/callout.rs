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

/// Performs an http callout; gRPC callouts are not supported here (answered as failed).
pub async fn perform(rt: Arc<Runtime>, call: Callout) -> Answer {
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
            perform(rt, call).await;
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
