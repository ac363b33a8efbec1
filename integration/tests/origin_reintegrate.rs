//! Reintegration batches against a real origin: every operation, replay,
//! key references, and every conflict answer.

mod origin_common;

use imz_origin::wire::{
    self, Base, Change, ConflictReason, ErrorCode, Kind, NewObject, ObjRef, Op, OpResult, ROOT_ID,
    SetAttrs,
};
use origin_common::*;

fn create(key: &str, parent: ObjRef, name: &str, object: NewObject) -> wire::KeyedOp {
    op(
        key,
        Op::Create {
            parent,
            name: name.into(),
            object,
            attrs: SetAttrs::default(),
        },
    )
}

fn file(upload: Option<&str>) -> NewObject {
    NewObject::File {
        upload: upload.map(str::to_owned),
    }
}

#[test]
fn every_operation_applies_to_the_tree_and_the_journal() {
    let s = start();
    let c = &s.client;
    let root = s.root();
    c.upload("u1", b"first content".to_vec());
    c.upload("u2", b"second".to_vec());
    let r = c.reintegrate(vec![
        create("g:1", ObjRef::Id(ROOT_ID), "dir", NewObject::Dir),
        create("g:2", ObjRef::Created("g:1".into()), "f", file(Some("u1"))),
        create("g:3", ObjRef::Created("g:1".into()), "empty", file(None)),
        create(
            "g:4",
            ObjRef::Created("g:1".into()),
            "link",
            NewObject::Symlink { target: "f".into() },
        ),
        op(
            "g:5",
            Op::Write {
                id: ObjRef::Created("g:2".into()),
                base: Base::After("g:2".into()),
                upload: "u2".into(),
                mtime: Some(1_600_000_000_000_000_000),
            },
        ),
        op(
            "g:6",
            Op::SetAttr {
                id: ObjRef::Created("g:2".into()),
                base: Base::After("g:5".into()),
                attrs: SetAttrs {
                    mode: Some(0o600),
                    size: Some(3),
                    ..SetAttrs::default()
                },
            },
        ),
        op(
            "g:7",
            Op::Rename {
                from_parent: ObjRef::Created("g:1".into()),
                from_name: "f".into(),
                id: ObjRef::Created("g:2".into()),
                base: Base::After("g:6".into()),
                to_parent: ObjRef::Id(ROOT_ID),
                to_name: "moved".into(),
                replace: None,
            },
        ),
        op(
            "g:8",
            Op::Remove {
                parent: ObjRef::Created("g:1".into()),
                name: "empty".into(),
                id: ObjRef::Created("g:3".into()),
                base: Base::After("g:3".into()),
            },
        ),
    ]);
    assert_eq!(r.results.len(), 8, "{r:?}");
    let seqs: Vec<u64> = r.results.iter().map(|x| applied(x).1).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "one record each, in order"
    );
    let (moved, _) = applied(&r.results[6]);
    assert_eq!(moved.id, applied(&r.results[1]).0.id, "ids survive renames");
    assert_eq!((moved.size, moved.mode), (3, 0o600));
    assert_eq!(std::fs::read(root.join("moved")).expect("moved"), b"sec");
    assert_eq!(
        std::fs::read_link(root.join("dir/link"))
            .expect("link")
            .to_str(),
        Some("f")
    );
    assert!(!root.join("dir/empty").exists());
    assert!(
        !root.join(".imz/uploads/u1").exists(),
        "installed uploads are consumed"
    );
    use std::os::unix::fs::MetadataExt;
    let after_write = applied(&r.results[4]).0;
    assert_eq!(after_write.mtime, 1_600_000_000_000_000_000);
    assert_eq!(
        std::fs::metadata(root.join("moved")).expect("meta").mode() & 0o777,
        0o600
    );

    let recs = c.records(seqs[0] - 1);
    let ops: Vec<&str> = recs
        .iter()
        .map(|r| match &r.change {
            Change::Create { .. } => "create",
            Change::Write { .. } => "write",
            Change::Truncate { .. } => "truncate",
            Change::SetAttr { .. } => "setattr",
            Change::Remove { .. } => "remove",
            Change::Rename { .. } => "rename",
        })
        .collect();
    assert_eq!(
        ops,
        [
            "create", "create", "create", "create", "write", "truncate", "rename", "remove"
        ]
    );
    // Served as stored.
    assert_eq!(c.lookup(ROOT_ID, "moved").attr, *moved);
    let body = c.data(moved.id, moved.version).bytes().expect("data");
    assert_eq!(body.as_ref(), b"sec");
}

