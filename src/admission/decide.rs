//! The admission decision: pure, from one [`Snapshot`], the time and the
//! settings. Every rule of who holds devices lives here (and in the planner
//! pass it runs); the admission loop writes what it returns and `plan`
//! renders it.
//!
//! For each gang at most one decision:
//! - a waiting gang is admitted (pool, nodes, borrowed) or waits (queue
//!   position, reason in numbers, the victims it chose if it preempts);
//! - a holding gang whose allocation is no longer in force is stopped (a
//!   used-up budget stops it only when enforcement is Hard); else a holding
//!   gang chosen as a victim is evicted (preempted or reclaimed).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::gang::{GangKey, GangState};
use super::snapshot::Snapshot;
use crate::planner::FastMap as HashMap;
use crate::planner::fit::{self, PoolShape};
use crate::planner::grants::Phase;
use crate::planner::placement::{self, PlacementInput};
use crate::planner::request::{AllocationQuota, GangRequest, NodeFree, Outcome, PlacementPool, RunningGang};

/// Restarting gangs go ahead of every fresh one (priorities are within ±1000).
const RESTART_BOOST: i32 = 10_000;

/// The operator's settings that change decisions.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// After waiting this long, the head of an allocation's queue stops backfill.
    pub starvation_after: SignedDuration,
    /// How long a gang admitted by preempting others cannot itself be preempted.
    pub min_run: SignedDuration,
}

/// Why a gang waits: the reason of its `Queued` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// No room now; the message says where it falls short, in numbers.
    Waiting,
    /// It can never be admitted as the pools and its grant are.
    Unsatisfiable,
    /// Its allocation is not in force (window, budget, deletion, activation).
    AllocationInactive,
    /// It chose victims and waits for their workers to stop.
    Preempting,
}

impl WaitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::Waiting => "Waiting",
            WaitReason::Unsatisfiable => "Unsatisfiable",
            WaitReason::AllocationInactive => "AllocationInactive",
            WaitReason::Preempting => "Preempting",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Admitted: `nodes[i]` is the node of worker i. `protected_until` is set
    /// when it displaced others (they may not displace it back at once).
    Admit { pool: String, nodes: Vec<String>, borrowed: bool, protected_until: Option<Timestamp> },
    /// Waits: 1-based position in its allocation's queue.
    Wait { position: u32, why: WaitReason, message: String, victims: Vec<GangKey> },
    /// Holds devices on a grant no longer in force: stopped, with its grace period.
    Stop { message: String },
    /// Chosen as a victim of `by`: preempted (same allocation, lower priority)
    /// or reclaimed (it ran on capacity borrowed from `by`'s allocation).
    Evict { by: GangKey, pool: String, reclaimed: bool, message: String },
}

/// One decision per gang that needs one (holding gangs left alone have none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    pub gangs: BTreeMap<GangKey, Decision>,
}

impl Decisions {
    pub fn get(&self, key: &GangKey) -> Option<&Decision> {
        self.gangs.get(key)
    }

    pub fn admitted(&self) -> impl Iterator<Item = (&GangKey, &Decision)> {
        self.gangs.iter().filter(|(_, d)| matches!(d, Decision::Admit { .. }))
    }
}

