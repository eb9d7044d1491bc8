//! CDS and EDS: a cluster per service port (`outbound|PORT||HOST`) and per DestinationRule
//! subset (`outbound|PORT|SUBSET|HOST`), with the DestinationRule's load balancing,
//! connection-pool limits (circuit breakers) and outlier detection; endpoints grouped by
//! priority and locality, client TLS per [`super::tls`]. Inbound clusters (`inbound|PORT||`)
//! lead to the local application.

use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::{
    LocalityConfigSpecifier, LocalityWeightedLbConfig,
};
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig, LbConfig, LbPolicy, MaglevLbConfig,
    RingHashLbConfig,
};
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, circuit_breakers::Thresholds,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, Http1ProtocolOptions, Http2ProtocolOptions,
    HttpProtocolOptions as CommonHttpOptions, Locality as PbLocality, Pipe, SocketAddress, address, config_source,
    socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{UInt32Value, UInt64Value};
use envoy_types::util::pack_any;
use trellis_model::registry::{Endpoint, Locality, Protocol, Resolution, Service, ServicePort};
use trellis_model::spec::{
    ClientTlsSettings, ConnectionPoolSettings, Labels, LoadBalancerSettings, OutlierDetection as IstioOutlier,
    SimpleLb, TrafficPolicy,
};

use super::locality::{self, Group, LocalityPolicy};
use super::tls;
use super::{Scope, Translated, cluster_name, duration, parse_duration, selects};

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Istio's default connect timeout.
const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The effective traffic policy of one cluster: DestinationRule level, then its port-level
/// settings, then the subset's, then the subset's port-level settings, each overriding whole
/// sections (loadBalancer, connectionPool, outlierDetection, tls) as Istio does.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Policy<'a> {
    pub lb: Option<&'a LoadBalancerSettings>,
    pub pool: Option<&'a ConnectionPoolSettings>,
    pub outlier: Option<&'a IstioOutlier>,
    pub tls: Option<&'a ClientTlsSettings>,
}

impl<'a> Policy<'a> {
    fn apply(&mut self, tp: Option<&'a TrafficPolicy>, port: u32) {
        let Some(tp) = tp else { return };
        self.lb = tp.load_balancer.as_ref().or(self.lb);
        self.pool = tp.connection_pool.as_ref().or(self.pool);
        self.outlier = tp.outlier_detection.as_ref().or(self.outlier);
        self.tls = tp.tls.as_ref().or(self.tls);
        if let Some(pl) = tp.port_level_settings.iter().find(|pl| pl.port.as_ref().is_some_and(|p| p.number == port)) {
            self.lb = pl.load_balancer.as_ref().or(self.lb);
            self.pool = pl.connection_pool.as_ref().or(self.pool);
            self.outlier = pl.outlier_detection.as_ref().or(self.outlier);
            self.tls = pl.tls.as_ref().or(self.tls);
        }
    }

    pub fn of(dr: Option<&'a TrafficPolicy>, subset: Option<&'a TrafficPolicy>, port: u32) -> Self {
        let mut p = Policy::default();
        p.apply(dr, port);
        p.apply(subset, port);
        p
    }
}

pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub(crate) fn socket(address: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: address.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn u32v(v: Option<i64>) -> Option<UInt32Value> {
    v.map(|v| UInt32Value { value: v.clamp(0, u32::MAX as i64) as u32 })
}

/// A cluster with Istio's defaults, shaped by `policy`.
fn cluster(
    name: &str,
    svc: &Service,
    port: &ServicePort,
    policy: Policy<'_>,
    endpoints: Option<ClusterLoadAssignment>,
) -> Cluster {
    let mut c = Cluster { name: name.to_string(), ..Default::default() };
    let discovery = match svc.resolution {
        Resolution::Static => {
            c.eds_cluster_config = Some(EdsClusterConfig { eds_config: Some(ads()), service_name: name.to_string() });
            DiscoveryType::Eds
        }
        Resolution::Dns => {
            c.load_assignment = endpoints;
            DiscoveryType::StrictDns
        }
        Resolution::None => DiscoveryType::OriginalDst,
    };
    c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(discovery as i32));
    c.connect_timeout = Some(duration(DEFAULT_CONNECT_TIMEOUT));

    // Load balancing.
    c.lb_policy = LbPolicy::RoundRobin as i32;
    if svc.resolution == Resolution::None {
        c.lb_policy = LbPolicy::ClusterProvided as i32;
    } else if let Some(lb) = policy.lb {
        match (&lb.simple, &lb.consistent_hash) {
            (Some(SimpleLb::LEAST_CONN | SimpleLb::LEAST_REQUEST), _) => c.lb_policy = LbPolicy::LeastRequest as i32,
            (Some(SimpleLb::RANDOM), _) => c.lb_policy = LbPolicy::Random as i32,
            (_, Some(ch)) => match &ch.maglev {
                Some(m) => {
                    c.lb_policy = LbPolicy::Maglev as i32;
                    if m.table_size > 0 {
                        c.lb_config = Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
                            table_size: Some(UInt64Value { value: m.table_size }),
                        }));
                    }
                }
                None => {
                    c.lb_policy = LbPolicy::RingHash as i32;
                    let min =
                        ch.ring_hash.as_ref().map(|r| r.minimum_ring_size).or(ch.minimum_ring_size).filter(|m| *m > 0);
                    if let Some(min) = min {
                        c.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                            minimum_ring_size: Some(UInt64Value { value: min }),
                            ..Default::default()
                        }));
                    }
                }
            },
            _ => {}
        }
    }

    // Connection pool → circuit breakers and protocol options; unset limits are effectively
    // unlimited, as in Istio (Envoy's own default of 1024 would surprise).
    let tcp = policy.pool.and_then(|p| p.tcp.as_ref());
    let http = policy.pool.and_then(|p| p.http.as_ref());
    if let Some(t) = tcp.and_then(|t| t.connect_timeout.as_ref()).and_then(parse_duration) {
        c.connect_timeout = Some(t);
    }
    let max = Some(i64::from(u32::MAX));
    c.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: u32v(tcp.and_then(|t| t.max_connections).or(max)),
            max_pending_requests: u32v(http.and_then(|h| h.http1_max_pending_requests).or(max)),
            max_requests: u32v(http.and_then(|h| h.http2_max_requests).or(max)),
            max_retries: u32v(http.and_then(|h| h.max_retries).or(max)),
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    });
    let mut common = CommonHttpOptions::default();
    let mut have_common = false;
    if let Some(n) = http.and_then(|h| h.max_requests_per_connection).filter(|n| *n > 0) {
        common.max_requests_per_connection = u32v(Some(n));
        have_common = true;
    }
    let idle = http.and_then(|h| h.idle_timeout.as_ref()).or(tcp.and_then(|t| t.idle_timeout.as_ref()));
    if let Some(d) = idle.and_then(parse_duration) {
        common.idle_timeout = Some(d);
        have_common = true;
    }
    if have_common || port.protocol.is_http2() {
        let options = HttpProtocolOptions {
            common_http_protocol_options: have_common.then_some(common),
            // Envoy requires the upstream protocol to be explicit here.
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(if port.protocol.is_http2() {
                    explicit_http_config::ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
                } else {
                    explicit_http_config::ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
                }),
            })),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(HTTP_PROTOCOL_OPTIONS.to_string(), pack_any(options));
    }

    // Outlier detection, with Istio's enforcement rules.
    if let Some(od) = policy.outlier {
        let mut o = OutlierDetection::default();
        if let Some(n) = od.consecutive_5xx_errors {
            o.consecutive_5xx = u32v(Some(n));
            o.enforcing_consecutive_5xx = u32v(Some(if n > 0 { 100 } else { 0 }));
        } else {
            o.enforcing_consecutive_5xx = u32v(Some(0));
        }
        if let Some(n) = od.consecutive_gateway_errors {
            o.consecutive_gateway_failure = u32v(Some(n));
            o.enforcing_consecutive_gateway_failure = u32v(Some(if n > 0 { 100 } else { 0 }));
        }
        o.interval = od.interval.as_ref().and_then(parse_duration);
        o.base_ejection_time = od.base_ejection_time.as_ref().and_then(parse_duration);
        o.max_ejection_percent = u32v(od.max_ejection_percent);
        if let Some(min) = od.min_health_percent {
            c.common_lb_config = Some(CommonLbConfig {
                healthy_panic_threshold: Some(Percent { value: min as f64 }),
                ..Default::default()
            });
        }
        c.outlier_detection = Some(o);
    }
    c
}