#[test]
fn a_replayed_batch_is_answered_as_before_and_changes_nothing() {
    let s = start();
    let c = &s.client;
    c.upload("up", b"data".to_vec());
    let batch = vec![
        create("k:1", ObjRef::Id(ROOT_ID), "d", NewObject::Dir),
        create("k:2", ObjRef::Created("k:1".into()), "f", file(Some("up"))),
    ];
    let first = c.reintegrate(batch.clone());
    let last = c.info().last_seq;
    let again = c.reintegrate(batch);
    assert_eq!(c.info().last_seq, last, "a replay adds no record");
    for (a, b) in first.results.iter().zip(&again.results) {
        let (attr, seq) = applied(a);
        match b {
            OpResult::Replayed { attr: ra, seq: rs } => assert_eq!((ra, *rs), (attr, seq)),
            other => panic!("expected replayed, got {other:?}"),
        }
    }
    assert_eq!(std::fs::read(s.root().join("d/f")).expect("f"), b"data");
}

#[test]
fn every_conflict_is_answered_with_the_origin_state() {
    let s = start_with(|root| {
        std::fs::write(root.join("f"), b"f").expect("write");
        std::fs::write(root.join("g"), b"g").expect("write");
        std::fs::create_dir(root.join("full")).expect("mkdir");
        std::fs::write(root.join("full/x"), b"x").expect("write");
        std::fs::create_dir(root.join("gone")).expect("mkdir");
    });
    let c = &s.client;
    let f = c.lookup(ROOT_ID, "f").attr;
    let g = c.lookup(ROOT_ID, "g").attr;
    let full = c.lookup(ROOT_ID, "full").attr;
    let gone = c.lookup(ROOT_ID, "gone").attr;
    c.reintegrate(vec![op(
        "rm-gone",
        Op::Remove {
            parent: ObjRef::Id(ROOT_ID),
            name: "gone".into(),
            id: ObjRef::Id(gone.id),
            base: Base::Version(gone.version),
        },
    )]);
    c.upload("u", b"new".to_vec());
    let one = |key: &str, o: Op| c.reintegrate(vec![op(key, o)]).results.remove(0);

    // update/update
    let r = one(
        "vm",
        Op::Write {
            id: ObjRef::Id(f.id),
            base: Base::Version(f.version - 1),
            upload: "u".into(),
            mtime: None,
        },
    );
    let cf = conflict(&r);
    assert_eq!(
        (cf.reason, cf.current.as_ref()),
        (ConflictReason::VersionMismatch, Some(&f))
    );
    // update/remove
    let r = one(
        "rm",
        Op::SetAttr {
            id: ObjRef::Id(gone.id),
            base: Base::Version(gone.version),
            attrs: SetAttrs {
                mode: Some(0o700),
                ..SetAttrs::default()
            },
        },
    );
    assert_eq!(
        (conflict(&r).reason, conflict(&r).current.clone()),
        (ConflictReason::Removed, None)
    );
    // create/create
    let r = one(
        "ne",
        Op::Create {
            parent: ObjRef::Id(ROOT_ID),
            name: "g".into(),
            object: file(None),
            attrs: SetAttrs::default(),
        },
    );
    assert_eq!(
        (conflict(&r).reason, conflict(&r).current.as_ref()),
        (ConflictReason::NameExists, Some(&g))
    );
    // rename onto an existing name without replace
    let r = one(
        "ne2",
        Op::Rename {
            from_parent: ObjRef::Id(ROOT_ID),
            from_name: "f".into(),
            id: ObjRef::Id(f.id),
            base: Base::Version(f.version),
            to_parent: ObjRef::Id(ROOT_ID),
            to_name: "g".into(),
            replace: None,
        },
    );
    assert_eq!(conflict(&r).reason, ConflictReason::NameExists);
    // parent gone
    let r = one(
        "pm",
        Op::Create {
            parent: ObjRef::Id(gone.id),
            name: "x".into(),
            object: NewObject::Dir,
            attrs: SetAttrs::default(),
        },
    );
    assert_eq!(conflict(&r).reason, ConflictReason::ParentMissing);
    // name refers to another object
    let r = one(
        "nm",
        Op::Remove {
            parent: ObjRef::Id(ROOT_ID),
            name: "g".into(),
            id: ObjRef::Id(f.id),
            base: Base::Version(f.version),
        },
    );
    assert_eq!(
        (conflict(&r).reason, conflict(&r).current.as_ref()),
        (ConflictReason::NameMismatch, Some(&f))
    );
    // directory not empty at the origin
    let r = one(
        "nonempty",
        Op::Remove {
            parent: ObjRef::Id(ROOT_ID),
            name: "full".into(),
            id: ObjRef::Id(full.id),
            base: Base::Version(full.version),
        },
    );
    assert_eq!(conflict(&r).reason, ConflictReason::NotEmpty);
    assert_eq!(conflict(&r).current.as_ref().map(|a| a.id), Some(full.id));

    // Nothing changed on disk, and a batch stops at its first conflict.
    assert_eq!(std::fs::read(s.root().join("f")).expect("f"), b"f");
    let r = c.reintegrate(vec![
        create("s1", ObjRef::Id(ROOT_ID), "g", file(None)),
        create("s2", ObjRef::Id(ROOT_ID), "never", file(None)),
    ]);
    assert_eq!(r.results.len(), 1);
    assert!(!s.root().join("never").exists());
    // A conflicting key is not remembered: once the name is free it applies.
    one(
        "free-g",
        Op::Remove {
            parent: ObjRef::Id(ROOT_ID),
            name: "g".into(),
            id: ObjRef::Id(g.id),
            base: Base::Version(g.version),
        },
    );
    let r = c.reintegrate(vec![create("s1", ObjRef::Id(ROOT_ID), "g", file(None))]);
    applied(&r.results[0]);
}

