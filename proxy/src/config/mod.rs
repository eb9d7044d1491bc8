//! The proxy's configuration: Envoy v3 resources converted, off the data path, into the
//! types the listeners, router and clusters use. A [`Snapshot`] is immutable; the xDS client
//! builds a new one for every accepted update and publishes it whole, so a request sees the
//! old configuration or the new one, never a mix. Anything the proxy cannot execute exactly
//! is a [`ConvertError`] naming the resource and field — the update is NACKed with it.

pub mod builtin;
pub mod cluster;
pub mod listener;
pub mod route;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::{Message, Name};

pub use cluster::{ClusterConfig, Discovery, EndpointConfig, LocalityGroup};
pub use listener::{ListenerConfig, ListenerKind};
pub use route::RouteTable;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Why a resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{what}: {field} is not supported by trellis-proxy")]
    Unsupported { what: String, field: String },
    #[error("{what}: invalid: {reason}")]
    Invalid { what: String, reason: String },
}

impl ConvertError {
    pub fn unsupported(what: &str, field: impl Into<String>) -> Self {
        ConvertError::Unsupported { what: what.to_string(), field: field.into() }
    }

    pub fn invalid(what: &str, reason: impl Into<String>) -> Self {
        ConvertError::Invalid { what: what.to_string(), reason: reason.into() }
    }
}

pub(crate) fn duration(d: &PbDuration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// Everything the proxy runs with.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every accepted update.
    pub version: u64,
    pub listeners: BTreeMap<String, Arc<ListenerConfig>>,
    pub routes: BTreeMap<String, Arc<RouteTable>>,
    pub clusters: BTreeMap<String, Arc<ClusterConfig>>,
    /// EDS: by service name.
    pub endpoints: BTreeMap<String, Arc<Vec<LocalityGroup>>>,
    /// SDS: trust bundles by secret name (`ROOTCA`: the mesh's roots).
    pub trust_bundles: BTreeMap<String, Arc<TrustBundle>>,
}

/// Roots to trust, from an SDS validation-context secret.
#[derive(Clone)]
pub struct TrustBundle {
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The same roots, ready for verification.
    pub store: Arc<rustls::RootCertStore>,
    /// Client certificates chained to these roots (the server side of mTLS).
    pub client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.roots == other.roots
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle").field("roots", &self.roots.len()).finish()
    }
}

impl TrustBundle {
    pub fn new(roots: Vec<rustls::pki_types::CertificateDer<'static>>) -> Result<TrustBundle, String> {
        let mut store = rustls::RootCertStore::empty();
        for (i, r) in roots.iter().enumerate() {
            store.add(r.clone()).map_err(|e| format!("root {}: {e}", i + 1))?;
        }
        let store = Arc::new(store);
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(store.clone(), crate::tls::provider())
                .build()
                .map_err(|e| e.to_string())?;
        Ok(TrustBundle { roots, store, client_verifier })
    }
}

/// An SDS secret: only validation contexts with inline roots (trellis-proxy gets its own
/// certificate from the mesh CA, so `tls_certificate` secrets are refused, naming the field).
fn trust_bundle(s: &Secret) -> Result<TrustBundle, ConvertError> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    use rustls::pki_types::pem::PemObject;
    let what = format!("secret {}", s.name);
    let vc = match &s.r#type {
        Some(Type::ValidationContext(vc)) => vc,
        Some(Type::TlsCertificate(_)) => return Err(ConvertError::unsupported(&what, "tls_certificate")),
        Some(Type::SessionTicketKeys(_)) => return Err(ConvertError::unsupported(&what, "session_ticket_keys")),
        Some(Type::GenericSecret(_)) => return Err(ConvertError::unsupported(&what, "generic_secret")),
        None => return Err(ConvertError::invalid(&what, "no secret")),
    };
    #[allow(deprecated)] // still sent by some control planes: refused by name, not ignored
    let old_sans = !vc.match_subject_alt_names.is_empty();
    let unsupported = [
        (old_sans, "validation_context.match_subject_alt_names"),
        (!vc.match_typed_subject_alt_names.is_empty(), "validation_context.match_typed_subject_alt_names"),
        (!vc.verify_certificate_spki.is_empty(), "validation_context.verify_certificate_spki"),
        (!vc.verify_certificate_hash.is_empty(), "validation_context.verify_certificate_hash"),
        (vc.crl.is_some(), "validation_context.crl"),
        (vc.custom_validator_config.is_some(), "validation_context.custom_validator_config"),
        (vc.ca_certificate_provider_instance.is_some(), "validation_context.ca_certificate_provider_instance"),
        (vc.watched_directory.is_some(), "validation_context.watched_directory"),
    ];
    if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(ConvertError::unsupported(&what, *field));
    }
    let pem: Vec<u8> = match vc.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        Some(Specifier::InlineString(t)) => t.clone().into_bytes(),
        Some(Specifier::Filename(_)) => return Err(ConvertError::unsupported(&what, "trusted_ca.filename")),
        Some(Specifier::EnvironmentVariable(_)) => {
            return Err(ConvertError::unsupported(&what, "trusted_ca.environment_variable"));
        }
        None => return Err(ConvertError::invalid(&what, "validation_context.trusted_ca is empty")),
    };
    let roots = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConvertError::invalid(&what, format!("trusted_ca is not PEM certificates: {e:?}")))?;
    if roots.is_empty() {
        return Err(ConvertError::invalid(&what, "trusted_ca holds no certificate"));
    }
    TrustBundle::new(roots).map_err(|e| ConvertError::invalid(&what, format!("trusted_ca: {e}")))
}

