//! The REST/JSON config API, with Kubernetes-style paths:
//!
//! ```text
//! GET    /apis                                                    kinds served
//! GET    /apis/{group}/{version}/{plural}                         list (all namespaces) [?watch=true]
//! GET    /apis/{group}/{version}/namespaces/{ns}/{plural}         list in a namespace   [?watch=true]
//! POST   /apis/{group}/{version}/namespaces/{ns}/{plural}         create
//! GET    /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}  get
//! PUT    /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}  replace (409 on a stale resourceVersion)
//! DELETE /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}  delete
//! POST   /apis/trellis.dev/v1alpha1/apply                         validate a batch, then create/update each
//! GET    /apis/trellis.dev/v1alpha1/analyze                       cross-resource diagnostics of the stored config
//! POST   /apis/trellis.dev/v1alpha1/wasmmodules                   upload a wasm module (body: its bytes) [?sha256=]
//! GET    /apis/trellis.dev/v1alpha1/wasmmodules                   stored modules
//! ```
//!
//! Proxies fetch stored modules, content-addressed, from the xDS port: `GET /wasm/{sha256}`
//! ([`module_router`]).
//!
//! Cluster-scoped kinds (MeshCluster) drop the `namespaces/{ns}` part. Errors are Kubernetes
//! `Status` objects whose `details.causes[].field` names the field path. A request that fails
//! validation changes nothing.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{StreamExt, stream};
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_model::analyze::{Analyzed, Diagnostic, analyze};
use trellis_model::parse::parse_resource;
use trellis_model::spec::TokenRole;
use trellis_model::{Kind, Resource, ResourceKey, validate_resource};
use trellis_store::{Error as StoreError, ResourceStore, WatchEvent};

use crate::auth::{Auth, Principal};

/// Shared by every handler.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub store: ResourceStore,
    pub auth: Arc<Auth>,
    /// The xDS hub, for proxy status (absent in API-only tests).
    pub hub: Option<Arc<trellis_xds::Hub>>,
}

/// The API router. `/healthz` and `/version` need no token; everything under `/apis` does.
pub fn router(state: ApiState) -> Router {
    let apis = Router::new()
        .route("/apis", get(discovery))
        .route("/apis/trellis.dev/v1alpha1/apply", post(apply))
        .route("/apis/trellis.dev/v1alpha1/analyze", get(analyze_stored))
        .route("/apis/trellis.dev/v1alpha1/proxystatus", get(proxy_status))
        .route(
            "/apis/trellis.dev/v1alpha1/wasmmodules",
            get(list_modules).post(push_module).layer(axum::extract::DefaultBodyLimit::max(MAX_MODULE_BYTES)),
        )
        .route("/apis/{group}/{version}/namespaces/{ns}/{plural}", get(list_namespaced).post(create_namespaced))
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
            get(get_namespaced).put(replace_namespaced).delete(delete_namespaced),
        )
        .route("/apis/{group}/{version}/{plural}", get(list_all).post(create_cluster))
        .route("/apis/{group}/{version}/{plural}/{name}", get(get_cluster).put(replace_cluster).delete(delete_cluster))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/version", get(|| async { axum::Json(json!({"trellis": env!("CARGO_PKG_VERSION")})) }))
        .merge(apis)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such API path; see GET /apis") })
}

async fn authenticate(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    let authz = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(principal) = state.auth.authenticate(authz) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "a valid bearer token is required: pass the admin token (see <data-dir>/admin.token) or an ApiToken's secret as 'Authorization: Bearer TOKEN'",
        )
        .into_response();
    };
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    if let Err(why) = authorize(&principal, &method, &path) {
        tracing::info!(target: "audit", %method, %path, token = %principal.name, status = 403, "refused");
        return ApiError::new(StatusCode::FORBIDDEN, "Forbidden", why).into_response();
    }
    let token = principal.name.clone();
    request.extensions_mut().insert(principal);
    let response = next.run(request).await;
    if method != Method::GET {
        tracing::info!(target: "audit", %method, %path, %token, status = response.status().as_u16(), "config write");
    }
    response
}

