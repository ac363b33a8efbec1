//! Applying reintegration operations (`POST /v1/reintegrate`) to the tree
//! and the store, one at a time, inside the writer's transaction.
//!
//! Each operation is checked against the store (keys, bases, names), then
//! checked against the disk (the object's fingerprint: a change made behind
//! the origin's back is reconciled first and answered as a conflict), then
//! applied to the tree, then recorded: metadata, one journal record and the
//! idempotency key, all in the caller's transaction.
//!
//! Directory versions move with every entry change, so the base-version
//! check is skipped where a directory is the object of `SetAttr`, `Remove`
//! (which instead needs the directory empty) and `Rename`: otherwise a
//! gateway's own creates would make every later directory change conflict.
//!
//! In [`Mode::Recover`] nothing is done to the tree: the operation's effect
//! is looked for on disk and recorded if present (see `writer`).

use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, Mode as FsMode, OFlags, RenameFlags, Stat, Timespec, Timestamps};

use crate::error::{OriginError, api};
use crate::fsops::{self, Fingerprint, FsError};
use crate::names;
use crate::store::{KeyResult, Meta};
use crate::wire::{
    self, Attr, Base, Change, Conflict, ConflictReason, ErrorCode, INSTALLING_PREFIX, KeyedOp,
    Kind, NewObject, ObjRef, ObjectId, Op, OpResult, ROOT_ID, SetAttrs, Version,
};
use crate::writer::WCtx;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    Recover,
}

pub enum Outcome {
    /// The operation's answer (applied, replayed, conflict, rejected).
    Done(OpResult),
    /// The disk refused an operation that should have worked (I/O error,
    /// permission); nothing was recorded for it.
    FsFailed(OpResult),
    /// Recovery only: the operation's effect is not on disk.
    NotApplied,
}

/// Early exits of an operation.
enum Stop {
    Out(Box<Outcome>),
    Err(OriginError),
}

impl From<OriginError> for Stop {
    fn from(e: OriginError) -> Self {
        Self::Err(e)
    }
}

type Step<T> = Result<T, Stop>;

fn conflict(reason: ConflictReason, current: Option<Attr>) -> Stop {
    Stop::Out(Box::new(Outcome::Done(OpResult::Conflict(Conflict {
        reason,
        current,
    }))))
}

fn rejected(code: ErrorCode, message: impl Into<String>) -> Stop {
    Stop::Out(Box::new(Outcome::Done(OpResult::Rejected {
        error: api(code, message),
    })))
}

fn not_applied() -> Stop {
    Stop::Out(Box::new(Outcome::NotApplied))
}

fn fs_failed(what: &str, e: impl std::fmt::Display) -> Stop {
    tracing::warn!(error = %e, "{what} failed");
    Stop::Out(Box::new(Outcome::FsFailed(OpResult::Rejected {
        error: api(ErrorCode::Internal, format!("{what}: {e}")),
    })))
}

/// Applies one operation. `Err` is a store failure: the transaction must be
/// abandoned.
pub fn apply(cx: &mut WCtx<'_>, kop: &KeyedOp, mode: Mode) -> Result<Outcome, OriginError> {
    if let Some(prev) = cx.tx.key(&kop.key)? {
        return Ok(Outcome::Done(OpResult::Replayed {
            attr: prev.attr,
            seq: prev.seq,
        }));
    }
    let mut op = Apply {
        cx,
        key: &kop.key,
        mode,
    };
    let step = match &kop.op {
        Op::Create {
            parent,
            name,
            object,
            attrs,
        } => op.create(parent, name, object, attrs),
        Op::Write {
            id,
            base,
            upload,
            mtime,
        } => op.write(id, base, upload, *mtime),
        Op::SetAttr { id, base, attrs } => op.set_attr(id, base, attrs),
        Op::Remove {
            parent,
            name,
            id,
            base,
        } => op.remove(parent, name, id, base),
        Op::Rename {
            from_parent,
            from_name,
            id,
            base,
            to_parent,
            to_name,
            replace,
        } => op.rename(
            from_parent,
            from_name,
            id,
            base,
            to_parent,
            to_name,
            replace.as_ref(),
        ),
    };
    match step {
        Ok(result) => Ok(Outcome::Done(result)),
        Err(Stop::Out(outcome)) => Ok(*outcome),
        Err(Stop::Err(e)) => Err(e),
    }
}

struct Apply<'c, 'a, 'k> {
    cx: &'c mut WCtx<'a>,
    key: &'k str,
    mode: Mode,
}

