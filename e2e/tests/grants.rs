//! Pools and grants in the real cluster: quotas, reservations, admission,
//! windows, budgets, node loss and operator restarts.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::{Node, Pod, ResourceQuota};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use sovereign_e2e::{Env, Operator, Scope, free_port, in_namespaces, wait_for};
use sovereign_operator::api::{AcceleratorPool, AllocationPhase, GpuAllocation, GpuAllocationStatus, find_condition};

const QUOTA: &str = "sovereign-accelerators";
const RESERVED: &str = "sovereign.ai/reserved-for";

pub fn pool_yaml(name: &str, resource: &str, label: (&str, &str), charge: f64) -> String {
    format!(
        "apiVersion: sovereign.ai/v1alpha1\nkind: AcceleratorPool\nmetadata: {{name: {name}}}\nspec:\n  resourceName: {resource}\n  kind: GPU\n  vendor: V\n  model: M\n  chargeFactor: {charge}\n  nodeSelector: {{matchLabels: {{\"{}\": \"{}\"}}}}\n  topologyKeys: [topology.sovereign.ai/block, topology.sovereign.ai/rack, kubernetes.io/hostname]\n  tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]\n",
        label.0, label.1
    )
}

const H200_NODES: (&str, &str) = ("nvidia.com/gpu.product", "NVIDIA-H200");

fn h200(name: &str) -> String {
    pool_yaml(name, "nvidia.com/gpu", H200_NODES, 1.0)
}

pub fn alloc_yaml(name: &str, namespaces: &[&str], grants: &str, extra: &str) -> String {
    format!(
        "apiVersion: sovereign.ai/v1alpha1\nkind: GpuAllocation\nmetadata: {{name: {name}}}\nspec:\n  tenant: {{displayName: E2E, namespaces: [{}]}}\n  grants: {grants}\n{extra}",
        namespaces.join(", ")
    )
}

async fn allocation_status(env: &Env, name: &str) -> Result<GpuAllocationStatus, String> {
    let a = Api::<GpuAllocation>::all(env.client.clone()).get(name).await.map_err(|e| e.to_string())?;
    Ok(a.status.unwrap_or_default())
}

pub async fn wait_phase(
    env: &Env,
    name: &str,
    phase: AllocationPhase,
    timeout: Duration,
) -> anyhow::Result<GpuAllocationStatus> {
    wait_for(&format!("{name} to be {phase:?}"), timeout, || async {
        let s = allocation_status(env, name).await?;
        if s.phase == Some(phase) {
            Ok(s)
        } else {
            Err(format!("{:?} {:?}", s.phase, find_condition(&s.conditions, "Ready")))
        }
    })
    .await
}

async fn quota_hard(env: &Env, ns: &str) -> Result<Vec<(String, String)>, String> {
    let q = Api::<ResourceQuota>::namespaced(env.client.clone(), ns).get_opt(QUOTA).await.map_err(|e| e.to_string())?;
    let hard = q.ok_or("no quota")?.spec.and_then(|s| s.hard).unwrap_or_default();
    Ok(hard.into_iter().map(|(k, v)| (k, v.0)).collect())
}

async fn wait_quota(env: &Env, ns: &str, resource: &str, want: &str) -> anyhow::Result<()> {
    let key = format!("requests.{resource}");
    wait_for(&format!("quota {key}={want} in {ns}"), Duration::from_secs(60), || async {
        let hard = quota_hard(env, ns).await?;
        if hard.iter().any(|(k, v)| *k == key && v == want) { Ok(()) } else { Err(format!("{hard:?}")) }
    })
    .await
}

/// A pod a tenant creates directly, confined by its nodeSelector to the pool
/// with node label `on` (the chart's accelerator-pods policy refuses it otherwise).
fn gpu_pod(name: &str, resource: &str, n: u32, on: (&str, &str)) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"nodeSelector": {on.0: on.1}, "containers": [{"name": "main", "image": "trainer:1",
            "resources": {"limits": {resource: n.to_string()}, "requests": {resource: n.to_string()}}}],
            "tolerations": [{"operator": "Exists"}]}
    }))?)
}

