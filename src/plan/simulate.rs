//! Plays the operator's reconciles on the cluster in memory until nothing
//! changes: allocation statuses, node reservations, admissions, preemptions
//! and stops, each as the controllers write them, decided by [`decide`].

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::adapter::{Decision, Settings, decide};

fn key(p: &ModelProject) -> String {
    admission::project::key(p).to_string()
}
use super::{
    AllocationPlan, Cluster, DomesticShare, Fate, NodeChange, Plan, PoolRow, ProjectPlan, Proposal, QuotaChange,
};
use crate::admission::job::{self, Workload};
use crate::admission::{self, Decision as GangDecision, GangKey, GangKind};
use crate::api::{ModelProject, ProjectPhase, find_condition, holds_devices};
use crate::snapshot::{JOB_LABEL, JOBSET_LABEL, PROJECT_LABEL, RESERVED_FOR};

/// Enough rounds for: activate, reserve, admit, preempt, admit the preemptor.
const MAX_ROUNDS: usize = 10;

/// What happened to a project during the simulation.
#[derive(Clone, Debug)]
struct Event {
    fate: Fate,
    reason: Option<String>,
    preempts: Vec<String>,
}

/// The plan of `proposals` on `live` at `now`.
pub fn plan(live: &Cluster, proposals: &[Proposal], now: Timestamp, settings: &Settings) -> anyhow::Result<Plan> {
    let changes = proposals.iter().map(|p| p.describe(live)).collect();
    let mut c = live.clone();
    for p in proposals {
        p.apply(&mut c, now);
    }
    let mut events: BTreeMap<String, Event> = BTreeMap::new();
    let mut admitted_devices: BTreeMap<String, i64> = BTreeMap::new();
    let mut last = decide(&c, now, settings);
    for _ in 0..MAX_ROUNDS {
        if !step(&mut c, &last, now, &mut events, &mut admitted_devices) {
            break;
        }
        last = decide(&c, now, settings);
    }

    let allocations = c
        .allocations
        .iter()
        .filter_map(|a| {
            let name = a.name_any();
            let planned = last.allocations.get(&name)?;
            let now_status = live.allocations.iter().find(|l| l.name_any() == name).and_then(|l| l.status.clone());
            let ready = find_condition(&planned.conditions, "Ready");
            Some(AllocationPlan {
                phase_now: now_status.as_ref().and_then(|s| s.phase).map(|p| format!("{p:?}")),
                phase: format!("{:?}", planned.phase.unwrap_or_default()),
                granted_now: now_status.map(|s| s.granted).unwrap_or(0),
                granted: planned.granted,
                reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
                message: ready.map(|c| c.message.clone()).unwrap_or_default(),
                name,
            })
        })
        .collect();

    let pools_before: Vec<PoolRow> = live
        .pools
        .iter()
        .map(|p| {
            let s = p.status.clone().unwrap_or_default();
            PoolRow {
                pool: p.name_any(),
                domestic: p.spec.domestic,
                allocatable: s.allocatable,
                granted: s.granted,
                reserved: s.reserved,
                in_use: s.in_use,
            }
        })
        .collect();
    let pools_after: Vec<PoolRow> = last
        .pools
        .iter()
        .map(|(name, p)| PoolRow {
            pool: name.clone(),
            domestic: p.domestic,
            allocatable: p.allocatable,
            granted: p.granted,
            reserved: p.reserved,
            // Pods of newly admitted gangs do not exist yet: count what they request.
            in_use: p.in_use + admitted_devices.get(name).copied().unwrap_or(0),
        })
        .collect();

    Ok(Plan {
        at: now.round(k8s_openapi::jiff::Unit::Second).unwrap_or(now).to_string(),
        changes,
        allocations,
        quotas: quota_changes(live, &last),
        nodes: node_changes(live, &last),
        projects: project_plans(live, &c, &last, &events),
        domestic_before: DomesticShare::of(&pools_before),
        domestic_after: DomesticShare::of(&pools_after),
        pools_before,
        pools_after,
    })
}

