//! Workloads that tenants bring (a batch Job, a JobSet; a Kubeflow TrainJob
//! runs as the JobSet it makes), read into the plain shape the admission core
//! plans as one gang: which allocation, which pools in order, how many pods of
//! how many accelerators, the topology constraint and the priority. Pure: no
//! client; the errors say what to change.
//!
//! The contract, on the top object:
//! - label `sovereign.ai/allocation: <GpuAllocation>` opts in; without it the
//!   workload is not ours ([`read_job`] and [`read_jobset`] return `None`);
//! - annotation `sovereign.ai/pools: "h200,b200"`: pools in order of preference
//!   (a label value cannot hold a comma); absent = the allocation's pools;
//! - annotations `sovereign.ai/topology-key` (a node label key such as
//!   `topology.sovereign.ai/rack`) and `sovereign.ai/topology-mode`
//!   (`Required` or `Preferred`, the default);
//! - annotation `sovereign.ai/priority`: an integer from -1000 to 1000.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
use kube::ResourceExt;
use kube::api::{DynamicObject, ObjectMeta};
use serde::Deserialize;

use crate::api::{TopologyConstraint, TopologyMode};
use crate::snapshot::ALLOCATION_LABEL;

#[cfg(test)]
mod tests;

/// Ordered pools, comma-separated.
pub const POOLS_ANNOTATION: &str = "sovereign.ai/pools";
/// Node label key of the topology level the gang should sit in.
pub const TOPOLOGY_KEY_ANNOTATION: &str = "sovereign.ai/topology-key";
/// `Required` or `Preferred` (default).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "sovereign.ai/topology-mode";
/// Order inside the allocation's queue, -1000 to 1000 (default 0).
pub const PRIORITY_ANNOTATION: &str = "sovereign.ai/priority";
/// Most pools a workload may list (as a ModelProject's `placement.pools`).
pub const MAX_POOLS: usize = 8;

/// Which kind of workload a gang came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Job,
    JobSet,
}

/// Pods of one pod template: all of a Job's, or one replicated job's of a JobSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members {
    /// `job` for a Job; the replicated job's name for a JobSet.
    pub name: String,
    pub pods: u32,
    /// Devices of the gang's resource each pod asks for (0: a pod without
    /// accelerators, such as a JobSet's coordinator).
    pub per_pod: i64,
}

/// A workload as one gang.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadGang {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
    pub allocation: String,
    /// Pools in order of preference; empty: any pool of the allocation.
    pub pools: Vec<String>,
    /// The one accelerator resource name every pod asks for (for example `nvidia.com/gpu`).
    pub resource: String,
    pub members: Vec<Members>,
    pub topology: Option<TopologyConstraint>,
    pub priority: i32,
}

impl WorkloadGang {
    /// Pods of the whole gang.
    pub fn pods(&self) -> u32 {
        self.members.iter().map(|m| m.pods).sum()
    }

    /// Pods that ask for devices (a JobSet's coordinator may ask for none).
    pub fn workers(&self) -> u32 {
        self.members.iter().filter(|m| m.per_pod > 0).map(|m| m.pods).sum()
    }

    /// Devices each pod that asks for any asks for (alike: [`read_jobset`] checks).
    pub fn per_worker(&self) -> i64 {
        self.members.iter().map(|m| m.per_pod).find(|n| *n > 0).unwrap_or(0)
    }

    /// Devices of the whole gang.
    pub fn devices(&self) -> i64 {
        self.members.iter().map(|m| i64::from(m.pods) * m.per_pod).sum()
    }
}

