//! Replication mode, and keeping replicated and pinned content current.
//!
//! `--mode replicate` makes the gateway a full replica, as InterMezzo kept
//! laptops: it folds the origin's manifest (the whole tree as of one
//! journal sequence) into the cache, checks that the files fit the cache
//! (if not, it says so once and stays on demand), fetches every file's
//! content with progress shown, and from then on fetches new content as the
//! journal reports it, so that a gateway cut off from its origin still has
//! everything up to that moment.
//!
//! The [`Keeper`] does all of it, and keeps pinned files current in either
//! mode: the journal follower hands it each batch's changed and new objects
//! ([`AfterApply`]) and waits for their content before it announces the new
//! cursor. What cannot be fetched (the origin is away) is retried when the
//! link returns; a restart re-checks everything kept, fetching only what is
//! missing.
//!
//! **The manifest and the journal.** The manifest reflects the tree at
//! sequence `S`; the cache reflects the journal up to its cursor `C` and,
//! per object, versions that may be newer (from lookups and listings). The
//! follower is held off (the follow gate) while the manifest is folded in,
//! so `C <= S` then. An entry is only applied through
//! [`coherence::upsert_entry`], which never moves a version backwards, and
//! a directory's entries are only taken (and the entries it no longer has
//! forgotten) if the cache does not know a newer version of that directory:
//! a cached version newer than the manifest's means a listing newer than
//! `S` already set its entries. The cursor stays at `C`: the records in
//! `(C, S]` are replayed afterwards and change nothing the manifest already
//! holds, because their sequence numbers are not above the versions it set.

use std::collections::{HashSet, VecDeque};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use imz_cache::{CacheError, FileId, Kind, WriteTxn};
use imz_origin::wire;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, RwLock, watch};

use crate::coherence::{self, Applied, Source};
use crate::fill::{self, Counters};
use crate::follow::AfterApply;
use crate::origin_client::OriginError;
use crate::pin;
use crate::vfs::{Vfs, VfsError};

/// Manifest entries folded per write transaction.
const FOLD_BATCH: usize = 2048;
/// Objects read per page by sweeps.
const SCAN_PAGE: usize = 4096;
/// How often everything kept is checked again, whatever the journal said.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(300);
/// Wait before retrying work that failed with the origin reachable.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Progress log lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// How the gateway fills its cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Fetch what clients use, when they first use it.
    #[default]
    OnDemand,
    /// Fetch the whole tree, then keep it current from the journal.
    Replicate,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OnDemand => "on-demand",
            Self::Replicate => "replicate",
        })
    }
}

/// Where replication stands (`imz status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Not replicating (on-demand mode).
    #[default]
    Off,
    /// Waiting for the origin, to read its manifest.
    Waiting,
    /// Fetching the tree.
    Copying,
    /// Every file is in the cache, kept current from the journal.
    Current,
    /// The tree does not fit the cache: on demand instead.
    Refused,
}

/// What `imz status` shows of replication and of kept (pinned) content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The mode in effect ("on-demand" after a refused replication).
    pub mode: String,
    pub state: ReplicaState,
    /// Files and bytes of the tree, and how many are in the cache.
    pub files_total: u64,
    pub files_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Kept files whose new content could not be fetched yet.
    pub pending: u64,
    /// The journal sequence up to which all kept content has been fetched.
    pub fresh_through: u64,
    pub message: Option<String>,
}

/// Work left for the keeper.
#[derive(Debug, Default)]
struct Pending {
    files: HashSet<FileId>,
    dirs: HashSet<FileId>,
    /// Replicate: read the manifest and fill everything.
    resync: bool,
    /// Check every pinned file.
    sweep_pins: bool,
    /// Count pinned bytes again.
    recount: bool,
}

impl Pending {
    fn is_idle(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty() && !self.resync && !self.sweep_pins
    }
}

