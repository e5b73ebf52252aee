//! Real training through the operator on the dev cluster's real node: the
//! trainer image (Debian's python3-torch, examples/train/train.py) runs as the
//! workers of ModelProjects in a pool that selects only that node. torchrun
//! finds worker 0 by the name the operator gives it (resolved by the cluster's
//! CoreDNS), the group trains over gloo, checkpoints to a volume, survives a
//! killed worker and a preemption, and every rank ends with the same
//! parameters.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use sovereign_e2e::incluster::{RealNode, container_id_of};
use sovereign_e2e::{Env, Scope, in_namespaces, wait_for};
use sovereign_operator::api::{AcceleratorPool, GpuAllocation, ProjectPhase, find_condition};

use crate::grants::alloc_yaml;
use crate::ledger::{Seen, truth, watch_pods};
use crate::projects::{status, wait_project, workers};

const POOL: &str = "e2e-real";
const GRANT: &str = "e2e-real";
const MINUTE: Duration = Duration::from_secs(60);

/// The real node as a trainer pool (e2e/lib/node.sh: node_trainer_pool), from `.e2e/cluster.env`.
pub struct Trainer {
    pub image: String,
    pub resource: String,
    pub label: String,
    /// Slots per trainer node.
    pub slots: i64,
    pub nodes: Vec<String>,
    pub node: RealNode,
    checkpoints: PathBuf,
}

impl Trainer {
    pub fn from_state(env: &Env) -> anyhow::Result<Option<Self>> {
        let Some(node) = RealNode::from_state(env)? else { return Ok(None) };
        let text = std::fs::read_to_string(env.state.join("cluster.env"))?;
        let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| vars.get(k).map(|v| v.to_string()).with_context(|| format!("{k} in cluster.env"));
        Ok(Some(Self {
            image: get("TRAINER_IMAGE")?,
            resource: get("TRAINER_RESOURCE")?,
            label: get("TRAINER_LABEL")?,
            slots: get("TRAINER_SLOTS")?.parse()?,
            nodes: (1..=get("TRAINER_NODE_COUNT")?.parse::<usize>()?)
                .map(|i| format!("sovereign-e2e-trainer-{i}"))
                .collect(),
            node,
            checkpoints: env.state.join("node/checkpoints"),
        }))
    }
}

pub fn available(env: &Env) -> bool {
    matches!(Trainer::from_state(env), Ok(Some(_)))
}

fn pool_yaml(t: &Trainer) -> String {
    format!(
        "apiVersion: sovereign.ai/v1alpha1\nkind: AcceleratorPool\nmetadata: {{name: {POOL}}}\nspec:\n  resourceName: {}\n  kind: GPU\n  vendor: E2E\n  model: cpu-trainer\n  chargeFactor: 1.0\n  nodeSelector: {{matchLabels: {{\"{}\": \"true\"}}}}\n  topologyKeys: [kubernetes.io/hostname]\n  tolerations: [{{key: {}, operator: Exists, effect: NoSchedule}}]\n",
        t.resource, t.label, t.label
    )
}

/// A PersistentVolumeClaim `checkpoints` in `ns`, bound to a hostPath volume on
/// the real node (a folder under .e2e/): it outlives the gang's pods.
fn checkpoint_volume_yaml(ns: &str, dir: &std::path::Path) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {ns}-checkpoints}}\nspec:\n  capacity: {{storage: 1Gi}}\n  accessModes: [ReadWriteMany]\n  persistentVolumeReclaimPolicy: Retain\n  storageClassName: \"\"\n  claimRef: {{namespace: {ns}, name: checkpoints}}\n  hostPath: {{path: {}, type: Directory}}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: checkpoints, namespace: {ns}}}\nspec:\n  accessModes: [ReadWriteMany]\n  storageClassName: \"\"\n  volumeName: {ns}-checkpoints\n  resources: {{requests: {{storage: 1Gi}}}}\n",
        dir.display()
    )
}

