//! The shared scenario suite: the control plane drives a proxy configured only through the
//! Trellis API. Each scenario is written once and runs for every proxy under test: a real
//! Envoy over state-of-the-world ADS (`sotw::`), over delta ADS (`delta::`), and trellis-proxy
//! (`trellis::`; scenarios whose behaviour lives in a wasm module not written yet are marked
//! pending for it).

#![allow(clippy::print_stdout)] // scenarios print what they measured

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_e2e::ControlPlane;
use trellis_e2e::echo::{Echo, TcpEcho, tcp_exchange};
use trellis_e2e::envoy::AdsApi;
use trellis_e2e::http::ProxyClient;
use trellis_e2e::proxies::{NodeSpec, Sidecar, Under};
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
    proxy: Sidecar,
    client: ProxyClient,
    v1: Echo,
    v2: Echo,
    _dir: tempfile::TempDir,
}

/// Starts the mesh: the reviews service with endpoints v1 and v2 and `extra` config (which
/// may replace the canary VirtualService), then waits until `host` answers through the proxy.
async fn mesh_with(under: Under, extra: impl FnOnce(&Echo, &Echo) -> Vec<Value>) -> Mesh {
    mesh_in(under, "", extra).await
}

/// As [`mesh_with`], with the proxy in `locality`.
async fn mesh_in(under: Under, locality: &str, extra: impl FnOnce(&Echo, &Echo) -> Vec<Value>) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &["--push-debounce-ms", "50"]).unwrap();
    let api = cp.client().unwrap();
    let v1 = Echo::start("v1").await.unwrap();
    let v2 = Echo::start("v2").await.unwrap();
    let mut config = reviews_config(v1.port(), v2.port(), (90, 10));
    for item in extra(&v1, &v2) {
        config.retain(|c| c["kind"] != item["kind"] || c["metadata"]["name"] != item["metadata"]["name"]);
        config.push(item);
    }
    api.apply(config, None, false).await.unwrap();
    let proxy = Sidecar::start(under, &cp.xds_addr, "client", "default", locality).unwrap();
    let client = ProxyClient::new(proxy.outbound());
    // Wait until the proxy has routes for reviews (any answer from the route, not a 404 for
    // an unknown host).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = client.get(REVIEWS, "/", &[("x-probe", "1")]).await
            && a.status != 404
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
    // The proxy accepted everything it was sent.
    let status = syncz(&cp).await;
    let me = status["proxies"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == proxy.node_id()))
        .cloned()
        .expect("proxy in syncz");
    for (t, st) in me["types"].as_object().cloned().unwrap_or_default() {
        assert_ne!(st["state"], "NACK", "Envoy rejected {t}: {}", st["error"]);
    }
    Mesh { cp, api, proxy, client, v1, v2, _dir: dir }
}

async fn mesh(under: Under) -> Mesh {
    mesh_with(under, |_, _| Vec::new()).await
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

async fn canary_split_follows_the_api(under: Under) {
    let m = mesh(under).await;
    let (v1, v2, failed) = split(&m.client, 2000, 8).await;
    assert_eq!(failed, 0);
    let share = v2 as f64 * 100.0 / (v1 + v2) as f64;
    println!("{under:?}: 90/10 canary over 2000 requests: v2 got {share:.1}%");
    assert!((7.0..=13.0).contains(&share), "v2 share {share:.1}% is not 10±3");

    // Change to 50/50 under load; Envoy follows within a second, no request fails.
    let before = rds(&syncz(&m.cp).await, m.proxy.node_id()).cloned().expect("proxy in syncz");
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
        let now = rds(&s, m.proxy.node_id()).cloned().unwrap_or_default();
        if now["state"] == "SYNCED" && now["acked"] != before["acked"] {
            break written.elapsed();
        }
        assert!(Instant::now() < deadline, "the proxy had not acknowledged the new routes 1 s after the write: {now}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!("{under:?}: API write → proxy ACK of the new routes in {followed:?}");
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed during the switch");
    // 4,000 requests: ±3 points is then 3.8 standard deviations of a fair split.
    let (v1, v2, failed) = split(&m.client, 4000, 8).await;
    assert_eq!(failed, 0);
    let share = v2 as f64 * 100.0 / (v1 + v2) as f64;
    println!("{under:?}: 50/50 over 4000 requests: v2 got {share:.1}%");
    assert!((47.0..=53.0).contains(&share), "v2 share {share:.1}% is not 50±3");
    assert!(m.v1.requests() > 0 && m.v2.requests() > 0);
}

fn vs(http: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews", "namespace": "bookinfo"},
        "spec": {"hosts": ["reviews"], "http": http}})
}

fn to(subset: &str) -> Value {
    json!([{"destination": {"host": "reviews", "subset": subset}}])
}

async fn header_match_routes_to_v2(under: Under) {
    let m = mesh_with(under, |_, _| {
        vec![vs(
            json!([{"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": to("v2")}, {"route": to("v1")}]),
        )]
    })
    .await;
    for _ in 0..20 {
        assert_eq!(m.client.get(REVIEWS, "/", &[("end-user", "jason")]).await.unwrap().body, "v2");
        assert_eq!(m.client.get(REVIEWS, "/", &[("end-user", "someone")]).await.unwrap().body, "v1");
        assert_eq!(m.client.get(REVIEWS, "/", &[]).await.unwrap().body, "v1");
    }
}

