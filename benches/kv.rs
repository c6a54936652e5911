//! `kv/{upcache_pinned, upcache_pinned_large_folios, upcache_mmap, memmap2}`: point lookups in the hash
//! KV of `examples/kv.rs` (200,000 keys, 4 KiB bucket pages, ~9 MiB data
//! file on ext4), 2 threads × 10,000 random existing keys per iteration,
//! everything cached (no memory limit; every side warmed by one pass over
//! all keys first).
//!
//! - `upcache_pinned`: `File::get_page` per probed page (pinned, no copy);
//! - `upcache_mmap`: the same bytes through an upcache mapping (default
//!   mode), read as a slice;
//! - `memmap2`: a kernel mapping of the data file (`memmap2::Mmap`);
//! - `*_large_folios`: a cache with `large_folios(true)`, filled while
//!   the bench holds shmem THP at `always` (root; restored after the
//!   fill): 2 MiB folios, each one huge page.
//!
//! `kv_update/{upcache_mmap, upcache_mmap_async, upcache_mmap_large_folios, memmap2}`: in-place updates through a shared
//! writable mapping of the same data file, 1 thread × 10,000 random
//! existing keys per iteration, each writing the value's 8 bytes; before
//! each iteration (untimed) the mapping is flushed, so every page starts
//! clean and write-protected, as after a checkpoint: the first write to a
//! page is a write fault (ext4 `page_mkwrite` on the kernel side, a
//! userfaultfd write-protect round trip on upcache's, a write-protect
//! fault the kernel resolves itself for `upcache_mmap_async`, a cache with
//! `DirtyTracking::Async`, whose writes the flush harvests).
//!
//! `cargo bench --bench kv` (`UPCACHE_BENCH_DIR` places the files).

use std::time::{Duration, Instant};

use criterion::{criterion_main, Criterion};

mod common;
use common::{bench_dir, shmem_pmd_mapped_kib, ShmemThp};
use upcache::{DirtyTracking, PageCache, Share};

#[path = "../examples/kv.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod kv;

const KEYS: u64 = 200_000;
const PER_THREAD: usize = 10_000;

fn keys(seed: u64) -> Vec<u64> {
    common::random_below(seed, PER_THREAD, KEYS)
}

/// Time 2 threads each looking up its key list with `get`.
fn two_threads(get: &(impl Fn(u64) -> Option<u64> + Sync), iter: u64) -> Duration {
    common::two_threads([keys(iter * 2 + 1), keys(iter * 2 + 2)], &|k| {
        assert_eq!(get(k), Some(kv::final_value(k)));
    })
}

fn kv_lookups(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let buckets = kv::build(dir.path(), KEYS).unwrap();
    let data = dir.path().join("kv.data");
    let len = buckets as usize * upcache::PAGE_SIZE;

    let cache = PageCache::new();
    let file = cache.open(&data).unwrap();
    // SAFETY: nothing writes the data file while the benchmark runs.
    let umap = unsafe { file.mmap(0, len, Share::Shared) }.unwrap();
    let std_file = std::fs::File::open(&data).unwrap();
    // SAFETY: as above.
    let kmap = unsafe { memmap2::Mmap::map(&std_file) }.unwrap();
    for k in 0..KEYS {
        assert_eq!(kv::lookup(&file, buckets, k).unwrap(), Some(kv::final_value(k)));
        assert_eq!(kv::lookup_in(&umap, buckets, k), Some(kv::final_value(k)));
        assert_eq!(kv::lookup_in(&kmap, buckets, k), Some(kv::final_value(k)));
    }
    let misses = cache.stats().misses;
    // Large folios with shmem THP on while the cache fills (restored
    // after): 2 MiB folios, each one huge page, so the engine's own view
    // maps them with PMDs (pinned pages without TLB misses).
    let (lcache, lfile) = {
        let _thp = ShmemThp::always().expect("shmem THP knob (root)");
        let lcache = PageCache::builder().large_folios(true).build();
        let lfile = lcache.open(&data).unwrap();
        for k in 0..KEYS {
            assert_eq!(kv::lookup(&lfile, buckets, k).unwrap(), Some(kv::final_value(k)));
        }
        (lcache, lfile)
    };
    let lmisses = lcache.stats().misses;

    let mut g = c.benchmark_group("kv");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("upcache_pinned", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|i| two_threads(&|k| kv::lookup(&file, buckets, k).unwrap(), i))
                .sum()
        })
    });
    g.bench_function("upcache_pinned_large_folios", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|i| two_threads(&|k| kv::lookup(&lfile, buckets, k).unwrap(), i))
                .sum()
        })
    });
    g.bench_function("upcache_mmap", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|i| two_threads(&|k| kv::lookup_in(&umap, buckets, k), i))
                .sum()
        })
    });
    g.bench_function("memmap2", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|i| two_threads(&|k| kv::lookup_in(&kmap, buckets, k), i))
                .sum()
        })
    });
    g.finish();
    assert_eq!(cache.stats().misses, misses, "upcache missed during kv lookups");
    assert_eq!(
        lcache.stats().misses,
        lmisses,
        "upcache (large folios) missed during kv lookups"
    );
    println!(
        "kv: engine view and mappings PMD-mapped: {} MiB",
        shmem_pmd_mapped_kib() >> 10
    );
}

