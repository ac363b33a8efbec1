//! The single writer: every change to the metadata store and every change
//! the origin makes to the tree goes through one thread, which groups the
//! jobs waiting at the moment into one durable redb commit (group commit).
//!
//! A group of reintegration batches runs as:
//! 1. an **intent** holding the group's operations, committed durably;
//! 2. one or more **segments**: operations applied to the tree one after
//!    the other, their metadata, journal records and idempotency keys
//!    written in one transaction with the intent's progress (or, for the
//!    last segment, the intent dropped), touched directories fsynced, the
//!    commit made durable. A segment ends where an operation touches what
//!    the segment already touched (see `Segment`), so usually a whole
//!    group is one segment. Only after the last commit are the HTTP
//!    answers sent and journal readers woken.
//!
//! If the process dies with an intent left, [`recover`] resumes it at
//! start-up from its progress against what the tree shows: each operation
//! whose effect is on disk is recorded (with its key, so a retry is
//! `Replayed`), and the first one whose effect is absent ends the recovery
//! (operations were applied in order by one thread, so nothing after it
//! happened). Inside one segment no operation hides another's effect, so
//! the tree tells exactly. Each object is thus before or after an
//! operation, every applied operation keeps its key, and the journal agrees
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
use crate::wire::{ApiError, BatchResult, KeyedOp, Kind, ObjRef, ObjectId, Op, OpResult};

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
    let (out, appended, linked) = {
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
        (out, cx.tx.appended, cx.tx.linked.take())
    };
    let last = if appended > 0 {
        Some(Tx::new(&txn).counter("last_seq")?)
    } else {
        None
    };
    shared.store.commit(txn)?;
    shared
        .recent_links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .note(linked);
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
        let whole_tree = dirty.full;
        if !dirty.is_empty()
            && let Err(e) = transact(&shared, |cx| scan::reconcile(cx, dirty))
        {
            // What the narrow compare could not settle, the whole tree's
            // may: the paths it was given are not dropped.
            if whole_tree {
                tracing::error!(error = %e, "reconciling external changes failed");
            } else if let Err(e2) = transact(&shared, |cx| scan::reconcile(cx, Dirty::full())) {
                tracing::error!(
                    error = %e,
                    whole_tree = %e2,
                    "reconciling external changes failed, and so did comparing the whole tree"
                );
            } else {
                tracing::warn!(error = %e, "reconciling external changes failed; the whole tree was compared instead");
            }
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

/// Where a group stands: the next operation to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    batch: usize,
    op: usize,
}

impl Position {
    fn encode(self) -> u64 {
        (self.batch as u64) << 32 | self.op as u64
    }

    fn decode(v: u64) -> Self {
        Self {
            batch: (v >> 32) as usize,
            op: (v & 0xffff_ffff) as usize,
        }
    }

    fn next_batch(self) -> Self {
        Self {
            batch: self.batch + 1,
            op: 0,
        }
    }
}

/// Applies a group of batches: an intent, then one commit per segment (see
/// [`Segment`]); returns the batches not tried because an earlier
/// operation failed on the disk.
fn run_batches(shared: &Shared, batches: Vec<Pending>) -> Vec<Pending> {
    let all: Vec<&Vec<KeyedOp>> = batches.iter().map(|(ops, _)| ops).collect();
    let _in_use = UploadsInUse::claim(shared, all.iter().flat_map(|ops| ops.iter()));
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
    let mut results: Vec<Vec<OpResult>> = vec![Vec::new(); batches.len()];
    let mut at = Position { batch: 0, op: 0 };
    // Batches tried (all of them unless the disk failed one).
    let mut tried = batches.len();
    loop {
        let segment = transact(shared, |cx| {
            let mut segment = Segment::default();
            let mut out: Vec<(usize, OpResult)> = Vec::new();
            let mut pos = at;
            while let Some((ops, _)) = batches.get(pos.batch) {
                let Some(op) = ops.get(pos.op) else {
                    pos = pos.next_batch();
                    continue;
                };
                if !segment.admits(cx, op)? {
                    cx.tx.set_intent_progress(intent, pos.encode())?;
                    return Ok((out, Some(pos), None));
                }
                match reintegrate::apply(cx, op, Mode::Live)? {
                    Outcome::Done(r) => {
                        let go_on =
                            matches!(r, OpResult::Applied { .. } | OpResult::Replayed { .. });
                        segment.applied(op, &r);
                        out.push((pos.batch, r));
                        pos = if go_on {
                            Position {
                                op: pos.op + 1,
                                ..pos
                            }
                        } else {
                            pos.next_batch()
                        };
                    }
                    Outcome::FsFailed(r) => {
                        out.push((pos.batch, r));
                        cx.tx.drop_intent(intent)?;
                        return Ok((out, None, Some(pos.batch + 1)));
                    }
                    Outcome::NotApplied => {
                        unreachable_not_applied();
                        pos = pos.next_batch();
                    }
                }
            }
            cx.tx.drop_intent(intent)?;
            Ok((out, None, None))
        });
        match segment {
            Ok((out, next, stopped)) => {
                for (batch, r) in out {
                    results[batch].push(r);
                }
                if let Some(n) = stopped {
                    tried = n;
                }
                match next {
                    Some(pos) => at = pos,
                    None => break,
                }
            }
            Err(e) => {
                // The transaction is gone but the tree may hold some of its
                // effects: recover them now, as at start-up.
                tracing::error!(error = %e, "applying a reintegration group failed; recovering its intent");
                if let Err(e2) = recover(shared) {
                    tracing::error!(error = %e2, "recovering the intent failed; it will be retried at start-up");
                }
                let err = ApiError::from(e);
                for (_, reply) in batches {
                    let _ = reply.send(Err(err.clone()));
                }
                return Vec::new();
            }
        }
    }
    let mut iter = batches.into_iter();
    for ((_, reply), results) in iter.by_ref().take(tried).zip(results) {
        let _ = reply.send(Ok(BatchResult { results }));
    }
    iter.collect()
}

