//! trellis-ca: the mesh's certificate authority. It signs with a root it made itself (created
//! once, kept in the store so every control-plane replica signs with the same one) or with a
//! plugged-in CA from files in Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`,
//! `root-cert.pem`, `cert-chain.pem`), so several clusters can share one root of trust.
//!
//! Workloads send a CSR (their key never leaves them) and get an X.509 SVID: the URI SAN
//! `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT` of the identity the caller is
//! entitled to — a CSR asking for any other name is refused — valid for the asked TTL (24 h by
//! default), never beyond the signing certificate. The answer is the chain a proxy presents:
//! the leaf, then the signing certificate up to the root. The trust bundle is every root in
//! `root-cert.pem` (old and new together while a root rotates).
//!
//! The CA key is never logged or returned: [`CaMaterial`]'s `Debug` leaves it out.

pub mod api;

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// An SVID's lifetime unless the caller asks for another.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The shortest and longest lifetimes the CA signs.
pub const MIN_TTL: Duration = Duration::from_secs(10);
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// How far back a certificate's validity starts (clocks between machines disagree a little).
const BACKDATE: Duration = Duration::from_secs(60);
/// A self-signed root's lifetime.
const ROOT_YEARS: i64 = 10;

/// Why the CA refused or failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaError {
    /// A CA file (or the stored CA) is missing or wrong: which one and why.
    #[error("{file}: {reason}")]
    Material { file: String, reason: String },
    #[error("the CSR is not valid: {0}")]
    BadCsr(String),
    #[error("the CSR asks for {asked}; this caller may only get {allowed}")]
    WrongIdentity { asked: String, allowed: String },
    #[error("{0}")]
    BadIdentity(String),
    #[error("a certificate lifetime must be between {}s and {}s, not {}s", MIN_TTL.as_secs(), MAX_TTL.as_secs(), .0.as_secs())]
    Ttl(Duration),
    #[error("signing failed: {0}")]
    Sign(String),
}

fn material(file: &str, reason: impl std::fmt::Display) -> CaError {
    CaError::Material { file: file.to_string(), reason: reason.to_string() }
}

/// A workload identity: a service account in a namespace of a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Whether `s` may be a path segment of a SPIFFE ID: letters, digits, `.`, `-`, `_`.
fn segment_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Identity, CaError> {
        for (what, v) in
            [("trust domain", trust_domain), ("namespace", namespace), ("service account", service_account)]
        {
            if !segment_ok(v) {
                return Err(CaError::BadIdentity(format!(
                    "{what} {v:?} is not a valid SPIFFE ID segment (letters, digits, '.', '-', '_')"
                )));
            }
        }
        Ok(Identity {
            trust_domain: trust_domain.to_ascii_lowercase(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`
    pub fn uri(&self) -> String {
        format!("spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }

    /// The identity a SPIFFE ID in Istio's form names.
    pub fn parse(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let (td, ns_key, ns, sa_key, sa) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || ns_key != "ns" || sa_key != "sa" {
            return None;
        }
        Identity::new(td, ns, sa).ok()
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri())
    }
}

/// What the CA signs with, as PEM, in Istio's `cacerts` layout. Stored as JSON when Trellis
/// made the root itself. `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaMaterial {
    /// `ca-cert.pem`: the certificate the CA signs with (the root itself, or an intermediate).
    pub ca_cert: String,
    /// `ca-key.pem`: its private key.
    pub ca_key: String,
    /// `cert-chain.pem`: from `ca_cert` up to and including the root.
    pub cert_chain: String,
    /// `root-cert.pem`: the roots workloads trust (two while a root rotates).
    pub root_cert: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"<redacted>")
            .field("cert_chain", &self.cert_chain)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

/// The files of Istio's `cacerts` layout, in the order [`CaMaterial::from_dir`] reads them.
pub const CACERTS_FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"];

impl CaMaterial {
    /// A new self-signed root for `trust_domain`, valid for ten years.
    pub fn self_signed(trust_domain: &str) -> Result<CaMaterial, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(format!("generating the root key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name.push(DnType::CommonName, "Trellis mesh root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + time::Duration::days(365 * ROOT_YEARS);
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).map_err(|e| CaError::Sign(format!("signing the root: {e}")))?;
        let pem = cert.pem();
        Ok(CaMaterial { ca_cert: pem.clone(), ca_key: key.serialize_pem(), cert_chain: pem.clone(), root_cert: pem })
    }

    /// Reads a plugged-in CA from `dir` (Istio's `cacerts` layout; all four files).
    pub fn from_dir(dir: &Path) -> Result<CaMaterial, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| material(&path.display().to_string(), e))
        };
        Ok(CaMaterial {
            ca_cert: read("ca-cert.pem")?,
            ca_key: read("ca-key.pem")?,
            root_cert: read("root-cert.pem")?,
            cert_chain: read("cert-chain.pem")?,
        })
    }
}

/// A random 16-byte positive serial number.
fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// The PEM certificates in `pem`, each re-encoded alone, with their DER.
fn certificates(file: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material(file, format!("not PEM certificates: {e:?}")))?;
    if certs.is_empty() {
        return Err(material(file, "holds no certificate"));
    }
    Ok(certs)
}

