//! Pins an admitted JobSet's pods to the planned nodes as they are made.
//!
//! The JobSet's admission gave its pod templates the placement gate
//! ([`crate::admission::job::NodePins::Gate`]), so its Jobs make its pods
//! gated. This task watches those pods (the `workload_pods` store), decides
//! each one's node from the JobSet's admission ([`placement::assign`], pure)
//! and writes it with the gate's removal in one merge patch
//! ([`placement::release`]), guarded by the pod's resourceVersion. What it
//! wrote stands in for the store's copy until the watch shows it, so a pass
//! before the watch catches up never gives a node twice. A refused write (409,
//! 404) is forgotten and decided again on the next pass.
//!
//! While the operator is down the pods stay gated: they never run anywhere
//! the plan did not count.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};

use crate::admission::job::{self, Workload};
use crate::admission::placement::{self, GangPod, Release};
use crate::controller::Context;
use crate::controller::apply::FIELD_MANAGER;
use crate::controller::stores::Stores;
use crate::controller::unseen::Unseen;
use crate::snapshot::{JOBSET_LABEL, pod_requests};
use crate::workload::kinds::JobSet;

/// A burst of pod events arriving within this pause is one pass.
const COALESCE: Duration = Duration::from_millis(20);
/// The shortest pause between two passes: a pass reads every labelled pod,
/// and pods of many workloads start one by one (each pass takes all of them).
const MIN_GAP: Duration = Duration::from_millis(100);
/// A pass runs at least this often (a write refused, a store that lagged).
const IDLE_PASS: Duration = Duration::from_secs(10);
/// A written pin the store never showed is dropped after this long.
const WRITTEN_TTL: Duration = Duration::from_secs(60);
/// Pod writes in flight at once.
const WRITE_CONCURRENCY: usize = 32;

pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let s = &ctx.stores;
    let mut changes = futures::stream::select_all([s.workload_pods.changes().boxed(), s.jobsets.changes().boxed()]);
    let mut shutdown = std::pin::pin!(shutdown);
    let written = Unseen::new(WRITTEN_TTL);
    loop {
        let ready_at = tokio::time::Instant::now() + MIN_GAP;
        let releases = releases(&ctx.stores, &written);
        if !releases.is_empty() {
            write(&ctx.client, releases, &written).await;
        }
        tokio::select! {
            _ = changes.next() => {}
            _ = tokio::time::sleep(IDLE_PASS) => {}
            _ = &mut shutdown => return,
        }
        tokio::time::sleep(COALESCE).await;
        while changes.next().now_or_never().flatten().is_some() {}
        tokio::time::sleep_until(ready_at).await;
    }
}

/// Pod key in [`Unseen`]: "namespace/name".
fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// The gated pods of admitted JobSets that can be released now, each with
/// how (read from the stores, with the pins written but not yet seen standing
/// in for the store's copies).
pub fn releases(stores: &Stores, written: &Unseen<String, Release>) -> Vec<(Arc<Pod>, Release)> {
    // The JobSets with a gated pod, by namespace and name.
    let mut waiting: BTreeSet<(String, String)> = BTreeSet::new();
    for pod in stores.workload_pods.store.state() {
        let Some(set) = pod.labels().get(JOBSET_LABEL) else { continue };
        if placement::gated(&pod) && pod.metadata.deletion_timestamp.is_none() {
            waiting.insert((pod.namespace().unwrap_or_default(), set.clone()));
        }
    }
    let mut out = Vec::new();
    for (ns, name) in waiting {
        let Some(set) = stores.jobsets.store.get(&ObjectRef::<JobSet>::new(&name).within(&ns)) else { continue };
        // Admitted and running: its planned nodes (the store may lag behind
        // its pods: then the next pass, woken by the JobSet's change).
        let Some(holding) = job::holding(set.as_ref()) else { continue };
        let Ok(Some(shape)) = set.read() else { continue };
        let pods: Vec<Arc<Pod>> = stores
            .workload_pods_by_namespace
            .names(&ns)
            .iter()
            .filter_map(|n| stores.workload_pods.store.get(&ObjectRef::new(n).within(&ns)))
            .filter(|p| p.labels().get(JOBSET_LABEL) == Some(&name) && !finished(p))
            .collect();
        let gang: Vec<GangPod> = pods
            .iter()
            .map(|p| {
                let devices = pod_requests(p).get(&shape.resource).copied().unwrap_or(0);
                // A release written but not yet seen stands in for the store's copy.
                let (node, gated) = match written.over(&pod_key(p), &p.resource_version().unwrap_or_default()) {
                    Some(Release::Pin(node)) => (Some(node), false),
                    Some(Release::Ungate) => (placement::placed_on(p), false),
                    None => (placement::placed_on(p), placement::gated(p) && p.metadata.deletion_timestamp.is_none()),
                };
                GangPod { name: p.name_any(), devices, node, gated }
            })
            .collect();
        let by_name: BTreeMap<String, &Arc<Pod>> = pods.iter().map(|p| (p.name_any(), p)).collect();
        let released = placement::assign(&holding.nodes, shape.per_worker(), &gang);
        let gated = gang.iter().filter(|p| p.gated).count();
        if released.len() < gated {
            tracing::debug!(jobset = %format!("{ns}/{name}"), gated, released = released.len(), "pods wait gated for a planned node");
        }
        out.extend(released.into_iter().filter_map(|(n, how)| Some(((*by_name.get(&n)?).clone(), how))));
    }
    out
}

