//! Workloads tenants bring (batch Job, JobSet, Kubeflow TrainJob) and plain
//! accelerator pods, against the chart's admission policies in the real API
//! server: labelled workloads are held at creation, foreign allocations and
//! pods outside the grants are refused with the way in; Jobs and JobSets run to
//! completion on the simulated pools (the JobSet controller of the dev cluster).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod, ResourceQuota};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use sovereign_e2e::{Env, Operator, free_port, in_namespaces, wait_for};
use sovereign_operator::api::{AllocationPhase, GpuAllocation, ProjectPhase, WorkloadAdmission, WorkloadState};

use crate::grants::{alloc_yaml, pool_yaml, wait_phase};
use crate::projects::{project_yaml, wait_no_workers, wait_project};

const LABEL: &str = "sovereign.ai/allocation";
const H200: (&str, &str) = ("nvidia.com/gpu.product", "NVIDIA-H200");
const B200: (&str, &str) = ("nvidia.com/gpu.product", "NVIDIA-B200");

fn pools(scope: &mut sovereign_e2e::Scope) -> anyhow::Result<()> {
    scope.apply(&pool_yaml("e2e-h200", "nvidia.com/gpu", H200, 1.0))?;
    scope.apply(&pool_yaml("e2e-b200", "nvidia.com/gpu", B200, 1.0))
}

/// The two pools, and `allocation` granting `grants` to `ns`: Active, and
/// named with its pools in the policies' params.
async fn granted(
    env: &Env,
    scope: &mut sovereign_e2e::Scope,
    ns: &str,
    allocation: &str,
    grants: &str,
    pools_granted: &[&str],
) -> anyhow::Result<()> {
    pools(scope)?;
    scope.apply(&alloc_yaml(allocation, &[ns], grants, ""))?;
    wait_phase(env, allocation, AllocationPhase::Active, Duration::from_secs(60)).await?;
    wait_policy_params(env, ns, allocation, pools_granted).await
}

/// Waits until the namespace's quota (the policies' params) lists `allocation`
/// and the pools of its Active grants.
async fn wait_policy_params(env: &Env, ns: &str, allocation: &str, pools: &[&str]) -> anyhow::Result<()> {
    let api: Api<ResourceQuota> = Api::namespaced(env.client.clone(), ns);
    wait_for(
        &format!("the quota of {ns} to name {allocation} and pools {pools:?}"),
        Duration::from_secs(60),
        || async {
            let q = api.get_opt("sovereign-accelerators").await.map_err(|e| e.to_string())?.ok_or("no quota")?;
            let a = q.annotations();
            let listed = a.get("sovereign.ai/allocations").is_some_and(|l| l.split(',').any(|x| x == allocation));
            let granted = pools.iter().all(|p| a.contains_key(&format!("pool.sovereign.ai/{p}")));
            if listed && granted { Ok(()) } else { Err(format!("{a:?}")) }
        },
    )
    .await
}

/// A pod template asking for `gpus` devices on the nodes labelled `on`.
fn pod_template(gpus: u32, on: Option<(&str, &str)>, annotations: Value) -> Value {
    let mut spec = json!({"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
        "tolerations": [{"operator": "Exists"}],
        "containers": [{"name": "main", "image": "trainer:1",
            "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}, "requests": {"nvidia.com/gpu": gpus.to_string()}}}]});
    if let Some((k, v)) = on {
        spec["nodeSelector"] = json!({k: v});
    }
    json!({"metadata": {"annotations": annotations}, "spec": spec})
}

fn job(name: &str, allocation: Option<&str>, pods: u32, template: Value) -> anyhow::Result<Job> {
    let mut meta = json!({"name": name});
    if let Some(a) = allocation {
        meta["labels"] = json!({LABEL: a});
    }
    Ok(serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {"completionMode": "Indexed", "parallelism": pods, "completions": pods, "backoffLimit": 0,
                 "suspend": false, "template": template}}))?)
}

fn dynamic(env: &Env, ns: &str, group: &str, version: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::namespaced_with(env.client.clone(), ns, &ar)
}

fn jobsets(env: &Env, ns: &str) -> Api<DynamicObject> {
    dynamic(env, ns, "jobset.x-k8s.io", "v1alpha2", "JobSet", "jobsets")
}

fn trainjobs(env: &Env, ns: &str) -> Api<DynamicObject> {
    dynamic(env, ns, "trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs")
}

fn object(value: Value) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(value)?)
}

fn jobset(name: &str, allocation: Option<&str>, template: Value) -> anyhow::Result<DynamicObject> {
    let mut meta = json!({"name": name});
    if let Some(a) = allocation {
        meta["labels"] = json!({LABEL: a});
    }
    object(json!({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": meta,
        "spec": {"replicatedJobs": [{"name": "workers", "replicas": 2,
            "template": {"spec": {"parallelism": 1, "completions": 1, "backoffLimit": 0, "template": template}}}]}}))
}

fn trainjob(name: &str, allocation: &str) -> anyhow::Result<DynamicObject> {
    object(json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": name, "labels": {LABEL: allocation}},
        "spec": {"runtimeRef": {"name": "torch-distributed"}}}))
}

fn suspended(obj: &DynamicObject) -> Option<bool> {
    obj.data.pointer("/spec/suspend").and_then(Value::as_bool)
}

/// Creates `obj`; a refusal right after the quota changed may come from the API
/// server's own copy of it not having caught up: retried until `timeout`.
async fn create_when_admitted<K>(api: &Api<K>, obj: &K) -> anyhow::Result<K>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::Serialize
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    wait_for("the create to be admitted", Duration::from_secs(20), || async {
        api.create(&PostParams::default(), obj).await.map_err(|e| e.to_string())
    })
    .await
}

/// The message of a refused create (fails if the create succeeds).
async fn refusal<K>(api: &Api<K>, obj: &K) -> anyhow::Result<String>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::Serialize
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => anyhow::bail!("{} was admitted, not refused", obj.meta().name.clone().unwrap_or_default()),
        Err(e) => Ok(e.to_string()),
    }
}

pub async fn labelled_workloads_are_held_at_creation_and_unlabelled_ones_untouched(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-held"], async |names, scope| {
        let ns = names[0].clone();
        granted(&env, scope, &ns, "e2e-wl-held", "[{pool: e2e-b200, accelerators: 16}]", &["e2e-b200"]).await?;

        // Asked to start at once (suspend: false), held by the API server. It
        // prefers a pool its allocation holds no grant in: the operator keeps it held.
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        let mut labelled = job("held", Some("e2e-wl-held"), 2, pod_template(8, Some(B200), json!({})))?;
        labelled.metadata.annotations = Some([("sovereign.ai/pools".to_string(), "e2e-h200".to_string())].into());
        let held = create_when_admitted(&jobs, &labelled).await?;
        ensure!(
            held.spec.as_ref().and_then(|s| s.suspend) == Some(true),
            "labelled Job not suspended: {:?}",
            held.spec
        );
        // An unlabelled one is left as written (no accelerators: plain pods are not the point here).
        let plain = job(
            "plain",
            None,
            1,
            json!({"spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "trainer:1"}]}}),
        )?;
        let plain = jobs.create(&PostParams::default(), &plain).await?;
        ensure!(plain.spec.as_ref().and_then(|s| s.suspend) == Some(false), "unlabelled Job changed: {:?}", plain.spec);

        // Only the operator starts it.
        let out = env.kubectl(
            &["-n", &ns, "patch", "job", "held", "--type=merge", "-p", r#"{"spec":{"suspend":false}}"#],
            None,
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "an admin unsuspended a held Job");
        ensure!(err.contains("is started by the sovereign operator when GpuAllocation e2e-wl-held admits it"), "{err}");
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
        let held_pods = pods.list(&ListParams::default().labels("job-name=held")).await?;
        ensure!(held_pods.items.is_empty(), "a held Job has pods: {}", held_pods.items.len());

        // A JobSet and a TrainJob are held the same way.
        let js = jobset("held-set", Some("e2e-wl-held"), pod_template(8, Some(B200), json!({})))?;
        let js = create_when_admitted(&jobsets(&env, &ns), &js).await?;
        ensure!(suspended(&js) == Some(true), "labelled JobSet not suspended: {:?}", js.data.get("spec"));
        let tj = create_when_admitted(&trainjobs(&env, &ns), &trainjob("held-train", "e2e-wl-held")?).await?;
        ensure!(suspended(&tj) == Some(true), "labelled TrainJob not suspended: {:?}", tj.data.get("spec"));
        let plain_set = jobset(
            "plain-set",
            None,
            json!({"spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "trainer:1"}]}}),
        )?;
        let plain_set = jobsets(&env, &ns).create(&PostParams::default(), &plain_set).await?;
        ensure!(suspended(&plain_set) != Some(true), "unlabelled JobSet suspended: {:?}", plain_set.data.get("spec"));
        Ok(())
    })
    .await
}

pub async fn a_workload_naming_a_foreign_allocation_is_refused_with_the_policys_words(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-mine", "wl-theirs", "wl-nobody"], async |names, scope| {
        let (mine, theirs) = (names[0].clone(), names[1].clone());
        pools(scope)?;
        scope.apply(&alloc_yaml("e2e-wl-mine", &[&mine], "[{pool: e2e-b200, accelerators: 8}]", ""))?;
        scope.apply(&alloc_yaml("e2e-wl-theirs", &[&theirs], "[{pool: e2e-h200, accelerators: 8}]", ""))?;
        wait_policy_params(&env, &mine, "e2e-wl-mine", &["e2e-b200"]).await?;
        wait_policy_params(&env, &theirs, "e2e-wl-theirs", &["e2e-h200"]).await?;

        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &mine);
        let msg = refusal(&jobs, &job("borrowed", Some("e2e-wl-theirs"), 1, pod_template(8, None, json!({})))?).await?;
        // Both policies refuse it (the namespace's quota lists e2e-wl-mine only; e2e-wl-theirs
        // lists another namespace), in the same words.
        for words in [
            format!("GpuAllocation e2e-wl-theirs does not list namespace {mine}"),
            format!("set the label {LABEL} to an allocation that lists {mine}"),
            format!("add {mine} to spec.tenant.namespaces of GpuAllocation e2e-wl-theirs"),
        ] {
            ensure!(msg.contains(&words), "refusal lacks {words:?}: {msg}");
        }
        // A namespace no allocation lists (no quota): the allocation itself says no.
        let outside: Api<Job> = Api::namespaced(env.client.clone(), &names[2]);
        let msg = refusal(&outside, &job("stray", Some("e2e-wl-theirs"), 1, pod_template(8, None, json!({})))?).await?;
        ensure!(
            msg.contains(&format!(
                "GpuAllocation e2e-wl-theirs does not list namespace {} (it lists {theirs})",
                names[2]
            )),
            "{msg}"
        );
        // One that does not exist, and a TrainJob, the same way.
        let msg = refusal(&jobs, &job("ghost", Some("e2e-wl-nowhere"), 1, pod_template(8, None, json!({})))?).await?;
        ensure!(msg.contains("GpuAllocation e2e-wl-nowhere does not list namespace"), "{msg}");
        let msg = refusal(&trainjobs(&env, &mine), &trainjob("borrowed-train", "e2e-wl-theirs")?).await?;
        ensure!(msg.contains("GpuAllocation e2e-wl-theirs does not list namespace"), "{msg}");
        // Relabelling an admitted-to-be workload to a foreign allocation is refused too.
        create_when_admitted(&jobs, &job("mine", Some("e2e-wl-mine"), 1, pod_template(8, Some(B200), json!({})))?)
            .await?;
        let out = env
            .kubectl(&["-n", &mine, "label", "job", "mine", "--overwrite", &format!("{LABEL}=e2e-wl-theirs")], None)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && err.contains("does not list namespace"), "relabel: {err}");
        Ok(())
    })
    .await
}

