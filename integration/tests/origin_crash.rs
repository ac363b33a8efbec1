//! kill -9 of a real origin during an upload and during reintegration: no
//! partial file in the tree, no torn content, no duplicate on replay.

mod origin_common;

use std::io::Read;
use std::path::Path;
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

/// An origin whose copies across filesystems each pause, linked in with
/// their original still there, until the test kills it
/// (`IMZ_TEST_ACROSS_PAUSE_MS`).
struct PausedOrigin {
    origin: imz_integration::OriginProc,
}

impl PausedOrigin {
    const PAUSED: [&str; 2] = ["env", "IMZ_TEST_ACROSS_PAUSE_MS=60000"];

    fn start(root: &std::path::Path, token: &std::path::Path, extra: &[String]) -> Self {
        let origin = imz_integration::OriginProc::start_full(
            &Self::PAUSED.map(str::to_owned),
            root,
            token,
            "127.0.0.1:0",
            extra,
        )
        .expect("start origin");
        Self { origin }
    }

    fn client(&self) -> Client {
        Client::new(&self.origin)
    }

    /// Sends `keyed`, waits until the copy at `copy` holds `body` (its
    /// `original` still there: the pause), kills the origin there and
    /// restarts it (pausing again only if `pause_after`), then replays
    /// `keyed`: it must apply once, and the original be gone.
    fn kill_in_the_window_and_replay(
        &mut self,
        keyed: &wire::KeyedOp,
        (copy, body): (&std::path::Path, &[u8]),
        original: &std::path::Path,
        pause_after: bool,
    ) {
        let sender = send_unanswered(self.client(), keyed.clone());
        eventually("the copy to be linked in", Duration::from_secs(30), || {
            let linked = std::fs::read(copy).is_ok_and(|got| got == body);
            assert!(
                !linked || original.exists(),
                "{} went before the pause",
                original.display()
            );
            linked.then_some(())
        });
        self.origin.proc.kill9();
        let _ = sender.join();
        let wrapper = if pause_after {
            Self::PAUSED.map(str::to_owned).to_vec()
        } else {
            Vec::new()
        };
        self.origin
            .restart_through(&wrapper)
            .expect("restart origin");
        let r = self.client().reintegrate(vec![keyed.clone()]);
        assert!(
            matches!(
                r.results.as_slice(),
                [OpResult::Applied { .. } | OpResult::Replayed { .. }]
            ),
            "{}: {:?}",
            keyed.key,
            r.results
        );
        assert!(
            !original.exists(),
            "{} left behind after the replay",
            original.display()
        );
    }
}

/// A tree at `dir/root` holding `old.txt`, and a tmpfs of its own at
/// `dir/state` for the origin's state (`extra`, its arguments): uploads are
/// staged on another filesystem than the tree.
fn tree_with_state_elsewhere(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    imz_integration::mount::Tmpfs,
    [String; 2],
) {
    let root = dir.join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    std::fs::write(root.join("old.txt"), b"as it was").expect("old.txt");
    let state = dir.join("state");
    let tmpfs =
        imz_integration::mount::Tmpfs::mount(&state, 256 << 20).expect("tmpfs for the state");
    let extra = ["--state".to_owned(), state.display().to_string()];
    (root, state, tmpfs, extra)
}

/// A tree (`DIR/root`) with a tmpfs mounted at `mnt` inside it, so that a
/// rename into it crosses filesystems: the root, the mount point, and the
/// mount (gone when dropped).
fn tree_with_a_mount(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    imz_integration::mount::Tmpfs,
) {
    let root = dir.join("root");
    let inner = root.join("mnt");
    std::fs::create_dir(&root).expect("mkdir root");
    let tmpfs =
        imz_integration::mount::Tmpfs::mount(&inner, 64 << 20).expect("tmpfs inside the tree");
    (root, inner, tmpfs)
}

/// Sends `keyed` as a batch from a thread of its own, whose answer never
/// comes when the origin is killed while applying it.
fn send_unanswered(c: Client, keyed: wire::KeyedOp) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = c
            .http
            .post(c.url(wire::paths::REINTEGRATE))
            .bearer_auth(&c.token)
            .json(&wire::Batch { ops: vec![keyed] })
            .send();
    })
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".imz")
        .collect();
    names.sort();
    names
}

