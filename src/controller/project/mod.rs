//! ModelProject reconciler: materializes and observes, never plans. It reads
//! the project, its worker pods, its allocation and pool from the stores
//! (dereference), asks the pure [`decide`] what comes next, and applies that:
//! stop or create workers, write status, publish Events. Admission, preemption and stopped grants are the admission loop's
//! (`super::admission`), which writes them to status.

mod decide;

mod refusal;
#[cfg(test)]
mod tests;

pub use decide::{Decision, Observed, decide, until};
use refusal::{Refusal, classify};

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::{Context, Error};
use crate::api::{GrantMode, ModelProject};
use crate::snapshot::PROJECT_LABEL;
use crate::workload::{self, Placement};

const CONTROLLER: &str = "modelproject";

pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let s = &ctx.stores;
    // A project is reconciled on its own changes (the admission loop's writes
    // included), its worker pods' and its EndpointSlice's; nothing cluster-wide. The first
    // item reconciles every project already in the store at start.
    let worker_projects = s.workers.events().filter_map(|pod| async move {
        let project = pod.labels().get(PROJECT_LABEL)?.clone();
        Some(ObjectRef::<ModelProject>::new(&project).within(&pod.namespace()?))
    });
    // Its rendezvous EndpointSlice too: one deleted by hand is put back.
    let slice_projects = s.slices.events().filter_map(|slice| async move {
        let project = slice.labels().get(PROJECT_LABEL)?.clone();
        Some(ObjectRef::<ModelProject>::new(&project).within(&slice.namespace()?))
    });
    let controller = Controller::for_shared_stream(s.projects.events(), s.projects.store.clone())
        .reconcile_all_on(futures::stream::once(async {}))
        .reconcile_on(worker_projects)
        .reconcile_on(slice_projects)
        .with_config(super::controller_config(Duration::from_millis(100)));
    super::drive(controller, CONTROLLER, ctx.clone(), shutdown, reconcile).await;
}

async fn reconcile(project: Arc<ModelProject>, ctx: Arc<Context>) -> Result<Action, Error> {
    if project.metadata.deletion_timestamp.is_some() {
        // Owner references take the pods with it.
        return Ok(Action::await_change());
    }
    let ns = project.namespace().unwrap_or_default();
    let name = project.name_any();
    if ctx
        .superseded(&written_key("modelproject", &ns, &name), project.resource_version().as_deref().unwrap_or_default())
    {
        return Ok(Action::await_change());
    }
    let s = &ctx.stores;
    let pods: Vec<Arc<Pod>> = s
        .workers_by_project
        .names(&format!("{ns}/{name}"))
        .iter()
        .filter_map(|n| s.workers.store.get(&ObjectRef::new(n).within(&ns)))
        .collect();
    ctx.pods_seen(pods.iter().map(|p| format!("{ns}/{}", p.name_any())));
    let allocation = s.allocations.store.get(&ObjectRef::new(&project.spec.allocation));
    let pool =
        project.status.as_ref().and_then(|st| st.pool.as_deref()).and_then(|p| s.pools.store.get(&ObjectRef::new(p)));
    let recently_created: BTreeSet<String> = (0..project.spec.workers.max(0) as usize)
        .map(|i| workload::worker_name(&name, i))
        .filter(|n| ctx.recently_created(&format!("{ns}/{n}")))
        .collect();
    let obs = Observed {
        now: Timestamp::now(),
        pods: &pods,
        allocation: allocation.as_deref(),
        pool: pool.as_deref(),
        recently_created: &recently_created,
        refusal: None,
    };
    let d = decide(&project, &obs);
    apply(&ctx, &project, &obs, d).await
}

