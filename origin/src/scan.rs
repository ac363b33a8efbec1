//! Reconciling the store with what the tree shows: changes made directly in
//! the directory by other programs (found by the watcher while running, by
//! a full rescan at start-up or after an inotify overflow) are journaled as
//! ordinary changes, with no idempotency key.
//!
//! A path the watcher names is compared on its own (one stat, whatever the
//! size of its directory): creates, removes of files, renames with both
//! ends named, and changed files. Anything one name cannot explain (a name
//! now holding another object, a directory's own change or its going, a
//! new name for an inode the store knows elsewhere) makes its directory be
//! compared whole: its listing is compared with the stored entries, by
//! name and by fingerprint. Entries that vanished and entries that
//! appeared are matched by inode number first, so an object moved by
//! another program (`mv`) keeps its id: that is a `Rename`. What remains
//! becomes `Remove` and `Create` (a new directory is scanned whole), and a
//! changed fingerprint becomes `Write` (content may differ) or `SetAttr`.
//! Hard links are separate objects, one per name. A change through one
//! name shows (to inotify) in that name's directory only, so when a file
//! with several links changes or loses a name, its other names (found in
//! the store's link index) are compared too.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use rustix::fs::Stat;

use crate::error::OriginError;
use crate::fsops::{self, Fingerprint, FsError};
use crate::store::Meta;
use crate::test_hold::TestHold;
use crate::wire::{Attr, Change, Kind, ObjectId, ROOT_ID};
use crate::writer::WCtx;

/// What to reconcile.
#[derive(Debug, Default, Clone)]
pub struct Dirty {
    /// Directories whose entries (and own attributes) to compare.
    pub dirs: BTreeSet<ObjectId>,
    /// Paths (components from the root) the watcher saw change.
    pub paths: Vec<Vec<String>>,
    /// Compare the whole tree.
    pub full: bool,
    /// Directories (components from the root) to compare whole: a file
    /// was written there under a name removed before the reconcile. It may
    /// have been a hard link of a file named beside it, whose change no
    /// event reported (events name the link written through).
    pub listings: Vec<Vec<String>>,
}

impl Dirty {
    pub fn dirs(ids: impl IntoIterator<Item = ObjectId>) -> Self {
        Self {
            dirs: ids.into_iter().collect(),
            ..Self::default()
        }
    }

    pub fn full() -> Self {
        Self {
            full: true,
            ..Self::default()
        }
    }

    pub fn merge(&mut self, other: Dirty) {
        self.dirs.extend(other.dirs);
        self.paths.extend(other.paths);
        self.full |= other.full;
        self.listings.extend(other.listings);
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.paths.is_empty() && !self.full && self.listings.is_empty()
    }
}

type Result<T> = std::result::Result<T, OriginError>;

/// Differences found by listing.
#[derive(Default)]
struct Diff {
    /// Stored entries whose name is gone (or names another inode now).
    missing: Vec<(ObjectId, String, ObjectId)>,
    /// Names on disk the store does not have (or with another inode).
    new: Vec<(ObjectId, String, Stat)>,
    /// Same object, different fingerprint (files and symlinks).
    changed: Vec<(ObjectId, Stat)>,
    /// Listed directories and their own stat.
    listed: Vec<(ObjectId, Stat)>,
    /// Directories whose stored path could not be opened.
    failed: Vec<ObjectId>,
    /// Names an event gave that are neither on disk nor stored: they came
    /// and went before this look (see [`RecentLinks`]).
    vanished: bool,
    /// The other names of hard-linked files found inside new directories
    /// (filled by `apply`): they gained a link, and nothing names them.
    gained_links: BTreeSet<(ObjectId, String)>,
}

/// Files lately stored with more than one link, for a name that vanished.
///
/// A file's link count is read by a stat, its names one by one: a
/// reconcile can count a hard link whose name is gone by the time it looks
/// for it (made and removed between the two, or removed before a later
/// reconcile looks). That name never reaches the store, and its removal,
/// reported later, finds nothing to tell the file by; the file kept the
/// count for good. So when a name vanished, the files stored with more
/// than one link lately (by this transaction, or in the last
/// [`Self::KEEP`]) are looked at again: the removal came before that look.
#[derive(Default)]
pub struct RecentLinks {
    ids: std::collections::VecDeque<(ObjectId, std::time::Instant)>,
}

impl RecentLinks {
    const KEEP: std::time::Duration = std::time::Duration::from_secs(10);
    const MAX: usize = 4096;

