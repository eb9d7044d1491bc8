//! The proxy's configuration: Envoy v3 resources converted, off the data path, into the
//! types the listeners, router and clusters use. A [`Snapshot`] is immutable; the xDS client
//! builds a new one for every accepted update and publishes it whole, so a request sees the
//! old configuration or the new one, never a mix. Anything the proxy cannot execute exactly
//! is a [`ConvertError`] naming the resource and field — the update is NACKed with it.

pub mod builtin;
pub mod cluster;
pub mod listener;
pub mod route;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::{Message, Name};

pub use cluster::{ClusterConfig, Discovery, EndpointConfig, LocalityGroup};
pub use listener::{ListenerConfig, ListenerKind};
pub use route::RouteTable;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Why a resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{what}: {field} is not supported by trellis-proxy")]
    Unsupported { what: String, field: String },
    #[error("{what}: invalid: {reason}")]
    Invalid { what: String, reason: String },
}

impl ConvertError {
    pub fn unsupported(what: &str, field: impl Into<String>) -> Self {
        ConvertError::Unsupported { what: what.to_string(), field: field.into() }
    }

    pub fn invalid(what: &str, reason: impl Into<String>) -> Self {
        ConvertError::Invalid { what: what.to_string(), reason: reason.into() }
    }
}

pub(crate) fn duration(d: &PbDuration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// Everything the proxy runs with.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every accepted update.
    pub version: u64,
    pub listeners: BTreeMap<String, Arc<ListenerConfig>>,
    pub routes: BTreeMap<String, Arc<RouteTable>>,
    pub clusters: BTreeMap<String, Arc<ClusterConfig>>,
    /// EDS: by service name.
    pub endpoints: BTreeMap<String, Arc<Vec<LocalityGroup>>>,
}

impl Snapshot {
    /// The endpoints of a cluster: inline, or from EDS (empty until they arrive).
    pub fn cluster_endpoints(&self, c: &ClusterConfig) -> Arc<Vec<LocalityGroup>> {
        match &c.discovery {
            Discovery::Eds(service) => self.endpoints.get(service).cloned().unwrap_or_default(),
            Discovery::Static(g) | Discovery::Dns(g) => Arc::new(g.clone()),
            Discovery::OriginalDst => Arc::default(),
        }
    }

    /// EDS names the clusters need.
    pub fn eds_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .clusters
            .values()
            .filter_map(|c| match &c.discovery {
                Discovery::Eds(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// RDS names the listeners need.
    pub fn rds_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.listeners.values().filter_map(|l| l.route_name().map(String::from)).collect();
        v.sort();
        v.dedup();
        v
    }
}

fn decode<M: Message + Default + Name>(any: &Any, name: &str) -> Result<M, ConvertError> {
    if any.type_url != M::type_url() {
        return Err(ConvertError::invalid(name, format!("type {} where {} was expected", any.type_url, M::type_url())));
    }
    M::decode(any.value.as_slice()).map_err(|e| ConvertError::invalid(name, format!("cannot decode: {e}")))
}

/// Converts one type's resources (name → encoded resource) into `snap`, replacing that
/// type's part. Every bad resource is reported (joined), none is applied.
pub fn apply_type(snap: &mut Snapshot, type_url: &str, resources: &BTreeMap<String, Any>) -> Result<(), String> {
    let mut errors = Vec::new();
    macro_rules! convert_all {
        ($ty:ty, $convert:expr) => {{
            let mut out = BTreeMap::new();
            for (name, any) in resources {
                match decode::<$ty>(any, name).and_then(|r| $convert(&r)) {
                    Ok(v) => {
                        out.insert(name.clone(), Arc::new(v));
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            out
        }};
    }
    match type_url {
        CLUSTER_TYPE => snap.clusters = convert_all!(Cluster, cluster::convert),
        LISTENER_TYPE => snap.listeners = convert_all!(Listener, listener::convert),
        ROUTE_TYPE => snap.routes = convert_all!(RouteConfiguration, route::convert),
        ENDPOINT_TYPE => {
            snap.endpoints = convert_all!(ClusterLoadAssignment, |cla: &ClusterLoadAssignment| {
                cluster::load_assignment(cla, &format!("endpoints {}", cla.cluster_name), false)
            })
        }
        other => return Err(format!("resource type {other} is not served to trellis-proxy")),
    }
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}