async fn fault_abort_and_delay(under: Under) {
    let m = mesh_with(under, |_, _| {
        vec![vs(json!([
            {"match": [{"uri": {"prefix": "/abort"}}], "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}}, "route": to("v1")},
            {"match": [{"uri": {"prefix": "/delay"}}], "fault": {"delay": {"fixedDelay": "500ms", "percentage": {"value": 100}}}, "route": to("v1")},
            {"route": to("v1")}]))]
    })
    .await;
    let before = m.v1.requests();
    for _ in 0..10 {
        assert_eq!(m.client.get(REVIEWS, "/abort", &[]).await.unwrap().status, 418);
    }
    assert_eq!(m.v1.requests(), before, "aborted requests never reach the upstream");
    let t = Instant::now();
    let a = m.client.get(REVIEWS, "/delay", &[]).await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "v1"));
    // Envoy's timers are coarse (a few ms early is normal): 500 ms delay, ≥ 450 ms observed.
    assert!(t.elapsed() >= Duration::from_millis(450), "delayed only {:?}", t.elapsed());
    let t = Instant::now();
    m.client.get(REVIEWS, "/", &[]).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(450), "an undelayed route took {:?}", t.elapsed());
}

async fn route_timeout_returns_504(under: Under) {
    let m =
        mesh_with(under, |_, _| vec![vs(json!([{"route": to("v1"), "timeout": "200ms", "retries": {"attempts": 0}}]))])
            .await;
    m.v1.delay_ms.store(2000, Ordering::SeqCst);
    let t = Instant::now();
    let a = m.client.get(REVIEWS, "/", &[]).await.unwrap();
    assert_eq!(a.status, 504, "{a:?}");
    assert!(t.elapsed() < Duration::from_millis(1500), "the timeout did not cut the request: {:?}", t.elapsed());
}

async fn retries_on_503_reach_a_healthy_endpoint(under: Under) {
    // One subset with both endpoints; v2 always answers 503.
    let m = mesh_with(under, |_, _| {
        vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "bookinfo"},
                "spec": {"host": "reviews", "subsets": [{"name": "all", "labels": {"app": "reviews"}}, {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
            vs(json!([{"route": to("all"), "retries": {"attempts": 3, "retryOn": "503"}}])),
        ]
    })
    .await;
    m.v2.status.store(503, Ordering::SeqCst);
    for _ in 0..50 {
        let a = m.client.get(REVIEWS, "/", &[]).await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "v1"), "a retry should have reached v1");
    }
    assert!(m.v2.requests() > 0, "the unhealthy endpoint was tried");
}

async fn mirror_copies_requests_to_the_shadow(under: Under) {
    let m = mesh_with(under, |_, _| vec![vs(json!([{"route": to("v1"), "mirror": {"host": "reviews", "subset": "v2"}, "mirrorPercentage": {"value": 100.0}}]))]).await;
    let before = m.v2.requests();
    for _ in 0..10 {
        assert_eq!(m.client.get(REVIEWS, "/", &[]).await.unwrap().body, "v1");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.v2.requests() < before + 10 {
        assert!(Instant::now() < deadline, "the shadow got {} of 10 mirrored requests", m.v2.requests() - before);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hosts = m.v2.seen.hosts.lock().unwrap().clone();
    let last = hosts.last().cloned().unwrap_or_default();
    assert_eq!(last, "reviews.bookinfo.svc.cluster.local-shadow:9080", "{hosts:?}");
}

async fn circuit_breaker_sheds_overflow_with_503(under: Under) {
    let m = mesh_with(under, |_, _| {
        vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "bookinfo"},
                "spec": {"host": "reviews", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}}},
                         "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
            vs(json!([{"route": to("v1"), "retries": {"attempts": 0}}])),
        ]
    })
    .await;
    m.v1.delay_ms.store(200, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = m.client.clone();
        tasks.push(tokio::spawn(async move { c.get(REVIEWS, "/", &[]).await }));
    }
    let (mut ok, mut overflow) = (0, 0);
    for t in tasks {
        let a = t.await.unwrap().unwrap();
        match a.status {
            200 => ok += 1,
            503 => overflow += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 1 && overflow >= 1, "ok={ok} overflow={overflow}");
    // Envoy counts them as circuit-breaker overflows (response flag UO), not upstream errors.
    let stats = ProxyClient::new(m.proxy.admin())
        .get(m.proxy.admin(), "/stats?filter=v1%7Creviews.*overflow", &[])
        .await
        .unwrap()
        .body;
    let overflows: u64 = stats
        .lines()
        .filter(|l| l.contains("upstream_rq_pending_overflow") || l.contains("upstream_cx_overflow"))
        .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
        .sum();
    assert!(overflows >= overflow as u64, "Envoy counted {overflows} overflows for {overflow} 503s:\n{stats}");
    let max = m.v1.seen.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 1, "the upstream saw {max} requests at once, over the limit of 1");
}

async fn outlier_detection_ejects_a_failing_endpoint(under: Under) {
    let m = mesh_with(under, |_, _| {
        vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "bookinfo"},
                "spec": {"host": "reviews", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 2, "interval": "100ms", "baseEjectionTime": "30s", "maxEjectionPercent": 100}},
                         "subsets": [{"name": "all", "labels": {"app": "reviews"}}]}}),
            vs(json!([{"route": to("all"), "retries": {"attempts": 0}}])),
        ]
    })
    .await;
    m.v2.status.store(500, Ordering::SeqCst);
    // Bounded: at most 400 requests to see v2 ejected (no 500 in 50 requests in a row).
    let mut clean_run = 0;
    for _ in 0..400 {
        let a = m.client.get(REVIEWS, "/", &[]).await.unwrap();
        if a.status == 200 {
            clean_run += 1;
        } else {
            clean_run = 0;
        }
        if clean_run == 50 {
            break;
        }
    }
    assert_eq!(clean_run, 50, "the failing endpoint was not ejected");
    let v2_before = m.v2.requests();
    for _ in 0..50 {
        assert_eq!(m.client.get(REVIEWS, "/", &[]).await.unwrap().body, "v1");
    }
    assert_eq!(m.v2.requests(), v2_before, "an ejected endpoint got traffic");
}

