//! `PUT /v1/uploads/{id}`: file content streamed to the staging area under
//! `ROOT/.imz` (same filesystem as the tree, so an install is a rename),
//! fsynced, and kept until an operation installs it or it expires.
//!
//! A body is written under `partial/` and renamed into `uploads/` only when
//! complete and durable: an interrupted upload (client gone, origin killed)
//! never looks finished, and partial files are deleted at start-up.

use std::io::Write;
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
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut size = 0u64;
            loop {
                match rx.blocking_recv() {
                    Some(Msg::Data(b)) => {
                        out.write_all(&b)?;
                        size += b.len() as u64;
                    }
                    Some(Msg::Done) => break,
                    None => return Err(std::io::Error::other("upload interrupted")),
                }
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
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
