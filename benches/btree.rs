//! The B+tree of `examples/btree.rs` (issue #10's storage-engine bench),
//! three ways to reach its pages, same run:
//!
//! - `upcache_pinned`: `File::get_page` / `get_page_mut` per node;
//! - `upcache_mmap`: an upcache shared mapping of the data file, as a slice;
//! - `memmap2`: a kernel mapping of the data file.
//!
//! Groups:
//! - `btree_lookup`: 1,000,000 keys (32 MiB file on ext4, all cached), 2
//!   threads × 10,000 random existing keys per iteration;
//! - `btree_scan`: the same tree, 2 threads × 1,000 range scans of 100 rows
//!   from random keys per iteration;
//! - `btree_insert`: a fresh tree per iteration in its own file (formatted
//!   in place), 20,000 keys inserted in random order by one thread, no
//!   flush (the cost of the tree's page traffic, cached).
//!
//! `cargo bench --bench btree` (`UPCACHE_BENCH_DIR` places the files).

use std::time::{Duration, Instant};

use criterion::{criterion_main, Criterion};

mod common;
use common::bench_dir;
use upcache::{PageCache, Share, PAGE_SIZE};

#[path = "../examples/btree.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod btree;

const KEYS: u64 = 1_000_000;
const LOOKUPS: usize = 10_000;
const SCANS: usize = 1_000;
const INSERTS: u64 = 20_000;

/// `n` random keys of the tree (every key is a multiple of 3).
fn keys(seed: u64, n: usize) -> Vec<u64> {
    common::random_below(seed, n, KEYS).into_iter().map(|k| k * 3).collect()
}

/// 2 threads, each running `f` over its own key list (iteration `iter`).
fn two_threads(n: usize, iter: u64, f: &(impl Fn(u64) + Sync)) -> Duration {
    common::two_threads([keys(iter * 2 + 1, n), keys(iter * 2 + 2, n)], f)
}

fn read_side<P: btree::PagesRead + ?Sized + Sync>(c: &mut Criterion, id: &str, pages: &P) {
    let mut g = c.benchmark_group("btree_lookup");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|i| {
                    two_threads(LOOKUPS, i, &|k| {
                        assert_eq!(btree::get(pages, k), Some(btree::value_of(k)));
                    })
                })
                .sum()
        })
    });
    g.finish();
    let mut g = c.benchmark_group("btree_scan");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|i| {
                    two_threads(SCANS, i + 1000, &|k| {
                        let mut out = Vec::with_capacity(100);
                        btree::scan(pages, k, 100, &mut out);
                        assert_eq!(out.first().map(|e| e.0), Some(k));
                        assert!(out.len() == 100 || k / 3 + out.len() as u64 == KEYS);
                    })
                })
                .sum()
        })
    });
    g.finish();
}

/// Time inserting INSERTS keys into a freshly formatted tree.
fn insert_pass(pages: &mut impl btree::Pages) -> Duration {
    let t = Instant::now();
    btree::format(pages);
    for i in 0..INSERTS {
        let k = btree::key_at(i, INSERTS);
        btree::insert(pages, k, btree::value_of(k));
    }
    t.elapsed()
}

fn btree_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let data = dir.path().join("btree.data");
    let cache = PageCache::new();
    let pages = btree::build(&cache, &data, KEYS).unwrap();
    let len = pages as usize * PAGE_SIZE;
    println!("btree: {KEYS} keys, {pages} pages ({} MiB)", len >> 20);

    let file = cache.open(&data).unwrap();
    // SAFETY: nothing writes the data file while the read benchmarks run.
    let umap = unsafe { file.mmap(0, len, Share::Shared) }.unwrap();
    let std_file = std::fs::File::open(&data).unwrap();
    // SAFETY: as above.
    let kmap = unsafe { memmap2::Mmap::map(&std_file) }.unwrap();
    // Warm every side: one lookup of every key.
    for k in 0..KEYS {
        assert_eq!(btree::get(&file, k * 3), Some(btree::value_of(k * 3)));
        assert_eq!(btree::get(&umap[..], k * 3), Some(btree::value_of(k * 3)));
        assert_eq!(btree::get(&kmap[..], k * 3), Some(btree::value_of(k * 3)));
    }
    let misses = cache.stats().misses;
    read_side(c, "upcache_pinned", &file);
    read_side(c, "upcache_mmap", &umap[..]);
    read_side(c, "memmap2", &kmap[..]);
    assert_eq!(cache.stats().misses, misses, "upcache missed during the btree reads");
    drop(umap);

    // Inserts: one file per side, sized for the tree, cached/mapped first.
    let ins_pages = btree::capacity_pages(INSERTS);
    let ins_len = ins_pages as usize * PAGE_SIZE;
    let mut g = c.benchmark_group("btree_insert");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    {
        let p = dir.path().join("ins-pinned");
        std::fs::write(&p, vec![0u8; ins_len]).unwrap();
        let f = cache.options().write(true).open(&p).unwrap();
        let mut t = btree::Pinned(&f);
        g.bench_function("upcache_pinned", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| insert_pass(&mut t)).sum())
        });
        assert_eq!(btree::get(&f, 0), Some(btree::value_of(0)));
    }
    {
        let p = dir.path().join("ins-umap");
        std::fs::write(&p, vec![0u8; ins_len]).unwrap();
        let f = cache.options().write(true).open(&p).unwrap();
        // SAFETY: only this thread touches the mapping.
        let mut m = unsafe { f.mmap_mut(0, ins_len, Share::Shared) }.unwrap();
        let mut t: &mut [u8] = &mut m;
        g.bench_function("upcache_mmap", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| insert_pass(&mut t)).sum())
        });
        assert_eq!(btree::get(&m[..], 0), Some(btree::value_of(0)));
    }
    {
        let p = dir.path().join("ins-kernel");
        std::fs::write(&p, vec![0u8; ins_len]).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        // SAFETY: only this thread touches the mapping.
        let mut m = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
        let mut t: &mut [u8] = &mut m;
        g.bench_function("memmap2", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| insert_pass(&mut t)).sum())
        });
        assert_eq!(btree::get(&m[..], 0), Some(btree::value_of(0)));
    }
    g.finish();
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::btree_benches);
}
use group::benches;
criterion_main!(benches);
