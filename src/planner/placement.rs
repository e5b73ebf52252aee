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
//!     in the order cannot backfill the part already free (which would make
//!     it preempt again), and it neither borrows nor preempts meanwhile.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::inventory::NodeInfo;
use super::preemption::{self, Preemption, Releasing, RunningGang};

/// Free devices on one node that a gang may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFree {
    /// Index into [`PlacementInput::nodes`].
    pub node: usize,
    pub free: i64,
}

#[derive(Clone, Debug, Default)]
pub struct PlacementPool {
    pub name: String,
    pub resource_name: String,
    /// Topology label keys coarse to fine WITHOUT kubernetes.io/hostname (e.g.
    /// ["topology.sovereign.ai/block", "topology.sovereign.ai/rack"]).
    pub levels: Vec<String>,
    /// Ready nodes of the pool reserved by nobody, with their free devices.
    pub shared_nodes: Vec<NodeFree>,
    /// Nodes reserved by dedicated grants, per allocation name.
    pub reserved_nodes: BTreeMap<String, Vec<NodeFree>>,
}

#[derive(Clone, Debug, Default)]
pub struct AllocationQuota {
    pub name: String,
    /// None when the allocation may admit; otherwise why not (shown verbatim,
    /// e.g. "allocation lgai is Pending: window opens at ...").
    pub blocked: Option<String>,
    /// Per pool: devices the allocation may still admit (grant + borrowing
    /// limit − gangs already admitted there). Pools absent here are not granted.
    pub headroom: BTreeMap<String, i64>,
    /// Pools where its grant is Dedicated: gangs there use only its reserved nodes.
    pub dedicated: BTreeSet<String>,
    /// Per pool: the borrowing limit, the part of `headroom` beyond the grant
    /// (absent: 0). Only preemptible gangs borrow, after every gang that fits
    /// within its own grant.
    pub borrowing: BTreeMap<String, i64>,
    /// Per pool: the grant, for the dominant share (absent: not counted).
    pub granted: BTreeMap<String, i64>,
}

