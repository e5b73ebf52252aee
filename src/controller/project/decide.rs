//! What a ModelProject needs next, from its status (written by the admission
//! loop and by earlier reconciles) and the pods observed. Pure: no client, so
//! the phase machine is table-tested (`tests.rs`).
//!
//! The admission loop owns every move between holding devices and not
//! (admission, preemption, reclaim, a stopped grant). This step materializes
//! and observes: it creates an admitted gang's workers, follows them to
//! Running, Succeeded or Failed, restarts the gang, and handles the scheduling
//! timeout, the deadline, suspension and the TTL after the end.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::refusal::Refusal;
use crate::api::policy::{Invalid, validate};
use crate::api::{
    AcceleratorPool, GpuAllocation, ModelProject, ModelProjectStatus, ProjectPhase, WorkerStates, condition,
    find_condition, holds_devices, requeue_gang, set_condition,
};
use crate::events::Note;
use crate::planner::gang::{self, GangView, Next, PodState, Stop, WorkerObs};
use crate::snapshot::WORKER_INDEX_LABEL;

/// Backoff before a gang that could not be placed in time is admitted again.
pub const RETRY_BACKOFF: SignedDuration = SignedDuration::from_secs(30);
/// Checked again after this long when nothing else is due.
const IDLE_RECHECK: Duration = Duration::from_secs(300);
/// A refusal that heals by itself is surfaced (condition and Event) once it
/// has lasted this long since admission; a blip is only retried.
pub const SURFACE_REFUSAL_AFTER: SignedDuration = SignedDuration::from_secs(5);
/// Retries of a refused create are spaced by the time since admission
/// (doubling), within these bounds.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The condition that reports the API server's refusals.
pub const WORKERS_CREATED: &str = "WorkersCreated";

/// What the reconcile read: the project's worker pods (any owner: an earlier
/// project of the same name may still hold the names), its allocation and the
/// pool it was admitted to.
pub struct Observed<'a> {
    pub now: Timestamp,
    pub pods: &'a [Arc<Pod>],
    pub allocation: Option<&'a GpuAllocation>,
    pub pool: Option<&'a AcceleratorPool>,
    /// Worker pods created a moment ago that the store does not show yet.
    pub recently_created: &'a BTreeSet<String>,
    /// The API server refused a create this decision asked for (decided
    /// again with it, by the apply step).
    pub refusal: Option<&'a Refusal>,
}

/// The decision: the status to write and what to do first.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: ModelProjectStatus,
    /// Delete every worker pod of the project (with their grace period).
    pub stop_workers: bool,
    /// Create these workers.
    pub create: Vec<usize>,
    /// The TTL after the end passed: delete the project.
    pub delete_project: bool,
    pub events: Vec<Note>,
    /// The gang was stopped for this reason (the `gang_stops_total` label).
    pub gang_stop: Option<&'static str>,
    pub requeue: Duration,
}

impl Decision {
    fn note(&mut self, warning: bool, reason: &'static str, message: impl Into<String>) {
        self.events.push(Note::new(warning, reason, message));
    }

    fn requeue_within(&mut self, d: Duration) {
        self.requeue = self.requeue.min(d);
    }
}

