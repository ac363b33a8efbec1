//! Names and attributes: lookup, getattr, and directory listings, served
//! from the cache and filled from the origin on a miss.

use std::collections::HashSet;
use std::sync::Arc;

use imz_cache::{DirEntry, FileId, Kind, Object, ROOT_FILEID};
use imz_origin::wire;

use super::{Vfs, VfsError};
use crate::coherence::{self, Source};
use imz_origin::test_hold::TestHold;

/// Deeper than any real tree (a path of single-letter names this deep is
/// past PATH_MAX many times): a parent chain longer than this is broken.
const MAX_DEPTH: usize = 100_000;

/// Entries asked of the origin per listing page.
const LISTING_PAGE: usize = 5000;
/// Attempts at a consistent listing of a directory that keeps changing.
const LISTING_ATTEMPTS: usize = 4;

/// `IMZ_TEST_LOOKUP_HOLD`: holds the origin's answer to a lookup before
/// it is stored. A test then changes the file at the origin and lets the
/// journal record pass by the follower: an answer older than a record.
static LOOKUP_HOLD: TestHold = TestHold::new("IMZ_TEST_LOOKUP_HOLD");

/// What the origin's answer about one name comes to here.
enum Answer {
    Found(FileId),
    /// The name is gone here (its removal is not at the origin yet).
    Vacant,
    /// The directory changed while we asked.
    Retry,
}

impl Vfs {
    /// The cached object `fid`. Never asks the origin: coherence comes from
    /// the journal, so attributes are answered at memory speed.
    pub fn getattr(&self, fid: FileId) -> Result<Arc<Object>, VfsError> {
        self.cache.object_now(fid)?.ok_or(VfsError::Stale)
    }

    /// How many levels directory `dir` lies below the root.
    pub fn depth(&self, dir: FileId) -> Result<usize, VfsError> {
        let mut at = dir;
        for depth in 0..MAX_DEPTH {
            if at == ROOT_FILEID {
                return Ok(depth);
            }
            at = self.getattr(at)?.parent;
        }
        Err(VfsError::Io(format!(
            "directory {dir} is not under the root"
        )))
    }

    /// Resolves `name` in directory `dir`.
    pub async fn lookup(&self, dir: FileId, name: &str) -> Result<FileId, VfsError> {
        let dir_obj = self.getattr(dir)?;
        if dir_obj.kind != Kind::Dir {
            return Err(VfsError::NotDir);
        }
        match name {
            "." => return Ok(dir),
            ".." => {
                return Ok(if dir == ROOT_FILEID {
                    ROOT_FILEID
                } else {
                    dir_obj.parent
                });
            }
            _ => {}
        }
        // Names the origin would refuse to look up: answered here, not
        // turned into an I/O error by its refusal.
        match wire::validate_name(name, dir == ROOT_FILEID) {
            Ok(()) => {}
            Err(wire::NameError::TooLong) => return Err(VfsError::NameTooLong),
            Err(wire::NameError::Reserved) => return Err(VfsError::NotFound),
            Err(e) => return Err(VfsError::Invalid(e.to_string())),
        }
        for _ in 0..LISTING_ATTEMPTS {
            if let Some(fid) = self.cache.read()?.lookup(dir, name)? {
                return Ok(fid);
            }
            let dir_obj = self.getattr(dir)?;
            let Some(origin) = dir_obj.origin.filter(|_| !dir_obj.listed) else {
                // A listed (or local-only) directory knows all its names.
                return Err(VfsError::NotFound);
            };
            if !self.link.is_up() {
                return Err(VfsError::Offline);
            }
            let entry = match self.origin.lookup(origin.id, name).await {
                Ok(Some(entry)) => entry,
                Ok(None) => return Err(VfsError::NotFound),
                Err(e) => return Err(self.origin_failed(e)),
            };
            LOOKUP_HOLD.wait().await;
            let owned_name = name.to_owned();
            let passed = Arc::clone(&self.passed);
            let stored = self
                .blocking(move |cache| {
                    let mut tx = cache.write()?;
                    let attr = passed.newest(&entry.attr);
                    let dir_now = tx.get(dir)?.ok_or(VfsError::Stale)?;
                    // If the journal changed this directory while we asked,
                    // our answer may be older than what the cache now says:
                    // ask again.
                    if dir_now.origin.map(|o| o.version) != Some(origin.version) {
                        return Ok(Answer::Retry);
                    }
                    // Removed or renamed away here: the origin has not
                    // heard yet.
                    if tx.vacated_names(dir)?.contains(&owned_name) {
                        return Ok(Answer::Vacant);
                    }
                    let fid =
                        coherence::upsert_entry(&mut tx, dir, &owned_name, &attr, Source::Fetch)?;
                    // Not linked: the object lives where local changes
                    // put it (moved away, or removed), not at this name.
                    let linked = tx.lookup(dir, &owned_name)? == Some(fid);
                    tx.commit(true)?;
                    Ok(if linked {
                        Answer::Found(fid)
                    } else {
                        Answer::Vacant
                    })
                })
                .await?;
            match stored {
                Answer::Found(fid) => return Ok(fid),
                Answer::Vacant => return Err(VfsError::NotFound),
                Answer::Retry => {}
            }
        }
        Err(VfsError::Io(
            "directory keeps changing at the origin".into(),
        ))
    }

    /// Resolves a `/`-separated path from the root (for MOUNT of a subdirectory).
    pub async fn lookup_path(&self, path: &str) -> Result<FileId, VfsError> {
        let mut fid = ROOT_FILEID;
        for component in path.split('/').filter(|c| !c.is_empty()) {
            fid = self.lookup(fid, component).await?;
        }
        Ok(fid)
    }

