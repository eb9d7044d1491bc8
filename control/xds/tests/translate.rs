//! Translation of the example configuration, checked three ways: targeted assertions on the
//! resources, a golden summary (tests/golden/*.txt; regenerate with UPDATE_GOLDEN=1), and a
//! real Envoy 1.40 accepting the output (`envoy --mode validate`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::{DynamicResources, StaticResources};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::core::v3::api_config_source::ApiType;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType as TsConfig;
use envoy_types::pb::envoy::config::core::v3::{ApiConfigSource, ApiVersion, ConfigSource, GrpcService, grpc_service};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::{Route, RouteConfiguration};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as TcpClusterSpecifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, SdsSecretConfig, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use prost::Message;
use trellis_model::registry;
use trellis_model::{parse_documents, validate_resource};
use trellis_xds::proxy::ProxyInfo;
use trellis_xds::{ConfigSnapshot, Translated, translate};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn examples() -> ConfigSnapshot {
    let mut items = Vec::new();
    let mut files = Vec::new();
    let mut dirs = vec![root().join("examples")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        let (docs, errors) = parse_documents(&std::fs::read_to_string(&f).unwrap(), "x");
        assert!(errors.is_empty());
        for d in docs {
            items.push(validate_resource(&d.resource, "default").unwrap());
        }
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    ConfigSnapshot { items, ..Default::default() }
}

fn productpage() -> ProxyInfo {
    ProxyInfo {
        id: "sidecar~127.0.0.2~productpage-v1.bookinfo~bookinfo.svc.cluster.local".into(),
        namespace: "bookinfo".into(),
        workload_name: "productpage-v1".into(),
        ips: vec!["127.0.0.2".into()],
        labels: [("app".to_string(), "productpage".to_string())].into(),
        ..Default::default()
    }
}

fn translated() -> Translated {
    let cfg = examples();
    let reg = registry::build(&cfg.items, &[], "Kubernetes");
    translate(&cfg, &reg, &productpage())
}

fn vhost_routes<'a>(routes: &'a RouteConfiguration, name: &str) -> &'a [Route] {
    &routes.virtual_hosts.iter().find(|v| v.name == name).unwrap_or_else(|| panic!("no virtual host {name}")).routes
}

fn action(r: &Route) -> &envoy_types::pb::envoy::config::route::v3::RouteAction {
    match r.action.as_ref().unwrap() {
        Action::Route(a) => a,
        other => panic!("not a route action: {other:?}"),
    }
}

#[test]
fn canary_weights_become_weighted_subset_clusters() {
    let t = translated();
    let routes = &t.routes["outbound"];
    let r = &vhost_routes(routes, "reviews.bookinfo.svc.cluster.local:9080")[0];
    let Some(ClusterSpecifier::WeightedClusters(wc)) = &action(r).cluster_specifier else { panic!("{r:?}") };
    let got: Vec<(&str, u32)> =
        wc.clusters.iter().map(|c| (c.name.as_str(), c.weight.as_ref().unwrap().value)).collect();
    assert_eq!(
        got,
        vec![
            ("outbound|9080|v1|reviews.bookinfo.svc.cluster.local", 90),
            ("outbound|9080|v2|reviews.bookinfo.svc.cluster.local", 10)
        ]
    );
    // Subset clusters exist with only their endpoints.
    for (subset, ip) in [("v1", "127.0.0.4"), ("v2", "127.0.0.5"), ("v3", "127.0.0.6")] {
        let cla = &t.endpoints[&format!("outbound|9080|{subset}|reviews.bookinfo.svc.cluster.local")];
        let ips: Vec<String> = cla
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => format!("{:?}", ep.address),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ips.len(), 1, "{subset}: {ips:?}");
        assert!(ips[0].contains(ip), "{subset}: {ips:?} should be {ip}");
    }
    let all = &t.endpoints["outbound|9080||reviews.bookinfo.svc.cluster.local"];
    assert_eq!(all.endpoints.iter().map(|l| l.lb_endpoints.len()).sum::<usize>(), 3);
    // Clients in the namespace can use short names.
    let vh = routes.virtual_hosts.iter().find(|v| v.name == "reviews.bookinfo.svc.cluster.local:9080").unwrap();
    assert!(vh.domains.contains(&"reviews:9080".to_string()), "{:?}", vh.domains);
}