/// A tree on another filesystem than the origin's state gets an upload as
/// a copy, linked at its name before the staged upload is removed. kill -9
/// between the two used to end, on replay, as a conflict with the file's
/// own copy (both kept). The replayed create and write must each apply
/// once, and nothing be left staged.
#[test]
fn kill_between_linking_a_copied_upload_and_unstaging_it_replays_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, state, _state, extra) = tree_with_state_elsewhere(dir.path());
    let mut origin = PausedOrigin::start(&root, &dir.path().join("token"), &extra);
    let old = origin.client().lookup(ROOT_ID, "old.txt").attr;

    let new_content = content(1);
    let rewritten = content(2);
    let batches = [
        (
            "u-new",
            new_content.clone(),
            op(
                "gw:new",
                Op::Create {
                    parent: ObjRef::Id(ROOT_ID),
                    name: "new.bin".into(),
                    object: NewObject::File {
                        upload: Some("u-new".into()),
                    },
                    attrs: SetAttrs::default(),
                },
            ),
            "new.bin",
        ),
        (
            "u-old",
            rewritten.clone(),
            op(
                "gw:rewrite",
                Op::Write {
                    id: ObjRef::Id(old.id),
                    base: wire::Base::Version(old.version),
                    upload: "u-old".into(),
                    mtime: None,
                },
            ),
            "old.txt",
        ),
    ];
    for (i, (upload, body, keyed, name)) in batches.iter().enumerate() {
        origin.client().upload(upload, body.clone());
        origin.kill_in_the_window_and_replay(
            keyed,
            (&root.join(name), body),
            &state.join("uploads").join(upload),
            i + 1 < batches.len(),
        );
    }

    let c = origin.client();
    assert_eq!(
        names_in(&root),
        ["new.bin", "old.txt"],
        "conflict copies in the tree?"
    );
    assert_eq!(
        std::fs::read(root.join("new.bin")).expect("new.bin"),
        new_content
    );
    assert_eq!(
        std::fs::read(root.join("old.txt")).expect("old.txt"),
        rewritten
    );
    let served = c.lookup(ROOT_ID, "old.txt").attr;
    assert_eq!(served.id, old.id, "the rewritten file changed identity");
    assert_eq!(
        c.data(served.id, served.version)
            .bytes()
            .expect("data")
            .as_ref(),
        rewritten.as_slice()
    );
    let creates = c
        .records(0)
        .into_iter()
        .filter(|r| matches!(&r.change, Change::Create { name, .. } if name == "new.bin"))
        .count();
    assert_eq!(creates, 1, "new.bin created {creates} times");
}

