//! The origin's HTTP wire format, shared by the origin server and the
//! gateway's client so that the two cannot drift.
//!
//! Everything here is plain data with `serde` derives; the meaning of each
//! endpoint is documented once, in [`paths`], and each type says which
//! endpoint carries it. JSON is used for metadata, raw bytes for file data.
//!
//! Vocabulary:
//! - an **object** is a file, directory or symlink; its [`ObjectId`] is
//!   assigned by the origin, survives renames and restarts and is never reused;
//! - a **version** ([`Version`]) is the journal sequence number of the last
//!   change to the object (for a directory: to its attributes or entries), so
//!   versions only grow and `(id, version)` names one content forever;
//! - the **journal** is the origin's append-only list of [`Record`]s, each
//!   with the next sequence number, durable before it is acknowledged.

use serde::{Deserialize, Serialize};

/// Origin object id. The root directory is [`ROOT_ID`]; 0 is never used.
pub type ObjectId = u64;
/// Journal sequence number of an object's last change.
pub type Version = u64;
/// Journal sequence number.
pub type Seq = u64;

/// Id of the exported root directory.
pub const ROOT_ID: ObjectId = 1;

/// Longest name accepted in one path component, in bytes (as Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target accepted, in bytes (as Linux PATH_MAX).
pub const MAX_SYMLINK_LEN: usize = 4095;
/// Largest JSON request body the origin accepts (a reintegration batch).
pub const MAX_JSON_BODY: usize = 8 << 20;
/// Most operations in one reintegration batch.
pub const MAX_BATCH_OPS: usize = 4096;
/// Most entries returned by one directory page.
pub const MAX_PAGE_ENTRIES: usize = 10_000;
/// Most records returned by one journal read.
pub const MAX_JOURNAL_RECORDS: usize = 10_000;
/// Longest long-poll wait the origin honours.
pub const MAX_WAIT_MS: u64 = 60_000;
/// Longest upload id accepted.
pub const MAX_UPLOAD_ID_LEN: usize = 128;
/// Longest idempotency key (gateways send `GATEWAY-SEQ`, well under this).
pub const MAX_KEY_LEN: usize = 128;

/// URL paths of the API, relative to the origin's base URL.
///
/// | method | path | body | answer |
/// |---|---|---|---|
/// | GET | `/v1/health` (no token) | | [`Health`] |
/// | GET | `/v1/info` | | [`Info`] |
/// | GET | `/v1/objects/{id}` | | [`Attr`] |
/// | GET | `/v1/objects/{id}/lookup?name=N` | | [`Entry`] |
/// | GET | `/v1/objects/{id}/entries?after=N&limit=L` | | [`DirPage`] |
/// | GET | `/v1/data/{id}/{version}` (`Range` honoured) | | raw bytes (or 204 for a hole, see [`paths::ACCEPT_HOLES`]) |
/// | GET | `/v1/journal?after=S&wait_ms=W&limit=L` | | [`JournalPage`] |
/// | GET | `/v1/manifest` | | NDJSON: one [`ManifestHeader`], then [`ManifestEntry`]s |
/// | PUT | `/v1/uploads/{upload_id}` | raw bytes, or extents ([`paths::UPLOAD_SIZE`]) | [`Uploaded`] |
/// | POST | `/v1/reintegrate` | [`Batch`] | [`BatchResult`] |
///
/// Every path but `/v1/health` needs `Authorization: Bearer TOKEN`.
/// Errors are JSON [`ApiError`] with a matching HTTP status.
pub mod paths {
    use super::{ObjectId, Version};

    /// Request header of a data GET: the client takes a hole for an answer
    /// (value `1`). A range that is wholly a hole in the file (a sparse
    /// file) is then answered `204 No Content` with [`HOLE`] instead of
    /// its zeros.
    pub const ACCEPT_HOLES: &str = "imz-accept-holes";
    /// Response header of such an answer: the length of the range, all
    /// zeros.
    pub const HOLE: &str = "imz-hole";
    /// Request header of an upload whose body is *extents* (only to an
    /// origin whose [`super::Info::upload_extents`] is set): the value is
    /// the file's size, and the body is records of `offset` (u64, big
    /// endian), `len` (u32, big endian, not 0) and `len` bytes, in
    /// increasing offsets within the size. What no record covers is a hole
    /// (zeros), so a sparse file's holes do not cross the network.
    pub const UPLOAD_SIZE: &str = "imz-upload-size";

