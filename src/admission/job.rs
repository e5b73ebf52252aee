//! A workload labelled `sovereign.ai/allocation` that the operator holds and
//! starts, a batch Job or a JobSet (its own, or the one a Kubeflow TrainJob
//! makes), adapted into the core and out of it ([`Workload`] is what differs
//! between the kinds). The chart's admission policy holds such a workload
//! (suspended) from its creation: held, it is a waiting gang ([`gang`]);
//! started by the operator, it holds devices, as the annotations written with
//! its start say ([`holding`]). A decision about its gang is a write to the
//! workload with its Events ([`action`]): an admission pins its pod templates
//! to the pool (node labels, tolerations, the topology domain, a Job's planned
//! nodes; a JobSet's pods are gated, and pinned to their nodes one by one as
//! they are made, [`super::placement`]) and unsuspends it; a preemption, a reclaim or a stopped grant
//! suspends it again (its pods go, it waits again).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PodTemplateSpec, Toleration};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::decide::{Decision, WaitReason};
use super::gang::{Gang, GangKey, GangKind, GangState, Holding, TopologyRequest};
use super::placement::PLACEMENT_GATE;
use crate::api::TopologyMode;
use crate::events::Note;
use crate::snapshot::{ALLOCATION_LABEL, JOB_LABEL, JOBSET_LABEL, POOL_LABEL, RESERVED_FOR};
use crate::workload::kinds::{JobSet, WorkloadError, WorkloadGang, read_job, read_jobset};

/// The pool the operator admitted the workload to (present while it holds devices).
pub const ADMITTED_POOL: &str = "sovereign.ai/admitted-pool";
/// The planned node of each pod, comma-separated.
pub const ADMITTED_NODES: &str = "sovereign.ai/admitted-nodes";
/// When it was admitted (RFC 3339).
pub const ADMITTED_AT: &str = "sovereign.ai/admitted-at";
/// "true": admitted beyond its allocation's grant, on lent capacity.
pub const BORROWED: &str = "sovereign.ai/borrowed";
/// Neither preempted nor reclaimed before this time (RFC 3339).
pub const PROTECTED_UNTIL: &str = "sovereign.ai/protected-until";
/// The annotations of an admission, all dropped when the workload is suspended again.
const ADMISSION_ANNOTATIONS: [&str; 5] = [ADMITTED_POOL, ADMITTED_NODES, ADMITTED_AT, BORROWED, PROTECTED_UNTIL];

/// How an admission pins a workload's pods to the planned nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePins {
    /// The pod template requires the planned nodes (node affinity): a Job's
    /// template may take it while the Job is suspended.
    Template,
    /// The pod template carries [`PLACEMENT_GATE`]: the pods are created
    /// gated and the operator pins each to its node as it ungates it
    /// ([`super::placement`]). A JobSet's pod templates may change only in
    /// their labels, annotations, node selector, tolerations and scheduling
    /// gates while suspended (the JobSet webhook's rule, and what the JobSet
    /// controller copies to its Jobs when it resumes them).
    Gate,
}

/// What differs between the kinds of workload the operator holds and starts.
pub trait Workload:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::Serialize
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    const GANG: GangKind;
    /// The pod template label, set on admission, that names the workload on
    /// its pods (they count in its gang, and the chart's pod policy lets them in).
    const POD_LABEL: &'static str;
    /// How an admission pins its pods to the planned nodes.
    const NODE_PINS: NodePins;
    fn suspended(&self) -> bool;
    /// What the loop's writes set (and `plan` plays in memory).
    fn set_suspended(&mut self, suspend: bool);
    /// How it ended, once it did: `Succeeded` (Complete) or `Failed`.
    fn outcome(&self) -> Option<&'static str>;
    /// Complete or Failed: its pods hold nothing any more.
    fn finished(&self) -> bool {
        self.outcome().is_some()
    }
    /// Every pod of its gang is ready (or done), as its controller counts them.
    fn all_running(&self) -> bool;
    /// Its gang's shape; `None` without the label.
    fn read(&self) -> Result<Option<WorkloadGang>, WorkloadError>;
    /// Another workload runs it (a Job of a JobSet follows its JobSet's
    /// suspend): then it is no gang of its own.
    fn run_by_another(&self) -> bool {
        false
    }
    /// The `spec` of an admission: every pod template as `pin` makes it, and `suspend: false`.
    fn admitted_spec(&self, pin: &dyn Fn(&PodTemplateSpec) -> Value) -> Value;
}

