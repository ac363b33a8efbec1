//! `PUT /v1/uploads/{id}`: file content streamed to the staging area under
//! `ROOT/.imz` (same filesystem as the tree, so an install is a rename),
//! fsynced, and kept until an operation installs it or it expires.
//!
//! A body is written under `partial/` and renamed into `uploads/` only when
//! complete and durable: an interrupted upload (client gone, origin killed)
//! never looks finished, and partial files are deleted at start-up.

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
    Data(Bytes),
    Done,
}

pub async fn put(
    State(shared): State<Arc<Shared>>,
    UrlPath(upload_id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Uploaded>, ApiFailure> {
    if !wire::validate_upload_id(&upload_id) {
        return Err(api(
            ErrorCode::BadRequest,
            format!("invalid upload id {upload_id:?}"),
        )
        .into());
    }
    let max = shared.config.max_upload;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
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
                    Some(Msg::Data(b)) => out.push(&b)?,
                    Some(Msg::Done) => break,
                    None => return Err(std::io::Error::other("upload interrupted")),
                }
            }
            let (file, size) = out.finish()?;
            file.sync_all()?;
            std::fs::rename(&partial, &target)?;
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
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => {
                received += b.len() as u64;
                if received > max {
                    failure = Some(
                        api(
                            ErrorCode::TooLarge,
                            format!("uploads are limited to {max} bytes"),
                        )
                        .into(),
                    );
                    break;
                }
                if tx.send(Msg::Data(b)).await.is_err() {
                    break;
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

    /// Writes everything and sizes the file; returns it and its size.
    fn finish(mut self) -> std::io::Result<(std::fs::File, u64)> {
        self.write_out(self.pending.len())?;
        self.file.set_len(self.offset)?;
        Ok((self.file, self.offset))
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
    use super::SparseFile;
    use std::os::unix::fs::MetadataExt;

    fn through_sparse_file(pieces: &[Vec<u8>]) -> (Vec<u8>, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut out = SparseFile::new(std::fs::File::create(&path).expect("create"));
        for piece in pieces {
            out.push(piece).expect("push");
        }
        let (_, size) = out.finish().expect("finish");
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
