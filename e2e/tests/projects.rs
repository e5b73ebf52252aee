//! Training runs in the real cluster: gang admission with fallback, the
//! worker environment, restarts, completion, suspension, node loss, expiry
//! and a crash of the operator mid-admission.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use sovereign_e2e::{Env, Operator, Scope, free_port, in_namespaces, wait_for};
use sovereign_operator::api::{ModelProject, ModelProjectStatus, ProjectPhase, find_condition};

use crate::grants::{alloc_yaml, pool_yaml, restore_node};

pub fn atom() -> String {
    pool_yaml("e2e-atom", "rebellions.ai/ATOM", ("rebellions.ai/npu.family", "ATOM"), 1.0)
}

pub fn h200() -> String {
    pool_yaml("e2e-h200", "nvidia.com/gpu", ("nvidia.com/gpu.product", "NVIDIA-H200"), 1.0)
}

pub fn project_yaml(
    name: &str,
    ns: &str,
    alloc: &str,
    pools: &str,
    workers: u32,
    extra: &str,
    annotations: &str,
) -> String {
    format!(
        "apiVersion: sovereign.ai/v1alpha1\nkind: ModelProject\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  allocation: {alloc}\n  placement: {{pools: {pools}}}\n  workers: {workers}\n  acceleratorsPerWorker: 8\n  template:\n    image: trainer:1\n    annotations: {{{annotations}}}\n    env: [{{name: DATASET, value: web-ko}}]\n    terminationGracePeriodSeconds: 1\n{extra}"
    )
}

pub async fn status(env: &Env, ns: &str, name: &str) -> Result<ModelProjectStatus, String> {
    let p = Api::<ModelProject>::namespaced(env.client.clone(), ns).get(name).await.map_err(|e| e.to_string())?;
    Ok(p.status.unwrap_or_default())
}

pub async fn wait_project(
    env: &Env,
    ns: &str,
    name: &str,
    phase: ProjectPhase,
    timeout: Duration,
) -> anyhow::Result<ModelProjectStatus> {
    wait_for(&format!("{name} to be {phase:?}"), timeout, || async {
        let s = status(env, ns, name).await?;
        if s.phase == Some(phase) {
            Ok(s)
        } else {
            Err(format!("{:?} {:?}", s.phase, s.conditions.iter().map(|c| (&c.type_, &c.message)).collect::<Vec<_>>()))
        }
    })
    .await
}

pub async fn workers(env: &Env, ns: &str, name: &str) -> anyhow::Result<Vec<Pod>> {
    let lp = ListParams::default().labels(&format!("sovereign.ai/project={name}"));
    Ok(Api::<Pod>::namespaced(env.client.clone(), ns).list(&lp).await?.items)
}

/// Waits until the project has no worker pod left.
pub async fn wait_no_workers(env: &Env, ns: &str, name: &str) -> anyhow::Result<()> {
    wait_for(&format!("the workers of {name} to be gone"), Duration::from_secs(30), || async {
        let n = workers(env, ns, name).await.map_err(|e| e.to_string())?.len();
        if n == 0 { Ok(()) } else { Err(format!("{n} pods")) }
    })
    .await
}

/// The pool label values of the nodes the gang's pods run on.
async fn pools_of(env: &Env, pods: &[Pod]) -> anyhow::Result<BTreeSet<String>> {
    let nodes: Api<Node> = Api::all(env.client.clone());
    let mut out = BTreeSet::new();
    for p in pods {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).context("unbound worker")?;
        let n = nodes.get(&node).await?;
        let l = n.labels();
        out.insert(l.get("rebellions.ai/npu.family").or(l.get("nvidia.com/gpu.product")).cloned().unwrap_or_default());
    }
    Ok(out)
}

