//! abi-probe: a filter written with the upstream `proxy-wasm` crate that exercises the ABI the
//! way real filters do — configuration, headers, bodies, properties, local replies, http
//! callouts, shared data, metrics, logs, ticks — plus two hostile paths (`/panic`, `/loop`).
//! The wasm host's tests run it; the differential scenario runs it in Envoy and trellis-proxy.
//!
//! Configuration (JSON): `{"header": "x-probe-resp", "deny": "/deny"}`, optionally
//! `"callout": "CLUSTER"` and `"calloutAuthority": "HOST"` (default: cluster `auth`), and
//! `"grpcCluster": "CLUSTER"` (an HTTP/2 cluster for `/grpc`).
//!
//! Paths: `/deny` (the configured one) → 403; `/callout` → an http call to the cluster whose
//! answer goes into the request header `x-callout` and the response header `x-callout-resp`;
//! `/grpc` → a unary gRPC call (`grpc.health.v1.Health/Check`) to the gRPC cluster, its
//! status code in the response header `x-grpc-status`; `/grpc-stream` → a bidirectional
//! gRPC stream (ADS, `StreamAggregatedResources`) to the same cluster: one request sent, the
//! initial metadata, the first message, the half-close, the trailing metadata and the close
//! recorded in `x-grpc-stream`; `/grpc-stream-cancel` → the same, cancelled after the first
//! message (and a send after the cancel refused); `/ticks` → the root ticks the plugin has seen (`tickMs` makes them periodic), in
//! `x-shared`; `/shared-set`, `/shared-get` → shared data; `/shared-add` → adds 5 to the
//! shared-data counter `probe-counter` with Trellis's foreign function `trellis.shared_add` (its
//! answer, or `unsupported`, in `x-shared`) and `/shared-count` reads it with
//! `proxy_get_shared_data`; `/tick` → held until the root context's second
//! tick (20 ms period), then `x-ticked` is set; bodies are upper-cased.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::cell::RefCell;
use std::time::Duration;