/// Succeeded or Failed: it holds its node no more.
fn finished(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// Writes the releases concurrently and notes what was written.
async fn write(client: &Client, releases: Vec<(Arc<Pod>, Release)>, written: &Unseen<String, Release>) {
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let results: Vec<_> = futures::stream::iter(releases)
        .map(|(pod, how)| {
            let (api, params) = (Api::<Pod>::namespaced(client.clone(), &pod.namespace().unwrap_or_default()), &params);
            async move {
                let body = placement::release(&pod, &how);
                match api.patch(&pod.name_any(), params, &Patch::Merge(&body)).await {
                    Ok(_) => {
                        tracing::debug!(pod = %pod_key(&pod), release = ?how, "placed");
                        Some((pod, how))
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                        tracing::debug!(pod = %pod_key(&pod), code = e.code, "decided on an old version; placed again");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(pod = %pod_key(&pod), error = %e, "cannot place a gated pod on its planned node");
                        None
                    }
                }
            }
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .collect()
        .await;
    for (pod, how) in results.into_iter().flatten() {
        written.note(pod_key(&pod), &pod.resource_version().unwrap_or_default(), how);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::admission::job::{ADMITTED_NODES, ADMITTED_POOL};
    use crate::admission::placement::PLACEMENT_GATE;
    use crate::controller::stores::{PodIndex, Shared};
    use crate::plan::Cluster;
    use crate::snapshot::ALLOCATION_LABEL;

    fn jobset(admitted: bool) -> JobSet {
        let notes = if admitted { json!({ADMITTED_POOL: "b200", ADMITTED_NODES: "n1,n1,n2"}) } else { json!({}) };
        let template = |gpus: &str, pods: i32| {
            json!({"spec": {"parallelism": pods, "completions": pods, "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "m", "image": "i", "resources": {"limits": {"nvidia.com/gpu": gpus}}}]}}}})
        };
        serde_json::from_value(json!({
            "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": "pair", "namespace": "lab", "labels": {ALLOCATION_LABEL: "a1"}, "annotations": notes},
            "spec": {"suspend": !admitted, "replicatedJobs": [
                {"name": "launcher", "template": template("0", 1)},
                {"name": "workers", "template": template("8", 3)}]},
        }))
        .unwrap()
    }

    fn pod(name: &str, gpus: &str, gated: bool, node: Option<&str>) -> Pod {
        let gates = if gated { json!([{"name": PLACEMENT_GATE}]) } else { json!([]) };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "lab", "resourceVersion": "5",
                         "labels": {ALLOCATION_LABEL: "a1", JOBSET_LABEL: "pair"}},
            "spec": {"schedulingGates": gates, "nodeName": node,
                     "containers": [{"name": "m", "image": "i", "resources": {"limits": {"nvidia.com/gpu": gpus}}}]},
            "status": {"phase": "Pending"},
        }))
        .unwrap()
    }

    fn stores(set: JobSet, pods: &[Pod]) -> Stores {
        let mut s = crate::plan::stores(&Cluster { jobsets: vec![set], ..Default::default() });
        s.workload_pods = Shared::fixed(pods);
        s.workload_pods_by_namespace = PodIndex::by_namespace().of(pods);
        s
    }

    fn named(r: &[(Arc<Pod>, Release)]) -> Vec<(String, Release)> {
        r.iter().map(|(p, how)| (p.name_any(), how.clone())).collect()
    }

    #[test]
    fn an_admitted_jobsets_gated_pods_fill_its_planned_nodes_and_a_written_pin_is_not_given_twice() {
        let pods = [
            pod("launcher-0", "0", true, None),
            pod("workers-0", "8", false, Some("n1")),
            pod("workers-1", "8", true, None),
            pod("workers-2", "8", true, None),
        ];
        let written = Unseen::new(WRITTEN_TTL);
        let s = stores(jobset(true), &pods);
        let r = releases(&s, &written);
        assert_eq!(
            named(&r),
            [
                ("launcher-0".to_string(), Release::Ungate),
                ("workers-1".to_string(), Release::Pin("n1".into())),
                ("workers-2".to_string(), Release::Pin("n2".into())),
            ],
            "n1 was planned twice, once taken by the bound workers-0"
        );

        // workers-1's pin written, the store not caught up: the next pass gives it nothing again,
        // and gives its node to no one else.
        written.note("lab/workers-1".into(), "5", Release::Pin("n1".into()));
        let again = releases(&s, &written);
        assert_eq!(
            named(&again),
            [("launcher-0".to_string(), Release::Ungate), ("workers-2".to_string(), Release::Pin("n2".into()))]
        );

        let held = stores(jobset(false), &pods);
        assert!(releases(&held, &written).is_empty(), "a suspended JobSet's pods are not released");
    }

    /// `write` against a mocked API server: one merge patch per pod with the
    /// operator's field manager; the pod answered 200 is noted as written
    /// (on the version it was decided on), the one answered 409 is forgotten.
    #[tokio::test]
    async fn a_release_is_one_merge_patch_per_pod_noted_when_written_forgotten_on_conflict() {
        use http::{Request, Response};
        use kube::client::Body;

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(Some((req, send))) = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await
            {
                let (method, uri) = (req.method().to_string(), req.uri().to_string());
                let kind = req.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
                let bytes = req.into_body().collect_bytes().await.expect("a body");
                let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let response = if uri.contains("/pods/workers-1") {
                    let written = serde_json::to_vec(&pod("workers-1", "8", false, None)).unwrap();
                    Response::builder().status(200).body(Body::from(written))
                } else {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "message": "the object has been modified", "reason": "Conflict", "code": 409});
                    Response::builder().status(409).body(Body::from(serde_json::to_vec(&status).unwrap()))
                };
                send.send_response(response.unwrap());
                seen.push((method, uri, kind, body));
            }
            seen
        });
        let client = Client::new(service, "default");
        let written = Unseen::new(WRITTEN_TTL);
        let releases = vec![
            (Arc::new(pod("workers-1", "8", true, None)), Release::Pin("n1".into())),
            (Arc::new(pod("workers-2", "8", true, None)), Release::Pin("n2".into())),
        ];
        write(&client, releases, &written).await;
        drop(client);
        let mut seen = server.await.unwrap();
        seen.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(seen.len(), 2, "{seen:?}");
        let (method, uri, kind, body) = &seen[0];
        assert_eq!(method, "PATCH");
        assert_eq!(uri, "/api/v1/namespaces/lab/pods/workers-1?&fieldManager=sovereign-operator");
        assert_eq!(kind.as_deref(), Some("application/merge-patch+json"));
        assert_eq!(body["metadata"]["resourceVersion"], "5");
        assert_eq!(body["spec"]["schedulingGates"], Value::Null);
        assert_eq!(seen[1].1, "/api/v1/namespaces/lab/pods/workers-2?&fieldManager=sovereign-operator");
        assert_eq!(written.over(&"lab/workers-1".to_string(), "5"), Some(Release::Pin("n1".into())));
        assert_eq!(written.over(&"lab/workers-2".to_string(), "5"), None, "a conflict is forgotten");
    }
}
