//! Cross-resource analysis finds what no single resource shows.

use trellis_model::analyze::{Analyzed, Severity, analyze};
use trellis_model::{parse_documents, validate_resource};

fn load(yaml: &str) -> Vec<Analyzed> {
    let (docs, errors) = parse_documents(yaml, "test.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    docs.into_iter()
        .map(|d| {
            let (key, spec) = validate_resource(&d.resource, "default").unwrap_or_else(|e| panic!("{e}"));
            Analyzed { key, spec, origin: Some(d.origin()) }
        })
        .collect()
}

fn codes(items: &[Analyzed]) -> Vec<(Severity, &'static str, String)> {
    analyze(items).into_iter().map(|d| (d.severity, d.code, d.path)).collect()
}

const SERVICE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews.bookinfo.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {address: 127.0.0.2, labels: {app: reviews, version: v1}}
"#;

#[test]
fn a_route_to_an_undefined_subset_is_an_error() {
    let yaml = format!(
        "{SERVICE}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: v3}}\n"
    );
    let found = codes(&load(&yaml));
    assert_eq!(found, vec![(Severity::Error, "TRL0102", "spec.http[0].route[0].destination.subset".to_string())]);
}

#[test]
fn unknown_hosts_and_subsets_without_endpoints_are_warnings() {
    let yaml = format!(
        "{SERVICE}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  host: reviews\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v9, labels: {{version: v9}}}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ghost, namespace: bookinfo}}\nspec:\n  hosts: [ghost]\n  http:\n  - route:\n    - destination: {{host: ghost}}\n"
    );
    let found = codes(&load(&yaml));
    assert!(found.contains(&(Severity::Warning, "TRL0105", "spec.subsets[1].labels".into())), "{found:?}");
    assert!(!found.contains(&(Severity::Warning, "TRL0105", "spec.subsets[0].labels".into())), "{found:?}");
    assert!(
        found.contains(&(Severity::Warning, "TRL0101", "spec.http[0].route[0].destination.host".into())),
        "{found:?}"
    );
}

#[test]
fn duplicate_names_and_missing_gateways_are_errors() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: ns}\nspec:\n  hosts: [a.example.com]\n  gateways: [missing-gw]\n  http:\n  - route:\n    - destination: {host: a.example.com}\n";
    let found = codes(&load(&format!("{vs}---\n{vs}")));
    assert!(found.contains(&(Severity::Error, "TRL0001", "metadata.name".into())), "{found:?}");
    assert!(found.contains(&(Severity::Error, "TRL0103", "spec.gateways[0]".into())), "{found:?}");
}

#[test]
fn conflicting_peer_authentications_are_reported() {
    let pa = |name: &str, mode: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: istio-system}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
        )
    };
    let found = codes(&load(&format!("{}---\n{}", pa("a", "STRICT"), pa("b", "PERMISSIVE"))));
    assert_eq!(found.iter().filter(|f| f.1 == "TRL0201").count(), 2, "{found:?}");
    let single = codes(&load(&pa("a", "STRICT")));
    assert!(single.is_empty(), "{single:?}");
}

#[test]
fn authorization_policies_that_can_never_match_are_reported() {
    let yaml = format!(
        "{SERVICE}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: nobody, namespace: bookinfo}}\nspec:\n  selector: {{matchLabels: {{app: ratings}}}}\n  rules:\n  - to:\n    - operation: {{methods: [GET], notMethods: [GET]}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: fine, namespace: bookinfo}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  rules:\n  - to:\n    - operation: {{methods: [GET]}}\n"
    );
    let found = analyze(&load(&yaml));
    let for_nobody: Vec<_> = found.iter().filter(|d| d.resource.name == "nobody").map(|d| d.code).collect();
    assert_eq!(for_nobody, vec!["TRL0302", "TRL0301"], "{found:?}");
    assert!(found.iter().all(|d| d.resource.name != "fine"), "{found:?}");
}

#[test]
fn a_tcp_port_listener_naming_several_hosts_is_a_warning() {
    let se = |name: &str, protocol: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: data}}\nspec:\n  hosts: [{name}.data.svc.cluster.local]\n  ports: [{{number: 5432, name: p, protocol: {protocol}}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1}}]\n"
        )
    };
    let sidecar = |protocol: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: data}}\nspec:\n  egress:\n  - hosts: [\"./*\"]\n  - port: {{number: 5432, protocol: {protocol}, name: p}}\n    hosts: [\"./*\"]\n"
        )
    };
    let two_tcp = format!("{}{}{}", se("pg", "TCP"), se("pg-replica", "TCP"), sidecar("TCP"));
    assert_eq!(codes(&load(&two_tcp)), vec![(Severity::Warning, "TRL0107", "spec.egress[1].hosts".to_string())]);
    let message = analyze(&load(&two_tcp)).remove(0).message;
    assert!(message.contains("only pg-replica.data.svc.cluster.local is reachable"), "{message}");
    // HTTP is routed by Host, TLS by SNI: several hosts are fine; one TCP host is fine.
    let http = format!("{}{}{}", se("a", "HTTP"), se("b", "HTTP"), sidecar("HTTP"));
    assert!(codes(&load(&http)).is_empty());
    let one = format!("{}{}", se("pg", "TCP"), sidecar("TCP"));
    assert!(codes(&load(&one)).is_empty());
}
