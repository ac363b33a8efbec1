//! Gateway restarts during a mounted session, seen by the real Linux NFS
//! client in a QEMU guest: after SIGTERM + restart and after kill -9 +
//! restart, the guest's mount keeps working (no stale handles), including
//! for its working directory, an open file, and a read in flight.

use std::time::Duration;

use imz_integration::Fixture;
use imz_integration::data;
use imz_integration::guest::{self, GuestBuilder};

const LARGE_LEN: usize = 4 * 1024 * 1024 + 3;
const BG_PASSES: usize = 6;

#[test]
fn guest_mount_survives_graceful_and_kill9_gateway_restarts() -> anyhow::Result<()> {
    if guest::skip() {
        return Ok(());
    }
    let mut fx = Fixture::new(|root| {
        data::write_file(&root.join("keep/a.bin"), 1, 200_003)?;
        data::write_file(&root.join("keep/open.bin"), 2, 70_001)?;
        data::write_file(&root.join("keep/new-graceful.bin"), 3, 150_000)?;
        data::write_file(&root.join("keep/new-kill9.bin"), 4, 150_001)?;
        for i in 0..20 {
            data::write_file(&root.join(format!("keep/f{i:02}")), 10 + i, 100)?;
        }
        data::write_file(&root.join("large.bin"), 5, LARGE_LEN)?;
        Ok(())
    })?;
    let printed = guest::printed_mount_command(&mut fx.gateway)?;
    let mut g = GuestBuilder::new(&printed, &[])?
        .script(include_str!("../guest/scripts/restart.sh"))
        .env("BG_PASSES", BG_PASSES)
        .timeout(Duration::from_secs(240))
        .boot()?;
    g.wait_step("graceful")?;
    if let Err(e) = fx.gateway.restart_graceful() {
        return Err(g.failure(&format!("graceful gateway restart failed: {e:#}")));
    }
    g.resume("")?;
    g.wait_step("kill9")?;
    if let Err(e) = fx.gateway.restart() {
        return Err(g.failure(&format!("kill -9 gateway restart failed: {e:#}")));
    }
    g.resume("")?;
    let run = g.finish()?.ok()?;
    let report = run.report();
    let md5 = |seed, len| guest::host_md5(&data::bytes(seed, len));
    let a = md5(1, 200_003)?;
    anyhow::ensure!(run.get("before_a")? == a, "a.bin before\n{report}");
    for (phase, new_seed, new_len) in [("graceful", 3, 150_000), ("kill9", 4, 150_001)] {
        let get = |k: &str| run.get(&format!("{phase}_{k}"));
        anyhow::ensure!(get("a")? == a, "{phase}: re-read of a.bin\n{report}");
        anyhow::ensure!(
            get("new")? == md5(new_seed, new_len)?,
            "{phase}: a file first read after the restart\n{report}"
        );
        anyhow::ensure!(
            get("fd")? == md5(2, 70_001)?,
            "{phase}: the file held open across the restart\n{report}"
        );
        anyhow::ensure!(get("ls")? == "same", "{phase}: ls -l of the cwd\n{report}");
        anyhow::ensure!(get("cwd")? == "24", "{phase}: entries in the cwd\n{report}");
        anyhow::ensure!(get("stat")? == "200003", "{phase}: stat\n{report}");
        anyhow::ensure!(
            get("parent")?.split_whitespace().collect::<Vec<_>>() == ["keep", "large.bin"],
            "{phase}: ls ..\n{report}"
        );
        eprintln!(
            "{phase}: first read after the restart took {} s",
            get("first_secs")?
        );
    }
    anyhow::ensure!(
        run.get("bg_passes")? == BG_PASSES.to_string(),
        "background reader passes\n{report}"
    );
    anyhow::ensure!(
        run.get("bg_distinct")?.trim() == md5(5, LARGE_LEN)?,
        "background reader saw other bytes than large.bin's\n{report}"
    );
    Ok(())
}