#[test]
fn a_rename_can_replace_the_expected_object_only() {
    let s = start_with(|root| {
        std::fs::write(root.join("a"), b"aaa").expect("write");
        std::fs::write(root.join("b"), b"b").expect("write");
    });
    let c = &s.client;
    let a = c.lookup(ROOT_ID, "a").attr;
    let b = c.lookup(ROOT_ID, "b").attr;
    let rename = |key: &str, base_b: u64| {
        c.reintegrate(vec![op(
            key,
            Op::Rename {
                from_parent: ObjRef::Id(ROOT_ID),
                from_name: "a".into(),
                id: ObjRef::Id(a.id),
                base: Base::Version(a.version),
                to_parent: ObjRef::Id(ROOT_ID),
                to_name: "b".into(),
                replace: Some((ObjRef::Id(b.id), Base::Version(base_b))),
            },
        )])
        .results
        .remove(0)
    };
    let r = rename("r1", b.version + 100);
    assert_eq!(conflict(&r).reason, ConflictReason::VersionMismatch);
    let r = rename("r2", b.version);
    let (attr, seq) = applied(&r);
    assert_eq!(attr.id, a.id);
    assert_eq!(std::fs::read(s.root().join("b")).expect("b"), b"aaa");
    let rec = c.records(seq - 1).remove(0);
    assert!(matches!(rec.change, Change::Rename { replaced: Some(id), .. } if id == b.id));
    assert_eq!(
        c.error(c.get(&wire::paths::object(b.id))).1.code,
        ErrorCode::NotFound
    );
}

