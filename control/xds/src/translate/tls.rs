//! Client TLS of outbound clusters, from a DestinationRule's `tls` settings:
//!
//! - `ISTIO_MUTUAL`: the workload's own certificate (SDS secret `default`) and the mesh's
//!   trust bundle (SDS secret `ROOTCA`), both over ADS as Istio names them; SNI in Istio's form
//!   `outbound_.PORT_.SUBSET_.HOST`; the peer must present one of the service's SPIFFE
//!   identities (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA` of its endpoints, or the rule's
//!   `subjectAltNames`); Istio's in-mesh ALPN.
//! - `SIMPLE` / `MUTUAL`: TLS origination to a server outside the mesh with files on the
//!   proxy's host (`caCertificates`, `clientCertificate`, `privateKey`) or an SDS secret
//!   (`credentialName`); without a CA file the system's CA bundle ([`SYSTEM_ROOTS`]); `insecureSkipVerify` turns off
//!   verification only when asked.
//!
//! The SDS secrets are served by the control plane's CA (the zero-trust issue); until then a
//! proxy waits for them as Envoy does for any missing secret.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::{
    CombinedCertificateValidationContext, ValidationContextType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher, TlsCertificate,
    UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::util::pack_any;
use trellis_model::registry::{Endpoint, Service, ServicePort};
use trellis_model::spec::{ClientTlsMode, ClientTlsSettings};

use super::clusters::ads;

/// The mesh's default trust domain (Istio's); `trellis-control --trust-domain` sets another.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Istio's SDS name for a workload's own certificate and key.
pub const WORKLOAD_SECRET: &str = "default";
/// Istio's SDS name for the mesh's trust bundle.
pub const ROOT_SECRET: &str = "ROOTCA";
pub(crate) const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
/// The system's CA bundle on the proxy's host (Debian/Ubuntu path, as Istio's proxies use);
/// Envoy has no "system roots" switch of its own.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Istio's SNI for in-mesh TLS: `outbound_.PORT_.SUBSET_.HOST`.
pub fn mesh_sni(port: u32, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

pub(crate) fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig { name: name.to_string(), sds_config: Some(ads()) }
}

/// Istio's static cluster for the workload's own SDS (the agent beside the proxy).
pub const SDS_AGENT_CLUSTER: &str = "sds-grpc";

