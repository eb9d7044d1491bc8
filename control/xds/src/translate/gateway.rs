//! Gateways: what a `router` proxy (an ingress or egress gateway) serves. Every Gateway whose
//! `selector` matches the proxy's labels contributes its servers; servers on one port share a
//! listener `BIND_PORT`, as in Istio.
//!
//! - HTTP / HTTP2 / GRPC servers: the HTTP connection manager with route configuration
//!   `http.PORT` — a virtual host per VirtualService bound to the gateway (`gateways:` names it,
//!   `ns/name` or `name` in the VirtualService's namespace) whose hosts the server exposes
//!   (`hosts: [ns/host]`, `*` for any), with its http routes. `tls.httpsRedirect` makes every
//!   route of the server a redirect to https.
//! - TLS servers in PASSTHROUGH mode: chains by SNI from the bound VirtualServices' `tls` routes.
//! - TCP servers: the first bound VirtualService `tcp` route for the port.
//!
//! Servers that terminate TLS (HTTPS, or TLS in SIMPLE / MUTUAL / ISTIO_MUTUAL mode) need
//! certificates from the CA (the zero-trust issue) and are not served yet; AUTO_PASSTHROUGH
//! belongs to east-west gateways (multi-cluster). Both are skipped and logged.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch};
use envoy_types::pb::envoy::config::route::v3::{
    RedirectAction, Route, RouteConfiguration, VirtualHost, redirect_action, route,
};
use envoy_types::pb::google::protobuf::BoolValue;
use trellis_model::ResourceKey;
use trellis_model::analyze::fqdn;
use trellis_model::registry::Protocol;
use trellis_model::spec::{Gateway, Server, ServerTlsMode, Spec, VirtualService};

use super::listeners::{
    chain, hcm, http_filters, l4_applies, listener, port_listener_name, tcp_proxy, tls_inspector, weighted,
};
use super::routes::vs_routes;
use super::wasm::Side;
use super::{Scope, Translated, gateway_ref, selects};

/// One gateway server with the gateway it belongs to.
struct Bound<'a> {
    key: &'a ResourceKey,
    server: &'a Server,
}

/// Whether a server's `hosts` entry (`ns/host`, `host`, `*`) exposes a VirtualService host.
fn exposes(entry: &str, gw_ns: &str, vs_key: &ResourceKey, vs_host: &str) -> bool {
    let (ns, host) = entry.split_once('/').unwrap_or(("*", entry));
    let ns_ok = match ns {
        "*" => true,
        "." => vs_key.namespace == gw_ns,
        other => vs_key.namespace == other,
    };
    let wild = |pattern: &str, h: &str| match pattern.strip_prefix('*') {
        Some(suffix) => h.ends_with(suffix),
        None => pattern == h,
    };
    ns_ok && (host == "*" || wild(host, vs_host) || wild(vs_host, host))
}

/// VirtualServices bound to the gateway `key`, in name order.
fn bound_virtual_services<'a>(scope: &Scope<'a>, key: &ResourceKey) -> Vec<(&'a ResourceKey, &'a VirtualService)> {
    scope
        .config
        .items
        .iter()
        .filter_map(|(k, s)| match s {
            Spec::VirtualService(vs)
                if vs.gateways.iter().any(|g| gateway_ref(g, &k.namespace) == (&key.namespace[..], &key.name[..])) =>
            {
                Some((k, vs))
            }
            _ => None,
        })
        .collect()
}

pub(crate) fn listeners(scope: &Scope<'_>, out: &mut Translated) {
    let mut by_port: BTreeMap<(String, u32), Vec<Bound<'_>>> = BTreeMap::new();
    for (key, spec) in &scope.config.items {
        let Spec::Gateway(gw) = spec else { continue };
        if !selects_proxy(gw, scope) {
            continue;
        }
        for server in &gw.servers {
            let Some(port) = &server.port else { continue };
            if server.bind.starts_with("unix://") {
                tracing::warn!(gateway = %key, bind = %server.bind, "gateway servers on unix sockets are not served");
                continue;
            }
            let bind = if server.bind.is_empty() { "0.0.0.0".to_string() } else { server.bind.clone() };
            // Outside Kubernetes there is no Service in front: the proxy listens on targetPort
            // when it is set.
            by_port.entry((bind, port.target_port.unwrap_or(port.number))).or_default().push(Bound { key, server });
        }
    }
    for ((bind, port), servers) in by_port {
        let name = port_listener_name(&bind, port);
        let protocol = servers[0].server.port.as_ref().map(|p| Protocol::parse(&p.protocol)).unwrap_or(Protocol::Tcp);
        let terminates = |s: &Server| {
            s.tls.as_ref().is_some_and(|t| {
                matches!(
                    t.mode,
                    ServerTlsMode::SIMPLE
                        | ServerTlsMode::MUTUAL
                        | ServerTlsMode::ISTIO_MUTUAL
                        | ServerTlsMode::OPTIONAL_MUTUAL
                )
            })
        };
        if protocol == Protocol::Https || servers.iter().any(|b| terminates(b.server)) {
            tracing::warn!(
                gateway_port = port,
                "gateway servers that terminate TLS need the CA (issue #6); not served yet"
            );
            continue;
        }
        let chains = if protocol.is_http() {
            let route_name = format!("http.{port}");
            out.routes.insert(route_name.clone(), route_config(scope, &route_name, port, &servers));
            vec![chain(hcm(&name, &route_name, http_filters(scope, Side::Client, Some(port))))]
        } else if protocol == Protocol::Tls {
            if servers.iter().any(|b| b.server.tls.as_ref().is_some_and(|t| t.mode == ServerTlsMode::AUTO_PASSTHROUGH))
            {
                tracing::warn!(
                    gateway_port = port,
                    "AUTO_PASSTHROUGH (east-west gateways) is part of multi-cluster; not served yet"
                );
                continue;
            }
            tls_chains(scope, port, &servers)
        } else {
            tcp_chain(scope, port, &name, &servers).into_iter().collect()
        };
        if chains.is_empty() {
            continue;
        }
        let mut l = listener(&name, (&bind, port), chains);
        if protocol == Protocol::Tls {
            l.listener_filters = vec![tls_inspector()];
        }
        out.listeners.insert(name, l);
    }
}

