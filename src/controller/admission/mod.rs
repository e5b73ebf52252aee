//! The admission loop: the one task that decides which gangs hold devices.
//!
//! Each cycle: snapshot (the view of the moment, the projects with the loop's
//! own unseen writes standing in, the gangs) -> [`crate::admission::decide`]
//! -> writes ([`writes::plan`], then [`write`]). The loop wakes on changes (a
//! burst of watch events is one cycle) and admits everything that fits in
//! the same cycle, however deep the queue.
//!
//! Each write is *assumed* at once: the written project stands in for the
//! store's copy until the store shows a newer version, so the next cycle never
//! gives the same devices twice even before the watch catches up. A write
//! that fails is forgotten, and the project is planned again. A preemptor
//! records its victims before they are stopped.
//!
//! The project reconcilers then materialize what status says (pods, Service)
//! and observe the run; they never plan. An admitted JobSet's pods, made
//! gated, get their planned nodes from [`placement`], a task of its own.

pub mod jobs;
pub mod lines;
pub mod placement;
#[cfg(test)]
mod tests;
mod write;
pub mod writes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::unseen::Unseen;
use super::view::View;
use crate::admission::{self, Decision, Decisions, GangKey, job, project};
use crate::api::ModelProject;
use crate::api::policy::validate;
use crate::telemetry::Metrics;
use crate::workload::kinds::JobSet;
use jobs::{Held, Workloads};
use lines::Lines;
pub use write::Writer;

/// A burst of events arriving within this pause is one cycle.
const COALESCE: Duration = Duration::from_millis(20);
/// The shortest pause between two cycles. Runs that arrive one by one (a
/// `kubectl apply` of hundreds) are admitted a few cycles a second, each
/// taking everything that arrived since: a pass per arrival would plan the
/// whole cluster hundreds of times for nothing.
const MIN_GAP: Duration = Duration::from_millis(200);
/// A cycle runs at least this often, for what moves with time alone.
const IDLE_CYCLE: Duration = Duration::from_secs(5);
/// Queue reasons (positions, numbers) rewritten per cycle at most, and per
/// project at most this often: admissions come first, a deep queue's reasons
/// are refreshed without flooding the API server.
const WAITING_WRITES_PER_CYCLE: usize = 200;
const WAITING_REFRESH: Duration = Duration::from_secs(10);
/// How long a cycle reuses the view when only projects and pods changed: the
/// view's capacity, reservations and grant phases move with nodes, pools and
/// allocations (or with time); projects and pods are read fresh each cycle.
const VIEW_REUSE: Duration = Duration::from_secs(2);
/// An assumed write the store never showed is dropped after this long.
const ASSUME_TTL: Duration = Duration::from_secs(60);

pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let s = &ctx.stores;
    // Capacity: nodes, pools and grants. Occupancy: projects, and pods that
    // stopped (a pod that starts frees nothing), which matter only while some
    // project waits for admission.
    let capacity = |c: futures::stream::BoxStream<'static, ()>| c.map(|_| true).boxed();
    let occupancy = |c: futures::stream::BoxStream<'static, ()>| c.map(|_| false).boxed();
    let mut changes = futures::stream::select_all([
        capacity(s.nodes.changes().boxed()),
        capacity(s.pools.changes().boxed()),
        capacity(s.allocations.changes().boxed()),
        occupancy(s.projects.changes().boxed()),
        occupancy(s.jobs.changes().boxed()),
        occupancy(s.jobsets.changes().boxed()),
        occupancy(s.pods.removals().boxed()),
        occupancy(s.workers.removals().boxed()),
    ]);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut state = LoopState::default();
    let writer = Writer::of(&ctx);
    let mut capacity_changed = true;
    loop {
        let started = Instant::now();
        let wake = cycle(&ctx, &writer, &mut state, capacity_changed).await;
        // A cycle costs O(cluster): wait at least as long as it took, so the
        // loop never takes more than half of a core however busy the cluster.
        let gap = started.elapsed().max(MIN_GAP);
        let ready_at = tokio::time::Instant::now() + gap;
        let next_tick = tokio::time::Instant::now() + wake;
        capacity_changed = false;
        loop {
            tokio::select! {
                c = changes.next() => capacity_changed |= c.unwrap_or(false),
                _ = tokio::time::sleep_until(next_tick) => break,
                _ = &mut shutdown => return,
            }
            tokio::time::sleep(COALESCE).await;
            while let Some(Some(c)) = changes.next().now_or_never() {
                capacity_changed |= c;
            }
            if capacity_changed || anyone_waits(&ctx) {
                break;
            }
        }
        tokio::time::sleep_until(ready_at).await;
    }
}

