//! The admission loop: the one task that decides which gangs hold devices.
//!
//! It wakes on changes (a burst of watch events is coalesced into one cycle),
//! takes the cluster view of that moment, runs the pure planner over every
//! queue at once and writes what it decided to the projects' status:
//! admissions (pool and nodes), preemption and reclaim of victims, runs
//! stopped because their grant is no longer in force, and the queue's reasons.
//! Everything that fits is admitted in the same cycle, however deep the queue.
//!
//! Each write is *assumed* at once: the written project stands in for the
//! store's copy until the store shows a newer version, so the next cycle never
//! gives the same devices twice even before the watch catches up. A write
//! that fails is forgotten, and the project is planned again.
//!
//! The project reconcilers then materialize what status says (pods, Service)
//! and observe the run; they never plan.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::project::{Note, holds_devices, requeue_gang, validate};
use super::queue::{self, Queue};
use super::view::View;
use super::{Context, Error};
use crate::api::{ModelProject, ModelProjectStatus, ProjectPhase, condition, set_condition};
use crate::planner::grants::Phase;
use crate::planner::placement::Outcome;

/// A burst of events arriving within this pause is one cycle.
const COALESCE: Duration = Duration::from_millis(20);
/// The shortest pause between two cycles. Runs that arrive one by one (a
/// `kubectl apply` of hundreds) are admitted a few cycles a second, each
/// taking everything that arrived since: a pass per arrival would plan the
/// whole cluster hundreds of times for nothing.
const MIN_GAP: Duration = Duration::from_millis(200);
/// A cycle runs at least this often, for what moves with time alone.
const IDLE_CYCLE: Duration = Duration::from_secs(5);
/// Status writes in flight at once.
const WRITE_CONCURRENCY: usize = 32;
/// Queue reasons (positions, numbers) rewritten per cycle at most, and per
/// project at most this often: admissions come first, a deep queue's reasons
/// are refreshed without flooding the API server.
const WAITING_WRITES_PER_CYCLE: usize = 200;
const WAITING_REFRESH: Duration = Duration::from_secs(10);
/// How long a cycle reuses the view when only projects and pods changed: the
/// planner reads pods from the stores, and the view's capacity, reservations
/// and grant phases move with nodes, pools and allocations (or with time).
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
        occupancy(s.pods.removals().boxed()),
        occupancy(s.workers.removals().boxed()),
    ]);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut state = LoopState::default();
    let mut capacity_changed = true;
    loop {
        let started = Instant::now();
        let wake = cycle(&ctx, &mut state, capacity_changed).await;
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

/// Whether a project waits for admission: without one, a change of pods or
/// projects decides nothing.
fn anyone_waits(ctx: &Context) -> bool {
    let now = k8s_openapi::jiff::Timestamp::now();
    ctx.stores.projects.store.state().iter().any(|p| queue::wants_admission(p, now))
}

/// What the loop remembers between cycles: its writes the store has not shown
/// yet, and when it last wrote each waiting project's reason.
#[derive(Default)]
struct LoopState {
    /// The view of the last capacity change (nodes, pools, grants), reused
    /// for cycles that only projects and pods moved, up to [`VIEW_REUSE`].
    view: Option<(Arc<View>, Instant)>,
    /// key -> (resourceVersion the write was decided on, the written project, when).
    assumed: HashMap<String, (String, Arc<ModelProject>, Instant)>,
    waiting_written: HashMap<String, Instant>,
}

/// One write decided by a cycle.
struct Write {
    /// What was decided, for the log: admit, wait, preempt, stop.
    kind: &'static str,
    project: Arc<ModelProject>,
    status: ModelProjectStatus,
    events: Vec<Note>,
    /// An admission: counted in the wait histogram once written.
    admission_wait: Option<f64>,
    /// A victim: written only once its preemptor has recorded it.
    preemptor: Option<String>,
}

/// One cycle: plan everything, write the decisions; returns when to run again
/// if nothing changes.
async fn cycle(ctx: &Context, state: &mut LoopState, capacity_changed: bool) -> Duration {
    let started = Instant::now();
    let now = Timestamp::now();
    let view = state.view(ctx, capacity_changed).await;
    let projects = assume(ctx, state);
    let valid = |p: &ModelProject| {
        let a = ctx.stores.allocations.store.get(&ObjectRef::new(&p.spec.allocation));
        validate(p, a.as_deref()).is_ok()
    };
    let plan_started = Instant::now();
    let q = queue::plan(&view, now, &projects, &ctx.stores, ctx.starvation_after, &ctx.metrics, &valid);
    ctx.metrics.observe_planning("admission", plan_started.elapsed().as_secs_f64());

    let (mut urgent, mut waiting) = (Vec::new(), Vec::new());
    let mut wake = IDLE_CYCLE;
    for p in &projects {
        if p.metadata.deletion_timestamp.is_some() || !valid(p) {
            continue;
        }
        let status = p.status.as_ref();
        if let Some(t) = status.and_then(|s| s.retry_after.as_ref()).filter(|t| t.0 > now) {
            wake = wake.min(super::project::until(now, t.0));
        }
        if holds_devices(status.and_then(|s| s.phase)) {
            if let Some(w) = stop_inactive(&view, now, p).or_else(|| preempt(ctx, now, &q, p)) {
                urgent.push(w);
            }
            continue;
        }
        match q.outcomes.get(&queue::key(p)) {
            Some(Outcome::Admitted { pool, nodes }) => urgent.push(admit(ctx, &view, now, &q, p, pool, nodes)),
            Some(Outcome::Waiting { position, reason }) => {
                if let Some(w) = wait(&view, now, &q, p, *position, reason) {
                    waiting.push(w);
                }
            }
            None => {}
        }
    }
    // A preemptor records its victims before they are stopped: if that write
    // fails, nobody is stopped this cycle (else it could be admitted later
    // without the protection that keeps its victims from preempting it back).
    let (preemptors, mut waiting): (Vec<Write>, Vec<Write>) =
        waiting.into_iter().partition(|w| q.preempting.contains_key(&queue::key(&w.project)));
    let mut ready: std::collections::HashSet<String> = projects
        .iter()
        .filter(|p| {
            let listed = p.status.as_ref().map(|s| &s.preempted);
            q.preempting.get(&queue::key(p)).is_some_and(|pre| listed == Some(&pre.victims))
        })
        .map(|p| queue::key(p))
        .collect();
    // Waiting reasons: never-written ones first, each refreshed at most every
    // WAITING_REFRESH unless its reason changed, a bounded number per cycle.
    let keys: std::collections::HashSet<String> = projects.iter().map(|p| queue::key(p)).collect();
    state.waiting_written.retain(|k, _| keys.contains(k));
    waiting.retain(|w| {
        let old = w.project.status.as_ref();
        let same_reason = old.and_then(|s| crate::api::find_condition(&s.conditions, "Queued")).map(|c| &c.reason)
            == crate::api::find_condition(&w.status.conditions, "Queued").map(|c| &c.reason);
        let recent = state.waiting_written.get(&queue::key(&w.project)).is_some_and(|t| t.elapsed() < WAITING_REFRESH);
        !(same_reason && recent && old.is_some())
    });
    waiting.sort_by_key(|w| w.project.status.is_some());
    if waiting.len() > WAITING_WRITES_PER_CYCLE {
        waiting.truncate(WAITING_WRITES_PER_CYCLE);
        wake = wake.min(Duration::from_millis(500));
    }
    let decided = preemptors.len() + urgent.len() + waiting.len();
    for w in &waiting {
        state.waiting_written.insert(queue::key(&w.project), Instant::now());
    }
    let written = write_all(ctx, state, preemptors).await;
    ready.extend(written);
    urgent.retain(|w| w.preemptor.as_ref().is_none_or(|k| ready.contains(k)));
    write_all(ctx, state, urgent).await;
    write_all(ctx, state, waiting).await;
    if decided > 0 {
        tracing::debug!(decided, elapsed_ms = started.elapsed().as_millis() as u64, "admission cycle");
    }
    wake
}

impl LoopState {
    async fn view(&mut self, ctx: &Context, capacity_changed: bool) -> Arc<View> {
        match &self.view {
            Some((view, at)) if !capacity_changed && at.elapsed() < VIEW_REUSE => view.clone(),
            _ => {
                let view = ctx.fresh_view().await;
                self.view = Some((view.clone(), Instant::now()));
                view
            }
        }
    }
}

/// Writes a batch concurrently and assumes what was written; returns the keys written.
async fn write_all(ctx: &Context, state: &mut LoopState, batch: Vec<Write>) -> Vec<String> {
    let results: Vec<_> =
        futures::stream::iter(batch).map(|w| write(ctx, w)).buffer_unordered(WRITE_CONCURRENCY).collect().await;
    let mut keys = Vec::with_capacity(results.len());
    for (key, rv, written) in results.into_iter().flatten() {
        keys.push(key.clone());
        state.assumed.insert(key, (rv, written, Instant::now()));
    }
    keys
}

/// The projects of the store, with the loop's own writes standing in for
/// copies the store has not caught up with.
fn assume(ctx: &Context, state: &mut LoopState) -> Vec<Arc<ModelProject>> {
    let store = &ctx.stores.projects.store;
    state.assumed.retain(|key, (rv, _, at)| {
        let Some((ns, name)) = key.split_once('/') else { return false };
        let current = store.get(&ObjectRef::new(name).within(ns));
        at.elapsed() < ASSUME_TTL && current.is_some_and(|p| p.resource_version().as_deref() == Some(rv.as_str()))
    });
    store
        .state()
        .into_iter()
        .map(|p| match state.assumed.get(&queue::key(&p)) {
            Some((_, written, _)) => written.clone(),
            None => p,
        })
        .collect()
}

/// Writes one decision (guarded by the version it was decided on) and its
/// Events; returns what to assume, or nothing if the write failed.
async fn write(ctx: &Context, w: Write) -> Option<(String, String, Arc<ModelProject>)> {
    let ns = w.project.namespace().unwrap_or_default();
    let name = w.project.name_any();
    let rv = w.project.resource_version()?;
    let api = Api::<ModelProject>::namespaced(ctx.client.clone(), &ns);
    match super::apply_status(&api, &name, Some(&rv), &w.status).await {
        Ok(written) => {
            tracing::debug!(project = %format!("{ns}/{name}"), decision = w.kind, pool = ?w.status.pool, nodes = ?w.status.nodes, "written");
            if let Some(wait) = w.admission_wait {
                ctx.metrics.observe_admission_wait(wait);
            }
            if w.preemptor.is_some()
                && let Some(stop) = w.events.first()
            {
                // Preempted or Reclaimed: a gang stop like any other.
                ctx.metrics.count_gang_restart(stop.reason);
            }
            let on = w.project.object_ref(&());
            for note in w.events {
                ctx.event(&on, note.warning, note.reason, note.message).await;
            }
            Some((format!("{ns}/{name}"), rv, Arc::new(written)))
        }
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 || e.code == 404 => {
            tracing::debug!(project = %format!("{ns}/{name}"), decision = w.kind, code = e.code, "decided on an old version; planned again");
            None
        }
        Err(e) => {
            tracing::warn!(project = %format!("{ns}/{name}"), error = %e, "cannot write an admission decision");
            None
        }
    }
}

fn base_status(p: &ModelProject, now: Timestamp) -> ModelProjectStatus {
    let mut s =
        ModelProjectStatus { observed_generation: p.metadata.generation, ..p.status.clone().unwrap_or_default() };
    let valid = condition("Valid", true, "Valid", "allocation and pools resolve", p.metadata.generation);
    set_condition(&mut s.conditions, valid, &Time(now));
    s
}

fn admit(
    ctx: &Context,
    view: &View,
    now: Timestamp,
    q: &Queue,
    p: &Arc<ModelProject>,
    pool: &str,
    nodes: &[String],
) -> Write {
    let g = p.metadata.generation;
    let at = Time(now);
    let mut s = base_status(p, now);
    let total = p.spec.workers as i64 * p.spec.accelerators_per_worker as i64;
    let before = q.admitted.get(&(p.spec.allocation.clone(), pool.to_string())).copied().unwrap_or(0);
    s.borrowed = before + total > queue::granted(view, &p.spec.allocation, pool);
    s.phase = Some(ProjectPhase::Admitted);
    s.pool = Some(pool.to_string());
    s.nodes = nodes.to_vec();
    s.queue_position = None;
    s.admitted_at = Some(at.clone());
    s.retry_after = None;
    if !s.preempted.is_empty() {
        // It displaced others: they may not displace it back right away.
        s.protected_until = Some(Time(now.checked_add(ctx.min_run_time).unwrap_or(now)));
    }
    set_condition(
        &mut s.conditions,
        condition("Queued", false, "Admitted", format!("admitted to pool {pool}"), g),
        &at,
    );
    let borrowed = if s.borrowed { " on borrowed capacity" } else { "" };
    let message = format!("admitted to pool {pool}{borrowed} on nodes {}", nodes.join(", "));
    let wait = p.metadata.creation_timestamp.as_ref().map(|c| now.duration_since(c.0).as_secs_f64());
    Write {
        kind: "admit",
        project: p.clone(),
        status: s,
        events: vec![Note { warning: false, reason: "Admitted", message }],
        admission_wait: Some(wait.unwrap_or(0.0)),
        preemptor: None,
    }
}

fn wait(view: &View, now: Timestamp, q: &Queue, p: &Arc<ModelProject>, position: u32, reason: &str) -> Option<Write> {
    let g = p.metadata.generation;
    let mut s = base_status(p, now);
    let key = queue::key(p);
    s.phase = Some(s.phase.unwrap_or(ProjectPhase::Queued));
    s.queue_position = Some(position as i32);
    let first = !s.conditions.iter().any(|c| c.type_ == "Queued" && c.status == "True");
    // The same reason whether the run was stopped by its grant or never started.
    let inactive = view.grants.allocations.get(&p.spec.allocation).is_some_and(|a| a.phase != Phase::Active);
    let mut why = if inactive {
        "AllocationInactive"
    } else if q.unsatisfiable.contains(&key) {
        "Unsatisfiable"
    } else {
        "Waiting"
    };
    let mut events = Vec::new();
    if let Some(pre) = q.preempting.get(&key) {
        why = "Preempting";
        if s.preempted != pre.victims {
            s.preempted = pre.victims.clone();
            events.push(Note { warning: false, reason: "Preempting", message: reason.to_string() });
        }
    }
    set_condition(&mut s.conditions, condition("Queued", true, why, reason.to_string(), g), &Time(now));
    let old_why =
        p.status.as_ref().and_then(|s| crate::api::find_condition(&s.conditions, "Queued")).map(|c| c.reason.as_str());
    if why == "Unsatisfiable" && old_why != Some(why) {
        events.push(Note { warning: true, reason: "Unsatisfiable", message: reason.to_string() });
    } else if first && why != "Preempting" {
        events.push(Note { warning: false, reason: "Queued", message: reason.to_string() });
    }
    (Some(&s) != p.status.as_ref()).then(|| Write {
        kind: "wait",
        project: p.clone(),
        status: s,
        events,
        admission_wait: None,
        preemptor: None,
    })
}

/// A run whose allocation stopped being in force is stopped, gracefully; a
/// used-up budget stops it only when its enforcement is Hard.
fn stop_inactive(view: &View, now: Timestamp, p: &Arc<ModelProject>) -> Option<Write> {
    let alloc = &p.spec.allocation;
    let plan = view.grants.allocations.get(alloc)?;
    let stops = match plan.phase {
        Phase::Active => false,
        Phase::Exhausted => view.hard_budget.contains(alloc),
        Phase::Pending | Phase::Expired => true,
    };
    if !stops {
        return None;
    }
    let why = plan.blocker.as_ref().map(|b| b.message()).unwrap_or_default();
    let message = format!("allocation {alloc} is {:?} ({why}): workers stopped with their grace period", plan.phase);
    let mut s = base_status(p, now);
    requeue_gang(&mut s, ProjectPhase::Queued);
    let c = condition("Queued", true, "AllocationInactive", message.clone(), p.metadata.generation);
    set_condition(&mut s.conditions, c, &Time(now));
    let events = vec![Note { warning: true, reason: "AllocationInactive", message }];
    Some(Write { kind: "stop", project: p.clone(), status: s, events, admission_wait: None, preemptor: None })
}

/// A running gang chosen as a victim by this cycle's preemption or reclaim.
fn preempt(ctx: &Context, now: Timestamp, q: &Queue, p: &Arc<ModelProject>) -> Option<Write> {
    let key = queue::key(p);
    let pre = q.victims.get(&key)?;
    let by = ctx.project(&pre.preemptor);
    let (reason, message) = if pre.reclaimed.contains(&key) {
        let owner = by.as_ref().map(|b| b.spec.allocation.clone()).unwrap_or_default();
        let msg = format!(
            "reclaimed: {} of allocation {owner} needs its guaranteed share of pool {} back; \
             this run was on borrowed capacity and is queued again",
            pre.preemptor, pre.pool
        );
        ("Reclaimed", msg)
    } else {
        let over = by.map(|b| b.spec.priority).unwrap_or_default();
        let msg = format!(
            "preempted by {} (priority {over} over {}) to make room in pool {}; queued again",
            pre.preemptor, p.spec.priority, pre.pool
        );
        ("Preempted", msg)
    };
    let at = Time(now);
    let g = p.metadata.generation;
    let mut s = ModelProjectStatus { observed_generation: g, ..p.status.clone().unwrap_or_default() };
    requeue_gang(&mut s, ProjectPhase::Queued);
    s.preemptions += 1;
    set_condition(&mut s.conditions, condition("Preempted", true, reason, message.clone(), g), &at);
    set_condition(&mut s.conditions, condition("Queued", true, reason, message.clone(), g), &at);
    let events = vec![Note { warning: true, reason, message }];
    let preemptor = Some(pre.preemptor.clone());
    Some(Write { kind: "preempt", project: p.clone(), status: s, events, admission_wait: None, preemptor })
}
