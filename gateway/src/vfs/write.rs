//! Changes made by clients: create, mkdir, symlink, write, setattr,
//! remove, rename. Each is applied to the cache and logged in the client
//! modification log in one transaction (see [`crate::writer`]), whether or
//! not the origin is reachable; the reintegrator ships the log. A change
//! that replays from its arguments alone ([`Op`], and a write into a file
//! holding all its data) reaches the disk in the unstable-write log
//! ([`crate::unstable`]); any other is a durable commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use imz_cache::{Attrs, CacheError, FileId, Kind, LogOp, Object, ROOT_FILEID, SetAttrs, WriteTxn};
use imz_origin::wire;

use super::{Vfs, VfsError};
use crate::fetch::{FetchFailure, Target};
use crate::unstable::{Change, UnstableWrite};
use crate::writer::{Committed, Logged};

/// Chunks of origin data one write fetches and holds in memory at most;
/// more are brought into the cache first, this many at a time.
const MAX_WRITE_FETCH: usize = 64;

/// Nanoseconds since the epoch, now.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What a new object is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum NewNode {
    File { exclusive: Option<[u8; 8]> },
    Dir,
    Symlink { target: String },
}

/// Checks a name a client wants to create in `dir`.
fn check_new_name(dir: FileId, name: &str) -> Result<(), VfsError> {
    match wire::validate_name(name, dir == ROOT_FILEID) {
        Ok(()) => Ok(()),
        Err(wire::NameError::TooLong) => Err(VfsError::NameTooLong),
        Err(wire::NameError::Reserved) => Err(VfsError::Invalid(format!("{name} is reserved"))),
        Err(e) => Err(VfsError::Invalid(e.to_string())),
    }
}

/// The directory `dir`, which must exist and not be removed.
fn live_dir(tx: &WriteTxn<'_>, dir: FileId) -> Result<Object, VfsError> {
    let obj = tx.get(dir)?.ok_or(VfsError::Stale)?;
    if obj.removed {
        return Err(VfsError::Stale);
    }
    if obj.kind != Kind::Dir {
        return Err(VfsError::NotDir);
    }
    Ok(obj)
}

/// A directory's entries changed now.
fn touch_dir(
    tx: &mut WriteTxn<'_>,
    dir: FileId,
    obj: &mut Object,
    entries_delta: i64,
    now: i64,
) -> Result<(), VfsError> {
    obj.attrs.mtime = now;
    obj.attrs.ctime = now;
    obj.attrs.size = obj.attrs.size.saturating_add_signed(entries_delta);
    tx.put(dir, obj)?;
    Ok(())
}

fn apply_attrs(attrs: &mut Attrs, set: &SetAttrs, now: i64) {
    if let Some(m) = set.mode {
        attrs.mode = m & 0o7777;
    }
    if let Some(u) = set.uid {
        attrs.uid = u;
    }
    if let Some(g) = set.gid {
        attrs.gid = g;
    }
    if let Some(t) = set.atime {
        attrs.atime = t;
    }
    if let Some(t) = set.mtime {
        attrs.mtime = t;
    }
    attrs.ctime = now;
}

/// A failure of the log is never a logical refusal: the change may be half
/// made, so it must abort the whole transaction (see `writer`).
fn log_err(e: CacheError) -> VfsError {
    tracing::error!(error = %e, "client modification log failure");
    VfsError::Io(e.to_string())
}

/// How durable a WRITE must be before its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stability {
    /// On disk first (NFS FILE_SYNC and DATA_SYNC).
    Stable,
    /// May be acknowledged before it is durable (NFS UNSTABLE).
    Unstable,
}