/// Keeps replicated and pinned content in the cache (see the module doc).
pub struct Keeper {
    vfs: Arc<Vfs>,
    mode: Mode,
    /// The follower's gate (see [`crate::follow::Hooks::gate`]).
    gate: Arc<RwLock<()>>,
    status: watch::Sender<ReplicaStatus>,
    /// The whole tree is kept (replicate mode, and it fits).
    whole: AtomicBool,
    pending: Mutex<Pending>,
    wake: Notify,
    pinned_bytes: AtomicU64,
}

impl Keeper {
    /// A keeper for `mode`; call [`run`](Self::run) to start it.
    pub fn new(vfs: Arc<Vfs>, mode: Mode, gate: Arc<RwLock<()>>) -> Arc<Self> {
        let status = ReplicaStatus {
            mode: mode.to_string(),
            state: match mode {
                Mode::OnDemand => ReplicaState::Off,
                Mode::Replicate => ReplicaState::Waiting,
            },
            ..Default::default()
        };
        Arc::new(Self {
            vfs,
            mode,
            gate,
            status: watch::Sender::new(status),
            whole: AtomicBool::new(false),
            pending: Mutex::new(Pending {
                resync: mode == Mode::Replicate,
                sweep_pins: true,
                recount: true,
                ..Default::default()
            }),
            wake: Notify::new(),
            pinned_bytes: AtomicU64::new(0),
        })
    }

    /// Replication and pin status, for `imz status`.
    pub fn status(&self) -> watch::Receiver<ReplicaStatus> {
        self.status.subscribe()
    }

    /// Sizes of the pinned files, as last counted.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes.load(Ordering::Relaxed)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files to fetch when the origin allows.
    pub fn retry_later(&self, fids: impl IntoIterator<Item = FileId>) {
        let n = {
            let mut p = self.pending();
            p.files.extend(fids);
            p.files.len() + p.dirs.len()
        };
        self.status.send_modify(|s| s.pending = n as u64);
        self.wake.notify_one();
    }

    /// Counts pinned bytes again, now.
    pub async fn recount_pins(&self) {
        let cache = Arc::clone(&self.vfs.cache);
        match tokio::task::spawn_blocking(move || pin::usage(&cache)).await {
            Ok(Ok(usage)) => self.pinned_bytes.store(usage.pinned, Ordering::Relaxed),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot count pinned bytes"),
            Err(e) => tracing::warn!(error = %e, "cannot count pinned bytes"),
        }
    }

