//! Converts Kubernetes objects into the planner's plain types. Pure: no client.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::core::Selector;

use crate::api::AcceleratorPool;
use crate::planner::inventory::{NodeInfo, PoolInfo};

/// Parses a whole-number quantity ("8", "8k" is not used for devices). Extended
/// resources are integers; anything else (cpu "500m", memory "1Gi") is skipped
/// by returning `None`, since the planner only counts devices.
pub fn whole_quantity(q: &Quantity) -> Option<i64> {
    q.0.parse::<i64>().ok()
}

fn whole_quantities(map: Option<&BTreeMap<String, Quantity>>) -> BTreeMap<String, i64> {
    map.into_iter()
        .flatten()
        .filter_map(|(k, q)| whole_quantity(q).map(|v| (k.clone(), v)))
        .collect()
}

/// A node is usable when its Ready condition is True and it is not cordoned.
pub fn node_is_ready(node: &Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    ready && !cordoned
}

/// When the node's Ready condition last turned away from True, if it is not True.
fn not_ready_since(node: &Node) -> Option<k8s_openapi::jiff::Timestamp> {
    let ready = node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")?;
    (ready.status != "True").then(|| ready.last_transition_time.as_ref().map(|t| t.0)).flatten()
}

pub fn node_info(node: &Node) -> NodeInfo {
    let status = node.status.as_ref();
    NodeInfo {
        name: node.name_any(),
        labels: node.labels().clone(),
        ready: node_is_ready(node),
        not_ready_since: not_ready_since(node),
        capacity: whole_quantities(status.and_then(|s| s.capacity.as_ref())),
        allocatable: whole_quantities(status.and_then(|s| s.allocatable.as_ref())),
    }
}

/// The planner's view of a pool, or why its selector cannot be used.
pub fn pool_info(pool: &AcceleratorPool) -> Result<PoolInfo, String> {
    let selector = Selector::try_from(pool.spec.node_selector.clone())
        .map_err(|e| format!("nodeSelector cannot be used: {e}"))?;
    Ok(PoolInfo {
        name: pool.name_any(),
        resource_name: pool.spec.resource_name.clone(),
        selector,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    fn k8s_node(ready: &str, cordoned: bool) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some("n1".into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(cordoned),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                capacity: Some(
                    [("nvidia.com/gpu".into(), q("8")), ("cpu".into(), q("500m"))].into(),
                ),
                allocatable: Some([("nvidia.com/gpu".into(), q("7"))].into()),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn node_conversion_keeps_whole_quantities_and_readiness() {
        let info = node_info(&k8s_node("True", false));
        assert!(info.ready);
        assert_eq!(info.capacity_of("nvidia.com/gpu"), 8);
        assert_eq!(info.allocatable_of("nvidia.com/gpu"), 7);
        assert_eq!(
            info.capacity_of("cpu"),
            0,
            "fractional cpu is not a device count"
        );
        assert!(!node_info(&k8s_node("False", false)).ready);
        assert!(!node_info(&k8s_node("Unknown", false)).ready);
        assert!(
            !node_info(&k8s_node("True", true)).ready,
            "cordoned nodes are not usable"
        );
    }
}
