//! The loop's write path: each decision written by server-side apply of the
//! project's status, guarded by the resourceVersion it was decided on, then
//! assumed; a refused write (409, 404) is forgotten and planned again.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::events::Recorder;
use kube::{Api, Client, Resource, ResourceExt};

use super::writes::{Write, Writes};
use crate::admission::GangKey;
use crate::api::ModelProject;
use crate::controller::apply::{apply_status, publish_event};
use crate::controller::unseen::Unseen;
use crate::controller::{Context, Error};
use crate::telemetry::Metrics;

/// Status writes in flight at once.
const WRITE_CONCURRENCY: usize = 32;

/// What the loop writes with.
pub struct Writer {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Writer {
    pub fn of(ctx: &Context) -> Self {
        Self { client: ctx.client.clone(), recorder: ctx.recorder.clone(), metrics: ctx.metrics.clone() }
    }

    /// Writes a cycle's decisions in order: preemptors first, then admissions,
    /// stops and evictions (a victim only once its preemptor's status lists
    /// it), then waiting reasons. Every write that succeeds is assumed.
    /// Returns the preemptors whose victims may now be stopped.
    pub async fn write_cycle(&self, w: Writes, assumed: &Unseen<GangKey, Arc<ModelProject>>) -> HashSet<GangKey> {
        let Writes { preemptors, mut urgent, waiting, mut ready } = w;
        ready.extend(self.write_all(preemptors, assumed).await);
        urgent.retain(|w| w.preemptor.as_ref().is_none_or(|k| ready.contains(k)));
        self.write_all(urgent, assumed).await;
        self.write_all(waiting, assumed).await;
        ready
    }

    /// Writes a batch concurrently and assumes what was written; returns the keys written.
    async fn write_all(&self, batch: Vec<Write>, assumed: &Unseen<GangKey, Arc<ModelProject>>) -> HashSet<GangKey> {
        let results: Vec<_> =
            futures::stream::iter(batch).map(|w| self.write(w)).buffer_unordered(WRITE_CONCURRENCY).collect().await;
        let mut keys = HashSet::with_capacity(results.len());
        for (key, rv, written) in results.into_iter().flatten() {
            assumed.note(key.clone(), &rv, written);
            keys.insert(key);
        }
        keys
    }

    /// Writes one decision and its Events; returns what to assume, or nothing
    /// if the write failed.
    async fn write(&self, w: Write) -> Option<(GangKey, String, Arc<ModelProject>)> {
        let ns = w.project.namespace().unwrap_or_default();
        let name = w.project.name_any();
        let rv = w.project.resource_version()?;
        let api = Api::<ModelProject>::namespaced(self.client.clone(), &ns);
        let status = &w.change.status;
        match apply_status(&api, &name, Some(&rv), status).await {
            Ok(written) => {
                tracing::debug!(project = %w.key, decision = w.kind, pool = ?status.pool, nodes = ?status.nodes, "written");
                if let Some(wait) = w.admission_wait {
                    self.metrics.observe_admission_wait(wait);
                }
                if w.preemptor.is_some()
                    && let Some(stop) = w.change.events.first()
                {
                    // Preempted or Reclaimed: a gang stop like any other.
                    self.metrics.count_gang_restart(stop.reason);
                }
                let on = w.project.object_ref(&());
                for note in w.change.events {
                    publish_event(&self.recorder, &on, note.type_, note.reason, note.message).await;
                }
                Some((w.key, rv, Arc::new(written)))
            }
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 || e.code == 404 => {
                tracing::debug!(project = %w.key, decision = w.kind, code = e.code, "decided on an old version; planned again");
                None
            }
            Err(e) => {
                tracing::warn!(project = %w.key, error = %e, "cannot write an admission decision");
                None
            }
        }
    }
}
