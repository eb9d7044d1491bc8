//! mTLS between trellis-proxies, configured by the real control plane: certificates from its CA
//! (CSR with a WorkloadToken), the trust bundle over SDS, DestinationRule ISTIO_MUTUAL on the
//! client side, PeerAuthentication on the server side, and AuthorizationPolicy by peer identity
//! — Istio's "deny all, then allow GET /reviews/* from productpage" example.

#![allow(clippy::print_stdout)] // the rotation test prints what it measured

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{Value, json};
use trellis_ca::CaMaterial;
use trellis_e2e::ControlPlane;
use trellis_e2e::echo::Echo;
use trellis_e2e::envoy::{AdsApi, Envoy};
use trellis_e2e::http::ProxyClient;
use trellis_e2e::proxies::{NodeSpec, TrellisAgent, TrellisProxy};

const NS: &str = "bookinfo";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage";

fn workload_token(cp: &ControlPlane, dir: &std::path::Path, name: &str, ns: &str, sa: &str) -> String {
    cp.workload_token_file(dir, name, ns, sa).unwrap()
}

fn proxy(cp: &ControlPlane, name: &str, ns: &str, sa: &str, token: Option<&str>) -> TrellisProxy {
    proxy_with(cp, name, ns, sa, token, &[])
}

/// As [`proxy`], with extra flags.
fn proxy_with(cp: &ControlPlane, name: &str, ns: &str, sa: &str, token: Option<&str>, extra: &[&str]) -> TrellisProxy {
    let mut flags = vec!["--service-account", sa];
    if let Some(t) = token {
        flags.extend(["--identity-token-file", t]);
    }
    flags.extend(extra);
    TrellisProxy::start_node(&cp.xds_addr, &NodeSpec::sidecar(name, ns, ""), &flags).unwrap()
}

fn peer_authentication(mode: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "default", "namespace": NS},
           "spec": {"mtls": {"mode": mode}}})
}

/// GETs through a client proxy until `want` answers (a config push lands), within 30 s.
async fn until(client: &TrellisProxy, host: &str, path: &str, want: u16, logs: &[&TrellisProxy]) {
    let logs = || logs.iter().map(|p| p.log_text()).collect::<Vec<_>>().join("\n---\n");
    until_at(&client.outbound, host, path, want, &logs).await;
}

