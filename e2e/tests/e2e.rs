//! The end-to-end suite. Runs against the cluster in KUBECONFIG with the
//! dev profile's simulated nodes (see e2e/cluster). Tests run one at a time:
//! pools are cluster-scoped and select the same nodes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use libtest_mimic::{Arguments, Failed, Trial};
use sovereign_e2e::{Env, Operator, TestNamespace, free_port, http_get, wait_for};
use sovereign_operator::api::{AcceleratorPool, find_condition};

mod bad_input;
mod dashboard;
mod grants;
mod incluster;
mod ledger;
mod plan;
mod privilege;
mod projects;
mod refusals;
mod sharing;
mod training;
mod upgrade;
mod workloads;

type TestFn = fn(Arc<Env>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

macro_rules! tests {
    ($($name:path),* $(,)?) => {
        vec![$((stringify!($name).rsplit("::").next().unwrap().trim(), (|env| Box::pin($name(env))) as TestFn)),*]
    };
}

fn main() -> anyhow::Result<()> {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let rt = Arc::new(tokio::runtime::Runtime::new()?);
    let env = Arc::new(rt.block_on(Env::from_env())?);

    // Set up once: the chart (CRDs, RBAC, ServiceAccount), and one operator
    // running as the chart's ServiceAccount for the tests that need it.
    env.install_chart()?;
    let op_kubeconfig = env.operator_kubeconfig()?;
    rt.block_on(async {
        let mut operator = Operator::start(&env, &op_kubeconfig, free_port()?, "operator.log")?;
        operator.wait_ready(Duration::from_secs(90)).await?;
        *env.operator.lock().await = Some(operator);
        anyhow::Ok(())
    })?;

    let real_node = incluster::available(&env);
    // Last: the first of these stops the shared host-run operator. (The first
    // needs the dev cluster's own kube-apiserver process, as they do.)
    let in_cluster = tests![
        incluster::a_run_submitted_right_after_an_api_server_restart_is_admitted,
        incluster::the_image_runs_on_the_real_node_in_a_restricted_namespace_and_finishes_a_run,
        incluster::an_upgrade_to_another_tag_never_runs_two_operators,
        incluster::two_replicas_roll_out_and_a_standby_takes_over_a_killed_or_deleted_leader,
        incluster::api_server_outages_never_let_two_replicas_act_at_once,
    ];
    let in_cluster_count = in_cluster.len();
    // Real training on the real node, with the shared host-run operator (before the in-cluster tests).
    let trainer = training::available(&env);
    let real_training = tests![
        training::a_real_two_worker_run_finds_its_peers_by_the_rendezvous_name_and_agrees,
        training::a_real_three_worker_run_finds_its_peers_by_the_rendezvous_name_and_agrees,
        training::a_killed_real_worker_restarts_the_gang_from_its_checkpoint,
        training::a_preempted_real_run_checkpoints_in_its_grace_period_and_resumes,
        training::real_workers_are_charged_their_own_lifetimes_to_the_second,
    ];
    let real_training_count = real_training.len();
    let trials = tests![
        crds_are_established,
        crds_folder_applies_on_its_own,
        examples_apply,
        bad_input::bad_objects_are_refused_at_apply_and_a_good_project_still_runs,
        privilege::the_operator_writes_only_in_tenant_namespaces_and_on_pool_nodes,
        privilege::the_operator_changes_an_admitted_jobs_pod_only_by_removing_the_ledger_finalizer,
        allocation_of_a_project_is_immutable,
        explain_reads_as_documentation,
        gpu_pod_lands_on_a_gpu_node_and_runs,
        operator_becomes_ready_and_stops_on_sigterm,
        pool_status_counts_nodes_and_reports_conflicts,
        grants::two_allocations_sum_in_one_quota_that_the_api_server_enforces,
        grants::a_dedicated_grant_reserves_nodes_in_one_rack_and_releases_them,
        grants::a_grant_that_does_not_fit_waits_and_is_admitted_when_room_appears,
        grants::a_window_opens_and_closes_on_time,
        grants::a_tiny_budget_is_used_up_by_a_running_pod,
        grants::a_deleted_reserved_node_is_replaced,
        grants::a_killed_operator_converges_and_a_restart_writes_nothing,
        workloads::labelled_workloads_are_held_at_creation_and_unlabelled_ones_untouched,
        workloads::a_workload_naming_a_foreign_allocation_is_refused_with_the_policys_words,
        workloads::a_plain_pod_outside_the_grants_is_refused_with_the_way_in,
        workloads::a_fallback_list_across_resource_names_is_refused_at_creation_saying_why,
        workloads::an_allocation_that_refuses_direct_pods_lets_only_admitted_workloads_in,
        workloads::jobs_and_jobsets_run_to_completion_in_the_simulated_pools,
        workloads::an_indexed_job_falls_back_whole_from_a_full_h200_grant_to_b200_and_completes,
        workloads::a_higher_priority_project_preempts_a_running_job_which_resumes_later,
        workloads::a_higher_priority_job_preempts_a_running_project_which_resumes_later,
        workloads::a_job_and_a_project_of_two_tenants_borrow_from_each_other_and_are_reclaimed,
        workloads::a_jobset_of_two_replicated_jobs_waits_whole_then_runs_whole_and_in_one_rack_when_required,
        workloads::a_jobsets_pods_run_on_its_planned_nodes_wherever_the_scheduler_would_put_them,
        workloads::a_jobset_that_a_trainjob_made_is_admitted_by_the_same_path,
        workloads::a_higher_priority_project_preempts_a_running_jobset_which_resumes_whole_later,
        workloads::a_jobs_hours_are_its_pods_lifetimes_x_devices_x_charge_factor,
        workloads::an_admitted_jobs_pods_are_held_by_the_ledger_until_their_hours_are_recorded_never_stuck,
        projects::a_gang_lands_whole_on_the_npu_pool_and_falls_back_whole_to_gpus,
        projects::a_gang_larger_than_any_rack_waits_with_the_reason,
        projects::a_project_that_can_never_fit_says_why,
        projects::a_failing_worker_restarts_the_gang_until_max_restarts,
        projects::a_finished_run_frees_its_devices_for_the_next,
        projects::suspend_gives_back_devices_and_resume_requeues,
        projects::losing_a_node_restarts_the_gang_without_counting_it,
        projects::an_expired_allocation_stops_its_runs,
        projects::a_killed_operator_mid_admission_leaves_no_duplicate_or_orphan,
        refusals::refused_and_unsafe_templates_are_never_silent_and_hold_nothing,
        sharing::a_higher_priority_run_preempts_exactly_the_gang_it_needs,
        sharing::an_equal_priority_run_never_preempts,
        sharing::a_borrower_runs_on_idle_capacity_and_is_reclaimed_by_the_owner,
        sharing::a_hard_budget_stops_runs_and_an_admission_budget_does_not,
        sharing::a_non_preemptible_run_needs_consent_and_is_then_never_preempted,
        sharing::contention_over_minutes_never_thrashes,
        ledger::every_allocation_is_charged_its_pods_own_lifetimes_across_restarts_and_an_outage,
        dashboard::every_dashboard_query_returns_series_from_a_real_prometheus,
        plan::the_operator_does_what_plan_said,
        incluster::the_chart_roles_let_tenants_submit_runs_and_only_admins_grant,
        upgrade::objects_made_under_an_earlier_chart_are_served_and_reconciled_after_an_upgrade,
    ]
    .into_iter()
    .map(|t| (t, true))
    .chain(real_training.into_iter().map(|t| (t, trainer)))
    .chain(in_cluster.into_iter().map(|t| (t, real_node)))
    .map(|((name, test), runnable)| {
        let (env, rt) = (env.clone(), rt.clone());
        // The contention scenario runs for minutes by design.
        let limit = if name.starts_with("contention_over_minutes") {
            420
        } else if name.starts_with("every_allocation_is_charged") {
            180 * ledger::scale()
        } else if name.contains("_real_") {
            // real processes: a cold interpreter start and paced steps, on shared cores
            420
        } else {
            180
        };
        let trial = Trial::test(name, move || {
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(limit), test(env)).await })
                .map_err(|_| Failed::from(format!("timed out after {limit}s")))?
                .map_err(|e| Failed::from(format!("{e:#}")))
        });
        // Without the dev cluster's real node (kind) they are reported as ignored, never passed.
        trial.with_ignored_flag(!runnable)
    })
    .collect();
    if !real_node {
        eprintln!("no real node in this cluster: the {in_cluster_count} in-cluster tests are ignored");
    }
    if !trainer {
        eprintln!("no trainer pool on a real node: the {real_training_count} real training tests are ignored");
    }

    let conclusion = libtest_mimic::run(&args, trials);
    // The in-cluster tests stop it earlier when they run.
    if let Some(operator) = env.operator.blocking_lock().take() {
        let status = rt.block_on(operator.terminate(Duration::from_secs(30)))?;
        if !status.success() {
            bail!("the shared operator exited with {status} on SIGTERM");
        }
    }
    conclusion.exit()
}

