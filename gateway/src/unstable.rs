//! The unstable-write log: how a WRITE can be answered `UNSTABLE` without
//! waiting for an fsync, and still never lose a byte the client was told
//! is safe.
//!
//! An unstable WRITE goes into the cache in a non-durable redb commit (a
//! crash of the gateway process rolls redb back to its last durable
//! commit) and is appended here, to a plain file, without fsync. A file's
//! bytes live in the kernel's page cache, which outlives the process: after
//! `kill -9` the gateway replays every write newer than the durable state
//! ([`meta::UNSTABLE_SEQ`]) and the client's COMMIT, answered with the same
//! verifier, finds its data there.
//!
//! A COMMIT puts the writes on disk with an fdatasync of this log (cheaper
//! than a durable redb commit, which writes every b-tree page the writes
//! touched), so recovery replays the log after any crash, of the process
//! or of the system.
//!
//! Only a crash of the whole system loses the page cache, and with it the
//! writes acknowledged since the last sync. Before the first unstable reply
//! the writer durably records the boot id ([`meta::UNSTABLE_BOOT`]); it is
//! cleared once everything is durable again (idle, or a clean stop).
//! Finding it set under another boot id means acknowledged unstable data
//! may be gone: after replaying what the disk kept, the cache takes a new
//! handle generation, so the write verifier changes as NFSv3 requires (and,
//! since nfs3_server ties the two together, old file handles go stale, so
//! the client reports an error instead of losing data silently).
//!
//! Invariants:
//! - every change appended here was applied, in the same order, to a redb
//!   transaction carrying its sequence number in `UNSTABLE_SEQ`;
//! - only changes whose outcome depends on nothing a crash may undo besides
//!   what this log holds are logged: not on cached origin data (the
//!   storer's lazy commits), so a write or a truncation only of a file that
//!   holds all its data; a create is replayed under the fileid it first
//!   got (other lazy commits may have handed out ids). The writer makes any
//!   other change durable, so replaying the log on the durable state
//!   reproduces exactly what was acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imz_cache::{Cache, FileId, meta};

/// The log file, in the cache directory.
pub const LOG_FILE: &str = "imz-unstable.log";
/// Record marker of a write, "IMZU".
const MAGIC_WRITE: u32 = 0x495a_4d55;
/// Record marker of any other change, "IMZO".
const MAGIC_OP: u32 = 0x495a_4d4f;
/// magic, crc, seq, fid, offset, time, len.
const HEADER_LEN: usize = 4 + 4 + 8 + 8 + 8 + 8 + 4;
/// Largest record payload accepted when reading (a WRITE is at most a few
/// MiB; anything bigger is garbage).
const MAX_RECORD: usize = 64 << 20;

/// One unstable WRITE, as applied to the cache.
#[derive(Debug, Clone)]
pub struct UnstableWrite {
    pub fid: FileId,
    pub offset: u64,
    /// The mtime/ctime the write gave the file.
    pub mtime: i64,
    pub data: Arc<Vec<u8>>,
}

/// A change the log carries until the cache has it durably.
#[derive(Debug, Clone)]
pub enum Change {
    /// A WRITE into a file whose data is all local.
    Write(UnstableWrite),
    /// Any other change that replays from its arguments alone (CREATE,
    /// MKDIR, SYMLINK, SETATTR, REMOVE, RENAME): its arguments, as the VFS
    /// encodes them, the time it used, and the fileid it made or changed
    /// (a replayed create must hand out the same).
    Op {
        fid: FileId,
        now: i64,
        args: Arc<Vec<u8>>,
    },
}

impl Change {
    /// Marker, fid, offset, time and payload of its record.
    fn parts(&self) -> (u32, FileId, u64, i64, &[u8]) {
        match self {
            Self::Write(w) => (MAGIC_WRITE, w.fid, w.offset, w.mtime, &w.data),
            Self::Op { fid, now, args } => (MAGIC_OP, *fid, 0, *now, args),
        }
    }

    /// Bytes of file data it writes.
    pub fn data_len(&self) -> u64 {
        match self {
            Self::Write(w) => w.data.len() as u64,
            Self::Op { .. } => 0,
        }
    }

