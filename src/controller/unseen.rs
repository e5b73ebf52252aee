//! Writes this process made that the watches have not shown yet: one type for
//! the admission loop's assumed statuses, the reconcilers' superseded copies,
//! created pods and the pools' write times.
//!
//! Each entry is the resourceVersion of the copy the write was decided on
//! (empty for a create), what was written, and when. While the store still
//! shows that copy, the write stands in for it; once the store moves on, or
//! after the TTL, it is forgotten. Memory is bounded by one TTL of writes:
//! expired entries are dropped once per TTL, not scanned on every lookup.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Unseen<K, V = ()> {
    ttl: Duration,
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    by_key: HashMap<K, Entry<V>>,
    pruned: Option<Instant>,
}

struct Entry<V> {
    from: String,
    value: V,
    at: Instant,
}

impl<K: Eq + Hash + Clone, V: Clone> Unseen<K, V> {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, inner: Mutex::new(Inner { by_key: HashMap::new(), pruned: None }) }
    }

    /// Notes a write of `key`, decided on the copy at resourceVersion `from`.
    pub fn note(&self, key: K, from: &str, value: V) {
        let mut w = self.inner.lock().expect("unseen lock");
        let now = Instant::now();
        if w.pruned.is_none_or(|at| now.duration_since(at) >= self.ttl) {
            let ttl = self.ttl;
            w.by_key.retain(|_, e| now.duration_since(e.at) < ttl);
            w.pruned = Some(now);
        }
        w.by_key.insert(key, Entry { from: from.to_string(), value, at: now });
    }

    /// What was written over the store's copy of `key` (at resourceVersion
    /// `current`), while the store still shows the copy the write replaced;
    /// forgets the write once the store moved on or the TTL passed.
    pub fn over(&self, key: &K, current: &str) -> Option<V> {
        let mut w = self.inner.lock().expect("unseen lock");
        match w.by_key.get(key) {
            Some(e) if e.from == current && e.at.elapsed() < self.ttl => Some(e.value.clone()),
            Some(_) => {
                w.by_key.remove(key);
                None
            }
            None => None,
        }
    }

    /// How long ago `key` was written, within the TTL.
    pub fn age(&self, key: &K) -> Option<Duration> {
        let w = self.inner.lock().expect("unseen lock");
        w.by_key.get(key).map(|e| e.at.elapsed()).filter(|age| *age < self.ttl)
    }

    /// Forgets `keys` (the store shows them now).
    pub fn forget(&self, keys: impl IntoIterator<Item = K>) {
        let mut w = self.inner.lock().expect("unseen lock");
        if w.by_key.is_empty() {
            return;
        }
        for k in keys {
            w.by_key.remove(&k);
        }
    }
}

impl<K: Eq + Hash + Clone, T: kube::Resource> Unseen<K, std::sync::Arc<T>> {
    /// The store's objects, each replaced by what this process wrote over it
    /// while the store still shows the copy that write replaced.
    pub fn overlay(&self, objects: Vec<std::sync::Arc<T>>, key: impl Fn(&T) -> K) -> Vec<std::sync::Arc<T>> {
        objects
            .into_iter()
            .map(|o| {
                let rv = o.meta().resource_version.as_deref().unwrap_or_default();
                self.over(&key(&o), rv).unwrap_or(o)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_stands_in_for_the_copy_it_replaced_until_the_store_moves_on() {
        let w: Unseen<&str, u32> = Unseen::new(Duration::from_secs(60));
        assert_eq!(w.over(&"p", "1"), None, "nothing written");
        w.note("p", "1", 7);
        assert_eq!(w.over(&"p", "1"), Some(7), "the store still shows the old copy");
        assert_eq!(w.over(&"q", "1"), None, "another object");
        assert_eq!(w.over(&"p", "2"), None, "the store shows the write");
        assert_eq!(w.over(&"p", "1"), None, "forgotten once seen");
        w.note("s", "", 1);
        assert_eq!(w.over(&"s", ""), Some(1), "created: the store had none");
        assert!(w.age(&"s").is_some());
        w.forget(["s"]);
        assert_eq!(w.age(&"s"), None, "forgotten once the store shows it");
    }

    #[test]
    fn a_write_expires_after_its_ttl() {
        let w: Unseen<&str> = Unseen::new(Duration::ZERO);
        w.note("p", "1", ());
        assert_eq!(w.over(&"p", "1"), None, "expired: the store's copy is used again");
        assert_eq!(w.age(&"p"), None);
    }
}
