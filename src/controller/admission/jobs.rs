//! Labelled workloads (batch Jobs and JobSets) in the admission loop: their
//! gangs (pools resolved from the stores), the writes their decisions ask for,
//! and the write path (server-side apply of an admission with the operator's
//! field manager, a merge patch that suspends again; both guarded by the
//! resourceVersion they were decided on, then assumed). One path for every
//! kind: what differs is [`Workload`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::Writer;
use crate::admission::job::{self, Action, JobChange, Pin, Workload};
use crate::admission::{Decision, Decisions, Gang, GangKey, WaitReason};
use crate::api::{GrantMode, TopologyMode};
use crate::controller::apply::{FIELD_MANAGER, publish_event};
use crate::controller::stores::Stores;
use crate::controller::unseen::Unseen;
use crate::events::Note;
use crate::workload::kinds::{JobSet, WorkloadError, WorkloadGang, resolve_pools};

/// Workload writes in flight at once.
const WRITE_CONCURRENCY: usize = 32;

/// The labelled workloads of one moment, of every kind.
#[derive(Clone, Default)]
pub struct Workloads {
    pub jobs: Vec<Arc<Job>>,
    pub jobsets: Vec<Arc<JobSet>>,
}

impl Workloads {
    /// The stores' workloads.
    pub fn of(stores: &Stores) -> Self {
        Self { jobs: stores.jobs.store.state(), jobsets: stores.jobsets.store.state() }
    }

    /// Every gang among them.
    pub fn gangs(&self, stores: &Stores, now: Timestamp) -> Vec<Gang> {
        let mut out = gangs(stores, &self.jobs, now);
        out.extend(gangs(stores, &self.jobsets, now));
        out
    }
}

/// What the loop remembers of one kind between cycles: its writes the store
/// has not shown yet, and what each held workload was last told.
pub struct Held<W> {
    pub assumed: Unseen<GangKey, Arc<W>>,
    pub announced: Announced,
}

/// What each held workload was last told by an Event.
#[derive(Debug, Default)]
pub struct Announced {
    /// Why each waiting workload waited when it got its `Queued` Event.
    pub waits: HashMap<GangKey, WaitReason>,
    /// Why each labelled workload that cannot be one gang got its `Invalid` Event.
    pub invalid: HashMap<GangKey, String>,
}

impl<W: Workload> Held<W> {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self { assumed: Unseen::new(ttl), announced: Announced::default() }
    }

    /// `stored`, with the loop's own writes standing in.
    pub fn overlay(&self, stored: Vec<Arc<W>>) -> Vec<Arc<W>> {
        self.assumed.overlay(stored, job::key)
    }
}

/// The gangs of `workloads`: each labelled one that holds devices or waits.
/// A labelled workload that cannot be one gang is left out (its `Invalid`
/// Event comes from [`plan`]).
pub fn gangs<W: Workload>(stores: &Stores, workloads: &[Arc<W>], now: Timestamp) -> Vec<Gang> {
    let pools = |w: &WorkloadGang| pools_of(stores, w);
    workloads
        .iter()
        .filter_map(|w| match job::gang(w.as_ref(), now, &pools) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(workload = %job::key(w.as_ref()), error = %e, "a labelled workload that is no gang");
                None
            }
        })
        .collect()
}

/// The pools a workload may use, in order: those it names, else its
/// allocation's granted pools; only pools of the resource its pods ask for
/// (a named pool of another is an error: [`resolve_pools`]).
fn pools_of(stores: &Stores, w: &WorkloadGang) -> Result<Vec<String>, WorkloadError> {
    let a = stores.allocations.store.get(&ObjectRef::new(&w.allocation));
    let granted: Vec<String> = a.map(|a| a.spec.grants.iter().map(|g| g.pool.clone()).collect()).unwrap_or_default();
    let resource_of = |p: &str| stores.pools.store.get(&ObjectRef::new(p)).map(|pool| pool.spec.resource_name.clone());
    resolve_pools(w, &granted, &resource_of)
}

