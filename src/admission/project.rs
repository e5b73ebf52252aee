//! ModelProject, the first kind adapted into the core and out of it: a
//! project is a gang ([`gang`]), and a decision about its gang is a status
//! to write with its Events ([`status`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::decide::{Decision, WaitReason};
use super::gang::{Gang, GangKey, GangState, Holding, TopologyRequest};
use crate::api::{
    ModelProject, ModelProjectStatus, ProjectPhase, TopologyMode, condition, find_condition, holds_devices,
    requeue_gang, set_condition,
};
use crate::events::Note;

pub fn key(p: &ModelProject) -> GangKey {
    GangKey::model_project(p.namespace().unwrap_or_default(), p.name_any())
}

/// Whether the project asks for admission now: queued or restarting, not
/// suspended, not backing off, not being deleted.
pub fn wants_admission(p: &ModelProject, now: Timestamp) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase);
    let backing_off = p.status.as_ref().and_then(|s| s.retry_after.as_ref()).is_some_and(|t| t.0 > now);
    !p.spec.run_policy.suspend
        && !backing_off
        && p.metadata.deletion_timestamp.is_none()
        && matches!(phase, None | Some(ProjectPhase::Queued | ProjectPhase::Restarting))
}

/// The project's gang, if it holds devices or (valid) waits for them.
pub fn gang(p: &ModelProject, now: Timestamp, valid: bool) -> Option<Gang> {
    let status = p.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    let state = match status {
        Some(s) if holds_devices(phase) => GangState::Holding(Holding {
            pool: s.pool.clone()?,
            nodes: s.nodes.clone(),
            borrowed: s.borrowed,
            admitted_at: s.admitted_at.as_ref().map(|t| t.0),
            protected_until: s.protected_until.as_ref().map(|t| t.0),
        }),
        _ if valid && wants_admission(p, now) => GangState::Waiting {
            restarting: phase == Some(ProjectPhase::Restarting),
            displaced: status.is_some_and(|s| !s.preempted.is_empty()),
        },
        _ => return None,
    };
    Some(Gang {
        key: key(p),
        allocation: p.spec.allocation.clone(),
        pools: p.spec.placement.pools.clone(),
        workers: p.spec.workers.max(0) as u32,
        per_worker: i64::from(p.spec.accelerators_per_worker),
        topology: p
            .spec
            .placement
            .topology
            .as_ref()
            .map(|t| TopologyRequest { key: t.key.clone(), required: t.mode == TopologyMode::Required }),
        priority: p.spec.priority,
        preemptible: p.spec.preemptible,
        queued_since: p.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now),
        state,
    })
}

/// A status to write for a decision, with its Events.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusChange {
    pub status: ModelProjectStatus,
    pub events: Vec<Note>,
}

/// The status a decision gives the project, or None when it changes nothing.
pub fn status(p: &ModelProject, d: &Decision, now: Timestamp) -> Option<StatusChange> {
    let change = match d {
        Decision::Admit { pool, nodes, borrowed, protected_until } => {
            admit(p, now, pool, nodes, *borrowed, *protected_until)
        }
        Decision::Wait { position, why, message, victims } => {
            let victims: Vec<String> = victims.iter().map(ToString::to_string).collect();
            wait(p, now, *position, *why, message, victims)?
        }
        Decision::Stop { message } => stop(p, now, message),
        Decision::Evict { reclaimed, message, .. } => evict(p, now, *reclaimed, message),
    };
    (Some(&change.status) != p.status.as_ref()).then_some(change)
}

fn base_status(p: &ModelProject, now: Timestamp) -> ModelProjectStatus {
    let mut s =
        ModelProjectStatus { observed_generation: p.metadata.generation, ..p.status.clone().unwrap_or_default() };
    let valid = condition("Valid", true, "Valid", "allocation and pools resolve", p.metadata.generation);
    set_condition(&mut s.conditions, valid, &Time(now));
    s
}

fn admit(
    p: &ModelProject,
    now: Timestamp,
    pool: &str,
    nodes: &[String],
    borrowed: bool,
    protected_until: Option<Timestamp>,
) -> StatusChange {
    let at = Time(now);
    let mut s = base_status(p, now);
    s.borrowed = borrowed;
    s.phase = Some(ProjectPhase::Admitted);
    s.pool = Some(pool.to_string());
    s.nodes = nodes.to_vec();
    s.queue_position = None;
    s.admitted_at = Some(at.clone());
    s.retry_after = None;
    if let Some(t) = protected_until {
        s.protected_until = Some(Time(t));
    }
    let c = condition("Queued", false, "Admitted", format!("admitted to pool {pool}"), p.metadata.generation);
    set_condition(&mut s.conditions, c, &at);
    let on_borrowed = if borrowed { " on borrowed capacity" } else { "" };
    let message = format!("admitted to pool {pool}{on_borrowed} on nodes {}", nodes.join(", "));
    StatusChange { status: s, events: vec![Note::normal("Admitted", message)] }
}

fn wait(
    p: &ModelProject,
    now: Timestamp,
    position: u32,
    why: WaitReason,
    message: &str,
    victims: Vec<String>,
) -> Option<StatusChange> {
    let mut s = base_status(p, now);
    s.phase = Some(s.phase.unwrap_or(ProjectPhase::Queued));
    s.queue_position = Some(position as i32);
    let first = !s.conditions.iter().any(|c| c.type_ == "Queued" && c.status == "True");
    let mut events = Vec::new();
    if why == WaitReason::Preempting && s.preempted != victims {
        s.preempted = victims;
        events.push(Note::normal("Preempting", message.to_string()));
    }
    let reason = why.as_str();
    let c = condition("Queued", true, reason, message.to_string(), p.metadata.generation);
    set_condition(&mut s.conditions, c, &Time(now));
    let old_why = p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Queued")).map(|c| c.reason.as_str());
    if why == WaitReason::Unsatisfiable && old_why != Some(reason) {
        events.push(Note::warning("Unsatisfiable", message.to_string()));
    } else if first && why != WaitReason::Preempting {
        events.push(Note::normal("Queued", message.to_string()));
    }
    (Some(&s) != p.status.as_ref()).then_some(StatusChange { status: s, events })
}

fn stop(p: &ModelProject, now: Timestamp, message: &str) -> StatusChange {
    let mut s = base_status(p, now);
    requeue_gang(&mut s, ProjectPhase::Queued);
    let c = condition("Queued", true, "AllocationInactive", message.to_string(), p.metadata.generation);
    set_condition(&mut s.conditions, c, &Time(now));
    let events = vec![Note::warning("AllocationInactive", message.to_string())];
    StatusChange { status: s, events }
}

fn evict(p: &ModelProject, now: Timestamp, reclaimed: bool, message: &str) -> StatusChange {
    let reason = if reclaimed { "Reclaimed" } else { "Preempted" };
    let at = Time(now);
    let g = p.metadata.generation;
    let mut s = ModelProjectStatus { observed_generation: g, ..p.status.clone().unwrap_or_default() };
    requeue_gang(&mut s, ProjectPhase::Queued);
    s.preemptions += 1;
    set_condition(&mut s.conditions, condition("Preempted", true, reason, message.to_string(), g), &at);
    set_condition(&mut s.conditions, condition("Queued", true, reason, message.to_string(), g), &at);
    StatusChange { status: s, events: vec![Note::warning(reason, message)] }
}
