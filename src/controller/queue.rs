//! The admission pass over every waiting gang, built from the cluster view and
//! the projects: the planner's input, made by the admission loop once a cycle.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::jiff::SignedDuration;
use kube::ResourceExt;

use super::project::holds_devices;
use super::stores::Stores;
use super::view::View;
use crate::api::{ModelProject, ProjectPhase, TopologyMode};
use crate::planner::fit::{self, PoolShape};
use crate::planner::grants::Phase;
use crate::planner::placement::{
    self, AllocationQuota, GangRequest, NodeFree, Outcome, PlacementInput, PlacementPool, TopologyRequest,
};
use crate::planner::preemption::{Preemption, Releasing, RunningGang};
use crate::snapshot::{ALLOCATION_LABEL, POOL_LABEL, PROJECT_LABEL, pod_requests};
use crate::telemetry::Metrics;

/// Restarting gangs go ahead of every fresh one (priorities are within ±1000).
const RESTART_BOOST: i32 = 10_000;

/// Phases that take part in admission.
pub fn wants_admission(p: &ModelProject, now: k8s_openapi::jiff::Timestamp) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase);
    let backing_off = p.status.as_ref().and_then(|s| s.retry_after.as_ref()).is_some_and(|t| t.0 > now);
    !p.spec.run_policy.suspend
        && !backing_off
        && p.metadata.deletion_timestamp.is_none()
        && matches!(phase, None | Some(ProjectPhase::Queued | ProjectPhase::Restarting))
}

pub fn key(p: &ModelProject) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

pub struct Queue {
    pub outcomes: BTreeMap<String, Outcome>,
    /// Devices admitted per (allocation, pool), before this pass.
    pub admitted: BTreeMap<(String, String), i64>,
    /// Preemptions decided by this pass, by preemptor.
    pub preempting: BTreeMap<String, Arc<Preemption>>,
    /// The same, by victim.
    pub victims: BTreeMap<String, Arc<Preemption>>,
    /// Waiting gangs that can never be admitted as the pools and grants are.
    pub unsatisfiable: BTreeSet<String>,
}

