//! The config API over real HTTP on loopback, backed by a real embedded store.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use trellis_client::{Client, Error};
use trellis_control::api::{ApiState, router};
use trellis_control::auth::Auth;
use trellis_model::{Kind, Resource};
use trellis_store::ResourceStore;

const TOKEN: &str = "test-token-0123456789abcdef0123456789abcdef";

struct Server {
    addr: String,
    store: ResourceStore,
    _dir: tempfile::TempDir,
}

async fn start(anonymous: bool) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let kv = trellis_store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    let store = ResourceStore::new(Arc::new(kv));
    let auth = Arc::new(Auth::new(vec![TOKEN.into()], anonymous));
    auth.watch_tokens(store.clone());
    let state = ApiState { store: store.clone(), auth, hub: None };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    Server { addr, store, _dir: dir }
}

fn client(s: &Server) -> Client {
    Client::new(&s.addr, Some(TOKEN.into()))
}

fn vs(name: &str, weights: (i64, i64)) -> Resource {
    serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {"hosts": [name], "http": [{"route": [
            {"destination": {"host": name, "subset": "v1"}, "weight": weights.0},
            {"destination": {"host": name, "subset": "v2"}, "weight": weights.1}]}]}
    }))
    .unwrap()
}

fn api_code(e: &Error) -> u16 {
    e.status().unwrap_or_else(|| panic!("expected an API error, got {e}"))
}

#[tokio::test]
async fn requests_without_the_token_are_refused_unless_anonymous_is_enabled() {
    let s = start(false).await;
    let anon = Client::new(&s.addr, None);
    let e = anon.list(Kind::VirtualService, None).await.unwrap_err();
    assert_eq!(api_code(&e), 401);
    assert!(e.to_string().contains("bearer token"), "{e}");
    let wrong = Client::new(&s.addr, Some("nope".into()));
    assert_eq!(api_code(&wrong.list(Kind::VirtualService, None).await.unwrap_err()), 401);
    assert!(anon.version().await.is_ok(), "/version needs no token");
    assert!(client(&s).list(Kind::VirtualService, None).await.is_ok());

    let open = start(true).await;
    assert!(Client::new(&open.addr, None).list(Kind::VirtualService, None).await.is_ok());
}

#[tokio::test]
async fn create_get_list_replace_delete_round_trip() {
    let s = start(false).await;
    let c = client(&s);
    let created = c.create(&vs("reviews", (90, 10))).await.unwrap();
    let rv1 = created.metadata.resource_version.clone().unwrap();
    assert_eq!(created.api_version, "networking.istio.io/v1");
    let got = c.get(Kind::VirtualService, Some("bookinfo"), "reviews").await.unwrap().unwrap();
    assert_eq!(got, created);
    let (items, list_rv) = c.list(Kind::VirtualService, Some("bookinfo")).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(list_rv, rv1);
    assert_eq!(api_code(&c.create(&vs("reviews", (90, 10))).await.unwrap_err()), 409);

    // Replace with the current resourceVersion works; the stale one then gets 409.
    let mut next = vs("reviews", (50, 50));
    next.metadata.resource_version = Some(rv1.clone());
    let replaced = c.replace(&next).await.unwrap();
    assert_ne!(replaced.metadata.resource_version.as_deref(), Some(rv1.as_str()));
    let stale = c.replace(&next).await.unwrap_err();
    assert_eq!(api_code(&stale), 409);
    assert!(stale.to_string().contains("modified"), "{stale}");
    assert_eq!(c.get(Kind::VirtualService, Some("bookinfo"), "reviews").await.unwrap().unwrap().spec, replaced.spec);

    // Old API versions are served too, with the same object.
    let v = c
        .call(http::Method::GET, "/apis/networking.istio.io/v1alpha3/namespaces/bookinfo/virtualservices/reviews", None)
        .await
        .unwrap();
    assert_eq!(v["apiVersion"], "networking.istio.io/v1alpha3");
    assert_eq!(v["spec"], replaced.spec);

    c.delete(Kind::VirtualService, Some("bookinfo"), "reviews").await.unwrap();
    assert!(c.get(Kind::VirtualService, Some("bookinfo"), "reviews").await.unwrap().is_none());
    assert_eq!(api_code(&c.delete(Kind::VirtualService, Some("bookinfo"), "reviews").await.unwrap_err()), 404);
}

