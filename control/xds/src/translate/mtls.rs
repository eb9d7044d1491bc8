//! PeerAuthentication → what a workload's inbound listeners accept, as Istio decides it:
//!
//! - Scopes: mesh-wide (the root namespace, no selector), namespace-wide (no selector), and
//!   workload (a selector matching the proxy's labels); the narrowest policy with a mode wins,
//!   `UNSET` inherits from the wider one, and with no policy at all the mode is PERMISSIVE.
//!   Several policies in one scope: the first by name applies (`trellis analyze`: TRL0201).
//! - `portLevelMtls` (workload policies only) overrides the mode per workload port (the port the
//!   application listens on); `UNSET` there inherits the workload's mode.
//! - STRICT: a TLS filter chain only (plaintext matches no chain and is closed); PERMISSIVE: a
//!   TLS chain and a plaintext chain, told apart by the TLS inspector; DISABLE: plaintext only.
//! - The TLS chain presents the workload certificate (SDS `default`), requires a client
//!   certificate from the mesh's roots (SDS `ROOTCA`) in the mesh's trust domain.
//!
//! A proxy that cannot hold a workload certificate (no `TRELLIS_MTLS` in its node metadata: an
//! Envoy without an SDS agent, a trellis-proxy without `identity`) gets plaintext where the mode
//! allows it and, under STRICT, a TLS chain it cannot serve: closed, never open.
//!
//! The shared inbound listener serves several ports, and TLS is decided before the port is
//! known: when its ports' modes differ, it accepts TLS if any port does and plaintext only if
//! every port does (a port-level DISABLE there still accepts mTLS; Sidecar `ingress`
//! listeners, one per port, give each port exactly its mode).

use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::{
    CombinedCertificateValidationContext, ValidationContextType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SubjectAltNameMatcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;
use trellis_model::analyze::ROOT_NAMESPACE;
use trellis_model::spec::{MtlsMode, PeerAuthentication, Spec};

use super::clusters::{App, InboundPort};
use super::listeners::{chain, tls_inspector};
use super::tls::{ROOT_SECRET, sds, workload_secret};
use super::{Scope, selects};

/// What a port accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Strict,
    Permissive,
    Disable,
}

impl Mode {
    fn of(m: MtlsMode) -> Option<Mode> {
        match m {
            MtlsMode::STRICT => Some(Mode::Strict),
            MtlsMode::PERMISSIVE => Some(Mode::Permissive),
            MtlsMode::DISABLE => Some(Mode::Disable),
            MtlsMode::UNSET => None,
        }
    }

    pub fn tls(self) -> bool {
        self != Mode::Disable
    }

    pub fn plaintext(self) -> bool {
        self != Mode::Strict
    }
}

/// The proxy's workload mode and its port-level overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerAuthn {
    pub workload: Mode,
    pub ports: Vec<(u32, Mode)>,
}

impl PeerAuthn {
    pub fn of(scope: &Scope<'_>) -> PeerAuthn {
        let ns = scope.proxy.namespace.as_str();
        let first = |pick: &dyn Fn(&str, &PeerAuthentication) -> bool| {
            scope.config.items.iter().find_map(|(k, s)| match s {
                Spec::PeerAuthentication(pa) if pick(&k.namespace, pa) => Some(pa),
                _ => None,
            })
        };
        let unselected = |pa: &PeerAuthentication| pa.selector.as_ref().is_none_or(|s| s.match_labels.is_empty());
        let mesh = first(&|n, pa| n == ROOT_NAMESPACE && unselected(pa));
        let namespace = first(&|n, pa| n == ns && n != ROOT_NAMESPACE && unselected(pa));
        let workload = first(&|n, pa| {
            n == ns
                && pa
                    .selector
                    .as_ref()
                    .is_some_and(|s| !s.match_labels.is_empty() && selects(&s.match_labels, &scope.proxy.labels))
        });
        let mut mode = Mode::Permissive;
        for pa in [mesh, namespace, workload].into_iter().flatten() {
            if let Some(m) = pa.mtls.as_ref().and_then(|m| Mode::of(m.mode)) {
                mode = m;
            }
        }
        let ports = workload
            .map(|pa| {
                pa.port_level_mtls
                    .iter()
                    .filter_map(|(port, m)| Some((port.parse().ok()?, Mode::of(m.mode).unwrap_or(mode))))
                    .collect()
            })
            .unwrap_or_default();
        PeerAuthn { workload: mode, ports }
    }

    /// The mode of an inbound port. Its workload port decides, as in Istio: the port traffic
    /// arrives on (a Sidecar `ingress` port, else the endpoint's target port).
    pub fn port(&self, p: &InboundPort) -> Mode {
        let workload_port = match (&p.bind, &p.app) {
            (None, App::Socket(_, port)) => *port,
            _ => p.number,
        };
        self.ports.iter().find(|(n, _)| *n == workload_port).map(|(_, m)| *m).unwrap_or(self.workload)
    }

    /// What the shared inbound listener accepts for these ports: (TLS, plaintext).
    pub fn shared(&self, ports: &[InboundPort]) -> (bool, bool) {
        let modes: Vec<Mode> =
            if ports.is_empty() { vec![self.workload] } else { ports.iter().map(|p| self.port(p)).collect() };
        (modes.iter().any(|m| m.tls()), modes.iter().all(|m| m.plaintext()))
    }
}

/// The server side of the mesh's mTLS for an inbound chain.
fn downstream_tls(scope: &Scope<'_>, http: bool) -> TransportSocket {
    let trust_domain = scope.config.trust_domain();
    let context = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![workload_secret(scope.proxy)],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: SanType::Uri as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Prefix(format!(
                                    "spiffe://{trust_domain}/"
                                ))),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                    ..Default::default()
                },
            )),
            alpn_protocols: if http { vec!["h2".into(), "http/1.1".into()] } else { Vec::new() },
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: super::tls::TLS_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    }
}

/// Gives `listener` (one plaintext chain running `filter`) the chains `(tls, plaintext)` say.
pub(crate) fn secure(
    scope: &Scope<'_>,
    listener: &mut Listener,
    filter: Filter,
    http: bool,
    (tls, plaintext): (bool, bool),
) {
    // Without a workload certificate TLS cannot be served: plaintext where allowed, and a TLS
    // chain that fails every handshake where nothing else is.
    let tls = tls && (scope.proxy.mtls || !plaintext);
    if !tls {
        return;
    }
    let mut chains = vec![FilterChain {
        filter_chain_match: Some(FilterChainMatch { transport_protocol: "tls".into(), ..Default::default() }),
        transport_socket: Some(downstream_tls(scope, http)),
        ..chain(filter.clone())
    }];
    if plaintext {
        chains.push(FilterChain {
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: "raw_buffer".into(),
                ..Default::default()
            }),
            ..chain(filter)
        });
    }
    listener.filter_chains = chains;
    listener.listener_filters = vec![tls_inspector()];
}
