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
//! - **Metrics**: [`Counter`], [`Gauge`]; [`SharedCounter`] for a count shared by every VM of
//!   the plugin (CAS on shared data).
//! - **Timing**: [`Decision::Delay`] holds a request (or response) and then continues or
//!   replies — the SDK keeps the timers and resumes the stream from the root context's ticks,
//!   which every proxy-wasm host offers.
//! - **Side calls**: [`dispatch`] sends an HTTP call to a cluster (fire and forget, or handle
//!   the answer in [`Filter::on_call_response`]).
//! - **Re-sending a request** (what retry needs; the proxy-wasm ABI has nothing for it):
//!   [`Request::keep_for_resend`] then [`Decision::Resend`]. On trellis-proxy these use two
//!   documented foreign functions, `trellis.retain_request` and `trellis.resend`; on a host
//!   without them (Envoy) the SDK falls back to re-sending the request itself with an HTTP
//!   call to the route's cluster and answering with that call's response.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::marker::PhantomData;
use std::time::{Duration, SystemTime};

pub use log;
pub use proxy_wasm;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
pub use proxy_wasm::types::GrpcStatusCode;
use proxy_wasm::types::{Action, ContextType, MapType, MetricType, Status};
use serde::de::DeserializeOwned;

/// A filter: made once per stream from the plugin's configuration.
pub trait Filter: Sized + 'static {
    type Config: DeserializeOwned + Clone + Default + 'static;

    fn new(config: &Self::Config) -> Self;

    /// Checks a configuration beyond its shape; an error refuses it (the host reports it).
    fn check(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }

    /// Request headers arrived.
    fn on_request(&mut self, _request: &mut Request) -> Decision {
        Decision::Continue
    }

    /// Whether [`Filter::on_request_body`] wants to see the body (copying each chunk into the
    /// module costs time; filters that do not look at bodies leave this false).
    const SEES_REQUEST_BODY: bool = false;

    /// Whether [`Filter::on_done`] is needed. True by default; a filter that does nothing at a
    /// stream's end may say false, and Trellis's host then spares a call into the module per
    /// request (`proxy_on_log`; it never calls the proxy-wasm crate's empty `proxy_on_done` for
    /// SDK filters; other hosts call both anyway).
    const SEES_DONE: bool = true;

    /// Whether [`Filter::on_response`] is needed. True by default; a filter that never looks
    /// at responses may say false, and Trellis's host then spares a call into the module per
    /// request (other hosts call it anyway; the SDK then continues the response). With
    /// `SEES_DONE` false too, Trellis's host drops the filter's stream right after
    /// [`Filter::on_request`] when nothing is left for it (no body it reads still to come, no
    /// call out, no delay): its `Drop` runs then, not at the stream's end.
    const SEES_RESPONSE: bool = true;

    /// A piece of the request body passed by (`end`: the last one), when
    /// [`Filter::SEES_REQUEST_BODY`]. The filter sees it; the body goes on unchanged.
    fn on_request_body(&mut self, _chunk: &[u8], _end: bool) {}

    /// Response headers arrived.
    fn on_response(&mut self, _response: &mut Response) -> Decision {
        Decision::Continue
    }

    /// The answer to an HTTP call made with [`dispatch`] (`None`: the call failed).
    fn on_call_response(&mut self, _token: u32, _response: Option<CallResponse>) {}

    /// The stream is over.
    fn on_done(&mut self) {}
}

