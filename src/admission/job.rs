//! A batch Job labelled `sovereign.ai/allocation`, adapted into the core and
//! out of it. The chart's admission policy holds such a Job (suspended) from
//! its creation: held, it is a waiting gang ([`gang`]); started by the
//! operator, it holds devices, as the annotations written with its start say
//! ([`holding`]). A decision about its gang is a write to the Job with its
//! Events ([`action`]): an admission pins the pod template to the pool (node
//! labels, tolerations, the planned nodes) and unsuspends it; a preemption,
//! a reclaim or a stopped grant suspends it again (its pods go, it waits
//! again).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::decide::{Decision, WaitReason};
use super::gang::{Gang, GangKey, GangState, Holding, TopologyRequest};
use crate::api::TopologyMode;
use crate::events::Note;
use crate::snapshot::{ALLOCATION_LABEL, JOB_LABEL, POOL_LABEL, RESERVED_FOR};
use crate::workload::kinds::{WorkloadError, WorkloadGang, read_job};

/// The pool the operator admitted the Job to (present while it holds devices).
pub const ADMITTED_POOL: &str = "sovereign.ai/admitted-pool";
/// The planned node of each pod, comma-separated.
pub const ADMITTED_NODES: &str = "sovereign.ai/admitted-nodes";
/// When it was admitted (RFC 3339).
pub const ADMITTED_AT: &str = "sovereign.ai/admitted-at";
/// "true": admitted beyond its allocation's grant, on lent capacity.
pub const BORROWED: &str = "sovereign.ai/borrowed";
/// Neither preempted nor reclaimed before this time (RFC 3339).
pub const PROTECTED_UNTIL: &str = "sovereign.ai/protected-until";
/// The annotations of an admission, all dropped when the Job is suspended again.
const ADMISSION_ANNOTATIONS: [&str; 5] = [ADMITTED_POOL, ADMITTED_NODES, ADMITTED_AT, BORROWED, PROTECTED_UNTIL];

pub fn key(job: &Job) -> GangKey {
    GangKey::job(job.namespace().unwrap_or_default(), job.name_any())
}

/// Complete or Failed: its pods hold nothing any more.
pub fn finished(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True"))
}

pub fn suspended(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false)
}

/// Whether the Job asks for admission now: labelled, held, not finished,
/// not being deleted.
pub fn wants_admission(job: &Job) -> bool {
    job.labels().contains_key(ALLOCATION_LABEL)
        && suspended(job)
        && !finished(job)
        && job.metadata.deletion_timestamp.is_none()
}

/// What a Job the operator started holds: its annotations, while it runs.
pub fn holding(job: &Job) -> Option<Holding> {
    if suspended(job) || finished(job) {
        return None;
    }
    let notes = job.metadata.annotations.as_ref()?;
    let time = |k: &str| notes.get(k).and_then(|t| t.parse::<Timestamp>().ok());
    Some(Holding {
        pool: notes.get(ADMITTED_POOL)?.clone(),
        nodes: notes.get(ADMITTED_NODES).map(|n| n.split(',').map(String::from).collect()).unwrap_or_default(),
        borrowed: notes.get(BORROWED).is_some_and(|b| b == "true"),
        admitted_at: time(ADMITTED_AT),
        protected_until: time(PROTECTED_UNTIL),
    })
}

/// The Job's gang, if it holds devices or waits for them. `pools` gives the
/// pools the gang may use in order (those it names, else its allocation's,
/// of the resource its pods ask for). `Err`: a labelled Job that cannot be
/// one gang (the text says what to change).
pub fn gang(
    job: &Job,
    now: Timestamp,
    pools: &dyn Fn(&WorkloadGang) -> Vec<String>,
) -> Result<Option<Gang>, WorkloadError> {
    let Some(w) = read_job(job)? else { return Ok(None) };
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let state = match holding(job) {
        Some(h) => GangState::Holding(h),
        None if wants_admission(job) => GangState::Waiting { restarting: false, displaced: false },
        // Running without the operator's admission (started before the chart
        // held it), or finished: not a gang.
        None => return Ok(None),
    };
    Ok(Some(Gang {
        key: key(job),
        allocation: w.allocation.clone(),
        pools: pools(&w),
        workers: w.pods(),
        per_worker: w.members.first().map(|m| m.per_pod).unwrap_or(0),
        topology: w
            .topology
            .as_ref()
            .map(|t| TopologyRequest { key: t.key.clone(), required: t.mode == TopologyMode::Required }),
        priority: w.priority,
        preemptible: true,
        queued_since: job.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now),
        state,
    }))
}