impl Apply<'_, '_, '_> {
    fn live(&self) -> bool {
        self.mode == Mode::Live
    }

    fn resolve(&self, r: &ObjRef) -> Step<Option<Meta>> {
        let id = match r {
            ObjRef::Id(id) => *id,
            ObjRef::Created(key) => match self.cx.tx.key(key)? {
                Some(k) => k.attr.id,
                None => {
                    return Err(rejected(
                        ErrorCode::BadRequest,
                        format!("no applied operation has key {key:?}"),
                    ));
                }
            },
        };
        Ok(self.cx.tx.meta(id)?)
    }

    fn base(&self, b: &Base) -> Step<Version> {
        match b {
            Base::Version(v) => Ok(*v),
            Base::After(key) => match self.cx.tx.key(key)? {
                Some(k) => Ok(k.seq),
                None => Err(rejected(
                    ErrorCode::BadRequest,
                    format!("no applied operation has key {key:?}"),
                )),
            },
        }
    }

    fn check_version(&self, m: &Meta, base: &Base) -> Step<()> {
        if m.attr.version != self.base(base)? {
            return Err(conflict(
                ConflictReason::VersionMismatch,
                Some(m.attr.clone()),
            ));
        }
        Ok(())
    }

    /// For new content or attributes of file `m` made on version `base`:
    /// a move at the origin since then changes neither, so any other
    /// change conflicts, a move alone does not (a keep-both copy of a file
    /// that was only renamed would be a spurious one).
    fn check_unchanged_but_moved(&self, m: &Meta, base: &Base) -> Step<()> {
        let base = self.base(base)?;
        let id = m.attr.id;
        let changed = |c: &Change| match c {
            Change::Rename { attr, replaced, .. } => *replaced == Some(id) && attr.id != id,
            Change::Remove { id: gone, .. } => *gone == id,
            Change::Create { attr, .. }
            | Change::Write { attr }
            | Change::Truncate { attr }
            | Change::SetAttr { attr } => attr.id == id,
        };
        if m.attr.version == base
            || base < m.attr.version && !self.cx.tx.changed_since(base, changed)?
        {
            return Ok(());
        }
        Err(conflict(
            ConflictReason::VersionMismatch,
            Some(m.attr.clone()),
        ))
    }

    fn check_name(&self, name: &str, dir: ObjectId) -> Step<()> {
        wire::validate_name(name, dir == ROOT_ID)
            .map_err(|e| rejected(ErrorCode::InvalidName, format!("{name:?}: {e}")))
    }

    fn dir_meta(&self, r: &ObjRef) -> Step<Meta> {
        match self.resolve(r)? {
            None => Err(conflict(ConflictReason::ParentMissing, None)),
            Some(m) if m.attr.kind != Kind::Dir => Err(rejected(
                ErrorCode::WrongKind,
                format!("object {} is not a directory", m.attr.id),
            )),
            Some(m) => Ok(m),
        }
    }

    /// Opens directory `id`; a vanished path is reconciled and answered
    /// with `missing`.
    fn open_dir(&mut self, id: ObjectId, missing: ConflictReason) -> Step<OwnedFd> {
        let path = self
            .cx
            .tx
            .path_of(id)?
            .ok_or_else(|| conflict(missing, None))?;
        match self.cx.shared.tree.open_dir(&path) {
            Ok(fd) => Ok(fd),
            Err(FsError::Escape) => Err(rejected(
                ErrorCode::Escape,
                "a symlink replaces a directory on the path",
            )),
            Err(FsError::NotFound) => {
                let parent = self
                    .cx
                    .tx
                    .meta(id)?
                    .map(|m| m.parent)
                    .unwrap_or(ROOT_ID)
                    .max(ROOT_ID);
                self.cx.reconcile_dirs(&[parent])?;
                let current = self.cx.tx.meta(id)?.map(|m| m.attr);
                Err(conflict(missing, current))
            }
            Err(FsError::Io(e)) => Err(fs_failed("opening a directory", e)),
        }
    }

    /// Checks that the disk still shows `m` as the store knows it; if not,
    /// reconciles and answers a conflict with the new state.
    fn check_disk(&mut self, pfd: &OwnedFd, m: &Meta) -> Step<()> {
        if !self.live() {
            return Ok(());
        }
        let st = fsops::stat_at(pfd, &m.name).map_err(|e| fs_failed("stat", e))?;
        if st.as_ref().map(Fingerprint::of) == Some(m.fp) {
            return Ok(());
        }
        self.cx.reconcile_dirs(&[m.parent])?;
        match self.cx.tx.meta(m.attr.id)? {
            Some(now) => Err(conflict(ConflictReason::VersionMismatch, Some(now.attr))),
            None => Err(conflict(ConflictReason::Removed, None)),
        }
    }

    /// The answer when `name` in directory `pid` turned out taken on disk:
    /// a conflict with the object there, once the store knows it; or, when
    /// what is there is nothing the origin serves (a FIFO, a socket, a
    /// device node: invisible to gateways), a rejection that says so, for
    /// the gateway to hold for a person rather than retry for ever.
    fn name_taken(&mut self, pid: ObjectId, pfd: &OwnedFd, name: &str) -> Stop {
        let mut answer = || -> Result<Stop, OriginError> {
            self.cx.reconcile_dirs(&[pid])?;
            if let Some(id) = self.cx.tx.child(pid, name)? {
                let current = self.cx.tx.meta(id)?.map(|m| m.attr);
                return Ok(conflict(ConflictReason::NameExists, current));
            }
            Ok(match fsops::stat_at(pfd, name) {
                Ok(Some(_)) => rejected(
                    ErrorCode::WrongKind,
                    format!(
                        "{name:?} is taken at the origin by something imz does not serve \
                         (a FIFO, socket or device node): rename one of them"
                    ),
                ),
                Ok(None) => fs_failed("create", "the name was taken, then freed: try again"),
                Err(e) => fs_failed("stat", e),
            })
        };
        answer().unwrap_or_else(Stop::Err)
    }

    /// Recovery only: whether the file `name` in `dir` is staged upload
    /// `upload` copied in, and the upload is left over. A tree on another
    /// filesystem than the staging area gets an upload as a copy, linked
    /// at its name before the staged file is removed (a rename cannot
    /// cross filesystems); a crash in between leaves both, the copy whole.
    /// Then the operation did apply, and the leftover goes now. On one
    /// filesystem the upload is renamed into place, so a staged upload
    /// there means the operation did not apply.
    fn copied_in(&self, upload: &str, dir: &OwnedFd, name: &str) -> bool {
        let uploads = &self.cx.shared.uploads_fd;
        match copied_across((uploads, upload), (dir, name), Times::Any) {
            Ok(false) => false,
            Ok(true) => {
                if let Err(e) = unstage(uploads, upload) {
                    // It expires with the other leftovers.
                    tracing::warn!(upload, error = %e, "removing an installed upload");
                }
                true
            }
            Err(e) => {
                tracing::warn!(upload, error = %e, "comparing a staged upload with its copy");
                false
            }
        }
    }

    /// Recovery only: whether the file `to_name` in `to` is a copy of the
    /// file `from_name` in `from`, moved across filesystems by a crashed
    /// rename that linked the copy but had not removed the original yet.
    /// Then the rename did apply, and it is finished now: the original
    /// goes, as it would have.
    fn moved_across(&self, from: &OwnedFd, from_name: &str, to: &OwnedFd, to_name: &str) -> bool {
        match copied_across((from, from_name), (to, to_name), Times::Kept) {
            Ok(false) => false,
            Ok(true) => match rustix::fs::unlinkat(from, names::to_os(from_name), AtFlags::empty())
            {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(from_name, error = %e, "removing the original of a moved file");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(from_name, error = %e, "comparing a moved file with its copy");
                false
            }
        }
    }

    /// Recovery only, for an operation that did not apply: removes the
    /// name a replacement across filesystems links its copy at before
    /// renaming it over the file (`link_over`), left by a crash between the
    /// two (its replay links a new one). The directory's times moved with
    /// that name: the origin's own doing, not a change to journal (as after
    /// a replacement that did apply, `refresh_dir_fp`), so its fingerprint
    /// takes them, unless anything else about it changed too, which the
    /// start-up scan then reports.
    fn clear_install_leftover(&mut self, dir: ObjectId, fd: &OwnedFd, name: &str) -> Step<()> {
        match rustix::fs::unlinkat(fd, name, AtFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => {
                // The replay removes it before linking its own.
                tracing::warn!(name, error = %e, "removing a leftover install");
                return Ok(());
            }
        }
        if let (Some(mut dm), Ok(st)) = (self.cx.tx.meta(dir)?, fsops::fstat(fd)) {
            let now = Fingerprint::of(&st);
            let same = |f: &Fingerprint| (f.ino, f.mode, f.uid, f.gid);
            if same(&now) == same(&dm.fp) {
                dm.fp = now;
                self.cx.tx.put(&dm)?;
            }
        }
        Ok(())
    }

    fn staged(&self, upload: &str) -> Step<bool> {
        if !wire::validate_upload_id(upload) {
            return Err(rejected(
                ErrorCode::BadRequest,
                format!("invalid upload id {upload:?}"),
            ));
        }
        match fsops::stat_at(&self.cx.shared.uploads_fd, upload) {
            Ok(st) => Ok(st.is_some()),
            Err(e) => Err(fs_failed("stat of an upload", e)),
        }
    }

    fn record(&mut self, seq: u64, change: Change, result: Attr) -> Step<OpResult> {
        let now = self.cx.now;
        self.cx.tx.append(seq, now, Some(self.key), change)?;
        self.cx.tx.put_key(
            self.key,
            &KeyResult {
                attr: result.clone(),
                seq,
            },
        )?;
        Ok(OpResult::Applied { attr: result, seq })
    }

    fn create(
        &mut self,
        parent: &ObjRef,
        name: &str,
        object: &NewObject,
        attrs: &SetAttrs,
    ) -> Step<OpResult> {
        let pm = self.dir_meta(parent)?;
        let pid = pm.attr.id;
        self.check_name(name, pid)?;
        if let Some(existing) = self.cx.tx.child(pid, name)? {
            return Err(conflict(
                ConflictReason::NameExists,
                self.cx.tx.meta(existing)?.map(|m| m.attr),
            ));
        }
        let kind = match object {
            NewObject::File { upload } => {
                if let Some(u) = upload
                    && !self.staged(u)?
                    && self.live()
                {
                    return Err(rejected(
                        ErrorCode::NotFound,
                        format!("no finished upload {u:?}"),
                    ));
                }
                Kind::File
            }
            NewObject::Dir => Kind::Dir,
            NewObject::Symlink { target } => {
                if !fsops::valid_target(target) {
                    return Err(rejected(
                        ErrorCode::BadRequest,
                        "symlink target is empty, too long or has NUL",
                    ));
                }
                let depth = self.cx.tx.path_of(pid)?.map(|p| p.len()).unwrap_or(0);
                if !fsops::target_stays_inside(depth, target) {
                    return Err(rejected(
                        ErrorCode::Escape,
                        format!("symlink target {target:?} leads outside the export"),
                    ));
                }
                Kind::Symlink
            }
        };
        let pfd = self.open_dir(pid, ConflictReason::ParentMissing)?;
        if self.live() {
            let made = match object {
                NewObject::File { upload: Some(u) } => {
                    install_new(&self.cx.shared.uploads_fd, u, &pfd, name, attrs)
                }
                NewObject::File { upload: None } => create_file(&pfd, name, attrs),
                NewObject::Dir => create_dir(&pfd, name, attrs),
                NewObject::Symlink { target } => create_symlink(&pfd, name, target, attrs),
            };
            match made {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(self.name_taken(pid, &pfd, name));
                }
                Err(e) => return Err(fs_failed("create", e)),
            }
        } else {
            let Some(st) = fsops::stat_at(&pfd, name).map_err(|e| fs_failed("stat", e))? else {
                return Err(not_applied());
            };
            if fsops::kind_of(&st) != Some(kind) {
                return Err(not_applied());
            }
            if let NewObject::File { upload: Some(u) } = object
                && self.staged(u)?
                && !self.copied_in(u, &pfd, name)
            {
                return Err(not_applied());
            }
            // The object exists: finish its attributes (idempotent).
            if let Err(e) = set_attrs_at(&pfd, name, kind, attrs, None) {
                tracing::warn!(error = %e, "finishing the attributes of a recovered create");
            }
        }
        let st = stat_or_fail(&pfd, name)?;
        let target = if kind == Kind::Symlink {
            Some(fsops::read_link(&pfd, name).map_err(|e| fs_failed("readlink", e))?)
        } else {
            None
        };
        let seq = self.cx.tx.next_seq()?;
        let id = self.cx.tx.alloc_id()?;
        let attr = fsops::attr_of(id, seq, &st, 0, target)
            .ok_or_else(|| fs_failed("create", "unexpected file type"))?;
        let meta = Meta {
            parent: pid,
            name: name.to_owned(),
            attr: attr.clone(),
            fp: Fingerprint::of(&st),
        };
        self.cx.tx.put(&meta)?;
        self.cx.tx.link(pid, name, id)?;
        self.cx.tx.set_ino(meta.fp.ino, id)?;
        let parent = self.touch_dir(pm, &pfd, seq, 1)?;
        self.cx.sync_dirs.push(pfd);
        self.record(
            seq,
            Change::Create {
                parent,
                name: name.to_owned(),
                attr: attr.clone(),
            },
            attr,
        )
    }

    /// Refreshes a directory's attributes after an entry change: stat,
    /// entry count adjusted by `delta`, version `seq`. Stores and returns it.
    fn touch_dir(&mut self, mut m: Meta, fd: &OwnedFd, seq: u64, delta: i64) -> Step<Attr> {
        let st = fsops::fstat(fd).map_err(|e| fs_failed("stat", e))?;
        let size = (m.attr.size as i64 + delta).max(0) as u64;
        if let Some(attr) = fsops::attr_of(m.attr.id, seq, &st, size, None) {
            m.attr = attr;
            m.fp = Fingerprint::of(&st);
        }
        self.cx.tx.put(&m)?;
        Ok(m.attr)
    }

    fn write(
        &mut self,
        id: &ObjRef,
        base: &Base,
        upload: &str,
        mtime: Option<i64>,
    ) -> Step<OpResult> {
        let Some(m) = self.resolve(id)? else {
            return Err(conflict(ConflictReason::Removed, None));
        };
        if m.attr.kind != Kind::File {
            return Err(rejected(
                ErrorCode::WrongKind,
                format!("object {} is not a file", m.attr.id),
            ));
        }
        self.check_unchanged_but_moved(&m, base)?;
        let staged = self.staged(upload)?;
        if !staged && self.live() {
            return Err(rejected(
                ErrorCode::NotFound,
                format!("no finished upload {upload:?}"),
            ));
        }
        let pfd = self.open_dir(m.parent, ConflictReason::Removed)?;
        self.check_disk(&pfd, &m)?;
        if self.live() {
            if let Err(e) = install_over(&self.cx.shared.uploads_fd, upload, &pfd, &m, mtime) {
                return Err(fs_failed("installing an upload", e));
            }
        } else if staged {
            let applied = self.copied_in(upload, &pfd, &m.name);
            // Left by a crash between linking the copy and renaming it over
            // the file, whether or not the file already held these bytes
            // (then the copy reads as installed, and the write counts as
            // applied: it changes nothing but the inode).
            self.clear_install_leftover(m.parent, &pfd, &format!("{INSTALLING_PREFIX}{upload}"))?;
            if !applied {
                return Err(not_applied());
            }
        }
        let st = stat_or_fail(&pfd, &m.name)?;
        if fsops::kind_of(&st) != Some(Kind::File) {
            return Err(not_applied());
        }
        let seq = self.cx.tx.next_seq()?;
        let meta = self.refreshed(m, &st, seq)?;
        // Replacing a directory entry moved the parent's mtime: keep its
        // fingerprint current so the scan does not report it.
        self.refresh_dir_fp(meta.parent, &pfd)?;
        self.cx.sync_dirs.push(pfd);
        let attr = meta.attr.clone();
        self.record(seq, Change::Write { attr: attr.clone() }, attr)
    }

    /// Stores `m` with attributes from `st` at version `seq`.
    fn refreshed(&mut self, mut m: Meta, st: &Stat, seq: u64) -> Step<Meta> {
        let fp = Fingerprint::of(st);
        if fp.ino != m.fp.ino {
            self.cx.tx.drop_ino(m.fp.ino, m.attr.id)?;
            self.cx.tx.set_ino(fp.ino, m.attr.id)?;
        }
        if let Some(attr) = fsops::attr_of(m.attr.id, seq, st, m.attr.size, m.attr.target.clone()) {
            m.attr = attr;
        }
        m.fp = fp;
        self.cx.tx.put(&m)?;
        Ok(m)
    }

    fn refresh_dir_fp(&mut self, dir: ObjectId, fd: &OwnedFd) -> Step<()> {
        if let (Some(mut dm), Ok(st)) = (self.cx.tx.meta(dir)?, fsops::fstat(fd)) {
            dm.fp = Fingerprint::of(&st);
            self.cx.tx.put(&dm)?;
        }
        Ok(())
    }

    fn set_attr(&mut self, id: &ObjRef, base: &Base, attrs: &SetAttrs) -> Step<OpResult> {
        let Some(m) = self.resolve(id)? else {
            return Err(conflict(ConflictReason::Removed, None));
        };
        let kind = m.attr.kind;
        if attrs.size.is_some() && kind != Kind::File {
            return Err(rejected(
                ErrorCode::WrongKind,
                "only a file has a size to set",
            ));
        }
        if kind != Kind::Dir {
            self.check_unchanged_but_moved(&m, base)?;
        }
        let (pfd, name) = if m.attr.id == ROOT_ID {
            (
                self.open_dir(ROOT_ID, ConflictReason::Removed)?,
                ".".to_owned(),
            )
        } else {
            (
                self.open_dir(m.parent, ConflictReason::Removed)?,
                m.name.clone(),
            )
        };
        if kind == Kind::File {
            self.check_disk(&pfd, &m)?;
        }
        match fsops::stat_at(&pfd, &name) {
            Ok(Some(st)) if st.st_ino == m.fp.ino => {}
            Ok(_) if !self.live() => return Err(not_applied()),
            Ok(_) => {
                self.cx.reconcile_dirs(&[m.parent.max(ROOT_ID)])?;
                return Err(conflict(
                    ConflictReason::Removed,
                    self.cx.tx.meta(m.attr.id)?.map(|m| m.attr),
                ));
            }
            Err(e) => return Err(fs_failed("stat", e)),
        }
        if let Err(e) = set_attrs_at(&pfd, &name, kind, attrs, attrs.size) {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return Err(rejected(
                    ErrorCode::BadRequest,
                    format!("not permitted: {e}"),
                ));
            }
            // A size the filesystem cannot hold fails the same way on every
            // retry: refuse it rather than call it a passing failure.
            let too_big = e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error())
                || (attrs.size.is_some() && e.kind() == std::io::ErrorKind::InvalidInput);
            if too_big {
                return Err(rejected(
                    ErrorCode::TooLarge,
                    format!("the filesystem cannot hold that size: {e}"),
                ));
            }
            return Err(fs_failed("setattr", e));
        }
        let st = stat_or_fail(&pfd, &name)?;
        let seq = self.cx.tx.next_seq()?;
        let meta = self.refreshed(m, &st, seq)?;
        let attr = meta.attr.clone();
        let change = if attrs.size.is_some() {
            Change::Truncate { attr: attr.clone() }
        } else {
            Change::SetAttr { attr: attr.clone() }
        };
        self.cx.sync_dirs.push(pfd);
        self.record(seq, change, attr)
    }

    fn remove(&mut self, parent: &ObjRef, name: &str, id: &ObjRef, base: &Base) -> Step<OpResult> {
        let pm = self.dir_meta(parent)?;
        let pid = pm.attr.id;
        self.check_name(name, pid)?;
        let Some(m) = self.resolve(id)? else {
            return Err(conflict(ConflictReason::Removed, None));
        };
        if self.cx.tx.child(pid, name)? != Some(m.attr.id) {
            return Err(conflict(ConflictReason::NameMismatch, Some(m.attr)));
        }
        if m.attr.kind == Kind::Dir {
            if m.attr.size > 0 {
                return Err(conflict(ConflictReason::NotEmpty, Some(m.attr)));
            }
        } else {
            self.check_version(&m, base)?;
        }
        let pfd = self.open_dir(pid, ConflictReason::ParentMissing)?;
        if m.attr.kind != Kind::Dir {
            self.check_disk(&pfd, &m)?;
        }
        if self.live() {
            let flags = if m.attr.kind == Kind::Dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            match rustix::fs::unlinkat(&pfd, names::to_os(name), flags) {
                Ok(()) => {}
                Err(e) if e == rustix::io::Errno::NOTEMPTY || e == rustix::io::Errno::EXIST => {
                    self.cx.reconcile_dirs(&[m.attr.id])?;
                    return Err(conflict(
                        ConflictReason::NotEmpty,
                        self.cx.tx.meta(m.attr.id)?.map(|m| m.attr),
                    ));
                }
                Err(e) if e == rustix::io::Errno::NOENT => {
                    self.cx.reconcile_dirs(&[pid])?;
                    return Err(conflict(
                        ConflictReason::Removed,
                        self.cx.tx.meta(m.attr.id)?.map(|m| m.attr),
                    ));
                }
                Err(e) => return Err(fs_failed("remove", e)),
            }
        } else {
            match fsops::stat_at(&pfd, name) {
                Ok(Some(st)) if st.st_ino == m.fp.ino => return Err(not_applied()),
                Ok(_) => {}
                Err(e) => return Err(fs_failed("stat", e)),
            }
        }
        let seq = self.cx.tx.next_seq()?;
        self.cx.tx.unlink(pid, name)?;
        self.cx.tx.forget_subtree(m.attr.id)?;
        let parent = self.touch_dir(pm, &pfd, seq, -1)?;
        self.cx.sync_dirs.push(pfd);
        self.record(
            seq,
            Change::Remove {
                parent: parent.clone(),
                name: name.to_owned(),
                id: m.attr.id,
            },
            parent,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        from_parent: &ObjRef,
        from_name: &str,
        id: &ObjRef,
        base: &Base,
        to_parent: &ObjRef,
        to_name: &str,
        replace: Option<&(ObjRef, Base)>,
    ) -> Step<OpResult> {
        let fpm = self.dir_meta(from_parent)?;
        let tpm = self.dir_meta(to_parent)?;
        let (fpid, tpid) = (fpm.attr.id, tpm.attr.id);
        self.check_name(from_name, fpid)?;
        self.check_name(to_name, tpid)?;
        let Some(m) = self.resolve(id)? else {
            return Err(conflict(ConflictReason::Removed, None));
        };
        if self.cx.tx.child(fpid, from_name)? != Some(m.attr.id) {
            return Err(conflict(ConflictReason::NameMismatch, Some(m.attr)));
        }
        if m.attr.kind != Kind::Dir {
            self.check_version(&m, base)?;
        } else if self.cx.tx.is_within(tpid, m.attr.id)? {
            return Err(rejected(
                ErrorCode::BadRequest,
                "a directory cannot move into itself",
            ));
        }
        let dest = self.cx.tx.child(tpid, to_name)?;
        let replaced: Option<Meta> = match (dest, replace) {
            (Some(d), None) => {
                return Err(conflict(
                    ConflictReason::NameExists,
                    self.cx.tx.meta(d)?.map(|m| m.attr),
                ));
            }
            // What the move was to replace has left that name (removed,
            // or moved away, and changed or not there): the name is free,
            // the move takes it and replaces nothing. Refusing it would
            // read, to the gateway, as if the moved object itself were
            // gone or moved.
            (None, _) => None,
            (Some(d), Some((r, rbase))) => {
                let at = self.cx.tx.meta(d)?;
                let Some(rm) = self.resolve(r)? else {
                    return Err(conflict(ConflictReason::NameMismatch, at.map(|m| m.attr)));
                };
                if rm.attr.id != d {
                    return Err(conflict(ConflictReason::NameMismatch, at.map(|m| m.attr)));
                }
                if rm.attr.id == m.attr.id {
                    return Err(rejected(
                        ErrorCode::BadRequest,
                        "an object cannot replace itself",
                    ));
                }
                match (m.attr.kind == Kind::Dir, rm.attr.kind == Kind::Dir) {
                    (true, false) | (false, true) => {
                        return Err(rejected(
                            ErrorCode::WrongKind,
                            "a rename can replace only an object of the same kind",
                        ));
                    }
                    (true, true) if rm.attr.size > 0 => {
                        return Err(conflict(ConflictReason::NotEmpty, Some(rm.attr)));
                    }
                    (true, true) => {}
                    (false, false) => self.check_version(&rm, rbase)?,
                }
                Some(rm)
            }
        };
        let ffd = self.open_dir(fpid, ConflictReason::ParentMissing)?;
        let tfd = self.open_dir(tpid, ConflictReason::ParentMissing)?;
        if m.attr.kind != Kind::Dir {
            self.check_disk(&ffd, &m)?;
        }
        if let Some(rm) = &replaced
            && rm.attr.kind != Kind::Dir
        {
            self.check_disk(&tfd, rm)?;
        }
        if self.live() {
            let flags = if replaced.is_some() {
                RenameFlags::empty()
            } else {
                RenameFlags::NOREPLACE
            };
            let renamed = match rustix::fs::renameat_with(
                &ffd,
                names::to_os(from_name),
                &tfd,
                names::to_os(to_name),
                flags,
            ) {
                Err(rustix::io::Errno::XDEV) if m.attr.kind != Kind::Dir => {
                    let tmp_name = format!("{INSTALLING_PREFIX}{}", m.attr.id);
                    move_file_across(
                        (&ffd, from_name),
                        (&tfd, to_name),
                        &tmp_name,
                        replaced.is_some(),
                    )
                    .map_err(|e| {
                        rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
                    })
                }
                other => other,
            };
            match renamed {
                Ok(()) => {}
                Err(e) if e == rustix::io::Errno::EXIST && replaced.is_none() => {
                    return Err(self.name_taken(tpid, &tfd, to_name));
                }
                Err(e) if e == rustix::io::Errno::NOTEMPTY || e == rustix::io::Errno::EXIST => {
                    let rid = replaced.as_ref().map(|r| r.attr.id).unwrap_or(tpid);
                    self.cx.reconcile_dirs(&[rid])?;
                    return Err(conflict(
                        ConflictReason::NotEmpty,
                        self.cx.tx.meta(rid)?.map(|m| m.attr),
                    ));
                }
                Err(e) if e == rustix::io::Errno::NOENT => {
                    self.cx.reconcile_dirs(&[fpid])?;
                    return Err(conflict(
                        ConflictReason::Removed,
                        self.cx.tx.meta(m.attr.id)?.map(|m| m.attr),
                    ));
                }
                Err(e) => return Err(fs_failed("rename", e)),
            }
        } else {
            let from = fsops::stat_at(&ffd, from_name).map_err(|e| fs_failed("stat", e))?;
            let to = fsops::stat_at(&tfd, to_name).map_err(|e| fs_failed("stat", e))?;
            // A file or symlink moved to another filesystem is a copy (a
            // new inode): there, the name it left and the name it took tell.
            let across = m.attr.kind != Kind::Dir && !same_filesystem(&ffd, &tfd);
            let arrived = to.as_ref().is_some_and(|s| across || s.st_ino == m.fp.ino);
            let left = from.map(|s| s.st_ino) != Some(m.fp.ino);
            let moved =
                arrived && (left || across && self.moved_across(&ffd, from_name, &tfd, to_name));
            if across {
                // As for a write: the copy may read as moved (the file it
                // replaces held the same bytes and mtime) with its
                // temporary name still there.
                let tmp_name = format!("{INSTALLING_PREFIX}{}", m.attr.id);
                self.clear_install_leftover(tpid, &tfd, &tmp_name)?;
            }
            if !moved {
                return Err(not_applied());
            }
        }
        let seq = self.cx.tx.next_seq()?;
        self.cx.tx.unlink(fpid, from_name)?;
        if let Some(rm) = &replaced {
            self.cx.tx.unlink(tpid, to_name)?;
            self.cx.tx.forget_subtree(rm.attr.id)?;
        }
        self.cx.tx.link(tpid, to_name, m.attr.id)?;
        let st = stat_or_fail(&tfd, to_name)?;
        let mut moved = m;
        moved.parent = tpid;
        moved.name = to_name.to_owned();
        let moved = self.refreshed(moved, &st, seq)?;
        let gained = if replaced.is_some() { 0 } else { 1 };
        let (from_attr, to_attr) = if fpid == tpid {
            let a = self.touch_dir(fpm, &ffd, seq, gained - 1)?;
            (a.clone(), a)
        } else {
            let f = self.touch_dir(fpm, &ffd, seq, -1)?;
            let t = self.touch_dir(tpm, &tfd, seq, gained)?;
            (f, t)
        };
        self.cx.sync_dirs.push(ffd);
        if fpid != tpid {
            self.cx.sync_dirs.push(tfd);
        }
        let attr = moved.attr.clone();
        self.record(
            seq,
            Change::Rename {
                from_parent: from_attr,
                from_name: from_name.to_owned(),
                to_parent: to_attr,
                to_name: to_name.to_owned(),
                attr: attr.clone(),
                replaced: replaced.map(|r| r.attr.id),
            },
            attr,
        )
    }
}

