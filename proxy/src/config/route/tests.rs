use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration};
use http::{HeaderMap, HeaderValue, Method};

use super::*;

fn route_to(cluster: &str, m: pb::RouteMatch) -> pb::Route {
    pb::Route {
        name: cluster.into(),
        r#match: Some(m),
        action: Some(pb::route::Action::Route(pb::RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            timeout: Some(PbDuration { seconds: 0, nanos: 0 }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn prefix(p: &str) -> pb::RouteMatch {
    pb::RouteMatch { path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())), ..Default::default() }
}

fn table(vhosts: Vec<(&str, Vec<&str>, Vec<pb::Route>)>) -> RouteTable {
    convert(&pb::RouteConfiguration {
        name: "t".into(),
        virtual_hosts: vhosts
            .into_iter()
            .map(|(n, d, r)| pb::VirtualHost {
                name: n.into(),
                domains: d.into_iter().map(String::from).collect(),
                routes: r,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .unwrap()
}

fn view<'a>(
    m: &'a Method,
    authority: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    h: &'a HeaderMap,
) -> RequestView<'a> {
    RequestView { method: m, authority, scheme: "http", path, query, headers: h }
}

fn cluster_of(r: &Route) -> &str {
    match &r.action {
        Action::Forward(f) => &f.clusters[0].name,
        _ => "",
    }
}

#[test]
fn virtual_hosts_are_chosen_exact_then_longest_wildcard_then_any() {
    let t = table(vec![
        ("any", vec!["*"], vec![route_to("any", prefix("/"))]),
        ("suffix", vec!["*.example.com"], vec![route_to("suffix", prefix("/"))]),
        ("longer", vec!["*.api.example.com"], vec![route_to("longer", prefix("/"))]),
        ("exact", vec!["reviews:9080", "Reviews"], vec![route_to("exact", prefix("/"))]),
    ]);
    assert_eq!(t.virtual_host("reviews:9080").unwrap().name, "exact");
    assert_eq!(t.virtual_host("REVIEWS").unwrap().name, "exact");
    assert_eq!(t.virtual_host("v1.api.example.com").unwrap().name, "longer");
    assert_eq!(t.virtual_host("www.example.com").unwrap().name, "suffix");
    assert_eq!(t.virtual_host("other").unwrap().name, "any");
}

#[test]
fn routes_match_in_order_on_path_headers_method_and_query() {
    let sm = |p: string_matcher::MatchPattern| StringMatcher { match_pattern: Some(p), ignore_case: false };
    let jason = pb::RouteMatch {
        headers: vec![pb::HeaderMatcher {
            name: "end-user".into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm(
                string_matcher::MatchPattern::Exact("jason".into()),
            ))),
            ..Default::default()
        }],
        ..prefix("/")
    };
    let post_regex = pb::RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: "/items/[0-9]+".into(),
            ..Default::default()
        })),
        headers: vec![pb::HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm(
                string_matcher::MatchPattern::Exact("POST".into()),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let query = pb::RouteMatch {
        query_parameters: vec![pb::QueryParameterMatcher {
            name: "debug".into(),
            query_parameter_match_specifier: Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(
                true,
            )),
        }],
        ..prefix("/")
    };
    let exact_ci = pb::RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Path("/Login".into())),
        case_sensitive: Some(BoolValue { value: false }),
        ..Default::default()
    };
    let t = table(vec![(
        "v",
        vec!["*"],
        vec![
            route_to("v2", jason),
            route_to("items", post_regex),
            route_to("debug", query),
            route_to("login", exact_ci),
            route_to("v1", prefix("/")),
        ],
    )]);
    let vh = t.virtual_host("x").unwrap();
    let (get, post) = (Method::GET, Method::POST);
    let mut h = HeaderMap::new();
    assert_eq!(cluster_of(vh.route(&view(&get, "x", "/", None, &h)).unwrap()), "v1");
    h.insert("end-user", HeaderValue::from_static("jason"));
    assert_eq!(cluster_of(vh.route(&view(&get, "x", "/", None, &h)).unwrap()), "v2");
    let none = HeaderMap::new();
    assert_eq!(cluster_of(vh.route(&view(&post, "x", "/items/42", None, &none)).unwrap()), "items");
    // The regex matches the whole path, as RE2 full matches in Envoy.
    assert_eq!(cluster_of(vh.route(&view(&post, "x", "/items/42/x", None, &none)).unwrap()), "v1");
    assert_eq!(cluster_of(vh.route(&view(&get, "x", "/items/42", None, &none)).unwrap()), "v1");
    assert_eq!(cluster_of(vh.route(&view(&get, "x", "/a", Some("x=1&debug"), &none)).unwrap()), "debug");
    assert_eq!(cluster_of(vh.route(&view(&get, "x", "/LOGIN", None, &none)).unwrap()), "login");
}

