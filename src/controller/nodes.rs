//! Apply layer for node reservations: a label and a NoSchedule taint naming
//! the allocation.
//!
//! `spec.taints` is an atomic list, so server-side apply would make this
//! operator the owner of every taint on the node (and remove the ones other
//! managers set). Instead the whole list is written back with our taint added
//! or removed, by a merge patch guarded by the node's resourceVersion: a
//! concurrent change fails with a conflict and is retried from fresh state.

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Error, FIELD_MANAGER};
use crate::snapshot::RESERVED_FOR;

/// The taints `node` should carry when reserved for `allocation` (or for none).
pub fn desired_taints(node: &Node, allocation: Option<&str>) -> Vec<Taint> {
    let mut taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key != RESERVED_FOR)
        .collect();
    if let Some(a) = allocation {
        taints.push(Taint {
            key: RESERVED_FOR.into(),
            value: Some(a.into()),
            effect: "NoSchedule".into(),
            time_added: None,
        });
    }
    taints
}

/// Whether `node` already carries exactly the reservation for `allocation`.
pub fn is_reserved_as(node: &Node, allocation: Option<&str>) -> bool {
    let label = node.labels().get(RESERVED_FOR).map(String::as_str);
    let current = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    label == allocation && current == desired_taints(node, allocation)
}

/// Labels and taints `node` for `allocation`, or clears both with `None`.
pub async fn set_reservation(api: &Api<Node>, node: &Node, allocation: Option<&str>) -> Result<(), Error> {
    if is_reserved_as(node, allocation) {
        return Ok(());
    }
    let patch = json!({
        "metadata": {
            "resourceVersion": node.resource_version(),
            "labels": { RESERVED_FOR: allocation },
        },
        "spec": { "taints": desired_taints(node, allocation) },
    });
    let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    api.patch(&node.name_any(), &pp, &Patch::Merge(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;

    fn node_with(taints: Vec<Taint>, label: Option<&str>) -> Node {
        let mut n = Node { spec: Some(NodeSpec { taints: Some(taints), ..Default::default() }), ..Default::default() };
        if let Some(l) = label {
            n.labels_mut().insert(RESERVED_FOR.into(), l.into());
        }
        n
    }

    fn taint(key: &str, value: &str) -> Taint {
        Taint { key: key.into(), value: Some(value.into()), effect: "NoSchedule".into(), time_added: None }
    }

    #[test]
    fn other_taints_are_kept_and_ours_replaced() {
        let gpu = taint("nvidia.com/gpu", "present");
        let n = node_with(vec![gpu.clone(), taint(RESERVED_FOR, "old")], Some("old"));
        assert_eq!(desired_taints(&n, Some("new")), vec![gpu.clone(), taint(RESERVED_FOR, "new")]);
        assert_eq!(desired_taints(&n, None), vec![gpu]);
        assert!(is_reserved_as(&n, Some("old")));
        assert!(!is_reserved_as(&n, Some("new")));
        assert!(!is_reserved_as(&n, None));
        assert!(is_reserved_as(&node_with(vec![], None), None));
    }
}