pub async fn a_plain_pod_outside_the_grants_is_refused_with_the_way_in(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-b200", "wl-both"], async |names, scope| {
        let (only_b200, both) = (names[0].clone(), names[1].clone());
        pools(scope)?;
        scope.apply(&alloc_yaml("e2e-wl-b200", &[&only_b200], "[{pool: e2e-b200, accelerators: 16}]", ""))?;
        scope.apply(&alloc_yaml(
            "e2e-wl-both",
            &[&both],
            "[{pool: e2e-h200, accelerators: 8}, {pool: e2e-b200, accelerators: 8}]",
            "",
        ))?;
        wait_policy_params(&env, &only_b200, "e2e-wl-b200", &["e2e-b200"]).await?;
        wait_policy_params(&env, &both, "e2e-wl-both", &["e2e-h200", "e2e-b200"]).await?;

        let pod = |name: &str, on: Option<(&str, &str)>| -> anyhow::Result<Pod> {
            let mut p = pod_template(8, on, json!({}));
            p["metadata"]["name"] = json!(name);
            Ok(serde_json::from_value(p)?)
        };
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &only_b200);
        // H200 devices in a namespace granted only B200.
        let msg = refusal(&pods, &pod("on-h200", Some(H200))?).await?;
        for words in [
            format!("pod asks for nvidia.com/gpu outside the grants of namespace {only_b200} (GpuAllocation e2e-wl-b200)"),
            format!("create it through a Job, JobSet or TrainJob labelled {LABEL}=e2e-wl-b200"),
            "set its nodeSelector to the node labels of a pool granted to the namespace: e2e-b200 (nvidia.com/gpu: nvidia.com/gpu.product=NVIDIA-B200)".to_string(),
        ] {
            ensure!(msg.contains(&words), "refusal lacks {words:?}: {msg}");
        }
        // Anywhere a GPU is: refused too. On the granted pool: admitted.
        let msg = refusal(&pods, &pod("anywhere", None)?).await?;
        ensure!(msg.contains("outside the grants of namespace"), "{msg}");
        create_when_admitted(&pods, &pod("on-b200", Some(B200))?).await.context("a pod confined to its grant")?;

        // An unlabelled Job on H200 gets no pod: the Job controller reports the policy's words.
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &only_b200);
        jobs.create(&PostParams::default(), &job("sneaky", None, 2, pod_template(8, Some(H200), json!({})))?).await?;
        let events: Api<Event> = Api::namespaced(env.client.clone(), &only_b200);
        wait_for("a FailedCreate Event of Job sneaky with the policy's words", Duration::from_secs(60), || async {
            let list = events
                .list(&ListParams::default().fields("involvedObject.name=sneaky"))
                .await
                .map_err(|e| e.to_string())?;
            let seen: Vec<String> = list.items.iter().filter_map(|e| e.message.clone()).collect();
            if seen.iter().any(|m| m.contains("outside the grants of namespace") && m.contains(LABEL)) {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        })
        .await?;
        let sneaky = Api::<Pod>::namespaced(env.client.clone(), &only_b200)
            .list(&ListParams::default().labels("job-name=sneaky"))
            .await?;
        ensure!(sneaky.items.is_empty(), "an unlabelled Job ran {} pods outside the grants", sneaky.items.len());

        // Two granted pools of one resource name: the quota sums them, so only admission may use them.
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &both);
        let msg = refusal(&pods, &pod("on-b200", Some(B200))?).await?;
        ensure!(
            msg.contains("share a resource name that the namespace quota sums: only admitted workloads may use them")
                && msg.contains(&format!("{LABEL}=e2e-wl-both")),
            "{msg}"
        );
        Ok(())
    })
    .await
}

/// The message of a refused create, waiting until the refusal carries `words` (the API server
/// reads a policy's params from a cache, which may not have seen a pool created a moment ago):
/// a workload created meanwhile is deleted and created again.
async fn refusal_saying<K>(api: &Api<K>, obj: &K, words: &str) -> anyhow::Result<String>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::Serialize
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    wait_for(&format!("the create of {name} to be refused saying {words:?}"), Duration::from_secs(30), || async {
        match api.create(&PostParams::default(), obj).await {
            Ok(_) => {
                let _ = api.delete(&name, &kube::api::DeleteParams::background()).await;
                Err(format!("{name} was created"))
            }
            Err(e) if e.to_string().contains(words) => Ok(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

pub async fn a_fallback_list_across_resource_names_is_refused_at_creation_saying_why(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-mixed"], async |names, scope| {
        let ns = names[0].clone();
        scope.apply(&pool_yaml("e2e-rngd", "furiosa.ai/rngd", ("furiosa.ai/npu.family", "rngd"), 1.0))?;
        granted(&env, scope, &ns, "e2e-wl-mixed", "[{pool: e2e-b200, accelerators: 16}]", &["e2e-b200"]).await?;
        let why = |kind: &str, list: &str| {
            [
                format!(
                    "annotation sovereign.ai/pools \"{list}\": pool e2e-rngd gives furiosa.ai/rngd but the pods ask for nvidia.com/gpu"
                ),
                format!(
                    "a {kind}'s requests cannot change while it is held, so it falls back only between pools of one resource name"
                ),
                format!(
                    "list only pools that give nvidia.com/gpu, or submit one {kind} per resource name (or a ModelProject, which falls back across resource names)"
                ),
            ]
        };
        let pools = |list: &str| [("sovereign.ai/pools".to_string(), list.to_string())];

        // An NPU pool first, a GPU pool after, pods that ask for GPUs: refused at creation.
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        let list = "e2e-rngd,e2e-b200";
        let mixed = annotated(job("mixed", Some("e2e-wl-mixed"), 2, pod_template(8, None, json!({})))?, &[(
            "sovereign.ai/pools",
            list,
        )]);
        let msg = refusal_saying(&jobs, &mixed, "pool e2e-rngd gives furiosa.ai/rngd").await?;
        for words in why("Job", list) {
            ensure!(msg.contains(&words), "refusal lacks {words:?}: {msg}");
        }
        // A JobSet, and a TrainJob whose pods' devices it sets itself (the list in spec.annotations).
        let mut set = jobset("mixed-set", Some("e2e-wl-mixed"), pod_template(8, None, json!({})))?;
        set.metadata.annotations = Some(pools(" e2e-b200, e2e-rngd").into());
        let msg = refusal_saying(&jobsets(&env, &ns), &set, "pool e2e-rngd gives").await?;
        for words in why("JobSet", " e2e-b200, e2e-rngd") {
            ensure!(msg.contains(&words), "refusal lacks {words:?}: {msg}");
        }
        let tj = object(json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "mixed-train", "labels": {LABEL: "e2e-wl-mixed"}},
            "spec": {"runtimeRef": {"name": "torch-distributed"},
                     "labels": {LABEL: "e2e-wl-mixed"}, "annotations": {"sovereign.ai/pools": list},
                     "trainer": {"numNodes": 2, "resourcesPerNode": {"limits": {"nvidia.com/gpu": "8"}}}}}))?;
        let msg = refusal_saying(&trainjobs(&env, &ns), &tj, "pool e2e-rngd gives").await?;
        ensure!(msg.contains("a TrainJob's requests cannot change while it is held"), "{msg}");

        // One resource name: held as usual. Its list changed later to cross names: refused.
        let gpus = annotated(job("gpus", Some("e2e-wl-mixed"), 2, pod_template(8, None, json!({})))?, &[(
            "sovereign.ai/pools",
            "e2e-h200,e2e-b200",
        )]);
        create_when_admitted(&jobs, &gpus).await?;
        let out = env.kubectl(&["-n", &ns, "annotate", "job", "gpus", "--overwrite", "sovereign.ai/pools=e2e-b200,e2e-rngd"], None)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "the list of a held Job was changed to cross resource names");
        for words in why("Job", "e2e-b200,e2e-rngd") {
            ensure!(err.contains(&words), "refusal lacks {words:?}: {err}");
        }

        // Where the policy cannot see the pods' devices (a TrainJob whose runtime sets them), the
        // JobSet made of it is held and the operator says why, in the same words.
        let tj = object(json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "runtime-train", "labels": {LABEL: "e2e-wl-mixed"}},
            "spec": {"runtimeRef": {"name": "torch-distributed"},
                     "labels": {LABEL: "e2e-wl-mixed"}, "annotations": {"sovereign.ai/pools": list}}}))?;
        let tj = create_when_admitted(&trainjobs(&env, &ns), &tj).await?;
        let made = object(json!({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": "runtime-train", "labels": {LABEL: "e2e-wl-mixed"},
                "annotations": {"sovereign.ai/pools": list},
                "ownerReferences": [{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
                    "name": "runtime-train", "uid": tj.metadata.uid, "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"suspend": true, "replicatedJobs": [{"name": "node", "replicas": 1,
                "template": {"spec": {"parallelism": 2, "completions": 2, "backoffLimit": 0,
                    "template": pod_template(8, None, json!({}))}}}]}}))?;
        let sets = jobsets(&env, &ns);
        create_when_admitted(&sets, &made).await?;
        let told = wait_event_on(&env, &ns, "JobSet", "runtime-train", "Invalid").await?;
        for words in why("JobSet", list) {
            ensure!(told.contains(&words.replace(", or submit", " (here: e2e-b200), or submit")), "Event lacks {words:?}: {told}");
        }
        ensure!(suspended(&sets.get("runtime-train").await?) == Some(true), "the JobSet was started");
        Ok(())
    })
    .await
}

