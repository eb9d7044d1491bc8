//! The mTLS benchmark: a client → its sidecar → mTLS (DestinationRule ISTIO_MUTUAL,
//! PeerAuthentication STRICT) → the server's sidecar → nginx, against the client → nginx
//! directly, with a pair of trellis-proxies and a pair of Envoys (each with `trellis-agent`)
//! configured by the same control plane, in the same run. Fixed-rate load (oha), medians of the
//! repetitions, modes interleaved. Both proxies of a pair are pinned to CPU 0, nginx and the load
//! generator to CPU 1 (when `pin`). Figures: added p50 / p99 latency, each proxy's CPU and RSS.

#![allow(clippy::print_stdout)] // the benchmark prints every measurement as it goes

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use crate::bench::{HOST, Nginx, await_routed, cpu_seconds, load, pin_process, status_kib};
use crate::envoy::{AdsApi, Envoy};
use crate::proxies::{NodeSpec, TrellisAgent, TrellisProxy};
use crate::{ControlPlane, free_port};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairMode {
    Direct,
    Trellis,
    Envoy,
    /// Two byte relays in the proxies' place ([`relay`]): no HTTP, no TLS — the floor any
    /// pair of proxies pays on this machine for two more processes and four more socket hops.
    Relay,
}

impl PairMode {
    pub fn name(self) -> &'static str {
        match self {
            PairMode::Direct => "direct",
            PairMode::Trellis => "trellis-proxy pair, mTLS",
            PairMode::Envoy => "Envoy pair, mTLS",
            PairMode::Relay => "TCP relay pair (floor)",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub rates: Vec<u32>,
    pub repetitions: usize,
    pub warmup: Duration,
    pub measure: Duration,
    pub connections: usize,
    pub pin: bool,
    /// Only these modes (default: direct and both proxy pairs).
    pub modes: Option<Vec<PairMode>>,
    /// The command that runs [`relay`] with LISTEN and TARGET appended (needed for
    /// [`PairMode::Relay`]; the example binary runs itself with `--relay`).
    pub relay_command: Option<Vec<String>>,
}

/// A byte relay from `listen` to `target` on one thread: what [`PairMode::Relay`] runs twice.
pub async fn relay(listen: &str, target: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (mut inbound, _) = listener.accept().await?;
        let target = target.to_string();
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// A running relay process.
struct RelayProcess(std::process::Child);

impl RelayProcess {
    fn start(command: &[String], listen: &str, target: &str) -> anyhow::Result<RelayProcess> {
        let (program, args) = command.split_first().ok_or_else(|| anyhow::anyhow!("empty relay command"))?;
        let child = std::process::Command::new(program)
            .args(args)
            .args([listen, target])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        // Killed on drop, also when it never listens.
        let mut relay = RelayProcess(child);
        crate::await_listening(&mut relay.0, listen, "the relay")?;
        Ok(relay)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub mode: PairMode,
    pub rate: u32,
    pub repetition: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub sent: u64,
    pub failed: u64,
    /// vCPU of the client's and the server's proxy.
    pub cpu: Option<(f64, f64)>,
    /// Peak RSS (MB) of the client's and the server's proxy.
    pub rss_mb: Option<(f64, f64)>,
}

enum Pair {
    Trellis(TrellisProxy, TrellisProxy),
    Envoy(Envoy, TrellisAgent, Envoy, TrellisAgent),
    /// Client relay (and the address it listens on), server relay.
    Relay(RelayProcess, String, RelayProcess),
}

impl Pair {
    fn pids(&self) -> (u32, u32) {
        match self {
            Pair::Trellis(c, s) => (c.pid(), s.pid()),
            Pair::Envoy(c, _, s, _) => (c.pid(), s.pid()),
            Pair::Relay(c, _, s) => (c.0.id(), s.0.id()),
        }
    }

    fn outbound(&self) -> &str {
        match self {
            Pair::Trellis(c, _) => &c.outbound,
            Pair::Envoy(c, _, _, _) => &c.outbound,
            Pair::Relay(_, listen, _) => listen,
        }
    }

    fn logs(&self) -> String {
        match self {
            Pair::Trellis(c, s) => format!("{}\n---\n{}", c.log_text(), s.log_text()),
            Pair::Envoy(c, ca, s, sa) => {
                format!("{}\n{}\n---\n{}\n{}", c.log_text(), ca.log_text(), s.log_text(), sa.log_text())
            }
            Pair::Relay(..) => String::new(),
        }
    }
}

struct Setup {
    cp: ControlPlane,
    nginx: Nginx,
    client_token: String,
    server_token: String,
    _dir: tempfile::TempDir,
}

async fn setup(cfg: &Config) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let nginx = Nginx::start(cfg.pin)?;
    let cp = ControlPlane::start(&dir.path().join("cp"), &["--push-debounce-ms", "50"])?;
    let client_token = cp.workload_token_file(dir.path(), "bench-client", "default", "bench-client")?;
    let server_token = cp.workload_token_file(dir.path(), "bench-server", "default", "bench-server")?;
    Ok(Setup { cp, nginx, client_token, server_token, _dir: dir })
}

/// The mesh config for a pair whose server sidecar takes `ingress`.
async fn configure(s: &Setup, ingress: u16) -> anyhow::Result<()> {
    let nginx = s.nginx.addr.clone();
    s.cp.client()?
        .apply(
            vec![
                json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "bench", "namespace": "default"},
                       "spec": {"hosts": ["bench.default.svc.cluster.local"], "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                                "location": "MESH_INTERNAL", "resolution": "STATIC",
                                "endpoints": [{"address": "127.0.0.1", "ports": {"http": ingress}, "serviceAccount": "bench-server"}]}}),
                json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "bench-server", "namespace": "default"},
                       "spec": {"workloadSelector": {"labels": {"app": "bench-server"}},
                                "ingress": [{"port": {"number": ingress, "protocol": "HTTP", "name": "http"}, "bind": "127.0.0.1",
                                             "defaultEndpoint": nginx}]}}),
                json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "bench", "namespace": "default"},
                       "spec": {"host": "bench.default.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}}),
                json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "default", "namespace": "default"},
                       "spec": {"mtls": {"mode": "STRICT"}}}),
            ],
            None,
            false,
        )
        .await?;
    Ok(())
}