fn stat_or_fail(dir: &OwnedFd, name: &str) -> Step<Stat> {
    match fsops::stat_at(dir, name) {
        Ok(Some(st)) => Ok(st),
        Ok(None) => Err(fs_failed("stat", "the object vanished")),
        Err(e) => Err(fs_failed("stat", e)),
    }
}

fn io(e: rustix::io::Errno) -> std::io::Error {
    e.into()
}

const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;

fn timestamps(atime: Option<i64>, mtime: Option<i64>) -> Timestamps {
    let ts = |t: Option<i64>| match t {
        Some(n) => Timespec {
            tv_sec: n.div_euclid(1_000_000_000),
            tv_nsec: n.rem_euclid(1_000_000_000) as _,
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
    };
    Timestamps {
        last_access: ts(atime),
        last_modification: ts(mtime),
    }
}

/// Applies owner, mode, size and times to `dir/name` (`.` for `dir`
/// itself), without following symlinks. Owner changes the origin may not
/// make (not running as root) are refused with `PermissionDenied` before
/// anything changes.
fn set_attrs_at(
    dir: &OwnedFd,
    name: &str,
    kind: Kind,
    attrs: &SetAttrs,
    size: Option<u64>,
) -> std::io::Result<()> {
    let owner = (
        attrs.uid.map(rustix::fs::Uid::from_raw),
        attrs.gid.map(rustix::fs::Gid::from_raw),
    );
    let times = timestamps(attrs.atime, attrs.mtime);
    let has_times = attrs.atime.is_some() || attrs.mtime.is_some();
    if kind == Kind::Symlink {
        if owner.0.is_some() || owner.1.is_some() {
            rustix::fs::chownat(
                dir,
                names::to_os(name),
                owner.0,
                owner.1,
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io)?;
        }
        if has_times {
            rustix::fs::utimensat(dir, names::to_os(name), &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io)?;
        }
        return Ok(());
    }
    let fd: OwnedFd = match kind {
        Kind::Dir if name == "." => rustix::fs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            FsMode::empty(),
        )
        .map_err(io)?,
        Kind::Dir => match fsops::open_subdir(dir, name) {
            Ok(fd) => fd,
            Err(FsError::Io(e)) => return Err(e),
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    e.to_string(),
                ));
            }
        },
        _ => match fsops::open_file(dir, name, size.is_some()) {
            Ok(f) => f.into(),
            Err(FsError::Io(e)) => return Err(e),
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    e.to_string(),
                ));
            }
        },
    };
    if owner.0.is_some() || owner.1.is_some() {
        rustix::fs::fchown(&fd, owner.0, owner.1).map_err(io)?;
    }
    if let Some(mode) = attrs.mode {
        rustix::fs::fchmod(&fd, FsMode::from_raw_mode(mode & 0o7777)).map_err(io)?;
    }
    if let Some(size) = size {
        rustix::fs::ftruncate(&fd, size).map_err(io)?;
    }
    if has_times {
        rustix::fs::futimens(&fd, &times).map_err(io)?;
    }
    Ok(())
}

