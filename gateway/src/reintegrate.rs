//! The reintegrator: ships the client modification log to the origin, in
//! order, in batches, and settles what the origin refuses.
//!
//! A round takes the oldest records that have aged (a record waits
//! [`Settings::aging`] after it was logged, and a file's content waits that
//! long after its last write, so a burst of writes travels once), uploads
//! the content their stores need (streamed from the cache), sends the batch
//! and, in one durable transaction, records what the origin applied: new
//! origin ids and versions, and the records that are done.
//!
//! Every operation carries a key made of this gateway's id and the record's
//! sequence number, so sending a batch again after any crash is harmless:
//! the origin answers what it answered the first time.
//!
//! The origin stops a batch at the first operation it does not apply; a
//! conflict goes to [`crate::conflict`], which resolves it by the policy and
//! rewrites the log so that the next round can go on.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FusedStream;
use futures::{FutureExt, StreamExt};
use imz_cache::chunk;
use imz_cache::{FileId, Kind, LogOp, LogRecord, Object, OriginRef, meta};
use imz_origin::wire::{self, Base, KeyedOp, NewObject, ObjRef, Op, OpResult};
use tokio::sync::watch;

use crate::conflict::{self, ConflictPolicy};
use crate::metrics::Metrics;
use crate::origin_client::OriginError;
use crate::vfs::{Vfs, VfsError};
use imz_origin::test_hold::TestHold;

/// How the reintegrator behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a change waits before it is shipped.
    pub aging: Duration,
    pub policy: ConflictPolicy,
    /// Most operations per batch.
    pub max_ops: usize,
    /// Most bytes uploaded for one batch (a bigger file travels alone).
    pub max_upload_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            aging: Duration::from_secs(1),
            policy: ConflictPolicy::KeepBoth,
            max_ops: 1000,
            max_upload_bytes: 256 << 20,
        }
    }
}

/// What the reintegrator has done, for `imz status` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Records waiting in the log.
    pub pending: u64,
    /// Operations the origin applied so far (this run).
    pub shipped_ops: u64,
    /// Content bytes uploaded so far (this run).
    pub shipped_bytes: u64,
    /// Conflicts met so far (this run).
    pub conflicts: u64,
    pub last_error: Option<String>,
}

/// What one round achieved.
enum Round {
    /// The log is empty (or all of it is held).
    Idle,
    /// Something will be ready to ship after this long.
    Wait(Duration),
    /// A batch went out; go again.
    Shipped,
}

pub struct Reintegrator {
    vfs: Arc<Vfs>,
    gateway_id: String,
    settings: Settings,
    progress: watch::Sender<Progress>,
    /// Records logged at or before this time ship whatever their age
    /// (`imz sync`).
    hurry: watch::Receiver<i64>,
    /// How often each record was refused: a settlement that does not stick
    /// must not loop forever.
    refusals: HashMap<u64, u32>,
}

/// Uploads of one batch sent at once.
const UPLOADS_IN_FLIGHT: usize = 8;

/// Operations per `POST /v1/reintegrate` within a batch (see
/// [`Reintegrator::ship`]).
const PART_OPS: usize = 128;

/// `IMZ_TEST_PLAN_HOLD`: holds a planned batch before its records are
/// marked shipped, while a test changes what it planned to ship.
static PLAN_HOLD: TestHold = TestHold::new("IMZ_TEST_PLAN_HOLD");

/// Refusals of one record after which it is held for a person.
const MAX_REFUSALS: u32 = 3;

/// How soon an idle reintegrator looks again at objects marked to be
/// placed as at the origin that it could not place yet.
const RESYNC_RETRY: Duration = Duration::from_millis(250);

/// What to record when an operation is applied.
#[derive(Debug, Clone)]
enum Done {
    Create {
        seq: u64,
        fid: FileId,
        /// A store shipped inside the create, and whether it had been
        /// shipped (inside this create) before this round.
        store: Option<(u64, bool)>,
    },
    Store {
        seq: u64,
        fid: FileId,
    },
    SetAttr {
        seq: u64,
        fid: FileId,
    },
    Remove {
        seq: u64,
        fid: FileId,
    },
    Rename {
        seq: u64,
        fid: FileId,
    },
}

