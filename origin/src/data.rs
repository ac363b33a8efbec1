//! `GET /v1/data/{id}/{version}`: the content of a file at its current
//! version, with `Range` (one range), a strong ETag and immutable caching.
//!
//! Before answering, the open file's fingerprint is compared with the
//! stored one: a file changed behind the origin's back is reconciled first
//! and answered `version_gone`. While streaming, the fingerprint is checked
//! after every chunk read; if the file changes, the body is aborted so the
//! client sees a truncated transfer, never other bytes under this URL.
//! One blocking thread per download reads large chunks into a small bounded
//! queue, so memory does not grow with the file. A client that accepts
//! holes ([`wire::paths::ACCEPT_HOLES`]) gets a range that is wholly a hole
//! of a sparse file as `204 No Content` and its length, not as zeros.
//!
//! `GET /v1/data/{id}/{version}/digest?len=N` hashes the first `N` bytes
//! of that version instead of sending them, whole or (`&piece=P`) piece by
//! piece: a gateway that holds an older version of a file keeps the chunks
//! that still match, and fetches only the rest (a growing log, a database
//! written in place, are not fetched whole again at each change). A digest
//! whose client hangs up stops hashing.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::Shared;
use crate::error::{api, version_gone};
use crate::fsops::{self, Fingerprint, FsError};
use crate::scan::Dirty;
use crate::server::{ApiFailure, PathParams};
use crate::store::Meta;
use crate::wire::{self, ErrorCode, Kind, ObjectId, Version};
use crate::writer::Job;

/// Chunks read ahead of the network per download.
const DATA_QUEUE: usize = 4;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

pub async fn get(
    State(shared): State<Arc<Shared>>,
    PathParams((id, version)): PathParams<(ObjectId, Version)>,
    headers: HeaderMap,
) -> Result<Response, ApiFailure> {
    if let Some(delay) = test_data_delay() {
        tokio::time::sleep(delay).await;
    }
    let meta = current_file(&shared, id, version)?;
    let etag = wire::etag(id, version);
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        && inm.split(',').any(|t| t.trim() == etag || t.trim() == "*")
    {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        set_cache_headers(resp.headers_mut(), &etag);
        return Ok(resp);
    }
    let size = meta.fp.size;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(r) => match parse_range(r, size) {
            RangeReq::Full => None,
            RangeReq::Part(a, b) => Some((a, b)),
            RangeReq::Unsatisfiable => {
                let mut resp = ApiFailure::from(api(
                    ErrorCode::RangeNotSatisfiable,
                    format!("range {r:?} is outside the {size} bytes of the content"),
                ))
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(resp);
            }
        },
    };
    let permit = download_slot(&shared).await?;
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };
    let holes_accepted = headers
        .get(wire::paths::ACCEPT_HOLES)
        .is_some_and(|v| v.as_bytes() == b"1");
    let chunk = shared.config.read_chunk.max(4096);
    let s = shared.clone();
    let m = meta.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<Option<Opened>, FsError> {
        let Some(file) = open_current(&s, &m)? else {
            return Ok(None);
        };
        if holes_accepted && len > 0 && is_hole(&file, start, len) {
            // Still this version: no data was written into the hole since
            // the fingerprint was taken.
            let st = fsops::fstat(&file)?;
            if Fingerprint::of(&st) != m.fp {
                return Ok(None);
            }
            return Ok(Some(Opened::Hole));
        }
        // A small answer is read here, in one go, and sent whole: no
        // second thread, and headers and body leave together.
        if len <= chunk as u64 {
            return match read_small(&file, m.fp, start, len) {
                Ok(bytes) => Ok(Some(Opened::Read(bytes))),
                Err(e) => {
                    tracing::warn!(error = %e, "aborting a download");
                    Ok(None)
                }
            };
        }
        Ok(Some(Opened::File(file)))
    })
    .await
    .map_err(|e| api(ErrorCode::Internal, format!("open task: {e}")))?;
    let file = match opened {
        Ok(Some(Opened::File(f))) => f,
        Ok(Some(Opened::Read(bytes))) => {
            drop(permit);
            return Ok(data_response(Body::from(bytes), &etag, range, len, size));
        }
        Ok(Some(Opened::Hole)) => {
            drop(permit);
            let mut resp = StatusCode::NO_CONTENT.into_response();
            resp.headers_mut()
                .insert(wire::paths::HOLE, HeaderValue::from(len));
            set_cache_headers(resp.headers_mut(), &etag);
            return Ok(resp);
        }
        Ok(None) | Err(FsError::NotFound) => return Err(changed_behind(&shared, &meta).await),
        Err(e) => return Err(open_failed(e)),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(DATA_QUEUE);
    let fp = meta.fp;
    let tx = PieceSender::new(tx, shared.config.send_timeout);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        stream_file(file, fp, start, len, chunk, &tx);
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    Ok(data_response(body, &etag, range, len, size))
}

