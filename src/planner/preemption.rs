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

use k8s_openapi::jiff::Timestamp;

pub use super::fair::dominant_share;
pub use super::request::{Preemption, Releasing, RunningGang, released_in};

#[cfg(test)]
mod tests;

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
