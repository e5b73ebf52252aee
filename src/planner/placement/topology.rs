//! Topology packing (rule 4 of [`super`]): the candidate sets of a pool,
//! indexed by topology domain, and the choice of nodes for one gang.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use super::{GangRequest, NodeFree, PlacementInput, World};
use crate::planner::inventory::NodeInfo;

/// What one pass may reuse from the previous ones while the node list is the
/// same (the caller keeps one cache per node list): the nodes' name order and
/// the candidate sets with their topology domains. A set is reused only for
/// the same members and levels, so reservations and pool changes rebuild it.
#[derive(Default)]
pub struct PlacementCache {
    rank: OnceLock<Vec<u32>>,
    sets: Mutex<HashMap<(String, Option<String>), CachedSet>>,
}

struct CachedSet {
    levels: Vec<String>,
    members: Vec<usize>,
    set: Arc<CandidateSet>,
}

impl PlacementCache {
    /// Position of each node in name order.
    pub(super) fn rank(&self, nodes: &[NodeInfo]) -> Vec<u32> {
        self.rank.get_or_init(|| name_rank(nodes)).clone()
    }
}

/// Position of each node in name order: cheap name comparisons.
pub(super) fn name_rank(nodes: &[NodeInfo]) -> Vec<u32> {
    let mut by_name: Vec<usize> = (0..nodes.len()).collect();
    by_name.sort_by(|a, b| nodes[*a].name.cmp(&nodes[*b].name));
    let mut rank = vec![0u32; nodes.len()];
    for (r, i) in by_name.into_iter().enumerate() {
        rank[i] = r as u32;
    }
    rank
}

/// Sort key of a fitting node when a gang spreads: (fullness rank, domain) per
/// tried level coarse to fine, leftover devices, name rank, set position.
type SpreadKey = (Vec<(Reverse<u32>, u32)>, i64, u32, u32);
/// Candidate nodes of one pool for one kind of gang, with their domains.
#[derive(Clone)]
pub(super) struct CandidateSet {
    /// Node indexes.
    nodes: Vec<usize>,
    /// One index per pool level, coarse to fine.
    levels: Vec<LevelIndex>,
    /// Requested keys that are not pool levels.
    extra: HashMap<String, LevelIndex>,
}

/// The domains of one topology key within a candidate set.
#[derive(Clone)]
struct LevelIndex {
    /// Last segment of the key, for messages ("rack").
    short: String,
    /// Domain of each set member (by position), None without the label.
    of: Vec<Option<u32>>,
    /// Domains in name order (coarser values first).
    domains: Vec<Domain>,
}

#[derive(Clone)]
struct Domain {
    /// The label value at this level.
    value: String,
    /// Positions in the candidate set.
    members: Vec<u32>,
}

/// Why a pool's candidate set cannot hold the gang.
pub(super) enum Shortfall {
    /// Too few fitting nodes in the whole set.
    Set { free: i64, fitting: usize },
    /// Required topology: the best domain (most fitting nodes) is too small.
    Domain { short: String, value: Option<String>, free: i64, fitting: usize },
}
impl<'a> World<'a> {
    /// Whether the gang could be placed in the pool with `extra` devices free
    /// on some nodes (the state is left as it was).
    pub(in crate::planner) fn fits_with(
        &mut self,
        pool: usize,
        reserved_for: Option<&'a str>,
        g: &GangRequest,
        extra: &BTreeMap<usize, i64>,
    ) -> bool {
        self.place_with(pool, reserved_for, g, extra).is_some()
    }

    /// Where the gang would be placed with `extra` devices free on some nodes
    /// (the state is left as it was).
    pub(in crate::planner) fn place_with(
        &mut self,
        pool: usize,
        reserved_for: Option<&'a str>,
        g: &GangRequest,
        extra: &BTreeMap<usize, i64>,
    ) -> Option<Vec<usize>> {
        for (&n, &d) in extra {
            self.adjust_free(n, d);
        }
        let placed = self.place(pool, reserved_for, g).ok();
        for (&n, &d) in extra {
            self.adjust_free(n, -d);
        }
        placed
    }

    /// Changes a node's free devices, and the tallies of the sets that hold it.
    pub(super) fn adjust_free(&mut self, n: usize, delta: i64) {
        let (old, new) = (self.free[n], self.free[n] + delta);
        self.free[n] = new;
        for &(sid, m) in &self.member_of[n] {
            self.tallies[sid].moved(m as usize, old, new);
        }
    }

