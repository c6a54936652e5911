//! `mapped_update_random/{memmap2, memmap2_4k_ptes, upcache, upcache_async, upcache_large_folios, upcache_hugetlb}` (issue #12): a 256 MiB file
//! on ext4, fully cached and mapped shared-writable, every page written
//! once (8 bytes) in random order per iteration, from one thread. Before
//! each iteration (untimed) the mapping is flushed, so every page starts
//! clean and write-protected: each write is a first write after writeback
//! (ext4 `page_mkwrite` for the kernel mapping, a userfaultfd write-protect
//! round trip through upcache's fault threads; for `upcache_async`, a cache
//! with `DirtyTracking::Async`, a write-protect fault the kernel resolves
//! itself, harvested by the flush).
//!
//! `memmap2_4k_ptes` is the kernel mapping with `MADV_NOHUGEPAGE`: ext4's
//! large folios are then mapped with 4 KiB PTEs, as upcache's memfd pages
//! always are, so each first write is one write fault per page there too
//! (the default `memmap2` side maps PMD-sized folios with one entry and
//! takes one write fault per 2 MiB).
//!
//! `upcache_large_folios` is a cache with `large_folios(true)`, filled
//! while the bench holds shmem THP at `always` (root; restored after):
//! its first write to a clean 2 MiB folio takes one write-protect
//! userfault and unprotects the whole folio.
//!
//! `upcache_hugetlb` is a cache with `hugetlb(true)` (its folios are 2 MiB
//! pages of the kernel's hugetlbfs pool, which the bench sizes as root and
//! restores after): a user mapping protects and maps each folio with one
//! page-table entry, so a first write after writeback is one write-protect
//! userfault per 2 MiB, after which the folio stays mapped writable whole.
//!
//! The flush before each pass is not timed by criterion (its cost is the
//! writeback of 256 MiB on every side); the run prints each side's mean
//! flush time too, because `Async` moves work there (the harvest).
//!
//! `cargo bench --bench update` (`UPCACHE_BENCH_DIR` places the file).

mod common;
use common::bench_dir;

use std::time::{Duration, Instant};

use criterion::{criterion_main, Criterion, Throughput};
use upcache::{DirtyTracking, PageCache, Share, PAGE_SIZE};

const SIZE: usize = 256 << 20;

/// Every page index once, shuffled (xorshift Fisher-Yates).
fn order(seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..SIZE / PAGE_SIZE).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// One timed pass: write 8 bytes at a random offset of every page.
fn pass(map: &mut [u8], pages: &[usize], tag: u64) -> Duration {
    let t = Instant::now();
    for &p in pages {
        let off = p * PAGE_SIZE + (p * 8) % (PAGE_SIZE - 8);
        map[off..off + 8].copy_from_slice(&(tag ^ p as u64).to_le_bytes());
    }
    t.elapsed()
}

/// `iters` timed passes over `map`, each after an untimed `flush`, whose
/// time is added to `flushed` (total, count).
fn timed_passes<M: std::ops::DerefMut<Target = [u8]>>(
    map: &mut M,
    iters: u64,
    flush: impl Fn(&M),
    flushed: &mut (Duration, u32),
) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let pages = order(i + 1);
        let t = Instant::now();
        flush(map);
        *flushed = (flushed.0 + t.elapsed(), flushed.1 + 1);
        total += pass(map, &pages, i);
    }
    total
}