/// Owner changes a new object asked for but the origin may not make are
/// skipped with a warning rather than failing a half-made create.
fn finish_new(fd: &OwnedFd, attrs: &SetAttrs, default_mode: u32) -> std::io::Result<()> {
    if attrs.uid.is_some() || attrs.gid.is_some() {
        let owner = (
            attrs.uid.map(rustix::fs::Uid::from_raw),
            attrs.gid.map(rustix::fs::Gid::from_raw),
        );
        if let Err(e) = rustix::fs::fchown(fd, owner.0, owner.1) {
            tracing::warn!(error = %e, "cannot give a new object the owner asked for");
        }
    }
    let mode = attrs.mode.unwrap_or(default_mode) & 0o7777;
    rustix::fs::fchmod(fd, FsMode::from_raw_mode(mode)).map_err(io)?;
    if attrs.atime.is_some() || attrs.mtime.is_some() {
        rustix::fs::futimens(fd, &timestamps(attrs.atime, attrs.mtime)).map_err(io)?;
    }
    Ok(())
}

fn open_staged(uploads: &OwnedFd, upload: &str) -> std::io::Result<OwnedFd> {
    rustix::fs::openat(
        uploads,
        upload,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(io)
}

fn install_new(
    uploads: &OwnedFd,
    upload: &str,
    dir: &OwnedFd,
    name: &str,
    attrs: &SetAttrs,
) -> std::io::Result<()> {
    let fd = open_staged(uploads, upload)?;
    finish_new(&fd, attrs, DEFAULT_FILE_MODE)?;
    match rustix::fs::renameat_with(
        uploads,
        upload,
        dir,
        names::to_os(name),
        RenameFlags::NOREPLACE,
    ) {
        Err(rustix::io::Errno::XDEV) => {
            let copy = copy_across(fd, dir, attrs)?;
            link_unnamed(&copy, dir, name)?;
            test_across_pause();
            unstage(uploads, upload)
        }
        other => other.map_err(io),
    }
}

/// A staged upload copied into an unnamed file on `dir`'s filesystem, with
/// `attrs` applied and its content on disk: for a tree that is not on the
/// staging area's filesystem (a `--state` elsewhere, a mount point inside
/// the tree), where the rename that installs an upload cannot go.
///
/// The staged file is removed only after the copy is linked in, so a crash
/// in between leaves both; recovery then finds the copy holding the staged
/// bytes, counts the operation as applied and removes the leftover (see
/// `copied_in`).
fn copy_across(staged: OwnedFd, dir: &OwnedFd, attrs: &SetAttrs) -> std::io::Result<OwnedFd> {
    let tmp = rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        FsMode::from_raw_mode(0o600),
    )
    .map_err(io)?;
    let to = std::fs::File::from(tmp);
    copy_sparse(&std::fs::File::from(staged), &to)?;
    let tmp = OwnedFd::from(to);
    finish_new(&tmp, attrs, DEFAULT_FILE_MODE)?;
    rustix::fs::fsync(&tmp).map_err(io)?;
    Ok(tmp)
}

