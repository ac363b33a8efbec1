//! Resync: after a conflict, placing the objects it touched where the
//! origin has them, with the origin's attributes.
//!
//! While an object has local changes, the journal follower leaves it where
//! it is here (its move or removal at the origin waits for the
//! reintegrator), yet the journal's directory versions move on: nothing
//! would ever tell the gateway again. Settling a conflict may also bring an
//! object back at a place, or with a version, that the origin has changed
//! since. So settlement marks what it touched (durably, in the cache's
//! `resync` table), and once the log no longer refers to a marked object it
//! is asked for at the origin (`GET /v1/objects/{id}/place`) and put where
//! and as the origin has it: moved, refreshed, or forgotten if gone.

use imz_cache::{FileId, ROOT_FILEID};
use imz_origin::wire;

use crate::coherence::{self, Source};
use crate::vfs::{Vfs, VfsError};

/// Marks `fids` to be placed again once the log is done with them.
pub async fn mark(vfs: &Vfs, fids: Vec<FileId>) -> Result<(), VfsError> {
    vfs.writer
        .run(0, move |tx| {
            for fid in fids {
                tx.mark_resync(fid)?;
            }
            Ok(())
        })
        .await
}

/// Whether marked objects wait to be placed again.
pub fn pending(vfs: &Vfs) -> Result<bool, VfsError> {
    Ok(!vfs.cache.read()?.resync_marks()?.is_empty())
}

/// Places every marked object that the log no longer refers to.
pub async fn run(vfs: &Vfs) -> Result<(), VfsError> {
    let marks = vfs.cache.read()?.resync_marks()?;
    if marks.is_empty() {
        return Ok(());
    }
    if !vfs.origin.knows_places() {
        // An older origin: the directories list themselves again instead.
        return forget_listings(vfs, marks).await;
    }
    for fid in marks {
        place_one(vfs, fid).await?;
    }
    Ok(())
}

/// Places object `fid` where and as the origin has it, unless the log
/// still refers to it (then a mark on it stays).
pub async fn place_one(vfs: &Vfs, fid: FileId) -> Result<(), VfsError> {
    let (obj, busy, origin_id, stands_for) = {
        let rx = vfs.cache.read()?;
        let obj = rx.get(fid)?;
        let stands_for = match obj.as_ref().and_then(|o| o.origin) {
            Some(o) => rx.by_origin(o.id)?,
            None => None,
        };
        (
            obj,
            rx.needed_by_log(fid)?,
            rx.resync_origin(fid)?,
            stands_for,
        )
    };
    let Some(obj) = obj else {
        if let Some(id) = origin_id {
            return place_gone(vfs, fid, id).await;
        }
        return unmark(vfs, fid).await;
    };
    if busy {
        return Ok(());
    }
    let Some(origin) = obj.origin else {
        return unmark(vfs, fid).await;
    };
    if stands_for != Some(fid) {
        // Another cached object stands for that origin object now (ours,
        // merged with theirs as one directory): it is the one to place.
        return unmark(vfs, fid).await;
    }
    let place = vfs
        .origin
        .place(origin.id)
        .await
        .map_err(|e| vfs.origin_failed(e))?;
    // Directories this leaves unlisted, listed again at once: a directory
    // that is not listed cannot answer for a name it lacks while the
    // origin is away.
    let unlisted = vfs
        .writer
        .run(0, move |tx| {
            let Some(mut obj) = tx.get(fid)? else {
                tx.unmark_resync(fid)?;
                return Ok(Vec::new());
            };
            // Changed here again since it was asked for (or something
            // below it): placed once the log is done with that too.
            if tx.needed_by_log(fid)? {
                return Ok(Vec::new());
            }
            tx.unmark_resync(fid)?;
            // The name it leaves here may be the origin's for another
            // object, which the follower could not link while ours held
            // it: that directory is listed again.
            let (was_in, was_named) = (obj.parent, obj.name.clone());
            let relist_if_left = |tx: &mut imz_cache::WriteTxn<'_>,
                                  mut unlisted: Vec<FileId>|
             -> Result<Vec<FileId>, VfsError> {
                if tx.lookup(was_in, &was_named)? != Some(fid)
                    && let Some(mut dir) = tx.get(was_in)?.filter(|d| d.is_dir())
                {
                    dir.listed = false;
                    tx.put(was_in, &dir)?;
                    unlisted.push(was_in);
                }
                Ok(unlisted)
            };
            let Some(place) = place else {
                // Gone at the origin.
                tx.unlink_if(obj.parent, &obj.name, fid)?;
                tx.remove_tree(fid)?;
                return relist_if_left(tx, Vec::new());
            };
            if obj.origin.map_or(0, |o| o.version) > place.attr.version {
                // The journal has brought newer news meanwhile.
                return Ok(Vec::new());
            }
            coherence::refresh(tx, fid, &mut obj, &place.attr, Source::Fetch)?;
            let mut unlisted = Vec::new();
            if obj.is_dir() {
                obj.listed = false;
                unlisted.push(fid);
            }
            tx.put(fid, &obj)?;
            if fid == ROOT_FILEID {
                return Ok(unlisted);
            }
            match cached_dir_of(tx, &place)? {
                Some(dir) => {
                    let there =
                        coherence::upsert_entry(tx, dir, &place.name, &place.attr, Source::Fetch)?;
                    if there != fid {
                        // A change of ours holds that name here. Ours
                        // leaves the name it has (not its name at the
                        // origin, where another may stand, and a listing
                        // would forget it for that one) and is placed once
                        // that change is settled.
                        tx.unlink_if(obj.parent, &obj.name, fid)?;
                        obj.parent = dir;
                        obj.name = place.name.clone();
                        tx.put(fid, &obj)?;
                        tx.mark_resync(fid)?;
                    }
                }
                None => {
                    // Outside what we cache now.
                    tx.unlink_if(obj.parent, &obj.name, fid)?;
                    tx.remove_tree(fid)?;
                    unlisted.retain(|d| *d != fid);
                }
            }
            relist_if_left(tx, unlisted)
        })
        .await?;
    for dir in unlisted {
        if let Err(e) = vfs.ensure_listed(dir).await {
            tracing::debug!(dir, error = %e, "listing again after placing: left for later");
        }
    }
    tracing::debug!(fid, origin = origin.id, "placed again as at the origin");
    Ok(())
}

