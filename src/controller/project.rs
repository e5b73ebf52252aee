//! ModelProject reconciler: queue and gang admission, the worker pods and the
//! headless Service, and the run to its end (restarts, scheduling timeout,
//! deadline, suspension, expiry of the allocation, TTL after finish).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::context::requeue;
use super::queue::{self, holds_devices};
use super::{Context, Error, FIELD_MANAGER};
use crate::api::{ModelProject, ModelProjectStatus, ProjectPhase, WorkerStates, condition, set_condition};
use crate::planner::gang::{self, GangView, Next, PodState, Stop, WorkerObs};
use crate::planner::grants::Phase;
use crate::planner::placement::Outcome;
use crate::snapshot::{PROJECT_LABEL, WORKER_INDEX_LABEL};
use crate::workload::{self, Placement};

const CONTROLLER: &str = "modelproject";
/// Backoff before a gang that could not be placed in time is admitted again.
const RETRY_BACKOFF: SignedDuration = SignedDuration::from_secs(30);

pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let s = &ctx.stores;
    // Capacity moves with nodes, pools, allocations and other projects: every
    // waiting project may be admitted. A worker pod's change concerns its project.
    // The first item reconciles every project already in the store at start.
    let everything = futures::stream::once(async {}).chain(futures::stream::select_all([
        s.nodes.changes().boxed(),
        s.pools.changes().boxed(),
        s.allocations.changes().boxed(),
        s.projects.changes().boxed(),
    ]));
    let worker_projects = s.workers.events().filter_map(|pod| async move {
        let project = pod.labels().get(PROJECT_LABEL)?.clone();
        Some(ObjectRef::<ModelProject>::new(&project).within(&pod.namespace()?))
    });
    // The same store the admission plan reads: a reconcile never sees an older
    // project than the plan did (a second watch could lag and undo an admission).
    Controller::for_shared_stream(s.projects.events(), s.projects.store.clone())
        .reconcile_all_on(everything)
        .reconcile_on(worker_projects)
        // Bounded concurrency: a burst of thousands of projects is worked through
        // by a fixed number of reconciles, each holding a view, not all at once.
        .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_millis(200)).concurrency(64))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

fn error_policy(_obj: Arc<ModelProject>, error: &Error, ctx: Arc<Context>) -> Action {
    super::on_error(&ctx, CONTROLLER, error)
}

