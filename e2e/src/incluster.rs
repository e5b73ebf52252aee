//! Helpers of the in-cluster tests: the operator image from `make image` runs
//! as a Helm release on the dev cluster's real node (kubelet + containerd), and
//! the tests look at it from the node's side too (container processes, the
//! kubelet's probe counters, pod logs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};

use crate::{Env, run, wait_for};

/// The image the in-cluster tests run (`e2e/image load` put it on the node).
pub struct Image {
    pub repository: String,
    pub tag: String,
}

impl Image {
    pub fn from_env() -> anyhow::Result<Self> {
        let get = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set: run the suite with e2e/run"));
        Ok(Self { repository: get("IMAGE_REPOSITORY")?, tag: get("IMAGE_TAG")? })
    }
}

/// The real node of the dev cluster (`e2e/cluster up`), from `.e2e/cluster.env`.
pub struct RealNode {
    pub name: String,
    kubelet_port: u16,
    ctr_socket: PathBuf,
    pki: PathBuf,
    /// The kubelets' log folders: this node's and the trainer nodes' (`.e2e/node-t<i>/`).
    pod_logs: Vec<PathBuf>,
    /// Containerd socket of each trainer node, by node name.
    trainer_sockets: BTreeMap<String, PathBuf>,
}

impl RealNode {
    /// `None` when the cluster has no real node (kind, or E2E_REAL_NODE=0).
    pub fn from_state(env: &Env) -> anyhow::Result<Option<Self>> {
        let Ok(text) = std::fs::read_to_string(env.state.join("cluster.env")) else { return Ok(None) };
        let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        if vars.get("REAL_NODE") != Some(&"1") {
            return Ok(None);
        }
        let node = env.state.join("node");
        let trainers: usize = vars.get("TRAINER_NODE_COUNT").map_or(Ok(0), |n| n.parse())?;
        let trainer_dirs: Vec<(String, PathBuf)> = (1..=trainers)
            .map(|i| (format!("sovereign-e2e-trainer-{i}"), env.state.join(format!("node-t{i}"))))
            .collect();
        Ok(Some(Self {
            name: vars.get("NODE_NAME").context("NODE_NAME")?.to_string(),
            kubelet_port: vars.get("KUBELET_PORT").context("KUBELET_PORT")?.parse()?,
            ctr_socket: node.join("containerd/containerd.sock"),
            pki: env.state.join("pki"),
            pod_logs: std::iter::once(node.join("pod-logs"))
                .chain(trainer_dirs.iter().map(|(_, d)| d.join("pod-logs")))
                .collect(),
            trainer_sockets: trainer_dirs.into_iter().map(|(n, d)| (n, d.join("containerd/containerd.sock"))).collect(),
        }))
    }

    fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        ctr_at(&self.ctr_socket, args)
    }

    /// Host PID of a running container (the task's init process).
    pub fn container_pid(&self, container_id: &str) -> anyhow::Result<u32> {
        container_pid_at(&self.ctr_socket, container_id)
    }

    /// Host PID of a running container on the trainer node `node`.
    pub fn trainer_container_pid(&self, node: &str, container_id: &str) -> anyhow::Result<u32> {
        let socket = self.trainer_sockets.get(node).with_context(|| format!("{node} is no trainer node"))?;
        container_pid_at(socket, container_id)
    }
}

fn ctr_at(socket: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = run(Command::new("ctr").arg("--address").arg(socket).args(["--namespace", "k8s.io"]).args(args), None)?;
    ensure!(out.status.success(), "ctr {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn container_pid_at(socket: &std::path::Path, container_id: &str) -> anyhow::Result<u32> {
    let tasks = ctr_at(socket, &["tasks", "ls"])?;
    tasks
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == container_id && f[2] == "RUNNING").then(|| f[1].parse().ok()).flatten()
        })
        .next()
        .with_context(|| format!("no running task {container_id} on the node: {tasks}"))
}

