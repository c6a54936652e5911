//! Page tables proportional to use (issue #12, item 2): an LMDB-style
//! reservation — a 64 GiB shared writable mapping of which 100 MiB is
//! written — costs about the page-table memory (`VmPTE`) of the same
//! pattern through a kernel mapping (memmap2), in every mapping mode.
//!
//! One test in this binary on purpose: `VmPTE` is per process, and another
//! test's mappings running alongside would move it.

mod common;

use common::{tempdir, watchdog};
use upcache::{DirtyTracking, PageCache, Share, UffdMode};

const RESERVE: u64 = 64 << 30;
const TOUCH: usize = 100 << 20;
const PAGE: usize = 4096;

/// The process's page-table memory in KiB (`VmPTE` in `/proc/self/status`).
fn vm_pte_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPTE:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPTE in /proc/self/status")
}

/// Page-table KiB a 64 GiB kernel shared mapping costs with its first
/// 100 MiB written, with 4 KiB PTEs like upcache's (`huge`: false, via
/// `MADV_NOHUGEPAGE`) or as the kernel chooses (ext4's large folios are
/// PMD-mapped, which upcache's 4 KiB shmem pages cannot be).
fn kernel_mapping_pte_kib(dir: &std::path::Path, huge: bool) -> u64 {
    let path = dir.join("kernel");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(RESERVE).unwrap();
    let before = vm_pte_kib();
    // SAFETY: nothing else maps or truncates this private test file.
    let mut m = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
    if !huge {
        m.advise(memmap2::Advice::NoHugePage).unwrap();
    }
    for off in (0..TOUCH).step_by(PAGE) {
        m[off] = 1;
    }
    let used = vm_pte_kib().saturating_sub(before);
    drop(m);
    f.set_len(0).unwrap();
    used
}

/// The same through upcache in `mode`: (page tables of the whole process
/// growth, page tables the mapping itself held — freed when it is dropped).
/// The difference is the engine view's: 8 bytes per cached page that was
/// filled or copied through it, bounded by the cache's memory, not by the
/// size of any mapping (ARCHITECTURE.md, "Page tables").
fn upcache_pte_kib(dir: &std::path::Path, mode: UffdMode, tracking: DirtyTracking) -> (u64, u64) {
    let path = dir.join(format!("{mode:?}-{tracking:?}"));
    let cache = PageCache::builder().mmap_mode(mode).dirty_tracking(tracking).build();
    // The fault threads' stacks are the cache's fixed cost, not the
    // reservation's.
    cache.start_fault_engine().unwrap();
    let f = cache
        .options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.truncate(RESERVE).unwrap();
    let before = vm_pte_kib();
    // SAFETY: nothing else maps or truncates this private test file.
    let mut m = unsafe { f.mmap_mut(0, RESERVE as usize, Share::Shared) }.unwrap();
    for off in (0..TOUCH).step_by(PAGE) {
        m[off] = 1;
    }
    if tracking == DirtyTracking::Async {
        // A harvest walks the whole 64 GiB mapping (PAGEMAP_SCAN): it must
        // not allocate page tables for the untouched part (it allocated
        // 131,324 KiB when holes were write-protected too).
        m.flush().unwrap();
    }
    let after = vm_pte_kib();
    assert_eq!(m[TOUCH - PAGE], 1);
    drop(m);
    let own = after.saturating_sub(vm_pte_kib());
    // Drop the dirty pages instead of writing 100 MiB back.
    f.truncate(0).unwrap();
    (after.saturating_sub(before), own)
}

#[test]
fn a_64_gib_reservation_costs_page_tables_for_what_is_used() {
    watchdog("page tables of a 64 GiB reservation", 120, || {
        let dir = tempdir();
        let kernel_huge = kernel_mapping_pte_kib(dir.path(), true);
        let kernel = kernel_mapping_pte_kib(dir.path(), false);
        eprintln!("page_tables: kernel mapping, 64 GiB reserved, 100 MiB written: {kernel} KiB with 4 KiB PTEs, {kernel_huge} KiB as the kernel chooses");
        // Missing mode is refused when shmem THP is on (README); CI runs
        // with it off, so both modes are measured there.
        for (mode, tracking) in [
            (UffdMode::Minor, DirtyTracking::WriteFault),
            (UffdMode::Missing, DirtyTracking::WriteFault),
            (UffdMode::Minor, DirtyTracking::Async),
        ] {
            let (total, own) = upcache_pte_kib(dir.path(), mode, tracking);
            let mode = format!("{mode:?}/{tracking:?}");
            eprintln!(
                "page_tables: upcache {mode:?}: {own} KiB for the mapping, {total} KiB in all (with the engine view)"
            );
            assert!(
                own <= kernel + kernel / 4,
                "upcache {mode:?}: the mapping holds {own} KiB of page tables for 100 MiB written in 64 GiB, \
                 more than 1.25x the kernel mapping's {kernel} KiB"
            );
            assert!(
                total <= 2 * kernel + kernel / 4,
                "upcache {mode:?}: {total} KiB of page tables in all for 100 MiB written in 64 GiB, \
                 more than the mapping plus one engine view of it (2 x {kernel} KiB, + 1/8)"
            );
        }
    });
}
