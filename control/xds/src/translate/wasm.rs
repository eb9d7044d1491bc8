//! WasmPlugins → Envoy's Wasm HTTP filter (`envoy.filters.http.wasm`) in the HTTP connection
//! managers of the proxies they select, ordered as Istio orders them: AUTHN, then AUTHZ, then
//! the fault filter, then STATS, then plugins without a phase, then the router; within a
//! phase, higher `priority` first, then by namespace and name.
//!
//! Selection: a WasmPlugin applies to workloads in its namespace (all of them in the root
//! namespace) whose labels match `selector`; `match[].mode` CLIENT applies it to outbound
//! listeners, SERVER to inbound ones, otherwise both. `match[].ports` narrows it on per-port
//! listeners only: on the shared outbound / inbound listeners, which serve every port, the
//! plugin applies to all ports (stricter, never laxer).
//!
//! Delivery: `file://PATH` modules are loaded by the proxy from its own file system (Envoy
//! and trellis-proxy alike); the sha256, when given, travels as the VM environment variable
//! `TRELLIS_MODULE_SHA256`, which trellis-proxy verifies (Envoy cannot for local files).
//! `trellis://SHA256` modules (uploaded with `trellis wasm push`) become Envoy's remote data
//! source: `http://MODULE_SERVER/wasm/SHA256` through the cluster [`MODULE_CLUSTER`] (the
//! control plane's xDS port) with the sha256, which both proxies verify after the fetch.

use envoy_types::pb::envoy::config::core::v3::{AsyncDataSource, DataSource, async_data_source, data_source};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig, plugin_config,
};
use envoy_types::pb::google::protobuf::StringValue;
use envoy_types::util::pack_any;
use trellis_model::ResourceKey;
use trellis_model::analyze::ROOT_NAMESPACE;
use trellis_model::spec::{FailStrategy, PluginPhase, Spec, WasmPlugin, WasmWorkloadMode};

use super::{Scope, selects};

/// The VM environment variable carrying the module's expected sha256.
pub const SHA256_ENV: &str = "TRELLIS_MODULE_SHA256";

/// The cluster proxies fetch uploaded modules through.
pub const MODULE_CLUSTER: &str = "trellis-wasm-modules";

/// The sha256 a `trellis://` URL names.
fn trellis_sha(url: &str) -> Option<&str> {
    url.strip_prefix("trellis://").map(|s| s.trim_end_matches('/'))
}

