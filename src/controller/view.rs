//! The cluster as the planner sees it: built from the reflector stores, planned
//! once per change of any store, and shared by every reconciler of that moment.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::stores::Stores;
use crate::admission::{Gang, GangKind, Snapshot};
use crate::api::BudgetEnforcement;
use crate::planner::FastMap;
use crate::planner::grants::{self, AllocationState, GrantInput, GrantPlan, Phase, PoolState};
use crate::planner::inventory::{self, Membership, NodeInfo, PoolTotals};
use crate::planner::placement::PlacementCache;
use crate::planner::request::Releasing;
use crate::planner::usage::{self, PoolRate, Usage};
use k8s_openapi::api::core::v1::Pod;

use crate::snapshot::{
    self, ALLOCATION_LABEL, JOB_LABEL, JOBSET_LABEL, POOL_LABEL, PROJECT_LABEL, RESERVED_FOR, pod_requests,
};
use crate::telemetry::{AllocationGauges, Metrics};

/// A plan older than this is rebuilt even when no store changed, since time
/// alone moves windows and budgets.
const MAX_AGE: Duration = Duration::from_secs(1);

pub struct View {
    /// The store epoch this view was built at (or after).
    pub epoch: u64,
    pub now: Timestamp,
    pub nodes: Arc<Vec<NodeInfo>>,
    /// Node name -> index into `nodes`.
    pub node_index: Arc<FastMap<String, usize>>,
    pub membership: Arc<Membership>,
    /// Pools with a usable selector, with totals.
    pub pools: Arc<Vec<PoolState>>,
    pub totals: Arc<BTreeMap<String, PoolTotals>>,
    pub allocations: Arc<Vec<AllocationState>>,
    pub grants: Arc<GrantPlan>,
    pub usage: Usage,
    /// Node -> allocation named by its reservation label.
    pub labelled: Arc<BTreeMap<String, String>>,
    /// Allocation -> program, for metric labels.
    pub programs: BTreeMap<String, String>,
    /// Names of the namespaces that exist.
    pub namespaces: BTreeSet<String>,
    /// Namespaces without the tenant label that hold no quota of the operator: the
    /// chart's admission policy refuses the operator's quota and pods there.
    pub not_tenant: BTreeSet<String>,
    /// Allocations whose admins let projects be non-preemptible.
    pub allocation_allows_non_preemptible: BTreeSet<String>,
    /// Allocations whose budget enforcement is Hard (runs stop when it is used up).
    pub hard_budget: Arc<BTreeSet<String>>,
    capacity: Arc<Capacity>,
}

/// What the nodes and the pools' specs alone decide: which node is in which
/// pool and what each pool has. Rebuilt only when a node or a pool spec
/// changed, not on every pod or allocation change.
struct Capacity {
    /// The model's node version and every pool's (name, uid, generation).
    key: (u64, Vec<(String, String, i64)>),
    /// The model's label version and the same pools: what membership depends on.
    membership_key: (u64, Vec<(String, String, i64)>),
    nodes: Arc<Vec<NodeInfo>>,
    node_index: Arc<FastMap<String, usize>>,
    membership: Arc<Membership>,
    pools: Arc<Vec<PoolState>>,
    totals: Arc<BTreeMap<String, PoolTotals>>,
    rates: Vec<PoolRate>,
    /// Node name -> index into `rates`.
    node_pool: BTreeMap<String, usize>,
    /// What admission passes reuse while the nodes, their order and labels stay
    /// (kept with the membership).
    placement: Arc<PlacementCache>,
}

fn capacity_key(stores: &Stores) -> (u64, Vec<(String, String, i64)>) {
    let mut pools: Vec<(String, String, i64)> = stores
        .pools
        .store
        .state()
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default(), p.metadata.generation.unwrap_or_default()))
        .collect();
    pools.sort();
    (stores.model.read(|m| m.node_version()), pools)
}

