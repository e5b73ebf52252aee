//! Admission of grants, node reservations for dedicated grants, and the
//! namespace quotas that follow from them.
//!
//! Admission rules (the order an admin can predict):
//! 1. An allocation is eligible when it is not being deleted, its window is
//!    open, its budget is not used up, every pool it names exists, and its
//!    grants meet its `minDomesticShare`.
//! 2. Eligible allocations that were Active keep what they hold, even when the
//!    pool has since lost capacity: nothing is revoked silently; the pool then
//!    reports that it is overcommitted.
//! 3. The others are taken by priority (higher first), then age (older first),
//!    then name. One is admitted when every one of its grants fits in what its
//!    pool has left (dedicated grants as whole nodes); otherwise it stays
//!    Pending, and later ones that fit are still admitted.
//! 4. Quota of a namespace, per resource name: the sum over its Active
//!    allocations of grant plus borrowing limit for pools of that resource.
//!    Namespaces whose allocations are all inactive get zero.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::inventory::NodeInfo;
use super::reservation::{self, Candidate};

/// A pool as the grant planner sees it.
#[derive(Clone, Debug, Default)]
pub struct PoolState {
    pub name: String,
    pub resource_name: String,
    pub domestic: bool,
    /// Topology keys coarse to fine, without the hostname level.
    pub levels: Vec<String>,
    /// Indexes into the node slice.
    pub members: Vec<usize>,
    /// Allocatable devices on Ready member nodes.
    pub allocatable: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GrantState {
    pub pool: String,
    pub accelerators: i64,
    pub dedicated: bool,
    pub borrowing_limit: i64,
}

/// An allocation as the grant planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct AllocationState {
    pub name: String,
    pub priority: i32,
    pub created: Timestamp,
    pub namespaces: Vec<String>,
    pub window_start: Option<Timestamp>,
    pub window_end: Option<Timestamp>,
    pub grants: Vec<GrantState>,
    pub budget_hours: Option<f64>,
    /// Hours used, charged up to now.
    pub hours_used: f64,
    pub min_domestic_share: Option<f64>,
    /// Was Active before this pass: keeps what it holds.
    pub was_active: bool,
    /// Its budget was found used up, and its spec has not changed since: it
    /// stays used up though the ledger's figure falls back below the budget
    /// (a running pod's charge up to a reckoning, corrected to its own end).
    pub budget_used_up: bool,
    pub deleting: bool,
}

/// Why an allocation is not (or no longer) Active.
#[derive(Clone, Debug, PartialEq)]
pub enum Blocker {
    Deleting,
    WindowNotOpen {
        start: Timestamp,
    },
    WindowClosed {
        end: Timestamp,
    },
    BudgetUsedUp {
        used: f64,
        budget: f64,
    },
    PoolNotFound {
        pools: Vec<String>,
    },
    DomesticShareShort {
        share: f64,
        min: f64,
        domestic: i64,
        total: i64,
    },
    /// The first short pool: what it has left for this allocation and what it needs.
    Capacity {
        pool: String,
        free: i64,
        needs: i64,
        allocatable: i64,
    },
}

impl Blocker {
    /// Stable reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocker::Deleting => "Deleting",
            Blocker::WindowNotOpen { .. } => "WindowNotOpen",
            Blocker::WindowClosed { .. } => "WindowClosed",
            Blocker::BudgetUsedUp { .. } => "BudgetUsedUp",
            Blocker::PoolNotFound { .. } => "PoolNotFound",
            Blocker::DomesticShareShort { .. } => "DomesticShareNotMet",
            Blocker::Capacity { .. } => "InsufficientCapacity",
        }
    }

    /// The reason in plain words, with the numbers.
    pub fn message(&self) -> String {
        match self {
            Blocker::Deleting => "the allocation is being deleted".into(),
            Blocker::WindowNotOpen { start } => format!("the grant's window opens at {start}"),
            Blocker::WindowClosed { end } => format!("the grant's window closed at {end}"),
            Blocker::BudgetUsedUp { used, budget } => {
                format!("{used:.1} of {budget:.0} accelerator-hours used: the budget is used up")
            }
            Blocker::PoolNotFound { pools } => {
                format!("grants name pools that do not exist: {}", pools.join(", "))
            }
            Blocker::DomesticShareShort { share, min, domestic, total } => format!(
                "{domestic} of {total} granted accelerators ({:.0}%) are in domestic pools; minDomesticShare needs {:.0}%: {}",
                share * 100.0,
                min * 100.0,
                domestic_remedy(*min, *domestic, *total)
            ),
            Blocker::Capacity { pool, free, needs, allocatable } => format!(
                "pool {pool} is short by {} accelerators: {allocatable} allocatable, {free} not granted to others, this grant needs {needs}",
                needs - free
            ),
        }
    }
}