impl Done {
    fn seq(&self) -> u64 {
        match self {
            Self::Create { seq, .. }
            | Self::Store { seq, .. }
            | Self::SetAttr { seq, .. }
            | Self::Remove { seq, .. }
            | Self::Rename { seq, .. } => *seq,
        }
    }
}

/// One file's content, uploaded under `id` for operation `op` of a plan.
#[derive(Debug, Clone)]
struct Upload {
    id: String,
    fid: FileId,
    /// The file's size and mtime when planned: what is uploaded and sent.
    size: u64,
    mtime: i64,
    /// Index in [`Plan::ops`] of the operation that installs it.
    op: usize,
}

/// How the uploads of a batch's parts stand (see [`Reintegrator::ship`]).
struct PartUploads {
    /// Per part: uploads not finished yet.
    waiting: Vec<usize>,
    /// Per part: bytes uploaded.
    uploaded: Vec<u64>,
    /// The first upload that failed: nothing after it is sent.
    failed: Option<OriginError>,
}

impl PartUploads {
    /// `parts` parts, with an upload for each part named by `uploads`.
    fn new(parts: usize, uploads: impl Iterator<Item = usize>) -> Self {
        let mut waiting = vec![0; parts];
        for part in uploads {
            waiting[part] += 1;
        }
        Self {
            waiting,
            uploaded: vec![0; parts],
            failed: None,
        }
    }

    /// Takes in an upload's outcome: its part and bytes, or its failure.
    fn note(&mut self, done: Option<Result<(usize, u64), OriginError>>) {
        match done {
            Some(Ok((part, n))) => {
                self.waiting[part] -= 1;
                self.uploaded[part] += n;
            }
            Some(Err(e)) => {
                self.failed.get_or_insert(e);
            }
            None => {}
        }
    }
}

/// A batch ready to send.
struct Plan {
    ops: Vec<KeyedOp>,
    done: Vec<Done>,
    /// Records in the batch (frozen while it is out).
    seqs: Vec<u64>,
    /// Content to upload before the operation that installs it is sent.
    uploads: Vec<Upload>,
    /// The log records, by sequence number, for conflict handling.
    records: HashMap<u64, LogRecord>,
    /// The records' bytes as planned (every seq in `seqs`).
    raw: HashMap<u64, Vec<u8>>,
}

impl Reintegrator {
    pub fn new(
        vfs: Arc<Vfs>,
        gateway_id: String,
        settings: Settings,
        progress: watch::Sender<Progress>,
        hurry: watch::Receiver<i64>,
    ) -> Self {
        Self {
            vfs,
            gateway_id,
            settings,
            progress,
            hurry,
            refusals: HashMap::new(),
        }
    }

    fn key(&self, seq: u64) -> String {
        format!("{}-{seq}", self.gateway_id)
    }

