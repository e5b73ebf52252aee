//! Table tests of the project phase machine ([`decide`]): no client, plain
//! objects in, the decision out.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::api::policy::validate;
use crate::api::{
    AcceleratorPool, GpuAllocation, ModelProject, ModelProjectStatus, ProjectPhase, find_condition, holds_devices,
};

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn project(phase: Option<ProjectPhase>) -> ModelProject {
    let mut p: ModelProject = serde_json::from_value(serde_json::json!({
        "apiVersion": "sovereign.ai/v1alpha1", "kind": "ModelProject",
        "metadata": {"name": "llm", "namespace": "team", "uid": "u1", "generation": 1},
        "spec": {"allocation": "grant", "placement": {"pools": ["atom"]}, "workers": 2, "acceleratorsPerWorker": 8,
                 "runPolicy": {"maxRestarts": 1, "schedulingTimeoutSeconds": 60, "ttlSecondsAfterFinished": 100},
                 "template": {"image": "trainer:1"}}
    }))
    .unwrap();
    if phase.is_some() {
        let admitted = matches!(phase, Some(ProjectPhase::Admitted | ProjectPhase::Running));
        p.status = Some(ModelProjectStatus {
            phase,
            pool: admitted.then(|| "atom".to_string()),
            nodes: if admitted { vec!["n0".into(), "n1".into()] } else { vec![] },
            admitted_at: admitted.then(|| Time(t(0))),
            started_at: (phase == Some(ProjectPhase::Running)).then(|| Time(t(1))),
            finished_at: matches!(phase, Some(ProjectPhase::Succeeded | ProjectPhase::Failed)).then(|| Time(t(0))),
            observed_generation: Some(1),
            worker_states: crate::api::WorkerStates {
                running: if phase == Some(ProjectPhase::Running) { 2 } else { 0 },
                ..Default::default()
            },
            conditions: vec![crate::api::condition("Valid", true, "Valid", "allocation and pools resolve", Some(1))],
            ..Default::default()
        });
    }
    p
}

fn allocation(namespaces: &[&str]) -> GpuAllocation {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sovereign.ai/v1alpha1", "kind": "GpuAllocation", "metadata": {"name": "grant"},
        "spec": {"tenant": {"displayName": "t", "namespaces": namespaces},
                 "grants": [{"pool": "atom", "accelerators": 16}]}
    }))
    .unwrap()
}

fn pool() -> AcceleratorPool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sovereign.ai/v1alpha1", "kind": "AcceleratorPool", "metadata": {"name": "atom"},
        "spec": {"resourceName": "rebellions.ai/ATOM", "kind": "NPU", "vendor": "Rebellions", "model": "ATOM",
                 "nodeSelector": {"matchLabels": {"a": "b"}}}
    }))
    .unwrap()
}

/// A worker pod of this project (owned by uid u1) in a phase; "Bound" is a
/// Pending pod with a node, "Failed" exits with code 3.
fn pod(index: usize, phase: &str) -> Arc<Pod> {
    let (phase, node) = match phase {
        "Unbound" => ("Pending", None),
        "Bound" => ("Pending", Some("n0")),
        p => (p, Some("n0")),
    };
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("llm-worker-{index}"), "namespace": "team",
                         "labels": {"sovereign.ai/project": "llm", "sovereign.ai/worker-index": index.to_string()},
                         "ownerReferences": [{"apiVersion": "sovereign.ai/v1alpha1", "kind": "ModelProject",
                                              "name": "llm", "uid": "u1"}]},
            "spec": {"containers": [{"name": "trainer", "image": "x"}], "nodeName": node},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "image": "x", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": if phase == "Failed" { serde_json::json!({"terminated": {"exitCode": 3}}) }
                         else { serde_json::json!({}) }}]}
        }))
        .unwrap(),
    )
}

/// What a case expects of the decision.
#[derive(Debug, Default)]
struct Want {
    phase: Option<ProjectPhase>,
    stop: bool,
    create: Vec<usize>,
    delete: bool,
    event: Option<&'static str>,
    /// A status write is due.
    writes: bool,
}