/// What makes a grant meet its domestic share: the fewest domestic accelerators
/// to add, or, at a share of 100 % (where adding never suffices), the
/// non-domestic ones to move.
fn domestic_remedy(min: f64, domestic: i64, total: i64) -> String {
    let foreign = total - domestic;
    if min >= 1.0 {
        return format!("move the {foreign} accelerators granted in non-domestic pools to domestic pools");
    }
    // The least x with (domestic + x) / (total + x) >= min; the epsilon keeps an
    // exact product (0.5 x 8) from rounding up to one more.
    let x = ((min * total as f64 - domestic as f64) / (1.0 - min) - 1e-9).ceil().max(1.0);
    if x >= i64::MAX as f64 {
        return format!("move the {foreign} accelerators granted in non-domestic pools to domestic pools");
    }
    let x = x as i64;
    format!("add {x} domestic accelerator{}", if x == 1 { "" } else { "s" })
}

/// The phase an allocation should show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Active,
    Exhausted,
    Expired,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolGrantPlan {
    /// Devices this allocation holds in the pool (dedicated: the reserved nodes').
    pub granted: i64,
    /// Reserved nodes, sorted (dedicated grants only).
    pub reserved_nodes: Vec<String>,
    /// Previously reserved nodes dropped this pass (deleted or NotReady too long).
    pub dropped_nodes: Vec<String>,
    /// Fewer nodes than the grant needs could be reserved.
    pub short_of_nodes: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AllocationPlan {
    pub phase: Phase,
    pub blocker: Option<Blocker>,
    /// Per pool named in the grants.
    pub pools: BTreeMap<String, PoolGrantPlan>,
    /// Share of granted accelerators in domestic pools (None without grants).
    pub domestic_granted_share: Option<f64>,
    /// When the plan changes by itself (window start or end).
    pub wake_at: Option<Timestamp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolPlan {
    /// Devices held by Active grants.
    pub granted: i64,
    /// Devices on reserved nodes.
    pub reserved: i64,
    pub reserved_nodes: i32,
    /// Devices granted beyond what the pool can allocate (capacity was lost).
    pub overcommitted_by: i64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrantPlan {
    pub allocations: BTreeMap<String, AllocationPlan>,
    pub pools: BTreeMap<String, PoolPlan>,
    /// Namespace -> (resource name -> hard limit on requests).
    pub quotas: BTreeMap<String, BTreeMap<String, i64>>,
    /// Node -> allocation holding it.
    pub reserved_for: BTreeMap<String, String>,
}

/// Inputs of one planning pass.
pub struct GrantInput<'a> {
    pub nodes: &'a [NodeInfo],
    pub pools: &'a [PoolState],
    pub allocations: &'a [AllocationState],
    /// Node -> allocation named by its reservation label now.
    pub labelled: &'a BTreeMap<String, String>,
    /// Nodes with running accelerator pods.
    pub busy: &'a BTreeSet<String>,
    /// How long a NotReady reserved node is kept before it is replaced.
    pub node_grace: SignedDuration,
    pub now: Timestamp,
}

pub fn plan(input: &GrantInput<'_>) -> GrantPlan {
    let pools: BTreeMap<&str, &PoolState> = input.pools.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut out = GrantPlan::default();
    for p in input.pools {
        out.pools.insert(p.name.clone(), PoolPlan::default());
    }

    // 1. Eligibility.
    let mut eligible: Vec<&AllocationState> = Vec::new();
    for a in input.allocations {
        let (blocker, wake_at) = eligibility(a, &pools, input.now);
        let domestic_granted_share = domestic_share(a, &pools);
        let phase = match &blocker {
            None => {
                eligible.push(a);
                Phase::Pending
            }
            Some(Blocker::WindowClosed { .. }) => Phase::Expired,
            Some(Blocker::BudgetUsedUp { .. }) => Phase::Exhausted,
            Some(_) => Phase::Pending,
        };
        out.allocations.insert(
            a.name.clone(),
            AllocationPlan { phase, blocker, pools: BTreeMap::new(), domestic_granted_share, wake_at },
        );
    }

    // 2 and 3. Holders first, then the queue, each by priority, age and name.
    eligible.sort_by_key(|a| (Reverse(a.was_active), Reverse(a.priority), a.created, a.name.clone()));
    let mut free: BTreeMap<&str, i64> = input.pools.iter().map(|p| (p.name.as_str(), p.allocatable)).collect();
    // Nodes no one may take: held by allocations that are not planned this pass
    // are released, so only this pass's choices block.
    let mut taken: BTreeSet<String> = BTreeSet::new();
    for a in eligible {
        let mut plans = BTreeMap::new();
        let mut blocker = None;
        for g in &a.grants {
            let pool = pools[g.pool.as_str()];
            let left = free[g.pool.as_str()];
            let plan = if g.dedicated {
                reserve(input, a, g, pool, &taken)
            } else {
                PoolGrantPlan { granted: g.accelerators, ..Default::default() }
            };
            let fits = left >= plan.granted && !(g.dedicated && plan.short_of_nodes);
            if !fits && !a.was_active && blocker.is_none() {
                blocker = Some(Blocker::Capacity {
                    pool: g.pool.clone(),
                    free: left.max(0),
                    needs: if g.dedicated { plan.granted.max(g.accelerators) } else { g.accelerators },
                    allocatable: pool.allocatable,
                });
            }
            plans.insert(g.pool.clone(), plan);
        }
        let ap = out.allocations.get_mut(&a.name).expect("planned above");
        if let Some(b) = blocker {
            ap.blocker = Some(b);
            continue;
        }
        for (pool, plan) in &plans {
            *free.get_mut(pool.as_str()).expect("pool exists") -= plan.granted;
            for n in &plan.reserved_nodes {
                taken.insert(n.clone());
                out.reserved_for.insert(n.clone(), a.name.clone());
            }
            let pp = out.pools.get_mut(pool).expect("pool exists");
            pp.granted += plan.granted;
            if !plan.reserved_nodes.is_empty() {
                pp.reserved += plan.granted;
                pp.reserved_nodes += plan.reserved_nodes.len() as i32;
            }
        }
        ap.phase = Phase::Active;
        ap.pools = plans;
    }
    for p in input.pools {
        let pp = out.pools.get_mut(&p.name).expect("pool exists");
        pp.overcommitted_by = (pp.granted - p.allocatable).max(0);
    }

    // 4. Quotas.
    let resources: BTreeSet<&str> = input.pools.iter().map(|p| p.resource_name.as_str()).collect();
    for a in input.allocations.iter().filter(|a| !a.deleting) {
        let active = out.allocations[&a.name].phase == Phase::Active;
        for ns in &a.namespaces {
            let q =
                out.quotas.entry(ns.clone()).or_insert_with(|| resources.iter().map(|r| (r.to_string(), 0)).collect());
            if active {
                for g in &a.grants {
                    let r = &pools[g.pool.as_str()].resource_name;
                    *q.get_mut(r.as_str()).expect("every resource listed") += g.accelerators + g.borrowing_limit;
                }
            }
        }
    }
    out
}

fn eligibility(
    a: &AllocationState,
    pools: &BTreeMap<&str, &PoolState>,
    now: Timestamp,
) -> (Option<Blocker>, Option<Timestamp>) {
    let wake_at = match (a.window_start, a.window_end) {
        (Some(s), _) if now < s => Some(s),
        (_, Some(e)) if now < e => Some(e),
        _ => None,
    };
    if a.deleting {
        return (Some(Blocker::Deleting), None);
    }
    if let Some(start) = a.window_start.filter(|s| now < *s) {
        return (Some(Blocker::WindowNotOpen { start }), wake_at);
    }
    if let Some(end) = a.window_end.filter(|e| now >= *e) {
        return (Some(Blocker::WindowClosed { end }), None);
    }
    if let Some(budget) = a.budget_hours.filter(|b| a.hours_used >= *b || a.budget_used_up) {
        return (Some(Blocker::BudgetUsedUp { used: a.hours_used, budget }), wake_at);
    }
    let missing: Vec<String> =
        a.grants.iter().filter(|g| !pools.contains_key(g.pool.as_str())).map(|g| g.pool.clone()).collect();
    if !missing.is_empty() {
        return (Some(Blocker::PoolNotFound { pools: missing }), wake_at);
    }
    if let Some(min) = a.min_domestic_share {
        let total: i64 = a.grants.iter().map(|g| g.accelerators).sum();
        let domestic: i64 = a.grants.iter().filter(|g| pools[g.pool.as_str()].domestic).map(|g| g.accelerators).sum();
        let share = if total > 0 { domestic as f64 / total as f64 } else { 0.0 };
        if share + 1e-9 < min {
            return (Some(Blocker::DomesticShareShort { share, min, domestic, total }), wake_at);
        }
    }
    (None, wake_at)
}

fn domestic_share(a: &AllocationState, pools: &BTreeMap<&str, &PoolState>) -> Option<f64> {
    let total: i64 = a.grants.iter().map(|g| g.accelerators).sum();
    let domestic: i64 = a
        .grants
        .iter()
        .filter(|g| pools.get(g.pool.as_str()).is_some_and(|p| p.domestic))
        .map(|g| g.accelerators)
        .sum();
    (total > 0).then(|| domestic as f64 / total as f64)
}

/// Reserves whole nodes of `pool` for a dedicated grant.
fn reserve<'a>(
    input: &GrantInput<'a>,
    a: &AllocationState,
    g: &GrantState,
    pool: &PoolState,
    taken: &BTreeSet<String>,
) -> PoolGrantPlan {
    let candidate = |n: &'a NodeInfo| Candidate {
        devices: n.allocatable_of(&pool.resource_name).max(n.capacity_of(&pool.resource_name)),
        busy: input.busy.contains(&n.name),
        node: n,
    };
    let members: Vec<&'a NodeInfo> = pool.members.iter().map(|&i| &input.nodes[i]).collect();
    let mut held = Vec::new();
    let mut free = Vec::new();
    for &n in &members {
        let holder = input.labelled.get(&n.name);
        if holder == Some(&a.name) {
            let valid = n.ready || n.not_ready_since.is_some_and(|t| input.now.duration_since(t) < input.node_grace);
            held.push((candidate(n), valid && !taken.contains(&n.name)));
        } else if n.ready && !taken.contains(&n.name) && holder.is_none_or(|h| !holder_is_live(h, input)) {
            free.push(candidate(n));
        }
    }
    // Nodes labelled for this allocation that left the pool (deleted, relabelled).
    let dropped_outside: Vec<String> = input
        .labelled
        .iter()
        .filter(|(node, holder)| *holder == &a.name && !members.iter().any(|n| &&n.name == node))
        .map(|(node, _)| node.clone())
        .collect();
    let r = reservation::choose_nodes(g.accelerators, &held, &free, &pool.levels);
    let mut dropped = r.dropped.clone();
    dropped.extend(dropped_outside);
    dropped.sort();
    PoolGrantPlan {
        granted: r.devices,
        short_of_nodes: !r.satisfies(g.accelerators),
        reserved_nodes: r.nodes,
        dropped_nodes: dropped,
    }
}

