//! Folding what the origin says into the cache, keeping it coherent.
//!
//! Two sources feed the cache with origin state: answers to our own
//! requests (a lookup, a directory listing) and the origin's journal. Both
//! go through this module so that one rule holds everywhere:
//!
//! **A cached object's origin version never moves backwards**, and a journal
//! record changes a cached object (or a directory's entries) only if its
//! sequence number is newer than the cached version. A listing or lookup
//! reflects the origin exactly at the version it reports, so records at or
//! below that version are already in it, and records above it are applied.
//!
//! A file's cached chunks are bytes of the version in `origin.version`; when
//! that version moves and the content may have changed, the chunks go.
//! Objects with local changes (`dirty`) keep their local state: the
//! reintegrator settles them with the origin.

use imz_cache::{Attrs, CacheError, FileId, Kind, LOCAL_ID_BASE, Object, OriginRef, WriteTxn};
use imz_origin::wire::{self, Change, Record};

/// Converts origin attributes to the cache's.
pub fn attrs_from(a: &wire::Attr) -> Attrs {
    Attrs {
        size: a.size,
        mode: a.mode & 0o7777,
        uid: a.uid,
        gid: a.gid,
        nlink: a.nlink.max(1),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
    }
}

pub fn kind_from(k: wire::Kind) -> Kind {
    match k {
        wire::Kind::File => Kind::File,
        wire::Kind::Dir => Kind::Dir,
        wire::Kind::Symlink => Kind::Symlink,
    }
}

/// A fresh cache object for origin object `attr`, named `name` in `parent`.
pub fn new_object(parent: FileId, name: &str, attr: &wire::Attr) -> Object {
    Object {
        origin: Some(OriginRef {
            id: attr.id,
            version: attr.version,
        }),
        target: attr.target.clone(),
        origin_extent: if attr.kind == wire::Kind::File {
            attr.size
        } else {
            0
        },
        ..Object::new(
            kind_from(attr.kind),
            parent,
            name.to_owned(),
            attrs_from(attr),
        )
    }
}

/// Where origin state came from, which decides how much of the cached
/// state a version change invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A lookup or listing: the version moved for reasons we do not know,
    /// so cached file data and directory listings are dropped.
    Fetch,
    /// A journal record that says exactly what changed; the caller drops
    /// what that change invalidates.
    Journal,
    /// The origin went back (restored from a backup): its version is the
    /// truth even when lower than ours, and cached content is dropped as
    /// for [`Source::Fetch`].
    Restore,
}

/// Updates cached object `obj` from origin attributes, if they are newer.
/// Returns whether anything changed.
pub fn refresh(
    tx: &mut WriteTxn<'_>,
    fid: FileId,
    obj: &mut Object,
    attr: &wire::Attr,
    source: Source,
) -> Result<bool, CacheError> {
    let cached = obj.origin.map_or(0, |o| o.version);
    let stale = match source {
        Source::Restore => attr.version != cached,
        Source::Fetch | Source::Journal => attr.version > cached,
    };
    // Nor one removed here that a pending record still names (a rename
    // replaces it): the version it has is that record's base, which must
    // not pass for a change made at the origin since.
    if !stale || obj.is_dirty() || obj.removed && obj.log.other > 0 {
        return Ok(false);
    }
    let had_version = obj.origin.is_some();
    obj.origin = Some(OriginRef {
        id: attr.id,
        version: attr.version,
    });
    obj.attrs = attrs_from(attr);
    obj.target = attr.target.clone();
    if matches!(source, Source::Fetch | Source::Restore) && had_version {
        match obj.kind {
            Kind::File => {
                tx.drop_data(fid)?;
                obj.origin_extent = attr.size;
            }
            Kind::Dir => obj.listed = false,
            Kind::Symlink => {}
        }
    }
    Ok(true)
}

