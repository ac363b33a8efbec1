//! Preloading: reads the chunks a sequential reader will ask for next from
//! the cache's file into memory (the cache's chunk memo), on a thread of its
//! own, while the current READ's reply is on its way.
//!
//! A client reading a file sequentially sends one READ, waits for it, sends
//! the next. Reading a chunk out of redb (a fresh buffer, zeroed, then a
//! pread) is a good part of a warm READ's time; done here, ahead of the
//! client, it overlaps with the reply instead of delaying the next one.
//! Requests that find the thread busy are dropped: preloading is a hint,
//! and a READ that finds nothing preloaded reads the chunk itself.

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender, TrySendError};

use imz_cache::{Cache, FileId};

/// Requests waiting for the thread; more are dropped.
const QUEUE: usize = 4;
/// Chunks preloaded past the end of a sequential READ.
pub const AHEAD: u64 = 2;

/// Handle to the preloading thread; the thread ends when this is dropped.
#[derive(Debug)]
pub struct Preloader {
    requests: Option<SyncSender<(FileId, Range<u64>)>>,
}

impl Preloader {
    pub fn start(cache: Arc<Cache>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<(FileId, Range<u64>)>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("imz-preload".into())
            .spawn(move || {
                for (fid, chunks) in rx {
                    let loaded = cache.read().and_then(|rx| rx.read_ahead(fid, chunks));
                    if let Err(e) = loaded {
                        tracing::debug!(fid, error = %e, "preloading failed");
                    }
                }
            });
        match spawned {
            Ok(_) => Self { requests: Some(tx) },
            Err(e) => {
                // Reads work without it, only slower.
                tracing::warn!(error = %e, "cannot start the preloading thread");
                Self { requests: None }
            }
        }
    }

    /// Asks for chunks `chunks` of `fid` to be preloaded, unless the thread
    /// is busy.
    pub fn ask(&self, fid: FileId, chunks: Range<u64>) {
        if let Some(tx) = &self.requests {
            match tx.try_send((fid, chunks)) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => {
                    tracing::debug!("preloading thread gone");
                }
            }
        }
    }
}
