//! Storage-engine API pieces (issue #10, items 3 and 4, partly): operations
//! shared behind an `Arc` keep every override, and `flush_async` starts
//! writeback of a mapping without waiting.

mod common;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{tempdir, watchdog};
use upcache::aops::{AddressSpace, AddressSpaceOps, Folio, FolioGuard, WritebackControl};
use upcache::{FileStore, PageCache, StoreOps};

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

#[test]
fn options_create_truncate_and_read_only() {
    let dir = tempdir();
    let path = dir.path().join("new");
    let cache = PageCache::new();
    // Missing without create: the error names the path.
    let e = cache.open(&path).unwrap_err();
    assert_eq!(e.raw_os_error(), libc::ENOENT);
    assert!(e.to_string().contains("new"), "{e}");
    let rw = cache.options().create(true).open(&path).unwrap();
    rw.write_at(b"hello world", 0).unwrap();
    // A read-only handle shares the address space: it sees the cached
    // write before any writeback, and cannot write.
    let ro = cache.options().write(false).open(&path).unwrap();
    assert!(!ro.is_writable());
    let mut b = [0u8; 11];
    ro.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"hello world");
    for e in [ro.write_at(b"x", 0).unwrap_err(), ro.punch_hole(0, 1).unwrap_err()] {
        assert!(matches!(e, upcache::Error::ReadOnly), "{e}");
        assert_eq!(e.raw_os_error(), libc::EBADF);
    }
    // The kernel's errnos for these two (`ftruncate(2)`, `mmap(2)`).
    assert_eq!(ro.truncate(0).unwrap_err().raw_os_error(), libc::EINVAL);
    assert_eq!(ro.mmap_raw(0, 4096).unwrap_err().raw_os_error(), libc::EACCES);
    assert!(cache.options().write(false).create(true).open(&path).is_err());
    // A private writable mapping of a read-only handle is allowed, as
    // mmap(2) allows MAP_PRIVATE + PROT_WRITE on an O_RDONLY descriptor:
    // its writes are copies that never reach the file.
    {
        // SAFETY: the mapping is read and written only through short-lived
        // borrows, never while another writer changes the same bytes.
        let mut p =
            unsafe { ro.mmap_mut(0, 4096, upcache::Share::Private) }.expect("private mapping of a read-only handle");
        p[0] = b'J';
        assert_eq!(p[0], b'J');
    }
    ro.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"hello world", "a private write reached the file");
    // truncate(true) goes through the cache: the other handles see it.
    let t = cache.options().truncate(true).open(&path).unwrap();
    assert_eq!(t.len().unwrap(), 0);
    assert_eq!(rw.len().unwrap(), 0, "truncate-on-open bypassed the cache");
    rw.write_at(b"again", 0).unwrap();
    rw.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"again");
}

#[test]
fn open_file_shares_the_address_space_of_a_path_open() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    let cache = PageCache::new();
    let by_path = cache.open(&path).unwrap();
    let fd = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let by_fd = cache.open_file(fd).unwrap();
    assert!(std::ptr::eq(
        by_path.address_space().unwrap(),
        by_fd.address_space().unwrap()
    ));
    by_fd.write_at(&[9], 100).unwrap();
    let mut b = [0u8; 1];
    by_path.read_exact_at(&mut b, 100).unwrap();
    assert_eq!(b[0], 9);
    // A read-only descriptor gives a read-only handle.
    let ro = cache.open_file(std::fs::File::open(&path).unwrap()).unwrap();
    assert!(matches!(ro.write_at(&[1], 0), Err(upcache::Error::ReadOnly)));
    // While a file is cached from a read-only descriptor, a writable open
    // is refused with the errno the docs give (it read EIO).
    let path2 = dir.path().join("g");
    std::fs::write(&path2, vec![1u8; 4096]).unwrap();
    let ro2 = cache.open_file(std::fs::File::open(&path2).unwrap()).unwrap();
    assert_eq!(cache.open(&path2).unwrap_err().raw_os_error(), libc::EACCES);
    let rw = std::fs::OpenOptions::new().read(true).write(true).open(&path2).unwrap();
    assert_eq!(cache.open_file(rw).unwrap_err().raw_os_error(), libc::EACCES);
    drop(ro2);
    // A write-only descriptor cannot be cached.
    let wo = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    assert_eq!(cache.open_file(wo).unwrap_err().raw_os_error(), libc::EINVAL);
}

