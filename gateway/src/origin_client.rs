//! Typed HTTP client for the origin's API (`imz_origin::wire`).
//!
//! Every failure is classified once, here: [`OriginError::Unreachable`]
//! means the origin could not be asked (refused, timed out, 5xx) and the
//! gateway should treat the link as down; so does
//! [`OriginError::TokenRefused`] (the origin answers, but not to this
//! gateway's token, until the token file holds the right one:
//! [`OriginClient::reload_token`]); [`OriginError::Api`] is a definite
//! answer from a working origin.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use imz_origin::wire::{self, ApiError, ErrorCode};
use reqwest::header::HeaderValue;
use reqwest::{Response, StatusCode};
use serde::de::DeserializeOwned;

/// Why a request to the origin failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    /// The origin could not be reached or did not answer in time.
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    /// The origin refuses this gateway's token (401): as good as
    /// unreachable until the token file holds the origin's token.
    #[error(
        "the origin refuses this gateway's token (its --token-file must hold the origin's token)"
    )]
    TokenRefused,
    /// The origin at this address is another store than the one this
    /// cache follows (its state was reset, or another origin took its
    /// address): its ids and versions mean other files, so nothing may be
    /// asked of it. As good as unreachable.
    #[error(
        "the origin at this address is another store (id {found}; this cache follows {expected}): \
         it was reset or replaced. The cache is served as it is and nothing is sent; to follow \
         the new origin, start a gateway with a new --cache"
    )]
    OtherStore { found: String, expected: String },
    /// The origin answered with an error.
    #[error("origin refused: {0}")]
    Api(Box<ApiError>),
    /// The origin answered something this gateway does not understand.
    #[error("unexpected answer from origin: {0}")]
    Protocol(String),
    /// A data body that broke off: the origin ends a transfer early, on
    /// purpose, when the file changes while being sent.
    #[error(
        "the origin ended the transfer early (the file may have changed while being sent): {0}"
    )]
    Cut(String),
    /// The origin answers its health check but not this request, for
    /// longer than [`SLOW_ORIGIN_PATIENCE`]: reachable, so the link stays
    /// up, but this request fails.
    #[error("the origin is reachable but did not answer in time: {0}")]
    Slow(String),
}

/// How long a data request waits for an origin that is reachable but slow
/// to answer it (a disk spinning up, a busy array) before it fails.
pub const SLOW_ORIGIN_PATIENCE: Duration = Duration::from_secs(30);
/// The health check that tells a slow origin from an unreachable one: it
/// touches no disk at the origin, so a live origin answers it at once.
const ALIVE_CHECK: Duration = Duration::from_millis(400);

impl OriginError {
    /// Whether the origin cannot be used now: the link is down.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_) | Self::TokenRefused | Self::OtherStore { .. }
        )
    }

    /// Why the link is down, if this error means it is.
    pub fn unreachable_reason(&self) -> Option<String> {
        match self {
            Self::Unreachable(reason) => Some(reason.clone()),
            other => other.is_unreachable().then(|| other.to_string()),
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api(e) => Some(e.code),
            _ => None,
        }
    }

    /// A data body that broke off ([`Self::Cut`]), or the link.
    fn from_body(err: reqwest::Error) -> Self {
        if err.is_decode() {
            Self::Cut(error_chain(&err))
        } else {
            Self::from_reqwest(err)
        }
    }

    fn from_reqwest(err: reqwest::Error) -> Self {
        if err.is_decode() {
            Self::Protocol(err.to_string())
        } else {
            // Connect errors, timeouts, resets, broken bodies: the link.
            Self::Unreachable(error_chain(&err))
        }
    }
}

/// Sends a request that may be sent twice (a GET), once more if the first
/// attempt failed on its way out: most likely on a pooled connection the
/// origin had just closed (it closes one to cut a transfer of a file that
/// changed), which says nothing about the origin being away. Refused
/// connections and timeouts are not tried again.
async fn send_idempotent(req: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let again = req.try_clone();
    match (req.send().await, again) {
        (Err(e), Some(again)) if failed_on_its_way_out(&e) => {
            tracing::debug!(error = %error_chain(&e), "request failed on its way out; sending it again");
            again.send().await
        }
        (result, _) => result,
    }
}

