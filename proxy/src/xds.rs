//! The Delta ADS client. Subscribes like Envoy: clusters and listeners by wildcard, then the
//! endpoints and route configurations they name. Every response is converted and checked
//! off the data path; a good one replaces the configuration whole and is ACKed, a bad one is
//! NACKed with the reasons and the proxy keeps serving what it had. When the control plane
//! is unreachable the proxy keeps its last good configuration and reconnects with
//! exponential backoff and jitter, telling the server what it holds
//! (`initial_resource_versions`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::{self, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE, Snapshot};
use crate::{Proxy, Runtime};

/// Largest ADS message accepted (as the control plane's limit).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// What the client holds per type: name → (version, resource).
type Held = BTreeMap<&'static str, BTreeMap<String, (String, Any)>>;

const TYPES: [&str; 5] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE];

/// The SDS secrets trellis-proxy asks for: the mesh trust bundle (Istio's name).
pub const ROOT_CA: &str = "ROOTCA";

fn type_key(t: &str) -> Option<&'static str> {
    TYPES.iter().copied().find(|k| *k == t)
}

/// Status of the xDS connection, for the admin port.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct XdsStatus {
    pub connected: bool,
    pub server: String,
    /// Per type: last accepted nonce count, last error.
    pub accepted: BTreeMap<String, u64>,
    pub rejected: BTreeMap<String, String>,
    pub reconnects: u64,
}

/// Runs the client forever (over TLS when `ca_file`, the CA of the control plane's
/// certificate, is given; `crate::control`).
pub async fn run(proxy: Arc<Proxy>, server: String, ca_file: String, node: Node) {
    let mut held: Held = TYPES.iter().map(|t| (*t, BTreeMap::new())).collect();
    let mut attempt: u32 = 0;
    loop {
        proxy.set_xds(|s| {
            s.connected = false;
            s.server = server.clone();
        });
        match session(&proxy, &server, &ca_file, &node, &mut held, &mut attempt).await {
            Ok(()) => tracing::info!(%server, "xDS stream closed by the server"),
            Err(e) => tracing::warn!(%server, error = %e, "xDS stream failed; serving the last good configuration"),
        }
        proxy.set_xds(|s| s.reconnects += 1);
        attempt = attempt.saturating_add(1);
        // 0.5 s doubling to 30 s, each with ±50% jitter.
        let base = Duration::from_millis(500).saturating_mul(1 << attempt.min(6)).min(Duration::from_secs(30));
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::time::sleep(base.mul_f64(jitter)).await;
    }
}

struct Stream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
}

impl Stream {
    async fn send(&self, req: DeltaDiscoveryRequest) -> Result<(), String> {
        self.tx.send(req).await.map_err(|_| "stream closed".to_string())
    }
}

async fn session(
    proxy: &Arc<Proxy>,
    server: &str,
    ca_file: &str,
    node: &Node,
    held: &mut Held,
    attempt: &mut u32,
) -> Result<(), String> {
    let channel = crate::control::endpoint(server, ca_file)
        .map_err(|e| format!("bad xDS address {server}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to the control plane at {server}: {e}"))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(64);
    let stream = Stream { tx };
    // Subscriptions first (queued), so the server sees them as soon as the stream opens.
    let mut first = true;
    let mut subscribe = |type_url: &str, names: Vec<String>, held: &Held| {
        let initial: HashMap<String, String> = held
            .get(type_url)
            .map(|m| m.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect())
            .unwrap_or_default();
        let req = DeltaDiscoveryRequest {
            node: first.then(|| node.clone()),
            type_url: type_url.to_string(),
            resource_names_subscribe: names,
            initial_resource_versions: initial,
            ..Default::default()
        };
        first = false;
        req
    };
    let current = proxy.runtime.load_full().snapshot.clone();
    let mut eds: BTreeSet<String> = current.eds_names().into_iter().collect();
    let mut rds: BTreeSet<String> = current.rds_names().into_iter().collect();
    let initial = vec![
        subscribe(CLUSTER_TYPE, Vec::new(), held),
        subscribe(LISTENER_TYPE, Vec::new(), held),
        subscribe(ENDPOINT_TYPE, eds.iter().cloned().collect(), held),
        subscribe(ROUTE_TYPE, rds.iter().cloned().collect(), held),
        // The trust bundle; a management server without SDS just never answers it.
        subscribe(SECRET_TYPE, vec![ROOT_CA.to_string()], held),
    ];
    for req in initial {
        if (req.type_url == ENDPOINT_TYPE && eds.is_empty()) || (req.type_url == ROUTE_TYPE && rds.is_empty()) {
            continue;
        }
        stream.send(req).await?;
    }
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("opening the ADS stream: {e}"))?
        .into_inner();
    proxy.set_xds(|s| s.connected = true);
    tracing::info!(%server, "connected to the control plane");
    loop {
        let resp: DeltaDiscoveryResponse = match responses.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("ADS stream error: {e}")),
        };
        *attempt = 0;
        let Some(type_url) = type_key(&resp.type_url) else {
            stream.send(nack(&resp, format!("type {} is not understood by trellis-proxy", resp.type_url))).await?;
            continue;
        };
        // The type's new content.
        let mut next = held[type_url].clone();
        for name in &resp.removed_resources {
            next.remove(name);
        }
        for r in &resp.resources {
            match &r.resource {
                Some(any) => {
                    next.insert(r.name.clone(), (r.version.clone(), any.clone()));
                }
                None => {
                    next.remove(&r.name);
                }
            }
        }
        match proxy.apply(type_url, &next).await {
            Ok(snapshot) => {
                held.insert(type_url, next);
                stream
                    .send(DeltaDiscoveryRequest {
                        type_url: type_url.to_string(),
                        response_nonce: resp.nonce.clone(),
                        ..Default::default()
                    })
                    .await?;
                proxy.set_xds(|s| {
                    *s.accepted.entry(short(type_url)).or_default() += 1;
                    s.rejected.remove(&short(type_url));
                });
                // Follow what clusters and listeners now name.
                let want_eds: BTreeSet<String> = snapshot.eds_names().into_iter().collect();
                let want_rds: BTreeSet<String> = snapshot.rds_names().into_iter().collect();
                for (type_url, have, want) in [(ENDPOINT_TYPE, &mut eds, want_eds), (ROUTE_TYPE, &mut rds, want_rds)] {
                    let add: Vec<String> = want.difference(have).cloned().collect();
                    let remove: Vec<String> = have.difference(&want).cloned().collect();
                    if add.is_empty() && remove.is_empty() {
                        continue;
                    }
                    stream
                        .send(DeltaDiscoveryRequest {
                            type_url: type_url.to_string(),
                            resource_names_subscribe: add,
                            resource_names_unsubscribe: remove.clone(),
                            ..Default::default()
                        })
                        .await?;
                    if let Some(h) = held.get_mut(type_url) {
                        for r in &remove {
                            h.remove(r);
                        }
                    }
                    *have = want;
                }
            }
            Err(e) => {
                tracing::warn!(type_url, error = %e, "rejected configuration (NACK); keeping the previous one");
                proxy.set_xds(|s| {
                    s.rejected.insert(short(type_url), e.clone());
                });
                stream.send(nack(&resp, e)).await?;
            }
        }
    }
}

