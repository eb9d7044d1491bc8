//! `trellis-agent`: the workload identity for a proxy that cannot make a CSR itself — Envoy —
//! as istio-agent does it. It keeps the workload's certificate current exactly as trellis-proxy
//! does (key made here, CSR with the WorkloadToken, renewal at half-life: [`crate::identity`])
//! and serves it to the Envoy beside it over SDS (SotW `StreamSecrets`) on a unix socket: the
//! secret `default`, a `tls_certificate` with the chain and the key inline, pushed again at
//! every renewal. The key crosses only that socket (created mode 0600). Envoy's bootstrap names
//! the socket as the static cluster `sds-grpc` and sets the node metadata `TRELLIS_MTLS: "true"`
//! (docs/security.md); the trust bundle (`ROOTCA`) comes from the control plane over ADS.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, TlsCertificate, secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::config::SECRET_TYPE;
/// The only secret the agent has: the workload's certificate and key (Istio's name).
use crate::config::tls::WORKLOAD_SECRET;
use crate::identity::WorkloadIdentity;

/// The SDS service over the identity.
#[derive(Debug, Clone)]
pub struct SdsAgent {
    identity: Arc<WorkloadIdentity>,
    nonce: Arc<AtomicU64>,
}

impl SdsAgent {
    pub fn new(identity: Arc<WorkloadIdentity>) -> SdsAgent {
        SdsAgent { identity, nonce: Arc::new(AtomicU64::new(0)) }
    }

    pub fn service(self) -> SecretDiscoveryServiceServer<SdsAgent> {
        SecretDiscoveryServiceServer::new(self)
    }

    /// The response for `names` with the certificate held now, if any was asked and is held.
    fn response(&self, names: &[String]) -> Option<DiscoveryResponse> {
        if !names.is_empty() && !names.iter().any(|n| n == WORKLOAD_SECRET) {
            return None;
        }
        let svid = self.identity.current()?;
        let s = Secret {
            name: WORKLOAD_SECRET.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineBytes(svid.chain_pem.as_bytes().to_vec())),
                    ..Default::default()
                }),
                private_key: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineBytes(svid.key_pem.expose().as_bytes().to_vec())),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        Some(DiscoveryResponse {
            version_info: svid.serial.clone(),
            resources: vec![envoy_types::util::pack_any(s)],
            type_url: SECRET_TYPE.into(),
            nonce: self.nonce.fetch_add(1, Ordering::Relaxed).to_string(),
            ..Default::default()
        })
    }
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for SdsAgent {
    type DeltaSecretsStream = Responses<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Responses<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("trellis-agent serves SDS state-of-the-world (api_type GRPC)"))
    }

    async fn fetch_secrets(&self, req: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        self.response(&req.into_inner().resource_names)
            .map(Response::new)
            .ok_or_else(|| Status::unavailable("no workload certificate yet"))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut requests = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let agent = self.clone();
        tokio::spawn(async move {
            let mut names: Option<Vec<String>> = None;
            let mut sent = String::new();
            loop {
                let renewed = agent.identity.renewed.notified();
                tokio::pin!(renewed);
                renewed.as_mut().enable();
                // Send what the peer asked for when it is held and newer than what it has.
                if let Some(n) = &names
                    && let Some(resp) = agent.response(n)
                    && resp.version_info != sent
                {
                    sent = resp.version_info.clone();
                    tracing::info!(version = %sent, "SDS: sending the workload certificate");
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = requests.message() => match r {
                        Ok(Some(r)) => {
                            if let Some(e) = &r.error_detail {
                                tracing::warn!(error = %e.message, "SDS: the proxy refused the certificate");
                            }
                            names = Some(r.resource_names);
                        }
                        _ => return,
                    },
                    _ = &mut renewed => {}
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves SDS on the unix socket `path` (replacing a stale one; mode 0600) until the process ends.
pub async fn serve(identity: Arc<WorkloadIdentity>, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "SDS agent listening");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(SdsAgent::new(identity).service())
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
