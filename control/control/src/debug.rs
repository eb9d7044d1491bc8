//! The debug port (15014 by default, loopback): `/debug/syncz` — per-proxy, per-type xDS sync
//! status like `istioctl proxy-status` — and `/healthz`. No token: keep it on loopback.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::routing::get;
use serde_json::{Value, json};
use trellis_xds::Hub;
use trellis_xds::hub::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

fn short(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER_TYPE => "CDS",
        ENDPOINT_TYPE => "EDS",
        LISTENER_TYPE => "LDS",
        ROUTE_TYPE => "RDS",
        _ => "other",
    }
}

/// Sync status of every connected proxy as JSON.
pub fn proxy_status_json(hub: &Hub) -> Value {
    let proxies: Vec<Value> = hub
        .proxy_status()
        .into_iter()
        .map(|p| {
            let types: serde_json::Map<String, Value> = p
                .types
                .iter()
                .map(|(t, s)| {
                    let state = match (&s.nack, s.sent.is_empty()) {
                        (Some(_), _) => "NACK",
                        (None, true) => "NOT SENT",
                        (None, false) if s.acked == s.sent => "SYNCED",
                        _ => "STALE",
                    };
                    (short(t).to_string(), json!({"state": state, "sent": s.sent, "acked": s.acked, "nonce": s.sent_nonce, "sentResources": s.sent_resources, "error": s.nack}))
                })
                .collect();
            let since = p.connected_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            json!({"id": p.id, "namespace": p.namespace, "protocol": p.protocol, "connectedAtUnix": since, "types": types})
        })
        .collect();
    json!({"proxies": proxies})
}

pub fn router(hub: Arc<Hub>) -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" })).route(
        "/debug/syncz",
        get(move || {
            let hub = hub.clone();
            async move { axum::Json(proxy_status_json(&hub)) }
        }),
    )
}