fn selects_proxy(gw: &Gateway, scope: &Scope<'_>) -> bool {
    !gw.selector.is_empty() && selects(&gw.selector, &scope.proxy.labels)
}

fn route_config(scope: &Scope<'_>, name: &str, port: u32, servers: &[Bound<'_>]) -> RouteConfiguration {
    let mut virtual_hosts: Vec<VirtualHost> = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for b in servers {
        let gw_scope = Scope { gateway: Some((&b.key.namespace, &b.key.name)), ..scope.clone() };
        let redirect = b.server.tls.as_ref().is_some_and(|t| t.https_redirect);
        for (vs_key, vs) in bound_virtual_services(scope, b.key) {
            let hosts: Vec<String> = vs
                .hosts
                .iter()
                .filter(|h| b.server.hosts.iter().any(|e| exposes(e, &b.key.namespace, vs_key, h)))
                .map(|h| if h.contains('.') || h == "*" { h.clone() } else { fqdn(h, &vs_key.namespace) })
                .collect();
            let mut domains = Vec::new();
            for h in hosts {
                for d in [h.clone(), format!("{h}:{port}")] {
                    if h == "*" && d != "*" {
                        continue;
                    }
                    if used.insert(d.clone()) {
                        domains.push(d);
                    }
                }
            }
            if domains.is_empty() {
                continue;
            }
            let mut routes = vs_routes(&gw_scope, vs_key, vs, port);
            if redirect {
                routes = vec![https_redirect()];
            }
            if routes.is_empty() {
                continue;
            }
            virtual_hosts.push(VirtualHost {
                name: format!("{}/{}:{port}", vs_key.namespace, vs_key.name),
                domains,
                routes,
                ..Default::default()
            });
        }
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

fn https_redirect() -> Route {
    Route {
        name: "https-redirect".into(),
        r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
            path_specifier: Some(envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix(
                "/".into(),
            )),
            ..Default::default()
        }),
        action: Some(route::Action::Redirect(RedirectAction {
            scheme_rewrite_specifier: Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn tls_chains(scope: &Scope<'_>, port: u32, servers: &[Bound<'_>]) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    let mut taken = std::collections::BTreeSet::new();
    for b in servers {
        let gw_scope = Scope { gateway: Some((&b.key.namespace, &b.key.name)), ..scope.clone() };
        for (vs_key, vs) in bound_virtual_services(scope, b.key) {
            for r in &vs.tls {
                for m in r.matches.iter().filter(|m| {
                    l4_applies(
                        &gw_scope,
                        port,
                        &vs_key.namespace,
                        (m.port, &m.destination_subnets, &m.source_labels, &m.source_namespace, &m.gateways),
                    )
                }) {
                    let names: Vec<String> = m
                        .sni_hosts
                        .iter()
                        .filter(|h| b.server.hosts.iter().any(|e| exposes(e, &b.key.namespace, vs_key, h)))
                        .filter(|h| taken.insert((*h).clone()))
                        .cloned()
                        .collect();
                    let clusters = weighted(scope, &r.route, &vs_key.namespace, port);
                    if names.is_empty() || clusters.is_empty() {
                        continue;
                    }
                    chains.push(FilterChain {
                        filter_chain_match: Some(FilterChainMatch { server_names: names, ..Default::default() }),
                        filters: vec![tcp_proxy(&format!("{}/{}", vs_key.namespace, vs_key.name), clusters)],
                        ..Default::default()
                    });
                }
            }
        }
    }
    chains
}

fn tcp_chain(scope: &Scope<'_>, port: u32, name: &str, servers: &[Bound<'_>]) -> Option<FilterChain> {
    for b in servers {
        let gw_scope = Scope { gateway: Some((&b.key.namespace, &b.key.name)), ..scope.clone() };
        for (vs_key, vs) in bound_virtual_services(scope, b.key) {
            for r in &vs.tcp {
                let applies = r.matches.is_empty()
                    || r.matches.iter().any(|m| {
                        l4_applies(
                            &gw_scope,
                            port,
                            &vs_key.namespace,
                            (m.port, &m.destination_subnets, &m.source_labels, &m.source_namespace, &m.gateways),
                        )
                    });
                let clusters = weighted(scope, &r.route, &vs_key.namespace, port);
                if applies && !clusters.is_empty() {
                    return Some(chain(tcp_proxy(name, clusters)));
                }
            }
        }
    }
    None
}
