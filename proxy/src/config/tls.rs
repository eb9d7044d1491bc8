//! TLS transport sockets (`envoy.transport_sockets.tls`): the mesh's mTLS as Istio configures
//! it — a cluster's `UpstreamTlsContext` (ISTIO_MUTUAL) and an inbound filter chain's
//! `DownstreamTlsContext` (PeerAuthentication STRICT / PERMISSIVE). The certificate is the
//! proxy's own workload identity (SDS secret `default`, which trellis-proxy obtains itself from
//! the mesh CA, as istio-agent does for Envoy); the roots are an SDS validation secret
//! (`ROOTCA`) over ADS; peers are checked against URI SAN matchers. Anything else a TLS context
//! can say is refused by name (TLS origination to servers outside the mesh — SIMPLE / MUTUAL
//! with files or credentialName — is planned).

use envoy_types::pb::envoy::config::core::v3::{TransportSocket, config_source, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::tls_parameters::TlsProtocol;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, TlsParameters,
    UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use prost::Message;

use super::ConvertError;

pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
/// Istio's SDS name for the workload's own certificate.
pub const WORKLOAD_SECRET: &str = "default";
const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

/// A URI SAN the peer's certificate must carry (one of a list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanMatch {
    Exact(String),
    Prefix(String),
}

impl SanMatch {
    pub fn matches(&self, san: &str) -> bool {
        match self {
            SanMatch::Exact(s) => san == s,
            SanMatch::Prefix(p) => san.starts_with(p.as_str()),
        }
    }
}

/// What both sides of the mesh's mTLS share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshTls {
    /// The trust bundle (an SDS validation secret, over ADS).
    pub roots: String,
    /// The peer must carry one of these URI SANs (none: any certificate from the roots).
    pub sans: Vec<SanMatch>,
    pub alpn: Vec<String>,
    /// TLS 1.2 allowed (else 1.3 only).
    pub tls12: bool,
    pub tls13: bool,
}

/// A cluster's client TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub mesh: MeshTls,
    pub sni: String,
}

/// An inbound filter chain's server TLS (the client certificate is always required: mTLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownstreamTls {
    pub mesh: MeshTls,
}

fn socket_config<'a>(ts: &'a TransportSocket, what: &str) -> Result<&'a [u8], ConvertError> {
    if ts.name != TLS_SOCKET && ts.name != "tls" {
        return Err(ConvertError::unsupported(what, format!("transport socket {}", ts.name)));
    }
    match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => {
            if any.type_url != UPSTREAM_TLS && any.type_url != DOWNSTREAM_TLS {
                return Err(ConvertError::unsupported(what, format!("transport socket config {}", any.type_url)));
            }
            Ok(&any.value)
        }
        None => Err(ConvertError::invalid(what, "a TLS transport socket without typed_config")),
    }
}

/// A cluster's `transport_socket`.
#[allow(deprecated)] // enforce_rsa_key_usage: refused by name, not ignored
pub fn upstream(ts: &TransportSocket, what: &str) -> Result<UpstreamTls, ConvertError> {
    let what = format!("{what}, transport_socket");
    let u = UpstreamTlsContext::decode(socket_config(ts, &what)?)
        .map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
    let unsupported = [
        (u.auto_host_sni, "auto_host_sni"),
        (u.auto_sni_san_validation, "auto_sni_san_validation"),
        (u.allow_renegotiation, "allow_renegotiation"),
        (u.max_session_keys.is_some(), "max_session_keys"),
        (u.enforce_rsa_key_usage.is_some(), "enforce_rsa_key_usage"),
    ];
    refuse(&unsupported, &what)?;
    let common = u.common_tls_context.as_ref().ok_or_else(|| ConvertError::invalid(&what, "no common_tls_context"))?;
    if u.sni.is_empty() {
        return Err(ConvertError::unsupported(&what, "upstream TLS without sni (planned)"));
    }
    if rustls::pki_types::ServerName::try_from(u.sni.as_str()).is_err() {
        return Err(ConvertError::invalid(&what, format!("sni {:?} is not a DNS name", u.sni)));
    }
    Ok(UpstreamTls { mesh: mesh(common, &what)?, sni: u.sni })
}