impl AllocationQuota {
    fn borrowing_in(&self, pool: &str) -> i64 {
        self.borrowing.get(pool).copied().unwrap_or(0).max(0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TopologyRequest {
    pub key: String,
    pub required: bool,
}

#[derive(Clone, Debug)]
pub struct GangRequest {
    /// "namespace/name", unique.
    pub key: String,
    pub allocation: String,
    /// Preference order.
    pub pools: Vec<String>,
    pub workers: u32,
    pub per_worker: i64,
    pub priority: i32,
    pub queued_since: Timestamp,
    pub topology: Option<TopologyRequest>,
    /// May borrow (and so be reclaimed); false also protects it once running.
    pub preemptible: bool,
    /// Compared with running gangs' priorities: the project's own priority
    /// (`priority` may carry a boost for ordering).
    pub preemption_priority: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `nodes[i]` is the node of worker i; all distinct.
    Admitted { pool: String, nodes: Vec<String> },
    /// 1-based position in its allocation's queue, and the reason in numbers.
    Waiting { position: u32, reason: String },
}

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
}

/// The result of one pass: every queued gang's outcome, and the running gangs
/// to stop so that waiting ones fit.
#[derive(Debug, Default)]
pub struct Pass {
    pub outcomes: BTreeMap<String, Outcome>,
    pub preemptions: Vec<Preemption>,
}

/// Decides every queued gang in one pass: admitted (pool and a node per
/// worker) or waiting (position and reason). See the module rules.
pub fn admit(input: &PlacementInput<'_>) -> BTreeMap<String, Outcome> {
    admit_pass(input).outcomes
}

/// [`admit`], with the preemptions that the pass decided (rules 8 and 9).
pub fn admit_pass(input: &PlacementInput<'_>) -> Pass {
    let mut order: Vec<&GangRequest> = input.queue.iter().collect();
    order.sort_by(|a, b| {
        b.priority.cmp(&a.priority).then(a.queued_since.cmp(&b.queued_since)).then_with(|| a.key.cmp(&b.key))
    });

    let mut allocations: HashMap<&str, &AllocationQuota> = HashMap::new();
    for a in input.allocations {
        allocations.entry(a.name.as_str()).or_insert(a);
    }
    let mut headroom: HashMap<(&str, &str), i64> = HashMap::new();
    for a in allocations.values() {
        for (pool, h) in &a.headroom {
            headroom.insert((a.name.as_str(), pool.as_str()), *h);
        }
    }
    let mut world = World::new(input);
    // Allocation -> the starving head of its queue, which stops backfill.
    let mut stopper: HashMap<&str, &GangRequest> = HashMap::new();
    // Allocations that already have a waiting gang in this pass.
    let mut has_waiting: BTreeSet<&str> = BTreeSet::new();
    // Each gang's decision, and whether it may still borrow or preempt (its
    // allocation may admit and no starving head stops it).
    let mut decided: Vec<(&GangRequest, Decision, bool)> = Vec::with_capacity(order.len());

    // Round 1: within each allocation's own grant.
    for g in order {
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
    let mut borrowers: BTreeMap<&str, std::collections::VecDeque<usize>> = BTreeMap::new();
    for (i, (g, d, open)) in decided.iter().enumerate() {
        let a = allocations.get(g.allocation.as_str());
        let may_borrow = a.is_some_and(|a| g.pools.iter().any(|p| a.borrowing_in(p) > 0));
        if d.is_err() && *open && g.preemptible && may_borrow {
            borrowers.entry(g.allocation.as_str()).or_default().push_back(i);
        }
    }
    while !borrowers.is_empty() {
        let share = |alloc: &str| -> f64 {
            let a = allocations[alloc];
            let used = a
                .granted
                .iter()
                .map(|(p, gr)| {
                    let left = headroom.get(&(alloc, p.as_str())).copied().unwrap_or(0);
                    (p.clone(), gr + a.borrowing_in(p) - left)
                })
                .collect();
            preemption::dominant_share(&used, &a.granted)
        };
        let (&alloc, _) = borrowers
            .iter()
            .min_by(|(a, qa), (b, qb)| share(a).total_cmp(&share(b)).then(qa[0].cmp(&qb[0])))
            .expect("not empty");
        let queue = borrowers.get_mut(alloc).expect("present");
        let i = queue.pop_front().expect("queues are never left empty");
        if queue.is_empty() {
            borrowers.remove(alloc);
        }
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

    let mut positions: HashMap<&str, u32> = HashMap::new();
    let mut outcomes = BTreeMap::new();
    for (g, decision, _) in decided {
        let outcome = match decision {
            Ok((pool, nodes)) => Outcome::Admitted { pool, nodes },
            Err(reason) => {
                let p = positions.entry(g.allocation.as_str()).or_insert(0);
                *p += 1;
                Outcome::Waiting { position: *p, reason }
            }
        };
        outcomes.insert(g.key.clone(), outcome);
    }
    Pass { outcomes, preemptions }
}

fn releasing_reason(pool: &str) -> String {
    format!("fits in pool {pool} once the workers of stopped runs are gone; waiting for them")
}

/// Admitted (pool, node per worker) or the reason to wait.
type Decision = Result<(String, Vec<String>), String>;

/// Sort key of a fitting node when a gang spreads: (fullness rank, domain) per
/// tried level coarse to fine, leftover devices, name rank, set position.
type SpreadKey = (Vec<(Reverse<u32>, u32)>, i64, u32, u32);

/// The mutable state of one pass: free devices per node, and candidate sets
/// indexed by topology domain, built once per pool (and reserving allocation)
/// on first use.
struct World<'a> {
    input: &'a PlacementInput<'a>,
    pool_by_name: HashMap<&'a str, usize>,
    /// Free devices per node index (0 for nodes no pool lists).
    free: Vec<i64>,
    /// Position of each node in name order: cheap name comparisons.
    rank: Vec<u32>,
    /// (pool index, reserving allocation or None for shared) -> candidate set.
    sets: HashMap<(usize, Option<&'a str>), CandidateSet>,
    /// Running gangs (indexes into `input.running`) per pool.
    running_in: HashMap<&'a str, Vec<usize>>,
    /// Running gangs chosen as victims in this pass.
    evicted: BTreeSet<usize>,
}

/// Candidate nodes of one pool for one kind of gang, with their domains.
struct CandidateSet {
    /// Node indexes.
    nodes: Vec<usize>,
    /// One index per pool level, coarse to fine.
    levels: Vec<LevelIndex>,
    /// Requested keys that are not pool levels.
    extra: HashMap<String, LevelIndex>,
}

/// The domains of one topology key within a candidate set.
struct LevelIndex {
    /// Last segment of the key, for messages ("rack").
    short: String,
    /// Domain of each set member (by position), None without the label.
    of: Vec<Option<u32>>,
    /// Domains in name order (coarser values first).
    domains: Vec<Domain>,
}

struct Domain {
    /// The label value at this level.
    value: String,
    /// Positions in the candidate set.
    members: Vec<u32>,
}

/// Why a pool's candidate set cannot hold the gang.
enum Shortfall {
    /// Too few fitting nodes in the whole set.
    Set { free: i64, fitting: usize },
    /// Required topology: the best domain (most fitting nodes) is too small.
    Domain { short: String, value: Option<String>, free: i64, fitting: usize },
}

impl<'a> World<'a> {
    fn new(input: &'a PlacementInput<'a>) -> Self {
        let mut pool_by_name = HashMap::new();
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
        let mut by_name: Vec<usize> = (0..input.nodes.len()).collect();
        by_name.sort_by(|a, b| input.nodes[*a].name.cmp(&input.nodes[*b].name));
        let mut rank = vec![0u32; input.nodes.len()];
        for (r, i) in by_name.into_iter().enumerate() {
            rank[i] = r as u32;
        }
        let mut running_in: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, r) in input.running.iter().enumerate() {
            running_in.entry(r.pool.as_str()).or_default().push(i);
        }
        World { input, pool_by_name, free, rank, sets: HashMap::new(), running_in, evicted: BTreeSet::new() }
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
                        self.free[n] -= g.per_worker;
                    }
                    *headroom.get_mut(&(a.name.as_str(), pool_name.as_str())).expect("looked up above") -= need;
                    let nodes = chosen.iter().map(|&n| self.input.nodes[n].name.clone()).collect();
                    return Ok((pool.name.clone(), nodes));
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

    /// Rule 9 for a gang that still waits: Some(Ok) with the victims
    /// chosen and the reason to show, Some(Err) when devices already being
    /// released will make room, None when preemption cannot help.
    fn try_preempt(
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
            let mut released: BTreeMap<usize, i64> = BTreeMap::new();
            let mut released_quota = 0;
            for r in input.releasing.iter().filter(|r| &r.pool == pool_name) {
                if let Some(n) = r.node {
                    *released.entry(n).or_default() += r.devices;
                }
                if r.allocation == a.name {
                    released_quota += r.devices;
                }
            }
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
            candidates.sort_by_cached_key(|&i| preemption::victim_order(&input.running[i]));
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
            let Some(chosen) = preemption::smallest_set(candidates.len(), &mut feasible) else {
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
            let mut released: BTreeMap<usize, i64> = BTreeMap::new();
            let mut released_quota = 0;
            for r in self.input.releasing.iter().filter(|r| &r.pool == pool_name) {
                if let Some(n) = r.node {
                    *released.entry(n).or_default() += r.devices;
                }
                if r.allocation == a.name {
                    released_quota += r.devices;
                }
            }
            if released.is_empty() {
                continue;
            }
            let guaranteed = with_borrowing - a.borrowing_in(pool_name);
            if guaranteed + released_quota < need {
                continue;
            }
            let reserved_for = a.dedicated.contains(pool_name).then_some(a.name.as_str());
            for (&n, &d) in &released {
                self.free[n] += d;
            }
            let placed = self.place(pi, reserved_for, g);
            for (&n, &d) in &released {
                self.free[n] -= d;
            }
            let Ok(chosen) = placed else { continue };
            for &n in &chosen {
                let coming = released.get(&n).copied().unwrap_or(0);
                let held = (g.per_worker - coming).clamp(0, self.free[n].max(0));
                self.free[n] -= held;
            }
            let key = (a.name.as_str(), pool_name.as_str());
            *headroom.get_mut(&key).expect("looked up above") -= (need - released_quota).max(0);
            return Some(pool_name.as_str());
        }
        None
    }

    /// Whether the gang could be placed in the pool with `extra` devices free
    /// on some nodes (the state is left as it was).
    fn fits_with(
        &mut self,
        pool: usize,
        reserved_for: Option<&'a str>,
        g: &GangRequest,
        extra: &BTreeMap<usize, i64>,
    ) -> bool {
        for (&n, &d) in extra {
            self.free[n] += d;
        }
        let ok = self.place(pool, reserved_for, g).is_ok();
        for (&n, &d) in extra {
            self.free[n] -= d;
        }
        ok
    }

    /// Rule 4: `workers` distinct nodes of the candidate set, in worker order.
    fn place(&mut self, pool: usize, reserved_for: Option<&'a str>, g: &GangRequest) -> Result<Vec<usize>, Shortfall> {
        let input = self.input;
        let p = &input.pools[pool];
        let set = self.sets.entry((pool, reserved_for)).or_insert_with(|| {
            let listed = match reserved_for {
                Some(alloc) => p.reserved_nodes.get(alloc).map(Vec::as_slice),
                None => Some(p.shared_nodes.as_slice()),
            };
            CandidateSet::new(input.nodes, listed.unwrap_or(&[]), &p.levels)
        });
        let wanted = g.topology.as_ref();
        let level_of_key = wanted.and_then(|t| p.levels.iter().position(|l| *l == t.key));
        if let (Some(t), None) = (wanted, level_of_key)
            && !set.extra.contains_key(&t.key)
        {
            let idx = LevelIndex::new(input.nodes, &set.nodes, std::slice::from_ref(&t.key));
            set.extra.insert(t.key.clone(), idx);
        }
        let set: &CandidateSet = set;
        let free = &self.free;
        let rank = &self.rank;
        let q = g.per_worker;
        let workers = g.workers as usize;

        let fits: Vec<bool> = set.nodes.iter().map(|&n| free[n] >= q).collect();
        let fitting = fits.iter().filter(|f| **f).count();
        if fitting < workers {
            let free = set.nodes.iter().map(|&n| free[n].max(0)).sum();
            return Err(Shortfall::Set { free, fitting });
        }
        let requested: Option<&LevelIndex> = wanted.map(|t| match level_of_key {
            Some(i) => &set.levels[i],
            None => &set.extra[&t.key],
        });
        // Levels to try, fine to coarse.
        let tried: Vec<&LevelIndex> = match (wanted, level_of_key) {
            (Some(t), _) if t.required => vec![requested.expect("requested")],
            (Some(_), Some(i)) => set.levels[..=i].iter().rev().collect(),
            (Some(_), None) => vec![requested.expect("requested")],
            (None, _) => set.levels.iter().rev().collect(),
        };
        let mut counts: Vec<Vec<u32>> = Vec::with_capacity(tried.len());
        for level in &tried {
            let c = level.fitting_counts(&fits);
            let best = c
                .iter()
                .enumerate()
                .filter(|(_, n)| **n as usize >= workers)
                .min_by_key(|(d, n)| (**n, *d))
                .map(|(d, _)| d);
            if let Some(d) = best {
                let mut members: Vec<u32> =
                    level.domains[d].members.iter().copied().filter(|&m| fits[m as usize]).collect();
                members.sort_by_key(|&m| {
                    let n = set.nodes[m as usize];
                    (free[n] - q, rank[n])
                });
                members.truncate(workers);
                return Ok(set.worker_order(members, rank));
            }
            counts.push(c);
        }
        if wanted.is_some_and(|t| t.required) {
            let level = tried[0];
            let c = &counts[0];
            let domain_free = |d: usize| -> i64 {
                level.domains[d].members.iter().map(|&m| free[set.nodes[m as usize]].max(0)).sum()
            };
            let best = (0..level.domains.len()).max_by_key(|&d| (c[d], domain_free(d), Reverse(d)));
            return Err(match best {
                Some(d) => Shortfall::Domain {
                    short: level.short.clone(),
                    value: Some(level.domains[d].value.clone()),
                    free: domain_free(d),
                    fitting: c[d] as usize,
                },
                None => Shortfall::Domain { short: level.short.clone(), value: None, free: 0, fitting: 0 },
            });
        }
        // Spread: coarsest tried level first, fullest domains first.
        let mut keyed: Vec<SpreadKey> = (0..set.nodes.len())
            .filter(|&m| fits[m])
            .map(|m| {
                let n = set.nodes[m];
                let path = tried
                    .iter()
                    .zip(&counts)
                    .rev()
                    .map(|(level, c)| match level.of[m] {
                        Some(d) => (Reverse(c[d as usize]), d),
                        None => (Reverse(0), u32::MAX),
                    })
                    .collect();
                (path, free[n] - q, rank[n], m as u32)
            })
            .collect();
        keyed.sort_unstable();
        let members = keyed.into_iter().take(workers).map(|k| k.3).collect();
        Ok(set.worker_order(members, rank))
    }
}

impl CandidateSet {
    fn new(nodes: &[NodeInfo], listed: &[NodeFree], levels: &[String]) -> Self {
        let mut seen = BTreeSet::new();
        let members: Vec<usize> =
            listed.iter().map(|nf| nf.node).filter(|&n| n < nodes.len() && seen.insert(n)).collect();
        let levels = (0..levels.len()).map(|d| LevelIndex::new(nodes, &members, &levels[..=d])).collect();
        CandidateSet { nodes: members, levels, extra: HashMap::new() }
    }

    /// Node indexes of the chosen positions, in topology order (domains of
    /// the pool levels coarse to fine, then node name).
    fn worker_order(&self, mut members: Vec<u32>, rank: &[u32]) -> Vec<usize> {
        members.sort_by_cached_key(|&m| {
            let path: Vec<u32> = self.levels.iter().map(|l| l.of[m as usize].unwrap_or(u32::MAX)).collect();
            (path, rank[self.nodes[m as usize]])
        });
        members.into_iter().map(|m| self.nodes[m as usize]).collect()
    }
}

impl LevelIndex {
    /// Domains of `path.last()` among `members`, told apart by the values of
    /// every key of `path` (coarse to fine).
    fn new(nodes: &[NodeInfo], members: &[usize], path: &[String]) -> Self {
        let key = path.last().expect("a level has a key");
        let mut by_path: BTreeMap<Vec<&str>, Vec<u32>> = BTreeMap::new();
        for (m, &n) in members.iter().enumerate() {
            let labels = &nodes[n].labels;
            if !labels.contains_key(key) {
                continue;
            }
            let values = path.iter().map(|k| labels.get(k).map_or("", String::as_str)).collect();
            by_path.entry(values).or_default().push(m as u32);
        }
        let mut of = vec![None; members.len()];
        let domains = by_path
            .into_iter()
            .enumerate()
            .map(|(d, (values, ms))| {
                for &m in &ms {
                    of[m as usize] = Some(d as u32);
                }
                Domain { value: values.last().copied().unwrap_or_default().to_string(), members: ms }
            })
            .collect();
        LevelIndex { short: key.rsplit('/').next().unwrap_or(key).to_string(), of, domains }
    }

    /// Fitting nodes per domain.
    fn fitting_counts(&self, fits: &[bool]) -> Vec<u32> {
        let mut c = vec![0u32; self.domains.len()];
        for (m, d) in self.of.iter().enumerate() {
            if let Some(d) = d
                && fits[m]
            {
                c[*d as usize] += 1;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::inventory::tests::node;
    use proptest::prelude::*;

    const GPU: &str = "nvidia.com/gpu";
    const ATOM: &str = "rebellions.ai/ATOM";
    const BLOCK: &str = "topology.sovereign.ai/block";
    const RACK: &str = "topology.sovereign.ai/rack";

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    /// Pools `atom` (NPU) and `h200` (GPU), both with levels block and rack,
    /// empty until nodes are added.
    #[derive(Clone)]
    struct World {
        nodes: Vec<NodeInfo>,
        pools: Vec<PlacementPool>,
        allocs: Vec<AllocationQuota>,
        now: Timestamp,
        starvation_after: SignedDuration,
        running: Vec<RunningGang>,
        releasing: Vec<Releasing>,
    }

    impl World {
        fn new() -> Self {
            let pool = |name: &str, resource: &str| PlacementPool {
                name: name.into(),
                resource_name: resource.into(),
                levels: vec![BLOCK.into(), RACK.into()],
                ..Default::default()
            };
            World {
                nodes: vec![],
                pools: vec![pool("atom", ATOM), pool("h200", GPU)],
                allocs: vec![],
                now: t(1000),
                starvation_after: SignedDuration::from_hours(1),
                running: vec![],
                releasing: vec![],
            }
        }

        /// Adds nodes named `<rack>-<i>` with these free devices to the pool,
        /// shared or reserved for `reserved_for`.
        fn add(&mut self, pool: &str, block: &str, rack: &str, free: &[i64], reserved_for: Option<&str>) {
            let p = self.pools.iter().position(|p| p.name == pool).unwrap();
            let resource = self.pools[p].resource_name.clone();
            for (i, f) in free.iter().enumerate() {
                let name = format!("{rack}-{i}");
                self.nodes.push(node(&name, &[(BLOCK, block), (RACK, rack)], &resource, 8, true));
                let nf = NodeFree { node: self.nodes.len() - 1, free: *f };
                match reserved_for {
                    Some(a) => self.pools[p].reserved_nodes.entry(a.into()).or_default().push(nf),
                    None => self.pools[p].shared_nodes.push(nf),
                }
            }
        }

        fn grant(&mut self, alloc: &str, pool: &str, headroom: i64, dedicated: bool) {
            if !self.allocs.iter().any(|a| a.name == alloc) {
                self.allocs.push(AllocationQuota { name: alloc.into(), ..Default::default() });
            }
            let a = self.allocs.iter_mut().find(|a| a.name == alloc).unwrap();
            a.headroom.insert(pool.into(), headroom);
            if dedicated {
                a.dedicated.insert(pool.into());
            }
        }

        /// A gang running on these nodes: their free devices drop by `per_worker`.
        fn start(&mut self, key: &str, alloc: &str, pool: &str, nodes: &[&str], per_worker: i64, priority: i32) {
            let idx: Vec<usize> =
                nodes.iter().map(|n| self.nodes.iter().position(|x| x.name == *n).expect("node")).collect();
            for p in &mut self.pools {
                for nf in p.shared_nodes.iter_mut().chain(p.reserved_nodes.values_mut().flatten()) {
                    if idx.contains(&nf.node) {
                        nf.free -= per_worker;
                    }
                }
            }
            let started = t(900 + self.running.len() as i64);
            self.running.push(RunningGang {
                key: key.into(),
                allocation: alloc.into(),
                pool: pool.into(),
                nodes: idx,
                per_worker,
                priority,
                started,
                borrowed: false,
                preemptible: true,
                protected_until: None,
            });
        }

        fn pass(&self, queue: &[GangRequest]) -> Pass {
            admit_pass(&PlacementInput {
                nodes: &self.nodes,
                pools: &self.pools,
                allocations: &self.allocs,
                queue,
                now: self.now,
                starvation_after: self.starvation_after,
                running: &self.running,
                releasing: &self.releasing,
            })
        }

        fn run(&self, queue: &[GangRequest]) -> BTreeMap<String, Outcome> {
            admit(&PlacementInput {
                nodes: &self.nodes,
                pools: &self.pools,
                allocations: &self.allocs,
                queue,
                now: self.now,
                starvation_after: self.starvation_after,
                running: &self.running,
                releasing: &self.releasing,
            })
        }
    }

    fn gang(key: &str, alloc: &str, pools: &[&str], workers: u32, per_worker: i64) -> GangRequest {
        GangRequest {
            key: key.into(),
            allocation: alloc.into(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            workers,
            per_worker,
            priority: 0,
            queued_since: t(0),
            topology: None,
            preemptible: true,
            preemption_priority: 0,
        }
    }

    fn prio(mut g: GangRequest, priority: i32) -> GangRequest {
        g.priority = priority;
        g.preemption_priority = priority;
        g
    }

    fn topo(mut g: GangRequest, key: &str, required: bool) -> GangRequest {
        g.topology = Some(TopologyRequest { key: key.into(), required });
        g
    }

    fn nodes_of(o: &Outcome) -> (&str, Vec<&str>) {
        match o {
            Outcome::Admitted { pool, nodes } => (pool.as_str(), nodes.iter().map(String::as_str).collect()),
            other => panic!("expected admitted, got {other:?}"),
        }
    }

    fn reason_of(o: &Outcome) -> &str {
        match o {
            Outcome::Waiting { reason, .. } => reason,
            other => panic!("expected waiting, got {other:?}"),
        }
    }

    #[test]
    fn npu_pool_first_when_it_fits_gpu_fallback_when_not_never_split() {
        let mut w = World::new();
        w.add("atom", "nb1", "n1", &[8; 4], None);
        w.add("h200", "b1", "r1", &[8; 4], None);
        w.add("h200", "b1", "r2", &[8; 4], None);
        w.grant("lg", "atom", 1000, false);
        w.grant("lg", "h200", 1000, false);
        // (workers, the pool it lands in, or None when it waits)
        let table: [(u32, Option<&str>); 5] =
            [(1, Some("atom")), (4, Some("atom")), (5, Some("h200")), (8, Some("h200")), (12, None)];
        for (workers, want) in table {
            let out = w.run(&[gang("ns/run", "lg", &["atom", "h200"], workers, 8)]);
            match want {
                Some(pool) => {
                    let (got, nodes) = nodes_of(&out["ns/run"]);
                    assert_eq!(got, pool, "{workers} workers");
                    assert_eq!(nodes.len(), workers as usize);
                    let prefix = if pool == "atom" { "n" } else { "r" };
                    assert!(nodes.iter().all(|n| n.starts_with(prefix)), "one pool only: {nodes:?}");
                }
                None => assert_eq!(
                    reason_of(&out["ns/run"]),
                    "atom: 32 free devices on shared nodes, needs 96 (4 of 12 nodes with 8 free); \
                     falls back to h200: 64 free devices on shared nodes, needs 96 (8 of 12 nodes with 8 free)"
                ),
            }
        }
    }

    #[test]
    fn the_waiting_reason_gives_every_pool_in_order_with_numbers() {
        let mut w = World::new();
        w.add("atom", "nb1", "n1", &[8; 16], None);
        for rack in ["r1", "r2", "r4"] {
            w.add("h200", "b1", rack, &[8; 4], None);
        }
        w.add("h200", "b1", "r3", &[8; 5], None);
        w.grant("lgai", "atom", 64, false);
        w.grant("lgai", "h200", 1000, false);
        let g = topo(gang("ns/run", "lgai", &["atom", "h200", "b200"], 16, 8), RACK, true);
        let out = w.run(&[g]);
        assert_eq!(
            reason_of(&out["ns/run"]),
            "needs 128 rebellions.ai/ATOM in pool atom: grant has 64 free; \
             falls back to h200: 40 free devices in rack r3, needs 128 (5 of 16 nodes with 8 free in one rack); \
             falls back to b200: no grant"
        );
        // Blocked and unknown allocations wait with their own words.
        w.allocs[0].blocked = Some("allocation lgai is Pending: window opens at 2027-02-01T00:00:00Z".into());
        let out = w.run(&[gang("ns/a", "lgai", &["h200"], 1, 8), gang("ns/b", "ghost", &["h200"], 1, 8)]);
        assert_eq!(reason_of(&out["ns/a"]), "allocation lgai is Pending: window opens at 2027-02-01T00:00:00Z");
        assert_eq!(reason_of(&out["ns/b"]), "allocation ghost not found");
        // However long they wait: the blocker is the reason, not the anti-starvation rule.
        w.now = t(100_000);
        let out = w.run(&[gang("ns/a", "lgai", &["h200"], 1, 8), gang("ns/c", "lgai", &["h200"], 1, 8)]);
        assert_eq!(reason_of(&out["ns/c"]), "allocation lgai is Pending: window opens at 2027-02-01T00:00:00Z");
    }

    #[test]
    fn required_topology_waits_with_the_reason_even_when_the_pool_has_room() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 3], None);
        w.add("h200", "b1", "r2", &[8; 3], None);
        w.grant("lg", "h200", 1000, false);
        let out = w.run(&[topo(gang("ns/run", "lg", &["h200"], 4, 8), RACK, true)]);
        assert_eq!(
            reason_of(&out["ns/run"]),
            "h200: 24 free devices in rack r1, needs 32 (3 of 4 nodes with 8 free in one rack)"
        );
        // (key, required) -> the nodes it gets.
        let table: [(&str, bool, Option<Vec<&str>>); 4] = [
            (RACK, false, Some(vec!["r1-0", "r1-1", "r1-2", "r2-0"])),
            (BLOCK, true, Some(vec!["r1-0", "r1-1", "r1-2", "r2-0"])),
            ("topology.sovereign.ai/row", true, None),
            ("topology.sovereign.ai/row", false, Some(vec!["r1-0", "r1-1", "r1-2", "r2-0"])),
        ];
        for (key, required, want) in table {
            let out = w.run(&[topo(gang("ns/run", "lg", &["h200"], 4, 8), key, required)]);
            match want {
                Some(nodes) => assert_eq!(nodes_of(&out["ns/run"]).1, nodes, "{key} {required}"),
                None => assert_eq!(
                    reason_of(&out["ns/run"]),
                    "h200: none of shared nodes has a row label, needs 32 (4 nodes with 8 free in one row)"
                ),
            }
        }
    }

    #[test]
    fn preferred_topology_packs_into_one_rack_when_possible() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 2], None);
        w.add("h200", "b1", "r2", &[8; 4], None);
        w.add("h200", "b1", "r3", &[8; 3], None);
        w.add("h200", "b2", "r4", &[8; 8], None);
        w.grant("lg", "h200", 1000, false);
        // (workers, preferred key or none, racks the workers land in, by worker)
        let table: [(u32, Option<&str>, &[&str]); 8] = [
            (3, None, &["r3"; 3]),
            (4, Some(RACK), &["r2"; 4]),
            (2, None, &["r1"; 2]),
            (6, Some(RACK), &["r4"; 6]),
            (9, None, &["r1", "r1", "r2", "r2", "r2", "r2", "r3", "r3", "r3"]),
            // No single block: the fuller block first (b1 has 9), then b2.
            (10, None, &["r1", "r1", "r2", "r2", "r2", "r2", "r3", "r3", "r3", "r4"]),
            // From the block level: best-fit block b2 (8 nodes) for 3 workers.
            (3, Some(BLOCK), &["r4"; 3]),
            (1, Some(RACK), &["r1"]),
        ];
        for (workers, key, racks) in table {
            let mut g = gang("ns/run", "lg", &["h200"], workers, 8);
            if let Some(key) = key {
                g = topo(g, key, false);
            }
            let out = w.run(&[g]);
            let (_, nodes) = nodes_of(&out["ns/run"]);
            let got: Vec<&str> = nodes.iter().map(|n| n.split('-').next().unwrap()).collect();
            assert_eq!(got, racks, "{workers} workers, {key:?}");
        }
    }

    #[test]
    fn within_a_domain_the_tightest_nodes_go_first() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8, 4, 6, 4, 2], None);
        w.grant("lg", "h200", 1000, false);
        let out = w.run(&[gang("ns/run", "lg", &["h200"], 2, 4)]);
        assert_eq!(nodes_of(&out["ns/run"]).1, vec!["r1-1", "r1-3"], "the two nodes with exactly 4 free");
        let out = w.run(&[gang("ns/run", "lg", &["h200"], 3, 4)]);
        assert_eq!(nodes_of(&out["ns/run"]).1, vec!["r1-1", "r1-2", "r1-3"], "then the one with 6");
    }

    #[test]
    fn dedicated_grants_use_only_their_reserved_nodes_and_shared_gangs_never_do() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 4], None);
        w.add("h200", "b1", "r2", &[8; 2], Some("ded"));
        w.grant("ded", "h200", 1000, true);
        w.grant("shr", "h200", 1000, false);
        let out = w.run(&[gang("ns/d", "ded", &["h200"], 2, 8), gang("ns/s", "shr", &["h200"], 4, 8)]);
        assert_eq!(nodes_of(&out["ns/d"]).1, vec!["r2-0", "r2-1"]);
        assert_eq!(nodes_of(&out["ns/s"]).1, vec!["r1-0", "r1-1", "r1-2", "r1-3"]);
        let out = w.run(&[gang("ns/d", "ded", &["h200"], 3, 8), gang("ns/s", "shr", &["h200"], 5, 8)]);
        assert_eq!(
            reason_of(&out["ns/d"]),
            "h200: 16 free devices on the nodes reserved for ded, needs 24 (2 of 3 nodes with 8 free)"
        );
        assert_eq!(
            reason_of(&out["ns/s"]),
            "h200: 32 free devices on shared nodes, needs 40 (4 of 5 nodes with 8 free)"
        );
        // A dedicated grant without reserved nodes has nowhere to go.
        w.grant("empty", "h200", 1000, true);
        let out = w.run(&[gang("ns/e", "empty", &["h200"], 1, 8)]);
        assert_eq!(
            reason_of(&out["ns/e"]),
            "h200: 0 free devices on the nodes reserved for empty, needs 8 (0 of 1 nodes with 8 free)"
        );
    }

    #[test]
    fn headroom_and_free_devices_are_consumed_within_one_pass() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 8], None);
        w.grant("lg", "h200", 48, false);
        let mut second = gang("ns/second", "lg", &["h200"], 4, 8);
        second.queued_since = t(10);
        let out = w.run(&[second.clone(), gang("ns/first", "lg", &["h200"], 4, 8)]);
        assert_eq!(nodes_of(&out["ns/first"]).1.len(), 4);
        assert_eq!(reason_of(&out["ns/second"]), "needs 32 nvidia.com/gpu in pool h200: grant has 16 free");
        // Enough headroom, but the first gang took the nodes.
        w.allocs[0].headroom.insert("h200".into(), 1000);
        let mut second = gang("ns/second", "lg", &["h200"], 3, 8);
        second.queued_since = t(10);
        let out = w.run(&[second, gang("ns/first", "lg", &["h200"], 6, 8)]);
        assert_eq!(nodes_of(&out["ns/first"]).1.len(), 6);
        assert_eq!(
            reason_of(&out["ns/second"]),
            "h200: 16 free devices on shared nodes, needs 24 (2 of 3 nodes with 8 free)"
        );
        // Half-used nodes stay usable by gangs that fit in what is left.
        let mut small = gang("ns/small", "lg", &["h200"], 8, 4);
        small.queued_since = t(10);
        let out = w.run(&[gang("ns/first", "lg", &["h200"], 8, 4), small]);
        assert_eq!(nodes_of(&out["ns/first"]).1.len(), 8);
        assert_eq!(nodes_of(&out["ns/small"]).1.len(), 8);
    }

    #[test]
    fn backfill_admits_a_smaller_later_gang() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 4], None);
        w.grant("lg", "h200", 1000, false);
        w.grant("sk", "h200", 1000, false);
        let big = gang("ns/big", "lg", &["h200"], 6, 8);
        let mut small = gang("ns/small", "lg", &["h200"], 2, 8);
        small.queued_since = t(100);
        let mut other = gang("other/small", "sk", &["h200"], 2, 8);
        other.queued_since = t(200);
        let out = w.run(&[big, small, other]);
        assert!(matches!(out["ns/big"], Outcome::Waiting { position: 1, .. }));
        assert_eq!(nodes_of(&out["ns/small"]).1.len(), 2);
        assert_eq!(nodes_of(&out["other/small"]).1.len(), 2);
    }

    #[test]
    fn the_anti_starvation_rule_stops_backfill_of_that_allocation_only() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 4], None);
        w.grant("lg", "h200", 1000, false);
        w.grant("sk", "h200", 1000, false);
        w.now = t(10_000);
        // (when the big gang was queued, whether lg's small gang is admitted)
        for (big_since, small_admitted) in [(0, false), (6_400, false), (6_401, true), (9_000, true)] {
            let mut big = gang("ns/big", "lg", &["h200"], 6, 8);
            big.queued_since = t(big_since);
            let mut small = gang("ns/small", "lg", &["h200"], 2, 8);
            small.queued_since = t(9_500);
            let mut other = gang("other/small", "sk", &["h200"], 2, 8);
            other.queued_since = t(9_600);
            let out = w.run(&[big, small, other]);
            assert!(matches!(out["ns/big"], Outcome::Waiting { position: 1, .. }));
            assert_eq!(nodes_of(&out["other/small"]).1.len(), 2, "other allocations still backfill");
            if small_admitted {
                assert_eq!(nodes_of(&out["ns/small"]).1.len(), 2, "big queued at {big_since}");
            } else {
                assert_eq!(
                    out["ns/small"],
                    Outcome::Waiting {
                        position: 2,
                        reason: format!(
                            "waiting behind ns/big, which has waited since {} \
                             (no backfill past a gang waiting longer than 1h)",
                            t(big_since)
                        ),
                    }
                );
            }
        }
    }

    #[test]
    fn queue_positions_count_waiting_gangs_per_allocation_in_global_order() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 4], None);
        w.grant("lg", "h200", 1000, false);
        w.grant("sk", "h200", 1000, false);
        let g = |key: &str, alloc: &str, workers: u32, priority: i32, since: i64| {
            let mut g = gang(key, alloc, &["h200"], workers, 8);
            g.priority = priority;
            g.queued_since = t(since);
            g
        };
        let queue = vec![
            g("lg/late-big", "lg", 5, 0, 50),
            g("lg/urgent", "lg", 3, 10, 90),
            g("lg/early-big", "lg", 8, 0, 10),
            g("sk/tie-b", "sk", 6, 0, 10),
            g("sk/tie-a", "sk", 6, 0, 10),
            g("lg/fits", "lg", 1, 0, 60),
            g("lg/low", "lg", 1, -5, 0),
        ];
        let out = w.run(&queue);
        let position = |k: &str| match &out[k] {
            Outcome::Waiting { position, .. } => Some(*position),
            Outcome::Admitted { .. } => None,
        };
        assert_eq!(position("lg/urgent"), None, "highest priority goes first");
        assert_eq!(position("lg/early-big"), Some(1));
        assert_eq!(position("lg/late-big"), Some(2));
        assert_eq!(position("lg/fits"), None, "backfilled on the last free node");
        assert_eq!(position("lg/low"), Some(3), "lowest priority, however old");
        assert_eq!(position("sk/tie-a"), Some(1), "same priority and age: by key");
        assert_eq!(position("sk/tie-b"), Some(2));
        assert_eq!(out.len(), queue.len());
    }

    #[test]
    fn workers_are_numbered_in_topology_order() {
        let mut w = World::new();
        w.add("h200", "b2", "r9", &[8; 2], None);
        w.add("h200", "b1", "r5", &[8; 1], None);
        w.grant("lg", "h200", 1000, false);
        let out = w.run(&[gang("ns/run", "lg", &["h200"], 3, 8)]);
        assert_eq!(nodes_of(&out["ns/run"]).1, vec!["r5-0", "r9-0", "r9-1"], "block b1 before b2");
    }

    fn victims_of<'p>(pass: &'p Pass, key: &str) -> Option<&'p Preemption> {
        pass.preemptions.iter().find(|p| p.preemptor == key)
    }

    /// Four full h200 nodes, four low-priority 1-node gangs of one allocation.
    fn full_world() -> World {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 4], None);
        w.grant("lg", "h200", 32, false);
        for (i, p) in [(0, 10), (1, 0), (2, 5), (3, 0)] {
            w.start(&format!("ns/low{i}"), "lg", "h200", &[&format!("r1-{i}")], 8, p);
        }
        w.allocs[0].headroom.insert("h200".into(), 0);
        w
    }

    #[test]
    fn a_higher_priority_gang_preempts_only_the_victims_it_needs() {
        let w = full_world();
        // Needs two nodes: the two priority-0 gangs, the later-started first.
        let pass = w.pass(&[prio(gang("ns/urgent", "lg", &["h200"], 2, 8), 100)]);
        let p = victims_of(&pass, "ns/urgent").expect("preempts");
        assert_eq!(p.victims, vec!["ns/low3", "ns/low1"]);
        assert!(p.reclaimed.is_empty());
        assert!(
            reason_of(&pass.outcomes["ns/urgent"])
                .starts_with("preempting lower-priority ns/low3, ns/low1 in pool h200")
        );
        // One node's worth: one victim.
        let pass = w.pass(&[prio(gang("ns/urgent", "lg", &["h200"], 1, 4), 100)]);
        assert_eq!(victims_of(&pass, "ns/urgent").unwrap().victims, vec!["ns/low3"]);
    }

    #[test]
    fn equal_or_lower_priority_never_preempts_and_neither_does_a_hopeless_one() {
        let w = full_world();
        let pass = w.pass(&[prio(gang("ns/peer", "lg", &["h200"], 1, 8), 0)]);
        assert!(pass.preemptions.is_empty(), "{:?}", pass.preemptions);
        // Priority 6 may take low1 and low3 (0) and low2 (5), not low0 (10): four nodes are out of reach.
        let pass = w.pass(&[prio(gang("ns/big", "lg", &["h200"], 4, 8), 6)]);
        assert!(pass.preemptions.is_empty(), "{:?}", pass.preemptions);
        let pass = w.pass(&[prio(gang("ns/big", "lg", &["h200"], 3, 8), 6)]);
        assert_eq!(victims_of(&pass, "ns/big").unwrap().victims, vec!["ns/low3", "ns/low1", "ns/low2"]);
    }

    #[test]
    fn protected_and_non_preemptible_runs_are_never_victims() {
        let mut w = full_world();
        w.running[1].preemptible = false; // low1
        w.running[3].protected_until = Some(t(2000)); // low3, until after now
        let pass = w.pass(&[prio(gang("ns/urgent", "lg", &["h200"], 1, 8), 100)]);
        assert_eq!(victims_of(&pass, "ns/urgent").unwrap().victims, vec!["ns/low2"]);
        w.now = t(2000);
        let pass = w.pass(&[prio(gang("ns/urgent", "lg", &["h200"], 1, 8), 100)]);
        assert_eq!(victims_of(&pass, "ns/urgent").unwrap().victims, vec!["ns/low3"]);
    }

    #[test]
    fn each_victim_serves_one_gang_and_stopping_runs_are_waited_for() {
        let w = full_world();
        let pass =
            w.pass(&[prio(gang("ns/a", "lg", &["h200"], 1, 8), 100), prio(gang("ns/b", "lg", &["h200"], 1, 8), 100)]);
        assert_eq!(victims_of(&pass, "ns/a").unwrap().victims, vec!["ns/low3"]);
        assert_eq!(victims_of(&pass, "ns/b").unwrap().victims, vec!["ns/low1"]);
        // low3 is stopping: its devices come back soon, so nobody else is preempted.
        let mut w = full_world();
        let r = w.running.remove(3);
        w.releasing.push(Releasing {
            node: Some(r.nodes[0]),
            allocation: "lg".into(),
            pool: "h200".into(),
            devices: 8,
        });
        let pass = w.pass(&[prio(gang("ns/a", "lg", &["h200"], 1, 8), 100)]);
        assert!(pass.preemptions.is_empty());
        assert!(reason_of(&pass.outcomes["ns/a"]).contains("once the workers of stopped runs are gone"));
    }

    #[test]
    fn a_gang_waiting_for_its_victims_holds_what_is_already_free() {
        // urgent (2 x 8) preempted low1 and low3: low3 is gone (its node free,
        // its grant back), low1 is still stopping.
        let mut w = full_world();
        let low3 = w.running.remove(3);
        let low1 = w.running.remove(1);
        for p in &mut w.pools {
            for nf in p.shared_nodes.iter_mut().filter(|nf| nf.node == low3.nodes[0]) {
                nf.free = 8;
            }
        }
        w.allocs[0].headroom.insert("h200".into(), 8);
        w.releasing.push(Releasing {
            node: Some(low1.nodes[0]),
            allocation: "lg".into(),
            pool: "h200".into(),
            devices: 8,
        });
        let queue = [prio(gang("ns/urgent", "lg", &["h200"], 2, 8), 100), gang("ns/low3", "lg", &["h200"], 1, 8)];
        let pass = w.pass(&queue);
        assert!(pass.preemptions.is_empty(), "nobody is preempted again: {:?}", pass.preemptions);
        assert!(reason_of(&pass.outcomes["ns/urgent"]).contains("once the workers of stopped runs are gone"));
        assert!(
            matches!(pass.outcomes["ns/low3"], Outcome::Waiting { .. }),
            "the freed node is held for urgent, not backfilled: {:?}",
            pass.outcomes["ns/low3"]
        );
        // Once low1's workers are gone too, urgent takes both nodes.
        w.releasing.clear();
        for p in &mut w.pools {
            for nf in p.shared_nodes.iter_mut().filter(|nf| nf.node == low1.nodes[0]) {
                nf.free = 8;
            }
        }
        w.allocs[0].headroom.insert("h200".into(), 16);
        let out = w.run(&queue);
        assert_eq!(nodes_of(&out["ns/urgent"]).1, vec!["r1-1", "r1-3"]);
        assert!(matches!(out["ns/low3"], Outcome::Waiting { .. }));
    }

    /// Shared h200 of 4 nodes: "own" has a grant of 16, "lender" 16 plus 16 it may borrow.
    fn lending_world() -> World {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 4], None);
        w.grant("own", "h200", 16, false);
        w.grant("lender", "h200", 32, false);
        w.allocs[1].borrowing.insert("h200".into(), 16);
        for a in &mut w.allocs {
            a.granted.insert("h200".into(), 16);
        }
        w
    }

    #[test]
    fn borrowers_use_idle_capacity_and_give_it_back_to_the_owner() {
        let mut w = lending_world();
        let out = w.run(&[gang("ns/borrow", "lender", &["h200"], 4, 8)]);
        assert_eq!(nodes_of(&out["ns/borrow"]).1.len(), 4, "16 granted + 16 borrowed");
        // It runs on all four nodes, two of them borrowed: the owner's gang reclaims.
        w.start("ns/l0", "lender", "h200", &["r1-0", "r1-1"], 8, 50);
        w.start("ns/l1", "lender", "h200", &["r1-2", "r1-3"], 8, 90);
        w.running[1].borrowed = true;
        w.allocs[1].headroom.insert("h200".into(), 0);
        let pass = w.pass(&[gang("ns/mine", "own", &["h200"], 2, 8)]);
        let p = victims_of(&pass, "ns/mine").expect("reclaims");
        assert_eq!(p.victims, vec!["ns/l1"], "the borrowed gang, whatever its priority");
        assert_eq!(p.reclaimed, vec!["ns/l1"]);
        assert!(reason_of(&pass.outcomes["ns/mine"]).starts_with("reclaiming borrowed capacity from ns/l1"));
        // Beyond its own grant the owner is a borrower too: it reclaims nothing.
        let pass = w.pass(&[gang("ns/greedy", "own", &["h200"], 3, 8)]);
        assert!(pass.preemptions.is_empty());
    }

    #[test]
    fn non_preemptible_gangs_do_not_borrow() {
        let w = lending_world();
        let mut g = gang("ns/long", "lender", &["h200"], 3, 8);
        g.preemptible = false;
        assert!(reason_of(&w.run(&[g])["ns/long"]).contains("grant has 16 free"));
    }

    #[test]
    fn idle_capacity_goes_to_the_lowest_dominant_share_first() {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &[8; 4], None);
        for (a, used) in [("busy", 8), ("idle", 0)] {
            w.grant(a, "h200", 16 - used, false);
            w.allocs.last_mut().unwrap().borrowing.insert("h200".into(), 32);
            w.allocs.last_mut().unwrap().headroom.insert("h200".into(), 16 - used + 32);
            w.allocs.last_mut().unwrap().granted.insert("h200".into(), 16);
        }
        // Both want three nodes; only four are free. "busy" is older and more
        // urgent, but "idle" uses none of its grant: it borrows first.
        let mut busy = prio(gang("ns/busy", "busy", &["h200"], 3, 8), 50);
        busy.queued_since = t(-100);
        let out = w.run(&[busy, gang("ns/idle", "idle", &["h200"], 3, 8)]);
        assert_eq!(nodes_of(&out["ns/idle"]).1.len(), 3);
        assert!(matches!(out["ns/busy"], Outcome::Waiting { .. }));
    }

    /// (allocation, pools, workers, per_worker, priority, queued at, topology key and required)
    type GangSpec = (usize, Vec<usize>, u32, i64, i32, i64, Option<(u8, bool)>);

    /// A random world: nodes in two pools and four racks (two blocks), some
    /// reserved for a0 or a1; three allocations; a queue over them and one
    /// unknown allocation.
    #[derive(Clone, Debug)]
    struct Case {
        nodes: Vec<(usize, u8, i64, u8)>,
        allocs: Vec<(Option<i64>, Option<i64>, bool, bool)>,
        gangs: Vec<GangSpec>,
        starvation_secs: i64,
    }

    fn case() -> impl Strategy<Value = Case> {
        let nodes = proptest::collection::vec((0usize..2, 0u8..5, 0i64..=8, 0u8..4), 0..40);
        let allocs = proptest::collection::vec(
            (
                proptest::option::of(0i64..200),
                proptest::option::of(0i64..200),
                any::<bool>(),
                proptest::bool::weighted(0.1),
            ),
            3,
        );
        let gangs = proptest::collection::vec(
            (
                0usize..4,
                proptest::collection::vec(0usize..3, 0..4),
                0u32..7,
                0i64..=8,
                -2i32..3,
                0i64..6000,
                proptest::option::of((0u8..3, any::<bool>())),
            ),
            0..30,
        );
        (nodes, allocs, gangs, 0i64..7000).prop_map(|(nodes, allocs, gangs, starvation_secs)| Case {
            nodes,
            allocs,
            gangs,
            starvation_secs,
        })
    }

    const POOLS: [&str; 3] = ["atom", "h200", "tpu"];

    fn build(c: &Case) -> (World, Vec<GangRequest>) {
        let mut w = World::new();
        w.now = t(6000);
        w.starvation_after = SignedDuration::from_secs(c.starvation_secs);
        for (i, (pool, rack, free, owner)) in c.nodes.iter().enumerate() {
            let p = &mut w.pools[*pool];
            // Rack 4 has no labels at all.
            let labels: Vec<(&str, String)> =
                if *rack < 4 { vec![(BLOCK, format!("b{}", rack / 2)), (RACK, format!("r{rack}"))] } else { vec![] };
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            w.nodes.push(node(&format!("n{i:02}"), &labels, &p.resource_name, 8, true));
            let nf = NodeFree { node: i, free: *free };
            match owner {
                1 => p.reserved_nodes.entry("a0".into()).or_default().push(nf),
                2 => p.reserved_nodes.entry("a1".into()).or_default().push(nf),
                _ => p.shared_nodes.push(nf),
            }
        }
        for (i, (atom, h200, dedicated, blocked)) in c.allocs.iter().enumerate() {
            let mut a = AllocationQuota { name: format!("a{i}"), ..Default::default() };
            for (pool, h) in [("atom", atom), ("h200", h200)] {
                if let Some(h) = h {
                    a.headroom.insert(pool.into(), *h);
                    if *dedicated {
                        a.dedicated.insert(pool.into());
                    } else if i == 2 {
                        // a2 may borrow: a third of its headroom is beyond its grant.
                        a.borrowing.insert(pool.into(), h / 3);
                        a.granted.insert(pool.into(), h - h / 3);
                    }
                }
            }
            if *blocked {
                a.blocked = Some("blocked".into());
            }
            w.allocs.push(a);
        }
        let keys = [RACK, BLOCK, "topology.sovereign.ai/row"];
        let gangs = c
            .gangs
            .iter()
            .enumerate()
            .map(|(i, (alloc, pools, workers, per_worker, priority, since, topology))| GangRequest {
                key: format!("ns/g{i:02}"),
                allocation: format!("a{alloc}"),
                pools: pools.iter().map(|p| POOLS[*p].to_string()).collect(),
                workers: *workers,
                per_worker: *per_worker,
                priority: *priority,
                queued_since: t(*since),
                topology: topology.map(|(k, required)| TopologyRequest { key: keys[k as usize].into(), required }),
                preemptible: *priority != -2,
                preemption_priority: *priority,
            })
            .collect();
        (w, gangs)
    }

    /// (workers, per_worker, priority, preemptible, protected) of a running gang.
    type RunSpec = (usize, i64, i32, bool, bool);

    /// One allocation on up to six h200 nodes in two racks, full of running
    /// gangs placed first-fit, and one queued gang.
    fn crowded(runs: &[RunSpec], nodes: usize, grant: i64) -> World {
        let mut w = World::new();
        w.add("h200", "b1", "r1", &vec![8; nodes.div_ceil(2)], None);
        w.add("h200", "b1", "r2", &vec![8; nodes / 2], None);
        let mut used = 0;
        for (i, (workers, per, p, preemptible, protected)) in runs.iter().enumerate() {
            let free: Vec<(String, i64)> =
                w.pools[1].shared_nodes.iter().map(|nf| (w.nodes[nf.node].name.clone(), nf.free)).collect();
            let fit: Vec<&str> =
                free.iter().filter(|(_, f)| f >= per).map(|(n, _)| n.as_str()).take(*workers).collect();
            if fit.len() < *workers {
                continue;
            }
            w.start(&format!("ns/run{i}"), "lg", "h200", &fit, *per, *p);
            let r = w.running.last_mut().unwrap();
            r.preemptible = *preemptible;
            r.protected_until = protected.then(|| t(5000));
            used += *per * *workers as i64;
        }
        w.grant("lg", "h200", grant - used, false);
        w
    }

    /// The world without these running gangs: their devices and grant back.
    fn without(w: &World, keys: &[String]) -> World {
        let mut out = World { running: vec![], ..w.clone() };
        for r in &w.running {
            if !keys.contains(&r.key) {
                out.running.push(r.clone());
                continue;
            }
            for nf in out.pools.iter_mut().flat_map(|p| p.shared_nodes.iter_mut()) {
                if r.nodes.contains(&nf.node) {
                    nf.free += r.per_worker;
                }
            }
            *out.allocs[0].headroom.get_mut("h200").unwrap() += r.devices();
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Priority preemption: victims are of lower priority, preemptible and
        /// unprotected; stopping them admits the gang, and keeping any one of
        /// them does not; when no victims are chosen, stopping every candidate
        /// would not have admitted it either.
        #[test]
        fn preemption_takes_a_smallest_sufficient_set(
            runs in proptest::collection::vec((1usize..=3, prop_oneof![Just(2i64), Just(4), Just(8)], 0i32..4, proptest::bool::weighted(0.85), proptest::bool::weighted(0.15)), 0..10),
            nodes in 1usize..=6,
            grant in 8i64..=64,
            (workers, per, p, required) in (1u32..=4, prop_oneof![Just(2i64), Just(4), Just(8)], 0i32..5, any::<bool>()),
        ) {
            let w = crowded(&runs, nodes, grant);
            let mut g = prio(gang("ns/new", "lg", &["h200"], workers, per), p);
            if required {
                g = topo(g, RACK, true);
            }
            let pass = w.pass(std::slice::from_ref(&g));
            let admitted = |world: &World| matches!(world.run(std::slice::from_ref(&g))["ns/new"], Outcome::Admitted { .. });
            match victims_of(&pass, "ns/new") {
                Some(pre) => {
                    let waits = matches!(pass.outcomes["ns/new"], Outcome::Waiting { .. });
                    prop_assert!(waits, "a preempting gang waits for its victims");
                    for v in &pre.victims {
                        let r = w.running.iter().find(|r| &r.key == v).unwrap();
                        prop_assert!(r.priority < p && r.preemptible && r.protected_until.is_none(), "{:?}", r);
                    }
                    prop_assert!(admitted(&without(&w, &pre.victims)), "victims {:?} do not make room", pre.victims);
                    for v in &pre.victims {
                        let rest: Vec<String> = pre.victims.iter().filter(|x| *x != v).cloned().collect();
                        prop_assert!(!admitted(&without(&w, &rest)), "{} of {:?} was not needed", v, pre.victims);
                    }
                }
                None => {
                    let all: Vec<String> = w
                        .running
                        .iter()
                        .filter(|r| r.priority < p && r.preemptible && r.protected_until.is_none())
                        .map(|r| r.key.clone())
                        .collect();
                    let fits_now = matches!(pass.outcomes["ns/new"], Outcome::Admitted { .. });
                    prop_assert!(fits_now || !admitted(&without(&w, &all)), "stopping {:?} would admit it", all);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the world and the queue: an entry per gang; admitted gangs
        /// have `workers` distinct candidate nodes of one pool of their list
        /// (in one domain when required); no node and no grant is overdrawn
        /// (borrowing only within its limit, never by non-preemptible gangs);
        /// positions count 1, 2, ... per allocation; the queue's input order
        /// does not matter.
        #[test]
        fn admission_invariants(c in case()) {
            let (w, queue) = build(&c);
            let out = w.run(&queue);
            prop_assert_eq!(out.len(), queue.len());
            let index: BTreeMap<&str, usize> = w.nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
            let mut used: BTreeMap<usize, i64> = BTreeMap::new();
            let mut drawn: BTreeMap<(String, String), i64> = BTreeMap::new();
            let mut drawn_fixed: BTreeMap<(String, String), i64> = BTreeMap::new();
            let mut positions: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
            for g in &queue {
                match &out[&g.key] {
                    Outcome::Admitted { pool, nodes } => {
                        prop_assert!(g.pools.contains(pool), "{} admitted into {} not in {:?}", g.key, pool, g.pools);
                        prop_assert_eq!(nodes.len(), g.workers as usize);
                        let distinct: BTreeSet<&String> = nodes.iter().collect();
                        prop_assert_eq!(distinct.len(), nodes.len(), "a node twice");
                        let a = w.allocs.iter().find(|a| a.name == g.allocation).unwrap();
                        prop_assert!(a.blocked.is_none());
                        let p = w.pools.iter().find(|p| &p.name == pool).unwrap();
                        let candidates: &[NodeFree] = if a.dedicated.contains(pool) {
                            p.reserved_nodes.get(&a.name).map(Vec::as_slice).unwrap_or(&[])
                        } else {
                            &p.shared_nodes
                        };
                        for n in nodes {
                            let i = index[n.as_str()];
                            prop_assert!(candidates.iter().any(|nf| nf.node == i), "{} is not a candidate", n);
                            *used.entry(i).or_default() += g.per_worker;
                        }
                        if let Some(TopologyRequest { key, required: true }) = &g.topology {
                            let domains: BTreeSet<Option<&String>> = nodes.iter().map(|n| w.nodes[index[n.as_str()]].labels.get(key)).collect();
                            prop_assert_eq!(domains.len(), 1);
                            prop_assert!(domains.iter().all(Option::is_some));
                        }
                        *drawn.entry((g.allocation.clone(), pool.clone())).or_default() += i64::from(g.workers) * g.per_worker;
                        if !g.preemptible {
                            *drawn_fixed.entry((g.allocation.clone(), pool.clone())).or_default() += i64::from(g.workers) * g.per_worker;
                        }
                    }
                    Outcome::Waiting { position, reason } => {
                        prop_assert!(!reason.is_empty());
                        positions.entry(g.allocation.as_str()).or_default().push(*position);
                    }
                }
            }
            for p in &w.pools {
                for nf in p.shared_nodes.iter().chain(p.reserved_nodes.values().flatten()) {
                    let u = used.get(&nf.node).copied().unwrap_or(0);
                    prop_assert!(u <= nf.free.max(0), "node {} used {} of {}", nf.node, u, nf.free);
                }
            }
            for ((alloc, pool), d) in &drawn {
                let a = w.allocs.iter().find(|a| &a.name == alloc).unwrap();
                prop_assert!(*d <= a.headroom[pool], "{} drew {} of {} in {}", alloc, d, a.headroom[pool], pool);
            }
            // Non-preemptible gangs never borrow.
            for ((alloc, pool), d) in &drawn_fixed {
                let a = w.allocs.iter().find(|a| &a.name == alloc).unwrap();
                let own = a.headroom[pool] - a.borrowing_in(pool);
                prop_assert!(*d <= own, "non-preemptible gangs of {} drew {} of its own {} in {}", alloc, d, own, pool);
            }
            for ps in positions.values_mut() {
                ps.sort();
                prop_assert_eq!(ps.clone(), (1..=ps.len() as u32).collect::<Vec<_>>());
            }
            let mut reversed = queue.clone();
            reversed.reverse();
            prop_assert_eq!(w.run(&reversed), out);
        }
    }
}
