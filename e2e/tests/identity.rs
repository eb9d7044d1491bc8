//! Workload identities from the real control plane: a WorkloadToken made with the CLI, a CSR
//! sent over gRPC (Istio's CreateCertificate) on the xDS port, an SVID back that verifies
//! against the mesh's root, which proxies also get over SDS; what a token may not get, it does
//! not get; a revoked token gets nothing; a restart keeps the root.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use tonic::Code;
use trellis_ca::api::{CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse};
use trellis_e2e::ControlPlane;
use trellis_e2e::proxies::{NodeSpec, TrellisProxy};

fn csr(sans: &[&str]) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans.iter().map(|s| SanType::URI(s.to_string().try_into().unwrap())).collect();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn create_certificate(
    xds: &str,
    token: Option<&str>,
    csr: String,
    ttl_s: i64,
) -> Result<Vec<String>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: ttl_s });
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
    let resp: tonic::Response<IstioCertificateResponse> =
        grpc.unary(req, path, tonic_prost::ProstCodec::default()).await?;
    Ok(resp.into_inner().cert_chain)
}

fn der(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap()
}

/// The leaf's URI SANs and lifetime, after checking the chain against its last certificate
/// (the root).
fn check(chain: &[String]) -> (Vec<String>, i64) {
    let certs: Vec<CertificateDer<'static>> = chain.iter().flat_map(|p| der(p)).collect();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.last().unwrap().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    verifier.verify_client_cert(&certs[0], &certs[1..certs.len() - 1], UnixTime::now()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
    let uris = trellis_ca::subject_alt_names(&certs[0]);
    (uris, leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp())
}

/// The `ROOTCA` secret a proxy gets over Delta ADS, as certificates.
async fn sds_root_ca(cp: &ControlPlane) -> Vec<CertificateDer<'static>> {
    use envoy_types::pb::envoy::config::core::v3::{Node, data_source::Specifier};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use prost::Message;
    use trellis_xds::hub::SECRET_TYPE;
    let node =
        Node { id: "sidecar~127.0.0.9~sds-probe.bookinfo~bookinfo.svc.cluster.local".into(), ..Default::default() };
    let mut ads = trellis_xds::client::DeltaClient::connect(&cp.xds_addr, node).await.unwrap();
    ads.subscribe(SECRET_TYPE, vec!["ROOTCA".into()], Default::default()).await.unwrap();
    // The first answer may predate the control plane's first published state; updates follow.
    let deadline = Instant::now() + Duration::from_secs(10);
    let any = loop {
        let resp = ads.recv(deadline.saturating_duration_since(Instant::now())).await.unwrap();
        assert_eq!(resp.type_url, SECRET_TYPE);
        ads.ack(&resp).await.unwrap();
        if let Some(any) = resp.resources.iter().find(|r| r.name == "ROOTCA").and_then(|r| r.resource.clone()) {
            break any;
        }
    };
    let secret = Secret::decode(any.value.as_slice()).unwrap();
    let Some(secret::Type::ValidationContext(vc)) = secret.r#type else { panic!("{secret:?}") };
    let Some(Specifier::InlineBytes(pem)) = vc.trusted_ca.and_then(|d| d.specifier) else { panic!("no inline bundle") };
    der(std::str::from_utf8(&pem).unwrap())
}

/// The first certificate for a new token: the control plane's token index catches up with the
/// store, so poll (with a deadline) while the token is still unknown.
async fn first_certificate(cp: &ControlPlane, secret: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match create_certificate(&cp.xds_addr, Some(secret), csr(&[]), 0).await {
            Ok(c) => return c,
            Err(s) if s.code() == Code::Unauthenticated && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}\n{}", cp.log_text()),
        }
    }
}