/// Makes cached object `fid` (`obj`) the origin's version `attr`, whatever
/// it held here: the origin's attributes and version, and its cached bytes
/// dropped, so that they are read from the origin.
pub fn take_origin_version(
    tx: &mut WriteTxn<'_>,
    fid: FileId,
    obj: &mut Object,
    attr: &wire::Attr,
) -> Result<(), CacheError> {
    obj.origin = Some(OriginRef {
        id: attr.id,
        version: attr.version,
    });
    obj.attrs = attrs_from(attr);
    obj.target = attr.target.clone();
    tx.drop_data(fid)?;
    obj.origin_extent = attr.size;
    Ok(())
}

/// Records that entry `name` of cached directory `dir` is origin object
/// `attr`, creating or moving the cached object as needed. Returns its fileid.
pub fn upsert_entry(
    tx: &mut WriteTxn<'_>,
    dir: FileId,
    name: &str,
    attr: &wire::Attr,
    source: Source,
) -> Result<FileId, CacheError> {
    // A name held by local changes stays ours until the reintegrator has
    // settled it with the origin (a conflict, if both made it).
    if let Some(occupant) = tx.lookup(dir, name)? {
        let occ = tx.object(occupant)?;
        let same = occ.origin.is_some_and(|o| o.id == attr.id);
        if !same && (occ.is_dirty() || occ.is_local()) {
            if source == Source::Journal {
                // The directory's version moves on without this entry:
                // it lists itself again once nothing below it waits
                // (whatever then holds the name at the origin).
                tx.mark_resync(dir)?;
            }
            // Cached here elsewhere (moved there at the origin): it leaves
            // its place here once nothing of ours needs it, or a listing
            // there would forget a file the origin still has.
            if let Some(elsewhere) = tx.by_origin(attr.id)?
                && elsewhere != occupant
            {
                tx.mark_resync(elsewhere)?;
            }
            return Ok(occupant);
        }
    }
    let fid = match tx.by_origin(attr.id)? {
        Some(fid) => {
            let mut obj = tx.object(fid)?;
            if obj.removed && obj.log.ops.is_empty() {
                // Removed here only as what a pending move replaces, and
                // moved away at the origin first (the journal says so, or a
                // listing finds it elsewhere): that move will take the free
                // name (the origin lets it), and this lives on where the
                // origin has it. It comes back here too, as the origin
                // has it: what it held here went with the remove (and may
                // have been writes of ours that the move made moot).
                obj.removed = false;
                take_origin_version(tx, fid, &mut obj, attr)?;
                obj.listed = false;
            }
            refresh(tx, fid, &mut obj, attr, source)?;
            if obj.is_dirty() || obj.removed {
                // Moved or removed here, or changed: where it is stays ours.
                // Removed here, it is nowhere here: note where the origin
                // has it, in case our remove is refused for that (it moved
                // there first) and it comes back.
                if obj.removed {
                    obj.parent = dir;
                    obj.name = name.to_owned();
                } else if obj.parent != dir || obj.name != name {
                    // Moved there while changed here (the journal says so,
                    // or a listing there shows it). The origin takes our
                    // change on the moved file (a move does not conflict
                    // with content), and no record would tell us again:
                    // once the log is done with it, it goes where the
                    // origin has it. So does the directory, which lists
                    // itself again then: it has no entry for it, and the
                    // object may be forgotten before it is placed (by a
                    // listing where it is here).
                    tx.mark_resync(fid)?;
                    tx.mark_resync(dir)?;
                }
                tx.put(fid, &obj)?;
                // The origin's `dir/name` is this object now: an unchanged
                // one cached under that name was replaced there, and
                // nothing here would ever tell us again.
                if let Some(occupant) = tx.lookup(dir, name)?
                    && occupant != fid
                {
                    tx.unlink(dir, name)?;
                    forget_if_orphan(tx, occupant, dir, name)?;
                }
                return Ok(fid);
            }
            if obj.parent != dir || obj.name != name {
                // Renamed at the origin: leave the old place.
                tx.unlink_if(obj.parent, &obj.name, fid)?;
                if source != Source::Journal && obj.parent != dir {
                    // Found elsewhere by a listing or a conflict's answer,
                    // not told by the journal: what the origin has at the
                    // name it left is not known here (a record for it may
                    // have passed while a change of ours held the name), so
                    // that directory is listed again.
                    tx.mark_resync(obj.parent)?;
                }
                obj.parent = dir;
                obj.name = name.to_owned();
                obj.pinned |= pins_entries(tx, dir)?;
            }
            tx.put(fid, &obj)?;
            fid
        }
        None => {
            let fid = if attr.id >= LOCAL_ID_BASE || tx.get(attr.id)?.is_some() {
                // Its number is taken: by the object that was it here and
                // now stands for another one at the origin (created again
                // there after a conflict, while theirs lived on). A fresh
                // fileid; never a stale or wrong one.
                tracing::warn!(
                    origin = attr.id,
                    "origin object's number taken by another cached object: given a fresh fileid"
                );
                tx.alloc_id()?
            } else {
                attr.id
            };
            let mut obj = new_object(dir, name, attr);
            obj.pinned = pins_entries(tx, dir)?;
            tx.put(fid, &obj)?;
            fid
        }
    };
    link_replacing(tx, dir, name, fid)?;
    Ok(fid)
}

