//! The NFSv3 adapter: the only module that knows the NFS layer.
//!
//! The layer is `nfs3_server`, the maintained fork of `nfsserve` (see
//! ARCHITECTURE.md for why). This module turns its calls into [`Vfs`] calls
//! and [`VfsError`]s into NFS status codes, chosen on purpose:
//! an unreachable origin is `NFS3ERR_IO` (fail fast, never hang the client,
//! never `STALE` for a transient failure); a handle of an object that no
//! longer exists is `NFS3ERR_STALE`.
//!
//! File handles are the 8-byte fileid behind `nfs3_server`'s 8-byte
//! generation prefix. The generation is the cache's, fixed when the cache
//! is created, and fileids are never reused, so handles a client holds stay
//! valid across gateway restarts.
//!
//! The export is `/imz`. `nfs3_server` matches mount paths by string prefix
//! (it would take `/imzfoo` as `/imz` + `foo`), so the listener exports `/`
//! and [`NfsAdapter::lookup_by_path`] insists on the `imz` component itself.

use std::borrow::Cow;
use std::sync::Arc;

use imz_cache::{FileId, Kind, Object, ROOT_FILEID, SetAttrs};
use imz_origin::names;
use nfs3_server::nfs3_types::nfs3::{
    createverf3, fattr3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, sattr3, specdata3,
    stable_how,
};
use nfs3_server::vfs::{
    DirEntryPlus, FileHandleU64, NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator,
    VFSCapabilities,
};

use crate::vfs::write::{NewNode, Stability};
use crate::vfs::{Vfs, VfsError};
use crate::writer::Committed;

/// The export path clients mount.
pub const EXPORT: &str = "imz";

/// Directory entries read from the cache per batch while a READDIR reply fills.
const READDIR_BATCH: usize = 64;

pub struct NfsAdapter {
    vfs: Arc<Vfs>,
    fsid: u64,
}

impl NfsAdapter {
    pub fn new(vfs: Arc<Vfs>) -> Self {
        // Constant for the life of the cache, like the handles.
        let fsid = vfs.cache.generation() & 0xffff_ffff;
        Self { vfs, fsid }
    }

    fn fattr(&self, fid: FileId, obj: &Object) -> fattr3 {
        to_fattr(fid, obj, self.fsid)
    }

    fn attr_of(&self, fid: FileId) -> Result<fattr3, nfsstat3> {
        let obj = self.vfs.getattr(fid).map_err(status)?;
        Ok(self.fattr(fid, &obj))
    }
}

pub fn status(e: VfsError) -> nfsstat3 {
    match e {
        VfsError::NotFound => nfsstat3::NFS3ERR_NOENT,
        VfsError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        VfsError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        VfsError::Exists => nfsstat3::NFS3ERR_EXIST,
        VfsError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        VfsError::Stale => nfsstat3::NFS3ERR_STALE,
        VfsError::Offline => nfsstat3::NFS3ERR_IO,
        VfsError::Io(why) => {
            // The client only sees "I/O error": the why goes to the log.
            tracing::warn!(%why, "answering an I/O error");
            nfsstat3::NFS3ERR_IO
        }
        VfsError::Invalid(_) => nfsstat3::NFS3ERR_INVAL,
        VfsError::NameTooLong => nfsstat3::NFS3ERR_NAMETOOLONG,
        VfsError::NoSpace => nfsstat3::NFS3ERR_NOSPC,
        VfsError::TooLarge => nfsstat3::NFS3ERR_FBIG,
        VfsError::NotSupported => nfsstat3::NFS3ERR_NOTSUPP,
        VfsError::Access => nfsstat3::NFS3ERR_ACCES,
        VfsError::ReadOnly => nfsstat3::NFS3ERR_ROFS,
    }
}

/// NFSv3 times are unsigned 32-bit seconds: a time before 1970 reads as
/// 1970, one after 2106 as the last instant of 2106.
fn nfstime(nanos: i64) -> nfstime3 {
    let nanos = nanos.max(0);
    match u32::try_from(nanos / 1_000_000_000) {
        Ok(seconds) => nfstime3 {
            seconds,
            nseconds: (nanos % 1_000_000_000) as u32,
        },
        Err(_) => nfstime3 {
            seconds: u32::MAX,
            nseconds: 999_999_999,
        },
    }
}