/// Waits until the quota of `ns` (the policies' params) names `refused_by` as the allocations
/// that refuse direct accelerator pods.
async fn wait_direct_pods_refused_by(env: &Env, ns: &str, refused_by: &str) -> anyhow::Result<()> {
    let api: Api<ResourceQuota> = Api::namespaced(env.client.clone(), ns);
    wait_for(
        &format!("the quota of {ns} to say direct pods are refused by {refused_by:?}"),
        Duration::from_secs(60),
        || async {
            let q = api.get_opt("sovereign-accelerators").await.map_err(|e| e.to_string())?.ok_or("no quota")?;
            let a = q.annotations();
            if a.get("sovereign.ai/direct-pods-refused-by").map(String::as_str) == Some(refused_by) {
                Ok(())
            } else {
                Err(format!("{a:?}"))
            }
        },
    )
    .await
}

pub async fn an_allocation_that_refuses_direct_pods_lets_only_admitted_workloads_in(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-direct"], async |names, scope| {
        let ns = names[0].clone();
        pools(scope)?;
        let yaml = alloc_yaml("e2e-wl-direct", &[&ns], "[{pool: e2e-b200, accelerators: 16}]", "")
            .replace("namespaces: [", "directPods: Refused, namespaces: [");
        scope.apply(&yaml)?;
        wait_phase(&env, "e2e-wl-direct", AllocationPhase::Active, Duration::from_secs(60)).await?;
        wait_policy_params(&env, &ns, "e2e-wl-direct", &["e2e-b200"]).await?;
        wait_direct_pods_refused_by(&env, &ns, "e2e-wl-direct").await?;

        // A plain pod confined to the one granted pool, which Confined would admit: refused,
        // naming the allocation and the label that brings it in.
        let mut on_b200 = pod_template(8, Some(B200), json!({}));
        on_b200["metadata"]["name"] = json!("direct");
        let on_b200: Pod = serde_json::from_value(on_b200)?;
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
        let msg = refusal_saying(&pods, &on_b200, "spec.tenant.directPods: Refused").await?;
        for words in [
            format!("pod asks for nvidia.com/gpu in namespace {ns}, where GpuAllocation e2e-wl-direct admits accelerator pods only through the sovereign operator"),
            format!("create it through a Job, JobSet or TrainJob labelled {LABEL}=e2e-wl-direct so that the sovereign operator admits it"),
        ] {
            ensure!(msg.contains(&words), "refusal lacks {words:?}: {msg}");
        }

        // A labelled Job is admitted and its pods (made by the Job controller from the pinned
        // template) run to completion.
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        let done = json!({"sim.sovereign.ai/complete-after": "1s"});
        create_when_admitted(&jobs, &job("admitted", Some("e2e-wl-direct"), 2, pod_template(8, None, done))?).await?;
        ensure!(wait_admitted(&jobs, "admitted", Duration::from_secs(60)).await? == "e2e-b200", "not on B200");
        wait_for("Job admitted to complete", Duration::from_secs(90), || async {
            let j = jobs.get("admitted").await.map_err(|e| e.to_string())?;
            let status = j.status.unwrap_or_default();
            let complete = status.conditions.iter().flatten().any(|c| c.type_ == "Complete" && c.status == "True");
            if complete && status.succeeded == Some(2) { Ok(()) } else { Err(format!("{status:?}")) }
        })
        .await?;

        // Confined again: the same pod is admitted.
        env.kubectl_ok(
            &["patch", "gpuallocation", "e2e-wl-direct", "--type=merge", "-p", r#"{"spec":{"tenant":{"directPods":"Confined"}}}"#],
            None,
        )?;
        wait_direct_pods_refused_by(&env, &ns, "").await?;
        create_when_admitted(&pods, &on_b200).await.context("a pod confined to its grant under Confined")?;
        Ok(())
    })
    .await
}

pub async fn jobs_and_jobsets_run_to_completion_in_the_simulated_pools(env: Arc<Env>) -> anyhow::Result<()> {
    // A namespace no allocation lists: no quota, so the pod policy leaves it alone.
    in_namespaces(&env, &["wl-run"], async |names, _scope| {
        let ns = names[0].clone();
        let done = json!({"sim.sovereign.ai/complete-after": "1s"});
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        jobs.create(&PostParams::default(), &job("indexed", None, 2, pod_template(1, Some(H200), done.clone()))?)
            .await?;
        let sets = jobsets(&env, &ns);
        sets.create(&PostParams::default(), &jobset("pair", None, pod_template(1, Some(H200), done))?).await?;

        wait_for("Job indexed to complete", Duration::from_secs(90), || async {
            let j = jobs.get("indexed").await.map_err(|e| e.to_string())?;
            let status = j.status.unwrap_or_default();
            let complete = status.conditions.iter().flatten().any(|c| c.type_ == "Complete" && c.status == "True");
            if complete && status.succeeded == Some(2) { Ok(()) } else { Err(format!("{status:?}")) }
        })
        .await?;
        wait_for("JobSet pair to complete", Duration::from_secs(90), || async {
            let js = sets.get("pair").await.map_err(|e| e.to_string())?;
            let conditions = js.data.pointer("/status/conditions").cloned().unwrap_or_default();
            let done =
                conditions.as_array().into_iter().flatten().any(|c| c["type"] == "Completed" && c["status"] == "True");
            if done { Ok(()) } else { Err(conditions.to_string()) }
        })
        .await?;
        // Its child Jobs were made by the JobSet controller, one per replica.
        let children = jobs.list(&ListParams::default().labels("jobset.sigs.k8s.io/jobset-name=pair")).await?;
        ensure!(children.items.len() == 2, "JobSet pair made {} Jobs", children.items.len());
        Ok(())
    })
    .await
}

/// Sets the Job's annotations (the workload contract: pools, priority).
fn annotated(mut j: Job, notes: &[(&str, &str)]) -> Job {
    j.metadata.annotations = Some(notes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    j
}

/// Waits until the operator admitted the workload (a Job, a JobSet: started,
/// its pool annotated) and returns the pool.
async fn wait_admitted<K>(api: &Api<K>, name: &str, timeout: Duration) -> anyhow::Result<String>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::Serialize
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    wait_for(&format!("{name} to be admitted"), timeout, || async {
        let w = api.get(name).await.map_err(|e| e.to_string())?;
        let suspend = serde_json::to_value(&w).ok().and_then(|v| v.pointer("/spec/suspend").and_then(Value::as_bool));
        match w.meta().annotations.as_ref().and_then(|a| a.get("sovereign.ai/admitted-pool")) {
            Some(pool) if suspend == Some(false) => Ok(pool.clone()),
            _ => Err(format!("suspend {suspend:?}, annotations {:?}", w.meta().annotations)),
        }
    })
    .await
}

/// Waits for an Event of `reason` on the Job (or another `kind`); returns its note.
async fn wait_event(env: &Env, ns: &str, job: &str, reason: &str) -> anyhow::Result<String> {
    wait_event_on(env, ns, "Job", job, reason).await
}

async fn wait_event_on(env: &Env, ns: &str, kind: &str, name: &str, reason: &str) -> anyhow::Result<String> {
    let events: Api<Event> = Api::namespaced(env.client.clone(), ns);
    wait_for(&format!("an Event {reason} on {kind} {name}"), Duration::from_secs(30), || async {
        let list = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let seen: Vec<_> = list
            .items
            .iter()
            .filter(|e| {
                e.involved_object.kind.as_deref() == Some(kind) && e.involved_object.name.as_deref() == Some(name)
            })
            .map(|e| (e.reason.clone().unwrap_or_default(), e.message.clone().unwrap_or_default()))
            .collect();
        seen.iter().find(|(r, _)| r == reason).map(|(_, m)| m.clone()).ok_or(format!("{seen:?}"))
    })
    .await
}

/// The nodes the Job's pods run on, once `count` of them run.
async fn running_on(env: &Env, ns: &str, job: &str, count: usize) -> anyhow::Result<Vec<String>> {
    running_selected(env, ns, &format!("job-name={job}"), count).await
}

/// The nodes the pods that `selector` selects run on, once `count` of them run.
async fn running_selected(env: &Env, ns: &str, selector: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    wait_for(&format!("{count} pods {selector} to run"), Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default().labels(selector)).await.map_err(|e| e.to_string())?;
        let nodes: Vec<String> = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        if nodes.len() == count { Ok(nodes) } else { Err(format!("{} running of {}", nodes.len(), list.items.len())) }
    })
    .await
}