async fn locality_failover_prefers_the_local_zone(under: Under) {
    // v1 runs in the proxy's zone, v2 in another region; with outlier detection the local
    // zone takes all traffic (priority 0) until it fails, then the other region does.
    let m = mesh_in(under, "us-east1/b/rack1", |v1, v2| {
        vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "reviews-v1", "namespace": "bookinfo"},
                "spec": {"address": "127.0.0.1", "ports": {"http": v1.port()}, "labels": {"app": "reviews", "version": "v1"}, "locality": "us-east1/b/rack1"}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "reviews-v2", "namespace": "bookinfo"},
                "spec": {"address": "127.0.0.1", "ports": {"http": v2.port()}, "labels": {"app": "reviews", "version": "v2"}, "locality": "europe-west4/a"}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "bookinfo"},
                "spec": {"host": "reviews", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1, "interval": "100ms", "baseEjectionTime": "30s", "maxEjectionPercent": 100}},
                         "subsets": [{"name": "all", "labels": {"app": "reviews"}}]}}),
            vs(json!([{"route": to("all"), "retries": {"attempts": 0}}])),
        ]
    })
    .await;
    let (v1, v2, failed) = split(&m.client, 200, 4).await;
    if (v1, v2, failed) != (200, 0, 0) {
        let clusters =
            ProxyClient::new(m.proxy.admin()).get(m.proxy.admin(), "/config_dump?include_eds", &[]).await.unwrap().body;
        let all: Vec<&str> = clusters.lines().filter(|l| l.contains("priority") || l.contains("region")).collect();
        panic!(
            "the local zone should take all traffic while healthy: v1={v1} v2={v2} failed={failed}\n{}",
            all.join("\n")
        );
    }
    m.v1.status.store(500, Ordering::SeqCst);
    // Bounded: at most 400 requests until 50 in a row are served by the other region.
    let mut remote_run = 0;
    for _ in 0..400 {
        let a = m.client.get(REVIEWS, "/", &[]).await.unwrap();
        remote_run = if (a.status, a.body.as_str()) == (200, "v2") { remote_run + 1 } else { 0 };
        if remote_run == 50 {
            break;
        }
    }
    assert_eq!(remote_run, 50, "traffic did not fail over to the other region");
}

async fn tcp_through_sidecar_port_listeners_is_weighted(under: Under) {
    // client sidecar (egress listener on the service's port) → db-v1's sidecar (ingress
    // listener → the app) or db-v2 directly, 75/25 by a VirtualService tcp route.
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &["--push-debounce-ms", "50"]).unwrap();
    let api = cp.client().unwrap();
    let (app1, app2) = (TcpEcho::start("v1").await.unwrap(), TcpEcho::start("v2").await.unwrap());
    let (port, ingress) = (trellis_e2e::free_port(), trellis_e2e::free_port());
    let config = vec![
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "db", "namespace": "bookinfo"},
            "spec": {"hosts": ["db.bookinfo.svc.cluster.local"], "ports": [{"number": port, "name": "tcp", "protocol": "TCP"}],
                     "location": "MESH_INTERNAL", "resolution": "STATIC", "workloadSelector": {"labels": {"app": "db"}}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "db-v1", "namespace": "bookinfo"},
            "spec": {"address": "127.0.0.1", "ports": {"tcp": ingress}, "labels": {"app": "db", "version": "v1"}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "db-v2", "namespace": "bookinfo"},
            "spec": {"address": "127.0.0.1", "ports": {"tcp": app2.port()}, "labels": {"app": "db", "version": "v2"}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "db", "namespace": "bookinfo"},
            "spec": {"host": "db", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "db", "namespace": "bookinfo"},
            "spec": {"hosts": ["db"], "tcp": [{"route": [
                {"destination": {"host": "db", "subset": "v1"}, "weight": 75},
                {"destination": {"host": "db", "subset": "v2"}, "weight": 25}]}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "db", "namespace": "bookinfo"},
            "spec": {"workloadSelector": {"labels": {"app": "db"}},
                     "ingress": [{"port": {"number": ingress, "protocol": "TCP", "name": "tcp"}, "bind": "127.0.0.1",
                                  "defaultEndpoint": format!("127.0.0.1:{}", app1.port())}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "default", "namespace": "default"},
            "spec": {"egress": [{"hosts": ["*/*"]},
                                {"port": {"number": port, "protocol": "TCP", "name": "tcp"}, "hosts": ["bookinfo/db.bookinfo.svc.cluster.local"]}]}}),
    ];
    api.apply(config, None, false).await.unwrap();
    let server = Sidecar::start(under, &cp.xds_addr, "db", "bookinfo", "").unwrap();
    let client = Sidecar::start(under, &cp.xds_addr, "client", "default", "").unwrap();
    let through = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Both listeners are up once each subset has answered once.
    let (mut seen1, mut seen2) = (false, false);
    while !(seen1 && seen2) {
        match tcp_exchange(&through, "ping").await {
            Ok(a) if a == "v1:ping\n" => seen1 = true,
            Ok(a) if a == "v2:ping\n" => seen2 = true,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no TCP path through the sidecars (v1 seen: {seen1}, v2 seen: {seen2}):\nclient:\n{}\nserver:\n{}",
            client.log_text(),
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut v1, mut v2, mut failed) = (0, 0, 0);
    for i in 0..400 {
        match tcp_exchange(&through, &format!("hello {i}")).await {
            Ok(a) if a == format!("v1:hello {i}\n") => v1 += 1,
            Ok(a) if a == format!("v2:hello {i}\n") => v2 += 1,
            _ => failed += 1,
        }
    }
    assert_eq!(failed, 0);
    let share = v2 as f64 * 100.0 / 400.0;
    println!("{under:?}: TCP 75/25 over 400 connections: v2 got {share:.1}%");
    // ±7 points is 3.2 standard deviations of a fair 25% split over 400 connections.
    assert!((18.0..=32.0).contains(&share), "v2 share {share:.1}% is not 25±7");
    assert!(app1.connections.load(Ordering::SeqCst) >= v1 as u64, "v1 is reached only through its sidecar");
}

