//! GpuAllocation reconciler: phase and status from the grant plan, node
//! reservations for dedicated grants (with a finalizer, since labels and taints
//! on nodes are not garbage-collected), the accelerator-hour ledger, and Events
//! on transitions. Quotas are the quota reconciler's.
//!
//! Observe (the plan, the pods charged to the allocation, its projects) ->
//! the pure [`decide`] (status, ledger, Events, writes) -> a thin apply step.

mod decide;
#[cfg(test)]
mod tests;

pub use decide::{Observed, decide};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::context::requeue;
use super::stores::{PodIndex, Shared};
use super::view::View;
use super::{Context, Error, nodes};
use crate::api::{GpuAllocation, ModelProject, ProjectUsage};
use crate::planner::grants::AllocationState;
use crate::planner::ledger::{PodLife, Workload};
use crate::planner::usage;
use crate::snapshot::{self, ALLOCATION_LABEL, LEDGER_FINALIZER, PROJECT_LABEL};

const CONTROLLER: &str = "gpuallocation";
pub const FINALIZER: &str = "sovereign.ai/release-reservations";
/// The field manager of the usage the ledger writes into ModelProject status:
/// not the project reconciler's, so neither write drops the other's fields.
const LEDGER_MANAGER: &str = "sovereign-operator-ledger";

pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let s = &ctx.stores;
    // Admission is cluster-wide: a change of nodes, pools or any allocation can
    // admit or block any allocation. A pod change only moves the usage of the
    // allocations that list its namespace.
    let everything = s.grant_inputs_changed();
    // Worker pods and the pods of admitted Jobs and JobSets in any phase (the
    // ledger settles deleted ones), other pods while they run.
    let allocations = s.allocations.store.clone();
    let (plain, workers, seen) = (s.pods.store.clone(), s.workers.store.clone(), ctx.clone());
    let labelled = s.workload_pods.store.clone();
    let pod_events = futures::stream::select_all([
        s.pods.events().boxed(),
        s.workers.events().boxed(),
        s.workload_pods.events().boxed(),
    ]);
    let pod_allocations = pod_events.flat_map(move |pod: Arc<Pod>| {
        // A pod gone from every store ended (or was deleted) now: the
        // ledger charges it up to here, not up to its next reconcile.
        let key = ObjectRef::from_obj(pod.as_ref());
        if plain.get(&key).is_none() && workers.get(&key).is_none() && labelled.get(&key).is_none() {
            let deleted = pod.metadata.deletion_timestamp.as_ref().map(|t| t.0.as_millisecond());
            seen.saw_gone(pod.metadata.uid.as_deref().unwrap_or_default(), deleted);
        }
        let ns = pod.namespace().unwrap_or_default();
        let hits: Vec<ObjectRef<GpuAllocation>> = allocations
            .state()
            .iter()
            .filter(|a| a.spec.tenant.namespaces.contains(&ns))
            .map(|a| ObjectRef::from_obj(a.as_ref()))
            .collect();
        futures::stream::iter(hits)
    });
    let controller = Controller::for_shared_stream(s.allocations.events(), s.allocations.store.clone())
        .reconcile_all_on(futures::stream::once(async {}).chain(everything))
        .reconcile_on(pod_allocations)
        .with_config(super::controller_config(Duration::from_millis(300)));
    let orphans = tokio::spawn(release_orphans(ctx.clone()));
    super::drive(controller, CONTROLLER, ctx.clone(), shutdown, reconcile).await;
    orphans.abort();
}