/// The operator's line about a workload (its WorkloadAdmission, `job-NAME`),
/// once `ok` holds of its status.
async fn wait_line(
    lines: &Api<WorkloadAdmission>,
    name: &str,
    what: &str,
    ok: impl Fn(&sovereign_operator::api::WorkloadAdmissionStatus) -> bool,
) -> anyhow::Result<WorkloadAdmission> {
    wait_for(&format!("WorkloadAdmission {name}: {what}"), Duration::from_secs(60), || async {
        let line = lines.get_opt(name).await.map_err(|e| e.to_string())?.ok_or("no such line")?;
        match &line.status {
            Some(s) if ok(s) => Ok(line),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

pub async fn an_indexed_job_falls_back_whole_from_a_full_h200_grant_to_b200_and_completes(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-fallback"], async |names, scope| {
        let ns = names[0].clone();
        pools(scope)?;
        let grants = "[{pool: e2e-h200, accelerators: 8}, {pool: e2e-b200, accelerators: 32}]";
        scope.apply(&alloc_yaml("e2e-wl-fallback", &[&ns], grants, ""))?;
        wait_phase(&env, "e2e-wl-fallback", AllocationPhase::Active, Duration::from_secs(60)).await?;
        wait_policy_params(&env, &ns, "e2e-wl-fallback", &["e2e-h200", "e2e-b200"]).await?;
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);

        // One pod of 8 fills the H200 grant (it runs until deleted).
        let filler = job("filler", Some("e2e-wl-fallback"), 1, pod_template(8, None, json!({})))?;
        create_when_admitted(&jobs, &annotated(filler, &[("sovereign.ai/pools", "e2e-h200")])).await?;
        let pool = wait_admitted(&jobs, "filler", Duration::from_secs(60)).await?;
        ensure!(pool == "e2e-h200", "filler admitted to {pool}");
        running_on(&env, &ns, "filler", 1).await?;

        // 4 pods of 4 prefer H200, whose grant is full: all four go to B200.
        let done = json!({"sim.sovereign.ai/complete-after": "2s"});
        let indexed = job("indexed", Some("e2e-wl-fallback"), 4, pod_template(4, None, done))?;
        create_when_admitted(&jobs, &annotated(indexed, &[("sovereign.ai/pools", "e2e-h200,e2e-b200")])).await?;
        let pool = wait_admitted(&jobs, "indexed", Duration::from_secs(60)).await?;
        ensure!(pool == "e2e-b200", "indexed admitted to {pool}, not whole to e2e-b200");
        let admitted = wait_event(&env, &ns, "indexed", "Admitted").await?;
        ensure!(admitted.starts_with("admitted to pool e2e-b200 on nodes "), "{admitted}");
        let j = jobs.get("indexed").await?;
        let template = j.spec.and_then(|s| s.template.spec).context("a pod template")?;
        ensure!(
            template.node_selector.as_ref().and_then(|n| n.get(B200.0)).map(String::as_str) == Some(B200.1),
            "the template is not pinned to the B200 node labels: {:?}",
            template.node_selector
        );
        // Every pod on a B200 node, then the Job completes.
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
        let planned =
            j.metadata.annotations.unwrap_or_default().get("sovereign.ai/admitted-nodes").cloned().unwrap_or_default();
        let seen = std::sync::Mutex::new(Vec::<String>::new());
        wait_for("Job indexed to complete with 4 pods on B200 nodes", Duration::from_secs(90), || async {
            let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
            for p in
                pods.list(&ListParams::default().labels("job-name=indexed")).await.map_err(|e| e.to_string())?.items
            {
                let mut seen = seen.lock().expect("seen");
                if let Some(n) = p.spec.and_then(|s| s.node_name)
                    && !seen.contains(&n)
                {
                    seen.push(n);
                }
            }
            let status = jobs.get("indexed").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            let complete = status.conditions.iter().flatten().any(|c| c.type_ == "Complete" && c.status == "True");
            if complete && status.succeeded == Some(4) { Ok(()) } else { Err(format!("{status:?}")) }
        })
        .await?;
        let seen = seen.into_inner().expect("seen");
        for n in &seen {
            let node = nodes.get(n).await?;
            ensure!(node.labels().get(B200.0).map(String::as_str) == Some(B200.1), "a pod ran on {n}, not a B200 node");
            ensure!(planned.split(',').any(|p| p == n), "a pod ran on {n}, not a planned node ({planned})");
        }
        ensure!(!seen.is_empty(), "no pod of indexed was seen");

        // The template labels that mark an admitted Job's pods are the operator's alone.
        let mut forged = pod_template(8, Some(B200), json!({}));
        forged["metadata"]["labels"] = json!({"sovereign.ai/job": "forged", "sovereign.ai/pool": "e2e-b200"});
        let msg = refusal(&jobs, &job("forged", None, 1, forged)?).await?;
        ensure!(msg.contains("are set by the sovereign operator when it admits a Job or JobSet labelled"), "{msg}");

        // The operator's line about each Job, owned by it: the filler runs on H200, indexed finished on B200.
        let lines: Api<WorkloadAdmission> = Api::namespaced(env.client.clone(), &ns);
        let running = |pool: &'static str| {
            move |s: &sovereign_operator::api::WorkloadAdmissionStatus| {
                s.state == WorkloadState::Running && s.pool.as_deref() == Some(pool)
            }
        };
        let filler_line = wait_line(&lines, "job-filler", "Running on e2e-h200", running("e2e-h200")).await?;
        let filler_uid = jobs.get("filler").await?.metadata.uid;
        let owner = filler_line.metadata.owner_references.clone().unwrap_or_default();
        ensure!(
            owner.len() == 1
                && owner[0].kind == "Job"
                && owner[0].name == "filler"
                && Some(&owner[0].uid) == filler_uid.as_ref(),
            "the line is not owned by Job filler: {owner:?}"
        );
        ensure!(
            filler_line.labels().get("sovereign.ai/job").map(String::as_str) == Some("filler"),
            "{:?}",
            filler_line.labels()
        );
        let done = wait_line(&lines, "job-indexed", "Finished", |s| s.state == WorkloadState::Finished).await?;
        let done = done.status.unwrap_or_default();
        ensure!(
            (done.reason.as_deref(), done.pool.as_deref(), done.devices)
                == (Some("Succeeded"), Some("e2e-b200"), Some(16)),
            "{done:?}"
        );

        // A Job that wants H200 alone waits behind the filler: Queued, with the reason in numbers.
        let next = job("next", Some("e2e-wl-fallback"), 1, pod_template(8, None, json!({})))?;
        create_when_admitted(&jobs, &annotated(next, &[("sovereign.ai/pools", "e2e-h200")])).await?;
        let queued = wait_line(&lines, "job-next", "Queued", |s| s.state == WorkloadState::Queued).await?;
        let queued = queued.status.unwrap_or_default();
        ensure!(
            queued.reason.as_deref() == Some("Waiting")
                && queued.queue_position == Some(1)
                && queued.message.as_deref().is_some_and(|m| m.contains("needs 8 nvidia.com/gpu in pool e2e-h200")),
            "{queued:?}"
        );
        // One line per workload in `kubectl get`.
        let table = env.kubectl_ok(&["-n", &ns, "get", "workloadadmissions"], None)?;
        let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
        ensure!(
            header
                == [
                    "NAME",
                    "KIND",
                    "WORKLOAD",
                    "ALLOCATION",
                    "STATE",
                    "POOL",
                    "DEVICES",
                    "POSITION",
                    "REASON",
                    "AGE",
                    "MESSAGE"
                ],
            "{table}"
        );
        let row = table.lines().find(|l| l.starts_with("job-next ")).unwrap_or_default();
        for cell in ["Job", "next", "e2e-wl-fallback", "Queued", "Waiting", "needs 8 nvidia.com/gpu"] {
            ensure!(row.contains(cell), "no {cell:?} in the line of next: {table}");
        }

        // The filler deleted (as kubectl deletes: its dependents too): its line goes, and next runs on H200.
        env.kubectl_ok(&["-n", &ns, "delete", "job", "filler", "--wait=false"], None)?;
        wait_for("the filler's line to go with it", Duration::from_secs(60), || async {
            match lines.get_opt("job-filler").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(l) => Err(format!("{:?}", l.status)),
            }
        })
        .await?;
        wait_line(&lines, "job-next", "Running on e2e-h200", running("e2e-h200")).await?;
        Ok(())
    })
    .await
}

pub async fn a_higher_priority_project_preempts_a_running_job_which_resumes_later(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-preempt"], async |names, scope| {
        let ns = names[0].clone();
        granted(&env, scope, &ns, "e2e-wl-preempt", "[{pool: e2e-b200, accelerators: 16}]", &["e2e-b200"]).await?;
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);

        // The Job takes the whole grant (2 pods of 8) and runs until preempted.
        create_when_admitted(&jobs, &job("low", Some("e2e-wl-preempt"), 2, pod_template(8, None, json!({})))?).await?;
        ensure!(wait_admitted(&jobs, "low", Duration::from_secs(60)).await? == "e2e-b200", "low not on e2e-b200");
        running_on(&env, &ns, "low", 2).await?;

        // A project of priority 100 needs the same 16: the Job is suspended again, its pods go.
        let done = "sim.sovereign.ai/complete-after: \"5s\"";
        scope.apply(&project_yaml("high", &ns, "e2e-wl-preempt", "[e2e-b200]", 2, "  priority: 100\n", done))?;
        wait_for("Job low to be suspended again", Duration::from_secs(60), || async {
            let j = jobs.get("low").await.map_err(|e| e.to_string())?;
            let suspended = j.spec.as_ref().and_then(|s| s.suspend) == Some(true);
            let forgotten = !j.annotations().contains_key("sovereign.ai/admitted-pool");
            if suspended && forgotten {
                Ok(())
            } else {
                Err(format!("{:?} {:?}", j.spec.map(|s| s.suspend), j.metadata.annotations))
            }
        })
        .await?;
        let preempted = wait_event(&env, &ns, "low", "Preempted").await?;
        ensure!(preempted.contains("high"), "{preempted}");
        // Its line says so, and who, while it waits.
        let lines: Api<WorkloadAdmission> = Api::namespaced(env.client.clone(), &ns);
        let line = wait_line(&lines, "job-low", "Preempted", |s| s.state == WorkloadState::Preempted).await?;
        let line = line.status.unwrap_or_default();
        ensure!(
            line.reason.as_deref() == Some("Preempted")
                && line.preemption.as_deref().is_some_and(|p| p.contains("high")),
            "{line:?}"
        );
        // It waits again, and says so on the Job with the reason.
        let queued = wait_event(&env, &ns, "low", "Queued").await?;
        ensure!(!queued.is_empty(), "a Queued Event without its reason");

        // The project runs and finishes; the Job is admitted again and runs.
        ensure!(wait_admitted(&jobs, "low", Duration::from_secs(120)).await? == "e2e-b200", "low not back on e2e-b200");
        running_on(&env, &ns, "low", 2).await?;
        wait_line(&lines, "job-low", "Running again", |s| {
            s.state == WorkloadState::Running && s.pool.as_deref() == Some("e2e-b200") && s.preemption.is_none()
        })
        .await?;
        Ok(())
    })
    .await
}

