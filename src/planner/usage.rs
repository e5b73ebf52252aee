//! What running pods use, which allocation each pod is charged to, and the
//! accelerator-hour charge.
//!
//! Charging rule: a pod in a tenant namespace is charged to the allocation its
//! `sovereign.ai/allocation` label names, when that allocation lists the
//! namespace; otherwise to the first allocation listing the namespace, in the
//! order Active before inactive, with a grant in the pod's pool first, then
//! priority (higher first), age and name. The hours themselves are the
//! ledger's (`super::ledger`): each pod's own lifetime x devices x the pool's
//! chargeFactor.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

use super::grants::AllocationState;

/// A running pod that requests accelerators.
#[derive(Clone, Debug, PartialEq)]
pub struct PodUse {
    pub namespace: String,
    pub node: String,
    /// Whole-number requests per resource name.
    pub requests: BTreeMap<String, i64>,
    /// The allocation named by the pod's label, if any.
    pub allocation: Option<String>,
}

/// A pool as usage needs it.
#[derive(Clone, Debug)]
pub struct PoolRate {
    pub name: String,
    pub resource_name: String,
    pub domestic: bool,
    pub charge_factor: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct AllocationUse {
    /// Devices in use per pool.
    pub in_use: BTreeMap<String, i64>,
    /// Charge-weighted devices: accelerator-hours accrue at this rate per hour.
    pub rate: f64,
    /// The part of `rate` on domestic pools.
    pub domestic_rate: f64,
    pub domestic_devices: i64,
}

impl AllocationUse {
    pub fn devices(&self) -> i64 {
        self.in_use.values().sum()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub by_allocation: BTreeMap<String, AllocationUse>,
    /// Devices in use per pool, by any pod.
    pub by_pool: BTreeMap<String, i64>,
}

/// Attributes running pods to pools and allocations. `node_pool` maps a node
/// to the index of its pool in `pools`; `active` names the Active allocations.
pub fn attribute(
    pods: &[PodUse],
    node_pool: &BTreeMap<String, usize>,
    pools: &[PoolRate],
    allocations: &[AllocationState],
    active: &dyn Fn(&str) -> bool,
) -> Usage {
    let mut out = Usage::default();
    let mut by_ns: BTreeMap<&str, Vec<&AllocationState>> = BTreeMap::new();
    for a in allocations.iter().filter(|a| !a.deleting) {
        for ns in &a.namespaces {
            by_ns.entry(ns.as_str()).or_default().push(a);
        }
    }
    for pod in pods {
        let Some(pool) = node_pool.get(&pod.node).map(|&i| &pools[i]) else {
            continue;
        };
        let devices = pod.requests.get(&pool.resource_name).copied().unwrap_or(0);
        if devices == 0 {
            continue;
        }
        *out.by_pool.entry(pool.name.clone()).or_default() += devices;
        let Some(candidates) = by_ns.get(pod.namespace.as_str()) else {
            continue;
        };
        if let Some(a) = charged_to(candidates, pod.allocation.as_deref(), Some(&pool.name), active) {
            let u = out.by_allocation.entry(a.name.clone()).or_default();
            *u.in_use.entry(pool.name.clone()).or_default() += devices;
            let weighted = devices as f64 * pool.charge_factor;
            u.rate += weighted;
            if pool.domestic {
                u.domestic_rate += weighted;
                u.domestic_devices += devices;
            }
        }
    }
    out
}

/// The allocation a pod is charged to, among the (not deleting) allocations
/// that list its namespace: the one its label names, else by the charging rule
/// above.
pub fn charged_to<'a>(
    candidates: &[&'a AllocationState],
    label: Option<&str>,
    pool: Option<&str>,
    active: &dyn Fn(&str) -> bool,
) -> Option<&'a AllocationState> {
    let labelled = label.and_then(|l| candidates.iter().find(|a| a.name == l));
    labelled
        .or_else(|| {
            candidates.iter().min_by_key(|a| {
                let has_grant = a.grants.iter().any(|g| Some(g.pool.as_str()) == pool);
                (Reverse(active(&a.name)), Reverse(has_grant), Reverse(a.priority), a.created, a.name.as_str())
            })
        })
        .copied()
}

/// When the budget runs out at the current rate, if it will.
pub fn exhausted_at(budget: f64, hours: f64, now: Timestamp, rate: f64) -> Option<Timestamp> {
    if rate <= 0.0 || hours >= budget {
        return None;
    }
    let secs = ((budget - hours) / rate * 3600.0).ceil() as i64;
    now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs.max(1))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::grants::GrantState;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn alloc(name: &str, ns: &str, pool: &str, priority: i32) -> AllocationState {
        AllocationState {
            name: name.into(),
            priority,
            created: t(0),
            namespaces: vec![ns.into()],
            window_start: None,
            window_end: None,
            grants: vec![GrantState { pool: pool.into(), accelerators: 8, dedicated: false, borrowing_limit: 0 }],
            budget_hours: None,
            hours_used: 0.0,
            min_domestic_share: None,
            was_active: true,
            budget_used_up: false,
            deleting: false,
        }
    }