/// Why a labelled workload cannot be one gang. The text says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error(
        "{what}: parallelism {parallelism} differs from completions {completions}; a gang runs all its pods at once: set both to the number of pods"
    )]
    ParallelismNotCompletions { what: String, parallelism: i32, completions: String },
    #[error("{what}: {field} is {value}; it must be at least 1")]
    NotPositive { what: String, field: &'static str, value: i32 },
    #[error(
        "{what}: pods ask for {} accelerator resources ({}); a gang runs on one pool, whose devices have one resource name: ask for one",
        .resources.len(),
        .resources.join(", ")
    )]
    SeveralResources { what: String, resources: Vec<String> },
    #[error(
        "the pods ask for no accelerators (no extended resource such as nvidia.com/gpu in their containers' requests or limits): remove the label {ALLOCATION_LABEL} or ask for devices"
    )]
    NoAccelerators,
    #[error("{what}: container {container} asks for {resource} {value:?}, not a whole number of devices")]
    BadQuantity { what: String, container: String, resource: String, value: String },
    #[error("annotation {POOLS_ANNOTATION} {value:?}: {reason}")]
    BadPools { value: String, reason: String },
    #[error("{0}")]
    OtherResource(Box<OtherResource>),
    #[error("annotation {PRIORITY_ANNOTATION} {value:?}: must be a whole number from -1000 to 1000")]
    BadPriority { value: String },
    #[error("annotation {TOPOLOGY_MODE_ANNOTATION} {value:?}: must be Required or Preferred")]
    BadTopologyMode { value: String },
    #[error(
        "annotation {TOPOLOGY_MODE_ANNOTATION} needs {TOPOLOGY_KEY_ANNOTATION} (the node label key of the level, such as topology.sovereign.ai/rack)"
    )]
    ModeWithoutKey,
    #[error(
        "annotation {TOPOLOGY_KEY_ANNOTATION} {value:?}: must be a node label key such as topology.sovereign.ai/rack"
    )]
    BadTopologyKey { value: String },
    #[error(
        "replicated jobs ask for different devices per pod ({}); a gang's pods are alike: give every pod that asks for devices the same number",
        .counts.iter().map(|(name, n)| format!("{name}: {n}")).collect::<Vec<_>>().join(", ")
    )]
    UnevenPods { counts: Vec<(String, i64)> },
    #[error("the JobSet has no replicatedJobs")]
    NoReplicatedJobs,
    #[error("not a JobSet: {0}")]
    NotAJobSet(String),
}

/// A fallback list that names a pool of another resource name than the pods ask for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "annotation {POOLS_ANNOTATION} {value:?}: pool {pool} gives {gives} but the pods ask for {asks}; a {kind}'s requests cannot change while it is held, so it falls back only between pools of one resource name: list only pools that give {asks}{}, or submit one {kind} per resource name (or a ModelProject, which falls back across resource names)",
    if .same.is_empty() { String::new() } else { format!(" (here: {})", .same.join(",")) }
)]
pub struct OtherResource {
    /// The annotation's pools, comma-joined.
    pub value: String,
    /// `Job` or `JobSet`.
    pub kind: &'static str,
    /// The first listed pool of another resource name, and its resource name.
    pub pool: String,
    pub gives: String,
    /// The resource name the pods ask for.
    pub asks: String,
    /// The listed pools of that resource name, in order.
    pub same: Vec<String>,
}

/// The part of a JobSet (jobset.x-k8s.io/v1alpha2) a gang is made of and its
/// admission reads: a typed view of our own (the JobSet module is Go), decoded
/// by the watch; the fields it does not name are not kept.
#[derive(kube::CustomResource, Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[kube(
    group = "jobset.x-k8s.io",
    version = "v1alpha2",
    kind = "JobSet",
    namespaced,
    status = "JobSetStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct JobSetSpec {
    #[serde(default)]
    pub replicated_jobs: Vec<ReplicatedJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedJob {
    pub name: String,
    /// Jobs made from the template (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    pub template: JobTemplateSpec,
}

/// Whether the JobSet finished (its `Completed` or `Failed` condition), and
/// how many of each replicated job's Jobs are ready.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobSetStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicated_jobs_status: Vec<ReplicatedJobStatus>,
}