#[test]
fn fault_retry_timeout_and_mirror_are_standard_envoy_config() {
    let t = translated();
    let routes = &t.routes["outbound"];
    let ratings = vhost_routes(routes, "ratings.bookinfo.svc.cluster.local:9080");
    let fault =
        HttpFault::decode(ratings[0].typed_per_filter_config["envoy.filters.http.fault"].value.as_slice()).unwrap();
    assert_eq!(fault.abort.unwrap().percentage.unwrap().numerator, 100_000, "10% in parts per million");
    assert!(fault.delay.is_some());
    assert_eq!(ratings[0].r#match.as_ref().unwrap().headers[0].name, "end-user");
    assert!(ratings[1].typed_per_filter_config.is_empty(), "the default route has no fault");

    let details = &vhost_routes(routes, "details.bookinfo.svc.cluster.local:9080")[0];
    let a = action(details);
    assert_eq!(a.timeout.as_ref().unwrap().seconds, 10);
    let rp = a.retry_policy.as_ref().unwrap();
    assert_eq!(rp.num_retries.as_ref().unwrap().value, 3);
    assert_eq!(rp.per_try_timeout.as_ref().unwrap().seconds, 2);
    assert_eq!(rp.retry_on, "gateway-error,connect-failure,refused-stream,5xx");
}

#[test]
fn circuit_breaker_and_outlier_detection_shape_the_cluster() {
    let cfg = examples();
    let reg = registry::build(&cfg.items, &[], "Kubernetes");
    let proxy = ProxyInfo {
        namespace: "default".into(),
        id: "sidecar~127.0.0.9~client.default~default.svc.cluster.local".into(),
        ..Default::default()
    };
    let t = translate(&cfg, &reg, &proxy);
    let c: &Cluster = &t.clusters["outbound|8000||httpbin.default.svc.cluster.local"];
    let th = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(th.max_connections.as_ref().unwrap().value, 1);
    assert_eq!(th.max_pending_requests.as_ref().unwrap().value, 1);
    assert!(c.typed_extension_protocol_options.contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"));
    let od = c.outlier_detection.as_ref().unwrap();
    assert_eq!(od.consecutive_5xx.as_ref().unwrap().value, 1);
    assert_eq!(od.base_ejection_time.as_ref().unwrap().seconds, 180);
    assert_eq!(od.max_ejection_percent.as_ref().unwrap().value, 100);
    assert_eq!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)));
    // This proxy's namespace has no Sidecar: the default namespace's services are reachable
    // under short names there, and bookinfo's only by full name.
    let routes = &t.routes["outbound"];
    let vh = routes.virtual_hosts.iter().find(|v| v.name == "httpbin.default.svc.cluster.local:8000").unwrap();
    assert!(vh.domains.contains(&"httpbin:8000".to_string()));
    let rv = routes.virtual_hosts.iter().find(|v| v.name == "reviews.bookinfo.svc.cluster.local:9080").unwrap();
    assert!(!rv.domains.contains(&"reviews:9080".to_string()));
}

#[test]
fn the_sidecar_resource_scopes_what_a_proxy_sees() {
    let t = translated();
    // bookinfo's Sidecar allows "./*" and "istio-system/*": nothing from default or mirror-demo.
    assert!(
        t.clusters.keys().all(|c| !c.ends_with("httpbin.default.svc.cluster.local")),
        "{:?}",
        t.clusters.keys().collect::<Vec<_>>()
    );
    assert!(t.clusters.contains_key("outbound|9080||ratings.bookinfo.svc.cluster.local"));
    // The workload's own service gets an inbound cluster to the local app.
    assert!(t.clusters.contains_key("inbound|9080||"), "{:?}", t.clusters.keys().collect::<Vec<_>>());
}

#[test]
fn listeners_bind_where_the_node_says_and_use_rds() {
    let mut node_proxy = productpage();
    node_proxy.outbound_listener = ("127.0.0.1".into(), 25001);
    let cfg = examples();
    let reg = registry::build(&cfg.items, &[], "Kubernetes");
    let t = translate(&cfg, &reg, &node_proxy);
    let l = &t.listeners["outbound"];
    let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
        l.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        panic!("{:?}", l.address)
    };
    assert_eq!(sa.address, "127.0.0.1");
    assert_eq!(
        sa.port_specifier,
        Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(25001))
    );
    let Some(ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type else { panic!() };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else { panic!() };
    assert_eq!(rds.route_config_name, "outbound");
    assert_eq!(
        hcm.http_filters.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        vec!["envoy.filters.http.fault", "envoy.filters.http.router"]
    );
}

#[test]
fn translation_is_deterministic() {
    let a = translated();
    let b = translated();
    assert_eq!(a, b);
    for (name, c) in &a.clusters {
        assert_eq!(c.encode_to_vec(), b.clusters[name].encode_to_vec(), "{name}");
    }
    for (name, r) in &a.routes {
        assert_eq!(r.encode_to_vec(), b.routes[name].encode_to_vec(), "{name}");
    }
}

