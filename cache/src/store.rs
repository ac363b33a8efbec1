//! The cache database: opening it, and typed read and write transactions
//! over its tables.
//!
//! Tables (all in one redb file, `imz-cache.redb`):
//!
//! | table | key | value |
//! |---|---|---|
//! | `objects` | fileid | [`Object`] (postcard) |
//! | `names` | (dir, name) | (fileid, cookie) |
//! | `entries` | (dir, cookie) | (fileid, name) |
//! | `origin_index` | origin id | fileid |
//! | `chunks` | (fileid, index) | bytes |
//! | `chunk_index` | (fileid, index) | chunk length |
//! | `meta` | name | bytes |
//! | `log` | sequence | a client modification log record (see `log`) |
//! | `conflicts` | id | a conflict the gateway met (its format is the gateway's) |
//! | `resync` | fileid | `()`: to be placed again as the origin has it (see the gateway's `resync`) |
//!
//! `names` and `entries` are two views of the same directory entries:
//! `names` answers LOOKUP, `entries` gives READDIR a stable order whose
//! cookies stay meaningful after other entries come and go. Cookies and
//! fileids come from one counter and are never reused.
//!
//! `chunk_index` mirrors the keys and lengths of `chunks` so that the byte
//! accounting can be rebuilt at open without reading the data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use crate::chunk::{self, CHUNK_SIZE};
use crate::chunkmemo::{ChunkGuard, ChunkMemo};
use crate::error::{CacheError, Result};
use crate::evict::{ChunkKey, EvictIndex};
use crate::objcache::ObjectCache;
use crate::object::{FileId, LOCAL_ID_BASE, Object};

pub(crate) const OBJECTS: TableDefinition<u64, &[u8]> = TableDefinition::new("objects");
pub(crate) const NAMES: TableDefinition<(u64, &str), (u64, u64)> = TableDefinition::new("names");
pub(crate) const ENTRIES: TableDefinition<(u64, u64), (u64, &str)> =
    TableDefinition::new("entries");
pub(crate) const ORIGIN_INDEX: TableDefinition<u64, u64> = TableDefinition::new("origin_index");
pub(crate) const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
pub(crate) const CHUNK_INDEX: TableDefinition<(u64, u64), u32> =
    TableDefinition::new("chunk_index");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const CONFLICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("conflicts");
pub(crate) const RESYNC: TableDefinition<u64, ()> = TableDefinition::new("resync");
/// For each object in [`RESYNC`] that the origin has: its origin id, so
/// that what the origin has is placed even if the cached object goes first
/// (released by the log as the target of a move that the origin took as
/// a free name). A table of its own: caches made before it have `resync`.
pub(crate) const RESYNC_ORIGIN: TableDefinition<u64, u64> = TableDefinition::new("resync_origin");

/// Bumped whenever a table's encoding changes incompatibly.
const FORMAT: u32 = 1;

/// Well-known `meta` keys.
pub mod meta {
    /// u32: on-disk format.
    pub const FORMAT: &str = "format";
    /// u64: NFS handle generation, random at creation, constant after.
    pub const GENERATION: &str = "generation";
    /// u64: next fileid/cookie to hand out.
    pub const NEXT_ID: &str = "next_id";
    /// u64: next client modification log sequence number.
    pub const NEXT_LOG_SEQ: &str = "next_log_seq";
    /// u64: the origin journal sequence the cache reflects.
    pub const CURSOR: &str = "cursor";
    /// string: store id of the origin the cache was filled from.
    pub const ORIGIN_STORE: &str = "origin_store";
    /// string: this gateway's id (prefix of its idempotency keys).
    pub const GATEWAY_ID: &str = "gateway_id";
    /// u64, 1 or 0: whether the origin served its tree read-only when it
    /// last said (what a gateway started while it is away goes by).
    pub const ORIGIN_READ_ONLY: &str = "origin_read_only";
    /// u64: the last unstable write (the gateway's unstable-write log) this
    /// state includes.
    pub const UNSTABLE_SEQ: &str = "unstable_seq";
    /// string: the boot id of the system that acknowledged unstable writes
    /// not yet known durable; empty or absent when there are none.
    pub const UNSTABLE_BOOT: &str = "unstable_boot";
}

/// The database file, in the cache directory.
pub const DB_FILE: &str = "imz-cache.redb";

/// Space taken by one chunk of `len` bytes, as accounted against capacity.
fn charged(len: u32) -> u64 {
    u64::from(len)
}

/// `bytes` up to its last non-zero byte.
fn without_trailing_zeros(bytes: &[u8]) -> &[u8] {
    // 64 bytes at a time, folded without branches (the compiler vectorises
    // it): an all-zero chunk is common, and is passed over at memory speed.
    let mut end = bytes.len();
    while end >= 64 && bytes[end - 64..end].iter().fold(0, |acc, &b| acc | b) == 0 {
        end -= 64;
    }
    while end > 0 && bytes[end - 1] == 0 {
        end -= 1;
    }
    &bytes[..end]
}

fn check_invariants_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("IMZ_CACHE_CHECK").is_some())
}

/// How much of the cache is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of file data held.
    pub used: u64,
    /// Of which dirty or pinned (never evicted).
    pub protected: u64,
    /// The configured bound.
    pub capacity: u64,
}

/// One directory entry as READDIR walks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub cookie: u64,
    pub name: String,
    pub fileid: FileId,
}

/// Result of reading a byte range.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRead {
    /// All bytes were present (holes read as zeros).
    Data(Vec<u8>),
    /// These chunks must be fetched from the origin first.
    Missing(Vec<u64>),
}

/// The gateway's persistent cache. Cheap to share behind an `Arc`; all
/// methods take `&self`. redb serialises write transactions, so at most one
/// [`WriteTxn`] is open at a time (others wait in [`Cache::write`]).
pub struct Cache {
    db: Database,
    path: PathBuf,
    evict: Mutex<EvictIndex>,
    objects: Mutex<ObjectCache>,
    chunk_memo: Mutex<ChunkMemo>,
    capacity: u64,
    generation: u64,
    /// Set once redb has latched a failed write (see [`Cache::storage_failure`]).
    failure: std::sync::OnceLock<String>,
    /// Told of that failure.
    failure_hook: std::sync::OnceLock<FailureHook>,
}

