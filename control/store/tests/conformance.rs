//! The store contract, written once and run against every backend: the embedded store on a
//! temporary file and a real etcd 3.5 started on a free loopback port.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use trellis_model::{Kind, Resource, ResourceKey};
use trellis_store::testing::EtcdServer;
use trellis_store::{Error, EventType, ReflectorEvent, ResourceStore, reflector, reflector_from};

/// Keeps whatever the backend needs alive (temp dir, etcd process) for the test's duration.
type Guard = Box<dyn std::any::Any + Send>;

async fn embedded() -> (ResourceStore, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let kv = trellis_store::embedded::EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    (ResourceStore::new(Arc::new(kv)), Box::new(dir))
}

async fn etcd() -> (ResourceStore, Guard) {
    let server = EtcdServer::start().expect("a real etcd (run scripts/setup.sh)");
    let kv =
        trellis_store::etcd::EtcdStore::connect(std::slice::from_ref(&server.endpoint), "/trellis-test").await.unwrap();
    (ResourceStore::new(Arc::new(kv)), Box::new(server))
}

fn vs(ns: &str, name: &str, weight_v1: i64) -> (ResourceKey, Resource) {
    let res: Resource = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"hosts": [name], "http": [{"route": [
            {"destination": {"host": name, "subset": "v1"}, "weight": weight_v1},
            {"destination": {"host": name, "subset": "v2"}, "weight": 100 - weight_v1}]}]}
    }))
    .unwrap();
    (ResourceKey::new(Kind::VirtualService, ns, name), res)
}

fn rv(r: &Resource) -> i64 {
    r.metadata.resource_version.as_deref().unwrap().parse().unwrap()
}

/// Waits for the next stream item, failing the test after 10 s.
async fn next<S: futures::Stream + Unpin>(s: &mut S) -> S::Item {
    tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("no event within 10 s").expect("stream ended")
}