async fn start_pair(cfg: &Config, s: &Setup, mode: PairMode) -> anyhow::Result<Pair> {
    if mode == PairMode::Relay {
        let command = cfg.relay_command.as_deref().ok_or_else(|| anyhow::anyhow!("no relay command configured"))?;
        let (client, server) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let srv = RelayProcess::start(command, &server, &s.nginx.addr)?;
        let cli = RelayProcess::start(command, &client, &server)?;
        return Ok(Pair::Relay(cli, client, srv));
    }
    // A new port for every pair: a listener just closed on the last one may linger.
    let ingress = free_port();
    configure(s, ingress).await?;
    let xds = &s.cp.xds_addr;
    let client = NodeSpec::sidecar("bench-client", "default", "");
    let mut server = NodeSpec::sidecar("bench-server", "default", "");
    server.wait_for = Some(format!("127.0.0.1:{ingress}"));
    Ok(match mode {
        PairMode::Trellis => {
            let flags = |sa: &'static str, token: &str| {
                vec![
                    "--concurrency".to_string(),
                    "1".into(),
                    "--service-account".into(),
                    sa.into(),
                    "--identity-token-file".into(),
                    token.to_string(),
                ]
            };
            let (cf, sf) = (flags("bench-client", &s.client_token), flags("bench-server", &s.server_token));
            let srv = TrellisProxy::start_node(xds, &server, &sf.iter().map(String::as_str).collect::<Vec<_>>())?;
            let cli = TrellisProxy::start_node(xds, &client, &cf.iter().map(String::as_str).collect::<Vec<_>>())?;
            Pair::Trellis(cli, srv)
        }
        PairMode::Envoy => {
            let sa = TrellisAgent::start(xds, &s.server_token, "default", "bench-server")?;
            let srv = Envoy::start_node_with(xds, AdsApi::Delta, &server, Some(&sa.socket))?;
            let ca = TrellisAgent::start(xds, &s.client_token, "default", "bench-client")?;
            let cli = Envoy::start_node_with(xds, AdsApi::Delta, &client, Some(&ca.socket))?;
            Pair::Envoy(cli, ca, srv, sa)
        }
        PairMode::Direct | PairMode::Relay => bail!("{} is not a proxy pair", mode.name()),
    })
}

/// Runs everything; prints each measurement as it completes.
pub async fn run(cfg: &Config) -> anyhow::Result<Vec<Sample>> {
    let s = setup(cfg).await?;
    let mut samples = Vec::new();
    for rate in &cfg.rates {
        for rep in 1..=cfg.repetitions {
            let mut modes =
                cfg.modes.clone().unwrap_or_else(|| vec![PairMode::Direct, PairMode::Trellis, PairMode::Envoy]);
            if rep % 2 == 0 {
                modes.reverse();
            }
            for mode in modes {
                let sample = measure(cfg, &s, mode, *rate, rep).await?;
                println!(
                    "rep {rep} {rate} rps {:<26} p50 {:.3} p99 {:.3} ms  sent {} failed {}  cpu {:?}  rss {:?}",
                    mode.name(),
                    sample.p50_ms,
                    sample.p99_ms,
                    sample.sent,
                    sample.failed,
                    sample.cpu,
                    sample.rss_mb
                );
                samples.push(sample);
            }
        }
    }
    Ok(samples)
}

