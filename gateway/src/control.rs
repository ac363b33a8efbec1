//! The control socket: how `imz status`, `imz sync`, `imz conflicts` and
//! `imz pin` talk to a running gateway.
//!
//! A Unix socket beside the cache (`control.sock`, mode 0600, so only the
//! gateway's owner can use it). One JSON request per line, one JSON answer
//! per line, then the connection closes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::conflict::{self, ConflictEntry, ConflictPolicy};
use crate::link::LinkState;
use crate::metrics::{Metrics, RateSample, Rates};
use crate::origin_client::OriginError;
use crate::reintegrate::Progress;
use crate::vfs::Vfs;

/// File name of the socket in the cache directory.
pub const SOCKET_NAME: &str = "control.sock";

/// The socket of the gateway whose cache is in `cache_dir`.
pub fn socket_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(SOCKET_NAME)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Reintegrate now; answer when the log is empty or why it is not.
    Sync {
        timeout_ms: u64,
    },
    ConflictsList,
    ConflictsResolve {
        which: String,
        keep: ConflictPolicy,
    },
    Pin {
        path: String,
        recursive: bool,
    },
    Unpin {
        path: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Synced {
        waited_ms: u64,
    },
    NotSynced {
        reason: String,
        pending: u64,
    },
    Conflicts {
        conflicts: Vec<ConflictEntry>,
    },
    Resolved {
        conflict: ConflictEntry,
    },
    Pinned {
        path: String,
        objects: u64,
        bytes: u64,
    },
    Unpinned {
        path: String,
        objects: u64,
    },
    Error {
        message: String,
    },
}

/// What `imz status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub origin: String,
    /// Where NFS is served (empty until the listener is bound).
    #[serde(default)]
    pub nfs: String,
    /// The cache directory.
    #[serde(default)]
    pub cache_dir: String,
    /// How clients not told the ports find them (empty off port 2049).
    #[serde(default)]
    pub portmapper: String,
    pub mode: String,
    /// The origin serves its tree read-only: changes are refused here.
    #[serde(default)]
    pub read_only: bool,
    pub connected: bool,
    /// Unix seconds of the last connect or disconnect.
    pub since: u64,
    pub disconnect_reason: Option<String>,
    /// Journal records applied / the origin's newest, as last seen.
    pub journal_cursor: u64,
    pub journal_origin_seq: u64,
    pub journal_lag: u64,
    /// Client modification log: records and content bytes waiting.
    pub log_records: u64,
    pub log_bytes: u64,
    /// Files with UNSTABLE writes acknowledged but not yet durable (a
    /// COMMIT, or 2 s without writes, makes them so).
    #[serde(default)]
    pub unstable_files: u64,
    /// Bytes of those writes.
    #[serde(default)]
    pub unstable_bytes: u64,
    pub conflicts: u64,
    pub conflicts_held: u64,
    pub cache_used: u64,
    pub cache_capacity: u64,
    /// Dirty or pinned data (never evicted).
    pub cache_protected: u64,
    pub pinned_bytes: u64,
    pub reads: u64,
    pub read_hits: u64,
    pub hit_ratio: f64,
    pub fetched_bytes: u64,
    pub written_bytes: u64,
    pub reintegrated_ops: u64,
    pub reintegrated_bytes: u64,
    /// Times the NFS listener stopped and was bound again.
    #[serde(default)]
    pub nfs_listener_restarts: u64,
    pub rates: RateSample,
    pub last_error: Option<String>,
    /// Why the cache's storage stopped working, if it did: the gateway
    /// restarts itself once the disk has room (see `restart`).
    #[serde(default)]
    pub storage_failure: Option<String>,
    /// Replication progress and how current kept (pinned) content is.
    #[serde(default)]
    pub replica: Option<crate::replicate::ReplicaStatus>,
}

/// What the control server needs of the running gateway.
pub struct Control {
    pub vfs: Arc<Vfs>,
    pub origin_url: String,
    pub cache_dir: std::path::PathBuf,
    /// Set once NFS is bound (the control socket opens first).
    pub nfs_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// How portmapper clients find the gateway; set with `nfs_addr`.
    pub portmapper: std::sync::OnceLock<String>,
    pub mode: String,
    pub cursor: watch::Receiver<u64>,
    pub progress: watch::Receiver<Progress>,
    pub hurry: watch::Sender<i64>,
    pub rates: Rates,
    pub pins: Option<Arc<dyn Pinning>>,
    pub replica: Option<watch::Receiver<crate::replicate::ReplicaStatus>>,
}

/// Pinning, provided by the replication module.
pub trait Pinning: Send + Sync {
    fn pin(
        &self,
        path: String,
        recursive: bool,
    ) -> futures::future::BoxFuture<'_, Result<(u64, u64), String>>;
    fn unpin(&self, path: String) -> futures::future::BoxFuture<'_, Result<u64, String>>;
    fn pinned_bytes(&self) -> u64;
}