pub fn decide(project: &ModelProject, obs: &Observed<'_>) -> Decision {
    let old = project.status.clone().unwrap_or_default();
    let g = project.metadata.generation;
    let now = Time(obs.now);
    let mut d = Decision {
        status: ModelProjectStatus { observed_generation: g, ..old.clone() },
        stop_workers: false,
        create: Vec::new(),
        delete_project: false,
        events: Vec::new(),
        gang_stop: None,
        requeue: IDLE_RECHECK,
    };
    let phase = old.phase.unwrap_or(ProjectPhase::Queued);
    let has_pods = !obs.pods.is_empty();

    if let Err(Invalid { reason, message: msg }) = validate(project, obs.allocation) {
        let already = old.conditions.iter().any(|c| c.type_ == "Valid" && c.status == "False" && c.message == msg);
        set_condition(&mut d.status.conditions, condition("Valid", false, reason, msg.clone(), g), &now);
        if !already {
            d.note(true, reason, msg);
        }
        if has_pods && !matches!(phase, ProjectPhase::Succeeded) {
            d.stop_workers = true;
        }
        if holds_devices(old.phase) || old.phase.is_none() {
            requeue_gang(&mut d.status, ProjectPhase::Queued);
        }
        return settle(d, &old);
    }
    if old.phase.is_some() || has_pods {
        // A fresh, valid project is the admission loop's to write first.
        set_condition(
            &mut d.status.conditions,
            condition("Valid", true, "Valid", "allocation and pools resolve", g),
            &now,
        );
    }

    match phase {
        ProjectPhase::Succeeded | ProjectPhase::Failed => {
            d.stop_workers = phase == ProjectPhase::Failed && has_pods;
            if let (Some(ttl), Some(done)) =
                (project.spec.run_policy.ttl_seconds_after_finished, old.finished_at.as_ref())
            {
                let expires = done.0.checked_add(SignedDuration::from_secs(ttl as i64)).unwrap_or(done.0);
                if obs.now >= expires {
                    d.delete_project = true;
                } else {
                    d.requeue_within(until(obs.now, expires));
                }
            }
        }
        _ if project.spec.run_policy.suspend => {
            d.stop_workers = has_pods;
            if phase != ProjectPhase::Suspended {
                requeue_gang(&mut d.status, ProjectPhase::Suspended);
                d.status.queue_position = None;
                d.note(false, "Suspended", "suspended: workers stopped, devices given back to the grant");
            }
        }
        ProjectPhase::Suspended => {
            d.status.phase = Some(ProjectPhase::Queued);
            d.note(false, "Resumed", "resumed: queued for admission again");
        }
        ProjectPhase::Blocked => {
            d.stop_workers = has_pods;
            let blocked_at = find_condition(&old.conditions, WORKERS_CREATED).and_then(|c| c.observed_generation);
            if blocked_at != g {
                // The spec changed: try again, from the queue.
                d.status.phase = Some(ProjectPhase::Queued);
                d.status.conditions.retain(|c| c.type_ != WORKERS_CREATED);
                let generation = g.unwrap_or_default();
                d.note(
                    false,
                    "Unblocked",
                    format!("the spec changed (generation {generation}): queued for admission again"),
                );
            }
        }
        ProjectPhase::Queued | ProjectPhase::Restarting => {
            if has_pods {
                // The previous attempt's pods must be gone before new ones take
                // their names; the admission loop admits it again after that.
                d.stop_workers = true;
                d.requeue_within(Duration::from_secs(2));
            }
        }
        ProjectPhase::Admitted | ProjectPhase::Running => run_gang(project, obs, &mut d),
    }
    settle(d, &old)
}

/// Worker counts are written with transitions and while running, not for
/// every pod that starts: an admission costs one status write, and reaching
/// Running one more. A fresh project's first status is the admission loop's:
/// a write here would only race with it.
fn settle(mut d: Decision, old: &ModelProjectStatus) -> Decision {
    if d.status.phase.is_none() {
        d.status = old.clone();
    }
    if d.status.phase == old.phase && d.status.phase != Some(ProjectPhase::Running) {
        d.status.worker_states = old.worker_states.clone();
    }
    d
}

