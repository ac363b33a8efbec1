//! Path escapes through the API, including symlinks planted in the tree by
//! other programs: nothing outside the root is read or written.

mod origin_common;

use imz_origin::wire::{self, Base, ErrorCode, NewObject, ObjRef, Op, OpResult, ROOT_ID, SetAttrs};
use origin_common::*;

#[test]
fn a_directory_swapped_for_a_symlink_lets_nothing_through() {
    let s = start_with(|root| {
        std::fs::create_dir(root.join("d")).expect("mkdir");
        std::fs::write(root.join("d/f"), b"inside").expect("write");
    });
    let outside = s.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir outside");
    std::fs::write(outside.join("f"), b"SECRET").expect("secret");
    let c = &s.client;
    let d = c.lookup(ROOT_ID, "d").attr;
    let f = c.lookup(d.id, "f").attr;
    // Another program replaces the directory by a symlink to elsewhere.
    std::fs::rename(s.root().join("d"), s.dir.path().join("d-old")).expect("mv away");
    std::os::unix::fs::symlink(&outside, s.root().join("d")).expect("plant symlink");

    let resp = c.data(f.id, f.version);
    let status = resp.status().as_u16();
    let body = resp.bytes().expect("body");
    assert!(matches!(status, 403 | 404 | 410), "got {status}");
    assert!(!body.windows(6).any(|w| w == b"SECRET"));

    c.upload("u", b"evil".to_vec());
    let r = c.reintegrate(vec![op(
        "w",
        Op::Create {
            parent: ObjRef::Id(d.id),
            name: "planted".into(),
            object: NewObject::File {
                upload: Some("u".into()),
            },
            attrs: SetAttrs::default(),
        },
    )]);
    assert!(!matches!(r.results[0], OpResult::Applied { .. }), "{r:?}");
    let r = c.reintegrate(vec![op(
        "t",
        Op::SetAttr {
            id: ObjRef::Id(f.id),
            base: Base::Version(f.version),
            attrs: SetAttrs {
                size: Some(0),
                ..SetAttrs::default()
            },
        },
    )]);
    assert!(!matches!(r.results[0], OpResult::Applied { .. }), "{r:?}");
    assert_eq!(
        std::fs::read(outside.join("f")).expect("secret"),
        b"SECRET",
        "outside untouched"
    );
    assert!(!outside.join("planted").exists());
    // Once reconciled, `d` is what it is: a symlink object, never followed.
    let e = c.eventually("d is a symlink", std::time::Duration::from_secs(20), |c| {
        c.try_lookup(ROOT_ID, "d")
            .filter(|e| e.attr.kind == wire::Kind::Symlink)
    });
    assert_eq!(e.attr.target.as_deref(), outside.to_str());
    let (_, err) = c.error(c.get(&wire::paths::entries(e.attr.id)));
    assert_eq!(err.code, ErrorCode::WrongKind);
}

#[test]
fn a_file_swapped_for_a_symlink_is_not_followed() {
    let s = start_with(|root| std::fs::write(root.join("f"), b"inside").expect("write"));
    let c = &s.client;
    let f = c.lookup(ROOT_ID, "f").attr;
    std::fs::remove_file(s.root().join("f")).expect("rm");
    std::os::unix::fs::symlink("/etc/passwd", s.root().join("f")).expect("symlink");
    let resp = c.data(f.id, f.version);
    assert_ne!(resp.status().as_u16(), 200);
    assert!(!resp.text().expect("body").contains("root:"));
}

#[test]
fn symlinks_created_through_the_api_cannot_point_outside() {
    let s = start();
    let c = &s.client;
    for (i, target) in ["/etc/passwd", "../x", "a/../../b", "../../../../etc"]
        .iter()
        .enumerate()
    {
        let r = c.reintegrate(vec![op(
            &format!("l{i}"),
            Op::Create {
                parent: ObjRef::Id(ROOT_ID),
                name: format!("l{i}"),
                object: NewObject::Symlink {
                    target: (*target).into(),
                },
                attrs: SetAttrs::default(),
            },
        )]);
        match &r.results[0] {
            OpResult::Rejected { error } => assert_eq!(error.code, ErrorCode::Escape, "{target}"),
            other => panic!("{target}: {other:?}"),
        }
    }
    let r = c.reintegrate(vec![op(
        "ok",
        Op::Create {
            parent: ObjRef::Id(ROOT_ID),
            name: "ok".into(),
            object: NewObject::Symlink {
                target: "sub/../here".into(),
            },
            attrs: SetAttrs::default(),
        },
    )]);
    applied(&r.results[0]);
}