/// Whether `dir` is recursively pinned, so that what enters it is pinned.
fn pins_entries(tx: &WriteTxn<'_>, dir: FileId) -> Result<bool, CacheError> {
    Ok(tx.get(dir)?.is_some_and(|d| d.is_dir() && d.pinned))
}

/// Points `dir/name` at `fid`; whatever it named before is forgotten (it
/// is gone or replaced at the origin).
fn link_replacing(
    tx: &mut WriteTxn<'_>,
    dir: FileId,
    name: &str,
    fid: FileId,
) -> Result<(), CacheError> {
    match tx.lookup(dir, name)? {
        Some(old) if old == fid => Ok(()),
        Some(old) => {
            tx.link(dir, name, fid)?;
            forget_if_orphan(tx, old, dir, name)
        }
        None => {
            tx.link(dir, name, fid)?;
            Ok(())
        }
    }
}

/// Deletes object `fid` (and what is below it) if its home entry was
/// `dir/name`, which no longer names it. Objects with local changes, and
/// directories holding one, stay: the reintegrator decides their fate.
fn forget_if_orphan(
    tx: &mut WriteTxn<'_>,
    fid: FileId,
    dir: FileId,
    name: &str,
) -> Result<(), CacheError> {
    let Some(obj) = tx.get(fid)? else {
        return Ok(());
    };
    if obj.parent == dir
        && obj.name == name
        && tx.lookup(dir, name)? != Some(fid)
        && !tx.holds_changes(fid)?
    {
        tx.remove_tree(fid)?;
    }
    Ok(())
}

/// Updates a cached directory's own attributes from a journal record, if
/// the record is newer; returns whether its entries should be changed.
fn touch_parent(
    tx: &mut WriteTxn<'_>,
    parent: &wire::Attr,
    seq: wire::Seq,
) -> Result<Option<FileId>, CacheError> {
    let Some(pfid) = tx.by_origin(parent.id)? else {
        return Ok(None);
    };
    let mut pobj = tx.object(pfid)?;
    if pobj.origin.map_or(0, |o| o.version) >= seq {
        return Ok(None);
    }
    refresh(tx, pfid, &mut pobj, parent, Source::Journal)?;
    // The record's parent attributes may predate this seq (a rename's
    // source side); what matters is that entries are now as of `seq`.
    if let Some(o) = pobj.origin.as_mut() {
        o.version = o.version.max(seq);
    }
    tx.put(pfid, &pobj)?;
    Ok(Some(pfid))
}

/// What applying a record did that the gateway may want to act on.
#[derive(Debug, Default)]
pub struct Applied {
    /// Files whose cached content was dropped or changed (readers to wake,
    /// replicas to refill).
    pub content_changed: Vec<FileId>,
    /// Objects that entered a cached directory (created or moved there).
    pub entered: Vec<FileId>,
    /// Attributes that records gave objects not cached here (nothing to
    /// change): see [`Passed`].
    pub passed: Vec<wire::Attr>,
}