/// Decides every gang of the snapshot at `now`.
pub fn decide(snap: &Snapshot, now: Timestamp, settings: &Settings) -> Decisions {
    // Devices in use per pools' resource and node: foreign pods, holding
    // gangs, pods still releasing (one dense row per resource name).
    let mut used: HashMap<&str, Vec<i64>> =
        snap.pools.iter().map(|p| (p.resource_name.as_str(), vec![0; snap.nodes.len()])).collect();
    for (i, held) in &snap.foreign {
        for (resource, devices) in held {
            if let Some(row) = used.get_mut(resource.as_str())
                && let Some(u) = row.get_mut(*i)
            {
                *u = *devices;
            }
        }
    }
    // Devices admitted per (allocation, pool): holding gangs and the pods of
    // stopped gangs still terminating (they count until they are gone).
    let mut admitted: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    let mut running: Vec<RunningGang> = Vec::new();
    // The gang (index into `snap.gangs`) of each running gang and of each queued one.
    let mut running_gang: Vec<usize> = Vec::new();
    for (gi, g) in snap.gangs.iter().enumerate() {
        let Some(h) = g.holding() else { continue };
        let Some(pool) = snap.pool(&h.pool) else { continue };
        let mut at: Vec<usize> = Vec::with_capacity(h.nodes.len());
        let row = used.get_mut(pool.resource_name.as_str()).expect("a row per pool's resource");
        for node in &h.nodes {
            if let Some(&i) = snap.node_index.get(node.as_str()) {
                row[i] += g.per_worker;
                at.push(i);
            }
        }
        running.push(RunningGang {
            key: g.key.to_string(),
            allocation: g.allocation.clone(),
            pool: pool.name.clone(),
            nodes: at,
            per_worker: g.per_worker,
            priority: g.priority,
            started: h.admitted_at.unwrap_or(now),
            borrowed: h.borrowed,
            preemptible: g.preemptible,
            protected_until: h.protected_until,
        });
        running_gang.push(gi);
        *admitted.entry((g.allocation.as_str(), pool.name.as_str())).or_default() += g.devices();
    }
    for r in &snap.releasing {
        if let (Some(i), Some(pool)) = (r.node, snap.pool(&r.pool)) {
            used.get_mut(pool.resource_name.as_str()).expect("a row per pool's resource")[i] += r.devices;
        }
        *admitted.entry((r.allocation.as_str(), r.pool.as_str())).or_default() += r.devices;
    }

    let pools = placement_pools(snap, &used);
    let allocations = quotas(snap, &admitted);
    let mut queue_gang: Vec<usize> = Vec::new();
    let queue: Vec<GangRequest> = snap
        .gangs
        .iter()
        .enumerate()
        .filter_map(|(gi, g)| {
            let GangState::Waiting { restarting, .. } = g.state else { return None };
            queue_gang.push(gi);
            Some(GangRequest {
                key: g.key.to_string(),
                allocation: g.allocation.clone(),
                pools: g.pools.clone(),
                workers: g.workers,
                per_worker: g.per_worker,
                priority: g.priority + if restarting { RESTART_BOOST } else { 0 },
                queued_since: g.queued_since,
                topology: g.topology.clone(),
                preemptible: g.preemptible,
                preemption_priority: g.priority,
            })
        })
        .collect();

    let pass = placement::admit_pass(&PlacementInput {
        nodes: &snap.nodes,
        pools: &pools,
        allocations: &allocations,
        queue: &queue,
        now,
        starvation_after: settings.starvation_after,
        running: &running,
        releasing: &snap.releasing,
        cache: Some(&snap.placement),
    });
    let mut outcomes = pass.outcomes;
    let unsatisfiable = never_fitting(snap, &queue, &allocations, &mut outcomes);

    let mut out = Decisions::default();
    // The pass names gangs by their key strings only in its preemptions (few):
    // the lookup is built only when there are some.
    let by_key: HashMap<&str, usize> = if pass.preemptions.is_empty() {
        HashMap::default()
    } else {
        let queued = queue.iter().map(|q| q.key.as_str()).zip(queue_gang.iter().copied());
        running.iter().map(|r| r.key.as_str()).zip(running_gang.iter().copied()).chain(queued).collect()
    };
    let gang_of = |k: &str| by_key.get(k).map(|&gi| &snap.gangs[gi]);
    let mut victims_of: HashMap<&str, Vec<GangKey>> = HashMap::default();
    for p in &pass.preemptions {
        let Some(preemptor) = gang_of(&p.preemptor) else { continue };
        let by = &preemptor.key;
        victims_of
            .insert(p.preemptor.as_str(), p.victims.iter().filter_map(|v| gang_of(v)).map(|g| g.key.clone()).collect());
        for v in &p.victims {
            let Some(victim) = gang_of(v) else { continue };
            let reclaimed = p.reclaimed.contains(v);
            let message = if reclaimed {
                format!(
                    "reclaimed: {by} of allocation {} needs its guaranteed share of pool {} back; \
                     this run was on borrowed capacity and is queued again",
                    preemptor.allocation, p.pool
                )
            } else {
                format!(
                    "preempted by {by} (priority {} over {}) to make room in pool {}; queued again",
                    preemptor.priority, victim.priority, p.pool
                )
            };
            let d = Decision::Evict { by: by.clone(), pool: p.pool.clone(), reclaimed, message };
            out.gangs.insert(victim.key.clone(), d);
        }
    }
    // A grant no longer in force stops its gangs, whether or not they were victims.
    for g in &snap.gangs {
        if g.holding().is_some()
            && let Some(message) = stop_reason(snap, &g.allocation)
        {
            out.gangs.insert(g.key.clone(), Decision::Stop { message });
        }
    }
    for (qi, outcome) in outcomes.into_iter().enumerate() {
        let g = &snap.gangs[queue_gang[qi]];
        let d = match outcome {
            Outcome::Admitted { pool, nodes, borrowed } => {
                let displaced = matches!(g.state, GangState::Waiting { displaced: true, .. });
                let protected_until = displaced.then(|| now.checked_add(settings.min_run).unwrap_or(now));
                Decision::Admit { pool, nodes, borrowed, protected_until }
            }
            Outcome::Waiting { position, reason } => {
                let inactive = snap.grants.allocations.get(&g.allocation).is_some_and(|a| a.phase != Phase::Active);
                let victims = victims_of.remove(queue[qi].key.as_str()).unwrap_or_default();
                let why = if !victims.is_empty() {
                    WaitReason::Preempting
                } else if inactive {
                    WaitReason::AllocationInactive
                } else if unsatisfiable[qi] {
                    WaitReason::Unsatisfiable
                } else {
                    WaitReason::Waiting
                };
                Decision::Wait { position, why, message: reason, victims }
            }
        };
        out.gangs.insert(g.key.clone(), d);
    }
    out
}

