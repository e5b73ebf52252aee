//! Labelled batch Jobs in the admission loop: their gangs (pools resolved
//! from the stores), the writes their decisions ask for, and the write path
//! (server-side apply of an admission with the operator's field manager, a
//! merge patch that suspends again; both guarded by the resourceVersion they
//! were decided on, then assumed).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::Writer;
use crate::admission::job::{self, Action, JobChange, Pin};
use crate::admission::{Decision, Decisions, Gang, GangKey, WaitReason};
use crate::api::GrantMode;
use crate::controller::apply::{FIELD_MANAGER, publish_event};
use crate::controller::stores::Stores;
use crate::controller::unseen::Unseen;
use crate::workload::kinds::WorkloadGang;

/// Job writes in flight at once.
const WRITE_CONCURRENCY: usize = 32;

/// The gangs of `jobs`: each labelled Job that holds devices or waits. A
/// labelled Job that cannot be one gang is left out (logged at debug level;
/// it gets no Event yet).
pub fn gangs(stores: &Stores, jobs: &[Arc<Job>], now: Timestamp) -> Vec<Gang> {
    let pools = |w: &WorkloadGang| pools_of(stores, w);
    jobs.iter()
        .filter_map(|j| match job::gang(j, now, &pools) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(job = %job::key(j), error = %e, "a labelled Job that is no gang");
                None
            }
        })
        .collect()
}

/// The pools a workload may use, in order: those it names, else its
/// allocation's granted pools; only pools of the resource its pods ask for.
fn pools_of(stores: &Stores, w: &WorkloadGang) -> Vec<String> {
    let named = if w.pools.is_empty() {
        let a = stores.allocations.store.get(&ObjectRef::new(&w.allocation));
        a.map(|a| a.spec.grants.iter().map(|g| g.pool.clone()).collect()).unwrap_or_default()
    } else {
        w.pools.clone()
    };
    let mut out: Vec<String> = Vec::with_capacity(named.len());
    for p in named {
        let same_resource =
            stores.pools.store.get(&ObjectRef::new(&p)).is_some_and(|pool| pool.spec.resource_name == w.resource);
        if same_resource && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// One write to a Job.
#[derive(Clone, Debug)]
pub struct JobWrite {
    pub key: GangKey,
    pub job: Arc<Job>,
    pub change: JobChange,
    /// A victim: written only once its preemptor has recorded it.
    pub preemptor: Option<GangKey>,
    /// An admission: how long it waited since creation.
    pub admission_wait: Option<f64>,
}

/// The writes `decisions` ask of `jobs`, in two groups: admissions and
/// suspensions first, then `Queued` Events (as for a project: when a Job
/// starts waiting and when the reason changes, never per cycle; `announced`
/// remembers why each waits). Job preemptors are ready at once: their
/// victims are listed in no status.
pub fn plan(
    stores: &Stores,
    jobs: &[Arc<Job>],
    decisions: &Decisions,
    now: Timestamp,
    announced: &mut HashMap<GangKey, WaitReason>,
) -> (Vec<JobWrite>, Vec<JobWrite>, HashSet<GangKey>) {
    let keys: HashSet<GangKey> = jobs.iter().map(|j| job::key(j)).collect();
    announced.retain(|k, _| keys.contains(k));
    let (mut urgent, mut waiting, mut ready) = (Vec::new(), Vec::new(), HashSet::new());
    for j in jobs {
        let key = job::key(j);
        let Some(d) = decisions.get(&key) else { continue };
        let mut announce = false;
        if let Decision::Wait { why, victims, .. } = d {
            if !victims.is_empty() {
                ready.insert(key.clone());
            }
            announce = announced.get(&key).is_none_or(|w| w != why);
        } else {
            // Admitted, stopped or evicted: its next wait is announced again.
            announced.remove(&key);
        }
        let pool = match d {
            Decision::Admit { pool, .. } => stores.pools.store.get(&ObjectRef::new(pool)),
            _ => None,
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
        });
        let Some(change) = job::action(j, d, now, pin.as_ref(), announce) else { continue };
        let (preemptor, admission_wait) = match d {
            Decision::Evict { by, .. } => (Some(by.clone()), None),
            Decision::Admit { .. } => {
                let waited = j.metadata.creation_timestamp.as_ref().map(|c| now.duration_since(c.0).as_secs_f64());
                (None, Some(waited.unwrap_or(0.0)))
            }
            _ => (None, None),
        };
        let write = JobWrite { key: key.clone(), job: j.clone(), change, preemptor, admission_wait };
        if let Decision::Wait { why, .. } = d {
            announced.insert(key, *why);
            waiting.push(write);
        } else {
            urgent.push(write);
        }
    }
    (urgent, waiting, ready)
}

impl Writer {
    /// Writes Jobs' decisions concurrently and assumes what was written.
    pub async fn write_jobs(&self, batch: Vec<JobWrite>, assumed: &Unseen<GangKey, Arc<Job>>) {
        let results: Vec<_> =
            futures::stream::iter(batch).map(|w| self.write_job(w)).buffer_unordered(WRITE_CONCURRENCY).collect().await;
        for (key, rv, written) in results.into_iter().flatten() {
            assumed.note(key, &rv, written);
        }
    }

    async fn write_job(&self, w: JobWrite) -> Option<(GangKey, String, Arc<Job>)> {
        let ns = w.job.namespace().unwrap_or_default();
        let name = w.job.name_any();
        let rv = w.job.resource_version()?;
        let api = Api::<Job>::namespaced(self.client.clone(), &ns);
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
                tracing::debug!(job = %w.key, code = e.code, "decided on an old version; planned again");
                return None;
            }
            Err(e) => {
                tracing::warn!(job = %w.key, error = %e, "cannot write an admission decision to a Job");
                return None;
            }
        };
        if let Some(wait) = w.admission_wait {
            self.metrics.observe_admission_wait(wait);
        }
        if w.preemptor.is_some()
            && let Some(stop) = w.change.events.first()
        {
            self.metrics.count_gang_restart(stop.reason);
        }
        tracing::debug!(job = %w.key, events = ?w.change.events.iter().map(|e| e.reason).collect::<Vec<_>>(), "written");
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
        let decisions = super::super::decide_with_jobs(&view, &stores, &[], &jobs, now(), &settings);
        assert!(
            matches!(decisions.get(&GangKey::job("team-a", "first")), Some(Decision::Admit { pool, nodes, .. }) if pool == "atom" && nodes.len() == 2),
            "{decisions:?}"
        );
        assert!(
            matches!(decisions.get(&GangKey::job("team-a", "second")), Some(Decision::Wait { .. })),
            "the grant of 16 holds one Job of 2 x 8: {decisions:?}"
        );

        let mut announced = HashMap::new();
        let (urgent, waiting, ready) = plan(&stores, &jobs, &decisions, now(), &mut announced);
        assert!(ready.is_empty());
        assert_eq!(urgent.len(), 1);
        let Action::Admit(body) = &urgent[0].change.action else { panic!("{:?}", urgent[0].change) };
        let spec = &body["spec"]["template"]["spec"];
        assert_eq!(spec["nodeSelector"], json!({"npu": "atom"}), "the pool's node labels");
        assert_eq!(spec["tolerations"][0]["key"], "npu", "the pool's tolerations");
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].change.events[0].reason, "Queued");

        let (_, again, _) = plan(&stores, &jobs, &decisions, now(), &mut announced);
        assert!(again.is_empty(), "the same wait is announced once");
    }
}