/// Whether a project or a labelled workload waits for admission: without
/// one, a change of pods, projects or workloads decides nothing.
fn anyone_waits(ctx: &Context) -> bool {
    let now = Timestamp::now();
    ctx.stores.projects.store.state().iter().any(|p| project::wants_admission(p, now))
        || ctx.stores.jobs.store.state().iter().any(|j| job::wants_admission(j.as_ref()))
        || ctx.stores.jobsets.store.state().iter().any(|j| job::wants_admission(j.as_ref()))
}

/// What the loop remembers between cycles: its writes the store has not shown
/// yet, and when it last wrote each waiting project's reason.
pub(crate) struct LoopState {
    pub(crate) assumed: Unseen<GangKey, Arc<ModelProject>>,
    waiting_written: HashMap<GangKey, Instant>,
    /// Labelled Jobs and JobSets: the loop's unseen writes, the waits announced.
    jobs: Held<Job>,
    jobsets: Held<JobSet>,
    /// The line last written of each labelled workload.
    lines: Lines,
}

impl Default for LoopState {
    fn default() -> Self {
        Self {
            assumed: Unseen::new(ASSUME_TTL),
            waiting_written: HashMap::new(),
            jobs: Held::new(ASSUME_TTL),
            jobsets: Held::new(ASSUME_TTL),
            lines: Lines::default(),
        }
    }
}

/// The labelled workloads of the stores, with the loop's own writes standing in.
fn assume_workloads(ctx: &Context, state: &LoopState) -> Workloads {
    let s = &ctx.stores;
    Workloads {
        jobs: state.jobs.overlay(s.jobs.store.state()),
        jobsets: state.jobsets.overlay(s.jobsets.store.state()),
    }
}

/// The projects of the store, with the loop's own writes standing in for
/// copies the store has not caught up with.
fn assume(ctx: &Context, state: &LoopState) -> Vec<Arc<ModelProject>> {
    state.assumed.overlay(ctx.stores.projects.store.state(), project::key)
}

/// The decisions of one moment: the gangs of `projects` on `view`, decided.
/// The admission loop's path and `plan`'s path both come through here.
pub fn decide(
    view: &View,
    stores: &super::stores::Stores,
    projects: &[Arc<ModelProject>],
    now: Timestamp,
    settings: &admission::Settings,
) -> Decisions {
    decide_with_workloads(view, stores, projects, &Workloads::of(stores), now, settings)
}

/// [`decide`], over these labelled workloads (the loop's: with its own writes standing in).
pub fn decide_with_workloads(
    view: &View,
    stores: &super::stores::Stores,
    projects: &[Arc<ModelProject>],
    workloads: &Workloads,
    now: Timestamp,
    settings: &admission::Settings,
) -> Decisions {
    let valid = validity(stores);
    let mut gangs: Vec<_> = projects.iter().filter_map(|p| project::gang(p, now, valid(p))).collect();
    gangs.extend(workloads.gangs(stores, now));
    admission::decide(&view.snapshot(stores, gangs), now, settings)
}

/// The loop's validity rule: a project whose references do not resolve is
/// neither planned nor written.
pub fn validity(stores: &super::stores::Stores) -> impl Fn(&ModelProject) -> bool + '_ {
    |p: &ModelProject| {
        let a = stores.allocations.store.get(&ObjectRef::new(&p.spec.allocation));
        validate(p, a.as_deref()).is_ok()
    }
}