#[tokio::test]
async fn invalid_resources_get_422_with_field_paths_and_change_nothing() {
    let s = start(false).await;
    let c = client(&s);
    let before = s.store.current_revision().await.unwrap();
    match c.create(&vs("reviews", (80, 15))).await.unwrap_err() {
        Error::Api { code, reason, causes, .. } => {
            assert_eq!((code, reason.as_str()), (422, "Invalid"));
            assert_eq!(causes[0].field, "spec.http[0].route");
            assert!(causes[0].message.contains("sum to 95"), "{causes:?}");
        }
        other => panic!("{other}"),
    }
    let mut unknown = vs("reviews", (90, 10));
    unknown.spec["http"][0]["retrys"] = json!({"attempts": 3});
    match c.create(&unknown).await.unwrap_err() {
        Error::Api { code, causes, .. } => {
            assert_eq!(code, 422);
            assert_eq!(causes[0].field, "spec.http[0].retrys");
        }
        other => panic!("{other}"),
    }
    // Malformed JSON is a 400.
    let raw = c
        .call(
            http::Method::POST,
            "/apis/networking.istio.io/v1/namespaces/bookinfo/virtualservices",
            Some(&json!(["not", "an", "object"])),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&raw), 400);
    // A body for another namespace or kind than the path is refused.
    let mut other_ns = vs("reviews", (90, 10));
    other_ns.metadata.namespace = Some("elsewhere".into());
    let body = serde_json::to_value(&other_ns).unwrap();
    let e = c
        .call(http::Method::POST, "/apis/networking.istio.io/v1/namespaces/bookinfo/virtualservices", Some(&body))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), 422);
    let e = c
        .call(http::Method::POST, "/apis/networking.istio.io/v1/namespaces/bookinfo/destinationrules", Some(&body))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), 422);
    assert_eq!(s.store.current_revision().await.unwrap(), before, "rejected requests wrote nothing");
    // Unknown paths and versions are 404s that say what exists.
    let e = c.call(http::Method::GET, "/apis/networking.istio.io/v7/virtualservices", None).await.unwrap_err();
    assert_eq!(api_code(&e), 404);
    assert!(e.to_string().contains("v1, v1beta1, v1alpha3"), "{e}");
}

#[tokio::test]
async fn apply_is_all_or_nothing_per_request_and_reports_actions() {
    let s = start(false).await;
    let c = client(&s);
    let good = serde_json::to_value(vs("reviews", (90, 10))).unwrap();
    let bad = serde_json::to_value(vs("ratings", (90, 20))).unwrap();
    match c.apply(vec![good.clone(), bad], None, false).await.unwrap_err() {
        Error::Api { code, causes, .. } => {
            assert_eq!(code, 422);
            assert_eq!(causes.len(), 1);
            assert_eq!(causes[0].field, "items[1].spec.http[0].route");
        }
        other => panic!("{other}"),
    }
    assert!(c.list(Kind::VirtualService, None).await.unwrap().0.is_empty(), "nothing of the batch was stored");

    let first = c.apply(vec![good.clone()], None, false).await.unwrap();
    assert_eq!(first.results[0].action, "created");
    // The undefined subsets are reported by the analyzer.
    assert!(first.diagnostics.iter().any(|d| d.code == "TRL0102"), "{:?}", first.diagnostics);
    assert_eq!(c.apply(vec![good.clone()], None, false).await.unwrap().results[0].action, "unchanged");
    let changed = serde_json::to_value(vs("reviews", (50, 50))).unwrap();
    let dry = c.apply(vec![changed.clone()], None, true).await.unwrap();
    assert_eq!(dry.results[0].action, "configured");
    assert_eq!(
        c.get(Kind::VirtualService, Some("bookinfo"), "reviews").await.unwrap().unwrap().spec,
        good["spec"],
        "dry run stored nothing"
    );
    assert_eq!(c.apply(vec![changed], None, false).await.unwrap().results[0].action, "configured");
}

#[tokio::test]
async fn cluster_scoped_kinds_use_paths_without_namespaces() {
    let s = start(false).await;
    let c = client(&s);
    let mc: Resource = serde_json::from_value(json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "MeshCluster",
        "metadata": {"name": "east"}, "spec": {"network": "net-east", "eastWestGateway": {"address": "127.0.0.10", "port": 15443}}})).unwrap();
    let body = serde_json::to_value(&mc).unwrap();
    c.call(http::Method::POST, "/apis/trellis.dev/v1alpha1/meshclusters", Some(&body)).await.unwrap();
    let got = c.get(Kind::MeshCluster, None, "east").await.unwrap().unwrap();
    assert_eq!(got.metadata.namespace, None);
    let e =
        c.call(http::Method::GET, "/apis/trellis.dev/v1alpha1/namespaces/x/meshclusters/east", None).await.unwrap_err();
    assert_eq!(api_code(&e), 404);
}