pub async fn a_higher_priority_job_preempts_a_running_project_which_resumes_later(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-reverse"], async |names, scope| {
        let ns = names[0].clone();
        granted(&env, scope, &ns, "e2e-wl-reverse", "[{pool: e2e-b200, accelerators: 16}]", &["e2e-b200"]).await?;

        // The project takes the whole grant (2 workers of 8) and runs until preempted.
        scope.apply(&project_yaml("low", &ns, "e2e-wl-reverse", "[e2e-b200]", 2, "", ""))?;
        wait_project(&env, &ns, "low", ProjectPhase::Running, Duration::from_secs(60)).await?;

        // A Job of priority 100 needs the same 16: the project is preempted, the Job runs and completes.
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        let done = json!({"sim.sovereign.ai/complete-after": "3s"});
        let urgent = job("urgent", Some("e2e-wl-reverse"), 2, pod_template(8, None, done))?;
        create_when_admitted(&jobs, &annotated(urgent, &[("sovereign.ai/priority", "100")])).await?;
        let preempted = wait_for("project low to be preempted", Duration::from_secs(60), || async {
            let s = crate::projects::status(&env, &ns, "low").await?;
            if s.preemptions >= 1 { Ok(s) } else { Err(format!("{:?} preemptions {}", s.phase, s.preemptions)) }
        })
        .await?;
        let why = preempted.conditions.iter().find(|c| c.type_ == "Preempted").map(|c| c.message.clone());
        ensure!(why.as_deref().is_some_and(|m| m.contains("urgent")), "{why:?}");
        wait_no_workers(&env, &ns, "low").await?;
        ensure!(wait_admitted(&jobs, "urgent", Duration::from_secs(60)).await? == "e2e-b200", "urgent not on e2e-b200");
        wait_for("Job urgent to complete", Duration::from_secs(60), || async {
            let status = jobs.get("urgent").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            let complete = status.conditions.iter().flatten().any(|c| c.type_ == "Complete" && c.status == "True");
            if complete { Ok(()) } else { Err(format!("{status:?}")) }
        })
        .await?;

        // Its devices back, the project runs again.
        wait_project(&env, &ns, "low", ProjectPhase::Running, Duration::from_secs(60)).await?;
        Ok(())
    })
    .await
}

/// Waits until the Job is suspended again by the operator, its admission forgotten.
async fn wait_resuspended(jobs: &Api<Job>, name: &str) -> anyhow::Result<()> {
    wait_for(&format!("Job {name} to be suspended again"), Duration::from_secs(60), || async {
        let j = jobs.get(name).await.map_err(|e| e.to_string())?;
        let suspended = j.spec.as_ref().and_then(|s| s.suspend) == Some(true);
        let forgotten = !j.annotations().contains_key("sovereign.ai/admitted-pool");
        if suspended && forgotten {
            Ok(())
        } else {
            Err(format!("{:?} {:?}", j.spec.map(|s| s.suspend), j.metadata.annotations))
        }
    })
    .await
}

/// Two tenants of the B200 pool (4 nodes of 8), each granted 16 that the other
/// may borrow while idle. A Job borrows the other tenant's idle half and is
/// reclaimed whole by that tenant's project, then resumes once the project is
/// gone; the other way round, a project borrows and a Job of the owner
/// reclaims it. Borrowing is decided with the admission and recorded on both kinds.
pub async fn a_job_and_a_project_of_two_tenants_borrow_from_each_other_and_are_reclaimed(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-lend-a", "wl-lend-b"], async |names, scope| {
        let (a, b) = (names[0].clone(), names[1].clone());
        pools(scope)?;
        let lend = "[{pool: e2e-b200, accelerators: 16, borrowingLimit: 16}]";
        scope.apply(&alloc_yaml("e2e-wl-lend-a", &[&a], lend, ""))?;
        scope.apply(&alloc_yaml("e2e-wl-lend-b", &[&b], lend, ""))?;
        for (ns, allocation) in [(&a, "e2e-wl-lend-a"), (&b, "e2e-wl-lend-b")] {
            wait_phase(&env, allocation, AllocationPhase::Active, Duration::from_secs(60)).await?;
            wait_policy_params(&env, ns, allocation, &["e2e-b200"]).await?;
        }
        let jobs_a: Api<Job> = Api::namespaced(env.client.clone(), &a);
        let jobs_b: Api<Job> = Api::namespaced(env.client.clone(), &b);
        let borrowed = |j: &Job| j.annotations().get("sovereign.ai/borrowed").map(String::as_str) == Some("true");

        // a's Job of 4 x 8: its own 16 and b's idle 16.
        create_when_admitted(&jobs_a, &job("wide", Some("e2e-wl-lend-a"), 4, pod_template(8, None, json!({})))?)
            .await?;
        ensure!(wait_admitted(&jobs_a, "wide", Duration::from_secs(60)).await? == "e2e-b200", "wide not on e2e-b200");
        ensure!(borrowed(&jobs_a.get("wide").await?), "Job wide runs on b's capacity but is not marked borrowed");
        running_on(&env, &a, "wide", 4).await?;

        // b's project of 2 x 8 takes its own half back: the Job is suspended whole and waits.
        scope.apply(&project_yaml("mine", &b, "e2e-wl-lend-b", "[e2e-b200]", 2, "", ""))?;
        let s = wait_project(&env, &b, "mine", ProjectPhase::Running, Duration::from_secs(60)).await?;
        ensure!(!s.borrowed && s.preempted.iter().any(|v| v.contains(&format!("{a}/wide"))), "{s:?}");
        wait_resuspended(&jobs_a, "wide").await?;
        let reclaimed = wait_event(&env, &a, "wide", "Reclaimed").await?;
        ensure!(reclaimed.contains("mine"), "{reclaimed}");
        ensure!(!wait_event(&env, &a, "wide", "Queued").await?.is_empty(), "a Queued Event without its reason");
        // Its own 16 are free and would take half of its 4 pods: none runs while it waits.
        let pods_a: Api<Pod> = Api::namespaced(env.client.clone(), &a);
        wait_for("the pods of Job wide to go", Duration::from_secs(60), || async {
            let left = pods_a.list(&ListParams::default().labels("job-name=wide")).await.map_err(|e| e.to_string())?;
            if left.items.is_empty() { Ok(()) } else { Err(format!("{} pods left", left.items.len())) }
        })
        .await?;
        ensure!(
            jobs_a.get("wide").await?.spec.and_then(|s| s.suspend) == Some(true),
            "Job wide started while only half of it fits"
        );
        // b's run gone, the Job borrows again and runs whole.
        env.kubectl_ok(&["-n", &b, "delete", "modelproject", "mine", "--wait=false"], None)?;
        ensure!(wait_admitted(&jobs_a, "wide", Duration::from_secs(90)).await? == "e2e-b200", "wide not back");
        running_on(&env, &a, "wide", 4).await?;
        jobs_a.delete("wide", &DeleteParams::background()).await?;

        // The other way round: b's project of 4 x 8 borrows a's idle half (once a's pods are gone)...
        scope.apply(&project_yaml("wide", &b, "e2e-wl-lend-b", "[e2e-b200]", 4, "", ""))?;
        let s = wait_project(&env, &b, "wide", ProjectPhase::Running, Duration::from_secs(90)).await?;
        ensure!(s.borrowed, "project wide runs on a's capacity but is not marked borrowed: {s:?}");
        // ... and a's Job of 2 x 8 takes it back.
        create_when_admitted(&jobs_a, &job("mine", Some("e2e-wl-lend-a"), 2, pod_template(8, None, json!({})))?)
            .await?;
        ensure!(wait_admitted(&jobs_a, "mine", Duration::from_secs(60)).await? == "e2e-b200", "mine not on e2e-b200");
        ensure!(!borrowed(&jobs_a.get("mine").await?), "Job mine runs on its own grant but is marked borrowed");
        let w = wait_project(&env, &b, "wide", ProjectPhase::Queued, Duration::from_secs(60)).await?;
        let why = w.conditions.iter().find(|c| c.type_ == "Preempted").cloned();
        ensure!(
            why.as_ref().is_some_and(|c| c.reason == "Reclaimed" && c.message.contains("e2e-wl-lend-a")),
            "{why:?}"
        );
        ensure!(w.preemptions == 1 && w.restarts == 0, "{w:?}");
        wait_no_workers(&env, &b, "wide").await?;
        running_on(&env, &a, "mine", 2).await?;
        ensure!(jobs_b.list(&ListParams::default()).await?.items.is_empty(), "b has Jobs");
        // a's Job gone, the project runs again.
        jobs_a.delete("mine", &DeleteParams::background()).await?;
        wait_project(&env, &b, "wide", ProjectPhase::Running, Duration::from_secs(90)).await?;
        Ok(())
    })
    .await
}

/// A labelled JobSet of two replicated jobs ("launcher": 1 Job, "workers": 1
/// Job), each of `pods` pods of 8 devices on any pool, with `annotations`.
fn two_replicated_jobs(
    name: &str,
    allocation: &str,
    pods: u32,
    annotations: Value,
    done: Value,
) -> anyhow::Result<DynamicObject> {
    replicated_jobs(name, allocation, &[("launcher", pods, 8), ("workers", pods, 8)], annotations, done)
}

/// A labelled JobSet of one Job per `(name, pods, devices per pod)`, on any pool.
fn replicated_jobs(
    name: &str,
    allocation: &str,
    jobs: &[(&str, u32, u32)],
    annotations: Value,
    done: Value,
) -> anyhow::Result<DynamicObject> {
    let rjs: Vec<Value> = jobs
        .iter()
        .map(|(rj, pods, gpus)| {
            json!({"name": rj, "replicas": 1, "template": {"spec": {"parallelism": pods, "completions": pods,
                "completionMode": "Indexed", "backoffLimit": 0, "template": pod_template(*gpus, None, done.clone())}}})
        })
        .collect();
    object(json!({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": name, "labels": {LABEL: allocation}, "annotations": annotations},
        "spec": {"replicatedJobs": rjs}}))
}

