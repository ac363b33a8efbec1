//! The HTTP server: routes, bearer-token check (constant time), one tracing
//! span per request, and the mapping of every failure to a JSON
//! [`ApiError`] with its status. The metadata, journal, manifest and
//! reintegration endpoints live here; data and uploads have their modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tracing::Instrument;

use crate::Shared;
use crate::error::{OriginError, api};
use crate::scan::Dirty;
use crate::wire::{
    self, ApiError, Batch, BatchResult, DirPage, ErrorCode, Health, Kind, ManifestEntry,
    ManifestHeader, ObjectId, ROOT_ID, Seq, paths,
};
use crate::writer::Job;

/// An error answer: JSON [`ApiError`], its status, never cached.
#[derive(Debug)]
pub struct ApiFailure(pub Box<ApiError>);

impl From<ApiError> for ApiFailure {
    fn from(e: ApiError) -> Self {
        Self(Box::new(e))
    }
}

impl From<OriginError> for ApiFailure {
    fn from(e: OriginError) -> Self {
        Self(Box::new(e.into()))
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&*self.0).unwrap_or_default();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

/// JSON in and out, with malformed input answered as a JSON `bad_request`.
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => {
                let mut resp = body.into_response();
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                resp.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                resp
            }
            Err(e) => ApiFailure::from(api(
                ErrorCode::Internal,
                format!("encoding the answer: {e}"),
            ))
            .into_response(),
        }
    }
}

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiFailure::from(api(
                    ErrorCode::TooLarge,
                    format!("JSON bodies are limited to {} bytes", wire::MAX_JSON_BODY),
                )))
            }
            Err(e) => Err(ApiFailure::from(api(ErrorCode::BadRequest, e.body_text()))),
        }
    }
}

/// Path parameters with errors answered as JSON `bad_request`.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Self(v)),
            Err(e) => Err(ApiFailure::from(api(
                ErrorCode::BadRequest,
                path_message(e),
            ))),
        }
    }
}

fn path_message(e: PathRejection) -> String {
    e.body_text()
}

/// Query parameters with errors answered as JSON `bad_request`.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(e) => Err(ApiFailure::from(api(
                ErrorCode::BadRequest,
                query_message(e),
            ))),
        }
    }
}

fn query_message(e: QueryRejection) -> String {
    e.body_text()
}

pub fn router(shared: Arc<Shared>) -> Router {
    let authed = Router::new()
        .route(paths::INFO, get(info))
        .route("/v1/objects/{id}", get(object))
        .route("/v1/objects/{id}/lookup", get(lookup))
        .route("/v1/objects/{id}/entries", get(entries))
        .route("/v1/objects/{id}/place", get(place))
        .route("/v1/data/{id}/{version}", get(crate::data::get))
        .route("/v1/data/{id}/{version}/digest", get(crate::data::digest))
        .route(paths::JOURNAL, get(journal))
        .route(paths::MANIFEST, get(manifest))
        .route(
            "/v1/uploads/{upload_id}",
            put(crate::uploads::put).layer(DefaultBodyLimit::disable()),
        )
        .route(
            paths::REINTEGRATE,
            post(reintegrate).layer(DefaultBodyLimit::max(wire::MAX_JSON_BODY)),
        )
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    Router::new()
        .route(paths::HEALTH, get(health))
        .merge(authed)
        .fallback(not_found)
        .layer(middleware::from_fn(trace_request))
        .with_state(shared)
}

static REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// One span per request, and one line when it ends.
async fn trace_request(req: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "request",
        id = REQUEST_ID.fetch_add(1, Ordering::Relaxed),
        method = %req.method(),
        path = %req.uri().path(),
    );
    async move {
        let start = std::time::Instant::now();
        let resp = next.run(req).await;
        let status = resp.status().as_u16();
        if resp.status().is_server_error() {
            tracing::warn!(status, elapsed = ?start.elapsed(), "answered");
        } else {
            tracing::debug!(status, elapsed = ?start.elapsed(), "answered");
        }
        resp
    }
    .instrument(span)
    .await
}

async fn require_token(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_credentials(v.as_bytes()))
        .unwrap_or(b"");
    let expected = shared.config.token.as_bytes();
    if presented.is_empty() || !bool::from(presented.ct_eq(expected)) {
        let mut resp = ApiFailure::from(api(
            ErrorCode::Unauthorized,
            "missing or wrong bearer token",
        ))
        .into_response();
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    next.run(req).await
}

/// The credentials of an `Authorization: Bearer ...` value; the scheme is
/// case-insensitive (RFC 9110).
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"Bearer ").then_some(rest)
}

async fn not_found() -> ApiFailure {
    ApiFailure::from(api(ErrorCode::NotFound, "no such endpoint"))
}

async fn health(State(shared): State<Arc<Shared>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        last_seq: *shared.seq.borrow(),
    })
}

async fn info(State(shared): State<Arc<Shared>>) -> Result<Json<wire::Info>, ApiFailure> {
    let mut info = shared.store.read()?.info()?;
    info.read_only = shared.config.read_only;
    Ok(Json(info))
}

