//! The admission core: which gangs hold devices, decided purely.
//!
//! `watch events -> Snapshot -> decide(snapshot, now, settings) -> Decisions`,
//! then the admission loop writes the decisions (`controller::admission`) and
//! `plan` renders them. The core speaks of gangs ([`gang`]); each workload
//! kind has an adapter into it and out of it ([`project`] for ModelProject,
//! [`job`] for a labelled batch Job or JobSet; [`placement`] gives an
//! admitted JobSet's gated pods their planned nodes; [`line`] is what `kubectl
//! get workloadadmissions` shows of one).
//! No client, no clock, no metrics in here: table and property tests in
//! `tests.rs`, a criterion bench in `benches/decide.rs`.

pub mod decide;
pub mod gang;
pub mod job;
pub mod line;
pub mod placement;
pub mod project;
pub mod snapshot;
#[cfg(test)]
mod tests;

pub use decide::{Decision, Decisions, Settings, WaitReason, decide};
pub use gang::{Gang, GangKey, GangKind, GangState, Holding};
pub use snapshot::Snapshot;
