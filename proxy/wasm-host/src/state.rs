//! What the host keeps for a VM: its plugin, per-stream data the imports read and write, and
//! what is shared between VMs with the same `vm_id` (shared data, queues) or process-wide
//! (metrics).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use wasmtime::StoreLimits;

use crate::abi::{LogLevel, MetricType, Pairs, Status};

/// A plugin: which module, as which root context, with what configuration.
#[derive(Debug, Clone, Default)]
pub struct PluginConfig {
    /// `plugin_name` (Envoy's name; a WasmPlugin's `pluginName` or its resource name).
    pub name: String,
    /// `plugin_root_id`: selects the root context in modules that have several.
    pub root_id: String,
    /// VMs with the same id share shared data and queues.
    pub vm_id: String,
    /// The plugin configuration (`pluginConfig` as JSON bytes).
    pub configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
}

/// A local reply a filter asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Pairs,
    /// -1 when not a gRPC reply.
    pub grpc_status: i32,
}

/// Properties the embedder answers for every filter of a stream, computed when a filter reads
/// one (most are never read).
pub trait Properties: Send + Sync + std::fmt::Debug {
    /// The value of `path` (dotted, e.g. `source.address`) in Envoy's encoding.
    fn get(&self, path: &str) -> Option<Vec<u8>>;

    /// [`Properties::get`], appended to `out`; true when `path` has a value. The host calls
    /// this one: implement it to answer the properties filters read on every request
    /// without allocating.
    fn get_into(&self, path: &str, out: &mut Vec<u8>) -> bool {
        self.get(path).map(|v| out.extend_from_slice(&v)).is_some()
    }
}

impl Properties for HashMap<String, Vec<u8>> {
    fn get(&self, path: &str) -> Option<Vec<u8>> {
        HashMap::get(self, path).cloned()
    }

    fn get_into(&self, path: &str, out: &mut Vec<u8>) -> bool {
        HashMap::get(self, path).map(|v| out.extend_from_slice(v)).is_some()
    }
}

/// A stream's [`Properties`], shared by its filters (none by default).
#[derive(Debug, Clone)]
pub struct SharedProperties(pub Arc<dyn Properties>);

impl Default for SharedProperties {
    /// None; one empty set per thread (a stream is made per filter and request, and one
    /// shared reference count would bounce between the workers' cores).
    fn default() -> Self {
        thread_local!(static NONE: Arc<dyn Properties> = Arc::new(HashMap::<String, Vec<u8>>::new()));
        SharedProperties(NONE.with(Arc::clone))
    }
}

/// An empty header map, one per thread: a stream's maps before the embedder fills them, without
/// an allocation per filter and request.
fn no_pairs() -> Arc<Pairs> {
    thread_local!(static NONE: Arc<Pairs> = Arc::new(Pairs::new()));
    NONE.with(Arc::clone)
}

impl SharedProperties {
    pub fn get(&self, path: &str) -> Option<Vec<u8>> {
        self.0.get(path)
    }

    pub fn get_into(&self, path: &str, out: &mut Vec<u8>) -> bool {
        self.0.get_into(path, out)
    }
}

/// One HTTP stream as a filter sees it. The header maps are shared (`Arc`) so the filters of
/// a chain see one copy until one of them changes it.
#[derive(Debug, Clone)]
pub struct Stream {
    pub request_headers: Arc<Pairs>,
    pub request_body: Vec<u8>,
    pub request_trailers: Pairs,
    pub response_headers: Arc<Pairs>,
    pub response_body: Vec<u8>,
    pub response_trailers: Pairs,
    /// Properties by dotted path, in Envoy's encodings: what filters set, then what the
    /// embedder shares between the filters of a stream (`request_properties`, and in the
    /// response callbacks `response_properties`); `request.*` / `response.*` values that live
    /// in the headers are read from them (imports.rs).
    /// (A B-tree: made and dropped per filter and request, nearly always empty, and a hash
    /// map's random keys cost more than its lookups save.)
    pub properties: BTreeMap<String, Vec<u8>>,
    pub request_properties: SharedProperties,
    pub response_properties: SharedProperties,
    /// Whether the filter changed the request / response headers (the embedder applies them
    /// only then).
    pub request_headers_changed: bool,
    pub response_headers_changed: bool,
    /// (Boxed: rare, and a stream is moved a few times per filter and request.)
    pub local_response: Option<Box<LocalResponse>>,
    /// Streams the filter resumed (`proxy_continue_stream`) or closed.
    pub resumed: Vec<crate::abi::StreamType>,
    pub closed: Vec<crate::abi::StreamType>,
    /// Whether the request / response header maps can be read and written now. As in Envoy,
    /// a header map is there during its headers callback and, when the filter paused the
    /// stream there, until it resumes it; afterwards it is gone (BadArgument).
    pub request_headers_open: bool,
    pub response_headers_open: bool,
    /// The filter asked the host to keep the request body so the request can be sent again
    /// (foreign function `trellis.retain_request`).
    pub retain_request: bool,
    /// The filter asked, from its response-headers callback, for this response to be dropped
    /// and the request sent upstream again after this many milliseconds (foreign function
    /// `trellis.resend`).
    pub resend: Option<u32>,
}