fn run_gang(project: &ModelProject, obs: &Observed<'_>, d: &mut Decision) {
    let g = project.metadata.generation;
    let now = Time(obs.now);
    d.status.worker_states = count_states(obs.pods);
    let Some(pool) = obs.pool.filter(|p| d.status.pool.as_deref() == Some(p.name_any().as_str())) else {
        // The pool it was admitted to is gone: admit it again elsewhere.
        d.stop_workers = !obs.pods.is_empty();
        requeue_gang(&mut d.status, ProjectPhase::Queued);
        return;
    };
    if obs.pods.iter().any(|p| !owned(project, p)) {
        // An earlier project's pods still hold the names: wait until they are gone.
        d.stop_workers = true;
        d.requeue_within(Duration::from_secs(2));
        return;
    }
    let observed: Vec<WorkerObs> = obs.pods.iter().filter_map(|p| observe(p)).collect();
    let run_policy = &project.spec.run_policy;
    let scheduling_timeout = SignedDuration::from_secs(run_policy.scheduling_timeout_seconds as i64);
    let gv = GangView {
        workers: project.spec.workers as usize,
        observed: &observed,
        was_running: d.status.phase == Some(ProjectPhase::Running),
        restarts: d.status.restarts,
        max_restarts: run_policy.max_restarts,
        admitted_at: d.status.admitted_at.as_ref().map(|t| t.0),
        started_at: d.status.started_at.as_ref().map(|t| t.0),
        scheduling_timeout,
        active_deadline: run_policy.active_deadline_seconds.map(SignedDuration::from_secs),
        now: obs.now,
    };
    let timeout_at = d.status.admitted_at.as_ref().and_then(|t| t.0.checked_add(scheduling_timeout).ok());
    let next = match gang::next(&gv) {
        // Workers that could not even be created are not bound either: the
        // timeout counts from admission all the same.
        Next::Create(_) if !gv.was_running && timeout_at.is_some_and(|t| obs.now >= t) => {
            let bound = observed.iter().filter(|w| !matches!(w.state, PodState::Pending { bound: false })).count();
            Next::Stop(Stop::SchedulingTimeout { bound })
        }
        next => next,
    };
    match next {
        Next::Create(_) if obs.refusal.is_some() => {
            refused(project, obs, d, obs.refusal.expect("matched"), timeout_at);
        }
        Next::Create(missing) => {
            let name = project.name_any();
            let (waiting, create): (Vec<usize>, Vec<usize>) = missing
                .into_iter()
                .partition(|i| obs.recently_created.contains(&crate::workload::worker_name(&name, *i)));
            d.create = create;
            if !waiting.is_empty() {
                // The store has not caught up with our creates yet.
                d.requeue_within(Duration::from_secs(2));
            }
            if let Some(t) = timeout_at {
                d.requeue_within(until(obs.now, t));
            }
        }
        Next::Wait => {
            if let Some(t) = timeout_at {
                d.requeue_within(until(obs.now, t));
            }
        }
        Next::Running => {
            if d.status.phase != Some(ProjectPhase::Running) {
                d.status.phase = Some(ProjectPhase::Running);
                if find_condition(&d.status.conditions, WORKERS_CREATED).is_some() {
                    let c = condition(WORKERS_CREATED, true, "Created", "the API server accepted every worker", g);
                    set_condition(&mut d.status.conditions, c, &now);
                }
                d.status.started_at.get_or_insert(now.clone());
                // No Event: the Running condition records when, and a national
                // cluster starts hundreds of runs a minute. Events are for
                // decisions (Admitted) and for what ends or troubles a run.
                let msg = format!("{} workers running in pool {}", project.spec.workers, pool.name_any());
                set_condition(&mut d.status.conditions, condition("Running", true, "AllWorkersRunning", msg, g), &now);
            }
            if let (Some(s), Some(deadline)) = (d.status.started_at.as_ref(), run_policy.active_deadline_seconds) {
                d.requeue_within(until(obs.now, s.0.checked_add(SignedDuration::from_secs(deadline)).unwrap_or(s.0)));
            }
        }
        Next::Succeeded => {
            d.status.phase = Some(ProjectPhase::Succeeded);
            d.status.finished_at = Some(now.clone());
            for type_ in ["Running", "Finished"] {
                let c = condition(type_, type_ == "Finished", "Succeeded", "all workers succeeded", g);
                set_condition(&mut d.status.conditions, c, &now);
            }
            d.note(false, "Succeeded", "all workers succeeded; devices given back");
            d.requeue_within(Duration::from_millis(50));
        }
        Next::Stop(stop) => {
            d.stop_workers = true;
            let (reason, mut msg) = describe(&stop, d.status.restarts, run_policy.max_restarts);
            if let (Stop::SchedulingTimeout { .. }, Some(c)) =
                (&stop, find_condition(&d.status.conditions, WORKERS_CREATED).filter(|c| c.status == "False"))
            {
                msg = format!("{msg} ({})", c.message);
            }
            d.gang_stop = Some(reason);
            match stop {
                Stop::WorkerFailed { .. } => {
                    d.status.restarts += 1;
                    requeue_gang(&mut d.status, ProjectPhase::Restarting);
                }
                Stop::WorkerLost { .. } => {
                    d.status.disruptions += 1;
                    requeue_gang(&mut d.status, ProjectPhase::Restarting);
                }
                Stop::SchedulingTimeout { .. } => {
                    requeue_gang(&mut d.status, ProjectPhase::Queued);
                    d.status.retry_after = obs.now.checked_add(RETRY_BACKOFF).ok().map(Time);
                }
                Stop::OutOfRestarts { .. } | Stop::DeadlineExceeded => {
                    d.status.phase = Some(ProjectPhase::Failed);
                    d.status.finished_at = Some(now.clone());
                    set_condition(&mut d.status.conditions, condition("Finished", true, reason, msg.clone(), g), &now);
                }
            }
            set_condition(&mut d.status.conditions, condition("Running", false, reason, msg.clone(), g), &now);
            d.note(true, reason, msg);
            d.requeue_within(Duration::from_secs(1));
        }
    }
}