/// A wait before each data request is answered, from
/// `IMZ_TEST_DATA_DELAY_MS`: a slow disk (a drive spinning up), for tests
/// (one cannot be had on demand).
fn test_data_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms: u64 = std::env::var("IMZ_TEST_DATA_DELAY_MS").ok()?.parse().ok()?;
        tracing::warn!(ms, "answers to data requests delayed for a test");
        Some(std::time::Duration::from_millis(ms))
    })
}

/// One of the slots that bound the downloads served at once.
async fn download_slot(shared: &Shared) -> Result<tokio::sync::OwnedSemaphorePermit, ApiFailure> {
    Ok(shared
        .downloads
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| api(ErrorCode::Unavailable, "the origin is shutting down"))?)
}

/// The stored file `id`, if `version` is its current one.
fn current_file(shared: &Shared, id: ObjectId, version: Version) -> Result<Meta, ApiFailure> {
    let meta = shared
        .store
        .read()?
        .meta(id)?
        .ok_or_else(|| api(ErrorCode::NotFound, format!("no object {id}")))?;
    if meta.attr.kind != Kind::File {
        return Err(api(ErrorCode::WrongKind, format!("object {id} is not a file")).into());
    }
    if meta.attr.version != version {
        return Err(version_gone(meta.attr).into());
    }
    Ok(meta)
}

/// Opens the file `m` names, if it still holds the stored version (same
/// fingerprint); `None` if it changed or went behind the origin's back.
fn open_current(s: &Shared, m: &Meta) -> Result<Option<File>, FsError> {
    let Ok(Some(path)) = s.store.read().map(|r| r.path_of(m.parent)).and_then(|p| p) else {
        return Err(FsError::NotFound);
    };
    let dir = s.tree.open_dir(&path)?;
    let file = match fsops::open_file(&dir, &m.name, false) {
        Ok(f) => f,
        Err(FsError::NotFound) => return Ok(None),
        Err(e) => return Err(e),
    };
    let st = fsops::fstat(&file)?;
    if Fingerprint::of(&st) != m.fp {
        return Ok(None);
    }
    Ok(Some(file))
}

/// The answer about a file found changed or gone behind the origin's back:
/// it is reconciled first, then the client hears of its new version (or
/// that it is gone).
async fn changed_behind(shared: &Shared, meta: &Meta) -> ApiFailure {
    let id = meta.attr.id;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job::Reconcile {
        dirty: Dirty::dirs([meta.parent]),
        reply: Some(tx),
    };
    if shared.jobs.send(job).await.is_ok() {
        let _ = rx.await;
    }
    let attr = match shared.store.read() {
        Ok(r) => r.attr(id),
        Err(e) => return e.into(),
    };
    match attr {
        Ok(Some(attr)) => version_gone(attr).into(),
        Ok(None) => api(ErrorCode::NotFound, format!("object {id} is gone")).into(),
        Err(e) => e.into(),
    }
}

