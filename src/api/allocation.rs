use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A GpuAllocation grants a tenant organisation accelerators in one or more pools,
/// optionally for a dated window and against an accelerator-hour budget. The
/// operator turns it into a ResourceQuota in each of the tenant's namespaces and,
/// for dedicated grants, into reserved nodes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sovereign.ai",
    version = "v1alpha1",
    kind = "GpuAllocation",
    doc = "A GpuAllocation grants a tenant organisation accelerators in pools, optionally for a dated window and against an accelerator-hour budget; the operator enforces it with namespace quotas and reserved nodes.",
    plural = "gpuallocations",
    shortname = "galloc",
    shortname = "gallocs",
    category = "sovereign",
    status = "GpuAllocationStatus",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant.displayName"),
    printcolumn(name = "Program", type_ = "string", json_path = ".spec.program", priority = 1),
    printcolumn(name = "Direct-Pods", type_ = "string", json_path = ".spec.tenant.directPods", priority = 1),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority", priority = 1),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Granted", type_ = "integer", json_path = ".status.granted"),
    printcolumn(name = "In-Use", type_ = "integer", json_path = ".status.inUse", priority = 1),
    printcolumn(name = "Share", type_ = "number", json_path = ".status.dominantShare", priority = 1),
    printcolumn(name = "Hours-Used", type_ = "number", json_path = ".status.acceleratorHoursUsed"),
    printcolumn(name = "Budget", type_ = "integer", json_path = ".spec.budget.acceleratorHours", priority = 1),
    printcolumn(name = "Domestic", type_ = "number", json_path = ".status.domesticShare.granted", priority = 1),
    printcolumn(name = "Start", type_ = "string", json_path = ".spec.window.start", priority = 1),
    printcolumn(name = "End", type_ = "string", json_path = ".spec.window.end", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name: a GpuAllocation name is at most 63 characters: it becomes the sovereign.ai/reserved-for label and taint of reserved nodes and the sovereign.ai/allocation label of worker pods")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuAllocationSpec {
    /// The tenant organisation that receives the grant.
    pub tenant: Tenant,

    /// Program the grant belongs to, for reporting (for example `world-best-llm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub program: Option<String>,

    /// Order in which grants are admitted when a pool is short: higher first, then
    /// older first.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// Dated period in which the grant is active. Before `start` it is Pending with
    /// zero quota; after `end` it is Expired and its quota and reservations are
    /// released. Without a window the grant is active from creation until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,

    /// Accelerators granted per pool. Each pool may appear once.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["pool".into()]))]
    pub grants: Vec<Grant>,

    /// Accelerator-hour budget over the whole grant: each running pod is charged
    /// wall hours x devices x the pool's `chargeFactor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,

    /// Least fraction (0 to 1) of the grant's accelerator-hours that should run on
    /// domestic pools. Reported in status; projects are steered toward domestic
    /// pools while the share is below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("minDomesticShare is a fraction between 0 and 1 (0.5 = half the grant on domestic pools)"))]
    pub min_domestic_share: Option<f64>,

    /// Lets the tenant mark training projects `preemptible: false`. Only an admin
    /// can set it, since such projects can hold the grant's capacity indefinitely.
    #[serde(default)]
    pub allow_non_preemptible: bool,

    /// What the worker pods of this allocation's projects may do beyond an
    /// ordinary unprivileged pod. Only an admin sets it: a tenant who may create
    /// ModelProjects gets pods created by the operator, so without it a project
    /// never reaches the node (no hostPath, no privileged container) and runs
    /// as the namespace's `default` ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_policy: Option<WorkloadPolicy>,
}

/// What an allocation's worker pods may do beyond an ordinary unprivileged pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPolicy {
    /// ServiceAccounts (of the tenant's namespaces) worker pods may run as, by
    /// name (`template.serviceAccountName`). `default` is always allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub service_accounts: Vec<String>,

    /// Allows node-level access in worker templates: volumes other than
    /// configMap, secret, emptyDir, persistentVolumeClaim, projected,
    /// downwardAPI, csi and ephemeral (hostPath above all), privileged
    /// containers, added capabilities other than NET_BIND_SERVICE, Unconfined
    /// seccomp or AppArmor profiles, SELinux options, an Unmasked /proc,
    /// sysctls and Windows host processes.
    #[serde(default)]
    pub allow_node_access: bool,
}

