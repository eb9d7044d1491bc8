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
//! `TRELLIS_MODULE_SHA256`, which trellis-proxy verifies (Envoy cannot for local files). Other
//! URLs (http, oci, trellis://) wait for module delivery (issue #5) and are not applied yet.

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
    found.into_iter().filter_map(|(k, p)| Some((rank(p.phase), filter(k, p)?))).collect()
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

fn filter(key: &ResourceKey, p: &WasmPlugin) -> Option<HttpFilter> {
    let path = p.url.strip_prefix("file://")?;
    let name = format!("{}.{}", key.namespace, key.name);
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
                code: Some(AsyncDataSource {
                    specifier: Some(async_data_source::Specifier::Local(DataSource {
                        specifier: Some(data_source::Specifier::Filename(path.to_string())),
                        ..Default::default()
                    })),
                }),
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
