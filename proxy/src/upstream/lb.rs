//! Host selection: priority levels by health (Envoy's overprovisioning factor 1.4 and panic
//! threshold), locality weights when the cluster asks for them, then the policy: round robin,
//! least request (power of two choices), random, ring hash or Maglev over a request hash.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rand::Rng;

use super::{Cluster, Host, HostSet};
use crate::config::cluster::Lb;

/// A request's hash for consistent-hash policies (`None`: no policy produced one).
pub type HashKey = Option<u64>;

/// FNV-1a, then a 64-bit finalizer so nearby inputs spread across the ring. Stable across
/// runs and builds.
pub fn hash64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A consistent-hash table over the hosts.
#[derive(Debug)]
pub(crate) enum Ring {
    /// Sorted (hash, host index).
    RingHash(Vec<(u64, usize)>),
    /// Maglev lookup table of host indexes.
    Maglev(Vec<usize>),
}

impl Ring {
    pub fn build(lb: &Lb, hosts: &[Arc<Host>]) -> Option<Ring> {
        if hosts.is_empty() {
            return None;
        }
        match *lb {
            Lb::RingHash { min_ring_size } => {
                let total_weight: u64 = hosts.iter().map(|h| u64::from(h.weight)).sum();
                let size = min_ring_size.clamp(hosts.len() as u64, 1 << 20);
                let mut ring = Vec::new();
                for (i, h) in hosts.iter().enumerate() {
                    let replicas = (size * u64::from(h.weight)).div_ceil(total_weight.max(1)).max(1);
                    for k in 0..replicas {
                        ring.push((hash64(format!("{}_{k}", h.address).as_bytes()), i));
                    }
                }
                ring.sort_unstable();
                Some(Ring::RingHash(ring))
            }
            Lb::Maglev { table_size } => {
                let m = table_size.clamp(hosts.len() as u64, 1 << 20) as usize;
                let perms: Vec<(usize, usize)> = hosts
                    .iter()
                    .map(|h| {
                        let offset = (hash64(h.address.as_bytes()) % m as u64) as usize;
                        let skip =
                            (hash64(format!("{}#skip", h.address).as_bytes()) % (m as u64 - 1).max(1)) as usize + 1;
                        (offset, skip)
                    })
                    .collect();
                let mut next = vec![0usize; hosts.len()];
                let mut table = vec![usize::MAX; m];
                let mut filled = 0;
                'fill: loop {
                    for (i, (offset, skip)) in perms.iter().enumerate() {
                        let mut c = (offset + next[i] * skip) % m;
                        while table[c] != usize::MAX {
                            next[i] += 1;
                            c = (offset + next[i] * skip) % m;
                        }
                        table[c] = i;
                        next[i] += 1;
                        filled += 1;
                        if filled == m {
                            break 'fill;
                        }
                    }
                }
                Some(Ring::Maglev(table))
            }
            _ => None,
        }
    }

    /// Hosts in preference order for `key`, starting with the owner.
    fn lookup(&self, key: u64, n: usize) -> impl Iterator<Item = usize> + '_ {
        let (start, len) = match self {
            Ring::RingHash(r) => (r.partition_point(|(h, _)| *h < key) % r.len(), r.len()),
            Ring::Maglev(t) => ((key % t.len() as u64) as usize, t.len()),
        };
        (0..len.min(n.max(1) * 64)).map(move |i| match self {
            Ring::RingHash(r) => r[(start + i) % len].1,
            Ring::Maglev(t) => t[(start + i) % len],
        })
    }
}

/// Envoy's overprovisioning factor: a priority with ≥ 71.4% healthy hosts takes all traffic.
const OVERPROVISIONING: f64 = 1.4;

