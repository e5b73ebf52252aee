//! Logs and metrics. Metric labels are bounded: controller, pool, allocation,
//! phase and error category, never one series per pod or node.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::cli::LogFormat;

/// Installs the global tracing subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(fmt::layer().json().with_span_list(true)).try_init()?,
        LogFormat::Plain => registry.with(fmt::layer()).try_init()?,
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AllocationLabels {
    pub allocation: String,
    pub program: String,
}

/// Allocation, program and pool: bounded by the allocations and pools.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChargeLabels {
    pub allocation: String,
    pub program: String,
    pub pool: String,
}

/// Allocation, program and kind of workload (ModelProject, Job, JobSet, Pod):
/// bounded by the allocations, never one series per workload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub allocation: String,
    pub program: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShareLabels {
    /// capacity, granted or in_use.
    pub measure: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// The values of the `kind` label: the workloads the ledger knows, and Pod for
/// tenants' own pods.
pub const KINDS: [&str; 4] = ["ModelProject", "Job", "JobSet", "Pod"];

/// Accelerator-hours are exposed in seconds, Prometheus' base unit.
const SECONDS_PER_HOUR: f64 = 3600.0;

/// What the allocation gauges show of one allocation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AllocationGauges {
    pub granted: i64,
    pub in_use: i64,
    pub hours_used: f64,
    pub budget_hours: Option<f64>,
    pub active: bool,
}

/// The operator's metrics, registered once at start.
pub struct Metrics {
    pub registry: Registry,
    pub reconciliations: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    planning_duration: Family<StageLabels, Histogram>,
    pool_capacity: Family<PoolLabels, Gauge>,
    pool_allocatable: Family<PoolLabels, Gauge>,
    pool_granted: Family<PoolLabels, Gauge>,
    pool_reserved: Family<PoolLabels, Gauge>,
    pool_in_use: Family<PoolLabels, Gauge>,
    allocation_granted: Family<AllocationLabels, Gauge>,
    allocation_in_use: Family<AllocationLabels, Gauge>,
    allocation_used: Family<AllocationLabels, FloatGauge>,
    allocation_budget: Family<AllocationLabels, FloatGauge>,
    allocation_active: Family<AllocationLabels, Gauge>,
    allocation_charged: Family<ChargeLabels, FloatCounter>,
    allocation_by_kind: Family<KindLabels, FloatGauge>,
    domestic_share: Family<ShareLabels, FloatGauge>,
    admission_wait: Histogram,
    projects: Family<ProjectLabels, Gauge>,
    queue_depth: Family<AllocationLabels, Gauge>,
    gang_restarts: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectLabels {
    pub phase: String,
    pub pool: String,
}

/// A planning stage: "view" (cluster snapshot and grant plan) or "admission"
/// (the queue pass).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sovereign");
        registry.register(
            "build",
            "The running build: its version (from the release tag) and commit",
            Info::new(vec![("version", crate::version::VERSION), ("commit", crate::version::COMMIT)]),
        );
        let reconciliations = Family::<ControllerLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        registry.register("reconciliations", "Reconciliations started, by controller", reconciliations.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by controller and error category",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took, by controller",
            reconcile_duration.clone(),
        );
        let planning_duration = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        registry.register(
            "planning_duration_seconds",
            "Time one planning stage took: view (snapshot and grant plan) or admission (queue pass)",
            planning_duration.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let f = Family::<PoolLabels, Gauge>::default();
            registry.register(name, help, f.clone());
            f
        };
        let pool_capacity = gauge("pool_capacity_devices", "Devices on the pool's nodes");
        let pool_allocatable = gauge("pool_allocatable_devices", "Allocatable devices on the pool's Ready nodes");
        let pool_granted = gauge("pool_granted_devices", "Devices held by active grants");
        let pool_reserved = gauge("pool_reserved_devices", "Devices on nodes reserved by dedicated grants");
        let pool_in_use = gauge("pool_in_use_devices", "Devices requested by running pods");
        let allocation_granted = Family::<AllocationLabels, Gauge>::default();
        let allocation_in_use = Family::<AllocationLabels, Gauge>::default();
        let allocation_used = Family::<AllocationLabels, FloatGauge>::default();
        let allocation_budget = Family::<AllocationLabels, FloatGauge>::default();
        let allocation_active = Family::<AllocationLabels, Gauge>::default();
        let domestic_share = Family::<ShareLabels, FloatGauge>::default();
        registry.register("allocation_granted_devices", "Devices granted and in force", allocation_granted.clone());
        registry.register(
            "allocation_in_use_devices",
            "Devices requested by the allocation's running pods",
            allocation_in_use.clone(),
        );
        registry.register(
            "allocation_used_accelerator_seconds",
            "Accelerator time used, charge-factor weighted (accelerator-hours x 3600)",
            allocation_used.clone(),
        );
        registry.register(
            "allocation_budget_accelerator_seconds",
            "The allocation's budget of accelerator time (accelerator-hours x 3600), for budgeted allocations",
            allocation_budget.clone(),
        );
        registry.register("allocation_active", "1 while the allocation is Active", allocation_active.clone());
        let allocation_charged = Family::<ChargeLabels, FloatCounter>::default();
        registry.register(
            "allocation_accelerator_seconds",
            "Accelerator time charged by the ledger, charge-factor weighted (accelerator-hours x 3600), by \
             allocation, program and pool; starts at the ledger's figure and never decreases",
            allocation_charged.clone(),
        );
        let allocation_by_kind = Family::<KindLabels, FloatGauge>::default();
        registry.register(
            "allocation_kind_used_accelerator_seconds",
            "Accelerator time charged by the ledger, charge-factor weighted (accelerator-hours x 3600), by \
             allocation, program and kind of workload (ModelProject, Job, JobSet; Pod for tenants' own pods)",
            allocation_by_kind.clone(),
        );
        registry.register(
            "domestic_share_ratio",
            "Fraction of accelerators on domestic pools, by measure (capacity, granted, in_use)",
            domestic_share.clone(),
        );
        let admission_wait = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register(
            "project_admission_wait_seconds",
            "Time from a project's creation to its admission",
            admission_wait.clone(),
        );
        let gang_restarts = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "gang_stops",
            "Gangs stopped, by reason: restarts, timeouts and failures, Preempted and Reclaimed",
            gang_restarts.clone(),
        );
        let projects = Family::<ProjectLabels, Gauge>::default();
        registry.register("projects", "ModelProjects by phase and pool", projects.clone());
        let queue_depth = Family::<AllocationLabels, Gauge>::default();
        registry.register("queue_depth", "Projects waiting for admission, by allocation", queue_depth.clone());
        Self {
            projects,
            queue_depth,
            admission_wait,
            gang_restarts,
            registry,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            planning_duration,
            pool_capacity,
            pool_allocatable,
            pool_granted,
            pool_reserved,
            pool_in_use,
            allocation_granted,
            allocation_in_use,
            allocation_used,
            allocation_budget,
            allocation_active,
            allocation_charged,
            allocation_by_kind,
            domestic_share,
        }
    }
}

