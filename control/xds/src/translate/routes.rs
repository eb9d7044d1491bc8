//! RDS: VirtualServices → virtual hosts and routes, as Istio translates them.
//!
//! The outbound route configuration has a virtual host per reachable HTTP service port,
//! answering to `HOST:PORT` (and the short names a client in the same namespace would use).
//! Routes come from the VirtualService for that host, or a default route to the service's
//! cluster. Route-level behaviour is standard Envoy config: `retry_policy`, the fault filter's
//! per-route config, `request_mirror_policies`, rewrites, header operations, redirects and
//! direct responses — what Envoy executes natively and trellis-proxy through its modules.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HeaderValue, HeaderValueOption, RuntimeFractionalPercent, data_source, header_value_option,
};
use envoy_types::pb::envoy::config::route::v3::route_action::{
    ClusterSpecifier, HashPolicy, HostRewriteSpecifier, RequestMirrorPolicy, hash_policy,
};
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, header_matcher, query_parameter_matcher,
    redirect_action, retry_policy, route, route_match,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault, fault_abort};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use trellis_model::analyze::fqdn;
use trellis_model::registry::{Service, ServicePort};
use trellis_model::spec::{
    Destination, Headers, HttpMatchRequest, HttpRetry, HttpRoute, Percent, StringMatch, VirtualService,
};
use trellis_model::{ResourceKey, spec};

use super::clusters::{InboundPort, inbound_ports};
use super::{INBOUND_ROUTE, OUTBOUND_ROUTE, Scope, Translated, cluster_name, parse_duration, selects};

/// The name of Envoy's fault filter; per-route fault config is keyed by it.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// Istio's retry policy for routes that name none: 2 attempts on connection-level failures and
/// 503, each on another host.
fn default_retry() -> RetryPolicy {
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retriable_status_codes: vec![503],
        retry_host_predicate: vec![previous_hosts()],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

fn previous_hosts() -> retry_policy::RetryHostPredicate {
    retry_policy::RetryHostPredicate {
        name: "envoy.retry_host_predicates.previous_hosts".into(),
        config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(pack_any(
            PreviousHostsPredicate::default(),
        ))),
    }
}

fn retry(r: &HttpRetry) -> Option<RetryPolicy> {
    if r.attempts == 0 {
        return None;
    }
    let mut p = default_retry();
    p.num_retries = Some(UInt32Value { value: r.attempts as u32 });
    if !r.retry_on.is_empty() {
        // Istio: HTTP status codes in retryOn become retriable_status_codes.
        let (codes, policies): (Vec<&str>, Vec<&str>) =
            r.retry_on.split(',').map(str::trim).partition(|p| p.parse::<u32>().is_ok());
        let mut on: Vec<&str> = policies;
        p.retriable_status_codes = codes.iter().filter_map(|c| c.parse().ok()).collect();
        if !p.retriable_status_codes.is_empty() && !on.contains(&"retriable-status-codes") {
            on.push("retriable-status-codes");
        }
        p.retry_on = on.join(",");
    }
    p.per_try_timeout = r.per_try_timeout.as_ref().and_then(parse_duration);
    if r.retry_ignore_previous_hosts == Some(false) {
        p.retry_host_predicate.clear();
    }
    if let Some(b) = r.backoff.as_ref().and_then(parse_duration) {
        p.retry_back_off = Some(retry_policy::RetryBackOff { base_interval: Some(b), ..Default::default() });
    }
    Some(p)
}