fn locality(l: &Locality) -> PbLocality {
    PbLocality { region: l.region.clone(), zone: l.zone.clone(), sub_zone: l.subzone.clone() }
}

/// Endpoints grouped by priority and locality (see [`super::locality`]), in a stable order.
pub(crate) fn load_assignment(name: &str, groups: &[Group<'_>]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: groups
            .iter()
            .map(|g| LocalityLbEndpoints {
                locality: Some(locality(&g.locality)),
                load_balancing_weight: Some(UInt32Value { value: g.weight() }),
                priority: g.priority,
                lb_endpoints: g
                    .endpoints
                    .iter()
                    .map(|e| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
                            address: Some(socket(&e.address, e.port)),
                            ..Default::default()
                        })),
                        load_balancing_weight: Some(UInt32Value { value: e.weight.max(1) }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn add(
    out: &mut Translated,
    scope: &Scope<'_>,
    svc: &Service,
    port: &ServicePort,
    subset: &str,
    labels: Option<&Labels>,
    policy: Policy<'_>,
    eps: &[Endpoint],
) {
    let name = cluster_name("outbound", port.number, subset, &svc.hostname);
    let selected: Vec<&Endpoint> = eps.iter().filter(|e| labels.is_none_or(|l| selects(l, &e.labels))).collect();
    let grouped = locality::group(
        &selected,
        Some(LocalityPolicy {
            proxy: scope.proxy,
            setting: policy.lb.and_then(|lb| lb.locality_lb_setting.as_ref()),
            outlier_detection: policy.outlier.is_some(),
        }),
    );
    let cla = load_assignment(&name, &grouped.groups);
    let dns = svc.resolution == Resolution::Dns;
    let mut c = cluster(&name, svc, port, policy, dns.then(|| cla.clone()));
    c.transport_socket =
        tls::transport_socket(scope.proxy, scope.config.trust_domain(), policy.tls, svc, port, subset, &selected);
    if grouped.locality_weighted {
        c.common_lb_config.get_or_insert_with(Default::default).locality_config_specifier =
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(LocalityWeightedLbConfig {}));
    }
    out.clusters.insert(name.clone(), c);
    if svc.resolution == Resolution::Static {
        out.endpoints.insert(name, cla);
    }
}

/// Outbound clusters and their endpoints for every service the proxy may reach.
pub(crate) fn outbound(scope: &Scope<'_>, out: &mut Translated) {
    for svc in scope.services() {
        let dr = scope.destination_rule(&svc.hostname, &svc.namespace).map(|(_, dr)| dr);
        for port in &svc.ports {
            let eps = scope.registry.endpoints(&svc.hostname, port.number);
            let top = dr.and_then(|d| d.traffic_policy.as_ref());
            add(out, scope, svc, port, "", None, Policy::of(top, None, port.number), eps);
            for subset in dr.map(|d| d.subsets.as_slice()).unwrap_or_default() {
                let policy = Policy::of(top, subset.traffic_policy.as_ref(), port.number);
                add(out, scope, svc, port, &subset.name, Some(&subset.labels), policy, eps);
            }
        }
    }
}

/// Where the local application listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum App {
    Socket(String, u32),
    /// A unix domain socket path.
    Pipe(String),
}

/// One port the proxy accepts for its workload.
#[derive(Debug, Clone)]
pub(crate) struct InboundPort {
    pub number: u32,
    pub protocol: Protocol,
    pub app: App,
    /// With a listener of its own (a Sidecar `ingress` entry): where it binds.
    pub bind: Option<String>,
}

impl InboundPort {
    pub fn cluster(&self) -> String {
        cluster_name("inbound", self.number, "", "")
    }
}

/// Parses a Sidecar ingress `defaultEndpoint` (validated: `127.0.0.1:PORT`, `0.0.0.0:PORT`,
/// `[::1]:PORT`, `[::]:PORT` or `unix:///path`). `0.0.0.0` and `[::]` mean the workload's own
/// address, as in Istio.
fn default_endpoint(s: &str, own_ip: &str) -> Option<App> {
    if let Some(path) = s.strip_prefix("unix://") {
        return Some(App::Pipe(path.to_string()));
    }
    let (ip, port) = s.rsplit_once(':')?;
    let ip = ip.trim_matches(|c| c == '[' || c == ']');
    let ip = if ip == "0.0.0.0" || ip == "::" { own_ip } else { ip };
    Some(App::Socket(ip.to_string(), port.parse().ok()?))
}

/// The ports the proxy accepts for its workload: a Sidecar's `ingress` listeners when it has
/// some (each on a listener of its own), else every service port the workload serves (on the
/// shared inbound listener, to the application on 127.0.0.1).
pub(crate) fn inbound_ports(scope: &Scope<'_>) -> Vec<InboundPort> {
    let served = served_ports(scope);
    let ingress = scope.sidecar().map(|s| s.ingress.as_slice()).unwrap_or_default();
    if ingress.is_empty() {
        let mut seen = std::collections::BTreeSet::new();
        return served
            .into_iter()
            .filter(|(port, _, _)| seen.insert(port.number))
            .map(|(port, target, _)| InboundPort {
                number: port.number,
                protocol: port.protocol,
                app: App::Socket("127.0.0.1".into(), target),
                bind: None,
            })
            .collect();
    }
    let own_ip = scope.proxy.ips.first().map(String::as_str).unwrap_or("127.0.0.1");
    ingress
        .iter()
        .filter_map(|l| {
            let port = l.port.as_ref()?;
            let protocol = if port.protocol.is_empty() {
                served
                    .iter()
                    .find(|(p, _, _)| p.number == port.number)
                    .map(|(p, _, _)| p.protocol)
                    .unwrap_or(Protocol::Tcp)
            } else {
                Protocol::parse(&port.protocol)
            };
            let app = default_endpoint(&l.default_endpoint, own_ip)
                .unwrap_or_else(|| App::Socket("127.0.0.1".into(), port.target_port.unwrap_or(port.number)));
            let bind = if l.bind.is_empty() { "0.0.0.0".to_string() } else { l.bind.clone() };
            Some(InboundPort { number: port.number, protocol, app, bind: Some(bind) })
        })
        .collect()
}

/// Inbound clusters: a static cluster to the local application per inbound port.
pub(crate) fn inbound(scope: &Scope<'_>, out: &mut Translated) {
    for ip in inbound_ports(scope) {
        let name = ip.cluster();
        let address = match &ip.app {
            App::Socket(addr, port) => socket(addr, *port),
            App::Pipe(path) => {
                Address { address: Some(address::Address::Pipe(Pipe { path: path.clone(), ..Default::default() })) }
            }
        };
        let svc = Service {
            hostname: String::new(),
            namespace: scope.proxy.namespace.clone(),
            ports: Vec::new(),
            resolution: Resolution::Static,
            mesh_internal: true,
            export_to: Vec::new(),
            origin: String::new(),
        };
        let port = ServicePort { number: ip.number, name: String::new(), protocol: ip.protocol, target_port: None };
        let mut c = cluster(&name, &svc, &port, Policy::default(), None);
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
        c.eds_cluster_config = None;
        c.load_assignment = Some(ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
                        address: Some(address),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        out.clusters.insert(name, c);
    }
}

/// (service port, port of the local application, service) for each service whose endpoints
/// include this proxy's workload (matched by workload name and namespace, or by IP).
fn served_ports<'a>(scope: &Scope<'a>) -> Vec<(&'a ServicePort, u32, &'a Service)> {
    let p = scope.proxy;
    let mut out = Vec::new();
    for svc in scope.registry.services.values().filter(|s| s.namespace == p.namespace) {
        for port in &svc.ports {
            let mine =
                scope.registry.endpoints(&svc.hostname, port.number).iter().find(|e| {
                    (!p.workload_name.is_empty() && e.workload == p.workload_name) || p.ips.contains(&e.address)
                });
            if let Some(e) = mine {
                out.push((port, e.port, svc));
            }
        }
    }
    out
}
