//! Table tests of the allocation status step ([`decide`]): no client, plain
//! objects in, the decision out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;

use super::decide::Decision;
use super::*;
use crate::api::{AllocationPhase, GpuAllocationStatus, ProjectUsage, find_condition};
use crate::planner::grants::{AllocationPlan, Blocker, Phase, PoolGrantPlan};
use crate::planner::ledger::{PodLife, Workload};
use crate::planner::usage::AllocationUse;

const T0: i64 = 1_800_000_000_000;

fn t(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(T0 + ms).unwrap()
}

fn allocation(budget: Option<i64>) -> GpuAllocation {
    let mut spec = serde_json::json!({
        "tenant": {"displayName": "t", "namespaces": ["team"]},
        "grants": [{"pool": "h200", "accelerators": 16}, {"pool": "atom", "accelerators": 16}]
    });
    if let Some(b) = budget {
        spec["budget"] = serde_json::json!({"acceleratorHours": b});
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sovereign.ai/v1alpha1", "kind": "GpuAllocation",
        "metadata": {"name": "grant", "generation": 1}, "spec": spec
    }))
    .unwrap()
}

fn plan(phase: Phase, blocker: Option<Blocker>) -> AllocationPlan {
    let granted = if phase == Phase::Active { 16 } else { 0 };
    AllocationPlan {
        phase,
        blocker,
        pools: ["h200", "atom"]
            .into_iter()
            .map(|p| (p.to_string(), PoolGrantPlan { granted, ..Default::default() }))
            .collect(),
        domestic_granted_share: Some(0.5),
        wake_at: None,
    }
}

fn worker(uid: &str, project: &str, pool: &str, weight: f64, start: i64, end: Option<i64>) -> PodLife {
    PodLife {
        uid: uid.into(),
        workload: Some(Workload::project(project)),
        pool: pool.into(),
        domestic: pool == "atom",
        weight,
        start_millis: Some(T0 + start),
        end_millis: end.map(|e| T0 + e),
        settle: false,
        held: true,
    }
}

/// The parts of an observation a test varies.
struct Case<'a> {
    now: i64,
    plan: AllocationPlan,
    pods: &'a [PodLife],
    projects: BTreeMap<String, Option<ProjectUsage>>,
}

fn run(alloc: &GpuAllocation, c: &Case<'_>) -> Decision {
    let usage = AllocationUse::default();
    let obs = Observed {
        now: t(c.now),
        plan: &c.plan,
        usage: &usage,
        missing_namespaces: vec![],
        not_tenant: vec![],
        pods: c.pods,
        watching_since: t(0),
        seen_gone: &|_| None,
        projects: &c.projects,
        workloads: &BTreeSet::new(),
        settle_due: None,
        keep_books: None,
    };
    decide(alloc, &obs)
}

/// The status as the next reconcile reads it: written, then read back.
fn through_api(alloc: &GpuAllocation, status: &GpuAllocationStatus) -> GpuAllocation {
    let mut a = alloc.clone();
    let json = serde_json::to_string(status).unwrap();
    a.status = Some(serde_json::from_str(&json).unwrap());
    a
}

fn active(now: i64, pods: &[PodLife]) -> Case<'_> {
    Case { now, plan: plan(Phase::Active, None), pods, projects: BTreeMap::new() }
}

