//! The dominant share.

use super::*;

#[test]
fn dominant_share_is_the_largest_pool_share() {
    let m = |v: &[(&str, i64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect::<BTreeMap<_, _>>();
    assert_eq!(dominant_share(&m(&[("a", 32), ("b", 8)]), &m(&[("a", 64), ("b", 8)])), 1.0);
    assert_eq!(dominant_share(&m(&[("a", 16)]), &m(&[("a", 64), ("b", 0)])), 0.25);
    assert_eq!(dominant_share(&m(&[]), &m(&[])), 0.0);
}
