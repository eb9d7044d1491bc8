//! The built-in mirror filter: VirtualService `mirror` / `mirrors` with `mirrorPercentage`
//! (Envoy's `request_mirror_policies`, which trellis-proxy turns into this filter's
//! configuration). Per route (by `route_name`), a copy of the request — headers and body — goes
//! to each mirror cluster with the Host suffixed `-shadow`, fire and forget: the primary request
//! never waits for the shadow, and the shadow's answer is dropped.
//!
//! ```json
//! {"routes": {"bookinfo.reviews.0": [{"cluster": "outbound|9080|v2|reviews...", "percentage": 100}]}}
//! ```

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use trellis_sdk::{Counter, Decision, Filter, Request, chance, dispatch};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    routes: Rc<HashMap<String, Vec<Mirror>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Mirror {
    cluster: String,
    #[serde(default = "all")]
    percentage: f64,
    /// How long a shadow request may take (default 10 s).
    #[serde(default = "ten_seconds")]
    timeout_ms: u64,
}

fn all() -> f64 {
    100.0
}

fn ten_seconds() -> u64 {
    10_000
}

/// Most body bytes copied to a shadow; a bigger request is mirrored without its body.
const BODY_LIMIT: usize = 1 << 20;

struct MirrorFilter {
    config: Config,
    /// The mirrors this request goes to and its headers, until its body is complete.
    pending: Vec<Mirror>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// The filter's metrics, defined once per VM (a filter is made per request).
struct Counters {
    sent: Counter,
    failed: Counter,
}

fn counters() -> &'static Counters {
    static COUNTERS: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        sent: Counter::define("mirror.requests_sent"),
        failed: Counter::define("mirror.requests_failed"),
    })
}

impl MirrorFilter {
    fn send(&mut self) {
        let body = (!self.body.is_empty() && self.body.len() <= BODY_LIMIT).then_some(self.body.as_slice());
        for m in std::mem::take(&mut self.pending) {
            match dispatch(&m.cluster, &self.headers, body, Duration::from_millis(m.timeout_ms)) {
                Ok(_) => counters().sent.inc(1),
                Err(_) => counters().failed.inc(1),
            }
        }
        self.body = Vec::new();
    }
}

impl Filter for MirrorFilter {
    /// Nothing to do at a stream's end (Trellis's host then skips on_log / on_done).
    const SEES_DONE: bool = false;

    /// Never looks at responses (Trellis's host then skips on_response_headers).
    const SEES_RESPONSE: bool = false;

    type Config = Config;

    const SEES_REQUEST_BODY: bool = true;

    fn new(config: &Config) -> Self {
        // Defined with the first stream, so they show (at 0) before anything happens.
        counters();
        MirrorFilter { config: config.clone(), pending: Vec::new(), headers: Vec::new(), body: Vec::new() }
    }

    fn on_request(&mut self, req: &mut Request) -> Decision {
        if self.config.routes.is_empty() {
            return Decision::Continue;
        }
        let Some(mirrors) = req.route_name().and_then(|r| self.config.routes.get(&r)) else {
            return Decision::Continue;
        };
        self.pending = mirrors.iter().filter(|m| chance(m.percentage)).cloned().collect();
        if self.pending.is_empty() {
            return Decision::Continue;
        }
        self.headers = req
            .headers()
            .into_iter()
            .map(|(k, v)| if k == ":authority" || k == "host" { (k, shadow(&v)) } else { (k, v) })
            .filter(|(k, _)| k != "content-length" && k != "transfer-encoding")
            .collect();
        if !self.headers.iter().any(|(k, _)| k == ":authority") {
            self.headers.push((":authority".into(), shadow(&req.authority())));
        }
        if !req.has_body() {
            self.send();
        }
        Decision::Continue
    }

    fn on_request_body(&mut self, chunk: &[u8], end: bool) {
        if self.pending.is_empty() {
            return;
        }
        if self.body.len() <= BODY_LIMIT {
            self.body.extend_from_slice(chunk);
        }
        if end {
            self.send();
        }
    }
}

/// `host[:port]` → `host-shadow[:port]`, as Envoy names a mirrored request's authority.
fn shadow(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => format!("{h}-shadow:{p}"),
        _ => format!("{authority}-shadow"),
    }
}

trellis_sdk::register!(MirrorFilter);