/// A readable summary of everything translated, for the golden file.
fn summary(t: &Translated) -> String {
    let mut s = String::new();
    for (name, c) in &t.clusters {
        let th = c.circuit_breakers.as_ref().map(|cb| &cb.thresholds[0]);
        let lim = |v: Option<&envoy_types::pb::google::protobuf::UInt32Value>| match v.map(|v| v.value) {
            Some(u32::MAX) | None => "-".to_string(),
            Some(n) => n.to_string(),
        };
        writeln!(
            s,
            "cluster {name} type={:?} lb={} connect={:?}s maxconn={} pending={} outlier={}",
            c.cluster_discovery_type,
            c.lb_policy,
            c.connect_timeout.as_ref().map(|d| d.seconds),
            lim(th.and_then(|t| t.max_connections.as_ref())),
            lim(th.and_then(|t| t.max_pending_requests.as_ref())),
            c.outlier_detection.is_some()
        )
        .unwrap();
    }
    for (name, cla) in &t.endpoints {
        let eps: Vec<String> = cla
            .endpoints
            .iter()
            .flat_map(|l| {
                let loc = l.locality.as_ref().map(|x| format!("{}/{}", x.region, x.zone)).unwrap_or_default();
                l.lb_endpoints.iter().map(move |e| match &e.host_identifier {
                    Some(HostIdentifier::Endpoint(ep)) => match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                        Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) => {
                            format!("{}:{:?}@{loc}", sa.address, sa.port_specifier)
                        }
                        other => format!("{other:?}"),
                    },
                    other => format!("{other:?}"),
                })
            })
            .collect();
        writeln!(s, "endpoints {name} {eps:?}").unwrap();
    }
    for (name, l) in &t.listeners {
        writeln!(s, "listener {name} {:?}", l.address.as_ref().and_then(|a| a.address.as_ref())).unwrap();
    }
    for (name, rc) in &t.routes {
        writeln!(s, "routes {name}").unwrap();
        for vh in &rc.virtual_hosts {
            writeln!(s, "  vhost {} domains={:?}", vh.name, vh.domains).unwrap();
            for r in &vh.routes {
                let m = r
                    .r#match
                    .as_ref()
                    .map(|m| format!("{:?} headers={}", m.path_specifier, m.headers.len()))
                    .unwrap_or_default();
                let act = match r.action.as_ref() {
                    Some(Action::Route(a)) => {
                        let target = match &a.cluster_specifier {
                            Some(ClusterSpecifier::Cluster(c)) => c.clone(),
                            Some(ClusterSpecifier::WeightedClusters(w)) => w
                                .clusters
                                .iter()
                                .map(|c| format!("{}={}", c.name, c.weight.as_ref().map(|w| w.value).unwrap_or(0)))
                                .collect::<Vec<_>>()
                                .join(","),
                            other => format!("{other:?}"),
                        };
                        format!(
                            "route {target} timeout={:?} retries={:?} mirrors={}",
                            a.timeout.as_ref().map(|d| d.seconds),
                            a.retry_policy
                                .as_ref()
                                .map(|r| (r.retry_on.clone(), r.num_retries.as_ref().map(|n| n.value))),
                            a.request_mirror_policies.len()
                        )
                    }
                    other => format!("{other:?}"),
                };
                let filters: Vec<&String> = r.typed_per_filter_config.keys().collect();
                writeln!(s, "    {} match={m} -> {act} filters={filters:?}", r.name).unwrap();
            }
        }
    }
    s
}

#[test]
fn examples_translate_to_the_golden_resources() {
    let got = summary(&translated());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bookinfo-productpage.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(got == want, "translation changed; review and run with UPDATE_GOLDEN=1 to accept.\n--- got ---\n{got}");
}

fn snapshot(yaml: &str) -> ConfigSnapshot {
    let (docs, errors) = parse_documents(yaml, "t.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let mut items: Vec<_> = docs.iter().map(|d| validate_resource(&d.resource, "default").unwrap()).collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    ConfigSnapshot { items, ..Default::default() }
}

fn upstream_tls(c: &Cluster) -> Option<UpstreamTlsContext> {
    let ts = c.transport_socket.as_ref()?;
    assert_eq!(ts.name, "envoy.transport_sockets.tls");
    let Some(TsConfig::TypedConfig(any)) = &ts.config_type else { panic!("no typed config") };
    Some(UpstreamTlsContext::decode(any.value.as_slice()).unwrap())
}

fn sans(v: &CertificateValidationContext) -> Vec<String> {
    v.match_typed_subject_alt_names
        .iter()
        .map(|m| match &m.matcher.as_ref().unwrap().match_pattern {
            Some(MatchPattern::Exact(s)) => format!("{}:{s}", m.san_type),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn client_tls_follows_the_destination_rule() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["client.example".to_string()]).unwrap().self_signed(&key).unwrap();
    let (ca, crt, pk) = (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&ca, cert.pem()).unwrap();
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&pk, key.serialize_pem()).unwrap();
    let se = |name: &str, host: &str, port: u32, protocol: &str, extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  hosts: [{host}]\n  ports: [{{number: {port}, name: p, protocol: {protocol}}}]\n{extra}---\n"
        )
    };
    let dr = |name: &str, host: &str, tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  host: {host}\n  trafficPolicy: {{tls: {tls}}}\n  subsets: [{{name: v1, labels: {{version: v1}}}}]\n---\n"
        )
    };
    let yaml = [
        se("cart", "cart.shop.svc.cluster.local", 8080, "GRPC", "  resolution: STATIC\n  endpoints: [{address: 127.0.0.5, serviceAccount: cart, labels: {version: v1}}, {address: 127.0.0.6, serviceAccount: cart-canary}]\n"),
        dr("cart", "cart.shop.svc.cluster.local", "{mode: ISTIO_MUTUAL}"),
        se("api", "api.example.com", 443, "TLS", "  resolution: DNS\n  location: MESH_EXTERNAL\n"),
        dr("api", "api.example.com", "{mode: SIMPLE}"),
        se("bank", "bank.example.com", 443, "TLS", "  resolution: DNS\n  location: MESH_EXTERNAL\n"),
        dr("bank", "bank.example.com", &format!("{{mode: MUTUAL, clientCertificate: {}, privateKey: {}, caCertificates: {}, subjectAltNames: [bank.example.com, api.bank.example.com], sni: api.bank.example.com}}", crt.display(), pk.display(), ca.display())),
        se("legacy", "legacy.example.com", 443, "TLS", "  resolution: DNS\n  location: MESH_EXTERNAL\n"),
        dr("legacy", "legacy.example.com", "{mode: SIMPLE, insecureSkipVerify: true}"),
        se("plain", "plain.example.com", 80, "HTTP", "  resolution: DNS\n  location: MESH_EXTERNAL\n"),
    ]
    .concat();
    let cfg = snapshot(&yaml);
    let reg = registry::build(&cfg.items, &[], "Kubernetes");
    let proxy = ProxyInfo {
        namespace: "shop".into(),
        id: "sidecar~127.0.0.9~web.shop~shop.svc.cluster.local".into(),
        ..Default::default()
    };
    let t = translate(&cfg, &reg, &proxy);

    // ISTIO_MUTUAL: Istio's SNI, SDS secrets, the endpoints' SPIFFE identities, in-mesh ALPN.
    let mesh = upstream_tls(&t.clusters["outbound|8080|v1|cart.shop.svc.cluster.local"]).unwrap();
    assert_eq!(mesh.sni, "outbound_.8080_.v1_.cart.shop.svc.cluster.local");
    let common = mesh.common_tls_context.unwrap();
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
    assert_eq!(common.alpn_protocols, ["istio-peer-exchange", "istio", "h2"]);
    let Some(ValidationContextType::CombinedValidationContext(v)) = common.validation_context_type else {
        panic!("no combined validation context")
    };
    assert_eq!(v.validation_context_sds_secret_config.unwrap().name, "ROOTCA");
    // Only the subset's endpoint's identity (URI SAN type = 3).
    assert_eq!(sans(&v.default_validation_context.unwrap()), ["3:spiffe://cluster.local/ns/shop/sa/cart"]);
    let all = upstream_tls(&t.clusters["outbound|8080||cart.shop.svc.cluster.local"]).unwrap();
    assert_eq!(all.sni, "outbound_.8080_._.cart.shop.svc.cluster.local");

    // SIMPLE: SNI = host, the system's CA bundle, the host as DNS SAN (type 2).
    let simple = upstream_tls(&t.clusters["outbound|443||api.example.com"]).unwrap();
    assert_eq!(simple.sni, "api.example.com");
    let Some(ValidationContextType::ValidationContext(v)) = simple.common_tls_context.unwrap().validation_context_type
    else {
        panic!("no validation context")
    };
    assert_eq!(
        format!("{:?}", v.trusted_ca.as_ref().unwrap().specifier),
        "Some(Filename(\"/etc/ssl/certs/ca-certificates.crt\"))"
    );
    assert_eq!(sans(&v), ["2:api.example.com"]);

    // MUTUAL with files: client certificate, the given CA and SANs, the given SNI.
    let mutual = upstream_tls(&t.clusters["outbound|443||bank.example.com"]).unwrap();
    assert_eq!(mutual.sni, "api.bank.example.com");
    let common = mutual.common_tls_context.unwrap();
    assert_eq!(common.tls_certificates.len(), 1);
    let Some(ValidationContextType::ValidationContext(v)) = common.validation_context_type else { panic!() };
    assert_eq!(
        format!("{:?}", v.trusted_ca.as_ref().unwrap().specifier),
        format!("Some(Filename({:?}))", ca.display().to_string())
    );
    assert_eq!(sans(&v), ["2:bank.example.com", "2:api.bank.example.com"]);

    // insecureSkipVerify: no verification; no DestinationRule: plaintext.
    let legacy = upstream_tls(&t.clusters["outbound|443||legacy.example.com"]).unwrap();
    assert!(legacy.common_tls_context.unwrap().validation_context_type.is_none());
    assert!(upstream_tls(&t.clusters["outbound|80||plain.example.com"]).is_none());

    // And Envoy accepts all of it.
    envoy_validates(&t, &proxy.id);
}