async fn an_ingress_gateway_routes_by_host_and_path(under: Under) {
    // A router proxy selected by a Gateway serves the VirtualService bound to it; the mesh's
    // own routes (the 90/10 canary) do not apply there.
    let port = trellis_e2e::free_port();
    let m = mesh_with(under, |_, _| {
        vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "edge", "namespace": "bookinfo"},
                "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{"port": {"number": port, "name": "http", "protocol": "HTTP"}, "hosts": ["*/bookinfo.example.com"]}]}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "edge-routes", "namespace": "bookinfo"},
                "spec": {"hosts": ["bookinfo.example.com"], "gateways": ["edge"], "http": [
                    {"match": [{"uri": {"prefix": "/v2/"}}], "rewrite": {"uri": "/"}, "route": to("v2")},
                    {"route": to("v1")}]}}),
        ]
    })
    .await;
    let gw = Sidecar::start_node(
        under,
        &m.cp.xds_addr,
        &NodeSpec::gateway("ingressgateway", "bookinfo", &[("istio", "ingressgateway")], port),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let client = ProxyClient::new(&addr);
    let host = format!("bookinfo.example.com:{port}");
    for _ in 0..20 {
        assert_eq!(client.get(&host, "/", &[]).await.unwrap().body, "v1", "{}", gw.log_text());
        // /v2/headers reaches v2 as /headers (the prefix rewritten).
        let a = client.get(&host, "/v2/headers", &[]).await.unwrap();
        assert_eq!((a.status, a.headers.get("x-echo").map(|v| v.to_str().unwrap_or(""))), (200, Some("v2")));
        let seen: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(seen[":path"], "/headers");
        assert_eq!(client.get("other.example.com", "/", &[]).await.unwrap().status, 404);
    }
}

async fn route_actions_redirect_rewrite_and_edit_headers(under: Under) {
    let m = mesh_with(under, |_, _| {
        vec![vs(json!([
            {"match": [{"queryParams": {"canary": {"exact": "1"}}}], "route": to("v2")},
            {"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new", "authority": "new.example.com"}},
            {"match": [{"uri": {"regex": "/items/[0-9]+"}}],
             "rewrite": {"uriRegexRewrite": {"match": "/items/([0-9]+)", "rewrite": "/headers"}}, "route": to("v1")},
            {"match": [{"uri": {"prefix": "/headers"}}],
             "headers": {"request": {"set": {"x-added": "yes"}, "remove": ["x-secret"]}, "response": {"set": {"x-resp": "done"}}},
             "route": to("v1")},
            {"match": [{"uri": {"prefix": "/renamed"}}], "rewrite": {"uri": "/headers", "authority": "rewritten.example.com"},
             "route": to("v1")},
            {"route": to("v1")}]))]
    })
    .await;
    // The authority rewritten, and the prefix with the query kept.
    let a = m.client.get(REVIEWS, "/renamed?q=1", &[]).await.unwrap();
    let seen: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {a:?}"));
    assert_eq!((&seen["host"], &seen[":path"]), (&json!("rewritten.example.com"), &json!("/headers?q=1")), "{seen}");
    assert_eq!(m.client.get(REVIEWS, "/?canary=1", &[]).await.unwrap().body, "v2");
    assert_eq!(m.client.get(REVIEWS, "/?canary=0", &[]).await.unwrap().body, "v1");
    let a = m.client.get(REVIEWS, "/old/page", &[]).await.unwrap();
    assert_eq!(a.status, 301);
    assert_eq!(a.headers.get("location").and_then(|v| v.to_str().ok()), Some("http://new.example.com/new"));
    let a = m.client.get(REVIEWS, "/items/42", &[]).await.unwrap();
    let seen: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {a:?}"));
    assert_eq!(seen[":path"], "/headers", "regex rewrite");
    let a = m.client.get(REVIEWS, "/headers?a=b&c", &[("x-secret", "s3cret")]).await.unwrap();
    let seen: Value = serde_json::from_str(&a.body).unwrap();
    // Nothing rewritten: the path, query and Host as the client sent them.
    assert_eq!((&seen["host"], &seen[":path"]), (&json!(REVIEWS), &json!("/headers?a=b&c")), "{seen}");
    assert_eq!(seen["x-added"], "yes");
    assert!(seen.get("x-secret").is_none(), "{seen}");
    assert_eq!(a.headers.get("x-resp").and_then(|v| v.to_str().ok()), Some("done"));
}

