//! The built-in filter modules, embedded at build time (see build.rs): fault, retry, mirror and
//! auth, each a proxy-wasm module written with trellis-sdk (filters/). trellis-proxy turns
//! Envoy's native per-route fault config, retry policies, mirror policies and RBAC filters into
//! their configuration (config/builtin.rs) and runs them in the listener's chain: auth where
//! the RBAC filters sit, fault where Envoy's fault filter sits, then mirror and retry next to
//! the router.

pub const FAULT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fault.wasm"));
pub const RETRY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/retry.wasm"));
pub const MIRROR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mirror.wasm"));
pub const AUTH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/auth.wasm"));
