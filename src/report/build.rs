//! Inputs -> rows. Pure.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::{DOMESTIC_TARGET, Inputs, Report, Row, Section};
use crate::api::{GpuAllocation, ModelProject, ProjectPhase, find_condition};

/// One allocation: its row, and the waits behind the row's queue columns (so
/// that groups combine waits, not averages).
struct Facts<'a> {
    alloc: &'a GpuAllocation,
    row: Row,
    waits: Vec<i64>,
    admission_waits: Vec<f64>,
    /// Hours per class: (domestic, non-domestic).
    hours: (f64, f64),
}

/// Builds the report from the objects' status.
pub fn build(inputs: &Inputs) -> Report {
    let facts: Vec<Facts> = inputs.allocations.iter().map(|a| facts(a, inputs)).collect();
    let mut rows = vec![group(Section::Total, "all", facts.iter(), allocatable(inputs, |_| true))];
    for (class, domestic) in [("domestic", true), ("non-domestic", false)] {
        rows.push(class_row(inputs, &facts, class, domestic));
    }
    for (section, key) in [(Section::Program, program as fn(&GpuAllocation) -> String), (Section::Tenant, tenant)] {
        let mut groups: BTreeMap<String, Vec<&Facts>> = BTreeMap::new();
        for f in &facts {
            groups.entry(key(f.alloc)).or_default().push(f);
        }
        rows.extend(groups.into_iter().map(|(name, members)| group(section, &name, members.into_iter(), None)));
    }
    rows.extend(pool_rows(inputs, &facts));
    rows.extend(workload_rows(inputs));
    rows.extend(facts.into_iter().map(|f| f.row));
    Report { generated_at: inputs.now.to_string(), domestic_target: DOMESTIC_TARGET, rows }
}

fn program(a: &GpuAllocation) -> String {
    a.spec.program.clone().unwrap_or_else(|| "(none)".into())
}

fn tenant(a: &GpuAllocation) -> String {
    a.spec.tenant.display_name.clone()
}

/// A share, or none when the whole is zero.
fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| round(part / whole))
}

/// Six decimals, so equal inputs give equal (and readable) output.
fn round(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| round(v.iter().sum::<f64>() / v.len() as f64))
}

/// Allocatable devices of the pools that `which` keeps.
fn allocatable(inputs: &Inputs, which: impl Fn(bool) -> bool) -> Option<i64> {
    Some(
        inputs
            .pools
            .iter()
            .filter(|p| which(p.spec.domestic))
            .map(|p| p.status.as_ref().map(|s| s.allocatable).unwrap_or(0))
            .sum(),
    )
}

/// Waiting for admission: queued or restarting, not suspended.
fn waiting(p: &ModelProject) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase);
    !p.spec.run_policy.suspend
        && p.metadata.deletion_timestamp.is_none()
        && matches!(phase, None | Some(ProjectPhase::Queued | ProjectPhase::Restarting))
}

fn holding(p: &ModelProject) -> bool {
    matches!(p.status.as_ref().and_then(|s| s.phase), Some(ProjectPhase::Admitted | ProjectPhase::Running))
}

/// Seconds a waiting project has waited: since it was last queued (a preempted
/// run waits again from then), else since creation.
fn waited(p: &ModelProject, now: Timestamp) -> Option<i64> {
    let queued = p
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, "Queued"))
        .filter(|c| c.status == "True" && c.last_transition_time.0 > Timestamp::UNIX_EPOCH)
        .map(|c| c.last_transition_time.0);
    let since = queued.or_else(|| p.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    Some(now.duration_since(since).as_secs().max(0))
}

/// Seconds from creation to admission.
fn admission_wait(p: &ModelProject) -> Option<f64> {
    let created = p.metadata.creation_timestamp.as_ref()?.0;
    let admitted = p.status.as_ref()?.admitted_at.as_ref()?.0;
    Some(admitted.duration_since(created).as_secs_f64().max(0.0))
}

fn facts<'a>(alloc: &'a GpuAllocation, inputs: &Inputs) -> Facts<'a> {
    let s = alloc.status.clone().unwrap_or_default();
    let name = alloc.name_any();
    let mine: Vec<&ModelProject> = inputs.projects.iter().filter(|p| p.spec.allocation == name).collect();
    let waits: Vec<i64> = mine.iter().filter(|p| waiting(p)).filter_map(|p| waited(p, inputs.now)).collect();
    let admission_waits: Vec<f64> = mine.iter().filter(|p| holding(p)).filter_map(|p| admission_wait(p)).collect();
    let budget = alloc.spec.budget.as_ref().map(|b| b.accelerator_hours as f64);
    let row = Row {
        section: Some(Section::Allocation),
        name,
        accelerator_hours: s.accelerator_hours_used,
        domestic_accelerator_hours: Some(s.domestic_accelerator_hours_used),
        domestic_share: ratio(s.domestic_accelerator_hours_used, s.accelerator_hours_used),
        granted: s.granted,
        in_use: s.in_use,
        grant_used: ratio(s.in_use as f64, s.granted as f64),
        phase: Some(format!("{:?}", s.phase.unwrap_or_default())),
        budget_hours: budget,
        budget_left_hours: budget.map(|b| round((b - s.accelerator_hours_used).max(0.0))),
        queued: mine.iter().filter(|p| waiting(p)).count() as i64,
        running: mine.iter().filter(|p| holding(p)).count() as i64,
        longest_wait_seconds: waits.iter().copied().max(),
        mean_admission_wait_seconds: mean(&admission_waits),
        ..Default::default()
    };
    let domestic = s.domestic_accelerator_hours_used;
    Facts { alloc, row, waits, admission_waits, hours: (domestic, s.accelerator_hours_used - domestic) }
}