/// A create the API server refused. One that does not heal by itself blocks
/// the run until its spec changes: its workers are stopped and its devices
/// given back at once. One that heals is retried, spaced by the time since
/// admission, and surfaced once it lasts; the scheduling timeout bounds how
/// long the gang holds its devices meanwhile.
fn refused(project: &ModelProject, obs: &Observed<'_>, d: &mut Decision, r: &Refusal, timeout_at: Option<Timestamp>) {
    let g = project.metadata.generation;
    let now = Time(obs.now);
    let said = format!("the API server refused {}: {}", r.object, r.message);
    d.create.clear();
    let previous = find_condition(&d.status.conditions, WORKERS_CREATED).filter(|c| c.status == "False");
    if !r.heals {
        d.stop_workers = true;
        requeue_gang(&mut d.status, ProjectPhase::Blocked);
        set_condition(&mut d.status.conditions, condition(WORKERS_CREATED, false, r.reason, said.clone(), g), &now);
        let msg = format!("{said}; the run is blocked until its spec changes: workers stopped, devices given back");
        set_condition(&mut d.status.conditions, condition("Running", false, "WorkersRefused", msg.clone(), g), &now);
        let parked = condition("Queued", false, "Blocked", "not queued until the spec changes", g);
        set_condition(&mut d.status.conditions, parked, &now);
        d.note(true, "WorkersRefused", msg);
        d.gang_stop = Some("WorkersRefused");
        d.requeue_within(Duration::from_secs(1));
        return;
    }
    let lasted = d.status.admitted_at.as_ref().map(|t| obs.now.duration_since(t.0)).unwrap_or_default();
    if lasted >= SURFACE_REFUSAL_AFTER && previous.is_none_or(|c| c.reason != r.reason) {
        let msg = format!("{said}; retrying until the scheduling timeout");
        set_condition(&mut d.status.conditions, condition(WORKERS_CREATED, false, r.reason, msg.clone(), g), &now);
        d.note(true, "WorkersRefused", msg);
    }
    let wait = Duration::from_secs_f64(lasted.as_secs_f64().max(0.0)).clamp(RETRY_MIN, RETRY_MAX);
    d.requeue_within(wait);
    if let Some(t) = timeout_at {
        d.requeue_within(until(obs.now, t));
    }
}

/// The Event reason (also the `gang_stops_total` label) and message of a stop.
pub fn describe(stop: &Stop, restarts: i32, max: i32) -> (&'static str, String) {
    let code = |c: Option<i32>| c.map(|c| c.to_string()).unwrap_or_else(|| "unknown".into());
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

/// How long from `now` until `t`, with a little slack so the moment has passed.
pub fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::from_secs_f64(t.duration_since(now).as_secs_f64().max(0.0)) + Duration::from_millis(100)
}

/// Whether this incarnation of the project owns the pod: pods of an earlier
/// project of the same name (still terminating) carry its label too.
fn owned(project: &ModelProject, pod: &Pod) -> bool {
    let uid = project.metadata.uid.as_deref();
    pod.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid)
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
