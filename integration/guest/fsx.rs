//! imz-guest-fsx: a randomized file checker in the spirit of fsx, run inside
//! the test guest against a file on the NFS mount (and usable anywhere).
//!
//!   imz-guest-fsx read FILE SEED LEN OPS [RNG]
//!       FILE must hold `imz_integration::data::bytes(SEED, LEN)` (the host
//!       wrote it at the origin). OPS random operations: reads at random
//!       offsets and lengths (across and past EOF), sequential runs, reopen,
//!       size checks, and now and then a drop of the guest's page cache so
//!       reads go back over NFS.
//!   imz-guest-fsx rw FILE SIZE OPS [RNG]
//!       Creates FILE and runs random writes, extending writes, truncates
//!       (shrinking and growing), fsyncs and reads, each checked against an
//!       in-memory copy. Needs a writable mount.
//!   imz-guest-fsx readdir DIR
//!       Lists DIR and prints the entry count, or the error (busybox `ls`
//!       and `find` treat a failing readdir as the end of the directory).
//!
//! Prints one summary line `fsx ok: ...` and exits 0, or prints the failing
//! operation, the first differing offset and the last operations, and exits
//! 1. Usage errors exit 2.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

/// xorshift64*: small, deterministic, good enough to pick offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A length: mostly small, sometimes page-sized, now and then up to
    /// 1 MiB (or `max`, if smaller).
    fn len(&mut self, max: u64) -> u64 {
        match self.below(20) {
            0..=10 => self.below(512) + 1,
            11..=17 => self.below(65_536) + 1,
            _ => self.below(max.clamp(1, 1 << 20)) + 1,
        }
    }
}

struct Checker {
    path: String,
    file: File,
    log: Vec<String>,
    bytes_read: u64,
    bytes_written: u64,
    drops: u32,
}

impl Checker {
    fn note(&mut self, op: String) {
        if self.log.len() == 32 {
            self.log.remove(0);
        }
        self.log.push(op);
    }

    fn fail(&self, what: &str) -> String {
        let mut msg = format!("fsx FAIL on {}: {what}\nlast operations:\n", self.path);
        for (i, op) in self.log.iter().enumerate() {
            msg.push_str(&format!("  {i:2}: {op}\n"));
        }
        msg
    }

    /// Reads `len` bytes at `off` and compares with `model`.
    fn check_read(&mut self, model: &[u8], off: u64, len: u64) -> Result<(), String> {
        self.note(format!("read {off} +{len}"));
        let mut buf = vec![0u8; len as usize];
        let mut got = 0usize;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(&format!("read {off} +{len}: {e}"))),
            }
        }
        self.bytes_read += got as u64;
        let start = (off as usize).min(model.len());
        let end = ((off + len) as usize).min(model.len());
        let want = &model[start..end];
        if got != want.len() {
            return Err(self.fail(&format!(
                "read {off} +{len}: got {got} bytes, want {} (file size {})",
                want.len(),
                model.len()
            )));
        }
        if let Some(i) = (0..got).find(|&i| buf[i] != want[i]) {
            return Err(self.fail(&format!(
                "read {off} +{len}: byte {} differs: got {:#04x}, want {:#04x}",
                off + i as u64,
                buf[i],
                want[i]
            )));
        }
        Ok(())
    }

    fn check_size(&mut self, model: &[u8]) -> Result<(), String> {
        self.note("fstat".into());
        let size = self
            .file
            .metadata()
            .map_err(|e| self.fail(&format!("fstat: {e}")))?
            .len();
        if size != model.len() as u64 {
            return Err(self.fail(&format!("size {size}, want {}", model.len())));
        }
        Ok(())
    }

    /// Sequential reads of the whole file in `chunk`-sized pieces.
    fn check_sequential(&mut self, model: &[u8], chunk: usize) -> Result<(), String> {
        self.note(format!("sequential read, {chunk}-byte pieces"));
        let mut f = File::open(&self.path).map_err(|e| self.fail(&format!("open: {e}")))?;
        let mut buf = vec![0u8; chunk];
        let mut off = 0usize;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| self.fail(&format!("sequential read at {off}: {e}")))?;
            if n == 0 {
                break;
            }
            if off + n > model.len() || buf[..n] != model[off..off + n] {
                return Err(self.fail(&format!("sequential read at {off} +{n} differs")));
            }
            off += n;
        }
        self.bytes_read += off as u64;
        if off != model.len() {
            return Err(self.fail(&format!(
                "sequential read ended at {off}, want {}",
                model.len()
            )));
        }
        Ok(())
    }

    fn reopen(&mut self, write: bool) -> Result<(), String> {
        self.note("reopen".into());
        self.file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&self.path)
            .map_err(|e| self.fail(&format!("reopen: {e}")))?;
        Ok(())
    }

    /// Drops the guest's page cache (root only; a no-op elsewhere) so the
    /// next reads go to the server.
    fn drop_caches(&mut self) {
        self.note("drop caches".into());
        if std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok() {
            self.drops += 1;
        }
    }
}

