//! The bad-input corpus: every row is an object a user might apply and the
//! words of the API server's refusal, which name the field (and, for our CEL
//! rules, the limit). Apply is a synchronous refusal, so all rows run in one
//! test; after them a valid project is still admitted and runs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use sovereign_e2e::Env;
use sovereign_operator::api::ProjectPhase;

use crate::projects::{project_yaml, wait_project, with_grant};

const GOOD_POOL: &str = "resourceName: nvidia.com/gpu\n  kind: GPU\n  vendor: NVIDIA\n  model: H200";
const SELECTOR: &str = "nodeSelector: {matchLabels: {a: b}}";
const TENANT: &str = "tenant: {displayName: T, namespaces: [team-a]}";
const GRANTS: &str = "grants: [{pool: h200, accelerators: 8}]";
const GANG: &str = "allocation: a\n  placement: {pools: [h200]}\n  workers: 1\n  acceleratorsPerWorker: 8";
const TEMPLATE: &str = "template: {image: trainer:1}";

fn pool_named(name: &str, spec: &str) -> String {
    format!("apiVersion: sovereign.ai/v1alpha1\nkind: AcceleratorPool\nmetadata: {{name: {name}}}\nspec:\n  {spec}\n")
}

fn pool(spec: &str) -> String {
    pool_named("e2e-bad", spec)
}

/// A good pool with this node selector.
fn selector(sel: &str) -> String {
    pool(&format!("{GOOD_POOL}\n  nodeSelector: {sel}"))
}

/// A good pool with this one toleration.
fn toleration(t: &str) -> String {
    pool(&format!("{GOOD_POOL}\n  {SELECTOR}\n  tolerations: [{t}]"))
}

fn alloc_named(name: &str, spec: &str) -> String {
    format!("apiVersion: sovereign.ai/v1alpha1\nkind: GpuAllocation\nmetadata: {{name: {name}}}\nspec:\n  {spec}\n")
}

fn alloc(spec: &str) -> String {
    alloc_named("e2e-bad", spec)
}

/// A good allocation with these grants.
fn grants(g: &str) -> String {
    alloc(&format!("{TENANT}\n  grants: {g}"))
}

/// A good allocation with one more field.
fn alloc_with(extra: &str) -> String {
    alloc(&format!("{TENANT}\n  {GRANTS}\n  {extra}"))
}

fn project_named(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: sovereign.ai/v1alpha1\nkind: ModelProject\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  {spec}\n"
    )
}

fn project(spec: &str) -> String {
    project_named("e2e-bad", spec)
}

/// A good project with this gang part (allocation, placement, sizes).
fn gang(g: &str) -> String {
    project(&format!("{g}\n  {TEMPLATE}"))
}

/// A good project with one more spec field.
fn project_with(extra: &str) -> String {
    project(&format!("{GANG}\n  {TEMPLATE}\n  {extra}"))
}

/// A good project with this worker template (flow-style YAML map body).
fn template(t: &str) -> String {
    project(&format!("{GANG}\n  template: {{image: trainer:1, {t}}}"))
}

