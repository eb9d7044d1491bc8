//! Typed `spec`s of every kind, field for field after istio/api (camelCase JSON names, enums as
//! their proto names). Deserializing into these structs is the first validation step: unknown
//! fields, wrong types and unknown enum values are rejected with the field path.
//!
//! Fields that exist in Istio's API but that Trellis does not implement are typed
//! [`Unsupported`]: present, they are refused with an error that names them (see
//! docs/support-matrix.md), so nothing a user writes is silently ignored.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::Value;

/// Declares an Istio message: every field optional with a default, unknown fields refused.
macro_rules! message {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty,)* }
    };
}

/// Declares an Istio enum (proto names, default = first variant).
macro_rules! istio_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $first:ident, $($variant:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        pub enum $name { #[default] $first, $($variant,)* }
    };
}

/// A field of Istio's API that Trellis refuses. Deserializing any value fails with a message
/// that says so; absent (or null) it is `None` and harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported;

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: Deserializer<'de>>(_deserializer: D) -> Result<Self, D::Error> {
        Err(de::Error::custom(
            "this Istio field is not supported by Trellis and is refused rather than ignored (see docs/support-matrix.md)",
        ))
    }
}

/// A `google.protobuf.Duration` as a string. Protobuf JSON writes "10s" / "1.5s"; Istio's
/// CRD validation (CEL `duration()`) also takes Go forms such as "3m", which Istio's own docs
/// use, so both are accepted. Checked by the validator so the error can say which rule failed.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DurationStr(pub String);

impl fmt::Debug for DurationStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

pub type Labels = BTreeMap<String, String>;

// ===== networking.istio.io =====

message! {
    pub struct VirtualService {
        pub hosts: Vec<String>,
        pub gateways: Vec<String>,
        pub http: Vec<HttpRoute>,
        pub tls: Vec<TlsRoute>,
        pub tcp: Vec<TcpRoute>,
        pub export_to: Vec<String>,
    }
}

message! {
    pub struct HttpRoute {
        pub name: String,
        #[serde(rename = "match")]
        pub matches: Vec<HttpMatchRequest>,
        pub route: Vec<HttpRouteDestination>,
        pub redirect: Option<HttpRedirect>,
        pub direct_response: Option<HttpDirectResponse>,
        pub delegate: Option<Unsupported>,
        pub rewrite: Option<HttpRewrite>,
        pub timeout: Option<DurationStr>,
        pub retries: Option<HttpRetry>,
        pub fault: Option<HttpFaultInjection>,
        pub mirror: Option<Destination>,
        pub mirrors: Vec<HttpMirrorPolicy>,
        pub mirror_percentage: Option<Percent>,
        pub mirror_percent: Option<Unsupported>,
        pub cors_policy: Option<Unsupported>,
        pub headers: Option<Headers>,
    }
}

message! {
    pub struct HttpMatchRequest {
        pub name: String,
        pub uri: Option<StringMatch>,
        pub scheme: Option<StringMatch>,
        pub method: Option<StringMatch>,
        pub authority: Option<StringMatch>,
        pub headers: BTreeMap<String, StringMatch>,
        pub port: Option<u32>,
        pub source_labels: Labels,
        pub gateways: Vec<String>,
        pub query_params: BTreeMap<String, StringMatch>,
        pub ignore_uri_case: bool,
        pub without_headers: BTreeMap<String, StringMatch>,
        pub source_namespace: String,
        pub stat_prefix: Option<Unsupported>,
    }
}

message! {
    /// One of `exact`, `prefix`, `regex` (RE2 syntax).
    pub struct StringMatch {
        pub exact: Option<String>,
        pub prefix: Option<String>,
        pub regex: Option<String>,
    }
}

message! {
    pub struct HttpRouteDestination {
        pub destination: Option<Destination>,
        pub weight: i64,
        pub headers: Option<Headers>,
    }
}

message! {
    pub struct RouteDestination {
        pub destination: Option<Destination>,
        pub weight: i64,
    }
}

message! {
    pub struct Destination {
        pub host: String,
        pub subset: String,
        pub port: Option<PortSelector>,
    }
}

