//! Listeners (LDS): an address and what runs on accepted connections — the HTTP connection
//! manager (routes from RDS) or a TCP proxy (one chain, or chains chosen by TLS SNI).

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::listener::v3 as pb;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
use prost::Message;

use super::ConvertError;

pub const HCM: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
const ROUTER: &str = "envoy.filters.http.router";
pub(crate) const FAULT: &str = "envoy.filters.http.fault";
const RBAC: &str = "envoy.filters.http.rbac";

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub kind: ListenerKind,
    pub transport: Transport,
}

/// What a listener accepts: TLS it terminates (mTLS; PeerAuthentication STRICT and PERMISSIVE),
/// plaintext (PERMISSIVE, DISABLE, and every listener without TLS chains), or both — told apart
/// by the first byte.
#[derive(Debug, Clone, PartialEq)]
pub struct Transport {
    pub tls: Option<super::tls::DownstreamTls>,
    pub plaintext: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ListenerKind {
    /// `fault_at`: where Envoy's fault filter sits among the wasm filters (the built-in fault
    /// module runs there); `auth`: where the first RBAC filter sits and the auth module's
    /// stages (one per RBAC filter).
    Http {
        stat_prefix: String,
        route: String,
        filters: Vec<WasmFilterConfig>,
        fault_at: Option<usize>,
        auth: Option<(usize, Vec<serde_json::Value>)>,
    },
    Tcp {
        chains: Vec<TcpChain>,
        sni: bool,
    },
}

/// A TCP proxy chain: for connections whose SNI is one of `server_names` (any when empty),
/// to these clusters by weight. `terminated`: for connections whose TLS the listener
/// terminated (else for the others).
#[derive(Debug, Clone, PartialEq)]
pub struct TcpChain {
    pub terminated: bool,
    pub server_names: Vec<String>,
    pub stat_prefix: String,
    pub clusters: Vec<(String, u32)>,
}

impl ListenerConfig {
    /// The route configuration this listener needs from RDS.
    pub fn route_name(&self) -> Option<&str> {
        match &self.kind {
            ListenerKind::Http { route, .. } => Some(route),
            ListenerKind::Tcp { .. } => None,
        }
    }
}

pub fn convert(l: &pb::Listener) -> Result<ListenerConfig, ConvertError> {
    let what = format!("listener {}", l.name);
    let Some(address::Address::SocketAddress(sa)) = l.address.as_ref().and_then(|a| a.address.as_ref()) else {
        return Err(ConvertError::unsupported(&what, "an address that is not a socket address"));
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return Err(ConvertError::invalid(&what, "no port"));
    };
    let ip: std::net::IpAddr = sa
        .address
        .parse()
        .map_err(|_| ConvertError::invalid(&what, format!("address {:?} is not an IP", sa.address)))?;
    let port = u16::try_from(port).map_err(|_| ConvertError::invalid(&what, format!("port {port}")))?;
    let address = SocketAddr::new(ip, port);
    let mut sni = false;
    for f in &l.listener_filters {
        if f.name != TLS_INSPECTOR {
            return Err(ConvertError::unsupported(&what, format!("listener filter {}", f.name)));
        }
        sni = true;
    }
    if l.filter_chains.is_empty() {
        return Err(ConvertError::invalid(&what, "no filter chains"));
    }
    if l.default_filter_chain.is_some() {
        return Err(ConvertError::unsupported(&what, "default_filter_chain"));
    }
    let mut chains = Vec::new();
    let mut http: Option<Hcm> = None;
    let mut transport = Transport { tls: None, plaintext: false };
    let mut passthrough = false;
    for fc in &l.filter_chains {
        let (server_names, protocol) = match &fc.filter_chain_match {
            Some(m) => {
                let known = pb::FilterChainMatch {
                    server_names: m.server_names.clone(),
                    transport_protocol: m.transport_protocol.clone(),
                    ..Default::default()
                };
                if *m != known {
                    return Err(ConvertError::unsupported(
                        &what,
                        "filter chain match other than server_names and transport_protocol",
                    ));
                }
                (m.server_names.clone(), m.transport_protocol.as_str())
            }
            None => (Vec::new(), ""),
        };
        let tls = fc.transport_socket.as_ref().map(|ts| super::tls::downstream(ts, &what)).transpose()?;
        match (protocol, &tls) {
            ("raw_buffer", Some(_)) => {
                return Err(ConvertError::invalid(&what, "a TLS transport socket on a raw_buffer filter chain"));
            }
            ("tls" | "raw_buffer" | "", _) => {}
            (other, _) => return Err(ConvertError::unsupported(&what, format!("transport_protocol {other:?}"))),
        }
        if tls.is_some() && !server_names.is_empty() {
            return Err(ConvertError::unsupported(&what, "server_names on a chain that terminates TLS"));
        }
        match (&tls, &transport.tls) {
            (Some(t), Some(seen)) if t != seen => {
                return Err(ConvertError::unsupported(&what, "filter chains with different TLS settings"));
            }
            (Some(t), _) => transport.tls = Some(t.clone()),
            (None, _) => {
                transport.plaintext = true;
                passthrough |= protocol == "tls" || !server_names.is_empty();
            }
        }
        let [filter] = fc.filters.as_slice() else {
            return Err(ConvertError::unsupported(&what, "a filter chain with other than one network filter"));
        };
        let Some(ConfigType::TypedConfig(any)) = &filter.config_type else {
            return Err(ConvertError::invalid(&what, format!("filter {} without typed_config", filter.name)));
        };
        match filter.name.as_str() {
            HCM => {
                if !server_names.is_empty() || (protocol == "tls" && tls.is_none()) {
                    return Err(ConvertError::unsupported(&what, "HTTP on a chain for TLS passed through"));
                }
                let hcm = HttpConnectionManager::decode(any.value.as_slice())
                    .map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
                let hcm = http_connection_manager(&hcm, &what)?;
                // Several chains (TLS and plaintext) may share one connection manager.
                match &http {
                    Some(seen) if *seen != hcm => {
                        return Err(ConvertError::unsupported(
                            &what,
                            "HTTP filter chains that differ other than by transport",
                        ));
                    }
                    _ => http = Some(hcm),
                }
            }
            TCP_PROXY => {
                let tp =
                    TcpProxy::decode(any.value.as_slice()).map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
                let clusters = match tp.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) => vec![(c, 1)],
                    Some(ClusterSpecifier::WeightedClusters(w)) => {
                        w.clusters.into_iter().map(|c| (c.name, c.weight)).filter(|(_, w)| *w > 0).collect()
                    }
                    None => return Err(ConvertError::invalid(&what, "tcp_proxy without a cluster")),
                };
                if clusters.is_empty() {
                    return Err(ConvertError::invalid(&what, "tcp_proxy with a total weight of 0"));
                }
                chains.push(TcpChain {
                    terminated: tls.is_some(),
                    server_names,
                    stat_prefix: tp.stat_prefix,
                    clusters,
                });
            }
            other => return Err(ConvertError::unsupported(&what, format!("network filter {other}"))),
        }
    }
    if passthrough && transport.tls.is_some() {
        return Err(ConvertError::unsupported(&what, "TLS passed through and TLS terminated on one listener"));
    }
    let kind = match http {
        Some(Hcm { stat_prefix, route, filters, fault_at, auth }) => {
            if !chains.is_empty() {
                return Err(ConvertError::unsupported(&what, "HTTP and TCP filter chains on one listener"));
            }
            ListenerKind::Http { stat_prefix, route, filters, fault_at, auth }
        }
        None => ListenerKind::Tcp { chains, sni },
    };
    Ok(ListenerConfig { name: l.name.clone(), address, kind, transport })
}