/// Plays the reconciles on `c` until it settles (what applying for real does).
#[cfg(test)]
pub(super) fn settle(c: &mut Cluster, now: Timestamp, settings: &Settings) {
    let (mut events, mut devices) = (BTreeMap::new(), BTreeMap::new());
    for _ in 0..MAX_ROUNDS {
        let d = decide(c, now, settings);
        if !step(c, &d, now, &mut events, &mut devices) {
            break;
        }
    }
}

/// Writes one decision into the cluster as the reconcilers would; false when
/// it changes nothing (the operator has settled).
fn step(
    c: &mut Cluster,
    d: &Decision,
    now: Timestamp,
    events: &mut BTreeMap<String, Event>,
    admitted_devices: &mut BTreeMap<String, i64>,
) -> bool {
    let mut changed = false;
    for a in c.allocations.iter_mut() {
        let Some(planned) = d.allocations.get(&a.name_any()) else { continue };
        let old = a.status.clone().unwrap_or_default();
        if old.phase != planned.phase || old.granted != planned.granted || old.pools != planned.pools {
            a.status = Some(planned.clone());
            changed = true;
        }
    }
    for n in c.nodes.iter_mut() {
        let want = d.reserved.get(&n.name_any());
        let labels = n.metadata.labels.get_or_insert_with(Default::default);
        if labels.get(RESERVED_FOR) != want {
            match want {
                Some(a) => labels.insert(RESERVED_FOR.to_string(), a.clone()),
                None => labels.remove(RESERVED_FOR),
            };
            changed = true;
        }
    }
    // The decisions as the admission loop writes them: victims and stopped
    // runs give their devices back, admitted gangs take theirs.
    for (k, decision) in &d.gangs.gangs {
        let key = k.to_string();
        match decision {
            GangDecision::Evict { by, reclaimed, message, .. } => {
                let fate = if *reclaimed { Fate::Reclaimed } else { Fate::Preempted };
                let event = Event { fate, reason: Some(message.clone()), preempts: vec![] };
                changed |= stop(c, k, event, events, admitted_devices);
                events
                    .entry(by.to_string())
                    .or_insert(Event { fate: Fate::Waiting, reason: None, preempts: vec![] })
                    .preempts
                    .push(key);
            }
            GangDecision::Stop { message } => {
                let event = Event { fate: Fate::Stopped, reason: Some(message.clone()), preempts: vec![] };
                changed |= stop(c, k, event, events, admitted_devices);
            }
            GangDecision::Admit { pool, nodes, borrowed, protected_until } => {
                let devices = match k.kind {
                    GangKind::ModelProject => {
                        let Some(p) = c.projects.iter_mut().find(|p| admission::project::key(p) == *k) else {
                            continue;
                        };
                        let s = p.status.get_or_insert_with(Default::default);
                        s.phase = Some(ProjectPhase::Admitted);
                        s.pool = Some(pool.clone());
                        s.nodes = nodes.clone();
                        s.admitted_at = Some(Time(now));
                        s.borrowed = *borrowed;
                        s.protected_until = protected_until.map(Time);
                        p.spec.workers as i64 * p.spec.accelerators_per_worker as i64
                    }
                    GangKind::Job => {
                        let Some(d) = admit(&mut c.jobs, k, pool, nodes, *borrowed, now) else { continue };
                        d
                    }
                    GangKind::JobSet => {
                        let Some(d) = admit(&mut c.jobsets, k, pool, nodes, *borrowed, now) else { continue };
                        d
                    }
                };
                let e = events.entry(key).or_insert(Event { fate: Fate::Admitted, reason: None, preempts: vec![] });
                e.fate = Fate::Admitted;
                *admitted_devices.entry(pool.clone()).or_default() += devices;
                changed = true;
            }
            GangDecision::Wait { .. } => {}
        }
    }
    changed
}

/// Admits a Job or JobSet in memory: started, its admission annotated; the
/// devices of its gang.
fn admit<W: Workload>(
    list: &mut [W],
    k: &GangKey,
    pool: &str,
    nodes: &[String],
    borrowed: bool,
    now: Timestamp,
) -> Option<i64> {
    let w = list.iter_mut().find(|w| job::key(*w) == *k)?;
    let shape = w.read().ok()??;
    job::play(w, Some((pool, nodes, borrowed, now)));
    Some(i64::from(shape.workers()) * shape.per_worker())
}