message! {
    pub struct PortSelector {
        pub number: u32,
    }
}

message! {
    pub struct Headers {
        pub request: Option<HeaderOperations>,
        pub response: Option<HeaderOperations>,
    }
}

message! {
    pub struct HeaderOperations {
        pub set: BTreeMap<String, String>,
        pub add: BTreeMap<String, String>,
        pub remove: Vec<String>,
    }
}

istio_enum! {
    pub enum RedirectPortSelection { FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT, }
}

message! {
    pub struct HttpRedirect {
        pub uri: String,
        pub prefix_rewrite: String,
        pub authority: String,
        pub port: Option<u32>,
        pub derive_port: Option<RedirectPortSelection>,
        pub scheme: String,
        pub redirect_code: Option<u32>,
    }
}

message! {
    pub struct HttpDirectResponse {
        pub status: u32,
        pub body: Option<HttpBody>,
    }
}

message! {
    /// One of `string` or `bytes` (base64).
    pub struct HttpBody {
        pub string: Option<String>,
        pub bytes: Option<String>,
    }
}

message! {
    pub struct HttpRewrite {
        pub uri: String,
        pub authority: String,
        pub uri_regex_rewrite: Option<RegexRewrite>,
    }
}

message! {
    pub struct RegexRewrite {
        #[serde(rename = "match")]
        pub pattern: String,
        pub rewrite: String,
    }
}

message! {
    pub struct HttpRetry {
        pub attempts: i64,
        pub per_try_timeout: Option<DurationStr>,
        pub retry_on: String,
        pub retry_remote_localities: Option<bool>,
        pub retry_ignore_previous_hosts: Option<bool>,
        pub backoff: Option<DurationStr>,
    }
}

message! {
    pub struct HttpFaultInjection {
        pub delay: Option<FaultDelay>,
        pub abort: Option<FaultAbort>,
    }
}

message! {
    pub struct FaultDelay {
        pub fixed_delay: Option<DurationStr>,
        pub exponential_delay: Option<Unsupported>,
        pub percentage: Option<Percent>,
        pub percent: Option<Unsupported>,
    }
}

message! {
    /// One of `httpStatus`, `grpcStatus`, `http2Error`.
    pub struct FaultAbort {
        pub http_status: Option<i64>,
        pub grpc_status: Option<String>,
        pub http2_error: Option<Unsupported>,
        pub percentage: Option<Percent>,
    }
}

message! {
    pub struct Percent {
        pub value: f64,
    }
}

message! {
    pub struct HttpMirrorPolicy {
        pub destination: Option<Destination>,
        pub percentage: Option<Percent>,
    }
}

message! {
    pub struct TlsRoute {
        #[serde(rename = "match")]
        pub matches: Vec<TlsMatchAttributes>,
        pub route: Vec<RouteDestination>,
    }
}

message! {
    pub struct TlsMatchAttributes {
        pub sni_hosts: Vec<String>,
        pub destination_subnets: Vec<String>,
        pub port: Option<u32>,
        pub source_labels: Labels,
        pub gateways: Vec<String>,
        pub source_namespace: String,
    }
}

message! {
    pub struct TcpRoute {
        #[serde(rename = "match")]
        pub matches: Vec<L4MatchAttributes>,
        pub route: Vec<RouteDestination>,
    }
}

message! {
    pub struct L4MatchAttributes {
        pub destination_subnets: Vec<String>,
        pub port: Option<u32>,
        pub source_subnet: Option<Unsupported>,
        pub source_labels: Labels,
        pub gateways: Vec<String>,
        pub source_namespace: String,
    }
}

message! {
    pub struct DestinationRule {
        pub host: String,
        pub traffic_policy: Option<TrafficPolicy>,
        pub subsets: Vec<Subset>,
        pub export_to: Vec<String>,
        pub workload_selector: Option<WorkloadSelector>,
    }
}

message! {
    pub struct TrafficPolicy {
        pub load_balancer: Option<LoadBalancerSettings>,
        pub connection_pool: Option<ConnectionPoolSettings>,
        pub outlier_detection: Option<OutlierDetection>,
        pub tls: Option<ClientTlsSettings>,
        pub port_level_settings: Vec<PortTrafficPolicy>,
        pub tunnel: Option<Unsupported>,
        pub proxy_protocol: Option<Unsupported>,
        pub retry_budget: Option<Unsupported>,
    }
}