/// What [`Cache::on_storage_failure`] calls.
type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Opens (or creates) the cache in directory `dir`, bounding file data
    /// to `capacity` bytes.
    pub fn open(dir: &Path, capacity: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DB_FILE);
        let db = match Database::builder().set_cache_size(64 << 20).create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(CacheError::InUse {
                    path: path.display().to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let tx = db.begin_write()?;
        let generation;
        {
            let mut meta_t = tx.open_table(META)?;
            let format = {
                let v = meta_t.get(meta::FORMAT)?;
                v.map(|v| decode_u32(v.value())).transpose()?
            };
            match format {
                Some(found) if found != FORMAT => {
                    return Err(CacheError::Format {
                        path: path.display().to_string(),
                        found,
                        expected: FORMAT,
                    });
                }
                Some(_) => {}
                None => {
                    meta_t.insert(meta::FORMAT, FORMAT.to_le_bytes().as_slice())?;
                }
            }
            let stored = {
                let v = meta_t.get(meta::GENERATION)?;
                v.map(|v| decode_u64(v.value())).transpose()?
            };
            generation = match stored {
                Some(g) => g,
                None => {
                    let g = random_generation();
                    meta_t.insert(meta::GENERATION, g.to_le_bytes().as_slice())?;
                    g
                }
            };
            if meta_t.get(meta::NEXT_ID)?.is_none() {
                meta_t.insert(meta::NEXT_ID, LOCAL_ID_BASE.to_le_bytes().as_slice())?;
            }
            if meta_t.get(meta::NEXT_LOG_SEQ)?.is_none() {
                meta_t.insert(meta::NEXT_LOG_SEQ, 1u64.to_le_bytes().as_slice())?;
            }
        }
        // Create every table so that read transactions can always open them.
        tx.open_table(OBJECTS)?;
        tx.open_table(NAMES)?;
        tx.open_table(ENTRIES)?;
        tx.open_table(ORIGIN_INDEX)?;
        tx.open_table(CHUNKS)?;
        tx.open_table(CHUNK_INDEX)?;
        tx.open_table(LOG)?;
        tx.open_table(CONFLICTS)?;
        tx.open_table(RESYNC)?;
        tx.open_table(RESYNC_ORIGIN)?;
        tx.commit()?;

        let evict = Self::rebuild_accounting(&db)?;
        Ok(Self {
            db,
            path,
            evict: Mutex::new(evict),
            objects: Mutex::new(ObjectCache::new()),
            chunk_memo: Mutex::new(ChunkMemo::new()),
            capacity,
            generation,
            failure: std::sync::OnceLock::new(),
            failure_hook: std::sync::OnceLock::new(),
        })
    }

    fn rebuild_accounting(db: &Database) -> Result<EvictIndex> {
        let rx = db.begin_read()?;
        let objects = rx.open_table(OBJECTS)?;
        let index = rx.open_table(CHUNK_INDEX)?;
        let mut evict = EvictIndex::new();
        let mut protected_cache: HashMap<FileId, bool> = HashMap::new();
        for item in index.iter()? {
            let (key, len) = item?;
            let (fid, idx) = key.value();
            let len = len.value();
            let protected = match protected_cache.get(&fid) {
                Some(p) => *p,
                None => {
                    let p = match objects.get(fid)? {
                        Some(v) => is_protected(&decode_object(v.value())?),
                        None => false,
                    };
                    protected_cache.insert(fid, p);
                    p
                }
            };
            evict.added((fid, idx), len, !protected);
        }
        Ok(evict)
    }

    /// The NFS file handle generation of this cache: constant, unless
    /// [`Cache::renew_generation`] is called.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Moves to a new, greater handle generation, durably. Every file handle
    /// handed out before goes stale, and the NFS write verifier changes:
    /// the way to tell clients that writes they were told were unstable may
    /// have been lost.
    pub fn renew_generation(&mut self) -> Result<u64> {
        let next = self.generation.saturating_add(1);
        let mut tx = self.write()?;
        tx.put_meta_u64(meta::GENERATION, next)?;
        tx.commit(true)?;
        self.generation = next;
        Ok(next)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn usage(&self) -> Usage {
        let evict = self.lock_evict();
        Usage {
            used: evict.used,
            protected: evict.protected,
            capacity: self.capacity,
        }
    }

    /// Whether the disk holding the cache takes `bytes` more (see
    /// [`crate::disk`]).
    pub fn disk_takes(&self, bytes: u64) -> bool {
        self.path
            .parent()
            .is_none_or(|dir| crate::disk::takes(dir, bytes))
    }

    /// Whether `more` bytes of protected (dirty or pinned) data fit.
    pub fn has_room_for_protected(&self, more: u64) -> bool {
        let evict = self.lock_evict();
        evict.protected + more <= self.capacity
    }

    /// Starts a read transaction: a consistent snapshot.
    pub fn read(&self) -> Result<ReadTxn<'_>> {
        // Noted before the snapshot opens: see `objcache`.
        let epoch = self.lock_objects().epoch();
        let chunk_epoch = self.lock_chunk_memo().epoch();
        let tx = self.watch(self.db.begin_read().map_err(CacheError::from))?;
        Ok(ReadTxn {
            cache: self,
            tx,
            epoch,
            chunk_epoch,
        })
    }

    /// The latest committed version of object `fid`, from memory when it
    /// was read recently (no redb transaction, no decoding).
    pub fn object_now(&self, fid: FileId) -> Result<Option<Arc<Object>>> {
        if let Some(obj) = self.lock_objects().get(fid) {
            return Ok(Some(obj));
        }
        self.read()?.get_now(fid)
    }

    /// Starts a write transaction (waits for the current one to finish).
    pub fn write(&self) -> Result<WriteTxn<'_>> {
        Ok(WriteTxn {
            cache: self,
            tx: self.watch(self.db.begin_write().map_err(CacheError::from))?,
            chunk_changes: HashMap::new(),
            protect_changes: HashMap::new(),
        })
    }

    /// Why the database stopped working, if it did.
    ///
    /// redb latches the first write that fails (a full disk, an I/O error):
    /// from then on every transaction fails, reads too, until the database
    /// is opened again. Nothing committed durably is lost; the owner must
    /// reopen the cache (the gateway restarts itself, see its `restart`).
    pub fn storage_failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Calls `hook` when the database stops working (at once if it already
    /// has; a race between the two may call it twice). Only the first hook
    /// set is kept.
    pub fn on_storage_failure(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.failure_hook.set(Box::new(hook));
        if let Some(why) = self.failure.get() {
            self.tell_failure(why);
        }
    }

    /// Notes `result`'s error if it means redb has latched.
    fn watch<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(CacheError::Db(e)) = &result
            && matches!(e, redb::Error::PreviousIo | redb::Error::Io(_))
            && self.failure.set(e.to_string()).is_ok()
            && let Some(why) = self.failure.get()
        {
            tracing::error!(
                error = why,
                "the cache database stopped after a failed write"
            );
            self.tell_failure(why);
        }
        result
    }

    fn tell_failure(&self, why: &str) {
        if let Some(hook) = self.failure_hook.get() {
            hook(why);
        }
    }

    fn lock_objects(&self) -> std::sync::MutexGuard<'_, ObjectCache> {
        // The object cache only ever holds committed objects, whatever a
        // panicking holder was doing: safe to keep using.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_chunk_memo(&self) -> std::sync::MutexGuard<'_, ChunkMemo> {
        // Entries are whole (key, guard) pairs: a panicking holder cannot
        // leave a half-made one behind.
        self.chunk_memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_evict(&self) -> std::sync::MutexGuard<'_, EvictIndex> {
        // A panic while holding this lock leaves only a stale LRU order, never
        // wrong data, so a poisoned lock is safe to keep using.
        self.evict.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self, keys: Vec<ChunkKey>) {
        // Recency is a hint: skip it rather than wait behind a commit.
        if let Ok(mut evict) = self.evict.try_lock() {
            evict.touch(keys);
        }
    }
}

fn random_generation() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Keep it positive and well away from the nfs3_server default (startup
    // millis), whatever the clock says.
    (RandomState::new().hash_one(nanos) >> 1) | (1 << 62)
}

pub(crate) fn is_protected(obj: &Object) -> bool {
    obj.is_dirty() || obj.pinned
}

fn decode_u64(bytes: &[u8]) -> Result<u64> {
    bytes
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| CacheError::corrupt("meta value is not a u64"))
}

fn decode_u32(bytes: &[u8]) -> Result<u32> {
    bytes
        .try_into()
        .map(u32::from_le_bytes)
        .map_err(|_| CacheError::corrupt("meta value is not a u32"))
}

pub(crate) fn decode_object(bytes: &[u8]) -> Result<Object> {
    postcard::from_bytes(bytes).map_err(|e| CacheError::corrupt(format!("object: {e}")))
}

pub(crate) fn encode_object(obj: &Object) -> Result<Vec<u8>> {
    postcard::to_allocvec(obj).map_err(|e| CacheError::corrupt(format!("object: {e}")))
}