    /// Makes sure every entry of directory `dir` is cached, listing it at
    /// the origin if needed.
    pub async fn ensure_listed(&self, dir: FileId) -> Result<(), VfsError> {
        let obj = self.getattr(dir)?;
        if obj.kind != Kind::Dir {
            return Err(VfsError::NotDir);
        }
        if obj.listed || obj.origin.is_none() {
            return Ok(());
        }
        let lock = self.listing_lock(dir);
        let _single_flight = lock.lock().await;
        for _ in 0..LISTING_ATTEMPTS {
            let obj = self.getattr(dir)?;
            let Some(origin) = obj.origin.filter(|_| !obj.listed) else {
                return Ok(());
            };
            if !self.link.is_up() {
                return Err(VfsError::Offline);
            }
            let Some((version, dir_attr, entries)) = self.list_at_origin(origin.id).await? else {
                continue;
            };
            let passed = Arc::clone(&self.passed);
            let done = self
                .blocking(move |cache| {
                    let mut tx = cache.write()?;
                    let mut obj = tx.get(dir)?.ok_or(VfsError::Stale)?;
                    let cached = obj.origin.map_or(0, |o| o.version);
                    if cached > version {
                        // The journal moved past our listing: list again.
                        return Ok(false);
                    }
                    let mut names = HashSet::with_capacity(entries.len());
                    // Names removed or renamed away here are not taken back
                    // from an origin that has not heard yet.
                    let vacated = tx.vacated_names(dir)?;
                    names.extend(vacated.iter().map(String::as_str));
                    let entries: Vec<wire::Entry> = entries
                        .into_iter()
                        .filter(|e| !vacated.contains(&e.name))
                        .map(|e| wire::Entry {
                            attr: passed.newest(&e.attr),
                            name: e.name,
                        })
                        .collect();
                    // New names take the fast path; anything else (known
                    // objects, local changes, a pinned directory whose
                    // entries inherit the pin) goes through upsert_entry.
                    let pinned_dir = obj.pinned;
                    let items: Vec<(&str, FileId, Object)> = entries
                        .iter()
                        .map(|e| {
                            let mut new = coherence::new_object(dir, &e.name, &e.attr);
                            new.pinned = pinned_dir;
                            (e.name.as_str(), e.attr.id, new)
                        })
                        .collect();
                    let rest = tx.insert_new_entries(dir, &items)?;
                    for entry in &entries {
                        names.insert(entry.name.as_str());
                    }
                    for entry in rest.into_iter().map(|i| &entries[i]) {
                        coherence::upsert_entry(
                            &mut tx,
                            dir,
                            &entry.name,
                            &entry.attr,
                            Source::Fetch,
                        )?;
                        names.insert(entry.name.as_str());
                    }
                    // Forget cached names the origin no longer has.
                    let mut cookie = 0;
                    loop {
                        let batch = tx.entries(dir, cookie, 1024)?;
                        let Some(last) = batch.last() else { break };
                        cookie = last.cookie;
                        for e in batch {
                            if !names.contains(e.name.as_str()) {
                                forget_entry(&mut tx, dir, &e)?;
                            }
                        }
                    }
                    coherence::refresh(&mut tx, dir, &mut obj, &dir_attr, Source::Fetch)?;
                    obj.listed = true;
                    tx.put(dir, &obj)?;
                    tx.commit(true)?;
                    Ok(true)
                })
                .await?;
            if done {
                return Ok(());
            }
        }
        Err(VfsError::Io(
            "directory keeps changing at the origin".into(),
        ))
    }

    /// Lists origin directory `id` completely. Returns `None` if it changed
    /// while we paged through it (the pages would not agree).
    async fn list_at_origin(
        &self,
        id: wire::ObjectId,
    ) -> Result<Option<(u64, wire::Attr, Vec<wire::Entry>)>, VfsError> {
        let mut entries = Vec::new();
        let mut after: Option<String> = None;
        let mut first: Option<wire::Attr> = None;
        loop {
            let page = self
                .origin
                .list_page(id, after.as_deref(), LISTING_PAGE)
                .await
                .map_err(|e| self.origin_failed(e))?;
            match &first {
                None => first = Some(page.dir.clone()),
                Some(f) if f.version != page.dir.version => return Ok(None),
                Some(_) => {}
            }
            entries.extend(page.entries);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let dir_attr = first.ok_or_else(|| VfsError::Io("empty listing answer".into()))?;
        Ok(Some((dir_attr.version, dir_attr, entries)))
    }

    /// Up to `limit` entries of `dir` after `cookie`, with their objects.
    pub fn entries_after(
        &self,
        dir: FileId,
        cookie: u64,
        limit: usize,
    ) -> Result<Vec<(DirEntry, Arc<Object>)>, VfsError> {
        // An entry whose object is gone is skipped, not an error: the
        // listing goes on past it.
        Ok(self
            .cache
            .read()?
            .entries_with_objects(dir, cookie, limit)?)
    }
}

/// Drops a cached entry the origin no longer lists (unless it holds local
/// changes, which the reintegrator will settle).
fn forget_entry(
    tx: &mut imz_cache::WriteTxn<'_>,
    dir: FileId,
    entry: &DirEntry,
) -> Result<(), VfsError> {
    let Some(obj) = tx.get(entry.fileid)? else {
        tx.unlink(dir, &entry.name)?;
        return Ok(());
    };
    if obj.origin.is_none() || tx.holds_changes(entry.fileid)? {
        return Ok(());
    }
    tx.unlink(dir, &entry.name)?;
    // One marked to be placed as the origin has it (its name there held
    // by a change of ours, say) is not gone: resync places it.
    if obj.parent == dir && obj.name == entry.name && !tx.marked_for_resync(entry.fileid)? {
        tx.remove_tree(entry.fileid)?;
    }
    Ok(())
}