    /// Notes files a committed transaction stored with several links.
    pub fn note(&mut self, ids: Vec<ObjectId>) {
        let now = std::time::Instant::now();
        self.ids.extend(ids.into_iter().map(|id| (id, now)));
        while self.ids.len() > Self::MAX
            || self
                .ids
                .front()
                .is_some_and(|(_, at)| at.elapsed() > Self::KEEP)
        {
            self.ids.pop_front();
        }
    }

    fn ids(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.ids
            .iter()
            .filter(|(_, at)| at.elapsed() <= Self::KEEP)
            .map(|(id, _)| *id)
    }
}

/// `(parent, name)` of the files lately stored with several links (see
/// [`RecentLinks`]), to be looked at again.
fn recently_linked(cx: &WCtx<'_>) -> Result<BTreeSet<(ObjectId, String)>> {
    let mut ids: BTreeSet<ObjectId> = cx.tx.linked.borrow().iter().copied().collect();
    ids.extend(
        cx.shared
            .recent_links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ids(),
    );
    let mut names = BTreeSet::new();
    for id in ids {
        if let Some(m) = cx.tx.meta(id)?
            && m.attr.kind == Kind::File
        {
            names.insert((m.parent, m.name));
        }
    }
    Ok(names)
}

pub fn reconcile(cx: &mut WCtx<'_>, dirty: Dirty) -> Result<()> {
    let mut work: BTreeSet<ObjectId> = dirty.dirs;
    // A changed path is compared entry by entry (its parent's other
    // entries are not listed), so a burst in a huge directory stays cheap.
    let mut entries: BTreeSet<(ObjectId, String)> = BTreeSet::new();
    for path in &dirty.paths {
        match entry_for_path(cx, path)? {
            Some(entry) => {
                entries.insert(entry);
            }
            None => dirs_for_path(cx, path, &mut work)?,
        }
    }
    for path in &dirty.listings {
        dirs_for_path(cx, path, &mut work)?;
    }
    if dirty.full {
        work.insert(ROOT_ID);
    }
    let whole = reconcile_entries(cx, entries, &work)?;
    work.extend(whole);
    let mut rounds = 0;
    // Directories found moved, listed down to the bottom next round.
    let mut moved_trees = BTreeSet::new();
    while !work.is_empty() && rounds < 8 {
        rounds += 1;
        let mut diff = Diff::default();
        list(cx, work, dirty.full, &moved_trees, &mut diff)?;
        let mut other_names = other_links(cx, &diff)?;
        let moved = apply(cx, &mut diff)?;
        other_names.append(&mut diff.gained_links);
        // A directory whose stored path did not open may have moved: its
        // parent is reconciled next round (the root always opens).
        work = moved.clone();
        moved_trees = moved;
        for id in diff.failed {
            if let Some(m) = cx.tx.meta(id)? {
                work.insert(m.parent.max(ROOT_ID));
                if rounds > 1 {
                    continue;
                }
                work.insert(id);
            }
        }
        let whole = reconcile_entries(cx, other_names, &work)?;
        work.extend(whole);
    }
    Ok(())
}

/// Reconciles single entries (not in directories of `skip`, which are
/// listed whole anyway), then the other names of hard-linked files among
/// them. Returns the directories to list whole instead, when an entry's
/// change needs more than its own name to be understood.
fn reconcile_entries(
    cx: &mut WCtx<'_>,
    mut entries: BTreeSet<(ObjectId, String)>,
    skip: &BTreeSet<ObjectId>,
) -> Result<BTreeSet<ObjectId>> {
    let mut whole = BTreeSet::new();
    // Each pass follows hard links one step further; a file has few names.
    for _ in 0..4 {
        // Names in directories that went meanwhile went with them.
        let mut kept = BTreeSet::new();
        for (dir, name) in entries {
            if cx.tx.meta(dir)?.is_some() {
                kept.insert((dir, name));
            }
        }
        entries = kept;
        if entries.is_empty() {
            break;
        }
        match diff_entries(cx, &entries, skip)? {
            Some(mut diff) => {
                let mut others = other_links(cx, &diff)?;
                whole.extend(apply(cx, &mut diff)?);
                others.append(&mut diff.gained_links);
                if diff.vanished {
                    others.extend(recently_linked(cx)?);
                }
                entries = others;
            }
            None => {
                whole.extend(entries.iter().map(|(dir, _)| *dir));
                break;
            }
        }
    }
    Ok(whole)
}

