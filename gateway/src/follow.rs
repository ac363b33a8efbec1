//! The journal follower: keeps the cache coherent with the origin.
//!
//! It long-polls the origin's journal from the cursor stored in the cache
//! and applies each batch of records in one transaction together with the
//! new cursor, so that the cache and its cursor always agree (a crash replays
//! records, and applying a record twice changes nothing: see
//! [`crate::coherence`]). While this stream is live, cached state is trusted
//! without asking the origin per operation: Coda's callbacks, InterMezzo's
//! KML replay.
//!
//! When the origin has compacted its journal past the cursor, the follower
//! revalidates every cached object against the origin instead.

use std::sync::Arc;
use std::time::Duration;

use imz_cache::{Kind, meta};
use imz_origin::wire::{ErrorCode, Record};
use tokio::sync::watch;

use crate::coherence::{self, Applied, Source};
use crate::origin_client::OriginError;
use crate::vfs::{Vfs, VfsError};

/// How long one journal request waits for news.
pub const POLL_WAIT: Duration = Duration::from_secs(20);

/// What the follower shares with the rest of the gateway.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Held shared while a batch is applied or the cache revalidated.
    /// Whoever folds a whole tree into the cache (the replicator) holds it
    /// exclusively, so that no record lands on half of it.
    pub gate: Arc<tokio::sync::RwLock<()>>,
    /// Told what each batch changed, and awaited before the new cursor is
    /// announced: an announced cursor means what the gateway keeps (a
    /// replica, pins) is current up to it.
    pub after: Option<Arc<dyn AfterApply>>,
}

/// Acts on what the follower applied (see [`Hooks::after`]).
pub trait AfterApply: Send + Sync {
    /// A batch up to journal sequence `cursor` was committed.
    fn batch(&self, applied: Applied, cursor: u64) -> futures::future::BoxFuture<'_, ()>;
    /// Every cached object was revalidated (the journal was compacted past
    /// our cursor): anything may have changed.
    fn revalidated(&self) -> futures::future::BoxFuture<'_, ()>;
    /// Whether every file's content is kept (a replica), not only pinned
    /// ones.
    fn keeps_all(&self) -> bool;
}