pub async fn two_allocations_sum_in_one_quota_that_the_api_server_enforces(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["quota"], async |names, scope| {
        let n = names[0].clone();
        scope.apply(&h200("e2e-h200"))?;
        scope.apply(&pool_yaml("e2e-rngd", "furiosa.ai/rngd", ("furiosa.ai/npu.family", "rngd"), 1.0))?;
        let q1 = alloc_yaml(
            "e2e-q1",
            &[&n],
            "[{pool: e2e-h200, accelerators: 8, borrowingLimit: 4}, {pool: e2e-rngd, accelerators: 8}]",
            "",
        );
        let q2 = alloc_yaml("e2e-q2", &[&n], "[{pool: e2e-h200, accelerators: 8}]", "");
        scope.apply(&q1)?;
        scope.apply(&q2)?;
        wait_quota(&env, &n, "nvidia.com/gpu", "20").await?;
        wait_quota(&env, &n, "furiosa.ai/rngd", "8").await?;
        let quotas = Api::<ResourceQuota>::namespaced(env.client.clone(), &n).list(&ListParams::default()).await?;
        ensure!(quotas.items.len() == 1, "expected one quota in {n}, found {}", quotas.items.len());

        // The API server itself refuses a pod beyond the quota.
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &n);
        let err = pods.create(&PostParams::default(), &gpu_pod("too-big", "nvidia.com/gpu", 24, H200_NODES)?).await;
        let msg = format!("{err:?}");
        ensure!(err.is_err() && msg.contains("exceeded quota"), "pod beyond quota was not refused: {msg}");
        pods.create(&PostParams::default(), &gpu_pod("fits", "nvidia.com/gpu", 8, H200_NODES)?)
            .await
            .context("pod within quota")?;

        scope.delete(&q2)?;
        wait_quota(&env, &n, "nvidia.com/gpu", "12").await?;
        scope.delete(&q1)?;
        wait_for("the quota to be removed", Duration::from_secs(60), || async {
            match quota_hard(&env, &n).await {
                Err(e) if e == "no quota" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
        Ok(())
    })
    .await
}

pub async fn a_dedicated_grant_reserves_nodes_in_one_rack_and_releases_them(env: Arc<Env>) -> anyhow::Result<()> {
    let mut scope = Scope::new(&env);
    let nodes: Api<Node> = Api::all(env.client.clone());
    let body = async {
        scope.apply(&h200("e2e-h200"))?;
        let ded = alloc_yaml("e2e-ded", &["e2e-ded-team"], "[{pool: e2e-h200, accelerators: 12, mode: Dedicated}]", "");
        scope.apply(&ded)?;
        let s = wait_phase(&env, "e2e-ded", AllocationPhase::Active, Duration::from_secs(60)).await?;
        let reserved = wait_for("two reserved nodes", Duration::from_secs(30), || async {
            let s = allocation_status(&env, "e2e-ded").await?;
            let r = s.pools.first().map(|p| p.reserved_nodes.clone()).unwrap_or_default();
            if r.len() == 2 { Ok(r) } else { Err(format!("{r:?}")) }
        })
        .await?;
        ensure!(s.pools[0].granted == 16 || s.pools[0].granted == 0, "granted {:?}", s.pools);
        let mut racks = BTreeSet::new();
        for name in &reserved {
            let node = wait_for(&format!("{name} labelled and tainted"), Duration::from_secs(30), || async {
                let n = nodes.get(name).await.map_err(|e| e.to_string())?;
                let labelled = n.labels().get(RESERVED).map(String::as_str) == Some("e2e-ded");
                let tainted = n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|ts| {
                    ts.iter()
                        .any(|t| t.key == RESERVED && t.value.as_deref() == Some("e2e-ded") && t.effect == "NoSchedule")
                });
                if labelled && tainted { Ok(n) } else { Err(format!("labels {:?}", n.labels())) }
            })
            .await?;
            racks.insert(node.labels().get("topology.sovereign.ai/rack").cloned().unwrap_or_default());
        }
        ensure!(racks.len() == 1, "reserved nodes span racks {racks:?}");
        wait_for("the pool to count the reservation", Duration::from_secs(30), || async {
            let p = Api::<AcceleratorPool>::all(env.client.clone()).get("e2e-h200").await.map_err(|e| e.to_string())?;
            let s = p.status.unwrap_or_default();
            if s.reserved_nodes == 2 && s.reserved == 16 && s.granted == 16 { Ok(()) } else { Err(format!("{s:?}")) }
        })
        .await?;

        scope.delete(&ded)?;
        for name in &reserved {
            let n = nodes.get(name).await?;
            ensure!(!n.labels().contains_key(RESERVED), "{name} still labelled after the allocation was deleted");
            let tainted = n.spec.and_then(|s| s.taints).unwrap_or_default().iter().any(|t| t.key == RESERVED);
            ensure!(!tainted, "{name} still tainted after the allocation was deleted");
        }
        anyhow::Ok(())
    };
    let res = body.await;
    scope.cleanup()?;
    res
}