/// `(parent, name)` of the other names of every hard-linked file in `diff`
/// that changed, lost a name or gained one (read before `diff` is
/// applied).
fn other_links(cx: &WCtx<'_>, diff: &Diff) -> Result<BTreeSet<(ObjectId, String)>> {
    let mut inodes = BTreeSet::new();
    for (id, st) in &diff.changed {
        if st.st_nlink > 1 || cx.tx.meta(*id)?.is_some_and(|m| m.attr.nlink > 1) {
            inodes.insert((st.st_ino, *id));
        }
    }
    // Names gone, a directory's with everything it held.
    let mut gone: Vec<ObjectId> = diff.missing.iter().map(|(_, _, id)| *id).collect();
    while let Some(id) = gone.pop() {
        let Some(m) = cx.tx.meta(id)? else { continue };
        match m.attr.kind {
            Kind::File if m.attr.nlink > 1 => {
                inodes.insert((m.fp.ino, id));
            }
            Kind::Dir => gone.extend(cx.tx.child_ids(id)?.into_iter().map(|(_, child)| child)),
            _ => {}
        }
    }
    let mut names = BTreeSet::new();
    for (_, _, st) in &diff.new {
        names_before_a_new_link(cx, st, &mut names)?;
    }
    for (ino, id) in inodes {
        for m in cx.tx.linked(ino, id)? {
            names.insert((m.parent, m.name));
        }
    }
    Ok(names)
}

/// Adds to `names` the names a file had before its new name, found with
/// `st`, was stored: with a new link they gained one, and `link(2)` tells
/// only the new name's directory. The name the inode index knows may not
/// be in the link index yet (it had one link), and the link index may
/// know names the inode index has lost (its name went).
fn names_before_a_new_link(
    cx: &WCtx<'_>,
    st: &Stat,
    names: &mut BTreeSet<(ObjectId, String)>,
) -> Result<()> {
    if st.st_nlink <= 1 || fsops::kind_of(st) != Some(Kind::File) {
        return Ok(());
    }
    let indexed = cx.tx.with_ino(st.st_ino)?;
    let files = indexed.into_iter().filter(|m| m.attr.kind == Kind::File);
    // The root is no file: every linked one counts.
    for m in files.chain(cx.tx.linked(st.st_ino, ROOT_ID)?) {
        names.insert((m.parent, m.name));
    }
    Ok(())
}

/// `(parent, name)` of a changed path whose parent is a stored directory.
fn entry_for_path(cx: &WCtx<'_>, path: &[String]) -> Result<Option<(ObjectId, String)>> {
    let Some((last, parents)) = path.split_last() else {
        return Ok(None);
    };
    let mut cur = ROOT_ID;
    for name in parents {
        match cx.tx.child(cur, name)? {
            Some(id) if cx.tx.meta(id)?.is_some_and(|m| m.attr.kind == Kind::Dir) => cur = id,
            _ => return Ok(None),
        }
    }
    Ok(Some((cur, last.clone())))
}

/// Compares single entries with the store, without listing their
/// directories: creates, removes and changed files, in a directory of any
/// size, cost a stat each. `None` when some entry needs its whole
/// directory compared: a name that now holds another object or kind (a
/// file replaced by `mv` over it), a directory whose own attributes
/// changed (listing it finds what it holds) or that is gone (it may have
/// moved), a new name for an inode the store knows elsewhere (a rename
/// whose other end is not among these entries, or a hard link), or a
/// directory that no longer opens.
fn diff_entries(
    cx: &WCtx<'_>,
    entries: &BTreeSet<(ObjectId, String)>,
    skip: &BTreeSet<ObjectId>,
) -> Result<Option<Diff>> {
    let mut diff = Diff::default();
    let mut fds: HashMap<ObjectId, Option<OwnedFd>> = HashMap::new();
    for (dir, name) in entries {
        if skip.contains(dir) || crate::wire::is_reserved(name, *dir == ROOT_ID) {
            continue;
        }
        if !fds.contains_key(dir) {
            fds.insert(*dir, open_stored_dir(cx, *dir)?);
        }
        let Some(Some(fd)) = fds.get(dir) else {
            return Ok(None);
        };
        let on_disk = fsops::stat_at(fd, name)
            .ok()
            .flatten()
            .filter(|st| fsops::kind_of(st).is_some());
        let stored = match cx.tx.child(*dir, name)? {
            Some(id) => cx.tx.meta(id)?,
            None => None,
        };
        match (stored, on_disk) {
            (None, None) => diff.vanished = true,
            (Some(m), Some(st)) if m.fp == Fingerprint::of(&st) => {}
            (Some(m), Some(st))
                if m.attr.kind != Kind::Dir
                    && fsops::kind_of(&st) == Some(m.attr.kind)
                    && m.fp.ino == st.st_ino =>
            {
                diff.changed.push((m.attr.id, st));
            }
            // A directory gone may have moved into one not stored yet,
            // whose listing finds it (and keeps its id and its subtree's).
            (Some(m), None) if m.attr.kind == Kind::Dir => return Ok(None),
            (Some(m), None) => diff.missing.push((*dir, name.clone(), m.attr.id)),
            (None, Some(st)) => diff.new.push((*dir, name.clone(), st)),
            (Some(_), Some(_)) => return Ok(None),
        }
    }
    let missing: HashSet<ObjectId> = diff.missing.iter().map(|(_, _, id)| *id).collect();
    for (_, _, st) in &diff.new {
        let known = cx.tx.with_ino(st.st_ino)?;
        if known.iter().any(|m| !missing.contains(&m.attr.id)) {
            return Ok(None);
        }
    }
    Ok(Some(diff))
}

