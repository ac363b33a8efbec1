//! A small deterministic generator for the randomized tests: a seed
//! replays a run exactly, and a failing run prints its seed.

/// xorshift64: enough to pick operations, and reproducible everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift stays at 0 for ever from 0.
        Self(seed.max(1))
    }

    /// The seed in environment variable `var`: a number replays that run,
    /// `random` explores, unset gives `default` (so CI is reproducible).
    pub fn seed_from_env(var: &str, default: u64) -> anyhow::Result<u64> {
        Ok(match std::env::var(var).ok().as_deref() {
            Some("random") => {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            }
            Some(s) => s.parse().map_err(|e| anyhow::anyhow!("{var}={s:?}: {e}"))?,
            None => default,
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len() as u64) as usize)
        }
    }
}
