//! The read path through the real Linux kernel NFS client (a QEMU guest,
//! see `imz_integration::guest`): a real `imz origin`, a real `imz gateway`,
//! and the guest mounting it with the command the gateway prints.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use imz_integration::Fixture;
use imz_integration::data;
use imz_integration::guest::{self, GuestBuilder};

type Result = anyhow::Result<()>;

const BIG_DIR_ENTRIES: usize = 10_000;
const FSX_SEED: u64 = 0xF5C;
const FSX_LEN: usize = 2 * 1024 * 1024 + 17;
const FSX_OPS: u64 = 800;
const LARGE_LEN: usize = 8 * 1024 * 1024 + 5;

/// The tree the guest reads: odd sizes around page and chunk boundaries,
/// nested directories, an empty one, odd names, modes, and symlinks of
/// every kind (to a file, to a directory, absolute, dangling).
fn populate(root: &Path) -> anyhow::Result<()> {
    let big = root.join("big");
    std::fs::create_dir(&big)?;
    for i in 0..BIG_DIR_ENTRIES {
        std::fs::write(big.join(format!("entry-{i:05}")), i.to_string())?;
    }
    let t = root.join("tree");
    let sizes = [
        0usize, 1, 4095, 4096, 4097, 65_536, 131_073, 1_048_579, 200_000, 12_345,
    ];
    for (i, len) in sizes.iter().enumerate() {
        data::write_file(&t.join(format!("d0/f{i}.bin")), 100 + i as u64, *len)?;
    }
    data::write_file(&t.join("d1/a.txt"), 200, 77)?;
    data::write_file(&t.join("d1/sub/b.bin"), 201, 300_001)?;
    data::write_file(&t.join("d1/sub/deeper/c.bin"), 202, 3_333)?;
    for i in 0..25u64 {
        data::write_file(
            &t.join(format!("d2/x{i:02}.dat")),
            300 + i,
            (i as usize) * 997,
        )?;
    }
    std::fs::create_dir_all(t.join("d3/empty-dir"))?;
    data::write_file(&t.join("with space.txt"), 400, 1234)?;
    data::write_file(&t.join("ünïcødé-名前.txt"), 401, 4321)?;
    let script = t.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n")?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let private = t.join("private.bin");
    data::write_file(&private, 402, 999)?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::symlink("d0/f3.bin", t.join("link-to-file"))?;
    std::os::unix::fs::symlink("../d0", t.join("d1/up"))?;
    std::os::unix::fs::symlink("/etc/hostname", t.join("abs-link"))?;
    std::os::unix::fs::symlink("does-not-exist", t.join("dangling"))?;
    data::write_file(&root.join("fsx.bin"), FSX_SEED, FSX_LEN)?;
    data::write_file(&root.join("large.bin"), 77, LARGE_LEN)?;
    Ok(())
}

/// Type letter as the guest script prints it (`FIND` lines).
fn kind(meta: &std::fs::Metadata) -> char {
    let t = meta.file_type();
    if t.is_symlink() {
        'l'
    } else if t.is_dir() {
        'd'
    } else if t.is_file() {
        'f'
    } else {
        'o'
    }
}

/// Every path under `root/rel` (rel included) with its lstat metadata.
fn host_walk(root: &Path, rel: &str) -> anyhow::Result<BTreeMap<String, std::fs::Metadata>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![rel.to_owned()];
    while let Some(r) = stack.pop() {
        let meta = std::fs::symlink_metadata(root.join(&r))?;
        if meta.is_dir() {
            for e in std::fs::read_dir(root.join(&r))? {
                stack.push(format!("{r}/{}", e?.file_name().to_string_lossy()));
            }
        }
        out.insert(r, meta);
    }
    Ok(out)
}