pub fn plan(
    view: &View,
    now: k8s_openapi::jiff::Timestamp,
    projects: &[Arc<ModelProject>],
    stores: &Stores,
    starvation_after: SignedDuration,
    metrics: &Metrics,
    valid: &dyn Fn(&ModelProject) -> bool,
) -> Queue {
    // Devices held on each node: running pods that are not ours, plus every
    // admitted gang's planned workers (bound or not yet).
    let node_index = &view.node_index;
    let mut used: Vec<BTreeMap<String, i64>> = vec![BTreeMap::new(); view.nodes.len()];
    stores.model.read(|m| {
        for (node, held) in m.foreign() {
            if let Some(&i) = node_index.get(node.as_str()) {
                used[i].clone_from(held);
            }
        }
    });
    let mut admitted: BTreeMap<(String, String), i64> = BTreeMap::new();
    // (namespace, name) of the projects holding devices.
    let mut holding: HashSet<(&str, &str)> = HashSet::new();
    let mut running: Vec<RunningGang> = Vec::new();
    for p in projects {
        let Some(status) = p.status.as_ref().filter(|s| holds_devices(s.phase)) else { continue };
        let Some(pool) = status.pool.as_deref().and_then(|n| view.pool(n)) else { continue };
        let per = p.spec.accelerators_per_worker as i64;
        let mut at: Vec<usize> = Vec::with_capacity(status.nodes.len());
        for node in &status.nodes {
            if let Some(&i) = node_index.get(node.as_str()) {
                *used[i].entry(pool.resource_name.clone()).or_default() += per;
                at.push(i);
            }
        }
        running.push(RunningGang {
            key: key(p),
            allocation: p.spec.allocation.clone(),
            pool: pool.name.clone(),
            nodes: at,
            per_worker: per,
            priority: p.spec.priority,
            started: status.admitted_at.as_ref().map(|t| t.0).unwrap_or(now),
            borrowed: status.borrowed,
            preemptible: p.spec.preemptible,
            protected_until: status.protected_until.as_ref().map(|t| t.0),
        });
        *admitted.entry((p.spec.allocation.clone(), pool.name.clone())).or_default() += per * p.spec.workers as i64;
        holding.insert((
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.metadata.name.as_deref().unwrap_or_default(),
        ));
    }
    let mut releasing: Vec<Releasing> = Vec::new();
    // Pods of a gang that gave its devices back but are still terminating keep
    // their node's devices and count in the namespace quota until they are gone.
    for pod in stores.workers.store.state() {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let project = (pod.metadata.namespace.as_deref().unwrap_or_default(), pod.labels()[PROJECT_LABEL].as_str());
        if matches!(phase, Some("Succeeded" | "Failed")) || holding.contains(&project) {
            continue;
        }
        let (Some(allocation), Some(pool)) = (pod.labels().get(ALLOCATION_LABEL), pod.labels().get(POOL_LABEL)) else {
            continue;
        };
        let Some(resource) = view.pool(pool).map(|p| p.resource_name.clone()) else { continue };
        let devices = pod_requests(&pod).get(&resource).copied().unwrap_or(0);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).and_then(|n| node_index.get(n)).copied();
        if let Some(i) = node {
            *used[i].entry(resource).or_default() += devices;
        }
        *admitted.entry((allocation.clone(), pool.clone())).or_default() += devices;
        releasing.push(Releasing { node, allocation: allocation.clone(), pool: pool.clone(), devices });
    }

    let pools: Vec<PlacementPool> = view
        .pools
        .iter()
        .map(|p| {
            let mut pp = PlacementPool {
                name: p.name.clone(),
                resource_name: p.resource_name.clone(),
                levels: p.levels.clone(),
                ..Default::default()
            };
            for &i in &p.members {
                let n = &view.nodes[i];
                if !n.ready {
                    continue;
                }
                let free = n.allocatable_of(&p.resource_name) - used[i].get(&p.resource_name).copied().unwrap_or(0);
                let slot = NodeFree { node: i, free: free.max(0) };
                match view.grants.reserved_for.get(&n.name) {
                    Some(a) => pp.reserved_nodes.entry(a.clone()).or_default().push(slot),
                    None if !view.labelled.contains_key(&n.name) => pp.shared_nodes.push(slot),
                    None => {}
                }
            }
            pp
        })
        .collect();

    let allocations: Vec<AllocationQuota> = view
        .allocations
        .iter()
        .map(|a| {
            let plan = &view.grants.allocations[&a.name];
            // Gangs run only on grants in force: Active in the plan AND in the
            // allocation's status. Otherwise a gang admitted before the grant's
            // first status write would run on a grant that a capacity drop can
            // still take back (only grants Active in status are never revoked).
            let blocked = if plan.phase != Phase::Active {
                let why = plan.blocker.as_ref().map(|b| b.message()).unwrap_or_else(|| "not admitted yet".into());
                Some(format!("allocation {} is {:?}: {why}", a.name, plan.phase))
            } else if !a.was_active {
                Some(format!("allocation {} is being activated", a.name))
            } else {
                None
            };
            let headroom = a
                .grants
                .iter()
                .map(|g| {
                    let used = admitted.get(&(a.name.clone(), g.pool.clone())).copied().unwrap_or(0);
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
        .collect();

    let queue: Vec<GangRequest> = projects
        .iter()
        .filter(|p| wants_admission(p, now) && valid(p))
        .map(|p| {
            let restarting = p.status.as_ref().and_then(|s| s.phase) == Some(ProjectPhase::Restarting);
            GangRequest {
                key: key(p),
                allocation: p.spec.allocation.clone(),
                pools: p.spec.placement.pools.clone(),
                workers: p.spec.workers as u32,
                per_worker: p.spec.accelerators_per_worker as i64,
                priority: p.spec.priority + if restarting { RESTART_BOOST } else { 0 },
                queued_since: p.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now),
                topology: p
                    .spec
                    .placement
                    .topology
                    .as_ref()
                    .map(|t| TopologyRequest { key: t.key.clone(), required: t.mode == TopologyMode::Required }),
                preemptible: p.spec.preemptible,
                preemption_priority: p.spec.priority,
            }
        })
        .collect();

    let pass = placement::admit_pass(&PlacementInput {
        nodes: &view.nodes,
        pools: &pools,
        allocations: &allocations,
        queue: &queue,
        now,
        starvation_after,
        running: &running,
        releasing: &releasing,
        cache: Some(view.placement_cache()),
    });
    let mut outcomes = pass.outcomes;
    let unsatisfiable = never_fitting(view, &queue, &allocations, &mut outcomes);
    record(view, projects, &outcomes, metrics);
    let mut preempting = BTreeMap::new();
    let mut victims = BTreeMap::new();
    for p in pass.preemptions {
        let p = Arc::new(p);
        for v in &p.victims {
            victims.insert(v.clone(), p.clone());
        }
        preempting.insert(p.preemptor.clone(), p);
    }
    Queue { outcomes, admitted, preempting, victims, unsatisfiable }
}

/// Rewrites the reason of every waiting gang that can never be admitted as
/// the pools and its grant are; returns their keys.
fn never_fitting(
    view: &View,
    queue: &[GangRequest],
    allocations: &[AllocationQuota],
    outcomes: &mut BTreeMap<String, Outcome>,
) -> BTreeSet<String> {
    let waiting: Vec<&GangRequest> =
        queue.iter().filter(|g| matches!(outcomes.get(&g.key), Some(Outcome::Waiting { .. }))).collect();
    if waiting.is_empty() {
        return BTreeSet::new();
    }
    let requested: BTreeSet<&str> =
        waiting.iter().filter_map(|g| g.topology.as_ref()).map(|t| t.key.as_str()).collect();
    let shapes: BTreeMap<String, PoolShape> = view
        .pools
        .iter()
        .map(|p| {
            let members = p.members.iter().map(|&i| &view.nodes[i]);
            let mut keys: BTreeSet<String> = p.levels.iter().cloned().collect();
            keys.insert(crate::api::HOSTNAME_KEY.to_string());
            for k in &requested {
                if p.members.iter().any(|&i| view.nodes[i].labels.contains_key(*k)) {
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
    let mut out = BTreeSet::new();
    for g in waiting {
        let quota = allocations.iter().find(|a| a.name == g.allocation);
        if let Some(why) = fit::never_fits(g, &shapes, quota)
            && let Some(Outcome::Waiting { reason, .. }) = outcomes.get_mut(&g.key)
        {
            *reason = why;
            out.insert(g.key.clone());
        }
    }
    out
}

fn record(view: &View, projects: &[Arc<ModelProject>], outcomes: &BTreeMap<String, Outcome>, metrics: &Metrics) {
    // Counted by reference: this runs every cycle over every project.
    let mut by_phase: HashMap<(ProjectPhase, &str), i64> = HashMap::new();
    let mut queued: BTreeMap<(String, String), i64> = BTreeMap::new();
    for p in projects {
        let status = p.status.as_ref();
        let phase = status.and_then(|s| s.phase).unwrap_or_default();
        let pool = status.and_then(|s| s.pool.as_deref()).unwrap_or_default();
        *by_phase.entry((phase, pool)).or_default() += 1;
        if matches!(outcomes.get(&key(p)), Some(Outcome::Waiting { .. })) {
            let program = view.programs.get(&p.spec.allocation).cloned().unwrap_or_default();
            *queued.entry((p.spec.allocation.clone(), program)).or_default() += 1;
        }
    }
    let by_phase =
        by_phase.into_iter().map(|((phase, pool), n)| ((format!("{phase:?}"), pool.to_string()), n)).collect();
    metrics.projects(&by_phase, &queued);
}

/// The grant (accelerators, without borrowing) of an allocation in a pool.
pub fn granted(view: &View, allocation: &str, pool: &str) -> i64 {
    view.allocations
        .iter()
        .find(|a| a.name == allocation)
        .and_then(|a| a.grants.iter().find(|g| g.pool == pool))
        .map(|g| g.accelerators)
        .unwrap_or(0)
}
