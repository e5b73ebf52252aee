//! Gang admission at national scale: one `placement::admit` pass over a
//! snapshot built in code (about 2,750 nodes in five pools, 40 allocations,
//! queues of up to 2,000 gangs).
//!
//! Run with `cargo bench --bench planner`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, criterion_group, criterion_main};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sovereign_operator::planner::inventory::NodeInfo;
use sovereign_operator::planner::placement::{
    AllocationQuota, GangRequest, NodeFree, Outcome, PlacementInput, PlacementPool, TopologyRequest, admit, admit_pass,
};
use sovereign_operator::planner::preemption::RunningGang;

const BLOCK: &str = "topology.sovereign.ai/block";
const RACK: &str = "topology.sovereign.ai/rack";
const RACK_NODES: usize = 16;
const BLOCK_RACKS: usize = 8;
const FULL_NODES: usize = 2_750;

/// (pool, resource, nodes at full scale, devices per node)
const POOLS: [(&str, &str, usize, i64); 5] = [
    ("h200", "nvidia.com/gpu", 800, 8),
    ("b200", "nvidia.com/gpu", 450, 8),
    ("gh200", "nvidia.com/gpu", 1_000, 4),
    ("atom", "rebellions.ai/ATOM", 250, 8),
    ("rngd", "furiosa.ai/rngd", 250, 8),
];

/// Preference lists: NPU first with a GPU fallback, GPU only, GH200 (4 per node).
const PREFERENCES: [&[&str]; 6] =
    [&["atom", "h200"], &["rngd", "b200"], &["h200"], &["b200", "h200"], &["gh200"], &["atom", "rngd", "h200"]];

/// Deterministic pseudo-random numbers (Knuth's MMIX LCG).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Snapshot {
    nodes: Vec<NodeInfo>,
    pools: Vec<PlacementPool>,
    allocations: Vec<AllocationQuota>,
    queue: Vec<GangRequest>,
    now: Timestamp,
    starvation_after: SignedDuration,
    running: Vec<RunningGang>,
}

impl Snapshot {
    fn input(&self) -> PlacementInput<'_> {
        PlacementInput {
            nodes: &self.nodes,
            pools: &self.pools,
            allocations: &self.allocations,
            queue: &self.queue,
            now: self.now,
            starvation_after: self.starvation_after,
            running: &self.running,
            releasing: &[],
            cache: None,
        }
    }
}