    /// The file whose data it writes.
    pub fn written_file(&self) -> Option<FileId> {
        match self {
            Self::Write(w) => Some(w.fid),
            Self::Op { .. } => None,
        }
    }
}

/// A logged change and its sequence number.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub change: Change,
}

impl Record {
    /// Bytes it takes in the log.
    pub fn log_len(&self) -> u64 {
        (HEADER_LEN + self.change.parts().4.len()) as u64
    }
}

/// This system's boot id: unstable replies are only safe when a change of
/// it can be seen. `IMZ_TEST_BOOT_ID` stands in for it in crash tests (a
/// test cannot reboot the machine).
pub fn boot_id() -> Option<String> {
    if let Some(id) = std::env::var_os("IMZ_TEST_BOOT_ID") {
        return Some(id.to_string_lossy().into_owned());
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The append side, owned by the log thread.
///
/// Emptying the log does not truncate the file: writing starts again at
/// its beginning, over pages the kernel already holds (about three times
/// cheaper than appending fresh ones). What lies past the last record is
/// older, already durable, and skipped on replay by its sequence number.
pub struct UnstableLog {
    file: File,
    /// Where the next record goes.
    pos: u64,
    /// The file's length: appends below it overwrite blocks the file has.
    len: u64,
}

/// The log grows by this much of zeros at a time, so that an append
/// overwrites blocks the file already has: a sync then writes the records
/// alone, where growing the file made every sync write the inode and the
/// block map too.
pub const GROW_STEP: u64 = 4 << 20;

impl UnstableLog {
    /// Opens the log to write from its start (recovery has emptied it).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(LOG_FILE))?;
        let len = file.metadata()?.len();
        Ok(Self { file, pos: 0, len })
    }

    /// Makes the file at least `end` long, with zeros (which end the log
    /// on replay, as a record's magic cannot be zero).
    fn reserve(&mut self, end: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if end <= self.len {
            return Ok(());
        }
        let target = end.div_ceil(GROW_STEP) * GROW_STEP;
        let zeros = vec![0u8; 1 << 20];
        let mut at = self.len;
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.len = target;
        Ok(())
    }

    /// Appends `records`, in order. No fsync: see the module comment.
    pub fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        // A record cut short by a failure here fails its checksum on
        // replay, which stops there; the next append overwrites it. The
        // data goes from the client's buffer, not through a copy.
        let total: u64 = records.iter().map(Record::log_len).sum();
        self.reserve(self.pos + total)?;
        let mut pos = self.pos;
        for r in records {
            let header = encode_header(r)?;
            let payload = r.change.parts().4;
            self.file.write_all_at(&header, pos)?;
            self.file.write_all_at(payload, pos + HEADER_LEN as u64)?;
            pos += (HEADER_LEN + payload.len()) as u64;
        }
        self.pos = pos;
        Ok(())
    }

    /// Starts the log again from the beginning (everything in it is
    /// durable in the cache).
    pub fn reset(&mut self) {
        self.pos = 0;
    }
}

/// The log, appended to on a thread of its own when a batch is big, so
/// that the append overlaps with the redb commit of the same batch; a
/// small batch is appended on the caller's thread (handing it over and
/// back cost more than the append).
pub struct LogThread {
    log: Arc<std::sync::Mutex<UnstableLog>>,
    queue: std::sync::mpsc::Sender<(
        Vec<Record>,
        std::sync::mpsc::SyncSender<std::io::Result<()>>,
    )>,
    /// The same file, for [`LogThread::sync`] without taking the lock.
    file: File,
    /// Where the last append started, for [`LogThread::rollback`].
    before: Arc<std::sync::atomic::AtomicU64>,
}

/// Batches with less payload than this are appended in place.
const APPEND_IN_PLACE: u64 = 256 << 10;

/// An append under way.
pub struct PendingAppend(std::sync::mpsc::Receiver<std::io::Result<()>>);

impl PendingAppend {
    pub fn wait(self) -> std::io::Result<()> {
        self.0
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("unstable-write log thread stopped")))
    }
}