async fn create_get_list_and_server_metadata(s: ResourceStore) {
    let (k1, r1) = vs("bookinfo", "reviews", 90);
    let (k2, r2) = vs("bookinfo", "ratings", 100);
    let (k3, r3) = vs("other", "reviews", 50);
    let c1 = s.create(&k1, &r1).await.unwrap();
    s.create(&k2, &r2).await.unwrap();
    s.create(&k3, &r3).await.unwrap();
    assert_eq!(c1.metadata.generation, Some(1));
    assert!(c1.metadata.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(c1.metadata.creation_timestamp.is_some());
    let got = s.get(&k1).await.unwrap().unwrap();
    assert_eq!(got, c1);
    assert_eq!(got.spec, r1.spec);
    let (in_ns, rev) = s.list(Some(Kind::VirtualService), Some("bookinfo")).await.unwrap();
    assert_eq!(in_ns.iter().map(|r| r.metadata.name.as_str()).collect::<Vec<_>>(), vec!["ratings", "reviews"]);
    assert!(rev >= rv(&c1));
    let (all, _) = s.list(Some(Kind::VirtualService), None).await.unwrap();
    assert_eq!(all.len(), 3);
    let (none, _) = s.list(Some(Kind::DestinationRule), None).await.unwrap();
    assert!(none.is_empty());
    assert!(s.get(&ResourceKey::new(Kind::VirtualService, "bookinfo", "nope")).await.unwrap().is_none());
    assert!(matches!(s.create(&k1, &r1).await, Err(Error::AlreadyExists { .. })));
}

async fn update_is_compare_and_swap_on_resource_version(s: ResourceStore) {
    let (k, r) = vs("ns", "a", 90);
    let created = s.create(&k, &r).await.unwrap();
    let (_, mut changed) = vs("ns", "a", 50);
    changed.metadata.resource_version = created.metadata.resource_version.clone();
    let updated = s.update(&k, &changed).await.unwrap();
    assert!(rv(&updated) > rv(&created));
    assert_eq!(updated.metadata.generation, Some(2));
    assert_eq!(updated.metadata.uid, created.metadata.uid);
    assert_eq!(updated.metadata.creation_timestamp, created.metadata.creation_timestamp);
    // The same stale resourceVersion again: refused, nothing changes.
    match s.update(&k, &changed).await {
        Err(Error::Conflict { expected, current, .. }) => {
            assert_eq!(expected, rv(&created));
            assert_eq!(current, rv(&updated));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(s.get(&k).await.unwrap().unwrap(), updated);
    // A label-only change keeps the generation.
    let mut relabelled = updated.clone();
    relabelled.metadata.labels.insert("team".into(), "x".into());
    let relabelled = s.update(&k, &relabelled).await.unwrap();
    assert_eq!(relabelled.metadata.generation, Some(2));
    // Without a resourceVersion the update is unconditional.
    let (_, mut blind) = vs("ns", "a", 10);
    blind.metadata.resource_version = None;
    assert_eq!(s.update(&k, &blind).await.unwrap().metadata.generation, Some(3));
    let missing = ResourceKey::new(Kind::VirtualService, "ns", "missing");
    assert!(matches!(s.update(&missing, &blind).await, Err(Error::NotFound { .. })));
}

async fn delete_is_conditional_and_returns_the_object(s: ResourceStore) {
    let (k, r) = vs("ns", "gone", 90);
    let created = s.create(&k, &r).await.unwrap();
    let (_, mut changed) = vs("ns", "gone", 50);
    changed.metadata.resource_version = created.metadata.resource_version.clone();
    s.update(&k, &changed).await.unwrap();
    assert!(matches!(s.delete(&k, Some(rv(&created))).await, Err(Error::Conflict { .. })));
    let deleted = s.delete(&k, None).await.unwrap();
    assert_eq!(deleted.spec, changed.spec);
    assert!(s.get(&k).await.unwrap().is_none());
    assert!(matches!(s.delete(&k, None).await, Err(Error::NotFound { .. })));
    // The name can be reused, with a new uid.
    let again = s.create(&k, &r).await.unwrap();
    assert_ne!(again.metadata.uid, created.metadata.uid);
}

async fn watch_replays_history_then_follows_live_changes(s: ResourceStore) {
    let (ka, ra) = vs("ns", "a", 90);
    let (kb, rb) = vs("ns", "b", 90);
    let a = s.create(&ka, &ra).await.unwrap();
    let b = s.create(&kb, &rb).await.unwrap();
    let mut w = Box::pin(s.watch(Some(Kind::VirtualService), Some("ns"), rv(&a)).await.unwrap());
    let first = next(&mut w).await.unwrap();
    assert_eq!(
        (first.event_type, first.revision, first.object.metadata.name.as_str()),
        (EventType::Added, rv(&b), "b")
    );
    let (_, mut changed) = vs("ns", "a", 40);
    changed.metadata.resource_version = a.metadata.resource_version.clone();
    let modified = s.update(&ka, &changed).await.unwrap();
    let ev = next(&mut w).await.unwrap();
    assert_eq!((ev.event_type, ev.revision), (EventType::Modified, rv(&modified)));
    assert_eq!(ev.object.spec, changed.spec);
    // Writes elsewhere are not seen by this watch.
    let (kother, rother) = vs("elsewhere", "c", 90);
    s.create(&kother, &rother).await.unwrap();
    let deleted = s.delete(&kb, None).await.unwrap();
    let ev = next(&mut w).await.unwrap();
    assert_eq!((ev.event_type, ev.revision), (EventType::Deleted, rv(&deleted)));
    assert_eq!(ev.object.metadata.name, "b");
    assert_eq!(ev.object.spec, rb.spec, "a delete event carries the last state");
}

/// Concurrent writers; a watcher that disconnects twice and resumes from the last revision it
/// saw must see every write exactly once, in order.
async fn watch_resumed_from_last_revision_loses_and_repeats_nothing(s: ResourceStore) {
    let start = s.current_revision().await.unwrap();
    const WRITERS: usize = 4;
    const EACH: usize = 25;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..EACH {
                let (k, r) = vs("load", &format!("w{w}-{i}"), 90);
                revs.push(rv(&s.create(&k, &r).await.unwrap()));
            }
            revs
        }));
    }
    let mut seen = Vec::new();
    let mut after = start;
    let mut reconnects = 0;
    while seen.len() < WRITERS * EACH {
        let mut w = Box::pin(s.watch(Some(Kind::VirtualService), Some("load"), after).await.unwrap());
        // Take a few events, then drop the stream as a broken connection would.
        for _ in 0..30 {
            if seen.len() == WRITERS * EACH {
                break;
            }
            let ev = next(&mut w).await.unwrap();
            after = ev.revision;
            seen.push(ev.revision);
        }
        reconnects += 1;
    }
    let mut written = BTreeSet::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    assert!(reconnects >= 3);
    assert!(seen.windows(2).all(|p| p[0] < p[1]), "revisions out of order or repeated: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), written);
}