struct Case {
    name: &'static str,
    project: ModelProject,
    pods: Vec<Arc<Pod>>,
    allocation: Option<GpuAllocation>,
    now: i64,
    want: Want,
}

fn case(name: &'static str, phase: Option<ProjectPhase>, pods: Vec<Arc<Pod>>, want: Want) -> Case {
    Case { name, project: project(phase), pods, allocation: Some(allocation(&["team"])), now: 10, want }
}

fn run(c: &Case) -> Decision {
    run_refused(c, None)
}

/// The decision, decided again after the apply step was refused `refusal`.
fn run_refused(c: &Case, refusal: Option<&super::refusal::Refusal>) -> Decision {
    let pool = pool();
    let none = BTreeSet::new();
    let obs = Observed {
        now: t(c.now),
        pods: &c.pods,
        allocation: c.allocation.as_ref(),
        pool: Some(&pool),
        recently_created: &none,
        refusal,
    };
    decide(&c.project, &obs)
}

#[test]
fn phase_machine() {
    use ProjectPhase::*;
    let w = |phase: ProjectPhase| Want { phase: Some(phase), ..Default::default() };
    let mut cases = vec![
        case("a fresh valid project is the admission loop's to write", None, vec![], Want::default()),
        case("queued without pods: nothing to do", Some(Queued), vec![], w(Queued)),
        case(
            "queued with pods left (preempted, stopped): they are stopped",
            Some(Queued),
            vec![pod(0, "Running")],
            Want { stop: true, ..w(Queued) },
        ),
        case("admitted: create every worker", Some(Admitted), vec![], Want { create: vec![0, 1], ..w(Admitted) }),
        case(
            "admitted, one worker exists: create the other, no write for a starting pod",
            Some(Admitted),
            vec![pod(0, "Bound")],
            Want { create: vec![1], ..w(Admitted) },
        ),
        case(
            "every worker running: Running, one write and no Event",
            Some(Admitted),
            vec![pod(0, "Running"), pod(1, "Running")],
            Want { writes: true, ..w(Running) },
        ),
        case(
            "running and still running: nothing",
            Some(Running),
            vec![pod(0, "Running"), pod(1, "Running")],
            w(Running),
        ),
        case(
            "every worker succeeded",
            Some(Running),
            vec![pod(0, "Succeeded"), pod(1, "Succeeded")],
            Want { event: Some("Succeeded"), writes: true, ..w(Succeeded) },
        ),
        case(
            "a failed worker restarts the gang",
            Some(Running),
            vec![pod(0, "Running"), pod(1, "Failed")],
            Want { stop: true, event: Some("WorkerFailed"), writes: true, ..w(Restarting) },
        ),
        case(
            "a vanished worker after running is lost, not failed",
            Some(Running),
            vec![pod(1, "Running")],
            Want { stop: true, event: Some("WorkerLost"), writes: true, ..w(Restarting) },
        ),
        case(
            "restarting with pods left: stop them first",
            Some(Restarting),
            vec![pod(0, "Running")],
            Want { stop: true, ..w(Restarting) },
        ),
        case(
            "failed with pods left: stop them",
            Some(Failed),
            vec![pod(0, "Running")],
            Want { stop: true, ..w(Failed) },
        ),
        case("succeeded within the TTL: kept", Some(Succeeded), vec![], w(Succeeded)),
    ];
    let mut unbound = case(
        "unbound past the scheduling timeout: back to the queue with a backoff",
        Some(Admitted),
        vec![pod(0, "Running"), pod(1, "Unbound")],
        Want { stop: true, event: Some("SchedulingTimeout"), writes: true, ..w(Queued) },
    );
    unbound.now = 61;
    cases.push(unbound);
    let mut within = case(
        "unbound within the scheduling timeout: wait",
        Some(Admitted),
        vec![pod(0, "Running"), pod(1, "Unbound")],
        w(Admitted),
    );
    within.now = 30;
    cases.push(within);
    let mut out_of_restarts = case(
        "a failed worker with no restart left fails the run",
        Some(Running),
        vec![pod(0, "Running"), pod(1, "Failed")],
        Want { stop: true, event: Some("BackoffLimitExceeded"), writes: true, ..w(Failed) },
    );
    out_of_restarts.project.status.as_mut().unwrap().restarts = 1;
    cases.push(out_of_restarts);
    let mut ttl =
        case("succeeded past the TTL: deleted", Some(Succeeded), vec![], Want { delete: true, ..w(Succeeded) });
    ttl.now = 101;
    cases.push(ttl);
    let mut suspended = case(
        "suspend stops the workers and gives the devices back",
        Some(Running),
        vec![pod(0, "Running"), pod(1, "Running")],
        Want { stop: true, event: Some("Suspended"), writes: true, ..w(Suspended) },
    );
    suspended.project.spec.run_policy.suspend = true;
    cases.push(suspended);
    cases.push(case(
        "resumed: queued again",
        Some(Suspended),
        vec![],
        Want { event: Some("Resumed"), writes: true, ..w(Queued) },
    ));
    let mut missing = case(
        "an allocation that does not exist: invalid, running workers stopped",
        Some(Running),
        vec![pod(0, "Running"), pod(1, "Running")],
        Want { stop: true, event: Some("InvalidReference"), writes: true, ..w(Queued) },
    );
    missing.allocation = None;
    cases.push(missing);
    let mut unlisted = case(
        "an allocation that does not list the namespace: invalid from the start",
        None,
        vec![],
        Want { event: Some("InvalidReference"), writes: true, ..w(Queued) },
    );
    unlisted.allocation = Some(allocation(&["other"]));
    cases.push(unlisted);

    for c in &cases {
        let d = run(c);
        let old = c.project.status.clone().unwrap_or_default();
        let name = c.name;
        assert_eq!(d.status.phase, c.want.phase, "{name}: phase");
        assert_eq!(d.stop_workers, c.want.stop, "{name}: stop");
        assert_eq!(d.create, c.want.create, "{name}: create");
        assert_eq!(d.delete_project, c.want.delete, "{name}: delete");
        assert_eq!(d.events.first().map(|e| e.reason), c.want.event, "{name}: event {:?}", d.events);
        assert_eq!(d.status != old, c.want.writes, "{name}: writes ({:?} -> {:?})", old, d.status);
    }
}