/// The request failed before any answer, not in connecting and not by
/// timing out: most likely on a pooled connection the origin had closed.
fn failed_on_its_way_out(e: &reqwest::Error) -> bool {
    e.is_request() && !e.is_connect() && !e.is_timeout()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

/// Time limits of origin requests. The gateway promises that a read of
/// uncached data fails within about two seconds when the origin is gone, so
/// metadata and data requests are short; journal long-polls get their wait
/// plus a margin.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Whole request for small metadata requests.
    pub request: Duration,
    /// Longest silence while receiving a data body.
    pub stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(1000),
            request: Duration::from_millis(1500),
            stall: Duration::from_millis(1500),
        }
    }
}

/// What an origin's info says it offers (older origins omit each: no).
#[derive(Debug, Clone, Copy, Default)]
struct Offers {
    upload_extents: bool,
    piece_digests: bool,
    read_only: bool,
    places: bool,
}

type ReadOnlyHook = Box<dyn Fn(bool) + Send + Sync>;

/// Client of one origin. Cheap to clone (shares its connection pool and
/// its token).
#[derive(Clone)]
pub struct OriginClient {
    http: reqwest::Client,
    base: String,
    /// `Bearer TOKEN`; replaced when the token file changes.
    auth: Arc<RwLock<HeaderValue>>,
    /// Where the token came from, if from a file.
    token_file: Option<Arc<PathBuf>>,
    /// What the origin said it offers when last asked for its info.
    offers: Arc<RwLock<Offers>>,
    /// The store this cache follows, once known: an origin that answers
    /// with another is refused ([`OriginError::OtherStore`]).
    store_id: Arc<std::sync::OnceLock<String>>,
    /// Told when the origin's info says read-only otherwise than before.
    read_only_changed: Arc<std::sync::OnceLock<ReadOnlyHook>>,
    timeouts: Timeouts,
}

