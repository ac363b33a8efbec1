//! Conflicts: what happens when the origin refuses a logged change because
//! its state is not what the change assumed, and how the configured policy
//! settles it without losing anything.
//!
//! | case | keep-both (default) | gateway-wins | origin-wins | manual |
//! |---|---|---|---|---|
//! | update/update | ours becomes `NAME.conflict-GW-TIME`, theirs keeps the name | ours replaces theirs | theirs stays, ours saved in the conflicts area | held |
//! | update/remove (we changed, they removed) | ours is created again | same | ours saved, the file goes | held |
//! | remove/update (we removed, they changed) | theirs comes back | removed anyway | theirs comes back | held |
//! | remove/rename (we removed, they moved it) | theirs comes back where they moved it | same | same | held |
//! | create/create of a name | ours gets the conflict name | ours replaces theirs (files, unless theirs is a file this gateway holds and did not remove; else as keep-both) | theirs stays, ours saved | held |
//! | directory created on both sides | merged into one | merged | merged | merged |
//! | parent removed at the origin | parent created again (under a conflict name if its name holds something else now) | same | ours saved | held |
//! | moved out of a directory removed at the origin (with it) | ours created again | same | ours saved, the file goes | held |
//! | rename/rename | the origin's name stays | the origin's name stays | the origin's name stays | held |
//! | moved out of a directory removed at the origin, which moved it out first | the origin's name stays | same | same | held |
//! | removed here; moved out of its directory and that removed at the origin | theirs comes back where they moved it | same | same | held |
//! | moved here, changed there | moved as well | same | same | held |
//! | moved and changed here, changed there | moved as well; ours also kept as `NAME.conflict-GW-TIME` | ours replaces theirs | moved as well; ours saved | held |
//! | moved and then removed here, changed there | theirs comes back where it was | removed anyway | theirs comes back | held |
//! | moved and then replaced here (another moved over it), changed there | theirs comes back where it was | replaced anyway | theirs comes back | held |
//! | rename onto a taken name, or over a file changed at the origin | ours gets the conflict name | ours replaces theirs (of the same kind, unless theirs is a file this gateway holds and did not remove; else as keep-both) | ours stays where it was | held |
//!
//! Not conflicts (the origin applies them): new content or attributes of
//! a file the origin has only moved since (they land on the moved file,
//! which the follower marks for resync), and a move over a file the origin
//! moved away first (the name is free; theirs comes back here where it
//! went, see `coherence::upsert_entry`).
//!
//! The *conflicts area* is the directory `conflicts/` beside the cache
//! database; saved copies are named `ID-NAME`. Every conflict is logged and
//! recorded; `imz conflicts list` shows them and `imz conflicts resolve`
//! settles a held one.

use std::collections::HashSet;
use std::path::PathBuf;

use imz_cache::{Cache, FileId, Kind, LogOp, LogRecord, Object, OriginRef, WriteTxn};
use imz_origin::wire::{self, ConflictReason, OpResult};
use serde::{Deserialize, Serialize};

use crate::coherence::{self, Source};
use crate::vfs::write::{NewNode, Stability, now_nanos};
use crate::vfs::{Vfs, VfsError};

/// How conflicts are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// Both versions kept: the gateway's beside the origin's, renamed.
    KeepBoth,
    /// The gateway's version replaces the origin's.
    GatewayWins,
    /// The origin's version stays; the gateway's is saved in the conflicts area.
    OriginWins,
    /// Held until a person resolves it (`imz conflicts resolve`).
    Manual,
}

impl std::fmt::Display for ConflictPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KeepBoth => "keep-both",
            Self::GatewayWins => "gateway-wins",
            Self::OriginWins => "origin-wins",
            Self::Manual => "manual",
        })
    }
}

/// A conflict as recorded in the cache and shown by `imz conflicts list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictEntry {
    pub id: u64,
    /// When it was met (nanoseconds since the epoch).
    pub time: i64,
    /// Path of the object at the gateway, from the export root.
    pub path: String,
    /// e.g. `update/update`.
    pub case: String,
    pub policy: ConflictPolicy,
    /// What was done, in words.
    pub outcome: String,
    /// Where the gateway's version was saved, if it was.
    pub saved_copy: Option<String>,
    /// Held for a person: the object whose records wait.
    pub held: Option<FileId>,
    /// A person's decision for a held conflict, applied on the next round.
    pub decision: Option<ConflictPolicy>,
}

fn decode(bytes: &[u8]) -> Result<ConflictEntry, VfsError> {
    serde_json::from_slice(bytes).map_err(|e| VfsError::Io(format!("conflict record: {e}")))
}

/// Every recorded conflict.
pub fn list(cache: &Cache) -> Result<Vec<ConflictEntry>, VfsError> {
    cache
        .read()?
        .conflicts()?
        .iter()
        .map(|(_, b)| decode(b))
        .collect()
}

/// Objects whose log records are held for a person.
pub fn held_objects(cache: &Cache) -> Result<HashSet<FileId>, VfsError> {
    Ok(list(cache)?
        .into_iter()
        .filter(|c| c.decision.is_none())
        .filter_map(|c| c.held)
        .collect())
}

/// A person decides a held conflict: `path` (or conflict id) gets `keep`.
pub async fn decide(
    vfs: &Vfs,
    which: &str,
    keep: ConflictPolicy,
) -> Result<ConflictEntry, VfsError> {
    let entries = list(&vfs.cache)?;
    let entry = entries
        .into_iter()
        .find(|c| {
            c.held.is_some()
                && c.decision.is_none()
                && (c.path == which || c.id.to_string() == which)
        })
        .ok_or(VfsError::NotFound)?;
    let mut updated = entry.clone();
    updated.decision = Some(keep);
    let bytes = serde_json::to_vec(&updated).map_err(|e| VfsError::Io(e.to_string()))?;
    let id = updated.id;
    vfs.writer
        .run(0, move |tx| {
            tx.put_conflict(id, &bytes)?;
            Ok(())
        })
        .await?;
    vfs.log_changed.notify_one();
    Ok(updated)
}

/// The path of `fid` from the export root.
pub fn path_of(vfs: &Vfs, fid: FileId) -> String {
    let Ok(rx) = vfs.cache.read() else {
        return format!("#{fid}");
    };
    let mut parts = Vec::new();
    let mut cur = fid;
    for _ in 0..1024 {
        if cur == imz_cache::ROOT_FILEID {
            break;
        }
        match rx.get(cur) {
            Ok(Some(o)) => {
                parts.push(o.name.clone());
                cur = o.parent;
            }
            _ => break,
        }
    }
    parts.reverse();
    format!("/{}", parts.join("/"))
}

