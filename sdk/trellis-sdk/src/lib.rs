//! trellis-sdk: write Trellis filters in idiomatic Rust on top of the upstream `proxy-wasm`
//! crate (whose ABI every proxy-wasm host speaks, so a filter written with it runs in
//! trellis-proxy and in Envoy).
//!
//! ```ignore
//! use serde::Deserialize;
//! use trellis_sdk::{Decision, Filter, LocalReply, Request, Response};
//!
//! #[derive(Clone, Default, Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { header: String }
//!
//! struct Stamp { header: String }
//!
//! impl Filter for Stamp {
//!     type Config = Config;
//!     fn new(config: &Config) -> Self { Stamp { header: config.header.clone() } }
//!     fn on_request(&mut self, req: &mut Request) -> Decision {
//!         if req.path().starts_with("/admin") {
//!             return Decision::Reply(LocalReply::new(403).body("no"));
//!         }
//!         req.set_header(&self.header, "1");
//!         Decision::Continue
//!     }
//! }
//!
//! trellis_sdk::register!(Stamp);
//! ```
//!
//! - **Typed configuration**: the plugin's JSON configuration is deserialized into
//!   `Filter::Config`; a bad one is logged with serde's message (which names the field) and
//!   refused, so the host reports it (trellis-proxy NACKs the plugin with it).
//! - **Views**: [`Request`] and [`Response`] read and change headers of the current stream;
//!   [`Request::property`] reads Envoy's standard attributes; identity and route helpers.
//! - **Local replies**: [`LocalReply`] with status, headers and body (or a gRPC status).
//! - **Metrics**: [`Counter`], [`Gauge`].

use std::marker::PhantomData;

pub use proxy_wasm;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
pub use proxy_wasm::types::GrpcStatusCode;
use proxy_wasm::types::{Action, ContextType, MapType, MetricType};
use serde::de::DeserializeOwned;

/// A filter: made once per stream from the plugin's configuration.
pub trait Filter: Sized + 'static {
    type Config: DeserializeOwned + Clone + Default + 'static;

    fn new(config: &Self::Config) -> Self;

    /// Request headers arrived.
    fn on_request(&mut self, _request: &mut Request) -> Decision {
        Decision::Continue
    }

    /// Response headers arrived.
    fn on_response(&mut self, _response: &mut Response) -> Decision {
        Decision::Continue
    }
}

/// What a filter decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Continue,
    /// Answer now; the request goes no further.
    Reply(LocalReply),
}

/// A reply from the filter itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// A gRPC reply: HTTP 200 with this status (the body is the status message).
    pub grpc_status: Option<GrpcStatusCode>,
}

impl LocalReply {
    pub fn new(status: u32) -> LocalReply {
        LocalReply { status, headers: Vec::new(), body: Vec::new(), grpc_status: None }
    }

    pub fn header(mut self, name: &str, value: &str) -> LocalReply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> LocalReply {
        self.body = body.into();
        self
    }

    /// A gRPC reply: HTTP 200 with this `grpc-status` and message.
    pub fn grpc(status: GrpcStatusCode, message: &str) -> LocalReply {
        LocalReply { status: 200, headers: Vec::new(), body: message.as_bytes().to_vec(), grpc_status: Some(status) }
    }
}

fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value(map, name).ok().flatten()
}

fn set_header(map: MapType, name: &str, value: Option<&str>) {
    let _ = hostcalls::set_map_value(map, name, value);
}

/// Reads a property (Envoy's attribute path, e.g. `["source", "principal"]`).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

fn property_string(path: &[&str]) -> Option<String> {
    property(path).map(|b| String::from_utf8_lossy(&b).into_owned()).filter(|s| !s.is_empty())
}

/// The request of the current stream.
#[derive(Debug)]
pub struct Request {
    _private: (),
}

impl Request {
    pub fn header(&self, name: &str) -> Option<String> {
        header(MapType::HttpRequestHeaders, name)
    }

    pub fn set_header(&mut self, name: &str, value: &str) {
        set_header(MapType::HttpRequestHeaders, name, Some(value));
    }

