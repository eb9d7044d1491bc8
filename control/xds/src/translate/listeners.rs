//! LDS.
//!
//! - `outbound`: an explicit HTTP proxy routed by Host — any application can use it with
//!   `http_proxy` or by connecting to it, no traffic capture needed.
//! - `inbound`: the workload's service ports, routed to the local application.
//! - Per-port listeners where one shared listener cannot work, named `BIND_PORT` as Istio
//!   names them: a Sidecar `egress` listener with a `port` (bound to `bind`, default
//!   127.0.0.1) serves that port of its hosts — HTTP routed by Host, TLS routed by SNI
//!   (passthrough, VirtualService `tls` routes), anything else proxied as TCP (VirtualService
//!   `tcp` routes, weighted); a Sidecar `ingress` listener (bound to `bind`, default 0.0.0.0)
//!   takes that port for the workload and forwards it to its `defaultEndpoint`.
//!
//! HTTP listeners run the HTTP connection manager with routes from RDS and the HTTP filter
//! chain: fault, then router.

use envoy_types::pb::envoy::config::core::v3::{AggregatedConfigSource, ApiVersion, ConfigSource, config_source};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    CodecType, RouteSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::{
    ClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight,
};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;
use trellis_model::analyze::fqdn;
use trellis_model::registry::{Protocol, Service, ServicePort};
use trellis_model::spec::{IstioEgressListener, Labels, RouteDestination};

use super::clusters::{InboundPort, inbound_ports, socket};
use super::mtls::{PeerAuthn, secure};
use super::routes::{FAULT_FILTER, destination_cluster, inbound_route_name, route_config};
use super::wasm::{self, Side};
use super::{INBOUND_ROUTE, OUTBOUND_ROUTE, Scope, Translated, cluster_name, selects};

pub const OUTBOUND_LISTENER: &str = "outbound";
pub const INBOUND_LISTENER: &str = "inbound";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";

/// The HTTP filter chain: WasmPlugins by phase around the fault filter, then the router.
pub(crate) fn http_filters(scope: &Scope<'_>, side: Side, port: Option<u32>) -> Vec<HttpFilter> {
    let fault = HttpFilter {
        name: FAULT_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(HttpFault::default()))),
        ..Default::default()
    };
    let mut chain: Vec<(u8, HttpFilter)> = wasm::filters(scope, side, port);
    let at = chain.iter().position(|(rank, _)| *rank > wasm::FAULT_RANK).unwrap_or(chain.len());
    chain.insert(at, (wasm::FAULT_RANK, fault));
    if side == wasm::Side::Server || scope.proxy.kind == crate::proxy::ProxyKind::Router {
        // Authorization on a workload's inbound side and on gateways, after the AUTHN / AUTHZ
        // plugins, before fault and STATS (as Istio).
        let at = chain.iter().position(|(rank, _)| *rank >= wasm::FAULT_RANK).unwrap_or(chain.len());
        for (i, f) in super::authz::rbac_filters(scope).into_iter().enumerate() {
            chain.insert(at + i, (wasm::FAULT_RANK, f));
        }
    }
    let mut filters: Vec<HttpFilter> = chain.into_iter().map(|(_, f)| f).collect();
    filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
        ..Default::default()
    });
    filters
}

pub(crate) fn hcm(stat_prefix: &str, route: &str, filters: Vec<HttpFilter>) -> Filter {
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
                resource_api_version: ApiVersion::V3 as i32,
                ..Default::default()
            }),
            route_config_name: route.to_string(),
        })),
        http_filters: filters,
        use_remote_address: Some(BoolValue { value: false }),
        ..Default::default()
    };
    Filter { name: HCM.into(), config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))) }
}

/// A TCP proxy to one cluster, or weighted over several.
pub(crate) fn tcp_proxy(stat_prefix: &str, mut clusters: Vec<(String, u32)>) -> Filter {
    let specifier = if clusters.len() == 1 {
        ClusterSpecifier::Cluster(clusters.remove(0).0)
    } else {
        ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: clusters
                .into_iter()
                .map(|(name, weight)| ClusterWeight { name, weight, ..Default::default() })
                .collect(),
        })
    };
    let proxy =
        TcpProxy { stat_prefix: stat_prefix.to_string(), cluster_specifier: Some(specifier), ..Default::default() };
    Filter { name: TCP_PROXY.into(), config_type: Some(filter::ConfigType::TypedConfig(pack_any(proxy))) }
}

