//! Converts Kubernetes objects into the planner's plain types. Pure: no client.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::Selector;

use crate::api::{AcceleratorPool, AllocationPhase, GpuAllocation, HOSTNAME_KEY};
use crate::planner::grants::{AllocationState, GrantState, PoolState};
use crate::planner::inventory::{NodeInfo, PoolInfo, PoolTotals};
use crate::planner::ledger::{PodLife, Workload};
use crate::planner::usage::{PodUse, PoolRate};

/// Label on every object the operator manages.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "sovereign-operator");
/// Label that ties a pod to the allocation it is charged to.
pub const ALLOCATION_LABEL: &str = "sovereign.ai/allocation";
/// Label on everything made for a ModelProject: the project's name.
pub const PROJECT_LABEL: &str = "sovereign.ai/project";
/// Label of a worker pod: its index (rank) in the gang.
pub const WORKER_INDEX_LABEL: &str = "sovereign.ai/worker-index";
/// Label of a worker pod: the pool it was placed in.
pub const POOL_LABEL: &str = "sovereign.ai/pool";
/// Label the operator puts on the pod template of a batch Job it admitted: the
/// Job's name. Its pods hold devices as the Job's gang, not as foreign pods.
pub const JOB_LABEL: &str = "sovereign.ai/job";
/// Label the operator puts on every pod template of a JobSet it admitted: the
/// JobSet's name. Its pods hold devices as the JobSet's gang.
pub const JOBSET_LABEL: &str = "sovereign.ai/jobset";
/// Label the JobSet controller puts on every pod of a JobSet: its name.
pub const JOBSET_NAME_LABEL: &str = "jobset.sigs.k8s.io/jobset-name";
/// Label the Job controller puts on every pod of a Job: its name.
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
/// Label (value `true`) the admin puts on tenant namespaces: the chart's admission
/// policy lets the operator create quotas and worker pods only there.
pub const TENANT_LABEL: &str = "sovereign.ai/tenant";
/// Label (and taint key) on nodes reserved by a dedicated grant.
pub const RESERVED_FOR: &str = "sovereign.ai/reserved-for";
/// Finalizer on worker pods: released once the ledger has charged the pod.
pub const LEDGER_FINALIZER: &str = "sovereign.ai/usage-ledger";

/// Parses a whole-number quantity ("8", "8k" is not used for devices). Extended
/// resources are integers; anything else (cpu "500m", memory "1Gi") is skipped
/// by returning `None`, since the planner only counts devices.
pub fn whole_quantity(q: &Quantity) -> Option<i64> {
    q.0.parse::<i64>().ok()
}

fn whole_quantities(map: Option<&BTreeMap<String, Quantity>>) -> BTreeMap<String, i64> {
    map.into_iter().flatten().filter_map(|(k, q)| whole_quantity(q).map(|v| (k.clone(), v))).collect()
}

/// A node is usable when its Ready condition is True and it is not cordoned.
pub fn node_is_ready(node: &Node) -> bool {
    let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    ready && !cordoned
}

/// When the node's Ready condition last turned away from True, if it is not True.
fn not_ready_since(node: &Node) -> Option<Timestamp> {
    let ready = node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")?;
    (ready.status != "True").then(|| ready.last_transition_time.as_ref().map(|t| t.0)).flatten()
}

pub fn node_info(node: &Node) -> NodeInfo {
    let status = node.status.as_ref();
    NodeInfo {
        name: node.name_any(),
        labels: node.labels().clone().into(),
        ready: node_is_ready(node),
        not_ready_since: not_ready_since(node),
        capacity: whole_quantities(status.and_then(|s| s.capacity.as_ref())).into(),
        allocatable: whole_quantities(status.and_then(|s| s.allocatable.as_ref())).into(),
    }
}

/// The planner's view of a pool, or why its selector cannot be used.
pub fn pool_info(pool: &AcceleratorPool) -> Result<PoolInfo, String> {
    let selector =
        Selector::try_from(pool.spec.node_selector.clone()).map_err(|e| format!("nodeSelector cannot be used: {e}"))?;
    Ok(PoolInfo {
        name: pool.name_any(),
        resource_name: pool.spec.resource_name.clone(),
        selector,
        created: pool.metadata.creation_timestamp.as_ref().map(|t| t.0),
    })
}

/// The grant planner's view of a pool whose members and totals are known.
pub fn pool_state(pool: &AcceleratorPool, members: Vec<usize>, totals: &PoolTotals) -> PoolState {
    PoolState {
        name: pool.name_any(),
        resource_name: pool.spec.resource_name.clone(),
        domestic: pool.spec.domestic,
        levels: pool.spec.topology_keys.iter().filter(|k| *k != HOSTNAME_KEY).cloned().collect(),
        members,
        allocatable: totals.allocatable,
    }
}

pub fn pool_rate(pool: &AcceleratorPool) -> PoolRate {
    PoolRate {
        name: pool.name_any(),
        resource_name: pool.spec.resource_name.clone(),
        domestic: pool.spec.domestic,
        charge_factor: pool.spec.charge_factor,
    }
}

