//! Command-line interface: flags only; the work is done elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Allocates sovereign AI compute: accelerator pools, dated grants with budgets,
/// and gang-admitted training runs across GPU and NPU pools.
#[derive(Parser, Debug)]
#[command(name = "sovereign-operator", version, about, long_about = None)]
pub struct Cli {
    /// Log format: `plain` for people, `json` for log pipelines. Filter with
    /// RUST_LOG (for example `RUST_LOG=info,sovereign_operator=debug`).
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, env = "LOG_FORMAT", global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator: watch pools, allocations and projects and act on them.
    /// Uses the in-cluster ServiceAccount, or --kubeconfig / $KUBECONFIG outside a cluster.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds), or write
    /// one file per CRD into a folder.
    Crd(CrdArgs),
    /// Report accelerator-hours and current use by program, tenant, pool and
    /// domestic/non-domestic pools, grants against use, and the queue.
    /// Read-only (view rights suffice); also `kubectl sovereign report` when
    /// installed as `kubectl-sovereign`.
    Report(ReportArgs),
    /// Show what the operator would do if the objects in FILE were applied
    /// (or deleted with --delete): allocations Active or Pending and why,
    /// quotas, reserved nodes, admissions, waits and preemptions, pool totals
    /// and the domestic share. Reads the cluster once; never writes. Also
    /// `kubectl sovereign plan`.
    Plan(PlanArgs),
    /// Print the version.
    Version,
}

/// Flags of `plan`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    /// Kubeconfig file to use instead of the in-cluster config or $KUBECONFIG.
    #[arg(long, env = "SOVEREIGN_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Files (or folders of .yaml files) with AcceleratorPools, GpuAllocations,
    /// ModelProjects and Namespaces to plan.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Plan deleting the objects of the files instead of applying them.
    #[arg(long)]
    pub delete: bool,
    /// Plan for this moment (RFC 3339, e.g. 2027-01-01T09:00:00Z) instead of now:
    /// windows open or close, budgets accrue at the current rates.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = PlanFormat::Table)]
    pub output: PlanFormat,
    /// The operator's planning flags, to plan as it would.
    #[command(flatten)]
    pub planning: PlanningArgs,
}

/// Output format of `plan`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanFormat {
    Table,
    Json,
}

/// Flags of `report`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// Kubeconfig file to use instead of the in-cluster config or $KUBECONFIG.
    #[arg(long, env = "SOVEREIGN_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = ReportFormat::Table)]
    pub output: ReportFormat,
    /// Also write SVG charts into this folder: hours by program and by pool,
    /// domestic share by program against the 50% target, grants against use.
    #[arg(long, value_name = "DIR")]
    pub svg: Option<PathBuf>,
}

/// Output format of `report`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Table,
    Csv,
    Json,
}

/// Flags of `crd`.
#[derive(clap::Args, Debug, Clone)]
pub struct CrdArgs {
    /// Write `<plural>.<group>.yaml` files into this folder instead of printing.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Render as Helm chart templates: kept on uninstall
    /// (`helm.sh/resource-policy: keep`) and switched by `.Values.crds.install`.
    #[arg(long)]
    pub helm: bool,
}

/// Log output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Flags of `run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Kubeconfig file to use instead of the in-cluster config or $KUBECONFIG.
    #[arg(long, env = "SOVEREIGN_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Address of the admin server: /livez, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:8080", env = "SOVEREIGN_ADMIN_ADDRESS")]
    pub admin_address: SocketAddr,

    /// Elect a leader through a Lease so that several replicas can run; only the
    /// leader reconciles.
    #[arg(long, env = "SOVEREIGN_LEADER_ELECT")]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease (defaults to the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// Identity in the leader election (defaults to the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Seconds a leader Lease that is not renewed keeps the standbys waiting.
    #[arg(long, default_value_t = 15, env = "SOVEREIGN_LEASE_DURATION_SECONDS")]
    pub lease_duration_seconds: u64,

    /// Seconds the leader goes on without a successful renewal before it stops
    /// acting (and exits); must be shorter than the lease duration.
    #[arg(long, default_value_t = 10, env = "SOVEREIGN_RENEW_DEADLINE_SECONDS")]
    pub renew_deadline_seconds: u64,

    /// Seconds between renewals of the leader, and between standbys' attempts.
    #[arg(long, default_value_t = 2, env = "SOVEREIGN_RETRY_PERIOD_SECONDS")]
    pub retry_period_seconds: u64,

    #[command(flatten)]
    pub planning: PlanningArgs,
}

/// Flags of the planner, shared by `run` and `plan` (which plans as the
/// operator would).
#[derive(clap::Args, Debug, Clone)]
pub struct PlanningArgs {
    /// Seconds the first queued project of an allocation may wait before later,
    /// smaller projects of the same allocation stop being admitted ahead of it.
    #[arg(long, default_value_t = 900, env = "SOVEREIGN_STARVATION_SECONDS")]
    pub starvation_seconds: u64,

    /// Seconds a run admitted by preempting others is itself protected from
    /// preemption and reclaim (no preemption back and forth).
    #[arg(long, default_value_t = 600, env = "SOVEREIGN_MIN_RUN_SECONDS")]
    pub min_run_seconds: u64,

    /// Seconds a reserved node may stay NotReady before it is replaced.
    #[arg(long, default_value_t = 300, env = "SOVEREIGN_NODE_GRACE_SECONDS")]
    pub node_grace_seconds: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_bind_loopback() {
        let cli = Cli::try_parse_from(["sovereign-operator", "run"]).unwrap();
        let Command::Run(args) = cli.command else { panic!("expected run") };
        assert!(args.admin_address.ip().is_loopback());
        assert!(!args.leader_elect);
    }

    #[test]
    fn report_takes_a_format_and_a_chart_folder() {
        let cli = Cli::try_parse_from(["kubectl-sovereign", "report", "-o", "csv", "--svg", "charts"]).unwrap();
        let Command::Report(args) = cli.command else { panic!("expected report") };
        assert_eq!(args.output, ReportFormat::Csv);
        assert_eq!(args.svg.as_deref(), Some(std::path::Path::new("charts")));
    }

    #[test]
    fn log_format_is_global() {
        let cli = Cli::try_parse_from(["sovereign-operator", "crd", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
    }
}
