//! The foundation's promises, end to end with the real binaries: apply examples with the CLI
//! and list them; a broken file is rejected with its field path and nothing of it is stored;
//! kill -9 loses no acknowledged write; two control planes on one real etcd see each other's
//! writes through watch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use trellis_e2e::{ControlPlane, EtcdServer, cli, text};
use trellis_model::{Kind, Resource};

fn examples_count() -> usize {
    let root = trellis_e2e::repo_root().join("examples");
    let mut n = 0;
    for f in trellis_client::files::collect(&root).unwrap() {
        let (docs, errors) = trellis_model::parse_documents(&std::fs::read_to_string(&f).unwrap(), "x");
        assert!(errors.is_empty());
        n += docs.len();
    }
    n
}

#[test]
fn apply_examples_then_get_lists_them_and_a_broken_file_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).unwrap();
    let out = cp.cli(&["apply", "-f", "examples/"]).unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.ends_with(" created")).count(), examples_count(), "{stdout}");
    assert!(stdout.contains("virtualservice.networking.istio.io/reviews created"), "{stdout}");

    let out = cp.cli(&["get", "virtualservices", "-A"]).unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let header = stdout.lines().next().unwrap_or_default();
    assert!(header.starts_with("NAMESPACE") && header.contains("HOSTS"), "{stdout}");
    for (ns, name) in
        [("bookinfo", "reviews"), ("bookinfo", "ratings-fault"), ("bookinfo", "details"), ("mirror-demo", "httpbin")]
    {
        assert!(stdout.lines().any(|l| l.split_whitespace().take(2).eq([ns, name])), "{ns}/{name} missing:\n{stdout}");
    }

    // Re-applying changes nothing.
    let out = cp.cli(&["apply", "-f", "examples/canary"]).unwrap();
    assert!(text(&out).0.contains("virtualservice.networking.istio.io/reviews unchanged"), "{:?}", text(&out));

    // A file with one valid and one invalid document: rejected, with file, document and field.
    let out = cp.cli(&["apply", "-f", "control/model/tests/broken/half-bad.yaml"]).unwrap();
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("half-bad.yaml: document 1 (VirtualService bad-timeout): spec.http[0].timeout"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    let out = cp.cli(&["get", "dr", "-n", "broken-demo", "-o", "name"]).unwrap();
    assert!(out.status.success());
    assert!(text(&out).0.is_empty(), "nothing of the broken file may be stored: {:?}", text(&out));

    // The same through stdin, in JSON.
    let json_doc = r#"{"apiVersion":"networking.istio.io/v1","kind":"DestinationRule","metadata":{"name":"x","namespace":"ns"},"spec":{"host":"x","subsets":[{"name":"V1"}]}}"#;
    let out = cli(&cp.url(), &cp.token().unwrap(), &["apply", "-f", "-"], Some(json_doc)).unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("<stdin>: document 0 (DestinationRule x): spec.subsets[0].name"), "{:?}", text(&out));

    // get -o yaml round-trips through apply as "unchanged".
    let out = cp.cli(&["get", "vs", "reviews", "-n", "bookinfo", "-o", "yaml"]).unwrap();
    let yaml = text(&out).0;
    assert!(yaml.contains("resourceVersion"), "{yaml}");
    let out = cli(&cp.url(), &cp.token().unwrap(), &["apply", "-f", "-"], Some(&yaml)).unwrap();
    assert!(text(&out).0.contains("reviews unchanged"), "{:?}", text(&out));

    // Without the token the CLI gets a clear refusal.
    let out = cli(&cp.url(), "wrong", &["get", "vs", "-A"], None).unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("bearer token"), "{:?}", text(&out));
}

#[test]
fn validate_and_analyze_work_offline_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let ok = cli("http://127.0.0.1:1", "", &["validate", "-f", "examples/"], None).unwrap();
    assert!(ok.status.success(), "{:?}", text(&ok));
    assert!(text(&ok).0.contains(&format!("{} resources valid", examples_count())), "{:?}", text(&ok));
    let bad = cli("http://127.0.0.1:1", "", &["validate", "-f", "control/model/tests/broken/"], None).unwrap();
    assert!(!bad.status.success());
    let stderr = text(&bad).1;
    assert!(stderr.contains("bad-weights.yaml: document 0") && stderr.contains("sum to 95"), "{stderr}");
    assert!(
        stderr.contains("unknown-field.yaml: document 0") && stderr.contains("spec.trafficPolicy.conectionPool"),
        "{stderr}"
    );
    // A cross-resource error (route to an undefined subset) fails analyze.
    let file = dir.path().join("vs.yaml");
    std::fs::write(&file, "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: demo}\nspec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {host: r, subset: v9}\n").unwrap();
    let out = cli("http://127.0.0.1:1", "", &["analyze", "-f", file.to_str().unwrap()], None).unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("TRL0102"), "{:?}", text(&out));
}

fn vs(name: &str) -> Resource {
    serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "load"},
        "spec": {"hosts": [name], "http": [{"route": [{"destination": {"host": name}}]}]}
    }))
    .unwrap()
}

