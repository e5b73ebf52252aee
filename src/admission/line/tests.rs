use k8s_openapi::api::batch::v1::Job;
use serde_json::{Value, json};

use super::*;
use crate::admission::GangKey;
use crate::admission::job::{ADMITTED_NODES, ADMITTED_POOL, BORROWED};
use crate::workload::kinds::JobSet;

/// A Job of 4 pods x 8 GPUs: held (suspended) unless `annotations` admit it.
fn job(suspend: bool, annotations: Value, status: Value) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": "train", "namespace": "lab", "uid": "u-1", "resourceVersion": "7",
                     "labels": {ALLOCATION_LABEL: "a1"}, "annotations": annotations},
        "spec": {"suspend": suspend, "parallelism": 4, "completions": 4,
                 "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "i",
                    "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}},
        "status": status,
    }))
    .expect("a job")
}

fn held() -> Job {
    job(true, json!({}), json!({}))
}

fn admitted(borrowed: bool, status: Value) -> Job {
    let mut notes = json!({ADMITTED_POOL: "b200", ADMITTED_NODES: "n2,n1,n2,n1"});
    if borrowed {
        notes[BORROWED] = json!("true");
    }
    job(false, notes, status)
}

fn wait(position: u32, why: WaitReason, message: &str) -> Decision {
    Decision::Wait { position, why, message: message.into(), victims: vec![] }
}

fn preempted_line() -> WorkloadAdmissionStatus {
    WorkloadAdmissionStatus {
        state: WorkloadState::Preempted,
        reason: Some("Preempted".into()),
        message: Some("preempted by lab/big".into()),
        preemption: Some("preempted by lab/big".into()),
        devices: Some(32),
        pods: Some(4),
        ..Default::default()
    }
}

