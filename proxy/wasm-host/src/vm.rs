//! A VM: one instance of a module with its root context and the stream contexts created in
//! it. Callbacks run with a CPU deadline (epoch interruption) inside a memory limit; a trap,
//! a timeout or a guest panic fails the callback with a [`VmError`] and poisons the VM (the
//! embedder applies the plugin's fail strategy and makes a fresh one when it wants).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Instance, Store, StoreLimitsBuilder, TypedFunc};

use crate::abi::{Action, LogLevel};
use crate::host::{CompiledModule, Host};
use crate::state::{Callout, PluginConfig, Stream, VmState};

/// Why a VM call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    #[error("plugin {plugin}: {callback} exceeded its CPU deadline of {deadline:?}")]
    Timeout { plugin: String, callback: &'static str, deadline: Duration },
    #[error("plugin {plugin}: {callback} trapped: {message}")]
    Trap { plugin: String, callback: &'static str, message: String },
    #[error("plugin {plugin}: {reason}")]
    Refused { plugin: String, reason: String },
    #[error("plugin {plugin}: the VM failed earlier and must be replaced")]
    Poisoned { plugin: String },
    #[error("plugin {plugin}: no stream context {context}")]
    NoSuchContext { plugin: String, context: u32 },
}

/// Limits a VM runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Linear memory, bytes.
    pub memory: usize,
    /// CPU time one callback may take.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory: 64 << 20, deadline: Duration::from_millis(100) }
    }
}

type Ctx2 = TypedFunc<(i32, i32), ()>;
type Cb2 = TypedFunc<(i32, i32), i32>;
type Cb3 = TypedFunc<(i32, i32, i32), i32>;
type Cb5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;
type Cb3Void = TypedFunc<(i32, i32, i32), ()>;

struct Exports {
    on_context_create: Ctx2,
    on_vm_start: Option<Cb2>,
    on_configure: Option<Cb2>,
    on_request_headers: Option<Cb3>,
    on_request_body: Option<Cb3>,
    on_response_headers: Option<Cb3>,
    on_response_body: Option<Cb3>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_http_call_response: Option<Cb5>,
    on_grpc_receive_initial_metadata: Option<Cb3Void>,
    on_grpc_receive: Option<Cb3Void>,
    on_grpc_receive_trailing_metadata: Option<Cb3Void>,
    on_grpc_close: Option<Cb3Void>,
    on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
}

/// A running VM.
pub struct Vm {
    store: Store<VmState>,
    instance: Instance,
    /// Shared so a callback can hold its export while the VM is borrowed mutably (cloning a
    /// wasmtime `TypedFunc` clones its registered type: atomics on every call).
    exports: Arc<Exports>,
    limits: Limits,
    host: Host,
    next_context: u32,
    poisoned: bool,
    module: Arc<CompiledModule>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("plugin", &self.store.data().plugin.name).field("poisoned", &self.poisoned).finish()
    }
}

/// Root context id of every VM (one plugin per VM).
pub const ROOT_CONTEXT: u32 = 1;

