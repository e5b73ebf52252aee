//! The loop's write path against a mocked API server (no cluster): every
//! request the writer makes is recorded and answered by the scenario, and the
//! test asserts the requests, what was assumed, and what was not written.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::json;

use super::Writer;
use super::writes::{self, Writes};
use crate::admission::{Decision, Decisions, GangKey, WaitReason};
use crate::api::ModelProject;
use crate::controller::unseen::Unseen;
use crate::telemetry::Metrics;

fn now() -> Timestamp {
    "2026-12-01T12:00:00Z".parse().unwrap()
}

fn project(name: &str, rv: &str) -> Arc<ModelProject> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "sovereign.ai/v1alpha1", "kind": "ModelProject",
            "metadata": {"name": name, "namespace": "t", "resourceVersion": rv, "uid": format!("uid-{name}"),
                         "generation": 1, "creationTimestamp": "2026-12-01T11:00:00Z"},
            "spec": {"allocation": "x", "placement": {"pools": ["a"]}, "workers": 1, "acceleratorsPerWorker": 8,
                     "template": {"image": "t"}},
        }))
        .expect("a project"),
    )
}

fn key(name: &str) -> GangKey {
    GangKey::model_project("t", name)
}

/// One recorded request: method, path and query, body.
#[derive(Debug)]
struct Seen {
    method: String,
    uri: String,
    body: serde_json::Value,
}

/// Runs `writes` through a writer whose API server answers each status
/// patch with `status_code(name)` (events are always accepted); returns the
/// requests seen, in order, and what was assumed.
async fn run(
    writes: Writes,
    status_code: impl Fn(&str) -> u16 + Send + 'static,
) -> (Vec<Seen>, Unseen<GangKey, Arc<ModelProject>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some((req, send))) = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await {
            let (method, uri) = (req.method().to_string(), req.uri().to_string());
            let bytes = req.into_body().collect_bytes().await.expect("a body");
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let response = if uri.contains("/modelprojects/") {
                let name = uri.split("/modelprojects/").nth(1).and_then(|r| r.split('/').next()).unwrap_or_default();
                match status_code(name) {
                    200 => {
                        let mut written = body.clone();
                        written["metadata"] = json!({"name": name, "namespace": "t", "resourceVersion": "99"});
                        written["spec"] = json!({"allocation": "x", "placement": {"pools": ["a"]}, "workers": 1,
                                                 "acceleratorsPerWorker": 8, "template": {"image": "t"}});
                        Response::builder().status(200).body(Body::from(serde_json::to_vec(&written).unwrap()))
                    }
                    code => {
                        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "message": "the object has been modified", "reason": "Conflict", "code": code});
                        Response::builder().status(code).body(Body::from(serde_json::to_vec(&status).unwrap()))
                    }
                }
            } else {
                Response::builder().status(201).body(Body::from(serde_json::to_vec(&body).unwrap()))
            };
            send.send_response(response.expect("a response"));
            seen.push(Seen { method, uri, body });
        }
        seen
    });
    let client = kube::Client::new(service, "default");
    let reporter = Reporter { controller: "sovereign-operator".into(), instance: None };
    let writer =
        Writer { recorder: Recorder::new(client.clone(), reporter), client, metrics: Arc::new(Metrics::default()) };
    let assumed = Unseen::new(Duration::from_secs(60));
    writer.write_cycle(writes, &assumed).await;
    drop(writer);
    (server.await.expect("the mock server"), assumed)
}

fn plan_writes(projects: &[Arc<ModelProject>], decisions: Vec<(&str, Decision)>) -> Writes {
    let d = Decisions { gangs: decisions.into_iter().map(|(n, d)| (key(n), d)).collect() };
    writes::plan(projects, &d, now(), &|_| true)
}

fn admit() -> Decision {
    Decision::Admit { pool: "a".into(), nodes: vec!["a-0".into()], borrowed: false, protected_until: None }
}

fn status_patches(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter().filter(|s| s.uri.contains("/modelprojects/")).collect()
}

#[tokio::test]
async fn an_admission_is_applied_on_the_version_decided_then_assumed_and_announced() {
    let p = project("p", "7");
    let (seen, assumed) = run(plan_writes(std::slice::from_ref(&p), vec![("p", admit())]), |_| 200).await;
    let patches = status_patches(&seen);
    assert_eq!(patches.len(), 1, "{seen:?}");
    let patch = patches[0];
    assert_eq!(patch.method, "PATCH");
    assert_eq!(
        patch.uri,
        "/apis/sovereign.ai/v1alpha1/namespaces/t/modelprojects/p/status?&force=true&fieldManager=sovereign-operator"
    );
    assert_eq!(patch.body["metadata"]["resourceVersion"], "7", "guarded by the version it was decided on");
    assert_eq!(patch.body["status"]["phase"], "Admitted");
    assert_eq!(patch.body["status"]["nodes"], json!(["a-0"]));
    let events: Vec<&Seen> = seen.iter().filter(|s| s.uri.contains("/events")).collect();
    assert_eq!(events.len(), 1, "one Admitted Event: {seen:?}");
    assert_eq!(events[0].body["reason"], "Admitted");
    assert_eq!(events[0].body["type"], "Normal");
    let written = assumed.over(&key("p"), "7").expect("assumed while the store shows version 7");
    assert_eq!(written.status.as_ref().and_then(|s| s.pool.as_deref()), Some("a"));
}

