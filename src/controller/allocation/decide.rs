//! What a GpuAllocation's status should say, from its grant plan, the pods
//! charged to it and its last status. Pure: no client, so the status, the
//! ledger, the Events and the writes are table-tested (`tests.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::{
    AllocationPhase, DomesticShare, GpuAllocation, GpuAllocationStatus, GrantMode, PoolGrantStatus, PoolHours,
    ProjectHours, ProjectUsage, SettledCharge, UsageLedger, condition, find_condition, set_condition,
};
use crate::events::Note;
use crate::planner::grants::{AllocationPlan, Blocker, Phase};
use crate::planner::ledger::{self, Books, MILLIS_PER_HOUR, PodLife, Workload};
use crate::planner::preemption;
use crate::planner::usage::{self, AllocationUse};
use crate::snapshot::TENANT_LABEL;

/// The ledger is written at least this often while pods run (and whenever a
/// pod starts, ends or is settled).
pub const USAGE_INTERVAL: Duration = Duration::from_secs(60);
/// A running project's usage in its own status is refreshed this often (and
/// when the run stops or ends).
pub const PROJECT_USAGE_INTERVAL: Duration = Duration::from_secs(300);

/// What the reconcile read.
pub struct Observed<'a> {
    pub now: Timestamp,
    pub plan: &'a AllocationPlan,
    /// Devices in use now, by pool (from the cluster view).
    pub usage: &'a AllocationUse,
    /// Tenant namespaces that do not exist.
    pub missing_namespaces: Vec<String>,
    /// Tenant namespaces without the tenant label.
    pub not_tenant: Vec<String>,
    /// The pods charged to the allocation now (running, finished or deleted
    /// but still present).
    pub pods: &'a [PodLife],
    /// When the operator's watches started, and when they saw pods go that
    /// are no longer in the stores, in ms (see [`ledger::reckon`]).
    pub watching_since: Timestamp,
    pub seen_gone: &'a dyn Fn(&str) -> Option<i64>,
    /// The ModelProjects of the allocation ("namespace/name") and the usage
    /// their status shows.
    pub projects: &'a BTreeMap<String, Option<ProjectUsage>>,
    /// Its other workloads that exist (labelled batch Jobs, JobSets). A
    /// workload with a pod in `pods` exists too.
    pub workloads: &'a BTreeSet<Workload>,
    /// A deleted pod waits for its containers to stop: look again then.
    pub settle_due: Option<Timestamp>,
    /// A dry run (`plan`): the books stay as they are, and these hours count
    /// as used now. None reckons the ledger.
    pub keep_books: Option<f64>,
}

/// The decision: the status to write, then what to do after it is written.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: GpuAllocationStatus,
    /// Exactly these nodes carry the reservation.
    pub reserve: BTreeSet<String>,
    /// UIDs of pods whose ledger finalizer goes once the status is written.
    pub release: Vec<String>,
    /// ModelProjects ("namespace/name") whose usage to write.
    pub project_usage: Vec<(String, ProjectUsage)>,
    /// Charge-weighted accelerator-seconds by pool at `now` (the counter).
    pub seconds_by_pool: BTreeMap<String, f64>,
    /// The same by kind of workload ("Pod": tenants' own pods), when the
    /// ledger was reckoned.
    pub seconds_by_kind: BTreeMap<String, f64>,
    /// Accelerator-hours used at `now`, exactly.
    pub hours_now: f64,
    pub events: Vec<Note>,
    pub requeue: Duration,
}

