//! Wiring of the running operator: client, admin server, CRD check, leader
//! election, shared reflectors and the reconcilers.

pub(crate) mod allocation;
mod context;
mod error;
mod nodes;
mod pool;
mod project;
pub(crate) mod queue;
mod quota;
pub(crate) mod stores;
pub(crate) mod view;

pub use context::Context;
pub use error::Error;

use std::sync::Arc;
use std::time::Duration;

use kube::{Api, Client};
use tokio::sync::watch;

use crate::admin::{self, Readiness};
use crate::api::{AcceleratorPool, GpuAllocation, ModelProject};
use crate::cli::RunArgs;
use crate::telemetry::Metrics;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "sovereign-operator";

/// Writes `status` of the object by server-side apply with the operator's field
/// manager (the one status writer of every kind). With `resource_version`, the
/// write is refused (409) if the object changed since that version.
pub(crate) async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    resource_version: Option<&str>,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(rv) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
    }
    api.patch_status(name, &kube::api::PatchParams::apply(FIELD_MANAGER).force(), &kube::api::Patch::Apply(patch))
        .await?;
    Ok(())
}

/// Error policy of every controller: count, log, then retry a transient error
/// with backoff or wait for a change of an invalid object.
pub(crate) fn on_error(ctx: &Context, controller: &'static str, error: &Error) -> kube::runtime::controller::Action {
    ctx.count_error(controller, error);
    tracing::warn!(error = %error, controller, "reconcile failed");
    if error.is_transient() {
        kube::runtime::controller::Action::requeue(Duration::from_secs(5))
    } else {
        kube::runtime::controller::Action::await_change()
    }
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

    let work = async {
        wait_for_crds(&client, &readiness).await;
        if args.leader_elect {
            lead(&client, &args, &readiness).await?;
        }
        let stores = stores::start(client.clone());
        readiness.set_not_ready("waiting for the caches to sync");
        let synced = std::time::Instant::now();
        stores.wait_until_ready().await?;
        let ctx = Context::new(client.clone(), metrics.clone(), stores, &args);
        readiness.set_ready();
        tracing::info!(elapsed_ms = synced.elapsed().as_millis() as u64, "caches synced, reconciling");
        tokio::join!(
            pool::run(ctx.clone(), stopped(stop_rx.clone())),
            allocation::run(ctx.clone(), stopped(stop_rx.clone())),
            quota::run(ctx.clone(), stopped(stop_rx.clone())),
            project::run(ctx.clone(), stopped(stop_rx.clone())),
        );
        anyhow::Ok(())
    };

    tokio::select! {
        res = work => res?,
        _ = stopped(stop_rx.clone()) => {}
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
    Ok(missing)
}

/// Blocks until this replica holds the leader Lease. Losing it later stops the
/// process, so that a new leader never overlaps with a stale one.
async fn lead(client: &Client, args: &RunArgs, readiness: &Readiness) -> anyhow::Result<()> {
    let identity = args.identity.clone().unwrap_or_else(|| format!("sovereign-operator-{}", std::process::id()));
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "sovereign-operator-leader")
        .with_namespace(&args.lease_namespace)
        .with_identity(identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await?;
    readiness.set_not_ready("waiting for the leader lease");
    let (mut channel, task) = manager.watch().await;
    channel.wait_for(|leader| *leader).await?;
    tracing::info!("acquired the leader lease");
    tokio::spawn(async move {
        if channel.wait_for(|leader| !*leader).await.is_ok() {
            tracing::error!("lost the leader lease, exiting so a new leader takes over");
            std::process::exit(1);
        }
        drop(task);
    });
    Ok(())
}
