//! Config + registry + proxy → Envoy v3 resources. Pure and deterministic: the same inputs
//! give byte-identical resources (maps are ordered), so resource versions can be content
//! hashes and golden tests can compare output.
//!
//! What each proxy gets is scoped: services exported to its namespace and, if a `Sidecar`
//! applies to it, only the egress hosts it names; VirtualServices bound to the mesh and
//! visible to its namespace; the DestinationRule of each host.

mod authz;
mod clusters;
mod gateway;
mod listeners;
mod locality;
mod mtls;
mod routes;
pub mod tls;
mod wasm;

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use trellis_model::ResourceKey;
use trellis_model::analyze::{ROOT_NAMESPACE, fqdn, sidecar_host_matches};
use trellis_model::registry::{RegistrySnapshot, Service};
use trellis_model::spec::{DestinationRule, Labels, Sidecar, Spec, VirtualService};

use crate::proxy::{ProxyInfo, ProxyKind};

/// Validated configuration, in key order.
#[derive(Debug, Clone, Default)]
pub struct ConfigSnapshot {
    pub items: Vec<(ResourceKey, Spec)>,
    /// Where proxies fetch uploaded wasm modules (the control plane's xDS port); `None`: no
    /// module server, so `trellis://` modules are not delivered.
    pub module_server: Option<std::net::SocketAddr>,
    /// The mesh CA's roots (PEM), served to every proxy as the SDS secret [`ROOT_CA`].
    pub trust_bundle: Option<std::sync::Arc<str>>,
    /// The mesh's trust domain (empty: Istio's default, `cluster.local`).
    pub trust_domain: std::sync::Arc<str>,
}

impl ConfigSnapshot {
    pub fn trust_domain(&self) -> &str {
        if self.trust_domain.is_empty() { tls::TRUST_DOMAIN } else { &self.trust_domain }
    }
}

/// The resources one proxy needs, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translated {
    pub clusters: BTreeMap<String, Cluster>,
    pub endpoints: BTreeMap<String, ClusterLoadAssignment>,
    pub listeners: BTreeMap<String, Listener>,
    pub routes: BTreeMap<String, RouteConfiguration>,
    pub secrets: BTreeMap<String, Secret>,
}

/// The SDS secret holding the mesh's trust bundle (Istio's name for it).
pub const ROOT_CA: &str = "ROOTCA";