impl Workload for Job {
    const GANG: GangKind = GangKind::Job;
    const POD_LABEL: &'static str = JOB_LABEL;
    const NODE_PINS: NodePins = NodePins::Template;

    fn suspended(&self) -> bool {
        self.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false)
    }

    fn set_suspended(&mut self, suspend: bool) {
        self.spec.get_or_insert_with(Default::default).suspend = Some(suspend);
    }

    fn outcome(&self) -> Option<&'static str> {
        let conditions = self.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
        conditions.iter().find_map(|c| terminal(&c.type_, &c.status))
    }

    fn all_running(&self) -> bool {
        let want = self.spec.as_ref().and_then(|s| s.parallelism).unwrap_or(1);
        let status = self.status.as_ref();
        let done = status.map(|s| s.ready.unwrap_or(0) + s.succeeded.unwrap_or(0)).unwrap_or(0);
        want > 0 && done >= want
    }

    fn read(&self) -> Result<Option<WorkloadGang>, WorkloadError> {
        read_job(self)
    }

    fn run_by_another(&self) -> bool {
        self.owner_references().iter().any(|o| o.controller == Some(true) && o.kind == "JobSet")
    }

    fn admitted_spec(&self, pin: &dyn Fn(&PodTemplateSpec) -> Value) -> Value {
        let template = self.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
        json!({"suspend": false, "template": pin(&template)})
    }
}

impl Workload for JobSet {
    const GANG: GangKind = GangKind::JobSet;
    const POD_LABEL: &'static str = JOBSET_LABEL;
    const NODE_PINS: NodePins = NodePins::Gate;

    fn suspended(&self) -> bool {
        self.spec.suspend.unwrap_or(false)
    }

    fn set_suspended(&mut self, suspend: bool) {
        self.spec.suspend = Some(suspend);
    }

    fn outcome(&self) -> Option<&'static str> {
        let conditions = self.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
        conditions.iter().find_map(|c| terminal(&c.type_, &c.status))
    }

    /// Every replicated job's Jobs ready (all their pods ready or done).
    fn all_running(&self) -> bool {
        let want: i32 = self.spec.replicated_jobs.iter().map(|rj| rj.replicas.unwrap_or(1)).sum();
        let status = self.status.as_ref().map(|s| s.replicated_jobs_status.as_slice()).unwrap_or_default();
        let done: i32 = status.iter().map(|r| r.ready + r.succeeded).sum();
        want > 0 && done >= want
    }

    fn read(&self) -> Result<Option<WorkloadGang>, WorkloadError> {
        read_jobset(self)
    }

    /// `replicatedJobs` is a list keyed by name: the apply names each and
    /// touches only its pod template's pinned fields.
    fn admitted_spec(&self, pin: &dyn Fn(&PodTemplateSpec) -> Value) -> Value {
        let replicated: Vec<Value> = self
            .spec
            .replicated_jobs
            .iter()
            .map(|rj| {
                let template = rj.template.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
                json!({"name": rj.name, "template": {"spec": {"template": pin(&template)}}})
            })
            .collect();
        json!({"suspend": false, "replicatedJobs": replicated})
    }
}

