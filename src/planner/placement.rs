//! Gang admission and placement of training runs (ModelProjects).
//!
//! A gang is `workers` pods, each on its own node, each needing `per_worker`
//! devices of the chosen pool's resource. Admission is all or nothing: a gang
//! is admitted whole into one pool, or it waits and takes nothing.
//!
//! Rules (the order an admin and a tenant can predict):
//! 1. Order: gangs are considered in one global order: priority (higher
//!    first), then `queued_since` (older first), then key. A waiting gang's
//!    position is 1-based within its allocation's queue, in that order,
//!    counting only the gangs of that allocation that end the pass waiting.
//! 2. Allocation: a gang whose allocation is unknown or blocked waits with that
//!    reason (the allocation's own words, verbatim).
//! 3. Pools, in the gang's order of preference: the allocation needs a grant in
//!    the pool ("no grant in pool P") with headroom for `workers × per_worker`
//!    devices ("needs N <resource> in pool P: grant has H free"). Candidate
//!    nodes are the nodes reserved for the allocation when its grant in the
//!    pool is dedicated, else the pool's shared nodes (reserved by nobody):
//!    shared gangs never use reserved nodes. A placement needs `workers`
//!    distinct candidate nodes that each have at least `per_worker` free.
//! 4. Topology: a domain of a key is the set of nodes with the same label
//!    value; for a key of the pool's levels the values of the coarser levels
//!    count too (rack r1 of block b1 is not rack r1 of block b2). Nodes without
//!    the label are in no domain of that key.
//!    - Required: all workers in one domain of the key, or the gang waits,
//!      even when the pool as a whole has room.
//!    - Preferred (or no request): pack as tightly as possible. Try one domain
//!      per level, from the requested key's level (the pool's finest level
//!      without a request; a key that is not one of the pool's levels alone)
//!      to the pool's coarsest level. At a level, the best fit wins: the domain
//!      left with the fewest spare fitting nodes, then the first by name. When
//!      no single domain fits, spread: domains with the most fitting nodes
//!      first (coarsest tried level first, then finer within it), nodes in no
//!      domain last.
//!    - Within a domain: nodes whose free is closest to `per_worker` first
//!      (least leftover, against fragmentation), then by name.
//!    - Workers are numbered in topology order (block, rack, then node name),
//!      so neighbouring ranks sit close.
//! 5. Admission: the first pool that fits admits the gang. Each chosen node
//!    loses `per_worker` free devices and the allocation's headroom in the pool
//!    loses `workers × per_worker`, so later gangs of the same pass see it.
//!    Never a partial gang.
//! 6. Waiting: when no pool fits, the reason gives each pool's part in order,
//!    joined by "; falls back to ", with numbers: free devices and fitting
//!    nodes of the best domain (required topology) or of the whole candidate
//!    set, against what is needed.
//! 7. Backfill and the anti-starvation rule: a gang that cannot be admitted
//!    does not block later (smaller) gangs, of its own allocation or of others.
//!    Except: once the first waiting gang of an allocation has waited at least
//!    `starvation_after` (now − queued_since), no later gang of that
//!    allocation is admitted in this pass, so the capacity it frees over time
//!    is not taken by a stream of smaller gangs. Other allocations backfill
//!    as before: they have their own headroom.
//! 8. Rounds: first every gang within its allocation's own grant (the
//!    headroom without the borrowing limit), in the order of rule 1. Then
//!    the gangs still waiting whose allocation may borrow in one of their
//!    pools, on idle capacity up to the limit: the allocation with the lowest
//!    dominant share first (see [`super::preemption`]). Non-preemptible gangs
//!    never borrow: borrowed capacity must always be reclaimable.
//! 9. Then preemption and reclaim for the gangs still waiting, in the order
//!    of rule 1, by the rules of [`super::preemption`]. A gang that chose
//!    victims waits ("preempting ...") until their workers are gone, and is
//!    admitted by a later pass like any other.
//! 10. Waiting for release: in round 1, a gang that does not fit now but will
//!     once the devices of stopped runs are released (its victims' workers
//!     still terminating) holds the nodes and grant it will take. Gangs later
//!     in the order cannot backfill the part already free (which would make it
//!     preempt again), and it neither borrows nor preempts meanwhile.
//!
//! This file holds the pass types and the rounds (rules 1 to 3 and 5 to 8,
//! and the hold of rule 10); topology packing (rule 4) is in `topology.rs`
//! beside it, the preemption search (rule 9) in [`super::preemption`] beside
//! its rules, and the order of round 2 in [`super::fair`].

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::FastMap as HashMap;
use super::fair::Borrowers;
use super::inventory::NodeInfo;
use super::request::releasing_reason;
pub use super::request::{
    AllocationQuota, GangRequest, NodeFree, Outcome, PlacementPool, Preemption, Releasing, RunningGang, TopologyRequest,
};
pub use topology::PlacementCache;
use topology::{SetTally, Shortfall};