async fn consistent_hashing_keeps_a_user_on_one_endpoint(under: Under) {
    let m = mesh_with(under, |_, _| {
        vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "bookinfo"},
                "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}},
                         "subsets": [{"name": "all", "labels": {"app": "reviews"}}]}}),
            vs(json!([{"route": to("all")}])),
        ]
    })
    .await;
    let mut seen_per_user = Vec::new();
    for user in 0..16 {
        let u = format!("user-{user}");
        let first = m.client.get(REVIEWS, "/", &[("x-user", &u)]).await.unwrap().body;
        for _ in 0..10 {
            assert_eq!(m.client.get(REVIEWS, "/", &[("x-user", &u)]).await.unwrap().body, first, "{u} moved");
        }
        seen_per_user.push(first);
    }
    // 16 users over 2 endpoints: both get some (all on one has probability 2^-15).
    assert!(
        seen_per_user.contains(&"v1".to_string()) && seen_per_user.contains(&"v2".to_string()),
        "{seen_per_user:?}"
    );
}

/// filters/hello, built once per test run.
fn hello_wasm() -> std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../filters/Cargo.toml");
        trellis_filter_testkit::build(manifest, "hello").expect("build filters/hello").canonicalize().unwrap()
    })
    .clone()
}

async fn a_wasm_plugin_runs_in_the_proxy(under: Under) {
    // The same module (built with the Trellis SDK over the upstream proxy-wasm crate) and the
    // same xDS: Envoy runs it in V8, trellis-proxy in wasmtime.
    let path = hello_wasm();
    let sha = trellis_wasm_host::sha256_hex(&std::fs::read(&path).unwrap());
    let m = mesh_with(under, |_, _| {
        vec![json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": "hello", "namespace": "default"},
            "spec": {"url": format!("file://{}", path.display()), "sha256": sha, "phase": "AUTHZ", "failStrategy": "FAIL_CLOSE",
                     "match": [{"mode": "CLIENT"}],
                     "pluginConfig": {"header": "x-hello", "value": "world", "denyPrefix": "/admin"}}})]
    })
    .await;
    // The control plane publishes resources as it indexes them: wait for the filter.
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = loop {
        let a = m.client.get(REVIEWS, "/headers", &[]).await.unwrap();
        if a.status == 200 && a.body.contains("x-hello") {
            break a;
        }
        assert!(Instant::now() < deadline, "the filter never ran: {a:?}\n{}", m.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(seen["x-hello"], "world", "the filter stamped the request: {seen}");
    assert_eq!(a.headers.get("x-hello-seen").and_then(|v| v.to_str().ok()), Some("200"), "{a:?}");
    let before = m.v1.requests() + m.v2.requests();
    let a = m.client.get(REVIEWS, "/admin/users", &[]).await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (403, "anonymous may not"));
    assert_eq!(a.headers.get("x-denied-by").and_then(|v| v.to_str().ok()), Some("hello"));
    assert_eq!(m.v1.requests() + m.v2.requests(), before, "a denied request reached the upstream");
}

fn filter_module(package: &str) -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../filters/Cargo.toml");
    trellis_filter_testkit::build(manifest, package)
        .unwrap_or_else(|e| panic!("build filters/{package}: {e}"))
        .canonicalize()
        .unwrap()
}

fn wasm_plugin(name: &str, package: &str, config: Value) -> Value {
    let path = filter_module(package);
    let sha = trellis_wasm_host::sha256_hex(&std::fs::read(&path).unwrap());
    json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": name, "namespace": "default"},
        "spec": {"url": format!("file://{}", path.display()), "sha256": sha, "phase": "AUTHZ", "failStrategy": "FAIL_CLOSE",
                 "match": [{"mode": "CLIENT"}], "pluginConfig": config}})
}

fn header<'a>(a: &'a trellis_e2e::http::Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).and_then(|v| v.to_str().ok())
}

