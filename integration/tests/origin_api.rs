//! Each endpoint of a real `imz origin`, over real HTTP on loopback.

mod origin_common;

use std::time::Duration;

use imz_origin::wire::{self, ErrorCode, Kind, ManifestEntry, ManifestHeader, ROOT_ID};
use origin_common::*;

#[test]
fn health_needs_no_token_and_reports_the_journal() {
    let s = start();
    let resp = s
        .client
        .http
        .get(s.client.url(wire::paths::HEALTH))
        .send()
        .expect("health");
    assert_eq!(resp.status(), 200);
    let h: wire::Health = resp.json().expect("json");
    assert_eq!(h.status, "ok");
    assert_eq!(h.last_seq, s.client.info().last_seq);
}

#[test]
fn every_other_endpoint_needs_the_right_token() {
    let s = start_with(|root| std::fs::write(root.join("f"), b"x").expect("write"));
    let f = s.client.lookup(ROOT_ID, "f").attr;
    let paths = [
        wire::paths::INFO.to_owned(),
        wire::paths::object(ROOT_ID),
        format!("{}?name=f", wire::paths::lookup(ROOT_ID)),
        wire::paths::entries(ROOT_ID),
        wire::paths::data(f.id, f.version),
        wire::paths::JOURNAL.to_owned(),
        wire::paths::MANIFEST.to_owned(),
    ];
    for path in &paths {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic abc"),
            Some("Bearer "),
        ] {
            let mut req = s.client.http.get(s.client.url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let (status, err) = s.client.error(req);
            assert_eq!(
                (status, err.code),
                (401, ErrorCode::Unauthorized),
                "{path} with {auth:?}"
            );
        }
    }
    let put = s
        .client
        .http
        .put(s.client.url(&wire::paths::upload("u")))
        .body("x");
    assert_eq!(s.client.error(put).0, 401);
    let post = s
        .client
        .http
        .post(s.client.url(wire::paths::REINTEGRATE))
        .body("{\"ops\":[]}");
    assert_eq!(s.client.error(post).0, 401);
    // A token that is a prefix of the right one is still wrong.
    let prefix = &s.client.token[..s.client.token.len() - 1];
    let req = s
        .client
        .http
        .get(s.client.url(wire::paths::INFO))
        .bearer_auth(prefix);
    assert_eq!(s.client.error(req).0, 401);
}

#[test]
fn token_file_is_created_private_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let s = start();
    let meta = std::fs::metadata(s.dir.path().join("token")).expect("token file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(s.client.token.len() >= 32);
    let mut origin = s.origin;
    let before = origin.token.clone();
    origin.restart().expect("restart");
    assert_eq!(origin.token, before);
}