fn run_read(path: &str, seed: u64, len: usize, ops: u64, rng: u64) -> Result<String, String> {
    let model = imz_integration::data::bytes(seed, len);
    let file = File::open(path).map_err(|e| format!("fsx: open {path}: {e}"))?;
    let mut c = Checker {
        path: path.to_owned(),
        file,
        log: Vec::new(),
        bytes_read: 0,
        bytes_written: 0,
        drops: 0,
    };
    let mut r = Rng(rng | 1);
    let size = len as u64;
    c.check_size(&model)?;
    for _ in 0..ops {
        match r.below(1000) {
            0..=699 => {
                let off = r.below(size + 1);
                let n = r.len(size);
                c.check_read(&model, off, n)?;
            }
            700..=799 => {
                // Around EOF and past it.
                let off = size.saturating_sub(r.below(8192)) + r.below(3) * r.below(4096);
                let n = r.len(16_384);
                c.check_read(&model, off, n)?;
            }
            800..=879 => {
                // A run of adjacent reads (readahead territory).
                let mut off = r.below(size + 1);
                let n = r.below(32_768) + 1;
                for _ in 0..8 {
                    c.check_read(&model, off, n)?;
                    off += n;
                }
            }
            880..=919 => c.check_size(&model)?,
            920..=959 => c.reopen(false)?,
            960..=989 => c.drop_caches(),
            _ => {
                let chunk = [4096, 65_536, 1 << 20][r.below(3) as usize];
                c.check_sequential(&model, chunk)?;
            }
        }
    }
    Ok(format!(
        "fsx ok: read mode, {ops} ops, {} bytes read, {} cache drops, file {len} bytes",
        c.bytes_read, c.drops
    ))
}

