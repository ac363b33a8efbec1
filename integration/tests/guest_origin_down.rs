//! The origin goes away during a mounted session, seen by the real Linux
//! NFS client in a QEMU guest: cached files stay readable, uncached reads
//! fail with EIO within seconds (the guest never hangs), and once the
//! origin is back the same mount reads everything.

use std::time::Duration;

use imz_integration::Fixture;
use imz_integration::data;
use imz_integration::guest::{self, GuestBuilder};

/// "Within a few seconds" on a quiet machine it is well under one; TCG on a
/// shared 2-core machine gets a generous margin.
const FAIL_FAST_SECS: f64 = 10.0;

#[test]
fn origin_down_cached_reads_go_on_uncached_fail_fast_with_eio() -> anyhow::Result<()> {
    if guest::skip() {
        return Ok(());
    }
    let mut fx = Fixture::new(|root| {
        data::write_file(&root.join("cached.bin"), 1, 1_500_000)?;
        data::write_file(&root.join("uncached.bin"), 2, 600_000)?;
        for i in 0..30 {
            data::write_file(
                &root.join(format!("listed/f{i:02}")),
                10 + i,
                10 * i as usize,
            )?;
        }
        data::write_file(&root.join("unlisted/inside.txt"), 3, 10)?;
        Ok(())
    })?;
    let printed = guest::printed_mount_command(&mut fx.gateway)?;
    let mut g = GuestBuilder::new(&printed, &[])?
        .script(include_str!("../guest/scripts/origin_down.sh"))
        .binary(guest::workspace_bin("imz-guest-fsx"))
        .timeout(Duration::from_secs(240))
        .boot()?;
    g.wait_step("origin-down")?;
    fx.origin.proc.kill9();
    g.resume("")?;
    g.wait_step("origin-up")?;
    if let Err(e) = fx.origin.restart() {
        return Err(g.failure(&format!("origin restart failed: {e:#}")));
    }
    g.resume("")?;
    let run = g.finish()?.ok()?;
    let report = run.report();
    let secs = |k: &str| -> anyhow::Result<f64> { Ok(run.get(k)?.parse()?) };
    let cached = guest::host_md5(&data::bytes(1, 1_500_000))?;
    let uncached = guest::host_md5(&data::bytes(2, 600_000))?;

    anyhow::ensure!(
        run.get("before_cached")? == cached,
        "cached.bin before\n{report}"
    );
    anyhow::ensure!(
        run.get("during_cached")? == cached,
        "a cached file must stay readable without the origin\n{report}"
    );
    anyhow::ensure!(
        run.get("during_listed")? == "same",
        "listing a cached dir\n{report}"
    );
    anyhow::ensure!(
        run.get("during_stat")? == "600000",
        "attributes of a listed file are cached\n{report}"
    );
    let err = run.get("during_uncached")?;
    anyhow::ensure!(
        err.contains("Input/output error") || err.contains("I/O error"),
        "reading uncached data without the origin must fail with EIO, got {err:?}\n{report}"
    );
    anyhow::ensure!(
        secs("during_uncached_secs")? < FAIL_FAST_SECS,
        "the EIO must come fast\n{report}"
    );
    let unlisted = run.get("during_unlisted")?;
    anyhow::ensure!(
        unlisted.starts_with("exit 1 ")
            && unlisted.contains("Input/output error")
            && secs("during_unlisted_secs")? < FAIL_FAST_SECS,
        "listing an uncached directory without the origin must fail fast, got {unlisted:?}\n{report}"
    );
    anyhow::ensure!(
        run.get("after_uncached")? == format!("yes {uncached}"),
        "after the origin is back, the uncached file must read\n{report}"
    );
    anyhow::ensure!(
        run.get("after_unlisted")?.trim() == "inside.txt",
        "after the origin is back, the unlisted dir must list\n{report}"
    );
    anyhow::ensure!(
        run.get("after_cached")? == cached,
        "cached.bin after\n{report}"
    );
    eprintln!(
        "origin down: cached read {} s, uncached EIO after {} s ({err}), unlisted dir {} s ({unlisted}); back after {} s",
        run.get("during_cached_secs")?,
        run.get("during_uncached_secs")?,
        run.get("during_unlisted_secs")?,
        run.get("after_secs")?
    );
    Ok(())
}
