//! The ADS server: `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources` (incremental), both generic over resource type.
//!
//! Each stream is one task. It learns the proxy from the first request's node, registers its
//! workload, and from then on answers requests and follows the hub's state: after every change
//! it re-translates (cached per proxy identity) and sends only what changed for this proxy —
//! in Delta, only the changed and removed resources; in SotW, only the types whose content
//! changed. Pushes go in order: clusters, endpoints, listeners, routes. ACKs and NACKs are
//! recorded per type (a NACK keeps the proxy's last accepted state; the error is kept for
//! proxy-status).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::hub::{Hub, PUSH_ORDER, Resources, View, is_wildcard_type};
use crate::proxy::ProxyInfo;

/// gRPC message size limit for ADS, both ways.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The ADS service over a hub.
#[derive(Debug, Clone)]
pub struct AdsServer {
    hub: Arc<Hub>,
}

impl AdsServer {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    /// The tonic service, with explicit message limits.
    pub fn service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The version of a set of resources: a digest of their names and versions, so a proxy that
/// holds exactly these resources reports the same version (used for SotW `version_info` and
/// for comparing sent and acknowledged state in proxy-status).
fn digest<'a>(items: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut h = Sha256::new();
    for (name, version) in items {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(version.as_bytes());
        h.update([0]);
    }
    h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn set_version(resources: &View<'_>, names: &[String]) -> String {
    digest(names.iter().filter_map(|n| resources.get(n).map(|r| (n.as_str(), r.version.as_str()))))
}

/// Reads the first request and identifies the proxy from its node (only the first request of a
/// stream must carry it).
async fn first_request<Req>(
    inbound: &mut Streaming<Req>,
    node: impl Fn(&Req) -> Option<envoy_types::pb::envoy::config::core::v3::Node>,
) -> Result<(Req, ProxyInfo), Status> {
    let first =
        inbound.message().await?.ok_or_else(|| Status::invalid_argument("stream closed before the first request"))?;
    let node =
        node(&first).ok_or_else(|| Status::invalid_argument("the first request of a stream must carry the node"))?;
    let proxy = ProxyInfo::from_node(&node).map_err(Status::invalid_argument)?;
    Ok((first, proxy))
}

// === impl state of the world ===

#[derive(Default)]
struct SotwType {
    /// Names asked for; empty with `wildcard` = everything.
    names: BTreeSet<String>,
    wildcard: bool,
    /// Version of the content last sent (to skip unchanged pushes).
    sent_version: Option<String>,
    nonce: String,
    requested: bool,
}

struct Sotw {
    hub: Arc<Hub>,
    proxy: ProxyInfo,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    types: BTreeMap<&'static str, SotwType>,
    nonce: u64,
}

impl Sotw {
    fn type_key(type_url: &str) -> Option<&'static str> {
        PUSH_ORDER.iter().copied().find(|t| *t == type_url)
    }

