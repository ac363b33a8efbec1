//! The origin's metadata store (redb): objects by id, directory entries by
//! (parent id, name), an inode index, the names of hard-linked files by
//! inode, the journal, applied idempotency keys, pending-install intents and
//! counters.
//!
//! Invariants kept here and by the single writer ([`crate::writer`]):
//! - every object but the root has exactly one `children` row naming it, and
//!   its `Meta::parent`/`Meta::name` agree with that row;
//! - a directory's `attr.size` is its number of `children` rows;
//! - `attr.version` is the seq of the last journal record that touched the
//!   object, so versions only grow; ids come from `next_id` and are never
//!   reused;
//! - a journal record is committed in the same transaction as the metadata
//!   change it describes, and `last_seq`/`first_seq` bound the journal table.

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::OriginError;
use crate::fsops::Fingerprint;
use crate::wire::{Attr, Change, Entry, Info, Kind, ObjectId, ROOT_ID, Record, Seq};

pub const OBJECTS: TableDefinition<u64, &[u8]> = TableDefinition::new("objects");
pub const CHILDREN: TableDefinition<(u64, &str), u64> = TableDefinition::new("children");
/// `(inode number, id)` of every object. One number may name several
/// objects: numbers repeat across filesystems (one mounted inside the
/// tree), and an object whose inode was freed on disk keeps its number in
/// the store until the scan takes in its going. Rows may be stale: readers
/// check ([`Tx::with_ino`]).
pub const INODES: TableDefinition<(u64, u64), ()> = TableDefinition::new("inode_ids");
/// What stores before [`INODES`] kept: one id per inode number, the last
/// stored, so of two objects with one number (on two filesystems) the
/// other was never found by it. Replaced at open.
const ONE_ID_PER_INODE: TableDefinition<u64, u64> = TableDefinition::new("inodes");
/// `(inode, id)` for every file object seen with more than one link: a
/// change through one name of a hard-linked file shows in that name's
/// directory only, and this finds the objects of its other names. Rows may
/// be stale (the object gone, or its name now another inode): readers check
/// ([`Tx::linked`]).
pub const LINKS: TableDefinition<(u64, u64), ()> = TableDefinition::new("links");
pub const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
pub const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
pub const INTENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("intents");
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
pub const STRINGS: TableDefinition<&str, &str> = TableDefinition::new("strings");

const NEXT_ID: &str = "next_id";
const LAST_SEQ: &str = "last_seq";
const FIRST_SEQ: &str = "first_seq";
const NEXT_INTENT: &str = "next_intent";

fn intent_progress_key(n: u64) -> String {
    format!("intent_progress_{n}")
}
const STORE_ID: &str = "store_id";

/// How many journal records [`Tx::changed_since`] reads before it gives up
/// and answers "changed": asked only when a version differs, and a few
/// milliseconds of reading at most.
pub const CHANGED_SINCE_SCAN: u64 = 16_384;

/// One object as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Parent directory (0 for the root).
    pub parent: ObjectId,
    pub name: String,
    pub attr: Attr,
    pub fp: Fingerprint,
}

/// What an applied idempotency key answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyResult {
    pub attr: Attr,
    pub seq: Seq,
}

type Result<T> = std::result::Result<T, OriginError>;

/// redb's page cache for the store. Its default (1 GiB) fills with the
/// first scan of a big tree and stays: 216 MiB of RSS after importing
/// 200,000 files, against 48 MiB with this bound and no slower scan (the
/// kernel's page cache still holds the file).
const PAGE_CACHE_BYTES: usize = 64 << 20;

