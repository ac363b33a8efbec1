//! Starting a gateway: open the cache, meet the origin, start the
//! background tasks and the NFS listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use imz_cache::{Cache, ROOT_FILEID, meta};
use nfs3_server::tcp::NFSTcp;
use tokio::sync::watch;

use crate::coherence;
use crate::control::{self, Control};
use crate::fetch::Fetcher;
use crate::follow;
use crate::link::{self, Link};
use crate::metrics::Metrics;
use crate::nfs::EXPORT;
use crate::origin_client::{OriginClient, OriginError, Timeouts};
use crate::reintegrate;
use crate::replicate::{self, Keeper};
use crate::vfs::Vfs;
use crate::writer::Writer;

/// Everything `imz gateway` needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub origin_url: String,
    pub token: String,
    /// Where `token` was read from: read again when the origin refuses it.
    pub token_file: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub listen: SocketAddr,
    pub timeouts: Timeouts,
    pub reintegration: reintegrate::Settings,
    /// Fetch on demand, or replicate the whole tree.
    pub mode: replicate::Mode,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// A running gateway.
pub struct Gateway {
    pub vfs: Arc<Vfs>,
    pub nfs_addr: SocketAddr,
    /// The journal sequence the cache reflects, updated as records apply.
    pub cursor: watch::Receiver<u64>,
    /// What the reintegrator has done.
    pub reintegration: watch::Receiver<reintegrate::Progress>,
    /// Bump to make the reintegrator ship now, ignoring the aging window.
    pub hurry: watch::Sender<i64>,
    pub gateway_id: String,
    /// The control socket (`imz status --control PATH`).
    pub control_path: std::path::PathBuf,
    pub control: Arc<Control>,
    /// Where Prometheus metrics are served.
    pub metrics_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The entry that lets `imz status` find this gateway unasked.
    _registration: Option<crate::registry::Registration>,
    /// How portmapper clients learn our ports (standard port only).
    pub portmap: Option<crate::portmap::Presence>,
    /// Why the cache's storage stopped working, once it has.
    storage_failure: watch::Receiver<Option<String>>,
}

