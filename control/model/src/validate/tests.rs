use serde_json::json;

use super::*;

fn res(kind: &str, api: &str, spec: Value) -> Resource {
    serde_json::from_value(json!({
        "apiVersion": api, "kind": kind,
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": spec,
    }))
    .unwrap()
}

fn vs(spec: Value) -> Resource {
    res("VirtualService", "networking.istio.io/v1", spec)
}

fn errors(r: &Resource) -> Vec<String> {
    match validate_resource(r, "default") {
        Ok(_) => Vec::new(),
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn assert_error(r: &Resource, path: &str, needle: &str) {
    let errs = errors(r);
    assert!(
        errs.iter().any(|e| e.starts_with(&format!("{path}: ")) && e.contains(needle)),
        "expected an error at {path} containing {needle:?}, got {errs:?}"
    );
}

#[test]
fn canary_virtual_service_is_valid() {
    let r = vs(json!({"hosts": ["reviews"], "http": [{"route": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10}]}]}));
    assert_eq!(errors(&r), Vec::<String>::new());
}

#[test]
fn weights_must_sum_to_100() {
    let r = vs(json!({"hosts": ["reviews"], "http": [{"route": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": 15}]}]}));
    assert_error(&r, "spec.http[0].route", "sum to 95");
}

#[test]
fn unknown_spec_fields_are_rejected_with_their_path() {
    let r =
        res("DestinationRule", "networking.istio.io/v1", json!({"host": "x", "trafficPolicy": {"conectionPool": {}}}));
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("spec.trafficPolicy.conectionPool: unknown field `conectionPool`"), "{errs:?}");
}

#[test]
fn wrong_types_and_enum_values_are_rejected() {
    let r = vs(json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}, "weight": "ninety"}]}]}));
    assert_error(&r, "spec.http[0].route[0].weight", "invalid type");
    let r = res("PeerAuthentication", "security.istio.io/v1", json!({"mtls": {"mode": "STRICTEST"}}));
    assert_error(&r, "spec.mtls.mode", "unknown variant `STRICTEST`");
}

#[test]
fn unsupported_istio_fields_are_refused_by_name() {
    let r = vs(
        json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}], "corsPolicy": {"allowOrigins": []}}]}),
    );
    assert_error(&r, "spec.http[0].corsPolicy", "not supported by Trellis");
    let r =
        res("AuthorizationPolicy", "security.istio.io/v1", json!({"action": "CUSTOM", "provider": {"name": "ext"}}));
    assert_error(&r, "spec.provider", "not supported");
}

#[test]
fn durations_ranges_and_regexes_are_checked() {
    let r = vs(json!({"hosts": ["a"], "http": [{
        "match": [{"uri": {"regex": "(unclosed"}}, {"headers": {"End-User": {"exact": "jason"}}}],
        "route": [{"destination": {"host": "a"}}],
        "timeout": "ten seconds",
        "retries": {"attempts": -1, "retryOn": "5xx,sometimes"},
        "fault": {"abort": {"httpStatus": 700}, "delay": {"percentage": {"value": 150}}},
        "mirrorPercentage": {"value": 10}}]}));
    assert_error(&r, "spec.http[0].match[0].uri.regex", "invalid regular expression");
    assert_error(&r, "spec.http[0].match[1].headers[End-User]", "lower-case");
    assert_error(&r, "spec.http[0].timeout", "expected a number");
    assert_error(&r, "spec.http[0].retries.attempts", "negative");
    assert_error(&r, "spec.http[0].retries.retryOn", "\"sometimes\"");
    assert_error(&r, "spec.http[0].fault.abort.httpStatus", "200-599");
    assert_error(&r, "spec.http[0].fault.delay.fixedDelay", "required");
    assert_error(&r, "spec.http[0].fault.delay.percentage.value", "0-100");
    assert_error(&r, "spec.http[0].mirrorPercentage", "needs mirror");
}

#[test]
fn hosts_ports_and_names_are_checked() {
    let r = res(
        "ServiceEntry",
        "networking.istio.io/v1",
        json!({
        "hosts": ["bad_host!"], "ports": [{"number": 70000, "name": "http", "protocol": "HTTP"}, {"number": 80, "name": "http", "protocol": "SCTP"}],
        "resolution": "STATIC", "endpoints": [{"address": "example.com", "ports": {"grpc": 90}}]}),
    );
    assert_error(&r, "spec.hosts[0]", "not a valid host");
    assert_error(&r, "spec.ports[0].number", "out of range");
    assert_error(&r, "spec.ports[1].name", "duplicate port name");
    assert_error(&r, "spec.ports[1].protocol", "unknown protocol");
    assert_error(&r, "spec.endpoints[0].address", "STATIC resolution needs IP addresses");
    assert_error(&r, "spec.endpoints[0].ports[grpc]", "not the name of a port");
    let mut bad_name = vs(json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}]}]}));
    bad_name.metadata.name = "Bad_Name".into();
    assert_error(&bad_name, "metadata.name", "not a valid name");
}

#[test]
fn authorization_principals_and_conditions_are_checked() {
    let r = res(
        "AuthorizationPolicy",
        "security.istio.io/v1",
        json!({"rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/*/sa/x", "spiffe://cluster.local/ns/a/sa/b"]}}, {}],
        "to": [{"operation": {"ports": ["http"], "paths": ["reviews"]}}],
        "when": [{"key": "request.colour", "values": ["red"]}]}]}),
    );
    assert_error(&r, "spec.rules[0].from[0].source.principals[0]", "only allowed as a prefix or suffix");
    assert_error(&r, "spec.rules[0].from[0].source.principals[1]", "without \"spiffe://\"");
    assert_error(&r, "spec.rules[0].from[1].source", "required");
    assert_error(&r, "spec.rules[0].to[0].operation.ports[0]", "not a port number");
    assert_error(&r, "spec.rules[0].to[0].operation.paths[0]", "start with '/'");
    assert_error(&r, "spec.rules[0].when[0].key", "unknown condition key");
}

