//! The cluster-facing write helpers every reconciler shares: server-side
//! apply of status with the operator's field manager, deletes that treat
//! NotFound as done, Events, and object keys for logs and backoff.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource};

use super::Error;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "sovereign-operator";

/// Deletes the named object; one already gone is no error. True when this
/// call deleted it.
pub(crate) async fn delete_if_present<K>(api: &kube::Api<K>, name: &str) -> Result<bool, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &kube::api::DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Writes `status` of the object by server-side apply with the operator's field
/// manager (the one status writer of every kind). With `resource_version`, the
/// write is refused (409) if the object changed since that version. Returns
/// the object as written.
pub(crate) async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    resource_version: Option<&str>,
    status: &impl serde::Serialize,
) -> Result<K, Error>
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
    Ok(api
        .patch_status(name, &kube::api::PatchParams::apply(FIELD_MANAGER).force(), &kube::api::Patch::Apply(patch))
        .await?)
}

/// "namespace/name" (or "name" for cluster-scoped objects): the key of
/// per-object backoff and of log lines.
pub(crate) fn object_key<K: Resource>(obj: &K) -> String {
    match obj.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", obj.meta().name.as_deref().unwrap_or_default()),
        None => obj.meta().name.clone().unwrap_or_default(),
    }
}

/// Publishes an Event; a failure to publish is logged, never fatal.
pub async fn publish_event(recorder: &Recorder, on: &ObjectReference, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, on).await {
        tracing::warn!(error = %e, reason, "cannot publish event");
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}
