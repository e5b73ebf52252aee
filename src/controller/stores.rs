//! Shared reflectors: one watch per kind feeds an in-memory store that every
//! reconciler reads, so no reconcile ever LISTs the API. Each store publishes
//! a change signal (deletions included) for reconcilers with a cluster-wide
//! view, and the changed objects for reconcilers that map them to the few
//! objects they affect.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ResourceQuota, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

use super::lean::{Decoded, Lean};
use super::model::{Applied, Keyed, Model};
use crate::admission::job::Workload;
use crate::api::{AcceleratorPool, GpuAllocation, ModelProject, ProjectPhase};
pub use crate::snapshot::MANAGED_BY;
use crate::snapshot::{ALLOCATION_LABEL, PROJECT_LABEL};
use crate::workload::kinds::JobSet;

/// Changed objects a slow subscriber may lag behind before it misses some (it
/// then still gets the change signal and the periodic requeue).
const EVENT_BUFFER: usize = 1024;

/// A store, the signal that it changed, and the changed objects.
#[derive(Clone)]
pub struct Shared<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<K>,
    pub(crate) changed: watch::Receiver<()>,
    /// Signalled when an object left the store (deleted, or no longer selected).
    pub(crate) removed: watch::Receiver<()>,
    pub(crate) events: broadcast::Sender<Change<K>>,
}