impl Default for Stream {
    fn default() -> Self {
        Stream {
            request_headers: no_pairs(),
            request_body: Vec::new(),
            request_trailers: Pairs::new(),
            response_headers: no_pairs(),
            response_body: Vec::new(),
            response_trailers: Pairs::new(),
            properties: BTreeMap::new(),
            request_properties: SharedProperties::default(),
            response_properties: SharedProperties::default(),
            request_headers_changed: false,
            response_headers_changed: false,
            local_response: None,
            resumed: Vec::new(),
            closed: Vec::new(),
            request_headers_open: false,
            response_headers_open: false,
            retain_request: false,
            resend: None,
        }
    }
}

/// An outgoing call a filter made (`proxy_http_call`, `proxy_grpc_call`); the embedder
/// performs it and reports the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callout {
    Http {
        token: u32,
        context: u32,
        upstream: String,
        headers: Pairs,
        body: Vec<u8>,
        trailers: Pairs,
        timeout_ms: u32,
    },
    /// A unary call (`proxy_grpc_call`), or with `stream` a stream (`proxy_grpc_stream`; no
    /// message yet, no timeout: its messages come as [`GrpcOp`]s).
    Grpc {
        token: u32,
        context: u32,
        upstream: String,
        service: String,
        method: String,
        metadata: Pairs,
        message: Vec<u8>,
        timeout_ms: u32,
        stream: bool,
    },
}

/// What a filter asked of a gRPC stream it opened (`proxy_grpc_send`, `proxy_grpc_close`),
/// for the embedder to do in order. A cancelled stream (`proxy_grpc_cancel`, or its context
/// gone) is no longer open: the embedder resets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcOp {
    /// A message; `end_stream` half-closes the stream after it.
    Send { message: Vec<u8>, end_stream: bool },
    /// Half-close: no more messages from the filter.
    Close,
}

/// A gRPC call or stream a VM has open: answers for it are delivered while it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcOpen {
    pub context: u32,
    pub stream: bool,
    /// The filter half-closed the stream.
    pub local_closed: bool,
    /// The server closed it (its close was delivered).
    pub remote_closed: bool,
}

impl Callout {
    /// The token the filter was given for the call.
    pub fn token(&self) -> u32 {
        match self {
            Callout::Http { token, .. } | Callout::Grpc { token, .. } => *token,
        }
    }
}

/// A foreign function the host offers (`proxy_call_foreign_function`).
pub type ForeignFunction = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, Status> + Send + Sync>;

/// Metrics defined by filters, process-wide by name.
#[derive(Debug, Default)]
pub struct Metrics {
    pub by_name: Mutex<BTreeMap<String, u32>>,
    pub values: Mutex<Vec<(String, MetricType, i64)>>,
}

impl Metrics {
    pub fn define(&self, kind: MetricType, name: &str) -> u32 {
        let mut by_name = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = by_name.get(name) {
            return *id;
        }
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.push((name.to_string(), kind, 0));
        let id = (values.len() - 1) as u32;
        by_name.insert(name.to_string(), id);
        id
    }

    pub fn get(&self, name: &str) -> Option<i64> {
        let id = *self.by_name.lock().unwrap_or_else(|p| p.into_inner()).get(name)?;
        self.values.lock().unwrap_or_else(|p| p.into_inner()).get(id as usize).map(|v| v.2)
    }
}

/// A shared queue: name, items, the root context that registered it.
pub type Queue = (String, VecDeque<Vec<u8>>, u32);

/// Shared data and queues of one `vm_id`.
#[derive(Debug, Default)]
pub struct SharedSpace {
    /// key → (value, cas).
    pub data: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    /// queue id → (name, items, registering root context).
    pub queues: Mutex<Vec<Queue>>,
}

