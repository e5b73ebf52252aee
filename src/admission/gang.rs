//! A gang as the admission core sees it: a workload of N pods x M devices that
//! is admitted whole or not at all, whatever kind of object it came from.

use std::fmt;

use k8s_openapi::jiff::Timestamp;

pub use crate::planner::request::TopologyRequest;

/// The kind of object a gang comes from (each kind has its adapter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GangKind {
    ModelProject,
    /// A batch Job labelled `sovereign.ai/allocation` ([`super::job`]).
    Job,
    /// A JobSet labelled `sovereign.ai/allocation` (its own, or made by a
    /// Kubeflow TrainJob): every pod of every replicated job ([`super::job`]).
    JobSet,
}

/// Which object a gang is: its kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GangKey {
    pub kind: GangKind,
    pub namespace: String,
    pub name: String,
}

impl GangKey {
    pub fn model_project(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { kind: GangKind::ModelProject, namespace: namespace.into(), name: name.into() }
    }

    pub fn job(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { kind: GangKind::Job, namespace: namespace.into(), name: name.into() }
    }

    pub fn jobset(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { kind: GangKind::JobSet, namespace: namespace.into(), name: name.into() }
    }
}

/// How a gang is named in reasons and Events: "namespace/name" for the
/// operator's own kind, "Job namespace/name" for a batch Job, "JobSet
/// namespace/name" for a JobSet.
impl fmt::Display for GangKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            GangKind::ModelProject => write!(f, "{}/{}", self.namespace, self.name),
            GangKind::Job => write!(f, "Job {}/{}", self.namespace, self.name),
            GangKind::JobSet => write!(f, "JobSet {}/{}", self.namespace, self.name),
        }
    }
}

/// A gang that takes part in admission: one that waits for devices or holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct Gang {
    pub key: GangKey,
    pub allocation: String,
    /// Pools in order of preference.
    pub pools: Vec<String>,
    pub workers: u32,
    /// Devices per worker, of the chosen pool's resource.
    pub per_worker: i64,
    pub topology: Option<TopologyRequest>,
    pub priority: i32,
    /// May borrow (and so be reclaimed) and be preempted.
    pub preemptible: bool,
    /// When it joined the queue (its order among equal priorities).
    pub queued_since: Timestamp,
    pub state: GangState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum GangState {
    /// Wants admission. `restarting`: it ran and stopped, and goes ahead of
    /// fresh gangs. `displaced`: it chose victims, so once admitted it is
    /// protected from being preempted back for the minimum run time.
    Waiting { restarting: bool, displaced: bool },
    /// Holds devices: admitted, starting or running.
    Holding(Holding),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Holding {
    pub pool: String,
    /// The node of each worker.
    pub nodes: Vec<String>,
    /// Admitted beyond its allocation's grant, on lent capacity.
    pub borrowed: bool,
    pub admitted_at: Option<Timestamp>,
    /// Neither preempted nor reclaimed before this time.
    pub protected_until: Option<Timestamp>,
}

impl Gang {
    pub fn devices(&self) -> i64 {
        i64::from(self.workers) * self.per_worker
    }

    pub fn holding(&self) -> Option<&Holding> {
        match &self.state {
            GangState::Holding(h) => Some(h),
            GangState::Waiting { .. } => None,
        }
    }
}
