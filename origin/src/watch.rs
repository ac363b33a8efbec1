//! Watching the tree with inotify so that changes other programs make reach
//! the journal: every directory but the state directory has a watch;
//! changed paths are gathered for a short debounce and handed to the writer
//! as one reconcile job. A queue overflow asks for a full rescan.
//!
//! The watches are kept here, on `rustix`'s inotify, rather than by a
//! general watcher crate, for three reasons:
//!
//! - **the events asked for**: no `IN_OPEN`, so the origin's own opens (each
//!   download, each directory a scan lists) wake nobody, and no watch on the
//!   state directory, whose store and uploads are written all the time;
//! - **the watch limit**: a tree with more directories than the system's
//!   `fs.inotify.max_user_watches` still starts. What could not be watched
//!   is covered by a full rescan every [`OriginConfig::rescan_every`], and
//!   each rescan tries the missing watches again, so raising the limit
//!   heals a running origin;
//! - **moved directories**: a watch names its directory by path, so a
//!   directory moved inside the tree is watched again under its new path.
//!
//! [`OriginConfig::rescan_every`]: crate::OriginConfig::rescan_every

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;

use crate::error::OriginError;
use crate::scan::Dirty;
use crate::writer::Job;
use crate::{Shared, fsops, wire};

/// Paths gathered beyond this many make one full rescan instead.
const MAX_PATHS: usize = 10_000;

/// What each directory's watch reports: everything that can change an
/// entry or its content. Not `IN_OPEN` nor `IN_ACCESS` (reads change
/// nothing, and the origin's own would wake the watcher for each).
const EVENTS: WatchFlags = WatchFlags::ATTRIB
    .union(WatchFlags::CREATE)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::MOVE_SELF)
    .union(WatchFlags::ONLYDIR)
    .union(WatchFlags::DONT_FOLLOW)
    .union(WatchFlags::EXCL_UNLINK);

/// The running watcher; dropping it stops its thread.
pub struct Watcher {
    stop: Arc<OwnedFd>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
    }
}

impl Watcher {
    /// Watches every directory of the tree, then follows changes on a
    /// thread of its own. Returns once the watches are in place, so that a
    /// scan started afterwards misses nothing.
    pub fn start(shared: &Arc<Shared>) -> Result<Self, OriginError> {
        let stop = rustix::event::eventfd(0, EventfdFlags::CLOEXEC)
            .map_err(|e| OriginError::io("creating the watcher's stop signal", e))?;
        let stop = Arc::new(stop);
        let mut watches = Watches::new(shared.tree.root_path().to_path_buf());
        watches.add_tree(Path::new(""));
        watches.report_coverage();
        let config = Config {
            debounce: shared.config.watch_debounce,
            rescan_every: shared.config.rescan_every,
        };
        let jobs = shared.jobs.clone();
        let thread_stop = stop.clone();
        std::thread::Builder::new()
            .name("imz-watch".into())
            .spawn(move || follow(watches, &thread_stop, &jobs, config))
            .map_err(|e| OriginError::io("spawning the watcher thread", e))?;
        Ok(Self { stop })
    }
}

#[derive(Clone, Copy)]
struct Config {
    debounce: Duration,
    rescan_every: Duration,
}

/// The inotify instance and what each of its watches names.
struct Watches {
    root: PathBuf,
    /// `None` when the system would not give an inotify instance: then
    /// every directory counts as unwatched. Shared with the event reader,
    /// which reads while watches are added.
    fd: Option<Arc<OwnedFd>>,
    /// Watch descriptor to directory, relative to the root.
    dirs: HashMap<i32, PathBuf>,
    /// Directories found without a watch (the limit) since the last full
    /// pass; periodic rescans cover them.
    unwatched: usize,
}