    /// The index of the pool's candidate set for a gang reserved for
    /// `reserved_for` (None: shared nodes), built or taken from the cache on
    /// first use in the pass.
    fn set_index(&mut self, pool: usize, reserved_for: Option<&'a str>) -> usize {
        if let Some(&sid) = self.set_ids.get(&(pool, reserved_for)) {
            return sid;
        }
        let input = self.input;
        let p = &input.pools[pool];
        let listed = match reserved_for {
            Some(alloc) => p.reserved_nodes.get(alloc).map(Vec::as_slice),
            None => Some(p.shared_nodes.as_slice()),
        };
        let set = CandidateSet::cached(input, &p.name, reserved_for, listed.unwrap_or(&[]), &p.levels);
        let sid = self.tallies.len();
        for (m, &n) in set.nodes.iter().enumerate() {
            self.member_of[n].push((sid, m as u32));
        }
        self.tallies.push(SetTally::new(set, &self.free));
        self.set_ids.insert((pool, reserved_for), sid);
        sid
    }

    /// Rule 4: `workers` distinct nodes of the candidate set, in worker order.
    pub(super) fn place(
        &mut self,
        pool: usize,
        reserved_for: Option<&'a str>,
        g: &GangRequest,
    ) -> Result<Vec<usize>, Shortfall> {
        let input = self.input;
        let p = &input.pools[pool];
        let sid = self.set_index(pool, reserved_for);
        let wanted = g.topology.as_ref();
        let level_of_key = wanted.and_then(|t| p.levels.iter().position(|l| *l == t.key));
        if let (Some(t), None) = (wanted, level_of_key)
            && !self.tallies[sid].set.extra.contains_key(&t.key)
        {
            let set = &mut self.tallies[sid].set;
            let idx = LevelIndex::new(input.nodes, &set.nodes, std::slice::from_ref(&t.key));
            Arc::make_mut(set).extra.insert(t.key.clone(), idx);
        }
        let q = g.per_worker;
        let workers = g.workers as usize;
        let free = &self.free;
        let rank = &self.rank;
        let st = &mut self.tallies[sid];
        let tally = st.tally(q, free);
        #[cfg(debug_assertions)]
        st.check(q, free);
        let set: &CandidateSet = &st.set;
        let tally: &Tally = &st.by_need[tally].1;
        if tally.fitting < workers {
            return Err(Shortfall::Set { free: st.free, fitting: tally.fitting });
        }
        let fits = |m: usize| free[set.nodes[m]] >= q;
        // Fitting nodes per domain of a level: kept for the pool's levels,
        // counted for another requested key.
        let counts_of = |level: &LevelIndex| -> Cow<'_, [u32]> {
            match set.levels.iter().position(|l| std::ptr::eq(l, level)) {
                Some(i) => Cow::Borrowed(tally.per_level[i].as_slice()),
                None => Cow::Owned(level.fitting_counts(&fits)),
            }
        };
        let requested: Option<&LevelIndex> = wanted.map(|t| match level_of_key {
            Some(i) => &set.levels[i],
            None => &set.extra[&t.key],
        });
        // Levels to try, fine to coarse.
        let tried: Vec<&LevelIndex> = match (wanted, level_of_key) {
            (Some(t), _) if t.required => vec![requested.expect("requested")],
            (Some(_), Some(i)) => set.levels[..=i].iter().rev().collect(),
            (Some(_), None) => vec![requested.expect("requested")],
            (None, _) => set.levels.iter().rev().collect(),
        };
        let mut counts: Vec<Cow<'_, [u32]>> = Vec::with_capacity(tried.len());
        for level in &tried {
            let c = counts_of(level);
            let best = c
                .iter()
                .enumerate()
                .filter(|(_, n)| **n as usize >= workers)
                .min_by_key(|(d, n)| (**n, *d))
                .map(|(d, _)| d);
            if let Some(d) = best {
                let mut members: Vec<u32> =
                    level.domains[d].members.iter().copied().filter(|&m| fits(m as usize)).collect();
                members.sort_by_key(|&m| {
                    let n = set.nodes[m as usize];
                    (free[n] - q, rank[n])
                });
                members.truncate(workers);
                return Ok(set.worker_order(members, rank));
            }
            counts.push(c);
        }
        if wanted.is_some_and(|t| t.required) {
            let level = tried[0];
            let c = &counts[0];
            let domain_free = |d: usize| -> i64 {
                level.domains[d].members.iter().map(|&m| free[set.nodes[m as usize]].max(0)).sum()
            };
            let best = (0..level.domains.len()).max_by_key(|&d| (c[d], domain_free(d), Reverse(d)));
            return Err(match best {
                Some(d) => Shortfall::Domain {
                    short: level.short.clone(),
                    value: Some(level.domains[d].value.clone()),
                    free: domain_free(d),
                    fitting: c[d] as usize,
                },
                None => Shortfall::Domain { short: level.short.clone(), value: None, free: 0, fitting: 0 },
            });
        }
        // Spread: coarsest tried level first, fullest domains first.
        let mut keyed: Vec<SpreadKey> = (0..set.nodes.len())
            .filter(|&m| fits(m))
            .map(|m| {
                let n = set.nodes[m];
                let path = tried
                    .iter()
                    .zip(&counts)
                    .rev()
                    .map(|(level, c)| match level.of[m] {
                        Some(d) => (Reverse(c[d as usize]), d),
                        None => (Reverse(0), u32::MAX),
                    })
                    .collect();
                (path, free[n] - q, rank[n], m as u32)
            })
            .collect();
        keyed.sort_unstable();
        let members = keyed.into_iter().take(workers).map(|k| k.3).collect();
        Ok(set.worker_order(members, rank))
    }
}

