//! `sovereign-operator report`: accelerator-hours and current use of the center
//! by program, tenant, pool and domestic/non-domestic class, grants against
//! use, and the queue. Read-only: it lists the three custom resources once and
//! works from their status (what the operator wrote), so any user with view
//! rights can run it. [`build`] is pure; [`render`] and [`charts`] format.

mod build;
pub mod charts;
pub mod render;
#[cfg(test)]
mod tests;

use std::path::Path;

use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client};
use serde::Serialize;

pub use build::build;

use crate::api::{AcceleratorPool, GpuAllocation, ModelProject};
use crate::cli::{ReportArgs, ReportFormat};

/// What the report is built from: the objects as listed.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub pools: Vec<AcceleratorPool>,
    pub allocations: Vec<GpuAllocation>,
    pub projects: Vec<ModelProject>,
    pub now: Timestamp,
}

/// A group that rows summarise.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Total,
    Class,
    Program,
    Tenant,
    Pool,
    Allocation,
    /// One row per workload (ModelProject, Job, JobSet) with hours, from the
    /// allocations' `projectHours`.
    Workload,
}

impl Section {
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Total => "total",
            Section::Class => "class",
            Section::Program => "program",
            Section::Tenant => "tenant",
            Section::Pool => "pool",
            Section::Allocation => "allocation",
            Section::Workload => "workload",
        }
    }
}

/// One line of the report. Fields that do not apply to a section are `None`
/// (empty in CSV, absent in JSON).
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub section: Option<Section>,
    pub name: String,
    /// Charge-weighted accelerator-hours used so far.
    pub accelerator_hours: f64,
    /// The part of them on domestic pools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domestic_accelerator_hours: Option<f64>,
    /// domestic / all accelerator-hours (none when no hours were used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domestic_share: Option<f64>,
    /// Per pool, an estimate: allocations' hours split over their grants.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hours_estimated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<i64>,
    pub granted: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved: Option<i64>,
    pub in_use: i64,
    /// in use / granted (none without a grant).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_used: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_hours: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_left_hours: Option<f64>,
    /// Projects waiting for admission.
    pub queued: i64,
    /// Projects admitted or running.
    pub running: i64,
    /// How long the longest-waiting queued project has waited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_wait_seconds: Option<i64>,
    /// Mean time from creation to admission of the admitted or running projects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_admission_wait_seconds: Option<f64>,
}

/// The whole report.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub generated_at: String,
    /// The national target for the domestic share (50% by 2030).
    pub domestic_target: f64,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn section(&self, s: Section) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(move |r| r.section == Some(s))
    }
}

/// The national goal for the share of domestic accelerators.
pub const DOMESTIC_TARGET: f64 = 0.5;

/// Lists the pools, allocations and projects once (read-only): the projects of
/// every namespace, or of `namespace` alone.
pub async fn fetch(client: &Client, namespace: Option<&str>) -> anyhow::Result<Inputs> {
    let lp = ListParams::default();
    let projects = match namespace {
        Some(ns) => Api::<ModelProject>::namespaced(client.clone(), ns),
        None => Api::<ModelProject>::all(client.clone()),
    };
    Ok(Inputs {
        pools: Api::<AcceleratorPool>::all(client.clone()).list(&lp).await?.items,
        allocations: Api::<GpuAllocation>::all(client.clone()).list(&lp).await?.items,
        projects: projects.list(&lp).await?.items,
        now: Timestamp::now().round(k8s_openapi::jiff::Unit::Second)?,
    })
}

/// The inputs of one namespace's report: the allocations that list it, the
/// pools they grant, and the projects in it.
pub fn scope(mut inputs: Inputs, namespace: &str) -> Inputs {
    inputs.allocations.retain(|a| a.spec.tenant.namespaces.iter().any(|n| n == namespace));
    // The workloads of this namespace only; the allocation's figures stay whole.
    let mine = format!("{namespace}/");
    for s in inputs.allocations.iter_mut().filter_map(|a| a.status.as_mut()) {
        s.project_hours.retain(|h| h.project.starts_with(&mine));
    }
    let granted: std::collections::BTreeSet<&str> =
        inputs.allocations.iter().flat_map(|a| a.spec.grants.iter().map(|g| g.pool.as_str())).collect();
    let granted: std::collections::BTreeSet<String> = granted.into_iter().map(str::to_string).collect();
    inputs.pools.retain(|p| p.metadata.name.as_ref().is_some_and(|n| granted.contains(n)));
    inputs.projects.retain(|p| p.metadata.namespace.as_deref() == Some(namespace));
    inputs
}

/// `report`: fetch, build, print, and write the charts if asked.
pub async fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let client = crate::kubeclient::connect(&args.kube).await?;
    let namespace = args.namespace.as_deref();
    let mut inputs = fetch(&client, namespace).await?;
    if let Some(ns) = namespace {
        inputs = scope(inputs, ns);
    }
    let report = build(&inputs);
    let text = match args.output {
        ReportFormat::Table => render::table(&report),
        ReportFormat::Csv => render::csv(&report)?,
        ReportFormat::Json => render::json(&report)?,
        ReportFormat::Yaml => render::yaml(&report)?,
    };
    print!("{text}");
    if let Some(dir) = &args.svg {
        write_charts(&report, dir)?;
    }
    Ok(())
}

fn write_charts(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, svg) in charts::all(report)? {
        let path = dir.join(name);
        std::fs::write(&path, svg)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
