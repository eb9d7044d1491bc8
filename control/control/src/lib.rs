//! The Trellis control plane.
//!
//! Today: the configuration API. It serves Istio-compatible resources over REST/JSON with
//! Kubernetes-style paths, validates every write with [`trellis_model`], keeps them in a
//! [`trellis_store`] backend (embedded by default, etcd to scale out) and streams changes to
//! watchers. Later issues add the xDS server, the CA and multi-cluster discovery here.
//!
//! Flow: HTTP request → [`auth`] (bearer token) → [`api`] handler → validate → store. Nothing is
//! stored from a request that fails validation.

pub mod api;
pub mod auth;
pub mod ca;
pub mod certs;
pub mod config;
pub mod config_apply;
pub mod debug;
pub mod index;
pub mod tls;

pub use api::{ApiState, router};
