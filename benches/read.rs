//! `read_4k_random`: 4 KiB reads at random page-aligned offsets of a fully
//! cached 256 MiB file, through upcache (`File::read_at`) and through
//! `pread(2)` on the same file with the kernel's page cache warm. Both are
//! measured in the same run on the same file and offsets, with a third
//! reference, `memcpy_floor`: the bare 4 KiB copy from a random page of a
//! 256 MiB in-memory buffer, which no cache can beat.
//!
//! `page_get_hit/{upcache_pin, upcache_pin_large_folios, upcache_read_at, kernel_mmap}`: what an
//! engine's page lookup costs on a hit, on the same file and offsets: get
//! a random cached page and read one `u64` from it. `upcache_pin` pins it
//! in place (`File::get_page`, no system call, no copy), `upcache_read_at`
//! copies the 4 KiB page out (`File::read_at`), `kernel_mmap` loads from a
//! kernel mapping of the file, every page already mapped (populated).
//! `upcache_pin_large_folios` pins in a cache with `large_folios(true)`
//! filled while the bench holds shmem THP at `always` (root; restored
//! after the fill), whose engine view maps 2 MiB huge pages with PMDs.
//!
//! `cargo bench --bench read` (set `UPCACHE_BENCH_DIR` to place the file).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use criterion::{criterion_main, Criterion, Throughput};
use upcache::PageCache;

mod common;
use common::bench_dir;

const FILE_SIZE: u64 = 256 << 20;
const READ: usize = 4096;

fn offsets(n: usize) -> Vec<u64> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (FILE_SIZE / READ as u64)) * READ as u64
        })
        .collect()
}

/// A `FILE_SIZE` file of known bytes on the bench filesystem, synced.
fn make_file(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let path = dir.path().join(name);
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let f = std::fs::File::create(&path).unwrap();
    for i in 0..FILE_SIZE / chunk.len() as u64 {
        f.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
    }
    f.sync_all().unwrap();
    (dir, path)
}

fn read_4k_random(c: &mut Criterion) {
    let (_dir, path) = make_file("read-bench");
    let std_file = std::fs::File::open(&path).unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    // Warm both caches completely.
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..FILE_SIZE).step_by(buf.len()) {
        std_file.read_exact_at(&mut buf, off).unwrap();
        file.read_exact_at(&mut buf, off).unwrap();
    }
    let warm = cache.stats();
    let offs = offsets(1 << 16);
    let mut buf = vec![0u8; READ];

    let mut g = c.benchmark_group("read_4k_random");
    g.throughput(Throughput::Bytes(READ as u64));
    g.sample_size(50);
    let mut i = 0usize;
    g.bench_function("upcache", |b| {
        b.iter(|| {
            i = (i + 1) & (offs.len() - 1);
            file.read_at(&mut buf, offs[i]).unwrap()
        })
    });
    let mut j = 0usize;
    g.bench_function("pread", |b| {
        b.iter(|| {
            j = (j + 1) & (offs.len() - 1);
            std_file.read_at(&mut buf, offs[j]).unwrap()
        })
    });
    // The physical floor: the same 4 KiB copy from a random page of a
    // 256 MiB buffer already in memory, with no cache around it.
    let floor: Vec<u8> = vec![1u8; FILE_SIZE as usize];
    let mut k = 0usize;
    g.bench_function("memcpy_floor", |b| {
        b.iter(|| {
            k = (k + 1) & (offs.len() - 1);
            let off = offs[k] as usize;
            buf.copy_from_slice(&floor[off..off + READ]);
            std::hint::black_box(&buf);
        })
    });
    g.finish();
    // The upcache side really was all hits.
    assert_eq!(cache.stats().misses, warm.misses, "upcache missed during the benchmark");
}

fn page_get_hit(c: &mut Criterion) {
    let (_dir, path) = make_file("page-get-bench");
    let std_file = std::fs::File::open(&path).unwrap();
    // SAFETY: a private read-only view of a file nobody writes meanwhile.
    let kmap = unsafe { memmap2::MmapOptions::new().populate().map(&std_file) }.unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..FILE_SIZE).step_by(buf.len()) {
        file.read_exact_at(&mut buf, off).unwrap();
    }
    let warm = cache.stats();
    let offs = offsets(1 << 16);
    let word = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap());

    let mut g = c.benchmark_group("page_get_hit");
    g.sample_size(50);
    let mut i = 0usize;
    g.bench_function("upcache_pin", |b| {
        b.iter(|| {
            i = (i + 1) & (offs.len() - 1);
            // SAFETY: nothing maps the file.
            let page = unsafe { file.get_page(offs[i] / READ as u64) }.unwrap();
            word(&page, i & 0xff8)
        })
    });
    // Large folios filled with shmem THP at `always` (root; restored
    // after the fill): the engine view maps each 2 MiB folio with a PMD.
    let (lcache, lfile) = {
        let _thp = common::ShmemThp::always().expect("shmem THP knob (root)");
        let lcache = PageCache::builder().large_folios(true).build();
        let lfile = lcache.open(&path).unwrap();
        for off in (0..FILE_SIZE).step_by(buf.len()) {
            lfile.read_exact_at(&mut buf, off).unwrap();
        }
        (lcache, lfile)
    };
    let lwarm = lcache.stats();
    let mut l = 0usize;
    g.bench_function("upcache_pin_large_folios", |b| {
        b.iter(|| {
            l = (l + 1) & (offs.len() - 1);
            // SAFETY: nothing maps the file.
            let page = unsafe { lfile.get_page(offs[l] / READ as u64) }.unwrap();
            word(&page, l & 0xff8)
        })
    });
    assert_eq!(lcache.stats().misses, lwarm.misses, "upcache (large folios) missed");
    let mut page = vec![0u8; READ];
    let mut j = 0usize;
    g.bench_function("upcache_read_at", |b| {
        b.iter(|| {
            j = (j + 1) & (offs.len() - 1);
            file.read_exact_at(&mut page, offs[j]).unwrap();
            word(&page, j & 0xff8)
        })
    });
    let mut k = 0usize;
    g.bench_function("kernel_mmap", |b| {
        b.iter(|| {
            k = (k + 1) & (offs.len() - 1);
            let off = offs[k] as usize;
            word(&kmap[off..off + READ], k & 0xff8)
        })
    });
    g.finish();
    assert_eq!(cache.stats().misses, warm.misses, "upcache missed during page_get_hit");
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::read_4k_random, super::page_get_hit);
}
use group::benches;
criterion_main!(benches);