/// Runs `body` with the two test pools, an allocation granting `grant` of each to a
/// fresh namespace, and cleans everything up.
pub async fn with_grant(
    env: &Env,
    test: &str,
    grant: i64,
    body: impl AsyncFnOnce(String, &mut Scope) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    in_namespaces(env, &[test], async |names, scope| {
        let ns = names[0].clone();
        scope.apply(&atom())?;
        scope.apply(&h200())?;
        let grants = format!("[{{pool: e2e-atom, accelerators: {grant}}}, {{pool: e2e-h200, accelerators: {grant}}}]");
        scope.apply(&alloc_yaml("e2e-train", &[&ns], &grants, ""))?;
        // Given an Active grant (the allocation's status says so, not only the plan).
        let active = sovereign_operator::api::AllocationPhase::Active;
        crate::grants::wait_phase(env, "e2e-train", active, Duration::from_secs(60)).await?;
        body(ns, scope).await
    })
    .await
}

pub async fn a_gang_lands_whole_on_the_npu_pool_and_falls_back_whole_to_gpus(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "fallback", 32, async |ns, scope| {
        scope.apply(&project_yaml("first", &ns, "e2e-train", "[e2e-atom, e2e-h200]", 4, "", ""))?;
        let s = wait_project(&env, &ns, "first", ProjectPhase::Running, Duration::from_secs(60)).await?;
        ensure!(s.pool.as_deref() == Some("e2e-atom"), "first went to {:?}", s.pool);
        let pods = workers(&env, &ns, "first").await?;
        ensure!(pods.len() == 4, "{} workers", pods.len());
        ensure!(pools_of(&env, &pods).await? == BTreeSet::from(["ATOM".to_string()]), "first was split or misplaced");

        // The NPU pool is now full: the second gang falls back, whole, to H200.
        scope.apply(&project_yaml("second", &ns, "e2e-train", "[e2e-atom, e2e-h200]", 4, "", ""))?;
        let s = wait_project(&env, &ns, "second", ProjectPhase::Running, Duration::from_secs(60)).await?;
        ensure!(s.pool.as_deref() == Some("e2e-h200"), "second went to {:?}", s.pool);
        let pods = workers(&env, &ns, "second").await?;
        ensure!(pools_of(&env, &pods).await? == BTreeSet::from(["NVIDIA-H200".to_string()]), "second was split");

        // Every worker has the torchrun environment, with its own rank.
        for p in &pods {
            let env_vars: BTreeMap<String, String> = p.spec.as_ref().unwrap().containers[0]
                .env
                .iter()
                .flatten()
                .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
                .collect();
            let rank = p.labels()["sovereign.ai/worker-index"].clone();
            for (k, v) in [
                ("RANK", rank.as_str()),
                ("PET_NODE_RANK", rank.as_str()),
                ("WORLD_SIZE", "4"),
                ("PET_NNODES", "4"),
                ("NPROC_PER_NODE", "8"),
                ("MASTER_ADDR", "second-worker-0.sovereign-rendezvous"),
                ("MASTER_PORT", "23456"),
                ("DATASET", "web-ko"),
            ] {
                ensure!(
                    env_vars.get(k).map(String::as_str) == Some(v),
                    "{}: {k}={:?}, want {v}",
                    p.name_any(),
                    env_vars.get(k)
                );
            }
            ensure!(p.spec.as_ref().unwrap().hostname.as_deref() == Some(format!("second-worker-{rank}").as_str()));
        }
        // MASTER_ADDR resolves: the namespace's one rendezvous Service has worker 0 of each
        // gang as an endpoint under its hostname (what cluster DNS serves), and no other worker.
        let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), &ns);
        let lp = ListParams::default().labels("kubernetes.io/service-name=sovereign-rendezvous");
        wait_for("worker 0 of both gangs named by the rendezvous Service", Duration::from_secs(30), || {
            let (slices, lp) = (&slices, &lp);
            async move {
                let mut named: Vec<String> = slices
                    .list(lp)
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .iter()
                    .flat_map(|s| s.endpoints.iter())
                    .map(|e| e.hostname.clone().unwrap_or_default())
                    .collect();
                named.sort();
                (named == ["first-worker-0", "second-worker-0"]).then_some(()).ok_or(format!("endpoints {named:?}"))
            }
        })
        .await?;

        // A third gang fits nowhere: it waits, saying why in numbers.
        scope.apply(&project_yaml("third", &ns, "e2e-train", "[e2e-atom, e2e-h200]", 4, "", ""))?;
        let msg = wait_for("third queued with a reason", Duration::from_secs(30), || async {
            let s = status(&env, &ns, "third").await?;
            match find_condition(&s.conditions, "Queued") {
                Some(c) if c.status == "True" && s.queue_position == Some(1) => Ok(c.message.clone()),
                c => Err(format!("{:?} {c:?}", s.phase)),
            }
        })
        .await?;
        ensure!(
            msg.contains("e2e-atom") && msg.contains("falls back to") && msg.contains("e2e-h200"),
            "unclear reason: {msg}"
        );
        Ok(())
    })
    .await
}

