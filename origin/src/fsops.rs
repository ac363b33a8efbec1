//! Safe access to the files under the exported root: every path is walked
//! one component at a time from a directory descriptor opened at start-up,
//! with `O_NOFOLLOW`, so nothing an API request names can leave the root,
//! even when another program plants symlinks in the tree.
//!
//! The origin never follows a symlink inside the tree: symlinks are objects
//! whose target is served as data, and a directory replaced by a symlink is
//! refused as an escape.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, Stat};
use serde::{Deserialize, Serialize};

use crate::names;
use crate::wire::{Attr, Kind, Nanos, ObjectId, Version};

/// Why a path could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("path leads outside the exported directory (symlink in the way)")]
    Escape,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<rustix::io::Errno> for FsError {
    fn from(e: rustix::io::Errno) -> Self {
        if e == rustix::io::Errno::NOENT {
            Self::NotFound
        } else {
            Self::Io(e.into())
        }
    }
}

/// The exported directory, held open.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    root_path: PathBuf,
}

impl Tree {
    /// Opens `root` (which may itself be reached through symlinks: the user
    /// chose it). Everything below it is walked without following symlinks.
    pub fn open(root: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let root_path = std::fs::canonicalize(root)?;
        Ok(Self {
            root: fd,
            root_path,
        })
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    pub fn root_fd(&self) -> &OwnedFd {
        &self.root
    }

    /// Opens the directory at `names` (components from the root).
    pub fn open_dir<S: AsRef<str>>(&self, names: &[S]) -> Result<OwnedFd, FsError> {
        let mut fd = dup_dir(&self.root)?;
        for name in names {
            fd = open_subdir(&fd, name.as_ref())?;
        }
        Ok(fd)
    }
}

fn dup_dir(fd: &OwnedFd) -> Result<OwnedFd, FsError> {
    Ok(rustix::fs::openat(
        fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens `dir/name` as a directory, refusing symlinks.
pub fn open_subdir(dir: &OwnedFd, name: &str) -> Result<OwnedFd, FsError> {
    match rustix::fs::openat(
        dir,
        names::to_os(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(fd),
        Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
            classify_not_dir(dir, name)
        }
        Err(e) => Err(e.into()),
    }
}

fn classify_not_dir<T>(dir: &OwnedFd, name: &str) -> Result<T, FsError> {
    match rustix::fs::statat(dir, names::to_os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if kind_of(&st) == Some(Kind::Symlink) => Err(FsError::Escape),
        Ok(_) => Err(FsError::NotFound),
        Err(e) => Err(e.into()),
    }
}

/// Opens the regular file `dir/name`, refusing symlinks.
pub fn open_file(dir: &OwnedFd, name: &str, write: bool) -> Result<File, FsError> {
    let access = if write {
        OFlags::WRONLY
    } else {
        OFlags::RDONLY
    };
    match rustix::fs::openat(
        dir,
        names::to_os(name),
        access | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => {
            let file = File::from(fd);
            let st = rustix::fs::fstat(&file)?;
            if kind_of(&st) != Some(Kind::File) {
                return Err(FsError::NotFound);
            }
            // Drop O_NONBLOCK (set only so a FIFO planted at the name cannot hang us).
            rustix::fs::fcntl_setfl(&file, rustix::fs::fcntl_getfl(&file)? - OFlags::NONBLOCK)?;
            Ok(file)
        }
        Err(e) if e == rustix::io::Errno::LOOP => Err(FsError::Escape),
        Err(e) => Err(e.into()),
    }
}

/// `lstat` of `dir/name`; `None` if it does not exist.
pub fn stat_at(dir: &OwnedFd, name: &str) -> Result<Option<Stat>, FsError> {
    match rustix::fs::statat(dir, names::to_os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e == rustix::io::Errno::NOENT => Ok(None),
        Err(e) => Err(FsError::Io(e.into())),
    }
}

pub fn fstat(fd: impl AsFd) -> Result<Stat, FsError> {
    Ok(rustix::fs::fstat(fd)?)
}

pub fn read_link(dir: &OwnedFd, name: &str) -> Result<String, FsError> {
    let target = rustix::fs::readlinkat(dir, names::to_os(name), Vec::new())?;
    Ok(names::from_bytes(target.as_bytes()).into_owned())
}

/// Lists `dir`: `(name, lstat)` for each entry the origin exports (names as
/// [`names`] carries them). Kinds other than file/dir/symlink are skipped;
/// at the root, the state directory is skipped.
pub fn list_dir(dir: &OwnedFd, is_root: bool) -> Result<Vec<(String, Stat)>, FsError> {
    let mut out = Vec::new();
    let mut reader = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let raw = entry.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let name = names::from_bytes(raw);
        let name = name.as_ref();
        if crate::wire::is_reserved(name, is_root) {
            continue;
        }
        let Some(st) = stat_at(dir, name)? else {
            continue;
        };
        if kind_of(&st).is_none() {
            tracing::debug!(name, "skipping a special file");
            continue;
        }
        out.push((name.to_owned(), st));
    }
    Ok(out)
}

/// The kinds the origin exports; sockets, FIFOs and devices are `None`.
pub fn kind_of(st: &Stat) -> Option<Kind> {
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::RegularFile => Some(Kind::File),
        rustix::fs::FileType::Directory => Some(Kind::Dir),
        rustix::fs::FileType::Symlink => Some(Kind::Symlink),
        _ => None,
    }
}

/// What the origin remembers of an object's inode to notice changes made
/// behind its back. Access time is deliberately left out: reads change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub ino: u64,
    pub size: u64,
    pub mtime: Nanos,
    pub ctime: Nanos,
    /// Full `st_mode`, type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Fingerprint {
    pub fn of(st: &Stat) -> Self {
        Self {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: nanos(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: nanos(st.st_ctime, st.st_ctime_nsec as i64),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }

    /// Whether the content may differ (size, mtime, or a ctime change that
    /// no attribute explains).
    pub fn content_differs(&self, other: &Self) -> bool {
        self.ino != other.ino
            || self.size != other.size
            || self.mtime != other.mtime
            || (self.ctime != other.ctime
                && self.mode == other.mode
                && self.uid == other.uid
                && self.gid == other.gid)
    }
}

pub fn nanos(sec: i64, nsec: i64) -> Nanos {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// Attributes of an object from its `lstat`. `size` of a directory is its
/// entry count, which the caller knows.
pub fn attr_of(
    id: ObjectId,
    version: Version,
    st: &Stat,
    dir_entries: u64,
    target: Option<String>,
) -> Option<Attr> {
    let kind = kind_of(st)?;
    let size = match kind {
        Kind::Dir => dir_entries,
        _ => st.st_size as u64,
    };
    Some(Attr {
        id,
        kind,
        version,
        size,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        nlink: (st.st_nlink as u32).max(1),
        atime: nanos(st.st_atime, st.st_atime_nsec as i64),
        mtime: nanos(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: nanos(st.st_ctime, st.st_ctime_nsec as i64),
        target,
    })
}

/// Whether a symlink target, placed in a directory `depth` levels below the
/// root, resolves inside the root by its text alone (absolute targets and
/// `..` climbing above the root are refused).
pub fn target_stays_inside(depth: usize, target: &str) -> bool {
    let mut level = depth as i64;
    for comp in Path::new(target).components() {
        match comp {
            Component::Normal(_) => level += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                level -= 1;
                if level < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Checks a symlink target for storage: not empty, no NUL, not too long.
pub fn valid_target(target: &str) -> bool {
    !target.is_empty()
        && names::to_bytes(target).len() <= crate::wire::MAX_SYMLINK_LEN
        && !target.as_bytes().contains(&0)
}

/// Converts a relative path (from the watcher) to components as [`names`]
/// carries them; `None` for paths with non-normal components.
pub fn components(rel: &Path) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for comp in rel.components() {
        match comp {
            Component::Normal(n) => out.push(names::from_bytes(n.as_bytes()).into_owned()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

pub fn fsync_dir(fd: &OwnedFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(fd)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn symlinked_directory_is_an_escape() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("a")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", dir.path().join("a/etc")).expect("symlink");
        std::fs::write(dir.path().join("a/f"), b"x").expect("write");
        let tree = Tree::open(dir.path()).expect("open");
        assert!(matches!(tree.open_dir(&["a", "etc"]), Err(FsError::Escape)));
        let a = tree.open_dir(&["a"]).expect("a");
        assert!(matches!(open_file(&a, "etc", false), Err(FsError::Escape)));
        assert!(matches!(tree.open_dir(&["a", "f"]), Err(FsError::NotFound)));
        assert!(open_file(&a, "f", false).is_ok());
    }

    #[test]
    fn symlink_targets_that_climb_out_are_refused() {
        assert!(target_stays_inside(0, "a/b"));
        assert!(target_stays_inside(1, "../b"));
        assert!(!target_stays_inside(0, "../b"));
        assert!(!target_stays_inside(3, "/etc/passwd"));
        assert!(!target_stays_inside(1, "a/../../.."));
        assert!(target_stays_inside(1, "./x/../../y"));
    }

    fn real_path(fd: &impl AsFd) -> PathBuf {
        use std::os::fd::AsRawFd;
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())).expect("readlink")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever symlinks another program plants in the tree (to parents,
        /// to absolute paths, chains), and whatever names a request walks,
        /// every directory or file the resolver opens is inside the root.
        #[test]
        fn resolver_never_leaves_the_root(
            links in proptest::collection::vec((0usize..3, "[a-c]", prop_oneof![
                Just("..".to_owned()), Just("../..".to_owned()), Just("/".to_owned()),
                Just("/tmp".to_owned()), Just("a".to_owned()), Just("../../../etc".to_owned())]), 0..6),
            walk in proptest::collection::vec(prop_oneof![
                Just("a".to_owned()), Just("b".to_owned()), Just("c".to_owned()), Just("d".to_owned())], 0..5),
        ) {
            let outer = tempfile::tempdir().expect("tempdir");
            let root = outer.path().join("root");
            // A fixed directory skeleton: root/d/d/d, with files f.
            std::fs::create_dir_all(root.join("d/d/d")).expect("mkdir");
            std::fs::write(outer.path().join("secret"), b"s").expect("write");
            let dirs = [root.clone(), root.join("d"), root.join("d/d")];
            for (level, name, target) in &links {
                let _ = std::os::unix::fs::symlink(target, dirs[*level].join(name));
            }
            let tree = Tree::open(&root).expect("open");
            let root_real = std::fs::canonicalize(&root).expect("canon");
            for n in 0..=walk.len() {
                if let Ok(fd) = tree.open_dir(&walk[..n]) {
                    prop_assert!(real_path(&fd).starts_with(&root_real));
                    if let Some(last) = walk.get(n)
                        && let Ok(f) = open_file(&fd, last, false) {
                            prop_assert!(real_path(&f).starts_with(&root_real));
                        }
                }
            }
        }

        #[test]
        fn accepted_targets_resolve_inside(depth in 0usize..4, parts in proptest::collection::vec(prop_oneof![
            Just(".."), Just("."), Just("x"), Just("/"), Just("")], 0..8)) {
            let target = parts.join("/");
            if target_stays_inside(depth, &target) {
                // Resolve lexically from a directory `depth` deep.
                let mut stack: Vec<&str> = vec!["p"; depth];
                for comp in Path::new(&target).components() {
                    match comp {
                        Component::Normal(_) => stack.push("x"),
                        Component::ParentDir => { prop_assert!(stack.pop().is_some()); }
                        Component::CurDir => {}
                        _ => prop_assert!(false, "absolute target accepted"),
                    }
                }
            }
        }
    }
}