    /// Makes what was fetched durable (fetched data is otherwise committed
    /// lazily: a crash could lose content the gateway said it keeps).
    pub async fn make_durable(&self) {
        let started = Instant::now();
        let result = self
            .vfs
            .blocking(|cache| Ok(cache.write()?.commit(true)?))
            .await;
        match result {
            Ok(()) => tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "fetched content made durable"
            ),
            Err(e) => tracing::warn!(error = %e, "could not make fetched content durable"),
        }
    }

    /// Runs until the gateway stops: replicates (in replicate mode), then
    /// retries what failed, sweeps now and then, and recounts pins.
    pub async fn run(self: Arc<Self>) {
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        loop {
            let recount = std::mem::take(&mut self.pending().recount);
            if recount {
                self.recount_pins().await;
            }
            if self.pending().is_idle() {
                let sleep = tokio::time::sleep_until(next_sweep.into());
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = sleep => {
                        next_sweep = Instant::now() + SWEEP_EVERY;
                        let mut p = self.pending();
                        p.sweep_pins = true;
                        p.recount = true;
                        if self.whole.load(Ordering::Relaxed) {
                            p.resync = true;
                        }
                    }
                }
                continue;
            }
            self.vfs.link.wait_up().await;
            let (resync, sweep_pins, files, dirs) = {
                let mut p = self.pending();
                (
                    std::mem::take(&mut p.resync),
                    std::mem::take(&mut p.sweep_pins),
                    std::mem::take(&mut p.files),
                    std::mem::take(&mut p.dirs),
                )
            };
            let mut ok = true;
            if resync {
                match self.replicate().await {
                    Ok(()) => {}
                    Err(e) => {
                        ok = false;
                        if !matches!(e, PassError::Offline) {
                            tracing::warn!(error = %e, "replication pass failed; will retry");
                        }
                        self.pending().resync = true;
                    }
                }
            }
            if sweep_pins {
                match self.pinned_files().await {
                    Ok(files) => self.pending().files.extend(files),
                    Err(e) => {
                        ok = false;
                        tracing::warn!(error = %e, "cannot sweep pinned files");
                        self.pending().sweep_pins = true;
                    }
                }
            }
            if !files.is_empty() || !dirs.is_empty() {
                ok &= self
                    .keep(files.into_iter().collect(), dirs.into_iter().collect())
                    .await;
            }
            let left = {
                let p = self.pending();
                p.files.len() + p.dirs.len()
            };
            self.status.send_modify(|s| s.pending = left as u64);
            if !ok && self.vfs.link.is_up() {
                // Failed for another reason than the link: do not spin.
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }

    /// Fetches the content of `files` and the subtrees of `dirs` (listing
    /// them; pinning what enters a pinned directory). Leaves what fails in
    /// the pending set; returns whether everything succeeded.
    async fn keep(&self, mut files: Vec<FileId>, dirs: Vec<FileId>) -> bool {
        let mut ok = true;
        for dir in dirs {
            let pinned = self.vfs.getattr(dir).is_ok_and(|d| d.pinned);
            match fill::walk(&self.vfs, dir, true, true).await {
                Ok(tree) => {
                    if pinned {
                        let mut all = tree.dirs.clone();
                        all.extend(tree.files.iter().map(|(f, _)| *f));
                        all.extend(&tree.others);
                        if let Err(e) = pin::set_pinned(&self.vfs, all, true).await {
                            tracing::warn!(error = %e, "cannot pin what entered a pinned directory");
                        }
                        self.pending().recount = true;
                    }
                    files.extend(tree.files.iter().map(|(f, _)| *f));
                }
                Err(VfsError::Stale | VfsError::NotFound) => {}
                Err(e) => {
                    ok = false;
                    if e != VfsError::Offline {
                        tracing::warn!(error = %e, dir, "cannot list a kept directory");
                    }
                    self.pending().dirs.insert(dir);
                }
            }
        }
        if files.is_empty() {
            return ok;
        }
        let counters = Counters::default();
        let report = fill::fill_all(&self.vfs, files, &counters).await;
        if counters.bytes.load(Ordering::Relaxed) > 0 {
            self.make_durable().await;
        }
        for (fid, why) in &report.failed {
            tracing::warn!(fid, error = %why, "cannot fetch the new content of a kept file");
        }
        warn_denied(&self.vfs, &report.denied);
        if !report.is_complete() {
            ok = false;
            let mut p = self.pending();
            p.files.extend(report.offline);
            p.files.extend(report.failed.into_iter().map(|(f, _)| f));
        }
        ok
    }

    /// Pinned files (clean, with origin content) that miss some of it.
    async fn pinned_files(&self) -> Result<Vec<FileId>, VfsError> {
        self.vfs
            .blocking(|cache| {
                let mut out = Vec::new();
                let mut start = 0;
                loop {
                    let rx = cache.read()?;
                    let page = rx.objects_from(start, SCAN_PAGE)?;
                    let Some((last, _)) = page.last() else { break };
                    start = last + 1;
                    for (fid, obj) in page {
                        if obj.pinned
                            && fill::target_of(fid, &obj).is_some()
                            && !rx.missing_chunks(fid, &obj)?.is_empty()
                        {
                            out.push(fid);
                        }
                    }
                }
                Ok(out)
            })
            .await
    }

    /// One replication pass: fold the manifest in, check the size, fill.
    async fn replicate(&self) -> Result<(), PassError> {
        let started = Instant::now();
        if self.status.borrow().state == ReplicaState::Refused {
            return Ok(());
        }
        let summary = {
            // No journal record may land while the tree is folded in.
            let _gate = self.gate.write().await;
            let (header, entries) = self.vfs.origin.manifest().await.map_err(|e| {
                if e.is_unreachable() {
                    self.vfs.link.down(&e.to_string());
                }
                PassError::from(e)
            })?;
            let folding = Instant::now();
            let summary = fold(&self.vfs, header, entries).await?;
            tracing::info!(
                seq = summary.seq,
                files = summary.files,
                ms = folding.elapsed().as_millis() as u64,
                "folded the origin's manifest into the cache"
            );
            summary
        };
        let capacity = self.vfs.cache.usage().capacity;
        if summary.bytes > capacity {
            let message = format!(
                "cannot replicate: the origin's {} files take {} ({} bytes) but the cache holds only {} ({} bytes, --cache-size); staying in on-demand mode",
                summary.files,
                ByteSize(summary.bytes),
                summary.bytes,
                ByteSize(capacity),
                capacity
            );
            tracing::warn!(needed = summary.bytes, capacity, "{message}");
            self.whole.store(false, Ordering::Relaxed);
            self.status.send_modify(|s| {
                s.mode = Mode::OnDemand.to_string();
                s.state = ReplicaState::Refused;
                s.files_total = summary.files;
                s.bytes_total = summary.bytes;
                s.message = Some(message.clone());
            });
            return Ok(());
        }
        self.whole.store(true, Ordering::Relaxed);

        let plan = self
            .vfs
            .blocking(|cache| plan_fill(cache).map_err(VfsError::from))
            .await?;
        let counters = Arc::new(Counters::default());
        let base_files = plan.files_total - plan.todo.len() as u64;
        let base_bytes = plan.bytes_total - plan.bytes_missing;
        self.status.send_modify(|s| {
            s.state = ReplicaState::Copying;
            s.files_total = plan.files_total;
            s.bytes_total = plan.bytes_total;
            s.files_done = base_files;
            s.bytes_done = base_bytes;
            s.message = None;
        });
        tracing::info!(
            seq = summary.seq,
            files = plan.files_total,
            bytes = plan.bytes_total,
            to_fetch = plan.bytes_missing,
            "replicating: {} files, {}, {} to fetch",
            plan.files_total,
            ByteSize(plan.bytes_total),
            ByteSize(plan.bytes_missing)
        );
        let shown = Progress::start(
            Arc::clone(&counters),
            self.status.clone(),
            base_files,
            base_bytes,
            plan.files_total,
            plan.bytes_total,
        );
        let report = fill::fill_all(&self.vfs, plan.todo, &counters).await;
        shown.finish().await;
        self.make_durable().await;
        let fetched = counters.bytes.load(Ordering::Relaxed);
        warn_denied(&self.vfs, &report.denied);
        if report.is_complete() {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                files = plan.files_total,
                bytes = plan.bytes_total,
                fetched,
                secs,
                "replica complete: {} files, {}; fetched {} in {:.1}s ({}/s)",
                plan.files_total,
                ByteSize(plan.bytes_total),
                ByteSize(fetched),
                secs,
                ByteSize((fetched as f64 / secs.max(0.001)) as u64)
            );
            self.status.send_modify(|s| {
                s.state = ReplicaState::Current;
                s.files_done = s.files_total;
                s.bytes_done = s.bytes_total;
            });
            Ok(())
        } else {
            for (fid, why) in report.failed.iter().take(5) {
                tracing::warn!(fid, error = %why, "could not fetch a file of the replica");
            }
            let offline = !report.offline.is_empty();
            let mut p = self.pending();
            p.files.extend(report.offline);
            p.files.extend(report.failed.iter().map(|(f, _)| *f));
            drop(p);
            if offline {
                tracing::warn!(
                    "the origin went away while replicating: continuing when it is back"
                );
                Err(PassError::Offline)
            } else {
                Err(PassError::Failed(format!(
                    "{} files could not be fetched",
                    report.failed.len()
                )))
            }
        }
    }
}

