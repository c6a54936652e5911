//! Randomized differential test of the fault engine against the kernel's
//! own page cache: the same seeded sequence of mapped reads and writes,
//! read_at/write_at, truncate, punch, fsync and remap is applied to an
//! upcache file (through upcache mappings) and to a twin file (through a
//! kernel `mmap` and pread/pwrite); the two contents are compared after
//! every step, and the upcache file on disk after every fsync.
//!
//! `UPCACHE_TEST_OPS=N` for more operations, `UPCACHE_TEST_SEED=S` to
//! replay.

mod common;

use std::fs::File as StdFile;
use std::os::unix::fs::FileExt;

use common::{ops_count, seed, tempdir, Rng};
use upcache::{DirtyTracking, MmapMut, PageCache, Share, UffdMode, PAGE_SIZE};

const MAX: u64 = 256 * 1024;
const MAP: usize = 2 * MAX as usize;

/// The kernel twin: memmap2's shared writable mapping of the twin file.
struct KernelMap(memmap2::MmapMut);

impl KernelMap {
    fn new(f: &StdFile, len: usize) -> KernelMap {
        // SAFETY: only this test touches the twin file, through this
        // mapping and `twin`'s pwrite/truncate (the kernel keeps the two
        // coherent); accesses stay below EOF.
        KernelMap(unsafe { memmap2::MmapOptions::new().len(len).map_mut(f) }.unwrap())
    }
    fn slice(&mut self) -> &mut [u8] {
        &mut self.0[..]
    }
}

fn run(mode: UffdMode, seed: u64, ops: usize) {
    run_with(mode, DirtyTracking::WriteFault, seed, ops)
}

fn run_with(mode: UffdMode, tracking: DirtyTracking, seed: u64, ops: usize) {
    run_cfg(mode, tracking, Store::Small, seed, ops)
}

/// The page store's folios.
#[derive(Clone, Copy, PartialEq)]
enum Store {
    /// 4 KiB shmem pages, folios up to the readahead window.
    Small,
    /// `large_folios(true)`.
    Large,
    /// `hugetlb(true)`: 2 MiB hugetlbfs pages.
    Hugetlb,
}

