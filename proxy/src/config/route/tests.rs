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

#[test]
fn fault_config_on_a_route_is_refused_until_the_fault_module_exists() {
    let mut r = route_to("c", prefix("/"));
    r.typed_per_filter_config.insert("envoy.filters.http.fault".into(), Default::default());
    let err = convert(&pb::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![pb::VirtualHost {
            name: "v".into(),
            domains: vec!["*".into()],
            routes: vec![r],
            ..Default::default()
        }],
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("route configuration outbound") && err.contains("envoy.filters.http.fault"), "{err}");
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