/// Writers keep creating resources; the control plane is killed with SIGKILL mid-stream; after
/// a restart every write that was acknowledged is there.
#[test]
fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &["--apply", trellis_e2e::repo_root().join("examples").to_str().unwrap()])
        .unwrap_or_else(|e| panic!("{e}"));
    let client = cp.client().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = client.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(rt.spawn(async move {
            // Bounded: at most 500 writes per writer, and it stops at the first failure.
            for i in 0..500 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let name = format!("w{w}-{i}");
                match client.create(&vs(&name)).await {
                    Ok(_) => acked.lock().unwrap().push(name),
                    Err(_) => break,
                }
            }
        }));
    }
    trellis_e2e::await_condition("100 acknowledged writes", Duration::from_secs(60), || {
        acked.lock().unwrap().len() >= 100
    })
    .unwrap();
    cp.kill_9().unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let cp = ControlPlane::start(dir.path(), &[]).unwrap();
    let client = cp.client().unwrap();
    let (stored, _) = rt.block_on(client.list(Kind::VirtualService, Some("load"))).unwrap();
    let stored: std::collections::BTreeSet<String> = stored.into_iter().map(|r| r.metadata.name).collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost after kill -9: {lost:?}", lost.len());
    let (all, _) = rt.block_on(client.list(Kind::VirtualService, None)).unwrap();
    assert!(all.iter().any(|r| r.metadata.name == "reviews"), "examples applied at start survive too");
    // The token survives too: the restarted plane accepted the same one.
    assert_eq!(cp.token().unwrap().len(), 64);
}

#[test]
fn two_control_planes_on_one_etcd_see_each_others_writes() {
    let etcd = EtcdServer::start().expect("a real etcd (run scripts/setup.sh)");
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let args = ["--store", "etcd", "--etcd-endpoints", etcd.endpoint.as_str(), "--etcd-prefix", "/e2e"];
    let a = ControlPlane::start(dir_a.path(), &args).unwrap();
    let b = ControlPlane::start(dir_b.path(), &args).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ca, cb) = (a.client().unwrap(), b.client().unwrap());
    rt.block_on(async {
        let (_, rv) = cb.list(Kind::VirtualService, None).await.unwrap();
        let mut watch = cb.watch(Kind::VirtualService, None, Some(&rv)).await.unwrap();
        let created = ca.create(&vs("from-a")).await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("B saw nothing within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(ev.event_type, "ADDED");
        assert_eq!(ev.object["metadata"]["name"], "from-a");
        assert_eq!(ev.object["metadata"]["resourceVersion"], json!(created.metadata.resource_version.clone().unwrap()));
        // And the other way round, with compare-and-swap across the two.
        let mut update = cb.get(Kind::VirtualService, Some("load"), "from-a").await.unwrap().unwrap();
        update.metadata.labels.insert("edited-by".into(), "b".into());
        cb.replace(&update).await.unwrap();
        let stale = ca.replace(&created).await.unwrap_err();
        assert_eq!(stale.status(), Some(409));
    });
}

#[test]
fn cli_tokens_are_scoped_and_revocable() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).unwrap();
    let out = cp.cli(&["token", "create", "ci", "--role", "viewer"]).unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let secret = stdout.trim().to_string();
    assert!(secret.starts_with("trl_") && secret.len() == 68, "{stdout}");
    let as_viewer = |args: &[&str]| cli(&cp.url(), &secret, args, None).unwrap();
    trellis_e2e::await_condition("the new token to work", Duration::from_secs(10), || {
        as_viewer(&["get", "vs", "-A"]).status.success()
    })
    .unwrap();
    let out = as_viewer(&["apply", "-f", "examples/canary"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("read-only"), "{:?}", text(&out));
    let listed = text(&cp.cli(&["token", "list"]).unwrap()).0;
    assert!(listed.contains("ci") && listed.contains("Viewer") && !listed.contains(&secret), "{listed}");
    let out = cp.cli(&["token", "revoke", "ci"]).unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    trellis_e2e::await_condition("the revoked token to stop working", Duration::from_secs(10), || {
        let out = as_viewer(&["get", "vs", "-A"]);
        !out.status.success() && text(&out).1.contains("bearer token")
    })
    .unwrap();
}

#[test]
fn the_cli_works_over_tls_with_the_control_planes_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &["--api-tls", "on"]).unwrap();
    assert!(cp.url().starts_with("https://"));
    let out = cp.cli(&["apply", "-f", "examples/canary"]).unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let out = cp.cli(&["get", "dr", "-n", "bookinfo", "-o", "name"]).unwrap();
    assert_eq!(text(&out).0.trim(), "destinationrule.networking.istio.io/reviews", "{:?}", text(&out));
    // Without the CA the CLI refuses the server's certificate and says what to pass.
    let out = cli(&cp.url(), &cp.token().unwrap(), &["get", "vs", "-A"], None).unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("--ca-file"), "{:?}", text(&out));
}