impl AfterApply for Keeper {
    fn keeps_all(&self) -> bool {
        self.whole.load(Ordering::Relaxed)
    }

    fn batch(&self, applied: Applied, cursor: u64) -> BoxFuture<'_, ()> {
        async move {
            let whole = self.whole.load(Ordering::Relaxed);
            let mut files = Vec::new();
            let mut dirs = Vec::new();
            let mut seen = HashSet::new();
            let touched = applied.content_changed.iter().chain(&applied.entered);
            if let Ok(rx) = self.vfs.cache.read() {
                for &fid in touched {
                    if !seen.insert(fid) {
                        continue;
                    }
                    let Ok(Some(obj)) = rx.get(fid) else { continue };
                    if obj.pinned {
                        self.pending().recount = true;
                    }
                    if !(whole || obj.pinned) {
                        continue;
                    }
                    match obj.kind {
                        Kind::File => files.push(fid),
                        Kind::Dir => dirs.push(fid),
                        Kind::Symlink => {}
                    }
                }
            }
            let ok = (files.is_empty() && dirs.is_empty()) || self.keep(files, dirs).await;
            let left = {
                let p = self.pending();
                p.files.len() + p.dirs.len()
            };
            self.status.send_modify(|s| {
                s.pending = left as u64;
                if ok && left == 0 {
                    s.fresh_through = cursor;
                }
            });
            if left > 0 || self.pending().recount {
                self.wake.notify_one();
            }
        }
        .boxed()
    }

    fn revalidated(&self) -> BoxFuture<'_, ()> {
        async move {
            let mut p = self.pending();
            p.sweep_pins = true;
            p.recount = true;
            if self.mode == Mode::Replicate {
                p.resync = true;
            }
            drop(p);
            self.wake.notify_one();
        }
        .boxed()
    }
}