    /// Bytes of an extent record's head: `offset` then `len`.
    pub const EXTENT_HEAD: usize = 12;

    /// The head of an extent record of `len` bytes at `offset`.
    pub fn extent_head(offset: u64, len: u32) -> [u8; EXTENT_HEAD] {
        let mut head = [0u8; EXTENT_HEAD];
        head[..8].copy_from_slice(&offset.to_be_bytes());
        head[8..].copy_from_slice(&len.to_be_bytes());
        head
    }

    /// `(offset, len)` from an extent record's head.
    pub fn parse_extent_head(head: &[u8; EXTENT_HEAD]) -> (u64, u32) {
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&head[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[8..]);
        (u64::from_be_bytes(offset), u32::from_be_bytes(len))
    }

    pub const HEALTH: &str = "/v1/health";
    pub const INFO: &str = "/v1/info";
    pub const JOURNAL: &str = "/v1/journal";
    pub const MANIFEST: &str = "/v1/manifest";
    pub const REINTEGRATE: &str = "/v1/reintegrate";

    pub fn object(id: ObjectId) -> String {
        format!("/v1/objects/{id}")
    }
    pub fn lookup(dir: ObjectId) -> String {
        format!("/v1/objects/{dir}/lookup")
    }
    pub fn entries(dir: ObjectId) -> String {
        format!("/v1/objects/{dir}/entries")
    }
    pub fn place(id: ObjectId) -> String {
        format!("/v1/objects/{id}/place")
    }
    /// The content of `id` at `version`: this URL never changes meaning.
    pub fn data(id: ObjectId, version: Version) -> String {
        format!("/v1/data/{id}/{version}")
    }
    /// The hash of a prefix of that content ([`super::Digest`]; only where
    /// [`super::Info::prefix_digest`] is set), with `?len=N`; and of each
    /// of its pieces with `&piece=BYTES` (where
    /// [`super::Info::piece_digests`] is set).
    pub fn digest(id: ObjectId, version: Version) -> String {
        format!("/v1/data/{id}/{version}/digest")
    }
    pub fn upload(upload_id: &str) -> String {
        format!("/v1/uploads/{upload_id}")
    }
}

/// Time as nanoseconds since the Unix epoch.
pub type Nanos = i64;

/// Kind of a filesystem object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// Attributes of one object, as the origin's metadata store holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub id: ObjectId,
    pub kind: Kind,
    pub version: Version,
    /// Bytes for a file, target length for a symlink, entry count for a dir.
    pub size: u64,
    /// Permission bits (`0o7777`), without the file-type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub atime: Nanos,
    pub mtime: Nanos,
    pub ctime: Nanos,
    /// Target of a symlink, `None` for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A named entry of a directory with the attributes of what it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub attr: Attr,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub last_seq: Seq,
}

/// `GET /v1/info`: what a gateway needs before it starts following.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    /// Random id of this origin's store, fixed at creation. A gateway whose
    /// cache was filled from a different store id must start over.
    pub store_id: String,
    pub root: Attr,
    /// Oldest journal record still held (records after `first_seq - 1` can be read).
    pub first_seq: Seq,
    /// Newest journal record.
    pub last_seq: Seq,
    /// Uploads may be sent as extents ([`paths::UPLOAD_SIZE`]). Origins
    /// from before it omit the field.
    #[serde(default)]
    pub upload_extents: bool,
    /// Prefixes of a file's content can be hashed ([`paths::digest`]).
    /// Origins from before it omit the field.
    #[serde(default)]
    pub prefix_digest: bool,
    /// A digest also hashes each piece of the prefix (`piece=BYTES`), so a
    /// gateway can keep what it caches of a file changed in place. Origins
    /// from before it omit the field.
    #[serde(default)]
    pub piece_digests: bool,
    /// The origin never changes its tree (`--read-only`): gateways serve
    /// it read-only. Origins from before it omit the field.
    #[serde(default)]
    pub read_only: bool,
    /// An object's place can be asked for ([`paths::place`]). Origins from
    /// before it omit the field.
    #[serde(default)]
    pub places: bool,
}

