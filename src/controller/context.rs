use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{EventType, Recorder, Reporter};

use super::Error;
use super::stores::Stores;
use super::unseen::Unseen;
use super::view::{View, ViewCache};
use crate::cli::RunArgs;
use crate::telemetry::{ControllerLabels, ErrorLabels, Metrics};

/// How stale a view the status reconcilers (pools, allocations, quotas)
/// accept during a burst of changes: rebuilt once a second, not once per
/// change. The admission loop always plans on a fresh one.
pub const BURST_INTERVAL: Duration = Duration::from_secs(1);

/// When to reconcile again: after `wait`, or sooner if the view or plan used
/// was out of date (a newer one is due within [`BURST_INTERVAL`]).
pub fn requeue(stale: bool, wait: Option<Duration>) -> kube::runtime::controller::Action {
    match (stale, wait) {
        (true, wait) => {
            kube::runtime::controller::Action::requeue(wait.unwrap_or(Duration::MAX).min(2 * BURST_INTERVAL))
        }
        (false, Some(wait)) => kube::runtime::controller::Action::requeue(wait),
        (false, None) => kube::runtime::controller::Action::await_change(),
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    /// The settings that change admission decisions.
    pub settings: crate::admission::Settings,
    /// When this process started reconciling (after it took the lease): the
    /// ledger knows which pod disappearances it can have seen.
    pub reconciling_since: k8s_openapi::jiff::Timestamp,
    gone: GonePods,
    views: ViewCache,
    /// Worker pods created but not yet seen in the store, by "namespace/name".
    /// A second create would be refused (409) yet still charged to the
    /// namespace's ResourceQuota until the quota controller's next full
    /// resync, and enough such charges refuse real pods: so a pod is not
    /// created twice.
    created: Unseen<String>,
    backoff: Backoff,
    /// When each pool's status was last written.
    pool_written: Unseen<String>,
    /// Writes whose watch event has not come yet: see [`Context::superseded`].
    written: Unseen<String>,
}

/// How long a write may stay unseen before its object is reconciled anyway.
const WRITTEN_TTL: Duration = Duration::from_secs(15);
/// Longer than any pool status write interval.
const POOL_WRITTEN_TTL: Duration = Duration::from_secs(300);

/// Per-object retry delays after transient errors: doubling from
/// [`BACKOFF_BASE`] to [`BACKOFF_MAX`], reset by a successful reconcile.
#[derive(Default)]
struct Backoff(std::sync::Mutex<std::collections::HashMap<String, u32>>);

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Counts and times one reconcile when dropped, so error paths are measured too.
pub struct Measure<'a> {
    ctx: &'a Context,
    controller: &'static str,
    started: std::time::Instant,
}

impl Drop for Measure<'_> {
    fn drop(&mut self) {
        let labels = ControllerLabels { controller: self.controller };
        self.ctx.metrics.reconciliations.get_or_create(&labels).inc();
        self.ctx.metrics.reconcile_duration.get_or_create(&labels).observe(self.started.elapsed().as_secs_f64());
    }
}

/// When the watches saw pods go (UID -> ms since the epoch: the deletion time
/// if the pod had one, else the moment it left the store), for the ledger.
#[derive(Default)]
struct GonePods(std::sync::Mutex<std::collections::HashMap<String, i64>>);

/// How long the ledger may take to charge a pod that went.
const GONE_TTL_MILLIS: i64 = 600_000;