/// `NAME.conflict-GW-YYYYMMDDTHHMMSS` (GW: the first 8 characters of the
/// gateway id), short enough to stay a valid name; the `n`th one of a
/// second (n > 1) ends in `-N`.
pub fn conflict_name(name: &str, gateway_id: &str, time: i64, n: u32) -> String {
    let secs = time / 1_000_000_000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let mut suffix = format!(
        ".conflict-{}-{y:04}{m:02}{d:02}T{:02}{:02}{:02}",
        &gateway_id[..gateway_id.len().min(8)],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if n > 1 {
        suffix.push_str(&format!("-{n}"));
    }
    let keep = wire::MAX_NAME_LEN - suffix.len();
    let mut base = name.to_owned();
    while base.len() > keep {
        base.pop();
    }
    format!("{base}{suffix}")
}

/// Conflict copies named in one second (or for one name) at most.
const MAX_COPIES: u32 = 10_000;

/// A conflict name for `name` that cached directory `dir` does not hold:
/// two conflicts on one name in one second would otherwise share it, and
/// the second copy would be written over the first.
fn free_conflict_name(
    tx: &WriteTxn<'_>,
    dir: FileId,
    name: &str,
    gateway_id: &str,
    time: i64,
) -> Result<String, VfsError> {
    for n in 1..=MAX_COPIES {
        let candidate = conflict_name(name, gateway_id, time, n);
        if tx.lookup(dir, &candidate)?.is_none() {
            return Ok(candidate);
        }
    }
    Err(VfsError::Exists)
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Settles the origin's refusal `result` of log record `seq`.
pub async fn settle(
    vfs: &Vfs,
    gateway_id: &str,
    policy: ConflictPolicy,
    seq: u64,
    record: &LogRecord,
    result: &OpResult,
) -> Result<(), VfsError> {
    let fid = record.op.primary();
    // The origin refused it, so it does not have it: settling may rewrite
    // or cancel it like a record never sent.
    let refused_create = matches!(record.op, LogOp::Create { .. });
    vfs.writer
        .run(0, move |tx| {
            tx.log_unmark_shipped(seq)?;
            // Content that travelled inside a refused create was refused too
            // (a file's uploads can only follow its create).
            if refused_create && let Some(store) = tx.get(fid)?.and_then(|o| o.log.store) {
                tx.log_unmark_shipped(store)?;
            }
            Ok(())
        })
        .await?;
    // A person's decision for this object overrides the policy, once.
    let decided = list(&vfs.cache)?
        .into_iter()
        .find(|c| c.held == Some(fid) && c.decision.is_some());
    let policy = decided.as_ref().and_then(|c| c.decision).unwrap_or(policy);
    let path = path_of(vfs, fid);
    let (reason, current) = match result {
        OpResult::Conflict(c) => (Some(c.reason), c.current.clone()),
        OpResult::Rejected { error } => {
            tracing::error!(%path, seq, %error, "origin rejected a logged change; holding it for a person");
            let held = Settled::held(policy, fid, format!("origin rejected it: {error}"));
            return record_conflict(vfs, &path, "rejected", held, decided.as_ref()).await;
        }
        _ => return Ok(()),
    };
    if reason == Some(ConflictReason::NameExists) && current.is_none() {
        // The name is taken by nothing the origin serves (an origin before
        // it said so itself): retrying cannot help, and would hold up every
        // change behind this one.
        tracing::error!(%path, seq, "the origin has the name taken by nothing it serves; holding the change for a person");
        let why = "the name is taken at the origin by something it does not serve (a FIFO, socket or device node?)";
        let held = Settled::held(policy, fid, why);
        return record_conflict(vfs, &path, "rejected", held, decided.as_ref()).await;
    }
    let case = case_name(&record.op, reason);
    tracing::warn!(%path, case, %policy, ?reason, op = ?record.op, current = ?current, "conflict");

    if policy == ConflictPolicy::Manual {
        let held = Settled::held(policy, fid, "held until resolved");
        return record_conflict(vfs, &path, case, held, decided.as_ref()).await;
    }
    let saved = |outcome: &str, copy: Option<String>| {
        let outcome = match copy {
            Some(_) => outcome.to_owned(),
            // A directory, or a file we removed too or whose content we
            // did not change: no version of ours.
            None => format!("{outcome} (nothing to save)"),
        };
        Settled {
            saved_copy: copy,
            ..Settled::by(policy, outcome)
        }
    };
    let settled: Settled = match (&record.op, reason) {
        // Moved at the origin before our remove reached it: it lives on
        // there, as if changed (theirs comes back), where the journal put
        // it (or, not heard of yet, at its old place, from where the
        // journal's rename will move it).
        (LogOp::Remove { parent, name, .. }, Some(ConflictReason::NameMismatch))
            if let Some(theirs) = current.as_ref() =>
        {
            back_where_moved(vfs, seq, record, *parent, name, theirs).await?;
            Settled::by(policy, "theirs comes back (moved at the origin)")
        }
        // Its directory went at the origin, but it had been moved out of
        // it first: as above, theirs comes back where the origin has it.
        (LogOp::Remove { parent, name, .. }, Some(ConflictReason::ParentMissing))
            if let Some(theirs) = alive_at_origin(vfs, fid).await? =>
        {
            back_where_moved(vfs, seq, record, *parent, name, &theirs).await?;
            Settled::by(policy, "theirs comes back (moved at the origin)")
        }
        // Already as we wanted it, or nothing left to do.
        (
            LogOp::Remove { .. },
            Some(
                ConflictReason::Removed
                | ConflictReason::NameMismatch
                | ConflictReason::ParentMissing,
            ),
        ) => {
            finish(vfs, seq, record, None).await?;
            Settled::by(policy, "already gone at the origin")
        }
        (LogOp::Store { .. } | LogOp::SetAttr { .. }, Some(ConflictReason::VersionMismatch)) => {
            match policy {
                ConflictPolicy::GatewayWins => {
                    rebase(vfs, fid, current.as_ref()).await?;
                    Settled::by(policy, "ours replaces theirs")
                }
                ConflictPolicy::KeepBoth => {
                    let copy = copy_beside(vfs, seq, fid, gateway_id).await?;
                    take_theirs(vfs, fid, current.as_ref()).await?;
                    Settled::by(
                        policy,
                        format!("ours kept as {copy}, theirs keeps the name"),
                    )
                }
                _ => {
                    let copy = save_copy(vfs, fid).await?;
                    take_theirs(vfs, fid, current.as_ref()).await?;
                    saved("theirs stays; ours saved", copy)
                }
            }
        }
        (
            LogOp::Store { .. } | LogOp::SetAttr { .. } | LogOp::Rename { .. },
            Some(ConflictReason::Removed),
        ) => match policy {
            ConflictPolicy::OriginWins => {
                let copy = save_copy(vfs, fid).await?;
                drop_object(vfs, fid).await?;
                saved("removed as at the origin; ours saved", copy)
            }
            _ => {
                recreate(vfs, seq, fid, gateway_id).await?;
                Settled::by(policy, "ours created again")
            }
        },
        (
            LogOp::Remove { parent, name, .. },
            Some(ConflictReason::VersionMismatch | ConflictReason::NotEmpty),
        ) => {
            if policy == ConflictPolicy::GatewayWins
                && reason == Some(ConflictReason::VersionMismatch)
            {
                rebase(vfs, fid, current.as_ref()).await?;
                Settled::by(policy, "removed anyway")
            } else {
                finish(vfs, seq, record, None).await?;
                restore_entry(vfs, *parent, name, current.as_ref()).await?;
                Settled::by(policy, "theirs comes back")
            }
        }
        (
            LogOp::Create {
                parent, name, kind, ..
            },
            Some(ConflictReason::NameExists),
        ) => {
            let theirs = current
                .as_ref()
                .ok_or_else(|| VfsError::Io("name conflict without the origin's object".into()))?;
            if *kind == Kind::Dir && theirs.kind == wire::Kind::Dir {
                adopt(vfs, seq, fid, theirs, true).await?;
                Settled::by(policy, "directories merged")
            } else if policy == ConflictPolicy::GatewayWins
                && *kind == Kind::File
                && theirs.kind == wire::Kind::File
                && !held_here(vfs, theirs.id, fid)?
            {
                adopt(vfs, seq, fid, theirs, false).await?;
                Settled::by(policy, "ours replaces theirs")
            } else if policy == ConflictPolicy::OriginWins && *kind != Kind::Dir {
                let copy = save_copy(vfs, fid).await?;
                // Ours goes wherever it is now (it may have moved since).
                drop_object(vfs, fid).await?;
                restore_entry(vfs, *parent, name, Some(theirs)).await?;
                saved("theirs stays; ours saved", copy)
            } else {
                let new_name = rename_pending(vfs, seq, fid, *parent, name, gateway_id).await?;
                restore_entry(vfs, *parent, name, Some(theirs)).await?;
                Settled::by(policy, format!("ours renamed to {new_name}"))
            }
        }
        // Moved here out of a directory the origin removed, with the
        // object in it: as if changed here and removed there.
        (LogOp::Rename { from_parent, .. }, Some(ConflictReason::ParentMissing))
            if gone_at_origin(vfs, *from_parent).await? && gone_at_origin(vfs, fid).await? =>
        {
            if policy == ConflictPolicy::OriginWins {
                let copy = save_copy(vfs, fid).await?;
                drop_object(vfs, fid).await?;
                saved("removed as at the origin; ours saved", copy)
            } else {
                recreate(vfs, seq, fid, gateway_id).await?;
                Settled::by(
                    policy,
                    "ours created again (its directory went at the origin)",
                )
            }
        }
        // Moved out of that directory at the origin before it went: as a
        // rename/rename, the origin's name stays.
        (
            LogOp::Rename {
                from_parent,
                to_parent,
                ..
            },
            Some(ConflictReason::ParentMissing),
        ) if gone_at_origin(vfs, *from_parent).await? => {
            finish(vfs, seq, record, None).await?;
            take_origin_place(vfs, fid, &[*from_parent, *to_parent]).await?;
            Settled::by(
                policy,
                "the origin's name stays (moved there before its directory went)",
            )
        }
        (
            LogOp::Create { parent, .. }
            | LogOp::Rename {
                to_parent: parent, ..
            },
            Some(ConflictReason::ParentMissing),
        ) => {
            if policy == ConflictPolicy::OriginWins {
                let copy = save_copy(vfs, fid).await?;
                drop_object(vfs, fid).await?;
                saved("parent gone at the origin; ours saved", copy)
            } else {
                recreate_dir_chain(vfs, gateway_id, *parent).await?;
                Settled::by(policy, "parent directory created again")
            }
        }
        // A name taken at the origin, or the file we replace changed
        // there since: ours must not go over theirs.
        (
            LogOp::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                ..
            },
            Some(ConflictReason::NameExists | ConflictReason::VersionMismatch),
        ) if reason == Some(ConflictReason::NameExists)
            || replaced_changed(vfs, &record.op, current.as_ref()) =>
        {
            let theirs = current
                .as_ref()
                .ok_or_else(|| VfsError::Io("name conflict without the origin's object".into()))?;
            // Only an object of the same kind is replaced (the origin
            // refuses a file over a directory, or a symlink over a file),
            // and not one of ours.
            let replaceable = vfs
                .getattr(fid)
                .is_ok_and(|o| o.kind == coherence::kind_from(theirs.kind))
                && !held_here(vfs, theirs.id, fid)?;
            match policy {
                ConflictPolicy::GatewayWins if replaceable => {
                    replace_at_rename(vfs, seq, record, theirs).await?;
                    Settled::by(policy, "ours replaces theirs")
                }
                ConflictPolicy::OriginWins => {
                    finish(vfs, seq, record, None).await?;
                    move_back(
                        vfs,
                        fid,
                        *from_parent,
                        from_name,
                        *to_parent,
                        to_name,
                        gateway_id,
                    )
                    .await?;
                    restore_entry(vfs, *to_parent, to_name, Some(theirs)).await?;
                    Settled::by(policy, "ours stays where it was")
                }
                _ => {
                    let new_name =
                        rename_pending(vfs, seq, fid, *to_parent, to_name, gateway_id).await?;
                    restore_entry(vfs, *to_parent, to_name, Some(theirs)).await?;
                    Settled::by(policy, format!("ours renamed to {new_name}"))
                }
            }
        }
        // Moved, then removed here; changed there: as a remove of a file
        // changed there, theirs comes back (where the origin has it: our
        // move never happened there). Taking the move on their version
        // would have let our remove go over their change.
        (
            LogOp::Rename {
                from_parent,
                from_name,
                ..
            },
            Some(ConflictReason::VersionMismatch),
        ) if policy != ConflictPolicy::GatewayWins
            && let Some(remove) = {
                let rx = vfs.cache.read()?;
                match rx.get(fid)? {
                    Some(obj) => later_remove(&obj, seq, |s| rx.log_record(s))?,
                    None => None,
                }
            } =>
        {
            finish(vfs, seq, record, Some(remove)).await?;
            restore_entry(vfs, *from_parent, from_name, current.as_ref()).await?;
            Settled::by(policy, "theirs comes back (we moved it, then removed it)")
        }
        // Moved, then replaced here by another move; changed there: as
        // above, theirs comes back where the origin has it, and the move
        // that replaced it here must meet their version, not take it.
        (
            LogOp::Rename {
                from_parent,
                from_name,
                ..
            },
            Some(ConflictReason::VersionMismatch),
        ) if policy != ConflictPolicy::GatewayWins && vfs.getattr(fid).is_ok_and(|o| o.removed) => {
            finish(vfs, seq, record, None).await?;
            restore_entry(vfs, *from_parent, from_name, current.as_ref()).await?;
            Settled::by(
                policy,
                "theirs comes back (we moved it, then moved another over it)",
            )
        }
        // Changed at the origin; a move does not care. Our own change of
        // it, though, is an update/update: rebased with the move, it would
        // go over theirs.
        (LogOp::Rename { .. }, Some(ConflictReason::VersionMismatch)) => {
            let changed_here = vfs
                .getattr(fid)
                .is_ok_and(|o| o.log.store.is_some() || o.log.setattr.is_some());
            match policy {
                ConflictPolicy::KeepBoth if changed_here => {
                    let copy = copy_beside(vfs, seq, fid, gateway_id).await?;
                    take_theirs(vfs, fid, current.as_ref()).await?;
                    Settled::by(
                        policy,
                        format!("moved as well; ours kept as {copy}, theirs moved"),
                    )
                }
                ConflictPolicy::OriginWins if changed_here => {
                    let copy = save_copy(vfs, fid).await?;
                    take_theirs(vfs, fid, current.as_ref()).await?;
                    saved("moved as well; theirs stays, ours saved", copy)
                }
                _ => {
                    rebase(vfs, fid, current.as_ref()).await?;
                    Settled::by(policy, "moved as well")
                }
            }
        }
        (
            LogOp::Rename {
                from_parent,
                to_parent,
                ..
            },
            _,
        ) => {
            // Renamed differently at the origin: its name there stays.
            finish(vfs, seq, record, None).await?;
            take_origin_place(vfs, fid, &[*from_parent, *to_parent]).await?;
            Settled::by(policy, "the origin's name stays")
        }
        (op, reason) => {
            tracing::error!(
                ?op,
                ?reason,
                "conflict of a kind nothing settles; holding it"
            );
            Settled::held(ConflictPolicy::Manual, fid, "held: no automatic resolution")
        }
    };
    // Whatever the outcome, what it touched is placed as the origin has
    // it once the log is done with it.
    crate::resync::mark(
        vfs,
        crate::resync::touched(vfs, &record.op, current.as_ref()),
    )
    .await?;
    record_conflict(vfs, &path, case, settled, decided.as_ref()).await
}

/// How a conflict ended, as it is recorded.
struct Settled {
    policy: ConflictPolicy,
    outcome: String,
    /// Where our version was saved, if the policy set it aside.
    saved_copy: Option<String>,
    /// The object whose record waits for a person.
    held: Option<FileId>,
}

impl Settled {
    fn by(policy: ConflictPolicy, outcome: impl Into<String>) -> Self {
        Self {
            policy,
            outcome: outcome.into(),
            saved_copy: None,
            held: None,
        }
    }

    fn held(policy: ConflictPolicy, fid: FileId, outcome: impl Into<String>) -> Self {
        Self {
            held: Some(fid),
            ..Self::by(policy, outcome)
        }
    }
}

fn case_name(op: &LogOp, reason: Option<ConflictReason>) -> &'static str {
    use ConflictReason::*;
    match (op, reason) {
        (LogOp::Store { .. } | LogOp::SetAttr { .. }, Some(VersionMismatch)) => "update/update",
        (LogOp::Store { .. } | LogOp::SetAttr { .. }, Some(Removed)) => "update/remove",
        (LogOp::Remove { .. }, Some(VersionMismatch)) => "remove/update",
        (LogOp::Remove { .. }, Some(NotEmpty)) => "remove/create",
        (LogOp::Remove { .. }, _) => "remove/remove",
        (LogOp::Create { .. }, Some(NameExists)) => "create/create",
        (LogOp::Create { .. } | LogOp::Rename { .. }, Some(ParentMissing)) => {
            "create/remove-parent"
        }
        (LogOp::Rename { .. }, Some(NameExists)) => "rename/create",
        (LogOp::Rename { .. }, Some(Removed)) => "rename/remove",
        (LogOp::Rename { .. }, _) => "rename/rename",
        _ => "other",
    }
}

