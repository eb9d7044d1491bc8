//! Command-line configuration of `trellis-control`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use trellis_store::StoreConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApiTls {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A durable file in the data directory (default; one control plane).
    Embedded,
    /// etcd v3 (several control planes, scale-out).
    Etcd,
}

/// Trellis control plane.
#[derive(Debug, Clone, Parser)]
#[command(name = "trellis-control", version, about)]
pub struct Config {
    /// Directory for the embedded store and the admin token.
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,

    /// Where configuration is stored.
    #[arg(long, value_enum, default_value_t = Backend::Embedded, env = "TRELLIS_STORE")]
    pub store: Backend,

    /// etcd endpoints, comma-separated (with --store etcd).
    #[arg(long, env = "TRELLIS_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix in etcd; control planes of one mesh share it, different meshes must not.
    #[arg(long, env = "TRELLIS_ETCD_PREFIX", default_value = "/trellis")]
    pub etcd_prefix: String,

    /// Address of the REST/JSON config API.
    #[arg(long, env = "TRELLIS_API_ADDR", default_value = "127.0.0.1:15080")]
    pub api_addr: SocketAddr,

    /// Accept API requests without a token. Development only; refused unless --api-addr is a
    /// loopback address.
    #[arg(long)]
    pub allow_anonymous_loopback: bool,

    /// TLS for the API: `auto` (TLS unless --api-addr is a loopback address), `on`, or `off`
    /// (plaintext; refused on a non-loopback address).
    #[arg(long, value_enum, default_value_t = ApiTls::Auto, env = "TRELLIS_API_TLS")]
    pub api_tls: ApiTls,

    /// PEM certificate chain for the API (default: issued from <data-dir>/api-ca.pem).
    #[arg(long, requires = "api_tls_key", env = "TRELLIS_API_TLS_CERT")]
    pub api_tls_cert: Option<PathBuf>,

    /// PEM private key for --api-tls-cert.
    #[arg(long, requires = "api_tls_cert", env = "TRELLIS_API_TLS_KEY")]
    pub api_tls_key: Option<PathBuf>,

    /// Extra names (DNS or IP) for the issued API certificate, e.g. the host name clients use.
    #[arg(long = "api-tls-san", value_name = "NAME")]
    pub api_tls_sans: Vec<String>,

    /// Address of the xDS (ADS) and certificate (CSR) gRPC server; proxies also fetch uploaded
    /// wasm modules from it.
    #[arg(long, env = "TRELLIS_XDS_ADDR", default_value = "127.0.0.1:15010")]
    pub xds_addr: SocketAddr,

    /// TLS for the xDS port: `auto` (TLS unless --xds-addr is a loopback address), `on`, or
    /// `off` (plaintext; refused on a non-loopback address). With TLS, gRPC (xDS, CSRs and
    /// their WorkloadTokens) is served over TLS only; module fetches (`GET /wasm/{sha256}`,
    /// content-addressed, checked against their sha256 by the proxy) also work in plaintext.
    #[arg(long, value_enum, default_value_t = ApiTls::Auto, env = "TRELLIS_XDS_TLS")]
    pub xds_tls: ApiTls,

    /// PEM certificate chain for the xDS port (default: issued from <data-dir>/api-ca.pem, the
    /// CA the API's certificate comes from; proxies trust that file).
    #[arg(long, requires = "xds_tls_key", env = "TRELLIS_XDS_TLS_CERT")]
    pub xds_tls_cert: Option<PathBuf>,

    /// PEM private key for --xds-tls-cert.
    #[arg(long, requires = "xds_tls_cert", env = "TRELLIS_XDS_TLS_KEY")]
    pub xds_tls_key: Option<PathBuf>,

    /// Extra names (DNS or IP) for the issued xDS certificate: the names proxies dial.
    #[arg(long = "xds-tls-san", value_name = "NAME")]
    pub xds_tls_sans: Vec<String>,

    /// The address proxies reach the xDS port on, when it binds a wildcard address; they also
    /// fetch uploaded wasm modules from it (`GET /wasm/{sha256}`).
    #[arg(long, env = "TRELLIS_XDS_ADVERTISE_ADDR")]
    pub xds_advertise_addr: Option<SocketAddr>,

    /// Address of the debug HTTP server (`/debug/syncz`, `/healthz`).
    #[arg(long, env = "TRELLIS_DEBUG_ADDR", default_value = "127.0.0.1:15014")]
    pub debug_addr: SocketAddr,

    /// How long a burst of config changes is collected before one push to proxies, in ms.
    #[arg(long, default_value_t = 100)]
    pub push_debounce_ms: u64,

    /// Cluster id of workloads defined by config (WorkloadEntry, ServiceEntry endpoints).
    #[arg(long, env = "TRELLIS_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// The mesh's SPIFFE trust domain: workloads get `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// A plugged-in CA in Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, `cert-chain.pem`), e.g. an intermediate of a root several clusters
    /// share. Default: a self-signed root, created at first start and kept in the store.
    #[arg(long, env = "TRELLIS_CACERTS_DIR")]
    pub cacerts_dir: Option<PathBuf>,

