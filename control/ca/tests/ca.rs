//! The CA against rustls's WebPKI verifier: what it signs verifies against its trust bundle
//! (self-signed root, plugged-in intermediate, two roots during a rotation), carries exactly
//! the entitled SPIFFE ID, lives as long as asked; what it must refuse, it refuses.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls_pki_types::pem::PemObject;
use trellis_ca::{Ca, CaError, CaMaterial, DEFAULT_TTL, Identity};

fn reviews() -> Identity {
    Identity::new("cluster.local", "bookinfo", "bookinfo-reviews").unwrap()
}

fn csr(sans: &[&str]) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans.iter().map(|s| SanType::URI(s.to_string().try_into().unwrap())).collect();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn der(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap()
}

/// Verifies `chain` (leaf first) as a client certificate against `roots_pem` at `at`.
fn verify(chain: &[String], roots_pem: &str, at: UnixTime) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for r in der(roots_pem) {
        roots.add(r).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    let certs: Vec<CertificateDer<'static>> = chain.iter().flat_map(|p| der(p)).collect();
    verifier.verify_client_cert(&certs[0], &certs[1..], at).map(|_| ())
}

fn now() -> UnixTime {
    UnixTime::now()
}

fn later(d: Duration) -> UnixTime {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    UnixTime::since_unix_epoch(now + d)
}

fn parsed(pem: &str) -> (Vec<String>, i64, bool) {
    let d = der(pem).remove(0);
    let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
    let uris = trellis_ca::subject_alt_names(&d);
    let life = c.validity().not_after.timestamp() - c.validity().not_before.timestamp();
    (uris, life, c.is_ca())
}

#[test]
fn a_self_signed_root_signs_svids_that_verify_against_its_bundle() {
    let m = CaMaterial::self_signed("cluster.local").unwrap();
    let ca = Ca::new("cluster.local", &m).unwrap();
    let chain = ca.sign(&csr(&[]), &reviews(), DEFAULT_TTL).unwrap();
    assert_eq!(chain.len(), 2, "leaf + root");
    let (uris, life, is_ca) = parsed(&chain[0]);
    assert_eq!(uris, vec!["spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"]);
    assert!(!is_ca);
    // 24 h from now, backdated one minute for clock skew.
    assert_eq!(life, 24 * 3600 + 60);
    verify(&chain, &ca.roots_pem(), now()).unwrap();
    // Expired after its TTL.
    let late = verify(&chain, &ca.roots_pem(), later(DEFAULT_TTL + Duration::from_secs(120)));
    assert!(
        matches!(late, Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. }))),
        "{late:?}"
    );
    // A CSR naming the entitled identity itself is fine too.
    let id = reviews().uri();
    ca.sign(&csr(&[&id]), &reviews(), Duration::from_secs(30)).unwrap();
}

#[test]
fn another_identity_another_domain_or_a_bad_csr_is_refused() {
    let ca = Ca::new("cluster.local", &CaMaterial::self_signed("cluster.local").unwrap()).unwrap();
    let other = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage";
    let e = ca.sign(&csr(&[other]), &reviews(), DEFAULT_TTL).unwrap_err();
    assert_eq!(
        e,
        CaError::WrongIdentity {
            asked: other.into(),
            allowed: "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews".into()
        }
    );
    let foreign = Identity::new("other.domain", "bookinfo", "bookinfo-reviews").unwrap();
    assert!(matches!(ca.sign(&csr(&[]), &foreign, DEFAULT_TTL), Err(CaError::WrongIdentity { .. })));
    // A tampered CSR fails its signature check.
    let good = csr(&[]);
    let mut bytes = pem::parse(&good).unwrap().contents().to_vec();
    let n = bytes.len();
    bytes[n / 2] ^= 0x01;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
    assert!(matches!(ca.sign(&tampered, &reviews(), DEFAULT_TTL), Err(CaError::BadCsr(_))));
    assert!(matches!(ca.sign("not a csr", &reviews(), DEFAULT_TTL), Err(CaError::BadCsr(_))));
    assert_eq!(ca.sign(&csr(&[]), &reviews(), Duration::from_secs(1)), Err(CaError::Ttl(Duration::from_secs(1))));
}