/// The directory stored as `id`, opened at its stored path; `None` when
/// that path is gone or now holds another directory (the stored one was
/// removed or moved, and another took its name: what it holds is not
/// `id`'s, and its parent's listing sorts that out).
fn open_stored_dir(cx: &WCtx<'_>, id: ObjectId) -> Result<Option<OwnedFd>> {
    let Some(m) = cx.tx.meta(id)? else {
        return Ok(None);
    };
    let Some(path) = cx.tx.path_of(id)? else {
        return Ok(None);
    };
    let Ok(fd) = cx.shared.tree.open_dir(&path) else {
        return Ok(None);
    };
    let same = id == ROOT_ID || fsops::fstat(&fd).is_ok_and(|st| st.st_ino == m.fp.ino);
    Ok(same.then_some(fd))
}

/// The directories to look at for a changed path: its deepest stored
/// ancestor, and the path itself if it is a stored directory.
fn dirs_for_path(cx: &WCtx<'_>, path: &[String], out: &mut BTreeSet<ObjectId>) -> Result<()> {
    let mut cur = ROOT_ID;
    for (i, name) in path.iter().enumerate() {
        match cx.tx.child(cur, name)? {
            Some(id) => {
                let is_dir = cx
                    .tx
                    .meta(id)?
                    .map(|m| m.attr.kind == Kind::Dir)
                    .unwrap_or(false);
                if i + 1 == path.len() {
                    if is_dir {
                        out.insert(id);
                    }
                    break;
                }
                if !is_dir {
                    break;
                }
                cur = id;
            }
            None => break,
        }
    }
    out.insert(cur);
    Ok(())
}

/// Lists the directories `work` into `diff`, and those below them whose
/// own fingerprint changed; all of them when `full`, and all below
/// `whole_trees`.
fn list(
    cx: &mut WCtx<'_>,
    work: BTreeSet<ObjectId>,
    full: bool,
    whole_trees: &BTreeSet<ObjectId>,
    diff: &mut Diff,
) -> Result<()> {
    let mut queue: Vec<ObjectId> = work.into_iter().collect();
    let mut whole: HashSet<ObjectId> = whole_trees.iter().copied().collect();
    let mut seen = HashSet::new();
    while let Some(dir) = queue.pop() {
        if !seen.insert(dir) {
            continue;
        }
        let Some(meta) = cx.tx.meta(dir)? else {
            continue;
        };
        if meta.attr.kind != Kind::Dir {
            continue;
        }
        let Some(path) = cx.tx.path_of(dir)? else {
            continue;
        };
        let fd = match cx.shared.tree.open_dir(&path) {
            Ok(fd) => fd,
            Err(FsError::NotFound | FsError::Escape) if dir != ROOT_ID => {
                diff.failed.push(dir);
                continue;
            }
            Err(e) => {
                return Err(OriginError::io(
                    format!("opening /{}", path.join("/")),
                    std::io::Error::other(e.to_string()),
                ));
            }
        };
        let own = fsops::fstat(&fd).map_err(|e| {
            OriginError::io("stat of a directory", std::io::Error::other(e.to_string()))
        })?;
        if dir != ROOT_ID && own.st_ino != meta.fp.ino {
            // Another directory took its name: its entries are not `dir`'s.
            diff.failed.push(dir);
            continue;
        }
        let listing = match fsops::list_dir(&fd, dir == ROOT_ID) {
            Ok(l) => l,
            Err(FsError::NotFound) => {
                diff.failed.push(dir);
                continue;
            }
            Err(e) => {
                return Err(OriginError::io(
                    "listing a directory",
                    std::io::Error::other(e.to_string()),
                ));
            }
        };
        diff.listed.push((dir, own));
        let whole_tree = whole.contains(&dir);
        cx.shared
            .scanned
            .fetch_add(listing.len() as u64, Ordering::Relaxed);
        let mut stored: HashMap<String, ObjectId> = cx.tx.child_ids(dir)?.into_iter().collect();
        for (name, st) in listing {
            let kind = fsops::kind_of(&st);
            match stored.remove(&name) {
                Some(id) => {
                    let Some(m) = cx.tx.meta(id)? else {
                        diff.new.push((dir, name, st));
                        continue;
                    };
                    let fp = Fingerprint::of(&st);
                    if m.fp.ino != fp.ino || Some(m.attr.kind) != kind {
                        diff.missing.push((dir, name.clone(), id));
                        diff.new.push((dir, name, st));
                    } else if m.attr.kind == Kind::Dir {
                        if whole_tree {
                            whole.insert(id);
                        }
                        if full || whole_tree || m.fp != fp {
                            queue.push(id);
                        }
                    } else if m.fp != fp || lacks_target(&m) {
                        diff.changed.push((id, st));
                    } else if m.attr.kind == Kind::File && st.st_nlink > 1 {
                        // Stores from before the link index learn it here.
                        cx.tx.note_link(fp.ino, id)?;
                    }
                }
                None => diff.new.push((dir, name, st)),
            }
        }
        for (name, id) in stored {
            diff.missing.push((dir, name, id));
        }
    }
    Ok(())
}