async fn apply(ctx: &Context, project: &ModelProject, obs: &Observed<'_>, d: Decision) -> Result<Action, Error> {
    let ns = project.namespace().unwrap_or_default();
    let name = project.name_any();
    if d.stop_workers {
        stop_workers(ctx, &ns, &name).await?;
    }
    if d.delete_project {
        Api::<ModelProject>::namespaced(ctx.client.clone(), &ns).delete(&name, &DeleteParams::background()).await?;
        return Ok(Action::await_change());
    }
    let d = match create(ctx, project, obs, &d).await {
        None => d,
        Some(refusal) => {
            // Decided again with what the API server said.
            tracing::info!(project = %format!("{ns}/{name}"), object = %refusal.object, reason = refusal.reason, message = %refusal.message, "create refused");
            let d = decide(project, &Observed { refusal: Some(&refusal), ..*obs });
            if d.stop_workers {
                stop_workers(ctx, &ns, &name).await?;
            }
            d
        }
    };
    if let Some(reason) = d.gang_stop {
        ctx.metrics.count_gang_restart(reason);
    }
    let old = project.status.clone().unwrap_or_default();
    if d.status != old {
        let api = Api::<ModelProject>::namespaced(ctx.client.clone(), &ns);
        // Decided on this version only: if the project moved on (the admission
        // loop wrote it, say), the write is refused and the newer version is
        // reconciled instead.
        let from = project.resource_version().unwrap_or_default();
        let written = match super::apply_status(&api, &name, Some(&from), &d.status).await {
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            r => r?,
        };
        // A write that changed nothing brings no watch event to wait for.
        if written.resource_version().is_some_and(|rv| rv != from) {
            ctx.wrote(written_key("modelproject", &ns, &name), &from);
        }
    }
    publish_rendezvous(ctx, project, obs.pods).await?;
    let on = project.object_ref(&());
    for note in d.events {
        ctx.event(&on, note.type_, note.reason, note.message).await;
    }
    Ok(Action::requeue(d.requeue))
}

/// Key of an object this reconciler writes, in [`Context::wrote`].
fn written_key(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

/// Creates the workers the decision asks for (worker 0's DNS name is
/// [`publish_rendezvous`]'s); stops at the first refusal and returns it.
async fn create(ctx: &Context, project: &ModelProject, obs: &Observed<'_>, d: &Decision) -> Option<Refusal> {
    let pool = obs.pool.filter(|_| !d.create.is_empty())?;
    let ns = project.namespace().unwrap_or_default();
    let pool_name = pool.name_any();
    let dedicated = obs
        .allocation
        .is_some_and(|a| a.spec.grants.iter().any(|g| g.pool == pool_name && g.mode == GrantMode::Dedicated));
    let placement = Placement { pool, nodes: &d.status.nodes, dedicated };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for &i in &d.create {
        let pod = workload::worker_pod(project, &placement, i);
        let pod_name = pod.name_any();
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => ctx.pod_created(format!("{ns}/{pod_name}")),
            Err(e) => match classify(format!("Pod {pod_name}"), &e) {
                // It exists already: an earlier create the store does not show yet.
                None => ctx.pod_created(format!("{ns}/{pod_name}")),
                refusal => return refusal,
            },
        }
    }
    None
}

/// Names worker 0 under the namespace's rendezvous Service once it has an IP
/// (again when a restart gave it a new one), and takes the name back when it
/// stopped: its IP may go to another pod. A deleted worker 0 takes its
/// EndpointSlice with it (owner reference).
async fn publish_rendezvous(ctx: &Context, project: &ModelProject, pods: &[Arc<Pod>]) -> Result<(), Error> {
    let name = project.name_any();
    let ns = project.namespace().unwrap_or_default();
    let slice_name = workload::worker_name(&name, 0);
    let Some(worker0) = pods.iter().find(|p| p.name_any() == slice_name && p.metadata.deletion_timestamp.is_none())
    else {
        return Ok(());
    };
    let have = ctx.stores.slices.store.get(&ObjectRef::new(&slice_name).within(&ns));
    let key = written_key("endpointslice", &ns, &slice_name);
    let at = have.as_ref().and_then(|h| h.resource_version()).unwrap_or_default();
    if ctx.superseded(&key, &at) {
        // Our last apply is not in the store yet; its event reconciles again.
        return Ok(());
    }
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let stopped =
        worker0.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
    if stopped {
        if have.is_some() {
            super::delete_if_present(&api, &slice_name).await?;
        }
        return Ok(());
    }
    let Some(want) = workload::rendezvous_slice(&name, worker0) else {
        return Ok(());
    };
    let current = have.as_ref().is_some_and(|h| {
        h.endpoints == want.endpoints && h.metadata.owner_references == want.metadata.owner_references
    });
    if !current {
        let params = PatchParams::apply(super::FIELD_MANAGER).force();
        let applied = api.patch(&slice_name, &params, &Patch::Apply(&want)).await?;
        if applied.resource_version().is_some_and(|rv| rv != at) {
            ctx.wrote(key, &at);
        }
    }
    Ok(())
}

/// Deletes every worker pod of the project, each with its grace period so the
/// trainer can checkpoint.
pub(super) async fn stop_workers(ctx: &Context, ns: &str, name: &str) -> Result<(), Error> {
    if name.len() > 63 {
        // No pod can carry a label value this long, so none exists (and the
        // API server refuses the selector).
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("{PROJECT_LABEL}={name}"));
    api.delete_collection(&DeleteParams::default(), &lp).await?;
    Ok(())
}
