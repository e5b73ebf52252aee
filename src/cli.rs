//! Command-line interface: flags only; the work is done elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// Allocates sovereign AI compute: accelerator pools, dated grants with budgets,
/// and gang-admitted training runs across GPU and NPU pools.
#[derive(Parser, Debug)]
// A flag given twice takes its last value, so the chart's `extraArgs` can
// override a flag the chart sets itself.
#[command(name = "sovereign-operator", version = crate::version::VERSION, about, long_about = None, args_override_self = true)]
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
    /// Run the operator (in a cluster, or with --kubeconfig).
    ///
    /// Watches pools, allocations and projects and acts on them. Uses the
    /// in-cluster ServiceAccount, or --kubeconfig / $KUBECONFIG outside a cluster.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    ///
    /// What `crds/` holds; --out-dir writes one file per CRD into a folder.
    Crd(CrdArgs),
    /// Report accelerator-hours and use by program, tenant and pool.
    ///
    /// Accelerator-hours and current use by program, tenant, pool and
    /// domestic/non-domestic pools, grants against use, and the queue. Read-only.
    /// Needs read access to AcceleratorPools and GpuAllocations (the chart's
    /// ClusterRole <release>-tenant-reader) and to ModelProjects in the namespaces
    /// reported (the built-in view role): every namespace by default or with -A,
    /// one with -n, which reports only the allocations that list it.
    Report(ReportArgs),
    /// Show what the operator would do with the objects of FILE, without writing.
    ///
    /// Allocations Active or Pending and why, quotas, reserved nodes, admissions,
    /// waits and preemptions, pool totals and the domestic share, if the objects
    /// in FILE were applied (or deleted with --delete). Reads the cluster once;
    /// never writes. Needs the chart's ClusterRole <release>-planner.
    Plan(PlanArgs),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    ///
    /// bash: `kubectl sovereign completion bash > /etc/bash_completion.d/kubectl-sovereign`;
    /// zsh: write it as `_kubectl-sovereign` into a folder of your $fpath.
    Completion(CompletionArgs),
    /// Write the generated reference pages of the docs (API and CLI).
    #[command(hide = true)]
    Docs(DocsArgs),
    /// Print the version (from the release tag) and the commit.
    Version,
}

/// Flags of `completion`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompletionArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Flags of `docs`.
#[derive(clap::Args, Debug, Clone)]
pub struct DocsArgs {
    /// Folder to write `api.md` and `cli.md` into.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// How the read-only commands reach the cluster, as kubectl does.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// Kubeconfig file to use instead of the in-cluster config or $KUBECONFIG.
    #[arg(long, env = "SOVEREIGN_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use instead of its current context.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// Flags of `plan`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
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
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Report one namespace: its projects, and the allocations that list it
    /// with their pools.
    #[arg(short, long, value_name = "NAMESPACE", conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Report every namespace (the default).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
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
    /// Aligned columns per section.
    Table,
    /// One record per row, every column.
    Csv,
    /// `{generatedAt, domesticTarget, rows}`.
    Json,
    /// The same document as json, in YAML.
    Yaml,
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

/// The name the binary was started as (`kubectl-sovereign` when installed as
/// a kubectl plugin), from the first argument.
pub fn invoked_name(mut args: impl Iterator<Item = OsString>) -> String {
    args.next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "sovereign-operator".into())
}

/// The command line as seen under the name it was started as: as a kubectl
/// plugin, usage lines say `kubectl sovereign` and the operator's own
/// subcommands (`run`, `crd`) are left out of the help.
pub fn command(invoked_as: &str) -> clap::Command {
    let cmd = Cli::command();
    if invoked_as.starts_with("kubectl-") {
        cmd.name("kubectl-sovereign")
            .bin_name("kubectl sovereign")
            .mut_subcommand("run", |c| c.hide(true))
            .mut_subcommand("crd", |c| c.hide(true))
    } else {
        cmd
    }
}