impl<K: Resource + Clone + Send + Sync + 'static> Shared<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    /// Yields once per burst of changes: a watch channel keeps only the latest
    /// signal, so a slow reconciler sees one wake-up, not a backlog.
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        let mut rx = self.changed.clone();
        rx.mark_unchanged();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
    }

    /// Yields once per burst of removals (an object deleted or no longer
    /// selected, e.g. a pod that stopped running), and after a relist.
    pub fn removals(&self) -> impl Stream<Item = ()> + Send + 'static {
        let mut rx = self.removed.clone();
        rx.mark_unchanged();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
    }

    /// A store that holds `objects` and never changes (a kind the API server
    /// does not serve, or `plan`'s objects read once).
    pub fn fixed(objects: &[K]) -> Self
    where
        K::DynamicType: Default,
    {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(o.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let quiet = || watch::channel(()).1;
        Shared { store, changed: quiet(), removed: quiet(), events: broadcast::channel(1).0 }
    }

    /// Every applied or deleted object, as it happens. After a relist (the
    /// watch restarted) and when this subscriber fell behind, every object of
    /// the store is yielded instead: changes are never silently missed.
    pub fn events(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let state = (self.events.subscribe(), self.store.clone(), std::collections::VecDeque::new());
        futures::stream::unfold(state, |(mut rx, store, mut pending)| async move {
            loop {
                if let Some(obj) = pending.pop_front() {
                    return Some((obj, (rx, store, pending)));
                }
                match rx.recv().await {
                    Ok(Change::Object(obj)) => return Some((obj, (rx, store, pending))),
                    Ok(Change::Resync) => pending.extend(store.state()),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "event subscriber lagged: every object again");
                        pending = store.state().into();
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }
}

/// What a store's subscribers are told.
#[derive(Clone)]
pub(crate) enum Change<K> {
    /// One object was applied or deleted.
    Object(Arc<K>),
    /// The watch relisted: any object may have changed.
    Resync,
}

#[derive(Clone)]
pub struct Stores {
    pub nodes: Shared<Node>,
    pub pools: Shared<AcceleratorPool>,
    pub allocations: Shared<GpuAllocation>,
    /// Running pods only, stripped to what accounting needs.
    pub pods: Shared<Pod>,
    pub namespaces: Shared<Namespace>,
    /// The quotas this operator manages (spec only: their `used` is not kept).
    pub quotas: Shared<ResourceQuota>,
    /// The rendezvous Services this operator manages (one per tenant namespace).
    pub services: Shared<Service>,
    /// The rendezvous endpoints this operator manages (worker 0 of each gang).
    pub slices: Shared<EndpointSlice>,
    pub projects: Shared<ModelProject>,
    /// Batch Jobs labelled `sovereign.ai/allocation` (gangs of the admission loop).
    pub jobs: Shared<Job>,
    /// JobSets labelled `sovereign.ai/allocation` (gangs of the admission
    /// loop); empty where the API server serves no JobSets.
    pub jobsets: Shared<JobSet>,
    /// Whether JobSets were served at the start (else their store fills once they are).
    pub jobsets_at_start: bool,
    /// Worker pods of every project, in any phase.
    pub workers: Shared<Pod>,
    /// Worker pods by project ("namespace/project"), kept per watch event.
    pub workers_by_project: PodIndex,
    /// Worker pods by namespace, kept per watch event.
    pub workers_by_namespace: PodIndex,
    /// Pods labelled `sovereign.ai/allocation` that are not project workers,
    /// in any phase: the pods of admitted Jobs and JobSets (and tenants' own
    /// labelled pods), so the ledger reads their own end, and a JobSet's gated
    /// pods get their planned nodes. No more than the
    /// cluster keeps: they leave the store when their objects are deleted.
    pub workload_pods: Shared<Pod>,
    /// Those pods by namespace, kept per watch event.
    pub workload_pods_by_namespace: PodIndex,
    /// Running pods by namespace, kept per watch event.
    pub pods_by_namespace: PodIndex,
    /// Nodes and running pods as the planner needs them, kept per watch event.
    pub model: Model,
    /// Bumped on every change of a store that views read: the key of cached views.
    pub epoch: Arc<AtomicU64>,
}

impl Stores {
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        self.nodes.store.wait_until_ready().await?;
        self.pools.store.wait_until_ready().await?;
        self.allocations.store.wait_until_ready().await?;
        self.pods.store.wait_until_ready().await?;
        self.namespaces.store.wait_until_ready().await?;
        self.quotas.store.wait_until_ready().await?;
        self.services.store.wait_until_ready().await?;
        self.slices.store.wait_until_ready().await?;
        self.projects.store.wait_until_ready().await?;
        self.jobs.store.wait_until_ready().await?;
        // Not served at the start: nothing to wait for (it fills once they are).
        if self.jobsets_at_start {
            self.jobsets.store.wait_until_ready().await?;
        }
        self.workers.store.wait_until_ready().await?;
        self.workload_pods.store.wait_until_ready().await?;
        Ok(())
    }

    /// Yields once per burst of changes of what grants are planned from:
    /// nodes, pool specs and allocations' grants and phases.
    pub fn grant_inputs_changed(&self) -> impl Stream<Item = ()> + Send + 'static {
        futures::stream::select_all([
            self.nodes.changes().boxed(),
            self.pools.changes().boxed(),
            self.allocations.changes().boxed(),
        ])
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

/// Whether the API server serves JobSets (jobset.x-k8s.io/v1alpha2): the
/// JobSet controller may be installed or not, before or after the operator.
pub async fn jobsets_served(client: &Client) -> bool {
    match client.list_api_group_resources(&JobSet::api_version(&())).await {
        Ok(list) => list.resources.iter().any(|r| r.name == JobSet::plural(&())),
        Err(e) => {
            tracing::debug!(error = %e, "JobSets are not served");
            false
        }
    }
}

/// How often the operator asks again whether JobSets are served, when they
/// were not at its start: one small discovery GET.
pub const JOBSETS_RECHECK: Duration = Duration::from_secs(30);

/// Resolves once the API server serves JobSets, asking every `every`. The
/// JobSet controller installed after the operator: its labelled JobSets are
/// watched from then on, with no restart. (A watch of a kind not served would
/// fail and retry every second, with a warning each time.)
pub async fn jobsets_served_later(client: Client, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if jobsets_served(&client).await {
            tracing::info!("JobSets are served now: watching labelled JobSets");
            return;
        }
    }
}

/// Starts every reflector in the background; JobSets' once they are served
/// (`jobsets_at_start`: served now).
pub fn start(client: Client, jobsets_at_start: bool) -> Stores {
    let epoch = Arc::new(AtomicU64::new(0));
    let all = watcher::Config::default().any_semantic();
    // Heartbeat times and image lists change often and matter to no decision:
    // drop them so that memory stays proportional to the nodes.
    let model = Model::default();
    let on_node = model.clone();
    let nodes = shared_with(
        Api::<Lean<Node>>::all(client.clone()),
        all.clone(),
        &epoch,
        move |ev| on_node.apply_node(ev),
        |node: &mut Node| {
            if let Some(status) = node.status.as_mut() {
                status.images = None;
                status.node_info = None;
                for c in status.conditions.iter_mut().flatten() {
                    c.last_heartbeat_time = None;
                }
            }
        },
    );
    // What pools are is their spec: their status (counts of this operator's
    // own making) changes nothing anyone plans from.
    let pools = keyed(Api::<AcceleratorPool>::all(client.clone()), all.clone(), &epoch, Signal::Key(spec_key));
    // Everyone else plans from an allocation's grants and phase; the usage its
    // status rewrites with every pod started or ended is its reconciler's (which
    // hears every change), but the views read it for the ledger.
    let allocations = keyed(Api::<GpuAllocation>::all(client.clone()), all.clone(), &epoch, Signal::Wake(grant_key));
    let running = all.clone().fields("status.phase=Running");
    let on_pod = model.clone();
    let pods_by_namespace = PodIndex::by_namespace();
    let by_namespace = pods_by_namespace.clone();
    let pods = shared_with(
        Api::<Lean<Pod>>::all(client.clone()),
        running,
        &epoch,
        move |ev| {
            on_pod.apply_pod(ev);
            by_namespace.apply(ev);
        },
        strip_pod,
    );
    let namespaces =
        shared(Api::<Namespace>::all(client.clone()), all.clone(), &epoch, |ns: &mut Namespace| ns.spec = None);
    let managed = all.clone().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    // Views read nodes, pools, allocations, running pods and namespaces: only
    // their changes make a cached view stale.
    let not_viewed = Arc::new(AtomicU64::new(0));
    // A quota's status (`used`) changes with every pod created in its
    // namespace; only its spec is ever compared, so only that wakes anyone.
    let quotas =
        shared(Api::<ResourceQuota>::all(client.clone()), managed.clone(), &not_viewed, |q: &mut ResourceQuota| {
            q.status = None
        });
    let services =
        shared(Api::<Service>::all(client.clone()), managed.clone(), &not_viewed, |s: &mut Service| s.status = None);
    let slices = shared(Api::<EndpointSlice>::all(client.clone()), managed, &not_viewed, |_| {});
    // Admission wakes on what it reads of a project, not on every status write.
    let projects =
        keyed(Api::<Lean<ModelProject>>::all(client.clone()), all.clone(), &not_viewed, Signal::Key(admission_key));
    // Labelled Jobs only (the label opts in): admission wakes on what it reads
    // of one, not on every status update of its pods' counts.
    let jobs = keyed(
        Api::<Job>::all(client.clone()),
        all.clone().labels(ALLOCATION_LABEL),
        &not_viewed,
        Signal::Key(job_admission_key),
    );
    let jobsets_later: Option<BoxFuture<'static, ()>> = if jobsets_at_start {
        None
    } else {
        tracing::info!(
            every_s = JOBSETS_RECHECK.as_secs(),
            "JobSets are not served: labelled JobSets are watched once they are"
        );
        Some(jobsets_served_later(client.clone(), JOBSETS_RECHECK).boxed())
    };
    let jobsets = shared_signalled(
        Api::<JobSet>::all(client.clone()),
        all.clone().labels(ALLOCATION_LABEL),
        &not_viewed,
        |_| {},
        |_| {},
        Signal::Key(job_admission_key),
        jobsets_later,
    );
    let workload_pods_by_namespace = PodIndex::by_namespace();
    let by_namespace = workload_pods_by_namespace.clone();
    let workload_pods = shared_with(
        Api::<Lean<Pod>>::all(client.clone()),
        all.clone().labels(&format!("{ALLOCATION_LABEL},!{PROJECT_LABEL}")),
        &not_viewed,
        move |ev| by_namespace.apply(ev),
        strip_workload_pod,
    );
    let workers_by_project = PodIndex::by_project();
    let workers_by_namespace = PodIndex::by_namespace();
    let (by_project, by_namespace) = (workers_by_project.clone(), workers_by_namespace.clone());
    let workers = shared_with(
        Api::<Lean<Pod>>::all(client),
        all.labels(PROJECT_LABEL),
        &not_viewed,
        move |ev| {
            by_project.apply(ev);
            by_namespace.apply(ev);
        },
        |pod: &mut Pod| {
            if let Some(spec) = pod.spec.as_mut() {
                spec.volumes = None;
                for c in spec.containers.iter_mut() {
                    c.env = None;
                    c.env_from = None;
                    c.volume_mounts = None;
                }
            }
        },
    );
    Stores {
        nodes,
        pools,
        allocations,
        pods,
        namespaces,
        quotas,
        services,
        slices,
        projects,
        jobs,
        jobsets,
        jobsets_at_start,
        workers,
        workers_by_project,
        workers_by_namespace,
        workload_pods,
        workload_pods_by_namespace,
        pods_by_namespace,
        model,
        epoch,
    }
}

/// Keeps of a workload's pod what the ledger reads: identity, labels, owners,
/// node, container requests, phase, start and the containers' ends; and what
/// its placement reads: its scheduling gates and required node affinity.
fn strip_workload_pod(pod: &mut Pod) {
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone());
    let required = pod.spec.as_ref().and_then(|s| {
        let node = s.affinity.as_ref()?.node_affinity.as_ref()?;
        node.required_during_scheduling_ignored_during_execution.clone()
    });
    strip_pod(pod);
    if let (Some(spec), Some(required)) = (pod.spec.as_mut(), required) {
        spec.affinity = Some(k8s_openapi::api::core::v1::Affinity {
            node_affinity: Some(k8s_openapi::api::core::v1::NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(required),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.as_mut() {
        status.container_statuses = statuses.map(|cs| {
            cs.into_iter()
                .map(|c| k8s_openapi::api::core::v1::ContainerStatus {
                    name: c.name,
                    state: c.state,
                    ..Default::default()
                })
                .collect()
        });
    }
}

/// Keeps of a pod only what accounting and placement read: identity, labels,
/// node, container requests and phase.
fn strip_pod(pod: &mut Pod) {
    pod.metadata.annotations = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        for c in spec.containers.iter_mut() {
            c.env = None;
            c.env_from = None;
            c.command = None;
            c.args = None;
            c.volume_mounts = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
            c.ports = None;
        }
        spec.init_containers = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
    }
}

fn shared<K, W>(
    api: Api<W>,
    config: watcher::Config,
    epoch: &Arc<AtomicU64>,
    strip: impl FnMut(&mut K) + Send + 'static,
) -> Shared<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + serde::Serialize + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    W: Resource<DynamicType = K::DynamicType> + Decoded<K> + Clone + Debug + DeserializeOwned + Send + 'static,
{
    shared_with(api, config, epoch, |_| {}, strip)
}

/// [`shared`], with `index` called on every watch event (after the store).
fn shared_with<K, W>(
    api: Api<W>,
    config: watcher::Config,
    epoch: &Arc<AtomicU64>,
    index: impl FnMut(&watcher::Event<K>) + Send + 'static,
    strip: impl FnMut(&mut K) + Send + 'static,
) -> Shared<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + serde::Serialize + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    W: Resource<DynamicType = K::DynamicType> + Decoded<K> + Clone + Debug + DeserializeOwned + Send + 'static,
{
    shared_signalled(api, config, epoch, index, strip, Signal::Any, None)
}

/// A store kept whole (no index, nothing stripped but managedFields) whose
/// change signal and epoch move as `signal` says.
fn keyed<K, W>(api: Api<W>, config: watcher::Config, epoch: &Arc<AtomicU64>, signal: Signal<K>) -> Shared<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + serde::Serialize + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    W: Resource<DynamicType = K::DynamicType> + Decoded<K> + Clone + Debug + DeserializeOwned + Send + 'static,
{
    shared_signalled(api, config, epoch, |_| {}, |_| {}, signal, None)
}

/// Which changes of a store's objects move its change signal and the view
/// epoch (the Events stream sees every change whatever this says).
#[derive(Clone, Copy)]
enum Signal<K> {
    /// Any change of what the store keeps moves both.
    Any,
    /// Only a change of this key moves either: no view reads the rest.
    Key(fn(&K) -> u64),
    /// Only a change of this key wakes the subscribers; any change moves the
    /// epoch, since views read the rest.
    Wake(fn(&K) -> u64),
}

/// [`shared_with`], with the change signal and the epoch moved as `signal`
/// says, and the watch started once `after` resolves (if given).
fn shared_signalled<K, W>(
    api: Api<W>,
    config: watcher::Config,
    epoch: &Arc<AtomicU64>,
    mut index: impl FnMut(&watcher::Event<K>) + Send + 'static,
    mut strip: impl FnMut(&mut K) + Send + 'static,
    signal: Signal<K>,
    after: Option<BoxFuture<'static, ()>>,
) -> Shared<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + serde::Serialize + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    W: Resource<DynamicType = K::DynamicType> + Decoded<K> + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let (store, writer) = reflector::store();
    let (tx, changed) = watch::channel(());
    let (gone, removed) = watch::channel(());
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    // No decision reads managedFields: never kept, whatever the kind.
    let strip = move |obj: &mut K| {
        obj.meta_mut().managed_fields = None;
        strip(obj)
    };
    let stream = watcher(api, config)
        .map_ok(|event| match event {
            watcher::Event::Apply(obj) => watcher::Event::Apply(obj.kept()),
            watcher::Event::Delete(obj) => watcher::Event::Delete(obj.kept()),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitApply(obj) => watcher::Event::InitApply(obj.kept()),
            watcher::Event::InitDone => watcher::Event::InitDone,
        })
        .backoff(WatchBackoff::default())
        .modify(strip)
        .reflect(writer);
    let (epoch, sender) = (epoch.clone(), events.clone());
    let (mut seen, mut signalled) = (Fingerprints::default(), Fingerprints::default());
    let follow = stream.for_each(move |mut event| {
        if let Ok(ev) = &event {
            index(ev);
        }
        let print = match &mut event {
            Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj) | watcher::Event::InitApply(obj)) => {
                fingerprint(obj)
            }
            _ => 0,
        };
        let significant = event.as_ref().is_ok_and(|ev| seen.observe(ev, |_| print));
        let (signals, viewed) = match signal {
            Signal::Any => (significant, significant),
            Signal::Key(key) => {
                let moved = event.as_ref().is_ok_and(|ev| signalled.observe(ev, key));
                (moved, moved)
            }
            Signal::Wake(key) => (event.as_ref().is_ok_and(|ev| signalled.observe(ev, key)), significant),
        };
        if matches!(event, Ok(watcher::Event::Delete(_) | watcher::Event::InitDone)) {
            gone.send_replace(());
        }
        match event {
            Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj)) if significant => {
                let _ = sender.send(Change::Object(Arc::new(obj)));
                if viewed {
                    epoch.fetch_add(1, Ordering::AcqRel);
                }
                if signals {
                    tx.send_replace(());
                }
            }
            Ok(watcher::Event::InitDone) => {
                epoch.fetch_add(1, Ordering::AcqRel);
                let _ = sender.send(Change::Resync);
                tx.send_replace(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "watch error; retrying with backoff"),
        }
        futures::future::ready(())
    });
    tokio::spawn(async move {
        if let Some(after) = after {
            after.await;
        }
        follow.await
    });
    Shared { store, changed, removed, events }
}

