//! Per-resource validation, like Istio's validating webhook: the envelope (kind, name,
//! namespace), the typed spec (unknown fields, types, enums) and the semantic rules of each kind
//! (ranges, weights, durations, regexes, host names, principals, ports). Every error carries the
//! field path, e.g. `spec.http[0].route[1].weight`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::duration::parse_duration;
use crate::kind::Kind;
use crate::meta::{Resource, ResourceKey};
use crate::spec::*;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path from the document root, e.g. `spec.http[0].timeout`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems found in one resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidationErrors {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Collects errors while walking a spec.
#[derive(Default)]
struct V {
    errors: Vec<FieldError>,
}

impl V {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError { path: path.into(), message: message.into() });
    }
}

/// Validates one resource. `default_namespace` is used for namespaced kinds that name no
/// namespace (the API fills it in from the request path, the CLI from `-n`).
pub fn validate_resource(res: &Resource, default_namespace: &str) -> Result<(ResourceKey, Spec), ValidationErrors> {
    let mut v = V::default();
    let kind = match Kind::from_type(&res.api_version, &res.kind) {
        Ok(k) => k,
        Err(msg) => {
            let path = if Kind::ALL.iter().any(|k| k.name() == res.kind) { "apiVersion" } else { "kind" };
            v.err(path, msg);
            return Err(ValidationErrors { errors: v.errors });
        }
    };
    let meta = &res.metadata;
    if meta.name.is_empty() {
        v.err("metadata.name", "required");
    } else if !is_dns1123_subdomain(&meta.name) {
        v.err(
            "metadata.name",
            format!("{:?} is not a valid name: lower-case letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit", meta.name),
        );
    }
    let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or(default_namespace);
    if kind.namespaced() {
        if !is_dns1123_label(namespace) {
            v.err(
                "metadata.namespace",
                format!(
                    "{namespace:?} is not a valid namespace: lower-case letters, digits and '-', at most 63 characters"
                ),
            );
        }
    } else if meta.namespace.as_deref().is_some_and(|n| !n.is_empty()) {
        v.err("metadata.namespace", format!("{kind} is cluster-scoped and takes no namespace"));
    }
    for (k, _) in meta.labels.iter() {
        if !is_qualified_name(k) {
            v.err(
                format!("metadata.labels[{k}]"),
                "label keys are [prefix/]name with letters, digits, '-', '_' and '.'",
            );
        }
    }

    let spec_value = if res.spec.is_null() { Value::Object(Default::default()) } else { res.spec.clone() };
    let spec = match kind {
        Kind::VirtualService => check(&spec_value, &mut v, virtual_service, Spec::VirtualService),
        Kind::DestinationRule => check(&spec_value, &mut v, destination_rule, Spec::DestinationRule),
        Kind::Gateway => check(&spec_value, &mut v, gateway, Spec::Gateway),
        Kind::ServiceEntry => check(&spec_value, &mut v, service_entry, Spec::ServiceEntry),
        Kind::WorkloadEntry => {
            check(&spec_value, &mut v, |s, v| workload_entry(s, "spec", None, v), Spec::WorkloadEntry)
        }
        Kind::Sidecar => check(&spec_value, &mut v, sidecar, Spec::Sidecar),
        Kind::PeerAuthentication => check(&spec_value, &mut v, peer_authentication, Spec::PeerAuthentication),
        Kind::AuthorizationPolicy => check(&spec_value, &mut v, authorization_policy, Spec::AuthorizationPolicy),
        Kind::RequestAuthentication => check(&spec_value, &mut v, request_authentication, Spec::RequestAuthentication),
        Kind::Telemetry => check(&spec_value, &mut v, telemetry, Spec::Telemetry),
        Kind::WasmPlugin => check(&spec_value, &mut v, wasm_plugin, Spec::WasmPlugin),
        Kind::MeshCluster => check(&spec_value, &mut v, |s, v| mesh_cluster(&meta.name, s, v), Spec::MeshCluster),
        Kind::ApiToken => check(&spec_value, &mut v, api_token, Spec::ApiToken),
        Kind::WorkloadToken => check(&spec_value, &mut v, workload_token, Spec::WorkloadToken),
    };
    match spec {
        Some(spec) if v.errors.is_empty() => Ok((ResourceKey::new(kind, namespace, meta.name.clone()), spec)),
        _ => Err(ValidationErrors { errors: v.errors }),
    }
}

/// Parses a typed spec from JSON, turning serde's error into a field error with its path.
pub fn parse_spec<T: DeserializeOwned>(value: &Value) -> Result<T, FieldError> {
    parse_spec_at(value).map_err(|(e, _)| e)
}

/// Like [`parse_spec`], also returning the failing path's segments when it ends at an object
/// key (so the caller can drop that key and look for further errors).
fn parse_spec_at<T: DeserializeOwned>(value: &Value) -> Result<T, (FieldError, Option<Vec<Step>>)> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { "spec".to_string() } else { format!("spec.{path}") };
        let steps: Option<Vec<Step>> = e
            .path()
            .iter()
            .map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                _ => None,
            })
            .collect();
        let removable = steps.filter(|s| matches!(s.last(), Some(Step::Key(_))));
        (FieldError { path, message: yaml_hint(e.into_inner().to_string()) }, removable)
    })
}

/// One step of a path into a JSON value.
enum Step {
    Key(String),
    Index(usize),
}