    pub async fn run(mut self) {
        loop {
            self.vfs.link.wait_up().await;
            let outcome = self.round().await;
            self.note_pending();
            match outcome {
                Ok(Round::Shipped) => {}
                Ok(Round::Idle) => {
                    // Objects still marked to be placed (their log was not
                    // done with them when this round looked, or a listing
                    // marked them since) are looked at again shortly.
                    let placing = crate::resync::pending(&self.vfs).unwrap_or(false);
                    let retry = async {
                        if placing {
                            tokio::time::sleep(RESYNC_RETRY).await;
                        } else {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        _ = self.vfs.log_changed.notified() => {}
                        _ = self.hurry.changed() => {}
                        _ = retry => {}
                    }
                }
                Ok(Round::Wait(d)) => {
                    // Not woken by new records: they are younger than the
                    // one being waited for, so none can be ready sooner, and
                    // planning again on every client write costs a log scan.
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = self.hurry.changed() => {}
                    }
                }
                Err(e) => {
                    if let VfsError::Offline = e {
                        tracing::info!("reintegration paused: origin unreachable");
                    } else {
                        tracing::warn!(error = %e, "reintegration round failed; retrying");
                    }
                    self.progress
                        .send_modify(|p| p.last_error = Some(e.to_string()));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn note_pending(&self) {
        if let Ok(n) = self.vfs.cache.read().and_then(|rx| rx.log_len()) {
            self.progress.send_modify(|p| p.pending = n);
        }
    }

    async fn round(&mut self) -> Result<Round, VfsError> {
        // A threshold, not a one-shot flag: every round until those records
        // are gone ships them, however many batches that takes.
        let hurried_until = *self.hurry.borrow_and_update();
        match crate::resync::run(&self.vfs).await {
            Ok(()) => {}
            Err(VfsError::Offline) => return Err(VfsError::Offline),
            // The log goes on; the marks wait for the next round.
            Err(e) => tracing::warn!(error = %e, "placing objects a conflict touched failed"),
        }
        let plan = match self.plan(hurried_until)? {
            Ok(plan) => plan,
            Err(round) => return Ok(round),
        };
        PLAN_HOLD.wait().await;
        // Before anything leaves, mark the records shipped (durably): from
        // now on the origin may have them, so they must not change, and a
        // later change to their files logs a record of its own. If one
        // changed since it was planned, plan again; so too if a file to
        // upload did: a write or a size change to a file whose store is
        // pending rewrites no record (the store carries the file as it is
        // when shipped), but the plan has read the size and mtime to send.
        let marks: Vec<(u64, Vec<u8>)> = plan
            .seqs
            .iter()
            .filter_map(|s| plan.raw.get(s).map(|b| (*s, b.clone())))
            .collect();
        let uploads: Vec<(FileId, u64, i64)> = plan
            .uploads
            .iter()
            .map(|u| (u.fid, u.size, u.mtime))
            .collect();
        let unchanged = self
            .vfs
            .writer
            .run(0, move |tx| {
                for (fid, size, mtime) in &uploads {
                    let now = tx.get(*fid)?.map(|o| (o.attrs.size, o.attrs.mtime));
                    if now != Some((*size, *mtime)) {
                        return Ok(false);
                    }
                }
                for (seq, bytes) in &marks {
                    if !tx
                        .log_mark_shipped(*seq, bytes)
                        .map_err(|e| VfsError::Io(e.to_string()))?
                    {
                        return Ok(false);
                    }
                }
                Ok(true)
            })
            .await?;
        if !unchanged {
            return Ok(Round::Shipped);
        }
        if let Some((seq, result)) = self.ship(&plan).await? {
            let record = plan
                .records
                .get(&seq)
                .ok_or_else(|| VfsError::Io("planned record missing".into()))?;
            self.progress.send_modify(|p| p.conflicts += 1);
            Metrics::add(&self.vfs.metrics.conflicts, 1);
            let refusals = self.refusals.entry(seq).or_insert(0);
            *refusals += 1;
            let policy = if *refusals > MAX_REFUSALS {
                tracing::error!(seq, op = ?record.op, "refused again after being settled; holding it for a person");
                ConflictPolicy::Manual
            } else {
                self.settings.policy
            };
            if self.refusals.len() > 10_000 {
                self.refusals.clear();
            }
            conflict::settle(&self.vfs, &self.gateway_id, policy, seq, record, &result).await?;
        }
        Ok(Round::Shipped)
    }

    /// Picks the records to ship and turns them into operations.
    fn plan(&self, hurried_until: i64) -> Result<Result<Plan, Round>, VfsError> {
        let rx = self.vfs.cache.read()?;
        let raw = rx.log_records(0, self.settings.max_ops)?;
        if raw.is_empty() {
            return Ok(Err(Round::Idle));
        }
        let held = conflict::held_objects(&self.vfs.cache)?;
        let now = now_nanos();
        let aging = self.settings.aging;
        let touched = self
            .vfs
            .touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();

        let mut plan = Plan {
            ops: Vec::new(),
            done: Vec::new(),
            seqs: Vec::new(),
            uploads: Vec::new(),
            records: HashMap::new(),
            raw: HashMap::new(),
        };
        // Objects whose records are held back this round (held by a
        // conflict awaiting a person, or after such a record).
        let mut blocked: HashSet<FileId> = held;
        let mut created_key: HashMap<FileId, String> = HashMap::new();
        let mut last_key: HashMap<FileId, String> = HashMap::new();
        let mut merged_stores: HashSet<u64> = HashSet::new();
        let mut upload_bytes = 0u64;
        let mut wait: Option<Duration> = None;

        for (seq, bytes) in raw {
            let record = imz_cache::log::decode(&bytes)?;
            let op = &record.op;
            let mentioned: Vec<FileId> = std::iter::once(op.primary()).chain(op.others()).collect();
            if mentioned.iter().any(|f| blocked.contains(f)) {
                blocked.insert(op.primary());
                continue;
            }
            if merged_stores.contains(&seq) {
                continue;
            }
            // Aging: the record, and for content the last write to it.
            if record.time > hurried_until {
                let age = Duration::from_nanos(u64::try_from(now - record.time).unwrap_or(0));
                let mut left = aging.saturating_sub(age);
                if let LogOp::Store { fid } | LogOp::Create { fid, .. } = op
                    && let Some(t) = touched.get(fid)
                {
                    left = left.max(aging.saturating_sub(t.elapsed()));
                }
                if !left.is_zero() {
                    wait = Some(left);
                    break;
                }
            }
            let key = self.key(seq);
            let obj_of =
                |fid: FileId| -> Result<Object, VfsError> { rx.get(fid)?.ok_or(VfsError::Stale) };
            let refer =
                |fid: FileId, obj: &Object, created: &HashMap<FileId, String>| -> Option<ObjRef> {
                    match obj.origin {
                        Some(o) => Some(ObjRef::Id(o.id)),
                        None => created.get(&fid).map(|k| ObjRef::Created(k.clone())),
                    }
                };
            let base = |fid: FileId, obj: &Object, last: &HashMap<FileId, String>| -> Base {
                match last.get(&fid) {
                    Some(k) => Base::After(k.clone()),
                    None => Base::Version(obj.origin.map_or(0, |o| o.version)),
                }
            };
            let unresolvable = |what: &str| {
                tracing::error!(
                    seq,
                    what,
                    op = ?record.op,
                    "log record refers to an object the origin cannot know yet; holding it"
                );
            };

            let (wire_op, done) = match op {
                LogOp::Create {
                    parent,
                    name,
                    fid,
                    kind,
                } => {
                    let pobj = obj_of(*parent)?;
                    let obj = obj_of(*fid)?;
                    let Some(parent_ref) = refer(*parent, &pobj, &created_key) else {
                        unresolvable("parent");
                        blocked.insert(*fid);
                        continue;
                    };
                    let mut store = None;
                    let object = match kind {
                        Kind::Dir => NewObject::Dir,
                        Kind::Symlink => NewObject::Symlink {
                            target: obj.target.clone().unwrap_or_default(),
                        },
                        Kind::File => {
                            // Ship the content with the create when its store
                            // is in this batch. A create sent before goes
                            // again exactly as it went: with the store it
                            // carried then (shipped with it, so the file's
                            // oldest shipped store), not a newer one, or the
                            // origin would answer the create as a replay
                            // and the older store would travel alone, based
                            // on a version the origin has since moved past.
                            let merge = if record.shipped {
                                first_shipped_store(&rx, &obj.log.ops, seq)?
                            } else {
                                obj.log.store
                            };
                            let upload = match merge {
                                Some(s)
                                    if record.shipped
                                        || upload_bytes + obj.attrs.size
                                            <= self.settings.max_upload_bytes
                                        || upload_bytes == 0 =>
                                {
                                    merged_stores.insert(s);
                                    let before = match rx.log_bytes(s)? {
                                        Some(b) => {
                                            let shipped = imz_cache::log::decode(&b)?.shipped;
                                            plan.raw.insert(s, b);
                                            shipped
                                        }
                                        None => false,
                                    };
                                    store = Some((s, before));
                                    upload_bytes += obj.attrs.size;
                                    let id = format!("{}-{s}", self.gateway_id);
                                    plan.uploads.push(Upload {
                                        id: id.clone(),
                                        fid: *fid,
                                        size: obj.attrs.size,
                                        mtime: obj.attrs.mtime,
                                        op: plan.ops.len(),
                                    });
                                    Some(id)
                                }
                                _ => None,
                            };
                            NewObject::File { upload }
                        }
                    };
                    created_key.insert(*fid, key.clone());
                    (
                        Op::Create {
                            parent: parent_ref,
                            name: name.clone(),
                            object,
                            attrs: wire::SetAttrs {
                                mode: Some(obj.attrs.mode),
                                uid: Some(obj.attrs.uid),
                                gid: Some(obj.attrs.gid),
                                size: None,
                                atime: Some(obj.attrs.atime),
                                mtime: Some(obj.attrs.mtime),
                            },
                        },
                        Done::Create {
                            seq,
                            fid: *fid,
                            store,
                        },
                    )
                }
                LogOp::Store { fid } => {
                    let obj = obj_of(*fid)?;
                    let Some(id) = refer(*fid, &obj, &created_key) else {
                        unresolvable("file");
                        blocked.insert(*fid);
                        continue;
                    };
                    if upload_bytes > 0
                        && upload_bytes + obj.attrs.size > self.settings.max_upload_bytes
                    {
                        break;
                    }
                    upload_bytes += obj.attrs.size;
                    plan.uploads.push(Upload {
                        id: key.clone(),
                        fid: *fid,
                        size: obj.attrs.size,
                        mtime: obj.attrs.mtime,
                        op: plan.ops.len(),
                    });
                    (
                        Op::Write {
                            id,
                            base: base(*fid, &obj, &last_key),
                            upload: key.clone(),
                            mtime: Some(obj.attrs.mtime),
                        },
                        Done::Store { seq, fid: *fid },
                    )
                }
                LogOp::SetAttr { fid, set } => {
                    let obj = obj_of(*fid)?;
                    let Some(id) = refer(*fid, &obj, &created_key) else {
                        unresolvable("object");
                        blocked.insert(*fid);
                        continue;
                    };
                    (
                        Op::SetAttr {
                            id,
                            base: base(*fid, &obj, &last_key),
                            attrs: wire::SetAttrs {
                                mode: set.mode,
                                uid: set.uid,
                                gid: set.gid,
                                size: set.size,
                                atime: set.atime,
                                mtime: set.mtime,
                            },
                        },
                        Done::SetAttr { seq, fid: *fid },
                    )
                }
                LogOp::Remove { parent, name, fid } => {
                    let pobj = obj_of(*parent)?;
                    let obj = obj_of(*fid)?;
                    let (Some(parent_ref), Some(id)) = (
                        refer(*parent, &pobj, &created_key),
                        refer(*fid, &obj, &created_key),
                    ) else {
                        unresolvable("removed object");
                        blocked.insert(*fid);
                        continue;
                    };
                    (
                        Op::Remove {
                            parent: parent_ref,
                            name: name.clone(),
                            id,
                            base: base(*fid, &obj, &last_key),
                        },
                        Done::Remove { seq, fid: *fid },
                    )
                }
                LogOp::Rename {
                    from_parent,
                    from_name,
                    fid,
                    to_parent,
                    to_name,
                    replaced,
                } => {
                    let obj = obj_of(*fid)?;
                    let fp = obj_of(*from_parent)?;
                    let tp = obj_of(*to_parent)?;
                    let refs = (
                        refer(*fid, &obj, &created_key),
                        refer(*from_parent, &fp, &created_key),
                        refer(*to_parent, &tp, &created_key),
                    );
                    let (Some(id), Some(from_ref), Some(to_ref)) = refs else {
                        unresolvable("renamed object");
                        blocked.insert(*fid);
                        continue;
                    };
                    let replace = match replaced {
                        Some(r) => {
                            let robj = obj_of(*r)?;
                            let Some(rref) = refer(*r, &robj, &created_key) else {
                                unresolvable("replaced object");
                                blocked.insert(*fid);
                                continue;
                            };
                            Some((rref, base(*r, &robj, &last_key)))
                        }
                        None => None,
                    };
                    (
                        Op::Rename {
                            from_parent: from_ref,
                            from_name: from_name.clone(),
                            id,
                            base: base(*fid, &obj, &last_key),
                            to_parent: to_ref,
                            to_name: to_name.clone(),
                            replace,
                        },
                        Done::Rename { seq, fid: *fid },
                    )
                }
            };
            last_key.insert(op.primary(), key.clone());
            if let Done::Create {
                store: Some((s, _)),
                ..
            } = &done
            {
                plan.seqs.push(*s);
            }
            plan.seqs.push(seq);
            plan.ops.push(KeyedOp { key, op: wire_op });
            plan.done.push(done);
            plan.records.insert(seq, record);
            plan.raw.insert(seq, bytes);
        }
        if plan.ops.is_empty() {
            return Ok(Err(wait.map_or(Round::Idle, Round::Wait)));
        }
        Ok(Ok(plan))
    }

    /// Uploads content, sends the batch, records what was applied. Returns
    /// the first operation the origin refused, with its answer.
    ///
    /// A batch with content goes in parts of [`PART_OPS`] operations. The
    /// uploads run as one stream for the whole batch, in the operations'
    /// order, [`UPLOADS_IN_FLIGHT`] at a time, and a part is sent (and what
    /// the origin applied recorded) as soon as its own uploads are done,
    /// while later parts' go on: the origin applies a part (renames,
    /// attributes, fsyncs) in about the time the next part's uploads take,
    /// and done one after the other the two waits added up, as did each
    /// part's last uploads, which ran with fewer in flight. A part may name
    /// what an earlier part created, by its key: the origin resolves the
    /// keys of earlier batches too. The origin stops at the first operation
    /// it does not apply, and so does this: no later part is sent.
    async fn ship(&self, plan: &Plan) -> Result<Option<(u64, OpResult)>, VfsError> {
        // Without content to upload there is nothing to overlap: one part.
        let part_ops = if plan.uploads.is_empty() {
            plan.ops.len().max(1)
        } else {
            PART_OPS
        };
        let parts: Vec<Range<usize>> = (0..plan.ops.len())
            .step_by(part_ops)
            .map(|start| start..(start + part_ops).min(plan.ops.len()))
            .collect();
        let mut ordered = plan.uploads.clone();
        ordered.sort_by_key(|u| u.op);
        let mut progress = PartUploads::new(parts.len(), ordered.iter().map(|u| u.op / part_ops));
        let mut uploads = futures::stream::iter(ordered.into_iter().map(|u| {
            let part = u.op / part_ops;
            self.upload(u).map(move |sent| sent.map(|n| (part, n)))
        }))
        .buffer_unordered(UPLOADS_IN_FLIGHT)
        .fuse();
        for (i, part) in parts.iter().enumerate() {
            while progress.waiting[i] > 0 && progress.failed.is_none() && !uploads.is_terminated() {
                progress.note(uploads.next().await);
            }
            if let Some(e) = progress.failed.take() {
                return Err(self.vfs.origin_failed(e));
            }
            let (ops, done) = (&plan.ops[part.clone()], &plan.done[part.clone()]);
            let bytes = progress.uploaded[i];
            let started = Instant::now();
            let step = async {
                let answer = self.send(ops).await?;
                for ((op, d), result) in ops.iter().zip(done).zip(&answer.results) {
                    tracing::debug!(seq = d.seq(), op = ?op.op, ?result, "origin answered");
                }
                let n_applied = self.record(done, &answer, bytes).await?;
                Ok::<_, VfsError>((answer, n_applied))
            };
            tokio::pin!(step);
            let (answer, n_applied) = loop {
                tokio::select! {
                    stepped = &mut step => break stepped?,
                    done = uploads.next(), if progress.failed.is_none() && !uploads.is_terminated() => {
                        progress.note(done);
                    }
                }
            };
            tracing::debug!(ops = n_applied, bytes, took = ?started.elapsed(), "reintegrated");
            if n_applied < part.len() {
                return Ok(answer
                    .results
                    .get(n_applied)
                    .map(|result| (done[n_applied].seq(), result.clone())));
            }
        }
        Ok(None)
    }

    /// Records in the cache what the origin applied of these operations
    /// (`done`, answered by `answer`: applied ones first, then at most one
    /// refusal), with `uploaded` bytes of content; how many were applied.
    async fn record(
        &self,
        done: &[Done],
        answer: &wire::BatchResult,
        uploaded: u64,
    ) -> Result<usize, VfsError> {
        let applied: Vec<(Done, wire::Attr)> = answer
            .results
            .iter()
            .zip(done)
            .map_while(|(r, d)| match r {
                OpResult::Applied { attr, .. } | OpResult::Replayed { attr, .. } => {
                    Some((d.clone(), attr.clone()))
                }
                _ => None,
            })
            .collect();
        let replayed: HashSet<u64> = answer
            .results
            .iter()
            .zip(done)
            .filter(|(r, _)| matches!(r, OpResult::Replayed { .. }))
            .map(|(_, d)| d.seq())
            .collect();
        let n_applied = applied.len();
        self.vfs
            .writer
            .run(0, move |tx| {
                for (done, attr) in applied {
                    record_applied(tx, &done, &attr, replayed.contains(&done.seq()))?;
                }
                Ok(())
            })
            .await?;
        Metrics::add(&self.vfs.metrics.reintegrated_ops, n_applied as u64);
        Metrics::add(&self.vfs.metrics.reintegrated_bytes, uploaded);
        self.progress.send_modify(|p| {
            p.shipped_ops += n_applied as u64;
            p.shipped_bytes += uploaded;
            p.last_error = None;
        });
        Ok(n_applied)
    }

    /// Uploads one file's content; the bytes sent. The origin makes each
    /// upload durable, fsyncing the file and its directory, and a small
    /// file is mostly that wait, which overlaps well with others'.
    async fn upload(&self, Upload { id, fid, size, .. }: Upload) -> Result<u64, OriginError> {
        let vfs = &self.vfs;
        // A file written here is wholly in the cache, where a chunk that is
        // absent or empty is a hole: such a file goes as its extents, so a
        // sparse file's holes do not cross the network.
        let local = vfs.getattr(fid).is_ok_and(|o| o.origin_extent == 0);
        let sent = if local && vfs.origin.takes_upload_extents() {
            let body = reqwest::Body::wrap_stream(extents_stream(Arc::clone(vfs), fid, size));
            vfs.origin.upload_extents(&id, body, size).await
        } else {
            let body = reqwest::Body::wrap_stream(content_stream(Arc::clone(vfs), fid, size));
            vfs.origin.upload(&id, body, size).await
        };
        sent.map(|_| size)
    }

    /// Sends these operations as one `POST /v1/reintegrate`.
    async fn send(&self, ops: &[KeyedOp]) -> Result<wire::BatchResult, VfsError> {
        let batch = wire::Batch { ops: ops.to_vec() };
        match self.vfs.origin.reintegrate(&batch).await {
            Ok(answer) => Ok(answer),
            Err(OriginError::Api(api)) => {
                Err(VfsError::Io(format!("origin refused the batch: {api}")))
            }
            Err(e) => Err(self.vfs.origin_failed(e)),
        }
    }
}

/// Records in the cache that the origin applied `done`, whose result is
/// `attr` (the object after the operation).
fn record_applied(
    tx: &mut imz_cache::WriteTxn<'_>,
    done: &Done,
    attr: &wire::Attr,
    replayed: bool,
) -> Result<(), VfsError> {
    let adopt = |tx: &mut imz_cache::WriteTxn<'_>, fid: FileId| -> Result<(), VfsError> {
        if let Some(mut obj) = tx.get(fid)? {
            obj.origin = Some(OriginRef {
                id: attr.id,
                version: attr.version,
            });
            tx.put(fid, &obj)?;
        }
        Ok(())
    };
    match done {
        Done::Create { seq, fid, store } => {
            adopt(tx, *fid)?;
            tx.log_done(*seq)?;
            // Content shipped with a create counts if the origin applied
            // this create now, or if it already travelled with it before (a
            // replay answers the first sending, which may not have had it).
            if let Some((store_seq, shipped_before)) = store
                && (!replayed || *shipped_before)
            {
                store_done(tx, *fid, *store_seq)?;
            }
        }
        Done::Store { seq, fid } => {
            adopt(tx, *fid)?;
            store_done(tx, *fid, *seq)?;
        }
        Done::SetAttr { seq, fid } | Done::Rename { seq, fid } => {
            adopt(tx, *fid)?;
            tx.log_done(*seq)?;
        }
        Done::Remove { seq, fid } => {
            tx.log_done(*seq)?;
            // Gone at the origin: content or attributes still waiting for it
            // (a store shipped before the removal but not yet answered) no
            // longer matter, and sent after the removal they would bring it
            // back as a conflict.
            if let Some(obj) = tx.get(*fid)? {
                for pending in obj.log.ops.clone() {
                    if matches!(
                        tx.log_record(pending)?.map(|r| r.op),
                        Some(LogOp::Store { .. } | LogOp::SetAttr { .. })
                    ) {
                        tx.log_done(pending)?;
                    }
                }
            }
        }
    }
    match done {
        Done::Create { fid, .. }
        | Done::Store { fid, .. }
        | Done::SetAttr { fid, .. }
        | Done::Rename { fid, .. } => settle_extent(tx, *fid),
        Done::Remove { .. } => Ok(()),
    }
}

/// The content uploaded for store `seq` is at the origin. (Writes made
/// since it was shipped went into a newer store record.)
fn store_done(tx: &mut imz_cache::WriteTxn<'_>, _fid: FileId, seq: u64) -> Result<(), VfsError> {
    tx.log_done(seq)?;
    Ok(())
}

/// Once nothing about a file is left to send, the origin holds exactly its
/// content: every byte may be fetched again from there (its chunks become
/// evictable). Until then, bytes not cached below `origin_extent` are the
/// ones every upload so far carried unchanged, so the extent must not grow.
fn settle_extent(tx: &mut imz_cache::WriteTxn<'_>, fid: FileId) -> Result<(), VfsError> {
    if let Some(mut obj) = tx.get(fid)?
        && obj.kind == Kind::File
        && obj.log.ops.is_empty()
        && obj.origin_extent != obj.attrs.size
    {
        obj.origin_extent = obj.attrs.size;
        tx.put(fid, &obj)?;
    }
    Ok(())
}

/// The bytes of file `fid` as the cache has them now (missing origin bytes
/// are fetched), `size` long, streamed in 1 MiB pieces.
/// The oldest shipped store record among `ops` (an object's pending
/// records, oldest first) after `after`.
fn first_shipped_store(
    rx: &imz_cache::ReadTxn,
    ops: &[u64],
    after: u64,
) -> Result<Option<u64>, VfsError> {
    for &s in ops.iter().filter(|s| **s > after) {
        if let Some(record) = rx.log_record(s)?
            && record.shipped
            && matches!(record.op, LogOp::Store { .. })
        {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

fn content_stream(
    vfs: Arc<Vfs>,
    fid: FileId,
    size: u64,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold(0u64, move |offset| {
        let vfs = Arc::clone(&vfs);
        async move {
            if offset >= size {
                return None;
            }
            let want = (size - offset).min(1 << 20) as u32;
            match vfs.read(fid, offset, want).await {
                Ok((bytes, _)) if !bytes.is_empty() => {
                    let n = bytes.len() as u64;
                    Some((Ok(Bytes::from(bytes)), offset + n))
                }
                // The file shrank while we read it: pad to the announced
                // length; its newer content travels in a later upload.
                Ok(_) => {
                    let pad = vec![0u8; want as usize];
                    Some((Ok(Bytes::from(pad)), offset + u64::from(want)))
                }
                Err(e) => {
                    tracing::warn!(fid, offset, error = %e, "reading a file's content for its upload failed");
                    Some((Err(std::io::Error::other(e.to_string())), size))
                }
            }
        }
    })
}

/// The upload body of a file wholly in the cache, as extents (see
/// `wire::paths::UPLOAD_SIZE`): one record per stored chunk, none for a
/// hole (a chunk absent, or empty: all zeros). The size was read when the
/// upload was planned; a chunk past it is left out, and one the file lost
/// meanwhile reads as a hole, as `content_stream` pads. A later write
/// travels in a later upload.
fn extents_stream(
    vfs: Arc<Vfs>,
    fid: FileId,
    size: u64,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::iter(0..chunk::count(size))
        .then(move |index| {
            let vfs = Arc::clone(&vfs);
            async move {
                let stored = match vfs.cache.read().and_then(|rx| rx.chunk(fid, index)) {
                    Ok(stored) => stored,
                    Err(e) => {
                        tracing::warn!(fid, index, error = %e, "reading a file's content for its upload failed");
                        return vec![Err(std::io::Error::other(e.to_string()))];
                    }
                };
                let start = chunk::start_of(index);
                let Some(mut bytes) = stored else {
                    return Vec::new();
                };
                bytes.truncate(usize::try_from(size - start).unwrap_or(usize::MAX));
                if bytes.is_empty() {
                    return Vec::new();
                }
                // The head and the chunk as two pieces: no copy of the chunk.
                let head = wire::paths::extent_head(start, bytes.len() as u32);
                vec![
                    Ok(Bytes::copy_from_slice(&head)),
                    Ok(Bytes::from(bytes)),
                ]
            }
        })
        .flat_map(futures::stream::iter)
}

fn now_nanos() -> i64 {
    crate::vfs::write::now_nanos()
}

/// Asks the reintegrator to ship everything logged until now, whatever its
/// age, and to keep doing so until it is gone.
pub fn hurry(sender: &watch::Sender<i64>) {
    let now = now_nanos();
    sender.send_modify(|until| *until = (*until).max(now));
}

/// The gateway's id (prefix of its idempotency keys), created with the cache.
pub fn gateway_id(cache: &imz_cache::Cache) -> Result<String, VfsError> {
    cache
        .read()?
        .meta_str(meta::GATEWAY_ID)?
        .ok_or_else(|| VfsError::Io("the cache has no gateway id".into()))
}
