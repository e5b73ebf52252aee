//! The one place where `plan` meets the operator's internals: in-memory
//! reflector stores are filled with the cluster's objects, and the operator's
//! own view builder, grant planner, allocation status builder and admission
//! pass decide. Everything else in `plan` works on [`Decision`].

use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Resource;

use super::Cluster;
use crate::admission::Decisions;
use crate::api::GpuAllocationStatus;
use crate::controller::admission;
use crate::controller::allocation::planned_status;
use crate::controller::stores::{PodIndex, Shared, Stores};
use crate::controller::view::View;
use crate::planner::grants::Phase;

/// The operator's settings that change decisions (`run`'s flags).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub node_grace: std::time::Duration,
    pub starvation_after: SignedDuration,
    /// How long a run admitted by preempting others is protected.
    pub min_run: SignedDuration,
}

impl Settings {
    /// The part that the admission core reads.
    pub fn admission(&self) -> crate::admission::Settings {
        crate::admission::Settings { starvation_after: self.starvation_after, min_run: self.min_run }
    }
}

/// A pool as planned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolPlan {
    pub domestic: bool,
    pub capacity: i64,
    pub allocatable: i64,
    pub granted: i64,
    pub reserved: i64,
    /// Devices requested by running pods.
    pub in_use: i64,
}

/// What the operator would decide for the cluster at one moment.
#[derive(Debug, Default)]
pub struct Decision {
    /// The status each allocation's reconcile would write.
    pub allocations: BTreeMap<String, GpuAllocationStatus>,
    /// Node -> allocation, for the nodes Active dedicated grants reserve.
    pub reserved: BTreeMap<String, String>,
    /// Namespace -> resource -> devices of its quota.
    pub quotas: BTreeMap<String, BTreeMap<String, i64>>,
    pub pools: BTreeMap<String, PoolPlan>,
    /// The admission core's decisions, as the admission loop takes them.
    pub gangs: Decisions,
}

fn shared<K>(objects: &[K]) -> Shared<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    Shared::fixed(objects)
}

/// The operator's stores (and model) filled with the cluster's objects, as its
/// watches would hold them.
pub fn stores(cluster: &Cluster) -> Stores {
    Stores {
        nodes: shared(&cluster.nodes),
        pools: shared(&cluster.pools),
        allocations: shared(&cluster.allocations),
        pods: shared(&cluster.pods),
        namespaces: shared(&cluster.namespaces),
        quotas: shared(&[]),
        services: shared(&[]),
        slices: shared(&[]),
        projects: shared(&cluster.projects),
        jobs: shared(&cluster.jobs),
        jobsets: shared(&cluster.jobsets),
        jobsets_at_start: true,
        workers: shared(&cluster.workers),
        workers_by_project: PodIndex::by_project().of(&cluster.workers),
        workers_by_namespace: PodIndex::by_namespace().of(&cluster.workers),
        // The ledger's: `plan` keeps the books as they are.
        workload_pods: shared(&[]),
        workload_pods_by_namespace: PodIndex::by_namespace(),
        pods_by_namespace: PodIndex::by_namespace().of(&cluster.pods),
        model: crate::controller::model::Model::of(&cluster.nodes, &cluster.pods),
        epoch: Arc::new(AtomicU64::new(0)),
    }
}

/// One decision of the operator: the view, every allocation's status, and the
/// admission core's decisions, as the controllers compute them from their
/// stores (the admission loop's own path: `controller::admission::decide`).
pub fn decide(cluster: &Cluster, now: Timestamp, settings: &Settings) -> Decision {
    let stores = stores(cluster);
    let view = View::build(&stores, settings.node_grace, now);
    let projects = stores.projects.store.state();
    let gangs = admission::decide(&view, &stores, &projects, now, &settings.admission());
    let mut d = Decision { quotas: view.grants.quotas.clone(), gangs, ..Default::default() };
    for a in &cluster.allocations {
        let name = a.metadata.name.clone().unwrap_or_default();
        let (Some(plan), Some(status)) = (view.grants.allocations.get(&name), planned_status(a, &view)) else {
            continue;
        };
        d.allocations.insert(name.clone(), status);
        if plan.phase == Phase::Active {
            for node in plan.pools.values().flat_map(|p| &p.reserved_nodes) {
                d.reserved.insert(node.clone(), name.clone());
            }
        }
    }
    for p in view.pools.iter() {
        let plan = view.grants.pools.get(&p.name).cloned().unwrap_or_default();
        let t = view.totals.get(&p.name).cloned().unwrap_or_default();
        let pool = PoolPlan {
            domestic: p.domestic,
            capacity: t.capacity,
            allocatable: t.allocatable,
            granted: plan.granted,
            reserved: plan.reserved,
            in_use: view.usage.by_pool.get(&p.name).copied().unwrap_or(0),
        };
        d.pools.insert(p.name.clone(), pool);
    }
    d
}
