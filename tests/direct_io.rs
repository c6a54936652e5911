//! `DirectFileStore` really bypasses the kernel's page cache (issue #11,
//! item 1): reads into buffers that are not 4 KiB-aligned (the default
//! `Missing` mode reads a folio into a `Vec`), reads at end of file and
//! aligned writes all go through `O_DIRECT`, so the file's pages never
//! become resident in the kernel page cache (`mincore` on a fresh mapping)
//! and `direct_fallbacks()` stays 0. Before the fix, an unaligned buffer
//! silently used the buffered descriptor and the file's pages filled the
//! kernel cache.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::{tempdir, watchdog};
use upcache::{DirectFileStore, PageCache, StoreOps, UffdMode, PAGE_SIZE};

/// Pages of `path` resident in the kernel page cache.
fn resident_pages(path: &std::path::Path) -> usize {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only mapping of a file only this test uses; only its
    // address is used (mincore), its bytes are never read.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE)];
    // SAFETY: `map` is a live mapping of `len` bytes; `vec` has one byte
    // per page.
    let r = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore");
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

fn drop_kernel_cache(path: &std::path::Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: fadvise on our own descriptor.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    assert_eq!(
        resident_pages(path),
        0,
        "the kernel cache could not be emptied for the test"
    );
}

#[test]
fn direct_store_never_fills_the_kernel_page_cache() {
    watchdog("direct I/O residency", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        // A size that is not a block multiple: the tail read is short.
        let size = 256 * 1024 + 100;
        let want: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        for mode in [UffdMode::Missing, UffdMode::Minor] {
            std::fs::write(&path, &want).unwrap();
            drop_kernel_cache(&path);
            let store = Arc::new(DirectFileStore::open(&path).expect("O_DIRECT on the test directory"));
            let cache = PageCache::builder().mmap_mode(mode).readahead_bytes(4096).build();
            let file = cache.open_with_ops("direct", StoreOps::new(store.clone())).unwrap();
            // Mapped reads first (page-sized misses), then read_at.
            let map = file.mmap_raw(0, size).unwrap();
            let mut got = vec![0u8; size];
            for p in (0..size).step_by(3 * PAGE_SIZE) {
                let n = PAGE_SIZE.min(size - p);
                map.read(p, &mut got[p..p + n]);
                assert!(got[p..p + n] == want[p..p + n], "{mode:?}: mapped page at {p}");
            }
            file.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{mode:?}: read_at");
            assert_eq!(
                store.direct_fallbacks(),
                0,
                "{mode:?}: reads used the buffered descriptor"
            );
            assert_eq!(
                resident_pages(&path),
                0,
                "{mode:?}: reads left pages in the kernel page cache"
            );
            // Aligned writes (not touching the tail block) stay direct.
            file.write_at(&vec![7u8; 64 * 1024], 64 * 1024).unwrap();
            map.write(4096, &[9u8; 100]);
            file.fsync().unwrap();
            assert_eq!(
                store.direct_fallbacks(),
                0,
                "{mode:?}: aligned writes used the buffered descriptor"
            );
            assert_eq!(
                resident_pages(&path),
                0,
                "{mode:?}: writes left pages in the kernel page cache"
            );
            let disk = std::fs::read(&path).unwrap();
            assert!(disk[64 * 1024..128 * 1024].iter().all(|&b| b == 7), "{mode:?}");
            assert!(disk[4096..4196].iter().all(|&b| b == 9), "{mode:?}");
            // The partial block at end of file is the one buffered write.
            file.write_at(b"tail", size as u64 - 4).unwrap();
            file.fsync().unwrap();
            assert_eq!(store.direct_fallbacks(), 1, "{mode:?}: the tail write is counted");
            assert_eq!(
                file.stats().direct_fallbacks,
                1,
                "{mode:?}: and reported in the file's Stats"
            );
            assert!(
                cache.stats().direct_fallbacks >= 1,
                "{mode:?}: and in the cache's Stats: {}",
                cache.stats()
            );
            assert_eq!(&std::fs::read(&path).unwrap()[size - 4..], b"tail");
            drop(map);
            file.close().unwrap();
        }
    });
}
