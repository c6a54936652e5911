//! `oversubscribed_random/{kernel_mmap_cgroup, upcache, upcache_minor}`: random 4 KiB reads
//! through a mapping of a file twice the memory budget, 2 threads.
//!
//! - `upcache`: a `PageCache` with `memory_limit(BUDGET)`, an O_DIRECT
//!   `DirectFileStore` (upcache is the only cache), `Advice::Random`.
//! - `kernel_mmap_cgroup`: a child process (this binary re-executed) in a
//!   cgroup v1 memory group limited to the same budget, reading through a
//!   kernel `mmap` with `MADV_RANDOM`, the file dropped from the page cache
//!   first. The group is created under `/sys/fs/cgroup/memory` and removed
//!   afterwards.
//!
//! - `upcache_minor`: the same in `UffdMode::Minor`.
//!
//! Both sides warm up with the same number of accesses, then time the same
//! access sequence. After the group, the hit ratio of upcache's S3-FIFO and
//! of the CLOCK baseline on this workload is printed.
//!
//! Each side prints a `residency ID:` line: the file's bytes in the kernel
//! page cache at the end, upcache's memfd bytes, the group's
//! `memory.usage_in_bytes` and its page-cache part; a side over its budget
//! or an O_DIRECT side that used the kernel's page cache is INVALID.
//!
//! `cargo bench --bench oversubscribed` (root, cgroup v1 memory controller
//! mounted; `UPCACHE_BENCH_DIR` on a disk filesystem).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::Criterion;
use upcache::{Advice, DirectFileStore, PageCache, ReplacementPolicy, Share, StoreOps, UffdMode, PAGE_SIZE};

mod common;
use common::{bench_dir, cgroup_usage, drop_kernel_cache, file_cached_bytes, report, Residency};

const BUDGET: u64 = 256 << 20;
const FILE_SIZE: u64 = 2 * BUDGET;
const ACCESSES: usize = 60_000;
const CGROUP: &str = "/sys/fs/cgroup/memory/upcache-oversub-bench";

fn offsets(seed: u64, n: usize) -> Vec<usize> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (FILE_SIZE / PAGE_SIZE as u64)) as usize * PAGE_SIZE
        })
        .collect()
}

/// 4 KiB reads (copies) from the mapping at the given offsets, 2 threads.
fn run_reads(base: usize, offs: &[usize]) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in offs.chunks(offs.len().div_ceil(2)) {
            s.spawn(move || {
                let mut buf = vec![0u8; PAGE_SIZE];
                let mut sum = 0u64;
                for &o in part {
                    // SAFETY: `base` maps FILE_SIZE bytes for the call.
                    unsafe { std::ptr::copy_nonoverlapping((base + o) as *const u8, buf.as_mut_ptr(), PAGE_SIZE) };
                    sum += buf[o % PAGE_SIZE] as u64;
                }
                std::hint::black_box(sum);
            });
        }
    });
    t.elapsed()
}

fn make_file(path: &Path) {
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let f = std::fs::File::create(path).unwrap();
    for i in 0..FILE_SIZE / chunk.len() as u64 {
        f.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
    }
    f.sync_all().unwrap();
}

/// The kernel side, in the child process: join the cgroup, drop the file
/// from the page cache, map it, warm up, time. Prints nanoseconds.
fn kernel_child(path: &Path, iters: u64) {
    std::fs::write(format!("{CGROUP}/cgroup.procs"), "0").expect("join the memory cgroup");
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    use rustix::mm::{madvise, mmap, Advice as MAdvice, MapFlags, ProtFlags};
    // SAFETY: a fresh read-only mapping of our file, for this process's life.
    let base = unsafe {
        mmap(
            std::ptr::null_mut(),
            FILE_SIZE as usize,
            ProtFlags::READ,
            MapFlags::SHARED,
            &f,
            0,
        )
    }
    .unwrap();
    // SAFETY: advice on our own mapping.
    unsafe { madvise(base, FILE_SIZE as usize, MAdvice::Random).unwrap() };
    run_reads(base as usize, &offsets(1, ACCESSES));
    let mut total = Duration::ZERO;
    for i in 0..iters {
        total += run_reads(base as usize, &offsets(100 + i, ACCESSES));
    }
    println!("{}", total.as_nanos());
}