pub fn to_fattr(fid: FileId, obj: &Object, fsid: u64) -> fattr3 {
    let a = &obj.attrs;
    fattr3 {
        type_: match obj.kind {
            Kind::File => ftype3::NF3REG,
            Kind::Dir => ftype3::NF3DIR,
            Kind::Symlink => ftype3::NF3LNK,
        },
        mode: a.mode & 0o7777,
        nlink: a.nlink.max(1),
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        used: a.size.div_ceil(4096) * 4096,
        rdev: specdata3::default(),
        fsid,
        fileid: fid,
        atime: nfstime(a.atime),
        mtime: nfstime(a.mtime),
        ctime: nfstime(a.ctime),
    }
}

/// A client's name as imz carries it (see `imz_origin::names`).
fn name_of<'a>(name: &'a filename3<'_>) -> Cow<'a, str> {
    names::from_bytes(name.as_ref())
}

impl NfsReadFileSystem for NfsAdapter {
    type Handle = FileHandleU64;

    fn root_dir(&self) -> FileHandleU64 {
        FileHandleU64::new(ROOT_FILEID)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(dir = dirid.as_u64()))]
    async fn lookup(
        &self,
        dirid: &FileHandleU64,
        filename: &filename3<'_>,
    ) -> Result<FileHandleU64, nfsstat3> {
        let name = &*name_of(filename);
        self.vfs
            .lookup(dirid.as_u64(), name)
            .await
            .map(FileHandleU64::new)
            .map_err(status)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn lookup_by_path(&self, path: &str) -> Result<FileHandleU64, nfsstat3> {
        let path = path.trim_matches('/');
        let rest = match path.split_once('/') {
            Some((first, rest)) if first == EXPORT => rest,
            None if path == EXPORT => "",
            _ => {
                tracing::info!(path, "refused mount of a path outside /{EXPORT}");
                return Err(nfsstat3::NFS3ERR_NOENT);
            }
        };
        self.vfs
            .lookup_path(rest)
            .await
            .map(FileHandleU64::new)
            .map_err(status)
    }

    #[tracing::instrument(level = "trace", skip_all, fields(fid = id.as_u64()))]
    async fn getattr(&self, id: &FileHandleU64) -> Result<fattr3, nfsstat3> {
        self.attr_of(id.as_u64())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(fid = id.as_u64(), offset, count))]
    async fn read(
        &self,
        id: &FileHandleU64,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        self.vfs
            .read(id.as_u64(), offset, count)
            .await
            .map_err(|e| {
                tracing::debug!(fid = id.as_u64(), offset, count, error = %e, "read failed");
                status(e)
            })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(dir = dirid.as_u64(), cookie))]
    async fn readdirplus(
        &self,
        dirid: &FileHandleU64,
        cookie: u64,
    ) -> Result<impl ReadDirPlusIterator<FileHandleU64>, nfsstat3> {
        let dir = dirid.as_u64();
        self.vfs.ensure_listed(dir).await.map_err(status)?;
        Ok(DirIter {
            vfs: Arc::clone(&self.vfs),
            dir,
            cookie,
            fsid: self.fsid,
            buffer: std::collections::VecDeque::new(),
            done: false,
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(fid = id.as_u64()))]
    async fn readlink(&self, id: &FileHandleU64) -> Result<nfspath3<'_>, nfsstat3> {
        let target = self.vfs.readlink(id.as_u64()).map_err(status)?;
        Ok(nfspath3::from(names::to_bytes(&target).into_owned()))
    }
}

/// Walks a directory's cached entries in cookie order, a batch at a time,
/// for as long as the reply has room.
struct DirIter {
    vfs: Arc<Vfs>,
    dir: FileId,
    cookie: u64,
    fsid: u64,
    buffer: std::collections::VecDeque<DirEntryPlus<FileHandleU64>>,
    done: bool,
}

