//! `sovereign-operator plan -f FILE...`: what the operator would do if the
//! objects in FILE were applied (or deleted with `--delete`). Reads the live
//! cluster once (list only, never a write), applies the proposals in memory,
//! and runs the operator's own planner on the result ([`adapter`]) until it
//! settles: allocations activate, dedicated grants reserve nodes, gangs are
//! admitted, victims are preempted and preemptors then admitted.

mod adapter;
mod proposals;
pub mod render;
mod simulate;
#[cfg(test)]
mod tests;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ResourceQuota};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::ListParams;
use kube::{Api, Client};
use serde::Serialize;

pub use adapter::{PoolPlan, Settings, stores};
pub use proposals::{Action, Proposal, read_files};
pub use simulate::plan;

use crate::api::{AcceleratorPool, GpuAllocation, ModelProject};
use crate::cli::{PlanArgs, PlanFormat};
use crate::controller::stores::{MANAGED_BY, jobsets_served};
use crate::snapshot::{ALLOCATION_LABEL, PROJECT_LABEL};
use crate::workload::kinds::JobSet;

/// The objects the operator's decisions are made from, as its stores hold them.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub pools: Vec<AcceleratorPool>,
    pub allocations: Vec<GpuAllocation>,
    /// Running pods (any namespace).
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    /// The quotas the operator manages.
    pub quotas: Vec<ResourceQuota>,
    pub projects: Vec<ModelProject>,
    /// Worker pods of every project, in any phase.
    pub workers: Vec<Pod>,
    /// Batch Jobs and JobSets labelled `sovereign.ai/allocation`.
    pub jobs: Vec<Job>,
    pub jobsets: Vec<JobSet>,
}

/// Lists what the operator watches, once: read-only.
pub async fn fetch(client: &Client) -> anyhow::Result<Cluster> {
    let all = ListParams::default();
    let managed = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    let labelled = ListParams::default().labels(ALLOCATION_LABEL);
    Ok(Cluster {
        nodes: Api::<Node>::all(client.clone()).list(&all).await?.items,
        pools: Api::<AcceleratorPool>::all(client.clone()).list(&all).await?.items,
        allocations: Api::<GpuAllocation>::all(client.clone()).list(&all).await?.items,
        pods: Api::<Pod>::all(client.clone()).list(&all.clone().fields("status.phase=Running")).await?.items,
        namespaces: Api::<Namespace>::all(client.clone()).list(&all).await?.items,
        quotas: Api::<ResourceQuota>::all(client.clone()).list(&managed).await?.items,
        projects: Api::<ModelProject>::all(client.clone()).list(&all).await?.items,
        workers: Api::<Pod>::all(client.clone()).list(&all.clone().labels(PROJECT_LABEL)).await?.items,
        jobs: Api::<Job>::all(client.clone()).list(&labelled).await?.items,
        jobsets: if jobsets_served(client).await {
            Api::<JobSet>::all(client.clone()).list(&labelled).await?.items
        } else {
            Vec::new()
        },
    })
}

/// One allocation: its phase now and planned, with the operator's reason.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllocationPlan {
    pub name: String,
    pub phase_now: Option<String>,
    pub phase: String,
    pub granted_now: i64,
    pub granted: i64,
    /// The Ready condition the operator would write.
    pub reason: String,
    pub message: String,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QuotaChange {
    pub namespace: String,
    pub resource: String,
    pub now: Option<i64>,
    pub planned: Option<i64>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeChange {
    pub node: String,
    /// The allocation the node is reserved for now, and planned.
    pub reserved_now: Option<String>,
    pub reserved: Option<String>,
}

/// What happens to one project.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    /// Admitted (to run) in this plan.
    Admitted,
    /// Waits for admission.
    Waiting,
    /// Holds its devices now and keeps them.
    Running,
    /// Stopped for a higher-priority run of its allocation, and queued again.
    Preempted,
    /// Stopped because it ran on capacity that another allocation takes back.
    Reclaimed,
    /// Stopped because its allocation is no longer Active.
    Stopped,
    /// Finished, failed or suspended: not planned.
    Idle,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectPlan {
    /// namespace/name
    pub project: String,
    pub allocation: String,
    pub phase_now: Option<String>,
    pub fate: Fate,
    pub pool: Option<String>,
    pub nodes: Vec<String>,
    pub borrowed: bool,
    /// Runs it preempts (or reclaims) to be admitted.
    pub preempts: Vec<String>,
    /// Why it waits or was stopped, in the operator's words.
    pub reason: Option<String>,
}

#[derive(Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolRow {
    pub pool: String,
    pub domestic: bool,
    pub allocatable: i64,
    pub granted: i64,
    pub reserved: i64,
    pub in_use: i64,
}

/// Domestic pools' share of allocatable capacity, grants and devices in use.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DomesticShare {
    pub capacity: f64,
    pub granted: f64,
    pub in_use: f64,
}

impl DomesticShare {
    pub fn of(pools: &[PoolRow]) -> Self {
        let share = |f: fn(&PoolRow) -> i64| {
            let all: i64 = pools.iter().map(f).sum();
            let domestic: i64 = pools.iter().filter(|p| p.domestic).map(f).sum();
            if all > 0 { (domestic as f64 / all as f64 * 1e4).round() / 1e4 } else { 0.0 }
        };
        Self { capacity: share(|p| p.allocatable), granted: share(|p| p.granted), in_use: share(|p| p.in_use) }
    }
}

/// The whole plan.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub at: String,
    /// The proposals, as "create GpuAllocation x".
    pub changes: Vec<String>,
    pub allocations: Vec<AllocationPlan>,
    pub quotas: Vec<QuotaChange>,
    pub nodes: Vec<NodeChange>,
    pub projects: Vec<ProjectPlan>,
    pub pools_before: Vec<PoolRow>,
    pub pools_after: Vec<PoolRow>,
    pub domestic_before: DomesticShare,
    pub domestic_after: DomesticShare,
}

/// `plan`: list, apply the files in memory, plan, print. Never writes.
pub async fn run(args: &PlanArgs) -> anyhow::Result<()> {
    let at = match &args.at {
        Some(t) => t
            .parse::<Timestamp>()
            .map_err(|e| anyhow::anyhow!("--at {t}: {e} (use RFC 3339, e.g. 2027-01-01T09:00:00Z)"))?,
        None => Timestamp::now(),
    };
    let action = if args.delete { Action::Delete } else { Action::Apply };
    let proposals = read_files(&args.files, action)?;
    let client = crate::kubeclient::connect(&args.kube).await?;
    let live = fetch(&client).await?;
    let settings = Settings {
        node_grace: std::time::Duration::from_secs(args.planning.node_grace_seconds),
        starvation_after: SignedDuration::from_secs(args.planning.starvation_seconds as i64),
        min_run: SignedDuration::from_secs(args.planning.min_run_seconds as i64),
    };
    let plan = plan(&live, &proposals, at, &settings)?;
    match args.output {
        PlanFormat::Table => print!("{}", render::table(&plan)),
        PlanFormat::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
    }
    Ok(())
}