/// Journals what `diff` found. Returns the directories it found moved:
/// they are listed next, down to the bottom, since what they hold may have
/// changed too (and a directory that only reuses a removed one's inode
/// number holds other things). A change made in a moved tree before the
/// origin took in the move is reported under a path the store cannot
/// resolve yet, or not at all (its event came on a watch the move made the
/// watcher drop), and a file's change moves no directory's times.
fn apply(cx: &mut WCtx<'_>, diff: &mut Diff) -> Result<BTreeSet<ObjectId>> {
    let mut moved_dirs = BTreeSet::new();
    let mut dir_stats: HashMap<ObjectId, Stat> =
        diff.listed.iter().map(|(id, st)| (*id, *st)).collect();
    // Renames: a new name whose inode belongs to a vanished object.
    let missing_ids: HashSet<ObjectId> = diff.missing.iter().map(|(_, _, id)| *id).collect();
    let mut renames = Vec::new();
    let mut moved = HashSet::new();
    let mut creates = Vec::new();
    for (dir, name, st) in std::mem::take(&mut diff.new) {
        let mut is_move = false;
        for m in cx.tx.with_ino(st.st_ino)? {
            let id = m.attr.id;
            if moved.contains(&id)
                || id == ROOT_ID
                || !plausibly_moved(&m, &st)
                || !could_move_to(cx, &m, dir, &name)?
            {
                continue;
            }
            if missing_ids.contains(&id) || !still_at_old_place(cx, &m)? {
                is_move = true;
                moved.insert(id);
                renames.push((id, dir, name.clone(), st));
                break;
            }
        }
        if !is_move {
            creates.push((dir, name, st));
        }
    }
    // Unlink every rename source first, so chains (a->b, b->c) resolve.
    let mut sources = HashMap::new();
    for (id, _, _, _) in &renames {
        if let Some(m) = cx.tx.meta(*id)? {
            if cx.tx.child(m.parent, &m.name)? == Some(*id) {
                cx.tx.unlink(m.parent, &m.name)?;
            }
            sources.insert(*id, (m.parent, m.name.clone()));
        }
    }
    for (id, dir, name, st) in renames {
        let Some(source) = sources.get(&id).cloned() else {
            continue;
        };
        if record_rename(cx, id, source, dir, name, st, &mut dir_stats)? == Some(Kind::Dir) {
            moved_dirs.insert(id);
        }
    }
    let mut missing_ids: HashSet<ObjectId> = missing_ids.difference(&moved).copied().collect();
    // A name whose object was replaced in place (`mv tmp name` over it):
    // the old object goes first, so that the new one can take the name.
    let created_names: HashSet<(ObjectId, &str)> =
        creates.iter().map(|(d, n, _)| (*d, n.as_str())).collect();
    for (dir, name, id) in &diff.missing {
        if created_names.contains(&(*dir, name.as_str())) && missing_ids.contains(id) {
            record_remove(cx, *dir, name.clone(), *id, &mut dir_stats)?;
        }
    }
    // Creates, whole subtrees for new directories; an object found inside a
    // new directory that vanished elsewhere moved there.
    for (dir, name, st) in creates {
        create_tree(
            cx,
            (dir, name, st),
            &mut dir_stats,
            (&mut missing_ids, &mut moved_dirs),
            &mut diff.gained_links,
        )?;
    }
    // Removes: vanished objects that did not move.
    for (dir, name, id) in std::mem::take(&mut diff.missing) {
        if missing_ids.contains(&id) {
            record_remove(cx, dir, name, id, &mut dir_stats)?;
        }
    }
    // Changed files and symlinks.
    for (id, st) in std::mem::take(&mut diff.changed) {
        let Some(m) = cx.tx.meta(id)? else { continue };
        let fp = Fingerprint::of(&st);
        if m.fp == fp && !lacks_target(&m) || m.fp.ino != fp.ino {
            continue;
        }
        let content = m.fp.content_differs(&fp) || lacks_target(&m);
        let seq = cx.tx.next_seq()?;
        let mut m = m;
        if m.attr.kind == Kind::Symlink && content {
            // Gone from its name since it was listed (renamed, removed):
            // nothing to record under that name; it is compared again
            // where it is found next, its fingerprint left as it was.
            let Some(target) = read_target(cx, &m)? else {
                continue;
            };
            m.attr.target = Some(target);
        }
        let m = refresh(cx, m, &st, seq)?;
        let change = if content {
            Change::Write { attr: m.attr }
        } else {
            Change::SetAttr { attr: m.attr }
        };
        cx.tx.append(seq, cx.now, None, change)?;
    }
    // Directories' own attributes.
    for (id, st) in std::mem::take(&mut diff.listed) {
        let Some(m) = cx.tx.meta(id)? else { continue };
        let fp = Fingerprint::of(&st);
        if m.fp == fp || m.fp.ino != fp.ino && id != ROOT_ID {
            continue;
        }
        let seq = cx.tx.next_seq()?;
        let m = refresh(cx, m, &st, seq)?;
        cx.tx
            .append(seq, cx.now, None, Change::SetAttr { attr: m.attr })?;
    }
    Ok(moved_dirs)
}