impl std::fmt::Debug for OriginClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl OriginClient {
    pub fn new(base_url: &str, token: &str, timeouts: Timeouts) -> Result<Self, OriginError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeouts.connect)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(16)
            // Before the origin would close them itself, so that a request
            // never goes out on a connection it is closing.
            .pool_idle_timeout(imz_origin::http::CLIENT_IDLE)
            .build()
            .map_err(|e| OriginError::Protocol(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            auth: Arc::new(RwLock::new(bearer(token)?)),
            token_file: None,
            offers: Arc::new(RwLock::new(Offers::default())),
            store_id: Arc::new(std::sync::OnceLock::new()),
            read_only_changed: Arc::new(std::sync::OnceLock::new()),
            timeouts,
        })
    }

    /// The token was read from `path`: [`Self::reload_token`] reads it again.
    pub fn with_token_file(mut self, path: PathBuf) -> Self {
        self.token_file = Some(Arc::new(path));
        self
    }

    fn auth(&self) -> HeaderValue {
        self.auth.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the token file again (after the origin refused the token: it
    /// may have been given a new one, and so may the file); returns whether
    /// the token changed.
    pub fn reload_token(&self) -> bool {
        let Some(path) = &self.token_file else {
            return false;
        };
        let text = match std::fs::read_to_string(path.as_path()) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot read the token file");
                return false;
            }
        };
        // A file being rewritten may be empty for a moment: keep the token.
        let Ok(new) = token_in(&text)
            .map_err(drop)
            .and_then(|t| bearer(t).map_err(drop))
        else {
            tracing::debug!(path = %path.display(), "no usable token in the token file");
            return false;
        };
        let mut auth = self.auth.write().unwrap_or_else(|p| p.into_inner());
        if *auth == new {
            return false;
        }
        *auth = new;
        tracing::info!(path = %path.display(), "the token file changed: using its new token");
        true
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        timeout: Duration,
    ) -> Result<T, OriginError> {
        let req = self
            .http
            .get(self.url(path))
            .header(reqwest::header::AUTHORIZATION, self.auth())
            .query(query)
            .timeout(timeout);
        let resp = send_idempotent(req)
            .await
            .map_err(OriginError::from_reqwest)?;
        let resp = check(resp).await?;
        resp.json::<T>().await.map_err(OriginError::from_reqwest)
    }

    /// `GET /v1/health` (no token), answered within `within`: is the
    /// origin there at all? It touches no disk at the origin.
    pub async fn health(&self, within: Duration) -> Result<wire::Health, OriginError> {
        let resp = self
            .http
            .get(self.url(wire::paths::HEALTH))
            .timeout(within)
            .send()
            .await
            .map_err(OriginError::from_reqwest)?;
        let resp = check(resp).await?;
        resp.json().await.map_err(OriginError::from_reqwest)
    }

    /// From now on, [`Self::info`] takes an origin for the one this cache
    /// follows only if its store id is `store_id`.
    pub fn expect_store(&self, store_id: &str) {
        let _ = self.store_id.set(store_id.to_owned());
    }

    /// `GET /v1/info`; also notes what the origin says it can take. Fails
    /// with [`OriginError::OtherStore`] when the origin is not the store
    /// this cache follows ([`Self::expect_store`]): that is how the link
    /// comes back up (the prober), so nothing else is asked of it.
    pub async fn info(&self) -> Result<wire::Info, OriginError> {
        let info: wire::Info = self
            .get_json(wire::paths::INFO, &[], self.timeouts.request)
            .await?;
        if let Some(expected) = self.store_id.get()
            && *expected != info.store_id
        {
            return Err(OriginError::OtherStore {
                found: info.store_id,
                expected: expected.clone(),
            });
        }
        let offers = Offers {
            upload_extents: info.upload_extents,
            piece_digests: info.piece_digests,
            read_only: info.read_only,
            places: info.places,
        };
        let before = std::mem::replace(
            &mut *self.offers.write().unwrap_or_else(|p| p.into_inner()),
            offers,
        );
        if before.read_only != offers.read_only {
            if offers.read_only {
                tracing::warn!("the origin serves its tree read-only: changes are refused");
            } else {
                tracing::info!("the origin takes changes again");
            }
            if let Some(hook) = self.read_only_changed.get() {
                hook(offers.read_only);
            }
        }
        Ok(info)
    }

    /// Takes the origin for read-only if `was` (what it last said, kept by
    /// the caller) until its info says otherwise, and calls `changed` each
    /// time it does, so that the caller can keep the new word. A gateway
    /// started while the origin is away thus refuses changes a read-only
    /// origin would refuse, instead of logging them to be held as
    /// conflicts later.
    pub fn remember_read_only(&self, was: bool, changed: impl Fn(bool) + Send + Sync + 'static) {
        self.offers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .read_only = was;
        let _ = self.read_only_changed.set(Box::new(changed));
    }

    /// Whether the origin serves its tree read-only, as it said when last
    /// asked for its info.
    pub fn read_only(&self) -> bool {
        self.offers().read_only
    }

    /// Whether the origin hashes the pieces of a file's content
    /// ([`Self::piece_digests`]), as it said when last asked for its info.
    pub fn hashes_pieces(&self) -> bool {
        self.offers().piece_digests
    }

    /// The BLAKE3 hashes of each `piece` bytes of the first `len` bytes of
    /// `id` at `version`. The origin reads them all, so the time allowed
    /// grows with `len` (at 50 MiB/s).
    pub async fn piece_digests(
        &self,
        id: wire::ObjectId,
        version: wire::Version,
        len: u64,
        piece: u64,
    ) -> Result<wire::Digest, OriginError> {
        let reading = Duration::from_secs_f64(len as f64 / (50u64 << 20) as f64);
        self.get_json(
            &wire::paths::digest(id, version),
            &[("len", len.to_string()), ("piece", piece.to_string())],
            self.timeouts.request + reading,
        )
        .await
    }

    fn offers(&self) -> Offers {
        *self.offers.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether uploads may be sent as extents ([`Self::upload_extents`]):
    /// the origin said so when last asked for its info.
    pub fn takes_upload_extents(&self) -> bool {
        self.offers().upload_extents
    }

    pub async fn getattr(&self, id: wire::ObjectId) -> Result<wire::Attr, OriginError> {
        self.get_json(&wire::paths::object(id), &[], self.timeouts.request)
            .await
    }

    /// Where object `id` is now; `Ok(None)` when the origin has no such
    /// object. Only for an origin that [`Self::knows_places`].
    pub async fn place(&self, id: wire::ObjectId) -> Result<Option<wire::Place>, OriginError> {
        match self
            .get_json(&wire::paths::place(id), &[], self.timeouts.request)
            .await
        {
            Ok(place) => Ok(Some(place)),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether [`Self::place`] may be asked: the origin said so when last
    /// asked for its info (an older one would answer "no such endpoint",
    /// which reads like "no such object").
    pub fn knows_places(&self) -> bool {
        self.offers().places
    }

    /// `Ok(None)` when the name does not exist.
    pub async fn lookup(
        &self,
        dir: wire::ObjectId,
        name: &str,
    ) -> Result<Option<wire::Entry>, OriginError> {
        match self
            .get_json(
                &wire::paths::lookup(dir),
                &[("name", name.to_owned())],
                self.timeouts.request,
            )
            .await
        {
            Ok(entry) => Ok(Some(entry)),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn list_page(
        &self,
        dir: wire::ObjectId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<wire::DirPage, OriginError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        // A big page can take the origin a moment to serialise.
        let timeout = self.timeouts.request * 4;
        self.get_json(&wire::paths::entries(dir), &query, timeout)
            .await
    }

    /// Reads the journal after `after`, waiting up to `wait` for a record.
    pub async fn journal(
        &self,
        after: wire::Seq,
        wait: Duration,
    ) -> Result<wire::JournalPage, OriginError> {
        let poll = |wait: Duration| {
            self.http
                .get(self.url(wire::paths::JOURNAL))
                .header(reqwest::header::AUTHORIZATION, self.auth())
                .query(&[
                    ("after", after.to_string()),
                    ("wait_ms", wait.as_millis().to_string()),
                ])
                .timeout(wait + self.timeouts.request * 2)
        };
        let resp = match poll(wait).send().await {
            // Once more, as any GET, but without the wait: sent again just
            // as the origin was killed, a poll was seen to hang until its
            // timeout (23 s) with nobody left to answer it, and the
            // follower with it.
            Err(e) if failed_on_its_way_out(&e) => {
                tracing::debug!(error = %error_chain(&e), "journal poll failed on its way out; asking once more without waiting");
                poll(Duration::ZERO).send().await
            }
            other => other,
        }
        .map_err(OriginError::from_reqwest)?;
        let resp = check(resp).await?;
        resp.json().await.map_err(OriginError::from_reqwest)
    }

    /// Streams bytes `start..end` of object `id` at `version`; `None` if
    /// they are wholly a hole of a sparse file (all zeros, not sent). The
    /// stream fails with `Unreachable` if it stalls longer than the stall
    /// timeout.
    pub async fn data(
        &self,
        id: wire::ObjectId,
        version: wire::Version,
        start: u64,
        end: u64,
    ) -> Result<Option<impl Stream<Item = Result<Bytes, OriginError>> + Send + use<>>, OriginError>
    {
        let send = send_idempotent(
            self.http
                .get(self.url(&wire::paths::data(id, version)))
                .header(reqwest::header::AUTHORIZATION, self.auth())
                .header(
                    reqwest::header::RANGE,
                    format!("bytes={}-{}", start, end.saturating_sub(1)),
                )
                .header(wire::paths::ACCEPT_HOLES, "1"),
        );
        let resp = self
            .wait_while_alive(send, self.timeouts.request, "an answer to a data request")
            .await?
            .map_err(OriginError::from_reqwest)?;
        let resp = check(resp).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            let hole = resp
                .headers()
                .get(wire::paths::HOLE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            return match hole {
                Some(len) if len == end - start => Ok(None),
                _ => Err(OriginError::Protocol(format!(
                    "data request of {} bytes answered 204 with hole {hole:?}",
                    end - start
                ))),
            };
        }
        if resp.status() != StatusCode::PARTIAL_CONTENT
            && !(start == 0 && resp.status() == StatusCode::OK)
        {
            return Err(OriginError::Protocol(format!(
                "data request answered {} instead of 206",
                resp.status()
            )));
        }
        let stall = self.timeouts.stall;
        let body = resp.bytes_stream();
        let this = self.clone();
        Ok(Some(futures::stream::unfold(
            Box::pin(body),
            move |mut body| {
                let this = this.clone();
                async move {
                    let next = this
                        .wait_while_alive(body.next(), stall, "the rest of the data")
                        .await;
                    match next {
                        Err(e) => Some((Err(e), body)),
                        Ok(None) => None,
                        Ok(Some(item)) => Some((item.map_err(OriginError::from_body), body)),
                    }
                }
            },
        )))
    }

    /// Waits for `fut`, an answer from the origin: `first` at most, less
    /// the time a health check may take; then, for as long as the origin
    /// answers its health check, up to [`SLOW_ORIGIN_PATIENCE`] in all.
    /// An unreachable origin (stopped, or its packets lost) fails the wait
    /// within `first`, as before; a reachable one whose disk is slow (a
    /// drive spinning up) is waited for instead of being taken for gone,
    /// which cut off every read until the prober saw it again.
    async fn wait_while_alive<F: std::future::Future>(
        &self,
        fut: F,
        first: Duration,
        what: &str,
    ) -> Result<F::Output, OriginError> {
        let started = tokio::time::Instant::now();
        let mut fut = std::pin::pin!(fut);
        let mut wait = first.saturating_sub(ALIVE_CHECK);
        loop {
            if let Ok(out) = tokio::time::timeout(wait, &mut fut).await {
                return Ok(out);
            }
            tokio::select! {
                out = &mut fut => return Ok(out),
                alive = self.health(ALIVE_CHECK) => if alive.is_err() {
                    return Err(OriginError::Unreachable(format!("no {what} in time")));
                },
            }
            if started.elapsed() >= SLOW_ORIGIN_PATIENCE {
                return Err(OriginError::Slow(format!(
                    "no {what} in {} s",
                    SLOW_ORIGIN_PATIENCE.as_secs()
                )));
            }
            tracing::debug!(what, waited = ?started.elapsed(), "origin alive but slow; waiting");
            wait = first;
        }
    }
}

/// Longest manifest line accepted (one object's JSON).
const MAX_MANIFEST_LINE: usize = 1 << 20;

impl OriginClient {
    /// `GET /v1/manifest`: the whole tree as of one journal sequence, as a
    /// header and a stream of entries, parents before children. Memory
    /// stays bounded whatever the tree's size; the stream fails with
    /// `Unreachable` if the origin stalls.
    pub async fn manifest(
        &self,
    ) -> Result<
        (
            wire::ManifestHeader,
            impl Stream<Item = Result<wire::ManifestEntry, OriginError>> + Send + use<>,
        ),
        OriginError,
    > {
        let send = self
            .http
            .get(self.url(wire::paths::MANIFEST))
            .header(reqwest::header::AUTHORIZATION, self.auth())
            .send();
        let resp = tokio::time::timeout(self.timeouts.request * 4, send)
            .await
            .map_err(|_| {
                OriginError::Unreachable("no answer to the manifest request in time".into())
            })?
            .map_err(OriginError::from_reqwest)?;
        let resp = check(resp).await?;
        let mut lines = Lines {
            body: Box::pin(resp.bytes_stream()),
            buf: bytes::BytesMut::new(),
            stall: self.timeouts.stall * 4,
            done: false,
        };
        let first = lines
            .next_line()
            .await?
            .ok_or_else(|| OriginError::Protocol("empty manifest".into()))?;
        let header: wire::ManifestHeader = serde_json::from_slice(&first)
            .map_err(|e| OriginError::Protocol(format!("manifest header: {e}")))?;
        let entries = futures::stream::unfold(lines, |mut lines| async move {
            match lines.next_line().await {
                Ok(None) => None,
                Ok(Some(line)) => {
                    let entry = serde_json::from_slice::<wire::ManifestEntry>(&line)
                        .map_err(|e| OriginError::Protocol(format!("manifest entry: {e}")));
                    if entry.is_err() {
                        lines.done = true;
                    }
                    Some((entry, lines))
                }
                Err(e) => {
                    lines.done = true;
                    Some((Err(e), lines))
                }
            }
        });
        Ok((header, entries))
    }
}

type BodyStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static>>;

/// Splits a streamed body into newline-terminated lines.
struct Lines {
    body: BodyStream,
    buf: bytes::BytesMut,
    stall: Duration,
    /// An error was reported: the stream ends.
    done: bool,
}

impl Lines {
    async fn next_line(&mut self) -> Result<Option<Bytes>, OriginError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line = self.buf.split_to(at + 1);
                line.truncate(at);
                if line.is_empty() {
                    continue;
                }
                return Ok(Some(line.freeze()));
            }
            if self.buf.len() > MAX_MANIFEST_LINE {
                return Err(OriginError::Protocol("manifest line too long".into()));
            }
            match tokio::time::timeout(self.stall, self.body.next()).await {
                Err(_) => {
                    return Err(OriginError::Unreachable(
                        "origin stopped sending the manifest".into(),
                    ));
                }
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(OriginError::Unreachable(
                        "the manifest ended in the middle of a line".into(),
                    ));
                }
                Ok(Some(chunk)) => self
                    .buf
                    .extend_from_slice(&chunk.map_err(OriginError::from_reqwest)?),
            }
        }
    }
}

