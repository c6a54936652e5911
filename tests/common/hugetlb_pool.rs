//! The kernel's pool of 2 MiB hugetlbfs pages, for the tests and benches of
//! `PageCacheBuilder::hugetlb` (shared by `tests/common` and
//! `benches/common`).

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// `nr_hugepages` raised while alive (root), restored on drop (also when a
/// failed assertion unwinds).
pub struct HugePool {
    old: u64,
}

impl HugePool {
    /// Make exactly `free` huge pages free (on top of those others use);
    /// `None` where the knob cannot be written or the kernel cannot find
    /// the memory.
    pub fn with_free(free: u64) -> Option<HugePool> {
        let old: u64 = std::fs::read_to_string(NR_HUGEPAGES).ok()?.trim().parse().ok()?;
        let pool = HugePool { old };
        let used = old.saturating_sub(meminfo("HugePages_Free:"));
        std::fs::write(NR_HUGEPAGES, (used + free).to_string()).ok()?;
        (meminfo("HugePages_Free:") == free).then_some(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        std::fs::write(NR_HUGEPAGES, self.old.to_string()).expect("restore nr_hugepages");
    }
}

/// A `/proc/meminfo` figure (its number, in the file's unit).
pub fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// [`HugePool::with_free`] for a test: `None` (after saying loudly that
/// the test is skipped) where the pool cannot be sized; fails instead where
/// `UPCACHE_REQUIRE_HUGETLB` is set (CI runs as root).
pub fn pool_or_skip(free: u64) -> Option<HugePool> {
    let p = HugePool::with_free(free);
    if p.is_none() {
        let msg = format!(
            "SKIPPED: cannot make {free} huge pages free through {NR_HUGEPAGES} (needs root; \
             HugePages_Total {} HugePages_Free {}); the hugetlb page cache is NOT tested",
            meminfo("HugePages_Total:"),
            meminfo("HugePages_Free:")
        );
        eprintln!("\n*** {msg} ***\n");
        assert!(std::env::var_os("UPCACHE_REQUIRE_HUGETLB").is_none(), "{msg}");
    }
    p
}
