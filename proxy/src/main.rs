//! trellis-proxy binary: reads the bootstrap (file and/or flags), starts the admin port and
//! the xDS client, and serves until SIGINT/SIGTERM, then drains.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

/// mimalloc: a request allocates a few dozen small objects across threads; glibc's malloc
/// costs measurably more CPU per request here (Envoy ships tcmalloc for the same reason).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;
use trellis_proxy::Proxy;
use trellis_proxy::bootstrap::Bootstrap;

#[derive(Debug, Parser)]
#[command(name = "trellis-proxy", version, about = "Trellis data-plane proxy (sidecar and gateway)")]
struct Args {
    /// Bootstrap YAML file (see the crate docs); flags override its values.
    #[arg(long, short = 'c', env = "TRELLIS_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Control plane xDS address, HOST:PORT (or https://HOST:PORT).
    #[arg(long, env = "TRELLIS_XDS_ADDRESS")]
    xds: Option<String>,
    /// The CA of the control plane's xDS certificate (its <data-dir>/api-ca.pem): xDS and
    /// certificate requests then go over TLS.
    #[arg(long, env = "TRELLIS_XDS_CA_FILE")]
    xds_ca_file: Option<String>,
    /// Admin address (loopback only).
    #[arg(long)]
    admin: Option<String>,
    /// Prometheus address (/stats/prometheus).
    #[arg(long)]
    metrics: Option<String>,
    /// Access log: off, text (Envoy's default format) or json.
    #[arg(long)]
    access_log: Option<String>,
    /// Access log file (default: stdout).
    #[arg(long)]
    access_log_path: Option<String>,
    #[arg(long)]
    namespace: Option<String>,
    #[arg(long)]
    workload_name: Option<String>,
    #[arg(long)]
    service_account: Option<String>,
    /// A workload label, KEY=VALUE; repeat for more.
    #[arg(long = "label")]
    labels: Vec<String>,
    #[arg(long)]
    cluster_id: Option<String>,
    #[arg(long)]
    network: Option<String>,
    /// region/zone/subzone.
    #[arg(long)]
    locality: Option<String>,
    /// The workload's IP; repeat for more.
    #[arg(long = "ip")]
    ips: Vec<String>,
    /// sidecar or router.
    #[arg(long = "type")]
    kind: Option<String>,
    /// Where the outbound (explicit HTTP proxy) listener binds.
    #[arg(long)]
    outbound: Option<String>,
    /// Where the inbound listener binds.
    #[arg(long)]
    inbound: Option<String>,
    /// Where fetched wasm modules and their compiled code are kept across restarts.
    #[arg(long, env = "TRELLIS_WASM_CACHE_DIR")]
    wasm_cache_dir: Option<std::path::PathBuf>,
    /// A file holding the WorkloadToken secret: the proxy gets its SPIFFE certificate from
    /// the mesh CA with it (bootstrap `identity.tokenFile`).
    #[arg(long, env = "TRELLIS_IDENTITY_TOKEN_FILE")]
    identity_token_file: Option<String>,
    /// The certificate lifetime to ask for, in seconds (bootstrap `identity.ttlSeconds`).
    #[arg(long)]
    identity_ttl: Option<u64>,
    /// Explicit node id (default: derived from the rest).
    #[arg(long)]
    node_id: Option<String>,
    /// Log filter, e.g. info or info,access=debug (changeable at run time: POST /logging).
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    log: String,
    /// Worker threads (1 to compare with `envoy --concurrency 1`).
    #[arg(long, default_value_t = 0)]
    concurrency: usize,
}

