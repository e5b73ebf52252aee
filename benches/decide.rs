//! The admission core's `decide` on a national snapshot (about 2,750 nodes
//! in five pools, 40 allocations, 1,000 waiting gangs beside running ones) and
//! on one eight times larger (22,000 nodes, 144,000 devices, 8,000 waiting
//! gangs). `steady` is the loop's cycle when nothing changed since the last:
//! the same snapshot again, its placement cache warm.
//!
//! Also prints the snapshot's heap bytes per node and per gang at both
//! scales (a counting allocator), to show its memory grows linearly.
//!
//! Run with `cargo bench --bench decide`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sovereign_operator::admission::{Gang, GangKey, GangState, Holding, Settings, Snapshot, decide};
use sovereign_operator::planner::grants::{self, AllocationState, GrantInput, GrantState, PoolState};
use sovereign_operator::planner::inventory::NodeInfo;
use sovereign_operator::planner::request::TopologyRequest;

/// Counts live heap bytes, for the memory figures.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const BLOCK: &str = "topology.sovereign.ai/block";
const RACK: &str = "topology.sovereign.ai/rack";
const RACK_NODES: usize = 16;
const BLOCK_RACKS: usize = 8;
const ALLOCATIONS: usize = 40;

/// (pool, resource, nodes at national scale, devices per node)
const POOLS: [(&str, &str, usize, i64); 5] = [
    ("h200", "nvidia.com/gpu", 800, 8),
    ("b200", "nvidia.com/gpu", 450, 8),
    ("gh200", "nvidia.com/gpu", 1_000, 4),
    ("atom", "rebellions.ai/ATOM", 250, 8),
    ("rngd", "furiosa.ai/rngd", 250, 8),
];

const PREFERENCES: [&[&str]; 6] =
    [&["atom", "h200"], &["rngd", "b200"], &["h200"], &["b200", "h200"], &["gh200"], &["atom", "rngd", "h200"]];

fn now() -> Timestamp {
    Timestamp::from_second(1_796_000_000).expect("a time")
}

/// Deterministic pseudo-random numbers (Knuth's MMIX LCG).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// The capacity side: nodes in blocks of racks, pools, allocations sharing
/// each pool's capacity in grants (a fifth of them may borrow).
fn capacity(scale: usize) -> (Vec<NodeInfo>, Vec<PoolState>, Vec<AllocationState>) {
    let mut nodes = Vec::new();
    let mut pools = Vec::new();
    for (pool, res, count, per) in POOLS {
        let count = count * scale;
        let first = nodes.len();
        for i in 0..count {
            let (rack, block) = (i / RACK_NODES, i / (RACK_NODES * BLOCK_RACKS));
            let labels = BTreeMap::from([
                ("pool".to_string(), pool.to_string()),
                (BLOCK.to_string(), format!("{pool}-b{block}")),
                (RACK.to_string(), format!("{pool}-r{rack}")),
                ("kubernetes.io/hostname".to_string(), format!("{pool}-{i}")),
            ]);
            let devices = Arc::new(BTreeMap::from([(res.to_string(), per)]));
            nodes.push(NodeInfo {
                name: format!("{pool}-{i}"),
                labels: Arc::new(labels),
                ready: true,
                not_ready_since: None,
                capacity: devices.clone(),
                allocatable: devices,
            });
        }
        pools.push(PoolState {
            name: pool.into(),
            resource_name: res.into(),
            domestic: pool == "atom" || pool == "rngd",
            levels: vec![BLOCK.into(), RACK.into()],
            members: (first..first + count).collect(),
            allocatable: count as i64 * per,
        });
    }
    let allocations = (0..ALLOCATIONS)
        .map(|a| AllocationState {
            name: format!("alloc-{a}"),
            priority: 0,
            created: now() - SignedDuration::from_hours(24 * 30),
            namespaces: vec![format!("team-{a}")],
            window_start: None,
            window_end: None,
            grants: POOLS
                .iter()
                .map(|(pool, _, count, per)| GrantState {
                    pool: pool.to_string(),
                    accelerators: (*count * scale) as i64 * per / ALLOCATIONS as i64,
                    dedicated: false,
                    borrowing_limit: if a % 5 == 0 { *per * 4 } else { 0 },
                })
                .collect(),
            budget_hours: None,
            hours_used: 0.0,
            min_domestic_share: None,
            was_active: true,
            budget_used_up: false,
            deleting: false,
        })
        .collect();
    (nodes, pools, allocations)
}

