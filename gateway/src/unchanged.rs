//! Keeping the cached chunks that a file changed at the origin left as
//! they were.
//!
//! A journal `Write` record says a file's content changed, not where: on
//! its own it makes the gateway drop every cached chunk, and a replica (or
//! a pin) then fetches the whole file again. A log appended to all day, a
//! database or disk image written in place, a file still being copied in:
//! each would cross the network in full at every change the origin reports
//! (about once a second while it is written).
//!
//! So before a batch is applied, each changed file that the gateway keeps
//! (a replica, a pin) and that still holds at least [`MIN_CHUNKS`] chunks
//! of its old content is checked: the
//! origin hashes (BLAKE3) each chunk-sized piece of the new version
//! (`GET /v1/data/{id}/{version}/digest?piece=`), the gateway hashes the
//! chunks it holds, and the chunks whose hashes agree are kept; only the
//! others are dropped, and fetched again. Anything else (an origin that
//! does not hash pieces, a file changed again meanwhile, an error) drops
//! every chunk, as before. A batch's checks run at once, both sides hashing
//! at the same time, within [`CHECK_BUDGET`]: the batch waits for them, and
//! changes must show through the gateway within 2 s. A file too big to
//! hash in that time (several GiB) is fetched whole.
//!
//! Files cached on demand are not checked: the origin reads the whole
//! file to hash it, at every change, for every gateway that asks, while
//! dropping costs it nothing, and readers fetch back only what they read.
//! For a kept file the check is cheaper than the alternative, which reads
//! and sends the whole file.
//!
//! The gateway's hashes are kept ([`Hashes`]), tied to the version whose
//! bytes the chunks were found to hold: the next check of a file hashes
//! only the chunks fetched since. A chunk that changes any other way (a
//! client's write) changes the file's version first, so an old hash never
//! vouches for it.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use imz_cache::chunk::{self, CHUNK_SIZE};
use imz_cache::{Cache, FileId, Kind};
use imz_origin::wire::{Change, ObjectId, Record, Seq};

use crate::vfs::Vfs;

/// Files holding fewer whole chunks than this are fetched again whole: the
/// hashing round trip would save little.
const MIN_CHUNKS: usize = 4;
/// Files checked per journal batch at most.
const MAX_FILES: usize = 8;
/// How long the checks may hold a batch up: changes at the origin must
/// show through the gateway within 2 s. A check not done by then (a file
/// of more than a few GiB) leaves its file to be fetched whole.
const CHECK_BUDGET: Duration = Duration::from_millis(1000);
/// Files whose chunk hashes are kept.
const HASHES_KEPT: usize = 1024;

/// The hashes of cached chunks, by file id: chunk index to its length in
/// the file and the hash of those bytes, which are origin version
/// `version`'s.
pub struct Hashes(Mutex<lru::LruCache<FileId, Held>>);

type ChunkHashes = BTreeMap<u64, (u64, blake3::Hash)>;

struct Held {
    version: u64,
    chunks: ChunkHashes,
}

impl Default for Hashes {
    fn default() -> Self {
        Self(Mutex::new(lru::LruCache::new(
            NonZeroUsize::new(HASHES_KEPT).unwrap_or(NonZeroUsize::MIN),
        )))
    }
}

impl Hashes {
    /// The hashes kept for `fid` if its chunks hold `version`; taken out
    /// (put back by a check that keeps chunks).
    fn take(&self, fid: FileId, version: u64) -> ChunkHashes {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.pop(&fid) {
            Some(held) if held.version == version => held.chunks,
            _ => ChunkHashes::new(),
        }
    }

    fn keep(&self, fid: FileId, held: Held) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.put(fid, held);
    }
}

