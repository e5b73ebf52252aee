use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvFromSource, EnvVar, LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A ModelProject is one distributed training run: `workers` pods with
/// `acceleratorsPerWorker` devices each, admitted all at once against the
/// namespace's GpuAllocation and placed in the first pool of `placement.pools`
/// where the whole gang fits.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sovereign.ai",
    version = "v1alpha1",
    kind = "ModelProject",
    doc = "A ModelProject is one distributed training run: a gang of workers admitted all at once against a GpuAllocation and placed in the first pool of its preference list where it fits.",
    plural = "modelprojects",
    namespaced,
    shortname = "mproj",
    shortname = "mprojs",
    category = "sovereign",
    status = "ModelProjectStatus",
    printcolumn(name = "Allocation", type_ = "string", json_path = ".spec.allocation"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".status.pool"),
    printcolumn(name = "Workers", type_ = "integer", json_path = ".spec.workers"),
    printcolumn(name = "Per-Worker", type_ = "integer", json_path = ".spec.acceleratorsPerWorker", priority = 1),
    printcolumn(name = "Running", type_ = "integer", json_path = ".status.workerStates.running"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts", priority = 1),
    printcolumn(name = "Preempted", type_ = "integer", json_path = ".status.preemptions", priority = 1),
    printcolumn(name = "Borrowed", type_ = "boolean", json_path = ".status.borrowed", priority = 1),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.queuePosition", priority = 1),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(project_name_rule()).message(PROJECT_NAME_MESSAGE)
)]
#[x_kube(validation = Rule::new("self.allocation == oldSelf.allocation").message("allocation is immutable; create a new ModelProject to run against another allocation"))]
#[serde(rename_all = "camelCase")]
pub struct ModelProjectSpec {
    /// Name of the GpuAllocation to charge. It must list this namespace in
    /// `tenant.namespaces`.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(super::allocation::pool_name_rule()).message("allocation must be a GpuAllocation name: lowercase letters, digits, '-' and '.', at most 63 characters"))]
    pub allocation: String,

    /// Where the gang may run.
    pub placement: Placement,

    /// Number of worker pods (nodes) in the gang.
    #[schemars(range(min = 1, max = 4096))]
    pub workers: i32,

    /// Accelerators each worker gets, of the chosen pool's resourceName. The
    /// operator sets requests and limits; do not request accelerators in `template`.
    #[schemars(range(min = 1, max = 64))]
    pub accelerators_per_worker: i32,

    /// Order inside the allocation's queue (higher first) and for preemption of
    /// lower-priority projects of the same allocation.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// Whether higher-priority projects (and reclaim of borrowed capacity) may
    /// stop this run. `false` requires the allocation's `allowNonPreemptible`.
    #[serde(default = "default_true")]
    pub preemptible: bool,

    /// The worker pod: image, command, environment and volumes. The operator adds
    /// accelerator resources, tolerations, node placement and the torchrun
    /// environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, ...).
    pub template: WorkerTemplate,

    /// Restarts, deadline, suspension and clean-up of the run.
    #[serde(default)]
    pub run_policy: RunPolicy,
}

/// Longest ModelProject name: its pods are `<name>-worker-<i>` with `i` up to
/// 4095 (`workers` is at most 4096), and a pod hostname is at most 63 characters.
pub const MAX_PROJECT_NAME: usize = 63 - "-worker-4095".len();

const PROJECT_NAME_MESSAGE: &str = "metadata.name: a ModelProject name must be a DNS-1035 label of at most 51 characters (lowercase letters, digits and '-', starting with a letter, ending with a letter or digit): it names the worker pods <name>-worker-<i>, whose hostnames are at most 63 characters";

fn project_name_rule() -> String {
    format!(
        "size(self.metadata.name) <= {MAX_PROJECT_NAME} && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    )
}

fn default_true() -> bool {
    true
}

/// Candidate pools and topology of a gang.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// AcceleratorPool names in order of preference, for example a domestic NPU
    /// pool first and a GPU pool as fallback. The gang is placed whole in the first
    /// pool where the allocation's grant and free devices allow.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 63)))]
    #[x_kube(
        validation = Rule::new(format!("self.all(p, p.matches('{}'))", super::validation::DNS_SUBDOMAIN)).message("placement.pools must be AcceleratorPool names: lowercase letters, digits, '-' and '.', at most 63 characters"),
        merge_strategy = ListMerge::Set
    )]
    pub pools: Vec<String>,

    /// Keep the gang inside one domain of a topology level (one rack, one block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologyConstraint>,
}