/// An inbound filter chain's `transport_socket`.
pub fn downstream(ts: &TransportSocket, what: &str) -> Result<DownstreamTls, ConvertError> {
    let what = format!("{what}, transport_socket");
    let d = DownstreamTlsContext::decode(socket_config(ts, &what)?)
        .map_err(|e| ConvertError::invalid(&what, e.to_string()))?;
    if d.require_client_certificate.map(|b| b.value) != Some(true) {
        return Err(ConvertError::unsupported(
            &what,
            "require_client_certificate other than true (trellis-proxy terminates TLS for mTLS only)",
        ));
    }
    let unsupported = [
        (d.require_sni.is_some_and(|b| b.value), "require_sni"),
        (d.session_timeout.is_some(), "session_timeout"),
        (d.ocsp_staple_policy != 0, "ocsp_staple_policy"),
        (d.full_scan_certs_on_sni_mismatch.is_some(), "full_scan_certs_on_sni_mismatch"),
        (d.prefer_client_ciphers, "prefer_client_ciphers"),
        (d.session_ticket_keys_type.is_some(), "session_ticket_keys"),
    ];
    refuse(&unsupported, &what)?;
    let common = d.common_tls_context.as_ref().ok_or_else(|| ConvertError::invalid(&what, "no common_tls_context"))?;
    Ok(DownstreamTls { mesh: mesh(common, &what)? })
}

fn refuse(fields: &[(bool, &str)], what: &str) -> Result<(), ConvertError> {
    match fields.iter().find(|(set, _)| *set) {
        Some((_, field)) => Err(ConvertError::unsupported(what, *field)),
        None => Ok(()),
    }
}

#[allow(deprecated)]
fn mesh(c: &CommonTlsContext, what: &str) -> Result<MeshTls, ConvertError> {
    let unsupported = [
        (!c.tls_certificates.is_empty(), "common_tls_context.tls_certificates (certificate files)"),
        (c.tls_certificate_provider_instance.is_some(), "common_tls_context.tls_certificate_provider_instance"),
        (c.custom_tls_certificate_selector.is_some(), "common_tls_context.custom_tls_certificate_selector"),
        (c.tls_certificate_certificate_provider.is_some(), "common_tls_context.tls_certificate_certificate_provider"),
        (
            c.tls_certificate_certificate_provider_instance.is_some(),
            "common_tls_context.tls_certificate_certificate_provider_instance",
        ),
        (c.custom_handshaker.is_some(), "common_tls_context.custom_handshaker"),
        (c.key_log.is_some(), "common_tls_context.key_log"),
    ];
    refuse(&unsupported, what)?;
    match c.tls_certificate_sds_secret_configs.as_slice() {
        [s] if s.name == WORKLOAD_SECRET => {}
        [s] => {
            return Err(ConvertError::unsupported(
                what,
                format!(
                    "certificate secret {:?} (trellis-proxy presents its own workload certificate, SDS secret \
                     {WORKLOAD_SECRET:?}; other certificates are planned)",
                    s.name
                ),
            ));
        }
        [] => return Err(ConvertError::unsupported(what, "TLS without a client or server certificate (planned)")),
        _ => return Err(ConvertError::unsupported(what, "several certificates")),
    }
    let (tls12, tls13) = versions(c.tls_params.as_ref(), what)?;
    let (roots, validation) = match &c.validation_context_type {
        Some(ValidationContextType::CombinedValidationContext(cv)) => {
            let unsupported = [
                (cv.validation_context_certificate_provider.is_some(), "validation_context_certificate_provider"),
                (
                    cv.validation_context_certificate_provider_instance.is_some(),
                    "validation_context_certificate_provider_instance",
                ),
            ];
            refuse(&unsupported, what)?;
            let sds = cv
                .validation_context_sds_secret_config
                .as_ref()
                .ok_or_else(|| ConvertError::invalid(what, "combined_validation_context without an SDS secret"))?;
            (ads_secret(sds, what)?, cv.default_validation_context.clone().unwrap_or_default())
        }
        Some(ValidationContextType::ValidationContextSdsSecretConfig(sds)) => {
            (ads_secret(sds, what)?, CertificateValidationContext::default())
        }
        Some(ValidationContextType::ValidationContext(_)) => {
            return Err(ConvertError::unsupported(
                what,
                "an inline validation_context (the mesh's roots come from an SDS secret; CA files are planned)",
            ));
        }
        Some(_) => return Err(ConvertError::unsupported(what, "validation by certificate provider")),
        None => return Err(ConvertError::unsupported(what, "TLS without peer verification")),
    };
    Ok(MeshTls { roots, sans: sans(&validation, what)?, alpn: c.alpn_protocols.clone(), tls12, tls13 })
}