pub async fn a_gang_larger_than_any_rack_waits_with_the_reason(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "topology", 32, async |ns, scope| {
        let required =
            "  placement:\n    pools: [e2e-atom]\n    topology: {key: topology.sovereign.ai/rack, mode: Required}\n";
        let yaml = project_yaml("racked", &ns, "e2e-train", "[e2e-atom]", 3, "", "")
            .replace("  placement: {pools: [e2e-atom]}\n", required);
        scope.apply(&yaml)?;
        let msg = wait_for("racked queued", Duration::from_secs(30), || async {
            let s = status(&env, &ns, "racked").await?;
            match find_condition(&s.conditions, "Queued") {
                Some(c) if c.status == "True" => Ok(c.message.clone()),
                c => Err(format!("{:?} {c:?}", s.phase)),
            }
        })
        .await?;
        ensure!(msg.contains("rack"), "reason does not name the rack: {msg}");
        ensure!(workers(&env, &ns, "racked").await?.is_empty(), "a queued gang has pods");
        Ok(())
    })
    .await
}

/// Gangs that no amount of waiting admits say so (reason Unsatisfiable, a
/// Warning Event naming the bound in each listed pool), hold nothing, and a
/// gang that fits is still admitted beside them.
pub async fn a_project_that_can_never_fit_says_why(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "never-fit", 16, async |ns, scope| {
        let zone = "  placement:\n    pools: [e2e-atom]\n    topology: {key: example.com/zone, mode: Required}\n";
        let cases = [
            (
                "too-big-worker",
                project_yaml("too-big-worker", &ns, "e2e-train", "[e2e-atom, e2e-h200]", 1, "", "")
                    .replace("acceleratorsPerWorker: 8", "acceleratorsPerWorker: 16"),
                "has no node with 16",
            ),
            ("over-grant", project_yaml("over-grant", &ns, "e2e-train", "[e2e-atom]", 3, "", ""), "at most 16 granted"),
            (
                "no-zone",
                project_yaml("no-zone", &ns, "e2e-train", "[e2e-atom]", 2, "", "")
                    .replace("  placement: {pools: [e2e-atom]}\n", zone),
                "does not declare topology key example.com/zone",
            ),
        ];
        for (_, yaml, _) in &cases {
            scope.apply(yaml)?;
        }
        for (name, _, want) in &cases {
            let msg = wait_for(&format!("{name} unsatisfiable"), Duration::from_secs(30), || async {
                let s = status(&env, &ns, name).await?;
                match find_condition(&s.conditions, "Queued") {
                    Some(c) if c.reason == "Unsatisfiable" => Ok(c.message.clone()),
                    c => Err(format!("{:?} {c:?}", s.phase)),
                }
            })
            .await?;
            ensure!(msg.contains(want), "{name}: the reason does not name the bound ({want}): {msg}");
            let noted = wait_for(&format!("{name} Warning Event"), Duration::from_secs(30), || async {
                let list = crate::sharing::events(&env, &ns, name, "Unsatisfiable").await.map_err(|e| e.to_string())?;
                list.into_iter().next().ok_or_else(|| "no Event yet".to_string())
            })
            .await?;
            ensure!(noted.contains(want), "{name}: the Event does not name the bound: {noted}");
            ensure!(workers(&env, &ns, name).await?.is_empty(), "{name}: a gang that can never fit has pods");
        }
        scope.apply(&project_yaml("fits", &ns, "e2e-train", "[e2e-atom]", 2, "", ""))?;
        wait_project(&env, &ns, "fits", ProjectPhase::Running, Duration::from_secs(60)).await?;
        Ok(())
    })
    .await
}