/// Getters shared by read and write transactions.
macro_rules! getters {
    () => {
        /// The object with this fileid.
        pub fn get(&self, fid: FileId) -> Result<Option<Object>> {
            let t = self.tx.open_table(OBJECTS)?;
            let v = t.get(fid)?;
            v.map(|v| decode_object(v.value())).transpose()
        }

        /// The object with this fileid, or [`CacheError::NoObject`].
        pub fn object(&self, fid: FileId) -> Result<Object> {
            self.get(fid)?.ok_or(CacheError::NoObject(fid))
        }

        /// The fileid named `name` in directory `dir`.
        pub fn lookup(&self, dir: FileId, name: &str) -> Result<Option<FileId>> {
            let t = self.tx.open_table(NAMES)?;
            let v = t.get((dir, name))?;
            Ok(v.map(|v| v.value().0))
        }

        /// The fileid of the object mirroring origin object `origin_id`.
        pub fn by_origin(&self, origin_id: u64) -> Result<Option<FileId>> {
            let t = self.tx.open_table(ORIGIN_INDEX)?;
            let v = t.get(origin_id)?;
            Ok(v.map(|v| v.value()))
        }

        /// Whether `fid`, or anything cached below it, has changes the log
        /// has not shipped: such a subtree must not be forgotten.
        pub fn holds_changes(&self, fid: FileId) -> Result<bool> {
            let mut stack = vec![fid];
            while let Some(fid) = stack.pop() {
                let Some(obj) = self.get(fid)? else { continue };
                if obj.is_dirty() {
                    return Ok(true);
                }
                if obj.is_dir() {
                    let mut cookie = 0;
                    loop {
                        let batch = self.entries(fid, cookie, 1024)?;
                        let Some(last) = batch.last() else { break };
                        cookie = last.cookie;
                        stack.extend(batch.iter().map(|e| e.fileid));
                    }
                }
            }
            Ok(false)
        }

        /// Whether `fid` is a directory that is here (not removed, kept
        /// only for the log).
        pub fn live_dir(&self, fid: FileId) -> Result<bool> {
            Ok(self.get(fid)?.is_some_and(|d| d.is_dir() && !d.removed))
        }

        /// Whether a pending log record names `fid` (in any role), or
        /// anything cached below it has changes: the log still needs it
        /// where it is.
        pub fn needed_by_log(&self, fid: FileId) -> Result<bool> {
            let named = self
                .get(fid)?
                .is_some_and(|o| o.log != crate::object::LogRefs::default());
            Ok(named || self.holds_changes(fid)?)
        }

        /// Up to `limit` entries of `dir` after `cookie` (0: from the start).
        pub fn entries(&self, dir: FileId, cookie: u64, limit: usize) -> Result<Vec<DirEntry>> {
            self.scan_entries(dir, cookie, limit, |e| Ok(Some(e)))
        }

        /// Up to `limit` of `dir`'s entries after `cookie`, each passed
        /// through `keep` (which may skip it).
        fn scan_entries<T>(
            &self,
            dir: FileId,
            cookie: u64,
            limit: usize,
            mut keep: impl FnMut(DirEntry) -> Result<Option<T>>,
        ) -> Result<Vec<T>> {
            let t = self.tx.open_table(ENTRIES)?;
            let start = cookie.saturating_add(1);
            let mut out = Vec::new();
            if start == 0 {
                return Ok(out);
            }
            for item in t.range((dir, start)..=(dir, u64::MAX))? {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item?;
                let (fileid, name) = v.value();
                let entry = DirEntry {
                    cookie: k.value().1,
                    name: name.to_owned(),
                    fileid,
                };
                if let Some(kept) = keep(entry)? {
                    out.push(kept);
                }
            }
            Ok(out)
        }

        /// Number of entries in `dir`.
        pub fn entry_count(&self, dir: FileId) -> Result<u64> {
            let t = self.tx.open_table(ENTRIES)?;
            let mut n = 0;
            for item in t.range((dir, 0)..=(dir, u64::MAX))? {
                item?;
                n += 1;
            }
            Ok(n)
        }

        /// A `meta` value.
        pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
            let t = self.tx.open_table(META)?;
            let v = t.get(key)?;
            Ok(v.map(|v| v.value().to_vec()))
        }

        /// A `meta` value stored as u64.
        pub fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
            self.meta(key)?.map(|v| decode_u64(&v)).transpose()
        }

        /// A `meta` value stored as a string.
        pub fn meta_str(&self, key: &str) -> Result<Option<String>> {
            self.meta(key)?
                .map(|v| String::from_utf8(v).map_err(|_| CacheError::corrupt("meta string")))
                .transpose()
        }

        /// Whether chunk `index` of `fid` is stored.
        pub fn has_chunk(&self, fid: FileId, index: u64) -> Result<bool> {
            let t = self.tx.open_table(CHUNK_INDEX)?;
            Ok(t.get((fid, index))?.is_some())
        }

        /// Stored chunk indexes of `fid`, ascending, with their lengths.
        pub fn chunks_of(&self, fid: FileId) -> Result<Vec<(u64, u32)>> {
            let t = self.tx.open_table(CHUNK_INDEX)?;
            let mut out = Vec::new();
            for item in t.range((fid, 0)..=(fid, u64::MAX))? {
                let (k, v) = item?;
                out.push((k.value().1, v.value()));
            }
            Ok(out)
        }

        /// Chunks of `obj` below its origin extent that are not stored.
        pub fn missing_chunks(&self, fid: FileId, obj: &Object) -> Result<Vec<u64>> {
            let t = self.tx.open_table(CHUNK_INDEX)?;
            let mut missing = Vec::new();
            for index in 0..chunk::count(obj.origin_extent.min(obj.attrs.size)) {
                if t.get((fid, index))?.is_none() {
                    missing.push(index);
                }
            }
            Ok(missing)
        }

        /// The stored bytes of one chunk.
        pub fn chunk(&self, fid: FileId, index: u64) -> Result<Option<Vec<u8>>> {
            let t = self.tx.open_table(CHUNKS)?;
            let v = t.get((fid, index))?;
            Ok(v.map(|v| v.value().to_vec()))
        }

        /// Log records in sequence order, from `from` on, at most `limit`.
        pub fn log_records(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
            let t = self.tx.open_table(LOG)?;
            let mut out = Vec::new();
            for item in t.range(from..)? {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        }

        /// The raw bytes of log record `seq`.
        pub fn log_bytes(&self, seq: u64) -> Result<Option<Vec<u8>>> {
            let t = self.tx.open_table(LOG)?;
            let v = t.get(seq)?;
            Ok(v.map(|v| v.value().to_vec()))
        }

        /// A log record.
        pub fn log_record(&self, seq: u64) -> Result<Option<crate::log::LogRecord>> {
            self.log_bytes(seq)?
                .map(|bytes| crate::log::decode(&bytes))
                .transpose()
        }

        /// Number of log records.
        pub fn log_len(&self) -> Result<u64> {
            let t = self.tx.open_table(LOG)?;
            Ok(t.len()?)
        }

        /// Every recorded conflict, oldest first.
        pub fn conflicts(&self) -> Result<Vec<(u64, Vec<u8>)>> {
            let t = self.tx.open_table(CONFLICTS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        }

        /// The origin id object `fid` had when it was marked, if any.
        pub fn resync_origin(&self, fid: FileId) -> Result<Option<u64>> {
            let t = self.tx.open_table(RESYNC_ORIGIN)?;
            Ok(t.get(fid)?.map(|v| v.value()))
        }

        /// Whether `fid` is marked to be placed again as the origin has it.
        pub fn marked_for_resync(&self, fid: FileId) -> Result<bool> {
            let t = self.tx.open_table(RESYNC)?;
            Ok(t.get(fid)?.is_some())
        }

        /// Objects marked to be placed again as the origin has them.
        pub fn resync_marks(&self) -> Result<Vec<FileId>> {
            let t = self.tx.open_table(RESYNC)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                out.push(item?.0.value());
            }
            Ok(out)
        }

        /// Up to `limit` objects with fileids from `start` on, in fileid
        /// order (for sweeps that page through the whole cache).
        pub fn objects_from(&self, start: FileId, limit: usize) -> Result<Vec<(FileId, Object)>> {
            let t = self.tx.open_table(OBJECTS)?;
            let mut out = Vec::new();
            for item in t.range(start..)? {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item?;
                out.push((k.value(), decode_object(v.value())?));
            }
            Ok(out)
        }

        /// Every object, in fileid order (for revalidation sweeps).
        pub fn all_fileids(&self) -> Result<Vec<FileId>> {
            let t = self.tx.open_table(OBJECTS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                out.push(item?.0.value());
            }
            Ok(out)
        }
    };
}

/// A consistent read-only view of the cache.
pub struct ReadTxn<'c> {
    cache: &'c Cache,
    tx: redb::ReadTransaction,
    /// The object cache's epoch when the snapshot was opened.
    epoch: u64,
    /// The chunk memo's epoch when the snapshot was opened.
    chunk_epoch: u64,
}