fn short(type_url: &str) -> String {
    type_url.rsplit('.').next().unwrap_or(type_url).to_string()
}

fn nack(resp: &DeltaDiscoveryResponse, message: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        error_detail: Some(RpcStatus { code: 3, message, details: Vec::new() }),
        ..Default::default()
    }
}

impl Proxy {
    /// Converts a type's new content into a new configuration and, if it is good and its
    /// listeners bind, makes it current. Returns the new snapshot.
    pub async fn apply(
        self: &Arc<Self>,
        type_url: &'static str,
        next: &BTreeMap<String, (String, Any)>,
    ) -> Result<Arc<Snapshot>, String> {
        let _serial = self.apply_lock.lock().await;
        let current = self.runtime.load_full();
        let mut snap = (*current.snapshot).clone();
        let resources: BTreeMap<String, Any> = next.iter().map(|(n, (_, a))| (n.clone(), a.clone())).collect();
        config::apply_type(&mut snap, type_url, &resources)?;
        check_listener_addresses(&snap)?;
        snap.version = current.snapshot.version + 1;
        let snap = Arc::new(snap);
        // Remote modules: fetched unless compiled or cached already (a failed fetch or a wrong
        // sha256 refuses the update; the old chain keeps serving).
        let mut fetched = crate::wasm::Fetched::new();
        for (uri, sha) in crate::wasm::remote_modules(&snap) {
            let host = self.wasm_host()?;
            if host.has_module(&sha) || host.cached_bytes(&sha).is_some() {
                continue;
            }
            let bytes = crate::wasm::fetch(&uri, &sha).await?;
            host.cache_bytes(&sha, &bytes);
            tracing::info!(%uri, sha256 = %sha, size = bytes.len(), "fetched wasm module");
            fetched.insert(sha, Arc::new(bytes));
        }
        // Reading and compiling modules is CPU work: off the (possibly single) worker thread.
        let filters = {
            let (proxy, old, snap) = (self.clone(), current.filters.clone(), snap.clone());
            tokio::task::spawn_blocking(move || {
                crate::wasm::rebuild(|| proxy.wasm_host(), &old, &snap, &fetched, &proxy.metrics.wasm)
            })
            .await
            .map_err(|e| format!("building wasm filters: {e}"))??
        };
        // New filters get a ticker for their root contexts (old ones' end with them).
        for f in filters.values().flatten() {
            if !current.filters.values().flatten().any(|o| Arc::ptr_eq(o, f)) {
                crate::wasm::spawn_ticker(f, Arc::downgrade(self));
            }
        }
        let mut listeners = self.listeners.lock().await;
        let prepared = listeners.prepare(&snap).await?;
        self.mesh.set_bundles(&snap.trust_bundles);
        let clusters = crate::upstream::rebuild(&current.clusters, &snap, &self.mesh);
        let tls_servers = crate::tls::servers(&current.tls_servers, &current.snapshot, &snap, &self.mesh)?;
        self.runtime.store(Arc::new(Runtime { snapshot: snap.clone(), clusters, filters, tls_servers }));
        listeners.commit(self, prepared);
        self.mark_received(type_url);
        Ok(snap)
    }
}

fn check_listener_addresses(snap: &Snapshot) -> Result<(), String> {
    let mut seen: BTreeMap<std::net::SocketAddr, &str> = BTreeMap::new();
    for (name, l) in &snap.listeners {
        if let Some(other) = seen.insert(l.address, name) {
            return Err(format!("listeners {other} and {name} both bind {}", l.address));
        }
    }
    Ok(())
}
