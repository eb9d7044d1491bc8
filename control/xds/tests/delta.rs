//! The ADS server's protocol behaviour with in-process clients on loopback: scoped and
//! incremental pushes, removals, reconnects with known versions, NACKs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use prost::Message;
use tokio::sync::watch;
use trellis_model::registry::{
    Endpoint, Protocol, RegistrySource, Resolution, Service, ServiceDefinition, ServicePort, WorkloadInstance,
};
use trellis_model::{parse_documents, validate_resource};
use trellis_xds::client::DeltaClient;
use trellis_xds::hub::{CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE};
use trellis_xds::{AdsServer, ConfigSnapshot, Hub, HubOptions};

fn snapshot(yaml: &str) -> Arc<ConfigSnapshot> {
    let (docs, errors) = parse_documents(yaml, "t.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let mut items: Vec<_> = docs.iter().map(|d| validate_resource(&d.resource, "default").unwrap()).collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    Arc::new(ConfigSnapshot { items, ..Default::default() })
}

fn service(name: &str, address: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{name}.default.svc.cluster.local]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints: [{{address: {address}}}]\n---\n"
    )
}

const SCOPED_SIDECAR: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: scoped}\nspec:\n  egress: [{hosts: [\"./*\"]}]\n---\n";

struct Server {
    addr: String,
    config: watch::Sender<Arc<ConfigSnapshot>>,
    hub: Arc<Hub>,
}

async fn start(yaml: &str) -> Server {
    let (config, rx) = watch::channel(snapshot(yaml));
    let hub = Hub::new(HubOptions { debounce: Duration::from_millis(10), ..Default::default() });
    tokio::spawn(hub.clone().run(rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let svc = AdsServer::new(hub.clone()).service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Server { addr, config, hub }
}

fn node(name: &str, ns: &str) -> Node {
    Node { id: format!("sidecar~~{name}.{ns}~{ns}.svc.cluster.local"), ..Default::default() }
}

const T: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for (a bounded negative check).
const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn an_endpoint_change_sends_one_cluster_load_assignment_only_to_proxies_that_use_it() {
    let base = format!("{}{}{SCOPED_SIDECAR}", service("a", "127.0.0.1"), service("b", "127.0.0.2"));
    let s = start(&base).await;
    let mut user = DeltaClient::connect(&s.addr, node("user", "default")).await.unwrap();
    user.sync_like_envoy(T).await.unwrap();
    assert_eq!(user.held[ENDPOINT_TYPE].len(), 2);
    let mut other = DeltaClient::connect(&s.addr, node("other", "scoped")).await.unwrap();
    other.sync_like_envoy(T).await.unwrap();
    assert!(other.held[CLUSTER_TYPE].is_empty(), "the scoped proxy sees no service of namespace default");

    s.config.send_replace(snapshot(&format!(
        "{}{}{SCOPED_SIDECAR}",
        service("a", "127.0.0.9"),
        service("b", "127.0.0.2")
    )));
    let r = user.recv(T).await.unwrap();
    assert_eq!(r.type_url, ENDPOINT_TYPE);
    assert_eq!(
        r.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        vec!["outbound|80||a.default.svc.cluster.local"]
    );
    assert!(r.removed_resources.is_empty());
    user.ack(&r).await.unwrap();
    assert!(user.recv(QUIET).await.is_err(), "nothing but the one endpoint set is pushed");
    assert!(other.recv(QUIET).await.is_err(), "a proxy that does not use the service gets nothing");
}

#[tokio::test]
async fn removed_services_are_sent_as_removed_resources() {
    let s = start(&format!("{}{}", service("a", "127.0.0.1"), service("b", "127.0.0.2"))).await;
    let mut c = DeltaClient::connect(&s.addr, node("user", "default")).await.unwrap();
    c.sync_like_envoy(T).await.unwrap();
    s.config.send_replace(snapshot(&service("a", "127.0.0.1")));
    let mut removed = Vec::new();
    for _ in 0..3 {
        let Ok(r) = c.recv(QUIET).await else { break };
        c.ack(&r).await.unwrap();
        assert!(r.resources.iter().all(|x| !x.name.contains("b.default")), "{r:?}");
        removed.extend(r.removed_resources.iter().map(|n| format!("{}:{n}", r.type_url.rsplit('.').next().unwrap())));
    }
    removed.sort();
    assert_eq!(
        removed,
        vec![
            "Cluster:outbound|80||b.default.svc.cluster.local",
            "ClusterLoadAssignment:outbound|80||b.default.svc.cluster.local"
        ]
    );
    assert!(!c.held[CLUSTER_TYPE].contains_key("outbound|80||b.default.svc.cluster.local"));
}

/// A registry source like a remote Kubernetes cluster would be.
#[derive(Debug)]
struct RemoteCluster(&'static str);

impl RegistrySource for RemoteCluster {
    fn name(&self) -> &str {
        "kubernetes/east"
    }

    fn services(&self, _: &[WorkloadInstance]) -> Vec<ServiceDefinition> {
        let service = Service {
            hostname: "db.default.svc.cluster.local".into(),
            namespace: "default".into(),
            ports: vec![ServicePort { number: 5432, name: "tcp".into(), protocol: Protocol::Tcp, target_port: None }],
            resolution: Resolution::Static,
            mesh_internal: true,
            export_to: Vec::new(),
            origin: "kubernetes/east".into(),
        };
        let ep =
            Endpoint { address: self.0.into(), port: 5432, cluster: "east".into(), weight: 1, ..Default::default() };
        vec![ServiceDefinition { service, endpoints: [(5432, vec![ep])].into() }]
    }
}

#[tokio::test]
async fn a_plugged_in_registry_source_reaches_proxies_and_its_removal_too() {
    let s = start(&service("a", "127.0.0.1")).await;
    let mut c = DeltaClient::connect(&s.addr, node("user", "default")).await.unwrap();
    c.sync_like_envoy(T).await.unwrap();
    let db = "outbound|5432||db.default.svc.cluster.local";
    s.hub.set_source(Arc::new(RemoteCluster("10.1.0.5")));
    let deadline = tokio::time::Instant::now() + T;
    while !c.held[CLUSTER_TYPE].contains_key(db) {
        assert!(tokio::time::Instant::now() < deadline, "the source's service never arrived: {:?}", c.held);
        let r = c.recv(T).await.unwrap();
        c.ack(&r).await.unwrap();
    }
    // Its endpoints are served as well, as Envoy would ask for them.
    c.subscribe(ENDPOINT_TYPE, vec![db.to_string()], HashMap::new()).await.unwrap();
    let r = c.recv(T).await.unwrap();
    assert_eq!((r.type_url.as_str(), r.resources.len()), (ENDPOINT_TYPE, 1), "{r:?}");
    let cla = ClusterLoadAssignment::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(format!("{:?}", cla.endpoints[0].lb_endpoints[0]).matches("10.1.0.5").count(), 1, "{cla:?}");
    c.ack(&r).await.unwrap();
    s.hub.remove_source("kubernetes/east");
    while c.held[CLUSTER_TYPE].contains_key(db) {
        assert!(tokio::time::Instant::now() < deadline, "the source's service was never removed");
        let r = c.recv(T).await.unwrap();
        c.ack(&r).await.unwrap();
    }
}

#[tokio::test]
async fn a_reconnecting_proxy_with_current_versions_is_sent_nothing_new() {
    let s = start(&service("a", "127.0.0.1")).await;
    let mut first = DeltaClient::connect(&s.addr, node("user", "default")).await.unwrap();
    first.sync_like_envoy(T).await.unwrap();
    let held: HashMap<String, String> = first.held[CLUSTER_TYPE].clone().into_iter().collect();
    drop(first);
    let mut again = DeltaClient::connect(&s.addr, node("user", "default")).await.unwrap();
    again.subscribe(CLUSTER_TYPE, Vec::new(), held).await.unwrap();
    let r = again.recv(T).await.unwrap();
    assert!(
        r.resources.is_empty() && r.removed_resources.is_empty(),
        "only an empty acknowledgement of the subscription: {r:?}"
    );
    // A stale version is corrected.
    let mut stale = DeltaClient::connect(&s.addr, node("user2", "default")).await.unwrap();
    stale
        .subscribe(
            CLUSTER_TYPE,
            Vec::new(),
            [("outbound|80||a.default.svc.cluster.local".to_string(), "old".to_string())].into(),
        )
        .await
        .unwrap();
    let r = stale.recv(T).await.unwrap();
    assert_eq!(r.resources.len(), 1);
}

#[tokio::test]
async fn a_nack_is_recorded_with_the_proxys_message_and_later_changes_are_still_sent() {
    let s = start(&service("a", "127.0.0.1")).await;
    let mut c = DeltaClient::connect(&s.addr, node("picky", "default")).await.unwrap();
    c.sync_like_envoy(T).await.unwrap();
    s.config.send_replace(snapshot(&format!("{}{}", service("a", "127.0.0.1"), service("z", "127.0.0.5"))));
    // Clusters, endpoints and routes change; reject the routes.
    let mut nacked = false;
    for _ in 0..3 {
        let Ok(r) = c.recv(QUIET).await else { break };
        if r.type_url == ROUTE_TYPE {
            c.nack(&r, "route z is not acceptable").await.unwrap();
            nacked = true;
        } else {
            c.ack(&r).await.unwrap();
        }
    }
    assert!(nacked);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let st = s.hub.proxy_status().into_iter().find(|p| p.id.contains("picky")).unwrap();
        if st.types.get(ROUTE_TYPE).and_then(|t| t.nack.clone()).as_deref() == Some("route z is not acceptable") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "NACK not recorded: {st:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Going back to what the proxy holds sends nothing (it kept its last accepted routes);
    // a further change is pushed.
    s.config.send_replace(snapshot(&service("a", "127.0.0.1")));
    while let Ok(r) = c.recv(QUIET).await {
        assert_ne!(r.type_url, ROUTE_TYPE, "the proxy already holds these routes");
        c.ack(&r).await.unwrap();
    }
    s.config.send_replace(snapshot(&format!("{}{}", service("a", "127.0.0.1"), service("w", "127.0.0.6"))));
    let mut got_routes = false;
    for _ in 0..4 {
        let Ok(r) = c.recv(QUIET).await else { break };
        got_routes |= r.type_url == ROUTE_TYPE;
        c.ack(&r).await.unwrap();
    }
    assert!(got_routes);
}

#[tokio::test]
async fn proxies_that_announce_their_workload_become_endpoints() {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: default}\nspec:\n  hosts: [api.default.svc.cluster.local]\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: api}}\n";
    let s = start(yaml).await;
    let mut watcher = DeltaClient::connect(&s.addr, node("watcher", "default")).await.unwrap();
    watcher.sync_like_envoy(T).await.unwrap();
    let s_ = |v: &str| Value { kind: Some(Kind::StringValue(v.into())) };
    let mut labels = Struct::default();
    labels.fields.insert("app".into(), s_("api"));
    let mut meta = Struct::default();
    meta.fields.insert("LABELS".into(), Value { kind: Some(Kind::StructValue(labels)) });
    meta.fields.insert("INSTANCE_IPS".into(), s_("127.0.0.42"));
    let vm = Node {
        id: "sidecar~127.0.0.42~api-vm.default~default.svc.cluster.local".into(),
        metadata: Some(meta),
        ..Default::default()
    };
    let mut workload = DeltaClient::connect(&s.addr, vm).await.unwrap();
    workload.sync_like_envoy(T).await.unwrap();
    // The watcher learns the new endpoint.
    let r = watcher.recv(T).await.unwrap();
    assert_eq!(r.type_url, ENDPOINT_TYPE);
    assert_eq!(endpoint_ips(&r), vec!["127.0.0.42".to_string()]);
    watcher.ack(&r).await.unwrap();
    drop(workload);
    // And forgets it when the proxy goes away.
    let r = watcher.recv(T).await.unwrap();
    assert_eq!(r.type_url, ENDPOINT_TYPE);
    assert!(endpoint_ips(&r).is_empty(), "{:?}", endpoint_ips(&r));
}

/// Addresses of every endpoint in an EDS response.
fn endpoint_ips(r: &envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse) -> Vec<String> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    use prost::Message;
    let mut out = Vec::new();
    for res in &r.resources {
        let cla = ClusterLoadAssignment::decode(res.resource.as_ref().unwrap().value.as_slice()).unwrap();
        for e in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
            if let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier
                && let Some(Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref())
            {
                out.push(sa.address.clone());
            }
        }
    }
    out
}