fn open_failed(e: FsError) -> ApiFailure {
    match e {
        FsError::Escape => api(
            ErrorCode::Escape,
            "a symlink replaces a directory on the path",
        )
        .into(),
        FsError::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied => api(
            ErrorCode::PermissionDenied,
            format!("the origin may not read the file: {e}"),
        )
        .into(),
        FsError::NotFound => api(ErrorCode::NotFound, "the file is gone").into(),
        FsError::Io(e) => api(ErrorCode::Internal, format!("opening the file: {e}")).into(),
    }
}

#[derive(serde::Deserialize)]
pub struct DigestQuery {
    len: u64,
    piece: Option<u64>,
}

/// `GET /v1/data/{id}/{version}/digest?len=N[&piece=P]`: the BLAKE3 hash
/// of the first `N` bytes of that version or, if asked, of each `P`-byte
/// piece of them (see the module doc).
pub async fn digest(
    State(shared): State<Arc<Shared>>,
    PathParams((id, version)): PathParams<(ObjectId, Version)>,
    Query(q): Query<DigestQuery>,
) -> Result<Json<wire::Digest>, ApiFailure> {
    let meta = current_file(&shared, id, version)?;
    if q.len > meta.fp.size {
        return Err(api(
            ErrorCode::RangeNotSatisfiable,
            format!("{} bytes asked of a file of {}", q.len, meta.fp.size),
        )
        .into());
    }
    if let Some(piece) = q.piece
        && !wire::DIGEST_PIECE.contains(&piece)
    {
        return Err(api(
            ErrorCode::BadRequest,
            format!(
                "piece must be {} to {} bytes, not {piece}",
                wire::DIGEST_PIECE.start(),
                wire::DIGEST_PIECE.end()
            ),
        )
        .into());
    }
    // Hashing reads as much as a download: it takes a download's slot.
    let permit = download_slot(&shared).await?;
    let s = shared.clone();
    let m = meta.clone();
    let len = q.len;
    let chunk = shared.config.read_chunk.max(4096);
    let piece = q.piece;
    // A gateway gives up on a digest that takes too long (it then fetches
    // the file whole): hashing on would hold a download slot and read the
    // rest of the file for nothing.
    let gave_up = GaveUp::default();
    let abandoned = Arc::clone(&gave_up.0);
    let hashed = tokio::task::spawn_blocking(move || -> Result<Option<Hashed>, FsError> {
        let _permit = permit;
        let Some(file) = open_current(&s, &m)? else {
            return Ok(None);
        };
        hash_prefix(&file, m.fp, len, chunk, piece, &abandoned).map_err(FsError::Io)
    })
    .await
    .map_err(|e| api(ErrorCode::Internal, format!("digest task: {e}")))?;
    match hashed {
        Ok(Some(Hashed::Whole(hash))) => Ok(Json(wire::Digest {
            len,
            blake3: hash.to_hex().to_string(),
            pieces: Vec::new(),
        })),
        Ok(Some(Hashed::Pieces(pieces))) => Ok(Json(wire::Digest {
            len,
            blake3: String::new(),
            pieces: pieces.iter().map(|h| h.to_hex().to_string()).collect(),
        })),
        Ok(None) | Err(FsError::NotFound) => Err(changed_behind(&shared, &meta).await),
        Err(e) => Err(open_failed(e)),
    }
}

/// Set once the request that started a digest is dropped: its client
/// closed the connection.
#[derive(Default)]
struct GaveUp(Arc<AtomicBool>);

