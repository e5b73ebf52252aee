//! GpuAllocation reconciler: phase and status from the grant plan, node
//! reservations for dedicated grants (with a finalizer, since labels and taints
//! on nodes are not garbage-collected), accelerator-hour accounting, and Events
//! on transitions. Quotas are the quota reconciler's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::context::requeue;
use super::quota::QUOTA_NAME;
use super::view::View;
use super::{Context, Error, nodes};
use crate::api::{
    AllocationPhase, DomesticShare, GpuAllocation, GpuAllocationStatus, GrantMode, PoolGrantStatus, condition,
    find_condition, set_condition,
};
use crate::planner::grants::{Blocker, Phase};
use crate::planner::preemption;
use crate::planner::usage::{self, AllocationUse};

const CONTROLLER: &str = "gpuallocation";
pub const FINALIZER: &str = "sovereign.ai/release-reservations";
/// Usage is written to status at least this often while pods run.
const USAGE_INTERVAL: Duration = Duration::from_secs(60);

pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let s = &ctx.stores;
    // Admission is cluster-wide: a change of nodes, pools or any allocation can
    // admit or block any allocation. A pod change only moves the usage of the
    // allocations that list its namespace.
    let everything = futures::stream::select_all([
        s.nodes.changes().boxed(),
        s.pools.changes().boxed(),
        s.allocations.changes().boxed(),
    ]);
    let allocations = s.allocations.store.clone();
    let pod_allocations = s.pods.events().flat_map(move |pod| {
        let ns = pod.namespace().unwrap_or_default();
        let hits: Vec<ObjectRef<GpuAllocation>> = allocations
            .state()
            .iter()
            .filter(|a| a.spec.tenant.namespaces.contains(&ns))
            .map(|a| ObjectRef::from_obj(a.as_ref()))
            .collect();
        futures::stream::iter(hits)
    });
    let controller = Controller::for_shared_stream(s.allocations.events(), s.allocations.store.clone())
        .reconcile_all_on(futures::stream::once(async {}).chain(everything))
        .reconcile_on(pod_allocations)
        .with_config(super::controller_config(Duration::from_millis(300)));
    super::drive(controller, CONTROLLER, ctx.clone(), shutdown, reconcile).await;
}

