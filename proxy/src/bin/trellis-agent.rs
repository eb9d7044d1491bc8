//! trellis-agent: a workload certificate for the Envoy beside it, over SDS on a unix socket
//! (istio-agent's job; see `trellis_proxy::agent`).

use std::path::PathBuf;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use trellis_proxy::identity::IdentityConfig;

#[derive(Debug, Parser)]
#[command(name = "trellis-agent", version, about = "Workload certificates for Envoy over SDS (a unix socket)")]
struct Args {
    /// The control plane's certificate service (its xDS address), HOST:PORT.
    #[arg(long, env = "TRELLIS_XDS_ADDRESS")]
    ca: String,
    /// The CA of the control plane's xDS certificate (its <data-dir>/api-ca.pem): certificate
    /// requests (and their WorkloadToken) then go over TLS.
    #[arg(long, env = "TRELLIS_XDS_CA_FILE", default_value = "")]
    xds_ca_file: String,
    /// The WorkloadToken secret, in a file.
    #[arg(long)]
    token_file: PathBuf,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "default")]
    service_account: String,
    /// Certificate lifetime to ask for, seconds (0: the CA's default, 24 h).
    #[arg(long, default_value_t = 0)]
    ttl: u64,
    /// The unix socket Envoy's `sds-grpc` cluster points at.
    #[arg(long, default_value = "./var/run/trellis/sds.sock")]
    sds_socket: PathBuf,
    /// Log filter (error, warn, info, debug, or a tracing filter).
    #[arg(long, default_value = "info")]
    log: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(EnvFilter::new(&args.log)).with_writer(std::io::stderr).init();
    let config = IdentityConfig {
        token_file: args.token_file.to_string_lossy().into_owned(),
        ca_address: args.ca.clone(),
        ttl_seconds: args.ttl,
    };
    // Refuse a bad address or CA file now, not at every retry.
    trellis_proxy::control::endpoint(&args.ca, &args.xds_ca_file).map_err(anyhow::Error::msg)?;
    let identity =
        trellis_proxy::identity::spawn(config, &args.ca, &args.xds_ca_file, &args.namespace, &args.service_account);
    tokio::select! {
        r = trellis_proxy::agent::serve(identity, &args.sds_socket) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