/// As [`until`], through the proxy listening at `outbound`.
async fn until_at(outbound: &str, host: &str, path: &str, want: u16, logs: &dyn Fn() -> String) {
    let c = ProxyClient::new(outbound);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = c.get(host, path, &[]).await.map(|a| (a.status, a.body));
        if matches!(&got, Ok((s, _)) if *s == want) {
            return;
        }
        assert!(Instant::now() < deadline, "GET {host}{path} via {outbound}: {got:?}, want {want}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plaintext HTTP/1.1 request straight to a listener: the status, or why there was none.
async fn plaintext_get(addr: &str, host: &str) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    get_over(hyper_util::rt::TokioIo::new(tcp), host).await
}

async fn get_over<T>(io: T, host: &str) -> Result<u16, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/reviews/1").header("host", host).body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// The server's certificate is not what these tests check.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An HTTP request over TLS presenting `chain` (PEM) with `key`: the status, or why there was none.
async fn tls_get(addr: &str, host: &str, chain: &str, key: &str) -> Result<u16, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(certs, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("reviews").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    get_over(hyper_util::rt::TokioIo::new(tls), host).await
}

/// A leaf certificate for `uri` signed by `ca`, valid from `from` to `to` (seconds from now).
fn leaf(ca: &CaMaterial, uri: &str, from: i64, to: i64) -> (String, String) {
    let ca_key = KeyPair::from_pem(&ca.ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca.ca_cert, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.to_string().try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(to);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (format!("{}{}", cert.pem(), ca.cert_chain), key.serialize_pem())
}

/// Writes Istio's cacerts files: `signer` signs, `roots` are trusted.
fn write_cacerts(dir: &std::path::Path, signer: &CaMaterial, roots: &[&CaMaterial]) {
    std::fs::create_dir_all(dir).unwrap();
    let roots: String = roots.iter().map(|r| r.root_cert.as_str()).collect();
    for (file, pem) in [
        ("ca-cert.pem", &signer.ca_cert),
        ("ca-key.pem", &signer.ca_key),
        ("root-cert.pem", &roots),
        ("cert-chain.pem", &signer.cert_chain),
    ] {
        std::fs::write(dir.join(file), pem).unwrap();
    }
}

#[tokio::test]
async fn mtls_between_trellis_proxies_with_peer_authentication_and_identity_authorization() {
    let dir = tempfile::tempdir().unwrap();
    // The mesh CA from files (Istio's cacerts layout), so the test can also mint certificates
    // the CA itself would never issue.
    let ca = CaMaterial::self_signed("cluster.local").unwrap();
    let cacerts = dir.path().join("cacerts");
    write_cacerts(&cacerts, &ca, &[&ca]);
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &["--push-debounce-ms", "50", "--cacerts-dir", cacerts.to_str().unwrap()],
    )
    .unwrap();
    let app = Echo::start("reviews").await.unwrap();
    let (port, ingress) = (trellis_e2e::free_port(), trellis_e2e::free_port());
    let host = format!("reviews.{NS}:{port}");
    // The endpoint inline (a workloadSelector would also make the reviews proxy itself an
    // endpoint, at the service port, where nothing listens).
    let service_entry = |sa: &str| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "reviews", "namespace": NS},
               "spec": {"hosts": ["reviews.bookinfo.svc.cluster.local"], "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
                        "location": "MESH_INTERNAL", "resolution": "STATIC",
                        "endpoints": [{"address": "127.0.0.1", "ports": {"http": ingress}, "labels": {"app": "reviews"}, "serviceAccount": sa}]}})
    };
    let config = vec![
        service_entry("bookinfo-reviews"),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "reviews", "namespace": NS},
               "spec": {"workloadSelector": {"labels": {"app": "reviews"}},
                        "ingress": [{"port": {"number": ingress, "protocol": "HTTP", "name": "http"}, "bind": "127.0.0.1",
                                     "defaultEndpoint": format!("127.0.0.1:{}", app.port())}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": NS},
               "spec": {"host": "reviews.bookinfo.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}}),
        peer_authentication("STRICT"),
        // Istio's example: allow nothing, then GET /reviews/* from productpage.
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "allow-nothing", "namespace": NS},
               "spec": {}}),
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "reviews-viewer", "namespace": NS},
               "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "action": "ALLOW",
                        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]}}],
                                   "to": [{"operation": {"methods": ["GET"], "paths": ["/reviews/*"]}}]}]}}),
    ];
    let api = cp.client().unwrap();
    api.apply(config, None, false).await.unwrap();
    let d = dir.path();
    let reviews_token = workload_token(&cp, d, "reviews", NS, "bookinfo-reviews");
    let productpage_token = workload_token(&cp, d, "productpage", NS, "bookinfo-productpage");
    let ratings_token = workload_token(&cp, d, "ratings", NS, "bookinfo-ratings");
    let reviews = proxy(&cp, "reviews", NS, "bookinfo-reviews", Some(&reviews_token));
    let productpage = proxy(&cp, "productpage", NS, "bookinfo-productpage", Some(&productpage_token));
    let ratings = proxy(&cp, "ratings", NS, "bookinfo-ratings", Some(&ratings_token));
    let anonymous = proxy(&cp, "anonymous", NS, "default", None);
    let all = [&reviews, &productpage];

    // productpage → reviews over mTLS: its identity is allowed GET /reviews/*, nothing else.
    until(&productpage, &host, "/reviews/1", 200, &all).await;
    let pp = ProxyClient::new(&productpage.outbound);
    assert_eq!(pp.get(&host, "/ratings/1", &[]).await.unwrap().status, 403, "not under /reviews/");
    assert_eq!(pp.post(&host, "/reviews/1", &[], b"x".to_vec()).await.unwrap().status, 403, "not a GET");
    // Another identity of the mesh reaches reviews over mTLS and is denied by policy.
    until(&ratings, &host, "/reviews/1", 403, &[&ratings, &reviews]).await;
    // A proxy without a certificate cannot originate ISTIO_MUTUAL: 503, nothing reaches reviews.
    until(&anonymous, &host, "/reviews/1", 503, &[&anonymous]).await;
    let seen = app.requests();

    // reviews' metrics name the source by its certificate.
    let m = ProxyClient::new(&reviews.metrics).get(&reviews.metrics, "/stats/prometheus", &[]).await.unwrap().body;
    let line = m
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("{m}"));
    assert!(line.contains("connection_security_policy=\"mutual_tls\""), "{line}");
    assert!(line.contains(&format!("source_principal=\"{PRODUCTPAGE}\"")), "{line}");
    assert!(line.contains("source_workload_namespace=\"bookinfo\""), "{line}");

    // STRICT: plaintext to the workload's port is closed without an answer.
    let direct = format!("127.0.0.1:{ingress}");
    let plain = plaintext_get(&direct, &host).await;
    assert!(plain.is_err(), "plaintext to a STRICT port: {plain:?}");
    let refusals = |name: &'static str| {
        let admin = reviews.admin.clone();
        async move {
            let stats = ProxyClient::new(&admin).get(&admin, "/stats", &[]).await.unwrap().body;
            stats.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok()).unwrap_or(0)
        }
    };
    assert_eq!(refusals("listener.mtls.plaintext_refused:").await, 1, "the refusal is counted");
    let failed_before = refusals("listener.mtls.handshake_failed:").await;

    // Certificates the port must refuse: another CA, an expired one from the mesh CA, another
    // trust domain from the mesh CA.
    let other_ca = CaMaterial::self_signed("cluster.local").unwrap();
    let (chain, key) = leaf(&other_ca, PRODUCTPAGE, -60, 3600);
    let r = tls_get(&direct, &host, &chain, &key).await;
    assert!(r.is_err(), "a certificate from another CA: {r:?}");
    let (chain, key) = leaf(&ca, PRODUCTPAGE, -7200, -3600);
    let r = tls_get(&direct, &host, &chain, &key).await;
    assert!(r.is_err(), "an expired certificate: {r:?}");
    let (chain, key) = leaf(&ca, "spiffe://other.domain/ns/bookinfo/sa/bookinfo-productpage", -60, 3600);
    let r = tls_get(&direct, &host, &chain, &key).await;
    assert!(r.is_err(), "another trust domain: {r:?}");
    assert_eq!(refusals("listener.mtls.handshake_failed:").await, failed_before + 3, "three refused handshakes");
    // A good one, minted here for productpage: allowed as productpage would be.
    let (chain, key) = leaf(&ca, PRODUCTPAGE, -60, 3600);
    assert_eq!(tls_get(&direct, &host, &chain, &key).await, Ok(200), "a valid productpage certificate");
    assert_eq!(app.requests(), seen + 1, "only the valid certificate reached the application");

    // The client checks the server: reviews' endpoint is said to run as another service
    // account, so the identity reviews presents is refused (503), and nothing reaches it.
    api.apply(vec![service_entry("bookinfo-impostor")], None, false).await.unwrap();
    until(&productpage, &host, "/reviews/1", 503, &all).await;
    let before = app.requests();
    for _ in 0..5 {
        let a = pp.get(&host, "/reviews/1", &[]).await.unwrap();
        assert_eq!(a.status, 503, "{}", a.body);
        assert!(a.body.contains("not one of"), "the reason names the identities: {}", a.body);
    }
    assert_eq!(app.requests(), before, "nothing reached a server with the wrong identity");
    api.apply(vec![service_entry("bookinfo-reviews")], None, false).await.unwrap();
    until(&productpage, &host, "/reviews/1", 200, &all).await;

    // PERMISSIVE: plaintext is accepted too (and, having no identity, denied by policy).
    api.apply(vec![peer_authentication("PERMISSIVE")], None, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match plaintext_get(&direct, &host).await {
            Ok(403) => break,
            other => {
                assert!(Instant::now() < deadline, "plaintext under PERMISSIVE: {other:?}\n{}", reviews.log_text())
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until(&productpage, &host, "/reviews/1", 200, &all).await;

    // DISABLE: no TLS on the port, so the ISTIO_MUTUAL client fails; plaintext still answers.
    api.apply(vec![peer_authentication("DISABLE")], None, false).await.unwrap();
    until(&productpage, &host, "/reviews/1", 503, &all).await;
    assert_eq!(plaintext_get(&direct, &host).await, Ok(403));
}

/// The reviews service behind its sidecar (an ingress listener on `ingress`, the app behind
/// it), ISTIO_MUTUAL with one request per connection (every request a new handshake, so
/// renewed certificates are used at once), STRICT, and only productpage allowed.
fn rotation_config(port: u16, ingress: u16, app: u16) -> Vec<Value> {
    vec![
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "reviews", "namespace": NS},
               "spec": {"hosts": ["reviews.bookinfo.svc.cluster.local"], "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
                        "location": "MESH_INTERNAL", "resolution": "STATIC",
                        "endpoints": [{"address": "127.0.0.1", "ports": {"http": ingress}, "labels": {"app": "reviews"}, "serviceAccount": "bookinfo-reviews"}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "reviews", "namespace": NS},
               "spec": {"workloadSelector": {"labels": {"app": "reviews"}},
                        "ingress": [{"port": {"number": ingress, "protocol": "HTTP", "name": "http"}, "bind": "127.0.0.1",
                                     "defaultEndpoint": format!("127.0.0.1:{app}")}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": NS},
               "spec": {"host": "reviews.bookinfo.svc.cluster.local",
                        "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}, "connectionPool": {"http": {"maxRequestsPerConnection": 1}}}}}),
        peer_authentication("STRICT"),
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "reviews-viewer", "namespace": NS},
               "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "action": "ALLOW",
                        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]}}]}]}}),
    ]
}

