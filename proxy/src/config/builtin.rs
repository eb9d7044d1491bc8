//! Envoy's native behaviour — the fault filter's per-route config, the route's `retry_policy`
//! and `request_mirror_policies`, the RBAC filter — turned into the configuration of the
//! built-in filter modules that carry it out in trellis-proxy (filters/fault, filters/retry,
//! filters/mirror, filters/auth; ARCHITECTURE.md: one implementation of each behaviour). A
//! field the modules cannot honour is refused, naming it.

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use prost::Message;
use serde_json::{Value, json};

use super::{ConvertError, duration};

/// What a route asks of the built-in modules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteBuiltins {
    pub fault: Option<Value>,
    pub retry: Option<Value>,
    pub mirror: Vec<Value>,
}

impl RouteBuiltins {
    pub fn is_empty(&self) -> bool {
        self.fault.is_none() && self.retry.is_none() && self.mirror.is_empty()
    }
}

/// A fraction as a percentage (0–100).
fn percent(p: Option<&FractionalPercent>) -> f64 {
    let Some(p) = p else { return 100.0 };
    let denominator = match fractional_percent::DenominatorType::try_from(p.denominator) {
        Ok(fractional_percent::DenominatorType::TenThousand) => 10_000.0,
        Ok(fractional_percent::DenominatorType::Million) => 1_000_000.0,
        _ => 100.0,
    };
    (f64::from(p.numerator) * 100.0 / denominator).min(100.0)
}

/// The fault filter's per-route config (`typed_per_filter_config["envoy.filters.http.fault"]`).
pub fn fault(any: &envoy_types::pb::google::protobuf::Any, what: &str) -> Result<Value, ConvertError> {
    let what = format!("{what}, fault config");
    let f = HttpFault::decode(any.value.as_slice()).map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
    if !f.upstream_cluster.is_empty() || !f.headers.is_empty() || !f.downstream_nodes.is_empty() {
        return Err(ConvertError::unsupported(&what, "upstream_cluster / headers / downstream_nodes conditions"));
    }
    if f.max_active_faults.is_some() || f.response_rate_limit.is_some() {
        return Err(ConvertError::unsupported(&what, "max_active_faults / response_rate_limit"));
    }
    let mut out = serde_json::Map::new();
    if let Some(d) = &f.delay {
        let ms = match &d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(d)) => duration(d).as_millis() as u64,
            Some(FaultDelaySecifier::HeaderDelay(_)) => {
                return Err(ConvertError::unsupported(&what, "delay.header_delay"));
            }
            None => return Err(ConvertError::invalid(&what, "a delay without fixed_delay")),
        };
        out.insert("delay".into(), json!({"fixedDelayMs": ms, "percentage": percent(d.percentage.as_ref())}));
    }
    if let Some(a) = &f.abort {
        let mut abort = serde_json::Map::new();
        match &a.error_type {
            Some(fault_abort::ErrorType::HttpStatus(s)) if (200..600).contains(s) => {
                abort.insert("httpStatus".into(), json!(s));
            }
            Some(fault_abort::ErrorType::HttpStatus(s)) => {
                return Err(ConvertError::invalid(&what, format!("abort.http_status {s}")));
            }
            Some(fault_abort::ErrorType::GrpcStatus(s)) => {
                abort.insert("grpcStatus".into(), json!(s));
            }
            Some(fault_abort::ErrorType::HeaderAbort(_)) => {
                return Err(ConvertError::unsupported(&what, "abort.header_abort"));
            }
            None => return Err(ConvertError::invalid(&what, "an abort without a status")),
        }
        if !a.response_body.is_empty() {
            abort.insert("body".into(), json!(a.response_body));
        }
        abort.insert("percentage".into(), json!(percent(a.percentage.as_ref())));
        out.insert("abort".into(), Value::Object(abort));
    }
    Ok(Value::Object(out))
}

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "connect-failure",
    "refused-stream",
    "reset",
    "retriable-4xx",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// A route's retry policy → (the retry module's config for the route, the per-try timeout the
