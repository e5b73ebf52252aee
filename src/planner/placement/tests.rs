//! Admission and placement, the preemption search and fair share, through
//! whole passes; and the invariants of a pass as property tests.

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

/// A pass's outcomes by key, as the tests read them.
struct KeyedPass {
    outcomes: BTreeMap<String, Outcome>,
    preemptions: Vec<Preemption>,
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

    fn pass(&self, queue: &[GangRequest]) -> KeyedPass {
        let pass = admit_pass(&PlacementInput {
            nodes: &self.nodes,
            pools: &self.pools,
            allocations: &self.allocs,
            queue,
            now: self.now,
            starvation_after: self.starvation_after,
            running: &self.running,
            releasing: &self.releasing,
            cache: None,
        });
        let outcomes = queue.iter().map(|g| g.key.clone()).zip(pass.outcomes).collect();
        KeyedPass { outcomes, preemptions: pass.preemptions }
    }

    fn run_cached(&self, queue: &[GangRequest], cache: &PlacementCache) -> BTreeMap<String, Outcome> {
        self.run_with(queue, Some(cache))
    }

    fn run(&self, queue: &[GangRequest]) -> BTreeMap<String, Outcome> {
        self.run_with(queue, None)
    }

    fn run_with(&self, queue: &[GangRequest], cache: Option<&PlacementCache>) -> BTreeMap<String, Outcome> {
        admit(&PlacementInput {
            nodes: &self.nodes,
            pools: &self.pools,
            allocations: &self.allocs,
            queue,
            now: self.now,
            starvation_after: self.starvation_after,
            running: &self.running,
            releasing: &self.releasing,
            cache,
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
        Outcome::Admitted { pool, nodes, .. } => (pool.as_str(), nodes.iter().map(String::as_str).collect()),
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
    assert_eq!(reason_of(&out["ns/s"]), "h200: 32 free devices on shared nodes, needs 40 (4 of 5 nodes with 8 free)");
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

fn victims_of<'p>(pass: &'p KeyedPass, key: &str) -> Option<&'p Preemption> {
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
        reason_of(&pass.outcomes["ns/urgent"]).starts_with("preempting lower-priority ns/low3, ns/low1 in pool h200")
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
    w.releasing.push(Releasing { node: Some(r.nodes[0]), allocation: "lg".into(), pool: "h200".into(), devices: 8 });
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
    w.releasing.push(Releasing { node: Some(low1.nodes[0]), allocation: "lg".into(), pool: "h200".into(), devices: 8 });
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
        let fit: Vec<&str> = free.iter().filter(|(_, f)| f >= per).map(|(n, _)| n.as_str()).take(*workers).collect();
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
    /// A pass that reuses what earlier passes over the same nodes built (with
    /// another queue, or with other candidate nodes, as reservations change
    /// them) decides exactly what a pass that builds everything decides.
    #[test]
    fn the_placement_cache_never_changes_a_decision(c in case()) {
        let (w, queue) = build(&c);
        let cache = PlacementCache::default();
        let _ = w.run_cached(&queue[..queue.len() / 2], &cache);
        let mut fewer = w.clone();
        for p in &mut fewer.pools {
            p.shared_nodes.pop();
            for nodes in p.reserved_nodes.values_mut() {
                nodes.pop();
            }
        }
        prop_assert_eq!(fewer.run_cached(&queue, &cache), fewer.run(&queue));
        prop_assert_eq!(w.run_cached(&queue, &cache), w.run(&queue));
        prop_assert_eq!(w.run_cached(&queue, &cache), w.run(&queue));
    }

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
                Outcome::Admitted { pool, nodes, .. } => {
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
