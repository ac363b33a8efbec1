//! A randomized test of how the origin follows its tree: another program
//! makes random changes directly in the directory (creates, writes,
//! appends, renames over files and across directories, removals, hard
//! links, chmods, mtimes set, symlinks, new and removed and renamed
//! directories), quickly or with
//! pauses; then what the origin lists must come to match the disk (every
//! name, kind, size, link count, mode, mtime and symlink target), and then
//! every file's content too.
//! Listings come first because reading a file whose content changed
//! behind the origin's back makes it look again: content alone would not
//! show what the watcher missed.
//!
//! One variant runs in a tree with another filesystem mounted inside.
//!
//! Seeded and reproducible: `IMZ_WATCH_SEED` replays a failing seed
//! (printed on failure) or, set to `random`, explores; `IMZ_WATCH_OPS` sets
//! the number of changes.

mod origin_common;

use std::time::{Duration, Instant};

use imz_integration::churn::{Node, Tree, change, differences, disk_tree, join, listed};
use imz_integration::mount::Tmpfs;
use imz_integration::rng::Rng;
use imz_origin::wire::{Kind, ObjectId, ROOT_ID};
use origin_common::*;

/// The tree as the origin lists it, with each file's content if `content`;
/// `None` if a directory went while the walk was under way.
fn served_tree(c: &Client, content: bool) -> Option<Tree> {
    let mut tree = Tree::new();
    let mut stack: Vec<(ObjectId, String)> = vec![(ROOT_ID, String::new())];
    while let Some((dir, path)) = stack.pop() {
        let mut after: Option<String> = None;
        loop {
            let page = c.try_entries(dir, after.as_deref(), 1000)?;
            for e in &page.entries {
                let p = join(&path, &e.name);
                match e.attr.kind {
                    Kind::Dir => {
                        tree.insert(p.clone(), Node::Dir);
                        stack.push((e.attr.id, p));
                    }
                    Kind::Symlink => {
                        tree.insert(p, Node::Symlink(e.attr.target.clone().unwrap_or_default()));
                    }
                    Kind::File => {
                        let content = content.then(|| {
                            let resp = c.data(e.attr.id, e.attr.version);
                            if resp.status().is_success() {
                                resp.bytes().map(|b| b.to_vec()).unwrap_or_default()
                            } else {
                                format!("(answered {})", resp.status()).into_bytes()
                            }
                        });
                        tree.insert(
                            p,
                            Node::File {
                                size: e.attr.size,
                                nlink: e.attr.nlink,
                                mode: e.attr.mode & 0o7777,
                                mtime: e.attr.mtime,
                                content,
                            },
                        );
                    }
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    Some(tree)
}

#[test]
fn random_changes_made_directly_in_the_tree_end_served_as_on_disk() {
    let seed = Rng::seed_from_env("IMZ_WATCH_SEED", 20261126).expect("IMZ_WATCH_SEED");
    let ops: usize = std::env::var("IMZ_WATCH_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    changes_end_served_as_on_disk(seed, ops, Filesystems::One);
}

/// The same with a filesystem mounted inside the tree (the tree a tmpfs
/// too, each numbering its inodes from 1): objects on the two share inode
/// numbers, as on two disks, and renames across the two fail as `mv`'s
/// `rename(2)` does.
#[test]
fn random_changes_in_a_tree_spanning_filesystems_end_served_as_on_disk() {
    let seed = Rng::seed_from_env("IMZ_WATCH_SEED", 20261127).expect("IMZ_WATCH_SEED");
    let ops: usize = std::env::var("IMZ_WATCH_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    changes_end_served_as_on_disk(seed, ops, Filesystems::Two);
}

/// Seeds that found faults, replayed. Both remove a directory and make
/// new ones under its name at once, so that ext4 hands a new directory the
/// removed one's inode number: the origin took that for a move, once of a
/// directory into itself (its subtree vanished from the listing), once
/// over its own parent (every later compare failed).
#[test]
fn changes_that_reuse_a_removed_directorys_inode_end_served_as_on_disk() {
    for seed in [1795703725666523625, 1795703747979636693] {
        changes_end_served_as_on_disk(seed, 400, Filesystems::One);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Filesystems {
    One,
    /// A tmpfs inside a tmpfs, at `mnt`.
    Two,
}

fn changes_end_served_as_on_disk(seed: u64, ops: usize, filesystems: Filesystems) {
    let mut mounts = Vec::new();
    let s = start_with(|root| {
        if filesystems == Filesystems::Two {
            for at in [root.to_path_buf(), root.join("mnt")] {
                mounts.push(Tmpfs::mount_with(&at, 256 << 20, "inode64").expect("mount (root)"));
            }
        }
        for d in ["d1", "d2", "d1/deep"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
        }
    });
    let root = s.root();
    let mut rng = Rng::new(seed);
    let verbose = std::env::var_os("IMZ_WATCH_VERBOSE").is_some();
    for i in 0..ops {
        let before = verbose.then(|| listed(&disk_tree(&root)));
        change(&mut rng, &root, i);
        if let Some(before) = before {
            eprintln!("{i}:\n{}", differences(&before, &listed(&disk_tree(&root))));
        }
        if rng.below(5) == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(40)));
        }
    }
    let want = disk_tree(&root);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = served_tree(&s.client, false);
        if got.as_ref() == Some(&listed(&want)) {
            break;
        }
        let got = got.unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "IMZ_WATCH_SEED={seed} IMZ_WATCH_OPS={ops}: the origin lists another tree than \
             the disk holds:\n{}",
            differences(&listed(&want), &got)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A read that finds a file changed behind the origin's back is answered
    // 410 while the origin looks again; gateways read again, and so does this.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = served_tree(&s.client, true);
        if got.as_ref() == Some(&want) {
            break;
        }
        let got = got.unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "IMZ_WATCH_SEED={seed} IMZ_WATCH_OPS={ops}: the origin serves other contents \
             than the disk holds:\n{}",
            differences(&want, &got)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
