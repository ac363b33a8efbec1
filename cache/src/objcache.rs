//! A bounded in-memory map of decoded objects, so that the hot metadata path
//! (GETATTR, LOOKUP, READDIRPLUS) skips redb and postcard.
//!
//! It holds the latest *committed* version of an object, never a version
//! only a snapshot sees. The invariant is kept with an epoch:
//!
//! - a write transaction that changed objects, once committed, bumps the
//!   epoch and drops those objects (under the lock);
//! - a reader notes the epoch *before* it opens its redb snapshot, and
//!   inserts what it read only if the epoch is still the same.
//!
//! A reader whose snapshot predates a commit either inserts before that
//! commit's invalidation (which then drops the stale object) or after it
//! (and then finds the epoch moved and inserts nothing).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::object::{FileId, Object};

/// Objects kept (a few hundred bytes each).
const CAPACITY: usize = 65_536;

/// Evicts in insertion order rather than by recency: a lookup that also
/// reorders (the `lru` crate's `get`, or even its `peek`, which compares
/// keys through a pointer into the list node) takes two or three more cache
/// misses, measured at a sixth of the CPU of READDIRPLUS over a big
/// directory. Here a hit is one probe of a map whose keys are inline.
pub(crate) struct ObjectCache {
    objects: HashMap<FileId, Arc<Object>>,
    /// Insertion order; may hold fileids already dropped or inserted again.
    order: VecDeque<FileId>,
    epoch: u64,
}

impl ObjectCache {
    pub(crate) fn new() -> Self {
        Self {
            objects: HashMap::new(),
            order: VecDeque::new(),
            epoch: 0,
        }
    }

    /// The epoch a reader must note before opening its snapshot.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn get(&self, fid: FileId) -> Option<Arc<Object>> {
        self.objects.get(&fid).cloned()
    }

    /// Keeps `obj`, read from a snapshot opened at `epoch`, unless objects
    /// were committed since.
    pub(crate) fn insert_if_current(&mut self, epoch: u64, fid: FileId, obj: &Arc<Object>) {
        if epoch != self.epoch {
            return;
        }
        if self.objects.insert(fid, Arc::clone(obj)).is_none() {
            self.order.push_back(fid);
        }
        while self.objects.len() > CAPACITY {
            match self.order.pop_front() {
                Some(old) => {
                    self.objects.remove(&old);
                }
                None => break,
            }
        }
        if self.order.len() > 2 * CAPACITY {
            // Mostly fileids dropped since: start the order again.
            self.order = self.objects.keys().copied().collect();
        }
    }

    /// Called once a transaction that changed `fids` has committed.
    pub(crate) fn committed(&mut self, fids: impl Iterator<Item = FileId>) {
        let mut any = false;
        for fid in fids {
            self.objects.remove(&fid);
            any = true;
        }
        if any {
            self.epoch += 1;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.objects.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::Kind;

    fn obj(size: u64) -> Arc<Object> {
        let mut o = Object::sample(Kind::File);
        o.attrs.size = size;
        Arc::new(o)
    }

    #[test]
    fn a_read_from_before_a_commit_is_not_kept() {
        let mut c = ObjectCache::new();
        let reader_epoch = c.epoch();
        c.committed([7].into_iter());
        c.insert_if_current(reader_epoch, 7, &obj(1));
        assert!(c.get(7).is_none());
    }

    #[test]
    fn a_commit_drops_what_an_earlier_reader_kept() {
        let mut c = ObjectCache::new();
        let reader_epoch = c.epoch();
        c.insert_if_current(reader_epoch, 7, &obj(1));
        assert_eq!(c.get(7).map(|o| o.attrs.size), Some(1));
        c.committed([7].into_iter());
        assert!(c.get(7).is_none());
        let later = c.epoch();
        c.insert_if_current(later, 7, &obj(2));
        assert_eq!(c.get(7).map(|o| o.attrs.size), Some(2));
    }

    #[test]
    fn commits_of_data_only_leave_readers_free_to_insert() {
        let mut c = ObjectCache::new();
        let reader_epoch = c.epoch();
        c.committed(std::iter::empty());
        c.insert_if_current(reader_epoch, 7, &obj(1));
        assert!(c.get(7).is_some());
    }

    #[test]
    fn holds_at_most_its_capacity_and_drops_the_oldest_first() {
        let mut c = ObjectCache::new();
        let epoch = c.epoch();
        let total = CAPACITY as u64 + 10;
        for fid in 0..total {
            c.insert_if_current(epoch, fid, &obj(fid));
        }
        assert_eq!(c.len(), CAPACITY);
        assert!(c.get(0).is_none());
        assert!(c.get(9).is_none());
        assert_eq!(c.get(10).map(|o| o.attrs.size), Some(10));
        assert_eq!(c.get(total - 1).map(|o| o.attrs.size), Some(total - 1));
    }
}