/// Writes `data` at `offset` into file `fid` (whose object is `obj`) and
/// logs the store, with `now` as its mtime. Chunks of origin data the write
/// needs come from `fill`; the ones it lacks are returned instead, with
/// nothing changed. Shared by WRITE and by the replay of unstable writes.
fn apply_write(
    tx: &mut WriteTxn<'_>,
    fid: FileId,
    mut obj: Object,
    offset: u64,
    data: &[u8],
    now: i64,
    fill: &dyn Fn(u64) -> Option<Vec<u8>>,
) -> Result<Result<Object, Vec<u64>>, VfsError> {
    match obj.kind {
        Kind::File => {}
        Kind::Dir => return Err(VfsError::IsDir),
        Kind::Symlink => return Err(VfsError::Invalid("not a regular file".into())),
    }
    match tx.write_data(fid, &mut obj, offset, data, fill) {
        Ok(()) => {}
        Err(CacheError::NeedFetch { indexes, .. }) => return Ok(Err(indexes)),
        Err(e) => return Err(e.into()),
    }
    obj.attrs.mtime = now;
    obj.attrs.ctime = now;
    obj.data_gen += 1;
    tx.put(fid, &obj)?;
    tx.log(LogOp::Store { fid }, now).map_err(log_err)?;
    Ok(Ok(tx.object(fid)?))
}

/// A CREATE, MKDIR or SYMLINK, as the writer applies it and as a replay
/// after a crash applies it again.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CreateArgs {
    dir: FileId,
    name: String,
    node: NewNode,
    set: SetAttrs,
}

/// What [`apply_create`] did.
struct Made {
    fid: FileId,
    obj: Object,
    /// The name was free: `fid` is a new object.
    new: bool,
    /// Anything changed (an UNCHECKED create may truncate an existing file).
    changed: bool,
}

/// Creates `args.name` in `args.dir` at time `now`. For a file, an
/// existing file of that name is returned instead (NFS UNCHECKED; GUARDED
/// is checked by the NFS layer before), unless the create is exclusive.
/// A replay passes the fileid the create handed out (`again`): other
/// commits a crash undid may have handed out ids meanwhile.
fn apply_create(
    tx: &mut WriteTxn<'_>,
    args: &CreateArgs,
    now: i64,
    again: Option<FileId>,
) -> Result<Made, VfsError> {
    let CreateArgs {
        dir,
        name,
        node,
        set,
    } = args;
    let dir = *dir;
    let mut dir_obj = live_dir(tx, dir)?;
    if let Some(existing) = tx.lookup(dir, name)? {
        let obj = tx.object(existing)?;
        return match &node {
            NewNode::File {
                exclusive: Some(verf),
            } if obj.verifier == Some(*verf) => Ok(Made {
                fid: existing,
                obj,
                new: false,
                changed: false,
            }),
            NewNode::File { exclusive: None } if obj.kind == Kind::File => {
                // UNCHECKED create of an existing file: like open(O_CREAT), it
                // may truncate.
                if let Some(size) = set.size {
                    let truncate = SetAttrs {
                        size: Some(size),
                        ..Default::default()
                    };
                    apply_setattr(tx, existing, &truncate, now)?;
                }
                Ok(Made {
                    fid: existing,
                    obj: tx.object(existing)?,
                    new: false,
                    changed: true,
                })
            }
            _ => Err(VfsError::Exists),
        };
    }
    let kind = match *node {
        NewNode::File { .. } => Kind::File,
        NewNode::Dir => Kind::Dir,
        NewNode::Symlink { .. } => Kind::Symlink,
    };
    let default_mode = match kind {
        Kind::File => 0o644,
        Kind::Dir => 0o755,
        Kind::Symlink => 0o777,
    };
    let target = match &node {
        NewNode::Symlink { target } => Some(target.clone()),
        _ => None,
    };
    let mut attrs = Attrs {
        size: target.as_ref().map_or(0, |t| t.len() as u64),
        mode: default_mode,
        // The NFS layer does not tell us who is calling: new
        // objects belong to the directory's owner.
        uid: dir_obj.attrs.uid,
        gid: dir_obj.attrs.gid,
        nlink: if kind == Kind::Dir { 2 } else { 1 },
        atime: now,
        mtime: now,
        ctime: now,
    };
    let mut set = set.clone();
    set.size = None;
    apply_attrs(&mut attrs, &set, now);
    let obj = Object {
        target,
        listed: true,
        pinned: dir_obj.pinned,
        verifier: match *node {
            NewNode::File { exclusive } => exclusive,
            _ => None,
        },
        ..Object::new(kind, dir, name.to_owned(), attrs)
    };
    let fid = match again {
        Some(fid) => {
            tx.create_as(dir, name, &obj, fid)?;
            fid
        }
        None => tx.create(dir, name, &obj)?,
    };
    touch_dir(tx, dir, &mut dir_obj, 1, now)?;
    tx.log(
        LogOp::Create {
            parent: dir,
            name: name.to_owned(),
            fid,
            kind,
        },
        now,
    )
    .map_err(log_err)?;
    Ok(Made {
        fid,
        obj: tx.object(fid)?,
        new: true,
        changed: true,
    })
}