/// Checks what a request under `/apis` reaches against the principal: the kind and namespace
/// come from the path. `apply` is checked again per item by [`apply_batch`].
fn authorize(principal: &Principal, method: &Method, path: &str) -> Result<(), String> {
    let write = !matches!(*method, Method::GET | Method::HEAD);
    let segments: Vec<&str> = path.trim_start_matches("/apis").split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        [] => Ok(()),
        ["trellis.dev", "v1alpha1", "apply"] => principal.check(write, Some(Kind::VirtualService), None).or_else(|e| {
            // Namespace limits are checked per item; only the role matters here.
            if principal.role == TokenRole::Viewer { Err(e) } else { Ok(()) }
        }),
        ["trellis.dev", "v1alpha1", "analyze" | "proxystatus"] => principal.check(false, None, None),
        // Modules are shared by every namespace: uploading one takes a token for all of them.
        ["trellis.dev", "v1alpha1", "wasmmodules", ..] => principal.check(write, Some(Kind::WasmPlugin), None),
        [group, _, "namespaces", ns, plural, ..] => {
            principal.check(write, Kind::from_group_plural(group, plural), Some(ns))
        }
        [group, _, plural, ..] => principal.check(write, Kind::from_group_plural(group, plural), None),
        _ => Ok(()),
    }
}

// ===== errors =====

/// A Kubernetes-style `Status` error.
#[derive(Debug)]
pub struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub causes: Vec<(String, String)>,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), causes: Vec::new() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn invalid(what: &str, causes: Vec<(String, String)>) -> Self {
        let summary = causes
            .iter()
            .map(|(f, m)| if f.is_empty() { m.clone() } else { format!("{f}: {m}") })
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            code: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            message: format!("{what} is invalid: {summary}"),
            causes,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (code, reason) = match &e {
            StoreError::NotFound { .. } => (StatusCode::NOT_FOUND, "NotFound"),
            StoreError::AlreadyExists { .. } => (StatusCode::CONFLICT, "AlreadyExists"),
            StoreError::Conflict { .. } => (StatusCode::CONFLICT, "Conflict"),
            StoreError::Compacted { .. } => (StatusCode::GONE, "Expired"),
            StoreError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid"),
            StoreError::Unavailable(_) | StoreError::Corrupt(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
            }
        };
        ApiError::new(code, reason, e.to_string())
    }
}

impl ApiError {
    fn status_json(&self) -> Value {
        let mut status = json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code.as_u16(),
        });
        if !self.causes.is_empty() {
            status["details"] = json!({"causes": self.causes.iter().map(|(f, m)| json!({"field": f, "message": m})).collect::<Vec<_>>()});
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code, axum::Json(self.status_json())).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

// ===== paths and bodies =====

#[derive(Debug, Deserialize)]
struct KindPath {
    group: String,
    version: String,
    plural: String,
}

#[derive(Debug, Deserialize)]
struct NsPath {
    group: String,
    version: String,
    ns: String,
    plural: String,
}

#[derive(Debug, Deserialize)]
struct NamedNsPath {
    group: String,
    version: String,
    ns: String,
    plural: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct NamedPath {
    group: String,
    version: String,
    plural: String,
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListParams {
    watch: Option<bool>,
    resource_version: Option<String>,
    label_selector: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WriteParams {
    dry_run: Option<String>,
}

impl WriteParams {
    fn dry_run(&self) -> bool {
        self.dry_run.as_deref().is_some_and(|d| d == "All" || d == "true")
    }
}

/// What a path addresses: a kind at a version, and a namespace scope.
struct Target {
    kind: Kind,
    version: String,
}

fn resolve(group: &str, version: &str, plural: &str) -> ApiResult<Target> {
    let kind = Kind::from_group_plural(group, plural).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no kind {plural:?} in group {group:?}; see GET /apis"),
        )
    })?;
    if !kind.versions().contains(&version) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{kind} is served at versions {} of {group}, not {version:?}", kind.versions().join(", ")),
        ));
    }
    Ok(Target { kind, version: version.to_string() })
}