/// Topology constraint of a gang.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologyConstraint {
    /// Node label key of the level, one of the pool's `topologyKeys` (for example
    /// `topology.sovereign.ai/rack`).
    #[schemars(length(min = 1, max = 317), transform = super::validation::label_key)]
    pub key: String,

    /// Required: admit only when the whole gang fits in one domain of `key`.
    /// Preferred: pack as tightly as possible but admit across domains.
    #[serde(default)]
    pub mode: TopologyMode,
}

/// Strength of a topology constraint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum TopologyMode {
    /// Pack as tightly as possible; spread if it must.
    #[default]
    Preferred,
    /// Never spread beyond one domain.
    Required,
}

/// The user's part of a worker pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && self.volumes.exists(v, v.name == m.name))").message("every template.volumeMounts[].name must name one of template.volumes"))]
pub struct WorkerTemplate {
    /// Labels added to every worker pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = super::validation::pod_labels)]
    pub labels: BTreeMap<String, String>,

    /// Annotations added to every worker pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = super::validation::pod_annotations)]
    pub annotations: BTreeMap<String, String>,

    /// Container image of the trainer.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// Image pull policy: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,

    /// Entrypoint (for example `["torchrun"]`); the image's if empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,

    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,

    /// Working directory of the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,

    /// Environment variables. Your values win over the torchrun variables the
    /// operator sets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = super::validation::env)]
    pub env: Vec<EnvVar>,

    /// Environment from ConfigMaps and Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,

    /// CPU, memory and other non-accelerator resources of the trainer. Accelerators
    /// come from `acceleratorsPerWorker` and the chosen pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = super::validation::resources)]
    #[x_kube(validation = Rule::new("(!has(self.requests) || self.requests.all(k, !k.contains('/'))) && (!has(self.limits) || self.limits.all(k, !k.contains('/')))").message("template.resources must not name accelerators (extended resources like nvidia.com/gpu): the operator adds them from acceleratorsPerWorker and the chosen pool"))]
    pub resources: Option<ResourceRequirements>,

    /// Volumes of the worker pod (datasets, checkpoints, shared memory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), transform = super::validation::volumes)]
    pub volumes: Vec<Volume>,

    /// Where the trainer mounts `volumes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), transform = super::validation::volume_mounts)]
    pub volume_mounts: Vec<VolumeMount>,

    /// ServiceAccount the worker pods run as: `default`, or one the
    /// allocation's `workloadPolicy.serviceAccounts` lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(format!("self.matches('{}')", super::validation::DNS_SUBDOMAIN)).message("template.serviceAccountName must be a ServiceAccount name: lowercase letters, digits, '-' and '.'"))]
    pub service_account_name: Option<String>,

    /// Security context of the worker pods (for example runAsNonRoot and a
    /// RuntimeDefault seccomp profile, as Pod Security `restricted` requires).
    /// Node-level settings (sysctls, SELinux options, Unconfined profiles) need
    /// the allocation's `workloadPolicy.allowNodeAccess`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,

    /// Security context of the trainer container (for example
    /// allowPrivilegeEscalation: false and capabilities drop [ALL]). privileged,
    /// added capabilities other than NET_BIND_SERVICE and the other node-level
    /// settings need the allocation's
    /// `workloadPolicy.allowNodeAccess`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,

    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Seconds a worker gets to checkpoint and exit after it is asked to stop
    /// (preemption, suspension, expiry). Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub termination_grace_period_seconds: Option<i64>,

    /// PriorityClass of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(format!("self.matches('{}')", super::validation::DNS_SUBDOMAIN)).message("template.priorityClassName must be a PriorityClass name: lowercase letters, digits, '-' and '.'"))]
    pub priority_class_name: Option<String>,
}

/// How a run is driven to its end.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Times the whole gang is restarted after a worker fails before the project
    /// is Failed. Losses to node failure or eviction do not count.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: i32,

    /// Seconds the run may take from its first start, restarts included, before it
    /// is Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds an admitted gang may wait for all its pods to be bound to nodes
    /// before it goes back to the queue (so a half-placed gang never holds capacity).
    #[serde(default = "default_scheduling_timeout")]
    #[schemars(range(min = 10, max = 86400))]
    pub scheduling_timeout_seconds: i32,

    /// Stop the run (delete its pods, release its share of the grant) until set back
    /// to false, when it is queued again.
    #[serde(default)]
    pub suspend: bool,

    /// Seconds after Succeeded or Failed when the project is deleted. Kept forever
    /// if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,

    /// Port of the rendezvous on worker 0 (MASTER_PORT).
    #[serde(default = "default_master_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub master_port: i32,
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            max_restarts: default_max_restarts(),
            active_deadline_seconds: None,
            scheduling_timeout_seconds: default_scheduling_timeout(),
            suspend: false,
            ttl_seconds_after_finished: None,
            master_port: default_master_port(),
        }
    }
}