pub async fn a_failing_worker_restarts_the_gang_until_max_restarts(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "restarts", 32, async |ns, scope| {
        let annotations = "sim.sovereign.ai/complete-after: 2s, sim.sovereign.ai/exit-code: \"3\"";
        let policy = "  runPolicy: {maxRestarts: 1}\n";
        scope.apply(&project_yaml("crashy", &ns, "e2e-train", "[e2e-atom]", 2, policy, annotations))?;
        let s = wait_project(&env, &ns, "crashy", ProjectPhase::Failed, Duration::from_secs(90)).await?;
        ensure!(s.restarts == 1, "restarts {}", s.restarts);
        let finished = find_condition(&s.conditions, "Finished").cloned();
        ensure!(
            finished.as_ref().is_some_and(|c| c.reason == "BackoffLimitExceeded" && c.message.contains("exit code 3")),
            "{finished:?}"
        );
        wait_no_workers(&env, &ns, "crashy").await?;
        Ok(())
    })
    .await
}

pub async fn a_finished_run_frees_its_devices_for_the_next(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "succeed", 16, async |ns, scope| {
        let quick = "sim.sovereign.ai/complete-after: 3s";
        scope.apply(&project_yaml("quick", &ns, "e2e-train", "[e2e-atom]", 2, "", quick))?;
        wait_project(&env, &ns, "quick", ProjectPhase::Running, Duration::from_secs(60)).await?;
        scope.apply(&project_yaml("next", &ns, "e2e-train", "[e2e-atom]", 2, "", ""))?;
        let s = wait_project(&env, &ns, "next", ProjectPhase::Queued, Duration::from_secs(30)).await?;
        ensure!(s.queue_position == Some(1), "queue position {:?}", s.queue_position);
        let done = wait_project(&env, &ns, "quick", ProjectPhase::Succeeded, Duration::from_secs(60)).await?;
        ensure!(done.finished_at.is_some());
        wait_project(&env, &ns, "next", ProjectPhase::Running, Duration::from_secs(60)).await?;
        Ok(())
    })
    .await
}

