//! The mesh's mTLS at run time (rustls, ring). Both sides present the proxy's workload
//! certificate ([`crate::identity`]) as it is at handshake time, so a renewed certificate is used
//! from the next connection on without rebuilding anything; both sides verify the peer against
//! the trust bundle as it is at handshake time (SDS `ROOTCA`: during a root rotation it holds the
//! old and the new root), then against the configured URI SANs (the service's identities on the
//! client side, the trust domain on the server side).
//!
//! Inbound, a listener's chains may accept TLS, plaintext or both (PeerAuthentication STRICT /
//! PERMISSIVE / DISABLE): the first byte tells them apart (a TLS record starts with 0x16, as
//! Envoy's tls_inspector decides), and a connection no chain accepts is closed.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::TrustBundle;
use crate::config::tls::{DownstreamTls, MeshTls, SanMatch, UpstreamTls};
use crate::identity::WorkloadIdentity;

/// How long a client may take to start and finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// On a port that also takes plaintext, how long to wait for a client's first byte before
/// treating the connection as plaintext (a server-first protocol sends nothing first).
pub const FIRST_BYTE_WAIT: Duration = Duration::from_secs(1);

pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// The proxy's certificate and the trust bundles, as they are now.
#[derive(Debug, Default)]
pub struct MeshState {
    /// Set at start when the bootstrap gives the proxy an identity.
    pub identity: OnceLock<Arc<WorkloadIdentity>>,
    bundles: ArcSwap<BTreeMap<String, Arc<TrustBundle>>>,
}

impl MeshState {
    /// The trust bundles of a new configuration (from the next handshake on).
    pub fn set_bundles(&self, bundles: &BTreeMap<String, Arc<TrustBundle>>) {
        if **self.bundles.load() != *bundles {
            self.bundles.store(Arc::new(bundles.clone()));
        }
    }

    fn bundle(&self, name: &str) -> Result<Arc<TrustBundle>, Error> {
        self.bundles.load().get(name).cloned().ok_or_else(|| {
            Error::General(format!("the trust bundle (SDS secret {name:?}) has not arrived from the control plane"))
        })
    }

    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        let svid = self.identity.get()?.current()?;
        Some(svid.certified.clone())
    }
}

/// Presents the workload certificate current at handshake time.
#[derive(Debug)]
struct WorkloadCert(Arc<MeshState>);

impl ResolvesClientCert for WorkloadCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for WorkloadCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let c = self.0.certified();
        if c.is_none() {
            tracing::warn!("refusing a TLS connection: this proxy has no workload certificate (bootstrap identity)");
        }
        c
    }
}

/// Why a peer certificate was refused beyond the chain (shown in connect errors and logs).
#[derive(Debug)]
struct PeerRefused(String);

impl std::fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerRefused {}

/// Verifies a peer: its chain against the bundle, then its URI SANs.
#[derive(Debug)]
struct PeerVerifier {
    state: Arc<MeshState>,
    roots: String,
    sans: Vec<SanMatch>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn new(state: &Arc<MeshState>, mesh: &MeshTls) -> PeerVerifier {
        PeerVerifier {
            state: state.clone(),
            roots: mesh.roots.clone(),
            sans: mesh.sans.clone(),
            algs: provider().signature_verification_algorithms,
        }
    }

    fn check_sans(&self, end_entity: &CertificateDer<'_>) -> Result<(), Error> {
        if self.sans.is_empty() {
            return Ok(());
        }
        let names = trellis_ca::subject_alt_names(end_entity);
        if names.iter().any(|n| self.sans.iter().any(|m| m.matches(n))) {
            return Ok(());
        }
        let want: Vec<String> = self
            .sans
            .iter()
            .map(|m| match m {
                SanMatch::Exact(s) => s.clone(),
                SanMatch::Prefix(p) => format!("{p}*"),
            })
            .collect();
        Err(Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PeerRefused(format!(
            "the peer is {names:?}, not one of {want:?}"
        )))))))
    }
}

