//! xDS scale benchmark: N simulated Delta ADS clients in this process, on loopback, against
//! one real `trellis-control` holding 1,000 services. Prints, per N: control-plane memory per
//! connected proxy, time from an API write to the last ACK (p50 / p99 over the writes), and
//! the bytes a proxy receives for a one-endpoint change with Delta vs state of the world.
//!
//!     cargo build --release --bins && cargo run --release -p trellis-e2e --example xds_scale [-- 100 1000 5000]

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_e2e::ControlPlane;
use trellis_xds::client::DeltaClient;
use trellis_xds::hub::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

const SERVICES: usize = 1000;
const WRITES: usize = 20;

fn service(i: usize, generation: usize) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"hosts": [format!("svc-{i}.bench.svc.cluster.local")], "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                 "resolution": "STATIC", "location": "MESH_INTERNAL",
                 "endpoints": [{"address": format!("10.{}.{}.{}", i / 250, i % 250, 10 + generation % 200)},
                               {"address": format!("10.{}.{}.2", i / 250, i % 250)}]}})
}

fn node(i: usize) -> Node {
    Node { id: format!("sidecar~~client-{i}.bench~bench.svc.cluster.local"), ..Default::default() }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Bytes of the state-of-the-world EDS response a proxy gets for one endpoint change: connect
/// a SotW stream, subscribe to every endpoint set, then measure the push after the change.
async fn sotw_eds_bytes(addr: &str, eds_names: Vec<String>, change: impl std::future::Future<Output = ()>) -> usize {
    let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(node(999_999)),
        type_url: ENDPOINT_TYPE.into(),
        resource_names: eds_names.clone(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut stream = grpc
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first = stream.message().await.expect("first").expect("first");
    tx.send(DiscoveryRequest {
        type_url: ENDPOINT_TYPE.into(),
        resource_names: eds_names,
        response_nonce: first.nonce.clone(),
        version_info: first.version_info.clone(),
        ..Default::default()
    })
    .await
    .expect("ack");
    change.await;
    let next = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("push")
        .expect("push")
        .expect("push");
    next.encoded_len()
}

#[tokio::main]
async fn main() {
    let ns: Vec<usize> = {
        let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
        if args.is_empty() { vec![100, 1000, 5000] } else { args }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cp =
        ControlPlane::start(dir.path(), &["--log", "warn"]).expect("trellis-control (cargo build --release --bins)");
    let api = cp.client().expect("client");
    for chunk in (0..SERVICES).collect::<Vec<_>>().chunks(100) {
        api.apply(chunk.iter().map(|i| service(*i, 0)).collect(), None, false).await.expect("apply");
    }
    // One proxy syncs first, to learn the names every other one subscribes to (polling until
    // the control plane has published all services; bounded to 60 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (eds_names, rds_names) = loop {
        let mut probe = DeltaClient::connect(&cp.xds_addr, node(0)).await.expect("connect");
        probe.sync_like_envoy(Duration::from_secs(60)).await.expect("sync");
        let eds: Vec<String> = probe.held[ENDPOINT_TYPE].keys().cloned().collect();
        if eds.len() == SERVICES {
            break (eds, probe.held[ROUTE_TYPE].keys().cloned().collect::<Vec<String>>());
        }
        assert!(Instant::now() < deadline, "the control plane published {} of {SERVICES} services", eds.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let baseline = cp.rss_kib().unwrap_or(0);
    println!(
        "Trellis xDS scale: {SERVICES} services, Delta ADS clients in one process on loopback, release build, 2-core VM"
    );
    println!("control plane RSS with no proxy: {} MiB\n", baseline / 1024);
    println!(
        "| proxies | connect+sync all | CP RSS | RSS per proxy | write→last ACK p50 | p99 | max | Delta bytes (1 endpoint) | SotW EDS bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");

    let mut generation = 0;
    for &n in &ns {
        // Connect and sync n proxies (all in namespace bench, same identity apart from the id).
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
        // Open streams 32 at a time (the sync itself is not limited).
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let t0 = Instant::now();
        let mut handles = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
            let mut batch = Vec::new();
            for &i in chunk {
                let (addr, eds, rds, ack_tx, g) =
                    (cp.xds_addr.clone(), eds_names.clone(), rds_names.clone(), ack_tx.clone(), gate.clone());
                batch.push(tokio::spawn(async move {
                    let _permit = g.acquire().await.expect("gate");
                    let mut c = match DeltaClient::connect(&addr, node(i + 1)).await {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("proxy {i}: {e}");
                            std::process::exit(1);
                        }
                    };
                    c.subscribe(CLUSTER_TYPE, Vec::new(), HashMap::new()).await.expect("cds");
                    c.subscribe(LISTENER_TYPE, Vec::new(), HashMap::new()).await.expect("lds");
                    c.subscribe(ENDPOINT_TYPE, eds, HashMap::new()).await.expect("eds");
                    c.subscribe(ROUTE_TYPE, rds, HashMap::new()).await.expect("rds");
                    for _ in 0..4 {
                        let r = c.recv(Duration::from_secs(120)).await.expect("initial");
                        c.ack(&r).await.expect("ack");
                    }
                    drop(_permit);
                    let _ = ack_tx.send((usize::MAX, Instant::now()));
                    // Then: ACK every push and report when.
                    loop {
                        let Ok(r) = c.recv(Duration::from_secs(3600)).await else { return };
                        c.ack(&r).await.expect("ack");
                        let _ = ack_tx.send((i, Instant::now()));
                    }
                }));
            }
            handles.extend(batch);
        }
        let mut synced = 0;
        while synced < n {
            let (i, _) = ack_rx.recv().await.expect("acks");
            if i == usize::MAX {
                synced += 1;
            }
        }
        let sync_time = t0.elapsed();
        let rss = cp.rss_kib().unwrap_or(0);
        let per_proxy = (rss.saturating_sub(baseline)) as f64 / n as f64;

        // Writes: change one endpoint of one service; time until every proxy ACKed the push.
        let mut to_last = Vec::new();
        for w in 0..WRITES {
            generation += 1;
            let svc = (w * 37) % SERVICES;
            let t = Instant::now();
            api.apply(vec![service(svc, generation)], None, false).await.expect("write");
            let mut acked = 0;
            let mut last = t;
            while acked < n {
                let (_, at) = tokio::time::timeout(Duration::from_secs(60), ack_rx.recv())
                    .await
                    .expect("acks within 60 s")
                    .expect("acks");
                acked += 1;
                last = last.max(at);
            }
            to_last.push(last - t);
        }
        let (p50, p99, max) = (pct(&mut to_last, 0.5), pct(&mut to_last, 0.99), pct(&mut to_last, 1.0));

        // Bytes for one endpoint change: one Delta proxy vs a SotW proxy subscribed to all.
        let mut d = DeltaClient::connect(&cp.xds_addr, node(888_888)).await.expect("connect");
        d.subscribe(ENDPOINT_TYPE, eds_names.clone(), HashMap::new()).await.expect("eds");
        let r = d.recv(Duration::from_secs(60)).await.expect("eds");
        d.ack(&r).await.expect("ack");
        generation += 1;
        let g = generation;
        let api2 = api.clone();
        let sotw = sotw_eds_bytes(&cp.xds_addr, eds_names.clone(), async move {
            api2.apply(vec![service(1, g)], None, false).await.expect("write");
        })
        .await;
        let delta_push = d.recv(Duration::from_secs(60)).await.expect("delta push");
        let delta = delta_push.encoded_len();
        // Drain the ACK reports of the n proxies for this write.
        let mut acked = 0;
        while acked < n {
            let _ = tokio::time::timeout(Duration::from_secs(60), ack_rx.recv()).await.expect("acks");
            acked += 1;
        }
        println!(
            "| {n} | {:.1} s | {} MiB | {:.1} KiB | {} ms | {} ms | {} ms | {delta} | {sotw} ({:.3}%) |",
            sync_time.as_secs_f64(),
            rss / 1024,
            per_proxy,
            p50.as_millis(),
            p99.as_millis(),
            max.as_millis(),
            delta as f64 * 100.0 / sotw as f64
        );
        for h in handles {
            h.abort();
        }
        drop(d);
        // Before the next round (which reuses node ids), wait until the control plane has seen
        // every stream of this one close (bounded: 60 s).
        let debug = trellis_e2e::http::ProxyClient::new(&cp.debug_addr);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let body = debug.get(&cp.debug_addr, "/debug/syncz", &[]).await.expect("syncz").body;
            let status: Value = serde_json::from_str(&body).expect("syncz JSON");
            if status["proxies"].as_array().is_some_and(|p| p.is_empty()) {
                break;
            }
            assert!(Instant::now() < deadline, "proxies still connected 60 s after their streams closed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
