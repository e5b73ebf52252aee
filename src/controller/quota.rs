//! Tenant namespace reconciler: one operator-managed ResourceQuota per tenant
//! namespace, limiting `requests.<resource>` for every accelerator resource of
//! any pool to what the namespace's Active allocations grant (plus borrowing),
//! and the namespace's rendezvous Service, which names worker 0 of every gang.
//! One quota per namespace, never one per allocation: Kubernetes enforces every
//! quota, so the smallest would win.
//!
//! The quota also carries, as annotations, what the chart's admission policies
//! need to know about the namespace (they read it as their `params`: a tenant
//! cannot write a ResourceQuota, and the API server finds it in the namespace of
//! the request): the allocations that list the namespace, and the pools its
//! Active grants are in with their node labels ([`policy_annotations`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, ResourceQuota, Service};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::context::requeue;
use super::stores::MANAGED_BY;
use super::{Context, Error, FIELD_MANAGER, delete_if_present};
use crate::api::{AcceleratorPool, DirectPods, GpuAllocation};
use crate::planner::grants::Phase;
use crate::workload::{RENDEZVOUS_SERVICE, rendezvous_service};

const CONTROLLER: &str = "quota";
/// Name of the managed quota in every tenant namespace.
pub const QUOTA_NAME: &str = "sovereign-accelerators";

pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let s = &ctx.stores;
    let grants_changed = futures::stream::select_all([s.pools.changes().boxed(), s.allocations.changes().boxed()]);
    // Someone edited or deleted a managed quota or Service: put it back.
    let namespace_of = |ns: Option<String>| async move { Some(ObjectRef::<Namespace>::new(&ns?)) };
    let quota_namespaces = s.quotas.events().filter_map(move |q| namespace_of(q.namespace()));
    let service_namespaces = s.services.events().filter_map(move |svc| namespace_of(svc.namespace()));
    let controller = Controller::for_shared_stream(s.namespaces.events(), s.namespaces.store.clone())
        .reconcile_all_on(futures::stream::once(async {}).chain(grants_changed))
        .reconcile_on(futures::stream::select(quota_namespaces, service_namespaces))
        .with_config(super::controller_config(Duration::from_millis(300)));
    super::drive(controller, CONTROLLER, ctx.clone(), shutdown, reconcile).await;
}

/// Annotation: the allocations that list the namespace, comma-separated.
pub const ALLOCATIONS_ANNOTATION: &str = "sovereign.ai/allocations";
/// Annotation: the allocations listing the namespace whose `spec.tenant.directPods`
/// is `Refused`, comma-separated (empty: direct accelerator pods are confined, not refused).
pub const DIRECT_PODS_REFUSED_ANNOTATION: &str = "sovereign.ai/direct-pods-refused-by";
/// Annotation prefix: `pool.sovereign.ai/<pool>: "<resourceName> <key>=<value>,..."` for
/// every pool an Active allocation grants the namespace (the pool's matchLabels).
pub const POOL_ANNOTATION_PREFIX: &str = "pool.sovereign.ai/";

/// The annotations of a namespace's quota that the admission policies read:
/// `listed` allocations (those that list the namespace), those of them whose
/// `directPods` is `Refused` (any one refuses direct accelerator pods in the
/// namespace: they would draw on its quota too), and one entry per pool in
/// `granted` (the pools of the namespace's Active grants). A pool selected
/// with matchExpressions is left out: a pod cannot be confined to it with a
/// nodeSelector, so only admitted workloads reach it.
pub fn policy_annotations(
    listed: &[&GpuAllocation],
    granted: &std::collections::BTreeSet<String>,
    pools: &[Arc<AcceleratorPool>],
) -> BTreeMap<String, String> {
    let mut names: Vec<String> = listed.iter().map(|a| a.name_any()).collect();
    names.sort();
    let mut refusing: Vec<String> =
        listed.iter().filter(|a| a.spec.tenant.direct_pods == DirectPods::Refused).map(|a| a.name_any()).collect();
    refusing.sort();
    let mut out = BTreeMap::from([
        (ALLOCATIONS_ANNOTATION.to_string(), names.join(",")),
        (DIRECT_PODS_REFUSED_ANNOTATION.to_string(), refusing.join(",")),
    ]);
    for pool in pools.iter().filter(|p| granted.contains(&p.name_any())) {
        let sel = &pool.spec.node_selector;
        let labels = sel.match_labels.as_ref().filter(|l| !l.is_empty());
        let (Some(labels), None) = (labels, sel.match_expressions.as_ref().filter(|e| !e.is_empty())) else {
            continue;
        };
        let selector: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.insert(
            format!("{POOL_ANNOTATION_PREFIX}{}", pool.name_any()),
            format!("{} {}", pool.spec.resource_name, selector.join(",")),
        );
    }
    out
}