fn to_pem(der: &CertificateDer<'_>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()), config)
}

/// The names in a certificate's subject alternative names (DER): URIs as they are, other
/// kinds described. Empty when it has none or does not parse.
pub fn subject_alt_names(der: &[u8]) -> Vec<String> {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(sans)) = c.subject_alternative_name() else { return Vec::new() };
    sans.value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// A CA ready to sign.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate up to the root, as the chain after a leaf.
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    signer_not_after: OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).field("roots", &self.roots.len()).finish()
    }
}

impl Ca {
    /// Checks `m` (a CA certificate whose key is `ca_key`, a chain from it to one of the roots)
    /// and makes the CA for `trust_domain`. Errors name the file at fault.
    pub fn new(trust_domain: &str, m: &CaMaterial) -> Result<Ca, CaError> {
        if !segment_ok(trust_domain) {
            return Err(CaError::BadIdentity(format!("trust domain {trust_domain:?} is not valid")));
        }
        let key =
            KeyPair::from_pem(&m.ca_key).map_err(|e| material("ca-key.pem", format!("not a private key: {e}")))?;
        let ca = certificates("ca-cert.pem", &m.ca_cert)?.remove(0);
        let (_, parsed) = x509_parser::parse_x509_certificate(&ca)
            .map_err(|e| material("ca-cert.pem", format!("not an X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(material("ca-cert.pem", "is not a CA certificate (basic constraints CA:FALSE)"));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(material("ca-key.pem", "is not the key of ca-cert.pem"));
        }
        let signer_not_after = parsed.validity().not_after.to_datetime();
        if signer_not_after <= OffsetDateTime::now_utc() {
            return Err(material("ca-cert.pem", format!("expired on {signer_not_after}")));
        }
        let chain = certificates("cert-chain.pem", &m.cert_chain)?;
        if chain[0] != ca {
            return Err(material("cert-chain.pem", "must start with ca-cert.pem"));
        }
        let roots = certificates("root-cert.pem", &m.root_cert)?;
        let last = chain.last().unwrap_or(&ca);
        if !roots.contains(last) {
            return Err(material("cert-chain.pem", "must end with a root from root-cert.pem"));
        }
        let issuer = Issuer::from_ca_cert_der(&ca, key)
            .map_err(|e| material("ca-cert.pem", format!("cannot sign with it: {e}")))?;
        Ok(Ca { trust_domain: trust_domain.to_ascii_lowercase(), issuer, chain, roots, signer_not_after })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle: every root, PEM.
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(to_pem).collect()
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Signs `csr_pem` as `identity` for `ttl`: the leaf, then the chain up to the root, PEM.
    /// The CSR's own key is certified; its subject and names are not used, and a CSR asking for
    /// any name but `identity`'s SPIFFE ID is refused.
    pub fn sign(&self, csr_pem: &str, identity: &Identity, ttl: Duration) -> Result<Vec<String>, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::WrongIdentity {
                asked: identity.uri(),
                allowed: format!("identities in trust domain {}", self.trust_domain),
            });
        }
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(CaError::Ttl(ttl));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
        let uri = identity.uri();
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) if u.as_str() == uri => continue,
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => format!("DNS name {}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP address {ip}"),
                SanType::Rfc822Name(m) => format!("e-mail {}", m.as_str()),
                other => format!("{other:?}"),
            };
            return Err(CaError::WrongIdentity { asked, allowed: uri });
        }
        let mut params = CertificateParams::default();
        params.subject_alt_names =
            vec![SanType::URI(uri.clone().try_into().map_err(|e| CaError::BadIdentity(format!("{uri}: {e}")))?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + ttl).min(self.signer_not_after);
        params.serial_number = Some(serial());
        let signed = CertificateSigningRequestParams { params, public_key: csr.public_key }
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut out = vec![signed.pem()];
        out.extend(self.chain.iter().map(to_pem));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_bad_segments_are_refused() {
        let id = Identity::new("cluster.local", "bookinfo", "bookinfo-productpage").unwrap();
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage");
        assert_eq!(Identity::parse(&id.uri()), Some(id));
        assert!(Identity::new("cluster.local", "a/b", "sa").is_err());
        assert!(Identity::new("cluster.local", "ns", "").is_err());
        assert_eq!(Identity::parse("spiffe://td/ns/a/sa/b/extra"), None);
        assert_eq!(Identity::parse("spiffe://td/sa/b/ns/a"), None);
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let m = CaMaterial::self_signed("cluster.local").unwrap();
        let shown = format!("{m:?}");
        assert!(!shown.contains(&m.ca_key) && !shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
