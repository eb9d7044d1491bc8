//! The proxy benchmark, as docs/benchmarking describes the method: an nginx upstream serving
//! 1 KiB, fixed-rate load over keep-alive connections with latency measured from each
//! request's scheduled time (no coordinated omission), the proxy pinned to CPU 0 and load +
//! upstream to CPU 1 under SCHED_FIFO, a fresh proxy per repetition, direct / Envoy /
//! trellis-proxy alternating, both proxies configured by the same control plane with their
//! shipped defaults (access log off, metrics on), and every repetition printed.
//!
//! The load generator is `oha -q RATE --latency-correction` when installed (the published
//! figures); otherwise a built-in fixed-rate generator with the same correction (smoke runs).

#![allow(clippy::print_stdout)] // the benchmark prints every repetition as it goes

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::json;

use crate::envoy::AdsApi;
use crate::proxies::{Sidecar, TrellisProxy, Under};
use crate::{ControlPlane, free_port};

pub const HOST: &str = "bench.default.svc.cluster.local:8080";

/// What is measured: the upstream directly, or a proxy running this many wasm filters (0,
/// 1 or 4; see [`filter_plugins`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Envoy(u8),
    Trellis(u8),
}

impl Mode {
    /// Table order: direct, then Envoy, then trellis-proxy, each by filter count.
    fn order(&self) -> (u8, u8) {
        match self {
            Mode::Direct => (0, 0),
            Mode::Envoy(n) => (1, *n),
            Mode::Trellis(n) => (2, *n),
        }
    }

    pub fn name(self) -> String {
        match self {
            Mode::Direct => "direct".into(),
            Mode::Envoy(0) => "envoy".into(),
            Mode::Trellis(0) => "trellis-proxy".into(),
            Mode::Envoy(n) => format!("envoy +{n} wasm (V8)"),
            Mode::Trellis(n) => format!("trellis-proxy +{n} wasm"),
        }
    }

    /// The proxy's workload name: the WasmPlugins select it by `app`.
    fn workload(self) -> String {
        match self {
            Mode::Envoy(0) | Mode::Trellis(0) | Mode::Direct => "bench-client".into(),
            Mode::Envoy(n) | Mode::Trellis(n) => format!("bench-f{n}"),
        }
    }
}

