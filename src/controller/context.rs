use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::Error;
use super::stores::Stores;
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
    /// After waiting this long, the head of an allocation's queue stops backfill.
    pub starvation_after: k8s_openapi::jiff::SignedDuration,
    /// How long a run admitted by preemption cannot itself be preempted.
    pub min_run_time: k8s_openapi::jiff::SignedDuration,
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
    created: Stamps,
    backoff: Backoff,
    /// When each pool's status was last written.
    pool_written: Stamps,
    /// Writes whose watch event has not come yet: see [`Context::superseded`].
    written: Written,
}

/// Objects this process just wrote, by key, with the resourceVersion of the
/// copy each write was decided on. Until the store shows the write, another
/// reconcile of that copy would only decide the same again: its write is
/// refused (409) or repeats what was applied. The write's own watch event
/// reconciles the object once the store has it.
#[derive(Default)]
struct Written(std::sync::Mutex<WrittenKeys>);

#[derive(Default)]
struct WrittenKeys {
    by_key: std::collections::HashMap<String, (String, std::time::Instant)>,
    /// When writes never seen (their object deleted meanwhile) were last dropped.
    pruned: Option<std::time::Instant>,
}

/// How long a write may stay unseen before its object is reconciled anyway.
const WRITTEN_TTL: Duration = Duration::from_secs(15);

impl Written {
    fn note(&self, key: String, from: &str, ttl: Duration) {
        let mut w = self.0.lock().expect("written lock");
        let now = std::time::Instant::now();
        // Once per `ttl`, not per write: memory stays bounded by the writes of one ttl.
        if w.pruned.is_none_or(|at| now.duration_since(at) >= ttl) {
            w.by_key.retain(|_, (_, when)| now.duration_since(*when) < ttl);
            w.pruned = Some(now);
        }
        w.by_key.insert(key, (from.to_string(), now));
    }

    /// True while the store still shows the copy the write replaced; the
    /// write is forgotten once the store moved on, or after `ttl`.
    fn superseded(&self, key: &str, at: &str, ttl: Duration) -> bool {
        let mut w = self.0.lock().expect("written lock");
        match w.by_key.get(key) {
            Some((from, when)) if from == at && when.elapsed() < ttl => true,
            Some(_) => {
                w.by_key.remove(key);
                false
            }
            None => false,
        }
    }
}

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

/// When something happened to each key (a pod created, a status written).
#[derive(Default)]
struct Stamps(std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

impl Stamps {
    fn note(&self, key: String) {
        self.0.lock().expect("stamps lock").insert(key, std::time::Instant::now());
    }

    /// How long ago it happened to `key`, if it was noted.
    fn age(&self, key: &str) -> Option<Duration> {
        self.0.lock().expect("stamps lock").get(key).map(|at| at.elapsed())
    }

    /// Forgets `keys`, and every key noted longer than `ttl` ago.
    fn forget(&self, keys: impl IntoIterator<Item = String>, ttl: Duration) {
        let mut map = self.0.lock().expect("stamps lock");
        for k in keys {
            map.remove(&k);
        }
        map.retain(|_, at| at.elapsed() < ttl);
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
            starvation_after: k8s_openapi::jiff::SignedDuration::from_secs(args.planning.starvation_seconds as i64),
            min_run_time: k8s_openapi::jiff::SignedDuration::from_secs(args.planning.min_run_seconds as i64),
            created: Stamps::default(),
            backoff: Backoff::default(),
            reconciling_since: k8s_openapi::jiff::Timestamp::now(),
            gone: GonePods::default(),
            pool_written: Stamps::default(),
            written: Written::default(),
        })
    }

    /// Notes a successful write of `key`, decided on the copy at `from`
    /// (its resourceVersion; empty if there was none).
    pub fn wrote(&self, key: String, from: &str) {
        self.written.note(key, from, WRITTEN_TTL);
    }

    /// Whether the store's copy of `key` (at resourceVersion `at`, empty if
    /// none) is one this process already wrote over: the write's own watch
    /// event is still to come.
    pub fn superseded(&self, key: &str, at: &str) -> bool {
        self.written.superseded(key, at, WRITTEN_TTL)
    }

    /// The planned cluster of this moment, shared: at most [`BURST_INTERVAL`]
    /// old during bursts of changes; true when a newer one is due (look again
    /// soon).
    pub async fn recent_view(&self) -> (Arc<View>, bool) {
        self.views.get_recent(&self.stores, BURST_INTERVAL).await
    }

    /// The planned cluster of this moment, rebuilt if any store changed: what
    /// the admission loop decides on.
    pub async fn fresh_view(&self) -> Arc<View> {
        self.views.get_recent(&self.stores, Duration::ZERO).await.0
    }

    /// The project of a queue key ("namespace/name") in the store.
    pub fn project(&self, key: &str) -> Option<Arc<crate::api::ModelProject>> {
        let (ns, name) = key.split_once('/')?;
        self.stores.projects.store.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))
    }

    /// Whether the pod was created a moment ago and the store has not shown it yet.
    pub fn recently_created(&self, key: &str) -> bool {
        self.created.age(key).is_some_and(|age| age < CREATED_TTL)
    }

    /// Remembers a pod just created (or found to exist already).
    pub fn pod_created(&self, key: String) {
        self.created.note(key);
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
        self.created.forget(seen, CREATED_TTL);
    }

    /// How long until the pool's status may be written again, if it was
    /// written less than `every` ago.
    pub fn pool_write_due_in(&self, pool: &str, every: Duration) -> Option<Duration> {
        self.pool_written.age(pool).and_then(|age| every.checked_sub(age)).filter(|d| !d.is_zero())
    }

    /// Notes that the pool's status was written now.
    pub fn pool_written(&self, pool: &str) {
        self.pool_written.note(pool.to_string());
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    pub async fn event(&self, on: &ObjectReference, warning: bool, reason: &str, note: String) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(truncate(note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, on).await {
            tracing::warn!(error = %e, reason, "cannot publish event");
        }
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

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_supersedes_the_copy_it_replaced_until_the_store_moves_on() {
        let w = Written::default();
        let ttl = Duration::from_secs(60);
        assert!(!w.superseded("p", "1", ttl), "nothing written");
        w.note("p".into(), "1", ttl);
        assert!(w.superseded("p", "1", ttl), "the store still shows the old copy");
        assert!(!w.superseded("q", "1", ttl), "another object");
        assert!(!w.superseded("p", "2", ttl), "the store shows the write");
        assert!(!w.superseded("p", "1", ttl), "forgotten once seen");
        w.note("s".into(), "", ttl);
        assert!(w.superseded("s", "", ttl), "created: the store had none");
        assert!(!w.superseded("s", "", Duration::ZERO), "expired: reconciled anyway");
    }
}
