//! The gateway's persistent cache, in one redb database.
//!
//! It holds what the gateway knows of the origin's tree (objects, their
//! attributes, directory entries), file data in chunks, and the client
//! modification log of changes not yet on the origin. It knows nothing of
//! NFS or HTTP: the gateway decides what to store; this crate keeps the
//! invariants of what is stored (see [`Object`] and [`store`]) and keeps file
//! data within the configured capacity by evicting least recently used clean
//! chunks (never dirty or pinned ones). Objects recently read are also kept
//! decoded in memory (`objcache`), so that attribute lookups skip redb, and
//! the last chunks read are kept (`chunkmemo`), so that consecutive READs
//! sharing a chunk read it from the file once.

pub mod chunk;
mod chunkmemo;
pub mod disk;
mod error;
mod evict;
pub mod log;
mod objcache;
mod object;
pub mod store;

/// Chunks the chunk memo keeps (about 1 MiB each).
pub use chunkmemo::CAPACITY as CHUNK_MEMO_CAPACITY;
pub use error::{CacheError, Result};
pub use log::{LogOp, LogRecord, SetAttrs};
pub use object::{Attrs, FileId, Kind, LOCAL_ID_BASE, LogRefs, Object, OriginRef, ROOT_FILEID};
pub use store::{Cache, DirEntry, RangeRead, ReadTxn, Usage, WriteTxn, meta};