/// Once the JobSet's `with_devices` pods that ask for devices and `without`
/// that ask for none run: each that asks for devices on a node its admission
/// planned (`sovereign.ai/admitted-nodes`, no node with more of them than
/// listed there) and pinned there by the operator (required node affinity on
/// the node's name); none gated any more. Returns the planned nodes.
async fn running_on_planned_nodes(
    env: &Env,
    ns: &str,
    name: &str,
    with_devices: usize,
    without: usize,
) -> anyhow::Result<Vec<String>> {
    let sets = jobsets(env, ns);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let asks = |p: &Pod| {
        let limits = p.spec.as_ref().and_then(|s| s.containers[0].resources.clone()).and_then(|r| r.limits);
        limits.and_then(|l| l.get("nvidia.com/gpu").map(|q| q.0 != "0")).unwrap_or(false)
    };
    let running = wait_for(&format!("the pods of JobSet {name} to run"), Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default().labels(&jobset_pods(name))).await.map_err(|e| e.to_string())?;
        let running: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        let devices = running.iter().filter(|p| asks(p)).count();
        if devices == with_devices && running.len() - devices == without {
            Ok(running)
        } else {
            Err(format!(
                "{devices} of {with_devices} pods with devices and {} of {without} without run",
                running.len() - devices
            ))
        }
    })
    .await?;
    let js = sets.get(name).await?;
    let planned: Vec<String> = js
        .annotations()
        .get("sovereign.ai/admitted-nodes")
        .context("no sovereign.ai/admitted-nodes")?
        .split(',')
        .map(String::from)
        .collect();
    let mut on: std::collections::BTreeMap<String, usize> = Default::default();
    for p in &running {
        let spec = p.spec.clone().unwrap_or_default();
        let gates = spec.scheduling_gates.clone().unwrap_or_default();
        ensure!(gates.is_empty(), "pod {} runs and still lists gates {gates:?}", p.name_any());
        if !asks(p) {
            continue;
        }
        let node = spec.node_name.clone().context("a running pod without a node")?;
        ensure!(planned.contains(&node), "pod {} runs on {node}, not a planned node ({planned:?})", p.name_any());
        let required = spec.affinity.and_then(|a| a.node_affinity?.required_during_scheduling_ignored_during_execution);
        let pinned = required.is_some_and(|r| {
            r.node_selector_terms.iter().all(|t| {
                t.match_fields
                    .iter()
                    .flatten()
                    .any(|f| f.key == "metadata.name" && f.values == Some(vec![node.clone()]))
            })
        });
        ensure!(pinned, "pod {} on {node} is not pinned there by node affinity", p.name_any());
        *on.entry(node).or_default() += 1;
    }
    for (node, pods) in &on {
        let room = planned.iter().filter(|n| *n == node).count();
        ensure!(*pods <= room, "{pods} pods of {name} run on {node}, planned for {room} ({planned:?})");
    }
    Ok(planned)
}

fn jobset_pods(name: &str) -> String {
    format!("jobset.sigs.k8s.io/jobset-name={name}")
}

/// Waits until the JobSet reports Completed.
async fn wait_jobset_completed(sets: &Api<DynamicObject>, name: &str) -> anyhow::Result<()> {
    wait_for(&format!("JobSet {name} to complete"), Duration::from_secs(120), || async {
        let js = sets.get(name).await.map_err(|e| e.to_string())?;
        let conditions = js.data.pointer("/status/conditions").cloned().unwrap_or_default();
        let done =
            conditions.as_array().into_iter().flatten().any(|c| c["type"] == "Completed" && c["status"] == "True");
        if done { Ok(()) } else { Err(conditions.to_string()) }
    })
    .await
}

pub async fn a_jobset_of_two_replicated_jobs_waits_whole_then_runs_whole_and_in_one_rack_when_required(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-jobset"], async |names, scope| {
        let ns = names[0].clone();
        granted(&env, scope, &ns, "e2e-wl-jobset", "[{pool: e2e-b200, accelerators: 32}]", &["e2e-b200"]).await?;
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        let sets = jobsets(&env, &ns);

        // A Job of 2 x 8 holds half the grant until deleted.
        create_when_admitted(&jobs, &job("filler", Some("e2e-wl-jobset"), 2, pod_template(8, None, json!({})))?)
            .await?;
        ensure!(wait_admitted(&jobs, "filler", Duration::from_secs(60)).await? == "e2e-b200", "filler not on B200");
        running_on(&env, &ns, "filler", 2).await?;

        // 2 replicated jobs x 2 pods x 8 = 32: half of it would fit, none of it runs.
        let done = json!({"sim.sovereign.ai/complete-after": "3s"});
        create_when_admitted(&sets, &two_replicated_jobs("pair", "e2e-wl-jobset", 2, json!({}), done.clone())?).await?;
        let queued = wait_event_on(&env, &ns, "JobSet", "pair", "Queued").await?;
        ensure!(queued.contains("32"), "the Queued reason does not give the 32 devices it needs: {queued}");
        let js = sets.get("pair").await?;
        ensure!(suspended(&js) == Some(true), "JobSet pair started while only half of it fits");
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
        let started = pods.list(&ListParams::default().labels(&jobset_pods("pair"))).await?;
        ensure!(started.items.is_empty(), "JobSet pair half-runs: {} pods", started.items.len());

        // The filler goes: the whole JobSet is admitted, pinned, runs on B200 and completes.
        jobs.delete("filler", &kube::api::DeleteParams::background()).await?;
        ensure!(wait_admitted(&sets, "pair", Duration::from_secs(90)).await? == "e2e-b200", "pair not on B200");
        let admitted = wait_event_on(&env, &ns, "JobSet", "pair", "Admitted").await?;
        ensure!(admitted.starts_with("admitted to pool e2e-b200 on nodes "), "{admitted}");
        let js = sets.get("pair").await?;
        for rj in js.data.pointer("/spec/replicatedJobs").and_then(Value::as_array).context("replicatedJobs")? {
            let t = &rj["template"]["spec"]["template"];
            ensure!(t["spec"]["nodeSelector"][B200.0] == B200.1, "{} not pinned to B200: {}", rj["name"], t["spec"]);
            ensure!(
                t["metadata"]["labels"]["sovereign.ai/jobset"] == "pair",
                "{} pods not labelled: {}",
                rj["name"],
                t
            );
            ensure!(
                t["spec"]["schedulingGates"] == json!([{"name": "sovereign.ai/placement"}]),
                "{} pods not gated for their planned nodes: {}",
                rj["name"],
                t["spec"]
            );
        }
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
        for n in running_selected(&env, &ns, &jobset_pods("pair"), 4).await? {
            let node = nodes.get(&n).await?;
            ensure!(node.labels().get(B200.0).map(String::as_str) == Some(B200.1), "a pod of pair ran on {n}");
        }
        running_on_planned_nodes(&env, &ns, "pair", 4, 0).await?;
        wait_jobset_completed(&sets, "pair").await?;

        // Required in one rack (2 B200 nodes of 8): one pod of 8 holds a node of some rack; the
        // JobSet of 2 x 1 x 8 runs whole in one rack.
        create_when_admitted(&jobs, &job("corner", Some("e2e-wl-jobset"), 1, pod_template(8, None, json!({})))?)
            .await?;
        wait_admitted(&jobs, "corner", Duration::from_secs(60)).await?;
        running_on(&env, &ns, "corner", 1).await?;
        let rack = "topology.sovereign.ai/rack";
        let notes = json!({"sovereign.ai/topology-key": rack, "sovereign.ai/topology-mode": "Required"});
        create_when_admitted(&sets, &two_replicated_jobs("racked", "e2e-wl-jobset", 1, notes, done)?).await?;
        wait_admitted(&sets, "racked", Duration::from_secs(60)).await?;
        let admitted = wait_event_on(&env, &ns, "JobSet", "racked", "Admitted").await?;
        let js = sets.get("racked").await?;
        let selector = &js.data["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["nodeSelector"];
        let domain = selector[rack].as_str().context(format!("no rack in the pinned nodeSelector {selector}"))?;
        ensure!(admitted.ends_with(&format!("(all in {rack}={domain})")), "{admitted}");
        let mut racks = Vec::new();
        for n in running_selected(&env, &ns, &jobset_pods("racked"), 2).await? {
            racks.push(nodes.get(&n).await?.labels().get(rack).cloned().unwrap_or_default());
        }
        racks.dedup();
        ensure!(racks == [domain], "the pods of racked ran in racks {racks:?}, not all in {domain}");
        running_on_planned_nodes(&env, &ns, "racked", 2, 0).await?;
        wait_jobset_completed(&sets, "racked").await?;
        Ok(())
    })
    .await
}

