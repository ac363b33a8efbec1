//! Write-back end to end: changes made through the gateway by real NFS
//! clients are durable at once, survive kill -9 of the gateway, go on while
//! the origin is away, and reach the origin exactly once.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imz_integration::Fixture;
use imz_integration::data;
use imz_integration::gateway::eventually;
use imz_integration::libnfs;
use imz_integration::mount::Tmpfs;
use imz_integration::nfs::{Attrs, CreateMode, Nfs, NfsError, Stable, expect_status};
use nfs3_client::nfs3_types::nfs3::nfsstat3;

type Result = anyhow::Result<()>;

/// Fast reintegration for tests (the default waits 3 s).
const QUICK: &[&str] = &["--reintegrate-delay", "100ms"];

fn quick_fixture(populate: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<Fixture> {
    Fixture::with_cache_size("1GiB", QUICK, populate)
}

/// Waits until the origin's file `rel` holds exactly `want`.
fn await_origin_file(
    fx: &Fixture,
    rel: &str,
    want: &[u8],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let path = fx.origin_path(rel);
    eventually(timeout, || {
        (std::fs::read(&path).ok()? == want).then_some(())
    })
    .map(|((), took)| took)
    .ok_or_else(|| {
        let got = std::fs::read(&path).map(|b| b.len());
        anyhow::anyhow!(
            "origin's {rel} never became the expected {} bytes (now: {got:?})",
            want.len()
        )
    })
}

fn await_origin_absent(fx: &Fixture, rel: &str, timeout: Duration) -> Result {
    let path = fx.origin_path(rel);
    eventually(timeout, || {
        (!path.exists() && path.symlink_metadata().is_err()).then_some(())
    })
    .map(|_| ())
    .ok_or_else(|| anyhow::anyhow!("origin's {rel} is still there"))
}

/// Names in an origin directory, sorted, without the origin's state dir.
fn origin_names(fx: &Fixture, rel: &str) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(fx.origin_path(rel))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".imz")
        .collect();
    names.sort();
    Ok(names)
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_reaches_the_origin() -> Result {
    let fx = quick_fixture(|root| {
        std::fs::write(root.join("old.txt"), "to be replaced")?;
        std::fs::create_dir(root.join("keep"))?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    let a = data::bytes(1, 3_000_000);
    let b = data::bytes(2, 70_000);

    let fa = nfs.put_file("a.bin", &a).await?;
    let d = nfs.mkdir(&root, "d").await?;
    let fb = nfs.put_file("d/b.bin", &b).await?;
    nfs.symlink(&d, "link", "b.bin").await?;
    nfs.rename(&root, "a.bin", &d, "a2.bin").await?;
    nfs.setattr(
        &fb,
        &Attrs {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .await?;
    nfs.setattr(
        &fb,
        &Attrs {
            size: Some(10),
            ..Default::default()
        },
    )
    .await?;
    nfs.put_file("gone.txt", b"short-lived").await?;
    nfs.remove(&root, "gone.txt").await?;
    nfs.mkdir(&root, "e").await?;
    nfs.rmdir(&root, "e").await?;
    nfs.put_file("new-old.txt", b"replacement").await?;
    nfs.rename(&root, "new-old.txt", &root, "old.txt").await?;

    // Reads see the changes at once, before any reintegration.
    assert!(nfs.read_all(&fa).await? == a);
    assert_eq!(nfs.read_path("d/b.bin").await?, b[..10].to_vec());
    assert_eq!(nfs.read_path("old.txt").await?, b"replacement");

    await_origin_file(&fx, "d/a2.bin", &a, Duration::from_secs(20))?;
    await_origin_file(&fx, "d/b.bin", &b[..10], Duration::from_secs(20))?;
    await_origin_file(&fx, "old.txt", b"replacement", Duration::from_secs(20))?;
    await_origin_absent(&fx, "a.bin", Duration::from_secs(10))?;
    await_origin_absent(&fx, "gone.txt", Duration::from_secs(10))?;
    await_origin_absent(&fx, "e", Duration::from_secs(10))?;
    assert_eq!(
        std::fs::read_link(fx.origin_path("d/link"))?,
        Path::new("b.bin")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(fx.origin_path("d/b.bin"))?
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o600);
    assert_eq!(origin_names(&fx, "")?, vec!["d", "keep", "old.txt"]);
    assert_eq!(origin_names(&fx, "d")?, vec!["a2.bin", "b.bin", "link"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_stable_when_answered_and_create_modes_behave() -> Result {
    let fx = quick_fixture(|root| {
        std::fs::write(root.join("exists.txt"), "0123456789")?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    // GUARDED on an existing name: EXIST (also for a name only the origin has).
    expect_status(
        nfs.create(&root, "exists.txt", CreateMode::Guarded, &Attrs::default())
            .await,
        nfsstat3::NFS3ERR_EXIST,
    )?;
    // UNCHECKED with size 0 truncates an existing file, like O_CREAT|O_TRUNC.
    let fh = nfs
        .create(
            &root,
            "exists.txt",
            CreateMode::Unchecked,
            &Attrs {
                size: Some(0),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(nfs.getattr(&fh).await?.size, 0);
    // EXCLUSIVE: a retransmission with the same verifier gets the same file.
    let v1 = *b"verifier";
    let x1 = nfs
        .create(&root, "excl", CreateMode::Exclusive(v1), &Attrs::default())
        .await?;
    let x2 = nfs
        .create(&root, "excl", CreateMode::Exclusive(v1), &Attrs::default())
        .await?;
    assert_eq!(x1, x2);
    expect_status(
        nfs.create(
            &root,
            "excl",
            CreateMode::Exclusive(*b"another!"),
            &Attrs::default(),
        )
        .await,
        nfsstat3::NFS3ERR_EXIST,
    )?;
    // A FILE_SYNC write is answered FILE_SYNC; COMMIT gives the verifier
    // WRITE gave (unstable writes: see the kill -9 tests below).
    let w = nfs.write(&x1, 0, b"hello", Stable::FILE_SYNC).await?;
    assert_eq!(w.committed, Stable::FILE_SYNC);
    let u = nfs.write(&x1, 5, b"", Stable::UNSTABLE).await?;
    assert_eq!(u.verf, w.verf);
    assert_eq!(nfs.commit(&x1).await?, w.verf);
    // Names that can never exist at the origin are refused.
    expect_status(
        nfs.create(&root, ".imz", CreateMode::Guarded, &Attrs::default())
            .await,
        nfsstat3::NFS3ERR_INVAL,
    )?;
    expect_status(
        nfs.create(
            &root,
            &"n".repeat(300),
            CreateMode::Guarded,
            &Attrs::default(),
        )
        .await,
        nfsstat3::NFS3ERR_NAMETOOLONG,
    )?;
    // Directory rules.
    let d = nfs.mkdir(&root, "dir").await?;
    nfs.put_file("dir/f", b"x").await?;
    expect_status(nfs.rmdir(&root, "dir").await, nfsstat3::NFS3ERR_NOTEMPTY)?;
    expect_status(
        nfs.rename(&root, "dir", &d, "inside").await,
        nfsstat3::NFS3ERR_INVAL,
    )?;
    expect_status(
        nfs.write(&d, 0, b"x", Stable::FILE_SYNC).await,
        nfsstat3::NFS3ERR_ISDIR,
    )?;
    await_origin_file(&fx, "excl", b"hello", Duration::from_secs(20))?;
    await_origin_file(&fx, "exists.txt", b"", Duration::from_secs(20))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_survive_gateway_kill_and_reintegrate() -> Result {
    let mut fx = quick_fixture(|root| {
        data::write_file(&root.join("cached.bin"), 5, 2_500_000)?;
        std::fs::create_dir(root.join("dir"))?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    let cached = nfs.lookup_path("cached.bin").await?;
    let mut content = nfs.read_all(&cached).await?;
    nfs.lookup_path("dir").await?;

    fx.origin.proc.kill9();
    // Disconnected: writes go on, into cached and new files and directories.
    let patch = data::bytes(6, 100_000);
    nfs.write(&cached, 1_000_000, &patch, Stable::UNSTABLE)
        .await?;
    content[1_000_000..1_100_000].copy_from_slice(&patch);
    let fresh = data::bytes(7, 1_500_000);
    let sub = nfs.mkdir(&root, "made-offline").await?;
    nfs.put_file("made-offline/fresh.bin", &fresh).await?;
    nfs.put_file("dir/note.txt", b"written while the origin was away")
        .await?;
    nfs.symlink(&sub, "to-fresh", "fresh.bin").await?;
    assert!(nfs.read_all(&cached).await? == content);
    drop(nfs);

    // A crash while disconnected loses nothing the client was told.
    fx.gateway.restart()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert!(
        nfs.read_all(&cached).await? == content,
        "patched file after kill -9"
    );
    assert!(nfs.read_path("made-offline/fresh.bin").await? == fresh);
    assert_eq!(
        nfs.read_path("dir/note.txt").await?,
        b"written while the origin was away"
    );

    // The origin returns: everything lands, by itself.
    fx.origin.restart()?;
    await_origin_file(&fx, "cached.bin", &content, Duration::from_secs(30))?;
    await_origin_file(
        &fx,
        "made-offline/fresh.bin",
        &fresh,
        Duration::from_secs(30),
    )?;
    await_origin_file(
        &fx,
        "dir/note.txt",
        b"written while the origin was away",
        Duration::from_secs(30),
    )?;
    // The origin applies a batch op by op: the symlink, made last, may
    // land a moment after the files.
    let link = fx.origin_path("made-offline/to-fresh");
    let linked = eventually(Duration::from_secs(10), || {
        std::fs::read_link(&link)
            .ok()
            .filter(|t| t == Path::new("fresh.bin"))
    });
    assert!(
        linked.is_some(),
        "the symlink made offline never reached the origin: {:?}",
        std::fs::read_link(&link)
    );
    assert_eq!(
        origin_names(&fx, "")?,
        vec!["cached.bin", "dir", "made-offline"]
    );
    Ok(())
}

/// Kills the gateway with -9 once the client loop `writer` has `at_least`
/// acknowledged changes in `acked` (or after 30 s), stops the loop, and
/// returns what was acknowledged.
async fn kill_when_acked<T: Clone>(
    fx: &mut Fixture,
    acked: &Mutex<Vec<T>>,
    at_least: usize,
    writer: tokio::task::JoinHandle<()>,
) -> Vec<T> {
    let started = Instant::now();
    while acked.lock().map(|a| a.len()).unwrap_or(0) < at_least
        && started.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fx.gateway.proc.kill9();
    // The client may not notice the dead server promptly; it has done its part.
    writer.abort();
    let _ = writer.await;
    acked.lock().map(|a| a.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_mid_loop() -> Result {
    let mut fx = quick_fixture(|_| Ok(()))?;
    let port = fx.port();
    // A client writes files one after another and notes each one the
    // gateway acknowledged.
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let writer = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            let Ok(mut nfs) = Nfs::mount(port, "/imz").await else {
                return;
            };
            for i in 0u64.. {
                let body = data::bytes(1000 + i, 20_000 + (i as usize % 7) * 1000);
                if nfs.put_file(&format!("f{i:04}"), &body).await.is_err() {
                    return;
                }
                acked.lock().map(|mut a| a.push(i)).ok();
            }
        })
    };
    let acked = kill_when_acked(&mut fx, &acked, 40, writer).await;
    assert!(
        acked.len() >= 40,
        "only {} writes before the kill",
        acked.len()
    );

    fx.gateway.restart()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    for i in &acked {
        let want = data::bytes(1000 + i, 20_000 + (*i as usize % 7) * 1000);
        assert!(
            nfs.read_path(&format!("f{i:04}")).await? == want,
            "f{i:04} lost or torn"
        );
    }
    for i in &acked {
        let want = data::bytes(1000 + i, 20_000 + (*i as usize % 7) * 1000);
        await_origin_file(&fx, &format!("f{i:04}"), &want, Duration::from_secs(30))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_files_and_their_handles_survive_kill_9_mid_loop() -> Result {
    // Nothing but the client commits: its creates, writes and COMMITs live
    // in the unstable-write log until the kill.
    let mut fx = held_fixture("boot-a")?;
    let port = fx.port();
    type Acked = Arc<Mutex<Vec<(u64, nfs3_client::nfs3_types::nfs3::nfs_fh3)>>>;
    let acked: Acked = Arc::default();
    let writer = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            let Ok(mut nfs) = Nfs::mount(port, "/imz").await else {
                return;
            };
            let Ok(dir) = nfs.mkdir(&nfs.root.clone(), "d").await else {
                return;
            };
            for i in 0u64.. {
                let name = format!("f{i:04}");
                let body = data::bytes(3000 + i, 1000 + (i as usize % 5) * 3000);
                let attrs = Attrs::default();
                let Ok(fh) = nfs.create(&dir, &name, CreateMode::Unchecked, &attrs).await else {
                    return;
                };
                if nfs.write_all(&fh, &body).await.is_err() {
                    return;
                }
                acked.lock().map(|mut a| a.push((i, fh))).ok();
            }
        })
    };
    let acked = kill_when_acked(&mut fx, &acked, 150, writer).await;
    assert!(
        acked.len() >= 150,
        "only {} files before the kill",
        acked.len()
    );

    fx.gateway.restart()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let body = |i: u64| data::bytes(3000 + i, 1000 + (i as usize % 5) * 3000);
    for (i, fh) in &acked {
        // The handle the client holds still names the file (a replayed
        // create keeps its fileid), and so does its name.
        assert!(nfs.read_all(fh).await? == body(*i), "f{i:04} by handle");
        let by_name = nfs.lookup_path(&format!("d/f{i:04}")).await?;
        assert_eq!(&by_name, fh, "f{i:04} has another handle");
    }
    fx.gateway.ctl(&["sync"])?;
    for (i, _) in &acked {
        await_origin_file(
            &fx,
            &format!("d/f{i:04}"),
            &body(*i),
            Duration::from_secs(30),
        )?;
    }
    Ok(())
}

/// A gateway whose reintegrator waits (so nothing but the client's own
/// requests commits), started as if on boot `boot`.
fn held_fixture(boot: &str) -> anyhow::Result<Fixture> {
    let mut fx = Fixture::with_cache_size("1GiB", &["--reintegrate-delay", "10m"], |_| Ok(()))?;
    fx.gateway.set_env("IMZ_TEST_BOOT_ID", boot);
    fx.gateway.restart_graceful()?;
    Ok(fx)
}

const PIECE: usize = 300_000;

/// Creates `name` and writes `pieces` pieces of it UNSTABLE, without a
/// COMMIT. Returns the handle, the content, the verifier, and the length of
/// the prefix that was answered FILE_SYNC (the writer makes the first
/// unstable write of a run durable).
async fn unstable_file(
    nfs: &mut Nfs,
    name: &str,
    pieces: usize,
) -> anyhow::Result<(
    nfs3_client::nfs3_types::nfs3::nfs_fh3,
    Vec<u8>,
    [u8; 8],
    usize,
)> {
    let root = nfs.root.clone();
    let fh = nfs
        .create(&root, name, CreateMode::Guarded, &Attrs::default())
        .await?;
    let body = data::bytes(77, pieces * PIECE);
    let mut verf = None;
    let mut stable_prefix = 0;
    let mut unstable = 0;
    for (i, piece) in body.chunks(PIECE).enumerate() {
        let w = nfs
            .write(&fh, (i * PIECE) as u64, piece, Stable::UNSTABLE)
            .await?;
        assert!(verf.is_none_or(|v| v == w.verf), "the verifier changed");
        verf = Some(w.verf);
        if w.committed == Stable::UNSTABLE {
            unstable += 1;
        } else {
            assert_eq!(unstable, 0, "a stable answer after unstable ones");
            stable_prefix = (i + 1) * PIECE;
        }
    }
    assert!(
        unstable >= pieces - 1,
        "only {unstable} of {pieces} writes were answered UNSTABLE"
    );
    Ok((fh, body, verf.unwrap_or_default(), stable_prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstable_writes_survive_kill_9_before_their_commit() -> Result {
    let mut fx = held_fixture("boot-a")?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let (fh, body, verf, _) = unstable_file(&mut nfs, "u.bin", 6).await?;
    drop(nfs);

    // No COMMIT yet; the gateway dies. Same system, so the unstable-write
    // log is replayed: the handle stays good, COMMIT answers with the same
    // verifier (nothing to resend), and every byte is there.
    fx.gateway.restart()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert_eq!(nfs.commit(&fh).await?, verf, "the verifier changed");
    assert!(nfs.read_all(&fh).await? == body, "unstable writes lost");
    // The replayed writes are in the log for the origin, too.
    fx.gateway.ctl(&["sync"])?;
    await_origin_file(&fx, "u.bin", &body, Duration::from_secs(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_crash_with_unstable_writes_outstanding_changes_the_verifier() -> Result {
    let mut fx = held_fixture("boot-a")?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let (fh, body, verf, stable_prefix) = unstable_file(&mut nfs, "s.bin", 6).await?;
    drop(nfs);

    // Killed, and "rebooted": the page cache holding the unstable-write log
    // is gone, as far as the gateway can tell. It must not answer COMMIT
    // with the old verifier; it takes a new handle generation, so the
    // client gets an error instead of silently losing its writes.
    fx.gateway.set_env("IMZ_TEST_BOOT_ID", "boot-b");
    fx.gateway.restart()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    expect_status(nfs.commit(&fh).await, nfsstat3::NFS3ERR_STALE)?;
    // What was answered FILE_SYNC survived, and perhaps more of what the
    // log kept (here all of it: a test cannot empty the page cache), in
    // the order it was written; the new verifier differs.
    let fresh = nfs.lookup_path("s.bin").await?;
    let kept = nfs.read_all(&fresh).await?;
    assert!(kept.len() >= stable_prefix && body.starts_with(&kept));
    let w = nfs.write(&fresh, 0, b"x", Stable::FILE_SYNC).await?;
    assert_ne!(w.verf, verf);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_writes_and_namespace_changes_survive_a_system_crash() -> Result {
    use std::os::unix::fs::PermissionsExt;
    let mut fx = held_fixture("boot-a")?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let (fh, body, _, _) = unstable_file(&mut nfs, "k.bin", 4).await?;
    nfs.commit(&fh).await?;
    // Then every kind of change that is answered as on disk: each must be.
    let root = nfs.root.clone();
    let dir = nfs.mkdir(&root, "d").await?;
    for i in 0..40 {
        let name = format!("n{i:02}");
        let fh = nfs
            .create(&dir, &name, CreateMode::Unchecked, &Attrs::default())
            .await?;
        nfs.write(&fh, 0, name.as_bytes(), Stable::FILE_SYNC)
            .await?;
    }
    for i in 0..10 {
        nfs.rename(&dir, &format!("n{i:02}"), &dir, &format!("r{i:02}"))
            .await?;
    }
    nfs.rename(&dir, "n10", &dir, "n11").await?;
    for i in 12..16 {
        nfs.remove(&dir, &format!("n{i:02}")).await?;
    }
    let mode = Attrs {
        mode: Some(0o600),
        ..Attrs::default()
    };
    for i in 16..20 {
        let fh = nfs.lookup(&dir, &format!("n{i:02}")).await?;
        nfs.setattr(&fh, &mode).await?;
    }
    let n20 = nfs.lookup(&dir, "n20").await?;
    let cut = Attrs {
        size: Some(2),
        ..Attrs::default()
    };
    nfs.setattr(&n20, &cut).await?;
    nfs.mkdir(&dir, "e").await?;
    nfs.rmdir(&dir, "e").await?;
    drop(nfs);

    let content = |name: &str| -> Vec<u8> {
        match name {
            "n11" => b"n10".to_vec(),
            "n20" => b"n2".to_vec(),
            r if r.starts_with('r') => format!("n{}", &r[1..]).into_bytes(),
            n => n.as_bytes().to_vec(),
        }
    };
    let mut want: Vec<String> = (0..10).map(|i| format!("r{i:02}")).collect();
    want.push("n11".into());
    want.extend((16..40).map(|i| format!("n{i:02}")));
    want.sort();

    // Killed and "rebooted" with all of it since the last durable commit:
    // it lives in the unstable-write log, which recovery replays on any
    // boot.
    fx.gateway.set_env("IMZ_TEST_BOOT_ID", "boot-b");
    fx.gateway.restart()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fresh = nfs.lookup_path("k.bin").await?;
    assert!(nfs.read_all(&fresh).await? == body, "committed writes lost");
    let dir = nfs.lookup_path("d").await?;
    let mut names: Vec<String> = nfs
        .readdir(&dir, 64 << 10)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    assert_eq!(names, want);
    for name in &want {
        let fh = nfs.lookup(&dir, name).await?;
        assert_eq!(nfs.read_all(&fh).await?, content(name), "{name}");
        let expected = if ("n16".."n20").contains(&name.as_str()) {
            0o600
        } else {
            0o644
        };
        assert_eq!(nfs.getattr(&fh).await?.mode & 0o777, expected, "{name}");
    }
    // And on to the origin, as they are.
    fx.gateway.ctl(&["sync"])?;
    await_origin_file(&fx, "k.bin", &body, Duration::from_secs(30))?;
    for name in &want {
        await_origin_file(
            &fx,
            &format!("d/{name}"),
            &content(name),
            Duration::from_secs(30),
        )?;
    }
    assert_eq!(origin_names(&fx, "d")?, want);
    let n16 = std::fs::metadata(fx.origin_path("d/n16"))?;
    assert_eq!(n16.permissions().mode() & 0o777, 0o600);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_makes_unstable_writes_durable_for_any_later_boot() -> Result {
    let mut fx = held_fixture("boot-a")?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let (fh, body, verf, _) = unstable_file(&mut nfs, "c.bin", 4).await?;
    drop(nfs);

    // SIGTERM, then a start on another boot: nothing was outstanding, so
    // handles and verifier stay.
    fx.gateway.set_env("IMZ_TEST_BOOT_ID", "boot-b");
    fx.gateway.restart_graceful()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert_eq!(nfs.commit(&fh).await?, verf);
    assert!(nfs.read_all(&fh).await? == body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstable_writes_left_without_commit_settle_by_themselves() -> Result {
    let mut fx = held_fixture("boot-a")?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let (fh, body, verf, stable_prefix) = unstable_file(&mut nfs, "i.bin", 4).await?;
    let written = Instant::now();
    drop(nfs);

    // Status counts what awaits COMMIT. Read within the idle settle's 2 s
    // it must be exactly the unstable part; later it may already be 0.
    let status = fx.gateway.status()?;
    if written.elapsed() < Duration::from_millis(1500) {
        assert_eq!(status["unstable_files"].as_u64(), Some(1), "{status}");
        assert_eq!(
            status["unstable_bytes"].as_u64(),
            Some((body.len() - stable_prefix) as u64),
            "{status}"
        );
    } else {
        eprintln!("status read too late to see the outstanding writes");
    }

    // No COMMIT comes. Nothing else here commits durably (reintegration is
    // held), so the outstanding writes clear only when the gateway, idle,
    // makes them durable and forgets the boot it recorded.
    let unstable = || -> Option<u64> { fx.gateway.status().ok()?["unstable_files"].as_u64() };
    eventually(Duration::from_secs(20), || (unstable()? == 0).then_some(()))
        .ok_or_else(|| anyhow::anyhow!("unstable writes still outstanding: {:?}", unstable()))?;

    // So even a crash and a reboot keep every byte and every handle.
    fx.gateway.set_env("IMZ_TEST_BOOT_ID", "boot-b");
    fx.gateway.restart()?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert_eq!(nfs.commit(&fh).await?, verf);
    assert!(nfs.read_all(&fh).await? == body);
    Ok(())
}

/// Writes `n` small files and returns their names and contents.
async fn write_many(nfs: &mut Nfs, n: u64, seed: u64) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for i in 0..n {
        let name = format!("m{i:04}");
        let body = data::bytes(seed + i, 3000 + (i as usize % 5) * 500);
        nfs.put_file(&name, &body).await?;
        files.push((name, body));
    }
    Ok(files)
}

/// The origin ends with exactly these files, each once, no conflict copies.
fn assert_origin_has_exactly(fx: &Fixture, files: &[(String, Vec<u8>)]) -> Result {
    for (name, body) in files {
        await_origin_file(fx, name, body, Duration::from_secs(60))?;
    }
    let mut want: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    want.sort();
    assert_eq!(
        origin_names(fx, "")?,
        want,
        "duplicates or strays at the origin"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_gateway_during_reintegration_duplicates_nothing() -> Result {
    let mut fx = quick_fixture(|_| Ok(()))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    fx.origin.proc.kill9();
    let files = write_many(&mut nfs, 300, 50).await?;
    drop(nfs);
    fx.origin.restart()?;
    // Kill the gateway as soon as the first files land.
    let first = fx.origin_path("m0000");
    eventually(Duration::from_secs(30), || first.exists().then_some(()))
        .ok_or_else(|| anyhow::anyhow!("reintegration never started"))?;
    fx.gateway.restart()?;
    assert_origin_has_exactly(&fx, &files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_origin_during_reintegration_duplicates_nothing() -> Result {
    let mut fx = quick_fixture(|_| Ok(()))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    fx.origin.proc.kill9();
    let files = write_many(&mut nfs, 300, 80).await?;
    fx.origin.restart()?;
    let first = fx.origin_path("m0000");
    eventually(Duration::from_secs(30), || first.exists().then_some(()))
        .ok_or_else(|| anyhow::anyhow!("reintegration never started"))?;
    fx.origin.proc.kill9();
    // Writes still go on meanwhile.
    nfs.put_file("late", b"after the crash").await?;
    fx.origin.restart()?;
    let mut all = files;
    all.push(("late".into(), b"after the crash".to_vec()));
    assert_origin_has_exactly(&fx, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_refuses_new_data_and_keeps_what_it_logged() -> Result {
    let mut fx = Fixture::with_cache_size("3MiB", QUICK, |_| Ok(()))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    fx.origin.proc.kill9();
    let mut kept = Vec::new();
    let mut refused = false;
    for i in 0..10u64 {
        let body = data::bytes(200 + i, 1_000_000);
        match nfs.put_file(&format!("big{i}"), &body).await {
            Ok(_) => kept.push((format!("big{i}"), body)),
            Err(NfsError::Status(nfsstat3::NFS3ERR_NOSPC)) => {
                refused = true;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert!(
        refused,
        "the cache took more than its size of unreintegrated data"
    );
    assert!(!kept.is_empty());
    for (name, body) in &kept {
        assert!(nfs.read_path(name).await? == *body, "{name} damaged");
    }
    // Once the origin is back, the logged data drains and space returns.
    fx.origin.restart()?;
    for (name, body) in &kept {
        await_origin_file(&fx, name, body, Duration::from_secs(30))?;
    }
    let more = data::bytes(999, 1_000_000);
    let ok = eventually(Duration::from_secs(20), || {
        block(nfs.put_file("after", &more)).ok()
    });
    assert!(ok.is_some(), "space never came back after reintegration");
    let _ = libnfs::available();
    Ok(())
}

/// Shrinking a file and growing it again must leave zeros between the two
/// sizes at the origin, not the origin's old bytes (the two size changes
/// cannot travel as one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_then_grow_reaches_the_origin_as_zeros() -> Result {
    let old = data::bytes(41, 17_179);
    let fx = Fixture::with_cache_size("1GiB", &["--reintegrate-delay", "2s"], |root| {
        std::fs::write(root.join("f"), &old)?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fh = nfs.lookup_path("f").await?;
    let size = |n| Attrs {
        size: Some(n),
        ..Attrs::default()
    };
    // Both inside one aging window, so they meet in the log.
    nfs.setattr(&fh, &size(456)).await?;
    nfs.setattr(&fh, &size(8686)).await?;
    let mut want = old[..456].to_vec();
    want.resize(8686, 0);
    assert_eq!(nfs.read_all(&fh).await?, want);
    fx.gateway.ctl(&["sync", "--timeout", "30s"])?;
    assert_eq!(std::fs::read(fx.origin_path("f"))?, want);
    Ok(())
}

/// A change made while the reintegrator has planned a batch, before it
/// marks the batch's records shipped, must still reach the origin. A size
/// change there rewrites no record: it is dropped, because the pending
/// store (or create) carries the file's content as it is when shipped. But
/// the plan had already read the size to upload, so the origin kept a
/// shrunk file's old length, padded with zeros (found by the write model,
/// seed 1795780295176304403), or a grown file's old length, its new bytes
/// lost, and the mtime from before. The gateway holds the planned batch
/// for the test (`IMZ_TEST_PLAN_HOLD`) while the files change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_between_planning_a_batch_and_shipping_it_reaches_the_origin() -> Result {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let old = data::bytes(60, 90_000);
    // Nothing ships until `imz sync` asks.
    let mut fx = Fixture::with_cache_size("1GiB", &["--reintegrate-delay", "10m"], |root| {
        std::fs::write(root.join("old"), &old)?;
        Ok(())
    })?;
    let hold = fx
        .gateway
        .with_hold("IMZ_TEST_PLAN_HOLD", &fx.dir.path().join("hold"))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;

    // New files (their content travels with their create) and a store to
    // a file the origin has.
    let shrunk = nfs.put_file("shrunk", &data::bytes(61, 80_000)).await?;
    let grown = nfs.put_file("grown", &data::bytes(62, 50_000)).await?;
    let chmodded = nfs.put_file("chmodded", &data::bytes(63, 1_000)).await?;
    let patched = nfs.lookup_path("old").await?;
    nfs.write(&patched, 100, &data::bytes(64, 5_000), Stable::FILE_SYNC)
        .await?;
    hold.arm()?;
    let syncing = std::thread::spawn({
        let cache_dir = fx.gateway.cache_dir.clone();
        move || {
            imz_integration::gateway::control(
                &imz_integration::process::imz_bin(),
                &cache_dir,
                &["sync", "--timeout", "60s"],
            )
        }
    });
    hold.reached().await?;

    let size = |n| Attrs {
        size: Some(n),
        ..Attrs::default()
    };
    nfs.setattr(&shrunk, &size(10_000)).await?;
    let tail = data::bytes(65, 30_000);
    nfs.write(&grown, 50_000, &tail, Stable::FILE_SYNC).await?;
    nfs.setattr(
        &chmodded,
        &Attrs {
            mode: Some(0o600),
            ..Attrs::default()
        },
    )
    .await?;
    nfs.setattr(&patched, &size(3_000)).await?;
    hold.release()?;
    syncing
        .join()
        .map_err(|_| anyhow::anyhow!("sync thread panicked"))??;
    // The changes made meanwhile, if they logged records of their own.
    fx.gateway.ctl(&["sync", "--timeout", "30s"])?;

    let mut wrong = Vec::new();
    for name in ["shrunk", "grown", "chmodded", "old"] {
        let fh = nfs.lookup_path(name).await?;
        let here = nfs.read_all(&fh).await?;
        let there = std::fs::read(fx.origin_path(name))?;
        if here != there {
            wrong.push(format!(
                "{name}: the origin holds {} bytes, the gateway {}",
                there.len(),
                here.len()
            ));
        }
        let attr = nfs.getattr(&fh).await?;
        let meta = std::fs::metadata(fx.origin_path(name))?;
        let at_origin = (meta.mode() & 0o7777, meta.mtime(), meta.mtime_nsec());
        let at_gateway = (
            attr.mode & 0o7777,
            i64::from(attr.mtime.seconds),
            i64::from(attr.mtime.nseconds),
        );
        if at_origin != at_gateway {
            wrong.push(format!(
                "{name}: mode and mtime {at_origin:?} at the origin, {at_gateway:?} at the gateway"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(std::fs::read(fx.origin_path("shrunk"))?.len(), 10_000);
    assert_eq!(
        std::fs::metadata(fx.origin_path("chmodded"))?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    Ok(())
}

/// A truncation moves the file's mtime at the gateway; the origin must take
/// that mtime, not its own clock's when the change arrives (found by the
/// write model once it compared mtimes: the record carried only the size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncation_reaches_the_origin_with_the_gateways_mtime() -> Result {
    use std::os::unix::fs::MetadataExt;
    let fx = quick_fixture(|root| {
        std::fs::write(root.join("f"), data::bytes(70, 20_000))?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fh = nfs.lookup_path("f").await?;
    nfs.setattr(
        &fh,
        &Attrs {
            size: Some(5_000),
            ..Attrs::default()
        },
    )
    .await?;
    // However soon the change arrives, the origin's clock (in ns) has
    // moved on.
    fx.gateway.ctl(&["sync", "--timeout", "30s"])?;
    let attr = nfs.getattr(&fh).await?;
    let meta = std::fs::metadata(fx.origin_path("f"))?;
    assert_eq!(meta.len(), 5_000);
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (
            i64::from(attr.mtime.seconds),
            i64::from(attr.mtime.nseconds)
        ),
        "mtime at the origin, then at the gateway"
    );
    Ok(())
}

/// The first write to a file only partly cached brings the rest of it in:
/// a written file never depends on origin bytes, so with the origin gone
/// it still reads whole, and its upload is whole when the origin returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_a_partly_cached_file_makes_it_whole_first() -> Result {
    let big = data::bytes(42, 5 << 20);
    let mut fx = quick_fixture(|root| {
        std::fs::write(root.join("big"), &big)?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fh = nfs.lookup_path("big").await?;
    // Only the first megabyte has been read.
    let (head, _) = nfs.read(&fh, 0, 1 << 20).await?;
    assert_eq!(head, big[..1 << 20]);
    nfs.write(&fh, 10, b"patched", Stable::FILE_SYNC).await?;
    let mut want = big.clone();
    want[10..17].copy_from_slice(b"patched");
    fx.origin.proc.kill9();
    assert!(
        nfs.read_all(&fh).await? == want,
        "the written file is not whole in the cache"
    );
    fx.origin.restart()?;
    fx.gateway.ctl(&["sync", "--timeout", "30s"])?;
    assert!(std::fs::read(fx.origin_path("big"))? == want);
    Ok(())
}

/// A fixture whose gateway (`--cache-size 10GiB`) keeps its cache on a
/// tmpfs of `disk` bytes; dropped in order, the gateway stops before the
/// tmpfs goes.
fn fixture_on_small_disk(
    disk: u64,
    populate: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<(Fixture, Tmpfs)> {
    let dir = tempfile::tempdir()?;
    let tmpfs = Tmpfs::mount(&dir.path().join("disk"), disk)?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    populate(&root)?;
    let token = dir.path().join("token");
    let origin = imz_integration::OriginProc::start(&root, &token)?;
    let gateway = imz_integration::GatewayProc::start(
        &origin.url,
        &token,
        &tmpfs.0.join("cache"),
        "10GiB",
        QUICK,
    )?;
    let fx = Fixture {
        dir,
        root,
        origin,
        gateway,
    };
    Ok((fx, tmpfs))
}

/// A cache on a disk smaller than `--cache-size` holds what the disk takes:
/// writes past that get NOSPC, and the gateway goes on serving. A full
/// disk used to fail that write with an I/O error, and every later call
/// too, reads included (redb stops at its first failed write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_on_a_small_disk_takes_what_fits_and_answers_nospc_past_it() -> Result {
    const DISK: u64 = 1200 << 20;
    const PIECE: usize = 1 << 20;
    let (mut fx, _disk) = fixture_on_small_disk(DISK, |_| Ok(()))?;
    let capacity = fx.gateway.status()?["cache_capacity"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no cache_capacity in imz status --json"))?;
    assert!(
        capacity > 0 && capacity < DISK,
        "capacity {capacity} on a disk of {DISK}"
    );

    // With the origin away nothing drains: written data piles up. (The
    // root is listed first, so that it can be listed offline.)
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    nfs.readdir(&nfs.root.clone(), 4096).await?;
    fx.origin.proc.kill9();
    let fh = nfs
        .create(
            &nfs.root.clone(),
            "big",
            CreateMode::Unchecked,
            &Attrs::default(),
        )
        .await?;
    let body = data::bytes(77, capacity as usize + 64 * PIECE);
    let mut written = 0;
    loop {
        let piece = &body[written..written + PIECE];
        match nfs
            .write(&fh, written as u64, piece, Stable::FILE_SYNC)
            .await
        {
            Ok(_) => written += PIECE,
            Err(NfsError::Status(nfsstat3::NFS3ERR_NOSPC)) => break,
            Err(e) => return Err(anyhow::anyhow!("write at {written}: {e:?}")),
        }
        assert!(
            written as u64 <= capacity,
            "took {written} bytes past a capacity of {capacity}"
        );
    }
    assert!(
        written as u64 >= capacity / 2,
        "refused at {written} of a capacity of {capacity}"
    );
    let listed = nfs.readdir(&nfs.root.clone(), 4096).await?;
    assert!(listed.iter().any(|(name, _)| name == "big"));
    assert!(nfs.read_all(&fh).await? == body[..written], "big damaged");

    // The origin back, the logged data drains, and new data fits again.
    fx.origin.restart()?;
    let path = fx.origin_path("big");
    let drained = eventually(Duration::from_secs(60), || {
        (std::fs::read(&path).ok()? == body[..written]).then_some(())
    });
    assert!(drained.is_some(), "big never reached the origin whole");
    let more = data::bytes(78, written);
    let ok = eventually(Duration::from_secs(30), || {
        block(nfs.put_file("more", &more)).ok()
    });
    assert!(ok.is_some(), "space never came back after reintegration");
    Ok(())
}

/// The disk under the cache filled by another program: writes get NOSPC,
/// cached and uncached files still read, and once there is room again
/// writes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_by_another_program_gives_nospc_until_there_is_room() -> Result {
    let (fx, disk) = fixture_on_small_disk(1200 << 20, |root| {
        data::write_file(&root.join("cached.bin"), 5, 3 << 20)?;
        data::write_file(&root.join("uncached.bin"), 6, 3 << 20)?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert!(nfs.read_path("cached.bin").await? == data::bytes(5, 3 << 20));

    // Another program takes all but 16 MiB.
    let free = available_bytes(&disk.0)?;
    let status = std::process::Command::new("fallocate")
        .args(["-l", &(free - (16 << 20)).to_string()])
        .arg(disk.0.join("filler"))
        .status()?;
    anyhow::ensure!(status.success(), "fallocate failed");

    let body = data::bytes(7, 24 << 20);
    match nfs.put_file("new.bin", &body).await {
        Err(NfsError::Status(nfsstat3::NFS3ERR_NOSPC)) => {}
        other => anyhow::bail!("a write to a full disk: {other:?}"),
    }
    assert!(nfs.read_path("cached.bin").await? == data::bytes(5, 3 << 20));
    assert!(nfs.read_path("uncached.bin").await? == data::bytes(6, 3 << 20));

    std::fs::remove_file(disk.0.join("filler"))?;
    nfs.put_file("new.bin", &body).await?;
    await_origin_file(&fx, "new.bin", &body, Duration::from_secs(20))?;
    Ok(())
}

/// The disk filled to its last byte by another program: a change then
/// fails where redb writes its pages, and redb stops for good (every later
/// call fails, reads too, until the database is opened again). The gateway
/// restarts itself once there is room: same process, same port, the
/// handles clients hold still good, and nothing it acknowledged lost,
/// unstable writes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_to_the_last_byte_restarts_the_gateway_and_loses_nothing() -> Result {
    let (mut fx, disk) = fixture_on_small_disk(1200 << 20, |root| {
        data::write_file(&root.join("cached.bin"), 5, 3 << 20)?;
        Ok(())
    })?;
    let pid = fx.gateway.proc.pid();
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    assert!(nfs.read_path("cached.bin").await? == data::bytes(5, 3 << 20));
    let stable = data::bytes(8, 2 << 20);
    nfs.put_file("stable.bin", &stable).await?;
    let (fh, body, verf, _) = unstable_file(&mut nfs, "u.bin", 4).await?;

    // Another program takes every byte left.
    disk.fill("filler")?;
    // Changes that add no data are not refused up front; one of them soon
    // needs a page the disk cannot give. How soon depends on when redb
    // writes its pages out (usually within a few hundred; on a busy
    // machine 500 fitted in memory), and at the latest the writer's
    // durable commit after MAX_LOGGED_RECORDS (16,384) changes must.
    let mut made = Vec::new();
    for i in 0..20_000 {
        let name = format!("d{i}");
        match nfs.mkdir(&root, &name).await {
            Ok(_) => made.push(name),
            Err(_) => break,
        }
    }
    assert!(
        made.len() < 20_000,
        "20,000 directories made on a full disk"
    );
    drop(nfs);
    // While it waits for room, it says why.
    let status = fx.gateway.status()?;
    assert!(
        status["storage_failure"]
            .as_str()
            .is_some_and(|s| s.contains("space")),
        "{status}"
    );
    let human = fx.gateway.ctl(&["status"])?;
    assert!(human.contains("STORAGE"), "{human}");

    std::fs::remove_file(disk.0.join("filler"))?;
    let again = fx.gateway.proc.wait_for_line(
        imz_integration::gateway::GATEWAY_READY,
        Duration::from_secs(30),
    )?;
    assert!(
        again.starts_with(&format!("127.0.0.1:{}", fx.port())),
        "{again}"
    );
    let back = eventually(Duration::from_secs(30), || {
        block(async {
            let mut nfs = Nfs::mount(fx.port(), "/imz").await.ok()?;
            let root = nfs.root.clone();
            nfs.mkdir(&root, "after").await.ok()?;
            Some(nfs)
        })
    });
    let (mut nfs, took) = back.ok_or_else(|| anyhow::anyhow!("the gateway never came back"))?;
    eprintln!("serving again {took:?} after the disk had room");
    assert!(fx.gateway.proc.is_running(), "the gateway process is gone");
    assert_eq!(fx.gateway.proc.pid(), pid);

    assert_eq!(nfs.commit(&fh).await?, verf, "the verifier changed");
    assert!(nfs.read_all(&fh).await? == body, "unstable writes lost");
    assert!(nfs.read_path("stable.bin").await? == stable);
    assert!(nfs.read_path("cached.bin").await? == data::bytes(5, 3 << 20));
    let listed: Vec<String> = nfs
        .readdir(&nfs.root.clone(), 4096)
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for name in made.iter().map(String::as_str).chain(["after", "u.bin"]) {
        assert!(listed.iter().any(|n| n == name), "{name} is gone");
    }
    fx.gateway.ctl(&["sync", "--timeout", "30s"])?;
    await_origin_file(&fx, "u.bin", &body, Duration::from_secs(5))?;
    await_origin_file(&fx, "stable.bin", &stable, Duration::from_secs(5))?;
    for name in made.iter().map(String::as_str).chain(["after"]) {
        assert!(
            fx.origin_path(name).is_dir(),
            "{name} never reached the origin"
        );
    }
    Ok(())
}

/// The origin's disk filled to its last byte by another program: the
/// origin cannot journal changes made in its directory, and its metadata
/// store (redb) stops for good. It restarts itself once there is room
/// (same process, same port), and what changed meanwhile reaches the
/// gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_whose_disk_fills_to_the_last_byte_restarts_and_catches_up() -> Result {
    let dir = tempfile::tempdir()?;
    let disk = Tmpfs::mount(&dir.path().join("disk"), 600 << 20)?;
    let root = disk.0.join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("a.txt"), b"before")?;
    let token = dir.path().join("token");
    let mut origin = imz_integration::OriginProc::start(&root, &token)?;
    let gateway = imz_integration::GatewayProc::start(
        &origin.url,
        &token,
        &dir.path().join("cache"),
        "1GiB",
        QUICK,
    )?;
    let pid = origin.proc.pid();
    let mut nfs = Nfs::mount(gateway.port, "/imz").await?;
    assert_eq!(nfs.read_path("a.txt").await?, b"before");

    disk.fill("filler")?;
    // Directories take no data blocks on a tmpfs: these are made, but the
    // origin's journal cannot take them.
    for i in 0..20 {
        std::fs::create_dir(root.join(format!("during{i}")))?;
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(disk.0.join("filler"))?;
    let again = origin
        .proc
        .wait_for_line("imz origin listening on ", Duration::from_secs(30))?;
    assert_eq!(again, origin.url, "the origin moved");
    assert!(origin.proc.is_running());
    assert_eq!(origin.proc.pid(), pid);
    std::fs::create_dir(root.join("after"))?;

    let names = |nfs: &mut Nfs| {
        block(async {
            let root = nfs.root.clone();
            let listed = nfs.readdir(&root, 4096).await.ok()?;
            Some(listed.into_iter().map(|(n, _)| n).collect::<Vec<_>>())
        })
    };
    let seen = eventually(Duration::from_secs(30), || {
        let names = names(&mut nfs)?;
        let all = (0..20)
            .map(|i| format!("during{i}"))
            .chain(["after".to_owned(), "a.txt".to_owned()])
            .all(|want| names.contains(&want));
        all.then_some(())
    });
    assert!(
        seen.is_some(),
        "the gateway never saw what changed at the origin: {:?}",
        names(&mut nfs)
    );
    Ok(())
}

/// Free bytes on the filesystem holding `path`, as `df` counts them.
fn available_bytes(path: &Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("df of {}: {:?}", path.display(), out))
}

/// Offsets and sizes past the largest file (FSINFO's 128 GiB) are refused
/// with FBIG, where a WRITE near 2^64 used to stop the cache's writer for
/// good and one at 2^63 was acknowledged, then held every later change
/// back from the origin; and other requests a client should not send harm
/// nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_largest_file_are_refused_and_harm_nothing() -> Result {
    let fx = quick_fixture(|root| {
        data::write_file(&root.join("three.bin"), 3, 3 << 20)?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    // Names the origin refuses, looked up in a directory not yet listed
    // (so the lookup would go to the origin): no I/O error.
    expect_status(nfs.lookup(&root, "a/b").await, nfsstat3::NFS3ERR_INVAL)?;
    expect_status(nfs.lookup(&root, "a\0b").await, nfsstat3::NFS3ERR_INVAL)?;
    expect_status(nfs.lookup(&root, ".imz").await, nfsstat3::NFS3ERR_NOENT)?;
    let fh = nfs
        .create(&root, "f", CreateMode::Unchecked, &Attrs::default())
        .await?;
    for offset in [u64::MAX - 60_000, u64::MAX, 1 << 63, (128 << 30) - 50] {
        expect_status(
            nfs.write(&fh, offset, &[7; 100], Stable::FILE_SYNC).await,
            nfsstat3::NFS3ERR_FBIG,
        )?;
    }
    let huge = Attrs {
        size: Some(1 << 63),
        ..Attrs::default()
    };
    expect_status(nfs.setattr(&fh, &huge).await, nfsstat3::NFS3ERR_FBIG)?;
    // A WRITE of nothing past the end extends nothing.
    nfs.write(&fh, 0, b"abc", Stable::FILE_SYNC).await?;
    nfs.write(&fh, 1_000_000, &[], Stable::FILE_SYNC).await?;
    assert_eq!(nfs.getattr(&fh).await?.size, 3);
    // A READ of 4 GiB gets at most what FSINFO allows (1 MiB).
    let three = nfs.lookup_path("three.bin").await?;
    let (bytes, eof) = nfs.read(&three, 0, u32::MAX).await?;
    assert_eq!(bytes.len(), 1 << 20);
    assert!(!eof);
    assert!(bytes[..] == data::bytes(3, 3 << 20)[..1 << 20]);
    // Symlinks the origin would refuse are refused now.
    expect_status(
        nfs.symlink(&root, "abs", "/usr/bin").await,
        nfsstat3::NFS3ERR_ACCES,
    )?;
    expect_status(
        nfs.symlink(&root, "up", "../x").await,
        nfsstat3::NFS3ERR_ACCES,
    )?;
    expect_status(
        nfs.symlink(&root, "nul", "a\0b").await,
        nfsstat3::NFS3ERR_INVAL,
    )?;
    nfs.symlink(&root, "fine", "three.bin").await?;
    // Nor may a symlink move to where its target leads outside (found by
    // the write model: the move rewrote the pending create, which the
    // origin then refused, and the gateway held it for a person).
    let sub = nfs.mkdir(&root, "sub").await?;
    nfs.symlink(&sub, "up", "../three.bin").await?;
    expect_status(
        nfs.rename(&sub, "up", &root, "up").await,
        nfsstat3::NFS3ERR_ACCES,
    )?;
    let deeper = nfs.mkdir(&sub, "deeper").await?;
    nfs.rename(&sub, "up", &deeper, "up").await?;
    // Nothing above stopped writing or reintegration.
    let body = data::bytes(4, 200_000);
    nfs.put_file("after.bin", &body).await?;
    await_origin_file(&fx, "after.bin", &body, Duration::from_secs(20))?;
    await_origin_file(&fx, "f", b"abc", Duration::from_secs(20))?;
    fx.gateway.ctl(&["sync", "--timeout", "30s"])?;
    assert_eq!(
        std::fs::read_link(fx.origin_path("sub/deeper/up"))?,
        Path::new("../three.bin")
    );
    Ok(())
}

/// A file written with a hole stays sparse at the origin: one byte 256 MiB
/// into a new file used to take 256 MiB of the origin's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_written_through_the_gateway_stays_a_hole_at_the_origin() -> Result {
    use std::os::unix::fs::MetadataExt;
    const AT: u64 = 256 << 20;
    let fx = quick_fixture(|_| Ok(()))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    let fh = nfs
        .create(&root, "sparse", CreateMode::Unchecked, &Attrs::default())
        .await?;
    nfs.write(&fh, AT, b"x", Stable::FILE_SYNC).await?;
    let path = fx.origin_path("sparse");
    let arrived = eventually(Duration::from_secs(30), || {
        (std::fs::metadata(&path).ok()?.len() == AT + 1).then_some(())
    });
    assert!(arrived.is_some(), "the file never reached the origin");
    let meta = std::fs::metadata(&path)?;
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} bytes allocated for one byte",
        meta.blocks() * 512
    );
    let (tail, _) = nfs.read(&fh, AT - 3, 4).await?;
    assert_eq!(tail, b"\0\0\0x");
    let mut at_origin = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&path)?,
        &mut at_origin,
        AT - 3,
    )?;
    assert_eq!(&at_origin, b"\0\0\0x");
    Ok(())
}

/// A path under the origin's root from raw name bytes.
fn origin_raw(fx: &Fixture, parts: &[&[u8]]) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut path = fx.origin_path("");
    for part in parts {
        path.push(std::ffi::OsStr::from_bytes(part));
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_utf8_are_served_and_written_as_their_bytes() -> Result {
    use std::os::unix::ffi::OsStrExt;
    // A legacy Latin-1 tree, and a UTF-8 name in the range imz uses to
    // carry such bytes, which must stay a different name.
    let pua = "pua\u{F7E9}";
    let fx = quick_fixture(|root| {
        std::fs::write(
            root.join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt")),
            "latin1",
        )?;
        std::fs::write(root.join(pua), "private use")?;
        let dir = root.join(std::ffi::OsStr::from_bytes(b"d\xff"));
        std::fs::create_dir(&dir)?;
        std::fs::write(dir.join("f"), "inside")?;
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();

    let mut listed: Vec<Vec<u8>> = nfs
        .readdir_bytes(&root, 4096)
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    listed.sort();
    let mut want = vec![
        b"caf\xe9.txt".to_vec(),
        b"d\xff".to_vec(),
        pua.as_bytes().to_vec(),
    ];
    want.sort();
    assert_eq!(listed, want, "every name, as the disk has it");
    let latin = nfs.lookup(&root, b"caf\xe9.txt").await?;
    assert_eq!(nfs.read_all(&latin).await?, b"latin1");
    let private = nfs.lookup(&root, pua).await?;
    assert_eq!(nfs.read_all(&private).await?, b"private use");
    let dir = nfs.lookup(&root, b"d\xff").await?;
    let inside = nfs.lookup(&dir, "f").await?;
    assert_eq!(nfs.read_all(&inside).await?, b"inside");

    // Changes with such names reach the origin under the same bytes.
    let attrs = Attrs {
        size: Some(0),
        ..Default::default()
    };
    let naive = nfs
        .create(&root, b"na\xefve", CreateMode::Unchecked, &attrs)
        .await?;
    nfs.write_all(&naive, b"written").await?;
    nfs.commit(&naive).await?;
    let new_dir = nfs.mkdir(&root, b"n\xe8w").await?;
    nfs.rename(&root, b"na\xefve", &new_dir, b"r\xe9sum\xe9")
        .await?;
    let link = nfs.symlink(&root, b"l\xe9", b"caf\xe9.txt").await?;
    assert_eq!(nfs.readlink_bytes(&link).await?, b"caf\xe9.txt");
    // The length limit counts the name's bytes, however imz carries them.
    let longest = vec![0xe9u8; 255];
    let long = nfs
        .create(&root, &longest, CreateMode::Unchecked, &attrs)
        .await?;
    nfs.write_all(&long, b"long").await?;
    nfs.commit(&long).await?;
    expect_status(
        nfs.create(&root, &[0xe9u8; 256], CreateMode::Unchecked, &attrs)
            .await,
        nfsstat3::NFS3ERR_NAMETOOLONG,
    )?;

    let resume = origin_raw(&fx, &[b"n\xe8w", b"r\xe9sum\xe9"]);
    let long_path = origin_raw(&fx, &[&longest]);
    eventually(Duration::from_secs(20), || {
        (std::fs::read(&resume).ok()? == b"written" && std::fs::read(&long_path).ok()? == b"long")
            .then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("the new names never reached the origin"))?;
    assert_eq!(
        std::fs::read_link(origin_raw(&fx, &[b"l\xe9"]))?
            .as_os_str()
            .as_bytes(),
        b"caf\xe9.txt"
    );
    assert!(!origin_raw(&fx, &[b"na\xefve"]).exists());
    Ok(())
}

/// Bytes the process has written through write(2) and friends, sockets
/// included (`wchar` of /proc/PID/io).
fn bytes_written(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no wchar in /proc/{pid}/io"))
}

/// A VM image or a database made with `truncate -s`: the holes of a
/// sparse file written through imz do not cross the network to the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_file_reaches_the_origin_without_its_holes() -> Result {
    use std::os::unix::fs::MetadataExt;
    const SIZE: u64 = 8 << 30;
    let fx = Fixture::with_cache_size("1GiB", &["--reintegrate-delay", "30m"], |_| Ok(()))?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let root = nfs.root.clone();
    let fh = nfs
        .create(&root, "disk.img", CreateMode::Unchecked, &Attrs::default())
        .await?;
    nfs.setattr(
        &fh,
        &Attrs {
            size: Some(SIZE),
            ..Attrs::default()
        },
    )
    .await?;
    nfs.write(&fh, 0, b"head", Stable::FILE_SYNC).await?;
    nfs.write(&fh, 3 << 30, b"middle", Stable::FILE_SYNC)
        .await?;
    nfs.write(&fh, SIZE - 4, b"tail", Stable::FILE_SYNC).await?;

    let before = bytes_written(fx.gateway.proc.pid())?;
    fx.gateway.ctl(&["sync", "--timeout", "60s"])?;
    let sent = bytes_written(fx.gateway.proc.pid())? - before;
    assert!(
        sent < 64 << 20,
        "the gateway wrote {sent} bytes to ship a file of 14 bytes of data"
    );

    let path = fx.origin_path("disk.img");
    let meta = std::fs::metadata(&path)?;
    assert_eq!(meta.len(), SIZE);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(&path)?;
    let at = |offset: u64, len: usize| -> anyhow::Result<Vec<u8>> {
        let mut buf = vec![0xffu8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    };
    assert_eq!(at(0, 8)?, b"head\0\0\0\0");
    assert_eq!(at((3 << 30) - 2, 10)?, b"\0\0middle\0\0");
    assert_eq!(at(SIZE - 8, 8)?, b"\0\0\0\0tail");
    assert_eq!(at(1 << 30, 4096)?, vec![0u8; 4096]);
    Ok(())
}

/// A read-only bind mount of a directory, undone on drop.
/// `imz serve ARGS --listen 127.0.0.1:0`, and the NFS port it took.
fn spawn_serve(args: &[&str]) -> anyhow::Result<(imz_integration::Imz, u16)> {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    let (serve, addr) =
        imz_integration::Imz::spawn_full(&[], &[], &all, "imz gateway listening on ")?;
    let port: u16 = addr
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no port in {addr:?}"))?;
    Ok((serve, port))
}

/// A mount made for a test, unmounted when dropped.
struct TestMount(std::path::PathBuf);

fn run_mount(args: &[&str]) -> Result {
    let out = std::process::Command::new("mount").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl TestMount {
    fn new(source: &Path, at: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(at)?;
        let (src, dst) = (source.to_str().unwrap_or(""), at.to_str().unwrap_or(""));
        run_mount(&["--bind", src, dst])?;
        let mount = Self(at.to_path_buf());
        run_mount(&["-o", "remount,bind,ro", dst])?;
        Ok(mount)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A snapshot or a mounted image: `imz origin --read-only --state DIR`
/// serves a tree it cannot write, keeping its state elsewhere; gateways
/// serve it, and a client's change gets "read-only file system" at once,
/// with nothing logged. Without those options the origin refuses to start
/// and says how to serve such a tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_tree_is_served_read_only() -> Result {
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("source");
    data::write_file(&source.join("docs/a.bin"), 5, 300_000)?;
    let ro = dir.path().join("ro");
    let _mount = TestMount::new(&source, &ro)?;
    let token = dir.path().join("token");

    let plain = std::process::Command::new(imz_integration::imz_bin())
        .arg("origin")
        .arg("--root")
        .arg(&ro)
        .arg("--token-file")
        .arg(&token)
        .args(["--listen", "127.0.0.1:0"])
        .output()?;
    let refused = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success());
    assert!(
        refused.contains("Read-only file system") && refused.contains("--read-only --state DIR"),
        "no hint in: {refused}"
    );

    let state = dir.path().join("state");
    let origin = imz_integration::OriginProc::start_with_args(
        &ro,
        &token,
        &["--read-only", "--state", state.to_str().unwrap_or("")],
    )?;
    let mut gw = imz_integration::GatewayProc::start(
        &origin.url,
        &token,
        &dir.path().join("cache"),
        "1GiB",
        &[],
    )?;
    let mut nfs = Nfs::mount(gw.port, "/imz").await?;
    assert!(nfs.read_path("docs/a.bin").await? == data::bytes(5, 300_000));
    let docs = nfs.lookup_path("docs").await?;
    let file = nfs.lookup_path("docs/a.bin").await?;
    expect_status(
        nfs.put_file("docs/new.bin", b"x").await,
        nfsstat3::NFS3ERR_ROFS,
    )?;
    expect_status(nfs.mkdir(&docs, "sub").await, nfsstat3::NFS3ERR_ROFS)?;
    expect_status(nfs.remove(&docs, "a.bin").await, nfsstat3::NFS3ERR_ROFS)?;
    expect_status(
        nfs.write(&file, 0, b"changed", Stable::FILE_SYNC).await,
        nfsstat3::NFS3ERR_ROFS,
    )?;
    let status = gw.status()?;
    assert_eq!(status["log_records"], 0, "something was logged: {status}");
    assert_eq!(status["read_only"], true, "{status}");
    assert!(state.join("store.redb").exists());
    assert!(!source.join(".imz").exists());

    // The gateway remembers: started again while the origin is away, it
    // still refuses changes (taking them, it would hold them as conflicts
    // once the origin is back) and serves what it has.
    drop(nfs);
    drop(origin);
    gw.restart_graceful()?;
    let mut nfs = Nfs::mount(gw.port, "/imz").await?;
    assert!(nfs.read_path("docs/a.bin").await? == data::bytes(5, 300_000));
    expect_status(
        nfs.put_file("docs/offline.bin", b"x").await,
        nfsstat3::NFS3ERR_ROFS,
    )?;
    let status = gw.status()?;
    assert_eq!(status["connected"], false, "{status}");
    assert_eq!(status["read_only"], true, "{status}");
    assert_eq!(status["log_records"], 0, "something was logged: {status}");
    Ok(())
}

/// `imz serve --read-only --state DIR` over a read-only tree: the README's
/// one command for sharing a snapshot or a mounted image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_shares_a_read_only_tree() -> Result {
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("source");
    data::write_file(&source.join("img/disk.bin"), 6, 200_000)?;
    let ro = dir.path().join("ro");
    let _mount = TestMount::new(&source, &ro)?;
    let state = dir.path().join("state");
    let (ro_arg, state_arg) = (ro.to_str().unwrap_or(""), state.to_str().unwrap_or(""));
    let (serve, port) = spawn_serve(&[ro_arg, "--read-only", "--state", state_arg])?;
    let mut nfs = Nfs::mount(port, "/imz").await?;
    assert!(nfs.read_path("img/disk.bin").await? == data::bytes(6, 200_000));
    let img = nfs.lookup_path("img").await?;
    expect_status(
        nfs.put_file("img/new.bin", b"x").await,
        nfsstat3::NFS3ERR_ROFS,
    )?;
    expect_status(nfs.remove(&img, "disk.bin").await, nfsstat3::NFS3ERR_ROFS)?;
    assert!(
        state.join("store.redb").exists(),
        "origin state not in --state"
    );
    assert!(
        state.join("gateway-cache").is_dir(),
        "the cache did not default to STATE/gateway-cache"
    );
    drop(serve);
    Ok(())
}

/// A tree that spans filesystems: `imz serve DIR --state STATE` with STATE
/// on another filesystem than DIR, and a filesystem mounted inside DIR.
/// Uploads are staged in STATE and installed by a rename, and a client's
/// RENAME is a rename at the origin; neither can cross filesystems. New,
/// rewritten and moved files must still reach the origin, not end as
/// conflicts ("Invalid cross-device link" before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_a_tree_that_spans_filesystems() -> Result {
    let dir = tempfile::tempdir()?;
    let tree = dir.path().join("tree");
    data::write_file(&tree.join("top.txt"), 1, 1000)?;
    let _inner = Tmpfs::mount(&tree.join("mnt"), 2 << 30)?;
    let state = dir.path().join("state");
    let _state = Tmpfs::mount(&state, 2 << 30)?;
    let (tree_arg, state_arg) = (tree.to_str().unwrap_or(""), state.to_str().unwrap_or(""));
    let (serve, port) = spawn_serve(&[
        tree_arg,
        "--state",
        state_arg,
        "--reintegrate-delay",
        "100ms",
    ])?;
    let mut nfs = Nfs::mount(port, "/imz").await?;
    let files = [
        ("new.bin", data::bytes(2, 300_000)),
        ("mnt/inner.bin", data::bytes(3, 2_500_000)),
    ];
    for (path, content) in &files {
        nfs.put_file(path, content).await?;
    }
    // Rewritten: an update of a file the origin has, across filesystems too.
    let rewritten = [
        ("mnt/inner.bin", data::bytes(4, 700_000)),
        ("top.txt", data::bytes(5, 2000)),
    ];
    let on_origin = |rel: &str, want: &[u8], what: &str| -> Result {
        let path = tree.join(rel);
        eventually(Duration::from_secs(20), || {
            (std::fs::read(&path).ok()? == want).then_some(())
        })
        .map(|_| ())
        .ok_or_else(|| anyhow::anyhow!("{what} {rel} never reached the origin"))
    };
    for (path, content) in &files {
        on_origin(path, content, "new file")?;
    }
    for (path, content) in &rewritten {
        nfs.put_file(path, content).await?;
    }
    for (path, content) in &rewritten {
        on_origin(path, content, "rewritten file")?;
    }
    // Moves between the filesystems, as `mv` makes them: one into the
    // mount, one out of it over an existing file.
    let (root, mnt) = (nfs.root.clone(), nfs.lookup_path("mnt").await?);
    nfs.rename(&root, "new.bin", &mnt, "moved.bin").await?;
    nfs.rename(&mnt, "inner.bin", &root, "top.txt").await?;
    on_origin("mnt/moved.bin", &files[0].1, "moved file")?;
    on_origin("top.txt", &rewritten[0].1, "file moved over another")?;
    let gone = |rel: &str| {
        let path = tree.join(rel);
        eventually(Duration::from_secs(20), || (!path.exists()).then_some(()))
            .ok_or_else(|| anyhow::anyhow!("{rel} stayed at the origin after it moved"))
    };
    gone("new.bin")?;
    gone("mnt/inner.bin")?;
    // A sparse disk image, installed from the staging area and then moved
    // into the mount: copied, it must keep its hole.
    const HOLE: u64 = 48 << 20;
    let page = data::bytes(6, 4096);
    let img = nfs
        .create(&root, "disk.img", CreateMode::Unchecked, &Attrs::default())
        .await?;
    nfs.write(&img, HOLE, &page, Stable::FILE_SYNC).await?;
    let mut want = vec![0u8; HOLE as usize];
    want.extend_from_slice(&page);
    on_origin("disk.img", &want, "sparse file")?;
    nfs.rename(&root, "disk.img", &mnt, "disk.img").await?;
    on_origin("mnt/disk.img", &want, "moved sparse file")?;
    {
        use std::os::unix::fs::MetadataExt;
        let used = std::fs::metadata(tree.join("mnt/disk.img"))?.blocks() * 512;
        assert!(
            used < 1 << 20,
            "the moved image lost its hole: {used} bytes allocated"
        );
    }
    let names = |d: &Path| -> anyhow::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(d)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        v.sort();
        Ok(v)
    };
    assert_eq!(
        names(&tree.join("mnt"))?,
        ["disk.img", "moved.bin"],
        "stray names in mnt"
    );
    assert_eq!(
        names(&tree)?,
        ["mnt", "top.txt"],
        "stray names in the tree (conflict copies?)"
    );
    assert!(
        names(&state.join("uploads"))?.is_empty(),
        "installed uploads left staged"
    );
    drop(serve);
    Ok(())
}

/// A directory the gateway has not listed asks the origin about names it
/// does not hold. A name removed or renamed away here, not reintegrated
/// yet, is still at the origin: the origin's answer must not bring it
/// back (a removed file listed again, or one file at two names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_vacated_here_stays_vacant_until_the_origin_catches_up() -> Result {
    let fx = Fixture::with_cache_size("1GiB", &["--reintegrate-delay", "10m"], |root| {
        std::fs::create_dir(root.join("d"))?;
        for name in ["gone", "moved", "kept"] {
            std::fs::write(root.join("d").join(name), name)?;
        }
        Ok(())
    })?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let d = nfs.lookup_path("d").await?;
    nfs.remove(&d, "gone").await?;
    nfs.rename(&d, "moved", &d, "elsewhere").await?;
    expect_status(nfs.lookup(&d, "gone").await, nfsstat3::NFS3ERR_NOENT)?;
    expect_status(nfs.lookup(&d, "moved").await, nfsstat3::NFS3ERR_NOENT)?;
    assert_eq!(nfs.read_path("d/elsewhere").await?, b"moved");
    assert_eq!(nfs.read_path("d/kept").await?, b"kept");
    let mut names: Vec<String> = nfs
        .readdir(&d, 4096)
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    names.sort();
    assert_eq!(names, ["elsewhere", "kept"]);
    Ok(())
}