/// Sums allocations into one row of a section.
fn group<'a>(section: Section, name: &str, members: impl Iterator<Item = &'a Facts<'a>>, cap: Option<i64>) -> Row {
    let mut r = Row { section: Some(section), name: name.into(), allocatable: cap, ..Default::default() };
    let (mut domestic, mut waits, mut admissions) = (0.0, Vec::new(), Vec::new());
    for f in members {
        r.accelerator_hours += f.row.accelerator_hours;
        domestic += f.hours.0;
        r.granted += f.row.granted;
        r.in_use += f.row.in_use;
        r.queued += f.row.queued;
        r.running += f.row.running;
        waits.extend(&f.waits);
        admissions.extend(&f.admission_waits);
    }
    r.accelerator_hours = round(r.accelerator_hours);
    r.domestic_accelerator_hours = Some(round(domestic));
    r.domestic_share = ratio(domestic, r.accelerator_hours);
    r.grant_used = ratio(r.in_use as f64, r.granted as f64);
    r.longest_wait_seconds = waits.into_iter().max();
    r.mean_admission_wait_seconds = mean(&admissions);
    r
}

/// Domestic or non-domestic pools: hours, grants and use on them.
fn class_row(inputs: &Inputs, facts: &[Facts], class: &str, domestic: bool) -> Row {
    let is: BTreeMap<String, bool> = inputs.pools.iter().map(|p| (p.name_any(), p.spec.domestic)).collect();
    let mut r = Row {
        section: Some(Section::Class),
        name: class.into(),
        allocatable: allocatable(inputs, |d| d == domestic),
        ..Default::default()
    };
    for f in facts {
        r.accelerator_hours += if domestic { f.hours.0 } else { f.hours.1 };
        for g in f.alloc.status.iter().flat_map(|s| &s.pools) {
            if is.get(&g.pool).copied().unwrap_or(false) == domestic {
                r.granted += g.granted;
                r.in_use += g.in_use;
            }
        }
    }
    r.accelerator_hours = round(r.accelerator_hours);
    r.grant_used = ratio(r.in_use as f64, r.granted as f64);
    r
}

/// Workloads from the allocations' `projectHours` (exact, by the ledger): a
/// ModelProject, batch Job or JobSet, named "<kind> <namespace>/<name>".
fn workload_rows(inputs: &Inputs) -> Vec<Row> {
    let domestic: BTreeMap<String, bool> = inputs.pools.iter().map(|p| (p.name_any(), p.spec.domestic)).collect();
    let mut hours: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for h in inputs.allocations.iter().flat_map(|a| a.status.iter().flat_map(|s| &s.project_hours)) {
        let kind = h.kind.as_deref().unwrap_or("ModelProject");
        let e = hours.entry(format!("{kind} {}", h.project)).or_default();
        e.0 += h.accelerator_hours_used;
        if domestic.get(&h.pool).copied().unwrap_or(false) {
            e.1 += h.accelerator_hours_used;
        }
    }
    hours
        .into_iter()
        .map(|(name, (all, dom))| Row {
            section: Some(Section::Workload),
            name,
            accelerator_hours: round(all),
            domestic_accelerator_hours: Some(round(dom)),
            domestic_share: ratio(dom, all),
            ..Default::default()
        })
        .collect()
}

/// Pools from their status; hours are estimated: status keeps an allocation's
/// hours per class (domestic or not), so each class's hours are split over the
/// allocation's grants in that class by grant size (exact when an allocation
/// has one pool per class, as the examples do).
fn pool_rows(inputs: &Inputs, facts: &[Facts]) -> Vec<Row> {
    let is: BTreeMap<String, bool> = inputs.pools.iter().map(|p| (p.name_any(), p.spec.domestic)).collect();
    let mut hours: BTreeMap<String, f64> = BTreeMap::new();
    for f in facts {
        for domestic in [true, false] {
            let grants: Vec<(&str, i64)> = f
                .alloc
                .spec
                .grants
                .iter()
                .filter(|g| is.get(&g.pool).copied().unwrap_or(false) == domestic)
                .map(|g| (g.pool.as_str(), g.accelerators))
                .collect();
            let total: i64 = grants.iter().map(|g| g.1).sum();
            let class_hours = if domestic { f.hours.0 } else { f.hours.1 };
            for (pool, n) in grants {
                *hours.entry(pool.to_string()).or_default() += class_hours * n as f64 / total as f64;
            }
        }
    }
    let mut running: BTreeMap<String, i64> = BTreeMap::new();
    for p in inputs.projects.iter().filter(|p| holding(p)) {
        if let Some(pool) = p.status.as_ref().and_then(|s| s.pool.clone()) {
            *running.entry(pool).or_default() += 1;
        }
    }
    let mut rows: Vec<Row> = inputs
        .pools
        .iter()
        .map(|p| {
            let s = p.status.clone().unwrap_or_default();
            let name = p.name_any();
            let h = round(hours.get(&name).copied().unwrap_or(0.0));
            Row {
                section: Some(Section::Pool),
                accelerator_hours: h,
                domestic_accelerator_hours: Some(if p.spec.domestic { h } else { 0.0 }),
                hours_estimated: true,
                allocatable: Some(s.allocatable),
                granted: s.granted,
                reserved: Some(s.reserved),
                in_use: s.in_use,
                grant_used: ratio(s.in_use as f64, s.granted as f64),
                running: running.get(&name).copied().unwrap_or(0),
                name,
                ..Default::default()
            }
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}