async fn object(
    State(shared): State<Arc<Shared>>,
    PathParams(id): PathParams<ObjectId>,
) -> Result<Json<wire::Attr>, ApiFailure> {
    match shared.store.read()?.attr(id)? {
        Some(a) => Ok(Json(a)),
        None => Err(api(ErrorCode::NotFound, format!("no object {id}")).into()),
    }
}

async fn place(
    State(shared): State<Arc<Shared>>,
    PathParams(id): PathParams<ObjectId>,
) -> Result<Json<wire::Place>, ApiFailure> {
    match shared.store.read()?.meta(id)? {
        Some(m) => Ok(Json(wire::Place {
            parent: m.parent,
            name: m.name,
            attr: m.attr,
        })),
        None => Err(api(ErrorCode::NotFound, format!("no object {id}")).into()),
    }
}

fn dir_attr(r: &crate::store::Reader, id: ObjectId) -> Result<wire::Attr, ApiFailure> {
    match r.attr(id)? {
        Some(a) if a.kind == Kind::Dir => Ok(a),
        Some(_) => Err(api(
            ErrorCode::WrongKind,
            format!("object {id} is not a directory"),
        )
        .into()),
        None => Err(api(ErrorCode::NotFound, format!("no object {id}")).into()),
    }
}

#[derive(Deserialize)]
struct LookupQuery {
    name: String,
}

async fn lookup(
    State(shared): State<Arc<Shared>>,
    PathParams(id): PathParams<ObjectId>,
    Params(q): Params<LookupQuery>,
) -> Result<Json<wire::Entry>, ApiFailure> {
    wire::validate_name(&q.name, id == ROOT_ID)
        .map_err(|e| api(ErrorCode::InvalidName, format!("{:?}: {e}", q.name)))?;
    let r = shared.store.read()?;
    dir_attr(&r, id)?;
    let child = r.child(id, &q.name)?.ok_or_else(|| {
        api(
            ErrorCode::NotFound,
            format!("no {:?} in directory {id}", q.name),
        )
    })?;
    let attr = r
        .attr(child)?
        .ok_or_else(|| api(ErrorCode::Internal, "dangling directory entry"))?;
    Ok(Json(wire::Entry { name: q.name, attr }))
}

#[derive(Deserialize)]
struct EntriesQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// Entries per page when the client does not say.
const DEFAULT_PAGE: usize = 1000;

async fn entries(
    State(shared): State<Arc<Shared>>,
    PathParams(id): PathParams<ObjectId>,
    Params(q): Params<EntriesQuery>,
) -> Result<Json<DirPage>, ApiFailure> {
    let limit = q
        .limit
        .unwrap_or(DEFAULT_PAGE)
        .clamp(1, wire::MAX_PAGE_ENTRIES);
    let page = tokio::task::spawn_blocking(move || -> Result<DirPage, ApiFailure> {
        let r = shared.store.read()?;
        let dir = dir_attr(&r, id)?;
        let (entries, more) = r.entries(id, q.after.as_deref(), limit)?;
        let next = if more {
            entries.last().map(|e| e.name.clone())
        } else {
            None
        };
        Ok(DirPage { dir, entries, next })
    })
    .await
    .map_err(|e| api(ErrorCode::Internal, format!("listing task: {e}")))??;
    Ok(Json(page))
}

#[derive(Deserialize)]
struct JournalQuery {
    #[serde(default)]
    after: Seq,
    #[serde(default)]
    wait_ms: u64,
    limit: Option<usize>,
}

/// Records per journal page when the client does not say.
const DEFAULT_JOURNAL_PAGE: usize = 1000;