/// A change other than a WRITE that replays from its arguments alone, on
/// the state it first met: what the unstable-write log carries for it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Op {
    Create(CreateArgs),
    SetAttr {
        fid: FileId,
        set: SetAttrs,
    },
    Remove {
        dir: FileId,
        name: String,
    },
    Rename {
        from_dir: FileId,
        from_name: String,
        fid: FileId,
        to_dir: FileId,
        to_name: String,
    },
}

impl Op {
    /// Its log record, synced before the reply (`None`, should it not
    /// encode: then the change is committed durably instead). `fid` is the
    /// object it made or changed.
    fn logged(&self, fid: FileId, now: i64) -> Option<Logged> {
        let args = serde_json::to_vec(self).ok()?;
        Some(Logged {
            change: Change::Op {
                fid,
                now,
                args: Arc::new(args),
            },
            stable: true,
        })
    }
}

/// Replays a change the unstable-write log carried (see
/// [`crate::unstable`]).
pub(crate) fn replay_change(tx: &mut WriteTxn<'_>, change: &Change) -> Result<(), String> {
    let (fid, now, args) = match change {
        Change::Write(w) => return replay_write(tx, w),
        Change::Op { fid, now, args } => (*fid, *now, args),
    };
    let op: Op = serde_json::from_slice(args).map_err(|e| e.to_string())?;
    let failed = |e: VfsError| e.to_string();
    match &op {
        Op::Create(args) => {
            let made = apply_create(tx, args, now, Some(fid)).map_err(failed)?;
            if !made.new || made.fid != fid {
                return Err(format!(
                    "{} in directory {} came out as {} (new: {}), not as {fid}",
                    args.name, args.dir, made.fid, made.new
                ));
            }
            Ok(())
        }
        Op::SetAttr { fid, set } => apply_setattr(tx, *fid, set, now).map(drop).map_err(failed),
        Op::Remove { dir, name } => apply_remove(tx, *dir, name, now).map_err(failed),
        Op::Rename {
            from_dir,
            from_name,
            fid,
            to_dir,
            to_name,
        } => apply_rename(tx, *from_dir, from_name, *fid, *to_dir, to_name, now).map_err(failed),
    }
}

/// Replays an unstable write after a crash (see [`crate::unstable`]).
fn replay_write(tx: &mut WriteTxn<'_>, w: &UnstableWrite) -> Result<(), String> {
    let obj = tx
        .get(w.fid)
        .map_err(|e| e.to_string())?
        .filter(|o| !o.removed)
        .ok_or("the file is gone")?;
    match apply_write(tx, w.fid, obj, w.offset, &w.data, w.mtime, &|_| None) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(missing)) => Err(format!(
            "{} chunks of origin data are missing",
            missing.len()
        )),
        Err(e) => Err(e.to_string()),
    }
}

impl Vfs {
    /// Changes are taken unless the origin said it serves its tree
    /// read-only (`imz origin --read-only`): then clients hear so at once,
    /// rather than have changes logged that the origin would refuse.
    fn writable(&self) -> Result<(), VfsError> {
        match self.origin.read_only() {
            true => Err(VfsError::ReadOnly),
            false => Ok(()),
        }
    }

    /// Notes that `fid`'s content just changed (for the reintegrator's
    /// aging window) and wakes the reintegrator.
    fn changed(&self, fid: FileId) {
        {
            let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            touched.insert(fid, Instant::now());
        }
        self.log_changed.notify_one();
    }

