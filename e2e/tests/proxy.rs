//! trellis-proxy beyond the shared scenarios: protocols (h2c, gRPC trailers, WebSocket
//! upgrades, streamed bodies), headers, metrics and access log, hostile input, graceful drain,
//! and life without the control plane. Each test runs a real control plane, real upstreams on
//! loopback and the real trellis-proxy binary, configured through the API.

#![allow(clippy::print_stdout)] // tests print what they measured

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_e2e::ControlPlane;
use trellis_e2e::echo::Echo;
use trellis_e2e::http::ProxyClient;
use trellis_e2e::proxies::TrellisProxy;

const WEB: &str = "web.default.svc.cluster.local:8080";

fn service(name: &str, port: u16, protocol: &str, endpoint_port: u16) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name, "namespace": "default"},
        "spec": {"hosts": [format!("{name}.default.svc.cluster.local")], "ports": [{"number": port, "name": "p", "protocol": protocol, "targetPort": endpoint_port}],
                 "location": "MESH_INTERNAL", "resolution": "STATIC", "endpoints": [{"address": "127.0.0.1"}]}})
}

struct Setup {
    cp: ControlPlane,
    proxy: TrellisProxy,
    echo: Echo,
    client: ProxyClient,
    dir: tempfile::TempDir,
}

/// A control plane with `web` (HTTP) and `grpc` (GRPC, h2c upstream) on one echo upstream,
/// `extra` config, and a trellis-proxy started with `args`, ready.
async fn setup(extra: impl FnOnce(&Echo) -> Vec<Value>, args: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &["--push-debounce-ms", "20"]).unwrap();
    let echo = Echo::start("web").await.unwrap();
    let mut config = vec![service("web", 8080, "HTTP", echo.port()), service("grpc", 9090, "GRPC", echo.port())];
    config.extend(extra(&echo));
    cp.client().unwrap().apply(config, None, false).await.unwrap();
    let proxy = TrellisProxy::start_with(&cp.xds_addr, "client", "default", "", args).unwrap();
    let client = ProxyClient::new(&proxy.outbound);
    let admin = ProxyClient::new(&proxy.admin);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = admin.get(&proxy.admin, "/ready", &[]).await.map(|a| a.status == 200).unwrap_or(false);
        let routed = client.get(WEB, "/", &[]).await.map(|a| a.status == 200).unwrap_or(false);
        if ready && routed {
            break;
        }
        assert!(Instant::now() < deadline, "trellis-proxy never became ready:\n{}", proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Setup { cp, proxy, echo, client, dir }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A raw HTTP/1.1 exchange on a fresh connection; returns what came back before the peer
/// closed or `wait` passed.
async fn raw(addr: &str, request: &[u8], wait: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_istio_names_labels_and_counts() {
    // A service whose selector matches no workload: no endpoints.
    let empty = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "empty", "namespace": "default"},
        "spec": {"hosts": ["empty.default.svc.cluster.local"], "ports": [{"number": 8081, "name": "p", "protocol": "HTTP"}],
                 "location": "MESH_INTERNAL", "resolution": "STATIC", "workloadSelector": {"labels": {"app": "nothing"}}}});
    let s = setup(|_| vec![empty], &[]).await;
    let before = metric_value(
        &s.proxy,
        "istio_requests_total",
        &["destination_service=\"web.default.svc.cluster.local\"", "response_code=\"200\""],
    )
    .await;
    for _ in 0..20 {
        assert_eq!(s.client.get(WEB, "/", &[]).await.unwrap().status, 200);
    }
    for _ in 0..5 {
        let a = s.client.get("empty.default.svc.cluster.local:8081", "/", &[]).await.unwrap();
        assert_eq!(a.status, 503, "{a:?}");
    }
    // Recorded when each response ends; poll until they are all in.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = metric_value(
            &s.proxy,
            "istio_requests_total",
            &[
                "destination_service=\"web.default.svc.cluster.local\"",
                "response_code=\"200\"",
                "reporter=\"source\"",
                "source_workload=\"client\"",
                "response_flags=\"-\"",
            ],
        )
        .await;
        let uh = metric_value(
            &s.proxy,
            "istio_requests_total",
            &[
                "destination_service=\"empty.default.svc.cluster.local\"",
                "response_code=\"503\"",
                "response_flags=\"UH\"",
            ],
        )
        .await;
        if ok - before == 20.0 && uh == 5.0 {
            break;
        }
        assert!(Instant::now() < deadline, "counted {} OK and {uh} UH", ok - before);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let count = metric_value(
        &s.proxy,
        "istio_request_duration_milliseconds_count",
        &["destination_service=\"web.default.svc.cluster.local\"", "response_code=\"200\""],
    )
    .await;
    assert!(count >= 20.0, "{count}");
    let sizes = metric_value(
        &s.proxy,
        "istio_response_bytes_sum",
        &["destination_service=\"web.default.svc.cluster.local\"", "response_code=\"200\""],
    )
    .await;
    assert!(sizes >= 20.0 * 3.0, "response bytes sum {sizes}: each answer is \"web\"");
}

