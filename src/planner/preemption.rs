//! Preemption, reclaim and fair share: the parts of an admission pass that
//! take devices back from running gangs.
//!
//! Rules (see also the pass in [`super::placement`]):
//! 1. Candidates. For a waiting gang G of allocation A in pool P, a running
//!    gang R in P is a candidate when R is preemptible, not protected (its
//!    minimum run time after it was itself admitted by preemption is over),
//!    not already chosen as a victim this pass, and either
//!    - priority: R belongs to A and has a lower priority than G (never equal
//!      or higher), or
//!    - reclaim: R belongs to another allocation and runs on borrowed
//!      capacity, and G fits within A's own grant (never to admit another
//!      borrower).
//! 2. Order of candidates, most willing victim first: lower priority, then
//!    fewer devices, then most recently started, then key.
//! 3. Smallest set: if even every candidate together does not make room (the
//!    allocation's headroom for G, and a feasible placement on the devices
//!    they free plus devices already being released), nothing is preempted.
//!    Otherwise take the shortest prefix of the order that makes room, then
//!    drop from it, least willing first, every victim the rest can do
//!    without. No victim of the result can be spared.
//! 4. Devices already being released (pods of stopped gangs still
//!    terminating) count as free for this decision: a gang that will fit once
//!    they are gone waits and preempts nobody, so earlier victims are not
//!    followed by more while they shut down.
//! 5. Fair share between allocations, for idle capacity beyond grants: an
//!    allocation's dominant share is the largest, over its granted pools, of
//!    devices used ÷ devices granted. Borrowing gangs are admitted lowest
//!    dominant share first (then in queue order), and the share is updated
//!    after each admission.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

/// A gang that holds devices now.
#[derive(Clone, Debug)]
pub struct RunningGang {
    /// "namespace/name", unique.
    pub key: String,
    pub allocation: String,
    pub pool: String,
    /// Node index (into the pass's nodes) of each worker.
    pub nodes: Vec<usize>,
    pub per_worker: i64,
    pub priority: i32,
    /// When it was admitted.
    pub started: Timestamp,
    /// Admitted beyond its allocation's grant, on lent capacity.
    pub borrowed: bool,
    pub preemptible: bool,
    /// Neither preempted nor reclaimed before this time.
    pub protected_until: Option<Timestamp>,
}

impl RunningGang {
    pub fn devices(&self) -> i64 {
        self.per_worker * self.nodes.len() as i64
    }

    pub fn protected_at(&self, now: Timestamp) -> bool {
        !self.preemptible || self.protected_until.is_some_and(|t| now < t)
    }
}

/// Devices of a stopped gang's pods that are still terminating.
#[derive(Clone, Debug)]
pub struct Releasing {
    /// Node index, when the pod was bound.
    pub node: Option<usize>,
    pub allocation: String,
    pub pool: String,
    pub devices: i64,
}

/// Victims chosen for one waiting gang.
#[derive(Clone, Debug, PartialEq)]
pub struct Preemption {
    pub preemptor: String,
    pub pool: String,
    /// Keys, in candidate order.
    pub victims: Vec<String>,
    /// Victims taken from other allocations' borrowed capacity.
    pub reclaimed: Vec<String>,
}

/// Sort key of rule 2.
pub fn victim_order(r: &RunningGang) -> (i32, i64, Reverse<Timestamp>, String) {
    (r.priority, r.devices(), Reverse(r.started), r.key.clone())
}

/// Rule 3 over candidates already in order: `feasible` tells whether a set
/// (indexes into the candidates) makes room; it must be monotone (a superset
/// of a feasible set is feasible). Returns the chosen indexes in order, or
/// None when even all of them do not make room.
pub fn smallest_set(count: usize, mut feasible: impl FnMut(&[usize]) -> bool) -> Option<Vec<usize>> {
    let all: Vec<usize> = (0..count).collect();
    if count == 0 || !feasible(&all) {
        return None;
    }
    // Shortest feasible prefix, by bisection (feasibility grows with the prefix).
    let (mut lo, mut hi) = (1, count);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if feasible(&all[..mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut chosen: Vec<usize> = all[..lo].to_vec();
    // The prefix's last member is needed (the prefix without it does not make
    // room, nor does any subset of that); try the others, least willing first.
    for i in (0..lo.saturating_sub(1)).rev() {
        let without: Vec<usize> = chosen.iter().copied().filter(|&c| c != i).collect();
        if feasible(&without) {
            chosen = without;
        }
    }
    Some(chosen)
}

/// Rule 5: used ÷ granted, the largest over the granted pools (0 without grants).
pub fn dominant_share(used: &BTreeMap<String, i64>, granted: &BTreeMap<String, i64>) -> f64 {
    granted
        .iter()
        .filter(|(_, g)| **g > 0)
        .map(|(pool, g)| used.get(pool).copied().unwrap_or(0).max(0) as f64 / *g as f64)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn smallest_set_drops_victims_the_rest_can_do_without() {
        // Devices freed by each candidate; room needs 8 from one of them, or 4+4 from 0 and 1.
        let freed = [2, 2, 8, 1];
        let feasible = |s: &[usize]| s.iter().any(|&i| freed[i] >= 8) || s.iter().map(|&i| freed[i]).sum::<i64>() >= 12;
        assert_eq!(smallest_set(4, feasible), Some(vec![2]));
        assert_eq!(smallest_set(2, |s: &[usize]| s.len() == 2), Some(vec![0, 1]));
        assert_eq!(smallest_set(3, |_: &[usize]| false), None);
        assert_eq!(smallest_set(0, |_: &[usize]| true), None);
        // The most willing victims are kept when either would do.
        assert_eq!(smallest_set(3, |s: &[usize]| !s.is_empty()), Some(vec![0]));
    }

    #[test]
    fn dominant_share_is_the_largest_pool_share() {
        let m = |v: &[(&str, i64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect::<BTreeMap<_, _>>();
        assert_eq!(dominant_share(&m(&[("a", 32), ("b", 8)]), &m(&[("a", 64), ("b", 8)])), 1.0);
        assert_eq!(dominant_share(&m(&[("a", 16)]), &m(&[("a", 64), ("b", 0)])), 0.25);
        assert_eq!(dominant_share(&m(&[]), &m(&[])), 0.0);
    }

    proptest! {
        /// Victims free devices that add up; the result makes room and no
        /// member can be spared.
        #[test]
        fn smallest_set_is_sufficient_and_every_victim_needed(
            freed in proptest::collection::vec(1i64..20, 0..12),
            need in 1i64..120,
        ) {
            let feasible = |s: &[usize]| s.iter().map(|&i| freed[i]).sum::<i64>() >= need;
            match smallest_set(freed.len(), feasible) {
                None => prop_assert!(freed.iter().sum::<i64>() < need),
                Some(set) => {
                    prop_assert!(feasible(&set));
                    for &v in &set {
                        let rest: Vec<usize> = set.iter().copied().filter(|&c| c != v).collect();
                        prop_assert!(!feasible(&rest), "victim {v} of {set:?} was not needed");
                    }
                }
            }
        }
    }
}