/// `GET /v1/objects/{id}/place`: where an object is in the tree now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// Its directory (0 for the root, which has none).
    pub parent: ObjectId,
    /// Its name there (empty for the root).
    pub name: String,
    pub attr: Attr,
}

/// `GET /v1/data/{id}/{version}/digest?len=N[&piece=P]`: the BLAKE3 hash
/// of the first `len` bytes of that version of a file, in hex; with
/// `piece`, instead, the hash of each `P`-byte piece of them, in order (the
/// last one shorter if `len` is not a multiple of `P`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub len: u64,
    /// Empty when pieces were asked for: hashing the whole too would
    /// double the work.
    #[serde(default)]
    pub blake3: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pieces: Vec<String>,
}

/// Smallest and largest piece a digest hashes on its own.
pub const DIGEST_PIECE: std::ops::RangeInclusive<u64> = 4096..=(64 << 20);

/// `GET /v1/objects/{id}/entries`: one page of a directory, in name order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirPage {
    pub dir: Attr,
    pub entries: Vec<Entry>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<String>,
}

/// `GET /v1/journal`: records with `seq > after`, oldest first.
///
/// Answers at once when such records exist, else waits up to `wait_ms` for
/// one. A reader whose `after` is older than what the origin still holds
/// gets HTTP 410 with [`ErrorCode::JournalCompacted`]: it must resynchronise
/// (revalidate everything it caches) and continue from `Info::last_seq`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalPage {
    pub records: Vec<Record>,
    /// Newest sequence number at the time of the answer; continue from the
    /// last record's `seq`, or from here when `records` is empty.
    pub last_seq: Seq,
}

/// One journal record: a change to the master copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: Seq,
    /// Wall-clock time the origin recorded the change.
    pub time: Nanos,
    /// Idempotency key of the reintegration operation that made this change,
    /// `None` for changes made directly in the origin's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub change: Change,
}

/// What one journal record changed. Every variant carries the attributes the
/// touched objects have after the change (their `version` is the record's
/// `seq`), so a follower can update metadata without another request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// A file, directory or symlink appeared under `parent`.
    Create {
        parent: Attr,
        name: String,
        attr: Attr,
    },
    /// A file's content was written or replaced (its old content is gone).
    Write { attr: Attr },
    /// A file's size was changed without other content changes.
    Truncate { attr: Attr },
    /// Mode, owner or times changed.
    SetAttr { attr: Attr },
    /// `name` (object `id`) was removed from `parent`.
    Remove {
        parent: Attr,
        name: String,
        id: ObjectId,
    },
    /// Object `attr.id` moved; `replaced` is the id of an object that the
    /// rename overwrote at the destination, now gone.
    Rename {
        from_parent: Attr,
        from_name: String,
        to_parent: Attr,
        to_name: String,
        attr: Attr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replaced: Option<ObjectId>,
    },
}

/// First line of `GET /v1/manifest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestHeader {
    /// The manifest is the tree as of this journal sequence number; a
    /// replica built from it follows the journal from here.
    pub seq: Seq,
    pub root: Attr,
}

/// Each following line of `GET /v1/manifest`: one object, parents always
/// before their children.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub parent: ObjectId,
    pub name: String,
    pub attr: Attr,
}

/// `PUT /v1/uploads/{upload_id}`: the upload is staged on the origin's disk
/// (fsynced) until an operation installs it or it expires.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Uploaded {
    pub upload_id: String,
    pub size: u64,
}

/// A reference to an object in a reintegration operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjRef {
    /// An object the origin already knows.
    Id(ObjectId),
    /// The object created by the operation with this idempotency key (in
    /// this batch or an earlier one).
    Created(String),
}

/// The version a change was based on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Base {
    /// The change was made to this origin version.
    Version(Version),
    /// The change was made on top of the result of the operation with this
    /// idempotency key (which must have been applied).
    After(String),
}

/// What a created object is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NewObject {
    /// A regular file, with the content of a finished upload or empty.
    File {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload: Option<String>,
    },
    Dir,
    Symlink {
        target: String,
    },
}

/// Attribute changes; `None` fields are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttrs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atime: Option<Nanos>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<Nanos>,
}