/// A Job's `Complete`/`Failed`, a JobSet's `Completed`/`Failed`, when true:
/// `Succeeded` or `Failed`.
fn terminal(type_: &str, status: &str) -> Option<&'static str> {
    match (type_, status) {
        ("Complete" | "Completed", "True") => Some("Succeeded"),
        ("Failed", "True") => Some("Failed"),
        _ => None,
    }
}

pub fn key<W: Workload>(w: &W) -> GangKey {
    GangKey { kind: W::GANG, namespace: w.namespace().unwrap_or_default(), name: w.name_any() }
}

/// Whether the workload asks for admission now: labelled, held, not
/// finished, not being deleted, not run by another workload.
pub fn wants_admission<W: Workload>(w: &W) -> bool {
    w.labels().contains_key(ALLOCATION_LABEL)
        && w.suspended()
        && !w.finished()
        && w.meta().deletion_timestamp.is_none()
        && !w.run_by_another()
}

/// Plays an admission or a suspension on the object in memory (`plan`): its
/// suspend and its admission annotations, as the loop's writes leave them.
pub fn play<W: Workload>(w: &mut W, admitted: Option<(&str, &[String], bool, Timestamp)>) {
    let notes = w.meta_mut().annotations.get_or_insert_with(Default::default);
    for k in ADMISSION_ANNOTATIONS {
        notes.remove(k);
    }
    if let Some((pool, nodes, borrowed, at)) = admitted {
        notes.insert(ADMITTED_POOL.into(), pool.into());
        notes.insert(ADMITTED_NODES.into(), nodes.join(","));
        notes.insert(ADMITTED_AT.into(), at.to_string());
        if borrowed {
            notes.insert(BORROWED.into(), "true".into());
        }
    }
    w.set_suspended(admitted.is_none());
}

/// What a workload the operator started holds: its annotations, while it runs.
pub fn holding<W: Workload>(w: &W) -> Option<Holding> {
    if w.suspended() || w.finished() {
        return None;
    }
    let notes = w.meta().annotations.as_ref()?;
    let time = |k: &str| notes.get(k).and_then(|t| t.parse::<Timestamp>().ok());
    Some(Holding {
        pool: notes.get(ADMITTED_POOL)?.clone(),
        nodes: notes.get(ADMITTED_NODES).map(|n| n.split(',').map(String::from).collect()).unwrap_or_default(),
        borrowed: notes.get(BORROWED).is_some_and(|b| b == "true"),
        admitted_at: time(ADMITTED_AT),
        protected_until: time(PROTECTED_UNTIL),
    })
}

/// The workload's gang, if it holds devices or waits for them. `pools` gives
/// the pools the gang may use in order (those it names, else its
/// allocation's, of the resource its pods ask for:
/// [`crate::workload::kinds::resolve_pools`]). `Err`: a labelled workload
/// that cannot be one gang (the text says what to change).
pub fn gang<W: Workload>(
    w: &W,
    now: Timestamp,
    pools: &dyn Fn(&WorkloadGang) -> Result<Vec<String>, WorkloadError>,
) -> Result<Option<Gang>, WorkloadError> {
    let Some(shape) = w.read()? else { return Ok(None) };
    if w.meta().deletion_timestamp.is_some() || w.run_by_another() {
        return Ok(None);
    }
    let state = match holding(w) {
        Some(h) => GangState::Holding(h),
        None if wants_admission(w) => GangState::Waiting { restarting: false, displaced: false },
        // Running without the operator's admission (started before the chart
        // held it), or finished: not a gang.
        None => return Ok(None),
    };
    // A running workload keeps its gang (it holds devices) whatever its
    // annotation says now; a held one with a list it cannot use is refused.
    let pools = match (pools(&shape), &state) {
        (Ok(p), _) => p,
        (Err(_), GangState::Holding(h)) => vec![h.pool.clone()],
        (Err(e), _) => return Err(e),
    };
    Ok(Some(Gang {
        key: key(w),
        allocation: shape.allocation.clone(),
        pools,
        workers: shape.workers(),
        per_worker: shape.per_worker(),
        topology: shape
            .topology
            .as_ref()
            .map(|t| TopologyRequest { key: t.key.clone(), required: t.mode == TopologyMode::Required }),
        priority: shape.priority,
        preemptible: true,
        queued_since: w.meta().creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now),
        state,
    }))
}

