//! Replication mode and pinning, end to end: real `imz origin` and
//! `imz gateway` processes, a real NFS client, and the origin cut off to
//! prove what the gateway holds.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use imz_integration::data;
use imz_integration::gateway::{GATEWAY_READY, eventually};
use imz_integration::nfs::{Nfs, NfsError, ctx, ftype3};
use imz_integration::{Fixture, GatewayProc, imz_bin};
use nfs3_client::nfs3_types::nfs3::{nfs_fh3, nfsstat3};
use serde_json::Value;

type Result = anyhow::Result<()>;

const REPLICATE: &[&str] = &["--mode", "replicate"];

/// Polls `imz status --json` until `check` holds; returns that status.
fn wait_status(
    gw: &GatewayProc,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    eventually(timeout, || {
        let s = gw.status().ok()?;
        let ok = check(&s);
        last = s.clone();
        ok.then_some(s)
    })
    .map(|(s, _)| s)
    .ok_or_else(|| anyhow::anyhow!("{what}: not within {timeout:?}; last status {last:#}"))
}

fn replica_state(s: &Value) -> &str {
    s["replica"]["state"].as_str().unwrap_or("")
}

/// Every file under `root` (relative path -> content), read from disk.
fn tree_on_disk(root: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            if rel.starts_with(".imz") {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                out.insert(rel, std::fs::read(&path)?);
            }
        }
    }
    Ok(out)
}

