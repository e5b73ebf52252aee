//! Proposed objects from files, applied to a copy of the cluster in memory.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::de::DeserializeOwned;

use super::Cluster;
use crate::admission::job::Workload;
use crate::api::{AcceleratorPool, GpuAllocation, ModelProject};
use crate::workload::kinds::JobSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create, or change the spec of an object that exists (as `kubectl apply`
    /// of a whole object).
    Apply,
    Delete,
}

/// One object of a file, to apply or delete.
#[derive(Clone, Debug)]
pub enum Proposal {
    Pool(Action, Box<AcceleratorPool>),
    Allocation(Action, Box<GpuAllocation>),
    Project(Action, Box<ModelProject>),
    Namespace(Action, Box<Namespace>),
    Job(Action, Box<Job>),
    JobSet(Action, Box<JobSet>),
}

/// Reads every YAML document of the files (a folder: its .yaml, .yml and
/// .json files in name order).
pub fn read_files(paths: &[PathBuf], action: Action) -> anyhow::Result<Vec<Proposal>> {
    let mut out = Vec::new();
    for path in paths {
        let files = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
                .collect();
            v.sort();
            v
        } else {
            vec![path.clone()]
        };
        for f in files {
            let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
            out.extend(parse(&text, action).with_context(|| format!("in {}", f.display()))?);
        }
    }
    Ok(out)
}

/// The objects of one multi-document YAML text.
pub fn parse(text: &str, action: Action) -> anyhow::Result<Vec<Proposal>> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)?;
    let mut out = Vec::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let api = doc["apiVersion"].as_str().unwrap_or_default().to_string();
        fn obj<K: DeserializeOwned>(d: serde_json::Value) -> anyhow::Result<K> {
            Ok(serde_json::from_value(d)?)
        }
        let p = match (api.as_str(), kind.as_str()) {
            ("sovereign.ai/v1alpha1", "AcceleratorPool") => Proposal::Pool(action, obj(doc)?),
            ("sovereign.ai/v1alpha1", "GpuAllocation") => Proposal::Allocation(action, obj(doc)?),
            ("sovereign.ai/v1alpha1", "ModelProject") => {
                let mut p: ModelProject = obj(doc)?;
                p.metadata.namespace.get_or_insert_with(|| "default".into());
                Proposal::Project(action, Box::new(p))
            }
            ("v1", "Namespace") => Proposal::Namespace(action, obj(doc)?),
            ("batch/v1", "Job") => Proposal::Job(action, Box::new(held(obj(doc)?))),
            ("jobset.x-k8s.io/v1alpha2", "JobSet") => Proposal::JobSet(action, Box::new(held(obj(doc)?))),
            _ => bail!(
                "plan reads AcceleratorPools, GpuAllocations, ModelProjects (sovereign.ai/v1alpha1), Namespaces, batch/v1 Jobs and jobset.x-k8s.io/v1alpha2 JobSets, not {api} {kind}"
            ),
        };
        out.push(p);
    }
    Ok(out)
}

/// A proposed Job or JobSet as the API server would store it: in the
/// namespace `default` unless it names one, and, labelled, held suspended by
/// the chart's admission policy.
fn held<W: Workload>(mut w: W) -> W {
    w.meta_mut().namespace.get_or_insert_with(|| "default".into());
    if w.labels().contains_key(crate::snapshot::ALLOCATION_LABEL) && w.owner_references().is_empty() {
        w.set_suspended(true);
    }
    w
}

impl Proposal {
    /// "create GpuAllocation x" (or change, delete), as it would be on `cluster`.
    pub fn describe(&self, cluster: &Cluster) -> String {
        let (action, kind, name, exists) = match self {
            Proposal::Pool(a, o) => (a, "AcceleratorPool", o.name_any(), find(&cluster.pools, o).is_some()),
            Proposal::Allocation(a, o) => (a, "GpuAllocation", o.name_any(), find(&cluster.allocations, o).is_some()),
            Proposal::Project(a, o) => {
                (a, "ModelProject", namespaced(o.as_ref()), find(&cluster.projects, o).is_some())
            }
            Proposal::Namespace(a, o) => (a, "Namespace", o.name_any(), find(&cluster.namespaces, o).is_some()),
            Proposal::Job(a, o) => (a, "Job", namespaced(o.as_ref()), find(&cluster.jobs, o).is_some()),
            Proposal::JobSet(a, o) => (a, "JobSet", namespaced(o.as_ref()), find(&cluster.jobsets, o).is_some()),
        };
        let verb = match (action, exists) {
            (Action::Delete, true) => "delete",
            (Action::Delete, false) => "delete (not found)",
            (Action::Apply, true) => "change",
            (Action::Apply, false) => "create",
        };
        format!("{verb} {kind} {name}")
    }

    /// Applies the proposal to the cluster in memory; a new object is created at `now`.
    pub fn apply(&self, cluster: &mut Cluster, now: Timestamp) {
        match self {
            Proposal::Pool(a, o) => upsert(&mut cluster.pools, o, *a, now, |old, new| old.spec = new.spec.clone()),
            Proposal::Allocation(a, o) => {
                upsert(&mut cluster.allocations, o, *a, now, |old, new| old.spec = new.spec.clone())
            }
            Proposal::Project(a, o) => {
                upsert(&mut cluster.projects, o, *a, now, |old, new| old.spec = new.spec.clone());
                if *a == Action::Delete {
                    // Its workers go with it (owner references).
                    let (ns, name) = (o.namespace(), o.name_any());
                    let mine = |p: &k8s_openapi::api::core::v1::Pod| {
                        p.namespace() == ns && p.labels().get(crate::snapshot::PROJECT_LABEL) == Some(&name)
                    };
                    cluster.pods.retain(|p| !mine(p));
                    cluster.workers.retain(|p| !mine(p));
                }
            }
            Proposal::Namespace(a, o) => upsert(&mut cluster.namespaces, o, *a, now, |_, _| {}),
            // A workload's spec is kept as it is (a held one's template may change).
            Proposal::Job(a, o) => upsert(&mut cluster.jobs, o, *a, now, |old, new| old.spec = new.spec.clone()),
            Proposal::JobSet(a, o) => upsert(&mut cluster.jobsets, o, *a, now, |old, new| old.spec = new.spec.clone()),
        }
    }
}

fn namespaced<K: ResourceExt>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

fn same<K: ResourceExt>(a: &K, b: &K) -> bool {
    a.name_any() == b.name_any() && a.namespace() == b.namespace()
}

fn find<'a, K: ResourceExt>(list: &'a [K], o: &K) -> Option<&'a K> {
    list.iter().find(|x| same(*x, o))
}

fn upsert<K>(list: &mut Vec<K>, o: &K, action: Action, now: Timestamp, change: impl Fn(&mut K, &K))
where
    K: ResourceExt + Clone + kube::Resource<DynamicType = ()>,
{
    let at = list.iter().position(|x| same(x, o));
    match (action, at) {
        (Action::Delete, Some(i)) => {
            list.remove(i);
        }
        (Action::Delete, None) => {}
        (Action::Apply, Some(i)) => {
            let old = &mut list[i];
            change(old, o);
            let meta: &mut ObjectMeta = old.meta_mut();
            meta.generation = Some(meta.generation.unwrap_or(1) + 1);
        }
        (Action::Apply, None) => {
            let mut new = o.clone();
            let meta = new.meta_mut();
            meta.creation_timestamp = Some(Time(now));
            meta.generation = Some(1);
            meta.uid = Some(format!("planned-{}", list.len()));
            list.push(new);
        }
    }
}