message! {
    pub struct PortTrafficPolicy {
        pub port: Option<PortSelector>,
        pub load_balancer: Option<LoadBalancerSettings>,
        pub connection_pool: Option<ConnectionPoolSettings>,
        pub outlier_detection: Option<OutlierDetection>,
        pub tls: Option<ClientTlsSettings>,
    }
}

message! {
    pub struct Subset {
        pub name: String,
        pub labels: Labels,
        pub traffic_policy: Option<TrafficPolicy>,
    }
}

istio_enum! {
    pub enum SimpleLb { UNSPECIFIED, LEAST_CONN, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST, }
}

message! {
    pub struct LoadBalancerSettings {
        pub simple: Option<SimpleLb>,
        pub consistent_hash: Option<ConsistentHashLb>,
        pub locality_lb_setting: Option<LocalityLbSetting>,
        pub warmup_duration_secs: Option<Unsupported>,
        pub warmup: Option<Unsupported>,
        pub zone_aware_lb_setting: Option<Unsupported>,
    }
}

message! {
    /// Hash key: one of `httpHeaderName`, `httpCookie`, `useSourceIp`, `httpQueryParameterName`.
    pub struct ConsistentHashLb {
        pub http_header_name: Option<String>,
        pub http_cookie: Option<HttpCookie>,
        pub use_source_ip: Option<bool>,
        pub http_query_parameter_name: Option<String>,
        pub ring_hash: Option<RingHash>,
        pub maglev: Option<Maglev>,
        pub minimum_ring_size: Option<u64>,
    }
}

message! {
    pub struct HttpCookie {
        pub name: String,
        pub path: String,
        pub ttl: Option<DurationStr>,
        pub attributes: Vec<CookieAttribute>,
    }
}

message! {
    pub struct CookieAttribute {
        pub name: String,
        pub value: String,
    }
}

message! {
    pub struct RingHash {
        pub minimum_ring_size: u64,
    }
}

message! {
    pub struct Maglev {
        pub table_size: u64,
    }
}

message! {
    pub struct LocalityLbSetting {
        pub distribute: Vec<LocalityDistribute>,
        pub failover: Vec<LocalityFailover>,
        pub failover_priority: Vec<String>,
        pub enabled: Option<bool>,
    }
}

message! {
    pub struct LocalityDistribute {
        pub from: String,
        pub to: BTreeMap<String, u32>,
    }
}

message! {
    pub struct LocalityFailover {
        pub from: String,
        pub to: String,
    }
}

message! {
    pub struct ConnectionPoolSettings {
        pub tcp: Option<TcpSettings>,
        pub http: Option<HttpSettings>,
    }
}

message! {
    pub struct TcpSettings {
        pub max_connections: Option<i64>,
        pub connect_timeout: Option<DurationStr>,
        pub tcp_keepalive: Option<Unsupported>,
        pub max_connection_duration: Option<Unsupported>,
        pub idle_timeout: Option<DurationStr>,
    }
}

message! {
    pub struct HttpSettings {
        pub http1_max_pending_requests: Option<i64>,
        pub http2_max_requests: Option<i64>,
        pub max_requests_per_connection: Option<i64>,
        pub max_retries: Option<i64>,
        pub idle_timeout: Option<DurationStr>,
        pub h2_upgrade_policy: Option<Unsupported>,
        pub use_client_protocol: Option<Unsupported>,
        pub max_concurrent_streams: Option<Unsupported>,
        pub http2_keep_alive: Option<Unsupported>,
    }
}

message! {
    pub struct OutlierDetection {
        pub split_external_local_origin_errors: Option<Unsupported>,
        pub consecutive_local_origin_failures: Option<Unsupported>,
        pub consecutive_gateway_errors: Option<i64>,
        #[serde(rename = "consecutive5xxErrors")]
        pub consecutive_5xx_errors: Option<i64>,
        pub interval: Option<DurationStr>,
        pub base_ejection_time: Option<DurationStr>,
        pub max_ejection_percent: Option<i64>,
        pub min_health_percent: Option<i64>,
        pub consecutive_errors: Option<Unsupported>,
        pub outlier_detection_http_error_codes: Option<Unsupported>,
    }
}

