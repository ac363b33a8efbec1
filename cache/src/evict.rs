//! In-memory accounting of chunk bytes and the LRU order of the chunks that
//! may be evicted.
//!
//! Invariants:
//! - `used` is the total length of all chunks in the database;
//! - a chunk is in `lru` iff it is stored and its object is neither dirty
//!   nor pinned (those are `protected`);
//! - `protected + sum(lru values) == used`.
//!
//! It is rebuilt at open from the small chunk index table, so its order after
//! a restart is arbitrary (recency is not persisted: it is a hint).

use lru::LruCache;

use crate::object::FileId;

pub(crate) type ChunkKey = (FileId, u64);

pub(crate) struct EvictIndex {
    lru: LruCache<ChunkKey, u32>,
    pub(crate) used: u64,
    pub(crate) protected: u64,
}

impl EvictIndex {
    pub(crate) fn new() -> Self {
        Self {
            lru: LruCache::unbounded(),
            used: 0,
            protected: 0,
        }
    }

    /// Marks chunks as just used.
    pub(crate) fn touch(&mut self, keys: impl IntoIterator<Item = ChunkKey>) {
        for key in keys {
            self.lru.promote(&key);
        }
    }

    /// A chunk was stored (or replaced: call `removed` for the old one first).
    pub(crate) fn added(&mut self, key: ChunkKey, len: u32, evictable: bool) {
        self.used += u64::from(len);
        if evictable {
            self.lru.put(key, len);
        } else {
            self.protected += u64::from(len);
        }
    }

    /// A chunk was deleted.
    pub(crate) fn removed(&mut self, key: ChunkKey, len: u32) {
        self.used = self.used.saturating_sub(u64::from(len));
        if self.lru.pop(&key).is_none() {
            self.protected = self.protected.saturating_sub(u64::from(len));
        }
    }

    /// A stored chunk became evictable (its object is clean and unpinned).
    pub(crate) fn release(&mut self, key: ChunkKey, len: u32) {
        if !self.lru.contains(&key) {
            self.protected = self.protected.saturating_sub(u64::from(len));
            self.lru.put(key, len);
        }
    }

    /// A stored chunk may no longer be evicted.
    pub(crate) fn protect(&mut self, key: ChunkKey, len: u32) {
        if self.lru.pop(&key).is_some() {
            self.protected += u64::from(len);
        }
    }

    /// Least recently used chunks to delete so that `used - freed <= target`,
    /// skipping `keep`. Does not change the index.
    pub(crate) fn victims(
        &self,
        target: u64,
        keep: impl Fn(&ChunkKey) -> bool,
    ) -> Vec<(ChunkKey, u32)> {
        let mut over = self.used.saturating_sub(target);
        let mut out = Vec::new();
        for (key, len) in self.lru.iter().rev() {
            if over == 0 {
                break;
            }
            if keep(key) {
                continue;
            }
            over = over.saturating_sub(u64::from(*len));
            out.push((*key, *len));
        }
        out
    }

    #[cfg(test)]
    pub(crate) fn evictable_bytes(&self) -> u64 {
        self.used - self.protected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn victims_are_least_recent_first_and_never_protected() {
        let mut idx = EvictIndex::new();
        idx.added((1, 0), 100, true);
        idx.added((2, 0), 100, true);
        idx.added((3, 0), 100, false);
        idx.added((4, 0), 100, true);
        idx.touch([(1, 0)]);
        assert_eq!(idx.used, 400);
        assert_eq!(idx.protected, 100);
        let v = idx.victims(250, |_| false);
        let keys: Vec<_> = v.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![(2, 0), (4, 0)]);
        // Nothing evictable beyond the protected chunk.
        let all = idx.victims(0, |_| false);
        assert!(all.iter().all(|(k, _)| *k != (3, 0)));
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn protect_and_release_move_bytes_between_pools() {
        let mut idx = EvictIndex::new();
        idx.added((1, 0), 10, true);
        idx.protect((1, 0), 10);
        assert_eq!(idx.evictable_bytes(), 0);
        idx.release((1, 0), 10);
        assert_eq!(idx.evictable_bytes(), 10);
        idx.removed((1, 0), 10);
        assert_eq!((idx.used, idx.protected), (0, 0));
    }
}
