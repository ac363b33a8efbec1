//! The write path through the real Linux kernel NFS client (QEMU guest):
//! create, write, append, truncate, rename, mkdir/rmdir, unlink, symlink,
//! chmod, `tar x` of a source tree into the mount and `tar c` back out,
//! randomized writes checked against a model, and everything reaching the
//! origin's directory; writes while the origin is down reaching it when it
//! returns; an FTP upload landing at the origin.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use imz_integration::Fixture;
use imz_integration::data;
use imz_integration::guest::{self, Ftp, GuestBuilder};

type Result<T = ()> = anyhow::Result<T>;

/// How long reintegration may take to bring guest writes to the origin.
const REACH_ORIGIN: Duration = Duration::from_secs(60);

/// A tarball of this workspace's Rust sources under `src/`: a real source
/// tree, made by the host's GNU tar in a format busybox reads.
fn source_tarball() -> Result<Vec<u8>> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let out = Command::new("tar")
        .current_dir(ws)
        .args([
            "--format=ustar",
            "--owner=root",
            "--group=root",
            "--transform=s,^,src/,",
            "-cf",
            "-",
            "cache/src",
            "origin/src",
            "integration/guest",
        ])
        .output()
        .context("running tar")?;
    anyhow::ensure!(
        out.status.success(),
        "tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// The origin's `w/` as the guest's WTREE lines describe a tree:
/// `f MD5  ./path`, `l TARGET  ./path`, `d -  ./path`.
fn origin_tree(dir: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![".".to_owned()];
    while let Some(rel) = stack.pop() {
        let p = dir.join(&rel);
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.file_type().is_symlink() {
            out.insert(format!("l {}  {rel}", std::fs::read_link(&p)?.display()));
        } else if meta.is_dir() {
            out.insert(format!("d -  {rel}"));
            for e in std::fs::read_dir(&p)? {
                stack.push(format!("{rel}/{}", e?.file_name().to_string_lossy()));
            }
        } else {
            out.insert(format!(
                "f {}  {rel}",
                guest::host_md5(&std::fs::read(&p)?)?
            ));
        }
    }
    Ok(out)
}

/// The tree the guest reported in `WTREE` lines.
fn reported_tree<'a>(lines: impl Iterator<Item = &'a String>) -> BTreeSet<String> {
    lines
        .filter_map(|l| l.strip_prefix("WTREE "))
        .map(str::to_owned)
        .collect()
}