/// The planner and the scheduler place pods by different rules: for 4 pods of 4 devices on four
/// empty nodes of 8 the planner lists one pod per node, and the scheduler, left to itself, put two
/// on one node (seen with the gate left out: "2 pods of packed run on b200-01, planned for 1"). An
/// admitted JobSet's pods are made gated and run where the planner counted them, each pinned to
/// its node by the operator; its launcher, which asks for no devices, is only ungated.
pub async fn a_jobsets_pods_run_on_its_planned_nodes_wherever_the_scheduler_would_put_them(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-set-nodes"], async |names, scope| {
        let ns = names[0].clone();
        let grant = "[{pool: e2e-b200, accelerators: 32}]";
        granted(&env, scope, &ns, "e2e-wl-set-nodes", grant, &["e2e-b200"]).await?;
        let sets = jobsets(&env, &ns);
        let packed = replicated_jobs(
            "packed",
            "e2e-wl-set-nodes",
            &[("launcher", 1, 0), ("workers", 4, 4)],
            json!({}),
            json!({}),
        )?;
        create_when_admitted(&sets, &packed).await?;
        ensure!(wait_admitted(&sets, "packed", Duration::from_secs(60)).await? == "e2e-b200", "packed not on B200");
        let planned = running_on_planned_nodes(&env, &ns, "packed", 4, 1).await?;
        ensure!(planned.len() == 4, "one planned node per pod with devices: {planned:?}");

        // The operator may update such a pod (its pin, its gate) but not relabel it: a server-side
        // dry run with its ServiceAccount's token (kubectl patch would read the pod first, which
        // it may not), refused or not by the chart's least-privilege policy.
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
        let all = pods.list(&ListParams::default().labels(&jobset_pods("packed"))).await?.items;
        // The ledger holds each of them (the chart's ledger-finalizer policy), as a Job's.
        for p in &all {
            let held = p.finalizers().iter().any(|f| f == LEDGER_FINALIZER);
            ensure!(held, "JobSet pod {} has finalizers {:?}", p.name_any(), p.finalizers());
        }
        let one = all.first().context("a pod of packed")?.name_any();
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(env.operator_kubeconfig()?)?,
            &Default::default(),
        )
        .await?;
        let as_op: Api<Pod> = Api::namespaced(kube::Client::try_from(config)?, &ns);
        let patch = async |body: Value| {
            let pp = kube::api::PatchParams { dry_run: true, ..Default::default() };
            as_op.patch(&one, &pp, &kube::api::Patch::Merge(&body)).await.map(|_| ()).map_err(|e| e.to_string())
        };
        let relabelled = patch(json!({"metadata": {"labels": {"app": "x"}}})).await;
        ensure!(
            relabelled.as_ref().is_err_and(|e| e.contains("only leaving its labels and containers as they are")),
            "the operator relabelled a JobSet's pod: {relabelled:?}"
        );
        let annotated = patch(json!({"metadata": {"annotations": {"e2e": "x"}}})).await;
        ensure!(annotated.is_ok(), "the operator may not update a JobSet's pod: {annotated:?}");
        Ok(())
    })
    .await
}

pub async fn a_jobset_that_a_trainjob_made_is_admitted_by_the_same_path(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-trainjob"], async |names, scope| {
        let ns = names[0].clone();
        granted(&env, scope, &ns, "e2e-wl-trainjob", "[{pool: e2e-b200, accelerators: 16}]", &["e2e-b200"]).await?;

        // The TrainJob as a researcher writes it: the label on it (the API server holds it) and in
        // spec.labels (the Trainer puts those on the JobSet it makes), the pools in spec.annotations.
        let trainjobs = trainjobs(&env, &ns);
        let tj = object(json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "llm", "labels": {LABEL: "e2e-wl-trainjob"}},
            "spec": {"runtimeRef": {"name": "torch-distributed"},
                     "labels": {LABEL: "e2e-wl-trainjob"}, "annotations": {"sovereign.ai/pools": "e2e-b200"},
                     "trainer": {"numNodes": 2, "resourcesPerNode": {"limits": {"nvidia.com/gpu": "8"}}}}}))?;
        let tj = create_when_admitted(&trainjobs, &tj).await?;
        ensure!(suspended(&tj) == Some(true), "the TrainJob is not held: {:?}", tj.data.get("spec"));

        // The JobSet the Trainer (not run here) makes of it: same name, its controller the TrainJob,
        // the TrainJob's spec.labels and spec.annotations, suspended as the TrainJob is, one
        // replicated job "node" of numNodes pods.
        let done = json!({"sim.sovereign.ai/complete-after": "3s"});
        let mut template = pod_template(8, None, done);
        template["metadata"]["labels"] = json!({"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"});
        let made = object(json!({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": "llm", "labels": {LABEL: "e2e-wl-trainjob"},
                "annotations": {"sovereign.ai/pools": "e2e-b200"},
                "ownerReferences": [{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "name": "llm",
                    "uid": tj.metadata.uid, "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"suspend": true, "replicatedJobs": [{"name": "node", "replicas": 1,
                "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                    "spec": {"parallelism": 2, "completions": 2, "backoffLimit": 0, "template": template}}}]}}))?;
        let sets = jobsets(&env, &ns);
        create_when_admitted(&sets, &made).await?;

        // Admitted by the same path: pinned, started; the TrainJob is started with it (the
        // Trainer would otherwise hold its JobSet suspended).
        ensure!(wait_admitted(&sets, "llm", Duration::from_secs(60)).await? == "e2e-b200", "llm not on B200");
        wait_for("the TrainJob to be started with its JobSet", Duration::from_secs(30), || async {
            let tj = trainjobs.get("llm").await.map_err(|e| e.to_string())?;
            if suspended(&tj) == Some(false) { Ok(()) } else { Err(format!("{:?}", tj.data.get("spec"))) }
        })
        .await?;
        let admitted = wait_event_on(&env, &ns, "JobSet", "llm", "Admitted").await?;
        ensure!(admitted.starts_with("admitted to pool e2e-b200"), "{admitted}");
        running_selected(&env, &ns, &jobset_pods("llm"), 2).await?;
        wait_jobset_completed(&sets, "llm").await?;
        Ok(())
    })
    .await
}

pub async fn a_higher_priority_project_preempts_a_running_jobset_which_resumes_whole_later(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-set-preempt"], async |names, scope| {
        let ns = names[0].clone();
        let grant = "[{pool: e2e-b200, accelerators: 16}]";
        granted(&env, scope, &ns, "e2e-wl-set-preempt", grant, &["e2e-b200"]).await?;
        let sets = jobsets(&env, &ns);

        // The JobSet takes the whole grant (2 replicated jobs x 1 pod x 8) and runs until preempted.
        create_when_admitted(&sets, &two_replicated_jobs("low", "e2e-wl-set-preempt", 1, json!({}), json!({}))?)
            .await?;
        ensure!(wait_admitted(&sets, "low", Duration::from_secs(60)).await? == "e2e-b200", "low not on B200");
        running_selected(&env, &ns, &jobset_pods("low"), 2).await?;

        // A project of priority 100 needs the same 16: the JobSet is suspended again, its pods go.
        let done = "sim.sovereign.ai/complete-after: \"5s\"";
        scope.apply(&project_yaml("high", &ns, "e2e-wl-set-preempt", "[e2e-b200]", 2, "  priority: 100\n", done))?;
        wait_for("JobSet low to be suspended again", Duration::from_secs(60), || async {
            let js = sets.get("low").await.map_err(|e| e.to_string())?;
            let forgotten = !js.annotations().contains_key("sovereign.ai/admitted-pool");
            if suspended(&js) == Some(true) && forgotten {
                Ok(())
            } else {
                Err(format!("{:?}", js.metadata.annotations))
            }
        })
        .await?;
        let preempted = wait_event_on(&env, &ns, "JobSet", "low", "Preempted").await?;
        ensure!(preempted.contains("high"), "{preempted}");
        wait_project(&env, &ns, "high", ProjectPhase::Running, Duration::from_secs(60)).await?;

        // The project finishes; the JobSet is admitted again and all its pods run again.
        ensure!(wait_admitted(&sets, "low", Duration::from_secs(120)).await? == "e2e-b200", "low not back on B200");
        running_selected(&env, &ns, &jobset_pods("low"), 2).await?;
        // Its templates kept the gate: the pods of the new admission are pinned to its nodes too.
        running_on_planned_nodes(&env, &ns, "low", 2, 0).await?;
        Ok(())
    })
    .await
}

/// The ledger charges an admitted Job's pods as it charges a ModelProject's workers: the Job's
/// hours in the allocation's status equal its pods' own lifetimes (`startTime` to the container's
/// `finishedAt`, watched by the test) x devices x the pool's chargeFactor, and `report` lists
/// them under the Job.
pub async fn a_jobs_hours_are_its_pods_lifetimes_x_devices_x_charge_factor(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["wl-ledger"], async |names, scope| {
        let ns = names[0].clone();
        let factor = 1.5;
        scope.apply(&pool_yaml("e2e-h200", "nvidia.com/gpu", H200, factor))?;
        scope.apply(&alloc_yaml("e2e-wl-ledger", &[&ns], "[{pool: e2e-h200, accelerators: 16}]", ""))?;
        wait_phase(&env, "e2e-wl-ledger", AllocationPhase::Active, Duration::from_secs(60)).await?;
        wait_policy_params(&env, &ns, "e2e-wl-ledger", &["e2e-h200"]).await?;
        let seen: crate::ledger::Seen = Default::default();
        let watch = crate::ledger::watch_pods(&env, &ns, seen.clone());

        // 3 pods of 4 devices, each running about 3 s.
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        let done = json!({"sim.sovereign.ai/complete-after": "3s"});
        create_when_admitted(&jobs, &job("counted", Some("e2e-wl-ledger"), 3, pod_template(4, None, done))?).await?;
        wait_admitted(&jobs, "counted", Duration::from_secs(60)).await?;
        wait_for("Job counted to complete", Duration::from_secs(90), || async {
            let status = jobs.get("counted").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            let complete = status.conditions.iter().flatten().any(|c| c.type_ == "Complete" && c.status == "True");
            if complete && status.succeeded == Some(3) { Ok(()) } else { Err(format!("{status:?}")) }
        })
        .await?;

        let allocs: Api<GpuAllocation> = Api::all(env.client.clone());
        let key = format!("{ns}/counted");
        let st = wait_for("the grant's books to close on the Job", Duration::from_secs(60), || async {
            let st = allocs.get("e2e-wl-ledger").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            let open = st.ledger.as_ref().is_some_and(|l| l.open.iter().any(|o| o.end_millis.is_none()));
            let listed = st.project_hours.iter().any(|h| h.project == key && h.kind.as_deref() == Some("Job"));
            if st.charge_rate == 0.0 && !open && listed { Ok(st) } else { Err(format!("{st:?}")) }
        })
        .await?;
        watch.abort();
        let now = Timestamp::now().as_millisecond();
        let pods = seen.lock().map_err(|_| anyhow::anyhow!("seen lock"))?.clone();
        ensure!(pods.len() == 3, "{} pods seen", pods.len());
        for (p, _) in pods.values() {
            let owner = p.owner_references().iter().find(|o| o.controller == Some(true)).map(|o| o.name.clone());
            ensure!(owner.as_deref() == Some("counted"), "{} is owned by {owner:?}", p.name_any());
        }
        let truth_ms: f64 = pods.values().map(|(p, gone)| crate::ledger::truth(p, *gone, 4.0 * factor, now)).sum();
        let job_hours: f64 = st.project_hours.iter().filter(|h| h.project == key).map(|h| h.accelerator_hours_used).sum();
        let job_ms = job_hours * 3_600_000.0;
        println!(
            "ledger: Job counted charged {:.3} weighted s, its pods' own timestamps say {:.3} s (3 pods x 4 x {factor})",
            job_ms / 1e3,
            truth_ms / 1e3
        );
        ensure!(truth_ms >= 3.0 * 4.0 * factor * 2_000.0, "the pods ran {truth_ms} ms: not the run they were set for");
        // Both sides read the same whole-second times; the status keeps hours to 6 decimals.
        ensure!((job_ms - truth_ms).abs() <= 10.0, "the Job was charged {job_ms} ms, its pods say {truth_ms} ms");
        ensure!(
            (st.accelerator_hours_used - job_hours).abs() < 1e-5,
            "the allocation {} h, its only workload {job_hours} h",
            st.accelerator_hours_used
        );

        // `report` lists the Job's hours as one workload.
        let out = std::process::Command::new(&env.operator_bin)
            .args(["report", "-o", "json", "--kubeconfig"])
            .arg(&env.kubeconfig)
            .output()?;
        ensure!(out.status.success(), "report failed: {}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout)?;
        let name = format!("Job {key}");
        let row = report["rows"].as_array().into_iter().flatten().find(|r| r["section"] == "workload" && r["name"] == name);
        let hours = row.and_then(|r| r["acceleratorHours"].as_f64()).context("no workload row for the Job")?;
        ensure!((hours - job_hours).abs() < 1e-5, "report says {hours} h, the status {job_hours} h");
        Ok(())
    })
    .await
}