/// Why a replication pass stopped.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("the origin is unreachable")]
    Offline,
    #[error("{0}")]
    Failed(String),
}

impl From<OriginError> for PassError {
    fn from(e: OriginError) -> Self {
        match e {
            e if e.is_unreachable() => Self::Offline,
            other => Self::Failed(other.to_string()),
        }
    }
}

impl From<VfsError> for PassError {
    fn from(e: VfsError) -> Self {
        match e {
            VfsError::Offline => Self::Offline,
            other => Self::Failed(other.to_string()),
        }
    }
}

/// What a folded manifest held.
#[derive(Debug, Default, Clone, Copy)]
struct Summary {
    seq: wire::Seq,
    files: u64,
    bytes: u64,
}

/// A directory of the manifest whose entries are being folded in.
struct Group {
    id: wire::ObjectId,
    attr: wire::Attr,
    names: HashSet<String>,
    /// Its names removed or renamed away here and not at the origin yet
    /// (read from the log at its first entry).
    vacated: Option<HashSet<String>>,
}

/// State of a fold across its write transactions.
struct FoldState {
    /// Directories whose entries come next, in manifest order (the
    /// manifest is breadth first: entries come grouped by directory, in
    /// the order the directories themselves appeared).
    queue: VecDeque<(wire::ObjectId, wire::Attr)>,
    current: Option<Group>,
    summary: Summary,
}

/// Folds a manifest into the cache, in batches of [`FOLD_BATCH`] entries.
async fn fold(
    vfs: &Vfs,
    header: wire::ManifestHeader,
    entries: impl futures::Stream<Item = Result<wire::ManifestEntry, OriginError>>,
) -> Result<Summary, PassError> {
    let mut state = FoldState {
        queue: VecDeque::from([(header.root.id, header.root.clone())]),
        current: None,
        summary: Summary {
            seq: header.seq,
            ..Default::default()
        },
    };
    let mut entries = std::pin::pin!(entries.chunks(FOLD_BATCH));
    loop {
        let batch = entries.next().await;
        let (batch, last) = match batch {
            Some(items) => {
                let batch = items
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        if e.is_unreachable() {
                            vfs.link.down(&e.to_string());
                        }
                        PassError::from(e)
                    })?;
                (batch, false)
            }
            None => (Vec::new(), true),
        };
        let passed = Arc::clone(&vfs.passed);
        state = vfs
            .blocking(move |cache| {
                let mut tx = cache.write()?;
                for mut entry in batch {
                    entry.attr = passed.newest(&entry.attr);
                    fold_entry(&mut tx, &mut state, entry)?;
                }
                if last {
                    // Directories still queued have no entries.
                    if let Some(group) = state.current.take() {
                        finish_group(&mut tx, group)?;
                    }
                    while let Some((id, attr)) = state.queue.pop_front() {
                        finish_group(&mut tx, Group::new(id, attr))?;
                    }
                }
                tx.commit(last)?;
                Ok(state)
            })
            .await?;
        if last {
            return Ok(state.summary);
        }
    }
}

