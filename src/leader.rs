//! Leader election over a `coordination.k8s.io/v1` Lease, built so that two
//! replicas never act at the same time.
//!
//! - **Acquire**: a standby takes the Lease when it is free (no holder: released
//!   on shutdown) or when its holder has not renewed it for the holder's
//!   `leaseDurationSeconds`, measured on this replica's clock from the moment it
//!   *saw* the last change (as client-go does: no trust in the holder's clock).
//!   Every write carries the `resourceVersion` read, so of two candidates only
//!   one wins. A standby watches the Lease, so a release is seen at once.
//! - **Renew**: the leader renews every `retry_period`. A watchdog (its own OS
//!   thread, so a held runtime cannot hold it) stops the process the moment no
//!   renewal has succeeded for `renew_deadline`, which is
//!   shorter than the lease duration: the old leader is gone at least
//!   `lease_duration - renew_deadline` before any standby may take over, whether
//!   the API server is down, slow, or the Lease was taken.
//! - **Release**: on SIGTERM, once the controllers have stopped, the leader
//!   clears `holderIdentity`, so a standby acts within its next watch event.
//!
//! Standbys start their reflectors before they wait for the Lease: they are
//! ready (`/readyz` 200) once the caches are synced, which is what a rollout
//! waits for, and they take over with warm caches.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::time::Instant;

/// Timings and names of the election (flags of `run`).
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a Lease that is not renewed keeps standbys out.
    pub lease_duration: Duration,
    /// How long the leader goes on without a successful renewal before it
    /// stops; shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// Interval of renewals and of standbys' attempts.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// From the flags of `run`. The identity is the pod name (or
    /// `sovereign-operator`) plus a suffix unique to this process, so that a
    /// restarted container is a new candidate, never the old holder.
    pub fn from_args(args: &crate::cli::RunArgs) -> Self {
        let base = args.identity.clone().unwrap_or_else(|| "sovereign-operator".to_string());
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self {
            lease_name: "sovereign-operator-leader".to_string(),
            namespace: args.lease_namespace.clone(),
            identity: format!("{base}_{:x}{:x}", std::process::id(), started.subsec_nanos()),
            lease_duration: Duration::from_secs(args.lease_duration_seconds),
            renew_deadline: Duration::from_secs(args.renew_deadline_seconds),
            retry_period: Duration::from_secs(args.retry_period_seconds),
        }
    }

    /// The timings are safe: retry < renew deadline < lease duration.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!(
                "the retry period ({:?}) must be positive and shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// What a replica does with the Lease it read.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Create it (absent) or take it (free or expired).
    Acquire,
    /// It is ours: renew it.
    Renew,
    /// Someone else holds it and is in time: wait (at most this long).
    Wait(Duration),
}

/// Decides from the Lease's holder, its duration and how long ago this replica
/// saw its last change (`None`: no Lease exists).
pub fn decide(holder: Option<&str>, duration: Duration, seen_unchanged_for: Duration, me: &str) -> Step {
    match holder {
        Some(h) if h == me => Step::Renew,
        Some(h) if !h.is_empty() && seen_unchanged_for < duration => Step::Wait(duration - seen_unchanged_for),
        _ => Step::Acquire,
    }
}

/// Stops the process once no renewal was recorded for `deadline`. It runs on
/// its own OS thread, not on the runtime: the runtime has one thread, and a
/// task that held it (or a stalled timer) would otherwise hold the watchdog
/// too, past the deadline and into a standby's term.
#[derive(Clone)]
pub struct Watchdog {
    shared: std::sync::Arc<(std::sync::Mutex<Renewals>, std::sync::Condvar)>,
}

struct Renewals {
    last: std::time::Instant,
    stopped: bool,
}

