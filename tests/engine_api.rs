//! Storage-engine API pieces (issue #10, items 3 and 4, partly): operations
//! shared behind an `Arc` keep every override, and `flush_async` starts
//! writeback of a mapping without waiting.

mod common;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{tempdir, watchdog};
use upcache::{AddressSpace, AddressSpaceOps, FileStore, Folio, FolioGuard, PageCache, StoreOps, WritebackControl};

/// Operations that count `dirty_folio` calls and pin every folio
/// (`release_folio` says no), over a plain file store.
struct Counting {
    inner: StoreOps<FileStore>,
    dirtied: AtomicU64,
}

impl AddressSpaceOps for Counting {
    fn read_folio(&self, m: &AddressSpace, f: FolioGuard) -> io::Result<()> {
        self.inner.read_folio(m, f)
    }
    fn writepage(&self, m: &AddressSpace, f: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()> {
        self.inner.writepage(m, f, wbc)
    }
    fn dirty_folio(&self, _m: &AddressSpace, _f: &Folio) {
        self.dirtied.fetch_add(1, Ordering::Relaxed);
    }
    fn release_folio(&self, _m: &AddressSpace, _f: &FolioGuard) -> bool {
        false
    }
    fn initial_size(&self) -> io::Result<u64> {
        self.inner.initial_size()
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        self.inner.set_size(size)
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(off, len)
    }
    fn fsync(&self) -> io::Result<()> {
        self.inner.fsync()
    }
}

#[test]
fn ops_behind_an_arc_keep_every_override() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
    let ops = Arc::new(Counting {
        inner: StoreOps::new(FileStore::open(&path).unwrap()),
        dirtied: AtomicU64::new(0),
    });
    let cache = PageCache::builder().memory_limit(256 * 1024).build();
    let file = cache.open_with_ops("counting", ops.clone()).unwrap();
    file.write_at(&[9u8; 100], 4096).unwrap();
    assert!(
        ops.dirtied.load(Ordering::Relaxed) > 0,
        "dirty_folio not reached through the Arc"
    );
    let mut buf = vec![0u8; 1 << 20];
    file.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[4096], 9);
    assert_eq!(
        cache.stats().evicted_bytes,
        0,
        "release_folio(false) not honoured through the Arc"
    );
    file.close().unwrap();
}

#[test]
fn flush_async_starts_writeback_without_fsync() {
    watchdog("flush_async", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 256 * 1024]).unwrap();
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        let map = file.mmap_raw(0, 256 * 1024).unwrap();
        map.write(70_000, b"written through the map");
        assert!(cache.stats().dirty_bytes > 0);
        assert!(
            map.flush_async_range(256 * 1024, 1).is_err(),
            "range past the mapping is EINVAL"
        );
        map.flush_async_range(70_000, 10).unwrap();
        // The store's `writepage` writes synchronously: the bytes are in
        // the file (the kernel's page cache) now, and nothing is dirty.
        assert_eq!(
            &std::fs::read(&path).unwrap()[70_000..70_023],
            b"written through the map"
        );
        assert_eq!(cache.stats().dirty_bytes, 0);
        map.write(1000, b"x");
        map.flush_async().unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[1000], b'x');
        drop(map);
        file.close().unwrap();
    });
}