fn filter_names(t: &Translated, listener: &str) -> Vec<(Vec<String>, String)> {
    t.listeners[listener]
        .filter_chains
        .iter()
        .map(|fc| {
            let names = fc.filter_chain_match.as_ref().map(|m| m.server_names.clone()).unwrap_or_default();
            (names, fc.filters.iter().map(|f| f.name.clone()).collect::<Vec<_>>().join(","))
        })
        .collect()
}

fn tcp_clusters(t: &Translated, listener: &str, chain: usize) -> Vec<(String, u32)> {
    let f = &t.listeners[listener].filter_chains[chain].filters[0];
    let Some(ConfigType::TypedConfig(any)) = &f.config_type else { panic!() };
    match TcpProxy::decode(any.value.as_slice()).unwrap().cluster_specifier.unwrap() {
        TcpClusterSpecifier::Cluster(c) => vec![(c, 100)],
        TcpClusterSpecifier::WeightedClusters(w) => w.clusters.into_iter().map(|c| (c.name, c.weight)).collect(),
    }
}

#[test]
fn sidecar_port_listeners_proxy_tcp_tls_and_http() {
    let yaml = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.data.svc.cluster.local]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.7, labels: {version: v1}}, {address: 127.0.0.8, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: data}
spec:
  host: db.data.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: data}
spec:
  hosts: [db.data.svc.cluster.local]
  tcp:
  - match: [{port: 5432, sourceLabels: {app: other}}]
    route: [{destination: {host: db.data.svc.cluster.local, subset: v2}}]
  - route:
    - {destination: {host: db.data.svc.cluster.local, subset: v1}, weight: 75}
    - {destination: {host: db.data.svc.cluster.local, subset: v2}, weight: 25}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: data}
spec:
  hosts: [api.example.com, www.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: data}
spec:
  hosts: [www.example.com]
  tls:
  - match: [{port: 443, sniHosts: [www.example.com]}]
    route: [{destination: {host: api.example.com}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: data}
spec:
  hosts: [web.data.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.9}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: app, namespace: data}
