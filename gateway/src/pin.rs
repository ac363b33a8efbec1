//! Pinning (Coda's hoarding): `imz pin` and `imz unpin` on a running
//! gateway.
//!
//! A pinned file is fetched now, kept current from the journal by the
//! [`Keeper`], and never evicted (the cache protects pinned objects). A
//! recursive pin also pins the directories of the subtree, and a pinned
//! directory passes its pin to whatever enters it later (see
//! [`imz_cache::Object::pinned`]). Without `--recursive`, pinning a
//! directory pins the files directly in it. Pins are flags on the cached
//! objects, so they survive restarts.
//!
//! A pin that would take more of the cache than is left for protected data
//! (capacity minus what is already pinned and minus local changes not yet
//! on the origin) is refused before anything changes.

use std::sync::Arc;

use bytesize::ByteSize;
use futures::FutureExt;
use futures::future::BoxFuture;
use imz_cache::{FileId, Kind};

use crate::control::Pinning;
use crate::fill::{self, Counters};
use crate::replicate::Keeper;
use crate::vfs::{Vfs, VfsError};

/// Objects whose flag is changed per write transaction.
const FLAG_BATCH: usize = 2048;
/// Objects read per page while counting pinned bytes.
const SCAN_PAGE: usize = 4096;

/// What the pins take of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinUsage {
    /// Sizes of pinned files (what they will take once all fetched).
    pub pinned: u64,
    /// Cached bytes of files with local changes that are not pinned
    /// (they cannot be evicted either).
    pub dirty: u64,
}

/// Counts what pins and local changes hold of the cache (a scan of every
/// cached object: run it off the async threads).
pub fn usage(cache: &imz_cache::Cache) -> Result<PinUsage, imz_cache::CacheError> {
    let mut usage = PinUsage::default();
    let mut start = 0;
    loop {
        let rx = cache.read()?;
        let page = rx.objects_from(start, SCAN_PAGE)?;
        let Some((last, _)) = page.last() else { break };
        start = last + 1;
        for (fid, obj) in &page {
            if obj.kind != Kind::File || obj.removed {
                continue;
            }
            if obj.pinned {
                usage.pinned += obj.attrs.size;
            } else if obj.is_dirty() {
                usage.dirty += rx
                    .chunks_of(*fid)?
                    .iter()
                    .map(|(_, len)| u64::from(*len))
                    .sum::<u64>();
            }
        }
    }
    Ok(usage)
}

/// Sets or clears the pin of `fids`; returns how many changed.
pub async fn set_pinned(vfs: &Vfs, fids: Vec<FileId>, pinned: bool) -> Result<u64, VfsError> {
    let mut changed = 0;
    for batch in fids.chunks(FLAG_BATCH) {
        let batch = batch.to_vec();
        changed += vfs
            .blocking(move |cache| {
                let mut tx = cache.write()?;
                let mut changed = 0;
                for fid in batch {
                    let Some(mut obj) = tx.get(fid)? else {
                        continue;
                    };
                    if obj.pinned != pinned {
                        obj.pinned = pinned;
                        tx.put(fid, &obj)?;
                        changed += 1;
                    }
                }
                tx.commit(true)?;
                Ok(changed)
            })
            .await?;
    }
    Ok(changed)
}

