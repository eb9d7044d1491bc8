//! `trellis-control`: the Trellis control plane binary. Opens the store, creates the admin
//! token on first start, applies `--apply` paths, and serves the config API until SIGINT or
//! SIGTERM.

use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::net::TcpListener;
use trellis_control::api::{ApiState, router};
use trellis_control::auth::{Auth, load_or_create_token, token_path};
use trellis_control::config::Config;
use trellis_store::ResourceStore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    if config.allow_anonymous_loopback && !config.api_addr.ip().is_loopback() {
        bail!("--allow-anonymous-loopback needs a loopback --api-addr (got {})", config.api_addr);
    }
    let tls = config.api_uses_tls().map_err(anyhow::Error::msg)?;
    let xds_tls = config.xds_uses_tls().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let token = load_or_create_token(&config.data_dir)?;
    let store_config = config.store_config();
    let kv = trellis_store::open(&store_config).await.with_context(|| format!("opening the {store_config}"))?;
    let store = ResourceStore::new(kv);
    let (ca, ca_source) = trellis_control::ca::load(&store, &config.trust_domain, config.cacerts_dir.as_deref())
        .await
        .context("the mesh CA")?;
    tracing::info!(trust_domain = %ca.trust_domain(), source = %ca_source, roots = ca.roots().len(), "mesh CA ready");
    let ca = Arc::new(ca);

    for path in &config.apply {
        let summary = trellis_control::config_apply::apply_path(&store, path).await?;
        tracing::info!(path = %path.display(), created = summary.created, configured = summary.configured, unchanged = summary.unchanged, "applied configuration");
    }

    let listener =
        TcpListener::bind(config.api_addr).await.with_context(|| format!("binding the API to {}", config.api_addr))?;
    let addr = listener.local_addr()?;
    let auth = Arc::new(Auth::new(vec![token], config.allow_anonymous_loopback));
    auth.watch_tokens(store.clone());
    // xDS: config index → hub (debounced state) → ADS server; status on the debug port.
    let xds_listener =
        TcpListener::bind(config.xds_addr).await.with_context(|| format!("binding xDS to {}", config.xds_addr))?;
    let xds_addr = xds_listener.local_addr()?;
    // Proxies fetch uploaded wasm modules from the xDS port, at the address they reach it on.
    let module_server = config.xds_advertise_addr.or((!xds_addr.ip().is_unspecified()).then_some(xds_addr));
    let hub = trellis_xds::Hub::new(trellis_xds::HubOptions {
        debounce: std::time::Duration::from_millis(config.push_debounce_ms),
        default_cluster: config.cluster_id.clone(),
    });
    tokio::spawn(hub.clone().run(trellis_control::index::spawn(
        store.clone(),
        module_server,
        Some(ca.roots_pem().into()),
        ca.trust_domain(),
    )));
    let ads = trellis_xds::AdsServer::new(hub.clone()).service();
    // Workloads get their certificates on the xDS port too (CSR + WorkloadToken).
    let certs = trellis_control::certs::CertificateService::new(ca.clone(), store.clone());
    let modules = trellis_control::api::module_router(store.clone());
    let routes = tonic::service::Routes::from(modules.clone()).add_service(ads).add_service(certs);
    let xds_tls_config = if xds_tls {
        let given = config.xds_tls_cert.as_deref().zip(config.xds_tls_key.as_deref());
        Some(trellis_control::tls::server_config(&config.data_dir, given, &config.xds_tls_names())?)
    } else {
        None
    };
    tokio::spawn(async move {
        let served = match xds_tls_config {
            Some(cfg) => trellis_control::tls::serve_xds_tls(xds_listener, cfg, routes, modules).await,
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(xds_listener);
                // HTTP/1.1 as well, for module fetches (`GET /wasm/{sha256}`).
                let server = tonic::transport::Server::builder().accept_http1(true).add_routes(routes);
                server.serve_with_incoming(incoming).await.map_err(anyhow::Error::from)
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %format!("{e:#}"), "xDS server stopped");
        }
    });
    let debug_listener = TcpListener::bind(config.debug_addr)
        .await
        .with_context(|| format!("binding the debug port to {}", config.debug_addr))?;
    let debug_addr = debug_listener.local_addr()?;
    let debug = trellis_control::debug::router(hub.clone());
    tokio::spawn(async move { axum::serve(debug_listener, debug).await });
    let state = ApiState { store, auth, hub: Some(hub) };
    let tls_config = if tls {
        let given = config.api_tls_cert.as_deref().zip(config.api_tls_key.as_deref());
        Some(trellis_control::tls::server_config(&config.data_dir, given, &config.api_tls_names())?)
    } else {
        None
    };
    let scheme = if tls { "https" } else { "http" };
    tracing::info!(api = %format!("{scheme}://{addr}"), store = %store_config, "trellis-control ready");
    // The one place the control plane talks to a person: where things are and what to run.
    let token_file = token_path(&config.data_dir);
    let ca_env = match (tls, &config.api_tls_cert) {
        (true, None) => format!(" TRELLIS_CA_FILE={}", trellis_control::tls::ca_path(&config.data_dir).display()),
        (true, Some(_)) => " TRELLIS_CA_FILE=<the CA of your certificate>".to_string(),
        (false, _) => String::new(),
    };
    let xds_mode = match (xds_tls, &config.xds_tls_cert) {
        (true, None) => format!(
            "gRPC over TLS for {}; proxies trust {}",
            config.xds_tls_names().join(", "),
            trellis_control::tls::ca_path(&config.data_dir).display()
        ),
        (true, Some(_)) => "gRPC over TLS".to_string(),
        (false, _) => "plaintext gRPC".to_string(),
    };
    eprintln!(
        "\nTrellis control plane is up.\n  config API:  {scheme}://{addr}\n  xDS (ADS):   {xds_addr} ({xds_mode})\n  debug:       http://{debug_addr}/debug/syncz\n  store:       {store_config}\n  mesh CA:     trust domain {}, {ca_source}\n  admin token: {}\n\nTry:\n  export TRELLIS_SERVER={scheme}://{addr} TRELLIS_TOKEN_FILE={}{ca_env}\n  trellis get virtualservices -A\n  trellis apply -f examples/\n  trellis analyze\n",
        ca.trust_domain(),
        token_file.display(),
        token_file.display(),
    );
    let app = router(state);
    match tls_config {
        Some(cfg) => {
            trellis_control::tls::serve_tls(listener, cfg, app, shutdown()).await.context("serving the API")?
        }
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown()).await.context("serving the API")?,
    }
    tracing::info!("trellis-control stopped");
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