istio_enum! {
    pub enum ClientTlsMode { DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL, }
}

message! {
    pub struct ClientTlsSettings {
        pub mode: ClientTlsMode,
        pub client_certificate: String,
        pub private_key: String,
        pub ca_certificates: String,
        pub credential_name: String,
        pub subject_alt_names: Vec<String>,
        pub sni: String,
        pub insecure_skip_verify: Option<bool>,
        pub ca_crl: Option<Unsupported>,
    }
}

message! {
    pub struct WorkloadSelector {
        pub labels: Labels,
    }
}

message! {
    pub struct Gateway {
        pub servers: Vec<Server>,
        pub selector: Labels,
    }
}

message! {
    pub struct Server {
        pub port: Option<Port>,
        pub bind: String,
        pub hosts: Vec<String>,
        pub tls: Option<ServerTlsSettings>,
        pub default_endpoint: Option<Unsupported>,
        pub name: String,
    }
}

message! {
    pub struct Port {
        pub number: u32,
        pub protocol: String,
        pub name: String,
        pub target_port: Option<u32>,
    }
}

istio_enum! {
    pub enum ServerTlsMode { PASSTHROUGH, SIMPLE, MUTUAL, AUTO_PASSTHROUGH, ISTIO_MUTUAL, OPTIONAL_MUTUAL, }
}

istio_enum! {
    pub enum TlsProtocol { TLS_AUTO, TLSV1_0, TLSV1_1, TLSV1_2, TLSV1_3, }
}

message! {
    pub struct ServerTlsSettings {
        pub https_redirect: bool,
        pub mode: ServerTlsMode,
        pub server_certificate: String,
        pub private_key: String,
        pub ca_certificates: String,
        pub ca_crl: Option<Unsupported>,
        pub credential_name: String,
        pub credential_names: Option<Unsupported>,
        pub tls_certificates: Option<Unsupported>,
        pub subject_alt_names: Vec<String>,
        pub verify_certificate_spki: Option<Unsupported>,
        pub verify_certificate_hash: Option<Unsupported>,
        pub min_protocol_version: Option<TlsProtocol>,
        pub max_protocol_version: Option<TlsProtocol>,
        pub cipher_suites: Option<Unsupported>,
        pub ca_cert_credential_name: String,
        pub insecure_skip_verify: Option<Unsupported>,
    }
}

istio_enum! {
    pub enum ServiceEntryLocation { MESH_EXTERNAL, MESH_INTERNAL, }
}

istio_enum! {
    pub enum ServiceEntryResolution { NONE, STATIC, DNS, DNS_ROUND_ROBIN, DYNAMIC_DNS, }
}

message! {
    pub struct ServiceEntry {
        pub hosts: Vec<String>,
        pub addresses: Vec<String>,
        pub ports: Vec<ServicePort>,
        pub location: ServiceEntryLocation,
        pub resolution: ServiceEntryResolution,
        pub endpoints: Vec<WorkloadEntry>,
        pub workload_selector: Option<WorkloadSelector>,
        pub export_to: Vec<String>,
        pub subject_alt_names: Vec<String>,
    }
}

message! {
    pub struct ServicePort {
        pub number: u32,
        pub protocol: String,
        pub name: String,
        pub target_port: Option<u32>,
    }
}

message! {
    pub struct WorkloadEntry {
        pub address: String,
        pub ports: BTreeMap<String, u32>,
        pub labels: Labels,
        pub network: String,
        pub locality: String,
        pub weight: Option<u32>,
        pub service_account: String,
    }
}

istio_enum! {
    pub enum CaptureMode { DEFAULT, IPTABLES, NONE, }
}

istio_enum! {
    pub enum OutboundTrafficMode { REGISTRY_ONLY, ALLOW_ANY, }
}

