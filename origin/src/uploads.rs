//! `PUT /v1/uploads/{id}`: file content streamed to the staging area under
//! `ROOT/.imz` (same filesystem as the tree, so an install is a rename),
//! fsynced, and kept until an operation installs it or it expires.
//!
//! A body is written under `partial/` and renamed into `uploads/` only when
//! complete and durable: an interrupted upload (client gone, origin killed)
//! never looks finished, and partial files are deleted at start-up.
//!
//! The body is the file's bytes, or, with [`wire::paths::UPLOAD_SIZE`],
//! its extents ([`Extents`]): then a sparse file's holes are not sent.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;

use crate::Shared;
use crate::error::api;
use crate::server::{ApiFailure, Json};
use crate::wire::{self, ErrorCode, Uploaded};

static PARTIAL_SEQ: AtomicU64 = AtomicU64::new(0);

/// Chunks queued between the network and the disk writer.
const QUEUE: usize = 8;

enum Msg {
    /// What follows goes at this offset (extents only; the bytes between
    /// are a hole).
    At(u64),
    Data(Bytes),
    Done,
}

/// Decoder of an extents body (see [`wire::paths::UPLOAD_SIZE`]).
#[derive(Debug)]
struct Extents {
    size: u64,
    /// End of the last record: the next must start at or after it.
    end: u64,
    /// A record's header, as far as it has arrived.
    head: Vec<u8>,
    /// Bytes of the current record still to come.
    left: u64,
}

impl Extents {
    fn new(size: u64) -> Self {
        Self {
            size,
            end: 0,
            head: Vec::with_capacity(wire::paths::EXTENT_HEAD),
            left: 0,
        }
    }

    /// Turns the next piece of the body into messages for the writer.
    fn feed(&mut self, mut piece: Bytes, out: &mut Vec<Msg>) -> Result<(), String> {
        while !piece.is_empty() {
            if self.left > 0 {
                let n = piece
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                out.push(Msg::Data(piece.split_to(n)));
                self.left -= n as u64;
                continue;
            }
            let n = (wire::paths::EXTENT_HEAD - self.head.len()).min(piece.len());
            self.head.extend_from_slice(&piece.split_to(n));
            let Ok(head) = <&[u8; wire::paths::EXTENT_HEAD]>::try_from(self.head.as_slice()) else {
                continue;
            };
            let (offset, len) = wire::paths::parse_extent_head(head);
            let len = u64::from(len);
            self.head.clear();
            let end = offset
                .checked_add(len)
                .filter(|&end| len > 0 && offset >= self.end && end <= self.size)
                .ok_or_else(|| {
                    format!(
                        "extent of {len} bytes at {offset}: out of order, empty, or past the \
                         size {}",
                        self.size
                    )
                })?;
            self.end = end;
            self.left = len;
            out.push(Msg::At(offset));
        }
        Ok(())
    }

    /// The body ended: it must not end inside a record.
    fn finish(&self) -> Result<(), String> {
        if self.left > 0 || !self.head.is_empty() {
            return Err("the body ends inside an extent".into());
        }
        Ok(())
    }
}

