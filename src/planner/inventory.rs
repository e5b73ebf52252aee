//! Which nodes belong to which pool, and what each pool holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::core::{Selector, SelectorExt};

/// What the planner needs to know about a node. The maps are shared: a view
/// of thousands of nodes is assembled from the model without copying them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Arc<BTreeMap<String, String>>,
    /// Ready condition True and not cordoned.
    pub ready: bool,
    /// When the Ready condition last left True, while the node is not ready.
    pub not_ready_since: Option<k8s_openapi::jiff::Timestamp>,
    /// Integer capacity per resource name.
    pub capacity: Arc<BTreeMap<String, i64>>,
    /// Integer allocatable per resource name.
    pub allocatable: Arc<BTreeMap<String, i64>>,
}

impl NodeInfo {
    pub fn capacity_of(&self, resource: &str) -> i64 {
        self.capacity.get(resource).copied().unwrap_or(0)
    }
    pub fn allocatable_of(&self, resource: &str) -> i64 {
        self.allocatable.get(resource).copied().unwrap_or(0)
    }
}

/// What the planner needs to know about a pool.
#[derive(Clone, Debug)]
pub struct PoolInfo {
    pub name: String,
    pub resource_name: String,
    pub selector: Selector,
    /// Creation time; `None` for a pool not created yet (a plan's proposal), the newest.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
}

impl PoolInfo {
    /// Older pools first (creation time, then name): the order in which pools
    /// claim a node that several select.
    fn age_key(&self) -> (bool, Option<k8s_openapi::jiff::Timestamp>, &str) {
        (self.created.is_none(), self.created, &self.name)
    }
}

/// Pool membership of every node: each node in at most one pool.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Membership {
    /// Pool name -> indexes (into the node slice) of its nodes, conflicts excluded.
    pub nodes_by_pool: BTreeMap<String, Vec<usize>>,
    /// Node name -> the pools that select it, when two or more do: the oldest,
    /// which counts it, first; the newer ones, which report the conflict, after.
    pub conflicts: BTreeMap<String, Vec<String>>,
}

impl Membership {
    /// Nodes that `pool` selects but an older pool counts, with that pool.
    pub fn conflicts_of<'a>(&'a self, pool: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.conflicts
            .iter()
            .filter(move |(_, pools)| pools.iter().skip(1).any(|p| p == pool))
            .map(|(node, pools)| (node.as_str(), pools[0].as_str()))
    }
}

/// Assigns nodes to pools. A node selected by two or more pools is counted in
/// the oldest of them only, so no device is ever counted twice and a new pool
/// never takes nodes from the pools that had them; the newer ones report it.
pub fn membership(pools: &[PoolInfo], nodes: &[NodeInfo]) -> Membership {
    let mut out = Membership::default();
    for pool in pools {
        out.nodes_by_pool.entry(pool.name.clone()).or_default();
    }
    for (idx, node) in nodes.iter().enumerate() {
        let mut matching: Vec<&PoolInfo> = pools.iter().filter(|p| p.selector.matches(&node.labels)).collect();
        matching.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        let Some(owner) = matching.first() else { continue };
        out.nodes_by_pool.entry(owner.name.clone()).or_default().push(idx);
        if matching.len() > 1 {
            out.conflicts.insert(node.name.clone(), matching.iter().map(|p| p.name.clone()).collect());
        }
    }
    out
}

/// Node-derived totals of one pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolTotals {
    pub nodes: i32,
    pub ready_nodes: i32,
    pub capacity: i64,
    /// Allocatable on ready nodes only: what can be granted.
    pub allocatable: i64,
}

