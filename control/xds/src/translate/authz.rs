//! AuthorizationPolicy → Envoy's RBAC HTTP filters on a workload's inbound (server) listeners,
//! as Istio builds them: one RBAC filter per action present — AUDIT (Envoy's LOG), DENY, then
//! ALLOW — each rule one RBAC policy (permissions from `to` and request-side `when` keys,
//! principals from `from` and peer-side `when` keys). Envoy runs them natively; trellis-proxy
//! turns them into the auth module's configuration.
//!
//! Semantics kept from Istio: DENY before ALLOW; an ALLOW policy with no rules (or only ALLOW
//! policies whose rules match nothing) denies everything; with any ALLOW policy, what no ALLOW
//! rule matches is denied. Trellis validates no JWTs yet, so a request has no request
//! principal: `requestPrincipals` and `request.auth.*` values never match and their `not…`
//! forms always do — exactly what Istio does for a request without a token. Path templates
//! (`{*}`, `{**}`) are not translated: an ALLOW rule using one matches nothing, a DENY rule
//! using one matches every path (both fail closed).

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, principal::Authenticated, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use trellis_model::analyze::ROOT_NAMESPACE;
use trellis_model::spec::{AuthorizationAction, AuthorizationPolicy, Condition, Operation, Rule, Source, Spec};

use super::{Scope, selects};

/// Envoy's RBAC HTTP filter.
pub(crate) const RBAC_FILTER: &str = "envoy.filters.http.rbac";

/// The RBAC filters for this proxy's inbound side, in order.
pub(crate) fn rbac_filters(scope: &Scope<'_>) -> Vec<HttpFilter> {
    let mut policies: Vec<(String, &AuthorizationPolicy)> = scope
        .config
        .items
        .iter()
        .filter_map(|(k, s)| match s {
            Spec::AuthorizationPolicy(p)
                if (k.namespace == scope.proxy.namespace || k.namespace == ROOT_NAMESPACE)
                    && p.selector.as_ref().is_none_or(|s| selects(&s.match_labels, &scope.proxy.labels)) =>
            {
                Some((format!("ns[{}]-policy[{}]", k.namespace, k.name), p))
            }
            _ => None,
        })
        .collect();
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (action, envoy_action) in [
        (AuthorizationAction::AUDIT, rbac::Action::Log),
        (AuthorizationAction::DENY, rbac::Action::Deny),
        (AuthorizationAction::ALLOW, rbac::Action::Allow),
    ] {
        let of_action: Vec<&(String, &AuthorizationPolicy)> =
            policies.iter().filter(|(_, p)| p.action == action).collect();
        if of_action.is_empty() {
            continue;
        }
        let deny = action == AuthorizationAction::DENY;
        let mut rules = HashMap::new();
        for (name, p) in of_action {
            for (i, rule) in p.rules.iter().enumerate() {
                rules.insert(format!("{name}-rule[{i}]"), policy(rule, deny));
            }
        }
        let filter = RbacFilter {
            rules: Some(Rbac { action: envoy_action as i32, policies: rules, ..Default::default() }),
            ..Default::default()
        };
        out.push(HttpFilter {
            name: RBAC_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(filter))),
            ..Default::default()
        });
    }
    out
}

fn any_permission() -> Permission {
    Permission { rule: Some(permission::Rule::Any(true)) }
}

fn no_permission() -> Permission {
    Permission { rule: Some(permission::Rule::NotRule(Box::new(any_permission()))) }
}

fn any_principal() -> Principal {
    Principal { identifier: Some(principal::Identifier::Any(true)) }
}

fn no_principal() -> Principal {
    Principal { identifier: Some(principal::Identifier::NotId(Box::new(any_principal()))) }
}

fn and_p(rules: Vec<Permission>) -> Permission {
    if rules.is_empty() {
        return any_permission();
    }
    Permission { rule: Some(permission::Rule::AndRules(permission::Set { rules })) }
}

fn or_p(rules: Vec<Permission>) -> Permission {
    Permission { rule: Some(permission::Rule::OrRules(permission::Set { rules })) }
}

fn not_p(p: Permission) -> Permission {
    Permission { rule: Some(permission::Rule::NotRule(Box::new(p))) }
}

fn and_id(ids: Vec<Principal>) -> Principal {
    if ids.is_empty() {
        return any_principal();
    }
    Principal { identifier: Some(principal::Identifier::AndIds(principal::Set { ids })) }
}

fn or_id(ids: Vec<Principal>) -> Principal {
    Principal { identifier: Some(principal::Identifier::OrIds(principal::Set { ids })) }
}