/// The pool an admitted Job is pinned to.
#[derive(Clone, Debug)]
pub struct Pin<'a> {
    pub pool: &'a str,
    /// The pool's node labels (its nodeSelector's matchLabels).
    pub node_labels: &'a BTreeMap<String, String>,
    pub tolerations: &'a [Toleration],
    /// The allocation holds a dedicated grant in the pool: its reserved nodes' taint is tolerated.
    pub dedicated: bool,
}

/// What a decision writes to a Job.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Server-side apply of this body: the pod template pinned, the admission
    /// annotations, `suspend: false`.
    Admit(Value),
    /// JSON merge patch: `suspend: true`, the admission annotations removed.
    Suspend(Value),
    /// Nothing to write but Events.
    Announce,
}

/// A write to a Job for a decision, with its Events.
#[derive(Clone, Debug, PartialEq)]
pub struct JobChange {
    pub action: Action,
    pub events: Vec<Note>,
}

/// What a decision writes to the Job, or None when it changes nothing. A
/// waiting Job gets its `Queued` Event only when `announce_wait` (the loop
/// throttles them); `pin` is the admitted pool's (None: the pool is gone,
/// nothing is written).
pub fn action(
    job: &Job,
    d: &Decision,
    now: Timestamp,
    pin: Option<&Pin<'_>>,
    announce_wait: bool,
) -> Option<JobChange> {
    match d {
        Decision::Admit { pool, nodes, borrowed, protected_until } => {
            let pin = pin.filter(|p| p.pool == pool)?;
            let body = admit_body(job, pin, nodes, *borrowed, *protected_until, now);
            let on_borrowed = if *borrowed { " on borrowed capacity" } else { "" };
            let message = format!("admitted to pool {pool}{on_borrowed} on nodes {}", nodes.join(", "));
            let events = vec![Note::normal("Admitted", message)];
            Some(JobChange { action: Action::Admit(body), events })
        }
        Decision::Wait { why, message, .. } => {
            // As for a project: Preempting when it chose victims, Unsatisfiable
            // (a warning) when it can never fit, else Queued.
            let warning = *why == WaitReason::Unsatisfiable;
            let reason = match why {
                WaitReason::Unsatisfiable | WaitReason::Preempting => why.as_str(),
                WaitReason::Waiting | WaitReason::AllocationInactive => "Queued",
            };
            let events = vec![Note::new(warning, reason, message.clone())];
            announce_wait.then_some(JobChange { action: Action::Announce, events })
        }
        Decision::Stop { message } => holding(job).map(|_| JobChange {
            action: Action::Suspend(suspend_body(job)),
            events: vec![Note::warning("AllocationInactive", message.clone())],
        }),
        Decision::Evict { reclaimed, message, .. } => {
            let reason = if *reclaimed { "Reclaimed" } else { "Preempted" };
            holding(job).map(|_| JobChange {
                action: Action::Suspend(suspend_body(job)),
                events: vec![Note::warning(reason, message.clone())],
            })
        }
    }
}

