//! Shared reflectors: one watch per kind feeds an in-memory store that every
//! reconciler reads, so no reconcile ever LISTs the API. Each store also
//! publishes a change signal (deletions included) that reconcilers with a
//! cluster-wide view subscribe to.

use std::fmt::Debug;
use std::hash::Hash;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::api::AcceleratorPool;

/// A store and the signal that it changed.
#[derive(Clone)]
pub struct Shared<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<K>,
    changed: watch::Receiver<()>,
}

impl<K: Resource + Clone + 'static> Shared<K>
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
}

#[derive(Clone)]
pub struct Stores {
    pub nodes: Shared<Node>,
    pub pools: Shared<AcceleratorPool>,
}

impl Stores {
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        self.nodes.store.wait_until_ready().await?;
        self.pools.store.wait_until_ready().await?;
        Ok(())
    }
}

/// Starts every reflector in the background.
pub fn start(client: Client) -> Stores {
    // Heartbeat times and image lists change often and matter to no decision:
    // drop them so that memory stays proportional to the nodes.
    let nodes = shared(Api::<Node>::all(client.clone()), |node: &mut Node| {
        node.metadata.managed_fields = None;
        if let Some(status) = node.status.as_mut() {
            status.images = None;
            for c in status.conditions.iter_mut().flatten() {
                c.last_heartbeat_time = None;
            }
        }
    });
    let pools = shared(
        Api::<AcceleratorPool>::all(client),
        |p: &mut AcceleratorPool| {
            p.metadata.managed_fields = None;
        },
    );
    Stores { nodes, pools }
}

fn shared<K>(api: Api<K>, strip: impl FnMut(&mut K) + Send + 'static) -> Shared<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let (tx, changed) = watch::channel(());
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(strip)
        .reflect(writer);
    tokio::spawn(stream.for_each(move |event| {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                tx.send_replace(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "watch error; retrying with backoff"),
        }
        futures::future::ready(())
    }));
    Shared { store, changed }
}