#[test]
fn a_rename_meant_to_replace_an_object_gone_from_that_name_takes_the_free_name() {
    let s = start_with(|root| {
        std::fs::write(root.join("a"), b"aaa").expect("write");
        std::fs::write(root.join("b"), b"b").expect("write");
        std::fs::write(root.join("c"), b"c").expect("write");
    });
    let c = &s.client;
    let a = c.lookup(ROOT_ID, "a").attr;
    let b = c.lookup(ROOT_ID, "b").attr;
    let cc = c.lookup(ROOT_ID, "c").attr;
    // Meanwhile (another gateway): b removed, c moved away.
    let r = c.reintegrate(vec![
        op(
            "other-1",
            Op::Remove {
                parent: ObjRef::Id(ROOT_ID),
                name: "b".into(),
                id: ObjRef::Id(b.id),
                base: Base::Version(b.version),
            },
        ),
        op(
            "other-2",
            Op::Rename {
                from_parent: ObjRef::Id(ROOT_ID),
                from_name: "c".into(),
                id: ObjRef::Id(cc.id),
                base: Base::Version(cc.version),
                to_parent: ObjRef::Id(ROOT_ID),
                to_name: "moved-c".into(),
                replace: None,
            },
        ),
    ]);
    applied(&r.results[0]);
    applied(&r.results[1]);
    let rename = |key: &str, from: &str, id: u64, base: u64, to: &str, replaced: &wire::Attr| {
        c.reintegrate(vec![op(
            key,
            Op::Rename {
                from_parent: ObjRef::Id(ROOT_ID),
                from_name: from.into(),
                id: ObjRef::Id(id),
                base: Base::Version(base),
                to_parent: ObjRef::Id(ROOT_ID),
                to_name: to.into(),
                replace: Some((ObjRef::Id(replaced.id), Base::Version(replaced.version))),
            },
        )])
        .results
        .remove(0)
    };
    let r = rename("r1", "a", a.id, a.version, "b", &b);
    let (moved, seq) = applied(&r);
    assert_eq!(moved.id, a.id);
    assert_eq!(std::fs::read(s.root().join("b")).expect("b"), b"aaa");
    let rec = c.records(seq - 1).remove(0);
    assert!(matches!(rec.change, Change::Rename { replaced: None, .. }));
    // The name of one moved away is free too; it lives on where it went.
    let r = rename("r2", "b", a.id, moved.version, "c", &cc);
    applied(&r);
    assert_eq!(std::fs::read(s.root().join("c")).expect("c"), b"aaa");
    assert_eq!(
        std::fs::read(s.root().join("moved-c")).expect("moved-c"),
        b"c"
    );
}

/// New content or attributes based on a version from before a move at
/// the origin land on the moved file: a move changes neither. Any other
/// change since that version is a conflict.
#[test]
fn a_change_based_on_a_version_before_a_move_lands_on_the_moved_file() {
    let s = start_with(|root| {
        std::fs::write(root.join("a"), b"a").expect("write");
        std::fs::write(root.join("b"), b"b").expect("write");
    });
    let c = &s.client;
    let a = c.lookup(ROOT_ID, "a").attr;
    let b = c.lookup(ROOT_ID, "b").attr;
    let one = |key: &str, o: Op| c.reintegrate(vec![op(key, o)]).results.remove(0);
    let rename = |key: &str, attr: &wire::Attr, from: &str, to: &str| {
        let r = one(
            key,
            Op::Rename {
                from_parent: ObjRef::Id(ROOT_ID),
                from_name: from.into(),
                id: ObjRef::Id(attr.id),
                base: Base::Version(attr.version),
                to_parent: ObjRef::Id(ROOT_ID),
                to_name: to.into(),
                replace: None,
            },
        );
        applied(&r).0.clone()
    };
    // Another gateway moves both, and writes b after moving it.
    rename("other-1", &a, "a", "a2");
    let b2 = rename("other-2", &b, "b", "b2");
    c.upload("theirs", b"theirs".to_vec());
    applied(&one(
        "other-3",
        Op::Write {
            id: ObjRef::Id(b.id),
            base: Base::Version(b2.version),
            upload: "theirs".into(),
            mtime: None,
        },
    ));
    // Ours, made on the versions from before.
    let r = one(
        "ours-1",
        Op::SetAttr {
            id: ObjRef::Id(a.id),
            base: Base::Version(a.version),
            attrs: SetAttrs {
                mode: Some(0o600),
                ..SetAttrs::default()
            },
        },
    );
    assert_eq!(applied(&r).0.mode & 0o777, 0o600);
    c.upload("ours-a", b"ours".to_vec());
    let r = one(
        "ours-2",
        Op::Write {
            id: ObjRef::Id(a.id),
            base: Base::After("ours-1".into()),
            upload: "ours-a".into(),
            mtime: None,
        },
    );
    assert_eq!(applied(&r).0.id, a.id);
    assert_eq!(std::fs::read(s.root().join("a2")).expect("a2"), b"ours");
    c.upload("ours-b", b"ours".to_vec());
    let r = one(
        "ours-3",
        Op::Write {
            id: ObjRef::Id(b.id),
            base: Base::Version(b.version),
            upload: "ours-b".into(),
            mtime: None,
        },
    );
    assert_eq!(conflict(&r).reason, ConflictReason::VersionMismatch);
    assert_eq!(std::fs::read(s.root().join("b2")).expect("b2"), b"theirs");
}

