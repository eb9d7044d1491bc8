//! Listeners (LDS): an address and what runs on accepted connections — the HTTP connection
//! manager (routes from RDS) or a TCP proxy (one chain, or chains chosen by TLS SNI).

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::listener::v3 as pb;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
use prost::Message;

use super::ConvertError;

pub const HCM: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
const ROUTER: &str = "envoy.filters.http.router";
const FAULT: &str = "envoy.filters.http.fault";

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub kind: ListenerKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ListenerKind {
    Http { stat_prefix: String, route: String },
    Tcp { chains: Vec<TcpChain>, sni: bool },
}

/// A TCP proxy chain: for connections whose SNI is one of `server_names` (any when empty),
/// to these clusters by weight.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpChain {
    pub server_names: Vec<String>,
    pub stat_prefix: String,
    pub clusters: Vec<(String, u32)>,
}

impl ListenerConfig {
    /// The route configuration this listener needs from RDS.
    pub fn route_name(&self) -> Option<&str> {
        match &self.kind {
            ListenerKind::Http { route, .. } => Some(route),
            ListenerKind::Tcp { .. } => None,
        }
    }
}

pub fn convert(l: &pb::Listener) -> Result<ListenerConfig, ConvertError> {
    let what = format!("listener {}", l.name);
    let Some(address::Address::SocketAddress(sa)) = l.address.as_ref().and_then(|a| a.address.as_ref()) else {
        return Err(ConvertError::unsupported(&what, "an address that is not a socket address"));
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return Err(ConvertError::invalid(&what, "no port"));
    };
    let ip: std::net::IpAddr = sa
        .address
        .parse()
        .map_err(|_| ConvertError::invalid(&what, format!("address {:?} is not an IP", sa.address)))?;
    let port = u16::try_from(port).map_err(|_| ConvertError::invalid(&what, format!("port {port}")))?;
    let address = SocketAddr::new(ip, port);
    let mut sni = false;
    for f in &l.listener_filters {
        if f.name != TLS_INSPECTOR {
            return Err(ConvertError::unsupported(&what, format!("listener filter {}", f.name)));
        }
        sni = true;
    }
    if l.filter_chains.is_empty() {
        return Err(ConvertError::invalid(&what, "no filter chains"));
    }
    if l.default_filter_chain.is_some() {
        return Err(ConvertError::unsupported(&what, "default_filter_chain"));
    }
    let mut chains = Vec::new();
    let mut http = None;
    for fc in &l.filter_chains {
        if fc.transport_socket.is_some() {
            return Err(ConvertError::unsupported(&what, "a TLS transport socket (the zero-trust issue #6)"));
        }
        let server_names = match &fc.filter_chain_match {
            Some(m) => {
                let only_sni = pb::FilterChainMatch { server_names: m.server_names.clone(), ..Default::default() };
                if *m != only_sni {
                    return Err(ConvertError::unsupported(&what, "filter chain match other than server_names"));
                }
                m.server_names.clone()
            }
            None => Vec::new(),
        };
        let [filter] = fc.filters.as_slice() else {
            return Err(ConvertError::unsupported(&what, "a filter chain with other than one network filter"));
        };
        let Some(ConfigType::TypedConfig(any)) = &filter.config_type else {
            return Err(ConvertError::invalid(&what, format!("filter {} without typed_config", filter.name)));
        };
        match filter.name.as_str() {
            HCM => {
                if l.filter_chains.len() != 1 {
                    return Err(ConvertError::unsupported(&what, "HTTP on more than one filter chain"));
                }
                let hcm = HttpConnectionManager::decode(any.value.as_slice())
                    .map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
                http = Some(http_connection_manager(&hcm, &what)?);
            }
            TCP_PROXY => {
                let tp =
                    TcpProxy::decode(any.value.as_slice()).map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
                let clusters = match tp.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) => vec![(c, 1)],
                    Some(ClusterSpecifier::WeightedClusters(w)) => {
                        w.clusters.into_iter().map(|c| (c.name, c.weight)).filter(|(_, w)| *w > 0).collect()
                    }
                    None => return Err(ConvertError::invalid(&what, "tcp_proxy without a cluster")),
                };
                if clusters.is_empty() {
                    return Err(ConvertError::invalid(&what, "tcp_proxy with a total weight of 0"));
                }
                chains.push(TcpChain { server_names, stat_prefix: tp.stat_prefix, clusters });
            }
            other => return Err(ConvertError::unsupported(&what, format!("network filter {other}"))),
        }
    }
    let kind = match http {
        Some((stat_prefix, route)) => ListenerKind::Http { stat_prefix, route },
        None => ListenerKind::Tcp { chains, sni },
    };
    Ok(ListenerConfig { name: l.name.clone(), address, kind })
}

/// (stat prefix, RDS route name).
fn http_connection_manager(hcm: &HttpConnectionManager, what: &str) -> Result<(String, String), ConvertError> {
    let route = match &hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => rds.route_config_name.clone(),
        _ => return Err(ConvertError::unsupported(what, "routes other than by RDS")),
    };
    let mut saw_router = false;
    for f in &hcm.http_filters {
        match f.name.as_str() {
            ROUTER => saw_router = true,
            FAULT => {
                // The filter with no global config is a no-op until a route configures it; a
                // route that does is refused (see route.rs) until the fault module exists.
                if let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type {
                    let fault = HttpFault::decode(any.value.as_slice())
                        .map_err(|e| ConvertError::invalid(what, e.to_string()))?;
                    if fault != HttpFault::default() {
                        return Err(ConvertError::unsupported(
                            what,
                            "a listener-wide fault filter config (fault injection runs in the fault filter module, issue #5)",
                        ));
                    }
                }
            }
            other => {
                return Err(ConvertError::unsupported(
                    what,
                    format!("HTTP filter {other} (filters beyond routing run as wasm modules, issue #5)"),
                ));
            }
        }
    }
    if !saw_router {
        return Err(ConvertError::invalid(what, "no router filter"));
    }
    Ok((hcm.stat_prefix.clone(), route))
}