/// The apply-time rows: what, object, expected words of the refusal.
fn rows() -> Vec<(&'static str, String, &'static str)> {
    let long = |n: usize| "a".repeat(n);
    vec![
        // Names that become label values, hostnames and Service names.
        (
            "pool name of 64 characters",
            pool_named(&long(64), &format!("{GOOD_POOL}\n  {SELECTOR}")),
            "an AcceleratorPool name is at most 63 characters",
        ),
        (
            "allocation name of 70 characters",
            alloc_named(&long(70), &format!("{TENANT}\n  {GRANTS}")),
            "a GpuAllocation name is at most 63 characters",
        ),
        (
            "project name of 52 characters",
            project_named(&long(52), &format!("{GANG}\n  {TEMPLATE}")),
            "a ModelProject name must be a DNS-1035 label of at most 51 characters",
        ),
        (
            "project name with a dot",
            project_named("llm.v2", &format!("{GANG}\n  {TEMPLATE}")),
            "a ModelProject name must be a DNS-1035 label",
        ),
        (
            "project name starting with a digit",
            project_named("7b-run", &format!("{GANG}\n  {TEMPLATE}")),
            "a ModelProject name must be a DNS-1035 label",
        ),
        (
            "project name in uppercase",
            project_named("Llama", &format!("{GANG}\n  {TEMPLATE}")),
            "metadata.name: Invalid value: \"Llama\"",
        ),
        (
            "allocation name in uppercase",
            alloc_named("Team-A", &format!("{TENANT}\n  {GRANTS}")),
            "metadata.name: Invalid value: \"Team-A\"",
        ),
        // AcceleratorPool fields.
        (
            "topology not ending at hostname",
            pool(&format!("{GOOD_POOL}\n  {SELECTOR}\n  topologyKeys: [rack]")),
            "topologyKeys must end with kubernetes.io/hostname",
        ),
        (
            "topology key that is no label key",
            pool(&format!("{GOOD_POOL}\n  {SELECTOR}\n  topologyKeys: [my rack, kubernetes.io/hostname]")),
            "topologyKeys must be label keys",
        ),
        (
            "duplicate topology key",
            pool(&format!(
                "{GOOD_POOL}\n  {SELECTOR}\n  topologyKeys: [kubernetes.io/hostname, kubernetes.io/hostname]"
            )),
            "Duplicate value",
        ),
        ("empty node selector", selector("{}"), "nodeSelector must have at least one"),
        (
            "resource without a domain",
            pool(&format!("resourceName: gpu\n  kind: GPU\n  vendor: Acme\n  model: M\n  {SELECTOR}")),
            "resourceName must be a vendor extended resource",
        ),
        (
            "unknown kind",
            pool(&format!("resourceName: google.com/tpu\n  kind: TPU\n  vendor: G\n  model: v5\n  {SELECTOR}")),
            "spec.kind: Unsupported value: \"TPU\"",
        ),
        (
            "empty vendor",
            pool(&format!("resourceName: nvidia.com/gpu\n  kind: GPU\n  vendor: \"\"\n  model: H200\n  {SELECTOR}")),
            "spec.vendor in body should be at least 1 chars long",
        ),
        (
            "zero charge factor",
            pool(&format!("{GOOD_POOL}\n  {SELECTOR}\n  chargeFactor: 0")),
            "chargeFactor must be between 0.01 and 1000",
        ),
        (
            "charge factor above 1000",
            pool(&format!("{GOOD_POOL}\n  {SELECTOR}\n  chargeFactor: 5000")),
            "chargeFactor must be between 0.01 and 1000",
        ),
        // Label selectors, as the API server validates them.
        (
            "selector operator that does not exist",
            selector("{matchExpressions: [{key: a, operator: Equals, values: [b]}]}"),
            "spec.nodeSelector.matchExpressions[0].operator: Unsupported value: \"Equals\"",
        ),
        (
            "selector In without values",
            selector("{matchExpressions: [{key: a, operator: In}]}"),
            "matchExpressions with operator In or NotIn need at least one value",
        ),
        (
            "selector NotIn with an empty value list",
            selector("{matchExpressions: [{key: a, operator: NotIn, values: []}]}"),
            "matchExpressions with operator In or NotIn need at least one value",
        ),
        (
            "selector Exists with values",
            selector("{matchExpressions: [{key: a, operator: Exists, values: [b]}]}"),
            "matchExpressions with operator Exists or DoesNotExist must have no values",
        ),
        (
            "selector key that is no label key",
            selector("{matchExpressions: [{key: \"bad key!\", operator: Exists}]}"),
            "matchExpressions key must be a label key",
        ),
        (
            "selector value that is no label value",
            selector("{matchExpressions: [{key: a, operator: In, values: [\"-x\"]}]}"),
            "matchExpressions values must be label values",
        ),
        (
            "matchLabels key with two slashes",
            selector("{matchLabels: {a/b/c: d}}"),
            "matchLabels keys must be label keys",
        ),
        (
            "matchLabels value with a space",
            selector("{matchLabels: {a: \"b c\"}}"),
            "matchLabels values must be label values",
        ),
        (
            "matchLabels value of 64 characters",
            selector(&format!("{{matchLabels: {{a: {}}}}}", long(64))),
            "spec.nodeSelector.matchLabels.a: Too long",
        ),
        // Tolerations, as the API server validates them in a pod.
        (
            "toleration Exists with a value",
            toleration("{key: k, operator: Exists, value: v, effect: NoSchedule}"),
            "a toleration with operator Exists must not have a value",
        ),
        (
            "toleration effect that does not exist",
            toleration("{key: k, operator: Exists, effect: NoRun}"),
            "spec.tolerations[0].effect: Unsupported value: \"NoRun\"",
        ),
        (
            "toleration operator that does not exist",
            toleration("{key: k, operator: In, value: v}"),
            "spec.tolerations[0].operator: Unsupported value: \"In\"",
        ),
        (
            "toleration without a key and operator Equal",
            toleration("{operator: Equal, value: v}"),
            "a toleration without a key must have operator Exists",
        ),
        (
            "tolerationSeconds on a NoSchedule toleration",
            toleration("{key: k, operator: Exists, effect: NoSchedule, tolerationSeconds: 60}"),
            "tolerationSeconds applies only to effect NoExecute",
        ),
        (
            "toleration key that is no label key",
            toleration("{key: \"a b\", operator: Exists}"),
            "toleration key must be a label key",
        ),
        // GpuAllocation fields.
        ("no grants", grants("[]"), "spec.grants in body should have at least 1 items"),
        (
            "pool granted twice",
            grants("[{pool: h200, accelerators: 8}, {pool: h200, accelerators: 8}]"),
            "Duplicate value",
        ),
        (
            "zero accelerators",
            grants("[{pool: h200, accelerators: 0}]"),
            "accelerators in body should be greater than or equal to 1",
        ),
        (
            "negative borrowing limit",
            grants("[{pool: h200, accelerators: 8, borrowingLimit: -1}]"),
            "borrowingLimit in body should be greater than or equal to 0",
        ),
        (
            "borrowing on a dedicated grant",
            grants("[{pool: h200, accelerators: 8, mode: Dedicated, borrowingLimit: 8}]"),
            "borrowingLimit applies only to Shared grants",
        ),
        (
            "grant mode that does not exist",
            grants("[{pool: h200, accelerators: 8, mode: Exclusive}]"),
            "spec.grants[0].mode: Unsupported value: \"Exclusive\"",
        ),
        (
            "grant naming a pool in uppercase",
            grants("[{pool: H200, accelerators: 8}]"),
            "grants[].pool must be an AcceleratorPool name",
        ),
        (
            "grant naming a pool of 70 characters",
            grants(&format!("[{{pool: {}, accelerators: 8}}]", long(70))),
            "spec.grants[0].pool: Too long",
        ),
        (
            "window ends before it starts",
            alloc_with("window: {start: \"2027-02-01T00:00:00Z\", end: \"2027-01-01T00:00:00Z\"}"),
            "window.end must be after window.start",
        ),
        ("empty window", alloc_with("window: {}"), "window needs a start, an end, or both"),
        ("window start that is no time", alloc_with("window: {start: tomorrow}"), "spec.window.start"),
        (
            "domestic share above one",
            alloc_with("minDomesticShare: 1.5"),
            "minDomesticShare in body should be less than or equal to 1",
        ),
        (
            "negative domestic share",
            alloc_with("minDomesticShare: -0.1"),
            "minDomesticShare in body should be greater than or equal to 0",
        ),
        (
            "zero-hour budget",
            alloc_with("budget: {acceleratorHours: 0}"),
            "acceleratorHours in body should be greater than or equal to 1",
        ),
        (
            "budget enforcement that does not exist",
            alloc_with("budget: {acceleratorHours: 100, enforcement: Soft}"),
            "spec.budget.enforcement: Unsupported value: \"Soft\"",
        ),
        (
            "allocation priority above 1000",
            alloc_with("priority: 5000"),
            "spec.priority in body should be less than or equal to 1000",
        ),
        (
            "namespace not a DNS label",
            alloc(&format!("tenant: {{displayName: T, namespaces: [Team_A]}}\n  {GRANTS}")),
            "tenant.namespaces must be namespace names",
        ),
        (
            "no tenant namespaces",
            alloc(&format!("tenant: {{displayName: T, namespaces: []}}\n  {GRANTS}")),
            "spec.tenant.namespaces in body should have at least 1 items",
        ),
        (
            "a tenant namespace listed twice",
            alloc(&format!("tenant: {{displayName: T, namespaces: [team-a, team-a]}}\n  {GRANTS}")),
            "Duplicate value",
        ),
        ("no tenant", alloc(GRANTS), "spec.tenant: Required value"),
        // ModelProject fields.
        (
            "zero workers",
            gang("allocation: a\n  placement: {pools: [h200]}\n  workers: 0\n  acceleratorsPerWorker: 8"),
            "spec.workers in body should be greater than or equal to 1",
        ),
        (
            "negative workers",
            gang("allocation: a\n  placement: {pools: [h200]}\n  workers: -2\n  acceleratorsPerWorker: 8"),
            "spec.workers in body should be greater than or equal to 1",
        ),
        (
            "more than 4096 workers",
            gang("allocation: a\n  placement: {pools: [h200]}\n  workers: 5000\n  acceleratorsPerWorker: 8"),
            "spec.workers in body should be less than or equal to 4096",
        ),
        (
            "zero accelerators per worker",
            gang("allocation: a\n  placement: {pools: [h200]}\n  workers: 1\n  acceleratorsPerWorker: 0"),
            "spec.acceleratorsPerWorker in body should be greater than or equal to 1",
        ),
        (
            "more than 64 accelerators per worker",
            gang("allocation: a\n  placement: {pools: [h200]}\n  workers: 1\n  acceleratorsPerWorker: 65"),
            "spec.acceleratorsPerWorker in body should be less than or equal to 64",
        ),
        (
            "no pools",
            gang("allocation: a\n  placement: {pools: []}\n  workers: 1\n  acceleratorsPerWorker: 8"),
            "placement.pools in body should have at least 1 items",
        ),
        (
            "a pool twice in the preference list",
            gang("allocation: a\n  placement: {pools: [atom, h200, atom]}\n  workers: 1\n  acceleratorsPerWorker: 8"),
            "Duplicate value",
        ),
        (
            "a preferred pool in uppercase",
            gang("allocation: a\n  placement: {pools: [H200]}\n  workers: 1\n  acceleratorsPerWorker: 8"),
            "placement.pools must be AcceleratorPool names",
        ),
        (
            "topology mode that does not exist",
            gang(
                "allocation: a\n  placement: {pools: [h200], topology: {key: rack, mode: Always}}\n  workers: 1\n  acceleratorsPerWorker: 8",
            ),
            "spec.placement.topology.mode: Unsupported value: \"Always\"",
        ),
        (
            "topology key that is no label key",
            gang(
                "allocation: a\n  placement: {pools: [h200], topology: {key: \"rack one\"}}\n  workers: 1\n  acceleratorsPerWorker: 8",
            ),
            "must be a label key",
        ),
        (
            "allocation that is no object name",
            gang("allocation: Team_A\n  placement: {pools: [h200]}\n  workers: 1\n  acceleratorsPerWorker: 8"),
            "allocation must be a GpuAllocation name",
        ),
        (
            "a misspelt field",
            project(&format!("{GANG}\n  {TEMPLATE}\n  acceleratorPerWorker: 8")),
            "unknown field \"spec.acceleratorPerWorker\"",
        ),
        (
            "project priority below -1000",
            project_with("priority: -2000"),
            "spec.priority in body should be greater than or equal to -1000",
        ),
        (
            "negative maxRestarts",
            project_with("runPolicy: {maxRestarts: -1}"),
            "spec.runPolicy.maxRestarts in body should be greater than or equal to 0",
        ),
        (
            "scheduling timeout below 10 s",
            project_with("runPolicy: {schedulingTimeoutSeconds: 5}"),
            "spec.runPolicy.schedulingTimeoutSeconds in body should be greater than or equal to 10",
        ),
        (
            "zero active deadline",
            project_with("runPolicy: {activeDeadlineSeconds: 0}"),
            "spec.runPolicy.activeDeadlineSeconds in body should be greater than or equal to 1",
        ),
        (
            "negative ttlSecondsAfterFinished",
            project_with("runPolicy: {ttlSecondsAfterFinished: -1}"),
            "spec.runPolicy.ttlSecondsAfterFinished in body should be greater than or equal to 0",
        ),
        (
            "master port above 65535",
            project_with("runPolicy: {masterPort: 70000}"),
            "spec.runPolicy.masterPort in body should be less than or equal to 65535",
        ),
        // The pod fields of the worker template, as the API server validates a pod.
        ("no image", project(&format!("{GANG}\n  template: {{command: [x]}}")), "spec.template.image: Required value"),
        (
            "accelerators in the template",
            template("resources: {limits: {nvidia.com/gpu: 8}}"),
            "template.resources must not name accelerators",
        ),
        (
            "requests above limits",
            template("resources: {requests: {cpu: \"4\"}, limits: {cpu: \"2\"}}"),
            "template.resources.requests must not exceed template.resources.limits",
        ),
        (
            "a request that is no quantity",
            template("resources: {requests: {memory: lots}}"),
            "template.resources.requests values must be quantities",
        ),
        (
            "image pull policy that does not exist",
            template("imagePullPolicy: Sometimes"),
            "spec.template.imagePullPolicy: Unsupported value: \"Sometimes\"",
        ),
        (
            "negative grace period",
            template("terminationGracePeriodSeconds: -1"),
            "spec.template.terminationGracePeriodSeconds in body should be greater than or equal to 0",
        ),
        (
            "template label key that is no label key",
            template("labels: {\"team/a/b\": x}"),
            "template.labels keys must be label keys",
        ),
        (
            "template label value with a space",
            template("labels: {team: \"a b\"}"),
            "template.labels values must be label values",
        ),
        (
            "template annotation key that is no label key",
            template("annotations: {\"not a key\": x}"),
            "template.annotations keys must be label keys",
        ),
        (
            "env name starting with a digit",
            template("env: [{name: 1GPU, value: x}]"),
            "env names must consist of letters, digits",
        ),
        (
            "two volumes of one name",
            template("volumes: [{name: data, emptyDir: {}}, {name: data, emptyDir: {}}]"),
            "Duplicate value",
        ),
        (
            "volume name that is no DNS label",
            template("volumes: [{name: Data_Set, emptyDir: {}}]"),
            "volume names must be DNS labels",
        ),
        (
            "volume mount without its volume",
            template("volumeMounts: [{name: data, mountPath: /data}]"),
            "every template.volumeMounts[].name must name one of template.volumes",
        ),
        (
            "relative mount path",
            template("volumes: [{name: data, emptyDir: {}}], volumeMounts: [{name: data, mountPath: data}]"),
            "volumeMounts mountPath must be an absolute path",
        ),
        (
            "service account that is no object name",
            template("serviceAccountName: \"My SA\""),
            "template.serviceAccountName must be a ServiceAccount name",
        ),
        (
            "priority class that is no object name",
            template("priorityClassName: High_Priority"),
            "template.priorityClassName must be a PriorityClass name",
        ),
    ]
}