async fn record_conflict(
    vfs: &Vfs,
    path: &str,
    case: &str,
    settled: Settled,
    decided: Option<&ConflictEntry>,
) -> Result<(), VfsError> {
    let Settled {
        policy,
        outcome,
        saved_copy,
        held,
    } = settled;
    tracing::warn!(path, case, %policy, %outcome, "conflict settled");
    let mut entry = ConflictEntry {
        id: 0,
        time: now_nanos(),
        path: path.to_owned(),
        case: case.to_owned(),
        policy,
        outcome,
        saved_copy,
        held,
        decision: None,
    };
    let replaces = decided.map(|d| d.id);
    vfs.writer
        .run(0, move |tx| {
            if let Some(old) = replaces {
                tx.remove_conflict(old)?;
            }
            entry.id = tx.alloc_id()?;
            let bytes = serde_json::to_vec(&entry).map_err(|e| VfsError::Io(e.to_string()))?;
            tx.put_conflict(entry.id, &bytes)?;
            Ok(())
        })
        .await
}

/// The record is settled: it is done, as is (optionally) `also`.
async fn finish(
    vfs: &Vfs,
    seq: u64,
    _record: &LogRecord,
    also: Option<u64>,
) -> Result<(), VfsError> {
    vfs.writer
        .run(0, move |tx| {
            tx.log_done(seq)?;
            if let Some(s) = also {
                tx.log_done(s)?;
            }
            Ok(())
        })
        .await
}