#[test]
fn kernel_client_lists_reads_copies_and_follows_links() -> Result {
    if guest::skip() {
        return Ok(());
    }
    let mut fx = Fixture::new(populate)?;
    let printed = guest::printed_mount_command(&mut fx.gateway)?;
    let run = GuestBuilder::new(&printed, &[])?
        .script(include_str!("../guest/scripts/read.sh"))
        .binary(guest::workspace_bin("imz-guest-fsx"))
        .env("FSX_SEED", FSX_SEED)
        .env("FSX_LEN", FSX_LEN)
        .env("FSX_OPS", FSX_OPS)
        .timeout(Duration::from_secs(240))
        .boot()?
        .finish()?
        .ok()?;
    let report = run.report();
    let check = |cond: bool, what: &str| -> Result {
        anyhow::ensure!(cond, "{what}\n{report}");
        Ok(())
    };

    // The 10,000-entry directory: complete, no duplicates, right sizes.
    let names: String = (0..BIG_DIR_ENTRIES)
        .map(|i| format!("entry-{i:05}\n"))
        .collect();
    check(
        run.get("big_ls_lines")? == (BIG_DIR_ENTRIES + 1).to_string(),
        "ls -l big: wrong line count",
    )?;
    check(
        run.get("big_names_md5")? == guest::host_md5(names.as_bytes())?,
        "ls -l big: names differ from the origin's",
    )?;
    check(run.get("big_dups")? == "0", "ls -l big: duplicates")?;
    check(
        run.get("big_bad_lines")? == "0",
        "ls -l big: bad sizes/types",
    )?;
    check(
        run.get("big_raw_count")? == BIG_DIR_ENTRIES.to_string(),
        "raw readdir after a cache drop: wrong count",
    )?;
    check(run.get("big_raw_dups")? == "0", "raw readdir: duplicates")?;

    // Byte-exact reads, cold and again after dropping the client's cache.
    let want = guest::host_md5_tree(&fx.root.join("tree"))?;
    let got: BTreeMap<String, String> = run
        .lines_with("MD5 ")
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, name)| (name.to_owned(), sum.to_owned()))
        .collect();
    if got != want {
        let diff: Vec<_> = want
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .chain(got.keys().filter(|k| !want.contains_key(*k)).cloned())
            .collect();
        anyhow::bail!("md5 of files differs for {diff:?}\n{report}");
    }
    let again = run.get("md5_again_same")?;
    check(
        again.split(' ').collect::<BTreeSet<_>>().len() == 1,
        "md5 after drop_caches differs from the first read",
    )?;

    // find: every path with its type; stat: size, mtime, mode, type.
    let host = host_walk(&fx.root, "tree")?;
    let want_find: BTreeSet<String> = host
        .iter()
        .map(|(p, m)| format!("{} {p}", kind(m)))
        .collect();
    let got_find: BTreeSet<String> = run.lines_with("FIND ").map(str::to_owned).collect();
    check(got_find == want_find, "find: paths or types differ")?;
    check(
        run.get("find_count")? == host.len().to_string(),
        "find | wc -l",
    )?;
    let mut stats = 0;
    for line in run.lines_with("STAT ") {
        let mut f = line.splitn(5, ' ');
        let (Some(size), Some(mtime), Some(perm), Some(raw), Some(name)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            anyhow::bail!("bad STAT line {line:?}\n{report}");
        };
        let meta = host
            .get(name)
            .with_context(|| format!("guest stat of unknown {name}\n{report}"))?;
        let mode = u32::from_str_radix(raw, 16)?;
        check(
            mode & 0o170000 == meta.mode() & 0o170000,
            &format!("{name}: file type {mode:o} vs {:o}", meta.mode()),
        )?;
        check(
            u32::from_str_radix(perm, 8)? == meta.mode() & 0o7777,
            &format!("{name}: permissions {perm} vs {:o}", meta.mode() & 0o7777),
        )?;
        check(
            mtime == meta.mtime().to_string(),
            &format!("{name}: mtime {mtime} vs {}", meta.mtime()),
        )?;
        if meta.is_file() {
            check(
                size == meta.len().to_string(),
                &format!("{name}: size {size} vs {}", meta.len()),
            )?;
        }
        stats += 1;
    }
    check(
        stats
            == host
                .values()
                .filter(|m| !m.file_type().is_symlink())
                .count(),
        "stat: not every file and directory",
    )?;

    // Symlinks.
    let want_links: BTreeSet<String> = host
        .iter()
        .filter(|(_, m)| m.file_type().is_symlink())
        .map(|(p, _)| -> anyhow::Result<String> {
            Ok(format!(
                "{p} -> {}",
                std::fs::read_link(fx.root.join(p))?.display()
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let got_links: BTreeSet<String> = run.lines_with("LINK ").map(str::to_owned).collect();
    check(got_links == want_links, "symlink targets differ")?;
    check(
        Some(run.get("link_file_md5")?) == want.get("./d0/f3.bin").map(String::as_str),
        "read through a symlink",
    )?;
    let f0: BTreeSet<&str> = run.get("link_dir_list")?.split_whitespace().collect();
    check(
        f0 == (0..10)
            .map(|i| format!("f{i}.bin"))
            .collect::<BTreeSet<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
        "listing through a directory symlink",
    )?;
    check(
        run.get("link_abs_target")? == "/etc/hostname",
        "absolute symlink target",
    )?;
    check(
        run.get("dangling_read")?.contains("No such file"),
        "reading a dangling symlink must fail with ENOENT",
    )?;
    check(
        run.get("lstat_type")? == "symbolic link",
        "stat of a symlink",
    )?;

    // cp -a / cp -r / tar out of the mount.
    let copy = run.get("copy_same")?;
    check(
        copy.split(' ').collect::<BTreeSet<_>>().len() == 1,
        "cp -a copy differs from the mount",
    )?;
    check(
        run.get("copy_link")? == "d0/f3.bin",
        "cp -a kept the symlink",
    )?;
    check(
        run.get("copy_count")? == host.len().to_string(),
        "cp -a copied every entry",
    )?;
    check(
        run.get("copy_r_same")? == run.get("copy_r_want")?,
        "cp -r copy differs",
    )?;
    check(
        run.get("tar_entries")? == host.len().to_string(),
        "tar c: entry count",
    )?;

    // Randomized reads and a large sequential read.
    check(run.get("fsx_rc")? == "0", "imz-guest-fsx read failed")?;
    check(
        run.get("big_file_md5")? == guest::host_md5(&data::bytes(77, LARGE_LEN))?,
        "large.bin md5",
    )?;
    eprintln!(
        "timings (s): ls -l 10k {}, md5 tree cold {}, cp -a {}, fsx {} ops {}, {} MiB cold read {}",
        run.get("big_ls_secs")?,
        run.get("md5_cold_secs")?,
        run.get("cp_secs")?,
        FSX_OPS,
        run.get("fsx_secs")?,
        LARGE_LEN >> 20,
        run.get("big_file_secs")?,
    );
    Ok(())
}
