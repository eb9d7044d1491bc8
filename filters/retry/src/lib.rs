//! The built-in retry filter: VirtualService `retries` (Envoy's route `retry_policy`, which
//! trellis-proxy turns into this filter's configuration). Per route (by `route_name`): up to
//! `attempts` re-sends when the response matches `retryOn`, with exponential backoff and full
//! jitter, under a **retry budget** that is on by default: retries in flight may be at most
//! `budget.percent` of the requests in flight (never fewer than `budget.minRetryConcurrency`),
//! counted across every VM of the plugin, so a failing upstream cannot set off a retry storm.
//!
//! retryOn (Envoy's names): `5xx`, `gateway-error`, `connect-failure`, `refused-stream`,
//! `reset`, `retriable-4xx`, `retriable-status-codes`, `retriable-headers`, and the gRPC ones
//! `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`. Local
//! replies of the proxy (circuit-breaker overflow, no route, no healthy upstream) are never
//! retried; connection failures, resets and per-try timeouts are, as Envoy does.
//!
//! Re-sending uses the SDK's [`Decision::Resend`] (trellis-proxy's `trellis.resend`, or an
//! HTTP call on other hosts).
//!
//! ```json
//! {"routes": {"bookinfo.reviews.0": {"attempts": 3, "retryOn": ["5xx"], "retriableStatusCodes": [503]}},
//!  "budget": {"percent": 20, "minRetryConcurrency": 3}}
//! ```

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use trellis_sdk::{Counter, Decision, Filter, Request, Response, SharedCounter, random_u64};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    routes: Rc<HashMap<String, Rc<Policy>>>,
    #[serde(default)]
    budget: Budget,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Policy {
    attempts: u32,
    #[serde(default)]
    retry_on: Vec<String>,
    #[serde(default)]
    retriable_status_codes: Vec<u16>,
    /// Response headers that make a response retriable (by presence, or exact value).
    #[serde(default)]
    retriable_headers: Vec<HeaderMatch>,
    #[serde(default = "base")]
    backoff_base_ms: u64,
    /// Default: ten times the base, as Envoy.
    backoff_max_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeaderMatch {
    name: String,
    exact: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Budget {
    #[serde(default = "twenty")]
    percent: f64,
    #[serde(default = "three")]
    min_retry_concurrency: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { percent: twenty(), min_retry_concurrency: three() }
    }
}

fn base() -> u64 {
    25
}
fn twenty() -> f64 {
    20.0
}
fn three() -> u32 {
    3
}

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "connect-failure",
    "refused-stream",
    "reset",
    "retriable-4xx",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

// Envoy's response flags (StreamInfo::ResponseFlag bits), as the `response.flags` property.
const UH: u64 = 0x2;
const UT: u64 = 0x4;
const UR: u64 = 0x10;
const UF: u64 = 0x20;
const UC: u64 = 0x40;
const UO: u64 = 0x80;
const NR: u64 = 0x100;
const RESET: u64 = UT | UR | UC;

struct Retry {
    config: Config,
    policy: Option<Rc<Policy>>,
    tries: u32,
    retrying: bool,
}

/// The filter's metrics and budget counters, made once per VM (a filter is made per request).
struct Counters {
    active: SharedCounter,
    in_retry: SharedCounter,
    retries: Counter,
    overflow: Counter,
    exhausted: Counter,
}

fn counters() -> &'static Counters {
    static COUNTERS: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        active: SharedCounter("retry.active_requests".into()),
        in_retry: SharedCounter("retry.active_retries".into()),
        retries: Counter::define("retry.upstream_rq_retry"),
        overflow: Counter::define("retry.upstream_rq_retry_overflow"),
        exhausted: Counter::define("retry.upstream_rq_retry_limit_exceeded"),
    })
}

