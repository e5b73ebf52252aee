//! The accelerator-hour ledger against ground truth: projects and plain pods
//! on two pools of different chargeFactors, with gang restarts, a
//! suspension, a worker deleted and runs finishing while the operator is
//! SIGKILLed and kept down. Every allocation's hours must match what the
//! pods' own timestamps say, watched by the test itself.
//!
//! `LEDGER_SCALE=<n>` stretches every duration n times (`e2e/bench/ledger`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use sovereign_e2e::{Env, Operator, free_port, in_namespaces, wait_for};
use sovereign_operator::api::{AllocationPhase, GpuAllocation, GpuAllocationStatus, ModelProject, ProjectPhase};

use crate::grants::{alloc_yaml, pool_yaml, wait_phase};
use crate::projects::{project_yaml, wait_no_workers, wait_project};

/// Pools of the scenario: (name, resource, node label, chargeFactor).
const POOLS: [(&str, &str, (&str, &str), f64); 2] = [
    ("e2e-h200", "nvidia.com/gpu", ("nvidia.com/gpu.product", "NVIDIA-H200"), 1.5),
    ("e2e-atom", "rebellions.ai/ATOM", ("rebellions.ai/npu.family", "ATOM"), 0.5),
];

/// Relative error allowed per allocation. Both sides read the same whole-second
/// pod timestamps (kwok writes them truncated to the second), so what is left
/// is the ends the API does not keep: a plain pod deleted without a deletion
/// time in its last object is charged from when the operator's watch saw it
/// go, the truth from when the test's watch did (milliseconds apart), and a
/// running pod is charged up to the reckoning. 0.5% of these runs is more
/// than a second of every pod.
const TOLERANCE: f64 = 0.005;

pub fn scale() -> u64 {
    std::env::var("LEDGER_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

/// Every pod of the namespaces as last seen, and when the watch saw it go.
pub type Seen = Arc<Mutex<BTreeMap<String, (Pod, Option<i64>)>>>;

pub fn watch_pods(env: &Env, ns: &str, seen: Seen) -> tokio::task::JoinHandle<()> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Some(ev) = events.next().await {
            let now = Timestamp::now().as_millisecond();
            let mut seen = seen.lock().expect("seen lock");
            match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                    seen.insert(p.uid().unwrap_or_default(), (p, None));
                }
                Ok(watcher::Event::Delete(p)) => {
                    seen.insert(p.uid().unwrap_or_default(), (p, Some(now)));
                }
                _ => {}
            }
        }
    })
}

fn ms(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> i64 {
    t.0.as_millisecond()
}

/// Ground truth of one pod in charge-weighted accelerator-milliseconds: from
/// `status.startTime` to the last container's `finishedAt` if it finished,
/// else to its deletion time or the moment it went, whichever came first.
pub fn truth(pod: &Pod, gone: Option<i64>, weight: f64, now: i64) -> f64 {
    let Some(status) = pod.status.as_ref() else { return 0.0 };
    let Some(start) = status.start_time.as_ref().map(ms) else { return 0.0 };
    let finished = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref().map(ms))
        .max();
    let deleted = pod.metadata.deletion_timestamp.as_ref().map(ms);
    let end = finished.or(match (deleted, gone) {
        (Some(d), Some(g)) => Some(d.min(g)),
        (d, g) => d.or(g),
    });
    (end.unwrap_or(now).min(now) - start).max(0) as f64 * weight
}

/// A pod a tenant creates directly, on the nodes of `pool` (an index in POOLS).
fn plain_pod(name: &str, pool: usize, n: u32) -> anyhow::Result<Pod> {
    let (_, resource, (key, value), _) = POOLS[pool];
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"nodeSelector": {key: value}, "containers": [{"name": "main", "image": "trainer:1",
            "resources": {"limits": {resource: n.to_string()}, "requests": {resource: n.to_string()}}}],
            "tolerations": [{"operator": "Exists"}], "terminationGracePeriodSeconds": 1}
    }))?)
}

fn suspend(env: &Env, ns: &str, name: &str, on: bool) -> anyhow::Result<()> {
    let patch = format!(r#"{{"spec":{{"runPolicy":{{"suspend":{on}}}}}}}"#);
    env.kubectl_ok(&["-n", ns, "patch", "modelproject", name, "--type=merge", "-p", &patch], None)?;
    Ok(())
}

async fn allocation(env: &Env, name: &str) -> Result<GpuAllocationStatus, String> {
    let a = Api::<GpuAllocation>::all(env.client.clone()).get(name).await.map_err(|e| e.to_string())?;
    Ok(a.status.unwrap_or_default())
}

/// Scenario time passing in a known state (the thing measured), not a wait for
/// a result.
async fn run_for(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs * scale())).await;
}