#[tokio::test]
async fn a_write_refused_as_stale_is_forgotten_and_announces_nothing() {
    for code in [409, 404] {
        let p = project("p", "7");
        let (seen, assumed) = run(plan_writes(&[p], vec![("p", admit())]), move |_| code).await;
        assert_eq!(seen.len(), 1, "{code}: the patch alone, no Event: {seen:?}");
        assert!(assumed.over(&key("p"), "7").is_none(), "{code}: nothing assumed: planned again next cycle");
    }
}

fn preemption() -> Vec<(&'static str, Decision)> {
    vec![
        (
            "urgent",
            Decision::Wait {
                position: 1,
                why: WaitReason::Preempting,
                message: "preempting lower-priority t/low".into(),
                victims: vec![key("low")],
            },
        ),
        (
            "low",
            Decision::Evict {
                by: key("urgent"),
                pool: "a".into(),
                reclaimed: false,
                message: "preempted by t/urgent".into(),
            },
        ),
    ]
}

fn holding(name: &str) -> Arc<ModelProject> {
    let mut p = (*project(name, "3")).clone();
    p.status = Some(crate::api::ModelProjectStatus {
        phase: Some(crate::api::ProjectPhase::Running),
        pool: Some("a".into()),
        nodes: vec!["a-0".into()],
        ..Default::default()
    });
    Arc::new(p)
}

#[tokio::test]
async fn a_preemptor_whose_write_fails_stops_no_victim() {
    let projects = [project("urgent", "5"), holding("low")];
    let (seen, _) = run(plan_writes(&projects, preemption()), |name| if name == "urgent" { 409 } else { 200 }).await;
    let patches = status_patches(&seen);
    assert_eq!(patches.len(), 1, "the preemptor's write alone: {seen:?}");
    assert!(patches[0].uri.contains("/modelprojects/urgent/"));
}

#[tokio::test]
async fn a_preemptor_records_its_victims_before_they_are_stopped() {
    let projects = [project("urgent", "5"), holding("low")];
    let (seen, _) = run(plan_writes(&projects, preemption()), |_| 200).await;
    let patches = status_patches(&seen);
    assert_eq!(patches.len(), 2, "{seen:?}");
    assert!(patches[0].uri.contains("/modelprojects/urgent/"), "preemptor first");
    assert_eq!(patches[0].body["status"]["preempted"], json!(["t/low"]));
    assert!(patches[1].uri.contains("/modelprojects/low/"), "then its victim");
    assert_eq!(patches[1].body["status"]["phase"], "Queued");
}

#[test]
fn waiting_reasons_are_bounded_per_cycle_and_not_rewritten_within_the_refresh() {
    let projects: Vec<Arc<ModelProject>> = (0..250).map(|i| project(&format!("w{i}"), "1")).collect();
    let decisions = (0..250)
        .map(|i| {
            let d = Decision::Wait {
                position: i + 1,
                why: WaitReason::Waiting,
                message: "no room".into(),
                victims: vec![],
            };
            (key(&format!("w{i}")), d)
        })
        .collect();
    let d = Decisions { gangs: decisions };
    let keys = projects.iter().map(|p| crate::admission::project::key(p)).collect();
    let mut written = std::collections::HashMap::new();
    let mut w = writes::plan(&projects, &d, now(), &|_| true);
    assert_eq!(w.waiting.len(), 250);
    let more = writes::throttle(&mut w.waiting, &mut written, &keys, Duration::from_secs(10), 200);
    assert!(more, "some left for the next cycle");
    assert_eq!(w.waiting.len(), 200, "bounded per cycle");
    // The same reasons again, as if written: within the refresh, not rewritten.
    let stored: Vec<Arc<ModelProject>> = projects
        .iter()
        .zip(writes::plan(&projects, &d, now(), &|_| true).waiting)
        .map(|(p, wr)| {
            let mut p = (**p).clone();
            p.status = Some(wr.change.status);
            Arc::new(p)
        })
        .collect();
    // New numbers, same reason: the 200 written a moment ago wait for the
    // refresh; the 50 left over go now.
    let mut newer = d.clone();
    for d in newer.gangs.values_mut() {
        if let Decision::Wait { message, .. } = d {
            *message = "no room (fewer free now)".into();
        }
    }
    let mut again = writes::plan(&stored, &newer, now(), &|_| true);
    assert_eq!(again.waiting.len(), 250, "every reason changed");
    writes::throttle(&mut again.waiting, &mut written, &keys, Duration::from_secs(10), 200);
    assert_eq!(again.waiting.len(), 50, "only those not written within the refresh");
}