#[test]
fn bad_operations_are_rejected_not_applied() {
    let s = start();
    let c = &s.client;
    let rejected = |r: &OpResult| match r {
        OpResult::Rejected { error } => error.code,
        other => panic!("expected rejected, got {other:?}"),
    };
    for name in ["..", ".", "a/b", "", ".imz"] {
        let r = c.reintegrate(vec![create(
            "bad",
            ObjRef::Id(ROOT_ID),
            name,
            NewObject::Dir,
        )]);
        assert_eq!(rejected(&r.results[0]), ErrorCode::InvalidName, "{name:?}");
    }
    let long = "x".repeat(256);
    let r = c.reintegrate(vec![create(
        "long",
        ObjRef::Id(ROOT_ID),
        &long,
        NewObject::Dir,
    )]);
    assert_eq!(rejected(&r.results[0]), ErrorCode::InvalidName);
    let r = c.reintegrate(vec![create(
        "nou",
        ObjRef::Id(ROOT_ID),
        "f",
        file(Some("missing")),
    )]);
    assert_eq!(rejected(&r.results[0]), ErrorCode::NotFound);
    let r = c.reintegrate(vec![create(
        "nokey",
        ObjRef::Created("unknown".into()),
        "f",
        file(None),
    )]);
    assert_eq!(rejected(&r.results[0]), ErrorCode::BadRequest);
    let r = c.reintegrate(vec![create("d", ObjRef::Id(ROOT_ID), "d", NewObject::Dir)]);
    let d = applied(&r.results[0]).0.clone();
    let r = c.reintegrate(vec![op(
        "size-of-dir",
        Op::SetAttr {
            id: ObjRef::Id(d.id),
            base: Base::Version(d.version),
            attrs: SetAttrs {
                size: Some(1),
                ..SetAttrs::default()
            },
        },
    )]);
    assert_eq!(rejected(&r.results[0]), ErrorCode::WrongKind);
    let r = c.reintegrate(vec![op(
        "into-itself",
        Op::Rename {
            from_parent: ObjRef::Id(ROOT_ID),
            from_name: "d".into(),
            id: ObjRef::Id(d.id),
            base: Base::Version(d.version),
            to_parent: ObjRef::Id(d.id),
            to_name: "d".into(),
            replace: None,
        },
    )]);
    assert_eq!(rejected(&r.results[0]), ErrorCode::BadRequest);
    let r = c.reintegrate(vec![create("f", ObjRef::Id(ROOT_ID), "f", file(None))]);
    let f = applied(&r.results[0]).0.clone();
    for (key, size) in [("huge", 1u64 << 62), ("huger", u64::MAX)] {
        let r = c.reintegrate(vec![op(
            key,
            Op::SetAttr {
                id: ObjRef::Id(f.id),
                base: Base::Version(f.version),
                attrs: SetAttrs {
                    size: Some(size),
                    ..SetAttrs::default()
                },
            },
        )]);
        assert_eq!(rejected(&r.results[0]), ErrorCode::TooLarge, "size {size}");
    }
    // Keys are kept for ever: an oversized one refuses the whole batch.
    let resp = c
        .http
        .post(c.url(wire::paths::REINTEGRATE))
        .bearer_auth(&c.token)
        .json(&wire::Batch {
            ops: vec![create(
                &"k".repeat(wire::MAX_KEY_LEN + 1),
                ObjRef::Id(ROOT_ID),
                "keyed",
                NewObject::Dir,
            )],
        })
        .send()
        .expect("reintegrate");
    assert_eq!(resp.status(), 400);
    assert!(resp.text().expect("body").contains("idempotency keys"));
    let entries = c.entries(ROOT_ID, None, 10).entries;
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().any(|e| e.attr.kind == Kind::Dir));
}
