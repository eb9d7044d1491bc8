//! The proxy's workload identity (SPIFFE X.509 SVID) from the mesh CA. The key is made here
//! and never leaves the process: the proxy sends a CSR (Istio's `CreateCertificate`, on the
//! control plane's xDS port unless `identity.caAddress` says otherwise) with the WorkloadToken
//! secret read from `identity.tokenFile`, checks that the certificate names this proxy's
//! namespace and service account, and renews it at half its lifetime (a failed renewal is
//! retried with backoff while the current certificate is still good). `/certs` on the admin
//! port shows what it holds, as Envoy's does.
//!
//! ```yaml
//! identity:
//!   tokenFile: /var/run/trellis/token     # the WorkloadToken secret; no identity without it
//!   caAddress: cp.example.com:15010        # default: the xds address
//!   ttlSeconds: 86400                      # asked lifetime; 0 = the CA's default (24 h)
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_ca::api::{CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse};

/// The `identity:` section of the bootstrap.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// A file holding the WorkloadToken secret; empty: the proxy has no identity.
    pub token_file: String,
    /// `HOST:PORT` of the certificate service; empty: the xDS address.
    pub ca_address: String,
    /// The lifetime to ask for, in seconds; 0: the CA's default.
    pub ttl_seconds: u64,
}

/// A certificate the proxy holds, with its key.
#[derive(Debug)]
pub struct Svid {
    /// Leaf first, then the chain up to the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The chain with its key (made here, never sent anywhere), as TLS presents it.
    pub certified: Arc<rustls::sign::CertifiedKey>,
    /// The chain as the CA sent it (PEM), and the key (PKCS#8 PEM) — for `trellis-agent`, which
    /// hands both to the Envoy beside it over a local socket.
    pub chain_pem: String,
    pub key_pem: KeyPem,
    /// The SPIFFE ID (the leaf's URI SAN).
    pub spiffe_id: String,
    /// Hex.
    pub serial: String,
    /// Seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// When it was received, seconds since the epoch.
    pub received: i64,
    /// The trust bundle it came with (the chain's root).
    pub roots: Vec<CertificateDer<'static>>,
}

/// A private key in PEM; never printed.
pub struct KeyPem(String);

impl KeyPem {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for KeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<private key>")
    }
}

/// The identity the proxy holds, kept current by [`spawn`].
#[derive(Debug, Default)]
pub struct WorkloadIdentity {
    current: ArcSwapOption<Svid>,
    /// Signalled at every new certificate.
    pub renewed: tokio::sync::Notify,
    /// Certificates received so far.
    pub issued: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl WorkloadIdentity {
    pub fn current(&self) -> Option<Arc<Svid>> {
        self.current.load_full()
    }

    /// What `/certs` shows: Envoy's shape (`certificates[].cert_chain[]` with serial, SANs,
    /// validity; `ca_cert[]`: the trust bundle from SDS `ROOTCA` when it has arrived, else the
    /// root the chain came with), plus the renewal count and the last error.
    pub fn certs_json(&self, bundle: Option<&crate::config::TrustBundle>) -> Value {
        let error = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let certificates: Vec<Value> = self
            .current()
            .map(|s| {
                json!({
                    "cert_chain": [{
                        "serial_number": s.serial,
                        "subject_alt_names": [{"uri": s.spiffe_id}],
                        "valid_from": s.not_before,
                        "expiration_time": s.not_after,
                        "seconds_until_expiration": s.not_after - now(),
                    }],
                    "ca_cert": bundle.map(|b| b.roots.as_slice()).unwrap_or(&s.roots).iter().map(|r| {
                        let serial = x509_parser::parse_x509_certificate(r)
                            .map(|(_, c)| c.raw_serial_as_string().replace(':', ""))
                            .unwrap_or_default();
                        json!({"serial_number": serial, "source": if bundle.is_some() { "sds:ROOTCA" } else { "chain" }})
                    }).collect::<Vec<_>>(),
                })
            })
            .into_iter()
            .collect();
        json!({"certificates": certificates, "issued": self.issued.load(Ordering::Relaxed), "last_error": error})
    }
}

/// Starts keeping the proxy's identity (namespace / service account of its bootstrap) current.
/// The certificate service is reached like the xDS port: over TLS when `tls_ca` (the CA of
/// the control plane's certificate) is given (`crate::control`).
pub fn spawn(
    config: IdentityConfig,
    xds: &str,
    tls_ca: &str,
    namespace: &str,
    service_account: &str,
) -> Arc<WorkloadIdentity> {
    let identity = Arc::new(WorkloadIdentity::default());
    let ca = if config.ca_address.is_empty() { xds.to_string() } else { config.ca_address.clone() };
    let (id, ns, sa, tls_ca) =
        (identity.clone(), namespace.to_string(), service_account.to_string(), tls_ca.to_string());
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match fetch(&config, &ca, &tls_ca, &ns, &sa).await {
                Ok(svid) => {
                    tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, not_after = svid.not_after, "workload certificate received");
                    let renew = renew_in(&svid);
                    id.current.store(Some(Arc::new(svid)));
                    id.issued.fetch_add(1, Ordering::Relaxed);
                    id.renewed.notify_waiters();
                    *id.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    backoff = Duration::from_millis(500);
                    renew
                }
                Err(e) => {
                    tracing::warn!(error = %e, ca = %ca, "cannot get a workload certificate; retrying");
                    *id.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    });
    identity
}