impl Vm {
    /// Instantiates `module` for `plugin`, runs its initializer, creates the root context and
    /// calls on_vm_start and on_configure (either returning false refuses the plugin).
    pub fn start(
        host: &Host,
        module: Arc<CompiledModule>,
        plugin: PluginConfig,
        limits: Limits,
    ) -> Result<Vm, VmError> {
        let name = plugin.name.clone();
        let refused = |reason: String| VmError::Refused { plugin: name.clone(), reason };
        let state = VmState {
            limits: StoreLimitsBuilder::new().memory_size(limits.memory).trap_on_grow_failure(true).build(),
            shared: host.shared_space(&plugin.vm_id),
            metrics: host.metrics(),
            foreign: host.foreign_functions(),
            plugin: Arc::new(plugin),
            root_context: ROOT_CONTEXT,
            effective_context: ROOT_CONTEXT,
            streams: HashMap::default(),
            log_level: LogLevel::Info,
            logs: VecDeque::new(),
            tick_period_ms: 0,
            callouts: Vec::new(),
            next_token: 0,
            call_response: None,
            call_data: Vec::new(),
            grpc_status: (0, String::new()),
            grpc_open: HashMap::new(),
            grpc_ops: Vec::new(),
            grpc_ended: Vec::new(),
            grpc_metadata: None,
            done: Vec::new(),
            queue_ready: Vec::new(),
            body_interest: None,
            end_interest: (true, true),
            response_interest: true,
            host_properties: host.properties(),
            memory: None,
            alloc: None,
            scratch: Vec::new(),
            scratch_path: String::new(),
        };
        let mut store = Store::new(host.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(host.deadline_ticks(limits.deadline));
        let instance = host
            .linker()
            .instantiate(&mut store, module.module())
            .map_err(|e| refused(format!("cannot instantiate: {e:#}")))?;
        let exports = Arc::new(exports(&mut store, &instance).map_err(refused)?);
        let memory = instance.get_memory(&mut store, "memory");
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<i32, i32>(&mut store, "malloc"))
            .map_err(|e| refused(format!("the module's allocator has the wrong type: {e}")))?;
        (store.data_mut().memory, store.data_mut().alloc) = (memory, Some(Arc::new(alloc)));
        let mut vm = Vm {
            store,
            instance,
            exports,
            limits,
            host: host.clone(),
            next_context: ROOT_CONTEXT + 1,
            poisoned: false,
            module,
        };
        // WASI reactors (and the proxy-wasm crate's main! macro) initialize in _initialize.
        for init in ["_initialize", "_start"] {
            if let Ok(f) = instance.get_typed_func::<(), ()>(&mut vm.store, init) {
                vm.guard("_initialize", |s| f.call(s, ()))?;
                break;
            }
        }
        let e = Arc::clone(&vm.exports);
        vm.guard("proxy_on_context_create", |s| e.on_context_create.call(s, (ROOT_CONTEXT as i32, 0)))?;
        let vm_config = vm.store.data().plugin.vm_configuration.len() as i32;
        if let Some(f) = &e.on_vm_start
            && vm.guard("proxy_on_vm_start", |s| f.call(s, (ROOT_CONTEXT as i32, vm_config)))? == 0
        {
            return Err(refused("proxy_on_vm_start returned false".into()));
        }
        let config = vm.store.data().plugin.configuration.len() as i32;
        if let Some(f) = &e.on_configure
            && vm.guard("proxy_on_configure", |s| f.call(s, (ROOT_CONTEXT as i32, config)))? == 0
        {
            let last = vm.store.data().logs.back().map(|(_, m)| format!(" (last log: {m})")).unwrap_or_default();
            return Err(refused(format!(
                "proxy_on_configure returned false: the plugin refused its configuration{last}"
            )));
        }
        Ok(vm)
    }

