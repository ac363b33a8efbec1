//! The writer: every client-visible change to the cache goes through one
//! thread, which gathers whatever changes are waiting into one redb
//! transaction and commits it once (group commit).
//!
//! One writer means mutations are serialised (a WRITE and a SETATTR of the
//! same file never interleave), and concurrent clients share an fsync
//! instead of paying one each.
//!
//! A change either needs a durable redb commit before its reply, or
//! replays from the durable state and a record of its own ([`Logged`]: a
//! create, remove, rename or setattr, a write into a file whose data is
//! all local). If nothing in the batch needs more, the batch is committed
//! without fsync and its records are appended to the unstable-write log
//! ([`crate::unstable`]), which survives a crash of this process. A
//! *stable* one (all but an UNSTABLE write) then waits for one fdatasync
//! of that log: a few sequential pages, where a durable redb commit writes
//! the b-tree pages every change touched (a few dozen, scattered). An
//! *unstable* write is answered at once; a COMMIT
//! ([`Writer::make_durable`]) syncs the log. A durable commit (a change
//! that needs one, 2 s idle, or [`MAX_LOGGED_RECORDS`] changes or
//! [`MAX_UNSTABLE_BYTES`] logged since the last one) puts everything in
//! redb and starts the log over.
//!
//! A mutation must check everything that can fail for a logical reason
//! (no such name, name exists, no space) before it changes anything, so a
//! refused mutation leaves nothing behind in the shared transaction. A
//! storage error is different: it aborts the whole transaction and every
//! mutation in it fails.

use std::collections::HashSet;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imz_cache::{Cache, FileId, WriteTxn, meta};
use tokio::sync::oneshot;

use crate::unstable::{Change, LogThread, Record, UnstableLog};
use crate::vfs::VfsError;

/// Most mutations in one transaction.
const MAX_BATCH: usize = 256;
/// Most bytes of write payload in one transaction.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Most bytes logged since the last durable commit: past it, the next
/// commit is durable (bounds what a crash replays and what sits only in
/// page cache).
const MAX_UNSTABLE_BYTES: u64 = 128 << 20;
/// Most changes logged since the last durable commit (what a crash
/// replays, one by one).
const MAX_LOGGED_RECORDS: u64 = 16_384;
/// The largest the unstable-write log grows: what may be logged, one more
/// batch (its write payload, and for each change a header and a create's
/// arguments: a name and a symlink's target), and the zeros it grows by.
pub const MAX_UNSTABLE_LOG_BYTES: u64 = MAX_UNSTABLE_BYTES
    + MAX_BATCH_BYTES as u64
    + MAX_BATCH as u64 * (16 << 10)
    + crate::unstable::GROW_STEP;
/// After this long without changes, outstanding unstable writes are made
/// durable, as the kernel would write back dirty pages.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// How a change was committed when its reply went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// On disk.
    Durable,
    /// In the cache and the unstable-write log; durable after a COMMIT.
    Unstable,
}

type Reply = Box<dyn FnOnce(Result<Committed, VfsError>) + Send>;

/// A change the unstable-write log can carry in place of a durable commit:
/// one that replays from the durable state and the log alone.
pub struct Logged {
    pub change: Change,
    /// Its reply says it is on disk: the log is synced before it goes out
    /// (every change but an UNSTABLE WRITE).
    pub stable: bool,
}

/// What a change leaves for the commit.
struct Outcome {
    /// A storage error: the transaction must not be committed.
    poisoned: bool,
    /// The change to log; `None` means it must be committed durably.
    logged: Option<Logged>,
    reply: Reply,
}