fn lock_log(log: &std::sync::Mutex<UnstableLog>) -> std::sync::MutexGuard<'_, UnstableLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

impl LogThread {
    pub fn start(log: UnstableLog) -> std::io::Result<Self> {
        let file = log.file.try_clone()?;
        let before = Arc::new(std::sync::atomic::AtomicU64::new(log.pos));
        let log = Arc::new(std::sync::Mutex::new(log));
        let (queue, msgs) = std::sync::mpsc::channel::<(Vec<Record>, _)>();
        let shared = Arc::clone(&log);
        let mark = Arc::clone(&before);
        std::thread::Builder::new()
            .name("imz-unstable".into())
            .spawn(move || {
                for (records, done) in msgs {
                    let done: std::sync::mpsc::SyncSender<std::io::Result<()>> = done;
                    let _ = done.send(append_marking(&shared, &mark, &records));
                }
            })?;
        Ok(Self {
            log,
            queue,
            file,
            before,
        })
    }

    /// Starts appending `records`. The caller waits for it before it
    /// appends, rolls back, resets or syncs again.
    pub fn append(&self, records: Vec<Record>) -> PendingAppend {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let payload: u64 = records.iter().map(|r| r.change.data_len()).sum();
        if payload < APPEND_IN_PLACE {
            let _ = done.send(append_marking(&self.log, &self.before, &records));
        } else if let Err(std::sync::mpsc::SendError((_, done))) = self.queue.send((records, done))
        {
            let _ = done.send(Err(std::io::Error::other(
                "unstable-write log thread stopped",
            )));
        }
        PendingAppend(wait)
    }

    /// Undoes the last append.
    pub fn rollback(&self) {
        let before = self.before.load(std::sync::atomic::Ordering::Acquire);
        rollback(&mut lock_log(&self.log), before);
    }

    /// Starts the log over; everything in it must be durable in the cache.
    pub fn reset(&self) {
        lock_log(&self.log).reset();
    }

    /// Puts every record appended so far on disk (an NFS COMMIT of writes
    /// the log holds). The caller must have waited for those appends.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

fn append_marking(
    log: &std::sync::Mutex<UnstableLog>,
    before: &std::sync::atomic::AtomicU64,
    records: &[Record],
) -> std::io::Result<()> {
    let mut log = lock_log(log);
    before.store(log.pos, std::sync::atomic::Ordering::Release);
    log.append(records)
}

/// Undoes the append that started at `before`: its records were for a
/// transaction that failed, so they must never be replayed.
fn rollback(log: &mut UnstableLog, before: u64) {
    use std::os::unix::fs::FileExt;
    // A zero where the first record's magic was ends the log there.
    if let Err(e) = log.file.write_all_at(&[0u8; 4], before) {
        tracing::error!(error = %e, "could not undo an unstable-write log append");
    }
    log.pos = before;
}

fn encode_header(r: &Record) -> std::io::Result<[u8; HEADER_LEN]> {
    let (magic, fid, offset, time, payload) = r.change.parts();
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_RECORD)
        .ok_or_else(|| std::io::Error::other("write too large for the unstable log"))?;
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&magic.to_le_bytes());
    header[8..16].copy_from_slice(&r.seq.to_le_bytes());
    header[16..24].copy_from_slice(&fid.to_le_bytes());
    header[24..32].copy_from_slice(&offset.to_le_bytes());
    header[32..40].copy_from_slice(&time.to_le_bytes());
    header[40..44].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[8..]);
    crc.update(payload);
    let crc = crc.finalize();
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(header)
}