/// A rename into a filesystem mounted inside the tree moves the file as
/// `mv` does: a copy linked at the new name, then the old name removed.
/// kill -9 between the two used to leave the rename counted as not
/// applied, and its replay met the file's own copy: a conflict, the file
/// twice. The replayed moves, to a free name and over a file, must each
/// apply once and keep the file's identity.
#[test]
fn kill_between_linking_a_moved_copy_and_removing_its_original_replays_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, inner, _inner) = tree_with_a_mount(dir.path());
    let (a, b) = (content(3), content(4));
    std::fs::write(root.join("a.bin"), &a).expect("a.bin");
    std::fs::write(root.join("b.bin"), &b).expect("b.bin");
    std::fs::write(inner.join("c.txt"), b"to be replaced").expect("c.txt");
    let mut origin = PausedOrigin::start(&root, &dir.path().join("token"), &[]);
    let c = origin.client();
    let mnt = c.lookup(ROOT_ID, "mnt").attr;
    let (a_attr, b_attr) = (
        c.lookup(ROOT_ID, "a.bin").attr,
        c.lookup(ROOT_ID, "b.bin").attr,
    );
    let c_attr = c.lookup(mnt.id, "c.txt").attr;
    let before = c.records(0).last().map_or(0, |r| r.seq);

    let moves = [
        (
            op(
                "gw:move-a",
                Op::Rename {
                    from_parent: ObjRef::Id(ROOT_ID),
                    from_name: "a.bin".into(),
                    id: ObjRef::Id(a_attr.id),
                    base: wire::Base::Version(a_attr.version),
                    to_parent: ObjRef::Id(mnt.id),
                    to_name: "a.bin".into(),
                    replace: None,
                },
            ),
            ("a.bin", "a.bin", &a),
        ),
        (
            op(
                "gw:move-b-over-c",
                Op::Rename {
                    from_parent: ObjRef::Id(ROOT_ID),
                    from_name: "b.bin".into(),
                    id: ObjRef::Id(b_attr.id),
                    base: wire::Base::Version(b_attr.version),
                    to_parent: ObjRef::Id(mnt.id),
                    to_name: "c.txt".into(),
                    replace: Some((ObjRef::Id(c_attr.id), wire::Base::Version(c_attr.version))),
                },
            ),
            ("b.bin", "c.txt", &b),
        ),
    ];
    for (i, (keyed, (from, to, body))) in moves.iter().enumerate() {
        origin.kill_in_the_window_and_replay(
            keyed,
            (&inner.join(to), body),
            &root.join(from),
            i + 1 < moves.len(),
        );
    }

    let c = origin.client();
    assert_eq!(names_in(&root), ["mnt"], "conflict copies in the tree?");
    assert_eq!(
        names_in(&inner),
        ["a.bin", "c.txt"],
        "leftovers in the mount?"
    );
    assert_eq!(std::fs::read(inner.join("a.bin")).expect("a.bin"), a);
    assert_eq!(std::fs::read(inner.join("c.txt")).expect("c.txt"), b);
    for (name, was) in [("a.bin", &a_attr), ("c.txt", &b_attr)] {
        let served = c.lookup(mnt.id, name).attr;
        assert_eq!(served.id, was.id, "mnt/{name} changed identity");
    }
    let changes: Vec<Change> = c.records(before).into_iter().map(|r| r.change).collect();
    assert!(
        matches!(
            changes.as_slice(),
            [Change::Rename { .. }, Change::Rename { .. }]
        ),
        "two moves journaled as {changes:?}"
    );
}

/// Starts an origin on `root` that pauses between linking a replacement
/// across filesystems at its temporary name and renaming it over the file
/// (`IMZ_TEST_REPLACE_PAUSE_MS`), sends `keyed`, waits until `leftover`
/// (that name) holds `body`, kills the origin there and restarts it
/// without the pause.
fn kill_while_a_replacement_is_linked(
    origin: imz_integration::OriginProc,
    keyed: &wire::KeyedOp,
    (leftover, body): (&std::path::Path, &[u8]),
) -> imz_integration::OriginProc {
    let mut origin = origin;
    let sender = send_unanswered(Client::new(&origin), keyed.clone());
    eventually(
        "the replacement to be linked",
        Duration::from_secs(30),
        || {
            std::fs::read(leftover)
                .is_ok_and(|got| got == body)
                .then_some(())
        },
    );
    origin.proc.kill9();
    let _ = sender.join();
    origin.restart_through(&[]).expect("restart origin");
    origin
}

const REPLACE_PAUSED: [&str; 2] = ["env", "IMZ_TEST_REPLACE_PAUSE_MS=60000"];

/// Checks what a restarted origin shows after a crash in a replacement
/// (see [`kill_while_a_replacement_is_linked`]): no leftover name in
/// `dir`, which holds `names`, and nothing journaled after `seq_before`;
/// then replays `keyed`, which must apply once, with nothing else
/// journaled.
fn replay_after_a_killed_replacement(
    c: &Client,
    dir: &std::path::Path,
    names: &[&str],
    seq_before: wire::Seq,
    keyed: wire::KeyedOp,
) {
    assert_eq!(names_in(dir), names, "the crash left its name behind");
    let own = c.records(seq_before);
    assert!(own.is_empty(), "the restarted origin journaled {own:?}");
    let key = keyed.key.clone();
    let r = c.reintegrate(vec![keyed]);
    assert!(
        matches!(r.results.as_slice(), [OpResult::Applied { .. }]),
        "{:?}",
        r.results
    );
    let records = c.records(seq_before);
    assert!(
        records.len() == 1 && records[0].key.as_deref() == Some(key.as_str()),
        "{records:?}"
    );
}

