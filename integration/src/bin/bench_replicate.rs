//! Replication benchmark (not a test), issue 7's Benchmark: in one run,
//! replicating a tree of 10,000 files (2 GiB in all) with
//! `imz gateway --mode replicate` from an `imz origin` on loopback, versus
//! `rsync -a` of the same tree from an rsync daemon on loopback (Debian
//! `rsync`, started here with a generated config and stopped at the end).
//! Rounds interleave the two, alternating which goes first.
//!
//! What is timed:
//! - imz: from starting a gateway with an empty cache until `imz status`
//!   says the replica is current (manifest folded in, every file's content
//!   in the cache, made durable with an fsync);
//! - rsync: `rsync -a rsync://127.0.0.1:PORT/tree/ DEST/` into an empty
//!   directory; also shown with a `sync` after it (rsync itself does not
//!   fsync), for a durable-to-durable comparison.
//!
//! Before each run the page cache is dropped (if permitted: run as root),
//! so both read the source tree from disk; without that, both read it
//! from memory. Loopback only.
//!
//! ```sh
//! cargo build --release --bins
//! cargo run --release -p imz-integration --bin bench-replicate -- [--rounds N] [--dir DIR] [--warm]
//! ```
//!
//! `--compare OTHER_IMZ` also runs a gateway from another build of `imz`
//! (e.g. a branch built in a scratch worktree) in the same rounds, from the
//! same origin, and prints its figures too: a before/after in one run.
//!
//! The tree is made once under DIR (default `.imz-bench/replicate`, or
//! `$IMZ_BENCH_DIR/replicate`) and reused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use imz_integration::bench::{self, ChildGuard, median};
use imz_integration::data;

const FILES: u64 = 10_000;
const TOTAL: u64 = 2 << 30;
/// Of which this many are large; the rest are 1 KiB to ~400 KiB.
const LARGE_FILES: u64 = 100;
const DIRS: u64 = 100;
/// Bumped when the tree's layout changes (the marker file says which).
const LAYOUT: &str = "replicate-tree v1";
const CACHE_SIZE: &str = "3GiB";
const REPLICA_TIMEOUT: Duration = Duration::from_secs(600);

struct Options {
    rounds: usize,
    dir: PathBuf,
    warm: bool,
    compare: Option<PathBuf>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        rounds: 3,
        dir: std::env::var_os("IMZ_BENCH_DIR")
            .map(|d| PathBuf::from(d).join("replicate"))
            .unwrap_or_else(|| PathBuf::from(".imz-bench/replicate")),
        warm: false,
        compare: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                o.rounds = args
                    .next()
                    .context("--rounds N")?
                    .parse()
                    .context("--rounds N")?;
            }
            "--dir" => o.dir = PathBuf::from(args.next().context("--dir DIR")?),
            "--warm" => o.warm = true,
            "--compare" => {
                let bin = std::path::absolute(args.next().context("--compare IMZ_BINARY")?)?;
                ensure!(bin.exists(), "--compare {}: no such file", bin.display());
                o.compare = Some(bin);
            }
            "-h" | "--help" => {
                println!(
                    "bench-replicate [--rounds N (3)] [--dir DIR] [--warm] [--compare OTHER_IMZ_BINARY]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(o.rounds >= 1, "--rounds must be at least 1");
    Ok(o)
}

/// The `imz` binary: `$IMZ_BIN`, or the one built beside this benchmark.
fn imz_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("IMZ_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let imz = exe.with_file_name("imz");
    ensure!(
        imz.exists(),
        "{} is missing: cargo build --release --bins",
        imz.display()
    );
    Ok(imz)
}

/// Sizes of the tree's files, in order: deterministic, summing to TOTAL.
fn sizes() -> Vec<u64> {
    let small = FILES - LARGE_FILES;
    let mut out: Vec<u64> = (0..small)
        .map(|i| {
            // Roughly log-uniform from 1 KiB to ~400 KiB.
            let x = (i.wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0;
            (1024.0 * 400f64.powf(x)) as u64
        })
        .collect();
    let rest = TOTAL - out.iter().sum::<u64>();
    for i in 0..LARGE_FILES {
        out.push(rest / LARGE_FILES + u64::from(i < rest % LARGE_FILES));
    }
    out
}

fn rel_path(i: u64) -> String {
    format!("d{:03}/f{i:05}.bin", i % DIRS)
}

/// Makes the tree under `dir/tree` unless the marker says it is there.
fn make_tree(dir: &Path) -> anyhow::Result<PathBuf> {
    let tree = dir.join("tree");
    let marker = dir.join("tree.done");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == LAYOUT) {
        return Ok(tree);
    }
    eprintln!(
        "making the tree: {FILES} files, 2 GiB, in {}",
        tree.display()
    );
    let _ = std::fs::remove_dir_all(&tree);
    for (i, size) in sizes().into_iter().enumerate() {
        data::write_file(
            &tree.join(rel_path(i as u64)),
            7_000 + i as u64,
            size as usize,
        )?;
    }
    bench::sync();
    std::fs::write(&marker, LAYOUT)?;
    Ok(tree)
}

/// A child whose stdout is read until a line starts with `prefix`; returns
/// the rest of that line.
fn wait_line(child: &mut ChildGuard, prefix: &str) -> anyhow::Result<String> {
    let out = child.take_stdout().context("no stdout pipe")?;
    let mut lines = BufReader::new(out).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix(prefix) {
            // Keep draining stdout so the child never blocks on it.
            std::thread::spawn(move || for _ in lines {});
            return Ok(rest.trim().to_owned());
        }
    }
    bail!("the process exited before printing {prefix:?}")
}