/// What one row expects: state, reason, message (a part of it), pool, nodes, position.
type Want =
    (WorkloadState, Option<&'static str>, &'static str, Option<&'static str>, &'static [&'static str], Option<i32>);
/// A row: what, the workload, the cycle's decision, the line written before, what it shows.
type Row<'a> = (&'static str, Job, Option<Decision>, Option<&'a WorkloadAdmissionStatus>, Want);

#[test]
fn each_workload_and_decision_gives_its_line() {
    use WorkloadState::*;
    let evict = |reclaimed| Decision::Evict {
        by: GangKey::model_project("lab", "big"),
        pool: "b200".into(),
        reclaimed,
        message: "preempted by lab/big (priority 100 over 0) to make room in pool b200; queued again".into(),
    };
    let admit =
        Decision::Admit { pool: "b200".into(), nodes: vec!["n1".into()], borrowed: false, protected_until: None };
    let uneven = {
        let mut j = held();
        j.spec.as_mut().unwrap().completions = Some(8);
        j
    };
    let started_outside = job(false, json!({}), json!({}));
    let complete = admitted(false, json!({"conditions": [{"type": "Complete", "status": "True"}]}));
    let failed = job(true, json!({}), json!({"conditions": [{"type": "Failed", "status": "True"}]}));
    let needs = "needs 32 nvidia.com/gpu in pool b200: grant has 16 free";
    let previous_preempted = preempted_line();
    #[rustfmt::skip]
    let rows: Vec<Row> = vec![
        ("held, no room", held(), Some(wait(3, WaitReason::Waiting, needs)), None,
            (Queued, Some("Waiting"), needs, None, &[], Some(3))),
        ("held, never fits", held(), Some(wait(1, WaitReason::Unsatisfiable, "has 2 nodes and the gang needs 4")), None,
            (Queued, Some("Unsatisfiable"), "has 2 nodes", None, &[], Some(1))),
        ("held, chose victims", held(), Some(wait(1, WaitReason::Preempting, needs)), None,
            (Queued, Some("Preempting"), needs, None, &[], Some(1))),
        ("held, grant not in force", held(), Some(wait(2, WaitReason::AllocationInactive, "allocation a1 is Pending")), None,
            (Suspended, Some("AllocationInactive"), "is Pending", None, &[], Some(2))),
        ("admitted, pods starting", admitted(false, json!({"ready": 2})), None, None,
            (Admitted, None, "admitted to pool b200 on nodes n1, n2", Some("b200"), &["n1", "n2"], None)),
        ("admitted, every pod ready", admitted(false, json!({"ready": 4})), None, None,
            (Running, None, "admitted to pool b200 on nodes n1, n2", Some("b200"), &["n1", "n2"], None)),
        ("running on borrowed capacity", admitted(true, json!({"ready": 3, "succeeded": 1})), None, None,
            (Running, Some("Borrowed"), "on borrowed capacity", Some("b200"), &["n1", "n2"], None)),
        ("a victim not stopped yet runs", admitted(false, json!({"ready": 4})), Some(evict(false)), None,
            (Running, None, "admitted to pool b200", Some("b200"), &["n1", "n2"], None)),
        ("suspended by its eviction", held(), Some(evict(false)), None,
            (Preempted, Some("Preempted"), "preempted by lab/big", None, &[], None)),
        ("suspended by a reclaim", held(), Some(evict(true)), None,
            (Preempted, Some("Reclaimed"), "preempted by lab/big", None, &[], None)),
        ("preempted, waiting again", held(), Some(wait(1, WaitReason::Waiting, needs)), Some(&previous_preempted),
            (Preempted, Some("Preempted"), needs, None, &[], Some(1))),
        ("preempted, then the grant stops", held(), Some(wait(1, WaitReason::AllocationInactive, "expired")), Some(&previous_preempted),
            (Suspended, Some("AllocationInactive"), "expired", None, &[], Some(1))),
        ("stopped by its grant", held(), Some(Decision::Stop { message: "allocation a1 is Expired".into() }), None,
            (Suspended, Some("AllocationInactive"), "is Expired", None, &[], None)),
        ("an admission not written keeps the line", held(), Some(admit.clone()), Some(&previous_preempted),
            (Preempted, Some("Preempted"), "preempted by lab/big", None, &[], None)),
        ("an admission not written, no line yet", held(), Some(admit), None,
            (Queued, None, "", None, &[], None)),
        ("completed where it ran", complete, None, None,
            (Finished, Some("Succeeded"), "", Some("b200"), &["n1", "n2"], None)),
        ("failed while held", failed, None, None,
            (Finished, Some("Failed"), "", None, &[], None)),
        ("cannot be one gang", uneven, None, None,
            (Invalid, Some("NotAGang"), "parallelism 4 differs from completions 8", None, &[], None)),
        ("started outside admission", started_outside, None, None,
            (Invalid, Some("NotHeld"), "started without the operator's admission", None, &[], None)),
    ];
    for (what, j, d, previous, (state, reason, message, pool, nodes, position)) in rows {
        let s = status(&j, d.as_ref(), previous).unwrap_or_else(|| panic!("{what}: no line"));
        assert_eq!(s.state, state, "{what}: {s:?}");
        assert_eq!(s.reason.as_deref(), reason, "{what}: {s:?}");
        let got = s.message.as_deref().unwrap_or_default();
        assert!(
            if message.is_empty() { got.is_empty() || state == Invalid } else { got.contains(message) },
            "{what}: message {got:?}, wanted {message:?}"
        );
        assert_eq!(s.pool.as_deref(), pool, "{what}");
        assert_eq!(s.nodes, nodes, "{what}");
        assert_eq!(s.queue_position, position, "{what}");
        assert_eq!(s.borrowed, reason == Some("Borrowed"), "{what}");
        if state != Invalid || reason == Some("NotHeld") {
            assert_eq!((s.devices, s.pods), (Some(32), Some(4)), "{what}: the gang's size");
        }
        let kept = s.preemption.is_some();
        assert_eq!(kept, state == Preempted, "{what}: who preempted it is kept while Preempted: {s:?}");
    }
}

#[test]
fn workloads_of_no_line() {
    let mut unlabelled = held();
    unlabelled.metadata.labels = None;
    assert_eq!(status(&unlabelled, None, None), None, "not ours");
    let mut deleting = held();
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:00Z".parse().unwrap()));
    assert_eq!(status(&deleting, None, None), None, "garbage collected with it");
    let mut child = held();
    child.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "name": "pair",
            "uid": "u", "controller": true}))
        .unwrap(),
    ]);
    assert_eq!(status(&child, None, None), None, "a JobSet's Job: the JobSet has the line");
}

