//! abi-probe: a filter written with the upstream `proxy-wasm` crate that exercises the ABI the
//! way real filters do — configuration, headers, bodies, properties, local replies, http
//! callouts, shared data, metrics, logs — plus two hostile paths (`/panic`, `/loop`). The wasm
//! host's tests run it; the differential tests will run it in Envoy too.
//!
//! Configuration (JSON): `{"header": "x-probe-resp", "deny": "/deny"}`.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Settings {
    header: String,
    deny: String,
    metric: u32,
}

#[derive(Default)]
struct Root {
    settings: Settings,
}

impl Context for Root {}

/// The two string fields of `{"header": "...", "deny": "..."}`; anything else is refused.
fn parse(config: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(config).ok()?;
    let obj = v.as_object()?;
    if obj.keys().any(|k| k != "header" && k != "deny") {
        return None;
    }
    Some((obj.get("header")?.as_str()?.to_string(), obj.get("deny")?.as_str()?.to_string()))
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let Some((header, deny)) = parse(&String::from_utf8_lossy(&raw)) else {
            log::error!("bad configuration: expected {{\"header\": ..., \"deny\": ...}}");
            return false;
        };
        let metric = proxy_wasm::hostcalls::define_metric(MetricType::Counter, "probe_requests").unwrap_or(0);
        self.settings = Settings { header, deny, metric };
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http { settings: self.settings.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    settings: Settings,
}

impl Context for Http {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        self.set_http_request_header("x-callout", Some(&format!("{status}:{}", String::from_utf8_lossy(&body))));
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
                    "auth",
                    vec![(":method", "GET"), (":path", "/check"), (":authority", "auth")],
                    None,
                    vec![],
                    Duration::from_secs(5),
                );
                return if call.is_ok() { Action::Pause } else { Action::Continue };
            }
            "/shared-set" => {
                let _ = self.set_shared_data("probe-key", Some(b"probe-value"), None);
            }
            "/shared-get" => {
                let (value, _cas) = self.get_shared_data("probe-key");
                let v = value.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_else(|| "none".into());
                self.set_http_request_header("x-shared", Some(&v));
            }
            "/panic" => panic!("the probe was asked to panic"),
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
        Action::Continue
    }
}