    pub fn add_header(&mut self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value);
    }

    pub fn remove_header(&mut self, name: &str) {
        set_header(MapType::HttpRequestHeaders, name, None);
    }

    pub fn headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
    }

    pub fn method(&self) -> String {
        self.header(":method").unwrap_or_default()
    }

    /// The path with its query.
    pub fn path(&self) -> String {
        self.header(":path").unwrap_or_default()
    }

    pub fn authority(&self) -> String {
        self.header(":authority").or_else(|| self.header("host")).unwrap_or_default()
    }

    /// The peer's identity (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA`) when it came over mTLS.
    pub fn peer_principal(&self) -> Option<String> {
        property_string(&["source", "principal"])
            .or_else(|| property_string(&["connection", "uri_san_peer_certificate"]))
    }

    /// The peer's namespace, from its SPIFFE identity.
    pub fn peer_namespace(&self) -> Option<String> {
        let p = self.peer_principal()?;
        let mut parts = p.split('/');
        parts.by_ref().find(|s| *s == "ns")?;
        parts.next().map(String::from)
    }

    /// The route the request matched (Envoy's `route_name`).
    pub fn route_name(&self) -> Option<String> {
        property_string(&["route_name"])
    }

    /// The upstream cluster chosen (Envoy's `cluster_name`).
    pub fn cluster_name(&self) -> Option<String> {
        property_string(&["cluster_name"])
    }

    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        property(path)
    }
}

/// The response of the current stream.
#[derive(Debug)]
pub struct Response {
    _private: (),
}

impl Response {
    pub fn status(&self) -> u16 {
        header(MapType::HttpResponseHeaders, ":status").and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        header(MapType::HttpResponseHeaders, name)
    }

    pub fn set_header(&mut self, name: &str, value: &str) {
        set_header(MapType::HttpResponseHeaders, name, Some(value));
    }

    pub fn remove_header(&mut self, name: &str) {
        set_header(MapType::HttpResponseHeaders, name, None);
    }
}

/// A counter metric, defined once per VM (in the filter's constructor or configuration).
#[derive(Debug, Clone, Copy)]
pub struct Counter(u32);

impl Counter {
    pub fn define(name: &str) -> Counter {
        Counter(hostcalls::define_metric(MetricType::Counter, name).unwrap_or(u32::MAX))
    }

    pub fn inc(&self, by: u64) {
        let _ = hostcalls::increment_metric(self.0, by as i64);
    }
}

/// A gauge metric.
#[derive(Debug, Clone, Copy)]
pub struct Gauge(u32);

impl Gauge {
    pub fn define(name: &str) -> Gauge {
        Gauge(hostcalls::define_metric(MetricType::Gauge, name).unwrap_or(u32::MAX))
    }

    pub fn set(&self, value: u64) {
        let _ = hostcalls::record_metric(self.0, value);
    }
}

/// Parses a filter configuration; the error names the field and says what was wrong.
pub fn parse_config<C: DeserializeOwned + Default>(raw: &[u8]) -> Result<C, String> {
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(C::default());
    }
    serde_json::from_slice(raw).map_err(|e| format!("invalid filter configuration: {e}"))
}

fn reply(r: &LocalReply) -> Action {
    match r.grpc_status {
        Some(code) => {
            let metadata: Vec<(&str, &[u8])> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
            let message = String::from_utf8_lossy(&r.body);
            let _ = hostcalls::send_grpc_response(code, Some(&message), metadata);
        }
        None => {
            let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let body = if r.body.is_empty() { None } else { Some(r.body.as_slice()) };
            let _ = hostcalls::send_http_response(r.status, headers, body);
        }
    }
    Action::Pause
}

/// The root context for filter `F` (made by [`register!`]).
#[derive(Debug)]
pub struct Root<F: Filter> {
    config: F::Config,
    _f: PhantomData<F>,
}

impl<F: Filter> Default for Root<F> {
    fn default() -> Self {
        Root { config: F::Config::default(), _f: PhantomData }
    }
}

impl<F: Filter> Context for Root<F> {}

impl<F: Filter> RootContext for Root<F> {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        match parse_config::<F::Config>(&raw) {
            Ok(c) => {
                self.config = c;
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::<F> { filter: F::new(&self.config) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The per-stream context for filter `F`.
struct Stream<F: Filter> {
    filter: F,
}

impl<F: Filter> Context for Stream<F> {}

impl<F: Filter> HttpContext for Stream<F> {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        match self.filter.on_request(&mut Request { _private: () }) {
            Decision::Continue => Action::Continue,
            Decision::Reply(r) => reply(&r),
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        match self.filter.on_response(&mut Response { _private: () }) {
            Decision::Continue => Action::Continue,
            Decision::Reply(r) => reply(&r),
        }
    }
}

/// Registers filter `F` as the module's root context.
#[macro_export]
macro_rules! register {
    ($filter:ty) => {
        $crate::proxy_wasm::main! {{
            $crate::proxy_wasm::set_log_level($crate::proxy_wasm::types::LogLevel::Info);
            $crate::proxy_wasm::set_root_context(|_| -> Box<dyn $crate::proxy_wasm::traits::RootContext> {
                Box::new(<$crate::Root<$filter>>::default())
            });
        }}
    };
}
