//! The chunks recent reads used, kept between reads.
//!
//! Clients read in pieces (1 MiB) that do not line up with chunks
//! (1 MiB - 4 KiB, see [`crate::chunk`]), so two consecutive sequential
//! READs share a chunk. redb reads a chunk into a fresh zero-filled buffer
//! each time: its read cache is striped 131 ways and, once full, evicts from
//! the stripe it inserts into, which for pages this large is mostly the page
//! just read. Without this memo each chunk of a sequential read is read from
//! the file about twice (measured: 1,820 preads of 1 MiB for a 1 GiB file).
//!
//! Entries are redb access guards: the page as read, an `Arc` redb shares,
//! holding no snapshot open. Freshness is kept with an epoch, as in
//! `objcache`:
//!
//! - a commit that changed chunks drops them and bumps the epoch;
//! - a reader notes the epoch *before* it opens its snapshot and inserts
//!   only if the epoch has not moved: a reader whose snapshot predates a
//!   commit either inserts before that commit's invalidation (which then
//!   drops the entry) or after it (and finds the epoch moved).

use std::collections::VecDeque;
use std::sync::Arc;

use redb::AccessGuard;

use crate::evict::ChunkKey;

/// The stored bytes of one chunk.
pub(crate) type ChunkGuard = Arc<AccessGuard<'static, &'static [u8]>>;

/// Chunks kept (about 1 MiB each): the chunk a sequential READ ended in and
/// the ones preloaded after it, for several readers at once.
pub const CAPACITY: usize = 12;

pub(crate) struct ChunkMemo {
    epoch: u64,
    /// Insertion order, oldest first; a key appears at most once.
    entries: VecDeque<(ChunkKey, ChunkGuard)>,
}

impl ChunkMemo {
    pub(crate) fn new() -> Self {
        Self {
            epoch: 0,
            entries: VecDeque::with_capacity(CAPACITY),
        }
    }

    /// The epoch a reader must note before opening its snapshot.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn get(&self, key: ChunkKey) -> Option<ChunkGuard> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, g)| Arc::clone(g))
    }

    /// Keeps `guard`, read from a snapshot opened at `epoch`, unless chunks
    /// were committed since. Returns what it pushed out, to be dropped
    /// outside the caller's lock.
    #[must_use]
    pub(crate) fn insert_if_current(
        &mut self,
        epoch: u64,
        key: ChunkKey,
        guard: ChunkGuard,
    ) -> Option<ChunkGuard> {
        if epoch != self.epoch {
            return None;
        }
        self.entries.retain(|(k, _)| *k != key);
        let evicted = if self.entries.len() >= CAPACITY {
            self.entries.pop_front().map(|(_, g)| g)
        } else {
            None
        };
        self.entries.push_back((key, guard));
        evicted
    }

    /// Called once a transaction that changed chunks `keys` has committed
    /// (or failed to).
    pub(crate) fn committed<'k>(&mut self, keys: impl Iterator<Item = &'k ChunkKey>) {
        let mut any = false;
        for key in keys {
            self.entries.retain(|(k, _)| k != key);
            any = true;
        }
        if any {
            self.epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, TableDefinition};

    const T: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("t");

    fn db_with(value: &[u8]) -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("db")).expect("create");
        put(&db, value);
        (dir, db)
    }

    fn put(db: &Database, value: &[u8]) {
        let tx = db.begin_write().expect("write");
        tx.open_table(T)
            .expect("table")
            .insert((1, 0), value)
            .expect("insert");
        tx.commit().expect("commit");
    }

    fn guard(db: &Database) -> ChunkGuard {
        let rx = db.begin_read().expect("read");
        let t = rx.open_table(T).expect("table");
        Arc::new(t.get((1, 0)).expect("get").expect("present"))
    }

    fn value(memo: &ChunkMemo, key: ChunkKey) -> Option<Vec<u8>> {
        memo.get(key).map(|g| g.value().to_vec())
    }

    #[test]
    fn a_commit_of_the_chunk_drops_it() {
        let (_dir, db) = db_with(b"old");
        let mut memo = ChunkMemo::new();
        let epoch = memo.epoch();
        let _ = memo.insert_if_current(epoch, (1, 0), guard(&db));
        assert_eq!(value(&memo, (1, 0)), Some(b"old".to_vec()));
        memo.committed([(1, 0)].iter());
        assert!(memo.get((1, 0)).is_none());
        assert_ne!(memo.epoch(), epoch, "readers from before must not insert");
    }

    #[test]
    fn a_commit_of_other_chunks_keeps_this_one_but_moves_the_epoch() {
        let (_dir, db) = db_with(b"kept");
        let mut memo = ChunkMemo::new();
        let epoch = memo.epoch();
        let _ = memo.insert_if_current(epoch, (1, 0), guard(&db));
        memo.committed([(2, 0)].iter());
        assert_eq!(value(&memo, (1, 0)), Some(b"kept".to_vec()));
        assert_ne!(memo.epoch(), epoch);
    }

    #[test]
    fn commits_without_chunks_leave_the_epoch() {
        let mut memo = ChunkMemo::new();
        let epoch = memo.epoch();
        memo.committed(std::iter::empty());
        assert_eq!(memo.epoch(), epoch);
    }

    #[test]
    fn a_snapshot_older_than_a_commit_is_not_kept() {
        let (_dir, db) = db_with(b"old");
        let mut memo = ChunkMemo::new();
        let epoch = memo.epoch();
        let stale = guard(&db);
        put(&db, b"new");
        memo.committed([(1, 0)].iter());
        assert!(memo.insert_if_current(epoch, (1, 0), stale).is_none());
        assert!(memo.get((1, 0)).is_none());
    }

    #[test]
    fn holds_at_most_capacity_chunks_and_pushes_out_the_oldest() {
        let (_dir, db) = db_with(b"x");
        let mut memo = ChunkMemo::new();
        let epoch = memo.epoch();
        let mut pushed_out = 0;
        for index in 0..(CAPACITY as u64 + 3) {
            pushed_out += usize::from(
                memo.insert_if_current(epoch, (1, index), guard(&db))
                    .is_some(),
            );
        }
        assert_eq!(pushed_out, 3);
        assert!(
            memo.insert_if_current(epoch, (1, CAPACITY as u64 + 2), guard(&db))
                .is_none(),
            "a key is replaced, not added"
        );
        assert_eq!(memo.entries.len(), CAPACITY);
        assert!(memo.get((1, 0)).is_none(), "oldest went first");
        assert!(memo.get((1, CAPACITY as u64 + 2)).is_some());
    }

    #[test]
    fn a_held_guard_keeps_the_bytes_it_was_read_with() {
        let (_dir, db) = db_with(b"old");
        let mut memo = ChunkMemo::new();
        let epoch = memo.epoch();
        let _ = memo.insert_if_current(epoch, (1, 0), guard(&db));
        let held = memo.get((1, 0)).expect("kept");
        put(&db, b"new");
        memo.committed([(1, 0)].iter());
        assert_eq!(held.value(), b"old");
        assert_eq!(guard(&db).value(), b"new");
    }
}