/// A node labelled for another allocation stays unavailable while that
/// allocation exists and is not being deleted; labels of gone allocations are
/// stale and the node is free.
fn holder_is_live(holder: &str, input: &GrantInput<'_>) -> bool {
    input.allocations.iter().any(|a| a.name == holder && !a.deleting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::inventory::tests::node;
    use proptest::prelude::*;

    const GPU: &str = "nvidia.com/gpu";
    const ATOM: &str = "rebellions.ai/ATOM";

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    struct World {
        nodes: Vec<NodeInfo>,
        pools: Vec<PoolState>,
    }

    /// Pool `h200`: `gpu_nodes` nodes of 8 GPUs, two per rack; pool `atom`
    /// (domestic): `npu_nodes` nodes of 8.
    fn world(gpu_nodes: usize, npu_nodes: usize) -> World {
        let mut nodes = Vec::new();
        let mut h200 = PoolState {
            name: "h200".into(),
            resource_name: GPU.into(),
            levels: vec!["rack".into()],
            ..Default::default()
        };
        for i in 0..gpu_nodes {
            let rack = format!("r{}", i / 2);
            nodes.push(node(&format!("h{i}"), &[("rack", &rack)], GPU, 8, true));
            h200.members.push(nodes.len() - 1);
            h200.allocatable += 8;
        }
        let mut atom = PoolState {
            name: "atom".into(),
            resource_name: ATOM.into(),
            domestic: true,
            levels: vec!["rack".into()],
            ..Default::default()
        };
        for i in 0..npu_nodes {
            nodes.push(node(&format!("a{i}"), &[("rack", "n0")], ATOM, 8, true));
            atom.members.push(nodes.len() - 1);
            atom.allocatable += 8;
        }
        World { nodes, pools: vec![h200, atom] }
    }

    fn alloc(name: &str, grants: &[(&str, i64, bool)]) -> AllocationState {
        AllocationState {
            name: name.into(),
            priority: 0,
            created: t(0),
            namespaces: vec![format!("ns-{name}")],
            window_start: None,
            window_end: None,
            grants: grants
                .iter()
                .map(|(p, n, d)| GrantState {
                    pool: p.to_string(),
                    accelerators: *n,
                    dedicated: *d,
                    borrowing_limit: 0,
                })
                .collect(),
            budget_hours: None,
            hours_used: 0.0,
            min_domestic_share: None,
            was_active: false,
            budget_used_up: false,
            deleting: false,
        }
    }

    fn run(w: &World, allocs: &[AllocationState], labelled: &BTreeMap<String, String>) -> GrantPlan {
        plan(&GrantInput {
            nodes: &w.nodes,
            pools: &w.pools,
            allocations: allocs,
            labelled,
            busy: &BTreeSet::new(),
            node_grace: SignedDuration::from_secs(300),
            now: t(100),
        })
    }

    #[test]
    fn the_domestic_remedy_is_exact_at_the_edges() {
        // 3 of 8 at 50 %: 2 more make 5 of 10.
        assert_eq!(domestic_remedy(0.5, 3, 8), "add 2 domestic accelerators");
        // 4 of 8 at 50 % would pass; one short of a whole device still needs one.
        assert_eq!(domestic_remedy(0.51, 4, 8), "add 1 domestic accelerator");
        // 100 %: no number of added devices is enough.
        assert_eq!(
            domestic_remedy(1.0, 0, 8),
            "move the 8 accelerators granted in non-domestic pools to domestic pools"
        );
        assert_eq!(
            domestic_remedy(1.0, 8, 16),
            "move the 8 accelerators granted in non-domestic pools to domestic pools"
        );
        // Just below 100 % the number is large but exact: (0 + x) / (8 + x) >= 0.999.
        assert_eq!(domestic_remedy(0.999, 0, 8), "add 7992 domestic accelerators");
    }

    #[test]
    fn grants_are_admitted_by_priority_then_age_and_the_rest_wait_with_numbers() {
        let w = world(4, 0); // 32 GPUs
        let mut old = alloc("old", &[("h200", 16, false)]);
        old.created = t(-10);
        let young = alloc("young", &[("h200", 16, false)]);
        let mut urgent = alloc("urgent", &[("h200", 16, false)]);
        urgent.priority = 10;
        let p = run(&w, &[young.clone(), old.clone(), urgent.clone()], &BTreeMap::new());
        assert_eq!(p.allocations["urgent"].phase, Phase::Active);
        assert_eq!(p.allocations["old"].phase, Phase::Active);
        assert_eq!(p.allocations["young"].phase, Phase::Pending);
        let msg = p.allocations["young"].blocker.as_ref().unwrap().message();
        assert!(msg.contains("pool h200 is short by 16"), "{msg}");
        assert_eq!(p.pools["h200"].granted, 32);
    }

    #[test]
    fn a_later_grant_that_fits_is_not_blocked_by_an_earlier_one_that_does_not() {
        let w = world(4, 0);
        let mut big = alloc("big", &[("h200", 40, false)]);
        big.created = t(-10);
        let small = alloc("small", &[("h200", 8, false)]);
        let p = run(&w, &[big, small], &BTreeMap::new());
        assert_eq!(p.allocations["big"].phase, Phase::Pending);
        assert_eq!(p.allocations["small"].phase, Phase::Active);
    }

    #[test]
    fn an_active_grant_is_never_revoked_when_capacity_drops() {
        let mut w = world(4, 0);
        let mut a = alloc("a", &[("h200", 32, false)]);
        a.was_active = true;
        w.pools[0].allocatable = 24; // a node was lost
        let p = run(&w, &[a], &BTreeMap::new());
        assert_eq!(p.allocations["a"].phase, Phase::Active);
        assert_eq!(p.pools["h200"].overcommitted_by, 8);
    }

    #[test]
    fn all_grants_of_an_allocation_fit_or_none_is_taken() {
        let w = world(4, 1); // 32 GPUs, 8 NPUs
        let a = alloc("a", &[("h200", 8, false), ("atom", 16, false)]);
        let p = run(&w, &[a], &BTreeMap::new());
        assert_eq!(p.allocations["a"].phase, Phase::Pending);
        assert_eq!(p.pools["h200"].granted, 0, "no partial grant");
        assert!(matches!(&p.allocations["a"].blocker, Some(Blocker::Capacity { pool, .. }) if pool == "atom"));
    }

    #[test]
    fn dedicated_grants_reserve_whole_nodes_in_one_rack_and_keep_them() {
        let w = world(6, 0); // racks r0 r1 r2, two nodes each
        let a = alloc("a", &[("h200", 12, true)]); // rounds up to 2 nodes
        let p = run(&w, std::slice::from_ref(&a), &BTreeMap::new());
        let plan = &p.allocations["a"].pools["h200"];
        assert_eq!(plan.reserved_nodes, vec!["h0", "h1"], "both in rack r0");
        assert_eq!(plan.granted, 16);
        assert_eq!(p.pools["h200"].reserved_nodes, 2);
        // Next pass, with labels on h2 and h4 (from an earlier choice): kept.
        let labelled: BTreeMap<String, String> = [("h2".into(), "a".into()), ("h4".into(), "a".into())].into();
        let mut held = a;
        held.was_active = true;
        let p = run(&w, &[held], &labelled);
        assert_eq!(p.allocations["a"].pools["h200"].reserved_nodes, vec!["h2", "h4"]);
    }

    #[test]
    fn a_reserved_node_that_is_gone_or_not_ready_too_long_is_replaced() {
        let mut w = world(4, 0);
        let labelled: BTreeMap<String, String> = [("h0".into(), "a".into()), ("h1".into(), "a".into())].into();
        let mut a = alloc("a", &[("h200", 16, true)]);
        a.was_active = true;
        // h0 NotReady for 10 s: within grace, kept.
        w.nodes[0].ready = false;
        w.nodes[0].not_ready_since = Some(t(90));
        w.pools[0].allocatable = 24;
        let p = run(&w, &[a.clone()], &labelled);
        assert_eq!(p.allocations["a"].pools["h200"].reserved_nodes, vec!["h0", "h1"]);
        // NotReady for 1000 s: replaced, preferring the same... any free node.
        w.nodes[0].not_ready_since = Some(t(-900));
        let p = run(&w, &[a.clone()], &labelled);
        let plan = &p.allocations["a"].pools["h200"];
        assert_eq!(plan.reserved_nodes.len(), 2);
        assert!(!plan.reserved_nodes.contains(&"h0".to_string()));
        assert_eq!(plan.dropped_nodes, vec!["h0"]);
        // A node deleted from the cluster is dropped as well.
        let w = world(1, 0);
        let p = run(&w, &[a], &labelled);
        assert_eq!(p.allocations["a"].pools["h200"].dropped_nodes, vec!["h1"]);
        assert!(p.allocations["a"].pools["h200"].short_of_nodes);
    }

    #[test]
    fn nodes_held_by_another_live_allocation_are_never_taken() {
        let w = world(2, 0);
        let labelled: BTreeMap<String, String> = [("h0".into(), "other".into())].into();
        let mut other = alloc("other", &[("h200", 8, true)]);
        other.was_active = true;
        let a = alloc("a", &[("h200", 8, true)]);
        let p = run(&w, &[other.clone(), a.clone()], &labelled);
        assert_eq!(p.allocations["other"].pools["h200"].reserved_nodes, vec!["h0"]);
        assert_eq!(p.allocations["a"].pools["h200"].reserved_nodes, vec!["h1"]);
        // Once `other` is deleted, its label is stale and h0 is free again.
        other.deleting = true;
        let p = run(&w, &[other, a], &labelled);
        assert_eq!(p.allocations["other"].phase, Phase::Pending);
        assert_ne!(p.reserved_for.get("h0").map(String::as_str), Some("other"));
        assert_eq!(p.allocations["a"].pools["h200"].reserved_nodes.len(), 1);
    }

    #[test]
    fn a_used_up_budget_stays_used_up_when_the_ledger_corrects_its_figure_down() {
        let w = world(4, 1);
        // Found used up at 10.2 hours; a pod's own end then brings the ledger to 9.9.
        let mut corrected = alloc("corrected", &[("h200", 8, false)]);
        corrected.budget_hours = Some(10.0);
        corrected.hours_used = 9.9;
        corrected.budget_used_up = true;
        // Never used up: 9.9 of 10 leaves it Active.
        let mut fresh = corrected.clone();
        fresh.name = "fresh".into();
        fresh.budget_used_up = false;
        let p = run(&w, &[corrected, fresh], &BTreeMap::new());
        assert_eq!(p.allocations["corrected"].phase, Phase::Exhausted);
        assert_eq!(p.allocations["fresh"].phase, Phase::Active);
    }

    #[test]
    fn windows_budgets_missing_pools_and_domestic_share_block_with_reasons() {
        let w = world(4, 1);
        let mut early = alloc("early", &[("h200", 8, false)]);
        early.window_start = Some(t(200));
        early.window_end = Some(t(300));
        let mut late = alloc("late", &[("h200", 8, false)]);
        late.window_end = Some(t(50));
        let mut broke = alloc("broke", &[("h200", 8, false)]);
        broke.budget_hours = Some(10.0);
        broke.hours_used = 10.5;
        let ghost = alloc("ghost", &[("tpu", 8, false)]);
        let mut patriot = alloc("patriot", &[("h200", 24, false), ("atom", 8, false)]);
        patriot.min_domestic_share = Some(0.5);
        let mut open = alloc("open", &[("h200", 8, false)]);
        open.window_start = Some(t(0));
        open.window_end = Some(t(500));
        let p = run(&w, &[early, late, broke, ghost, patriot, open], &BTreeMap::new());
        assert_eq!(p.allocations["early"].phase, Phase::Pending);
        assert_eq!(p.allocations["early"].wake_at, Some(t(200)));
        assert_eq!(p.allocations["late"].phase, Phase::Expired);
        assert_eq!(p.allocations["broke"].phase, Phase::Exhausted);
        assert_eq!(p.allocations["ghost"].blocker.as_ref().unwrap().reason(), "PoolNotFound");
        let b = p.allocations["patriot"].blocker.as_ref().unwrap();
        assert_eq!(b.reason(), "DomesticShareNotMet");
        assert!(b.message().contains("8 of 32 granted accelerators (25%)"), "{}", b.message());
        assert!(b.message().contains("add 16 domestic"), "{}", b.message());
        assert_eq!(p.allocations["patriot"].domestic_granted_share, Some(0.25));
        assert_eq!(p.allocations["open"].phase, Phase::Active);
        assert_eq!(p.allocations["open"].wake_at, Some(t(500)));
    }

    #[test]
    fn quotas_sum_active_grants_per_resource_and_zero_the_rest() {
        let mut w = world(4, 1);
        // A second GPU pool with the same resource name: quotas sum them.
        let mut b200 = w.pools[0].clone();
        b200.name = "b200".into();
        b200.members.clear();
        b200.allocatable = 16;
        w.pools.push(b200);
        let mut a = alloc("a", &[("h200", 8, false), ("b200", 8, false), ("atom", 8, false)]);
        a.grants[0].borrowing_limit = 4;
        a.namespaces = vec!["team".into()];
        let mut b = alloc("b", &[("h200", 8, false)]);
        b.namespaces = vec!["team".into(), "other".into()];
        let mut later = alloc("later", &[("h200", 8, false)]);
        later.namespaces = vec!["waiting".into()];
        later.window_start = Some(t(1000));
        let mut gone = alloc("gone", &[("h200", 8, false)]);
        gone.namespaces = vec!["forgotten".into()];
        gone.deleting = true;
        let p = run(&w, &[a, b, later, gone], &BTreeMap::new());
        assert_eq!(p.quotas["team"][GPU], 8 + 4 + 8 + 8);
        assert_eq!(p.quotas["team"][ATOM], 8);
        assert_eq!(p.quotas["other"][GPU], 8);
        assert_eq!(p.quotas["other"][ATOM], 0);
        assert_eq!(p.quotas["waiting"][GPU], 0, "no accelerators without an active grant");
        assert!(!p.quotas.contains_key("forgotten"), "no allocation lists it any more");
    }

    proptest! {
        /// Whatever the grants: no pool grants more than it can allocate except
        /// to holders, no node is reserved twice, quotas are never negative.
        #[test]
        fn plan_invariants(
            grants in proptest::collection::vec((0usize..2, 1i64..40, any::<bool>(), any::<bool>(), -5i32..5), 1..12),
            gpu_nodes in 0usize..8,
            npu_nodes in 0usize..4,
        ) {
            let w = world(gpu_nodes, npu_nodes);
            let allocs: Vec<AllocationState> = grants.iter().enumerate().map(|(i, (pool, n, dedicated, held, prio))| {
                let mut a = alloc(&format!("a{i}"), &[(["h200", "atom"][*pool], *n, *dedicated)]);
                a.was_active = *held;
                a.priority = *prio;
                a
            }).collect();
            let p = run(&w, &allocs, &BTreeMap::new());
            for pool in &w.pools {
                let held: i64 = allocs.iter().filter(|a| a.was_active && p.allocations[&a.name].phase == Phase::Active)
                    .flat_map(|a| p.allocations[&a.name].pools.get(&pool.name)).map(|g| g.granted).sum();
                let granted = p.pools[&pool.name].granted;
                prop_assert!(granted <= pool.allocatable.max(held), "{} granted {} of {}", pool.name, granted, pool.allocatable);
            }
            let mut seen = BTreeSet::new();
            for a in p.allocations.values() {
                for g in a.pools.values() {
                    for n in &g.reserved_nodes {
                        prop_assert!(seen.insert(n.clone()), "node {} reserved twice", n);
                    }
                }
                prop_assert!(a.phase != Phase::Active || a.blocker.is_none());
            }
            for q in p.quotas.values() {
                prop_assert!(q.values().all(|v| *v >= 0));
            }
        }
    }
}