/// Half the certificate's remaining life when it arrived (at least a second).
fn renew_in(svid: &Svid) -> Duration {
    let life = (svid.not_after - svid.received).max(2) as u64;
    Duration::from_secs(life / 2)
}

/// One CSR round: a fresh key, the CSR, the CA's answer, checked.
async fn fetch(
    config: &IdentityConfig,
    ca: &str,
    tls_ca: &str,
    namespace: &str,
    service_account: &str,
) -> Result<Svid, String> {
    let token = std::fs::read_to_string(&config.token_file)
        .map_err(|e| format!("identity.tokenFile {}: {e}", config.token_file))?
        .trim()
        .to_string();
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("writing the CSR: {e}"))?;
    let channel = crate::control::endpoint(ca, tls_ca)
        .map_err(|e| format!("CA address {ca:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
        .map_err(|e| format!("connecting to the CA at {ca}: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| format!("the CA at {ca}: {e}"))?;
    let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: config.ttl_seconds as i64 });
    let bearer = format!("Bearer {token}").parse().map_err(|_| "the token file holds characters a header cannot")?;
    req.metadata_mut().insert("authorization", bearer);
    let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
    let resp: tonic::Response<IstioCertificateResponse> = grpc
        .unary(req, path, tonic_prost::ProstCodec::default())
        .await
        .map_err(|s| format!("the CA refused: {:?}: {}", s.code(), s.message()))?;
    let pems = resp.into_inner().cert_chain;
    let chain_pem: String = pems.iter().map(|p| if p.ends_with('\n') { p.clone() } else { format!("{p}\n") }).collect();
    let chain: Vec<CertificateDer<'static>> = pems
        .iter()
        .map(|p| {
            CertificateDer::from_pem_slice(p.as_bytes()).map_err(|e| format!("the CA sent a bad certificate: {e:?}"))
        })
        .collect::<Result<_, _>>()?;
    let leaf = chain.first().ok_or("the CA sent no certificate")?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("the CA sent a bad certificate: {e}"))?;
    let spiffe_id = trellis_ca::subject_alt_names(leaf)
        .into_iter()
        .find(|n| n.starts_with("spiffe://"))
        .ok_or("the certificate has no SPIFFE ID")?;
    let got = trellis_ca::Identity::parse(&spiffe_id).ok_or_else(|| format!("{spiffe_id} is not a SPIFFE ID"))?;
    if got.namespace != namespace || got.service_account != service_account {
        return Err(format!(
            "the CA issued {spiffe_id}, but this proxy is service account {service_account} in namespace {namespace}: the token is for another workload"
        ));
    }
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("loading the key into TLS: {e}"))?;
    Ok(Svid {
        roots: chain.last().cloned().into_iter().collect(),
        certified: Arc::new(rustls::sign::CertifiedKey::new(chain.clone(), signing)),
        chain_pem,
        key_pem: KeyPem(key.serialize_pem()),
        spiffe_id,
        serial: parsed.raw_serial_as_string().replace(':', ""),
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        received: now(),
        chain,
    })
}