    /// Sends `type_url` if its content for this proxy differs from what was last sent (or
    /// `force`). Returns false if the stream is gone.
    async fn push(&mut self, type_url: &'static str, resources: &Resources, force: bool) -> bool {
        let Some(st) = self.types.get_mut(type_url) else { return true };
        if !st.requested {
            return true;
        }
        let all = resources.view(type_url);
        let names: Vec<String> = if st.wildcard {
            all.keys().into_iter().cloned().collect()
        } else {
            st.names.iter().filter(|n| all.contains_key(n)).cloned().collect()
        };
        let version = set_version(&all, &names);
        if !force && st.sent_version.as_deref() == Some(version.as_str()) {
            return true;
        }
        self.nonce += 1;
        st.nonce = self.nonce.to_string();
        st.sent_version = Some(version.clone());
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources: names.iter().filter_map(|n| all.get(n)).map(|r| r.any.clone()).collect(),
            type_url: type_url.to_string(),
            nonce: st.nonce.clone(),
            ..Default::default()
        };
        let count = response.resources.len();
        let nonce = st.nonce.clone();
        self.hub.update_status(&self.proxy.id, type_url, |s| {
            s.sent = version;
            s.sent_nonce = nonce;
            s.sent_resources = count;
        });
        self.tx.send(Ok(response)).await.is_ok()
    }

    async fn on_request(&mut self, req: DiscoveryRequest, resources: &Resources) -> bool {
        let Some(type_url) = Self::type_key(&req.type_url) else {
            tracing::debug!(proxy = %self.proxy.id, type_url = %req.type_url, "request for a type Trellis does not serve");
            return true;
        };
        let st = self.types.entry(type_url).or_default();
        if !req.response_nonce.is_empty() {
            if req.response_nonce != st.nonce {
                // An answer to an older response: superseded, ignore.
                return true;
            }
            let acked = req.error_detail.is_none();
            let error = req.error_detail.as_ref().map(|e| e.message.clone());
            let version = req.version_info.clone();
            if let Some(msg) = &error {
                tracing::warn!(proxy = %self.proxy.id, type_url, error = %msg, "proxy rejected configuration (NACK)");
            }
            self.hub.update_status(&self.proxy.id, type_url, |s| {
                if acked {
                    s.acked = version;
                    s.nack = None;
                } else {
                    s.nack = error;
                }
            });
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let wildcard = is_wildcard_type(type_url) && (names.is_empty() || names.contains("*"));
        let changed = !st.requested || names != st.names || wildcard != st.wildcard;
        st.requested = true;
        st.names = names;
        st.wildcard = wildcard;
        // A new or changed subscription gets an answer even if nothing changed (Envoy waits
        // for one); an ACK or NACK of the current content gets none.
        if changed { self.push(type_url, resources, req.response_nonce.is_empty()).await } else { true }
    }
}

// === impl incremental ===

#[derive(Default)]
struct DeltaType {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Versions the proxy has (as acknowledged or declared at connect).
    known: BTreeMap<String, String>,
    /// Sent but not yet acknowledged, by nonce: name → version (None = removed).
    pending: BTreeMap<u64, (String, BTreeMap<String, Option<String>>)>,
    subscribed: bool,
}

struct Delta {
    hub: Arc<Hub>,
    proxy: ProxyInfo,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    types: BTreeMap<&'static str, DeltaType>,
    nonce: u64,
}

