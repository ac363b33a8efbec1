//! Filling: bringing the whole content of chosen files (and the entries of
//! chosen subtrees) into the cache, for replicas and pins.
//!
//! Content travels through the fetcher ([`Fetcher::prefetch`]), so that it
//! shares transfers with readers and is stored by the one storer, and a
//! file counts as filled only once its chunks are in the cache. Bounds:
//! at most [`FILES_IN_FLIGHT`] files at once, each asking for at most
//! [`WINDOW_CHUNKS`] chunks at a time; the fetcher's storer queue bounds
//! the bytes that have arrived but are not stored yet.
//!
//! [`Fetcher::prefetch`]: crate::fetch::Fetcher::prefetch

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use imz_cache::chunk;
use imz_cache::{FileId, Kind, Object};

use crate::coherence::{self, Source};
use crate::fetch::{FetchFailure, Target};
use crate::vfs::{Vfs, VfsError};

/// Files filled at once.
pub const FILES_IN_FLIGHT: usize = 16;
/// Chunks asked for in one request (about 16 MiB).
pub const WINDOW_CHUNKS: usize = 16;
/// Attempts at a file that keeps changing or failing.
const ATTEMPTS: usize = 4;
/// Entries read per page while walking a directory.
const WALK_PAGE: usize = 1024;

/// Why a file could not be filled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillError {
    #[error("the origin is unreachable")]
    Offline,
    /// The origin may not read the file: retrying at once cannot help, only
    /// after its permissions there change (the keeper's periodic sweep
    /// tries again).
    #[error("the origin may not read this file (its permissions there)")]
    Denied,
    #[error("{0}")]
    Failed(String),
}

impl From<VfsError> for FillError {
    fn from(e: VfsError) -> Self {
        match e {
            VfsError::Offline => Self::Offline,
            other => Self::Failed(other.to_string()),
        }
    }
}

/// Progress of a fill, shared with whoever shows it.
#[derive(Debug, Default)]
pub struct Counters {
    /// Files whose content is all in the cache.
    pub files: AtomicU64,
    /// Bytes that arrived.
    pub bytes: AtomicU64,
}

/// What a fill of many files left undone.
#[derive(Debug, Default)]
pub struct Report {
    /// Files left because the origin was unreachable (fill them later).
    pub offline: Vec<FileId>,
    /// Files the origin may not read (left for the keeper's next sweep).
    pub denied: Vec<FileId>,
    /// Files that failed otherwise, with why.
    pub failed: Vec<(FileId, String)>,
}

impl Report {
    /// Whether nothing is left to try again (files the origin may not
    /// read wait for a change at the origin, not for a retry).
    pub fn is_complete(&self) -> bool {
        self.offline.is_empty() && self.failed.is_empty()
    }
}

/// The fetch target of a clean file with origin content, or `None` if
/// there is nothing to fetch for it (a directory, a local or dirty file:
/// local changes are never overwritten).
pub fn target_of(fid: FileId, obj: &Object) -> Option<Target> {
    if obj.kind != Kind::File || obj.is_dirty() || obj.removed {
        return None;
    }
    obj.origin.map(|o| Target {
        fid,
        origin_id: o.id,
        version: o.version,
        extent: obj.origin_extent.min(obj.attrs.size),
    })
}

/// Bytes of `obj`'s origin content that are not in the cache.
pub fn missing_bytes(vfs: &Vfs, fid: FileId, obj: &Object) -> Result<u64, VfsError> {
    let Some(target) = target_of(fid, obj) else {
        return Ok(0);
    };
    let missing = vfs.cache.read()?.missing_chunks(fid, obj)?;
    Ok(missing
        .iter()
        .map(|&i| chunk::len_in(i, target.extent))
        .sum())
}

/// Brings all of file `fid`'s origin content into the cache.
pub async fn fill_file(vfs: &Vfs, fid: FileId, counters: &Counters) -> Result<(), FillError> {
    fill_file_with(vfs, fid, counters, true).await
}

