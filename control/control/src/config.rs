//! Command-line configuration of `trellis-control`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use trellis_store::StoreConfig;

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
    #[arg(
        long,
        env = "TRELLIS_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
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
            Backend::Embedded => StoreConfig::Embedded {
                path: self.data_dir.join("store.redb"),
            },
            Backend::Etcd => StoreConfig::Etcd {
                endpoints: self.etcd_endpoints.clone(),
                prefix: self.etcd_prefix.clone(),
            },
        }
    }
}