impl Retry {
    fn retriable(p: &Policy, resp: &Response) -> bool {
        let status = resp.status();
        let grpc_on = |on: &String| {
            matches!(on.as_str(), "cancelled" | "deadline-exceeded" | "internal" | "resource-exhausted" | "unavailable")
        };
        let grpc = if p.retry_on.iter().any(grpc_on) {
            resp.header("grpc-status").and_then(|g| g.parse::<u32>().ok())
        } else {
            None
        };
        // Most responses are not retriable whatever the flags say: skip reading them (the
        // proxy's own failures come with a 5xx, 404 or a listed status).
        let might = status >= 500
            || grpc.is_some_and(|g| g != 0)
            || (status == 409 && p.retry_on.iter().any(|on| on == "retriable-4xx"))
            || p.retriable_status_codes.contains(&status)
            || p.retry_on.iter().any(|on| on == "retriable-headers");
        if !might {
            return false;
        }
        let flags = resp.property(&["response", "flags"]).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let flags = flags.unwrap_or(0);
        if flags & (UO | NR | UH) != 0 {
            return false;
        }
        p.retry_on.iter().any(|on| match on.as_str() {
            "5xx" => status >= 500 || flags & (UF | RESET) != 0,
            "gateway-error" => matches!(status, 502..=504) || flags & (UF | RESET) != 0,
            "connect-failure" => flags & UF != 0,
            "refused-stream" | "reset" => flags & RESET != 0,
            "retriable-4xx" => status == 409,
            "retriable-status-codes" => p.retriable_status_codes.contains(&status),
            "retriable-headers" => p.retriable_headers.iter().any(|h| match (resp.header(&h.name), &h.exact) {
                (Some(v), Some(want)) => v == *want,
                (Some(_), None) => true,
                (None, _) => false,
            }),
            "cancelled" => grpc == Some(1),
            "deadline-exceeded" => grpc == Some(4),
            "internal" => grpc == Some(13),
            "resource-exhausted" => grpc == Some(8),
            "unavailable" => grpc == Some(14),
            _ => false,
        })
    }

    /// Full jitter over an exponential bound: random in [0, min(max, base × 2^(try-1))].
    fn backoff(p: &Policy, tries: u32) -> Duration {
        let max = p.backoff_max_ms.unwrap_or(p.backoff_base_ms * 10);
        let bound = p.backoff_base_ms.saturating_mul(1 << tries.min(20).saturating_sub(1)).min(max).max(1);
        Duration::from_millis(random_u64() % (bound + 1))
    }
}

impl Filter for Retry {
    type Config = Config;

    fn new(config: &Config) -> Self {
        // Defined with the first stream, so they show (at 0) before anything happens.
        counters();
        Retry { config: config.clone(), policy: None, tries: 0, retrying: false }
    }

    fn check(config: &Config) -> Result<(), String> {
        for (route, p) in config.routes.iter() {
            if let Some(on) = p.retry_on.iter().find(|on| !RETRY_ON.contains(&on.as_str())) {
                return Err(format!("route {route}: retryOn {on:?} is not one of {}", RETRY_ON.join(", ")));
            }
        }
        Ok(())
    }

    fn on_request(&mut self, req: &mut Request) -> Decision {
        if self.config.routes.is_empty() {
            return Decision::Continue;
        }
        let Some(p) = req.route_name().and_then(|r| self.config.routes.get(&r)) else {
            return Decision::Continue;
        };
        if p.attempts == 0 {
            return Decision::Continue;
        }
        self.policy = Some(p.clone());
        counters().active.add(1);
        req.keep_for_resend();
        Decision::Continue
    }

    fn on_response(&mut self, resp: &mut Response) -> Decision {
        let Some(p) = &self.policy else { return Decision::Continue };
        if self.retrying {
            self.retrying = false;
            counters().in_retry.add(-1);
        }
        if !Self::retriable(p, resp) {
            return Decision::Continue;
        }
        if self.tries >= p.attempts {
            counters().exhausted.inc(1);
            return Decision::Continue;
        }
        let active = counters().active.get().max(1) as f64;
        let allowed = ((active * self.config.budget.percent / 100.0) as i64)
            .max(i64::from(self.config.budget.min_retry_concurrency));
        if counters().in_retry.add(1) > allowed {
            counters().in_retry.add(-1);
            counters().overflow.inc(1);
            return Decision::Continue;
        }
        self.retrying = true;
        self.tries += 1;
        counters().retries.inc(1);
        Decision::Resend(Self::backoff(p, self.tries))
    }

    fn on_done(&mut self) {
        if self.policy.is_some() {
            counters().active.add(-1);
        }
        if self.retrying {
            counters().in_retry.add(-1);
        }
    }
}

trellis_sdk::register!(Retry);