pub async fn a_grant_that_does_not_fit_waits_and_is_admitted_when_room_appears(env: Arc<Env>) -> anyhow::Result<()> {
    let mut scope = Scope::new(&env);
    let body = async {
        scope.apply(&pool_yaml("e2e-atom", "rebellions.ai/ATOM", ("rebellions.ai/npu.family", "ATOM"), 1.0))?;
        let first = alloc_yaml("e2e-first", &["e2e-first"], "[{pool: e2e-atom, accelerators: 24}]", "");
        scope.apply(&first)?;
        wait_phase(&env, "e2e-first", AllocationPhase::Active, Duration::from_secs(60)).await?;
        scope.apply(&alloc_yaml("e2e-second", &["e2e-second"], "[{pool: e2e-atom, accelerators: 16}]", ""))?;
        let s = wait_for("e2e-second Pending for capacity", Duration::from_secs(60), || async {
            let s = allocation_status(&env, "e2e-second").await?;
            match find_condition(&s.conditions, "Ready") {
                Some(c) if s.phase == Some(AllocationPhase::Pending) && c.reason == "InsufficientCapacity" => {
                    Ok(c.message.clone())
                }
                c => Err(format!("{:?} {c:?}", s.phase)),
            }
        })
        .await?;
        ensure!(s.contains("pool e2e-atom is short by 8"), "unclear reason: {s}");
        scope.delete(&first)?;
        wait_phase(&env, "e2e-second", AllocationPhase::Active, Duration::from_secs(60)).await?;
        anyhow::Ok(())
    };
    let res = body.await;
    scope.cleanup()?;
    res
}

pub async fn a_window_opens_and_closes_on_time(env: Arc<Env>) -> anyhow::Result<()> {
    let mut scope = Scope::new(&env);
    let body = async {
        scope.apply(&h200("e2e-h200"))?;
        // Whole seconds: the object carries RFC 3339 without fractions.
        let start = Timestamp::from_second(Timestamp::now().as_second() + 6)?;
        let end = start.checked_add(SignedDuration::from_secs(8))?;
        let window = format!("  window: {{start: \"{start:.0}\", end: \"{end:.0}\"}}\n");
        scope.apply(&alloc_yaml("e2e-window", &["e2e-window"], "[{pool: e2e-h200, accelerators: 8}]", &window))?;
        let s = wait_phase(&env, "e2e-window", AllocationPhase::Pending, Duration::from_secs(5)).await?;
        let reason = find_condition(&s.conditions, "Ready").map(|c| c.reason.clone());
        ensure!(reason.as_deref() == Some("WindowNotOpen"), "reason {reason:?}");
        wait_phase(&env, "e2e-window", AllocationPhase::Active, Duration::from_secs(15)).await?;
        let late = Timestamp::now().duration_since(start);
        ensure!(late >= SignedDuration::ZERO, "activated {late} before its start");
        ensure!(late < SignedDuration::from_secs(4), "activated {late} after its start");
        wait_phase(&env, "e2e-window", AllocationPhase::Expired, Duration::from_secs(15)).await?;
        let late = Timestamp::now().duration_since(end);
        ensure!(late >= SignedDuration::ZERO && late < SignedDuration::from_secs(4), "expired {late} after its end");
        anyhow::Ok(())
    };
    let res = body.await;
    scope.cleanup()?;
    res
}

pub async fn a_tiny_budget_is_used_up_by_a_running_pod(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["budget"], async |names, scope| {
        let n = names[0].clone();
        // 8 devices at charge factor 900: one accelerator-hour every half second.
        scope.apply(&pool_yaml("e2e-rngd", "furiosa.ai/rngd", ("furiosa.ai/npu.family", "rngd"), 900.0))?;
        let budget = "  budget: {acceleratorHours: 2}\n";
        scope.apply(&alloc_yaml("e2e-budget", &[&n], "[{pool: e2e-rngd, accelerators: 8}]", budget))?;
        wait_phase(&env, "e2e-budget", AllocationPhase::Active, Duration::from_secs(60)).await?;
        wait_quota(&env, &n, "furiosa.ai/rngd", "8").await?;
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &n);
        pods.create(
            &PostParams::default(),
            &gpu_pod("burner", "furiosa.ai/rngd", 8, ("furiosa.ai/npu.family", "rngd"))?,
        )
        .await?;
        let s = wait_phase(&env, "e2e-budget", AllocationPhase::Exhausted, Duration::from_secs(60)).await?;
        ensure!(s.accelerator_hours_used >= 2.0, "exhausted at {} hours", s.accelerator_hours_used);
        let within = find_condition(&s.conditions, "WithinBudget").cloned();
        ensure!(within.as_ref().is_some_and(|c| c.status == "False"), "WithinBudget {within:?}");
        wait_quota(&env, &n, "furiosa.ai/rngd", "0").await?;
        let phase = pods.get("burner").await?.status.and_then(|s| s.phase);
        ensure!(phase.as_deref() == Some("Running"), "the running pod was not left alone: {phase:?}");
        Ok(())
    })
    .await
}