fn not_id(p: Principal) -> Principal {
    Principal { identifier: Some(principal::Identifier::NotId(Box::new(p))) }
}

fn regex(r: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: r.to_string(),
            ..Default::default()
        })),
        ignore_case: false,
    }
}

/// Istio's wildcard forms: `*` (any non-empty), `prefix*`, `*suffix`, else exact; `add` is put
/// in front of the value (the `spiffe://` of principals).
fn wild(v: &str, add: &str, ignore_case: bool) -> StringMatcher {
    use string_matcher::MatchPattern as M;
    let pattern = if v == "*" {
        return regex(".+");
    } else if let Some(p) = v.strip_suffix('*') {
        M::Prefix(format!("{add}{p}"))
    } else if let Some(s) = v.strip_prefix('*') {
        M::Suffix(s.to_string())
    } else {
        M::Exact(format!("{add}{v}"))
    };
    StringMatcher { match_pattern: Some(pattern), ignore_case }
}

fn header(name: &str, m: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)),
        ..Default::default()
    }
}

fn cidr(v: &str) -> Option<CidrRange> {
    let (ip, len) = match v.split_once('/') {
        Some((ip, len)) => (ip, len.parse().ok()?),
        None => (v, if v.contains(':') { 128 } else { 32 }),
    };
    Some(CidrRange { address_prefix: ip.to_string(), prefix_len: Some(UInt32Value { value: len }) })
}

fn principal_name(m: StringMatcher) -> Principal {
    Principal { identifier: Some(principal::Identifier::Authenticated(Authenticated { principal_name: Some(m) })) }
}

/// A namespace as a match on the peer's SPIFFE identity (`.*/ns/NS/.*`, as Istio).
fn namespace(ns: &str) -> Principal {
    if ns == "*" {
        return principal_name(regex(".+"));
    }
    let ns = ns.replace('*', "[^/]*");
    principal_name(regex(&format!(".*/ns/{ns}/.*")))
}

fn service_account(v: &str) -> Principal {
    // Istio's serviceAccounts are `NAMESPACE/NAME`.
    let (ns, sa) = v.split_once('/').unwrap_or(("", v));
    principal_name(StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Suffix(format!("/ns/{ns}/sa/{sa}"))),
        ignore_case: false,
    })
}

fn host(v: &str) -> Permission {
    let h = |m: StringMatcher| Permission { rule: Some(permission::Rule::Header(header(":authority", m))) };
    let sm = |p: string_matcher::MatchPattern| StringMatcher { match_pattern: Some(p), ignore_case: true };
    use string_matcher::MatchPattern as M;
    if v == "*" {
        return any_permission();
    }
    if let Some(p) = v.strip_suffix('*') {
        return h(sm(M::Prefix(p.to_string())));
    }
    // The Host header may carry a port.
    if let Some(s) = v.strip_prefix('*') {
        return or_p(vec![h(sm(M::Suffix(s.to_string()))), h(sm(M::Contains(format!("{s}:"))))]);
    }
    or_p(vec![h(sm(M::Exact(v.to_string()))), h(sm(M::Prefix(format!("{v}:"))))])
}

fn path(v: &str, deny: bool) -> Permission {
    if v.contains('{') {
        // A path template is not translated: fail closed.
        return if deny { any_permission() } else { no_permission() };
    }
    let m = if v == "*" {
        StringMatcher { match_pattern: Some(string_matcher::MatchPattern::Prefix("/".into())), ignore_case: false }
    } else {
        wild(v, "", false)
    };
    Permission { rule: Some(permission::Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(m)) })) }
}

fn port(v: &str) -> Permission {
    match v.parse::<u32>() {
        Ok(p) => Permission { rule: Some(permission::Rule::DestinationPort(p)) },
        Err(_) => no_permission(),
    }
}

/// `values` OR'ed, AND NOT any of `not_values`; nothing when both are empty.
fn field<T>(
    values: &[String],
    not_values: &[String],
    one: impl Fn(&str) -> T,
    or: fn(Vec<T>) -> T,
    not: fn(T) -> T,
) -> Vec<T> {
    let mut out = Vec::new();
    if !values.is_empty() {
        out.push(or(values.iter().map(|v| one(v)).collect()));
    }
    if !not_values.is_empty() {
        out.push(not(or(not_values.iter().map(|v| one(v)).collect())));
    }
    out
}

fn operation(op: &Operation, deny: bool) -> Permission {
    let mut all = Vec::new();
    all.extend(field(&op.hosts, &op.not_hosts, host, or_p, not_p));
    all.extend(field(&op.ports, &op.not_ports, port, or_p, not_p));
    let method = |v: &str| Permission { rule: Some(permission::Rule::Header(header(":method", wild(v, "", false)))) };
    all.extend(field(&op.methods, &op.not_methods, method, or_p, not_p));
    all.extend(field(&op.paths, &op.not_paths, |v| path(v, deny), or_p, not_p));
    and_p(all)
}

