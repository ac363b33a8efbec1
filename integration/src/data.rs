//! Deterministic test content: the same seed always gives the same bytes,
//! so a test can check what it reads without keeping a copy.

/// `len` pseudo-random bytes from `seed` (xorshift64*; not for crypto).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a file of `len` bytes from `seed`, creating parent directories.
pub fn write_file(path: &std::path::Path, seed: u64, len: usize) -> std::io::Result<Vec<u8>> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let content = bytes(seed, len);
    std::fs::write(path, &content)?;
    Ok(content)
}