/// About `total_nodes` nodes split over the five pools in the full-scale
/// proportions, 40 allocations and `gangs` queued gangs.
fn snapshot(total_nodes: usize, gangs: usize) -> Snapshot {
    let mut rng = Lcg(0x5eed_2026);
    let now = Timestamp::from_second(1_800_000_000).unwrap();
    let mut nodes = Vec::with_capacity(total_nodes);
    let mut pools = Vec::new();
    for (name, resource, full, per_node) in POOLS {
        let count = (full * total_nodes).div_ceil(FULL_NODES);
        let mut pool = PlacementPool {
            name: name.into(),
            resource_name: resource.into(),
            levels: vec![BLOCK.into(), RACK.into()],
            ..Default::default()
        };
        for i in 0..count {
            let rack = i / RACK_NODES;
            let block = rack / BLOCK_RACKS;
            let devices: std::sync::Arc<BTreeMap<String, i64>> =
                std::sync::Arc::new([(resource.to_string(), per_node)].into());
            nodes.push(NodeInfo {
                name: format!("{name}-{i:04}"),
                labels: [
                    (BLOCK.to_string(), format!("{name}-b{block:02}")),
                    (RACK.to_string(), format!("{name}-r{rack:03}")),
                    ("kubernetes.io/hostname".to_string(), format!("{name}-{i:04}")),
                ]
                .into_iter()
                .collect::<BTreeMap<_, _>>()
                .into(),
                ready: true,
                not_ready_since: None,
                capacity: devices.clone(),
                allocatable: devices,
            });
            // 70% idle, 20% partly used, 10% full.
            let free = match rng.below(10) {
                0..7 => per_node,
                7..9 => rng.below(per_node as u64) as i64,
                _ => 0,
            };
            let nf = NodeFree { node: nodes.len() - 1, free };
            // The first block of h200 and b200 is reserved for four dedicated grants.
            let dedicated_owner = (block == 0 && (name == "h200" || name == "b200")).then_some(rack / 2);
            match dedicated_owner {
                Some(owner) => pool.reserved_nodes.entry(format!("team{owner:02}")).or_default().push(nf),
                None => pool.shared_nodes.push(nf),
            }
        }
        pools.push(pool);
    }

    let allocations = (0..40)
        .map(|i| {
            let mut a = AllocationQuota { name: format!("team{i:02}"), ..Default::default() };
            let npu = if i % 2 == 0 { "atom" } else { "rngd" };
            a.headroom.insert(npu.into(), 256 + 64 * rng.below(5) as i64);
            for gpu in ["h200", "b200", "gh200"] {
                if i < 4 || rng.below(3) > 0 {
                    a.headroom.insert(gpu.into(), 512 + 128 * rng.below(5) as i64);
                }
            }
            if i < 4 {
                a.dedicated.insert("h200".into());
                a.dedicated.insert("b200".into());
            }
            if i % 13 == 12 {
                a.blocked = Some(format!("allocation team{i:02} is Pending: window opens at 2027-03-01T00:00:00Z"));
            }
            a
        })
        .collect();

    let queue = (0..gangs)
        .map(|i| {
            let pools = PREFERENCES[rng.below(PREFERENCES.len() as u64) as usize];
            let per_worker = if pools == ["gh200"] || rng.below(4) == 0 { 4 } else { 8 };
            // Mostly small gangs, some up to 64 nodes.
            let workers = [1, 1, 2, 2, 4, 4, 8, 8, 16, 32, 64][rng.below(11) as usize];
            let topology = match rng.below(10) {
                0 => Some(TopologyRequest { key: RACK.into(), required: true }),
                1 => Some(TopologyRequest { key: BLOCK.into(), required: true }),
                2..5 => Some(TopologyRequest { key: RACK.into(), required: false }),
                _ => None,
            };
            let team = rng.below(40);
            let priority = if rng.below(10) == 0 { 100 } else { 0 };
            GangRequest {
                key: format!("team{team:02}/run-{i:04}"),
                allocation: format!("team{team:02}"),
                pools: pools.iter().map(|p| p.to_string()).collect(),
                workers,
                per_worker,
                priority,
                queued_since: now - SignedDuration::from_secs(rng.below(8 * 3600) as i64),
                topology,
                preemptible: true,
                preemption_priority: priority,
            }
        })
        .collect();
    // Queued over the last 8 hours: the anti-starvation rule holds some queues.
    Snapshot { nodes, pools, allocations, queue, now, starvation_after: SignedDuration::from_hours(6), running: vec![] }
}

/// The national snapshot with every shared node busy: running gangs of 1 to 8
/// nodes (priority 0 to 49, one in five borrowed) fill the shared nodes, and a
/// tenth of the queue has priority 100. Every waiting gang looks for victims.
fn contended(gangs: usize) -> Snapshot {
    let mut s = snapshot(FULL_NODES, gangs);
    let mut rng = Lcg(0xc0ffee);
    for pool in &mut s.pools {
        let granted: Vec<&AllocationQuota> =
            s.allocations.iter().filter(|a| a.headroom.contains_key(&pool.name)).collect();
        let mut i = 0;
        while i < pool.shared_nodes.len() {
            let size = (1 + rng.below(8) as usize).min(pool.shared_nodes.len() - i);
            let per_worker = s.nodes[pool.shared_nodes[i].node].allocatable_of(&pool.resource_name);
            let owner = granted[rng.below(granted.len() as u64) as usize];
            let members = &mut pool.shared_nodes[i..i + size];
            s.running.push(RunningGang {
                key: format!("{}/busy-{}-{i}", owner.name, pool.name),
                allocation: owner.name.clone(),
                pool: pool.name.clone(),
                nodes: members.iter().map(|nf| nf.node).collect(),
                per_worker,
                priority: rng.below(50) as i32,
                started: s.now - SignedDuration::from_secs(rng.below(86_400) as i64),
                borrowed: rng.below(5) == 0,
                preemptible: true,
                protected_until: None,
            });
            for nf in members {
                nf.free = 0;
            }
            i += size;
        }
    }
    s
}