/// Why the gangs of an allocation must stop now, if they must: its grant is
/// not in force (a used-up budget only when its enforcement is Hard).
fn stop_reason(snap: &Snapshot, allocation: &str) -> Option<String> {
    let plan = snap.grants.allocations.get(allocation)?;
    let stops = match plan.phase {
        Phase::Active => false,
        Phase::Exhausted => snap.hard_budget.contains(allocation),
        Phase::Pending | Phase::Expired => true,
    };
    let why = plan.blocker.as_ref().map(|b| b.message()).unwrap_or_default();
    stops.then(|| {
        format!("allocation {allocation} is {:?} ({why}): workers stopped with their grace period", plan.phase)
    })
}

/// Each pool's ready nodes with their free devices: shared nodes, and nodes
/// reserved per allocation (a node labelled for a grant not yet reserved is
/// neither).
fn placement_pools(snap: &Snapshot, used: &HashMap<&str, Vec<i64>>) -> Vec<PlacementPool> {
    snap.pools
        .iter()
        .map(|p| {
            let mut pp = PlacementPool {
                name: p.name.clone(),
                resource_name: p.resource_name.clone(),
                levels: p.levels.clone(),
                ..Default::default()
            };
            let used = &used[p.resource_name.as_str()];
            for &i in &p.members {
                let n = &snap.nodes[i];
                if !n.ready {
                    continue;
                }
                let free = n.allocatable_of(&p.resource_name) - used[i];
                let slot = NodeFree { node: i, free: free.max(0) };
                match snap.grants.reserved_for.get(&n.name) {
                    Some(a) => pp.reserved_nodes.entry(a.clone()).or_default().push(slot),
                    None if !snap.labelled.contains_key(&n.name) => pp.shared_nodes.push(slot),
                    None => {}
                }
            }
            pp
        })
        .collect()
}

