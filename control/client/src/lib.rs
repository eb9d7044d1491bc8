//! A client of the Trellis config API: typed calls over the REST/JSON paths, used by the
//! `trellis` CLI, the Terraform provider and the end-to-end tests. It speaks only the public
//! API (no store or model internals beyond the resource types).

pub mod files;

pub use http::Method;

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_model::{Kind, Resource};

/// Failures, by cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error `Status`.
    #[error("{message}")]
    Api { code: u16, reason: String, message: String, causes: Vec<Cause> },
    /// The server could not be reached or the connection broke.
    #[error("cannot reach the Trellis API at {server}: {detail}")]
    Transport { server: String, detail: String },
    /// The server's answer was not what the API promises.
    #[error("unexpected response from {server}: {detail}")]
    Protocol { server: String, detail: String },
}

/// One field-level reason of an `Invalid` error.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Cause {
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub message: String,
}

impl Error {
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Rewrites an apply cause field `items[N].path` as `<origin of N>: path` using the origins of
/// the documents sent.
pub fn describe_item_field(origins: &[String], field: &str) -> String {
    if let Some(rest) = field.strip_prefix("items[")
        && let Some((idx, path)) = rest.split_once(']')
        && let Ok(i) = idx.parse::<usize>()
    {
        let path = path.trim_start_matches('.');
        let origin = origins.get(i).cloned().unwrap_or_else(|| format!("item {i}"));
        return if path.is_empty() { origin } else { format!("{origin}: {path}") };
    }
    field.to_string()
}

/// The outcome of one item of an apply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    pub index: usize,
    pub kind: String,
    pub group: String,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured` or `unchanged`.
    pub action: String,
    pub resource_version: Option<String>,
}

/// An analyzer finding, as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Finding {
    pub severity: String,
    pub code: String,
    pub resource: String,
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApplyResponse {
    pub results: Vec<ApplyResult>,
    pub diagnostics: Vec<Finding>,
}

/// A watch event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub event_type: String,
    pub object: Value,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

/// API client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    server: String,
    token: Option<String>,
    http: HttpClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// The API path of a kind (and optionally namespace and name).
pub fn path(kind: Kind, namespace: Option<&str>, name: Option<&str>) -> String {
    let mut p = format!("/apis/{}/{}", kind.group(), kind.preferred_version());
    if kind.namespaced()
        && let Some(ns) = namespace
    {
        p.push_str(&format!("/namespaces/{ns}"));
    }
    p.push('/');
    p.push_str(kind.plural());
    if let Some(n) = name {
        p.push('/');
        p.push_str(n);
    }
    p
}

impl Client {
    /// `server` is `http://host:port` or `https://host:port`; `token` the bearer token (None
    /// for anonymous servers). HTTPS servers are trusted only through [`Client::with_ca`].
    pub fn new(server: &str, token: Option<String>) -> Self {
        Self::build(server, token, rustls::RootCertStore::empty())
    }

