//! The one line `kubectl get workloadadmissions` shows of a labelled Job or
//! JobSet ([`WorkloadAdmission`]), built purely: from the workload as the
//! loop's writes left it, the decision of the cycle, and the line written
//! before (a preempted workload stays Preempted until it runs again).

use std::collections::BTreeMap;
use std::hash::Hasher;

use kube::ResourceExt;
use kube::api::ObjectMeta;

use super::decide::{Decision, WaitReason};
use super::gang::GangKind;
use super::job::{Workload, holding, wants_admission};
use crate::api::{
    WorkloadAdmission, WorkloadAdmissionSpec, WorkloadAdmissionStatus, WorkloadRef, WorkloadRefKind, WorkloadState,
};
use crate::snapshot::{ALLOCATION_LABEL, JOB_LABEL, JOBSET_LABEL, MANAGED_BY};

/// Longest object name (a DNS subdomain) and label value.
const MAX_NAME: usize = 253;
const MAX_LABEL_VALUE: usize = 63;

/// The line of `w` now, or None when it has none: not labelled, being
/// deleted, or a Job that its JobSet runs. `decision` is the cycle's for its
/// gang; `previous` the line written last.
pub fn status<W: Workload>(
    w: &W,
    decision: Option<&Decision>,
    previous: Option<&WorkloadAdmissionStatus>,
) -> Option<WorkloadAdmissionStatus> {
    if w.meta().deletion_timestamp.is_some() || w.run_by_another() {
        return None;
    }
    let shape = match w.read() {
        Ok(Some(shape)) => shape,
        Ok(None) => return None,
        Err(e) => return Some(line(WorkloadState::Invalid, Some("NotAGang"), Some(e.to_string()))),
    };
    let sized = |mut s: WorkloadAdmissionStatus| {
        s.devices = Some(shape.devices());
        s.pods = Some(i64::from(shape.pods()));
        s
    };
    if let Some(outcome) = w.outcome() {
        let mut s = line(WorkloadState::Finished, Some(outcome), None);
        let notes = w.meta().annotations.as_ref();
        s.pool = notes.and_then(|n| n.get(super::job::ADMITTED_POOL)).cloned();
        s.nodes = distinct(notes.and_then(|n| n.get(super::job::ADMITTED_NODES)).map(|n| n.split(',')));
        return Some(sized(s));
    }
    if let Some(h) = holding(w) {
        let state = if w.all_running() { WorkloadState::Running } else { WorkloadState::Admitted };
        let nodes = distinct(Some(h.nodes.iter().map(String::as_str)));
        let on_borrowed = if h.borrowed { " on borrowed capacity" } else { "" };
        let message = format!("admitted to pool {}{on_borrowed} on nodes {}", h.pool, nodes.join(", "));
        let mut s = line(state, h.borrowed.then_some("Borrowed"), Some(message));
        s.pool = Some(h.pool);
        s.nodes = nodes;
        s.borrowed = h.borrowed;
        return Some(sized(s));
    }
    if !wants_admission(w) {
        let message = "started without the operator's admission (it was created unsuspended, before the \
                       chart's policy held it): it runs outside the grants; delete it and create it again";
        return Some(sized(line(WorkloadState::Invalid, Some("NotHeld"), Some(message.into()))));
    }
    let s = match decision {
        Some(Decision::Wait { position, why, message, .. }) => {
            let preempted = previous.filter(|p| p.state == WorkloadState::Preempted);
            let mut s = match (why, preempted) {
                (WaitReason::AllocationInactive, _) => {
                    line(WorkloadState::Suspended, Some(why.as_str()), Some(message.clone()))
                }
                (_, Some(p)) => WorkloadAdmissionStatus {
                    message: Some(message.clone()),
                    ..line(WorkloadState::Preempted, p.reason.as_deref(), None)
                },
                _ => line(WorkloadState::Queued, Some(why.as_str()), Some(message.clone())),
            };
            if s.state == WorkloadState::Preempted {
                s.preemption = preempted.and_then(|p| p.preemption.clone());
            }
            s.queue_position = Some(i32::try_from(*position).unwrap_or(i32::MAX));
            s
        }
        // Stopped by this cycle's write: held again.
        Some(Decision::Evict { reclaimed, message, .. }) => {
            let reason = if *reclaimed { "Reclaimed" } else { "Preempted" };
            WorkloadAdmissionStatus {
                preemption: Some(message.clone()),
                ..line(WorkloadState::Preempted, Some(reason), Some(message.clone()))
            }
        }
        Some(Decision::Stop { message }) => {
            line(WorkloadState::Suspended, Some(WaitReason::AllocationInactive.as_str()), Some(message.clone()))
        }
        // An admission not written (yet): as it was.
        Some(Decision::Admit { .. }) | None => match previous {
            Some(p) => return Some(p.clone()),
            None => line(WorkloadState::Queued, None, None),
        },
    };
    Some(sized(s))
}