/// The value offsets and new values of 10,000 random keys (pass `iter`).
fn updates(data: &[u8], buckets: u64, iter: u64) -> Vec<(usize, u64)> {
    keys(iter + 1000)
        .into_iter()
        .map(|k| {
            (
                kv::value_offset_in(data, buckets, k).expect("key present"),
                kv::final_value(k),
            )
        })
        .collect()
}

/// `iters` timed passes of 10,000 in-place updates through `map`, each
/// after an untimed `flush` (pages start clean and write-protected).
fn update_iters<M: std::ops::DerefMut<Target = [u8]>>(
    map: &mut M,
    buckets: u64,
    iters: u64,
    flush: impl Fn(&M),
) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let ups = updates(map, buckets, i);
        flush(map);
        let t = Instant::now();
        for &(off, v) in &ups {
            map[off..off + 8].copy_from_slice(&v.wrapping_add(i).to_le_bytes());
        }
        total += t.elapsed();
    }
    total
}

fn kv_update(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let buckets = kv::build(dir.path(), KEYS).unwrap();
    let len = buckets as usize * upcache::PAGE_SIZE;
    // Two copies of the data file, one per side, so neither side's writes
    // or write-back touch the other's file.
    let udata = dir.path().join("kv.data");
    let kdata = dir.path().join("kv.kernel");
    let adata = dir.path().join("kv.async");
    std::fs::copy(&udata, &kdata).unwrap();
    std::fs::copy(&udata, &adata).unwrap();
    for p in [&udata, &kdata, &adata] {
        common::sync_file(p);
    }

    // The kernel's dirty thresholds (see benches/update.rs).
    let (bg, limit) = common::kernel_dirty_thresholds();
    let cache = PageCache::builder()
        .dirty_background_bytes(bg)
        .dirty_limit_bytes(limit)
        .build();
    let file = cache.open(&udata).unwrap();
    // SAFETY: only this thread reads or writes the data files while the
    // benchmark runs.
    let mut umap = unsafe { file.mmap_mut(0, len, Share::Shared) }.unwrap();
    let acache = PageCache::builder()
        .dirty_tracking(DirtyTracking::Async)
        .dirty_background_bytes(bg)
        .dirty_limit_bytes(limit)
        .build();
    let afile = acache.open(&adata).unwrap();
    // SAFETY: as above.
    let mut amap = unsafe { afile.mmap_mut(0, len, Share::Shared) }.unwrap();
    let kfile = std::fs::OpenOptions::new().read(true).write(true).open(&kdata).unwrap();
    // SAFETY: as above.
    let mut kmap = unsafe { memmap2::MmapMut::map_mut(&kfile) }.unwrap();
    // Warm every side: every page cached (and mapped) before timing.
    let mut sum = 0u64;
    for p in (0..len).step_by(upcache::PAGE_SIZE) {
        sum = sum.wrapping_add(umap[p] as u64 + kmap[p] as u64 + amap[p] as u64);
    }
    std::hint::black_box(sum);
    let misses = cache.stats().misses;
    let amisses = acache.stats().misses;
    // Large folios, shmem THP on while the cache fills (restored after).
    let ldata = dir.path().join("kv.large");
    std::fs::copy(&udata, &ldata).unwrap();
    common::sync_file(&ldata);
    let (lcache, lfile, mut lmap) = {
        let _thp = ShmemThp::always().expect("shmem THP knob (root)");
        let lcache = PageCache::builder()
            .large_folios(true)
            .dirty_background_bytes(bg)
            .dirty_limit_bytes(limit)
            .build();
        let lfile = lcache.open(&ldata).unwrap();
        // SAFETY: as above.
        let lmap = unsafe { lfile.mmap_mut(0, len, Share::Shared) }.unwrap();
        let mut sum = 0u64;
        for p in (0..len).step_by(upcache::PAGE_SIZE) {
            sum = sum.wrapping_add(lmap[p] as u64);
        }
        std::hint::black_box(sum);
        (lcache, lfile, lmap)
    };
    let lmisses = lcache.stats().misses;

    let mut g = c.benchmark_group("kv_update");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("upcache_mmap", |b| {
        b.iter_custom(|iters| update_iters(&mut umap, buckets, iters, |m| m.flush().unwrap()))
    });
    g.bench_function("upcache_mmap_async", |b| {
        b.iter_custom(|iters| update_iters(&mut amap, buckets, iters, |m| m.flush().unwrap()))
    });
    let lwp = lcache.stats().faults_wp;
    let mut lpasses = 0;
    g.bench_function("upcache_mmap_large_folios", |b| {
        b.iter_custom(|iters| {
            lpasses += iters;
            update_iters(&mut lmap, buckets, iters, |m| m.flush().unwrap())
        })
    });
    g.bench_function("memmap2", |b| {
        b.iter_custom(|iters| update_iters(&mut kmap, buckets, iters, |m| m.flush().unwrap()))
    });
    g.finish();
    println!(
        "kv_update/upcache_mmap_large_folios: {:.1} write-protect userfaults per pass ({} passes), {} MiB of folios",
        (lcache.stats().faults_wp - lwp) as f64 / lpasses.max(1) as f64,
        lpasses,
        lfile.memory_bytes() >> 20
    );
    assert_eq!(
        lcache.stats().misses,
        lmisses,
        "upcache (large folios) missed during kv updates"
    );
    lmap.flush().unwrap();
    assert!(
        std::fs::read(&ldata).unwrap() == lmap[..],
        "upcache (large folios): the flushed file is not what the mapping shows"
    );
    assert_eq!(cache.stats().misses, misses, "upcache missed during kv updates");
    assert_eq!(acache.stats().misses, amisses, "upcache_async missed during kv updates");
    assert_eq!(
        acache.stats().faults_wp,
        0,
        "upcache_async took write-protect userfaults"
    );
    amap.flush().unwrap();
    assert!(
        std::fs::read(&adata).unwrap() == amap[..],
        "upcache_async: the flushed file is not what the mapping shows"
    );
    umap.flush().unwrap();
    kmap.flush().unwrap();
    // Every update reached the file (each side ran its own number of
    // iterations, so the two files differ from each other).
    assert!(
        std::fs::read(&udata).unwrap() == umap[..],
        "upcache: the flushed file is not what the mapping shows"
    );
    assert!(
        std::fs::read(&kdata).unwrap() == kmap[..],
        "kernel: the flushed file is not what the mapping shows"
    );
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::kv_lookups, super::kv_update);
}
use group::benches;
criterion_main!(benches);