async fn crds_are_established(env: Arc<Env>) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for name in [
        "acceleratorpools.sovereign.ai",
        "gpuallocations.sovereign.ai",
        "modelprojects.sovereign.ai",
        "workloadadmissions.sovereign.ai",
    ] {
        let crd = crds.get(name).await.with_context(|| format!("CRD {name}"))?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        ensure!(established, "CRD {name} is not Established");
        let keep = crd.metadata.annotations.unwrap_or_default().get("helm.sh/resource-policy").cloned();
        ensure!(keep.as_deref() == Some("keep"), "CRD {name} from the chart lacks resource-policy keep");
    }
    Ok(())
}

/// `kubectl apply -f crds/` works without Helm (client-side apply stores the
/// whole object in an annotation, so this also guards the CRDs' size).
async fn crds_folder_applies_on_its_own(env: Arc<Env>) -> anyhow::Result<()> {
    let crds = env.repo.join("crds");
    let files = std::fs::read_dir(&crds)?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "yaml")))
        .count();
    ensure!(files >= 4, "expected the CRD files in {}", crds.display());
    let out = env.kubectl_ok(&["apply", "--dry-run=server", "-f", crds.to_str().unwrap()], None)?;
    ensure!(out.matches("customresourcedefinition").count() == files, "{files} files, but: {out}");
    Ok(())
}