impl ReadTxn<'_> {
    getters!();

    /// Bytes `offset..offset+len` of `fid` (clipped to its size), or the
    /// chunks that must be fetched first. Chunks recently read come from the
    /// chunk memo (see `chunkmemo`) rather than from redb again.
    pub fn read_range(
        &self,
        fid: FileId,
        obj: &Object,
        offset: u64,
        len: u64,
    ) -> Result<RangeRead> {
        let size = obj.attrs.size;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(RangeRead::Data(Vec::new()));
        }
        let chunks = self.tx.open_table(CHUNKS)?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut missing = Vec::new();
        let mut touched = Vec::new();
        for index in chunk::covering(offset, end - offset) {
            let cstart = chunk::start_of(index);
            let from = offset.max(cstart);
            let to = end.min(cstart + CHUNK_SIZE);
            match self.chunk_guard(&chunks, (fid, index))? {
                Some(guard) => {
                    touched.push((fid, index));
                    if !missing.is_empty() {
                        continue;
                    }
                    let bytes = guard.value();
                    let lo = (from - cstart) as usize;
                    let hi = (to - cstart) as usize;
                    let have = bytes.len().min(hi);
                    if lo < have {
                        out.extend_from_slice(&bytes[lo..have]);
                    }
                    // Past the stored bytes of a chunk: a hole.
                    out.resize(out.len() + (hi - have.max(lo)), 0);
                }
                None if cstart < obj.origin_extent => missing.push(index),
                None => {
                    if missing.is_empty() {
                        out.resize(out.len() + (to - from) as usize, 0);
                    }
                }
            }
        }
        self.cache.touch(touched);
        if missing.is_empty() {
            Ok(RangeRead::Data(out))
        } else {
            Ok(RangeRead::Missing(missing))
        }
    }

    /// Reads chunks `indices` of `fid` into the chunk memo, ahead of a
    /// sequential reader, so that its next READs find them in memory.
    /// Chunks not stored here are skipped.
    pub fn read_ahead(&self, fid: FileId, indices: std::ops::Range<u64>) -> Result<()> {
        let chunks = self.tx.open_table(CHUNKS)?;
        for index in indices {
            self.chunk_guard(&chunks, (fid, index))?;
        }
        Ok(())
    }

    /// Chunk `key`, from the memo or from this snapshot (then memoised).
    fn chunk_guard(
        &self,
        chunks: &redb::ReadOnlyTable<(u64, u64), &'static [u8]>,
        key: ChunkKey,
    ) -> Result<Option<ChunkGuard>> {
        let memo = self.cache.lock_chunk_memo();
        if memo.epoch() == self.chunk_epoch
            && let Some(guard) = memo.get(key)
        {
            return Ok(Some(guard));
        }
        drop(memo);
        let Some(guard) = chunks.get(key)? else {
            return Ok(None);
        };
        let guard = Arc::new(guard);
        let pushed_out = self.cache.lock_chunk_memo().insert_if_current(
            self.chunk_epoch,
            key,
            Arc::clone(&guard),
        );
        drop(pushed_out);
        Ok(Some(guard))
    }

    /// Object `fid` as last committed: from the object cache if it is
    /// there (then possibly newer than this snapshot), otherwise from this
    /// snapshot.
    pub fn get_now(&self, fid: FileId) -> Result<Option<Arc<Object>>> {
        let objects = self.tx.open_table(OBJECTS)?;
        self.object_in(&objects, fid)
    }

    /// [`get_now`](Self::get_now), with the objects table already open.
    fn object_in(
        &self,
        objects: &redb::ReadOnlyTable<u64, &[u8]>,
        fid: FileId,
    ) -> Result<Option<Arc<Object>>> {
        if let Some(obj) = self.cache.lock_objects().get(fid) {
            return Ok(Some(obj));
        }
        let Some(stored) = objects.get(fid)? else {
            return Ok(None);
        };
        let obj = Arc::new(decode_object(stored.value())?);
        self.cache
            .lock_objects()
            .insert_if_current(self.epoch, fid, &obj);
        Ok(Some(obj))
    }

    /// Up to `limit` of `dir`'s entries after `cookie`, each with its object
    /// as [`get_now`](Self::get_now) gives it (entries whose object is gone
    /// are skipped). Opens each table once.
    pub fn entries_with_objects(
        &self,
        dir: FileId,
        cookie: u64,
        limit: usize,
    ) -> Result<Vec<(DirEntry, Arc<Object>)>> {
        let objects = self.tx.open_table(OBJECTS)?;
        self.scan_entries(dir, cookie, limit, |e| {
            Ok(self.object_in(&objects, e.fileid)?.map(|obj| (e, obj)))
        })
    }
}

/// A write transaction. Dropping it without [`commit`](Self::commit)
/// discards every change.
pub struct WriteTxn<'c> {
    cache: &'c Cache,
    tx: redb::WriteTransaction,
    /// Chunk key -> (length before this transaction, length now).
    chunk_changes: HashMap<ChunkKey, (Option<u32>, Option<u32>)>,
    /// Every object this transaction wrote or removed: fileid ->
    /// (protected before, protected now). Its keys leave the object cache
    /// at commit.
    protect_changes: HashMap<FileId, (bool, bool)>,
}