message! {
    pub struct Sidecar {
        pub workload_selector: Option<WorkloadSelector>,
        pub ingress: Vec<IstioIngressListener>,
        pub egress: Vec<IstioEgressListener>,
        pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
        pub inbound_connection_pool: Option<Unsupported>,
    }
}

message! {
    pub struct IstioIngressListener {
        pub port: Option<SidecarPort>,
        pub bind: String,
        pub capture_mode: Option<Unsupported>,
        pub default_endpoint: String,
        pub tls: Option<Unsupported>,
        pub connection_pool: Option<Unsupported>,
    }
}

message! {
    pub struct IstioEgressListener {
        pub port: Option<SidecarPort>,
        pub bind: String,
        pub capture_mode: Option<Unsupported>,
        pub hosts: Vec<String>,
    }
}

message! {
    pub struct SidecarPort {
        pub number: u32,
        pub protocol: String,
        pub name: String,
        pub target_port: Option<u32>,
    }
}

message! {
    pub struct OutboundTrafficPolicy {
        pub mode: OutboundTrafficMode,
        pub egress_proxy: Option<Unsupported>,
    }
}

// ===== security.istio.io =====

istio_enum! {
    pub enum MtlsMode { UNSET, DISABLE, PERMISSIVE, STRICT, }
}

message! {
    pub struct PeerAuthentication {
        pub selector: Option<WorkloadSelectorMatch>,
        pub mtls: Option<Mtls>,
        pub port_level_mtls: BTreeMap<String, Mtls>,
    }
}

message! {
    /// `istio.type.v1beta1.WorkloadSelector`: `matchLabels`.
    pub struct WorkloadSelectorMatch {
        pub match_labels: Labels,
    }
}

message! {
    pub struct Mtls {
        pub mode: MtlsMode,
    }
}

istio_enum! {
    pub enum AuthorizationAction { ALLOW, DENY, AUDIT, CUSTOM, }
}

message! {
    pub struct AuthorizationPolicy {
        pub selector: Option<WorkloadSelectorMatch>,
        pub target_ref: Option<Unsupported>,
        pub target_refs: Option<Unsupported>,
        pub rules: Vec<Rule>,
        pub action: AuthorizationAction,
        pub provider: Option<Unsupported>,
    }
}

message! {
    pub struct Rule {
        pub from: Vec<RuleFrom>,
        pub to: Vec<RuleTo>,
        pub when: Vec<Condition>,
    }
}

message! {
    pub struct RuleFrom {
        pub source: Option<Source>,
    }
}

message! {
    pub struct RuleTo {
        pub operation: Option<Operation>,
    }
}

message! {
    pub struct Source {
        pub principals: Vec<String>,
        pub not_principals: Vec<String>,
        pub request_principals: Vec<String>,
        pub not_request_principals: Vec<String>,
        pub namespaces: Vec<String>,
        pub not_namespaces: Vec<String>,
        pub service_accounts: Vec<String>,
        pub not_service_accounts: Vec<String>,
        pub ip_blocks: Vec<String>,
        pub not_ip_blocks: Vec<String>,
        pub remote_ip_blocks: Vec<String>,
        pub not_remote_ip_blocks: Vec<String>,
        pub trust_domains: Vec<String>,
        pub not_trust_domains: Vec<String>,
    }
}

message! {
    pub struct Operation {
        pub hosts: Vec<String>,
        pub not_hosts: Vec<String>,
        pub ports: Vec<String>,
        pub not_ports: Vec<String>,
        pub methods: Vec<String>,
        pub not_methods: Vec<String>,
        pub paths: Vec<String>,
        pub not_paths: Vec<String>,
    }
}

message! {
    pub struct Condition {
        pub key: String,
        pub values: Vec<String>,
        pub not_values: Vec<String>,
    }
}

message! {
    pub struct RequestAuthentication {
        pub selector: Option<WorkloadSelectorMatch>,
        pub target_ref: Option<Unsupported>,
        pub target_refs: Option<Unsupported>,
        pub jwt_rules: Vec<JwtRule>,
    }
}