    /// Files or directories of configuration to apply at start (like `trellis apply -f`).
    #[arg(long = "apply", value_name = "PATH")]
    pub apply: Vec<PathBuf>,

    /// Log filter, e.g. `info` or `trellis_control=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,
}

/// `$XDG_DATA_HOME/trellis`, else `~/.local/share/trellis`, else `./.trellis`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("trellis");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/trellis"),
        None => PathBuf::from(".trellis"),
    }
}

impl Config {
    pub fn store_config(&self) -> StoreConfig {
        match self.store {
            Backend::Embedded => StoreConfig::Embedded { path: self.data_dir.join("store.redb") },
            Backend::Etcd => {
                StoreConfig::Etcd { endpoints: self.etcd_endpoints.clone(), prefix: self.etcd_prefix.clone() }
            }
        }
    }
}

impl Config {
    /// Whether the API serves TLS, or why the combination of flags is refused.
    pub fn api_uses_tls(&self) -> Result<bool, String> {
        uses_tls(self.api_tls, self.api_addr, self.api_tls_cert.is_some(), "--api-tls", "tokens")
    }

    /// Names the issued API certificate covers: the listen address (or, for an unspecified
    /// address, localhost and 127.0.0.1) plus --api-tls-san.
    pub fn api_tls_names(&self) -> Vec<String> {
        tls_names(&[self.api_addr], &self.api_tls_sans)
    }

    /// Whether the xDS port serves TLS, or why the combination of flags is refused.
    pub fn xds_uses_tls(&self) -> Result<bool, String> {
        let what = "workload tokens and certificates";
        uses_tls(self.xds_tls, self.xds_addr, self.xds_tls_cert.is_some(), "--xds-tls", what)
    }

    /// Names the issued xDS certificate covers: the listen and advertised addresses (or, for
    /// an unspecified one, localhost and 127.0.0.1) plus --xds-tls-san.
    pub fn xds_tls_names(&self) -> Vec<String> {
        let addrs: Vec<SocketAddr> = std::iter::once(self.xds_addr).chain(self.xds_advertise_addr).collect();
        tls_names(&addrs, &self.xds_tls_sans)
    }
}

/// TLS for a port at `addr`: `auto` is TLS unless the address is loopback (or a certificate
/// was given); plaintext on a network address is refused, naming what would travel in clear.
fn uses_tls(mode: ApiTls, addr: SocketAddr, cert_given: bool, flag: &str, what: &str) -> Result<bool, String> {
    let loopback = addr.ip().is_loopback();
    match mode {
        ApiTls::On => Ok(true),
        ApiTls::Auto => Ok(!loopback || cert_given),
        ApiTls::Off if loopback => Ok(false),
        ApiTls::Off => Err(format!(
            "{flag} off on {addr} would send {what} in clear over the network; use TLS (the default) or a loopback address"
        )),
    }
}

fn tls_names(addrs: &[SocketAddr], extra: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for ip in addrs.iter().map(SocketAddr::ip) {
        if ip.is_unspecified() || ip.is_loopback() {
            names.extend(["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()]);
        }
        if !ip.is_unspecified() {
            names.push(ip.to_string());
        }
    }
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("trellis-control").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn tls_is_on_off_loopback_and_plaintext_is_refused_on_the_network() {
        assert_eq!(parse(&[]).api_uses_tls(), Ok(false), "loopback default: plaintext for development");
        assert_eq!(parse(&["--api-addr", "0.0.0.0:15080"]).api_uses_tls(), Ok(true));
        assert_eq!(parse(&["--api-tls", "on"]).api_uses_tls(), Ok(true));
        let refused = parse(&["--api-addr", "10.1.2.3:15080", "--api-tls", "off"]).api_uses_tls().unwrap_err();
        assert!(refused.contains("in clear"), "{refused}");
        let names = parse(&["--api-addr", "0.0.0.0:15080", "--api-tls-san", "cp.example.com"]).api_tls_names();
        assert_eq!(names, vec!["127.0.0.1", "::1", "cp.example.com", "localhost"]);
    }

    #[test]
    fn xds_tls_is_on_off_loopback_and_plaintext_is_refused_on_the_network() {
        assert_eq!(parse(&[]).xds_uses_tls(), Ok(false), "loopback default: plaintext for development");
        assert_eq!(parse(&["--xds-addr", "0.0.0.0:15010"]).xds_uses_tls(), Ok(true));
        assert_eq!(parse(&["--xds-tls", "on"]).xds_uses_tls(), Ok(true));
        let refused = parse(&["--xds-addr", "10.1.2.3:15010", "--xds-tls", "off"]).xds_uses_tls().unwrap_err();
        assert!(refused.contains("in clear") && refused.contains("10.1.2.3:15010"), "{refused}");
        let names = parse(&[
            "--xds-addr",
            "0.0.0.0:15010",
            "--xds-advertise-addr",
            "10.0.0.5:15010",
            "--xds-tls-san",
            "cp.example.com",
        ])
        .xds_tls_names();
        assert_eq!(names, vec!["10.0.0.5", "127.0.0.1", "::1", "cp.example.com", "localhost"]);
        assert_eq!(parse(&["--xds-addr", "10.1.2.3:15010"]).xds_tls_names(), vec!["10.1.2.3"]);
    }
}