impl Gateway {
    pub async fn start(config: GatewayConfig) -> anyhow::Result<Self> {
        let cache_dir = config.cache_dir.clone();
        std::fs::create_dir_all(&cache_dir)
            .with_context(|| format!("creating the cache directory {}", cache_dir.display()))?;
        if crate::restart::restarted() {
            tracing::warn!("restarted after a storage failure: reopening the cache");
        }
        let cache_size = fit_to_disk(&cache_dir, config.cache_size);
        let boot = crate::unstable::boot_id();
        let (cache, unstable_log) = {
            let boot = boot.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let mut cache = Cache::open(&cache_dir, cache_size)
                    .with_context(|| format!("opening the cache in {}", cache_dir.display()))?;
                crate::unstable::recover(
                    &mut cache,
                    &cache_dir,
                    boot.as_deref(),
                    crate::vfs::write::replay_change,
                )
                .context("recovering unstable writes")?;
                let log = crate::unstable::UnstableLog::open(&cache_dir)
                    .context("opening the unstable-write log")?;
                Ok((cache, log))
            })
            .await??
        };
        let cache = Arc::new(cache);
        let (failure_tx, storage_failure) = watch::channel(None);
        cache.on_storage_failure(move |why| {
            failure_tx.send_replace(Some(why.to_owned()));
        });
        let mut origin = OriginClient::new(&config.origin_url, &config.token, config.timeouts)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(path) = &config.token_file {
            origin = origin.with_token_file(path.clone());
        }

        remember_read_only(&cache, &origin)?;
        let connected = meet_origin(&cache, &origin, &config).await?;
        if let Some(store) = cache.read()?.meta_str(meta::ORIGIN_STORE)? {
            origin.expect_store(&store);
        }
        let link = Link::new(connected);
        let metrics = Arc::new(Metrics::default());
        let fetcher = Fetcher::start(
            Arc::clone(&cache),
            origin.clone(),
            Arc::clone(&link),
            Arc::clone(&metrics),
        )
        .context("starting the fetcher")?;
        // Without a boot id a system crash could not be told from a process
        // crash: every write is then answered stable.
        let unstable = boot.map(|boot| (unstable_log, boot));
        let writer =
            Writer::start(Arc::clone(&cache), unstable).context("starting the cache writer")?;
        let vfs = Arc::new(Vfs::new(
            Arc::clone(&cache),
            origin.clone(),
            Arc::clone(&link),
            fetcher,
            writer,
            Arc::clone(&metrics),
        ));

        let start_cursor = cache.read()?.meta_u64(meta::CURSOR)?.unwrap_or(0);
        let (cursor_tx, cursor) = watch::channel(start_cursor);
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(link::run_prober(
            Arc::clone(&link),
            origin.clone(),
            Duration::from_millis(500),
        )));
        let gateway_id = reintegrate::gateway_id(&cache).map_err(|e| anyhow::anyhow!("{e}"))?;
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let keeper = Keeper::new(Arc::clone(&vfs), config.mode, Arc::clone(&gate));
        tasks.push(tokio::spawn(Arc::clone(&keeper).run()));
        tasks.push(tokio::spawn(follow::run_follower(
            Arc::clone(&vfs),
            gateway_id.clone(),
            cursor_tx,
            follow::Hooks {
                gate,
                after: Some(Arc::clone(&keeper) as Arc<dyn follow::AfterApply>),
            },
        )));
        let (progress_tx, reintegration) = watch::channel(reintegrate::Progress::default());
        let (hurry, hurry_rx) = watch::channel(i64::MIN);
        let reintegrator = reintegrate::Reintegrator::new(
            Arc::clone(&vfs),
            gateway_id.clone(),
            config.reintegration.clone(),
            progress_tx,
            hurry_rx,
        );
        tasks.push(tokio::spawn(reintegrator.run()));

        let control = Arc::new(Control {
            vfs: Arc::clone(&vfs),
            origin_url: config.origin_url.clone(),
            cache_dir: std::path::absolute(&config.cache_dir)
                .unwrap_or_else(|_| config.cache_dir.clone()),
            nfs_addr: Default::default(),
            portmapper: Default::default(),
            mode: config.mode.to_string(),
            cursor: cursor.clone(),
            progress: reintegration.clone(),
            hurry: hurry.clone(),
            rates: Default::default(),
            pins: Some(Arc::new(crate::pin::Pins::new(
                Arc::clone(&vfs),
                Arc::clone(&keeper),
            ))),
            replica: Some(keeper.status()),
        });
        let control_path = control::socket_path(&config.cache_dir);
        control::serve(control_path.clone(), Arc::clone(&control)).await?;
        // Only a convenience: `--cache` and `--control` still find it.
        let registration = crate::registry::register(&control_path)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "not registered: control commands need --cache or --control")
            })
            .ok();
        let metrics_addr = match config.metrics_listen {
            Some(addr) => Some(crate::prometheus::serve(addr, Arc::clone(&control)).await?),
            None => None,
        };

        let listener = crate::listener::bind(config.listen, &vfs, cache.generation())
            .await
            .with_context(|| format!("listening for NFS on {}", config.listen))?;
        let nfs_addr = SocketAddr::new(listener.get_listen_ip(), listener.get_listen_port());
        let _ = control.nfs_addr.set(nfs_addr);
        let portmap = crate::portmap::announce(nfs_addr).await;
        let _ = control
            .portmapper
            .set(crate::portmap::describe(portmap.as_ref(), nfs_addr));
        tasks.push(tokio::spawn(crate::listener::keep_serving(
            listener,
            nfs_addr,
            Arc::clone(&vfs),
            cache.generation(),
        )));
        Ok(Self {
            vfs,
            nfs_addr,
            cursor,
            reintegration,
            hurry,
            gateway_id,
            control_path,
            control,
            metrics_addr,
            tasks,
            _registration: registration,
            portmap,
            storage_failure,
        })
    }

    /// Resolves once the cache's storage has stopped working (a write
    /// failed, on a full disk say), with the reason: the gateway must then
    /// restart ([`crate::restart`]).
    pub async fn storage_failure(&self) -> String {
        let mut rx = self.storage_failure.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            // The sender lives in the cache, which outlives this gateway.
            Err(_) => std::future::pending().await,
        }
    }

    /// The addresses this gateway listens on, by role, for a restart
    /// ([`crate::restart::restart_in_place`]).
    pub fn listening(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut addrs = vec![("nfs", self.nfs_addr)];
        addrs.extend(self.metrics_addr.map(|a| ("metrics", a)));
        addrs
    }

    /// What a restart after [`Gateway::storage_failure`] must wait for:
    /// room for redb's recovery and the replay of the unstable-write log.
    pub fn restart_room(&self) -> crate::restart::Room {
        let dir = self.control.cache_dir.clone();
        let log = std::fs::metadata(dir.join(crate::unstable::LOG_FILE)).map_or(0, |m| m.len());
        crate::restart::Room {
            dir,
            bytes: imz_cache::disk::RESERVE + log,
        }
    }

    /// The mount command that works on Linux for this gateway. The ports
    /// are named even when standard: without `port=` and `mountport=` the
    /// kernel asks a portmapper, which knows the gateway only in some cases
    /// (see [`crate::portmap`]); MOUNT is answered on the NFS port, over TCP
    /// only.
    pub fn linux_mount_command(&self, mountpoint: &str) -> String {
        let port = self.nfs_addr.port();
        let host = mount_host(self.nfs_addr);
        format!(
            "mount -t nfs -o vers=3,tcp,nolock,port={port},mountport={port},mountproto=tcp {host}:/{EXPORT} {mountpoint}"
        )
    }

    /// The short Linux mount command, without version or ports: it works
    /// when portmapper clients can learn them ([`Gateway::portmap`]).
    pub fn linux_short_mount_command(&self, mountpoint: &str) -> Option<String> {
        let host = mount_host(self.nfs_addr);
        self.portmap
            .as_ref()
            .map(|_| format!("mount -t nfs -o nolock {host}:/{EXPORT} {mountpoint}"))
    }

    /// The mount command for macOS.
    pub fn macos_mount_command(&self, mountpoint: &str) -> String {
        let port = self.nfs_addr.port();
        let host = mount_host(self.nfs_addr);
        format!(
            "mount -t nfs -o vers=3,tcp,nolocks,port={port},mountport={port} {host}:/{EXPORT} {mountpoint}"
        )
    }

    /// A libnfs URL for `path` under the export.
    pub fn libnfs_url(&self, path: &str) -> String {
        let port = self.nfs_addr.port();
        let host = mount_host(self.nfs_addr);
        format!(
            "nfs://{host}/{EXPORT}/{}?version=3&nfsport={port}&mountport={port}",
            path.trim_start_matches('/')
        )
    }

    /// Stops serving: no new NFS connections are accepted, changes already
    /// queued are committed (their replies go out), and everything in the
    /// cache is made durable. Changes not yet sent to the origin stay in the
    /// log for the next start.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.abort();
        self.vfs
            .writer
            .settle()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("making the cache durable")?;
        Ok(())
    }

    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.abort();
    }
}