/// Stops a gang: back to the queue, its pods gone.
fn stop(
    c: &mut Cluster,
    k: &GangKey,
    event: Event,
    events: &mut BTreeMap<String, Event>,
    admitted_devices: &mut BTreeMap<String, i64>,
) -> bool {
    let key = k.to_string();
    // A gang admitted earlier in the simulation gives back what it was counted for.
    let admitted_here = events.get(&key).is_some_and(|e| e.fate == Fate::Admitted);
    let (label, pool, devices) = match k.kind {
        GangKind::ModelProject => {
            let Some(p) = c.projects.iter_mut().find(|p| admission::project::key(p) == *k) else { return false };
            let s = p.status.get_or_insert_with(Default::default);
            if !holds_devices(s.phase) {
                return false;
            }
            let held = (s.pool.take(), p.spec.workers as i64 * p.spec.accelerators_per_worker as i64);
            s.phase = Some(ProjectPhase::Queued);
            s.nodes.clear();
            (PROJECT_LABEL, held.0, held.1)
        }
        GangKind::Job => match suspend(&mut c.jobs, k) {
            Some((pool, devices)) => (JOB_LABEL, Some(pool), devices),
            None => return false,
        },
        GangKind::JobSet => match suspend(&mut c.jobsets, k) {
            Some((pool, devices)) => (JOBSET_LABEL, Some(pool), devices),
            None => return false,
        },
    };
    if admitted_here && let Some(pool) = pool {
        *admitted_devices.entry(pool).or_default() -= devices;
    }
    let mine = |pod: &k8s_openapi::api::core::v1::Pod| {
        pod.namespace().as_deref() == Some(k.namespace.as_str()) && pod.labels().get(label) == Some(&k.name)
    };
    c.pods.retain(|pod| !mine(pod));
    c.workers.retain(|pod| !mine(pod));
    events.insert(key, event);
    true
}

/// Suspends a Job or JobSet that holds devices, in memory: its pool and devices.
fn suspend<W: Workload>(list: &mut [W], k: &GangKey) -> Option<(String, i64)> {
    let w = list.iter_mut().find(|w| job::key(*w) == *k)?;
    let held = job::holding(w)?;
    let devices = w.read().ok().flatten().map(|g| i64::from(g.workers()) * g.per_worker()).unwrap_or(0);
    job::play(w, None);
    Some((held.pool, devices))
}

fn quota_changes(live: &Cluster, d: &Decision) -> Vec<QuotaChange> {
    let mut now: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for q in &live.quotas {
        let hard = q.spec.as_ref().and_then(|s| s.hard.clone()).unwrap_or_default();
        let limits = now.entry(q.namespace().unwrap_or_default()).or_default();
        for (r, v) in hard {
            if let (Some(r), Some(v)) = (r.strip_prefix("requests."), crate::snapshot::whole_quantity(&v)) {
                limits.insert(r.to_string(), v);
            }
        }
    }
    let namespaces: BTreeSet<&String> = now.keys().chain(d.quotas.keys()).collect();
    let mut out = Vec::new();
    for ns in namespaces {
        let (a, b) = (now.get(ns), d.quotas.get(ns));
        let resources: BTreeSet<&String> =
            a.into_iter().flat_map(|m| m.keys()).chain(b.into_iter().flat_map(|m| m.keys())).collect();
        for r in resources {
            let (was, will) = (a.and_then(|m| m.get(r)).copied(), b.and_then(|m| m.get(r)).copied());
            if was != will {
                out.push(QuotaChange { namespace: ns.clone(), resource: r.clone(), now: was, planned: will });
            }
        }
    }
    out
}