#[test]
fn a_scheduling_timeout_backs_off_and_gives_everything_back() {
    let mut c = case("", Some(ProjectPhase::Admitted), vec![pod(0, "Running"), pod(1, "Unbound")], Want::default());
    c.now = 61;
    let d = run(&c);
    assert_eq!(d.status.pool, None);
    assert!(d.status.nodes.is_empty());
    assert_eq!(d.status.retry_after, Some(Time(t(61 + 30))));
    assert_eq!(d.gang_stop, Some("SchedulingTimeout"));
    let running = find_condition(&d.status.conditions, "Running").unwrap();
    assert_eq!(running.reason, "SchedulingTimeout");
}

#[test]
fn pods_of_an_earlier_project_of_the_same_name_are_stopped_not_adopted() {
    let mut c = case("", Some(ProjectPhase::Admitted), vec![pod(0, "Running")], Want::default());
    c.project.metadata.uid = Some("u2".into());
    let d = run(&c);
    assert!(d.stop_workers);
    assert!(d.create.is_empty(), "no new worker takes the name while the old one holds it");
    assert_eq!(d.status.phase, Some(ProjectPhase::Admitted));
}

#[test]
fn workers_created_a_moment_ago_are_not_created_again() {
    let c = case("", Some(ProjectPhase::Admitted), vec![], Want::default());
    let pool = pool();
    let recent: BTreeSet<String> = ["llm-worker-0".to_string()].into();
    let alloc = c.allocation.clone();
    let obs = Observed {
        now: t(10),
        pods: &[],
        allocation: alloc.as_ref(),
        pool: Some(&pool),
        recently_created: &recent,
        refusal: None,
    };
    let d = decide(&c.project, &obs);
    assert_eq!(d.create, vec![1]);
    assert!(d.requeue <= std::time::Duration::from_secs(2));
}