#[test]
fn events_only_on_real_transitions() {
    let capacity = || Blocker::Capacity { pool: "h200".into(), free: 0, needs: 16, allocatable: 16 };
    let window = || Blocker::WindowNotOpen { start: t(60_000) };
    let budget = || Blocker::BudgetUsedUp { used: 10.0, budget: 10.0 };
    type Plan = (Phase, Option<Blocker>);
    let cases: Vec<(&str, Option<Plan>, Plan, Vec<&str>)> = vec![
        ("first seen, Active", None, (Phase::Active, None), vec!["Activated"]),
        ("still Active", Some((Phase::Active, None)), (Phase::Active, None), vec![]),
        ("Pending to Active", Some((Phase::Pending, Some(capacity()))), (Phase::Active, None), vec!["Activated"]),
        ("still short", Some((Phase::Pending, Some(capacity()))), (Phase::Pending, Some(capacity())), vec![]),
        (
            "pending for a new reason",
            Some((Phase::Pending, Some(window()))),
            (Phase::Pending, Some(capacity())),
            vec!["InsufficientCapacity"],
        ),
        ("used up", Some((Phase::Active, None)), (Phase::Exhausted, Some(budget())), vec!["BudgetUsedUp"]),
    ];
    for (name, before, after, want) in cases {
        let mut alloc = allocation(None);
        if let Some((phase, blocker)) = before {
            let d = run(&alloc, &Case { now: 0, plan: plan(phase, blocker), pods: &[], projects: BTreeMap::new() });
            alloc = through_api(&alloc, &d.status);
        }
        let d = run(&alloc, &Case { now: 1_000, plan: plan(after.0, after.1), pods: &[], projects: BTreeMap::new() });
        let got: Vec<&str> = d.events.iter().map(|n| n.reason).collect();
        assert_eq!(got, want, "{name}");
        let again = run(&through_api(&alloc, &d.status), &active(2_000, &[]));
        if after.0 == Phase::Active {
            assert!(again.events.is_empty(), "{name}: a second reconcile publishes nothing");
        }
    }
}

#[test]
fn an_unchanged_cluster_writes_nothing_and_a_pod_that_starts_or_ends_writes_the_books() {
    let alloc = allocation(None);
    let first = run(&alloc, &active(0, &[]));
    let alloc = through_api(&alloc, &first.status);
    assert_eq!(run(&alloc, &active(30_000, &[])).status, first.status, "idle: no write");

    let running = [worker("a", "team/llm", "h200", 8.0, 10_000, None)];
    let started = run(&alloc, &active(10_500, &running));
    assert_ne!(started.status, first.status, "a pod started");
    let alloc = through_api(&alloc, &started.status);
    // Time alone: written once a minute, not on every reconcile.
    assert_eq!(run(&alloc, &active(40_000, &running)).status, started.status);
    let minute = run(&alloc, &active(71_000, &running));
    assert_ne!(minute.status, started.status);
    assert!((minute.hours_now - 8.0 * 61.0 / 3600.0).abs() < 1e-12);

    // Deleted and done: charged to its end, released after the write.
    let mut done = worker("a", "team/llm", "h200", 8.0, 10_000, Some(70_000));
    done.settle = true;
    let ended = run(&alloc, &active(80_000, std::slice::from_ref(&done)));
    assert_eq!(ended.release, vec!["a".to_string()]);
    assert_eq!(ended.status.accelerator_hours_used, ((8.0 * 60.0 / 3600.0) * 1e6_f64).round() / 1e6);
    assert_eq!(ended.status.charge_rate, 0.0);
    // The release failed and the pod is still there: released again, never charged again.
    let alloc = through_api(&alloc, &ended.status);
    let again = run(&alloc, &active(90_000, std::slice::from_ref(&done)));
    assert_eq!(again.release, vec!["a".to_string()]);
    assert_eq!(again.status, ended.status, "nothing new to write");
}

#[test]
fn a_round_trip_of_status_between_charges_changes_nothing() {
    // Odd milliseconds everywhere: whole-second times in status would count
    // the fractions twice.
    let pods = [worker("a", "team/llm", "h200", 8.0, 1_234, None), worker("b", "team/llm", "atom", 4.0, 2_345, None)];
    let mut alloc = allocation(None);
    let mut now = 3_000;
    while now < 3_600_000 {
        now += 61_789;
        let d = run(&alloc, &active(now, &pods));
        alloc = through_api(&alloc, &d.status);
    }
    let direct = run(&allocation(None), &active(now, &pods));
    let stepped = run(&alloc, &active(now, &pods));
    assert_eq!(stepped.hours_now, direct.hours_now);
    let want = (8.0 * (now - 1_234) as f64 + 4.0 * (now - 2_345) as f64) / 3_600_000.0;
    assert!((stepped.hours_now - want).abs() < 1e-12, "{} vs {want}", stepped.hours_now);
}

