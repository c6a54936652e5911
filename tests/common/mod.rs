//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io;
use std::path::{Path, PathBuf};

/// A small, seeded, dependency-free PRNG (splitmix64), so a failing
/// sequence can be replayed from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_u64() as u8;
        }
    }
}

/// Number of random operations: `default`, or `UPCACHE_TEST_OPS` if set.
pub fn ops_count(default: usize) -> usize {
    std::env::var("UPCACHE_TEST_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seed: `UPCACHE_TEST_SEED` if set, else `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("UPCACHE_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A temporary directory on the disk filesystem (not tmpfs), so files
/// behave like a storage engine's.
pub fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("UPCACHE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("upcache-test")
        .tempdir_in(base)
        .expect("create temp dir")
}

/// Create `path` with `content`.
pub fn create_file(path: &Path, content: &[u8]) -> io::Result<()> {
    std::fs::write(path, content)
}