/// Runs a change in the open transaction (or, given none, fails it).
type Job = Box<dyn FnOnce(Option<&mut WriteTxn<'_>>) -> Outcome + Send>;

enum Msg {
    Change {
        job: Job,
        bytes: usize,
    },
    /// Put every unstable write acknowledged so far on disk (COMMIT).
    Sync(oneshot::Sender<Result<(), VfsError>>),
    /// Make everything durable and clear the unstable mark (clean stop).
    Settle(oneshot::Sender<Result<(), VfsError>>),
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Msg>,
    /// Files with unstable writes acknowledged and not durable yet.
    outstanding: Outstanding,
}

/// Acknowledged unstable writes not yet on disk. The writer thread adds
/// their files before the replies go out and clears them after each sync
/// of the log and each durable commit, so a COMMIT that finds its file
/// absent has nothing to wait for.
type Outstanding = Arc<Mutex<OutstandingWrites>>;

#[derive(Debug, Default)]
struct OutstandingWrites {
    files: HashSet<FileId>,
    /// Their bytes.
    bytes: u64,
    /// Bytes logged since the last durable commit, on disk in the log or
    /// not: past [`MAX_UNSTABLE_BYTES`] the next commit is durable (what a
    /// crash replays, and what redb holds in memory).
    since_durable: u64,
    /// Changes logged since the last durable commit.
    records_since_durable: u64,
}

fn lock(set: &Outstanding) -> std::sync::MutexGuard<'_, OutstandingWrites> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

impl Writer {
    /// Starts the writer. `unstable` is the unstable-write log and this
    /// boot's id; without them every change is committed durably.
    pub fn start(
        cache: Arc<Cache>,
        unstable: Option<(UnstableLog, String)>,
    ) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::channel();
        let outstanding = Outstanding::default();
        let log = match unstable {
            Some((log, boot)) => Some((LogThread::start(log)?, boot)),
            None => None,
        };
        let mut state = State {
            cache,
            log,
            outstanding: Arc::clone(&outstanding),
            marked: false,
            next_seq: 0,
        };
        state.next_seq = state
            .cache
            .read()
            .and_then(|rx| rx.meta_u64(meta::UNSTABLE_SEQ))
            .map_err(std::io::Error::other)?
            .unwrap_or(0)
            + 1;
        std::thread::Builder::new()
            .name("imz-writer".into())
            .spawn(move || state.run(&jobs))?;
        Ok(Self { queue, outstanding })
    }

    /// Runs `change` in the next transaction and waits until it is durable.
    /// `bytes` is the payload size, for batching.
    pub async fn run<T: Send + 'static>(
        &self,
        bytes: usize,
        change: impl FnOnce(&mut WriteTxn<'_>) -> Result<T, VfsError> + Send + 'static,
    ) -> Result<T, VfsError> {
        self.run_logged(bytes, move |tx| change(tx).map(|v| (v, None)))
            .await
            .map(|(v, _)| v)
    }

    /// Runs a change the log may carry: `change` returns what to log, or
    /// `None` when it needs a durable commit. Tells how it was committed.
    pub async fn run_logged<T: Send + 'static>(
        &self,
        bytes: usize,
        change: impl FnOnce(&mut WriteTxn<'_>) -> Result<(T, Option<Logged>), VfsError> + Send + 'static,
    ) -> Result<(T, Committed), VfsError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |txn: Option<&mut WriteTxn<'_>>| {
            let result = match txn {
                Some(txn) => change(txn),
                None => Err(VfsError::Io("the cache cannot be written".into())),
            };
            // A storage failure may have left half a change in the
            // transaction: it must not be committed.
            let poisoned = matches!(result, Err(VfsError::Io(_)));
            let (result, logged) = match result {
                Ok((v, logged)) => (Ok(v), logged),
                Err(e) => (Err(e), None),
            };
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(commit.and_then(|c| result.map(|v| (v, c))));
            });
            Outcome {
                poisoned,
                logged,
                reply,
            }
        });
        self.queue
            .send(Msg::Change { job, bytes })
            .map_err(|_| VfsError::Io("cache writer stopped".into()))?;
        rx.await
            .map_err(|_| VfsError::Io("cache writer stopped".into()))?
    }

    /// Waits until every change queued before this call is committed.
    pub async fn drain(&self) {
        // The queue is first in, first out: an empty change behind the
        // others is done when they are.
        let _ = self.run(0, |_| Ok(())).await;
    }

    /// Files with unstable writes not yet durable, and those writes' bytes.
    pub fn unstable(&self) -> (usize, u64) {
        let o = lock(&self.outstanding);
        (o.files.len(), o.bytes)
    }

    /// Puts every write to `fid` acknowledged so far on disk (NFS
    /// COMMIT). Often there is nothing to do: a durable commit or a sync
    /// since (any client's metadata change or COMMIT, say) took them along.
    pub async fn make_durable(&self, fid: FileId) -> Result<(), VfsError> {
        if !lock(&self.outstanding).files.contains(&fid) {
            return Ok(());
        }
        self.ask(Msg::Sync).await
    }

    /// Makes everything durable and records that no unstable write is
    /// outstanding (before a clean stop).
    pub async fn settle(&self) -> Result<(), VfsError> {
        self.ask(Msg::Settle).await
    }

    /// Sends the writer thread a request and waits for its answer.
    async fn ask(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<(), VfsError>>) -> Msg,
    ) -> Result<(), VfsError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(request(tx))
            .map_err(|_| VfsError::Io("cache writer stopped".into()))?;
        rx.await
            .map_err(|_| VfsError::Io("cache writer stopped".into()))?
    }
}

