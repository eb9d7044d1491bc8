//! Store benchmark: put / get / list / watch-delivery latency and throughput with 10,000
//! resources, on both backends (the embedded store on local disk, and a real etcd 3.5 started
//! on loopback). Prints a table.
//!
//!     cargo run --release -p trellis-store --example store_bench [-- N]

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use trellis_model::{Kind, Resource, ResourceKey};
use trellis_store::ResourceStore;

fn resource(i: usize) -> (ResourceKey, Resource) {
    let ns = format!("ns-{}", i % 50);
    let name = format!("svc-{i}");
    let res: Resource = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name, "team": "bench"}},
        "spec": {"hosts": [name], "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": name, "subset": "v2"}}]},
            {"route": [{"destination": {"host": name, "subset": "v1"}, "weight": 90}, {"destination": {"host": name, "subset": "v2"}, "weight": 10}],
             "timeout": "10s", "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,connect-failure"}}]}
    }))
    .expect("valid resource");
    (ResourceKey::new(Kind::VirtualService, ns, name), res)
}

struct Stats {
    samples: Vec<Duration>,
    wall: Duration,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort();
        if s.is_empty() {
            return 0.0;
        }
        let idx = ((s.len() as f64 - 1.0) * p).round() as usize;
        s[idx].as_secs_f64() * 1e3
    }

    fn row(&self, backend: &str, op: &str) {
        let rate = self.samples.len() as f64 / self.wall.as_secs_f64();
        println!(
            "| {backend:<8} | {op:<28} | {:>6} | {:>8.3} | {:>8.3} | {:>8.3} | {:>10.0} |",
            self.samples.len(),
            self.pct(0.5),
            self.pct(0.99),
            self.pct(1.0),
            rate
        );
    }
}

async fn bench(backend: &str, store: ResourceStore, n: usize) {
    // Sequential creates, with a watcher measuring write-to-event delivery.
    let start_rev = store.current_revision().await.expect("revision");
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut watch = Box::pin(store.watch(Some(Kind::VirtualService), None, start_rev).await.expect("watch"));
    let sent_w = sent.clone();
    let watcher = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            match tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
                Ok(Some(Ok(ev))) => {
                    let now = Instant::now();
                    if let Some(t) = sent_w.lock().expect("lock").remove(&ev.object.metadata.name) {
                        lat.push(now - t);
                    }
                }
                other => panic!("watch failed: {other:?}"),
            }
        }
        lat
    });
    let mut put = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let (k, r) = resource(i);
        let t = Instant::now();
        sent.lock().expect("lock").insert(k.name.clone(), t);
        store.create(&k, &r).await.expect("create");
        put.push(t.elapsed());
    }
    let put = Stats { samples: put, wall: t0.elapsed() };
    let watch_wall = t0.elapsed();
    let watch_lat = watcher.await.expect("watcher");
    let watch = Stats { samples: watch_lat, wall: watch_wall };

    // Concurrent updates: 16 writers.
    let writers = 16;
    let per = n / writers;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in (w * per)..((w + 1) * per) {
                let (k, mut r) = resource(i);
                r.metadata.labels.insert("rev".into(), "2".into());
                let t = Instant::now();
                store.update(&k, &r).await.expect("update");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut upd = Vec::new();
    for t in tasks {
        upd.extend(t.await.expect("writer"));
    }
    let update = Stats { samples: upd, wall: t0.elapsed() };

    // Random gets.
    let mut get = Vec::with_capacity(n);
    let t0 = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (k, _) = resource((x % n as u64) as usize);
        let t = Instant::now();
        store.get(&k).await.expect("get").expect("present");
        get.push(t.elapsed());
    }
    let get = Stats { samples: get, wall: t0.elapsed() };

    // Full list, 5 times.
    let mut list = Vec::new();
    let t0 = Instant::now();
    for _ in 0..5 {
        let t = Instant::now();
        let (items, _) = store.list(Some(Kind::VirtualService), None).await.expect("list");
        assert_eq!(items.len(), n);
        list.push(t.elapsed());
    }
    let list = Stats { samples: list, wall: t0.elapsed() };

    put.row(backend, "create (sequential)");
    update.row(backend, "update (16 concurrent)");
    get.row(backend, "get (random key)");
    list.row(backend, &format!("list all {n}"));
    watch.row(backend, "watch delivery (write→event)");
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    println!("Trellis store benchmark: {n} VirtualServices (~700 B each), 2-core machine, release build");
    println!("latencies in ms; ops/s = operations / wall time of the phase\n");
    println!("| backend  | operation                    |      n |      p50 |      p99 |      max |      ops/s |");
    println!("|----------|------------------------------|--------|----------|----------|----------|------------|");

    let dir = tempfile::tempdir().expect("tempdir");
    let kv = trellis_store::embedded::EmbeddedStore::open(&dir.path().join("bench.redb")).expect("open");
    bench("embedded", ResourceStore::new(Arc::new(kv)), n).await;

    let etcd = trellis_store::testing::EtcdServer::start().expect("etcd (run scripts/setup.sh)");
    let kv =
        trellis_store::etcd::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "/bench").await.expect("connect");
    bench("etcd", ResourceStore::new(Arc::new(kv)), n).await;
}
