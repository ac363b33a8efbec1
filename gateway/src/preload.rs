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
//!
//! Preloading stops while more files are read sequentially at once than
//! the chunk memo has room for: their preloaded chunks would push out each
//! other's, and every chunk would be read twice (measured with 8 readers:
//! a third more CPU and 20% slower than no preloading at all).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imz_cache::{CHUNK_MEMO_CAPACITY, Cache, FileId};

/// Requests waiting for the thread; more are dropped.
const QUEUE: usize = 4;
/// Chunks preloaded past the end of a sequential READ.
pub const AHEAD: u64 = 2;
/// Most files read sequentially at once for which chunks are preloaded:
/// each needs room in the memo for the chunk its last READ ended in and
/// those preloaded after it.
const MAX_READERS: usize = CHUNK_MEMO_CAPACITY / (AHEAD as usize + 1);
/// A reader that asked within this long is still reading.
const ACTIVE: Duration = Duration::from_millis(100);

/// Handle to the preloading thread; the thread ends when this is dropped.
#[derive(Debug)]
pub struct Preloader {
    requests: Option<SyncSender<(FileId, Range<u64>)>>,
    /// When each file being read sequentially last asked.
    readers: Mutex<HashMap<FileId, Instant>>,
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
        let requests = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                // Reads work without it, only slower.
                tracing::warn!(error = %e, "cannot start the preloading thread");
                None
            }
        };
        Self {
            requests,
            readers: Mutex::new(HashMap::new()),
        }
    }

    /// Asks for chunks `chunks` of `fid` to be preloaded, unless the thread
    /// is busy or too many files are being read at once.
    pub fn ask(&self, fid: FileId, chunks: Range<u64>) {
        if !self.few_readers(fid) {
            return;
        }
        if let Some(tx) = &self.requests {
            match tx.try_send((fid, chunks)) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => {
                    tracing::debug!("preloading thread gone");
                }
            }
        }
    }

    /// Notes that `fid` is being read; whether few enough files are.
    fn few_readers(&self, fid: FileId) -> bool {
        let now = Instant::now();
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        readers.insert(fid, now);
        if readers.len() <= MAX_READERS {
            return true;
        }
        readers.retain(|_, at| now.duration_since(*at) < ACTIVE);
        readers.len() <= MAX_READERS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preloader() -> Preloader {
        Preloader {
            requests: None,
            readers: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn preloads_for_as_many_readers_as_the_memo_holds() {
        let p = preloader();
        for fid in 0..MAX_READERS as u64 {
            assert!(p.few_readers(fid));
        }
        assert!(!p.few_readers(99), "one reader too many");
        assert!(!p.few_readers(0), "and no reader preloads meanwhile");
    }

    #[test]
    fn readers_that_stopped_make_room() {
        let p = preloader();
        let long_ago = Instant::now()
            .checked_sub(2 * ACTIVE)
            .expect("up longer than that");
        for fid in 0..MAX_READERS as u64 {
            p.readers.lock().expect("lock").insert(fid, long_ago);
        }
        assert!(p.few_readers(99), "idle readers are forgotten");
        assert_eq!(p.readers.lock().expect("lock").len(), 1);
    }
}