/// `pwrite(2)` on an `O_APPEND` descriptor ignores its offset and appends
/// (Linux): a store over such a descriptor would write every folio at the
/// end of the file. Refused up front, as is `O_DIRECT` (the buffered store
/// hands it unaligned buffers; `DirectFileStore` is the O_DIRECT store).
#[test]
fn open_file_refuses_append_and_direct_descriptors() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; 8192]).unwrap();
    let cache = PageCache::new();
    let fd = std::fs::OpenOptions::new().read(true).append(true).open(&path).unwrap();
    match cache.open_file(fd) {
        Err(e) => assert_eq!(e.raw_os_error(), libc::EINVAL, "{e}"),
        Ok(f) => {
            // What the bug did: the write lands at the end of the file.
            f.write_at(b"X", 0).unwrap();
            f.fsync().unwrap();
            let disk = std::fs::read(&path).unwrap();
            panic!(
                "O_APPEND descriptor accepted: byte 0 is {}, file {} bytes",
                disk[0],
                disk.len()
            );
        }
    }
    use std::os::unix::fs::OpenOptionsExt;
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    assert_eq!(cache.open_file(fd).unwrap_err().raw_os_error(), libc::EINVAL);
    // A store built from an O_APPEND descriptor refuses to write rather
    // than append.
    let fd = std::fs::OpenOptions::new().read(true).append(true).open(&path).unwrap();
    let f = cache
        .open_with_ops("appending", StoreOps::new(FileStore::from_file(fd)))
        .unwrap();
    f.write_at(b"X", 0).unwrap();
    assert!(f.fsync().is_err(), "a write through an O_APPEND descriptor must fail");
    assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 8192], "the file is untouched");
    drop(f);
}

#[test]
fn ops_downcast_back_to_the_engine_type() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 4096]).unwrap();
    let cache = PageCache::new();
    let f = cache.open(&path).unwrap();
    let m = f.address_space().unwrap();
    let store = m
        .ops_as::<StoreOps<FileStore>>()
        .map(StoreOps::store)
        .expect("StoreOps<FileStore>");
    assert_eq!(store.file().metadata().unwrap().len(), 4096);
    assert!(m.ops_as::<Counting>().is_none());
    let g = cache
        .open_with_ops(
            "counting",
            Counting {
                inner: StoreOps::new(FileStore::open(&path).unwrap()),
                dirtied: AtomicU64::new(0),
            },
        )
        .unwrap();
    g.write_at(&[2], 0).unwrap();
    let c = g.address_space().unwrap().ops_as::<Counting>().expect("Counting");
    assert_eq!(c.dirtied.load(Ordering::Relaxed), 1);
}

#[test]
fn per_file_stats_add_up_to_the_cache_stats() {
    let dir = tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, vec![1u8; 64 * 1024]).unwrap();
    std::fs::write(&b, vec![2u8; 64 * 1024]).unwrap();
    let cache = PageCache::new();
    let fa = cache.open(&a).unwrap();
    let fb = cache.open(&b).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    fa.read_exact_at(&mut buf, 0).unwrap();
    fa.read_exact_at(&mut buf, 0).unwrap();
    fb.write_at(&[3; 4096], 0).unwrap();
    let (sa, sb, sc) = (fa.stats(), fb.stats(), cache.stats());
    assert!(sa.misses > 0 && sa.hits > 0, "{sa}");
    assert_eq!(sa.dirty_bytes, 0);
    assert_eq!(sb.dirty_bytes, 4096, "{sb}");
    assert_eq!(sb.hits + sb.misses, 0, "a write counted as a read: {sb}");
    assert_eq!(sa.hits + sb.hits, sc.hits);
    assert_eq!(sa.misses + sb.misses, sc.misses);
    assert_eq!(sa.bytes_cached + sb.bytes_cached, sc.bytes_cached);
    assert_eq!(sa.dirty_bytes + sb.dirty_bytes, sc.dirty_bytes);
    // Display shows every counter, throttling included.
    assert!(sc.to_string().contains("throttled"), "{sc}");
}

