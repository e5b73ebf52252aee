//! Wiring of the running operator: client, admin server, CRD check, leader
//! election, shared reflectors and the reconcilers.

pub mod admission;
pub(crate) mod allocation;
pub(crate) mod apply;
mod context;
mod error;
mod lean;
pub mod model;
mod nodes;
mod pool;
mod project;
mod quota;
pub mod stores;
mod unseen;
pub mod view;

pub use apply::FIELD_MANAGER;
pub(crate) use apply::{apply_status, delete_if_present, object_key};
pub use context::Context;
pub use error::Error;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use crate::admin::{self, Readiness};
use crate::api::{AcceleratorPool, GpuAllocation, ModelProject, WorkloadAdmission};
use crate::cli::RunArgs;
use crate::telemetry::Metrics;

/// Controller settings shared by every reconciler: a debounce that folds a
/// burst of events on one object into one reconcile.
pub(crate) fn controller_config(debounce: Duration) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().debounce(debounce)
}

/// The one wiring of every reconciler: each reconcile counted and timed
/// (error paths included), transient errors retried with per-object
/// exponential backoff, invalid objects left until they change.
pub(crate) async fn drive<K, F, Fut>(
    controller: Controller<K>,
    name: &'static str,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    reconcile: F,
) where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    let reconcile = Arc::new(reconcile);
    controller
        .graceful_shutdown_on(shutdown)
        .run(
            move |obj: Arc<K>, ctx: Arc<Context>| {
                let reconcile = reconcile.clone();
                async move {
                    let key = object_key(obj.as_ref());
                    let _measure = ctx.measure(name);
                    let res = reconcile(obj, ctx.clone()).await;
                    if res.is_ok() {
                        ctx.backoff_reset(&key);
                    }
                    res
                }
            },
            move |obj: Arc<K>, error: &Error, ctx: Arc<Context>| on_error(&ctx, name, &object_key(obj.as_ref()), error),
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

/// Error policy of every controller: count, log, then retry a transient error
/// with backoff or wait for a change of an invalid object.
fn on_error(ctx: &Context, controller: &'static str, key: &str, error: &Error) -> Action {
    ctx.count_error(controller, error);
    tracing::warn!(error = %error, controller, object = key, "reconcile failed");
    if error.is_transient() { Action::requeue(ctx.backoff_next(key)) } else { Action::await_change() }
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = client(&args).await?;
    let metrics = Arc::new(Metrics::default());
    let readiness = Readiness::not_ready("starting");
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received, stopping");
        let _ = stop_tx.send(true);
    });

    let admin =
        tokio::spawn(admin::serve(args.admin_address, readiness.clone(), metrics.clone(), stopped(stop_rx.clone())));

    // Held outside `work`, so that it is released after the controllers stopped.
    let leadership = std::sync::Mutex::new(None);
    let mut controllers = tokio::task::JoinSet::new();
    let work = async {
        wait_for_crds(&client, &readiness).await;
        let stores = stores::start(client.clone(), stores::jobsets_served(&client).await);
        readiness.set_not_ready("waiting for the caches to sync");
        let synced = std::time::Instant::now();
        stores.wait_until_ready().await?;
        // A standby is ready too: caches synced, waiting warm for the Lease (see crate::leader).
        readiness.set_ready();
        tracing::info!(elapsed_ms = synced.elapsed().as_millis() as u64, "caches synced");
        if args.leader_elect {
            let config = crate::leader::LeaderConfig::from_args(&args);
            let held = crate::leader::acquire(client.clone(), config, crate::leader::exit_now).await?;
            *leadership.lock().expect("leadership lock") = Some(held);
        }
        let ctx = Context::new(client.clone(), metrics.clone(), stores, &args);
        tracing::info!("reconciling");
        // Each its own task: woken by its own events alone (a join of them
        // would poll all six on every wake-up of any).
        controllers.spawn(pool::run(ctx.clone(), stopped(stop_rx.clone())));
        controllers.spawn(allocation::run(ctx.clone(), stopped(stop_rx.clone())));
        controllers.spawn(quota::run(ctx.clone(), stopped(stop_rx.clone())));
        controllers.spawn(project::run(ctx.clone(), stopped(stop_rx.clone())));
        controllers.spawn(admission::run(ctx.clone(), stopped(stop_rx.clone())));
        controllers.spawn(admission::placement::run(ctx.clone(), stopped(stop_rx.clone())));
        while let Some(done) = controllers.join_next().await {
            done?; // a controller that panicked stops the process
        }
        anyhow::Ok(())
    };

    tokio::select! {
        res = work => res?,
        _ = stopped(stop_rx.clone()) => {}
    }
    // Nothing acts once this returns: the Lease may be released.
    controllers.shutdown().await;
    let held = leadership.lock().expect("leadership lock").take();
    if let Some(held) = held {
        held.release(Duration::from_secs(3)).await;
    }
    readiness.set_not_ready("shutting down");
    admin.await??;
    tracing::info!("stopped");
    Ok(())
}

async fn client(args: &RunArgs) -> anyhow::Result<Client> {
    crate::kubeclient::client(args.kubeconfig.as_deref()).await
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Waits, not ready, until every CRD is served: a missing CRD is an install
/// problem to report, not a reason to exit.
async fn wait_for_crds(client: &Client, readiness: &Readiness) {
    let mut delay = Duration::from_millis(500);
    loop {
        match missing_crds(client).await {
            Ok(missing) if missing.is_empty() => return,
            Ok(missing) => {
                let reason = format!("CRDs not installed: {} (kubectl apply -f crds/)", missing.join(", "));
                tracing::warn!("{reason}");
                readiness.set_not_ready(reason);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check CRDs");
                readiness.set_not_ready(format!("cannot check CRDs: {e}"));
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn missing_crds(client: &Client) -> Result<Vec<&'static str>, kube::Error> {
    let mut missing = Vec::new();
    let lp = kube::api::ListParams::default().limit(1);
    macro_rules! probe {
        ($k:ty, $name:expr) => {
            match Api::<$k>::all(client.clone()).list_metadata(&lp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => missing.push($name),
                Err(e) => return Err(e),
            }
        };
    }
    probe!(AcceleratorPool, "acceleratorpools.sovereign.ai");
    probe!(GpuAllocation, "gpuallocations.sovereign.ai");
    probe!(ModelProject, "modelprojects.sovereign.ai");
    probe!(WorkloadAdmission, "workloadadmissions.sovereign.ai");
    Ok(missing)
}