/// router enforces on each attempt).
pub fn retry(p: &pb::RetryPolicy, what: &str) -> Result<(Value, Option<Duration>), ConvertError> {
    let what = format!("{what}, retry_policy");
    if p.retry_priority.is_some()
        || !p.retry_options_predicates.is_empty()
        || p.rate_limited_retry_back_off.is_some()
        || !p.retriable_request_headers.is_empty()
        || p.per_try_idle_timeout.is_some()
    {
        return Err(ConvertError::unsupported(
            &what,
            "retry_priority / retry_options_predicates / rate_limited_retry_back_off / retriable_request_headers / per_try_idle_timeout",
        ));
    }
    // previous_hosts is honoured by the load balancers moving on (round robin, least request,
    // random pick again); a strict exclusion is not implemented, and nothing else is accepted.
    if let Some(h) = p.retry_host_predicate.iter().find(|h| h.name != "envoy.retry_host_predicates.previous_hosts") {
        return Err(ConvertError::unsupported(&what, format!("retry_host_predicate {}", h.name)));
    }
    let retry_on: Vec<&str> = p.retry_on.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if let Some(bad) = retry_on.iter().find(|o| !RETRY_ON.contains(o)) {
        return Err(ConvertError::unsupported(&what, format!("retry_on {bad:?}")));
    }
    let mut headers = Vec::new();
    for h in &p.retriable_headers {
        let m = match &h.header_match_specifier {
            Some(HeaderMatchSpecifier::PresentMatch(true)) if !h.invert_match => json!({"name": h.name}),
            Some(HeaderMatchSpecifier::StringMatch(sm)) if !h.invert_match && !sm.ignore_case => {
                match &sm.match_pattern {
                    Some(MatchPattern::Exact(v)) => json!({"name": h.name, "exact": v}),
                    _ => {
                        return Err(ConvertError::unsupported(
                            &what,
                            format!("retriable_headers {}: only exact or present", h.name),
                        ));
                    }
                }
            }
            _ => {
                return Err(ConvertError::unsupported(
                    &what,
                    format!("retriable_headers {}: only exact or present", h.name),
                ));
            }
        };
        headers.push(m);
    }
    let mut out = json!({
        "attempts": p.num_retries.as_ref().map(|n| n.value).unwrap_or(1),
        "retryOn": retry_on,
        "retriableStatusCodes": p.retriable_status_codes,
        "retriableHeaders": headers,
    });
    if let Some(b) = &p.retry_back_off {
        if let Some(base) = &b.base_interval {
            out["backoffBaseMs"] = json!(duration(base).as_millis() as u64);
        }
        if let Some(max) = &b.max_interval {
            out["backoffMaxMs"] = json!(duration(max).as_millis() as u64);
        }
    }
    let per_try = p.per_try_timeout.as_ref().map(duration).filter(|d| !d.is_zero());
    Ok((out, per_try))
}

/// A route's mirror policies → the mirror module's list for the route.
pub fn mirrors(policies: &[pb::route_action::RequestMirrorPolicy], what: &str) -> Result<Vec<Value>, ConvertError> {
    let mut out = Vec::new();
    for m in policies {
        let what = format!("{what}, request_mirror_policies");
        if !m.cluster_header.is_empty()
            || m.disable_shadow_host_suffix_append
            || !m.request_headers_mutations.is_empty()
            || !m.host_rewrite_literal.is_empty()
        {
            return Err(ConvertError::unsupported(
                &what,
                "cluster_header / disable_shadow_host_suffix_append / request_headers_mutations / host_rewrite_literal",
            ));
        }
        if m.cluster.is_empty() {
            return Err(ConvertError::invalid(&what, "no cluster"));
        }
        let pct = percent(m.runtime_fraction.as_ref().and_then(|r| r.default_value.as_ref()));
        out.push(json!({"cluster": m.cluster, "percentage": pct}));
    }
    Ok(out)
}

