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
//!
//! This file holds the types of running and stopping gangs, the rules' order
//! and smallest set, and the search of rule 9 of [`super::placement`] that
//! applies them within a pass. The dominant share of rule 5 and the order it
//! gives borrowers are in [`super::fair`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::jiff::Timestamp;

pub use super::fair::dominant_share;
use super::placement::{AllocationQuota, GangRequest, World, releasing_reason};

#[cfg(test)]
mod tests;

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

/// Devices of stopped runs still being released in a pool: per node, and the
/// part that is the allocation's own (its grant gets it back).
pub fn released_in(releasing: &[Releasing], pool: &str, allocation: &str) -> (BTreeMap<usize, i64>, i64) {
    let mut per_node: BTreeMap<usize, i64> = BTreeMap::new();
    let mut own = 0;
    for r in releasing.iter().filter(|r| r.pool == pool) {
        if let Some(n) = r.node {
            *per_node.entry(n).or_default() += r.devices;
        }
        if r.allocation == allocation {
            own += r.devices;
        }
    }
    (per_node, own)
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

impl<'a> World<'a> {
    /// Rule 9 for a gang that still waits: Some(Ok) with the victims
    /// chosen and the reason to show, Some(Err) when devices already being
    /// released will make room, None when preemption cannot help.
    pub(super) fn try_preempt(
        &mut self,
        g: &'a GangRequest,
        a: &'a AllocationQuota,
        headroom: &HashMap<(&'a str, &'a str), i64>,
    ) -> Option<Result<(Preemption, String), String>> {
        if g.workers == 0 || g.per_worker <= 0 {
            return None;
        }
        let input = self.input;
        let need = i64::from(g.workers).saturating_mul(g.per_worker);
        let mut tried: BTreeSet<&str> = BTreeSet::new();
        for pool_name in &g.pools {
            if !tried.insert(pool_name.as_str()) {
                continue;
            }
            let (Some(&with_borrowing), Some(&pi)) =
                (headroom.get(&(a.name.as_str(), pool_name.as_str())), self.pool_by_name.get(pool_name.as_str()))
            else {
                continue;
            };
            let guaranteed = with_borrowing - a.borrowing_in(pool_name);
            let reserved_for = a.dedicated.contains(pool_name).then_some(a.name.as_str());
            let (released, released_quota) = released_in(input.releasing, pool_name, &a.name);
            let now = input.now;
            let evicted = &self.evicted;
            let mut candidates: Vec<usize> = self
                .running_in
                .get(pool_name.as_str())
                .into_iter()
                .flatten()
                .copied()
                .filter(|&i| {
                    let r = &input.running[i];
                    let eligible = if r.allocation == a.name {
                        r.priority < g.preemption_priority
                    } else {
                        r.borrowed && guaranteed + released_quota >= need
                    };
                    eligible && !evicted.contains(&i) && !r.protected_at(now)
                })
                .collect();
            candidates.sort_by_cached_key(|&i| victim_order(&input.running[i]));
            let limit = if g.preemptible { with_borrowing } else { guaranteed };
            let mut feasible = |set: &[usize]| -> bool {
                let (mut own, mut reclaiming) = (0, false);
                for &c in set {
                    let r = &input.running[candidates[c]];
                    if r.allocation == a.name {
                        own += r.devices();
                    } else {
                        reclaiming = true;
                    }
                }
                let quota = if reclaiming { guaranteed } else { limit } + own + released_quota;
                if quota < need {
                    return false;
                }
                let mut extra = released.clone();
                for &c in set {
                    let r = &input.running[candidates[c]];
                    for &n in &r.nodes {
                        *extra.entry(n).or_default() += r.per_worker;
                    }
                }
                self.fits_with(pi, reserved_for, g, &extra)
            };
            if (!released.is_empty() || released_quota > 0) && feasible(&[]) {
                return Some(Err(releasing_reason(pool_name)));
            }
            let Some(chosen) = smallest_set(candidates.len(), &mut feasible) else {
                continue;
            };
            let victims: Vec<&RunningGang> = chosen.iter().map(|&c| &input.running[candidates[c]]).collect();
            for &c in &chosen {
                self.evicted.insert(candidates[c]);
            }
            let keys = |reclaimed: bool| -> Vec<String> {
                victims.iter().filter(|v| (v.allocation != a.name) == reclaimed).map(|v| v.key.clone()).collect()
            };
            let (preempted, reclaimed) = (keys(false), keys(true));
            let mut parts = Vec::new();
            if !preempted.is_empty() {
                parts.push(format!("preempting lower-priority {}", preempted.join(", ")));
            }
            if !reclaimed.is_empty() {
                parts.push(format!("reclaiming borrowed capacity from {}", reclaimed.join(", ")));
            }
            let res = &input.pools[pi].resource_name;
            let why = format!(
                "{} in pool {pool_name} to make room for {need} {res}; admitted once their workers have stopped",
                parts.join(" and ")
            );
            let victims = victims.iter().map(|v| v.key.clone()).collect();
            return Some(Ok((
                Preemption { preemptor: g.key.clone(), pool: pool_name.clone(), victims, reclaimed },
                why,
            )));
        }
        None
    }
}