/// A write of `body` over `old.txt` (upload `upload`, key `key`) in a
/// tree whose state is on another filesystem, killed between linking its
/// copy at the temporary name and renaming it over the file; the origin
/// restarted.
struct KilledWrite {
    origin: imz_integration::OriginProc,
    root: std::path::PathBuf,
    old: wire::Attr,
    seq_before: wire::Seq,
    keyed: wire::KeyedOp,
    _state: imz_integration::mount::Tmpfs,
    _dir: tempfile::TempDir,
}

fn kill_a_write_while_its_replacement_is_linked(
    key: &str,
    upload: &str,
    body: &[u8],
) -> KilledWrite {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, _, state, extra) = tree_with_state_elsewhere(dir.path());
    let origin = imz_integration::OriginProc::start_full(
        &REPLACE_PAUSED.map(str::to_owned),
        &root,
        &dir.path().join("token"),
        "127.0.0.1:0",
        &extra,
    )
    .expect("start origin");
    let c = Client::new(&origin);
    let old = c.lookup(ROOT_ID, "old.txt").attr;
    let seq_before = c.records(0).last().map_or(0, |r| r.seq);
    c.upload(upload, body.to_vec());
    let keyed = op(
        key,
        Op::Write {
            id: ObjRef::Id(old.id),
            base: wire::Base::Version(old.version),
            upload: upload.into(),
            mtime: None,
        },
    );
    let leftover = root.join(format!("{}{upload}", wire::INSTALLING_PREFIX));
    let origin = kill_while_a_replacement_is_linked(origin, &keyed, (&leftover, body));
    KilledWrite {
        origin,
        root,
        old,
        seq_before,
        keyed,
        _state: state,
        _dir: dir,
    }
}

/// A write whose upload is staged on another filesystem than the tree
/// replaces the file by linking a copy at a temporary name and renaming
/// it over the file. kill -9 between the two left that name behind (a
/// whole copy of the file, never served, never removed unless the write
/// was replayed) and the directory's times moved by it, which the
/// restarted origin journaled as a change of its own. Recovery now
/// removes the name and takes the directory's new times as its own doing;
/// the replay then applies once.
#[test]
fn kill_between_linking_a_replacing_upload_and_renaming_it_over_leaves_no_trace() {
    let rewritten = content(3);
    let k = kill_a_write_while_its_replacement_is_linked("gw:rewrite", "u-old", &rewritten);
    let c = Client::new(&k.origin);
    assert_eq!(
        std::fs::read(k.root.join("old.txt")).expect("old.txt"),
        b"as it was"
    );
    replay_after_a_killed_replacement(&c, &k.root, &["old.txt"], k.seq_before, k.keyed);
    assert_eq!(
        std::fs::read(k.root.join("old.txt")).expect("old.txt"),
        rewritten
    );
    assert_eq!(c.lookup(ROOT_ID, "old.txt").attr.id, k.old.id);
}

/// The same crash in a write of the bytes the file already holds (a
/// gateway that lost the answer to a store, or replayed its unstable
/// writes, uploads them again under a new key). Recovery found the linked
/// copy equal to the file, counted the write applied and left the
/// temporary name behind, for good (found by the write model with a
/// mount inside the tree, seed 1795778911644292023).
#[test]
fn kill_between_linking_an_upload_of_the_same_bytes_and_renaming_it_over_leaves_no_trace() {
    let same = b"as it was";
    let k = kill_a_write_while_its_replacement_is_linked("gw:same", "u-same", same);
    let c = Client::new(&k.origin);
    assert_eq!(
        names_in(&k.root),
        ["old.txt"],
        "the crash left its name behind"
    );
    assert_eq!(
        std::fs::read(k.root.join("old.txt")).expect("old.txt"),
        same
    );
    // Recovered as applied (nothing on disk tells otherwise): journaled
    // under its key, and a replay is answered as one.
    let records = c.records(k.seq_before);
    assert!(
        records.iter().all(|r| r.key.as_deref() == Some("gw:same")),
        "the restarted origin journaled {records:?}"
    );
    let r = c.reintegrate(vec![k.keyed]);
    assert!(
        matches!(
            r.results.as_slice(),
            [OpResult::Applied { .. } | OpResult::Replayed { .. }]
        ),
        "{:?}",
        r.results
    );
    assert_eq!(names_in(&k.root), ["old.txt"]);
}