impl Drop for GaveUp {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A prefix's hash, or its pieces' if asked.
#[derive(Debug, PartialEq)]
enum Hashed {
    Whole(blake3::Hash),
    Pieces(Vec<blake3::Hash>),
}

/// The BLAKE3 hash of the first `len` bytes of `file`, or of each `piece`
/// bytes of them if given, read `chunk` bytes at a time; `None` if the file
/// changed meanwhile (its fingerprint is no longer `fp`), or if `gave_up`
/// was set (nobody waits for the answer).
fn hash_prefix(
    file: &File,
    fp: Fingerprint,
    len: u64,
    chunk: usize,
    piece: Option<u64>,
    gave_up: &AtomicBool,
) -> std::io::Result<Option<Hashed>> {
    let _ = rustix::fs::fadvise(
        file,
        0,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::Sequential,
    );
    let mut hasher = blake3::Hasher::new();
    let mut pieces = Vec::new();
    let piece_len = piece.unwrap_or(u64::MAX);
    let mut offset = 0u64;
    while offset < len {
        if gave_up.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // Reads never straddle the end of a piece.
        let piece_end = (offset / piece_len)
            .saturating_add(1)
            .saturating_mul(piece_len);
        let want = (len.min(piece_end) - offset).min(chunk as u64) as usize;
        let Some(bytes) = read_piece(file, offset, want)? else {
            return Ok(None);
        };
        hasher.update(&bytes);
        offset += want as u64;
        if piece.is_some() && (offset == piece_end || offset == len) {
            pieces.push(hasher.finalize());
            hasher.reset();
        }
    }
    if Fingerprint::of(&rustix::fs::fstat(file)?) != fp {
        return Ok(None);
    }
    Ok(Some(match piece {
        None => Hashed::Whole(hasher.finalize()),
        Some(_) => Hashed::Pieces(pieces),
    }))
}

/// What opening a download gave: the file to stream, or a small answer
/// already read.
enum Opened {
    File(File),
    Read(Bytes),
    /// The range is wholly a hole: zeros the file does not store.
    Hole,
}

/// Whether `start..start+len` of `file` is wholly a hole (no data: the
/// next data starts past it, or there is none). Filesystems that cannot
/// tell say no.
fn is_hole(file: &File, start: u64, len: u64) -> bool {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(start)) {
        Ok(data) => data >= start + len,
        Err(e) => e == rustix::io::Errno::NXIO,
    }
}

/// Reads `len` bytes from `start` whole, then checks that the file did not
/// change meanwhile.
fn read_small(file: &File, fp: Fingerprint, start: u64, len: u64) -> std::io::Result<Bytes> {
    let buf = read_piece(file, start, len as usize)?.ok_or_else(shrank)?;
    if Fingerprint::of(&rustix::fs::fstat(file)?) != fp {
        return Err(std::io::Error::other("the file changed while being served"));
    }
    Ok(Bytes::from(buf))
}

fn data_response(
    body: Body,
    etag: &str,
    range: Option<(u64, u64)>,
    len: u64,
    size: u64,
) -> Response {
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    set_cache_headers(h, etag);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

fn set_cache_headers(h: &mut HeaderMap, etag: &str) {
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    // A cache in front of the origin must not give a hole's answer to a
    // client that asked for bytes.
    h.insert(
        header::VARY,
        HeaderValue::from_static(wire::paths::ACCEPT_HOLES),
    );
}

/// Reads `len` bytes from `start`, checking the fingerprint after each
/// read; sends an error (which aborts the HTTP body) if the file changed.
fn stream_file(file: File, fp: Fingerprint, start: u64, len: u64, chunk: usize, tx: &PieceSender) {
    let _ = rustix::fs::fadvise(
        &file,
        start,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::Sequential,
    );
    let mut offset = start;
    let end = start + len;
    while offset < end {
        let want = ((end - offset) as usize).min(chunk);
        let piece = read_piece(&file, offset, want)
            .and_then(|piece| piece.ok_or_else(shrank))
            .and_then(|piece| match rustix::fs::fstat(&file) {
                Ok(st) if Fingerprint::of(&st) == fp => Ok(piece),
                Ok(_) => Err(std::io::Error::other("the file changed while being served")),
                Err(e) => Err(e.into()),
            });
        let buf = match piece {
            Ok(buf) => buf,
            Err(e) => {
                tracing::warn!(error = %e, "aborting a download");
                let _ = tx.send(Err(e));
                return;
            }
        };
        offset += buf.len() as u64;
        if !tx.send(Ok(Bytes::from(buf))) {
            return; // client gone, or not reading
        }
    }
}

/// Reads `want` bytes at `at`; `None` if the file ends before.
fn read_piece(file: &File, at: u64, want: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf: Vec<u8> = Vec::with_capacity(want);
    while buf.len() < want {
        let offset = at + buf.len() as u64;
        // Reads into the vector's spare capacity (no zeroing); rustix sets
        // the length to what was read.
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), offset) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e == rustix::io::Errno::INTR => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(want);
    Ok(Some(buf))
}