/// The staged uploads a group's operations install, held from before its
/// intent until its last commit: an upload sent again meanwhile (a gateway
/// restarted while the origin still applies its batch sends the batch's
/// uploads again) leaves the staged file as it is. Replaced, or made anew
/// after the install took it, it would make recovery from a crash in the
/// group take an installed upload for one never installed, and everything
/// after it for changes of someone else's.
struct UploadsInUse<'a> {
    shared: &'a Shared,
    ids: Vec<String>,
}

impl<'a> UploadsInUse<'a> {
    fn claim<'o>(shared: &'a Shared, ops: impl Iterator<Item = &'o KeyedOp>) -> Self {
        let ids: Vec<String> = ops
            .filter_map(|kop| match &kop.op {
                Op::Write { upload, .. } => Some(upload.clone()),
                Op::Create {
                    object: crate::wire::NewObject::File { upload: Some(u) },
                    ..
                } => Some(u.clone()),
                _ => None,
            })
            .collect();
        let mut in_use = shared
            .uploads_in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        in_use.extend(ids.iter().cloned());
        Self { shared, ids }
    }
}

impl Drop for UploadsInUse<'_> {
    fn drop(&mut self) {
        let mut in_use = self
            .shared
            .uploads_in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for id in &self.ids {
            in_use.remove(id);
        }
    }
}

/// Operations committed together, cut so that recovery can tell exactly
/// which of them reached the disk.
///
/// Recovery looks for each operation's effect in the tree as it is after
/// the crash. That is exact only if no later operation of the same commit
/// touched the same names or objects (a create then a rename of the new
/// file leaves no file at the created name), nor moved or removed a
/// directory above them. So an operation that touches a name or an object
/// the segment already touched, or that moves or removes a directory,
/// starts a new segment (and a new durable commit). A burst of creates, or
/// of writes to different files, stays one commit.
#[derive(Default)]
struct Segment {
    len: usize,
    objects: std::collections::HashSet<Token>,
    names: std::collections::HashSet<(Token, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Token {
    Id(ObjectId),
    /// An object created in this group whose id is not known yet.
    Created(String),
}

impl Segment {
    /// Whether `op` may join the segment; if so, it is counted in.
    fn admits(&mut self, cx: &WCtx<'_>, kop: &KeyedOp) -> Result<bool, OriginError> {
        let token = |r: &ObjRef| -> Result<Token, OriginError> {
            Ok(match r {
                ObjRef::Id(id) => Token::Id(*id),
                ObjRef::Created(key) => match cx.tx.key(key)? {
                    Some(k) => Token::Id(k.attr.id),
                    None => Token::Created(key.clone()),
                },
            })
        };
        let is_dir = |t: &Token| -> Result<bool, OriginError> {
            Ok(match t {
                Token::Id(id) => cx.tx.meta(*id)?.is_some_and(|m| m.attr.kind == Kind::Dir),
                Token::Created(_) => true,
            })
        };
        let mut objects = Vec::new();
        let mut names = Vec::new();
        let mut moves_dir = false;
        match &kop.op {
            Op::Create { parent, name, .. } => names.push((token(parent)?, name.clone())),
            Op::Write { id, .. } | Op::SetAttr { id, .. } => objects.push(token(id)?),
            Op::Remove {
                parent, name, id, ..
            } => {
                let t = token(id)?;
                moves_dir = is_dir(&t)?;
                objects.push(t);
                names.push((token(parent)?, name.clone()));
            }
            Op::Rename {
                from_parent,
                from_name,
                id,
                to_parent,
                to_name,
                replace,
                ..
            } => {
                let t = token(id)?;
                moves_dir = is_dir(&t)?;
                objects.push(t);
                if let Some((r, _)) = replace {
                    objects.push(token(r)?);
                }
                names.push((token(from_parent)?, from_name.clone()));
                names.push((token(to_parent)?, to_name.clone()));
            }
        }
        let clash = moves_dir
            || objects.iter().any(|o| self.objects.contains(o))
            || names.iter().any(|n| self.names.contains(n));
        if clash && self.len > 0 {
            return Ok(false);
        }
        self.len += 1;
        self.objects.extend(objects);
        self.names.extend(names);
        Ok(true)
    }

    /// Notes what an applied operation created.
    fn applied(&mut self, kop: &KeyedOp, result: &OpResult) {
        if let (Op::Create { .. }, OpResult::Applied { attr, .. }) = (&kop.op, result) {
            self.objects.insert(Token::Id(attr.id));
            self.objects.insert(Token::Created(kop.key.clone()));
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
            // Operations before this position were committed already.
            let from = Position::decode(cx.tx.intent_progress(n)?);
            'all: for (b, ops) in groups.iter().enumerate().skip(from.batch) {
                let first = if b == from.batch { from.op } else { 0 };
                for op in ops.iter().skip(first) {
                    match reintegrate::apply(cx, op, Mode::Recover)? {
                        Outcome::Done(OpResult::Applied { .. }) => adopted += 1,
                        Outcome::Done(OpResult::Replayed { .. }) => {}
                        Outcome::Done(other) => {
                            tracing::info!(key = %op.key, op = ?op.op, result = ?other, "recovery: the batch had stopped here");
                            break;
                        }
                        Outcome::FsFailed(_) | Outcome::NotApplied => {
                            tracing::info!(key = %op.key, op = ?op.op, "recovery: not on disk; the group had stopped here");
                            break 'all;
                        }
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