/// Bounded load through a proxy: `workers` loops of GETs until `stop`, at most `max` requests
/// each; returns (sent, failures with what they got).
fn load(
    proxy: &str,
    host: &str,
    workers: usize,
    max: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let (proxy, host) = (proxy.to_string(), host.to_string());
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (c, host, stop) = (ProxyClient::new(&proxy), host.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let (mut sent, mut failed) = (0, Vec::new());
                while sent < max && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    sent += 1;
                    match c.get(&host, "/reviews/1", &[]).await {
                        Ok(a) if a.status == 200 => {}
                        Ok(a) => failed.push(format!("{} {}", a.status, a.body)),
                        Err(e) => failed.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (sent, failed)
            }));
        }
        let mut out = (0, Vec::new());
        for t in tasks {
            let (s, f) = t.await.unwrap();
            out.0 += s;
            out.1.extend(f);
        }
        out
    })
}

async fn certs(p: &TrellisProxy) -> Value {
    p.certs().await.unwrap()
}

/// Polls both proxies' /certs until `cond` holds for each, within `secs`.
async fn until_certs(proxies: &[&TrellisProxy], secs: u64, what: &str, cond: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    for p in proxies {
        loop {
            let c = certs(p).await;
            if cond(&c) {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: {} has {c}\n{}", p.node_id, p.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn sds_roots(c: &Value) -> usize {
    let ca = c["certificates"][0]["ca_cert"].as_array().cloned().unwrap_or_default();
    ca.iter().filter(|r| r["source"] == "sds:ROOTCA").count()
}

fn issued(c: &Value) -> u64 {
    c["issued"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn certificates_and_the_root_rotate_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) =
        (CaMaterial::self_signed("cluster.local").unwrap(), CaMaterial::self_signed("cluster.local").unwrap());
    let cacerts = dir.path().join("cacerts");
    write_cacerts(&cacerts, &old, &[&old]);
    let data = dir.path().join("cp");
    let flags = ["--push-debounce-ms", "50", "--cacerts-dir", cacerts.to_str().unwrap()];
    let mut cp = ControlPlane::start(&data, &flags).unwrap();
    let app = Echo::start("reviews").await.unwrap();
    let (port, ingress) = (trellis_e2e::free_port(), trellis_e2e::free_port());
    let host = format!("reviews.{NS}:{port}");
    cp.client().unwrap().apply(rotation_config(port, ingress, app.port()), None, false).await.unwrap();
    let d = dir.path();
    // 10-second certificates: each proxy renews every 5 s.
    let start = |name: &str, sa: &str, token: &str| {
        let flags = ["--service-account", sa, "--identity-token-file", token, "--identity-ttl", "10"];
        TrellisProxy::start_node(&cp.xds_addr, &NodeSpec::sidecar(name, NS, ""), &flags).unwrap()
    };
    let reviews = start("reviews", "bookinfo-reviews", &workload_token(&cp, d, "reviews", NS, "bookinfo-reviews"));
    let productpage = start(
        "productpage",
        "bookinfo-productpage",
        &workload_token(&cp, d, "productpage", NS, "bookinfo-productpage"),
    );
    until(&productpage, &host, "/reviews/1", 200, &[&productpage, &reviews]).await;
    let both = [&reviews, &productpage];

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = load(&productpage.outbound, &host, 4, 20_000, stop.clone());
    // Leaf rotation: two more certificates each under load.
    let first: Vec<u64> = futures::future::join_all(both.iter().map(|p| certs(p))).await.iter().map(issued).collect();
    let (r0, p0) = (first[0], first[1]);
    until_certs(&[&reviews], 30, "two renewals", |c| issued(c) >= r0 + 2).await;
    until_certs(&[&productpage], 30, "two renewals", |c| issued(c) >= p0 + 2).await;

    // Root rotation, as Istio documents it. 1: trust the new root as well (still signing with
    // the old one); the control plane restarts (kill -9), proxies keep serving meanwhile.
    let restart = |cp: ControlPlane| {
        let (addr, xds, debug) = (cp.addr.clone(), cp.xds_addr.clone(), cp.debug_addr.clone());
        cp.kill_9().unwrap();
        ControlPlane::restart_with(&data, &addr, &xds, &debug, &flags).unwrap()
    };
    write_cacerts(&cacerts, &old, &[&old, &new]);
    cp = restart(cp);
    until_certs(&both, 30, "both roots over SDS", |c| sds_roots(c) == 2).await;
    // 2: sign with the new root; every certificate is re-issued by it within a lifetime.
    write_cacerts(&cacerts, &new, &[&old, &new]);
    cp = restart(cp);
    let now: Vec<u64> = futures::future::join_all(both.iter().map(|p| certs(p))).await.iter().map(issued).collect();
    until_certs(&[&reviews], 30, "re-issued by the new root", |c| issued(c) >= now[0] + 3).await;
    until_certs(&[&productpage], 30, "re-issued by the new root", |c| issued(c) >= now[1] + 3).await;
    // 3: drop the old root.
    write_cacerts(&cacerts, &new, &[&new]);
    let _cp = restart(cp);
    until_certs(&both, 30, "only the new root", |c| sds_roots(c) == 1).await;
    let now: Vec<u64> = futures::future::join_all(both.iter().map(|p| certs(p))).await.iter().map(issued).collect();
    until_certs(&[&reviews], 30, "a renewal under the new root alone", |c| issued(c) > now[0]).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (sent, failed) = running.await.unwrap();
    println!("rotation under load: {sent} requests, {} failed; certificates issued: {:?}", failed.len(), now);
    assert!(sent >= 500, "the load ran: {sent} requests");
    assert!(failed.is_empty(), "{} of {sent} failed, first: {:?}", failed.len(), failed.first());
    assert_eq!(app.requests() as usize, sent + 1, "every request reached the application once");
}

/// A service `name` in bookinfo on `port`, its one endpoint the sidecar ingress listener
/// `ingress` (service account `bookinfo-NAME`) in front of the app, reached with ISTIO_MUTUAL,
/// and readable by `reader` only.
fn service(name: &str, port: u16, ingress: u16, app: u16, reader: &str) -> Vec<Value> {
    let host = format!("{name}.bookinfo.svc.cluster.local");
    vec![
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name, "namespace": NS},
               "spec": {"hosts": [host], "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
                        "location": "MESH_INTERNAL", "resolution": "STATIC",
                        "endpoints": [{"address": "127.0.0.1", "ports": {"http": ingress}, "labels": {"app": name},
                                       "serviceAccount": format!("bookinfo-{name}")}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": name, "namespace": NS},
               "spec": {"workloadSelector": {"labels": {"app": name}},
                        "ingress": [{"port": {"number": ingress, "protocol": "HTTP", "name": "http"}, "bind": "127.0.0.1",
                                     "defaultEndpoint": format!("127.0.0.1:{app}")}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": name, "namespace": NS},
               "spec": {"host": host, "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}}),
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": format!("{name}-viewer"), "namespace": NS},
               "spec": {"selector": {"matchLabels": {"app": name}}, "action": "ALLOW",
                        "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/bookinfo/sa/bookinfo-{reader}")]}}],
                                   "to": [{"operation": {"methods": ["GET"]}}]}]}}),
    ]
}