/// Each allocation's quota for the pass: whether it may admit at all, and its
/// headroom, borrowing limit and grant per pool.
fn quotas(snap: &Snapshot, admitted: &BTreeMap<(&str, &str), i64>) -> Vec<AllocationQuota> {
    snap.allocations
        .iter()
        .map(|a| {
            let plan = snap.grants.allocations.get(&a.name);
            // Gangs run only on grants in force: Active in the plan AND in the
            // allocation's status. Otherwise a gang admitted before the grant's
            // first status write would run on a grant that a capacity drop can
            // still take back (only grants Active in status are never revoked).
            let blocked = match plan {
                Some(plan) if plan.phase != Phase::Active => {
                    let why = plan.blocker.as_ref().map(|b| b.message()).unwrap_or_else(|| "not admitted yet".into());
                    Some(format!("allocation {} is {:?}: {why}", a.name, plan.phase))
                }
                None => Some(format!("allocation {} is not planned", a.name)),
                Some(_) if !a.was_active => Some(format!("allocation {} is being activated", a.name)),
                Some(_) => None,
            };
            let headroom = a
                .grants
                .iter()
                .map(|g| {
                    let used = admitted.get(&(a.name.as_str(), g.pool.as_str())).copied().unwrap_or(0);
                    (g.pool.clone(), g.accelerators + g.borrowing_limit - used)
                })
                .collect();
            let dedicated: BTreeSet<String> = a.grants.iter().filter(|g| g.dedicated).map(|g| g.pool.clone()).collect();
            // Dedicated (reserved) nodes are never lent, so never borrowed either.
            let borrowing =
                a.grants.iter().filter(|g| !g.dedicated).map(|g| (g.pool.clone(), g.borrowing_limit)).collect();
            let granted = a.grants.iter().map(|g| (g.pool.clone(), g.accelerators)).collect();
            AllocationQuota { name: a.name.clone(), blocked, headroom, dedicated, borrowing, granted }
        })
        .collect()
}

/// Rewrites the reason of every waiting gang that can never be admitted as
/// the pools and its grant are; returns which (by queue index).
fn never_fitting(
    snap: &Snapshot,
    queue: &[GangRequest],
    allocations: &[AllocationQuota],
    outcomes: &mut [Outcome],
) -> Vec<bool> {
    let mut out = vec![false; queue.len()];
    let waiting: Vec<usize> = (0..queue.len()).filter(|&i| matches!(outcomes[i], Outcome::Waiting { .. })).collect();
    if waiting.is_empty() {
        return out;
    }
    let requested: BTreeSet<&str> =
        waiting.iter().filter_map(|&i| queue[i].topology.as_ref()).map(|t| t.key.as_str()).collect();
    let shapes: BTreeMap<String, PoolShape> = snap
        .pools
        .iter()
        .map(|p| {
            let members = p.members.iter().map(|&i| &snap.nodes[i]);
            let mut keys: BTreeSet<String> = p.levels.iter().cloned().collect();
            keys.insert(crate::api::HOSTNAME_KEY.to_string());
            for k in &requested {
                if p.members.iter().any(|&i| snap.nodes[i].labels.contains_key(*k)) {
                    keys.insert(k.to_string());
                }
            }
            let shape = PoolShape {
                resource_name: p.resource_name.clone(),
                nodes: p.members.len(),
                largest_node: members.map(|n| n.allocatable_of(&p.resource_name)).max().unwrap_or(0),
                keys,
            };
            (p.name.clone(), shape)
        })
        .collect();
    let quota: HashMap<&str, &AllocationQuota> = allocations.iter().rev().map(|a| (a.name.as_str(), a)).collect();
    for i in waiting {
        let g = &queue[i];
        if let Some(why) = fit::never_fits(g, &shapes, quota.get(g.allocation.as_str()).copied())
            && let Outcome::Waiting { reason, .. } = &mut outcomes[i]
        {
            *reason = why;
            out[i] = true;
        }
    }
    out
}
