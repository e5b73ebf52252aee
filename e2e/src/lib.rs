//! Harness of the end-to-end suite: the cluster comes from `KUBECONFIG` (the
//! local control plane of `e2e/cluster up`, or kind); the chart is installed
//! with its Deployment scaled to zero, and the operator binary runs on this
//! host authenticated as the chart's ServiceAccount, so RBAC is exercised.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod incluster;

pub const RELEASE: &str = "sovereign-operator";
pub const RELEASE_NAMESPACE: &str = "sovereign-system";
/// The label that makes a namespace a tenant namespace for the chart's admission
/// policy: the operator may create pods and quotas only there.
pub const TENANT_LABEL: &str = "sovereign.ai/tenant";

/// Paths and the admin client every test uses.
#[derive(Clone)]
pub struct Env {
    pub repo: PathBuf,
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    pub operator_bin: PathBuf,
    pub client: Client,
    /// The operator the suite shares, running as the chart's ServiceAccount.
    pub operator: std::sync::Arc<tokio::sync::Mutex<Option<Operator>>>,
}

fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .with_context(|| format!("{name} is not set: run the suite with `make e2e` (or see e2e/run)"))
}

impl Env {
    pub async fn from_env() -> anyhow::Result<Self> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
        let kubeconfig = env_path("KUBECONFIG")?;
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig)?,
            &Default::default(),
        )
        .await?;
        Ok(Self {
            state: repo.join(".e2e"),
            kubectl: env_path("KUBECTL")?,
            helm: env_path("HELM")?,
            operator_bin: env_path("OPERATOR_BIN")?,
            client: Client::try_from(config)?,
            operator: Default::default(),
            kubeconfig,
            repo,
        })
    }

    /// Runs kubectl against the test cluster.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
        run(Command::new(&self.kubectl).arg("--kubeconfig").arg(&self.kubeconfig).args(args), stdin)
    }

    /// Runs kubectl and fails with its stderr unless it succeeds.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let out = self.kubectl(args, stdin)?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Installs (or upgrades) the chart with the in-cluster operator scaled to
    /// zero: no container runtime exists here, the binary runs on the host.
    pub fn install_chart(&self) -> anyhow::Result<()> {
        // The dev cluster's JobSet controller authenticates as this user (e2e/lib/jobset.sh).
        let sets = ["workloadPolicies.jobsetControllers={jobset-controller}"];
        self.install_chart_from(&self.repo.join("charts/sovereign-operator"), &sets)
    }

    /// Installs or upgrades the suite's release (in-cluster operator scaled to zero) to the
    /// chart in the folder given: this tree's, or an earlier one (the upgrade test), with
    /// `--set` values that chart knows.
    pub fn install_chart_from(&self, chart: &Path, sets: &[&str]) -> anyhow::Result<()> {
        let out = run(
            Command::new(&self.helm)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["upgrade", "--install", RELEASE])
                .arg(chart)
                .args(["--namespace", RELEASE_NAMESPACE, "--create-namespace", "--set", "replicaCount=0", "--wait"])
                .args(sets.iter().flat_map(|s| ["--set", s])),
            None,
        )?;
        if !out.status.success() {
            bail!("helm install failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A kubeconfig that authenticates as the chart's ServiceAccount with a
    /// TokenRequest token, so the operator has exactly the chart's RBAC.
    pub fn operator_kubeconfig(&self) -> anyhow::Result<PathBuf> {
        self.service_account_kubeconfig(RELEASE_NAMESPACE, RELEASE, "operator-kubeconfig")
    }

    /// A kubeconfig (written to `.e2e/<file>`) that authenticates as the
    /// ServiceAccount `namespace/name` with a TokenRequest token.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str, file: &str) -> anyhow::Result<PathBuf> {
        let token = self.kubectl_ok(&["-n", namespace, "create", "token", name, "--duration=2h"], None)?;
        let admin = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let cluster = admin.clusters.first().and_then(|c| c.cluster.clone()).context("kubeconfig has no cluster")?;
        let server = cluster.server.context("kubeconfig cluster has no server")?;
        let ca = match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
            (Some(data), _) => format!("certificate-authority-data: {data}"),
            (None, Some(file)) => format!("certificate-authority: {file}"),
            (None, None) => "insecure-skip-tls-verify: true".to_string(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    {ca}\n\
             users:\n- name: operator\n  user:\n    token: {}\ncontexts:\n- name: operator\n  context:\n    cluster: e2e\n    user: operator\n\
             current-context: operator\n",
            token.trim()
        );
        std::fs::create_dir_all(&self.state)?;
        let path = self.state.join(file);
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

pub(crate) fn run(cmd: &mut Command, stdin: Option<&str>) -> anyhow::Result<Output> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().expect("piped stdin").write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// Polls `probe` until it yields a value or `timeout` passes; the error names
/// what was awaited and the last observation.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A namespace of one test, deleted by [`TestNamespace::cleanup`].
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn create(client: &Client, test: &str) -> anyhow::Result<Self> {
        let suffix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos() % 100_000;
        let name = format!("e2e-{}-{suffix}", test.replace('_', "-"));
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "sovereign.ai/e2e": "true", TENANT_LABEL: "true" } }
        }))?;
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
        // Pods are refused until the controller manager made the default ServiceAccount.
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_for("the default ServiceAccount", Duration::from_secs(30), || async {
            sas.get_opt("default").await.map_err(|e| e.to_string())?.ok_or_else(|| "absent".to_string())
        })
        .await?;
        Ok(Self { name, client: client.clone() })
    }

    pub async fn cleanup(self) -> anyhow::Result<()> {
        Api::<Namespace>::all(self.client).delete(&self.name, &DeleteParams::background()).await?;
        Ok(())
    }
}