impl OriginClient {
    /// Streams `len` bytes to the origin's upload `upload_id`.
    pub async fn upload(
        &self,
        upload_id: &str,
        body: reqwest::Body,
        len: u64,
    ) -> Result<wire::Uploaded, OriginError> {
        self.put_upload(upload_id, body, len, reqwest::header::CONTENT_LENGTH)
            .await
    }

    /// `PUT /v1/uploads/{id}` of a file of `size` bytes as extents (see
    /// [`wire::paths::UPLOAD_SIZE`]; only where
    /// [`Self::takes_upload_extents`]): holes are not sent.
    pub async fn upload_extents(
        &self,
        upload_id: &str,
        body: reqwest::Body,
        size: u64,
    ) -> Result<wire::Uploaded, OriginError> {
        let header = reqwest::header::HeaderName::from_static(wire::paths::UPLOAD_SIZE);
        self.put_upload(upload_id, body, size, header).await
    }

    /// The upload's PUT, with the file's `size` in `size_header`.
    async fn put_upload(
        &self,
        upload_id: &str,
        body: reqwest::Body,
        size: u64,
        size_header: reqwest::header::HeaderName,
    ) -> Result<wire::Uploaded, OriginError> {
        // Generous for a large file on a slow link, finite for a dead one.
        let timeout = Duration::from_secs(30) + Duration::from_secs(size / (8 << 20));
        let resp = self
            .http
            .put(self.url(&wire::paths::upload(upload_id)))
            .header(reqwest::header::AUTHORIZATION, self.auth())
            .header(size_header, size)
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(OriginError::from_reqwest)?;
        let resp = check(resp).await?;
        resp.json().await.map_err(OriginError::from_reqwest)
    }