#[test]
fn remap_grows_a_mapping_and_keeps_its_writes() {
    watchdog("remap", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        // SAFETY: only this thread touches the mapping.
        let mut map = unsafe { file.mmap_mut(0, 8192, upcache::Share::Shared) }.unwrap();
        map[100] = 7;
        // SAFETY: as above.
        unsafe { map.remap(64 * 1024) }.unwrap();
        assert_eq!(map.len(), 64 * 1024);
        assert_eq!(map[100], 7, "remap lost a write");
        map[40 * 1024] = 9;
        map.flush().unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert_eq!((disk[100], disk[40 * 1024]), (7, 9));
        // Shrink, and the raw mapping.
        // SAFETY: as above.
        unsafe { map.remap(4096) }.unwrap();
        assert_eq!(map.len(), 4096);
        let mut raw = file.mmap_raw(0, 4096).unwrap();
        raw.remap(16384).unwrap();
        raw.write(12000, &[5]);
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 12000).unwrap();
        assert_eq!(b[0], 5);
        // A private mapping cannot be remapped without losing its pages.
        // SAFETY: as above.
        let mut private = unsafe { file.mmap_mut(0, 4096, upcache::Share::Private) }.unwrap();
        private[0] = 1;
        // SAFETY: as above.
        let e = unsafe { private.remap(8192) }.unwrap_err();
        assert_eq!(e.raw_os_error(), libc::EINVAL);
        assert_eq!(private[0], 1, "a failed remap changed the mapping");
    });
}

#[test]
fn remap_to_a_bad_length_is_an_error_and_keeps_the_mapping() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![3u8; 8192]).unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    let mut raw = file.mmap_raw(0, 8192).unwrap();
    for bad in [
        0usize,
        usize::MAX,
        (upcache::MAX_FILE_SIZE as usize).saturating_add(4096),
    ] {
        let e = raw.remap(bad).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), libc::EINVAL | libc::EFBIG),
            "remap({bad}): {e}"
        );
    }
    let mut b = [0u8; 1];
    raw.read(8191, &mut b);
    assert_eq!(b[0], 3, "a failed remap broke the mapping");
}

/// The page store is one memfd per cache with a region per file: each
/// file's `memory_bytes` counts its own region only, the cache's counts
/// them all, and a file's memory is freed (and its region given back) when
/// it is closed and dropped.
#[test]
fn memory_bytes_per_file_and_per_cache() {
    let dir = tempdir();
    let a_path = dir.path().join("a");
    let b_path = dir.path().join("b");
    std::fs::write(&a_path, vec![1u8; 1 << 20]).unwrap();
    std::fs::write(&b_path, vec![2u8; 256 << 10]).unwrap();
    let cache = PageCache::new();
    let a = cache.open(&a_path).unwrap();
    let b = cache.open(&b_path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    a.read_exact_at(&mut buf, 0).unwrap();
    b.read_exact_at(&mut buf[..256 << 10], 0).unwrap();
    assert_eq!(a.memory_bytes(), 1 << 20, "file a's region");
    assert_eq!(b.memory_bytes(), 256 << 10, "file b's region");
    assert_eq!(cache.memory_bytes(), (1 << 20) + (256 << 10), "the cache's memfd");
    a.close().unwrap();
    drop(a);
    // The folios of a dropped file are freed after an epoch grace period
    // (RCU-like: a lockless reader may still be looking at one); the last
    // one gives the region back, punched. Let the grace period pass.
    for _ in 0..10_000 {
        if cache.memory_bytes() == 256 << 10 {
            break;
        }
        upcache::sync::epoch::pin().flush();
    }
    assert_eq!(cache.memory_bytes(), 256 << 10, "a's memory freed once it was dropped");
    assert_eq!(b.memory_bytes(), 256 << 10);
    // A file opened into a's old region starts empty.
    let c = cache.open(&a_path).unwrap();
    assert_eq!(c.memory_bytes(), 0);
    c.read_exact_at(&mut buf[..4096], 0).unwrap();
    assert_eq!(buf[0], 1);
}

/// `VmArea::pgoff_of_addr` answers only for the mapping's own addresses
/// (its predecessor, a public `addr_to_pgoff`, wrapped below the start in
/// release builds and answered past the end).
#[test]
fn a_mapping_translates_only_its_own_addresses() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 4 * 4096]).unwrap();
    let cache = PageCache::new();
    let f = cache.open(&path).unwrap();
    // SAFETY: nothing writes the file while it is mapped.
    let map = unsafe { f.mmap(4096, 2 * 4096, upcache::Share::Shared) }.unwrap();
    let vma = map.vma();
    let page = |a: usize| vma.pgoff_of_addr(a).map(|p| p.0);
    assert_eq!(page(vma.start()), Some(1));
    assert_eq!(page(vma.start() + 4096 + 17), Some(2));
    assert_eq!(page(vma.end() - 1), Some(2));
    assert_eq!(page(vma.end()), None);
    assert_eq!(page(vma.start() - 1), None);
    assert_eq!(page(0), None);
    assert_eq!(page(usize::MAX), None);
}