/// A real run: `workers` workers of `per` slots (torchrun processes) each, train.py with `args`.
fn run_yaml(t: &Trainer, ns: &str, name: &str, (workers, per): (u32, u32), spec: &str, args: &[&str]) -> String {
    let args: Vec<String> = ["/opt/train/train.py", "--checkpoint-dir", &format!("/checkpoints/{name}")]
        .iter()
        .map(|a| format!("\"{a}\""))
        .chain(args.iter().map(|a| format!("\"{a}\"")))
        .collect();
    format!(
        "apiVersion: sovereign.ai/v1alpha1\nkind: ModelProject\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  allocation: {GRANT}\n  placement: {{pools: [{POOL}]}}\n  workers: {workers}\n  acceleratorsPerWorker: {per}\n{spec}  template:\n    image: {}\n    imagePullPolicy: Never\n    args: [{}]\n    resources: {{requests: {{cpu: 50m, memory: 256Mi}}}}\n    volumes: [{{name: checkpoints, persistentVolumeClaim: {{claimName: checkpoints}}}}]\n    volumeMounts: [{{name: checkpoints, mountPath: /checkpoints}}]\n    terminationGracePeriodSeconds: 30\n",
        t.image,
        args.join(", ")
    )
}

/// Runs `body` with the real node's pool, a grant of all its slots to a fresh
/// namespace and a checkpoint volume there; cleans everything up.
async fn with_real_pool(
    env: &Env,
    test: &str,
    body: impl AsyncFnOnce(String, &mut Scope, &Trainer) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let t = Trainer::from_state(env)?.context("the cluster has no real node with the trainer image")?;
    in_namespaces(env, &[test], async |names, scope| {
        let ns = names[0].clone();
        let dir = t.checkpoints.join(&ns);
        std::fs::create_dir_all(&dir)?;
        // the image runs as a non-root user; a hostPath folder keeps the host's modes
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let res = async {
            scope.apply(&pool_yaml(&t))?;
            let all = t.slots * t.nodes.len() as i64;
            scope.apply(&alloc_yaml(GRANT, &[&ns], &format!("[{{pool: {POOL}, accelerators: {all}}}]"), ""))?;
            scope.apply(&checkpoint_volume_yaml(&ns, &dir))?;
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
            wait_for("the checkpoint claim to bind", MINUTE, || async {
                let c = pvcs.get("checkpoints").await.map_err(|e| e.to_string())?;
                let phase = c.status.and_then(|s| s.phase).unwrap_or_default();
                if phase == "Bound" { Ok(()) } else { Err(phase) }
            })
            .await?;
            let active = sovereign_operator::api::AllocationPhase::Active;
            crate::grants::wait_phase(env, GRANT, active, MINUTE).await?;
            body(ns.clone(), scope, &t).await
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        res
    })
    .await
}

/// One line train.py printed: its kind (start, step, checkpoint, stopped,
/// final), its fields, and the pod (uid) that printed it.
#[derive(Clone, Debug)]
struct Said {
    pod: String,
    kind: String,
    fields: BTreeMap<String, String>,
}

impl Said {
    fn get(&self, k: &str) -> &str {
        self.fields.get(k).map(String::as_str).unwrap_or_default()
    }
    fn num(&self, k: &str) -> f64 {
        self.get(k).parse().unwrap_or(f64::NAN)
    }
}

/// train.py's lines from the kubelet's log files (`<ns>_<pod>_<uid>/<container>/<n>.log`
/// lines: `<time> stdout F [<role><local rank>]:<text>`, torchrun's tee), in the order each
/// pod printed them.
fn said(lines: &[(String, String)]) -> Vec<Said> {
    const KINDS: [&str; 5] = ["start", "step", "checkpoint", "stopped", "final"];
    lines
        .iter()
        .filter_map(|(label, line)| {
            let text = line.splitn(4, ' ').nth(3)?;
            let text = text.strip_prefix('[').and_then(|t| t.split_once("]:")).map_or(text, |(_, t)| t);
            let kind = text.split(' ').next()?;
            if !KINDS.contains(&kind) || !text.contains(" rank=") {
                return None;
            }
            let fields = text.split(' ').skip(1).filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into()));
            Some(Said { pod: label.split('/').next()?.to_string(), kind: kind.into(), fields: fields.collect() })
        })
        .collect()
}

