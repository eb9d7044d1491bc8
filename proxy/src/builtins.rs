//! The built-in filter modules, embedded at build time (see build.rs): fault, retry and mirror,
//! each a proxy-wasm module written with trellis-sdk (filters/). trellis-proxy turns Envoy's
//! native per-route fault config, retry policies and mirror policies into their configuration
//! (config/builtin.rs) and runs them in the listener's chain: fault where Envoy's fault filter
//! sits, then mirror and retry next to the router.

pub const FAULT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fault.wasm"));
pub const RETRY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/retry.wasm"));
pub const MIRROR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mirror.wasm"));
