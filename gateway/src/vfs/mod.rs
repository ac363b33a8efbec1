//! The protocol-neutral filesystem the NFS adapter serves: cached objects,
//! filled from the origin on demand.
//!
//! Split by concern: [`meta`] (lookup, attributes, directory listings),
//! [`read`] (file data and symlinks). Everything here speaks in fileids and
//! [`VfsError`]s; nothing knows NFS wire types.

pub mod meta;
pub mod read;
pub mod write;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use imz_cache::{Cache, CacheError, FileId};

use crate::fetch::Fetcher;
use crate::link::Link;
use crate::metrics::Metrics;
use crate::origin_client::{OriginClient, OriginError};
use crate::preload::Preloader;
use crate::writer::Writer;

/// Why a filesystem operation failed; each maps to one NFS status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VfsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("stale file handle")]
    Stale,
    #[error("the origin is unreachable and this is not cached")]
    Offline,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("name too long")]
    NameTooLong,
    #[error("the cache is full of changes not yet reintegrated")]
    NoSpace,
    #[error("file too large")]
    TooLarge,
    #[error("operation not supported")]
    NotSupported,
    #[error("permission denied")]
    Access,
    #[error("the origin serves its tree read-only")]
    ReadOnly,
    #[error("I/O error: {0}")]
    Io(String),
}

impl From<CacheError> for VfsError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::NoObject(_) => Self::Stale,
            CacheError::NoSpace { .. } => Self::NoSpace,
            CacheError::TooLarge { .. } => Self::TooLarge,
            other => {
                tracing::error!(error = %other, "cache failure");
                Self::Io(other.to_string())
            }
        }
    }
}

/// The gateway's filesystem state, shared by every NFS connection.
pub struct Vfs {
    pub cache: Arc<Cache>,
    pub origin: OriginClient,
    pub link: Arc<Link>,
    pub fetcher: Fetcher,
    pub writer: Writer,
    pub metrics: Arc<Metrics>,
    /// When each file's content last changed here (the reintegrator lets
    /// content age a moment before shipping it, so bursts travel once).
    pub touched: Mutex<HashMap<FileId, std::time::Instant>>,
    /// Woken when the client modification log grows.
    pub log_changed: tokio::sync::Notify,
    /// One listing of a directory at a time (single flight).
    listing: Mutex<HashMap<FileId, Arc<tokio::sync::Mutex<()>>>>,
    /// What the journal said of objects not cached when it said it.
    pub passed: Arc<crate::coherence::Passed>,
    /// Reads cached chunks ahead of sequential readers.
    preloader: Preloader,
}

impl Vfs {
    pub fn new(
        cache: Arc<Cache>,
        origin: OriginClient,
        link: Arc<Link>,
        fetcher: Fetcher,
        writer: Writer,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            preloader: Preloader::start(Arc::clone(&cache)),
            cache,
            origin,
            link,
            fetcher,
            writer,
            metrics,
            touched: Mutex::new(HashMap::new()),
            log_changed: tokio::sync::Notify::new(),
            listing: Mutex::new(HashMap::new()),
            passed: Arc::default(),
        }
    }

    /// Classifies an origin failure, marking the link down when the origin
    /// could not be reached.
    pub fn origin_failed(&self, err: OriginError) -> VfsError {
        if self.link.down_if_unreachable(&err) {
            return VfsError::Offline;
        }
        match err {
            OriginError::Api(api) if api.code == imz_origin::wire::ErrorCode::NotFound => {
                VfsError::NotFound
            }
            OriginError::Api(api) if api.code == imz_origin::wire::ErrorCode::PermissionDenied => {
                VfsError::Access
            }
            other => {
                tracing::warn!(error = %other, "origin request failed");
                VfsError::Io(other.to_string())
            }
        }
    }

    /// Runs a cache write on the blocking pool (redb commits fsync).
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Cache) -> Result<T, VfsError> + Send + 'static,
    ) -> Result<T, VfsError> {
        let cache = Arc::clone(&self.cache);
        tokio::task::spawn_blocking(move || f(&cache))
            .await
            .map_err(|e| VfsError::Io(format!("cache task failed: {e}")))?
    }

    fn listing_lock(&self, dir: FileId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 4096 {
            map.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        Arc::clone(map.entry(dir).or_default())
    }
}