#[test]
fn objects_lookup_and_paged_entries() {
    let s = start_with(|root| {
        std::fs::create_dir(root.join("big")).expect("mkdir");
        for i in 0..25 {
            std::fs::write(root.join("big").join(format!("f{i:02}")), vec![b'x'; i])
                .expect("write");
        }
        std::os::unix::fs::symlink("f01", root.join("big/link")).expect("symlink");
    });
    let info = s.client.info();
    assert_eq!(info.root.id, ROOT_ID);
    assert_eq!(info.root.kind, Kind::Dir);
    assert_eq!(info.store_id.len(), 32);
    let big = s.client.lookup(ROOT_ID, "big");
    assert_eq!(big.attr.kind, Kind::Dir);
    assert_eq!(big.attr.size, 26, "a directory's size is its entry count");
    assert_eq!(s.client.attr(big.attr.id), big.attr);
    let f07 = s.client.lookup(big.attr.id, "f07");
    assert_eq!((f07.attr.kind, f07.attr.size), (Kind::File, 7));
    let link = s.client.lookup(big.attr.id, "link");
    assert_eq!(
        (link.attr.kind, link.attr.target.as_deref()),
        (Kind::Symlink, Some("f01"))
    );

    let mut names = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.client.entries(big.attr.id, after.as_deref(), 10);
        assert!(page.entries.len() <= 10);
        assert_eq!(page.dir.id, big.attr.id);
        names.extend(page.entries.iter().map(|e| e.name.clone()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..25).map(|i| format!("f{i:02}")).collect();
    expected.push("link".into());
    assert_eq!(names, expected, "all entries once, in name order");

    // Errors.
    assert_eq!(
        s.client
            .error(s.client.get(&wire::paths::object(999_999)))
            .1
            .code,
        ErrorCode::NotFound
    );
    assert_eq!(
        s.client.error(s.client.get("/v1/objects/abc")).1.code,
        ErrorCode::BadRequest
    );
    let lk = s
        .client
        .get(&wire::paths::lookup(ROOT_ID))
        .query(&[("name", "nope")]);
    assert_eq!(s.client.error(lk).1.code, ErrorCode::NotFound);
    let lk = s
        .client
        .get(&wire::paths::lookup(f07.attr.id))
        .query(&[("name", "x")]);
    assert_eq!(s.client.error(lk).1.code, ErrorCode::WrongKind);
    assert_eq!(
        s.client
            .error(s.client.get(&wire::paths::entries(f07.attr.id)))
            .1
            .code,
        ErrorCode::WrongKind
    );
    assert_eq!(
        s.client.error(s.client.get("/v1/nothing")).1.code,
        ErrorCode::NotFound
    );
}

#[test]
fn the_state_directory_is_invisible() {
    let s = start_with(|root| std::fs::write(root.join("a"), b"a").expect("write"));
    let page = s.client.entries(ROOT_ID, None, 100);
    assert_eq!(
        page.entries
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(page.dir.size, 1);
    let lk = s
        .client
        .get(&wire::paths::lookup(ROOT_ID))
        .query(&[("name", wire::STATE_DIR_NAME)]);
    assert_eq!(s.client.error(lk).1.code, ErrorCode::InvalidName);
    assert!(
        s.root().join(wire::STATE_DIR_NAME).is_dir(),
        "state lives in ROOT/.imz"
    );
}

#[test]
fn data_is_served_with_range_etag_and_immutable_caching() {
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let c2 = content.clone();
    let s = start_with(move |root| std::fs::write(root.join("f"), &c2).expect("write"));
    let f = s.client.lookup(ROOT_ID, "f").attr;
    let resp = s.client.data(f.id, f.version);
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["etag"], wire::etag(f.id, f.version).as_str());
    assert_eq!(h["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(resp.bytes().expect("body").as_ref(), content.as_slice());

    let part = s
        .client
        .get(&wire::paths::data(f.id, f.version))
        .header("range", "bytes=1000-1999")
        .send()
        .expect("range");
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 1000-1999/200000");
    assert_eq!(part.bytes().expect("body").as_ref(), &content[1000..2000]);
    let tail = s
        .client
        .get(&wire::paths::data(f.id, f.version))
        .header("range", "bytes=-10")
        .send()
        .expect("range");
    assert_eq!(
        tail.bytes().expect("body").as_ref(),
        &content[content.len() - 10..]
    );

    let bad = s
        .client
        .get(&wire::paths::data(f.id, f.version))
        .header("range", "bytes=200000-");
    let resp = bad.send().expect("416");
    assert_eq!(resp.status(), 416);
    assert_eq!(resp.headers()["content-range"], "bytes */200000");
    assert_eq!(resp.headers()["cache-control"], "no-store");

    let cached = s
        .client
        .get(&wire::paths::data(f.id, f.version))
        .header("if-none-match", wire::etag(f.id, f.version))
        .send()
        .expect("304");
    assert_eq!(cached.status(), 304);

    // An old version is gone, with the current attributes.
    let (_, err) = s
        .client
        .error(s.client.get(&wire::paths::data(f.id, f.version - 1)));
    assert_eq!(err.code, ErrorCode::VersionGone);
    assert_eq!(err.current.as_ref().map(|a| a.version), Some(f.version));
    let dir = s
        .client
        .get(&wire::paths::data(ROOT_ID, s.client.info().root.version));
    assert_eq!(s.client.error(dir).1.code, ErrorCode::WrongKind);
    assert_eq!(
        s.client
            .error(s.client.get(&wire::paths::data(77_777, 1)))
            .1
            .code,
        ErrorCode::NotFound
    );
}

/// A client that accepts holes gets a range that is wholly a hole as its
/// length (204, `imz-hole`); any other range, and any other client, gets
/// the bytes, zeros included.
#[test]
fn ranges_wholly_in_a_hole_are_answered_by_their_length_to_clients_that_ask() {
    const MIB: u64 = 1 << 20;
    let s = start_with(|root| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(root.join("sparse")).expect("create");
        f.set_len(16 * MIB).expect("set_len");
        f.write_all_at(b"data", 8 * MIB).expect("write");
    });
    let f = s.client.lookup(ROOT_ID, "sparse").attr;
    let get = |range: &str, holes: bool| {
        let mut req = s
            .client
            .get(&wire::paths::data(f.id, f.version))
            .header("range", range);
        if holes {
            req = req.header(wire::paths::ACCEPT_HOLES, "1");
        }
        req.send().expect("data")
    };
    let hole = get("bytes=0-1048575", true);
    assert_eq!(hole.status(), 204);
    assert_eq!(hole.headers()[wire::paths::HOLE], "1048576");
    assert_eq!(hole.headers()["vary"], wire::paths::ACCEPT_HOLES);
    assert!(hole.bytes().expect("body").is_empty());
    // The same range to a client that did not ask: zeros.
    let zeros = get("bytes=0-1048575", false);
    assert_eq!(zeros.status(), 206);
    assert_eq!(
        zeros.bytes().expect("body").as_ref(),
        vec![0u8; MIB as usize]
    );
    // A range holding data is sent whole, zeros and all.
    let around = get(&format!("bytes={}-{}", 8 * MIB - 2, 8 * MIB + 5), true);
    assert_eq!(around.status(), 206);
    assert_eq!(around.bytes().expect("body").as_ref(), b"\0\0data\0\0");
    // The hole at the end of the file, past the last data.
    let tail = get(&format!("bytes={}-{}", 12 * MIB, 16 * MIB - 1), true);
    assert_eq!(tail.status(), 204);
    assert_eq!(tail.headers()[wire::paths::HOLE], (4 * MIB).to_string());
}

#[test]
fn a_file_changed_behind_the_origin_is_never_served_under_its_old_version() {
    let s = start_with(|root| std::fs::write(root.join("f"), b"old content").expect("write"));
    let f = s.client.lookup(ROOT_ID, "f").attr;
    std::fs::write(s.root().join("f"), b"new content!").expect("rewrite");
    // Whether or not the watcher got there first, the old URL never gives
    // the new bytes: it is gone, and the new version serves them.
    let resp = s.client.data(f.id, f.version);
    assert_eq!(resp.status(), 410);
    let now = s.client.attr(f.id);
    assert!(now.version > f.version);
    assert_eq!(now.size, 12);
    let body = s.client.data(f.id, now.version).bytes().expect("body");
    assert_eq!(body.as_ref(), b"new content!");
}

#[test]
fn a_prefix_of_a_version_is_hashed_and_a_changed_file_is_not() {
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let c2 = content.clone();
    let s = start_with(move |root| std::fs::write(root.join("f"), &c2).expect("write"));
    assert!(s.client.info().prefix_digest);
    let f = s.client.lookup(ROOT_ID, "f").attr;
    let digest = |version: u64, len: u64| {
        s.client
            .get(&wire::paths::digest(f.id, version))
            .query(&[("len", len)])
            .send()
            .expect("digest")
    };
    for len in [0, 1, 1 << 20, 3_000_000] {
        let resp = digest(f.version, len);
        assert_eq!(resp.status(), 200);
        let d: wire::Digest = resp.json().expect("json");
        let want = blake3::hash(&content[..len as usize]).to_hex().to_string();
        assert_eq!(
            d,
            wire::Digest {
                len,
                blake3: want,
                pieces: vec![]
            }
        );
    }
    assert_eq!(digest(f.version, 3_000_001).status(), 416);

    // Pieces: each hashed on its own, the last one shorter; the read size
    // (1 MiB) is not a multiple of the piece.
    assert!(s.client.info().piece_digests);
    let pieces = |len: u64, piece: u64| {
        s.client
            .get(&wire::paths::digest(f.id, f.version))
            .query(&[("len", len), ("piece", piece)])
            .send()
            .expect("digest")
    };
    for (len, piece) in [(3_000_000, 1_044_480), (1 << 20, 4096), (0, 4096)] {
        let resp = pieces(len, piece);
        assert_eq!(resp.status(), 200);
        let d: wire::Digest = resp.json().expect("json");
        let want: Vec<String> = content[..len as usize]
            .chunks(piece as usize)
            .map(|p| blake3::hash(p).to_hex().to_string())
            .collect();
        assert_eq!(d.pieces, want, "len {len}, piece {piece}");
        assert_eq!(d.blake3, "", "the whole hashed too");
    }
    for bad in [0, 100, 1 << 30] {
        let resp = pieces(1 << 20, bad);
        assert_eq!(resp.status(), 400, "piece {bad}");
        let err: wire::ApiError = resp.json().expect("error json");
        assert!(err.message.contains("piece must be"), "{}", err.message);
    }
    std::fs::write(s.root().join("f"), b"new").expect("rewrite");
    // The old version is gone, whether or not the watcher got there first.
    assert_eq!(digest(f.version, 3).status(), 410);
}

#[test]
fn manifest_lists_the_tree_parents_first_from_one_snapshot() {
    let s = start_with(|root| {
        std::fs::create_dir_all(root.join("a/b/c")).expect("mkdir");
        std::fs::write(root.join("a/b/c/f"), b"f").expect("write");
        std::fs::write(root.join("top"), b"t").expect("write");
    });
    let text = s
        .client
        .get(wire::paths::MANIFEST)
        .send()
        .expect("manifest")
        .text()
        .expect("text");
    let mut lines = text.lines();
    let header: ManifestHeader =
        serde_json::from_str(lines.next().expect("header")).expect("header json");
    assert_eq!(header.seq, s.client.info().last_seq);
    assert_eq!(header.root.id, ROOT_ID);
    let mut known = vec![ROOT_ID];
    let mut names = Vec::new();
    for line in lines {
        let e: ManifestEntry = serde_json::from_str(line).expect("entry json");
        assert!(
            known.contains(&e.parent),
            "{} listed before its parent",
            e.name
        );
        known.push(e.attr.id);
        names.push(e.name);
    }
    names.sort();
    assert_eq!(names, ["a", "b", "c", "f", "top"]);
}

#[test]
fn malformed_and_oversized_requests_get_clear_4xx() {
    let s = start();
    let post = |body: Vec<u8>| {
        s.client
            .http
            .post(s.client.url(wire::paths::REINTEGRATE))
            .bearer_auth(&s.client.token)
            .header("content-type", "application/json")
            .body(body)
    };
    let (status, err) = s.client.error(post(b"{not json".to_vec()));
    assert_eq!((status, err.code), (400, ErrorCode::BadRequest));
    assert!(err.message.contains("JSON"), "{}", err.message);
    let (_, err) = s
        .client
        .error(post(br#"{"ops":[{"key":"k","op":"explode"}]}"#.to_vec()));
    assert_eq!(err.code, ErrorCode::BadRequest);
    let (status, err) = s.client.error(post(vec![b' '; wire::MAX_JSON_BODY + 10]));
    assert_eq!((status, err.code), (413, ErrorCode::TooLarge));
    let many: Vec<_> = (0..wire::MAX_BATCH_OPS + 1)
        .map(|i| {
            op(
                &format!("k{i}"),
                wire::Op::Create {
                    parent: wire::ObjRef::Id(ROOT_ID),
                    name: format!("n{i}"),
                    object: wire::NewObject::Dir,
                    attrs: Default::default(),
                },
            )
        })
        .collect();
    let body = serde_json::to_vec(&wire::Batch { ops: many }).expect("json");
    assert_eq!(s.client.error(post(body)).1.code, ErrorCode::TooLarge);
    let (_, err) = s
        .client
        .error(s.client.get(&format!("{}?after=abc", wire::paths::JOURNAL)));
    assert_eq!(err.code, ErrorCode::BadRequest);
    let put = s
        .client
        .http
        .put(s.client.url("/v1/uploads/.hidden"))
        .bearer_auth(&s.client.token)
        .body("x");
    assert_eq!(s.client.error(put).1.code, ErrorCode::BadRequest);
    // Still serving.
    assert_eq!(s.client.info().root.id, ROOT_ID);
    let _ = Duration::ZERO;
}

#[test]
fn uploads_are_staged_outside_the_tree_and_limited_in_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    let (_proc, url) = spawn_origin(&root, &dir.path().join("token"), &["--max-upload", "1000"]);
    let token = std::fs::read_to_string(dir.path().join("token")).expect("token");
    let client = Client::at(&url, token.trim());
    let up = client.upload("small", vec![7u8; 1000]);
    assert_eq!(up.size, 1000);
    assert!(root.join(".imz/uploads/small").is_file());
    assert_eq!(
        client.entries(ROOT_ID, None, 10).entries.len(),
        0,
        "an upload is not in the tree"
    );
    let big = client
        .http
        .put(client.url(&wire::paths::upload("big")))
        .bearer_auth(&client.token)
        .body(vec![0u8; 1001]);
    assert_eq!(client.error(big).1.code, ErrorCode::TooLarge);
    assert!(!root.join(".imz/uploads/big").exists());
    let partial: Vec<_> = std::fs::read_dir(root.join(".imz/partial"))
        .expect("partial")
        .collect();
    assert!(partial.is_empty(), "a refused upload leaves nothing behind");
}

#[test]
fn many_downloads_at_once_are_served_whatever_the_soft_open_files_limit() {
    use std::io::Read;
    // Started with a soft limit of 64 open files (the usual one is 1,024,
    // below what a busy origin holds): 100 downloads held open at once
    // each need a socket and a file.
    const DOWNLOADS: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    let body = vec![7u8; 4 << 20];
    std::fs::write(root.join("f"), &body).expect("write");
    let origin = imz_integration::OriginProc::start_full(
        &["prlimit".into(), "--nofile=64:4096".into()],
        &root,
        &dir.path().join("token"),
        "127.0.0.1:0",
        &[],
    )
    .expect("start origin");
    let c = Client::new(&origin);
    let f = c.lookup(ROOT_ID, "f").attr;
    let all_open = std::sync::Barrier::new(DOWNLOADS);
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..DOWNLOADS)
            .map(|_| {
                scope.spawn(|| {
                    let resp = c.get(&wire::paths::data(f.id, f.version)).send();
                    // Hold every download open until all have started (a
                    // failed one too, so that none waits for ever).
                    all_open.wait();
                    let Ok(mut resp) = resp else {
                        return (0, false);
                    };
                    let mut got = Vec::new();
                    let read = resp.read_to_end(&mut got);
                    (resp.status().as_u16(), read.is_ok() && got == body)
                })
            })
            .collect();
        for reader in readers {
            let (status, whole) = reader.join().expect("reader thread");
            assert_eq!(status, 200, "a download was refused (0: not answered)");
            assert!(whole, "a download was cut short");
        }
    });
}

#[test]
fn an_object_s_place_is_where_it_is_now() {
    let s = start_with(|root| {
        std::fs::create_dir(root.join("d")).expect("mkdir");
        std::fs::write(root.join("d/f"), "f").expect("write");
    });
    assert!(s.client.info().places, "the origin says it answers places");
    let d = s.client.lookup(ROOT_ID, "d");
    let f = s.client.lookup(d.attr.id, "f");
    let place: wire::Place = s.client.json(&wire::paths::place(f.attr.id));
    assert_eq!((place.parent, place.name.as_str()), (d.attr.id, "f"));
    assert_eq!(place.attr, f.attr);
    let root: wire::Place = s.client.json(&wire::paths::place(ROOT_ID));
    assert_eq!((root.parent, root.name.as_str()), (0, ""));

    // Moved directly in the tree: the origin's watch moves it, same id.
    std::fs::rename(s.root().join("d/f"), s.root().join("g")).expect("rename");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let place: wire::Place = s.client.json(&wire::paths::place(f.attr.id));
        if (place.parent, place.name.as_str()) == (ROOT_ID, "g") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still at {place:?} after the move"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        s.client
            .error(s.client.get(&wire::paths::place(999_999)))
            .1
            .code,
        ErrorCode::NotFound
    );
}
