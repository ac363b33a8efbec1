//! What the cache knows about one filesystem object.

use serde::{Deserialize, Serialize};

/// Object id as NFS sees it (the fileid inside file handles).
///
/// An object first seen at the origin takes the origin's id as its fileid:
/// origin ids are never reused, so a fileid can never come to mean another
/// object, even if the cache lost track of it. (One exception: the cached
/// object that was origin object N may come to stand for another, created
/// again there after a conflict while N lived on; N, seen again, then gets
/// a fresh fileid.) An object created at the
/// gateway gets a fresh id from [`LOCAL_ID_BASE`] up, persisted and never
/// reused, and keeps it after the origin gives it an id of its own.
pub type FileId = u64;

/// Fileid of the exported root directory (also the origin's root id).
pub const ROOT_FILEID: FileId = 1;

/// First fileid (and directory cookie) the cache hands out itself; origin
/// ids stay below it.
pub const LOCAL_ID_BASE: u64 = 1 << 48;

/// Kind of a filesystem object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// The origin object a cached object mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRef {
    /// The origin's object id.
    pub id: u64,
    /// The origin version the cached clean state matches. For an object with
    /// local changes, the version those changes were based on.
    pub version: u64,
}

/// Attributes as NFS presents them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attrs {
    pub size: u64,
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Nanoseconds since the Unix epoch.
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
}

/// One cached object.
///
/// Invariants (kept by [`crate::WriteTxn`]):
/// - every object but the root is reachable: `parent` is a cached
///   directory holding an entry `name` that names this object;
/// - `origin.id` is unique among objects (the origin index maps it back);
/// - for a file, bytes at offsets below `origin_extent` that are not in a
///   cached chunk are the origin's bytes at `origin.version` (fetch them);
///   bytes at or above it that are not in a chunk are zeros (a hole);
/// - chunks never extend past `attrs.size`;
/// - an object is deleted only when no log record refers to it; one removed
///   locally before that stays, `removed` and unlinked, until then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub kind: Kind,
    pub attrs: Attrs,
    pub origin: Option<OriginRef>,
    pub parent: FileId,
    pub name: String,
    /// Symlink target.
    pub target: Option<String>,
    /// Directory: every origin entry is cached (as of `origin.version`), so
    /// a missing name is known not to exist.
    pub listed: bool,
    /// File: see the type's invariants.
    pub origin_extent: u64,
    /// Pinned by a user (`imz pin`): never evicted, kept fetched. On a
    /// directory it is a recursive pin: objects that enter it (created or
    /// moved in, here or at the origin) are pinned too.
    pub pinned: bool,
    /// Removed locally; kept only while log records still need it.
    pub removed: bool,
    /// Client modification log records about this object.
    pub log: LogRefs,
    /// Bumped by every local change to a file's content, so that the
    /// reintegrator can tell whether what it uploaded is still current.
    pub data_gen: u64,
    /// Verifier of an NFS EXCLUSIVE create, to answer its retransmission.
    pub verifier: Option<[u8; 8]>,
}

/// How the client modification log refers to an object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRefs {
    /// Pending records about this object itself, oldest first.
    pub ops: Vec<u64>,
    /// Pending records naming it in another role (a parent directory, a
    /// rename's replaced target).
    pub other: u32,
    /// The pending record that creates it at the origin.
    pub create: Option<u64>,
    /// The pending record that uploads its content.
    pub store: Option<u64>,
    /// The pending record that sets its attributes.
    pub setattr: Option<u64>,
}

impl Object {
    /// An object of `kind` named `name` in `parent`, with nothing else to
    /// it yet: not at the origin, no content, no log records, not pinned.
    pub fn new(kind: Kind, parent: FileId, name: String, attrs: Attrs) -> Self {
        Self {
            kind,
            attrs,
            origin: None,
            parent,
            name,
            target: None,
            listed: false,
            origin_extent: 0,
            pinned: false,
            removed: false,
            log: LogRefs::default(),
            data_gen: 0,
            verifier: None,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }

    /// Has local changes the origin does not have yet: the cache keeps its
    /// data and does not take the origin's version over it.
    pub fn is_dirty(&self) -> bool {
        !self.log.ops.is_empty()
    }

    /// Exists only at the gateway so far.
    pub fn is_local(&self) -> bool {
        self.origin.is_none()
    }
}

#[cfg(test)]
impl Object {
    /// An unnamed object of `kind` under the root, mode 0644, for tests.
    pub(crate) fn sample(kind: Kind) -> Self {
        let attrs = Attrs {
            mode: 0o644,
            nlink: 1,
            ..Attrs::default()
        };
        Self::new(kind, ROOT_FILEID, String::new(), attrs)
    }
}
