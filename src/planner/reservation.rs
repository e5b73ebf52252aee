//! Choice of whole nodes for dedicated grants.
//!
//! Rules, in order: keep the nodes an allocation already holds (stable across
//! reconciles and restarts) unless they are gone or NotReady past the grace
//! period; take new nodes only among Ready nodes nobody else holds; prefer nodes
//! with no running accelerator pods; pack into the fewest topology domains (one
//! rack if one has room, else one block, else as few as possible).

use std::collections::{BTreeMap, BTreeSet};

use super::inventory::NodeInfo;

/// A node a dedicated grant may hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<'a> {
    pub node: &'a NodeInfo,
    /// Devices of the pool's resource on this node.
    pub devices: i64,
    /// Has running pods that request accelerators.
    pub busy: bool,
}

/// The outcome of one grant's node choice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reservation {
    /// Chosen nodes, sorted by name.
    pub nodes: Vec<String>,
    /// Devices on the chosen nodes.
    pub devices: i64,
    /// Nodes previously held and now dropped (deleted, or NotReady past grace).
    pub dropped: Vec<String>,
}

impl Reservation {
    pub fn satisfies(&self, accelerators: i64) -> bool {
        self.devices >= accelerators
    }
}

/// Chooses nodes worth at least `accelerators` devices.
///
/// `held` are the nodes this grant holds now (with whether each may still be
/// kept); `free` are Ready nodes of the pool that nobody holds. `levels` are the
/// pool's topology keys, coarse to fine, without the hostname level.
pub fn choose_nodes(
    accelerators: i64,
    held: &[(Candidate<'_>, bool)],
    free: &[Candidate<'_>],
    levels: &[String],
) -> Reservation {
    let mut out = Reservation::default();
    // Keep what is still valid, largest first so a shrunk grant keeps the fewest nodes.
    let mut keep: Vec<&Candidate<'_>> = Vec::new();
    for (c, valid) in held {
        if *valid {
            keep.push(c);
        } else {
            out.dropped.push(c.node.name.clone());
        }
    }
    keep.sort_by(|a, b| b.devices.cmp(&a.devices).then_with(|| a.node.name.cmp(&b.node.name)));
    let mut chosen: Vec<&Candidate<'_>> = Vec::new();
    let mut devices = 0;
    for c in keep {
        if devices >= accelerators {
            break;
        }
        devices += c.devices;
        chosen.push(c);
    }
    if devices < accelerators {
        let extra = choose_free(accelerators - devices, &chosen, free, levels);
        for c in extra {
            devices += c.devices;
            chosen.push(c);
        }
    }
    out.nodes = chosen.iter().map(|c| c.node.name.clone()).collect();
    out.nodes.sort();
    out.devices = devices;
    out
}

/// The domain of a node at a level: the values of every key down to that level,
/// so that rack "r1" of block "b1" differs from rack "r1" of block "b2".
fn domain(node: &NodeInfo, levels: &[String], depth: usize) -> Vec<String> {
    levels[..=depth].iter().map(|k| node.labels.get(k).cloned().unwrap_or_default()).collect()
}

/// Picks free nodes worth `needed` devices, as tight as the topology allows.
fn choose_free<'a, 'b>(
    needed: i64,
    already: &[&'b Candidate<'a>],
    free: &'b [Candidate<'a>],
    levels: &[String],
) -> Vec<&'b Candidate<'a>> {
    if needed <= 0 || free.is_empty() {
        return Vec::new();
    }
    // Idle nodes first, then by name: deterministic and disturbs no running pod.
    let order =
        |a: &&Candidate<'_>, b: &&Candidate<'_>| a.busy.cmp(&b.busy).then_with(|| a.node.name.cmp(&b.node.name));
    // Finest level first: one rack, then one block.
    for depth in (0..levels.len()).rev() {
        let held_domains: BTreeSet<Vec<String>> = already.iter().map(|c| domain(c.node, levels, depth)).collect();
        let mut by_domain: BTreeMap<Vec<String>, Vec<&Candidate<'a>>> = BTreeMap::new();
        for c in free {
            by_domain.entry(domain(c.node, levels, depth)).or_default().push(c);
        }
        let mut fitting: Vec<(Vec<String>, Vec<&Candidate<'a>>)> = by_domain
            .into_iter()
            .filter(|(d, cs)| {
                // Packing only helps if what is already held lies in the same domain.
                (held_domains.is_empty() || (held_domains.len() == 1 && held_domains.contains(d)))
                    && cs.iter().map(|c| c.devices).sum::<i64>() >= needed
            })
            .collect();
        // Best fit: the domain with the fewest spare devices, then the most idle nodes.
        fitting.sort_by_key(|(d, cs)| {
            let total: i64 = cs.iter().map(|c| c.devices).sum();
            let busy = cs.iter().filter(|c| c.busy).count();
            (total - needed, busy, d.clone())
        });
        if let Some((_, mut cs)) = fitting.into_iter().next() {
            cs.sort_by(order);
            return take_until(cs, needed);
        }
    }
    // No single domain has room: group by domain (fullest domains first) to span few.
    let mut all: Vec<&Candidate<'a>> = free.iter().collect();
    if levels.is_empty() {
        all.sort_by(order);
        return take_until(all, needed);
    }
    let deepest = levels.len() - 1;
    let mut by_domain: BTreeMap<Vec<String>, Vec<&Candidate<'a>>> = BTreeMap::new();
    for c in all {
        by_domain.entry(domain(c.node, levels, deepest)).or_default().push(c);
    }
    let mut groups: Vec<Vec<&Candidate<'a>>> = by_domain.into_values().collect();
    groups.sort_by_key(|cs| std::cmp::Reverse(cs.iter().map(|c| c.devices).sum::<i64>()));
    let flat: Vec<&Candidate<'a>> = groups
        .into_iter()
        .flat_map(|mut cs| {
            cs.sort_by(order);
            cs
        })
        .collect();
    take_until(flat, needed)
}

fn take_until<'a, 'b>(cs: Vec<&'b Candidate<'a>>, needed: i64) -> Vec<&'b Candidate<'a>> {
    let mut got = 0;
    let mut out = Vec::new();
    for c in cs {
        if got >= needed {
            break;
        }
        got += c.devices;
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::inventory::tests::node;
    use proptest::prelude::*;

    const R: &str = "nvidia.com/gpu";

    fn rack_node(name: &str, block: &str, rack: &str) -> NodeInfo {
        node(name, &[("block", block), ("rack", rack)], R, 8, true)
    }

    fn levels() -> Vec<String> {
        vec!["block".into(), "rack".into()]
    }

    fn cands<'a>(nodes: &'a [NodeInfo], busy: &[&str]) -> Vec<Candidate<'a>> {
        nodes.iter().map(|n| Candidate { node: n, devices: 8, busy: busy.contains(&n.name.as_str()) }).collect()
    }

    #[test]
    fn packs_into_one_rack_when_one_has_room() {
        let nodes = vec![
            rack_node("a1", "b1", "r1"),
            rack_node("b1", "b1", "r2"),
            rack_node("b2", "b1", "r2"),
            rack_node("c1", "b2", "r3"),
        ];
        let free = cands(&nodes, &[]);
        let r = choose_nodes(16, &[], &free, &levels());
        assert_eq!(r.nodes, vec!["b1", "b2"], "r2 holds two nodes: both go there");
        assert_eq!(r.devices, 16);
    }

    #[test]
    fn prefers_idle_nodes_and_best_fit_racks() {
        let nodes = vec![
            rack_node("a1", "b1", "r1"),
            rack_node("a2", "b1", "r1"),
            rack_node("a3", "b1", "r1"),
            rack_node("b1", "b1", "r2"),
        ];
        let free = cands(&nodes, &["a1"]);
        let r = choose_nodes(8, &[], &free, &levels());
        assert_eq!(r.nodes, vec!["b1"], "best fit: the rack with exactly one node");
        let r = choose_nodes(16, &[], &free, &levels());
        assert_eq!(r.nodes, vec!["a2", "a3"], "idle nodes before busy ones in the rack");
    }

    #[test]
    fn falls_back_to_a_block_then_to_several() {
        let nodes = vec![rack_node("a1", "b1", "r1"), rack_node("b1", "b1", "r2"), rack_node("c1", "b2", "r3")];
        let free = cands(&nodes, &[]);
        let r = choose_nodes(16, &[], &free, &levels());
        assert_eq!(r.nodes, vec!["a1", "b1"], "block b1 has two racks of one node");
        let r = choose_nodes(24, &[], &free, &levels());
        assert_eq!(r.nodes.len(), 3);
        let r = choose_nodes(32, &[], &free, &levels());
        assert!(!r.satisfies(32), "not enough nodes: a partial choice that does not satisfy");
    }

    #[test]
    fn keeps_held_nodes_and_replaces_dropped_ones_nearby() {
        let nodes = vec![
            rack_node("a1", "b1", "r1"),
            rack_node("a2", "b1", "r1"),
            rack_node("a3", "b1", "r1"),
            rack_node("z1", "b9", "r9"),
        ];
        let all = cands(&nodes, &[]);
        let held = vec![(all[0].clone(), true), (all[1].clone(), false)];
        let free = vec![all[2].clone(), all[3].clone()];
        let r = choose_nodes(16, &held, &free, &levels());
        assert_eq!(r.nodes, vec!["a1", "a3"], "a2 replaced by a node in the same rack");
        assert_eq!(r.dropped, vec!["a2"]);
    }

    #[test]
    fn a_shrunk_grant_keeps_fewer_nodes() {
        let nodes = vec![rack_node("a1", "b1", "r1"), rack_node("a2", "b1", "r1")];
        let all = cands(&nodes, &[]);
        let held = vec![(all[0].clone(), true), (all[1].clone(), true)];
        let r = choose_nodes(8, &held, &[], &levels());
        assert_eq!(r.nodes, vec!["a1"]);
    }

    proptest! {
        /// Never a node twice, never a node outside held-valid or free, and
        /// enough devices whenever enough exist.
        #[test]
        fn choice_is_sound(racks in proptest::collection::vec(0u8..4, 1..40), held_mask in proptest::collection::vec(0u8..3, 40), want in 1i64..200) {
            let nodes: Vec<NodeInfo> = racks.iter().enumerate()
                .map(|(i, r)| rack_node(&format!("n{i:02}"), &format!("b{}", r / 2), &format!("r{r}"))).collect();
            let all = cands(&nodes, &[]);
            let mut held = vec![];
            let mut free = vec![];
            for (i, c) in all.iter().enumerate() {
                match held_mask[i] { 0 => free.push(c.clone()), 1 => held.push((c.clone(), true)), _ => held.push((c.clone(), false)) }
            }
            let r = choose_nodes(want, &held, &free, &levels());
            let unique: BTreeSet<&String> = r.nodes.iter().collect();
            prop_assert_eq!(unique.len(), r.nodes.len());
            for n in &r.nodes {
                let ok = free.iter().any(|c| &c.node.name == n) || held.iter().any(|(c, v)| *v && &c.node.name == n);
                prop_assert!(ok, "chose {} which is neither free nor validly held", n);
            }
            let available: i64 = free.len() as i64 * 8 + held.iter().filter(|(_, v)| *v).count() as i64 * 8;
            prop_assert_eq!(r.satisfies(want), available >= want);
            prop_assert_eq!(r.devices, r.nodes.len() as i64 * 8);
            // Never more nodes than needed.
            prop_assert!(r.devices - 8 < want || !r.satisfies(want));
        }
    }
}