/// Percent (0–100, fractional) → parts per million, as Istio encodes it.
fn fraction(p: Option<&Percent>) -> FractionalPercent {
    let value = p.map(|p| p.value).unwrap_or(100.0);
    FractionalPercent {
        numerator: (value * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

fn grpc_code(name: &str) -> u32 {
    trellis_model::validate::GRPC_CODES.iter().position(|c| *c == name).unwrap_or(2) as u32
}

fn fault(f: &spec::HttpFaultInjection) -> HttpFault {
    HttpFault {
        delay: f.delay.as_ref().map(|d| FaultDelay {
            fault_delay_secifier: d
                .fixed_delay
                .as_ref()
                .and_then(parse_duration)
                .map(fault_delay::FaultDelaySecifier::FixedDelay),
            percentage: Some(fraction(d.percentage.as_ref())),
        }),
        abort: f.abort.as_ref().map(|a| FaultAbort {
            error_type: match (a.http_status, &a.grpc_status) {
                (Some(code), _) => Some(fault_abort::ErrorType::HttpStatus(code as u32)),
                (None, Some(g)) => Some(fault_abort::ErrorType::GrpcStatus(grpc_code(g))),
                _ => None,
            },
            percentage: Some(fraction(a.percentage.as_ref())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string_matcher(m: &StringMatch, ignore_case: bool) -> Option<StringMatcher> {
    let pattern = if let Some(e) = &m.exact {
        string_matcher::MatchPattern::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        string_matcher::MatchPattern::Prefix(p.clone())
    } else if let Some(r) = &m.regex {
        string_matcher::MatchPattern::SafeRegex(RegexMatcher { regex: r.clone(), ..Default::default() })
    } else {
        return None;
    };
    Some(StringMatcher { match_pattern: Some(pattern), ignore_case })
}

fn header_matcher(name: &str, m: &StringMatch, invert: bool) -> HeaderMatcher {
    let specifier = match string_matcher(m, false) {
        Some(sm) => header_matcher::HeaderMatchSpecifier::StringMatch(sm),
        None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
    };
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(specifier),
        invert_match: invert,
        ..Default::default()
    }
}

/// Whether an HTTPMatchRequest can apply to this proxy (source labels, namespace, gateways).
fn applies(m: &HttpMatchRequest, scope: &Scope<'_>, vs_ns: &str) -> bool {
    (m.source_labels.is_empty() || selects(&m.source_labels, &scope.proxy.labels))
        && (m.source_namespace.is_empty() || m.source_namespace == scope.proxy.namespace)
        && scope.gateways_apply(&m.gateways, vs_ns)
}

fn route_match(m: Option<&HttpMatchRequest>) -> RouteMatch {
    let Some(m) = m else {
        return RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        };
    };
    let path = match &m.uri {
        Some(StringMatch { exact: Some(e), .. }) => route_match::PathSpecifier::Path(e.clone()),
        Some(StringMatch { prefix: Some(p), .. }) => route_match::PathSpecifier::Prefix(p.clone()),
        Some(StringMatch { regex: Some(r), .. }) => {
            route_match::PathSpecifier::SafeRegex(RegexMatcher { regex: r.clone(), ..Default::default() })
        }
        _ => route_match::PathSpecifier::Prefix("/".into()),
    };
    let mut headers: Vec<HeaderMatcher> = Vec::new();
    for (pseudo, sm) in [(":method", &m.method), (":authority", &m.authority), (":scheme", &m.scheme)] {
        if let Some(sm) = sm {
            headers.push(header_matcher(pseudo, sm, false));
        }
    }
    headers.extend(m.headers.iter().map(|(n, sm)| header_matcher(n, sm, false)));
    headers.extend(m.without_headers.iter().map(|(n, sm)| header_matcher(n, sm, true)));
    let query_parameters = m
        .query_params
        .iter()
        .map(|(name, sm)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(match string_matcher(sm, false) {
                Some(s) => query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s),
                None => query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
            }),
        })
        .collect();
    RouteMatch {
        path_specifier: Some(path),
        case_sensitive: m.ignore_uri_case.then_some(BoolValue { value: false }),
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn header_options(ops: &BTreeSet<(String, String, bool)>) -> Vec<HeaderValueOption> {
    ops.iter()
        .map(|(k, v, append)| HeaderValueOption {
            header: Some(HeaderValue { key: k.clone(), value: v.clone(), ..Default::default() }),
            append_action: if *append {
                header_value_option::HeaderAppendAction::AppendIfExistsOrAdd as i32
            } else {
                header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            },
            ..Default::default()
        })
        .collect()
}

/// (request add, request remove, response add, response remove).
type HeaderOps = (Vec<HeaderValueOption>, Vec<String>, Vec<HeaderValueOption>, Vec<String>);

fn header_ops(h: Option<&Headers>) -> HeaderOps {
    let side = |ops: Option<&spec::HeaderOperations>| {
        let Some(ops) = ops else { return (Vec::new(), Vec::new()) };
        let set: BTreeSet<(String, String, bool)> = ops
            .set
            .iter()
            .map(|(k, v)| (k.clone(), v.clone(), false))
            .chain(ops.add.iter().map(|(k, v)| (k.clone(), v.clone(), true)))
            .collect();
        (header_options(&set), ops.remove.clone())
    };
    let (req_add, req_rm) = side(h.and_then(|h| h.request.as_ref()));
    let (resp_add, resp_rm) = side(h.and_then(|h| h.response.as_ref()));
    (req_add, req_rm, resp_add, resp_rm)
}

/// The cluster a destination means, seen from a VirtualService in `vs_ns` routing `port`.
pub(crate) fn destination_cluster(scope: &Scope<'_>, d: &Destination, vs_ns: &str, default_port: u32) -> String {
    let host = fqdn(&d.host, vs_ns);
    let port = match &d.port {
        Some(p) => p.number,
        None => match scope.registry.services.get(&host) {
            Some(svc) if svc.ports.len() == 1 => svc.ports[0].number,
            _ => default_port,
        },
    };
    cluster_name("outbound", port, &d.subset, &host)
}

fn hash_policy(scope: &Scope<'_>, host: &str, ns: &str) -> Vec<HashPolicy> {
    let Some((_, dr)) = scope.destination_rule(host, ns) else { return Vec::new() };
    let Some(ch) =
        dr.traffic_policy.as_ref().and_then(|t| t.load_balancer.as_ref()).and_then(|lb| lb.consistent_hash.as_ref())
    else {
        return Vec::new();
    };
    let specifier = if let Some(h) = &ch.http_header_name {
        hash_policy::PolicySpecifier::Header(hash_policy::Header { header_name: h.clone(), ..Default::default() })
    } else if let Some(c) = &ch.http_cookie {
        hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl: c.ttl.as_ref().and_then(|t| trellis_model::duration::parse_duration(&t.0).ok()).map(super::duration),
            ..Default::default()
        })
    } else if let Some(q) = &ch.http_query_parameter_name {
        hash_policy::PolicySpecifier::QueryParameter(hash_policy::QueryParameter { name: q.clone() })
    } else {
        hash_policy::PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties { source_ip: true })
    };
    vec![HashPolicy { policy_specifier: Some(specifier), terminal: false }]
}

fn route_action(scope: &Scope<'_>, r: &HttpRoute, vs_ns: &str, port: u32, m: Option<&HttpMatchRequest>) -> RouteAction {
    let clusters: Vec<(String, u32, Option<&Headers>)> = r
        .route
        .iter()
        .filter_map(|d| {
            Some((
                destination_cluster(scope, d.destination.as_ref()?, vs_ns, port),
                d.weight.max(0) as u32,
                d.headers.as_ref(),
            ))
        })
        .collect();
    let specifier = if clusters.len() == 1 && clusters[0].2.is_none() {
        ClusterSpecifier::Cluster(clusters[0].0.clone())
    } else {
        ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: clusters
                .iter()
                .filter(|(_, w, _)| clusters.len() == 1 || *w > 0)
                .map(|(name, w, headers)| {
                    let (req_add, req_rm, resp_add, resp_rm) = header_ops(*headers);
                    ClusterWeight {
                        name: name.clone(),
                        weight: Some(UInt32Value { value: if clusters.len() == 1 { 100 } else { *w } }),
                        request_headers_to_add: req_add,
                        request_headers_to_remove: req_rm,
                        response_headers_to_add: resp_add,
                        response_headers_to_remove: resp_rm,
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
    };
    let mut a = RouteAction { cluster_specifier: Some(specifier), ..Default::default() };
    // No timeout unless the VirtualService sets one (Envoy's own default is 15 s).
    a.timeout = Some(r.timeout.as_ref().and_then(parse_duration).unwrap_or(PbDuration { seconds: 0, nanos: 0 }));
    a.retry_policy = match &r.retries {
        Some(rt) => retry(rt),
        None => Some(default_retry()),
    };
    let mirrors: Vec<(&Destination, Option<&Percent>)> = match &r.mirror {
        Some(m) => vec![(m, r.mirror_percentage.as_ref())],
        None => r.mirrors.iter().filter_map(|m| Some((m.destination.as_ref()?, m.percentage.as_ref()))).collect(),
    };
    a.request_mirror_policies = mirrors
        .into_iter()
        .map(|(d, pct)| RequestMirrorPolicy {
            cluster: destination_cluster(scope, d, vs_ns, port),
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: Some(fraction(pct)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    if let Some(rw) = &r.rewrite {
        if !rw.uri.is_empty() {
            // Istio rewrites the matched prefix; an exact or regex match is replaced whole.
            match m.and_then(|m| m.uri.as_ref()) {
                Some(StringMatch { prefix: Some(_), .. }) | None => a.prefix_rewrite = rw.uri.clone(),
                Some(_) => {
                    a.regex_rewrite = Some(RegexMatchAndSubstitute {
                        pattern: Some(RegexMatcher { regex: ".*".into(), ..Default::default() }),
                        substitution: rw.uri.clone(),
                    })
                }
            }
        }
        if let Some(re) = &rw.uri_regex_rewrite {
            a.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher { regex: re.pattern.clone(), ..Default::default() }),
                substitution: re.rewrite.clone(),
            });
        }
        if !rw.authority.is_empty() {
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(rw.authority.clone()));
        }
    }
    if let Some(first) = r.route.first().and_then(|d| d.destination.as_ref()) {
        a.hash_policy = hash_policy(scope, &fqdn(&first.host, vs_ns), vs_ns);
    }
    a
}

fn redirect(red: &spec::HttpRedirect) -> RedirectAction {
    let code = match red.redirect_code.unwrap_or(301) {
        302 => redirect_action::RedirectResponseCode::Found,
        303 => redirect_action::RedirectResponseCode::SeeOther,
        307 => redirect_action::RedirectResponseCode::TemporaryRedirect,
        308 => redirect_action::RedirectResponseCode::PermanentRedirect,
        _ => redirect_action::RedirectResponseCode::MovedPermanently,
    };
    RedirectAction {
        host_redirect: red.authority.clone(),
        port_redirect: red.port.unwrap_or(0),
        path_rewrite_specifier: if !red.uri.is_empty() {
            Some(redirect_action::PathRewriteSpecifier::PathRedirect(red.uri.clone()))
        } else if !red.prefix_rewrite.is_empty() {
            Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(red.prefix_rewrite.clone()))
        } else {
            None
        },
        scheme_rewrite_specifier: (!red.scheme.is_empty())
            .then(|| redirect_action::SchemeRewriteSpecifier::SchemeRedirect(red.scheme.clone())),
        response_code: code as i32,
        ..Default::default()
    }
}

fn direct_response(dr: &spec::HttpDirectResponse) -> DirectResponseAction {
    let body = dr.body.as_ref().and_then(|b| {
        let specifier = match (&b.string, &b.bytes) {
            (Some(s), _) => data_source::Specifier::InlineString(s.clone()),
            (None, Some(b64)) => data_source::Specifier::InlineBytes(decode_base64(b64)),
            _ => return None,
        };
        Some(DataSource { specifier: Some(specifier), ..Default::default() })
    });
    DirectResponseAction { status: dr.status, body, ..Default::default() }
}

/// Standard base64 (validated before it gets here).
fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            _ => 63,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, c)| acc | (val(*c) << (18 - 6 * i)));
        let produced = chunk.len().saturating_sub(1);
        for i in 0..produced {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Envoy routes for one VirtualService seen on one service port.
pub(crate) fn vs_routes(scope: &Scope<'_>, key: &ResourceKey, vs: &VirtualService, port: u32) -> Vec<Route> {
    let mut out = Vec::new();
    for (i, r) in vs.http.iter().enumerate() {
        let matches: Vec<Option<&HttpMatchRequest>> = if r.matches.is_empty() {
            vec![None]
        } else {
            r.matches
                .iter()
                .filter(|m| applies(m, scope, &key.namespace) && m.port.is_none_or(|p| p == port))
                .map(Some)
                .collect()
        };
        for m in matches {
            let (req_add, req_rm, resp_add, resp_rm) = header_ops(r.headers.as_ref());
            let mut typed_per_filter_config: HashMap<String, Any> = HashMap::new();
            if let Some(f) = &r.fault {
                typed_per_filter_config.insert(FAULT_FILTER.to_string(), pack_any(fault(f)));
            }
            let action = if let Some(red) = &r.redirect {
                route::Action::Redirect(redirect(red))
            } else if let Some(dr) = &r.direct_response {
                route::Action::DirectResponse(direct_response(dr))
            } else {
                route::Action::Route(route_action(scope, r, &key.namespace, port, m))
            };
            let name = if r.name.is_empty() { format!("{}.{}.{i}", key.namespace, key.name) } else { r.name.clone() };
            out.push(Route {
                name,
                r#match: Some(route_match(m)),
                action: Some(action),
                request_headers_to_add: req_add,
                request_headers_to_remove: req_rm,
                response_headers_to_add: resp_add,
                response_headers_to_remove: resp_rm,
                typed_per_filter_config,
                ..Default::default()
            });
        }
    }
    out
}

/// Host names a client may use for a service port: `HOST:PORT`, and for a client in the same
/// namespace the short forms; without `:PORT` too when the port is 80 or `bare` (a listener
/// of the port's own, where the port is implied).
fn domains(svc: &Service, port: &ServicePort, client_ns: &str, bare: bool) -> Vec<String> {
    let mut names = vec![svc.hostname.clone()];
    if svc.namespace == client_ns
        && let Some(short) = svc.hostname.strip_suffix(&format!(".{}.svc.cluster.local", svc.namespace))
    {
        names.push(short.to_string());
        names.push(format!("{short}.{}", svc.namespace));
        names.push(format!("{short}.{}.svc", svc.namespace));
    }
    let mut out: Vec<String> = names.iter().map(|n| format!("{n}:{}", port.number)).collect();
    if port.number == 80 || bare {
        out.extend(names);
    }
    out
}

fn default_route(svc: &Service, port: &ServicePort) -> Route {
    Route {
        name: "default".into(),
        r#match: Some(route_match(None)),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster_name(
                "outbound",
                port.number,
                "",
                &svc.hostname,
            ))),
            timeout: Some(PbDuration { seconds: 0, nanos: 0 }),
            retry_policy: Some(default_retry()),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The outbound route configuration: one virtual host per reachable HTTP service port.
pub(crate) fn outbound(scope: &Scope<'_>, out: &mut Translated) {
    let ports = scope.services().flat_map(|s| s.ports.iter().filter(|p| p.protocol.is_http()).map(move |p| (s, p)));
    let config = route_config(scope, OUTBOUND_ROUTE, ports, false);
    out.routes.insert(OUTBOUND_ROUTE.to_string(), config);
}

/// A route configuration with a virtual host per service port.
pub(crate) fn route_config<'a>(
    scope: &Scope<'a>,
    name: &str,
    ports: impl Iterator<Item = (&'a Service, &'a ServicePort)>,
    bare: bool,
) -> RouteConfiguration {
    let mut virtual_hosts = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (svc, port) in ports {
        let domains: Vec<String> =
            domains(svc, port, &scope.proxy.namespace, bare).into_iter().filter(|d| used.insert(d.clone())).collect();
        if domains.is_empty() {
            continue;
        }
        let routes = match scope.virtual_service(&svc.hostname) {
            Some((key, vs)) => vs_routes(scope, key, vs, port.number),
            None => vec![default_route(svc, port)],
        };
        virtual_hosts.push(VirtualHost {
            name: format!("{}:{}", svc.hostname, port.number),
            domains,
            routes,
            ..Default::default()
        });
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// The inbound route configuration: requests for a service port this workload serves go to
/// the local application (`inbound|PORT||`), matched by the port in the Host header.
pub(crate) fn inbound(scope: &Scope<'_>, out: &mut Translated) {
    let mut virtual_hosts = Vec::new();
    for port in inbound_ports(scope).into_iter().filter(|p| p.protocol.is_http()) {
        let domains = match &port.bind {
            // A listener of its own: every request on it is for this port.
            Some(_) => {
                let name = inbound_route_name(port.number);
                let vh = inbound_vhost(&port, vec!["*".into()]);
                out.routes.insert(
                    name.clone(),
                    RouteConfiguration {
                        name,
                        virtual_hosts: vec![vh],
                        validate_clusters: Some(BoolValue { value: false }),
                        ..Default::default()
                    },
                );
                continue;
            }
            None => vec![format!("*:{}", port.number)],
        };
        virtual_hosts.push(inbound_vhost(&port, domains));
    }
    out.routes.insert(
        INBOUND_ROUTE.to_string(),
        RouteConfiguration {
            name: INBOUND_ROUTE.to_string(),
            virtual_hosts,
            validate_clusters: Some(BoolValue { value: false }),
            ..Default::default()
        },
    );
}

/// Route configuration of a Sidecar ingress listener.
pub(crate) fn inbound_route_name(port: u32) -> String {
    format!("inbound|{port}")
}

fn inbound_vhost(port: &InboundPort, domains: Vec<String>) -> VirtualHost {
    VirtualHost {
        name: format!("inbound|http|{}", port.number),
        domains,
        routes: vec![Route {
            name: "default".into(),
            r#match: Some(route_match(None)),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster_name("inbound", port.number, "", ""))),
                timeout: Some(PbDuration { seconds: 0, nanos: 0 }),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::decode_base64("aGVsbG8="), b"hello");
        assert_eq!(super::decode_base64("aGk="), b"hi");
        assert_eq!(super::decode_base64(""), b"");
    }
}