/// The handshake-signature checks both verifier traits ask for, with the provider's algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let bundle = self.state.bundle(&self.roots)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &bundle.store,
            intermediates,
            now,
            self.algs.all,
        )?;
        self.check_sans(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let bundle = self.state.bundle(&self.roots)?;
        bundle.client_verifier.verify_client_cert(end_entity, intermediates, now)?;
        self.check_sans(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

fn versions(mesh: &MeshTls) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let mut v = Vec::new();
    if mesh.tls13 {
        v.push(&rustls::version::TLS13);
    }
    if mesh.tls12 {
        v.push(&rustls::version::TLS12);
    }
    v
}

/// A cluster's client side: built once per cluster configuration.
#[derive(Debug)]
pub struct ClientSide {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClientSide {
    pub fn new(state: &Arc<MeshState>, t: &UpstreamTls) -> Result<ClientSide, String> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions(&t.mesh))
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier::new(state, &t.mesh)))
            .with_client_cert_resolver(Arc::new(WorkloadCert(state.clone())));
        config.alpn_protocols = t.mesh.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let server_name = ServerName::try_from(t.sni.clone()).map_err(|e| format!("SNI {:?}: {e}", t.sni))?;
        Ok(ClientSide { config: Arc::new(config), server_name })
    }

    /// The TLS handshake on a connected socket.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Io> {
        let c = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, c.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Io::Client(Box::new(tls)))
    }
}

/// An inbound listener's server side.
#[derive(Debug)]
pub struct ServerSide {
    /// Negotiates ALPN (when the client offers one of the configured protocols).
    with_alpn: Arc<rustls::ServerConfig>,
    /// For clients offering none of them: no ALPN, as Envoy (rustls would refuse the handshake).
    without_alpn: Arc<rustls::ServerConfig>,
    alpn: Vec<Vec<u8>>,
}

impl ServerSide {
    pub fn new(state: &Arc<MeshState>, t: &DownstreamTls) -> Result<ServerSide, String> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions(&t.mesh))
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(PeerVerifier::new(state, &t.mesh)))
            .with_cert_resolver(Arc::new(WorkloadCert(state.clone())));
        let alpn: Vec<Vec<u8>> = t.mesh.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let mut with_alpn = config.clone();
        with_alpn.alpn_protocols = alpn.clone();
        Ok(ServerSide { with_alpn: Arc::new(with_alpn), without_alpn: Arc::new(config), alpn })
    }

    /// The TLS handshake of an accepted connection; the peer's certificate is checked.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<(Io, PeerIdentity)> {
        let handshake = async {
            let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
            let hello = start.client_hello();
            let offered: Vec<&[u8]> = hello.alpn().map(|a| a.collect()).unwrap_or_default();
            let config = if offered.iter().any(|o| self.alpn.iter().any(|a| a == o)) {
                self.with_alpn.clone()
            } else {
                self.without_alpn.clone()
            };
            start.into_stream(config).await
        };
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let (_, conn) = tls.get_ref();
        let peer = conn.peer_certificates().and_then(|c| c.first()).map(|c| PeerIdentity::of(c)).unwrap_or_default();
        Ok((Io::Server(Box::new(tls)), peer))
    }
}

/// The authenticated peer of a downstream connection (Envoy's `connection.*` attributes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer certificate's first URI SAN (`spiffe://TD/ns/NS/sa/SA`); empty without mTLS.
    pub principal: String,
}

impl PeerIdentity {
    fn of(cert: &CertificateDer<'_>) -> PeerIdentity {
        let principal = trellis_ca::subject_alt_names(cert).into_iter().find(|n| n.contains("://")).unwrap_or_default();
        PeerIdentity { principal }
    }

