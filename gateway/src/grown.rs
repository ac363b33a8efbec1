//! Keeping what is cached of a file that grew at the origin.
//!
//! A journal `Write` record says a file's content changed, not where: on
//! its own it makes the gateway drop every cached chunk, and a replica (or
//! a pin) then fetches the whole file again. A log appended to all day, or
//! a file still being copied in, would cross the network in full at every
//! change the origin reports (about once a second while it is written).
//!
//! So before a batch is applied, each file that grew and whose cached
//! chunks cover a prefix of it is checked: the gateway hashes the whole
//! chunks it holds, the origin hashes the same bytes of the new version
//! (`GET /v1/data/{id}/{version}/digest`), and where both BLAKE3 hashes
//! agree those chunks are kept; only the rest is dropped, and fetched
//! again. Anything else (a hash that differs, an origin that does not hash,
//! a file changed again meanwhile, an error) drops everything, as before.
//! A batch's checks run at once, both sides hashing at the same time,
//! within [`CHECK_BUDGET`]: the batch waits for them, and changes must show
//! through the gateway within 2 s. A file too big to hash in that time
//! (several GiB) is fetched whole.
//!
//! The gateway's side of a hash is kept ([`Hashes`]): the next check of a
//! file that keeps growing hashes only the chunks added since. It is tied
//! to the version the chunks hold, so chunks that change any other way are
//! never vouched for by an old hash.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use imz_cache::{Cache, FileId, Kind, chunk};
use imz_origin::wire::{Change, ObjectId, Record, Seq};

use crate::vfs::Vfs;

/// Files smaller than this many whole chunks are fetched again whole: the
/// hashing round trip would save little.
const MIN_CHUNKS: u64 = 4;
/// Files checked per journal batch at most.
const MAX_FILES: usize = 8;
/// How long the checks may hold a batch up: changes at the origin must
/// show through the gateway within 2 s. A check not done by then (a file
/// of more than a few GiB) leaves its file to be fetched whole.
const CHECK_BUDGET: Duration = Duration::from_millis(1000);
/// Files whose hash state is kept.
const HASHES_KEPT: usize = 1024;

/// The hash states of files checked before, by file id: the hasher after
/// the first `chunks` chunks of the file at origin version `version`.
pub struct Hashes(Mutex<lru::LruCache<FileId, Held>>);

struct Held {
    version: u64,
    chunks: u64,
    hasher: blake3::Hasher,
}

impl Default for Hashes {
    fn default() -> Self {
        Self(Mutex::new(lru::LruCache::new(
            NonZeroUsize::new(HASHES_KEPT).unwrap_or(NonZeroUsize::MIN),
        )))
    }
}

impl Hashes {
    /// The state kept for `fid` if it is of `version` and no longer than
    /// `chunks`; it is taken out (put back by a check that passes).
    fn take(&self, fid: FileId, version: u64, chunks: u64) -> Option<(u64, blake3::Hasher)> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.pop(&fid)?;
        (held.version == version && held.chunks <= chunks).then_some((held.chunks, held.hasher))
    }

    fn keep(&self, fid: FileId, held: Held) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.put(fid, held);
    }
}