fn node_changes(live: &Cluster, d: &Decision) -> Vec<NodeChange> {
    let mut out: Vec<NodeChange> = live
        .nodes
        .iter()
        .filter_map(|n| {
            let name = n.name_any();
            let was = n.labels().get(RESERVED_FOR).cloned();
            let will = d.reserved.get(&name).cloned();
            (was != will).then_some(NodeChange { node: name, reserved_now: was, reserved: will })
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// What happens to a gang: its fate, and why in the operator's words.
fn fate_of(event: Option<&Event>, waiting: Option<String>, holds_now: bool) -> (Fate, Option<String>) {
    let fate = match (event, &waiting) {
        (Some(e), _) if e.fate != Fate::Waiting => e.fate.clone(),
        (_, Some(_)) => Fate::Waiting,
        _ if holds_now => Fate::Running,
        _ => Fate::Idle,
    };
    let reason = match fate {
        Fate::Waiting => waiting,
        Fate::Preempted | Fate::Reclaimed | Fate::Stopped => {
            // Stopped, then perhaps waiting again: say both.
            let stopped = event.and_then(|e| e.reason.clone()).unwrap_or_default();
            Some(match waiting {
                Some(w) => format!("{stopped}; then waits: {w}"),
                None => stopped,
            })
        }
        _ => None,
    };
    (fate, reason)
}

fn waiting(d: &Decision, k: &GangKey) -> Option<String> {
    match d.gangs.get(k) {
        Some(GangDecision::Wait { message, .. }) => Some(message.clone()),
        _ => None,
    }
}

fn project_plans(live: &Cluster, c: &Cluster, d: &Decision, events: &BTreeMap<String, Event>) -> Vec<ProjectPlan> {
    let phase_now = |p: &ModelProject| {
        live.projects.iter().find(|l| key(l) == key(p)).and_then(|l| l.status.as_ref()?.phase).map(|p| format!("{p:?}"))
    };
    let mut out: Vec<ProjectPlan> = c
        .projects
        .iter()
        .map(|p| {
            let k = key(p);
            let s = p.status.clone().unwrap_or_default();
            let event = events.get(&k);
            let (fate, reason) = fate_of(event, waiting(d, &admission::project::key(p)), holds_devices(s.phase));
            let holds = matches!(fate, Fate::Admitted | Fate::Running);
            ProjectPlan {
                project: k,
                allocation: p.spec.allocation.clone(),
                phase_now: phase_now(p),
                pool: if holds { s.pool.clone() } else { None },
                nodes: if holds { s.nodes.clone() } else { vec![] },
                borrowed: holds && s.borrowed,
                preempts: event.map(|e| e.preempts.clone()).unwrap_or_default(),
                reason,
                fate,
            }
        })
        .collect();
    out.extend(workload_plans(&live.jobs, &c.jobs, d, events));
    out.extend(workload_plans(&live.jobsets, &c.jobsets, d, events));
    out.sort_by(|a, b| a.project.cmp(&b.project));
    out
}

/// The labelled Jobs or JobSets of `c`, as rows beside the projects ("Job
/// namespace/name"): `Running` when admitted, `Queued` when held, as now.
fn workload_plans<W: Workload>(
    live: &[W],
    c: &[W],
    d: &Decision,
    events: &BTreeMap<String, Event>,
) -> Vec<ProjectPlan> {
    let state = |w: &W| {
        if job::holding(w).is_some() {
            Some("Running".to_string())
        } else {
            job::wants_admission(w).then(|| "Queued".to_string())
        }
    };
    c.iter()
        .filter_map(|w| {
            let shape = w.read().ok()??;
            let k = job::key(w);
            let event = events.get(&k.to_string());
            let held = job::holding(w);
            let (fate, reason) = fate_of(event, waiting(d, &k), held.is_some());
            let held = held.filter(|_| matches!(fate, Fate::Admitted | Fate::Running));
            Some(ProjectPlan {
                project: k.to_string(),
                allocation: shape.allocation,
                phase_now: live.iter().find(|l| job::key(*l) == k).and_then(state),
                pool: held.as_ref().map(|h| h.pool.clone()),
                nodes: held.as_ref().map(|h| h.nodes.clone()).unwrap_or_default(),
                borrowed: held.is_some_and(|h| h.borrowed),
                preempts: event.map(|e| e.preempts.clone()).unwrap_or_default(),
                reason,
                fate,
            })
        })
        .collect()
}