/// Journals that `dir/name` (object `id`) is gone, if the store still has
/// it there.
fn record_remove(
    cx: &mut WCtx<'_>,
    dir: ObjectId,
    name: String,
    id: ObjectId,
    dir_stats: &mut HashMap<ObjectId, Stat>,
) -> Result<()> {
    if cx.tx.child(dir, &name)? != Some(id) {
        return Ok(());
    }
    cx.tx.unlink(dir, &name)?;
    cx.tx.forget_subtree(id)?;
    let seq = cx.tx.next_seq()?;
    let parent = touch_dir(cx, dir, seq, -1, dir_stats)?;
    cx.tx
        .append(seq, cx.now, None, Change::Remove { parent, name, id })
}

/// Moves `id` from `source` (its old entry, already unlinked or not) to
/// `dir/name`, replacing what the store had there, and journals it.
/// Returns the kind of what moved.
fn record_rename(
    cx: &mut WCtx<'_>,
    id: ObjectId,
    source: (ObjectId, String),
    dir: ObjectId,
    name: String,
    st: Stat,
    dir_stats: &mut HashMap<ObjectId, Stat>,
) -> Result<Option<Kind>> {
    let (from_dir, from_name) = source;
    if cx.tx.child(from_dir, &from_name)? == Some(id) {
        cx.tx.unlink(from_dir, &from_name)?;
    }
    let replaced = cx.tx.child(dir, &name)?;
    if let Some(r) = replaced {
        cx.tx.unlink(dir, &name)?;
        cx.tx.forget_subtree(r)?;
    }
    cx.tx.link(dir, &name, id)?;
    let seq = cx.tx.next_seq()?;
    let Some(mut m) = cx.tx.meta(id)? else {
        return Ok(None);
    };
    m.parent = dir;
    m.name = name.clone();
    let m = refresh(cx, m, &st, seq)?;
    let gained = if replaced.is_some() { 0 } else { 1 };
    let (from_parent, to_parent) = if from_dir == dir {
        let a = touch_dir(cx, dir, seq, gained - 1, dir_stats)?;
        (a.clone(), a)
    } else {
        let f = touch_dir(cx, from_dir, seq, -1, dir_stats)?;
        let t = touch_dir(cx, dir, seq, gained, dir_stats)?;
        (f, t)
    };
    let kind = m.attr.kind;
    cx.tx.append(
        seq,
        cx.now,
        None,
        Change::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name: name,
            attr: m.attr,
            replaced,
        },
    )?;
    Ok(Some(kind))
}

/// Whether `st` (found under a new name with `m`'s inode number) is `m`
/// moved rather than a new object that reused a freed inode number: same
/// kind and, for files and symlinks, same size and mtime (a rename changes
/// only ctime). A file moved *and* modified while nobody watched becomes a
/// remove plus a create.
fn plausibly_moved(m: &Meta, st: &Stat) -> bool {
    let fp = Fingerprint::of(st);
    match fsops::kind_of(st) {
        Some(Kind::Dir) => m.attr.kind == Kind::Dir,
        Some(k) => k == m.attr.kind && fp.size == m.fp.size && fp.mtime == m.fp.mtime,
        None => false,
    }
}