pub fn decide(alloc: &GpuAllocation, obs: &Observed<'_>) -> Decision {
    let old = alloc.status.clone().unwrap_or_default();
    let plan = obs.plan;
    let generation = alloc.metadata.generation;
    let now = Time(obs.now);
    let now_ms = obs.now.as_millisecond();
    let active = plan.phase == Phase::Active;
    let phase = match plan.phase {
        Phase::Pending => AllocationPhase::Pending,
        Phase::Active => AllocationPhase::Active,
        Phase::Exhausted => AllocationPhase::Exhausted,
        Phase::Expired => AllocationPhase::Expired,
    };
    let mut s =
        GpuAllocationStatus { conditions: old.conditions.clone(), observed_generation: generation, ..old.clone() };
    s.phase = Some(phase);
    s.granted = plan.pools.values().map(|p| p.granted).sum();
    s.in_use = obs.usage.devices();
    s.pools = alloc
        .spec
        .grants
        .iter()
        .map(|g| {
            let p = plan.pools.get(&g.pool).cloned().unwrap_or_default();
            let in_use = obs.usage.in_use.get(&g.pool).copied().unwrap_or(0);
            PoolGrantStatus {
                pool: g.pool.clone(),
                mode: g.mode,
                granted: p.granted,
                reserved_nodes: p.reserved_nodes,
                in_use,
                borrowed: (in_use - p.granted).max(0),
            }
        })
        .collect();

    // The fair-share order of idle capacity, over the grant as written (a
    // Pending grant has none in force yet).
    let used: BTreeMap<String, i64> = s.pools.iter().map(|p| (p.pool.clone(), p.in_use)).collect();
    let granted: BTreeMap<String, i64> = alloc.spec.grants.iter().map(|g| (g.pool.clone(), g.accelerators)).collect();
    s.dominant_share = Some(round(preemption::dominant_share(&used, &granted)));

    // The ledger: reckoned now; written when a pod started, ended or was
    // settled, the phase changed, or USAGE_INTERVAL passed while pods run.
    // Otherwise the last books stay, so an unchanged cluster writes nothing.
    let prev = old.ledger.clone().unwrap_or_else(|| carried_over(&old, obs.pods));
    let reckon = obs.keep_books.is_none();
    let books = if reckon {
        let with_pods: BTreeSet<&Workload> = obs.pods.iter().filter_map(|p| p.workload.as_ref()).collect();
        let exists = |w: &Workload| {
            with_pods.contains(w)
                || obs.workloads.contains(w)
                || (w.kind == ledger::MODEL_PROJECT && obs.projects.contains_key(&w.name))
        };
        ledger::reckon(&prev, obs.pods, now_ms, obs.watching_since.as_millisecond(), obs.seen_gone, &exists)
    } else {
        Books { ledger: prev.clone(), ..Default::default() }
    };
    let f = &books.figures;
    let hours_now = obs.keep_books.unwrap_or(f.total / MILLIS_PER_HOUR);
    let age = Duration::from_millis((now_ms - prev.at_millis).max(0) as u64);
    let busy = f.rate > 0.0 || old.charge_rate > 0.0;
    // Crossing 80% or 100% of the budget is written at once: the grant plan
    // reads the written figure.
    let crossed = alloc.spec.budget.as_ref().is_some_and(|b| {
        let budget = b.accelerator_hours as f64;
        [0.8 * budget, budget].iter().any(|&mark| (old.accelerator_hours_used >= mark) != (hours_now >= mark))
    });
    let write = reckon
        && (old.ledger.is_none() && (f.total > 0.0 || !books.ledger.open.is_empty())
            || ledger::moved(&prev, &books.ledger)
            || old.phase != s.phase
            || f.rate != old.charge_rate
            || crossed
            || (busy && age >= USAGE_INTERVAL));
    let mut release = Vec::new();
    if write {
        s.accelerator_hours_used = round(hours_now);
        s.domestic_accelerator_hours_used = round(f.domestic / MILLIS_PER_HOUR);
        s.charge_rate = f.rate;
        s.domestic_charge_rate = f.domestic_rate;
        // As the API stores it (whole seconds), so that it compares equal after
        // the round trip; `ledger.atMillis` is the exact time.
        s.usage_updated_at = Timestamp::from_second(obs.now.as_second()).ok().map(Time);
        s.pool_hours = f
            .by_pool
            .iter()
            .map(|(pool, m)| PoolHours { pool: pool.clone(), accelerator_hours_used: round(m / MILLIS_PER_HOUR) })
            .collect();
        s.project_hours = f
            .by_workload
            .iter()
            .map(|((workload, pool), m)| ProjectHours {
                project: workload.name.clone(),
                kind: workload.stored_kind(),
                pool: pool.clone(),
                accelerator_hours_used: round(m / MILLIS_PER_HOUR),
            })
            .collect();
        s.ledger = Some(books.ledger.clone());
    }
    if reckon {
        // A newly settled pod moves the books, so it is released only after
        // they are written; a pod settled earlier whose release failed is
        // released again, books written or not.
        release = books.release.clone();
    }
    let frac = |d: f64, t: f64| (t > 0.0).then(|| round(d / t));
    s.domestic_share = Some(DomesticShare {
        granted: plan.domestic_granted_share.map(round),
        in_use: frac(obs.usage.domestic_devices as f64, obs.usage.devices() as f64),
        hours: frac(s.domestic_accelerator_hours_used, s.accelerator_hours_used),
    });

    // On the written figure, so that the message changes with the books only
    // (a crossing of 80% or 100% is written at once).
    for c in conditions(alloc, obs, &s, s.accelerator_hours_used) {
        set_condition(&mut s.conditions, c, &now);
    }

    let mut project_usage = Vec::new();
    if write {
        for (name, shown) in obs.projects {
            let workload = Workload::project(name.clone());
            let pools = f.workload_pools(&workload);
            let rate = f.workload_rate.get(&workload).copied().unwrap_or(0.0);
            let hours: f64 = pools.values().sum();
            let next = ProjectUsage {
                accelerator_hours_used: round(hours),
                pools: pools
                    .iter()
                    .map(|(pool, h)| PoolHours { pool: pool.clone(), accelerator_hours_used: round(*h) })
                    .collect(),
                charge_rate: rate,
                at_millis: now_ms,
            };
            // Written when the run stops or ends, and every PROJECT_USAGE_INTERVAL
            // while it runs: never for a start, which would add a status write to
            // every admission.
            let interval = PROJECT_USAGE_INTERVAL.as_secs_f64() / 3600.0;
            let due = match shown {
                None if rate == 0.0 => hours > 0.0,
                None => hours >= rate * interval,
                Some(u) if rate == 0.0 => u.pools != next.pools || u.charge_rate != 0.0,
                Some(u) => Duration::from_millis((now_ms - u.at_millis).max(0) as u64) >= PROJECT_USAGE_INTERVAL,
            };
            if due {
                project_usage.push((name.clone(), next));
            }
        }
    }

    let reserve = if active {
        plan.pools.values().flat_map(|p| p.reserved_nodes.iter().cloned()).collect()
    } else {
        BTreeSet::new()
    };
    let mut requeue = next_wake(obs, alloc, hours_now, if reckon { f.rate } else { old.charge_rate });
    if let Some(t) = obs.settle_due {
        requeue = requeue.min(until(obs.now, t));
    }
    Decision {
        events: transitions(&old, &s, plan),
        status: s,
        reserve,
        release,
        project_usage,
        seconds_by_pool: f.by_pool.iter().map(|(p, m)| (p.clone(), m / 1000.0)).collect(),
        seconds_by_kind: f
            .by_kind
            .iter()
            .map(|(k, m)| (k.clone().unwrap_or_else(|| "Pod".to_string()), m / 1000.0))
            .collect(),
        hours_now,
        requeue,
    }
}