fn namespaced(group: &str, version: &str, plural: &str) -> ApiResult<Target> {
    let t = resolve(group, version, plural)?;
    if !t.kind.namespaced() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} is cluster-scoped: use /apis/{group}/{version}/{plural}", t.kind),
        ));
    }
    Ok(t)
}

fn cluster_scoped(group: &str, version: &str, plural: &str) -> ApiResult<Target> {
    let t = resolve(group, version, plural)?;
    if t.kind.namespaced() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} is namespaced: use /apis/{group}/{version}/namespaces/NAMESPACE/{plural}/NAME", t.kind),
        ));
    }
    Ok(t)
}

/// Sets the apiVersion to the one the client asked through.
fn served(mut r: Resource, t: &Target) -> Resource {
    r.api_version = format!("{}/{}", t.kind.group(), t.version);
    r
}

/// Parses a request body (JSON, or YAML when the content type says so) as a resource envelope.
fn parse_body(headers: &HeaderMap, body: &Bytes) -> ApiResult<Resource> {
    let is_yaml = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.contains("yaml"));
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the request body is not UTF-8"))?;
    let value: Value = if is_yaml {
        serde_saphyr::from_str(text).map_err(|e| ApiError::bad_request(format!("invalid YAML: {e}")))?
    } else {
        serde_json::from_str(text).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?
    };
    envelope(value)
}

fn envelope(value: Value) -> ApiResult<Resource> {
    parse_resource(value).map_err(|(path, msg)| {
        let mut e = ApiError::bad_request(if path.is_empty() { msg.clone() } else { format!("{path}: {msg}") });
        e.causes.push((path, msg));
        e
    })
}