fn of_kind<'a>(lines: &'a [Said], kind: &str) -> Vec<&'a Said> {
    lines.iter().filter(|s| s.kind == kind).collect()
}

/// The final lines of one attempt: one per rank 0..workers, every rank at `steps`
/// with the same parameter hash. Returns that hash.
fn agreed_final(lines: &[Said], workers: u32, steps: u32) -> anyhow::Result<String> {
    let finals = of_kind(lines, "final");
    let ranks: BTreeSet<u32> = finals.iter().filter_map(|s| s.get("rank").parse().ok()).collect();
    ensure!(ranks == (0..workers).collect(), "final lines of ranks {ranks:?}: {finals:?}");
    ensure!(finals.len() == workers as usize, "{} final lines: {finals:?}", finals.len());
    let hashes: BTreeSet<&str> = finals.iter().map(|s| s.get("params_sha256")).collect();
    ensure!(hashes.len() == 1 && hashes.iter().all(|h| h.len() == 64), "ranks disagree: {finals:?}");
    ensure!(
        finals.iter().all(|s| s.get("step") == steps.to_string()),
        "not every rank reached step {steps}: {finals:?}"
    );
    Ok(hashes.into_iter().next().unwrap_or_default().to_string())
}

/// Worker pods of the project, each on its own trainer node.
async fn on_trainer_nodes(env: &Env, t: &Trainer, ns: &str, name: &str) -> anyhow::Result<Vec<Pod>> {
    let pods = workers(env, ns, name).await?;
    let mut seen = BTreeSet::new();
    for p in &pods {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        ensure!(t.nodes.contains(&node) && seen.insert(node.clone()), "{} is on {node:?}", p.name_any());
    }
    Ok(pods)
}

