//! Locality-aware endpoint grouping for EDS, as Istio does it:
//!
//! - `localityLbSetting.distribute`: when the proxy's locality matches a `from` pattern, each
//!   locality group gets the share of traffic its `to` pattern names (split by endpoint weight
//!   when a pattern matches several localities); localities no pattern names get no traffic.
//! - failover (the default, and only when the cluster has outlier detection, since without it
//!   Envoy never leaves the first priority): priority 0 for the proxy's own region/zone/subzone,
//!   1 for the same zone, 2 for the same region, 3 for other regions — or, when a `failover`
//!   rule names the proxy's region, 3 for its `to` region and 4 for the rest.
//! - `failoverPriority`: an ordered list of labels (`key` or `key=value`); endpoints matching
//!   more of the proxy's values, in order, come first. Combined with `failover` when both are
//!   set. The topology labels (`topology.istio.io/network`, `topology.istio.io/cluster`,
//!   `topology.kubernetes.io/region`, `.../zone`, `topology.istio.io/subzone`) are derived from
//!   where the proxy and the endpoints run.
//!
//! Priorities are made contiguous from 0, as Envoy requires.

use std::collections::{BTreeMap, BTreeSet};

use trellis_model::registry::{Endpoint, Locality};
use trellis_model::spec::{Labels, LocalityLbSetting};

use crate::proxy::ProxyInfo;

/// Where traffic from the proxy should go first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalityPolicy<'a> {
    pub proxy: &'a ProxyInfo,
    pub setting: Option<&'a LocalityLbSetting>,
    /// The cluster has outlier detection (failover needs it).
    pub outlier_detection: bool,
}

/// One locality group of a cluster's endpoints.
#[derive(Debug, Clone)]
pub(crate) struct Group<'e> {
    pub locality: Locality,
    pub priority: u32,
    /// `None`: the sum of the endpoints' weights.
    pub weight: Option<u32>,
    pub endpoints: Vec<&'e Endpoint>,
}

impl Group<'_> {
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or_else(|| self.endpoints.iter().map(|e| e.weight).sum::<u32>().max(1))
    }
}

/// Result of [`group`]: the groups, and whether Envoy must weight localities (`distribute`).
#[derive(Debug, Clone)]
pub(crate) struct Grouped<'e> {
    pub groups: Vec<Group<'e>>,
    pub locality_weighted: bool,
}

/// `pattern` is `region[/zone[/subzone]]` with `*` matching any part.
fn locality_matches(locality: &Locality, pattern: &str) -> bool {
    let parts = [&locality.region, &locality.zone, &locality.subzone];
    pattern.split('/').zip(parts).all(|(p, v)| p == "*" || p == v)
}

/// 0 same subzone, 1 same zone, 2 same region, 3 elsewhere.
fn proximity(proxy: &Locality, ep: &Locality) -> u32 {
    if proxy.region != ep.region {
        3
    } else if proxy.zone != ep.zone {
        2
    } else if proxy.subzone != ep.subzone {
        1
    } else {
        0
    }
}