spec:
  workloadSelector: {labels: {app: app}}
  egress:
  - hosts: [\"./*\"]
  - port: {number: 5432, protocol: TCP, name: pg}
    hosts: [\"./db.data.svc.cluster.local\"]
  - port: {number: 443, protocol: TLS, name: tls}
    bind: 127.0.0.2
    hosts: [\"./*\"]
  - port: {number: 8080, protocol: HTTP, name: http}
    hosts: [\"./*\"]
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8000
  - port: {number: 9090, protocol: TCP, name: grpc-raw}
    bind: 127.0.0.3
    defaultEndpoint: unix:///var/run/app.sock
";
    let cfg = snapshot(yaml);
    let reg = registry::build(&cfg.items, &[], "Kubernetes");
    let proxy = ProxyInfo {
        namespace: "data".into(),
        id: "sidecar~127.0.0.4~app.data~data.svc.cluster.local".into(),
        labels: [("app".to_string(), "app".to_string())].into(),
        ..Default::default()
    };
    let t = translate(&cfg, &reg, &proxy);
    let names: Vec<&str> = t.listeners.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["0.0.0.0_9080", "127.0.0.1_5432", "127.0.0.1_8080", "127.0.0.2_443", "127.0.0.3_9090", "inbound", "outbound"]
    );
    // TCP: the VirtualService's weighted route (the sourceLabels match is for other clients).
    assert_eq!(filter_names(&t, "127.0.0.1_5432"), [(vec![], "envoy.filters.network.tcp_proxy".to_string())]);
    assert_eq!(
        tcp_clusters(&t, "127.0.0.1_5432", 0),
        [
            ("outbound|5432|v1|db.data.svc.cluster.local".to_string(), 75),
            ("outbound|5432|v2|db.data.svc.cluster.local".to_string(), 25)
        ]
    );
    // TLS: SNI passthrough, the VirtualService's sniHosts routed to api.
    let tls = filter_names(&t, "127.0.0.2_443");
    assert_eq!(tls.iter().map(|(n, _)| n.join(",")).collect::<Vec<_>>(), ["api.example.com", "www.example.com"]);
    assert_eq!(tcp_clusters(&t, "127.0.0.2_443", 1), [("outbound|443||api.example.com".to_string(), 100)]);
    assert_eq!(t.listeners["127.0.0.2_443"].listener_filters[0].name, "envoy.filters.listener.tls_inspector");
    // HTTP: its own route configuration, answering without the port too.
    let http = &t.routes["127.0.0.1_8080"];
    assert_eq!(http.virtual_hosts.len(), 1);
    assert!(http.virtual_hosts[0].domains.contains(&"web.data.svc.cluster.local".to_string()));
    // Ingress: HTTP to 127.0.0.1:8000, TCP to the unix socket; no automatic inbound ports.
    assert_eq!(filter_names(&t, "0.0.0.0_9080")[0].1, "envoy.filters.network.http_connection_manager");
    assert_eq!(tcp_clusters(&t, "127.0.0.3_9090", 0), [("inbound|9090||".to_string(), 100)]);
    let app = format!("{:?}", t.clusters["inbound|9080||"].load_assignment);
    assert!(app.contains("127.0.0.1") && app.contains("8000"), "{app}");
    let sock = format!("{:?}", t.clusters["inbound|9090||"].load_assignment);
    assert!(sock.contains("/var/run/app.sock"), "{sock}");
    assert!(t.routes["inbound"].virtual_hosts.is_empty());
    envoy_validates(&t, &proxy.id);
}

#[test]
fn gateways_serve_the_virtual_services_bound_to_them() {
    let yaml = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.5}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.shop.svc.cluster.local]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.6}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [\"shop/*.example.com\"]
  - port: {number: 8081, name: http-redirect, protocol: HTTP}
    hosts: [\"*\"]
    tls: {httpsRedirect: true}
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [\"*\"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 5432, name: tcp, protocol: TCP}
    hosts: [\"*\"]
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [\"*\"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: store, namespace: shop}
spec:
  hosts: [store.example.com]
  gateways: [edge]
  http:
  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: web.shop.svc.cluster.local}}]
  tls:
  - match: [{sniHosts: [store.example.com]}]
    route: [{destination: {host: web.shop.svc.cluster.local}}]
  tcp:
  - route: [{destination: {host: db.shop.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-only, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  http:
  - route: [{destination: {host: web.shop.svc.cluster.local}}]
";
    let cfg = snapshot(yaml);
    let reg = registry::build(&cfg.items, &[], "Kubernetes");
    let gw = ProxyInfo {
        kind: trellis_xds::proxy::ProxyKind::Router,
        namespace: "istio-system".into(),
        id: "router~127.0.0.9~ingressgateway.istio-system~istio-system.svc.cluster.local".into(),
        labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
        ..Default::default()
    };
    let t = translate(&cfg, &reg, &gw);
    let names: Vec<&str> = t.listeners.keys().map(String::as_str).collect();
    // No sidecar listeners; the TLS-terminating server waits for the CA.
    assert_eq!(names, ["0.0.0.0_443", "0.0.0.0_5432", "0.0.0.0_80", "0.0.0.0_8081"]);
    let http = &t.routes["http.80"];
    assert_eq!(http.virtual_hosts.len(), 1, "only the gateway-bound VirtualService: {http:?}");
    let vh = &http.virtual_hosts[0];
    assert_eq!(vh.domains, ["store.example.com", "store.example.com:80"]);
    assert_eq!(
        action(&vh.routes[0]).cluster_specifier,
        Some(ClusterSpecifier::Cluster("outbound|8080||web.shop.svc.cluster.local".into()))
    );
    let redirect = &t.routes["http.8081"].virtual_hosts[0].routes[0];
    assert!(matches!(redirect.action, Some(Action::Redirect(_))), "{redirect:?}");
    assert_eq!(
        filter_names(&t, "0.0.0.0_443"),
        [(vec!["store.example.com".to_string()], "envoy.filters.network.tcp_proxy".to_string())]
    );
    assert_eq!(tcp_clusters(&t, "0.0.0.0_5432", 0), [("outbound|5432||db.shop.svc.cluster.local".to_string(), 100)]);
    // A sidecar with the same labels gets no gateway listener.
    let sidecar = ProxyInfo { kind: trellis_xds::proxy::ProxyKind::Sidecar, ..gw.clone() };
    assert!(!translate(&cfg, &reg, &sidecar).listeners.contains_key("0.0.0.0_80"));
    envoy_validates(&t, &gw.id);
}

fn envoy() -> PathBuf {
    std::env::var_os("TRELLIS_ENVOY").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/envoy"))
}

/// Envoy itself checks the translated resources: EDS clusters become static ones with their
/// endpoints, and the route configurations are inlined, in a bootstrap run with
/// `--mode validate`.
#[test]
fn a_real_envoy_accepts_the_translated_resources() {
    let cfg = examples();
    let reg = registry::build(&cfg.items, &[], "Kubernetes");
    // productpage (bookinfo, scoped by its Sidecar) and a client in `default` (no Sidecar:
    // sees every service, including the circuit breaker's and the mirror's).
    let client = ProxyInfo {
        namespace: "default".into(),
        id: "sidecar~127.0.0.9~client.default~default.svc.cluster.local".into(),
        ..Default::default()
    };
    for proxy in [productpage(), client] {
        envoy_validates(&translate(&cfg, &reg, &proxy), &proxy.id);
    }
}

/// Envoy's validation mode crashes (1.40: segfault) on SDS over ADS, its ADS mux being a stub;
/// for validation only, the same secrets are asked of the same server as a plain gRPC source.
fn sds_over_grpc_for_validation(c: &mut Cluster) {
    let Some(ts) = &mut c.transport_socket else { return };
    let Some(TsConfig::TypedConfig(any)) = &mut ts.config_type else { return };
    let mut ctx = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
    let Some(common) = &mut ctx.common_tls_context else { return };
    grpc_secrets(common);
    *any = envoy_types::util::pack_any(ctx);
}

/// As [`sds_over_grpc_for_validation`], for an inbound chain's server TLS.
fn sds_over_grpc_for_validation_downstream(fc: &mut envoy_types::pb::envoy::config::listener::v3::FilterChain) {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
    let Some(ts) = &mut fc.transport_socket else { return };
    let Some(TsConfig::TypedConfig(any)) = &mut ts.config_type else { return };
    let mut ctx = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    let Some(common) = &mut ctx.common_tls_context else { return };
    grpc_secrets(common);
    *any = envoy_types::util::pack_any(ctx);
}

fn grpc_secrets(common: &mut envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CommonTlsContext) {
    let grpc = ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(ads_source())),
        ..Default::default()
    };
    let mut secrets: Vec<&mut SdsSecretConfig> = common.tls_certificate_sds_secret_configs.iter_mut().collect();
    if let Some(ValidationContextType::CombinedValidationContext(v)) = &mut common.validation_context_type {
        secrets.extend(v.validation_context_sds_secret_config.as_mut());
    }
    for s in secrets {
        s.sds_config = Some(grpc.clone());
    }
}

fn ads_source() -> ApiConfigSource {
    ApiConfigSource {
        api_type: ApiType::Grpc as i32,
        transport_api_version: ApiVersion::V3 as i32,
        grpc_services: vec![GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                cluster_name: "xds".into(),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The static cluster a bootstrap points ADS at.
fn ads_cluster() -> Cluster {
    Cluster {
        name: "xds".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            envoy_types::util::pack_any(HttpProtocolOptions {
                upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                    protocol_config: Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        Default::default(),
                    )),
                })),
                ..Default::default()
            }),
        )]
        .into(),
        ..Default::default()
    }
}