#[test]
fn a_jobset_runs_once_each_replicated_jobs_jobs_are_ready() {
    let set = |ready: i32| -> JobSet {
        serde_json::from_value(json!({
            "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": "pair", "namespace": "lab", "uid": "u-2", "labels": {ALLOCATION_LABEL: "a1"},
                         "annotations": {ADMITTED_POOL: "b200", ADMITTED_NODES: "n1,n2"}},
            "spec": {"suspend": false, "replicatedJobs": [{"name": "workers", "replicas": 2, "template": {"spec": {
                "parallelism": 1, "completions": 1, "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "m", "image": "i", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}}}}]},
            "status": {"replicatedJobsStatus": [{"name": "workers", "ready": ready, "succeeded": 0}]},
        }))
        .unwrap()
    };
    assert_eq!(status(&set(1), None, None).unwrap().state, WorkloadState::Admitted);
    let running = status(&set(2), None, None).unwrap();
    assert_eq!((running.state, running.devices), (WorkloadState::Running, Some(16)));
    let o = object(&set(2)).unwrap();
    assert_eq!(o.metadata.name.as_deref(), Some("jobset-pair"));
    assert_eq!(o.spec.workload, WorkloadRef { kind: WorkloadRefKind::JobSet, name: "pair".into() });
    assert_eq!(o.metadata.labels.as_ref().unwrap()[JOBSET_LABEL], "pair");
}

#[test]
fn a_lines_object_is_named_by_kind_owned_by_its_workload_and_fits_every_limit() {
    let o = object(&held()).unwrap();
    assert_eq!(o.metadata.name.as_deref(), Some("job-train"));
    assert_eq!(o.metadata.namespace.as_deref(), Some("lab"));
    assert_eq!(o.spec.allocation, "a1");
    let owner = &o.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()), ("Job", "train", "u-1"));
    assert_eq!(owner.controller, None, "an owner, not a controller");
    assert_eq!(owner.block_owner_deletion, None);
    let labels = o.metadata.labels.unwrap();
    assert_eq!((labels[JOB_LABEL].as_str(), labels[MANAGED_BY.0].as_str()), ("train", MANAGED_BY.1));
    assert_ne!(name(GangKind::Job, "x"), name(GangKind::JobSet, "x"), "a Job and a JobSet of one name");

    let long = format!("{}.{}", "a".repeat(200), "b-".repeat(26) + "c");
    assert_eq!(long.len(), 254);
    let n = name(GangKind::JobSet, &long);
    assert!(n.len() <= MAX_NAME, "{}", n.len());
    assert!(n.starts_with("jobset-aaaa"), "{n}");
    assert_ne!(n, name(GangKind::JobSet, &format!("{long}x")), "the hash tells them apart");
    let re = regex::Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$").unwrap();
    assert!(re.is_match(&n), "a DNS subdomain: {n}");
    let value = &labels_of(&long)[JOBSET_LABEL];
    assert!(value.len() <= MAX_LABEL_VALUE, "{value}");
    assert!(regex::Regex::new(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$").unwrap().is_match(value), "{value}");
    // Cut where a '-' or '.' would end the head: trimmed.
    let dotted = format!("{}.-x{}", "a".repeat(44), "y".repeat(30));
    let value = &labels_of(&dotted)[JOBSET_LABEL];
    assert!(!value.contains(".-"), "{value}");
}

fn labels_of(workload: &str) -> BTreeMap<String, String> {
    labels(GangKind::JobSet, workload)
}
