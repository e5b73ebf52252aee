//! What an admission pass is asked: the gangs that wait, the allocations'
//! quotas, the pools' free devices, the gangs that hold devices and those that
//! are giving them back. Plain types shared by the pass ([`super::placement`]),
//! its preemption rules ([`super::preemption`]) and fair share ([`super::fair`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;

/// Free devices on one node that a gang may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFree {
    /// Index into the pass's nodes.
    pub node: usize,
    pub free: i64,
}

#[derive(Clone, Debug, Default)]
pub struct PlacementPool {
    pub name: String,
    pub resource_name: String,
    /// Topology label keys coarse to fine WITHOUT kubernetes.io/hostname (e.g.
    /// ["topology.sovereign.ai/block", "topology.sovereign.ai/rack"]).
    pub levels: Vec<String>,
    /// Ready nodes of the pool reserved by nobody, with their free devices.
    pub shared_nodes: Vec<NodeFree>,
    /// Nodes reserved by dedicated grants, per allocation name.
    pub reserved_nodes: BTreeMap<String, Vec<NodeFree>>,
}

#[derive(Clone, Debug, Default)]
pub struct AllocationQuota {
    pub name: String,
    /// None when the allocation may admit; otherwise why not (shown verbatim,
    /// e.g. "allocation lgai is Pending: window opens at ...").
    pub blocked: Option<String>,
    /// Per pool: devices the allocation may still admit (grant + borrowing
    /// limit − gangs already admitted there). Pools absent here are not granted.
    pub headroom: BTreeMap<String, i64>,
    /// Pools where its grant is Dedicated: gangs there use only its reserved nodes.
    pub dedicated: BTreeSet<String>,
    /// Per pool: the borrowing limit, the part of `headroom` beyond the grant
    /// (absent: 0). Only preemptible gangs borrow, after every gang that fits
    /// within its own grant.
    pub borrowing: BTreeMap<String, i64>,
    /// Per pool: the grant, for the dominant share (absent: not counted).
    pub granted: BTreeMap<String, i64>,
}

impl AllocationQuota {
    pub(super) fn borrowing_in(&self, pool: &str) -> i64 {
        self.borrowing.get(pool).copied().unwrap_or(0).max(0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TopologyRequest {
    pub key: String,
    pub required: bool,
}

#[derive(Clone, Debug)]
pub struct GangRequest {
    /// "namespace/name", unique.
    pub key: String,
    pub allocation: String,
    /// Preference order.
    pub pools: Vec<String>,
    pub workers: u32,
    pub per_worker: i64,
    pub priority: i32,
    pub queued_since: Timestamp,
    pub topology: Option<TopologyRequest>,
    /// May borrow (and so be reclaimed); false also protects it once running.
    pub preemptible: bool,
    /// Compared with running gangs' priorities: the project's own priority
    /// (`priority` may carry a boost for ordering).
    pub preemption_priority: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `nodes[i]` is the node of worker i; all distinct. `borrowed`: the
    /// allocation's admitted total in the pool, this gang included, exceeds
    /// its grant (decided here, admission by admission, never recomputed).
    Admitted { pool: String, nodes: Vec<String>, borrowed: bool },
    /// 1-based position in its allocation's queue, and the reason in numbers.
    Waiting { position: u32, reason: String },
}

/// A gang that holds devices now.
#[derive(Clone, Debug)]
pub struct RunningGang {
    /// "namespace/name", unique.
    pub key: String,
    pub allocation: String,
    pub pool: String,
    /// Node index (into the pass's nodes) of each worker.
    pub nodes: Vec<usize>,
    pub per_worker: i64,
    pub priority: i32,
    /// When it was admitted.
    pub started: Timestamp,
    /// Admitted beyond its allocation's grant, on lent capacity.
    pub borrowed: bool,
    pub preemptible: bool,
    /// Neither preempted nor reclaimed before this time.
    pub protected_until: Option<Timestamp>,
}

impl RunningGang {
    pub fn devices(&self) -> i64 {
        self.per_worker * self.nodes.len() as i64
    }

    pub fn protected_at(&self, now: Timestamp) -> bool {
        !self.preemptible || self.protected_until.is_some_and(|t| now < t)
    }
}

/// Devices of a stopped gang's pods that are still terminating.
#[derive(Clone, Debug)]
pub struct Releasing {
    /// Node index, when the pod was bound.
    pub node: Option<usize>,
    pub allocation: String,
    pub pool: String,
    pub devices: i64,
}

/// Devices of stopped runs still being released in a pool: per node, and the
/// part that is the allocation's own (its grant gets it back).
pub fn released_in(releasing: &[Releasing], pool: &str, allocation: &str) -> (BTreeMap<usize, i64>, i64) {
    let mut per_node: BTreeMap<usize, i64> = BTreeMap::new();
    let mut own = 0;
    for r in releasing.iter().filter(|r| r.pool == pool) {
        if let Some(n) = r.node {
            *per_node.entry(n).or_default() += r.devices;
        }
        if r.allocation == allocation {
            own += r.devices;
        }
    }
    (per_node, own)
}

/// Victims chosen for one waiting gang.
#[derive(Clone, Debug, PartialEq)]
pub struct Preemption {
    pub preemptor: String,
    pub pool: String,
    /// Keys, in candidate order.
    pub victims: Vec<String>,
    /// Victims taken from other allocations' borrowed capacity.
    pub reclaimed: Vec<String>,
}

pub(super) fn releasing_reason(pool: &str) -> String {
    format!("fits in pool {pool} once the workers of stopped runs are gone; waiting for them")
}
