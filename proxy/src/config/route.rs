//! Route configurations (RDS) as the router uses them: virtual hosts matched by authority,
//! routes matched in order, and what a matched route does. Converted from Envoy's protos;
//! anything the router cannot do exactly is an error naming the field (→ NACK).
#![allow(deprecated)] // Envoy's deprecated fields are still read, as Envoy reads them.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, data_source, header_value_option};
use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::config::route::v3::route_action::{ClusterSpecifier, HostRewriteSpecifier, hash_policy};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, query_parameter_matcher, redirect_action, route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;

use super::{ConvertError, duration};

#[derive(Debug, Clone)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug, Clone)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<Domain>,
    pub routes: Vec<Route>,
}

/// Envoy's domain forms: exact, `*.suffix` / `*suffix`, `prefix*`, `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    Exact(String),
    Suffix(String),
    Prefix(String),
    Any,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// The route's name, unique in its table (a repeated name gets `~N` appended), as the
    /// `route_name` property filters see and the built-in modules key their configs by.
    pub name: String,
    pub matcher: RouteMatch,
    pub action: Action,
    pub headers: HeaderOps,
    /// Fault, retry and mirror, for the built-in modules.
    pub builtins: super::builtin::RouteBuiltins,
}

/// Header additions and removals, applied in Envoy's order (remove, then add).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub request_add: Vec<(HeaderName, HeaderValue, bool)>,
    pub request_remove: Vec<HeaderName>,
    pub response_add: Vec<(HeaderName, HeaderValue, bool)>,
    pub response_remove: Vec<HeaderName>,
}

#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lower case; `:method`, `:authority`, `:scheme`, `:path` are pseudo-headers.
    pub name: String,
    /// `None`: present.
    pub value: Option<(StrMatch, bool)>,
    pub invert: bool,
}

#[derive(Debug, Clone)]
pub struct QueryMatch {
    pub name: String,
    pub value: Option<(StrMatch, bool)>,
}

#[derive(Debug, Clone)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct { status: u16, body: bytes::Bytes },
}

#[derive(Debug, Clone)]
pub struct Forward {
    /// (cluster, weight, per-cluster header ops).
    pub clusters: Vec<WeightedCluster>,
    pub total_weight: u32,
    /// `None`: no timeout.
    pub timeout: Option<Duration>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<String>,
    pub hash_policy: Vec<HashPolicy>,
    /// Each attempt's timeout (the retry policy's per_try_timeout).
    pub per_try_timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub headers: HeaderOps,
}

#[derive(Debug, Clone)]
pub enum HashPolicy {
    Header(HeaderName),
    Cookie(String),
    SourceIp,
    Query(String),
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u32>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub code: u16,
    pub strip_query: bool,
}

// === conversion ===

fn string_match(m: &StringMatcher, what: &str) -> Result<(StrMatch, bool), ConvertError> {
    let p = match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => StrMatch::Exact(s.clone()),
        Some(string_matcher::MatchPattern::Prefix(s)) => StrMatch::Prefix(s.clone()),
        Some(string_matcher::MatchPattern::Suffix(s)) => StrMatch::Suffix(s.clone()),
        Some(string_matcher::MatchPattern::Contains(s)) => StrMatch::Contains(s.clone()),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => StrMatch::Regex(regex(&r.regex, what)?),
        other => return Err(ConvertError::unsupported(what, format!("string matcher {other:?}"))),
    };
    Ok((p, m.ignore_case))
}

/// Envoy's regexes (RE2) match the whole value; anchor them.
pub(crate) fn regex(re: &str, what: &str) -> Result<Regex, ConvertError> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ConvertError::invalid(what, format!("regex {re:?}: {e}")))
}

/// Headers to add (name, value, append) and to remove.
type AddRemove = (Vec<(HeaderName, HeaderValue, bool)>, Vec<HeaderName>);