/// The same crash in a rename over a file on another filesystem (a
/// filesystem mounted inside the tree), which moves the file as a copy
/// linked at a temporary name and renamed over the file it replaces.
#[test]
fn kill_between_linking_a_moved_copy_and_renaming_it_over_leaves_no_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, inner, _inner) = tree_with_a_mount(dir.path());
    let moved = content(4);
    std::fs::write(root.join("b.bin"), &moved).expect("b.bin");
    std::fs::write(inner.join("c.txt"), b"to be replaced").expect("c.txt");
    let origin = imz_integration::OriginProc::start_full(
        &REPLACE_PAUSED.map(str::to_owned),
        &root,
        &dir.path().join("token"),
        "127.0.0.1:0",
        &[],
    )
    .expect("start origin");
    let c = Client::new(&origin);
    let mnt = c.lookup(ROOT_ID, "mnt").attr;
    let b = c.lookup(ROOT_ID, "b.bin").attr;
    let replaced = c.lookup(mnt.id, "c.txt").attr;
    let seq_before = c.records(0).last().map_or(0, |r| r.seq);
    let keyed = op(
        "gw:move-b-over-c",
        Op::Rename {
            from_parent: ObjRef::Id(ROOT_ID),
            from_name: "b.bin".into(),
            id: ObjRef::Id(b.id),
            base: wire::Base::Version(b.version),
            to_parent: ObjRef::Id(mnt.id),
            to_name: "c.txt".into(),
            replace: Some((
                ObjRef::Id(replaced.id),
                wire::Base::Version(replaced.version),
            )),
        },
    );
    let leftover = inner.join(format!("{}{}", wire::INSTALLING_PREFIX, b.id));
    let origin = kill_while_a_replacement_is_linked(origin, &keyed, (&leftover, &moved));

    let c = Client::new(&origin);
    assert!(
        root.join("b.bin").exists(),
        "the original went before the move"
    );
    replay_after_a_killed_replacement(&c, &inner, &["c.txt"], seq_before, keyed);
    assert!(!root.join("b.bin").exists(), "the original stayed");
    assert_eq!(std::fs::read(inner.join("c.txt")).expect("c.txt"), moved);
    assert_eq!(c.lookup(mnt.id, "c.txt").attr.id, b.id);
}

/// A symlink renamed onto another filesystem (a mount inside the tree) is
/// moved as `mv` moves it: a new symlink to the same target, with the same
/// times, then the old name goes. The origin answered the rename with an
/// internal error (EXDEV) and the gateway held it for a person (found by
/// the write model once it made symlinks). kill -9 between the two steps
/// leaves both; recovery finds the copy, finishes the move and keeps the
/// operation's key, so the replay is answered as one.
#[test]
fn a_symlink_moved_across_filesystems_moves_once_through_a_kill_midway() {
    symlink_moved_across_and_killed(true);
    symlink_moved_across_and_killed(false);
}

