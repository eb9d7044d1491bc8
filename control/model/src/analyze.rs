//! Cross-resource analysis, like `istioctl analyze`: problems no single resource shows —
//! routes to subsets nobody defines, hosts no service backs, gateways that do not exist,
//! conflicting PeerAuthentications, AuthorizationPolicies that can never match, duplicates.
//!
//! Input is a set of already validated resources (from files, the store, or both); output is a
//! list of diagnostics. Errors are things that will break traffic; warnings are suspicious.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::meta::ResourceKey;
use crate::registry::Protocol;
use crate::spec::*;
use crate::validate::labels_to_string;

/// The namespace whose policies apply mesh-wide (Istio's default root namespace).
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "Error",
            Severity::Warning => "Warning",
            Severity::Info => "Info",
        })
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable code, e.g. `TRL0102`.
    pub code: &'static str,
    pub resource: ResourceKey,
    /// Where the resource came from (file and document), when known.
    pub origin: Option<String>,
    /// Field path inside the resource.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}] ({})", self.severity, self.code, self.resource)?;
        if let Some(o) = &self.origin {
            write!(f, " {o}")?;
        }
        if !self.path.is_empty() {
            write!(f, " {}:", self.path)?;
        }
        write!(f, " {}", self.message)
    }
}

/// A validated resource to analyze.
#[derive(Debug, Clone)]
pub struct Analyzed {
    pub key: ResourceKey,
    pub spec: Spec,
    pub origin: Option<String>,
}

/// Whether one Sidecar egress `hosts` entry (`NAMESPACE/HOST`: namespace `*`, `.` = the
/// Sidecar's, `~` = none, or a name; host exact, short, or `*suffix`) names a service.
pub fn sidecar_host_matches(entry: &str, sidecar_ns: &str, svc_ns: &str, svc_host: &str) -> bool {
    let Some((ns, host)) = entry.split_once('/') else { return false };
    let ns_ok = match ns {
        "*" => true,
        "." => svc_ns == sidecar_ns,
        "~" => false,
        other => svc_ns == other,
    };
    let host_ok = match host.strip_prefix('*') {
        Some(suffix) => svc_host.ends_with(suffix),
        None => svc_host == fqdn(host, svc_ns),
    };
    ns_ok && host_ok
}

/// Resolves a host as Istio does: a name without dots is short for
/// `NAME.NAMESPACE.svc.cluster.local`; anything else is used as written.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') || host == "*" { host.to_string() } else { format!("{host}.{namespace}.svc.cluster.local") }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) || pattern == "*",
        None => pattern == host,
    }
}

/// A workload the config knows about: labels and namespace (WorkloadEntries, and the
/// endpoints written inline in ServiceEntries, which inherit the entry's namespace).
struct Workload<'a> {
    namespace: &'a str,
    labels: &'a Labels,
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

struct Ctx {
    out: Vec<Diagnostic>,
}

