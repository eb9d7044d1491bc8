//! trellis-filter-testkit: runs a compiled filter in the real host (trellis-wasm-host, the one
//! trellis-proxy uses) against a scripted stream, from a plain `cargo test` — no proxy, no
//! network.
//!
//! ```ignore
//! let filter = Filter::from_file("target/wasm32-wasip1/wasm/hello.wasm")?
//!     .config(serde_json::json!({"header": "x-hello", "value": "world"}));
//! let mut vm = filter.start()?;
//! let ex = vm.request().path("/").header("x-user", "a").peer_principal("spiffe://cluster.local/ns/a/sa/b").send()?;
//! assert_eq!(ex.request_header("x-hello").as_deref(), Some("world"));
//! let ex = ex.respond(200)?;
//! assert_eq!(ex.response_header("x-hello-seen").as_deref(), Some("200"));
//! ```
//!
//! An exchange shows what the filter did: the request and response headers as changed, a
//! local reply, callouts it made (answer them with [`Exchange::answer_callout`]), its logs and
//! metrics.

use std::path::Path;
use std::sync::Arc;

use trellis_wasm_host::abi::LogLevel;
pub use trellis_wasm_host::{Action, Callout, LocalResponse, VmError};
use trellis_wasm_host::{CompiledModule, Host, Limits, PluginConfig, Stream, Vm};

/// Builds `package` of the cargo workspace at `manifest` for wasm32-wasip1 (profile `wasm`,
/// the workspace's own target directory) and returns the module's path. Call it from a test:
/// cargo builds incrementally, so only the first test of a run pays for it.
pub fn build(manifest: impl AsRef<Path>, package: &str) -> anyhow::Result<std::path::PathBuf> {
    let manifest = manifest.as_ref();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", package, "--target", "wasm32-wasip1", "--profile", "wasm", "--manifest-path"])
        .arg(manifest)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "building {package} failed (is the wasm32-wasip1 target installed? rustup target add wasm32-wasip1):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = manifest.parent().unwrap_or(Path::new("."));
    Ok(dir.join("target/wasm32-wasip1/wasm").join(format!("{}.wasm", package.replace('-', "_"))))
}

/// A compiled filter and the configuration it will start with.
/// The foreign functions trellis-proxy's host adds (docs/wasm.md).
pub const TRELLIS_FUNCTIONS: [&str; 4] =
    ["trellis.body_interest", "trellis.retain_request", "trellis.resend", "trellis.shared_add"];

#[derive(Debug, Clone)]
pub struct Filter {
    host: Host,
    module: Arc<CompiledModule>,
    plugin: PluginConfig,
    limits: Limits,
}

impl Filter {
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Filter> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e} (build the filter first)", path.display()))?;
        Filter::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Filter> {
        let host = Host::new()?;
        let module = host.load(bytes, None)?;
        Ok(Filter {
            host,
            module,
            plugin: PluginConfig { name: "test".into(), vm_id: "test".into(), ..Default::default() },
            limits: Limits::default(),
        })
    }

    /// The plugin configuration (`pluginConfig`), as JSON.
    pub fn config(mut self, config: serde_json::Value) -> Filter {
        self.plugin.configuration = config.to_string().into_bytes();
        self
    }

    /// The raw configuration bytes.
    pub fn raw_config(mut self, config: &[u8]) -> Filter {
        self.plugin.configuration = config.to_vec();
        self
    }

    /// Runs the filter as a host without Trellis's foreign functions would (Envoy): each
    /// `trellis.*` function answers `NotFound`, so the SDK's portable paths are the ones tested.
    pub fn portable(self) -> Filter {
        self.without_functions(&TRELLIS_FUNCTIONS)
    }

    /// Runs the filter as a host lacking these of Trellis's foreign functions would.
    pub fn without_functions(self, names: &[&str]) -> Filter {
        for name in names {
            self.host
                .register_foreign_function(name, Arc::new(|_: &[u8]| Err(trellis_wasm_host::abi::Status::NotFound)));
        }
        self
    }

    pub fn limits(mut self, limits: Limits) -> Filter {
        self.limits = limits;
        self
    }

    /// Starts a VM: on_vm_start and on_configure run (a refused configuration is an error).
    pub fn start(&self) -> Result<Running, VmError> {
        Ok(Running {
            vm: Vm::start(&self.host, self.module.clone(), self.plugin.clone(), self.limits)?,
            host: self.host.clone(),
        })
    }
}

