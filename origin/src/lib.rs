//! The imz origin: serves the master copy of a directory tree over HTTP,
//! with stable object ids, per-object versions and a durable journal of
//! every change (InterMezzo's kernel modification log).
//!
//! Entry point: [`start`] with an [`OriginConfig`]; the returned
//! [`RunningOrigin`] serves until [`RunningOrigin::shutdown`]. The pieces:
//! - [`wire`]: the HTTP wire format shared with the gateway;
//! - [`store`]: the redb metadata store and journal;
//! - [`fsops`]: symlink-safe access to the tree;
//! - [`writer`]: the single writer thread and its group commits;
//! - [`reintegrate`]: applying a gateway's operations;
//! - [`scan`]: reconciling changes other programs made in the tree;
//! - [`watch`]: the inotify watcher that feeds the scan;
//! - [`server`], [`data`], [`uploads`]: the HTTP endpoints.

pub mod data;
pub mod error;
pub mod fsops;
pub mod http;
pub mod names;
pub mod reintegrate;
pub mod scan;
pub mod server;
pub mod store;
pub mod test_hold;
pub mod uploads;
pub mod watch;
pub mod wire;
pub mod writer;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch as tokio_watch};

pub use error::OriginError;
use wire::Seq;

/// Why a read-only origin refuses a change.
pub(crate) const READ_ONLY: &str = "this origin serves its tree read-only (--read-only)";

/// How often the start-up scan reports its progress.
const SCAN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How an origin runs. Build with [`OriginConfig::new`] and adjust knobs.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// The exported directory (the master copy).
    pub root: PathBuf,
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// Bearer token every request but the health check must present.
    pub token: String,
    /// Journal records kept at least; older ones are compacted.
    pub journal_keep: u64,
    /// Largest upload accepted, in bytes.
    pub max_upload: u64,
    /// Finished but never installed uploads are deleted after this long.
    pub upload_ttl: Duration,
    /// Bytes read from disk per chunk when serving data.
    pub read_chunk: usize,
    /// Most data downloads streamed at once (each holds a blocking thread
    /// and up to `DATA_QUEUE` chunks); more wait for a slot.
    pub max_downloads: usize,
    /// Delay that gathers a burst of external changes into one reconcile.
    pub watch_debounce: Duration,
    /// Watch the tree for changes other programs make (inotify).
    pub watch: bool,
    /// While the system's inotify limit leaves directories unwatched, how
    /// often the whole tree is rescanned to find changes made in them.
    pub rescan_every: Duration,
    /// How long a connection may take to send a request's head, or stay
    /// idle between requests (see [`http`]).
    pub header_timeout: Duration,
    /// HTTP connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// A client that reads nothing of a streamed response (data, manifest)
    /// for this long loses it.
    pub send_timeout: Duration,
    /// Where the origin keeps its own state; `None`: `ROOT/.imz`.
    pub state_dir: Option<PathBuf>,
    /// Never change the tree: gateways' changes are refused (and gateways,
    /// told so by the origin's info, serve it read-only).
    pub read_only: bool,
}

impl OriginConfig {
    pub fn new(root: impl Into<PathBuf>, listen: SocketAddr, token: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            listen,
            token: token.into(),
            journal_keep: 1_000_000,
            max_upload: 1 << 40,
            upload_ttl: Duration::from_secs(24 * 3600),
            read_chunk: 1 << 20,
            max_downloads: 256,
            watch_debounce: Duration::from_millis(20),
            watch: true,
            rescan_every: Duration::from_secs(60),
            header_timeout: http::HEADER_TIMEOUT,
            max_connections: http::MAX_CONNECTIONS,
            send_timeout: Duration::from_secs(60),
            state_dir: None,
            read_only: false,
        }
    }

    /// Where the origin keeps its own state.
    pub fn state_dir(&self) -> PathBuf {
        match &self.state_dir {
            Some(dir) => dir.clone(),
            None => self.root.join(wire::STATE_DIR_NAME),
        }
    }
}

/// State shared by the HTTP handlers, the writer and the watcher.
pub struct Shared {
    pub config: OriginConfig,
    pub store: store::Store,
    pub tree: fsops::Tree,
    /// `ROOT/.imz/uploads`: finished uploads, named by upload id.
    pub uploads_fd: OwnedFd,
    pub uploads_dir: PathBuf,
    /// `ROOT/.imz/partial`: uploads being received.
    pub partial_dir: PathBuf,
    /// Newest committed journal seq; journal readers wait on it.
    pub seq: tokio_watch::Sender<Seq>,
    /// Jobs for the writer thread.
    pub jobs: mpsc::Sender<writer::Job>,
    /// Set once shutdown starts, so long polls return at once.
    pub stopping: tokio_watch::Sender<bool>,
    pub downloads: Arc<tokio::sync::Semaphore>,
    /// Entries the scans have looked at, for the start-up scan's progress.
    pub scanned: std::sync::atomic::AtomicU64,
    /// Files lately stored with more than one link (see `scan::RecentLinks`).
    pub recent_links: std::sync::Mutex<scan::RecentLinks>,
    /// Upload ids the writer's current group installs (see
    /// `writer::UploadsInUse`): an upload under one of them is not staged.
    pub uploads_in_use: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A running origin.
pub struct RunningOrigin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
    watcher: Option<watch::Watcher>,
    writer: std::thread::JoinHandle<()>,
    janitor: tokio::task::JoinHandle<()>,
}

impl RunningOrigin {
    /// The address the server listens on (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the origin keeps its own state (`ROOT/.imz` unless
    /// configured elsewhere).
    pub fn state_dir(&self) -> PathBuf {
        self.shared.config.state_dir()
    }