impl Delta {
    /// Sends what changed for `type_url` compared to what the proxy has (plus what is in
    /// flight): new and changed resources, and removed names.
    async fn push(&mut self, type_url: &'static str, resources: &Resources, force: bool) -> bool {
        let Some(st) = self.types.get_mut(type_url) else { return true };
        if !st.subscribed {
            return true;
        }
        let all = resources.view(type_url);
        // What the proxy will have once everything in flight is applied: what it holds,
        // overlaid with the responses not yet acknowledged (newest last).
        let expected = |n: &str| -> Option<&String> {
            for (_, changes) in st.pending.values().rev() {
                if let Some(v) = changes.get(n) {
                    return v.as_ref();
                }
            }
            st.known.get(n)
        };
        // Changed or new resources among those the proxy subscribes to. No per-push copies of
        // the resource set: this runs for every connected proxy on every change.
        let mut changes: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut out = Vec::new();
        let mut consider = |n: &String, r: &crate::hub::Encoded| {
            if expected(n) != Some(&r.version) {
                out.push(Resource {
                    name: n.clone(),
                    version: r.version.clone(),
                    resource: Some(r.any.clone()),
                    ..Default::default()
                });
                changes.insert(n.clone(), Some(r.version.clone()));
            }
        };
        if st.wildcard {
            for (n, r) in all.iter() {
                consider(n, r);
            }
        } else {
            for n in &st.names {
                if let Some(r) = all.get(n) {
                    consider(n, r);
                }
            }
        }
        // Subscribed resources the proxy holds that no longer exist.
        let mut removed: BTreeSet<String> = BTreeSet::new();
        for n in st.known.keys().chain(st.pending.values().flat_map(|(_, c)| c.keys())) {
            if expected(n).is_some() && (st.wildcard || st.names.contains(n)) && !all.contains_key(n) {
                removed.insert(n.clone());
            }
        }
        let removed: Vec<String> = removed.into_iter().collect();
        for n in &removed {
            changes.insert(n.clone(), None);
        }
        // Nothing changed: no response, except to a first subscription, which the proxy waits
        // for (an empty answer says "there is nothing").
        if out.is_empty() && removed.is_empty() && !force {
            return true;
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = resources.type_version(type_url);
        st.pending.insert(self.nonce, (version.clone(), changes));
        let count = out.len();
        self.hub.update_status(&self.proxy.id, type_url, |s| {
            s.sent = version.clone();
            s.sent_nonce = nonce.clone();
            s.sent_resources = count;
        });
        let response = DeltaDiscoveryResponse {
            system_version_info: version,
            resources: out,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.is_ok()
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest, resources: &Resources) -> bool {
        let Some(type_url) = PUSH_ORDER.iter().copied().find(|t| *t == req.type_url) else {
            tracing::debug!(proxy = %self.proxy.id, type_url = %req.type_url, "delta request for a type Trellis does not serve");
            return true;
        };
        let first = !self.types.contains_key(type_url);
        let st = self.types.entry(type_url).or_default();
        if !req.response_nonce.is_empty() {
            let Some((version, changes)) = req.response_nonce.parse::<u64>().ok().and_then(|n| st.pending.remove(&n))
            else {
                return true;
            };
            match &req.error_detail {
                None => {
                    for (n, v) in changes {
                        match v {
                            Some(v) => st.known.insert(n, v),
                            None => st.known.remove(&n),
                        };
                    }
                    self.hub.update_status(&self.proxy.id, type_url, |s| {
                        s.acked = version;
                        s.nack = None;
                    });
                }
                Some(e) => {
                    tracing::warn!(proxy = %self.proxy.id, type_url, error = %e.message, "proxy rejected configuration (NACK)");
                    let msg = e.message.clone();
                    self.hub.update_status(&self.proxy.id, type_url, |s| s.nack = Some(msg));
                }
            }
        }
        if first {
            // On (re)connect the proxy says what it has; an empty first subscription to a
            // wildcard type means "everything".
            st.known = req.initial_resource_versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            st.wildcard = is_wildcard_type(type_url) && req.resource_names_subscribe.is_empty();
        }
        let mut sub_changed = first;
        for n in &req.resource_names_subscribe {
            if n == "*" {
                sub_changed |= !st.wildcard;
                st.wildcard = true;
            } else if st.names.insert(n.clone()) {
                sub_changed = true;
                // A fresh subscription wants the resource even if a version is "known".
                st.known.remove(n);
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                st.wildcard = false;
            }
            st.names.remove(n);
            st.known.remove(n);
        }
        st.subscribed = true;
        if sub_changed { self.push(type_url, resources, first).await } else { true }
    }
}

/// What the stream loop needs from a protocol (SotW or Delta).
trait Session: Send + Sized + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    const PROTOCOL: &'static str;
    fn node(req: &Self::Req) -> Option<envoy_types::pb::envoy::config::core::v3::Node>;
    fn start(hub: Arc<Hub>, proxy: ProxyInfo, tx: mpsc::Sender<Result<Self::Resp, Status>>) -> Self;
    fn proxy(&self) -> &ProxyInfo;
    fn closed(&self) -> impl std::future::Future<Output = ()> + Send;
    fn request(&mut self, req: Self::Req, resources: &Resources) -> impl std::future::Future<Output = bool> + Send;
    fn send_changes(
        &mut self,
        type_url: &'static str,
        resources: &Resources,
    ) -> impl std::future::Future<Output = bool> + Send;
}

impl Session for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const PROTOCOL: &'static str = "SotW";
    fn node(req: &DiscoveryRequest) -> Option<envoy_types::pb::envoy::config::core::v3::Node> {
        req.node.clone()
    }
    fn start(hub: Arc<Hub>, proxy: ProxyInfo, tx: mpsc::Sender<Result<DiscoveryResponse, Status>>) -> Self {
        Sotw { hub, proxy, tx, types: BTreeMap::new(), nonce: 0 }
    }
    fn proxy(&self) -> &ProxyInfo {
        &self.proxy
    }
    async fn closed(&self) {
        self.tx.closed().await
    }
    async fn request(&mut self, req: DiscoveryRequest, resources: &Resources) -> bool {
        self.on_request(req, resources).await
    }
    async fn send_changes(&mut self, type_url: &'static str, resources: &Resources) -> bool {
        self.push(type_url, resources, false).await
    }
}