async fn reconcile(alloc: Arc<GpuAllocation>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<GpuAllocation> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, alloc, |event| async {
        match event {
            Finalizer::Apply(a) => apply(&a, &ctx).await,
            Finalizer::Cleanup(a) => cleanup(&a, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Releases every node labelled for the allocation; quotas follow by themselves.
async fn cleanup(alloc: &GpuAllocation, ctx: &Context) -> Result<Action, Error> {
    let name = alloc.name_any();
    let released = reconcile_nodes(ctx, &name, &BTreeSet::new()).await?;
    if !released.is_empty() {
        let note = format!("released reserved nodes {}", released.join(", "));
        ctx.event(&alloc.object_ref(&()), false, "NodesReleased", note).await;
    }
    Ok(Action::await_change())
}

async fn apply(alloc: &GpuAllocation, ctx: &Context) -> Result<Action, Error> {
    let name = alloc.name_any();
    let (view, stale) = ctx.recent_view().await;
    let (Some(plan), Some(state)) =
        (view.grants.allocations.get(&name), view.allocations.iter().find(|a| a.name == name))
    else {
        return Err(Error::NotInCache(name));
    };
    let usage = view.usage.by_allocation.get(&name).cloned().unwrap_or_default();
    let active = plan.phase == Phase::Active;

    // Reservations: exactly the planned nodes carry the label and taint.
    let wanted: BTreeSet<String> = if active {
        plan.pools.values().flat_map(|p| p.reserved_nodes.iter().cloned()).collect()
    } else {
        BTreeSet::new()
    };
    reconcile_nodes(ctx, &name, &wanted).await?;

    let old = alloc.status.clone().unwrap_or_default();
    let status = build_status(alloc, &old, &view, &usage, state.hours_used);
    publish_transitions(ctx, alloc, &old, &status, plan).await;
    if status != old {
        super::apply_status(&Api::<GpuAllocation>::all(ctx.client.clone()), &name, None, &status).await?;
    }
    let wake = next_wake(&view, plan.wake_at, alloc, &status, &usage);
    Ok(requeue(stale, Some(wake)))
}

/// Labels and taints `wanted`, clears every other node labelled for `name`.
/// Returns the nodes released.
async fn reconcile_nodes(ctx: &Context, name: &str, wanted: &BTreeSet<String>) -> Result<Vec<String>, Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut released = Vec::new();
    // The wanted nodes and those labelled for it now (the model's index): not every node.
    let mut candidates: BTreeSet<String> = ctx.stores.model.read(|m| m.reserved_for(name)).into_iter().collect();
    candidates.extend(wanted.iter().cloned());
    for node_name in candidates {
        let Some(node) = ctx.stores.nodes.store.get(&ObjectRef::new(&node_name)) else { continue };
        let labelled = node.labels().get(crate::snapshot::RESERVED_FOR).map(String::as_str) == Some(name);
        if wanted.contains(&node_name) {
            nodes::set_reservation(&api, &node, Some(name)).await?;
        } else if labelled {
            nodes::set_reservation(&api, &node, None).await?;
            released.push(node_name);
        }
    }
    Ok(released)
}

pub(crate) fn build_status(
    alloc: &GpuAllocation,
    old: &GpuAllocationStatus,
    view: &View,
    usage: &AllocationUse,
    hours_now: f64,
) -> GpuAllocationStatus {
    let name = alloc.name_any();
    let plan = &view.grants.allocations[&name];
    let generation = alloc.metadata.generation;
    let now = Time(view.now);
    let phase = match plan.phase {
        Phase::Pending => AllocationPhase::Pending,
        Phase::Active => AllocationPhase::Active,
        Phase::Exhausted => AllocationPhase::Exhausted,
        Phase::Expired => AllocationPhase::Expired,
    };
    let mut s = GpuAllocationStatus {
        conditions: old.conditions.clone(),
        observed_generation: generation,
        ..Default::default()
    };
    s.phase = Some(phase);
    s.granted = plan.pools.values().map(|p| p.granted).sum();
    s.in_use = usage.devices();
    s.pools = alloc
        .spec
        .grants
        .iter()
        .map(|g| {
            let p = plan.pools.get(&g.pool).cloned().unwrap_or_default();
            let in_use = usage.in_use.get(&g.pool).copied().unwrap_or(0);
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

    // Accounting: write the integral when the rate or phase changes, or at
    // least every USAGE_INTERVAL; otherwise keep the last sample, so that an
    // unchanged cluster produces no status writes.
    let last = old.usage_updated_at.as_ref().map(|t| t.0);
    let stale = last.is_none_or(|t| view.now.duration_since(t).as_secs_f64() >= USAGE_INTERVAL.as_secs_f64());
    let changed =
        old.charge_rate != usage.rate || old.domestic_charge_rate != usage.domestic_rate || old.phase != s.phase;
    if stale || changed {
        s.accelerator_hours_used = round(hours_now);
        s.domestic_accelerator_hours_used =
            round(usage::charge(old.domestic_accelerator_hours_used, last, view.now, old.domestic_charge_rate));
        s.usage_updated_at = Some(now.clone());
        s.charge_rate = usage.rate;
        s.domestic_charge_rate = usage.domestic_rate;
    } else {
        s.accelerator_hours_used = old.accelerator_hours_used;
        s.domestic_accelerator_hours_used = old.domestic_accelerator_hours_used;
        s.usage_updated_at = old.usage_updated_at.clone();
        s.charge_rate = old.charge_rate;
        s.domestic_charge_rate = old.domestic_charge_rate;
    }
    let frac = |d: f64, t: f64| (t > 0.0).then(|| round(d / t));
    s.domestic_share = Some(DomesticShare {
        granted: plan.domestic_granted_share.map(round),
        in_use: frac(usage.domestic_devices as f64, usage.devices() as f64),
        hours: frac(s.domestic_accelerator_hours_used, s.accelerator_hours_used),
    });

    for c in conditions(alloc, view, &s, hours_now) {
        set_condition(&mut s.conditions, c, &now);
    }
    s
}

/// Six decimals: enough for hours, and stable so equal values compare equal.
fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn conditions(alloc: &GpuAllocation, view: &View, s: &GpuAllocationStatus, hours_now: f64) -> Vec<Condition> {
    let name = alloc.name_any();
    let plan = &view.grants.allocations[&name];
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
    out.push(quota_condition(view, alloc));
    out
}

/// QuotaApplied: whether each namespace exists (its quota is then kept by the
/// quota reconciler).
fn quota_condition(view: &View, alloc: &GpuAllocation) -> Condition {
    let g = alloc.metadata.generation;
    let missing: Vec<&String> =
        alloc.spec.tenant.namespaces.iter().filter(|ns| !view.namespaces.contains(*ns)).collect();
    if missing.is_empty() {
        condition(
            "QuotaApplied",
            true,
            "QuotaManaged",
            format!("ResourceQuota {QUOTA_NAME} is managed in {} namespace(s)", alloc.spec.tenant.namespaces.len()),
            g,
        )
    } else {
        condition(
            "QuotaApplied",
            false,
            "NamespaceMissing",
            format!(
                "namespace(s) {} do not exist yet; their quota is applied when they are created",
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
            g,
        )
    }
}

/// The next moment the allocation changes by itself: window edges, the budget
/// running out, and the usage sample while pods run.
fn next_wake(
    view: &View,
    wake_at: Option<Timestamp>,
    alloc: &GpuAllocation,
    status: &GpuAllocationStatus,
    usage: &AllocationUse,
) -> Duration {
    // A safety net: the plan is cluster-wide, so look again at least every minute.
    let mut wake = Duration::from_secs(60);
    let until = |t: Timestamp| {
        Duration::from_secs_f64(t.duration_since(view.now).as_secs_f64().max(0.0)) + Duration::from_millis(200)
    };
    if let Some(t) = wake_at {
        wake = wake.min(until(t));
    }
    if usage.rate > 0.0 {
        wake = wake.min(USAGE_INTERVAL);
        if let Some(b) = &alloc.spec.budget
            && let Some(t) =
                usage::exhausted_at(b.accelerator_hours as f64, status.accelerator_hours_used, view.now, usage.rate)
        {
            wake = wake.min(until(t));
        }
    }
    wake
}

/// Events on phase and condition transitions only.
async fn publish_transitions(
    ctx: &Context,
    alloc: &GpuAllocation,
    old: &GpuAllocationStatus,
    new: &GpuAllocationStatus,
    plan: &crate::planner::grants::AllocationPlan,
) {
    let on = alloc.object_ref(&());
    if old.phase != new.phase {
        let (warning, reason, note) = match (new.phase, &plan.blocker) {
            (Some(AllocationPhase::Active), _) => {
                (false, "Activated".to_string(), format!("grant in force: {} accelerators", new.granted))
            }
            (Some(AllocationPhase::Expired), Some(b)) => (false, "Expired".to_string(), b.message()),
            (Some(AllocationPhase::Exhausted), Some(b)) => (true, "BudgetUsedUp".to_string(), b.message()),
            (_, Some(b)) => (
                b.reason() == "InsufficientCapacity"
                    || b.reason() == "PoolNotFound"
                    || b.reason() == "DomesticShareNotMet",
                b.reason().to_string(),
                b.message(),
            ),
            (_, None) => (false, "Pending".to_string(), "waiting for admission".to_string()),
        };
        ctx.event(&on, warning, &reason, note).await;
    } else if let (Some(b), Some(AllocationPhase::Pending)) = (&plan.blocker, new.phase) {
        // Still pending, for a new reason.
        let was = find_condition(&old.conditions, "Ready").map(|c| c.reason.clone());
        if was.as_deref() != Some(b.reason()) {
            ctx.event(&on, b.reason() != "WindowNotOpen", b.reason(), b.message()).await;
        }
    }
    let turned = |t: &str, reason: &str| {
        find_condition(&new.conditions, t)
            .filter(|c| c.reason == reason && find_condition(&old.conditions, t).is_none_or(|o| o.reason != reason))
    };
    if let Some(c) = turned("WithinBudget", "BudgetAlmostUsed") {
        ctx.event(&on, true, "BudgetAlmostUsed", c.message.clone()).await;
    }
    if let Some(c) = turned("NodesReserved", "NotEnoughFreeNodes") {
        ctx.event(&on, true, "NotEnoughFreeNodes", c.message.clone()).await;
    }
    let reserved = |s: &GpuAllocationStatus| -> BTreeSet<String> {
        s.pools.iter().flat_map(|p| p.reserved_nodes.iter().cloned()).collect()
    };
    let (before, after) = (reserved(old), reserved(new));
    let added: Vec<&String> = after.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&after).collect();
    if !added.is_empty() {
        let verb = if removed.is_empty() { "NodesReserved" } else { "NodesReplaced" };
        let mut note = format!("reserved {}", join(&added));
        if !removed.is_empty() {
            note.push_str(&format!("; released {}", join(&removed)));
        }
        ctx.event(&on, false, verb, note).await;
    } else if !removed.is_empty() {
        ctx.event(&on, false, "NodesReleased", format!("released {}", join(&removed))).await;
    }
}

fn join(names: &[&String]) -> String {
    names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}
