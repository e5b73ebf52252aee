//! Everything an admission decision reads, in one value. Built by the caller
//! (the admission loop from its reflector stores, `plan` from the cluster it
//! read, both through `controller::view::View::snapshot`); `decide` reads
//! nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::gang::Gang;
use crate::planner::FastMap;
use crate::planner::grants::{AllocationState, GrantPlan, PoolState};
use crate::planner::inventory::NodeInfo;
use crate::planner::placement::PlacementCache;
use crate::planner::request::Releasing;

/// The capacity side changes with nodes, pools and grants only: shared
/// (`Arc`) between the snapshots of the cycles that reuse it.
#[derive(Clone)]
pub struct Snapshot {
    pub nodes: Arc<Vec<NodeInfo>>,
    /// Node name -> index into `nodes`.
    pub node_index: Arc<FastMap<String, usize>>,
    /// Pools with a usable selector: resource, topology levels, member nodes.
    pub pools: Arc<Vec<PoolState>>,
    /// Allocations with their grants.
    pub allocations: Arc<Vec<AllocationState>>,
    /// Grants in force (each allocation's phase and why), reservations.
    pub grants: Arc<GrantPlan>,
    /// Node -> allocation named by its reservation label.
    pub labelled: Arc<BTreeMap<String, String>>,
    /// Allocations whose budget enforcement is Hard.
    pub hard_budget: Arc<BTreeSet<String>>,
    /// What passes over the same nodes reuse.
    pub placement: Arc<PlacementCache>,
    /// Devices held by running pods the operator does not own, per node index.
    pub foreign: Vec<(usize, BTreeMap<String, i64>)>,
    /// Devices of stopped gangs' pods still terminating.
    pub releasing: Vec<Releasing>,
    /// Every gang that waits for devices or holds them.
    pub gangs: Vec<Gang>,
}

impl Snapshot {
    pub fn pool(&self, name: &str) -> Option<&PoolState> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The grant (accelerators, without borrowing) of an allocation in a pool.
    pub fn granted(&self, allocation: &str, pool: &str) -> i64 {
        self.allocations
            .iter()
            .find(|a| a.name == allocation)
            .and_then(|a| a.grants.iter().find(|g| g.pool == pool))
            .map(|g| g.accelerators)
            .unwrap_or(0)
    }
}
