//! The service registry: services and their endpoints, from whatever source knows them.
//!
//! Every source implements [`RegistrySource`]: it may know workloads (which ServiceEntry
//! `workloadSelector`s select, whatever source they came from) and may define services with
//! their endpoints. Sources today: [`ConfigSource`] (ServiceEntry + WorkloadEntry, static,
//! outside Kubernetes) and [`AnnouncedWorkloads`] (workloads that announce themselves in their
//! proxy's xDS node metadata). Kubernetes and remote clusters plug in as more sources. Every
//! endpoint carries its cluster and network, so the same host defined by two sources (two
//! clusters) is one service with endpoints from both.
//!
//! [`build_from`] is a pure function: sources → [`RegistrySnapshot`].

use std::collections::{BTreeMap, BTreeSet};

use crate::analyze::fqdn;
use crate::meta::ResourceKey;
use crate::spec::{Labels, ServiceEntry, ServiceEntryLocation, ServiceEntryResolution, Spec, WorkloadEntry};

/// Where a workload runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// Parses Istio's `region/zone/subzone` form.
    pub fn parse(s: &str) -> Locality {
        let mut parts = s.splitn(3, '/');
        Locality {
            region: parts.next().unwrap_or_default().to_string(),
            zone: parts.next().unwrap_or_default().to_string(),
            subzone: parts.next().unwrap_or_default().to_string(),
        }
    }
}

/// The application protocol of a port, as Istio names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Https,
    Tls,
    Tcp,
    Mongo,
    Mysql,
    Redis,
}

impl Protocol {
    /// Istio's protocol names are case-insensitive; unknown or empty means TCP.
    pub fn parse(s: &str) -> Protocol {
        match s.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTP2" => Protocol::Http2,
            "GRPC" => Protocol::Grpc,
            "GRPC-WEB" => Protocol::GrpcWeb,
            "HTTPS" => Protocol::Https,
            "TLS" => Protocol::Tls,
            "MONGO" => Protocol::Mongo,
            "MYSQL" => Protocol::Mysql,
            "REDIS" => Protocol::Redis,
            _ => Protocol::Tcp,
        }
    }

    /// Routed at L7 by the proxy.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb)
    }

    /// Upstream speaks HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePort {
    pub number: u32,
    pub name: String,
    pub protocol: Protocol,
    /// Port on the endpoints when it differs and the endpoint names none.
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Endpoints are known (EDS).
    Static,
    /// Endpoints are DNS names the proxy resolves.
    Dns,
    /// Passthrough to the original destination.
    None,
}

/// A service: a host name and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Fully qualified host, e.g. `reviews.bookinfo.svc.cluster.local`.
    pub hostname: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
    pub resolution: Resolution,
    pub mesh_internal: bool,
    /// Namespaces it is visible to (`*` = all, `.` = its own); empty means all.
    pub export_to: Vec<String>,
    /// Where it came from, e.g. `ServiceEntry bookinfo/reviews`.
    pub origin: String,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// Whether a proxy in `namespace` may see this service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        self.export_to.is_empty()
            || self.export_to.iter().any(|e| e == "*" || e == namespace || (e == "." && self.namespace == namespace))
    }
}

/// A workload, wherever it was learned: a WorkloadEntry, an inline ServiceEntry endpoint, or a
/// proxy's node metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct WorkloadInstance {
    /// e.g. `reviews-v1` (WorkloadEntry name) or the proxy's WORKLOAD_NAME.
    pub name: String,
    pub namespace: String,
    pub address: String,
    /// Named ports (service port name → port on this workload).
    pub ports: BTreeMap<String, u32>,
    pub labels: Labels,
    pub service_account: String,
    pub locality: Locality,
    pub network: String,
    /// Cluster the workload runs in (`Kubernetes` cluster id, or the MeshCluster name).
    pub cluster: String,
    pub weight: u32,
}

/// An endpoint of one service port.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: String,
    pub port: u32,
    pub labels: Labels,
    pub service_account: String,
    pub locality: Locality,
    pub network: String,
    pub cluster: String,
    pub weight: u32,
    pub workload: String,
}

/// Everything the registry knows at one point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySnapshot {
    /// By hostname.
    pub services: BTreeMap<String, Service>,
    /// By (hostname, service port number).
    pub endpoints: BTreeMap<(String, u32), Vec<Endpoint>>,
}