/// The `imz pin` / `imz unpin` service of a gateway.
pub struct Pins {
    vfs: Arc<Vfs>,
    keeper: Arc<Keeper>,
    /// One pin or unpin at a time, so capacity checks do not race.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Pins {
    pub fn new(vfs: Arc<Vfs>, keeper: Arc<Keeper>) -> Self {
        Self {
            vfs,
            keeper,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    async fn resolve(&self, path: &str) -> Result<FileId, String> {
        let clean = path.trim_matches('/');
        self.vfs.lookup_path(clean).await.map_err(|e| match e {
            VfsError::NotFound => format!("{path}: no such file or directory at the origin"),
            VfsError::Offline => {
                format!("{path}: the origin is unreachable and this path is not cached")
            }
            other => format!("{path}: {other}"),
        })
    }

    async fn do_pin(&self, path: String, recursive: bool) -> Result<(u64, u64), String> {
        let _one = self.one_at_a_time.lock().await;
        let vfs = &self.vfs;
        let top = self.resolve(&path).await?;
        let top_obj = vfs.getattr(top).map_err(|e| format!("{path}: {e}"))?;
        let tree = fill::walk(vfs, top, true, recursive)
            .await
            .map_err(|e| walk_error(&path, e))?;

        // Room: what is pinned already and local changes stay; this pin
        // adds the files it pins that were not pinned yet.
        let cache = Arc::clone(&vfs.cache);
        let held = tokio::task::spawn_blocking(move || usage(&cache))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let capacity = vfs.cache.usage().capacity;
        let need = tree.unpinned_bytes;
        let left = capacity.saturating_sub(held.pinned + held.dirty);
        if need > left {
            return Err(format!(
                "cannot pin {path}: it needs {} ({need} bytes) more of the cache, but only {} ({left} bytes) of its {} is left \
                 (already pinned: {}, local changes not yet on the origin: {}); unpin something or give the gateway a larger --cache-size",
                ByteSize(need),
                ByteSize(left),
                ByteSize(capacity),
                ByteSize(held.pinned),
                ByteSize(held.dirty),
            ));
        }

        // Directories first, so what enters them from now on inherits the
        // pin; then a second look at the cache catches what entered while
        // we walked.
        let mut flag: Vec<FileId> = Vec::with_capacity(tree.objects() as usize);
        if recursive {
            flag.extend(&tree.dirs);
        }
        flag.extend(tree.files.iter().map(|(f, _)| *f));
        flag.extend(&tree.others);
        set_pinned(vfs, flag, true)
            .await
            .map_err(|e| format!("pinning {path}: {e}"))?;
        let mut files: Vec<FileId> = tree.files.iter().map(|(f, _)| *f).collect();
        let mut objects = tree.objects();
        let mut bytes = tree.bytes();
        if recursive && top_obj.kind == Kind::Dir {
            let again = fill::walk(vfs, top, false, true)
                .await
                .map_err(|e| walk_error(&path, e))?;
            let known: std::collections::HashSet<FileId> = files.iter().copied().collect();
            let late: Vec<(FileId, u64)> = again
                .files
                .iter()
                .filter(|(f, _)| !known.contains(f))
                .copied()
                .collect();
            if !late.is_empty() {
                objects += late.len() as u64;
                bytes += late.iter().map(|(_, s)| s).sum::<u64>();
                files.extend(late.iter().map(|(f, _)| *f));
                set_pinned(vfs, late.iter().map(|(f, _)| *f).collect(), true)
                    .await
                    .map_err(|e| format!("pinning {path}: {e}"))?;
            }
        }
        self.keeper.recount_pins().await;

        let counters = Counters::default();
        let report = fill::fill_all(vfs, files, &counters).await;
        self.keeper.make_durable().await;
        tracing::info!(
            path,
            recursive,
            objects,
            bytes,
            fetched = counters.bytes.load(std::sync::atomic::Ordering::Relaxed),
            "pinned"
        );
        if !report.is_complete() {
            let offline = report.offline.len();
            let failed = report.failed.len();
            let why = report
                .failed
                .first()
                .map(|(_, w)| w.clone())
                .unwrap_or_else(|| "the origin is unreachable".into());
            self.keeper.retry_later(
                report
                    .offline
                    .into_iter()
                    .chain(report.failed.into_iter().map(|(f, _)| f)),
            );
            return Err(format!(
                "pinned {path} ({objects} objects, {}), but {} of its files could not be fetched yet ({why}); \
                 the gateway keeps trying and fetches them when it can",
                ByteSize(bytes),
                offline + failed
            ));
        }
        if !report.denied.is_empty() {
            return Err(format!(
                "pinned {path} ({objects} objects, {}), but the origin may not read {} of its \
                 files (their permissions there): they are tried again every {} minutes",
                ByteSize(bytes),
                report.denied.len(),
                crate::replicate::SWEEP_EVERY.as_secs() / 60
            ));
        }
        Ok((objects, bytes))
    }

    async fn do_unpin(&self, path: String) -> Result<u64, String> {
        let _one = self.one_at_a_time.lock().await;
        let top = self.resolve(&path).await?;
        // Only what is cached can be pinned: no need to ask the origin.
        let tree = fill::walk(&self.vfs, top, false, true)
            .await
            .map_err(|e| walk_error(&path, e))?;
        let mut all = tree.dirs.clone();
        all.extend(tree.files.iter().map(|(f, _)| *f));
        all.extend(&tree.others);
        let changed = set_pinned(&self.vfs, all, false)
            .await
            .map_err(|e| format!("unpinning {path}: {e}"))?;
        self.keeper.recount_pins().await;
        tracing::info!(path, objects = changed, "unpinned");
        Ok(changed)
    }
}

fn walk_error(path: &str, e: VfsError) -> String {
    match e {
        VfsError::Offline => {
            format!("cannot pin {path}: the origin is unreachable and not all of it is cached")
        }
        other => format!("{path}: {other}"),
    }
}

impl Pinning for Pins {
    fn pin(&self, path: String, recursive: bool) -> BoxFuture<'_, Result<(u64, u64), String>> {
        self.do_pin(path, recursive).boxed()
    }

    fn unpin(&self, path: String) -> BoxFuture<'_, Result<u64, String>> {
        self.do_unpin(path).boxed()
    }

    fn pinned_bytes(&self) -> u64 {
        self.keeper.pinned_bytes()
    }
}
