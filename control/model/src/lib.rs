//! Trellis's configuration model.
//!
//! In: Istio configuration (YAML or JSON, multi-document) exactly as Istio users write it, plus
//! Trellis's own kinds (`trellis.dev/v1alpha1`). Out: [`Resource`] envelopes whose `spec` has been
//! checked against typed Istio-compatible structs ([`spec`]), per-resource validation errors that
//! name the field path ([`validate`]), and cross-resource diagnostics like `istioctl analyze`
//! ([`analyze`]).
//!
//! This crate has no I/O and depends on serde only: the store, the API, the CLI and the xDS
//! translator all share it.

pub mod analyze;
pub mod duration;
pub mod kind;
pub mod meta;
pub mod parse;
pub mod registry;
pub mod spec;
pub mod validate;

pub use analyze::{Diagnostic, Severity, analyze};
pub use kind::Kind;
pub use meta::{ObjectMeta, Resource, ResourceKey};
pub use parse::{ParseError, ParsedDocument, parse_documents};
pub use validate::{FieldError, ValidationErrors, validate_resource};