/// A started filter.
#[derive(Debug)]
pub struct Running {
    vm: Vm,
    host: Host,
}

impl Running {
    /// A request to script.
    pub fn request(&mut self) -> RequestBuilder<'_> {
        let stream = Stream {
            request_headers: vec![(":method".into(), b"GET".to_vec()), (":path".into(), b"/".to_vec())].into(),
            ..Default::default()
        };
        RequestBuilder { vm: &mut self.vm, stream, end_of_stream: true }
    }

    /// A metric the filter defined.
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.host.metrics().get(name)
    }

    /// What the filter logged, at `level` or above.
    pub fn logs(&self, level: LogLevel) -> Vec<String> {
        self.vm.state().logs.iter().filter(|(l, _)| *l >= level).map(|(_, m)| m.clone()).collect()
    }

    pub fn vm(&mut self) -> &mut Vm {
        &mut self.vm
    }
}

fn set(pairs: &mut Vec<(String, Vec<u8>)>, name: &str, value: &[u8]) {
    let name = name.to_ascii_lowercase();
    pairs.retain(|(k, _)| *k != name);
    pairs.push((name, value.to_vec()));
}

fn get(pairs: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    let name = name.to_ascii_lowercase();
    pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// A request being scripted.
#[derive(Debug)]
pub struct RequestBuilder<'a> {
    vm: &'a mut Vm,
    stream: Stream,
    end_of_stream: bool,
}

impl<'a> RequestBuilder<'a> {
    pub fn method(mut self, m: &str) -> Self {
        set(std::sync::Arc::make_mut(&mut self.stream.request_headers), ":method", m.as_bytes());
        self.stream.properties.insert("request.method".into(), m.as_bytes().to_vec());
        self
    }

    pub fn path(mut self, p: &str) -> Self {
        set(std::sync::Arc::make_mut(&mut self.stream.request_headers), ":path", p.as_bytes());
        self.stream.properties.insert("request.path".into(), p.as_bytes().to_vec());
        self
    }

    pub fn authority(mut self, a: &str) -> Self {
        set(std::sync::Arc::make_mut(&mut self.stream.request_headers), ":authority", a.as_bytes());
        self.stream.properties.insert("request.host".into(), a.as_bytes().to_vec());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        std::sync::Arc::make_mut(&mut self.stream.request_headers)
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    /// A request body (delivered after the headers).
    pub fn body(mut self, body: &[u8]) -> Self {
        self.stream.request_body = body.to_vec();
        self.end_of_stream = false;
        self
    }

    /// Any property, in Envoy's encoding.
    pub fn property(mut self, path: &str, value: &[u8]) -> Self {
        self.stream.properties.insert(path.to_string(), value.to_vec());
        self
    }

    /// The route the request matched (the `route_name` property).
    pub fn route(self, name: &str) -> Self {
        self.property("route_name", name.as_bytes()).property("xds.route_name", name.as_bytes())
    }

    /// The peer's identity, as mTLS gives it (`source.principal` and
    /// `connection.uri_san_peer_certificate`).
    pub fn peer_principal(self, principal: &str) -> Self {
        self.property("source.principal", principal.as_bytes())
            .property("connection.uri_san_peer_certificate", principal.as_bytes())
    }

    /// Runs on_request_headers (and on_request_body when there is a body).
    pub fn send(self) -> Result<Exchange<'a>, VmError> {
        let has_body = !self.end_of_stream;
        let vm = self.vm;
        let id = vm.create_stream(self.stream)?;
        let mut action = vm.on_request_headers(id, !has_body)?;
        if has_body && action == Action::Continue && local(vm, id).is_none() {
            action = vm.on_request_body(id, true)?;
        }
        Ok(Exchange { vm, id, action })
    }
}

fn local(vm: &Vm, id: u32) -> Option<LocalResponse> {
    vm.stream(id).and_then(|s| s.local_response.as_deref().cloned())
}