/// We removed it, they moved it: our remove is done, and theirs comes
/// back where the journal put it (noted on the removed object), or, not
/// heard of yet, at the place we removed it from (`parent/name`), from
/// where the journal's rename will move it; that directory is placed as
/// the origin has it once the log is done with it.
async fn back_where_moved(
    vfs: &Vfs,
    seq: u64,
    record: &LogRecord,
    parent: FileId,
    name: &str,
    theirs: &wire::Attr,
) -> Result<(), VfsError> {
    let (dir, at) = match vfs.getattr(record.op.primary()) {
        Ok(obj) => (obj.parent, obj.name.clone()),
        Err(_) => (parent, name.to_owned()),
    };
    finish(vfs, seq, record, None).await?;
    restore_entry(vfs, dir, &at, Some(theirs)).await?;
    crate::resync::mark(vfs, vec![dir]).await
}

/// Our change wins: base it on the origin's current version and send it again.
async fn rebase(vfs: &Vfs, fid: FileId, current: Option<&wire::Attr>) -> Result<(), VfsError> {
    let current = current
        .cloned()
        .ok_or_else(|| VfsError::Io("conflict without the origin's version".into()))?;
    vfs.writer
        .run(0, move |tx| {
            let mut obj = tx.object(fid)?;
            let theirs = coherence::attrs_from(&current);
            // What our pending attribute changes set (each goes over
            // theirs), and the smallest size our truncations give it.
            let mut ours = imz_cache::SetAttrs::default();
            let mut cut_to: Option<u64> = None;
            for seq in tx.content_records(fid)? {
                if let Some(LogOp::SetAttr { set, .. }) = tx.log_record(seq)?.map(|r| r.op) {
                    ours.merge(&set);
                    if let Some(size) = set.size {
                        cut_to = Some(cut_to.map_or(size, |c| c.min(size)));
                    }
                }
            }
            if obj.log.store.is_none() && obj.kind == Kind::File {
                // Our chunks were of the old version and we have no content
                // change to ship: they must not pass for the new one. Our
                // truncations go over theirs: their bytes up to the
                // shortest, zeros past it.
                tx.drop_data(fid)?;
                obj.origin_extent = current.size.min(cut_to.unwrap_or(u64::MAX));
                if cut_to.is_none() {
                    obj.attrs.size = current.size;
                }
            }
            // Each attribute we did not change is theirs (a mode changed
            // there), as the origin will show it.
            if ours.mode.is_none() {
                obj.attrs.mode = theirs.mode;
            }
            if ours.uid.is_none() {
                obj.attrs.uid = theirs.uid;
            }
            if ours.gid.is_none() {
                obj.attrs.gid = theirs.gid;
            }
            if ours.atime.is_none() {
                obj.attrs.atime = theirs.atime;
            }
            if ours.mtime.is_none() && obj.log.store.is_none() && cut_to.is_none() {
                obj.attrs.mtime = theirs.mtime;
            }
            obj.attrs.ctime = obj.attrs.ctime.max(theirs.ctime);
            obj.origin = Some(OriginRef {
                id: current.id,
                version: current.version,
            });
            tx.put(fid, &obj)?;
            Ok(())
        })
        .await?;
    vfs.log_changed.notify_one();
    Ok(())
}