fn topology(labels: &Labels, locality: &Locality, network: &str, cluster: &str) -> Labels {
    let mut l = labels.clone();
    for (k, v) in [
        ("topology.istio.io/network", network),
        ("topology.istio.io/cluster", cluster),
        ("topology.kubernetes.io/region", &locality.region),
        ("topology.kubernetes.io/zone", &locality.zone),
        ("topology.istio.io/subzone", &locality.subzone),
    ] {
        if !v.is_empty() {
            l.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
    }
    l
}

/// Number of leading `failoverPriority` labels on which the endpoint matches the proxy.
fn label_priority(order: &[String], proxy: &Labels, ep: &Labels) -> u32 {
    let matched = order
        .iter()
        .take_while(|entry| match entry.split_once('=') {
            Some((k, v)) => ep.get(k).is_some_and(|e| e == v),
            None => proxy.get(entry.as_str()).is_some_and(|p| ep.get(entry.as_str()) == Some(p)),
        })
        .count();
    (order.len() - matched) as u32
}

/// Groups endpoints by (priority, locality) per the policy, in a stable order.
pub(crate) fn group<'e>(endpoints: &[&'e Endpoint], policy: Option<LocalityPolicy<'_>>) -> Grouped<'e> {
    let mut by: BTreeMap<(u32, &Locality), Vec<&'e Endpoint>> = BTreeMap::new();
    let settings = policy.map(|p| (p, p.setting.cloned().unwrap_or_default()));
    let enabled = settings.as_ref().is_some_and(|(_, s)| s.enabled != Some(false));
    let failover = enabled && settings.as_ref().is_some_and(|(p, s)| p.outlier_detection && s.distribute.is_empty());
    let proxy_labels =
        policy.map(|p| topology(&p.proxy.labels, &p.proxy.locality, &p.proxy.network, &p.proxy.cluster_id));

    for e in endpoints {
        let mut priority = 0;
        if let (true, Some((_, s)), Some(pl)) = (failover, &settings, &proxy_labels)
            && !s.failover_priority.is_empty()
        {
            let el = topology(&e.labels, &e.locality, &e.network, &e.cluster);
            priority = label_priority(&s.failover_priority, pl, &el);
        }
        by.entry((priority, &e.locality)).or_default().push(e);
    }
    let mut groups: Vec<Group<'e>> = by
        .into_iter()
        .map(|((priority, locality), endpoints)| Group {
            locality: locality.clone(),
            priority,
            weight: None,
            endpoints,
        })
        .collect();

    let Some((policy, setting)) = settings.filter(|_| enabled) else {
        return Grouped { groups, locality_weighted: false };
    };
    let proxy = &policy.proxy.locality;
    if !setting.distribute.is_empty() {
        let Some(rule) = setting.distribute.iter().find(|d| locality_matches(proxy, &d.from)) else {
            return Grouped { groups, locality_weighted: false };
        };
        let mut unmatched: BTreeSet<usize> = (0..groups.len()).collect();
        for (pattern, share) in &rule.to {
            let hit: Vec<usize> =
                unmatched.iter().copied().filter(|&i| locality_matches(&groups[i].locality, pattern)).collect();
            let total: u64 = hit.iter().map(|&i| u64::from(groups[i].weight())).sum();
            for i in hit {
                unmatched.remove(&i);
                let w = (u64::from(groups[i].weight()) * u64::from(*share)).div_ceil(total.max(1));
                groups[i].weight = Some(w.clamp(1, u64::from(u32::MAX)) as u32);
            }
        }
        // Localities the rule does not name get nothing.
        let mut i = 0;
        groups.retain(|_| {
            let keep = !unmatched.contains(&i);
            i += 1;
            keep
        });
        return Grouped { groups, locality_weighted: true };
    }
    if failover && (setting.failover_priority.is_empty() || !setting.failover.is_empty()) {
        for g in &mut groups {
            let mut p = proximity(proxy, &g.locality);
            if p == 3
                && let Some(rule) = setting.failover.iter().find(|f| f.from == proxy.region)
                && g.locality.region != rule.to
            {
                p = 4;
            }
            g.priority = g.priority * 5 + p;
        }
    }
    // Contiguous priorities from 0.
    let distinct: BTreeSet<u32> = groups.iter().map(|g| g.priority).collect();
    let rank: BTreeMap<u32, u32> = distinct.into_iter().zip(0..).collect();
    for g in &mut groups {
        g.priority = rank[&g.priority];
    }
    groups.sort_by(|a, b| (a.priority, &a.locality).cmp(&(b.priority, &b.locality)));
    Grouped { groups, locality_weighted: false }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_model::spec::{LocalityDistribute, LocalityFailover};

    fn ep(addr: &str, loc: &str) -> Endpoint {
        Endpoint { address: addr.into(), port: 80, locality: Locality::parse(loc), weight: 1, ..Default::default() }
    }

    fn proxy(loc: &str) -> ProxyInfo {
        ProxyInfo { locality: Locality::parse(loc), ..Default::default() }
    }

    fn summary(g: &Grouped<'_>) -> Vec<(u32, String, u32, usize)> {
        g.groups
            .iter()
            .map(|g| {
                let l = &g.locality;
                (g.priority, format!("{}/{}/{}", l.region, l.zone, l.subzone), g.weight(), g.endpoints.len())
            })
            .collect()
    }

    #[test]
    fn failover_orders_by_proximity_only_with_outlier_detection() {
        let eps = [ep("a", "r1/z1/s1"), ep("b", "r1/z1/s2"), ep("c", "r1/z2/s1"), ep("d", "r2/z1/s1")];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let p = proxy("r1/z1/s1");
        let with = group(&refs, Some(LocalityPolicy { proxy: &p, setting: None, outlier_detection: true }));
        assert_eq!(
            summary(&with),
            vec![
                (0, "r1/z1/s1".into(), 1, 1),
                (1, "r1/z1/s2".into(), 1, 1),
                (2, "r1/z2/s1".into(), 1, 1),
                (3, "r2/z1/s1".into(), 1, 1)
            ]
        );
        let without = group(&refs, Some(LocalityPolicy { proxy: &p, setting: None, outlier_detection: false }));
        assert!(without.groups.iter().all(|g| g.priority == 0), "{:?}", summary(&without));
        let disabled = LocalityLbSetting { enabled: Some(false), ..Default::default() };
        let off = group(&refs, Some(LocalityPolicy { proxy: &p, setting: Some(&disabled), outlier_detection: true }));
        assert!(off.groups.iter().all(|g| g.priority == 0));
    }

    #[test]
    fn failover_rule_prefers_the_named_region_and_priorities_are_contiguous() {
        let eps = [ep("a", "r2/z1/"), ep("b", "r3/z1/"), ep("c", "r4/z1/")];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let p = proxy("r1/z1/s1");
        let s = LocalityLbSetting {
            failover: vec![LocalityFailover { from: "r1".into(), to: "r3".into() }],
            ..Default::default()
        };
        let g = group(&refs, Some(LocalityPolicy { proxy: &p, setting: Some(&s), outlier_detection: true }));
        // r3 (3 → 0) first, the others (4 → 1) after.
        assert_eq!(
            summary(&g),
            vec![(0, "r3/z1/".into(), 1, 1), (1, "r2/z1/".into(), 1, 1), (1, "r4/z1/".into(), 1, 1)]
        );
    }

    #[test]
    fn distribute_splits_shares_and_drops_unnamed_localities() {
        let mut heavy = ep("b", "r1/z2/");
        heavy.weight = 3;
        let eps = [ep("a", "r1/z1/"), heavy, ep("c", "r1/z3/"), ep("d", "r2/z1/")];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let p = proxy("r1/z1/s1");
        let s = LocalityLbSetting {
            distribute: vec![LocalityDistribute {
                from: "r1/z1/*".into(),
                to: [("r1/z1/*".to_string(), 80), ("r1/z2/*".to_string(), 20), ("r9/*".to_string(), 5)].into(),
            }],
            ..Default::default()
        };
        let g = group(&refs, Some(LocalityPolicy { proxy: &p, setting: Some(&s), outlier_detection: false }));
        assert!(g.locality_weighted);
        assert_eq!(summary(&g), vec![(0, "r1/z1/".into(), 80, 1), (0, "r1/z2/".into(), 20, 1)]);
        // A proxy elsewhere is not affected.
        let other = proxy("r2/z1/s1");
        let g = group(&refs, Some(LocalityPolicy { proxy: &other, setting: Some(&s), outlier_detection: false }));
        assert!(!g.locality_weighted);
        assert_eq!(g.groups.len(), 4);
    }

    #[test]
    fn failover_priority_labels_rank_endpoints_then_regions() {
        let mut same_net = ep("a", "r2/z1/");
        same_net.network = "net1".into();
        let mut same_net_local = ep("b", "r1/z1/");
        same_net_local.network = "net1".into();
        let mut other_net = ep("c", "r1/z1/");
        other_net.network = "net2".into();
        let eps = [same_net, same_net_local, other_net];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let mut p = proxy("r1/z1/");
        p.network = "net1".into();
        let s = LocalityLbSetting { failover_priority: vec!["topology.istio.io/network".into()], ..Default::default() };
        let g = group(&refs, Some(LocalityPolicy { proxy: &p, setting: Some(&s), outlier_detection: true }));
        // Labels only: both net1 endpoints first, whatever their region.
        assert_eq!(
            summary(&g),
            vec![(0, "r1/z1/".into(), 1, 1), (0, "r2/z1/".into(), 1, 1), (1, "r1/z1/".into(), 1, 1)]
        );
        let both = LocalityLbSetting {
            failover_priority: vec!["topology.istio.io/network".into()],
            failover: vec![LocalityFailover { from: "r1".into(), to: "r2".into() }],
            ..Default::default()
        };
        let g = group(&refs, Some(LocalityPolicy { proxy: &p, setting: Some(&both), outlier_detection: true }));
        assert_eq!(
            summary(&g),
            vec![(0, "r1/z1/".into(), 1, 1), (1, "r2/z1/".into(), 1, 1), (2, "r1/z1/".into(), 1, 1)]
        );
        // A `key=value` entry compares with the given value instead of the proxy's.
        let fixed = LocalityLbSetting {
            failover_priority: vec!["topology.istio.io/network=net2".into()],
            ..Default::default()
        };
        let g = group(&refs, Some(LocalityPolicy { proxy: &p, setting: Some(&fixed), outlier_detection: true }));
        assert_eq!(g.groups[0].endpoints[0].network, "net2");
    }
}
