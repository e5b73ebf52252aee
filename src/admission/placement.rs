//! The planned node of each pod of an admitted JobSet, decided purely.
//!
//! A JobSet's pod templates cannot take node affinity while it is suspended
//! (the JobSet webhook lets only their labels, annotations, node selector,
//! tolerations and scheduling gates change), so its admission adds the gate
//! [`PLACEMENT_GATE`] to every pod template ([`super::job`]): the pods its
//! Jobs make are created gated, the scheduler leaves them alone, and the
//! operator gives each one a node of the admission's planned nodes (the
//! `sovereign.ai/admitted-nodes` annotation) by required node affinity, in
//! the same write that removes the gate (adding node affinity to a gated pod
//! is allowed). [`assign`] decides which; [`release`] is the write.
//!
//! Each planned node holds for the gang as many devices as the plan put there
//! (one pod's devices per time the node is listed). Pods already placed (by
//! their own node affinity, or bound) count on their node first, so an
//! operator that restarts, or a pod made again after a failure, never
//! double-books a node. A pod that asks for no devices (a launcher) is only
//! ungated. A pod that fits nowhere stays gated until a placed pod ends.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Pod};
use kube::ResourceExt;
use serde_json::{Value, json};

/// The scheduling gate an admitted JobSet's pods are created with, removed
/// by the operator once it pinned them to their planned node.
pub const PLACEMENT_GATE: &str = "sovereign.ai/placement";

/// The node field a pin names (exact: the node's name, not a label that may differ).
const NODE_NAME_FIELD: &str = "metadata.name";

/// One pod of an admitted gang, as its placement reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GangPod {
    pub name: String,
    /// Devices of the gang's resource it asks for (0: a launcher).
    pub devices: i64,
    /// The node it is placed on: bound, or pinned by its node affinity.
    pub node: Option<String>,
    /// It still carries [`PLACEMENT_GATE`].
    pub gated: bool,
}

/// What becomes of a gated pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    /// Pinned to this planned node, and ungated.
    Pin(String),
    /// Only ungated: it asks for no devices, or it is already pinned.
    Ungate,
}

/// The gated pods of one admitted gang that can be released now, in name
/// order, each with its node. `planned` lists a node once per pod of
/// `per_pod` devices the plan put on it. A gated pod that fits on no planned
/// node (more pods than planned: the ones placed still hold their nodes) is
/// left out, and stays gated.
pub fn assign(planned: &[String], per_pod: i64, pods: &[GangPod]) -> Vec<(String, Release)> {
    // Free devices per planned node, in the plan's order of first mention.
    let mut order: Vec<&str> = Vec::new();
    let mut free: BTreeMap<&str, i64> = BTreeMap::new();
    for n in planned {
        if !free.contains_key(n.as_str()) {
            order.push(n);
        }
        *free.entry(n).or_default() += per_pod;
    }
    for p in pods.iter().filter(|p| p.devices > 0) {
        if let Some(left) = p.node.as_deref().and_then(|n| free.get_mut(n)) {
            *left -= p.devices;
        }
    }
    let mut gated: Vec<&GangPod> = pods.iter().filter(|p| p.gated).collect();
    gated.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::with_capacity(gated.len());
    for p in gated {
        if p.devices <= 0 || p.node.is_some() {
            out.push((p.name.clone(), Release::Ungate));
            continue;
        }
        let Some(node) = order.iter().find(|n| free[**n] >= p.devices) else { continue };
        *free.get_mut(node).expect("a planned node") -= p.devices;
        out.push((p.name.clone(), Release::Pin(node.to_string())));
    }
    out
}

/// Whether the pod still carries [`PLACEMENT_GATE`].
pub fn gated(pod: &Pod) -> bool {
    pod.spec.iter().flat_map(|s| s.scheduling_gates.iter().flatten()).any(|g| g.name == PLACEMENT_GATE)
}

/// The node a pod is placed on: the one it is bound to, else the one its
/// required node affinity pins it to (every term names the same one node by
/// its name).
pub fn placed_on(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = &spec.node_name {
        return Some(n.clone());
    }
    let terms = required_terms(pod);
    let pinned = |t: &NodeSelectorTerm| {
        t.match_fields.iter().flatten().find_map(|r| match r.values.as_deref() {
            Some([one]) if r.key == NODE_NAME_FIELD && r.operator == "In" => Some(one.clone()),
            _ => None,
        })
    };
    let first = pinned(terms.first()?)?;
    terms.iter().all(|t| pinned(t).as_ref() == Some(&first)).then_some(first)
}

