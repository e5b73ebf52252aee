//! The admission core on plain snapshots: one table row per rule, then
//! properties over random snapshots and random batches of arrivals.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

use super::*;
use crate::planner::grants::{self, AllocationState, GrantInput, GrantState, PoolState};
use crate::planner::inventory::NodeInfo;
use crate::planner::request::TopologyRequest;

const RES: &str = "nvidia.com/gpu";

fn now() -> Timestamp {
    "2026-12-01T12:00:00Z".parse().unwrap()
}

fn ago(secs: i64) -> Timestamp {
    now() - SignedDuration::from_secs(secs)
}

fn settings() -> Settings {
    Settings { starvation_after: SignedDuration::from_secs(900), min_run: SignedDuration::from_secs(600) }
}

/// A cluster: pools of `devices`-device nodes in racks of two.
#[derive(Clone, Debug, Default)]
struct Fixture {
    nodes: Vec<NodeInfo>,
    pools: Vec<PoolState>,
    allocations: Vec<AllocationState>,
    gangs: Vec<Gang>,
    foreign: Vec<(usize, BTreeMap<String, i64>)>,
}

impl Fixture {
    fn pool(mut self, name: &str, nodes: usize, devices: i64) -> Self {
        let first = self.nodes.len();
        for i in 0..nodes {
            let labels = BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), format!("{name}-{i}")),
                ("rack".to_string(), format!("{name}-r{}", i / 2)),
            ]);
            let res = Arc::new(BTreeMap::from([(RES.to_string(), devices)]));
            self.nodes.push(NodeInfo {
                name: format!("{name}-{i}"),
                labels: Arc::new(labels),
                ready: true,
                not_ready_since: None,
                capacity: res.clone(),
                allocatable: res,
            });
        }
        self.pools.push(PoolState {
            name: name.into(),
            resource_name: RES.into(),
            domestic: false,
            levels: vec!["rack".into()],
            members: (first..first + nodes).collect(),
            allocatable: nodes as i64 * devices,
        });
        self
    }

    /// An allocation with (pool, grant, borrowing limit) grants.
    fn allocation(mut self, name: &str, grants: &[(&str, i64, i64)]) -> Self {
        self.allocations.push(AllocationState {
            name: name.into(),
            priority: 0,
            created: ago(86_400),
            namespaces: vec!["t".into()],
            window_start: None,
            window_end: None,
            grants: grants
                .iter()
                .map(|(pool, accelerators, borrowing_limit)| GrantState {
                    pool: pool.to_string(),
                    accelerators: *accelerators,
                    dedicated: false,
                    borrowing_limit: *borrowing_limit,
                })
                .collect(),
            budget_hours: None,
            hours_used: 0.0,
            min_domestic_share: None,
            was_active: true,
            budget_used_up: false,
            deleting: false,
        });
        self
    }

    fn gang(mut self, g: Gang) -> Self {
        self.gangs.push(g);
        self
    }

    /// Devices of `node` held by a pod the operator does not own.
    fn foreign(mut self, node: &str, devices: i64) -> Self {
        let i = self.nodes.iter().position(|n| n.name == node).expect("a node of the fixture");
        // One entry per node, as the model keeps them.
        match self.foreign.iter_mut().find(|(n, _)| *n == i) {
            Some((_, held)) => *held.entry(RES.to_string()).or_default() += devices,
            None => self.foreign.push((i, BTreeMap::from([(RES.to_string(), devices)]))),
        }
        self
    }

    fn snapshot(&self) -> Snapshot {
        let plan = grants::plan(&GrantInput {
            nodes: &self.nodes,
            pools: &self.pools,
            allocations: &self.allocations,
            labelled: &BTreeMap::new(),
            busy: &BTreeSet::new(),
            node_grace: SignedDuration::from_secs(300),
            now: now(),
        });
        Snapshot {
            node_index: Arc::new(self.nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect()),
            nodes: Arc::new(self.nodes.clone()),
            pools: Arc::new(self.pools.clone()),
            allocations: Arc::new(self.allocations.clone()),
            grants: Arc::new(plan),
            labelled: Arc::default(),
            hard_budget: Arc::default(),
            placement: Arc::default(),
            foreign: self.foreign.clone(),
            releasing: Vec::new(),
            gangs: self.gangs.clone(),
        }
    }

    fn decide(&self) -> Decisions {
        decide(&self.snapshot(), now(), &settings())
    }
}