fn mapped_update_random(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let upath = dir.path().join("upcache");
    let apath = dir.path().join("upcache_async");
    let kpath = dir.path().join("kernel");
    let k4path = dir.path().join("kernel_4k");
    for p in [&upath, &apath, &kpath, &k4path] {
        std::fs::write(p, vec![7u8; SIZE]).unwrap();
        common::sync_file(p);
    }
    // The kernel's dirty thresholds, so neither side writes back during a
    // pass when the other would not (upcache's defaults without a memory
    // limit are 64 MiB / 256 MiB; the kernel's here are 10 % / 20 % of
    // available memory).
    let (bg, limit) = common::kernel_dirty_thresholds();
    println!(
        "mapped_update_random: dirty thresholds (kernel's, given to upcache): background {} MiB, limit {} MiB",
        bg >> 20,
        limit >> 20
    );
    let cache = PageCache::builder()
        .dirty_background_bytes(bg)
        .dirty_limit_bytes(limit)
        .build();
    let file = cache.open(&upath).unwrap();
    // SAFETY: only this thread touches the files while the benchmark runs.
    let mut umap = unsafe { file.mmap_mut(0, SIZE, Share::Shared) }.unwrap();
    let acache = PageCache::builder()
        .dirty_tracking(DirtyTracking::Async)
        .dirty_background_bytes(bg)
        .dirty_limit_bytes(limit)
        .build();
    let afile = acache.open(&apath).unwrap();
    // SAFETY: as above.
    let mut amap = unsafe { afile.mmap_mut(0, SIZE, Share::Shared) }.unwrap();
    let kfile = std::fs::OpenOptions::new().read(true).write(true).open(&kpath).unwrap();
    // SAFETY: as above.
    let mut kmap = unsafe { memmap2::MmapMut::map_mut(&kfile) }.unwrap();
    let k4file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&k4path)
        .unwrap();
    // SAFETY: as above.
    let mut k4map = unsafe { memmap2::MmapMut::map_mut(&k4file) }.unwrap();
    k4map.advise(memmap2::Advice::NoHugePage).unwrap();
    for p in (0..SIZE).step_by(PAGE_SIZE) {
        std::hint::black_box(k4map[p]);
    }
    let mut sum = 0u64;
    for p in (0..SIZE).step_by(PAGE_SIZE) {
        sum = sum.wrapping_add(umap[p] as u64 + kmap[p] as u64 + amap[p] as u64);
    }
    std::hint::black_box(sum);
    let misses = cache.stats().misses;
    let amisses = acache.stats().misses;
    // Large folios: filled while shmem THP is `always` (restored after),
    // so each 2 MiB folio is one huge page; one write-protect userfault
    // then makes a whole folio writable.
    let lpath = dir.path().join("upcache_large");
    std::fs::write(&lpath, vec![7u8; SIZE]).unwrap();
    common::sync_file(&lpath);
    let (lcache, lfile, mut lmap) = {
        let _thp = common::ShmemThp::always().expect("shmem THP knob (root)");
        let lcache = PageCache::builder()
            .large_folios(true)
            .dirty_background_bytes(bg)
            .dirty_limit_bytes(limit)
            .build();
        let lfile = lcache.open(&lpath).unwrap();
        // SAFETY: as above.
        let lmap = unsafe { lfile.mmap_mut(0, SIZE, Share::Shared) }.unwrap();
        let mut sum = 0u64;
        for p in (0..SIZE).step_by(PAGE_SIZE) {
            sum = sum.wrapping_add(lmap[p] as u64);
        }
        std::hint::black_box(sum);
        (lcache, lfile, lmap)
    };
    let lmisses = lcache.stats().misses;
    // hugetlb: 128 pages of 2 MiB for the file, a few spare.
    let _pool = common::HugePool::with_free((SIZE >> 21) as u64 + 8).expect("hugetlb pool (root)");
    let hpath = dir.path().join("upcache_hugetlb");
    std::fs::write(&hpath, vec![7u8; SIZE]).unwrap();
    common::sync_file(&hpath);
    let hcache = PageCache::builder()
        .hugetlb(true)
        .dirty_background_bytes(bg)
        .dirty_limit_bytes(limit)
        .build();
    let hfile = hcache.open(&hpath).unwrap();
    // SAFETY: as above.
    let mut hmap = unsafe { hfile.mmap_mut(0, SIZE, Share::Shared) }.unwrap();
    let mut sum = 0u64;
    for p in (0..SIZE).step_by(PAGE_SIZE) {
        sum = sum.wrapping_add(hmap[p] as u64);
    }
    std::hint::black_box(sum);
    let hmisses = hcache.stats().misses;
    let hwp = hcache.stats().faults_wp;
    let (mut hres, mut hflush) = (None, (Duration::ZERO, 0u32));

    let mut g = c.benchmark_group("mapped_update_random");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements((SIZE / PAGE_SIZE) as u64));
    let (mut ures, mut kres, mut ares, mut k4res, mut lres) = (None, None, None, None, None);
    let mut lflush = (Duration::ZERO, 0u32);
    let lwp = lcache.stats().faults_wp;
    // Untimed flush time per side: (total, passes).
    let (mut kflush, mut k4flush, mut uflush, mut aflush) = (
        (Duration::ZERO, 0u32),
        (Duration::ZERO, 0u32),
        (Duration::ZERO, 0u32),
        (Duration::ZERO, 0u32),
    );
    g.bench_function("memmap2", |b| {
        b.iter_custom(|iters| {
            let total = timed_passes(&mut kmap, iters, |m| m.flush().unwrap(), &mut kflush);
            kres = Some(common::Residency {
                file_cached: common::file_cached_bytes(&kpath),
                ..Default::default()
            });
            total
        })
    });
    g.bench_function("memmap2_4k_ptes", |b| {
        b.iter_custom(|iters| {
            let total = timed_passes(&mut k4map, iters, |m| m.flush().unwrap(), &mut k4flush);
            k4res = Some(common::Residency {
                file_cached: common::file_cached_bytes(&k4path),
                ..Default::default()
            });
            total
        })
    });
    g.bench_function("upcache", |b| {
        b.iter_custom(|iters| {
            let total = timed_passes(&mut umap, iters, |m| m.flush().unwrap(), &mut uflush);
            ures = Some(common::Residency {
                file_cached: common::file_cached_bytes(&upath),
                memfd: Some(file.memory_bytes()),
                ..Default::default()
            });
            total
        })
    });
    g.bench_function("upcache_async", |b| {
        b.iter_custom(|iters| {
            let total = timed_passes(&mut amap, iters, |m| m.flush().unwrap(), &mut aflush);
            ares = Some(common::Residency {
                file_cached: common::file_cached_bytes(&apath),
                memfd: Some(afile.memory_bytes()),
                ..Default::default()
            });
            total
        })
    });
    g.bench_function("upcache_large_folios", |b| {
        b.iter_custom(|iters| {
            let total = timed_passes(&mut lmap, iters, |m| m.flush().unwrap(), &mut lflush);
            lres = Some(common::Residency {
                file_cached: common::file_cached_bytes(&lpath),
                memfd: Some(lfile.memory_bytes()),
                ..Default::default()
            });
            total
        })
    });
    g.bench_function("upcache_hugetlb", |b| {
        b.iter_custom(|iters| {
            let total = timed_passes(&mut hmap, iters, |m| m.flush().unwrap(), &mut hflush);
            hres = Some(common::Residency {
                file_cached: common::file_cached_bytes(&hpath),
                memfd: Some(hfile.memory_bytes()),
                ..Default::default()
            });
            total
        })
    });
    g.finish();
    common::report("mapped_update_random/upcache_hugetlb", &hres);
    println!(
        "mapped_update_random/upcache_hugetlb: {:.1} write-protect userfaults per pass; HugePages_Free {} after",
        (hcache.stats().faults_wp - hwp) as f64 / hflush.1.max(1) as f64,
        common::meminfo("HugePages_Free:")
    );
    assert_eq!(
        hcache.stats().misses,
        hmisses,
        "upcache_hugetlb missed during the updates"
    );
    hmap.flush().unwrap();
    assert!(
        std::fs::read(&hpath).unwrap() == hmap[..],
        "upcache_hugetlb: the flushed file is not what the mapping shows"
    );
    common::report("mapped_update_random/upcache_large_folios", &lres);
    println!(
        "mapped_update_random/upcache_large_folios: {:.1} write-protect userfaults per pass",
        (lcache.stats().faults_wp - lwp) as f64 / lflush.1.max(1) as f64
    );
    assert_eq!(
        lcache.stats().misses,
        lmisses,
        "upcache_large_folios missed during the updates"
    );
    lmap.flush().unwrap();
    assert!(
        std::fs::read(&lpath).unwrap() == lmap[..],
        "upcache_large_folios: the flushed file is not what the mapping shows"
    );
    common::report("mapped_update_random/memmap2", &kres);
    common::report("mapped_update_random/memmap2_4k_ptes", &k4res);
    common::report("mapped_update_random/upcache", &ures);
    common::report("mapped_update_random/upcache_async", &ares);
    for (id, (t, n)) in [
        ("memmap2", kflush),
        ("memmap2_4k_ptes", k4flush),
        ("upcache", uflush),
        ("upcache_async", aflush),
        ("upcache_large_folios", lflush),
        ("upcache_hugetlb", hflush),
    ] {
        println!(
            "mapped_update_random/{id}: untimed flush before each pass: {:.2} ms mean over {n}",
            t.as_secs_f64() * 1e3 / n.max(1) as f64
        );
    }
    assert_eq!(cache.stats().misses, misses, "upcache missed during the updates");
    assert_eq!(
        acache.stats().misses,
        amisses,
        "upcache_async missed during the updates"
    );
    let astats = acache.stats();
    assert_eq!(
        astats.faults_wp, 0,
        "upcache_async took write-protect userfaults: {astats}"
    );
    amap.flush().unwrap();
    assert!(
        std::fs::read(&apath).unwrap() == amap[..],
        "upcache_async: the flushed file is not what the mapping shows"
    );
    println!("upcache_async stats after mapped_update_random: {astats}");
    umap.flush().unwrap();
    assert!(
        std::fs::read(&upath).unwrap() == umap[..],
        "upcache: the flushed file is not what the mapping shows"
    );
    println!("upcache stats after mapped_update_random: {}", cache.stats());
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::mapped_update_random);
}
use group::benches;
criterion_main!(benches);