    /// Sends a batch of logged operations.
    pub async fn reintegrate(&self, batch: &wire::Batch) -> Result<wire::BatchResult, OriginError> {
        let resp = self
            .http
            .post(self.url(wire::paths::REINTEGRATE))
            .header(reqwest::header::AUTHORIZATION, self.auth())
            .json(batch)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .map_err(OriginError::from_reqwest)?;
        let resp = check(resp).await?;
        resp.json().await.map_err(OriginError::from_reqwest)
    }
}

/// What can be wrong with a token file's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    Empty,
    /// Spaces, line breaks or characters that are not printable ASCII.
    NotHeaderSafe,
}

/// The token in a token file's text (surrounding whitespace ignored). It
/// travels in an HTTP header: printable ASCII, no spaces.
pub fn token_in(text: &str) -> Result<&str, TokenProblem> {
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenProblem::NotHeaderSafe);
    }
    Ok(token)
}

/// `Bearer TOKEN` as a header value (marked sensitive: kept out of logs).
fn bearer(token: &str) -> Result<HeaderValue, OriginError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
        OriginError::Protocol("the token holds characters HTTP cannot carry".into())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Turns error statuses into [`OriginError`]s.
async fn check(resp: Response) -> Result<Response, OriginError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status.is_server_error() {
        // 5xx: the origin (or a proxy in front of it) is not working.
        let body = resp.text().await.unwrap_or_default();
        return Err(OriginError::Unreachable(format!(
            "origin answered {status}: {body}"
        )));
    }
    let bytes = resp.bytes().await.map_err(OriginError::from_reqwest)?;
    match serde_json::from_slice::<ApiError>(&bytes) {
        Ok(err) if err.code == ErrorCode::Unauthorized => Err(OriginError::TokenRefused),
        Ok(err) => Err(OriginError::Api(Box::new(err))),
        Err(_) => Err(OriginError::Protocol(format!(
            "origin answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        ))),
    }
}
