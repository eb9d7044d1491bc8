//! The shared state behind every xDS stream: the latest config, the workloads proxies have
//! announced, the registry built from both, a translation cache, and per-proxy sync status.
//!
//! One task owns the state ([`Hub::run`]): it takes config snapshots and announcement changes,
//! waits out a short debounce window so that a burst of writes becomes one push, rebuilds the
//! registry and publishes an immutable [`State`] through a `watch` channel. Streams never hold
//! a lock across an await: they clone the `Arc<State>` and translate off it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use trellis_model::registry::{
    self, AnnouncedWorkloads, ConfigSource, RegistrySnapshot, RegistrySource, WorkloadInstance,
};

use crate::proxy::ProxyInfo;
use crate::translate::{ConfigSnapshot, Translated, inbound_key, outbound_key, translate_inbound, translate_outbound};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Push order: secrets before what refers to them, clusters before endpoints, listeners before
/// routes.
pub const PUSH_ORDER: [&str; 5] = [SECRET_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

/// Types a proxy receives in full (wildcard); the others it asks for by name.
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE
}

/// One resource ready to send: its content-hash version and the packed message.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub version: String,
    pub any: Any,
}

/// Resources by type URL, then name, with a digest per type so that streams can skip types
/// whose content did not change without looking at every resource.
#[derive(Debug, Default)]
pub struct TypeMaps {
    pub maps: BTreeMap<&'static str, BTreeMap<String, Encoded>>,
    pub digests: BTreeMap<&'static str, String>,
}

/// All of one proxy's resources: the outbound half (shared by every proxy with the same
/// outbound identity) and the inbound half (its own workload). Names never collide: inbound
/// resources are named `inbound...`.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub outbound: Arc<TypeMaps>,
    pub inbound: Arc<TypeMaps>,
}

/// One type's resources across both halves.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    a: Option<&'a BTreeMap<String, Encoded>>,
    b: Option<&'a BTreeMap<String, Encoded>>,
}

impl<'a> View<'a> {
    pub fn get(&self, name: &str) -> Option<&'a Encoded> {
        self.a.and_then(|m| m.get(name)).or_else(|| self.b.and_then(|m| m.get(name)))
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every resource, outbound half first (unsorted across halves).
    pub fn iter(&self) -> impl Iterator<Item = (&'a String, &'a Encoded)> + 'a {
        self.a.into_iter().flat_map(|m| m.iter()).chain(self.b.into_iter().flat_map(|m| m.iter()))
    }

    /// All names, sorted.
    pub fn keys(&self) -> Vec<&'a String> {
        let mut keys: Vec<&String> =
            self.a.into_iter().flat_map(|m| m.keys()).chain(self.b.into_iter().flat_map(|m| m.keys())).collect();
        keys.sort();
        keys
    }
}

impl Resources {
    pub fn view(&self, type_url: &str) -> View<'_> {
        View { a: self.outbound.maps.get(type_url), b: self.inbound.maps.get(type_url) }
    }

    /// The version of everything of `type_url` (both halves), without looking at resources.
    pub fn type_version(&self, type_url: &str) -> String {
        let a = self.outbound.digests.get(type_url).map(String::as_str).unwrap_or("");
        let b = self.inbound.digests.get(type_url).map(String::as_str).unwrap_or("");
        format!("{a}{b}")
    }

    /// Whether `type_url` differs between `self` and `other`.
    pub fn type_changed(&self, other: &Resources, type_url: &str) -> bool {
        self.outbound.digests.get(type_url) != other.outbound.digests.get(type_url)
            || self.inbound.digests.get(type_url) != other.inbound.digests.get(type_url)
    }
}

fn encode<M: Message + Name>(msg: &M) -> Encoded {
    let bytes = msg.encode_to_vec();
    let digest = Sha256::digest(&bytes);
    let version: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Encoded { version, any: Any { type_url: M::type_url(), value: bytes } }
}

/// Packs a translation into per-type resources with content-hash versions.
pub fn encode_all(t: &Translated) -> TypeMaps {
    let mut maps = BTreeMap::new();
    maps.insert(CLUSTER_TYPE, t.clusters.iter().map(|(n, c)| (n.clone(), encode(c))).collect());
    maps.insert(ENDPOINT_TYPE, t.endpoints.iter().map(|(n, c)| (n.clone(), encode(c))).collect());
    maps.insert(LISTENER_TYPE, t.listeners.iter().map(|(n, l)| (n.clone(), encode(l))).collect());
    maps.insert(ROUTE_TYPE, t.routes.iter().map(|(n, r)| (n.clone(), encode(r))).collect());
    maps.insert(SECRET_TYPE, t.secrets.iter().map(|(n, s)| (n.clone(), encode(s))).collect());
    let digests = maps
        .iter()
        .map(|(t, m): (&&'static str, &BTreeMap<String, Encoded>)| {
            let mut h = Sha256::new();
            for (n, e) in m {
                h.update(n.as_bytes());
                h.update([0]);
                h.update(e.version.as_bytes());
            }
            (*t, h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect())
        })
        .collect();
    TypeMaps { maps, digests }
}

/// What every stream translates from.
#[derive(Debug, Default)]
pub struct State {
    /// Increases with every publication.
    pub version: u64,
    pub config: Arc<ConfigSnapshot>,
    pub registry: Arc<RegistrySnapshot>,
}

