use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An AcceleratorPool is a set of nodes that carry one kind of accelerator
/// (for example the H200 nodes, or the Rebellions ATOM nodes). Admins grant
/// capacity per pool; training runs are placed in pools.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sovereign.ai",
    version = "v1alpha1",
    kind = "AcceleratorPool",
    doc = "An AcceleratorPool is a set of nodes with one kind of accelerator. Admins declare pools and grant capacity in them; training runs are placed in them.",
    plural = "acceleratorpools",
    shortname = "apool",
    shortname = "apools",
    category = "sovereign",
    status = "AcceleratorPoolStatus",
    printcolumn(name = "Resource", type_ = "string", json_path = ".spec.resourceName", priority = 1),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Domestic", type_ = "boolean", json_path = ".spec.domestic"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodes", priority = 1),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyNodes", priority = 1),
    printcolumn(name = "Allocatable", type_ = "integer", json_path = ".status.allocatable"),
    printcolumn(name = "Granted", type_ = "integer", json_path = ".status.granted"),
    printcolumn(name = "Reserved", type_ = "integer", json_path = ".status.reserved", priority = 1),
    printcolumn(name = "In-Use", type_ = "integer", json_path = ".status.inUse", priority = 1),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.free"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name: an AcceleratorPool name is at most 63 characters: it becomes the sovereign.ai/pool label value of the worker pods placed in it")
)]
#[serde(rename_all = "camelCase")]
pub struct AcceleratorPoolSpec {
    /// Extended resource name the nodes' device plugin advertises and pods request,
    /// for example `nvidia.com/gpu`, `rebellions.ai/ATOM` or `furiosa.ai/rngd`.
    #[schemars(length(min = 3, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?\\\\.)+[a-z]{2,}/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$')").message("resourceName must be a vendor extended resource such as nvidia.com/gpu or rebellions.ai/ATOM (domain/name)"))]
    pub resource_name: String,

    /// Accelerator class: GPU or NPU.
    pub kind: AcceleratorKind,

    /// Vendor of the accelerator, for example NVIDIA, Rebellions or FuriosaAI.
    #[schemars(length(min = 1, max = 63))]
    pub vendor: String,

    /// Accelerator model, for example H200, B200, ATOM or RNGD.
    #[schemars(length(min = 1, max = 63))]
    pub model: String,

    /// Whether this accelerator counts toward the domestic (sovereign) chip share
    /// reported for allocations and the center.
    #[serde(default)]
    pub domestic: bool,

    /// Label selector of the pool's nodes. It must select something: an empty
    /// selector would take every node of the cluster. A node selected by two pools
    /// is counted in the oldest of them only; the newer ones report the conflict.
    #[schemars(transform = super::validation::label_selector)]
    #[x_kube(validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)").message("nodeSelector must have at least one matchLabels entry or matchExpressions term; an empty selector would select every node"))]
    pub node_selector: LabelSelector,

    /// Node label keys that describe the network topology, coarse to fine (for
    /// example block, rack), ending with `kubernetes.io/hostname`. Training gangs
    /// are packed into as few domains of these levels as possible.
    #[serde(default = "default_topology_keys")]
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 317)), transform = super::validation::label_keys)]
    #[x_kube(
        validation = Rule::new("self[size(self) - 1] == 'kubernetes.io/hostname'").message("topologyKeys must end with kubernetes.io/hostname (list levels coarse to fine)"),
        merge_strategy = ListMerge::Set
    )]
    pub topology_keys: Vec<String>,

    /// Tolerations for the taints of this pool's nodes; the operator adds them to
    /// the training pods it places here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), transform = super::validation::tolerations)]
    pub tolerations: Vec<Toleration>,

    /// Weight of one device-hour in this pool when charging budgets (1 = one
    /// accelerator-hour). Newer or larger devices usually cost more.
    #[serde(default = "default_charge_factor")]
    #[schemars(range(min = 0.01, max = 1000.0))]
    // The API server skips `minimum` for whole-number input such as 0; CEL does not.
    #[x_kube(validation = Rule::new("self >= 0.01 && self <= 1000.0").message("chargeFactor must be between 0.01 and 1000 (1 = one accelerator-hour per device-hour)"))]
    pub charge_factor: f64,
}

fn default_topology_keys() -> Vec<String> {
    vec![super::HOSTNAME_KEY.to_string()]
}

fn default_charge_factor() -> f64 {
    1.0
}

/// Accelerator class.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AcceleratorKind {
    /// A graphics processing unit (NVIDIA, AMD, ...).
    #[serde(rename = "GPU")]
    Gpu,
    /// A neural processing unit (Rebellions, FuriosaAI, ...).
    #[serde(rename = "NPU")]
    Npu,
}

/// Observed state of an AcceleratorPool. Counts are in devices of `resourceName`
/// unless they say nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceleratorPoolStatus {
    /// Nodes the selector matches, without those an older pool counts.
    #[serde(default)]
    pub nodes: i32,
    /// Matched nodes that are Ready and schedulable.
    #[serde(default)]
    pub ready_nodes: i32,
    /// Sum of the nodes' capacity of `resourceName`.
    #[serde(default)]
    pub capacity: i64,
    /// Sum of allocatable `resourceName` on Ready nodes: what grants can take.
    #[serde(default)]
    pub allocatable: i64,
    /// Devices held by active grants in this pool (dedicated grants count whole nodes).
    #[serde(default)]
    pub granted: i64,
    /// Devices on nodes reserved by dedicated grants.
    #[serde(default)]
    pub reserved: i64,
    /// Nodes reserved by dedicated grants.
    #[serde(default)]
    pub reserved_nodes: i32,
    /// Devices requested by running pods on the pool's nodes.
    #[serde(default)]
    pub in_use: i64,
    /// Allocatable devices no active grant holds: what a new grant can get.
    #[serde(default)]
    pub free: i64,
    /// Names of nodes this pool selects that an older pool also selects and
    /// counts (at most 20 listed): a new pool never takes nodes from another.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicting_nodes: Vec<String>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Ready (nodes found, no conflict), NodeConflict, Overcommitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), transform = super::validation::conditions)]
    pub conditions: Vec<Condition>,
}