impl RegistrySnapshot {
    pub fn endpoints(&self, host: &str, port: u32) -> &[Endpoint] {
        self.endpoints.get(&(host.to_string(), port)).map(Vec::as_slice).unwrap_or(&[])
    }
}

fn from_workload_entry(name: &str, namespace: &str, we: &WorkloadEntry, default_cluster: &str) -> WorkloadInstance {
    WorkloadInstance {
        name: name.to_string(),
        namespace: namespace.to_string(),
        address: we.address.clone(),
        ports: we.ports.clone(),
        labels: we.labels.clone(),
        service_account: if we.service_account.is_empty() { "default".into() } else { we.service_account.clone() },
        locality: Locality::parse(&we.locality),
        network: we.network.clone(),
        cluster: default_cluster.to_string(),
        weight: we.weight.unwrap_or(1),
    }
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A service as one source defines it, with its endpoints by service port number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDefinition {
    pub service: Service,
    pub endpoints: BTreeMap<u32, Vec<Endpoint>>,
}

/// Something that knows services and workloads: config, proxies' announcements, and later a
/// Kubernetes API server or a remote cluster. Implementations are snapshots (cheap to read
/// many times); whoever owns a changing source rebuilds the registry when it changes.
pub trait RegistrySource: Send + Sync + std::fmt::Debug {
    /// For diagnostics, e.g. `config`, `announced`, `kubernetes/east`.
    fn name(&self) -> &str;

    /// Workloads this source knows. ServiceEntries with a `workloadSelector` select among
    /// the workloads of every source.
    fn workloads(&self) -> Vec<WorkloadInstance> {
        Vec::new()
    }

    /// Services this source defines, given every source's workloads.
    fn services(&self, _workloads: &[WorkloadInstance]) -> Vec<ServiceDefinition> {
        Vec::new()
    }
}

/// ServiceEntries and WorkloadEntries from validated config.
#[derive(Debug, Clone, Copy)]
pub struct ConfigSource<'a> {
    pub config: &'a [(ResourceKey, Spec)],
    /// Cluster of config-defined workloads.
    pub default_cluster: &'a str,
}

impl RegistrySource for ConfigSource<'_> {
    fn name(&self) -> &str {
        "config"
    }

    fn workloads(&self) -> Vec<WorkloadInstance> {
        self.config
            .iter()
            .filter_map(|(key, spec)| match spec {
                Spec::WorkloadEntry(we) => {
                    Some(from_workload_entry(&key.name, &key.namespace, we, self.default_cluster))
                }
                _ => None,
            })
            .collect()
    }

    fn services(&self, workloads: &[WorkloadInstance]) -> Vec<ServiceDefinition> {
        let mut out = Vec::new();
        for (key, spec) in self.config {
            let Spec::ServiceEntry(se) = spec else { continue };
            let instances: Vec<WorkloadInstance> = match &se.workload_selector {
                Some(sel) => workloads
                    .iter()
                    .filter(|w| w.namespace == key.namespace && selects(&sel.labels, &w.labels))
                    .cloned()
                    .collect(),
                None => se
                    .endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        from_workload_entry(&format!("{}-{i}", key.name), &key.namespace, e, self.default_cluster)
                    })
                    .collect(),
            };
            out.extend(service_entry(key, se, &instances));
        }
        out
    }
}

/// Workloads announced by connected proxies (node metadata); they define no services.
#[derive(Debug, Clone, Default)]
pub struct AnnouncedWorkloads(pub Vec<WorkloadInstance>);

impl RegistrySource for AnnouncedWorkloads {
    fn name(&self) -> &str {
        "announced"
    }

    fn workloads(&self) -> Vec<WorkloadInstance> {
        self.0.clone()
    }
}

/// Merges sources into one registry. The first definition of a host (in source order, then
/// the source's own order) gives the service's ports and settings; endpoints of every
/// definition of the host are merged.
pub fn build_from(sources: &[&dyn RegistrySource]) -> RegistrySnapshot {
    let workloads: Vec<WorkloadInstance> = sources.iter().flat_map(|s| s.workloads()).collect();
    let mut snap = RegistrySnapshot::default();
    for source in sources {
        for def in source.services(&workloads) {
            for port in &def.service.ports {
                let eps = def.endpoints.get(&port.number).cloned().unwrap_or_default();
                snap.endpoints.entry((def.service.hostname.clone(), port.number)).or_default().extend(eps);
            }
            snap.services.entry(def.service.hostname.clone()).or_insert(def.service);
        }
    }
    // Stable order of endpoints.
    for eps in snap.endpoints.values_mut() {
        eps.sort();
        eps.dedup();
    }
    snap
}