message! {
    pub struct JwtRule {
        pub issuer: String,
        pub audiences: Vec<String>,
        pub jwks_uri: String,
        pub jwks: String,
        pub from_headers: Vec<JwtHeader>,
        pub from_params: Vec<String>,
        pub output_payload_to_header: String,
        pub forward_original_token: bool,
        pub output_claim_to_headers: Vec<ClaimToHeader>,
        pub from_cookies: Vec<String>,
        pub timeout: Option<DurationStr>,
        pub space_delimited_claims: Vec<String>,
    }
}

message! {
    pub struct JwtHeader {
        pub name: String,
        pub prefix: String,
    }
}

message! {
    pub struct ClaimToHeader {
        pub header: String,
        pub claim: String,
    }
}

// ===== telemetry.istio.io =====

istio_enum! {
    pub enum WorkloadMode { CLIENT_AND_SERVER, CLIENT, SERVER, }
}

message! {
    pub struct Telemetry {
        pub selector: Option<WorkloadSelectorMatch>,
        pub target_ref: Option<Unsupported>,
        pub target_refs: Option<Unsupported>,
        pub tracing: Vec<Tracing>,
        pub metrics: Vec<Metrics>,
        pub access_logging: Vec<AccessLogging>,
    }
}

message! {
    pub struct ProviderRef {
        pub name: String,
    }
}

message! {
    pub struct TracingSelector {
        pub mode: WorkloadMode,
    }
}

message! {
    pub struct Tracing {
        #[serde(rename = "match")]
        pub matches: Option<TracingSelector>,
        pub providers: Vec<ProviderRef>,
        pub random_sampling_percentage: Option<f64>,
        pub disable_span_reporting: Option<bool>,
        pub custom_tags: Option<Unsupported>,
        pub use_request_id_for_trace_sampling: Option<bool>,
        pub enable_istio_tags: Option<bool>,
        pub disable_context_propagation: Option<bool>,
    }
}

message! {
    pub struct Metrics {
        pub providers: Vec<ProviderRef>,
        pub overrides: Vec<MetricsOverrides>,
        pub reporting_interval: Option<DurationStr>,
    }
}

istio_enum! {
    pub enum IstioMetric {
        ALL_METRICS, REQUEST_COUNT, REQUEST_DURATION, REQUEST_SIZE, RESPONSE_SIZE,
        TCP_OPENED_CONNECTIONS, TCP_CLOSED_CONNECTIONS, TCP_SENT_BYTES, TCP_RECEIVED_BYTES,
        GRPC_REQUEST_MESSAGES, GRPC_RESPONSE_MESSAGES,
    }
}

message! {
    pub struct MetricSelector {
        pub metric: Option<IstioMetric>,
        pub custom_metric: Option<Unsupported>,
        pub mode: WorkloadMode,
    }
}

istio_enum! {
    pub enum TagOperation { UPSERT, REMOVE, }
}

message! {
    pub struct TagOverride {
        pub operation: TagOperation,
        pub value: String,
    }
}

message! {
    pub struct MetricsOverrides {
        #[serde(rename = "match")]
        pub matches: Option<MetricSelector>,
        pub disabled: Option<bool>,
        pub tag_overrides: BTreeMap<String, TagOverride>,
    }
}

message! {
    pub struct AccessLogging {
        #[serde(rename = "match")]
        pub matches: Option<TracingSelector>,
        pub providers: Vec<ProviderRef>,
        pub disabled: Option<bool>,
        pub filter: Option<AccessLogFilter>,
    }
}

message! {
    pub struct AccessLogFilter {
        pub expression: String,
    }
}

// ===== extensions.istio.io =====

istio_enum! {
    pub enum PluginPhase { UNSPECIFIED_PHASE, AUTHN, AUTHZ, STATS, }
}

istio_enum! {
    pub enum PullPolicy { UNSPECIFIED_POLICY, IfNotPresent, Always, }
}

istio_enum! {
    pub enum PluginType { UNSPECIFIED_PLUGIN_TYPE, HTTP, NETWORK, }
}

istio_enum! {
    pub enum FailStrategy { FAIL_CLOSE, FAIL_OPEN, FAIL_RELOAD, }
}

istio_enum! {
    pub enum EnvValueSource { INLINE, HOST, }
}