#[test]
fn an_admitted_gang_whose_pool_is_gone_goes_back_to_the_queue() {
    let c = case("", Some(ProjectPhase::Admitted), vec![], Want::default());
    let none = BTreeSet::new();
    let alloc = c.allocation.clone();
    let obs = Observed {
        now: t(10),
        pods: &[],
        allocation: alloc.as_ref(),
        pool: None,
        recently_created: &none,
        refusal: None,
    };
    let d = decide(&c.project, &obs);
    assert_eq!(d.status.phase, Some(ProjectPhase::Queued));
    assert_eq!(d.status.pool, None);
}

#[test]
fn non_preemptible_needs_the_allocations_consent() {
    let mut p = project(None);
    p.spec.preemptible = false;
    let mut a = allocation(&["team"]);
    let err = validate(&p, Some(&a)).unwrap_err();
    assert!(err.message.contains("allowNonPreemptible"), "{err:?}");
    a.spec.allow_non_preemptible = true;
    assert!(validate(&p, Some(&a)).is_ok());
}

fn refusal(heals: bool, reason: &'static str) -> super::refusal::Refusal {
    super::refusal::Refusal {
        object: "Pod llm-worker-1".into(),
        heals,
        reason,
        message: format!("{} {reason}: the API server's own words", if heals { 403 } else { 422 }),
    }
}

fn decide_refused(c: &Case, r: &super::refusal::Refusal) -> Decision {
    run_refused(c, Some(r))
}

#[test]
fn refused_creates_block_or_retry() {
    use ProjectPhase::*;
    struct Row {
        name: &'static str,
        refusal: super::refusal::Refusal,
        now: i64,
        phase: ProjectPhase,
        stop: bool,
        event: bool,
        condition: Option<&'static str>,
        holds: bool,
    }
    let rows = [
        Row {
            name: "invalid: blocked at once, workers stopped, devices given back",
            refusal: refusal(false, "Invalid"),
            now: 1,
            phase: Blocked,
            stop: true,
            event: true,
            condition: Some("Invalid"),
            holds: false,
        },
        Row {
            name: "a missing ServiceAccount: blocked",
            refusal: refusal(false, "ReferenceNotFound"),
            now: 1,
            phase: Blocked,
            stop: true,
            event: true,
            condition: Some("ReferenceNotFound"),
            holds: false,
        },
        Row {
            name: "Pod Security: blocked",
            refusal: refusal(false, "PodSecurity"),
            now: 1,
            phase: Blocked,
            stop: true,
            event: true,
            condition: Some("PodSecurity"),
            holds: false,
        },
        Row {
            name: "a quota blip right after admission: retried quietly",
            refusal: refusal(true, "QuotaExceeded"),
            now: 1,
            phase: Admitted,
            stop: false,
            event: false,
            condition: None,
            holds: true,
        },
        Row {
            name: "a quota refusal that lasts: surfaced, still retried",
            refusal: refusal(true, "QuotaExceeded"),
            now: 6,
            phase: Admitted,
            stop: false,
            event: true,
            condition: Some("QuotaExceeded"),
            holds: true,
        },
        Row {
            name: "a 5xx that lasts: surfaced, still retried",
            refusal: refusal(true, "ServerError"),
            now: 20,
            phase: Admitted,
            stop: false,
            event: true,
            condition: Some("ServerError"),
            holds: true,
        },
    ];
    for r in rows {
        let mut c = case(r.name, Some(Admitted), vec![pod(0, "Running")], Want::default());
        c.now = r.now;
        let d = decide_refused(&c, &r.refusal);
        let name = r.name;
        assert_eq!(d.status.phase, Some(r.phase), "{name}");
        assert!(d.create.is_empty(), "{name}: nothing more is created in the same reconcile");
        assert_eq!(d.stop_workers, r.stop, "{name}: stop");
        assert_eq!(holds_devices(d.status.phase), r.holds, "{name}: holds");
        assert_eq!(d.status.pool.is_some(), r.holds, "{name}: pool");
        assert_eq!(!d.events.is_empty(), r.event, "{name}: events {:?}", d.events);
        if r.event {
            assert!(d.events[0].is_warning() && d.events[0].message.contains("the API server's own words"), "{name}");
        }
        let cond = find_condition(&d.status.conditions, super::decide::WORKERS_CREATED);
        assert_eq!(cond.map(|c| c.reason.as_str()), r.condition, "{name}: condition");
        if let Some(c) = cond {
            assert!(c.message.contains("the API server's own words") && c.message.contains("llm-worker-1"), "{name}");
        }
        if r.holds {
            assert!(d.requeue <= std::time::Duration::from_secs(30), "{name}: retried with backoff");
        }
    }
}

