//! The accelerator facts of the cluster, kept per watch event: what the
//! planner needs of every node (labels, readiness, devices) and of every
//! running pod (its node and device requests), with the devices held on each
//! node by pods the operator did not create. A node or pod event costs
//! O(that object); a view of the whole cluster is assembled from these
//! without re-reading thousands of objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::runtime::watcher;

use crate::planner::inventory::NodeInfo;
use crate::planner::usage::PodUse;
use crate::snapshot::{self, JOB_LABEL, JOBSET_LABEL, PROJECT_LABEL, RESERVED_FOR};

/// The model shared by the store tasks (writers) and the planners (readers).
#[derive(Clone, Default)]
pub struct Model(Arc<RwLock<ModelState>>);

impl Model {
    /// A model of these nodes and running pods (the plan command, benchmarks).
    pub fn of(nodes: &[Node], pods: &[Pod]) -> Self {
        let mut m = ModelState::default();
        for n in nodes {
            m.apply_node(&watcher::Event::Apply(n.clone()));
        }
        for p in pods {
            m.apply_pod(&watcher::Event::Apply(p.clone()));
        }
        Self(Arc::new(RwLock::new(m)))
    }

    pub(crate) fn apply_node(&self, event: &watcher::Event<Node>) {
        self.0.write().expect("model lock").apply_node(event);
    }

    pub(crate) fn apply_pod(&self, event: &watcher::Event<Pod>) {
        self.0.write().expect("model lock").apply_pod(event);
    }

    /// Reads the model under its lock (held only for the closure).
    pub fn read<T>(&self, f: impl FnOnce(&ModelState) -> T) -> T {
        f(&self.0.read().expect("model lock"))
    }
}

/// A pod as the model keeps it.
#[derive(Clone, Debug)]
struct PodEntry {
    used: PodUse,
    /// A worker of a ModelProject or a pod of an admitted Job or JobSet (its devices are
    /// the admission loop's own books).
    worker: bool,
}

#[derive(Default)]
pub struct ModelState {
    nodes: Keyed<NodeInfo>,
    /// Running pods that request accelerators and are bound to a node.
    pods: Keyed<PodEntry>,
    /// Node -> resource -> devices held by running pods that are not workers.
    foreign: HashMap<String, BTreeMap<String, i64>>,
    /// Allocation -> the nodes labelled reserved for it.
    reserved: HashMap<String, BTreeSet<String>>,
    /// Bumped whenever a node was added, removed or changed what the planner reads.
    node_version: u64,
    /// Bumped only when a node was added or removed or its labels changed:
    /// what pool membership depends on (readiness flaps leave it alone).
    label_version: u64,
}

impl ModelState {
    /// Every node, by name (the order views index them in).
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut nodes: Vec<NodeInfo> = self.nodes.live.values().cloned().collect();
        nodes.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// What every running pod with accelerator requests uses.
    pub fn pod_uses(&self) -> Vec<PodUse> {
        self.pods.live.values().map(|p| p.used.clone()).collect()
    }

    /// Node -> resource -> devices held by running pods that are not workers.
    pub fn foreign(&self) -> &HashMap<String, BTreeMap<String, i64>> {
        &self.foreign
    }