pub async fn a_deleted_reserved_node_is_replaced(env: Arc<Env>) -> anyhow::Result<()> {
    let mut scope = Scope::new(&env);
    let nodes: Api<Node> = Api::all(env.client.clone());
    let mut saved: Option<Node> = None;
    let body = async {
        scope.apply(&pool_yaml("e2e-b200", "nvidia.com/gpu", ("nvidia.com/gpu.product", "NVIDIA-B200"), 1.0))?;
        scope.apply(&alloc_yaml(
            "e2e-lost",
            &["e2e-lost"],
            "[{pool: e2e-b200, accelerators: 8, mode: Dedicated}]",
            "",
        ))?;
        let first = wait_for("one reserved node", Duration::from_secs(60), || async {
            let s = allocation_status(&env, "e2e-lost").await?;
            match s.pools.first().map(|p| p.reserved_nodes.clone()).unwrap_or_default().as_slice() {
                [one] => Ok(one.clone()),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
        saved = Some(nodes.get(&first).await?);
        nodes.delete(&first, &DeleteParams::default()).await?;
        let second = wait_for("a replacement node", Duration::from_secs(60), || async {
            let s = allocation_status(&env, "e2e-lost").await?;
            match s.pools.first().map(|p| p.reserved_nodes.clone()).unwrap_or_default().as_slice() {
                [one] if *one != first => Ok(one.clone()),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
        let n = nodes.get(&second).await?;
        ensure!(n.labels().get(RESERVED).map(String::as_str) == Some("e2e-lost"), "replacement not labelled");
        anyhow::Ok(())
    };
    let res = body.await;
    let cleaned = scope.cleanup();
    if let Some(node) = saved {
        restore_node(&env, node).await?;
    }
    res?;
    cleaned
}

/// Puts a deleted simulated node back, without the operator's reservation.
pub async fn restore_node(env: &Env, mut node: Node) -> anyhow::Result<()> {
    let name = node.name_any();
    node.metadata = kube::api::ObjectMeta {
        name: Some(name.clone()),
        labels: Some(node.labels().clone().into_iter().filter(|(k, _)| k != RESERVED).collect()),
        annotations: Some(node.annotations().clone()),
        ..Default::default()
    };
    if let Some(spec) = node.spec.as_mut() {
        spec.taints = spec.taints.take().map(|ts| ts.into_iter().filter(|t| t.key != RESERVED).collect());
    }
    if let Some(status) = node.status.as_mut() {
        status.conditions = None;
    }
    let nodes: Api<Node> = Api::all(env.client.clone());
    nodes.create(&PostParams::default(), &node).await?;
    wait_for(&format!("{name} Ready again"), Duration::from_secs(60), || async {
        let n = nodes.get(&name).await.map_err(|e| e.to_string())?;
        let ready = n
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready { Ok(()) } else { Err("not ready".into()) }
    })
    .await
}

/// Resource versions of everything the operator writes for these objects.
async fn versions(env: &Env, allocations: &[&str], namespaces: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for a in allocations {
        let obj = Api::<GpuAllocation>::all(env.client.clone()).get(a).await?;
        out.push((format!("allocation/{a}"), obj.resource_version().unwrap_or_default()));
    }
    for p in Api::<AcceleratorPool>::all(env.client.clone()).list(&ListParams::default()).await?.items {
        out.push((format!("pool/{}", p.name_any()), p.resource_version().unwrap_or_default()));
    }
    for ns in namespaces {
        let q = Api::<ResourceQuota>::namespaced(env.client.clone(), ns).get(QUOTA).await?;
        out.push((format!("quota/{ns}"), q.resource_version().unwrap_or_default()));
    }
    for n in Api::<Node>::all(env.client.clone()).list(&ListParams::default().labels(RESERVED)).await?.items {
        out.push((format!("node/{}", n.name_any()), n.resource_version().unwrap_or_default()));
    }
    Ok(out)
}

pub async fn a_killed_operator_converges_and_a_restart_writes_nothing(env: Arc<Env>) -> anyhow::Result<()> {
    let kubeconfig = env.operator_kubeconfig()?;
    in_namespaces(&env, &["restart-a", "restart-b"], async |names, scope| {
        let (a, b) = (names[0].clone(), names[1].clone());
        scope.apply(&h200("e2e-h200"))?;
        scope.apply(&pool_yaml("e2e-atom", "rebellions.ai/ATOM", ("rebellions.ai/npu.family", "ATOM"), 1.0))?;
        // Kill the operator right after the objects land, mid-reconcile.
        scope.apply(&alloc_yaml(
            "e2e-r1",
            &[&a],
            "[{pool: e2e-h200, accelerators: 16, mode: Dedicated}, {pool: e2e-atom, accelerators: 8}]",
            "",
        ))?;
        scope.apply(&alloc_yaml("e2e-r2", &[&a, &b], "[{pool: e2e-atom, accelerators: 16}]", ""))?;
        let old = env.operator.lock().await.take().context("no shared operator")?;
        old.kill().await?;
        let mut op = Operator::start(&env, &kubeconfig, free_port()?, "operator-restarted.log")?;
        op.wait_ready(Duration::from_secs(60)).await?;
        *env.operator.lock().await = Some(op);

        wait_phase(&env, "e2e-r1", AllocationPhase::Active, Duration::from_secs(60)).await?;
        wait_phase(&env, "e2e-r2", AllocationPhase::Active, Duration::from_secs(60)).await?;
        wait_quota(&env, &a, "rebellions.ai/ATOM", "24").await?;
        wait_quota(&env, &b, "rebellions.ai/ATOM", "16").await?;
        wait_for("exactly two reserved nodes", Duration::from_secs(30), || async {
            let nodes = Api::<Node>::all(env.client.clone())
                .list(&ListParams::default().labels(RESERVED))
                .await
                .map_err(|e| e.to_string())?;
            let names: Vec<String> = nodes.items.iter().map(|n| n.name_any()).collect();
            if names.len() == 2 { Ok(()) } else { Err(format!("{names:?}")) }
        })
        .await?;
        for ns in [&a, &b] {
            let quotas = Api::<ResourceQuota>::namespaced(env.client.clone(), ns).list(&ListParams::default()).await?;
            ensure!(quotas.items.len() == 1, "{} quotas in {ns}", quotas.items.len());
        }

        // A clean restart of a converged operator writes nothing.
        let before = versions(&env, &["e2e-r1", "e2e-r2"], &[&a, &b]).await?;
        let old = env.operator.lock().await.take().context("no shared operator")?;
        let status = old.terminate(Duration::from_secs(20)).await?;
        ensure!(status.success(), "operator exited with {status}");
        let mut op = Operator::start(&env, &kubeconfig, free_port()?, "operator-restarted-2.log")?;
        op.wait_ready(Duration::from_secs(60)).await?;
        // Wait until it has reconciled every allocation and pool at least once.
        let pools =
            Api::<AcceleratorPool>::all(env.client.clone()).list(&ListParams::default()).await?.items.len() as f64;
        let op_ref = &op;
        wait_for("a full pass of the restarted operator", Duration::from_secs(30), || async move {
            let allocs =
                op_ref.metric("sovereign_reconciliations_total", "gpuallocation").await.map_err(|e| e.to_string())?;
            let pooled =
                op_ref.metric("sovereign_reconciliations_total", "acceleratorpool").await.map_err(|e| e.to_string())?;
            let quotas = op_ref.metric("sovereign_reconciliations_total", "quota").await.map_err(|e| e.to_string())?;
            if allocs >= 2.0 && pooled >= pools && quotas >= 2.0 {
                Ok(())
            } else {
                Err(format!("{allocs} {pooled} {quotas}"))
            }
        })
        .await?;
        *env.operator.lock().await = Some(op);
        let after = versions(&env, &["e2e-r1", "e2e-r2"], &[&a, &b]).await?;
        let changed: Vec<_> = before.iter().zip(&after).filter(|(x, y)| x != y).map(|(x, _)| x.0.clone()).collect();
        ensure!(changed.is_empty(), "a restart with nothing to do wrote {changed:?}");
        Ok(())
    })
    .await
}
