//! Error types of the origin library and their mapping to wire errors.

use crate::wire::{ApiError, Attr, ErrorCode};

/// Failure of the origin itself (store, disk, start-up), as opposed to a
/// client's mistake. Client-facing answers are [`ApiError`]s.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    // Not a `source` too: `anyhow`'s chain would print the cause twice.
    #[error("metadata store: {0}")]
    Store(redb::Error),
    // The cause is in the message, and not also a `source`: `anyhow`'s
    // chain would print it twice ("...: Permission denied: Permission denied").
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    #[error("corrupt metadata store record: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Config(String),
    #[error("the origin is shutting down")]
    ShuttingDown,
}

impl OriginError {
    pub fn io(context: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Self::Io {
            context: context.into(),
            cause: source.into(),
        }
    }
}

impl From<redb::Error> for OriginError {
    fn from(e: redb::Error) -> Self {
        Self::Store(e)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for OriginError {
            fn from(e: $t) -> Self {
                Self::Store(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<serde_json::Error> for OriginError {
    fn from(e: serde_json::Error) -> Self {
        Self::Corrupt(e.to_string())
    }
}

/// Builds an [`ApiError`] with a message.
pub fn api(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
        current: None,
    }
}

/// `VersionGone` with the object's current attributes.
pub fn version_gone(current: Attr) -> ApiError {
    ApiError {
        code: ErrorCode::VersionGone,
        message: format!(
            "object {} is now at version {}",
            current.id, current.version
        ),
        current: Some(current),
    }
}

impl From<OriginError> for ApiError {
    fn from(e: OriginError) -> Self {
        match e {
            OriginError::ShuttingDown => api(ErrorCode::Unavailable, "the origin is shutting down"),
            other => {
                tracing::error!(error = %other, "internal error");
                api(ErrorCode::Internal, other.to_string())
            }
        }
    }
}