fn header_ops(add: &[HeaderValueOption], remove: &[String], what: &str) -> Result<AddRemove, ConvertError> {
    let mut adds = Vec::new();
    for o in add {
        let Some(h) = &o.header else { continue };
        let name = HeaderName::from_bytes(h.key.as_bytes())
            .map_err(|_| ConvertError::invalid(what, format!("header name {:?}", h.key)))?;
        let value = if h.raw_value.is_empty() { h.value.as_bytes() } else { h.raw_value.as_slice() };
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| ConvertError::invalid(what, format!("header value of {name}")))?;
        let append = if o.append.is_some() {
            o.append.as_ref().is_some_and(|a| a.value)
        } else {
            o.append_action == header_value_option::HeaderAppendAction::AppendIfExistsOrAdd as i32
        };
        if o.append_action == header_value_option::HeaderAppendAction::AddIfAbsent as i32
            || o.append_action == header_value_option::HeaderAppendAction::OverwriteIfExists as i32
        {
            return Err(ConvertError::unsupported(what, format!("append_action {} of header {name}", o.append_action)));
        }
        adds.push((name, value, append));
    }
    let mut removes = Vec::new();
    for r in remove {
        removes.push(
            HeaderName::from_bytes(r.as_bytes())
                .map_err(|_| ConvertError::invalid(what, format!("header name {r:?}")))?,
        );
    }
    Ok((adds, removes))
}

fn ops(
    req_add: &[HeaderValueOption],
    req_rm: &[String],
    resp_add: &[HeaderValueOption],
    resp_rm: &[String],
    what: &str,
) -> Result<HeaderOps, ConvertError> {
    let (request_add, request_remove) = header_ops(req_add, req_rm, what)?;
    let (response_add, response_remove) = header_ops(resp_add, resp_rm, what)?;
    Ok(HeaderOps { request_add, request_remove, response_add, response_remove })
}

fn domain(d: &str) -> Domain {
    let d = d.to_ascii_lowercase();
    if d == "*" {
        Domain::Any
    } else if let Some(s) = d.strip_prefix('*') {
        Domain::Suffix(s.to_string())
    } else if let Some(p) = d.strip_suffix('*') {
        Domain::Prefix(p.to_string())
    } else {
        Domain::Exact(d)
    }
}

pub fn convert(rc: &pb::RouteConfiguration) -> Result<RouteTable, ConvertError> {
    let what = format!("route configuration {}", rc.name);
    if !rc.request_headers_to_add.is_empty() || !rc.response_headers_to_add.is_empty() {
        return Err(ConvertError::unsupported(&what, "route-configuration-level header operations"));
    }
    let mut virtual_hosts = Vec::new();
    for vh in &rc.virtual_hosts {
        let vwhat = format!("{what}, virtual host {}", vh.name);
        if vh.require_tls != 0 {
            return Err(ConvertError::unsupported(&vwhat, "require_tls"));
        }
        if !vh.request_headers_to_add.is_empty() || !vh.response_headers_to_add.is_empty() {
            return Err(ConvertError::unsupported(&vwhat, "virtual-host-level header operations"));
        }
        if vh.retry_policy.is_some() || !vh.typed_per_filter_config.is_empty() {
            return Err(ConvertError::unsupported(&vwhat, "virtual-host-level retry policy or filter config"));
        }
        let routes = vh.routes.iter().map(|r| route(r, &vwhat)).collect::<Result<Vec<_>, _>>()?;
        virtual_hosts.push(VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.iter().map(|d| domain(d)).collect(),
            routes,
        });
    }
    // Route names are how filters tell routes apart: make repeated ones unique.
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for r in virtual_hosts.iter_mut().flat_map(|vh| vh.routes.iter_mut()) {
        let n = seen.entry(r.name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            r.name = format!("{}~{n}", r.name);
        }
    }
    Ok(RouteTable { name: rc.name.clone(), virtual_hosts })
}