/// The trust bundle as an SDS validation context.
fn root_ca(pem: &str) -> Secret {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{CertificateValidationContext, secret};
    Secret {
        name: ROOT_CA.into(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(DataSource {
                specifier: Some(Specifier::InlineBytes(pem.as_bytes().to_vec())),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

/// Name of the route configuration served on the outbound listener.
pub const OUTBOUND_ROUTE: &str = "outbound";
/// Name of the route configuration served on the inbound listener.
pub const INBOUND_ROUTE: &str = "inbound";

/// Istio's cluster name: `outbound|PORT|SUBSET|HOST`.
pub fn cluster_name(direction: &str, port: u32, subset: &str, host: &str) -> String {
    format!("{direction}|{port}|{subset}|{host}")
}

pub(crate) fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// A validated duration string (validation already refused bad ones).
pub(crate) fn parse_duration(s: &trellis_model::spec::DurationStr) -> Option<PbDuration> {
    trellis_model::duration::parse_duration(&s.0).ok().map(duration)
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What applies to one proxy.
#[derive(Clone)]
pub(crate) struct Scope<'a> {
    pub proxy: &'a ProxyInfo,
    pub config: &'a ConfigSnapshot,
    pub registry: &'a RegistrySnapshot,
    sidecar: Option<&'a Sidecar>,
    /// Routes are built for the mesh (`None`) or for this gateway (namespace, name).
    pub gateway: Option<(&'a str, &'a str)>,
}

impl<'a> Scope<'a> {
    fn new(config: &'a ConfigSnapshot, registry: &'a RegistrySnapshot, proxy: &'a ProxyInfo) -> Self {
        // The Sidecar for this workload: one selecting it in its namespace, else the
        // namespace's default (no selector), else the root namespace's default.
        let sidecars: Vec<(&ResourceKey, &Sidecar)> = config
            .items
            .iter()
            .filter_map(|(k, s)| match s {
                Spec::Sidecar(sc) => Some((k, sc)),
                _ => None,
            })
            .collect();
        let by_selector = sidecars.iter().find(|(k, sc)| {
            k.namespace == proxy.namespace
                && sc.workload_selector.as_ref().is_some_and(|ws| selects(&ws.labels, &proxy.labels))
        });
        let ns_default =
            || sidecars.iter().find(|(k, sc)| k.namespace == proxy.namespace && sc.workload_selector.is_none());
        let root_default =
            || sidecars.iter().find(|(k, sc)| k.namespace == ROOT_NAMESPACE && sc.workload_selector.is_none());
        let sidecar = by_selector.or_else(ns_default).or_else(root_default).map(|(_, sc)| *sc);
        Scope { proxy, config, registry, sidecar, gateway: None }
    }

    /// Services this proxy may reach, in hostname order.
    pub fn services(&self) -> impl Iterator<Item = &'a Service> + '_ {
        self.registry.services.values().filter(|s| s.visible_to(&self.proxy.namespace) && self.egress_allows(s))
    }

    fn egress_allows(&self, svc: &Service) -> bool {
        let Some(sidecar) = self.sidecar else { return true };
        if sidecar.egress.is_empty() {
            return true;
        }
        sidecar.egress.iter().any(|e| self.hosts_match(&e.hosts, svc))
    }

    /// Whether a Sidecar egress `hosts` list (`NAMESPACE/HOST` entries) names `svc`.
    pub fn hosts_match(&self, hosts: &[String], svc: &Service) -> bool {
        hosts.iter().any(|h| sidecar_host_matches(h, &self.proxy.namespace, &svc.namespace, &svc.hostname))
    }

    /// Whether a match's `gateways` (resolved against the VirtualService's namespace) lets it
    /// apply where routes are being built: empty inherits the VirtualService's binding.
    pub fn gateways_apply(&self, gateways: &[String], vs_ns: &str) -> bool {
        if gateways.is_empty() {
            return true;
        }
        match self.gateway {
            None => gateways.iter().any(|g| g == "mesh"),
            Some(gw) => gateways.iter().any(|g| gateway_ref(g, vs_ns) == gw),
        }
    }

    /// The Sidecar that applies to this proxy, if any.
    pub fn sidecar(&self) -> Option<&'a Sidecar> {
        self.sidecar
    }

    /// The DestinationRule for a host: from the proxy's namespace first, then the service's,
    /// then the root namespace, then any other that exports it.
    pub fn destination_rule(&self, host: &str, service_ns: &str) -> Option<(&'a ResourceKey, &'a DestinationRule)> {
        let drs: Vec<(&ResourceKey, &DestinationRule)> = self
            .config
            .items
            .iter()
            .filter_map(|(k, s)| match s {
                Spec::DestinationRule(dr) if dr.workload_selector.is_none() && fqdn(&dr.host, &k.namespace) == host => {
                    Some((k, dr))
                }
                _ => None,
            })
            .collect();
        let exported = |k: &ResourceKey, dr: &DestinationRule| {
            dr.export_to.is_empty()
                || dr.export_to.iter().any(|e| {
                    e == "*" || *e == self.proxy.namespace || (e == "." && k.namespace == self.proxy.namespace)
                })
        };
        [self.proxy.namespace.as_str(), service_ns, ROOT_NAMESPACE]
            .iter()
            .find_map(|ns| drs.iter().find(|(k, dr)| k.namespace == *ns && exported(k, dr)).copied())
            .or_else(|| drs.iter().find(|(k, dr)| exported(k, dr)).copied())
    }

    /// VirtualServices bound to the mesh that route `host`, the proxy's namespace first.
    pub fn virtual_service(&self, host: &str) -> Option<(&'a ResourceKey, &'a VirtualService)> {
        let mut found: Vec<(&ResourceKey, &VirtualService)> = self
            .config
            .items
            .iter()
            .filter_map(|(k, s)| match s {
                Spec::VirtualService(vs)
                    if (vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh"))
                        && (vs.export_to.is_empty()
                            || vs.export_to.iter().any(|e| {
                                e == "*"
                                    || *e == self.proxy.namespace
                                    || (e == "." && k.namespace == self.proxy.namespace)
                            }))
                        && vs.hosts.iter().any(|h| {
                            let h = fqdn(h, &k.namespace);
                            match h.strip_prefix('*') {
                                Some(suffix) => host.ends_with(suffix),
                                None => h == host,
                            }
                        }) =>
                {
                    Some((k, vs))
                }
                _ => None,
            })
            .collect();
        found.sort_by_key(|(k, _)| (k.namespace != self.proxy.namespace, k.namespace.clone(), k.name.clone()));
        found.into_iter().next()
    }
}

/// A VirtualService's reference to a Gateway: `ns/name`, or `name` in the VirtualService's
/// namespace.
pub(crate) fn gateway_ref<'g>(g: &'g str, vs_ns: &'g str) -> (&'g str, &'g str) {
    g.split_once('/').unwrap_or((vs_ns, g))
}

/// Translates everything one proxy needs.
pub fn translate(config: &ConfigSnapshot, registry: &RegistrySnapshot, proxy: &ProxyInfo) -> Translated {
    let mut out = translate_outbound(config, registry, proxy);
    let inbound = translate_inbound(config, registry, proxy);
    out.clusters.extend(inbound.clusters);
    out.endpoints.extend(inbound.endpoints);
    out.listeners.extend(inbound.listeners);
    out.routes.extend(inbound.routes);
    out
}

/// The outbound half: what the proxy reaches. Depends only on [`outbound_key`], so proxies
/// that share it share the result.
pub fn translate_outbound(config: &ConfigSnapshot, registry: &RegistrySnapshot, proxy: &ProxyInfo) -> Translated {
    let scope = Scope::new(config, registry, proxy);
    let mut out = Translated::default();
    if let Some(pem) = &config.trust_bundle {
        out.secrets.insert(ROOT_CA.into(), root_ca(pem));
    }
    clusters::outbound(&scope, &mut out);
    if proxy.kind == ProxyKind::Router {
        gateway::listeners(&scope, &mut out);
        if let Some(c) = wasm::module_cluster(&scope) {
            out.clusters.insert(c.name.clone(), c);
        }
        return out;
    }
    routes::outbound(&scope, &mut out);
    listeners::outbound(&scope, &mut out);
    if let Some(c) = wasm::module_cluster(&scope) {
        out.clusters.insert(c.name.clone(), c);
    }
    out
}

/// The inbound half: the workload the proxy fronts. Depends only on [`inbound_key`].
pub fn translate_inbound(config: &ConfigSnapshot, registry: &RegistrySnapshot, proxy: &ProxyInfo) -> Translated {
    let scope = Scope::new(config, registry, proxy);
    let mut out = Translated::default();
    if proxy.kind == ProxyKind::Router {
        return out; // gateways have no workload of their own behind them
    }
    clusters::inbound(&scope, &mut out);
    routes::inbound(&scope, &mut out);
    listeners::inbound(&scope, &mut out);
    out
}

/// Everything about a proxy the outbound translation reads.
pub fn outbound_key(p: &ProxyInfo) -> String {
    format!(
        "{:?}|{}|{:?}|{:?}|{:?}|{}|{}",
        p.kind, p.namespace, p.labels, p.outbound_listener, p.locality, p.network, p.cluster_id
    )
}

/// Everything about a proxy the inbound translation reads.
pub fn inbound_key(p: &ProxyInfo) -> String {
    format!(
        "{:?}|{}|{}|{:?}|{:?}|{:?}|{}",
        p.kind, p.namespace, p.workload_name, p.ips, p.inbound_listener, p.labels, p.mtls
    )
}