/// Sync status of one resource type for one proxy, like `istioctl proxy-status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeStatus {
    /// Version of the last response sent (SotW `version_info`, or Delta's system version).
    pub sent: String,
    pub sent_nonce: String,
    /// Resources in the last response (Delta: changed ones only).
    pub sent_resources: usize,
    /// Version the proxy last accepted.
    pub acked: String,
    /// The proxy's error for the last rejected response, if the latest answer was a NACK.
    pub nack: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    pub id: String,
    pub namespace: String,
    pub protocol: &'static str,
    pub connected_at: SystemTime,
    pub types: BTreeMap<&'static str, TypeStatus>,
}

/// Settings of the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// How long a burst of changes is collected before one push.
    pub debounce: Duration,
    /// Cluster id of workloads defined by config (WorkloadEntry, inline endpoints).
    pub default_cluster: String,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self { debounce: Duration::from_millis(100), default_cluster: "Kubernetes".into() }
    }
}

/// The xDS hub. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Hub {
    options: HubOptions,
    state_tx: watch::Sender<Arc<State>>,
    announced: Mutex<BTreeMap<String, WorkloadInstance>>,
    /// More registry sources (Kubernetes, remote clusters), by name.
    sources: Mutex<BTreeMap<String, Arc<dyn RegistrySource>>>,
    registry_changed: Notify,
    cache: Mutex<HashMap<String, (u64, Arc<TypeMaps>)>>,
    status: Mutex<BTreeMap<String, ProxyStatus>>,
}

impl Hub {
    pub fn new(options: HubOptions) -> Arc<Self> {
        let (state_tx, _) = watch::channel(Arc::new(State::default()));
        Arc::new(Self {
            options,
            state_tx,
            announced: Mutex::new(BTreeMap::new()),
            sources: Mutex::new(BTreeMap::new()),
            registry_changed: Notify::new(),
            cache: Mutex::new(HashMap::new()),
            status: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.state_tx.subscribe()
    }

    /// Owns the state: publishes a new [`State`] after each (debounced) change of config or of
    /// announced workloads. Runs until the config channel closes.
    pub async fn run(self: Arc<Self>, mut config: watch::Receiver<Arc<ConfigSnapshot>>) {
        let mut version = 0u64;
        loop {
            let snapshot = config.borrow_and_update().clone();
            let announced = AnnouncedWorkloads(
                self.announced.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect(),
            );
            let extra: Vec<Arc<dyn RegistrySource>> =
                self.sources.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
            let config_source =
                ConfigSource { config: &snapshot.items, default_cluster: &self.options.default_cluster };
            let mut sources: Vec<&dyn RegistrySource> = vec![&config_source, &announced];
            sources.extend(extra.iter().map(|s| s.as_ref()));
            let registry = registry::build_from(&sources);
            version += 1;
            self.state_tx.send_replace(Arc::new(State { version, config: snapshot, registry: Arc::new(registry) }));
            tokio::select! {
                r = config.changed() => if r.is_err() { return },
                _ = self.registry_changed.notified() => {}
            }
            // Debounce: let the burst settle.
            tokio::time::sleep(self.options.debounce).await;
        }
    }

    /// Registers (or, with `None`, forgets) the workload a connected proxy fronts.
    pub fn announce(&self, proxy_id: &str, workload: Option<WorkloadInstance>) {
        let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match workload {
            Some(w) => announced.insert(proxy_id.to_string(), w.clone()).as_ref() != Some(&w),
            None => announced.remove(proxy_id).is_some(),
        };
        drop(announced);
        if changed {
            self.registry_changed.notify_one();
        }
    }

    /// Adds or replaces (by [`RegistrySource::name`]) a registry source, e.g. a Kubernetes
    /// cluster's services; proxies get the result after the debounce.
    pub fn set_source(&self, source: Arc<dyn RegistrySource>) {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).insert(source.name().to_string(), source);
        self.registry_changed.notify_one();
    }

    /// Removes a registry source added with [`Hub::set_source`].
    pub fn remove_source(&self, name: &str) {
        if self.sources.lock().unwrap_or_else(|p| p.into_inner()).remove(name).is_some() {
            self.registry_changed.notify_one();
        }
    }

    /// This proxy's resources for `state`. Each half is translated once per distinct identity
    /// (see [`crate::translate::outbound_key`]) and state version, and shared.
    pub fn resources(&self, state: &State, proxy: &ProxyInfo) -> Resources {
        let outbound = self.cached(format!("out|{}", outbound_key(proxy)), state, || {
            translate_outbound(&state.config, &state.registry, proxy)
        });
        let inbound = self.cached(format!("in|{}", inbound_key(proxy)), state, || {
            translate_inbound(&state.config, &state.registry, proxy)
        });
        Resources { outbound, inbound }
    }

    fn cached(&self, key: String, state: &State, make: impl FnOnce() -> Translated) -> Arc<TypeMaps> {
        if let Some((v, r)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && *v == state.version
        {
            return r.clone();
        }
        let encoded = Arc::new(encode_all(&make()));
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, (v, _)| *v == state.version);
        cache.insert(key, (state.version, encoded.clone()));
        encoded
    }

    pub fn connected(&self, proxy: &ProxyInfo, protocol: &'static str) {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).insert(
            proxy.id.clone(),
            ProxyStatus {
                id: proxy.id.clone(),
                namespace: proxy.namespace.clone(),
                protocol,
                connected_at: SystemTime::now(),
                types: BTreeMap::new(),
            },
        );
    }

    pub fn disconnected(&self, proxy_id: &str) {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).remove(proxy_id);
        self.announce(proxy_id, None);
    }

    pub fn update_status(&self, proxy_id: &str, type_url: &'static str, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(p) = self.status.lock().unwrap_or_else(|p| p.into_inner()).get_mut(proxy_id) {
            f(p.types.entry(type_url).or_default());
        }
    }

    /// Status of every connected proxy.
    pub fn proxy_status(&self) -> Vec<ProxyStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}
