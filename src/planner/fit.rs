//! Whether a waiting gang could ever be admitted with the pools and the grant
//! as they are: a gang that waits for capacity says how much it waits for; a
//! gang that no amount of waiting admits (a worker larger than every node, a
//! gang larger than its grant) says that instead, pool by pool.

use std::collections::BTreeMap;

use super::request::{AllocationQuota, GangRequest};
use crate::api::HOSTNAME_KEY;

/// What bounds every placement in a pool, whatever runs there.
#[derive(Clone, Debug, Default)]
pub struct PoolShape {
    pub resource_name: String,
    /// Member nodes, Ready or not.
    pub nodes: usize,
    /// The most devices one member node has.
    pub largest_node: i64,
    /// Topology keys a required placement can use in this pool: the declared
    /// ones and any label key its nodes carry.
    pub keys: std::collections::BTreeSet<String>,
}

/// Why `gang` can never be admitted, or None if some listed pool could take
/// it once enough runs finish.
pub fn never_fits(
    gang: &GangRequest,
    pools: &BTreeMap<String, PoolShape>,
    quota: Option<&AllocationQuota>,
) -> Option<String> {
    let total = gang.workers as i64 * gang.per_worker;
    let mut why = Vec::with_capacity(gang.pools.len());
    for name in &gang.pools {
        let reason = match pools.get(name) {
            None => "has no usable node selector".to_string(),
            // A pool that could take it clears the verdict.
            Some(p) => pool_reason(gang, total, name, p, quota)?,
        };
        why.push(format!("pool {name} {reason}"));
    }
    (!why.is_empty()).then(|| format!("can never be admitted as the pools and grant are: {}", why.join("; ")))
}

fn pool_reason(
    gang: &GangRequest,
    total: i64,
    name: &str,
    p: &PoolShape,
    quota: Option<&AllocationQuota>,
) -> Option<String> {
    let (per, res) = (gang.per_worker, &p.resource_name);
    if p.nodes == 0 {
        return Some("has no nodes".into());
    }
    if p.largest_node < per {
        return Some(format!("has no node with {per} {res} for a worker (the largest has {})", p.largest_node));
    }
    if gang.workers as usize > p.nodes {
        return Some(format!("has {} nodes and the gang needs {} (one worker per node)", p.nodes, gang.workers));
    }
    if let Some(t) = gang.topology.as_ref().filter(|t| t.required) {
        if t.key == HOSTNAME_KEY && gang.workers > 1 {
            return Some(format!(
                "cannot hold {} workers in one {HOSTNAME_KEY} domain (one worker per node)",
                gang.workers
            ));
        }
        if !p.keys.contains(&t.key) {
            return Some(format!("does not declare topology key {} and no node carries it", t.key));
        }
    }
    let q = quota?;
    let Some(&granted) = q.granted.get(name) else {
        return Some(format!("is not granted to allocation {}", q.name));
    };
    let borrowing =
        if gang.preemptible && !q.dedicated.contains(name) { q.borrowing.get(name).copied().unwrap_or(0) } else { 0 };
    (total > granted + borrowing).then(|| {
        let limit = if borrowing > 0 {
            format!("{granted} granted + {borrowing} borrowing")
        } else {
            format!("{granted} granted")
        };
        format!("allows allocation {} at most {limit} {res} and the gang needs {total}", q.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::placement::TopologyRequest;
    use k8s_openapi::jiff::Timestamp;

    fn gang(pools: &[&str], workers: u32, per: i64) -> GangRequest {
        GangRequest {
            key: "team/run".into(),
            allocation: "team".into(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            workers,
            per_worker: per,
            priority: 0,
            queued_since: Timestamp::UNIX_EPOCH,
            topology: None,
            preemptible: true,
            preemption_priority: 0,
        }
    }

    fn shapes() -> BTreeMap<String, PoolShape> {
        let shape = |nodes, largest: i64| PoolShape {
            resource_name: "nvidia.com/gpu".into(),
            nodes,
            largest_node: largest,
            keys: ["topology.sovereign.ai/rack".to_string()].into(),
        };
        [("h200".to_string(), shape(4, 8)), ("empty".to_string(), shape(0, 0)), ("small".to_string(), shape(2, 4))]
            .into()
    }

    fn quota(granted: i64, borrowing: i64) -> AllocationQuota {
        AllocationQuota {
            name: "team".into(),
            blocked: None,
            headroom: [("h200".to_string(), granted + borrowing)].into(),
            dedicated: Default::default(),
            borrowing: [("h200".to_string(), borrowing)].into(),
            granted: [("h200".to_string(), granted)].into(),
        }
    }

    #[test]
    fn each_bound_is_named_and_a_fitting_pool_clears_the_verdict() {
        let required = |key: &str| Some(TopologyRequest { key: key.into(), required: true });
        let cases: Vec<(&str, GangRequest, AllocationQuota, Option<&str>)> = vec![
            ("fits", gang(&["h200"], 2, 8), quota(32, 0), None),
            (
                "worker larger than every node",
                gang(&["h200"], 1, 16),
                quota(32, 0),
                Some("no node with 16 nvidia.com/gpu for a worker (the largest has 8)"),
            ),
            ("more workers than nodes", gang(&["h200"], 5, 1), quota(32, 0), Some("has 4 nodes and the gang needs 5")),
            (
                "beyond grant and borrowing",
                gang(&["h200"], 4, 8),
                quota(16, 8),
                Some("at most 16 granted + 8 borrowing nvidia.com/gpu and the gang needs 32"),
            ),
            ("within grant and borrowing", gang(&["h200"], 3, 8), quota(16, 8), None),
            ("no pool has nodes", gang(&["empty"], 1, 1), quota(32, 0), Some("pool empty has no nodes")),
            (
                "pool not granted",
                gang(&["small"], 1, 4),
                quota(32, 0),
                Some("pool small is not granted to allocation team"),
            ),
            ("unknown pool", gang(&["gone"], 1, 1), quota(32, 0), Some("pool gone has no usable node selector")),
            ("fallback fits", gang(&["small", "h200"], 2, 8), quota(32, 0), None),
            (
                "undeclared key",
                GangRequest { topology: required("zone"), ..gang(&["h200"], 2, 8) },
                quota(32, 0),
                Some("does not declare topology key zone"),
            ),
            (
                "declared key",
                GangRequest { topology: required("topology.sovereign.ai/rack"), ..gang(&["h200"], 2, 8) },
                quota(32, 0),
                None,
            ),
            (
                "one-node domain",
                GangRequest { topology: required(HOSTNAME_KEY), ..gang(&["h200"], 2, 8) },
                quota(32, 0),
                Some("cannot hold 2 workers in one kubernetes.io/hostname domain"),
            ),
        ];
        for (name, g, q, want) in cases {
            let got = never_fits(&g, &shapes(), Some(&q));
            match want {
                None => assert_eq!(got, None, "{name}"),
                Some(w) => assert!(got.as_deref().is_some_and(|m| m.contains(w)), "{name}: {got:?}"),
            }
        }
    }

    #[test]
    fn a_non_preemptible_gang_does_not_count_borrowing() {
        let g = GangRequest { preemptible: false, ..gang(&["h200"], 3, 8) };
        let got = never_fits(&g, &shapes(), Some(&quota(16, 8))).unwrap_or_default();
        assert!(got.contains("at most 16 granted nvidia.com/gpu and the gang needs 24"), "{got}");
    }
}