async fn reconcile(alloc: Arc<GpuAllocation>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<GpuAllocation> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, alloc, |event| async {
        match event {
            Finalizer::Apply(a) => apply(&a, &ctx).await,
            Finalizer::Cleanup(a) => cleanup(&a, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Releases every node labelled for the allocation; quotas follow by themselves.
async fn cleanup(alloc: &GpuAllocation, ctx: &Context) -> Result<Action, Error> {
    let name = alloc.name_any();
    let program = alloc.spec.program.clone().unwrap_or_default();
    let pools = alloc.status.iter().flat_map(|s| s.pool_hours.iter().map(|p| p.pool.as_str()));
    ctx.metrics.forget_charges(&name, &program, pools);
    let released = reconcile_nodes(ctx, &name, &BTreeSet::new()).await?;
    if !released.is_empty() {
        let note = format!("released reserved nodes {}", released.join(", "));
        ctx.event(&alloc.object_ref(&()), kube::runtime::events::EventType::Normal, "NodesReleased", note).await;
    }
    Ok(Action::await_change())
}

async fn apply(alloc: &GpuAllocation, ctx: &Context) -> Result<Action, Error> {
    let name = alloc.name_any();
    let (view, stale) = ctx.recent_view().await;
    let Some(plan) = view.grants.allocations.get(&name) else {
        return Err(Error::NotInCache(name));
    };
    let usage = view.usage.by_allocation.get(&name).cloned().unwrap_or_default();
    let now = Timestamp::now();
    let charged = charged_pods(ctx, &view, alloc, now);
    let projects = projects_of(ctx, alloc);
    let workloads = workloads_of(ctx, alloc);
    let missing_namespaces =
        alloc.spec.tenant.namespaces.iter().filter(|ns| !view.namespaces.contains(*ns)).cloned().collect();
    let not_tenant = alloc.spec.tenant.namespaces.iter().filter(|ns| view.not_tenant.contains(*ns)).cloned().collect();
    let d = {
        let obs = Observed {
            now,
            plan,
            usage: &usage,
            missing_namespaces,
            not_tenant,
            pods: &charged.lives,
            watching_since: ctx.reconciling_since,
            seen_gone: &|uid| ctx.seen_gone(uid),
            projects: &projects,
            workloads: &workloads,
            settle_due: charged.settle_due,
            keep_books: None,
        };
        decide(alloc, &obs)
    };

    reconcile_nodes(ctx, &name, &d.reserve).await?;
    let old = alloc.status.clone().unwrap_or_default();
    if d.status != old {
        // Decided on this version only: books read from an older version
        // would charge again what a newer one settled.
        let api = Api::<GpuAllocation>::all(ctx.client.clone());
        match super::apply_status(&api, &name, alloc.resource_version().as_deref(), &d.status).await {
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            r => drop(r?),
        }
    }
    // Only after the books that charge them are written.
    for uid in &d.release {
        if let Some(pod) = charged.pods.get(uid) {
            release(ctx, pod).await?;
        }
    }
    for (project, usage) in &d.project_usage {
        if let Err(e) = write_project_usage(ctx, project, usage).await {
            tracing::debug!(error = %e, project, "project usage not written; the next reckoning writes it");
        }
    }
    let program = alloc.spec.program.clone().unwrap_or_default();
    for (pool, seconds) in &d.seconds_by_pool {
        ctx.metrics.charged_seconds(&name, &program, pool, *seconds);
    }
    for kind in crate::telemetry::KINDS {
        let seconds = d.seconds_by_kind.get(kind).copied().unwrap_or(0.0);
        ctx.metrics.charged_by_kind(&name, &program, kind, seconds);
    }
    let on = alloc.object_ref(&());
    for note in d.events {
        ctx.event(&on, note.type_, note.reason, note.message).await;
    }
    Ok(requeue(stale, Some(d.requeue)))
}

/// The status `plan` predicts from a view: the same decision, with the books
/// kept as they are.
pub(crate) fn planned_status(alloc: &GpuAllocation, view: &View) -> Option<crate::api::GpuAllocationStatus> {
    let name = alloc.name_any();
    let plan = view.grants.allocations.get(&name)?;
    let state = view.allocations.iter().find(|a| a.name == name)?;
    let usage = view.usage.by_allocation.get(&name).cloned().unwrap_or_default();
    let obs = Observed {
        now: view.now,
        plan,
        usage: &usage,
        missing_namespaces: alloc
            .spec
            .tenant
            .namespaces
            .iter()
            .filter(|ns| !view.namespaces.contains(*ns))
            .cloned()
            .collect(),
        not_tenant: alloc.spec.tenant.namespaces.iter().filter(|ns| view.not_tenant.contains(*ns)).cloned().collect(),
        pods: &[],
        watching_since: view.now,
        seen_gone: &|_| None,
        projects: &BTreeMap::new(),
        workloads: &BTreeSet::new(),
        settle_due: None,
        keep_books: Some(state.hours_used),
    };
    Some(decide(alloc, &obs).status)
}

/// The pods charged to the allocation now, as the ledger sees them.
struct Charged {
    lives: Vec<PodLife>,
    /// By UID, to release their finalizer.
    pods: BTreeMap<String, Arc<Pod>>,
    settle_due: Option<Timestamp>,
}

/// Worker pods and pods of admitted Jobs and JobSets in any phase, and other
/// pods while they run, in the tenant's namespaces, that the charging rule
/// gives to this allocation.
fn charged_pods(ctx: &Context, view: &View, alloc: &GpuAllocation, now: Timestamp) -> Charged {
    let name = alloc.name_any();
    let namespaces: BTreeSet<&str> = alloc.spec.tenant.namespaces.iter().map(String::as_str).collect();
    let rates: BTreeMap<String, usage::PoolRate> =
        ctx.stores.pools.store.state().iter().map(|p| (p.name_any(), snapshot::pool_rate(p))).collect();
    // The pool of each node, by the node's index in the view.
    let mut node_pool: Vec<Option<&usage::PoolRate>> = vec![None; view.nodes.len()];
    for (p, r) in view.pools.iter().filter_map(|p| rates.get(&p.name).map(|r| (p, r))) {
        for &i in &p.members {
            node_pool[i] = Some(r);
        }
    }
    let live: Vec<&AllocationState> = view.allocations.iter().filter(|a| !a.deleting).collect();
    let active = |a: &str| view.allocations.iter().any(|s| s.name == a && s.was_active);
    // The tenant's namespaces' pods only, by the stores' namespace indexes:
    // workers and labelled pods in any phase, and the other running pods.
    let s = &ctx.stores;
    let in_namespace = |ns: &str, index: &PodIndex, store: &Shared<Pod>| -> Vec<Arc<Pod>> {
        index.names(ns).iter().filter_map(|n| store.store.get(&ObjectRef::new(n).within(ns))).collect()
    };
    let pods = namespaces.iter().flat_map(|&ns| {
        let plain = in_namespace(ns, &s.pods_by_namespace, &s.pods);
        let labelled = in_namespace(ns, &s.workload_pods_by_namespace, &s.workload_pods);
        in_namespace(ns, &s.workers_by_namespace, &s.workers).into_iter().chain(labelled).chain(
            plain
                .into_iter()
                .filter(|p| !p.labels().contains_key(PROJECT_LABEL) && !p.labels().contains_key(ALLOCATION_LABEL)),
        )
    });
    let mut out = Charged { lives: Vec::new(), pods: BTreeMap::new(), settle_due: None };
    for pod in pods {
        let Some(ns) = pod.metadata.namespace.as_deref().filter(|ns| namespaces.contains(ns)) else { continue };
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let pool = node.and_then(|n| view.node_index.get(n)).and_then(|&i| node_pool[i]);
        let candidates: Vec<&AllocationState> =
            live.iter().copied().filter(|a| a.namespaces.iter().any(|n| n == ns)).collect();
        let label = pod.labels().get(snapshot::ALLOCATION_LABEL).map(String::as_str);
        let to = usage::charged_to(&candidates, label, pool.map(|p| p.name.as_str()), &active);
        if to.is_none_or(|a| a.name != name) {
            continue;
        }
        let life = snapshot::pod_life(&pod, pool, now);
        if life.held && !life.settle {
            let deleted = pod.metadata.deletion_timestamp.as_ref().map(|t| t.0);
            out.settle_due = out.settle_due.min(deleted).or(out.settle_due.or(deleted));
        }
        out.pods.insert(life.uid.clone(), pod);
        out.lives.push(life);
    }
    out
}

/// The allocation's ModelProjects ("namespace/name") and the usage they show.
fn projects_of(ctx: &Context, alloc: &GpuAllocation) -> BTreeMap<String, Option<ProjectUsage>> {
    let name = alloc.name_any();
    ctx.stores
        .projects
        .store
        .state()
        .iter()
        .filter(|p| p.spec.allocation == name)
        .filter_map(|p| {
            let ns = p.namespace()?;
            alloc
                .spec
                .tenant
                .namespaces
                .contains(&ns)
                .then(|| (format!("{ns}/{}", p.name_any()), p.status.as_ref().and_then(|s| s.usage.clone())))
        })
        .collect()
}

/// The allocation's labelled batch Jobs that exist (JobSets and Jobs of no
/// label exist for the ledger while their pods do).
fn workloads_of(ctx: &Context, alloc: &GpuAllocation) -> BTreeSet<Workload> {
    let name = alloc.name_any();
    ctx.stores
        .jobs
        .store
        .state()
        .iter()
        .filter(|j| j.labels().get(ALLOCATION_LABEL) == Some(&name))
        .filter_map(|j| {
            let ns = j.namespace()?;
            alloc.spec.tenant.namespaces.contains(&ns).then(|| Workload::new("Job", format!("{ns}/{}", j.name_any())))
        })
        .collect()
}

/// Writes `status.usage` of a ModelProject under the ledger's own field manager.
async fn write_project_usage(ctx: &Context, project: &str, usage: &ProjectUsage) -> Result<(), Error> {
    let (ns, name) = project.split_once('/').unwrap_or(("", project));
    let api: Api<ModelProject> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": ModelProject::api_version(&()),
        "kind": ModelProject::kind(&()),
        "status": { "usage": usage },
    });
    match api.patch_status(name, &PatchParams::apply(LEDGER_MANAGER).force(), &Patch::Apply(patch)).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        r => r.map(drop).map_err(Error::from),
    }
}

/// Removes the ledger finalizer of a pod, and nothing else: the patch names
/// the version it was made from, so a pod that changed meanwhile refuses it
/// (409) and its change brings another reconcile.
async fn release(ctx: &Context, pod: &Pod) -> Result<(), Error> {
    if !pod.finalizers().iter().any(|f| f == LEDGER_FINALIZER) {
        return Ok(());
    }
    let rest: Vec<&String> = pod.finalizers().iter().filter(|f| *f != LEDGER_FINALIZER).collect();
    let patch = serde_json::json!({
        "metadata": { "finalizers": rest, "resourceVersion": pod.resource_version() },
    });
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    match api.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await {
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        r => r.map(drop).map_err(Error::from),
    }
}

/// Deleted pods held by the ledger (ModelProject workers, and the pods of
/// admitted Jobs and JobSets) that no allocation charges (none lists their
/// namespace any more, or the one that did is being deleted) would wait for
/// ever: their finalizer goes at once.
async fn release_orphans(ctx: Arc<Context>) {
    let s = &ctx.stores;
    // A changed pod is checked alone; a changed allocation (a namespace unlisted,
    // an allocation deleted) checks every pod being deleted.
    let pods = futures::stream::select(s.workers.events(), s.workload_pods.events()).map(Some);
    let allocations = s.allocations.changes().map(|_| None);
    let mut wake = std::pin::pin!(futures::stream::select(pods, allocations));
    while let Some(changed) = wake.next().await {
        let allocations = s.allocations.store.state();
        let candidates = match changed {
            Some(pod) => vec![pod],
            None => s.workers.store.state().into_iter().chain(s.workload_pods.store.state()).collect(),
        };
        for pod in candidates.into_iter().filter(|p| orphaned(p, &allocations)) {
            if let Err(e) = release(&ctx, &pod).await {
                tracing::debug!(error = %e, pod = pod.name_any(), "cannot release an orphaned pod yet");
            }
        }
    }
}

/// A pod being deleted that holds the ledger's finalizer while no allocation
/// (not being deleted) lists its namespace: none will ever charge it.
fn orphaned(pod: &Pod, allocations: &[Arc<GpuAllocation>]) -> bool {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    pod.metadata.deletion_timestamp.is_some()
        && pod.finalizers().iter().any(|f| f == LEDGER_FINALIZER)
        && !allocations
            .iter()
            .any(|a| a.metadata.deletion_timestamp.is_none() && a.spec.tenant.namespaces.iter().any(|n| n == ns))
}

/// Labels and taints `wanted`, clears every other node labelled for `name`.
/// Returns the nodes released.
async fn reconcile_nodes(ctx: &Context, name: &str, wanted: &BTreeSet<String>) -> Result<Vec<String>, Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut released = Vec::new();
    // The wanted nodes and those labelled for it now (the model's index): not every node.
    let mut candidates: BTreeSet<String> = ctx.stores.model.read(|m| m.reserved_for(name)).into_iter().collect();
    candidates.extend(wanted.iter().cloned());
    for node_name in candidates {
        let Some(node) = ctx.stores.nodes.store.get(&ObjectRef::new(&node_name)) else { continue };
        let labelled = node.labels().get(crate::snapshot::RESERVED_FOR).map(String::as_str) == Some(name);
        if wanted.contains(&node_name) {
            nodes::set_reservation(&api, &node, Some(name)).await?;
        } else if labelled {
            nodes::set_reservation(&api, &node, None).await?;
            released.push(node_name);
        }
    }
    Ok(released)
}
