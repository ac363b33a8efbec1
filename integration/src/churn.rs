//! Churn: random changes made directly in a directory tree, as other
//! programs on the origin's machine make them (creates, writes, appends,
//! renames over files and across directories, removals, hard links,
//! chmods, mtimes set, symlinks, directories made, moved and removed), and
//! the tree's shape to compare with what a server lists. Used by the randomized tests of the origin's
//! watcher and of gateways following its journal.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use imz_origin::wire::STATE_DIR_NAME;

use crate::rng::Rng;

/// Names the changes use: few, so that they collide.
pub const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// What one path holds: a directory, a symlink's target, or a file's size,
/// link count, permission bits, mtime (ns) and (when asked for) content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    Symlink(String),
    File {
        size: u64,
        nlink: u32,
        mode: u32,
        mtime: i64,
        content: Option<Vec<u8>>,
    },
}

/// `tree` without file contents.
pub fn listed(tree: &Tree) -> Tree {
    tree.iter()
        .map(|(p, n)| {
            let n = match n {
                Node::File { content: _, .. } => {
                    let mut n = n.clone();
                    if let Node::File { content, .. } = &mut n {
                        *content = None;
                    }
                    n
                }
                other => other.clone(),
            };
            (p.clone(), n)
        })
        .collect()
}

pub type Tree = BTreeMap<String, Node>;

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// The tree on disk, without the origin's state directory.
pub fn disk_tree(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dir.is_empty() && name == STATE_DIR_NAME {
                continue;
            }
            let path = join(&dir, &name);
            let Ok(meta) = std::fs::symlink_metadata(root.join(&path)) else {
                continue;
            };
            if meta.is_dir() {
                tree.insert(path.clone(), Node::Dir);
                stack.push(path);
            } else if meta.is_symlink() {
                if let Ok(target) = std::fs::read_link(root.join(&path)) {
                    tree.insert(path, Node::Symlink(target.to_string_lossy().into_owned()));
                }
            } else if let Ok(content) = std::fs::read(root.join(&path)) {
                tree.insert(
                    path,
                    Node::File {
                        size: content.len() as u64,
                        nlink: meta.nlink() as u32,
                        mode: meta.mode() & 0o7777,
                        mtime: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                        content: Some(content),
                    },
                );
            }
        }
    }
    tree
}

/// One random change to the tree; `i` makes contents unique.
pub fn change(rng: &mut Rng, root: &Path, i: usize) {
    let tree = disk_tree(root);
    let mut dirs = vec![String::new()];
    dirs.extend(
        tree.iter()
            .filter(|(_, n)| **n == Node::Dir)
            .map(|(p, _)| p.clone()),
    );
    let files: Vec<String> = tree
        .iter()
        .filter(|(_, n)| matches!(n, Node::File { .. }))
        .map(|(p, _)| p.clone())
        .collect();
    // Files and symlinks.
    let leaves: Vec<String> = tree
        .iter()
        .filter(|(_, n)| **n != Node::Dir)
        .map(|(p, _)| p.clone())
        .collect();
    let some_dir = |rng: &mut Rng| rng.pick(&dirs).cloned().unwrap_or_default();
    let some_name = |rng: &mut Rng| NAMES[rng.below(NAMES.len() as u64) as usize];
    let free = |p: &str| root.join(p).symlink_metadata().is_err();
    // Failures (a name taken meanwhile, a directory not empty) are part of
    // the game: the disk is the truth the origin must match.
    let _ = match rng.below(13) {
        0 | 1 => {
            let p = join(&some_dir(rng), some_name(rng));
            let len = rng.below(3000) as usize;
            let content: Vec<u8> = format!("{i}:").bytes().cycle().take(len + 3).collect();
            if tree.get(&p) == Some(&Node::Dir) {
                Ok(())
            } else {
                std::fs::write(root.join(&p), content)
            }
        }
        2 => match rng.pick(&files) {
            Some(f) => {
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(root.join(f))
                    .and_then(|mut h| h.write_all(format!("+{i}").as_bytes()))
            }
            None => Ok(()),
        },
        3 => match rng.pick(&leaves) {
            Some(f) => {
                let to = join(&some_dir(rng), some_name(rng));
                if tree.get(&to) == Some(&Node::Dir) {
                    Ok(())
                } else {
                    std::fs::rename(root.join(f), root.join(to))
                }
            }
            None => Ok(()),
        },
        4 => match rng.pick(&leaves) {
            Some(f) => std::fs::remove_file(root.join(f)),
            None => Ok(()),
        },
        5 => {
            let p = join(&some_dir(rng), some_name(rng));
            if free(&p) && p.matches('/').count() < 3 {
                std::fs::create_dir(root.join(p))
            } else {
                Ok(())
            }
        }
        6 => match dirs.get(1 + rng.below(dirs.len() as u64 - 1) as usize) {
            Some(d) if rng.below(2) == 0 => std::fs::remove_dir_all(root.join(d)),
            Some(d) => std::fs::remove_dir(root.join(d)),
            None => Ok(()),
        },
        7 => match rng.pick(&files) {
            Some(f) => {
                let to = join(&some_dir(rng), some_name(rng));
                if free(&to) {
                    std::fs::hard_link(root.join(f), root.join(to))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        },
        10 => match rng.pick(&files) {
            Some(f) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = *rng
                    .pick(&[0o600, 0o640, 0o644, 0o700, 0o755])
                    .unwrap_or(&0o644);
                std::fs::set_permissions(root.join(f), std::fs::Permissions::from_mode(mode))
            }
            None => Ok(()),
        },
        11 => match rng.pick(&files) {
            // As `touch -d` or a restore from an archive would.
            Some(f) => std::fs::File::options()
                .write(true)
                .open(root.join(f))
                .and_then(|h| {
                    h.set_modified(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::new(1_700_000_000 + rng.below(1 << 20), 0),
                    )
                }),
            None => Ok(()),
        },
        12 => {
            // Targets under a directory no change makes: dangling, so that
            // no write or append through the link lands anywhere.
            let p = join(&some_dir(rng), some_name(rng));
            if free(&p) {
                std::os::unix::fs::symlink(format!("nowhere/t{i}"), root.join(p))
            } else {
                Ok(())
            }
        }
        _ => match dirs.get(1 + rng.below(dirs.len() as u64 - 1) as usize) {
            Some(d) => {
                let to = join(&some_dir(rng), some_name(rng));
                let inside = to == *d || to.starts_with(&format!("{d}/"));
                if free(&to) && !inside {
                    std::fs::rename(root.join(d), root.join(to))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        },
    };
}

pub fn differences(want: &Tree, got: &Tree) -> String {
    let short = |n: Option<&Node>| match n {
        Some(Node::File {
            size,
            nlink,
            mode,
            mtime,
            content,
        }) => format!(
            "file of {size} bytes, {nlink} links, mode {mode:o}, mtime {mtime}{}",
            content.as_ref().map_or(String::new(), |c| format!(
                ", starting {:?}",
                String::from_utf8_lossy(&c[..c.len().min(20)])
            ))
        ),
        other => format!("{other:?}"),
    };
    let paths: std::collections::BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    paths
        .into_iter()
        .filter(|p| want.get(*p) != got.get(*p))
        .map(|p| {
            format!(
                "{p}: disk {}, served {}",
                short(want.get(p)),
                short(got.get(p))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