/// The tenant organisation of a grant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    /// Human-readable name of the organisation, for example `Upstage consortium`.
    #[schemars(length(min = 1, max = 128))]
    pub display_name: String,

    /// Namespaces whose pods consume this grant. Each gets an operator-managed
    /// ResourceQuota for the accelerators of every pool.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 63)))]
    #[x_kube(
        validation = Rule::new("self.all(ns, ns.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))").message("tenant.namespaces must be namespace names (lowercase DNS labels)"),
        merge_strategy = ListMerge::Set
    )]
    pub namespaces: Vec<String>,

    /// What becomes of accelerator pods created in these namespaces other than
    /// through admission (admitted: a ModelProject's workers, the pods of a Job,
    /// JobSet or TrainJob labelled `sovereign.ai/allocation` that the operator
    /// admitted). `Confined` (the default): allowed when their nodeSelector
    /// confines them to the namespace's one granted pool of their resource
    /// name, whose grant the namespace quota then bounds. `Refused`: refused,
    /// with the label that brings them in; every accelerator of the namespaces
    /// is then planned by the operator. A namespace listed by several allocations refuses such
    /// pods when any of them says `Refused` (its pods would draw on that
    /// allocation's quota too). Enforced by the chart's admission policy
    /// (`workloadPolicies.enabled`).
    #[serde(default)]
    pub direct_pods: DirectPods,
}

/// Whether tenants may create accelerator pods directly, outside admission.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum DirectPods {
    /// Allowed on the namespace's one granted pool of their resource name,
    /// confined to it by their nodeSelector.
    #[default]
    Confined,
    /// Refused: accelerators come only through admitted workloads.
    Refused,
}

/// A dated period. At least one end must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.start) || has(self.end)").message("window needs a start, an end, or both"),
    validation = Rule::new("!has(self.start) || !has(self.end) || timestamp(self.end) > timestamp(self.start)").message("window.end must be after window.start")
)]
pub struct Window {
    /// When the grant becomes active (RFC 3339, for example 2026-03-01T00:00:00Z).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Time>,
    /// When the grant expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Time>,
}

/// Capacity granted in one pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.borrowingLimit) || self.mode == 'Shared'").message("borrowingLimit applies only to Shared grants; a Dedicated grant owns whole nodes"))]
pub struct Grant {
    /// Name of the AcceleratorPool.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(pool_name_rule()).message("grants[].pool must be an AcceleratorPool name: lowercase letters, digits, '-' and '.', at most 63 characters"))]
    pub pool: String,

    /// Accelerators (devices of the pool's resourceName) granted. A Dedicated grant
    /// is rounded up to whole nodes.
    #[schemars(range(min = 1, max = 1000000))]
    pub accelerators: i64,

    /// Shared: a guaranteed share of the pool's unreserved nodes. Dedicated: whole
    /// nodes reserved (labelled and tainted) for this tenant only.
    #[serde(default)]
    pub mode: GrantMode,

    /// Accelerators the tenant may use beyond `accelerators` on idle capacity of
    /// this pool; such runs may be reclaimed when the owners need it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub borrowing_limit: Option<i64>,
}

/// CEL: `self` is a possible AcceleratorPool name.
pub(crate) fn pool_name_rule() -> String {
    format!("self.matches('{}')", super::validation::DNS_SUBDOMAIN)
}

/// How a grant holds its pool's capacity.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum GrantMode {
    /// A guaranteed share of the pool's unreserved nodes.
    #[default]
    Shared,
    /// Whole nodes reserved for this tenant.
    Dedicated,
}

/// An accelerator-hour budget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Accelerator-hours the grant may use in total (charge-factor weighted).
    #[schemars(range(min = 1))]
    pub accelerator_hours: i64,

    /// Admission: stop admitting new runs when the budget is used up. Hard: also
    /// stop running projects, gracefully, when it is used up.
    #[serde(default)]
    pub enforcement: BudgetEnforcement,
}

/// What happens when a budget is used up.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum BudgetEnforcement {
    /// Stop admitting new training runs.
    #[default]
    Admission,
    /// Stop admitting and stop running training runs.
    Hard,
}

/// Lifecycle of an allocation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum AllocationPhase {
    /// Not active yet: its window has not opened, or a pool is short of capacity.
    #[default]
    Pending,
    /// Quota and reservations are in force.
    Active,
    /// The accelerator-hour budget is used up: quota is zero and reservations are
    /// released until the budget is raised.
    Exhausted,
    /// The window has closed; quota and reservations are released.
    Expired,
}

