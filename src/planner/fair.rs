//! Fair share between allocations (rule 5 of [`super::preemption`]): the
//! dominant share, and the order in which round 2 of a pass (rule 8 of
//! [`super::placement`]) gives idle capacity to borrowers.

use std::collections::{BTreeMap, VecDeque};

use super::FastMap as HashMap;

use super::request::AllocationQuota;

#[cfg(test)]
mod tests;

/// Rule 5: used ÷ granted, the largest over the granted pools (0 without grants).
pub fn dominant_share(used: &BTreeMap<String, i64>, granted: &BTreeMap<String, i64>) -> f64 {
    granted
        .iter()
        .filter(|(_, g)| **g > 0)
        .map(|(pool, g)| used.get(pool).copied().unwrap_or(0).max(0) as f64 / *g as f64)
        .fold(0.0, f64::max)
}

/// The borrowers of round 2: per allocation, its gangs (indexes in the pass
/// order) in the order they were pushed.
#[derive(Default)]
pub(super) struct Borrowers<'a> {
    queues: BTreeMap<&'a str, VecDeque<usize>>,
}

impl<'a> Borrowers<'a> {
    pub(super) fn push(&mut self, alloc: &'a str, i: usize) {
        self.queues.entry(alloc).or_default().push_back(i);
    }

    /// Takes the next borrower and its allocation: the head of the queue of
    /// the allocation with the lowest dominant share, from the headroom left
    /// now (so each admission counts), then the earliest in the pass order.
    /// None once every queue is done.
    pub(super) fn pop(
        &mut self,
        allocations: &HashMap<&str, &AllocationQuota>,
        headroom: &HashMap<(&str, &str), i64>,
    ) -> Option<(&'a str, usize)> {
        let share = |alloc: &str| -> f64 {
            let a = allocations[alloc];
            let used = a
                .granted
                .iter()
                .map(|(p, gr)| {
                    let left = headroom.get(&(alloc, p.as_str())).copied().unwrap_or(0);
                    (p.clone(), gr + a.borrowing_in(p) - left)
                })
                .collect();
            dominant_share(&used, &a.granted)
        };
        let (&alloc, _) =
            self.queues.iter().min_by(|(a, qa), (b, qb)| share(a).total_cmp(&share(b)).then(qa[0].cmp(&qb[0])))?;
        let queue = self.queues.get_mut(alloc).expect("present");
        let i = queue.pop_front().expect("queues are never left empty");
        if queue.is_empty() {
            self.queues.remove(alloc);
        }
        Some((alloc, i))
    }
}
