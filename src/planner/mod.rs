//! The pure planner: decisions from plain snapshots of the cluster, with no
//! client and no I/O, so they can be unit-tested and benchmarked at national
//! scale. Reconcilers build the snapshot from their reflector stores, call the
//! planner, and apply what it returns.

pub mod fair;
pub mod fit;
pub mod gang;
pub mod grants;
pub mod inventory;
pub mod ledger;
pub mod placement;
pub mod preemption;
pub mod request;
pub mod reservation;
pub mod usage;