mod preempt;
mod topology;

#[cfg(test)]
mod tests;

pub struct PlacementInput<'a> {
    pub nodes: &'a [NodeInfo],
    pub pools: &'a [PlacementPool],
    pub allocations: &'a [AllocationQuota],
    pub queue: &'a [GangRequest],
    pub now: Timestamp,
    /// After waiting this long, the head of an allocation's queue stops
    /// backfill (the anti-starvation rule).
    pub starvation_after: SignedDuration,
    /// Gangs that hold devices now (candidates for preemption and reclaim).
    pub running: &'a [RunningGang],
    /// Devices of stopped gangs still being released.
    pub releasing: &'a [Releasing],
    /// Kept by the caller across passes over the same `nodes`: what a pass
    /// reuses (see [`PlacementCache`]). None builds everything.
    pub cache: Option<&'a PlacementCache>,
}

/// The result of one pass: every queued gang's outcome, and the running gangs
/// to stop so that waiting ones fit.
#[derive(Debug, Default)]
pub struct Pass {
    /// The outcome of `queue[i]` at `i` (no map keyed by strings: the caller
    /// already holds the gangs in that order).
    pub outcomes: Vec<Outcome>,
    pub preemptions: Vec<Preemption>,
}

/// Decides every queued gang in one pass: admitted (pool and a node per
/// worker) or waiting (position and reason), by key. See the module rules.
pub fn admit(input: &PlacementInput<'_>) -> BTreeMap<String, Outcome> {
    let pass = admit_pass(input);
    input.queue.iter().map(|g| g.key.clone()).zip(pass.outcomes).collect()
}