#[test]
fn a_lasting_refusal_is_surfaced_once() {
    let mut c = case("", Some(ProjectPhase::Admitted), vec![], Want::default());
    c.now = 6;
    let d = decide_refused(&c, &refusal(true, "QuotaExceeded"));
    c.project.status = Some(d.status.clone());
    c.now = 9;
    let again = decide_refused(&c, &refusal(true, "QuotaExceeded"));
    assert!(again.events.is_empty(), "one Event per transition: {:?}", again.events);
    assert_eq!(again.status, d.status, "no status write per retry");
}

#[test]
fn the_scheduling_timeout_counts_even_when_no_pod_could_be_created() {
    let mut c = case("", Some(ProjectPhase::Admitted), vec![pod(0, "Running")], Want::default());
    // A refusal surfaced earlier...
    let mut s = c.project.status.clone().unwrap();
    let msg = "the API server refused Pod llm-worker-1: 403 Forbidden: exceeded quota";
    let cond = crate::api::condition(super::decide::WORKERS_CREATED, false, "QuotaExceeded", msg, Some(1));
    s.conditions.push(cond);
    c.project.status = Some(s);
    c.now = 61;
    let d = run(&c);
    assert_eq!(d.status.phase, Some(ProjectPhase::Queued));
    assert!(d.stop_workers && d.create.is_empty());
    assert_eq!(d.status.pool, None, "devices given back");
    assert_eq!(d.gang_stop, Some("SchedulingTimeout"));
    assert!(d.events[0].message.contains("exceeded quota"), "{:?}", d.events);
}

#[test]
fn a_blocked_run_waits_for_a_spec_change() {
    let mut c = case("", Some(ProjectPhase::Admitted), vec![pod(0, "Running")], Want::default());
    c.now = 1;
    let d = decide_refused(&c, &refusal(false, "Invalid"));
    c.project.status = Some(d.status);
    c.pods.clear();
    let same = run(&c);
    assert_eq!(same.status.phase, Some(ProjectPhase::Blocked), "not retried on the same spec");
    assert!(same.events.is_empty() && same.create.is_empty());
    c.project.metadata.generation = Some(2);
    let changed = run(&c);
    assert_eq!(changed.status.phase, Some(ProjectPhase::Queued), "queued again once the spec changed");
    assert_eq!(changed.events[0].reason, "Unblocked");
    assert!(find_condition(&changed.status.conditions, super::decide::WORKERS_CREATED).is_none());
}

#[test]
fn a_template_the_allocation_does_not_allow_is_never_admitted() {
    let mut c = case("", None, vec![], Want::default());
    c.project.spec.template.volumes =
        vec![serde_json::from_value(serde_json::json!({"name": "root", "hostPath": {"path": "/"}})).unwrap()];
    let d = run(&c);
    assert_eq!(d.status.phase, Some(ProjectPhase::Queued));
    let valid = find_condition(&d.status.conditions, "Valid").unwrap();
    assert_eq!(valid.reason, "NotAllowedByAllocation");
    assert!(valid.message.contains("hostPath"), "{}", valid.message);
    assert_eq!(d.events[0].reason, "NotAllowedByAllocation");
    c.allocation.as_mut().unwrap().spec.workload_policy =
        Some(crate::api::WorkloadPolicy { allow_node_access: true, ..Default::default() });
    assert!(validate(&c.project, c.allocation.as_ref()).is_ok(), "the admin allowed it");
}