impl WriteTxn<'_> {
    getters!();

    /// Whether `more` bytes of dirty data still fit the cache.
    pub fn cache_room_for_protected(&self, more: u64) -> bool {
        self.cache.has_room_for_protected(more)
    }

    /// Whether the disk holding the cache takes `bytes` more.
    pub fn disk_takes(&self, bytes: u64) -> bool {
        self.cache.disk_takes(bytes)
    }

    /// Hands out a fresh local fileid or cookie (never reused).
    pub fn alloc_id(&mut self) -> Result<u64> {
        let next = self.meta_u64(meta::NEXT_ID)?.unwrap_or(LOCAL_ID_BASE);
        self.put_meta(meta::NEXT_ID, &(next + 1).to_le_bytes())?;
        Ok(next)
    }

    /// Hands out the next log sequence number.
    pub fn alloc_log_seq(&mut self) -> Result<u64> {
        let next = self.meta_u64(meta::NEXT_LOG_SEQ)?.unwrap_or(1);
        self.put_meta(meta::NEXT_LOG_SEQ, &(next + 1).to_le_bytes())?;
        Ok(next)
    }

    pub fn put_meta(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut t = self.tx.open_table(META)?;
        t.insert(key, value)?;
        Ok(())
    }

    pub fn put_meta_u64(&mut self, key: &str, value: u64) -> Result<()> {
        self.put_meta(key, &value.to_le_bytes())
    }

    /// Stores `obj` under `fid` (insert or replace), keeping the origin index
    /// and the eviction accounting in step.
    ///
    /// The object's log references belong to the client modification log
    /// (see `log`): when replacing an object, the stored references are kept
    /// and `obj.log` is ignored, so that a caller holding an object read
    /// before a `log` call can never undo what the log recorded.
    pub fn put(&mut self, fid: FileId, obj: &Object) -> Result<()> {
        match self.get(fid)? {
            Some(old) if old.log != obj.log => {
                let mut obj = obj.clone();
                obj.log = old.log.clone();
                self.put_raw(fid, &obj, Some(old))
            }
            old => self.put_raw(fid, obj, old),
        }
    }

    /// [`put`](Self::put) including `obj.log` (for the log module).
    pub(crate) fn put_with_log(&mut self, fid: FileId, obj: &Object) -> Result<()> {
        let old = self.get(fid)?;
        self.put_raw(fid, obj, old)
    }

    fn put_raw(&mut self, fid: FileId, obj: &Object, old: Option<Object>) -> Result<()> {
        let bytes = encode_object(obj)?;
        {
            let mut t = self.tx.open_table(OBJECTS)?;
            t.insert(fid, bytes.as_slice())?;
        }
        let old_origin = old.as_ref().and_then(|o| o.origin.map(|r| r.id));
        let new_origin = obj.origin.map(|r| r.id);
        if old_origin != new_origin {
            let mut t = self.tx.open_table(ORIGIN_INDEX)?;
            if let Some(id) = old_origin
                && t.get(id)?.map(|v| v.value()) == Some(fid)
            {
                t.remove(id)?;
            }
            if let Some(id) = new_origin {
                t.insert(id, fid)?;
            }
        }
        let was = old.as_ref().is_some_and(is_protected);
        self.note_protection(fid, was, is_protected(obj));
        Ok(())
    }

    fn note_protection(&mut self, fid: FileId, was: bool, now: bool) {
        let entry = self.protect_changes.entry(fid).or_insert((was, was));
        entry.1 = now;
    }

    /// Fast path for filling a directory from an origin listing: inserts
    /// each `(name, fid, obj)` whose origin id, fileid and name are all new,
    /// with every table opened once and one block of cookies. Returns the
    /// indexes of the items it left alone (for the general path). Objects
    /// given here must be clean and unpinned.
    pub fn insert_new_entries(
        &mut self,
        dir: FileId,
        items: &[(&str, FileId, Object)],
    ) -> Result<Vec<usize>> {
        let first_cookie = self.meta_u64(meta::NEXT_ID)?.unwrap_or(LOCAL_ID_BASE);
        self.put_meta(
            meta::NEXT_ID,
            &(first_cookie + items.len() as u64).to_le_bytes(),
        )?;
        let mut rest = Vec::new();
        let mut objects = self.tx.open_table(OBJECTS)?;
        let mut names = self.tx.open_table(NAMES)?;
        let mut entries = self.tx.open_table(ENTRIES)?;
        let mut origin_index = self.tx.open_table(ORIGIN_INDEX)?;
        for (i, (name, fid, obj)) in items.iter().enumerate() {
            let Some(origin) = obj.origin else {
                rest.push(i);
                continue;
            };
            if is_protected(obj)
                || origin_index.get(origin.id)?.is_some()
                || objects.get(*fid)?.is_some()
                || names.get((dir, *name))?.is_some()
            {
                rest.push(i);
                continue;
            }
            objects.insert(*fid, encode_object(obj)?.as_slice())?;
            self.protect_changes.entry(*fid).or_insert((false, false));
            origin_index.insert(origin.id, *fid)?;
            let cookie = first_cookie + i as u64;
            names.insert((dir, *name), (*fid, cookie))?;
            entries.insert((dir, cookie), (*fid, *name))?;
        }
        Ok(rest)
    }

    /// Creates an object named `name` in `dir` with a fresh fileid.
    pub fn create(&mut self, dir: FileId, name: &str, obj: &Object) -> Result<FileId> {
        let fid = self.alloc_id()?;
        self.put(fid, obj)?;
        self.link(dir, name, fid)?;
        Ok(fid)
    }

    /// [`WriteTxn::create`] under a fileid handed out before, by a commit
    /// a crash undid (a change replayed from the unstable-write log): ids
    /// handed out meanwhile by other commits the crash undid may differ, so
    /// `fid` is taken as given, and never handed out again.
    pub fn create_as(&mut self, dir: FileId, name: &str, obj: &Object, fid: FileId) -> Result<()> {
        if fid < LOCAL_ID_BASE || self.get(fid)?.is_some() {
            return Err(CacheError::Corrupt(format!(
                "fileid {fid} cannot be created again"
            )));
        }
        let next = self.meta_u64(meta::NEXT_ID)?.unwrap_or(LOCAL_ID_BASE);
        if next <= fid {
            self.put_meta(meta::NEXT_ID, &(fid + 1).to_le_bytes())?;
        }
        self.put(fid, obj)?;
        self.link(dir, name, fid)?;
        Ok(())
    }

    /// Adds entry `name` -> `fid` to `dir`, replacing any entry of that name.
    /// Returns the replaced fileid.
    pub fn link(&mut self, dir: FileId, name: &str, fid: FileId) -> Result<Option<FileId>> {
        let replaced = self.unlink(dir, name)?;
        let cookie = self.alloc_id()?;
        {
            let mut names = self.tx.open_table(NAMES)?;
            names.insert((dir, name), (fid, cookie))?;
        }
        let mut entries = self.tx.open_table(ENTRIES)?;
        entries.insert((dir, cookie), (fid, name))?;
        Ok(replaced)
    }

    /// Removes entry `name` from `dir` (the object itself stays). Returns the
    /// fileid it named.
    pub fn unlink(&mut self, dir: FileId, name: &str) -> Result<Option<FileId>> {
        let old = {
            let mut names = self.tx.open_table(NAMES)?;
            names.remove((dir, name))?.map(|v| v.value())
        };
        if let Some((fid, cookie)) = old {
            let mut entries = self.tx.open_table(ENTRIES)?;
            entries.remove((dir, cookie))?;
            return Ok(Some(fid));
        }
        Ok(None)
    }

    /// Removes entry `name` from `dir` if it names `fid` (and leaves a name
    /// that now leads elsewhere alone).
    pub fn unlink_if(&mut self, dir: FileId, name: &str, fid: FileId) -> Result<()> {
        if self.lookup(dir, name)? == Some(fid) {
            self.unlink(dir, name)?;
        }
        Ok(())
    }

    /// Deletes object `fid` with its data. For a directory, its entries and
    /// everything below them go too. The caller unlinks it from its parent.
    /// Objects the client modification log still refers to are only
    /// unlinked and marked removed; the log deletes them when done.
    pub fn remove_tree(&mut self, fid: FileId) -> Result<()> {
        let mut stack = vec![fid];
        while let Some(fid) = stack.pop() {
            let Some(obj) = self.get(fid)? else { continue };
            if obj.log != crate::object::LogRefs::default() {
                // The log still needs it: keep it, unlinked, with its data
                // and what is below it.
                let mut kept = obj;
                kept.removed = true;
                self.put(fid, &kept)?;
                continue;
            }
            if obj.is_dir() {
                loop {
                    let batch = self.entries(fid, 0, 1024)?;
                    if batch.is_empty() {
                        break;
                    }
                    for e in batch {
                        self.unlink(fid, &e.name)?;
                        stack.push(e.fileid);
                    }
                }
            }
            self.drop_data(fid)?;
            if let Some(origin) = obj.origin {
                let mut t = self.tx.open_table(ORIGIN_INDEX)?;
                if t.get(origin.id)?.map(|v| v.value()) == Some(fid) {
                    t.remove(origin.id)?;
                }
            }
            {
                let mut t = self.tx.open_table(OBJECTS)?;
                t.remove(fid)?;
            }
            self.note_protection(fid, is_protected(&obj), false);
        }
        Ok(())
    }

    /// Stores chunk `index` of `fid` (clean data from the origin or a full
    /// chunk of local data), replacing any stored chunk.
    ///
    /// Trailing zeros are not stored: past its stored bytes a chunk reads
    /// as zeros. So a sparse file, or any run of zeros, takes next to no
    /// room in the cache.
    pub fn put_chunk(&mut self, fid: FileId, index: u64, bytes: &[u8]) -> Result<()> {
        let bytes = without_trailing_zeros(bytes);
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| u64::from(*l) <= CHUNK_SIZE)
            .ok_or_else(|| CacheError::corrupt("chunk longer than CHUNK_SIZE"))?;
        let old = {
            let mut idx = self.tx.open_table(CHUNK_INDEX)?;

            idx.insert((fid, index), len)?.map(|v| v.value())
        };
        {
            let mut t = self.tx.open_table(CHUNKS)?;
            t.insert((fid, index), bytes)?;
        }
        self.note_chunk(fid, index, old, Some(len));
        Ok(())
    }

    fn note_chunk(&mut self, fid: FileId, index: u64, old: Option<u32>, new: Option<u32>) {
        let entry = self.chunk_changes.entry((fid, index)).or_insert((old, old));
        entry.1 = new;
    }

    /// Deletes chunk `index` of `fid` if stored.
    pub fn delete_chunk(&mut self, fid: FileId, index: u64) -> Result<()> {
        let old = {
            let mut idx = self.tx.open_table(CHUNK_INDEX)?;

            idx.remove((fid, index))?.map(|v| v.value())
        };
        if old.is_some() {
            {
                let mut t = self.tx.open_table(CHUNKS)?;
                t.remove((fid, index))?;
            }
            self.note_chunk(fid, index, old, None);
        }
        Ok(())
    }

    /// Deletes every stored chunk of `fid`.
    pub fn drop_data(&mut self, fid: FileId) -> Result<()> {
        self.drop_chunks_except(fid, &[])
    }

    /// Drops the stored chunks of `fid` but those in `kept` (sorted).
    pub fn drop_chunks_except(&mut self, fid: FileId, kept: &[u64]) -> Result<()> {
        for (index, _) in self.chunks_of(fid)? {
            if kept.binary_search(&index).is_err() {
                self.delete_chunk(fid, index)?;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` into file `fid`, updating `obj`'s size (the
    /// caller stores `obj`).
    ///
    /// A written file must not depend on the origin any more: its content
    /// will be uploaded whole, possibly after the origin has moved on and
    /// can no longer give the old bytes. So every chunk that still has
    /// bytes at the origin and is not entirely overwritten needs those bytes
    /// first: `fetched` supplies them (the chunk's origin bytes by index);
    /// without them the write fails with [`CacheError::NeedFetch`] listing
    /// every such chunk, having changed nothing. Afterwards the file is
    /// wholly in the cache (`origin_extent` is 0).
    pub fn write_data(
        &mut self,
        fid: FileId,
        obj: &mut Object,
        offset: u64,
        data: &[u8],
        fetched: &dyn Fn(u64) -> Option<Vec<u8>>,
    ) -> Result<()> {
        let end = chunk::write_end(offset, data.len() as u64).ok_or(CacheError::TooLarge {
            max: chunk::MAX_FILE_SIZE,
        })?;
        let mut plan = Vec::new();
        let mut missing = Vec::new();
        for index in chunk::covering(offset, data.len() as u64) {
            let cstart = chunk::start_of(index);
            let from = offset.max(cstart);
            let to = end.min(cstart + CHUNK_SIZE);
            let whole =
                from == cstart && (to == cstart + CHUNK_SIZE || to >= obj.attrs.size.max(end));
            // A chunk the write covers whole keeps nothing of its old bytes:
            // not worth reading.
            let old = if whole { None } else { self.chunk(fid, index)? };
            let base = match old {
                Some(existing) => existing,
                None if whole => Vec::new(),
                None if cstart < obj.origin_extent => match fetched(index) {
                    Some(bytes) => bytes,
                    None => {
                        missing.push(index);
                        continue;
                    }
                },
                None => Vec::new(),
            };
            plan.push((index, cstart, from, to, base));
        }
        // Origin bytes the write does not touch.
        let mut untouched = Vec::new();
        let touched = chunk::covering(offset, data.len() as u64);
        for index in 0..chunk::count(obj.origin_extent.min(obj.attrs.size)) {
            if touched.contains(&index) || self.has_chunk(fid, index)? {
                continue;
            }
            match fetched(index) {
                Some(bytes) => untouched.push((index, bytes)),
                None => missing.push(index),
            }
        }
        if !missing.is_empty() {
            missing.sort_unstable();
            return Err(CacheError::NeedFetch {
                fileid: fid,
                indexes: missing,
            });
        }
        for (index, bytes) in untouched {
            self.put_chunk(fid, index, &bytes)?;
        }
        obj.origin_extent = 0;
        for (index, cstart, from, to, mut buf) in plan {
            let lo = (from - cstart) as usize;
            let hi = (to - cstart) as usize;
            if buf.len() < hi {
                // Bytes between the old end and the write are a hole (zeros),
                // but only up to the file size: beyond it nothing is stored.
                buf.resize(hi, 0);
            }
            buf[lo..hi].copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            self.put_chunk(fid, index, &buf)?;
        }
        if end > obj.attrs.size {
            obj.attrs.size = end;
        }
        Ok(())
    }

    /// Sets the size of file `fid` to `size`: drops chunks past it, trims
    /// the last one, and forgets origin bytes past it (the caller stores
    /// `obj`). Growing leaves a hole.
    pub fn truncate_data(&mut self, fid: FileId, obj: &mut Object, size: u64) -> Result<()> {
        if size > chunk::MAX_FILE_SIZE {
            return Err(CacheError::TooLarge {
                max: chunk::MAX_FILE_SIZE,
            });
        }
        if size < obj.attrs.size {
            for (index, len) in self.chunks_of(fid)? {
                let cstart = chunk::start_of(index);
                if cstart >= size {
                    self.delete_chunk(fid, index)?;
                } else if cstart + u64::from(len) > size {
                    let keep = (size - cstart) as usize;
                    if let Some(mut bytes) = self.chunk(fid, index)? {
                        bytes.truncate(keep);
                        self.put_chunk(fid, index, &bytes)?;
                    }
                }
            }
        }
        obj.origin_extent = obj.origin_extent.min(size);
        obj.attrs.size = size;
        Ok(())
    }

    /// Appends a log record, returning its sequence number.
    pub fn append_log(&mut self, record: &[u8]) -> Result<u64> {
        let seq = self.alloc_log_seq()?;
        let mut t = self.tx.open_table(LOG)?;
        t.insert(seq, record)?;
        Ok(seq)
    }

    /// Replaces the log record `seq`.
    pub fn put_log(&mut self, seq: u64, record: &[u8]) -> Result<()> {
        let mut t = self.tx.open_table(LOG)?;
        t.insert(seq, record)?;
        Ok(())
    }

    /// Records (or replaces) conflict `id`.
    pub fn put_conflict(&mut self, id: u64, record: &[u8]) -> Result<()> {
        let mut t = self.tx.open_table(CONFLICTS)?;
        t.insert(id, record)?;
        Ok(())
    }

    /// Marks `fid` to be placed again as the origin has it, once the log
    /// no longer needs it.
    pub fn mark_resync(&mut self, fid: FileId) -> Result<()> {
        let origin = self.get(fid)?.and_then(|o| o.origin).map(|o| o.id);
        let mut t = self.tx.open_table(RESYNC)?;
        t.insert(fid, ())?;
        let mut ids = self.tx.open_table(RESYNC_ORIGIN)?;
        match origin {
            Some(id) => ids.insert(fid, id)?,
            None => ids.remove(fid)?,
        };
        Ok(())
    }

    pub fn unmark_resync(&mut self, fid: FileId) -> Result<()> {
        let mut t = self.tx.open_table(RESYNC)?;
        t.remove(fid)?;
        let mut ids = self.tx.open_table(RESYNC_ORIGIN)?;
        ids.remove(fid)?;
        Ok(())
    }

    /// Forgets conflict `id`.
    pub fn remove_conflict(&mut self, id: u64) -> Result<()> {
        let mut t = self.tx.open_table(CONFLICTS)?;
        t.remove(id)?;
        Ok(())
    }

    /// Removes log record `seq`.
    pub fn remove_log(&mut self, seq: u64) -> Result<()> {
        let mut t = self.tx.open_table(LOG)?;
        t.remove(seq)?;
        Ok(())
    }

    /// Commits. `durable` waits for the data to be on disk. Use it for
    /// anything a client may have been told: a name, a handle's object, a
    /// write reported stable. A non-durable commit may be lost by a crash
    /// (redb returns to the last durable commit), which is fine only for
    /// clean data that can be fetched again.
    ///
    /// Before committing, evicts least recently used clean chunks until the
    /// file data fits the capacity again.
    pub fn commit(mut self, durable: bool) -> Result<()> {
        if check_invariants_enabled() {
            self.check_invariants()?;
        }
        let cache = self.cache;
        // Hold the accounting lock across commit and update, so that the next
        // writer sees the index as this commit leaves it.
        let mut evict = cache.lock_evict();
        self.evict_for_room(&evict)?;
        // Chunks of objects whose protection changed move between pools.
        let mut moves = Vec::new();
        for (&fid, &(was, now)) in &self.protect_changes {
            if was != now {
                for (index, len) in self.chunks_of(fid)? {
                    moves.push(((fid, index), len, now));
                }
            }
        }
        let mut final_protected: HashMap<FileId, bool> = HashMap::new();
        for &(fid, _) in self.chunk_changes.keys() {
            if let std::collections::hash_map::Entry::Vacant(slot) = final_protected.entry(fid) {
                let p = self.get(fid)?.as_ref().is_some_and(is_protected);
                slot.insert(p);
            }
        }
        let mut tx = self.tx;
        tx.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let committed = cache.watch(tx.commit().map_err(CacheError::from));
        // Objects this transaction may have changed leave the object cache
        // even if the commit failed: whichever state redb is in, the next
        // read goes to it.
        cache
            .lock_objects()
            .committed(self.protect_changes.keys().copied());
        cache.lock_chunk_memo().committed(self.chunk_changes.keys());
        committed?;

        for (key, (old, new)) in self.chunk_changes {
            if let Some(len) = old {
                evict.removed(key, len);
            }
            if let Some(len) = new {
                let protected = final_protected.get(&key.0).copied().unwrap_or(false);
                evict.added(key, len, !protected);
            }
        }
        for (key, len, protect) in moves {
            if protect {
                evict.protect(key, len);
            } else {
                evict.release(key, len);
            }
        }
        Ok(())
    }

    /// Verifies the cache's invariants over the whole database (slow: for
    /// tests, enabled by the `IMZ_CACHE_CHECK` environment variable, which
    /// makes every commit check them and fail loudly if one is broken):
    /// - every directory entry names an object, and `names` and `entries`
    ///   agree;
    /// - every object but the root and those removed is linked at its
    ///   `(parent, name)`; removed objects are not;
    /// - every log record is listed in its object's `log.ops`, and every
    ///   `log.ops` entry is a record about that object;
    /// - an object the origin does not have has a pending create.
    pub fn check_invariants(&self) -> Result<()> {
        let fail = |what: String| Err(CacheError::corrupt(format!("invariant broken: {what}")));
        let names = self.tx.open_table(NAMES)?;
        let entries = self.tx.open_table(ENTRIES)?;
        let objects = self.tx.open_table(OBJECTS)?;
        for item in entries.iter()? {
            let (k, v) = item?;
            let (dir, cookie) = k.value();
            let (fid, name) = v.value();
            if objects.get(fid)?.is_none() {
                return fail(format!("entry {dir}/{name} names missing object {fid}"));
            }
            match names.get((dir, name))? {
                Some(n) if n.value() == (fid, cookie) => {}
                other => {
                    return fail(format!(
                        "entry {dir}/{name}: names says {:?}",
                        other.map(|v| v.value())
                    ));
                }
            }
        }
        let mut log_refs: HashMap<FileId, Vec<u64>> = HashMap::new();
        let log = self.tx.open_table(LOG)?;
        for item in log.iter()? {
            let (k, v) = item?;
            let rec = crate::log::decode(v.value())?;
            log_refs
                .entry(rec.op.primary())
                .or_default()
                .push(k.value());
        }
        for item in objects.iter()? {
            let (k, v) = item?;
            let fid = k.value();
            let obj = decode_object(v.value())?;
            let linked = names
                .get((obj.parent, obj.name.as_str()))?
                .map(|v| v.value().0)
                == Some(fid);
            if fid != crate::object::ROOT_FILEID && obj.removed == linked {
                return fail(format!(
                    "object {fid} ({}/{}) removed={} but linked={linked}",
                    obj.parent, obj.name, obj.removed
                ));
            }
            if obj.origin.is_none() && obj.log.create.is_none() && fid != crate::object::ROOT_FILEID
            {
                return fail(format!(
                    "object {fid} ({}/{}) is at neither the origin nor in the log",
                    obj.parent, obj.name
                ));
            }
            let mut ops = obj.log.ops.clone();
            ops.sort_unstable();
            let mut want = log_refs.remove(&fid).unwrap_or_default();
            want.sort_unstable();
            if ops != want {
                return fail(format!(
                    "object {fid} lists log records {ops:?}, the log has {want:?}"
                ));
            }
        }
        if let Some((fid, seqs)) = log_refs.into_iter().next() {
            return fail(format!(
                "log records {seqs:?} are about missing object {fid}"
            ));
        }
        Ok(())
    }

    /// Deletes least recently used clean chunks (not touched by this
    /// transaction) until the data fits the capacity.
    fn evict_for_room(&mut self, evict: &EvictIndex) -> Result<()> {
        let delta: i64 = self
            .chunk_changes
            .values()
            .map(|(old, new)| charged(new.unwrap_or(0)) as i64 - charged(old.unwrap_or(0)) as i64)
            .sum();
        let projected = (evict.used as i64 + delta).max(0) as u64;
        if projected <= self.cache.capacity {
            return Ok(());
        }
        let target = self.cache.capacity.saturating_sub(delta.max(0) as u64);
        let touched: std::collections::HashSet<FileId> = self
            .chunk_changes
            .keys()
            .map(|k| k.0)
            .chain(self.protect_changes.keys().copied())
            .collect();
        let victims = evict.victims(target, |k| touched.contains(&k.0));
        for ((fid, index), _) in victims {
            self.delete_chunk(fid, index)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{Kind, ROOT_FILEID};

    fn file(size: u64, origin_extent: u64) -> Object {
        let mut obj = Object {
            name: "f".into(),
            origin_extent,
            ..Object::sample(Kind::File)
        };
        obj.attrs.size = size;
        obj
    }

    fn open(capacity: u64) -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), capacity).expect("open");
        (dir, cache)
    }

    #[test]
    fn a_subtree_holds_changes_while_anything_in_it_has_a_pending_record() {
        let (_dir, cache) = open(1 << 20);
        let mut tx = cache.write().expect("write");
        let top = tx
            .create(ROOT_FILEID, "top", &Object::sample(Kind::Dir))
            .expect("mkdir");
        let d = tx
            .create(top, "d", &Object::sample(Kind::Dir))
            .expect("mkdir");
        let f = tx.create(d, "f", &file(0, 0)).expect("create");
        assert!(!tx.holds_changes(top).expect("top"));
        tx.log(crate::LogOp::Store { fid: f }, 0).expect("log");
        for fid in [f, d, top] {
            assert!(tx.holds_changes(fid).expect("holds"), "{fid}");
            assert!(tx.needed_by_log(fid).expect("needed"), "{fid}");
        }
        let other = tx
            .create(ROOT_FILEID, "e", &Object::sample(Kind::Dir))
            .expect("mkdir");
        assert!(!tx.holds_changes(other).expect("other"));
    }

    /// A mark remembers the origin id of what it marks, so that resync can
    /// place what the origin has after the cached object is gone; an
    /// unmark forgets both.
    #[test]
    fn a_resync_mark_keeps_the_origin_id_until_unmarked() {
        let (_dir, cache) = open(1 << 20);
        let mut tx = cache.write().expect("write");
        let mut known = file(0, 0);
        known.origin = Some(crate::object::OriginRef { id: 45, version: 3 });
        let f = tx.create(ROOT_FILEID, "f", &known).expect("create");
        let local = tx.create(ROOT_FILEID, "g", &file(0, 0)).expect("create");
        tx.mark_resync(f).expect("mark");
        tx.mark_resync(local).expect("mark");
        tx.unlink(ROOT_FILEID, "f").expect("unlink");
        tx.remove_tree(f).expect("forget");
        assert_eq!(tx.resync_marks().expect("marks"), vec![f, local]);
        assert_eq!(tx.resync_origin(f).expect("origin"), Some(45));
        assert_eq!(tx.resync_origin(local).expect("origin"), None);
        tx.unmark_resync(f).expect("unmark");
        assert_eq!(tx.resync_origin(f).expect("origin"), None);
    }

    #[test]
    fn generation_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g1 = Cache::open(dir.path(), 1 << 20).expect("open").generation();
        let g2 = Cache::open(dir.path(), 1 << 20)
            .expect("reopen")
            .generation();
        assert_eq!(g1, g2);
    }

    #[test]
    fn missing_origin_bytes_are_reported_and_holes_read_as_zeros() {
        let (_d, cache) = open(64 << 20);
        let size = 3 * CHUNK_SIZE;
        let obj = file(size, 2 * CHUNK_SIZE);
        let mut tx = cache.write().expect("write");
        tx.put(10, &obj).expect("put");
        tx.put_chunk(10, 0, &vec![7u8; CHUNK_SIZE as usize])
            .expect("chunk");
        tx.commit(false).expect("commit");

        let rx = cache.read().expect("read");
        assert_eq!(
            rx.read_range(10, &obj, 0, 10).expect("read"),
            RangeRead::Data(vec![7; 10])
        );
        assert_eq!(
            rx.read_range(10, &obj, CHUNK_SIZE - 5, 10).expect("read"),
            RangeRead::Missing(vec![1])
        );
        // Chunk 2 is past the origin extent: a hole.
        assert_eq!(
            rx.read_range(10, &obj, 2 * CHUNK_SIZE, 4).expect("read"),
            RangeRead::Data(vec![0; 4])
        );
        // Reads are clamped to the size.
        assert_eq!(
            rx.read_range(10, &obj, size - 2, 100).expect("read"),
            RangeRead::Data(vec![0; 2])
        );
    }

    #[test]
    fn zeros_at_the_end_of_a_chunk_take_no_room_and_read_back() {
        let (_d, cache) = open(64 << 20);
        let obj = file(3 * CHUNK_SIZE, 3 * CHUNK_SIZE);
        let mut tail = vec![0u8; CHUNK_SIZE as usize];
        tail[..13].fill(9);
        tail[20] = 1;
        let mut tx = cache.write().expect("write");
        tx.put(10, &obj).expect("put");
        tx.put_chunk(10, 0, &vec![0u8; CHUNK_SIZE as usize])
            .expect("zeros");
        tx.put_chunk(10, 1, &tail).expect("tail");
        tx.put_chunk(10, 2, &vec![5u8; CHUNK_SIZE as usize])
            .expect("full");
        tx.commit(false).expect("commit");

        let rx = cache.read().expect("read");
        assert_eq!(
            rx.chunks_of(10).expect("chunks"),
            vec![(0, 0), (1, 21), (2, CHUNK_SIZE as u32)]
        );
        assert_eq!(cache.usage().used, 21 + CHUNK_SIZE);
        let RangeRead::Data(all) = rx.read_range(10, &obj, 0, 3 * CHUNK_SIZE).expect("read") else {
            panic!("stored chunks reported missing");
        };
        let mut want = vec![0u8; CHUNK_SIZE as usize];
        want.extend_from_slice(&tail);
        want.extend_from_slice(&vec![5u8; CHUNK_SIZE as usize]);
        assert!(all == want, "read back differs");
        assert_eq!(without_trailing_zeros(&[0, 1, 0, 0]), &[0, 1]);
        assert_eq!(without_trailing_zeros(&[0; 17]), &[] as &[u8]);
        assert_eq!(without_trailing_zeros(&[3; 9]), &[3; 9]);
    }

    #[test]
    fn writes_splice_into_chunks_and_need_origin_bytes_first() {
        let (_d, cache) = open(64 << 20);
        let mut obj = file(0, 0);
        let mut tx = cache.write().expect("write");
        let payload: Vec<u8> = (0..3 * CHUNK_SIZE / 2).map(|i| (i % 251) as u8).collect();
        tx.write_data(11, &mut obj, 100, &payload, &|_| None)
            .expect("write");
        assert_eq!(obj.attrs.size, 100 + payload.len() as u64);
        tx.put(11, &obj).expect("put");
        tx.commit(true).expect("commit");
        let rx = cache.read().expect("read");
        let RangeRead::Data(all) = rx.read_range(11, &obj, 0, u64::MAX).expect("read") else {
            panic!("expected data")
        };
        assert_eq!(&all[..100], &[0u8; 100][..]);
        assert_eq!(&all[100..], &payload[..]);
        drop(rx);

        // Writing into a file whose bytes are at the origin must not invent
        // bytes, and must leave nothing depending on the origin: every
        // origin chunk the write does not wholly replace is needed first.
        let mut remote = file(3 * CHUNK_SIZE, 3 * CHUNK_SIZE);
        let mut tx = cache.write().expect("write");
        let err = tx
            .write_data(12, &mut remote, 10, b"abc", &|_| None)
            .expect_err("needs fetch");
        assert!(
            matches!(err, CacheError::NeedFetch { fileid: 12, ref indexes } if indexes == &[0, 1, 2])
        );
        assert!(
            !tx.has_chunk(12, 0).expect("has"),
            "a failed write changed data"
        );
        // Overwriting a whole chunk needs only the others.
        let err = tx
            .write_data(
                12,
                &mut remote,
                CHUNK_SIZE,
                &vec![1u8; CHUNK_SIZE as usize],
                &|_| None,
            )
            .expect_err("needs the other chunks");
        assert!(matches!(err, CacheError::NeedFetch { ref indexes, .. } if indexes == &[0, 2]));
        // With the origin's bytes supplied, the write goes in on top of them
        // and the whole file is stored.
        tx.write_data(12, &mut remote, 10, b"abc", &|i| {
            Some(vec![7 + i as u8; CHUNK_SIZE as usize])
        })
        .expect("write over fetched bytes");
        let chunk0 = tx.chunk(12, 0).expect("chunk").expect("stored");
        assert_eq!(&chunk0[8..14], &[7, 7, b'a', b'b', b'c', 7]);
        for i in 1..3u64 {
            let c = tx.chunk(12, i).expect("chunk").expect("stored");
            assert!(c.iter().all(|b| *b == 7 + i as u8), "chunk {i}");
        }
        assert_eq!(
            remote.origin_extent, 0,
            "the file still depends on the origin"
        );
    }

    #[test]
    fn truncate_trims_and_forgets_origin_bytes() {
        let (_d, cache) = open(64 << 20);
        let mut obj = file(0, 0);
        let mut tx = cache.write().expect("write");
        tx.write_data(
            13,
            &mut obj,
            0,
            &vec![9u8; (2 * CHUNK_SIZE) as usize],
            &|_| None,
        )
        .expect("write");
        tx.truncate_data(13, &mut obj, 10).expect("shrink");
        tx.truncate_data(13, &mut obj, 20).expect("grow");
        tx.put(13, &obj).expect("put");
        tx.commit(true).expect("commit");
        let rx = cache.read().expect("read");
        let mut want = vec![9u8; 10];
        want.extend_from_slice(&[0u8; 10]);
        assert_eq!(
            rx.read_range(13, &obj, 0, 100).expect("read"),
            RangeRead::Data(want)
        );
        assert_eq!(rx.chunks_of(13).expect("chunks"), vec![(0, 10)]);
    }

    #[test]
    fn eviction_keeps_data_within_capacity_and_spares_dirty_files() {
        let chunk = vec![5u8; CHUNK_SIZE as usize];
        let (_d, cache) = open(3 * CHUNK_SIZE);
        let mut dirty = file(CHUNK_SIZE, 0);
        dirty.log.ops.push(1);
        let mut tx = cache.write().expect("write");
        tx.put(100, &dirty).expect("put");
        tx.put_chunk(100, 0, &chunk).expect("chunk");
        tx.commit(true).expect("commit");
        for fid in 200..210 {
            let obj = file(CHUNK_SIZE, CHUNK_SIZE);
            let mut tx = cache.write().expect("write");
            tx.put(fid, &obj).expect("put");
            tx.put_chunk(fid, 0, &chunk).expect("chunk");
            tx.commit(false).expect("commit");
            assert!(
                cache.usage().used <= 3 * CHUNK_SIZE,
                "over capacity: {:?}",
                cache.usage()
            );
        }
        let rx = cache.read().expect("read");
        assert!(rx.has_chunk(100, 0).expect("has"), "dirty data was evicted");
        assert!(
            rx.has_chunk(209, 0).expect("has"),
            "newest chunk was evicted"
        );
        assert!(!rx.has_chunk(200, 0).expect("has"), "oldest chunk was kept");
        assert_eq!(cache.usage().protected, CHUNK_SIZE);
    }

    #[test]
    fn chunks_read_or_preloaded_earlier_never_outlive_a_change() {
        let (_d, cache) = open(2 * CHUNK_SIZE);
        let obj = file(2 * CHUNK_SIZE, 2 * CHUNK_SIZE);
        let mut tx = cache.write().expect("write");
        tx.put(10, &obj).expect("put");
        tx.put_chunk(10, 0, &vec![1u8; CHUNK_SIZE as usize])
            .expect("chunk");
        tx.put_chunk(10, 1, &vec![2u8; CHUNK_SIZE as usize])
            .expect("chunk");
        tx.commit(false).expect("commit");
        let whole = |cache: &Cache| {
            cache
                .read()
                .expect("read")
                .read_range(10, &obj, 0, 2 * CHUNK_SIZE)
                .expect("range")
        };
        let expect = |a: u8, b: u8| {
            let mut v = vec![a; CHUNK_SIZE as usize];
            v.extend(vec![b; CHUNK_SIZE as usize]);
            RangeRead::Data(v)
        };
        cache
            .read()
            .expect("read")
            .read_ahead(10, 0..2)
            .expect("preload");
        assert_eq!(whole(&cache), expect(1, 2));

        // Rewritten: the memo must not answer with the old bytes.
        let mut tx = cache.write().expect("write");
        tx.put_chunk(10, 1, &vec![3u8; CHUNK_SIZE as usize])
            .expect("chunk");
        tx.commit(false).expect("commit");
        assert_eq!(whole(&cache), expect(1, 3));

        // A snapshot opened before a change keeps reading what it saw.
        let before = cache.read().expect("read");
        let mut tx = cache.write().expect("write");
        tx.put_chunk(10, 0, &vec![4u8; CHUNK_SIZE as usize])
            .expect("chunk");
        tx.commit(false).expect("commit");
        assert_eq!(
            before.read_range(10, &obj, 0, 1).expect("range"),
            RangeRead::Data(vec![1])
        );
        drop(before);
        assert_eq!(whole(&cache), expect(4, 3));

        // Evicted (another file's chunks need the room): fetch again, not
        // served from memory.
        let other = file(CHUNK_SIZE, CHUNK_SIZE);
        let mut tx = cache.write().expect("write");
        tx.put(11, &other).expect("put");
        tx.put_chunk(11, 0, &vec![5u8; CHUNK_SIZE as usize])
            .expect("chunk");
        tx.commit(false).expect("commit");
        let RangeRead::Missing(missing) = whole(&cache) else {
            panic!("an evicted chunk was still read");
        };
        assert!(!missing.is_empty());
    }

    #[test]
    fn accounting_is_rebuilt_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let cache = Cache::open(dir.path(), 1 << 30).expect("open");
            let mut obj = file(0, 0);
            let mut tx = cache.write().expect("write");
            tx.write_data(7, &mut obj, 0, &[1u8; 1000], &|_| None)
                .expect("write");
            obj.log.ops.push(1);
            tx.put(7, &obj).expect("put");
            tx.commit(true).expect("commit");
            assert_eq!(cache.usage().protected, 1000);
        }
        let cache = Cache::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(cache.usage().used, 1000);
        assert_eq!(cache.usage().protected, 1000);
    }

    #[test]
    fn readdir_cookies_survive_other_entries_changing() {
        let (_d, cache) = open(1 << 20);
        let mut tx = cache.write().expect("write");
        let mut fids = Vec::new();
        for i in 0..5 {
            fids.push(
                tx.create(ROOT_FILEID, &format!("n{i}"), &file(0, 0))
                    .expect("create"),
            );
        }
        tx.commit(true).expect("commit");
        let rx = cache.read().expect("read");
        let first = rx.entries(ROOT_FILEID, 0, 2).expect("entries");
        assert_eq!(first.len(), 2);
        drop(rx);
        // Remove the entry the cookie points at, and add a new one.
        let mut tx = cache.write().expect("write");
        tx.unlink(ROOT_FILEID, &first[1].name).expect("unlink");
        tx.create(ROOT_FILEID, "late", &file(0, 0)).expect("create");
        tx.commit(true).expect("commit");
        let rx = cache.read().expect("read");
        let rest: Vec<String> = rx
            .entries(ROOT_FILEID, first[1].cookie, 100)
            .expect("entries")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(rest, vec!["n2", "n3", "n4", "late"]);
        assert_eq!(rx.lookup(ROOT_FILEID, "n3").expect("lookup"), Some(fids[3]));
    }

    #[test]
    fn readers_never_see_an_object_go_back_nor_keep_a_stale_one() {
        use std::sync::atomic::{AtomicBool, Ordering};
        const FID: FileId = 7;
        const VERSIONS: u64 = 20_000;
        let (_dir, cache) = open(1 << 20);
        let put = |size: u64| {
            let mut tx = cache.write().expect("write");
            tx.put(FID, &file(size, 0)).expect("put");
            tx.commit(false).expect("commit");
        };
        put(0);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let mut seen = 0;
                    while !done.load(Ordering::Acquire) {
                        // Both ways in: the map-first call and a snapshot's.
                        let a = cache.object_now(FID).expect("read").expect("obj");
                        let rx = cache.read().expect("read");
                        let b = rx.get_now(FID).expect("read").expect("obj");
                        for size in [a.attrs.size, b.attrs.size] {
                            assert!(size >= seen, "went back from {seen} to {size}");
                            seen = size;
                        }
                    }
                });
            }
            for size in 1..=VERSIONS {
                put(size);
            }
            done.store(true, Ordering::Release);
        });
        let last = cache.object_now(FID).expect("read").expect("obj");
        assert_eq!(last.attrs.size, VERSIONS, "a stale object stayed in memory");
    }
}