/// Removes the object key at the end of `steps`. False if the path does not lead there.
fn remove_at(value: &mut Value, steps: &[Step]) -> bool {
    let Some((Step::Key(last), parents)) = steps.split_last() else {
        return false;
    };
    let mut cur = value;
    for step in parents {
        cur = match (step, cur) {
            (Step::Key(k), Value::Object(m)) => match m.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (Step::Index(i), Value::Array(a)) => match a.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match cur {
        Value::Object(m) => m.remove(last).is_some(),
        _ => false,
    }
}

/// Adds the usual explanation when YAML turned an unquoted word into a boolean.
pub(crate) fn yaml_hint(message: String) -> String {
    if message.starts_with("invalid type: boolean") {
        format!("{message} (YAML reads unquoted y, n, yes, no, on, off, true, false as booleans: quote the value)")
    } else {
        message
    }
}

/// At most this many field errors are collected from one spec before giving up.
const MAX_PARSE_ERRORS: usize = 50;

/// Parses a typed spec, runs its semantic checks, and wraps it. Every unknown, refused or
/// mistyped field is reported (not just the first): each failing key is dropped and the spec
/// parsed again. Semantic rules run only on a spec that parsed cleanly.
fn check<T: DeserializeOwned>(
    value: &Value,
    v: &mut V,
    rules: impl FnOnce(&T, &mut V),
    wrap: fn(T) -> Spec,
) -> Option<Spec> {
    let mut value = value.clone();
    let mut failed = false;
    for _ in 0..MAX_PARSE_ERRORS {
        match parse_spec_at::<T>(&value) {
            Ok(t) if !failed => {
                rules(&t, v);
                return Some(wrap(t));
            }
            Ok(_) => return None,
            Err((e, steps)) => {
                failed = true;
                v.errors.push(e);
                match steps {
                    Some(steps) if remove_at(&mut value, &steps) => continue,
                    _ => return None,
                }
            }
        }
    }
    None
}

// ===== common checks =====

pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_qualified_name(s: &str) -> bool {
    let name = match s.rsplit_once('/') {
        Some((prefix, name)) => {
            if !is_dns1123_subdomain(prefix) {
                return false;
            }
            name
        }
        None => s,
    };
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn is_host_label(l: &str) -> bool {
    let b = l.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A service host: a DNS name, optionally starting with a `*.` wildcard, or `*` when allowed.
fn check_host(host: &str, path: &str, allow_star: bool, v: &mut V) {
    if host.is_empty() {
        v.err(path, "host must not be empty");
        return;
    }
    if host == "*" {
        if !allow_star {
            v.err(path, "\"*\" is not allowed here");
        }
        return;
    }
    let rest = host.strip_prefix("*.").unwrap_or(host);
    if host.len() > 255 || !rest.split('.').all(is_host_label) {
        v.err(
            path,
            format!(
                "{host:?} is not a valid host: DNS labels of letters, digits and '-', optionally prefixed by \"*.\""
            ),
        );
    }
}

fn check_port(port: u32, path: &str, v: &mut V) {
    if !(1..=65535).contains(&port) {
        v.err(path, format!("port {port} is out of range 1-65535"));
    }
}

fn check_duration(d: &DurationStr, path: &str, v: &mut V) -> Option<Duration> {
    match parse_duration(&d.0) {
        Ok(dur) if dur < Duration::from_millis(1) => {
            v.err(path, format!("duration {:?} must be at least 1ms", d.0));
            None
        }
        Ok(dur) if dur.subsec_nanos() % 1_000_000 != 0 => {
            v.err(path, format!("duration {:?}: only millisecond precision is supported", d.0));
            None
        }
        Ok(dur) => Some(dur),
        Err(msg) => {
            v.err(path, msg);
            None
        }
    }
}

fn check_percent(p: &Percent, path: &str, v: &mut V) {
    if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() {
        v.err(format!("{path}.value"), format!("percentage {} is out of range 0-100", p.value));
    }
}

fn check_non_negative(n: Option<i64>, path: &str, v: &mut V) {
    if let Some(n) = n
        && n < 0
    {
        v.err(path, format!("{n} must not be negative"));
    }
}

fn check_percentage_int(n: Option<i64>, path: &str, v: &mut V) {
    if let Some(n) = n
        && !(0..=100).contains(&n)
    {
        v.err(path, format!("{n} is out of range 0-100"));
    }
}

fn check_regex(re: &str, path: &str, v: &mut V) {
    if let Err(e) = regex::Regex::new(re) {
        v.err(path, format!("invalid regular expression {re:?}: {e}"));
    }
}

/// Istio's StringMatch is a oneof: at most one of exact, prefix, regex. An empty match is
/// allowed (for headers and query parameters it means "present").
fn check_string_match(m: &StringMatch, path: &str, v: &mut V) {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()].iter().filter(|b| **b).count();
    if set > 1 {
        v.err(path, "only one of exact, prefix or regex may be set");
    }
    if let Some(re) = &m.regex {
        check_regex(re, &format!("{path}.regex"), v);
    }
}

fn check_header_name(name: &str, path: &str, v: &mut V) {
    let valid = !name.is_empty()
        && name
            .strip_prefix(':')
            .unwrap_or(name)
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
    if !valid {
        v.err(path, format!("{name:?} is not a valid header name"));
    } else if name != name.to_ascii_lowercase() {
        v.err(path, format!("header name {name:?} must be lower-case"));
    }
}

fn check_ip_or_cidr(s: &str, path: &str, v: &mut V) {
    let ok = match s.split_once('/') {
        Some((ip, len)) => match (ip.parse::<IpAddr>(), len.parse::<u8>()) {
            (Ok(IpAddr::V4(_)), Ok(l)) => l <= 32,
            (Ok(IpAddr::V6(_)), Ok(l)) => l <= 128,
            _ => false,
        },
        None => s.parse::<IpAddr>().is_ok(),
    };
    if !ok {
        v.err(path, format!("{s:?} is not an IP address or CIDR block"));
    }
}

fn check_selector_labels(labels: &Labels, path: &str, v: &mut V) {
    for (k, val) in labels {
        if !is_qualified_name(k) {
            v.err(format!("{path}[{k}]"), "label keys are [prefix/]name with letters, digits, '-', '_' and '.'");
        }
        if val.contains('*') {
            v.err(format!("{path}[{k}]"), "wildcards are not allowed in label selectors");
        }
    }
}

fn check_protocol(p: &str, path: &str, v: &mut V) {
    const PROTOCOLS: [&str; 10] =
        ["HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "MYSQL", "REDIS", "TCP", "TLS"];
    if p.is_empty() {
        return;
    }
    if p.eq_ignore_ascii_case("UDP") {
        v.err(path, "UDP is not supported by Trellis (nor proxied by Istio)");
    } else if !PROTOCOLS.iter().any(|q| q.eq_ignore_ascii_case(p)) {
        v.err(path, format!("unknown protocol {p:?}; expected one of {}", PROTOCOLS.join(", ")));
    }
}

/// `*`, or a value with at most one `*`, at its start or its end (Istio's rule for principals,
/// namespaces, hosts and paths in AuthorizationPolicy).
fn check_auth_value(s: &str, path: &str, v: &mut V) {
    if s.is_empty() {
        v.err(path, "empty value");
        return;
    }
    let stars = s.matches('*').count();
    if s != "*" && (stars > 1 || (stars == 1 && !s.starts_with('*') && !s.ends_with('*'))) {
        v.err(path, format!("{s:?}: a wildcard '*' is only allowed as a prefix or suffix"));
    }
}

// ===== networking =====

fn virtual_service(s: &VirtualService, v: &mut V) {
    if s.hosts.is_empty() {
        v.err("spec.hosts", "at least one host is required");
    }
    let uses_gateway = s.gateways.iter().any(|g| g != "mesh");
    let mut seen = BTreeSet::new();
    for (i, h) in s.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        check_host(h, &path, uses_gateway, v);
        if !seen.insert(h) {
            v.err(path, format!("duplicate host {h:?}"));
        }
    }
    for (i, g) in s.gateways.iter().enumerate() {
        check_gateway_ref(g, &format!("spec.gateways[{i}]"), v);
    }
    if s.http.is_empty() && s.tls.is_empty() && s.tcp.is_empty() {
        v.err("spec", "at least one of http, tls or tcp routes is required");
    }
    for (i, r) in s.http.iter().enumerate() {
        http_route(r, &format!("spec.http[{i}]"), v);
    }
    for (i, r) in s.tls.iter().enumerate() {
        let path = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            v.err(format!("{path}.match"), "TLS routes need at least one match with sniHosts");
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            if m.sni_hosts.is_empty() {
                v.err(format!("{mp}.sniHosts"), "at least one SNI host is required");
            }
            for (k, h) in m.sni_hosts.iter().enumerate() {
                check_host(h, &format!("{mp}.sniHosts[{k}]"), true, v);
            }
            l4_match(&m.destination_subnets, m.port, &m.source_labels, &m.gateways, &m.source_namespace, &mp, v);
        }
        route_destinations(r.route.iter().map(|d| (d.destination.as_ref(), d.weight)), &format!("{path}.route"), v);
    }
    for (i, r) in s.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            l4_match(&m.destination_subnets, m.port, &m.source_labels, &m.gateways, &m.source_namespace, &mp, v);
        }
        route_destinations(r.route.iter().map(|d| (d.destination.as_ref(), d.weight)), &format!("{path}.route"), v);
    }
    check_export_to(&s.export_to, v);
}

/// The parts TLS and TCP route matches share.
fn l4_match(
    subnets: &[String],
    port: Option<u32>,
    source_labels: &Labels,
    gateways: &[String],
    source_namespace: &str,
    path: &str,
    v: &mut V,
) {
    for (k, c) in subnets.iter().enumerate() {
        check_ip_or_cidr(c, &format!("{path}.destinationSubnets[{k}]"), v);
    }
    match_scope(port, source_labels, gateways, source_namespace, path, v);
}

