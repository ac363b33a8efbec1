//! Reading: file data (from chunks, fetched on a miss) and symlink targets.

use std::collections::HashMap;

use bytes::Bytes;
use imz_cache::chunk::{self, CHUNK_SIZE};
use imz_cache::{FileId, Kind, Object, RangeRead};

use super::{Vfs, VfsError};
use crate::coherence::{self, Source};
use crate::fetch::{FetchFailure, Target};
use crate::metrics::Metrics;
use crate::preload;

/// Attempts at a read whose file keeps changing at the origin (a log file
/// written to every few milliseconds): each change costs a round trip for
/// the new version, and a transfer cut by the next change costs another.
const READ_ATTEMPTS: usize = 32;
/// ... within this long, well inside the 2 s a client may be kept waiting.
const READ_RETRY_BUDGET: std::time::Duration = std::time::Duration::from_millis(1500);
/// Largest READ answered: FSINFO's `rtmax` (nfs3_server's default, 1 MiB).
pub const MAX_READ: u32 = 1 << 20;

impl Vfs {
    /// Reads up to `count` bytes at `offset`; returns the bytes and whether
    /// they reach the end of the file.
    pub async fn read(
        &self,
        fid: FileId,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), VfsError> {
        // Clients are told (FSINFO rtmax) to ask for at most this; one that
        // asks for more gets that much, not a reply of any size it names.
        let count = count.min(MAX_READ);
        let (bytes, eof, hit) = self.read_inner(fid, offset, count).await?;
        Metrics::add(&self.metrics.reads, 1);
        Metrics::add(&self.metrics.read_bytes, bytes.len() as u64);
        if hit {
            Metrics::add(&self.metrics.read_hits, 1);
        }
        Ok((bytes, eof))
    }

    /// The read, and whether the cache answered it without fetching.
    async fn read_inner(
        &self,
        fid: FileId,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool, bool), VfsError> {
        // After a cut transfer, no readahead: the shorter a transfer, the
        // likelier it ends before the next write at the origin.
        let mut was_cut = false;
        let started = std::time::Instant::now();
        for attempt in 0..READ_ATTEMPTS {
            if attempt > 0 && started.elapsed() > READ_RETRY_BUDGET {
                break;
            }
            let obj = self.getattr(fid)?;
            match obj.kind {
                Kind::File => {}
                Kind::Dir => return Err(VfsError::IsDir),
                Kind::Symlink => return Err(VfsError::Invalid("not a regular file".into())),
            }
            let size = obj.attrs.size;
            if offset >= size {
                return Ok((Vec::new(), true, true));
            }
            let end = offset.saturating_add(u64::from(count)).min(size);
            let eof = end >= size;
            let window = self.fetcher.note_read(fid, offset, end - offset);
            // Synchronous on purpose: a redb read of cached pages takes tens
            // of microseconds, while block_in_place hands this worker's core
            // to another thread on every READ (measured: half the CPU of a
            // warm sequential read).
            let cached = self
                .cache
                .read()?
                .read_range(fid, &obj, offset, end - offset)?;
            let readahead = chunk::index_of(end.saturating_sub(1)) + 1;
            let readahead = readahead..readahead + if was_cut { 0 } else { window };
            let missing = match cached {
                RangeRead::Data(bytes) => {
                    if window > 0 {
                        let next = readahead.start;
                        self.preloader.ask(fid, next..next + preload::AHEAD);
                        if let Some(target) = target_of(fid, &obj)
                            && self.link.is_up()
                        {
                            self.fetcher.readahead(&target, readahead);
                        }
                    }
                    return Ok((bytes, eof, true));
                }
                RangeRead::Missing(missing) => missing,
            };
            let Some(target) = target_of(fid, &obj) else {
                return Err(VfsError::Io(
                    "local file data is missing from the cache".into(),
                ));
            };
            if !self.link.is_up() {
                return Err(VfsError::Offline);
            }
            let mut fetched = HashMap::new();
            let mut gone = None;
            let mut cut = false;
            for (index, wait) in self.fetcher.demand(&target, &missing, readahead) {
                match wait.bytes().await {
                    Ok(bytes) => {
                        fetched.insert(index, bytes);
                    }
                    Err(FetchFailure::Offline) => return Err(VfsError::Offline),
                    Err(FetchFailure::Io(e)) => return Err(VfsError::Io(e)),
                    Err(FetchFailure::Denied) => return Err(VfsError::Access),
                    Err(FetchFailure::Gone(current)) => {
                        gone = Some(current);
                        break;
                    }
                    Err(FetchFailure::Changed) => {
                        cut = true;
                        break;
                    }
                }
            }
            was_cut |= cut;
            if cut {
                // Written to at the origin while being sent (a log file
                // growing): asked again, the origin names its new version,
                // which the next round reads.
                continue;
            }
            if let Some(current) = gone {
                // The origin moved on before the journal told us: catch up
                // with what it said and read again.
                self.object_changed_at_origin(fid, current).await?;
                continue;
            }
            let assembled = assemble(self, fid, &obj, offset, end, &fetched)?;
            if let Some(bytes) = assembled {
                return Ok((bytes, eof, false));
            }
        }
        Err(VfsError::Io("file keeps changing at the origin".into()))
    }