impl Metrics {
    pub fn observe_planning(&self, stage: &'static str, seconds: f64) {
        self.planning_duration.get_or_create(&StageLabels { stage }).observe(seconds);
    }

    /// Forgets the per-pool and per-allocation series before a new view is
    /// recorded, so deleted pools and allocations leave no stale series.
    pub fn clear_views(&self) {
        for f in
            [&self.pool_capacity, &self.pool_allocatable, &self.pool_granted, &self.pool_reserved, &self.pool_in_use]
        {
            f.clear();
        }
        self.allocation_granted.clear();
        self.allocation_in_use.clear();
        self.allocation_used.clear();
        self.allocation_budget.clear();
        self.allocation_active.clear();
    }

    pub fn pool(&self, pool: &str, capacity: i64, allocatable: i64, granted: i64, reserved: i64, in_use: i64) {
        let l = PoolLabels { pool: pool.to_string() };
        self.pool_capacity.get_or_create(&l).set(capacity);
        self.pool_allocatable.get_or_create(&l).set(allocatable);
        self.pool_granted.get_or_create(&l).set(granted);
        self.pool_reserved.get_or_create(&l).set(reserved);
        self.pool_in_use.get_or_create(&l).set(in_use);
    }

    pub fn allocation(&self, allocation: &str, program: &str, g: &AllocationGauges) {
        let l = AllocationLabels { allocation: allocation.to_string(), program: program.to_string() };
        self.allocation_granted.get_or_create(&l).set(g.granted);
        self.allocation_in_use.get_or_create(&l).set(g.in_use);
        self.allocation_used.get_or_create(&l).set(g.hours_used * SECONDS_PER_HOUR);
        if let Some(budget) = g.budget_hours {
            self.allocation_budget.get_or_create(&l).set(budget * SECONDS_PER_HOUR);
        }
        self.allocation_active.get_or_create(&l).set(g.active as i64);
    }