/// The grant planner's view of an allocation, with its hours charged up to `now`
/// at the rate recorded in its status.
pub fn allocation_state(a: &GpuAllocation, now: Timestamp) -> AllocationState {
    // Borrowed: the status lists usage per project, and views are built often.
    let status = a.status.as_ref();
    let window = a.spec.window.as_ref();
    AllocationState {
        name: a.name_any(),
        priority: a.spec.priority,
        created: a.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now),
        namespaces: a.spec.tenant.namespaces.clone(),
        window_start: window.and_then(|w| w.start.as_ref()).map(|t| t.0),
        window_end: window.and_then(|w| w.end.as_ref()).map(|t| t.0),
        grants: a
            .spec
            .grants
            .iter()
            .map(|g| GrantState {
                pool: g.pool.clone(),
                accelerators: g.accelerators,
                dedicated: g.mode == crate::api::GrantMode::Dedicated,
                borrowing_limit: g.borrowing_limit.unwrap_or(0),
            })
            .collect(),
        budget_hours: a.spec.budget.as_ref().map(|b| b.accelerator_hours as f64),
        // The ledger's figure at its last reckoning, never extrapolated: a
        // guess beyond it could exhaust a budget that the reckoning (a pod
        // ended meanwhile) then un-exhausts. The allocation reconciler reckons
        // again at the moment the budget runs out at the current rate.
        hours_used: status.map_or(0.0, |s| s.accelerator_hours_used),
        min_domestic_share: a.spec.min_domestic_share,
        was_active: status.and_then(|s| s.phase) == Some(AllocationPhase::Active),
        // Exhausted, as written for this very spec: a correction of the ledger
        // (a pod's own end before the reckoning that charged it as running)
        // does not make it Active again; raising the budget (any spec change) does.
        budget_used_up: status.is_some_and(|s| {
            s.phase == Some(AllocationPhase::Exhausted)
                && s.observed_generation.is_some()
                && s.observed_generation == a.metadata.generation
        }),
        deleting: a.metadata.deletion_timestamp.is_some(),
    }
}

/// Whole-number requests of a pod per resource name (limits stand in for
/// requests the API server did not default).
pub fn pod_requests(pod: &Pod) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let Some(res) = c.resources.as_ref() else {
            continue;
        };
        let values = res.requests.as_ref().or(res.limits.as_ref());
        for (k, q) in values.into_iter().flatten() {
            if let Some(v) = whole_quantity(q) {
                *out.entry(k.clone()).or_default() += v;
            }
        }
    }
    out
}

/// A running pod that requests accelerators (names with a '/'), or None.
pub fn pod_use(pod: &Pod) -> Option<PodUse> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let requests: BTreeMap<String, i64> =
        pod_requests(pod).into_iter().filter(|(k, v)| k.contains('/') && *v > 0).collect();
    (!requests.is_empty()).then(|| PodUse {
        namespace: pod.namespace().unwrap_or_default(),
        node,
        requests,
        allocation: pod.labels().get(ALLOCATION_LABEL).cloned(),
    })
}

fn millis(t: &Time) -> i64 {
    t.0.as_millisecond()
}

/// The workload a pod runs for, as the ledger keys its hours: a ModelProject's
/// worker (its project label), a JobSet's pod (the JobSet controller's label),
/// a batch Job's pod (the Job controller's owner reference or label, or the
/// operator's), or none.
pub fn workload_of(pod: &Pod) -> Option<Workload> {
    let ns = pod.metadata.namespace.as_deref()?;
    let labels = pod.labels();
    let named = |kind: &str, name: &str| Some(Workload::new(kind, format!("{ns}/{name}")));
    if let Some(p) = labels.get(PROJECT_LABEL) {
        return named(crate::planner::ledger::MODEL_PROJECT, p);
    }
    if let Some(s) = labels.get(JOBSET_NAME_LABEL) {
        return named("JobSet", s);
    }
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "Job" && o.api_version == "batch/v1")
        .map(|o| &o.name);
    let job = owner.or_else(|| labels.get(JOB_NAME_LABEL)).or_else(|| labels.get(JOB_LABEL))?;
    named("Job", job)
}