/// For the `Write` records of `records` (those after `cursor` and not made
/// by this gateway, whose key starts with `own`) whose file keeps some of
/// its cached chunks: record sequence number to those chunks, sorted. Only
/// kept files are checked: pinned ones, or all with `keeps_all` (a
/// replica).
pub async fn kept_chunks(
    vfs: &Vfs,
    hashes: &Hashes,
    records: &[Record],
    cursor: Seq,
    own: &str,
    keeps_all: bool,
) -> HashMap<Seq, Vec<u64>> {
    if !vfs.origin.hashes_pieces() {
        return HashMap::new();
    }
    let deadline = tokio::time::Instant::now() + CHECK_BUDGET;
    let checks = last_writes(records, cursor, own)
        .into_iter()
        .take(MAX_FILES)
        .map(|(seq, id, version, size)| async move {
            let check = check(vfs, hashes, id, version, size, keeps_all);
            match tokio::time::timeout_at(deadline, check).await {
                Ok(Some(chunks)) => Some((seq, chunks)),
                Ok(None) => None,
                Err(_) => {
                    tracing::debug!(origin_id = id, size, "no time to hash a changed file");
                    None
                }
            }
        });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Which cached chunks of origin object `id` hold the same bytes in
/// `version` (of `size` bytes), if any: the cache's hash of each and the
/// origin's, taken at once, agree.
async fn check(
    vfs: &Vfs,
    hashes: &Hashes,
    id: ObjectId,
    version: u64,
    size: u64,
    keeps_all: bool,
) -> Option<Vec<u64>> {
    let cache = vfs.cache.clone();
    let (fid, held_version, held) =
        tokio::task::spawn_blocking(move || held_chunks(&cache, id, version, size, keeps_all))
            .await
            .ok()??;
    let last = *held.last()?;
    let len = chunk::start_of(last) + chunk::len_in(last, size);
    let known = hashes.take(fid, held_version);
    let cache = vfs.cache.clone();
    let local = tokio::task::spawn_blocking(move || hash_chunks(&cache, fid, &held, size, known));
    let (local, remote) = tokio::join!(
        local,
        vfs.origin.piece_digests(id, version, len, CHUNK_SIZE)
    );
    let local = local.ok()??;
    let remote = match remote {
        Ok(d) if d.len == len && d.pieces.len() as u64 == chunk::count(len) => d.pieces,
        Ok(_) => return None,
        // The journal follower finds out about an origin gone; here it only
        // means fetching the file whole.
        Err(e) => {
            tracing::debug!(fid, origin_id = id, error = %e, "no digest of a changed file");
            return None;
        }
    };
    let kept: ChunkHashes = local
        .into_iter()
        .filter(|(index, (_, hash))| {
            usize::try_from(*index)
                .ok()
                .and_then(|i| remote.get(i))
                .is_some_and(|theirs| *theirs == hash.to_hex().as_str())
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    let indexes: Vec<u64> = kept.keys().copied().collect();
    tracing::debug!(
        fid,
        origin_id = id,
        kept = indexes.len(),
        size,
        "a changed file keeps cached chunks"
    );
    // Those chunks now hold `version`'s bytes.
    hashes.keep(
        fid,
        Held {
            version,
            chunks: kept,
        },
    );
    Some(indexes)
}

/// `(seq, origin id, version, size)` of each `Write` record to apply that
/// is the last record about its object in `records`.
fn last_writes(records: &[Record], cursor: Seq, own: &str) -> Vec<(Seq, ObjectId, u64, u64)> {
    let mut last: HashMap<ObjectId, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        let about = match &r.change {
            Change::Create { attr, .. }
            | Change::Write { attr }
            | Change::Truncate { attr }
            | Change::SetAttr { attr }
            | Change::Rename { attr, .. } => attr.id,
            Change::Remove { id, .. } => *id,
        };
        last.insert(about, i);
    }
    let mut out = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if let Change::Write { attr } = &r.change
            && crate::follow::to_apply(r, cursor, own)
            && last.get(&attr.id) == Some(&i)
        {
            out.push((r.seq, attr.id, attr.version, attr.size));
        }
    }
    out
}

/// For the cached clean file of origin object `id`, if it is kept (pinned,
/// or `keeps_all`) and of an older version than `version` (of `size`
/// bytes): its file id, the version its chunks hold, and the cached chunks
/// that are as long in the old content as in the new (at least
/// [`MIN_CHUNKS`] of them), in order.
fn held_chunks(
    cache: &Cache,
    id: ObjectId,
    version: u64,
    size: u64,
    keeps_all: bool,
) -> Option<(FileId, u64, Vec<u64>)> {
    let rx = cache.read().ok()?;
    let fid = rx.by_origin(id).ok()??;
    let obj = rx.get(fid).ok()??;
    let cached = obj.origin.as_ref()?;
    let kept = keeps_all || obj.pinned;
    if !kept || obj.kind != Kind::File || obj.is_dirty() || cached.version >= version {
        return None;
    }
    let old = obj.attrs.size.min(obj.origin_extent);
    let held: Vec<u64> = rx
        .chunks_of(fid)
        .ok()?
        .into_iter()
        .map(|(index, _)| index)
        .filter(|&index| {
            let len = chunk::len_in(index, size);
            len > 0 && chunk::len_in(index, old) == len
        })
        .collect();
    (held.len() >= MIN_CHUNKS).then_some((fid, cached.version, held))
}

/// The length and hash of each chunk of `held` that `fid` still has, as
/// chunks of a file of `size` bytes (`known` already holds some).
fn hash_chunks(
    cache: &Cache,
    fid: FileId,
    held: &[u64],
    size: u64,
    mut known: ChunkHashes,
) -> Option<ChunkHashes> {
    let rx = cache.read().ok()?;
    let mut zeros = Vec::new();
    let mut out = ChunkHashes::new();
    for &index in held {
        let len = chunk::len_in(index, size);
        if let Some((known_len, hash)) = known.remove(&index)
            && known_len == len
        {
            out.insert(index, (len, hash));
            continue;
        }
        // Evicted meanwhile: not kept.
        let Some(bytes) = rx.chunk(fid, index).ok()? else {
            continue;
        };
        // Stored without its trailing zeros.
        let pad = len.checked_sub(bytes.len() as u64)? as usize;
        zeros.resize(pad.max(zeros.len()), 0);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&bytes);
        hasher.update(&zeros[..pad]);
        out.insert(index, (len, hasher.finalize()));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coherence::tests::attr as attr_of;
    use imz_origin::wire::{Attr, Kind as WireKind};

    fn attr(id: ObjectId, version: u64, size: u64) -> Attr {
        attr_of(id, WireKind::File, version, size)
    }

    fn record(seq: Seq, key: Option<&str>, change: Change) -> Record {
        Record {
            seq,
            time: 0,
            key: key.map(str::to_owned),
            change,
        }
    }

    #[test]
    fn kept_hashes_serve_only_their_version_and_are_taken_once() {
        let hashes = Hashes::default();
        let held = |version| Held {
            version,
            chunks: [
                (2, (3, blake3::hash(b"two"))),
                (5, (4, blake3::hash(b"five"))),
            ]
            .into(),
        };
        hashes.keep(7, held(3));
        assert!(hashes.take(7, 4).is_empty(), "another version");
        assert!(hashes.take(7, 3).is_empty(), "a miss still takes them out");
        hashes.keep(7, held(3));
        let got = hashes.take(7, 3);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![2, 5]);
        assert_eq!(got[&5], (4, blake3::hash(b"five")));
        assert!(hashes.take(7, 3).is_empty(), "taken already");
    }

    #[test]
    fn a_chunk_is_hashed_with_the_zeros_its_storage_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 64 << 20).expect("cache");
        let mut tx = cache.write().expect("write");
        tx.put_chunk(9, 0, &[1, 2, 3]).expect("put");
        tx.put_chunk(9, 1, &[]).expect("put");
        tx.commit(true).expect("commit");
        let size = CHUNK_SIZE + 10;
        let known = [(1, (10, blake3::hash(b"vouched")))].into();
        let got = hash_chunks(&cache, 9, &[0, 1, 2], size, known).expect("hashes");
        let mut full = vec![0u8; CHUNK_SIZE as usize];
        full[..3].copy_from_slice(&[1, 2, 3]);
        assert_eq!(
            got[&0],
            (CHUNK_SIZE, blake3::hash(&full)),
            "padded as the origin reads it"
        );
        assert_eq!(
            got[&1],
            (10, blake3::hash(b"vouched")),
            "a known hash is not redone"
        );
        assert!(!got.contains_key(&2), "a chunk not stored has no hash");
        // A known hash of another length (the file grew since) is redone.
        let known = [(1, (10, blake3::hash(b"vouched")))].into();
        let got = hash_chunks(&cache, 9, &[1], 2 * CHUNK_SIZE, known).expect("hashes");
        assert_eq!(
            got[&1],
            (CHUNK_SIZE, blake3::hash(&vec![0u8; CHUNK_SIZE as usize]))
        );
    }

    #[test]
    fn only_the_last_record_about_a_file_is_a_candidate() {
        let records = vec![
            record(
                5,
                None,
                Change::Write {
                    attr: attr(1, 5, 10),
                },
            ),
            record(
                6,
                None,
                Change::Write {
                    attr: attr(2, 6, 10),
                },
            ),
            record(
                7,
                None,
                Change::Write {
                    attr: attr(1, 7, 20),
                },
            ),
            record(
                8,
                None,
                Change::Write {
                    attr: attr(3, 8, 10),
                },
            ),
            record(
                9,
                None,
                Change::Truncate {
                    attr: attr(3, 9, 5),
                },
            ),
            record(
                10,
                Some("gw-1"),
                Change::Write {
                    attr: attr(4, 10, 10),
                },
            ),
            record(
                11,
                None,
                Change::Write {
                    attr: attr(5, 11, 10),
                },
            ),
        ];
        // 1: its last record; 2: alone; 3: truncated after; 4: our own;
        // 5: not after the cursor.
        assert_eq!(
            last_writes(&records, 5, "gw-"),
            vec![(6, 2, 6, 10), (7, 1, 7, 20), (11, 5, 11, 10)]
        );
        assert_eq!(last_writes(&records, 11, "gw-"), vec![]);
    }
}