/// The writer thread's state.
struct State {
    cache: Arc<Cache>,
    log: Option<(LogThread, String)>,
    outstanding: Outstanding,
    /// This run recorded its boot id as having unstable writes outstanding.
    marked: bool,
    next_seq: u64,
}

impl State {
    fn run(&mut self, jobs: &mpsc::Receiver<Msg>) {
        loop {
            let first = if self.marked {
                match jobs.recv_timeout(IDLE_SETTLE) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = self.settle() {
                            tracing::warn!(error = %e, "could not make unstable writes durable");
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match jobs.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                }
            };
            let (mut batch, mut bytes, mut syncs) = (Vec::new(), 0, Vec::new());
            match first {
                Msg::Change { job, bytes: b } => {
                    batch.push(job);
                    bytes = b;
                }
                Msg::Sync(done) => syncs.push(done),
                Msg::Settle(done) => {
                    let _ = done.send(self.settle());
                    continue;
                }
            }
            let mut settles = Vec::new();
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match jobs.try_recv() {
                    Ok(Msg::Change { job, bytes: b }) => {
                        bytes += b;
                        batch.push(job);
                    }
                    // One sync after the batch serves every COMMIT waiting.
                    Ok(Msg::Sync(done)) => syncs.push(done),
                    Ok(Msg::Settle(done)) => {
                        // After this batch, in queue order.
                        settles.push(done);
                        break;
                    }
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit_batch(batch);
            }
            if !syncs.is_empty() {
                let synced = self.sync();
                for done in syncs {
                    let _ = done.send(synced.clone());
                }
            }
            for done in settles {
                let _ = done.send(self.settle());
            }
        }
    }