impl Cluster {
    /// Picks a host for a request.
    pub fn pick(&self, hash: HashKey) -> Option<Arc<Host>> {
        let set = self.hosts.load();
        if set.all.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut rng = rand::rng();
        if let (Some(key), Some(ring)) = (hash, &set.ring) {
            // Consistent hashing: the key's owner, or the next host on the ring that is not
            // ejected (all of them when every host is ejected: panic).
            let any_healthy = set.all.iter().any(|h| !h.ejected(now));
            return ring
                .lookup(key, set.all.len())
                .map(|i| &set.all[i])
                .find(|h| !any_healthy || !h.ejected(now))
                .cloned()
                .or_else(|| set.all.first().cloned());
        }
        let candidates = self.candidates(&set, now, &mut rng);
        if candidates.is_empty() {
            return None;
        }
        Some(match self.config.lb {
            Lb::LeastRequest if candidates.len() > 1 => {
                let a = &candidates[rng.random_range(0..candidates.len())];
                let b = &candidates[rng.random_range(0..candidates.len())];
                if b.active_requests.load(Ordering::Relaxed) < a.active_requests.load(Ordering::Relaxed) {
                    (*b).clone()
                } else {
                    (*a).clone()
                }
            }
            Lb::Random => (*candidates[rng.random_range(0..candidates.len())]).clone(),
            _ => {
                let weighted = candidates.iter().any(|h| h.weight != candidates[0].weight);
                if weighted {
                    let total: u64 = candidates.iter().map(|h| u64::from(h.weight)).sum();
                    let mut r = rng.random_range(0..total.max(1));
                    candidates
                        .iter()
                        .find(|h| {
                            let w = u64::from(h.weight);
                            if r < w {
                                true
                            } else {
                                r -= w;
                                false
                            }
                        })
                        .map(|h| (*h).clone())
                        .unwrap_or_else(|| candidates[0].clone())
                } else {
                    let n = self.rr.fetch_add(1, Ordering::Relaxed) as usize;
                    (*candidates[n % candidates.len()]).clone()
                }
            }
        })
    }

    /// The hosts the policy chooses among: the priority level drawn by health, its healthy
    /// hosts (all of them below the panic threshold), within a locality drawn by weight
    /// when the cluster is locality-weighted.
    fn candidates<'s>(&self, set: &'s HostSet, now: Instant, rng: &mut impl Rng) -> Vec<&'s Arc<Host>> {
        let health: Vec<(usize, usize)> =
            set.priorities.iter().map(|p| (p.hosts().filter(|h| !h.ejected(now)).count(), p.hosts().count())).collect();
        let scores: Vec<f64> = health
            .iter()
            .map(
                |(ok, all)| {
                    if *all == 0 { 0.0 } else { (*ok as f64 / *all as f64 * 100.0 * OVERPROVISIONING).min(100.0) }
                },
            )
            .collect();
        let total: f64 = scores.iter().sum::<f64>().min(100.0);
        let level = if total <= 0.0 {
            0
        } else {
            // Loads: each level takes what its health allows of what is left.
            let mut left = 100.0;
            let mut loads = Vec::with_capacity(scores.len());
            for s in &scores {
                let l = s.min(left);
                loads.push(l);
                left -= l;
            }
            let sum: f64 = loads.iter().sum();
            let mut r = rng.random_range(0.0..sum.max(f64::MIN_POSITIVE));
            loads
                .iter()
                .position(|l| {
                    if r < *l {
                        true
                    } else {
                        r -= l;
                        false
                    }
                })
                .unwrap_or(0)
        };
        let Some(priority) = set.priorities.get(level) else { return Vec::new() };
        let (ok, all) = health[level];
        let panic = all > 0 && (ok as f64 / all as f64 * 100.0) < self.config.panic_threshold;
        let usable = |h: &&Arc<Host>| panic || !h.ejected(now);
        if self.config.locality_weighted {
            let groups: Vec<(u64, Vec<&Arc<Host>>)> = priority
                .localities
                .iter()
                .map(|(info, hosts)| {
                    let usable: Vec<&Arc<Host>> = hosts.iter().filter(usable).collect();
                    let share = if hosts.is_empty() {
                        0
                    } else {
                        u64::from(info.weight) * usable.len() as u64 / hosts.len() as u64
                    };
                    (share, usable)
                })
                .filter(|(w, u)| *w > 0 && !u.is_empty())
                .collect();
            let total: u64 = groups.iter().map(|(w, _)| *w).sum();
            if total > 0 {
                let mut r = rng.random_range(0..total);
                for (w, hosts) in groups {
                    if r < w {
                        return hosts;
                    }
                    r -= w;
                }
            }
            return Vec::new();
        }
        priority.hosts().filter(usable).collect()
    }
}