fn line(state: WorkloadState, reason: Option<&str>, message: Option<String>) -> WorkloadAdmissionStatus {
    WorkloadAdmissionStatus { state, reason: reason.map(String::from), message, ..Default::default() }
}

/// Each node once, sorted.
fn distinct<'a>(nodes: Option<impl Iterator<Item = &'a str>>) -> Vec<String> {
    let mut out: Vec<String> = nodes.into_iter().flatten().filter(|n| !n.is_empty()).map(String::from).collect();
    out.sort();
    out.dedup();
    out
}

/// The name of a workload's line: `job-NAME` or `jobset-NAME`, so that a Job
/// and a JobSet of one name never share it; cut and suffixed with a hash of
/// the workload's name when longer than an object name may be.
pub fn name(kind: GangKind, workload: &str) -> String {
    let prefix = match kind {
        GangKind::JobSet => "jobset-",
        GangKind::Job | GangKind::ModelProject => "job-",
    };
    format!("{prefix}{}", fit(workload, MAX_NAME - prefix.len()))
}

/// `value` if it has at most `max` characters, else its head and a hash of
/// the whole (a name or label value stays one: it ends with a letter or digit).
fn fit(value: &str, max: usize) -> String {
    if value.len() <= max {
        return value.to_string();
    }
    let mut h = fnv::FnvHasher::default();
    h.write(value.as_bytes());
    let hash = format!("{:016x}", h.finish());
    let head = value[..max - hash.len() - 1].trim_end_matches(['-', '.', '_']);
    format!("{head}-{hash}")
}

/// The labels of a workload's line: `sovereign.ai/job` or `sovereign.ai/jobset`
/// (the workload's name, as on its pods) and the operator's managed-by.
pub fn labels(kind: GangKind, workload: &str) -> BTreeMap<String, String> {
    let key = if kind == GangKind::JobSet { JOBSET_LABEL } else { JOB_LABEL };
    BTreeMap::from([
        (key.to_string(), fit(workload, MAX_LABEL_VALUE)),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
    ])
}

/// The line's object, without status: name, labels, the workload as its
/// owner (not its controller: garbage collected with it) and the spec.
/// None without the label or the workload's uid.
pub fn object<W: Workload>(w: &W) -> Option<WorkloadAdmission> {
    let allocation = w.labels().get(ALLOCATION_LABEL)?.clone();
    let owner = w.owner_ref(&())?;
    let workload = w.name_any();
    let kind = match W::GANG {
        GangKind::JobSet => WorkloadRefKind::JobSet,
        GangKind::Job | GangKind::ModelProject => WorkloadRefKind::Job,
    };
    Some(WorkloadAdmission {
        metadata: ObjectMeta {
            name: Some(name(W::GANG, &workload)),
            namespace: w.namespace(),
            labels: Some(labels(W::GANG, &workload)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: WorkloadAdmissionSpec { workload: WorkloadRef { kind, name: workload }, allocation },
        status: None,
    })
}

#[cfg(test)]
mod tests;