/// Port, source labels, gateways and source namespace of any route match.
fn match_scope(
    port: Option<u32>,
    source_labels: &Labels,
    gateways: &[String],
    source_namespace: &str,
    path: &str,
    v: &mut V,
) {
    if let Some(p) = port {
        check_port(p, &format!("{path}.port"), v);
    }
    check_selector_labels(source_labels, &format!("{path}.sourceLabels"), v);
    for (i, g) in gateways.iter().enumerate() {
        check_gateway_ref(g, &format!("{path}.gateways[{i}]"), v);
    }
    if !source_namespace.is_empty() && !is_dns1123_label(source_namespace) {
        v.err(format!("{path}.sourceNamespace"), format!("{source_namespace:?} is not a namespace"));
    }
}

fn check_gateway_ref(g: &str, path: &str, v: &mut V) {
    if g == "mesh" {
        return;
    }
    let (ns, name) = g.split_once('/').unwrap_or(("", g));
    if (!ns.is_empty() && !is_dns1123_label(ns)) || !is_dns1123_subdomain(name) {
        v.err(path, format!("{g:?} is not a gateway reference: \"mesh\", \"name\" or \"namespace/name\""));
    }
}

fn check_export_to(export_to: &[String], v: &mut V) {
    for (i, e) in export_to.iter().enumerate() {
        if e != "*" && e != "." && e != "~" && !is_dns1123_label(e) {
            v.err(format!("spec.exportTo[{i}]"), format!("{e:?} must be \"*\", \".\", \"~\" or a namespace"));
        }
    }
}

fn check_destination(d: &Destination, path: &str, v: &mut V) {
    check_host(&d.host, &format!("{path}.host"), false, v);
    if !d.subset.is_empty() && !is_dns1123_label(&d.subset) {
        v.err(format!("{path}.subset"), format!("{:?} is not a valid subset name", d.subset));
    }
    if let Some(p) = &d.port {
        check_port(p.number, &format!("{path}.port.number"), v);
    }
}

fn route_destinations<'a>(dests: impl Iterator<Item = (Option<&'a Destination>, i64)>, path: &str, v: &mut V) {
    let mut total = 0i64;
    let mut count = 0usize;
    for (i, (dest, weight)) in dests.enumerate() {
        count += 1;
        let dp = format!("{path}[{i}]");
        match dest {
            Some(d) => check_destination(d, &format!("{dp}.destination"), v),
            None => v.err(format!("{dp}.destination"), "required"),
        }
        if !(0..=100).contains(&weight) {
            v.err(format!("{dp}.weight"), format!("weight {weight} is out of range 0-100"));
        }
        total += weight;
    }
    if count > 1 && total != 100 {
        v.err(path, format!("weights of the {count} destinations sum to {total}; they must sum to 100"));
    } else if count == 1 && total != 0 && total != 100 {
        v.err(format!("{path}[0].weight"), format!("a single destination takes weight 100 (or none), not {total}"));
    }
}

fn http_route(r: &HttpRoute, path: &str, v: &mut V) {
    let actions = [!r.route.is_empty(), r.redirect.is_some(), r.direct_response.is_some()];
    match actions.iter().filter(|b| **b).count() {
        0 => v.err(path, "one of route, redirect or directResponse is required"),
        1 => {}
        _ => v.err(path, "only one of route, redirect or directResponse may be set"),
    }
    for (i, m) in r.matches.iter().enumerate() {
        http_match(m, &format!("{path}.match[{i}]"), v);
    }
    route_destinations(r.route.iter().map(|d| (d.destination.as_ref(), d.weight)), &format!("{path}.route"), v);
    for (i, d) in r.route.iter().enumerate() {
        if let Some(h) = &d.headers {
            check_headers(h, &format!("{path}.route[{i}].headers"), v);
        }
    }
    if let Some(red) = &r.redirect {
        let rp = format!("{path}.redirect");
        if let Some(code) = red.redirect_code
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            v.err(format!("{rp}.redirectCode"), format!("{code} is not a redirect status (301, 302, 303, 307, 308)"));
        }
        if let Some(p) = red.port {
            check_port(p, &format!("{rp}.port"), v);
            if red.derive_port.is_some() {
                v.err(format!("{rp}.derivePort"), "port and derivePort are mutually exclusive");
            }
        }
        if !red.scheme.is_empty() && red.scheme != "http" && red.scheme != "https" {
            v.err(format!("{rp}.scheme"), format!("{:?} must be http or https", red.scheme));
        }
        if !red.prefix_rewrite.is_empty() && !red.uri.is_empty() {
            v.err(format!("{rp}.prefixRewrite"), "uri and prefixRewrite are mutually exclusive");
        }
        if red.uri.is_empty()
            && red.prefix_rewrite.is_empty()
            && red.authority.is_empty()
            && red.port.is_none()
            && red.scheme.is_empty()
            && red.derive_port.is_none()
        {
            v.err(&rp, "a redirect must set at least one of uri, prefixRewrite, authority, port, derivePort or scheme");
        }
        if r.rewrite.is_some() {
            v.err(format!("{path}.rewrite"), "rewrite cannot be combined with redirect");
        }
    }
    if let Some(dr) = &r.direct_response {
        let dp = format!("{path}.directResponse");
        if !(200..=599).contains(&dr.status) {
            v.err(format!("{dp}.status"), format!("status {} is out of range 200-599", dr.status));
        }
        if let Some(b) = &dr.body {
            if b.string.is_some() == b.bytes.is_some() {
                v.err(format!("{dp}.body"), "exactly one of string or bytes must be set");
            }
            if let Some(bytes) = &b.bytes
                && !is_base64(bytes)
            {
                v.err(format!("{dp}.body.bytes"), "not valid base64");
            }
        }
        if r.rewrite.is_some()
            || r.fault.is_some()
            || r.mirror.is_some()
            || !r.mirrors.is_empty()
            || r.retries.is_some()
        {
            v.err(&dp, "directResponse cannot be combined with rewrite, fault, mirror or retries");
        }
    }
    if let Some(rw) = &r.rewrite {
        let rp = format!("{path}.rewrite");
        if let Some(re) = &rw.uri_regex_rewrite {
            if !rw.uri.is_empty() {
                v.err(format!("{rp}.uriRegexRewrite"), "uri and uriRegexRewrite are mutually exclusive");
            }
            check_regex(&re.pattern, &format!("{rp}.uriRegexRewrite.match"), v);
        }
        if rw.uri.is_empty() && rw.authority.is_empty() && rw.uri_regex_rewrite.is_none() {
            v.err(&rp, "a rewrite must set uri, uriRegexRewrite or authority");
        }
    }
    if let Some(t) = &r.timeout {
        check_duration(t, &format!("{path}.timeout"), v);
    }
    if let Some(rt) = &r.retries {
        let rp = format!("{path}.retries");
        check_non_negative(Some(rt.attempts), &format!("{rp}.attempts"), v);
        if let Some(t) = &rt.per_try_timeout {
            check_duration(t, &format!("{rp}.perTryTimeout"), v);
        }
        if let Some(b) = &rt.backoff {
            check_duration(b, &format!("{rp}.backoff"), v);
        }
        check_retry_on(&rt.retry_on, &format!("{rp}.retryOn"), v);
    }
    if let Some(f) = &r.fault {
        let fp = format!("{path}.fault");
        if f.delay.is_none() && f.abort.is_none() {
            v.err(&fp, "at least one of delay or abort is required");
        }
        if let Some(d) = &f.delay {
            match &d.fixed_delay {
                Some(fd) => {
                    check_duration(fd, &format!("{fp}.delay.fixedDelay"), v);
                }
                None => v.err(format!("{fp}.delay.fixedDelay"), "required"),
            }
            if let Some(p) = &d.percentage {
                check_percent(p, &format!("{fp}.delay.percentage"), v);
            }
        }
        if let Some(a) = &f.abort {
            let ap = format!("{fp}.abort");
            match (a.http_status, &a.grpc_status) {
                (Some(_), Some(_)) => v.err(&ap, "httpStatus and grpcStatus are mutually exclusive"),
                (None, None) => v.err(&ap, "one of httpStatus or grpcStatus is required"),
                (Some(s), None) if !(200..=599).contains(&s) => {
                    v.err(format!("{ap}.httpStatus"), format!("status {s} is out of range 200-599"))
                }
                (None, Some(g)) if !GRPC_CODES.contains(&g.as_str()) => v.err(
                    format!("{ap}.grpcStatus"),
                    format!("{g:?} is not a gRPC status name; expected one of {}", GRPC_CODES.join(", ")),
                ),
                _ => {}
            }
            if let Some(p) = &a.percentage {
                check_percent(p, &format!("{ap}.percentage"), v);
            }
        }
    }
    if let Some(m) = &r.mirror {
        check_destination(m, &format!("{path}.mirror"), v);
        if !r.mirrors.is_empty() {
            v.err(format!("{path}.mirrors"), "mirror and mirrors are mutually exclusive");
        }
    }
    if let Some(p) = &r.mirror_percentage {
        check_percent(p, &format!("{path}.mirrorPercentage"), v);
        if r.mirror.is_none() {
            v.err(format!("{path}.mirrorPercentage"), "mirrorPercentage needs mirror");
        }
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        let mp = format!("{path}.mirrors[{i}]");
        match &m.destination {
            Some(d) => check_destination(d, &format!("{mp}.destination"), v),
            None => v.err(format!("{mp}.destination"), "required"),
        }
        if let Some(p) = &m.percentage {
            check_percent(p, &format!("{mp}.percentage"), v);
        }
    }
    if let Some(h) = &r.headers {
        check_headers(h, &format!("{path}.headers"), v);
    }
}