/// The `hard` map of a quota from resource name -> devices.
pub fn hard(limits: &BTreeMap<String, i64>) -> BTreeMap<String, Quantity> {
    limits.iter().map(|(r, v)| (format!("requests.{r}"), Quantity(v.to_string()))).collect()
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = ns.name_any();
    let existing = ctx.stores.quotas.store.get(&ObjectRef::new(QUOTA_NAME).within(&name));
    let service = ctx.stores.services.store.get(&ObjectRef::new(RENDEZVOUS_SERVICE).within(&name));
    if ns.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Most namespaces are no tenant's: leave them without building a view.
    let listed = ctx.stores.allocations.store.state().iter().any(|a| a.spec.tenant.namespaces.contains(&name));
    if !listed && existing.is_none() && service.is_none() {
        return Ok(Action::await_change());
    }
    let (view, stale) = ctx.recent_view().await;
    let api: Api<ResourceQuota> = Api::namespaced(ctx.client.clone(), &name);
    match view.grants.quotas.get(&name) {
        Some(limits) => {
            let want = hard(limits);
            let listing: Vec<_> =
                view.allocations.iter().filter(|a| !a.deleting && a.namespaces.contains(&name)).collect();
            let objects: Vec<Arc<GpuAllocation>> =
                listing.iter().filter_map(|a| ctx.stores.allocations.store.get(&ObjectRef::new(&a.name))).collect();
            let listed: Vec<&GpuAllocation> = objects.iter().map(|a| a.as_ref()).collect();
            let granted = listing
                .iter()
                .filter_map(|a| view.grants.allocations.get(&a.name))
                .filter(|plan| plan.phase == Phase::Active)
                .flat_map(|plan| plan.pools.keys().cloned())
                .collect();
            let annotations = policy_annotations(&listed, &granted, &ctx.stores.pools.store.state());
            let current = existing.as_ref().and_then(|q| q.spec.as_ref()).and_then(|s| s.hard.clone());
            let current_annotations = existing.as_ref().map(|q| q.annotations().clone()).unwrap_or_default();
            let outdated = annotations.iter().any(|(k, v)| current_annotations.get(k) != Some(v))
                || current_annotations
                    .keys()
                    .any(|k| k.starts_with(POOL_ANNOTATION_PREFIX) && !annotations.contains_key(k));
            if current.as_ref() != Some(&want) || outdated {
                let quota = json!({
                    "apiVersion": "v1",
                    "kind": "ResourceQuota",
                    "metadata": {
                        "name": QUOTA_NAME,
                        "labels": { MANAGED_BY.0: MANAGED_BY.1 },
                        "annotations": annotations,
                    },
                    "spec": { "hard": want },
                });
                api.patch(QUOTA_NAME, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(quota)).await?;
                tracing::info!(namespace = %name, ?limits, "quota applied");
            }
            let want = rendezvous_service();
            if service.as_ref().and_then(|s| s.spec.as_ref()).map(|s| &s.selector)
                != want.spec.as_ref().map(|s| &s.selector)
            {
                let api: Api<Service> = Api::namespaced(ctx.client.clone(), &name);
                if service.as_ref().and_then(|s| s.spec.as_ref()).is_some_and(|s| s.selector.is_some()) {
                    // The shape of earlier versions, whose endpoints the endpoints
                    // controllers kept. Deleted with its Endpoints first: a Service
                    // without a selector keeps whatever Endpoints object exists (and
                    // it is mirrored into slices), so stale addresses would stay
                    // beside the operator's.
                    delete_if_present(&api, RENDEZVOUS_SERVICE).await?;
                    let endpoints: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &name);
                    delete_if_present(&endpoints, RENDEZVOUS_SERVICE).await?;
                    tracing::info!(namespace = %name, "rendezvous Service of an earlier version (with a selector) replaced");
                }
                let params = PatchParams::apply(FIELD_MANAGER).force();
                api.patch(RENDEZVOUS_SERVICE, &params, &Patch::Apply(&want)).await?;
                tracing::info!(namespace = %name, "rendezvous Service applied");
            }
        }
        None => {
            if service.is_some()
                && delete_if_present(&Api::<Service>::namespaced(ctx.client.clone(), &name), RENDEZVOUS_SERVICE).await?
            {
                tracing::info!(namespace = %name, "rendezvous Service removed: no allocation lists the namespace")
            }
            if existing.is_some() && delete_if_present(&api, QUOTA_NAME).await? {
                tracing::info!(namespace = %name, "quota removed: no allocation lists the namespace")
            }
        }
    }
    Ok(requeue(stale, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_limits_use_the_requests_prefix() {
        let h = hard(&[("nvidia.com/gpu".to_string(), 24), ("furiosa.ai/rngd".to_string(), 0)].into());
        assert_eq!(h["requests.nvidia.com/gpu"], Quantity("24".into()));
        assert_eq!(h["requests.furiosa.ai/rngd"], Quantity("0".into()));
        assert_eq!(h.len(), 2);
    }

    fn pool(name: &str, resource: &str, selector: serde_json::Value) -> Arc<AcceleratorPool> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "sovereign.ai/v1alpha1", "kind": "AcceleratorPool", "metadata": {"name": name},
                "spec": {"resourceName": resource, "kind": "GPU", "vendor": "V", "model": name, "nodeSelector": selector}
            }))
            .unwrap(),
        )
    }

    fn allocation(name: &str, direct_pods: Option<&str>) -> GpuAllocation {
        let mut tenant = json!({"displayName": "T", "namespaces": ["team-a"]});
        if let Some(d) = direct_pods {
            tenant["directPods"] = json!(d);
        }
        serde_json::from_value(json!({
            "apiVersion": "sovereign.ai/v1alpha1", "kind": "GpuAllocation", "metadata": {"name": name},
            "spec": {"tenant": tenant, "grants": [{"pool": "b200", "accelerators": 8}]}
        }))
        .unwrap()
    }

    #[test]
    fn policy_annotations_list_allocations_and_the_granted_pools_node_labels() {
        let pools = [
            pool("h200", "nvidia.com/gpu", json!({"matchLabels": {"gpu": "H200", "a.io/zone": "z1"}})),
            pool("b200", "nvidia.com/gpu", json!({"matchLabels": {"gpu": "B200"}})),
            pool("atom", "rebellions.ai/ATOM", json!({"matchLabels": {"npu": "atom"}})),
            pool("rngd", "furiosa.ai/rngd", json!({"matchExpressions": [{"key": "npu", "operator": "Exists"}]})),
        ];
        let granted = ["b200", "atom", "rngd", "gone"].map(String::from).into();
        let (team, shared) = (allocation("team-a", None), allocation("shared", Some("Confined")));
        let a = policy_annotations(&[&team, &shared], &granted, &pools);
        let want: BTreeMap<String, String> = [
            ("sovereign.ai/allocations", "shared,team-a"),
            ("sovereign.ai/direct-pods-refused-by", ""),
            ("pool.sovereign.ai/b200", "nvidia.com/gpu gpu=B200"),
            ("pool.sovereign.ai/atom", "rebellions.ai/ATOM npu=atom"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        assert_eq!(
            a, want,
            "sorted; Confined by default; h200 is not granted; rngd has expressions; a missing pool is skipped"
        );

        let both = policy_annotations(&[], &["h200".to_string()].into(), &pools);
        assert_eq!(
            both["pool.sovereign.ai/h200"], "nvidia.com/gpu a.io/zone=z1,gpu=H200",
            "labels sorted, comma-joined"
        );
        assert_eq!(both["sovereign.ai/allocations"], "");
        assert_eq!(both["sovereign.ai/direct-pods-refused-by"], "");
    }

    #[test]
    fn any_allocation_that_refuses_direct_pods_refuses_them_in_the_namespace_it_shares() {
        let (strict, loose) = (allocation("strict", Some("Refused")), allocation("loose", Some("Confined")));
        let also = allocation("also-strict", Some("Refused"));
        assert_eq!(loose.spec.tenant.direct_pods, DirectPods::Confined);
        assert_eq!(allocation("default", None).spec.tenant.direct_pods, DirectPods::Confined);
        let granted = Default::default();
        let a = policy_annotations(&[&loose, &strict], &granted, &[]);
        assert_eq!(a["sovereign.ai/direct-pods-refused-by"], "strict", "the stricter setting wins, named");
        let a = policy_annotations(&[&strict, &loose, &also], &granted, &[]);
        assert_eq!(a["sovereign.ai/direct-pods-refused-by"], "also-strict,strict");
        assert_eq!(a["sovereign.ai/allocations"], "also-strict,loose,strict");
        let a = policy_annotations(&[&loose], &granted, &[]);
        assert_eq!(a["sovereign.ai/direct-pods-refused-by"], "");
        let refused: Result<GpuAllocation, _> = serde_json::from_value(json!({
            "apiVersion": "sovereign.ai/v1alpha1", "kind": "GpuAllocation", "metadata": {"name": "x"},
            "spec": {"tenant": {"displayName": "T", "namespaces": ["a"], "directPods": "Sometimes"}, "grants": []}
        }));
        assert!(refused.is_err(), "only Confined or Refused");
    }
}