impl RealNode {
    /// Containers of `image_repository` whose task runs now: the operator
    /// processes alive on the node.
    pub fn running_containers_of(&self, image_repository: &str) -> anyhow::Result<Vec<String>> {
        let containers = self.ctr(&["containers", "ls"])?;
        let ids: Vec<&str> = containers
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 2 && f[1].starts_with(&format!("{image_repository}:"))).then_some(f[0])
            })
            .collect();
        let tasks = self.ctr(&["tasks", "ls"])?;
        Ok(tasks
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3 && f[2] == "RUNNING" && ids.contains(&f[0])).then(|| f[0].to_string())
            })
            .collect())
    }

    /// The kubelet's probe counter for one container (`/metrics/probes`).
    pub fn probe_count(&self, ns: &str, pod: &str, probe: &str, result: &str) -> anyhow::Result<f64> {
        let url = format!("https://127.0.0.1:{}/metrics/probes", self.kubelet_port);
        let out = run(
            Command::new("curl")
                .args(["-fsS", "--max-time", "5", "--cacert"])
                .arg(self.pki.join("ca.crt"))
                .arg("-k") // the kubelet's self-signed serving certificate
                .arg("--cert")
                .arg(self.pki.join("admin.crt"))
                .arg("--key")
                .arg(self.pki.join("admin.key"))
                .arg(&url),
            None,
        )?;
        ensure!(out.status.success(), "GET {url}: {}", String::from_utf8_lossy(&out.stderr));
        let body = String::from_utf8_lossy(&out.stdout);
        let want = [
            format!("namespace=\"{ns}\""),
            format!("pod=\"{pod}\""),
            format!("probe_type=\"{probe}\""),
            format!("result=\"{result}\""),
        ];
        Ok(body
            .lines()
            .filter(|l| l.starts_with("prober_probe_total{") && want.iter().all(|w| l.contains(w.as_str())))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Every container log line the kubelet kept for the pods of `ns`, with the
    /// file it came from (`<ns>_<pod>_<uid>/<container>/<restart>.log`).
    pub fn pod_logs(&self, ns: &str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(log_lines(&read_pod_logs(&self.pod_logs, ns)?))
    }

    /// Records the logs of the pods of `ns` from now on (see [`PodLogRecorder`]).
    pub fn record_pod_logs(&self, ns: &str) -> PodLogRecorder {
        PodLogRecorder::start(self.pod_logs.clone(), ns.to_string())
    }
}

/// The content of every log file of the pods of `ns`, by its label
/// (`<ns>_<pod>_<uid>/<container>/<restart>.log`).
fn read_pod_logs(roots: &[PathBuf], ns: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for root in roots {
        read_pod_logs_in(root, ns, &mut out)?;
    }
    Ok(out)
}

fn read_pod_logs_in(root: &std::path::Path, ns: &str, out: &mut BTreeMap<String, String>) -> anyhow::Result<()> {
    for dir in std::fs::read_dir(root)? {
        let dir = dir?.path();
        let name = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{ns}_")) {
            continue;
        }
        // A pod or container removed while this reads is skipped, not an error.
        for container in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            for file in std::fs::read_dir(container.path()).into_iter().flatten().flatten() {
                let file = file.path();
                let Ok(text) = std::fs::read_to_string(&file) else { continue };
                let label = file.strip_prefix(root).unwrap_or(&file).display().to_string();
                out.insert(label, text);
            }
        }
    }
    Ok(())
}

fn log_lines(files: &BTreeMap<String, String>) -> Vec<(String, String)> {
    files.iter().flat_map(|(label, text)| text.lines().map(|l| (label.clone(), l.to_string()))).collect()
}

