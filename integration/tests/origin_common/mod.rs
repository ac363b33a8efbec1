//! Helpers shared by the origin's end-to-end tests: a blocking HTTP client
//! speaking the wire format to a real `imz origin` process.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use imz_integration::{Imz, OriginProc};
use imz_origin::wire::{
    self, ApiError, Attr, Batch, BatchResult, DirPage, Entry, Info, JournalPage, KeyedOp, ObjectId,
    Record, Seq,
};

pub struct Client {
    pub base: String,
    pub token: String,
    pub http: reqwest::blocking::Client,
}

impl Client {
    pub fn new(origin: &OriginProc) -> Self {
        Self::at(&origin.url, &origin.token)
    }

    pub fn at(base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("http client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(&self.token)
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let resp = self.get(path).send().expect("request");
        let status = resp.status();
        let body = resp.text().expect("body");
        assert!(status.is_success(), "GET {path}: {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// An error answer: status and decoded body.
    pub fn error(&self, req: reqwest::blocking::RequestBuilder) -> (u16, ApiError) {
        let resp = req.send().expect("request");
        let status = resp.status().as_u16();
        let body = resp.text().expect("body");
        let err: ApiError = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("not an ApiError ({status}): {e}: {body}"));
        assert_eq!(err.code.http_status(), status, "status matches the code");
        (status, err)
    }

    pub fn info(&self) -> Info {
        self.json(wire::paths::INFO)
    }

    pub fn attr(&self, id: ObjectId) -> Attr {
        self.json(&wire::paths::object(id))
    }

    pub fn try_lookup(&self, dir: ObjectId, name: &str) -> Option<Entry> {
        let resp = self
            .get(&wire::paths::lookup(dir))
            .query(&[("name", name)])
            .send()
            .expect("lookup");
        if resp.status() == 404 {
            return None;
        }
        assert!(
            resp.status().is_success(),
            "lookup {name}: {}",
            resp.status()
        );
        Some(resp.json().expect("entry"))
    }

    pub fn lookup(&self, dir: ObjectId, name: &str) -> Entry {
        self.try_lookup(dir, name)
            .unwrap_or_else(|| panic!("{name} not found in {dir}"))
    }

    /// Follows a path of names from the root.
    pub fn walk(&self, path: &str) -> Option<Entry> {
        let mut dir = wire::ROOT_ID;
        let mut last = None;
        for name in path.split('/').filter(|n| !n.is_empty()) {
            let e = self.try_lookup(dir, name)?;
            dir = e.attr.id;
            last = Some(e);
        }
        last
    }

    pub fn entries(&self, dir: ObjectId, after: Option<&str>, limit: usize) -> DirPage {
        match self.try_entries(dir, after, limit) {
            Some(page) => page,
            None => panic!("entries: directory {dir} not found"),
        }
    }

    /// A page of `dir`'s entries; `None` if the origin has no such
    /// directory (any more).
    pub fn try_entries(&self, dir: ObjectId, after: Option<&str>, limit: usize) -> Option<DirPage> {
        let mut req = self
            .get(&wire::paths::entries(dir))
            .query(&[("limit", limit.to_string())]);
        if let Some(a) = after {
            req = req.query(&[("after", a)]);
        }
        let resp = req.send().expect("entries");
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        assert!(resp.status().is_success(), "entries: {}", resp.status());
        Some(resp.json().expect("page"))
    }

    pub fn journal(&self, after: Seq, wait_ms: u64) -> JournalPage {
        self.json(&format!(
            "{}?after={after}&wait_ms={wait_ms}",
            wire::paths::JOURNAL
        ))
    }

    /// Every record after `after`.
    pub fn records(&self, after: Seq) -> Vec<Record> {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let page = self.journal(cursor, 0);
            if page.records.is_empty() {
                return out;
            }
            cursor = page.records.last().map(|r| r.seq).unwrap_or(cursor);
            out.extend(page.records);
        }
    }

    pub fn data(&self, id: ObjectId, version: u64) -> reqwest::blocking::Response {
        self.get(&wire::paths::data(id, version))
            .send()
            .expect("data")
    }

    pub fn upload(&self, upload_id: &str, body: Vec<u8>) -> wire::Uploaded {
        let resp = self
            .http
            .put(self.url(&wire::paths::upload(upload_id)))
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .expect("upload");
        assert!(resp.status().is_success(), "upload: {}", resp.status());
        resp.json().expect("uploaded")
    }

    pub fn reintegrate(&self, ops: Vec<KeyedOp>) -> BatchResult {
        let resp = self
            .http
            .post(self.url(wire::paths::REINTEGRATE))
            .bearer_auth(&self.token)
            .json(&Batch { ops })
            .send()
            .expect("reintegrate");
        let status = resp.status();
        let body = resp.text().expect("body");
        assert!(status.is_success(), "reintegrate: {status}: {body}");
        serde_json::from_str(&body).expect("batch result")
    }

    /// Polls `f` until it returns `Some`, failing after `timeout`.
    pub fn eventually<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        eventually(what, timeout, || f(self))
    }
}

/// Polls `f` until it returns `Some`, panicking after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub origin: OriginProc,
    pub client: Client,
}

impl Setup {
    pub fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }
}

/// A fresh origin over `dir/root` (filled by `prepare` before it starts).
pub fn start_with(prepare: impl FnOnce(&Path)) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    prepare(&root);
    let origin = OriginProc::start(&root, &dir.path().join("token")).expect("start origin");
    let client = Client::new(&origin);
    Setup {
        dir,
        origin,
        client,
    }
}

pub fn start() -> Setup {
    start_with(|_| {})
}

/// Starts `imz origin` with extra arguments; returns the process and URL.
pub fn spawn_origin(root: &Path, token_file: &Path, extra: &[&str]) -> (Imz, String) {
    let mut args = vec![
        "origin",
        "--root",
        root.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token_file.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    Imz::spawn(&args, imz_integration::process::ORIGIN_READY).expect("spawn origin")
}

pub fn op(key: &str, op: wire::Op) -> KeyedOp {
    KeyedOp {
        key: key.to_owned(),
        op,
    }
}

pub fn applied(r: &wire::OpResult) -> (&Attr, Seq) {
    match r {
        wire::OpResult::Applied { attr, seq } => (attr, *seq),
        other => panic!("expected applied, got {other:?}"),
    }
}

pub fn conflict(r: &wire::OpResult) -> &wire::Conflict {
    match r {
        wire::OpResult::Conflict(c) => c,
        other => panic!("expected a conflict, got {other:?}"),
    }
}
