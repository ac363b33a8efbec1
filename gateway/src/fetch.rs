//! The fetcher: brings file data from the origin into the cache on demand.
//!
//! A read that misses asks for the chunks it needs; consecutive missing
//! chunks travel in one HTTP Range request. Each chunk has a *slot* that
//! readers wait on: it is filled as soon as the chunk's bytes have arrived,
//! so a reader is answered from memory before the chunk is in redb, and two
//! readers of one chunk share one transfer. Chunks are then stored by a
//! single storer thread that batches them into few redb transactions, and
//! the slot goes away once its chunk can be read from the cache.
//!
//! Sequential reading opens a readahead window that doubles with each
//! sequential read, up to [`MAX_READAHEAD_CHUNKS`]; readahead uses at most
//! [`READAHEAD_STREAMS`] concurrent requests and is skipped, never waited
//! for, when they are busy.
//!
//! Memory stays bounded whatever the file size and however many transfers
//! run: a chunk takes one of [`MAX_UNSTORED`] places before its first byte
//! is kept and gives it back once the storer is done with it, so when redb
//! falls behind, transfers wait (and the readers waiting on them: the disk
//! sets the pace, as the kernel's dirty-page throttling does).
//!
//! A range that is wholly a hole of a sparse file comes back from the
//! origin as a length, not as zeros: its chunks are empty (they read as
//! zeros) and stored as such.
//!
//! Slots are keyed by (fileid, origin version, chunk): bytes of one version
//! can never answer a read of another, and the storer only stores a chunk
//! if the object still has that version.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use imz_cache::chunk::{self, CHUNK_SIZE};
use imz_cache::{Cache, FileId};
use imz_origin::wire::{self, ErrorCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::link::Link;
use crate::metrics::Metrics;
use crate::origin_client::{OriginClient, OriginError};

/// Chunks per readahead request.
const READAHEAD_RUN: u64 = 8;
/// Largest readahead window, in chunks (about 32 MiB).
pub const MAX_READAHEAD_CHUNKS: u64 = 32;
/// Concurrent readahead requests.
pub const READAHEAD_STREAMS: usize = 3;
/// Chunks queued for storing before transfers wait.
pub const STORE_QUEUE: usize = 24;
/// Chunks in memory between their first byte arriving and their storing:
/// every transfer waits for a place before it assembles a chunk. Without
/// this bound a disk slower than the network piled up chunks, one per
/// demanded READ, in transfers waiting for the storer (measured: 130 MiB
/// during a 4 GiB read).
pub const MAX_UNSTORED: usize = 2 * STORE_QUEUE;
/// Files whose read pattern is remembered.
const TRACKED_FILES: usize = 1024;
/// Fetched data is committed without waiting for the disk (it can be
/// fetched again), then made durable within this long of arriving, or as
/// soon as the storer is idle this long: a crash loses at most the last
/// moment of fetching, and redb can reuse the pages freed meanwhile.
const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// While whole files are being filled ([`Fetcher::prefetch`]: replicas,
/// pins), durability waits longer: the filler makes its work durable when
/// done, and a wait for the disk every second would stall the transfer.
const DURABLE_EVERY_FILLING: Duration = Duration::from_secs(30);
const DURABLE_WHEN_IDLE: Duration = Duration::from_millis(200);
/// How often the storer repeats that it cannot keep fetched data.
const DISK_FULL_WARNING_EVERY: Duration = Duration::from_secs(30);

type SlotKey = (FileId, u64, u64);

/// Why a chunk could not be fetched.
#[derive(Debug, Clone)]
pub enum FetchFailure {
    /// The origin is unreachable.
    Offline,
    /// The version is no longer current at the origin; its current
    /// attributes, or `None` if the object is gone.
    Gone(Option<wire::Attr>),
    /// The origin may not read the file (its permissions on its disk).
    Denied,
    /// The file changed at the origin while its bytes were on their way
    /// (the origin cut the transfer): asking again gets its new version.
    Changed,
    Io(String),
}

#[derive(Debug, Clone)]
enum SlotState {
    Pending,
    Ready(Bytes),
    Failed(FetchFailure),
}

/// What to fetch: one version of one file.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub fid: FileId,
    pub origin_id: wire::ObjectId,
    pub version: wire::Version,
    /// Bytes past this come from nowhere (holes or local data).
    pub extent: u64,
}