/// A root and an intermediate it signed, in Istio's cacerts layout (files in `dir`).
fn plug_in(dir: &std::path::Path, root_not_after_days: i64) -> (String, String) {
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.distinguished_name.push(DnType::CommonName, "shared root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    root.not_before = now - time::Duration::days(1);
    root.not_after = now + time::Duration::days(root_not_after_days);
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root, root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut int = CertificateParams::default();
    int.distinguished_name.push(DnType::CommonName, "cluster-1 intermediate");
    int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    int.not_before = now - time::Duration::days(1);
    int.not_after = now + time::Duration::days(root_not_after_days);
    let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), int_cert.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root_cert.pem()).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), format!("{}{}", int_cert.pem(), root_cert.pem())).unwrap();
    (root_cert.pem(), int_cert.pem())
}

#[test]
fn a_plugged_in_intermediate_signs_for_the_shared_root() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = plug_in(dir.path(), 365);
    let ca = Ca::new("cluster.local", &CaMaterial::from_dir(dir.path()).unwrap()).unwrap();
    assert_eq!(der(&ca.roots_pem()), der(&root));
    let chain = ca.sign(&csr(&[]), &reviews(), DEFAULT_TTL).unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    verify(&chain, &root, now()).unwrap();
    // Without the intermediate the leaf does not verify: the chain is needed.
    let alone = verify(&chain[..1], &root, now());
    assert!(
        matches!(alone, Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))),
        "{alone:?}"
    );
    // Two clusters plugged with intermediates of the same root trust each other's SVIDs.
    let dir2 = tempfile::tempdir().unwrap();
    plug_in(dir2.path(), 365);
    let other_root = std::fs::read_to_string(dir2.path().join("root-cert.pem")).unwrap();
    assert!(verify(&chain, &other_root, now()).is_err(), "a different root does not verify it");
}

#[test]
fn an_svid_never_outlives_its_signing_certificate() {
    let dir = tempfile::tempdir().unwrap();
    plug_in(dir.path(), 1);
    let ca = Ca::new("cluster.local", &CaMaterial::from_dir(dir.path()).unwrap()).unwrap();
    let chain = ca.sign(&csr(&[]), &reviews(), Duration::from_secs(30 * 24 * 3600)).unwrap();
    let (_, life, _) = parsed(&chain[0]);
    assert!(life <= 24 * 3600 + 60, "capped at the intermediate's end, lived {life}s");
}

#[test]
fn broken_ca_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    plug_in(dir.path(), 365);
    let good = CaMaterial::from_dir(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("cert-chain.pem")).unwrap();
    let e = CaMaterial::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("cert-chain.pem"), "{e}");
    let other = CaMaterial::self_signed("cluster.local").unwrap();
    let cases = [
        (CaMaterial { ca_key: other.ca_key.clone(), ..good.clone() }, "ca-key.pem: is not the key of ca-cert.pem"),
        (CaMaterial { ca_key: "junk".into(), ..good.clone() }, "ca-key.pem: not a private key"),
        (
            CaMaterial { cert_chain: other.cert_chain.clone(), ..good.clone() },
            "cert-chain.pem: must start with ca-cert.pem",
        ),
        (
            CaMaterial { root_cert: other.root_cert.clone(), ..good.clone() },
            "cert-chain.pem: must end with a root from root-cert.pem",
        ),
        (CaMaterial { root_cert: String::new(), ..good.clone() }, "root-cert.pem: holds no certificate"),
    ];
    for (m, want) in cases {
        let e = Ca::new("cluster.local", &m).unwrap_err().to_string();
        assert!(e.starts_with(want), "{e} (wanted {want})");
    }
}

#[test]
fn during_a_root_rotation_both_roots_are_trusted() {
    let old = CaMaterial::self_signed("cluster.local").unwrap();
    let new = CaMaterial::self_signed("cluster.local").unwrap();
    let bundle = format!("{}{}", old.root_cert, new.root_cert);
    let old_ca = Ca::new("cluster.local", &old).unwrap();
    // The new CA signs while both roots are published.
    let new_ca = Ca::new("cluster.local", &CaMaterial { root_cert: bundle.clone(), ..new.clone() }).unwrap();
    assert_eq!(der(&new_ca.roots_pem()).len(), 2);
    let from_old = old_ca.sign(&csr(&[]), &reviews(), DEFAULT_TTL).unwrap();
    let from_new = new_ca.sign(&csr(&[]), &reviews(), DEFAULT_TTL).unwrap();
    verify(&from_old, &new_ca.roots_pem(), now()).unwrap();
    verify(&from_new, &new_ca.roots_pem(), now()).unwrap();
    // After the overlap, only the new root: the old SVIDs no longer verify.
    assert!(verify(&from_old, &new.root_cert, now()).is_err());
}
