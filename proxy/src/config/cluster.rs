//! Clusters (CDS) and their endpoints (EDS, or inline for STATIC / STRICT_DNS clusters).
#![allow(deprecated)] // Envoy's deprecated fields are still read, as Envoy reads them.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy, common_lb_config::LocalityConfigSpecifier,
};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    UpstreamProtocolOptions, explicit_http_config,
};
use prost::Message;

use super::{ConvertError, duration};

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    pub discovery: Discovery,
    pub lb: Lb,
    pub connect_timeout: Duration,
    pub limits: Limits,
    pub outlier: Option<Outlier>,
    /// Upstream speaks HTTP/2 (prior knowledge).
    pub http2: bool,
    /// 0: unlimited.
    pub max_requests_per_connection: u32,
    pub idle_timeout: Option<Duration>,
    /// Below this share of healthy hosts (percent) all hosts are used (Envoy's panic mode).
    pub panic_threshold: f64,
    pub locality_weighted: bool,
    /// mTLS to the upstream (ISTIO_MUTUAL).
    pub tls: Option<super::tls::UpstreamTls>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Discovery {
    /// Endpoints by EDS, under this service name.
    Eds(String),
    /// Endpoints inline (STATIC).
    Static(Vec<LocalityGroup>),
    /// Endpoints are DNS names resolved when connecting.
    Dns(Vec<LocalityGroup>),
    /// To the address the request names (`Host: IP:PORT`), as Envoy's ORIGINAL_DST with
    /// the HTTP header: there is no captured original destination on explicit listeners.
    OriginalDst,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lb {
    RoundRobin,
    LeastRequest,
    Random,
    RingHash { min_ring_size: u64 },
    Maglev { table_size: u64 },
}

/// Circuit-breaker thresholds (default priority), as Istio's connectionPool sets them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for Limits {
    /// Envoy's defaults.
    fn default() -> Self {
        Limits { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    /// 0: off.
    pub consecutive_5xx: u32,
    pub enforce_5xx: bool,
    pub consecutive_gateway: u32,
    pub enforce_gateway: bool,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// Endpoints of one locality and priority.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityGroup {
    pub locality: (String, String, String),
    pub priority: u32,
    pub weight: u32,
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// An IP (or, for DNS clusters, a host name).
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

impl EndpointConfig {
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn threshold(v: Option<u32>, default: u32) -> u32 {
    v.unwrap_or(default)
}

pub fn convert(c: &pb::Cluster) -> Result<ClusterConfig, ConvertError> {
    let what = format!("cluster {}", c.name);
    if !c.transport_socket_matches.is_empty() {
        return Err(ConvertError::unsupported(&what, "transport_socket_matches (auto mTLS is planned)"));
    }
    let tls = c.transport_socket.as_ref().map(|ts| super::tls::upstream(ts, &what)).transpose()?;
    if !c.health_checks.is_empty() {
        return Err(ConvertError::unsupported(&what, "active health_checks"));
    }
    let discovery = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => match DiscoveryType::try_from(*t) {
            Ok(DiscoveryType::Eds) => {
                let name = c.eds_cluster_config.as_ref().map(|e| e.service_name.clone()).unwrap_or_default();
                Discovery::Eds(if name.is_empty() { c.name.clone() } else { name })
            }
            Ok(DiscoveryType::Static) => Discovery::Static(endpoints_of(c.load_assignment.as_ref(), &what, false)?),
            Ok(DiscoveryType::StrictDns | DiscoveryType::LogicalDns) => {
                Discovery::Dns(endpoints_of(c.load_assignment.as_ref(), &what, true)?)
            }
            Ok(DiscoveryType::OriginalDst) => Discovery::OriginalDst,
            Err(_) => return Err(ConvertError::invalid(&what, format!("discovery type {t}"))),
        },
        Some(other) => return Err(ConvertError::unsupported(&what, format!("cluster type {other:?}"))),
        None => Discovery::Static(endpoints_of(c.load_assignment.as_ref(), &what, false)?),
    };
    let lb = match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::RoundRobin) => Lb::RoundRobin,
        Ok(LbPolicy::LeastRequest) => Lb::LeastRequest,
        Ok(LbPolicy::Random) => Lb::Random,
        Ok(LbPolicy::RingHash) => Lb::RingHash {
            min_ring_size: match &c.lb_config {
                Some(LbConfig::RingHashLbConfig(r)) => r.minimum_ring_size.as_ref().map(|v| v.value).unwrap_or(1024),
                _ => 1024,
            },
        },
        Ok(LbPolicy::Maglev) => Lb::Maglev {
            table_size: match &c.lb_config {
                Some(LbConfig::MaglevLbConfig(m)) => m.table_size.as_ref().map(|v| v.value).unwrap_or(65537),
                _ => 65537,
            },
        },
        Ok(LbPolicy::ClusterProvided) if matches!(discovery, Discovery::OriginalDst) => Lb::RoundRobin,
        _ => return Err(ConvertError::unsupported(&what, format!("lb_policy {}", c.lb_policy))),
    };
    let mut limits = Limits::default();
    if let Some(cb) = &c.circuit_breakers {
        for t in &cb.thresholds {
            if t.priority != 0 {
                continue; // HIGH priority thresholds: Trellis routes nothing at high priority.
            }
            limits = Limits {
                max_connections: threshold(t.max_connections.as_ref().map(|v| v.value), 1024),
                max_pending_requests: threshold(t.max_pending_requests.as_ref().map(|v| v.value), 1024),
                max_requests: threshold(t.max_requests.as_ref().map(|v| v.value), 1024),
                max_retries: threshold(t.max_retries.as_ref().map(|v| v.value), 3),
            };
        }
    }
    let outlier = c.outlier_detection.as_ref().map(|o| {
        let pct = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| v.as_ref().map(|v| v.value);
        Outlier {
            consecutive_5xx: pct(&o.consecutive_5xx).unwrap_or(5),
            enforce_5xx: pct(&o.enforcing_consecutive_5xx).unwrap_or(100) > 0,
            consecutive_gateway: pct(&o.consecutive_gateway_failure).unwrap_or(5),
            enforce_gateway: pct(&o.enforcing_consecutive_gateway_failure).unwrap_or(0) > 0,
            interval: o.interval.as_ref().map(duration).unwrap_or(Duration::from_secs(10)),
            base_ejection: o.base_ejection_time.as_ref().map(duration).unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: pct(&o.max_ejection_percent).unwrap_or(10),
        }
    });
    let mut http2 = c.http2_protocol_options.is_some();
    let mut max_requests_per_connection = c.max_requests_per_connection.as_ref().map(|v| v.value).unwrap_or(0);
    let mut idle_timeout = Some(Duration::from_secs(3600));
    for (name, any) in &c.typed_extension_protocol_options {
        if name != HTTP_PROTOCOL_OPTIONS {
            return Err(ConvertError::unsupported(&what, format!("typed_extension_protocol_options {name}")));
        }
        let o = HttpProtocolOptions::decode(any.value.as_slice())
            .map_err(|e| ConvertError::invalid(&what, format!("{name}: {e}")))?;
        match &o.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                http2 =
                    matches!(e.protocol_config, Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)));
            }
            Some(other) => return Err(ConvertError::unsupported(&what, format!("upstream protocol {other:?}"))),
            None => {}
        }
        if let Some(common) = &o.common_http_protocol_options {
            if let Some(n) = &common.max_requests_per_connection {
                max_requests_per_connection = n.value;
            }
            if let Some(d) = &common.idle_timeout {
                idle_timeout = Some(duration(d)).filter(|d| !d.is_zero());
            }
        }
    }
    let (panic_threshold, locality_weighted) = match &c.common_lb_config {
        Some(cl) => (
            cl.healthy_panic_threshold.as_ref().map(|p| p.value).unwrap_or(50.0),
            matches!(cl.locality_config_specifier, Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))),
        ),
        None => (50.0, false),
    };
    Ok(ClusterConfig {
        name: c.name.clone(),
        discovery,
        lb,
        connect_timeout: c.connect_timeout.as_ref().map(duration).unwrap_or(Duration::from_secs(5)),
        limits,
        outlier,
        http2,
        max_requests_per_connection,
        idle_timeout,
        panic_threshold,
        locality_weighted,
        tls,
    })
}