async fn the_abi_probe_answers_the_same_in_both_hosts(under: Under) {
    // A module written with the upstream proxy-wasm crate (not the SDK): headers, bodies,
    // local replies, an http call to a mesh cluster, a gRPC call and a gRPC stream, shared
    // data, root ticks and a metric.
    // A gRPC server for /grpc: another control plane's xDS port (an unknown method answers
    // UNIMPLEMENTED, 12).
    let dir = tempfile::tempdir().unwrap();
    let grpc = ControlPlane::start(dir.path(), &[]).unwrap();
    let grpc_port: u16 = grpc.xds_addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let m = mesh_with(under, |_, _| {
        vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "grpc-server", "namespace": "default"},
                "spec": {"hosts": ["grpc.test"], "ports": [{"number": grpc_port, "name": "grpc", "protocol": "GRPC"}],
                         "location": "MESH_EXTERNAL", "resolution": "STATIC", "endpoints": [{"address": "127.0.0.1"}]}}),
            wasm_plugin("probe", "abi-probe", json!({"header": "x-probe-resp", "deny": "/deny",
                "callout": "outbound|9080|v2|reviews.bookinfo.svc.cluster.local", "calloutAuthority": REVIEWS,
                "grpcCluster": format!("outbound|{grpc_port}||grpc.test"), "tickMs": 20})),
        ]
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = loop {
        let a = m.client.get(REVIEWS, "/headers", &[("x-in", "a"), ("x-remove", "zap")]).await.unwrap();
        if a.status == 200 && a.body.contains("x-probe") {
            break a;
        }
        assert!(Instant::now() < deadline, "the filter never ran: {a:?}\n{}", m.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(seen["x-probe"], "seen:a", "{seen}");
    assert!(seen.get("x-remove").is_none(), "the filter removed x-remove: {seen}");
    assert_eq!(header(&a, "x-probe-resp"), Some("1"));
    let before = m.v1.requests() + m.v2.requests();
    let a = m.client.get(REVIEWS, "/deny", &[]).await.unwrap();
    assert_eq!((a.status, a.body.as_str(), header(&a, "x-denied-by")), (403, "denied", Some("probe")));
    assert_eq!(m.v1.requests() + m.v2.requests(), before, "a denied request reached the upstream");
    // The call goes to v2 (its /check answers "v2"); its answer reaches the response.
    let v2_before = m.v2.requests();
    let a = m.client.get(REVIEWS, "/callout", &[]).await.unwrap();
    assert_eq!((a.status, header(&a, "x-callout-resp")), (200, Some("200:v2")), "{a:?}");
    assert!(m.v2.requests() > v2_before, "the call reached the v2 cluster");
    // A unary gRPC call; its status reaches the response.
    let a = m.client.get(REVIEWS, "/grpc", &[]).await.unwrap();
    assert_eq!((a.status, header(&a, "x-grpc-status")), (200, Some("12")), "{a:?}");
    // A bidirectional gRPC stream (that control plane's ADS): the request goes out, the
    // initial metadata and the first message come back as they arrive, the filter half-closes,
    // the server's trailers and close follow.
    let a = m.client.get(REVIEWS, "/grpc-stream", &[]).await.unwrap();
    let want = "initial:application/grpc,message:true,trailing:0,close:0";
    assert_eq!((a.status, header(&a, "x-grpc-stream")), (200, Some(want)), "{a:?}");
    // Cancelled after the first message: nothing more, and a later send is refused.
    let a = m.client.get(REVIEWS, "/grpc-stream-cancel", &[]).await.unwrap();
    let want = "initial:application/grpc,message:true,cancelled,send-after:Err(NotFound)";
    assert_eq!((a.status, header(&a, "x-grpc-stream")), (200, Some(want)), "{a:?}");
    m.client.get(REVIEWS, "/shared-set", &[]).await.unwrap();
    let a = m.client.get(REVIEWS, "/shared-get", &[]).await.unwrap();
    assert_eq!(header(&a, "x-shared"), Some("probe-value"), "{a:?}");
    // Root contexts tick every 20 ms with no stream waiting on them: the count grows between
    // requests.
    let ticks = |a: &trellis_e2e::http::Answer| header(a, "x-shared").and_then(|v| v.parse::<u64>().ok());
    let first = ticks(&m.client.get(REVIEWS, "/ticks", &[]).await.unwrap()).expect("a tick count");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = ticks(&m.client.get(REVIEWS, "/ticks", &[]).await.unwrap()).expect("a tick count");
        if now >= first + 5 {
            break;
        }
        assert!(Instant::now() < deadline, "root ticks stalled at {now} (from {first})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Held until the root context's second tick: ticks are 20 ms apart and the first may come
    // at once, so at least 20 ms.
    let t = Instant::now();
    let a = m.client.get(REVIEWS, "/tick", &[]).await.unwrap();
    assert_eq!((a.status, header(&a, "x-ticked")), (200, Some("2")), "{a:?}");
    assert!(t.elapsed() >= Duration::from_millis(20), "released after {:?}", t.elapsed());
    let a = m.client.post(REVIEWS, "/echo-body", &[], b"hello body".to_vec()).await.unwrap();
    assert_eq!(a.body, "HELLO BODY");
    // The metric the module defines, under Envoy's name for it.
    let stats = ProxyClient::new(m.proxy.admin()).get(m.proxy.admin(), "/stats", &[]).await.unwrap().body;
    let n: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("wasmcustom.probe_requests: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wasmcustom.probe_requests in:\n{stats}"));
    assert!(n >= 7, "probe_requests = {n}");
}

async fn the_built_in_filter_modules_run_as_plugins(under: Under) {
    // The modules trellis-proxy runs for fault, mirror and authorization, loaded as ordinary
    // WasmPlugins with the configuration trellis-proxy would give them: the same behaviour in
    // Envoy's V8 host as in trellis-proxy.
    let m = mesh_with(under, |_, _| {
        vec![
            vs(json!([
                {"name": "aborted", "match": [{"uri": {"prefix": "/abort"}}], "route": to("v1")},
                {"name": "mirrored", "route": to("v1")}])),
            wasm_plugin(
                "fault",
                "fault",
                json!({"routes": {"aborted": {"abort": {"httpStatus": 451, "body": "by module"}}}}),
            ),
            wasm_plugin(
                "mirror",
                "mirror",
                json!({"routes": {"mirrored": [{"cluster": "outbound|9080|v2|reviews.bookinfo.svc.cluster.local"}]}}),
            ),
            wasm_plugin("auth", "auth", json!({"stages": [{"action": "DENY", "policies": {"no-admin": {
                "permissions": [{"path": {"prefix": "/admin"}}], "principals": [{"directRemoteIp": "127.0.0.0/8"}]}}}]})),
        ]
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = m.client.get(REVIEWS, "/abort", &[]).await.unwrap();
        if a.status == 451 {
            assert_eq!(a.body, "by module");
            break;
        }
        assert!(Instant::now() < deadline, "the fault module never aborted: {a:?}\n{}", m.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = m.client.get(REVIEWS, "/admin/users", &[]).await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (403, "RBAC: access denied"), "the auth module");
    let before = m.v2.requests();
    for _ in 0..5 {
        let a = m.client.post(REVIEWS, "/echo-body", &[], b"copied".to_vec()).await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "copied"), "the primary request is untouched");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.v2.requests() < before + 5 {
        assert!(Instant::now() < deadline, "the shadow got {} of 5 mirrored requests", m.v2.requests() - before);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hosts = m.v2.seen.hosts.lock().unwrap().clone();
    assert_eq!(hosts.last().map(String::as_str), Some("reviews.bookinfo.svc.cluster.local-shadow:9080"), "{hosts:?}");
}

async fn authorization_policies_at_the_server_sidecar(under: Under) {
    // client → ratings' sidecar (an HTTP ingress listener in front of the app). The control
    // plane emits Istio's RBAC filters; Envoy runs them natively, trellis-proxy in the auth
    // module: the answers must be the same.
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &["--push-debounce-ms", "50"]).unwrap();
    let api = cp.client().unwrap();
    let app = Echo::start("ratings").await.unwrap();
    let ingress = trellis_e2e::free_port();
    let policy = |name: &str, spec: Value| json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": "bookinfo"}, "spec": spec});
    let config = vec![
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "ratings", "namespace": "bookinfo"},
            "spec": {"hosts": ["ratings.bookinfo.svc.cluster.local"], "ports": [{"number": ingress, "name": "http", "protocol": "HTTP"}],
                     "location": "MESH_INTERNAL", "resolution": "STATIC", "workloadSelector": {"labels": {"app": "ratings"}}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "ratings-v1", "namespace": "bookinfo"},
            "spec": {"address": "127.0.0.1", "ports": {"http": ingress}, "labels": {"app": "ratings"}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "ratings", "namespace": "bookinfo"},
            "spec": {"workloadSelector": {"labels": {"app": "ratings"}},
                     "ingress": [{"port": {"number": ingress, "protocol": "HTTP", "name": "http"}, "bind": "127.0.0.1",
                                  "defaultEndpoint": format!("127.0.0.1:{}", app.port())}]}}),
        // Istio's allow-nothing.
        policy("allow-nothing", json!({})),
    ];
    api.apply(config, None, false).await.unwrap();
    let server = Sidecar::start(under, &cp.xds_addr, "ratings", "bookinfo", "").unwrap();
    let client = ProxyClient::new(&format!("127.0.0.1:{ingress}"));
    let host = format!("ratings.bookinfo.svc.cluster.local:{ingress}");
    let until = |want: u16, path: &'static str| {
        let (client, host) = (client.clone(), host.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(a) = client.get(&host, path, &[]).await
                    && a.status == want
                {
                    return a;
                }
                assert!(Instant::now() < deadline, "GET {path} never answered {want}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let a = until(403, "/reviews/1").await;
    assert_eq!(a.body, "RBAC: access denied", "{}", server.log_text());
    assert_eq!(app.requests(), 0, "a denied request reached the app");
    // Replace allow-nothing with: GET /reviews/* and /health from loopback, POST only for
    // alice, and a DENY for the secrets that wins over the ALLOW.
    let policies = vec![
        policy(
            "allow-reads",
            json!({"selector": {"matchLabels": {"app": "ratings"}}, "action": "ALLOW", "rules": [
            {"from": [{"source": {"ipBlocks": ["127.0.0.0/8"]}}], "to": [{"operation": {"methods": ["GET"], "paths": ["/reviews/*", "/health"]}}]},
            {"to": [{"operation": {"methods": ["POST"]}}], "when": [{"key": "request.headers[x-user]", "values": ["alice"]}]},
            {"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/productpage"]}}], "to": [{"operation": {"paths": ["/productpage"]}}]}]}),
        ),
        policy(
            "deny-secrets",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/reviews/secret*"]}}]}]}),
        ),
    ];
    api.apply(policies, None, false).await.unwrap();
    api.delete(Kind::AuthorizationPolicy, Some("bookinfo"), "allow-nothing").await.unwrap();
    until(200, "/reviews/1").await;
    until(403, "/reviews/secret-plans").await;
    for (path, want) in
        [("/reviews/2", 200), ("/health", 200), ("/reviews/secret", 403), ("/ratings", 403), ("/productpage", 403)]
    {
        let a = client.get(&host, path, &[]).await.unwrap();
        assert_eq!(a.status, want, "GET {path}: {a:?}");
    }
    for (headers, want) in [(vec![], 403), (vec![("x-user", "bob")], 403), (vec![("x-user", "alice")], 200)] {
        let a = client.post(&host, "/reviews/1", &headers, b"{}".to_vec()).await.unwrap();
        assert_eq!(a.status, want, "POST with {headers:?}: {a:?}");
    }
}

