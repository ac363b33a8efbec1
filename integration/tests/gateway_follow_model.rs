//! A randomized test of how gateways follow changes other programs make
//! directly in the origin's tree: the tree churns (creates, writes, appends,
//! renames over files and across directories, removals, hard links,
//! chmods, mtimes set, symlinks, directories made, moved and removed; see
//! `imz_integration::churn`) while
//! an NFS client walks and reads it through an on-demand gateway, so that
//! the gateway holds parts of it cached when the journal reports their
//! changes. A replicating gateway follows the same origin. In the end,
//! what each gateway serves over NFS must come to match the disk: first
//! every name, kind, size, link count, mode, mtime and symlink target,
//! then every file's content.
//!
//! Seeded and reproducible: `IMZ_FOLLOW_SEED` replays a failing seed
//! (printed on failure) or, set to `random`, explores; `IMZ_FOLLOW_OPS`
//! sets the number of changes.

use std::path::Path;
use std::time::{Duration, Instant};

use imz_integration::churn::{Node, Tree, change, differences, disk_tree, join, listed};
use imz_integration::nfs::{Nfs, NfsError};
use imz_integration::rng::Rng;
use imz_integration::{Fixture, GatewayProc};
use nfs3_client::nfs3_types::nfs3::ftype3;

/// What a gateway serves, walked with READDIRPLUS; with each file's
/// content if `content`.
async fn served_tree(nfs: &mut Nfs, content: bool) -> Result<Tree, NfsError> {
    let mut tree = Tree::new();
    let mut stack = vec![(nfs.root.clone(), String::new())];
    while let Some((dir, path)) = stack.pop() {
        for (name, attr, fh) in nfs.readdirplus(&dir, 8192, 65536).await? {
            if name == "." || name == ".." {
                continue;
            }
            let p = join(&path, &name);
            if attr.type_ == ftype3::NF3DIR {
                tree.insert(p.clone(), Node::Dir);
                stack.push((fh, p));
            } else if attr.type_ == ftype3::NF3LNK {
                tree.insert(p, Node::Symlink(nfs.readlink(&fh).await?));
            } else {
                let content = match content {
                    true => Some(nfs.read_all(&fh).await?),
                    false => None,
                };
                tree.insert(
                    p,
                    Node::File {
                        size: attr.size,
                        nlink: attr.nlink,
                        mode: attr.mode & 0o7777,
                        mtime: i64::from(attr.mtime.seconds) * 1_000_000_000
                            + i64::from(attr.mtime.nseconds),
                        content,
                    },
                );
            }
        }
    }
    Ok(tree)
}

/// Waits until `nfs` serves `want` (listing, then contents); panics with
/// the differences left, naming the seed.
async fn converges(nfs: &mut Nfs, want: &Tree, who: &str, seed: u64, ops: usize) {
    for content in [false, true] {
        let want = if content { want.clone() } else { listed(want) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = served_tree(nfs, content).await;
            if got.as_ref().is_ok_and(|g| *g == want) {
                break;
            }
            if Instant::now() > deadline {
                let why = match got {
                    Ok(got) => differences(&want, &got),
                    Err(e) => format!("walking it failed: {e}"),
                };
                panic!(
                    "IMZ_FOLLOW_SEED={seed} IMZ_FOLLOW_OPS={ops}: the {who} gateway serves \
                     {} than the disk holds:\n{why}",
                    if content {
                        "other contents"
                    } else {
                        "another tree"
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn populate(root: &Path) -> anyhow::Result<()> {
    for d in ["d1", "d2", "d1/deep"] {
        std::fs::create_dir(root.join(d))?;
    }
    for (i, f) in ["a", "d1/b", "d1/deep/c", "d2/d"].into_iter().enumerate() {
        std::fs::write(root.join(f), format!("seed file {i}\n"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_serve_what_random_changes_at_the_origin_leave() {
    let seed = Rng::seed_from_env("IMZ_FOLLOW_SEED", 20261127).expect("IMZ_FOLLOW_SEED");
    let ops: usize = std::env::var("IMZ_FOLLOW_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let fx = Fixture::new(populate).expect("origin and gateway");
    let replica = GatewayProc::start(
        &fx.origin.url,
        &fx.dir.path().join("token"),
        &fx.dir.path().join("replica-cache"),
        "1GiB",
        &["--mode", "replicate"],
    )
    .expect("replicating gateway");
    let mut nfs = Nfs::mount(fx.port(), "/imz").await.expect("mount");
    let mut rng = Rng::new(seed);
    for i in 0..ops {
        change(&mut rng, &fx.root, i);
        // The client walks and reads now and then, so that what changes
        // next is partly cached. Failures are expected mid-churn (a name
        // gone between listing and reading).
        if rng.below(8) == 0 {
            let _ = served_tree(&mut nfs, rng.below(2) == 0).await;
        }
        if rng.below(5) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
        }
    }
    let want = disk_tree(&fx.root);
    converges(&mut nfs, &want, "on-demand", seed, ops).await;
    let mut nfs = Nfs::mount(replica.port, "/imz")
        .await
        .expect("mount the replica");
    converges(&mut nfs, &want, "replicating", seed, ops).await;
}