/// Whether `m` can have moved to `dir/name`: not into itself or below it,
/// and not over its own directory or one above it. An inode number that a
/// removed directory freed and a new one reuses at once (ext4 does) would
/// otherwise look like such a move.
fn could_move_to(cx: &WCtx<'_>, m: &Meta, dir: ObjectId, name: &str) -> Result<bool> {
    if cx.tx.is_within(dir, m.attr.id)? {
        return Ok(false);
    }
    match cx.tx.child(dir, name)? {
        Some(replaced) => Ok(!cx.tx.is_within(m.parent, replaced)?),
        None => Ok(true),
    }
}

/// Whether the stored location of `m` still holds its inode on disk.
fn still_at_old_place(cx: &WCtx<'_>, m: &Meta) -> Result<bool> {
    let Some(path) = cx.tx.path_of(m.parent)? else {
        return Ok(false);
    };
    let Ok(fd) = cx.shared.tree.open_dir(&path) else {
        return Ok(false);
    };
    Ok(matches!(fsops::stat_at(&fd, &m.name), Ok(Some(st)) if st.st_ino == m.fp.ino))
}

/// A symlink stored without its target: earlier versions recorded one
/// renamed before its target was read that way. A full scan (at start-up)
/// reads it again.
fn lacks_target(m: &Meta) -> bool {
    m.attr.kind == Kind::Symlink && m.attr.target.is_none()
}

fn read_target(cx: &WCtx<'_>, m: &Meta) -> Result<Option<String>> {
    let Some(path) = cx.tx.path_of(m.parent)? else {
        return Ok(None);
    };
    let Ok(fd) = cx.shared.tree.open_dir(&path) else {
        return Ok(None);
    };
    Ok(target_at(&fd, &m.name).ok())
}

/// `IMZ_TEST_READLINK_HOLD`: holds the scan between finding a symlink
/// and reading its target, the window in which a rename took the target.
static READLINK_HOLD: TestHold = TestHold::new("IMZ_TEST_READLINK_HOLD");

/// The target of symlink `name` in `dir`, as the scan reads it.
fn target_at(dir: &OwnedFd, name: &str) -> std::result::Result<String, FsError> {
    READLINK_HOLD.wait_blocking();
    fsops::read_link(dir, name)
}

/// Stores `m` with attributes from `st` at version `seq`.
fn refresh(cx: &mut WCtx<'_>, mut m: Meta, st: &Stat, seq: u64) -> Result<Meta> {
    let fp = Fingerprint::of(st);
    if fp.ino != m.fp.ino {
        cx.tx.drop_ino(m.fp.ino, m.attr.id)?;
    }
    cx.tx.set_ino(fp.ino, m.attr.id)?;
    if let Some(attr) = fsops::attr_of(m.attr.id, seq, st, m.attr.size, m.attr.target.clone()) {
        m.attr = attr;
    }
    m.fp = fp;
    cx.tx.put(&m)?;
    Ok(m)
}

/// A directory after one of its entries changed: entry count moved by
/// `delta`, version `seq`, attributes from a fresh stat when it opens.
fn touch_dir(
    cx: &mut WCtx<'_>,
    dir: ObjectId,
    seq: u64,
    delta: i64,
    stats: &mut HashMap<ObjectId, Stat>,
) -> Result<Attr> {
    let Some(mut m) = cx.tx.meta(dir)? else {
        return Err(OriginError::Corrupt(format!(
            "directory {dir} vanished from the store"
        )));
    };
    let st = match stats.get(&dir) {
        Some(st) => Some(*st),
        None => {
            let st = cx
                .tx
                .path_of(dir)?
                .and_then(|p| cx.shared.tree.open_dir(&p).ok())
                .and_then(|fd| fsops::fstat(&fd).ok());
            if let Some(st) = st {
                stats.insert(dir, st);
            }
            st
        }
    };
    m.attr.size = (m.attr.size as i64 + delta).max(0) as u64;
    m.attr.version = seq;
    if let Some(st) = st {
        if let Some(attr) = fsops::attr_of(dir, seq, &st, m.attr.size, None) {
            m.attr = attr;
        }
        m.fp = Fingerprint::of(&st);
    }
    cx.tx.put(&m)?;
    Ok(m.attr)
}

