//! The chart's Grafana dashboard against a real Prometheus: Debian's
//! `prometheus` (fetched by e2e/prometheus) scrapes the suite's operator while
//! the cluster has a budgeted grant in use, a preemption and a waiting gang,
//! and every query of the dashboard must parse and return series. The same
//! Prometheus loads the chart's PrometheusRule: every alert must be evaluated
//! without error, and the operator-down alert must stay silent while it runs.

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

/// The rule groups of the chart's PrometheusRule (with `job` set to the test's
/// scrape job), as a Prometheus rule file: JSON is YAML.
fn rendered_rules(env: &Env) -> anyhow::Result<String> {
    let out = Command::new(&env.helm)
        .args(["template", "t"])
        .arg(env.repo.join("charts/sovereign-operator"))
        .args(["--set", &format!("metrics.prometheusRule.enabled=true,metrics.prometheusRule.job={JOB}")])
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .output()?;
    ensure!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let rule: serde_json::Value = serde_saphyr::from_str(&String::from_utf8(out.stdout)?)?;
    ensure!(rule["kind"] == "PrometheusRule", "not a PrometheusRule: {rule}");
    Ok(serde_json::to_string(&rule["spec"])?)
}

/// The names of the alerts in a rule file.
fn alert_names(rules: &str) -> anyhow::Result<Vec<String>> {
    let spec: serde_json::Value = serde_json::from_str(rules)?;
    let rules =
        spec["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().into_iter().flatten());
    Ok(rules.filter_map(|r| r["alert"].as_str().map(str::to_string)).collect())
}

/// The scrape job of the test's Prometheus.
const JOB: &str = "sovereign-operator";

/// A Prometheus server on loopback that scrapes one target every second and
/// evaluates the rules given every second.
struct Prometheus {
    child: tokio::process::Child,
    url: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(env: &Env, target: std::net::SocketAddr, rules: &str) -> anyhow::Result<Self> {
        let bin = std::env::var_os("PROMETHEUS").context("PROMETHEUS is not set: run the suite with e2e/run")?;
        let port = free_port()?;
        let dir = env.state.join(format!("prometheus-{port}"));
        std::fs::create_dir_all(&dir)?;
        let rule_file = dir.join("rules.yml");
        std::fs::write(&rule_file, rules)?;
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n- job_name: {JOB}\n  static_configs: [{{targets: ['{target}']}}]\n",
            rule_file.display()
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
    let rules = rendered_rules(&env)?;
    let alerts = alert_names(&rules)?;
    ensure!(alerts.len() >= 7, "the PrometheusRule has only {} alerts: {alerts:?}", alerts.len());
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

        let prom = Prometheus::start(&env, target, &rules)?;
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
            .await?;
            // Every alert of the chart loaded and evaluated by this Prometheus without error
            // (health "ok" once evaluated; "err" with the error otherwise), and the operator,
            // which answers, is not reported down.
            wait_for("every alert of the chart to be evaluated without error", MINUTE, || async {
                let v = prom.get("/api/v1/rules", None)?;
                let rules: Vec<&serde_json::Value> = v["data"]["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                    .filter(|r| r["type"] == "alerting")
                    .collect();
                let mut wrong = Vec::new();
                for name in &alerts {
                    match rules.iter().find(|r| r["name"] == name.as_str()) {
                        None => wrong.push(format!("{name}: not loaded")),
                        Some(r) if r["health"] != "ok" => {
                            wrong.push(format!("{name}: {} {}", r["health"], r["lastError"]))
                        }
                        Some(r) if name == "SovereignOperatorDown" && r["state"] != "inactive" => {
                            wrong.push(format!("{name}: {} while the operator answers", r["state"]))
                        }
                        Some(_) => {}
                    }
                }
                if wrong.is_empty() { Ok(()) } else { Err(wrong.join("\n")) }
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