    /// Creates `name` in `dir`. For a file, an existing file of that name
    /// is returned instead (NFS UNCHECKED; GUARDED is checked by the NFS
    /// layer before), unless the create is exclusive.
    pub async fn create(
        &self,
        dir: FileId,
        name: &str,
        node: NewNode,
        set: SetAttrs,
    ) -> Result<(FileId, Object), VfsError> {
        self.writable()?;
        check_new_name(dir, name)?;
        // Learn whether the origin has this name (an unlisted directory does
        // not know all its names); offline, the reintegrator will find out.
        match self.lookup(dir, name).await {
            Ok(_) | Err(VfsError::NotFound) | Err(VfsError::Offline) => {}
            Err(e) => return Err(e),
        }
        let args = CreateArgs {
            dir,
            name: name.to_owned(),
            node,
            set,
        };
        let ((fid, obj, changed), _) = self
            .writer
            .run_logged(0, move |tx| {
                let now = now_nanos();
                let made = apply_create(tx, &args, now, None)?;
                // A new object replays from its arguments; what an
                // UNCHECKED create did to an existing file is committed.
                let logged = match made.new {
                    true => Op::Create(args).logged(made.fid, now),
                    false => None,
                };
                Ok(((made.fid, made.obj, made.changed), logged))
            })
            .await?;
        if changed {
            self.changed(fid);
        }
        Ok((fid, obj))
    }

    /// Writes `data` at `offset` of file `fid`. Durable when it returns.
    /// The first write to a file not wholly cached fetches the rest of it
    /// (see [`imz_cache::WriteTxn::write_data`]), so offline such a write
    /// fails.
    pub async fn write(
        &self,
        fid: FileId,
        offset: u64,
        data: Vec<u8>,
        stability: Stability,
    ) -> Result<(Object, Committed), VfsError> {
        self.writable()?;
        // Checked before anything adds offset and length (the cache checks
        // again where it splices).
        if imz_cache::chunk::write_end(offset, data.len() as u64).is_none() {
            return Err(VfsError::TooLarge);
        }
        if data.is_empty() {
            // Writes nothing, extends nothing (as write(2) of 0 bytes).
            let obj = self.getattr(fid)?;
            if obj.kind != Kind::File {
                return Err(VfsError::Invalid("not a regular file".into()));
            }
            return Ok(((*obj).clone(), Committed::Durable));
        }
        let data = Arc::new(data);
        // Origin bytes of chunks this write only partly covers, fetched on
        // demand (only for files that are not entirely cached).
        let mut fetched: HashMap<u64, Vec<u8>> = HashMap::new();
        // Tries that did not get closer: the file kept changing, or its
        // pieces were evicted as fast as they came.
        let mut stalls = 0;
        let mut last_missing = usize::MAX;
        while stalls < 3 {
            let payload = Arc::clone(&data);
            let have = std::mem::take(&mut fetched);
            let outcome = self
                .writer
                .run_logged(payload.len(), move |tx| {
                    let now = now_nanos();
                    let obj = tx.get(fid)?.ok_or(VfsError::Stale)?;
                    // A file becoming dirty turns all of its bytes into
                    // data that may not be evicted (it is made whole).
                    let more = if obj.is_dirty() {
                        payload.len() as u64
                    } else {
                        obj.attrs.size.max(offset + payload.len() as u64)
                    };
                    let arriving: usize = have.values().map(Vec::len).sum();
                    if !tx.cache_room_for_protected(more)
                        || !tx.disk_takes((payload.len() + arriving) as u64)
                    {
                        return Err(VfsError::NoSpace);
                    }
                    // Only a write into a file that holds all of its data
                    // (none left at the origin: chunks the storer cached may
                    // not survive a crash) can replay from the log alone.
                    let replayable = obj.origin_extent == 0 && have.is_empty();
                    let fill = |index: u64| have.get(&index).cloned();
                    match apply_write(tx, fid, obj, offset, &payload, now, &fill)? {
                        Ok(obj) => {
                            let logged = replayable.then_some(Logged {
                                change: Change::Write(UnstableWrite {
                                    fid,
                                    offset,
                                    mtime: now,
                                    data: payload,
                                }),
                                stable: stability == Stability::Stable,
                            });
                            Ok((Ok(obj), logged))
                        }
                        Err(indexes) => Ok((Err((indexes, have)), None)),
                    }
                })
                .await?;
            match outcome {
                (Ok(obj), committed) => {
                    crate::metrics::Metrics::add(&self.metrics.written_bytes, data.len() as u64);
                    self.changed(fid);
                    return Ok((obj, committed));
                }
                (Err((indexes, have)), _) => {
                    if indexes.len() >= last_missing {
                        stalls += 1;
                    }
                    last_missing = indexes.len();
                    if indexes.len() <= MAX_WRITE_FETCH {
                        fetched = have;
                        self.fetch_for_write(fid, &indexes, &mut fetched).await?;
                    } else {
                        // A big file, mostly not cached: bring it in a
                        // piece at a time (bounded memory), then write.
                        self.cache_origin_chunks(fid, &indexes[..MAX_WRITE_FETCH])
                            .await?;
                    }
                }
            }
        }
        Err(VfsError::Io(
            "file keeps changing while it is written, or the cache cannot hold all of it".into(),
        ))
    }