/// Waits (up to 10 s) until `path` on WEB answers `status`: the configuration (a wasm filter,
/// say) the test applied has reached the proxy. The control plane publishes resources as it
/// indexes them, so a proxy can be ready on part of a batch.
async fn await_status(s: &Setup, path: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = s.client.get(WEB, path, &[]).await.map(|a| a.status).unwrap_or(0);
        if got == status {
            return;
        }
        assert!(Instant::now() < deadline, "{path} answered {got}, not {status}:\n{}", s.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the series `name` whose labels contain all of `labels`.
async fn metric_value(p: &TrellisProxy, name: &str, labels: &[&str]) -> f64 {
    let text = ProxyClient::new(&p.metrics).get(&p.metrics, "/stats/prometheus", &[]).await.unwrap().body;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let s = setup(|_| Vec::new(), &[]).await;
    let stat = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with("cluster.outbound|8080||web.default.svc.cluster.local.") && l.contains(name))
            .and_then(|l| l.rsplit(": ").next()?.trim().parse().ok())
            .unwrap_or(0)
    };
    let admin = ProxyClient::new(&s.proxy.admin);
    let before = admin.get(&s.proxy.admin, "/stats", &[]).await.unwrap().body;
    // 200 requests, 4 at a time, keep-alive downstream.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = s.client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                assert_eq!(c.get(WEB, "/", &[]).await.unwrap().status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = admin.get(&s.proxy.admin, "/stats", &[]).await.unwrap().body;
    let requests = stat(&after, "upstream_rq_total") - stat(&before, "upstream_rq_total");
    let connections = stat(&after, "upstream_cx_total") - stat(&before, "upstream_cx_total");
    assert_eq!(requests, 200);
    assert!(connections <= 8, "{connections} upstream connections for 200 requests at concurrency 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_access_log_has_one_line_per_request_with_flags() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let log_arg = log.to_string_lossy().to_string();
    let s = setup(|_| Vec::new(), &["--access-log", "json", "--access-log-path", &log_arg]).await;
    let lines_before = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    s.client.get(WEB, "/one?x=1", &[("user-agent", "e2e"), ("x-request-id", "req-1")]).await.unwrap();
    s.client.get("nowhere.example:80", "/two", &[]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<Value> = text.lines().skip(lines_before).filter_map(|l| serde_json::from_str(l).ok()).collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(Instant::now() < deadline, "access log: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let one = lines.iter().find(|l| l["path"] == "/one?x=1").expect("line for /one");
    assert_eq!(one["response_code"], 200);
    assert_eq!(one["response_flags"], "-");
    assert_eq!(one["user_agent"], "e2e");
    assert_eq!(one["request_id"], "req-1");
    assert_eq!(one["upstream_host"], format!("127.0.0.1:{}", s.echo.port()));
    assert_eq!(one["upstream_cluster"], "outbound|8080||web.default.svc.cluster.local");
    assert_eq!(one["bytes_sent"], 3);
    let two = lines.iter().find(|l| l["path"] == "/two").expect("line for /two");
    assert_eq!((two["response_code"].as_u64(), two["response_flags"].as_str()), (Some(404), Some("NR")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_grpc_trailers_pass_through() {
    let s = setup(|_| Vec::new(), &[]).await;
    let tcp = tokio::net::TcpStream::connect(&s.proxy.outbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("http://grpc.default.svc.cluster.local:9090/trailers")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers reached the client");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get("grpc-message").unwrap(), "fine");
    assert_eq!(collected.to_bytes(), "payload");
    // The upstream was spoken to over HTTP/2 (the service port is GRPC).
    let req =
        http::Request::get("http://grpc.default.svc.cluster.local:9090/headers").body(Full::new(Bytes::new())).unwrap();
    let body = sender.send_request(req).await.unwrap().into_body().collect().await.unwrap().to_bytes();
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen[":version"], "HTTP/2.0", "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_forwarded_and_hop_by_hop_ones_dropped() {
    let s = setup(|_| Vec::new(), &[]).await;
    let a = s
        .client
        .get(
            WEB,
            "/headers",
            &[
                ("connection", "x-private-hop"),
                ("x-private-hop", "secret"),
                ("proxy-connection", "keep-alive"),
                ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let seen: Value = serde_json::from_str(&a.body).unwrap();
    assert!(seen.get("x-private-hop").is_none() && seen.get("proxy-connection").is_none(), "{seen}");
    assert_eq!(seen["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    assert_eq!(seen["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    let id = seen["x-request-id"].as_str().unwrap_or_default();
    assert_eq!(
        (id.len(), id.matches('-').count(), id.chars().nth(14)),
        (36, 4, Some('4')),
        "generated x-request-id {id}"
    );
    assert_eq!(seen["host"], WEB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_tunnelled() {
    // An upstream that accepts any upgrade and then echoes bytes.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = upstream.accept().await else { return };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if c.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !text.contains("upgrade: websocket") {
                    return;
                }
                let _ = c
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let s = setup(move |_| vec![service("ws", 8082, "HTTP", port)], &[]).await;
    // The ws service has reached the proxy: a plain request gets to the upstream (which
    // closes it), not the proxy's "no route" 404 or "no healthy upstream" 503.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = raw(
            &s.proxy.outbound,
            b"GET /x HTTP/1.1\r\nHost: ws.default.svc.cluster.local:8082\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        if !a.starts_with("HTTP/1.1 404") && !a.contains("no healthy upstream") {
            break;
        }
        assert!(Instant::now() < deadline, "the ws service never reached the proxy: {a}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = tokio::net::TcpStream::connect(&s.proxy.outbound).await.unwrap();
    c.write_all(b"GET /chat HTTP/1.1\r\nHost: ws.default.svc.cluster.local:8082\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut b)).await.unwrap().unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        let admin = ProxyClient::new(&s.proxy.admin);
        let clusters = admin.get(&s.proxy.admin, "/clusters", &[]).await.map(|a| a.body).unwrap_or_default();
        let xds = admin.get(&s.proxy.admin, "/xds", &[]).await.map(|a| a.body).unwrap_or_default();
        panic!("{head}\nclusters:\n{clusters}\nxds:\n{xds}\nlog:\n{}", s.proxy.log_text());
    }
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    for msg in ["hello", "through the tunnel"] {
        c.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, msg.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_without_being_buffered() {
    let s = setup(|_| Vec::new(), &[]).await;
    let pid = s.proxy.pid();
    let before = vm_hwm_kib(pid);
    const SIZE: u64 = 64 * 1024 * 1024;
    // Upload 64 MiB in 64 KiB chunks.
    let tcp = tokio::net::TcpStream::connect(&s.proxy.outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, StreamBody<_>>(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let frames = futures::stream::iter(
        (0..SIZE / chunk.len() as u64)
            .map(move |_| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))),
    );
    let req = http::Request::post("/count").header("host", WEB).body(StreamBody::new(frames)).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req)).await.unwrap().unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), SIZE.to_string());
    // Download 64 MiB.
    let a = tokio::net::TcpStream::connect(&s.proxy.outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(a)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("/big?n={SIZE}")).header("host", WEB).body(Full::new(Bytes::new())).unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut got: u64 = 0;
    while let Some(f) = tokio::time::timeout(Duration::from_secs(60), body.frame()).await.unwrap() {
        got += f.unwrap().data_ref().map(|d| d.len() as u64).unwrap_or(0);
    }
    assert_eq!(got, SIZE);
    let after = vm_hwm_kib(pid);
    println!("trellis-proxy peak RSS {before} KiB before, {after} KiB after moving 2 x 64 MiB");
    // A buffered body would add at least its 64 MiB; copies of 64 KiB frames through the wasm
    // chain (the built-in retry filter sees every request) leave the allocator some slack.
    assert!(after.saturating_sub(before) < 32 * 1024, "peak RSS grew by {} KiB: bodies were buffered", after - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_clear_errors_and_the_proxy_keeps_serving() {
    let s = setup(|_| Vec::new(), &[]).await;
    let out = &s.proxy.outbound;
    // Not HTTP at all.
    let a = raw(out, b"THIS IS NOT HTTP\r\n\r\n", Duration::from_secs(5)).await;
    assert!(a.is_empty() || a.starts_with("HTTP/1.1 400"), "{a}");
    // A header block over the limit (60 KiB).
    let big = format!("GET / HTTP/1.1\r\nHost: {WEB}\r\nx-big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let a = raw(out, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        a.is_empty() || a.starts_with("HTTP/1.1 431") || a.starts_with("HTTP/1.1 400"),
        "{}",
        &a[..a.len().min(200)]
    );
    // A body cut off mid-way: the client promises 1 MB, sends 1 KB and goes away.
    {
        let mut c = tokio::net::TcpStream::connect(out).await.unwrap();
        let head = format!("POST /count HTTP/1.1\r\nHost: {WEB}\r\nContent-Length: 1000000\r\n\r\n");
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&[1u8; 1024]).await.unwrap();
    }
    // Slow clients: 20 connections that never finish their headers.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut c = tokio::net::TcpStream::connect(out).await.unwrap();
        c.write_all(format!("GET / HTTP/1.1\r\nHost: {WEB}\r\nx-slow: ").as_bytes()).await.unwrap();
        slow.push(c);
    }
    // Everyone else is still served.
    for _ in 0..50 {
        assert_eq!(s.client.get(WEB, "/", &[]).await.unwrap().status, 200);
    }
    // The slow ones are cut off by the header timeout (10 s).
    let t = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), slow[0].read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "a client that never finished its headers was still connected after {:?}", t.elapsed());
    assert_eq!(s.client.get(WEB, "/", &[]).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let s = setup(|_| Vec::new(), &[]).await;
    s.echo.delay_ms.store(500, std::sync::atomic::Ordering::SeqCst);
    let client = s.client.clone();
    let inflight = tokio::spawn(async move { client.get(WEB, "/", &[]).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.echo.seen.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the request never reached the upstream");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outbound = s.proxy.outbound.clone();
    let status = tokio::task::spawn_blocking(move || s.proxy.terminate()).await.unwrap().unwrap();
    let a = inflight.await.unwrap().unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "web"), "the in-flight request was cut");
    assert!(status.success(), "trellis-proxy exited with {status}");
    assert!(tokio::net::TcpStream::connect(&outbound).await.is_err(), "still accepting after shutdown");
    drop(s.cp);
    drop(s.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_control_plane_the_last_config_serves_and_a_restart_resyncs() {
    let s = setup(|_| Vec::new(), &[]).await;
    let (data, addr, xds, debug) =
        (s.cp.data_dir.clone(), s.cp.addr.clone(), s.cp.xds_addr.clone(), s.cp.debug_addr.clone());
    s.cp.kill_9().unwrap();
    for _ in 0..50 {
        assert_eq!(s.client.get(WEB, "/", &[]).await.unwrap().status, 200, "lost routing without the control plane");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let xds_status = ProxyClient::new(&s.proxy.admin).get(&s.proxy.admin, "/xds", &[]).await.unwrap().body;
        if xds_status.contains("\"connected\": false") {
            break;
        }
        assert!(Instant::now() < deadline, "the proxy did not notice the control plane was gone: {xds_status}");
        assert_eq!(s.client.get(WEB, "/", &[]).await.unwrap().status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Back: a change made now reaches the proxy over its new stream.
    let cp = ControlPlane::restart(&data, &addr, &xds, &debug).unwrap();
    cp.client()
        .unwrap()
        .apply(
            vec![json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "web", "namespace": "default"},
                "spec": {"hosts": ["web.default.svc.cluster.local"], "http": [{"directResponse": {"status": 299, "body": {"string": "from the new config"}}}]}})],
            None,
            false,
        )
        .await
        .unwrap();
    // Backoff is at most 30 s (with jitter, 45 s) between attempts; the first few are sooner.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = s.client.get(WEB, "/", &[]).await.unwrap();
        if a.status == 299 {
            assert_eq!(a.body, "from the new config");
            break;
        }
        assert_eq!(a.status, 200);
        assert!(Instant::now() < deadline, "the proxy never picked up the new config:\n{}", s.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sidecar(egress: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "default", "namespace": "default"},
        "spec": {"egress": egress}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_passed_through_by_sni() {
    use std::sync::Arc;
    // A TLS upstream for secure.example.com (a certificate made here), answering one line.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["secure.example.com".to_string()]).unwrap().self_signed(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = upstream.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 64];
                let n = tls.read(&mut buf).await.unwrap_or(0);
                let _ = tls.write_all(format!("tls:{}", String::from_utf8_lossy(&buf[..n])).as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let port = trellis_e2e::free_port();
    let s = setup(
        move |_| {
            vec![
                json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "secure", "namespace": "default"},
                    "spec": {"hosts": ["secure.example.com"], "ports": [{"number": port, "name": "tls", "protocol": "TLS", "targetPort": upstream_port}],
                             "location": "MESH_EXTERNAL", "resolution": "STATIC", "endpoints": [{"address": "127.0.0.1"}]}}),
                sidecar(json!([{"hosts": ["*/*"]}, {"port": {"number": port, "protocol": "TLS", "name": "tls"}, "hosts": ["./secure.example.com"]}])),
            ]
        },
        &[],
    )
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let through = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // End to end TLS: the client verifies the upstream's certificate through the proxy.
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(&through).await?;
            let name = rustls::pki_types::ServerName::try_from("secure.example.com").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            tls.write_all(b"ping").await?;
            let mut out = String::new();
            tls.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(a)) => {
                assert_eq!(a, "tls:ping");
                break;
            }
            other => assert!(Instant::now() < deadline, "no TLS through the proxy: {other:?}\n{}", s.proxy.log_text()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another name has no chain: the connection is closed without reaching the upstream.
    let tcp = tokio::net::TcpStream::connect(&through).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("other.example.com").unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await.unwrap();
    assert!(r.is_err(), "a TLS handshake for an unknown name completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listener_drains_in_flight_requests() {
    let port = trellis_e2e::free_port();
    let s = setup(
        move |echo| {
            vec![
                service("slow", port, "HTTP", echo.port()),
                sidecar(json!([{"hosts": ["*/*"]}, {"port": {"number": port, "protocol": "HTTP", "name": "http"}, "hosts": ["./slow.default.svc.cluster.local"]}])),
            ]
        },
        &[],
    )
    .await;
    let through = format!("127.0.0.1:{port}");
    let host = format!("slow.default.svc.cluster.local:{port}");
    let c = ProxyClient::new(&through);
    assert_eq!(c.get(&host, "/", &[]).await.unwrap().status, 200);
    s.echo.delay_ms.store(800, std::sync::atomic::Ordering::SeqCst);
    let (c2, h2) = (c.clone(), host.clone());
    let inflight = tokio::spawn(async move { c2.get(&h2, "/", &[]).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.echo.seen.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the request never reached the upstream");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Remove the port listener while the request is in flight.
    let api = s.cp.client().unwrap();
    let mut sc: trellis_model::Resource = serde_json::from_value(sidecar(json!([{"hosts": ["*/*"]}]))).unwrap();
    sc.metadata.resource_version = api
        .get(trellis_model::Kind::Sidecar, Some("default"), "default")
        .await
        .unwrap()
        .unwrap()
        .metadata
        .resource_version;
    api.replace(&sc).await.unwrap();
    let a = inflight.await.unwrap().unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "web"), "the in-flight request was cut");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&through).await.is_ok() {
        assert!(Instant::now() < deadline, "the removed listener still accepts connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The rest keeps working.
    s.echo.delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(s.client.get(WEB, "/", &[]).await.unwrap().status, 200);
}

/// filters/abi-probe, built once per test run.
fn probe_wasm() -> std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../filters/Cargo.toml");
        trellis_filter_testkit::build(manifest, "abi-probe").expect("build filters/abi-probe").canonicalize().unwrap()
    })
    .clone()
}

fn probe_plugin(strategy: &str) -> Value {
    json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": "probe", "namespace": "default"},
        "spec": {"url": format!("file://{}", probe_wasm().display()), "failStrategy": strategy,
                 "pluginConfig": {"header": "x-probe-resp", "deny": "/deny"}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_filter_follows_its_fail_strategy() {
    for (strategy, after_crash) in [("FAIL_OPEN", 200), ("FAIL_CLOSE", 503), ("FAIL_RELOAD", 200)] {
        let s = setup(|_| vec![probe_plugin(strategy)], &[]).await;
        // The filter works: it answers /deny itself.
        await_status(&s, "/deny", 403).await;
        // /panic makes the guest panic.
        let crashed = s.client.get(WEB, "/panic", &[]).await.unwrap().status;
        assert_eq!(crashed, if strategy == "FAIL_OPEN" { 200 } else { 503 }, "{strategy}: the crashing request");
        // Afterwards: fail open skips nothing (a fresh VM runs), fail close stays failed, fail
        // reload gets a fresh VM after its backoff (100 ms).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = s.client.get(WEB, "/deny", &[]).await.unwrap().status;
            let want = if after_crash == 200 { 403 } else { 503 };
            if status == want {
                break;
            }
            assert!(Instant::now() < deadline, "{strategy}: later requests got {status}, want {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Per-plugin metrics saw the calls, the failure and the VMs.
        let plugin = ["plugin=\"default.probe\""];
        let calls = metric_value(&s.proxy, "trellis_wasm_calls_total", &plugin).await;
        let errors = metric_value(&s.proxy, "trellis_wasm_errors_total", &plugin).await;
        let starts = metric_value(&s.proxy, "trellis_wasm_vm_starts_total", &plugin).await;
        let time = metric_value(&s.proxy, "trellis_wasm_time_seconds_total", &plugin).await;
        assert!(calls >= 3.0 && errors >= 1.0 && time > 0.0, "{strategy}: calls {calls}, errors {errors}, time {time}");
        if strategy != "FAIL_CLOSE" {
            assert!(starts >= 2.0, "{strategy}: a fresh VM replaced the crashed one ({starts} started)");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_writing_huge_headers_gets_its_fail_strategy_and_the_proxy_serves_on() {
    for (strategy, want) in [("FAIL_CLOSE", 503), ("FAIL_OPEN", 200)] {
        let s = setup(|_| vec![probe_plugin(strategy)], &[]).await;
        await_status(&s, "/deny", 403).await;
        // The probe sets a 100 KiB header: over the 60 KiB trellis-proxy accepts from anyone.
        let a = s.client.get(WEB, "/huge", &[]).await.unwrap();
        assert_eq!(a.status, want, "{strategy}: {a:?}");
        if want == 200 {
            let seen = s.client.get(WEB, "/huge", &[]).await.unwrap();
            assert!(
                seen.headers.get("x-probe-resp").is_some(),
                "{strategy}: the response still went through the filter"
            );
        }
        // The filter (not poisoned: the host refused the headers) keeps working.
        assert_eq!(s.client.get(WEB, "/deny", &[]).await.unwrap().status, 403, "{strategy}");
    }
}

fn hello_plugin(value: &str) -> Value {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../filters/Cargo.toml");
    let path = trellis_filter_testkit::build(manifest, "hello").expect("build filters/hello").canonicalize().unwrap();
    json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": "hello", "namespace": "default"},
        "spec": {"url": format!("file://{}", path.display()), "pluginConfig": {"header": "x-hello", "value": value}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_is_swapped_under_load_without_a_failed_request() {
    let s = setup(|_| vec![hello_plugin("before")], &[]).await;
    let stamp =
        |body: &str| serde_json::from_str::<Value>(body).ok().and_then(|v| v["x-hello"].as_str().map(String::from));
    let deadline = Instant::now() + Duration::from_secs(10);
    while stamp(&s.client.get(WEB, "/headers", &[]).await.unwrap().body).as_deref() != Some("before") {
        assert!(Instant::now() < deadline, "the filter never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Steady load: 4 clients, at most 1,500 requests each, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (c, stop, done) = (s.client.clone(), stop.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut seen_after) = (0u32, 0u32, 0u32);
            for _ in 0..1500 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = c.get(WEB, "/headers", &[]).await;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match r {
                    Ok(a) if a.status == 200 => {
                        ok += 1;
                        if a.body.contains("\"x-hello\":\"after\"") {
                            seen_after += 1;
                        }
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed, seen_after)
        }));
    }
    // The load runs on the old filter first.
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "the load did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let api = s.cp.client().unwrap();
    let mut p: trellis_model::Resource = serde_json::from_value(hello_plugin("after")).unwrap();
    p.metadata.resource_version = api
        .get(trellis_model::Kind::WasmPlugin, Some("default"), "hello")
        .await
        .unwrap()
        .unwrap()
        .metadata
        .resource_version;
    api.replace(&p).await.unwrap();
    // Every request from some point on sees the new filter.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = s.client.get(WEB, "/headers", &[]).await.unwrap();
        if stamp(&a.body).as_deref() == Some("after") {
            break;
        }
        assert!(Instant::now() < deadline, "the new filter never served: {}", a.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..50 {
        let a = s.client.get(WEB, "/headers", &[]).await.unwrap();
        assert_eq!(stamp(&a.body).as_deref(), Some("after"), "an old filter served after the swap");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed, mut after) = (0, 0, 0);
    for t in load {
        let (o, f, a) = t.await.unwrap();
        (ok, failed, after) = (ok + o, failed + f, after + a);
    }
    println!("swap under load: {ok} requests ok, {failed} failed, {after} served by the new filter");
    assert_eq!(failed, 0, "requests failed during the swap");
    assert!(ok > 0 && after > 0, "the load ran across the swap: ok {ok}, after {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_pass_through_the_filters_body_callbacks() {
    let s = setup(|_| vec![probe_plugin("FAIL_CLOSE")], &[]).await;
    await_status(&s, "/deny", 403).await;
    // Three frames: the probe holds them back (Pause) until the end, then upper-cases all.
    let tcp = tokio::net::TcpStream::connect(&s.proxy.outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, StreamBody<_>>(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let frames = futures::stream::iter(
        ["hello ", "wasm ", "body"]
            .map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(c)))),
    );
    let req = http::Request::post("/echo-body").header("host", WEB).body(StreamBody::new(frames)).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "HELLO WASM BODY", "proxy log:\n{}", s.proxy.log_text());
    // The streams finished and their VMs went back: later requests still work.
    for _ in 0..5 {
        assert_eq!(s.client.get(WEB, "/deny", &[]).await.unwrap().status, 403);
    }
}

fn pushed_plugin(url: &str, value: &str) -> Value {
    json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": "pushed", "namespace": "default"},
        "spec": {"url": url, "pluginConfig": {"header": "x-pushed", "value": value}}})
}

fn push(cp: &ControlPlane, module: &std::path::Path) -> String {
    let out = cp.cli(&["wasm", "push", module.to_str().unwrap()]).unwrap();
    let (stdout, stderr) = trellis_e2e::text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    stdout.split_whitespace().find(|w| w.starts_with("trellis://")).unwrap().to_string()
}

async fn await_nack(s: &Setup, wanted: &[&str]) -> String {
    let admin = ProxyClient::new(&s.proxy.admin);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let xds = admin.get(&s.proxy.admin, "/xds", &[]).await.map(|a| a.body).unwrap_or_default();
        if wanted.iter().all(|w| xds.contains(w)) {
            return xds;
        }
        assert!(Instant::now() < deadline, "no NACK naming {wanted:?}:\n{xds}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_modules_are_verified_cached_on_disk_and_a_bad_one_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("wasm");
    let s = setup(|_| Vec::new(), &["--wasm-cache-dir", cache_dir.to_str().unwrap()]).await;
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../filters/Cargo.toml");
    let hello = trellis_filter_testkit::build(manifest, "hello").unwrap();
    let url = push(&s.cp, &hello);
    let api = s.cp.client().unwrap();
    api.apply(vec![pushed_plugin(&url, "one")], None, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.client.get(WEB, "/headers", &[]).await.unwrap().body.contains("\"x-pushed\":\"one\"") {
        assert!(Instant::now() < deadline, "the pushed module never ran:\n{}", s.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The module and its compiled code are on disk, in a private directory.
    let sha = url.trim_start_matches("trellis://");
    let names: Vec<String> =
        std::fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&format!("{sha}.wasm")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with(sha) && n.ends_with(".cwasm")), "{names:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&cache_dir).unwrap().permissions().mode() & 0o777, 0o700);
    // A module the control plane does not have: the update is refused, the old filter serves.
    let missing = format!("trellis://{}", "0".repeat(64));
    api.apply(vec![pushed_plugin(&missing, "two")], None, false).await.unwrap();
    await_nack(&s, &["404", &"0".repeat(64)]).await;
    assert!(s.client.get(WEB, "/headers", &[]).await.unwrap().body.contains("\"x-pushed\":\"one\""));
    // A WebAssembly module that is not a proxy-wasm module: fetched, then refused by the host.
    let not_proxy_wasm = s.dir.path().join("plain.wasm");
    // The smallest valid module: the header and nothing else.
    std::fs::write(&not_proxy_wasm, b"\0asm\x01\0\0\0").unwrap();
    let plain = push(&s.cp, &not_proxy_wasm);
    api.apply(vec![pushed_plugin(&plain, "three")], None, false).await.unwrap();
    await_nack(&s, &["exports no memory"]).await;
    assert!(s.client.get(WEB, "/headers", &[]).await.unwrap().body.contains("\"x-pushed\":\"one\""));
    // A second proxy with the same cache runs the module without fetching it.
    api.apply(vec![pushed_plugin(&url, "four")], None, false).await.unwrap();
    let second = TrellisProxy::start_with(
        &s.cp.xds_addr,
        "client",
        "default",
        "",
        &["--wasm-cache-dir", cache_dir.to_str().unwrap()],
    )
    .unwrap();
    let c2 = ProxyClient::new(&second.outbound);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c2.get(WEB, "/headers", &[]).await.map(|a| a.body.contains("\"x-pushed\":\"four\"")).unwrap_or(false) {
        assert!(Instant::now() < deadline, "the second proxy never ran the module:\n{}", second.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!second.log_text().contains("fetched wasm module"), "{}", second.log_text());
}