thread_local! {
    /// Streams held for `/tick`: (context, ticks seen).
    static HELD: RefCell<Vec<(u32, u32)>> = const { RefCell::new(Vec::new()) };
    /// Streams released by ticks: (context, ticks it took).
    static TICKED: RefCell<Vec<(u32, u32)>> = const { RefCell::new(Vec::new()) };
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Settings {
    header: String,
    deny: String,
    callout: String,
    callout_authority: String,
    grpc_cluster: String,
    /// Root ticks every this many ms (0: only while a `/tick` request is held).
    tick_ms: u64,
    metric: u32,
}

#[derive(Default)]
struct Root {
    settings: Settings,
}

impl Context for Root {}

/// `{"header": "...", "deny": "...", "callout"?: "...", "calloutAuthority"?: "..."}`; anything
/// else is refused.
fn parse(config: &str) -> Option<Settings> {
    let v: serde_json::Value = serde_json::from_str(config).ok()?;
    let obj = v.as_object()?;
    let known = ["header", "deny", "callout", "calloutAuthority", "grpcCluster", "tickMs"];
    if obj.keys().any(|k| !known.contains(&k.as_str())) {
        return None;
    }
    let opt = |k: &str, default: &str| obj.get(k).and_then(|v| v.as_str()).unwrap_or(default).to_string();
    Some(Settings {
        header: obj.get("header")?.as_str()?.to_string(),
        deny: obj.get("deny")?.as_str()?.to_string(),
        callout: opt("callout", "auth"),
        callout_authority: opt("calloutAuthority", "auth"),
        grpc_cluster: opt("grpcCluster", "grpc"),
        tick_ms: obj.get("tickMs").and_then(|v| v.as_u64()).unwrap_or(0),
        metric: 0,
    })
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let Some(mut settings) = parse(&String::from_utf8_lossy(&raw)) else {
            log::error!("bad configuration: expected {{\"header\": ..., \"deny\": ...}}");
            return false;
        };
        settings.metric = proxy_wasm::hostcalls::define_metric(MetricType::Counter, "probe_requests").unwrap_or(0);
        if settings.tick_ms > 0 {
            let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(settings.tick_ms));
        }
        self.settings = settings;
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            settings: self.settings.clone(),
            context_id,
            callout: None,
            shared: None,
            grpc_status: None,
            stream: Vec::new(),
            cancel: false,
        }))
    }

    fn on_tick(&mut self) {
        // Ticks seen by every root context of the plugin (shared data), for `/ticks`.
        let (value, cas) = self.get_shared_data("probe-ticks");
        let n = value.and_then(|v| v.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
        let _ = self.set_shared_data("probe-ticks", Some(&(n + 1).to_le_bytes()), cas);
        let keep = self.settings.tick_ms;
        let due: Vec<(u32, u32)> = HELD.with(|h| {
            let mut h = h.borrow_mut();
            for held in h.iter_mut() {
                held.1 += 1;
            }
            let (due, rest): (Vec<_>, Vec<_>) = h.drain(..).partition(|(_, ticks)| *ticks >= 2);
            *h = rest;
            if h.is_empty() {
                let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(keep));
            }
            due
        });
        for (context, ticks) in due {
            TICKED.with(|t| t.borrow_mut().push((context, ticks)));
            if proxy_wasm::hostcalls::set_effective_context(context).is_ok() {
                let _ = proxy_wasm::hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "x-ticked",
                    Some(&ticks.to_string()),
                );
                let _ = proxy_wasm::hostcalls::resume_http_request();
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// `envoy.config.core.v3.GrpcService { envoy_grpc: { cluster_name, authority } }`, encoded
/// (short ASCII fields, so the bytes are a valid `&str`).
fn grpc_service(cluster: &str, authority: &str) -> String {
    let field = |tag: u8, s: &str| {
        let mut v = vec![tag, s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    };
    let mut inner = field(0x0a, cluster);
    inner.extend(field(0x12, authority));
    let mut out = vec![0x0a, inner.len() as u8];
    out.extend(inner);
    String::from_utf8(out).unwrap_or_default()
}

struct Http {
    settings: Settings,
    context_id: u32,
    /// What the callout answered, for the response header.
    callout: Option<String>,
    /// What `/shared-get` read, for the response header.
    shared: Option<String>,
    /// The status and message of the `/grpc` call.
    grpc_status: Option<(u32, String)>,
    /// What the `/grpc-stream` stream delivered, in order.
    stream: Vec<String>,
    /// `/grpc-stream-cancel`: cancel after the first message.
    cancel: bool,
}

/// An ADS `DiscoveryRequest` for every cluster, from node `grpc-probe` (protobuf written out:
/// node = 2 { id = 1 }, type_url = 4).
fn discovery_request() -> Vec<u8> {
    let node_id = b"grpc-probe";
    let type_url = CLUSTER_TYPE.as_bytes();
    let mut m = vec![0x12, node_id.len() as u8 + 2, 0x0a, node_id.len() as u8];
    m.extend_from_slice(node_id);
    m.extend_from_slice(&[0x22, type_url.len() as u8]);
    m.extend_from_slice(type_url);
    m
}

const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

impl Context for Http {
    fn on_grpc_call_response(&mut self, _token: u32, status_code: u32, response_size: usize) {
        // A call that succeeded gets its message (status 0, no close follows); one that
        // failed gets its status.
        let message = if status_code == 0 {
            format!("{response_size} bytes")
        } else {
            self.get_grpc_status().1.unwrap_or_default()
        };
        self.grpc_status = Some((status_code, message));
        self.resume_http_request();
    }

    fn on_grpc_stream_initial_metadata(&mut self, _token: u32, _num_elements: u32) {
        let ct = self.get_grpc_stream_initial_metadata_value("content-type").unwrap_or_default();
        self.stream.push(format!("initial:{}", String::from_utf8_lossy(&ct)));
    }

    fn on_grpc_stream_message(&mut self, token: u32, message_size: usize) {
        let m = self.get_grpc_stream_message(0, message_size).unwrap_or_default();
        let typed = m.windows(CLUSTER_TYPE.len()).any(|w| w == CLUSTER_TYPE.as_bytes());
        self.stream.push(format!("message:{typed}"));
        if self.cancel {
            self.cancel_grpc_stream(token);
            let again = proxy_wasm::hostcalls::send_grpc_stream_message(token, Some(b"late"), false);
            self.stream.push(format!("cancelled,send-after:{again:?}"));
            self.resume_http_request();
        } else {
            // Half-close: the server ends the stream.
            self.close_grpc_stream(token);
        }
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, _num_elements: u32) {
        let status = self.get_grpc_stream_trailing_metadata_value("grpc-status").unwrap_or_default();
        self.stream.push(format!("trailing:{}", String::from_utf8_lossy(&status)));
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status_code: u32) {
        self.stream.push(format!("close:{status_code}"));
        self.resume_http_request();
    }

    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        let answer = format!("{status}:{}", String::from_utf8_lossy(&body));
        self.set_http_request_header("x-callout", Some(&answer));
        self.callout = Some(answer);
        self.resume_http_request();
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let _ = proxy_wasm::hostcalls::increment_metric(self.settings.metric, 1);
        let path = self
            .get_property(vec!["request", "path"])
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .unwrap_or_default();
        log::info!("request {path}");
        if path == self.settings.deny {
            self.send_http_response(403, vec![("x-denied-by", "probe")], Some(b"denied"));
            return Action::Pause;
        }
        match path.as_str() {
            "/callout" => {
                let call = self.dispatch_http_call(
                    &self.settings.callout,
                    vec![(":method", "GET"), (":path", "/check"), (":authority", &self.settings.callout_authority)],
                    None,
                    vec![],
                    Duration::from_secs(5),
                );
                return if call.is_ok() { Action::Pause } else { Action::Continue };
            }
            "/grpc" => {
                // The upstream as a serialized GrpcService (envoy_grpc: cluster and authority),
                // which Envoy and Trellis both accept; a bare cluster name works too.
                let target = grpc_service(&self.settings.grpc_cluster, "grpc.test");
                let call = self.dispatch_grpc_call(
                    &target,
                    "grpc.health.v1.Health",
                    "Check",
                    vec![],
                    Some(&[]),
                    Duration::from_secs(5),
                );
                return if call.is_ok() { Action::Pause } else { Action::Continue };
            }
            "/grpc-stream" | "/grpc-stream-cancel" => {
                self.cancel = path.ends_with("-cancel");
                let target = grpc_service(&self.settings.grpc_cluster, "grpc.test");
                let service = "envoy.service.discovery.v3.AggregatedDiscoveryService";
                let Ok(token) = self.open_grpc_stream(&target, service, "StreamAggregatedResources", vec![]) else {
                    return Action::Continue;
                };
                self.send_grpc_stream_message(token, Some(&discovery_request()), false);
                return Action::Pause;
            }
            "/tick" => {
                HELD.with(|h| h.borrow_mut().push((self.context_id, 0)));
                let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(20));
                return Action::Pause;
            }
            "/shared-set" => {
                let _ = self.set_shared_data("probe-key", Some(b"probe-value"), None);
            }
            "/ticks" => {
                let (value, _) = self.get_shared_data("probe-ticks");
                let n = value.and_then(|v| v.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
                self.shared = Some(n.to_string());
            }
            "/shared-get" => {
                let (value, _cas) = self.get_shared_data("probe-key");
                let v = value.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_else(|| "none".into());
                self.set_http_request_header("x-shared", Some(&v));
                self.shared = Some(v);
            }
            "/shared-add" => {
                let args = [5i64.to_le_bytes().as_slice(), b"probe-counter"].concat();
                let v = match proxy_wasm::hostcalls::call_foreign_function("trellis.shared_add", Some(&args)) {
                    Ok(Some(v)) => v.try_into().map(i64::from_le_bytes).map(|n| n.to_string()).unwrap_or_default(),
                    Ok(None) => "empty".into(),
                    Err(_) => "unsupported".into(),
                };
                self.set_http_request_header("x-shared", Some(&v));
            }
            "/shared-count" => {
                let (value, cas) = self.get_shared_data("probe-counter");
                let n = value.and_then(|v| v.try_into().ok()).map(i64::from_le_bytes).unwrap_or(0);
                self.set_http_request_header("x-shared", Some(&format!("{n} cas:{}", cas.unwrap_or(0))));
            }
            "/panic" => panic!("the probe was asked to panic"),
            "/huge" => {
                // 100 KiB of header value: more than any proxy should forward.
                self.set_http_request_header("x-huge", Some(&"h".repeat(100 * 1024)));
            }
            "/loop" => {
                // Spins until the host's CPU deadline stops it.
                let mut n: u64 = 1;
                while std::hint::black_box(n) != 0 {
                    n = n.wrapping_add(2);
                }
            }
            _ => {}
        }
        let seen = self.get_http_request_header("x-in").unwrap_or_default();
        self.set_http_request_header("x-probe", Some(&format!("seen:{seen}")));
        self.set_http_request_header("x-remove", None);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_request_body(0, body_size) {
            self.set_http_request_body(0, body_size, &body.to_ascii_uppercase());
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let header = self.settings.header.clone();
        self.add_http_response_header(&header, "1");
        if let Some(answer) = self.callout.take() {
            self.add_http_response_header("x-callout-resp", &answer);
        }
        // What the request phase saw, for clients to check (the request's headers are gone by
        // now in Envoy, so the context kept it).
        if let Some((code, message)) = self.grpc_status.take() {
            self.add_http_response_header("x-grpc-status", &code.to_string());
            self.add_http_response_header("x-grpc-message", &message);
        }
        if !self.stream.is_empty() {
            let log = self.stream.join(",");
            self.add_http_response_header("x-grpc-stream", &log);
        }
        if let Some(v) = self.shared.take() {
            self.add_http_response_header("x-shared", &v);
        }
        let id = self.context_id;
        let ticked = TICKED.with(|t| {
            let mut t = t.borrow_mut();
            t.iter().position(|(c, _)| *c == id).map(|i| t.remove(i).1)
        });
        if let Some(n) = ticked {
            self.add_http_response_header("x-ticked", &n.to_string());
        }
        Action::Continue
    }
}