/// The filters of the filter benchmark: (module, app, priority, pluginConfig). One filter
/// (app `bench-f1`) is the auth module (a DENY policy on `/admin`, checked on every request);
/// four (app `bench-f4`) are auth, fault (abort at 0%), mirror (at 0%) and retry (Istio's
/// default conditions, 2 attempts, which keeps each request for a possible re-send) — the
/// built-in chain, configured so that each filter runs its per-request logic and none changes
/// a request. Route name `bench` (the benchmark's VirtualService).
pub fn filter_configs() -> Vec<(&'static str, &'static str, i64, serde_json::Value)> {
    let auth = json!({"stages": [{"action": "DENY", "policies": {"no-admin": {
        "permissions": [{"path": {"prefix": "/admin"}}], "principals": [{"any": true}]}}}]});
    let fault = json!({"routes": {"bench": {"abort": {"httpStatus": 503, "percentage": 0}}}});
    let mirror =
        json!({"routes": {"bench": [{"cluster": "outbound|8080||bench.default.svc.cluster.local", "percentage": 0}]}});
    let retry = json!({"routes": {"bench": {"attempts": 2, "retryOn": ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"], "retriableStatusCodes": [503]}}});
    vec![
        ("auth", "bench-f1", 40, auth.clone()),
        ("auth", "bench-f4", 40, auth),
        ("fault", "bench-f4", 30, fault),
        ("mirror", "bench-f4", 20, mirror),
        ("retry", "bench-f4", 10, retry),
    ]
}

/// [`filter_configs`] as WasmPlugins (the same modules and configuration for both proxies).
pub fn filter_plugins() -> anyhow::Result<Vec<serde_json::Value>> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../filters/Cargo.toml");
    filter_configs()
        .into_iter()
        .map(|(name, app, priority, config)| {
            let path = trellis_filter_testkit::build(&manifest, name)?.canonicalize()?;
            Ok(
                json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": format!("{name}-{app}"), "namespace": "default"},
                "spec": {"url": format!("file://{}", path.display()), "selector": {"matchLabels": {"app": app}}, "priority": priority,
                         "phase": "AUTHZ", "match": [{"mode": "CLIENT"}], "failStrategy": "FAIL_CLOSE", "pluginConfig": config}}),
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Config {
    pub rates: Vec<u32>,
    pub repetitions: usize,
    pub warmup: Duration,
    pub measure: Duration,
    pub connections: usize,
    /// Pin and raise priority (needs root, taskset and chrt).
    pub pin: bool,
    /// Wasm filter counts to measure each proxy with (0: none; 1, 4: [`filter_plugins`]).
    pub filters: Vec<u8>,
    /// Only these modes (all of direct and each proxy × `filters` when `None`).
    pub modes: Option<Vec<Mode>>,
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Sample {
    pub mode: Mode,
    pub rate: u32,
    pub repetition: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub sent: u64,
    pub failed: u64,
    /// Proxy CPU in vCPU over the measurement (None for direct).
    pub cpu: Option<f64>,
    /// The user-space part of it (what wasm filters add to; the system part is socket I/O,
    /// the same work in every mode, and where most of this VM's noise is).
    pub cpu_user: Option<f64>,
    pub rss_start_mb: Option<f64>,
    pub rss_peak_mb: Option<f64>,
    /// Requests the proxy says it handled (warm-up included) vs what was sent to it.
    pub proxy_counted: Option<(u64, u64)>,
    /// Requests the load generator cut at the ends of the runs (the proxy may have counted them).
    pub aborted: u64,
    /// Busy share of CPU 0 during the measurement.
    pub cpu0_busy: f64,
    pub exe: String,
}

/// Result of one load run.
#[derive(Debug, Clone, Default)]
pub struct Load {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub sent: u64,
    pub failed: u64,
    /// Requests the load generator cut itself at the end of the run (oha's "aborted due to
    /// deadline"): the proxy may or may not have seen them.
    pub aborted: u64,
}

pub fn oha() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    [home.join(".cargo/bin/oha"), PathBuf::from("/usr/local/bin/oha"), PathBuf::from("/usr/bin/oha")]
        .into_iter()
        .find(|p| p.exists())
}

fn pinned(cpu: u32, pin: bool, program: &Path) -> Command {
    if pin {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpu.to_string()).arg("chrt").args(["-f", "10"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Pins every thread of a running process to `cpu` with SCHED_FIFO 10.
pub(crate) fn pin_process(pid: u32, cpu: u32) -> anyhow::Result<()> {
    let p = pid.to_string();
    let ok =
        Command::new("taskset").args(["-a", "-cp", &cpu.to_string(), &p]).stdout(Stdio::null()).status()?.success()
            && Command::new("chrt").args(["-a", "-f", "-p", "10", &p]).stdout(Stdio::null()).status()?.success();
    if !ok {
        bail!("could not pin process {pid} (taskset/chrt need root)");
    }
    Ok(())
}

/// nginx with one worker serving 1 KiB on a free loopback port.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(pin: bool) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        std::fs::write(dir.path().join("index.html"), vec![b'a'; 1024])?;
        let d = dir.path().display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n  server {{ listen {addr}; root {d}; location / {{ }} }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("nginx not found (scripts/setup.sh installs nginx-light)")?;
        let mut child = pinned(1, pin, &nginx)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        crate::await_listening(&mut child, &addr, "nginx")?;
        Ok(Nginx { child, addr, _dir: dir })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-QUIT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|(user, system)| user + system)
}

/// (utime, stime) of a process in seconds.
fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? / 100.0, f.get(12)?.parse::<f64>().ok()? / 100.0))
}

pub(crate) fn status_kib(pid: u32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// (busy, total) jiffies of CPU 0.
fn cpu0() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu0 ")) else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Fixed-rate load on `url` (with `Host: host` when given) for `duration`.
pub async fn load(
    url: &str,
    host: Option<&str>,
    rate: u32,
    connections: usize,
    duration: Duration,
    pin: bool,
) -> anyhow::Result<Load> {
    match oha() {
        Some(oha) => {
            let mut c = pinned(1, pin, &oha);
            c.args(["-q", &rate.to_string(), "-c", &connections.to_string(), "-z"])
                .arg(format!("{}ms", duration.as_millis()))
                .args(["--latency-correction", "--no-tui", "--output-format", "json"]);
            if let Some(h) = host {
                c.args(["-H", &format!("Host: {h}")]);
            }
            c.arg(url);
            let out = tokio::task::spawn_blocking(move || c.output()).await??;
            if !out.status.success() {
                bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha output")?;
            let p = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
            let codes = v["statusCodeDistribution"].as_object().cloned().unwrap_or_default();
            let ok = codes.get("200").and_then(|x| x.as_u64()).unwrap_or(0);
            let all_codes: u64 = codes.values().filter_map(|x| x.as_u64()).sum();
            let errors: u64 =
                // Requests still in flight when the duration ends are cut by oha itself
                // ("aborted due to deadline"): neither sent in full nor failed by the proxy.
                v["errorDistribution"]
                    .as_object()
                    .map(|m| m.iter().filter(|(k, _)| !k.contains("deadline")).filter_map(|(_, x)| x.as_u64()).sum())
                    .unwrap_or(0);
            let aborted: u64 = v["errorDistribution"]
                .as_object()
                .map(|m| m.iter().filter(|(k, _)| k.contains("deadline")).filter_map(|(_, x)| x.as_u64()).sum())
                .unwrap_or(0);
            Ok(Load {
                p50_ms: p("p50"),
                p90_ms: p("p90"),
                p99_ms: p("p99"),
                sent: all_codes + errors,
                failed: all_codes - ok + errors,
                aborted,
            })
        }
        None => builtin_load(url, host, rate, connections, duration).await,
    }
}

/// The built-in generator: request i is due at start + i/rate; its latency counts from then.
async fn builtin_load(
    url: &str,
    host: Option<&str>,
    rate: u32,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Load> {
    let uri: http::Uri = url.parse()?;
    let addr = uri.authority().context("url without authority")?.to_string();
    let host = host.map(String::from).unwrap_or_else(|| addr.clone());
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (next, failed, addr, host, path) =
            (next.clone(), failed.clone(), addr.clone(), host.clone(), uri.path().to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut sender = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return lat;
                }
                let due = start + interval.mul_f64(i as f64);
                tokio::time::sleep_until(due.into()).await;
                if sender.is_none() {
                    let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let Ok((s, conn)) =
                        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
                            .await
                    else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    tokio::spawn(conn);
                    sender = Some(s);
                }
                let Some(s) = sender.as_mut() else { continue };
                let req = http::Request::get(path.as_str()).header("host", host.as_str()).body(Empty::new());
                let ok = match req {
                    Ok(req) => match tokio::time::timeout(Duration::from_secs(10), s.send_request(req)).await {
                        Ok(Ok(resp)) => resp.status() == 200 && resp.into_body().collect().await.is_ok(),
                        _ => false,
                    },
                    Err(_) => false,
                };
                if ok {
                    lat.push(due.elapsed().as_secs_f64() * 1000.0);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    sender = None;
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
    };
    Ok(Load {
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        sent: total,
        failed: failed.load(Ordering::Relaxed),
        aborted: 0,
    })
}

async fn proxy_count(mode: Mode, sidecar: &Sidecar) -> Option<u64> {
    let client = crate::http::ProxyClient::new(sidecar.admin());
    match (mode, sidecar) {
        (Mode::Trellis(_), Sidecar::Trellis(t)) => {
            let text =
                crate::http::ProxyClient::new(&t.metrics).get(&t.metrics, "/stats/prometheus", &[]).await.ok()?.body;
            Some(
                text.lines()
                    .filter(|l| l.starts_with("istio_requests_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64,
            )
        }
        (Mode::Envoy(_), _) => {
            let text =
                client.get(sidecar.admin(), "/stats?filter=http.outbound.downstream_rq_total", &[]).await.ok()?.body;
            text.lines().find_map(|l| l.strip_prefix("http.outbound.downstream_rq_total: ")?.trim().parse().ok())
        }
        _ => None,
    }
}

/// Waits (up to 30 s) until the proxy at `outbound` answers [`HOST`] with 200.
pub(crate) async fn await_routed(outbound: &str, what: &str, logs: impl Fn() -> String) -> anyhow::Result<()> {
    let c = crate::http::ProxyClient::new(outbound);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.get(HOST, "/", &[]).await.map(|a| a.status != 200).unwrap_or(true) {
        if Instant::now() > deadline {
            bail!("{what} never routed to the upstream:\n{}", logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Runs everything; prints each repetition as it completes.
pub async fn run(cfg: &Config) -> anyhow::Result<Vec<Sample>> {
    let dir = tempfile::tempdir()?;
    let nginx = Nginx::start(cfg.pin)?;
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])?;
    let (_, nginx_port) = nginx.addr.rsplit_once(':').context("nginx addr")?;
    cp.client()?
        .apply(
            vec![json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "bench", "namespace": "default"},
                "spec": {"hosts": ["bench.default.svc.cluster.local"], "ports": [{"number": 8080, "name": "http", "protocol": "HTTP", "targetPort": nginx_port.parse::<u16>()?}],
                         "location": "MESH_INTERNAL", "resolution": "STATIC", "endpoints": [{"address": "127.0.0.1"}]}})],
            None,
            false,
        )
        .await?;
    if cfg.filters.iter().any(|f| *f > 0) {
        // No retry policy on the route: the proxies' only filters are the plugins.
        let mut config = vec![
            json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "bench", "namespace": "default"},
            "spec": {"hosts": ["bench.default.svc.cluster.local"], "http": [{"name": "bench", "retries": {"attempts": 0},
                     "route": [{"destination": {"host": "bench.default.svc.cluster.local"}}]}]}}),
        ];
        config.extend(filter_plugins()?);
        cp.client()?.apply(config, None, false).await?;
    }
    let mut samples = Vec::new();
    for rate in &cfg.rates {
        for rep in 1..=cfg.repetitions {
            // Alternate the order between repetitions.
            let mut modes = vec![Mode::Direct];
            modes.extend(cfg.filters.iter().map(|f| Mode::Envoy(*f)));
            modes.extend(cfg.filters.iter().map(|f| Mode::Trellis(*f)));
            if let Some(only) = &cfg.modes {
                modes.clone_from(only);
            }
            if rep % 2 == 0 {
                modes.reverse();
            }
            for mode in modes {
                let s = measure(cfg, &cp, &nginx, mode, *rate, rep).await?;
                println!(
                    "rep {rep} {rate} rps {:<13} p50 {:.3} p90 {:.3} p99 {:.3} ms  sent {} failed {}  cpu {} (user {})  rss {}/{} MB  counted {:?}  cpu0 busy {:.0}%  {}",
                    mode.name(),
                    s.p50_ms,
                    s.p90_ms,
                    s.p99_ms,
                    s.sent,
                    s.failed,
                    s.cpu.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into()),
                    s.cpu_user.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into()),
                    s.rss_start_mb.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into()),
                    s.rss_peak_mb.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into()),
                    s.proxy_counted,
                    s.cpu0_busy * 100.0,
                    s.exe,
                );
                samples.push(s);
            }
        }
    }
    Ok(samples)
}

async fn measure(
    cfg: &Config,
    cp: &ControlPlane,
    nginx: &Nginx,
    mode: Mode,
    rate: u32,
    rep: usize,
) -> anyhow::Result<Sample> {
    let workload = mode.workload();
    let sidecar = match mode {
        Mode::Direct => None,
        Mode::Envoy(_) => Some(Sidecar::start(Under::Envoy(AdsApi::Delta), &cp.xds_addr, &workload, "default", "")?),
        Mode::Trellis(_) => Some(Sidecar::Trellis(TrellisProxy::start_with(
            &cp.xds_addr,
            &workload,
            "default",
            "",
            &["--concurrency", "1"],
        )?)),
    };
    let (url, host) = match &sidecar {
        None => (format!("http://{}/", nginx.addr), None),
        Some(s) => (format!("http://{}/", s.outbound()), Some(HOST)),
    };
    // Routed before measuring.
    if let Some(s) = &sidecar {
        await_routed(s.outbound(), &mode.name(), || s.log_text()).await?;
        if cfg.pin {
            pin_process(s.pid(), 0)?;
        }
    }
    let pid = sidecar.as_ref().map(|s| s.pid());
    let before_count = match &sidecar {
        Some(s) => proxy_count(mode, s).await,
        None => None,
    };
    let rss_start_mb = pid.and_then(|p| status_kib(p, "VmRSS:")).map(|k| k / 1024.0);
    let warm = load(&url, host, rate, cfg.connections, cfg.warmup, cfg.pin).await?;
    let cpu_before = pid.and_then(cpu_split);
    let busy_before = cpu0();
    let t = Instant::now();
    let l = load(&url, host, rate, cfg.connections, cfg.measure, cfg.pin).await?;
    let wall = t.elapsed().as_secs_f64();
    let busy_after = cpu0();
    let (cpu, cpu_user) = match (cpu_before, pid.and_then(cpu_split)) {
        (Some(a), Some(b)) => (Some((b.0 + b.1 - a.0 - a.1) / wall), Some((b.0 - a.0) / wall)),
        _ => (None, None),
    };
    let rss_peak_mb = pid.and_then(|p| status_kib(p, "VmHWM:")).map(|k| k / 1024.0);
    let counted = match (&sidecar, before_count) {
        (Some(s), Some(b)) => proxy_count(mode, s).await.map(|a| (a - b, warm.sent + l.sent)),
        _ => None,
    };
    let exe = match pid {
        Some(p) => std::fs::read_link(format!("/proc/{p}/exe")).map(|e| e.display().to_string()).unwrap_or_default(),
        None => "nginx direct".into(),
    };
    let busy = {
        let (b, t) = (busy_after.0.saturating_sub(busy_before.0), busy_after.1.saturating_sub(busy_before.1));
        if t == 0 { 0.0 } else { b as f64 / t as f64 }
    };
    drop(sidecar);
    Ok(Sample {
        mode,
        rate,
        repetition: rep,
        p50_ms: l.p50_ms,
        p90_ms: l.p90_ms,
        p99_ms: l.p99_ms,
        sent: l.sent,
        failed: l.failed,
        cpu,
        cpu_user,
        rss_start_mb,
        rss_peak_mb,
        proxy_counted: counted,
        aborted: warm.aborted + l.aborted,
        cpu0_busy: busy,
        exe,
    })
}

/// The distinct rates, in order (the tables' rows).
pub(crate) fn rates(all: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut rates: Vec<u32> = all.collect();
    rates.sort();
    rates.dedup();
    rates
}

/// Median, min and max of the finite values (NaN when there are none).
pub(crate) fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// What the wasm filters add, paired within each repetition (the same proxy with and without
/// filters, measured back to back): per rate and proxy, the median (min–max) of the added vCPU
/// and of its user-space part, and the median per request in µs.
pub fn added_by_filters(samples: &[Sample]) -> String {
    let mut out = String::from(
        "| rate | filters | added vCPU | µs / request | added user vCPU | user µs / request |\n|---|---|---|---|---|---|\n",
    );
    for rate in rates(samples.iter().map(|s| s.rate)) {
        let here: Vec<&Sample> = samples.iter().filter(|s| s.rate == rate).collect();
        let mut modes: Vec<Mode> =
            here.iter().map(|s| s.mode).filter(|m| matches!(m, Mode::Envoy(n) | Mode::Trellis(n) if *n > 0)).collect();
        modes.sort_by_key(Mode::order);
        modes.dedup();
        for mode in modes {
            let base = match mode {
                Mode::Envoy(_) => Mode::Envoy(0),
                _ => Mode::Trellis(0),
            };
            let paired = |g: fn(&Sample) -> Option<f64>| {
                let v: Vec<f64> = here
                    .iter()
                    .filter(|s| s.mode == mode)
                    .filter_map(|s| {
                        let b = here.iter().find(|b| b.mode == base && b.repetition == s.repetition)?;
                        Some(g(s)? - g(b)?)
                    })
                    .collect();
                median(v)
            };
            let (total, user) = (paired(|s| s.cpu), paired(|s| s.cpu_user));
            let per_request = |v: f64| v / f64::from(rate) * 1e6;
            out.push_str(&format!(
                "| {rate} | {} | {:+.3} ({:+.3} … {:+.3}) | {:.1} | {:+.3} ({:+.3} … {:+.3}) | {:.1} |\n",
                mode.name(),
                total.0,
                total.1,
                total.2,
                per_request(total.0),
                user.0,
                user.1,
                user.2,
                per_request(user.0),
            ));
        }
    }
    out
}

/// The summary table: medians (min–max) per mode and rate, and the proxied/direct ratio of
/// each repetition's p50 and p99 (median).
pub fn table(samples: &[Sample]) -> String {
    let mut out = String::from(
        "| rate | mode | p50 ms | p90 ms | p99 ms | p50 / direct | p99 / direct | proxy vCPU | RSS start / peak MB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for rate in rates(samples.iter().map(|s| s.rate)) {
        let mut modes: Vec<Mode> = samples.iter().filter(|s| s.rate == rate).map(|s| s.mode).collect();
        modes.sort_by_key(Mode::order);
        modes.dedup();
        for mode in modes {
            let these: Vec<&Sample> = samples.iter().filter(|s| s.rate == rate && s.mode == mode).collect();
            if these.is_empty() {
                continue;
            }
            let f = |g: fn(&Sample) -> f64| {
                let (m, lo, hi) = median(these.iter().map(|s| g(s)).collect());
                format!("{m:.3} ({lo:.3}–{hi:.3})")
            };
            let ratio = |g: fn(&Sample) -> f64| {
                let r: Vec<f64> = these
                    .iter()
                    .filter_map(|s| {
                        let d = samples
                            .iter()
                            .find(|d| d.mode == Mode::Direct && d.rate == rate && d.repetition == s.repetition)?;
                        Some(g(s) / g(d))
                    })
                    .collect();
                let (m, _, _) = median(r);
                format!("{m:.2}")
            };
            let cpu = median(these.iter().filter_map(|s| s.cpu).collect());
            let rss = median(these.iter().filter_map(|s| s.rss_start_mb).collect());
            let hwm = median(these.iter().filter_map(|s| s.rss_peak_mb).collect());
            out.push_str(&format!(
                "| {rate} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                mode.name(),
                f(|s| s.p50_ms),
                f(|s| s.p90_ms),
                f(|s| s.p99_ms),
                if mode == Mode::Direct { "1.00".into() } else { ratio(|s| s.p50_ms) },
                if mode == Mode::Direct { "1.00".into() } else { ratio(|s| s.p99_ms) },
                if mode == Mode::Direct { "-".into() } else { format!("{:.3}", cpu.0) },
                if mode == Mode::Direct { "-".into() } else { format!("{:.0} / {:.0}", rss.0, hwm.0) },
            ));
        }
    }
    out
}
