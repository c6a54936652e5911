//! `kv_limited/{upcache_pinned, memmap2_cgroup}` (issue #10): point lookups
//! in the kv example's hash store when only a third of its data fits in
//! memory. 1,000,000 keys (11,764 bucket pages, 46 MiB on ext4); 2 threads
//! × 10,000 random existing keys per iteration, after a warm-up of the same
//! size.
//!
//! - `upcache_pinned`: `File::get_page` per probed page, a cache with
//!   `memory_limit` = a third of the data file, an O_DIRECT
//!   `DirectFileStore` (upcache is the only cache), `Advice::Random`.
//! - `memmap2_cgroup`: a child process (this binary re-executed) in a
//!   cgroup v1 memory group limited to the same bytes, looking keys up in
//!   a `memmap2::Mmap` of the data file with `MADV_RANDOM`, the file
//!   dropped from the page cache first (the `oversubscribed` harness).
//!
//! Each side prints a `residency ID:` line (see benches/common).
//!
//! `cargo bench --bench kv_limited` (root, cgroup v1 memory controller;
//! `UPCACHE_BENCH_DIR` on a disk filesystem).

use std::path::Path;
use std::time::Duration;

use criterion::Criterion;
use upcache::{Advice, DirectFileStore, PageCache, StoreOps, PAGE_SIZE};

#[path = "../examples/kv.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod kv;

mod common;
use common::{bench_dir, cgroup_usage, drop_kernel_cache, file_cached_bytes, report, Residency};

const KEYS: u64 = 1_000_000;
const PER_THREAD: usize = 10_000;
const CGROUP: &str = "/sys/fs/cgroup/memory/upcache-kv-bench";

fn keys(seed: u64) -> Vec<u64> {
    common::random_below(seed, PER_THREAD, KEYS)
}

/// 2 threads, each looking up its own key list (iteration `iter`).
fn two_threads(get: &(impl Fn(u64) -> Option<u64> + Sync), iter: u64) -> Duration {
    common::two_threads([keys(iter * 2 + 1), keys(iter * 2 + 2)], &|k| {
        assert_eq!(get(k), Some(kv::final_value(k)));
    })
}

/// The kernel side, in the child: join the group, drop the file from the
/// page cache, map it, warm up, time. Prints nanoseconds.
fn kernel_child(path: &Path, buckets: u64, iters: u64) {
    std::fs::write(format!("{CGROUP}/cgroup.procs"), "0").expect("join the memory cgroup");
    drop_kernel_cache(path);
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: nothing writes the data file while the benchmark runs.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    map.advise(memmap2::Advice::Random).unwrap();
    two_threads(&|k| kv::lookup_in(&map, buckets, k), 0);
    let total: Duration = (0..iters)
        .map(|i| two_threads(&|k| kv::lookup_in(&map, buckets, k), 100 + i))
        .sum();
    println!("{}", total.as_nanos());
}

fn kernel_side(path: &Path, buckets: u64, iters: u64) -> Duration {
    common::child_time(&[
        ("UPCACHE_KV_CHILD", path.into()),
        ("UPCACHE_KV_BUCKETS", buckets.to_string().into()),
        ("UPCACHE_KV_ITERS", iters.to_string().into()),
    ])
}

fn kv_limited(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let buckets = kv::build(dir.path(), KEYS).unwrap();
    let data = dir.path().join("kv.data");
    let budget = buckets * PAGE_SIZE as u64 / 3;
    println!(
        "kv_limited: {KEYS} keys, {buckets} pages ({} MiB), budget {} MiB",
        (buckets * PAGE_SIZE as u64) >> 20,
        budget >> 20
    );
    let group = common::MemCgroup::create(CGROUP, budget);

    let mut g = c.benchmark_group("kv_limited");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(1));
    let mut last = None;
    g.bench_function("memmap2_cgroup", |b| {
        b.iter_custom(|iters| {
            let t = kernel_side(&data, buckets, iters);
            last = Some(Residency {
                file_cached: file_cached_bytes(&data),
                cgroup: Some(cgroup_usage(CGROUP)),
                budget: Some(budget),
                ..Default::default()
            });
            t
        })
    });
    report("kv_limited/memmap2_cgroup", &last);
    let mut last = None;
    g.bench_function("upcache_pinned", |b| {
        b.iter_custom(|iters| {
            // upcache must be the only cache: the file out of the kernel's
            // page cache (the kernel side's child left some there).
            drop_kernel_cache(&data);
            let cache = PageCache::builder().memory_limit(budget).build();
            let store = std::sync::Arc::new(DirectFileStore::open(&data).unwrap());
            let file = cache.open_with_ops("kv", StoreOps::new(store.clone())).unwrap();
            file.advise(Advice::Random, 0, 0).unwrap();
            two_threads(&|k| kv::lookup(&file, buckets, k).unwrap(), 0);
            let t = (0..iters)
                .map(|i| two_threads(&|k| kv::lookup(&file, buckets, k).unwrap(), 100 + i))
                .sum();
            assert_eq!(store.direct_fallbacks(), 0, "kv_limited/upcache_pinned: buffered I/O");
            last = Some(Residency {
                file_cached: file_cached_bytes(&data),
                memfd: Some(file.memory_bytes()),
                budget: Some(budget),
                direct: true,
                ..Default::default()
            });
            println!("kv_limited/upcache_pinned stats: {}", file.stats());
            t
        })
    });
    report("kv_limited/upcache_pinned", &last);
    g.finish();
    drop(group);
}

fn main() {
    if let Some(path) = std::env::var_os("UPCACHE_KV_CHILD") {
        let buckets = std::env::var("UPCACHE_KV_BUCKETS").unwrap().parse().unwrap();
        let iters = std::env::var("UPCACHE_KV_ITERS").unwrap().parse().unwrap();
        kernel_child(Path::new(&path), buckets, iters);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    kv_limited(&mut c);
    c.final_summary();
}
