//! The client modification log (CML): the changes made at the gateway that
//! the origin does not have yet, in the order they were made.
//!
//! Records live in the `log` table under increasing sequence numbers and
//! are appended in the same transaction as the change they describe, so
//! the cache and its log never disagree. Every object a record names keeps
//! a reference ([`LogRefs`]) and is not deleted before the record is done.
//!
//! The log is kept short the way Coda kept it:
//! - a file's content travels as one `Store` however many writes made it
//!   (the bytes are read from the cache when the record is shipped);
//! - attribute changes to one object merge into one `SetAttr` (except a
//!   grow after a shrink, which must zero what lies between), and a size
//!   or mtime change is dropped when a `Store` will carry the content (and
//!   the mtime) anyway; a size change carries the mtime it gave the file,
//!   so that the origin takes it rather than its own clock's;
//! - removing an object that never reached the origin cancels its whole
//!   history (create, stores, renames), and a rename of such an object
//!   just renames its pending create.
//!
//! Records once sent to the origin are marked `shipped` (durably, before
//! they are sent): the origin may have applied them under their key, so
//! they are never rewritten, cancelled or extended afterwards; a later write
//! to the same file starts a new upload.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{CacheError, Result};
use crate::object::{FileId, Kind, LogRefs, Object};
use crate::store::WriteTxn;

/// Attribute changes; `None` fields are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<i64>,
    pub mtime: Option<i64>,
}

impl SetAttrs {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Later changes win.
    pub fn merge(&mut self, later: &SetAttrs) {
        macro_rules! take {
            ($($f:ident),*) => {$( if later.$f.is_some() { self.$f = later.$f; } )*};
        }
        take!(mode, uid, gid, size, atime, mtime);
    }
}

/// One logged change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogOp {
    /// `fid` was created as `parent/name`; its kind, symlink target and
    /// attributes are read from the object when shipped.
    Create {
        parent: FileId,
        name: String,
        fid: FileId,
        kind: Kind,
    },
    /// The content of file `fid` changed.
    Store { fid: FileId },
    /// Attributes of `fid` changed.
    SetAttr { fid: FileId, set: SetAttrs },
    /// `parent/name`, object `fid`, was removed.
    Remove {
        parent: FileId,
        name: String,
        fid: FileId,
    },
    /// `from_parent/from_name` (object `fid`) moved to `to_parent/to_name`,
    /// replacing `replaced` if it was there.
    Rename {
        from_parent: FileId,
        from_name: String,
        fid: FileId,
        to_parent: FileId,
        to_name: String,
        replaced: Option<FileId>,
    },
}

impl LogOp {
    /// The object the record is about.
    pub fn primary(&self) -> FileId {
        match self {
            Self::Create { fid, .. }
            | Self::Store { fid }
            | Self::SetAttr { fid, .. }
            | Self::Remove { fid, .. }
            | Self::Rename { fid, .. } => *fid,
        }
    }

    /// Other objects the record names.
    pub fn others(&self) -> Vec<FileId> {
        match self {
            Self::Create { parent, .. } | Self::Remove { parent, .. } => vec![*parent],
            Self::Store { .. } | Self::SetAttr { .. } => vec![],
            Self::Rename {
                from_parent,
                to_parent,
                replaced,
                ..
            } => {
                let mut v = vec![*from_parent, *to_parent];
                v.extend(replaced);
                v
            }
        }
    }
}

/// A log record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// When it was logged (nanoseconds since the epoch).
    pub time: i64,
    pub op: LogOp,
    /// Sent to the origin at least once, so the origin may have applied it
    /// under its key: it is never rewritten, cancelled or extended after.
    pub shipped: bool,
}

/// Records which pending record of its kind `seq` is.
fn set_slot(refs: &mut LogRefs, op: &LogOp, seq: u64) {
    match op {
        LogOp::Create { .. } => refs.create = Some(seq),
        LogOp::Store { .. } => refs.store = Some(seq),
        LogOp::SetAttr { .. } => refs.setattr = Some(seq),
        LogOp::Remove { .. } | LogOp::Rename { .. } => {}
    }
}