/// Envoy's RBAC HTTP filter config → one stage of the auth module's configuration (`None`: a
/// filter without rules, which enforces nothing).
pub fn rbac(any: &envoy_types::pb::google::protobuf::Any, what: &str) -> Result<Option<Value>, ConvertError> {
    use envoy_types::pb::envoy::config::rbac::v3::rbac::Action;
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
    let what = format!("{what}, RBAC filter");
    let f = RbacFilter::decode(any.value.as_slice()).map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
    if f.matcher.is_some() || f.shadow_rules.is_some() || f.shadow_matcher.is_some() {
        return Err(ConvertError::unsupported(&what, "matcher / shadow_rules / shadow_matcher"));
    }
    let Some(rules) = f.rules else { return Ok(None) };
    if rules.audit_logging_options.is_some() {
        return Err(ConvertError::unsupported(&what, "audit_logging_options"));
    }
    let action = match Action::try_from(rules.action) {
        Ok(Action::Allow) => "ALLOW",
        Ok(Action::Deny) => "DENY",
        Ok(Action::Log) => "LOG",
        Err(_) => return Err(ConvertError::invalid(&what, format!("action {}", rules.action))),
    };
    let mut policies = serde_json::Map::new();
    // Sorted, so that the same policies give the same configuration.
    let mut names: Vec<&String> = rules.policies.keys().collect();
    names.sort();
    for name in names {
        let p = &rules.policies[name];
        let pw = format!("{what}, policy {name}");
        if p.condition.is_some() || p.checked_condition.is_some() {
            return Err(ConvertError::unsupported(&pw, "condition / checked_condition (CEL)"));
        }
        let permissions = p.permissions.iter().map(|x| permission(x, &pw)).collect::<Result<Vec<_>, _>>()?;
        let principals = p.principals.iter().map(|x| principal(x, &pw)).collect::<Result<Vec<_>, _>>()?;
        policies.insert(name.clone(), json!({"permissions": permissions, "principals": principals}));
    }
    Ok(Some(json!({"action": action, "policies": policies})))
}

fn string_match(
    m: &envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher,
    what: &str,
) -> Result<Value, ConvertError> {
    let mut out = match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => json!({"exact": v}),
        Some(MatchPattern::Prefix(v)) => json!({"prefix": v}),
        Some(MatchPattern::Suffix(v)) => json!({"suffix": v}),
        Some(MatchPattern::Contains(v)) => json!({"contains": v}),
        Some(MatchPattern::SafeRegex(r)) => match r.regex.as_str() {
            ".+" => json!({"nonEmpty": true}),
            ".*" => json!({"prefix": ""}),
            // Istio's namespace match.
            re => match re.strip_prefix(".*/ns/").and_then(|r| r.strip_suffix("/.*")) {
                Some(ns) if ns.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
                    json!({"contains": format!("/ns/{ns}/")})
                }
                _ => {
                    return Err(ConvertError::unsupported(
                        what,
                        format!(
                            "regex {re:?} (the auth module matches exact, prefix, suffix, contains, .+ and Istio's namespace pattern)"
                        ),
                    ));
                }
            },
        },
        other => return Err(ConvertError::unsupported(what, format!("string match {other:?}"))),
    };
    if m.ignore_case {
        out["ignoreCase"] = json!(true);
    }
    Ok(out)
}

fn header_match(h: &pb::HeaderMatcher, what: &str) -> Result<Value, ConvertError> {
    if h.treat_missing_header_as_empty {
        return Err(ConvertError::unsupported(what, format!("header {}: treat_missing_header_as_empty", h.name)));
    }
    let matcher = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(sm)) => Some(string_match(sm, what)?),
        Some(HeaderMatchSpecifier::PresentMatch(true)) => None,
        #[allow(deprecated)]
        Some(HeaderMatchSpecifier::ExactMatch(v)) => Some(json!({"exact": v})),
        #[allow(deprecated)]
        Some(HeaderMatchSpecifier::PrefixMatch(v)) => Some(json!({"prefix": v})),
        #[allow(deprecated)]
        Some(HeaderMatchSpecifier::SuffixMatch(v)) => Some(json!({"suffix": v})),
        other => return Err(ConvertError::unsupported(what, format!("header {} match {other:?}", h.name))),
    };
    Ok(json!({"name": h.name.to_ascii_lowercase(), "match": matcher, "invert": h.invert_match}))
}

fn cidr(c: &envoy_types::pb::envoy::config::core::v3::CidrRange) -> String {
    match &c.prefix_len {
        Some(l) => format!("{}/{}", c.address_prefix, l.value),
        None => c.address_prefix.clone(),
    }
}

fn url_path(p: &envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher, what: &str) -> Result<Value, ConvertError> {
    use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule;
    match &p.rule {
        Some(Rule::Path(sm)) => string_match(sm, what),
        None => Err(ConvertError::invalid(what, "url_path without a rule")),
    }
}