    fn pod(ns: &str, node: &str, res: &str, n: i64, label: Option<&str>) -> PodUse {
        PodUse {
            namespace: ns.into(),
            node: node.into(),
            requests: [(res.to_string(), n)].into(),
            allocation: label.map(String::from),
        }
    }

    fn pools() -> (Vec<PoolRate>, BTreeMap<String, usize>) {
        let pools = vec![
            PoolRate {
                name: "h200".into(),
                resource_name: "nvidia.com/gpu".into(),
                domestic: false,
                charge_factor: 1.0,
            },
            PoolRate {
                name: "atom".into(),
                resource_name: "rebellions.ai/ATOM".into(),
                domestic: true,
                charge_factor: 0.5,
            },
        ];
        let nodes = [("h0".to_string(), 0), ("a0".to_string(), 1)].into();
        (pools, nodes)
    }

    #[test]
    fn pods_are_charged_by_label_then_by_grant_then_priority() {
        let (pools, nodes) = pools();
        let allocs =
            vec![alloc("gpu", "team", "h200", 0), alloc("npu", "team", "atom", 0), alloc("vip", "team", "atom", 5)];
        let pods = vec![
            pod("team", "h0", "nvidia.com/gpu", 8, None), // the one with an h200 grant
            pod("team", "a0", "rebellions.ai/ATOM", 4, None), // atom grant, higher priority
            pod("team", "a0", "rebellions.ai/ATOM", 2, Some("npu")), // its label wins
            pod("team", "cpu0", "nvidia.com/gpu", 8, None), // not in a pool: ignored
            pod("elsewhere", "h0", "nvidia.com/gpu", 1, None), // no allocation: pool use only
        ];
        let u = attribute(&pods, &nodes, &pools, &allocs, &|_| true);
        assert_eq!(u.by_allocation["gpu"].in_use["h200"], 8);
        assert_eq!(u.by_allocation["vip"].in_use["atom"], 4);
        assert_eq!(u.by_allocation["npu"].in_use["atom"], 2);
        assert_eq!(u.by_allocation["vip"].rate, 2.0);
        assert_eq!(u.by_allocation["vip"].domestic_devices, 4);
        assert_eq!(u.by_pool["h200"], 9);
        assert_eq!(u.by_pool["atom"], 6);
    }

    #[test]
    fn active_allocations_are_charged_before_inactive_ones() {
        let (pools, nodes) = pools();
        let allocs = vec![alloc("expired", "team", "h200", 9), alloc("current", "team", "h200", 0)];
        let u =
            attribute(&[pod("team", "h0", "nvidia.com/gpu", 8, None)], &nodes, &pools, &allocs, &|a| a == "current");
        assert_eq!(u.by_allocation.keys().collect::<Vec<_>>(), vec!["current"]);
    }

    #[test]
    fn exhaustion_time_is_projected_from_the_rate() {
        assert_eq!(exhausted_at(10.0, 9.0, t(0), 1.0), Some(t(3600)));
        assert_eq!(exhausted_at(10.0, 10.0, t(0), 1.0), None);
        assert_eq!(exhausted_at(10.0, 0.0, t(0), 0.0), None);
    }
}