fn bootstrap(args: &Args) -> Result<Bootstrap, String> {
    let mut b = match &args.config {
        Some(p) => Bootstrap::load(p)?,
        None => Bootstrap::default(),
    };
    let set = |slot: &mut String, v: &Option<String>| {
        if let Some(v) = v {
            *slot = v.clone();
        }
    };
    set(&mut b.xds, &args.xds);
    set(&mut b.xds_ca_file, &args.xds_ca_file);
    set(&mut b.admin, &args.admin);
    set(&mut b.metrics, &args.metrics);
    set(&mut b.access_log.format, &args.access_log);
    set(&mut b.access_log.path, &args.access_log_path);
    set(&mut b.node.namespace, &args.namespace);
    set(&mut b.node.workload_name, &args.workload_name);
    set(&mut b.node.service_account, &args.service_account);
    set(&mut b.node.cluster, &args.cluster_id);
    set(&mut b.node.network, &args.network);
    set(&mut b.node.locality, &args.locality);
    set(&mut b.node.kind, &args.kind);
    set(&mut b.node.id, &args.node_id);
    set(&mut b.listeners.outbound, &args.outbound);
    set(&mut b.listeners.inbound, &args.inbound);
    set(&mut b.identity.token_file, &args.identity_token_file);
    if let Some(ttl) = args.identity_ttl {
        b.identity.ttl_seconds = ttl;
    }
    if !args.ips.is_empty() {
        b.node.ips = args.ips.clone();
    }
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l.split_once('=').ok_or_else(|| format!("--label {l:?}: expected KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    b.node.labels.extend(labels);
    b.validate()?;
    Ok(b)
}

fn main() -> anyhow::Result<()> {
    // The compile helper (see trellis_proxy::COMPILE_WASM): compile, write, exit.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == trellis_proxy::COMPILE_WASM) {
        let (Some(input), Some(output)) = (argv.get(2), argv.get(3)) else {
            anyhow::bail!("usage: trellis-proxy {} IN.wasm OUT.cwasm", trellis_proxy::COMPILE_WASM);
        };
        return trellis_wasm_host::compile_to_file(input.as_ref(), output.as_ref());
    }
    let args = Args::parse();
    let (filter, reload) = tracing_subscriber::reload::Layer::new(
        EnvFilter::try_new(&args.log).map_err(|e| anyhow::anyhow!("--log {:?}: {e}", args.log))?,
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let b = bootstrap(&args).map_err(|e| anyhow::anyhow!(e))?;
    // One worker: a single-threaded runtime, like one Envoy worker (no work stealing).
    let mut rt = if args.concurrency == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if args.concurrency > 1 {
        rt.worker_threads(args.concurrency);
    }
    rt.enable_all().build()?.block_on(async move {
        let access_log = b.access_log().map_err(|e| anyhow::anyhow!(e))?;
        let proxy = Proxy::new(&b.node_id(), b.workload(), access_log);
        let configured_cache = args.wasm_cache_dir.clone().or(b.wasm_cache_dir.clone());
        if let Some(dir) = &configured_cache {
            let _ = proxy.wasm_cache_dir.set(dir.clone());
        }
        let set_level: trellis_proxy::admin::SetLogLevel = Arc::new(move |level: &str| {
            let f = EnvFilter::try_new(level).map_err(|e| format!("level {level:?}: {e}"))?;
            reload.reload(f).map_err(|e| e.to_string())
        });
        let admin = b.admin.parse().map_err(|e| anyhow::anyhow!("admin: {e}"))?;
        trellis_proxy::admin::serve(proxy.clone(), admin, set_level).await.map_err(|e| anyhow::anyhow!(e))?;
        let metrics = b.metrics.parse().map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
        trellis_proxy::metrics::serve(proxy.clone(), metrics).await.map_err(|e| anyhow::anyhow!(e))?;
        tracing::info!(node = %b.node_id(), xds = %b.xds, admin = %b.admin, metrics = %b.metrics, "trellis-proxy starting");
        if !b.identity.token_file.is_empty() {
            let id = trellis_proxy::identity::spawn(
                b.identity.clone(),
                &b.xds,
                &b.xds_ca_file,
                &b.node.namespace,
                &b.node.service_account,
            );
            let _ = proxy.mesh.identity.set(id);
        }
        tokio::spawn(trellis_proxy::xds::run(proxy.clone(), b.xds.clone(), b.xds_ca_file.clone(), b.node()));
        shutdown_signal().await;
        tracing::info!("shutting down: draining listeners");
        proxy.shutdown(trellis_proxy::listeners::DRAIN_TIME).await;
        // A temporary module cache (none was configured) goes with the process.
        if configured_cache.is_none()
            && let Some(dir) = proxy.wasm_cache_dir.get()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