/// Copies `from` into the empty file `to`, holes as holes (a sparse disk
/// image stays sparse), or every byte where the filesystem cannot tell
/// where its holes are.
fn copy_sparse(from: &std::fs::File, to: &std::fs::File) -> std::io::Result<()> {
    use rustix::fs::SeekFrom;
    let len = from.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let (start, end) = match rustix::fs::seek(from, SeekFrom::Data(pos)) {
            Ok(start) => {
                let end = rustix::fs::seek(from, SeekFrom::Hole(start)).map_err(io)?;
                (start, end.min(len))
            }
            Err(rustix::io::Errno::NXIO) => break, // Only a hole is left.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOTSUP) => (pos, len),
            Err(e) => return Err(io(e)),
        };
        copy_range(from, to, start, end, &mut buf)?;
        pos = end;
    }
    to.set_len(len)
}

fn copy_range(
    from: &std::fs::File,
    to: &std::fs::File,
    start: u64,
    end: u64,
    buf: &mut [u8],
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut at = start;
    while at < end {
        let want = buf
            .len()
            .min(usize::try_from(end - at).unwrap_or(usize::MAX));
        let n = from.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "a staged upload shrank while it was copied",
            ));
        }
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Gives the unnamed file `fd` the name `name` in `dir` (failing if the
/// name is taken).
fn link_unnamed(fd: &OwnedFd, dir: &OwnedFd, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the /proc path does not.
    match rustix::fs::linkat(fd, "", dir, names::to_os(name), AtFlags::EMPTY_PATH) {
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => rustix::fs::linkat(
            rustix::fs::CWD,
            format!("/proc/self/fd/{}", fd.as_raw_fd()),
            dir,
            names::to_os(name),
            AtFlags::SYMLINK_FOLLOW,
        )
        .map_err(io),
        other => other.map_err(io),
    }
}

/// Gives the unnamed file `fd` the name `name` in `dir`, replacing the file
/// there: first the name `tmp_name` of its own, so that the replacement is
/// one rename within the directory, as it is from the staging area.
fn link_over(fd: &OwnedFd, dir: &OwnedFd, name: &str, tmp_name: &str) -> std::io::Result<()> {
    if let Err(e) = link_unnamed(fd, dir, tmp_name) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
        // Left by a crash between the link and the rename: the name is
        // ours (INSTALLING_PREFIX), and its operation is being replayed.
        rustix::fs::unlinkat(dir, tmp_name, AtFlags::empty()).map_err(io)?;
        link_unnamed(fd, dir, tmp_name)?;
    }
    test_replace_pause();
    if let Err(e) = rustix::fs::renameat(dir, tmp_name, dir, names::to_os(name)) {
        let _ = rustix::fs::unlinkat(dir, tmp_name, AtFlags::empty());
        return Err(io(e));
    }
    Ok(())
}