#[test]
fn pools_projects_and_plain_pods_sum_to_the_allocation() {
    let mut plain = worker("p", "", "h200", 2.0, 0, None);
    plain.workload = None;
    plain.held = false;
    let pods = [
        worker("a", "team/llm", "h200", 8.0, 0, None),
        worker("b", "team/llm", "atom", 4.0, 0, Some(1_800_000)),
        worker("c", "team/small", "atom", 0.5, 0, None),
        plain,
    ];
    let projects: BTreeMap<String, Option<ProjectUsage>> =
        [("team/llm".to_string(), None), ("team/small".to_string(), None)].into();
    let d = run(&allocation(None), &Case { now: 3_600_000, plan: plan(Phase::Active, None), pods: &pods, projects });
    let s = &d.status;
    let pools: f64 = s.pool_hours.iter().map(|p| p.accelerator_hours_used).sum();
    let projects: f64 = s.project_hours.iter().map(|p| p.accelerator_hours_used).sum();
    assert_eq!(s.accelerator_hours_used, 8.0 + 2.0 + 0.5 + 2.0);
    assert!((pools - s.accelerator_hours_used).abs() < 1e-9);
    assert!((projects + 2.0 - s.accelerator_hours_used).abs() < 1e-9, "projects plus the plain pod");
    assert_eq!(s.domestic_accelerator_hours_used, 2.5);
    // Each project's own status gets its figures, by pool, summing to the same.
    let written: f64 = d.project_usage.iter().map(|(_, u)| u.accelerator_hours_used).sum();
    assert_eq!(written, projects);
    let (_, llm) = d.project_usage.iter().find(|(p, _)| p == "team/llm").unwrap();
    assert_eq!(llm.pools.len(), 2);
    assert_eq!(llm.charge_rate, 8.0);
    // A run that just started gets no usage write (an admission costs no extra write).
    let fresh = [worker("f", "team/new", "h200", 8.0, 3_590_000, None)];
    let projects: BTreeMap<String, Option<ProjectUsage>> = [("team/new".to_string(), None)].into();
    let started =
        run(&allocation(None), &Case { now: 3_600_000, plan: plan(Phase::Active, None), pods: &fresh, projects });
    assert!(started.project_usage.is_empty(), "{:?}", started.project_usage);
    // The counter's figures, in seconds.
    assert_eq!(d.seconds_by_pool["h200"], (8.0 + 2.0) * 3600.0);
}

#[test]
fn the_budget_is_judged_on_the_exact_figure() {
    // 4 devices for 54 minutes = 3.6 of a 4-hour budget: almost used.
    let pods = [worker("a", "team/llm", "h200", 4.0, 0, None)];
    let d = run(&allocation(Some(4)), &active(54 * 60_000, &pods));
    let c = find_condition(&d.status.conditions, "WithinBudget").unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "BudgetAlmostUsed"));
    assert!(d.events.iter().any(|n| n.reason == "BudgetAlmostUsed"));
    // The next wake is when it runs out (6 minutes on), not a minute's sample later than that.
    assert!(d.requeue <= Duration::from_secs(60));
    // Written once, then the moment it is used up (the grant plan reads the written figure).
    let alloc = through_api(&allocation(Some(4)), &d.status);
    assert!(
        run(&alloc, &active(54 * 60_000 + 30_000, &pods)).status == alloc.status.clone().unwrap(),
        "no write between"
    );
    let d = run(&alloc, &active(60 * 60_000, &pods));
    assert_eq!(d.status.accelerator_hours_used, 4.0, "the figure is written at the crossing");
    let c = find_condition(&d.status.conditions, "WithinBudget").unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "BudgetUsedUp"));
    assert_eq!(d.status.phase, Some(AllocationPhase::Active), "the phase is the plan's");
}

