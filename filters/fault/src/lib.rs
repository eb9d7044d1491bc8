//! The built-in fault filter: VirtualService `fault` (Envoy's fault filter per-route config,
//! which trellis-proxy turns into this filter's configuration). Per route (by `route_name`):
//! a delay (fixed, for a percentage of requests), then an abort (HTTP status or gRPC status,
//! for a percentage). Aborted requests never reach the upstream.
//!
//! ```json
//! {"routes": {"bookinfo.reviews.0": {
//!     "delay": {"fixedDelayMs": 500, "percentage": 10},
//!     "abort": {"httpStatus": 503, "percentage": 1.5}}}}
//! ```

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use trellis_sdk::{Counter, Decision, Filter, LocalReply, Request, chance};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Faults by route name.
    #[serde(default)]
    routes: Rc<HashMap<String, RouteFault>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteFault {
    delay: Option<Delay>,
    abort: Option<Abort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Delay {
    fixed_delay_ms: u64,
    #[serde(default = "all")]
    percentage: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Abort {
    http_status: Option<u32>,
    grpc_status: Option<u32>,
    /// The body of the reply (default `fault filter abort`).
    body: Option<String>,
    #[serde(default = "all")]
    percentage: f64,
}

fn all() -> f64 {
    100.0
}

struct Fault {
    config: Config,
}

/// The filter's metrics, defined once per VM (a filter is made per request).
struct Counters {
    delays: Counter,
    aborts: Counter,
}

fn counters() -> &'static Counters {
    static COUNTERS: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        delays: Counter::define("fault.delays_injected"),
        aborts: Counter::define("fault.aborts_injected"),
    })
}

impl Filter for Fault {
    /// Nothing to do at a stream's end (Trellis's host then skips on_log / on_done).
    const SEES_DONE: bool = false;

    /// Never looks at responses (Trellis's host then skips on_response_headers).
    const SEES_RESPONSE: bool = false;

    type Config = Config;

    fn new(config: &Config) -> Self {
        // Defined with the first stream, so they show (at 0) before anything happens.
        counters();
        Fault { config: config.clone() }
    }

    fn on_request(&mut self, req: &mut Request) -> Decision {
        if self.config.routes.is_empty() {
            return Decision::Continue;
        }
        let Some(fault) = req.route_name().and_then(|r| self.config.routes.get(&r)) else {
            return Decision::Continue;
        };
        let abort = fault.abort.as_ref().filter(|a| chance(a.percentage)).map(|a| {
            counters().aborts.inc(1);
            let body = a.body.as_deref().unwrap_or("fault filter abort");
            match (a.http_status, a.grpc_status) {
                (_, Some(code)) => LocalReply::grpc_code(code, body),
                (Some(status), None) => LocalReply::new(status).body(body),
                (None, None) => LocalReply::new(503).body(body),
            }
        });
        match fault.delay.as_ref().filter(|d| d.fixed_delay_ms > 0 && chance(d.percentage)) {
            Some(d) => {
                counters().delays.inc(1);
                Decision::Delay(Duration::from_millis(d.fixed_delay_ms), abort)
            }
            None => abort.map(Decision::Reply).unwrap_or(Decision::Continue),
        }
    }
}

trellis_sdk::register!(Fault);
