//! The single writer: every change to the metadata store and every change
//! the origin makes to the tree goes through one thread, which groups the
//! jobs waiting at the moment into one durable redb commit (group commit).
//!
//! A group of reintegration batches runs in two commits:
//! 1. an **intent** holding the group's operations is committed durably;
//! 2. the operations are applied to the tree one after the other, their
//!    metadata, journal records and idempotency keys are written in one
//!    transaction, touched directories are fsynced, the intent is dropped
//!    and the transaction is committed durably. Only then are the HTTP
//!    answers sent and journal readers woken.
//!
//! If the process dies between the two commits, [`recover`] replays the
//! intent at start-up against what the tree shows: each operation whose
//! effect is on disk is recorded (with its key, so a retry is `Replayed`),
//! and the first one whose effect is absent ends the recovery (operations
//! were applied in order by one thread, so nothing after it happened).
//! Each object is thus before or after an operation, and the journal agrees
//! with the files.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::Shared;
use crate::error::OriginError;
use crate::reintegrate::{self, Mode, Outcome};
use crate::scan::{self, Dirty};
use crate::store::Tx;
use crate::wire::{ApiError, BatchResult, KeyedOp, ObjectId, OpResult};

/// Most jobs merged into one group commit.
const MAX_GROUP: usize = 256;
/// Journal records dropped per transaction at most while compacting.
const COMPACT_BUDGET: u64 = 10_000;

pub enum Job {
    /// A reintegration batch; answered after the durable commit.
    Batch {
        ops: Vec<KeyedOp>,
        reply: oneshot::Sender<Result<BatchResult, ApiError>>,
    },
    /// Reconcile what the tree shows with the store.
    Reconcile {
        dirty: Dirty,
        reply: Option<oneshot::Sender<()>>,
    },
    /// Finish what is queued, then stop the thread.
    Stop,
}

/// Mutation context handed to the reintegration and scan code.
pub struct WCtx<'a> {
    pub tx: Tx<'a>,
    pub shared: &'a Shared,
    /// Directories to fsync before the commit.
    pub sync_dirs: Vec<OwnedFd>,
    pub now: i64,
}

impl WCtx<'_> {
    /// Reconciles the given directories right now, inside this transaction.
    pub fn reconcile_dirs(&mut self, dirs: &[ObjectId]) -> Result<(), OriginError> {
        scan::reconcile(self, Dirty::dirs(dirs.iter().copied()))
    }
}

pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Runs one transaction of the writer: `f` mutates, then touched
/// directories are fsynced, the journal compacted, and the commit made
/// durable. Readers are woken if records were appended.
pub fn transact<T>(
    shared: &Shared,
    f: impl FnOnce(&mut WCtx<'_>) -> Result<T, OriginError>,
) -> Result<T, OriginError> {
    let txn = shared.store.begin_write()?;
    let (out, appended) = {
        let mut cx = WCtx {
            tx: Tx::new(&txn),
            shared,
            sync_dirs: Vec::new(),
            now: now_nanos(),
        };
        let out = f(&mut cx)?;
        // Each touched directory once, however many operations touched it.
        let mut synced = std::collections::HashSet::new();
        for dir in &cx.sync_dirs {
            let ino = crate::fsops::fstat(dir).map(|st| st.st_ino).ok();
            if ino.is_some_and(|ino| !synced.insert(ino)) {
                continue;
            }
            crate::fsops::fsync_dir(dir).map_err(|e| OriginError::io("fsync of a directory", e))?;
        }
        if cx.tx.appended > 0 {
            cx.tx.compact(shared.config.journal_keep, COMPACT_BUDGET)?;
        }
        (out, cx.tx.appended)
    };
    let last = if appended > 0 {
        Some(Tx::new(&txn).counter("last_seq")?)
    } else {
        None
    };
    txn.commit()?;
    if let Some(last) = last {
        shared.seq.send_replace(last);
    }
    Ok(out)
}

/// The writer thread's loop; returns when every sender is gone.
pub fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Job>) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.blocking_recv() {
                Some(job) => pending.push_back(job),
                None => break,
            }
        }
        while pending.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => break,
            }
        }
        let mut dirty = Dirty::default();
        let mut reconcile_replies = Vec::new();
        let mut batches = Vec::new();
        let mut stop = false;
        for job in pending.drain(..) {
            match job {
                Job::Stop => stop = true,
                Job::Reconcile { dirty: d, reply } => {
                    dirty.merge(d);
                    reconcile_replies.extend(reply);
                }
                Job::Batch { ops, reply } => batches.push((ops, reply)),
            }
        }
        if !dirty.is_empty()
            && let Err(e) = transact(&shared, |cx| scan::reconcile(cx, dirty))
        {
            tracing::error!(error = %e, "reconciling external changes failed");
        }
        for reply in reconcile_replies {
            let _ = reply.send(());
        }
        if !batches.is_empty() {
            let leftover = run_batches(&shared, batches);
            for (ops, reply) in leftover.into_iter().rev() {
                pending.push_front(Job::Batch { ops, reply });
            }
        }
        if stop && pending.is_empty() {
            break;
        }
        if stop {
            pending.push_back(Job::Stop);
        }
    }
    tracing::debug!("writer stopped");
}