fn default_max_restarts() -> i32 {
    3
}
fn default_scheduling_timeout() -> i32 {
    300
}
fn default_master_port() -> i32 {
    23456
}

/// Lifecycle of a training run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ProjectPhase {
    /// Waiting for admission; the Queued condition says why in numbers.
    #[default]
    Queued,
    /// Admitted to a pool; pods are being created and bound.
    Admitted,
    /// Every worker runs.
    Running,
    /// A worker failed or was lost; the gang is being recreated.
    Restarting,
    /// Stopped by `runPolicy.suspend`.
    Suspended,
    /// All workers succeeded.
    Succeeded,
    /// Out of restarts, past its deadline, or stopped for good.
    Failed,
    /// The API server refused the gang's pods or Service for a reason that does
    /// not heal by itself (invalid, a missing reference, Pod Security): workers
    /// stopped, devices given back, until the spec changes (condition
    /// WorkersCreated says what the API server said).
    Blocked,
}

/// Observed state of a ModelProject.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelProjectStatus {
    /// Queued, Admitted, Running, Restarting, Suspended, Succeeded, Failed or Blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProjectPhase>,
    /// Pool the gang was placed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Nodes chosen for workers 0..n-1, in worker order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Whether the run uses capacity borrowed beyond the allocation's grant.
    #[serde(default)]
    pub borrowed: bool,
    /// Worker pods by state.
    #[serde(default)]
    pub worker_states: WorkerStates,
    /// Gang restarts after worker failures (counted against maxRestarts).
    #[serde(default)]
    pub restarts: i32,
    /// Gang restarts after node loss or eviction (not counted against maxRestarts).
    #[serde(default)]
    pub disruptions: i32,
    /// Times the run was preempted (or its borrowed capacity reclaimed) back to
    /// the queue; never counted against maxRestarts.
    #[serde(default)]
    pub preemptions: i32,
    /// Runs ("namespace/name") stopped to make room for this one, while it waits
    /// for them and after it is admitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preempted: Vec<String>,
    /// Neither preempted nor reclaimed before this time: a run admitted by
    /// preempting others keeps its place for the operator's minimum run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_until: Option<Time>,
    /// 1-based position in the allocation's queue while Queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<i32>,
    /// Not admitted again before this time (backoff after a gang could not be
    /// placed in time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Time>,
    /// When the project was last admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_at: Option<Time>,
    /// When all workers first ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the project Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Queued, Admitted, Running, Finished, Valid, Preempted,
    /// WorkersCreated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), transform = super::validation::conditions)]
    pub conditions: Vec<Condition>,
    /// Accelerator-hours the run's worker pods used, by pool, from its
    /// allocation's ledger.
    // Written by the allocation reconciler alone, under its own field manager:
    // never serialized with the rest of the status, so that the project's own
    // status writes leave it alone.
    #[serde(default, skip_serializing)]
    pub usage: Option<ProjectUsage>,
}

/// Accelerator-hours of a run, charge-factor weighted, as of `atMillis`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectUsage {
    /// Charge-weighted accelerator-hours of the run's worker pods.
    #[serde(default)]
    pub accelerator_hours_used: f64,
    /// Per pool; they sum to `acceleratorHoursUsed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<crate::api::PoolHours>,
    /// Charge-weighted devices of the run's running workers.
    #[serde(default)]
    pub charge_rate: f64,
    /// When the figures were computed, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub at_millis: i64,
}

/// Worker pods by state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStates {
    /// Created but not running yet.
    #[serde(default)]
    pub pending: i32,
    /// Running.
    #[serde(default)]
    pub running: i32,
    /// Exited successfully.
    #[serde(default)]
    pub succeeded: i32,
    /// Exited with an error.
    #[serde(default)]
    pub failed: i32,
}

/// Phases whose gang holds its devices.
pub fn holds_devices(phase: Option<ProjectPhase>) -> bool {
    matches!(phase, Some(ProjectPhase::Admitted | ProjectPhase::Running))
}

/// Back to admission: the gang holds nothing until admitted again.
pub fn requeue_gang(status: &mut ModelProjectStatus, phase: ProjectPhase) {
    status.phase = Some(phase);
    status.pool = None;
    status.nodes.clear();
    status.borrowed = false;
    status.preempted.clear();
    status.protected_until = None;
}