    /// Makes every write acknowledged so far durable (NFS COMMIT).
    pub async fn commit(&self, fid: FileId) -> Result<(), VfsError> {
        self.getattr(fid)?;
        self.writer.make_durable(fid).await
    }

    /// Fetches chunks of `fid` from the origin and stores them as clean
    /// data, unless the file changed meanwhile.
    async fn cache_origin_chunks(&self, fid: FileId, indexes: &[u64]) -> Result<(), VfsError> {
        // Taken before the fetch: bytes of a version the file has since left
        // must not be stored.
        let before = self.getattr(fid)?;
        let mut fetched = HashMap::new();
        self.fetch_for_write(fid, indexes, &mut fetched).await?;
        let bytes: usize = fetched.values().map(Vec::len).sum();
        self.writer
            .run(bytes, move |tx| {
                let obj = tx.get(fid)?.ok_or(VfsError::Stale)?;
                if obj.origin != before.origin || obj.data_gen != before.data_gen {
                    return Ok(());
                }
                for (index, chunk) in fetched {
                    if !tx.has_chunk(fid, index)? {
                        tx.put_chunk(fid, index, &chunk)?;
                    }
                }
                Ok(())
            })
            .await
    }

    /// Fetches the origin bytes of chunks a partial write needs.
    async fn fetch_for_write(
        &self,
        fid: FileId,
        indexes: &[u64],
        into: &mut HashMap<u64, Vec<u8>>,
    ) -> Result<(), VfsError> {
        let obj = self.getattr(fid)?;
        let Some(origin) = obj.origin else {
            return Err(VfsError::Io(
                "local file data is missing from the cache".into(),
            ));
        };
        if !self.link.is_up() {
            // Offline, a partial write into data never fetched cannot be
            // done right: the bytes around it are at the origin.
            return Err(VfsError::Offline);
        }
        let target = Target {
            fid,
            origin_id: origin.id,
            version: origin.version,
            extent: obj.origin_extent.min(obj.attrs.size),
        };
        for (index, wait) in self.fetcher.demand(&target, indexes, 0..0) {
            match wait.bytes().await {
                Ok(bytes) => {
                    into.insert(index, bytes.to_vec());
                }
                Err(FetchFailure::Offline) => return Err(VfsError::Offline),
                Err(FetchFailure::Gone(_) | FetchFailure::Changed) => {
                    return Err(VfsError::Io(
                        "the file changed at the origin under local changes".into(),
                    ));
                }
                Err(FetchFailure::Io(e)) => return Err(VfsError::Io(e)),
                Err(FetchFailure::Denied) => return Err(VfsError::Access),
            }
        }
        Ok(())
    }

    /// Changes attributes (size included).
    pub async fn setattr(&self, fid: FileId, set: SetAttrs) -> Result<Object, VfsError> {
        self.writable()?;
        let (obj, _) = self
            .writer
            .run_logged(0, move |tx| {
                let now = now_nanos();
                // A new size of a file with data left at the origin is
                // committed: its replay could not tell which of those bytes
                // were cached.
                let replayable =
                    set.size.is_none() || tx.get(fid)?.is_some_and(|o| o.origin_extent == 0);
                let obj = apply_setattr(tx, fid, &set, now)?;
                let logged = match replayable && !set.is_empty() {
                    true => Op::SetAttr { fid, set }.logged(fid, now),
                    false => None,
                };
                Ok((obj, logged))
            })
            .await?;
        self.changed(fid);
        Ok(obj)
    }