/// A pod's lifetime as the ledger charges it, on `pool` (None: not on a
/// pool's node, charged nothing). Start: `status.startTime`. End: the last
/// container's `finishedAt` once the pod is Succeeded or Failed (or, for a
/// deleted pod, once every container has terminated), else the deletion time
/// for a deleted pod (the latest it may run). A deleted pod is settled once it
/// is done: terminal, every container terminated, never started, or past its
/// deletion time.
pub fn pod_life(pod: &Pod, pool: Option<&PoolRate>, now: Timestamp) -> PodLife {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
    let terminal = matches!(phase, "Succeeded" | "Failed");
    let containers = status.and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
    let finished: Vec<i64> = containers
        .iter()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref().map(millis))
        .collect();
    let all_terminated = !containers.is_empty() && finished.len() == containers.len();
    let start = status.and_then(|s| s.start_time.as_ref()).map(millis);
    let deleted = pod.metadata.deletion_timestamp.as_ref().map(millis);
    let last_transition = || {
        status
            .and_then(|s| s.conditions.as_ref())?
            .iter()
            .filter_map(|c| c.last_transition_time.as_ref())
            .map(millis)
            .max()
    };
    let end = if terminal || (deleted.is_some() && all_terminated) {
        finished.iter().copied().max().or_else(last_transition).or(deleted).or(start)
    } else {
        deleted
    };
    let settle = deleted.is_some_and(|d| terminal || all_terminated || start.is_none() || d <= now.as_millisecond());
    let weight = pool
        .map(|p| pod_requests(pod).get(&p.resource_name).copied().unwrap_or(0) as f64 * p.charge_factor)
        .unwrap_or(0.0);
    PodLife {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        workload: workload_of(pod),
        pool: pool.map(|p| p.name.clone()).unwrap_or_default(),
        domestic: pool.is_some_and(|p| p.domestic),
        weight,
        start_millis: start,
        end_millis: end,
        settle,
        held: pod.finalizers().iter().any(|f| f == LEDGER_FINALIZER),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    fn k8s_node(ready: &str, cordoned: bool) -> Node {
        Node {
            metadata: kube::api::ObjectMeta { name: Some("n1".into()), ..Default::default() },
            spec: Some(NodeSpec { unschedulable: Some(cordoned), ..Default::default() }),
            status: Some(NodeStatus {
                capacity: Some([("nvidia.com/gpu".into(), q("8")), ("cpu".into(), q("500m"))].into()),
                allocatable: Some([("nvidia.com/gpu".into(), q("7"))].into()),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_used_up_budget_stays_used_up_for_the_spec_it_was_found_on() {
        let alloc = |generation: i64, observed: i64, phase: &str| -> GpuAllocation {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "sovereign.ai/v1alpha1", "kind": "GpuAllocation",
                "metadata": {"name": "a", "generation": generation},
                "spec": {"tenant": {"displayName": "t", "namespaces": ["team"]},
                         "grants": [{"pool": "h200", "accelerators": 8}], "budget": {"acceleratorHours": 10}},
                "status": {"phase": phase, "observedGeneration": observed, "acceleratorHoursUsed": 9.99}
            }))
            .unwrap()
        };
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        assert!(allocation_state(&alloc(3, 3, "Exhausted"), now).budget_used_up);
        assert!(!allocation_state(&alloc(4, 3, "Exhausted"), now).budget_used_up, "the spec changed (budget raised)");
        assert!(!allocation_state(&alloc(3, 3, "Active"), now).budget_used_up);
    }

    #[test]
    fn a_pod_is_charged_to_its_workload_by_the_labels_and_owners_its_controllers_set() {
        let pod = |labels: serde_json::Value, owners: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x", "namespace": "team",
                "labels": labels, "ownerReferences": owners}}))
            .unwrap()
        };
        let job_owner = serde_json::json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "train",
            "uid": "u", "controller": true}]);
        let of = |p: &Pod| workload_of(p).map(|w| (w.kind, w.name));
        let w = |k: &str, n: &str| Some((k.to_string(), n.to_string()));
        assert_eq!(
            of(&pod(serde_json::json!({PROJECT_LABEL: "llm"}), serde_json::json!([]))),
            w("ModelProject", "team/llm")
        );
        assert_eq!(of(&pod(serde_json::json!({}), job_owner.clone())), w("Job", "team/train"));
        assert_eq!(
            of(&pod(serde_json::json!({JOB_NAME_LABEL: "by-label"}), serde_json::json!([]))),
            w("Job", "team/by-label")
        );
        // A JobSet's pods belong to its child Jobs; the JobSet is the workload.
        let set = serde_json::json!({JOBSET_NAME_LABEL: "pair", JOB_NAME_LABEL: "pair-workers-0"});
        assert_eq!(of(&pod(set, job_owner)), w("JobSet", "team/pair"));
        assert_eq!(of(&pod(serde_json::json!({ALLOCATION_LABEL: "a"}), serde_json::json!([]))), None);
    }

    #[test]
    fn node_conversion_keeps_whole_quantities_and_readiness() {
        let info = node_info(&k8s_node("True", false));
        assert!(info.ready);
        assert_eq!(info.capacity_of("nvidia.com/gpu"), 8);
        assert_eq!(info.allocatable_of("nvidia.com/gpu"), 7);
        assert_eq!(info.capacity_of("cpu"), 0, "fractional cpu is not a device count");
        assert!(!node_info(&k8s_node("False", false)).ready);
        assert!(!node_info(&k8s_node("Unknown", false)).ready);
        assert!(!node_info(&k8s_node("True", true)).ready, "cordoned nodes are not usable");
    }
}