impl Watches {
    fn new(root: PathBuf) -> Self {
        let fd = match inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK) {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "no inotify instance (fs.inotify.max_user_instances?): changes made \
                     directly in the directory are found by periodic rescans only"
                );
                None
            }
        };
        Self {
            root,
            fd,
            dirs: HashMap::new(),
            unwatched: 0,
        }
    }

    /// Watches `rel` and every directory below it (again, for those already
    /// watched: that renames them). Symlinks are not followed.
    fn add_tree(&mut self, rel: &Path) {
        let mut stack = vec![rel.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let abs = self.root.join(&dir);
            if !self.add(&dir, &abs) {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&abs) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                let name = entry.file_name();
                if is_dir && !is_state_dir(&dir, &name) {
                    stack.push(dir.join(name));
                }
            }
        }
    }

    /// Adds one watch; whether the directory is there to descend into.
    fn add(&mut self, rel: &Path, abs: &Path) -> bool {
        let Some(fd) = &self.fd else {
            self.unwatched += 1;
            return true;
        };
        match inotify::add_watch(fd, abs, EVENTS) {
            Ok(wd) => {
                self.dirs.insert(wd, rel.to_path_buf());
                true
            }
            Err(Errno::NOSPC) => {
                self.unwatched += 1;
                true
            }
            // Gone, or not a directory any more: its parent's events say so.
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => false,
            // Unreadable by the origin, which cannot list it either; a
            // chmod shows on its parent's watch, and it is tried again then.
            Err(Errno::ACCESS | Errno::PERM) => false,
            Err(e) => {
                tracing::debug!(dir = %abs.display(), error = %e, "not watching a directory");
                self.unwatched += 1;
                true
            }
        }
    }

    /// Drops the watches on `rel` and below (moved away; if it moved within
    /// the tree, its new place is watched afresh).
    fn forget_tree(&mut self, rel: &Path) {
        let Some(fd) = &self.fd else { return };
        self.dirs.retain(|wd, dir| {
            if dir.starts_with(rel) {
                let _ = inotify::remove_watch(fd, *wd);
                false
            } else {
                true
            }
        });
    }

    fn report_coverage(&self) {
        if self.unwatched == 0 {
            tracing::debug!(watched = self.dirs.len(), "watching every directory");
            return;
        }
        tracing::warn!(
            watched = self.dirs.len(),
            unwatched = self.unwatched,
            "the system's inotify limit leaves directories unwatched: changes other \
             programs make in them are found by a full rescan (see --rescan-every); \
             raise fs.inotify.max_user_watches to see them at once"
        );
    }

    /// Takes in one event: the path it is about (relative to the root), if
    /// it can mean a change.
    fn on_event(&mut self, wd: i32, events: ReadFlags, name: Option<&OsStr>) -> Seen {
        if events.contains(ReadFlags::QUEUE_OVERFLOW) {
            // Lost events may have been new directories: watch them too.
            self.add_tree(Path::new(""));
            return Seen::Rescan;
        }
        if events.contains(ReadFlags::IGNORED) {
            // The directory was deleted (or its watch removed).
            self.dirs.remove(&wd);
            return Seen::Nothing;
        }
        let Some(dir) = self.dirs.get(&wd) else {
            return Seen::Nothing;
        };
        let path = match name {
            Some(name) if is_state_dir(dir, name) => return Seen::Nothing,
            Some(name) => dir.join(name),
            // About the directory itself (its attributes, or it moved).
            None => dir.clone(),
        };
        if events == ReadFlags::MODIFY && name.is_some() {
            return Seen::Written(path);
        }
        if events == ReadFlags::DELETE && name.is_some() {
            return Seen::Deleted(path);
        }
        if events.contains(ReadFlags::ISDIR) && name.is_some() {
            if events.contains(ReadFlags::MOVED_FROM) {
                self.forget_tree(&path);
            }
            if events.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO | ReadFlags::ATTRIB) {
                self.add_tree(&path);
            }
        }
        Seen::Path(path)
    }
}

fn is_state_dir(parent: &Path, name: &OsStr) -> bool {
    parent.as_os_str().is_empty() && name == wire::STATE_DIR_NAME
}

enum Seen {
    Nothing,
    /// Something at this path changed.
    Path(PathBuf),
    /// A file was written to and is still open for writing.
    Written(PathBuf),
    /// A name that was not a directory's was removed.
    Deleted(PathBuf),
    Rescan,
}

/// A file written to without being closed yet: reported once its writes
/// pause for [`WRITE_PAUSE`], or every [`WRITE_REPORT_EVERY`] while they go
/// on, and at once when it is closed. Reporting each write made a file
/// copied in over five seconds 54 journal records, and a replicating
/// gateway fetched it four times over.
struct Writing {
    last_write: Instant,
    reported: Instant,
}

const WRITE_PAUSE: Duration = Duration::from_millis(250);
const WRITE_REPORT_EVERY: Duration = Duration::from_secs(1);

/// What the watcher has gathered and not yet sent.
#[derive(Default)]
struct Pending {
    dirty: Dirty,
    /// When `dirty` goes to the writer (the debounce after its first path).
    send_at: Option<Instant>,
    writing: HashMap<PathBuf, Writing>,
    /// Files written to since `dirty` was last sent.
    written: HashSet<PathBuf>,
}

impl Pending {
    fn take(&mut self, seen: Seen, now: Instant, debounce: Duration) {
        let path = match seen {
            Seen::Nothing => return,
            Seen::Rescan => {
                self.dirty.full = true;
                self.dirty.paths.clear();
                self.dirty.listings.clear();
                self.send_at.get_or_insert(now + debounce);
                return;
            }
            Seen::Written(path) => {
                self.written.insert(path.clone());
                let w = self.writing.entry(path).or_insert(Writing {
                    last_write: now,
                    reported: now,
                });
                w.last_write = now;
                return;
            }
            Seen::Path(path) => path,
            Seen::Deleted(path) => {
                // Written and gone before any reconcile saw it: perhaps a
                // hard link, whose other names are not in any event.
                if self.written.remove(&path)
                    && !self.dirty.full
                    && let Some(parent) = path.parent().and_then(fsops::components)
                {
                    self.dirty.listings.push(parent);
                }
                path
            }
        };
        self.writing.remove(&path);
        self.add_path(&path, now, debounce);
    }