#[test]
fn hours_written_before_the_ledger_are_carried_over_once() {
    // 2 h charged up to t=3600 s by the old integration, 1 h of it by the pod
    // still running (8 devices since t=3150 s): the ledger charges that pod
    // from its start, so only the other hour is carried over.
    let mut alloc = allocation(None);
    alloc.status = Some(GpuAllocationStatus {
        accelerator_hours_used: 2.0,
        usage_updated_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(3_600_000))),
        charge_rate: 8.0,
        ..Default::default()
    });
    let pods = [worker("a", "team/llm", "h200", 8.0, 3_150_000, None)];
    let d = run(&alloc, &active(3_600_000, &pods));
    assert!((d.hours_now - 2.0).abs() < 1e-9, "{}", d.hours_now);
    let later = run(&through_api(&alloc, &d.status), &active(7_200_000, &pods));
    assert!((later.hours_now - 10.0).abs() < 1e-9, "{}", later.hours_now);
}

/// A pod of an admitted Job (or a worker) as the stores hold it.
fn held_pod(ns: &str, labels: serde_json::Value, finalizers: &[&str], deleting: bool) -> Pod {
    let mut meta = serde_json::json!({"name": "p", "namespace": ns, "uid": "u", "labels": labels,
        "finalizers": finalizers});
    if deleting {
        meta["deletionTimestamp"] = serde_json::json!("2027-01-15T08:00:00Z");
    }
    serde_json::from_value(serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta})).unwrap()
}

#[test]
fn a_deleted_held_pod_is_an_orphan_only_where_no_live_allocation_lists_its_namespace() {
    let job = serde_json::json!({"sovereign.ai/job": "train", "sovereign.ai/pool": "h200", "sovereign.ai/allocation": "grant"});
    let set = serde_json::json!({"sovereign.ai/jobset": "pair", "sovereign.ai/pool": "h200", "sovereign.ai/allocation": "grant"});
    let listed = vec![Arc::new(allocation(None))];
    let mut going = allocation(None);
    going.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(0)));
    let going = vec![Arc::new(going)];
    for labels in [&job, &set] {
        let deleted = held_pod("team", labels.clone(), &[LEDGER_FINALIZER, "batch.kubernetes.io/job-tracking"], true);
        // Charged by the allocation that lists its namespace: the ledger releases it.
        assert!(!orphaned(&deleted, &listed));
        // Its allocation is gone or going: nothing will ever charge it.
        assert!(orphaned(&deleted, &[]));
        assert!(orphaned(&deleted, &going));
        // Another namespace's allocation does not hold it.
        assert!(orphaned(&held_pod("elsewhere", labels.clone(), &[LEDGER_FINALIZER], true), &listed));
        // Not deleted, or not held by the ledger: left alone.
        assert!(!orphaned(&held_pod("elsewhere", labels.clone(), &[LEDGER_FINALIZER], false), &[]));
        assert!(!orphaned(&held_pod("elsewhere", labels.clone(), &["batch.kubernetes.io/job-tracking"], true), &[]));
    }
}

/// A Job's pod carrying the ledger finalizer is held like a worker: charged
/// while it runs, settled (and so released) once deleted and done.
#[test]
fn a_jobs_pod_with_the_ledger_finalizer_is_held_and_settles_when_deleted() {
    let labels = serde_json::json!({"sovereign.ai/job": "train", "sovereign.ai/pool": "h200"});
    let rate = crate::planner::usage::PoolRate {
        name: "h200".into(),
        resource_name: "nvidia.com/gpu".into(),
        charge_factor: 1.0,
        domestic: false,
    };
    let running = held_pod("team", labels.clone(), &[LEDGER_FINALIZER], false);
    let life = snapshot::pod_life(&running, Some(&rate), t(0));
    assert!(life.held && !life.settle);
    let mut deleted = held_pod("team", labels, &[LEDGER_FINALIZER], true);
    deleted.status = serde_json::from_value(serde_json::json!({"phase": "Succeeded"})).unwrap();
    let life = snapshot::pod_life(&deleted, Some(&rate), t(0));
    assert!(life.held && life.settle);
}
