//! Watch decoding that never builds an object's managedFields. No decision
//! reads them, yet decoding them (every field path of every manager, as a JSON
//! value tree) and freeing them again was about a tenth of the operator's CPU
//! on the national bench: pods carry three or four managers each, and every
//! pod event is decoded by two watches. [`Lean<K>`] is what those watches
//! decode: the object without its managedFields, skipped as the JSON is read.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};

use crate::api::{ModelProject, ModelProjectSpec, ModelProjectStatus};

/// An object decoded without its managedFields ([`Resource`] as `K` is).
#[derive(Clone, Debug)]
pub struct Lean<K>(pub K);

/// An object as its spec and status, so that [`Lean`] can decode it from its
/// parts.
pub trait Parts: Sized {
    type Spec: DeserializeOwned;
    type Status: DeserializeOwned;
    /// The object from its parts; `Err` names what is missing.
    fn assemble(metadata: ObjectMeta, spec: Option<Self::Spec>, status: Option<Self::Status>) -> Result<Self, String>;
}

/// ObjectMeta's fields but managedFields, which serde skips unread.
#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Meta {
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
    generate_name: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    self_link: Option<String>,
    uid: Option<String>,
}

impl From<Meta> for ObjectMeta {
    fn from(m: Meta) -> Self {
        ObjectMeta {
            annotations: m.annotations,
            creation_timestamp: m.creation_timestamp,
            deletion_grace_period_seconds: m.deletion_grace_period_seconds,
            deletion_timestamp: m.deletion_timestamp,
            finalizers: m.finalizers,
            generate_name: m.generate_name,
            generation: m.generation,
            labels: m.labels,
            managed_fields: None,
            name: m.name,
            namespace: m.namespace,
            owner_references: m.owner_references,
            resource_version: m.resource_version,
            self_link: m.self_link,
            uid: m.uid,
        }
    }
}

#[derive(Deserialize)]
struct Repr<S, T> {
    #[serde(default)]
    metadata: Meta,
    spec: Option<S>,
    status: Option<T>,
}

impl<'de, K: Parts> Deserialize<'de> for Lean<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = Repr::<K::Spec, K::Status>::deserialize(d)?;
        K::assemble(r.metadata.into(), r.spec, r.status).map(Lean).map_err(D::Error::custom)
    }
}

impl<K: Resource> Resource for Lean<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;
    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// What a watch decodes into what its store keeps: the object itself, or the
/// lean form of it.
pub trait Decoded<K> {
    fn kept(self) -> K;
}

impl<K> Decoded<K> for K {
    fn kept(self) -> K {
        self
    }
}

impl<K> Decoded<K> for Lean<K> {
    fn kept(self) -> K {
        self.0
    }
}

impl Parts for Pod {
    type Spec = PodSpec;
    type Status = PodStatus;
    fn assemble(metadata: ObjectMeta, spec: Option<PodSpec>, status: Option<PodStatus>) -> Result<Self, String> {
        Ok(Pod { metadata, spec, status })
    }
}

impl Parts for Node {
    type Spec = NodeSpec;
    type Status = NodeStatus;
    fn assemble(metadata: ObjectMeta, spec: Option<NodeSpec>, status: Option<NodeStatus>) -> Result<Self, String> {
        Ok(Node { metadata, spec, status })
    }
}

impl Parts for ModelProject {
    type Spec = ModelProjectSpec;
    type Status = ModelProjectStatus;
    fn assemble(
        metadata: ObjectMeta,
        spec: Option<ModelProjectSpec>,
        status: Option<ModelProjectStatus>,
    ) -> Result<Self, String> {
        let spec = spec.ok_or("a ModelProject without spec")?;
        Ok(ModelProject { metadata, spec, status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lean_pod_is_the_pod_without_its_managed_fields() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "w-0", "namespace": "t", "uid": "u", "resourceVersion": "7", "generation": 1,
                "labels": {"a": "b"}, "annotations": {"c": "d"}, "finalizers": ["f"],
                "creationTimestamp": "2026-12-03T10:00:00Z", "deletionTimestamp": "2026-12-03T11:00:00Z",
                "deletionGracePeriodSeconds": 30, "generateName": "w-",
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "ux"}],
                "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:status": {"f:phase": {}}}}],
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running"},
        });
        let mut full: Pod = serde_json::from_value(json.clone()).unwrap();
        let lean: Lean<Pod> = serde_json::from_value(json).unwrap();
        assert!(full.metadata.managed_fields.is_some());
        full.metadata.managed_fields = None;
        assert_eq!(lean.0, full, "everything but managedFields is kept");
    }

    #[test]
    fn a_project_without_spec_is_a_decoding_error_not_a_default() {
        let json = serde_json::json!({"metadata": {"name": "p"}});
        let err = serde_json::from_value::<Lean<ModelProject>>(json).unwrap_err();
        assert!(err.to_string().contains("without spec"), "{err}");
    }
}