/// What a reconcile decided, applied at the end.
struct Decision {
    status: ModelProjectStatus,
    events: Vec<(bool, &'static str, String)>,
    requeue: Option<Duration>,
    /// Decided on a view or plan that a newer one replaces soon: look again then.
    stale: bool,
}

async fn reconcile(project: Arc<ModelProject>, ctx: Arc<Context>) -> Result<Action, Error> {
    if project.metadata.deletion_timestamp.is_some() {
        // Owner references take the pods and the Service with it.
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    ctx.count_reconcile(CONTROLLER);
    let ns = project.namespace().unwrap_or_default();
    let name = project.name_any();
    let (view, stale) = ctx.recent_view();
    let now = view.now;
    let old = project.status.clone().unwrap_or_default();
    let mut out = Decision {
        status: ModelProjectStatus { observed_generation: project.metadata.generation, ..old.clone() },
        events: Vec::new(),
        requeue: None,
        stale,
    };
    let pods = worker_pods(&ctx, &ns, &name);
    out.status.worker_states = count_states(&pods);
    let phase = old.phase.unwrap_or(ProjectPhase::Queued);
    if !matches!(phase, ProjectPhase::Queued | ProjectPhase::Restarting) {
        // The admission (if any) is visible now; a later return to the queue
        // must not find it still in flight.
        ctx.settled(&queue::key(&project));
    }

    // The allocation must exist, list the namespace and grant the pools.
    if let Err(msg) = validate(&project, &view) {
        set_condition(
            &mut out.status.conditions,
            condition("Valid", false, "InvalidReference", msg.clone(), project.metadata.generation),
            &Time(now),
        );
        if holds_devices(old.phase) {
            stop_workers(&ctx, &ns, &name).await?;
        }
        out.status.phase = Some(ProjectPhase::Queued);
        if !old.conditions.iter().any(|c| c.type_ == "Valid" && c.status == "False" && c.message == msg) {
            out.events.push((true, "InvalidReference", msg));
        }
        return finish(&ctx, &project, old, out, started).await;
    }
    set_condition(
        &mut out.status.conditions,
        condition("Valid", true, "Valid", "allocation and pools resolve", project.metadata.generation),
        &Time(now),
    );

    match phase {
        ProjectPhase::Succeeded | ProjectPhase::Failed => {
            if phase == ProjectPhase::Failed && !pods.is_empty() {
                stop_workers(&ctx, &ns, &name).await?;
            }
            if let (Some(ttl), Some(done)) =
                (project.spec.run_policy.ttl_seconds_after_finished, old.finished_at.as_ref())
            {
                let expires = done.0.checked_add(SignedDuration::from_secs(ttl as i64)).unwrap_or(done.0);
                if now >= expires {
                    Api::<ModelProject>::namespaced(ctx.client.clone(), &ns)
                        .delete(&name, &DeleteParams::background())
                        .await?;
                    return Ok(Action::await_change());
                }
                out.requeue = Some(until(now, expires));
            }
        }
        _ if project.spec.run_policy.suspend => {
            if !pods.is_empty() {
                stop_workers(&ctx, &ns, &name).await?;
            }
            if phase != ProjectPhase::Suspended {
                out.status.phase = Some(ProjectPhase::Suspended);
                out.status.pool = None;
                out.status.nodes.clear();
                out.status.queue_position = None;
                out.events.push((
                    false,
                    "Suspended",
                    "suspended: workers stopped, devices given back to the grant".into(),
                ));
            }
        }
        ProjectPhase::Suspended => {
            out.status.phase = Some(ProjectPhase::Queued);
            out.events.push((false, "Resumed", "resumed: queued for admission again".into()));
        }
        ProjectPhase::Queued | ProjectPhase::Restarting => {
            if !pods.is_empty() {
                // The previous attempt's pods must be gone before new ones take their names.
                stop_workers(&ctx, &ns, &name).await?;
                out.requeue = Some(Duration::from_secs(2));
            } else {
                admit_or_wait(&ctx, &project, &view, &mut out);
            }
        }
        ProjectPhase::Admitted | ProjectPhase::Running => {
            run_gang(&ctx, &project, &view, &pods, &mut out).await?;
        }
    }
    finish(&ctx, &project, old, out, started).await
}

fn validate(project: &ModelProject, view: &super::view::View) -> Result<(), String> {
    let ns = project.namespace().unwrap_or_default();
    let alloc = &project.spec.allocation;
    let Some(a) = view.allocations.iter().find(|a| &a.name == alloc) else {
        return Err(format!("GpuAllocation {alloc} does not exist"));
    };
    if !a.namespaces.contains(&ns) {
        return Err(format!("GpuAllocation {alloc} does not list namespace {ns} in tenant.namespaces"));
    }
    let ungranted: Vec<&String> =
        project.spec.placement.pools.iter().filter(|p| !a.grants.iter().any(|g| &g.pool == *p)).collect();
    if !ungranted.is_empty() {
        return Err(format!(
            "placement.pools names pools that GpuAllocation {alloc} grants nothing in: {}",
            ungranted.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    if !project.spec.preemptible {
        let allowed = view.allocation_allows_non_preemptible.contains(alloc);
        if !allowed {
            return Err(format!("preemptible: false needs GpuAllocation {alloc} to set allowNonPreemptible"));
        }
    }
    Ok(())
}

fn admit_or_wait(ctx: &Context, project: &ModelProject, view: &super::view::View, out: &mut Decision) {
    let (q, stale) = ctx.queue(view, false, |in_flight| {
        let projects = ctx.stores.projects.store.state();
        queue::plan(view, &projects, &ctx.stores, in_flight, ctx.starvation_after, &ctx.metrics)
    });
    out.stale |= stale;
    let key = queue::key(project);
    let g = project.metadata.generation;
    let now = Time(view.now);
    if let Some(t) = out.status.retry_after.as_ref().filter(|t| t.0 > view.now) {
        out.requeue = Some(until(view.now, t.0));
        return;
    }
    match q.outcomes.get(&key) {
        Some(Outcome::Admitted { pool, nodes }) => {
            ctx.admitted(key.clone(), pool.clone(), nodes.clone());
            let total = project.spec.workers as i64 * project.spec.accelerators_per_worker as i64;
            let before = q.admitted.get(&(project.spec.allocation.clone(), pool.clone())).copied().unwrap_or(0);
            out.status.borrowed = before + total > queue::granted(view, &project.spec.allocation, pool);
            out.status.phase = Some(ProjectPhase::Admitted);
            out.status.pool = Some(pool.clone());
            out.status.nodes = nodes.clone();
            out.status.queue_position = None;
            out.status.admitted_at = Some(now.clone());
            out.status.retry_after = None;
            if !out.status.preempted.is_empty() {
                // It displaced others: they may not displace it back right away.
                let until = view.now.checked_add(ctx.min_run_time).unwrap_or(view.now);
                out.status.protected_until = Some(Time(until));
            }
            let wait = project
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|c| view.now.duration_since(c.0).as_secs_f64())
                .unwrap_or(0.0);
            ctx.metrics.observe_admission_wait(wait);
            set_condition(
                &mut out.status.conditions,
                condition("Queued", false, "Admitted", format!("admitted to pool {pool}"), g),
                &now,
            );
            let borrowed = if out.status.borrowed { " on borrowed capacity" } else { "" };
            out.events.push((
                false,
                "Admitted",
                format!("admitted to pool {pool}{borrowed} on nodes {}", nodes.join(", ")),
            ));
            out.requeue = Some(Duration::from_millis(50));
        }
        Some(Outcome::Waiting { position, reason }) => {
            out.status.phase = Some(out.status.phase.unwrap_or(ProjectPhase::Queued));
            out.status.queue_position = Some(*position as i32);
            let first = !out.status.conditions.iter().any(|c| c.type_ == "Queued" && c.status == "True");
            // The same reason whether the run was stopped by its grant or never started.
            let inactive =
                view.grants.allocations.get(&project.spec.allocation).is_some_and(|p| p.phase != Phase::Active);
            let mut why = if inactive { "AllocationInactive" } else { "Waiting" };
            if let Some(p) = q.preempting.get(&key) {
                why = "Preempting";
                if out.status.preempted != p.victims {
                    out.status.preempted = p.victims.clone();
                    out.events.push((false, "Preempting", reason.clone()));
                }
            }
            set_condition(&mut out.status.conditions, condition("Queued", true, why, reason.clone(), g), &now);
            if first && why != "Preempting" {
                out.events.push((false, "Queued", reason.clone()));
            }
        }
        None => out.requeue = Some(Duration::from_secs(1)),
    }
}

async fn run_gang(
    ctx: &Context,
    project: &ModelProject,
    view: &super::view::View,
    pods: &[Arc<Pod>],
    out: &mut Decision,
) -> Result<(), Error> {
    let ns = project.namespace().unwrap_or_default();
    let name = project.name_any();
    let g = project.metadata.generation;
    let now = Time(view.now);
    // An allocation that stops being Active stops its runs, gracefully; a used-up
    // budget only does when its enforcement is Hard.
    let alloc = &project.spec.allocation;
    let stops = |p: &&crate::planner::grants::AllocationPlan| match p.phase {
        Phase::Active => false,
        Phase::Exhausted => view.hard_budget.contains(alloc),
        Phase::Pending | Phase::Expired => true,
    };
    if let Some(plan) = view.grants.allocations.get(alloc).filter(stops) {
        stop_workers(ctx, &ns, &name).await?;
        let why = plan.blocker.as_ref().map(|b| b.message()).unwrap_or_default();
        let msg = format!(
            "allocation {} is {:?} ({why}): workers stopped with their grace period",
            project.spec.allocation, plan.phase
        );
        requeue_gang(out, ProjectPhase::Queued);
        set_condition(
            &mut out.status.conditions,
            condition("Queued", true, "AllocationInactive", msg.clone(), g),
            &now,
        );
        out.events.push((true, "AllocationInactive", msg));
        return Ok(());
    }
    let key = queue::key(project);
    let (q, stale) = ctx.queue(view, true, |in_flight| {
        let projects = ctx.stores.projects.store.state();
        queue::plan(view, &projects, &ctx.stores, in_flight, ctx.starvation_after, &ctx.metrics)
    });
    out.stale |= stale;
    if let Some(p) = q.victims.get(&key) {
        stop_workers(ctx, &ns, &name).await?;
        let by = ctx.project(&p.preemptor);
        let (reason, msg) = if p.reclaimed.contains(&key) {
            let owner = by.as_ref().map(|b| b.spec.allocation.clone()).unwrap_or_default();
            let msg = format!(
                "reclaimed: {} of allocation {owner} needs its guaranteed share of pool {} back; \
                 this run was on borrowed capacity and is queued again",
                p.preemptor, p.pool
            );
            ("Reclaimed", msg)
        } else {
            let over = by.map(|b| b.spec.priority).unwrap_or_default();
            let msg = format!(
                "preempted by {} (priority {over} over {}) to make room in pool {}; queued again",
                p.preemptor, project.spec.priority, p.pool
            );
            ("Preempted", msg)
        };
        requeue_gang(out, ProjectPhase::Queued);
        ctx.metrics.count_gang_restart(reason);
        out.status.preemptions += 1;
        set_condition(&mut out.status.conditions, condition("Preempted", true, reason, msg.clone(), g), &now);
        set_condition(&mut out.status.conditions, condition("Queued", true, reason, msg.clone(), g), &now);
        out.events.push((true, reason, msg));
        return Ok(());
    }
    let Some(pool) = out.status.pool.as_deref().and_then(|p| ctx.stores.pools.store.get(&ObjectRef::new(p))) else {
        requeue_gang(out, ProjectPhase::Queued);
        return Ok(());
    };
    if pods.iter().any(|p| !owned(project, p)) {
        // An earlier project's pods still hold the names: wait until they are gone.
        stop_workers(ctx, &ns, &name).await?;
        out.requeue = Some(Duration::from_secs(2));
        return Ok(());
    }
    let observed: Vec<WorkerObs> = pods.iter().filter_map(|p| observe(p)).collect();
    let gv = GangView {
        workers: project.spec.workers as usize,
        observed: &observed,
        was_running: out.status.phase == Some(ProjectPhase::Running),
        restarts: out.status.restarts,
        max_restarts: project.spec.run_policy.max_restarts,
        admitted_at: out.status.admitted_at.as_ref().map(|t| t.0),
        started_at: out.status.started_at.as_ref().map(|t| t.0),
        scheduling_timeout: SignedDuration::from_secs(project.spec.run_policy.scheduling_timeout_seconds as i64),
        active_deadline: project.spec.run_policy.active_deadline_seconds.map(SignedDuration::from_secs),
        now: view.now,
    };
    ctx.pods_seen(pods.iter().map(|p| format!("{ns}/{}", p.name_any())));
    match gang::next(&gv) {
        Next::Create(missing) => {
            let placement = Placement {
                pool: &pool,
                nodes: &out.status.nodes,
                dedicated: queue::is_dedicated(view, &project.spec.allocation, &pool.name_any()),
            };
            let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
            let svc = workload::service(project, &pool.name_any());
            svc_api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&svc)).await?;
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let mut skipped = false;
            for i in missing {
                let pod = workload::worker_pod(project, &placement, i);
                let key = format!("{ns}/{}", pod.name_any());
                if ctx.recently_created(&key) {
                    skipped = true; // the store has not caught up with our create yet
                    continue;
                }
                match api.create(&PostParams::default(), &pod).await {
                    Ok(_) => ctx.pod_created(key),
                    Err(kube::Error::Api(e)) if e.code == 409 => ctx.pod_created(key),
                    Err(e) => return Err(e.into()),
                }
            }
            let timeout = Duration::from_secs(project.spec.run_policy.scheduling_timeout_seconds as u64);
            out.requeue = Some(if skipped { Duration::from_secs(2) } else { timeout });
        }
        Next::Wait => {
            let timeout = SignedDuration::from_secs(project.spec.run_policy.scheduling_timeout_seconds as i64);
            if let Some(t) = out.status.admitted_at.as_ref().and_then(|t| t.0.checked_add(timeout).ok()) {
                out.requeue = Some(until(view.now, t));
            }
        }
        Next::Running => {
            if out.status.phase != Some(ProjectPhase::Running) {
                out.status.phase = Some(ProjectPhase::Running);
                out.status.started_at.get_or_insert(now.clone());
                set_condition(
                    &mut out.status.conditions,
                    condition(
                        "Running",
                        true,
                        "AllWorkersRunning",
                        format!("{} workers running", project.spec.workers),
                        g,
                    ),
                    &now,
                );
                out.events.push((
                    false,
                    "Running",
                    format!("all {} workers running in pool {}", project.spec.workers, pool.name_any()),
                ));
            }
            if let (Some(d), Some(s)) =
                (project.spec.run_policy.active_deadline_seconds, out.status.started_at.as_ref())
            {
                out.requeue = Some(until(view.now, s.0.checked_add(SignedDuration::from_secs(d)).unwrap_or(s.0)));
            }
        }
        Next::Succeeded => {
            out.status.phase = Some(ProjectPhase::Succeeded);
            out.status.finished_at = Some(now.clone());
            set_condition(
                &mut out.status.conditions,
                condition("Running", false, "Succeeded", "all workers succeeded", g),
                &now,
            );
            set_condition(
                &mut out.status.conditions,
                condition("Finished", true, "Succeeded", "all workers succeeded", g),
                &now,
            );
            out.events.push((false, "Succeeded", "all workers succeeded; devices given back".into()));
            out.requeue = Some(Duration::from_millis(50));
        }
        Next::Stop(stop) => {
            stop_workers(ctx, &ns, &name).await?;
            let (reason, msg) = describe(&stop, out.status.restarts, project.spec.run_policy.max_restarts);
            ctx.metrics.count_gang_restart(reason);
            match stop {
                Stop::WorkerFailed { .. } => {
                    out.status.restarts += 1;
                    requeue_gang(out, ProjectPhase::Restarting);
                }
                Stop::WorkerLost { .. } => {
                    out.status.disruptions += 1;
                    requeue_gang(out, ProjectPhase::Restarting);
                }
                Stop::SchedulingTimeout { .. } => {
                    requeue_gang(out, ProjectPhase::Queued);
                    out.status.retry_after = view.now.checked_add(RETRY_BACKOFF).ok().map(Time);
                }
                Stop::OutOfRestarts { .. } | Stop::DeadlineExceeded => {
                    out.status.phase = Some(ProjectPhase::Failed);
                    out.status.finished_at = Some(now.clone());
                    set_condition(
                        &mut out.status.conditions,
                        condition("Finished", true, reason, msg.clone(), g),
                        &now,
                    );
                }
            }
            set_condition(&mut out.status.conditions, condition("Running", false, reason, msg.clone(), g), &now);
            out.events.push((true, reason, msg));
        }
    }
    Ok(())
}

/// Back to admission: the gang holds nothing until admitted again.
fn requeue_gang(out: &mut Decision, phase: ProjectPhase) {
    out.status.phase = Some(phase);
    out.status.pool = None;
    out.status.nodes.clear();
    out.status.borrowed = false;
    out.status.preempted.clear();
    out.status.protected_until = None;
    out.requeue = Some(Duration::from_secs(1));
}

fn describe(stop: &Stop, restarts: i32, max: i32) -> (&'static str, String) {
    match stop {
        Stop::WorkerFailed { index, exit_code } => (
            "WorkerFailed",
            format!(
                "worker {index} failed (exit code {}): restarting the gang ({} of {max} restarts)",
                code(*exit_code),
                restarts + 1
            ),
        ),
        Stop::OutOfRestarts { index, exit_code } => (
            "BackoffLimitExceeded",
            format!(
                "worker {index} failed (exit code {}) and all {max} restarts are used: the run failed",
                code(*exit_code)
            ),
        ),
        Stop::WorkerLost { index } => (
            "WorkerLost",
            format!("worker {index} was lost to its node: restarting the gang (not counted as a failure)"),
        ),
        Stop::SchedulingTimeout { bound } => (
            "SchedulingTimeout",
            format!(
                "only {bound} workers were bound to nodes in time: the gang goes back to the queue so it never holds devices half-placed"
            ),
        ),
        Stop::DeadlineExceeded => ("DeadlineExceeded", "activeDeadlineSeconds passed: the run failed".to_string()),
    }
}

fn code(c: Option<i32>) -> String {
    c.map(|c| c.to_string()).unwrap_or_else(|| "unknown".into())
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::from_secs_f64(t.duration_since(now).as_secs_f64().max(0.0)) + Duration::from_millis(100)
}

/// Whether this incarnation of the project owns the pod: pods of an earlier
/// project of the same name (still terminating) carry its label too.
fn owned(project: &ModelProject, pod: &Pod) -> bool {
    let uid = project.metadata.uid.as_deref();
    pod.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid)
}

/// The project's worker pods, from the store.
fn worker_pods(ctx: &Context, ns: &str, name: &str) -> Vec<Arc<Pod>> {
    ctx.stores
        .workers
        .store
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns) && p.labels().get(PROJECT_LABEL).map(String::as_str) == Some(name)
        })
        .collect()
}