fn shrank() -> std::io::Error {
    std::io::Error::other("the file shrank while being served")
}

/// A `Range` header, as far as this server honours it.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeReq {
    /// No usable range (multiple ranges, other units, garbage): send all.
    Full,
    /// Inclusive byte range within the content.
    Part(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range against a content of `size` bytes.
pub fn parse_range(header: &str, size: u64) -> RangeReq {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeReq::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last N bytes.
        return match b.parse::<u64>() {
            Ok(0) => RangeReq::Unsatisfiable,
            Ok(_) if size == 0 => RangeReq::Unsatisfiable,
            Ok(n) => RangeReq::Part(size.saturating_sub(n), size - 1),
            Err(_) => RangeReq::Full,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeReq::Full;
    };
    let end = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(size.saturating_sub(1)),
            _ => return RangeReq::Full,
        }
    };
    if start >= size {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Part(start, end)
}

/// Hands a streamed response's pieces to its connection, from a blocking
/// thread. A client that takes nothing for `timeout` loses the response,
/// so that its thread (and download slot) is freed rather than held for
/// ever (probing found 256 unread downloads blocking every other one).
pub(crate) struct PieceSender {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    timeout: std::time::Duration,
    runtime: tokio::runtime::Handle,
}

impl PieceSender {
    /// Call from the task that will run the blocking thread.
    pub(crate) fn new(
        tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
        timeout: std::time::Duration,
    ) -> Self {
        Self {
            tx,
            timeout,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Whether the piece went out; false once the client is gone or has
    /// read nothing for the timeout.
    pub(crate) fn send(&self, piece: Result<Bytes, std::io::Error>) -> bool {
        use tokio::sync::mpsc::error::SendTimeoutError;
        match self
            .runtime
            .block_on(self.tx.send_timeout(piece, self.timeout))
        {
            Ok(()) => true,
            Err(SendTimeoutError::Timeout(_)) => {
                tracing::info!(
                    "a client read nothing for {:?}: dropping its response",
                    self.timeout
                );
                false
            }
            Err(SendTimeoutError::Closed(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeReq::Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), RangeReq::Part(90, 99));
        assert_eq!(parse_range("bytes=90-1000", 100), RangeReq::Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), RangeReq::Part(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), RangeReq::Part(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeReq::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), RangeReq::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 100), RangeReq::Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeReq::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeReq::Full);
        assert_eq!(parse_range("bytes=x-1", 100), RangeReq::Full);
    }

    #[test]
    fn a_digest_nobody_waits_for_stops() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content)?;
        let file = File::open(&path)?;
        let fp = Fingerprint::of(&rustix::fs::fstat(&file)?);
        let waited = AtomicBool::new(false);
        let hashed = hash_prefix(&file, fp, 100_000, 4096, Some(40_000), &waited)?;
        let want: Vec<_> = content.chunks(40_000).map(blake3::hash).collect();
        assert_eq!(hashed, Some(Hashed::Pieces(want)));
        let gave_up = GaveUp::default();
        let flag = Arc::clone(&gave_up.0);
        drop(gave_up);
        assert!(hash_prefix(&file, fp, 100_000, 4096, None, &flag)?.is_none());
        Ok(())
    }
}