/// Whether a copy made across filesystems must also carry the original's
/// modification time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Times {
    Any,
    Kept,
}

/// Whether the regular file `copy` (a directory and a name in it) is on
/// another filesystem than the file `original` and a copy of it: the same
/// size, the same bytes and, with [`Times::Kept`], the same modification
/// time. No if either is not there. Symlinks likewise: the same target.
fn copied_across(
    (original_dir, original_name): (&OwnedFd, &str),
    (copy_dir, copy_name): (&OwnedFd, &str),
    times: Times,
) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let lstat = |dir: &OwnedFd, name: &str| {
        fsops::stat_at(dir, name).map_err(|e| std::io::Error::other(e.to_string()))
    };
    if let Some(a) = lstat(original_dir, original_name)?
        && fsops::kind_of(&a) == Some(Kind::Symlink)
    {
        let Some(b) = lstat(copy_dir, copy_name)? else {
            return Ok(false);
        };
        let same_mtime = (a.st_mtime, a.st_mtime_nsec) == (b.st_mtime, b.st_mtime_nsec);
        if a.st_dev == b.st_dev
            || fsops::kind_of(&b) != Some(Kind::Symlink)
            || (times == Times::Kept && !same_mtime)
        {
            return Ok(false);
        }
        let target = |dir: &OwnedFd, name: &str| {
            rustix::fs::readlinkat(dir, names::to_os(name), Vec::new()).map_err(io)
        };
        return Ok(target(original_dir, original_name)? == target(copy_dir, copy_name)?);
    }
    let (Some(original), Some(copy)) = (
        open_regular(original_dir, original_name)?,
        open_regular(copy_dir, copy_name)?,
    ) else {
        return Ok(false);
    };
    let (a, b) = (
        rustix::fs::fstat(&original).map_err(io)?,
        rustix::fs::fstat(&copy).map_err(io)?,
    );
    let same_mtime = (a.st_mtime, a.st_mtime_nsec) == (b.st_mtime, b.st_mtime_nsec);
    if a.st_dev == b.st_dev
        || fsops::kind_of(&b) != Some(Kind::File)
        || a.st_size != b.st_size
        || (times == Times::Kept && !same_mtime)
    {
        return Ok(false);
    }
    let (original, copy) = (std::fs::File::from(original), std::fs::File::from(copy));
    const PIECE: u64 = 1 << 20;
    let size = u64::try_from(a.st_size).unwrap_or(0);
    let (mut x, mut y) = (vec![0u8; PIECE as usize], vec![0u8; PIECE as usize]);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(PIECE) as usize;
        match (
            original.read_exact_at(&mut x[..n], at),
            copy.read_exact_at(&mut y[..n], at),
        ) {
            (Ok(()), Ok(())) if x[..n] == y[..n] => {}
            (Ok(()), Ok(())) => return Ok(false),
            // Shorter than it said: changing under us, so not our copy.
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(false);
            }
            (Err(e), _) | (_, Err(e)) => return Err(e),
        }
        at += n as u64;
    }
    Ok(true)
}

