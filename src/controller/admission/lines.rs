//! Each labelled workload's line ([`crate::api::WorkloadAdmission`]): built at
//! the end of a cycle from the workloads as the cycle's writes left them
//! ([`crate::admission::line`]), and written by server-side apply with the
//! operator's field manager only when it changed. The loop keeps the line it
//! last wrote of each workload (bounded by the labelled workloads, forgotten
//! when one goes). A change of state, reason or pool is written at once;
//! a new position or new numbers of the same state at most every
//! `refresh` per workload and `limit` per cycle, as the projects' waiting
//! reasons. A workload that leaves the stores (unlabelled or deleted) loses
//! its line: the loop deletes it (the workload is also its owner, so garbage
//! collection takes it, unless the workload's delete orphaned it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

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
    /// Writes a cycle's lines and deletes those of workloads that went;
    /// `lines` remembers what was written and forgets what went.
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
            // The derived type serializes its apiVersion and kind itself.
            let params = PatchParams::apply(FIELD_MANAGER).force();
            if let Err(e) = api.patch(&name, &params, &Patch::Apply(&w.object)).await {
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

    /// Writes `plan` through a writer whose API server answers every request
    /// (500 for the line `failing`); returns "METHOD path" of each request and
    /// the lines remembered after.
    async fn write(plan: LinePlan, lines: &mut Lines, failing: &'static str) -> Vec<String> {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(Some((req, send))) = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await
            {
                let (method, uri) = (req.method().to_string(), req.uri().to_string());
                let bytes = req.into_body().collect_bytes().await.expect("a body");
                let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let path = uri.split('?').next().unwrap_or_default().to_string();
                let (code, answer) = if path.contains(failing) {
                    (500, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500}))
                } else if method == "DELETE" {
                    (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}))
                } else {
                    let mut o = json!({"apiVersion": "sovereign.ai/v1alpha1", "kind": "WorkloadAdmission",
                        "metadata": {"name": "x", "namespace": "lab"},
                        "spec": {"workload": {"kind": "Job", "name": "x"}, "allocation": "a1"}});
                    o["status"] = body["status"].clone();
                    (200, o)
                };
                let response = Response::builder().status(code).body(Body::from(serde_json::to_vec(&answer).unwrap()));
                send.send_response(response.expect("a response"));
                seen.push(format!("{method} {path}"));
            }
            seen
        });
        let client = kube::Client::new(service, "default");
        let reporter = kube::runtime::events::Reporter { controller: "sovereign-operator".into(), instance: None };
        let writer = Writer {
            recorder: kube::runtime::events::Recorder::new(client.clone(), reporter),
            client,
            metrics: Arc::new(crate::telemetry::Metrics::default()),
        };
        writer.write_lines(plan, lines).await;
        drop(writer);
        let mut seen = server.await.expect("the mock server");
        seen.sort();
        seen
    }

    #[tokio::test]
    async fn a_new_line_is_applied_whole_a_changed_one_by_its_status_and_a_gone_ones_deleted() {
        let jobs = [held("a"), held("b")];
        let live: HashSet<GangKey> = jobs.iter().map(|j| job::key(j.as_ref())).collect();
        let mut lines = Lines::default();
        let d = waiting(&[("a", 1, "needs 16"), ("b", 2, "needs 16")]);
        let mut out = Vec::new();
        lines.plan(&jobs, &d, &mut out);
        let seen = write(lines.throttle(out, &live, Duration::ZERO, 10), &mut lines, "job-b").await;
        let base = "/apis/sovereign.ai/v1alpha1/namespaces/lab/workloadadmissions";
        assert_eq!(
            seen,
            [format!("PATCH {base}/job-a"), format!("PATCH {base}/job-a/status"), format!("PATCH {base}/job-b"),],
            "the object, then its status; b refused"
        );
        assert!(lines.written.contains_key(&GangKey::job("lab", "a")));
        assert!(!lines.written.contains_key(&GangKey::job("lab", "b")), "a refused line is written whole again");

        let d = waiting(&[("a", 1, "needs 16, has 8"), ("b", 2, "needs 16")]);
        let mut out = Vec::new();
        lines.plan(&jobs[..1], &d, &mut out);
        let only_a: HashSet<GangKey> = [GangKey::job("lab", "a")].into();
        let mut plan = lines.throttle(out, &only_a, Duration::ZERO, 10);
        plan.gone.push(GangKey::job("lab", "b"));
        lines.written.insert(
            GangKey::job("lab", "gone"),
            Written { spec: plan.writes[0].object.spec.clone(), status: Default::default(), at: Instant::now() },
        );
        plan.gone.push(GangKey::job("lab", "gone"));
        let seen = write(plan, &mut lines, "never").await;
        assert_eq!(
            seen,
            [format!("DELETE {base}/job-b"), format!("DELETE {base}/job-gone"), format!("PATCH {base}/job-a/status"),],
            "new numbers: the status alone; lines of workloads gone: deleted"
        );
        assert_eq!(lines.written.keys().collect::<Vec<_>>(), [&GangKey::job("lab", "a")], "the gone are forgotten");
        assert_eq!(lines.written[&GangKey::job("lab", "a")].status.message.as_deref(), Some("needs 16, has 8"));
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
