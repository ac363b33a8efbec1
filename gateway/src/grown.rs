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

use std::collections::HashMap;

use imz_cache::{Cache, FileId, Kind, chunk};
use imz_origin::wire::{Change, ObjectId, Record, Seq};

use crate::vfs::Vfs;

/// Files smaller than this many whole chunks are fetched again whole: the
/// hashing round trip would save little.
const MIN_CHUNKS: u64 = 4;
/// Files checked per journal batch at most, so that a batch full of growing
/// files does not hold the follower up for long.
const MAX_FILES: usize = 8;

/// For the `Write` records of `records` (those after `cursor` and not made
/// by this gateway, whose key starts with `own`) whose file keeps a prefix:
/// record sequence number to the number of leading chunks kept.
pub async fn kept_prefixes(
    vfs: &Vfs,
    records: &[Record],
    cursor: Seq,
    own: &str,
) -> HashMap<Seq, u64> {
    let mut kept = HashMap::new();
    if !vfs.origin.hashes_prefixes() {
        return kept;
    }
    for (seq, id, version, size) in last_writes(records, cursor, own)
        .into_iter()
        .take(MAX_FILES)
    {
        let cache = vfs.cache.clone();
        let local =
            tokio::task::spawn_blocking(move || cached_prefix(&cache, id, version, size)).await;
        let Ok(Some((fid, chunks, hash))) = local else {
            continue;
        };
        let len = chunk::start_of(chunks);
        match vfs.origin.digest(id, version, len).await {
            Ok(d) if d.len == len && d.blake3 == hash.to_hex().as_str() => {
                tracing::debug!(
                    fid,
                    origin_id = id,
                    kept = len,
                    size,
                    "a grown file keeps its cached prefix"
                );
                kept.insert(seq, chunks);
            }
            Ok(_) => {}
            // The journal follower finds out about an origin gone; here it
            // only means fetching the file whole.
            Err(e) => tracing::debug!(fid, origin_id = id, error = %e, "no digest of a grown file"),
        }
    }
    kept
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
        let ours = r.key.as_deref().is_some_and(|k| k.starts_with(own));
        if let Change::Write { attr } = &r.change
            && r.seq > cursor
            && !ours
            && last.get(&attr.id) == Some(&i)
        {
            out.push((r.seq, attr.id, attr.version, attr.size));
        }
    }
    out
}

/// For the cached clean file of origin object `id`, if it is an older
/// version that `size` outgrows and its leading whole chunks are all
/// cached: its file id, how many chunks, and their hash.
fn cached_prefix(
    cache: &Cache,
    id: ObjectId,
    version: u64,
    size: u64,
) -> Option<(FileId, u64, blake3::Hash)> {
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
    let mut hasher = blake3::Hasher::new();
    for index in 0..chunks {
        // Stored without its trailing zeros.
        let bytes = rx.chunk(fid, index).ok()??;
        let zeros = chunk::CHUNK_SIZE.checked_sub(bytes.len() as u64)?;
        hasher.update(&bytes);
        if zeros > 0 {
            hasher.update(&vec![0; zeros as usize]);
        }
    }
    Some((fid, chunks, hasher.finalize()))
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
