//! TLS for the config API and the xDS port.
//!
//! The control plane runs outside the clusters it serves, so its API is reached over networks:
//! tokens must not travel in clear. With `--api-tls-cert/--api-tls-key` the given certificate
//! is served. Otherwise Trellis keeps its own small CA in the data directory (`api-ca.pem`,
//! `api-ca.key` mode 0600, created once and kept, so clients can pin it) and issues a fresh
//! server certificate from it at every start, for the listen address plus `--api-tls-san`
//! names. Clients trust `api-ca.pem` (`trellis --ca-file`).

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// The CA certificate clients should trust, in a data directory.
pub fn ca_path(data_dir: &Path) -> PathBuf {
    data_dir.join("api-ca.pem")
}

fn year_now() -> i32 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

/// Loads Trellis's API CA from `data_dir`, creating it on first use.
fn load_or_create_ca(data_dir: &Path) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let cert_path = ca_path(data_dir);
    let key_path = data_dir.join("api-ca.key");
    if !cert_path.exists() {
        let key = KeyPair::generate().context("generating the API CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "Trellis config API CA");
        params.distinguished_name.push(DnType::OrganizationName, "Trellis");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let year = year_now();
        params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
        let cert = params.self_signed(&key).context("signing the API CA")?;
        write_private(&key_path, &key.serialize_pem())?;
        std::fs::write(&cert_path, cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
    }
    let cert_pem = std::fs::read_to_string(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
    let key_pem = std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| format!("{} is not a private key", key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
        .with_context(|| format!("{} is not a CA certificate", cert_path.display()))?;
    Ok((cert_pem, issuer))
}

/// Issues a server certificate for `names` (IP addresses and DNS names) from the data
/// directory's CA. Returns the chain (leaf, CA) and the key.
fn issue(data_dir: &Path, names: &[String]) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let (ca_pem, issuer) = load_or_create_ca(data_dir)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "trellis-control");
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .with_context(|| format!("{n:?} is not a DNS name or IP address")),
        })
        .collect::<anyhow::Result<_>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let year = year_now();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let key = KeyPair::generate().context("generating the API server key")?;
    let cert = params.signed_by(&key, &issuer).context("issuing the API server certificate")?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("re-reading the API CA")?;
    let key_der =
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).context("encoding the API server key")?;
    Ok((vec![cert.der().clone(), ca_der], key_der))
}

fn load_pem(cert: &Path, key: &Path) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("{} is not a PEM private key", key.display()))?;
    Ok((certs, key))
}

/// The server side: a given certificate, or one issued from the data directory's CA for
/// `names`.
pub fn server_config(
    data_dir: &Path,
    cert_and_key: Option<(&Path, &Path)>,
    names: &[String],
) -> anyhow::Result<Arc<ServerConfig>> {
    let (chain, key) = match cert_and_key {
        Some((c, k)) => load_pem(c, k)?,
        None => issue(data_dir, names)?,
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the API certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` over TLS until `shutdown` completes, then lets open requests finish (up to
/// 10 s).
pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(config);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an API connection failed");
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let service = hyper::service::service_fn(move |req| {
                        use tower::Service;
                        app.clone().call(req)
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "API connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!("some API connections did not finish within 10 s of shutdown");
    }
    Ok(())
}

/// Serves the xDS port with TLS: a connection that opens with a TLS record (first byte 0x16)
/// gets TLS and every service of `routes` (ADS, CSRs, module fetches); any other connection
/// may only fetch modules (`modules`, HTTP/1.1) — they are content-addressed and each proxy
/// checks what it fetched against the sha256 in its configuration, so Envoy's remote module
/// source keeps working without TLS, while xDS, workload tokens and certificates never travel
/// in clear (a plaintext gRPC connection is not HTTP/1.1 and is closed).
pub async fn serve_xds_tls(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    routes: tonic::service::Routes,
    modules: Router,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an xDS connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, modules) = (acceptor.clone(), tx.clone(), modules.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                match tokio::time::timeout(Duration::from_secs(10), tcp.peek(&mut first)).await {
                    Ok(Ok(1)) if first[0] == 0x16 => {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(tls)).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "xDS TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "xDS TLS handshake timed out"),
                        }
                    }
                    Ok(Ok(1)) => {
                        let service = hyper::service::service_fn(move |req| {
                            use tower::Service;
                            modules.clone().call(req)
                        });
                        let conn =
                            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, error = %e, "plaintext connection to the xDS port closed (only module fetches are served without TLS)");
                        }
                    }
                    _ => {}
                }
            });
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(routes)
        .serve_with_incoming(incoming)
        .await
        .context("serving xDS over TLS")
}