impl SetAttrs {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One reintegration operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Create `name` in `parent`. Conflicts if the name exists or the
    /// parent is gone. `attrs` (mode, times, owner) apply to the new object.
    Create {
        parent: ObjRef,
        name: String,
        object: NewObject,
        #[serde(default)]
        attrs: SetAttrs,
    },
    /// Replace a file's whole content with a finished upload.
    Write {
        id: ObjRef,
        base: Base,
        upload: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime: Option<Nanos>,
    },
    /// Change attributes (including `size`, which truncates or extends).
    SetAttr {
        id: ObjRef,
        base: Base,
        attrs: SetAttrs,
    },
    /// Remove `name` from `parent`, which must still be object `id` at
    /// `base`. A directory must be empty at the origin.
    Remove {
        parent: ObjRef,
        name: String,
        id: ObjRef,
        base: Base,
    },
    /// Move `from_parent/from_name` (object `id` at `base`) to
    /// `to_parent/to_name`. When `replace` is given, the destination must be
    /// that object at that base and is overwritten; when it is `None`, the
    /// destination must not exist.
    Rename {
        from_parent: ObjRef,
        from_name: String,
        id: ObjRef,
        base: Base,
        to_parent: ObjRef,
        to_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replace: Option<(ObjRef, Base)>,
    },
}

/// An operation with its idempotency key. Keys are unique per gateway (the
/// gateway's id plus its log sequence number); a key seen before is never
/// applied twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedOp {
    pub key: String,
    #[serde(flatten)]
    pub op: Op,
}

/// `POST /v1/reintegrate`: operations applied in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub ops: Vec<KeyedOp>,
}

/// `POST /v1/reintegrate` answer: one result per operation tried, in order.
/// Processing stops after the first result that is not `Applied` or
/// `Replayed`, so `results` may be shorter than the batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResult {
    pub results: Vec<OpResult>,
}

/// Outcome of one reintegration operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OpResult {
    /// Applied now; `attr` is the touched object after the change (the new
    /// object for a create), `seq` the journal record it produced.
    Applied { attr: Attr, seq: Seq },
    /// This key was applied before; the answer it got then.
    Replayed { attr: Attr, seq: Seq },
    /// The origin's state does not match what the operation assumed.
    Conflict(Conflict),
    /// The operation can never apply (bad name, unknown upload, ...).
    Rejected { error: ApiError },
}

/// Why an operation conflicts, with the origin's current state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub reason: ConflictReason,
    /// The origin's current attributes of the object in question (the
    /// object at the name for `NameExists`), if it exists.
    pub current: Option<Attr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictReason {
    /// The object changed at the origin since `base` (update/update).
    VersionMismatch,
    /// The object is gone at the origin (update/remove).
    Removed,
    /// The name is taken at the origin (create/create, rename onto a name).
    NameExists,
    /// The parent directory is gone at the origin.
    ParentMissing,
    /// The name no longer refers to the object the operation expected.
    NameMismatch,
    /// A directory to remove has entries at the origin.
    NotEmpty,
}

/// Machine-readable error codes, each with one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401: missing or wrong bearer token.
    Unauthorized,
    /// 400: malformed request.
    BadRequest,
    /// 400: a name with `/` or NUL, `.`/`..`, empty or too long.
    InvalidName,
    /// 403: the request would reach outside the exported directory.
    Escape,
    /// 403: the origin's own permissions on its disk do not let it read the
    /// object (an unreadable file in the tree).
    PermissionDenied,
    /// 404: no such object, name or upload.
    NotFound,
    /// 409: the object is not of the kind the request needs.
    WrongKind,
    /// 410: `/v1/data/{id}/{version}` of a version that is no longer current.
    VersionGone,
    /// 410: the journal no longer holds records after the given sequence,
    /// or never reached it (the origin went back, restored from a backup):
    /// resynchronise.
    JournalCompacted,
    /// 413: the request body is too large.
    TooLarge,
    /// 416: the range is outside the content.
    RangeNotSatisfiable,
    /// 500: the origin failed; the request may be retried.
    Internal,
    /// 503: the origin is shutting down or overloaded; retry later.
    Unavailable,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::BadRequest | Self::InvalidName => 400,
            Self::Escape | Self::PermissionDenied => 403,
            Self::NotFound => 404,
            Self::WrongKind => 409,
            Self::VersionGone | Self::JournalCompacted => 410,
            Self::TooLarge => 413,
            Self::RangeNotSatisfiable => 416,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }
}

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// For `VersionGone`: the object's current attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Attr>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// Why a name is not acceptable as one path component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is `.` or `..`")]
    Dots,
    #[error("name contains `/` or NUL")]
    BadChar,
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("name is reserved by imz")]
    Reserved,
}