impl Snapshot {
    /// The endpoints of a cluster: inline, or from EDS (empty until they arrive).
    pub fn cluster_endpoints(&self, c: &ClusterConfig) -> Arc<Vec<LocalityGroup>> {
        match &c.discovery {
            Discovery::Eds(service) => self.endpoints.get(service).cloned().unwrap_or_default(),
            Discovery::Static(g) | Discovery::Dns(g) => Arc::new(g.clone()),
            Discovery::OriginalDst => Arc::default(),
        }
    }

    /// EDS names the clusters need.
    pub fn eds_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .clusters
            .values()
            .filter_map(|c| match &c.discovery {
                Discovery::Eds(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// RDS names the listeners need.
    pub fn rds_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.listeners.values().filter_map(|l| l.route_name().map(String::from)).collect();
        v.sort();
        v.dedup();
        v
    }
}

fn decode<M: Message + Default + Name>(any: &Any, name: &str) -> Result<M, ConvertError> {
    if any.type_url != M::type_url() {
        return Err(ConvertError::invalid(name, format!("type {} where {} was expected", any.type_url, M::type_url())));
    }
    M::decode(any.value.as_slice()).map_err(|e| ConvertError::invalid(name, format!("cannot decode: {e}")))
}

/// Converts one type's resources (name → encoded resource) into `snap`, replacing that
/// type's part. Every bad resource is reported (joined), none is applied.
pub fn apply_type(snap: &mut Snapshot, type_url: &str, resources: &BTreeMap<String, Any>) -> Result<(), String> {
    let mut errors = Vec::new();
    macro_rules! convert_all {
        ($ty:ty, $convert:expr) => {{
            let mut out = BTreeMap::new();
            for (name, any) in resources {
                match decode::<$ty>(any, name).and_then(|r| $convert(&r)) {
                    Ok(v) => {
                        out.insert(name.clone(), Arc::new(v));
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            out
        }};
    }
    match type_url {
        CLUSTER_TYPE => snap.clusters = convert_all!(Cluster, cluster::convert),
        LISTENER_TYPE => snap.listeners = convert_all!(Listener, listener::convert),
        ROUTE_TYPE => snap.routes = convert_all!(RouteConfiguration, route::convert),
        SECRET_TYPE => snap.trust_bundles = convert_all!(Secret, trust_bundle),
        ENDPOINT_TYPE => {
            snap.endpoints = convert_all!(ClusterLoadAssignment, |cla: &ClusterLoadAssignment| {
                cluster::load_assignment(cla, &format!("endpoints {}", cla.cluster_name), false)
            })
        }
        other => return Err(format!("resource type {other} is not served to trellis-proxy")),
    }
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

#[cfg(test)]
mod sds_tests {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, SubjectAltNameMatcher, TlsCertificate, secret,
    };

    use super::*;

    fn bundle_secret(pem: &str) -> Secret {
        Secret {
            name: "ROOTCA".into(),
            r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: Some(DataSource {
                    specifier: Some(Specifier::InlineBytes(pem.as_bytes().to_vec())),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_validation_context_with_inline_roots_is_a_trust_bundle_and_anything_else_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let root = rcgen::CertificateParams::new(vec!["root.test".to_string()]).unwrap().self_signed(&key).unwrap();
        let b = trust_bundle(&bundle_secret(&format!("{}{}", root.pem(), root.pem()))).unwrap();
        assert_eq!(b.roots.len(), 2);
        assert_eq!(b.roots[0].as_ref(), root.der().as_ref());
        let cert =
            Secret { name: "default".into(), r#type: Some(secret::Type::TlsCertificate(TlsCertificate::default())) };
        assert_eq!(
            trust_bundle(&cert).unwrap_err().to_string(),
            "secret default: tls_certificate is not supported by trellis-proxy"
        );
        let mut pinned = bundle_secret(&root.pem());
        if let Some(secret::Type::ValidationContext(vc)) = &mut pinned.r#type {
            vc.match_typed_subject_alt_names.push(SubjectAltNameMatcher::default());
        }
        assert!(trust_bundle(&pinned).unwrap_err().to_string().contains("match_typed_subject_alt_names"));
        assert!(trust_bundle(&bundle_secret("junk")).unwrap_err().to_string().contains("holds no certificate"));
    }
}