/// Follows the journal until the process ends. `applied` is bumped with the
/// cursor after each applied batch (tests and `imz status` watch it).
pub async fn run_follower(
    vfs: Arc<Vfs>,
    gateway_id: String,
    applied: watch::Sender<u64>,
    hooks: Hooks,
) {
    // Our own changes coming back: the reintegrator already recorded them.
    let own = format!("{gateway_id}-");
    let hashes = crate::unchanged::Hashes::default();
    loop {
        vfs.link.wait_up().await;
        let cursor = match vfs.cache.read().and_then(|rx| rx.meta_u64(meta::CURSOR)) {
            Ok(c) => c.unwrap_or(0),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the journal cursor");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // A poll outlives what the rest of the gateway learns about the
        // link: if anything else finds the origin gone (or back), this
        // request may be hanging on a connection to a process that is no
        // longer there (seen: an origin killed mid-poll, and the poll
        // silent until its timeout, 23 s). Poll again instead.
        let mut link_changes = vfs.link.changes();
        let answer = tokio::select! {
            answer = vfs.origin.journal(cursor, POLL_WAIT) => answer,
            _ = link_changes.changed() => {
                tracing::debug!(cursor, "the link changed while polling the journal: polling again");
                continue;
            }
        };
        match answer {
            Ok(page) => {
                vfs.link.up();
                vfs.metrics
                    .origin_seq
                    .store(page.last_seq, std::sync::atomic::Ordering::Relaxed);
                if page.records.is_empty() {
                    continue;
                }
                let last = page.records.last().map_or(cursor, |r| r.seq);
                let count = page.records.len();
                let keeps_all = hooks.after.as_ref().is_some_and(|a| a.keeps_all());
                let kept = crate::unchanged::kept_chunks(
                    &vfs,
                    &hashes,
                    &page.records,
                    cursor,
                    &own,
                    keeps_all,
                )
                .await;
                let own = own.clone();
                let passed = Arc::clone(&vfs.passed);
                let gate = hooks.gate.read().await;
                let result = vfs
                    .blocking(move |cache| {
                        let mut tx = cache.write()?;
                        let mut applied = Applied::default();
                        for record in &page.records {
                            if to_apply(record, cursor, &own) {
                                let keep = kept.get(&record.seq).map_or(&[][..], Vec::as_slice);
                                coherence::apply_record_keeping(
                                    &mut tx,
                                    record,
                                    &mut applied,
                                    keep,
                                )?;
                            }
                        }
                        tx.put_meta_u64(meta::CURSOR, last)?;
                        // Before the commit: an answer stored after it
                        // finds these.
                        passed.note(&applied.passed);
                        tx.commit(true)?;
                        Ok(applied)
                    })
                    .await;
                drop(gate);
                match result {
                    Ok(changes) => {
                        crate::metrics::Metrics::add(&vfs.metrics.journal_records, count as u64);
                        tracing::debug!(count, last, "applied journal records");
                        if let Some(after) = &hooks.after {
                            after.batch(changes, last).await;
                        }
                        applied.send_replace(last);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot apply journal records");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            Err(e) if e.is_unreachable() => {
                vfs.link.down_if_unreachable(&e);
            }
            Err(OriginError::Api(api)) if api.code == ErrorCode::JournalCompacted => {
                tracing::warn!(
                    cursor,
                    "origin journal compacted past our cursor: revalidating the cache"
                );
                let gate = hooks.gate.read().await;
                let result = revalidate(&vfs, cursor).await;
                drop(gate);
                match result {
                    Ok(last) => {
                        if let Some(after) = &hooks.after {
                            after.revalidated().await;
                        }
                        applied.send_replace(last);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "revalidation failed; will retry");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "journal request failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Whether a journal record is still to be applied: past the `cursor`,
/// and not made by this gateway (whose idempotency keys start with `own`;
/// the reintegrator already recorded those).
pub(crate) fn to_apply(record: &Record, cursor: u64, own: &str) -> bool {
    let ours = record.key.as_deref().is_some_and(|k| k.starts_with(own));
    record.seq > cursor && !ours
}

/// Checks every cached object against the origin, dropping what changed or
/// vanished, then moves the cursor to the journal's end as it was before
/// the sweep (so changes made during the sweep are replayed). Returns the
/// new cursor.
pub async fn revalidate(vfs: &Vfs, cursor: u64) -> Result<u64, VfsError> {
    let info = vfs.origin.info().await.map_err(|e| vfs.origin_failed(e))?;
    // A journal that ends before our cursor went back: the origin was
    // restored, and its versions may be lower than ours yet be the truth.
    let source = if info.last_seq < cursor {
        tracing::warn!(
            cursor,
            origin = info.last_seq,
            "the origin's journal went back (restored from a backup?): taking its state as it is"
        );
        Source::Restore
    } else {
        Source::Fetch
    };
    let fids = vfs.cache.read()?.all_fileids()?;
    for fid in fids {
        let Some(obj) = vfs.cache.read()?.get(fid)? else {
            continue;
        };
        let Some(origin) = obj.origin else { continue };
        let fresh = match vfs.origin.getattr(origin.id).await {
            Ok(attr) => Some(attr),
            Err(OriginError::Api(api)) if api.code == ErrorCode::NotFound => None,
            Err(e) => return Err(vfs.origin_failed(e)),
        };
        vfs.blocking(move |cache| {
            let mut tx = cache.write()?;
            let Some(mut obj) = tx.get(fid)? else {
                return Ok(());
            };
            match fresh {
                Some(attr) => {
                    coherence::refresh(&mut tx, fid, &mut obj, &attr, source)?;
                    // Entries may have changed without the directory's
                    // version telling us which: list it again when used.
                    if obj.kind == Kind::Dir {
                        obj.listed = false;
                    }
                    tx.put(fid, &obj)?;
                }
                None if fid != imz_cache::ROOT_FILEID && !tx.holds_changes(fid)? => {
                    tx.unlink_if(obj.parent, &obj.name, fid)?;
                    tx.remove_tree(fid)?;
                }
                None => {}
            }
            tx.commit(true)?;
            Ok(())
        })
        .await?;
    }
    let last = info.last_seq;
    vfs.blocking(move |cache| {
        let mut tx = cache.write()?;
        tx.put_meta_u64(meta::CURSOR, last)?;
        tx.commit(true)?;
        Ok(())
    })
    .await?;
    Ok(last)
}
