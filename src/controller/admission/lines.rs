//! Each labelled workload's line ([`crate::api::WorkloadAdmission`]): built at
//! the end of a cycle from the workloads as the cycle's writes left them
//! ([`crate::admission::line`]), and written by server-side apply with the
//! operator's field manager only when it changed. The loop keeps the line it
//! last wrote of each workload (bounded by the labelled workloads, forgotten
//! when one goes). A change of state, reason or pool is written at once;
//! a new position or new numbers of the same state at most every
//! `refresh` per workload and `limit` per cycle, as the projects' waiting
//! reasons. A workload that lost its label loses its line; one deleted takes
//! its line with it (garbage collection: the workload is its owner).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use super::Writer;
use crate::admission::job::{self, Workload};
use crate::admission::{Decisions, GangKey, line};
use crate::api::{WorkloadAdmission, WorkloadAdmissionSpec, WorkloadAdmissionStatus};
use crate::controller::apply::{FIELD_MANAGER, apply_status, delete_if_present};
use crate::snapshot::ALLOCATION_LABEL;

/// Line writes in flight at once.
const WRITE_CONCURRENCY: usize = 32;

/// The lines last written, by workload.
#[derive(Default)]
pub struct Lines {
    written: HashMap<GangKey, Written>,
}

struct Written {
    spec: WorkloadAdmissionSpec,
    status: WorkloadAdmissionStatus,
    at: Instant,
}

/// One line to write.
#[derive(Clone, Debug)]
pub struct LineWrite {
    pub key: GangKey,
    /// Name, labels, owner and spec; applied first when new or changed.
    pub object: WorkloadAdmission,
    pub new_object: bool,
    pub status: WorkloadAdmissionStatus,
}

/// A cycle's lines: those to write now, and workloads whose lines may be left.
#[derive(Debug, Default)]
pub struct LinePlan {
    pub writes: Vec<LineWrite>,
    /// Workloads gone from the stores since their line was written (deleted
    /// or unlabelled): their lines are deleted.
    pub gone: Vec<GangKey>,
    /// Some refreshes were left for the next cycle (over the limit).
    pub cut: bool,
}

impl Lines {
    /// The lines of `workloads` (as the cycle's writes left them) to write.
    pub fn plan<W: Workload>(&self, workloads: &[Arc<W>], decisions: &Decisions, out: &mut Vec<LineWrite>) {
        for w in workloads {
            let key = job::key(w.as_ref());
            let before = self.written.get(&key);
            let Some(status) = line::status(w.as_ref(), decisions.get(&key), before.map(|b| &b.status)) else {
                continue;
            };
            // The object is built only for a line to write (every cycle sees every workload).
            let allocation = w.labels().get(ALLOCATION_LABEL);
            let same_spec = before.is_some_and(|b| Some(&b.spec.allocation) == allocation);
            if same_spec && before.is_some_and(|b| b.status == status) {
                continue;
            }
            let Some(object) = line::object(w.as_ref()) else { continue };
            let new_object = before.is_none_or(|b| b.spec != object.spec);
            out.push(LineWrite { key, object, new_object, status });
        }
    }

    /// Keeps of `candidates` what goes out now: new lines and changes of
    /// state, reason or pool at once; other changes (position, numbers) of a
    /// line written less than `refresh` ago wait, and at most `limit` of them
    /// go per cycle. `live` are the workloads of the stores.
    pub fn throttle(
        &self,
        mut candidates: Vec<LineWrite>,
        live: &HashSet<GangKey>,
        refresh: Duration,
        limit: usize,
    ) -> LinePlan {
        let mut plan = LinePlan {
            gone: self.written.keys().filter(|k| !live.contains(*k)).cloned().collect(),
            ..Default::default()
        };
        let mut refreshes = 0;
        candidates.retain(|w| {
            let Some(before) = self.written.get(&w.key).filter(|_| !w.new_object) else { return true };
            let (a, b) = (&before.status, &w.status);
            if a.state != b.state || a.reason != b.reason || a.pool != b.pool {
                return true;
            }
            if before.at.elapsed() < refresh {
                return false;
            }
            if refreshes >= limit {
                plan.cut = true;
                return false;
            }
            refreshes += 1;
            true
        });
        plan.writes = candidates;
        plan
    }

    fn note(&mut self, w: LineWrite) {
        let spec = w.object.spec;
        self.written.insert(w.key, Written { spec, status: w.status, at: Instant::now() });
    }
}

impl Writer {
    /// Writes a cycle's lines and deletes those of workloads that lost their
    /// label; `lines` remembers what was written and forgets what went.
    pub async fn write_lines(&self, plan: LinePlan, lines: &mut Lines) {
        let results: Vec<_> = futures::stream::iter(plan.writes)
            .map(|w| self.write_line(w))
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        for (key, written) in results {
            match written {
                Some(w) => lines.note(w),
                // Written again, whole, next cycle.
                None => drop(lines.written.remove(&key)),
            }
        }
        let gone: Vec<_> = futures::stream::iter(plan.gone)
            .map(|key| self.remove_line(key))
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        for key in gone {
            lines.written.remove(&key);
        }
    }

