//! `sovereign-operator plan` against the real cluster: a set of changes is
//! planned, then applied for real, and the operator must do exactly what the
//! plan said.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::{Node, ResourceQuota};
use k8s_openapi::jiff::{SignedDuration, Timestamp, Unit};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::Value;
use sovereign_e2e::{Env, RELEASE, in_namespaces, wait_for};
use sovereign_operator::api::{GpuAllocation, ProjectPhase, find_condition};

use crate::grants::{alloc_yaml, pool_yaml};
use crate::projects::{atom, project_yaml, status, wait_project};

const MINUTE: Duration = Duration::from_secs(60);

/// Runs `plan` as a user with the chart's read-only planner role would, and
/// returns its JSON.
fn run_plan(
    env: &Env,
    kubeconfig: &std::path::Path,
    file: &std::path::Path,
    at: Option<&str>,
) -> anyhow::Result<Value> {
    let mut cmd = std::process::Command::new(&env.operator_bin);
    cmd.args(["plan", "-o", "json", "--kubeconfig"]).arg(kubeconfig).arg("-f").arg(file);
    if let Some(at) = at {
        cmd.args(["--at", at]);
    }
    let out = cmd.output()?;
    ensure!(out.status.success(), "plan failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn by<'a>(list: &'a Value, field: &str, value: &str) -> anyhow::Result<&'a Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|v| v[field] == value)
        .with_context(|| format!("no {field}={value} in {list}"))
}

/// (phase, Ready reason, Ready message) of an allocation as the operator wrote it.
async fn allocation_ready(env: &Env, name: &str) -> Result<(String, String, String), String> {
    let a = Api::<GpuAllocation>::all(env.client.clone()).get(name).await.map_err(|e| e.to_string())?;
    let s = a.status.unwrap_or_default();
    let ready = find_condition(&s.conditions, "Ready").cloned().ok_or("no Ready condition yet")?;
    Ok((format!("{:?}", s.phase.unwrap_or_default()), ready.reason, ready.message))
}

async fn wait_allocation_as_planned(env: &Env, planned: &Value) -> anyhow::Result<()> {
    let name = planned["name"].as_str().unwrap_or_default();
    let want = (
        planned["phase"].as_str().unwrap_or_default().to_string(),
        planned["reason"].as_str().unwrap_or_default().to_string(),
        planned["message"].as_str().unwrap_or_default().to_string(),
    );
    wait_for(&format!("{name} to be as planned {want:?}"), MINUTE, || async {
        let got = allocation_ready(env, name).await?;
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await
}

pub async fn the_operator_does_what_plan_said(env: Arc<Env>) -> anyhow::Result<()> {
    in_namespaces(&env, &["plan-run", "plan-ded"], async |names, scope| {
        let (run_ns, ded_ns) = (&names[0], &names[1]);
        // Now: the ATOM pool fully granted to one team, whose 4-node gang runs.
        scope.apply(&atom())?;
        scope.apply(&pool_yaml("e2e-h200", "nvidia.com/gpu", ("nvidia.com/gpu.product", "NVIDIA-H200"), 1.0))?;
        scope.apply(&alloc_yaml("e2e-plan-run", &[run_ns], "[{pool: e2e-atom, accelerators: 32}]", ""))?;
        scope.apply(&project_yaml("low", run_ns, "e2e-plan-run", "[e2e-atom]", 4, "  priority: 0\n", ""))?;
        wait_project(&env, run_ns, "low", ProjectPhase::Running, MINUTE).await?;

        // The changes: a dedicated grant, a grant that does not fit next to it,
        // a grant whose window opens in a minute, and an urgent run that must
        // preempt the running gang.
        let start = Timestamp::now().checked_add(SignedDuration::from_secs(40))?.round(Unit::Second)?;
        let changes = [
            alloc_yaml("e2e-plan-dedicated", &[ded_ns], "[{pool: e2e-h200, accelerators: 16, mode: Dedicated}]", ""),
            alloc_yaml("e2e-plan-toobig", &[ded_ns], "[{pool: e2e-h200, accelerators: 24}]", ""),
            alloc_yaml(
                "e2e-plan-window",
                &[ded_ns],
                "[{pool: e2e-h200, accelerators: 8}]",
                &format!("  window: {{start: \"{start}\"}}\n"),
            ),
            project_yaml("urgent", run_ns, "e2e-plan-run", "[e2e-atom]", 1, "  priority: 100\n", ""),
        ]
        .join("---\n");
        let file = env.state.join(format!("plan-{run_ns}.yaml"));
        std::fs::write(&file, &changes)?;
        // Planned by a user who may only list (the chart's planner role).
        env.kubectl_ok(&["-n", run_ns, "create", "serviceaccount", "planner"], None)?;
        scope.apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {run_ns}-planner}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {RELEASE}-planner}}\n\
             subjects: [{{kind: ServiceAccount, name: planner, namespace: {run_ns}}}]\n"
        ))?;
        let planner = env.service_account_kubeconfig(run_ns, "planner", "planner-kubeconfig")?;
        let plan = run_plan(&env, &planner, &file, None)?;
        let at = start.checked_add(SignedDuration::from_secs(5))?.to_string();
        let later = run_plan(&env, &planner, &file, Some(&at))?;

        // What the plan says.
        let allocs = &plan["allocations"];
        let dedicated = by(allocs, "name", "e2e-plan-dedicated")?;
        ensure!(dedicated["phase"] == "Active", "{dedicated}");
        let toobig = by(allocs, "name", "e2e-plan-toobig")?;
        ensure!(toobig["phase"] == "Pending" && toobig["reason"] == "InsufficientCapacity", "{toobig}");
        let window = by(allocs, "name", "e2e-plan-window")?;
        ensure!(window["reason"] == "WindowNotOpen", "{window}");
        ensure!(by(&later["allocations"], "name", "e2e-plan-window")?["phase"] == "Active", "{}", later["allocations"]);
        let reserved: BTreeSet<String> = plan["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["reserved"] == "e2e-plan-dedicated")
            .filter_map(|n| n["node"].as_str().map(String::from))
            .collect();
        ensure!(reserved.len() == 2, "two whole H200 nodes reserved: {}", plan["nodes"]);
        let urgent = by(&plan["projects"], "project", &format!("{run_ns}/urgent"))?.clone();
        ensure!(
            urgent["fate"] == "Admitted" && urgent["preempts"] == serde_json::json!([format!("{run_ns}/low")]),
            "{urgent}"
        );
        let low = by(&plan["projects"], "project", &format!("{run_ns}/low"))?;
        ensure!(low["fate"] == "Preempted", "{low}");
        let quotas: BTreeMap<(String, String), Option<i64>> = plan["quotas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|q| {
                (
                    (
                        q["namespace"].as_str().unwrap_or_default().into(),
                        q["resource"].as_str().unwrap_or_default().into(),
                    ),
                    q["planned"].as_i64(),
                )
            })
            .collect();
        ensure!(quotas.get(&(ded_ns.clone(), "nvidia.com/gpu".into())) == Some(&Some(16)), "{}", plan["quotas"]);

        // Apply for real: the operator must do exactly that.
        scope.apply(&changes)?;
        for a in allocs.as_array().into_iter().flatten() {
            wait_allocation_as_planned(&env, a).await?;
        }
        let nodes: Api<Node> = Api::all(env.client.clone());
        wait_for("the planned nodes to be reserved", MINUTE, || async {
            let lp = ListParams::default().labels("sovereign.ai/reserved-for=e2e-plan-dedicated");
            let got: BTreeSet<String> =
                nodes.list(&lp).await.map_err(|e| e.to_string())?.items.iter().map(|n| n.name_any()).collect();
            if got == reserved { Ok(()) } else { Err(format!("{got:?}, planned {reserved:?}")) }
        })
        .await?;
        let quota_api: Api<ResourceQuota> = Api::namespaced(env.client.clone(), ded_ns);
        wait_for("the planned quota", MINUTE, || async {
            let q = quota_api.get_opt("sovereign-accelerators").await.map_err(|e| e.to_string())?.ok_or("no quota")?;
            let hard = q.spec.and_then(|s| s.hard).unwrap_or_default();
            let got: BTreeMap<String, Option<i64>> = hard
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("requests.")?.to_string(), v.0.parse().ok())))
                .collect();
            let want: BTreeMap<String, Option<i64>> =
                quotas.iter().filter(|((ns, _), _)| ns == ded_ns).map(|((_, r), v)| (r.clone(), *v)).collect();
            if want.iter().all(|(r, v)| got.get(r) == Some(v)) {
                Ok(())
            } else {
                Err(format!("{got:?}, planned {want:?}"))
            }
        })
        .await?;
        let s = wait_project(&env, run_ns, "urgent", ProjectPhase::Running, MINUTE).await?;
        let planned_nodes: BTreeSet<&str> =
            urgent["nodes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let got_nodes: BTreeSet<&str> = s.nodes.iter().map(String::as_str).collect();
        ensure!(s.pool.as_deref() == urgent["pool"].as_str(), "urgent in {:?}, planned {}", s.pool, urgent["pool"]);
        // A preemptor is admitted as soon as enough of its victims' workers are
        // gone; which of them stops first decides its node, so the plan's node
        // is one choice among the victims' equal nodes: the pool, the number of
        // nodes and the victims are what it must get right.
        ensure!(got_nodes.len() == planned_nodes.len(), "urgent on {got_nodes:?}, planned {planned_nodes:?}");
        ensure!(got_nodes.iter().all(|n| n.starts_with("atom-")), "urgent on {got_nodes:?}, outside the atom pool");
        ensure!(s.preempted == vec![format!("{run_ns}/low")], "urgent preempted {:?}", s.preempted);
        let low = status(&env, run_ns, "low").await.map_err(anyhow::Error::msg)?;
        ensure!(low.phase == Some(ProjectPhase::Queued) && low.preemptions == 1, "low: {low:?}");

        // And at the window's start, what `--at` said.
        let w = by(&later["allocations"], "name", "e2e-plan-window")?.clone();
        wait_allocation_as_planned(&env, &w).await?;

        // The report reads the same center with the same read-only rights.
        wait_for("the report to show the grants and the queue", MINUTE, || async {
            let out = std::process::Command::new(&env.operator_bin)
                .args(["report", "-o", "json", "--kubeconfig"])
                .arg(&planner)
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("report failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
            let report: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            let row = |name: &str| {
                report["rows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["section"] == "allocation" && r["name"] == name)
                    .cloned()
                    .unwrap_or_default()
            };
            let (dedicated, run) = (row("e2e-plan-dedicated"), row("e2e-plan-run"));
            let ok = dedicated["granted"] == 16
                && dedicated["phase"] == "Active"
                && run["running"] == 1
                && run["queued"] == 1
                && run["inUse"] == 8;
            if ok { Ok(()) } else { Err(format!("dedicated {dedicated}, run {run}")) }
        })
        .await?;

        // A tenant with `view` in its namespace and the chart's tenant-reader role gets its
        // own figures with -n; every namespace is refused with a hint that says -n.
        env.kubectl_ok(&["-n", run_ns, "create", "serviceaccount", "tenant"], None)?;
        scope.apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: tenant-view, namespace: {run_ns}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}\n\
             subjects: [{{kind: ServiceAccount, name: tenant, namespace: {run_ns}}}]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {run_ns}-tenant-reader}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {RELEASE}-tenant-reader}}\n\
             subjects: [{{kind: ServiceAccount, name: tenant, namespace: {run_ns}}}]\n"
        ))?;
        let tenant = env.service_account_kubeconfig(run_ns, "tenant", "tenant-kubeconfig")?;
        let report = |kubeconfig: &std::path::Path, scope: &[&str]| {
            std::process::Command::new(&env.operator_bin)
                .args(["report", "-o", "json", "--kubeconfig"])
                .arg(kubeconfig)
                .args(scope)
                .output()
                .map_err(|e| e.to_string())
        };
        let names = |report: &Value, section: &str| -> Vec<String> {
            let rows = report["rows"].as_array().into_iter().flatten();
            rows.filter(|r| r["section"] == section).filter_map(|r| r["name"].as_str().map(str::to_string)).collect()
        };
        wait_for("a tenant's report of its own namespace", MINUTE, || async {
            let out = report(&tenant, &["-n", run_ns])?;
            if !out.status.success() {
                return Err(format!("report -n failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
            let r: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            let (allocations, pools) = (names(&r, "allocation"), names(&r, "pool"));
            let total = r["rows"].as_array().into_iter().flatten().find(|r| r["section"] == "total").cloned();
            let total = total.unwrap_or_default();
            let ok = allocations == ["e2e-plan-run"] && pools == ["e2e-atom"] && total["running"] == 1 && total["queued"] == 1;
            if ok { Ok(()) } else { Err(format!("allocations {allocations:?}, pools {pools:?}, total {total}")) }
        })
        .await?;
        let out = report(&tenant, &["-A"]).map_err(anyhow::Error::msg)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "a tenant read every namespace's projects");
        ensure!(stderr.contains("hint:") && stderr.contains("-n NAMESPACE"), "no hint for the tenant: {stderr}");
        // The suite's admin reads every namespace.
        let out = report(&env.kubeconfig, &["-A"]).map_err(anyhow::Error::msg)?;
        ensure!(out.status.success(), "admin report: {}", String::from_utf8_lossy(&out.stderr));
        let all: Value = serde_json::from_slice(&out.stdout)?;
        let allocations = names(&all, "allocation");
        ensure!(
            allocations.iter().any(|a| a == "e2e-plan-run") && allocations.iter().any(|a| a == "e2e-plan-dedicated"),
            "admin report: {allocations:?}"
        );
        Ok(())
    })
    .await
}