fn describe(label: &str, s: &Snapshot) {
    let pass = admit_pass(&s.input());
    let out = pass.outcomes;
    let mut admitted = 0;
    let mut behind = 0;
    let mut blocked = 0;
    for o in &out {
        match o {
            Outcome::Admitted { .. } => admitted += 1,
            Outcome::Waiting { reason, .. } if reason.starts_with("waiting behind") => behind += 1,
            Outcome::Waiting { reason, .. } if reason.contains("is Pending") => blocked += 1,
            Outcome::Waiting { .. } => {}
        }
    }
    eprintln!(
        "{label}: {} nodes, {} gangs: {admitted} admitted, {} waiting for capacity, {behind} behind a starving gang, \
         {blocked} of blocked allocations; {} running gangs, {} preemptions of {} victims",
        s.nodes.len(),
        s.queue.len(),
        out.len() - admitted - behind - blocked,
        s.running.len(),
        pass.preemptions.len(),
        pass.preemptions.iter().map(|p| p.victims.len()).sum::<usize>()
    );
}

/// Modest measurement so the whole bench runs in about a minute on 2 cores.
fn group<'c>(c: &'c mut Criterion, name: &str) -> BenchmarkGroup<'c, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g
}

fn national(c: &mut Criterion) {
    let s = snapshot(FULL_NODES, 1_000);
    describe("national", &s);
    // The worst case for the planner: no queue is held, every gang is placed or
    // found not to fit.
    let mut all_tried = snapshot(FULL_NODES, 1_000);
    all_tried.starvation_after = SignedDuration::from_hours(24 * 365);
    describe("national, no starving gang", &all_tried);
    let mut g = group(c, "admit");
    g.bench_function("national_1000_gangs_2750_nodes", |b| b.iter(|| admit(black_box(&s.input()))));
    g.bench_function("national_1000_gangs_2750_nodes_no_starvation", |b| {
        b.iter(|| admit(black_box(&all_tried.input())))
    });
    // Preemption and reclaim searched for every waiting gang (ratio to the first).
    let full = contended(1_000);
    describe("national, every shared node busy", &full);
    g.bench_function("national_1000_gangs_2750_nodes_all_busy_preempting", |b| {
        b.iter(|| admit_pass(black_box(&full.input())))
    });
    g.finish();
}

fn scaling(c: &mut Criterion) {
    let mut g = group(c, "admit_gangs");
    for gangs in [250, 500, 1_000, 2_000] {
        let s = snapshot(FULL_NODES, gangs);
        describe("gangs", &s);
        g.bench_with_input(BenchmarkId::new("2750_nodes", gangs), &s, |b, s| b.iter(|| admit(black_box(&s.input()))));
    }
    g.finish();
    let mut g = group(c, "admit_nodes");
    for total in [700, 1_400, FULL_NODES] {
        let s = snapshot(total, 1_000);
        describe("nodes", &s);
        g.bench_with_input(BenchmarkId::new("1000_gangs", total), &s, |b, s| b.iter(|| admit(black_box(&s.input()))));
    }
    g.finish();
}

criterion_group!(benches, national, scaling);
criterion_main!(benches);