/// With `stored`, returns once the content is in the cache; without, once
/// it has arrived (one pass over what was missing; the storer stores it a
/// moment later).
async fn fill_file_with(
    vfs: &Vfs,
    fid: FileId,
    counters: &Counters,
    stored: bool,
) -> Result<(), FillError> {
    let mut last_error = String::new();
    let mut rounds = 0;
    let mut failed = false;
    loop {
        if failed {
            // Back off a little before trying a failing file again.
            tokio::time::sleep(Duration::from_millis(100 << rounds)).await;
            failed = false;
        }
        let (target, missing) = {
            let rx = vfs.cache.read().map_err(VfsError::from)?;
            let Some(obj) = rx.get(fid).map_err(VfsError::from)? else {
                return Ok(()); // Gone from the cache: nothing to keep.
            };
            let Some(target) = target_of(fid, &obj) else {
                return Ok(());
            };
            let missing = rx.missing_chunks(fid, &obj).map_err(VfsError::from)?;
            (target, missing)
        };
        if missing.is_empty() {
            counters.files.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if !vfs.link.is_up() {
            return Err(FillError::Offline);
        }
        if rounds == ATTEMPTS {
            break;
        }
        rounds += 1;
        // Whatever happens, the next round checks what is in the cache then
        // (chunks can be evicted meanwhile, or the file change).
        let mut complete = true;
        for window in windows(&missing) {
            let fetched = if stored {
                vfs.fetcher.prefetch(&target, window).await
            } else {
                vfs.fetcher.fetch_for_fill(&target, window).await
            };
            match fetched {
                Ok(bytes) => {
                    counters.bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(FetchFailure::Offline) => return Err(FillError::Offline),
                Err(FetchFailure::Gone(None)) => return Ok(()), // Removed at the origin.
                Err(FetchFailure::Gone(Some(attr))) => {
                    // Changed at the origin before the journal told us.
                    vfs.blocking(move |cache| {
                        let mut tx = cache.write()?;
                        if let Some(mut obj) = tx.get(fid)?
                            && coherence::refresh(&mut tx, fid, &mut obj, &attr, Source::Fetch)?
                        {
                            tx.put(fid, &obj)?;
                            tx.commit(false)?;
                        }
                        Ok(())
                    })
                    .await?;
                    complete = false;
                    break;
                }
                Err(FetchFailure::Denied) => return Err(FillError::Denied),
                Err(FetchFailure::Changed) => {
                    // Cut while the file changed: the next round asks again
                    // (and hears of the new version).
                    last_error = "the file keeps changing at the origin".into();
                    complete = false;
                    break;
                }
                Err(FetchFailure::Io(e)) => {
                    last_error = e;
                    failed = true;
                    complete = false;
                    break;
                }
            }
        }
        if complete && !stored {
            counters.files.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
    }
    Err(FillError::Failed(if last_error.is_empty() {
        "file keeps changing at the origin".into()
    } else {
        last_error
    }))
}

/// Runs of consecutive chunk indexes, at most [`WINDOW_CHUNKS`] long.
fn windows(missing: &[u64]) -> Vec<&[u64]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=missing.len() {
        let split =
            i == missing.len() || missing[i] != missing[i - 1] + 1 || i - start >= WINDOW_CHUNKS;
        if split {
            out.push(&missing[start..i]);
            start = i;
        }
    }
    out
}

/// Fills every file in `fids`, [`FILES_IN_FLIGHT`] at a time: a first
/// pass fetches, without waiting for each file to be stored; a second
/// makes sure all of it is in the cache (waiting for the storer, fetching
/// again what was evicted or changed meanwhile).
pub async fn fill_all(
    vfs: &Vfs,
    fids: impl IntoIterator<Item = FileId>,
    counters: &Counters,
) -> Report {
    let mut report = Report::default();
    let mut arrived = Vec::new();
    let mut results = futures::stream::iter(fids)
        .map(|fid| async move { (fid, fill_file_with(vfs, fid, counters, false).await) })
        .buffer_unordered(FILES_IN_FLIGHT);
    while let Some((fid, result)) = results.next().await {
        match result {
            Ok(()) => arrived.push(fid),
            Err(FillError::Offline) => report.offline.push(fid),
            Err(FillError::Denied) => report.denied.push(fid),
            Err(FillError::Failed(why)) => report.failed.push((fid, why)),
        }
    }
    drop(results);
    // Files already counted: the check does not count them again.
    let check = Counters::default();
    let check = &check;
    let mut results = futures::stream::iter(arrived)
        .map(|fid| async move { (fid, fill_file_with(vfs, fid, check, true).await) })
        .buffer_unordered(FILES_IN_FLIGHT);
    while let Some((fid, result)) = results.next().await {
        match result {
            Ok(()) => {}
            Err(FillError::Offline) => report.offline.push(fid),
            Err(FillError::Denied) => report.denied.push(fid),
            Err(FillError::Failed(why)) => report.failed.push((fid, why)),
        }
    }
    counters
        .bytes
        .fetch_add(check.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    report
}

/// What a subtree holds.
#[derive(Debug, Default)]
pub struct Tree {
    /// Directories, the top one first, parents before children.
    pub dirs: Vec<FileId>,
    /// Files, with their sizes.
    pub files: Vec<(FileId, u64)>,
    /// Symlinks.
    pub others: Vec<FileId>,
    /// Bytes of files not pinned yet.
    pub unpinned_bytes: u64,
}

impl Tree {
    pub fn objects(&self) -> u64 {
        (self.dirs.len() + self.files.len() + self.others.len()) as u64
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, s)| s).sum()
    }
}

/// The objects at and below `top`. With `list`, directories whose entries
/// the cache does not all know are listed at the origin first (this needs
/// the origin); without, only what is cached is walked. With `deep` false,
/// only `top` and, for a directory, its direct entries.
pub async fn walk(vfs: &Vfs, top: FileId, list: bool, deep: bool) -> Result<Tree, VfsError> {
    let mut tree = Tree::default();
    let obj = vfs.getattr(top)?;
    match obj.kind {
        Kind::File => {
            add_file(&mut tree, top, &obj);
            return Ok(tree);
        }
        Kind::Symlink => {
            tree.others.push(top);
            return Ok(tree);
        }
        Kind::Dir => {}
    }
    let mut queue = std::collections::VecDeque::from([top]);
    while let Some(dir) = queue.pop_front() {
        tree.dirs.push(dir);
        if list {
            vfs.ensure_listed(dir).await?;
        }
        let mut cookie = 0;
        loop {
            let page = vfs.entries_after(dir, cookie, WALK_PAGE)?;
            let Some((last, _)) = page.last() else { break };
            cookie = last.cookie;
            for (entry, obj) in page {
                match obj.kind {
                    Kind::File => add_file(&mut tree, entry.fileid, &obj),
                    Kind::Symlink => tree.others.push(entry.fileid),
                    Kind::Dir if deep => queue.push_back(entry.fileid),
                    Kind::Dir => {}
                }
            }
        }
    }
    Ok(tree)
}

fn add_file(tree: &mut Tree, fid: FileId, obj: &Object) {
    tree.files.push((fid, obj.attrs.size));
    if !obj.pinned {
        tree.unpinned_bytes += obj.attrs.size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_split_at_gaps_and_at_the_window_size() {
        let missing: Vec<u64> = (0..40).chain([50, 51, 60]).collect();
        let got: Vec<Vec<u64>> = windows(&missing).into_iter().map(<[u64]>::to_vec).collect();
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], (0..16).collect::<Vec<_>>());
        assert_eq!(got[1], (16..32).collect::<Vec<_>>());
        assert_eq!(got[2], (32..40).collect::<Vec<_>>());
        assert_eq!(got[3], vec![50, 51]);
        assert_eq!(got[4], vec![60]);
        assert!(windows(&[]).is_empty());
    }
}