/// Every file the gateway serves under `dir` (relative path -> content),
/// walking with READDIRPLUS and reading each file in full.
async fn tree_over_nfs(
    nfs: &mut Nfs,
    dir: nfs_fh3,
    prefix: &str,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<()> {
    let entries = ctx(nfs.readdirplus(&dir, 8192, 65536).await, prefix)?;
    for (name, attr, fh) in entries {
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if rel.starts_with(".imz") {
            continue;
        }
        match attr.type_ {
            ftype3::NF3DIR => Box::pin(tree_over_nfs(nfs, fh, &rel, out)).await?,
            ftype3::NF3REG => {
                let content = ctx(nfs.read_all(&fh).await, &rel)?;
                out.insert(rel, content);
            }
            _ => {}
        }
    }
    Ok(())
}

fn populate_tree(root: &Path) -> anyhow::Result<()> {
    for i in 0..160u64 {
        let rel = format!("d{}/sub{}/f{i}.bin", i % 5, i % 3);
        data::write_file(&root.join(rel), i, (i * 7919 % 90_000) as usize)?;
    }
    // Large files span many chunks.
    data::write_file(&root.join("large/a.bin"), 1001, 9 << 20)?;
    data::write_file(&root.join("large/b.bin"), 1002, (5 << 20) + 12_345)?;
    data::write_file(&root.join("empty.bin"), 0, 0)?;
    std::fs::create_dir_all(root.join("empty-dir"))?;
    std::os::unix::fs::symlink("d0/sub0/f0.bin", root.join("link"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_survives_restart_and_serves_everything_with_the_origin_gone() -> Result {
    let mut fx = Fixture::with_cache_size("1GiB", REPLICATE, populate_tree)?;
    let want = tree_on_disk(&fx.root)?;
    let total: u64 = want.values().map(|c| c.len() as u64).sum();
    let s = wait_status(
        &fx.gateway,
        Duration::from_secs(60),
        "replica current",
        |s| replica_state(s) == "current",
    )?;
    assert_eq!(s["mode"], "replicate");
    assert_eq!(s["replica"]["files_total"], want.len() as u64);
    assert_eq!(s["replica"]["bytes_total"], total);
    assert_eq!(s["replica"]["bytes_done"], total);
    // Everything is held (the zeros that end a chunk take no room).
    assert!(
        s["cache_used"].as_u64() >= Some(total - total / 100),
        "{s:#}"
    );

    // A restart (kill -9) keeps the replica: nothing is fetched again.
    fx.gateway.restart()?;
    let s = wait_status(
        &fx.gateway,
        Duration::from_secs(30),
        "replica current again",
        |s| replica_state(s) == "current",
    )?;
    assert_eq!(s["fetched_bytes"], 0, "a current replica was fetched again");

    // Cut the origin off: every file is still there, byte for byte.
    fx.origin.proc.kill9();
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let mut got = BTreeMap::new();
    let root = nfs.root.clone();
    tree_over_nfs(&mut nfs, root.clone(), "", &mut got).await?;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the replica's file list differs from the origin's"
    );
    for (rel, content) in &want {
        assert!(got.get(rel) == Some(content), "{rel}: content differs");
    }
    let dir = nfs.lookup_path("empty-dir").await?;
    assert!(nfs.readdir(&dir, 4096).await?.is_empty());
    let link = nfs.lookup_path("link").await?;
    assert_eq!(nfs.readlink(&link).await?, "d0/sub0/f0.bin");
    // Directories are complete: a missing name is known not to exist.
    match nfs.lookup(&root, "no-such-name").await {
        Err(NfsError::Status(nfsstat3::NFS3ERR_NOENT)) => {}
        other => anyhow::bail!("lookup of a missing name offline: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_fetches_origin_changes_before_anyone_reads_them() -> Result {
    let mut fx = Fixture::with_cache_size("1GiB", REPLICATE, |root| {
        data::write_file(&root.join("docs/report.bin"), 1, 300_000)?;
        data::write_file(&root.join("docs/other.bin"), 2, 1000)?;
        Ok(())
    })?;
    wait_status(
        &fx.gateway,
        Duration::from_secs(30),
        "replica current",
        |s| replica_state(s) == "current",
    )?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let report = nfs.lookup_path("docs/report.bin").await?;

    // Changes at the origin: new content, a new file, a new directory.
    data::write_file(&fx.origin_path("docs/report.bin"), 11, 2_500_000)?;
    data::write_file(&fx.origin_path("docs/new.bin"), 12, 1_700_000)?;
    data::write_file(&fx.origin_path("fresh/inner/deep.bin"), 13, 40_000)?;

    // Wait until the journal has brought all three (GETATTR and LOOKUP in
    // a complete directory never ask the origin) and the gateway says it is
    // current with the origin's journal; no file data is read meanwhile.
    let expect = [
        ("docs/report.bin", 2_500_000u64),
        ("docs/new.bin", 1_700_000),
        ("fresh/inner/deep.bin", 40_000),
    ];
    let mut last = String::new();
    let seen = eventually(Duration::from_secs(20), || {
        for (rel, len) in expect {
            let fh = match futures_block(nfs.lookup_path(rel)) {
                Ok(fh) => fh,
                Err(e) => {
                    last = format!("{rel}: {e}");
                    return None;
                }
            };
            let size = futures_block(nfs.getattr(&fh)).ok()?.size;
            if size != len {
                last = format!("{rel}: size {size}");
                return None;
            }
        }
        let s = fx.gateway.status().ok()?;
        last = format!("{s}");
        (s["journal_lag"] == 0 && s["replica"]["pending"] == 0).then_some(())
    });
    anyhow::ensure!(seen.is_some(), "changes never applied: {last}");
    let reads_before = fx.gateway.status()?["reads"].as_u64().unwrap_or(0);
    assert_eq!(reads_before, 0, "something read file data");

    // The origin goes away right then: the new content is already here.
    fx.origin.proc.kill9();
    assert!(nfs.read_all(&report).await? == data::bytes(11, 2_500_000));
    assert!(nfs.read_path("docs/new.bin").await? == data::bytes(12, 1_700_000));
    assert!(nfs.read_path("fresh/inner/deep.bin").await? == data::bytes(13, 40_000));
    assert!(nfs.read_path("docs/other.bin").await? == data::bytes(2, 1000));
    Ok(())
}

/// A file that grows at the origin (a log appended to) is kept current by
/// fetching what it gained, not the whole file at each change; a file
/// written in place (a database, a disk image) by fetching the chunks that
/// changed; a file rewritten through and through is fetched whole. All end
/// with the origin's bytes, read with the origin gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_fetches_only_what_changed_in_a_file() -> Result {
    const MIB: usize = 1 << 20;
    // Zeros in the log: the gateway stores a chunk without its trailing
    // zeros, and must hash what the file holds.
    let mut log = data::bytes(21, 24 * MIB);
    log[MIB..3 * MIB].fill(0);
    let first = log.clone();
    let mut fx = Fixture::with_cache_size("1GiB", REPLICATE, move |root| {
        std::fs::create_dir_all(root.join("logs"))?;
        std::fs::write(root.join("logs/app.log"), &first)?;
        data::write_file(&root.join("logs/rewritten.log"), 22, 24 * MIB)?;
        data::write_file(&root.join("db/pages.db"), 23, 24 * MIB)?;
        data::write_file(&root.join("db/replaced.db"), 24, 24 * MIB)?;
        Ok(())
    })?;
    wait_status(
        &fx.gateway,
        Duration::from_secs(30),
        "replica current",
        |s| replica_state(s) == "current",
    )?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let fetched = |gw: &GatewayProc| -> anyhow::Result<u64> {
        Ok(gw.status()?["fetched_bytes"].as_u64().unwrap_or(0))
    };
    let before = fetched(&fx.gateway)?;
    // Waits until the replica holds `rel` at `size` and has fetched it.
    let caught_up = |nfs: &mut Nfs, gw: &GatewayProc, rel: &str, size: usize| {
        let mut last = String::new();
        let done = eventually(Duration::from_secs(20), || {
            let fh = futures_block(nfs.lookup_path(rel)).ok()?;
            let got = futures_block(nfs.getattr(&fh)).ok()?.size;
            let s = gw.status().ok()?;
            last = format!("size {got}; {s}");
            (got == size as u64 && s["journal_lag"] == 0 && s["replica"]["pending"] == 0)
                .then_some(())
        });
        anyhow::ensure!(done.is_some(), "{rel} never caught up: {last}");
        Ok(())
    };

    for round in 0..3u64 {
        use std::io::Write;
        let more = data::bytes(100 + round, MIB);
        std::fs::OpenOptions::new()
            .append(true)
            .open(fx.origin_path("logs/app.log"))?
            .write_all(&more)?;
        log.extend_from_slice(&more);
        caught_up(&mut nfs, &fx.gateway, "logs/app.log", log.len())?;
    }
    let grown = fetched(&fx.gateway)? - before;
    // Each append costs the MiB added and the partial chunk before it; the
    // whole file would be 25-27 MiB each time.
    assert!(
        grown <= 3 * 2 * MIB as u64,
        "three 1 MiB appends to a 24 MiB file fetched {grown} bytes"
    );

    // Changed at its start as it grew (written over, not truncated: a
    // truncation is a change of its own, which drops every chunk): the
    // first chunk and the new MiB.
    use std::os::unix::fs::FileExt;
    let mut rewritten = data::bytes(22, 24 * MIB);
    rewritten[10] ^= 0xff;
    rewritten.extend_from_slice(&data::bytes(200, MIB));
    std::fs::OpenOptions::new()
        .write(true)
        .open(fx.origin_path("logs/rewritten.log"))?
        .write_all_at(&rewritten, 0)?;
    let at = fetched(&fx.gateway)?;
    caught_up(&mut nfs, &fx.gateway, "logs/rewritten.log", rewritten.len())?;
    let cost = fetched(&fx.gateway)? - at;
    assert!(
        cost <= 3 * MIB as u64,
        "a 25 MiB file changed in its first byte and grown by 1 MiB fetched {cost} bytes"
    );

    // Written in place, size unchanged: pages at 4 KiB and in the middle.
    let mut pages = data::bytes(23, 24 * MIB);
    let db = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.origin_path("db/pages.db"))?;
    for (offset, seed) in [(4096, 31), (12 * MIB + 100, 32)] {
        let page = data::bytes(seed, 4096);
        db.write_all_at(&page, offset as u64)?;
        pages[offset..offset + 4096].copy_from_slice(&page);
    }
    drop(db);
    let at = fetched(&fx.gateway)?;
    let done = eventually(Duration::from_secs(20), || {
        let now = futures_block(nfs.read_path("db/pages.db")).ok()?;
        let s = fx.gateway.status().ok()?;
        (now == pages && s["journal_lag"] == 0 && s["replica"]["pending"] == 0).then_some(())
    });
    anyhow::ensure!(done.is_some(), "db/pages.db never caught up");
    // Two chunks, or a few more if the origin journaled the two writes
    // apart and a chunk fetched for the first version was fetched again.
    let cost = fetched(&fx.gateway)? - at;
    assert!(
        cost <= 4 * MIB as u64,
        "two 4 KiB pages written into a 24 MiB file fetched {cost} bytes"
    );

    // Every chunk different: fetched whole, and right.
    let replaced = data::bytes(25, 24 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(fx.origin_path("db/replaced.db"))?
        .write_all_at(&replaced, 0)?;
    let at = fetched(&fx.gateway)?;
    let done = eventually(Duration::from_secs(20), || {
        let s = fx.gateway.status().ok()?;
        let moved = fetched(&fx.gateway).ok()? - at >= replaced.len() as u64;
        (moved && s["journal_lag"] == 0 && s["replica"]["pending"] == 0).then_some(())
    });
    anyhow::ensure!(done.is_some(), "db/replaced.db was not fetched again");

    fx.origin.proc.kill9();
    assert!(nfs.read_path("logs/app.log").await? == log);
    assert!(nfs.read_path("logs/rewritten.log").await? == rewritten);
    assert!(nfs.read_path("db/pages.db").await? == pages);
    assert!(nfs.read_path("db/replaced.db").await? == replaced);
    Ok(())
}

/// A gateway started by hand, with its stderr in a file.
struct LoggedGateway {
    child: Child,
    stderr: std::path::PathBuf,
    port: u16,
}

impl Drop for LoggedGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_logged_gateway(
    fx: &Fixture,
    cache: &Path,
    args: &[&str],
) -> anyhow::Result<LoggedGateway> {
    use std::io::BufRead;
    let stderr = fx.dir.path().join("gateway2.err");
    let mut child = Command::new(imz_bin())
        .args(["gateway", "--origin", &fx.origin.url, "--token-file"])
        .arg(&fx.origin.token_file)
        .arg("--cache")
        .arg(cache)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut gw = LoggedGateway {
        child,
        stderr,
        port: 0,
    };
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(line) => {
                if let Some(rest) = line?.strip_prefix(GATEWAY_READY) {
                    break rest.trim().to_owned();
                }
            }
            None => anyhow::bail!("gateway exited before listening"),
        }
    };
    gw.port = addr.rsplit(':').next().unwrap_or("").parse()?;
    Ok(gw)
}

/// The bytes a replica reports fetched are the bytes that crossed the
/// network: its second pass, which waits for the storer, once counted again
/// every chunk still on its way to the cache (a 96 MiB tree "fetched"
/// 120-139 MiB, and the progress bar ran ahead of the transfer).
#[test]
fn a_replica_reports_the_bytes_it_fetched() -> Result {
    const MIB: usize = 1 << 20;
    let fx = Fixture::new(|root| {
        for i in 0..4u64 {
            data::write_file(&root.join(format!("f{i}.bin")), 60 + i, 24 * MIB)?;
        }
        Ok(())
    })?;
    let cache = fx.dir.path().join("replica");
    let gw = start_logged_gateway(&fx, &cache, &["--mode", "replicate"])?;
    let (line, _) = eventually(Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&gw.stderr).ok()?;
        log.lines()
            .find(|l| l.contains("replica complete"))
            .map(str::to_owned)
    })
    .ok_or_else(|| {
        let log = std::fs::read_to_string(&gw.stderr).unwrap_or_default();
        anyhow::anyhow!("the replica never completed; its log:\n{log}")
    })?;
    // A log that is not a terminal is plain text, fit for grep.
    assert!(
        !line.contains('\u{1b}'),
        "terminal colour codes in a log file: {line:?}"
    );
    let field = |name: &str| -> anyhow::Result<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {name}= in {line}"))
    };
    let (bytes, fetched) = (field("bytes")?, field("fetched")?);
    assert_eq!(bytes, 4 * 24 * MIB as u64);
    // Nothing changes at the origin: every byte crosses once. (Counting
    // chunks twice made it a quarter more; a filler asking for a chunk just
    // stored fetched it again, now and then.)
    assert_eq!(
        fetched, bytes,
        "a {bytes}-byte replica reports {fetched} bytes fetched: {line}"
    );
    let status = imz_integration::gateway::control(&imz_bin(), &cache, &["status", "--json"])?;
    let status = imz_integration::gateway::parse_status(&status)?;
    assert_eq!(status["fetched_bytes"], bytes, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_that_does_not_fit_says_so_and_stays_on_demand() -> Result {
    let fx = Fixture::new(|root| {
        for i in 0..3u64 {
            data::write_file(&root.join(format!("big{i}.bin")), 50 + i, 2_000_000)?;
        }
        Ok(())
    })?;
    let cache = fx.dir.path().join("small-cache");
    let gw = start_logged_gateway(
        &fx,
        &cache,
        &["--cache-size", "4MiB", "--mode", "replicate"],
    )?;
    let socket = cache.join("control.sock");
    let status = || -> Option<Value> {
        let out = Command::new(imz_bin())
            .args(["status", "--json", "--control"])
            .arg(&socket)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let (s, _) = eventually(Duration::from_secs(20), || {
        status().filter(|s| replica_state(s) == "refused")
    })
    .ok_or_else(|| anyhow::anyhow!("replication was not refused: {:?}", status()))?;
    assert_eq!(s["mode"], "on-demand");
    let message = s["replica"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("6000000") && message.contains(&(4u64 << 20).to_string()),
        "status message lacks the sizes: {message}"
    );
    // One clear log line with both numbers.
    let log = std::fs::read_to_string(&gw.stderr)?;
    let line = log
        .lines()
        .find(|l| l.contains("cannot replicate"))
        .ok_or_else(|| anyhow::anyhow!("no log line about the refusal in:\n{log}"))?;
    assert!(
        line.contains("6000000") && line.contains("4194304") && line.contains("on-demand"),
        "{line}"
    );
    // Nothing was fetched; reads fetch on demand.
    assert_eq!(s["cache_used"], 0, "{s:#}");
    let mut nfs = Nfs::mount(gw.port, "/imz").await?;
    assert!(nfs.read_path("big1.bin").await? == data::bytes(51, 2_000_000));
    // What was read is stored in the cache (the storer may trail the reply).
    let (s, _) = eventually(Duration::from_secs(5), || {
        status().filter(|s| s["cache_used"].as_u64() >= Some(2_000_000))
    })
    .ok_or_else(|| anyhow::anyhow!("read data never stored: {:?}", status()))?;
    assert_eq!(replica_state(&s), "refused");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_subtree_outlives_eviction_pressure_and_the_origin() -> Result {
    const KEEP: u64 = 4;
    const KEEP_LEN: usize = 1_000_000;
    const OTHER: u64 = 16;
    const OTHER_LEN: usize = 1_500_000;
    let mut fx = Fixture::with_cache_size("8MiB", &[], |root| {
        for i in 0..KEEP {
            data::write_file(&root.join(format!("keep/sub/k{i}.bin")), 200 + i, KEEP_LEN)?;
        }
        for i in 0..OTHER {
            data::write_file(&root.join(format!("other/o{i}.bin")), 300 + i, OTHER_LEN)?;
        }
        for i in 0..3u64 {
            data::write_file(&root.join(format!("huge/h{i}.bin")), 400 + i, 3_000_000)?;
        }
        Ok(())
    })?;
    let out = fx.gateway.ctl(&["pin", "keep", "--recursive"])?;
    assert!(out.contains("pinned keep"), "{out}");
    let s = fx.gateway.status()?;
    assert_eq!(s["pinned_bytes"], KEEP * KEEP_LEN as u64);
    assert!(
        s["cache_protected"].as_u64() >= Some(KEEP * KEEP_LEN as u64),
        "{s:#}"
    );

    // More than the cache could hold: refused, nothing changes.
    let err = fx
        .gateway
        .ctl(&["pin", "huge", "--recursive"])
        .err()
        .ok_or_else(|| anyhow::anyhow!("pinning 9 MB into an 8 MiB cache succeeded"))?;
    let msg = format!("{err:#}");
    assert!(
        msg.contains("cannot pin huge") && msg.contains("--cache-size"),
        "{msg}"
    );
    assert_eq!(fx.gateway.status()?["pinned_bytes"], KEEP * KEEP_LEN as u64);

    // Read three times the cache's size of other data.
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    for i in 0..OTHER {
        let got = nfs.read_path(&format!("other/o{i}.bin")).await?;
        assert!(got == data::bytes(300 + i, OTHER_LEN), "other/o{i}.bin");
    }
    let s = fx.gateway.status()?;
    assert!(
        s["cache_used"].as_u64() <= Some(8 << 20),
        "over capacity: {s:#}"
    );

    // Without the origin, the pinned files are all there; others are not.
    fx.origin.proc.kill9();
    for i in 0..KEEP {
        let got = nfs.read_path(&format!("keep/sub/k{i}.bin")).await?;
        assert!(got == data::bytes(200 + i, KEEP_LEN), "keep/sub/k{i}.bin");
    }
    let evicted = nfs.read_path("other/o0.bin").await;
    assert!(
        matches!(evicted, Err(ref e) if e.status() == Some(nfsstat3::NFS3ERR_IO)),
        "the least recently read file should have been evicted: {evicted:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_survive_restart_and_follow_the_origin() -> Result {
    let mut fx = Fixture::with_cache_size("64MiB", &[], |root| {
        data::write_file(&root.join("docs/a.bin"), 1, 700_000)?;
        data::write_file(&root.join("docs/deeper/b.bin"), 2, 300_000)?;
        data::write_file(&root.join("loose.bin"), 3, 5000)?;
        data::write_file(&root.join("unpinned.bin"), 4, 5000)?;
        Ok(())
    })?;
    let out = fx.gateway.ctl(&["pin", "docs", "--recursive"])?;
    assert!(out.contains("4 objects"), "{out}");
    fx.gateway.ctl(&["pin", "/loose.bin"])?;
    assert_eq!(fx.gateway.status()?["pinned_bytes"], 1_005_000);

    fx.gateway.restart()?;
    assert_eq!(
        wait_status(&fx.gateway, Duration::from_secs(10), "pins counted", |s| {
            s["pinned_bytes"].as_u64().is_some_and(|b| b > 0)
        })?["pinned_bytes"],
        1_005_000
    );

    // The origin changes a pinned file and adds one under the pinned
    // directory: both are fetched as the journal reports them.
    data::write_file(&fx.origin_path("docs/a.bin"), 21, 900_000)?;
    data::write_file(&fx.origin_path("docs/deeper/new.bin"), 22, 250_000)?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    let mut last = String::new();
    let applied = eventually(Duration::from_secs(20), || {
        let a = futures_block(nfs.lookup_path("docs/a.bin")).ok()?;
        let size = futures_block(nfs.getattr(&a)).ok()?.size;
        let new = futures_block(nfs.lookup_path("docs/deeper/new.bin"));
        let s = fx.gateway.status().ok()?;
        last = format!("a.bin size {size}, new.bin {:?}, status {s}", new.is_ok());
        (size == 900_000 && new.is_ok() && s["journal_lag"] == 0 && s["replica"]["pending"] == 0)
            .then_some(())
    });
    anyhow::ensure!(applied.is_some(), "changes never applied: {last}");
    wait_status(
        &fx.gateway,
        Duration::from_secs(10),
        "new file counted",
        |s| s["pinned_bytes"] == 900_000 + 300_000 + 250_000 + 5000,
    )?;

    fx.origin.proc.kill9();
    assert!(nfs.read_path("docs/a.bin").await? == data::bytes(21, 900_000));
    assert!(nfs.read_path("docs/deeper/b.bin").await? == data::bytes(2, 300_000));
    assert!(nfs.read_path("docs/deeper/new.bin").await? == data::bytes(22, 250_000));
    assert!(nfs.read_path("loose.bin").await? == data::bytes(3, 5000));
    assert!(nfs.read_path("unpinned.bin").await.is_err());

    // Unpinning needs no origin.
    let out = fx.gateway.ctl(&["unpin", "docs"])?;
    assert!(out.contains("5 objects"), "{out}");
    assert_eq!(fx.gateway.status()?["pinned_bytes"], 5000);
    Ok(())
}

/// Runs a future to completion from synchronous polling code inside a
/// multi-threaded runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_origin_may_not_read_is_left_out_and_the_rest_replicated() -> Result {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    data::write_file(&root.join("open.bin"), 5, 300_000)?;
    std::fs::write(root.join("locked"), "locked")?;
    std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o000))?;
    let origin = imz_integration::OriginProc::start_as_nobody(dir.path(), &root)?;
    let cache = dir.path().join("cache");
    let gw = GatewayProc::start(&origin.url, &origin.token_file, &cache, "1GiB", REPLICATE)?;
    // Current without it, instead of retrying it for ever.
    wait_status(&gw, Duration::from_secs(30), "replica current", |s| {
        replica_state(s) == "current"
    })?;
    let mut nfs = Nfs::mount(gw.port, "/imz").await?;
    assert!(nfs.read_path("open.bin").await? == data::bytes(5, 300_000));
    Ok(())
}

/// On demand, a pinned file written in place at the origin fetches only the
/// chunks that changed; a file merely cached drops its chunks instead (the
/// origin would read the whole file to hash it, for every gateway holding
/// some of it, at every change), and fetches back what is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_files_keep_unchanged_chunks_and_cached_ones_drop_them() -> Result {
    use std::os::unix::fs::FileExt;
    const MIB: usize = 1 << 20;
    let fx = Fixture::new(|root| {
        data::write_file(&root.join("db/pinned.db"), 41, 8 * MIB)?;
        data::write_file(&root.join("db/cached.db"), 42, 8 * MIB)?;
        Ok(())
    })?;
    fx.gateway.ctl(&["pin", "db/pinned.db"])?;
    let mut nfs = Nfs::mount(fx.port(), "/imz").await?;
    assert!(nfs.read_path("db/cached.db").await? == data::bytes(42, 8 * MIB));
    let fetched = || -> anyhow::Result<u64> {
        Ok(fx.gateway.status()?["fetched_bytes"].as_u64().unwrap_or(0))
    };
    // Writes a page in place at the origin; returns the file's new bytes.
    let write_page = |rel: &str, seed: u64, mut bytes: Vec<u8>| -> anyhow::Result<Vec<u8>> {
        let page = data::bytes(seed, 4096);
        std::fs::OpenOptions::new()
            .write(true)
            .open(fx.origin_path(rel))?
            .write_all_at(&page, 4 * MIB as u64)?;
        bytes[4 * MIB..4 * MIB + 4096].copy_from_slice(&page);
        Ok(bytes)
    };

    let at = fetched()?;
    let pinned = write_page("db/pinned.db", 43, data::bytes(41, 8 * MIB))?;
    let caught_up = eventually(Duration::from_secs(20), || {
        let s = fx.gateway.status().ok()?;
        let current = s["journal_lag"] == 0 && s["replica"]["pending"] == 0;
        (current && fetched().ok()? > at).then_some(())
    });
    anyhow::ensure!(
        caught_up.is_some(),
        "the pinned file's change was not fetched"
    );
    let cost = fetched()? - at;
    assert!(
        cost <= 2 * MIB as u64,
        "a page written into a pinned 8 MiB file fetched {cost} bytes"
    );
    assert!(nfs.read_path("db/pinned.db").await? == pinned);

    let at = fetched()?;
    let cached = write_page("db/cached.db", 44, data::bytes(42, 8 * MIB))?;
    let read = eventually(Duration::from_secs(20), || {
        futures_block(nfs.read_path("db/cached.db"))
            .ok()
            .filter(|b| *b == cached)
    });
    anyhow::ensure!(read.is_some(), "the cached file's change never showed");
    // Its chunks were dropped, not checked: read again, it came whole.
    let cost = fetched()? - at;
    assert!(
        cost >= 6 * MIB as u64,
        "a cached (not pinned) file kept chunks through a change: {cost} bytes fetched"
    );
    Ok(())
}
