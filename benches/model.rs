//! The admission loop's costs at national scale, on objects built in code
//! (the national profile's five pools, ten tenants):
//! - `model/node_event`, `model/pod_event`: one watch event applied to the
//!   incremental model, at 0.5x, 1x and 2x the national profile's 2,752 nodes
//!   (it should not grow with the cluster);
//! - `rebuild/nodes`: what each cycle used to pay instead, converting every
//!   node object again (the baseline of the same run);
//! - `cycle/nodes` and `cycle/queue`: one admission cycle (the view from the
//!   model, then every queue planned at once) as nodes and queued projects grow.
//!
//! Run with `cargo bench --bench model`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::watcher;
use serde_json::json;
use sovereign_operator::admission::{Decision, Settings};
use sovereign_operator::api::{GpuAllocation, ModelProject};
use sovereign_operator::controller::model::ModelState;
use sovereign_operator::controller::stores::Stores;
use sovereign_operator::controller::{admission, view::View};
use sovereign_operator::plan::{Cluster, stores};

const NATIONAL_NODES: usize = 2_752;
/// (pool, resource, label key, label value, share of the nodes, devices per node)
const POOLS: [(&str, &str, &str, &str, usize, i64); 5] = [
    ("h200", "nvidia.com/gpu", "nvidia.com/gpu.product", "NVIDIA-H200", 800, 8),
    ("b200", "nvidia.com/gpu", "nvidia.com/gpu.product", "NVIDIA-B200", 450, 8),
    ("gh200", "nvidia.com/gpu", "nvidia.com/gpu.product", "NVIDIA-GH200-480GB", 1_000, 4),
    ("atom", "rebellions.ai/ATOM", "rebellions.ai/npu.family", "ATOM", 250, 8),
    ("rngd", "furiosa.ai/rngd", "furiosa.ai/npu.family", "rngd", 250, 8),
];
const TENANTS: usize = 10;

fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

fn node(pool: usize, i: usize, heartbeat: &str) -> Node {
    let (name, res, key, value, _, per) = POOLS[pool];
    let host = format!("{name}-{i:05}");
    from(json!({
        "metadata": {"name": host, "labels": {
            key: value, "kubernetes.io/hostname": host, "type": "kwok",
            "topology.sovereign.ai/block": format!("{name}-b{:02}", i / 128),
            "topology.sovereign.ai/rack": format!("{name}-r{:03}", i / 16),
            "node.kubernetes.io/instance-type": format!("{name}-8"),
        }},
        "status": {
            "capacity": {res: per.to_string(), "cpu": "224", "memory": "2Ti", "pods": "110"},
            "allocatable": {res: per.to_string(), "cpu": "224", "memory": "2Ti", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": heartbeat}],
        }
    }))
}

fn pod(ns: &str, name: &str, node: &str, res: &str, devices: i64) -> Pod {
    from(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {res: devices.to_string()}}}]},
        "status": {"phase": "Running"},
    }))
}

/// A national center scaled to `nodes` nodes, with `queued` projects waiting
/// (NPU first with a GPU fallback, or GH200 alone) and one foreign pod on
/// every tenth node.
fn cluster(nodes: usize, queued: usize) -> Cluster {
    let mut c = Cluster::default();
    for (p, &(name, res, key, value, share, _)) in POOLS.iter().enumerate() {
        let count = (share * nodes).div_ceil(NATIONAL_NODES);
        for i in 0..count {
            c.nodes.push(node(p, i, "2026-12-01T00:00:00Z"));
            if i % 10 == 0 {
                c.pods.push(pod("system", &format!("{name}-{i}-agent"), &format!("{name}-{i:05}"), res, 1));
            }
        }
        c.pools.push(from(json!({
            "metadata": {"name": name},
            "spec": {"resourceName": res, "kind": "GPU", "vendor": "bench", "model": name,
                     "nodeSelector": {"matchLabels": {key: value}},
                     "topologyKeys": ["topology.sovereign.ai/block", "topology.sovereign.ai/rack", "kubernetes.io/hostname"]},
        })));
    }
    for t in 0..TENANTS {
        let ns = format!("team-{t:02}");
        c.namespaces.push(from::<Namespace>(json!({"metadata": {"name": ns}})));
        let grants: Vec<_> = POOLS
            .iter()
            .map(|&(name, _, _, _, share, per)| {
                json!({"pool": name, "accelerators": (share * nodes).div_ceil(NATIONAL_NODES) as i64 * per / TENANTS as i64})
            })
            .collect();
        c.allocations.push(from::<GpuAllocation>(json!({
            "metadata": {"name": ns, "creationTimestamp": "2026-11-01T00:00:00Z"},
            "spec": {"tenant": {"displayName": ns, "namespaces": [ns]}, "grants": grants},
            "status": {"phase": "Active"},
        })));
    }
    for j in 0..queued {
        let ns = format!("team-{:02}", j % TENANTS);
        let (pools, workers, per) = match j % 3 {
            0 => (json!(["atom", "h200"]), 2, 8),
            1 => (json!(["rngd", "b200"]), 2, 8),
            _ => (json!(["gh200"]), 3, 4),
        };
        c.projects.push(from::<ModelProject>(json!({
            "metadata": {"name": format!("run-{j:04}"), "namespace": ns, "resourceVersion": "1", "generation": 1,
                         "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {"allocation": ns, "placement": {"pools": pools}, "workers": workers,
                     "acceleratorsPerWorker": per, "template": {"image": "trainer:1"}},
        })));
    }
    c
}