/// gRPC status names in code order (the index is the code).
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn check_retry_on(retry_on: &str, path: &str, v: &mut V) {
    const POLICIES: [&str; 16] = [
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    ];
    if retry_on.is_empty() {
        return;
    }
    for p in retry_on.split(',').map(str::trim) {
        let is_code = p.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
        if !is_code && !POLICIES.contains(&p) {
            v.err(path, format!("{p:?} is not a retry policy; expected HTTP status codes or {}", POLICIES.join(", ")));
        }
    }
}

fn http_match(m: &HttpMatchRequest, path: &str, v: &mut V) {
    for (name, sm) in [("uri", &m.uri), ("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)] {
        if let Some(sm) = sm {
            check_string_match(sm, &format!("{path}.{name}"), v);
        }
    }
    for (field, map) in [("headers", &m.headers), ("withoutHeaders", &m.without_headers)] {
        for (h, sm) in map {
            let hp = format!("{path}.{field}[{h}]");
            check_header_name(h, &hp, v);
            check_string_match(sm, &hp, v);
        }
    }
    for (q, sm) in &m.query_params {
        check_string_match(sm, &format!("{path}.queryParams[{q}]"), v);
    }
    match_scope(m.port, &m.source_labels, &m.gateways, &m.source_namespace, path, v);
}

fn check_headers(h: &Headers, path: &str, v: &mut V) {
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        for (name, _) in ops.set.iter().chain(ops.add.iter()) {
            check_header_op_name(name, &format!("{path}.{side}"), v);
        }
        for name in &ops.remove {
            check_header_op_name(name, &format!("{path}.{side}.remove"), v);
        }
    }
}

fn check_header_op_name(name: &str, path: &str, v: &mut V) {
    check_header_name(name, &format!("{path}[{name}]"), v);
    if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
        v.err(format!("{path}[{name}]"), "pseudo-headers and host cannot be modified; use rewrite.authority");
    }
}

fn destination_rule(s: &DestinationRule, v: &mut V) {
    check_host(&s.host, "spec.host", false, v);
    if let Some(tp) = &s.traffic_policy {
        traffic_policy(tp, "spec.trafficPolicy", v);
    }
    let mut names = BTreeSet::new();
    for (i, sub) in s.subsets.iter().enumerate() {
        let sp = format!("spec.subsets[{i}]");
        if sub.name.is_empty() {
            v.err(format!("{sp}.name"), "required");
        } else if !is_dns1123_label(&sub.name) {
            v.err(format!("{sp}.name"), format!("{:?} is not a valid subset name (DNS label)", sub.name));
        } else if !names.insert(sub.name.as_str()) {
            v.err(format!("{sp}.name"), format!("duplicate subset {:?}", sub.name));
        }
        check_selector_labels(&sub.labels, &format!("{sp}.labels"), v);
        if let Some(tp) = &sub.traffic_policy {
            traffic_policy(tp, &format!("{sp}.trafficPolicy"), v);
        }
    }
    check_export_to(&s.export_to, v);
    if let Some(ws) = &s.workload_selector {
        check_selector_labels(&ws.labels, "spec.workloadSelector.labels", v);
    }
}

fn traffic_policy(tp: &TrafficPolicy, path: &str, v: &mut V) {
    policy_parts(
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
        path,
        v,
    );
    let mut ports = BTreeSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{path}.portLevelSettings[{i}]");
        match &pl.port {
            Some(p) => {
                check_port(p.number, &format!("{pp}.port.number"), v);
                if !ports.insert(p.number) {
                    v.err(format!("{pp}.port.number"), format!("duplicate port {}", p.number));
                }
            }
            None => v.err(format!("{pp}.port"), "required"),
        }
        policy_parts(
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.tls.as_ref(),
            &pp,
            v,
        );
    }
}

fn policy_parts(
    lb: Option<&LoadBalancerSettings>,
    cp: Option<&ConnectionPoolSettings>,
    od: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
    path: &str,
    v: &mut V,
) {
    if let Some(lb) = lb {
        load_balancer(lb, &format!("{path}.loadBalancer"), v);
    }
    if let Some(cp) = cp {
        let cpp = format!("{path}.connectionPool");
        if let Some(tcp) = &cp.tcp {
            check_non_negative(tcp.max_connections, &format!("{cpp}.tcp.maxConnections"), v);
            if let Some(d) = &tcp.connect_timeout {
                check_duration(d, &format!("{cpp}.tcp.connectTimeout"), v);
            }
            if let Some(d) = &tcp.idle_timeout {
                check_duration(d, &format!("{cpp}.tcp.idleTimeout"), v);
            }
        }
        if let Some(http) = &cp.http {
            let hp = format!("{cpp}.http");
            check_non_negative(http.http1_max_pending_requests, &format!("{hp}.http1MaxPendingRequests"), v);
            check_non_negative(http.http2_max_requests, &format!("{hp}.http2MaxRequests"), v);
            check_non_negative(http.max_requests_per_connection, &format!("{hp}.maxRequestsPerConnection"), v);
            check_non_negative(http.max_retries, &format!("{hp}.maxRetries"), v);
            if let Some(d) = &http.idle_timeout {
                check_duration(d, &format!("{hp}.idleTimeout"), v);
            }
        }
    }
    if let Some(od) = od {
        let op = format!("{path}.outlierDetection");
        check_non_negative(od.consecutive_5xx_errors, &format!("{op}.consecutive5xxErrors"), v);
        check_non_negative(od.consecutive_gateway_errors, &format!("{op}.consecutiveGatewayErrors"), v);
        check_percentage_int(od.max_ejection_percent, &format!("{op}.maxEjectionPercent"), v);
        check_percentage_int(od.min_health_percent, &format!("{op}.minHealthPercent"), v);
        if let Some(d) = &od.interval {
            check_duration(d, &format!("{op}.interval"), v);
        }
        if let Some(d) = &od.base_ejection_time {
            check_duration(d, &format!("{op}.baseEjectionTime"), v);
        }
    }
    if let Some(tls) = tls {
        let tp = format!("{path}.tls");
        let has_files =
            !tls.client_certificate.is_empty() || !tls.private_key.is_empty() || !tls.ca_certificates.is_empty();
        match tls.mode {
            ClientTlsMode::DISABLE | ClientTlsMode::ISTIO_MUTUAL => {
                if has_files || !tls.credential_name.is_empty() {
                    v.err(&tp, format!("{:?} takes no certificates or credentialName", tls.mode));
                }
            }
            ClientTlsMode::SIMPLE => {
                if !tls.client_certificate.is_empty() || !tls.private_key.is_empty() {
                    v.err(&tp, "SIMPLE TLS takes no client certificate; use MUTUAL");
                }
            }
            ClientTlsMode::MUTUAL => {
                if tls.credential_name.is_empty() && (tls.client_certificate.is_empty() || tls.private_key.is_empty()) {
                    v.err(&tp, "MUTUAL TLS needs clientCertificate and privateKey, or credentialName");
                }
            }
        }
        if !tls.credential_name.is_empty() && has_files {
            v.err(format!("{tp}.credentialName"), "credentialName and certificate files are mutually exclusive");
        }
        if !tls.sni.is_empty() {
            check_host(&tls.sni, &format!("{tp}.sni"), false, v);
        }
    }
}

