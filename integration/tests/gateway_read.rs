//! The gateway's read path, end to end: a real `imz origin`, a real
//! `imz gateway`, and real NFS clients (`nfs3_client` and libnfs).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use imz_integration::data;
use imz_integration::gateway::eventually;
use imz_integration::libnfs;
use imz_integration::nfs::{Nfs, NfsError, ctx, expect_status, ftype3};
use imz_integration::pipelined::{self, ReadReply};
use imz_integration::{Fixture, GatewayProc};
use nfs3_client::nfs3_types::nfs3::{nfsstat3, stable_how};

type Result = anyhow::Result<()>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_files_list_and_read_byte_exact() -> Result {
    let mut expected = Vec::new();
    let fx = Fixture::new(|root| {
        for i in 0..150u64 {
            let rel = format!("d{}/f{i}.bin", i % 7);
            let len = (i * 7919 % 300_000) as usize + (i as usize % 3);
            data::write_file(&root.join(&rel), i, len)?;
            expected.push((rel, i, len));
        }
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let top = nfs.readdir(&nfs.root.clone(), 4096).await?;
    let names: HashSet<_> = top.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        names,
        (0..7).map(|d| format!("d{d}")).collect::<HashSet<_>>()
    );
    for (rel, seed, len) in &expected {
        let got = ctx(nfs.read_path(rel).await, rel)?;
        assert_eq!(got.len(), *len, "{rel}: length");
        assert!(got == data::bytes(*seed, *len), "{rel}: content differs");
    }
    // The same files through an independent client.
    if libnfs::available() {
        let listed: HashSet<_> = libnfs::ls(fx.port(), "d3")?.into_iter().collect();
        let want: HashSet<_> = expected
            .iter()
            .filter_map(|(rel, _, _)| rel.strip_prefix("d3/").map(str::to_owned))
            .collect();
        assert_eq!(listed, want);
        for (rel, seed, len) in expected.iter().take(20) {
            assert!(
                libnfs::cat(fx.port(), rel)? == data::bytes(*seed, *len),
                "{rel} via nfs-cat"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_entries_list_completely_without_duplicates() -> Result {
    const N: usize = 10_000;
    let fx = Fixture::new(|root| {
        let dir = root.join("big");
        std::fs::create_dir(&dir)?;
        for i in 0..N {
            std::fs::write(dir.join(format!("entry-{i:05}")), i.to_string())?;
        }
        Ok(())
    })?;
    let want: HashSet<String> = (0..N).map(|i| format!("entry-{i:05}")).collect();
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let dir = nfs.lookup_path("big").await?;
    // Small replies force hundreds of cookie round trips (as Linux does).
    let plain = nfs.readdir(&dir, 4096).await?;
    let names: Vec<_> = plain.iter().map(|(n, _)| n.clone()).collect();
    let unique: HashSet<_> = names.iter().cloned().collect();
    assert_eq!(
        names.len(),
        N,
        "READDIR returned duplicates or missed entries"
    );
    assert_eq!(unique, want);
    let fileids: HashSet<_> = plain.iter().map(|(_, id)| *id).collect();
    assert_eq!(fileids.len(), N, "fileids are not unique");

    let plus = nfs.readdirplus(&dir, 8192, 32768).await?;
    assert_eq!(plus.len(), N);
    let plus_names: HashSet<_> = plus.iter().map(|(n, _, _)| n.clone()).collect();
    assert_eq!(plus_names, want);
    let (name, attr, fh) = &plus[1234];
    assert_eq!(
        attr.size,
        name.trim_start_matches("entry-")
            .parse::<u64>()?
            .to_string()
            .len() as u64
    );
    let content = nfs.read_all(fh).await?;
    assert_eq!(
        String::from_utf8(content)?,
        name.trim_start_matches("entry-")
            .parse::<u64>()?
            .to_string()
    );

    if libnfs::available() {
        let listed = libnfs::ls(fx.port(), "big")?;
        assert_eq!(listed.len(), N);
        assert_eq!(listed.into_iter().collect::<HashSet<_>>(), want);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_read_back_their_targets() -> Result {
    let fx = Fixture::new(|root| {
        std::fs::write(root.join("target.txt"), "pointed at")?;
        std::os::unix::fs::symlink("target.txt", root.join("rel-link"))?;
        std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link"))?;
        std::os::unix::fs::symlink("missing", root.join("dangling"))?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    for (name, target) in [
        ("rel-link", "target.txt"),
        ("abs-link", "/etc/passwd"),
        ("dangling", "missing"),
    ] {
        let fh = nfs.lookup_path(name).await?;
        let attr = nfs.getattr(&fh).await?;
        assert_eq!(attr.type_, ftype3::NF3LNK, "{name}");
        assert_eq!(attr.size, target.len() as u64, "{name}");
        assert_eq!(nfs.readlink(&fh).await?, target);
    }
    // A symlink is not followed by the server: reading it as a file fails.
    let fh = nfs.lookup_path("abs-link").await?;
    assert!(nfs.read(&fh, 0, 100).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_reads_in_full_and_in_pieces() -> Result {
    const LEN: usize = 48 << 20;
    let fx = Fixture::new(|root| {
        data::write_file(&root.join("large.bin"), 42, LEN)?;
        data::write_file(&root.join("large2.bin"), 43, LEN)?;
        Ok(())
    })?;
    let content = data::bytes(42, LEN);
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fh = nfs.lookup_path("large.bin").await?;
    assert_eq!(
        nfs.getattr(&fh).await?.size,
        LEN as u64,
        "size known before any data is fetched"
    );
    let all = nfs.read_all(&fh).await?;
    assert!(all == content, "sequential read differs");

    // Pieces of a cold file, out of order, across chunk boundaries.
    let content2 = data::bytes(43, LEN);
    let fh2 = nfs.lookup_path("large2.bin").await?;
    let mut offset = 7u64;
    for i in 0..40u64 {
        offset = (offset * 6_364_136_223 + 1_442_695_041 + i) % (LEN as u64 - 1);
        let count = ((i * 104_729) % 300_000 + 1) as u32;
        let (bytes, eof) = nfs.read(&fh2, offset, count).await?;
        let end = (offset as usize + count as usize).min(LEN);
        assert!(
            bytes[..] == content2[offset as usize..end],
            "piece at {offset}+{count}"
        );
        assert_eq!(eof, end == LEN);
    }
    let (tail, eof) = nfs.read(&fh2, LEN as u64 - 10, 1000).await?;
    assert_eq!(tail.len(), 10);
    assert!(eof);
    let (past, eof) = nfs.read(&fh2, LEN as u64 + 5, 10).await?;
    assert!(past.is_empty() && eof);
    Ok(())
}

/// The gateway's memory stays bounded whatever the file's size, even when
/// a client asks for much of the file at once (160 READs of 1 MiB in
/// flight on one connection) and the disk takes fetched data slower than the network
/// brings it (here each chunk's storing is slowed by 8 ms): READs then wait
/// for the disk. Transfers used to keep their chunks while the storer fell
/// behind, and those piled up without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_when_the_disk_is_slower_than_the_network() -> Result {
    const LEN: usize = 320 << 20;
    const PIECE: u32 = 1 << 20;
    const BOUND_MIB: u64 = 256;
    let mut content = Vec::new();
    let mut fx = Fixture::new(|root| {
        content = data::write_file(&root.join("big.bin"), 9, LEN)?;
        Ok(())
    })?;
    fx.gateway.set_env("IMZ_TEST_STORE_PAUSE_MS", "8");
    fx.gateway.restart_graceful()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fh = nfs.lookup_path("big.bin").await?;
    let reads: Vec<_> = (0..LEN as u64)
        .step_by(PIECE as usize)
        .map(|at| (at, PIECE))
        .collect();
    let mut replies = Vec::new();
    // nfs3_server refuses more than 256 calls in flight on a connection.
    for batch in reads.chunks(160) {
        replies.extend(pipelined::read_all_at_once(fx.port(), &fh.data, batch).await?);
    }
    for ((at, _), reply) in reads.iter().zip(&replies) {
        let at = *at as usize;
        match reply {
            ReadReply::Data(bytes) => assert!(
                bytes[..] == content[at..at + PIECE as usize],
                "READ at {at}: wrong bytes"
            ),
            other => panic!("READ at {at} failed: {other:?}"),
        }
    }
    let peak_kib = imz_integration::bench::proc_status_kib(fx.gateway.proc.pid(), "VmHWM")?;
    eprintln!("gateway peak RSS {} MiB", peak_kib >> 10);
    assert!(
        peak_kib < BOUND_MIB << 10,
        "gateway peak RSS {} MiB reading {} MiB",
        peak_kib >> 10,
        LEN >> 20
    );
    Ok(())
}

/// A sparse file reads back exactly, and its holes neither cross the
/// network (the origin answers a range that is wholly a hole with its
/// length) nor take room in the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_file_reads_back_and_its_holes_cost_neither_network_nor_cache() -> Result {
    const LEN: u64 = 256 << 20;
    let mut fx = Fixture::new(|root| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(root.join("sparse.img"))?;
        f.set_len(LEN)?;
        f.write_all_at(b"boot sector", 0)?;
        f.write_all_at(&data::bytes(3, 100_000), 100 << 20)?;
        f.write_all_at(b"the end", LEN - 7)?;
        Ok(())
    })?;
    let want = std::fs::read(fx.origin_path("sparse.img"))?;
    let got = tokio::task::block_in_place(|| libnfs::cat(fx.port(), "sparse.img"))?;
    assert!(got == want, "sparse.img read back wrong");
    // Read again from the cache alone: all of it was kept.
    fx.origin.proc.kill9();
    let again = tokio::task::block_in_place(|| libnfs::cat(fx.port(), "sparse.img"))?;
    assert!(again == want, "sparse.img read back wrong from the cache");
    let status = fx.gateway.status()?;
    let (used, fetched) = match (
        status["cache_used"].as_u64(),
        status["fetched_bytes"].as_u64(),
    ) {
        (Some(u), Some(f)) => (u, f),
        _ => anyhow::bail!("no cache_used or fetched_bytes in imz status --json: {status}"),
    };
    eprintln!("{fetched} bytes fetched, {used} cached");
    // Only the ranges around the data (8 MiB readahead runs at most).
    assert!(
        fetched < 24 << 20,
        "{fetched} bytes fetched for a {LEN}-byte file of {} KiB of data",
        (11 + 100_000 + 7) >> 10
    );
    assert!(
        used < 2 << 20,
        "{used} bytes of cache for {} KiB of data",
        (11 + 100_000 + 7) >> 10
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_origin_down_serves_cache_and_keeps_handles() -> Result {
    let mut fx = Fixture::new(|root| {
        data::write_file(&root.join("docs/cached.bin"), 1, 3_000_000)?;
        data::write_file(&root.join("docs/uncached.bin"), 2, 1000)?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fh = nfs.lookup_path("docs/cached.bin").await?;
    let uncached = nfs.lookup_path("docs/uncached.bin").await?;
    assert!(nfs.read_all(&fh).await? == data::bytes(1, 3_000_000));
    drop(nfs);

    fx.origin.proc.kill9();
    fx.gateway.restart_graceful()?;

    // The handle from before the restart still works: no ESTALE.
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert!(nfs.read_all(&fh).await? == data::bytes(1, 3_000_000));
    assert_eq!(
        nfs.lookup_path("docs/cached.bin").await?,
        fh,
        "handle changed across restart"
    );
    // Uncached data fails fast with an I/O error, not a hang or STALE.
    let start = Instant::now();
    expect_status(nfs.read(&uncached, 0, 100).await, nfsstat3::NFS3ERR_IO)?;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    // Attributes are still served.
    assert_eq!(nfs.getattr(&uncached).await?.size, 1000);

    // The origin comes back: the gateway reconnects by itself.
    fx.origin.restart()?;
    let got = eventually(Duration::from_secs(10), || {
        let r = futures_block(nfs.read(&uncached, 0, 2000));
        r.ok()
    });
    let ((bytes, _), _) = got.ok_or_else(|| anyhow::anyhow!("gateway did not reconnect"))?;
    assert!(bytes == data::bytes(2, 1000));
    Ok(())
}

/// Runs a future to completion from synchronous polling code inside a
/// multi-threaded runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_changes_are_visible_within_two_seconds() -> Result {
    let fx = Fixture::new(|root| {
        std::fs::write(root.join("news.txt"), "old news")?;
        std::fs::create_dir(root.join("dir"))?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fh = nfs.lookup_path("news.txt").await?;
    assert_eq!(nfs.read_all(&fh).await?, b"old news");
    let dir = nfs.lookup_path("dir").await?;
    assert!(nfs.readdir(&dir, 4096).await?.is_empty());

    std::fs::write(fx.origin_path("news.txt"), "fresh news, longer")?;
    std::fs::write(fx.origin_path("dir/new.txt"), "new file")?;
    let seen = eventually(Duration::from_secs(5), || {
        let content = futures_block(nfs.read_all(&fh)).ok()?;
        (content == b"fresh news, longer").then_some(())
    });
    let ((), took) = seen.ok_or_else(|| anyhow::anyhow!("changed content never visible"))?;
    assert!(
        took < Duration::from_secs(2),
        "change took {took:?} to show"
    );
    let listed = eventually(Duration::from_secs(5), || {
        let names = futures_block(nfs.readdir(&dir, 4096)).ok()?;
        names.iter().any(|(n, _)| n == "new.txt").then_some(())
    });
    let ((), took) = listed.ok_or_else(|| anyhow::anyhow!("new file never listed"))?;
    assert!(
        took < Duration::from_secs(2),
        "new entry took {took:?} to show"
    );
    assert_eq!(nfs.read_path("dir/new.txt").await?, b"new file");

    // A removal at the origin: the name goes away.
    std::fs::remove_file(fx.origin_path("news.txt"))?;
    let gone = eventually(Duration::from_secs(5), || {
        matches!(
            futures_block(nfs.lookup(&nfs.root.clone(), "news.txt")),
            Err(NfsError::Status(nfsstat3::NFS3ERR_NOENT))
        )
        .then_some(())
    });
    assert!(gone.is_some(), "removed file still visible");
    Ok(())
}

/// The gateway asks the origin about a file it does not cache yet; the
/// file changes at the origin (here its mode) before the answer is stored,
/// and the journal's record of that passes by the follower, which skips
/// files it does not cache. The answer, older than the record, must not be
/// stored as it came: the file's directory did not change, so nothing would
/// ever ask again, and the old mode (or link count, or times) stayed for
/// good. The gateway holds the answer for the test
/// (`IMZ_TEST_LOOKUP_HOLD`) while the change passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_overtaken_by_a_journal_record_is_not_stored_stale() -> Result {
    use std::os::unix::fs::PermissionsExt;
    let mut fx = Fixture::new(|root| {
        std::fs::create_dir(root.join("d"))?;
        std::fs::write(root.join("d/f"), "content")?;
        std::fs::set_permissions(root.join("d/f"), std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    })?;
    let hold = fx
        .gateway
        .with_hold("IMZ_TEST_LOOKUP_HOLD", &fx.dir.path().join("hold"))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let d = nfs.lookup_path("d").await?;

    hold.arm()?;
    let asking = tokio::spawn(async move {
        let f = nfs.lookup(&d, "f").await;
        (nfs, f)
    });
    hold.reached().await?;
    // The answer (mode 0644) is in; now the file changes, and the journal
    // record of it passes by the follower.
    let before = origin_last_seq(&fx.origin.url)?;
    std::fs::set_permissions(
        fx.origin_path("d/f"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    let passed = eventually(Duration::from_secs(10), || {
        let seq = origin_last_seq(&fx.origin.url).ok()?;
        let cursor = fx.gateway.status().ok()?["journal_cursor"].as_u64()?;
        (seq > before && cursor >= seq).then_some(())
    });
    anyhow::ensure!(passed.is_some(), "the change never reached the follower");
    hold.release()?;

    let (mut nfs, f) = asking.await?;
    let attr = nfs.getattr(&f?).await?;
    assert_eq!(
        attr.mode & 0o7777,
        0o600,
        "the mode from before the change was kept"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_cache_evicts_and_still_serves_correct_bytes() -> Result {
    const FILES: u64 = 24;
    const LEN: usize = 1_500_000;
    let fx = Fixture::with_cache_size("4MiB", &[], |root| {
        for i in 0..FILES {
            data::write_file(&root.join(format!("f{i}")), 100 + i, LEN)?;
        }
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    for round in 0..2 {
        for i in 0..FILES {
            let got = nfs.read_path(&format!("f{i}")).await?;
            assert!(got == data::bytes(100 + i, LEN), "round {round} file {i}");
        }
    }
    // 36 MB went through a 4 MiB cache: the database must not hold it all.
    let db = fx.gateway.cache_dir.join("imz-cache.redb");
    let size = std::fs::metadata(&db)?.len();
    assert!(
        size < 24 << 20,
        "cache file is {size} bytes for a 4 MiB cache"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_export_path_and_wrong_token_fail_clearly() -> Result {
    let fx = Fixture::new(|root| {
        std::fs::create_dir(root.join("sub"))?;
        std::fs::write(root.join("sub/x"), "x")?;
        Ok(())
    })?;
    for bad in ["/", "/wrong", "/imzfoo", "/imz/no-such-dir"] {
        let err = Nfs::mount(fx.port(), bad).await.err();
        assert!(err.is_some(), "mounting {bad} succeeded");
        assert!(
            format!("{:?}", err).contains("NOENT"),
            "mount {bad}: {err:?}"
        );
    }
    // Mounting a subdirectory of the export works.
    let mut sub = Nfs::mount(fx.port(), "/imz/sub").await?;
    assert_eq!(sub.read_path("x").await?, b"x");

    let bad_token = fx.dir.path().join("bad-token");
    std::fs::write(&bad_token, "not-the-token")?;
    let err = GatewayProc::start(
        &fx.origin.url,
        &bad_token,
        &fx.dir.path().join("cache2"),
        "1GiB",
        &[],
    )
    .err()
    .ok_or_else(|| anyhow::anyhow!("gateway started with a wrong token"))?;
    assert!(format!("{err:#}").contains("exited"), "{err:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_origin_may_not_read_is_permission_denied_not_a_lost_origin() -> Result {
    use std::os::unix::fs::PermissionsExt;
    // The origin runs as `nobody` (root reads everything), over a tree
    // with a file nobody may read.
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    std::fs::write(root.join("open.txt"), "open")?;
    std::fs::write(root.join("later.txt"), "later")?;
    std::fs::write(root.join("locked.txt"), "locked")?;
    std::fs::set_permissions(
        root.join("locked.txt"),
        std::fs::Permissions::from_mode(0o000),
    )?;
    let origin = imz_integration::OriginProc::start_as_nobody(dir.path(), &root)?;
    let cache = dir.path().join("cache");
    let gateway = GatewayProc::start(&origin.url, &origin.token_file, &cache, "1GiB", &[])?;
    let mut nfs = Nfs::mount(gateway.port, "/imz").await?;
    assert_eq!(nfs.read_path("open.txt").await?, b"open");
    expect_status(nfs.read_path("locked.txt").await, nfsstat3::NFS3ERR_ACCES)?;
    // The origin is still the gateway's: an uncached file reads at once
    // (a gateway that took the refusal for a lost origin answers EIO).
    assert_eq!(nfs.read_path("later.txt").await?, b"later");
    Ok(())
}

#[test]
fn serve_refuses_a_cache_inside_the_directory_it_serves() -> Result {
    let dir = tempfile::tempdir()?;
    let served = dir.path().join("served");
    std::fs::create_dir(&served)?;
    std::fs::write(served.join("a"), "a")?;
    // Also through a symlink to the served directory.
    std::os::unix::fs::symlink(&served, dir.path().join("alias"))?;
    for cache in [served.join("cache"), dir.path().join("alias/cache")] {
        let out = std::process::Command::new(imz_integration::imz_bin())
            .arg("serve")
            .arg(&served)
            .arg("--cache")
            .arg(&cache)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "served its own cache at {cache:?}");
        assert!(
            err.contains("inside") && err.contains("leave --cache out"),
            "{err}"
        );
        assert!(!cache.exists(), "{cache:?} was made anyway");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_slow_to_answer_but_alive_is_waited_for_not_taken_for_gone() -> Result {
    // Every data request waits 3 s at the origin before it is answered,
    // as behind a drive spinning up; everything else answers at once.
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    data::write_file(&root.join("a.bin"), 41, 300_000)?;
    data::write_file(&root.join("b.bin"), 42, 300_000)?;
    let wrapper = ["env".to_owned(), "IMZ_TEST_DATA_DELAY_MS=3000".to_owned()];
    let origin = imz_integration::OriginProc::start_wrapped(
        &wrapper,
        &root,
        &dir.path().join("token"),
        "127.0.0.1:0",
    )?;
    let gateway = GatewayProc::start(
        &origin.url,
        &origin.token_file,
        &dir.path().join("cache"),
        "1GiB",
        &[],
    )?;
    let mut nfs = Nfs::mount(gateway.port, "/imz").await?;
    let start = Instant::now();
    assert!(nfs.read_path("a.bin").await? == data::bytes(41, 300_000));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(3),
        "the read did not wait for the origin ({waited:?})"
    );
    let status = gateway.status()?;
    assert_eq!(
        status["connected"], true,
        "a slow origin was taken for an unreachable one: {status}"
    );
    // And the next uncached read is asked of it too (a gateway that took
    // it for gone answers EIO at once).
    assert!(nfs.read_path("b.bin").await? == data::bytes(42, 300_000));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fetch_never_blocks_cached_reads() -> Result {
    let fx = Fixture::new(|root| {
        data::write_file(&root.join("cached.bin"), 31, 2_000_000)?;
        data::write_file(&root.join("cold.bin"), 32, 2_000_000)?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let cached = nfs.lookup_path("cached.bin").await?;
    let cold = nfs.lookup_path("cold.bin").await?;
    assert!(nfs.read_all(&cached).await? == data::bytes(31, 2_000_000));

    // The origin stops answering (SIGSTOP): connections hang, nothing is
    // refused. One client waits on an uncached read...
    fx.origin.proc.signal(19)?;
    let port = fx.port();
    let slow = tokio::spawn(async move {
        let mut other = Nfs::mount(port, "/imz").await?;
        let start = Instant::now();
        let r = other.read(&cold, 0, 1 << 20).await;
        anyhow::Ok((r.map(|_| ()), start.elapsed()))
    });
    // ...while reads of cached data go on at full speed for everyone.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let start = Instant::now();
        let (bytes, _) = nfs.read(&cached, 500_000, 65_536).await?;
        worst = worst.max(start.elapsed());
        assert_eq!(bytes.len(), 65_536);
    }
    let (result, waited) = slow.await??;
    fx.origin.proc.signal(18)?;
    assert!(
        worst < Duration::from_millis(300),
        "a cached read waited {worst:?} behind a stuck fetch"
    );
    assert!(
        matches!(result, Err(NfsError::Status(nfsstat3::NFS3ERR_IO))),
        "the stuck read should fail with EIO, got {result:?}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "the stuck read took {waited:?} to fail"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_journal_makes_the_gateway_revalidate() -> Result {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    data::write_file(&root.join("kept.txt"), 41, 1000)?;
    data::write_file(&root.join("changed.txt"), 42, 1000)?;
    data::write_file(&root.join("removed.txt"), 43, 1000)?;
    let token = dir.path().join("token");
    // The origin keeps only a handful of journal records.
    let origin =
        imz_integration::OriginProc::start_with_args(&root, &token, &["--journal-keep", "3"])?;
    let cache = dir.path().join("cache");
    let mut gateway = GatewayProc::start(&origin.url, &token, &cache, "1GiB", &[])?;
    let mut nfs = Nfs::mount(gateway.port, "/imz").await?;
    for f in ["kept.txt", "changed.txt", "removed.txt"] {
        nfs.read_path(f).await?;
    }
    let changed = nfs.lookup_path("changed.txt").await?;
    drop(nfs);
    let status = gateway.proc.signal_and_wait(15, Duration::from_secs(20))?;
    assert!(status.success());

    // While the gateway is away, more changes than the journal keeps.
    let seq_before = origin_last_seq(&origin.url)?;
    std::fs::write(root.join("changed.txt"), "new content, new size")?;
    std::fs::remove_file(root.join("removed.txt"))?;
    for i in 0..10 {
        std::fs::write(root.join(format!("new{i}.txt")), format!("{i}"))?;
    }
    let journaled = eventually(Duration::from_secs(10), || {
        (origin_last_seq(&origin.url).ok()? >= seq_before + 12).then_some(())
    });
    assert!(
        journaled.is_some(),
        "the origin did not journal the changes"
    );

    gateway = GatewayProc::start(&origin.url, &token, &cache, "1GiB", &[])?;
    let mut nfs = Nfs::mount(gateway.port, "/imz").await?;
    let seen = eventually(Duration::from_secs(10), || {
        let got = futures_block(nfs.read_all(&changed)).ok()?;
        (got == b"new content, new size").then_some(())
    });
    assert!(
        seen.is_some(),
        "cached content was not revalidated after compaction"
    );
    assert!(matches!(
        nfs.lookup_path("removed.txt").await,
        Err(NfsError::Status(nfsstat3::NFS3ERR_NOENT))
    ));
    assert_eq!(nfs.read_path("new7.txt").await?, b"7");
    assert!(nfs.read_path("kept.txt").await? == data::bytes(41, 1000));
    drop(origin);
    Ok(())
}

/// The origin's newest journal sequence (its health check needs no token).
fn origin_last_seq(url: &str) -> anyhow::Result<u64> {
    let health: serde_json::Value = reqwest::blocking::get(format!("{url}/v1/health"))?.json()?;
    health["last_seq"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no last_seq in {health}"))
}

/// A port scan (connect, then reset at once) must not stop NFS. Most such
/// connections are reset before the gateway accepts them, which makes
/// `nfs3_server`'s accept loop panic; it used to stop listening for good
/// after about 130 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_before_accept_do_not_stop_nfs() -> Result {
    const SCANS: usize = 600;
    let fx = Fixture::new(|root| {
        data::write_file(&root.join("f.bin"), 9, 5000)?;
        Ok(())
    })?;
    let mut refused = 0;
    for _ in 0..SCANS {
        match tokio::net::TcpStream::connect(("127.0.0.1", fx.port())).await {
            Ok(stream) => {
                stream.set_zero_linger()?;
                drop(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(refused, 0, "connections refused during {SCANS} scans");
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert!(nfs.read_path("f.bin").await? == data::bytes(9, 5000));
    let restarts = fx.gateway.status()?["nfs_listener_restarts"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no nfs_listener_restarts in imz status --json"))?;
    eprintln!("{SCANS} connect-then-reset: the accept loop restarted {restarts} times");
    Ok(())
}

/// Many READs in flight on one connection, as the kernel client sends them
/// under readahead: each is answered with its bytes. Readahead used to
/// publish the chunks it meant to fetch, then give them up when no stream
/// was free, failing the READs that had begun to wait on them with
/// NFS3ERR_IO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reads_in_flight_on_one_connection_all_get_their_bytes() -> Result {
    const FILES: u64 = 4;
    // Under the 256 calls in progress that nfs3_server allows a connection.
    const READS: u64 = 250;
    const PIECE: u32 = 128 << 10;
    let len = 2 * READS as usize * PIECE as usize;
    let fx = Fixture::new(|root| {
        for f in 0..FILES {
            data::write_file(&root.join(format!("f{f}")), 100 + f, len)?;
        }
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    for f in 0..FILES {
        let fh = nfs.lookup_path(&format!("f{f}")).await?;
        let reads: Vec<_> = (0..READS).map(|i| (i * u64::from(PIECE), PIECE)).collect();
        let replies = pipelined::read_all_at_once(fx.port(), &fh.data, &reads).await?;
        let expected = data::bytes(100 + f, len);
        for (i, reply) in replies.iter().enumerate() {
            let at = i * PIECE as usize;
            match reply {
                ReadReply::Data(bytes) => assert!(
                    bytes[..] == expected[at..at + PIECE as usize],
                    "READ {i} of f{f}: wrong bytes"
                ),
                other => panic!("READ {i} of f{f} failed: {other:?}"),
            }
        }
    }
    Ok(())
}

/// An origin restored from a backup has a journal that went back, behind
/// the gateway's cursor: the gateway resynchronises, where it used to wait
/// for the journal to pass its cursor and skip whatever came before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_restored_from_a_backup_is_followed_again() -> Result {
    let mut fx = Fixture::new(|root| {
        std::fs::write(root.join("a.txt"), "before")?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert_eq!(nfs.read_path("a.txt").await?, b"before");

    // A backup of the stopped origin; then it moves on, and the gateway
    // follows.
    fx.origin.proc.kill9();
    let backup = fx.dir.path().join("backup");
    copy_tree(&fx.root, &backup)?;
    fx.origin.restart()?;
    for i in 0..5 {
        std::fs::write(fx.root.join(format!("later{i}.txt")), "x")?;
    }
    std::fs::write(fx.root.join("a.txt"), "after")?;
    let followed = eventually(Duration::from_secs(10), || {
        (futures_block(nfs.read_path("a.txt")).ok()? == b"after").then_some(())
    });
    assert!(followed.is_some(), "the gateway did not follow the origin");

    // The backup comes back, and the restored origin moves on.
    fx.origin.proc.kill9();
    std::fs::remove_dir_all(&fx.root)?;
    copy_tree(&backup, &fx.root)?;
    fx.origin.restart()?;
    std::fs::write(fx.root.join("new.txt"), "new")?;
    let resynced = eventually(Duration::from_secs(15), || {
        let new = futures_block(nfs.read_path("new.txt")).ok()? == b"new";
        let restored = futures_block(nfs.read_path("a.txt")).ok()? == b"before";
        let gone = matches!(
            futures_block(nfs.lookup_path("later0.txt")),
            Err(NfsError::Status(nfsstat3::NFS3ERR_NOENT))
        );
        (new && restored && gone).then_some(())
    });
    assert!(
        resynced.is_some(),
        "the gateway does not show the restored origin (a.txt: {:?})",
        nfs.read_path("a.txt").await
    );
    Ok(())
}

/// `cp -a FROM TO`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> Result {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()?;
    anyhow::ensure!(status.success(), "cp -a failed");
    Ok(())
}

/// Warm sequential reads are answered from chunks held in memory (read by
/// the previous READ, or preloaded ahead of the reader): a write through the
/// gateway, or a change at the origin, must show in the very next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_sequential_reads_show_every_change_at_once() -> Result {
    const LEN: usize = 12 << 20;
    let fx = Fixture::new(|root| {
        data::write_file(&root.join("warm.bin"), 50, LEN)?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fh = nfs.lookup_path("warm.bin").await?;
    let mut expected = data::bytes(50, LEN);
    for _ in 0..3 {
        assert!(nfs.read_all(&fh).await? == expected, "warm read differs");
    }

    // Rewrites straddling chunk and READ boundaries, each followed at once
    // by a full sequential read.
    for (i, offset) in [(3 << 20) - 100, 5 << 20, (9 << 20) + 4095]
        .into_iter()
        .enumerate()
    {
        let piece = data::bytes(60 + i as u64, 1_500_000);
        nfs.write(&fh, offset as u64, &piece, stable_how::UNSTABLE)
            .await?;
        expected[offset..offset + piece.len()].copy_from_slice(&piece);
        assert!(
            nfs.read_all(&fh).await? == expected,
            "read after write {i} shows old bytes"
        );
    }
    nfs.commit(&fh).await?;
    // The log reaches the origin before it changes there, so what it does
    // next is not a conflict.
    let reached = eventually(Duration::from_secs(20), || {
        (std::fs::read(fx.origin_path("warm.bin")).ok()? == expected).then_some(())
    });
    assert!(reached.is_some(), "writes never reached the origin");

    // Changed at the origin, same size: the journal must invalidate what
    // reads hold in memory too.
    let changed = data::bytes(70, LEN);
    std::fs::write(fx.origin_path("warm.bin"), &changed)?;
    let seen = eventually(Duration::from_secs(5), || {
        (futures_block(nfs.read_all(&fh)).ok()? == changed).then_some(())
    });
    assert!(seen.is_some(), "the origin's change never showed");
    assert!(nfs.read_all(&fh).await? == changed, "old bytes came back");
    Ok(())
}

/// Waits up to 10 s for `imz status` to say the gateway is disconnected
/// for a reason that mentions `why`.
fn disconnected_saying(gateway: &GatewayProc, why: &str) -> anyhow::Result<()> {
    let (status, _) = eventually(Duration::from_secs(10), || {
        let s = gateway.status().ok()?;
        let reason = s["disconnect_reason"].as_str()?.to_owned();
        reason.contains(why).then_some(s)
    })
    .ok_or_else(|| anyhow::anyhow!("the gateway never said it is disconnected for {why:?}"))?;
    anyhow::ensure!(status["connected"] == false, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_given_a_new_token_is_waited_for_until_the_token_file_has_it() -> Result {
    let mut fx = Fixture::new(|root| {
        std::fs::write(root.join("cached.txt"), "cached")?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert_eq!(nfs.read_path("cached.txt").await?, b"cached");

    // The origin is restarted with a new token; the gateway's file still
    // holds the old one.
    fx.origin.proc.kill9();
    let new_token = fx.dir.path().join("new-token");
    std::fs::write(&new_token, "the-new-token")?;
    let addr = fx.origin.addr.to_string();
    fx.origin = imz_integration::OriginProc::start_on(&fx.root, &new_token, &addr)?;
    std::fs::write(fx.root.join("later.txt"), "later")?;

    // Disconnected, saying why: not "connected" while every request is refused.
    disconnected_saying(&fx.gateway, "token")?;
    // Cached data is still served; what is not cached fails fast.
    assert_eq!(nfs.read_path("cached.txt").await?, b"cached");
    let start = Instant::now();
    let uncached = nfs.read_path("later.txt").await;
    assert!(
        matches!(uncached, Err(NfsError::Status(nfsstat3::NFS3ERR_IO))),
        "{uncached:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    // The token file is given the new token: no restart needed.
    std::fs::write(fx.dir.path().join("token"), "the-new-token\n")?;
    let (later, _) = eventually(Duration::from_secs(10), || {
        futures_block(nfs.read_path("later.txt")).ok()
    })
    .ok_or_else(|| anyhow::anyhow!("the gateway never used the new token"))?;
    assert_eq!(later, b"later");
    assert_eq!(fx.gateway.status()?["connected"], true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_one_cache_or_origin_on_one_directory_is_refused_clearly() -> Result {
    let fx = Fixture::new(|root| {
        std::fs::write(root.join("f"), "still served")?;
        Ok(())
    })?;
    let token = fx.dir.path().join("token");
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<String> {
        let out = std::process::Command::new(imz_integration::imz_bin())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()?;
        anyhow::ensure!(!out.status.success(), "a second one started: {args:?}");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let gateway = run(&[
        "gateway".as_ref(),
        "--origin".as_ref(),
        fx.origin.url.as_ref(),
        "--token-file".as_ref(),
        token.as_os_str(),
        "--cache".as_ref(),
        fx.dir.path().join("cache").as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ])?;
    assert!(
        gateway.contains("another imz gateway is using this cache"),
        "{gateway}"
    );
    let origin = run(&[
        "origin".as_ref(),
        "--root".as_ref(),
        fx.root.as_os_str(),
        "--token-file".as_ref(),
        token.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ])?;
    assert!(
        origin.contains("another imz origin already serves this directory"),
        "{origin}"
    );
    assert_eq!(origin.matches("in use").count(), 1, "said once: {origin}");
    // The running pair was not disturbed.
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert_eq!(nfs.read_path("f").await?, b"still served");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_whose_state_was_reset_is_not_followed_and_no_file_gets_another_files_bytes()
-> Result {
    let mut fx = Fixture::new(|root| {
        for i in 1..=3 {
            std::fs::write(root.join(format!("f{i}")), format!("content {i}"))?;
        }
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert_eq!(nfs.read_path("f1").await?, b"content 1");

    // The origin's state is lost (its .imz deleted) while the tree changes:
    // the new store hands out ids and versions afresh, to other files.
    fx.origin.proc.kill9();
    std::fs::remove_dir_all(fx.root.join(".imz"))?;
    std::fs::remove_file(fx.root.join("f1"))?;
    std::fs::write(fx.root.join("f2"), "new 2")?;
    std::fs::write(fx.root.join("g0"), "new g0")?;
    let addr = fx.origin.addr.to_string();
    fx.origin = imz_integration::OriginProc::start_on(&fx.root, &fx.origin.token_file, &addr)?;

    disconnected_saying(&fx.gateway, "another store")?;
    // It stays that way: the reset origin is never taken for the old one.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fx.gateway.status()?["connected"], false);
    for name in ["f2", "f3", "g0"] {
        let on_disk = std::fs::read(fx.root.join(name))?;
        match nfs.read_path(name).await {
            Ok(bytes) => assert_eq!(bytes, on_disk, "{name} read another file's bytes"),
            Err(NfsError::Status(nfsstat3::NFS3ERR_IO | nfsstat3::NFS3ERR_NOENT)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // What the cache holds is still served.
    assert_eq!(nfs.read_path("f1").await?, b"content 1");
    Ok(())
}

/// A file another program keeps appending to at the origin (a busy log)
/// reads through the gateway while it grows: the origin cuts a transfer
/// when the file changes under it, and the gateway asks again and gets the
/// new version, rather than failing the READ. Before, a 67 MB log appended
/// to every 10 ms failed 7 reads in 8 with an I/O error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_growing_at_the_origin_reads_while_it_grows() -> Result {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    const START: usize = 24 << 20;
    let fx = Fixture::new(|root| {
        data::write_file(&root.join("busy.log"), 9, START)?;
        Ok(())
    })?;
    let path = fx.origin_path("busy.log");
    let line = |i: u64| format!("appended line {i:08}\n");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                f.write_all(line(i).as_bytes())?;
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(i)
        })
    };
    let original = data::bytes(9, START);
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let mut outcome = Ok(());
    for round in 0..3 {
        let before = std::fs::metadata(&path)?.len();
        let got = match nfs.read_path("busy.log").await {
            Ok(got) => got,
            Err(e) => {
                outcome = Err(anyhow::anyhow!(
                    "read {round} of the growing file failed: {e}"
                ));
                break;
            }
        };
        let after = std::fs::metadata(&path)?.len();
        assert!(after > before, "the file did not grow during read {round}");
        assert!(got.len() >= START, "read {round}: {} bytes", got.len());
        assert!(
            got[..START] == original[..],
            "read {round}: the start changed"
        );
        // What follows is some of the appended lines, in order.
        let tail = &got[START..];
        let mut want = Vec::new();
        let mut i = 0;
        while want.len() < tail.len() {
            want.extend_from_slice(line(i).as_bytes());
            i += 1;
        }
        assert!(
            tail == &want[..tail.len()],
            "read {round}: the appended part is not what was appended"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    assert!(written > 0);
    outcome
}