    /// The origin says our version of `fid` is no longer current.
    async fn object_changed_at_origin(
        &self,
        fid: FileId,
        current: Option<imz_origin::wire::Attr>,
    ) -> Result<(), VfsError> {
        let Some(attr) = current else {
            // Removed at the origin; the journal will unlink it. Until then
            // its data cannot be had.
            return Err(VfsError::Stale);
        };
        self.blocking(move |cache| {
            let mut tx = cache.write()?;
            let Some(mut obj) = tx.get(fid)? else {
                return Err(VfsError::Stale);
            };
            if coherence::refresh(&mut tx, fid, &mut obj, &attr, Source::Fetch)? {
                tx.put(fid, &obj)?;
                tx.commit(true)?;
            }
            Ok(())
        })
        .await
    }

    /// The target of symlink `fid`.
    pub fn readlink(&self, fid: FileId) -> Result<String, VfsError> {
        let obj = self.getattr(fid)?;
        match (obj.kind, &obj.target) {
            (Kind::Symlink, Some(target)) => Ok(target.clone()),
            (Kind::Symlink, None) => {
                // The origin described it so: older origins did, for a
                // symlink renamed while they read its target. Said here,
                // since the client sees only an I/O error.
                tracing::warn!(fid, origin = ?obj.origin, "a cached symlink has no target");
                Err(VfsError::Io("symlink target missing".into()))
            }
            _ => Err(VfsError::Invalid("not a symlink".into())),
        }
    }
}

fn target_of(fid: FileId, obj: &Object) -> Option<Target> {
    obj.origin.map(|o| Target {
        fid,
        origin_id: o.id,
        version: o.version,
        extent: obj.origin_extent.min(obj.attrs.size),
    })
}

/// Builds `offset..end` of `fid` from fetched chunks, cached chunks and
/// holes. `None` if a chunk vanished meanwhile (evicted): read again.
fn assemble(
    vfs: &Vfs,
    fid: FileId,
    obj: &Object,
    offset: u64,
    end: u64,
    fetched: &HashMap<u64, Bytes>,
) -> Result<Option<Vec<u8>>, VfsError> {
    let rx = vfs.cache.read()?;
    let mut out = Vec::with_capacity((end - offset) as usize);
    for index in chunk::covering(offset, end - offset) {
        let cstart = chunk::start_of(index);
        let lo = (offset.max(cstart) - cstart) as usize;
        let hi = (end.min(cstart + CHUNK_SIZE) - cstart) as usize;
        let stored;
        let bytes: &[u8] = match fetched.get(&index) {
            Some(b) => b,
            None => match rx.chunk(fid, index)? {
                Some(b) => {
                    stored = b;
                    &stored
                }
                None if cstart >= obj.origin_extent => &[],
                None => return Ok(None),
            },
        };
        let have = bytes.len().min(hi);
        if lo < have {
            out.extend_from_slice(&bytes[lo..have]);
        }
        out.resize(out.len() + (hi - have.max(lo)), 0);
    }
    Ok(Some(out))
}