/// A proxy-wasm HTTP filter (Envoy's `envoy.filters.http.wasm`).
#[derive(Debug, Clone, PartialEq)]
pub struct WasmFilterConfig {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    /// A file on this host (`vm_config.code.local.filename`) or inline bytes.
    pub code: WasmCode,
    /// Expected sha256 (hex), from the VM environment variable `TRELLIS_MODULE_SHA256`.
    pub sha256: Option<String>,
    pub configuration: Vec<u8>,
    pub policy: FailPolicy,
}

/// What a failing filter means for requests (Istio's failStrategy, Envoy's failure_policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPolicy {
    /// Skip the filter.
    Open,
    /// 503 for every request from the first failure on, until the configuration changes.
    Closed,
    /// 503 for the failing request; later ones get a fresh VM (after a growing backoff).
    Reload,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WasmCode {
    File(String),
    Inline(Vec<u8>),
    /// A module embedded in trellis-proxy (crate::builtins).
    Builtin(&'static [u8]),
    /// A module fetched over HTTP (Envoy's remote data source), verified by its sha256.
    Remote {
        uri: String,
        sha256: String,
    },
}

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

fn wasm_filter(
    name: &str,
    any: &envoy_types::pb::google::protobuf::Any,
    what: &str,
) -> Result<WasmFilterConfig, ConvertError> {
    use envoy_types::pb::envoy::config::core::v3::{async_data_source, data_source};
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::envoy::extensions::wasm::v3::{FailurePolicy, plugin_config};
    let what = format!("{what}, wasm filter {name}");
    let wasm = Wasm::decode(any.value.as_slice()).map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
    let config = wasm.config.ok_or_else(|| ConvertError::invalid(&what, "no config"))?;
    let Some(plugin_config::Vm::VmConfig(vm)) = config.vm else {
        return Err(ConvertError::unsupported(&what, "a VM other than an inline vm_config"));
    };
    if !matches!(vm.runtime.as_str(), "envoy.wasm.runtime.v8" | "envoy.wasm.runtime.wasmtime" | "") {
        return Err(ConvertError::unsupported(
            &what,
            format!("runtime {} (trellis-proxy runs modules on wasmtime)", vm.runtime),
        ));
    }
    let code = match vm.code.and_then(|c| c.specifier) {
        Some(async_data_source::Specifier::Local(ds)) => match ds.specifier {
            Some(data_source::Specifier::Filename(f)) => WasmCode::File(f),
            Some(data_source::Specifier::InlineBytes(b)) => WasmCode::Inline(b),
            other => return Err(ConvertError::unsupported(&what, format!("module source {other:?}"))),
        },
        Some(async_data_source::Specifier::Remote(r)) => {
            let uri = r.http_uri.map(|u| u.uri).unwrap_or_default();
            if !uri.starts_with("http://") {
                return Err(ConvertError::unsupported(&what, format!("remote module URI {uri:?} (http:// only)")));
            }
            let sha = r.sha256.to_ascii_lowercase();
            if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConvertError::invalid(&what, "a remote module needs its sha256 (64 hex digits)"));
            }
            WasmCode::Remote { uri, sha256: sha }
        }
        None => return Err(ConvertError::invalid(&what, "no module code")),
    };
    let configuration = match config.configuration {
        Some(a) if a.type_url.ends_with("google.protobuf.StringValue") => {
            envoy_types::pb::google::protobuf::StringValue::decode(a.value.as_slice())
                .map_err(|e| ConvertError::invalid(&what, e.to_string()))?
                .value
                .into_bytes()
        }
        Some(a) if a.type_url.ends_with("google.protobuf.BytesValue") => {
            envoy_types::pb::google::protobuf::BytesValue::decode(a.value.as_slice())
                .map_err(|e| ConvertError::invalid(&what, e.to_string()))?
                .value
        }
        Some(a) => return Err(ConvertError::unsupported(&what, format!("configuration of type {}", a.type_url))),
        None => Vec::new(),
    };
    #[allow(deprecated)] // fail_open is Envoy's older switch; both are honoured.
    let policy = if config.fail_open || config.failure_policy == FailurePolicy::FailOpen as i32 {
        FailPolicy::Open
    } else if config.failure_policy == FailurePolicy::FailReload as i32 {
        FailPolicy::Reload
    } else {
        FailPolicy::Closed
    };
    Ok(WasmFilterConfig {
        name: config.name,
        root_id: config.root_id,
        vm_id: vm.vm_id,
        code,
        sha256: vm.environment_variables.and_then(|e| e.key_values.get("TRELLIS_MODULE_SHA256").cloned()),
        configuration,
        policy,
    })
}