/// A TLS handshake with the xDS port, trusting only `ca_pem`: the ALPN protocol agreed, or
/// why it failed.
async fn xds_handshake(addr: &str, ca_pem: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.map_err(|e| format!("{e:?}"))?).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let host = addr.rsplit_once(':').unwrap().0.to_string();
    let name = ServerName::try_from(host).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
}

/// An ADS request in plaintext HTTP/2 (what a client without TLS sends): the status it got,
/// or why there was none.
async fn plaintext_ads(addr: &str) -> Result<http::StatusCode, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::post(format!(
        "http://{addr}/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
    ))
    .header("content-type", "application/grpc")
    .body(Empty::new())
    .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(resp.status())
}

/// Envoy and trellis-proxy with the control plane's xDS port over TLS (`--xds-tls on`): each
/// proxy (and each trellis-agent, for its CSR and WorkloadToken) reaches it over TLS, trusting
/// the control plane's CA; then they talk mTLS to each other.
#[tokio::test]
async fn envoy_and_trellis_proxy_talk_mtls_to_each_other_both_ways_with_xds_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &["--push-debounce-ms", "50", "--xds-tls", "on"]).unwrap();
    let xds_ca = cp.ca_file();
    let xds_ca_flag = xds_ca.display().to_string();
    let tls_flags = ["--xds-ca-file", xds_ca_flag.as_str()];
    // The xDS port: TLS with the control plane's CA (and only it); no plaintext gRPC; module
    // fetches (content-addressed) in plaintext too.
    let ca_pem = std::fs::read(&xds_ca).unwrap();
    assert_eq!(xds_handshake(&cp.xds_addr, &ca_pem).await, Ok(Some(b"h2".to_vec())));
    let other_ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let foreign = xds_handshake(&cp.xds_addr, other_ca.cert.pem().as_bytes()).await;
    assert!(foreign.as_ref().is_err_and(|e| e.contains("UnknownIssuer")), "another CA: {foreign:?}");
    let plain = plaintext_ads(&cp.xds_addr).await;
    assert!(plain.is_err(), "plaintext ADS: {plain:?}");
    let module = ProxyClient::new(&cp.xds_addr).get(&cp.xds_addr, &format!("/wasm/{}", "0".repeat(64)), &[]).await;
    assert_eq!(module.map(|a| a.status).ok(), Some(404), "a plaintext module fetch is served (no such module)");
    let (reviews_app, details_app) = (Echo::start("reviews").await.unwrap(), Echo::start("details").await.unwrap());
    let free = trellis_e2e::free_port;
    let (rport, ringress, dport, dingress) = (free(), free(), free(), free());
    // reviews runs behind trellis-proxy and admits productpage (an Envoy); details runs behind
    // an Envoy and admits ratings (a trellis-proxy).
    let mut config = service("reviews", rport, ringress, reviews_app.port(), "productpage");
    config.extend(service("details", dport, dingress, details_app.port(), "ratings"));
    config.push(peer_authentication("STRICT"));
    config.push(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                       "metadata": {"name": "allow-nothing", "namespace": NS}, "spec": {}}));
    cp.client().unwrap().apply(config, None, false).await.unwrap();
    let d = dir.path();
    let token = |name: &str| workload_token(&cp, d, name, NS, &format!("bookinfo-{name}"));
    let reviews = proxy_with(&cp, "reviews", NS, "bookinfo-reviews", Some(&token("reviews")), &tls_flags);
    let ratings = proxy_with(&cp, "ratings", NS, "bookinfo-ratings", Some(&token("ratings")), &tls_flags);
    let envoy_with_agent = |name: &str| {
        let agent =
            TrellisAgent::start_with(&cp.xds_addr, &token(name), NS, &format!("bookinfo-{name}"), &tls_flags).unwrap();
        let spec = NodeSpec::sidecar(name, NS, "");
        let envoy =
            Envoy::start_node_tls(&cp.xds_addr, Some(&xds_ca), AdsApi::Sotw, &spec, Some(&agent.socket)).unwrap();
        (agent, envoy)
    };
    let (details_agent, details) = envoy_with_agent("details");
    let (productpage_agent, productpage) = envoy_with_agent("productpage");
    let logs = || {
        format!(
            "reviews:\n{}\n---ratings:\n{}\n---details:\n{}\n{}\n---productpage:\n{}\n{}",
            reviews.log_text(),
            ratings.log_text(),
            details.log_text(),
            details_agent.log_text(),
            productpage.log_text(),
            productpage_agent.log_text()
        )
    };
    let (rhost, dhost) = (format!("reviews.{NS}:{rport}"), format!("details.{NS}:{dport}"));
    // Envoy → trellis-proxy: trellis-proxy verifies Envoy's certificate and authorizes its identity.
    until_at(&productpage.outbound, &rhost, "/reviews/1", 200, &logs).await;
    // trellis-proxy → Envoy: Envoy verifies trellis-proxy's certificate, its RBAC the identity.
    until_at(&ratings.outbound, &dhost, "/details/1", 200, &logs).await;
    // Each side authorizes by the peer's identity: the other client is denied.
    until_at(&ratings.outbound, &rhost, "/reviews/1", 403, &logs).await;
    until_at(&productpage.outbound, &dhost, "/details/1", 403, &logs).await;
    // Envoy's STRICT port closes plaintext too.
    let plain = plaintext_get(&format!("127.0.0.1:{dingress}"), &dhost).await;
    assert!(plain.is_err(), "plaintext to Envoy's STRICT port: {plain:?}");
    assert_eq!((reviews_app.requests(), details_app.requests()), (1, 1), "only the allowed identities got through");
    // A pushed module reaches both proxies from the TLS control plane (fetched in plaintext,
    // checked against its sha256): the hello filter marks every response it sees.
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../filters/Cargo.toml");
    let hello = trellis_filter_testkit::build(manifest, "hello").unwrap();
    let out = cp.cli(&["wasm", "push", hello.to_str().unwrap()]).unwrap();
    let (stdout, stderr) = trellis_e2e::text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let url = stdout.split_whitespace().find(|w| w.starts_with("trellis://")).unwrap().to_string();
    let plugin = json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
        "metadata": {"name": "hello", "namespace": NS}, "spec": {"url": url, "match": [{"mode": "CLIENT"}]}});
    cp.client().unwrap().apply(vec![plugin], None, false).await.unwrap();
    for (client, host, path) in
        [(&productpage.outbound, &rhost, "/reviews/1"), (&ratings.outbound, &dhost, "/details/1")]
    {
        let c = ProxyClient::new(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let a = c.get(host, path, &[]).await.unwrap();
            if a.status == 200 && a.headers.contains_key("x-hello-seen") {
                break;
            }
            assert!(Instant::now() < deadline, "the pushed module never ran in {client}: {a:?}\n{}", logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