/// The topology domain (node label key and value) of the planned nodes, when
/// the workload requires its gang in one.
fn required_domain<W: Workload>(stores: &Stores, w: &W, nodes: &[String]) -> Option<(String, String)> {
    let topology = w.read().ok()??.topology.filter(|t| t.mode == TopologyMode::Required)?;
    let node = stores.nodes.store.get(&ObjectRef::new(nodes.first()?))?;
    let value = node.labels().get(&topology.key)?.clone();
    Some((topology.key, value))
}

/// One write to a workload.
#[derive(Clone, Debug)]
pub struct JobWrite<W> {
    pub key: GangKey,
    pub job: Arc<W>,
    pub change: JobChange,
    /// A victim: written only once its preemptor has recorded it.
    pub preemptor: Option<GangKey>,
    /// An admission: how long it waited since creation.
    pub admission_wait: Option<f64>,
}

/// The writes `decisions` ask of `workloads`, in two groups: admissions and
/// suspensions first, then `Queued` Events (as for a project: when a workload
/// starts waiting and when the reason changes, never per cycle; `announced`
/// remembers why each waits), and the `Invalid` Events of held workloads that
/// cannot be one gang (once per reason). Their preemptors are ready at once:
/// their victims are listed in no status.
pub fn plan<W: Workload>(
    stores: &Stores,
    workloads: &[Arc<W>],
    decisions: &Decisions,
    now: Timestamp,
    announced: &mut Announced,
) -> (Vec<JobWrite<W>>, Vec<JobWrite<W>>, HashSet<GangKey>) {
    let keys: HashSet<GangKey> = workloads.iter().map(|w| job::key(w.as_ref())).collect();
    announced.waits.retain(|k, _| keys.contains(k));
    announced.invalid.retain(|k, _| keys.contains(k));
    let (mut urgent, mut waiting, mut ready) = (Vec::new(), Vec::new(), HashSet::new());
    for j in workloads {
        let key = job::key(j.as_ref());
        let Some(d) = decisions.get(&key) else {
            waiting.extend(invalid(stores, j, key, now, &mut announced.invalid));
            continue;
        };
        announced.invalid.remove(&key);
        let mut announce = false;
        if let Decision::Wait { why, victims, .. } = d {
            if !victims.is_empty() {
                ready.insert(key.clone());
            }
            announce = announced.waits.get(&key).is_none_or(|w| w != why);
        } else {
            // Admitted, stopped or evicted: its next wait is announced again.
            announced.waits.remove(&key);
        }
        let (pool, domain) = match d {
            Decision::Admit { pool, nodes, .. } => {
                (stores.pools.store.get(&ObjectRef::new(pool)), required_domain(stores, j.as_ref(), nodes))
            }
            _ => (None, None),
        };
        let labels = pool.as_ref().and_then(|p| p.spec.node_selector.match_labels.clone()).unwrap_or_default();
        let allocation = j.labels().get(crate::snapshot::ALLOCATION_LABEL).cloned().unwrap_or_default();
        let pin = pool.as_ref().map(|p| {
            let name = p.name_any();
            let dedicated = stores
                .allocations
                .store
                .get(&ObjectRef::new(&allocation))
                .is_some_and(|a| a.spec.grants.iter().any(|g| g.pool == name && g.mode == GrantMode::Dedicated));
            (name, dedicated)
        });
        let pin = pin.as_ref().zip(pool.as_ref()).map(|((name, dedicated), p)| Pin {
            pool: name,
            node_labels: &labels,
            tolerations: &p.spec.tolerations,
            dedicated: *dedicated,
            domain: domain.clone(),
        });
        let Some(change) = job::action(j.as_ref(), d, now, pin.as_ref(), announce) else { continue };
        let (preemptor, admission_wait) = match d {
            Decision::Evict { by, .. } => (Some(by.clone()), None),
            Decision::Admit { .. } => {
                let waited = j.meta().creation_timestamp.as_ref().map(|c| now.duration_since(c.0).as_secs_f64());
                (None, Some(waited.unwrap_or(0.0)))
            }
            _ => (None, None),
        };
        let write = JobWrite { key: key.clone(), job: j.clone(), change, preemptor, admission_wait };
        if let Decision::Wait { why, .. } = d {
            announced.waits.insert(key, *why);
            waiting.push(write);
        } else {
            urgent.push(write);
        }
    }
    (urgent, waiting, ready)
}