fn source(s: &Source) -> Principal {
    let mut all = Vec::new();
    let principal = |v: &str| principal_name(wild(v, "spiffe://", false));
    all.extend(field(&s.principals, &s.not_principals, principal, or_id, not_id));
    // No request principal without JWT validation (see the module docs).
    all.extend(field(&s.request_principals, &s.not_request_principals, |_| no_principal(), or_id, not_id));
    all.extend(field(&s.namespaces, &s.not_namespaces, namespace, or_id, not_id));
    all.extend(field(&s.service_accounts, &s.not_service_accounts, service_account, or_id, not_id));
    let ip = |kind: fn(CidrRange) -> principal::Identifier| {
        move |v: &str| match cidr(v) {
            Some(c) => Principal { identifier: Some(kind(c)) },
            None => no_principal(),
        }
    };
    all.extend(field(&s.ip_blocks, &s.not_ip_blocks, ip(principal::Identifier::DirectRemoteIp), or_id, not_id));
    all.extend(field(&s.remote_ip_blocks, &s.not_remote_ip_blocks, ip(principal::Identifier::RemoteIp), or_id, not_id));
    let td = |v: &str| {
        if v == "*" {
            principal_name(regex(".+"))
        } else {
            principal_name(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Prefix(format!("spiffe://{v}/"))),
                ignore_case: false,
            })
        }
    };
    all.extend(field(&s.trust_domains, &s.not_trust_domains, td, or_id, not_id));
    and_id(all)
}

/// A `when` condition: on the request (a permission) or on the peer (a principal).
enum When {
    Request(Permission),
    Peer(Principal),
}

fn condition(c: &Condition) -> When {
    let key = c.key.as_str();
    if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        let one = |v: &str| Permission { rule: Some(permission::Rule::Header(header(name, wild(v, "", false)))) };
        return When::Request(and_p(field(&c.values, &c.not_values, one, or_p, not_p)));
    }
    let peer =
        |one: &dyn Fn(&str) -> Principal| When::Peer(and_id(field(&c.values, &c.not_values, one, or_id, not_id)));
    let ip = |kind: fn(CidrRange) -> principal::Identifier| {
        move |v: &str| match cidr(v) {
            Some(c) => Principal { identifier: Some(kind(c)) },
            None => no_principal(),
        }
    };
    match key {
        "source.ip" => peer(&ip(principal::Identifier::DirectRemoteIp)),
        "remote.ip" => peer(&ip(principal::Identifier::RemoteIp)),
        "source.namespace" => peer(&namespace),
        "source.principal" => peer(&|v| principal_name(wild(v, "spiffe://", false))),
        "source.serviceAccount" => peer(&service_account),
        "destination.ip" => {
            let one = |v: &str| match cidr(v) {
                Some(c) => Permission { rule: Some(permission::Rule::DestinationIp(c)) },
                None => no_permission(),
            };
            When::Request(and_p(field(&c.values, &c.not_values, one, or_p, not_p)))
        }
        "destination.port" => When::Request(and_p(field(&c.values, &c.not_values, port, or_p, not_p))),
        "connection.sni" => {
            let one = |v: &str| Permission { rule: Some(permission::Rule::RequestedServerName(wild(v, "", false))) };
            When::Request(and_p(field(&c.values, &c.not_values, one, or_p, not_p)))
        }
        // request.auth.*: no request principal without JWT validation.
        _ => peer(&|_| no_principal()),
    }
}

/// One rule as one RBAC policy: any of `to` AND the request conditions; any of `from` AND the
/// peer conditions.
fn policy(rule: &Rule, deny: bool) -> Policy {
    let mut permissions = Vec::new();
    let ops: Vec<Permission> =
        rule.to.iter().filter_map(|t| t.operation.as_ref()).map(|o| operation(o, deny)).collect();
    if !ops.is_empty() {
        permissions.push(or_p(ops));
    }
    let mut principals = Vec::new();
    let sources: Vec<Principal> = rule.from.iter().filter_map(|f| f.source.as_ref()).map(source).collect();
    if !sources.is_empty() {
        principals.push(or_id(sources));
    }
    for c in &rule.when {
        match condition(c) {
            When::Request(p) => permissions.push(p),
            When::Peer(p) => principals.push(p),
        }
    }
    Policy { permissions: vec![and_p(permissions)], principals: vec![and_id(principals)], ..Default::default() }
}