/// One cycle: decide everything, write the decisions; returns when to run
/// again if nothing changes.
async fn cycle(ctx: &Context, writer: &Writer, state: &mut LoopState, capacity_changed: bool) -> Duration {
    let started = Instant::now();
    let now = Timestamp::now();
    let view = ctx.admission_view(if capacity_changed { Duration::ZERO } else { VIEW_REUSE }).await;
    let projects = assume(ctx, state);
    let workloads = assume_workloads(ctx, state);
    let plan_started = Instant::now();
    let decisions = decide_with_workloads(&view, &ctx.stores, &projects, &workloads, now, &ctx.settings);
    ctx.metrics.observe_planning("admission", plan_started.elapsed().as_secs_f64());
    record(&view, &projects, &decisions, &ctx.metrics);

    let mut wake = IDLE_CYCLE;
    for p in &projects {
        if let Some(t) = p.status.as_ref().and_then(|s| s.retry_after.as_ref()).filter(|t| t.0 > now) {
            wake = wake.min(super::project::until(now, t.0));
        }
    }
    let valid = validity(&ctx.stores);
    let mut w = writes::plan(&projects, &decisions, now, &valid);
    let keys: HashSet<GangKey> = projects.iter().map(|p| project::key(p)).collect();
    if writes::throttle(&mut w.waiting, &mut state.waiting_written, &keys, WAITING_REFRESH, WAITING_WRITES_PER_CYCLE) {
        wake = wake.min(Duration::from_millis(500));
    }
    let (job_urgent, job_waiting, job_preemptors) =
        jobs::plan(&ctx.stores, &workloads.jobs, &decisions, now, &mut state.jobs.announced);
    let (set_urgent, set_waiting, set_preemptors) =
        jobs::plan(&ctx.stores, &workloads.jobsets, &decisions, now, &mut state.jobsets.announced);
    w.ready.extend(job_preemptors);
    w.ready.extend(set_preemptors);
    let decided = w.preemptors.len()
        + w.urgent.len()
        + w.waiting.len()
        + job_urgent.len()
        + job_waiting.len()
        + set_urgent.len()
        + set_waiting.len();
    let ready = writer.write_cycle(w, &state.assumed).await;
    // A workload evicted for a project only once that project's status lists it.
    let victim_ready = |p: &Option<GangKey>| p.as_ref().is_none_or(|k| ready.contains(k));
    let job_urgent = job_urgent.into_iter().filter(|w| victim_ready(&w.preemptor)).collect();
    let set_urgent = set_urgent.into_iter().filter(|w| victim_ready(&w.preemptor)).collect();
    writer.write_jobs(job_urgent, &state.jobs.assumed).await;
    writer.write_jobs(set_urgent, &state.jobsets.assumed).await;
    writer.write_jobs(job_waiting, &state.jobs.assumed).await;
    writer.write_jobs(set_waiting, &state.jobsets.assumed).await;
    // Each workload's line, as these writes left it.
    let after = assume_workloads(ctx, state);
    let mut lines = Vec::new();
    state.lines.plan(&after.jobs, &decisions, &mut lines);
    state.lines.plan(&after.jobsets, &decisions, &mut lines);
    let live: HashSet<GangKey> = after
        .jobs
        .iter()
        .map(|j| job::key(j.as_ref()))
        .chain(after.jobsets.iter().map(|j| job::key(j.as_ref())))
        .collect();
    let lines = state.lines.throttle(lines, &live, WAITING_REFRESH, WAITING_WRITES_PER_CYCLE);
    if lines.cut {
        wake = wake.min(Duration::from_millis(500));
    }
    writer.write_lines(lines, &mut state.lines).await;
    if decided > 0 {
        tracing::debug!(decided, elapsed_ms = started.elapsed().as_millis() as u64, "admission cycle");
    }
    wake
}

/// Project counts by phase and pool, and waiting projects by allocation.
fn record(view: &View, projects: &[Arc<ModelProject>], decisions: &Decisions, metrics: &Metrics) {
    let mut by_phase: HashMap<(crate::api::ProjectPhase, &str), i64> = HashMap::new();
    let mut queued: BTreeMap<(String, String), i64> = BTreeMap::new();
    for p in projects {
        let status = p.status.as_ref();
        let phase = status.and_then(|s| s.phase).unwrap_or_default();
        let pool = status.and_then(|s| s.pool.as_deref()).unwrap_or_default();
        *by_phase.entry((phase, pool)).or_default() += 1;
        if matches!(decisions.get(&project::key(p)), Some(Decision::Wait { .. })) {
            let program = view.programs.get(&p.spec.allocation).cloned().unwrap_or_default();
            *queued.entry((p.spec.allocation.clone(), program)).or_default() += 1;
        }
    }
    let by_phase =
        by_phase.into_iter().map(|((phase, pool), n)| ((format!("{phase:?}"), pool.to_string()), n)).collect();
    metrics.projects(&by_phase, &queued);
}