/// A stream after some callbacks.
#[derive(Debug)]
pub struct Exchange<'a> {
    vm: &'a mut Vm,
    id: u32,
    /// What the last callback returned.
    pub action: Action,
}

impl<'a> Exchange<'a> {
    pub fn request_header(&self, name: &str) -> Option<String> {
        get(&self.vm.stream(self.id)?.request_headers, name)
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        get(&self.vm.stream(self.id)?.response_headers, name)
    }

    pub fn request_body(&self) -> Vec<u8> {
        self.vm.stream(self.id).map(|s| s.request_body.clone()).unwrap_or_default()
    }

    /// The reply the filter sent instead of forwarding, if it did.
    pub fn local_reply(&self) -> Option<LocalResponse> {
        local(self.vm, self.id)
    }

    /// Callouts made so far (and not answered).
    pub fn callouts(&mut self) -> Vec<Callout> {
        self.vm.take_callouts()
    }

    /// Answers an http callout.
    pub fn answer_callout(self, token: u32, status: u16, body: &[u8]) -> Result<Exchange<'a>, VmError> {
        let headers = vec![(":status".to_string(), status.to_string().into_bytes())];
        self.vm.on_http_call_response(self.id, token, Some((headers, body.to_vec(), Vec::new())))?;
        Ok(self)
    }

    /// Sets a property of the stream (e.g. `response.flags` before [`Exchange::respond`]).
    pub fn property(self, path: &str, value: &[u8]) -> Exchange<'a> {
        if let Some(s) = self.vm.stream_mut(self.id) {
            s.properties.insert(path.to_string(), value.to_vec());
        }
        self
    }

    /// Whether the filter resumed the request (`true`) or response stream it had paused.
    pub fn resumed(&self, request: bool) -> bool {
        let want = if request {
            trellis_wasm_host::abi::StreamType::HttpRequest
        } else {
            trellis_wasm_host::abi::StreamType::HttpResponse
        };
        self.vm.stream(self.id).is_some_and(|s| s.resumed.contains(&want))
    }

    /// Delivers the root context's ticks (at the period it asked for, in real time) until the
    /// paused stream is resumed or answered, for at most `limit`; returns how long that took
    /// (`None`: still paused at the limit, or the filter asked for no ticks).
    pub fn run_timers(&mut self, limit: std::time::Duration) -> Result<Option<std::time::Duration>, VmError> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if self.resumed(true) || self.resumed(false) || self.local_reply().is_some() {
                return Ok(Some(start.elapsed()));
            }
            let Some(period) = self.vm.tick_period() else { return Ok(None) };
            std::thread::sleep(period);
            self.vm.on_tick()?;
        }
        Ok(None)
    }

    /// The delay of the re-send the filter asked for (`trellis.resend`), if it did; asking
    /// again (the next attempt's response) needs a fresh [`Exchange::respond`].
    pub fn resend_requested(&mut self) -> Option<std::time::Duration> {
        let s = self.vm.stream_mut(self.id)?;
        s.resend.take().map(|ms| std::time::Duration::from_millis(u64::from(ms)))
    }

    /// Whether the filter asked the host to keep the request for a re-send.
    pub fn request_retained(&self) -> bool {
        self.vm.stream(self.id).is_some_and(|s| s.retain_request)
    }

    /// The upstream answers `status` (with `headers`): on_response_headers runs.
    pub fn respond_with(self, status: u16, headers: &[(&str, &str)]) -> Result<Exchange<'a>, VmError> {
        let id = self.id;
        let s = self.vm.stream_mut(id).ok_or(VmError::NoSuchContext { plugin: "test".into(), context: id })?;
        s.response_headers = vec![(":status".into(), status.to_string().into_bytes())].into();
        std::sync::Arc::make_mut(&mut s.response_headers)
            .extend(headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())));
        let action = self.vm.on_response_headers(id, true)?;
        Ok(Exchange { vm: self.vm, id, action })
    }

    pub fn respond(self, status: u16) -> Result<Exchange<'a>, VmError> {
        self.respond_with(status, &[])
    }

    /// Ends the stream: on_log, on_done, on_delete.
    pub fn finish(self) -> Result<(), VmError> {
        self.vm.finish_stream(self.id)
    }
}