    /// The namespace of a SPIFFE principal (`…/ns/NS/sa/SA`).
    pub fn namespace(&self) -> Option<&str> {
        let rest = self.principal.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/').skip(1);
        match (parts.next(), parts.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }
}

/// The TLS server sides of `snap`'s listeners (kept from `old` where a listener's TLS is
/// unchanged).
pub fn servers(
    old: &BTreeMap<String, Arc<ServerSide>>,
    old_snap: &crate::config::Snapshot,
    snap: &crate::config::Snapshot,
    mesh: &Arc<MeshState>,
) -> Result<BTreeMap<String, Arc<ServerSide>>, String> {
    let mut out = BTreeMap::new();
    for (name, l) in &snap.listeners {
        let Some(t) = &l.transport.tls else { continue };
        let unchanged = old_snap.listeners.get(name).is_some_and(|o| o.transport.tls.as_ref() == Some(t));
        let side = match old.get(name) {
            Some(s) if unchanged => s.clone(),
            _ => Arc::new(ServerSide::new(mesh, t).map_err(|e| format!("listener {name}: TLS: {e}"))?),
        };
        out.insert(name.clone(), side);
    }
    Ok(out)
}

/// Takes an accepted connection as the listener's transport says: TLS terminated (with the
/// authenticated peer), plaintext, or refused (`None`: closed, and logged at debug level).
pub async fn accept(
    proxy: &crate::Proxy,
    listener: &str,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(Io, Option<Arc<PeerIdentity>>)> {
    let (server, plaintext) = {
        let rt = proxy.runtime.load();
        let l = rt.snapshot.listeners.get(listener)?;
        if l.transport.tls.is_none() {
            return Some((Io::Plain(tcp), None));
        }
        (rt.tls_servers.get(listener)?.clone(), l.transport.plaintext)
    };
    // A client that sends nothing (a server-first protocol such as MySQL or SMTP) is
    // plaintext once the wait is over, where plaintext is allowed (Istio: inbound listeners
    // continue on the TLS inspector's timeout); under STRICT it gets the handshake timeout.
    let wait = if plaintext { FIRST_BYTE_WAIT } else { HANDSHAKE_TIMEOUT };
    match starts_with_tls(&tcp, wait).await {
        Ok(None) if plaintext => Some((Io::Plain(tcp), None)),
        Ok(None) => {
            tracing::debug!(%listener, %peer, "no TLS handshake within {wait:?}: closed (mTLS required)");
            None
        }
        Ok(Some(true)) => match server.accept(tcp).await {
            Ok((io, id)) => Some((io, Some(Arc::new(id)))),
            Err(e) => {
                proxy.stats.tls_handshake_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(%listener, %peer, error = %e, "TLS handshake failed");
                None
            }
        },
        Ok(Some(false)) if plaintext => Some((Io::Plain(tcp), None)),
        Ok(Some(false)) => {
            proxy.stats.plaintext_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%listener, %peer, "plaintext refused: this port requires mTLS (PeerAuthentication STRICT)");
            None
        }
        Err(e) => {
            tracing::debug!(%listener, %peer, error = %e, "connection closed before its first byte");
            None
        }
    }
}

/// Whether an accepted connection starts with a TLS handshake record (peeked, not read);
/// `None` if the client sent nothing within `wait`. An error: closed before its first byte.
pub async fn starts_with_tls(tcp: &TcpStream, wait: Duration) -> io::Result<Option<bool>> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, tcp.peek(&mut first)).await {
        Err(_) => Ok(None),
        Ok(Ok(0)) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
        Ok(Ok(_)) => Ok(Some(first[0] == 0x16)),
        Ok(Err(e)) => Err(e),
    }
}

/// A connection: plaintext or either side of TLS.
#[derive(Debug)]
pub enum Io {
    Plain(TcpStream),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Io {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Client(s) => s.get_ref().0,
            Io::Server(s) => s.get_ref().0,
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Client($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Io::Server($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Client(s) => s.is_write_vectored(),
            Io::Server(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}