/// The pool selects the trainer nodes and nothing else, with all their slots.
async fn pool_is_the_trainer_nodes(env: &Env, t: &Trainer) -> anyhow::Result<()> {
    let pools: Api<AcceleratorPool> = Api::all(env.client.clone());
    let (n, all) = (t.nodes.len() as i64, t.slots * t.nodes.len() as i64);
    wait_for("the trainer pool to count its nodes", MINUTE, || async {
        let s = pools.get(POOL).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        if s.nodes as i64 == n && s.ready_nodes as i64 == n && s.capacity == all && s.allocatable == all {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await?;
    // Only the trainer nodes carry the label, and they carry no vendor label: no other pool selects them.
    let nodes = Api::<Node>::all(env.client.clone()).list(&ListParams::default().labels(&t.label)).await?;
    let names: Vec<String> = nodes.items.iter().map(|n| n.name_any()).collect();
    ensure!(names == t.nodes, "nodes labelled {}: {names:?}", t.label);
    for n in &nodes.items {
        let vendor = n.labels().keys().find(|k| k.ends_with("gpu.present") || k.ends_with("npu.present")).cloned();
        ensure!(vendor.is_none(), "{} carries {vendor:?}", n.name_any());
    }
    Ok(())
}

/// Waits until train.py has said something that `done` accepts; returns it.
async fn wait_said(
    rec: &sovereign_e2e::incluster::PodLogRecorder,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Said]) -> Option<Said>,
) -> anyhow::Result<Said> {
    wait_for(what, timeout, || async {
        let lines = said(&rec.lines());
        done(&lines).ok_or_else(|| format!("{} lines, last {:?}", lines.len(), lines.last()))
    })
    .await
}

/// A real run of `n` workers forms its group through the rendezvous name and
/// agrees; with `ledger`, the grant is also charged the pods' own lifetimes.
async fn real_run_agrees(env: Arc<Env>, test: &str, n: u32, ledger: bool) -> anyhow::Result<()> {
    with_real_pool(&env, test, async |ns, scope, t| {
        pool_is_the_trainer_nodes(&env, t).await?;
        let rec = t.node.record_pod_logs(&ns);
        let seen: Seen = Default::default();
        let watch = watch_pods(&env, &ns, seen.clone());
        let steps = 20;
        scope.apply(&run_yaml(
            t,
            &ns,
            "run",
            (n, 1),
            "",
            &["--steps", &steps.to_string(), "--checkpoint-every", "5"],
        ))?;
        wait_project(&env, &ns, "run", ProjectPhase::Running, MINUTE).await?;
        let pods = on_trainer_nodes(&env, t, &ns, "run").await?;
        ensure!(pods.len() == n as usize, "{} workers", pods.len());
        let s = wait_project(&env, &ns, "run", ProjectPhase::Succeeded, 3 * MINUTE).await?;
        ensure!(s.restarts == 0 && s.disruptions == 0, "restarts {} disruptions {}", s.restarts, s.disruptions);

        let lines = said(&rec.lines());
        agreed_final(&lines, n, steps)?;
        // Every rank found worker 0 by the operator's name, resolved by the cluster DNS to worker 0's pod.
        let worker0 = Api::<Pod>::namespaced(env.client.clone(), &ns).get("run-worker-0").await?;
        let ip0 = worker0.status.and_then(|s| s.pod_ip).context("worker 0 has no IP")?;
        let starts = of_kind(&lines, "start");
        ensure!(starts.len() == n as usize, "start lines: {starts:?}");
        for s in &starts {
            ensure!(s.get("rendezvous") == "run-worker-0.sovereign-rendezvous", "rendezvous name {s:?}");
            ensure!(s.get("ip") == ip0, "{s:?} resolved elsewhere than worker 0 ({ip0})");
            ensure!(s.get("world") == n.to_string() && s.get("resumed_from") == "0", "{s:?}");
        }
        // The loss falls.
        let rank0: Vec<f64> =
            of_kind(&lines, "step").iter().filter(|s| s.get("rank") == "0").map(|s| s.num("loss")).collect();
        ensure!(rank0.len() == steps as usize, "rank 0 logged {} steps", rank0.len());
        ensure!(rank0[rank0.len() - 1] < rank0[0] / 4.0, "loss did not fall: {rank0:?}");
        if !ledger {
            return Ok(());
        }

        // The ledger charged the pods' real lifetimes: status.startTime to the container's
        // finishedAt (whole seconds in the API), one slot each at chargeFactor 1.
        let allocs: Api<GpuAllocation> = Api::all(env.client.clone());
        let charged = wait_for("the grant's books to close", MINUTE, || async {
            let st = allocs.get(GRANT).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            let open = st.ledger.as_ref().map(|l| l.open.iter().any(|o| o.end_millis.is_none())).unwrap_or(false);
            if st.charge_rate == 0.0 && st.in_use == 0 && !open {
                Ok(st.accelerator_hours_used * 3_600_000.0)
            } else {
                Err(format!("rate {} in use {} open {open}", st.charge_rate, st.in_use))
            }
        })
        .await?;
        watch.abort();
        let now = Timestamp::now().as_millisecond();
        let pods = seen.lock().map_err(|_| anyhow::anyhow!("seen lock"))?.clone();
        ensure!(pods.len() == n as usize, "{} pods seen", pods.len());
        let truth_ms: f64 = pods.values().map(|(p, gone)| truth(p, *gone, 1.0, now)).sum();
        println!(
            "ledger: {n} real workers charged {:.3} s, their own timestamps say {:.3} s",
            charged / 1e3,
            truth_ms / 1e3
        );
        ensure!((charged - truth_ms).abs() <= 1000.0, "charged {charged} ms, the pods say {truth_ms} ms");
        Ok(())
    })
    .await
}

pub async fn a_real_two_worker_run_finds_its_peers_by_the_rendezvous_name_and_agrees(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    real_run_agrees(env, "real2", 2, false).await
}

pub async fn a_real_three_worker_run_finds_its_peers_by_the_rendezvous_name_and_agrees(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    real_run_agrees(env, "real3", 3, false).await
}

/// Once failed now and then (2 runs in 7: 2.6-2.8 s more than the pods ran): a
/// worker whose end the kubelet had not reported yet was charged up to a
/// reckoning made meanwhile, and kept that charge. Its own end now decides.
pub async fn real_workers_are_charged_their_own_lifetimes_to_the_second(env: Arc<Env>) -> anyhow::Result<()> {
    real_run_agrees(env, "realledger", 2, true).await
}

/// Events about `name` in `ns`, oldest first: (reason, note).
async fn story(env: &Env, ns: &str, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let lp = ListParams::default().fields(&format!("regarding.name={name}"));
    let mut list = Api::<Event>::namespaced(env.client.clone(), ns).list(&lp).await?.items;
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0).or(e.metadata.creation_timestamp.as_ref().map(|t| t.0)));
    Ok(list.into_iter().map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default())).collect())
}

