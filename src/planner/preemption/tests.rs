//! The order and the smallest set of victims, as unit and property tests.

use super::*;
use proptest::prelude::*;

#[test]
fn smallest_set_drops_victims_the_rest_can_do_without() {
    // Devices freed by each candidate; room needs 8 from one of them, or 4+4 from 0 and 1.
    let freed = [2, 2, 8, 1];
    let feasible = |s: &[usize]| s.iter().any(|&i| freed[i] >= 8) || s.iter().map(|&i| freed[i]).sum::<i64>() >= 12;
    assert_eq!(smallest_set(4, feasible), Some(vec![2]));
    assert_eq!(smallest_set(2, |s: &[usize]| s.len() == 2), Some(vec![0, 1]));
    assert_eq!(smallest_set(3, |_: &[usize]| false), None);
    assert_eq!(smallest_set(0, |_: &[usize]| true), None);
    // The most willing victims are kept when either would do.
    assert_eq!(smallest_set(3, |s: &[usize]| !s.is_empty()), Some(vec![0]));
}

proptest! {
    /// Victims free devices that add up; the result makes room and no
    /// member can be spared.
    #[test]
    fn smallest_set_is_sufficient_and_every_victim_needed(
        freed in proptest::collection::vec(1i64..20, 0..12),
        need in 1i64..120,
    ) {
        let feasible = |s: &[usize]| s.iter().map(|&i| freed[i]).sum::<i64>() >= need;
        match smallest_set(freed.len(), feasible) {
            None => prop_assert!(freed.iter().sum::<i64>() < need),
            Some(set) => {
                prop_assert!(feasible(&set));
                for &v in &set {
                    let rest: Vec<usize> = set.iter().copied().filter(|&c| c != v).collect();
                    prop_assert!(!feasible(&rest), "victim {v} of {set:?} was not needed");
                }
            }
        }
    }
}
