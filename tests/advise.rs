//! `advise`: Sequential / Random readahead behaviour, WillNeed and
//! DontNeed, checked through the cache's counters and the bytes read.

mod common;

use common::tempdir;
use upcache::{Advice, PageCache, PAGE_SIZE};

fn setup(size: usize) -> (tempfile::TempDir, std::path::PathBuf, PageCache, upcache::File) {
    let dir = tempdir();
    let path = dir.path().join("f");
    let data: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
    std::fs::write(&path, data).unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    (dir, path, cache, file)
}

#[test]
fn random_advice_reads_only_what_is_asked() {
    let (_d, _p, cache, file) = setup(8 << 20);
    file.advise(Advice::Random, 0, 0).unwrap();
    let mut b = [0u8; 100];
    file.read_at(&mut b, 3 << 20).unwrap();
    assert_eq!(b[0], ((3usize << 20) % 241) as u8);
    assert_eq!(
        cache.stats().bytes_cached,
        PAGE_SIZE as u64,
        "no readahead under Random"
    );
}

#[test]
fn sequential_advice_reads_the_largest_window_at_once() {
    let (_d, _p, cache, file) = setup(16 << 20);
    file.advise(Advice::Sequential, 0, 0).unwrap();
    let mut b = [0u8; 100];
    file.read_at(&mut b, 0).unwrap();
    let max = upcache::PageCacheBuilder::DEFAULT_READAHEAD_MAX;
    assert!(cache.stats().bytes_cached >= max, "{}", cache.stats());
}

#[test]
fn willneed_prefetches_and_dontneed_drops() {
    let (_d, path, cache, file) = setup(4 << 20);
    file.advise(Advice::WillNeed, 0, 1 << 20).unwrap();
    assert!(cache.stats().bytes_cached >= 1 << 20);
    let misses = cache.stats().misses;
    let mut buf = vec![0u8; 1 << 20];
    file.read_at(&mut buf, 0).unwrap();
    assert_eq!(cache.stats().misses, misses, "prefetched range reads without a miss");

    // Dirty part of it, then DontNeed: written back, then dropped.
    file.write_at(b"dontneed", 4096).unwrap();
    file.advise(Advice::DontNeed, 0, 4 << 20).unwrap();
    let s = cache.stats();
    assert_eq!(s.dirty_bytes, 0);
    assert_eq!(s.bytes_cached, 0, "clean unused folios dropped: {s}");
    assert_eq!(&std::fs::read(&path).unwrap()[4096..4104], b"dontneed");
    file.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[4096..4104], b"dontneed");
    assert_eq!(buf[10], 10);
    // Length 0 means "to the end of the file", as posix_fadvise(2) has it.
    file.write_at(b"tail", 3 << 20).unwrap();
    file.advise(Advice::DontNeed, 1 << 20, 0).unwrap();
    let s = cache.stats();
    assert_eq!(s.dirty_bytes, 0, "DontNeed to the end wrote the tail back: {s}");
    assert_eq!(&std::fs::read(&path).unwrap()[3 << 20..(3 << 20) + 4], b"tail");
    // From the end or past it: nothing to do.
    file.advise(Advice::DontNeed, u64::MAX, 0).unwrap();
    file.advise(Advice::WillNeed, u64::MAX, 0).unwrap();
    let before = cache.stats().bytes_cached;
    file.advise(Advice::WillNeed, 2 << 20, 0).unwrap();
    assert!(
        cache.stats().bytes_cached >= before + (2 << 20),
        "WillNeed to the end read the rest of the file"
    );
}

/// `DontNeed` of a range whose last byte is the first byte of a page drops
/// that page too (its end page was computed one short: `(4096, 1)` dropped
/// nothing while `(4096, 2)` dropped page 1).
#[test]
fn dontneed_of_one_byte_drops_its_page() {
    let dir = common::tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![5u8; 16 * 4096]).unwrap();
    let cache = upcache::PageCache::builder()
        .readahead_bytes(4096)
        .readahead_max_bytes(4096)
        .build();
    let file = cache.open(&path).unwrap();
    let mut b = [0u8; 1];
    for p in 0..4u64 {
        file.read_at(&mut b, p * 4096).unwrap();
    }
    let m = file.address_space().unwrap();
    assert!(m
        .filemap_get_folio(upcache::aops::PgOff(1))
        .is_some_and(|f| f.nr_pages() == 1));
    file.advise(upcache::Advice::DontNeed, 4096, 1).unwrap();
    assert!(
        m.filemap_get_folio(upcache::aops::PgOff(1)).is_none(),
        "page 1 still cached"
    );
    assert!(
        m.filemap_get_folio(upcache::aops::PgOff(2)).is_some(),
        "page 2 was not asked for"
    );
}