impl Session for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const PROTOCOL: &'static str = "Delta";
    fn node(req: &DeltaDiscoveryRequest) -> Option<envoy_types::pb::envoy::config::core::v3::Node> {
        req.node.clone()
    }
    fn start(hub: Arc<Hub>, proxy: ProxyInfo, tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>) -> Self {
        Delta { hub, proxy, tx, types: BTreeMap::new(), nonce: 0 }
    }
    fn proxy(&self) -> &ProxyInfo {
        &self.proxy
    }
    async fn closed(&self) {
        self.tx.closed().await
    }
    async fn request(&mut self, req: DeltaDiscoveryRequest, resources: &Resources) -> bool {
        self.on_request(req, resources).await
    }
    async fn send_changes(&mut self, type_url: &'static str, resources: &Resources) -> bool {
        self.push(type_url, resources, false).await
    }
}

/// One ADS stream, whatever the protocol: identify the proxy from the first request (read in
/// the task, so response headers go out at once), register its workload, then answer requests
/// and push what changes until either side goes away.
fn serve<S: Session>(hub: Arc<Hub>, mut inbound: Streaming<S::Req>) -> mpsc::Receiver<Result<S::Resp, Status>>
where
    Streaming<S::Req>: Stream<Item = Result<S::Req, Status>> + Send + Unpin,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let (first, proxy) = match first_request(&mut inbound, S::node).await {
            Ok(x) => x,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        hub.connected(&proxy, S::PROTOCOL);
        hub.announce(&proxy.id, proxy.workload());
        let id = proxy.id.clone();
        tracing::info!(proxy = %id, protocol = S::PROTOCOL, "ADS stream opened");
        let mut states = hub.subscribe();
        let state = states.borrow_and_update().clone();
        let mut resources = hub.resources(&state, &proxy);
        let mut session = S::start(hub.clone(), proxy, tx);
        let mut alive = session.request(first, &resources).await;
        while alive {
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => alive = session.request(req, &resources).await,
                    Some(Err(e)) => {
                        tracing::debug!(proxy = %id, error = %e, "ADS stream error");
                        alive = false;
                    }
                    None => alive = false,
                },
                changed = states.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let state = states.borrow_and_update().clone();
                    let next = hub.resources(&state, session.proxy());
                    // Only types whose content changed for this proxy are looked at.
                    let changed: Vec<&'static str> = PUSH_ORDER.into_iter().filter(|t| next.type_changed(&resources, t)).collect();
                    resources = next;
                    for t in changed {
                        if !session.send_changes(t, &resources).await {
                            alive = false;
                            break;
                        }
                    }
                }
                _ = session.closed() => alive = false,
            }
        }
        hub.disconnected(&id);
        tracing::info!(proxy = %id, protocol = S::PROTOCOL, "ADS stream closed");
    });
    rx
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let rx = serve::<Sotw>(self.hub.clone(), request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let rx = serve::<Delta>(self.hub.clone(), request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