fn route(r: &pb::Route, vwhat: &str) -> Result<Route, ConvertError> {
    let what = format!("{vwhat}, route {}", r.name);
    let mut builtins = super::builtin::RouteBuiltins::default();
    for (key, any) in &r.typed_per_filter_config {
        if key != super::listener::FAULT {
            return Err(ConvertError::unsupported(&what, format!("per-route config of {key}")));
        }
        builtins.fault = Some(super::builtin::fault(any, &what)?);
    }
    let m = r.r#match.as_ref().ok_or_else(|| ConvertError::invalid(&what, "no match"))?;
    let matcher = route_match_of(m, &what)?;
    let headers = ops(
        &r.request_headers_to_add,
        &r.request_headers_to_remove,
        &r.response_headers_to_add,
        &r.response_headers_to_remove,
        &what,
    )?;
    let action = match &r.action {
        Some(pb::route::Action::Route(a)) => {
            if let Some(p) = &a.retry_policy {
                let (config, _) = super::builtin::retry(p, &what)?;
                builtins.retry = Some(config).filter(|c| c["attempts"] != 0);
            }
            builtins.mirror = super::builtin::mirrors(&a.request_mirror_policies, &what)?;
            Action::Forward(forward(a, &what)?)
        }
        Some(pb::route::Action::Redirect(rd)) => Action::Redirect(redirect(rd, &what)?),
        Some(pb::route::Action::DirectResponse(d)) => {
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(data_source::Specifier::InlineString(s)) => bytes::Bytes::from(s.clone()),
                Some(data_source::Specifier::InlineBytes(b)) => bytes::Bytes::from(b.clone()),
                None => bytes::Bytes::new(),
                Some(other) => return Err(ConvertError::unsupported(&what, format!("direct response body {other:?}"))),
            };
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..600).contains(s))
                .ok_or_else(|| ConvertError::invalid(&what, format!("direct response status {}", d.status)))?;
            Action::Direct { status, body }
        }
        other => return Err(ConvertError::unsupported(&what, format!("action {other:?}"))),
    };
    Ok(Route { name: r.name.clone(), matcher, action, headers, builtins })
}

fn route_match_of(m: &pb::RouteMatch, what: &str) -> Result<RouteMatch, ConvertError> {
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(route_match::PathSpecifier::SafeRegex(r)) => PathMatch::Regex(regex(&r.regex, what)?),
        other => return Err(ConvertError::unsupported(what, format!("path match {other:?}"))),
    };
    if m.runtime_fraction.is_some() || m.grpc.is_some() || m.tls_context.is_some() || !m.dynamic_metadata.is_empty() {
        return Err(ConvertError::unsupported(what, "runtime_fraction / grpc / tls_context / dynamic_metadata match"));
    }
    let mut headers = Vec::new();
    for h in &m.headers {
        let value = match &h.header_match_specifier {
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => Some(string_match(sm, what)?),
            Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)) | None => None,
            Some(header_matcher::HeaderMatchSpecifier::ExactMatch(s)) => Some((StrMatch::Exact(s.clone()), false)),
            Some(header_matcher::HeaderMatchSpecifier::PrefixMatch(s)) => Some((StrMatch::Prefix(s.clone()), false)),
            Some(header_matcher::HeaderMatchSpecifier::SuffixMatch(s)) => Some((StrMatch::Suffix(s.clone()), false)),
            Some(header_matcher::HeaderMatchSpecifier::SafeRegexMatch(r)) => {
                Some((StrMatch::Regex(regex(&r.regex, what)?), false))
            }
            other => return Err(ConvertError::unsupported(what, format!("header match {other:?}"))),
        };
        headers.push(HeaderMatch { name: h.name.to_ascii_lowercase(), value, invert: h.invert_match });
    }
    let mut query = Vec::new();
    for q in &m.query_parameters {
        let value = match &q.query_parameter_match_specifier {
            Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm)) => {
                Some(string_match(sm, what)?)
            }
            Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(_)) | None => None,
        };
        query.push(QueryMatch { name: q.name.clone(), value });
    }
    Ok(RouteMatch { path, case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value), headers, query })
}