pub(crate) fn listener(name: &str, (ip, port): (&str, u32), filter_chains: Vec<FilterChain>) -> Listener {
    Listener { name: name.to_string(), address: Some(socket(ip, port)), filter_chains, ..Default::default() }
}

pub(crate) fn chain(filter: Filter) -> FilterChain {
    FilterChain { filters: vec![filter], ..Default::default() }
}

/// Istio's name for a listener of its own: `BIND_PORT`.
pub fn port_listener_name(bind: &str, port: u32) -> String {
    format!("{bind}_{port}")
}

pub(crate) fn outbound(scope: &Scope<'_>, out: &mut Translated) {
    let (ip, port) = &scope.proxy.outbound_listener;
    out.listeners.insert(
        OUTBOUND_LISTENER.into(),
        listener(
            OUTBOUND_LISTENER,
            (ip, *port),
            vec![chain(hcm(OUTBOUND_LISTENER, OUTBOUND_ROUTE, http_filters(scope, Side::Client, None)))],
        ),
    );
    let egress = scope.sidecar().map(|s| s.egress.as_slice()).unwrap_or_default();
    for e in egress {
        if let Some(port) = &e.port {
            egress_listener(scope, e, port.number, &port.protocol, out);
        }
    }
}

/// (cluster, weight) pairs of L4 route destinations; a single destination takes all.
pub(crate) fn weighted(scope: &Scope<'_>, route: &[RouteDestination], vs_ns: &str, port: u32) -> Vec<(String, u32)> {
    let n = route.len() as u32;
    route
        .iter()
        .filter_map(|r| {
            let d = r.destination.as_ref()?;
            let weight = if r.weight > 0 {
                r.weight as u32
            } else if n == 1 {
                100
            } else {
                0
            };
            Some((destination_cluster(scope, d, vs_ns, port), weight))
        })
        .filter(|(_, w)| *w > 0)
        .collect()
}

/// A Sidecar egress listener for one port of its hosts.
fn egress_listener(scope: &Scope<'_>, e: &IstioEgressListener, port: u32, protocol: &str, out: &mut Translated) {
    let services: Vec<(&Service, &ServicePort)> =
        scope.services().filter(|s| scope.hosts_match(&e.hosts, s)).filter_map(|s| Some((s, s.port(port)?))).collect();
    let protocol = if protocol.is_empty() {
        services.first().map(|(_, p)| p.protocol).unwrap_or(Protocol::Tcp)
    } else {
        Protocol::parse(protocol)
    };
    let bind = if e.bind.is_empty() { "127.0.0.1" } else { e.bind.as_str() };
    let name = port_listener_name(bind, port);
    let chains = if protocol.is_http() {
        out.routes.insert(name.clone(), route_config(scope, &name, services.iter().copied(), true));
        vec![chain(hcm(&name, &name, http_filters(scope, Side::Client, Some(port))))]
    } else if matches!(protocol, Protocol::Tls | Protocol::Https) {
        tls_chains(scope, &services, port)
    } else {
        // One TCP destination per port: the first host in name order (`trellis analyze`
        // warns when several share a TCP port).
        let Some((svc, _)) = services.first() else { return };
        let clusters = tcp_destinations(scope, svc, port);
        vec![chain(tcp_proxy(&name, clusters))]
    };
    if chains.is_empty() {
        return;
    }
    let mut l = listener(&name, (bind, port), chains);
    if matches!(protocol, Protocol::Tls | Protocol::Https) {
        l.listener_filters = vec![tls_inspector()];
    }
    out.listeners.insert(name, l);
}

/// The listener filter that reads the TLS ClientHello, so chains can match on SNI.
pub(crate) fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: TLS_INSPECTOR.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(TlsInspector::default()))),
        ..Default::default()
    }
}

/// The L4 match conditions (port, destination subnets, source labels, source namespace,
/// gateways) of a `tcp` or `tls` route.
pub(crate) type L4Match<'m> = (Option<u32>, &'m [String], &'m Labels, &'m str, &'m [String]);