pub async fn put(
    State(shared): State<Arc<Shared>>,
    UrlPath(upload_id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Uploaded>, ApiFailure> {
    if shared.config.read_only {
        return Err(api(ErrorCode::PermissionDenied, crate::READ_ONLY).into());
    }
    if !wire::validate_upload_id(&upload_id) {
        return Err(api(
            ErrorCode::BadRequest,
            format!("invalid upload id {upload_id:?}"),
        )
        .into());
    }
    let max = shared.config.max_upload;
    let mut extents = match headers.get(wire::paths::UPLOAD_SIZE) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
            Some(size) => Some(Extents::new(size)),
            None => {
                return Err(api(
                    ErrorCode::BadRequest,
                    format!("{} must be a size in bytes", wire::paths::UPLOAD_SIZE),
                )
                .into());
            }
        },
    };
    let declared = match &extents {
        Some(e) => Some(e.size),
        None => headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok()),
    };
    if declared.is_some_and(|n| n > max) {
        return Err(api(
            ErrorCode::TooLarge,
            format!("uploads are limited to {max} bytes"),
        )
        .into());
    }
    let partial = shared.partial_dir.join(format!(
        "{upload_id}.{}.{}",
        std::process::id(),
        PARTIAL_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let target = shared.uploads_dir.join(&upload_id);
    let uploads_dir = shared.uploads_dir.clone();
    let sized = extents.as_ref().map(|e| e.size);
    let in_use_by = Arc::clone(&shared);
    let upload_id_staged = upload_id.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(QUEUE);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let result = (|| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&partial)?;
            let mut out = SparseFile::new(file);
            loop {
                match rx.blocking_recv() {
                    Some(Msg::At(offset)) => out.skip_to(offset)?,
                    Some(Msg::Data(b)) => out.push(&b)?,
                    Some(Msg::Done) => break,
                    None => return Err(std::io::Error::other("upload interrupted")),
                }
            }
            let (file, size) = out.finish(sized)?;
            file.sync_all()?;
            {
                // Held across the rename: the writer claims a group's
                // uploads under this lock before it installs any of them.
                let in_use = in_use_by
                    .uploads_in_use
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if in_use.contains(&upload_id_staged) {
                    tracing::info!(upload = %upload_id_staged, "an upload being installed was sent again; the staged one stays");
                    drop(in_use);
                    std::fs::remove_file(&partial)?;
                    return Ok(size);
                }
                std::fs::rename(&partial, &target)?;
            }
            std::fs::File::open(&uploads_dir)?.sync_all()?;
            Ok(size)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    });
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    let mut failure: Option<ApiFailure> = None;
    let mut msgs = Vec::new();
    'body: while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => {
                received += b.len() as u64;
                // An extents body is checked against its declared size.
                if extents.is_none() && received > max {
                    failure = Some(
                        api(
                            ErrorCode::TooLarge,
                            format!("uploads are limited to {max} bytes"),
                        )
                        .into(),
                    );
                    break;
                }
                match &mut extents {
                    None => msgs.push(Msg::Data(b)),
                    Some(e) => {
                        if let Err(why) = e.feed(b, &mut msgs) {
                            failure = Some(api(ErrorCode::BadRequest, why).into());
                            break;
                        }
                    }
                }
                for msg in msgs.drain(..) {
                    if tx.send(msg).await.is_err() {
                        break 'body;
                    }
                }
            }
            Err(e) => {
                failure = Some(
                    api(
                        ErrorCode::BadRequest,
                        format!("reading the upload body: {e}"),
                    )
                    .into(),
                );
                break;
            }
        }
    }
    if failure.is_none()
        && let Some(Err(why)) = extents.as_ref().map(Extents::finish)
    {
        failure = Some(api(ErrorCode::BadRequest, why).into());
    }
    if failure.is_none() {
        let _ = tx.send(Msg::Done).await;
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ApiFailure::from(api(ErrorCode::Internal, format!("upload writer: {e}"))))?;
    if let Some(f) = failure {
        return Err(f);
    }
    match written {
        Ok(size) => Ok(Json(Uploaded { upload_id, size })),
        Err(e) => Err(api(ErrorCode::Internal, format!("staging the upload: {e}")).into()),
    }
}