fn forward(a: &pb::RouteAction, what: &str) -> Result<Forward, ConvertError> {
    let clusters = match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => {
            vec![WeightedCluster { name: c.clone(), weight: 1, headers: HeaderOps::default() }]
        }
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let mut out = Vec::new();
            for c in &w.clusters {
                let cw = format!("{what}, weighted cluster {}", c.name);
                let headers = ops(
                    &c.request_headers_to_add,
                    &c.request_headers_to_remove,
                    &c.response_headers_to_add,
                    &c.response_headers_to_remove,
                    &cw,
                )?;
                out.push(WeightedCluster {
                    name: c.name.clone(),
                    weight: c.weight.as_ref().map(|w| w.value).unwrap_or(0),
                    headers,
                });
            }
            out
        }
        other => return Err(ConvertError::unsupported(what, format!("cluster specifier {other:?}"))),
    };
    let total_weight: u32 = clusters.iter().map(|c| c.weight).sum();
    if total_weight == 0 {
        return Err(ConvertError::invalid(what, "weighted clusters with a total weight of 0"));
    }
    // Envoy: an unset timeout is 15 s; 0 disables it.
    let timeout = match &a.timeout {
        None => Some(Duration::from_secs(15)),
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    };
    if a.idle_timeout.is_some() || a.max_stream_duration.is_some() || !a.rate_limits.is_empty() || a.cors.is_some() {
        return Err(ConvertError::unsupported(what, "idle_timeout / max_stream_duration / rate_limits / cors"));
    }
    let mut hash_policy = Vec::new();
    for h in &a.hash_policy {
        hash_policy.push(match &h.policy_specifier {
            Some(hash_policy::PolicySpecifier::Header(hh)) => HashPolicy::Header(
                HeaderName::from_bytes(hh.header_name.as_bytes())
                    .map_err(|_| ConvertError::invalid(what, "hash policy header name"))?,
            ),
            Some(hash_policy::PolicySpecifier::Cookie(c)) => {
                if c.ttl.is_some() {
                    return Err(ConvertError::unsupported(
                        what,
                        "hash policy cookie with a ttl (generated cookies; issue #4 follow-up)",
                    ));
                }
                HashPolicy::Cookie(c.name.clone())
            }
            Some(hash_policy::PolicySpecifier::ConnectionProperties(p)) if p.source_ip => HashPolicy::SourceIp,
            Some(hash_policy::PolicySpecifier::QueryParameter(q)) => HashPolicy::Query(q.name.clone()),
            other => return Err(ConvertError::unsupported(what, format!("hash policy {other:?}"))),
        });
    }
    let regex_rewrite = match &a.regex_rewrite {
        Some(rr) => {
            let pattern =
                rr.pattern.as_ref().ok_or_else(|| ConvertError::invalid(what, "regex_rewrite without pattern"))?;
            // Substitution groups: Envoy writes \1, Rust's regex ${1}.
            let sub = Regex::new(r"\\(\d)").map_err(|e| ConvertError::invalid(what, e.to_string()))?;
            let substitution = sub.replace_all(&rr.substitution, "$${$1}").into_owned();
            Some((
                regex::Regex::new(&pattern.regex)
                    .map_err(|e| ConvertError::invalid(what, format!("regex_rewrite {:?}: {e}", pattern.regex)))?,
                substitution,
            ))
        }
        None => None,
    };
    let host_rewrite = match &a.host_rewrite_specifier {
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
        None => None,
        Some(other) => return Err(ConvertError::unsupported(what, format!("host rewrite {other:?}"))),
    };
    Ok(Forward {
        clusters,
        total_weight,
        timeout,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        hash_policy,
        per_try_timeout: a
            .retry_policy
            .as_ref()
            .and_then(|p| p.per_try_timeout.as_ref())
            .map(duration)
            .filter(|d| !d.is_zero()),
    })
}

fn redirect(r: &pb::RedirectAction, what: &str) -> Result<Redirect, ConvertError> {
    use redirect_action::RedirectResponseCode as C;
    let code = match C::try_from(r.response_code).unwrap_or(C::MovedPermanently) {
        C::MovedPermanently => 301,
        C::Found => 302,
        C::SeeOther => 303,
        C::TemporaryRedirect => 307,
        C::PermanentRedirect => 308,
    };
    let (path, prefix_rewrite) = match &r.path_rewrite_specifier {
        Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
        Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(p)) => (None, Some(p.clone())),
        None => (None, None),
        Some(other) => return Err(ConvertError::unsupported(what, format!("redirect {other:?}"))),
    };
    let scheme = match &r.scheme_rewrite_specifier {
        Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
        Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
        _ => None,
    };
    Ok(Redirect {
        scheme,
        host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port: (r.port_redirect != 0).then_some(r.port_redirect),
        path,
        prefix_rewrite,
        code,
        strip_query: r.strip_query,
    })
}