pub async fn a_killed_real_worker_restarts_the_gang_from_its_checkpoint(env: Arc<Env>) -> anyhow::Result<()> {
    with_real_pool(&env, "realkill", async |ns, scope, t| {
        let rec = t.node.record_pod_logs(&ns);
        let steps = 40;
        let spec = "  runPolicy: {maxRestarts: 2}\n";
        let args = ["--steps", "40", "--checkpoint-every", "5", "--step-seconds", "0.3"];
        scope.apply(&run_yaml(t, &ns, "sturdy", (2, 1), spec, &args))?;
        wait_project(&env, &ns, "sturdy", ProjectPhase::Running, MINUTE).await?;
        // Mid-run, after a checkpoint: kill worker 1's torchrun (its container's first process).
        let ckpt = wait_said(&rec, "a checkpoint at step 10", 2 * MINUTE, |l| {
            of_kind(l, "checkpoint").into_iter().find(|s| s.num("step") >= 10.0).cloned()
        })
        .await?;
        let pods = on_trainer_nodes(&env, t, &ns, "sturdy").await?;
        let victim = pods.iter().find(|p| p.name_any() == "sturdy-worker-1").context("no worker 1")?;
        let on = victim.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let pid = t.node.trainer_container_pid(&on, &container_id_of(victim, "trainer")?)?;
        let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
        ensure!(killed.success(), "kill -KILL {pid} failed");

        let s = wait_project(&env, &ns, "sturdy", ProjectPhase::Succeeded, 4 * MINUTE).await?;
        ensure!(s.restarts == 1, "restarts {}", s.restarts);
        ensure!(s.disruptions == 0, "a killed process was counted as a lost node ({} disruptions)", s.disruptions);

        let lines = said(&rec.lines());
        // The second gang resumed from a checkpoint the first wrote, not from step 0.
        let resumed: Vec<&Said> =
            of_kind(&lines, "start").into_iter().filter(|s| s.get("resumed_from") != "0").collect();
        ensure!(resumed.len() == 2, "start lines of the second gang: {:?}", of_kind(&lines, "start"));
        let from = resumed[0].num("resumed_from");
        ensure!(from >= ckpt.num("step") && resumed.iter().all(|s| s.num("resumed_from") == from), "{resumed:?}");
        let resumed_pods: BTreeSet<&str> = resumed.iter().map(|s| s.pod.as_str()).collect();
        let after: Vec<Said> = lines.iter().filter(|s| resumed_pods.contains(s.pod.as_str())).cloned().collect();
        agreed_final(&after, 2, steps)?;

        // The Events tell it in order: admitted, a worker failed (not lost), admitted again, succeeded.
        let told = story(&env, &ns, "sturdy").await?;
        let reasons: Vec<&str> = told.iter().map(|(r, _)| r.as_str()).collect();
        ensure!(!reasons.contains(&"WorkerLost"), "a failure reported as a lost node: {told:?}");
        let at = |r: &str| reasons.iter().position(|x| *x == r);
        match (at("Admitted"), at("WorkerFailed"), at("Succeeded")) {
            (Some(a), Some(f), Some(ok)) if a < f && f < ok => {}
            _ => bail!("events out of order: {told:?}"),
        }
        Ok(())
    })
    .await
}