const LEDGER_FINALIZER: &str = "sovereign.ai/usage-ledger";

/// The pods of Job `job`, as they are now (none once they are gone).
async fn job_pods(env: &Env, ns: &str, job: &str) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let selector = format!("job-name={job}");
    Ok(pods.list(&ListParams::default().labels(&selector)).await.map_err(|e| e.to_string())?.items)
}

/// Waits until Job `job`'s pods are all gone.
async fn wait_pods_gone(env: &Env, ns: &str, job: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_for(&format!("the pods of Job {job} to go"), timeout, || async {
        let left: Vec<String> = job_pods(env, ns, job)
            .await?
            .iter()
            .map(|p| {
                format!(
                    "{} (deleting {}, finalizers {:?})",
                    p.name_any(),
                    p.metadata.deletion_timestamp.is_some(),
                    p.finalizers()
                )
            })
            .collect();
        if left.is_empty() { Ok(()) } else { Err(left.join(", ")) }
    })
    .await
}

/// Creates Job `name` of `pods` pods of 2 devices that run until deleted, waits
/// until the operator admitted it and its pods run, and checks that each carries
/// the ledger's finalizer from its creation (the chart's ledger-finalizer policy).
async fn running_held_job(
    env: &Env,
    jobs: &Api<Job>,
    ns: &str,
    name: &str,
    pods: u32,
    allocation: &str,
) -> anyhow::Result<()> {
    create_when_admitted(jobs, &job(name, Some(allocation), pods, pod_template(2, None, json!({})))?).await?;
    wait_admitted(jobs, name, Duration::from_secs(60)).await?;
    running_on(env, ns, name, pods as usize).await?;
    for p in job_pods(env, ns, name).await.map_err(anyhow::Error::msg)? {
        ensure!(
            p.finalizers().iter().any(|f| f == LEDGER_FINALIZER),
            "pod {} has finalizers {:?}",
            p.name_any(),
            p.finalizers()
        );
    }
    Ok(())
}

/// The pods of an admitted Job carry the ledger's finalizer, as ModelProject workers do, so that
/// a pod deleted while the operator is down still has its hours recorded: a Job deleted while the
/// operator runs loses its pods at once; one deleted while the operator is down keeps its pods
/// (being deleted) until the operator is back, records their hours to their deletion, and then
/// lets them go; and a Job whose allocation is gone loses its pods at once (nothing would ever
/// charge them).
pub async fn an_admitted_jobs_pods_are_held_by_the_ledger_until_their_hours_are_recorded_never_stuck(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let kubeconfig = env.operator_kubeconfig()?;
    in_namespaces(&env, &["wl-held-ledger"], async |names, scope| {
        let ns = names[0].clone();
        let alloc = "e2e-wl-held-ledger";
        scope.apply(&pool_yaml("e2e-h200", "nvidia.com/gpu", H200, 1.0))?;
        let alloc_manifest = alloc_yaml(alloc, &[&ns], "[{pool: e2e-h200, accelerators: 16}]", "");
        scope.apply(&alloc_manifest)?;
        wait_phase(&env, alloc, AllocationPhase::Active, Duration::from_secs(60)).await?;
        wait_policy_params(&env, &ns, alloc, &["e2e-h200"]).await?;
        let seen: crate::ledger::Seen = Default::default();
        let watch = crate::ledger::watch_pods(&env, &ns, seen.clone());
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);

        // The ledger charges a Job's 2 pods of 2 devices while they run 3 s (the scenario's run:
        // pod times are whole seconds), then the Job is deleted.
        let allocs: Api<GpuAllocation> = Api::all(env.client.clone());
        let charged_running = || async {
            wait_for("the ledger to charge the Job's pods", Duration::from_secs(30), || async {
                let st = allocs.get(alloc).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
                if st.charge_rate == 4.0 { Ok(()) } else { Err(format!("charge rate {}", st.charge_rate)) }
            })
            .await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            anyhow::Ok(())
        };

        // Deleted while the operator runs: its pods go at once.
        running_held_job(&env, &jobs, &ns, "kept", 2, alloc).await?;
        charged_running().await?;
        jobs.delete("kept", &kube::api::DeleteParams::background()).await?;
        wait_pods_gone(&env, &ns, "kept", Duration::from_secs(30)).await?;

        // Deleted while the operator is down: its pods stay, being deleted, until it is back.
        running_held_job(&env, &jobs, &ns, "outage", 2, alloc).await?;
        charged_running().await?;
        let old = env.operator.lock().await.take().context("no shared operator")?;
        old.kill().await?;
        let down = async {
            jobs.delete("outage", &kube::api::DeleteParams::background()).await?;
            wait_for("the pods of Job outage to be deleted", Duration::from_secs(30), || async {
                let pods = job_pods(&env, &ns, "outage").await?;
                let deleting = pods.iter().filter(|p| p.metadata.deletion_timestamp.is_some()).count();
                if deleting == 2 { Ok(()) } else { Err(format!("{deleting} of {} pods being deleted", pods.len())) }
            })
            .await?;
            // The outage goes on past the pods' grace period (1 s) and the Job controller's
            // release of its own finalizer: the ledger's finalizer still holds them.
            tokio::time::sleep(Duration::from_secs(4)).await;
            let pods = job_pods(&env, &ns, "outage").await.map_err(anyhow::Error::msg)?;
            ensure!(pods.len() == 2, "{} pods of Job outage left while the operator is down", pods.len());
            for p in &pods {
                ensure!(
                    p.finalizers().iter().any(|f| f == LEDGER_FINALIZER),
                    "{} lost the ledger finalizer: {:?}",
                    p.name_any(),
                    p.finalizers()
                );
            }
            anyhow::Ok(())
        }
        .await;
        let mut op = Operator::start(&env, &kubeconfig, free_port()?, "operator-held-ledger.log")?;
        op.wait_ready(Duration::from_secs(60)).await?;
        *env.operator.lock().await = Some(op);
        down?;
        wait_pods_gone(&env, &ns, "outage", Duration::from_secs(60)).await?;

        // Both Jobs' hours are recorded, to their pods' deletion (the Jobs are gone: their hours
        // stay in the allocation's, under no workload's name). Had the outage's pods gone unseen,
        // they would be charged only up to the last reckoning before it.
        let st = wait_for("the grant's books to close", Duration::from_secs(60), || async {
            let st = allocs.get(alloc).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            let open = st.ledger.as_ref().is_none_or(|l| !l.open.is_empty());
            if st.charge_rate == 0.0 && !open && st.accelerator_hours_used > 0.0 {
                Ok(st)
            } else {
                Err(format!("{st:?}"))
            }
        })
        .await?;
        watch.abort();
        let now = Timestamp::now().as_millisecond();
        let pods = seen.lock().map_err(|_| anyhow::anyhow!("seen lock"))?.clone();
        let mut truth_ms = 0.0;
        for job in ["kept", "outage"] {
            let owned: Vec<_> = pods
                .values()
                .filter(|(p, _)| p.owner_references().iter().any(|o| o.controller == Some(true) && o.name == job))
                .collect();
            ensure!(owned.len() == 2, "{} pods of Job {job} seen", owned.len());
            let ms: f64 = owned.iter().map(|(p, gone)| crate::ledger::truth(p, *gone, 2.0, now)).sum();
            ensure!(
                ms >= 2.0 * 2.0 * 2_000.0,
                "the pods of Job {job} ran {ms} weighted ms, not the 3 s they were given"
            );
            truth_ms += ms;
        }
        let charged_ms = st.accelerator_hours_used * 3_600_000.0;
        println!(
            "ledger: Jobs kept and outage charged {:.3} weighted s, their pods say {:.3} s",
            charged_ms / 1e3,
            truth_ms / 1e3
        );
        // Whole-second pod times on both sides; the status keeps hours to 6 decimals.
        ensure!(
            (charged_ms - truth_ms).abs() <= 40.0,
            "the Jobs were charged {charged_ms} ms, their pods say {truth_ms} ms"
        );

        // Its allocation gone, a Job's deleted pods go at once: no allocation would release them.
        running_held_job(&env, &jobs, &ns, "orphan", 1, alloc).await?;
        scope.delete(&alloc_manifest)?;
        jobs.delete("orphan", &kube::api::DeleteParams::background()).await?;
        wait_pods_gone(&env, &ns, "orphan", Duration::from_secs(30)).await?;
        Ok(())
    })
    .await
}
