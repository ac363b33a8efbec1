//! Errors of the cache.

/// Everything that can go wrong in the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    // The causes below are in the messages and not also `source`s, which
    // `anyhow`'s chain would print a second time.
    #[error("cache database: {0}")]
    Db(redb::Error),
    #[error("cache I/O: {0}")]
    Io(std::io::Error),
    #[error("cache record is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "the cache at {path} was written by an incompatible imz (format {found}, expected {expected}); move it away or delete it"
    )]
    Format {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("another imz gateway is using this cache ({path} is in use)")]
    InUse { path: String },
    #[error("the cache is full of data not yet reintegrated ({needed} more bytes needed)")]
    NoSpace { needed: u64 },
    #[error("a file cannot grow past {max} bytes")]
    TooLarge { max: u64 },
    #[error("no such object {0}")]
    NoObject(u64),
    #[error("chunks {indexes:?} of object {fileid} must be fetched from the origin first")]
    NeedFetch { fileid: u64, indexes: Vec<u64> },
}

impl CacheError {
    pub fn corrupt(what: impl std::fmt::Display) -> Self {
        Self::Corrupt(what.to_string())
    }
}

impl From<redb::Error> for CacheError {
    fn from(e: redb::Error) -> Self {
        Self::Db(e)
    }
}

impl From<std::io::Error> for CacheError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for CacheError {
            fn from(e: $t) -> Self {
                Self::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

pub type Result<T, E = CacheError> = std::result::Result<T, E>;