fn kernel_side(path: &Path, iters: u64) -> Duration {
    common::child_time(&[
        ("UPCACHE_OVERSUB_CHILD", path.into()),
        ("UPCACHE_OVERSUB_ITERS", iters.to_string().into()),
    ])
}

fn upcache_cache(
    path: &Path,
    policy: ReplacementPolicy,
    mode: UffdMode,
) -> (PageCache, upcache::File, std::sync::Arc<DirectFileStore>) {
    // upcache must be the only cache: start with the file out of the
    // kernel's page cache (the kernel side's child left some there).
    drop_kernel_cache(path);
    let cache = PageCache::builder()
        .memory_limit(BUDGET)
        .replacement_policy(policy)
        .mmap_mode(mode)
        .build();
    let store = std::sync::Arc::new(DirectFileStore::open(path).unwrap());
    let file = cache.open_with_ops("oversub", StoreOps::new(store.clone())).unwrap();
    file.advise(Advice::Random, 0, 0).unwrap();
    (cache, file, store)
}

fn oversubscribed_random(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let path = dir.path().join("oversub");
    make_file(&path);
    let group = common::MemCgroup::create(CGROUP, BUDGET);

    let mut g = c.benchmark_group("oversubscribed_random");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(1));
    let mut last = None;
    g.bench_function("kernel_mmap_cgroup", |b| {
        b.iter_custom(|iters| {
            let t = kernel_side(&path, iters);
            // The group keeps the child's page cache charged after it exits.
            last = Some(Residency {
                file_cached: file_cached_bytes(&path),
                cgroup: Some(cgroup_usage(CGROUP)),
                budget: Some(BUDGET),
                ..Default::default()
            });
            t
        })
    });
    report("oversubscribed_random/kernel_mmap_cgroup", &last);
    for (id, mode) in [
        ("upcache", upcache::PageCacheBuilder::DEFAULT_MMAP_MODE),
        ("upcache_minor", UffdMode::Minor),
    ] {
        let mut last = None;
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let (_cache, file, store) = upcache_cache(&path, ReplacementPolicy::S3Fifo, mode);
                // SAFETY: the mapping is only read, through short-lived borrows.
                let map = unsafe { file.mmap(0, FILE_SIZE as usize, Share::Shared) }.unwrap();
                run_reads(map.as_ptr() as usize, &offsets(1, ACCESSES));
                let t = (0..iters)
                    .map(|i| run_reads(map.as_ptr() as usize, &offsets(100 + i, ACCESSES)))
                    .sum();
                assert_eq!(store.direct_fallbacks(), 0, "oversubscribed_random/{id}: buffered I/O");
                last = Some(Residency {
                    file_cached: file_cached_bytes(&path),
                    memfd: Some(file.memory_bytes()),
                    budget: Some(BUDGET),
                    direct: true,
                    ..Default::default()
                });
                t
            })
        });
        report(&format!("oversubscribed_random/{id}"), &last);
    }
    g.finish();
    drop(group);

    for policy in [ReplacementPolicy::S3Fifo, ReplacementPolicy::Clock] {
        let (cache, file, store) = upcache_cache(&path, policy, upcache::PageCacheBuilder::DEFAULT_MMAP_MODE);
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let map = unsafe { file.mmap(0, FILE_SIZE as usize, Share::Shared) }.unwrap();
        run_reads(map.as_ptr() as usize, &offsets(1, ACCESSES));
        let before = cache.stats();
        run_reads(map.as_ptr() as usize, &offsets(2, ACCESSES));
        let after = cache.stats();
        let misses = after.faults_slow - before.faults_slow;
        // upcache's side must be the only cache: no buffered I/O.
        assert_eq!(
            store.direct_fallbacks(),
            0,
            "oversubscribed_random: buffered I/O on upcache's side"
        );
        println!(
            "oversubscribed_random hit ratio, {policy:?}: {:.1} % ({misses} misses in {ACCESSES} reads)",
            100.0 * (1.0 - misses as f64 / ACCESSES as f64)
        );
    }
}

fn main() {
    if let Some(path) = std::env::var_os("UPCACHE_OVERSUB_CHILD") {
        let iters = std::env::var("UPCACHE_OVERSUB_ITERS").unwrap().parse().unwrap();
        kernel_child(Path::new(&path), iters);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    oversubscribed_random(&mut c);
    c.final_summary();
}