/// The books of a status written before the ledger existed: its hours
/// (integrated from a rate up to `usageUpdatedAt`) are carried over as settled,
/// less what the pods running now had used by then, which the ledger charges
/// from their own start.
fn carried_over(old: &GpuAllocationStatus, pods: &[PodLife]) -> UsageLedger {
    let Some(at) = old.usage_updated_at.as_ref().map(|t| t.0.as_millisecond()) else {
        return UsageLedger::default();
    };
    let running = |domestic: bool| -> f64 {
        pods.iter().filter(|p| p.domestic == domestic && !p.settle).map(|p| p.millis(at)).sum()
    };
    let domestic = old.domestic_accelerator_hours_used * MILLIS_PER_HOUR;
    let other = (old.accelerator_hours_used - old.domestic_accelerator_hours_used).max(0.0) * MILLIS_PER_HOUR;
    let settled = [(true, domestic - running(true)), (false, other - running(false))]
        .into_iter()
        .filter(|(_, m)| *m >= 1.0)
        .map(|(domestic, m)| SettledCharge {
            pool: BEFORE_THE_LEDGER.to_string(),
            project: None,
            kind: None,
            domestic,
            millis: m.round() as i64,
        })
        .collect();
    UsageLedger { at_millis: at, settled, ..Default::default() }
}

/// The pool name of hours charged before the ledger existed (by pool unknown).
pub const BEFORE_THE_LEDGER: &str = "(before the ledger)";

/// Six decimals: enough for hours, and stable so equal values compare equal.
fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::from_secs_f64(t.duration_since(now).as_secs_f64().max(0.0)) + Duration::from_millis(200)
}