/// The `Invalid` Event of a held workload that cannot be one gang (the
/// reason says what to change), when its reason is new: without the chart's
/// policies nothing refused it at creation, and it must not wait in silence.
fn invalid<W: Workload>(
    stores: &Stores,
    j: &Arc<W>,
    key: GangKey,
    now: Timestamp,
    invalid: &mut HashMap<GangKey, String>,
) -> Option<JobWrite<W>> {
    let pools = |w: &WorkloadGang| pools_of(stores, w);
    let error = match job::wants_admission(j.as_ref()).then(|| job::gang(j.as_ref(), now, &pools)) {
        Some(Err(e)) => e.to_string(),
        _ => {
            invalid.remove(&key);
            return None;
        }
    };
    if invalid.get(&key) == Some(&error) {
        return None;
    }
    invalid.insert(key.clone(), error.clone());
    let change = JobChange { action: Action::Announce, events: vec![Note::warning("Invalid", error)] };
    Some(JobWrite { key, job: j.clone(), change, preemptor: None, admission_wait: None })
}

impl Writer {
    /// A JobSet that a Kubeflow TrainJob made (its controller owner) follows
    /// the TrainJob's suspend, which the Trainer copies into it: the TrainJob
    /// gets the suspend the operator just gave its JobSet (merge patch).
    async fn follow_trainjob(&self, meta: &kube::api::ObjectMeta, ns: &str, suspend: bool) {
        let owner = meta.owner_references.iter().flatten().find(|o| {
            o.controller == Some(true) && o.kind == "TrainJob" && o.api_version.starts_with("trainer.kubeflow.org/")
        });
        let Some(owner) = owner else { return };
        let (group, version) = owner.api_version.split_once('/').unwrap_or_default();
        let gvk = kube::core::GroupVersionKind::gvk(group, version, "TrainJob");
        let resource = kube::core::ApiResource::from_gvk_with_plural(&gvk, "trainjobs");
        let api = Api::<kube::core::DynamicObject>::namespaced_with(self.client.clone(), ns, &resource);
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let body = serde_json::json!({"spec": {"suspend": suspend}});
        match api.patch(&owner.name, &params, &Patch::Merge(&body)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(trainjob = %owner.name, error = %e, "cannot set a TrainJob's suspend"),
        }
    }

    /// Writes workloads' decisions concurrently and assumes what was written.
    pub async fn write_jobs<W: Workload>(&self, batch: Vec<JobWrite<W>>, assumed: &Unseen<GangKey, Arc<W>>) {
        let results: Vec<_> =
            futures::stream::iter(batch).map(|w| self.write_job(w)).buffer_unordered(WRITE_CONCURRENCY).collect().await;
        for (key, rv, written) in results.into_iter().flatten() {
            assumed.note(key, &rv, written);
        }
    }

