//! trellis-wasm-host: the proxy-wasm ABI v0.2.1 host on wasmtime. The one crate that owns
//! wasmtime. Modules built with the upstream `proxy-wasm` crate 0.2.x (or for Envoy) run
//! unchanged: [`imports`] implements the `env` imports and the WASI functions wasip1 modules
//! use; [`Vm`] runs the lifecycle (root context, on_vm_start, on_configure, stream contexts,
//! ticks, done / delete) under a memory limit and a CPU deadline per callback; [`Host`]
//! compiles each module once (cached by sha256) and keeps shared data and queues by `vm_id`.
//!
//! What it does not know: HTTP, sockets, xDS. The embedder (trellis-proxy, the testkit) fills
//! a [`Stream`] with headers, bodies and properties, calls the callbacks, and acts on what the
//! filter left: changed headers, a local response, callouts to perform.

pub mod abi;
pub mod host;
pub mod imports;
pub mod state;
pub mod vm;

pub use abi::{Action, Pairs};
pub use host::{CompiledModule, Host, LoadError, compile_to_file, sha256_hex};
pub use state::{Callout, GrpcOp, LocalResponse, PluginConfig, Properties, SharedProperties, Stream};
pub use vm::{Limits, Vm, VmError};