/// [`admit`], with the preemptions that the pass decided (rules 8 and 9).
pub fn admit_pass(input: &PlacementInput<'_>) -> Pass {
    let mut order: Vec<(usize, &GangRequest)> = input.queue.iter().enumerate().collect();
    order.sort_by(|(_, a), (_, b)| {
        b.priority.cmp(&a.priority).then(a.queued_since.cmp(&b.queued_since)).then_with(|| a.key.cmp(&b.key))
    });

    let mut allocations: HashMap<&str, &AllocationQuota> = HashMap::default();
    for a in input.allocations {
        allocations.entry(a.name.as_str()).or_insert(a);
    }
    let mut headroom: HashMap<(&str, &str), i64> = HashMap::default();
    for a in allocations.values() {
        for (pool, h) in &a.headroom {
            headroom.insert((a.name.as_str(), pool.as_str()), *h);
        }
    }
    let mut world = World::new(input);
    // Allocation -> the starving head of its queue, which stops backfill.
    let mut stopper: HashMap<&str, &GangRequest> = HashMap::default();
    // Allocations that already have a waiting gang in this pass.
    let mut has_waiting: BTreeSet<&str> = BTreeSet::new();
    // Each gang's decision, and whether it may still borrow or preempt (its
    // allocation may admit and no starving head stops it).
    let mut decided: Vec<(&GangRequest, Decision, bool)> = Vec::with_capacity(order.len());
    let queue_index: Vec<usize> = order.iter().map(|(i, _)| *i).collect();

    // Round 1: within each allocation's own grant.
    for (_, g) in order {
        let alloc = g.allocation.as_str();
        let (decision, open) = match allocations.get(alloc) {
            None => (Err(format!("allocation {alloc} not found")), false),
            Some(AllocationQuota { blocked: Some(why), .. }) => (Err(why.clone()), false),
            Some(a) => match stopper.get(alloc) {
                Some(head) => (
                    Err(format!(
                        "waiting behind {}, which has waited since {} (no backfill past a gang waiting longer than {:#})",
                        head.key, head.queued_since, input.starvation_after
                    )),
                    false,
                ),
                None => match world.try_pools(g, a, &mut headroom, false) {
                    Err(why) => match world.hold_for_release(g, a, &mut headroom) {
                        // Waiting for released devices: neither borrowing nor preemption.
                        Some(pool) => (Err(releasing_reason(pool)), false),
                        None => (Err(why), true),
                    },
                    admitted => (admitted, true),
                },
            },
        };
        if decision.is_err() && has_waiting.insert(alloc) {
            // The first waiting gang of its allocation: the head of its queue.
            if input.now.duration_since(g.queued_since) >= input.starvation_after {
                stopper.insert(alloc, g);
            }
        }
        decided.push((g, decision, open));
    }

    // Round 2: idle capacity beyond the grants, lowest dominant share first.
    let mut borrowers = Borrowers::default();
    for (i, (g, d, open)) in decided.iter().enumerate() {
        let a = allocations.get(g.allocation.as_str());
        let may_borrow = a.is_some_and(|a| g.pools.iter().any(|p| a.borrowing_in(p) > 0));
        if d.is_err() && *open && g.preemptible && may_borrow {
            borrowers.push(g.allocation.as_str(), i);
        }
    }
    while let Some((alloc, i)) = borrowers.pop(&allocations, &headroom) {
        let g = decided[i].0;
        if let Ok(placed) = world.try_pools(g, allocations[alloc], &mut headroom, true) {
            decided[i].1 = Ok(placed);
        }
    }

    // Round 3: preemption and reclaim for the gangs still waiting, in order.
    let mut preemptions = Vec::new();
    for (g, decision, open) in decided.iter_mut() {
        if decision.is_ok() || !*open {
            continue;
        }
        let a = allocations[g.allocation.as_str()];
        match world.try_preempt(g, a, &headroom) {
            Some(Ok((p, why))) => {
                *decision = Err(why);
                preemptions.push(p);
            }
            Some(Err(why)) => *decision = Err(why),
            None => {}
        }
    }

    let mut positions: HashMap<&str, u32> = HashMap::default();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; decided.len()];
    for ((g, decision, _), at) in decided.into_iter().zip(queue_index) {
        let outcome = match decision {
            Ok((pool, nodes, borrowed)) => Outcome::Admitted { pool, nodes, borrowed },
            Err(reason) => {
                let p = positions.entry(g.allocation.as_str()).or_insert(0);
                *p += 1;
                Outcome::Waiting { position: *p, reason }
            }
        };
        outcomes[at] = Some(outcome);
    }
    Pass { outcomes: outcomes.into_iter().map(|o| o.expect("every queued gang is decided")).collect(), preemptions }
}

/// Admitted (pool, node per worker, beyond the grant) or the reason to wait.
type Decision = Result<(String, Vec<String>, bool), String>;