/// The admission, by server-side apply (the operator's field manager): the
/// pod template's node labels, tolerations and required nodes, its pods'
/// labels (allocation and pool, for the ledger and the accounting; the Job's
/// name, so they count as its gang), the admission annotations, and
/// `suspend: false`. Guarded by the resourceVersion it was decided on.
fn admit_body(
    job: &Job,
    pin: &Pin<'_>,
    nodes: &[String],
    borrowed: bool,
    protected_until: Option<Timestamp>,
    now: Timestamp,
) -> Value {
    let allocation = job.labels().get(ALLOCATION_LABEL).cloned().unwrap_or_default();
    // Tolerations are one atomic list: the template's own, then the pool's.
    let template = job.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let mut tolerations: Vec<Toleration> = template.and_then(|s| s.tolerations.clone()).unwrap_or_default();
    let mut wanted: Vec<Toleration> = pin.tolerations.to_vec();
    if pin.dedicated {
        wanted.push(Toleration {
            key: Some(RESERVED_FOR.into()),
            operator: Some("Equal".into()),
            value: Some(allocation.clone()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
    for t in wanted {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    let mut unique: Vec<&String> = nodes.iter().collect();
    unique.sort();
    unique.dedup();
    let terms: Vec<Value> = unique
        .iter()
        .map(|n| json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": [n]}]}))
        .collect();
    let mut annotations = json!({
        ADMITTED_POOL: pin.pool,
        ADMITTED_NODES: nodes.join(","),
        ADMITTED_AT: now.to_string(),
    });
    if borrowed {
        annotations[BORROWED] = json!("true");
    }
    if let Some(t) = protected_until {
        annotations[PROTECTED_UNTIL] = json!(t.to_string());
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job.name_any(),
            "namespace": job.namespace(),
            "resourceVersion": job.resource_version(),
            "annotations": annotations,
        },
        "spec": {
            "suspend": false,
            "template": {
                "metadata": {"labels": {ALLOCATION_LABEL: allocation, POOL_LABEL: pin.pool, JOB_LABEL: job.name_any()}},
                "spec": {
                    "nodeSelector": pin.node_labels,
                    "tolerations": tolerations,
                    // Pods go to the planned nodes (the scheduler still binds and
                    // checks): one term per node, as a node field selector names one.
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": terms,
                    }}},
                },
            },
        },
    })
}

/// Suspended again, by JSON merge patch guarded by the resourceVersion it was
/// decided on: the Job controller deletes its pods and it waits again. The
/// pod template is left as pinned (a running Job's template cannot change);
/// the next admission pins it anew.
fn suspend_body(job: &Job) -> Value {
    let annotations: serde_json::Map<String, Value> =
        ADMISSION_ANNOTATIONS.iter().map(|k| (k.to_string(), Value::Null)).collect();
    json!({
        "metadata": {"resourceVersion": job.resource_version(), "annotations": annotations},
        "spec": {"suspend": true},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(suspend: bool, annotations: Value, conditions: Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "train", "namespace": "lab", "resourceVersion": "7",
                         "creationTimestamp": "2026-01-01T00:00:00Z",
                         "labels": {ALLOCATION_LABEL: "a1"}, "annotations": annotations},
            "spec": {"suspend": suspend, "parallelism": 4, "completions": 4, "completionMode": "Indexed",
                     "template": {"spec": {"restartPolicy": "Never",
                        "tolerations": [{"key": "mine", "operator": "Exists"}],
                        "containers": [{"name": "m", "image": "i",
                            "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}},
            "status": {"conditions": conditions},
        }))
        .expect("a job")
    }

    fn pools(_: &WorkloadGang) -> Vec<String> {
        vec!["h200".into(), "b200".into()]
    }

    fn now() -> Timestamp {
        "2026-01-01T01:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_held_job_waits_an_admitted_one_holds_and_a_finished_one_is_no_gang() {
        let held = gang(&job(true, json!({}), json!([])), now(), &pools).unwrap().unwrap();
        assert_eq!(held.key, GangKey::job("lab", "train"));
        assert_eq!(held.key.to_string(), "Job lab/train");
        assert_eq!((held.workers, held.per_worker, held.devices()), (4, 8, 32));
        assert_eq!(held.pools, ["h200", "b200"]);
        assert_eq!(held.state, GangState::Waiting { restarting: false, displaced: false });

        let notes = json!({ADMITTED_POOL: "b200", ADMITTED_NODES: "n1,n2,n3,n4", ADMITTED_AT: "2026-01-01T00:30:00Z"});
        let admitted = gang(&job(false, notes.clone(), json!([])), now(), &pools).unwrap().unwrap();
        let h = admitted.holding().expect("it holds devices");
        assert_eq!((h.pool.as_str(), h.nodes.len(), h.borrowed), ("b200", 4, false));
        assert_eq!(h.admitted_at, Some("2026-01-01T00:30:00Z".parse().unwrap()));

        let done = json!([{"type": "Complete", "status": "True"}]);
        assert_eq!(gang(&job(false, notes, done), now(), &pools).unwrap(), None, "a finished Job holds nothing");
        assert_eq!(gang(&job(false, json!({}), json!([])), now(), &pools).unwrap(), None, "not started by us");
    }

    #[test]
    fn an_admission_pins_the_template_and_an_eviction_suspends_and_forgets_it() {
        let labels = BTreeMap::from([("gpu".to_string(), "b200".to_string())]);
        let pool_tol =
            vec![Toleration { key: Some("b200".into()), operator: Some("Exists".into()), ..Default::default() }];
        let pin = Pin { pool: "b200", node_labels: &labels, tolerations: &pool_tol, dedicated: false };
        let d = Decision::Admit {
            pool: "b200".into(),
            nodes: vec!["n2".into(), "n1".into(), "n1".into()],
            borrowed: true,
            protected_until: None,
        };
        let held = job(true, json!({}), json!([]));
        let change = action(&held, &d, now(), Some(&pin), false).unwrap();
        let Action::Admit(body) = &change.action else { panic!("{change:?}") };
        assert_eq!(body["metadata"]["resourceVersion"], "7", "guarded by the version it was decided on");
        assert_eq!(body["spec"]["suspend"], false);
        let spec = &body["spec"]["template"]["spec"];
        assert_eq!(spec["nodeSelector"], json!({"gpu": "b200"}));
        assert_eq!(spec["tolerations"].as_array().unwrap().len(), 2, "the template's own and the pool's");
        let terms =
            &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        let pinned: Vec<&Value> = terms.as_array().unwrap().iter().map(|t| &t["matchFields"][0]["values"]).collect();
        assert_eq!(pinned, [&json!(["n1"]), &json!(["n2"])], "one term per planned node");
        assert_eq!(body["spec"]["template"]["metadata"]["labels"][POOL_LABEL], "b200");
        assert_eq!(body["metadata"]["annotations"][ADMITTED_NODES], "n2,n1,n1");
        assert_eq!(body["metadata"]["annotations"][BORROWED], "true");
        assert_eq!(change.events[0].reason, "Admitted");
        assert!(change.events[0].message.contains("pool b200 on borrowed capacity"), "{:?}", change.events);

        let other = Pin { pool: "h200", ..pin.clone() };
        assert_eq!(action(&held, &d, now(), Some(&other), false), None, "never pinned to another pool");

        let running = job(false, json!({ADMITTED_POOL: "b200", ADMITTED_NODES: "n1"}), json!([]));
        let evict = Decision::Evict {
            by: GangKey::model_project("lab", "big"),
            pool: "b200".into(),
            reclaimed: false,
            message: "m".into(),
        };
        let change = action(&running, &evict, now(), None, false).unwrap();
        let Action::Suspend(body) = &change.action else { panic!("{change:?}") };
        assert_eq!(body["spec"]["suspend"], true);
        assert_eq!(body["metadata"]["annotations"][ADMITTED_POOL], Value::Null);
        assert_eq!(change.events[0].reason, "Preempted");

        let wait =
            Decision::Wait { position: 1, why: WaitReason::Waiting, message: "needs 32".into(), victims: vec![] };
        assert_eq!(action(&held, &wait, now(), None, false), None, "a throttled wait writes nothing");
        let change = action(&held, &wait, now(), None, true).unwrap();
        assert_eq!((change.action, change.events[0].reason), (Action::Announce, "Queued"));
    }
}