    fn commit_batch(&mut self, batch: Vec<Job>) {
        let cache = Arc::clone(&self.cache);
        let mut txn = match cache.write() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot open a cache transaction");
                for job in batch {
                    let outcome = job(None);
                    (outcome.reply)(Err(VfsError::Io("the cache cannot be written".into())));
                }
                return;
            }
        };
        let mut replies = Vec::with_capacity(batch.len());
        let mut poisoned = false;
        let mut needs_durable = false;
        let mut records = Vec::new();
        let mut needs_sync = false;
        for job in batch {
            let outcome = job(Some(&mut txn));
            poisoned |= outcome.poisoned;
            match outcome.logged {
                Some(Logged { change, stable }) if self.log.is_some() => {
                    needs_sync |= stable;
                    records.push(Record { seq: 0, change });
                }
                _ => needs_durable = true,
            }
            replies.push(outcome.reply);
        }
        if poisoned {
            drop(txn);
            let e = VfsError::Io("a storage error aborted this change".into());
            tracing::error!(error = %e, "cache commit failed");
            for reply in replies {
                reply(Err(e.clone()));
            }
            return;
        }
        let outcome = self.commit(txn, needs_durable, needs_sync, &mut records);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "cache commit failed");
        }
        for reply in replies {
            reply(outcome.clone());
        }
    }

    /// Commits `txn`, durably if `durable` (or if the log cannot be used),
    /// else logging `records`, and syncing the log if `sync`.
    fn commit(
        &mut self,
        txn: WriteTxn<'_>,
        durable: bool,
        sync: bool,
        records: &mut [Record],
    ) -> Result<Committed, VfsError> {
        let first_seq = self.next_seq;
        let result = self.try_commit(txn, durable, sync, records);
        if result.is_err() {
            // Those numbers were never used: the log's must stay gapless.
            self.next_seq = first_seq;
        }
        result
    }

    fn try_commit(
        &mut self,
        mut txn: WriteTxn<'_>,
        mut durable: bool,
        sync: bool,
        records: &mut [Record],
    ) -> Result<Committed, VfsError> {
        let batch_bytes: u64 = records.iter().map(|r| r.change.data_len()).sum();
        let log_bytes: u64 = records.iter().map(Record::log_len).sum();
        if !records.is_empty() {
            for r in records.iter_mut() {
                r.seq = self.next_seq;
                self.next_seq += 1;
            }
            if let Some(last) = records.last() {
                txn.put_meta_u64(meta::UNSTABLE_SEQ, last.seq)?;
            }
            let o = lock(&self.outstanding);
            if o.since_durable + log_bytes > MAX_UNSTABLE_BYTES
                || o.records_since_durable + records.len() as u64 > MAX_LOGGED_RECORDS
            {
                durable = true;
            }
            drop(o);
            if !self.marked && !durable {
                // The boot id must be on disk before the first unstable
                // reply: this batch is durable, the next ones need not be.
                if let Some((_, boot)) = &self.log {
                    txn.put_meta(meta::UNSTABLE_BOOT, boot.as_bytes())?;
                }
                self.marked = true;
                durable = true;
            }
        } else {
            durable = true;
        }
        let log = match &self.log {
            Some((log, _)) if !durable => log,
            _ => {
                txn.commit(true)?;
                self.became_durable();
                return Ok(Committed::Durable);
            }
        };
        // The append runs beside the commit; a reply waits for both. An
        // append of a batch whose commit fails is undone.
        let pending = log.append(records.to_vec());
        if let Err(e) = txn.commit(false) {
            let _ = pending.wait();
            log.rollback();
            return Err(e.into());
        }
        match pending.wait() {
            Ok(()) => {
                let mut o = lock(&self.outstanding);
                o.files
                    .extend(records.iter().filter_map(|r| r.change.written_file()));
                o.bytes += batch_bytes;
                o.since_durable += log_bytes;
                o.records_since_durable += records.len() as u64;
                drop(o);
                if sync {
                    self.sync_log()?;
                    return Ok(Committed::Durable);
                }
                Ok(Committed::Unstable)
            }
            Err(e) => {
                tracing::warn!(error = %e, "unstable-write log append failed; committing durably");
                self.commit_durably()?;
                Ok(Committed::Durable)
            }
        }
    }

    /// Everything committed so far is on disk.
    fn became_durable(&mut self) {
        *lock(&self.outstanding) = OutstandingWrites::default();
        // Its records are all in the durable state now (and would be
        // skipped on replay): writing starts over at the beginning.
        if let Some((log, _)) = &self.log {
            log.reset();
        }
    }

    /// Puts every unstable write acknowledged so far on disk: an fdatasync
    /// of the log (start-up recovery replays it on any boot), or, should
    /// that fail, a durable commit.
    fn sync(&mut self) -> Result<(), VfsError> {
        if lock(&self.outstanding).files.is_empty() {
            return Ok(());
        }
        self.sync_log()
    }

    /// Puts the log on disk as it stands (or, should that fail, makes
    /// everything durable in redb).
    fn sync_log(&mut self) -> Result<(), VfsError> {
        let synced = match &self.log {
            Some((log, _)) => log.sync(),
            None => Err(std::io::Error::other("no unstable-write log")),
        };
        match synced {
            Ok(()) => {
                let mut o = lock(&self.outstanding);
                o.files.clear();
                o.bytes = 0;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "unstable-write log sync failed; committing durably");
                self.commit_durably()
            }
        }
    }

    /// Makes everything committed so far durable in redb: what the log
    /// could not put on disk.
    fn commit_durably(&mut self) -> Result<(), VfsError> {
        self.cache.write()?.commit(true)?;
        self.became_durable();
        Ok(())
    }

    /// Makes everything durable and clears the unstable mark.
    fn settle(&mut self) -> Result<(), VfsError> {
        let mut txn = self.cache.write()?;
        if self.marked {
            txn.put_meta(meta::UNSTABLE_BOOT, b"")?;
        }
        txn.commit(true)?;
        self.marked = false;
        self.became_durable();
        Ok(())
    }
}