/// Running gangs on about half of every pool, then `waiting` gangs queued.
fn gangs(nodes: &[NodeInfo], pools: &[PoolState], waiting: usize) -> Vec<Gang> {
    let mut rng = Lcg(42);
    let mut out = Vec::new();
    for p in pools {
        // Gangs of 4 nodes, whole nodes each, on every other group of 4.
        for (g, chunk) in p.members.chunks(4).enumerate().filter(|(g, _)| g % 2 == 0) {
            let a = rng.next(ALLOCATIONS as u64);
            let per = nodes[chunk[0]].allocatable_of(&p.resource_name);
            out.push(Gang {
                key: GangKey::model_project(format!("team-{a}"), format!("run-{}-{g}", p.name)),
                allocation: format!("alloc-{a}"),
                pools: vec![p.name.clone()],
                workers: chunk.len() as u32,
                per_worker: per,
                topology: None,
                priority: rng.next(3) as i32,
                preemptible: true,
                queued_since: now() - SignedDuration::from_hours(2),
                state: GangState::Holding(Holding {
                    pool: p.name.clone(),
                    nodes: chunk.iter().map(|&i| nodes[i].name.clone()).collect(),
                    borrowed: false,
                    admitted_at: Some(now() - SignedDuration::from_hours(1)),
                    protected_until: None,
                }),
            });
        }
    }
    for j in 0..waiting {
        let a = rng.next(ALLOCATIONS as u64);
        let prefs = PREFERENCES[rng.next(PREFERENCES.len() as u64) as usize];
        let workers = [1u32, 2, 4, 8, 16][rng.next(5) as usize];
        out.push(Gang {
            key: GangKey::model_project(format!("team-{a}"), format!("queued-{j}")),
            allocation: format!("alloc-{a}"),
            pools: prefs.iter().map(|p| p.to_string()).collect(),
            workers,
            per_worker: if prefs[0] == "gh200" { 4 } else { 8 },
            topology: (j % 3 == 0).then(|| TopologyRequest { key: RACK.into(), required: j % 6 == 0 }),
            priority: rng.next(3) as i32,
            preemptible: j % 10 != 0,
            queued_since: now() - SignedDuration::from_secs(rng.next(1_800) as i64),
            state: GangState::Waiting { restarting: false, displaced: false },
        });
    }
    out
}

fn snapshot(scale: usize, waiting: usize) -> Snapshot {
    let (nodes, pools, allocations) = capacity(scale);
    let gangs = gangs(&nodes, &pools, waiting);
    let plan = grants::plan(&GrantInput {
        nodes: &nodes,
        pools: &pools,
        allocations: &allocations,
        labelled: &BTreeMap::new(),
        busy: &Default::default(),
        node_grace: SignedDuration::from_secs(300),
        now: now(),
    });
    Snapshot {
        node_index: Arc::new(nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect()),
        nodes: Arc::new(nodes),
        pools: Arc::new(pools),
        allocations: Arc::new(allocations),
        grants: Arc::new(plan),
        labelled: Arc::default(),
        hard_budget: Arc::default(),
        placement: Arc::default(),
        foreign: Vec::new(),
        releasing: Vec::new(),
        gangs,
    }
}

fn settings() -> Settings {
    Settings { starvation_after: SignedDuration::from_secs(900), min_run: SignedDuration::from_secs(600) }
}

/// Live heap bytes of what `make` returns.
fn heap<T>(make: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let t = make();
    (t, LIVE.load(Ordering::Relaxed).saturating_sub(before))
}

fn memory() {
    for scale in [1, 8] {
        let (cap, cap_bytes) = heap(|| capacity(scale));
        let n = cap.0.len();
        let (gangs, gang_bytes) = heap(|| gangs(&cap.0, &cap.1, 1_000 * scale));
        eprintln!(
            "snapshot x{scale}: {n} nodes, {} gangs: {:.0} bytes per node (nodes, pools, grants), {:.0} bytes per gang",
            gangs.len(),
            cap_bytes as f64 / n as f64,
            gang_bytes as f64 / gangs.len() as f64
        );
    }
}

fn decides(c: &mut Criterion) {
    memory();
    let mut g = c.benchmark_group("decide");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for (scale, waiting) in [(1, 1_000), (8, 8_000)] {
        let snap = snapshot(scale, waiting);
        let nodes = snap.nodes.len();
        let d = decide(&snap, now(), &settings());
        assert!(d.gangs.len() >= waiting, "every waiting gang is decided");
        // The loop's steady cycle: nothing changed, the placement cache warm.
        g.bench_with_input(BenchmarkId::new("steady", nodes), &nodes, |b, _| {
            b.iter(|| black_box(decide(&snap, now(), &settings())))
        });
        // A cold pass: a new placement cache (nodes or their labels changed).
        g.bench_with_input(BenchmarkId::new("cold", nodes), &nodes, |b, _| {
            b.iter(|| {
                let fresh = Snapshot { placement: Arc::default(), ..snap.clone() };
                black_box(decide(&fresh, now(), &settings()))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decides);
criterion_main!(benches);