/// Observed state of a GpuAllocation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuAllocationStatus {
    /// Pending, Active, Exhausted or Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AllocationPhase>,
    /// Accelerators granted and in force, over all pools.
    #[serde(default)]
    pub granted: i64,
    /// Accelerators requested by running pods in the tenant's namespaces.
    #[serde(default)]
    pub in_use: i64,
    /// Per-pool state of the grants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolGrantStatus>,
    /// The largest, over the granted pools, of accelerators held by admitted runs
    /// divided by the grant (above 1 when borrowing). Idle capacity beyond grants
    /// goes to the allocation with the smallest share first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dominant_share: Option<f64>,
    /// Accelerator-hours used so far (charge-factor weighted).
    #[serde(default)]
    pub accelerator_hours_used: f64,
    /// Accelerator-hours charged per hour at the last update (charge-weighted
    /// devices in use): the grant's burn rate.
    #[serde(default)]
    pub charge_rate: f64,
    /// The part of `chargeRate` on domestic pools.
    #[serde(default)]
    pub domestic_charge_rate: f64,
    /// When `acceleratorHoursUsed` was last brought up to date (to the second;
    /// `ledger.atMillis` is the exact time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_updated_at: Option<Time>,
    /// Accelerator-hours used on domestic pools (charge-factor weighted).
    #[serde(default)]
    pub domestic_accelerator_hours_used: f64,
    /// Accelerator-hours used per pool (charge-factor weighted); they sum to
    /// `acceleratorHoursUsed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool_hours: Vec<PoolHours>,
    /// Accelerator-hours used per workload and pool: each ModelProject (its
    /// worker pods), each labelled batch Job or JobSet the operator admits (its
    /// pods); the rest of `acceleratorHoursUsed` is tenants' own pods and
    /// deleted workloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub project_hours: Vec<ProjectHours>,
    /// The operator's books behind the figures above: what pods that are gone
    /// were charged, and the pods being charged now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<UsageLedger>,
    /// Domestic (sovereign-chip) share of the grant, of current use and of hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domestic_share: Option<DomesticShare>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Ready, WindowOpen, CapacityAvailable, WithinBudget,
    /// DomesticShareMet, NodesReserved, QuotaApplied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), transform = super::validation::conditions)]
    pub conditions: Vec<Condition>,
}

/// Accelerator-hours of one pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolHours {
    /// The AcceleratorPool.
    pub pool: String,
    /// Charge-factor weighted.
    pub accelerator_hours_used: f64,
}

/// Accelerator-hours of one workload (a ModelProject, or the batch Job or
/// JobSet that `kind` names) in one pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectHours {
    /// "namespace/name" of the workload.
    pub project: String,
    /// The workload's kind (`Job`, `JobSet`); absent for a ModelProject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The AcceleratorPool.
    pub pool: String,
    /// Charge-factor weighted.
    pub accelerator_hours_used: f64,
}

/// The accelerator-hour ledger of an allocation, exact to the millisecond:
/// every figure is a sum over pods of (end - start) x devices x chargeFactor.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageLedger {
    /// When the figures were computed, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub at_millis: i64,
    /// What pods that are gone were charged, in charge-weighted
    /// accelerator-milliseconds, by pool and project.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settled: Vec<SettledCharge>,
    /// UIDs of pods already in `settled` whose objects still exist (their
    /// finalizer is being released): never charged again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settled_pods: Vec<String>,
    /// The pods charged now, so that one that disappears while the operator
    /// is down is still charged once it is back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open: Vec<OpenCharge>,
}

/// Accelerator-milliseconds charged for pods that are gone.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SettledCharge {
    /// The AcceleratorPool the pods ran in.
    pub pool: String,
    /// "namespace/name" of the workload (a ModelProject unless `kind` says
    /// otherwise), for its pods while it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The workload's kind (`Job`, `JobSet`); absent for a ModelProject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Whether the pool is domestic.
    #[serde(default)]
    pub domestic: bool,
    /// Charge-weighted accelerator-milliseconds.
    pub millis: i64,
}

/// A pod being charged.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenCharge {
    /// The pod's UID.
    pub uid: String,
    /// The AcceleratorPool the pod runs in.
    pub pool: String,
    /// "namespace/name" of the workload (a ModelProject unless `kind` says
    /// otherwise), for its pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The workload's kind (`Job`, `JobSet`); absent for a ModelProject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Whether the pool is domestic.
    #[serde(default)]
    pub domestic: bool,
    /// Devices x the pool's chargeFactor.
    pub weight: f64,
    /// When the pod started, in milliseconds since the Unix epoch.
    pub start_millis: i64,
    /// When it ended, if its status says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_millis: Option<i64>,
}

/// Fractions (0 to 1) of accelerators on domestic pools.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomesticShare {
    /// Of the accelerators granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<f64>,
    /// Of the accelerators in use now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<f64>,
    /// Of the accelerator-hours used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<f64>,
}

/// State of one pool's grant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolGrantStatus {
    /// Name of the AcceleratorPool.
    pub pool: String,
    /// Shared or Dedicated.
    pub mode: GrantMode,
    /// Accelerators granted and in force in this pool (0 while Pending).
    #[serde(default)]
    pub granted: i64,
    /// Nodes reserved for a Dedicated grant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved_nodes: Vec<String>,
    /// Accelerators requested by the tenant's running pods in this pool.
    #[serde(default)]
    pub in_use: i64,
    /// Accelerators in use beyond the grant, on borrowed idle capacity.
    #[serde(default)]
    pub borrowed: i64,
}