/// Builds the registry from validated config (ServiceEntries, WorkloadEntries) and workloads
/// announced by proxies. `default_cluster` names the cluster of config-defined workloads.
pub fn build(
    config: &[(ResourceKey, Spec)],
    announced: &[WorkloadInstance],
    default_cluster: &str,
) -> RegistrySnapshot {
    let announced = AnnouncedWorkloads(announced.to_vec());
    build_from(&[&ConfigSource { config, default_cluster }, &announced])
}

fn service_entry(key: &ResourceKey, se: &ServiceEntry, instances: &[WorkloadInstance]) -> Vec<ServiceDefinition> {
    let mut out = Vec::new();
    let ports: Vec<ServicePort> = se
        .ports
        .iter()
        .map(|p| ServicePort {
            number: p.number,
            name: p.name.clone(),
            protocol: Protocol::parse(&p.protocol),
            target_port: p.target_port,
        })
        .collect();
    let resolution = match se.resolution {
        ServiceEntryResolution::STATIC => Resolution::Static,
        ServiceEntryResolution::DNS | ServiceEntryResolution::DNS_ROUND_ROBIN => Resolution::Dns,
        ServiceEntryResolution::NONE | ServiceEntryResolution::DYNAMIC_DNS => Resolution::None,
    };
    for host in &se.hosts {
        let hostname = fqdn(host, &key.namespace);
        let service = Service {
            hostname: hostname.clone(),
            namespace: key.namespace.clone(),
            ports: ports.clone(),
            resolution,
            mesh_internal: se.location == ServiceEntryLocation::MESH_INTERNAL,
            export_to: se.export_to.clone(),
            origin: key.to_string(),
        };
        let mut endpoints = BTreeMap::new();
        for port in &ports {
            let mut eps = Vec::new();
            for w in instances {
                let target = w.ports.get(&port.name).copied().or(port.target_port).unwrap_or(port.number);
                eps.push(Endpoint {
                    address: w.address.clone(),
                    port: target,
                    labels: w.labels.clone(),
                    service_account: w.service_account.clone(),
                    locality: w.locality.clone(),
                    network: w.network.clone(),
                    cluster: w.cluster.clone(),
                    weight: w.weight.max(1),
                    workload: w.name.clone(),
                });
            }
            // DNS services without endpoints resolve their own host name.
            if eps.is_empty() && resolution == Resolution::Dns && !hostname.starts_with('*') {
                eps.push(Endpoint {
                    address: hostname.clone(),
                    port: port.target_port.unwrap_or(port.number),
                    labels: Labels::new(),
                    service_account: String::new(),
                    locality: Locality::default(),
                    network: String::new(),
                    cluster: String::new(),
                    weight: 1,
                    workload: String::new(),
                });
            }
            endpoints.insert(port.number, eps);
        }
        out.push(ServiceDefinition { service, endpoints });
    }
    out
}