/// How long a created pod may stay unseen before it may be created again.
const CREATED_TTL: Duration = Duration::from_secs(15);

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, stores: Stores, args: &RunArgs) -> Arc<Self> {
        let reporter = Reporter { controller: super::FIELD_MANAGER.into(), instance: args.identity.clone() };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            views: ViewCache::new(Duration::from_secs(args.planning.node_grace_seconds), metrics.clone()),
            metrics,
            stores,
            settings: crate::admission::Settings {
                starvation_after: k8s_openapi::jiff::SignedDuration::from_secs(args.planning.starvation_seconds as i64),
                min_run: k8s_openapi::jiff::SignedDuration::from_secs(args.planning.min_run_seconds as i64),
            },
            created: Unseen::new(CREATED_TTL),
            backoff: Backoff::default(),
            reconciling_since: k8s_openapi::jiff::Timestamp::now(),
            gone: GonePods::default(),
            pool_written: Unseen::new(POOL_WRITTEN_TTL),
            written: Unseen::new(WRITTEN_TTL),
        })
    }

    /// Notes a successful write of `key`, decided on the copy at `from`
    /// (its resourceVersion; empty if there was none).
    pub fn wrote(&self, key: String, from: &str) {
        self.written.note(key, from, ());
    }

    /// Whether the store's copy of `key` (at resourceVersion `at`, empty if
    /// none) is one this process already wrote over: the write's own watch
    /// event is still to come.
    pub fn superseded(&self, key: &str, at: &str) -> bool {
        self.written.over(&key.to_string(), at).is_some()
    }

    /// The planned cluster of this moment, shared: at most [`BURST_INTERVAL`]
    /// old during bursts of changes; true when a newer one is due (look again
    /// soon).
    pub async fn recent_view(&self) -> (Arc<View>, bool) {
        self.views.get_recent(&self.stores, BURST_INTERVAL).await
    }

    /// The view the admission loop decides on: rebuilt if any store changed,
    /// unless the latest is younger than `reuse`.
    pub async fn admission_view(&self, reuse: Duration) -> Arc<View> {
        self.views.get_recent(&self.stores, reuse).await.0
    }

    /// Whether the pod was created a moment ago and the store has not shown it yet.
    pub fn recently_created(&self, key: &str) -> bool {
        self.created.age(&key.to_string()).is_some()
    }

    /// Remembers a pod just created (or found to exist already).
    pub fn pod_created(&self, key: String) {
        self.created.note(key, "", ());
    }

    /// Notes that the pod `uid` left the stores (at `deleted`, if it had a
    /// deletion time); entries older than [`GONE_TTL_MILLIS`] are dropped.
    pub fn saw_gone(&self, uid: &str, deleted: Option<i64>) {
        let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        let mut gone = self.gone.0.lock().expect("gone pods lock");
        gone.retain(|_, at| now - *at < GONE_TTL_MILLIS);
        gone.entry(uid.to_string()).or_insert(deleted.unwrap_or(now).min(now));
    }

    /// When the watches saw the pod `uid` go, if they did lately.
    pub fn seen_gone(&self, uid: &str) -> Option<i64> {
        self.gone.0.lock().expect("gone pods lock").get(uid).copied()
    }

    /// Forgets the pods the store shows, and those remembered too long.
    pub fn pods_seen(&self, seen: impl IntoIterator<Item = String>) {
        self.created.forget(seen);
    }

    /// How long until the pool's status may be written again, if it was
    /// written less than `every` ago.
    pub fn pool_write_due_in(&self, pool: &str, every: Duration) -> Option<Duration> {
        self.pool_written.age(&pool.to_string()).and_then(|age| every.checked_sub(age)).filter(|d| !d.is_zero())
    }

    /// Notes that the pool's status was written now.
    pub fn pool_written(&self, pool: &str) {
        self.pool_written.note(pool.to_string(), "", ());
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    pub async fn event(&self, on: &ObjectReference, type_: EventType, reason: &str, note: String) {
        super::apply::publish_event(&self.recorder, on, type_, reason, note).await;
    }

    /// Counts and times the reconcile that holds the guard.
    pub fn measure(&self, controller: &'static str) -> Measure<'_> {
        Measure { ctx: self, controller, started: std::time::Instant::now() }
    }

    pub fn count_error(&self, controller: &'static str, error: &Error) {
        self.metrics.reconcile_errors.get_or_create(&ErrorLabels { controller, category: error.category() }).inc();
    }

    /// The next retry delay of an object after a transient error.
    pub fn backoff_next(&self, key: &str) -> Duration {
        let mut map = self.backoff.0.lock().expect("backoff lock");
        let n = map.entry(key.to_string()).or_insert(0);
        let delay = BACKOFF_BASE.saturating_mul(1u32 << (*n).min(16)).min(BACKOFF_MAX);
        *n += 1;
        delay
    }

    /// A reconcile succeeded: its next error starts the backoff again.
    pub fn backoff_reset(&self, key: &str) {
        let mut map = self.backoff.0.lock().expect("backoff lock");
        if !map.is_empty() {
            map.remove(key);
        }
    }
}
