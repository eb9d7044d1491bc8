//! Passive health (outlier detection) per host, as Envoy and Istio define it: consecutive
//! 5xx (and, when enforced, consecutive gateway errors: 502, 503, 504 and connection
//! failures) eject a host for `base_ejection_time × number of ejections` (capped at 300 s),
//! never more than `max_ejection_percent` of the cluster's hosts (at least one may go).

use std::time::{Duration, Instant};

use crate::config::cluster::Outlier;

const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

#[derive(Debug, Default, Clone)]
pub struct OutlierState {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub ejected_until: Option<Instant>,
    /// How many times the host has been ejected (the ejection time grows with it).
    pub ejections: u32,
}

impl OutlierState {
    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// Counts one response; returns whether this ejected the host.
    pub fn observe(
        &mut self,
        od: &Outlier,
        five_xx: bool,
        gateway: bool,
        now: Instant,
        ejected_now: usize,
        total: usize,
    ) -> bool {
        if !five_xx {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            return false;
        }
        self.consecutive_5xx += 1;
        if gateway {
            self.consecutive_gateway += 1;
        } else {
            self.consecutive_gateway = 0;
        }
        let trip = (od.enforce_5xx && od.consecutive_5xx > 0 && self.consecutive_5xx >= od.consecutive_5xx)
            || (od.enforce_gateway && od.consecutive_gateway > 0 && self.consecutive_gateway >= od.consecutive_gateway);
        if !trip || self.ejected(now) {
            return false;
        }
        let allowed = ejected_now == 0 || (ejected_now + 1) * 100 <= od.max_ejection_percent as usize * total.max(1);
        if !allowed {
            return false;
        }
        self.ejections += 1;
        let time = od.base_ejection.saturating_mul(self.ejections).min(MAX_EJECTION_TIME.max(od.base_ejection));
        self.ejected_until = Some(now + time);
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn od(n: u32, max_pct: u32) -> Outlier {
        Outlier {
            consecutive_5xx: n,
            enforce_5xx: true,
            consecutive_gateway: 0,
            enforce_gateway: false,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: max_pct,
        }
    }

    #[test]
    fn consecutive_errors_eject_for_a_growing_time() {
        let now = Instant::now();
        let mut s = OutlierState::default();
        assert!(!s.observe(&od(2, 100), true, false, now, 0, 2));
        assert!(s.observe(&od(2, 100), true, false, now, 0, 2));
        assert!(s.ejected(now + Duration::from_secs(29)) && !s.ejected(now + Duration::from_secs(31)));
        // Back, fails again: ejected twice as long.
        let later = now + Duration::from_secs(31);
        s.observe(&od(2, 100), true, false, later, 0, 2);
        assert!(s.observe(&od(2, 100), true, false, later, 0, 2));
        assert!(s.ejected(later + Duration::from_secs(59)) && !s.ejected(later + Duration::from_secs(61)));
    }

    #[test]
    fn a_success_resets_the_count_and_the_ejection_share_is_capped() {
        let now = Instant::now();
        let mut s = OutlierState::default();
        s.observe(&od(2, 100), true, false, now, 0, 4);
        s.observe(&od(2, 100), false, false, now, 0, 4);
        assert!(!s.observe(&od(2, 100), true, false, now, 0, 4), "the success reset the streak");
        // 1 of 4 already ejected, 25% max: a second may not go.
        assert!(!s.observe(&od(1, 25), true, false, now, 1, 4));
        // None ejected yet: at least one may go, whatever the share.
        assert!(s.observe(&od(1, 10), true, false, now, 0, 4));
    }
}