/// A candidate set in one pass, with what its gangs ask kept up to date as
/// free devices change (by [`World::adjust_free`]): a gang that cannot fit is
/// told so, and a domain is found, without a walk of every node per gang.
pub(super) struct SetTally {
    set: Arc<CandidateSet>,
    /// Free devices on the set's nodes (negatives count as 0).
    free: i64,
    /// Per devices-per-worker asked so far in the pass.
    by_need: Vec<(i64, Tally)>,
}

/// The set's nodes with at least some number of free devices.
struct Tally {
    fitting: usize,
    /// Per pool level (as `CandidateSet::levels`): fitting nodes per domain.
    per_level: Vec<Vec<u32>>,
}

impl SetTally {
    fn new(set: Arc<CandidateSet>, free: &[i64]) -> Self {
        let total = set.nodes.iter().map(|&n| free[n].max(0)).sum();
        SetTally { set, free: total, by_need: Vec::new() }
    }

    /// The index in `by_need` of the tally for `q` devices, counted on first use.
    fn tally(&mut self, q: i64, free: &[i64]) -> usize {
        if let Some(i) = self.by_need.iter().position(|(need, _)| *need == q) {
            return i;
        }
        let set = &self.set;
        let fits = |m: usize| free[set.nodes[m]] >= q;
        let fitting = (0..set.nodes.len()).filter(|&m| fits(m)).count();
        let per_level = set.levels.iter().map(|l| l.fitting_counts(&fits)).collect();
        self.by_need.push((q, Tally { fitting, per_level }));
        self.by_need.len() - 1
    }

    /// Member `m` of the set went from `old` to `new` free devices.
    fn moved(&mut self, m: usize, old: i64, new: i64) {
        self.free += new.max(0) - old.max(0);
        for (q, t) in &mut self.by_need {
            let (was, is) = (old >= *q, new >= *q);
            if was == is {
                continue;
            }
            let up = is;
            t.fitting = if up { t.fitting + 1 } else { t.fitting - 1 };
            for (level, counts) in self.set.levels.iter().zip(&mut t.per_level) {
                if let Some(d) = level.of[m] {
                    let c = &mut counts[d as usize];
                    *c = if up { *c + 1 } else { *c - 1 };
                }
            }
        }
    }

    /// The kept tally equals one counted afresh (debug builds: every test
    /// checks the incremental bookkeeping).
    #[cfg(debug_assertions)]
    fn check(&self, q: i64, free: &[i64]) {
        let mut fresh = SetTally::new(self.set.clone(), free);
        let i = fresh.tally(q, free);
        let kept = self.by_need.iter().find(|(need, _)| *need == q).map(|(_, t)| t).expect("tallied");
        assert_eq!((self.free, kept.fitting), (fresh.free, fresh.by_need[i].1.fitting), "set tally drifted");
        assert_eq!(kept.per_level, fresh.by_need[i].1.per_level, "domain tally drifted");
    }
}