/// Objects most recently noted in [`Passed`].
const PASSED_KEPT: usize = 16_384;

/// The newest attributes journal records gave files and symlinks that were
/// not cached when the follower applied them.
///
/// A lookup or listing answered before such a record, but stored after
/// it, would cache the object as it was before the record, and nothing
/// would correct it: an answer is checked against its directory's
/// version, and a change to a file alone (a write, new attributes, a link
/// count after its other name went) leaves that as it was. Answers are
/// stored through [`Passed::newest`] instead. Directories are left out:
/// their versions also stand for their entries, which these records do not
/// carry.
pub struct Passed(std::sync::Mutex<lru::LruCache<wire::ObjectId, wire::Attr>>);

impl Default for Passed {
    fn default() -> Self {
        let kept = std::num::NonZeroUsize::new(PASSED_KEPT).unwrap_or(std::num::NonZeroUsize::MIN);
        Self(std::sync::Mutex::new(lru::LruCache::new(kept)))
    }
}

impl Passed {
    /// Notes `attrs`, keeping the newest version of each object.
    pub fn note(&self, attrs: &[wire::Attr]) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for attr in attrs.iter().filter(|a| a.kind != wire::Kind::Dir) {
            let newer = map.peek(&attr.id).is_none_or(|a| a.version < attr.version);
            if newer {
                map.put(attr.id, attr.clone());
            }
        }
    }

    /// `attr`, or the newer attributes a record gave the same object.
    pub fn newest(&self, attr: &wire::Attr) -> wire::Attr {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.peek(&attr.id) {
            Some(a) if a.version > attr.version && a.kind == attr.kind => a.clone(),
            _ => attr.clone(),
        }
    }
}

/// Applies one journal record to the cache.
pub fn apply_record(
    tx: &mut WriteTxn<'_>,
    record: &Record,
    applied: &mut Applied,
) -> Result<(), CacheError> {
    apply_record_keeping(tx, record, applied, &[])
}