async fn concurrent_compare_and_swap_writers_lose_no_update(s: ResourceStore) {
    let (k, r) = vs("cas", "counter", 100);
    s.create(&k, &r).await.unwrap();
    const WRITERS: usize = 4;
    const EACH: usize = 10;
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let s = s.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..EACH {
                loop {
                    let mut cur = s.get(&k).await.unwrap().unwrap();
                    let n: u64 = cur.metadata.annotations.get("count").map(|c| c.parse().unwrap()).unwrap_or(0);
                    cur.metadata.annotations.insert("count".into(), (n + 1).to_string());
                    match s.update(&k, &cur).await {
                        Ok(_) => break,
                        Err(Error::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = s.get(&k).await.unwrap().unwrap();
    assert_eq!(end.metadata.annotations["count"], (WRITERS * EACH).to_string());
}

async fn compacted_revision_is_an_error_and_the_reflector_relists(s: ResourceStore) {
    let (ka, ra) = vs("cmp", "a", 90);
    let a = s.create(&ka, &ra).await.unwrap();
    let mut refl = Box::pin(reflector(s.clone(), Some(Kind::VirtualService), Some("cmp".into())));
    match next(&mut refl).await {
        ReflectorEvent::Synced { items, .. } => assert_eq!(items.len(), 1),
        other => panic!("expected a snapshot first, got {other:?}"),
    }
    let (kb, rb) = vs("cmp", "b", 90);
    let b = s.create(&kb, &rb).await.unwrap();
    match next(&mut refl).await {
        ReflectorEvent::Changed(ev) => assert_eq!(ev.revision, rv(&b)),
        other => panic!("expected b's creation, got {other:?}"),
    }
    let (kc, rc) = vs("cmp", "c", 90);
    let c = s.create(&kc, &rc).await.unwrap();
    s.kv().compact(rv(&c)).await.unwrap();
    match s.watch(Some(Kind::VirtualService), Some("cmp"), rv(&a)).await {
        Err(Error::Compacted { .. }) => {}
        Ok(mut w) => {
            // etcd reports compaction on the stream rather than on creation.
            let mut w = Box::pin(&mut w);
            match next(&mut w).await {
                Err(Error::Compacted { .. }) => {}
                other => panic!("expected Compacted, got {other:?}"),
            }
        }
        Err(e) => panic!("expected Compacted, got {e}"),
    }
    // A reflector resuming from the compacted revision relists: a snapshot with everything.
    let mut resumed = Box::pin(reflector_from(s.clone(), Some(Kind::VirtualService), Some("cmp".into()), Some(rv(&a))));
    match next(&mut resumed).await {
        ReflectorEvent::Synced { items, revision } => {
            assert_eq!(items.iter().map(|i| i.metadata.name.as_str()).collect::<Vec<_>>(), vec!["a", "b", "c"]);
            assert!(revision >= rv(&c));
        }
        other => panic!("expected a relist after compaction, got {other:?}"),
    }
    // The live reflector keeps working after compaction.
    let (kd, rd) = vs("cmp", "d", 90);
    let d = s.create(&kd, &rd).await.unwrap();
    let mut saw_d = false;
    while !saw_d {
        match next(&mut refl).await {
            ReflectorEvent::Changed(ev) => saw_d = ev.revision == rv(&d),
            ReflectorEvent::Synced { items, .. } => saw_d = items.iter().any(|i| i.metadata.name == "d"),
            ReflectorEvent::Retrying { error } => panic!("reflector failed: {error}"),
        }
    }
}

async fn values_over_the_size_limit_are_refused(s: ResourceStore) {
    let (k, mut r) = vs("big", "a", 90);
    r.metadata.annotations.insert("blob".into(), "x".repeat(trellis_store::MAX_VALUE_BYTES + 1));
    assert!(matches!(s.create(&k, &r).await, Err(Error::Invalid(_))));
    assert!(s.get(&k).await.unwrap().is_none());
}

async fn wasm_modules_are_chunked_whole_and_invisible_to_resource_lists(s: ResourceStore) {
    use sha2::Digest;
    // 700 KiB of varied bytes: three chunks.
    let bytes: Vec<u8> = (0..700 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let sha: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let (k, r) = vs("bookinfo", "reviews", 90);
    s.create(&k, &r).await.unwrap();
    let (_, before) = s.list(None, None).await.unwrap();
    let mut w = Box::pin(s.watch(None, None, before).await.unwrap());
    assert!(s.put_module(&sha, &bytes).await.unwrap(), "new");
    assert!(!s.put_module(&sha, &bytes).await.unwrap(), "stored already");
    assert_eq!(s.get_module(&sha).await.unwrap().as_deref(), Some(bytes.as_slice()));
    assert_eq!(s.get_module(&"0".repeat(64)).await.unwrap(), None);
    assert_eq!(s.list_modules().await.unwrap(), vec![(sha.clone(), bytes.len() as u64)]);
    // Lists and watches of every kind see resources only.
    let (all, _) = s.list(None, None).await.unwrap();
    assert_eq!(all.len(), 1);
    let (k2, r2) = vs("bookinfo", "ratings", 100);
    s.create(&k2, &r2).await.unwrap();
    let ev = next(&mut w).await.unwrap();
    assert_eq!(ev.object.metadata.name, "ratings", "the watch skipped the module's keys");
}

macro_rules! conformance {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let (store, _guard) = super::$backend().await;
                    super::$test(store).await;
                }
            )*
        }
    };
}

macro_rules! all_backends {
    ($($test:ident),* $(,)?) => {
        conformance!(embedded: $($test),*);
        conformance!(etcd: $($test),*);
    };
}

all_backends!(
    create_get_list_and_server_metadata,
    update_is_compare_and_swap_on_resource_version,
    delete_is_conditional_and_returns_the_object,
    watch_replays_history_then_follows_live_changes,
    watch_resumed_from_last_revision_loses_and_repeats_nothing,
    concurrent_compare_and_swap_writers_lose_no_update,
    compacted_revision_is_an_error_and_the_reflector_relists,
    values_over_the_size_limit_are_refused,
    wasm_modules_are_chunked_whole_and_invisible_to_resource_lists,
);

#[tokio::test]
async fn embedded_store_keeps_everything_across_reopen_and_refuses_a_second_opener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let rev = {
        let kv = trellis_store::embedded::EmbeddedStore::open(&path).unwrap();
        assert!(
            matches!(trellis_store::embedded::EmbeddedStore::open(&path), Err(Error::Unavailable(m)) if m.contains("already open"))
        );
        let s = ResourceStore::new(Arc::new(kv));
        let (k, r) = vs("ns", "kept", 90);
        rv(&s.create(&k, &r).await.unwrap())
    };
    let s = ResourceStore::new(Arc::new(trellis_store::embedded::EmbeddedStore::open(&path).unwrap()));
    let kept = s.get(&ResourceKey::new(Kind::VirtualService, "ns", "kept")).await.unwrap().unwrap();
    assert_eq!(rv(&kept), rev);
    assert_eq!(s.current_revision().await.unwrap(), rev);
    let (k, r) = vs("ns", "next", 90);
    assert_eq!(rv(&s.create(&k, &r).await.unwrap()), rev + 1, "revisions continue after reopen");
}