type Pending = (Vec<KeyedOp>, oneshot::Sender<Result<BatchResult, ApiError>>);

/// Applies a group of batches (intent, then one commit); returns the
/// batches not tried because an earlier operation failed on the disk.
fn run_batches(shared: &Shared, batches: Vec<Pending>) -> Vec<Pending> {
    let all: Vec<&Vec<KeyedOp>> = batches.iter().map(|(ops, _)| ops).collect();
    let intent = match serde_json::to_vec(&all)
        .map_err(OriginError::from)
        .and_then(|body| transact(shared, |cx| cx.tx.add_intent(&body)))
    {
        Ok(n) => n,
        Err(e) => {
            let err = ApiError::from(e);
            for (_, reply) in batches {
                let _ = reply.send(Err(err.clone()));
            }
            return Vec::new();
        }
    };
    let applied = transact(shared, |cx| {
        let mut results = Vec::with_capacity(batches.len());
        let mut stopped = false;
        for (ops, _) in &batches {
            if stopped {
                break;
            }
            let mut out = Vec::new();
            for op in ops {
                match reintegrate::apply(cx, op, Mode::Live)? {
                    Outcome::Done(r) => {
                        let go_on =
                            matches!(r, OpResult::Applied { .. } | OpResult::Replayed { .. });
                        out.push(r);
                        if !go_on {
                            break;
                        }
                    }
                    Outcome::FsFailed(r) => {
                        out.push(r);
                        stopped = true;
                        break;
                    }
                    Outcome::NotApplied => unreachable_not_applied(),
                }
            }
            results.push(out);
        }
        cx.tx.drop_intent(intent)?;
        Ok(results)
    });
    match applied {
        Ok(results) => {
            let n = results.len();
            let mut iter = batches.into_iter();
            for ((_, reply), results) in iter.by_ref().zip(results) {
                let _ = reply.send(Ok(BatchResult { results }));
            }
            let leftover: Vec<Pending> = iter.collect();
            debug_assert!(leftover.is_empty() || n > 0);
            leftover
        }
        Err(e) => {
            // The transaction is gone but the tree may hold some of the
            // group's effects: recover them now, as at start-up.
            tracing::error!(error = %e, "applying a reintegration group failed; recovering its intent");
            if let Err(e2) = recover(shared) {
                tracing::error!(error = %e2, "recovering the intent failed; it will be retried at start-up");
            }
            let err = ApiError::from(e);
            for (_, reply) in batches {
                let _ = reply.send(Err(err.clone()));
            }
            Vec::new()
        }
    }
}

fn unreachable_not_applied() {
    tracing::error!("live apply answered not-applied; treated as a stop");
}

/// Finishes or rolls back the intents a crash left (see the module docs).
pub fn recover(shared: &Shared) -> Result<(), OriginError> {
    let intents = shared.store.read()?.intents()?;
    for (n, body) in intents {
        let groups: Vec<Vec<KeyedOp>> = match serde_json::from_slice(&body) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(intent = n, error = %e, "dropping an unreadable intent");
                Vec::new()
            }
        };
        let adopted = transact(shared, |cx| {
            let mut adopted = 0usize;
            'all: for ops in &groups {
                for op in ops {
                    match reintegrate::apply(cx, op, Mode::Recover)? {
                        Outcome::Done(OpResult::Applied { .. }) => adopted += 1,
                        Outcome::Done(OpResult::Replayed { .. }) => {}
                        Outcome::Done(_) => break,
                        Outcome::FsFailed(_) | Outcome::NotApplied => break 'all,
                    }
                }
            }
            cx.tx.drop_intent(n)?;
            Ok(adopted)
        })?;
        tracing::info!(
            intent = n,
            adopted,
            "recovered an interrupted reintegration"
        );
    }
    Ok(())
}