/// A file cached from a read-only descriptor has a store that cannot
/// write: its address space refuses writes too (`ReadOnly`, `EBADF`), as
/// its handles do. They used to succeed through `File::address_space()`,
/// leaving folios dirty that no write-back could ever clean (every `fsync`
/// failed). A file whose store can write accepts them from any handle:
/// the address space is the file, shared by all its handles (README).
#[test]
fn the_address_space_of_a_read_only_store_refuses_writes() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    let cache = PageCache::new();
    let ro = cache.open_file(std::fs::File::open(&path).unwrap()).unwrap();
    let m = ro.address_space().unwrap();
    let errno = |r: upcache::Result<()>| r.err().map(|e| e.raw_os_error());
    assert_eq!(errno(m.write_at(b"X", 0).map(drop)), Some(libc::EBADF));
    assert_eq!(errno(m.truncate(4096)), Some(libc::EBADF));
    assert_eq!(errno(m.punch_hole(0, 4096)), Some(libc::EBADF));
    // SAFETY: nothing maps the file.
    assert_eq!(errno(unsafe { m.read_cache_page_mut(0) }.map(drop)), Some(libc::EBADF));
    ro.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 8192]);
    assert_eq!(ro.stats().dirty_bytes, 0);
}

/// Bad offsets and modes get the kernel's errno, each compared with the
/// kernel's own answer on the same file (`pread`/`pwrite`/`ftruncate`/
/// `fallocate`/`mmap` on a descriptor of the same mode): an offset past
/// `i64::MAX` or a range overflowing it is `EINVAL` (`rw_verify_area`,
/// even for an empty write), a `truncate` past it or through a read-only
/// handle is `EINVAL`, a writable shared mapping of a read-only handle is
/// `EACCES`. upcache answered `Ok(0)`, `EFBIG` and `EBADF` there.
#[test]
fn errnos_for_bad_offsets_and_modes_match_the_kernel() {
    use std::os::fd::AsRawFd;
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    let rw = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let ro = std::fs::File::open(&path).unwrap();
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap();
    let kernel = |r: isize| if r < 0 { errno() } else { 0 };
    let cache = PageCache::new();
    let f = cache.open(&path).unwrap();
    let fro = cache.options().write(false).open(&path).unwrap();
    let up = |r: upcache::Result<()>| r.err().map_or(0, |e| e.raw_os_error());
    let mut b = [0u8; 10];
    let big = 1u64 << 63;
    let near = i64::MAX as u64 - 5;
    let rows: Vec<(&str, i32, i32)> = vec![
        (
            "read at 2^63",
            kernel(
                /* SAFETY: a valid descriptor and buffer. */
                unsafe { libc::pread(rw.as_raw_fd(), b.as_mut_ptr().cast(), 10, big as i64) },
            ),
            up(f.read_at(&mut b, big).map(drop)),
        ),
        (
            "read across i64::MAX",
            kernel(
                /* SAFETY: a valid descriptor and buffer. */
                unsafe { libc::pread(rw.as_raw_fd(), b.as_mut_ptr().cast(), 10, near as i64) },
            ),
            up(f.read_at(&mut b, near).map(drop)),
        ),
        (
            "empty write at 2^63",
            kernel(
                /* SAFETY: a valid descriptor and buffer. */
                unsafe { libc::pwrite(rw.as_raw_fd(), b.as_ptr().cast(), 0, big as i64) },
            ),
            up(f.write_at(&[], big).map(drop)),
        ),
        (
            "write at 2^63",
            kernel(
                /* SAFETY: a valid descriptor and buffer. */
                unsafe { libc::pwrite(rw.as_raw_fd(), b.as_ptr().cast(), 1, big as i64) },
            ),
            up(f.write_at(&b[..1], big).map(drop)),
        ),
        (
            "truncate to 2^63",
            kernel(
                /* SAFETY: a valid descriptor and buffer. */
                unsafe { libc::ftruncate(rw.as_raw_fd(), big as i64) } as isize,
            ),
            up(f.truncate(big)),
        ),
        (
            "truncate through a read-only handle",
            kernel(
                /* SAFETY: a valid descriptor and buffer. */
                unsafe { libc::ftruncate(ro.as_raw_fd(), 4096) } as isize,
            ),
            up(fro.truncate(4096)),
        ),
        (
            "punch at 2^63",
            {
                let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: a valid descriptor.
                kernel(unsafe { libc::fallocate(rw.as_raw_fd(), punch, big as i64, 4096) } as isize)
            },
            up(f.punch_hole(big, 4096)),
        ),
        (
            "shared writable mapping of a read-only handle",
            {
                // SAFETY: a fresh mapping of a valid descriptor.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        ro.as_raw_fd(),
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    errno()
                } else {
                    // SAFETY: the mapping just made, unused.
                    unsafe { libc::munmap(p, 4096) };
                    0
                }
            },
            up(fro.mmap_raw(0, 4096).map(drop)),
        ),
    ];
    for (what, k, _) in &rows {
        assert_ne!(*k, 0, "{what}: the kernel accepted it");
    }
    let wrong: Vec<_> = rows.iter().filter(|(_, k, u)| k != u).collect();
    assert!(wrong.is_empty(), "(operation, kernel errno, upcache errno): {wrong:?}");
    assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 8192]);
}