/// What an HTTP connection manager runs.
#[derive(PartialEq)]
struct Hcm {
    stat_prefix: String,
    route: String,
    filters: Vec<WasmFilterConfig>,
    fault_at: Option<usize>,
    auth: Option<(usize, Vec<serde_json::Value>)>,
}

fn http_connection_manager(hcm: &HttpConnectionManager, what: &str) -> Result<Hcm, ConvertError> {
    let route = match &hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => rds.route_config_name.clone(),
        _ => return Err(ConvertError::unsupported(what, "routes other than by RDS")),
    };
    let mut saw_router = false;
    let mut filters = Vec::new();
    let mut fault_at = None;
    let mut auth: Option<(usize, Vec<serde_json::Value>)> = None;
    for f in &hcm.http_filters {
        if let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type
            && any.type_url == WASM_TYPE
        {
            filters.push(wasm_filter(&f.name, any, what)?);
            continue;
        }
        match f.name.as_str() {
            ROUTER => saw_router = true,
            FAULT => {
                // Runs as the built-in fault module, configured per route (route.rs); a
                // listener-wide fault config is not supported.
                if let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type {
                    let fault = HttpFault::decode(any.value.as_slice())
                        .map_err(|e| ConvertError::invalid(what, e.to_string()))?;
                    if fault != HttpFault::default() {
                        return Err(ConvertError::unsupported(
                            what,
                            "a listener-wide fault filter config (only per-route fault configs)",
                        ));
                    }
                }
                fault_at = Some(filters.len());
            }
            RBAC => {
                let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    return Err(ConvertError::invalid(what, "an RBAC filter without a typed config"));
                };
                if let Some(stage) = super::builtin::rbac(any, what)? {
                    auth.get_or_insert_with(|| (filters.len(), Vec::new())).1.push(stage);
                }
            }
            other => {
                return Err(ConvertError::unsupported(
                    what,
                    format!("HTTP filter {other} (trellis-proxy runs the router, fault, RBAC and wasm filters)"),
                ));
            }
        }
    }
    if !saw_router {
        return Err(ConvertError::invalid(what, "no router filter"));
    }
    Ok(Hcm { stat_prefix: hcm.stat_prefix.clone(), route, filters, fault_at, auth })
}