async fn examples_apply(env: Arc<Env>) -> anyhow::Result<()> {
    let dir = env.repo.join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    // the manifests (examples/train/ holds the trainer image's files)
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    ensure!(files.len() >= 4, "expected the example manifests in {}", dir.display());
    let result = async {
        for f in &files {
            env.kubectl_ok(&["apply", "-f", f.to_str().unwrap()], None)?;
        }
        let out = env.kubectl_ok(&["get", "sovereign", "-A", "-o", "name"], None)?;
        for want in [
            "acceleratorpool.sovereign.ai/atom",
            "gpuallocation.sovereign.ai/lgai-wbl-phase2",
            "modelproject.sovereign.ai/solar-7b-pretrain",
        ] {
            ensure!(out.contains(want), "`kubectl get sovereign` lacks {want}: {out}");
        }
        anyhow::Ok(())
    }
    .await;
    for f in files.iter().rev() {
        env.kubectl_ok(&["delete", "--ignore-not-found", "--wait=false", "-f", f.to_str().unwrap()], None)?;
    }
    result
}

const GOOD_TEMPLATE: &str = "template: {image: trainer:1}";

async fn allocation_of_a_project_is_immutable(env: Arc<Env>) -> anyhow::Result<()> {
    let ns = TestNamespace::create(&env.client, "immutable").await?;
    let yaml = |alloc: &str| {
        format!(
            "apiVersion: sovereign.ai/v1alpha1\nkind: ModelProject\nmetadata: {{name: p, namespace: {}}}\n\
             spec:\n  allocation: {alloc}\n  placement: {{pools: [h200]}}\n  workers: 1\n  acceleratorsPerWorker: 8\n  {GOOD_TEMPLATE}\n",
            ns.name
        )
    };
    let result = async {
        env.kubectl_ok(&["apply", "-f", "-"], Some(&yaml("first")))?;
        let out = env.kubectl(&["apply", "-f", "-"], Some(&yaml("second")))?;
        ensure!(!out.status.success(), "changing spec.allocation was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(stderr.contains("allocation is immutable"), "unexpected error: {stderr}");
        anyhow::Ok(())
    }
    .await;
    ns.cleanup().await?;
    result
}

async fn explain_reads_as_documentation(env: Arc<Env>) -> anyhow::Result<()> {
    let out = env.kubectl_ok(&["explain", "modelproject.spec", "--recursive"], None)?;
    for field in [
        "allocation",
        "placement",
        "pools",
        "topology",
        "workers",
        "acceleratorsPerWorker",
        "template",
        "runPolicy",
        "maxRestarts",
    ] {
        ensure!(out.contains(field), "explain --recursive lacks {field}");
    }
    let out = env.kubectl_ok(&["explain", "modelproject.spec.placement.pools"], None)?;
    ensure!(out.contains("in order of preference"), "field description missing: {out}");
    let out = env.kubectl_ok(&["explain", "gpuallocation"], None)?;
    ensure!(out.contains("grants a tenant organisation"), "kind description missing: {out}");
    Ok(())
}

async fn gpu_pod_lands_on_a_gpu_node_and_runs(env: Arc<Env>) -> anyhow::Result<()> {
    let ns = TestNamespace::create(&env.client, "gpu-pod").await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns.name);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cuda"},
        "spec": {"containers": [{"name": "main", "image": "trainer:1",
            "resources": {"limits": {"nvidia.com/gpu": "8"}, "requests": {"nvidia.com/gpu": "8"}}}]}
    }))?;
    let result = async {
        pods.create(&PostParams::default(), &pod).await?;
        let node_name = wait_for("the pod to run", Duration::from_secs(60), || async {
            let p = pods.get("cuda").await.map_err(|e| e.to_string())?;
            let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            match (phase.as_str(), p.spec.as_ref().and_then(|s| s.node_name.clone())) {
                ("Running", Some(node)) => Ok(node),
                (phase, node) => Err(format!("phase {phase:?} on {node:?}")),
            }
        })
        .await?;
        let node = Api::<Node>::all(env.client.clone()).get(&node_name).await?;
        let product = node.labels().get("nvidia.com/gpu.product").cloned().unwrap_or_default();
        // B200 nodes are tainted, so only the H200 pool can take an untolerating pod.
        ensure!(product == "NVIDIA-H200", "pod ran on {node_name} with product {product:?}");
        anyhow::Ok(())
    }
    .await;
    ns.cleanup().await?;
    result
}