async fn the_retry_module_re_sends_in_both_hosts(under: Under) {
    // The retry module as a WasmPlugin, the route's own retries off: in trellis-proxy it
    // re-sends through `trellis.resend`; Envoy has no such foreign function, so the SDK's
    // portable fallback re-sends the kept request with an HTTP call to the route's cluster.
    let m = mesh_with(under, |_, _| {
        vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "bookinfo"},
                "spec": {"host": "reviews", "subsets": [{"name": "all", "labels": {"app": "reviews"}}, {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
            vs(json!([{"name": "flaky", "route": to("all"), "retries": {"attempts": 0}}])),
            wasm_plugin("retry", "retry", json!({"routes": {"flaky": {"attempts": 3, "retryOn": ["5xx"]}}})),
        ]
    })
    .await;
    m.v2.status.store(503, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until the plugin is in place some requests still see v2's 503. Requests go one at a
    // time: Envoy's fallback re-sends once, and round robin then moves on to v1.
    let mut in_a_row = 0;
    while in_a_row < 6 {
        let a = m.client.get(REVIEWS, "/", &[]).await.unwrap();
        in_a_row = if a.status == 200 { in_a_row + 1 } else { 0 };
        assert!(Instant::now() < deadline, "the retry module never re-sent: {a:?}\n{}", m.proxy.log_text());
    }
    let v2_before = m.v2.requests();
    for _ in 0..20 {
        let a = m.client.get(REVIEWS, "/", &[]).await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "v1"), "a re-send should have reached v1");
    }
    assert!(m.v2.requests() > v2_before, "the failing endpoint was tried (and its 503 re-sent)");
}