#[tokio::test]
async fn etcd_prefixes_isolate_meshes_and_two_clients_see_each_others_writes() {
    let server = EtcdServer::start().expect("a real etcd (run scripts/setup.sh)");
    let endpoints = vec![server.endpoint.clone()];
    let one =
        ResourceStore::new(Arc::new(trellis_store::etcd::EtcdStore::connect(&endpoints, "/mesh-one").await.unwrap()));
    let one_again =
        ResourceStore::new(Arc::new(trellis_store::etcd::EtcdStore::connect(&endpoints, "/mesh-one").await.unwrap()));
    let two =
        ResourceStore::new(Arc::new(trellis_store::etcd::EtcdStore::connect(&endpoints, "/mesh-two").await.unwrap()));
    let start = one_again.current_revision().await.unwrap();
    let mut w = Box::pin(one_again.watch(None, None, start).await.unwrap());
    let (k, r) = vs("ns", "shared", 90);
    let created = one.create(&k, &r).await.unwrap();
    let ev = next(&mut w).await.unwrap();
    assert_eq!((ev.event_type, ev.revision), (EventType::Added, rv(&created)));
    assert!(two.get(&k).await.unwrap().is_none());
    assert!(two.list(None, None).await.unwrap().0.is_empty());
}

#[tokio::test]
async fn etcd_connection_failure_says_where_it_tried() {
    let port = trellis_store::testing::free_port();
    let err = trellis_store::etcd::EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], "/x").await.unwrap_err();
    assert!(matches!(&err, Error::Unavailable(m) if m.contains(&format!("127.0.0.1:{port}"))), "{err}");
}