/// Each bad object is refused by the API server with a message that names the
/// field; nothing is created; then a valid project is still admitted and runs.
pub async fn bad_objects_are_refused_at_apply_and_a_good_project_still_runs(env: Arc<Env>) -> anyhow::Result<()> {
    let rows = rows();
    ensure!(rows.len() >= 45, "the corpus shrank to {} rows", rows.len());
    let mut failures = Vec::new();
    for (what, yaml, want) in &rows {
        let out = env.kubectl(&["create", "-f", "-"], Some(yaml))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{what}: was accepted"));
            env.kubectl(&["delete", "--ignore-not-found", "--wait=false", "-f", "-"], Some(yaml))?;
        } else if !stderr.contains(want) {
            failures.push(format!("{what}: expected `{want}`, got: {}", stderr.trim()));
        }
    }
    ensure!(failures.is_empty(), "{} of {} rows wrong:\n{}", failures.len(), rows.len(), failures.join("\n"));

    // Names exactly at the limits are admitted: a 51-character project runs.
    with_grant(&env, "badinput", 16, async |ns, scope| {
        let name = format!("p{}", "x".repeat(50));
        scope.apply(&project_yaml(&name, &ns, "e2e-train", "[e2e-atom]", 2, "", ""))?;
        wait_project(&env, &ns, &name, ProjectPhase::Running, Duration::from_secs(60)).await?;
        Ok(())
    })
    .await
}