/// Whether an L4 match applies to traffic from this proxy on `port`. Listeners here are bound
/// explicitly, with no original destination address to compare, so a match that names
/// `destinationSubnets` never applies (traffic falls through to the next route).
pub(crate) fn l4_applies(
    scope: &Scope<'_>,
    port: u32,
    vs_ns: &str,
    (m_port, subnets, labels, ns, gateways): L4Match<'_>,
) -> bool {
    m_port.is_none_or(|p| p == port)
        && subnets.is_empty()
        && (labels.is_empty() || selects(labels, &scope.proxy.labels))
        && (ns.is_empty() || ns == scope.proxy.namespace)
        && scope.gateways_apply(gateways, vs_ns)
}

/// Where TCP traffic for `svc:port` goes: the first VirtualService `tcp` route that applies
/// (matching port, source labels and namespace, bound to the mesh), else the service.
fn tcp_destinations(scope: &Scope<'_>, svc: &Service, port: u32) -> Vec<(String, u32)> {
    if let Some((key, vs)) = scope.virtual_service(&svc.hostname) {
        for r in &vs.tcp {
            let applies = r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    l4_applies(
                        scope,
                        port,
                        &key.namespace,
                        (m.port, &m.destination_subnets, &m.source_labels, &m.source_namespace, &m.gateways),
                    )
                });
            if applies {
                let clusters = weighted(scope, &r.route, &key.namespace, port);
                if !clusters.is_empty() {
                    return clusters;
                }
            }
        }
    }
    vec![(cluster_name("outbound", port, "", &svc.hostname), 100)]
}

/// TLS passthrough routed by SNI: VirtualService `tls` routes first, then each host by name.
fn tls_chains(scope: &Scope<'_>, services: &[(&Service, &ServicePort)], port: u32) -> Vec<FilterChain> {
    let mut chains: Vec<FilterChain> = Vec::new();
    let mut taken: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut add = |names: Vec<String>, clusters: Vec<(String, u32)>, stat: &str| {
        let names: Vec<String> = names.into_iter().filter(|n| taken.insert(n.clone())).collect();
        if names.is_empty() || clusters.is_empty() {
            return;
        }
        chains.push(FilterChain {
            filter_chain_match: Some(FilterChainMatch { server_names: names, ..Default::default() }),
            filters: vec![tcp_proxy(stat, clusters)],
            ..Default::default()
        });
    };
    for (svc, _) in services {
        if let Some((key, vs)) = scope.virtual_service(&svc.hostname) {
            for r in &vs.tls {
                for m in r.matches.iter().filter(|m| {
                    l4_applies(
                        scope,
                        port,
                        &key.namespace,
                        (m.port, &m.destination_subnets, &m.source_labels, &m.source_namespace, &m.gateways),
                    )
                }) {
                    let names = m.sni_hosts.iter().map(|h| fqdn(h, &key.namespace)).collect();
                    add(names, weighted(scope, &r.route, &key.namespace, port), &svc.hostname);
                }
            }
        }
        add(vec![svc.hostname.clone()], vec![(cluster_name("outbound", port, "", &svc.hostname), 100)], &svc.hostname);
    }
    chains
}

pub(crate) fn inbound(scope: &Scope<'_>, out: &mut Translated) {
    let (ip, port) = &scope.proxy.inbound_listener;
    let peer_authn = PeerAuthn::of(scope);
    let ports = inbound_ports(scope);
    let shared: Vec<InboundPort> = ports.iter().filter(|p| p.bind.is_none()).cloned().collect();
    let filter = hcm(INBOUND_LISTENER, INBOUND_ROUTE, http_filters(scope, Side::Server, None));
    let mut l = listener(INBOUND_LISTENER, (ip, *port), vec![chain(filter.clone())]);
    secure(scope, &mut l, filter, true, peer_authn.shared(&shared));
    out.listeners.insert(INBOUND_LISTENER.into(), l);
    for p in ports {
        let Some(bind) = &p.bind else { continue };
        let name = port_listener_name(bind, p.number);
        let filter = ingress_filter(scope, &p, &name);
        let mut l = listener(&name, (bind, p.number), vec![chain(filter.clone())]);
        let mode = peer_authn.port(&p);
        secure(scope, &mut l, filter, p.protocol.is_http(), (mode.tls(), mode.plaintext()));
        out.listeners.insert(name.clone(), l);
    }
}

fn ingress_filter(scope: &Scope<'_>, p: &InboundPort, name: &str) -> Filter {
    if p.protocol.is_http() {
        hcm(name, &inbound_route_name(p.number), http_filters(scope, Side::Server, Some(p.number)))
    } else {
        tcp_proxy(name, vec![(p.cluster(), 100)])
    }
}