#[tokio::test]
async fn a_workload_token_gets_its_service_accounts_identity_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).unwrap();
    let secret = cp.workload_token("reviews", "bookinfo", "bookinfo-reviews").unwrap();
    let me = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
    let chain = first_certificate(&cp, &secret).await;
    let (uris, life) = check(&chain);
    assert_eq!(uris, vec![me]);
    // The trust bundle reaches proxies over SDS (ADS, Istio's secret name ROOTCA): the root
    // that signed the chain.
    assert_eq!(sds_root_ca(&cp).await, der(chain.last().unwrap()));
    assert_eq!(life, 24 * 3600 + 60, "24 h by default (+1 min backdated)");
    // A short lifetime, as rotation tests use; the CSR may name its own identity.
    let short = create_certificate(&cp.xds_addr, Some(&secret), csr(&[me]), 30).await.unwrap();
    assert_eq!(check(&short).1, 30 + 60);
    // Another service account's identity is refused, naming both.
    let other = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage";
    let e = create_certificate(&cp.xds_addr, Some(&secret), csr(&[other]), 0).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(other) && e.message().contains(me), "{}", e.message());
    // No token, a wrong token, a broken CSR.
    let e = create_certificate(&cp.xds_addr, None, csr(&[]), 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = create_certificate(&cp.xds_addr, Some("trl_not-a-token"), csr(&[]), 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = create_certificate(&cp.xds_addr, Some(&secret), "junk".into(), 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Revoked: nothing more is issued for it.
    let out = cp.cli(&["workload-token", "revoke", "reviews", "-n", "bookinfo"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match create_certificate(&cp.xds_addr, Some(&secret), csr(&[]), 0).await {
            Err(s) if s.code() == Code::Unauthenticated => break,
            other => assert!(Instant::now() < deadline, "still issued after revocation: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A restart signs with the same root (kept in the store).
    let root = chain.last().unwrap().clone();
    let (addr, xds, debug) = (cp.addr.clone(), cp.xds_addr.clone(), cp.debug_addr.clone());
    cp.kill_9().unwrap();
    let cp = ControlPlane::restart(dir.path(), &addr, &xds, &debug).unwrap();
    let secret = cp.workload_token("again", "bookinfo", "bookinfo-reviews").unwrap();
    let chain = first_certificate(&cp, &secret).await;
    assert_eq!(der(chain.last().unwrap()), der(&root), "the root changed across a restart");
}

#[tokio::test]
async fn trellis_proxy_gets_its_certificate_and_renews_it_at_half_life() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[]).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, cp.workload_token("reviews", "bookinfo", "bookinfo-reviews").unwrap()).unwrap();
    let spec = NodeSpec::sidecar("reviews-v1", "bookinfo", "");
    let flags = ["--service-account", "bookinfo-reviews", "--identity-token-file", token_file.to_str().unwrap()];
    // A 10-second certificate: renewed every 5 s.
    let mut args = flags.to_vec();
    args.extend(["--identity-ttl", "10"]);
    let p = TrellisProxy::start_node(&cp.xds_addr, &spec, &args).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut serials = Vec::new();
    loop {
        let c = p.certs().await.unwrap();
        if let Some(leaf) = c["certificates"][0]["cert_chain"][0].as_object() {
            assert_eq!(leaf["subject_alt_names"][0]["uri"], "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews");
            let life = leaf["expiration_time"].as_i64().unwrap() - leaf["valid_from"].as_i64().unwrap();
            assert_eq!(life, 10 + 60, "the asked lifetime (+1 min backdated)");
            let serial = leaf["serial_number"].as_str().unwrap().to_string();
            if serials.last() != Some(&serial) {
                serials.push(serial);
            }
        }
        if serials.len() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "renewals: {serials:?}, /certs: {c}\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The trust bundle arrived over SDS (ROOTCA): one root, the one that signed the chain.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = p.certs().await.unwrap();
        let ca = c["certificates"][0]["ca_cert"].as_array().cloned().unwrap_or_default();
        if ca.len() == 1 && ca[0]["source"] == "sds:ROOTCA" {
            assert!(!ca[0]["serial_number"].as_str().unwrap_or_default().is_empty(), "{c}");
            break;
        }
        assert!(Instant::now() < deadline, "/certs: {c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A token for another service account: the proxy refuses what the CA gives it.
    let other_file = dir.path().join("other-token");
    std::fs::write(&other_file, cp.workload_token("ratings", "bookinfo", "bookinfo-ratings").unwrap()).unwrap();
    let flags = ["--service-account", "bookinfo-reviews", "--identity-token-file", other_file.to_str().unwrap()];
    let wrong =
        TrellisProxy::start_node(&cp.xds_addr, &NodeSpec::sidecar("reviews-v2", "bookinfo", ""), &flags).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = wrong.certs().await.unwrap();
        if let Some(e) = c["last_error"].as_str()
            && e.contains("token is for another workload")
        {
            assert!(e.contains("bookinfo-ratings"), "{e}");
            assert_eq!(c["certificates"], serde_json::json!([]), "it holds no certificate");
            break;
        }
        assert!(Instant::now() < deadline, "/certs: {c}\n{}", wrong.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