/// Runs `body` in fresh namespaces (one per prefix) with a [`Scope`], then
/// deletes what the scope applied and the namespaces, whatever the body
/// returned; the body's error is reported first.
pub async fn in_namespaces(
    env: &Env,
    prefixes: &[&str],
    body: impl AsyncFnOnce(&[String], &mut Scope) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut namespaces = Vec::with_capacity(prefixes.len());
    for prefix in prefixes {
        namespaces.push(TestNamespace::create(&env.client, prefix).await?);
    }
    let names: Vec<String> = namespaces.iter().map(|n| n.name.clone()).collect();
    let mut scope = Scope::new(env);
    let res = body(&names, &mut scope).await;
    let mut cleaned = scope.cleanup();
    for ns in namespaces {
        if let Err(e) = ns.cleanup().await {
            cleaned = cleaned.and(Err(e));
        }
    }
    res?;
    cleaned
}

/// The operator binary running on this host.
pub struct Operator {
    child: tokio::process::Child,
    pub admin: std::net::SocketAddr,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(env: &Env, kubeconfig: &Path, admin_port: u16, log_name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(env.state.join("logs"))?;
        let log = env.state.join("logs").join(log_name);
        let out = std::fs::File::create(&log)?;
        let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
        let child = tokio::process::Command::new(&env.operator_bin)
            .args(["run", "--kubeconfig"])
            .arg(kubeconfig)
            .arg(format!("--admin-address={admin}"))
            .env("RUST_LOG", "info,sovereign_operator=debug")
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the operator binary")?;
        Ok(Self { child, admin, log })
    }

    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let admin = self.admin;
        let res = wait_for("operator /readyz", timeout, || async move {
            match http_get(admin, "/readyz").await {
                Ok((200, _)) => Ok(()),
                Ok((code, body)) => Err(format!("{code}: {body}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("operator exited with {status}; log {}:\n{}", self.log.display(), self.log_tail());
        }
        res.with_context(|| format!("log tail:\n{}", self.log_tail()))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// The value of a counter or gauge series on /metrics (summed over labels
    /// that contain `label_part`).
    pub async fn metric(&self, name: &str, label_part: &str) -> anyhow::Result<f64> {
        let (_, body) = http_get(self.admin, "/metrics").await?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(label_part))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("operator already reaped")?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("operator did not exit within {timeout:?} of SIGTERM; log:\n{}", self.log_tail()),
        }
    }
}

/// A minimal HTTP/1.1 GET on loopback: status code and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await?;
    let code = buf.split_whitespace().nth(1).context("no status line")?.parse()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Objects a test created with `kubectl apply`, deleted (and awaited, so that
/// finalizers have run) by [`Scope::cleanup`], whatever the test's outcome.
pub struct Scope {
    env: Env,
    manifests: Vec<String>,
}

impl Scope {
    pub fn new(env: &Env) -> Self {
        Self { env: env.clone(), manifests: Vec::new() }
    }

    /// Applies a manifest and remembers it for clean-up.
    pub fn apply(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.manifests.push(yaml.to_string());
        self.env.kubectl_ok(&["apply", "-f", "-"], Some(yaml)).map(|_| ())
    }

    /// Deletes one manifest now (and waits until it is gone).
    pub fn delete(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.manifests.retain(|m| m != yaml);
        self.env
            .kubectl_ok(&["delete", "--ignore-not-found", "--wait=true", "--timeout=90s", "-f", "-"], Some(yaml))
            .map(|_| ())
    }

    pub fn cleanup(mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        while let Some(m) = self.manifests.pop() {
            if let Err(e) = self
                .env
                .kubectl_ok(&["delete", "--ignore-not-found", "--wait=true", "--timeout=90s", "-f", "-"], Some(&m))
            {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() { Ok(()) } else { bail!("clean-up failed: {}", errors.join("; ")) }
    }
}