impl Capacity {
    fn build(stores: &Stores, key: (u64, Vec<(String, String, i64)>), previous: Option<&Capacity>) -> Self {
        let (nodes, labels) = stores.model.read(|m| (m.nodes(), m.label_version()));
        let membership_key = (labels, key.1.clone());
        let pool_objs = stores.pools.store.state();
        let valid: Vec<_> = pool_objs.iter().filter_map(|p| snapshot::pool_info(p).ok().map(|i| (p, i))).collect();
        // Same nodes (so the same order) with the same labels, same pools: the
        // same membership. A readiness storm changes no membership.
        let membership = match previous {
            Some(c) if c.membership_key == membership_key => c.membership.clone(),
            _ => {
                let infos: Vec<_> = valid.iter().map(|(_, i)| i.clone()).collect();
                Arc::new(inventory::membership(&infos, &nodes))
            }
        };
        let mut pools = Vec::new();
        let mut rates: Vec<PoolRate> = Vec::new();
        let mut totals = BTreeMap::new();
        let mut node_pool: BTreeMap<String, usize> = BTreeMap::new();
        for (p, info) in &valid {
            let members = membership.nodes_by_pool.get(&info.name).cloned().unwrap_or_default();
            let t = inventory::pool_totals(&info.resource_name, &members, &nodes);
            for &i in &members {
                node_pool.insert(nodes[i].name.clone(), rates.len());
            }
            pools.push(snapshot::pool_state(p, members, &t));
            rates.push(snapshot::pool_rate(p));
            totals.insert(info.name.clone(), t);
        }
        let (node_index, placement) = match previous {
            Some(c) if c.membership_key == membership_key => (c.node_index.clone(), c.placement.clone()),
            _ => (
                Arc::new(nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect()),
                Arc::new(PlacementCache::default()),
            ),
        };
        Self {
            key,
            membership_key,
            nodes: Arc::new(nodes),
            node_index,
            membership,
            pools: Arc::new(pools),
            totals: Arc::new(totals),
            rates,
            node_pool,
            placement,
        }
    }
}

impl View {
    /// What admission passes over this view's nodes may reuse.
    pub fn placement_cache(&self) -> &PlacementCache {
        &self.capacity.placement
    }