async fn measure(cfg: &Config, s: &Setup, mode: PairMode, rate: u32, rep: usize) -> anyhow::Result<Sample> {
    let pair = match mode {
        PairMode::Direct => None,
        _ => Some(start_pair(cfg, s, mode).await?),
    };
    let (url, host) = match &pair {
        None => (format!("http://{}/", s.nginx.addr), None),
        Some(p) => (format!("http://{}/", p.outbound()), Some(HOST)),
    };
    if let Some(p) = &pair {
        await_routed(p.outbound(), mode.name(), || p.logs()).await?;
        if cfg.pin {
            let (a, b) = p.pids();
            pin_process(a, 0)?;
            pin_process(b, 0)?;
        }
    }
    let pids = pair.as_ref().map(|p| p.pids());
    load(&url, host, rate, cfg.connections, cfg.warmup, cfg.pin).await?;
    let cpu_before = pids.and_then(|(a, b)| Some((cpu_seconds(a)?, cpu_seconds(b)?)));
    let t = Instant::now();
    let l = load(&url, host, rate, cfg.connections, cfg.measure, cfg.pin).await?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = match (cpu_before, pids.and_then(|(a, b)| Some((cpu_seconds(a)?, cpu_seconds(b)?)))) {
        (Some((a0, b0)), Some((a1, b1))) => Some(((a1 - a0) / wall, (b1 - b0) / wall)),
        _ => None,
    };
    let rss_mb = pids.and_then(|(a, b)| Some((status_kib(a, "VmHWM:")? / 1024.0, status_kib(b, "VmHWM:")? / 1024.0)));
    drop(pair);
    Ok(Sample {
        mode,
        rate,
        repetition: rep,
        p50_ms: l.p50_ms,
        p99_ms: l.p99_ms,
        sent: l.sent,
        failed: l.failed,
        cpu,
        rss_mb,
    })
}

fn median(v: Vec<f64>) -> f64 {
    crate::bench::median(v).0
}

/// Medians per rate and mode; the added latency is the median of each repetition's pair
/// minus direct.
pub fn table(samples: &[Sample]) -> String {
    let mut out = String::from(
        "| rate | mode | p50 ms | p99 ms | added p50 / p99 ms | vCPU client + server | RSS MB client / server |\n|---|---|---|---|---|---|---|\n",
    );
    for rate in crate::bench::rates(samples.iter().map(|s| s.rate)) {
        for mode in [PairMode::Direct, PairMode::Relay, PairMode::Trellis, PairMode::Envoy] {
            let these: Vec<&Sample> = samples.iter().filter(|s| s.rate == rate && s.mode == mode).collect();
            if these.is_empty() {
                continue;
            }
            let added = |f: fn(&Sample) -> f64| {
                median(
                    these
                        .iter()
                        .filter_map(|s| {
                            let d = samples.iter().find(|d| {
                                d.mode == PairMode::Direct && d.rate == rate && d.repetition == s.repetition
                            })?;
                            Some(f(s) - f(d))
                        })
                        .collect(),
                )
            };
            let (c, sv) = (
                median(these.iter().filter_map(|s| s.cpu.map(|c| c.0)).collect()),
                median(these.iter().filter_map(|s| s.cpu.map(|c| c.1)).collect()),
            );
            let (rc, rs) = (
                median(these.iter().filter_map(|s| s.rss_mb.map(|r| r.0)).collect()),
                median(these.iter().filter_map(|s| s.rss_mb.map(|r| r.1)).collect()),
            );
            let direct = mode == PairMode::Direct;
            out.push_str(&format!(
                "| {rate} | {} | {:.3} | {:.3} | {} | {} | {} |\n",
                mode.name(),
                median(these.iter().map(|s| s.p50_ms).collect()),
                median(these.iter().map(|s| s.p99_ms).collect()),
                if direct { "-".into() } else { format!("{:.3} / {:.3}", added(|s| s.p50_ms), added(|s| s.p99_ms)) },
                if direct { "-".into() } else { format!("{c:.3} + {sv:.3} = {:.3}", c + sv) },
                if direct { "-".into() } else { format!("{rc:.0} / {rs:.0}") },
            ));
        }
    }
    out
}