    async fn write_line(&self, w: LineWrite) -> (GangKey, Option<LineWrite>) {
        let ns = w.object.namespace().unwrap_or_default();
        let name = w.object.name_any();
        let api = Api::<WorkloadAdmission>::namespaced(self.client.clone(), &ns);
        if w.new_object {
            let mut body = serde_json::to_value(&w.object).unwrap_or_default();
            body["apiVersion"] = WorkloadAdmission::api_version(&()).into();
            body["kind"] = WorkloadAdmission::kind(&()).into();
            let params = PatchParams::apply(FIELD_MANAGER).force();
            if let Err(e) = api.patch(&name, &params, &Patch::Apply(&body)).await {
                tracing::warn!(workload = %w.key, error = %e, "cannot write a workload's admission line");
                return (w.key, None);
            }
        }
        match apply_status(&api, &name, None, &w.status).await {
            Ok(_) => {
                tracing::debug!(workload = %w.key, state = ?w.status.state, "line written");
                (w.key.clone(), Some(w))
            }
            Err(e) => {
                tracing::warn!(workload = %w.key, error = %e, "cannot write a workload's admission line");
                (w.key, None)
            }
        }
    }

    /// The line of a workload that left the store: it lost its label, or it
    /// was deleted (garbage collection takes the line too, unless the delete
    /// orphaned its dependents, the API's default for a batch Job).
    async fn remove_line(&self, key: GangKey) -> GangKey {
        let api = Api::<WorkloadAdmission>::namespaced(self.client.clone(), &key.namespace);
        if let Err(e) = delete_if_present(&api, &line::name(key.kind, &key.name)).await {
            tracing::warn!(workload = %key, error = %e, "cannot delete the line of a workload that went");
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use k8s_openapi::api::batch::v1::Job;

    use super::*;
    use crate::admission::{Decision, WaitReason};
    use crate::api::WorkloadState;

    fn held(name: &str) -> Arc<Job> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "lab", "uid": format!("u-{name}"),
                             "labels": {ALLOCATION_LABEL: "a1"}},
                "spec": {"suspend": true, "parallelism": 2, "completions": 2,
                         "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "i",
                            "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}},
            }))
            .unwrap(),
        )
    }

    fn waiting(jobs: &[(&str, u32, &str)]) -> Decisions {
        let mut d = Decisions::default();
        for (name, position, message) in jobs {
            let wait = Decision::Wait {
                position: *position,
                why: WaitReason::Waiting,
                message: message.to_string(),
                victims: vec![],
            };
            d.gangs.insert(GangKey::job("lab", *name), wait);
        }
        d
    }

    fn written(lines: &mut Lines, plan: LinePlan) {
        for w in plan.writes {
            lines.note(w);
        }
    }

    #[test]
    fn a_line_is_written_when_new_then_only_when_it_changes_and_numbers_at_most_every_refresh() {
        let jobs = [held("a"), held("b")];
        let live: HashSet<GangKey> = jobs.iter().map(|j| job::key(j.as_ref())).collect();
        let mut lines = Lines::default();
        let plan_of = |lines: &Lines, d: &Decisions, refresh: Duration, limit: usize| {
            let mut out = Vec::new();
            lines.plan(&jobs, d, &mut out);
            lines.throttle(out, &live, refresh, limit)
        };
        let first = waiting(&[("a", 1, "needs 16"), ("b", 2, "needs 16")]);
        let plan = plan_of(&lines, &first, Duration::from_secs(10), 1);
        assert_eq!(plan.writes.len(), 2, "new lines go out at once, whatever the limit");
        assert!(plan.writes.iter().all(|w| w.new_object && w.status.state == WorkloadState::Queued));
        written(&mut lines, plan);

        let plan = plan_of(&lines, &first, Duration::ZERO, 10);
        assert!(plan.writes.is_empty() && !plan.cut, "an unchanged line is not written: {plan:?}");

        let moved = waiting(&[("a", 1, "needs 16, has 8"), ("b", 1, "needs 16")]);
        let plan = plan_of(&lines, &moved, Duration::from_secs(10), 10);
        assert!(plan.writes.is_empty() && !plan.cut, "new numbers wait for the refresh");
        let plan = plan_of(&lines, &moved, Duration::ZERO, 1);
        assert_eq!((plan.writes.len(), plan.cut), (1, true), "at most `limit` refreshes per cycle");
        assert!(!plan.writes[0].new_object, "the status alone");

        let mut d = moved.clone();
        d.gangs.insert(GangKey::job("lab", "a"), Decision::Stop { message: "allocation a1 is Expired".into() });
        let plan = plan_of(&lines, &d, Duration::from_secs(10), 0);
        assert_eq!(plan.writes.len(), 1, "a new state goes out at once");
        assert_eq!(plan.writes[0].status.state, WorkloadState::Suspended);

        let live_a: HashSet<GangKey> = [GangKey::job("lab", "a")].into();
        let plan = lines.throttle(Vec::new(), &live_a, Duration::ZERO, 10);
        assert_eq!(plan.gone, [GangKey::job("lab", "b")], "a workload gone from the store: its line may go");
    }
}