async fn next_event(w: &mut trellis_client::WatchStream) -> trellis_client::WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("no watch event within 10 s")
        .expect("watch ended")
        .unwrap()
}

#[tokio::test]
async fn watch_streams_changes_from_a_resource_version() {
    let s = start(false).await;
    let c = client(&s);
    let a = c.create(&vs("a", (90, 10))).await.unwrap();
    let b = c.create(&vs("b", (90, 10))).await.unwrap();
    // From a's resourceVersion: b's creation, then live changes.
    let mut w = c.watch(Kind::VirtualService, Some("bookinfo"), a.metadata.resource_version.as_deref()).await.unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!((ev.event_type.as_str(), &ev.object["metadata"]["name"]), ("ADDED", &json!("b")));
    let mut b2 = vs("b", (10, 90));
    b2.metadata.resource_version = b.metadata.resource_version.clone();
    let b2 = c.replace(&b2).await.unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!(ev.event_type, "MODIFIED");
    assert_eq!(ev.object["metadata"]["resourceVersion"], json!(b2.metadata.resource_version.unwrap()));
    c.delete(Kind::VirtualService, Some("bookinfo"), "a").await.unwrap();
    assert_eq!(next_event(&mut w).await.event_type, "DELETED");

    // Without a resourceVersion, the current state comes first.
    let mut fresh = c.watch(Kind::VirtualService, None, None).await.unwrap();
    let ev = next_event(&mut fresh).await;
    assert_eq!((ev.event_type.as_str(), &ev.object["metadata"]["name"]), ("ADDED", &json!("b")));

    // A compacted resourceVersion ends the watch with a 410 ERROR event.
    let now = s.store.current_revision().await.unwrap();
    s.store.kv().compact(now).await.unwrap();
    let e = c.watch(Kind::VirtualService, None, Some("1")).await;
    match e {
        Err(e) => assert_eq!(api_code(&e), 410),
        Ok(mut w) => {
            let ev = next_event(&mut w).await;
            assert_eq!(ev.event_type, "ERROR");
            assert_eq!(ev.object["code"], json!(410));
        }
    }
}

#[tokio::test]
async fn yaml_bodies_are_accepted() {
    let s = start(false).await;
    let yaml = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}]\n";
    let resp =
        reqwest_like_post(&s.addr, "/apis/networking.istio.io/v1/namespaces/bookinfo/destinationrules", yaml).await;
    assert_eq!(resp.0, 201, "{}", resp.1);
    let v: Value = serde_json::from_str(&resp.1).unwrap();
    assert_eq!(v["metadata"]["namespace"], "bookinfo");
}

/// A raw HTTP/1.1 POST with a YAML body over a plain socket.
async fn reqwest_like_post(base: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(host).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

fn api_token(name: &str, role: &str, namespaces: &[&str], secret: &str) -> Resource {
    serde_json::from_value(json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name},
        "spec": {"role": role, "namespaces": namespaces, "sha256": trellis_control::auth::token_sha256(secret)}}))
    .unwrap()
}

