//! Clusters at run time: their hosts (endpoints with health and outlier state), host
//! selection (priorities, localities, load-balancing policy), connection pools and circuit
//! breakers. A [`Cluster`] outlives configuration updates that do not change it, and a
//! [`Host`] outlives endpoint updates that keep its address, so pooled connections and
//! ejections survive pushes.

pub mod lb;
mod outlier;
pub mod pool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::config::{ClusterConfig, Discovery, LocalityGroup};

pub use lb::HashKey;
pub use outlier::OutlierState;
pub use pool::PoolError;

/// Where an upstream failure came from; decides the status and response flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// No host to send to (UH).
    NoHealthyHost,
    /// A circuit breaker is full (UO).
    Overflow,
    /// Connecting failed or timed out (UF).
    ConnectFailure,
    /// The connection failed mid-request (UC / UR).
    Reset,
}

impl UpstreamError {
    /// Envoy's response flag.
    pub fn flag(self) -> &'static str {
        match self {
            UpstreamError::NoHealthyHost => "UH",
            UpstreamError::Overflow => "UO",
            UpstreamError::ConnectFailure => "UF",
            UpstreamError::Reset => "UC",
        }
    }
}

/// Counters, as Envoy names them where it has a name.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub upstream_rq_total: AtomicU64,
    pub upstream_rq_pending_overflow: AtomicU64,
    pub upstream_cx_overflow: AtomicU64,
    pub upstream_rq_5xx: AtomicU64,
    pub upstream_cx_total: AtomicU64,
    pub upstream_cx_connect_fail: AtomicU64,
    pub outlier_detection_ejections_total: AtomicU64,
}

/// One endpoint.
#[derive(Debug)]
pub struct Host {
    /// `host:port` as configured.
    pub address: String,
    /// Resolved for IP endpoints; DNS endpoints resolve when connecting.
    pub socket: Option<SocketAddr>,
    pub weight: u32,
    pub locality: (String, String, String),
    pub active_requests: AtomicU32,
    pub rq_total: AtomicU64,
    pub rq_error: AtomicU64,
    pub outlier: std::sync::Mutex<OutlierState>,
    /// Until when the host is ejected, in nanoseconds since [`epoch`] (0: not ejected); read
    /// on every host selection without taking the outlier lock.
    ejected_until: AtomicU64,
    pub(crate) pool: pool::HostPool,
}

/// The process's time origin for atomically stored instants.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

impl Host {
    fn new(address: String, weight: u32, locality: (String, String, String)) -> Host {
        Host {
            socket: address.parse().ok(),
            address,
            weight,
            locality,
            active_requests: AtomicU32::new(0),
            rq_total: AtomicU64::new(0),
            rq_error: AtomicU64::new(0),
            outlier: std::sync::Mutex::new(OutlierState::default()),
            ejected_until: AtomicU64::new(0),
            pool: pool::HostPool::default(),
        }
    }

    /// A host for one request only (ORIGINAL_DST: the address the request names).
    pub fn ephemeral(address: &str) -> Host {
        Host::new(address.to_string(), 1, Default::default())
    }

    pub fn ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && nanos(now) < until
    }
}

/// Hosts of one priority level, by locality.
#[derive(Debug, Default)]
pub struct Priority {
    pub localities: Vec<(LocalityGroupInfo, Vec<Arc<Host>>)>,
}

#[derive(Debug, Clone)]
pub struct LocalityGroupInfo {
    pub locality: (String, String, String),
    pub weight: u32,
}

impl Priority {
    pub fn hosts(&self) -> impl Iterator<Item = &Arc<Host>> {
        self.localities.iter().flat_map(|(_, h)| h.iter())
    }
}

/// The hosts of a cluster at one moment, with what selection needs precomputed.
#[derive(Debug, Default)]
pub struct HostSet {
    pub priorities: Vec<Priority>,
    pub all: Vec<Arc<Host>>,
    pub(crate) ring: Option<lb::Ring>,
}

/// A cluster at run time.
#[derive(Debug)]
pub struct Cluster {
    pub config: Arc<ClusterConfig>,
    pub hosts: ArcSwap<HostSet>,
    endpoints: ArcSwap<Vec<LocalityGroup>>,
    pub stats: ClusterStats,
    pub(crate) rr: AtomicU64,
    pub active_requests: AtomicU32,
    pub pending_requests: AtomicU32,
    pub connections: AtomicU32,
    /// Signalled whenever a connection is returned or closed, for pending requests.
    pub(crate) freed: Notify,
    /// mTLS to the hosts (from `config.tls`).
    pub(crate) tls: Option<crate::tls::ClientSide>,
}

impl Cluster {
    pub fn new(config: Arc<ClusterConfig>, endpoints: Arc<Vec<LocalityGroup>>) -> Arc<Cluster> {
        Cluster::with_tls(config, endpoints, None)
    }