fn permission(p: &envoy_types::pb::envoy::config::rbac::v3::Permission, what: &str) -> Result<Value, ConvertError> {
    use envoy_types::pb::envoy::config::rbac::v3::permission::Rule;
    let all = |s: &[envoy_types::pb::envoy::config::rbac::v3::Permission]| {
        s.iter().map(|x| permission(x, what)).collect::<Result<Vec<_>, _>>()
    };
    Ok(match &p.rule {
        Some(Rule::Any(a)) => json!({"any": a}),
        Some(Rule::AndRules(s)) => json!({"and": all(&s.rules)?}),
        Some(Rule::OrRules(s)) => json!({"or": all(&s.rules)?}),
        Some(Rule::NotRule(p)) => json!({"not": permission(p, what)?}),
        Some(Rule::Header(h)) => json!({"header": header_match(h, what)?}),
        Some(Rule::UrlPath(u)) => json!({"path": url_path(u, what)?}),
        Some(Rule::DestinationPort(n)) => json!({"destinationPort": n}),
        Some(Rule::DestinationIp(c)) => json!({"destinationIp": cidr(c)}),
        Some(Rule::RequestedServerName(sm)) => json!({"sni": string_match(sm, what)?}),
        other => return Err(ConvertError::unsupported(what, format!("permission {other:?}"))),
    })
}

fn principal(p: &envoy_types::pb::envoy::config::rbac::v3::Principal, what: &str) -> Result<Value, ConvertError> {
    use envoy_types::pb::envoy::config::rbac::v3::principal::Identifier;
    let all = |s: &[envoy_types::pb::envoy::config::rbac::v3::Principal]| {
        s.iter().map(|x| principal(x, what)).collect::<Result<Vec<_>, _>>()
    };
    Ok(match &p.identifier {
        Some(Identifier::Any(a)) => json!({"any": a}),
        Some(Identifier::AndIds(s)) => json!({"and": all(&s.ids)?}),
        Some(Identifier::OrIds(s)) => json!({"or": all(&s.ids)?}),
        Some(Identifier::NotId(p)) => json!({"not": principal(p, what)?}),
        Some(Identifier::Authenticated(a)) => match &a.principal_name {
            Some(sm) => json!({"principal": string_match(sm, what)?}),
            None => json!({"principal": {"nonEmpty": true}}),
        },
        #[allow(deprecated)]
        Some(Identifier::SourceIp(c)) | Some(Identifier::DirectRemoteIp(c)) => json!({"directRemoteIp": cidr(c)}),
        Some(Identifier::RemoteIp(c)) => json!({"remoteIp": cidr(c)}),
        Some(Identifier::Header(h)) => json!({"header": header_match(h, what)?}),
        Some(Identifier::UrlPath(u)) => json!({"path": url_path(u, what)?}),
        other => return Err(ConvertError::unsupported(what, format!("principal {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::rbac::v3::{Policy, Principal, Rbac, principal, principal::Authenticated};
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
    use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
    use envoy_types::util::pack_any;

    fn with_principal_regex(re: &str) -> envoy_types::pb::google::protobuf::Any {
        let p = Principal {
            identifier: Some(principal::Identifier::Authenticated(Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                        regex: re.into(),
                        ..Default::default()
                    })),
                    ignore_case: false,
                }),
            })),
        };
        let permissions = vec![envoy_types::pb::envoy::config::rbac::v3::Permission {
            rule: Some(envoy_types::pb::envoy::config::rbac::v3::permission::Rule::Any(true)),
        }];
        let policy = Policy { permissions, principals: vec![p], ..Default::default() };
        pack_any(RbacFilter {
            rules: Some(Rbac { action: 0, policies: [("p".to_string(), policy)].into(), ..Default::default() }),
            ..Default::default()
        })
    }

    #[test]
    fn rbac_becomes_an_auth_stage_and_unknown_regexes_are_refused() {
        let stage = super::rbac(&with_principal_regex(".*/ns/bookinfo/.*"), "listener l").unwrap().unwrap();
        assert_eq!(
            stage,
            serde_json::json!({"action": "ALLOW", "policies": {"p": {"permissions": [{"any": true}], "principals": [{"principal": {"contains": "/ns/bookinfo/"}}]}}})
        );
        let err = super::rbac(&with_principal_regex("^spiffe://.*admin$"), "listener l").unwrap_err().to_string();
        assert!(err.contains("listener l, RBAC filter, policy p") && err.contains("regex"), "{err}");
        // A filter without rules enforces nothing.
        assert_eq!(super::rbac(&pack_any(RbacFilter::default()), "l").unwrap(), None);
    }
}