    /// Runs one guest callback with a fresh deadline; traps and timeouts poison the VM.
    fn guard<T>(
        &mut self,
        callback: &'static str,
        f: impl FnOnce(&mut Store<VmState>) -> wasmtime::Result<T>,
    ) -> Result<T, VmError> {
        if self.poisoned {
            return Err(VmError::Poisoned { plugin: self.store.data().plugin.name.clone() });
        }
        self.store.set_epoch_deadline(self.host.deadline_ticks(self.limits.deadline));
        match f(&mut self.store) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.poisoned = true;
                let plugin = self.store.data().plugin.name.clone();
                let interrupted = e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt);
                if interrupted {
                    Err(VmError::Timeout { plugin, callback, deadline: self.limits.deadline })
                } else {
                    Err(VmError::Trap { plugin, callback, message: format!("{e:#}") })
                }
            }
        }
    }

    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn module(&self) -> &Arc<CompiledModule> {
        &self.module
    }

    pub fn state(&self) -> &VmState {
        self.store.data()
    }

    pub fn state_mut(&mut self) -> &mut VmState {
        self.store.data_mut()
    }

    /// Creates a stream context with `stream` as what the filter sees.
    pub fn create_stream(&mut self, stream: Stream) -> Result<u32, VmError> {
        let id = self.next_context;
        self.next_context += 1;
        self.store.data_mut().streams.insert(id, stream);
        self.store.data_mut().effective_context = id;
        let e = Arc::clone(&self.exports);
        self.guard("proxy_on_context_create", |s| e.on_context_create.call(s, (id as i32, ROOT_CONTEXT as i32)))?;
        Ok(id)
    }

    pub fn stream(&self, id: u32) -> Option<&Stream> {
        self.store.data().streams.get(&id)
    }

    pub fn stream_mut(&mut self, id: u32) -> Option<&mut Stream> {
        self.store.data_mut().streams.get_mut(&id)
    }

    fn stream_call(
        &mut self,
        id: u32,
        callback: &'static str,
        pick: fn(&Exports) -> &Option<Cb3>,
        a: i32,
        end: bool,
    ) -> Result<Action, VmError> {
        if !self.store.data().streams.contains_key(&id) {
            return Err(VmError::NoSuchContext { plugin: self.store.data().plugin.name.clone(), context: id });
        }
        let e = Arc::clone(&self.exports);
        let Some(f) = pick(&e) else { return Ok(Action::Continue) };
        self.store.data_mut().effective_context = id;
        let r = self.guard(callback, |s| f.call(s, (id as i32, a, i32::from(end))))?;
        Ok(Action::from_i32(r))
    }

    pub fn on_request_headers(&mut self, id: u32, end_of_stream: bool) -> Result<Action, VmError> {
        let n = self.store.data().streams.get(&id).map(|s| s.request_headers.len()).unwrap_or(0) as i32;
        self.set_open(id, true, true);
        let r = self.stream_call(id, "proxy_on_request_headers", |e| &e.on_request_headers, n, end_of_stream);
        if r != Ok(Action::Pause) {
            self.set_open(id, true, false);
        }
        r
    }

    fn set_open(&mut self, id: u32, request: bool, open: bool) {
        if let Some(s) = self.store.data_mut().streams.get_mut(&id) {
            if request {
                s.request_headers_open = open;
            } else {
                s.response_headers_open = open;
            }
        }
    }

    pub fn on_request_body(&mut self, id: u32, end_of_stream: bool) -> Result<Action, VmError> {
        let n = self.store.data().streams.get(&id).map(|s| s.request_body.len()).unwrap_or(0) as i32;
        self.stream_call(id, "proxy_on_request_body", |e| &e.on_request_body, n, end_of_stream)
    }

    pub fn on_response_headers(&mut self, id: u32, end_of_stream: bool) -> Result<Action, VmError> {
        if !self.store.data().response_interest {
            return Ok(Action::Continue);
        }
        let n = self.store.data().streams.get(&id).map(|s| s.response_headers.len()).unwrap_or(0) as i32;
        self.set_open(id, false, true);
        let r = self.stream_call(id, "proxy_on_response_headers", |e| &e.on_response_headers, n, end_of_stream);
        if r != Ok(Action::Pause) {
            self.set_open(id, false, false);
        }
        r
    }

    /// Whether the module wants the response headers callback (it did not say otherwise with
    /// `trellis.body_interest`); the embedder need not prepare a response for one that does not.
    pub fn handles_response_headers(&self) -> bool {
        self.store.data().response_interest && self.exports.on_response_headers.is_some()
    }

    /// Whether the module handles request / response bodies at all: it exports the callback
    /// and did not say it never reads that body (`trellis.body_interest`).
    pub fn handles_bodies(&self) -> (bool, bool) {
        let (q, r) = self.store.data().body_interest.unwrap_or((true, true));
        (q && self.exports.on_request_body.is_some(), r && self.exports.on_response_body.is_some())
    }

    pub fn on_response_body(&mut self, id: u32, end_of_stream: bool) -> Result<Action, VmError> {
        let n = self.store.data().streams.get(&id).map(|s| s.response_body.len()).unwrap_or(0) as i32;
        self.stream_call(id, "proxy_on_response_body", |e| &e.on_response_body, n, end_of_stream)
    }

    /// The end of a stream: on_log, on_done, on_delete; the context is gone afterwards.
    pub fn finish_stream(&mut self, id: u32) -> Result<(), VmError> {
        self.store.data_mut().effective_context = id;
        let e = Arc::clone(&self.exports);
        // A module that said it needs neither (trellis.body_interest) only hears on_delete.
        let (log, done) = self.store.data().end_interest;
        if let Some(f) = e.on_log.as_ref().filter(|_| log) {
            self.guard("proxy_on_log", |s| f.call(s, id as i32))?;
        }
        if let Some(f) = e.on_done.as_ref().filter(|_| done) {
            self.guard("proxy_on_done", |s| f.call(s, id as i32))?;
        }
        if let Some(f) = &e.on_delete {
            self.guard("proxy_on_delete", |s| f.call(s, id as i32))?;
        }
        self.forget_context(id);
        Ok(())
    }

    /// A stream context is gone: its gRPC calls and streams are cancelled (as Envoy does when
    /// it destroys a context) and nothing more is delivered to it.
    fn forget_context(&mut self, id: u32) {
        let s = self.store.data_mut();
        s.streams.remove(&id);
        s.effective_context = ROOT_CONTEXT;
        let mine: Vec<u32> = s.grpc_open.iter().filter(|(_, o)| o.context == id).map(|(t, _)| *t).collect();
        for token in mine {
            crate::imports::cancel_grpc(s, token);
        }
    }

    /// Whether context `id` is there (the root context, or a stream not yet finished).
    pub fn has_context(&self, id: u32) -> bool {
        id == self.store.data().root_context || self.store.data().streams.contains_key(&id)
    }

    /// The tick period the root context asked for (`None`: no ticks).
    pub fn tick_period(&self) -> Option<Duration> {
        let ms = self.store.data().tick_period_ms;
        (ms > 0).then(|| Duration::from_millis(u64::from(ms)))
    }

    pub fn on_tick(&mut self) -> Result<(), VmError> {
        let e = Arc::clone(&self.exports);
        let Some(f) = &e.on_tick else { return Ok(()) };
        self.store.data_mut().effective_context = ROOT_CONTEXT;
        self.guard("proxy_on_tick", |s| f.call(s, ROOT_CONTEXT as i32))
    }

    /// Callouts the filter made since the last call, for the embedder to perform.
    pub fn take_callouts(&mut self) -> Vec<Callout> {
        std::mem::take(&mut self.store.data_mut().callouts)
    }

    /// The callouts made by one context (a VM shared by many streams keeps the others').
    pub fn take_callouts_for(&mut self, context: u32) -> Vec<Callout> {
        if self.store.data().callouts.is_empty() {
            return Vec::new();
        }
        let all = std::mem::take(&mut self.store.data_mut().callouts);
        let (mine, others): (Vec<Callout>, Vec<Callout>) = all.into_iter().partition(|c| match c {
            Callout::Http { context: c, .. } | Callout::Grpc { context: c, .. } => *c == context,
        });
        self.store.data_mut().callouts = others;
        mine
    }

    /// Delivers the response of an http callout.
    pub fn on_http_call_response(
        &mut self,
        context: u32,
        token: u32,
        response: Option<(crate::abi::Pairs, Vec<u8>, crate::abi::Pairs)>,
    ) -> Result<(), VmError> {
        let e = Arc::clone(&self.exports);
        let Some(f) = &e.on_http_call_response else { return Ok(()) };
        if !self.has_context(context) {
            // The stream that made the call is over: nobody to tell.
            return Ok(());
        }
        let (h, b, t) = match &response {
            Some((h, b, t)) => (h.len() as i32, b.len() as i32, t.len() as i32),
            None => (0, 0, 0),
        };
        self.store.data_mut().call_response = response;
        self.store.data_mut().effective_context = context;
        let r = self.guard("proxy_on_http_call_response", |s| f.call(s, (context as i32, token as i32, h, b, t)));
        self.store.data_mut().call_response = None;
        r
    }

    /// Whether answers for gRPC call or stream `token` are still wanted (it is open: not
    /// cancelled, its context not gone, a call not yet answered, a stream not closed at both
    /// ends).
    pub fn grpc_wanted(&self, token: u32) -> bool {
        self.store.data().grpc_open.contains_key(&token)
    }

    /// What filters asked of their open gRPC streams since the last time, in order.
    pub fn take_grpc_ops(&mut self) -> Vec<(u32, crate::state::GrpcOp)> {
        std::mem::take(&mut self.store.data_mut().grpc_ops)
    }

    /// gRPC calls and streams that stopped being wanted (cancelled, their context gone, closed
    /// at both ends) since the last time.
    pub fn take_grpc_ended(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.store.data_mut().grpc_ended)
    }

    /// The context a delivery for `token` goes to, if it is still wanted.
    fn grpc_context(&mut self, token: u32) -> Option<u32> {
        let context = self.store.data().grpc_open.get(&token)?.context;
        self.store.data_mut().effective_context = context;
        Some(context)
    }

    /// Delivers a gRPC stream's initial metadata (`proxy_on_grpc_receive_initial_metadata`,
    /// header map type 4 during the callback).
    pub fn on_grpc_initial_metadata(&mut self, token: u32, metadata: crate::abi::Pairs) -> Result<(), VmError> {
        self.grpc_metadata(token, crate::abi::MapType::GrpcReceiveInitialMetadata, metadata)
    }

    /// Delivers a gRPC stream's trailing metadata (`proxy_on_grpc_receive_trailing_metadata`,
    /// header map type 5 during the callback).
    pub fn on_grpc_trailing_metadata(&mut self, token: u32, metadata: crate::abi::Pairs) -> Result<(), VmError> {
        self.grpc_metadata(token, crate::abi::MapType::GrpcReceiveTrailingMetadata, metadata)
    }

    fn grpc_metadata(
        &mut self,
        token: u32,
        kind: crate::abi::MapType,
        metadata: crate::abi::Pairs,
    ) -> Result<(), VmError> {
        let initial = kind == crate::abi::MapType::GrpcReceiveInitialMetadata;
        let e = Arc::clone(&self.exports);
        let f = if initial { &e.on_grpc_receive_initial_metadata } else { &e.on_grpc_receive_trailing_metadata };
        let (Some(f), Some(context)) = (f, self.grpc_context(token)) else { return Ok(()) };
        let n = metadata.len() as i32;
        self.store.data_mut().grpc_metadata = Some((kind, metadata));
        let name =
            if initial { "proxy_on_grpc_receive_initial_metadata" } else { "proxy_on_grpc_receive_trailing_metadata" };
        let r = self.guard(name, |s| f.call(s, (context as i32, token as i32, n)));
        self.store.data_mut().grpc_metadata = None;
        r
    }

    /// Delivers a message: a unary call's answer (the call is then over, as in Envoy: no
    /// close follows a successful call) or one of a stream's (`proxy_on_grpc_receive`, the
    /// message in the gRPC receive buffer).
    pub fn on_grpc_message(&mut self, token: u32, message: Vec<u8>) -> Result<(), VmError> {
        let Some(context) = self.grpc_context(token) else { return Ok(()) };
        if self.store.data().grpc_open.get(&token).is_some_and(|o| !o.stream) {
            self.store.data_mut().grpc_open.remove(&token);
            self.store.data_mut().grpc_ended.push(token);
        }
        let e = Arc::clone(&self.exports);
        let Some(f) = &e.on_grpc_receive else { return Ok(()) };
        let n = message.len() as i32;
        self.store.data_mut().call_data = message;
        let r = self.guard("proxy_on_grpc_receive", |s| f.call(s, (context as i32, token as i32, n)));
        self.store.data_mut().call_data = Vec::new();
        r
    }

    /// Delivers the end of a gRPC call that failed, or of a stream the server closed
    /// (`proxy_on_grpc_close`; `proxy_get_status` answers the code and message).
    pub fn on_grpc_close(&mut self, token: u32, status: u32, message: String) -> Result<(), VmError> {
        let Some(context) = self.grpc_context(token) else { return Ok(()) };
        let s = self.store.data_mut();
        match s.grpc_open.get_mut(&token) {
            Some(o) if o.stream && !o.local_closed => o.remote_closed = true,
            _ => {
                s.grpc_open.remove(&token);
                s.grpc_ended.push(token);
            }
        }
        s.grpc_status = (status, message);
        let e = Arc::clone(&self.exports);
        let Some(f) = &e.on_grpc_close else { return Ok(()) };
        let r = self.guard("proxy_on_grpc_close", |s| f.call(s, (context as i32, token as i32, status as i32)));
        self.store.data_mut().grpc_status.1.clear();
        r
    }

    /// Delivers pending `proxy_on_queue_ready` notifications.
    pub fn deliver_queue_ready(&mut self) -> Result<(), VmError> {
        let ready = std::mem::take(&mut self.store.data_mut().queue_ready);
        let e = Arc::clone(&self.exports);
        let Some(f) = &e.on_queue_ready else { return Ok(()) };
        for (context, queue) in ready {
            self.store.data_mut().effective_context = context;
            self.guard("proxy_on_queue_ready", |s| f.call(s, (context as i32, queue as i32)))?;
        }
        Ok(())
    }

    /// Bytes of linear memory the VM uses.
    pub fn memory_bytes(&mut self) -> usize {
        let instance = self.instance;
        instance.get_memory(&mut self.store, "memory").map(|m| m.data_size(&self.store)).unwrap_or(0)
    }
}