/// Service accounts behind a service, for SAN checks later.
pub fn service_accounts(snap: &RegistrySnapshot, host: &str) -> BTreeSet<String> {
    snap.endpoints
        .iter()
        .filter(|((h, _), _)| h == host)
        .flat_map(|(_, eps)| eps.iter().map(|e| e.service_account.clone()))
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a Kubernetes source would give: a Service with its own endpoints, and pods.
    #[derive(Debug)]
    struct FakeCluster;

    impl RegistrySource for FakeCluster {
        fn name(&self) -> &str {
            "kubernetes/east"
        }

        fn workloads(&self) -> Vec<WorkloadInstance> {
            vec![WorkloadInstance {
                name: "ratings-pod".into(),
                namespace: "bookinfo".into(),
                address: "10.0.0.7".into(),
                labels: [("app".to_string(), "ratings".to_string())].into(),
                cluster: "east".into(),
                weight: 1,
                ..Default::default()
            }]
        }

        fn services(&self, _: &[WorkloadInstance]) -> Vec<ServiceDefinition> {
            let service = Service {
                hostname: "reviews.bookinfo.svc.cluster.local".into(),
                namespace: "bookinfo".into(),
                ports: vec![ServicePort {
                    number: 9080,
                    name: "http".into(),
                    protocol: Protocol::Http,
                    target_port: None,
                }],
                resolution: Resolution::Static,
                mesh_internal: true,
                export_to: Vec::new(),
                origin: "kubernetes/east Service bookinfo/reviews".into(),
            };
            let ep = Endpoint {
                address: "10.0.0.9".into(),
                port: 9080,
                cluster: "east".into(),
                weight: 1,
                ..Default::default()
            };
            vec![ServiceDefinition { service, endpoints: [(9080, vec![ep])].into() }]
        }
    }

    #[test]
    fn sources_plug_in_and_merge_by_host() {
        let cfg = config(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews.bookinfo.svc.cluster.local]\n  ports: [{number: 9080, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: [{address: 127.0.0.2}]\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ratings, namespace: bookinfo}\nspec:\n  hosts: [ratings.bookinfo.svc.cluster.local]\n  ports: [{number: 9080, name: http, protocol: HTTP}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: ratings}}\n",
        );
        let config_source = ConfigSource { config: &cfg, default_cluster: "west" };
        let snap = build_from(&[&config_source, &FakeCluster]);
        // One service, endpoints from both clusters; the first definition (config) names it.
        let reviews: Vec<(&str, &str)> = snap
            .endpoints("reviews.bookinfo.svc.cluster.local", 9080)
            .iter()
            .map(|e| (e.address.as_str(), e.cluster.as_str()))
            .collect();
        assert_eq!(reviews, vec![("10.0.0.9", "east"), ("127.0.0.2", "west")]);
        assert_eq!(snap.services["reviews.bookinfo.svc.cluster.local"].origin, "ServiceEntry bookinfo/reviews");
        // A ServiceEntry in config selects a workload another source knows.
        let ratings: Vec<&str> =
            snap.endpoints("ratings.bookinfo.svc.cluster.local", 9080).iter().map(|e| e.address.as_str()).collect();
        assert_eq!(ratings, vec!["10.0.0.7"]);
        assert_eq!(FakeCluster.name(), "kubernetes/east");
    }
    use crate::{parse_documents, validate_resource};

    fn config(yaml: &str) -> Vec<(ResourceKey, Spec)> {
        let (docs, errors) = parse_documents(yaml, "t.yaml");
        assert!(errors.is_empty(), "{errors:?}");
        docs.iter().map(|d| validate_resource(&d.resource, "default").unwrap()).collect()
    }

    #[test]
    fn service_entries_select_workload_entries_and_map_ports() {
        let cfg = config(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews.bookinfo.svc.cluster.local]\n  ports: [{number: 9080, name: http, protocol: HTTP, targetPort: 19080}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: reviews}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: reviews-v1, namespace: bookinfo}\nspec: {address: 127.0.0.2, labels: {app: reviews, version: v1}, locality: us-east1/a}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: reviews-v2, namespace: bookinfo}\nspec: {address: 127.0.0.3, ports: {http: 8080}, labels: {app: reviews, version: v2}, serviceAccount: reviews}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: elsewhere, namespace: other}\nspec: {address: 127.0.0.4, labels: {app: reviews}}\n",
        );
        let announced = vec![WorkloadInstance {
            name: "reviews-v3".into(),
            namespace: "bookinfo".into(),
            address: "127.0.0.5".into(),
            labels: [("app".to_string(), "reviews".to_string()), ("version".to_string(), "v3".to_string())].into(),
            cluster: "east".into(),
            weight: 1,
            ..Default::default()
        }];
        let snap = build(&cfg, &announced, "local");
        let svc = &snap.services["reviews.bookinfo.svc.cluster.local"];
        assert_eq!(svc.ports[0].protocol, Protocol::Http);
        let eps = snap.endpoints("reviews.bookinfo.svc.cluster.local", 9080);
        let got: Vec<(&str, u32, &str)> =
            eps.iter().map(|e| (e.address.as_str(), e.port, e.cluster.as_str())).collect();
        assert_eq!(
            got,
            vec![("127.0.0.2", 19080, "local"), ("127.0.0.3", 8080, "local"), ("127.0.0.5", 19080, "east")]
        );
        assert_eq!(eps[0].locality, Locality { region: "us-east1".into(), zone: "a".into(), subzone: String::new() });
        assert_eq!(
            service_accounts(&snap, "reviews.bookinfo.svc.cluster.local"),
            ["default".to_string(), "reviews".to_string()].into()
        );
    }
}