/// Name of the origin's private state directory inside its root; it is
/// invisible through the API and can never be created, renamed or removed.
pub const STATE_DIR_NAME: &str = ".imz";

/// Prefix of the name a file copied across filesystems has for a moment in
/// its directory, before it replaces the file there. Reserved in every
/// directory: a crash can leave such a name behind, which is never served
/// and which recovery at start-up removes.
pub const INSTALLING_PREFIX: &str = ".imz-installing-";

/// Whether `name` is imz's own in its directory (`in_root`: the export's
/// root): never served, created, renamed or removed through the API.
pub fn is_reserved(name: &str, in_root: bool) -> bool {
    (in_root && name == STATE_DIR_NAME) || name.starts_with(INSTALLING_PREFIX)
}

/// Checks that `name` is one safe path component. `in_root` says whether
/// the directory is the export's root, where [`STATE_DIR_NAME`] is reserved.
pub fn validate_name(name: &str, in_root: bool) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == "." || name == ".." {
        return Err(NameError::Dots);
    }
    if name.bytes().any(|b| b == b'/' || b == 0) {
        return Err(NameError::BadChar);
    }
    if crate::names::to_bytes(name).len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if is_reserved(name, in_root) {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// Checks an upload id: 1 to [`MAX_UPLOAD_ID_LEN`] of `[A-Za-z0-9_.-]`,
/// not starting with a dot.
pub fn validate_upload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_UPLOAD_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Strong ETag of the content `(id, version)`.
pub fn etag(id: ObjectId, version: Version) -> String {
    format!("\"{id}-{version}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_unsafe_names() {
        assert_eq!(validate_name("", false), Err(NameError::Empty));
        assert_eq!(validate_name(".", false), Err(NameError::Dots));
        assert_eq!(validate_name("..", false), Err(NameError::Dots));
        assert_eq!(validate_name("a/b", false), Err(NameError::BadChar));
        assert_eq!(validate_name("a\0b", false), Err(NameError::BadChar));
        assert_eq!(
            validate_name(&"x".repeat(256), false),
            Err(NameError::TooLong)
        );
        assert_eq!(validate_name(".imz", true), Err(NameError::Reserved));
        assert_eq!(
            validate_name(".imz-installing-u1", false),
            Err(NameError::Reserved)
        );
        assert_eq!(validate_name(".imz", false), Ok(()));
        assert_eq!(validate_name("...", false), Ok(()));
        assert_eq!(validate_name(&"x".repeat(255), false), Ok(()));
    }

    proptest! {
        /// Whatever a client sends, an accepted name is exactly one component
        /// that cannot walk up or sideways.
        #[test]
        fn accepted_names_are_single_components(name in any::<String>(), in_root in any::<bool>()) {
            if validate_name(&name, in_root).is_ok() {
                let path = std::path::Path::new(&name);
                let comps: Vec<_> = path.components().collect();
                prop_assert_eq!(comps.len(), 1);
                prop_assert!(matches!(comps[0], std::path::Component::Normal(_)));
                prop_assert!(!name.contains('\0'));
            }
        }

        #[test]
        fn upload_ids_never_leave_their_directory(id in any::<String>()) {
            if validate_upload_id(&id) {
                let comps: Vec<_> = std::path::Path::new(&id).components().collect();
                prop_assert_eq!(comps.len(), 1);
                prop_assert!(matches!(comps[0], std::path::Component::Normal(_)));
            }
        }
    }

    #[test]
    fn ops_round_trip_through_json() {
        let op = KeyedOp {
            key: "gw-1:7".into(),
            op: Op::Rename {
                from_parent: ObjRef::Id(1),
                from_name: "a".into(),
                id: ObjRef::Created("gw-1:3".into()),
                base: Base::After("gw-1:3".into()),
                to_parent: ObjRef::Id(9),
                to_name: "b".into(),
                replace: Some((ObjRef::Id(12), Base::Version(40))),
            },
        };
        let json = serde_json::to_string(&op).expect("serialize");
        let back: KeyedOp = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, op);
    }
}
