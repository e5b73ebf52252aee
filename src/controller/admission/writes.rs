//! What a cycle writes, from its decisions: pure, so the ordering rules
//! (preemptor before its victims, admissions before waiting reasons, waiting
//! reasons bounded and throttled) are unit-tested without a cluster.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use crate::admission::project::{self, StatusChange};
use crate::admission::{Decision, Decisions, GangKey, WaitReason};
use crate::api::{ModelProject, find_condition};

/// One write decided by a cycle.
#[derive(Clone, Debug)]
pub struct Write {
    pub key: GangKey,
    /// What was decided, for the log: admit, wait, preempt, stop.
    pub kind: &'static str,
    pub project: Arc<ModelProject>,
    pub change: StatusChange,
    /// An admission: how long it waited since creation (the wait histogram).
    pub admission_wait: Option<f64>,
    /// A victim: written only once its preemptor has recorded it.
    pub preemptor: Option<GangKey>,
}

/// A cycle's writes, in the order they go out.
#[derive(Debug, Default)]
pub struct Writes {
    /// Gangs that chose victims: they record them first.
    pub preemptors: Vec<Write>,
    /// Admissions, stops and evictions.
    pub urgent: Vec<Write>,
    /// Other waiting reasons (positions, numbers).
    pub waiting: Vec<Write>,
    /// Preemptors whose status already lists exactly their victims.
    pub ready: HashSet<GangKey>,
}

/// The writes that `decisions` ask of `projects` (those not being deleted
/// and, for waiting ones, valid).
pub fn plan(
    projects: &[Arc<ModelProject>],
    decisions: &Decisions,
    now: Timestamp,
    valid: &dyn Fn(&ModelProject) -> bool,
) -> Writes {
    let mut w = Writes::default();
    for p in projects {
        if p.metadata.deletion_timestamp.is_some() || !valid(p) {
            continue;
        }
        let key = project::key(p);
        let Some(d) = decisions.get(&key) else { continue };
        if let Decision::Wait { victims, .. } = d
            && !victims.is_empty()
        {
            let listed: Vec<String> = victims.iter().map(ToString::to_string).collect();
            if p.status.as_ref().is_some_and(|s| s.preempted == listed) {
                w.ready.insert(key.clone());
            }
        }
        let Some(change) = project::status(p, d, now) else { continue };
        let (kind, preemptor, admission_wait) = match d {
            Decision::Admit { .. } => {
                let waited = p.metadata.creation_timestamp.as_ref().map(|c| now.duration_since(c.0).as_secs_f64());
                ("admit", None, Some(waited.unwrap_or(0.0)))
            }
            Decision::Wait { .. } => ("wait", None, None),
            Decision::Stop { .. } => ("stop", None, None),
            Decision::Evict { by, .. } => ("preempt", Some(by.clone()), None),
        };
        let write = Write { key, kind, project: p.clone(), change, admission_wait, preemptor };
        match d {
            Decision::Wait { why: WaitReason::Preempting, .. } => w.preemptors.push(write),
            Decision::Wait { .. } => w.waiting.push(write),
            _ => w.urgent.push(write),
        }
    }
    w
}

/// Waiting reasons: never-written ones first, each rewritten at most every
/// `refresh` unless its reason changed, at most `limit` per cycle. Notes the
/// ones kept in `written`; true when some were left for the next cycle.
pub fn throttle(
    waiting: &mut Vec<Write>,
    written: &mut HashMap<GangKey, Instant>,
    keys: &HashSet<GangKey>,
    refresh: Duration,
    limit: usize,
) -> bool {
    written.retain(|k, _| keys.contains(k));
    waiting.retain(|w| {
        let old = w.project.status.as_ref();
        let reason = |c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            find_condition(c, "Queued").map(|c| c.reason.clone())
        };
        let same_reason = old.and_then(|s| reason(&s.conditions)) == reason(&w.change.status.conditions);
        let recent = written.get(&w.key).is_some_and(|t| t.elapsed() < refresh);
        !(same_reason && recent && old.is_some())
    });
    waiting.sort_by_key(|w| w.project.status.is_some());
    let cut = waiting.len() > limit;
    waiting.truncate(limit);
    let at = Instant::now();
    for w in waiting.iter() {
        written.insert(w.key.clone(), at);
    }
    cut
}