// === matching ===

impl StrMatch {
    fn matches(&self, v: &str, ignore_case: bool) -> bool {
        if ignore_case {
            let v = v.to_ascii_lowercase();
            return match self {
                StrMatch::Exact(s) => v == s.to_ascii_lowercase(),
                StrMatch::Prefix(s) => v.starts_with(&s.to_ascii_lowercase()),
                StrMatch::Suffix(s) => v.ends_with(&s.to_ascii_lowercase()),
                StrMatch::Contains(s) => v.contains(&s.to_ascii_lowercase()),
                StrMatch::Regex(r) => r.is_match(&v),
            };
        }
        match self {
            StrMatch::Exact(s) => v == s,
            StrMatch::Prefix(s) => v.starts_with(s.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Contains(s) => v.contains(s.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// What a request offers to matching.
#[derive(Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub authority: &'a str,
    pub scheme: &'a str,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Domain {
    fn matches(&self, host: &str) -> bool {
        match self {
            Domain::Exact(d) => d == host,
            Domain::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            Domain::Prefix(p) => host.len() > p.len() && host.starts_with(p.as_str()),
            Domain::Any => true,
        }
    }
}

impl RouteTable {
    /// Envoy's virtual host selection: exact domains first, then the longest suffix
    /// wildcard, then the longest prefix wildcard, then `*`.
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let host = authority.to_ascii_lowercase();
        let exact = self
            .virtual_hosts
            .iter()
            .find(|v| v.domains.iter().any(|d| matches!(d, Domain::Exact(_)) && d.matches(&host)));
        if exact.is_some() {
            return exact;
        }
        let best = |pick: fn(&Domain) -> Option<usize>| {
            self.virtual_hosts
                .iter()
                .filter_map(|v| v.domains.iter().filter(|d| d.matches(&host)).filter_map(pick).max().map(|l| (l, v)))
                .max_by_key(|(l, _)| *l)
                .map(|(_, v)| v)
        };
        best(|d| if let Domain::Suffix(s) = d { Some(s.len()) } else { None })
            .or_else(|| best(|d| if let Domain::Prefix(p) = d { Some(p.len()) } else { None }))
            .or_else(|| self.virtual_hosts.iter().find(|v| v.domains.contains(&Domain::Any)))
    }
}

impl VirtualHost {
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

impl RouteMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => {
                if self.case_sensitive {
                    req.path.starts_with(p.as_str())
                } else {
                    req.path.to_ascii_lowercase().starts_with(&p.to_ascii_lowercase())
                }
            }
            PathMatch::Exact(p) => {
                if self.case_sensitive {
                    req.path == p
                } else {
                    req.path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(r) => r.is_match(req.path),
        };
        if !path_ok {
            return false;
        }
        let headers_ok = self.headers.iter().all(|h| {
            let value: Option<std::borrow::Cow<'_, str>> = match h.name.as_str() {
                ":method" => Some(req.method.as_str().into()),
                ":authority" => Some(req.authority.into()),
                ":scheme" => Some(req.scheme.into()),
                ":path" => Some(req.path.into()),
                name => {
                    let all: Vec<&str> = req.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
                    (!all.is_empty()).then(|| all.join(",").into())
                }
            };
            let hit = match (&h.value, value) {
                (None, v) => v.is_some(),
                (Some(_), None) => false,
                (Some((m, ic)), Some(v)) => m.matches(&v, *ic),
            };
            hit != h.invert
        });
        headers_ok
            && self.query.iter().all(|q| match (&q.value, query_value(req.query, &q.name)) {
                (None, v) => v.is_some(),
                (Some(_), None) => false,
                (Some((m, ic)), Some(v)) => m.matches(v, *ic),
            })
    }
}

#[cfg(test)]
mod tests;
