//! Rule 9 of the pass: preemption and reclaim for a gang that still waits,
//! by the rules of [`crate::planner::preemption`].

use std::collections::BTreeSet;

use crate::planner::FastMap as HashMap;

use super::World;
use crate::planner::preemption::{smallest_set, victim_order};
use crate::planner::request::{AllocationQuota, GangRequest, Preemption, RunningGang, released_in, releasing_reason};

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
            // Rule 1: its own allocation's lower-priority gangs, and other
            // allocations' borrowed gangs when it fits within its own grant.
            let own = self.running_in.get(&(pool_name.as_str(), a.name.as_str())).into_iter().flatten();
            let own = own.filter(|&&i| input.running[i].priority < g.preemption_priority);
            let reclaiming = guaranteed + released_quota >= need;
            let lent = self.borrowed_in.get(pool_name.as_str()).into_iter().flatten().filter(|_| reclaiming);
            let lent = lent.filter(|&&i| input.running[i].allocation != a.name);
            let mut candidates: Vec<usize> = own
                .chain(lent)
                .copied()
                .filter(|&i| !evicted.contains(&i) && !input.running[i].protected_at(now))
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