/// Jobs of one replicated job, as the JobSet controller counts them.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedJobStatus {
    pub name: String,
    /// Jobs whose pods are all ready or done.
    #[serde(default)]
    pub ready: i32,
    /// Jobs that completed.
    #[serde(default)]
    pub succeeded: i32,
}

impl JobSet {
    /// A JobSet as the dynamic API returns it.
    pub fn from_dynamic(obj: &DynamicObject) -> Result<Self, WorkloadError> {
        let spec = obj.data.get("spec").cloned().ok_or_else(|| WorkloadError::NotAJobSet("no spec".into()))?;
        let spec = serde_json::from_value(spec).map_err(|e| WorkloadError::NotAJobSet(e.to_string()))?;
        let status = obj.data.get("status").cloned().map(serde_json::from_value).transpose();
        let status = status.map_err(|e| WorkloadError::NotAJobSet(e.to_string()))?;
        Ok(Self { metadata: obj.metadata.clone(), spec, status })
    }
}

/// A batch Job as a gang: all its pods at once (`parallelism == completions`),
/// each asking for the same devices. `None` when it does not carry the label.
pub fn read_job(job: &Job) -> Result<Option<WorkloadGang>, WorkloadError> {
    let Some(allocation) = job.labels().get(ALLOCATION_LABEL).cloned() else {
        return Ok(None);
    };
    let spec = job.spec.clone().unwrap_or_default();
    let (pods, per_pod) = job_pods("job", spec.parallelism, spec.completions, &spec.template)?;
    let members = vec![Members { name: "job".into(), pods, per_pod: per_pod.count }];
    gang(WorkloadKind::Job, &job.metadata, allocation, members, per_pod.resource.into_iter().collect()).map(Some)
}

/// A JobSet as a gang: every pod of every replicated job. `None` when it does
/// not carry the label.
pub fn read_jobset(jobset: &JobSet) -> Result<Option<WorkloadGang>, WorkloadError> {
    let Some(allocation) = jobset.metadata.labels.as_ref().and_then(|l| l.get(ALLOCATION_LABEL)).cloned() else {
        return Ok(None);
    };
    if jobset.spec.replicated_jobs.is_empty() {
        return Err(WorkloadError::NoReplicatedJobs);
    }
    let mut members = Vec::new();
    let mut resources = Vec::new();
    for rj in &jobset.spec.replicated_jobs {
        let what = format!("replicated job {}", rj.name);
        let replicas = rj.replicas.unwrap_or(1);
        if replicas < 1 {
            return Err(WorkloadError::NotPositive { what, field: "replicas", value: replicas });
        }
        let spec = rj.template.spec.clone().unwrap_or_default();
        let (pods, ask) = job_pods(&what, spec.parallelism, spec.completions, &spec.template)?;
        resources.extend(ask.resource);
        members.push(Members { name: rj.name.clone(), pods: pods * replicas as u32, per_pod: ask.count });
    }
    let counts: Vec<(String, i64)> =
        members.iter().filter(|m| m.per_pod > 0).map(|m| (m.name.clone(), m.per_pod)).collect();
    if counts.windows(2).any(|w| w[0].1 != w[1].1) {
        return Err(WorkloadError::UnevenPods { counts });
    }
    gang(WorkloadKind::JobSet, &jobset.metadata, allocation, members, resources).map(Some)
}

fn gang(
    kind: WorkloadKind,
    meta: &ObjectMeta,
    allocation: String,
    members: Vec<Members>,
    mut resources: Vec<String>,
) -> Result<WorkloadGang, WorkloadError> {
    resources.sort();
    resources.dedup();
    let resource = match resources.as_slice() {
        [] => return Err(WorkloadError::NoAccelerators),
        [one] => one.clone(),
        _ => return Err(WorkloadError::SeveralResources { what: "the workload".into(), resources }),
    };
    let empty = BTreeMap::new();
    let notes = meta.annotations.as_ref().unwrap_or(&empty);
    Ok(WorkloadGang {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        allocation,
        pools: pools(notes.get(POOLS_ANNOTATION))?,
        resource,
        members,
        topology: topology(notes.get(TOPOLOGY_KEY_ANNOTATION), notes.get(TOPOLOGY_MODE_ANNOTATION))?,
        priority: priority(notes.get(PRIORITY_ANNOTATION))?,
    })
}