pub fn pool_totals(resource_name: &str, members: &[usize], nodes: &[NodeInfo]) -> PoolTotals {
    let mut totals = PoolTotals::default();
    for node in members.iter().map(|&i| &nodes[i]) {
        totals.nodes += 1;
        totals.capacity += node.capacity_of(resource_name);
        if node.ready {
            totals.ready_nodes += 1;
            totals.allocatable += node.allocatable_of(resource_name);
        }
    }
    totals
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use proptest::prelude::*;

    pub fn node(name: &str, labels: &[(&str, &str)], resource: &str, devices: i64, ready: bool) -> NodeInfo {
        let res: Arc<BTreeMap<String, i64>> = Arc::new([(resource.to_string(), devices)].into());
        NodeInfo {
            name: name.into(),
            labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ready,
            not_ready_since: None,
            capacity: res.clone(),
            allocatable: res,
        }
    }

    pub fn pool(name: &str, resource: &str, label: (&str, &str)) -> PoolInfo {
        let sel = LabelSelector {
            match_labels: Some([(label.0.to_string(), label.1.to_string())].into()),
            ..Default::default()
        };
        PoolInfo { name: name.into(), resource_name: resource.into(), selector: sel.try_into().unwrap(), created: None }
    }

    #[test]
    fn nodes_are_assigned_and_a_contested_node_stays_with_the_oldest_pool() {
        let nodes = vec![
            node("h1", &[("gpu", "h200")], "nvidia.com/gpu", 8, true),
            node("h2", &[("gpu", "h200"), ("rack", "r1")], "nvidia.com/gpu", 8, false),
            node("a1", &[("npu", "atom")], "rebellions.ai/ATOM", 8, true),
            node("cpu", &[], "cpu", 64, true),
        ];
        let at = |s| Some(k8s_openapi::jiff::Timestamp::from_second(s).unwrap());
        // r1 (the newer pool) selects h2, which h200 had.
        let mut pools = vec![
            pool("r1", "nvidia.com/gpu", ("rack", "r1")),
            pool("h200", "nvidia.com/gpu", ("gpu", "h200")),
            pool("atom", "rebellions.ai/ATOM", ("npu", "atom")),
        ];
        pools[0].created = at(200);
        pools[1].created = at(100);
        let m = membership(&pools, &nodes);
        assert_eq!(m.nodes_by_pool["h200"], vec![0, 1]);
        assert!(m.nodes_by_pool["r1"].is_empty());
        assert_eq!(m.nodes_by_pool["atom"], vec![2]);
        assert_eq!(m.conflicts["h2"], vec!["h200".to_string(), "r1".to_string()]);
        assert_eq!(m.conflicts_of("r1").collect::<Vec<_>>(), vec![("h2", "h200")]);
        assert_eq!(m.conflicts_of("h200").count(), 0);
        assert_eq!(m.conflicts_of("atom").count(), 0);

        let t = pool_totals("nvidia.com/gpu", &m.nodes_by_pool["h200"], &nodes);
        assert_eq!(t, PoolTotals { nodes: 2, ready_nodes: 1, capacity: 16, allocatable: 8 });

        // A pool not created yet (a plan's proposal) is the newest of all.
        pools[1].created = None;
        let m = membership(&pools, &nodes);
        assert_eq!(m.nodes_by_pool["r1"], vec![1]);
        assert_eq!(m.conflicts_of("h200").collect::<Vec<_>>(), vec![("h2", "r1")]);
    }

    #[test]
    fn not_ready_nodes_add_capacity_but_not_allocatable() {
        let nodes = vec![node("a", &[], "x.io/d", 8, true), node("b", &[], "x.io/d", 8, false)];
        let t = pool_totals("x.io/d", &[0, 1], &nodes);
        assert_eq!(t, PoolTotals { nodes: 2, ready_nodes: 1, capacity: 16, allocatable: 8 });
    }

    proptest! {
        /// Whatever the selectors, no node is counted in two pools, every selected
        /// node is in exactly one, and a contested node stays with the older pool.
        #[test]
        fn every_node_counted_at_most_once(labels in proptest::collection::vec(0u8..4, 1..60)) {
            let nodes: Vec<NodeInfo> = labels.iter().enumerate().map(|(i, l)| {
                let mut ls = vec![];
                if l & 1 == 1 { ls.push(("a", "1")); }
                if l & 2 == 2 { ls.push(("b", "1")); }
                node(&format!("n{i}"), &ls, "x.io/d", 8, true)
            }).collect();
            let pools = vec![pool("pa", "x.io/d", ("a", "1")), pool("pb", "x.io/d", ("b", "1"))];
            let m = membership(&pools, &nodes);
            for (i, l) in labels.iter().enumerate() {
                let in_a = m.nodes_by_pool["pa"].contains(&i);
                let in_b = m.nodes_by_pool["pb"].contains(&i);
                let conflict = m.conflicts.contains_key(&format!("n{i}"));
                prop_assert!(!(in_a && in_b));
                match l {
                    0 => prop_assert!(!in_a && !in_b && !conflict),
                    1 => prop_assert!(in_a && !conflict),
                    2 => prop_assert!(in_b && !conflict),
                    _ => prop_assert!(in_a && !in_b && conflict),
                }
            }
        }
    }
}