/// Power loss, not just kill -9: concurrent writers, then a crash that keeps only what was
/// fsynced. Every write whose create() returned must be in the recovered store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_loses_no_acknowledged_write_on_power_loss() {
    use trellis_store::testing::PowerLossDisk;
    let disk = PowerLossDisk::new();
    let kv = trellis_store::embedded::EmbeddedStore::open_with_backend(disk.clone(), "power-loss-disk").unwrap();
    let s = ResourceStore::new(Arc::new(kv));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let s = s.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..40 {
                let (k, r) = vs("power", &format!("w{w}-{i}"), 90);
                s.create(&k, &r).await.unwrap();
                acked.lock().unwrap().push(k);
            }
        }));
    }
    // Crash while the writers are running: read the acknowledged set first, then cut power.
    tokio::time::timeout(Duration::from_secs(30), async {
        while acked.lock().unwrap().len() < 60 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("60 acknowledged writes within 30 s");
    let acked_before_crash = acked.lock().unwrap().clone();
    let after_crash = disk.crash();
    for w in writers {
        w.await.unwrap();
    }
    assert!(disk.syncs() >= 160, "every acknowledged write must be fsynced ({} syncs for 160 writes)", disk.syncs());
    drop(s);
    let recovered = ResourceStore::new(Arc::new(
        trellis_store::embedded::EmbeddedStore::open_with_backend(after_crash, "recovered").unwrap(),
    ));
    for k in &acked_before_crash {
        assert!(
            recovered.get(k).await.unwrap().is_some(),
            "{k} was acknowledged before the crash but is gone after it"
        );
    }
    let (items, _) = recovered.list(Some(Kind::VirtualService), Some("power")).await.unwrap();
    assert!(items.len() >= acked_before_crash.len());
}