/// Theirs wins for `fid`: our content and attribute changes go, the origin's
/// current state comes in (a pending move or removal of it stays).
async fn take_theirs(vfs: &Vfs, fid: FileId, current: Option<&wire::Attr>) -> Result<(), VfsError> {
    let current = current.cloned();
    vfs.writer
        .run(0, move |tx| {
            // All of them: a shrink and a regrowth are two records, and one
            // left would go over theirs.
            for seq in tx.content_records(fid)? {
                tx.log_done(seq)?;
            }
            let Some(attr) = current else { return Ok(()) };
            let mut obj = tx.object(fid)?;
            coherence::take_origin_version(tx, fid, &mut obj, &attr)?;
            tx.put(fid, &obj)?;
            Ok(())
        })
        .await
}

/// Copies file `fid`'s content (as the cache has it now) to a new file
/// named as a conflict copy, beside where it was after its record `seq`
/// (or in the root, if that directory is gone here); returns the new name.
async fn copy_beside(
    vfs: &Vfs,
    seq: u64,
    fid: FileId,
    gateway_id: &str,
) -> Result<String, VfsError> {
    let obj = vfs.getattr(fid)?;
    let (dir, base) = {
        let tx = vfs.cache.read()?;
        let (dir, name) = place_after(&obj, seq, |s| tx.log_record(s))?;
        let alive = tx.live_dir(dir)?;
        (if alive { dir } else { imz_cache::ROOT_FILEID }, name)
    };
    let now = now_nanos();
    let mut n = 1;
    // Exclusive, so that a name taken meanwhile (another copy made in this
    // second) is never written over: the next number is tried.
    let (copy, name) = loop {
        let name = conflict_name(&base, gateway_id, now, n);
        let verifier = (now as u64 ^ u64::from(n)).to_le_bytes();
        let made = vfs
            .create(
                dir,
                &name,
                NewNode::File {
                    exclusive: Some(verifier),
                },
                imz_cache::SetAttrs::default(),
            )
            .await;
        match made {
            Ok((copy, _)) => break (copy, name),
            Err(VfsError::Exists) if n < MAX_COPIES => n += 1,
            Err(e) => return Err(e),
        }
    };
    copy_content(vfs, fid, obj.attrs.size, |offset, bytes| async move {
        vfs.write(copy, offset, bytes, Stability::Stable)
            .await
            .map(|(obj, _)| obj)
    })
    .await?;
    let set = imz_cache::SetAttrs {
        mode: Some(obj.attrs.mode),
        mtime: Some(obj.attrs.mtime),
        ..Default::default()
    };
    vfs.setattr(copy, set).await?;
    Ok(name)
}