impl ReadDirPlusIterator<FileHandleU64> for DirIter {
    async fn next(&mut self) -> NextResult<DirEntryPlus<FileHandleU64>> {
        if self.buffer.is_empty() && !self.done {
            match self.vfs.entries_after(self.dir, self.cookie, READDIR_BATCH) {
                Ok(batch) => {
                    if batch.len() < READDIR_BATCH {
                        self.done = true;
                    }
                    for (entry, obj) in batch {
                        self.cookie = entry.cookie;
                        self.buffer.push_back(DirEntryPlus {
                            fileid: entry.fileid,
                            name: names::to_bytes(&entry.name).into_owned().into(),
                            cookie: entry.cookie,
                            name_attributes: Some(to_fattr(entry.fileid, &obj, self.fsid)),
                            name_handle: Some(FileHandleU64::new(entry.fileid)),
                        });
                    }
                }
                Err(e) => return NextResult::Err(status(e)),
            }
        }
        match self.buffer.pop_front() {
            Some(entry) => NextResult::Ok(entry),
            None => NextResult::Eof,
        }
    }
}

/// Converts NFS attribute changes, resolving "server time" to now.
fn set_attrs(s: &sattr3) -> SetAttrs {
    use nfs3_server::nfs3_types::nfs3::{Nfs3Option, set_atime, set_mtime};
    let now = crate::vfs::write::now_nanos();
    let time = |t: &nfstime3| i64::from(t.seconds) * 1_000_000_000 + i64::from(t.nseconds);
    SetAttrs {
        mode: match s.mode {
            Nfs3Option::Some(m) => Some(m),
            Nfs3Option::None => None,
        },
        uid: match s.uid {
            Nfs3Option::Some(u) => Some(u),
            Nfs3Option::None => None,
        },
        gid: match s.gid {
            Nfs3Option::Some(g) => Some(g),
            Nfs3Option::None => None,
        },
        size: match s.size {
            Nfs3Option::Some(z) => Some(z),
            Nfs3Option::None => None,
        },
        atime: match &s.atime {
            set_atime::DONT_CHANGE => None,
            set_atime::SET_TO_SERVER_TIME => Some(now),
            set_atime::SET_TO_CLIENT_TIME(t) => Some(time(t)),
        },
        mtime: match &s.mtime {
            set_mtime::DONT_CHANGE => None,
            set_mtime::SET_TO_SERVER_TIME => Some(now),
            set_mtime::SET_TO_CLIENT_TIME(t) => Some(time(t)),
        },
    }
}

/// Every change but an UNSTABLE write is durable before the reply
/// (group-committed). An UNSTABLE write may be answered before its fsync,
/// kept safe from a gateway crash by the unstable-write log; COMMIT makes
/// it durable. The write verifier is the handle generation, which changes
/// only when a system crash may have lost such writes (see `unstable`).
impl NfsFileSystem for NfsAdapter {
    fn capabilities(&self) -> VFSCapabilities {
        VFSCapabilities::ReadWrite
    }