impl Watchdog {
    /// Counts the deadline from now; `on_lost` runs on the watchdog's thread.
    pub fn start(deadline: Duration, on_lost: fn()) -> Self {
        let renewals = Renewals { last: std::time::Instant::now(), stopped: false };
        let shared = std::sync::Arc::new((std::sync::Mutex::new(renewals), std::sync::Condvar::new()));
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("lease-watchdog".into())
            .spawn(move || {
                let (lock, wake) = &*watched;
                let mut renewals = lock.lock().expect("watchdog lock");
                loop {
                    if renewals.stopped {
                        return;
                    }
                    let until = renewals.last + deadline;
                    let now = std::time::Instant::now();
                    if now >= until {
                        break;
                    }
                    renewals = wake.wait_timeout(renewals, until - now).expect("watchdog lock").0;
                }
                drop(renewals);
                tracing::error!(
                    deadline_secs = deadline.as_secs_f64(),
                    "no lease renewal within the renew deadline; stopping"
                );
                on_lost();
            })
            .expect("spawn the lease watchdog thread");
        Self { shared }
    }

    /// Records a successful renewal that started at `at`.
    pub fn renewed(&self, at: std::time::Instant) {
        let mut renewals = self.shared.0.lock().expect("watchdog lock");
        renewals.last = renewals.last.max(at);
    }

    /// When the last recorded renewal started.
    pub fn last(&self) -> std::time::Instant {
        self.shared.0.lock().expect("watchdog lock").last
    }

    /// Disarms it (the Lease is being released): `on_lost` will not run.
    pub fn stop(&self) {
        self.shared.0.lock().expect("watchdog lock").stopped = true;
        self.shared.1.notify_all();
    }
}

/// The result of one attempt to acquire or renew the Lease.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease now.
    Held,
    /// Another replica holds it and is in time: try again after at most this long.
    HeldByOther(Duration),
    /// The Lease changed between this replica's read and its write (409): a
    /// candidate won the race, or this leader's own earlier renewal, given up
    /// on by its timeout, landed late. The next read tells which.
    Conflict,
}

/// The last version of the Lease this replica saw, and when it changed.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

/// One replica's view of the election.
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    observed: Option<Observed>,
}

impl Elector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self { api: Api::namespaced(client, &config.namespace), config, observed: None }
    }

    fn duration_secs(&self) -> i32 {
        self.config.lease_duration.as_secs().max(1) as i32
    }

    fn now() -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::now())
    }

    /// One attempt to take or keep the Lease.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.lease_name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let changed = match &self.observed {
            Some(o) => o.holder != spec.holder_identity || o.renew_time != spec.renew_time,
            None => true,
        };
        if changed {
            self.observed = Some(Observed {
                holder: spec.holder_identity.clone(),
                renew_time: spec.renew_time.clone(),
                at: Instant::now(),
            });
        }
        let seen_for = self.observed.as_ref().map(|o| o.at.elapsed()).unwrap_or_default();
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(self.duration_secs()).max(1) as u64);
        let step = decide(spec.holder_identity.as_deref(), duration, seen_for, &self.config.identity);
        let mut next = lease.clone();
        let new_spec = next.spec.get_or_insert_with(Default::default);
        match step {
            Step::Wait(left) => return Ok(Attempt::HeldByOther(left.min(self.config.retry_period))),
            Step::Renew => {
                new_spec.renew_time = Some(Self::now());
                new_spec.lease_duration_seconds = Some(self.duration_secs());
            }
            Step::Acquire => {
                let transitions = new_spec.lease_transitions.unwrap_or(0);
                new_spec.holder_identity = Some(self.config.identity.clone());
                new_spec.lease_duration_seconds = Some(self.duration_secs());
                new_spec.acquire_time = Some(Self::now());
                new_spec.renew_time = Some(Self::now());
                new_spec.lease_transitions = Some(transitions + 1);
            }
        }
        // `next` carries the resourceVersion read: a concurrent write makes this a 409.
        match self.api.replace(&self.config.lease_name, &PostParams::default(), &next).await {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Clears the holder if it is this replica (a shutdown that lets a standby
    /// take over at once).
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(Self::now());
        spec.lease_duration_seconds = Some(1);
        self.api.replace(&self.config.lease_name, &PostParams::default(), &lease).await?;
        Ok(())
    }
}