fn required_terms(pod: &Pod) -> Vec<NodeSelectorTerm> {
    let affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    let required =
        affinity.and_then(|a| a.node_affinity.as_ref()?.required_during_scheduling_ignored_during_execution.clone());
    required.map(|r| r.node_selector_terms).unwrap_or_default()
}

/// The write that releases a gated pod: a JSON merge patch guarded by the
/// resourceVersion it was decided on, that drops [`PLACEMENT_GATE`] (other
/// gates stay) and, for [`Release::Pin`], requires the node by name. A pod's
/// node selector terms are ORed, and on a gated pod a term may only gain
/// requirements: the pin is added to each of its own terms, or is the one term.
pub fn release(pod: &Pod, how: &Release) -> Value {
    let gates: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| s.scheduling_gates.iter().flatten())
        .filter(|g| g.name != PLACEMENT_GATE)
        .map(|g| json!({"name": g.name}))
        .collect();
    let mut spec = json!({"schedulingGates": if gates.is_empty() { Value::Null } else { Value::Array(gates) }});
    if let Release::Pin(node) = how {
        let pin = NodeSelectorRequirement {
            key: NODE_NAME_FIELD.into(),
            operator: "In".into(),
            values: Some(vec![node.clone()]),
        };
        let mut terms = required_terms(pod);
        if terms.is_empty() {
            terms.push(NodeSelectorTerm::default());
        }
        for t in &mut terms {
            t.match_fields.get_or_insert_with(Vec::new).push(pin.clone());
        }
        spec["affinity"] =
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}});
    }
    json!({"metadata": {"resourceVersion": pod.resource_version()}, "spec": spec})
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pod(name: &str, devices: i64, node: Option<&str>, gated: bool) -> GangPod {
        GangPod { name: name.into(), devices, node: node.map(String::from), gated }
    }

    fn nodes(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    type Released = Vec<(String, Release)>;

    fn pin(name: &str, node: &str) -> (String, Release) {
        (name.into(), Release::Pin(node.into()))
    }

    #[test]
    fn gated_pods_go_to_the_planned_nodes_as_many_as_the_plan_put_there() {
        let ungate = |name: &str| (name.to_string(), Release::Ungate);
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<String>, Vec<GangPod>, Released)> = vec![
            ("two pods per node, in the plan's order",
             nodes(&["n2", "n2", "n1", "n1"]),
             vec![pod("w-0", 8, None, true), pod("w-1", 8, None, true), pod("w-2", 8, None, true), pod("w-3", 8, None, true)],
             vec![pin("w-0", "n2"), pin("w-1", "n2"), pin("w-2", "n1"), pin("w-3", "n1")]),
            ("a launcher asks for no devices: only ungated",
             nodes(&["n1"]),
             vec![pod("launcher-0", 0, None, true), pod("w-0", 8, None, true)],
             vec![ungate("launcher-0"), pin("w-0", "n1")]),
            ("pods placed before a restart keep their nodes; the rest fill what is left",
             nodes(&["n1", "n1", "n2", "n2"]),
             vec![pod("w-0", 8, Some("n1"), false), pod("w-1", 8, Some("n2"), false), pod("w-2", 8, None, true), pod("w-3", 8, None, true)],
             vec![pin("w-2", "n1"), pin("w-3", "n2")]),
            ("more pods than planned (a pod made again while its predecessor ends): the extra one waits gated",
             nodes(&["n1"]),
             vec![pod("w-0", 8, Some("n1"), false), pod("w-0-again", 8, None, true)],
             vec![]),
            ("a gated pod already pinned is only ungated",
             nodes(&["n1"]),
             vec![pod("w-0", 8, Some("n1"), true)],
             vec![ungate("w-0")]),
            ("a pod placed off the plan takes nothing planned",
             nodes(&["n1"]),
             vec![pod("w-0", 8, Some("elsewhere"), false), pod("w-1", 8, None, true)],
             vec![pin("w-1", "n1")]),
            ("no planned node left: nothing pinned",
             nodes(&[]),
             vec![pod("w-0", 8, None, true)],
             vec![]),
        ];
        for (what, planned, pods, want) in cases {
            assert_eq!(assign(&planned, 8, &pods), want, "{what}");
        }
    }

    fn real_pod(gates: &[&str], affinity: Value) -> Pod {
        let gates: Vec<Value> = gates.iter().map(|g| json!({"name": g})).collect();
        serde_json::from_value(json!({
            "metadata": {"name": "w-0", "namespace": "lab", "resourceVersion": "9"},
            "spec": {"containers": [{"name": "m", "image": "i"}], "schedulingGates": gates, "affinity": affinity},
        }))
        .unwrap()
    }

    #[test]
    fn a_release_drops_the_gate_only_and_adds_the_pin_to_every_term() {
        let plain = real_pod(&[PLACEMENT_GATE, "other.io/gate"], Value::Null);
        assert!(gated(&plain));
        assert_eq!(placed_on(&plain), None);
        let body = release(&plain, &Release::Pin("n1".into()));
        assert_eq!(body["metadata"]["resourceVersion"], "9", "guarded by the version it was decided on");
        assert_eq!(body["spec"]["schedulingGates"], json!([{"name": "other.io/gate"}]), "another gate stays");
        let terms = &body["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        assert_eq!(terms, &json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]));

        // The user's own terms (ORed) each gain the pin; what they required stays.
        let own = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}]}}});
        let theirs = real_pod(&[PLACEMENT_GATE], own);
        let body = release(&theirs, &Release::Pin("n2".into()));
        assert_eq!(body["spec"]["schedulingGates"], Value::Null, "the last gate goes");
        let terms = body["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(terms.len(), 2);
        for t in &terms {
            assert_eq!(t["matchExpressions"].as_array().unwrap().len(), 1, "{t}");
            assert_eq!(t["matchFields"][0]["values"], json!(["n2"]), "{t}");
        }
        // Read back after the write (an operator restart): placed on n2.
        let mut written = theirs.clone();
        let affinity = body["spec"]["affinity"].clone();
        written.spec.as_mut().unwrap().affinity = Some(serde_json::from_value(affinity).unwrap());
        written.spec.as_mut().unwrap().scheduling_gates = None;
        assert_eq!(placed_on(&written), Some("n2".into()));
        assert!(!gated(&written));

        let body = release(&theirs, &Release::Ungate);
        assert_eq!(body["spec"].get("affinity"), None, "a launcher is not pinned");
    }

    proptest! {
        /// However many pods are placed already (within the plan) and
        /// however many wait gated, no planned node gets more devices than
        /// the plan put there, every pin names a planned node, and every
        /// gated pod is released while the plan has room for it.
        #[test]
        fn no_node_gets_more_devices_than_planned(
            slots in proptest::collection::vec(0usize..4, 1..6),
            placed in proptest::collection::vec(0usize..6, 0..8),
            waiting in 0usize..12,
            launchers in 0usize..3,
        ) {
            let per_pod = 8;
            let names: Vec<String> = (0..slots.len()).map(|i| format!("n{i}")).collect();
            let planned: Vec<String> =
                slots.iter().enumerate().flat_map(|(i, k)| std::iter::repeat_n(names[i].clone(), *k)).collect();
            // Pods placed before, on planned nodes within their room.
            let mut room: BTreeMap<String, usize> = BTreeMap::new();
            for n in &planned {
                *room.entry(n.clone()).or_default() += 1;
            }
            let mut pods = Vec::new();
            for (i, at) in placed.iter().enumerate() {
                let node = &names[at % names.len()];
                if let Some(r) = room.get_mut(node).filter(|r| **r > 0) {
                    *r -= 1;
                    pods.push(pod(&format!("p{i}"), per_pod, Some(node), false));
                }
            }
            let placed_count = pods.len();
            for i in 0..waiting {
                pods.push(pod(&format!("w{i:02}"), per_pod, None, true));
            }
            for i in 0..launchers {
                pods.push(pod(&format!("l{i}"), 0, None, true));
            }
            let released = assign(&planned, per_pod, &pods);
            let mut used: BTreeMap<String, i64> = BTreeMap::new();
            for p in pods.iter().filter(|p| p.node.is_some()) {
                *used.entry(p.node.clone().unwrap()).or_default() += p.devices;
            }
            for (_, how) in &released {
                if let Release::Pin(n) = how {
                    prop_assert!(planned.contains(n), "{n} is not planned");
                    *used.entry(n.clone()).or_default() += per_pod;
                }
            }
            for (n, devices) in &used {
                let planned_devices = planned.iter().filter(|p| *p == n).count() as i64 * per_pod;
                prop_assert!(*devices <= planned_devices, "{n}: {devices} devices, {planned_devices} planned");
            }
            let pinned = released.iter().filter(|(_, how)| matches!(how, Release::Pin(_))).count();
            prop_assert_eq!(pinned, waiting.min(planned.len() - placed_count), "every pod the plan has room for");
            let ungated = released.iter().filter(|(_, how)| *how == Release::Ungate).count();
            prop_assert_eq!(ungated, launchers, "launchers are only ungated");
        }
    }
}