    pub fn with_tls(
        config: Arc<ClusterConfig>,
        endpoints: Arc<Vec<LocalityGroup>>,
        tls: Option<crate::tls::ClientSide>,
    ) -> Arc<Cluster> {
        let c = Arc::new(Cluster {
            tls,
            config,
            hosts: ArcSwap::from_pointee(HostSet::default()),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            stats: ClusterStats::default(),
            rr: AtomicU64::new(0),
            active_requests: AtomicU32::new(0),
            pending_requests: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            freed: Notify::new(),
        });
        c.set_endpoints(endpoints);
        c
    }

    /// Replaces the endpoints, keeping the state of hosts whose address stays.
    pub fn set_endpoints(&self, endpoints: Arc<Vec<LocalityGroup>>) {
        if **self.endpoints.load() == *endpoints && !self.hosts.load().all.is_empty() {
            return;
        }
        let old: HashMap<String, Arc<Host>> =
            self.hosts.load().all.iter().map(|h| (h.address.clone(), h.clone())).collect();
        let mut by_priority: std::collections::BTreeMap<u32, Priority> = std::collections::BTreeMap::new();
        let mut all = Vec::new();
        for g in endpoints.iter() {
            let hosts: Vec<Arc<Host>> = g
                .endpoints
                .iter()
                .map(|e| {
                    let address = e.address();
                    match old.get(&address) {
                        Some(h) if h.weight == e.weight && h.locality == g.locality => h.clone(),
                        _ => Arc::new(Host::new(address, e.weight, g.locality.clone())),
                    }
                })
                .collect();
            all.extend(hosts.iter().cloned());
            by_priority
                .entry(g.priority)
                .or_default()
                .localities
                .push((LocalityGroupInfo { locality: g.locality.clone(), weight: g.weight }, hosts));
        }
        let ring = lb::Ring::build(&self.config.lb, &all);
        self.hosts.store(Arc::new(HostSet { priorities: by_priority.into_values().collect(), all, ring }));
        self.endpoints.store(endpoints);
    }

    pub fn original_dst(&self) -> bool {
        matches!(self.config.discovery, Discovery::OriginalDst)
    }

    /// Takes a request slot (circuit breaker `max_requests`), or refuses with overflow.
    pub fn start_request(self: &Arc<Self>) -> Result<RequestGuard, UpstreamError> {
        let n = self.active_requests.fetch_add(1, Ordering::SeqCst);
        if n >= self.config.limits.max_requests {
            self.active_requests.fetch_sub(1, Ordering::SeqCst);
            self.stats.upstream_rq_pending_overflow.fetch_add(1, Ordering::Relaxed);
            return Err(UpstreamError::Overflow);
        }
        self.stats.upstream_rq_total.fetch_add(1, Ordering::Relaxed);
        Ok(RequestGuard { cluster: self.clone() })
    }

    /// Records a response (or failure) from `host` for outlier detection and counters.
    pub fn record(&self, host: &Host, status: Option<u16>) {
        let five_xx = status.is_none_or(|s| s >= 500);
        if five_xx {
            self.stats.upstream_rq_5xx.fetch_add(1, Ordering::Relaxed);
            host.rq_error.fetch_add(1, Ordering::Relaxed);
        }
        let Some(od) = &self.config.outlier else { return };
        let gateway = status.is_none_or(|s| matches!(s, 502..=504));
        let now = Instant::now();
        let total = self.hosts.load().all.len();
        let ejected_now = self.hosts.load().all.iter().filter(|h| h.ejected(now)).count();
        let mut st = host.outlier.lock().unwrap_or_else(|p| p.into_inner());
        if st.observe(od, five_xx, gateway, now, ejected_now, total) {
            host.ejected_until.store(st.ejected_until.map(nanos).unwrap_or(0).max(1), Ordering::Relaxed);
            self.stats.outlier_detection_ejections_total.fetch_add(1, Ordering::Relaxed);
            tracing::info!(cluster = %self.config.name, host = %host.address, "outlier detection ejected a host");
        }
    }
}

/// Holds one of the cluster's request slots until dropped.
#[derive(Debug)]
pub struct RequestGuard {
    cluster: Arc<Cluster>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.cluster.active_requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every cluster, by name.
pub type Clusters = HashMap<String, Arc<Cluster>>;

/// Builds the clusters for a new configuration, reusing those whose configuration did not
/// change (their connections and host state carry over).
pub fn rebuild(old: &Clusters, snapshot: &crate::config::Snapshot, mesh: &Arc<crate::tls::MeshState>) -> Clusters {
    snapshot
        .clusters
        .iter()
        .map(|(name, cfg)| {
            let endpoints = snapshot.cluster_endpoints(cfg);
            let cluster = match old.get(name) {
                Some(c) if *c.config == **cfg => {
                    c.set_endpoints(endpoints);
                    c.clone()
                }
                _ => {
                    // The SNI was checked when the configuration was converted.
                    let tls = cfg.tls.as_ref().and_then(|t| match crate::tls::ClientSide::new(mesh, t) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::error!(cluster = %name, error = %e, "cannot set up TLS");
                            None
                        }
                    });
                    Cluster::with_tls(cfg.clone(), endpoints, tls)
                }
            };
            (name.clone(), cluster)
        })
        .collect()
}