fn envoy_validates(t: &Translated, node_id: &str) {
    let mut clusters = Vec::new();
    for (name, c) in &t.clusters {
        let mut c = c.clone();
        sds_over_grpc_for_validation(&mut c);
        if let Some(cla) = t.endpoints.get(name) {
            c.eds_cluster_config = None;
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
            c.load_assignment = Some(cla.clone());
        }
        clusters.push(c);
    }
    let mut listeners = Vec::new();
    for l in t.listeners.values() {
        let mut l = l.clone();
        for fc in &mut l.filter_chains {
            for f in fc.filters.iter_mut().filter(|f| f.name == "envoy.filters.network.http_connection_manager") {
                let Some(ConfigType::TypedConfig(any)) = &f.config_type else { continue };
                let mut hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
                if let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier {
                    hcm.route_specifier = Some(RouteSpecifier::RouteConfig(t.routes[&rds.route_config_name].clone()));
                }
                f.config_type = Some(ConfigType::TypedConfig(envoy_types::util::pack_any(hcm)));
            }
        }
        for fc in &mut l.filter_chains {
            sds_over_grpc_for_validation_downstream(fc);
        }
        listeners.push(l);
    }
    // SDS secrets (client TLS) come over ADS, as in a real bootstrap.
    let xds_cluster: Cluster = ads_cluster();
    clusters.push(xds_cluster);
    let bootstrap = Bootstrap {
        node: Some(Node { id: node_id.to_string(), cluster: "test".into(), ..Default::default() }),
        static_resources: Some(StaticResources { listeners, clusters, ..Default::default() }),
        dynamic_resources: Some(DynamicResources { ads_config: Some(ads_source()), ..Default::default() }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bootstrap.pb");
    std::fs::write(&file, bootstrap.encode_to_vec()).unwrap();
    let out = std::process::Command::new(envoy())
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(&file)
        .output()
        .expect("Envoy (run scripts/setup.sh, or set TRELLIS_ENVOY)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "Envoy rejected the resources translated for {node_id}:\n{text}");
    assert!(text.contains("OK"), "{text}");
}

#[test]
fn authorization_policies_become_rbac_filters_on_the_inbound_side_in_istios_order() {
    use envoy_types::pb::envoy::config::rbac::v3::{principal, rbac};
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
    let cfg = snapshot(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: bookinfo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-jwtless, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {requestPrincipals: ["*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-app, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: templated, namespace: bookinfo}
spec:
  action: AUDIT
  rules:
  - to: [{operation: {paths: ["/a/{*}/b"]}}]
"#,
    );
    let reg = registry::build(&cfg.items, &[], "Kubernetes");
    let t = translate(&cfg, &reg, &productpage());
    let rbacs = |listener: &str| -> Vec<RbacFilter> {
        let f = &t.listeners[listener].filter_chains[0].filters[0];
        let Some(ConfigType::TypedConfig(any)) = &f.config_type else { panic!() };
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
        let fault = names.iter().position(|n| *n == "envoy.filters.http.fault").unwrap();
        assert!(names.iter().rposition(|n| *n == "envoy.filters.http.rbac").is_none_or(|r| r < fault), "{names:?}");
        hcm.http_filters
            .iter()
            .filter(|f| f.name == "envoy.filters.http.rbac")
            .map(|f| {
                let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!() };
                RbacFilter::decode(any.value.as_slice()).unwrap()
            })
            .collect()
    };
    assert!(rbacs("outbound").is_empty(), "authorization is enforced on the server side");
    let inbound = rbacs("inbound");
    let actions: Vec<i32> = inbound.iter().map(|r| r.rules.as_ref().unwrap().action).collect();
    assert_eq!(actions, vec![rbac::Action::Log as i32, rbac::Action::Deny as i32, rbac::Action::Allow as i32]);
    // AUDIT with a path template: fails closed (the permission never matches).
    let audit = &inbound[0].rules.as_ref().unwrap().policies;
    let p = &audit["ns[bookinfo]-policy[templated]-rule[0]"];
    assert!(format!("{:?}", p.permissions).contains("NotRule"), "{:?}", p.permissions);
    // DENY on requestPrincipals ["*"]: no JWT is validated, so no request has a request
    // principal and the rule never matches.
    let deny = &inbound[1].rules.as_ref().unwrap().policies["ns[istio-system]-policy[deny-jwtless]-rule[0]"];
    let never =
        |p: &principal::Identifier| format!("{p:?}").contains("NotId(Principal { identifier: Some(Any(true)) })");
    assert!(never(deny.principals[0].identifier.as_ref().unwrap()), "{:?}", deny.principals);
    // allow-nothing: an ALLOW filter with no policies; the reviews-only policy is not here.
    let allow = inbound[2].rules.as_ref().unwrap();
    assert!(allow.policies.is_empty(), "{:?}", allow.policies.keys());
}

#[test]
fn every_proxy_gets_the_trust_bundle_as_the_rootca_secret() {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret;
    let mut config = snapshot("");
    assert!(translate(&config, &registry::build(&config.items, &[], "Kubernetes"), &productpage()).secrets.is_empty());
    config.trust_bundle = Some("-----BEGIN CERTIFICATE-----\nroots\n-----END CERTIFICATE-----\n".into());
    let out = translate(&config, &registry::build(&config.items, &[], "Kubernetes"), &productpage());
    let Some(secret::Type::ValidationContext(vc)) = out.secrets["ROOTCA"].r#type.clone() else { panic!("{out:?}") };
    let Some(Specifier::InlineBytes(pem)) = vc.trusted_ca.and_then(|d| d.specifier) else { panic!("no bundle") };
    assert!(String::from_utf8(pem).unwrap().contains("roots"));
}

/// (transport_protocol, TLS terminated) of each chain, and whether a TLS inspector runs.
fn chains(t: &Translated, listener: &str) -> (Vec<(String, bool)>, bool) {
    let l = &t.listeners[listener];
    let chains = l
        .filter_chains
        .iter()
        .map(|fc| {
            let protocol = fc.filter_chain_match.as_ref().map(|m| m.transport_protocol.clone()).unwrap_or_default();
            (protocol, fc.transport_socket.is_some())
        })
        .collect();
    (chains, l.listener_filters.iter().any(|f| f.name == "envoy.filters.listener.tls_inspector"))
}

#[test]
fn peer_authentication_decides_what_inbound_listeners_accept() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
    let base = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews.bookinfo.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP, targetPort: 9080}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1, namespace: bookinfo}
spec: {address: 127.0.0.3, labels: {app: reviews}, serviceAccount: bookinfo-reviews}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: reviews, namespace: bookinfo}
spec:
  workloadSelector: {labels: {app: reviews}}
  ingress:
  - {port: {number: 9080, protocol: HTTP, name: http}, bind: 127.0.0.3, defaultEndpoint: "127.0.0.1:8080"}
  - {port: {number: 9443, protocol: TCP, name: tcp}, bind: 127.0.0.3, defaultEndpoint: "127.0.0.1:8443"}
"#;
    let reviews = |mtls: bool| ProxyInfo {
        id: "sidecar~127.0.0.3~reviews-1.bookinfo~bookinfo.svc.cluster.local".into(),
        namespace: "bookinfo".into(),
        ips: vec!["127.0.0.3".into()],
        labels: [("app".to_string(), "reviews".to_string())].into(),
        mtls,
        ..Default::default()
    };
    let run = |policies: &str, mtls: bool| {
        let mut cfg = snapshot(&format!("{base}{policies}"));
        cfg.trust_domain = "example.org".into();
        let reg = registry::build(&cfg.items, &[], "Kubernetes");
        translate(&cfg, &reg, &reviews(mtls))
    };
    let tls = || ("tls".to_string(), true);
    let raw = || ("raw_buffer".to_string(), false);
    let plain = || (String::new(), false);
    // No policy: PERMISSIVE — TLS and plaintext, told apart by the inspector.
    let t = run("", true);
    for l in ["inbound", "127.0.0.3_9080", "127.0.0.3_9443"] {
        assert_eq!(chains(&t, l), (vec![tls(), raw()], true), "{l}");
    }
    // The TLS chain: the workload certificate, client certificates of the trust domain from
    // ROOTCA, HTTP ALPN on HTTP ports only.
    let fc = &t.listeners["127.0.0.3_9080"].filter_chains[0];
    let Some(TsConfig::TypedConfig(any)) = &fc.transport_socket.as_ref().unwrap().config_type else { panic!() };
    let d = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    assert_eq!(d.require_client_certificate.map(|b| b.value), Some(true));
    let common = d.common_tls_context.unwrap();
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
    assert_eq!(common.alpn_protocols, ["h2", "http/1.1"]);
    let Some(ValidationContextType::CombinedValidationContext(v)) = common.validation_context_type else { panic!() };
    assert_eq!(v.validation_context_sds_secret_config.unwrap().name, "ROOTCA");
    let m = &v.default_validation_context.unwrap().match_typed_subject_alt_names[0];
    assert_eq!(m.matcher.as_ref().unwrap().match_pattern, Some(MatchPattern::Prefix("spiffe://example.org/".into())));
    let fc = &t.listeners["127.0.0.3_9443"].filter_chains[0];
    let Some(TsConfig::TypedConfig(any)) = &fc.transport_socket.as_ref().unwrap().config_type else { panic!() };
    let d = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    assert!(d.common_tls_context.unwrap().alpn_protocols.is_empty(), "no HTTP ALPN on a TCP port");

    // Mesh STRICT, namespace UNSET (inherits), a workload policy with port overrides.
    let policies = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bookinfo}