/// Everything a VM's imports reach.
pub struct VmState {
    pub(crate) limits: StoreLimits,
    pub plugin: Arc<PluginConfig>,
    pub shared: Arc<SharedSpace>,
    pub metrics: Arc<Metrics>,
    pub foreign: Arc<HashMap<String, ForeignFunction>>,
    pub root_context: u32,
    /// The context host calls act on.
    pub effective_context: u32,
    pub streams: HashMap<u32, Stream, ContextIds>,
    pub log_level: LogLevel,
    /// What the module logged (bounded), for tests and the testkit; also sent to tracing.
    pub logs: VecDeque<(LogLevel, String)>,
    pub tick_period_ms: u32,
    pub callouts: Vec<Callout>,
    pub(crate) next_token: u32,
    /// The response of the http call being delivered.
    pub call_response: Option<(Pairs, Vec<u8>, Pairs)>,
    /// Arguments of the foreign function being delivered (buffer type 8).
    pub call_data: Vec<u8>,
    /// Status of the last gRPC call delivered (`proxy_get_status`).
    pub grpc_status: (u32, String),
    /// gRPC calls and streams open, by token.
    pub grpc_open: HashMap<u32, GrpcOpen>,
    /// What filters asked of their open gRPC streams, by token, in order.
    pub grpc_ops: Vec<(u32, GrpcOp)>,
    /// Tokens no longer open since the embedder last looked (`Vm::take_grpc_ended`).
    pub grpc_ended: Vec<u32>,
    /// The metadata being delivered (`proxy_on_grpc_receive_initial_metadata` /
    /// `_trailing_metadata`): header map type 4 or 5.
    pub grpc_metadata: Option<(crate::abi::MapType, Pairs)>,
    /// Contexts that called `proxy_done`.
    pub done: Vec<u32>,
    /// Queue ids with new items, for the embedder to deliver `proxy_on_queue_ready`.
    pub queue_ready: Vec<(u32, u32)>,
    /// What the module said it reads (`trellis.body_interest`): request, response bodies.
    pub body_interest: Option<(bool, bool)>,
    /// Whether the module needs `proxy_on_log`, `proxy_on_done` when a stream ends (both
    /// unless it said otherwise with `trellis.body_interest`'s third byte).
    pub end_interest: (bool, bool),
    /// Whether the module needs `proxy_on_response_headers` (true unless it said otherwise
    /// with `trellis.body_interest`'s fourth byte).
    pub response_interest: bool,
    /// Properties the host sets for every VM (`node.id`, `node.metadata.NAMESPACE`, ...).
    pub host_properties: Arc<HashMap<String, Vec<u8>>>,
    /// The module's memory and allocator, looked up once at instantiation (imports use them
    /// on every call).
    pub(crate) memory: Option<wasmtime::Memory>,
    pub(crate) alloc: Option<Arc<wasmtime::TypedFunc<i32, i32>>>,
    /// Reused buffers for what the hot imports hand to the guest (property values, header
    /// values) and for property paths, so a request's calls allocate nothing on the host.
    pub(crate) scratch: Vec<u8>,
    pub(crate) scratch_path: String,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("plugin", &self.plugin.name)
            .field("root_context", &self.root_context)
            .field("streams", &self.streams.len())
            .finish()
    }
}

pub(crate) const MAX_LOGS: usize = 1000;

/// Hashing for context ids (small integers the host hands out in order): one multiply instead
/// of SipHash, which was most of a stream context's bookkeeping.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContextIds;

impl std::hash::BuildHasher for ContextIds {
    type Hasher = ContextIdHasher;

    fn build_hasher(&self) -> ContextIdHasher {
        ContextIdHasher(0)
    }
}

#[derive(Debug)]
pub struct ContextIdHasher(u64);

impl std::hash::Hasher for ContextIdHasher {
    fn finish(&self) -> u64 {
        // Fibonacci hashing spreads consecutive ids over the table's high bits too.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

impl VmState {
    pub(crate) fn stream(&mut self) -> Option<&mut Stream> {
        self.streams.get_mut(&self.effective_context)
    }

    pub(crate) fn log(&mut self, level: LogLevel, message: String) {
        let plugin = &self.plugin.name;
        match level {
            LogLevel::Trace => tracing::trace!(target: "wasm", plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "wasm", plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: "wasm", plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "wasm", plugin, "{message}"),
            LogLevel::Error | LogLevel::Critical => tracing::error!(target: "wasm", plugin, "{message}"),
        }
        if self.logs.len() >= MAX_LOGS {
            self.logs.pop_front();
        }
        self.logs.push_back((level, message));
    }
}