fn ads_secret(s: &SdsSecretConfig, what: &str) -> Result<String, ConvertError> {
    match s.sds_config.as_ref().and_then(|c| c.config_source_specifier.as_ref()) {
        Some(config_source::ConfigSourceSpecifier::Ads(_)) => Ok(s.name.clone()),
        _ => {
            Err(ConvertError::unsupported(what, format!("validation secret {:?} from a source other than ADS", s.name)))
        }
    }
}

#[allow(deprecated)]
fn sans(v: &CertificateValidationContext, what: &str) -> Result<Vec<SanMatch>, ConvertError> {
    let unsupported = [
        (v.trusted_ca.is_some(), "default_validation_context.trusted_ca (the roots come from SDS)"),
        (v.ca_certificate_provider_instance.is_some(), "default_validation_context.ca_certificate_provider_instance"),
        (v.system_root_certs.is_some(), "default_validation_context.system_root_certs"),
        (v.watched_directory.is_some(), "default_validation_context.watched_directory"),
        (!v.verify_certificate_spki.is_empty(), "default_validation_context.verify_certificate_spki"),
        (!v.verify_certificate_hash.is_empty(), "default_validation_context.verify_certificate_hash"),
        (!v.match_subject_alt_names.is_empty(), "default_validation_context.match_subject_alt_names"),
        (
            v.require_signed_certificate_timestamp.is_some(),
            "default_validation_context.require_signed_certificate_timestamp",
        ),
        (v.crl.is_some(), "default_validation_context.crl"),
        (v.allow_expired_certificate, "default_validation_context.allow_expired_certificate"),
        (v.trust_chain_verification != 0, "default_validation_context.trust_chain_verification"),
        (v.custom_validator_config.is_some(), "default_validation_context.custom_validator_config"),
        (v.only_verify_leaf_cert_crl, "default_validation_context.only_verify_leaf_cert_crl"),
        (v.max_verify_depth.is_some(), "default_validation_context.max_verify_depth"),
    ];
    refuse(&unsupported, what)?;
    v.match_typed_subject_alt_names
        .iter()
        .map(|m| {
            if m.san_type != SanType::Uri as i32 {
                return Err(ConvertError::unsupported(
                    what,
                    "a subject alt name matcher other than URI (mesh identities are SPIFFE URIs)",
                ));
            }
            let Some(matcher) = &m.matcher else {
                return Err(ConvertError::invalid(what, "a SAN matcher without matcher"));
            };
            if matcher.ignore_case {
                return Err(ConvertError::unsupported(what, "SAN matcher ignore_case"));
            }
            match &matcher.match_pattern {
                Some(MatchPattern::Exact(s)) => Ok(SanMatch::Exact(s.clone())),
                Some(MatchPattern::Prefix(s)) => Ok(SanMatch::Prefix(s.clone())),
                _ => Err(ConvertError::unsupported(what, "a SAN matcher other than exact or prefix")),
            }
        })
        .collect()
}