impl CandidateSet {
    /// The set of `listed` nodes, from the input's cache when an earlier pass
    /// built the same one.
    fn cached(
        input: &PlacementInput<'_>,
        pool: &str,
        reserved_for: Option<&str>,
        listed: &[NodeFree],
        levels: &[String],
    ) -> Arc<Self> {
        let nodes = input.nodes;
        let key = (pool.to_string(), reserved_for.map(str::to_string));
        // The steady case: the same nodes listed in the same order as when
        // the cached set was built (its members are these, without repeats).
        if let Some(cache) = input.cache
            && let Some(c) = cache.sets.lock().expect("placement cache").get(&key)
            && c.levels == levels
            && c.members.len() == listed.len()
            && c.members.iter().zip(listed).all(|(&m, nf)| m == nf.node)
        {
            return c.set.clone();
        }
        let mut seen = vec![false; nodes.len()];
        let members: Vec<usize> = listed
            .iter()
            .map(|nf| nf.node)
            .filter(|&n| n < nodes.len() && !std::mem::replace(&mut seen[n], true))
            .collect();
        let Some(cache) = input.cache else { return Arc::new(Self::new(nodes, members, levels)) };
        if let Some(c) = cache.sets.lock().expect("placement cache").get(&key)
            && c.members == members
            && c.levels == levels
        {
            return c.set.clone();
        }
        let set = Arc::new(Self::new(nodes, members.clone(), levels));
        let entry = CachedSet { levels: levels.to_vec(), members, set: set.clone() };
        cache.sets.lock().expect("placement cache").insert(key, entry);
        set
    }

    fn new(nodes: &[NodeInfo], members: Vec<usize>, levels: &[String]) -> Self {
        let levels = (0..levels.len()).map(|d| LevelIndex::new(nodes, &members, &levels[..=d])).collect();
        CandidateSet { nodes: members, levels, extra: HashMap::new() }
    }

    /// Node indexes of the chosen positions, in topology order (domains of
    /// the pool levels coarse to fine, then node name).
    fn worker_order(&self, mut members: Vec<u32>, rank: &[u32]) -> Vec<usize> {
        members.sort_by_cached_key(|&m| {
            let path: Vec<u32> = self.levels.iter().map(|l| l.of[m as usize].unwrap_or(u32::MAX)).collect();
            (path, rank[self.nodes[m as usize]])
        });
        members.into_iter().map(|m| self.nodes[m as usize]).collect()
    }
}

impl LevelIndex {
    /// Domains of `path.last()` among `members`, told apart by the values of
    /// every key of `path` (coarse to fine).
    fn new(nodes: &[NodeInfo], members: &[usize], path: &[String]) -> Self {
        let key = path.last().expect("a level has a key");
        // Hashed, then the few domains sorted: a node is one lookup, not a
        // walk of string comparisons.
        let mut by_path: HashMap<Vec<&str>, Vec<u32>> = HashMap::new();
        for (m, &n) in members.iter().enumerate() {
            let labels = &nodes[n].labels;
            if !labels.contains_key(key) {
                continue;
            }
            let values = path.iter().map(|k| labels.get(k).map_or("", String::as_str)).collect();
            by_path.entry(values).or_default().push(m as u32);
        }
        let mut by_path: Vec<(Vec<&str>, Vec<u32>)> = by_path.into_iter().collect();
        by_path.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut of = vec![None; members.len()];
        let domains = by_path
            .into_iter()
            .enumerate()
            .map(|(d, (values, ms))| {
                for &m in &ms {
                    of[m as usize] = Some(d as u32);
                }
                Domain { value: values.last().copied().unwrap_or_default().to_string(), members: ms }
            })
            .collect();
        LevelIndex { short: key.rsplit('/').next().unwrap_or(key).to_string(), of, domains }
    }

    /// Fitting nodes per domain (`fits` of a set position).
    fn fitting_counts(&self, fits: &impl Fn(usize) -> bool) -> Vec<u32> {
        let mut c = vec![0u32; self.domains.len()];
        for (m, d) in self.of.iter().enumerate() {
            if let Some(d) = d
                && fits(m)
            {
                c[*d as usize] += 1;
            }
        }
        c
    }
}
