//! Chunk geometry: how file offsets map to the chunks stored in redb.
//!
//! A chunk holds [`CHUNK_SIZE`] bytes of one file (the last chunk of a file
//! may be shorter). The size is a little under 1 MiB on purpose: redb
//! allocates a value's pages in power-of-two runs, so a value of exactly
//! 1 MiB (plus its header) would take 2 MiB on disk (measured: 1 GiB of
//! 1 MiB values made a 2.03 GiB file; 1 MiB - 4 KiB values made 1.03 GiB).
//! It is a multiple of 4 KiB so that page-aligned client writes never
//! straddle two chunks.

/// Largest file the cache holds: what the gateway advertises as FSINFO's
/// `maxfilesize` (128 GiB), inside the origin's upload limit (1 TiB) and
/// far from where offset arithmetic overflows.
pub const MAX_FILE_SIZE: u64 = 128 << 30;

/// Where a write of `len` bytes at `offset` ends, if a file may grow that
/// far ([`MAX_FILE_SIZE`]).
pub fn write_end(offset: u64, len: u64) -> Option<u64> {
    offset.checked_add(len).filter(|&end| end <= MAX_FILE_SIZE)
}

/// Bytes per chunk: 1 MiB - 4 KiB.
pub const CHUNK_SIZE: u64 = (1 << 20) - 4096;

/// Index of the chunk holding byte `offset`.
pub fn index_of(offset: u64) -> u64 {
    offset / CHUNK_SIZE
}

/// First byte of chunk `index`.
pub fn start_of(index: u64) -> u64 {
    index * CHUNK_SIZE
}

/// Indexes of the chunks covering `offset..offset + len` (empty for `len == 0`).
pub fn covering(offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return index_of(offset)..index_of(offset);
    }
    index_of(offset)..index_of(offset + len - 1) + 1
}

/// Number of chunks a file of `size` bytes has.
pub fn count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// Length of chunk `index` of a file of `size` bytes.
pub fn len_in(index: u64, size: u64) -> u64 {
    size.saturating_sub(start_of(index)).min(CHUNK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_spans_exactly_the_touched_chunks() {
        assert_eq!(covering(0, 0), 0..0);
        assert_eq!(covering(0, 1), 0..1);
        assert_eq!(covering(0, CHUNK_SIZE), 0..1);
        assert_eq!(covering(0, CHUNK_SIZE + 1), 0..2);
        assert_eq!(covering(CHUNK_SIZE - 1, 2), 0..2);
        // A 1 MiB aligned client read spans two chunks.
        assert_eq!(covering(1 << 20, 1 << 20), 1..3);
    }

    #[test]
    fn chunk_lengths_add_up_to_the_size() {
        for size in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            5 * CHUNK_SIZE + 17,
        ] {
            let total: u64 = (0..count(size)).map(|i| len_in(i, size)).sum();
            assert_eq!(total, size);
        }
    }

    #[test]
    fn page_aligned_writes_stay_in_one_chunk() {
        assert_eq!(CHUNK_SIZE % 4096, 0);
        for page in 0..2048u64 {
            let r = covering(page * 4096, 4096);
            assert_eq!(r.end - r.start, 1);
        }
    }
}