impl Ctx {
    fn report(
        &mut self,
        item: &Analyzed,
        severity: Severity,
        code: &'static str,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.out.push(Diagnostic {
            severity,
            code,
            resource: item.key.clone(),
            origin: item.origin.clone(),
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Runs every cross-resource check. Diagnostics are sorted: errors first, then by resource.
pub fn analyze(items: &[Analyzed]) -> Vec<Diagnostic> {
    let mut cx = Ctx { out: Vec::new() };

    // Duplicate names.
    let mut seen: BTreeMap<&ResourceKey, &Analyzed> = BTreeMap::new();
    for item in items {
        if let Some(first) = seen.insert(&item.key, item) {
            let where_first = first.origin.clone().unwrap_or_else(|| "elsewhere".into());
            cx.report(
                item,
                Severity::Error,
                "TRL0001",
                "metadata.name",
                format!("{} is defined twice; first at {where_first}", item.key),
            );
        }
    }

    // What the config knows about.
    let mut service_hosts: BTreeSet<String> = BTreeSet::new();
    let mut workloads: Vec<Workload> = Vec::new();
    let mut host_selectors: BTreeMap<String, Vec<(&str, &Labels)>> = BTreeMap::new();
    let mut host_inline_endpoints: BTreeMap<String, Vec<&Labels>> = BTreeMap::new();
    let mut subsets: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut gateways: BTreeSet<(String, String)> = BTreeSet::new();
    // (namespace, host, port number, protocol) of every ServiceEntry port.
    let mut service_ports: Vec<(&str, String, u32, Protocol)> = Vec::new();
    for item in items {
        let ns = item.key.namespace.as_str();
        match &item.spec {
            Spec::ServiceEntry(se) => {
                for h in &se.hosts {
                    service_hosts.insert(fqdn(h, ns));
                    for p in &se.ports {
                        service_ports.push((ns, fqdn(h, ns), p.number, Protocol::parse(&p.protocol)));
                    }
                    if let Some(ws) = &se.workload_selector {
                        host_selectors.entry(fqdn(h, ns)).or_default().push((ns, &ws.labels));
                    }
                    for e in &se.endpoints {
                        host_inline_endpoints.entry(fqdn(h, ns)).or_default().push(&e.labels);
                    }
                }
                for e in &se.endpoints {
                    workloads.push(Workload { namespace: ns, labels: &e.labels });
                }
            }
            Spec::WorkloadEntry(we) => workloads.push(Workload { namespace: ns, labels: &we.labels }),
            Spec::DestinationRule(dr) => {
                let set = subsets.entry(fqdn(&dr.host, ns)).or_default();
                for s in &dr.subsets {
                    set.insert(s.name.as_str());
                }
            }
            Spec::Gateway(_) => {
                gateways.insert((ns.to_string(), item.key.name.clone()));
            }
            _ => {}
        }
    }

    let known_host = |h: &str| service_hosts.iter().any(|s| host_matches(s, h) || host_matches(h, s));
    // Labels of every endpoint of a host: inline endpoints, or WorkloadEntries its selector picks.
    let endpoint_labels = |host: &str| -> Option<Vec<&Labels>> {
        let mut out: Vec<&Labels> = host_inline_endpoints.get(host).cloned().unwrap_or_default();
        if let Some(sels) = host_selectors.get(host) {
            for (ns, sel) in sels {
                out.extend(workloads.iter().filter(|w| w.namespace == *ns && selects(sel, w.labels)).map(|w| w.labels));
            }
        }
        (!out.is_empty()).then_some(out)
    };

    let mut mesh_hosts: BTreeMap<(String, String), Vec<&Analyzed>> = BTreeMap::new();
    let mut dr_hosts: BTreeMap<(String, String), Vec<&Analyzed>> = BTreeMap::new();
    let mut pa_scopes: BTreeMap<(String, String), Vec<&Analyzed>> = BTreeMap::new();

    for item in items {
        let ns = item.key.namespace.clone();
        match &item.spec {
            Spec::VirtualService(vs) => {
                for (i, g) in vs.gateways.iter().enumerate() {
                    if g == "mesh" {
                        continue;
                    }
                    let (gns, gname) = g
                        .split_once('/')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .unwrap_or((ns.clone(), g.clone()));
                    if !gateways.contains(&(gns.clone(), gname.clone())) {
                        cx.report(
                            item,
                            Severity::Error,
                            "TRL0103",
                            format!("spec.gateways[{i}]"),
                            format!("gateway {gns}/{gname} is not defined"),
                        );
                    }
                }
                if vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh") {
                    for h in &vs.hosts {
                        mesh_hosts.entry((ns.clone(), fqdn(h, &ns))).or_default().push(item);
                    }
                }
                let mut dests: Vec<(String, &Destination)> = Vec::new();
                for (i, r) in vs.http.iter().enumerate() {
                    for (j, d) in r.route.iter().enumerate() {
                        if let Some(d) = &d.destination {
                            dests.push((format!("spec.http[{i}].route[{j}].destination"), d));
                        }
                    }
                    if let Some(m) = &r.mirror {
                        dests.push((format!("spec.http[{i}].mirror"), m));
                    }
                    for (j, m) in r.mirrors.iter().enumerate() {
                        if let Some(d) = &m.destination {
                            dests.push((format!("spec.http[{i}].mirrors[{j}].destination"), d));
                        }
                    }
                }
                for (kind, routes) in [
                    ("tls", vs.tls.iter().map(|r| &r.route).collect::<Vec<_>>()),
                    ("tcp", vs.tcp.iter().map(|r| &r.route).collect()),
                ] {
                    for (i, route) in routes.into_iter().enumerate() {
                        for (j, d) in route.iter().enumerate() {
                            if let Some(d) = &d.destination {
                                dests.push((format!("spec.{kind}[{i}].route[{j}].destination"), d));
                            }
                        }
                    }
                }
                for (path, d) in dests {
                    let host = fqdn(&d.host, &ns);
                    if !known_host(&host) {
                        cx.report(
                            item,
                            Severity::Warning,
                            "TRL0101",
                            format!("{path}.host"),
                            format!("no ServiceEntry or registered service defines host {host:?}"),
                        );
                    }
                    if !d.subset.is_empty() && !subsets.get(&host).is_some_and(|s| s.contains(d.subset.as_str())) {
                        cx.report(
                            item,
                            Severity::Error,
                            "TRL0102",
                            format!("{path}.subset"),
                            format!("subset {:?} of host {host:?} is not defined by any DestinationRule", d.subset),
                        );
                    }
                }
            }
            Spec::DestinationRule(dr) => {
                let host = fqdn(&dr.host, &ns);
                if dr.workload_selector.is_none() {
                    dr_hosts.entry((ns.clone(), host.clone())).or_default().push(item);
                }
                if !known_host(&host) {
                    cx.report(
                        item,
                        Severity::Warning,
                        "TRL0101",
                        "spec.host",
                        format!("no ServiceEntry or registered service defines host {host:?}"),
                    );
                }
                if let Some(eps) = endpoint_labels(&host) {
                    for (i, s) in dr.subsets.iter().enumerate() {
                        if !eps.iter().any(|l| selects(&s.labels, l)) {
                            cx.report(
                                item,
                                Severity::Warning,
                                "TRL0105",
                                format!("spec.subsets[{i}].labels"),
                                format!("no known endpoint of {host:?} has labels {}", labels_to_string(&s.labels)),
                            );
                        }
                    }
                }
            }
            Spec::PeerAuthentication(pa) => {
                let sel = pa.selector.as_ref().map(|s| labels_to_string(&s.match_labels)).unwrap_or_default();
                pa_scopes.entry((ns.clone(), sel)).or_default().push(item);
            }
            Spec::AuthorizationPolicy(ap) => authorization_policy(&mut cx, item, ap, &workloads),
            _ => {}
        }
    }

    for ((ns, host), vss) in &mesh_hosts {
        if vss.len() > 1 {
            let names: Vec<String> = vss.iter().map(|v| v.key.name.clone()).collect();
            for vs in vss {
                cx.report(vs, Severity::Warning, "TRL0104", "spec.hosts", format!("host {host:?} is routed by several VirtualServices in namespace {ns} ({}); only one takes effect per route match order", names.join(", ")));
            }
        }
    }
    for ((ns, host), drs) in &dr_hosts {
        if drs.len() > 1 {
            let names: Vec<String> = drs.iter().map(|v| v.key.name.clone()).collect();
            for dr in drs {
                cx.report(
                    dr,
                    Severity::Warning,
                    "TRL0106",
                    "spec.host",
                    format!(
                        "host {host:?} has several DestinationRules in namespace {ns} ({}); they conflict",
                        names.join(", ")
                    ),
                );
            }
        }
    }
    // A TCP listener of its own serves one destination.
    for item in items {
        let Spec::Sidecar(sc) = &item.spec else { continue };
        for (i, e) in sc.egress.iter().enumerate() {
            let Some(port) = &e.port else { continue };
            let named: Vec<&(&str, String, u32, Protocol)> = service_ports
                .iter()
                .filter(|(ns, host, n, _)| {
                    *n == port.number && e.hosts.iter().any(|h| sidecar_host_matches(h, &item.key.namespace, ns, host))
                })
                .collect();
            let protocol = if port.protocol.is_empty() {
                named.first().map(|s| s.3).unwrap_or(Protocol::Tcp)
            } else {
                Protocol::parse(&port.protocol)
            };
            let mut hosts: Vec<&str> = named.iter().map(|s| s.1.as_str()).collect();
            hosts.sort();
            hosts.dedup();
            if !protocol.is_http() && !matches!(protocol, Protocol::Tls | Protocol::Https) && hosts.len() > 1 {
                cx.report(
                    item,
                    Severity::Warning,
                    "TRL0107",
                    format!("spec.egress[{i}].hosts"),
                    format!(
                        "TCP port {} is served by several hosts ({}); a TCP listener has one destination, so only {} is reachable on it",
                        port.number,
                        hosts.join(", "),
                        hosts[0]
                    ),
                );
            }
        }
    }

    for ((ns, sel), pas) in &pa_scopes {
        if pas.len() > 1 {
            let scope = if sel.is_empty() {
                if ns == ROOT_NAMESPACE { "mesh-wide".to_string() } else { format!("namespace-wide in {ns}") }
            } else {
                format!("for workloads {sel} in {ns}")
            };
            let names: Vec<String> = pas.iter().map(|v| v.key.name.clone()).collect();
            for pa in pas {
                cx.report(
                    pa,
                    Severity::Warning,
                    "TRL0201",
                    "spec.selector",
                    format!(
                        "conflicting PeerAuthentications {scope} ({}); only the first by name applies",
                        names.join(", ")
                    ),
                );
            }
        }
    }

    let mut out = cx.out;
    out.sort_by(|a, b| (a.severity, &a.resource, &a.path).cmp(&(b.severity, &b.resource, &b.path)));
    out
}

fn authorization_policy(cx: &mut Ctx, item: &Analyzed, ap: &AuthorizationPolicy, workloads: &[Workload<'_>]) {
    let ns = item.key.namespace.as_str();
    if let Some(sel) = &ap.selector
        && !sel.match_labels.is_empty()
        && ns != ROOT_NAMESPACE
        && !workloads.iter().any(|w| w.namespace == ns && selects(&sel.match_labels, w.labels))
    {
        cx.report(
            item,
            Severity::Warning,
            "TRL0301",
            "spec.selector.matchLabels",
            format!(
                "no known workload in namespace {ns} has labels {}; the policy applies to nothing",
                labels_to_string(&sel.match_labels)
            ),
        );
    }
    for (i, rule) in ap.rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        let mut contradictions: Vec<(String, String)> = Vec::new();
        for (j, f) in rule.from.iter().enumerate() {
            if let Some(s) = &f.source {
                let pairs = [
                    ("principals", &s.principals, &s.not_principals),
                    ("requestPrincipals", &s.request_principals, &s.not_request_principals),
                    ("namespaces", &s.namespaces, &s.not_namespaces),
                    ("serviceAccounts", &s.service_accounts, &s.not_service_accounts),
                    ("ipBlocks", &s.ip_blocks, &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks, &s.not_remote_ip_blocks),
                    ("trustDomains", &s.trust_domains, &s.not_trust_domains),
                ];
                contradictions.extend(contradicting(&format!("{rp}.from[{j}].source"), &pairs));
            }
        }
        for (j, t) in rule.to.iter().enumerate() {
            if let Some(o) = &t.operation {
                let pairs = [
                    ("hosts", &o.hosts, &o.not_hosts),
                    ("ports", &o.ports, &o.not_ports),
                    ("methods", &o.methods, &o.not_methods),
                    ("paths", &o.paths, &o.not_paths),
                ];
                contradictions.extend(contradicting(&format!("{rp}.to[{j}].operation"), &pairs));
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            if !c.values.is_empty() && c.values.iter().all(|v| c.not_values.contains(v)) {
                contradictions
                    .push((format!("{rp}.when[{j}]"), format!("every value of {} is also in notValues", c.key)));
            }
        }
        for (path, why) in contradictions {
            cx.report(item, Severity::Warning, "TRL0302", path, format!("this rule can never match: {why}"));
        }
    }
}

/// Finds fields whose every allowed value is also excluded.
fn contradicting(path: &str, pairs: &[(&str, &Vec<String>, &Vec<String>)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, yes, no) in pairs {
        let excluded_all = no.iter().any(|n| n == "*");
        if !yes.is_empty() && (excluded_all || yes.iter().all(|y| no.contains(y))) {
            let not = format!("not{}{}", name[..1].to_ascii_uppercase(), &name[1..]);
            out.push((format!("{path}.{name}"), format!("every value of {name} is excluded by {not}")));
        }
    }
    out
}