    /// Resolves once the metadata store has stopped working (see
    /// [`store::Store::failure`]), with the reason.
    pub async fn storage_failure(&self) -> String {
        self.shared.store.failure().await
    }

    /// Stops accepting requests, lets running ones finish (long polls
    /// return at once), then stops the watcher and the writer.
    pub async fn shutdown(self) -> Result<(), OriginError> {
        self.shared.stopping.send_replace(true);
        let _ = self.server.await;
        drop(self.watcher);
        self.janitor.abort();
        let writer = self.writer;
        let _ = self.shared.jobs.send(writer::Job::Stop).await;
        drop(self.shared);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|e| OriginError::Config(format!("joining the writer: {e}")))?
            .map_err(|_| OriginError::Config("the writer thread panicked".into()))?;
        Ok(())
    }
}

/// Opens the store under `ROOT/.imz`, finishes interrupted work, rescans the
/// tree, starts the watcher and the HTTP server. Returns once requests are
/// accepted.
pub async fn start(config: OriginConfig) -> Result<RunningOrigin, OriginError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| OriginError::io(format!("binding {}", config.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| OriginError::io("reading the bound address", e))?;
    let (jobs_tx, jobs_rx) = mpsc::channel(1024);
    let shared = tokio::task::spawn_blocking(move || open_shared(config, jobs_tx))
        .await
        .map_err(|e| OriginError::Config(format!("start-up task failed: {e}")))??;
    let shared = Arc::new(shared);
    // Watch before the rescan, so nothing changed during it is missed.
    let watcher = if shared.config.watch {
        Some(watch::Watcher::start(&shared)?)
    } else {
        None
    };
    let prep = shared.clone();
    let mut scan = tokio::task::spawn_blocking(move || -> Result<(), OriginError> {
        writer::transact(&prep, scan::ensure_root)?;
        writer::recover(&prep)?;
        let t = std::time::Instant::now();
        writer::transact(&prep, |cx| scan::reconcile(cx, scan::Dirty::full()))?;
        tracing::info!(elapsed = ?t.elapsed(), "start-up scan done");
        uploads::clean_at_start(&prep);
        Ok(())
    });
    // The first scan of a big tree takes a while (a million files: half a
    // minute): say that it is under way rather than seem to hang.
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + SCAN_PROGRESS_EVERY,
        SCAN_PROGRESS_EVERY,
    );
    let scanned = loop {
        tokio::select! {
            done = &mut scan => break done,
            _ = progress.tick() => tracing::info!(
                entries = shared.scanned.load(std::sync::atomic::Ordering::Relaxed),
                "start-up scan under way"
            ),
        }
    };
    scanned.map_err(|e| OriginError::Config(format!("start-up task failed: {e}")))??;
    let writer_shared = shared.clone();
    let writer = std::thread::Builder::new()
        .name("imz-writer".into())
        .spawn(move || writer::run(writer_shared, jobs_rx))
        .map_err(|e| OriginError::io("spawning the writer thread", e))?;
    let janitor = tokio::spawn(uploads::janitor(shared.clone()));
    let app = server::router(shared.clone());
    let limits = http::Limits {
        header_timeout: shared.config.header_timeout,
        max_connections: shared.config.max_connections.max(1),
    };
    let server = tokio::spawn(http::serve(
        listener,
        app,
        limits,
        shared.stopping.subscribe(),
    ));
    tracing::info!(%addr, root = %shared.tree.root_path().display(), "origin serving");
    Ok(RunningOrigin {
        addr,
        shared,
        server,
        watcher,
        writer,
        janitor,
    })
}

fn open_shared(
    config: OriginConfig,
    jobs: mpsc::Sender<writer::Job>,
) -> Result<Shared, OriginError> {
    let tree = fsops::Tree::open(&config.root)
        .map_err(|e| OriginError::io(format!("opening {}", config.root.display()), e))?;
    let state = match &config.state_dir {
        Some(dir) => dir.clone(),
        None => tree.root_path().join(wire::STATE_DIR_NAME),
    };
    let uploads_dir = state.join("uploads");
    let partial_dir = state.join("partial");
    for dir in [&state, &uploads_dir, &partial_dir] {
        std::fs::create_dir_all(dir).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
                " (a read-only tree is served with --read-only --state DIR)"
            } else {
                ""
            };
            OriginError::io(format!("creating {}{hint}", dir.display()), e)
        })?;
    }
    // Staged uploads hold file content before it takes its mode in the
    // tree, and the store names everything, private directories too: the
    // state is the origin's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| OriginError::io(format!("restricting {}", state.display()), e))?;
    }
    let uploads_fd = rustix::fs::open(
        &uploads_dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| OriginError::io("opening the uploads directory", e))?;
    let store = store::Store::open(&state.join("store.redb"))?;
    let last = store.read()?.last_seq()?;
    let (seq, _) = tokio_watch::channel(last);
    let (stopping, _) = tokio_watch::channel(false);
    let downloads = Arc::new(tokio::sync::Semaphore::new(config.max_downloads.max(1)));
    Ok(Shared {
        config,
        store,
        tree,
        uploads_fd,
        uploads_dir,
        partial_dir,
        seq,
        jobs,
        stopping,
        downloads,
        scanned: std::sync::atomic::AtomicU64::new(0),
        recent_links: std::sync::Mutex::new(scan::RecentLinks::default()),
        uploads_in_use: std::sync::Mutex::new(std::collections::HashSet::new()),
    })
}
