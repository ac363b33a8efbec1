//! Watching the tree with inotify (the `notify` crate, recursive): changed
//! paths are gathered for a short debounce and handed to the writer as one
//! reconcile job. Events under the state directory are ignored; a queue
//! overflow asks for a full rescan.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher as _};

use crate::error::OriginError;
use crate::fsops;
use crate::scan::Dirty;
use crate::writer::Job;
use crate::{Shared, wire};

/// Paths gathered beyond this many make one full rescan instead.
const MAX_PATHS: usize = 10_000;

/// The running watcher; dropping it stops watching.
pub struct Watcher {
    _inner: notify::RecommendedWatcher,
}

enum Seen {
    Path(PathBuf),
    Rescan,
}

impl Watcher {
    pub fn start(shared: &std::sync::Arc<Shared>) -> Result<Self, OriginError> {
        let root = shared.tree.root_path().to_path_buf();
        let state = root.join(wire::STATE_DIR_NAME);
        let (tx, rx) = std_mpsc::channel::<Seen>();
        let mut inner =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) => {
                    if event.need_rescan() {
                        let _ = tx.send(Seen::Rescan);
                    }
                    if !changes_content(&event.kind) {
                        return;
                    }
                    for path in event.paths {
                        if !path.starts_with(&state) {
                            let _ = tx.send(Seen::Path(path));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watcher error; rescanning");
                    let _ = tx.send(Seen::Rescan);
                }
            })
            .map_err(|e| {
                OriginError::io("starting the watcher", std::io::Error::other(e.to_string()))
            })?;
        inner.watch(&root, RecursiveMode::Recursive).map_err(|e| {
            OriginError::io("watching the root", std::io::Error::other(e.to_string()))
        })?;
        let jobs = shared.jobs.clone();
        let debounce = shared.config.watch_debounce;
        std::thread::Builder::new()
            .name("imz-watch".into())
            .spawn(move || debounce_loop(rx, jobs, root, debounce))
            .map_err(|e| OriginError::io("spawning the watcher thread", e))?;
        Ok(Self { _inner: inner })
    }
}

/// Whether an event can mean the tree changed. inotify also reports every
/// open, including the origin's own opens to serve data and to reconcile;
/// taking those as changes made an idle origin reconcile (and sync its
/// store) over and over, each reconcile's opens calling for the next.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        // A file closed after writing: its content is final now.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn debounce_loop(
    rx: std_mpsc::Receiver<Seen>,
    jobs: tokio::sync::mpsc::Sender<Job>,
    root: PathBuf,
    debounce: Duration,
) {
    while let Ok(first) = rx.recv() {
        let mut dirty = Dirty::default();
        let add = |seen: Seen, dirty: &mut Dirty| match seen {
            Seen::Rescan => dirty.full = true,
            Seen::Path(p) => {
                if dirty.full {
                    return;
                }
                match p.strip_prefix(&root).ok().and_then(fsops::components) {
                    Some(c) => dirty.paths.push(c),
                    None => {
                        dirty.dirs.insert(wire::ROOT_ID);
                    }
                }
                if dirty.paths.len() > MAX_PATHS {
                    dirty.paths.clear();
                    dirty.full = true;
                }
            }
        };
        add(first, &mut dirty);
        let deadline = Instant::now() + debounce;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(seen) => add(seen, &mut dirty),
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        dirty.paths.sort();
        dirty.paths.dedup();
        if jobs
            .blocking_send(Job::Reconcile { dirty, reply: None })
            .is_err()
        {
            break;
        }
    }
}