/// Every whole record in the log, up to the first torn or damaged one.
pub fn read(path: &Path) -> std::io::Result<Vec<Record>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut records = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    loop {
        match input.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let field = |at: usize| -> [u8; 8] {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            b
        };
        let word = |at: usize| -> [u8; 4] {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[at..at + 4]);
            b
        };
        let magic = u32::from_le_bytes(word(0));
        if magic != MAGIC_WRITE && magic != MAGIC_OP {
            break;
        }
        let crc = u32::from_le_bytes(word(4));
        let len = u32::from_le_bytes(word(40)) as usize;
        if len > MAX_RECORD {
            break;
        }
        let mut data = vec![0u8; len];
        match input.read_exact(&mut data) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let mut check = crc32fast::Hasher::new();
        check.update(&header[8..]);
        check.update(&data);
        if check.finalize() != crc {
            break;
        }
        let (fid, time, data) = (
            u64::from_le_bytes(field(16)),
            i64::from_le_bytes(field(32)),
            Arc::new(data),
        );
        let change = match magic {
            MAGIC_OP => Change::Op {
                fid,
                now: time,
                args: data,
            },
            _ => Change::Write(UnstableWrite {
                fid,
                offset: u64::from_le_bytes(field(24)),
                mtime: time,
                data,
            }),
        };
        records.push(Record {
            seq: u64::from_le_bytes(field(8)),
            change,
        });
    }
    Ok(records)
}

/// What start-up recovery did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Unstable writes applied again from the log.
    pub replayed: usize,
    /// Unstable writes may have been lost; the handle generation changed.
    pub generation_renewed: bool,
}