/// Start-up: partial uploads are garbage; finished ones expire.
pub fn clean_at_start(shared: &Shared) {
    if let Ok(entries) = std::fs::read_dir(&shared.partial_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    expire(&shared.uploads_dir, shared.config.upload_ttl);
}

/// Deletes finished uploads older than `ttl`.
pub fn expire(dir: &Path, ttl: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > ttl);
        if old {
            tracing::info!(upload = %e.file_name().to_string_lossy(), "expiring an upload never installed");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Expires stale uploads periodically.
pub async fn janitor(shared: Arc<Shared>) {
    let every =
        (shared.config.upload_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        tokio::time::sleep(every).await;
        let s = shared.clone();
        let _ =
            tokio::task::spawn_blocking(move || expire(&s.uploads_dir, s.config.upload_ttl)).await;
    }
}

/// Writes a stream into a new file, leaving a hole wherever a whole
/// block is zeros: gateways send a sparse file's holes as zeros, and a
/// 1-byte write 2 GiB into a file used to take 2 GiB of disk here.
struct SparseFile {
    file: std::fs::File,
    /// Bytes not yet written, starting at file offset `offset`.
    pending: Vec<u8>,
    offset: u64,
}

impl SparseFile {
    /// Holes are made of whole blocks of this size, aligned in the file.
    const BLOCK: usize = 4096;
    /// Bytes gathered before they are written.
    const BATCH: usize = 1 << 20;

    fn new(file: std::fs::File) -> Self {
        Self {
            file,
            pending: Vec::with_capacity(Self::BATCH + (64 << 10)),
            offset: 0,
        }
    }

    fn push(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.pending.extend_from_slice(data);
        if self.pending.len() >= Self::BATCH {
            let whole = self.pending.len() / Self::BLOCK * Self::BLOCK;
            self.write_out(whole)?;
        }
        Ok(())
    }

    /// What comes next goes at `offset`, at or past the end of what came
    /// so far: the bytes between stay a hole.
    fn skip_to(&mut self, offset: u64) -> std::io::Result<()> {
        self.write_out(self.pending.len())?;
        if offset < self.offset {
            return Err(std::io::Error::other("extents out of order"));
        }
        self.offset = offset;
        Ok(())
    }

    /// Writes everything and sizes the file (to `size` if given, else to
    /// the end of what came); returns it and its size.
    fn finish(mut self, size: Option<u64>) -> std::io::Result<(std::fs::File, u64)> {
        self.write_out(self.pending.len())?;
        let size = size.unwrap_or(self.offset);
        self.file.set_len(size)?;
        Ok((self.file, size))
    }

    /// Writes the first `n` pending bytes (a multiple of `BLOCK` unless they
    /// are the last), skipping blocks of zeros.
    fn write_out(&mut self, n: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut run_start = None;
        let mut at = 0;
        while at < n {
            let end = (at + Self::BLOCK).min(n);
            let zero = self.pending[at..end].iter().all(|&b| b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(at),
                (true, Some(start)) => {
                    self.file
                        .write_all_at(&self.pending[start..at], self.offset + start as u64)?;
                    run_start = None;
                }
                _ => {}
            }
            at = end;
        }
        if let Some(start) = run_start {
            self.file
                .write_all_at(&self.pending[start..n], self.offset + start as u64)?;
        }
        self.pending.drain(..n);
        self.offset += n as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Extents, Msg, SparseFile};
    use bytes::Bytes;
    use std::os::unix::fs::MetadataExt;

    fn record(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut r = crate::wire::paths::extent_head(offset, data.len() as u32).to_vec();
        r.extend_from_slice(data);
        r
    }

    /// The file an extents body of `size` makes, fed in pieces of `piece`.
    fn through_extents(body: &[u8], size: u64, piece: usize) -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut out = SparseFile::new(std::fs::File::create(&path).expect("create"));
        let mut extents = Extents::new(size);
        let mut msgs = Vec::new();
        for p in body.chunks(piece) {
            extents.feed(Bytes::copy_from_slice(p), &mut msgs)?;
        }
        extents.finish()?;
        for msg in msgs {
            match msg {
                Msg::At(offset) => out.skip_to(offset).expect("skip"),
                Msg::Data(b) => out.push(&b).expect("push"),
                Msg::Done => unreachable!(),
            }
        }
        out.finish(Some(size)).expect("finish");
        Ok(std::fs::read(&path).expect("read"))
    }

    #[test]
    fn extents_make_the_file_with_holes_between_whatever_the_pieces() {
        let size = 3 << 20;
        let mut want = vec![0u8; size];
        want[10..15].copy_from_slice(b"hello");
        want[2 << 20..(2 << 20) + 5].copy_from_slice(b"world");
        let mut body = record(10, b"hello");
        body.extend(record(2 << 20, b"world"));
        for piece in [1, 5, 12, 13, 4096, 1 << 20] {
            let got = through_extents(&body, size as u64, piece).expect("valid");
            assert!(got == want, "pieces of {piece}");
        }
        // No extents at all: a file of zeros of the size.
        assert_eq!(through_extents(&[], 5000, 7).expect("valid"), vec![0; 5000]);
    }

    #[test]
    fn bad_extents_are_refused() {
        let mut backwards = record(100, b"b");
        backwards.extend(record(50, b"a"));
        assert!(
            through_extents(&backwards, 1000, 4096).is_err(),
            "out of order"
        );
        let mut overlapping = record(100, b"bb");
        overlapping.extend(record(101, b"a"));
        assert!(
            through_extents(&overlapping, 1000, 4096).is_err(),
            "overlapping"
        );
        assert!(
            through_extents(&record(998, b"abc"), 1000, 4096).is_err(),
            "past the size"
        );
        assert!(
            through_extents(&record(0, b""), 1000, 4096).is_err(),
            "empty"
        );
        assert!(
            through_extents(&record(u64::MAX, b"x"), u64::MAX, 4096).is_err(),
            "overflow"
        );
        let whole = record(0, b"abc");
        assert!(
            through_extents(&whole[..whole.len() - 1], 1000, 4096).is_err(),
            "cut short"
        );
        assert!(
            through_extents(&whole[..5], 1000, 4096).is_err(),
            "cut in the header"
        );
    }

    fn through_sparse_file(pieces: &[Vec<u8>]) -> (Vec<u8>, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut out = SparseFile::new(std::fs::File::create(&path).expect("create"));
        for piece in pieces {
            out.push(piece).expect("push");
        }
        let (_, size) = out.finish(None).expect("finish");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len() as u64, size);
        let allocated = std::fs::metadata(&path).expect("stat").blocks() * 512;
        (bytes, allocated)
    }

    #[test]
    fn content_comes_out_as_it_went_in_whatever_the_pieces() {
        let mut want = vec![0u8; 3 << 20];
        for (i, b) in want.iter_mut().enumerate() {
            // Data, then zeros over block boundaries, then data again.
            if !(100_000..2_500_000).contains(&i) {
                *b = (i % 251) as u8 | 1;
            }
        }
        want.extend_from_slice(&[0; 10]); // ends in zeros, not a block
        for piece in [1usize, 4095, 4096, 65_537, 1 << 20] {
            let pieces: Vec<Vec<u8>> = want.chunks(piece).map(<[u8]>::to_vec).collect();
            let (got, _) = through_sparse_file(&pieces);
            assert!(got == want, "pieces of {piece} bytes");
        }
    }

    #[test]
    fn zeros_take_no_disk() {
        let mut data = vec![0u8; 64 << 20];
        data.push(1);
        let (got, allocated) = through_sparse_file(&[data.clone()]);
        assert!(got == data);
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");
        let (got, _) = through_sparse_file(&[vec![0u8; 5000]]);
        assert_eq!(got, vec![0u8; 5000]);
    }
}
