//! Disconnection the hard way (a link that silently drops packets) and
//! several gateways sharing one origin.

use std::time::{Duration, Instant};

use imz_integration::gateway::eventually;
use imz_integration::netns::NetNs;
use imz_integration::nfs::{Nfs, Stable, expect_status};
use imz_integration::{Fixture, GatewayProc, OriginProc, data};
use nfs3_client::nfs3_types::nfs3::nfsstat3;

type Result = anyhow::Result<()>;

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_survived_and_healed() -> Result {
    if !NetNs::available() {
        eprintln!("skipped: network namespaces need root and iproute2");
        return Ok(());
    }
    let ns = NetNs::create()?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    data::write_file(&root.join("cached.bin"), 1, 2_000_000)?;
    data::write_file(&root.join("uncached.bin"), 2, 10_000)?;
    let token = dir.path().join("token");
    let origin = OriginProc::start_wrapped(&ns.prefix(), &root, &token, &format!("{}:0", ns.addr))?;
    let gateway = GatewayProc::start(
        &origin.url,
        &token,
        &dir.path().join("cache"),
        "1GiB",
        &["--reintegrate-delay", "100ms"],
    )?;
    let mut nfs = Nfs::mount(gateway.port, "/imz").await?;
    let cached = nfs.lookup_path("cached.bin").await?;
    let uncached = nfs.lookup_path("uncached.bin").await?;
    assert!(nfs.read_all(&cached).await? == data::bytes(1, 2_000_000));

    ns.cut()?;
    // Packets vanish: nothing is refused, yet the client gets an answer.
    let start = Instant::now();
    expect_status(nfs.read(&uncached, 0, 100).await, nfsstat3::NFS3ERR_IO)?;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "uncached read took {took:?} to fail"
    );
    assert!(nfs.read_all(&cached).await? == data::bytes(1, 2_000_000));
    let start = Instant::now();
    let w = nfs
        .write(&cached, 0, b"patched offline", Stable::UNSTABLE)
        .await?;
    assert_eq!(w.committed, Stable::FILE_SYNC);
    nfs.put_file("offline.txt", b"made with the link down")
        .await?;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "writes waited for the origin"
    );

    ns.heal()?;
    let mut want = data::bytes(1, 2_000_000);
    want[..15].copy_from_slice(b"patched offline");
    let landed = eventually(Duration::from_secs(40), || {
        let a = std::fs::read(root.join("offline.txt")).ok()?;
        let b = std::fs::read(root.join("cached.bin")).ok()?;
        (a == b"made with the link down" && b == want).then_some(())
    });
    assert!(
        landed.is_some(),
        "offline writes never reached the origin after the link healed"
    );
    // And the gateway is connected again: the uncached file can be read.
    let back = eventually(Duration::from_secs(20), || {
        block(nfs.read(&uncached, 0, 20_000)).ok()
    });
    let ((bytes, _), _) = back.ok_or_else(|| anyhow::anyhow!("gateway did not reconnect"))?;
    assert!(bytes == data::bytes(2, 10_000));
    drop(gateway);
    drop(origin);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_sees_writes_within_two_seconds() -> Result {
    // Default settings, as users run them.
    let fx = Fixture::new(|root| {
        std::fs::write(root.join("shared.txt"), "v1")?;
        Ok(())
    })?;
    let other = GatewayProc::start(
        &fx.origin.url,
        &fx.origin.token_file,
        &fx.dir.path().join("cache2"),
        "1GiB",
        &[],
    )?;
    let mut one = Nfs::mount(fx.port(), "/imz").await?;
    let mut two = Nfs::mount(other.port, "/imz").await?;
    assert_eq!(two.read_path("shared.txt").await?, b"v1");
    let shared_two = two.lookup_path("shared.txt").await?;

    for round in 0..3u64 {
        let body = format!("round {round} from gateway one");
        let start = Instant::now();
        one.put_file("shared.txt", body.as_bytes()).await?;
        one.put_file(&format!("new-{round}.txt"), body.as_bytes())
            .await?;
        let seen = eventually(Duration::from_secs(10), || {
            let a = block(two.read_all(&shared_two)).ok()?;
            let b = block(two.read_path(&format!("new-{round}.txt"))).ok()?;
            (a == body.as_bytes() && b == body.as_bytes()).then_some(())
        });
        assert!(
            seen.is_some(),
            "round {round}: gateway two never saw the writes"
        );
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "round {round}: took {took:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_writing_one_file_while_partitioned_keep_both_versions() -> Result {
    let mut fx = Fixture::with_cache_size("1GiB", &["--reintegrate-delay", "100ms"], |root| {
        std::fs::write(root.join("plan.txt"), "v1")?;
        Ok(())
    })?;
    let other = GatewayProc::start(
        &fx.origin.url,
        &fx.origin.token_file,
        &fx.dir.path().join("cache2"),
        "1GiB",
        &["--reintegrate-delay", "100ms"],
    )?;
    let mut one = Nfs::mount(fx.port(), "/imz").await?;
    let mut two = Nfs::mount(other.port, "/imz").await?;
    let f1 = one.lookup_path("plan.txt").await?;
    let f2 = two.lookup_path("plan.txt").await?;
    one.read_all(&f1).await?;
    two.read_all(&f2).await?;

    fx.origin.proc.kill9();
    one.write(&f1, 0, b"ONE", Stable::FILE_SYNC).await?;
    two.write(&f2, 0, b"TWO", Stable::FILE_SYNC).await?;
    fx.origin.restart()?;

    // One version keeps the name, the other lands beside it: both at the
    // origin and, once the journal has carried them, through both gateways.
    let settled = eventually(Duration::from_secs(30), || {
        let names: Vec<String> = std::fs::read_dir(&fx.root)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("plan.txt"))
            .collect();
        let mut contents: Vec<Vec<u8>> = names
            .iter()
            .filter_map(|n| std::fs::read(fx.root.join(n)).ok())
            .collect();
        contents.sort();
        (names.len() == 2 && contents == vec![b"ONE".to_vec(), b"TWO".to_vec()]).then_some(names)
    });
    let (names, _) =
        settled.ok_or_else(|| anyhow::anyhow!("the origin does not hold both versions"))?;
    let copy = names
        .iter()
        .find(|n| n.contains(".conflict-"))
        .ok_or_else(|| anyhow::anyhow!("no conflict copy among {names:?}"))?
        .clone();
    for (who, nfs) in [("one", &mut one), ("two", &mut two)] {
        let seen = eventually(Duration::from_secs(10), || {
            let a = block(nfs.read_path("plan.txt")).ok()?;
            let b = block(nfs.read_path(&copy)).ok()?;
            let mut v = vec![a, b];
            v.sort();
            (v == vec![b"ONE".to_vec(), b"TWO".to_vec()]).then_some(())
        });
        assert!(seen.is_some(), "gateway {who} does not show both versions");
    }
    Ok(())
}