/// Opens `name` in `dir` for reading if it is there and not a symlink.
fn open_regular(dir: &OwnedFd, name: &str) -> std::io::Result<Option<OwnedFd>> {
    match rustix::fs::openat(
        dir,
        names::to_os(name),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        FsMode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP) => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// A pause after a copy made across filesystems is linked in and before
/// its original goes (a staged upload, or the old name of a moved file),
/// from `IMZ_TEST_ACROSS_PAUSE_MS`: the moment a crash leaves both, for
/// tests (kill -9 cannot aim at it).
fn test_across_pause() {
    test_pause(
        "IMZ_TEST_ACROSS_PAUSE_MS",
        "pausing before removing the original of a copy across filesystems, for a test",
    );
}

/// A pause between linking a replacement across filesystems at its
/// temporary name and renaming it over the file, from
/// `IMZ_TEST_REPLACE_PAUSE_MS`, for tests.
fn test_replace_pause() {
    test_pause(
        "IMZ_TEST_REPLACE_PAUSE_MS",
        "pausing between linking a replacement and renaming it over the file, for a test",
    );
}

/// A pause where a test asks for one (`var`, in milliseconds): the window a
/// kill -9 is to land in, which no test could hit otherwise.
fn test_pause(var: &str, what: &'static str) {
    let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    tracing::warn!(ms, "{what}");
    std::thread::sleep(std::time::Duration::from_millis(ms));
}

fn unstage(uploads: &OwnedFd, upload: &str) -> std::io::Result<()> {
    rustix::fs::unlinkat(uploads, upload, AtFlags::empty()).map_err(io)
}

fn install_over(
    uploads: &OwnedFd,
    upload: &str,
    dir: &OwnedFd,
    old: &Meta,
    mtime: Option<i64>,
) -> std::io::Result<()> {
    let fd = open_staged(uploads, upload)?;
    let attrs = SetAttrs {
        mode: Some(old.attr.mode),
        uid: Some(old.attr.uid),
        gid: Some(old.attr.gid),
        mtime,
        ..SetAttrs::default()
    };
    finish_new(&fd, &attrs, DEFAULT_FILE_MODE)?;
    match rustix::fs::renameat(uploads, upload, dir, names::to_os(&old.name)) {
        Err(rustix::io::Errno::XDEV) => {
            let copy = copy_across(fd, dir, &attrs)?;
            link_over(
                &copy,
                dir,
                &old.name,
                &format!("{INSTALLING_PREFIX}{upload}"),
            )?;
            test_across_pause();
            unstage(uploads, upload)
        }
        other => other.map_err(io),
    }
}

/// Moves a file or symlink to a directory on another filesystem, as `mv`
/// does: a copy with the same mode (a symlink: target), owner and times, on
/// disk before the original's name goes. With `replace`, the copy takes
/// `tmp_name` first and then replaces the file at the destination; without,
/// an existing name there fails the move (`AlreadyExists`).
fn move_file_across(
    (from, from_name): (&OwnedFd, &str),
    (to, to_name): (&OwnedFd, &str),
    tmp_name: &str,
    replace: bool,
) -> std::io::Result<()> {
    let lst =
        rustix::fs::statat(from, names::to_os(from_name), AtFlags::SYMLINK_NOFOLLOW).map_err(io)?;
    if fsops::kind_of(&lst) == Some(Kind::Symlink) {
        return move_symlink_across((from, from_name), &lst, (to, to_name), tmp_name, replace);
    }
    let source = rustix::fs::openat(
        from,
        names::to_os(from_name),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(io)?;
    let st = rustix::fs::fstat(&source).map_err(io)?;
    let attrs = SetAttrs {
        mode: Some(st.st_mode & 0o7777),
        uid: Some(st.st_uid),
        gid: Some(st.st_gid),
        size: None,
        atime: Some(fsops::nanos(st.st_atime, st.st_atime_nsec as i64)),
        mtime: Some(fsops::nanos(st.st_mtime, st.st_mtime_nsec as i64)),
    };
    let copy = copy_across(source, to, &attrs)?;
    if replace {
        link_over(&copy, to, to_name, tmp_name)?;
    } else {
        link_unnamed(&copy, to, to_name)?;
    }
    test_across_pause();
    rustix::fs::unlinkat(from, names::to_os(from_name), AtFlags::empty()).map_err(io)
}

/// [`move_file_across`] for a symlink (`st`, its lstat): a new symlink to
/// the same target, with the same owner and times. It is made at
/// `tmp_name` and renamed to its name once whole (a symlink has no unnamed
/// form to link in): a crash never leaves a half-made copy at the name,
/// which recovery would take for another object.
fn move_symlink_across(
    (from, from_name): (&OwnedFd, &str),
    st: &Stat,
    (to, to_name): (&OwnedFd, &str),
    tmp_name: &str,
    replace: bool,
) -> std::io::Result<()> {
    let target = rustix::fs::readlinkat(from, names::to_os(from_name), Vec::new()).map_err(io)?;
    let target = names::from_bytes(target.as_bytes()).into_owned();
    let attrs = SetAttrs {
        uid: Some(st.st_uid),
        gid: Some(st.st_gid),
        atime: Some(fsops::nanos(st.st_atime, st.st_atime_nsec as i64)),
        mtime: Some(fsops::nanos(st.st_mtime, st.st_mtime_nsec as i64)),
        ..SetAttrs::default()
    };
    // Left by a crash between the two steps, as in `link_over`.
    match rustix::fs::unlinkat(to, tmp_name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(io(e)),
    }
    create_symlink(to, tmp_name, &target, &attrs)?;
    test_replace_pause();
    let flags = if replace {
        RenameFlags::empty()
    } else {
        RenameFlags::NOREPLACE
    };
    if let Err(e) = rustix::fs::renameat_with(to, tmp_name, to, names::to_os(to_name), flags) {
        let _ = rustix::fs::unlinkat(to, tmp_name, AtFlags::empty());
        return Err(io(e));
    }
    test_across_pause();
    rustix::fs::unlinkat(from, names::to_os(from_name), AtFlags::empty()).map_err(io)
}

/// Whether two directories are on one filesystem (a rename between them
/// can work); yes if either cannot be asked.
fn same_filesystem(a: &OwnedFd, b: &OwnedFd) -> bool {
    match (rustix::fs::fstat(a), rustix::fs::fstat(b)) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev,
        _ => true,
    }
}

fn create_file(dir: &OwnedFd, name: &str, attrs: &SetAttrs) -> std::io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        names::to_os(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        FsMode::from_raw_mode(0o600),
    )
    .map_err(io)?;
    finish_new(&fd, attrs, DEFAULT_FILE_MODE)
}