impl Group {
    fn new(id: wire::ObjectId, attr: wire::Attr) -> Self {
        Self {
            id,
            attr,
            names: HashSet::new(),
            vacated: None,
        }
    }
}

fn fold_entry(
    tx: &mut WriteTxn<'_>,
    state: &mut FoldState,
    entry: wire::ManifestEntry,
) -> Result<(), VfsError> {
    if state.current.as_ref().map(|g| g.id) != Some(entry.parent) {
        if let Some(group) = state.current.take() {
            finish_group(tx, group)?;
        }
        loop {
            let Some((id, attr)) = state.queue.pop_front() else {
                return Err(VfsError::Io(format!(
                    "manifest out of order: entries of {} come after their directory's turn",
                    entry.parent
                )));
            };
            if id == entry.parent {
                state.current = Some(Group::new(id, attr));
                break;
            }
            finish_group(tx, Group::new(id, attr))?;
        }
    }
    match entry.attr.kind {
        wire::Kind::File => {
            state.summary.files += 1;
            state.summary.bytes += entry.attr.size;
        }
        wire::Kind::Dir => state.queue.push_back((entry.attr.id, entry.attr.clone())),
        wire::Kind::Symlink => {}
    }
    let Some(group) = state.current.as_mut() else {
        return Ok(());
    };
    group.names.insert(entry.name.clone());
    let Some(dir) = tx.by_origin(group.id)? else {
        return Ok(()); // Not in the cache (gone since): nothing to fill in.
    };
    let cached = tx.get(dir)?.and_then(|d| d.origin).map_or(0, |o| o.version);
    if cached > group.attr.version {
        return Ok(()); // The cache knows a newer state of this directory.
    }
    let vacated = match &mut group.vacated {
        Some(v) => v,
        None => group.vacated.insert(tx.vacated_names(dir)?),
    };
    if vacated.contains(&entry.name) {
        return Ok(()); // Removed or moved away here; the origin has not heard.
    }
    match coherence::upsert_entry(tx, dir, &entry.name, &entry.attr, Source::Fetch) {
        Ok(_) => Ok(()),
        Err(CacheError::Corrupt(why)) => {
            tracing::warn!(name = entry.name, error = why, "skipping a manifest entry");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// A directory's entries are all folded in: forget cached entries the
/// manifest does not have, and mark it listed.
fn finish_group(tx: &mut WriteTxn<'_>, group: Group) -> Result<(), VfsError> {
    let Some(dir) = tx.by_origin(group.id)? else {
        return Ok(());
    };
    let Some(mut obj) = tx.get(dir)? else {
        return Ok(());
    };
    if obj.kind != Kind::Dir || obj.origin.map_or(0, |o| o.version) > group.attr.version {
        return Ok(());
    }
    let mut cookie = 0;
    loop {
        let page = tx.entries(dir, cookie, 1024)?;
        let Some(last) = page.last() else { break };
        cookie = last.cookie;
        for e in page {
            if group.names.contains(&e.name) {
                continue;
            }
            let Some(child) = tx.get(e.fileid)? else {
                tx.unlink(dir, &e.name)?;
                continue;
            };
            // Local changes stay: the reintegrator settles them.
            if child.is_dirty() || child.origin.is_none() {
                continue;
            }
            tx.unlink(dir, &e.name)?;
            if child.parent == dir && child.name == e.name {
                tx.remove_tree(e.fileid)?;
            }
        }
    }
    coherence::refresh(tx, dir, &mut obj, &group.attr, Source::Journal)?;
    obj.listed = true;
    tx.put(dir, &obj)?;
    Ok(())
}

/// The files of a replica and what of them is missing.
struct Plan {
    files_total: u64,
    bytes_total: u64,
    bytes_missing: u64,
    todo: Vec<FileId>,
}

/// Every clean origin file in the cache, and those missing content.
fn plan_fill(cache: &imz_cache::Cache) -> Result<Plan, CacheError> {
    let mut plan = Plan {
        files_total: 0,
        bytes_total: 0,
        bytes_missing: 0,
        todo: Vec::new(),
    };
    let mut start = 0;
    loop {
        let rx = cache.read()?;
        let page = rx.objects_from(start, SCAN_PAGE)?;
        let Some((last, _)) = page.last() else { break };
        start = last + 1;
        for (fid, obj) in page {
            let Some(target) = fill::target_of(fid, &obj) else {
                continue;
            };
            plan.files_total += 1;
            plan.bytes_total += target.extent;
            let missing: u64 = rx
                .missing_chunks(fid, &obj)?
                .iter()
                .map(|&i| imz_cache::chunk::len_in(i, target.extent))
                .sum();
            if missing > 0 {
                plan.bytes_missing += missing;
                plan.todo.push(fid);
            }
        }
    }
    Ok(plan)
}

/// Shows a fill's progress: a bar on a terminal, log lines otherwise; and
/// keeps `imz status` up to date.
struct Progress {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(
        counters: Arc<Counters>,
        status: watch::Sender<ReplicaStatus>,
        base_files: u64,
        base_bytes: u64,
        files_total: u64,
        bytes_total: u64,
    ) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = indicatif::ProgressBar::with_draw_target(
                    Some(bytes_total),
                    indicatif::ProgressDrawTarget::stderr(),
                );
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "replicating [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_position(base_bytes);
                bar.reset_eta();
                bar
            });
            let tick = if bar.is_some() {
                Duration::from_millis(200)
            } else {
                Duration::from_millis(500)
            };
            let mut last_log = Instant::now();
            loop {
                let done = tokio::select! {
                    _ = &mut stopped => true,
                    _ = tokio::time::sleep(tick) => false,
                };
                let fetched = counters.bytes.load(Ordering::Relaxed);
                let files = (base_files + counters.files.load(Ordering::Relaxed)).min(files_total);
                let bytes = (base_bytes + fetched).min(bytes_total);
                status.send_modify(|s| {
                    s.files_done = files;
                    s.bytes_done = bytes;
                });
                if let Some(bar) = &bar {
                    bar.set_position(bytes);
                    bar.set_message(format!("{files}/{files_total} files"));
                } else if done || last_log.elapsed() >= LOG_EVERY {
                    last_log = Instant::now();
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let rate = fetched as f64 / secs;
                    let eta = if rate > 0.0 {
                        format!("{:.0}s", (bytes_total - bytes) as f64 / rate)
                    } else {
                        "unknown".into()
                    };
                    tracing::info!(
                        "replicating: {files}/{files_total} files, {} of {}, {}/s, ETA {eta}",
                        ByteSize(bytes),
                        ByteSize(bytes_total),
                        ByteSize(rate as u64)
                    );
                }
                if done {
                    if let Some(bar) = &bar {
                        bar.finish_and_clear();
                    }
                    return;
                }
            }
        });
        Self { stop, task }
    }

    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Files the origin may not read are left out of the replica, said once
/// per fill rather than retried every few seconds: the sweep every
/// [`SWEEP_EVERY`] tries them again, as does a change of their content.
fn warn_denied(vfs: &Vfs, denied: &[FileId]) {
    if denied.is_empty() {
        return;
    }
    let some: Vec<String> = denied
        .iter()
        .take(5)
        .map(|fid| crate::conflict::path_of(vfs, *fid))
        .collect();
    tracing::warn!(
        files = denied.len(),
        some = ?some,
        "left out of the replica: the origin may not read these files (their permissions \
         there); tried again every {} minutes and when their content changes",
        SWEEP_EVERY.as_secs() / 60
    );
}