fn run_cfg(mode: UffdMode, tracking: DirtyTracking, store: Store, seed: u64, ops: usize) {
    let dir = tempdir();
    let up_path = dir.path().join("upcache");
    let twin_path = dir.path().join("twin");
    let mut rng = Rng::new(seed);
    let mut init = vec![0u8; 100 * 1024 + 7];
    rng.fill(&mut init);
    std::fs::write(&up_path, &init).unwrap();
    std::fs::write(&twin_path, &init).unwrap();

    let cache = PageCache::builder()
        .mmap_mode(mode)
        .dirty_tracking(tracking)
        .large_folios(store == Store::Large)
        .hugetlb(store == Store::Hugetlb)
        .build();
    cache
        .start_fault_engine()
        .expect("userfaultfd must be available (see README)");
    let file = cache.open(&up_path).unwrap();
    let twin = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&twin_path)
        .unwrap();
    let mut kmap = KernelMap::new(&twin, MAP);
    // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
    let mut umap: MmapMut = unsafe { file.mmap_mut(0, MAP, Share::Shared) }.unwrap();
    let mut size = init.len() as u64;
    let mut buf = vec![0u8; 3 * PAGE_SIZE];
    let mut tbuf = vec![0u8; 3 * PAGE_SIZE];

    for op in 0..ops {
        let ctx = format!("{mode:?} seed {seed} op {op}");
        // Mapped accesses stay below EOF's page end (SIGBUS past it, for
        // both), and mapped writes below EOF itself.
        let mapped_end = size.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        match rng.below(100) {
            0..=24 if size > 0 => {
                let off = rng.below(mapped_end) as usize;
                let len = (1 + rng.below(buf.len() as u64) as usize).min(mapped_end as usize - off);
                assert!(
                    umap[off..off + len] == kmap.slice()[off..off + len],
                    "{ctx}: mapped read {off}+{len}"
                );
            }
            25..=44 if size > 0 => {
                let off = rng.below(size) as usize;
                let len = (1 + rng.below(buf.len() as u64) as usize).min(size as usize - off);
                rng.fill(&mut buf[..len]);
                umap[off..off + len].copy_from_slice(&buf[..len]);
                kmap.slice()[off..off + len].copy_from_slice(&buf[..len]);
            }
            45..=59 => {
                let off = rng.below(MAX);
                let len = 1 + rng.below(buf.len() as u64) as usize;
                rng.fill(&mut buf[..len]);
                file.write_at(&buf[..len], off).unwrap();
                twin.write_all_at(&buf[..len], off).unwrap();
                size = size.max(off + len as u64);
            }
            60..=69 => {
                let off = rng.below(MAX);
                let len = 1 + rng.below(buf.len() as u64) as usize;
                let a = file.read_at(&mut buf[..len], off).unwrap();
                let b = twin.read_at(&mut tbuf[..len], off).unwrap();
                assert_eq!(a, b, "{ctx}: read_at length");
                assert!(buf[..a] == tbuf[..b], "{ctx}: read_at bytes");
            }
            70..=77 => {
                let new = rng.below(MAX);
                file.truncate(new).unwrap();
                twin.set_len(new).unwrap();
                size = new;
            }
            78..=85 => {
                let off = rng.below(MAX);
                let len = 1 + rng.below(48 * 1024);
                file.punch_hole(off, len).unwrap();
                rustix::fs::fallocate(
                    &twin,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    off,
                    len,
                )
                .unwrap();
            }
            86..=93 => {
                umap.flush().unwrap();
                file.fsync().unwrap();
                let disk = std::fs::read(&up_path).unwrap();
                let twin_now = std::fs::read(&twin_path).unwrap();
                assert_eq!(disk.len(), twin_now.len(), "{ctx}: file length after fsync");
                assert!(disk == twin_now, "{ctx}: file bytes after fsync");
            }
            _ => {
                // Remap both.
                drop(umap);
                // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
                umap = unsafe { file.mmap_mut(0, MAP, Share::Shared) }.unwrap();
                kmap = KernelMap::new(&twin, MAP);
            }
        }
        // Compare the whole contents after every step.
        assert_eq!(file.len().unwrap(), size, "{ctx}: size");
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        assert_eq!(file.read_at(&mut a, 0).unwrap(), size as usize, "{ctx}");
        twin.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b, "{ctx}: contents differ");
    }
    drop(umap);
    file.close().unwrap();
    assert!(std::fs::read(&up_path).unwrap() == std::fs::read(&twin_path).unwrap());
}

#[test]
fn minor_mode_matches_kernel_mmap() {
    run(UffdMode::Minor, seed(11), ops_count(10_000));
}

#[test]
fn missing_mode_matches_kernel_mmap() {
    run(UffdMode::Missing, seed(12), ops_count(10_000));
}

#[test]
fn minor_mode_async_tracking_matches_kernel_mmap() {
    run_with(UffdMode::Minor, DirtyTracking::Async, seed(13), ops_count(10_000));
}

#[test]
fn missing_mode_large_folios_matches_kernel_mmap() {
    run_cfg(
        UffdMode::Missing,
        DirtyTracking::WriteFault,
        Store::Large,
        seed(14),
        ops_count(10_000),
    );
}

/// The hugetlb page store (Minor mode only), both dirty-tracking modes.
/// The file lives in one 2 MiB page that is mapped, write-protected and
/// punched whole; mapped accesses stay below EOF's 4 KiB page end, where
/// hugetlbfs and ext4 agree (past it ext4 raises SIGBUS and hugetlbfs only
/// at the huge page's end: `tests/hugetlb.rs` checks that).
#[test]
fn minor_mode_hugetlb_matches_kernel_mmap() {
    let Some(_pool) = common::hugetlb_pool::pool_or_skip(8) else {
        return;
    };
    // A fault the engine maps at the wrong size loops or parks: fail, not hang.
    common::watchdog("mmap differential, hugetlb", 300, || {
        for (tracking, s) in [(DirtyTracking::WriteFault, 15), (DirtyTracking::Async, 16)] {
            run_cfg(UffdMode::Minor, tracking, Store::Hugetlb, seed(s), ops_count(10_000));
        }
    });
}