    /// Everything an admission decision reads: this view's capacity and
    /// grants, the gangs, and from the stores the devices held by pods the
    /// operator does not own and by stopped gangs' pods still terminating.
    /// The one builder of [`Snapshot`], for the admission loop and for `plan`.
    pub fn snapshot(&self, stores: &Stores, gangs: Vec<Gang>) -> Snapshot {
        let foreign = stores.model.read(|m| {
            m.foreign()
                .iter()
                .filter_map(|(node, held)| Some((*self.node_index.get(node.as_str())?, held.clone())))
                .collect()
        });
        let holding = |kind: GangKind| -> HashSet<(&str, &str)> {
            gangs
                .iter()
                .filter(|g| g.holding().is_some() && g.key.kind == kind)
                .map(|g| (g.key.namespace.as_str(), g.key.name.as_str()))
                .collect()
        };
        let holders: [(GangKind, &str); 3] =
            [(GangKind::ModelProject, PROJECT_LABEL), (GangKind::Job, JOB_LABEL), (GangKind::JobSet, JOBSET_LABEL)];
        let held: Vec<HashSet<(&str, &str)>> = holders.iter().map(|(kind, _)| holding(*kind)).collect();
        // Pods of a gang that gave its devices back but are still terminating
        // keep their node's devices and count in its grant until they are gone:
        // workers of projects (any phase), running pods of admitted Jobs and JobSets.
        let mut releasing = Vec::new();
        // Workers come from their own store (any phase); Jobs' and JobSets' pods from the running ones.
        let labelled_by =
            |pod: &Pod| holders[1..].iter().position(|(_, label)| pod.labels().contains_key(*label)).map(|i| i + 1);
        let workload_pods = stores.pods.store.state().into_iter().filter_map(|p| Some((labelled_by(&p)?, p)));
        for (which, pod) in stores.workers.store.state().into_iter().map(|p| (0, p)).chain(workload_pods) {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let labels = pod.labels();
            let owner = (pod.metadata.namespace.as_deref().unwrap_or_default(), labels[holders[which].1].as_str());
            let holds = held[which].contains(&owner);
            if matches!(phase, Some("Succeeded" | "Failed")) || holds {
                continue;
            }
            let (Some(allocation), Some(pool)) = (labels.get(ALLOCATION_LABEL), labels.get(POOL_LABEL)) else {
                continue;
            };
            let Some(resource) = self.pool(pool).map(|p| p.resource_name.as_str()) else { continue };
            let devices = pod_requests(&pod).get(resource).copied().unwrap_or(0);
            let node =
                pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).and_then(|n| self.node_index.get(n)).copied();
            releasing.push(Releasing { node, allocation: allocation.clone(), pool: pool.clone(), devices });
        }
        Snapshot {
            nodes: self.nodes.clone(),
            node_index: self.node_index.clone(),
            pools: self.pools.clone(),
            allocations: self.allocations.clone(),
            grants: self.grants.clone(),
            labelled: self.labelled.clone(),
            hard_budget: self.hard_budget.clone(),
            placement: self.capacity.placement.clone(),
            foreign,
            releasing,
            gangs,
        }
    }

    /// The view of this moment; `previous` lends its node and pool part when
    /// no node and no pool spec changed since it was built.
    pub fn build(stores: &Stores, node_grace: Duration, now: Timestamp) -> Self {
        Self::build_after(stores, node_grace, now, None)
    }

    pub fn build_after(stores: &Stores, node_grace: Duration, now: Timestamp, previous: Option<&View>) -> Self {
        let epoch = stores.epoch();
        let key = capacity_key(stores);
        let capacity = match previous {
            Some(v) if v.capacity.key == key => v.capacity.clone(),
            _ => Arc::new(Capacity::build(stores, key, previous.map(|v| v.capacity.as_ref()))),
        };
        let nodes = &capacity.nodes;
        let pods = stores.model.read(|m| m.pod_uses());
        let alloc_objs = stores.allocations.store.state();
        let allocations: Vec<AllocationState> = alloc_objs.iter().map(|a| snapshot::allocation_state(a, now)).collect();
        let allocation_allows_non_preemptible =
            alloc_objs.iter().filter(|a| a.spec.allow_non_preemptible).map(|a| a.name_any()).collect();
        let hard_budget: BTreeSet<String> = alloc_objs
            .iter()
            .filter(|a| a.spec.budget.as_ref().is_some_and(|b| b.enforcement == BudgetEnforcement::Hard))
            .map(|a| a.name_any())
            .collect();
        let programs = alloc_objs.iter().map(|a| (a.name_any(), a.spec.program.clone().unwrap_or_default())).collect();
        let was_active: BTreeSet<&str> = allocations.iter().filter(|a| a.was_active).map(|a| a.name.as_str()).collect();
        let usage =
            usage::attribute(&pods, &capacity.node_pool, &capacity.rates, &allocations, &|a| was_active.contains(a));
        let busy: BTreeSet<String> = pods.iter().map(|p| p.node.clone()).collect();
        let labelled: BTreeMap<String, String> =
            nodes.iter().filter_map(|n| n.labels.get(RESERVED_FOR).map(|a| (n.name.clone(), a.clone()))).collect();
        let grants = grants::plan(&GrantInput {
            nodes,
            pools: &capacity.pools,
            allocations: &allocations,
            labelled: &labelled,
            busy: &busy,
            node_grace: SignedDuration::try_from(node_grace).unwrap_or(SignedDuration::from_secs(300)),
            now,
        });
        let namespace_objs = stores.namespaces.store.state();
        let namespaces = namespace_objs.iter().map(|n| n.name_any()).collect();
        let with_quota: BTreeSet<String> = stores.quotas.store.state().iter().filter_map(|q| q.namespace()).collect();
        let not_tenant = namespace_objs
            .iter()
            .filter(|n| n.labels().get(snapshot::TENANT_LABEL).map(String::as_str) != Some("true"))
            .map(|n| n.name_any())
            .filter(|n| !with_quota.contains(n))
            .collect();
        Self {
            now,
            nodes: capacity.nodes.clone(),
            node_index: capacity.node_index.clone(),
            membership: capacity.membership.clone(),
            pools: capacity.pools.clone(),
            totals: capacity.totals.clone(),
            allocations: Arc::new(allocations),
            grants: Arc::new(grants),
            usage,
            labelled: Arc::new(labelled),
            programs,
            namespaces,
            not_tenant,
            allocation_allows_non_preemptible,
            hard_budget: Arc::new(hard_budget),
            epoch,
            capacity,
        }
    }

    pub fn pool(&self, name: &str) -> Option<&PoolState> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Publishes the pool, allocation and domestic-share gauges.
    pub fn record(&self, metrics: &Metrics) {
        metrics.clear_views();
        let (mut dom_alloc, mut all_alloc, mut dom_granted, mut all_granted, mut dom_use, mut all_use) =
            (0, 0, 0, 0, 0, 0);
        for p in self.pools.iter() {
            let plan = self.grants.pools.get(&p.name).cloned().unwrap_or_default();
            let in_use = self.usage.by_pool.get(&p.name).copied().unwrap_or(0);
            let t = self.totals.get(&p.name).cloned().unwrap_or_default();
            metrics.pool(&p.name, t.capacity, t.allocatable, plan.granted, plan.reserved, in_use);
            all_alloc += t.allocatable;
            all_granted += plan.granted;
            all_use += in_use;
            if p.domestic {
                dom_alloc += t.allocatable;
                dom_granted += plan.granted;
                dom_use += in_use;
            }
        }
        for a in self.allocations.iter() {
            let plan = &self.grants.allocations[&a.name];
            let granted: i64 = plan.pools.values().map(|g| g.granted).sum();
            let program = self.programs.get(&a.name).map(String::as_str).unwrap_or_default();
            let in_use = self.usage.by_allocation.get(&a.name).map(|u| u.devices()).unwrap_or(0);
            let gauges = AllocationGauges {
                granted,
                in_use,
                hours_used: a.hours_used,
                budget_hours: a.budget_hours,
                active: plan.phase == Phase::Active,
            };
            metrics.allocation(&a.name, program, &gauges);
        }
        let share = |d: i64, t: i64| if t > 0 { d as f64 / t as f64 } else { 0.0 };
        metrics.domestic_share("capacity", share(dom_alloc, all_alloc));
        metrics.domestic_share("granted", share(dom_granted, all_granted));
        metrics.domestic_share("in_use", share(dom_use, all_use));
    }
}

