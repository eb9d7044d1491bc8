//! Trellis's xDS: how configuration reaches proxies.
//!
//! [`translate`] is a pure function: validated config + the service registry + one proxy's
//! identity → the Envoy v3 resources that proxy needs (CDS, EDS, LDS, RDS), deterministic and
//! named like Istio's (`outbound|PORT|SUBSET|HOST`). It emits standard Envoy configuration only,
//! so Envoy and trellis-proxy consume the same resources. The ADS server (SotW and Delta) is
//! built on top and is the only part that does I/O.
//!
//! Depends on the model and envoy-types; knows nothing of stores or HTTP.

pub mod client;
pub mod hub;
pub mod proxy;
pub mod server;
pub mod translate;

pub use hub::{Hub, HubOptions};
pub use proxy::ProxyInfo;
pub use server::AdsServer;
pub use translate::{ConfigSnapshot, Translated, translate};
