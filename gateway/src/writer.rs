//! The writer: every client-visible change to the cache goes through one
//! thread, which gathers whatever changes are waiting into one redb
//! transaction and commits it once (group commit).
//!
//! One writer means mutations are serialised (a WRITE and a SETATTR of the
//! same file never interleave), and concurrent clients share an fsync
//! instead of paying one each.
//!
//! A change is either *stable* (every metadata change, FILE_SYNC writes):
//! its reply waits until the commit holding it is on disk; or an *unstable*
//! write: if nothing in the batch needs more, the batch is committed without
//! fsync and its writes are appended to the unstable-write log
//! ([`crate::unstable`]), which survives a crash of this process. A COMMIT
//! ([`Writer::make_durable`]) or any stable change later makes them durable.
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

use crate::unstable::{LogThread, Record, UnstableLog, UnstableWrite};
use crate::vfs::VfsError;

/// Most mutations in one transaction.
const MAX_BATCH: usize = 256;
/// Most bytes of write payload in one transaction.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Most bytes of unstable writes outstanding: past it, the next commit is
/// durable (bounds what a crash replays and what sits only in page cache).
const MAX_UNSTABLE_BYTES: u64 = 128 << 20;
/// The largest the unstable-write log grows: what may be outstanding, and
/// one more batch.
pub const MAX_UNSTABLE_LOG_BYTES: u64 = MAX_UNSTABLE_BYTES + MAX_BATCH_BYTES as u64;
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

/// What a change leaves for the commit.
struct Outcome {
    /// A storage error: the transaction must not be committed.
    poisoned: bool,
    /// An unstable write to log; `None` means the change must be durable.
    unstable: Option<UnstableWrite>,
    reply: Reply,
}

/// Runs a change in the open transaction (or, given none, fails it).
type Job = Box<dyn FnOnce(Option<&mut WriteTxn<'_>>) -> Outcome + Send>;

enum Msg {
    Change {
        job: Job,
        bytes: usize,
    },
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

/// Acknowledged unstable writes not yet durable. The writer thread adds
/// their files before the replies go out and clears them after each
/// durable commit, so a COMMIT that finds its file absent has nothing to
/// wait for.
type Outstanding = Arc<Mutex<OutstandingWrites>>;

#[derive(Debug, Default)]
struct OutstandingWrites {
    files: HashSet<FileId>,
    /// Their bytes: past [`MAX_UNSTABLE_BYTES`] the next commit is durable.
    bytes: u64,
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
        self.run_write(bytes, move |tx| change(tx).map(|v| (v, None)))
            .await
            .map(|(v, _)| v)
    }

    /// Runs a write that may be acknowledged before it is durable: `change`
    /// returns the unstable write to log, or `None` when the change needs
    /// a durable commit. Tells how it was committed.
    pub async fn run_write<T: Send + 'static>(
        &self,
        bytes: usize,
        change: impl FnOnce(&mut WriteTxn<'_>) -> Result<(T, Option<UnstableWrite>), VfsError>
        + Send
        + 'static,
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
            let (result, unstable) = match result {
                Ok((v, unstable)) => (Ok(v), unstable),
                Err(e) => (Err(e), None),
            };
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(commit.and_then(|c| result.map(|v| (v, c))));
            });
            Outcome {
                poisoned,
                unstable,
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

    /// Makes every write to `fid` acknowledged so far durable (NFS
    /// COMMIT). Often there is nothing to do: a durable commit since (any
    /// client's metadata change, say) took them along.
    pub async fn make_durable(&self, fid: FileId) -> Result<(), VfsError> {
        if !lock(&self.outstanding).files.contains(&fid) {
            return Ok(());
        }
        self.run(0, |_| Ok(())).await
    }

    /// Makes everything durable and records that no unstable write is
    /// outstanding (before a clean stop).
    pub async fn settle(&self) -> Result<(), VfsError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Msg::Settle(tx))
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
            let (job, mut bytes) = match first {
                Msg::Change { job, bytes } => (job, bytes),
                Msg::Settle(done) => {
                    let _ = done.send(self.settle());
                    continue;
                }
            };
            let mut batch = vec![job];
            let mut settles = Vec::new();
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match jobs.try_recv() {
                    Ok(Msg::Change { job, bytes: b }) => {
                        bytes += b;
                        batch.push(job);
                    }
                    Ok(Msg::Settle(done)) => {
                        // After this batch, in queue order.
                        settles.push(done);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
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
        for job in batch {
            let outcome = job(Some(&mut txn));
            poisoned |= outcome.poisoned;
            match outcome.unstable {
                Some(write) if self.log.is_some() => records.push(Record { seq: 0, write }),
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
        let outcome = self.commit(txn, needs_durable, &mut records);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "cache commit failed");
        }
        for reply in replies {
            reply(outcome.clone());
        }
    }

    /// Commits `txn`, durably if `durable` (or if the unstable path cannot
    /// be taken), else logging `records`.
    fn commit(
        &mut self,
        txn: WriteTxn<'_>,
        durable: bool,
        records: &mut [Record],
    ) -> Result<Committed, VfsError> {
        let first_seq = self.next_seq;
        let result = self.try_commit(txn, durable, records);
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
        records: &mut [Record],
    ) -> Result<Committed, VfsError> {
        let batch_bytes: u64 = records.iter().map(|r| r.write.data.len() as u64).sum();
        if !records.is_empty() {
            for r in records.iter_mut() {
                r.seq = self.next_seq;
                self.next_seq += 1;
            }
            if let Some(last) = records.last() {
                txn.put_meta_u64(meta::UNSTABLE_SEQ, last.seq)?;
            }
            if lock(&self.outstanding).bytes + batch_bytes > MAX_UNSTABLE_BYTES {
                durable = true;
            }
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
                o.files.extend(records.iter().map(|r| r.write.fid));
                o.bytes += batch_bytes;
                Ok(Committed::Unstable)
            }
            Err(e) => {
                tracing::warn!(error = %e, "unstable-write log append failed; committing durably");
                self.cache.write()?.commit(true)?;
                self.became_durable();
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