#[test]
fn names_that_walk_are_refused_everywhere() {
    let s = start();
    let c = &s.client;
    for name in ["..", ".", "a/b", "../etc", "x\u{0}y"] {
        let req = c
            .get(&wire::paths::lookup(ROOT_ID))
            .query(&[("name", name)]);
        let (status, err) = c.error(req);
        assert_eq!(
            (status, err.code),
            (400, ErrorCode::InvalidName),
            "{name:?}"
        );
    }
    for id in ["..%2F..%2Fetc%2Fpasswd", "a%2Fb", "..", "%00"] {
        let put = c
            .http
            .put(c.url(&format!("/v1/uploads/{id}")))
            .bearer_auth(&c.token)
            .body("x");
        let status = put.send().expect("put").status().as_u16();
        assert!(matches!(status, 400 | 404), "upload id {id}: {status}");
    }
    assert!(!s.dir.path().join("etc").exists());
    let staged: Vec<_> = std::fs::read_dir(s.root().join(".imz/uploads"))
        .expect("uploads")
        .collect();
    assert!(staged.is_empty());
}

/// The origin's state (staged uploads, the store naming everything) is
/// for its own user only, even where it already existed more open.
#[test]
fn the_origin_state_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = start_with(|root| {
        let state = root.join(wire::STATE_DIR_NAME);
        std::fs::create_dir(&state).expect("mkdir");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    });
    let mode = std::fs::metadata(s.root().join(wire::STATE_DIR_NAME))
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "state dir mode {mode:o}");
}

/// Connections that never send a request are closed after the header
/// timeout, so that clients without a token cannot hold the origin's
/// descriptors (they used to stay open for ever); requests go on being
/// served.
#[test]
fn silent_connections_are_closed_after_the_header_timeout() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    let (_origin, url) = spawn_origin(
        &root,
        &dir.path().join("token"),
        &["--header-timeout", "1s", "--max-connections", "64"],
    );
    let addr = url.trim_start_matches("http://").to_owned();
    let mut silent: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Half a request head is no better than none.
    silent[0]
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    for (i, conn) in silent.iter_mut().enumerate() {
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 1024];
        match conn.read(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connection {i} still open after 10 s: {e}"),
        }
    }
    let health = reqwest::blocking::get(format!("{url}/v1/health")).expect("health");
    assert!(health.status().is_success());
}

/// A client that asks for data and reads none of it loses the response
/// after the send timeout, rather than holding a download slot (and a
/// thread) for ever: 256 of them used to block every other download.
#[test]
fn a_download_nobody_reads_is_dropped_after_the_send_timeout() {
    use std::io::{Read, Write};
    const SIZE: usize = 64 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("big"), vec![7u8; SIZE]).expect("write");
    let token_file = dir.path().join("token");
    let (_origin, url) = spawn_origin(&root, &token_file, &["--send-timeout", "1s"]);
    let token = std::fs::read_to_string(&token_file).expect("token");
    let c = Client::at(&url, token.trim());
    let big = c.lookup(ROOT_ID, "big").attr;
    let addr = url.trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        conn,
        "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        wire::paths::data(big.id, big.version),
        token.trim()
    )
    .expect("request");
    // Read nothing for a while; then whatever the origin sent before it
    // gave up, and the end of the connection.
    std::thread::sleep(std::time::Duration::from_secs(3));
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the response was neither finished nor dropped: {e}"),
        }
    }
    assert!(got < SIZE, "the whole response arrived ({got} bytes)");
    // The origin goes on serving downloads.
    assert_eq!(
        c.data(big.id, big.version).bytes().expect("body").len(),
        SIZE
    );
}