    fn add_path(&mut self, path: &Path, now: Instant, debounce: Duration) {
        self.send_at.get_or_insert(now + debounce);
        if self.dirty.full {
            return;
        }
        match fsops::components(path) {
            Some(c) => self.dirty.paths.push(c),
            None => {
                self.dirty.dirs.insert(wire::ROOT_ID);
            }
        }
        if self.dirty.paths.len() > MAX_PATHS {
            self.dirty.paths.clear();
            self.dirty.listings.clear();
            self.dirty.full = true;
        }
    }

    /// Moves files being written whose report is due into `dirty`; the
    /// next time one will be.
    fn report_writing(&mut self, now: Instant, debounce: Duration) -> Option<Instant> {
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        self.writing.retain(|path, w| {
            if now >= w.last_write + WRITE_PAUSE {
                due.push(path.clone());
                return false;
            }
            if now >= w.reported + WRITE_REPORT_EVERY {
                due.push(path.clone());
                w.reported = now;
            }
            let at = (w.last_write + WRITE_PAUSE).min(w.reported + WRITE_REPORT_EVERY);
            next = Some(next.map_or(at, |n| n.min(at)));
            true
        });
        for path in due {
            self.add_path(&path, now, debounce);
        }
        next
    }
}

/// The watcher's thread: reads events, gathers them for the debounce, and
/// sends reconcile jobs; while directories are unwatched, also a full
/// rescan every `rescan_every`.
fn follow(
    mut watches: Watches,
    stop: &OwnedFd,
    jobs: &tokio::sync::mpsc::Sender<Job>,
    config: Config,
) {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 << 10];
    let mut pending = Pending::default();
    let mut rescan_at = Instant::now() + config.rescan_every;
    loop {
        let now = Instant::now();
        let mut wake = pending.report_writing(now, config.debounce);
        for at in [
            pending.send_at,
            (watches.unwatched > 0).then_some(rescan_at),
        ]
        .into_iter()
        .flatten()
        {
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        let timeout = wake.map(|w| {
            let left = w.saturating_duration_since(now);
            Timespec {
                tv_sec: left.as_secs() as _,
                tv_nsec: left.subsec_nanos() as _,
            }
        });
        let (stopped, readable) = wait(stop, watches.fd.as_deref(), timeout.as_ref());
        if stopped {
            return;
        }
        if readable && let Some(fd) = watches.fd.clone() {
            let degraded = watches.unwatched > 0;
            if !drain(&fd, &mut buf, &mut watches, &mut pending, config.debounce) {
                return;
            }
            if !degraded && watches.unwatched > 0 {
                // New directories met the limit.
                watches.report_coverage();
            }
        }
        let now = Instant::now();
        if watches.unwatched > 0 && now >= rescan_at {
            // Try the missing watches again first: the limit may have been
            // raised, or directories removed.
            watches.unwatched = 0;
            watches.add_tree(Path::new(""));
            if watches.unwatched == 0 {
                tracing::info!(
                    watched = watches.dirs.len(),
                    "every directory is watched again"
                );
            }
            pending.take(Seen::Rescan, now, Duration::ZERO);
            rescan_at = now + config.rescan_every;
        }
        pending.report_writing(now, config.debounce);
        if pending.send_at.is_some_and(|at| now >= at) {
            pending.send_at = None;
            let mut dirty = std::mem::take(&mut pending.dirty);
            // What this batch covers; files still open wait for theirs.
            let writing = &pending.writing;
            pending.written.retain(|path| writing.contains_key(path));
            dirty.paths.sort();
            dirty.paths.dedup();
            if jobs
                .blocking_send(Job::Reconcile { dirty, reply: None })
                .is_err()
            {
                return;
            }
        }
    }
}

/// Polls until the stop signal, events, or the timeout: `(stopped,
/// readable)`.
fn wait(stop: &OwnedFd, fd: Option<&OwnedFd>, timeout: Option<&Timespec>) -> (bool, bool) {
    let mut fds = vec![PollFd::new(stop, PollFlags::IN)];
    if let Some(fd) = fd {
        fds.push(PollFd::new(fd, PollFlags::IN));
    }
    match rustix::event::poll(&mut fds, timeout) {
        Ok(_) => {
            let stopped = !fds[0].revents().is_empty();
            let readable = fds.get(1).is_some_and(|f| !f.revents().is_empty());
            (stopped, readable)
        }
        Err(Errno::INTR) => (false, false),
        Err(e) => {
            tracing::error!(error = %e, "the watcher cannot poll; it stops");
            (true, false)
        }
    }
}

/// Reads every pending event into `pending`; false if the watcher must
/// stop.
fn drain(
    fd: &OwnedFd,
    buf: &mut [MaybeUninit<u8>],
    watches: &mut Watches,
    pending: &mut Pending,
    debounce: Duration,
) -> bool {
    let mut reader = inotify::Reader::new(fd.as_fd(), buf);
    loop {
        match reader.next() {
            Ok(event) => {
                let name = event.file_name().map(|n| OsStr::from_bytes(n.to_bytes()));
                let seen = watches.on_event(event.wd(), event.events(), name);
                pending.take(seen, Instant::now(), debounce);
            }
            Err(Errno::AGAIN) => return true,
            Err(Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "reading inotify events failed; the watcher stops");
                return false;
            }
        }
    }
}