fn exports(store: &mut Store<VmState>, instance: &Instance) -> Result<Exports, String> {
    if instance.get_memory(&mut *store, "memory").is_none() {
        return Err("the module exports no memory".into());
    }
    if instance.get_func(&mut *store, "proxy_on_memory_allocate").is_none()
        && instance.get_func(&mut *store, "malloc").is_none()
    {
        return Err("the module exports neither proxy_on_memory_allocate nor malloc".into());
    }
    let abi = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];
    if !abi.iter().any(|n| instance.get_func(&mut *store, n).is_some()) {
        return Err("the module does not declare proxy-wasm ABI 0.2.x (export proxy_abi_version_0_2_1)".into());
    }
    macro_rules! opt {
        ($name:literal) => {
            match instance.get_func(&mut *store, $name) {
                Some(f) => Some(f.typed(&*store).map_err(|e| format!("export {} has the wrong type: {e}", $name))?),
                None => None,
            }
        };
    }
    let on_context_create: Option<Ctx2> = opt!("proxy_on_context_create");
    Ok(Exports {
        on_context_create: on_context_create.ok_or("the module exports no proxy_on_context_create")?,
        on_vm_start: opt!("proxy_on_vm_start"),
        on_configure: opt!("proxy_on_configure"),
        on_request_headers: opt!("proxy_on_request_headers"),
        on_request_body: opt!("proxy_on_request_body"),
        on_response_headers: opt!("proxy_on_response_headers"),
        on_response_body: opt!("proxy_on_response_body"),
        on_log: opt!("proxy_on_log"),
        on_done: opt!("proxy_on_done"),
        on_delete: opt!("proxy_on_delete"),
        on_tick: opt!("proxy_on_tick"),
        on_http_call_response: opt!("proxy_on_http_call_response"),
        on_grpc_receive_initial_metadata: opt!("proxy_on_grpc_receive_initial_metadata"),
        on_grpc_receive: opt!("proxy_on_grpc_receive"),
        on_grpc_receive_trailing_metadata: opt!("proxy_on_grpc_receive_trailing_metadata"),
        on_grpc_close: opt!("proxy_on_grpc_close"),
        on_queue_ready: opt!("proxy_on_queue_ready"),
    })
}