/// The mutable state of one pass: free devices per node, and candidate sets
/// indexed by topology domain, built once per pool (and reserving allocation)
/// on first use.
pub(super) struct World<'a> {
    pub(super) input: &'a PlacementInput<'a>,
    pub(super) pool_by_name: HashMap<&'a str, usize>,
    /// Free devices per node index (0 for nodes no pool lists).
    free: Vec<i64>,
    /// Position of each node in name order: cheap name comparisons.
    rank: Vec<u32>,
    /// (pool index, reserving allocation or None for shared) -> index into `tallies`.
    set_ids: HashMap<(usize, Option<&'a str>), usize>,
    /// The candidate sets used in this pass, with their tallies.
    tallies: Vec<SetTally>,
    /// Per node index: (set index, position in the set) of every set holding it.
    member_of: Vec<Vec<(usize, u32)>>,
    /// Running gangs (indexes into `input.running`) per (pool, allocation):
    /// a gang's own candidates for preemption.
    pub(super) running_in: HashMap<(&'a str, &'a str), Vec<usize>>,
    /// Running gangs on borrowed capacity per pool: candidates for reclaim.
    pub(super) borrowed_in: HashMap<&'a str, Vec<usize>>,
    /// Running gangs chosen as victims in this pass.
    pub(super) evicted: BTreeSet<usize>,
}

impl<'a> World<'a> {
    fn new(input: &'a PlacementInput<'a>) -> Self {
        let mut pool_by_name = HashMap::default();
        for (i, p) in input.pools.iter().enumerate() {
            pool_by_name.entry(p.name.as_str()).or_insert(i);
        }
        // A node listed twice (it should not be) shares one count, the smaller.
        let mut free = vec![i64::MAX; input.nodes.len()];
        for p in input.pools {
            let listed = p.shared_nodes.iter().chain(p.reserved_nodes.values().flatten());
            for nf in listed {
                if let Some(f) = free.get_mut(nf.node) {
                    *f = (*f).min(nf.free);
                }
            }
        }
        for f in &mut free {
            if *f == i64::MAX {
                *f = 0;
            }
        }
        let rank = match input.cache {
            Some(c) => c.rank(input.nodes),
            None => topology::name_rank(input.nodes),
        };
        let mut running_in: HashMap<(&str, &str), Vec<usize>> = HashMap::default();
        let mut borrowed_in: HashMap<&str, Vec<usize>> = HashMap::default();
        for (i, r) in input.running.iter().enumerate() {
            running_in.entry((r.pool.as_str(), r.allocation.as_str())).or_default().push(i);
            if r.borrowed {
                borrowed_in.entry(r.pool.as_str()).or_default().push(i);
            }
        }
        World {
            input,
            pool_by_name,
            member_of: vec![Vec::new(); free.len()],
            free,
            rank,
            set_ids: HashMap::default(),
            tallies: Vec::new(),
            running_in,
            borrowed_in,
            evicted: BTreeSet::new(),
        }
    }