    /// Removes `name` from `dir` (a file, symlink or empty directory).
    pub async fn remove(&self, dir: FileId, name: &str) -> Result<(), VfsError> {
        self.writable()?;
        let fid = self.lookup(dir, name).await?;
        if self.getattr(fid)?.kind == Kind::Dir {
            // Only an empty directory goes; an unlisted one may have names
            // we have not seen (offline, the origin will say).
            match self.ensure_listed(fid).await {
                Ok(()) | Err(VfsError::Offline) => {}
                Err(e) => return Err(e),
            }
        }
        let name = name.to_owned();
        self.writer
            .run_logged(0, move |tx| {
                let now = now_nanos();
                apply_remove(tx, dir, &name, now)?;
                Ok(((), Op::Remove { dir, name }.logged(fid, now)))
            })
            .await?;
        self.log_changed.notify_one();
        Ok(())
    }

    /// Moves `from_dir/from_name` to `to_dir/to_name`, replacing a
    /// compatible object there.
    pub async fn rename(
        &self,
        from_dir: FileId,
        from_name: &str,
        to_dir: FileId,
        to_name: &str,
    ) -> Result<(), VfsError> {
        self.writable()?;
        check_new_name(to_dir, to_name)?;
        if from_dir == to_dir && from_name == to_name {
            self.lookup(from_dir, from_name).await?;
            return Ok(());
        }
        let fid = self.lookup(from_dir, from_name).await?;
        match self.lookup(to_dir, to_name).await {
            Ok(target) => {
                if self.getattr(target)?.kind == Kind::Dir {
                    match self.ensure_listed(target).await {
                        Ok(()) | Err(VfsError::Offline) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(VfsError::NotFound) | Err(VfsError::Offline) => {}
            Err(e) => return Err(e),
        }
        let (from_name, to_name) = (from_name.to_owned(), to_name.to_owned());
        self.writer
            .run_logged(0, move |tx| {
                let now = now_nanos();
                apply_rename(tx, from_dir, &from_name, fid, to_dir, &to_name, now)?;
                let op = Op::Rename {
                    from_dir,
                    from_name,
                    fid,
                    to_dir,
                    to_name,
                };
                Ok(((), op.logged(fid, now)))
            })
            .await?;
        self.log_changed.notify_one();
        Ok(())
    }
}

/// SETATTR of `fid` at time `now`.
fn apply_setattr(
    tx: &mut WriteTxn<'_>,
    fid: FileId,
    set: &SetAttrs,
    now: i64,
) -> Result<Object, VfsError> {
    let mut obj = tx.get(fid)?.ok_or(VfsError::Stale)?;
    if set.size.is_some() && obj.kind != Kind::File {
        return Err(if obj.kind == Kind::Dir {
            VfsError::IsDir
        } else {
            VfsError::Invalid("size of a symlink".into())
        });
    }
    if set.is_empty() {
        return Ok(obj);
    }
    if let Some(size) = set.size {
        set_size(tx, fid, &mut obj, size, now)?;
    }
    apply_attrs(&mut obj.attrs, set, now);
    tx.put(fid, &obj)?;
    // A size change moved the mtime here: the origin takes ours, not its
    // own clock's.
    let mut logged = set.clone();
    if logged.size.is_some() {
        logged.mtime = Some(obj.attrs.mtime);
    }
    tx.log(LogOp::SetAttr { fid, set: logged }, now)
        .map_err(log_err)?;
    Ok(tx.object(fid)?)
}

/// REMOVE or RMDIR of `dir/name` at time `now`.
fn apply_remove(tx: &mut WriteTxn<'_>, dir: FileId, name: &str, now: i64) -> Result<(), VfsError> {
    let mut dir_obj = live_dir(tx, dir)?;
    let fid = tx.lookup(dir, name)?.ok_or(VfsError::NotFound)?;
    let obj = tx.object(fid)?;
    if obj.kind == Kind::Dir && !tx.entries(fid, 0, 1)?.is_empty() {
        return Err(VfsError::NotEmpty);
    }
    tx.unlink(dir, name)?;
    unlink_object(tx, fid, now)?;
    touch_dir(tx, dir, &mut dir_obj, -1, now)?;
    tx.log(
        LogOp::Remove {
            parent: dir,
            name: name.to_owned(),
            fid,
        },
        now,
    )
    .map_err(log_err)?;
    Ok(())
}

/// RENAME of `from_dir/from_name` (which must still be `fid`) to
/// `to_dir/to_name` at time `now`, replacing a compatible object there.
fn apply_rename(
    tx: &mut WriteTxn<'_>,
    from_dir: FileId,
    from_name: &str,
    fid: FileId,
    to_dir: FileId,
    to_name: &str,
    now: i64,
) -> Result<(), VfsError> {
    let mut from_obj = live_dir(tx, from_dir)?;
    live_dir(tx, to_dir)?;
    if tx.lookup(from_dir, from_name)? != Some(fid) {
        return Err(VfsError::NotFound);
    }
    let mut obj = tx.object(fid)?;
    if obj.kind == Kind::Dir && is_ancestor(tx, fid, to_dir)? {
        return Err(VfsError::Invalid(
            "cannot move a directory into itself".into(),
        ));
    }
    let replaced = match tx.lookup(to_dir, to_name)? {
        Some(target) if target == fid => return Ok(()),
        Some(target) => {
            let t = tx.object(target)?;
            match (obj.kind == Kind::Dir, t.kind == Kind::Dir) {
                (true, false) => return Err(VfsError::NotDir),
                (false, true) => return Err(VfsError::IsDir),
                (true, true) if !tx.entries(target, 0, 1)?.is_empty() => {
                    return Err(VfsError::Exists);
                }
                _ => {}
            }
            Some(target)
        }
        None => None,
    };
    tx.unlink(from_dir, from_name)?;
    touch_dir(tx, from_dir, &mut from_obj, -1, now)?;
    let replaced = match replaced {
        Some(target) => {
            tx.unlink(to_dir, to_name)?;
            unlink_object(tx, target, now)?;
            if tx.get(target)?.is_some_and(|t| t.is_local()) {
                // The origin never had it: its history just goes.
                tx.log(
                    LogOp::Remove {
                        parent: to_dir,
                        name: to_name.to_owned(),
                        fid: target,
                    },
                    now,
                )
                .map_err(log_err)?;
                None
            } else {
                Some(target)
            }
        }
        None => None,
    };
    tx.link(to_dir, to_name, fid)?;
    let mut to_obj = live_dir(tx, to_dir)?;
    touch_dir(
        tx,
        to_dir,
        &mut to_obj,
        if replaced.is_some() { 0 } else { 1 },
        now,
    )?;
    obj.parent = to_dir;
    obj.name = to_name.to_owned();
    obj.attrs.ctime = now;
    tx.put(fid, &obj)?;
    tx.log(
        LogOp::Rename {
            from_parent: from_dir,
            from_name: from_name.to_owned(),
            fid,
            to_parent: to_dir,
            to_name: to_name.to_owned(),
            replaced,
        },
        now,
    )
    .map_err(log_err)?;
    Ok(())
}

/// Marks `fid` removed (its entry is already gone); its data goes.
fn unlink_object(tx: &mut WriteTxn<'_>, fid: FileId, now: i64) -> Result<(), VfsError> {
    let mut obj = tx.object(fid)?;
    obj.removed = true;
    obj.attrs.nlink = 0;
    obj.attrs.ctime = now;
    tx.drop_data(fid)?;
    tx.put(fid, &obj)?;
    Ok(())
}

fn set_size(
    tx: &mut WriteTxn<'_>,
    fid: FileId,
    obj: &mut Object,
    size: u64,
    now: i64,
) -> Result<(), VfsError> {
    if size != obj.attrs.size {
        tx.truncate_data(fid, obj, size)?;
        obj.data_gen += 1;
    }
    obj.attrs.mtime = now;
    obj.attrs.ctime = now;
    Ok(())
}

/// Whether `dir` is `ancestor` or below it.
fn is_ancestor(tx: &WriteTxn<'_>, ancestor: FileId, mut dir: FileId) -> Result<bool, VfsError> {
    for _ in 0..4096 {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT_FILEID {
            return Ok(false);
        }
        dir = tx.object(dir)?.parent;
    }
    Err(VfsError::Io("directory tree too deep".into()))
}