/// The logs of one namespace's pods, read every 200 ms while it lives. The
/// kubelet removes a dead container (and its log) as soon as a newer one of the
/// same container dies (it keeps one dead container per container), so an
/// operator that restarted twice has lost its first log on disk; a test that
/// needs the whole history (every leader term) reads it here.
pub struct PodLogRecorder {
    kept: Arc<Mutex<BTreeMap<String, String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    roots: Vec<PathBuf>,
    ns: String,
}

impl PodLogRecorder {
    fn start(roots: Vec<PathBuf>, ns: String) -> Self {
        let kept = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (kept, stop, roots, ns) = (kept.clone(), stop.clone(), roots.clone(), ns.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    Self::merge(&kept, &roots, &ns);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Self { kept, stop, thread: Some(thread), roots, ns }
    }

    /// Keeps the newest content of every file; a file the kubelet removed keeps
    /// what was read of it last.
    fn merge(kept: &Mutex<BTreeMap<String, String>>, roots: &[PathBuf], ns: &str) {
        let Ok(now) = read_pod_logs(roots, ns) else { return };
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        for (label, text) in now {
            let old = kept.entry(label).or_default();
            // Log files only grow (no rotation at these sizes).
            if text.len() >= old.len() {
                *old = text;
            }
        }
    }

    /// Every line recorded so far, after one more read.
    pub fn lines(&self) -> Vec<(String, String)> {
        Self::merge(&self.kept, &self.roots, &self.ns);
        log_lines(&self.kept.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for PodLogRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fields of `/proc/PID/status` (Uid, CapEff, NoNewPrivs, Seccomp, ...).
pub fn proc_status(pid: u32) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.to_string(), v.trim().to_string())).collect())
}

/// Whether the root mount of process `pid` is read-only.
pub fn root_is_read_only(pid: u32) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root = text.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).context("no root mount")?;
    Ok(root.split_whitespace().nth(5).is_some_and(|o| o.split(',').any(|x| x == "ro")))
}

/// A Helm release of the chart running the image on the real node, in its own
/// namespace that enforces Pod Security `restricted`.
pub struct Release {
    pub name: String,
    pub namespace: String,
    env: Env,
}

impl Release {
    pub fn fullname(&self) -> String {
        format!("{}-sovereign-operator", self.name)
    }

    fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(Command::new(&self.env.helm).arg("--kubeconfig").arg(&self.env.kubeconfig).args(args), None)?;
        if !out.status.success() {
            bail!("helm {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `helm install --wait` (CRDs come from the suite's own release).
    pub async fn install(env: &Env, name: &str, image: &Image, sets: &[&str]) -> anyhow::Result<Self> {
        let suffix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos() % 100_000;
        let namespace = format!("e2e-op-{name}-{suffix}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": namespace, "labels": {
                "sovereign.ai/e2e": "true",
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            } }
        }))?;
        Api::<Namespace>::all(env.client.clone()).create(&Default::default(), &ns).await?;
        let release = Self { name: name.to_string(), namespace, env: env.clone() };
        let chart = env.repo.join("charts/sovereign-operator");
        let mut args = vec![
            "install".to_string(),
            name.to_string(),
            chart.display().to_string(),
            "--namespace".into(),
            release.namespace.clone(),
            "--wait".into(),
            "--timeout=120s".into(),
        ];
        let image_sets = [
            "crds.install=false".to_string(),
            format!("image.repository={}", image.repository),
            format!("image.tag={}", image.tag),
            "image.pullPolicy=Never".into(),
            "nodeSelector.sovereign\\.ai/node-role=system".into(),
            "logging.level=info\\,sovereign_operator=debug".into(),
        ];
        for s in image_sets.iter().map(String::as_str).chain(sets.iter().copied()) {
            args.push("--set".into());
            args.push(s.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = release.helm(&args) {
            let pods = release.env.kubectl(&["-n", &release.namespace, "get", "pods,events", "-o", "wide"], None);
            let seen = pods.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            let _ = release.uninstall().await;
            bail!("{e:#}\n{seen}");
        }
        Ok(release)
    }

    /// `helm upgrade --reuse-values --wait` with more values.
    pub fn upgrade(&self, sets: &[&str]) -> anyhow::Result<()> {
        let chart = self.env.repo.join("charts/sovereign-operator");
        let chart = chart.display().to_string();
        let mut args = vec!["upgrade", &self.name, &chart, "--namespace", &self.namespace, "--reuse-values"];
        args.extend(["--wait", "--timeout=120s"]);
        for s in sets {
            args.extend(["--set", s]);
        }
        self.helm(&args).map(|_| ())
    }

    /// The release's pods.
    pub async fn pods(&self) -> anyhow::Result<Vec<Pod>> {
        let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={}", self.name));
        Ok(Api::<Pod>::namespaced(self.env.client.clone(), &self.namespace).list(&lp).await?.items)
    }

    /// Waits until exactly `n` pods of the release exist, all Ready and not
    /// terminating; returns them.
    pub async fn ready_pods(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Pod>> {
        wait_for(&format!("{n} ready operator pods"), timeout, || async {
            let pods = self.pods().await.map_err(|e| e.to_string())?;
            let ready: Vec<Pod> =
                pods.iter().filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none()).cloned().collect();
            if ready.len() == n && pods.len() == n {
                Ok(ready)
            } else {
                Err(format!("{} pods, {} ready", pods.len(), ready.len()))
            }
        })
        .await
    }

    /// Uninstalls and waits until no pod of the release is left, so that no
    /// operator of this release acts after it; deletes the namespace.
    pub async fn uninstall(&self) -> anyhow::Result<()> {
        let res = self.helm(&["uninstall", &self.name, "--namespace", &self.namespace, "--wait", "--timeout=60s"]);
        let gone = wait_for("the release's pods to be gone", Duration::from_secs(60), || async {
            let n = self.pods().await.map_err(|e| e.to_string())?.len();
            if n == 0 { Ok(()) } else { Err(format!("{n} pods")) }
        })
        .await;
        Api::<Namespace>::all(self.env.client.clone()).delete(&self.namespace, &DeleteParams::background()).await?;
        res?;
        gone
    }
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The containerd id of the pod's `operator` container.
pub fn container_id(pod: &Pod) -> anyhow::Result<String> {
    container_id_of(pod, "operator")
}

/// The containerd id of the pod's container `name`.
pub fn container_id_of(pod: &Pod, name: &str) -> anyhow::Result<String> {
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
    let id = statuses
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| c.container_id.clone())
        .with_context(|| format!("pod {} has no {name} container id", pod.name_any()))?;
    Ok(id.trim_start_matches("containerd://").to_string())
}

/// Runs `body` with a release, then uninstalls it whatever the body returned.
pub async fn with_release(
    env: &Env,
    name: &str,
    sets: &[&str],
    body: impl AsyncFnOnce(&Release, &RealNode, &Image) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let node = RealNode::from_state(env)?
        .context("the cluster has no real node (the in-cluster tests need e2e/cluster up --profile dev)")?;
    let image = Image::from_env()?;
    let release = Release::install(env, name, &image, sets).await?;
    let res = body(&release, &node, &image).await;
    let cleaned = release.uninstall().await;
    res?;
    cleaned
}

/// The dev cluster's kube-apiserver process (`.e2e/pids/kube-apiserver`), to
/// stop and start again with the same command line.
pub struct ApiServer {
    pids_file: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    pid: Option<u32>,
    /// The process this test started (waited for, so that it leaves no zombie).
    child: Option<std::process::Child>,
}

impl ApiServer {
    pub fn from_state(env: &Env) -> anyhow::Result<Self> {
        let pids_file = env.state.join("pids/kube-apiserver");
        let text = std::fs::read_to_string(&pids_file).context("no kube-apiserver pid file")?;
        let (pid, bin) = text.trim().split_once(' ').context("bad pid file")?;
        let pid: u32 = pid.parse()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).skip(1);
        let args = args.map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        Ok(Self {
            pids_file,
            log: env.state.join("logs/kube-apiserver.log"),
            bin: bin.into(),
            args,
            pid: Some(pid),
            child: None,
        })
    }