/// Watch retries: 250 ms doubling to 1 s, reset by the first good event.
/// kube's default grows to 30 s, so after an API server outage the stores
/// (and every admission) could wait ~15 s for the next try; and kube 5 keeps
/// the constructor of its jittered `ExponentialBackoff` private, so its
/// bounds cannot be set (`watcher::DefaultBackoff` is the only one offered).
/// Without jitter: one operator's few watches do not stampede a restarted
/// API server.
struct WatchBackoff(Duration);

const WATCH_RETRY_FIRST: Duration = Duration::from_millis(250);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(1);

impl Default for WatchBackoff {
    fn default() -> Self {
        Self(WATCH_RETRY_FIRST)
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let delay = self.0;
        self.0 = (self.0 * 2).min(WATCH_RETRY_MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0 = WATCH_RETRY_FIRST;
    }
}

/// What each object of a store looked like, as a hash of its kept content
/// without its resourceVersion: an update that changes nothing the store keeps
/// (a node heartbeat, whose times are stripped) wakes nobody. At national
/// scale those are a few node updates a second that would each replan.
#[derive(Default)]
struct Fingerprints(Keyed<u64>);

impl Fingerprints {
    /// Records the event; true when it changed what the store keeps.
    fn observe<K: Resource>(&mut self, event: &watcher::Event<K>, key: impl Fn(&K) -> u64) -> bool {
        match self.0.apply(event, |obj| Some(key(obj))) {
            Applied::One { old, new } => old != new,
            Applied::All | Applied::Nothing => true,
        }
    }
}

/// What admission reads of a project: its spec, whether it is being deleted,
/// and whether it waits, holds devices or neither. A queue reason rewritten or
/// a run turning Running changes none of it (the loop need not wake for them).
fn admission_key(p: &ModelProject) -> u64 {
    use std::hash::{Hash, Hasher};
    let status = p.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    let waits = matches!(phase, None | Some(ProjectPhase::Queued | ProjectPhase::Restarting));
    let retry = status.and_then(|s| s.retry_after.as_ref()).map(|t| t.0.as_second());
    let mut h = std::hash::DefaultHasher::new();
    (spec_key(p), waits, crate::api::holds_devices(phase), retry).hash(&mut h);
    h.finish()
}

/// What admission reads of a labelled workload: its spec (suspend included),
/// whether it is being deleted, the admission annotations and whether it finished.
fn job_admission_key<W: Workload>(j: &W) -> u64 {
    use std::hash::{Hash, Hasher};
    let admitted = j.meta().annotations.as_ref().and_then(|a| a.get(crate::admission::job::ADMITTED_POOL));
    let mut h = std::hash::DefaultHasher::new();
    (spec_key(j), admitted, j.finished()).hash(&mut h);
    h.finish()
}

/// What the rest of the cluster plans from an allocation: its spec, whether
/// it is being deleted, and its phase (which its window, budget and capacity
/// move, once the allocation reconciler writes it).
fn grant_key(a: &GpuAllocation) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (spec_key(a), a.status.as_ref().and_then(|s| s.phase)).hash(&mut h);
    h.finish()
}