    /// Like [`Client::new`], trusting the PEM CA certificates in `ca_pem` for HTTPS (the
    /// control plane's `<data-dir>/api-ca.pem`, or your own CA).
    pub fn with_ca(server: &str, token: Option<String>, ca_pem: &[u8]) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let bad = |detail: String| Error::Transport { server: server.to_string(), detail };
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| bad(format!("the CA file is not PEM: {e}")))?;
            roots.add(cert).map_err(|e| bad(format!("the CA file holds an unusable certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("the CA file holds no certificate".into()));
        }
        Ok(Self::build(server, token, roots))
    }

    fn build(server: &str, token: Option<String>, roots: rustls::RootCertStore) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let tls =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        let https =
            HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(connector);
        let http = HttpClient::builder(TokioExecutor::new()).build(https);
        Self { server: server.trim_end_matches('/').to_string(), token, http }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    fn transport(&self, e: impl std::fmt::Display) -> Error {
        Error::Transport { server: self.server.clone(), detail: e.to_string() }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response<hyper::body::Incoming>> {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.server));
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            let kind = if path.contains("/wasmmodules") { "application/wasm" } else { "application/json" };
            req = req.header(header::CONTENT_TYPE, kind);
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| self.transport(e))?;
        self.http
            .request(req)
            .await
            .map_err(|e| {
                let hint = if is_certificate_error(&e) {
                    " (the server's certificate is not trusted: pass --ca-file / TRELLIS_CA_FILE with the control plane's <data-dir>/api-ca.pem)"
                } else {
                    ""
                };
                self.transport(format!("{}{hint}", error_chain(&e)))
            })
    }

    /// Sends a request and returns the JSON answer, or the server's `Status` as an error.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        self.call_raw(method, path, body).await
    }

    /// [`Client::call`] with the request body as bytes.
    async fn call_raw(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Value> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| self.transport(e))?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
            server: self.server.clone(),
            detail: format!("{status}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])),
        })?;
        if status.is_success() {
            return Ok(value);
        }
        Err(status_error(status, &value))
    }

    /// Uploads a wasm module; the answer has its `sha256`, `size`, `url` (`trellis://SHA256`)
    /// and whether it was `created` (false: stored already).
    pub async fn push_module(&self, bytes: Vec<u8>) -> Result<Value> {
        self.call_raw(Method::POST, "/apis/trellis.dev/v1alpha1/wasmmodules", Some(bytes)).await
    }

    /// Stored modules: `{"items": [{"sha256", "size", "url"}]}`.
    pub async fn list_modules(&self) -> Result<Value> {
        self.call(Method::GET, "/apis/trellis.dev/v1alpha1/wasmmodules", None).await
    }

    pub async fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<(Vec<Resource>, String)> {
        let v = self.call(Method::GET, &path(kind, namespace, None), None).await?;
        let rv = v["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
        let items = serde_json::from_value(v["items"].clone())
            .map_err(|e| Error::Protocol { server: self.server.clone(), detail: e.to_string() })?;
        Ok((items, rv))
    }

    pub async fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Result<Option<Resource>> {
        match self.call(Method::GET, &path(kind, namespace, Some(name)), None).await {
            Ok(v) => Ok(Some(self.resource(v)?)),
            Err(Error::Api { code: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn resource(&self, v: Value) -> Result<Resource> {
        serde_json::from_value(v).map_err(|e| Error::Protocol { server: self.server.clone(), detail: e.to_string() })
    }

    pub async fn create(&self, res: &Resource) -> Result<Resource> {
        let kind = res.kind().map_err(|detail| Error::Protocol { server: self.server.clone(), detail })?;
        let body = serde_json::to_value(res).unwrap_or_default();
        let v = self
            .call(Method::POST, &path(kind, res.metadata.namespace.as_deref().or(Some("default")), None), Some(&body))
            .await?;
        self.resource(v)
    }

    /// Replaces a resource; with `metadata.resourceVersion` set, fails with 409 if stale.
    pub async fn replace(&self, res: &Resource) -> Result<Resource> {
        let kind = res.kind().map_err(|detail| Error::Protocol { server: self.server.clone(), detail })?;
        let body = serde_json::to_value(res).unwrap_or_default();
        let p = path(kind, res.metadata.namespace.as_deref().or(Some("default")), Some(&res.metadata.name));
        let v = self.call(Method::PUT, &p, Some(&body)).await?;
        self.resource(v)
    }

    pub async fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Result<Resource> {
        let v = self.call(Method::DELETE, &path(kind, namespace, Some(name)), None).await?;
        self.resource(v)
    }

    /// Validates all `items` server-side and applies them if all are valid.
    pub async fn apply(&self, items: Vec<Value>, namespace: Option<&str>, dry_run: bool) -> Result<ApplyResponse> {
        let body = json!({"items": items, "namespace": namespace, "dryRun": dry_run});
        let v = self.call(Method::POST, "/apis/trellis.dev/v1alpha1/apply", Some(&body)).await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol { server: self.server.clone(), detail: e.to_string() })
    }

    /// Cross-resource analysis of everything stored.
    pub async fn analyze(&self) -> Result<Vec<Finding>> {
        let v = self.call(Method::GET, "/apis/trellis.dev/v1alpha1/analyze", None).await?;
        serde_json::from_value(v["diagnostics"].clone())
            .map_err(|e| Error::Protocol { server: self.server.clone(), detail: e.to_string() })
    }

    pub async fn version(&self) -> Result<Value> {
        self.call(Method::GET, "/version", None).await
    }

    /// Watches a kind (in a namespace or all) from a resourceVersion (or from the current
    /// state, sent first as ADDED events, when `None`).
    pub async fn watch(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        resource_version: Option<&str>,
    ) -> Result<WatchStream> {
        let mut p = format!("{}?watch=true", path(kind, namespace, None));
        if let Some(rv) = resource_version {
            p.push_str(&format!("&resourceVersion={rv}"));
        }
        let resp = self.send(Method::GET, &p, None).await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.into_body().collect().await.map_err(|e| self.transport(e))?.to_bytes();
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(status_error(status, &value));
        }
        let server = self.server.clone();
        let body = resp.into_body().into_data_stream();
        let lines =
            futures::stream::unfold((body, Vec::<u8>::new(), server), |(mut body, mut buf, server)| async move {
                loop {
                    if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        let item = serde_json::from_slice::<WatchEvent>(&line[..line.len() - 1]).map_err(|e| {
                            Error::Protocol { server: server.clone(), detail: format!("bad watch event: {e}") }
                        });
                        return Some((item, (body, buf, server)));
                    }
                    match body.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            let err = Error::Transport { server: server.clone(), detail: e.to_string() };
                            return Some((Err(err), (body, Vec::new(), server)));
                        }
                        None => return None,
                    }
                }
            });
        Ok(Box::pin(lines))
    }
}

fn status_error(status: StatusCode, value: &Value) -> Error {
    let causes = value["details"]["causes"]
        .as_array()
        .map(|c| c.iter().filter_map(|x| serde_json::from_value(x.clone()).ok()).collect())
        .unwrap_or_default();
    Error::Api {
        code: status.as_u16(),
        reason: value["reason"].as_str().unwrap_or(status.canonical_reason().unwrap_or("Error")).to_string(),
        message: value["message"].as_str().map(str::to_string).unwrap_or_else(|| format!("{status}")),
        causes,
    }
}

/// The messages of an error and its sources, joined.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Whether an error was caused by a certificate the client does not trust, found by type: the
/// source chain is walked, and I/O errors are opened (connectors wrap rustls errors in I/O
/// errors, sometimes twice, and `io::Error::source` skips the wrapped error).
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
        return true;
    }
    if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        let inner: &(dyn std::error::Error + 'static) = inner;
        if is_certificate_error(inner) {
            return true;
        }
    }
    e.source().is_some_and(is_certificate_error)
}