async fn operator_becomes_ready_and_stops_on_sigterm(env: Arc<Env>) -> anyhow::Result<()> {
    let kubeconfig = env.operator_kubeconfig()?;
    let mut op = Operator::start(&env, &kubeconfig, free_port()?, "operator-sigterm.log")?;
    op.wait_ready(Duration::from_secs(60)).await?;
    let (code, body) = http_get(op.admin, "/livez").await?;
    ensure!(code == 200, "livez {code}: {body}");
    let (code, body) = http_get(op.admin, "/metrics").await?;
    ensure!(code == 200 && body.contains("# EOF"), "metrics {code}: {body}");
    let log = op.log.clone();
    let status = op.terminate(Duration::from_secs(20)).await?;
    ensure!(status.success(), "exit status {status} after SIGTERM; log: {}", std::fs::read_to_string(log)?);
    Ok(())
}

async fn pool_status_counts_nodes_and_reports_conflicts(env: Arc<Env>) -> anyhow::Result<()> {
    let pools: Api<AcceleratorPool> = Api::all(env.client.clone());
    let pool = |name: &str, labels: serde_json::Value| -> anyhow::Result<AcceleratorPool> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "sovereign.ai/v1alpha1", "kind": "AcceleratorPool",
            "metadata": {"name": name},
            "spec": {"resourceName": "nvidia.com/gpu", "kind": "GPU", "vendor": "NVIDIA", "model": "H200",
                     "nodeSelector": {"matchLabels": labels}}
        }))?)
    };
    let status_of = |name: &'static str| {
        let pools = pools.clone();
        move || {
            let pools = pools.clone();
            async move {
                let p = pools.get(name).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(p.status.unwrap_or_default())
            }
        }
    };
    let result = async {
        pools
            .create(
                &PostParams::default(),
                &pool("e2e-h200", serde_json::json!({"nvidia.com/gpu.product": "NVIDIA-H200"}))?,
            )
            .await?;
        let probe = status_of("e2e-h200");
        wait_for("e2e-h200 to count its 4 nodes", Duration::from_secs(60), || {
            let probe = probe.clone();
            async move {
                let s = probe().await?;
                let ready = find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == "True");
                if s.nodes == 4 && s.ready_nodes == 4 && s.capacity == 32 && s.allocatable == 32 && ready {
                    Ok(())
                } else {
                    Err(format!("{s:?}"))
                }
            }
        })
        .await?;

        // A newer pool selecting the same nodes takes none of them: it reports the
        // conflict and counts nothing; the older pool keeps its 4 nodes.
        pools
            .create(
                &PostParams::default(),
                &pool("e2e-hopper", serde_json::json!({"nvidia.com/gpu.family": "hopper"}))?,
            )
            .await?;
        let newer = status_of("e2e-hopper");
        wait_for("the conflict on e2e-hopper", Duration::from_secs(60), || {
            let newer = newer.clone();
            async move {
                let s = newer().await?;
                let conflict = find_condition(&s.conditions, "NodeConflict")
                    .is_some_and(|c| c.status == "True" && c.message.contains("in pool e2e-h200"));
                if conflict && s.nodes == 0 && s.conflicting_nodes.len() == 4 { Ok(()) } else { Err(format!("{s:?}")) }
            }
        })
        .await?;
        let s = probe().await.map_err(anyhow::Error::msg)?;
        let conflict = find_condition(&s.conditions, "NodeConflict").is_some_and(|c| c.status == "True");
        ensure!(!conflict && s.nodes == 4 && s.allocatable == 32, "the older pool lost nodes: {s:?}");
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), "default");
        wait_for("a Warning event on the pool", Duration::from_secs(30), || async {
            let list = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("e2e-hopper")
                        && e.type_.as_deref() == Some("Warning")
                        && e.reason.as_deref() == Some("NodesInSeveralPools")
                })
                .map(|_| ())
                .ok_or_else(|| format!("{} events, none matching", list.items.len()))
        })
        .await?;

        pools.delete("e2e-hopper", &DeleteParams::default()).await?;
        wait_for("the conflict to clear", Duration::from_secs(60), || {
            let probe = probe.clone();
            async move {
                let s = probe().await?;
                let conflict = find_condition(&s.conditions, "NodeConflict").is_some_and(|c| c.status == "True");
                if !conflict && s.nodes == 4 { Ok(()) } else { Err(format!("{s:?}")) }
            }
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    for name in ["e2e-h200", "e2e-hopper"] {
        let _ = pools.delete(name, &DeleteParams::default()).await;
    }
    result
}