/// The pool an admitted workload is pinned to.
#[derive(Clone, Debug)]
pub struct Pin<'a> {
    pub pool: &'a str,
    /// The pool's node labels (its nodeSelector's matchLabels).
    pub node_labels: &'a BTreeMap<String, String>,
    pub tolerations: &'a [Toleration],
    /// The allocation holds a dedicated grant in the pool: its reserved nodes' taint is tolerated.
    pub dedicated: bool,
    /// The topology domain (node label key and value) of the planned nodes,
    /// when the gang requires one.
    pub domain: Option<(String, String)>,
}

/// What a decision writes to a workload.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Server-side apply of this body: the pod templates pinned, the admission
    /// annotations, `suspend: false`.
    Admit(Value),
    /// JSON merge patch: `suspend: true`, the admission annotations removed.
    Suspend(Value),
    /// Nothing to write but Events.
    Announce,
}

/// A write to a workload for a decision, with its Events.
#[derive(Clone, Debug, PartialEq)]
pub struct JobChange {
    pub action: Action,
    pub events: Vec<Note>,
}

/// What a decision writes to the workload, or None when it changes nothing.
/// A waiting workload gets its `Queued` Event only when `announce_wait` (the
/// loop throttles them); `pin` is the admitted pool's (None: the pool is
/// gone, nothing is written).
pub fn action<W: Workload>(
    w: &W,
    d: &Decision,
    now: Timestamp,
    pin: Option<&Pin<'_>>,
    announce_wait: bool,
) -> Option<JobChange> {
    match d {
        Decision::Admit { pool, nodes, borrowed, protected_until } => {
            let pin = pin.filter(|p| p.pool == pool)?;
            let body = admit_body(w, pin, nodes, *borrowed, *protected_until, now);
            let on_borrowed = if *borrowed { " on borrowed capacity" } else { "" };
            let mut message = format!("admitted to pool {pool}{on_borrowed} on nodes {}", nodes.join(", "));
            if let Some((k, v)) = &pin.domain {
                message.push_str(&format!(" (all in {k}={v})"));
            }
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
        Decision::Stop { message } => holding(w).map(|_| JobChange {
            action: Action::Suspend(suspend_body(w)),
            events: vec![Note::warning("AllocationInactive", message.clone())],
        }),
        Decision::Evict { reclaimed, message, .. } => {
            let reason = if *reclaimed { "Reclaimed" } else { "Preempted" };
            holding(w).map(|_| JobChange {
                action: Action::Suspend(suspend_body(w)),
                events: vec![Note::warning(reason, message.clone())],
            })
        }
    }
}

/// The admission, by server-side apply (the operator's field manager): each
/// pod template's node labels (with the topology domain), tolerations and
/// required nodes (a JobSet's: the placement gate, see [`NodePins`]); its pods' labels (allocation and
/// pool, for the ledger and the accounting; the workload's name, so they
/// count as its gang); the admission annotations; and `suspend: false`.
/// Guarded by the resourceVersion it was decided on.
fn admit_body<W: Workload>(
    w: &W,
    pin: &Pin<'_>,
    nodes: &[String],
    borrowed: bool,
    protected_until: Option<Timestamp>,
    now: Timestamp,
) -> Value {
    let allocation = w.labels().get(ALLOCATION_LABEL).cloned().unwrap_or_default();
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
    let mut node_selector = pin.node_labels.clone();
    if let Some((k, v)) = &pin.domain {
        node_selector.insert(k.clone(), v.clone());
    }
    let mut unique: Vec<&String> = nodes.iter().collect();
    unique.sort();
    unique.dedup();
    let terms: Vec<Value> = unique
        .iter()
        .map(|n| json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": [n]}]}))
        .collect();
    let labels = json!({ALLOCATION_LABEL: allocation, POOL_LABEL: pin.pool, W::POD_LABEL: w.name_any()});
    let pinned = |template: &PodTemplateSpec| {
        // Tolerations are one atomic list: the template's own, then the pool's.
        let mut tolerations: Vec<Toleration> =
            template.spec.as_ref().and_then(|s| s.tolerations.clone()).unwrap_or_default();
        for t in &wanted {
            if !tolerations.contains(t) {
                tolerations.push(t.clone());
            }
        }
        let mut spec = json!({"nodeSelector": node_selector, "tolerations": tolerations});
        match W::NODE_PINS {
            // Pods go to the planned nodes (the scheduler still binds and
            // checks): one term per node, as a node field selector names one.
            NodePins::Template => {
                spec["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}});
            }
            // A list keyed by name: the pod template's own gates stay.
            NodePins::Gate => spec["schedulingGates"] = json!([{"name": PLACEMENT_GATE}]),
        }
        json!({"metadata": {"labels": labels}, "spec": spec})
    };
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
        "apiVersion": W::api_version(&()),
        "kind": W::kind(&()),
        "metadata": {
            "name": w.name_any(),
            "namespace": w.namespace(),
            "resourceVersion": w.resource_version(),
            "annotations": annotations,
        },
        "spec": w.admitted_spec(&pinned),
    })
}

/// Suspended again, by JSON merge patch guarded by the resourceVersion it was
/// decided on: the Job controller (for a JobSet, the JobSet controller)
/// deletes its pods and it waits again. The pod templates are left as pinned
/// (a running Job's template cannot change; a JobSet's keep the placement
/// gate, so the pods of its next admission are gated too); the next
/// admission pins them anew.
fn suspend_body<W: Workload>(w: &W) -> Value {
    let annotations: serde_json::Map<String, Value> =
        ADMISSION_ANNOTATIONS.iter().map(|k| (k.to_string(), Value::Null)).collect();
    json!({
        "metadata": {"resourceVersion": w.resource_version(), "annotations": annotations},
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

    fn pools(_: &WorkloadGang) -> Result<Vec<String>, WorkloadError> {
        Ok(vec!["h200".into(), "b200".into()])
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
        let pin = Pin { pool: "b200", node_labels: &labels, tolerations: &pool_tol, dedicated: false, domain: None };
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
        assert_eq!(spec["schedulingGates"], Value::Null, "a Job's pods are not gated: its template names the nodes");
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

    fn jobset(suspend: bool, owner: Value) -> JobSet {
        let template = |gpus: &str| {
            json!({"spec": {"parallelism": 2, "completions": 2, "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "m", "image": "i", "resources": {"limits": {"nvidia.com/gpu": gpus}}}]}}}})
        };
        serde_json::from_value(json!({
            "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": "pair", "namespace": "lab", "resourceVersion": "3",
                         "creationTimestamp": "2026-01-01T00:00:00Z", "ownerReferences": owner,
                         "labels": {ALLOCATION_LABEL: "a1"},
                         "annotations": {"sovereign.ai/topology-key": "rack", "sovereign.ai/topology-mode": "Required"}},
            "spec": {"suspend": suspend, "replicatedJobs": [
                {"name": "driver", "template": template("0")},
                {"name": "workers", "replicas": 2, "template": template("8")}]},
        }))
        .expect("a jobset")
    }

    #[test]
    fn a_jobset_is_one_gang_of_its_device_pods_pinned_to_the_pool_and_domain_and_gated_for_its_nodes() {
        let held = jobset(true, json!([]));
        let g = gang(&held, now(), &pools).unwrap().unwrap();
        assert_eq!(g.key, GangKey::jobset("lab", "pair"));
        assert_eq!(g.key.to_string(), "JobSet lab/pair");
        assert_eq!((g.workers, g.per_worker), (4, 8), "2 replicas x 2 pods of 8; the driver asks for none");
        assert_eq!(g.topology, Some(TopologyRequest { key: "rack".into(), required: true }));
        assert!(wants_admission(&held));

        let labels = BTreeMap::from([("gpu".to_string(), "b200".to_string())]);
        let domain = Some(("rack".to_string(), "r1".to_string()));
        let pin = Pin { pool: "b200", node_labels: &labels, tolerations: &[], dedicated: false, domain };
        let nodes: Vec<String> = ["n1", "n1", "n2", "n2"].map(String::from).to_vec();
        let d = Decision::Admit { pool: "b200".into(), nodes, borrowed: false, protected_until: None };
        let change = action(&held, &d, now(), Some(&pin), false).unwrap();
        let Action::Admit(body) = &change.action else { panic!("{change:?}") };
        assert_eq!(
            (body["apiVersion"].as_str(), body["kind"].as_str()),
            (Some("jobset.x-k8s.io/v1alpha2"), Some("JobSet"))
        );
        assert_eq!(body["spec"]["suspend"], false);
        let replicated = body["spec"]["replicatedJobs"].as_array().unwrap();
        assert_eq!(replicated.len(), 2, "every replicated job, named (a list keyed by name)");
        for (rj, name) in replicated.iter().zip(["driver", "workers"]) {
            assert_eq!(rj["name"], name);
            let t = &rj["template"]["spec"]["template"];
            assert_eq!(t["spec"]["nodeSelector"], json!({"gpu": "b200", "rack": "r1"}), "the pool and the one rack");
            assert_eq!(t["spec"]["affinity"], Value::Null, "a JobSet's affinity cannot change while suspended");
            assert_eq!(
                t["spec"]["schedulingGates"],
                json!([{"name": PLACEMENT_GATE}]),
                "its pods are pinned as they come"
            );
            assert_eq!(t["metadata"]["labels"][JOBSET_LABEL], "pair");
            assert_eq!(t["metadata"]["labels"][POOL_LABEL], "b200");
        }
        assert!(change.events[0].message.ends_with("(all in rack=r1)"), "{:?}", change.events);

        let mut running = held.clone();
        play(&mut running, Some(("b200", &["n1".to_string()], false, now())));
        assert_eq!(holding(&running).map(|h| h.pool), Some("b200".into()));
        let evict = Decision::Evict {
            by: GangKey::model_project("lab", "big"),
            pool: "b200".into(),
            reclaimed: true,
            message: "m".into(),
        };
        let change = action(&running, &evict, now(), None, false).unwrap();
        assert!(matches!(&change.action, Action::Suspend(b) if b["spec"]["suspend"] == true));
        assert_eq!(change.events[0].reason, "Reclaimed");

        let mut done = running.clone();
        done.status = Some(crate::workload::kinds::JobSetStatus {
            conditions: vec![
                serde_json::from_value(json!({"type": "Completed", "status": "True",
                "lastTransitionTime": "2026-01-01T00:40:00Z", "reason": "AllJobsCompleted", "message": ""}))
                .unwrap(),
            ],
            ..Default::default()
        });
        assert_eq!(gang(&done, now(), &pools).unwrap(), None, "a completed JobSet holds nothing");
    }

    #[test]
    fn a_job_of_a_jobset_follows_its_jobset_and_is_no_gang_of_its_own() {
        let mut child = job(true, json!({}), json!([]));
        child.metadata.owner_references = Some(vec![
            serde_json::from_value(json!({"apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet", "name": "pair", "uid": "u", "controller": true}))
            .unwrap(),
        ]);
        assert!(!wants_admission(&child));
        assert_eq!(gang(&child, now(), &pools).unwrap(), None);
    }
}