    async fn write_job<W: Workload>(&self, w: JobWrite<W>) -> Option<(GangKey, String, Arc<W>)> {
        let ns = w.job.namespace().unwrap_or_default();
        let name = w.job.name_any();
        let rv = w.job.resource_version()?;
        let api = Api::<W>::namespaced(self.client.clone(), &ns);
        let written = match &w.change.action {
            Action::Admit(body) => {
                api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await.map(Some)
            }
            Action::Suspend(body) => {
                let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
                api.patch(&name, &params, &Patch::Merge(body)).await.map(Some)
            }
            Action::Announce => Ok(None),
        };
        let written = match written {
            Ok(written) => written,
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                tracing::debug!(workload = %w.key, code = e.code, "decided on an old version; planned again");
                return None;
            }
            Err(e) => {
                tracing::warn!(workload = %w.key, error = %e, "cannot write an admission decision to a workload");
                return None;
            }
        };
        if let Some(suspend) = match &w.change.action {
            Action::Admit(_) => Some(false),
            Action::Suspend(_) => Some(true),
            Action::Announce => None,
        } {
            self.follow_trainjob(w.job.meta(), &ns, suspend).await;
        }
        if let Some(wait) = w.admission_wait {
            self.metrics.observe_admission_wait(wait);
        }
        if w.preemptor.is_some()
            && let Some(stop) = w.change.events.first()
        {
            self.metrics.count_gang_restart(stop.reason);
        }
        tracing::debug!(workload = %w.key, events = ?w.change.events.iter().map(|e| e.reason).collect::<Vec<_>>(), "written");
        let on = w.job.object_ref(&());
        for note in w.change.events {
            publish_event(&self.recorder, &on, note.type_, note.reason, note.message).await;
        }
        written.map(|j| (w.key, rv, Arc::new(j)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::controller::view::View;
    use crate::plan::Cluster;

    fn now() -> Timestamp {
        "2026-12-01T12:00:00Z".parse().unwrap()
    }

    /// Four 8-device ATOM nodes, pool atom, allocation a granting team-a 16.
    fn cluster() -> Cluster {
        let node = |i: usize| {
            serde_json::from_value(json!({
                "metadata": {"name": format!("atom-{i}"), "labels": {
                    "npu": "atom", "kubernetes.io/hostname": format!("atom-{i}")}},
                "status": {"capacity": {"rebellions.ai/ATOM": "8"}, "allocatable": {"rebellions.ai/ATOM": "8"},
                           "conditions": [{"type": "Ready", "status": "True"}]}
            }))
            .unwrap()
        };
        let pool = serde_json::from_value(json!({
            "metadata": {"name": "atom", "uid": "u1", "generation": 1},
            "spec": {"resourceName": "rebellions.ai/ATOM", "kind": "NPU", "vendor": "R", "model": "ATOM",
                     "nodeSelector": {"matchLabels": {"npu": "atom"}},
                     "topologyKeys": ["kubernetes.io/hostname"],
                     "tolerations": [{"key": "npu", "operator": "Exists", "effect": "NoSchedule"}]}
        }))
        .unwrap();
        let alloc = serde_json::from_value(json!({
            "metadata": {"name": "a"},
            "spec": {"tenant": {"displayName": "T", "namespaces": ["team-a"]},
                     "grants": [{"pool": "atom", "accelerators": 16}]},
            "status": {"phase": "Active"}
        }))
        .unwrap();
        let ns = serde_json::from_value(json!({"metadata": {"name": "team-a"}})).unwrap();
        Cluster {
            nodes: (0..4).map(node).collect(),
            pools: vec![pool],
            allocations: vec![alloc],
            namespaces: vec![ns],
            ..Default::default()
        }
    }

    fn job(name: &str, created: &str) -> Arc<Job> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "team-a", "resourceVersion": "1", "creationTimestamp": created,
                             "labels": {"sovereign.ai/allocation": "a"}},
                "spec": {"suspend": true, "parallelism": 2, "completions": 2,
                         "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "i",
                            "resources": {"limits": {"rebellions.ai/ATOM": "8"}}}]}}}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn held_jobs_are_planned_with_the_projects_the_first_admitted_and_pinned_the_second_queued_once() {
        let c = cluster();
        let stores = crate::plan::stores(&c);
        let view = View::build(&stores, std::time::Duration::from_secs(300), now());
        let jobs = [job("first", "2026-12-01T11:00:00Z"), job("second", "2026-12-01T11:30:00Z")];
        let settings = crate::admission::Settings {
            starvation_after: k8s_openapi::jiff::SignedDuration::from_secs(900),
            min_run: k8s_openapi::jiff::SignedDuration::from_secs(600),
        };
        let workloads = Workloads { jobs: jobs.to_vec(), ..Default::default() };
        let decisions = super::super::decide_with_workloads(&view, &stores, &[], &workloads, now(), &settings);
        assert!(
            matches!(decisions.get(&GangKey::job("team-a", "first")), Some(Decision::Admit { pool, nodes, .. }) if pool == "atom" && nodes.len() == 2),
            "{decisions:?}"
        );
        assert!(
            matches!(decisions.get(&GangKey::job("team-a", "second")), Some(Decision::Wait { .. })),
            "the grant of 16 holds one Job of 2 x 8: {decisions:?}"
        );

        let mut announced = Announced::default();
        let (urgent, waiting, ready) = plan(&stores, &jobs[..], &decisions, now(), &mut announced);
        assert!(ready.is_empty());
        assert_eq!(urgent.len(), 1);
        let Action::Admit(body) = &urgent[0].change.action else { panic!("{:?}", urgent[0].change) };
        let spec = &body["spec"]["template"]["spec"];
        assert_eq!(spec["nodeSelector"], json!({"npu": "atom"}), "the pool's node labels");
        assert_eq!(spec["tolerations"][0]["key"], "npu", "the pool's tolerations");
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].change.events[0].reason, "Queued");

        let (_, again, _) = plan(&stores, &jobs[..], &decisions, now(), &mut announced);
        assert!(again.is_empty(), "the same wait is announced once");
    }

    #[test]
    fn a_held_job_listing_a_pool_of_another_resource_name_is_no_gang_and_is_told_why_once() {
        let mut c = cluster();
        c.pools.push(
            serde_json::from_value(json!({
                "metadata": {"name": "b200", "uid": "u2", "generation": 1},
                "spec": {"resourceName": "nvidia.com/gpu", "kind": "GPU", "vendor": "N", "model": "B200",
                         "nodeSelector": {"matchLabels": {"gpu": "b200"}}}
            }))
            .unwrap(),
        );
        let stores = crate::plan::stores(&c);
        let view = View::build(&stores, std::time::Duration::from_secs(300), now());
        let mut mixed = (*job("mixed", "2026-12-01T11:00:00Z")).clone();
        mixed.metadata.annotations = Some([("sovereign.ai/pools".to_string(), "b200,atom".to_string())].into());
        let jobs = [Arc::new(mixed), job("fine", "2026-12-01T11:30:00Z")];
        let settings = crate::admission::Settings {
            starvation_after: k8s_openapi::jiff::SignedDuration::from_secs(900),
            min_run: k8s_openapi::jiff::SignedDuration::from_secs(600),
        };
        let workloads = Workloads { jobs: jobs.to_vec(), ..Default::default() };
        assert_eq!(workloads.gangs(&stores, now()).len(), 1, "only the Job that can be one gang is planned");
        let decisions = super::super::decide_with_workloads(&view, &stores, &[], &workloads, now(), &settings);
        assert!(decisions.get(&GangKey::job("team-a", "mixed")).is_none(), "{decisions:?}");
        assert!(
            matches!(decisions.get(&GangKey::job("team-a", "fine")), Some(Decision::Admit { .. })),
            "{decisions:?}"
        );

        let mut announced = Announced::default();
        let (urgent, waiting, _) = plan(&stores, &jobs[..], &decisions, now(), &mut announced);
        assert_eq!(urgent.len(), 1, "the fine Job is admitted");
        assert_eq!(waiting.len(), 1);
        let told = &waiting[0];
        assert_eq!((&told.key, &told.change.action), (&GangKey::job("team-a", "mixed"), &Action::Announce));
        let note = &told.change.events[0];
        assert!(note.is_warning());
        assert_eq!(note.reason, "Invalid");
        assert!(
            note.message.contains("pool b200 gives nvidia.com/gpu but the pods ask for rebellions.ai/ATOM")
                && note.message.contains("list only pools that give rebellions.ai/ATOM (here: atom)"),
            "{}",
            note.message
        );
        let (_, again, _) = plan(&stores, &jobs[..], &decisions, now(), &mut announced);
        assert!(again.is_empty(), "told once per reason");
    }
}
