//! LDS: the outbound listener (an explicit HTTP proxy, routed by Host — any application can
//! use it with `http_proxy` or by connecting to it, no traffic capture needed) and the inbound
//! listener (to the local application). Both run the HTTP connection manager with routes from
//! RDS and the HTTP filter chain: fault, then router.

use envoy_types::pb::envoy::config::core::v3::{AggregatedConfigSource, ApiVersion, ConfigSource, config_source};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    CodecType, RouteSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_filter,
};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

use super::clusters::socket;
use super::routes::FAULT_FILTER;
use super::{INBOUND_ROUTE, OUTBOUND_ROUTE, Scope, Translated};

pub const OUTBOUND_LISTENER: &str = "outbound";
pub const INBOUND_LISTENER: &str = "inbound";
const HCM: &str = "envoy.filters.network.http_connection_manager";

fn http_filters() -> Vec<HttpFilter> {
    vec![
        HttpFilter {
            name: FAULT_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(HttpFault::default()))),
            ..Default::default()
        },
        HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        },
    ]
}

fn listener(name: &str, (ip, port): &(String, u32), route: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
                resource_api_version: ApiVersion::V3 as i32,
                ..Default::default()
            }),
            route_config_name: route.to_string(),
        })),
        http_filters: http_filters(),
        use_remote_address: Some(BoolValue { value: false }),
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        address: Some(socket(ip, *port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM.into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub(crate) fn outbound(scope: &Scope<'_>, out: &mut Translated) {
    out.listeners
        .insert(OUTBOUND_LISTENER.into(), listener(OUTBOUND_LISTENER, &scope.proxy.outbound_listener, OUTBOUND_ROUTE));
}

pub(crate) fn inbound(scope: &Scope<'_>, out: &mut Translated) {
    out.listeners
        .insert(INBOUND_LISTENER.into(), listener(INBOUND_LISTENER, &scope.proxy.inbound_listener, INBOUND_ROUTE));
}