/// Where a proxy gets its own certificate: from the agent beside it (`sds-grpc`, as Istio's
/// bootstraps name it) when it announces one (`TRELLIS_MTLS`; trellis-proxy holds its own and
/// reads the name only); else over ADS, where it never arrives — such a proxy cannot do mTLS.
pub(crate) fn workload_secret(proxy: &crate::proxy::ProxyInfo) -> SdsSecretConfig {
    use envoy_types::pb::envoy::config::core::v3::{
        ApiConfigSource, ApiVersion, ConfigSource, GrpcService, api_config_source::ApiType, config_source, grpc_service,
    };
    if !proxy.mtls {
        return sds(WORKLOAD_SECRET);
    }
    let agent = ApiConfigSource {
        api_type: ApiType::Grpc as i32,
        transport_api_version: ApiVersion::V3 as i32,
        grpc_services: vec![GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                cluster_name: SDS_AGENT_CLUSTER.into(),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    };
    SdsSecretConfig {
        name: WORKLOAD_SECRET.into(),
        sds_config: Some(ConfigSource {
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(agent)),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

fn file(path: &str) -> DataSource {
    DataSource { specifier: Some(data_source::Specifier::Filename(path.to_string())), ..Default::default() }
}

fn san(kind: SanType, value: &str) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: kind as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_string())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The transport socket for `tls`, or `None` for plaintext (`DISABLE` or no settings).
pub(crate) fn transport_socket(
    proxy: &crate::proxy::ProxyInfo,
    trust_domain: &str,
    tls: Option<&ClientTlsSettings>,
    svc: &Service,
    port: &ServicePort,
    subset: &str,
    endpoints: &[&Endpoint],
) -> Option<TransportSocket> {
    let tls = tls?;
    let context = match tls.mode {
        ClientTlsMode::DISABLE => return None,
        ClientTlsMode::ISTIO_MUTUAL => {
            let sans: BTreeSet<String> = if tls.subject_alt_names.is_empty() {
                endpoints
                    .iter()
                    .filter(|e| !e.service_account.is_empty())
                    .map(|e| spiffe_id(trust_domain, &svc.namespace, &e.service_account))
                    .collect()
            } else {
                tls.subject_alt_names.iter().cloned().collect()
            };
            let mut alpn = vec!["istio-peer-exchange".to_string(), "istio".to_string()];
            if port.protocol.is_http2() {
                alpn.push("h2".into());
            }
            UpstreamTlsContext {
                sni: if tls.sni.is_empty() { mesh_sni(port.number, subset, &svc.hostname) } else { tls.sni.clone() },
                common_tls_context: Some(CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![workload_secret(proxy)],
                    validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                        CombinedCertificateValidationContext {
                            default_validation_context: Some(CertificateValidationContext {
                                match_typed_subject_alt_names: sans.iter().map(|s| san(SanType::Uri, s)).collect(),
                                ..Default::default()
                            }),
                            validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                            ..Default::default()
                        },
                    )),
                    alpn_protocols: alpn,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
        ClientTlsMode::SIMPLE | ClientTlsMode::MUTUAL => {
            let host = svc.hostname.as_str();
            let sni = if !tls.sni.is_empty() {
                tls.sni.clone()
            } else if host.starts_with('*') {
                String::new()
            } else {
                host.to_string()
            };
            let mut common = CommonTlsContext::default();
            if !tls.credential_name.is_empty() {
                // One secret with the client certificate (MUTUAL) and the CA, as Istio's
                // credentialName: the CA half is `NAME-cacert`.
                if tls.mode == ClientTlsMode::MUTUAL {
                    common.tls_certificate_sds_secret_configs = vec![sds(&tls.credential_name)];
                }
                common.validation_context_type =
                    Some(ValidationContextType::CombinedValidationContext(CombinedCertificateValidationContext {
                        default_validation_context: Some(validation(tls, None, &sni)),
                        validation_context_sds_secret_config: Some(sds(&format!("{}-cacert", tls.credential_name))),
                        ..Default::default()
                    }));
            } else {
                if tls.mode == ClientTlsMode::MUTUAL {
                    common.tls_certificates = vec![TlsCertificate {
                        certificate_chain: Some(file(&tls.client_certificate)),
                        private_key: Some(file(&tls.private_key)),
                        ..Default::default()
                    }];
                }
                if tls.insecure_skip_verify != Some(true) {
                    let ca = (!tls.ca_certificates.is_empty()).then(|| file(&tls.ca_certificates));
                    common.validation_context_type =
                        Some(ValidationContextType::ValidationContext(validation(tls, ca, &sni)));
                }
            }
            UpstreamTlsContext { sni, common_tls_context: Some(common), ..Default::default() }
        }
    };
    Some(TransportSocket {
        name: TLS_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    })
}

/// Server verification for SIMPLE / MUTUAL: the given CA (else the system's bundle) and the
/// rule's subjectAltNames as DNS names, else the SNI (as Istio verifies by default).
fn validation(tls: &ClientTlsSettings, ca: Option<DataSource>, sni: &str) -> CertificateValidationContext {
    let system = (ca.is_none() && tls.credential_name.is_empty()).then(|| file(SYSTEM_ROOTS));
    let sans: Vec<&str> = if tls.subject_alt_names.is_empty() {
        [sni].into_iter().filter(|s| !s.is_empty()).collect()
    } else {
        tls.subject_alt_names.iter().map(String::as_str).collect()
    };
    CertificateValidationContext {
        trusted_ca: ca.or(system),
        match_typed_subject_alt_names: sans.into_iter().map(|s| san(SanType::Dns, s)).collect(),
        ..Default::default()
    }
}