fn model_events(c: &mut Criterion) {
    let mut g = c.benchmark_group("model");
    for scale in [NATIONAL_NODES / 2, NATIONAL_NODES, NATIONAL_NODES * 2] {
        let cl = cluster(scale, 0);
        let mut m = ModelState::default();
        for n in &cl.nodes {
            m.apply_node(&watcher::Event::Apply(n.clone()));
        }
        for p in &cl.pods {
            m.apply_pod(&watcher::Event::Apply(p.clone()));
        }
        // A node that turned NotReady and back, and a pod that starts and ends.
        let (down, up) = (node(0, 3, "2026-12-01T01:00:00Z"), node(0, 3, "2026-12-01T00:00:00Z"));
        let mut flip = false;
        g.bench_with_input(BenchmarkId::new("node_event", scale), &scale, |b, _| {
            b.iter(|| {
                flip = !flip;
                m.apply_node(&watcher::Event::Apply(if flip { down.clone() } else { up.clone() }));
            })
        });
        let started = pod("team-00", "bench-pod", "h200-00003", "nvidia.com/gpu", 8);
        g.bench_with_input(BenchmarkId::new("pod_event", scale), &scale, |b, _| {
            b.iter(|| {
                m.apply_pod(&watcher::Event::Apply(started.clone()));
                m.apply_pod(&watcher::Event::Delete(started.clone()));
            })
        });
        g.bench_with_input(BenchmarkId::new("view_nodes", scale), &scale, |b, _| b.iter(|| black_box(m.nodes())));
    }
    g.finish();
    let mut g = c.benchmark_group("rebuild");
    for scale in [NATIONAL_NODES / 2, NATIONAL_NODES, NATIONAL_NODES * 2] {
        let cl = cluster(scale, 0);
        g.bench_with_input(BenchmarkId::new("nodes", scale), &scale, |b, _| {
            b.iter(|| black_box(cl.nodes.iter().map(sovereign_operator::snapshot::node_info).collect::<Vec<_>>()))
        });
    }
    g.finish();
}

/// The benches' clock: one fixed moment.
fn now() -> Timestamp {
    Timestamp::from_second(1_796_000_000).expect("a time")
}

/// One admission cycle: the view from the model, then every queue planned.
/// With `previous`, the loop's steady state: no node and no pool changed since
/// that view, so its node and pool part and its placement cache are reused.
fn cycle(s: &Stores, previous: Option<&View>, projects: &[Arc<ModelProject>]) -> usize {
    let view = View::build_after(s, Duration::from_secs(300), now(), previous);
    let settings =
        Settings { starvation_after: SignedDuration::from_secs(600), min_run: SignedDuration::from_secs(600) };
    let d = admission::decide(&view, s, projects, now(), &settings);
    d.gangs.values().filter(|d| matches!(d, Decision::Admit { .. } | Decision::Wait { .. })).count()
}

fn cycles(c: &mut Criterion) {
    let mut g = c.benchmark_group("cycle");
    g.sample_size(20);
    let sizes = [NATIONAL_NODES / 2, NATIONAL_NODES, NATIONAL_NODES * 2].map(|n| ("nodes", n, n, 500));
    let queues = [250, 500, 1_000, 2_000].map(|q| ("queue", q, NATIONAL_NODES, q));
    for (axis, x, nodes, queued) in sizes.into_iter().chain(queues) {
        let s = stores(&cluster(nodes, queued));
        let projects = s.projects.store.state();
        assert_eq!(cycle(&s, None, &projects), queued, "every queued project gets an outcome");
        g.bench_with_input(BenchmarkId::new(axis, x), &x, |b, _| b.iter(|| black_box(cycle(&s, None, &projects))));
        let previous = View::build(&s, Duration::from_secs(300), now());
        cycle(&s, Some(&previous), &projects);
        g.bench_with_input(BenchmarkId::new(format!("steady_{axis}"), x), &x, |b, _| {
            b.iter(|| black_box(cycle(&s, Some(&previous), &projects)))
        });
    }
    g.finish();
}

criterion_group!(benches, model_events, cycles);
criterion_main!(benches);