pub async fn a_preempted_real_run_checkpoints_in_its_grace_period_and_resumes(env: Arc<Env>) -> anyhow::Result<()> {
    with_real_pool(&env, "realpreempt", async |ns, scope, t| {
        let rec = t.node.record_pod_logs(&ns);
        // The victim takes one slot on each of 3 nodes (of 2 each); the urgent run needs 2 nodes with 2 free.
        let steps = 40;
        let args = ["--steps", "40", "--checkpoint-every", "100", "--step-seconds", "0.3"];
        scope.apply(&run_yaml(t, &ns, "patient", (3, 1), "  priority: 0\n", &args))?;
        wait_project(&env, &ns, "patient", ProjectPhase::Running, MINUTE).await?;
        wait_said(&rec, "the victim at step 5", 2 * MINUTE, |l| {
            of_kind(l, "step").into_iter().find(|s| s.num("step") >= 5.0).cloned()
        })
        .await?;
        let quick = ["--steps", "10", "--checkpoint-every", "5"];
        scope.apply(&run_yaml(t, &ns, "urgent", (2, 2), "  priority: 100\n", &quick))?;

        // SIGTERM, then the grace period: the victim's ranks stop together and rank 0
        // writes a checkpoint (periodic ones are off: every 100 steps).
        let stop = wait_said(&rec, "the victim's checkpoint on SIGTERM", 2 * MINUTE, |l| {
            of_kind(l, "checkpoint").into_iter().find(|s| s.get("reason") == "stop").cloned()
        })
        .await?;
        let victim = status(&env, &ns, "patient").await.map_err(anyhow::Error::msg)?;
        let c = find_condition(&victim.conditions, "Preempted").cloned();
        ensure!(c.as_ref().is_some_and(|c| c.message.contains("urgent")), "{c:?}");
        ensure!(victim.restarts == 0, "a preemption is not a failure");
        let stopped = wait_said(&rec, "every victim rank to stop", MINUTE, |l| {
            let n = of_kind(l, "stopped").len();
            (n == 3).then(|| of_kind(l, "stopped")[0].clone())
        })
        .await?;
        ensure!(stopped.get("step") == stop.get("step"), "ranks stopped at {stopped:?}, checkpoint at {stop:?}");

        wait_project(&env, &ns, "urgent", ProjectPhase::Succeeded, 3 * MINUTE).await?;
        // Queued, then admitted again when the urgent run gave its slots back: it resumes from that checkpoint.
        let s = wait_project(&env, &ns, "patient", ProjectPhase::Succeeded, 4 * MINUTE).await?;
        ensure!(s.preemptions == 1 && s.restarts == 0, "preemptions {} restarts {}", s.preemptions, s.restarts);
        let lines = said(&rec.lines());
        let resumed: Vec<&Said> =
            of_kind(&lines, "start").into_iter().filter(|s| s.get("resumed_from") == stop.get("step")).collect();
        ensure!(resumed.len() == 3, "start lines: {:?}", of_kind(&lines, "start"));
        let pods: BTreeSet<&str> = resumed.iter().map(|s| s.pod.as_str()).collect();
        let after: Vec<Said> = lines.iter().filter(|s| pods.contains(s.pod.as_str())).cloned().collect();
        agreed_final(&after, 3, steps)?;
        Ok(())
    })
    .await
}