fn create_dir(dir: &OwnedFd, name: &str, attrs: &SetAttrs) -> std::io::Result<()> {
    rustix::fs::mkdirat(dir, names::to_os(name), FsMode::from_raw_mode(0o700)).map_err(io)?;
    let fd = fsops::open_subdir(dir, name).map_err(|e| std::io::Error::other(e.to_string()))?;
    finish_new(&fd, attrs, DEFAULT_DIR_MODE)
}

fn create_symlink(
    dir: &OwnedFd,
    name: &str,
    target: &str,
    attrs: &SetAttrs,
) -> std::io::Result<()> {
    rustix::fs::symlinkat(names::to_os(target), dir, names::to_os(name)).map_err(io)?;
    let finish = SetAttrs {
        mode: None,
        size: None,
        ..attrs.clone()
    };
    if let Err(e) = set_attrs_at(dir, name, Kind::Symlink, &finish, None) {
        tracing::warn!(error = %e, "cannot set the owner or times of a new symlink");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_dir(path: &std::path::Path) -> OwnedFd {
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            FsMode::empty(),
        )
        .expect("open dir")
    }

    fn names(path: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(path)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_replacement_replayed_after_a_crash_clears_the_name_the_crash_left() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("f"), b"old").expect("f");
        let leftover = format!("{INSTALLING_PREFIX}u1");
        std::fs::write(tmp.path().join(&leftover), b"from before the crash").expect("leftover");
        let dir = open_dir(tmp.path());
        let copy = rustix::fs::openat(
            &dir,
            ".",
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            FsMode::from_raw_mode(0o644),
        )
        .expect("O_TMPFILE");
        rustix::io::write(&copy, b"new").expect("write");
        link_over(&copy, &dir, "f", &leftover).expect("link_over");
        assert_eq!(std::fs::read(tmp.path().join("f")).expect("read"), b"new");
        assert_eq!(names(tmp.path()), ["f"]);
    }
}