/// Marked object `fid`, origin object `id`, went from the cache before it
/// was placed (the log released it: a move of ours replaced it here, and
/// the origin, where it had moved away first, took the free name). What
/// the origin has is cached where it is, if that directory is.
async fn place_gone(vfs: &Vfs, fid: FileId, id: wire::ObjectId) -> Result<(), VfsError> {
    let place = vfs
        .origin
        .place(id)
        .await
        .map_err(|e| vfs.origin_failed(e))?;
    vfs.writer
        .run(0, move |tx| {
            tx.unmark_resync(fid)?;
            let Some(place) = place else {
                return Ok(());
            };
            if tx.by_origin(id)?.is_some() {
                // Cached again meanwhile (a listing, the journal).
                return Ok(());
            }
            if let Some(dir) = cached_dir_of(tx, &place)? {
                coherence::upsert_entry(tx, dir, &place.name, &place.attr, Source::Fetch)?;
            }
            Ok(())
        })
        .await?;
    tracing::debug!(
        fid,
        origin = id,
        "placed again as at the origin, after it left the cache"
    );
    Ok(())
}

/// The directory the origin has `place` in, if it is cached here (and not
/// removed here).
fn cached_dir_of(
    tx: &imz_cache::WriteTxn<'_>,
    place: &wire::Place,
) -> Result<Option<FileId>, VfsError> {
    match tx.by_origin(place.parent)? {
        Some(dir) if tx.live_dir(dir)? => Ok(Some(dir)),
        _ => Ok(None),
    }
}

async fn unmark(vfs: &Vfs, fid: FileId) -> Result<(), VfsError> {
    vfs.writer
        .run(0, move |tx| {
            tx.unmark_resync(fid)?;
            Ok(())
        })
        .await
}

/// Without places: marked directories, and those holding marked objects,
/// are listed again when next used.
async fn forget_listings(vfs: &Vfs, marks: Vec<FileId>) -> Result<(), VfsError> {
    vfs.writer
        .run(0, move |tx| {
            for fid in marks {
                let Some(obj) = tx.get(fid)? else {
                    tx.unmark_resync(fid)?;
                    continue;
                };
                if tx.needed_by_log(fid)? {
                    continue;
                }
                tx.unmark_resync(fid)?;
                for dir in [fid, obj.parent] {
                    if let Some(mut d) = tx.get(dir)?.filter(|d| d.is_dir()) {
                        d.listed = false;
                        tx.put(dir, &d)?;
                    }
                }
            }
            Ok(())
        })
        .await
}

/// What a conflict on `op` touched: the object, the one a rename replaces,
/// the directories named, and the origin's object `current`.
pub fn touched(vfs: &Vfs, op: &imz_cache::LogOp, current: Option<&wire::Attr>) -> Vec<FileId> {
    use imz_cache::LogOp;
    let mut fids = vec![op.primary()];
    match op {
        LogOp::Create { parent, .. } | LogOp::Remove { parent, .. } => fids.push(*parent),
        LogOp::Rename {
            from_parent,
            to_parent,
            replaced,
            ..
        } => {
            fids.extend([*from_parent, *to_parent]);
            fids.extend(*replaced);
        }
        _ => {}
    }
    if let Some(attr) = current
        && let Ok(Some(fid)) = vfs.cache.read().and_then(|rx| rx.by_origin(attr.id))
    {
        fids.push(fid);
    }
    fids.sort_unstable();
    fids.dedup();
    fids
}