pub struct Store {
    db: Database,
    /// Why the store stopped working, once redb latched a failed write.
    failure: tokio::sync::watch::Sender<Option<String>>,
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let db = match Database::builder()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(OriginError::Config(format!(
                    "another imz origin already serves this directory (its store {} is in use)",
                    path.display()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let store = Self {
            db,
            failure: tokio::sync::watch::Sender::new(None),
        };
        let txn = store.db.begin_write()?;
        {
            // Create every table so read transactions never miss one.
            txn.open_table(OBJECTS)?;
            txn.open_table(CHILDREN)?;
            txn.open_table(INODES)?;
            txn.open_table(LINKS)?;
            txn.open_table(JOURNAL)?;
            txn.open_table(KEYS)?;
            txn.open_table(INTENTS)?;
            let mut c = txn.open_table(COUNTERS)?;
            if c.get(NEXT_ID)?.is_none() {
                c.insert(NEXT_ID, ROOT_ID + 1)?;
                c.insert(LAST_SEQ, 0)?;
                c.insert(FIRST_SEQ, 1)?;
                c.insert(NEXT_INTENT, 1)?;
            }
            let mut s = txn.open_table(STRINGS)?;
            if s.get(STORE_ID)?.is_none() {
                s.insert(STORE_ID, random_id()?.as_str())?;
            }
        }
        if txn.delete_table(ONE_ID_PER_INODE)? {
            index_inodes(&txn)?;
        }
        txn.commit()?;
        Ok(store)
    }

    pub fn read(&self) -> Result<Reader> {
        let txn = self.watch(self.db.begin_read().map_err(OriginError::from))?;
        Ok(Reader { txn })
    }

    pub fn begin_write(&self) -> Result<WriteTransaction> {
        self.watch(self.db.begin_write().map_err(OriginError::from))
    }

    /// Commits `txn` (durably: the origin commits nothing otherwise).
    pub fn commit(&self, txn: WriteTransaction) -> Result<()> {
        self.watch(txn.commit().map_err(OriginError::from))
    }

    /// Resolves once the store has stopped working, with the reason.
    ///
    /// redb latches the first write that fails (a full disk, an I/O error):
    /// from then on every transaction fails, reads too, until the database
    /// is opened again. Nothing committed is lost; the process must restart
    /// (`imz origin` does so by itself).
    pub async fn failure(&self) -> String {
        let mut rx = self.failure.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Notes `result`'s error if it means redb has latched.
    fn watch<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(OriginError::Store(e)) = &result
            && matches!(e, redb::Error::PreviousIo | redb::Error::Io(_))
            && self.failure.borrow().is_none()
        {
            tracing::error!(error = %e, "the metadata store stopped after a failed write");
            self.failure.send_replace(Some(e.to_string()));
        }
        result
    }
}

/// Fills [`INODES`] from the objects themselves (a store from before it).
fn index_inodes(txn: &WriteTransaction) -> Result<()> {
    let objects = txn.open_table(OBJECTS)?;
    let mut inodes = txn.open_table(INODES)?;
    for row in objects.iter()? {
        let (id, bytes) = row?;
        let m = decode_meta(bytes.value())?;
        inodes.insert((m.fp.ino, id.value()), ())?;
    }
    Ok(())
}

fn random_id() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| OriginError::io("reading /dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn decode_meta(bytes: &[u8]) -> Result<Meta> {
    Ok(serde_json::from_slice(bytes)?)
}

/// A consistent read snapshot.
pub struct Reader {
    txn: ReadTransaction,
}

impl Reader {
    pub fn meta(&self, id: ObjectId) -> Result<Option<Meta>> {
        let t = self.txn.open_table(OBJECTS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode_meta(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn attr(&self, id: ObjectId) -> Result<Option<Attr>> {
        Ok(self.meta(id)?.map(|m| m.attr))
    }

    pub fn child(&self, dir: ObjectId, name: &str) -> Result<Option<ObjectId>> {
        let t = self.txn.open_table(CHILDREN)?;
        Ok(t.get((dir, name))?.map(|v| v.value()))
    }

    /// Entries of `dir` with names after `after`, at most `limit`, and
    /// whether more follow.
    pub fn entries(
        &self,
        dir: ObjectId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool)> {
        let children = self.txn.open_table(CHILDREN)?;
        let objects = self.txn.open_table(OBJECTS)?;
        let mut out = Vec::new();
        let start = (dir, after.unwrap_or(""));
        let mut more = false;
        for row in children.range(start..(dir + 1, ""))? {
            let (k, v) = row?;
            let (_, name) = k.value();
            if after == Some(name) {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            let Some(m) = objects.get(v.value())? else {
                return Err(OriginError::Corrupt(format!("dangling entry {dir}/{name}")));
            };
            out.push(Entry {
                name: name.to_owned(),
                attr: decode_meta(m.value())?.attr,
            });
        }
        Ok((out, more))
    }

    /// Ids of the children of `dir` (name order).
    pub fn child_ids(&self, dir: ObjectId) -> Result<Vec<(String, ObjectId)>> {
        let children = self.txn.open_table(CHILDREN)?;
        let mut out = Vec::new();
        for row in children.range((dir, "")..(dir + 1, ""))? {
            let (k, v) = row?;
            out.push((k.value().1.to_owned(), v.value()));
        }
        Ok(out)
    }

    /// Path of `id` as names from the root; `None` if it is not stored.
    pub fn path_of(&self, id: ObjectId) -> Result<Option<Vec<String>>> {
        let t = self.txn.open_table(OBJECTS)?;
        path_of(&t, id)
    }

    pub fn counter(&self, name: &str) -> Result<u64> {
        let t = self.txn.open_table(COUNTERS)?;
        Ok(t.get(name)?.map(|v| v.value()).unwrap_or(0))
    }

    pub fn last_seq(&self) -> Result<Seq> {
        self.counter(LAST_SEQ)
    }

    pub fn first_seq(&self) -> Result<Seq> {
        self.counter(FIRST_SEQ)
    }

    pub fn info(&self) -> Result<Info> {
        let s = self.txn.open_table(STRINGS)?;
        let store_id = s
            .get(STORE_ID)?
            .map(|v| v.value().to_owned())
            .unwrap_or_default();
        let root = self
            .attr(ROOT_ID)?
            .ok_or_else(|| OriginError::Corrupt("no root object".into()))?;
        Ok(Info {
            store_id,
            root,
            first_seq: self.first_seq()?,
            last_seq: self.last_seq()?,
            upload_extents: true,
            prefix_digest: true,
            piece_digests: true,
            read_only: false,
            places: true,
        })
    }

    /// Raw JSON of the records after `after`, at most `limit`.
    pub fn journal(&self, after: Seq, limit: usize) -> Result<Vec<Vec<u8>>> {
        let t = self.txn.open_table(JOURNAL)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)? {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            out.push(v.value().to_vec());
        }
        Ok(out)
    }

    pub fn intents(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let t = self.txn.open_table(INTENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }
}

fn path_of(
    t: &impl ReadableTable<u64, &'static [u8]>,
    id: ObjectId,
) -> Result<Option<Vec<String>>> {
    let mut names = Vec::new();
    let mut cur = id;
    while cur != ROOT_ID {
        let Some(v) = t.get(cur)? else {
            return Ok(None);
        };
        let m = decode_meta(v.value())?;
        names.push(m.name);
        cur = m.parent;
        if names.len() > 4096 {
            return Err(OriginError::Corrupt(format!("parent loop at object {id}")));
        }
    }
    names.reverse();
    Ok(Some(names))
}

/// Mutations inside one write transaction; only the writer thread uses it.
pub struct Tx<'a> {
    pub txn: &'a WriteTransaction,
    /// Records appended in this transaction.
    pub appended: usize,
    /// Files stored with more than one link in this transaction.
    pub linked: std::cell::RefCell<Vec<ObjectId>>,
}

impl<'a> Tx<'a> {
    pub fn new(txn: &'a WriteTransaction) -> Self {
        Self {
            txn,
            appended: 0,
            linked: std::cell::RefCell::new(Vec::new()),
        }
    }

    pub fn meta(&self, id: ObjectId) -> Result<Option<Meta>> {
        let t = self.txn.open_table(OBJECTS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode_meta(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn put(&self, meta: &Meta) -> Result<()> {
        let mut t = self.txn.open_table(OBJECTS)?;
        t.insert(meta.attr.id, serde_json::to_vec(meta)?.as_slice())?;
        if meta.attr.kind == Kind::File && meta.attr.nlink > 1 {
            self.note_link(meta.fp.ino, meta.attr.id)?;
            self.linked.borrow_mut().push(meta.attr.id);
        }
        Ok(())
    }

    /// Records that file `id` is one of several links to inode `ino`.
    pub fn note_link(&self, ino: u64, id: ObjectId) -> Result<()> {
        let mut t = self.txn.open_table(LINKS)?;
        if t.get((ino, id))?.is_none() {
            t.insert((ino, id), ())?;
        }
        Ok(())
    }

    /// The file objects other than `except` that are names of inode `ino`
    /// (hard links), with their metadata; stale rows are dropped.
    pub fn linked(&self, ino: u64, except: ObjectId) -> Result<Vec<Meta>> {
        let names = self.objects_by_ino(LINKS, ino, |m| m.attr.kind == Kind::File)?;
        Ok(names.into_iter().filter(|m| m.attr.id != except).collect())
    }

    /// The objects that `table`, an index by `(inode number, id)`, gives
    /// for `ino`, as stored now. Rows whose object is gone, has another
    /// number now or fails `fits` are stale, and dropped.
    fn objects_by_ino(
        &self,
        table: TableDefinition<(u64, u64), ()>,
        ino: u64,
        fits: impl Fn(&Meta) -> bool,
    ) -> Result<Vec<Meta>> {
        let ids: Vec<ObjectId> = {
            let t = self.txn.open_table(table)?;
            let mut ids = Vec::new();
            for row in t.range((ino, 0)..=(ino, u64::MAX))? {
                ids.push(row?.0.value().1);
            }
            ids
        };
        let mut out = Vec::new();
        for id in ids {
            match self.meta(id)? {
                Some(m) if m.fp.ino == ino && fits(&m) => out.push(m),
                _ => {
                    self.txn.open_table(table)?.remove((ino, id))?;
                }
            }
        }
        Ok(out)
    }

    pub fn child(&self, dir: ObjectId, name: &str) -> Result<Option<ObjectId>> {
        let t = self.txn.open_table(CHILDREN)?;
        Ok(t.get((dir, name))?.map(|v| v.value()))
    }

    pub fn child_ids(&self, dir: ObjectId) -> Result<Vec<(String, ObjectId)>> {
        let children = self.txn.open_table(CHILDREN)?;
        let mut out = Vec::new();
        for row in children.range((dir, "")..(dir + 1, ""))? {
            let (k, v) = row?;
            out.push((k.value().1.to_owned(), v.value()));
        }
        Ok(out)
    }

    pub fn link(&self, dir: ObjectId, name: &str, id: ObjectId) -> Result<()> {
        self.txn.open_table(CHILDREN)?.insert((dir, name), id)?;
        Ok(())
    }

    pub fn unlink(&self, dir: ObjectId, name: &str) -> Result<()> {
        self.txn.open_table(CHILDREN)?.remove((dir, name))?;
        Ok(())
    }

    /// The objects stored with inode number `ino` (on any filesystem of
    /// the tree), with their metadata; stale rows are dropped.
    pub fn with_ino(&self, ino: u64) -> Result<Vec<Meta>> {
        self.objects_by_ino(INODES, ino, |_| true)
    }

    pub fn set_ino(&self, ino: u64, id: ObjectId) -> Result<()> {
        self.txn.open_table(INODES)?.insert((ino, id), ())?;
        Ok(())
    }

    /// Forgets that `id` has inode number `ino`.
    pub fn drop_ino(&self, ino: u64, id: ObjectId) -> Result<()> {
        self.txn.open_table(INODES)?.remove((ino, id))?;
        Ok(())
    }

    pub fn path_of(&self, id: ObjectId) -> Result<Option<Vec<String>>> {
        let t = self.txn.open_table(OBJECTS)?;
        path_of(&t, id)
    }

    /// Whether `dir` is `ancestor` or lies below it (a directory cannot
    /// move there).
    pub fn is_within(&self, dir: ObjectId, ancestor: ObjectId) -> Result<bool> {
        let mut cur = dir;
        for _ in 0..4096 {
            if cur == ancestor {
                return Ok(true);
            }
            if cur == ROOT_ID {
                return Ok(false);
            }
            match self.meta(cur)? {
                Some(m) => cur = m.parent,
                None => return Ok(false),
            }
        }
        Err(OriginError::Corrupt(format!(
            "parent loop above object {dir}"
        )))
    }

    pub fn counter(&self, name: &str) -> Result<u64> {
        Ok(self
            .txn
            .open_table(COUNTERS)?
            .get(name)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    fn set_counter(&self, name: &str, v: u64) -> Result<()> {
        self.txn.open_table(COUNTERS)?.insert(name, v)?;
        Ok(())
    }

    pub fn alloc_id(&self) -> Result<ObjectId> {
        let id = self.counter(NEXT_ID)?.max(ROOT_ID + 1);
        self.set_counter(NEXT_ID, id + 1)?;
        Ok(id)
    }

    /// The seq the next appended record will get.
    pub fn next_seq(&self) -> Result<Seq> {
        Ok(self.counter(LAST_SEQ)? + 1)
    }

    /// Appends the record `seq` (which must be [`Self::next_seq`]).
    pub fn append(&mut self, seq: Seq, time: i64, key: Option<&str>, change: Change) -> Result<()> {
        let record = Record {
            seq,
            time,
            key: key.map(str::to_owned),
            change,
        };
        self.txn
            .open_table(JOURNAL)?
            .insert(seq, serde_json::to_vec(&record)?.as_slice())?;
        self.set_counter(LAST_SEQ, seq)?;
        self.appended += 1;
        Ok(())
    }

    /// Drops the oldest records so that at most `keep` remain (at most
    /// `budget` per call, to bound one transaction's work).
    pub fn compact(&self, keep: u64, budget: u64) -> Result<()> {
        let last = self.counter(LAST_SEQ)?;
        let first = self.counter(FIRST_SEQ)?.max(1);
        if last < first || last - first < keep {
            return Ok(());
        }
        let new_first = (last + 1 - keep).min(first + budget);
        let mut t = self.txn.open_table(JOURNAL)?;
        for seq in first..new_first {
            t.remove(seq)?;
        }
        drop(t);
        self.set_counter(FIRST_SEQ, new_first)
    }

    /// Whether a journal record after seq `after` is one that `conflicts`
    /// picks (a change to an object that a change based on `after` would
    /// conflict with). `true` when the journal cannot tell: compacted past
    /// `after`, or more than [`CHANGED_SINCE_SCAN`] records to read.
    pub fn changed_since(&self, after: Seq, conflicts: impl Fn(&Change) -> bool) -> Result<bool> {
        let last = self.counter(LAST_SEQ)?;
        let first = self.counter(FIRST_SEQ)?.max(1);
        if after.saturating_add(1) < first || last.saturating_sub(after) > CHANGED_SINCE_SCAN {
            return Ok(true);
        }
        let t = self.txn.open_table(JOURNAL)?;
        for row in t.range(after.saturating_add(1)..)? {
            let (_, v) = row?;
            let record: Record = serde_json::from_slice(v.value())?;
            if conflicts(&record.change) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn key(&self, key: &str) -> Result<Option<KeyResult>> {
        let t = self.txn.open_table(KEYS)?;
        match t.get(key)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn put_key(&self, key: &str, result: &KeyResult) -> Result<()> {
        self.txn
            .open_table(KEYS)?
            .insert(key, serde_json::to_vec(result)?.as_slice())?;
        Ok(())
    }

    pub fn add_intent(&self, body: &[u8]) -> Result<u64> {
        let n = self.counter(NEXT_INTENT)?.max(1);
        self.set_counter(NEXT_INTENT, n + 1)?;
        self.txn.open_table(INTENTS)?.insert(n, body)?;
        Ok(n)
    }

    pub fn drop_intent(&self, n: u64) -> Result<()> {
        self.txn.open_table(INTENTS)?.remove(n)?;
        self.txn
            .open_table(COUNTERS)?
            .remove(intent_progress_key(n).as_str())?;
        Ok(())
    }

    /// Where intent `n` resumes: the operations before this position were
    /// committed by earlier transactions (0: none).
    pub fn intent_progress(&self, n: u64) -> Result<u64> {
        self.counter(&intent_progress_key(n))
    }

    pub fn set_intent_progress(&self, n: u64, at: u64) -> Result<()> {
        self.set_counter(&intent_progress_key(n), at)
    }

    /// Removes `id` and, for a directory, everything below it, from the
    /// objects, children and inode tables (its own `children` row in its
    /// parent is the caller's business). Returns how many objects went.
    pub fn forget_subtree(&self, id: ObjectId) -> Result<usize> {
        let mut stack = vec![id];
        let mut n = 0;
        while let Some(cur) = stack.pop() {
            let Some(m) = self.meta(cur)? else { continue };
            if m.attr.kind == Kind::Dir {
                for (name, child) in self.child_ids(cur)? {
                    self.unlink(cur, &name)?;
                    stack.push(child);
                }
            }
            self.drop_ino(m.fp.ino, cur)?;
            self.txn.open_table(OBJECTS)?.remove(cur)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;

    fn meta(id: ObjectId, parent: ObjectId, name: &str, kind: Kind, ino: u64) -> Meta {
        Meta {
            parent,
            name: name.into(),
            attr: Attr {
                id,
                kind,
                version: 1,
                size: 0,
                mode: 0o644,
                uid: 0,
                gid: 0,
                nlink: 1,
                atime: 0,
                mtime: 0,
                ctime: 0,
                target: None,
            },
            fp: Fingerprint {
                ino,
                size: 0,
                mtime: 0,
                ctime: 0,
                mode: 0,
                uid: 0,
                gid: 0,
            },
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.redb")).expect("open");
        (dir, store)
    }

    #[test]
    fn ids_are_never_reused_across_reopen() {
        let (dir, store) = open();
        let txn = store.begin_write().expect("txn");
        let a = Tx::new(&txn).alloc_id().expect("id");
        let b = Tx::new(&txn).alloc_id().expect("id");
        txn.commit().expect("commit");
        drop(store);
        let store = Store::open(&dir.path().join("s.redb")).expect("reopen");
        let txn = store.begin_write().expect("txn");
        let c = Tx::new(&txn).alloc_id().expect("id");
        assert!(a > ROOT_ID && b > a && c > b);
    }

    #[test]
    fn entries_page_in_name_order_and_forget_removes_subtrees() {
        let (_dir, store) = open();
        let txn = store.begin_write().expect("txn");
        {
            let tx = Tx::new(&txn);
            tx.put(&meta(ROOT_ID, 0, "", Kind::Dir, 1)).expect("put");
            for (i, name) in ["c", "a", "b"].iter().enumerate() {
                let id = 10 + i as u64;
                tx.put(&meta(id, ROOT_ID, name, Kind::Dir, 100 + id))
                    .expect("put");
                tx.link(ROOT_ID, name, id).expect("link");
                tx.set_ino(100 + id, id).expect("ino");
            }
            tx.put(&meta(20, 10, "x", Kind::File, 120)).expect("put");
            tx.link(10, "x", 20).expect("link");
            tx.set_ino(120, 20).expect("ino");
        }
        txn.commit().expect("commit");
        let r = store.read().expect("read");
        let (page, more) = r.entries(ROOT_ID, None, 2).expect("entries");
        assert_eq!(
            page.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(more);
        let (page, more) = r.entries(ROOT_ID, Some("b"), 2).expect("entries");
        assert_eq!(
            page.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert!(!more);
        assert_eq!(
            r.path_of(20).expect("path"),
            Some(vec!["c".to_owned(), "x".to_owned()])
        );
        drop(r);

        let txn = store.begin_write().expect("txn");
        {
            let tx = Tx::new(&txn);
            tx.unlink(ROOT_ID, "c").expect("unlink");
            assert_eq!(tx.forget_subtree(10).expect("forget"), 2);
            assert_eq!(tx.with_ino(120).expect("ino"), vec![]);
        }
        txn.commit().expect("commit");
        let r = store.read().expect("read");
        assert_eq!(r.meta(20).expect("meta"), None);
        assert_eq!(r.child_ids(10).expect("children"), vec![]);
    }

    #[test]
    fn journal_appends_in_order_and_compacts_the_oldest() {
        let (_dir, store) = open();
        for _ in 0..10 {
            let txn = store.begin_write().expect("txn");
            {
                let mut tx = Tx::new(&txn);
                let seq = tx.next_seq().expect("seq");
                let attr = meta(ROOT_ID, 0, "", Kind::Dir, 1).attr;
                tx.append(seq, 0, Some("k"), Change::SetAttr { attr })
                    .expect("append");
                tx.compact(4, 100).expect("compact");
            }
            txn.commit().expect("commit");
        }
        let r = store.read().expect("read");
        assert_eq!(r.last_seq().expect("last"), 10);
        assert_eq!(r.first_seq().expect("first"), 7);
        let recs: Vec<Record> = r
            .journal(0, 100)
            .expect("journal")
            .iter()
            .map(|b| serde_json::from_slice(b).expect("json"))
            .collect();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        assert_eq!(r.journal(8, 1).expect("journal").len(), 1);
    }

    #[test]
    fn applied_keys_and_intents_persist() {
        let (dir, store) = open();
        let txn = store.begin_write().expect("txn");
        let n;
        {
            let tx = Tx::new(&txn);
            let attr = meta(5, 1, "f", Kind::File, 9).attr;
            tx.put_key("gw:1", &KeyResult { attr, seq: 3 })
                .expect("key");
            n = tx.add_intent(b"intent").expect("intent");
        }
        txn.commit().expect("commit");
        drop(store);
        let store = Store::open(&dir.path().join("s.redb")).expect("reopen");
        let r = store.read().expect("read");
        assert_eq!(r.intents().expect("intents"), vec![(n, b"intent".to_vec())]);
        let txn = store.begin_write().expect("txn");
        let tx = Tx::new(&txn);
        assert_eq!(tx.key("gw:1").expect("key").map(|k| k.seq), Some(3));
        assert_eq!(tx.key("gw:2").expect("key"), None);
    }

    /// A store from before [`INODES`] (one id per inode number) gets the
    /// index rebuilt from its objects, both of two that share a number.
    #[test]
    fn a_store_with_one_id_per_inode_number_is_indexed_again_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        {
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("txn");
            {
                let mut objects = txn.open_table(OBJECTS).expect("objects");
                let mut old = txn.open_table(ONE_ID_PER_INODE).expect("old");
                for (id, ino) in [(ROOT_ID, 1), (2, 7), (3, 7)] {
                    let m = meta(id, ROOT_ID, &format!("n{id}"), Kind::File, ino);
                    let bytes = serde_json::to_vec(&m).expect("json");
                    objects.insert(id, bytes.as_slice()).expect("insert");
                    old.insert(ino, id).expect("insert");
                }
            }
            txn.commit().expect("commit");
        }
        let store = Store::open(&path).expect("open");
        let txn = store.begin_write().expect("txn");
        let tx = Tx::new(&txn);
        let ids = |ino| -> Vec<ObjectId> {
            let found = tx.with_ino(ino).expect("with_ino");
            found.iter().map(|m| m.attr.id).collect()
        };
        assert_eq!(ids(7), vec![2, 3]);
        assert_eq!(ids(1), vec![ROOT_ID]);
        use redb::TableHandle;
        assert!(
            txn.list_tables()
                .expect("tables")
                .all(|t| t.name() != ONE_ID_PER_INODE.name()),
            "the old table is gone"
        );
    }
}
