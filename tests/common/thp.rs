//! Shmem transparent huge pages for the tests and benches that need them
//! (shared by `tests/common` and `benches/common`).

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Shmem THP switched to `always` while alive (root), restored on drop
/// (also when a failed assertion unwinds).
pub struct ShmemThp {
    old: String,
}

impl ShmemThp {
    /// `None` where the knob cannot be written (not root, no THP).
    pub fn always() -> Option<ShmemThp> {
        let s = std::fs::read_to_string(SHMEM_ENABLED).ok()?;
        let old = s.split(['[', ']']).nth(1)?.to_string();
        std::fs::write(SHMEM_ENABLED, "always").ok()?;
        Some(ShmemThp { old })
    }
}

impl Drop for ShmemThp {
    fn drop(&mut self) {
        std::fs::write(SHMEM_ENABLED, &self.old).expect("restore shmem_enabled");
    }
}

/// `ShmemPmdMapped` of this process (KiB, `/proc/self/smaps_rollup`):
/// shared memory mapped with PMDs.
pub fn shmem_pmd_mapped_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("ShmemPmdMapped:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
