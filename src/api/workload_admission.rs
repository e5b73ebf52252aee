use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// Printer columns cannot be added to the built-in Job kind nor to the CRDs of
// other projects (JobSet, TrainJob): the operator keeps this read-only kind,
// one object per labelled workload, in its namespace and owned by it.

/// Which workload the line is about.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sovereign.ai",
    version = "v1alpha1",
    kind = "WorkloadAdmission",
    doc = "A WorkloadAdmission is the sovereign operator's read-only line about one labelled Job or JobSet (a TrainJob's: its JobSet): queued and why, admitted or running and where, preempted, suspended by its grant, finished, or invalid. Written by the operator only; deleted with the workload.",
    plural = "workloadadmissions",
    namespaced,
    shortname = "wla",
    shortname = "wlas",
    category = "sovereign",
    status = "WorkloadAdmissionStatus",
    printcolumn(name = "Kind", type_ = "string", json_path = ".spec.workload.kind"),
    printcolumn(name = "Workload", type_ = "string", json_path = ".spec.workload.name"),
    printcolumn(name = "Allocation", type_ = "string", json_path = ".spec.allocation"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".status.pool"),
    printcolumn(name = "Devices", type_ = "integer", json_path = ".status.devices"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.pods", priority = 1),
    printcolumn(name = "Nodes", type_ = "string", json_path = ".status.nodes", priority = 1),
    printcolumn(name = "Borrowed", type_ = "boolean", json_path = ".status.borrowed", priority = 1),
    printcolumn(name = "Position", type_ = "integer", json_path = ".status.queuePosition"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message")
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadAdmissionSpec {
    /// The workload this line is about (its owner).
    pub workload: WorkloadRef,
    /// The GpuAllocation its `sovereign.ai/allocation` label names.
    #[schemars(length(max = 253))]
    pub allocation: String,
}

/// A labelled workload in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// Job (batch/v1) or JobSet (jobset.x-k8s.io/v1alpha2).
    pub kind: WorkloadRefKind,
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The kinds of workload the operator admits.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum WorkloadRefKind {
    Job,
    JobSet,
}

/// Where a labelled workload stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum WorkloadState {
    /// Held, waiting for admission: `reason` is Waiting (no room now),
    /// Preempting (it chose victims and waits for them to stop) or
    /// Unsatisfiable (it can never fit as the pools and its grant are);
    /// `message` says where it falls short, in numbers.
    #[default]
    Queued,
    /// Admitted to `pool`: unsuspended, its pods starting.
    Admitted,
    /// Admitted, and every pod runs.
    Running,
    /// Stopped for another run (`reason` Preempted, or Reclaimed when it ran
    /// on borrowed capacity) and held again until it is admitted again.
    Preempted,
    /// Held or stopped because its allocation is not in force (a window not
    /// open, a budget used up, a grant not yet active).
    Suspended,
    /// Completed (`reason` Succeeded) or Failed.
    Finished,
    /// It cannot be one gang, or runs outside admission: `message` says what to change.
    Invalid,
}

/// The line: state, where it runs or why it waits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadAdmissionStatus {
    /// Queued, Admitted, Running, Preempted, Suspended, Finished or Invalid.
    pub state: WorkloadState,
    /// A CamelCase word: Waiting, Preempting, Unsatisfiable, Preempted,
    /// Reclaimed, AllocationInactive, Borrowed, Succeeded, Failed, NotAGang,
    /// NotHeld.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why it waits, in numbers, or where it was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The pool it runs in (or ran in, once finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The nodes planned for its pods, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Whether it runs on capacity borrowed beyond its allocation's grant.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub borrowed: bool,
    /// Accelerators of the whole gang.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<i64>,
    /// Pods of the whole gang.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<i64>,
    /// 1-based position in its allocation's queue while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<i32>,
    /// While Preempted: who stopped it and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemption: Option<String>,
}