struct StoreJob {
    key: SlotKey,
    bytes: Bytes,
    /// This chunk's place among the unstored ones, given back once the
    /// storer is done with it (none for a hole: it holds no memory).
    _unstored: Option<OwnedSemaphorePermit>,
}

/// Per-file read pattern, for readahead.
#[derive(Debug, Clone, Copy)]
struct ReadPattern {
    next: u64,
    window: u64,
}

struct Inner {
    cache: Arc<Cache>,
    origin: OriginClient,
    link: Arc<Link>,
    slots: Mutex<HashMap<SlotKey, watch::Receiver<SlotState>>>,
    readahead: Arc<Semaphore>,
    /// Chunks fetched (or being assembled) and not yet stored: at most
    /// [`MAX_UNSTORED`].
    unstored: Arc<Semaphore>,
    store: mpsc::Sender<StoreJob>,
    patterns: Mutex<lru::LruCache<FileId, ReadPattern>>,
    metrics: Arc<Metrics>,
    /// Bumped by the storer after each batch it has stored and retired.
    stored: watch::Sender<u64>,
    /// Fills running ([`Fetcher::prefetch`], [`Fetcher::fetch_for_fill`]).
    filling: std::sync::atomic::AtomicUsize,
}

/// Handle to the fetcher; cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl Fetcher {
    /// Starts the fetcher and its storer thread.
    pub fn start(
        cache: Arc<Cache>,
        origin: OriginClient,
        link: Arc<Link>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (store, jobs) = mpsc::channel(STORE_QUEUE);
        let inner = Arc::new(Inner {
            cache,
            origin,
            link,
            slots: Mutex::new(HashMap::new()),
            readahead: Arc::new(Semaphore::new(READAHEAD_STREAMS)),
            unstored: Arc::new(Semaphore::new(MAX_UNSTORED)),
            store,
            metrics,
            stored: watch::channel(0).0,
            filling: Default::default(),
            patterns: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(TRACKED_FILES).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        });
        let weak = Arc::downgrade(&inner);
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("imz-storer".into())
            .spawn(move || run_storer(weak, jobs, runtime))?;
        Ok(Self { inner })
    }

    /// Records a read of `offset..offset+len` of `fid`; returns the readahead
    /// window in chunks (0 for non-sequential reads).
    pub fn note_read(&self, fid: FileId, offset: u64, len: u64) -> u64 {
        let mut patterns = self
            .inner
            .patterns
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let pattern = patterns.get_or_insert_mut(fid, || ReadPattern { next: 0, window: 0 });
        let sequential = offset <= pattern.next && pattern.next <= offset + len;
        pattern.window = if sequential {
            (pattern.window * 2).clamp(2, MAX_READAHEAD_CHUNKS)
        } else {
            0
        };
        pattern.next = pattern.next.max(offset + len);
        if !sequential {
            pattern.next = offset + len;
        }
        pattern.window
    }

    /// Starts fetching the demanded chunks (all of them, now) and the
    /// readahead chunks (if a stream is free). Returns a receiver per
    /// demanded chunk.
    pub fn demand(
        &self,
        target: &Target,
        demanded: &[u64],
        readahead: Range<u64>,
    ) -> Vec<(u64, SlotWait)> {
        let waits = self.claim(target, demanded, false);
        self.readahead(target, readahead);
        waits
    }

    /// Joins the transfers of `demanded` chunks under way and starts one
    /// for the others (with `unstored`, only for those not in the cache).
    fn claim(&self, target: &Target, demanded: &[u64], unstored: bool) -> Vec<(u64, SlotWait)> {
        let mut waits = Vec::with_capacity(demanded.len());
        let mut to_fetch = Vec::new();
        {
            let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
            let stored = if unstored {
                self.inner.cache.read().ok()
            } else {
                None
            };
            for &index in demanded {
                let key = (target.fid, target.version, index);
                if let Some(rx) = slots.get(&key) {
                    let rx = rx.clone();
                    waits.push((index, SlotWait { rx, started: false }));
                    continue;
                }
                if stored
                    .as_ref()
                    .is_some_and(|rx| rx.has_chunk(target.fid, index).unwrap_or(false))
                {
                    continue;
                }
                let (tx, rx) = watch::channel(SlotState::Pending);
                slots.insert(key, rx.clone());
                to_fetch.push((index, tx));
                waits.push((index, SlotWait { rx, started: true }));
            }
        }
        for run in runs(to_fetch, u64::MAX) {
            self.spawn_run(*target, run, None);
        }
        waits
    }

    /// Like [`demand`](Self::demand) without readahead, but passes over
    /// chunks that are in the cache by now. A filler that found a chunk
    /// missing may ask just after the storer stored it and retired its
    /// slot: asking again would fetch it again (measured: 4 MiB of a
    /// 96 MiB replica, now and then). The storer commits before it retires
    /// a slot, and retiring takes the slots' lock: a snapshot taken under
    /// that lock sees every chunk whose slot is gone.
    fn demand_unstored(&self, target: &Target, demanded: &[u64]) -> Vec<(u64, SlotWait)> {
        self.claim(target, demanded, true)
    }

    /// Fetches chunks in `range` that are neither cached nor in flight, as
    /// far as readahead streams are free.
    ///
    /// A chunk's slot is published only once a stream is held for it: a
    /// reader that finds the slot can count on its transfer (publishing
    /// first and withdrawing on a busy stream failed such readers, seen
    /// with 400 READs in flight on one connection).
    pub fn readahead(&self, target: &Target, range: Range<u64>) {
        let range = range.start..range.end.min(chunk::count(target.extent));
        if range.is_empty() {
            return;
        }
        let Ok(rx) = self.inner.cache.read() else {
            return;
        };
        let wanted: Vec<(u64, ())> = {
            let slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
            range
                .filter(|&index| {
                    !slots.contains_key(&(target.fid, target.version, index))
                        && !rx.has_chunk(target.fid, index).unwrap_or(true)
                })
                .map(|index| (index, ()))
                .collect()
        };
        for run in runs(wanted, READAHEAD_RUN) {
            let Ok(permit) = Arc::clone(&self.inner.readahead).try_acquire_owned() else {
                // Busy: whoever reads these chunks first fetches them.
                return;
            };
            let mut claimed = Vec::with_capacity(run.len());
            {
                let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
                for (index, ()) in run {
                    let key = (target.fid, target.version, index);
                    if slots.contains_key(&key) {
                        continue; // demanded meanwhile
                    }
                    let (tx, rx) = watch::channel(SlotState::Pending);
                    slots.insert(key, rx);
                    claimed.push((index, tx));
                }
            }
            // Chunks demanded meanwhile may split the run; the stream goes
            // to its first part.
            let mut permit = Some(permit);
            for part in runs(claimed, READAHEAD_RUN) {
                self.spawn_run(*target, part, permit.take());
            }
        }
    }

    /// Fetches `chunks` of `target` (whatever the cache holds: pass the
    /// missing ones) and waits until every one of them is stored in the
    /// cache, or the storer has passed over it. Returns the bytes fetched
    /// for this call (as [`fetch_for_fill`](Self::fetch_for_fill) counts
    /// them). Used to fill replicas and pins, where bytes in a slot are
    /// not enough: they must be in the cache when this returns.
    pub async fn prefetch(&self, target: &Target, chunks: &[u64]) -> Result<u64, FetchFailure> {
        // Subscribed before anything is fetched, so no storing is missed.
        let mut stored = self.inner.stored.subscribe();
        let bytes = self.fetch_for_fill(target, chunks).await?;
        // A slot is retired once the storer has handled its chunk.
        loop {
            let in_flight = {
                let slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
                chunks
                    .iter()
                    .any(|&i| slots.contains_key(&(target.fid, target.version, i)))
            };
            if !in_flight {
                return Ok(bytes);
            }
            if stored.changed().await.is_err() {
                return Err(FetchFailure::Io("cache storer stopped".into()));
            }
        }
    }

    /// Like [`prefetch`](Self::prefetch), but returns once the bytes have
    /// arrived: the storer stores them a moment later (a filler that does
    /// not wait for each file keeps more transfers going, and checks what
    /// is stored at the end). Returns the bytes that crossed the network
    /// for this call: a chunk already on its way (or arrived and not stored
    /// yet) is waited for, not counted again.
    pub async fn fetch_for_fill(
        &self,
        target: &Target,
        chunks: &[u64],
    ) -> Result<u64, FetchFailure> {
        let _filling = Filling::enter(&self.inner.filling);
        let mut stored = self.inner.stored.subscribe();
        let mut bytes = 0;
        let mut failure = None;
        for (index, wait) in self.demand_unstored(target, chunks) {
            let started = wait.started;
            match wait.bytes().await {
                // A hole arrives empty: count what it stands for.
                Ok(_) if started => bytes += chunk::len_in(index, target.extent),
                Ok(_) => {}
                Err(f) => {
                    failure.get_or_insert(f);
                }
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
        // Arrived is not stored: while the storer's queue is full, the
        // filler waits, so that fetched bytes cannot pile up in memory
        // faster than the disk takes them.
        while self.inner.store.capacity() == 0 {
            if stored.changed().await.is_err() {
                return Err(FetchFailure::Io("cache storer stopped".into()));
            }
        }
        Ok(bytes)
    }

    fn spawn_run(
        &self,
        target: Target,
        run: Vec<(u64, watch::Sender<SlotState>)>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        use tracing::Instrument;
        let inner = Arc::clone(&self.inner);
        let span = tracing::debug_span!(
            "fetch",
            fid = target.fid,
            id = target.origin_id,
            version = target.version,
            first = run.first().map(|r| r.0),
            chunks = run.len()
        );
        tokio::spawn(
            async move {
                let _permit = permit;
                fetch_run(&inner, target, run).await;
            }
            .instrument(span),
        );
    }
}

/// Counts a running prefetch.
struct Filling<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Filling<'a> {
    fn enter(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Waits for one chunk.
pub struct SlotWait {
    rx: watch::Receiver<SlotState>,
    /// This wait's demand started the chunk's transfer (it did not join
    /// one already under way).
    started: bool,
}

impl SlotWait {
    pub async fn bytes(mut self) -> Result<Bytes, FetchFailure> {
        let state = self
            .rx
            .wait_for(|s| !matches!(s, SlotState::Pending))
            .await
            .map_err(|_| FetchFailure::Io("fetch ended without an answer".into()))?;
        match &*state {
            SlotState::Ready(bytes) => Ok(bytes.clone()),
            SlotState::Failed(f) => Err(f.clone()),
            SlotState::Pending => Err(FetchFailure::Io("fetch ended without an answer".into())),
        }
    }
}

/// Groups slots into runs of consecutive chunks, at most `max` long.
fn runs<T>(mut slots: Vec<(u64, T)>, max: u64) -> Vec<Vec<(u64, T)>> {
    slots.sort_by_key(|(i, _)| *i);
    let mut out: Vec<Vec<(u64, T)>> = Vec::new();
    for slot in slots {
        match out.last_mut() {
            Some(run)
                if run.last().is_some_and(|(i, _)| *i + 1 == slot.0)
                    && (run.len() as u64) < max =>
            {
                run.push(slot);
            }
            _ => out.push(vec![slot]),
        }
    }
    out
}

/// Fetches one run of consecutive chunks with one Range request.
async fn fetch_run(inner: &Arc<Inner>, target: Target, run: Vec<(u64, watch::Sender<SlotState>)>) {
    let (Some(first), Some(last)) = (run.first().map(|r| r.0), run.last().map(|r| r.0)) else {
        return;
    };
    let start = chunk::start_of(first);
    let end = (chunk::start_of(last) + CHUNK_SIZE).min(target.extent);
    let mut pending = run.into_iter().peekable();
    let failure = match inner
        .origin
        .data(target.origin_id, target.version, start, end)
        .await
    {
        Err(e) => Some(classify(inner, e)),
        Ok(None) => {
            // Wholly a hole: every chunk is empty (it reads as zeros).
            for (index, tx) in pending.by_ref() {
                let _ = tx.send(SlotState::Ready(Bytes::new()));
                let job = StoreJob {
                    key: (target.fid, target.version, index),
                    bytes: Bytes::new(),
                    _unstored: None,
                };
                if inner.store.send(job).await.is_err() {
                    break;
                }
            }
            None
        }
        Ok(Some(stream)) => {
            let mut stream = std::pin::pin!(stream);
            let mut buf = BytesMut::new();
            let mut place = None;
            let mut failure = None;
            'body: while let Some(item) = stream.next().await {
                let mut bytes = match item {
                    Ok(b) => b,
                    Err(e) => {
                        failure = Some(classify(inner, e));
                        break;
                    }
                };
                while !bytes.is_empty() {
                    let Some((index, _)) = pending.peek() else {
                        break 'body;
                    };
                    let want =
                        (chunk::start_of(*index) + CHUNK_SIZE).min(end) - chunk::start_of(*index);
                    if buf.capacity() == 0 {
                        match Arc::clone(&inner.unstored).acquire_owned().await {
                            Ok(p) => place = Some(p),
                            Err(_) => {
                                failure = Some(FetchFailure::Io("fetcher stopped".into()));
                                break 'body;
                            }
                        }
                        buf.reserve(want as usize);
                    }
                    let take = (want as usize - buf.len()).min(bytes.len());
                    buf.extend_from_slice(&bytes.split_to(take));
                    if buf.len() as u64 == want {
                        let (index, tx) = pending.next().map_or((0, None), |(i, t)| (i, Some(t)));
                        let chunk = buf.split().freeze();
                        Metrics::add(&inner.metrics.fetched_bytes, chunk.len() as u64);
                        if let Some(tx) = tx {
                            let _ = tx.send(SlotState::Ready(chunk.clone()));
                        }
                        let Some(unstored) = place.take() else {
                            failure =
                                Some(FetchFailure::Io("chunk assembled without a place".into()));
                            break 'body;
                        };
                        let job = StoreJob {
                            key: (target.fid, target.version, index),
                            bytes: chunk,
                            _unstored: Some(unstored),
                        };
                        if inner.store.send(job).await.is_err() {
                            failure = Some(FetchFailure::Io("cache storer stopped".into()));
                            break 'body;
                        }
                    }
                }
            }
            match failure {
                Some(f) => Some(f),
                // Fewer bytes than asked: the file shrank at the origin.
                None if pending.peek().is_some() => Some(FetchFailure::Changed),
                None => None,
            }
        }
    };
    if let Some(failure) = failure {
        let mut slots = inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        for (index, tx) in pending {
            slots.remove(&(target.fid, target.version, index));
            let _ = tx.send(SlotState::Failed(failure.clone()));
        }
    }
}

fn classify(inner: &Inner, err: OriginError) -> FetchFailure {
    if inner.link.down_if_unreachable(&err) {
        return FetchFailure::Offline;
    }
    match err {
        OriginError::Cut(_) => FetchFailure::Changed,
        OriginError::Api(api) => match api.code {
            ErrorCode::VersionGone => FetchFailure::Gone(api.current),
            ErrorCode::NotFound => FetchFailure::Gone(None),
            ErrorCode::PermissionDenied => FetchFailure::Denied,
            _ => FetchFailure::Io(api.to_string()),
        },
        other => FetchFailure::Io(other.to_string()),
    }
}

/// The storer: writes fetched chunks into redb in batches, then retires
/// their slots. Runs until the fetcher is dropped.
fn run_storer(
    inner: std::sync::Weak<Inner>,
    mut jobs: mpsc::Receiver<StoreJob>,
    runtime: tokio::runtime::Handle,
) {
    // When the oldest commit not yet durable was made.
    let mut undurable_since: Option<Instant> = None;
    let pause = test_store_pause();
    loop {
        let first = match undurable_since {
            None => jobs.blocking_recv(),
            Some(_) => match runtime
                .block_on(async { tokio::time::timeout(DURABLE_WHEN_IDLE, jobs.recv()).await })
            {
                Ok(job) => job,
                Err(_idle) => {
                    let Some(inner) = inner.upgrade() else { return };
                    match inner.cache.write().and_then(|tx| tx.commit(true)) {
                        Ok(()) => undurable_since = None,
                        Err(e) => tracing::warn!(error = %e, "could not make fetched data durable"),
                    }
                    continue;
                }
            },
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        while batch.len() < STORE_QUEUE {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let every = if inner.filling.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            DURABLE_EVERY_FILLING
        } else {
            DURABLE_EVERY
        };
        let durable = undurable_since.is_some_and(|t| t.elapsed() >= every);
        match store_batch(&inner.cache, &batch, durable) {
            Ok(()) if durable => undurable_since = None,
            Ok(()) => {
                undurable_since.get_or_insert_with(Instant::now);
            }
            Err(e) => tracing::warn!(error = %e, "could not store fetched data in the cache"),
        }
        if let Some(pause) = pause {
            std::thread::sleep(pause.saturating_mul(batch.len() as u32));
        }
        let mut slots = inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        for job in &batch {
            // Readers that still find the slot gone will read the cache (or
            // fetch again if the chunk was evicted already).
            if slots
                .get(&job.key)
                .is_some_and(|rx| matches!(&*rx.borrow(), SlotState::Ready(_)))
            {
                slots.remove(&job.key);
            }
        }
        drop(slots);
        inner.stored.send_modify(|n| *n += 1);
    }
}

/// A pause after storing each chunk, from `IMZ_TEST_STORE_PAUSE_MS`: a
/// slow disk, for tests (one cannot be had on demand).
fn test_store_pause() -> Option<Duration> {
    let ms: u64 = std::env::var("IMZ_TEST_STORE_PAUSE_MS")
        .ok()?
        .parse()
        .ok()?;
    tracing::warn!(ms, "storing of fetched chunks slowed for a test");
    Some(Duration::from_millis(ms))
}

fn store_batch(cache: &Cache, batch: &[StoreJob], durable: bool) -> imz_cache::Result<()> {
    let bytes: u64 = batch.iter().map(|job| job.bytes.len() as u64).sum();
    if !cache.disk_takes(bytes) {
        // Readers had their bytes from the slots; the next read of these
        // chunks fetches them again.
        static WARNED: Mutex<Option<Instant>> = Mutex::new(None);
        let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
        if warned.is_none_or(|at| at.elapsed() > DISK_FULL_WARNING_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(
                "the disk holding the cache is nearly full: fetched data is served but not kept"
            );
        }
        return if durable {
            cache.write()?.commit(true)
        } else {
            Ok(())
        };
    }
    let mut tx = cache.write()?;
    for job in batch {
        let (fid, version, index) = job.key;
        let Some(obj) = tx.get(fid)? else { continue };
        // Only bytes of the version the object still has, and never over
        // local changes.
        let current = obj.origin.is_some_and(|o| o.version == version);
        if !current || obj.is_dirty() || chunk::start_of(index) >= obj.origin_extent {
            continue;
        }
        if !tx.has_chunk(fid, index)? {
            tx.put_chunk(fid, index, &job.bytes)?;
        }
    }
    tx.commit(durable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(indexes: &[u64]) -> Vec<(u64, watch::Sender<SlotState>)> {
        indexes
            .iter()
            .map(|&i| (i, watch::channel(SlotState::Pending).0))
            .collect()
    }

    #[test]
    fn runs_group_consecutive_chunks_up_to_a_limit() {
        let got: Vec<Vec<u64>> = runs(slots(&[5, 1, 2, 3, 7, 8]), 2)
            .into_iter()
            .map(|r| r.into_iter().map(|(i, _)| i).collect())
            .collect();
        assert_eq!(got, vec![vec![1, 2], vec![3], vec![5], vec![7, 8]]);
    }
}