/// [`apply_record`], where a `Write` record keeps the file's chunks in
/// `kept` (sorted): they were found to hold the new version's bytes too
/// (see [`crate::unchanged`]).
pub fn apply_record_keeping(
    tx: &mut WriteTxn<'_>,
    record: &Record,
    applied: &mut Applied,
    kept: &[u64],
) -> Result<(), CacheError> {
    let seq = record.seq;
    match &record.change {
        Change::Create { parent, name, attr } => {
            if let Some(pfid) = touch_parent(tx, parent, seq)? {
                let fid = upsert_entry(tx, pfid, name, attr, Source::Journal)?;
                applied.entered.push(fid);
            }
        }
        Change::Write { attr } | Change::Truncate { attr } | Change::SetAttr { attr } => {
            let Some(fid) = tx.by_origin(attr.id)? else {
                applied.passed.push(attr.clone());
                return Ok(());
            };
            let mut obj = tx.object(fid)?;
            let old_size = obj.attrs.size;
            if !refresh(tx, fid, &mut obj, attr, Source::Journal)? {
                return Ok(());
            }
            match &record.change {
                Change::Write { .. } if obj.kind == Kind::File => {
                    tx.drop_chunks_except(fid, kept)?;
                    obj.origin_extent = attr.size;
                    applied.content_changed.push(fid);
                }
                Change::Truncate { .. } if obj.kind == Kind::File => {
                    // Bytes below the new size are unchanged; cut the rest.
                    obj.attrs.size = old_size;
                    tx.truncate_data(fid, &mut obj, attr.size)?;
                    applied.content_changed.push(fid);
                }
                _ => {}
            }
            tx.put(fid, &obj)?;
        }
        Change::Remove { parent, name, id } => {
            if let Some(pfid) = touch_parent(tx, parent, seq)? {
                let target = tx.by_origin(*id)?;
                let dirty = match target {
                    Some(t) => tx.holds_changes(t)?,
                    None => false,
                };
                // A file changed here stays until the reintegrator settles
                // it (update/remove), and so does a directory holding one
                // (its file is created again in it).
                if !dirty && target.is_some() && tx.lookup(pfid, name)? == target {
                    tx.unlink(pfid, name)?;
                    if let Some(fid) = target {
                        forget_if_orphan(tx, fid, pfid, name)?;
                    }
                }
            }
        }
        Change::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name,
            attr,
            replaced: _,
        } => {
            let from = touch_parent(tx, from_parent, seq)?;
            let to = if to_parent.id == from_parent.id {
                from
            } else {
                touch_parent(tx, to_parent, seq)?
            };
            let fid = tx.by_origin(attr.id)?;
            // An object with local changes stays where it is here; the
            // reintegrator settles any rename/rename.
            let dirty = match fid {
                Some(f) => tx.get(f)?.is_some_and(|o| o.is_dirty()),
                None => false,
            };
            if let (Some(pfid), Some(fid)) = (from, fid)
                && !dirty
                && tx.lookup(pfid, from_name)? == Some(fid)
            {
                tx.unlink(pfid, from_name)?;
            }
            match to {
                Some(tfid) => {
                    let fid = upsert_entry(tx, tfid, to_name, attr, Source::Journal)?;
                    applied.entered.push(fid);
                }
                None => {
                    // Moved out of what we cache: forget it.
                    if let (Some(pfid), Some(fid)) = (from, fid) {
                        forget_if_orphan(tx, fid, pfid, from_name)?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use imz_cache::{Cache, ROOT_FILEID};

    pub(crate) fn attr(id: u64, kind: wire::Kind, version: u64, size: u64) -> wire::Attr {
        wire::Attr {
            id,
            kind,
            version,
            size,
            mode: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            atime: 0,
            mtime: version as i64,
            ctime: version as i64,
            target: None,
        }
    }

    fn setup() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 1 << 30).expect("open");
        let mut tx = cache.write().expect("write");
        tx.put(
            ROOT_FILEID,
            &new_object(ROOT_FILEID, "", &attr(1, wire::Kind::Dir, 1, 0)),
        )
        .expect("root");
        tx.commit(false).expect("commit");
        (dir, cache)
    }

    fn rec(seq: u64, change: Change) -> Record {
        Record {
            seq,
            time: 0,
            key: None,
            change,
        }
    }

    /// File `name` in the root, cached as origin object `id` at `version`.
    fn cached_file(tx: &mut WriteTxn<'_>, name: &str, id: u64, version: u64) -> FileId {
        upsert_entry(
            tx,
            ROOT_FILEID,
            name,
            &attr(id, wire::Kind::File, version, 1),
            Source::Fetch,
        )
        .expect("upsert")
    }

    /// Directory `name` in the root, cached as origin object `id`.
    fn cached_dir(tx: &mut WriteTxn<'_>, name: &str, id: u64) -> FileId {
        upsert_entry(
            tx,
            ROOT_FILEID,
            name,
            &attr(id, wire::Kind::Dir, 2, 0),
            Source::Fetch,
        )
        .expect("upsert")
    }

    /// Applies the journal's record `seq`: origin object `id` moved from
    /// `from` to `to` in the root, replacing object `replaced`.
    fn apply_rename_in_root(
        tx: &mut WriteTxn<'_>,
        seq: u64,
        (from, to): (&str, &str),
        id: u64,
        replaced: Option<u64>,
    ) {
        let dir = attr(1, wire::Kind::Dir, seq, 0);
        apply_record(
            tx,
            &rec(
                seq,
                Change::Rename {
                    from_parent: dir.clone(),
                    from_name: from.into(),
                    to_parent: dir,
                    to_name: to.into(),
                    attr: attr(id, wire::Kind::File, seq, 1),
                    replaced,
                },
            ),
            &mut Applied::default(),
        )
        .expect("apply");
    }

    /// A lookup answered before a record about a file not cached yet, and
    /// stored after it, must not cache the file as it was before.
    #[test]
    fn an_answer_older_than_a_record_passed_by_takes_the_record_s_attributes() {
        let (_d, cache) = setup();
        let passed = Passed::default();
        let answered = attr(7, wire::Kind::File, 10, 3);
        let mut later = attr(7, wire::Kind::File, 12, 3);
        later.nlink = 2;
        let mut tx = cache.write().expect("write");
        let mut applied = Applied::default();
        apply_record(
            &mut tx,
            &rec(
                12,
                Change::SetAttr {
                    attr: later.clone(),
                },
            ),
            &mut applied,
        )
        .expect("apply");
        assert_eq!(tx.by_origin(7).expect("by_origin"), None, "not cached");
        passed.note(&applied.passed);
        let fid = upsert_entry(
            &mut tx,
            ROOT_FILEID,
            "f",
            &passed.newest(&answered),
            Source::Fetch,
        )
        .expect("upsert");
        let obj = tx.object(fid).expect("object");
        assert_eq!(obj.origin.map(|o| o.version), Some(12));
        assert_eq!(obj.attrs.nlink, 2);
        // An answer newer than the record stands.
        let newer = attr(7, wire::Kind::File, 15, 9);
        assert_eq!(passed.newest(&newer).version, 15);
        // Directories are not taken from records.
        let dir = attr(8, wire::Kind::Dir, 3, 0);
        passed.note(&[attr(8, wire::Kind::Dir, 5, 0)]);
        assert_eq!(passed.newest(&dir).version, 3);
    }

    #[test]
    fn only_a_restored_origin_takes_a_file_back_to_a_lower_version() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = 7;
        let mut obj = new_object(fid, "f", &attr(7, wire::Kind::File, 10, 3));
        tx.put(fid, &obj).expect("put");
        tx.put_chunk(fid, 0, b"new").expect("chunk");
        let older = attr(7, wire::Kind::File, 4, 6);
        for source in [Source::Fetch, Source::Journal] {
            assert!(!refresh(&mut tx, fid, &mut obj, &older, source).expect("refresh"));
        }
        assert_eq!(obj.origin.map(|o| o.version), Some(10));
        assert!(refresh(&mut tx, fid, &mut obj, &older, Source::Restore).expect("refresh"));
        assert_eq!(obj.origin.map(|o| o.version), Some(4));
        assert_eq!(obj.attrs.size, 6);
        assert!(!tx.has_chunk(fid, 0).expect("has"), "old content dropped");
    }

    #[test]
    fn stale_records_do_not_undo_newer_listings() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        // A listing at dir version 10 already shows `b`.
        upsert_entry(
            &mut tx,
            ROOT_FILEID,
            "b",
            &attr(5, wire::Kind::File, 9, 3),
            Source::Fetch,
        )
        .expect("upsert");
        let mut root = tx.object(ROOT_FILEID).expect("root");
        root.origin = Some(OriginRef { id: 1, version: 10 });
        tx.put(ROOT_FILEID, &root).expect("put");
        // An older record removing `b` (seq 8) must not apply...
        let mut applied = Applied::default();
        apply_record(
            &mut tx,
            &rec(
                8,
                Change::Remove {
                    parent: attr(1, wire::Kind::Dir, 8, 0),
                    name: "b".into(),
                    id: 5,
                },
            ),
            &mut applied,
        )
        .expect("apply");
        assert!(tx.lookup(ROOT_FILEID, "b").expect("lookup").is_some());
        // ...but a newer one does.
        apply_record(
            &mut tx,
            &rec(
                11,
                Change::Remove {
                    parent: attr(1, wire::Kind::Dir, 11, 0),
                    name: "b".into(),
                    id: 5,
                },
            ),
            &mut applied,
        )
        .expect("apply");
        assert!(tx.lookup(ROOT_FILEID, "b").expect("lookup").is_none());
        assert!(
            tx.by_origin(5).expect("by_origin").is_none(),
            "removed object still cached"
        );
    }

    #[test]
    fn write_record_drops_chunks_and_setattr_keeps_them() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = upsert_entry(
            &mut tx,
            ROOT_FILEID,
            "f",
            &attr(7, wire::Kind::File, 2, 4),
            Source::Fetch,
        )
        .expect("upsert");
        tx.put_chunk(fid, 0, b"abcd").expect("chunk");
        let mut applied = Applied::default();
        let mut chmod = attr(7, wire::Kind::File, 3, 4);
        chmod.mode = 0o600;
        apply_record(
            &mut tx,
            &rec(3, Change::SetAttr { attr: chmod }),
            &mut applied,
        )
        .expect("apply");
        assert!(tx.has_chunk(fid, 0).expect("has"));
        assert_eq!(tx.object(fid).expect("obj").attrs.mode, 0o600);
        apply_record(
            &mut tx,
            &rec(
                4,
                Change::Write {
                    attr: attr(7, wire::Kind::File, 4, 9),
                },
            ),
            &mut applied,
        )
        .expect("apply");
        assert!(!tx.has_chunk(fid, 0).expect("has"));
        let obj = tx.object(fid).expect("obj");
        assert_eq!((obj.attrs.size, obj.origin_extent), (9, 9));
        assert_eq!(applied.content_changed, vec![fid]);
    }

    #[test]
    fn rename_keeps_the_fileid_and_replaces_the_target() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let a = cached_file(&mut tx, "a", 7, 2);
        let b = cached_file(&mut tx, "b", 8, 3);
        apply_rename_in_root(&mut tx, 5, ("a", "b"), 7, Some(8));
        assert_eq!(tx.lookup(ROOT_FILEID, "b").expect("lookup"), Some(a));
        assert_eq!(tx.lookup(ROOT_FILEID, "a").expect("lookup"), None);
        assert!(
            tx.get(b).expect("get").is_none(),
            "replaced object still cached"
        );
        assert_eq!(tx.object(a).expect("a").name, "b");
    }

    /// Seed 1795809546963891659 of the conflict model: a file removed here
    /// (its remove not yet sent) is moved at the origin over a name that
    /// holds an unchanged file here. The removed file stays ours, but the
    /// file it replaced is gone at the origin and must not be served.
    #[test]
    fn a_file_removed_here_moved_over_another_at_the_origin_replaces_it_here_too() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let moved = cached_file(&mut tx, "d", 38, 2);
        let replaced = cached_file(&mut tx, "a", 31, 3);
        // Removed here, its record waiting for the origin.
        tx.unlink(ROOT_FILEID, "d").expect("unlink");
        tx.log(
            imz_cache::LogOp::Remove {
                parent: ROOT_FILEID,
                name: "d".into(),
                fid: moved,
            },
            0,
        )
        .expect("log");
        let mut obj = tx.object(moved).expect("moved");
        obj.removed = true;
        tx.put(moved, &obj).expect("put");
        apply_rename_in_root(&mut tx, 5, ("d", "a"), 38, Some(31));
        assert_eq!(tx.lookup(ROOT_FILEID, "a").expect("lookup"), None);
        assert!(
            tx.get(replaced).expect("get").is_none(),
            "replaced object still cached"
        );
        let obj = tx.object(moved).expect("moved");
        assert!(obj.removed, "our remove still stands");
        assert_eq!(
            obj.name, "a",
            "where the origin has it, should it come back"
        );
    }

    /// Changed here, moved at the origin: it stays where it is here (its
    /// change may still conflict), and is marked to be placed where the
    /// origin has it once the log is done with it.
    #[test]
    fn a_file_changed_here_and_moved_at_the_origin_is_marked_to_be_placed_again() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let f = cached_file(&mut tx, "a", 7, 2);
        tx.log(imz_cache::LogOp::Store { fid: f }, 0).expect("log");
        apply_rename_in_root(&mut tx, 5, ("a", "b"), 7, None);
        assert_eq!(tx.lookup(ROOT_FILEID, "a").expect("lookup"), Some(f));
        assert_eq!(tx.lookup(ROOT_FILEID, "b").expect("lookup"), None);
        assert_eq!(
            tx.resync_marks().expect("marks"),
            vec![ROOT_FILEID, f],
            "the file, and the directory its entry is missing from"
        );
    }

    /// Conflict model seed 1795813211769314221: a file replaced here by a
    /// pending move, and moved away at the origin first. The move will take
    /// the free name; the file lives on at the origin, and comes back here
    /// where it went, with the origin's content (what it held here went
    /// with the remove). Seed 1795818573615050985: the same when a listing
    /// finds it there, not the journal (it moved into a directory that was
    /// removed here, and that came back).
    #[test]
    fn a_file_replaced_here_and_moved_away_at_the_origin_comes_back_where_it_went() {
        for by_listing in [false, true] {
            let (_d, cache) = setup();
            let mut tx = cache.write().expect("write");
            let replaced = cached_file(&mut tx, "a", 30, 2);
            let ours = cached_file(&mut tx, "b", 17, 3);
            tx.put_chunk(replaced, 0, b"x").expect("chunk");
            // b moved over a here, its record waiting for the origin.
            tx.unlink(ROOT_FILEID, "a").expect("unlink");
            tx.unlink(ROOT_FILEID, "b").expect("unlink");
            tx.link(ROOT_FILEID, "a", ours).expect("link");
            let mut obj = tx.object(replaced).expect("replaced");
            obj.removed = true;
            obj.origin_extent = 0;
            tx.put(replaced, &obj).expect("put");
            tx.drop_data(replaced).expect("drop");
            tx.log(
                imz_cache::LogOp::Rename {
                    from_parent: ROOT_FILEID,
                    from_name: "b".into(),
                    fid: ours,
                    to_parent: ROOT_FILEID,
                    to_name: "a".into(),
                    replaced: Some(replaced),
                },
                0,
            )
            .expect("log");
            if by_listing {
                let moved = attr(30, wire::Kind::File, 5, 2);
                upsert_entry(&mut tx, ROOT_FILEID, "c", &moved, Source::Fetch).expect("upsert");
            } else {
                apply_rename_in_root(&mut tx, 5, ("a", "c"), 30, None);
            }
            assert_eq!(tx.lookup(ROOT_FILEID, "c").expect("lookup"), Some(replaced));
            assert_eq!(tx.lookup(ROOT_FILEID, "a").expect("lookup"), Some(ours));
            let obj = tx.object(replaced).expect("replaced");
            assert!(!obj.removed, "by listing: {by_listing}");
            assert_eq!(obj.origin.map(|o| o.version), Some(5));
            assert_eq!(
                obj.origin_extent, obj.attrs.size,
                "its bytes are read from the origin"
            );
        }
    }

    /// A journal record naming a name a change of ours holds leaves the
    /// entry to ours; the directory is marked to be listed again once our
    /// change is sent (seed 1795815892189287563 of the conflict model's
    /// second flavor). A listing that finds a cached file in another
    /// directory marks the one it left.
    #[test]
    fn names_left_unlinked_mark_their_directories_for_resync() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let ours = cached_file(&mut tx, "d", 7, 2);
        tx.log(imz_cache::LogOp::Store { fid: ours }, 0)
            .expect("log");
        let dir = attr(1, wire::Kind::Dir, 5, 0);
        apply_record(
            &mut tx,
            &rec(
                5,
                Change::Create {
                    parent: dir,
                    name: "d".into(),
                    attr: attr(9, wire::Kind::File, 5, 1),
                },
            ),
            &mut Applied::default(),
        )
        .expect("apply");
        assert_eq!(tx.lookup(ROOT_FILEID, "d").expect("lookup"), Some(ours));
        assert_eq!(tx.resync_marks().expect("marks"), vec![ROOT_FILEID]);
        tx.unmark_resync(ROOT_FILEID).expect("unmark");

        let sub = cached_dir(&mut tx, "sub", 20);
        let other = cached_file(&mut tx, "e", 8, 2);
        upsert_entry(
            &mut tx,
            sub,
            "e",
            &attr(8, wire::Kind::File, 6, 1),
            Source::Fetch,
        )
        .expect("listing of sub");
        assert_eq!(tx.lookup(sub, "e").expect("lookup"), Some(other));
        assert_eq!(tx.resync_marks().expect("marks"), vec![ROOT_FILEID]);
    }
}