/// Brings the cache back to every write acknowledged before a crash, or,
/// when that cannot be known, changes the handle generation. Runs before
/// anything else uses the cache. `apply` replays one write in a transaction
/// (the same code path as a live WRITE).
pub fn recover(
    cache: &mut Cache,
    dir: &Path,
    boot: Option<&str>,
    apply: impl Fn(&mut imz_cache::WriteTxn<'_>, &Change) -> Result<(), String>,
) -> anyhow::Result<Recovery> {
    use anyhow::Context;
    let path: PathBuf = dir.join(LOG_FILE);
    let (through, mark) = {
        let rx = cache.read()?;
        (
            rx.meta_u64(meta::UNSTABLE_SEQ)?.unwrap_or(0),
            rx.meta_str(meta::UNSTABLE_BOOT)?.filter(|b| !b.is_empty()),
        )
    };
    let mut recovery = Recovery::default();
    let mut last = through;
    match mark {
        // Nothing unstable was outstanding: the log holds nothing newer
        // than the durable state.
        None => {}
        Some(marked) => {
            let same_boot = boot == Some(marked.as_str());
            if !same_boot {
                // The page cache is gone: the log holds what a COMMIT
                // synced, and perhaps more; writes after the last sync may
                // be lost.
                tracing::warn!(
                    then = %marked,
                    now = boot.unwrap_or("unknown"),
                    "the system restarted while writes were acknowledged as unstable"
                );
                recovery.generation_renewed = true;
            }
            let records = read(&path).with_context(|| format!("reading {}", path.display()))?;
            // Sequence numbers the next run hands out must be new to the
            // log even where these records are not replayed.
            let newest = records.iter().map(|r| r.seq).max().unwrap_or(0);
            let mut tx = cache.write()?;
            let mut lost = false;
            for r in records.iter().filter(|r| r.seq > through) {
                if r.seq != last + 1 {
                    // After a system crash the log ends where the disk has
                    // it: records after a missing one were never synced.
                    if same_boot {
                        tracing::error!(
                            expected = last + 1,
                            found = r.seq,
                            "unstable-write log has a gap"
                        );
                    }
                    lost = true;
                    break;
                }
                if let Err(e) = apply(&mut tx, &r.change) {
                    tracing::error!(seq = r.seq, fid = r.change.parts().1, error = %e,
                        "a logged change cannot be applied again");
                    lost = true;
                    break;
                }
                last = r.seq;
                recovery.replayed += 1;
            }
            if lost {
                // Keep what did apply: it is what clients wrote.
                recovery.generation_renewed = true;
                last = last.max(newest);
            }
            tx.put_meta_u64(meta::UNSTABLE_SEQ, last)?;
            tx.commit(true)?;
        }
    }
    if recovery.generation_renewed {
        // An upload already on its way may have carried bytes of the lost
        // writes: the origin could end up holding content this cache no
        // longer has. Each such file is uploaded again as it is now.
        let again = store_shipped_files_again(cache)?;
        if again > 0 {
            tracing::warn!(
                files = again,
                "files in flight to the origin will be uploaded again"
            );
        }
        let generation = cache.renew_generation()?;
        tracing::warn!(
            generation,
            "unstable writes may have been lost: new file handle generation and write verifier \
             (clients see stale handles and report the loss instead of hiding it)"
        );
    }
    let mut tx = cache.write()?;
    tx.put_meta(meta::UNSTABLE_BOOT, b"")?;
    tx.put_meta_u64(meta::UNSTABLE_SEQ, last)?;
    tx.commit(true)?;
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.set_len(0)?;
    file.sync_all()?;
    if recovery.replayed > 0 {
        tracing::info!(
            writes = recovery.replayed,
            "unstable writes applied again after a crash"
        );
    }
    Ok(recovery)
}

/// Logs a new store for every file whose store is shipped (possibly at
/// the origin) but not yet acknowledged; returns how many.
fn store_shipped_files_again(cache: &Cache) -> imz_cache::Result<usize> {
    let fids: std::collections::BTreeSet<FileId> = {
        let rx = cache.read()?;
        let mut fids = std::collections::BTreeSet::new();
        for (_, bytes) in rx.log_records(0, usize::MAX)? {
            let record = imz_cache::log::decode(&bytes)?;
            if let (true, imz_cache::LogOp::Store { fid }) = (record.shipped, &record.op) {
                fids.insert(*fid);
            }
        }
        fids
    };
    let mut tx = cache.write()?;
    let mut count = 0;
    for fid in fids {
        if tx.get(fid)?.is_some_and(|o| !o.removed) {
            tx.log(
                imz_cache::LogOp::Store { fid },
                crate::vfs::write::now_nanos(),
            )?;
            count += 1;
        }
    }
    tx.commit(true)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, data: &[u8]) -> Record {
        Record {
            seq,
            change: Change::Write(UnstableWrite {
                fid: 7,
                offset: seq * 10,
                mtime: -5,
                data: Arc::new(data.to_vec()),
            }),
        }
    }

    #[test]
    fn records_read_back_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = UnstableLog::open(dir.path()).expect("open");
        let create = Record {
            seq: 3,
            change: Change::Op {
                fid: 1 << 48,
                now: 12,
                args: Arc::new(b"{}".to_vec()),
            },
        };
        log.append(&[rec(1, b"one"), rec(2, b"")]).expect("append");
        log.append(&[create, rec(4, &[9u8; 5000])]).expect("append");
        let path = dir.path().join(LOG_FILE);
        let all = read(&path).expect("read");
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(all[0].change.parts().4, b"one");
        assert!(matches!(
            &all[2].change,
            Change::Op { fid, now: 12, args } if *fid == 1 << 48 && args.as_slice() == b"{}"
        ));
        assert_eq!((all[3].change.parts().2, all[3].change.parts().3), (40, -5));
        // The file grew ahead of the records, with zeros, which end the log.
        assert!(std::fs::metadata(&path).expect("len").len() >= GROW_STEP);

        // A crash in the middle of the last record.
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0u8; 100], log.pos - 100).expect("tear");
        assert_eq!(read(&path).expect("read").len(), 3);

        // A damaged byte ends the log there.
        let mut bytes = std::fs::read(&path).expect("bytes");
        bytes[HEADER_LEN + 1] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        assert!(read(&path).expect("read").is_empty());
    }

    fn stores(cache: &Cache) -> Vec<(u64, bool)> {
        let rx = cache.read().expect("read");
        rx.log_records(0, usize::MAX)
            .expect("log")
            .into_iter()
            .map(|(seq, b)| (seq, imz_cache::log::decode(&b).expect("decode").shipped))
            .collect()
    }

    #[test]
    fn another_boot_renews_the_generation_and_uploads_in_flight_again() {
        use imz_cache::{Attrs, Kind, LogOp, Object, OriginRef, ROOT_FILEID};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = Cache::open(dir.path(), 64 << 20).expect("open");
        let before = cache.generation();
        let fid = 1000;
        let mut tx = cache.write().expect("write");
        let attrs = Attrs {
            mode: 0o644,
            nlink: 1,
            ..Attrs::default()
        };
        let obj = Object {
            origin: Some(OriginRef { id: 5, version: 1 }),
            ..Object::new(Kind::File, ROOT_FILEID, "f".into(), attrs)
        };
        tx.put(fid, &obj).expect("put");
        let seq = tx
            .log(LogOp::Store { fid }, 1)
            .expect("log")
            .expect("a record");
        tx.commit(true).expect("commit");
        let (_, bytes) = cache
            .read()
            .expect("read")
            .log_records(seq, 1)
            .expect("log")[0]
            .clone();
        let mut tx = cache.write().expect("write");
        assert!(tx.log_mark_shipped(seq, &bytes).expect("mark"));
        tx.put_meta(meta::UNSTABLE_BOOT, b"boot-a").expect("meta");
        tx.commit(true).expect("commit");

        // Same boot: nothing was lost, nothing changes.
        let same = recover(&mut cache, dir.path(), Some("boot-a"), |_, _| Ok(()));
        assert_eq!(same.expect("recover"), Recovery::default());
        assert_eq!(cache.generation(), before);

        let mut tx = cache.write().expect("write");
        tx.put_meta(meta::UNSTABLE_BOOT, b"boot-a").expect("meta");
        tx.commit(true).expect("commit");
        let other = recover(&mut cache, dir.path(), Some("boot-b"), |_, _| Ok(()));
        assert!(other.expect("recover").generation_renewed);
        assert!(cache.generation() > before);
        // The shipped store stays; a new one will carry the content as the
        // cache has it.
        assert_eq!(stores(&cache), [(seq, true), (seq + 1, false)]);
    }

    #[test]
    fn another_boot_replays_what_the_log_kept_and_still_renews_the_generation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = Cache::open(dir.path(), 64 << 20).expect("open");
        let before = cache.generation();
        let mut tx = cache.write().expect("write");
        tx.put_meta_u64(meta::UNSTABLE_SEQ, 4).expect("meta");
        tx.put_meta(meta::UNSTABLE_BOOT, b"boot-a").expect("meta");
        tx.commit(true).expect("commit");
        // Records 3 and 4 are in the durable state already; 5 and 6 were
        // synced by a COMMIT; 8 follows a record the crash lost.
        let mut log = UnstableLog::open(dir.path()).expect("open");
        let seqs = [3, 4, 5, 6, 8];
        log.append(&seqs.map(|s| rec(s, b"data"))).expect("append");
        drop(log);

        let applied = std::sync::Mutex::new(Vec::new());
        let recovery = recover(&mut cache, dir.path(), Some("boot-b"), |_, c| {
            applied.lock().expect("lock").push(c.parts().2);
            Ok(())
        })
        .expect("recover");
        assert_eq!(applied.into_inner().expect("lock"), [50, 60]);
        assert_eq!(recovery.replayed, 2);
        assert!(recovery.generation_renewed);
        assert!(cache.generation() > before);
        // The next run's numbers start past everything the log held.
        let rx = cache.read().expect("read");
        assert_eq!(rx.meta_u64(meta::UNSTABLE_SEQ).expect("meta"), Some(8));
    }

    #[test]
    fn a_reset_log_starts_over_and_older_records_past_it_stay_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LOG_FILE);
        let mut log = UnstableLog::open(dir.path()).expect("open");
        log.append(&[rec(1, &[1u8; 100]), rec(2, &[2u8; 100])])
            .expect("append");
        log.append(&[rec(3, b"x")]).expect("append");
        assert_eq!(read(&path).expect("read").len(), 3);
        log.reset();
        log.append(&[rec(4, &[4u8; 100])]).expect("append");
        // Record 4 took record 1's place exactly; 2 and 3 follow, older.
        let seqs: Vec<u64> = read(&path).expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [4, 2, 3]);
        // An undone append ends the log where it started.
        let before = log.pos;
        log.append(&[rec(5, b"y")]).expect("append");
        rollback(&mut log, before);
        let seqs: Vec<u64> = read(&path).expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [4]);
    }
}