fn load_balancer(lb: &LoadBalancerSettings, path: &str, v: &mut V) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        v.err(path, "simple and consistentHash are mutually exclusive");
    }
    if let Some(ch) = &lb.consistent_hash {
        let cp = format!("{path}.consistentHash");
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip.unwrap_or(false),
            ch.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|b| **b).count() != 1 {
            v.err(&cp, "exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required");
        }
        if let Some(h) = &ch.http_header_name {
            check_header_name(h, &format!("{cp}.httpHeaderName"), v);
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                v.err(format!("{cp}.httpCookie.name"), "required");
            }
            if let Some(t) = &c.ttl
                && let Err(msg) = parse_duration(&t.0)
            {
                v.err(format!("{cp}.httpCookie.ttl"), msg);
            }
            for (i, a) in c.attributes.iter().enumerate() {
                if a.name.is_empty() {
                    v.err(format!("{cp}.httpCookie.attributes[{i}].name"), "required");
                }
            }
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            v.err(&cp, "ringHash and maglev are mutually exclusive");
        }
        if ch.minimum_ring_size.is_some() && (ch.ring_hash.is_some() || ch.maglev.is_some()) {
            v.err(format!("{cp}.minimumRingSize"), "deprecated; use ringHash.minimumRingSize, not both");
        }
        if let Some(m) = &ch.maglev
            && m.table_size != 0
            && !is_prime(m.table_size)
        {
            v.err(format!("{cp}.maglev.tableSize"), format!("{} must be a prime number", m.table_size));
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        let lp = format!("{path}.localityLbSetting");
        if !l.distribute.is_empty() && !l.failover.is_empty() {
            v.err(&lp, "distribute and failover are mutually exclusive");
        }
        for (i, d) in l.distribute.iter().enumerate() {
            let dp = format!("{lp}.distribute[{i}]");
            check_locality_pattern(&d.from, &format!("{dp}.from"), v);
            let total: u64 = d.to.values().map(|w| u64::from(*w)).sum();
            if total != 100 {
                v.err(format!("{dp}.to"), format!("weights sum to {total}; they must sum to 100"));
            }
            for loc in d.to.keys() {
                check_locality_pattern(loc, &format!("{dp}.to[{loc}]"), v);
            }
        }
        for (i, f) in l.failover.iter().enumerate() {
            let fp = format!("{lp}.failover[{i}]");
            if f.from.is_empty() || f.from.contains('/') || f.from.contains('*') {
                v.err(format!("{fp}.from"), "failover is between regions: give a region name");
            }
            if f.to.is_empty() || f.to.contains('/') || f.to.contains('*') {
                v.err(format!("{fp}.to"), "failover is between regions: give a region name");
            }
            if f.from == f.to {
                v.err(&fp, "from and to must be different regions");
            }
        }
    }
}

/// Standard base64 with padding, as protobuf JSON writes `bytes`.
fn is_base64(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    s.len().is_multiple_of(4)
        && s.len() - body.len() <= 2
        && body.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|i| i * i <= n).all(|i| !n.is_multiple_of(i))
}

fn check_locality_pattern(loc: &str, path: &str, v: &mut V) {
    let parts: Vec<&str> = loc.split('/').collect();
    let bad_star = parts.iter().enumerate().any(|(i, p)| p.contains('*') && (*p != "*" || i != parts.len() - 1));
    if loc.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) || bad_star {
        v.err(path, format!("{loc:?} is not a locality: region[/zone[/subzone]], '*' allowed only as the last part"));
    }
}

fn gateway(s: &Gateway, v: &mut V) {
    if s.servers.is_empty() {
        v.err("spec.servers", "at least one server is required");
    }
    check_selector_labels(&s.selector, "spec.selector", v);
    let mut names = BTreeSet::new();
    for (i, srv) in s.servers.iter().enumerate() {
        let sp = format!("spec.servers[{i}]");
        match &srv.port {
            Some(p) => {
                check_port(p.number, &format!("{sp}.port.number"), v);
                if p.protocol.is_empty() {
                    v.err(format!("{sp}.port.protocol"), "required");
                }
                check_protocol(&p.protocol, &format!("{sp}.port.protocol"), v);
                if p.name.is_empty() {
                    v.err(format!("{sp}.port.name"), "required");
                }
                if let Some(t) = p.target_port {
                    check_port(t, &format!("{sp}.port.targetPort"), v);
                }
                let secure = ["HTTPS", "TLS"].iter().any(|q| q.eq_ignore_ascii_case(&p.protocol));
                if secure && srv.tls.is_none() {
                    v.err(format!("{sp}.tls"), format!("required for protocol {}", p.protocol));
                }
            }
            None => v.err(format!("{sp}.port"), "required"),
        }
        if srv.hosts.is_empty() {
            v.err(format!("{sp}.hosts"), "at least one host is required");
        }
        for (j, h) in srv.hosts.iter().enumerate() {
            let hp = format!("{sp}.hosts[{j}]");
            let host = match h.split_once('/') {
                Some((ns, host)) => {
                    if ns != "*" && ns != "." && ns != "~" && !is_dns1123_label(ns) {
                        v.err(&hp, format!("{ns:?} is not a namespace, \"*\", \".\" or \"~\""));
                    }
                    host
                }
                None => h.as_str(),
            };
            check_host(host, &hp, true, v);
        }
        if !srv.bind.is_empty() && srv.bind.parse::<IpAddr>().is_err() && !srv.bind.starts_with("unix://") {
            v.err(format!("{sp}.bind"), format!("{:?} is not an IP address or unix:// path", srv.bind));
        }
        if !srv.name.is_empty() && !names.insert(srv.name.as_str()) {
            v.err(format!("{sp}.name"), format!("duplicate server name {:?}", srv.name));
        }
        if let Some(tls) = &srv.tls {
            let tp = format!("{sp}.tls");
            let needs_cert =
                matches!(tls.mode, ServerTlsMode::SIMPLE | ServerTlsMode::MUTUAL | ServerTlsMode::OPTIONAL_MUTUAL);
            let has_files = !tls.server_certificate.is_empty() || !tls.private_key.is_empty();
            if needs_cert && !tls.https_redirect {
                if tls.credential_name.is_empty() && (tls.server_certificate.is_empty() || tls.private_key.is_empty()) {
                    v.err(&tp, format!("{:?} needs credentialName, or serverCertificate and privateKey", tls.mode));
                }
                if !tls.credential_name.is_empty() && has_files {
                    v.err(
                        format!("{tp}.credentialName"),
                        "credentialName and certificate files are mutually exclusive",
                    );
                }
            }
            if let (Some(min), Some(max)) = (tls.min_protocol_version, tls.max_protocol_version)
                && (min as u8) > (max as u8)
                && max != TlsProtocol::TLS_AUTO
            {
                v.err(format!("{tp}.minProtocolVersion"), "minProtocolVersion is above maxProtocolVersion");
            }
        }
    }
}

