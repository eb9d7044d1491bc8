//! The certificate service workloads get their identities from: Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` (so Istio's own agents could use
//! it too), on the xDS port. The caller proves who it is with a WorkloadToken's secret
//! (`authorization: Bearer SECRET`) and sends a CSR (its key never leaves it); it gets an SVID
//! for the token's namespace and service account — whatever the CSR asks for — and the chain
//! up to the root. A revoked (deleted) token gets nothing from then on.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use tonic::{Request, Response, Status};
use trellis_ca::api::{CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse, SERVICE};
use trellis_ca::{Ca, CaError, DEFAULT_TTL, Identity};
use trellis_model::spec::Spec;
use trellis_model::{Kind, Resource, validate_resource};
use trellis_store::{EventType, ReflectorEvent, ResourceStore, reflector};

use crate::auth::token_sha256;

/// Who may get which identity: WorkloadToken hashes → (token name, identity).
#[derive(Debug, Default)]
struct Tokens(RwLock<HashMap<String, (String, Identity)>>);

impl Tokens {
    fn entry(trust_domain: &str, r: &Resource) -> Option<(String, (String, Identity))> {
        match validate_resource(r, "") {
            Ok((key, Spec::WorkloadToken(t))) => {
                let id = Identity::new(trust_domain, &key.namespace, &t.service_account).ok()?;
                Some((t.sha256, (format!("{}/{}", key.namespace, key.name), id)))
            }
            _ => None,
        }
    }
}

/// The certificate service.
#[derive(Clone)]
pub struct CertificateService {
    ca: Arc<Ca>,
    tokens: Arc<Tokens>,
}

impl std::fmt::Debug for CertificateService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateService").field("ca", &self.ca).finish()
    }
}

impl CertificateService {
    /// The service, kept current with the WorkloadTokens in `store` for as long as it runs.
    pub fn new(ca: Arc<Ca>, store: ResourceStore) -> CertificateService {
        let tokens = Arc::new(Tokens::default());
        let (index, td) = (tokens.clone(), ca.trust_domain().to_string());
        tokio::spawn(async move {
            let mut events = Box::pin(reflector(store, Some(Kind::WorkloadToken), None));
            while let Some(ev) = events.next().await {
                let mut map = index.0.write().unwrap_or_else(|p| p.into_inner());
                match ev {
                    ReflectorEvent::Synced { items, .. } => {
                        *map = items.iter().filter_map(|r| Tokens::entry(&td, r)).collect();
                    }
                    ReflectorEvent::Changed(ev) => {
                        let name = format!(
                            "{}/{}",
                            ev.object.metadata.namespace.clone().unwrap_or_default(),
                            ev.object.metadata.name
                        );
                        map.retain(|_, (n, _)| *n != name);
                        if ev.event_type != EventType::Deleted
                            && let Some((hash, entry)) = Tokens::entry(&td, &ev.object)
                        {
                            map.insert(hash, entry);
                        }
                    }
                    ReflectorEvent::Retrying { error } => {
                        tracing::warn!(%error, "cannot read WorkloadTokens; keeping the last known set")
                    }
                }
            }
        });
        CertificateService { ca, tokens }
    }

    /// Signs `req` for whoever its bearer token names.
    pub fn create(&self, authorization: Option<&str>, req: &IstioCertificateRequest) -> Result<Vec<String>, Status> {
        let secret =
            authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).filter(|t| !t.is_empty()).ok_or_else(
                || Status::unauthenticated("a WorkloadToken's secret is required as 'authorization: Bearer SECRET'"),
            )?;
        let found = self.tokens.0.read().unwrap_or_else(|p| p.into_inner()).get(&token_sha256(secret)).cloned();
        let (token, identity) = found.ok_or_else(|| Status::unauthenticated("unknown or revoked workload token"))?;
        let ttl = match req.validity_duration {
            0 => DEFAULT_TTL,
            s if s > 0 => Duration::from_secs(s as u64),
            s => return Err(Status::invalid_argument(format!("validity_duration {s} is negative"))),
        };
        match self.ca.sign(&req.csr, &identity, ttl) {
            Ok(chain) => {
                tracing::info!(%token, identity = %identity, ttl_s = ttl.as_secs(), "certificate issued");
                Ok(chain)
            }
            Err(e @ CaError::WrongIdentity { .. }) => {
                tracing::warn!(%token, error = %e, "certificate refused");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e @ (CaError::BadCsr(_) | CaError::Ttl(_) | CaError::BadIdentity(_))) => {
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

impl tonic::server::NamedService for CertificateService {
    const NAME: &'static str = SERVICE;
}

struct Create(CertificateService);

impl tonic::server::UnaryService<IstioCertificateRequest> for Create {
    type Response = IstioCertificateResponse;
    type Future = std::future::Ready<Result<Response<IstioCertificateResponse>, Status>>;

    fn call(&mut self, req: Request<IstioCertificateRequest>) -> Self::Future {
        let auth = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        let answer = self
            .0
            .create(auth.as_deref(), req.get_ref())
            .map(|cert_chain| Response::new(IstioCertificateResponse { cert_chain }));
        std::future::ready(answer)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for CertificateService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != CREATE_CERTIFICATE {
            let path = req.uri().path().to_string();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("{path}: the certificate service has only CreateCertificate"))
                    .into_http())
            });
        }
        let svc = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(Create(svc), req).await)
        })
    }
}
