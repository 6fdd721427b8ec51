//! A fixed set of shards chosen by a key's hash: hot maps split so that concurrent callers
//! rarely take the same lock. Shared by the topic server's registry and the gateway's index.

use std::hash::{BuildHasher, RandomState};

/// `N` values of `T` (each usually a lock around a map), one per slice of the key space.
#[derive(Debug)]
pub struct Shards<T> {
    shards: Box<[T]>,
    hasher: RandomState,
}

impl<T> Shards<T> {
    /// `count` shards, the i-th made by `make(i)`.
    pub fn new(count: usize, make: impl FnMut(usize) -> T) -> Self {
        Shards {
            shards: (0..count.max(1)).map(make).collect(),
            hasher: RandomState::new(),
        }
    }

    /// The shard `key` belongs to.
    pub fn of(&self, key: &str) -> &T {
        &self.shards[(self.hasher.hash_one(key) as usize) % self.shards.len()]
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.shards.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_always_lands_in_the_same_shard() {
        let shards = Shards::new(8, |i| i);
        let first = *shards.of("room:1");
        assert!((0..100).all(|_| *shards.of("room:1") == first));
        let used: std::collections::HashSet<usize> =
            (0..1000).map(|i| *shards.of(&format!("t{i}"))).collect();
        assert_eq!(used.len(), 8, "keys spread over every shard");
        assert_eq!(shards.iter().count(), 8);
        assert_eq!(Shards::new(0, |i| i).iter().count(), 1, "never zero shards");
    }
}