pub async fn every_allocation_is_charged_its_pods_own_lifetimes_across_restarts_and_an_outage(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let kubeconfig = env.operator_kubeconfig()?;
    let s = scale();
    in_namespaces(&env, &["ledger-a", "ledger-b"], async |names, scope| {
        let (a, b) = (names[0].clone(), names[1].clone());
        let seen: Seen = Default::default();
        let watches = [watch_pods(&env, &a, seen.clone()), watch_pods(&env, &b, seen.clone())];
        for (name, resource, label, factor) in POOLS {
            scope.apply(&pool_yaml(name, resource, label, factor))?;
        }
        let grants_a = "[{pool: e2e-h200, accelerators: 20}, {pool: e2e-atom, accelerators: 8}]";
        let grants_b = "[{pool: e2e-h200, accelerators: 10}, {pool: e2e-atom, accelerators: 16}]";
        scope.apply(&alloc_yaml("e2e-ledger-a", &[&a], grants_a, ""))?;
        scope.apply(&alloc_yaml("e2e-ledger-b", &[&b], grants_b, ""))?;
        for alloc in ["e2e-ledger-a", "e2e-ledger-b"] {
            wait_phase(&env, alloc, AllocationPhase::Active, Duration::from_secs(60)).await?;
        }

        // A: a steady 2-worker gang on GPUs, a crash-looping one on NPUs, a plain GPU pod.
        // B: a run that is suspended and resumed, one that finishes during the outage, a plain NPU pod.
        let crash = format!("sim.sovereign.ai/complete-after: {}s, sim.sovereign.ai/exit-code: \"1\"", 6 * s);
        let done = format!("sim.sovereign.ai/complete-after: {}s", 20 * s);
        let projects = [
            (a.as_str(), "steady", "e2e-ledger-a", "[e2e-h200]", 2, String::new(), String::new()),
            (a.as_str(), "crashy", "e2e-ledger-a", "[e2e-atom]", 1, "  runPolicy: {maxRestarts: 2}\n".into(), crash),
            (b.as_str(), "pausable", "e2e-ledger-b", "[e2e-atom]", 1, String::new(), String::new()),
            (b.as_str(), "short", "e2e-ledger-b", "[e2e-h200]", 1, String::new(), done),
        ];
        for (ns, name, alloc, pools, workers, extra, annotations) in &projects {
            scope.apply(&project_yaml(name, ns, alloc, pools, *workers, extra, annotations))?;
        }
        for (ns, name) in [(&a, "steady"), (&b, "pausable"), (&b, "short")] {
            wait_project(&env, ns, name, ProjectPhase::Running, Duration::from_secs(60)).await?;
        }
        // After the gangs are placed, so that they do not take the nodes planned for them.
        for (ns, pod) in [(&a, plain_pod("plain-gpu", 0, 2)?), (&b, plain_pod("plain-npu", 1, 4)?)] {
            Api::<Pod>::namespaced(env.client.clone(), ns).create(&PostParams::default(), &pod).await?;
        }
        run_for(8).await;

        // The operator is killed and kept down: a worker is deleted, runs end.
        let old = env.operator.lock().await.take().context("no shared operator")?;
        old.kill().await?;
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &a);
        pods.delete("steady-worker-1", &DeleteParams::default()).await?;
        run_for(25).await;
        let mut op = Operator::start(&env, &kubeconfig, free_port()?, "operator-ledger.log")?;
        op.wait_ready(Duration::from_secs(60)).await?;
        *env.operator.lock().await = Some(op);

        wait_for("steady to run again after losing a worker", Duration::from_secs(60), || async {
            let st = crate::projects::status(&env, &a, "steady").await?;
            if st.phase == Some(ProjectPhase::Running) && st.disruptions >= 1 {
                Ok(())
            } else {
                Err(format!("{:?} disruptions {}", st.phase, st.disruptions))
            }
        })
        .await?;
        suspend(&env, &b, "pausable", true)?;
        wait_project(&env, &b, "pausable", ProjectPhase::Suspended, Duration::from_secs(30)).await?;
        wait_no_workers(&env, &b, "pausable").await?;
        run_for(5).await;
        suspend(&env, &b, "pausable", false)?;
        wait_project(&env, &b, "pausable", ProjectPhase::Running, Duration::from_secs(60)).await?;
        run_for(10).await;

        // The end: runs suspended (projects stay, with their hours), plain pods deleted.
        for (ns, name, ..) in &projects {
            suspend(&env, ns, name, true)?;
        }
        for (ns, name) in [(&a, "plain-gpu"), (&b, "plain-npu")] {
            Api::<Pod>::namespaced(env.client.clone(), ns).delete(name, &DeleteParams::default()).await?;
        }
        for (ns, name, ..) in &projects {
            if *name != "short" {
                wait_no_workers(&env, ns, name).await?;
            }
        }
        for alloc in ["e2e-ledger-a", "e2e-ledger-b"] {
            wait_for(&format!("{alloc}'s final books"), Duration::from_secs(60), || async {
                let st = allocation(&env, alloc).await?;
                let l = st.ledger.clone().unwrap_or_default();
                if st.charge_rate == 0.0 && st.in_use == 0 && l.open.iter().all(|o| o.end_millis.is_some()) {
                    Ok(())
                } else {
                    Err(format!("rate {} in use {} open {:?}", st.charge_rate, st.in_use, l.open))
                }
            })
            .await?;
        }
        for w in watches {
            w.abort();
        }

        // Ground truth from the pods' own timestamps.
        let nodes = Api::<Node>::all(env.client.clone()).list(&Default::default()).await?.items;
        let factor_of = |node: &str| -> Option<(&str, &str, f64)> {
            let n = nodes.iter().find(|n| n.name_any() == node)?;
            POOLS.iter().find(|p| n.labels().get(p.2.0).map(String::as_str) == Some(p.2.1)).map(|p| (p.0, p.1, p.3))
        };
        let now = Timestamp::now().as_millisecond();
        let mut want: BTreeMap<&str, f64> = BTreeMap::new();
        for (pod, gone) in seen.lock().expect("seen lock").values() {
            let Some((_, resource, factor)) =
                pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).and_then(factor_of)
            else {
                continue;
            };
            let devices: f64 = pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .filter_map(|c| c.resources.as_ref()?.requests.as_ref()?.get(resource)?.0.parse::<f64>().ok())
                .sum();
            let alloc = if pod.namespace().as_deref() == Some(a.as_str()) { "e2e-ledger-a" } else { "e2e-ledger-b" };
            *want.entry(alloc).or_default() += truth(pod, *gone, devices * factor, now) / 3_600_000.0;
        }
        let op = env.operator.lock().await;
        let op = op.as_ref().context("no operator")?;
        for (alloc, truth_hours) in &want {
            let st = allocation(&env, alloc).await.map_err(anyhow::Error::msg)?;
            let got = st.accelerator_hours_used;
            let err = (got - truth_hours) / truth_hours;
            println!("ledger: {alloc}: charged {got:.6} h, truth {truth_hours:.6} h, error {:+.4}%", err * 100.0);
            ensure!(err.abs() <= TOLERANCE, "{alloc}: charged {got} accelerator-hours, the pods say {truth_hours}");
            // The pools and the projects (plus plain pods) sum to the allocation.
            let pools: f64 = st.pool_hours.iter().map(|p| p.accelerator_hours_used).sum();
            ensure!((pools - got).abs() < 1e-5, "{alloc}: pools sum to {pools}, not {got}");
            let projects: f64 = st.project_hours.iter().map(|p| p.accelerator_hours_used).sum();
            ensure!(projects > 0.0 && projects < got, "{alloc}: projects {projects} of {got}: plain pods are the rest");
            for ph in &st.project_hours {
                let (ns, name) = ph.project.split_once('/').context("project key")?;
                let shown =
                    wait_for(&format!("{} usage in its status", ph.project), Duration::from_secs(30), || async {
                        let p = Api::<ModelProject>::namespaced(env.client.clone(), ns)
                            .get(name)
                            .await
                            .map_err(|e| e.to_string())?;
                        let u = p.status.and_then(|s| s.usage).ok_or("no usage")?;
                        let h = u.pools.iter().find(|p| p.pool == ph.pool).map(|p| p.accelerator_hours_used);
                        if h == Some(ph.accelerator_hours_used) { Ok(u) } else { Err(format!("{u:?}")) }
                    })
                    .await?;
                ensure!(shown.charge_rate == 0.0, "{}: still charged at {}", ph.project, shown.charge_rate);
            }
            // The counter says the same in seconds (it may lead by a moment, never
            // lag beyond the status' rounding to 1e-6 h).
            let counted = op.metric("sovereign_allocation_accelerator_seconds_total", &format!("\"{alloc}\"")).await?;
            let lead = counted - got * 3600.0;
            ensure!(lead >= -0.01 && lead <= TOLERANCE * got * 3600.0, "{alloc}: counter {counted} s against {got} h");
        }
        ensure!(want.len() == 2, "ground truth for {want:?}");
        Ok(())
    })
    .await
}