    /// Rules 3 to 6 for one gang whose allocation may admit.
    fn try_pools(
        &mut self,
        g: &'a GangRequest,
        a: &'a AllocationQuota,
        headroom: &mut HashMap<(&'a str, &'a str), i64>,
        borrow: bool,
    ) -> Decision {
        if g.workers == 0 {
            return Err("the gang has no workers".into());
        }
        if g.per_worker <= 0 {
            return Err(format!("the gang asks for {} devices per worker; it needs at least 1", g.per_worker));
        }
        let need = i64::from(g.workers).saturating_mul(g.per_worker);
        let mut parts: Vec<String> = Vec::new();
        let mut tried: BTreeSet<&str> = BTreeSet::new();
        for pool_name in &g.pools {
            if !tried.insert(pool_name.as_str()) {
                continue;
            }
            let Some(&with_borrowing) = headroom.get(&(a.name.as_str(), pool_name.as_str())) else {
                // The first pool's part reads as a sentence, fallbacks as "pool: detail".
                parts.push(if parts.is_empty() {
                    format!("no grant in pool {pool_name}")
                } else {
                    format!("{pool_name}: no grant")
                });
                continue;
            };
            let Some(&pi) = self.pool_by_name.get(pool_name.as_str()) else {
                parts.push(if parts.is_empty() {
                    format!("pool {pool_name} does not exist")
                } else {
                    format!("{pool_name}: no such pool")
                });
                continue;
            };
            let pool = &self.input.pools[pi];
            let left = if borrow { with_borrowing } else { with_borrowing - a.borrowing_in(pool_name) };
            if left < need {
                let (res, free) = (&pool.resource_name, left.max(0));
                parts.push(if parts.is_empty() {
                    format!("needs {need} {res} in pool {pool_name}: grant has {free} free")
                } else {
                    format!("{pool_name}: grant has {free} free, needs {need} {res}")
                });
                continue;
            }
            let reserved_for = a.dedicated.contains(pool_name).then_some(a.name.as_str());
            match self.place(pi, reserved_for, g) {
                Ok(chosen) => {
                    for &n in &chosen {
                        self.adjust_free(n, -g.per_worker);
                    }
                    let left = headroom.get_mut(&(a.name.as_str(), pool_name.as_str())).expect("looked up above");
                    *left -= need;
                    // Headroom is grant + borrowing limit - admitted: below the
                    // limit, the admitted total (this gang included) exceeds the grant.
                    let borrowed = *left < a.borrowing_in(pool_name);
                    let nodes = chosen.iter().map(|&n| self.input.nodes[n].name.clone()).collect();
                    return Ok((pool.name.clone(), nodes, borrowed));
                }
                Err(short) => {
                    let on = match reserved_for {
                        Some(alloc) => format!("the nodes reserved for {alloc}"),
                        None => "shared nodes".to_string(),
                    };
                    let (workers, q) = (g.workers, g.per_worker);
                    parts.push(match short {
                        Shortfall::Set { free, fitting } => format!(
                            "{pool_name}: {free} free devices on {on}, needs {need} ({fitting} of {workers} nodes with {q} free)"
                        ),
                        Shortfall::Domain {
                            short,
                            value: Some(value),
                            free,
                            fitting,
                        } => format!(
                            "{pool_name}: {free} free devices in {short} {value}, needs {need} ({fitting} of {workers} nodes with {q} free in one {short})"
                        ),
                        Shortfall::Domain {
                            short, value: None, ..
                        } => format!(
                            "{pool_name}: none of {on} has a {short} label, needs {need} ({workers} nodes with {q} free in one {short})"
                        ),
                    });
                }
            }
        }
        if parts.is_empty() {
            return Err("the gang names no pool".into());
        }
        Err(parts.join("; falls back to "))
    }

    /// Rule 10: a gang that does not fit now but will once the devices of
    /// stopped runs are released (its victims, typically) holds the nodes it
    /// will take and the grant it will use, so that a gang later in the order
    /// cannot backfill the part already free and make it preempt again.
    /// Returns the pool it waits in.
    fn hold_for_release(
        &mut self,
        g: &'a GangRequest,
        a: &'a AllocationQuota,
        headroom: &mut HashMap<(&'a str, &'a str), i64>,
    ) -> Option<&'a str> {
        if g.workers == 0 || g.per_worker <= 0 || self.input.releasing.is_empty() {
            return None;
        }
        let need = i64::from(g.workers).saturating_mul(g.per_worker);
        for pool_name in &g.pools {
            let (Some(&with_borrowing), Some(&pi)) =
                (headroom.get(&(a.name.as_str(), pool_name.as_str())), self.pool_by_name.get(pool_name.as_str()))
            else {
                continue;
            };
            let (released, released_quota) = super::preemption::released_in(self.input.releasing, pool_name, &a.name);
            if released.is_empty() {
                continue;
            }
            let guaranteed = with_borrowing - a.borrowing_in(pool_name);
            if guaranteed + released_quota < need {
                continue;
            }
            let reserved_for = a.dedicated.contains(pool_name).then_some(a.name.as_str());
            let Some(chosen) = self.place_with(pi, reserved_for, g, &released) else { continue };
            for &n in &chosen {
                let coming = released.get(&n).copied().unwrap_or(0);
                let held = (g.per_worker - coming).clamp(0, self.free[n].max(0));
                self.adjust_free(n, -held);
            }
            let key = (a.name.as_str(), pool_name.as_str());
            *headroom.get_mut(&key).expect("looked up above") -= (need - released_quota).max(0);
            return Some(pool_name.as_str());
        }
        None
    }
}