/// The object of `missing` that `dir/name` (found with `st`) is, moved
/// there; `None` if it is none of them.
fn moved_here(
    cx: &WCtx<'_>,
    st: &Stat,
    missing: &HashSet<ObjectId>,
    dir: ObjectId,
    name: &str,
) -> Result<Option<Meta>> {
    for m in cx.tx.with_ino(st.st_ino)? {
        if missing.contains(&m.attr.id)
            && plausibly_moved(&m, st)
            && could_move_to(cx, &m, dir, name)?
        {
            return Ok(Some(m));
        }
    }
    Ok(None)
}

/// Journals `dir/name` and, for a directory, everything below it. An
/// object of `missing` found below it moved there (and a directory among
/// them joins `moved_dirs`). A file with several links found below it
/// adds the names of the file's other links to `gained_links` (they gained
/// one, and `link(2)` told only the new name's directory, which was not
/// watched yet).
fn create_tree(
    cx: &mut WCtx<'_>,
    new: (ObjectId, String, Stat),
    stats: &mut HashMap<ObjectId, Stat>,
    (missing, moved_dirs): (&mut HashSet<ObjectId>, &mut BTreeSet<ObjectId>),
    gained_links: &mut BTreeSet<(ObjectId, String)>,
) -> Result<()> {
    let mut queue = vec![new];
    let mut top = true;
    while let Some((dir, name, st)) = queue.pop() {
        if cx.tx.child(dir, &name)?.is_some() {
            continue;
        }
        let Some(kind) = fsops::kind_of(&st) else {
            continue;
        };
        cx.shared.scanned.fetch_add(1, Ordering::Relaxed);
        if !top && let Some(m) = moved_here(cx, &st, missing, dir, &name)? {
            let id = m.attr.id;
            missing.remove(&id);
            if record_rename(cx, id, (m.parent, m.name), dir, name, st, stats)? == Some(Kind::Dir) {
                moved_dirs.insert(id);
            }
            continue;
        }
        top = false;
        let parent_fd: Option<OwnedFd> = cx
            .tx
            .path_of(dir)?
            .and_then(|p| cx.shared.tree.open_dir(&p).ok());
        let Some(parent_fd) = parent_fd else { continue };
        let target = match kind {
            Kind::Symlink => match target_at(&parent_fd, &name) {
                Ok(target) => Some(target),
                // Renamed or removed since it was listed: a symlink
                // recorded without its target would keep that hole for
                // good (its moves carry what it was created with). Its new
                // name, if any, brings its own event.
                Err(_) => continue,
            },
            _ => None,
        };
        // Listing a new directory first, so its stat is the one recorded.
        let mut listing = Vec::new();
        let mut st = st;
        if kind == Kind::Dir {
            match fsops::open_subdir(&parent_fd, &name) {
                Ok(fd) => {
                    if let Ok(own) = fsops::fstat(&fd) {
                        st = own;
                    }
                    listing = fsops::list_dir(&fd, false).unwrap_or_default();
                }
                Err(_) => continue,
            }
        }
        let seq = cx.tx.next_seq()?;
        let id = cx.tx.alloc_id()?;
        let Some(attr) = fsops::attr_of(id, seq, &st, 0, target) else {
            continue;
        };
        let meta = Meta {
            parent: dir,
            name: name.clone(),
            attr: attr.clone(),
            fp: Fingerprint::of(&st),
        };
        names_before_a_new_link(cx, &st, gained_links)?;
        cx.tx.put(&meta)?;
        cx.tx.link(dir, &name, id)?;
        cx.tx.set_ino(meta.fp.ino, id)?;
        let parent = touch_dir(cx, dir, seq, 1, stats)?;
        cx.tx
            .append(seq, cx.now, None, Change::Create { parent, name, attr })?;
        if kind == Kind::Dir {
            stats.insert(id, st);
            // Reverse so that names are created in listing order (pop takes the last).
            for (child, cst) in listing.into_iter().rev() {
                queue.push((id, child, cst));
            }
        }
    }
    Ok(())
}

/// Makes sure the root object exists (first start).
pub fn ensure_root(cx: &mut WCtx<'_>) -> Result<()> {
    if cx.tx.meta(ROOT_ID)?.is_some() {
        return Ok(());
    }
    let st = fsops::fstat(cx.shared.tree.root_fd())
        .map_err(|e| OriginError::io("stat of the root", std::io::Error::other(e.to_string())))?;
    let seq = cx.tx.next_seq()?.saturating_sub(1);
    let attr = fsops::attr_of(ROOT_ID, seq, &st, 0, None)
        .ok_or_else(|| OriginError::Config("the root is not a directory".into()))?;
    let meta = Meta {
        parent: 0,
        name: String::new(),
        attr,
        fp: Fingerprint::of(&st),
    };
    cx.tx.put(&meta)?;
    cx.tx.set_ino(meta.fp.ino, ROOT_ID)?;
    Ok(())
}