/// For the `Write` records of `records` (those after `cursor` and not made
/// by this gateway, whose key starts with `own`) whose file keeps a prefix:
/// record sequence number to the number of leading chunks kept.
pub async fn kept_prefixes(
    vfs: &Vfs,
    hashes: &Hashes,
    records: &[Record],
    cursor: Seq,
    own: &str,
) -> HashMap<Seq, u64> {
    if !vfs.origin.hashes_prefixes() {
        return HashMap::new();
    }
    let deadline = tokio::time::Instant::now() + CHECK_BUDGET;
    let checks = last_writes(records, cursor, own)
        .into_iter()
        .take(MAX_FILES)
        .map(|(seq, id, version, size)| async move {
            let check = check(vfs, hashes, id, version, size);
            match tokio::time::timeout_at(deadline, check).await {
                Ok(Some(chunks)) => Some((seq, chunks)),
                Ok(None) => None,
                Err(_) => {
                    tracing::debug!(origin_id = id, size, "no time to hash a grown file");
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

/// How many leading chunks the cached file of origin object `id` keeps
/// for `version` (of `size` bytes), if any: the cache's hash of them and
/// the origin's, taken at once, agree.
async fn check(vfs: &Vfs, hashes: &Hashes, id: ObjectId, version: u64, size: u64) -> Option<u64> {
    let cache = vfs.cache.clone();
    let (fid, chunks, held_version) =
        tokio::task::spawn_blocking(move || held_prefix(&cache, id, version, size))
            .await
            .ok()??;
    let len = chunk::start_of(chunks);
    let cache = vfs.cache.clone();
    let from = hashes.take(fid, held_version, chunks);
    let local = tokio::task::spawn_blocking(move || hash_held(&cache, fid, chunks, from));
    let (local, remote) = tokio::join!(local, vfs.origin.digest(id, version, len));
    let (hasher, local) = local.ok()??;
    match remote {
        Ok(d) if d.len == len && d.blake3 == local.to_hex().as_str() => {
            // Those chunks now hold `version`'s bytes.
            hashes.keep(
                fid,
                Held {
                    version,
                    chunks,
                    hasher,
                },
            );
            tracing::debug!(
                fid,
                origin_id = id,
                kept = len,
                size,
                "a grown file keeps its cached prefix"
            );
            Some(chunks)
        }
        Ok(_) => None,
        // The journal follower finds out about an origin gone; here it only
        // means fetching the file whole.
        Err(e) => {
            tracing::debug!(fid, origin_id = id, error = %e, "no digest of a grown file");
            None
        }
    }
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

/// For the cached clean file of origin object `id`, if it is an older
/// version that `size` outgrows and its leading whole chunks are all
/// cached: its file id, how many chunks, and the version they hold.
fn held_prefix(cache: &Cache, id: ObjectId, version: u64, size: u64) -> Option<(FileId, u64, u64)> {
    let rx = cache.read().ok()?;
    let fid = rx.by_origin(id).ok()??;
    let obj = rx.get(fid).ok()??;
    let cached = obj.origin.as_ref()?;
    let old_size = obj.attrs.size;
    if obj.kind != Kind::File || obj.is_dirty() || cached.version >= version || size <= old_size {
        return None;
    }
    let chunks = chunk::index_of(old_size.min(obj.origin_extent));
    if chunks < MIN_CHUNKS {
        return None;
    }
    for index in 0..chunks {
        if !rx.has_chunk(fid, index).ok()? {
            return None;
        }
    }
    Some((fid, chunks, cached.version))
}

/// The hash of the first `chunks` chunks of `fid`, all cached, going on
/// from `from` (the hasher after that many chunks) if given; and the
/// hasher's state.
fn hash_held(
    cache: &Cache,
    fid: FileId,
    chunks: u64,
    from: Option<(u64, blake3::Hasher)>,
) -> Option<(blake3::Hasher, blake3::Hash)> {
    let rx = cache.read().ok()?;
    let (first, mut hasher) = from.unwrap_or((0, blake3::Hasher::new()));
    for index in first..chunks {
        // Stored without its trailing zeros.
        let bytes = rx.chunk(fid, index).ok()??;
        let zeros = chunk::CHUNK_SIZE.checked_sub(bytes.len() as u64)?;
        hasher.update(&bytes);
        if zeros > 0 {
            hasher.update(&vec![0; zeros as usize]);
        }
    }
    let hash = hasher.finalize();
    Some((hasher, hash))
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
    fn a_kept_hash_state_serves_only_its_version_and_is_taken_once() {
        let hashes = Hashes::default();
        let held = |version, chunks| Held {
            version,
            chunks,
            hasher: blake3::Hasher::new(),
        };
        hashes.keep(7, held(3, 10));
        assert!(hashes.take(7, 4, 12).is_none(), "another version");
        hashes.keep(7, held(3, 10));
        assert!(
            hashes.take(7, 3, 9).is_none(),
            "more chunks than the file holds"
        );
        hashes.keep(7, held(3, 10));
        assert_eq!(hashes.take(7, 3, 12).map(|(n, _)| n), Some(10));
        assert!(hashes.take(7, 3, 12).is_none(), "taken already");
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