fn service_entry(s: &ServiceEntry, v: &mut V) {
    if s.hosts.is_empty() {
        v.err("spec.hosts", "at least one host is required");
    }
    for (i, h) in s.hosts.iter().enumerate() {
        let hp = format!("spec.hosts[{i}]");
        check_host(h, &hp, false, v);
        if h.starts_with("*.")
            && matches!(s.resolution, ServiceEntryResolution::DNS | ServiceEntryResolution::DNS_ROUND_ROBIN)
        {
            v.err(&hp, "wildcard hosts cannot be resolved with DNS");
        }
    }
    for (i, a) in s.addresses.iter().enumerate() {
        check_ip_or_cidr(a, &format!("spec.addresses[{i}]"), v);
    }
    if s.ports.is_empty() {
        v.err("spec.ports", "at least one port is required");
    }
    let mut numbers = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        check_port(p.number, &format!("{pp}.number"), v);
        if !numbers.insert(p.number) {
            v.err(format!("{pp}.number"), format!("duplicate port {}", p.number));
        }
        if p.name.is_empty() {
            v.err(format!("{pp}.name"), "required");
        } else if !names.insert(p.name.as_str()) {
            v.err(format!("{pp}.name"), format!("duplicate port name {:?}", p.name));
        }
        check_protocol(&p.protocol, &format!("{pp}.protocol"), v);
        if let Some(t) = p.target_port {
            check_port(t, &format!("{pp}.targetPort"), v);
        }
    }
    if s.workload_selector.is_some() && !s.endpoints.is_empty() {
        v.err("spec.workloadSelector", "workloadSelector and endpoints are mutually exclusive");
    }
    if let Some(ws) = &s.workload_selector {
        check_selector_labels(&ws.labels, "spec.workloadSelector.labels", v);
    }
    if s.resolution == ServiceEntryResolution::DYNAMIC_DNS {
        v.err(
            "spec.resolution",
            "DYNAMIC_DNS (dynamic forward proxy) is not supported by Trellis; use DNS, DNS_ROUND_ROBIN, STATIC or NONE",
        );
    }
    if s.resolution == ServiceEntryResolution::STATIC && s.endpoints.is_empty() && s.workload_selector.is_none() {
        v.err("spec.endpoints", "STATIC resolution needs endpoints or a workloadSelector");
    }
    let port_names: BTreeSet<&str> = s.ports.iter().map(|p| p.name.as_str()).collect();
    for (i, e) in s.endpoints.iter().enumerate() {
        workload_entry(e, &format!("spec.endpoints[{i}]"), Some((&port_names, s.resolution)), v);
    }
    check_export_to(&s.export_to, v);
}

fn workload_entry(
    e: &WorkloadEntry,
    path: &str,
    service: Option<(&BTreeSet<&str>, ServiceEntryResolution)>,
    v: &mut V,
) {
    let ap = format!("{path}.address");
    if e.address.is_empty() {
        if e.network.is_empty() {
            v.err(
                &ap,
                "required (an address may only be omitted when network is set, for a workload behind a gateway)",
            );
        }
    } else if let Some(sock) = e.address.strip_prefix("unix://") {
        if sock.is_empty() {
            v.err(&ap, "unix:// needs a socket path");
        }
    } else if e.address.parse::<IpAddr>().is_err() {
        let static_se = matches!(service, Some((_, ServiceEntryResolution::STATIC)));
        if static_se {
            v.err(&ap, format!("{:?}: STATIC resolution needs IP addresses", e.address));
        } else {
            check_host(&e.address, &ap, false, v);
        }
    }
    for (name, port) in &e.ports {
        check_port(*port, &format!("{path}.ports[{name}]"), v);
        if let Some((names, _)) = service
            && !names.contains(name.as_str())
        {
            v.err(format!("{path}.ports[{name}]"), format!("{name:?} is not the name of a port of this ServiceEntry"));
        }
    }
    check_selector_labels(&e.labels, &format!("{path}.labels"), v);
    if !e.locality.is_empty() {
        check_locality_pattern(&e.locality, &format!("{path}.locality"), v);
        if e.locality.contains('*') {
            v.err(format!("{path}.locality"), "a workload's locality cannot contain '*'");
        }
    }
    if let Some(w) = e.weight
        && w == 0
    {
        v.err(format!("{path}.weight"), "weight must be positive when set");
    }
    if !e.service_account.is_empty() && !is_dns1123_subdomain(&e.service_account) {
        v.err(format!("{path}.serviceAccount"), format!("{:?} is not a valid service account name", e.service_account));
    }
}

fn sidecar(s: &Sidecar, v: &mut V) {
    if let Some(ws) = &s.workload_selector {
        check_selector_labels(&ws.labels, "spec.workloadSelector.labels", v);
    }
    for (i, ing) in s.ingress.iter().enumerate() {
        let ip = format!("spec.ingress[{i}]");
        match &ing.port {
            Some(p) => {
                check_port(p.number, &format!("{ip}.port.number"), v);
                check_protocol(&p.protocol, &format!("{ip}.port.protocol"), v);
            }
            None => v.err(format!("{ip}.port"), "required"),
        }
        if !ing.default_endpoint.is_empty() {
            let ok = ing
                .default_endpoint
                .strip_prefix("unix://")
                .map(|p| !p.is_empty())
                .or_else(|| {
                    ing.default_endpoint.rsplit_once(':').map(|(h, p)| {
                        (h == "127.0.0.1" || h == "0.0.0.0" || h == "[::1]" || h == "[::]")
                            && p.parse::<u16>().is_ok_and(|p| p > 0)
                    })
                })
                .unwrap_or(false);
            if !ok {
                v.err(
                    format!("{ip}.defaultEndpoint"),
                    "must be 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT or unix:///path",
                );
            }
        }
    }
    if s.egress.is_empty() && s.ingress.is_empty() && s.outbound_traffic_policy.is_none() {
        v.err(
            "spec.egress",
            "a Sidecar needs egress listeners (e.g. hosts [\"./*\"]), ingress listeners or an outboundTrafficPolicy",
        );
    }
    let mut catch_all = 0;
    for (i, eg) in s.egress.iter().enumerate() {
        let ep = format!("spec.egress[{i}]");
        match &eg.port {
            Some(p) => {
                check_port(p.number, &format!("{ep}.port.number"), v);
                check_protocol(&p.protocol, &format!("{ep}.port.protocol"), v);
            }
            None => catch_all += 1,
        }
        if eg.hosts.is_empty() {
            v.err(format!("{ep}.hosts"), "at least one host is required");
        }
        for (j, h) in eg.hosts.iter().enumerate() {
            let hp = format!("{ep}.hosts[{j}]");
            match h.split_once('/') {
                Some((ns, host)) => {
                    if ns != "*" && ns != "." && ns != "~" && !is_dns1123_label(ns) {
                        v.err(&hp, format!("{ns:?} is not a namespace, \"*\", \".\" or \"~\""));
                    }
                    check_host(host, &hp, true, v);
                }
                None => v.err(&hp, format!("{h:?} must be namespace/dnsName, e.g. \"./*\" or \"istio-system/*\"")),
            }
        }
    }
    if catch_all > 1 {
        v.err("spec.egress", "only one egress listener may omit port (the catch-all)");
    }
}

