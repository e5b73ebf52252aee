//! The upgrade path of the CRDs (docs/operations/api-versions.md): v1alpha1 objects created
//! under the chart of an earlier commit are still served, read and reconciled after
//! `helm upgrade` to this tree's chart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use sovereign_e2e::Env;
use sovereign_operator::api::{GpuAllocation, ModelProject, ProjectPhase};

use crate::projects::{project_yaml, suspend, wait_project, with_grant};

/// The chart to upgrade from: the last commit before `status.conditions` became a list map keyed
/// by `type` with bounded fields (a change of all three CRDs' schemas). Move it to the last
/// release once there is one.
const EARLIER: &str = "cf61320";

/// The chart folder of commit `rev`, written under the cluster's state folder by `git archive`
/// (the repository's history is needed: a shallow clone does not have it).
fn chart_at(env: &Env, rev: &str) -> anyhow::Result<PathBuf> {
    let dir = env.state.join(format!("chart-{rev}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let archive = Command::new("git")
        .arg("-C")
        .arg(&env.repo)
        .args(["archive", "--format=tar", rev, "charts/sovereign-operator"])
        .output()?;
    if !archive.status.success() {
        bail!(
            "git archive {rev} failed (a shallow clone? `git fetch --unshallow`): {}",
            String::from_utf8_lossy(&archive.stderr)
        );
    }
    let mut tar = Command::new("tar").arg("-x").arg("-C").arg(&dir).stdin(std::process::Stdio::piped()).spawn()?;
    std::io::Write::write_all(tar.stdin.as_mut().context("tar stdin")?, &archive.stdout)?;
    ensure!(tar.wait()?.success(), "tar -x of the chart at {rev} failed");
    Ok(dir.join("charts/sovereign-operator"))
}

/// The list type of `status.conditions` in the served ModelProject CRD.
async fn conditions_list_type(env: &Env) -> anyhow::Result<Option<String>> {
    let crd = Api::<CustomResourceDefinition>::all(env.client.clone()).get("modelprojects.sovereign.ai").await?;
    let crd = serde_json::to_value(crd)?;
    let path = "/spec/versions/0/schema/openAPIV3Schema/properties/status/properties/conditions/x-kubernetes-list-type";
    Ok(crd.pointer(path).and_then(|v| v.as_str()).map(str::to_string))
}

/// The header of `kubectl get` (columns separated by two spaces or more).
fn header(env: &Env, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = env.kubectl_ok(args, None)?;
    let first = out.lines().next().context("kubectl get printed nothing")?;
    Ok(first.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_string).collect())
}

pub async fn objects_made_under_an_earlier_chart_are_served_and_reconciled_after_an_upgrade(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let earlier = chart_at(&env, EARLIER)?;
    env.install_chart_from(&earlier, &[]).context("helm upgrade to the earlier chart")?;
    let res = under_the_earlier_chart_then_upgraded(&env, &earlier).await;
    // Whatever happened: the suite's release is this tree's chart again.
    let restored = env.install_chart();
    let _ = std::fs::remove_dir_all(earlier.parent().and_then(Path::parent).unwrap_or(&earlier));
    res?;
    restored
}

async fn under_the_earlier_chart_then_upgraded(env: &Arc<Env>, earlier: &Path) -> anyhow::Result<()> {
    ensure!(
        conditions_list_type(env).await?.is_none(),
        "the chart at {EARLIER} ({}) should serve conditions as a plain list",
        earlier.display()
    );
    // Created under the earlier CRDs: the pools, the allocation, the namespace and two runs.
    with_grant(env, "upgrade", 16, async |ns, scope| {
        scope.apply(&project_yaml("before", &ns, "e2e-train", "[e2e-atom]", 1, "", ""))?;
        scope.apply(&project_yaml("paused", &ns, "e2e-train", "[e2e-atom]", 1, "", ""))?;
        wait_project(env, &ns, "before", ProjectPhase::Running, Duration::from_secs(60)).await?;
        wait_project(env, &ns, "paused", ProjectPhase::Running, Duration::from_secs(60)).await?;

        env.install_chart().context("helm upgrade to this tree's chart")?;
        ensure!(
            conditions_list_type(env).await?.as_deref() == Some("map"),
            "after the upgrade the served CRD should have conditions as a list map"
        );

        // Served: kubectl lists them, with this tree's default columns and the rest under -o wide.
        let cols = header(env, &["-n", &ns, "get", "modelprojects"])?;
        ensure!(cols == ["NAME", "ALLOCATION", "PHASE", "POOL", "WORKERS", "RUNNING", "AGE"], "columns {cols:?}");
        let wide = header(env, &["-n", &ns, "get", "modelprojects", "-o", "wide"])?;
        ensure!(wide.len() > cols.len() && wide.iter().any(|c| c == "PER-WORKER"), "-o wide columns {wide:?}");
        let names = env.kubectl_ok(&["-n", &ns, "get", "modelprojects", "-o", "name"], None)?;
        ensure!(names.contains("modelproject.sovereign.ai/before"), "kubectl get lists {names:?}");
        env.kubectl_ok(&["get", "gpuallocation", "e2e-train"], None)?;

        // Read: the typed clients of this tree decode the objects stored before the upgrade.
        let before = Api::<ModelProject>::namespaced(env.client.clone(), &ns).get("before").await?;
        let status = before.status.context("before has no status")?;
        ensure!(status.phase == Some(ProjectPhase::Running), "before is {:?}", status.phase);
        ensure!(!status.conditions.is_empty(), "before's conditions were lost");
        let alloc = Api::<GpuAllocation>::all(env.client.clone()).get("e2e-train").await?;
        ensure!(alloc.status.is_some_and(|s| !s.conditions.is_empty()), "the allocation's status was lost");

        // Reconciled: a change to an object stored before the upgrade is validated by the new
        // schema and acted on, and a run created after it is admitted beside the earlier one.
        suspend(env, &ns, "paused", true)?;
        wait_project(env, &ns, "paused", ProjectPhase::Suspended, Duration::from_secs(30)).await?;
        scope.apply(&project_yaml("after", &ns, "e2e-train", "[e2e-atom]", 1, "", ""))?;
        wait_project(env, &ns, "after", ProjectPhase::Running, Duration::from_secs(60)).await?;
        let s = wait_project(env, &ns, "before", ProjectPhase::Running, Duration::from_secs(10)).await?;
        ensure!(s.restarts == 0, "before restarted {} times across the upgrade", s.restarts);
        Ok(())
    })
    .await
}
