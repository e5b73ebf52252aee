//! The `sovereign.ai/v1alpha1` API: the custom resources and the small
//! types they share. Doc comments here become the CRD field descriptions that
//! `kubectl explain` shows, so they are written for the cluster's users.

// kube-derive takes repeated `type_` keys inside each `printcolumn(...)`; clippy
// mistakes them for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod allocation;
pub mod policy;
mod pool;
mod project;
pub mod validation;
mod workload_admission;

pub use allocation::*;
pub use pool::*;
pub use project::*;
pub use workload_admission::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResourceExt;

/// API group of every kind this operator serves.
pub const GROUP: &str = "sovereign.ai";
/// Label and annotation prefix of everything the operator writes.
pub const DOMAIN: &str = "sovereign.ai";
/// Topology key every pool's `topologyKeys` ends with.
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";

/// Every CRD this operator serves, in the order `crd` prints them.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![AcceleratorPool::crd(), GpuAllocation::crd(), ModelProject::crd(), WorkloadAdmission::crd()]
}

/// Shared status shape helpers: conditions follow metav1.Condition semantics,
/// where `lastTransitionTime` moves only when the status of a condition flips.
pub fn set_condition(conditions: &mut Vec<Condition>, mut next: Condition, now: &Time) {
    match conditions.iter_mut().find(|c| c.type_ == next.type_) {
        Some(existing) => {
            next.last_transition_time =
                if existing.status == next.status { existing.last_transition_time.clone() } else { now.clone() };
            *existing = next;
        }
        None => {
            next.last_transition_time = now.clone();
            conditions.push(next);
        }
    }
}

/// The condition of `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Builds a condition; `lastTransitionTime` is filled in by [`set_condition`].
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = Vec::new();
        set_condition(&mut conds, condition("Ready", false, "Waiting", "a", None), &at(10));
        assert_eq!(conds[0].last_transition_time, at(10));
        // Same status, new reason and message: the time stays.
        set_condition(&mut conds, condition("Ready", false, "Other", "b", None), &at(20));
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].reason, "Other");
        // Status flips: the time moves.
        set_condition(&mut conds, condition("Ready", true, "Ok", "c", None), &at(30));
        assert_eq!(conds[0].last_transition_time, at(30));
        assert_eq!(conds.len(), 1);
        set_condition(&mut conds, condition("Other", true, "Ok", "", None), &at(40));
        assert_eq!(conds.len(), 2);
        assert!(find_condition(&conds, "Other").is_some());
        assert!(find_condition(&conds, "Missing").is_none());
    }

    #[test]
    fn every_crd_is_in_the_sovereign_category_with_status() {
        for crd in all_crds() {
            assert_eq!(crd.spec.group, GROUP);
            assert!(crd.spec.names.categories.as_ref().unwrap().contains(&"sovereign".to_string()));
            let v = &crd.spec.versions[0];
            assert!(v.subresources.as_ref().unwrap().status.is_some(), "{}", crd.spec.names.kind);
            assert!(!v.additional_printer_columns.as_ref().unwrap().is_empty());
            assert!(!crd.spec.names.short_names.as_ref().unwrap().is_empty());
        }
    }

    #[test]
    fn conditions_are_a_bounded_map_keyed_by_type() {
        // A WorkloadAdmission is one line with one state: no conditions.
        let with_conditions = all_crds().into_iter().filter(|c| c.spec.names.kind != "WorkloadAdmission");
        for crd in with_conditions {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            let c = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
            let kind = &crd.spec.names.kind;
            assert_eq!(c["x-kubernetes-list-type"], "map", "{kind}");
            assert_eq!(c["x-kubernetes-list-map-keys"], serde_json::json!(["type"]), "{kind}");
            assert_eq!(c["maxItems"], 16, "{kind}");
            let item = &c["items"];
            assert!(
                item["required"].as_array().unwrap().contains(&"type".into()),
                "{kind}: a map key must be required"
            );
            assert_eq!(item["properties"]["status"]["enum"], serde_json::json!(["True", "False", "Unknown"]));
            assert_eq!(item["properties"]["type"]["maxLength"], 316);
        }
    }
}