// ===== security =====

fn peer_authentication(s: &PeerAuthentication, v: &mut V) {
    if let Some(sel) = &s.selector {
        check_selector_labels(&sel.match_labels, "spec.selector.matchLabels", v);
    }
    if !s.port_level_mtls.is_empty() && s.selector.as_ref().is_none_or(|s| s.match_labels.is_empty()) {
        v.err("spec.portLevelMtls", "portLevelMtls needs a workload selector");
    }
    for port in s.port_level_mtls.keys() {
        match port.parse::<u32>() {
            Ok(p) => check_port(p, &format!("spec.portLevelMtls[{port}]"), v),
            Err(_) => v.err(format!("spec.portLevelMtls[{port}]"), "keys are port numbers"),
        }
    }
}

/// Keys Istio's AuthorizationPolicy accepts in `when` (exact or as a prefix with `[...]`).
const CONDITION_KEYS: [&str; 13] = [
    "request.headers[",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

fn authorization_policy(s: &AuthorizationPolicy, v: &mut V) {
    if let Some(sel) = &s.selector {
        check_selector_labels(&sel.match_labels, "spec.selector.matchLabels", v);
    }
    if s.action == AuthorizationAction::CUSTOM {
        v.err("spec.action", "CUSTOM (external authorization) is not supported by Trellis; use ALLOW, DENY or AUDIT");
    }
    for (i, rule) in s.rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        for (j, f) in rule.from.iter().enumerate() {
            let fp = format!("{rp}.from[{j}].source");
            let Some(src) = &f.source else {
                v.err(fp, "required");
                continue;
            };
            let lists: [(&str, &Vec<String>); 14] = [
                ("principals", &src.principals),
                ("notPrincipals", &src.not_principals),
                ("requestPrincipals", &src.request_principals),
                ("notRequestPrincipals", &src.not_request_principals),
                ("namespaces", &src.namespaces),
                ("notNamespaces", &src.not_namespaces),
                ("serviceAccounts", &src.service_accounts),
                ("notServiceAccounts", &src.not_service_accounts),
                ("ipBlocks", &src.ip_blocks),
                ("notIpBlocks", &src.not_ip_blocks),
                ("remoteIpBlocks", &src.remote_ip_blocks),
                ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
                ("trustDomains", &src.trust_domains),
                ("notTrustDomains", &src.not_trust_domains),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                v.err(&fp, "a source must set at least one field");
            }
            for (name, list) in lists {
                for (k, val) in list.iter().enumerate() {
                    let vp = format!("{fp}.{name}[{k}]");
                    if name.to_ascii_lowercase().contains("ipblocks") {
                        check_ip_or_cidr(val, &vp, v);
                    } else {
                        check_auth_value(val, &vp, v);
                        if name.ends_with("rincipals")
                            && name != "requestPrincipals"
                            && name != "notRequestPrincipals"
                            && val.starts_with("spiffe://")
                        {
                            v.err(&vp, "principals are written without \"spiffe://\", e.g. cluster.local/ns/NAMESPACE/sa/ACCOUNT");
                        }
                    }
                }
            }
            if (!src.service_accounts.is_empty() || !src.not_service_accounts.is_empty())
                && (!src.principals.is_empty()
                    || !src.not_principals.is_empty()
                    || !src.namespaces.is_empty()
                    || !src.not_namespaces.is_empty())
            {
                v.err(&fp, "serviceAccounts cannot be combined with principals or namespaces");
            }
        }
        for (j, t) in rule.to.iter().enumerate() {
            let tp = format!("{rp}.to[{j}].operation");
            let Some(op) = &t.operation else {
                v.err(tp, "required");
                continue;
            };
            let lists: [(&str, &Vec<String>); 8] = [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("ports", &op.ports),
                ("notPorts", &op.not_ports),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                v.err(&tp, "an operation must set at least one field");
            }
            for (name, list) in lists {
                for (k, val) in list.iter().enumerate() {
                    let vp = format!("{tp}.{name}[{k}]");
                    if name.ends_with("orts") {
                        match val.parse::<u32>() {
                            Ok(p) => check_port(p, &vp, v),
                            Err(_) => v.err(&vp, format!("{val:?} is not a port number")),
                        }
                    } else if name.ends_with("aths") {
                        if !(val.starts_with('/') || val.starts_with('*')) {
                            v.err(&vp, format!("{val:?}: paths start with '/' (or '*' for a suffix match)"));
                        }
                        if !val.contains("{*}") && !val.contains("{**}") {
                            check_auth_value(val, &vp, v);
                        }
                    } else {
                        check_auth_value(val, &vp, v);
                    }
                }
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            let cp = format!("{rp}.when[{j}]");
            let known = CONDITION_KEYS.iter().any(|k| {
                if k.ends_with('[') {
                    c.key.starts_with(k) && c.key.ends_with(']') && c.key.len() > k.len() + 1
                } else {
                    c.key == *k
                }
            });
            if !known {
                v.err(
                    format!("{cp}.key"),
                    format!("unknown condition key {:?}; see Istio's authorization conditions", c.key),
                );
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                v.err(&cp, "values or notValues is required");
            }
            if c.key == "destination.port" {
                for (k, val) in c.values.iter().chain(c.not_values.iter()).enumerate() {
                    if val.parse::<u16>().map_or(true, |p| p == 0) {
                        v.err(format!("{cp}.values[{k}]"), format!("{val:?} is not a port number"));
                    }
                }
            }
            if c.key.ends_with(".ip") {
                for (k, val) in c.values.iter().chain(c.not_values.iter()).enumerate() {
                    check_ip_or_cidr(val, &format!("{cp}.values[{k}]"), v);
                }
            }
        }
    }
}

fn request_authentication(s: &RequestAuthentication, v: &mut V) {
    if let Some(sel) = &s.selector {
        check_selector_labels(&sel.match_labels, "spec.selector.matchLabels", v);
    }
    let mut issuers = BTreeSet::new();
    for (i, r) in s.jwt_rules.iter().enumerate() {
        let rp = format!("spec.jwtRules[{i}]");
        if r.issuer.is_empty() {
            v.err(format!("{rp}.issuer"), "required");
        } else if !issuers.insert(r.issuer.as_str()) {
            v.err(format!("{rp}.issuer"), format!("duplicate issuer {:?}", r.issuer));
        }
        if !r.jwks_uri.is_empty() && !r.jwks.is_empty() {
            v.err(&rp, "jwksUri and jwks are mutually exclusive");
        }
        let is_url = r.jwks_uri.starts_with("https://") || r.jwks_uri.starts_with("http://");
        if !r.jwks_uri.is_empty() && !is_url {
            v.err(format!("{rp}.jwksUri"), format!("{:?} is not an http(s) URL", r.jwks_uri));
        }
        if !r.jwks.is_empty() && serde_json::from_str::<Value>(&r.jwks).is_err() {
            v.err(format!("{rp}.jwks"), "not a JSON Web Key Set");
        }
        for (j, h) in r.from_headers.iter().enumerate() {
            check_header_name(&h.name.to_ascii_lowercase(), &format!("{rp}.fromHeaders[{j}].name"), v);
        }
        if !r.output_payload_to_header.is_empty() {
            check_header_name(&r.output_payload_to_header, &format!("{rp}.outputPayloadToHeader"), v);
        }
        for (j, c) in r.output_claim_to_headers.iter().enumerate() {
            check_header_name(&c.header, &format!("{rp}.outputClaimToHeaders[{j}].header"), v);
            if c.claim.is_empty() {
                v.err(format!("{rp}.outputClaimToHeaders[{j}].claim"), "required");
            }
        }
        if let Some(t) = &r.timeout {
            check_duration(t, &format!("{rp}.timeout"), v);
        }
    }
}

// ===== telemetry, extensions, trellis =====

fn telemetry(s: &Telemetry, v: &mut V) {
    if let Some(sel) = &s.selector {
        check_selector_labels(&sel.match_labels, "spec.selector.matchLabels", v);
    }
    fn providers(ps: &[ProviderRef], path: &str, v: &mut V) {
        for (i, p) in ps.iter().enumerate() {
            if p.name.is_empty() {
                v.err(format!("{path}.providers[{i}].name"), "required");
            }
        }
    }
    for (i, t) in s.tracing.iter().enumerate() {
        let tp = format!("spec.tracing[{i}]");
        providers(&t.providers, &tp, v);
        if let Some(p) = t.random_sampling_percentage
            && !(0.0..=100.0).contains(&p)
        {
            v.err(format!("{tp}.randomSamplingPercentage"), format!("{p} is out of range 0-100"));
        }
    }
    for (i, m) in s.metrics.iter().enumerate() {
        let mp = format!("spec.metrics[{i}]");
        providers(&m.providers, &mp, v);
        if let Some(d) = &m.reporting_interval {
            check_duration(d, &format!("{mp}.reportingInterval"), v);
        }
        for (j, o) in m.overrides.iter().enumerate() {
            for (tag, t) in &o.tag_overrides {
                if t.operation == TagOperation::UPSERT && t.value.is_empty() {
                    v.err(format!("{mp}.overrides[{j}].tagOverrides[{tag}].value"), "required for UPSERT");
                }
            }
        }
    }
    for (i, a) in s.access_logging.iter().enumerate() {
        providers(&a.providers, &format!("spec.accessLogging[{i}]"), v);
    }
}

fn wasm_plugin(s: &WasmPlugin, v: &mut V) {
    if let Some(sel) = &s.selector {
        check_selector_labels(&sel.match_labels, "spec.selector.matchLabels", v);
    }
    if s.url.is_empty() {
        v.err("spec.url", "required");
    } else {
        match s.url.split_once("://") {
            Some((scheme, "")) if ["oci", "file", "http", "https", "trellis"].contains(&scheme) => {
                v.err("spec.url", format!("{:?} names no module", s.url));
            }
            Some(("trellis", sha)) => {
                let sha = sha.trim_end_matches('/');
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    v.err("spec.url", "trellis:// names an uploaded module by its sha256 (64 lower-case hex digits), as `trellis wasm push` prints it");
                } else if !s.sha256.is_empty() && s.sha256 != sha {
                    v.err("spec.sha256", format!("differs from the sha256 in the URL ({sha})"));
                }
            }
            Some((scheme @ ("oci" | "http" | "https"), _)) => v.err(
                "spec.url",
                format!("{scheme}:// modules are not fetched by Trellis yet; upload the module with `trellis wasm push FILE` and use the trellis://SHA256 URL it prints (or file:// for a file on every proxy's host)"),
            ),
            Some(("file", _)) => {}
            Some((scheme, _)) => v.err(
                "spec.url",
                format!("unsupported scheme {scheme:?}; use oci://, https://, http://, file:// or trellis://sha256"),
            ),
            None => {}
        }
    }
    let is_hex64 = s.sha256.len() == 64 && s.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !s.sha256.is_empty() && !is_hex64 {
        v.err("spec.sha256", "must be 64 lower-case hexadecimal characters");
    }
    if let Some(vm) = &s.vm_config {
        let mut names = BTreeSet::new();
        for (i, e) in vm.env.iter().enumerate() {
            if e.name.is_empty() {
                v.err(format!("spec.vmConfig.env[{i}].name"), "required");
            } else if !names.insert(e.name.as_str()) {
                v.err(format!("spec.vmConfig.env[{i}].name"), format!("duplicate variable {:?}", e.name));
            }
            if e.value_from == EnvValueSource::HOST && !e.value.is_empty() {
                v.err(
                    format!("spec.vmConfig.env[{i}].value"),
                    "HOST variables take their value from the proxy; leave value empty",
                );
            }
        }
    }
    for (i, m) in s.matches.iter().enumerate() {
        for (j, p) in m.ports.iter().enumerate() {
            check_port(p.number, &format!("spec.match[{i}].ports[{j}].number"), v);
        }
    }
    if s.plugin_type == PluginType::NETWORK {
        v.err("spec.type", "NETWORK (L4) plugins are not supported yet; use HTTP");
    }
}