    /// The nodes labelled reserved for an allocation.
    pub fn reserved_for(&self, allocation: &str) -> Vec<String> {
        self.reserved.get(allocation).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Changes whenever a node was added, removed or changed what the planner reads.
    pub fn node_version(&self) -> u64 {
        self.node_version
    }

    /// Changes whenever a node was added or removed or its labels changed.
    pub fn label_version(&self) -> u64 {
        self.label_version
    }

    pub fn apply_node(&mut self, event: &watcher::Event<Node>) {
        let reservation = |n: &NodeInfo| n.labels.get(RESERVED_FOR).cloned();
        match self.nodes.apply(event, |n| Some(snapshot::node_info(n))) {
            Applied::One { old, new } if old == new => {}
            Applied::One { old, new } => {
                self.node_version += 1;
                if old.as_ref().map(|n| &n.labels) != new.as_ref().map(|n| &n.labels) {
                    self.label_version += 1;
                }
                let name = old.as_ref().or(new.as_ref()).map(|n| n.name.clone()).unwrap_or_default();
                if let Some(a) = old.as_ref().and_then(reservation)
                    && let Some(set) = self.reserved.get_mut(&a)
                {
                    set.remove(&name);
                    if set.is_empty() {
                        self.reserved.remove(&a);
                    }
                }
                if let Some(a) = new.as_ref().and_then(reservation) {
                    self.reserved.entry(a).or_default().insert(name);
                }
            }
            Applied::All => {
                self.node_version += 1;
                self.label_version += 1;
                self.reserved.clear();
                for n in self.nodes.live.values() {
                    if let Some(a) = reservation(n) {
                        self.reserved.entry(a).or_default().insert(n.name.clone());
                    }
                }
            }
            Applied::Nothing => {}
        }
    }

    pub fn apply_pod(&mut self, event: &watcher::Event<Pod>) {
        let entry = |p: &Pod| {
            // Workers of projects and pods of admitted Jobs and JobSets count in their gangs.
            let worker = [PROJECT_LABEL, JOB_LABEL, JOBSET_LABEL].iter().any(|l| p.labels().contains_key(*l));
            snapshot::pod_use(p).map(|used| PodEntry { used, worker })
        };
        match self.pods.apply(event, entry) {
            Applied::One { old, new } => {
                for (e, sign) in [(old, -1), (new, 1)] {
                    if let Some(e) = e.filter(|e| !e.worker) {
                        add(&mut self.foreign, &e.used, sign);
                    }
                }
            }
            Applied::All => {
                self.foreign.clear();
                for e in self.pods.live.values().filter(|e| !e.worker) {
                    add(&mut self.foreign, &e.used, 1);
                }
            }
            Applied::Nothing => {}
        }
    }
}

fn add(foreign: &mut HashMap<String, BTreeMap<String, i64>>, used: &PodUse, sign: i64) {
    let on = foreign.entry(used.node.clone()).or_default();
    for (r, v) in &used.requests {
        *on.entry(r.clone()).or_default() += sign * v;
    }
    on.retain(|_, v| *v != 0);
    if on.is_empty() {
        foreign.remove(&used.node);
    }
}

/// What applying one watch event did to a [`Keyed`] table.
pub(crate) enum Applied<V> {
    /// One entry changed: what it was and what it is (either may be absent).
    One { old: Option<V>, new: Option<V> },
    /// A relist finished: every entry may have changed.
    All,
    /// A relist is under way: the live table is unchanged until it is done.
    Nothing,
}

/// Values derived from the objects of one watch, by "namespace/name". A relist
/// builds a new table and swaps it in when done, so objects deleted while the
/// watch was down disappear.
pub(crate) struct Keyed<V> {
    pub(crate) live: HashMap<String, V>,
    relisting: Option<HashMap<String, V>>,
}

impl<V> Default for Keyed<V> {
    fn default() -> Self {
        Self { live: HashMap::new(), relisting: None }
    }
}

impl<V: Clone> Keyed<V> {
    /// Applies a watch event; `derive` gives the value an object is kept as
    /// (none: it is not kept).
    pub(crate) fn apply<K: kube::Resource>(
        &mut self,
        event: &watcher::Event<K>,
        derive: impl Fn(&K) -> Option<V>,
    ) -> Applied<V> {
        match event {
            watcher::Event::Apply(obj) => {
                let key = super::object_key(obj);
                let new = derive(obj);
                let old = match &new {
                    Some(v) => self.live.insert(key, v.clone()),
                    None => self.live.remove(&key),
                };
                Applied::One { old, new }
            }
            watcher::Event::Delete(obj) => Applied::One { old: self.live.remove(&super::object_key(obj)), new: None },
            watcher::Event::Init => {
                self.relisting = Some(HashMap::new());
                Applied::Nothing
            }
            watcher::Event::InitApply(obj) => {
                if let (Some(next), Some(v)) = (self.relisting.as_mut(), derive(obj)) {
                    next.insert(super::object_key(obj), v);
                }
                Applied::Nothing
            }
            watcher::Event::InitDone => {
                if let Some(next) = self.relisting.take() {
                    self.live = next;
                }
                Applied::All
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, NodeCondition, NodeStatus, PodSpec, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn node(name: &str, gpus: &str) -> Node {
        Node {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            status: Some(NodeStatus {
                allocatable: Some([("nvidia.com/gpu".to_string(), Quantity(gpus.into()))].into()),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(name: &str, node: &str, gpus: &str, worker: bool) -> Pod {
        let labels = worker.then(|| [(PROJECT_LABEL.to_string(), "run".to_string())].into());
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team".into()),
                labels,
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some([("nvidia.com/gpu".to_string(), Quantity(gpus.into()))].into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn foreign_on(m: &ModelState, node: &str) -> i64 {
        m.foreign().get(node).and_then(|r| r.get("nvidia.com/gpu")).copied().unwrap_or(0)
    }

    #[test]
    fn node_events_replace_and_remove_one_node() {
        let mut m = ModelState::default();
        m.apply_node(&watcher::Event::Apply(node("b", "8")));
        m.apply_node(&watcher::Event::Apply(node("a", "8")));
        m.apply_node(&watcher::Event::Apply(node("b", "4")));
        let nodes = m.nodes();
        assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(nodes[1].allocatable_of("nvidia.com/gpu"), 4);
        m.apply_node(&watcher::Event::Delete(node("a", "8")));
        assert_eq!(m.nodes().len(), 1);
    }

    #[test]
    fn reservations_are_indexed_by_allocation() {
        let reserved = |name: &str, alloc: Option<&str>| {
            let mut n = node(name, "8");
            n.metadata.labels = alloc.map(|a| [(RESERVED_FOR.to_string(), a.to_string())].into());
            n
        };
        let mut m = ModelState::default();
        m.apply_node(&watcher::Event::Apply(reserved("n1", Some("team-a"))));
        m.apply_node(&watcher::Event::Apply(reserved("n2", Some("team-a"))));
        assert_eq!(m.reserved_for("team-a"), ["n1", "n2"]);
        m.apply_node(&watcher::Event::Apply(reserved("n1", Some("team-b"))));
        m.apply_node(&watcher::Event::Apply(reserved("n2", None)));
        assert_eq!((m.reserved_for("team-a"), m.reserved_for("team-b")), (vec![], vec!["n1".to_string()]));
        m.apply_node(&watcher::Event::Delete(reserved("n1", Some("team-b"))));
        assert!(m.reserved.is_empty());
    }

    #[test]
    fn foreign_devices_follow_pod_events_and_skip_workers() {
        let mut m = ModelState::default();
        m.apply_pod(&watcher::Event::Apply(pod("p1", "n1", "2", false)));
        m.apply_pod(&watcher::Event::Apply(pod("w1", "n1", "8", true)));
        assert_eq!(foreign_on(&m, "n1"), 2);
        // Moved (a new pod of the same name) and resized.
        m.apply_pod(&watcher::Event::Apply(pod("p1", "n2", "3", false)));
        assert_eq!((foreign_on(&m, "n1"), foreign_on(&m, "n2")), (0, 3));
        assert!(!m.foreign().contains_key("n1"), "empty nodes are dropped: memory follows the pods");
        m.apply_pod(&watcher::Event::Delete(pod("p1", "n2", "3", false)));
        assert!(m.foreign().is_empty());
        assert_eq!(m.pod_uses().len(), 1, "the worker is still counted as a pod use");
    }

    #[test]
    fn a_relist_drops_what_was_deleted_meanwhile() {
        let mut m = ModelState::default();
        m.apply_pod(&watcher::Event::Apply(pod("gone", "n1", "2", false)));
        m.apply_pod(&watcher::Event::Init);
        m.apply_pod(&watcher::Event::InitApply(pod("kept", "n2", "1", false)));
        assert_eq!(foreign_on(&m, "n1"), 2, "the live model stands until the relist is done");
        m.apply_pod(&watcher::Event::InitDone);
        assert_eq!((foreign_on(&m, "n1"), foreign_on(&m, "n2")), (0, 1));
    }
}