fn run_rw(path: &str, max: usize, ops: u64, rng: u64) -> Result<String, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("fsx: create {path}: {e}"))?;
    let mut c = Checker {
        path: path.to_owned(),
        file,
        log: Vec::new(),
        bytes_read: 0,
        bytes_written: 0,
        drops: 0,
    };
    let mut model: Vec<u8> = Vec::new();
    let mut r = Rng(rng | 1);
    let max = max as u64;
    for op in 0..ops {
        match r.below(100) {
            0..=34 => {
                let size = model.len() as u64;
                let off = r.below(size + 1);
                let n = r.len(size.max(4096));
                c.check_read(&model, off, n)?;
            }
            35..=64 => {
                let off = r.below(max);
                let n = r.len(max - off).min(max - off);
                let data = imz_integration::data::bytes(rng ^ op, n as usize);
                c.note(format!("write {off} +{n}"));
                c.file
                    .write_all_at(&data, off)
                    .map_err(|e| c.fail(&format!("write {off} +{n}: {e}")))?;
                let end = (off + n) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
                c.bytes_written += n;
            }
            65..=74 => {
                // Append through the file position.
                let n = r.len(65_536).min(max.saturating_sub(model.len() as u64));
                let data = imz_integration::data::bytes(rng ^ op, n as usize);
                c.note(format!("append +{n} at {}", model.len()));
                c.file
                    .seek(SeekFrom::End(0))
                    .and_then(|_| c.file.write_all(&data))
                    .map_err(|e| c.fail(&format!("append +{n}: {e}")))?;
                model.extend_from_slice(&data);
                c.bytes_written += n;
            }
            75..=84 => {
                let to = r.below(max + 1);
                c.note(format!("truncate {to}"));
                c.file
                    .set_len(to)
                    .map_err(|e| c.fail(&format!("truncate {to}: {e}")))?;
                model.resize(to as usize, 0);
            }
            85..=89 => {
                c.note("fsync".into());
                c.file
                    .sync_all()
                    .map_err(|e| c.fail(&format!("fsync: {e}")))?;
            }
            90..=93 => c.check_size(&model)?,
            94..=96 => {
                c.file
                    .sync_all()
                    .map_err(|e| c.fail(&format!("fsync before reopen: {e}")))?;
                c.reopen(true)?;
            }
            97 => {
                c.file
                    .sync_all()
                    .map_err(|e| c.fail(&format!("fsync before drop: {e}")))?;
                c.drop_caches();
            }
            _ => {
                c.file
                    .sync_all()
                    .map_err(|e| c.fail(&format!("fsync: {e}")))?;
                c.check_sequential(&model, 65_536)?;
            }
        }
    }
    c.file
        .sync_all()
        .map_err(|e| c.fail(&format!("final fsync: {e}")))?;
    c.check_size(&model)?;
    c.check_sequential(&model, 1 << 20)?;
    Ok(format!(
        "fsx ok: rw mode, {ops} ops, {} bytes written, {} bytes read, final size {}",
        c.bytes_written,
        c.bytes_read,
        model.len()
    ))
}

fn readdir(dir: &str) -> Result<String, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("readdir {dir}: {e}"))?;
    let mut n = 0usize;
    for e in entries {
        e.map_err(|e| format!("readdir {dir}: {e}"))?;
        n += 1;
    }
    Ok(format!("{n} entries"))
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: imz-guest-fsx read FILE SEED LEN OPS [RNG]\n       imz-guest-fsx rw FILE MAXSIZE OPS [RNG]\n       imz-guest-fsx readdir DIR"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let result = match args.get(1).map(String::as_str) {
        Some("read") => match (args.get(2), num(3), num(4), num(5)) {
            (Some(path), Some(seed), Some(len), Some(ops)) => {
                run_read(path, seed, len as usize, ops, num(6).unwrap_or(1))
            }
            _ => return usage(),
        },
        Some("rw") => match (args.get(2), num(3), num(4)) {
            (Some(path), Some(max), Some(ops)) if max > 0 => {
                run_rw(path, max as usize, ops, num(5).unwrap_or(1))
            }
            _ => return usage(),
        },
        Some("readdir") => match args.get(2) {
            Some(dir) => readdir(dir),
            None => return usage(),
        },
        _ => return usage(),
    };
    match result {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            println!("{msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_mode_passes_on_a_correct_file_and_catches_a_flipped_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut content = imz_integration::data::bytes(7, 300_000);
        std::fs::write(&path, &content).expect("write");
        let p = path.to_str().expect("utf-8");
        run_read(p, 7, 300_000, 500, 3).expect("a correct file passes");
        content[123_456] ^= 1;
        std::fs::write(&path, &content).expect("write");
        let err = run_read(p, 7, 300_000, 2000, 3).expect_err("a flipped byte is caught");
        assert!(err.contains("differs"), "{err}");
    }

    #[test]
    fn rw_mode_passes_on_a_local_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        run_rw(path.to_str().expect("utf-8"), 200_000, 500, 5).expect("local file passes");
    }
}