    #[tracing::instrument(level = "debug", skip_all, fields(fid = id.as_u64()))]
    async fn setattr(&self, id: &FileHandleU64, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let fid = id.as_u64();
        let obj = self
            .vfs
            .setattr(fid, set_attrs(&setattr))
            .await
            .map_err(status)?;
        Ok(self.fattr(fid, &obj))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(fid = id.as_u64(), offset, len = data.len()))]
    async fn write(
        &self,
        id: &FileHandleU64,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let fid = id.as_u64();
        let stability = match stable {
            stable_how::UNSTABLE => Stability::Unstable,
            _ => Stability::Stable,
        };
        let (obj, committed) = self
            .vfs
            .write(fid, offset, data.to_vec(), stability)
            .await
            .map_err(status)?;
        let committed = match committed {
            Committed::Durable => stable_how::FILE_SYNC,
            Committed::Unstable => stable_how::UNSTABLE,
        };
        Ok((self.fattr(fid, &obj), committed))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(dir = dirid.as_u64()))]
    async fn create(
        &self,
        dirid: &FileHandleU64,
        filename: &filename3<'_>,
        attr: sattr3,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let name = &*name_of(filename);
        let (fid, obj) = self
            .vfs
            .create(
                dirid.as_u64(),
                name,
                NewNode::File { exclusive: None },
                set_attrs(&attr),
            )
            .await
            .map_err(status)?;
        Ok((FileHandleU64::new(fid), self.fattr(fid, &obj)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(dir = dirid.as_u64()))]
    async fn create_exclusive(
        &self,
        dirid: &FileHandleU64,
        filename: &filename3<'_>,
        createverf: createverf3,
    ) -> Result<FileHandleU64, nfsstat3> {
        let name = &*name_of(filename);
        let node = NewNode::File {
            exclusive: Some(createverf.0),
        };
        let (fid, _) = self
            .vfs
            .create(dirid.as_u64(), name, node, SetAttrs::default())
            .await
            .map_err(status)?;
        Ok(FileHandleU64::new(fid))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(dir = dirid.as_u64()))]
    async fn mkdir(
        &self,
        dirid: &FileHandleU64,
        dirname: &filename3<'_>,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let name = &*name_of(dirname);
        let (fid, obj) = self
            .vfs
            .create(dirid.as_u64(), name, NewNode::Dir, SetAttrs::default())
            .await
            .map_err(status)?;
        Ok((FileHandleU64::new(fid), self.fattr(fid, &obj)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(dir = dirid.as_u64()))]
    async fn remove(
        &self,
        dirid: &FileHandleU64,
        filename: &filename3<'_>,
    ) -> Result<(), nfsstat3> {
        let name = &*name_of(filename);
        self.vfs.remove(dirid.as_u64(), name).await.map_err(status)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(from = from_dirid.as_u64(), to = to_dirid.as_u64()))]
    async fn rename<'a>(
        &self,
        from_dirid: &FileHandleU64,
        from_filename: &filename3<'a>,
        to_dirid: &FileHandleU64,
        to_filename: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        let from = &*name_of(from_filename);
        let to = &*name_of(to_filename);
        let (from_dir, to_dir) = (from_dirid.as_u64(), to_dirid.as_u64());
        if from_dir != to_dir {
            // A symlink that would lead outside the export at its new depth
            // is refused, as SYMLINK refuses one made there.
            let fid = self.vfs.lookup(from_dir, from).await.map_err(status)?;
            let obj = self.vfs.getattr(fid).map_err(status)?;
            if let (Kind::Symlink, Some(target)) = (obj.kind, &obj.target) {
                let depth = self.vfs.depth(to_dir).map_err(status)?;
                if !imz_origin::fsops::target_stays_inside(depth, target) {
                    tracing::info!(%target, "rename refused: the symlink would lead outside the export");
                    return Err(nfsstat3::NFS3ERR_ACCES);
                }
            }
        }
        self.vfs
            .rename(from_dir, from, to_dir, to)
            .await
            .map_err(status)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(dir = dirid.as_u64()))]
    async fn symlink<'a>(
        &self,
        dirid: &FileHandleU64,
        linkname: &filename3<'a>,
        symlink: &nfspath3<'a>,
        attr: &sattr3,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let name = &*name_of(linkname);
        let target = names::from_bytes(symlink.as_ref()).into_owned();
        if !imz_origin::fsops::valid_target(&target) {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        // The origin refuses targets that lead outside the export by their
        // text (absolute, or `..` above the root): say so now, rather than
        // accept one that could never reach the origin.
        let depth = self.vfs.depth(dirid.as_u64()).map_err(status)?;
        if !imz_origin::fsops::target_stays_inside(depth, &target) {
            tracing::info!(%target, "symlink refused: it leads outside the export");
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        let (fid, obj) = self
            .vfs
            .create(
                dirid.as_u64(),
                name,
                NewNode::Symlink { target },
                set_attrs(attr),
            )
            .await
            .map_err(status)?;
        Ok((FileHandleU64::new(fid), self.fattr(fid, &obj)))
    }

    async fn commit(&self, id: &FileHandleU64, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        self.vfs.commit(id.as_u64()).await.map_err(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_outside_what_nfsv3_holds_are_clamped_to_its_ends() {
        let t = |nanos| {
            let t = nfstime(nanos);
            (t.seconds, t.nseconds)
        };
        assert_eq!(t(1_500_000_000_250), (1500, 250));
        assert_eq!(t(-1), (0, 0), "before 1970");
        assert_eq!(t(i64::MIN), (0, 0));
        // 2200-01-01, and the origin's saturated nanoseconds (2300).
        assert_eq!(t(7_258_118_400 * 1_000_000_000), (u32::MAX, 999_999_999));
        assert_eq!(t(i64::MAX), (u32::MAX, 999_999_999));
        assert_eq!(t(i64::from(u32::MAX) * 1_000_000_000 + 7), (u32::MAX, 7));
    }
}