fn mesh_cluster(name: &str, s: &MeshCluster, v: &mut V) {
    if !name.is_empty() && !is_dns1123_label(name) {
        v.err(
            "metadata.name",
            "a cluster name is a DNS label: lower-case letters, digits and '-', at most 63 characters",
        );
    }
    if s.network.is_empty() {
        v.err("spec.network", "required");
    } else if !is_dns1123_label(&s.network) {
        v.err("spec.network", format!("{:?} is not a valid network name (DNS label)", s.network));
    }
    if let Some(l) = &s.locality {
        if l.region.is_empty() && (!l.zone.is_empty() || !l.subzone.is_empty()) {
            v.err("spec.locality.region", "required when zone or subzone is set");
        }
        if l.zone.is_empty() && !l.subzone.is_empty() {
            v.err("spec.locality.zone", "required when subzone is set");
        }
        for (f, val) in [("region", &l.region), ("zone", &l.zone), ("subzone", &l.subzone)] {
            if val.contains('/') || val.contains('*') {
                v.err(format!("spec.locality.{f}"), "must not contain '/' or '*'");
            }
        }
    }
    if let Some(g) = &s.east_west_gateway {
        if g.address.is_empty() {
            v.err("spec.eastWestGateway.address", "required");
        } else if g.address.parse::<IpAddr>().is_err() {
            check_host(&g.address, "spec.eastWestGateway.address", false, v);
        }
        if let Some(p) = g.port {
            check_port(p, "spec.eastWestGateway.port", v);
        }
    }
    if let Some(d) = &s.discovery
        && d.discovery_type == DiscoveryType::Kubernetes
        && d.kubeconfig.is_empty()
    {
        v.err("spec.discovery.kubeconfig", "required for Kubernetes discovery");
    }
}

fn api_token(s: &ApiToken, v: &mut V) {
    if s.role.is_none() {
        v.err("spec.role", "required: Viewer, Editor or Admin");
    }
    if !(s.sha256.len() == 64 && s.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
        v.err("spec.sha256", "the SHA-256 of the secret, as 64 lower-case hexadecimal characters");
    }
    for (i, ns) in s.namespaces.iter().enumerate() {
        if !is_dns1123_label(ns) {
            v.err(format!("spec.namespaces[{i}]"), format!("{ns:?} is not a namespace"));
        }
    }
    if s.role == Some(TokenRole::Admin) && !s.namespaces.is_empty() {
        v.err("spec.namespaces", "an Admin token reaches everything; use Editor or Viewer to limit it to namespaces");
    }
}

fn workload_token(s: &WorkloadToken, v: &mut V) {
    if s.service_account.is_empty() {
        v.err("spec.serviceAccount", "required: the service account whose identity the token's holder gets");
    } else if !is_dns1123_subdomain(&s.service_account) {
        v.err("spec.serviceAccount", format!("{:?} is not a service account name", s.service_account));
    }
    if !(s.sha256.len() == 64 && s.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
        v.err("spec.sha256", "the SHA-256 of the secret, as 64 lower-case hexadecimal characters");
    }
}

/// Labels as a stable string, for messages.
pub(crate) fn labels_to_string(l: &BTreeMap<String, String>) -> String {
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests;