/// Validates a resource sent to `t` in namespace `ns` (None for cluster-scoped), returning its
/// key and the resource as it will be stored (preferred apiVersion, namespace filled in).
fn admit(t: &Target, ns: Option<&str>, name: Option<&str>, mut res: Resource) -> ApiResult<(ResourceKey, Resource)> {
    let what = format!("{} {:?}", t.kind, res.metadata.name);
    if res.kind != t.kind.name() {
        return Err(ApiError::invalid(
            &what,
            vec![("kind".into(), format!("{:?} sent to the {} endpoint", res.kind, t.kind.plural()))],
        ));
    }
    if let Some(ns) = ns {
        match res.metadata.namespace.as_deref() {
            None | Some("") => res.metadata.namespace = Some(ns.to_string()),
            Some(body_ns) if body_ns != ns => {
                return Err(ApiError::invalid(
                    &what,
                    vec![(
                        "metadata.namespace".into(),
                        format!("{body_ns:?} does not match the namespace in the path ({ns:?})"),
                    )],
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(name) = name
        && res.metadata.name != name
    {
        return Err(ApiError::invalid(
            &what,
            vec![(
                "metadata.name".into(),
                format!("{:?} does not match the name in the path ({name:?})", res.metadata.name),
            )],
        ));
    }
    let (key, _) = validate_resource(&res, ns.unwrap_or("default"))
        .map_err(|e| ApiError::invalid(&what, e.errors.into_iter().map(|f| (f.path, f.message)).collect()))?;
    res.api_version = t.kind.api_version();
    Ok((key, res))
}

fn key_for(t: &Target, ns: &str, name: &str) -> ResourceKey {
    ResourceKey::new(t.kind, ns, name)
}

// ===== handlers =====

async fn discovery() -> axum::Json<Value> {
    let kinds: Vec<Value> = Kind::ALL
        .iter()
        .map(|k| json!({"kind": k.name(), "group": k.group(), "versions": k.versions(), "plural": k.plural(), "namespaced": k.namespaced(), "shortNames": k.short_names()}))
        .collect();
    axum::Json(json!({"kind": "APIResourceList", "resources": kinds}))
}

async fn list_namespaced(
    State(s): State<ApiState>,
    Path(p): Path<NsPath>,
    Query(q): Query<ListParams>,
) -> ApiResult<Response> {
    let t = namespaced(&p.group, &p.version, &p.plural)?;
    list_or_watch(&s, t, Some(p.ns), q).await
}

async fn list_all(
    State(s): State<ApiState>,
    Path(p): Path<KindPath>,
    Query(q): Query<ListParams>,
) -> ApiResult<Response> {
    let t = resolve(&p.group, &p.version, &p.plural)?;
    list_or_watch(&s, t, None, q).await
}

fn label_filter(selector: Option<&str>) -> ApiResult<Vec<(String, String)>> {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    sel.split(',')
        .map(|term| {
            term.split_once('=')
                .map(|(k, v)| (k.trim().trim_end_matches('=').to_string(), v.trim().to_string()))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("labelSelector term {term:?}: only key=value terms are supported"))
                })
        })
        .collect()
}

fn matches_labels(r: &Resource, filter: &[(String, String)]) -> bool {
    filter.iter().all(|(k, v)| r.metadata.labels.get(k) == Some(v))
}

async fn list_or_watch(s: &ApiState, t: Target, ns: Option<String>, q: ListParams) -> ApiResult<Response> {
    let filter = label_filter(q.label_selector.as_deref())?;
    if q.watch.unwrap_or(false) {
        return watch(s, t, ns, q.resource_version, filter).await;
    }
    let (items, rev) = s.store.list(Some(t.kind), ns.as_deref()).await?;
    let items: Vec<Resource> =
        items.into_iter().filter(|r| matches_labels(r, &filter)).map(|r| served(r, &t)).collect();
    Ok(axum::Json(json!({
        "apiVersion": format!("{}/{}", t.kind.group(), t.version),
        "kind": format!("{}List", t.kind.name()),
        "metadata": {"resourceVersion": rev.to_string()},
        "items": items,
    }))
    .into_response())
}

fn event_line(event_type: &str, object: &impl serde::Serialize) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Streams newline-delimited JSON events (`{"type": "ADDED"|"MODIFIED"|"DELETED"|"ERROR",
/// "object": ...}`). Without a resourceVersion, the current objects come first as ADDED. A
/// compacted resourceVersion ends the stream with an ERROR event holding a 410 Status: relist.
async fn watch(
    s: &ApiState,
    t: Target,
    ns: Option<String>,
    rv: Option<String>,
    filter: Vec<(String, String)>,
) -> ApiResult<Response> {
    let (initial, after) = match rv.as_deref().filter(|r| !r.is_empty() && *r != "0") {
        Some(rv) => (Vec::new(), trellis_store::parse_resource_version(rv)?),
        None => {
            let (items, rev) = s.store.list(Some(t.kind), ns.as_deref()).await?;
            (items, rev)
        }
    };
    let events = s.store.watch(Some(t.kind), ns.as_deref(), after).await?;
    let t = Arc::new(t);
    let t2 = t.clone();
    let head = stream::iter(
        initial
            .into_iter()
            .filter(|r| matches_labels(r, &filter))
            .map(move |r| Ok::<_, Infallible>(event_line("ADDED", &served(r, &t2))))
            .collect::<Vec<_>>(),
    );
    // Each change becomes a line; an error becomes an ERROR line and ends the stream.
    let tail = events
        .scan(false, move |ended, item: Result<WatchEvent, StoreError>| {
            if *ended {
                return futures::future::ready(None);
            }
            let line = match item {
                Ok(ev) => matches_labels(&ev.object, &filter)
                    .then(|| event_line(ev.event_type.as_str(), &served(ev.object, &t))),
                Err(e) => {
                    *ended = true;
                    Some(event_line("ERROR", &ApiError::from(e).status_json()))
                }
            };
            futures::future::ready(Some(line))
        })
        .filter_map(|line| futures::future::ready(line.map(Ok::<_, Infallible>)));
    let body = Body::from_stream(head.chain(tail));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn get_namespaced(State(s): State<ApiState>, Path(p): Path<NamedNsPath>) -> ApiResult<Response> {
    let t = namespaced(&p.group, &p.version, &p.plural)?;
    get_one(&s, &t, key_for(&t, &p.ns, &p.name)).await
}

async fn get_cluster(State(s): State<ApiState>, Path(p): Path<NamedPath>) -> ApiResult<Response> {
    let t = cluster_scoped(&p.group, &p.version, &p.plural)?;
    get_one(&s, &t, key_for(&t, "", &p.name)).await
}

async fn get_one(s: &ApiState, t: &Target, key: ResourceKey) -> ApiResult<Response> {
    let r = s.store.get(&key).await?.ok_or_else(|| ApiError::from(StoreError::NotFound { key: key.to_string() }))?;
    Ok(axum::Json(served(r, t)).into_response())
}

async fn create_namespaced(
    State(s): State<ApiState>,
    Path(p): Path<NsPath>,
    Query(w): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let t = namespaced(&p.group, &p.version, &p.plural)?;
    create(&s, t, Some(&p.ns), &w, &headers, &body).await
}

async fn create_cluster(
    State(s): State<ApiState>,
    Path(p): Path<KindPath>,
    Query(w): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let t = cluster_scoped(&p.group, &p.version, &p.plural)?;
    create(&s, t, None, &w, &headers, &body).await
}

async fn create(
    s: &ApiState,
    t: Target,
    ns: Option<&str>,
    w: &WriteParams,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let (key, res) = admit(&t, ns, None, parse_body(headers, body)?)?;
    if w.dry_run() {
        return Ok((StatusCode::CREATED, axum::Json(served(res, &t))).into_response());
    }
    let created = s.store.create(&key, &res).await?;
    Ok((StatusCode::CREATED, axum::Json(served(created, &t))).into_response())
}

async fn replace_namespaced(
    State(s): State<ApiState>,
    Path(p): Path<NamedNsPath>,
    Query(w): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let t = namespaced(&p.group, &p.version, &p.plural)?;
    replace(&s, t, Some(&p.ns), &p.name, &w, &headers, &body).await
}

async fn replace_cluster(
    State(s): State<ApiState>,
    Path(p): Path<NamedPath>,
    Query(w): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let t = cluster_scoped(&p.group, &p.version, &p.plural)?;
    replace(&s, t, None, &p.name, &w, &headers, &body).await
}

async fn replace(
    s: &ApiState,
    t: Target,
    ns: Option<&str>,
    name: &str,
    w: &WriteParams,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let (key, res) = admit(&t, ns, Some(name), parse_body(headers, body)?)?;
    if w.dry_run() {
        return Ok(axum::Json(served(res, &t)).into_response());
    }
    let updated = s.store.update(&key, &res).await?;
    Ok(axum::Json(served(updated, &t)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteParams {
    resource_version: Option<String>,
}

async fn delete_namespaced(
    State(s): State<ApiState>,
    Path(p): Path<NamedNsPath>,
    Query(d): Query<DeleteParams>,
) -> ApiResult<Response> {
    let t = namespaced(&p.group, &p.version, &p.plural)?;
    delete(&s, &t, key_for(&t, &p.ns, &p.name), d).await
}

async fn delete_cluster(
    State(s): State<ApiState>,
    Path(p): Path<NamedPath>,
    Query(d): Query<DeleteParams>,
) -> ApiResult<Response> {
    let t = cluster_scoped(&p.group, &p.version, &p.plural)?;
    delete(&s, &t, key_for(&t, "", &p.name), d).await
}

async fn delete(s: &ApiState, t: &Target, key: ResourceKey, d: DeleteParams) -> ApiResult<Response> {
    let expected = d.resource_version.as_deref().map(trellis_store::parse_resource_version).transpose()?;
    let deleted = s.store.delete(&key, expected).await?;
    Ok(axum::Json(served(deleted, t)).into_response())
}

// ===== apply and analyze =====

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApplyRequest {
    items: Vec<Value>,
    #[serde(default)]
    dry_run: bool,
    /// Namespace for namespaced items that name none (the CLI's `-n`).
    #[serde(default)]
    namespace: Option<String>,
}

fn diagnostic_json(d: &Diagnostic) -> Value {
    json!({
        "severity": d.severity.to_string(), "code": d.code, "resource": d.resource.to_string(),
        "kind": d.resource.kind.name(), "namespace": d.resource.namespace, "name": d.resource.name,
        "path": d.path, "message": d.message,
    })
}

/// Validates every item first; if any is invalid, returns 422 with causes named
/// `items[N].<field path>` and stores nothing. Otherwise creates or updates each item in order
/// and reports `created`, `configured` or `unchanged`, plus analyzer warnings about them.
async fn apply(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ApplyRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid apply request: {e}")))?;
    Ok(axum::Json(apply_batch(&s.store, &principal, req.items, req.namespace.as_deref(), req.dry_run).await?)
        .into_response())
}

/// The apply logic shared by the API and `trellis-control --apply`.
pub async fn apply_batch(
    store: &ResourceStore,
    principal: &Principal,
    items: Vec<Value>,
    namespace: Option<&str>,
    dry_run: bool,
) -> ApiResult<Value> {
    let default_ns = namespace.unwrap_or("default").to_string();
    let mut admitted = Vec::new();
    let mut causes = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, value) in items.into_iter().enumerate() {
        let res = match parse_resource(value) {
            Ok(r) => r,
            Err((path, msg)) => {
                causes.push((format!("items[{i}].{path}").trim_end_matches('.').to_string(), msg));
                continue;
            }
        };
        let kind = match res.kind() {
            Ok(k) => k,
            Err(msg) => {
                causes.push((format!("items[{i}].kind"), msg));
                continue;
            }
        };
        let t = Target { kind, version: kind.preferred_version().to_string() };
        let ns = kind
            .namespaced()
            .then(|| res.metadata.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| default_ns.clone()));
        match admit(&t, ns.as_deref(), None, res) {
            Ok((key, res)) => {
                if !seen.insert(key.clone()) {
                    causes.push((format!("items[{i}].metadata.name"), format!("{key} appears twice in this request")));
                }
                admitted.push((i, key, res));
            }
            Err(e) => {
                for (f, m) in e.causes {
                    causes.push((format!("items[{i}].{f}"), m));
                }
            }
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid("the request", causes));
    }
    let refused: Vec<(String, String)> = admitted
        .iter()
        .filter_map(|(i, key, _)| {
            let ns = (!key.namespace.is_empty()).then_some(key.namespace.as_str());
            principal.check(true, Some(key.kind), ns).err().map(|why| (format!("items[{i}]"), why))
        })
        .collect();
    if !refused.is_empty() {
        let message = refused.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join("; ");
        return Err(ApiError { code: StatusCode::FORBIDDEN, reason: "Forbidden", message, causes: refused });
    }
    let mut results = Vec::new();
    for (i, key, res) in &admitted {
        let existing = store.get(key).await?;
        let (action, rv) = match existing {
            Some(cur) if cur.same_intent(res) => ("unchanged", cur.metadata.resource_version.clone()),
            Some(_) if dry_run => ("configured", None),
            None if dry_run => ("created", None),
            Some(_) => ("configured", store.update(key, res).await?.metadata.resource_version),
            None => match store.create(key, res).await {
                Ok(c) => ("created", c.metadata.resource_version),
                // Created concurrently since our read: update it instead.
                Err(StoreError::AlreadyExists { .. }) => {
                    ("configured", store.update(key, res).await?.metadata.resource_version)
                }
                Err(e) => return Err(e.into()),
            },
        };
        results.push(json!({
            "index": i, "kind": key.kind.name(), "group": key.kind.group(), "namespace": key.namespace, "name": key.name,
            "action": action, "resourceVersion": rv,
        }));
    }
    // Analyzer findings about what was applied, in the context of everything stored.
    let applied: BTreeSet<ResourceKey> = admitted.iter().map(|(_, k, _)| k.clone()).collect();
    let mut context = stored_analyzed(store).await?;
    if dry_run {
        context.retain(|a| !applied.contains(&a.key));
        for (_, key, res) in &admitted {
            if let Ok((_, spec)) = validate_resource(res, &key.namespace) {
                context.push(Analyzed { key: key.clone(), spec, origin: None });
            }
        }
    }
    let warnings: Vec<Value> =
        analyze(&context).iter().filter(|d| applied.contains(&d.resource)).map(diagnostic_json).collect();
    Ok(json!({"results": results, "diagnostics": warnings, "dryRun": dry_run}))
}

async fn stored_analyzed(store: &ResourceStore) -> ApiResult<Vec<Analyzed>> {
    let (items, _) = store.list(None, None).await?;
    let mut out = Vec::with_capacity(items.len());
    for r in items {
        let ns = r.namespace().to_string();
        match validate_resource(&r, &ns) {
            Ok((key, spec)) => out.push(Analyzed { key, spec, origin: None }),
            Err(e) => {
                tracing::warn!(resource = %r.metadata.name, error = %e, "stored resource no longer validates")
            }
        }
    }
    Ok(out)
}

async fn analyze_stored(State(s): State<ApiState>) -> ApiResult<Response> {
    let items = stored_analyzed(&s.store).await?;
    let diags: Vec<Value> = analyze(&items).iter().map(diagnostic_json).collect();
    Ok(axum::Json(json!({"resources": items.len(), "diagnostics": diags})).into_response())
}

async fn proxy_status(State(s): State<ApiState>) -> ApiResult<Response> {
    match &s.hub {
        Some(hub) => Ok(axum::Json(crate::debug::proxy_status_json(hub)).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "NotFound", "this control plane serves no xDS")),
    }
}

// ===== wasm modules =====

/// Largest module accepted.
pub const MAX_MODULE_BYTES: usize = 32 << 20;

#[derive(Debug, Deserialize)]
struct PushParams {
    sha256: Option<String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

async fn push_module(State(s): State<ApiState>, Query(q): Query<PushParams>, body: Bytes) -> ApiResult<Response> {
    if body.len() < 8 || &body[..4] != b"\0asm" {
        return Err(ApiError::bad_request("the body is not a WebAssembly module (it must start with \\0asm)"));
    }
    if body[4..8] != [1, 0, 0, 0] {
        return Err(ApiError::bad_request(
            "not a WebAssembly core module of version 1 (components are not proxy-wasm modules)",
        ));
    }
    let sha = sha256_hex(&body);
    if let Some(want) = q.sha256.as_deref().map(str::to_ascii_lowercase)
        && want != sha
    {
        return Err(ApiError::bad_request(format!("sha256 mismatch: the body is {sha}, the request said {want}")));
    }
    let created = s.store.put_module(&sha, &body).await?;
    tracing::info!(target: "audit", sha256 = %sha, size = body.len(), created, "wasm module stored");
    let code = if created { StatusCode::CREATED } else { StatusCode::OK };
    let out = json!({"sha256": sha, "size": body.len(), "url": format!("trellis://{sha}"), "created": created});
    Ok((code, axum::Json(out)).into_response())
}

async fn list_modules(State(s): State<ApiState>) -> ApiResult<Response> {
    let modules = s.store.list_modules().await?;
    let items: Vec<Value> = modules
        .iter()
        .map(|(sha, size)| json!({"sha256": sha, "size": size, "url": format!("trellis://{sha}")}))
        .collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

/// What proxies fetch modules from (served on the xDS port, no token: modules are addressed
/// by their sha256 and verified by the proxy against it): `GET /wasm/{sha256}`.
pub fn module_router(store: ResourceStore) -> Router {
    Router::new()
        .route(
            "/wasm/{sha256}",
            get(|State(store): State<ResourceStore>, Path(sha): Path<String>| async move {
                let sha = sha.to_ascii_lowercase();
                if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                    return (StatusCode::BAD_REQUEST, "a module is named by its sha256 (64 hex digits)\n")
                        .into_response();
                }
                match store.get_module(&sha).await {
                    Ok(Some(bytes)) => ([(header::CONTENT_TYPE, "application/wasm")], bytes).into_response(),
                    Ok(None) => (StatusCode::NOT_FOUND, format!("no module {sha}; upload it with trellis wasm push\n"))
                        .into_response(),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("the store failed: {e}\n")).into_response(),
                }
            }),
        )
        .with_state(store)
}