/// The cluster to the module server, when a plugin this proxy runs is an uploaded module.
pub(crate) fn module_cluster(scope: &Scope<'_>) -> Option<envoy_types::pb::envoy::config::cluster::v3::Cluster> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    let server = scope.config.module_server?;
    let used = scope.config.items.iter().any(|(k, s)| match s {
        Spec::WasmPlugin(p) => {
            trellis_sha(&p.url).is_some()
                && (k.namespace == scope.proxy.namespace || k.namespace == ROOT_NAMESPACE)
                && p.selector.as_ref().is_none_or(|s| selects(&s.match_labels, &scope.proxy.labels))
        }
        _ => false,
    });
    if !used {
        return None;
    }
    let address = Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: server.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(server.port()))),
            ..Default::default()
        })),
    };
    Some(Cluster {
        name: MODULE_CLUSTER.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration { seconds: 5, nanos: 0 }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: MODULE_CLUSTER.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(address),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Which side of the proxy a filter chain serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

/// Plugins applying to this proxy on `side` (for a listener of `port`, if it serves one port),
/// as (phase rank, filter) pairs in chain order.
pub(crate) fn filters(scope: &Scope<'_>, side: Side, port: Option<u32>) -> Vec<(u8, HttpFilter)> {
    let mut found: Vec<(&ResourceKey, &WasmPlugin)> = scope
        .config
        .items
        .iter()
        .filter_map(|(k, s)| match s {
            Spec::WasmPlugin(p) if applies(scope, k, p, side, port) => Some((k, p)),
            _ => None,
        })
        .collect();
    found.sort_by(|(ka, a), (kb, b)| {
        (rank(a.phase), -a.priority.unwrap_or(0), &ka.namespace, &ka.name).cmp(&(
            rank(b.phase),
            -b.priority.unwrap_or(0),
            &kb.namespace,
            &kb.name,
        ))
    });
    found.into_iter().filter_map(|(k, p)| Some((rank(p.phase), filter(scope, k, p)?))).collect()
}

/// AUTHN 0, AUTHZ 1, (fault filter 2), STATS 3, unspecified 4.
fn rank(phase: PluginPhase) -> u8 {
    match phase {
        PluginPhase::AUTHN => 0,
        PluginPhase::AUTHZ => 1,
        PluginPhase::STATS => 3,
        PluginPhase::UNSPECIFIED_PHASE => 4,
    }
}

/// The fault filter's place among ranks.
pub(crate) const FAULT_RANK: u8 = 2;

fn applies(scope: &Scope<'_>, key: &ResourceKey, p: &WasmPlugin, side: Side, port: Option<u32>) -> bool {
    let ns_ok = key.namespace == scope.proxy.namespace || key.namespace == ROOT_NAMESPACE;
    let labels_ok = p.selector.as_ref().is_none_or(|s| selects(&s.match_labels, &scope.proxy.labels));
    let side_ok = p.matches.is_empty()
        || p.matches.iter().any(|m| {
            let mode_ok = match m.mode {
                WasmWorkloadMode::CLIENT => side == Side::Client,
                WasmWorkloadMode::SERVER => side == Side::Server,
                WasmWorkloadMode::UNDEFINED | WasmWorkloadMode::CLIENT_AND_SERVER => true,
            };
            let port_ok = match port {
                Some(port) => m.ports.is_empty() || m.ports.iter().any(|p| p.number == port),
                None => true,
            };
            mode_ok && port_ok
        });
    ns_ok && labels_ok && side_ok
}

fn filter(scope: &Scope<'_>, key: &ResourceKey, p: &WasmPlugin) -> Option<HttpFilter> {
    use envoy_types::pb::envoy::config::core::v3::{HttpUri, RemoteDataSource, http_uri};
    let name = format!("{}.{}", key.namespace, key.name);
    let code = if let Some(path) = p.url.strip_prefix("file://") {
        async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(path.to_string())),
            ..Default::default()
        })
    } else if let Some(sha) = trellis_sha(&p.url) {
        let Some(server) = scope.config.module_server else {
            tracing::error!(plugin = %name, "WasmPlugin {name} names an uploaded module but the control plane serves no modules (its xDS port binds a wildcard address: set --xds-advertise-addr); not applied");
            return None;
        };
        async_data_source::Specifier::Remote(RemoteDataSource {
            http_uri: Some(HttpUri {
                uri: format!("http://{server}/wasm/{sha}"),
                timeout: Some(envoy_types::pb::google::protobuf::Duration { seconds: 30, nanos: 0 }),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(MODULE_CLUSTER.into())),
            }),
            sha256: sha.to_string(),
            ..Default::default()
        })
    } else {
        return None;
    };
    let configuration = p.plugin_config.as_ref().map(|c| serde_json::Value::Object(c.clone()).to_string());
    let mut env = EnvironmentVariables::default();
    if !p.sha256.is_empty() {
        env.key_values.insert(SHA256_ENV.into(), p.sha256.clone());
    }
    let wasm = Wasm {
        config: Some(PluginConfig {
            name: name.clone(),
            root_id: p.plugin_name.clone(),
            vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                vm_id: name.clone(),
                runtime: "envoy.wasm.runtime.v8".into(),
                code: Some(AsyncDataSource { specifier: Some(code) }),
                environment_variables: (!env.key_values.is_empty()).then_some(env),
                ..Default::default()
            })),
            configuration: configuration.map(|c| pack_any(StringValue { value: c })),
            failure_policy: match p.fail_strategy {
                FailStrategy::FAIL_OPEN => FailurePolicy::FailOpen,
                FailStrategy::FAIL_CLOSE => FailurePolicy::FailClosed,
                FailStrategy::FAIL_RELOAD => FailurePolicy::FailReload,
            } as i32,
            ..Default::default()
        }),
    };
    Some(HttpFilter {
        name,
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(wasm))),
        ..Default::default()
    })
}
