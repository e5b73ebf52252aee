//! AcceleratorPool reconciler: status from the nodes the selector matches, the
//! grants in force and the pods that run there.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::SelectorExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::context::requeue;
use super::{Context, Error};
use crate::api::{AcceleratorPool, AcceleratorPoolStatus, condition, find_condition, set_condition};
use crate::snapshot;

const CONTROLLER: &str = "acceleratorpool";
/// Conflicting node names listed in status, at most.
const MAX_LISTED_CONFLICTS: usize = 20;
/// `inUse` moves with every worker that starts or ends (hundreds a minute on a
/// national cluster): a change of it alone is written at most this often.
const IN_USE_REFRESH: Duration = Duration::from_secs(5);

pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let s = &ctx.stores;
    // Node, pool and grant changes can move capacity between pools (and a pool
    // change can create or clear a conflict elsewhere): all pools. A pod change
    // touches only the pool of its node.
    let everything = s.grant_inputs_changed();
    let (nodes, pools) = (s.nodes.store.clone(), s.pools.store.clone());
    let pod_pools = s.pods.events().flat_map(move |pod| {
        let node = pod.spec.as_ref().and_then(|p| p.node_name.clone());
        let labels = node.and_then(|n| nodes.get(&ObjectRef::new(&n))).map(|n| n.labels().clone()).unwrap_or_default();
        let hits: Vec<ObjectRef<AcceleratorPool>> = pools
            .state()
            .iter()
            .filter(|p| snapshot::pool_info(p).is_ok_and(|i| i.selector.matches(&labels)))
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect();
        futures::stream::iter(hits)
    });
    let controller = Controller::for_shared_stream(s.pools.events(), s.pools.store.clone())
        .reconcile_all_on(futures::stream::once(async {}).chain(everything))
        .reconcile_on(pod_pools)
        .with_config(super::controller_config(Duration::from_millis(300)));
    super::drive(controller, CONTROLLER, ctx.clone(), shutdown, reconcile).await;
}

async fn reconcile(pool: Arc<AcceleratorPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = pool.name_any();
    let (view, stale) = ctx.recent_view().await;
    let now = Time(view.now);
    let generation = pool.metadata.generation;
    let old = pool.status.clone().unwrap_or_default();
    let mut status = AcceleratorPoolStatus {
        conditions: old.conditions.clone(),
        observed_generation: generation,
        ..Default::default()
    };

    if let Err(msg) = snapshot::pool_info(&pool) {
        set_condition(&mut status.conditions, condition("Ready", false, "InvalidSelector", msg, generation), &now);
    } else {
        let totals = view.totals.get(&name).cloned().unwrap_or_default();
        let plan = view.grants.pools.get(&name).cloned().unwrap_or_default();
        status.nodes = totals.nodes;
        status.ready_nodes = totals.ready_nodes;
        status.capacity = totals.capacity;
        status.allocatable = totals.allocatable;
        status.granted = plan.granted;
        status.reserved = plan.reserved;
        status.reserved_nodes = plan.reserved_nodes;
        status.in_use = view.usage.by_pool.get(&name).copied().unwrap_or(0);
        status.free = (totals.allocatable - plan.granted).max(0);
        let conflicts: Vec<(&str, &str)> = view.membership.conflicts_of(&name).collect();
        status.conflicting_nodes = conflicts.iter().take(MAX_LISTED_CONFLICTS).map(|(n, _)| n.to_string()).collect();
        let conflict = match conflicts.first() {
            None => condition(
                "NodeConflict",
                false,
                "NoConflict",
                "no node of this pool is counted by another pool",
                generation,
            ),
            Some((first, owner)) => condition(
                "NodeConflict",
                true,
                "NodesInSeveralPools",
                format!(
                    "{} selected node(s) belong to older pools and are not counted here (first: {first}, in pool {owner}); make the nodeSelectors disjoint",
                    conflicts.len()
                ),
                generation,
            ),
        };
        set_condition(&mut status.conditions, conflict, &now);
        let over = if plan.overcommitted_by > 0 {
            condition(
                "Overcommitted",
                true,
                "CapacityLost",
                format!(
                    "active grants hold {} accelerators but only {} are allocatable: {} short; nothing was revoked, add nodes or shrink a grant",
                    plan.granted, totals.allocatable, plan.overcommitted_by
                ),
                generation,
            )
        } else {
            condition(
                "Overcommitted",
                false,
                "WithinCapacity",
                format!("{} of {} allocatable accelerators granted", plan.granted, totals.allocatable),
                generation,
            )
        };
        set_condition(&mut status.conditions, over, &now);
        let ready = if totals.ready_nodes > 0 {
            condition(
                "Ready",
                true,
                "NodesFound",
                format!("{} of {} nodes ready", totals.ready_nodes, totals.nodes),
                generation,
            )
        } else if totals.nodes > 0 {
            condition(
                "Ready",
                false,
                "NoReadyNodes",
                format!("none of the {} selected nodes is ready", totals.nodes),
                generation,
            )
        } else {
            condition("Ready", false, "NoNodes", "the nodeSelector matches no node", generation)
        };
        set_condition(&mut status.conditions, ready, &now);
    }

    publish_transitions(&ctx, &pool, &old, &status).await;
    if status != old {
        let only_in_use = AcceleratorPoolStatus { in_use: old.in_use, ..status.clone() } == old;
        if only_in_use && let Some(wait) = ctx.pool_write_due_in(&name, IN_USE_REFRESH) {
            return Ok(requeue(stale, Some(wait)));
        }
        super::apply_status(&Api::<AcceleratorPool>::all(ctx.client.clone()), &name, None, &status).await?;
        ctx.pool_written(&name);
    }
    Ok(requeue(stale, Some(Duration::from_secs(300))))
}

/// Warning Events when a problem condition turns on, never on every pass.
async fn publish_transitions(
    ctx: &Context,
    pool: &AcceleratorPool,
    old: &AcceleratorPoolStatus,
    new: &AcceleratorPoolStatus,
) {
    let on = pool.object_ref(&());
    for (type_, bad_when_true) in [("NodeConflict", true), ("Overcommitted", true), ("Ready", false)] {
        let Some(c) = find_condition(&new.conditions, type_) else {
            continue;
        };
        let prev = find_condition(&old.conditions, type_);
        let bad = (c.status == "True") == bad_when_true;
        let was_bad = prev.is_some_and(|p| (p.status == "True") == bad_when_true && p.reason == c.reason);
        if bad && !was_bad && c.reason != "NoNodes" {
            ctx.event(&on, kube::runtime::events::EventType::Warning, &c.reason, c.message.clone()).await;
        }
    }
}