/// Uploads a module with `trellis wasm push` and returns the URL it printed.
fn push(cp: &ControlPlane, module: &std::path::Path) -> String {
    let out = cp.cli(&["wasm", "push", module.to_str().unwrap()]).unwrap();
    let (stdout, stderr) = trellis_e2e::text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    stdout
        .split_whitespace()
        .find(|w| w.starts_with("trellis://"))
        .unwrap_or_else(|| panic!("no URL in {stdout}"))
        .to_string()
}

async fn a_pushed_module_is_fetched_from_the_control_plane(under: Under) {
    // `trellis wasm push` stores the module in the control plane; a WasmPlugin names it by
    // trellis://SHA256; both proxies fetch it from the control plane's xDS port (Envoy's
    // remote data source), check the sha256 and run it.
    let m = mesh(under).await;
    let url = push(&m.cp, &hello_wasm());
    assert_eq!(push(&m.cp, &hello_wasm()), url, "pushing the same module again names the same one");
    let listed = trellis_e2e::text(&m.cp.cli(&["wasm", "list"]).unwrap()).0;
    assert!(listed.contains(&url), "{listed}");
    let plugin = json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": "pushed", "namespace": "default"},
        "spec": {"url": url, "phase": "AUTHZ", "match": [{"mode": "CLIENT"}],
                 "pluginConfig": {"header": "x-pushed", "value": "from-the-store", "denyPrefix": "/admin"}}});
    m.api.apply(vec![plugin], None, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = m.client.get(REVIEWS, "/headers", &[]).await.unwrap();
        if a.status == 200 && a.body.contains("from-the-store") {
            break;
        }
        assert!(Instant::now() < deadline, "the pushed module never ran: {a:?}\n{}", m.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = m.client.get(REVIEWS, "/admin/x", &[]).await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (403, "anonymous may not"));
}

async fn a_rejected_resource_is_nacked_and_routing_keeps_working(under: Under) {
    let m = mesh(under).await;
    let (bad, expected): (Value, &[&str]) = match under {
        // Valid for Trellis (and Rust's regex engine), too large for Envoy's RE2 program limit.
        Under::Envoy(_) => (
            vs(
                json!([{"match": [{"uri": {"regex": "/(alpha|beta|gamma|delta|epsilon|zeta|eta|theta){12}"}}], "route": to("v2")}, {"route": to("v1")}]),
            ),
            &["regex", "program size"],
        ),
        // A retry condition Envoy has and trellis-proxy's retry module does not.
        Under::Trellis => (
            vs(json!([{"retries": {"attempts": 2, "retryOn": "envoy-ratelimited"}, "route": to("v2")}])),
            &["retry_on", "envoy-ratelimited"],
        ),
    };
    let mut r: Resource = serde_json::from_value(bad).unwrap();
    r.metadata.resource_version =
        m.api.get(Kind::VirtualService, Some("bookinfo"), "reviews").await.unwrap().unwrap().metadata.resource_version;
    m.api.replace(&r).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        let s = syncz(&m.cp).await;
        if let Some(r) = rds(&s, m.proxy.node_id())
            && r["state"] == "NACK"
        {
            break r["error"].as_str().unwrap_or_default().to_string();
        }
        assert!(Instant::now() < deadline, "no NACK recorded: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(expected.iter().any(|e| error.to_lowercase().contains(e)), "{error}");
    // The previous routes (90/10 canary) still serve.
    let (v1, v2, failed) = split(&m.client, 200, 4).await;
    assert_eq!(failed, 0);
    assert!(v1 > v2 && v1 + v2 == 200);
    // The CLI shows it too.
    let out = m.cp.cli(&["proxy-status"]).unwrap();
    let (stdout, stderr) = trellis_e2e::text(&out);
    assert!(stdout.contains(m.proxy.node_id()) && stdout.contains("NACK"), "{stdout}{stderr}");
}

macro_rules! for_each_proxy {
    ($($scenario:ident $([pending $why:literal])?),* $(,)?) => {
        mod sotw {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Under::Envoy(super::AdsApi::Sotw)).await;
                }
            )*
        }
        mod delta {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Under::Envoy(super::AdsApi::Delta)).await;
                }
            )*
        }
        mod trellis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[ignore = $why])?
                async fn $scenario() {
                    super::$scenario(super::Under::Trellis).await;
                }
            )*
        }
    };
}

for_each_proxy!(
    canary_split_follows_the_api,
    header_match_routes_to_v2,
    fault_abort_and_delay,
    route_timeout_returns_504,
    retries_on_503_reach_a_healthy_endpoint,
    mirror_copies_requests_to_the_shadow,
    circuit_breaker_sheds_overflow_with_503,
    outlier_detection_ejects_a_failing_endpoint,
    locality_failover_prefers_the_local_zone,
    tcp_through_sidecar_port_listeners_is_weighted,
    an_ingress_gateway_routes_by_host_and_path,
    route_actions_redirect_rewrite_and_edit_headers,
    consistent_hashing_keeps_a_user_on_one_endpoint,
    a_wasm_plugin_runs_in_the_proxy,
    the_abi_probe_answers_the_same_in_both_hosts,
    the_built_in_filter_modules_run_as_plugins,
    authorization_policies_at_the_server_sidecar,
    a_pushed_module_is_fetched_from_the_control_plane,
    the_retry_module_re_sends_in_both_hosts,
    a_rejected_resource_is_nacked_and_routing_keeps_working,
);
