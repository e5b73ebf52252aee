//! AcceleratorPool reconciler: status from the nodes the selector matches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::stores::Stores;
use super::{Context, Error, FIELD_MANAGER};
use crate::api::{
    AcceleratorPool, AcceleratorPoolStatus, condition, find_condition, set_condition,
};
use crate::planner::inventory::{self, NodeInfo};
use crate::snapshot;

const CONTROLLER: &str = "acceleratorpool";
/// Conflicting node names listed in status, at most.
const MAX_LISTED_CONFLICTS: usize = 20;

struct PoolCtx {
    ctx: Arc<Context>,
    stores: Arc<Stores>,
}

pub async fn run(
    ctx: Arc<Context>,
    stores: Stores,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // A node change can move a node in or out of any pool, and a pool change
    // (deletion included) can create or clear a conflict in another pool.
    let everything = futures::stream::select(stores.nodes.changes(), stores.pools.changes());
    let controller = Controller::new(
        Api::<AcceleratorPool>::all(ctx.client.clone()),
        Default::default(),
    )
    .reconcile_all_on(everything)
    .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_millis(500)))
    .graceful_shutdown_on(shutdown);
    let pctx = Arc::new(PoolCtx {
        ctx,
        stores: Arc::new(stores),
    });
    controller
        .run(reconcile, error_policy, pctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "pool reconcile failed");
            }
        })
        .await;
}

fn error_policy(_pool: Arc<AcceleratorPool>, error: &Error, pctx: Arc<PoolCtx>) -> Action {
    pctx.ctx.count_error(CONTROLLER, error);
    tracing::warn!(error = %error, "pool reconcile failed");
    if error.is_transient() {
        Action::requeue(Duration::from_secs(5))
    } else {
        Action::await_change()
    }
}

async fn reconcile(pool: Arc<AcceleratorPool>, pctx: Arc<PoolCtx>) -> Result<Action, Error> {
    let started = Instant::now();
    let ctx = &pctx.ctx;
    ctx.count_reconcile(CONTROLLER);
    let name = pool.name_any();
    let nodes: Vec<NodeInfo> = pctx
        .stores
        .nodes
        .store
        .state()
        .iter()
        .map(|n| snapshot::node_info(n))
        .collect();
    let pools: Vec<_> = pctx
        .stores
        .pools
        .store
        .state()
        .iter()
        .filter_map(|p| snapshot::pool_info(p).ok())
        .collect();

    let now = Time(Timestamp::now());
    let generation = pool.metadata.generation;
    let old = pool.status.clone().unwrap_or_default();
    let mut status = AcceleratorPoolStatus {
        conditions: old.conditions.clone(),
        ..Default::default()
    };
    status.observed_generation = generation;

    match snapshot::pool_info(&pool) {
        Err(msg) => {
            set_condition(
                &mut status.conditions,
                condition("Ready", false, "InvalidSelector", msg, generation),
                &now,
            );
        }
        Ok(_) => {
            let membership = inventory::membership(&pools, &nodes);
            let members = membership
                .nodes_by_pool
                .get(&name)
                .cloned()
                .unwrap_or_default();
            let totals = inventory::pool_totals(&pool.spec.resource_name, &members, &nodes);
            status.nodes = totals.nodes;
            status.ready_nodes = totals.ready_nodes;
            status.capacity = totals.capacity;
            status.allocatable = totals.allocatable;
            let conflicts: Vec<&str> = membership.conflicts_of(&name).collect();
            status.conflicting_nodes = conflicts
                .iter()
                .take(MAX_LISTED_CONFLICTS)
                .map(|s| s.to_string())
                .collect();
            let conflict = if conflicts.is_empty() {
                condition(
                    "NodeConflict",
                    false,
                    "NoConflict",
                    "no node is selected by another pool",
                    generation,
                )
            } else {
                condition(
                    "NodeConflict",
                    true,
                    "NodesInSeveralPools",
                    format!(
                        "{} node(s) are also selected by another pool and are counted in neither (first: {}); make the nodeSelectors disjoint",
                        conflicts.len(),
                        conflicts[0]
                    ),
                    generation,
                )
            };
            set_condition(&mut status.conditions, conflict, &now);
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
                condition(
                    "Ready",
                    false,
                    "NoNodes",
                    "the nodeSelector matches no node",
                    generation,
                )
            };
            set_condition(&mut status.conditions, ready, &now);
        }
    }

    publish_transitions(ctx, &pool, &old, &status).await;
    if status != old {
        let api: Api<AcceleratorPool> = Api::all(ctx.client.clone());
        let patch = json!({
            "apiVersion": AcceleratorPool::api_version(&()),
            "kind": AcceleratorPool::kind(&()),
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    }
    ctx.observe_duration(CONTROLLER, started.elapsed().as_secs_f64());
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Events only when a condition turns, never on every pass.
async fn publish_transitions(
    ctx: &Context,
    pool: &AcceleratorPool,
    old: &AcceleratorPoolStatus,
    new: &AcceleratorPoolStatus,
) {
    let turned_true = |t: &str| {
        let was = find_condition(&old.conditions, t).is_some_and(|c| c.status == "True");
        find_condition(&new.conditions, t).filter(|c| c.status == "True" && !was)
    };
    let mut events = Vec::new();
    if let Some(c) = turned_true("NodeConflict") {
        events.push((EventType::Warning, c.reason.clone(), c.message.clone()));
    }
    let was_invalid =
        find_condition(&old.conditions, "Ready").is_some_and(|c| c.reason == "InvalidSelector");
    if let Some(c) = find_condition(&new.conditions, "Ready")
        .filter(|c| c.reason == "InvalidSelector" && !was_invalid)
    {
        events.push((EventType::Warning, c.reason.clone(), c.message.clone()));
    }
    for (type_, reason, note) in events {
        let ev = Event {
            type_,
            reason,
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &pool.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
}