/// `GET /v1/journal`: records after `after`, waiting up to `wait_ms` for one.
async fn journal(
    State(shared): State<Arc<Shared>>,
    Params(q): Params<JournalQuery>,
) -> Result<Response, ApiFailure> {
    let limit = q
        .limit
        .unwrap_or(DEFAULT_JOURNAL_PAGE)
        .clamp(1, wire::MAX_JOURNAL_RECORDS);
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.min(wire::MAX_WAIT_MS));
    let mut seq_rx = shared.seq.subscribe();
    let mut stopping = shared.stopping.subscribe();
    loop {
        seq_rx.borrow_and_update();
        let s = shared.clone();
        let (records, first, last) =
            tokio::task::spawn_blocking(move || -> Result<_, OriginError> {
                let r = s.store.read()?;
                Ok((r.journal(q.after, limit)?, r.first_seq()?, r.last_seq()?))
            })
            .await
            .map_err(|e| api(ErrorCode::Internal, format!("journal task: {e}")))??;
        // A cursor the journal never reached means the origin went back (its
        // directory restored from a backup, say): waiting for the journal to
        // catch up would skip what it records meanwhile.
        let unanswerable = if q.after > last {
            Some(format!(
                "the journal ends at {last}, before {}: the origin went back (restored?)",
                q.after
            ))
        } else if q.after.saturating_add(1) < first {
            Some(format!(
                "records after {} are compacted (oldest held: {first})",
                q.after
            ))
        } else {
            None
        };
        if let Some(why) = unanswerable {
            return Err(ApiError {
                code: ErrorCode::JournalCompacted,
                message: format!("{why}; resynchronise and continue from last_seq {last}"),
                current: None,
            }
            .into());
        }
        let waiting =
            records.is_empty() && tokio::time::Instant::now() < deadline && !*stopping.borrow();
        if !waiting {
            // The records are stored as JSON: splice them, do not re-encode.
            let mut body = Vec::with_capacity(64 + records.iter().map(Vec::len).sum::<usize>());
            body.extend_from_slice(b"{\"records\":[");
            for (i, r) in records.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(r);
            }
            body.extend_from_slice(format!("],\"last_seq\":{last}}}").as_bytes());
            let mut resp = body.into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return Ok(resp);
        }
        tokio::select! {
            _ = seq_rx.changed() => {}
            _ = stopping.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Bytes gathered per chunk of the manifest stream.
const MANIFEST_CHUNK: usize = 64 << 10;

/// `GET /v1/manifest`: the whole tree from one read snapshot, as NDJSON,
/// parents before children, streamed with bounded memory.
async fn manifest(State(shared): State<Arc<Shared>>) -> Result<Response, ApiFailure> {
    let reader = shared.store.read()?;
    let header_line = ManifestHeader {
        seq: reader.last_seq()?,
        root: reader
            .attr(ROOT_ID)?
            .ok_or_else(|| api(ErrorCode::Internal, "no root object"))?,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let tx = crate::data::PieceSender::new(tx, shared.config.send_timeout);
    tokio::task::spawn_blocking(move || {
        let send = |buf: &mut Vec<u8>| tx.send(Ok(Bytes::from(std::mem::take(buf))));
        let mut buf = Vec::with_capacity(MANIFEST_CHUNK);
        let line = |buf: &mut Vec<u8>, v: &dyn erased::Ser| -> bool {
            if v.write(buf).is_err() {
                return false;
            }
            buf.push(b'\n');
            true
        };
        if !line(&mut buf, &header_line) {
            return;
        }
        // Breadth first: every directory's entries before any deeper ones.
        let mut dirs = std::collections::VecDeque::from([ROOT_ID]);
        while let Some(dir) = dirs.pop_front() {
            let children = match reader.child_ids(dir) {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
            for (name, id) in children {
                let attr = match reader.attr(id) {
                    Ok(Some(a)) => a,
                    Ok(None) => continue,
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string())));
                        return;
                    }
                };
                if attr.kind == Kind::Dir {
                    dirs.push_back(id);
                }
                if !line(
                    &mut buf,
                    &ManifestEntry {
                        parent: dir,
                        name,
                        attr,
                    },
                ) {
                    return;
                }
                if buf.len() >= MANIFEST_CHUNK && !send(&mut buf) {
                    return;
                }
            }
        }
        if !buf.is_empty() {
            send(&mut buf);
        }
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

mod erased {
    /// Serialises one NDJSON line of either manifest type.
    pub trait Ser {
        fn write(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn write(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
            serde_json::to_writer(out, self)
        }
    }
}

/// `POST /v1/reintegrate`: hands the batch to the writer and waits for the
/// durable answer.
async fn reintegrate(
    State(shared): State<Arc<Shared>>,
    Json(batch): Json<Batch>,
) -> Result<Json<BatchResult>, ApiFailure> {
    if batch.ops.len() > wire::MAX_BATCH_OPS {
        return Err(api(
            ErrorCode::TooLarge,
            format!("batches are limited to {} operations", wire::MAX_BATCH_OPS),
        )
        .into());
    }
    if let Some(op) = batch
        .ops
        .iter()
        .find(|op| op.key.is_empty() || op.key.len() > wire::MAX_KEY_LEN)
    {
        return Err(api(
            ErrorCode::BadRequest,
            format!(
                "idempotency keys are 1 to {} bytes; one is {}",
                wire::MAX_KEY_LEN,
                op.key.len()
            ),
        )
        .into());
    }
    if batch.ops.is_empty() {
        return Ok(Json(BatchResult {
            results: Vec::new(),
        }));
    }
    if shared.config.read_only {
        let refused = wire::OpResult::Rejected {
            error: api(ErrorCode::PermissionDenied, crate::READ_ONLY),
        };
        return Ok(Json(BatchResult {
            results: vec![refused; batch.ops.len()],
        }));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    shared
        .jobs
        .send(Job::Batch {
            ops: batch.ops,
            reply: tx,
        })
        .await
        .map_err(|_| api(ErrorCode::Unavailable, "the origin is shutting down"))?;
    match rx.await {
        Ok(Ok(result)) => Ok(Json(result)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(api(ErrorCode::Unavailable, "the origin is shutting down").into()),
    }
}

/// Asks the writer to reconcile directories and waits until it has.
pub async fn reconcile_now(shared: &Shared, dirty: Dirty) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if shared
        .jobs
        .send(Job::Reconcile {
            dirty,
            reply: Some(tx),
        })
        .await
        .is_ok()
    {
        let _ = rx.await;
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_credentials;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_required() {
        assert_eq!(bearer_credentials(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"Basic abcdefg"), None);
        assert_eq!(bearer_credentials(b"Bear"), None);
    }
}
