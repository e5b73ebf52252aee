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

/// A hash map for the planner's hot lookups by name (node names, pool and
/// allocation names): foldhash, which kube's own maps already use, is several
/// times faster than SipHash on short keys, and no key comes from a peer that
/// could choose collisions.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