/// Parses the arguments (the first is the binary's name); exits with clap's
/// message on an error, as `Cli::parse` does.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Cli {
    let args: Vec<OsString> = args.into_iter().collect();
    let matches = command(&invoked_name(args.iter().cloned())).get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Writes the completion script of `shell` for the binary named `bin`.
pub fn completion(shell: clap_complete::Shell, bin: &str, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut command(bin), bin, out);
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn try_parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let matches = command(&invoked_name(args.iter().cloned())).try_get_matches_from(args)?;
        Cli::from_arg_matches(&matches)
    }

    #[test]
    fn as_a_kubectl_plugin_usage_says_kubectl_sovereign() {
        let err = try_parse(&["/usr/local/bin/kubectl-sovereign", "report", "--bogus"]).unwrap_err();
        let text = err.render().to_string();
        assert!(text.contains("Usage: kubectl sovereign report"), "{text}");
        let help = command("kubectl-sovereign").render_help().to_string();
        assert!(help.contains("Usage: kubectl sovereign"), "{help}");
        assert!(!help.contains("\n  run "), "the operator's own subcommands are hidden: {help}");
        let help = command("sovereign-operator").render_help().to_string();
        assert!(help.contains("Usage: sovereign-operator") && help.contains("\n  run "), "{help}");
    }

    #[test]
    fn report_takes_kubectl_flags() {
        let cli =
            try_parse(&["kubectl-sovereign", "report", "-n", "wbl-lgai", "--context", "prod", "-o", "yaml"]).unwrap();
        let Command::Report(args) = cli.command else { panic!("expected report") };
        assert_eq!(args.namespace.as_deref(), Some("wbl-lgai"));
        assert_eq!(args.kube.context.as_deref(), Some("prod"));
        assert_eq!(args.output, ReportFormat::Yaml);
        assert!(try_parse(&["kubectl-sovereign", "report", "-A"]).is_ok());
        assert!(try_parse(&["kubectl-sovereign", "report", "-A", "-n", "x"]).is_err(), "-A and -n exclude each other");
    }

    #[test]
    fn plan_takes_kubectl_flags() {
        let cli = try_parse(&[
            "kubectl-sovereign",
            "plan",
            "-f",
            "grants.yaml",
            "--context",
            "prod",
            "--kubeconfig",
            "/etc/k/admin.conf",
        ])
        .unwrap();
        let Command::Plan(args) = cli.command else { panic!("expected plan") };
        assert_eq!(args.kube.context.as_deref(), Some("prod"));
        assert_eq!(args.kube.kubeconfig.as_deref(), Some(std::path::Path::new("/etc/k/admin.conf")));
        assert_eq!(args.files, [PathBuf::from("grants.yaml")]);
        let cli = try_parse(&["kubectl-sovereign", "plan", "-f", "grants.yaml"]).unwrap();
        let Command::Plan(args) = cli.command else { panic!("expected plan") };
        assert_eq!(args.kube.context, None);
    }

    #[test]
    fn every_summary_is_one_line() {
        for sub in Cli::command().get_subcommands() {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            assert!(!about.is_empty() && !about.contains('\n'), "{}: {about:?}", sub.get_name());
            assert!(about.len() <= 80, "{}: a summary of at most 80 characters: {about:?}", sub.get_name());
        }
    }

    #[test]
    fn completions_cover_the_subcommands() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut out = Vec::new();
            completion(shell, "kubectl-sovereign", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("kubectl-sovereign") && text.contains("report") && text.contains("namespace"),
                "{shell}"
            );
        }
    }

    #[test]
    fn a_flag_given_twice_takes_its_last_value() {
        let cli = try_parse(&["sovereign-operator", "run", "--min-run-seconds=600", "--min-run-seconds=60"]).unwrap();
        let Command::Run(args) = cli.command else { panic!("expected run") };
        assert_eq!(args.planning.min_run_seconds, 60);
    }

    #[test]
    fn log_format_is_global() {
        let cli = Cli::try_parse_from(["sovereign-operator", "crd", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
    }
}