fn conditions(alloc: &GpuAllocation, obs: &Observed<'_>, s: &GpuAllocationStatus, hours_now: f64) -> Vec<Condition> {
    let plan = obs.plan;
    let g = alloc.metadata.generation;
    let mut out = Vec::new();
    let active = plan.phase == Phase::Active;
    out.push(match (&plan.blocker, active) {
        (_, true) => condition("Ready", true, "Active", format!("grant in force: {} accelerators", s.granted), g),
        (Some(b), false) => condition("Ready", false, b.reason(), b.message(), g),
        (None, false) => condition("Ready", false, "Pending", "waiting for admission", g),
    });
    if let Some(w) = &alloc.spec.window {
        out.push(match &plan.blocker {
            Some(b @ Blocker::WindowNotOpen { .. }) | Some(b @ Blocker::WindowClosed { .. }) => {
                condition("WindowOpen", false, b.reason(), b.message(), g)
            }
            _ => condition(
                "WindowOpen",
                true,
                "InWindow",
                match &w.end {
                    Some(end) => format!("the window is open until {}", end.0),
                    None => "the window is open".to_string(),
                },
                g,
            ),
        });
    }
    match &plan.blocker {
        Some(b @ Blocker::Capacity { .. }) => {
            out.push(condition("CapacityAvailable", false, b.reason(), b.message(), g))
        }
        _ if active => out.push(condition("CapacityAvailable", true, "Granted", "every grant fits in its pool", g)),
        _ => {}
    }
    if let Some(budget) = &alloc.spec.budget {
        let total = budget.accelerator_hours as f64;
        let pct = hours_now / total * 100.0;
        let msg = format!("{hours_now:.1} of {total:.0} accelerator-hours used ({pct:.0}%)");
        out.push(if hours_now >= total {
            condition(
                "WithinBudget",
                false,
                "BudgetUsedUp",
                format!("{msg}: quota is zero until the budget is raised"),
                g,
            )
        } else if pct >= 80.0 {
            condition("WithinBudget", true, "BudgetAlmostUsed", msg, g)
        } else {
            condition("WithinBudget", true, "WithinBudget", msg, g)
        });
    }
    if let Some(min) = alloc.spec.min_domestic_share {
        out.push(match &plan.blocker {
            Some(b @ Blocker::DomesticShareShort { .. }) => {
                condition("DomesticShareMet", false, b.reason(), b.message(), g)
            }
            _ => condition(
                "DomesticShareMet",
                true,
                "DomesticShareMet",
                format!(
                    "{:.0}% of granted accelerators are domestic (minimum {:.0}%)",
                    plan.domestic_granted_share.unwrap_or(0.0) * 100.0,
                    min * 100.0
                ),
                g,
            ),
        });
    }
    if alloc.spec.grants.iter().any(|gr| gr.mode == GrantMode::Dedicated) && active {
        let short: Vec<&str> = plan.pools.iter().filter(|(_, p)| p.short_of_nodes).map(|(n, _)| n.as_str()).collect();
        let nodes: usize = plan.pools.values().map(|p| p.reserved_nodes.len()).sum();
        out.push(if short.is_empty() {
            condition("NodesReserved", true, "Reserved", format!("{nodes} node(s) reserved"), g)
        } else {
            condition(
                "NodesReserved",
                false,
                "NotEnoughFreeNodes",
                format!(
                    "{nodes} node(s) reserved; pool(s) {} have too few free Ready nodes for the dedicated grant",
                    short.join(", ")
                ),
                g,
            )
        });
    }
    out.push(quota_condition(alloc, &obs.missing_namespaces, &obs.not_tenant));
    out
}

/// QuotaApplied: whether each namespace exists and is a tenant namespace (its
/// quota is then kept by the quota reconciler).
fn quota_condition(alloc: &GpuAllocation, missing: &[String], untenanted: &[String]) -> Condition {
    let g = alloc.metadata.generation;
    if missing.is_empty() && !untenanted.is_empty() {
        condition(
            "QuotaApplied",
            false,
            "NamespaceNotTenant",
            format!(
                "namespace(s) {} lack the label {TENANT_LABEL}=true: the chart's admission policy lets the operator create quotas and worker pods only in labelled namespaces",
                untenanted.join(", ")
            ),
            g,
        )
    } else if missing.is_empty() {
        condition(
            "QuotaApplied",
            true,
            "QuotaManaged",
            format!(
                "ResourceQuota {} is managed in {} namespace(s)",
                super::super::quota::QUOTA_NAME,
                alloc.spec.tenant.namespaces.len()
            ),
            g,
        )
    } else {
        condition(
            "QuotaApplied",
            false,
            "NamespaceMissing",
            format!(
                "namespace(s) {} do not exist yet; their quota is applied when they are created",
                missing.join(", ")
            ),
            g,
        )
    }
}

