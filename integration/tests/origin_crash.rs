//! kill -9 of a real origin during an upload and during reintegration: no
//! partial file in the tree, no torn content, no duplicate on replay.

mod origin_common;

use std::io::Read;
use std::time::Duration;

use imz_origin::wire::{
    self, Change, ErrorCode, NewObject, ObjRef, Op, OpResult, ROOT_ID, SetAttrs,
};
use origin_common::*;

/// A body that sends some bytes, then blocks until its sender is dropped.
struct Stalled {
    first: Vec<u8>,
    rx: std::sync::mpsc::Receiver<()>,
}

impl Read for Stalled {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.first.is_empty() {
            let n = buf.len().min(self.first.len());
            buf[..n].copy_from_slice(&self.first[..n]);
            self.first.drain(..n);
            return Ok(n);
        }
        let _ = self.rx.recv();
        Err(std::io::Error::other("stalled body ends"))
    }
}

#[test]
fn kill_during_an_upload_leaves_no_partial_file() {
    let mut s = start();
    let (tx, rx) = std::sync::mpsc::channel();
    let body = Stalled {
        first: vec![b'p'; 3 << 20],
        rx,
    };
    let url = s.client.url(&wire::paths::upload("half"));
    let token = s.client.token.clone();
    let sender = std::thread::spawn(move || {
        let http = reqwest::blocking::Client::new();
        let _ = http
            .put(url)
            .bearer_auth(token)
            .body(reqwest::blocking::Body::sized(body, 8 << 20))
            .send();
    });
    let partial = s.root().join(".imz/partial");
    eventually(
        "the upload to reach the disk",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(&partial)
                .ok()?
                .flatten()
                .find(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false))
        },
    );
    s.origin.proc.kill9();
    drop(tx);
    let _ = sender.join();
    s.origin.restart().expect("restart");
    let c = Client::new(&s.origin);
    assert!(
        std::fs::read_dir(&partial)
            .expect("partial")
            .next()
            .is_none(),
        "partial uploads cleaned"
    );
    assert!(!s.root().join(".imz/uploads/half").exists());
    assert!(
        c.entries(ROOT_ID, None, 10).entries.is_empty(),
        "nothing in the tree"
    );
    let r = c.reintegrate(vec![op(
        "use-half",
        Op::Create {
            parent: ObjRef::Id(ROOT_ID),
            name: "f".into(),
            object: NewObject::File {
                upload: Some("half".into()),
            },
            attrs: SetAttrs::default(),
        },
    )]);
    match &r.results[0] {
        OpResult::Rejected { error } => assert_eq!(error.code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }
}

fn content(i: usize) -> Vec<u8> {
    format!("content of file {i} ")
        .repeat(200 + i % 50)
        .into_bytes()
}

#[test]
fn kill_during_reintegration_leaves_no_torn_file_and_no_duplicate() {
    let mut s = start();
    const N: usize = 300;
    for i in 0..N {
        s.client.upload(&format!("u{i}"), content(i));
    }
    let ops: Vec<_> = (0..N)
        .map(|i| {
            op(
                &format!("gw:{i}"),
                Op::Create {
                    parent: ObjRef::Id(ROOT_ID),
                    name: format!("f{i:04}"),
                    object: NewObject::File {
                        upload: Some(format!("u{i}")),
                    },
                    attrs: SetAttrs::default(),
                },
            )
        })
        .collect();
    // Send the batches one by one from a thread and kill the origin while
    // they are being applied.
    let batches: Vec<Vec<_>> = ops.chunks(10).map(<[_]>::to_vec).collect();
    let c2 = Client::at(&s.client.base, &s.client.token);
    let b2 = batches.clone();
    let sender = std::thread::spawn(move || {
        for b in b2 {
            let resp = c2
                .http
                .post(c2.url(wire::paths::REINTEGRATE))
                .bearer_auth(&c2.token)
                .json(&wire::Batch { ops: b })
                .send();
            if resp.is_err() {
                return;
            }
        }
    });
    let root = s.root();
    eventually("some creates to land", Duration::from_secs(30), || {
        let n = std::fs::read_dir(&root).ok()?.count();
        (n > 5).then_some(())
    });
    s.origin.proc.kill9();
    let _ = sender.join();
    s.origin.restart().expect("restart");
    let c = Client::new(&s.origin);
    // Every file in the tree is whole.
    for e in std::fs::read_dir(&root).expect("root").flatten() {
        let name = e.file_name().into_string().expect("utf8");
        if name == ".imz" {
            continue;
        }
        let i: usize = name[1..].parse().expect("index");
        assert_eq!(
            std::fs::read(e.path()).expect("read"),
            content(i),
            "{name} torn"
        );
    }
    // The gateway replays everything: each op applies once, nothing conflicts.
    for b in batches {
        let r = c.reintegrate(b);
        for res in &r.results {
            assert!(
                matches!(res, OpResult::Applied { .. } | OpResult::Replayed { .. }),
                "{res:?}"
            );
        }
        assert_eq!(r.results.len(), 10);
    }
    let names: Vec<_> = c
        .entries(ROOT_ID, None, 1000)
        .entries
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        names,
        (0..N).map(|i| format!("f{i:04}")).collect::<Vec<_>>()
    );
    for i in (0..N).step_by(37) {
        let e = c.lookup(ROOT_ID, &format!("f{i:04}")).attr;
        assert_eq!(
            c.data(e.id, e.version).bytes().expect("data").as_ref(),
            content(i).as_slice()
        );
    }
    // One create record per name, keyed, none duplicated by the scan.
    let mut created: Vec<String> = c
        .records(0)
        .into_iter()
        .filter_map(|r| match r.change {
            Change::Create { name, .. } => Some(name),
            _ => None,
        })
        .collect();
    created.sort();
    let before = created.len();
    created.dedup();
    assert_eq!(before, created.len(), "a create journaled twice");
    assert_eq!(created.len(), N);
}