impl Control {
    /// The gateway's status now.
    pub fn status(&self) -> Status {
        self.snapshot(true)
    }

    /// The status; `rates` samples the per-second rates since the previous
    /// sample (a scraper, which computes its own rates, passes `false`).
    pub fn snapshot(&self, rates: bool) -> Status {
        let m = &self.vfs.metrics;
        let (connected, since, reason) = match self.vfs.link.state() {
            LinkState::Connected { since } => (true, since, None),
            LinkState::Disconnected { since, reason } => (false, since, Some(reason)),
        };
        let usage = self.vfs.cache.usage();
        let (log_records, log_bytes) = log_size(&self.vfs).unwrap_or((0, 0));
        let (unstable_files, unstable_bytes) = self.vfs.writer.unstable();
        let conflicts = conflict::list(&self.vfs.cache).unwrap_or_default();
        let reads = Metrics::get(&m.reads);
        let hits = Metrics::get(&m.read_hits);
        let cursor = *self.cursor.borrow();
        let origin_seq = Metrics::get(&m.origin_seq).max(cursor);
        let replica = self.replica.as_ref().map(|r| r.borrow().clone());
        Status {
            read_only: self.vfs.origin.read_only(),
            origin: self.origin_url.clone(),
            nfs: self
                .nfs_addr
                .get()
                .map(ToString::to_string)
                .unwrap_or_default(),
            cache_dir: self.cache_dir.display().to_string(),
            portmapper: self.portmapper.get().cloned().unwrap_or_default(),
            mode: replica
                .as_ref()
                .map_or_else(|| self.mode.clone(), |r| r.mode.clone()),
            connected,
            since: since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            disconnect_reason: reason,
            journal_cursor: cursor,
            journal_origin_seq: origin_seq,
            journal_lag: origin_seq - cursor,
            log_records,
            log_bytes,
            unstable_files: unstable_files as u64,
            unstable_bytes,
            conflicts: conflicts.len() as u64,
            conflicts_held: conflicts
                .iter()
                .filter(|c| c.held.is_some() && c.decision.is_none())
                .count() as u64,
            cache_used: usage.used,
            cache_capacity: usage.capacity,
            cache_protected: usage.protected,
            pinned_bytes: self.pins.as_ref().map_or(0, |p| p.pinned_bytes()),
            reads,
            read_hits: hits,
            hit_ratio: if reads == 0 {
                0.0
            } else {
                hits as f64 / reads as f64
            },
            fetched_bytes: Metrics::get(&m.fetched_bytes),
            written_bytes: Metrics::get(&m.written_bytes),
            reintegrated_ops: Metrics::get(&m.reintegrated_ops),
            reintegrated_bytes: Metrics::get(&m.reintegrated_bytes),
            nfs_listener_restarts: Metrics::get(&m.nfs_listener_restarts),
            rates: if rates {
                self.rates.sample(m)
            } else {
                RateSample::default()
            },
            last_error: self.progress.borrow().last_error.clone(),
            storage_failure: self.vfs.cache.storage_failure().map(str::to_owned),
            replica,
        }
    }

    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Sync { timeout_ms } => self.sync(Duration::from_millis(timeout_ms)).await,
            Request::ConflictsList => match conflict::list(&self.vfs.cache) {
                Ok(conflicts) => Response::Conflicts { conflicts },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::ConflictsResolve { which, keep } => {
                match conflict::decide(&self.vfs, &which, keep).await {
                    Ok(conflict) => {
                        crate::reintegrate::hurry(&self.hurry);
                        Response::Resolved { conflict }
                    }
                    Err(crate::vfs::VfsError::NotFound) => Response::Error {
                        message: format!("no held conflict for {which} (see imz conflicts list)"),
                    },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Pin { path, recursive } => match &self.pins {
                Some(p) => match p.pin(path.clone(), recursive).await {
                    Ok((objects, bytes)) => Response::Pinned {
                        path,
                        objects,
                        bytes,
                    },
                    Err(message) => Response::Error { message },
                },
                None => Response::Error {
                    message: "pinning is not available".into(),
                },
            },
            Request::Unpin { path } => match &self.pins {
                Some(p) => match p.unpin(path.clone()).await {
                    Ok(objects) => Response::Unpinned { path, objects },
                    Err(message) => Response::Error { message },
                },
                None => Response::Error {
                    message: "pinning is not available".into(),
                },
            },
        }
    }

    /// Ships the log now and waits for it to empty.
    async fn sync(&self, timeout: Duration) -> Response {
        let start = Instant::now();
        crate::reintegrate::hurry(&self.hurry);
        loop {
            let (pending, _) = log_size(&self.vfs).unwrap_or((0, 0));
            // Objects a conflict touched are placed as at the origin
            // right after the log is done with them.
            let placing = crate::resync::pending(&self.vfs).unwrap_or(false);
            if pending == 0 && !placing {
                return Response::Synced {
                    waited_ms: start.elapsed().as_millis() as u64,
                };
            }
            if let LinkState::Disconnected { .. } = self.vfs.link.state() {
                // Do not wait for the prober: ask now, the origin may be back.
                match self.vfs.origin.info().await {
                    Ok(_) => {
                        self.vfs.link.up();
                        continue;
                    }
                    Err(OriginError::TokenRefused) if self.vfs.origin.reload_token() => continue,
                    Err(e) => {
                        let why = e.unreachable_reason().unwrap_or_else(|| e.to_string());
                        return Response::NotSynced {
                            reason: format!("the origin is unreachable: {why}"),
                            pending,
                        };
                    }
                }
            }
            let held = conflict::held_objects(&self.vfs.cache)
                .map(|h| h.len())
                .unwrap_or(0);
            if held > 0 && start.elapsed() > Duration::from_millis(500) {
                return Response::NotSynced {
                    reason: format!(
                        "{held} object(s) held by conflicts awaiting `imz conflicts resolve`"
                    ),
                    pending,
                };
            }
            if start.elapsed() > timeout {
                let last = self.progress.borrow().last_error.clone();
                return Response::NotSynced {
                    reason: match last {
                        Some(e) => format!("timed out; last error: {e}"),
                        None => "timed out".into(),
                    },
                    pending,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            crate::reintegrate::hurry(&self.hurry);
        }
    }
}

/// Records in the log, and bytes of content they will upload.
fn log_size(vfs: &Vfs) -> Result<(u64, u64), crate::vfs::VfsError> {
    let rx = vfs.cache.read()?;
    let records = rx.log_records(0, usize::MAX)?;
    let mut bytes = 0;
    for (_, raw) in &records {
        if let Ok(rec) = imz_cache::log::decode(raw)
            && let imz_cache::LogOp::Store { fid } = rec.op
        {
            bytes += rx.get(fid)?.map_or(0, |o| o.attrs.size);
        }
    }
    Ok((records.len() as u64, bytes))
}

/// Serves the control socket at `path` until the task is dropped.
pub async fn serve(path: PathBuf, control: Arc<Control>) -> anyhow::Result<()> {
    // A socket left by a gateway that died: nobody answers on it.
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            anyhow::bail!(
                "another gateway is using the cache (its control socket {} answers)",
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing the stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    crate::listener::pause_after_accept_error(&e).await;
                    continue;
                }
            };
            let control = Arc::clone(&control);
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &control).await {
                    tracing::debug!(error = %e, "control connection failed");
                }
            });
        }
    });
    Ok(())
}

