//! Envoy's native per-route behaviour — the fault filter's per-route config, the route's
//! `retry_policy` and `request_mirror_policies` — turned into the configuration of the
//! built-in filter modules that carry it out in trellis-proxy (filters/fault, filters/retry,
//! filters/mirror; ARCHITECTURE.md: one implementation of each behaviour). A field the modules
//! cannot honour is refused, naming it.

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