async fn copy_content<F, Fut>(
    vfs: &Vfs,
    fid: FileId,
    size: u64,
    mut sink: F,
) -> Result<(), VfsError>
where
    F: FnMut(u64, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<Object, VfsError>>,
{
    let mut offset = 0;
    while offset < size {
        let (bytes, _) = vfs.read(fid, offset, 1 << 20).await?;
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len() as u64;
        sink(offset, bytes).await?;
        offset += n;
    }
    Ok(())
}

/// Saves our version of `fid` in the conflicts area; returns its path, or
/// None if there is no version of ours to keep (a directory, a file
/// removed here too, or one whose content we did not change).
async fn save_copy(vfs: &Vfs, fid: FileId) -> Result<Option<String>, VfsError> {
    let obj = vfs.getattr(fid)?;
    if obj.removed {
        // A later record of ours removes it: we kept no version (and its
        // bytes went with the remove).
        return Ok(None);
    }
    if obj.kind == Kind::File && obj.log.store.is_none() && obj.log.create.is_none() {
        let rx = vfs.cache.read()?;
        let mut truncated = false;
        for &seq in &obj.log.ops {
            truncated |= matches!(
                rx.log_record(seq)?.map(|r| r.op),
                Some(LogOp::SetAttr { set, .. }) if set.size.is_some()
            );
        }
        if !truncated {
            // Moved, or its mode changed, here: its content is the
            // origin's (which may be gone from there, or not cached here).
            return Ok(None);
        }
    }
    let dir = conflicts_dir(&vfs.cache);
    std::fs::create_dir_all(&dir)
        .map_err(|e| VfsError::Io(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join(format!("{}-{}", now_nanos(), obj.name));
    match obj.kind {
        Kind::File => {
            let mut out = Vec::new();
            let copied = copy_content(vfs, fid, obj.attrs.size, |_, bytes| {
                out.extend_from_slice(&bytes);
                std::future::ready(Ok(Object::clone(&obj)))
            })
            .await;
            if let Err(e) = copied {
                // Bytes we did not write, not cached here, and gone from
                // the origin (removed or changed there): what we have is
                // saved, zeros for the rest, rather than nothing at all.
                tracing::warn!(fid, error = %e, "saving our version: bytes we did not write are gone from the origin; saved as zeros");
                out = cached_content(vfs, fid, obj.attrs.size)?;
            }
            std::fs::write(&path, out)
                .map_err(|e| VfsError::Io(format!("saving {}: {e}", path.display())))?;
        }
        Kind::Symlink => {
            std::fs::write(&path, obj.target.clone().unwrap_or_default())
                .map_err(|e| VfsError::Io(format!("saving {}: {e}", path.display())))?;
        }
        Kind::Dir => return Ok(None),
    }
    Ok(Some(path.display().to_string()))
}

/// File `fid`'s first `size` bytes as the cache holds them, zeros where
/// it holds none.
fn cached_content(vfs: &Vfs, fid: FileId, size: u64) -> Result<Vec<u8>, VfsError> {
    let rx = vfs.cache.read()?;
    let mut out = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
    for index in imz_cache::chunk::covering(0, size) {
        if let Some(bytes) = rx.chunk(fid, index)? {
            let start = imz_cache::chunk::start_of(index) as usize;
            let n = bytes.len().min(out.len().saturating_sub(start));
            out[start..start + n].copy_from_slice(&bytes[..n]);
        }
    }
    Ok(out)
}

/// Directory where origin-wins keeps the gateway's versions.
pub fn conflicts_dir(cache: &Cache) -> PathBuf {
    cache
        .path()
        .parent()
        .map(|p| p.join("conflicts"))
        .unwrap_or_else(|| PathBuf::from("conflicts"))
}

/// The object goes locally with everything logged about it.
async fn drop_object(vfs: &Vfs, fid: FileId) -> Result<(), VfsError> {
    vfs.writer
        .run(0, move |tx| {
            let obj = tx.object(fid)?;
            // The directory that held it may be kept here only for it (gone
            // at the origin, where the follower could not remove it while
            // it held our change): placed as the origin has it.
            tx.mark_resync(obj.parent)?;
            for seq in obj.log.ops.clone() {
                // A move of it that replaced a file here will not happen:
                // the directory shows again what the origin has at that
                // name (the replaced file, if it lives on there).
                if let Some(LogOp::Rename {
                    to_parent,
                    replaced: Some(_),
                    ..
                }) = tx.log_record(seq)?.map(|r| r.op)
                {
                    tx.mark_resync(to_parent)?;
                }
                tx.log_done(seq)?;
            }
            // Removed here too, it went with its last record.
            let Some(obj) = tx.get(fid)? else {
                return Ok(());
            };
            tx.unlink_if(obj.parent, &obj.name, fid)?;
            tx.remove_tree(fid)?;
            Ok(())
        })
        .await
}

/// The origin lost the object we changed: create it again from our copy.
/// The conflicting record becomes its create; its content follows.
async fn recreate(vfs: &Vfs, seq: u64, fid: FileId, gateway_id: &str) -> Result<(), VfsError> {
    let (gateway_id, now) = (gateway_id.to_owned(), now_nanos());
    vfs.writer
        .run(0, move |tx| {
            let mut obj = tx.object(fid)?;
            let removed_here =
                obj.log.other > 0 || later_remove(&obj, seq, |s| tx.log_record(s))?.is_some();
            if obj.removed && removed_here {
                // Removed here since (or replaced by a move): gone on both
                // sides, nothing to create again.
                tx.log_done(seq)?;
                return Ok(());
            }
            // Created where it was when that record was logged.
            let (mut parent, mut name) = place_after(&obj, seq, |s| tx.log_record(s))?;
            if obj.removed {
                // Dropped here, yet nothing here removed it (the cache
                // forgets nothing that holds changes, so this should not
                // be): it comes back, where it was or, that directory gone
                // here, in the root.
                tracing::warn!(fid, %name, "a changed file was dropped here without being removed; creating it again");
                if !tx.live_dir(parent)? {
                    parent = imz_cache::ROOT_FILEID;
                }
                if tx.lookup(parent, &name)?.is_some() {
                    name = free_conflict_name(tx, parent, &name, &gateway_id, now)?;
                }
                obj.removed = false;
                obj.parent = parent;
                obj.name = name.clone();
                tx.put(fid, &obj)?;
                tx.link(parent, &name, fid)?;
            }
            if obj.kind == Kind::File {
                let missing = tx.missing_chunks(fid, &obj)?;
                if !missing.is_empty() {
                    // Never fetched, and gone with the file at the origin:
                    // nothing can bring those bytes back. Say so.
                    tracing::error!(
                        fid,
                        %name,
                        chunks = missing.len(),
                        up_to_bytes = missing.len() as u64 * imz_cache::chunk::CHUNK_SIZE,
                        "created again without parts of it never fetched here and removed at the origin: they read as zeros"
                    );
                }
            }
            obj.origin = None;
            obj.origin_extent = 0;
            tx.put(fid, &obj)?;
            tx.log_rewrite(
                seq,
                LogOp::Create {
                    parent,
                    name,
                    fid,
                    kind: obj.kind,
                },
            )?;
            if obj.kind == Kind::File {
                tx.log(LogOp::Store { fid }, now_nanos())?;
            }
            Ok(())
        })
        .await?;
    vfs.log_changed.notify_one();
    Ok(())
}

/// Where `obj` was just after its record `seq`: where the next pending
/// move takes it from, or, with none, where it is now. (`log_record` reads
/// a record, from a read or a write transaction.)
fn place_after(
    obj: &Object,
    seq: u64,
    log_record: impl Fn(u64) -> imz_cache::Result<Option<LogRecord>>,
) -> Result<(FileId, String), VfsError> {
    for later in obj.log.ops.iter().copied().filter(|s| *s > seq) {
        if let Some(LogRecord {
            op:
                LogOp::Rename {
                    from_parent,
                    from_name,
                    ..
                },
            ..
        }) = log_record(later)?
        {
            return Ok((from_parent, from_name));
        }
    }
    Ok((obj.parent, obj.name.clone()))
}

/// Our pending create (or rename) of `fid` at `dir/name` goes to `new_name`.
async fn rename_pending(
    vfs: &Vfs,
    seq: u64,
    fid: FileId,
    dir: FileId,
    name: &str,
    gateway_id: &str,
) -> Result<String, VfsError> {
    let (name, gateway_id) = (name.to_owned(), gateway_id.to_owned());
    let now = now_nanos();
    let new_name = vfs
        .writer
        .run(0, move |tx| {
            let new_name = free_conflict_name(tx, dir, &name, &gateway_id, now)?;
            let record = tx
                .log_record(seq)?
                .ok_or_else(|| VfsError::Io("conflicting record vanished".into()))?;
            let rewritten = match record.op {
                LogOp::Create {
                    parent, fid, kind, ..
                } => LogOp::Create {
                    parent,
                    name: new_name.clone(),
                    fid,
                    kind,
                },
                // The conflict name is free: nothing there to replace.
                LogOp::Rename {
                    from_parent,
                    from_name,
                    fid,
                    to_parent,
                    ..
                } => LogOp::Rename {
                    from_parent,
                    from_name,
                    fid,
                    to_parent,
                    to_name: new_name.clone(),
                    replaced: None,
                },
                other => other,
            };
            tx.log_rewrite(seq, rewritten)?;
            // Later records that start from the old name (a rename or the
            // removal of it) now start from the new one.
            let later: Vec<u64> = tx
                .object(fid)?
                .log
                .ops
                .iter()
                .copied()
                .filter(|s| *s > seq)
                .collect();
            for later_seq in later {
                let Some(rec) = tx.log_record(later_seq)? else {
                    continue;
                };
                let moved = match rec.op {
                    LogOp::Rename {
                        from_parent,
                        from_name,
                        fid,
                        to_parent,
                        to_name,
                        replaced,
                    } if from_parent == dir && from_name == name => Some(LogOp::Rename {
                        from_parent,
                        from_name: new_name.clone(),
                        fid,
                        to_parent,
                        to_name,
                        replaced,
                    }),
                    LogOp::Remove {
                        parent,
                        name: n,
                        fid,
                    } if parent == dir && n == name => Some(LogOp::Remove {
                        parent,
                        name: new_name.clone(),
                        fid,
                    }),
                    _ => None,
                };
                if let Some(op) = moved {
                    tx.log_rewrite(later_seq, op)?;
                }
            }
            // Here, the object takes the new name only if it is still at
            // the old one (it may have moved on, or been removed, since).
            if tx.lookup(dir, &name)? == Some(fid) {
                tx.unlink(dir, &name)?;
                tx.link(dir, &new_name, fid)?;
                let mut obj = tx.object(fid)?;
                obj.parent = dir;
                obj.name = new_name.clone();
                tx.put(fid, &obj)?;
            }
            Ok(new_name)
        })
        .await?;
    vfs.log_changed.notify_one();
    Ok(new_name)
}

/// Puts the origin's object `theirs` at `dir/name` in the cache (or, not
/// knowing it, makes the directory list itself again).
async fn restore_entry(
    vfs: &Vfs,
    dir: FileId,
    name: &str,
    theirs: Option<&wire::Attr>,
) -> Result<(), VfsError> {
    let name = name.to_owned();
    let theirs = theirs.cloned();
    vfs.writer
        .run(0, move |tx| {
            let Some(mut dir_obj) = tx.get(dir)? else {
                return Ok(());
            };
            if let Some(attr) = theirs
                && tx.lookup(dir, &name)?.is_none()
            {
                let removed = match tx.by_origin(attr.id)? {
                    Some(fid) => Some(fid).zip(tx.get(fid)?.filter(|o| o.removed)),
                    None => None,
                };
                if let Some((fid, mut obj)) = removed {
                    // Removed here and kept for the log: bring it back.
                    // Refreshed while still removed, so that one a pending
                    // record names (a move replaces it) keeps the version
                    // that record is based on: the move must still see
                    // that theirs changed. Resync brings the rest.
                    coherence::refresh(tx, fid, &mut obj, &attr, Source::Fetch)?;
                    obj.removed = false;
                    if obj.kind == Kind::File && obj.log.store.is_none() {
                        // What it held here went with the remove (writes
                        // of ours the remove made moot among it): it reads
                        // as the origin has it.
                        tx.drop_data(fid)?;
                        obj.attrs.size = attr.size;
                        obj.origin_extent = attr.size;
                    }
                    obj.parent = dir;
                    obj.name = name.clone();
                    tx.put(fid, &obj)?;
                    tx.link(dir, &name, fid)?;
                } else {
                    coherence::upsert_entry(tx, dir, &name, &attr, Source::Fetch)?;
                }
            }
            dir_obj.listed = false;
            tx.put(dir, &dir_obj)?;
            Ok(())
        })
        .await
}

/// Our object `fid` takes over the origin's object `theirs` at its name:
/// a directory merges, a file's create becomes an upload over theirs.
async fn adopt(
    vfs: &Vfs,
    seq: u64,
    fid: FileId,
    theirs: &wire::Attr,
    is_dir: bool,
) -> Result<(), VfsError> {
    let theirs = theirs.clone();
    vfs.writer
        .run(0, move |tx| {
            let mut obj = tx.object(fid)?;
            obj.origin = Some(OriginRef {
                id: theirs.id,
                version: theirs.version,
            });
            if is_dir {
                obj.listed = false;
                tx.put(fid, &obj)?;
                tx.log_done(seq)?;
            } else {
                obj.origin_extent = 0;
                tx.put(fid, &obj)?;
                if obj.log.store.is_some() {
                    tx.log_done(seq)?;
                } else {
                    tx.log_rewrite(seq, LogOp::Store { fid })?;
                }
                // An upload replaces only the content: our file's mode goes
                // over theirs too.
                if obj.attrs.mode != theirs.mode {
                    let set = imz_cache::SetAttrs {
                        mode: Some(obj.attrs.mode),
                        ..Default::default()
                    };
                    tx.log(LogOp::SetAttr { fid, set }, now_nanos())?;
                }
            }
            Ok(())
        })
        .await?;
    vfs.log_changed.notify_one();
    Ok(())
}

/// Whether the origin's object `origin_id` is one this gateway holds
/// alive, other than ours (`fid`): we never removed or replaced it, so
/// at the name we take it is not a rival of ours but one of our own files
/// (moved there at the origin, or kept there when our move of it did not
/// happen; maybe with our own version, sent just before). Gateway-wins
/// must not replace it.
fn held_here(vfs: &Vfs, origin_id: u64, fid: FileId) -> Result<bool, VfsError> {
    let rx = vfs.cache.read()?;
    let Some(here) = rx.by_origin(origin_id)? else {
        return Ok(false);
    };
    Ok(here != fid && rx.get(here)?.is_some_and(|obj| !obj.removed))
}

/// Gateway-wins for a rename onto a name the origin has taken: the rename
/// replaces the origin's object there.
async fn replace_at_rename(
    vfs: &Vfs,
    seq: u64,
    record: &LogRecord,
    theirs: &wire::Attr,
) -> Result<(), VfsError> {
    let LogOp::Rename {
        from_parent,
        from_name,
        fid,
        to_parent,
        to_name,
        ..
    } = record.op.clone()
    else {
        return Ok(());
    };
    let theirs = theirs.clone();
    vfs.writer
        .run(0, move |tx| {
            // A removed stand-in for their object, kept while the log needs it.
            match tx.get(theirs.id)? {
                None => {
                    let mut stand_in = coherence::new_object(to_parent, &to_name, &theirs);
                    stand_in.removed = true;
                    tx.put(theirs.id, &stand_in)?;
                }
                // The one we replaced here, at the version we saw: ours
                // goes over the version they have now.
                Some(mut replaced) => {
                    replaced.origin = Some(OriginRef {
                        id: theirs.id,
                        version: theirs.version,
                    });
                    tx.put(theirs.id, &replaced)?;
                }
            }
            tx.log_rewrite(
                seq,
                LogOp::Rename {
                    from_parent,
                    from_name,
                    fid,
                    to_parent,
                    to_name,
                    replaced: Some(theirs.id),
                },
            )?;
            Ok(())
        })
        .await?;
    vfs.log_changed.notify_one();
    Ok(())
}

/// Origin-wins for a rename onto a taken name: ours goes back to where it
/// was (or beside it, if that name is taken now).
async fn move_back(
    vfs: &Vfs,
    fid: FileId,
    from_parent: FileId,
    from_name: &str,
    to_parent: FileId,
    to_name: &str,
    gateway_id: &str,
) -> Result<(), VfsError> {
    let (from_name, to_name) = (from_name.to_owned(), to_name.to_owned());
    let (gateway_id, now) = (gateway_id.to_owned(), now_nanos());
    vfs.writer
        .run(0, move |tx| {
            tx.unlink_if(to_parent, &to_name, fid)?;
            let mut obj = tx.object(fid)?;
            if obj.removed {
                // Removed here since: it goes back to where its remove
                // now finds it, under no name.
                obj.parent = from_parent;
                obj.name = from_name;
                tx.put(fid, &obj)?;
                return Ok(());
            }
            let name = if tx.lookup(from_parent, &from_name)?.is_none() {
                from_name
            } else {
                free_conflict_name(tx, from_parent, &from_name, &gateway_id, now)?
            };
            tx.link(from_parent, &name, fid)?;
            obj.parent = from_parent;
            obj.name = name;
            tx.put(fid, &obj)?;
            Ok(())
        })
        .await
}

/// The origin's name stays for our `fid`: it goes where the origin has
/// it, at once if the log no longer needs it (else resync takes it there
/// later, as it does if asking fails now). Forgetting it would do for
/// the names it leaves, not for the one it has at the origin: the follower
/// left that name to ours, and nothing would link it again.
async fn take_origin_place(vfs: &Vfs, fid: FileId, dirs: &[FileId]) -> Result<(), VfsError> {
    if vfs.origin.knows_places() {
        if let Err(e) = crate::resync::place_one(vfs, fid).await {
            tracing::warn!(fid, error = %e, "placing as at the origin: left for resync");
        }
        Ok(())
    } else {
        forget_location(vfs, fid, dirs).await
    }
}

/// With an origin that cannot say where an object is: forget `fid`'s
/// place here and let the directories list themselves again.
async fn forget_location(vfs: &Vfs, fid: FileId, dirs: &[FileId]) -> Result<(), VfsError> {
    let dirs = dirs.to_vec();
    vfs.writer
        .run(0, move |tx| {
            // A directory holding changes stays (resync places it later).
            if let Some(obj) = tx.get(fid)?
                && !tx.holds_changes(fid)?
            {
                tx.unlink_if(obj.parent, &obj.name, fid)?;
                tx.remove_tree(fid)?;
            }
            for d in dirs {
                if let Some(mut o) = tx.get(d)? {
                    o.listed = false;
                    tx.put(d, &o)?;
                }
            }
            Ok(())
        })
        .await
}

/// Whether `current`, the origin's answer to rename `op`, is the object
/// the rename replaces (changed there since), not the one it moves.
fn replaced_changed(vfs: &Vfs, op: &LogOp, current: Option<&wire::Attr>) -> bool {
    let (
        LogOp::Rename {
            replaced: Some(replaced),
            ..
        },
        Some(current),
    ) = (op, current)
    else {
        return false;
    };
    vfs.getattr(*replaced)
        .ok()
        .and_then(|obj| obj.origin)
        .is_some_and(|o| o.id == current.id)
}

/// The pending record after `seq` that removes `obj`, if any.
/// (`log_record` reads a record, from a read or a write transaction.)
fn later_remove(
    obj: &Object,
    seq: u64,
    log_record: impl Fn(u64) -> imz_cache::Result<Option<LogRecord>>,
) -> Result<Option<u64>, VfsError> {
    for later in obj.log.ops.iter().copied().filter(|s| *s > seq) {
        if log_record(later)?.is_some_and(|r| matches!(r.op, LogOp::Remove { .. })) {
            return Ok(Some(later));
        }
    }
    Ok(None)
}

/// The origin's attributes of cached object `fid`, if the origin still has it.
async fn alive_at_origin(vfs: &Vfs, fid: FileId) -> Result<Option<wire::Attr>, VfsError> {
    let Some(origin) = vfs.getattr(fid).ok().and_then(|o| o.origin) else {
        return Ok(None);
    };
    match vfs.origin.getattr(origin.id).await {
        Ok(attr) => Ok(Some(attr)),
        Err(e) if e.code() == Some(wire::ErrorCode::NotFound) => Ok(None),
        Err(e) => Err(vfs.origin_failed(e)),
    }
}

/// Whether cached object `fid`, known at the origin, is gone there.
async fn gone_at_origin(vfs: &Vfs, fid: FileId) -> Result<bool, VfsError> {
    let known = vfs.getattr(fid)?.origin.is_some();
    Ok(known && alive_at_origin(vfs, fid).await?.is_none())
}

/// Directory `dir` is gone at the origin but we still have entries for it:
/// create it (and any missing ancestors) there again, outside the log.
async fn recreate_dir_chain(vfs: &Vfs, gateway_id: &str, dir: FileId) -> Result<(), VfsError> {
    // Walk up to the nearest ancestor the origin still has.
    let mut chain = Vec::new();
    let mut cur = dir;
    loop {
        let obj = vfs.getattr(cur)?;
        let alive = obj.origin.is_some() && !gone_at_origin(vfs, cur).await?;
        if alive || cur == imz_cache::ROOT_FILEID {
            break;
        }
        chain.push((cur, obj));
        cur = chain.last().map_or(cur, |(_, o)| o.parent);
    }
    for (fid, obj) in chain.into_iter().rev() {
        let parent = vfs.getattr(obj.parent)?;
        let parent_id = parent
            .origin
            .ok_or_else(|| VfsError::Io("parent has no origin id".into()))?
            .id;
        // Its name may hold something else now (a file made there since):
        // the directory comes back under a conflict name beside it.
        let now = now_nanos();
        let mut n = 0;
        let (attr, name) = loop {
            let name = match n {
                0 => obj.name.clone(),
                n => conflict_name(&obj.name, gateway_id, now, n),
            };
            let batch = wire::Batch {
                ops: vec![wire::KeyedOp {
                    key: format!("{gateway_id}-recreate-{fid}-{now}-{n}"),
                    op: wire::Op::Create {
                        parent: wire::ObjRef::Id(parent_id),
                        name: name.clone(),
                        object: wire::NewObject::Dir,
                        attrs: wire::SetAttrs {
                            mode: Some(obj.attrs.mode),
                            ..Default::default()
                        },
                    },
                }],
            };
            let answer = vfs
                .origin
                .reintegrate(&batch)
                .await
                .map_err(|e| vfs.origin_failed(e))?;
            match answer.results.first() {
                Some(OpResult::Applied { attr, .. } | OpResult::Replayed { attr, .. }) => {
                    break (attr.clone(), name);
                }
                Some(OpResult::Conflict(c)) if c.reason == ConflictReason::NameExists => {
                    match &c.current {
                        Some(a) if a.kind == wire::Kind::Dir => break (a.clone(), name),
                        _ if n < MAX_COPIES => {
                            n += 1;
                            continue;
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            return Err(VfsError::Io(format!(
                "could not create {} again: {:?}",
                obj.name,
                answer.results.first()
            )));
        };
        vfs.writer
            .run(0, move |tx| {
                let mut o = tx.object(fid)?;
                o.origin = Some(OriginRef {
                    id: attr.id,
                    version: attr.version,
                });
                if o.name != name {
                    tx.unlink_if(o.parent, &o.name, fid)?;
                    if let Some(mut dir) = tx.get(o.parent)? {
                        // The name it leaves is the origin's now.
                        dir.listed = false;
                        tx.put(o.parent, &dir)?;
                    }
                    o.name = name.clone();
                    if !o.removed {
                        tx.link(o.parent, &name, fid)?;
                    }
                }
                if o.removed {
                    o.removed = false;
                    if tx.lookup(o.parent, &o.name)?.is_none() {
                        tx.link(o.parent, &o.name, fid)?;
                    }
                }
                tx.put(fid, &o)?;
                Ok(())
            })
            .await?;
    }
    vfs.log_changed.notify_one();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_are_valid_and_dated() {
        // 2026-11-25T13:31:44Z
        let t = 1_795_613_504 * 1_000_000_000;
        let n = conflict_name("report.txt", "0123456789abcdef", t, 1);
        assert_eq!(n, "report.txt.conflict-01234567-20261125T133144");
        let second = conflict_name("report.txt", "0123456789abcdef", t, 2);
        assert_eq!(second, "report.txt.conflict-01234567-20261125T133144-2");
        for n in [1, 2, MAX_COPIES] {
            let long = conflict_name(&"x".repeat(255), "gw", t, n);
            assert!(long.len() <= wire::MAX_NAME_LEN);
            assert!(wire::validate_name(&long, false).is_ok());
        }
    }
}
