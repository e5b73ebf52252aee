//! Tenant namespace reconciler: one operator-managed ResourceQuota per tenant
//! namespace, limiting `requests.<resource>` for every accelerator resource of
//! any pool to what the namespace's Active allocations grant (plus borrowing),
//! and the namespace's rendezvous Service, which names worker 0 of every gang.
//! One quota per namespace, never one per allocation: Kubernetes enforces every
//! quota, so the smallest would win.

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
            let current = existing.as_ref().and_then(|q| q.spec.as_ref()).and_then(|s| s.hard.clone());
            if current.as_ref() != Some(&want) {
                let allocations: Vec<String> = view
                    .allocations
                    .iter()
                    .filter(|a| !a.deleting && a.namespaces.contains(&name))
                    .map(|a| a.name.clone())
                    .collect();
                let quota = json!({
                    "apiVersion": "v1",
                    "kind": "ResourceQuota",
                    "metadata": {
                        "name": QUOTA_NAME,
                        "labels": { MANAGED_BY.0: MANAGED_BY.1 },
                        "annotations": { "sovereign.ai/allocations": allocations.join(",") },
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
}