fn clear_slots(refs: &mut LogRefs, seq: u64) {
    for slot in [&mut refs.create, &mut refs.store, &mut refs.setattr] {
        if *slot == Some(seq) {
            *slot = None;
        }
    }
}

pub(crate) fn encode(record: &LogRecord) -> Result<Vec<u8>> {
    postcard::to_allocvec(record).map_err(|e| CacheError::corrupt(format!("log record: {e}")))
}

pub fn decode(bytes: &[u8]) -> Result<LogRecord> {
    postcard::from_bytes(bytes).map_err(|e| CacheError::corrupt(format!("log record: {e}")))
}

impl WriteTxn<'_> {
    /// The pending records that carry `fid`'s content or attributes (its
    /// stores and attribute changes: a shrink and a later regrowth are two
    /// records, only the last of them in a slot), shipped or not.
    pub fn content_records(&self, fid: FileId) -> Result<Vec<u64>> {
        let Some(obj) = self.get(fid)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for seq in obj.log.ops {
            if let Some(rec) = self.log_record(seq)?
                && matches!(rec.op, LogOp::Store { .. } | LogOp::SetAttr { .. })
            {
                out.push(seq);
            }
        }
        Ok(out)
    }

    /// Drops `fid`'s content and attribute records not yet shipped.
    fn drop_unshipped_content_records(&mut self, fid: FileId) -> Result<()> {
        for seq in self.content_records(fid)? {
            if !self.is_shipped(seq)? {
                self.log_done(seq)?;
            }
        }
        Ok(())
    }

    /// Whether record `seq` may already be at the origin.
    pub fn is_shipped(&self, seq: u64) -> Result<bool> {
        Ok(self.log_record(seq)?.is_some_and(|r| r.shipped))
    }

    /// Marks record `seq` shipped, if it still is exactly `expected` (the
    /// bytes the caller read when planning what to send). Returns whether
    /// it was.
    pub fn log_mark_shipped(&mut self, seq: u64, expected: &[u8]) -> Result<bool> {
        match self.log_bytes(seq)? {
            Some(bytes) if bytes == expected => {
                let mut rec = decode(&bytes)?;
                if !rec.shipped {
                    rec.shipped = true;
                    self.put_log(seq, &encode(&rec)?)?;
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The origin refused record `seq` (a conflict): it does not have it,
    /// so the record may again be rewritten or cancelled.
    pub fn log_unmark_shipped(&mut self, seq: u64) -> Result<()> {
        if let Some(mut rec) = self.log_record(seq)?
            && rec.shipped
        {
            rec.shipped = false;
            self.put_log(seq, &encode(&rec)?)?;
        }
        Ok(())
    }

    /// Names of directory `dir` that pending records took away (a remove,
    /// or a rename from there). The origin may show them until those
    /// records are done, as the object it had there, or as one this cache
    /// created and has not heard the origin's id for yet (an answer lost
    /// in a crash); either way its answers about these names are not to be
    /// taken in.
    pub fn vacated_names(&self, dir: FileId) -> Result<HashSet<String>> {
        let mut names = HashSet::new();
        if self.get(dir)?.is_none_or(|d| d.log.other == 0) {
            return Ok(names);
        }
        let mut from = 0;
        loop {
            let batch = self.log_records(from, 1024)?;
            let Some((last, _)) = batch.last() else {
                break;
            };
            from = last + 1;
            for (_, bytes) in &batch {
                match decode(bytes)?.op {
                    LogOp::Remove { parent, name, .. } if parent == dir => {
                        names.insert(name);
                    }
                    LogOp::Rename {
                        from_parent,
                        from_name,
                        ..
                    } if from_parent == dir => {
                        names.insert(from_name);
                    }
                    _ => {}
                }
            }
        }
        Ok(names)
    }

    fn obj_mut<R>(&mut self, fid: FileId, f: impl FnOnce(&mut Object) -> R) -> Result<R> {
        let mut obj = self.object(fid)?;
        let r = f(&mut obj);
        self.put_with_log(fid, &obj)?;
        Ok(r)
    }

    /// Logs `op` (made at `time`), keeping the log short. Returns the
    /// sequence number of the record that now carries the change, or `None`
    /// if the change cancelled out.
    ///
    /// Call it after the change itself is applied to the cache (for a
    /// remove: after the entry is unlinked).
    pub fn log(&mut self, op: LogOp, time: i64) -> Result<Option<u64>> {
        let fid = op.primary();
        let refs = self.object(fid)?.log;
        match &op {
            LogOp::Store { .. } => {
                // One upload carries all writes: it reads the content when
                // shipped. Once shipped, later writes need a new upload.
                if let Some(seq) = refs.store
                    && !self.is_shipped(seq)?
                {
                    return Ok(Some(seq));
                }
                // The upload carries the final size and mtime too: a
                // pending size change would only undo them (an upload may
                // travel with the object's create, ahead of the size
                // change).
                let setattr = match refs.setattr {
                    Some(s) if !self.is_shipped(s)? => Some(s),
                    _ => None,
                };
                if let Some(seq) = setattr {
                    let mut rec = self
                        .log_record(seq)?
                        .ok_or_else(|| CacheError::corrupt("setattr record vanished"))?;
                    if let LogOp::SetAttr { set, .. } = &mut rec.op {
                        set.size = None;
                        set.mtime = None;
                        if set.is_empty() {
                            self.log_done(seq)?;
                        } else {
                            self.put_log(seq, &encode(&rec)?)?;
                        }
                    }
                }
            }
            LogOp::SetAttr { set, .. } => {
                let mut set = set.clone();
                // An upload not yet shipped will carry the new size, and
                // the mtime the file has then.
                let store_pending = match refs.store {
                    Some(s) => !self.is_shipped(s)?,
                    None => false,
                };
                if store_pending {
                    set.size = None;
                    set.mtime = None;
                }
                if set.is_empty() {
                    return Ok(refs.setattr.or(refs.store));
                }
                let setattr = match refs.setattr {
                    Some(s) if !self.is_shipped(s)? => Some(s),
                    _ => None,
                };
                if let Some(seq) = setattr {
                    let mut rec = self
                        .log_record(seq)?
                        .ok_or_else(|| CacheError::corrupt("setattr record vanished"))?;
                    if let LogOp::SetAttr { set: old, .. } = &mut rec.op {
                        // Growing after a pending shrink must leave zeros
                        // between the two sizes: one truncate to the final
                        // size would bring the origin's old bytes back. The
                        // two travel as two records.
                        let regrow = matches!((old.size, set.size), (Some(a), Some(b)) if b > a);
                        if !regrow {
                            old.merge(&set);
                            self.put_log(seq, &encode(&rec)?)?;
                            return Ok(Some(seq));
                        }
                    }
                }
                return self.append(LogOp::SetAttr { fid, set }, time).map(Some);
            }
            LogOp::Remove { .. } => {
                // Only an object nothing else in the log needs: a directory
                // that other records name as a parent must be created at the
                // origin for them, even if it is removed afterwards.
                let mut never_shipped = refs.create.is_some() && refs.other == 0;
                for seq in &refs.ops {
                    never_shipped &= !self.is_shipped(*seq)?;
                }
                if never_shipped {
                    self.cancel_history(fid)?;
                    return Ok(None);
                }
                // Content and attributes of an object about to be removed
                // need not travel (unless already on their way). The remove
                // goes in first: it keeps the object while it waits.
                let seq = self.append(op, time)?;
                self.drop_unshipped_content_records(fid)?;
                return Ok(Some(seq));
            }
            LogOp::Rename {
                to_parent,
                to_name,
                replaced: None,
                ..
            } => {
                let create = match refs.create {
                    Some(c) if !self.is_shipped(c)? => Some(c),
                    _ => None,
                };
                // The new parent must exist at the origin before the create
                // is shipped: either it is there already or it is created
                // earlier in the log.
                let parent_ready = match self.get(*to_parent)? {
                    Some(p) => {
                        p.origin.is_some() || p.log.create.zip(create).is_some_and(|(pc, c)| pc < c)
                    }
                    None => false,
                };
                // A rename already logged (while the create was being shipped)
                // starts from the create's name: the create must keep it.
                let mut renamed_since = false;
                for seq in &refs.ops {
                    if let Some(r) = self.log_record(*seq)? {
                        renamed_since |= matches!(r.op, LogOp::Rename { .. });
                    }
                }
                // Moving the create to the new name also moves it earlier in
                // the log: nothing logged since may touch the new directory's
                // names (e.g. remove what had the name before).
                let dest_quiet = match create {
                    Some(c) if parent_ready && !renamed_since => {
                        self.names_untouched_since(*to_parent, c)?
                    }
                    _ => false,
                };
                if let Some(create) = create.filter(|_| dest_quiet) {
                    let mut rec = self
                        .log_record(create)?
                        .ok_or_else(|| CacheError::corrupt("create record vanished"))?;
                    if let LogOp::Create { parent, name, .. } = &mut rec.op {
                        let old_parent = *parent;
                        *parent = *to_parent;
                        *name = to_name.clone();
                        self.put_log(create, &encode(&rec)?)?;
                        self.release(old_parent)?;
                        self.obj_mut(*to_parent, |o| o.log.other += 1)?;
                        return Ok(Some(create));
                    }
                }
            }
            LogOp::Rename {
                replaced: Some(replaced),
                ..
            } => {
                // What the rename replaces goes as a removed object does:
                // its content and attributes need not travel (unless on
                // their way). Shipped, an upload of it would read content
                // that went with it, and a conflict would keep that as
                // "ours". The rename goes in first: it keeps the object
                // while it waits.
                let replaced = *replaced;
                let seq = self.append(op, time)?;
                self.drop_unshipped_content_records(replaced)?;
                return Ok(Some(seq));
            }
            _ => {}
        }
        self.append(op, time).map(Some)
    }

    /// Whether no record after `seq` changes names in directory `dir`
    /// (looks at a bounded number of records; `false` if there are more).
    fn names_untouched_since(&self, dir: FileId, seq: u64) -> Result<bool> {
        const LOOK: usize = 256;
        let later = self.log_records(seq + 1, LOOK + 1)?;
        if later.len() > LOOK {
            return Ok(false);
        }
        for (_, bytes) in later {
            let touches = match decode(&bytes)?.op {
                LogOp::Create { parent, .. } | LogOp::Remove { parent, .. } => parent == dir,
                LogOp::Rename {
                    from_parent,
                    to_parent,
                    ..
                } => from_parent == dir || to_parent == dir,
                LogOp::Store { .. } | LogOp::SetAttr { .. } => false,
            };
            if touches {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn append(&mut self, op: LogOp, time: i64) -> Result<u64> {
        let fid = op.primary();
        let record = LogRecord {
            time,
            op,
            shipped: false,
        };
        let seq = self.append_log(&encode(&record)?)?;
        self.obj_mut(fid, |o| {
            o.log.ops.push(seq);
            set_slot(&mut o.log, &record.op, seq);
        })?;
        for other in record.op.others() {
            self.obj_mut(other, |o| o.log.other += 1)?;
        }
        Ok(seq)
    }

    /// Drops one reference of a non-primary role; deletes the object if it
    /// was removed and nothing refers to it any more.
    fn release(&mut self, fid: FileId) -> Result<()> {
        let Some(mut obj) = self.get(fid)? else {
            return Ok(());
        };
        obj.log.other = obj.log.other.saturating_sub(1);
        self.put_or_forget(fid, obj)
    }

    fn put_or_forget(&mut self, fid: FileId, obj: Object) -> Result<()> {
        self.put_with_log(fid, &obj)?;
        if obj.removed && obj.log == LogRefs::default() {
            // A removed object has no name; should one still lead to it,
            // it goes too, rather than naming nothing.
            self.unlink_if(obj.parent, &obj.name, fid)?;
            self.remove_tree(fid)?;
        }
        Ok(())
    }

    /// The record `seq` is done (the origin has it, or it no longer
    /// matters): removes it and releases what it referred to.
    pub fn log_done(&mut self, seq: u64) -> Result<()> {
        let Some(record) = self.log_record(seq)? else {
            return Ok(());
        };
        self.remove_log(seq)?;
        let fid = record.op.primary();
        if let Some(mut obj) = self.get(fid)? {
            obj.log.ops.retain(|s| *s != seq);
            clear_slots(&mut obj.log, seq);
            self.put_or_forget(fid, obj)?;
        }
        for other in record.op.others() {
            self.release(other)?;
        }
        Ok(())
    }

    /// Replaces the operation of record `seq` in place (same position in
    /// the log), moving references as needed.
    pub fn log_rewrite(&mut self, seq: u64, op: LogOp) -> Result<()> {
        let Some(mut record) = self.log_record(seq)? else {
            return Err(CacheError::corrupt(format!("log record {seq} vanished")));
        };
        let old = std::mem::replace(&mut record.op, op);
        self.put_log(seq, &encode(&record)?)?;
        // Take the new references before dropping the old ones, so that an
        // object named by both is never forgotten in between.
        for other in record.op.others() {
            self.obj_mut(other, |o| o.log.other += 1)?;
        }
        let (old_fid, new_fid) = (old.primary(), record.op.primary());
        let new_op = record.op.clone();
        self.obj_mut(new_fid, |o| {
            if old_fid != new_fid {
                o.log.ops.push(seq);
            }
            clear_slots(&mut o.log, seq);
            set_slot(&mut o.log, &new_op, seq);
        })?;
        for other in old.others() {
            self.release(other)?;
        }
        if old_fid != new_fid
            && let Some(mut obj) = self.get(old_fid)?
        {
            obj.log.ops.retain(|s| *s != seq);
            clear_slots(&mut obj.log, seq);
            self.put_or_forget(old_fid, obj)?;
        }
        Ok(())
    }

    /// Removing an object the origin never had: its whole history goes,
    /// except that a rename of it over an origin object must still remove
    /// that object at the origin.
    fn cancel_history(&mut self, fid: FileId) -> Result<()> {
        let ops = self.object(fid)?.log.ops.clone();
        for seq in ops {
            let Some(record) = self.log_record(seq)? else {
                continue;
            };
            if let LogOp::Rename {
                to_parent,
                to_name,
                replaced: Some(victim),
                ..
            } = &record.op
            {
                let victim_at_origin = self.get(*victim)?.is_some_and(|v| v.origin.is_some());
                if victim_at_origin {
                    self.log_rewrite(
                        seq,
                        LogOp::Remove {
                            parent: *to_parent,
                            name: to_name.clone(),
                            fid: *victim,
                        },
                    )?;
                    continue;
                }
            }
            self.log_done(seq)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{OriginRef, ROOT_FILEID};
    use crate::store::Cache;

    fn obj(kind: Kind, origin: Option<u64>) -> Object {
        Object {
            origin: origin.map(|id| OriginRef { id, version: 1 }),
            listed: true,
            ..Object::sample(kind)
        }
    }

    fn setup() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 1 << 30).expect("open");
        let mut tx = cache.write().expect("write");
        tx.put(ROOT_FILEID, &obj(Kind::Dir, Some(1))).expect("root");
        tx.commit(false).expect("commit");
        (dir, cache)
    }

    fn ops(tx: &WriteTxn<'_>) -> Vec<LogOp> {
        tx.log_records(0, 1000)
            .expect("records")
            .into_iter()
            .map(|(_, b)| decode(&b).expect("decode").op)
            .collect()
    }

    /// Creates a local file `name` in the root, logged.
    fn local_file(tx: &mut WriteTxn<'_>, name: &str) -> FileId {
        let fid = tx
            .create(ROOT_FILEID, name, &obj(Kind::File, None))
            .expect("create");
        tx.log(
            LogOp::Create {
                parent: ROOT_FILEID,
                name: name.into(),
                fid,
                kind: Kind::File,
            },
            0,
        )
        .expect("log");
        fid
    }

    fn remove(tx: &mut WriteTxn<'_>, name: &str) -> Option<u64> {
        let fid = tx
            .lookup(ROOT_FILEID, name)
            .expect("lookup")
            .expect("exists");
        tx.unlink(ROOT_FILEID, name).expect("unlink");
        let mut o = tx.object(fid).expect("obj");
        o.removed = true;
        tx.put(fid, &o).expect("put");
        tx.log(
            LogOp::Remove {
                parent: ROOT_FILEID,
                name: name.into(),
                fid,
            },
            0,
        )
        .expect("log")
    }

    /// Conflict model seed 1795823258545747640 (origin-wins): a settlement
    /// put a file removed here back under its old name; when its remove
    /// was done and the object deleted, the name led nowhere, and every
    /// listing of the directory failed with a stale handle.
    #[test]
    fn a_removed_object_deleted_by_the_log_takes_any_name_left_on_it() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let file = Object {
            parent: ROOT_FILEID,
            name: "f".into(),
            ..obj(Kind::File, Some(10))
        };
        tx.put(10, &file).expect("origin file");
        tx.link(ROOT_FILEID, "f", 10).expect("link");
        let removed = remove(&mut tx, "f").expect("a remove record");
        tx.link(ROOT_FILEID, "f", 10).expect("linked again");
        tx.log_done(removed).expect("done");
        assert_eq!(tx.get(10).expect("get"), None);
        assert_eq!(tx.lookup(ROOT_FILEID, "f").expect("lookup"), None);
    }

    #[test]
    fn names_removed_or_renamed_away_stay_vacated_until_their_records_are_done() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        for (name, id) in [("gone", 10), ("moved", 11)] {
            tx.put(id, &obj(Kind::File, Some(id))).expect("origin file");
            tx.link(ROOT_FILEID, name, id).expect("link");
        }
        local_file(&mut tx, "local");
        assert!(tx.vacated_names(ROOT_FILEID).expect("vacated").is_empty());
        let removed = remove(&mut tx, "gone").expect("a remove record");
        tx.unlink(ROOT_FILEID, "moved").expect("unlink");
        tx.link(ROOT_FILEID, "there", 11).expect("link");
        let renamed = tx
            .log(
                LogOp::Rename {
                    from_parent: ROOT_FILEID,
                    from_name: "moved".into(),
                    fid: 11,
                    to_parent: ROOT_FILEID,
                    to_name: "there".into(),
                    replaced: None,
                },
                0,
            )
            .expect("log")
            .expect("a rename record");
        // Never at the origin: its removal cancels its history instead.
        assert_eq!(remove(&mut tx, "local"), None);
        let mut vacated: Vec<String> = tx
            .vacated_names(ROOT_FILEID)
            .expect("vacated")
            .into_iter()
            .collect();
        vacated.sort();
        assert_eq!(vacated, ["gone", "moved"]);
        tx.log_done(removed).expect("done");
        tx.log_done(renamed).expect("done");
        assert!(tx.vacated_names(ROOT_FILEID).expect("vacated").is_empty());
    }

    #[test]
    fn a_rename_over_a_file_drops_the_files_pending_upload() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        tx.put(10, &obj(Kind::File, Some(10))).expect("origin file");
        tx.link(ROOT_FILEID, "a", 10).expect("link");
        let store = tx.log(LogOp::Store { fid: 10 }, 0).expect("log");
        assert!(store.is_some());
        let new = local_file(&mut tx, "new");
        tx.unlink(ROOT_FILEID, "new").expect("unlink");
        tx.unlink(ROOT_FILEID, "a").expect("unlink");
        tx.link(ROOT_FILEID, "a", new).expect("link");
        let mut replaced = tx.object(10).expect("obj");
        replaced.removed = true;
        tx.put(10, &replaced).expect("put");
        tx.log(
            LogOp::Rename {
                from_parent: ROOT_FILEID,
                from_name: "new".into(),
                fid: new,
                to_parent: ROOT_FILEID,
                to_name: "a".into(),
                replaced: Some(10),
            },
            0,
        )
        .expect("log");
        assert_eq!(tx.object(10).expect("kept for the rename").log.store, None);
        let ops: Vec<LogOp> = tx
            .log_records(0, 100)
            .expect("records")
            .iter()
            .map(|(_, bytes)| decode(bytes).expect("decode").op)
            .collect();
        assert!(
            !ops.contains(&LogOp::Store { fid: 10 }),
            "the replaced file's upload is still logged: {ops:?}"
        );
    }

    #[test]
    fn many_writes_travel_as_one_store() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = local_file(&mut tx, "f");
        let a = tx.log(LogOp::Store { fid }, 0).expect("log");
        let b = tx.log(LogOp::Store { fid }, 0).expect("log");
        assert_eq!(a, b);
        let set = |mode| SetAttrs {
            mode: Some(mode),
            ..Default::default()
        };
        tx.log(
            LogOp::SetAttr {
                fid,
                set: set(0o600),
            },
            0,
        )
        .expect("log");
        tx.log(
            LogOp::SetAttr {
                fid,
                set: set(0o640),
            },
            0,
        )
        .expect("log");
        // A truncation rides on the pending store.
        let trunc = SetAttrs {
            size: Some(0),
            ..Default::default()
        };
        tx.log(LogOp::SetAttr { fid, set: trunc }, 0).expect("log");
        let got = ops(&tx);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            got[2],
            LogOp::SetAttr {
                fid,
                set: set(0o640)
            }
        );
    }

    #[test]
    fn writes_after_an_upload_was_shipped_need_a_new_upload() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = local_file(&mut tx, "f");
        let first = tx.log(LogOp::Store { fid }, 0).expect("log").expect("seq");
        let bytes = tx.log_bytes(first).expect("bytes").expect("record");
        assert!(tx.log_mark_shipped(first, &bytes).expect("mark"));
        // The origin may have applied `first` under its key already: a
        // replay would answer with that, so new content needs a new key.
        let second = tx.log(LogOp::Store { fid }, 0).expect("log").expect("seq");
        assert_ne!(first, second);
        // And a shipped record is never changed under its key.
        assert!(!tx.log_mark_shipped(second, b"other bytes").expect("mark"));
    }

    #[test]
    fn a_grow_after_a_shrink_is_not_merged_into_it() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = local_file(&mut tx, "f");
        let size = |n| SetAttrs {
            size: Some(n),
            ..Default::default()
        };
        tx.log(
            LogOp::SetAttr {
                fid,
                set: size(456),
            },
            0,
        )
        .expect("log");
        tx.log(
            LogOp::SetAttr {
                fid,
                set: size(8686),
            },
            0,
        )
        .expect("log");
        // Shrinking again merges: nothing between needs zeros.
        tx.log(
            LogOp::SetAttr {
                fid,
                set: size(100),
            },
            0,
        )
        .expect("log");
        let got = ops(&tx);
        assert_eq!(
            &got[1..],
            &[
                LogOp::SetAttr {
                    fid,
                    set: size(456)
                },
                LogOp::SetAttr {
                    fid,
                    set: size(100)
                },
            ],
            "{got:?}"
        );
    }

    /// A shrink and a regrowth are two records; a remove drops both, not
    /// only the one in the slot (the other would truncate the origin's
    /// file on its way out).
    #[test]
    fn a_remove_drops_every_size_change_of_the_file() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        tx.put(10, &obj(Kind::File, Some(10))).expect("origin file");
        tx.link(ROOT_FILEID, "a", 10).expect("link");
        for n in [1, 3] {
            let set = SetAttrs {
                size: Some(n),
                ..Default::default()
            };
            tx.log(LogOp::SetAttr { fid: 10, set }, 0).expect("log");
        }
        assert_eq!(tx.content_records(10).expect("records").len(), 2);
        tx.unlink(ROOT_FILEID, "a").expect("unlink");
        let mut gone = tx.object(10).expect("obj");
        gone.removed = true;
        tx.put(10, &gone).expect("put");
        let remove = LogOp::Remove {
            parent: ROOT_FILEID,
            name: "a".into(),
            fid: 10,
        };
        tx.log(remove.clone(), 0).expect("log");
        assert_eq!(ops(&tx), vec![remove]);
    }

    #[test]
    fn a_store_absorbs_an_earlier_truncation() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = local_file(&mut tx, "f");
        // A truncation carries the mtime it gave the file; the store
        // carries a later one.
        let trunc = SetAttrs {
            size: Some(0),
            mode: Some(0o600),
            mtime: Some(5),
            ..Default::default()
        };
        tx.log(LogOp::SetAttr { fid, set: trunc }, 0).expect("log");
        tx.log(LogOp::Store { fid }, 0).expect("log");
        let got = ops(&tx);
        assert_eq!(got.len(), 3, "{got:?}");
        let mode_only = SetAttrs {
            mode: Some(0o600),
            ..Default::default()
        };
        assert_eq!(
            got[1],
            LogOp::SetAttr {
                fid,
                set: mode_only
            }
        );
    }

    #[test]
    fn removing_a_file_the_origin_never_saw_cancels_its_history() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = local_file(&mut tx, "tmp");
        tx.log(LogOp::Store { fid }, 0).expect("log");
        assert_eq!(remove(&mut tx, "tmp"), None);
        assert!(ops(&tx).is_empty());
        assert!(tx.get(fid).expect("get").is_none(), "cancelled object kept");
        assert_eq!(
            tx.object(ROOT_FILEID).expect("root").log,
            LogRefs::default()
        );
    }

    #[test]
    fn a_shipped_create_is_never_cancelled() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = local_file(&mut tx, "f");
        let create = tx.object(fid).expect("obj").log.create.expect("create");
        let bytes = tx.log_bytes(create).expect("bytes").expect("record");
        assert!(tx.log_mark_shipped(create, &bytes).expect("mark"));
        let removal = remove(&mut tx, "f");
        assert!(removal.is_some());
        assert_eq!(ops(&tx).len(), 2);
        assert!(
            tx.object(fid).expect("obj").removed,
            "object must stay until the remove ships"
        );
        tx.log_done(create).expect("done");
        tx.log_done(removal.expect("seq")).expect("done");
        assert!(
            tx.get(fid).expect("get").is_none(),
            "object outlived its records"
        );
    }

    #[test]
    fn renaming_a_new_file_renames_its_create() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let dir = tx
            .create(ROOT_FILEID, "d", &obj(Kind::Dir, Some(5)))
            .expect("dir");
        let fid = local_file(&mut tx, "tmp");
        tx.log(
            LogOp::Rename {
                from_parent: ROOT_FILEID,
                from_name: "tmp".into(),
                fid,
                to_parent: dir,
                to_name: "final".into(),
                replaced: None,
            },
            0,
        )
        .expect("log");
        assert_eq!(
            ops(&tx),
            vec![LogOp::Create {
                parent: dir,
                name: "final".into(),
                fid,
                kind: Kind::File
            }]
        );
        assert_eq!(tx.object(dir).expect("dir").log.other, 1);
        assert_eq!(tx.object(ROOT_FILEID).expect("root").log.other, 0);
    }

    #[test]
    fn a_create_renamed_while_shipped_is_not_rewritten_later() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let fid = local_file(&mut tx, "a");
        let create = tx.object(fid).expect("obj").log.create.expect("create");
        let rename = |to: &str, from: &str| LogOp::Rename {
            from_parent: ROOT_FILEID,
            from_name: from.into(),
            fid,
            to_parent: ROOT_FILEID,
            to_name: to.into(),
            replaced: None,
        };
        let bytes = tx.log_bytes(create).expect("bytes").expect("record");
        assert!(tx.log_mark_shipped(create, &bytes).expect("mark"));
        tx.log(rename("b", "a"), 0).expect("log");
        // However the shipment ends, a second rename must not move the
        // create away from the name the first rename starts from.
        tx.log(rename("c", "b"), 0).expect("log");
        let got = ops(&tx);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&got[0], LogOp::Create { name, .. } if name == "a"));
    }

    #[test]
    fn cancelled_rename_over_an_origin_file_still_removes_it() {
        let (_d, cache) = setup();
        let mut tx = cache.write().expect("write");
        let victim = tx
            .create(ROOT_FILEID, "file", &obj(Kind::File, Some(9)))
            .expect("victim");
        let fid = local_file(&mut tx, "tmp");
        tx.unlink(ROOT_FILEID, "tmp").expect("unlink");
        tx.link(ROOT_FILEID, "file", fid).expect("link");
        let mut v = tx.object(victim).expect("victim");
        v.removed = true;
        tx.put(victim, &v).expect("put");
        tx.log(
            LogOp::Rename {
                from_parent: ROOT_FILEID,
                from_name: "tmp".into(),
                fid,
                to_parent: ROOT_FILEID,
                to_name: "file".into(),
                replaced: Some(victim),
            },
            0,
        )
        .expect("log");
        assert_eq!(remove(&mut tx, "file"), None);
        assert_eq!(
            ops(&tx),
            vec![LogOp::Remove {
                parent: ROOT_FILEID,
                name: "file".into(),
                fid: victim
            }]
        );
    }
}