/// The cache capacity the disk takes: `requested`, or less, with a
/// warning, when the filesystem holding `dir` lacks the room. Without this
/// the disk would fill before the capacity does, and the cache would stop
/// working (see `imz_cache::disk`) where it should answer NOSPC.
///
/// The cache's own files count as room. Not counted: the disk reserve; the
/// unstable-write log at its largest; twice that again, as redb reuses the
/// pages a commit frees only after the next durable commit, and a stretch
/// of unstable writes rewrites chunks between durable commits (measured: a
/// 326 MiB cache written over grew its file to 572 MB); and 5% of the rest
/// for redb's own overhead.
fn fit_to_disk(dir: &std::path::Path, requested: u64) -> u64 {
    let Ok(available) = imz_cache::disk::available(dir) else {
        return requested;
    };
    let ours: u64 = [imz_cache::store::DB_FILE, crate::unstable::LOG_FILE]
        .iter()
        .filter_map(|name| std::fs::metadata(dir.join(name)).ok())
        .map(|m| m.len())
        .sum();
    let room = (ours + available)
        .saturating_sub(imz_cache::disk::RESERVE + 3 * crate::writer::MAX_UNSTABLE_LOG_BYTES);
    let fits = room / 100 * 95;
    if fits >= requested {
        return requested;
    }
    tracing::warn!(
        "--cache-size {} does not fit: the filesystem holding {} has {} free; the cache holds at most {}",
        bytesize::ByteSize(requested).display().iec(),
        dir.display(),
        bytesize::ByteSize(available).display().iec(),
        bytesize::ByteSize(fits).display().iec(),
    );
    fits
}