/// The next moment the allocation changes by itself: window edges, the budget
/// running out, and the ledger's refresh while pods run.
fn next_wake(obs: &Observed<'_>, alloc: &GpuAllocation, hours_now: f64, rate: f64) -> Duration {
    // A safety net: the plan is cluster-wide, so look again at least every minute.
    let mut wake = Duration::from_secs(60);
    if let Some(t) = obs.plan.wake_at {
        wake = wake.min(until(obs.now, t));
    }
    if rate > 0.0 {
        wake = wake.min(USAGE_INTERVAL);
        if let Some(b) = &alloc.spec.budget
            && let Some(t) = usage::exhausted_at(b.accelerator_hours as f64, hours_now, obs.now, rate)
        {
            wake = wake.min(until(obs.now, t));
        }
    }
    wake
}

/// Events on phase and condition transitions only.
fn transitions(old: &GpuAllocationStatus, new: &GpuAllocationStatus, plan: &AllocationPlan) -> Vec<Note> {
    let mut out = Vec::new();
    let mut note = |warning: bool, reason: &'static str, message: String| out.push(Note::new(warning, reason, message));
    if old.phase != new.phase {
        match (new.phase, &plan.blocker) {
            (Some(AllocationPhase::Active), _) => {
                note(false, "Activated", format!("grant in force: {} accelerators", new.granted))
            }
            (Some(AllocationPhase::Expired), Some(b)) => note(false, "Expired", b.message()),
            (Some(AllocationPhase::Exhausted), Some(b)) => note(true, "BudgetUsedUp", b.message()),
            (_, Some(b)) => note(
                matches!(b.reason(), "InsufficientCapacity" | "PoolNotFound" | "DomesticShareNotMet"),
                b.reason(),
                b.message(),
            ),
            (_, None) => note(false, "Pending", "waiting for admission".to_string()),
        }
    } else if let (Some(b), Some(AllocationPhase::Pending)) = (&plan.blocker, new.phase) {
        // Still pending, for a new reason.
        let was = find_condition(&old.conditions, "Ready").map(|c| c.reason.clone());
        if was.as_deref() != Some(b.reason()) {
            note(b.reason() != "WindowNotOpen", b.reason(), b.message());
        }
    }
    let turned = |t: &str, reason: &str| {
        find_condition(&new.conditions, t)
            .filter(|c| c.reason == reason && find_condition(&old.conditions, t).is_none_or(|o| o.reason != reason))
            .map(|c| c.message.clone())
    };
    if let Some(m) = turned("WithinBudget", "BudgetAlmostUsed") {
        note(true, "BudgetAlmostUsed", m);
    }
    if let Some(m) = turned("NodesReserved", "NotEnoughFreeNodes") {
        note(true, "NotEnoughFreeNodes", m);
    }
    if let Some(m) = turned("QuotaApplied", "NamespaceNotTenant") {
        note(true, "NamespaceNotTenant", m);
    }
    let reserved = |s: &GpuAllocationStatus| -> BTreeSet<String> {
        s.pools.iter().flat_map(|p| p.reserved_nodes.iter().cloned()).collect()
    };
    let (before, after) = (reserved(old), reserved(new));
    let added: Vec<&String> = after.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&after).collect();
    if !added.is_empty() {
        let reason = if removed.is_empty() { "NodesReserved" } else { "NodesReplaced" };
        let mut m = format!("reserved {}", join(&added));
        if !removed.is_empty() {
            m.push_str(&format!("; released {}", join(&removed)));
        }
        note(false, reason, m);
    } else if !removed.is_empty() {
        note(false, "NodesReleased", format!("released {}", join(&removed)));
    }
    out
}

pub(super) fn join(names: &[&String]) -> String {
    names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}