impl WorkloadKind {
    /// The kind's name, as users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Job => "Job",
            WorkloadKind::JobSet => "JobSet",
        }
    }
}

/// The pools a gang may use, in order: those its annotation names, else
/// `granted` (its allocation's pools), keeping only pools of the resource its
/// pods ask for; pools `resource_of` does not know are left out (not created
/// yet). A named pool of another resource name is an error, not skipped: its
/// pods' requests cannot change while the workload is held (the API server
/// and the JobSet webhook refuse it), so such a fallback could never be
/// taken, and the chart's policy refuses the list at creation in the same words.
pub fn resolve_pools(
    w: &WorkloadGang,
    granted: &[String],
    resource_of: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, WorkloadError> {
    if let Some(p) = w.pools.iter().find(|p| resource_of(p).is_some_and(|r| r != w.resource)) {
        return Err(WorkloadError::OtherResource(Box::new(OtherResource {
            value: w.pools.join(","),
            kind: w.kind.as_str(),
            pool: p.clone(),
            gives: resource_of(p).unwrap_or_default(),
            asks: w.resource.clone(),
            same: w.pools.iter().filter(|q| resource_of(q).as_ref() == Some(&w.resource)).cloned().collect(),
        })));
    }
    let named = if w.pools.is_empty() { granted } else { &w.pools };
    let mut out: Vec<String> = Vec::with_capacity(named.len());
    for p in named {
        if resource_of(p).as_ref() == Some(&w.resource) && !out.contains(p) {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Pods of one Job (spec) and what each asks for.
fn job_pods(
    what: &str,
    parallelism: Option<i32>,
    completions: Option<i32>,
    template: &PodTemplateSpec,
) -> Result<(u32, Ask), WorkloadError> {
    let p = parallelism.unwrap_or(1);
    // Without completions a Job is a work queue: done when any pod succeeds.
    if completions != Some(p) && !(completions.is_none() && p == 1) {
        let completions = completions.map_or("unset".to_string(), |c| c.to_string());
        return Err(WorkloadError::ParallelismNotCompletions { what: what.into(), parallelism: p, completions });
    }
    if p < 1 {
        return Err(WorkloadError::NotPositive { what: what.into(), field: "parallelism", value: p });
    }
    Ok((p as u32, pod_ask(what, template)?))
}

/// The accelerator one pod asks for: resource name and devices (0 and no name
/// when it asks for none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ask {
    resource: Option<String>,
    count: i64,
}

/// An extended resource that is a device (not a `kubernetes.io/` name, not hugepages).
fn is_accelerator(resource: &str) -> bool {
    resource.split_once('/').is_some_and(|(domain, _)| domain != "kubernetes.io" && !domain.ends_with(".kubernetes.io"))
}

/// Devices per container, from requests, else limits (for an extended resource
/// a request defaults to the limit).
fn container_asks(what: &str, c: &Container) -> Result<BTreeMap<String, i64>, WorkloadError> {
    let res = c.resources.clone().unwrap_or_default();
    let mut all = res.limits.unwrap_or_default();
    all.extend(res.requests.unwrap_or_default());
    let mut out = BTreeMap::new();
    for (name, q) in all.into_iter().filter(|(name, _)| is_accelerator(name)) {
        let n: i64 = q.0.trim().parse().map_err(|_| WorkloadError::BadQuantity {
            what: what.into(),
            container: c.name.clone(),
            resource: name.clone(),
            value: q.0.clone(),
        })?;
        if n > 0 {
            out.insert(name, n);
        }
    }
    Ok(out)
}

/// What a pod asks for, as the scheduler counts it: the app containers and the
/// sidecars (init containers that keep running) together, or the largest plain
/// init container if that is more.
fn pod_ask(what: &str, template: &PodTemplateSpec) -> Result<Ask, WorkloadError> {
    let spec = template.spec.clone().unwrap_or_default();
    let mut running: BTreeMap<String, i64> = BTreeMap::new();
    let mut init_peak: BTreeMap<String, i64> = BTreeMap::new();
    let inits = spec.init_containers.unwrap_or_default();
    let sidecar = |c: &Container| c.restart_policy.as_deref() == Some("Always");
    for c in spec.containers.iter().chain(inits.iter().filter(|c| sidecar(c))) {
        for (r, n) in container_asks(what, c)? {
            *running.entry(r).or_default() += n;
        }
    }
    for c in inits.iter().filter(|c| !sidecar(c)) {
        for (r, n) in container_asks(what, c)? {
            let peak = init_peak.entry(r).or_default();
            *peak = (*peak).max(n);
        }
    }
    for (r, n) in init_peak {
        let total = running.entry(r).or_default();
        *total = (*total).max(n);
    }
    let mut names: Vec<String> = running.keys().cloned().collect();
    match names.len() {
        0 => Ok(Ask::default()),
        1 => {
            let resource = names.pop().expect("one name");
            Ok(Ask { count: running[&resource], resource: Some(resource) })
        }
        _ => Err(WorkloadError::SeveralResources { what: what.into(), resources: names }),
    }
}

/// A DNS subdomain (an AcceleratorPool name), at most 63 characters.
fn pool_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-' || *c == b'.')
}

fn pools(value: Option<&String>) -> Result<Vec<String>, WorkloadError> {
    let Some(value) = value else { return Ok(Vec::new()) };
    let bad = |reason: String| WorkloadError::BadPools { value: value.clone(), reason };
    let mut out: Vec<String> = Vec::new();
    for p in value.split(',').map(str::trim) {
        if !pool_name_ok(p) {
            return Err(bad(format!(
                "{p:?} is not a pool name (lowercase letters, digits, '-' and '.'); list pools comma-separated, for example \"h200,b200\""
            )));
        }
        if out.iter().any(|o| o == p) {
            return Err(bad(format!("pool {p} is listed twice")));
        }
        out.push(p.to_string());
    }
    if out.len() > MAX_POOLS {
        return Err(bad(format!("{} pools; at most {MAX_POOLS}", out.len())));
    }
    Ok(out)
}

fn priority(value: Option<&String>) -> Result<i32, WorkloadError> {
    let Some(value) = value else { return Ok(0) };
    value
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| (-1000..=1000).contains(p))
        .ok_or_else(|| WorkloadError::BadPriority { value: value.clone() })
}

/// A qualified label key: an optional DNS prefix and `/`, then a name of at
/// most 63 characters.
fn label_key_ok(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    name_ok && prefix.is_none_or(|p| p.len() <= 253 && pool_name_ok_long(p))
}

/// A DNS subdomain of any length up to 253.
fn pool_name_ok_long(p: &str) -> bool {
    p.split('.').all(|part| !part.is_empty() && part.len() <= 63 && pool_name_ok(part))
}

fn topology(key: Option<&String>, mode: Option<&String>) -> Result<Option<TopologyConstraint>, WorkloadError> {
    let mode = match mode.map(|m| m.trim()) {
        None => None,
        Some("Required") => Some(TopologyMode::Required),
        Some("Preferred") => Some(TopologyMode::Preferred),
        Some(other) => return Err(WorkloadError::BadTopologyMode { value: other.to_string() }),
    };
    match (key, mode) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(WorkloadError::ModeWithoutKey),
        (Some(key), mode) if label_key_ok(key.trim()) => {
            Ok(Some(TopologyConstraint { key: key.trim().to_string(), mode: mode.unwrap_or_default() }))
        }
        (Some(key), _) => Err(WorkloadError::BadTopologyKey { value: key.clone() }),
    }
}