fn versions(p: Option<&TlsParameters>, what: &str) -> Result<(bool, bool), ConvertError> {
    let Some(p) = p else { return Ok((true, true)) };
    let unsupported = [
        (!p.cipher_suites.is_empty(), "tls_params.cipher_suites"),
        (!p.ecdh_curves.is_empty(), "tls_params.ecdh_curves"),
        (!p.signature_algorithms.is_empty(), "tls_params.signature_algorithms"),
    ];
    refuse(&unsupported, what)?;
    let version = |v: i32, default: TlsProtocol| match TlsProtocol::try_from(v) {
        Ok(TlsProtocol::TlsAuto) => Ok(default),
        Ok(p @ (TlsProtocol::TlSv12 | TlsProtocol::TlSv13)) => Ok(p),
        _ => Err(ConvertError::unsupported(what, "TLS versions below 1.2")),
    };
    let min = version(p.tls_minimum_protocol_version, TlsProtocol::TlSv12)?;
    let max = version(p.tls_maximum_protocol_version, TlsProtocol::TlSv13)?;
    if (min as i32) > (max as i32) {
        return Err(ConvertError::invalid(what, "tls_params: the minimum version is above the maximum"));
    }
    Ok((min == TlsProtocol::TlSv12, max == TlsProtocol::TlSv13))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{AggregatedConfigSource, ConfigSource};
    use envoy_types::pb::envoy::config::listener::v3 as lpb;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier, http_filter,
    };
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SubjectAltNameMatcher;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::CombinedCertificateValidationContext;
    use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
    use envoy_types::pb::google::protobuf::BoolValue;
    use envoy_types::util::pack_any;

    use super::*;

    fn sds(name: &str) -> SdsSecretConfig {
        SdsSecretConfig {
            name: name.into(),
            sds_config: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
                ..Default::default()
            }),
        }
    }

    /// What the control plane sends for the mesh's mTLS.
    fn common(san: MatchPattern) -> CommonTlsContext {
        CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("default")],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: SanType::Uri as i32,
                            matcher: Some(StringMatcher { match_pattern: Some(san), ..Default::default() }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds("ROOTCA")),
                    ..Default::default()
                },
            )),
            alpn_protocols: vec!["istio".into()],
            ..Default::default()
        }
    }

    fn socket(msg: impl prost::Name) -> TransportSocket {
        TransportSocket {
            name: TLS_SOCKET.into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(msg))),
        }
    }

    fn upstream_of(common: CommonTlsContext) -> Result<UpstreamTls, ConvertError> {
        let ctx = UpstreamTlsContext {
            sni: "outbound_.9080_._.reviews.bookinfo.svc.cluster.local".into(),
            common_tls_context: Some(common),
            ..Default::default()
        };
        upstream(&socket(ctx), "cluster c")
    }

    #[test]
    fn istio_mutual_client_tls_is_understood() {
        let san = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
        let t = upstream_of(common(MatchPattern::Exact(san.into()))).unwrap();
        assert_eq!(t.sni, "outbound_.9080_._.reviews.bookinfo.svc.cluster.local");
        assert_eq!(t.mesh.roots, "ROOTCA");
        assert_eq!(t.mesh.sans, vec![SanMatch::Exact(san.into())]);
        assert_eq!(t.mesh.alpn, ["istio"]);
        assert!(t.mesh.tls12 && t.mesh.tls13);
        assert!(SanMatch::Prefix("spiffe://cluster.local/".into()).matches(san));
        assert!(!SanMatch::Prefix("spiffe://other/".into()).matches(san));
    }

    #[test]
    fn what_trellis_proxy_cannot_do_is_refused_by_name() {
        let refused = |c: CommonTlsContext, field: &str| {
            let e = upstream_of(c).unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        };
        let base = || common(MatchPattern::Prefix("spiffe://cluster.local/".into()));
        let mut c = base();
        c.tls_params = Some(TlsParameters { cipher_suites: vec!["AES128".into()], ..Default::default() });
        refused(c, "tls_params.cipher_suites");
        let mut c = base();
        c.validation_context_type = Some(ValidationContextType::ValidationContext(Default::default()));
        refused(c, "inline validation_context");
        let mut c = base();
        c.tls_certificate_sds_secret_configs = vec![sds("my-credential")];
        refused(c, "certificate secret \"my-credential\"");
        let mut c = base();
        c.alpn_protocols.clear();
        c.validation_context_type = None;
        refused(c, "without peer verification");
        let mut c = base();
        if let Some(ValidationContextType::CombinedValidationContext(v)) = &mut c.validation_context_type {
            v.default_validation_context.as_mut().unwrap().match_typed_subject_alt_names[0].san_type =
                SanType::Dns as i32;
        }
        refused(c, "other than URI");
        let mut c = base();
        c.tls_params =
            Some(TlsParameters { tls_minimum_protocol_version: TlsProtocol::TlSv10 as i32, ..Default::default() });
        refused(c, "below 1.2");
        let ctx = UpstreamTlsContext { common_tls_context: Some(base()), ..Default::default() };
        let e = upstream(&socket(ctx), "cluster c").unwrap_err().to_string();
        assert!(e.contains("without sni"), "{e}");
        let ctx = UpstreamTlsContext {
            sni: "a".into(),
            allow_renegotiation: true,
            common_tls_context: Some(base()),
            ..Default::default()
        };
        let e = upstream(&socket(ctx), "cluster c").unwrap_err().to_string();
        assert!(e.contains("allow_renegotiation"), "{e}");
    }

    fn hcm_chain(protocol: &str, tls: Option<TransportSocket>) -> lpb::FilterChain {
        let hcm = HttpConnectionManager {
            stat_prefix: "inbound".into(),
            route_specifier: Some(RouteSpecifier::Rds(Rds {
                route_config_name: "inbound".into(),
                ..Default::default()
            })),
            http_filters: vec![HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                    envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::default(),
                ))),
                ..Default::default()
            }],
            ..Default::default()
        };
        lpb::FilterChain {
            filter_chain_match: (!protocol.is_empty())
                .then(|| lpb::FilterChainMatch { transport_protocol: protocol.into(), ..Default::default() }),
            filters: vec![lpb::Filter {
                name: super::super::listener::HCM.into(),
                config_type: Some(lpb::filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            transport_socket: tls,
            ..Default::default()
        }
    }

    fn listener_of(chains: Vec<lpb::FilterChain>) -> Result<super::super::ListenerConfig, ConvertError> {
        use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
        let l = lpb::Listener {
            name: "inbound".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(15006)),
                    ..Default::default()
                })),
            }),
            filter_chains: chains,
            listener_filters: vec![lpb::ListenerFilter {
                name: "envoy.filters.listener.tls_inspector".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        super::super::listener::convert(&l)
    }

    fn server_tls() -> TransportSocket {
        socket(DownstreamTlsContext {
            common_tls_context: Some(common(MatchPattern::Prefix("spiffe://cluster.local/".into()))),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        })
    }

    #[test]
    fn inbound_listeners_accept_tls_plaintext_or_both() {
        let permissive =
            listener_of(vec![hcm_chain("tls", Some(server_tls())), hcm_chain("raw_buffer", None)]).unwrap();
        assert!(permissive.transport.tls.is_some() && permissive.transport.plaintext);
        let strict = listener_of(vec![hcm_chain("tls", Some(server_tls()))]).unwrap();
        assert!(strict.transport.tls.is_some() && !strict.transport.plaintext);
        let plain = listener_of(vec![hcm_chain("", None)]).unwrap();
        assert!(plain.transport.tls.is_none() && plain.transport.plaintext);
        // TLS without a client certificate is not mTLS: refused.
        let one_way = socket(DownstreamTlsContext {
            common_tls_context: Some(common(MatchPattern::Prefix("spiffe://cluster.local/".into()))),
            ..Default::default()
        });
        let e = listener_of(vec![hcm_chain("tls", Some(one_way))]).unwrap_err().to_string();
        assert!(e.contains("require_client_certificate"), "{e}");
        let e = listener_of(vec![hcm_chain("raw_buffer", Some(server_tls()))]).unwrap_err().to_string();
        assert!(e.contains("raw_buffer"), "{e}");
        let e = listener_of(vec![hcm_chain("quic", None)]).unwrap_err().to_string();
        assert!(e.contains("transport_protocol \"quic\""), "{e}");
    }
}