message! {
    pub struct WasmPlugin {
        pub selector: Option<WorkloadSelectorMatch>,
        pub target_ref: Option<Unsupported>,
        pub target_refs: Option<Unsupported>,
        pub url: String,
        pub sha256: String,
        pub image_pull_policy: Option<PullPolicy>,
        pub image_pull_secret: Option<Unsupported>,
        pub verification_key: Option<Unsupported>,
        pub plugin_config: Option<serde_json::Map<String, Value>>,
        pub plugin_name: String,
        pub phase: PluginPhase,
        pub priority: Option<i64>,
        pub vm_config: Option<VmConfig>,
        #[serde(rename = "match")]
        pub matches: Vec<WasmPluginTrafficSelector>,
        #[serde(rename = "type")]
        pub plugin_type: PluginType,
        pub fail_strategy: FailStrategy,
    }
}

message! {
    pub struct VmConfig {
        pub env: Vec<EnvVar>,
    }
}

message! {
    pub struct EnvVar {
        pub name: String,
        pub value_from: EnvValueSource,
        pub value: String,
    }
}

istio_enum! {
    pub enum WasmWorkloadMode { UNDEFINED, CLIENT, SERVER, CLIENT_AND_SERVER, }
}

message! {
    pub struct WasmPluginTrafficSelector {
        pub mode: WasmWorkloadMode,
        pub ports: Vec<PortSelector>,
    }
}

// ===== trellis.dev =====

istio_enum! {
    pub enum DiscoveryType { Static, Kubernetes, }
}

message! {
    /// A member cluster of the mesh (cluster-scoped, `trellis.dev/v1alpha1`).
    pub struct MeshCluster {
        pub network: String,
        pub locality: Option<Locality>,
        pub east_west_gateway: Option<EastWestGateway>,
        pub discovery: Option<Discovery>,
    }
}

message! {
    pub struct Locality {
        pub region: String,
        pub zone: String,
        pub subzone: String,
    }
}

message! {
    pub struct EastWestGateway {
        pub address: String,
        pub port: Option<u32>,
    }
}

message! {
    pub struct Discovery {
        #[serde(rename = "type")]
        pub discovery_type: DiscoveryType,
        /// For `Kubernetes`: the path of a kubeconfig the control plane reads.
        pub kubeconfig: String,
    }
}

istio_enum! {
    /// What an API token may do.
    pub enum TokenRole { Viewer, Editor, Admin, }
}

message! {
    /// A credential for the config API (cluster-scoped, `trellis.dev/v1alpha1`). Only the
    /// SHA-256 of the secret is stored; the secret is shown once, when created. Deleting the
    /// ApiToken revokes it.
    pub struct ApiToken {
        /// `Viewer`: read only. `Editor`: read and write configuration. `Admin`: everything,
        /// including ApiTokens and cluster-scoped kinds.
        pub role: Option<TokenRole>,
        /// If set, the token only reaches namespaced resources in these namespaces.
        pub namespaces: Vec<String>,
        /// Lower-case hex SHA-256 of the secret.
        pub sha256: String,
        pub description: String,
    }
}

message! {
    /// A workload's bootstrap credential (namespaced, `trellis.dev/v1alpha1`): whoever holds the
    /// secret may get certificates for one service account of the token's namespace from the
    /// mesh CA, nothing else. Only the SHA-256 of the secret is stored; deleting the token
    /// revokes it (certificates already issued live out their short lifetime).
    pub struct WorkloadToken {
        /// The service account (in the token's namespace) whose identity the holder gets.
        pub service_account: String,
        /// Lower-case hex SHA-256 of the secret.
        pub sha256: String,
        pub description: String,
    }
}

/// A parsed spec of any kind. Built once per resource, so variant sizes do not matter.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Spec {
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    Gateway(Gateway),
    ServiceEntry(ServiceEntry),
    WorkloadEntry(WorkloadEntry),
    Sidecar(Sidecar),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    RequestAuthentication(RequestAuthentication),
    Telemetry(Telemetry),
    WasmPlugin(WasmPlugin),
    MeshCluster(MeshCluster),
    ApiToken(ApiToken),
    WorkloadToken(WorkloadToken),
}
