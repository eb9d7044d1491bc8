//! The control plane drives a real Envoy over ADS — state of the world and delta — configured
//! only through the Trellis API. Each scenario is written once and run for every proxy under
//! test (Envoy SotW, Envoy Delta; trellis-proxy joins when it exists).

#![allow(clippy::print_stdout)] // scenarios print what they measured

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_e2e::ControlPlane;
use trellis_e2e::echo::Echo;
use trellis_e2e::envoy::{AdsApi, Envoy};
use trellis_e2e::http::ProxyClient;
use trellis_model::{Kind, Resource};

const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local:9080";

fn reviews_config(v1: u16, v2: u16, weights: (i64, i64)) -> Vec<Value> {
    vec![
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "reviews", "namespace": "bookinfo"},
            "spec": {"hosts": ["reviews.bookinfo.svc.cluster.local"], "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
                     "location": "MESH_INTERNAL", "resolution": "STATIC", "workloadSelector": {"labels": {"app": "reviews"}}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "reviews-v1", "namespace": "bookinfo"},
            "spec": {"address": "127.0.0.1", "ports": {"http": v1}, "labels": {"app": "reviews", "version": "v1"}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "reviews-v2", "namespace": "bookinfo"},
            "spec": {"address": "127.0.0.1", "ports": {"http": v2}, "labels": {"app": "reviews", "version": "v2"}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "bookinfo"},
            "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
        canary(weights),
    ]
}

fn canary((w1, w2): (i64, i64)) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews", "namespace": "bookinfo"},
        "spec": {"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": w1},
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": w2}]}]}})
}

/// A control plane, two echo upstreams and a proxy under test, wired by config.
struct Mesh {
    cp: ControlPlane,
    api: trellis_client::Client,
    proxy: Envoy,
    client: ProxyClient,
    v1: Echo,
    v2: Echo,
    _dir: tempfile::TempDir,
}

async fn mesh(api_kind: AdsApi) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &["--push-debounce-ms", "50"]).unwrap();
    let api = cp.client().unwrap();
    let v1 = Echo::start("v1").await.unwrap();
    let v2 = Echo::start("v2").await.unwrap();
    api.apply(reviews_config(v1.port(), v2.port(), (90, 10)), None, false).await.unwrap();
    let proxy = Envoy::start(&cp.xds_addr, api_kind, "client", "default").unwrap();
    let client = ProxyClient::new(&proxy.outbound);
    // Wait until the route works end to end.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = client.get(REVIEWS, "/", &[]).await
            && a.status == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy never routed to reviews:\n{}\ncontrol plane:\n{}",
            proxy.log_text(),
            cp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Mesh { cp, api, proxy, client, v1, v2, _dir: dir }
}

/// Sends `n` requests over `conc` connections; returns (v1 answers, v2 answers, failures).
async fn split(client: &ProxyClient, n: usize, conc: usize) -> (usize, usize, usize) {
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut a, mut b, mut f) = (0, 0, 0);
            for _ in 0..n / conc {
                match c.get(REVIEWS, "/", &[]).await {
                    Ok(r) if r.status == 200 && r.body == "v1" => a += 1,
                    Ok(r) if r.status == 200 && r.body == "v2" => b += 1,
                    _ => f += 1,
                }
            }
            (a, b, f)
        }));
    }
    let mut total = (0, 0, 0);
    for t in tasks {
        let (a, b, f) = t.await.unwrap();
        total = (total.0 + a, total.1 + b, total.2 + f);
    }
    total
}

async fn syncz(cp: &ControlPlane) -> Value {
    let c = ProxyClient::new(&cp.debug_addr);
    let a = c.get(&cp.debug_addr, "/debug/syncz", &[]).await.unwrap();
    serde_json::from_str(&a.body).unwrap()
}

fn rds<'a>(status: &'a Value, node: &str) -> Option<&'a Value> {
    status["proxies"].as_array()?.iter().find(|p| p["id"] == node).map(|p| &p["types"]["RDS"])
}

async fn canary_split_follows_the_api(api_kind: AdsApi) {
    let m = mesh(api_kind).await;
    let (v1, v2, failed) = split(&m.client, 2000, 8).await;
    assert_eq!(failed, 0);
    let share = v2 as f64 * 100.0 / (v1 + v2) as f64;
    println!("{api_kind:?}: 90/10 canary over 2000 requests: v2 got {share:.1}%");
    assert!((7.0..=13.0).contains(&share), "v2 share {share:.1}% is not 10±3");

    // Change to 50/50 under load; Envoy follows within a second, no request fails.
    let before = rds(&syncz(&m.cp).await, &m.proxy.node_id).cloned().expect("proxy in syncz");
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let load = {
        let (c, stop, failures) = (m.client.clone(), stop.clone(), failures.clone());
        tokio::spawn(async move {
            // Bounded: at most 20,000 requests or until told to stop.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get(REVIEWS, "/", &[]).await {
                    Ok(r) if r.status == 200 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let mut vs: Resource = serde_json::from_value(canary((50, 50))).unwrap();
    let current = m.api.get(Kind::VirtualService, Some("bookinfo"), "reviews").await.unwrap().unwrap();
    vs.metadata.resource_version = current.metadata.resource_version;
    let written = Instant::now();
    m.api.replace(&vs).await.unwrap();
    let deadline = written + Duration::from_secs(1);
    let followed = loop {
        let s = syncz(&m.cp).await;
        let now = rds(&s, &m.proxy.node_id).cloned().unwrap_or_default();
        if now["state"] == "SYNCED" && now["acked"] != before["acked"] {
            break written.elapsed();
        }
        assert!(Instant::now() < deadline, "Envoy had not acknowledged the new routes 1 s after the write: {now}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!("{api_kind:?}: API write → Envoy ACK of the new routes in {followed:?}");
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed during the switch");
    // 4,000 requests: ±3 points is then 3.8 standard deviations of a fair split.
    let (v1, v2, failed) = split(&m.client, 4000, 8).await;
    assert_eq!(failed, 0);
    let share = v2 as f64 * 100.0 / (v1 + v2) as f64;
    println!("{api_kind:?}: 50/50 over 4000 requests: v2 got {share:.1}%");
    assert!((47.0..=53.0).contains(&share), "v2 share {share:.1}% is not 50±3");
    assert!(m.v1.requests() > 0 && m.v2.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_follows_the_api_over_sotw() {
    canary_split_follows_the_api(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_follows_the_api_over_delta() {
    canary_split_follows_the_api(AdsApi::Delta).await;
}