fn endpoints_of(
    cla: Option<&ClusterLoadAssignment>,
    what: &str,
    dns: bool,
) -> Result<Vec<LocalityGroup>, ConvertError> {
    match cla {
        Some(cla) => load_assignment(cla, what, dns),
        None => Ok(Vec::new()),
    }
}

/// Converts a ClusterLoadAssignment (EDS, or inline).
pub fn load_assignment(cla: &ClusterLoadAssignment, what: &str, dns: bool) -> Result<Vec<LocalityGroup>, ConvertError> {
    let mut groups = Vec::new();
    for l in &cla.endpoints {
        let mut endpoints = Vec::new();
        for e in &l.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return Err(ConvertError::unsupported(what, "named endpoints"));
            };
            let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref()) else {
                return Err(ConvertError::unsupported(what, "endpoint address that is not a socket address (pipes)"));
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return Err(ConvertError::invalid(what, "endpoint without a port"));
            };
            let port = u16::try_from(port).map_err(|_| ConvertError::invalid(what, format!("port {port}")))?;
            if !dns && sa.address.parse::<std::net::IpAddr>().is_err() {
                return Err(ConvertError::invalid(what, format!("endpoint address {:?} is not an IP", sa.address)));
            }
            endpoints.push(EndpointConfig {
                host: sa.address.clone(),
                port,
                weight: e.load_balancing_weight.as_ref().map(|w| w.value).unwrap_or(1).max(1),
            });
        }
        let loc = l.locality.as_ref();
        groups.push(LocalityGroup {
            locality: (
                loc.map(|l| l.region.clone()).unwrap_or_default(),
                loc.map(|l| l.zone.clone()).unwrap_or_default(),
                loc.map(|l| l.sub_zone.clone()).unwrap_or_default(),
            ),
            priority: l.priority,
            weight: l.load_balancing_weight.as_ref().map(|w| w.value).unwrap_or(1).max(1),
            endpoints,
        });
    }
    Ok(groups)
}
