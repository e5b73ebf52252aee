//! The chart's Grafana dashboard against a real Prometheus: Debian's
//! `prometheus` (fetched by e2e/prometheus) scrapes the suite's operator while
//! the cluster has a budgeted grant in use, a preemption and a waiting gang,
//! and every query of the dashboard must parse and return series.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use sovereign_e2e::{Env, free_port, in_namespaces, wait_for};
use sovereign_operator::api::{AllocationPhase, ProjectPhase};

use crate::grants::{alloc_yaml, wait_phase};
use crate::projects::{atom, project_yaml, wait_project};

const MINUTE: Duration = Duration::from_secs(60);
/// Prometheus scrapes every second; `$__rate_interval` becomes this window.
const RATE_INTERVAL: &str = "15s";

/// The dashboard ConfigMap as the chart renders it with `dashboard.enabled`.
fn rendered_dashboard(env: &Env) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(&env.helm)
        .args(["template", "t"])
        .arg(env.repo.join("charts/sovereign-operator"))
        .args(["--set", "dashboard.enabled=true", "--show-only", "templates/dashboard.yaml"])
        .output()?;
    ensure!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let cm: serde_json::Value = serde_saphyr::from_str(&String::from_utf8(out.stdout)?)?;
    ensure!(cm["kind"] == "ConfigMap", "not a ConfigMap: {cm}");
    ensure!(cm["metadata"]["labels"]["grafana_dashboard"] == "1", "no sidecar label: {}", cm["metadata"]);
    let json = cm["data"]["sovereign-operator.json"].as_str().context("no dashboard JSON in the ConfigMap")?;
    Ok(serde_json::from_str(json)?)
}

/// Every query of the dashboard (rows may nest panels), with Grafana's
/// interval variable replaced.
fn queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    let title = p["title"].as_str().unwrap_or_default().to_string();
                    out.push((title, expr.replace("$__rate_interval", RATE_INTERVAL)));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A Prometheus server on loopback that scrapes one target every second.
struct Prometheus {
    child: tokio::process::Child,
    url: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(env: &Env, target: std::net::SocketAddr) -> anyhow::Result<Self> {
        let bin = std::env::var_os("PROMETHEUS").context("PROMETHEUS is not set: run the suite with e2e/run")?;
        let port = free_port()?;
        let dir = env.state.join(format!("prometheus-{port}"));
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n- job_name: sovereign-operator\n  static_configs: [{{targets: ['{target}']}}]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = tokio::process::Command::new(bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start prometheus")?;
        Ok(Self { child, url: format!("http://127.0.0.1:{port}"), dir })
    }

    fn get(&self, path: &str, query: Option<&str>) -> Result<serde_json::Value, String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-G"]).arg(format!("{}{path}", self.url));
        if let Some(q) = query {
            cmd.arg("--data-urlencode").arg(format!("query={q}"));
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// The number of series an instant query returns, or why it failed.
    fn series(&self, expr: &str) -> Result<usize, String> {
        let v = self.get("/api/v1/query", Some(expr))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().map(Vec::len).unwrap_or(0))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
        Ok(())
    }
}

pub async fn every_dashboard_query_returns_series_from_a_real_prometheus(env: Arc<Env>) -> anyhow::Result<()> {
    let dashboard = rendered_dashboard(&env)?;
    let queries = queries(&dashboard);
    ensure!(queries.len() >= 15, "the dashboard has only {} queries", queries.len());
    let target = env.operator.lock().await.as_ref().map(|o| o.admin).context("the shared operator is gone")?;

    in_namespaces(&env, &["dash"], async |names, scope| {
        let ns = &names[0];
        // A budgeted grant of the whole (domestic-less) test pool, in use by a
        // big gang that a higher-priority one preempts; the big one then waits.
        scope.apply(&atom())?;
        let budget = "  budget: {acceleratorHours: 1000}\n";
        scope.apply(&alloc_yaml("e2e-dash", &[ns], "[{pool: e2e-atom, accelerators: 32}]", budget))?;
        wait_phase(&env, "e2e-dash", AllocationPhase::Active, MINUTE).await?;
        scope.apply(&project_yaml("big", ns, "e2e-dash", "[e2e-atom]", 4, "  priority: 0\n", ""))?;
        wait_project(&env, ns, "big", ProjectPhase::Running, MINUTE).await?;
        scope.apply(&project_yaml("urgent", ns, "e2e-dash", "[e2e-atom]", 1, "  priority: 100\n", ""))?;
        wait_project(&env, ns, "urgent", ProjectPhase::Running, MINUTE).await?;
        wait_project(&env, ns, "big", ProjectPhase::Queued, MINUTE).await?;

        let prom = Prometheus::start(&env, target)?;
        let result = async {
            wait_for("prometheus to scrape the operator", MINUTE, || async {
                let v = prom.get("/api/v1/targets", None)?;
                let health = v["data"]["activeTargets"][0]["health"].as_str().unwrap_or_default().to_string();
                if health == "up" { Ok(()) } else { Err(format!("target health {health:?}: {v}")) }
            })
            .await?;
            wait_for("every dashboard query to return series", MINUTE, || async {
                let failing: Vec<String> = queries
                    .iter()
                    .filter_map(|(title, q)| match prom.series(q) {
                        Ok(n) if n > 0 => None,
                        Ok(_) => Some(format!("{title}: no series from {q}")),
                        Err(e) => Some(format!("{title}: {q}: {e}")),
                    })
                    .collect();
                if failing.is_empty() { Ok(()) } else { Err(failing.join("\n")) }
            })
            .await
        }
        .await;
        let log = std::fs::read_to_string(prom.dir.join("prometheus.log")).unwrap_or_default();
        prom.stop().await?;
        if let Err(e) = result {
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            bail!("{e:#}\nprometheus log (last lines, newest first):\n{}", tail.join("\n"));
        }
        Ok(())
    })
    .await
}