/// Polls until the origin's `dir` is exactly `want`; `report` explains a
/// failure.
fn wait_origin_matches(want: &BTreeSet<String>, dir: &Path, report: &str) -> Result<Duration> {
    anyhow::ensure!(!want.is_empty(), "the guest reported no tree\n{report}");
    let start = Instant::now();
    loop {
        let got = origin_tree(dir).unwrap_or_default();
        if &got == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > REACH_ORIGIN {
            let missing: Vec<_> = want.difference(&got).take(20).collect();
            let extra: Vec<_> = got.difference(want).take(20).collect();
            anyhow::bail!(
                "the origin's {} differs from the guest's after {REACH_ORIGIN:?}\n\
                 missing at the origin: {missing:#?}\nonly at the origin: {extra:#?}\n{report}",
                dir.display(),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kernel_client_writes_tar_round_trip_and_reach_the_origin() -> Result {
    if guest::skip() {
        return Ok(());
    }
    let mut fx = Fixture::new(|root| {
        data::write_file(&root.join("ro.bin"), 1, 1000)?;
        Ok(())
    })?;
    let printed = guest::printed_mount_command(&mut fx.gateway)?;
    let run = GuestBuilder::new(&printed, &[])?
        .script(include_str!("../guest/scripts/write.sh"))
        .binary(guest::workspace_bin("imz-guest-fsx"))
        .file("/imz/src.tar", 0o644, source_tarball()?)
        .env("FSX_OPS", 300)
        .timeout(Duration::from_secs(240))
        .boot()?
        .finish()?
        .ok()?;
    let report = run.report();
    let check = |cond: bool, what: &str| -> Result {
        anyhow::ensure!(cond, "{what}\n{report}");
        Ok(())
    };
    check(run.get("append")? == "hello more ", "append")?;
    check(run.get("trunc_size")? == "150000", "truncate up")?;
    let head = run.get("trunc_head")?;
    check(
        head.split(' ').collect::<BTreeSet<_>>().len() == 1,
        "bytes kept by truncate",
    )?;
    check(
        run.get("trunc_tail_zero")? == "0",
        "truncate up must read zeros",
    )?;
    check(run.get("renamed")? == "c b 1", "renames")?;
    check(run.get("link")? == "sub/deeper/b b", "symlink")?;
    check(run.get("mode")? == "600", "chmod")?;
    check(
        run.get("tar_listing")? == "same",
        "tar c out of the mount: listing",
    )?;
    let bytes = run.get("tar_bytes")?;
    check(
        bytes.split(' ').collect::<BTreeSet<_>>().len() == 1,
        "tar round trip: bytes",
    )?;
    check(run.get("fsx_rc")? == "0", "imz-guest-fsx rw")?;
    let want = reported_tree(run.output.iter());
    let took = wait_origin_matches(&want, &fx.root.join("w"), &report)?;
    eprintln!(
        "tar x of {} entries: {} s; the origin matched the guest {:.1} s after the guest finished",
        run.get("tar_files")?,
        run.get("tar_x_secs")?,
        took.as_secs_f64()
    );
    Ok(())
}

#[test]
fn writes_while_the_origin_is_down_reach_it_when_it_returns() -> Result {
    if guest::skip() {
        return Ok(());
    }
    let mut fx = Fixture::new(|root| {
        std::fs::create_dir(root.join("off"))?;
        std::fs::write(root.join("off/seed.txt"), "seed\n")?;
        std::fs::write(root.join("off/old.txt"), "old\n")?;
        std::fs::write(root.join("off/doomed.txt"), "doomed\n")?;
        Ok(())
    })?;
    let printed = guest::printed_mount_command(&mut fx.gateway)?;
    let mut g = GuestBuilder::new(&printed, &[])?
        .script(include_str!("../guest/scripts/write_offline.sh"))
        .timeout(Duration::from_secs(180))
        .boot()?;
    g.wait_step("origin-down")?;
    fx.origin.proc.kill9();
    g.resume("")?;
    g.wait_step("origin-up")?;
    let want = reported_tree(g.output().iter());
    let readback = g.kv("readback");
    if let Err(e) = fx.origin.restart() {
        return Err(g.failure(&format!("origin restart failed: {e:#}")));
    }
    g.resume("")?;
    let run = g.finish()?.ok()?;
    let report = run.report();
    anyhow::ensure!(
        readback.as_deref() == Some("offline appended old"),
        "reading back offline writes in the guest\n{report}"
    );
    let took = wait_origin_matches(&want, &fx.root.join("off"), &report)?;
    eprintln!(
        "offline writes reached the origin {:.1} s after it returned",
        took.as_secs_f64()
    );
    Ok(())
}

#[test]
fn ftp_upload_into_the_mount_lands_at_the_origin() -> Result {
    if guest::skip() {
        return Ok(());
    }
    let mut fx = Fixture::new(|root| {
        let incoming = root.join("incoming");
        std::fs::create_dir(&incoming)?;
        // Anonymous FTP runs as the guest's ftp user (uid 21).
        std::fs::set_permissions(&incoming, std::fs::Permissions::from_mode(0o777))?;
        Ok(())
    })?;
    let printed = guest::printed_mount_command(&mut fx.gateway)?;
    let mut b = GuestBuilder::new(&printed, &[])?
        .script(include_str!("../guest/scripts/ftp.sh"))
        .timeout(Duration::from_secs(180))
        .forward(21);
    for p in 30000..=30003 {
        b = b.forward(p);
    }
    let mut g = b.boot()?;
    g.wait_step("serving")?;
    let upload = data::bytes(21, 1_000_003);
    let result = (|| -> Result<Vec<u8>> {
        let passive = (30000..=30003).map(|p| (p, g.host_port(p))).collect();
        let mut ftp = Ftp::connect_anonymous(g.host_port(21), passive)?;
        ftp.stor("/incoming/up.bin", &upload)?;
        let back = ftp.retr("/incoming/up.bin")?;
        ftp.quit()?;
        Ok(back)
    })();
    let back = match result {
        Ok(b) => b,
        Err(e) => return Err(g.failure(&format!("{e:#}"))),
    };
    g.resume("")?;
    let run = g.finish()?.ok()?;
    anyhow::ensure!(
        back == upload,
        "the upload read back over FTP differs\n{}",
        run.report()
    );
    let at_origin = fx.root.join("incoming/up.bin");
    let start = Instant::now();
    while std::fs::read(&at_origin).ok().as_deref() != Some(&upload[..]) {
        anyhow::ensure!(
            start.elapsed() < REACH_ORIGIN,
            "the FTP upload did not reach the origin within {REACH_ORIGIN:?}\n{}",
            run.report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "FTP upload at the origin after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