/// One request on a gateway's control socket.
fn control(socket: &Path, request: &str) -> anyhow::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket)?;
    s.write_all(request.as_bytes())?;
    s.write_all(b"\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

/// Replicates with a fresh gateway; returns the time until current.
/// Replicates the tree with a fresh gateway; its log is kept in
/// `work/gateway-round-N.log`, so that a slow round can be looked into.
fn run_imz(
    imz: &Path,
    origin_url: &str,
    token: &Path,
    work: &Path,
    log_name: &str,
) -> anyhow::Result<Duration> {
    let cache = work.join("imz-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let log = std::fs::File::create(work.join(log_name))?;
    let socket = cache.join("control.sock");
    let start = Instant::now();
    let mut gw = ChildGuard::spawn(
        "imz gateway",
        Command::new(imz)
            .args(["gateway", "--origin", origin_url, "--token-file"])
            .arg(token)
            .arg("--cache")
            .arg(&cache)
            .args(["--cache-size", CACHE_SIZE, "--listen", "127.0.0.1:0"])
            .args(["--mode", "replicate"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log),
    )?;
    wait_line(&mut gw, "imz gateway listening on ")?;
    let deadline = start + REPLICA_TIMEOUT;
    loop {
        let status = control(&socket, r#"{"cmd":"status"}"#)?;
        let replica = &status["replica"];
        match replica["state"].as_str() {
            Some("current") => {
                let took = start.elapsed();
                ensure!(
                    replica["files_total"] == FILES && replica["bytes_total"] == TOTAL,
                    "the replica is not the whole tree: {replica}"
                );
                gw.stop(Duration::from_secs(20));
                // Untimed: leave the disk as it was for the next run.
                std::fs::remove_dir_all(&cache)?;
                bench::sync();
                return Ok(took);
            }
            Some("refused") => bail!("replication refused: {replica}"),
            _ => {}
        }
        ensure!(
            Instant::now() < deadline,
            "no replica after {REPLICA_TIMEOUT:?}: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `rsync -a` of the tree into an empty directory; returns the time, and
/// the time including a `sync` after it.
fn run_rsync(port: u16, work: &Path) -> anyhow::Result<(Duration, Duration)> {
    let dest = work.join("rsync-dest");
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest)?;
    let start = Instant::now();
    let status = Command::new("rsync")
        .arg("-a")
        .arg(format!("rsync://127.0.0.1:{port}/tree/"))
        .arg(format!("{}/", dest.display()))
        .status()
        .context("running rsync")?;
    let took = start.elapsed();
    ensure!(status.success(), "rsync failed: {status}");
    bench::sync();
    let durable = start.elapsed();
    let (files, bytes) = count(&dest)?;
    ensure!(
        files == FILES && bytes == TOTAL,
        "rsync copied {files} files, {bytes} bytes"
    );
    // Untimed: leave the disk as it was for the next run.
    std::fs::remove_dir_all(&dest)?;
    bench::sync();
    Ok((took, durable))
}

fn count(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                files += 1;
                bytes += e.metadata()?.len();
            }
        }
    }
    Ok((files, bytes))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    bench::cleanup_on_signal();
    let _hold = bench::PageReportingHold::start();
    let opts = options()?;
    let imz = imz_bin()?;
    bench::ensure_debian_packages(&[("/usr/bin/rsync", "rsync")])?;
    std::fs::create_dir_all(&opts.dir)?;
    let dir = std::path::absolute(&opts.dir)?;
    let tree = make_tree(&dir)?;
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;

    // The origin over the tree (its state goes in tree/.imz, which rsync
    // is told to skip).
    let token = work.join("token");
    let mut origin = ChildGuard::spawn(
        "imz origin",
        Command::new(&imz)
            .args(["origin", "--root"])
            .arg(&tree)
            .args(["--listen", "127.0.0.1:0", "--token-file"])
            .arg(&token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(work.join("origin.log"))?),
    )?;
    let origin_url = wait_line(&mut origin, "imz origin listening on ")?;

    // The rsync daemon over the same tree.
    let port = bench::free_port()?;
    let conf = work.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "address = 127.0.0.1\nport = {port}\nuse chroot = no\npid file = {work}/rsyncd.pid\n\
             log file = {work}/rsyncd.log\n\n[tree]\n  path = {tree}\n  read only = yes\n  \
             uid = 0\n  gid = 0\n  exclude = /.imz\n",
            work = work.display(),
            tree = tree.display()
        ),
    )?;
    let _ = std::fs::remove_file(work.join("rsyncd.pid"));
    let mut rsyncd = ChildGuard::spawn(
        "rsync daemon",
        Command::new("rsync")
            .args(["--daemon", "--no-detach", "--config"])
            .arg(&conf)
            .stdin(Stdio::null()),
    )?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    bench::wait_accepting(addr, Duration::from_secs(10), || rsyncd.is_running())?;

    let cold = !opts.warm && bench::drop_page_cache();
    let rsync_version = Command::new("rsync")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    println!(
        "bench-replicate: {FILES} files, {:.1} GiB; {} rounds; source {}; {rsync_version}; imz {}",
        TOTAL as f64 / (1u64 << 30) as f64,
        opts.rounds,
        if cold {
            "cold (page cache dropped before each run)"
        } else {
            "warm (in the page cache)"
        },
        imz.display()
    );
    if !cold {
        // Untimed: bring the tree into the page cache for both.
        count(&tree)?;
        run_rsync(port, &work)?;
    }

    let (mut imz_t, mut rsync_t, mut rsync_sync_t) = (Vec::new(), Vec::new(), Vec::new());
    let mut compare_t = Vec::new();
    // The runs of a round: each gateway (this build, then the one compared
    // with), then rsync; rotated each round, so none always goes first.
    let mut turns: Vec<Option<&Path>> = vec![Some(imz.as_path())];
    if let Some(other) = &opts.compare {
        turns.push(Some(other.as_path()));
    }
    turns.push(None);
    for round in 0..opts.rounds {
        bench::warm_memory();
        let mut order = turns.clone();
        order.rotate_left(round % turns.len());
        for turn in order {
            bench::sync();
            if cold {
                bench::drop_page_cache();
            }
            if let Some(bin) = turn {
                let compared = bin != imz.as_path();
                let log_name = match compared {
                    true => format!("gateway-compared-round-{}.log", round + 1),
                    false => format!("gateway-round-{}.log", round + 1),
                };
                let t = run_imz(bin, &origin_url, &token, &work, &log_name)?;
                println!(
                    "round {}: imz replicate{} {:7.2} s  {:6.0} MiB/s",
                    round + 1,
                    if compared { " (compared)" } else { "" },
                    secs(t),
                    TOTAL as f64 / (1 << 20) as f64 / secs(t)
                );
                match compared {
                    true => compare_t.push(secs(t)),
                    false => imz_t.push(secs(t)),
                }
            } else {
                let (t, durable) = run_rsync(port, &work)?;
                println!(
                    "round {}: rsync -a        {:7.2} s  {:6.0} MiB/s  ({:.2} s with sync)",
                    round + 1,
                    secs(t),
                    TOTAL as f64 / (1 << 20) as f64 / secs(t),
                    secs(durable)
                );
                rsync_t.push(secs(t));
                rsync_sync_t.push(secs(durable));
            }
        }
    }
    let (Some(i), Some(r), Some(rs)) = (median(&imz_t), median(&rsync_t), median(&rsync_sync_t))
    else {
        bail!("no samples");
    };
    println!();
    println!("median of {} rounds:", opts.rounds);
    println!("  imz --mode replicate   {i:7.2} s (durable)");
    println!("  rsync -a               {r:7.2} s   ({rs:.2} s with sync)");
    println!(
        "  ratio rsync/imz        {:.2}x  (>= 1.0: imz at least as fast; {:.2}x against rsync + sync)",
        r / i,
        rs / i
    );
    if let (Some(other), Some(c)) = (&opts.compare, median(&compare_t)) {
        println!("  compared: {} {c:7.2} s (durable)", other.display());
        println!(
            "  ratio rsync/compared   {:.2}x; this build is {:.2}x the compared one's speed",
            r / c,
            c / i
        );
    }
    rsyncd.stop(Duration::from_secs(5));
    origin.stop(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(work.join("rsync-dest"));
    let _ = std::fs::remove_dir_all(work.join("imz-cache"));
    Ok(())
}