/// The answer to an HTTP call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What a filter decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Continue,
    /// Answer now; the request goes no further.
    Reply(LocalReply),
    /// Hold the stream for this long, then go on — or answer with the reply when one is given
    /// (fault injection's delay, then abort).
    Delay(Duration, Option<LocalReply>),
    /// From [`Filter::on_response`] only: drop this response and send the request upstream
    /// again after the delay. Needs [`Request::keep_for_resend`] on the request; without it
    /// (or when the body was too big to keep) the response goes on unchanged.
    Resend(Duration),
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

    /// A gRPC reply by numeric status code (unknown codes become UNKNOWN).
    pub fn grpc_code(code: u32, message: &str) -> LocalReply {
        use GrpcStatusCode as G;
        const CODES: [G; 17] = [
            G::Ok,
            G::Cancelled,
            G::Unknown,
            G::InvalidArgument,
            G::DeadlineExceeded,
            G::NotFound,
            G::AlreadyExists,
            G::PermissionDenied,
            G::ResourceExhausted,
            G::FailedPrecondition,
            G::Aborted,
            G::OutOfRange,
            G::Unimplemented,
            G::Internal,
            G::Unavailable,
            G::DataLoss,
            G::Unauthenticated,
        ];
        LocalReply::grpc(CODES.get(code as usize).copied().unwrap_or(G::Unknown), message)
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

fn cluster_name() -> Option<String> {
    property_string(&["xds", "cluster_name"]).or_else(|| property_string(&["cluster_name"]))
}

fn route_name() -> Option<String> {
    property_string(&["xds", "route_name"]).or_else(|| property_string(&["route_name"]))
}

fn property_string(path: &[&str]) -> Option<String> {
    property(path).map(|b| String::from_utf8_lossy(&b).into_owned()).filter(|s| !s.is_empty())
}

/// The request of the current stream.
#[derive(Debug)]
pub struct Request {
    end_of_stream: bool,
    keep: bool,
}

impl Request {
    /// Whether the request has a body to come.
    pub fn has_body(&self) -> bool {
        !self.end_of_stream
    }

    /// Keep the request (headers, and the body up to the host's buffer limit) so that the
    /// filter can send it again with [`Decision::Resend`].
    pub fn keep_for_resend(&mut self) {
        self.keep = true;
    }

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

    /// The route the request matched (Envoy's `xds.route_name`; Envoy fills the older
    /// `route_name` only once the router ran, so it is the fallback).
    pub fn route_name(&self) -> Option<String> {
        route_name()
    }

    /// The upstream cluster of the route (`xds.cluster_name`, or `cluster_name`).
    pub fn cluster_name(&self) -> Option<String> {
        cluster_name()
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

    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        property(path)
    }
}

/// Metric ids by type and name: a filter's constructor runs per request, the host is asked
/// once per VM.
fn metric_id(kind: MetricType, name: &str) -> u32 {
    thread_local! {
        // A filter has a handful: a list beats a map.
        static IDS: std::cell::RefCell<Vec<(u8, String, u32)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    IDS.with(|ids| {
        let k = kind as u8;
        if let Some((_, _, id)) = ids.borrow().iter().find(|(t, n, _)| *t == k && n == name) {
            return *id;
        }
        let id = hostcalls::define_metric(kind, name).unwrap_or(u32::MAX);
        ids.borrow_mut().push((k, name.to_string(), id));
        id
    })
}

/// A counter metric (defining it again, e.g. in the filter's constructor, is cheap: the id is
/// kept per VM).
#[derive(Debug, Clone, Copy)]
pub struct Counter(u32);

impl Counter {
    pub fn define(name: &str) -> Counter {
        Counter(metric_id(MetricType::Counter, name))
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
        Gauge(metric_id(MetricType::Gauge, name))
    }

    pub fn set(&self, value: u64) {
        let _ = hostcalls::record_metric(self.0, value);
    }
}

/// A counter shared by every VM of the plugin, kept in shared data under its name (a
/// little-endian i64). On trellis-proxy one host call updates it (the foreign function
/// `trellis.shared_add`); elsewhere compare-and-swap on shared data does.
#[derive(Debug, Clone)]
pub struct SharedCounter(pub String);

thread_local!(static SHARED_ADD: std::cell::Cell<bool> = const { std::cell::Cell::new(true) });

impl SharedCounter {
    /// Adds `delta` and returns the new value (0 when the host has no shared data).
    pub fn add(&self, delta: i64) -> i64 {
        if SHARED_ADD.get() {
            let mut args = Vec::with_capacity(8 + self.0.len());
            args.extend_from_slice(&delta.to_le_bytes());
            args.extend_from_slice(self.0.as_bytes());
            match hostcalls::call_foreign_function("trellis.shared_add", Some(&args)) {
                Ok(Some(v)) => return v.try_into().map(i64::from_le_bytes).unwrap_or(0),
                Err(Status::NotFound) => SHARED_ADD.set(false),
                _ => return 0,
            }
        }
        for _ in 0..64 {
            let (value, cas) = hostcalls::get_shared_data(&self.0).unwrap_or((None, None));
            let current = value.and_then(|v| v.try_into().ok()).map(i64::from_le_bytes).unwrap_or(0);
            let next = current + delta;
            match hostcalls::set_shared_data(&self.0, Some(&next.to_le_bytes()), cas) {
                Ok(()) => return next,
                Err(Status::CasMismatch) => continue,
                Err(_) => return 0,
            }
        }
        0
    }

    pub fn get(&self) -> i64 {
        if SHARED_ADD.get() {
            return self.add(0);
        }
        let (value, _) = hostcalls::get_shared_data(&self.0).unwrap_or((None, None));
        value.and_then(|v| v.try_into().ok()).map(i64::from_le_bytes).unwrap_or(0)
    }
}

/// A random number (from the host's WASI random source, through std's hasher keys).
pub fn random_u64() -> u64 {
    thread_local!(static STATE: RefCell<u64> = RefCell::new(RandomState::new().hash_one(0u64) | 1));
    STATE.with(|s| {
        // xorshift64*
        let mut x = *s.borrow();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *s.borrow_mut() = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// True with the given probability in percent (0–100, fractional).
pub fn chance(percent: f64) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent <= 0.0 {
        return false;
    }
    (random_u64() % 1_000_000) < (percent * 10_000.0) as u64
}

/// Sends an HTTP call to `cluster` (`headers` must have `:method`, `:path`, `:authority`). The
/// answer goes to [`Filter::on_call_response`] of the stream that made the call.
pub fn dispatch(
    cluster: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, Status> {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    hostcalls::dispatch_http_call(cluster, headers, body, Vec::new(), timeout)
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

/// What happens when a timer fires.
enum Then {
    Resume(bool),
    Reply(LocalReply),
}

/// A held stream: (context, when, then).
type Timer = (u32, SystemTime, Then);

thread_local! {
    static TIMERS: RefCell<Vec<Timer>> = const { RefCell::new(Vec::new()) };
}

/// How often the root context checks the timers while any is pending.
const TICK: Duration = Duration::from_millis(5);

fn hold(context: u32, d: Duration, then: Then) -> Action {
    let due = hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH) + d;
    TIMERS.with(|t| t.borrow_mut().push((context, due, then)));
    let _ = hostcalls::set_tick_period(TICK);
    Action::Pause
}

fn fire_timers() {
    let now = hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH);
    let due: Vec<Timer> = TIMERS.with(|t| {
        let mut t = t.borrow_mut();
        let (due, pending): (Vec<Timer>, Vec<Timer>) = t.drain(..).partition(|(_, at, _)| *at <= now);
        *t = pending;
        if t.is_empty() {
            let _ = hostcalls::set_tick_period(Duration::ZERO);
        }
        due
    });
    for (context, _, then) in due {
        if hostcalls::set_effective_context(context).is_err() {
            continue;
        }
        match then {
            Then::Resume(true) => {
                let _ = hostcalls::resume_http_request();
            }
            Then::Resume(false) => {
                let _ = hostcalls::resume_http_response();
            }
            Then::Reply(r) => {
                reply(&r);
            }
        }
    }
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
        match parse_config::<F::Config>(&raw).and_then(|c| F::check(&c).map(|()| c)) {
            Ok(c) => {
                self.config = c;
                // Trellis's host skips body callbacks nobody reads (others answer NotFound).
                // Stream end: 2 = proxy_on_log only (on_done is called from there; the
                // proxy-wasm crate's own on_done does nothing), 0 = neither.
                let end = if F::SEES_DONE { 2 } else { 0 };
                let interest = [u8::from(F::SEES_REQUEST_BODY), 0, end, u8::from(F::SEES_RESPONSE)];
                let _ = hostcalls::call_foreign_function("trellis.body_interest", Some(&interest));
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::<F> { filter: F::new(&self.config), context_id, kept: None, fallback: false }))
    }

    fn on_tick(&mut self) {
        fire_timers();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The request kept for a re-send on a host without `trellis.resend`: headers, body, and
/// whether the body was too big to keep.
struct Kept {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    overflow: bool,
}

/// Most request body bytes the fallback keeps for a re-send (Envoy's default buffer limit).
const KEEP_LIMIT: usize = 1 << 20;

/// How long the fallback re-send call may take.
const RESEND_TIMEOUT: Duration = Duration::from_secs(15);

/// The per-stream context for filter `F`.
struct Stream<F: Filter> {
    filter: F,
    context_id: u32,
    kept: Option<Kept>,
    /// A fallback re-send call is out: its answer replaces the response.
    fallback: bool,
}

impl<F: Filter> Stream<F> {
    fn decide(&mut self, d: Decision, request: bool) -> Action {
        match d {
            Decision::Continue => Action::Continue,
            Decision::Reply(r) => reply(&r),
            Decision::Delay(d, None) => hold(self.context_id, d, Then::Resume(request)),
            Decision::Delay(d, Some(r)) => hold(self.context_id, d, Then::Reply(r)),
            Decision::Resend(_) if request => {
                log::warn!("Decision::Resend from on_request is ignored");
                Action::Continue
            }
            Decision::Resend(after) => self.resend(after),
        }
    }

    fn resend(&mut self, after: Duration) -> Action {
        let ms = (after.as_millis().min(u32::MAX as u128) as u32).to_le_bytes();
        match hostcalls::call_foreign_function("trellis.resend", Some(&ms)) {
            Ok(_) => return Action::Pause,
            Err(Status::NotFound) => {}
            Err(_) => return Action::Continue,
        }
        // No host support: send the kept request to the route's cluster ourselves.
        let Some(kept) = self.kept.as_ref().filter(|k| !k.overflow) else { return Action::Continue };
        let Some(cluster) = cluster_name() else { return Action::Continue };
        let body = if kept.body.is_empty() { None } else { Some(kept.body.as_slice()) };
        match dispatch(&cluster, &kept.headers, body, RESEND_TIMEOUT) {
            Ok(_) => {
                self.fallback = true;
                Action::Pause
            }
            Err(_) => Action::Continue,
        }
    }
}

impl<F: Filter> Context for Stream<F> {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, _body: usize, _trailers: usize) {
        let headers = hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let response = headers.iter().find(|(k, _)| k == ":status").and_then(|(_, v)| v.parse().ok()).map(|status| {
            let body = hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpCallResponseBody, 0, usize::MAX)
                .ok()
                .flatten()
                .unwrap_or_default();
            CallResponse { status, headers: headers.clone(), body }
        });
        if self.fallback {
            self.fallback = false;
            match response {
                Some(r) => {
                    let headers: Vec<(&str, &str)> = r
                        .headers
                        .iter()
                        .filter(|(k, _)| !k.starts_with(':') && k != "content-length")
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let _ = hostcalls::send_http_response(u32::from(r.status), headers, Some(&r.body));
                }
                None => {
                    let _ = hostcalls::resume_http_response();
                }
            }
            return;
        }
        self.filter.on_call_response(token, response);
    }
}

impl<F: Filter> HttpContext for Stream<F> {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let mut req = Request { end_of_stream, keep: false };
        let d = self.filter.on_request(&mut req);
        if req.keep && matches!(d, Decision::Continue) {
            match hostcalls::call_foreign_function("trellis.retain_request", None) {
                Ok(_) => {}
                Err(_) => {
                    let headers = hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default();
                    self.kept = Some(Kept { headers, body: Vec::new(), overflow: false });
                }
            }
        }
        self.decide(d, true)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let keeping = self.kept.as_ref().is_some_and(|k| !k.overflow);
        if !F::SEES_REQUEST_BODY && !keeping {
            return Action::Continue;
        }
        let chunk = hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        if let Some(k) = self.kept.as_mut().filter(|k| !k.overflow) {
            if k.body.len() + chunk.len() > KEEP_LIMIT {
                k.overflow = true;
                k.body = Vec::new();
            } else {
                k.body.extend_from_slice(&chunk);
            }
        }
        self.filter.on_request_body(&chunk, end_of_stream);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let d = self.filter.on_response(&mut Response { _private: () });
        self.decide(d, false)
    }

    fn on_log(&mut self) {
        self.filter.on_done();
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