/// Polls until `client` gets `want` (an HTTP status, 200 for success) listing VirtualServices
/// in `ns`, for up to 10 s.
async fn await_status(client: &Client, ns: Option<&str>, want: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = match client.list(Kind::VirtualService, ns).await {
            Ok(_) => 200,
            Err(e) => api_code(&e),
        };
        if got == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still {got}, expected {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn api_tokens_have_roles_namespaces_and_can_be_revoked() {
    let s = start(false).await;
    let admin = client(&s);
    admin.create(&api_token("reader", "Viewer", &[], "reader-secret")).await.unwrap();
    admin.create(&api_token("team", "Editor", &["bookinfo"], "team-secret")).await.unwrap();
    let reader = Client::new(&s.addr, Some("reader-secret".into()));
    let team = Client::new(&s.addr, Some("team-secret".into()));
    await_status(&reader, None, 200).await;
    await_status(&team, Some("bookinfo"), 200).await;

    // The viewer reads everything but writes nothing and cannot see tokens.
    let e = reader.create(&vs("reviews", (90, 10))).await.unwrap_err();
    assert_eq!(api_code(&e), 403);
    assert!(e.to_string().contains("read-only"), "{e}");
    assert_eq!(api_code(&reader.list(Kind::ApiToken, None).await.unwrap_err()), 403);
    assert_eq!(
        api_code(&reader.apply(vec![serde_json::to_value(vs("x", (90, 10))).unwrap()], None, false).await.unwrap_err()),
        403
    );

    // The editor works in its namespace only.
    team.create(&vs("reviews", (90, 10))).await.unwrap();
    let mut elsewhere = vs("reviews", (90, 10));
    elsewhere.metadata.namespace = Some("other".into());
    assert_eq!(api_code(&team.create(&elsewhere).await.unwrap_err()), 403);
    assert_eq!(api_code(&team.list(Kind::VirtualService, None).await.unwrap_err()), 403, "no cluster-wide list");
    assert_eq!(api_code(&team.analyze().await.unwrap_err()), 403);
    let batch = vec![serde_json::to_value(vs("ok", (90, 10))).unwrap(), serde_json::to_value(&elsewhere).unwrap()];
    match team.apply(batch, None, false).await.unwrap_err() {
        Error::Api { code, causes, .. } => {
            assert_eq!(code, 403);
            assert_eq!(causes[0].field, "items[1]");
        }
        other => panic!("{other}"),
    }
    assert!(
        admin.get(Kind::VirtualService, Some("bookinfo"), "ok").await.unwrap().is_none(),
        "a refused batch stores nothing"
    );
    assert!(
        admin.create(&api_token("bad", "Admin", &["bookinfo"], "x")).await.is_err(),
        "admin tokens cannot be namespaced"
    );

    // Revocation takes effect without a restart.
    admin.delete(Kind::ApiToken, None, "reader").await.unwrap();
    await_status(&reader, None, 401).await;
    // The secret is never stored: only its hash.
    let stored = admin.get(Kind::ApiToken, None, "team").await.unwrap().unwrap();
    assert!(!serde_json::to_string(&stored).unwrap().contains("team-secret"));
}

#[tokio::test]
async fn the_api_over_tls_is_trusted_only_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let kv = trellis_store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    let store = ResourceStore::new(Arc::new(kv));
    let state = ApiState { store, auth: Arc::new(Auth::new(vec![TOKEN.into()], false)), hub: None };
    let tls = trellis_control::tls::server_config(dir.path(), None, &["127.0.0.1".into(), "localhost".into()]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(trellis_control::tls::serve_tls(listener, tls, router(state), std::future::pending()));
    let ca = std::fs::read(trellis_control::tls::ca_path(dir.path())).unwrap();

    for host in ["127.0.0.1", "localhost"] {
        let c = Client::with_ca(&format!("https://{host}:{port}"), Some(TOKEN.into()), &ca).unwrap();
        c.create(&vs(&format!("via-{host}"), (90, 10))).await.unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    // Without the CA the certificate is refused, and the error says what to do.
    let untrusting = Client::new(&format!("https://127.0.0.1:{port}"), Some(TOKEN.into()));
    let e = untrusting.list(Kind::VirtualService, None).await.unwrap_err();
    assert!(matches!(e, Error::Transport { .. }) && e.to_string().contains("--ca-file"), "{e}");
    // Plain HTTP to the TLS port gets nothing useful.
    let plain = Client::new(&format!("http://127.0.0.1:{port}"), Some(TOKEN.into()));
    assert!(plain.list(Kind::VirtualService, None).await.is_err());
    // The CA is kept across restarts (clients pin it); its key is private.
    trellis_control::tls::server_config(dir.path(), None, &["127.0.0.1".into()]).unwrap();
    assert_eq!(std::fs::read(trellis_control::tls::ca_path(dir.path())).unwrap(), ca);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.path().join("api-ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn istio_metadata_and_status_are_kept_as_sent() {
    let s = start(false).await;
    let c = client(&s);
    let mut r = vs("kept", (90, 10));
    r.metadata.extra.insert("managedFields".into(), json!([{"manager": "kubectl", "operation": "Update"}]));
    r.metadata.extra.insert("finalizers".into(), json!(["example.com/keep"]));
    r.metadata.annotations.insert("kubectl.kubernetes.io/last-applied-configuration".into(), "{}".into());
    r.status = Some(json!({"conditions": [{"type": "Reconciled", "status": "True"}], "observedGeneration": 1}));
    c.create(&r).await.unwrap();
    let got = c.get(Kind::VirtualService, Some("bookinfo"), "kept").await.unwrap().unwrap();
    assert_eq!(got.metadata.extra["managedFields"], r.metadata.extra["managedFields"]);
    assert_eq!(got.metadata.extra["finalizers"], r.metadata.extra["finalizers"]);
    assert_eq!(got.metadata.annotations, r.metadata.annotations);
    assert_eq!(got.status, r.status);
}