spec: {mtls: {mode: UNSET}}
"#;
    let t = run(policies, true);
    for l in ["inbound", "127.0.0.3_9080", "127.0.0.3_9443"] {
        assert_eq!(chains(&t, l), (vec![tls()], true), "STRICT {l}");
    }
    let with_ports = format!(
        "{policies}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  portLevelMtls:
    \"9443\": {{mode: DISABLE}}
"
    );
    let t = run(&with_ports, true);
    assert_eq!(chains(&t, "127.0.0.3_9080").0, vec![tls()], "the workload mode is inherited: STRICT");
    assert_eq!(chains(&t, "127.0.0.3_9443"), (vec![plain()], false), "port 9443: DISABLE");
    // A namespace PERMISSIVE over the mesh's STRICT.
    let ns_permissive = policies.replace("mode: UNSET", "mode: PERMISSIVE");
    assert_eq!(chains(&run(&ns_permissive, true), "127.0.0.3_9080").0, vec![tls(), raw()]);
    // A workload DISABLE over both.
    let disable = format!(
        "{ns_permissive}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: reviews, namespace: bookinfo}}
spec: {{selector: {{matchLabels: {{app: reviews}}}}, mtls: {{mode: DISABLE}}}}
"
    );
    let t = run(&disable, true);
    for l in ["inbound", "127.0.0.3_9080", "127.0.0.3_9443"] {
        assert_eq!(chains(&t, l), (vec![plain()], false), "DISABLE {l}");
    }
    // A policy selecting other workloads does not apply.
    let other = disable.replace("{app: reviews}}, mtls", "{app: ratings}}, mtls");
    assert_eq!(chains(&run(&other, true), "127.0.0.3_9080").0, vec![tls(), raw()]);

    // A proxy without a certificate: plaintext where allowed, an unusable TLS chain under
    // STRICT (closed, never open).
    assert_eq!(chains(&run("", false), "127.0.0.3_9080"), (vec![plain()], false));
    assert_eq!(chains(&run(policies, false), "127.0.0.3_9080"), (vec![tls()], true));

    // Envoy accepts the listeners (STRICT with a port-level DISABLE, and PERMISSIVE).
    envoy_validates(&run(&with_ports, true), "sidecar~127.0.0.3~reviews-1.bookinfo~bookinfo.svc.cluster.local");
    envoy_validates(&run("", true), "sidecar~127.0.0.3~reviews-1.bookinfo~bookinfo.svc.cluster.local");
}
