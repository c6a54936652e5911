//! `mapped_update_random/{memmap2, upcache}` (issue #12): a 256 MiB file
//! on ext4, fully cached and mapped shared-writable, every page written
//! once (8 bytes) in random order per iteration, from one thread. Before
//! each iteration (untimed) the mapping is flushed, so every page starts
//! clean and write-protected: each write is a first write after writeback
//! (ext4 `page_mkwrite` for the kernel mapping, a userfaultfd write-protect
//! round trip through upcache's fault threads).
//!
//! `cargo bench --bench update` (`UPCACHE_BENCH_DIR` places the file).

mod common;
use common::bench_dir;

use std::time::{Duration, Instant};

use criterion::{criterion_main, Criterion, Throughput};
use upcache::{PageCache, Share, PAGE_SIZE};

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

fn mapped_update_random(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let upath = dir.path().join("upcache");
    let kpath = dir.path().join("kernel");
    for p in [&upath, &kpath] {
        std::fs::write(p, vec![7u8; SIZE]).unwrap();
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
    let kfile = std::fs::OpenOptions::new().read(true).write(true).open(&kpath).unwrap();
    // SAFETY: as above.
    let mut kmap = unsafe { memmap2::MmapMut::map_mut(&kfile) }.unwrap();
    let mut sum = 0u64;
    for p in (0..SIZE).step_by(PAGE_SIZE) {
        sum = sum.wrapping_add(umap[p] as u64 + kmap[p] as u64);
    }
    std::hint::black_box(sum);
    let misses = cache.stats().misses;

    let mut g = c.benchmark_group("mapped_update_random");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements((SIZE / PAGE_SIZE) as u64));
    let (mut ures, mut kres) = (None, None);
    g.bench_function("memmap2", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let pages = order(i + 1);
                kmap.flush().unwrap();
                total += pass(&mut kmap, &pages, i);
            }
            kres = Some(common::Residency {
                file_cached: common::file_cached_bytes(&kpath),
                ..Default::default()
            });
            total
        })
    });
    g.bench_function("upcache", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let pages = order(i + 1);
                umap.flush().unwrap();
                total += pass(&mut umap, &pages, i);
            }
            ures = Some(common::Residency {
                file_cached: common::file_cached_bytes(&upath),
                memfd: Some(file.memory_bytes()),
                ..Default::default()
            });
            total
        })
    });
    g.finish();
    common::report("mapped_update_random/memmap2", &kres);
    common::report("mapped_update_random/upcache", &ures);
    assert_eq!(cache.stats().misses, misses, "upcache missed during the updates");
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
