//! Table tests of the project phase machine ([`decide`]): no client, plain
//! objects in, the decision out.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::api::{AcceleratorPool, GpuAllocation, ModelProject, ModelProjectStatus, ProjectPhase, find_condition};

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
    let pool = pool();
    let none = BTreeSet::new();
    let obs = Observed {
        now: t(c.now),
        pods: &c.pods,
        allocation: c.allocation.as_ref(),
        pool: Some(&pool),
        recently_created: &none,
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
            "every worker running: Running, one write",
            Some(Admitted),
            vec![pod(0, "Running"), pod(1, "Running")],
            Want { event: Some("Running"), writes: true, ..w(Running) },
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
    let obs =
        Observed { now: t(10), pods: &[], allocation: alloc.as_ref(), pool: Some(&pool), recently_created: &recent };
    let d = decide(&c.project, &obs);
    assert_eq!(d.create, vec![1]);
    assert!(d.requeue <= std::time::Duration::from_secs(2));
}

#[test]
fn an_admitted_gang_whose_pool_is_gone_goes_back_to_the_queue() {
    let c = case("", Some(ProjectPhase::Admitted), vec![], Want::default());
    let none = BTreeSet::new();
    let alloc = c.allocation.clone();
    let obs = Observed { now: t(10), pods: &[], allocation: alloc.as_ref(), pool: None, recently_created: &none };
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
    assert!(err.contains("allowNonPreemptible"), "{err}");
    a.spec.allow_non_preemptible = true;
    assert!(validate(&p, Some(&a)).is_ok());
}