/// What an object's spec is: a status write leaves it alone.
fn spec_key<K: Resource>(obj: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let meta = obj.meta();
    let mut h = std::hash::DefaultHasher::new();
    (&meta.uid, meta.generation, meta.deletion_timestamp.is_some()).hash(&mut h);
    h.finish()
}

fn fingerprint<K: Resource + serde::Serialize>(obj: &mut K) -> u64 {
    use std::hash::Hasher;
    /// Hashes the JSON as it is written: no JSON value or string built.
    struct HashWriter(std::hash::DefaultHasher);
    impl std::io::Write for HashWriter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.write(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Hashed without its resourceVersion (set aside, not cloned away) and
    // managedFields (never kept).
    let version = obj.meta_mut().resource_version.take();
    let managed = obj.meta_mut().managed_fields.take();
    let mut w = HashWriter(std::hash::DefaultHasher::new());
    let _ = serde_json::to_writer(&mut w, &*obj);
    obj.meta_mut().resource_version = version;
    obj.meta_mut().managed_fields = managed;
    w.0.finish()
}

/// Pod names grouped by a key of the pod (a project, a namespace), updated per
/// watch event, so that a reconcile reads its own pods without scanning all.
#[derive(Clone)]
pub struct PodIndex {
    state: Arc<std::sync::RwLock<IndexState>>,
    key: fn(&Pod) -> Option<String>,
}

type Groups = std::collections::HashMap<String, std::collections::BTreeSet<String>>;

#[derive(Default)]
struct IndexState {
    groups: Groups,
    /// Built during a relist, swapped in when it is done.
    relisting: Option<Groups>,
}

impl PodIndex {
    /// Worker pods by "namespace/project".
    pub fn by_project() -> Self {
        Self::new(|pod| {
            Some(format!(
                "{}/{}",
                pod.metadata.namespace.as_deref()?,
                pod.metadata.labels.as_ref()?.get(PROJECT_LABEL)?
            ))
        })
    }

    /// Pods by namespace.
    pub fn by_namespace() -> Self {
        Self::new(|pod| pod.metadata.namespace.clone())
    }

    fn new(key: fn(&Pod) -> Option<String>) -> Self {
        Self { state: Default::default(), key }
    }

    /// The index of `pods`, as a watch that listed them would have built it.
    pub fn of(self, pods: &[Pod]) -> Self {
        for pod in pods {
            self.apply(&watcher::Event::Apply(pod.clone()));
        }
        self
    }

    fn entry(&self, pod: &Pod) -> Option<(String, String)> {
        Some(((self.key)(pod)?, pod.metadata.name.clone()?))
    }

    fn apply(&self, event: &watcher::Event<Pod>) {
        let mut s = self.state.write().expect("pod index lock");
        match event {
            watcher::Event::Apply(pod) => {
                if let Some((k, name)) = self.entry(pod) {
                    s.groups.entry(k).or_default().insert(name);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some((k, name)) = self.entry(pod)
                    && let Some(set) = s.groups.get_mut(&k)
                {
                    set.remove(&name);
                    if set.is_empty() {
                        s.groups.remove(&k);
                    }
                }
            }
            watcher::Event::Init => s.relisting = Some(Default::default()),
            watcher::Event::InitApply(pod) => {
                if let (Some((k, name)), Some(next)) = (self.entry(pod), s.relisting.as_mut()) {
                    next.entry(k).or_default().insert(name);
                }
            }
            watcher::Event::InitDone => {
                if let Some(next) = s.relisting.take() {
                    s.groups = next;
                }
            }
        }
    }

    /// Names of the pods under `key` (for a namespace, the pods' names; for a
    /// project, "namespace/project").
    pub fn names(&self, key: &str) -> Vec<String> {
        let s = self.state.read().expect("pod index lock");
        s.groups.get(key).map(|set| set.iter().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_ignores_the_resource_version_and_managed_fields_only() {
        let node = |rv: &str, zone: &str, managed: bool| -> Node {
            let mut n: Node = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "n1", "resourceVersion": rv, "labels": {"zone": zone}},
                "status": {"capacity": {"nvidia.com/gpu": "8"}}
            }))
            .unwrap();
            if managed {
                n.metadata.managed_fields = Some(vec![Default::default()]);
            }
            n
        };
        let print = |mut n: Node| {
            let before = n.clone();
            let print = fingerprint(&mut n);
            assert_eq!(n, before, "the object is left as it was");
            print
        };
        let base = print(node("1", "a", false));
        assert_eq!(base, print(node("2", "a", false)), "a new resourceVersion alone changes nothing kept");
        assert_eq!(base, print(node("3", "a", true)), "nor do managedFields");
        assert_ne!(base, print(node("2", "b", false)), "a label does");
    }

    #[test]
    fn a_pod_index_follows_applies_deletes_and_relists_per_group() {
        let pod = |ns: &str, name: &str, project: Option<&str>| -> Pod {
            let labels = project.map(|p| serde_json::json!({ PROJECT_LABEL: p })).unwrap_or(serde_json::json!({}));
            serde_json::from_value(serde_json::json!({"metadata": {"namespace": ns, "name": name, "labels": labels}}))
                .unwrap()
        };
        let by_ns = PodIndex::by_namespace();
        let by_project = PodIndex::by_project();
        let apply = |ev: watcher::Event<Pod>| {
            by_ns.apply(&ev);
            by_project.apply(&ev);
        };
        apply(watcher::Event::Apply(pod("a", "w0", Some("p"))));
        apply(watcher::Event::Apply(pod("a", "w1", Some("p"))));
        apply(watcher::Event::Apply(pod("a", "plain", None)));
        apply(watcher::Event::Apply(pod("b", "w0", Some("p"))));
        apply(watcher::Event::Apply(pod("a", "w0", Some("p"))));
        assert_eq!(by_ns.names("a"), ["plain", "w0", "w1"], "an update is not a second entry");
        assert_eq!(by_ns.names("b"), ["w0"]);
        assert_eq!(by_project.names("a/p"), ["w0", "w1"], "a pod without the label is no project's");
        assert_eq!(by_project.names("b/p"), ["w0"], "projects are per namespace");

        apply(watcher::Event::Delete(pod("a", "w1", Some("p"))));
        apply(watcher::Event::Delete(pod("b", "w0", Some("p"))));
        assert_eq!(by_ns.names("a"), ["plain", "w0"]);
        assert!(by_ns.names("b").is_empty() && by_project.names("b/p").is_empty());

        // A relist keeps answering from the old groups until it is done.
        apply(watcher::Event::Init);
        apply(watcher::Event::InitApply(pod("c", "w9", Some("q"))));
        assert_eq!(by_ns.names("a"), ["plain", "w0"], "mid-relist: the groups before it");
        apply(watcher::Event::InitDone);
        assert!(by_ns.names("a").is_empty(), "what the relist did not list is gone");
        assert_eq!(by_ns.names("c"), ["w9"]);
        assert_eq!(by_project.names("c/q"), ["w9"]);

        let of = PodIndex::by_namespace().of(&[pod("d", "x", None), pod("d", "y", Some("p"))]);
        assert_eq!(of.names("d"), ["x", "y"]);
    }

    /// The JobSet controller installed after the operator: the operator asks
    /// discovery again until JobSets are served, and the JobSet watch starts
    /// only then (a mocked API server: 404, then served, then the LIST).
    #[tokio::test]
    async fn jobsets_installed_after_the_start_are_watched_once_served() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (gate, opened) = tokio::sync::oneshot::channel::<()>();
        let later = {
            let client = client.clone();
            async move {
                jobsets_served_later(client, Duration::from_millis(1)).await;
                let _ = gate.send(());
            }
        };
        let jobsets: Shared<JobSet> = shared_signalled(
            Api::<JobSet>::all(client),
            watcher::Config::default().labels(ALLOCATION_LABEL),
            &Arc::new(AtomicU64::new(0)),
            |_| {},
            |_| {},
            Signal::Any,
            Some(later.boxed()),
        );
        let respond = |code: u16, body: serde_json::Value| {
            Response::builder().status(code).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap()
        };
        let mut next = async || {
            let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .expect("a request within 5 s")
                .expect("the client is alive");
            (req.uri().to_string(), send)
        };
        // Not served: discovery says 404, and nothing is watched.
        let (uri, send) = next().await;
        assert_eq!(uri, "/apis/jobset.x-k8s.io/v1alpha2");
        send.send_response(respond(404, serde_json::json!({"kind": "Status", "code": 404})));
        // Installed: discovery lists jobsets.
        let (uri, send) = next().await;
        assert_eq!(uri, "/apis/jobset.x-k8s.io/v1alpha2", "asked again, and nothing else");
        send.send_response(respond(
            200,
            serde_json::json!({"kind": "APIResourceList", "groupVersion": "jobset.x-k8s.io/v1alpha2",
                "resources": [{"name": "jobsets", "singularName": "jobset", "namespaced": true, "kind": "JobSet",
                               "verbs": ["list", "watch"]}]}),
        ));
        opened.await.expect("the gate opened once served");
        // Then the watch starts: the first LIST of labelled JobSets.
        let (uri, send) = next().await;
        assert!(uri.starts_with("/apis/jobset.x-k8s.io/v1alpha2/jobsets?"), "{uri}");
        assert!(uri.contains("labelSelector=sovereign.ai%2Fallocation"), "{uri}");
        send.send_response(respond(
            200,
            serde_json::json!({"kind": "JobSetList", "apiVersion": "jobset.x-k8s.io/v1alpha2",
                "metadata": {"resourceVersion": "1"}, "items": []}),
        ));
        tokio::time::timeout(Duration::from_secs(5), jobsets.store.wait_until_ready())
            .await
            .expect("the store is ready once listed")
            .expect("ready");
    }
}