/// This replica holds the Lease. Renews it in the background and calls
/// `on_lost` (which must stop all acting at once) as soon as the renew deadline
/// passes without a successful renewal or the Lease is taken.
pub struct Leadership {
    elector: std::sync::Arc<tokio::sync::Mutex<Elector>>,
    renewer: tokio::task::JoinHandle<()>,
    watchdog: Watchdog,
}

impl Leadership {
    /// Stops renewing, then releases the Lease (bounded by `timeout`).
    pub async fn release(self, timeout: Duration) {
        self.watchdog.stop();
        self.renewer.abort();
        let _ = self.renewer.await;
        let elector = self.elector.lock().await;
        match tokio::time::timeout(timeout, elector.release()).await {
            Ok(Ok(())) => tracing::info!("released the leader lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader lease"),
            Err(_) => tracing::warn!("timed out releasing the leader lease"),
        }
    }
}

/// What a replica that lost the Lease does: exit at once (the kubelet restarts
/// it as a standby); nothing it started can act any more.
pub fn exit_now() {
    std::process::exit(1);
}

/// Waits until this replica holds the Lease, then keeps it (see [`Leadership`]).
pub async fn acquire(client: Client, config: LeaderConfig, on_lost: fn()) -> anyhow::Result<Leadership> {
    config.validate().map_err(anyhow::Error::msg)?;
    let retry = config.retry_period;
    let request_timeout = config.renew_deadline;
    let fields = format!("metadata.name={}", config.lease_name);
    let changes = watcher(
        Api::<Lease>::namespaced(client.clone(), &config.namespace),
        watcher::Config::default().fields(&fields),
    );
    let mut changes = std::pin::pin!(changes);
    let mut elector = Elector::new(client, config);
    loop {
        let wait = match tokio::time::timeout(request_timeout, elector.try_acquire_or_renew()).await {
            Ok(Ok(Attempt::Held)) => break,
            Ok(Ok(Attempt::HeldByOther(wait))) => wait,
            Ok(Ok(Attempt::Conflict)) => retry,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader election attempt failed");
                retry
            }
            Err(_) => retry,
        };
        // the next attempt: when the Lease changes (a release), or after `wait`
        tokio::select! {
            _ = changes.next() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!(identity = %elector.config.identity, "acquired the leader lease");
    let deadline = elector.config.renew_deadline;
    let watchdog = Watchdog::start(deadline, on_lost);
    let elector = std::sync::Arc::new(tokio::sync::Mutex::new(elector));
    let renewer = {
        let elector = elector.clone();
        let watchdog = watchdog.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(retry).await;
                let mut e = elector.lock().await;
                // As client-go: an attempt may take until the renew deadline (the
                // watchdog stops the process then anyway), so one slow answer of
                // a loaded API server is not a lost term. The renewal counts
                // from when the attempt started: the Lease says so no later.
                let started = std::time::Instant::now();
                let left = (watchdog.last() + deadline).saturating_duration_since(started).max(retry);
                match tokio::time::timeout(left, e.try_acquire_or_renew()).await {
                    Ok(Ok(Attempt::Held)) => watchdog.renewed(started),
                    Ok(Ok(Attempt::HeldByOther(_))) => {
                        tracing::error!("the leader lease was taken by another replica; stopping");
                        on_lost();
                    }
                    // Not a loss by itself: the next read shows whether another holds it.
                    Ok(Ok(Attempt::Conflict)) => {
                        tracing::warn!("renewing the leader lease conflicted; reading it again")
                    }
                    Ok(Err(err)) => tracing::warn!(error = %err, "renewing the leader lease failed"),
                    Err(_) => tracing::warn!("renewing the leader lease timed out"),
                }
            }
        })
    };
    Ok(Leadership { elector, renewer, watchdog })
}

#[cfg(test)]
mod tests;