/// The engine-facing folio methods given a folio of another file panic
/// with a message instead of corrupting both files: `folio_clear_dirty_for_io`
/// of file `a` on `b`'s dirty folio zeroed `b`'s cached bytes past `a`'s
/// size (100), which `b`'s next `fsync` wrote to disk, and wrapped `a`'s
/// dirty count.
#[test]
fn folio_methods_refuse_a_folio_of_another_file() {
    let dir = tempdir();
    let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&pa, vec![1u8; 100]).unwrap();
    std::fs::write(&pb, vec![2u8; 8192]).unwrap();
    let cache = PageCache::new();
    let a = cache.open(&pa).unwrap();
    let b = cache.open(&pb).unwrap();
    b.write_at(b"X", 0).unwrap();
    type Call = fn(&AddressSpace, FolioGuard);
    let calls: [(&str, Call); 4] = [
        ("folio_clear_dirty_for_io", |m, g| {
            let _ = m.folio_clear_dirty_for_io(&g);
        }),
        ("folio_mark_dirty", |m, g| m.folio_mark_dirty(&g)),
        ("redirty_for_writepage", |m, g| {
            m.redirty_for_writepage(&mut WritebackControl::all(0, u64::MAX), g)
        }),
        ("folio_start_writeback", |m, g| drop(m.folio_start_writeback(g))),
    ];
    for (what, call) in calls {
        let g = b
            .address_space()
            .unwrap()
            .filemap_lock_folio(upcache::aops::PgOff(0))
            .unwrap();
        let space_a = a.address_space().unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(space_a, g)));
        let msg = r.expect_err(what);
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("not this file's"), "{what}: {msg}");
    }
    let mut back = vec![0u8; 8192];
    assert_eq!(b.read_at(&mut back, 0).unwrap(), 8192);
    assert_eq!(back[0], b'X');
    assert!(back[1..].iter().all(|&x| x == 2), "b's cached bytes changed");
    b.fsync().unwrap();
    let disk = std::fs::read(&pb).unwrap();
    assert_eq!(disk[0], b'X');
    assert!(disk[1..].iter().all(|&x| x == 2), "b's bytes on disk changed");
    assert_eq!(a.stats().dirty_bytes, 0);
    drop(a);
}