/// The gang's view of one worker pod (pods being deleted are not counted).
fn observe(pod: &Pod) -> Option<WorkerObs> {
    let index = pod.labels().get(WORKER_INDEX_LABEL)?.parse().ok()?;
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let reason = status.and_then(|s| s.reason.as_deref()).unwrap_or("");
    let state = if pod.metadata.deletion_timestamp.is_some() || matches!(reason, "Evicted" | "NodeLost" | "Terminated")
    {
        PodState::Lost
    } else {
        match phase {
            "Running" => PodState::Running,
            "Succeeded" => PodState::Succeeded,
            "Failed" => PodState::Failed {
                exit_code: status
                    .and_then(|s| s.container_statuses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
                    .find(|c| *c != 0),
            },
            _ => PodState::Pending { bound: pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() },
        }
    };
    Some(WorkerObs { index, state })
}

fn count_states(pods: &[Arc<Pod>]) -> WorkerStates {
    let mut w = WorkerStates::default();
    for p in pods {
        match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Running") => w.running += 1,
            Some("Succeeded") => w.succeeded += 1,
            Some("Failed") => w.failed += 1,
            _ => w.pending += 1,
        }
    }
    w
}

/// Deletes every worker pod of the project, each with its grace period so the
/// trainer can checkpoint.
async fn stop_workers(ctx: &Context, ns: &str, name: &str) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("{PROJECT_LABEL}={name}"));
    api.delete_collection(&DeleteParams::default(), &lp).await?;
    Ok(())
}

async fn finish(
    ctx: &Context,
    project: &ModelProject,
    old: ModelProjectStatus,
    out: Decision,
    started: Instant,
) -> Result<Action, Error> {
    if out.status != old {
        let api = Api::<ModelProject>::namespaced(ctx.client.clone(), &project.namespace().unwrap_or_default());
        // Decided on this version only: if the project moved on, the write is
        // refused and the newer version is reconciled instead.
        let rv = project.resource_version();
        match super::apply_status(&api, &project.name_any(), rv.as_deref(), &out.status).await {
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
                if out.status.phase == Some(ProjectPhase::Admitted) && old.phase != out.status.phase {
                    ctx.settled(&queue::key(project)); // the admission was not written
                }
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            r => r?,
        }
    }
    let on = project.object_ref(&());
    for (warning, reason, note) in out.events {
        ctx.event(&on, warning, reason, note).await;
    }
    ctx.observe_duration(CONTROLLER, started.elapsed().as_secs_f64());
    Ok(requeue(out.stale, Some(out.requeue.unwrap_or(Duration::from_secs(300)))))
}