/// Longest request line (requests are small JSON objects; a pin path is
/// the largest part).
const MAX_REQUEST: u64 = 64 << 10;
/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the request line: at most [`MAX_REQUEST`] bytes, within
/// `timeout`; `None` if the client sent nothing.
async fn read_request(
    read: impl AsyncRead + Unpin,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let mut limited = BufReader::new(read.take(MAX_REQUEST + 1));
    match tokio::time::timeout(timeout, limited.read_until(b'\n', &mut line)).await {
        Err(_) => Err(format!("no complete request within {:?}", timeout)),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST => {
            Err(format!("requests are limited to {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => Ok(Some(line)),
    }
}

async fn answer(stream: UnixStream, control: &Control) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let parsed = match read_request(read, REQUEST_TIMEOUT).await {
        Ok(None) => return Ok(()),
        Ok(Some(line)) => {
            serde_json::from_slice::<Request>(&line).map_err(|e| format!("bad request: {e}"))
        }
        Err(e) => Err(e),
    };
    let response = match parsed {
        Ok(req) => {
            use tracing::Instrument;
            let span = tracing::info_span!("control", request = ?req);
            control.handle(req).instrument(span).await
        }
        Err(message) => Response::Error { message },
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// Sends one request to the gateway whose socket is `path`.
pub async fn request(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach a gateway at {} (is it running? pass its --cache directory)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut lines = BufReader::new(read).lines();
    let answer = lines
        .next_line()
        .await?
        .context("the gateway closed the connection")?;
    serde_json::from_str(&answer).context("parsing the gateway's answer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_is_one_bounded_line_sent_in_time() {
        let quick = Duration::from_millis(50);
        let line = b"{\"cmd\":\"status\"}\n".to_vec();
        assert_eq!(read_request(&line[..], quick).await, Ok(Some(line.clone())));
        assert_eq!(read_request(&b""[..], quick).await, Ok(None));
        let huge = vec![b'x'; MAX_REQUEST as usize + 10];
        let err = read_request(&huge[..], quick).await.expect_err("too long");
        assert!(err.contains("limited"), "{err}");
        // Half a request, then silence.
        let (client, server) = tokio::io::duplex(64);
        let mut client = client;
        client.write_all(b"{\"cmd\":\"sta").await.expect("write");
        let err = read_request(server, quick).await.expect_err("stalled");
        assert!(err.contains("no complete request"), "{err}");
    }
}
