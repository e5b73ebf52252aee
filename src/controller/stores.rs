//! Shared reflectors: one watch per kind feeds an in-memory store that every
//! reconciler reads, so no reconcile ever LISTs the API.

use std::fmt::Debug;
use std::hash::Hash;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, ReflectHandle, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::api::AcceleratorPool;

/// Room for events a slow subscriber may lag behind before the watch waits.
const SUBSCRIBER_BUFFER: usize = 4096;

pub struct Stores {
    pub nodes: Store<Node>,
    pub pools: Store<AcceleratorPool>,
    node_events: ReflectHandle<Node>,
    pool_events: ReflectHandle<AcceleratorPool>,
}

impl Stores {
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        self.nodes.wait_until_ready().await?;
        self.pools.wait_until_ready().await?;
        Ok(())
    }
    pub fn node_events(&self) -> ReflectHandle<Node> {
        self.node_events.clone()
    }
    pub fn pool_events(&self) -> ReflectHandle<AcceleratorPool> {
        self.pool_events.clone()
    }
}

/// Starts every reflector in the background.
pub fn start(client: Client) -> Stores {
    // Heartbeat and image lists change often and matter to no decision: drop
    // them so that memory stays proportional to the nodes.
    let (nodes, node_events) = shared(Api::<Node>::all(client.clone()), |node: &mut Node| {
        node.metadata.managed_fields = None;
        if let Some(status) = node.status.as_mut() {
            status.images = None;
            for c in status.conditions.iter_mut().flatten() {
                c.last_heartbeat_time = None;
            }
        }
    });
    let (pools, pool_events) = shared(
        Api::<AcceleratorPool>::all(client),
        |p: &mut AcceleratorPool| {
            p.metadata.managed_fields = None;
        },
    );
    Stores {
        nodes,
        pools,
        node_events,
        pool_events,
    }
}

fn shared<K>(
    api: Api<K>,
    strip: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, ReflectHandle<K>)
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
    let handle = writer.subscribe().expect("shared store has a dispatcher");
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(strip)
        .reflect_shared(writer);
    tokio::spawn(stream.for_each(|event| async move {
        if let Err(e) = event {
            tracing::warn!(error = %e, "watch error; retrying with backoff");
        }
    }));
    (reader, handle)
}