#[test]
fn deny_all_with_empty_spec_is_valid() {
    let r = res("AuthorizationPolicy", "security.istio.io/v1", json!({}));
    assert_eq!(errors(&r), Vec::<String>::new());
}

#[test]
fn mesh_cluster_is_cluster_scoped() {
    let mut r = res(
        "MeshCluster",
        "trellis.dev/v1alpha1",
        json!({"network": "net-1", "eastWestGateway": {"address": "127.0.0.10", "port": 15443}}),
    );
    assert_error(&r, "metadata.namespace", "cluster-scoped");
    r.metadata.namespace = None;
    let (key, _) = validate_resource(&r, "default").unwrap();
    assert_eq!(key.namespace, "");
    r.spec = json!({"network": ""});
    assert_error(&r, "spec.network", "required");
}

#[test]
fn old_api_versions_are_accepted_and_unknown_ones_are_not() {
    let mut r = vs(json!({"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}]}]}));
    r.api_version = "networking.istio.io/v1alpha3".into();
    assert!(errors(&r).is_empty());
    r.api_version = "networking.istio.io/v9".into();
    assert_error(&r, "apiVersion", "not \"networking.istio.io/v9\"");
}

#[test]
fn recent_istio_fields_are_accepted_or_refused_by_name() {
    let r = res(
        "AuthorizationPolicy",
        "security.istio.io/v1",
        json!({"rules": [{"from": [{"source": {"trustDomains": ["cluster.local"], "serviceAccounts": ["bookinfo/reviews"]}}]}]}),
    );
    assert_eq!(errors(&r), Vec::<String>::new());
    let r = res(
        "DestinationRule",
        "networking.istio.io/v1",
        json!({"host": "a", "trafficPolicy": {
        "loadBalancer": {"consistentHash": {"httpCookie": {"name": "c", "ttl": "0s", "attributes": [{"name": "SameSite", "value": "Strict"}]}}}}}),
    );
    assert_eq!(errors(&r), Vec::<String>::new());
    let r = res(
        "DestinationRule",
        "networking.istio.io/v1",
        json!({"host": "a", "trafficPolicy": {"retryBudget": {"percent": 20}}}),
    );
    assert_error(&r, "spec.trafficPolicy.retryBudget", "not supported by Trellis");
    let r = res(
        "ServiceEntry",
        "networking.istio.io/v1",
        json!({"hosts": ["*.example.com"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}], "resolution": "DYNAMIC_DNS"}),
    );
    assert_error(&r, "spec.resolution", "DYNAMIC_DNS");
    let r = vs(json!({"hosts": ["a"], "http": [{"redirect": {"prefixRewrite": "/new", "uri": "/x"}}]}));
    assert_error(&r, "spec.http[0].redirect.prefixRewrite", "mutually exclusive");
    let r = vs(
        json!({"hosts": ["a"], "http": [{"match": [{"uri": {"exact": "/a", "prefix": "/b"}}, {"headers": {"x-present": {}}}], "route": [{"destination": {"host": "a"}}]}]}),
    );
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "an empty header match means presence: {errs:?}");
    assert!(errs[0].starts_with("spec.http[0].match[0].uri: only one of"), "{errs:?}");
}

#[test]
fn tls_and_tcp_matches_and_direct_response_bodies_are_checked() {
    let r = vs(
        json!({"hosts": ["a"], "tcp": [{"match": [{"sourceNamespace": "Bad_NS", "sourceLabels": {"app": "x*"}}], "route": [{"destination": {"host": "a"}}]}],
        "http": [{"directResponse": {"status": 200, "body": {"bytes": "not base64!"}}}]}),
    );
    assert_error(&r, "spec.tcp[0].match[0].sourceNamespace", "not a namespace");
    assert_error(&r, "spec.tcp[0].match[0].sourceLabels[app]", "wildcards");
    assert_error(&r, "spec.http[0].directResponse.body.bytes", "base64");
    let ok = vs(json!({"hosts": ["a"], "http": [{"directResponse": {"status": 503, "body": {"bytes": "aGVsbG8="}}}]}));
    assert_eq!(errors(&ok), Vec::<String>::new());
}

#[test]
fn every_bad_field_is_reported_not_just_the_first() {
    let r = res(
        "DestinationRule",
        "networking.istio.io/v1",
        json!({"host": "x", "trafficPolicy": {
        "conectionPool": {}, "tunnel": {"protocol": "CONNECT"},
        "loadBalancer": {"simple": "FASTEST"}},
        "subsets": [{"name": "v1", "lables": {"version": "v1"}}]}),
    );
    let errs = errors(&r);
    assert_eq!(errs.len(), 4, "{errs:#?}");
    for (path, needle) in [
        ("spec.trafficPolicy.conectionPool", "unknown field"),
        ("spec.trafficPolicy.tunnel", "not supported by Trellis"),
        ("spec.trafficPolicy.loadBalancer.simple", "unknown variant `FASTEST`"),
        ("spec.subsets[0].lables", "unknown field"),
    ] {
        assert_error(&r, path, needle);
    }
}

#[test]
fn yaml_booleans_get_a_hint() {
    let (docs, _) = crate::parse_documents(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec:\n  hosts: [no]\n  http: [{route: [{destination: {host: a}}]}]\n",
        "f.yaml",
    );
    let errs = errors(&docs[0].resource);
    assert!(errs[0].contains("quote the value"), "{errs:?}");
}