pub fn suspend(env: &Env, ns: &str, name: &str, on: bool) -> anyhow::Result<()> {
    let patch = format!(r#"{{"spec":{{"runPolicy":{{"suspend":{on}}}}}}}"#);
    env.kubectl_ok(&["-n", ns, "patch", "modelproject", name, "--type=merge", "-p", &patch], None)?;
    Ok(())
}

pub async fn suspend_gives_back_devices_and_resume_requeues(env: Arc<Env>) -> anyhow::Result<()> {
    with_grant(&env, "suspend", 32, async |ns, scope| {
        let yaml = project_yaml("pausable", &ns, "e2e-train", "[e2e-atom]", 2, "", "");
        scope.apply(&yaml)?;
        wait_project(&env, &ns, "pausable", ProjectPhase::Running, Duration::from_secs(60)).await?;
        suspend(&env, &ns, "pausable", true)?;
        wait_project(&env, &ns, "pausable", ProjectPhase::Suspended, Duration::from_secs(30)).await?;
        wait_no_workers(&env, &ns, "pausable").await?;
        suspend(&env, &ns, "pausable", false)?;
        wait_project(&env, &ns, "pausable", ProjectPhase::Running, Duration::from_secs(60)).await?;
        Ok(())
    })
    .await
}

pub async fn losing_a_node_restarts_the_gang_without_counting_it(env: Arc<Env>) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(env.client.clone());
    let mut saved = None;
    let res = with_grant(&env, "nodeloss", 32, async |ns, scope| {
        scope.apply(&project_yaml("sturdy", &ns, "e2e-train", "[e2e-atom]", 2, "", ""))?;
        let s = wait_project(&env, &ns, "sturdy", ProjectPhase::Running, Duration::from_secs(60)).await?;
        let victim = s.nodes[1].clone();
        saved = Some(nodes.get(&victim).await?);
        nodes.delete(&victim, &DeleteParams::default()).await?;
        let s = wait_for("a restart after the node loss", Duration::from_secs(90), || async {
            let s = status(&env, &ns, "sturdy").await?;
            if s.disruptions >= 1 && s.phase == Some(ProjectPhase::Running) {
                Ok(s)
            } else {
                Err(format!("{:?} {}", s.phase, s.disruptions))
            }
        })
        .await?;
        ensure!(s.restarts == 0, "a node loss was counted as a failure");
        ensure!(!s.nodes.contains(&victim), "placed again on the deleted node");
        Ok(())
    })
    .await;
    if let Some(node) = saved {
        restore_node(&env, node).await?;
    }
    res
}

pub async fn an_expired_allocation_stops_its_runs(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["expiry"], async |names, scope| {
        let n = names[0].clone();
        scope.apply(&atom())?;
        let end = Timestamp::from_second(Timestamp::now().as_second() + 12)?;
        let window = format!("  window: {{end: \"{end}\"}}\n");
        scope.apply(&alloc_yaml("e2e-expiring", &[&n], "[{pool: e2e-atom, accelerators: 16}]", &window))?;
        scope.apply(&project_yaml("doomed", &n, "e2e-expiring", "[e2e-atom]", 2, "", ""))?;
        wait_project(&env, &n, "doomed", ProjectPhase::Running, Duration::from_secs(30)).await?;
        let s = wait_project(&env, &n, "doomed", ProjectPhase::Queued, Duration::from_secs(40)).await?;
        let c = find_condition(&s.conditions, "Queued").cloned();
        ensure!(c.as_ref().is_some_and(|c| c.reason == "AllocationInactive" && c.message.contains("Expired")), "{c:?}");
        wait_no_workers(&env, &n, "doomed").await?;
        Ok(())
    })
    .await
}

pub async fn a_killed_operator_mid_admission_leaves_no_duplicate_or_orphan(env: Arc<Env>) -> anyhow::Result<()> {
    let kubeconfig = env.operator_kubeconfig()?;
    with_grant(&env, "crash", 32, async |ns, scope| {
        for i in 0..3 {
            scope.apply(&project_yaml(&format!("p{i}"), &ns, "e2e-train", "[e2e-atom, e2e-h200]", 2, "", ""))?;
        }
        let old = env.operator.lock().await.take().context("no shared operator")?;
        old.kill().await?;
        let mut op = Operator::start(&env, &kubeconfig, free_port()?, "operator-crash.log")?;
        op.wait_ready(Duration::from_secs(60)).await?;
        *env.operator.lock().await = Some(op);
        for i in 0..3 {
            wait_project(&env, &ns, &format!("p{i}"), ProjectPhase::Running, Duration::from_secs(60)).await?;
        }
        let pods = Api::<Pod>::namespaced(env.client.clone(), &ns).list(&ListParams::default()).await?.items;
        ensure!(pods.len() == 6, "{} pods for 3 gangs of 2", pods.len());
        let names: BTreeSet<String> = pods.iter().map(|p| p.name_any()).collect();
        for i in 0..3 {
            for w in 0..2 {
                ensure!(names.contains(&format!("p{i}-worker-{w}")), "missing p{i}-worker-{w}: {names:?}");
            }
        }
        Ok(())
    })
    .await
}