fn try_table(routes: Vec<pb::Route>) -> Result<RouteTable, String> {
    convert(&pb::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![pb::VirtualHost {
            name: "v".into(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    })
    .map_err(|e| e.to_string())
}

fn with_retry(p: pb::RetryPolicy) -> pb::Route {
    let mut r = route_to("c", prefix("/"));
    if let Some(pb::route::Action::Route(a)) = &mut r.action {
        a.retry_policy = Some(p);
    }
    r
}

#[test]
fn fault_config_becomes_the_fault_modules_route_config() {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault, fault_abort};
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
    let fault = HttpFault {
        delay: Some(FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(PbDuration {
                seconds: 0,
                nanos: 500_000_000,
            })),
            percentage: Some(FractionalPercent { numerator: 100_000, denominator: DenominatorType::Million as i32 }),
        }),
        abort: Some(FaultAbort { error_type: Some(fault_abort::ErrorType::HttpStatus(418)), ..Default::default() }),
        ..Default::default()
    };
    let mut r = route_to("c", prefix("/"));
    r.typed_per_filter_config.insert("envoy.filters.http.fault".into(), envoy_types::util::pack_any(fault));
    let t = try_table(vec![r.clone()]).unwrap();
    assert_eq!(
        t.virtual_hosts[0].routes[0].builtins.fault,
        Some(
            serde_json::json!({"delay": {"fixedDelayMs": 500, "percentage": 10.0}, "abort": {"httpStatus": 418, "percentage": 100.0}})
        )
    );
    // What the module cannot do is refused, naming the field.
    let header_delay = HttpFault {
        delay: Some(FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::HeaderDelay(Default::default())),
            ..Default::default()
        }),
        ..Default::default()
    };
    r.typed_per_filter_config.insert("envoy.filters.http.fault".into(), envoy_types::util::pack_any(header_delay));
    let err = try_table(vec![r]).unwrap_err();
    assert!(err.contains("route configuration outbound") && err.contains("delay.header_delay"), "{err}");
    let mut other = route_to("c", prefix("/"));
    other.typed_per_filter_config.insert("envoy.filters.http.cors".into(), Default::default());
    assert!(try_table(vec![other]).unwrap_err().contains("per-route config of envoy.filters.http.cors"));
}

#[test]
fn retry_policy_becomes_the_retry_modules_route_config_and_a_per_try_timeout() {
    let p = pb::RetryPolicy {
        retry_on: "5xx,retriable-status-codes".into(),
        num_retries: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 3 }),
        retriable_status_codes: vec![429],
        per_try_timeout: Some(PbDuration { seconds: 2, nanos: 0 }),
        retry_back_off: Some(pb::retry_policy::RetryBackOff {
            base_interval: Some(PbDuration { seconds: 0, nanos: 10_000_000 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = try_table(vec![with_retry(p.clone())]).unwrap();
    let r = &t.virtual_hosts[0].routes[0];
    assert_eq!(
        r.builtins.retry,
        Some(
            serde_json::json!({"attempts": 3, "retryOn": ["5xx", "retriable-status-codes"], "retriableStatusCodes": [429], "retriableHeaders": [], "backoffBaseMs": 10})
        )
    );
    let Action::Forward(f) = &r.action else { panic!() };
    assert_eq!(f.per_try_timeout, Some(Duration::from_secs(2)));
    // Zero attempts: no retry config at all.
    let zero =
        pb::RetryPolicy { num_retries: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 0 }), ..p.clone() };
    assert_eq!(try_table(vec![with_retry(zero)]).unwrap().virtual_hosts[0].routes[0].builtins.retry, None);
    let unknown = pb::RetryPolicy { retry_on: "5xx,envoy-ratelimited".into(), ..p.clone() };
    assert!(try_table(vec![with_retry(unknown)]).unwrap_err().contains("retry_on \"envoy-ratelimited\""));
    let predicate = pb::RetryPolicy {
        retry_host_predicate: vec![pb::retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.omit_canary_hosts".into(),
            config_type: None,
        }],
        ..p
    };
    assert!(try_table(vec![with_retry(predicate)]).unwrap_err().contains("omit_canary_hosts"));
}

#[test]
fn mirror_policies_become_the_mirror_modules_route_config() {
    use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
    let mut r = route_to("c", prefix("/"));
    if let Some(pb::route::Action::Route(a)) = &mut r.action {
        a.request_mirror_policies = vec![pb::route_action::RequestMirrorPolicy {
            cluster: "shadow".into(),
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: Some(FractionalPercent {
                    numerator: 2500,
                    denominator: DenominatorType::TenThousand as i32,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }];
    }
    let t = try_table(vec![r.clone()]).unwrap();
    assert_eq!(
        t.virtual_hosts[0].routes[0].builtins.mirror,
        vec![serde_json::json!({"cluster": "shadow", "percentage": 25.0})]
    );
    if let Some(pb::route::Action::Route(a)) = &mut r.action {
        a.request_mirror_policies[0].disable_shadow_host_suffix_append = true;
    }
    assert!(try_table(vec![r]).unwrap_err().contains("disable_shadow_host_suffix_append"));
}

#[test]
fn repeated_route_names_are_made_unique_for_the_filters() {
    let t =
        try_table(vec![route_to("a", prefix("/x")), route_to("a", prefix("/y")), route_to("b", prefix("/"))]).unwrap();
    let names: Vec<&str> = t.virtual_hosts[0].routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a", "a~2", "b"]);
}

#[test]
fn an_unset_timeout_is_envoys_15_seconds_and_zero_disables_it() {
    let mut r = route_to("c", prefix("/"));
    if let Some(pb::route::Action::Route(a)) = &mut r.action {
        a.timeout = None;
    }
    let t = table(vec![("v", vec!["*"], vec![r, route_to("d", prefix("/"))])]);
    let timeouts: Vec<Option<Duration>> = t.virtual_hosts[0]
        .routes
        .iter()
        .map(|r| match &r.action {
            Action::Forward(f) => f.timeout,
            _ => None,
        })
        .collect();
    assert_eq!(timeouts, vec![Some(Duration::from_secs(15)), None]);
}