/// The latest view, rebuilt when a store changed or it is older than [`MAX_AGE`].
/// An async lock: callers wait for a build in progress without blocking a
/// runtime thread, and the build itself runs on the blocking pool.
pub struct ViewCache {
    latest: tokio::sync::Mutex<Option<(u64, Instant, Arc<View>)>>,
    node_grace: Duration,
    metrics: Arc<Metrics>,
}

impl ViewCache {
    pub fn new(node_grace: Duration, metrics: Arc<Metrics>) -> Self {
        Self { latest: tokio::sync::Mutex::new(None), node_grace, metrics }
    }

    /// The latest view; one younger than `min_interval` is reused even if a
    /// store changed since (then the flag is true: the caller looks again
    /// soon). Under a burst of changes this rebuilds a few times a second
    /// instead of once per change.
    pub async fn get_recent(&self, stores: &Stores, min_interval: Duration) -> (Arc<View>, bool) {
        let epoch = stores.epoch();
        let mut latest = self.latest.lock().await;
        if let Some((e, at, view)) = latest.as_ref() {
            let age = at.elapsed();
            if (*e == epoch && age < MAX_AGE) || age < min_interval {
                return (view.clone(), *e != epoch);
            }
        }
        let started = Instant::now();
        let (stores, grace) = (stores.clone(), self.node_grace);
        let previous = latest.as_ref().map(|(_, _, v)| v.clone());
        let build = tokio::task::spawn_blocking(move || {
            View::build_after(&stores, grace, Timestamp::now(), previous.as_deref())
        });
        let view = Arc::new(build.await.expect("building the view does not panic"));
        self.metrics.observe_planning("view", started.elapsed().as_secs_f64());
        view.record(&self.metrics);
        *latest = Some((epoch, Instant::now(), view.clone()));
        (view, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use kube::runtime::watcher;

    fn node(name: &str, ready: &str, rack: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"pool": "a", "rack": rack}},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": ready}]},
        }))
        .expect("a node")
    }

    fn cluster() -> crate::plan::Cluster {
        let pool = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "uid": "u1", "generation": 1},
            "spec": {"resourceName": "nvidia.com/gpu", "kind": "GPU", "vendor": "v", "model": "m",
                     "nodeSelector": {"matchLabels": {"pool": "a"}}},
        }))
        .expect("a pool");
        crate::plan::Cluster {
            nodes: vec![node("n1", "True", "r1"), node("n2", "True", "r1")],
            pools: vec![pool],
            ..Default::default()
        }
    }

    #[test]
    fn membership_is_reused_across_readiness_changes_and_rebuilt_on_label_changes() {
        let stores = crate::plan::stores(&cluster());
        let now = Timestamp::UNIX_EPOCH;
        let first = View::build(&stores, Duration::from_secs(300), now);
        assert_eq!(first.totals["a"].ready_nodes, 2);

        stores.model.apply_node(&watcher::Event::Apply(node("n2", "False", "r1")));
        let second = View::build_after(&stores, Duration::from_secs(300), now, Some(&first));
        assert!(Arc::ptr_eq(&first.membership, &second.membership), "readiness moved no node between pools");
        assert_eq!(second.totals["a"].ready_nodes, 1, "but the totals follow readiness");

        let third = View::build_after(&stores, Duration::from_secs(300), now, Some(&second));
        assert!(Arc::ptr_eq(&second.nodes, &third.nodes), "nothing changed: the node part is shared whole");

        stores.model.apply_node(&watcher::Event::Apply(node("n2", "False", "r2")));
        let fourth = View::build_after(&stores, Duration::from_secs(300), now, Some(&third));
        assert!(!Arc::ptr_eq(&third.membership, &fourth.membership), "a label change recomputes membership");
        assert_eq!(fourth.nodes[1].labels["rack"], "r2");
    }

    #[test]
    fn a_running_pod_of_an_admitted_job_is_its_gangs_not_foreign_and_releasing_once_the_job_holds_nothing() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "train-0", "namespace": "lab", "labels": {
                JOB_LABEL: "train", ALLOCATION_LABEL: "a1", POOL_LABEL: "a"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "m",
                "resources": {"requests": {"nvidia.com/gpu": "4"}}}]},
            "status": {"phase": "Running"},
        }))
        .expect("a pod");
        let stores = crate::plan::stores(&crate::plan::Cluster { pods: vec![pod], ..cluster() });
        let view = View::build(&stores, Duration::from_secs(300), Timestamp::UNIX_EPOCH);
        let holding = Gang {
            key: crate::admission::GangKey::job("lab", "train"),
            allocation: "a1".into(),
            pools: vec!["a".into()],
            workers: 1,
            per_worker: 4,
            topology: None,
            priority: 0,
            preemptible: true,
            queued_since: Timestamp::UNIX_EPOCH,
            state: crate::admission::GangState::Holding(crate::admission::Holding {
                pool: "a".into(),
                nodes: vec!["n1".into()],
                borrowed: false,
                admitted_at: None,
                protected_until: None,
            }),
        };
        let snap = view.snapshot(&stores, vec![holding]);
        assert!(snap.foreign.is_empty(), "counted in its gang, not as a foreign pod: {:?}", snap.foreign);
        assert!(snap.releasing.is_empty(), "its Job holds the devices");

        let snap = view.snapshot(&stores, vec![]);
        assert_eq!(snap.releasing.len(), 1, "suspended again, its pod holds its devices until it is gone");
        assert_eq!((snap.releasing[0].devices, snap.releasing[0].node), (4, Some(0)));
    }
}