    /// SIGTERM, then SIGKILL after 5 s (a graceful shutdown drains watches for
    /// a minute), and waits until the process is gone.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let pid = self.pid.take().context("not running")?;
        let child = Mutex::new(self.child.take());
        let gone = || async {
            let mut child = child.lock().expect("child lock");
            let reaped = match child.as_mut() {
                Some(c) => c.try_wait().map_err(|e| e.to_string())?.is_some(),
                // Started by an earlier test of this process (whose handle is gone): once it
                // exits it stays a zombie of ours, which is gone for every purpose here.
                None => !running(pid),
            };
            if reaped { Ok(()) } else { Err("running".to_string()) }
        };
        ensure!(Command::new("kill").args(["-TERM", &pid.to_string()]).status()?.success(), "kill {pid}");
        if wait_for("kube-apiserver to exit on SIGTERM", Duration::from_secs(5), gone).await.is_err() {
            ensure!(Command::new("kill").args(["-KILL", &pid.to_string()]).status()?.success(), "kill -9 {pid}");
            wait_for("kube-apiserver to exit on SIGKILL", Duration::from_secs(10), gone).await?;
        }
        Ok(())
    }

    /// Starts it again (same flags, log appended, pid file updated so that
    /// `e2e/cluster down` stops it) and waits for `/readyz`.
    pub async fn start(&mut self, env: &Env) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new().append(true).create(true).open(&self.log)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        let pid = child.id();
        std::fs::write(&self.pids_file, format!("{pid} {}\n", self.bin.display()))?;
        self.pid = Some(pid);
        self.child = Some(child);
        wait_for("kube-apiserver /readyz", Duration::from_secs(90), || async {
            match env.kubectl(&["get", "--raw", "/readyz"], None) {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }
}

/// Whether a process runs: it exists and is not a zombie (state Z in /proc/PID/stat).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// When one operator process held the Lease, from its log: from "acquired the
/// leader lease" to the line that says it stopped or released it (or `open_end`
/// when it still leads). Timestamps are the container runtime's, per line.
#[derive(Debug, Clone)]
pub struct Term {
    pub process: String,
    pub from: Timestamp,
    pub to: Timestamp,
    /// The log line that ended it (none while it still leads).
    pub ended_by: Option<String>,
}

/// The leader terms found in log lines (file, CRI log line) of the kubelet.
pub fn leader_terms(lines: &[(String, String)], open_end: Timestamp) -> Vec<Term> {
    let mut terms: Vec<Term> = Vec::new();
    let mut open: BTreeMap<String, Timestamp> = BTreeMap::new();
    for (file, line) in lines {
        let Some(ts) = line.split_once(' ').and_then(|(ts, _)| ts.parse::<Timestamp>().ok()) else { continue };
        if line.contains("acquired the leader lease") {
            open.insert(file.clone(), ts);
        } else if ((line.contains("stopping") && line.contains("lease")) || line.contains("released the leader lease"))
            && let Some(from) = open.remove(file)
        {
            terms.push(Term { process: file.clone(), from, to: ts, ended_by: Some(line.clone()) });
        }
    }
    for (process, from) in open {
        terms.push(Term { process, from, to: open_end, ended_by: None });
    }
    terms.sort_by_key(|t| t.from);
    terms
}

/// Pairs of terms of different processes that overlap in time.
pub fn overlaps(terms: &[Term]) -> Vec<(Term, Term)> {
    let mut out = Vec::new();
    for (i, a) in terms.iter().enumerate() {
        for b in &terms[i + 1..] {
            if a.process != b.process && b.from < a.to && a.from < b.to {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}