/// The host to name in mount commands: the listening address, or for a
/// wildcard one the loopback address of its family (not `localhost`, which
/// resolves to `::1` first on many machines, where an IPv4 listener is not).
fn mount_host(addr: SocketAddr) -> String {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}

/// Seeds the origin client with whether the origin was read-only when last
/// seen, and keeps its word in the cache whenever it changes.
fn remember_read_only(cache: &Arc<Cache>, origin: &OriginClient) -> anyhow::Result<()> {
    let was = cache.read()?.meta_u64(meta::ORIGIN_READ_ONLY)? == Some(1);
    let cache = Arc::clone(cache);
    origin.remember_read_only(was, move |read_only| {
        let cache = Arc::clone(&cache);
        // The hook runs inside a request to the origin: the commit waits
        // for the disk, so it runs on a blocking thread.
        tokio::task::spawn_blocking(move || {
            let kept = cache.write().and_then(|mut tx| {
                tx.put_meta_u64(meta::ORIGIN_READ_ONLY, u64::from(read_only))?;
                tx.commit(true)
            });
            if let Err(e) = kept {
                tracing::warn!(error = %e, "could not note whether the origin is read-only");
            }
        });
    });
    if was {
        tracing::info!(
            "the origin was read-only when last seen: changes are refused until it says otherwise"
        );
    }
    Ok(())
}

/// Checks the origin against the cache: same store, root in place, cursor
/// set. Returns whether the origin is reachable; an unreachable origin is
/// fine if the cache can serve on its own.
async fn meet_origin(
    cache: &Arc<Cache>,
    origin: &OriginClient,
    config: &GatewayConfig,
) -> anyhow::Result<bool> {
    let has_root = cache.read()?.get(ROOT_FILEID)?.is_some();
    let info = match origin.info().await {
        Ok(info) => info,
        Err(OriginError::Unreachable(reason)) if has_root => {
            tracing::warn!(%reason, "origin unreachable at start: serving the cache disconnected");
            return Ok(false);
        }
        Err(OriginError::Unreachable(reason)) => {
            bail!(
                "cannot reach the origin at {} ({reason}), and the cache is empty",
                config.origin_url
            )
        }
        Err(OriginError::TokenRefused) if has_root => {
            tracing::warn!(
                "the origin refuses this gateway's token: serving the cache disconnected until \
                 --token-file holds the origin's token (it is read again twice a second)"
            );
            return Ok(false);
        }
        Err(OriginError::TokenRefused) => {
            bail!(
                "the origin at {} refused our token: check --token-file (it must hold the origin's token)",
                config.origin_url
            )
        }
        Err(e) => bail!(
            "the origin at {} answered unexpectedly: {e}",
            config.origin_url
        ),
    };
    let known_store = cache.read()?.meta_str(meta::ORIGIN_STORE)?;
    if let Some(known) = known_store.as_deref() {
        if known != info.store_id {
            bail!(
                "the cache in {} was filled from another origin (store {known}, this one is {}); use another --cache directory",
                config.cache_dir.display(),
                info.store_id
            );
        }
        return Ok(true);
    }
    // A new cache: the root, the store id, and the cursor at the journal's
    // end (everything fetched from now on is at least that new).
    let cache = Arc::clone(cache);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut tx = cache.write()?;
        tx.put(
            ROOT_FILEID,
            &coherence::new_object(ROOT_FILEID, "", &info.root),
        )?;
        tx.put_meta(meta::ORIGIN_STORE, info.store_id.as_bytes())?;
        tx.put_meta_u64(meta::CURSOR, info.last_seq)?;
        if tx.meta(meta::GATEWAY_ID)?.is_none() {
            let id = uuid::Uuid::new_v4().simple().to_string();
            tx.put_meta(meta::GATEWAY_ID, id.as_bytes())?;
        }
        tx.commit(true)?;
        Ok(())
    })
    .await??;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_commands_name_an_address_the_listener_answers_on() {
        for (listen, host) in [
            ("127.0.0.1:2049", "127.0.0.1"),
            ("0.0.0.0:2049", "127.0.0.1"),
            ("192.0.2.7:2049", "192.0.2.7"),
            ("[::]:2049", "[::1]"),
            ("[2001:db8::1]:2049", "[2001:db8::1]"),
        ] {
            let addr: SocketAddr = listen.parse().expect("address");
            assert_eq!(mount_host(addr), host, "{listen}");
        }
    }
}