    /// Brings the charge counter of (allocation, program, pool) up to the
    /// ledger's `seconds`. A counter never goes down: a figure below it (a pod
    /// charged up to now whose end turned out a moment earlier) waits for the
    /// ledger to catch up.
    pub fn charged_seconds(&self, allocation: &str, program: &str, pool: &str, seconds: f64) {
        let l = ChargeLabels { allocation: allocation.into(), program: program.into(), pool: pool.into() };
        let c = self.allocation_charged.get_or_create(&l);
        let behind = seconds - c.get();
        if behind > 0.0 {
            c.inc_by(behind);
        }
    }

    /// Sets the ledger's figure of one kind of workload of an allocation.
    pub fn charged_by_kind(&self, allocation: &str, program: &str, kind: &str, seconds: f64) {
        let l = KindLabels { allocation: allocation.into(), program: program.into(), kind: kind.into() };
        self.allocation_by_kind.get_or_create(&l).set(seconds);
    }

    /// Drops the charge counters of a deleted allocation.
    pub fn forget_charges<'a>(&self, allocation: &str, program: &str, pools: impl IntoIterator<Item = &'a str>) {
        for kind in KINDS {
            let l = KindLabels { allocation: allocation.into(), program: program.into(), kind: kind.to_string() };
            self.allocation_by_kind.remove(&l);
        }
        for pool in pools {
            let l = ChargeLabels { allocation: allocation.into(), program: program.into(), pool: pool.into() };
            self.allocation_charged.remove(&l);
        }
    }

    /// Replaces the project gauges: counts by (phase, pool) and queue depth by
    /// (allocation, program).
    pub fn projects(&self, by_phase: &BTreeMap<(String, String), i64>, queued: &BTreeMap<(String, String), i64>) {
        self.projects.clear();
        for ((phase, pool), n) in by_phase {
            self.projects.get_or_create(&ProjectLabels { phase: phase.clone(), pool: pool.clone() }).set(*n);
        }
        self.queue_depth.clear();
        for ((allocation, program), n) in queued {
            self.queue_depth
                .get_or_create(&AllocationLabels { allocation: allocation.clone(), program: program.clone() })
                .set(*n);
        }
    }

    pub fn observe_admission_wait(&self, seconds: f64) {
        self.admission_wait.observe(seconds);
    }

    pub fn count_gang_restart(&self, reason: &'static str) {
        self.gang_restarts.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn domestic_share(&self, measure: &'static str, share: f64) {
        self.domestic_share.get_or_create(&ShareLabels { measure }).set(share);
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_prefix_and_total_suffix() {
        let m = Metrics::default();
        m.reconciliations.get_or_create(&ControllerLabels { controller: "pool" }).inc();
        m.reconcile_duration.get_or_create(&ControllerLabels { controller: "pool" }).observe(0.01);
        let text = m.encode();
        assert!(text.contains("sovereign_reconciliations_total{controller=\"pool\"} 1"), "{text}");
        assert!(text.contains("# TYPE sovereign_reconcile_duration_seconds histogram"), "{text}");
        let build = format!(
            "sovereign_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::version::VERSION,
            crate::version::COMMIT
        );
        assert!(text.contains(&build), "{build} missing from\n{text}");
    }

    #[test]
    fn allocation_time_is_in_seconds_and_shares_are_ratios() {
        let m = Metrics::default();
        let g = AllocationGauges { granted: 16, in_use: 8, hours_used: 1.5, budget_hours: Some(10.0), active: true };
        m.allocation("a", "wbl", &g);
        m.allocation("b", "wbl", &AllocationGauges::default());
        m.domestic_share("capacity", 0.25);
        let text = m.encode();
        for line in [
            "sovereign_allocation_used_accelerator_seconds{allocation=\"a\",program=\"wbl\"} 5400.0",
            "sovereign_allocation_budget_accelerator_seconds{allocation=\"a\",program=\"wbl\"} 36000.0",
            "sovereign_allocation_in_use_devices{allocation=\"a\",program=\"wbl\"} 8",
            "sovereign_domestic_share_ratio{measure=\"capacity\"} 0.25",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        m.charged_seconds("a", "wbl", "h200", 10.5);
        m.charged_seconds("a", "wbl", "h200", 10.0);
        m.charged_seconds("a", "wbl", "h200", 12.0);
        let text = m.encode();
        let counter =
            "sovereign_allocation_accelerator_seconds_total{allocation=\"a\",program=\"wbl\",pool=\"h200\"} 12.0";
        assert!(text.contains(counter), "{counter} missing from\n{text}");
        // No budget, no budget series.
        assert!(!text.contains("sovereign_allocation_budget_accelerator_seconds{allocation=\"b\""), "{text}");
    }
}