/// A waiting gang of `workers` x `per` devices, queued `age` seconds ago.
fn waiting(name: &str, alloc: &str, pools: &[&str], workers: u32, per: i64, priority: i32, age: i64) -> Gang {
    Gang {
        key: GangKey::model_project("t", name),
        allocation: alloc.into(),
        pools: pools.iter().map(|p| p.to_string()).collect(),
        workers,
        per_worker: per,
        topology: None,
        priority,
        preemptible: true,
        queued_since: ago(age),
        state: GangState::Waiting { restarting: false, displaced: false },
    }
}

/// A gang holding `per` devices on each of `nodes`.
fn holding(name: &str, alloc: &str, pool: &str, nodes: &[&str], per: i64, priority: i32, borrowed: bool) -> Gang {
    Gang {
        state: GangState::Holding(Holding {
            pool: pool.into(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            borrowed,
            admitted_at: Some(ago(3_600)),
            protected_until: None,
        }),
        ..waiting(name, alloc, &[pool], nodes.len() as u32, per, priority, 7_200)
    }
}

fn key(name: &str) -> GangKey {
    GangKey::model_project("t", name)
}

fn admitted(d: &Decisions, name: &str) -> (String, Vec<String>, bool) {
    match d.get(&key(name)) {
        Some(Decision::Admit { pool, nodes, borrowed, .. }) => (pool.clone(), nodes.clone(), *borrowed),
        other => panic!("{name} not admitted: {other:?}"),
    }
}

fn wait_of(d: &Decisions, name: &str) -> (WaitReason, String, Vec<GangKey>) {
    match d.get(&key(name)) {
        Some(Decision::Wait { why, message, victims, .. }) => (*why, message.clone(), victims.clone()),
        other => panic!("{name} does not wait: {other:?}"),
    }
}

#[test]
fn fit_admits_a_gang_whole_on_distinct_nodes() {
    let d = Fixture::default()
        .pool("a", 2, 8)
        .allocation("x", &[("a", 16, 0)])
        .gang(waiting("p", "x", &["a"], 2, 8, 0, 60))
        .decide();
    let (pool, nodes, borrowed) = admitted(&d, "p");
    assert_eq!(pool, "a");
    assert_eq!(nodes.iter().collect::<BTreeSet<_>>().len(), 2, "one node per worker");
    assert!(!borrowed, "within its grant");
}

#[test]
fn fallback_takes_the_next_pool_in_order_when_the_first_is_full() {
    let d = Fixture::default()
        .pool("a", 1, 8)
        .pool("b", 1, 8)
        .allocation("x", &[("a", 8, 0), ("b", 8, 0)])
        .foreign("a-0", 8)
        .gang(waiting("p", "x", &["a", "b"], 1, 8, 0, 60))
        .decide();
    assert_eq!(admitted(&d, "p").0, "b");
}

#[test]
fn starvation_guard_stops_backfill_behind_a_head_waiting_too_long() {
    let fixture = |head_age| {
        Fixture::default()
            .pool("a", 2, 8)
            .allocation("x", &[("a", 16, 0)])
            .foreign("a-0", 4)
            .gang(waiting("big", "x", &["a"], 2, 8, 0, head_age))
            .gang(waiting("small", "x", &["a"], 1, 4, 0, 10))
            .decide()
    };
    // Backfill: the head has not waited long, a smaller gang behind it fits.
    let d = fixture(60);
    assert_eq!(wait_of(&d, "big").0, WaitReason::Waiting);
    admitted(&d, "small");
    // Starvation guard: the head waited past the limit; nothing passes it.
    let d = fixture(3_600);
    let (why, message, _) = wait_of(&d, "small");
    assert_eq!(why, WaitReason::Waiting);
    assert!(message.contains("waiting behind t/big"), "{message}");
}

#[test]
fn preemption_takes_the_fewest_victims_lowest_priority_first() {
    let d = Fixture::default()
        .pool("a", 3, 8)
        .allocation("x", &[("a", 24, 0)])
        .gang(holding("low", "x", "a", &["a-0"], 8, 1, false))
        .gang(holding("mid", "x", "a", &["a-1"], 8, 5, false))
        .gang(holding("high", "x", "a", &["a-2"], 8, 9, false))
        .gang(waiting("urgent", "x", &["a"], 1, 8, 10, 60))
        .decide();
    let (why, _, victims) = wait_of(&d, "urgent");
    assert_eq!(why, WaitReason::Preempting);
    assert_eq!(victims, vec![key("low")], "one victim is enough: the least important");
    match d.get(&key("low")) {
        Some(Decision::Evict { by, reclaimed: false, message, .. }) => {
            assert_eq!(by, &key("urgent"));
            assert!(message.contains("priority 10 over 1"), "{message}");
        }
        other => panic!("low not preempted: {other:?}"),
    }
    assert_eq!(d.get(&key("mid")), None, "no other victim");
}

#[test]
fn reclaim_takes_borrowed_capacity_back_for_a_guaranteed_share() {
    let d = Fixture::default()
        .pool("a", 2, 8)
        .allocation("owner", &[("a", 8, 0)])
        .allocation("lender", &[("a", 8, 8)])
        .gang(holding("mine", "lender", "a", &["a-0"], 8, 0, false))
        .gang(holding("borrowed", "lender", "a", &["a-1"], 8, 0, true))
        .gang(waiting("back", "owner", &["a"], 1, 8, 0, 60))
        .decide();
    assert_eq!(wait_of(&d, "back").2, vec![key("borrowed")]);
    assert!(matches!(d.get(&key("borrowed")), Some(Decision::Evict { reclaimed: true, .. })));
    assert_eq!(d.get(&key("mine")), None, "within its own grant: never reclaimed");
}

#[test]
fn borrowing_is_decided_admission_by_admission_within_one_pass() {
    // Two gangs of one allocation arrive together: the first fits its grant,
    // the second only on borrowed capacity, and is marked so (reclaimable).
    let d = Fixture::default()
        .pool("a", 2, 8)
        .allocation("x", &[("a", 8, 8)])
        .allocation("idle", &[("a", 8, 0)])
        .gang(waiting("first", "x", &["a"], 1, 8, 0, 120))
        .gang(waiting("second", "x", &["a"], 1, 8, 0, 60))
        .decide();
    assert!(!admitted(&d, "first").2, "within the grant");
    assert!(admitted(&d, "second").2, "beyond the grant: borrowed");
}

#[test]
fn a_grant_no_longer_in_force_stops_its_gangs() {
    let mut f = Fixture::default().pool("a", 1, 8).allocation("x", &[("a", 8, 0)]);
    f.allocations[0].window_end = Some(ago(60));
    let d = f
        .gang(holding("run", "x", "a", &["a-0"], 8, 0, false))
        .gang(waiting("next", "x", &["a"], 1, 8, 0, 10))
        .decide();
    match d.get(&key("run")) {
        Some(Decision::Stop { message }) => assert!(message.contains("allocation x is Expired"), "{message}"),
        other => panic!("not stopped: {other:?}"),
    }
    assert_eq!(wait_of(&d, "next").0, WaitReason::AllocationInactive);
}

#[test]
fn a_gang_that_can_never_fit_says_so() {
    let d = Fixture::default()
        .pool("a", 2, 8)
        .allocation("x", &[("a", 16, 0)])
        .gang(waiting("wide", "x", &["a"], 3, 8, 0, 60))
        .gang(waiting("fat", "x", &["a"], 1, 16, 0, 60))
        .decide();
    for name in ["wide", "fat"] {
        let (why, message, _) = wait_of(&d, name);
        assert_eq!(why, WaitReason::Unsatisfiable, "{name}: {message}");
    }
}

#[test]
fn required_topology_keeps_a_gang_in_one_rack() {
    let mut g = waiting("p", "x", &["a"], 2, 8, 0, 60);
    g.topology = Some(TopologyRequest { key: "rack".into(), required: true });
    let d = Fixture::default().pool("a", 4, 8).allocation("x", &[("a", 32, 0)]).foreign("a-0", 8).gang(g).decide();
    let nodes = admitted(&d, "p").1;
    assert_eq!(nodes.iter().collect::<BTreeSet<_>>(), BTreeSet::from([&"a-2".to_string(), &"a-3".to_string()]));
}

// ---------------------------------------------------------------- properties

/// A random center: 1-3 pools of 2-6 nodes with 4 or 8 devices; 1-3
/// allocations sharing each pool's capacity in grants, some lending; foreign
/// pods on a few nodes; a batch of waiting gangs.
fn arb_fixture() -> impl Strategy<Value = Fixture> {
    let pools = prop::collection::vec((2usize..7, prop::sample::select(vec![4i64, 8])), 1..4);
    let allocs = 1usize..4;
    let gangs = prop::collection::vec(
        (0usize..3, 0usize..3, 1u32..4, 1i64..9, -2i32..3, 0i64..2_000, any::<bool>(), any::<bool>()),
        1..14,
    );
    let foreign = prop::collection::vec((0usize..20, 1i64..5), 0..4);
    let shares = prop::collection::vec(0i64..5, 9);
    (pools, allocs, gangs, foreign, shares).prop_map(|(pools, allocs, gangs, foreign, shares)| {
        let mut f = Fixture::default();
        let names = ["a", "b", "c"];
        for (i, (n, d)) in pools.iter().enumerate() {
            f = f.pool(names[i], *n, *d);
        }
        for a in 0..allocs {
            let grants: Vec<(&str, i64, i64)> = pools
                .iter()
                .enumerate()
                .map(|(p, (n, d))| {
                    // A quarter of the pool's devices per allocation at most: grants fit.
                    let grant = (*n as i64 * d) / 4 * shares[a * 3 + p] / 4;
                    let limit = if shares[(a * 3 + p + 1) % 9] > 1 { *d } else { 0 };
                    (names[p], grant, limit)
                })
                .collect();
            f = f.allocation(&format!("x{a}"), &grants);
        }
        for (i, d) in foreign {
            if i < f.nodes.len() {
                let name = f.nodes[i].name.clone();
                let cap = f.nodes[i].allocatable_of(RES);
                let held = f.foreign.iter().find(|(n, _)| *n == i).map(|(_, h)| h[RES]).unwrap_or(0);
                f = f.foreign(&name, d.min(cap - held));
            }
        }
        for (i, (a, p, workers, per, priority, age, fallback, preemptible)) in gangs.into_iter().enumerate() {
            let a = a % allocs;
            let mut order: Vec<&str> = vec![names[p % pools.len()]];
            if fallback && pools.len() > 1 {
                order.push(names[(p + 1) % pools.len()]);
            }
            let mut g = waiting(&format!("g{i}"), &format!("x{a}"), &order, workers, per, priority, age);
            g.preemptible = preemptible;
            f = f.gang(g);
        }
        f
    })
}

/// The decisions written back: admitted gangs hold their nodes, victims and
/// stopped gangs are gone (their pods released at once).
fn settle(f: &Fixture, d: &Decisions) -> Fixture {
    let mut next = f.clone();
    next.gangs = f
        .gangs
        .iter()
        .filter_map(|g| match d.get(&g.key) {
            Some(Decision::Admit { pool, nodes, borrowed, protected_until }) => Some(Gang {
                state: GangState::Holding(Holding {
                    pool: pool.clone(),
                    nodes: nodes.clone(),
                    borrowed: *borrowed,
                    admitted_at: Some(now()),
                    protected_until: *protected_until,
                }),
                ..g.clone()
            }),
            Some(Decision::Evict { .. } | Decision::Stop { .. }) => None,
            _ => Some(g.clone()),
        })
        .collect();
    next
}

/// Checks the invariants of one decision on `f`.
fn check(f: &Fixture, d: &Decisions) -> Result<(), TestCaseError> {
    let snap = f.snapshot();
    let pool_of: HashMap<&str, &PoolState> = snap.pools.iter().map(|p| (p.name.as_str(), p)).collect();
    // Devices per node: foreign pods, holding gangs (victims still hold theirs), admissions.
    let mut used: BTreeMap<&str, i64> = BTreeMap::new();
    for (i, held) in &f.foreign {
        *used.entry(f.nodes[*i].name.as_str()).or_default() += held.values().sum::<i64>();
    }
    // Per (allocation, pool): devices held before the pass, then the admissions.
    let mut held: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    let mut guaranteed: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for g in &f.gangs {
        if let Some(h) = g.holding() {
            for n in &h.nodes {
                *used.entry(n.as_str()).or_default() += g.per_worker;
            }
            *held.entry((g.allocation.as_str(), h.pool.as_str())).or_default() += g.devices();
            if !h.borrowed {
                *guaranteed.entry((g.allocation.as_str(), h.pool.as_str())).or_default() += g.devices();
            }
        }
    }
    let mut admitted: BTreeMap<(&str, &str), Vec<(i64, bool)>> = BTreeMap::new();
    for g in &f.gangs {
        let Some(Decision::Admit { pool, nodes, borrowed, .. }) = d.get(&g.key) else { continue };
        prop_assert!(g.holding().is_none(), "only waiting gangs are admitted");
        prop_assert_eq!(nodes.len(), g.workers as usize, "a whole gang");
        prop_assert_eq!(nodes.iter().collect::<BTreeSet<_>>().len(), nodes.len(), "distinct nodes");
        prop_assert!(g.pools.contains(pool), "a pool of its list");
        for n in nodes {
            prop_assert!(pool_of[pool.as_str()].members.iter().any(|&i| &f.nodes[i].name == n), "a member of the pool");
            *used.entry(n.as_str()).or_default() += g.per_worker;
        }
        admitted.entry((g.allocation.as_str(), pool.as_str())).or_default().push((g.devices(), *borrowed));
        if !borrowed {
            *guaranteed.entry((g.allocation.as_str(), pool.as_str())).or_default() += g.devices();
        }
    }
    for n in &f.nodes {
        let u = used.get(n.name.as_str()).copied().unwrap_or(0);
        prop_assert!(u <= n.allocatable_of(RES), "no device given twice: {} uses {u}", n.name);
    }
    for a in f.allocations.iter() {
        for gr in &a.grants {
            let k = (a.name.as_str(), gr.pool.as_str());
            let h = held.get(&k).copied().unwrap_or(0);
            let new = admitted.get(&k).cloned().unwrap_or_default();
            let total: i64 = h + new.iter().map(|(n, _)| n).sum::<i64>();
            if !new.is_empty() {
                prop_assert!(total <= gr.accelerators + gr.borrowing_limit, "{k:?}: {total} beyond grant + limit");
            }
            // Borrowed exactly when the admitted total, this gang included,
            // exceeds the grant: the ones within are a prefix that fits.
            let within: i64 = new.iter().filter(|(_, b)| !b).map(|(n, _)| n).sum();
            prop_assert!(
                new.iter().all(|(_, b)| *b) || h + within <= gr.accelerators,
                "{k:?}: unborrowed beyond grant"
            );
            if let Some(smallest) = new.iter().filter(|(_, b)| *b).map(|(n, _)| *n).min() {
                prop_assert!(h + within + smallest > gr.accelerators, "{k:?}: marked borrowed within its grant");
            }
            // Guaranteed shares are always reclaimable: what is not borrowed fits the grant.
            let g = guaranteed.get(&k).copied().unwrap_or(0);
            prop_assert!(g <= gr.accelerators.max(h - held_borrowed(f, k)), "{k:?}: {g} unborrowed over grant");
        }
    }
    Ok(())
}

/// Devices held before the pass on borrowed capacity.
fn held_borrowed(f: &Fixture, (alloc, pool): (&str, &str)) -> i64 {
    f.gangs
        .iter()
        .filter(|g| g.allocation == alloc && g.holding().is_some_and(|h| h.pool == pool && h.borrowed))
        .map(Gang::devices)
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn decisions_keep_devices_grants_and_guaranteed_shares(f in arb_fixture(), later in arb_fixture()) {
        // A first batch, written back; then a second batch arrives on top.
        let d = f.decide();
        check(&f, &d)?;
        let mut next = settle(&f, &d);
        for (i, mut g) in later.gangs.into_iter().enumerate() {
            g.key = GangKey::model_project("t", format!("late{i}"));
            if next.allocations.iter().any(|a| a.name == g.allocation) {
                next.gangs.push(g);
            }
        }
        let d2 = next.decide();
        check(&next, &d2)?;
    }

    #[test]
    fn the_same_decisions_whatever_the_order_of_the_gangs(f in arb_fixture(), seed in any::<u64>()) {
        let d = f.decide();
        let mut shuffled = f.clone();
        // A deterministic shuffle from the seed.
        let n = shuffled.gangs.len();
        let mut s = seed;
        for i in (1..n).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.gangs.swap(i, (s >> 33) as usize % (i + 1));
        }
        prop_assert_eq!(d, shuffled.decide());
    }
}