/// The move of [`a_symlink_moved_across_filesystems_moves_once_through_a_kill_midway`],
/// over another symlink if `replace`, else to a free name.
fn symlink_moved_across_and_killed(replace: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, inner, _inner) = tree_with_a_mount(dir.path());
    std::os::unix::fs::symlink("somewhere/else", root.join("l")).expect("symlink l");
    if replace {
        std::os::unix::fs::symlink("old", inner.join("r")).expect("symlink r");
    }
    let mut origin = PausedOrigin::start(&root, &dir.path().join("token"), &[]);
    let c = origin.client();
    let mnt = c.lookup(ROOT_ID, "mnt").attr;
    let l = c.lookup(ROOT_ID, "l").attr;
    let replaced = replace.then(|| {
        let r = c.lookup(mnt.id, "r").attr;
        (ObjRef::Id(r.id), wire::Base::Version(r.version))
    });
    let seq_before = c.records(0).last().map_or(0, |r| r.seq);
    let keyed = op(
        "gw:move-l-over-r",
        Op::Rename {
            from_parent: ObjRef::Id(ROOT_ID),
            from_name: "l".into(),
            id: ObjRef::Id(l.id),
            base: wire::Base::Version(l.version),
            to_parent: ObjRef::Id(mnt.id),
            to_name: "r".into(),
            replace: replaced,
        },
    );
    let sender = send_unanswered(origin.client(), keyed.clone());
    eventually(
        "the moved symlink in place",
        Duration::from_secs(30),
        || (std::fs::read_link(inner.join("r")).ok()? == Path::new("somewhere/else")).then_some(()),
    );
    assert!(
        root.join("l").symlink_metadata().is_ok(),
        "the original went too soon"
    );
    origin.origin.proc.kill9();
    let _ = sender.join();
    origin.origin.restart_through(&[]).expect("restart origin");

    let c = origin.client();
    assert!(
        root.join("l").symlink_metadata().is_err(),
        "the original stayed"
    );
    assert_eq!(names_in(&inner), ["r"]);
    let moved = c.lookup(mnt.id, "r").attr;
    assert_eq!(moved.id, l.id);
    assert_eq!(moved.target.as_deref(), Some("somewhere/else"));
    assert_eq!(moved.mtime, l.mtime, "the move kept the symlink's mtime");
    let records = c.records(seq_before);
    assert!(
        records
            .iter()
            .all(|r| r.key.as_deref() == Some("gw:move-l-over-r")),
        "the restarted origin journaled {records:?}"
    );
    let again = c.reintegrate(vec![keyed]);
    assert!(
        matches!(again.results.as_slice(), [OpResult::Replayed { .. }]),
        "{:?}",
        again.results
    );
}

/// A gateway restarted while the origin still applies its batch sends the
/// batch's uploads again. One sent again while its install was under way
/// replaced the staged file (or made it anew after the install took it),
/// and recovery from a crash in the group then took the install for one
/// that never happened: the file, and everything the group did after it,
/// were journaled as changes of the origin's own. An upload sent again
/// while its group runs now leaves the staged file as it is.
#[test]
fn an_upload_sent_again_during_its_install_leaves_recovery_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, _, _state, extra) = tree_with_state_elsewhere(dir.path());
    let mut origin = PausedOrigin::start(&root, &dir.path().join("token"), &extra);
    let c = origin.client();
    let seq_before = c.records(0).last().map_or(0, |r| r.seq);
    let (first, again) = (content(5), content(6));
    c.upload("u-new", first.clone());
    let keyed = op(
        "gw:new",
        Op::Create {
            parent: ObjRef::Id(ROOT_ID),
            name: "new.bin".into(),
            object: NewObject::File {
                upload: Some("u-new".into()),
            },
            attrs: SetAttrs::default(),
        },
    );
    let sender = send_unanswered(origin.client(), keyed.clone());
    eventually("the copy to be linked in", Duration::from_secs(30), || {
        std::fs::read(root.join("new.bin"))
            .is_ok_and(|got| got == first)
            .then_some(())
    });
    // Sent again, with what the file holds by now.
    c.upload("u-new", again);
    origin.origin.proc.kill9();
    let _ = sender.join();
    origin.origin.restart_through(&[]).expect("restart origin");

    let c = origin.client();
    let records = c.records(seq_before);
    assert!(
        records.iter().all(|r| r.key.as_deref() == Some("gw:new")),
        "recovery did not adopt the install: {records:?}"
    );
    let r = c.reintegrate(vec![keyed]);
    assert!(
        matches!(r.results.as_slice(), [OpResult::Replayed { .. }]),
        "{:?}",
        r.results
    );
    assert_eq!(std::fs::read(root.join("new.bin")).expect("new.bin"), first);
    assert_eq!(names_in(&root), ["new.bin", "old.txt"]);
}
