//! A fault-injecting store: read errors, write errors (EIO, ENOSPC) and
//! short reads. Errors must reach the caller, leave no folio falsely
//! uptodate, never drop dirty data silently, and never hang or panic.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use common::{tempdir, watchdog, Rng};
use upcache::aops::PgOff;
use upcache::{BackingStore, Error, FileStore, PageCache, StoreOps, PAGE_SIZE};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

#[derive(Default)]
struct Switches {
    /// errno for reads (0: healthy)
    read_err: AtomicI32,
    /// errno for writes (0: healthy)
    write_err: AtomicI32,
    /// largest read a single call returns (0: unlimited)
    short_read: AtomicUsize,
    /// writes attempted
    writes: AtomicUsize,
    sync_fails: AtomicBool,
    /// reads claim one byte more than asked (a store bug)
    over_read: AtomicBool,
    /// a read at a page-aligned offset returns 2000 bytes, any other
    /// read fails with EIO (a read that tears: data, then an error)
    torn: AtomicBool,
    /// reads claim every byte asked for and write none (a store bug)
    phantom: AtomicBool,
}

struct Faulty {
    inner: FileStore,
    sw: Arc<Switches>,
}

impl BackingStore for Faulty {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let e = self.sw.read_err.load(Relaxed);
        if e != 0 {
            return Err(io::Error::from_raw_os_error(e));
        }
        if self.sw.phantom.load(Relaxed) {
            return Ok(buf.len());
        }
        if self.sw.over_read.load(Relaxed) {
            return self.inner.read_at(buf, off).map(|n| n + 1);
        }
        if self.sw.torn.load(Relaxed) {
            if off % PAGE_SIZE as u64 != 0 {
                return Err(io::Error::from_raw_os_error(EIO));
            }
            let n = buf.len().min(2000);
            return self.inner.read_at(&mut buf[..n], off);
        }
        let max = self.sw.short_read.load(Relaxed);
        let n = if max == 0 { buf.len() } else { buf.len().min(max) };
        self.inner.read_at(&mut buf[..n], off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.sw.writes.fetch_add(1, Relaxed);
        let e = self.sw.write_err.load(Relaxed);
        if e != 0 {
            return Err(io::Error::from_raw_os_error(e));
        }
        self.inner.write_all_at(buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.sw.sync_fails.load(Relaxed) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, size: u64) -> io::Result<()> {
        self.inner.set_len(size)
    }
}

/// A file of `content` cached through a [`Faulty`] store: its directory,
/// path, cache, handle and the store's switches.
type Setup = (
    tempfile::TempDir,
    std::path::PathBuf,
    PageCache,
    upcache::File,
    Arc<Switches>,
);

fn setup(content: &[u8]) -> Setup {
    setup_with(content, PageCache::new())
}

fn errno(e: &Error) -> i32 {
    e.raw_os_error()
}

#[test]
fn read_error_reaches_caller_and_folio_stays_not_uptodate() {
    let content: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let (_d, _p, cache, file, sw) = setup(&content);
    sw.read_err.store(EIO, Relaxed);
    let mut buf = [0u8; 100];
    let e = file.read_at(&mut buf, 5000).unwrap_err();
    assert_eq!(errno(&e), EIO, "{e}");
    let m = file.address_space().unwrap();
    let f = m.filemap_get_folio(PgOff(1)).expect("folio stays cached");
    assert!(!f.is_uptodate(), "a failed read must not leave the folio uptodate");
    assert!(f.has_error());
    drop(f);
    assert!(cache.stats().read_errors > 0);
    // Healed: the same read now succeeds and returns the file's bytes.
    sw.read_err.store(0, Relaxed);
    assert_eq!(file.read_at(&mut buf, 5000).unwrap(), 100);
    assert_eq!(&buf[..], &content[5000..5100]);
}

/// A store that reports more bytes than it was asked for is buggy; the
/// read fails with an error naming that, instead of a panic (slicing past
/// the buffer) in the reading thread or a fault handler.
#[test]
fn a_store_reporting_more_bytes_than_asked_is_an_error_not_a_panic() {
    let (_d, _p, _c, file, sw) = setup(&vec![3u8; 64 * 1024]);
    sw.over_read.store(true, Relaxed);
    let mut buf = [0u8; 100];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| file.read_at(&mut buf, 0)));
    let e = r.expect("no panic").unwrap_err();
    assert!(
        matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::InvalidData),
        "{e}"
    );
}

/// A read that returned part of a folio and then failed leaves nothing of
/// that folio in the page store: a `Missing`-mode mapping created later
/// maps any page present there without asking upcache, and would show the
/// torn bytes (zeros where the file has data) instead of re-reading.
#[test]
fn a_torn_read_leaves_no_bytes_a_mapping_can_see() {
    // Mapped accesses block on faults: a hang fails with a message.
    watchdog(
        "a_torn_read_leaves_no_bytes_a_mapping_can_see",
        60,
        a_torn_read_leaves_no_bytes_a_mapping_can_see_body,
    );
}

fn a_torn_read_leaves_no_bytes_a_mapping_can_see_body() {
    let content: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    let (_d, _p, _c, file, sw) = setup(&content);
    sw.torn.store(true, Relaxed);
    let mut buf = [0u8; 100];
    let e = file.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(errno(&e), EIO, "{e}");
    sw.torn.store(false, Relaxed);
    // SAFETY: only this thread touches the mapping.
    let map = unsafe { file.mmap(0, content.len(), upcache::Share::Shared) }.unwrap();
    for o in [0, 1999, 2000, 3000, 4095, 4096, 40_000] {
        assert_eq!(map[o], content[o], "mapped byte {o} after a torn read");
    }
}

#[test]
fn partial_write_needs_read_and_reports_its_error() {
    let (_d, _p, _c, file, sw) = setup(&vec![1u8; 16 * 1024]);
    sw.read_err.store(EIO, Relaxed);
    // A write covering part of a folio must read it first: the read error
    // is the write's error, and nothing is dirtied.
    let e = file.write_at(b"abc", 10).unwrap_err();
    assert_eq!(errno(&e), EIO);
    assert_eq!(file.address_space().unwrap().nr_dirty_folios(), 0);
    // A whole-page overwrite needs no read and succeeds.
    file.write_at(&[2u8; PAGE_SIZE], PAGE_SIZE as u64).unwrap();
    sw.read_err.store(0, Relaxed);
    file.fsync().unwrap();
}

#[test]
fn short_reads_are_retried() {
    let mut content = vec![0u8; 200 * 1024 + 77];
    Rng::new(4).fill(&mut content);
    let (_d, _p, _c, file, sw) = setup(&content);
    sw.short_read.store(777, Relaxed);
    let mut buf = vec![0u8; content.len() + 100];
    let n = file.read_at(&mut buf, 0).unwrap();
    assert_eq!(n, content.len());
    assert!(buf[..n] == content[..]);
}

#[test]
fn write_errors_surface_on_fsync_and_keep_data_dirty() {
    for err in [EIO, ENOSPC] {
        let (_d, path, cache, file, sw) = setup(&vec![0u8; 64 * 1024]);
        file.write_at(&[0xAB; 10_000], 3000).unwrap();
        sw.write_err.store(err, Relaxed);
        let e = file.fsync().unwrap_err();
        assert!(matches!(e, Error::Writeback(_)), "{e}");
        assert_eq!(errno(&e), err);
        // The data was not dropped: still dirty, still readable.
        assert!(
            file.address_space().unwrap().nr_dirty_folios() > 0,
            "dirty data kept after a failed write"
        );
        assert!(cache.stats().dirty_bytes > 0);
        let mut b = [0u8; 10];
        file.read_at(&mut b, 3000).unwrap();
        assert_eq!(b, [0xAB; 10]);
        // Close fails too and leaves the file open.
        assert!(file.close().is_err());
        assert!(file.len().is_ok(), "a failed close leaves the handle open");
        // Store healthy again: the retry writes the data, fsync is clean.
        sw.write_err.store(0, Relaxed);
        file.fsync().unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert!(
            disk[3000..13_000].iter().all(|&x| x == 0xAB),
            "retried write reached the file"
        );
        assert_eq!(cache.stats().dirty_bytes, 0);
        file.close().unwrap();
    }
}

#[test]
fn error_from_background_writeback_reported_once_per_handle() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; 8192]).unwrap();
    let sw = Arc::new(Switches::default());
    let cache = PageCache::new();
    let file = cache
        .open_with_ops(
            "f",
            StoreOps::new(Faulty {
                inner: FileStore::open(&path).unwrap(),
                sw: sw.clone(),
            }),
        )
        .unwrap();
    file.write_at(b"x", 0).unwrap();
    sw.write_err.store(EIO, Relaxed);
    // Cleansing writeback fails; its error is kept for fsync.
    assert!(file.writeback(100).is_err());
    sw.write_err.store(0, Relaxed);
    let e = file.fsync().unwrap_err();
    assert_eq!(errno(&e), EIO, "background error reported to fsync");
    file.fsync().expect("reported once, then clean");
}

#[test]
fn store_sync_failure_is_reported() {
    let (_d, _p, _c, file, sw) = setup(&[0u8; 4096]);
    file.write_at(b"y", 1).unwrap();
    sw.sync_fails.store(true, Relaxed);
    assert_eq!(errno(&file.fsync().unwrap_err()), EIO);
    sw.sync_fails.store(false, Relaxed);
    file.fsync().unwrap();
}

/// A failed store sync is a writeback error like any other (the kernel
/// records a failed journal commit or device flush in the errseq word): it
/// reaches every handle of the file once, not only the handle whose
/// `fsync` happened to call the store.
#[test]
fn a_failed_store_sync_reaches_every_handle_once() {
    let (_d, _p, cache, h1, sw) = setup(&[0u8; 4096]);
    let h2 = cache.open_with_ops("faulty", StoreOps::new(NeverUsed)).unwrap();
    h1.write_at(b"y", 1).unwrap();
    sw.sync_fails.store(true, Relaxed);
    assert_eq!(errno(&h1.fsync().unwrap_err()), EIO);
    sw.sync_fails.store(false, Relaxed);
    let e = h2
        .fsync()
        .expect_err("the other handle's fsync must report the failed store sync");
    assert_eq!(errno(&e), EIO);
    // Once per handle.
    h1.fsync().unwrap();
    h2.fsync().unwrap();
    // And once to the cache-wide sync, which had not seen it (`syncfs`).
    let e = cache.sync_all().expect_err("sync_all reports the failed store sync");
    assert_eq!(errno(&e), EIO);
    cache.sync_all().unwrap();
}

/// `sync_all` reports a write error that nobody has seen yet, even when
/// its own walk then writes the data: the error word is the only record of
/// a failure in a writeback the sync did not start (a background
/// writeback it waited for), and a failure of the same errno while an
/// earlier one is unseen does not move the word.
#[test]
fn sync_all_reports_a_write_error_nobody_has_seen() {
    let (_d, path, cache, file, sw) = setup(&[0u8; 4096]);
    file.write_at(b"y", 1).unwrap();
    sw.write_err.store(EIO, Relaxed);
    assert!(file.writeback(16).is_err());
    sw.write_err.store(0, Relaxed);
    let e = cache.sync_all().expect_err("an unseen write error must reach sync_all");
    assert_eq!(e.raw_os_error(), EIO);
    assert_eq!(std::fs::read(&path).unwrap()[1], b'y', "the retry wrote the data");
    cache.sync_all().unwrap();
}

/// A store that fails every write cannot let writers dirty memory without
/// bound: past the dirty limit, with the writer's own write-back failing,
/// `write_at` returns that error (nothing written) instead of caching
/// more. Before, every write succeeded and dirty memory grew to the whole
/// 8 MiB written, 8 times the limit.
#[test]
fn writes_past_the_dirty_limit_fail_while_write_back_fails() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, []).unwrap();
    let sw = Arc::new(Switches::default());
    let limit = 1 << 20;
    let cache = PageCache::builder().dirty_limit_bytes(limit).build();
    let store = Faulty {
        inner: FileStore::open(&path).unwrap(),
        sw: sw.clone(),
    };
    let file = cache.open_with_ops("failing-writes", StoreOps::new(store)).unwrap();
    sw.write_err.store(EIO, Relaxed);
    let chunk = vec![7u8; 64 * 1024];
    let mut refused = None;
    for i in 0..128u64 {
        match file.write_at(&chunk, i * chunk.len() as u64) {
            Ok(n) => assert_eq!(n, chunk.len()),
            Err(e) => {
                refused = Some(e.raw_os_error());
                break;
            }
        }
    }
    assert_eq!(refused, Some(EIO), "every write succeeded while write-back failed");
    let dirty = cache.stats().dirty_bytes;
    assert!(
        dirty <= limit + 2 * chunk.len() as u64,
        "dirty memory {dirty} past the limit {limit}"
    );
    // Healed: the data written so far reaches the store.
    sw.write_err.store(0, Relaxed);
    assert!(file.fsync().is_err(), "the failures are reported once");
    file.fsync().unwrap();
    assert_eq!(cache.stats().dirty_bytes, 0);
}

/// The refusal is the failing file's own: a file whose one folio keeps
/// failing still writes while another file (here one whose engine holds
/// its write-back back) keeps the cache over the dirty limit.
#[test]
fn a_failing_file_with_little_dirty_data_is_not_refused_for_another_files_dirt() {
    struct HoldBack(FileStore);
    impl upcache::BackingStore for HoldBack {
        fn read_at(&self, b: &mut [u8], o: u64) -> io::Result<usize> {
            self.0.read_at(b, o)
        }
        fn write_all_at(&self, b: &[u8], o: u64) -> io::Result<()> {
            self.0.write_all_at(b, o)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.0.sync_data()
        }
        fn len(&self) -> io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, n: u64) -> io::Result<()> {
            self.0.set_len(n)
        }
        fn write_barrier(&self, _lsn: u64, mode: upcache::aops::SyncMode) -> io::Result<bool> {
            // Cleansing write-back waits for the engine's log; fsync goes.
            Ok(mode == upcache::aops::SyncMode::All)
        }
    }
    let dir = tempdir();
    let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&pa, []).unwrap();
    std::fs::write(&pb, vec![0u8; 4096]).unwrap();
    let limit = 1 << 20;
    let cache = PageCache::builder().dirty_limit_bytes(limit).build();
    let a = cache
        .open_with_ops("held-back", StoreOps::new(HoldBack(FileStore::open(&pa).unwrap())))
        .unwrap();
    let sw = Arc::new(Switches::default());
    let b = cache
        .open_with_ops(
            "failing",
            StoreOps::new(Faulty {
                inner: FileStore::open(&pb).unwrap(),
                sw: sw.clone(),
            }),
        )
        .unwrap();
    sw.write_err.store(EIO, Relaxed);
    b.write_at(b"x", 0).unwrap();
    a.write_at(&vec![1u8; 2 << 20], 0).unwrap();
    assert!(
        cache.stats().dirty_bytes > limit,
        "the held-back file keeps the cache over the limit"
    );
    for i in 1..8u64 {
        b.write_at(b"y", i * 100)
            .expect("the failing file's own dirty data is small");
    }
    sw.write_err.store(0, Relaxed);
    a.fsync().unwrap();
    let _ = b.fsync();
    b.fsync().unwrap();
}

/// Operations that must never be called: the second open of a name gets
/// the first open's address space and drops these unused.
struct NeverUsed;

impl BackingStore for NeverUsed {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<usize> {
        unreachable!("a second open's store is never used")
    }
    fn write_all_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        unreachable!("a second open's store is never used")
    }
    fn sync_data(&self) -> io::Result<()> {
        unreachable!("a second open's store is never used")
    }
    fn len(&self) -> io::Result<u64> {
        unreachable!("a second open's store is never used")
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        unreachable!("a second open's store is never used")
    }
}

#[test]
fn many_threads_with_failing_store_neither_hang_nor_panic() {
    let mut content = vec![0u8; 256 * 1024];
    Rng::new(5).fill(&mut content);
    let (_d, _p, _c, file, sw) = setup(&content);
    let file = Arc::new(file);
    sw.read_err.store(EIO, Relaxed);
    sw.write_err.store(ENOSPC, Relaxed);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let file = file.clone();
            s.spawn(move || {
                let mut rng = Rng::new(t);
                let mut buf = vec![0u8; 5000];
                for _ in 0..300 {
                    let off = rng.below(256 * 1024);
                    match rng.below(4) {
                        0 => {
                            let _ = file.read_at(&mut buf, off);
                        }
                        1 => {
                            let _ = file.write_at(&buf, off);
                        }
                        2 => {
                            let _ = file.fsync();
                        }
                        _ => {
                            let _ = file.punch_hole(off, 9000);
                        }
                    }
                }
            });
        }
    });
    sw.read_err.store(0, Relaxed);
    sw.write_err.store(0, Relaxed);
    // Healthy again: everything flushes (the failed fsyncs reported their
    // errors; a final one may still report the last of them once).
    let _ = file.fsync();
    file.fsync().unwrap();
    assert!(sw.writes.load(Relaxed) > 0);
}

/// A read error answered a mapped access with SIGBUS (`UFFDIO_POISON` of
/// the page); once the store heals and the folio is read again, the page
/// is served again in that mapping, as the kernel retries a failed read
/// at the next fault. The poison used to stay for the mapping's life.
/// (`MADV_POPULATE_READ` faults the page in from a syscall, which reports
/// the SIGBUS as an error instead of killing the test.)
#[test]
fn a_page_poisoned_by_a_read_error_is_served_once_the_store_heals() {
    // Mapped accesses block on faults: a hang fails with a message.
    watchdog(
        "a_page_poisoned_by_a_read_error_is_served_once_the_store_heals",
        60,
        a_page_poisoned_by_a_read_error_is_served_once_the_store_heals_body,
    );
}

fn a_page_poisoned_by_a_read_error_is_served_once_the_store_heals_body() {
    let content: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    let (_d, _p, _c, file, sw) = setup(&content);
    // SAFETY: only this thread touches the mapping.
    let map = unsafe { file.mmap(0, content.len(), upcache::Share::Shared) }.unwrap();
    let page = 40 * PAGE_SIZE;
    let populate = || populate_page(&map, page);
    sw.read_err.store(EIO, Relaxed);
    let e = populate().expect_err("a read error must fail the access");
    eprintln!("access during the read error: {e}");
    sw.read_err.store(0, Relaxed);
    let mut b = [0u8; 1];
    file.read_at(&mut b, page as u64).unwrap();
    assert_eq!(b[0], content[page]);
    populate().expect("the page is served again after the store healed");
    assert_eq!(map[page + 5], content[page + 5]);
}

/// The same, when the failed folio leaves the cache (`DontNeed`, reclaim)
/// before anything reads it again: the poison must not outlive it.
/// Reclaim used to evict the failed folio without clearing the poison its
/// failure had left, so the page raised SIGBUS for the mapping's life.
#[test]
fn a_page_poisoned_by_a_read_error_is_served_after_its_folio_is_dropped() {
    watchdog("poisoned page after DontNeed", 60, || {
        let content: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        let (_d, _p, _c, file, sw) = setup(&content);
        // SAFETY: only this thread touches the mapping.
        let map = unsafe { file.mmap(0, content.len(), upcache::Share::Shared) }.unwrap();
        let page = 40 * PAGE_SIZE;
        let populate = || populate_page(&map, page);
        sw.read_err.store(EIO, Relaxed);
        populate().expect_err("a read error must fail the access");
        sw.read_err.store(0, Relaxed);
        file.advise(upcache::Advice::DontNeed, 0, content.len() as u64).unwrap();
        populate().expect("the page is served again after the store healed");
        assert_eq!(map[page + 5], content[page + 5]);
    });
}

/// The same, when a `write_at` overwrites the failed folio whole: the
/// write makes it uptodate without reading it (and clears its error), so
/// neither a read nor a removal would clear the poison any more, and the
/// page raised SIGBUS for the mapping's life while `read_at` returned the
/// written bytes.
#[test]
fn a_page_poisoned_by_a_read_error_is_served_after_a_whole_overwrite() {
    watchdog("poisoned page after a whole overwrite", 60, || {
        let content: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        let (_d, _p, _c, file, sw) = setup(&content);
        // SAFETY: only this thread touches the mapping.
        let map = unsafe { file.mmap(0, content.len(), upcache::Share::Shared) }.unwrap();
        let page = 40 * PAGE_SIZE;
        let populate = || populate_page(&map, page);
        sw.read_err.store(EIO, Relaxed);
        populate().expect_err("a read error must fail the access");
        sw.read_err.store(0, Relaxed);
        // Every folio overwritten whole: none is read first.
        let new = vec![0xA5u8; content.len()];
        file.write_at(&new, 0).unwrap();
        populate().expect("the page is served again after the overwrite");
        assert_eq!(map[page + 5], 0xA5);
        file.advise(upcache::Advice::DontNeed, 0, content.len() as u64).unwrap();
        populate().expect("the page is served again after its folio left");
        assert_eq!(map[page + 5], 0xA5);
    });
}

/// And when reclaim evicts the failed folio under memory pressure (from
/// another file): its poison goes with it. Reclaim once evicted it and
/// left the poison; a later version kept failed folios for good (counted
/// against the limit, and still poisoned).
#[test]
fn a_page_poisoned_by_a_read_error_is_served_after_reclaim_evicts_its_folio() {
    watchdog("poisoned page after reclaim", 60, || {
        let dir = tempdir();
        let path = dir.path().join("faulty");
        let content: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &content).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, vec![3u8; 8 << 20]).unwrap();
        let sw = Arc::new(Switches::default());
        let cache = PageCache::builder()
            .memory_limit(512 * 1024)
            .readahead_bytes(4096)
            .readahead_max_bytes(4096)
            .build();
        let store = Faulty {
            inner: FileStore::open(&path).unwrap(),
            sw: sw.clone(),
        };
        let file = cache.open_with_ops("faulty", StoreOps::new(store)).unwrap();
        // SAFETY: only this thread touches the mapping.
        let map = unsafe { file.mmap(0, content.len(), upcache::Share::Shared) }.unwrap();
        let page = 40 * PAGE_SIZE;
        let populate = || populate_page(&map, page);
        sw.read_err.store(EIO, Relaxed);
        populate().expect_err("a read error must fail the access");
        sw.read_err.store(0, Relaxed);
        // Pressure from another file: the failed folio is the coldest.
        let o = cache.open(&other).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        for i in 0..128u64 {
            let at = i * buf.len() as u64;
            o.read_at(&mut buf, at).unwrap();
        }
        assert!(
            file.address_space()
                .unwrap()
                .filemap_get_folio(upcache::aops::PgOff(40))
                .is_none(),
            "reclaim evicted the failed folio"
        );
        populate().expect("the page is served again after its failed folio was evicted");
        assert_eq!(map[page + 5], content[page + 5]);
    });
}

/// Fault page `page` of `map` in from a syscall (`MADV_POPULATE_READ`),
/// which reports SIGBUS poison as an error instead of killing the test.
fn populate_page(map: &[u8], page: usize) -> io::Result<()> {
    assert!(page + PAGE_SIZE <= map.len());
    // SAFETY: the range lies inside the live mapping (checked above);
    // POPULATE_READ only faults it in.
    let r = unsafe { libc::madvise(map.as_ptr().add(page) as *mut _, PAGE_SIZE, libc::MADV_POPULATE_READ) };
    (r == 0).then_some(()).ok_or_else(io::Error::last_os_error)
}

/// An engine whose `writepage` fails without keeping the folio dirty: it
/// drops the folio with nothing submitted and returns the error, or
/// starts writeback and returns early (`?`) without ending it. Neither
/// may lose the data: the folio stays dirty, `fsync` reports the error,
/// and once the engine works again the data reaches the file. Before,
/// the dropped `Writeback` ended as a success and the dropped folio was
/// left clean (its DIRTY tag set, so nothing wrote it again).
#[test]
fn a_writepage_that_fails_without_redirtying_loses_nothing() {
    use upcache::aops::{AddressSpace, AddressSpaceOps, FolioGuard, WritebackControl};
    struct Sloppy {
        inner: StoreOps<FileStore>,
        /// 0: healthy; 1: drop the folio; 2: start writeback, then drop it
        mode: Arc<AtomicUsize>,
    }
    impl AddressSpaceOps for Sloppy {
        fn read_folio(&self, m: &AddressSpace, f: FolioGuard) -> io::Result<()> {
            self.inner.read_folio(m, f)
        }
        fn writepage(&self, m: &AddressSpace, f: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()> {
            match self.mode.load(Relaxed) {
                0 => self.inner.writepage(m, f, wbc),
                1 => {
                    drop(f);
                    Err(io::Error::from_raw_os_error(EIO))
                }
                _ => {
                    let wb = m.folio_start_writeback(f);
                    drop(wb);
                    Err(io::Error::from_raw_os_error(EIO))
                }
            }
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
    for bad in [1usize, 2] {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let mode = Arc::new(AtomicUsize::new(bad));
        let cache = PageCache::new();
        let ops = Sloppy {
            inner: StoreOps::new(FileStore::open(&path).unwrap()),
            mode: mode.clone(),
        };
        let file = cache.open_with_ops("sloppy", ops).unwrap();
        file.write_at(b"precious", 100).unwrap();
        assert!(file.fsync().is_err(), "mode {bad}: the failed write is reported");
        assert!(cache.stats().dirty_bytes > 0, "mode {bad}: the data is still dirty");
        mode.store(0, Relaxed);
        file.fsync().unwrap();
        assert_eq!(
            &std::fs::read(&path).unwrap()[100..108],
            b"precious",
            "mode {bad}: data lost"
        );
    }
}

/// A write past end of file zeroes the rest of the old last page
/// (`pagecache_isize_extended`). When that page's folio is not uptodate
/// (its read failed), the zeroing wrote through the engine view into a
/// page the failed fill had freed: the memfd got a page of zeros, which
/// the kernel maps into a `Missing`-mode mapping without asking upcache.
/// A mapped read then saw zeros where the file has data, and a mapped
/// write dirtied the folio that was not uptodate (its write-back then
/// failed for good). Found by `fault_injection` (Missing mode).
#[test]
fn extending_past_a_failed_last_folio_leaves_no_zeros_in_a_mapping() {
    watchdog("extending past a failed last folio", 60, || {
        let size = 10 * PAGE_SIZE + 100;
        let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
        let dir = tempdir();
        let path = dir.path().join("faulty");
        std::fs::write(&path, &content).unwrap();
        let sw = Arc::new(Switches::default());
        let cache = PageCache::builder().mmap_mode(upcache::UffdMode::Missing).build();
        let store = Faulty {
            inner: FileStore::open(&path).unwrap(),
            sw: sw.clone(),
        };
        let file = cache.open_with_ops("faulty", StoreOps::new(store)).unwrap();
        // SAFETY: only this thread touches the mapping, through short
        // borrows below end of file.
        let mut map = unsafe { file.mmap_mut(0, 16 * PAGE_SIZE, upcache::Share::Shared) }.unwrap();
        let last = 10 * PAGE_SIZE;
        sw.read_err.store(EIO, Relaxed);
        let mut b = [0u8; 10];
        file.read_at(&mut b, last as u64).expect_err("the store fails reads");
        sw.read_err.store(0, Relaxed);
        // Grow the file past the old last page.
        file.write_at(b"grown", 12 * PAGE_SIZE as u64).unwrap();
        assert_eq!(
            &map[last..last + 100],
            &content[last..last + 100],
            "mapped bytes of the old last page after the file grew past it"
        );
        assert!(
            map[last + 100..last + PAGE_SIZE].iter().all(|&b| b == 0),
            "the old end's tail reads as zeros"
        );
        // A mapped write to that page, then a sync: on disk as written.
        map[last + 7] = 0xEE;
        file.fsync().expect("fsync after a mapped write to the old last page");
        let disk = std::fs::read(&path).unwrap();
        assert_eq!(disk.len(), 12 * PAGE_SIZE + 5);
        assert_eq!(disk[last + 7], 0xEE);
        assert_eq!(&disk[last..last + 7], &content[last..last + 7]);
        assert_eq!(&disk[12 * PAGE_SIZE..], b"grown");
    });
}

/// A fill that marks its folio uptodate without writing every page
/// leaves holes in the page store: a store whose reads claim bytes they
/// never wrote (here), or an engine's `read_folio` that fills part of
/// `data_mut` (below). A fault on such a page found the folio uptodate
/// and asked the kernel to map a page that does not exist: in `Minor`
/// mode `UFFDIO_CONTINUE` failed with ENOENT, taken for a page punched
/// meanwhile, and the thread faulted again, forever. The page holds
/// zeros (as `read_at` shows); a mapping must show them too.
#[test]
fn a_store_that_reports_bytes_it_never_wrote_maps_zeros_not_a_hang() {
    watchdog("a store that reports bytes it never wrote", 60, || {
        let size = 4 * PAGE_SIZE;
        let dir = tempdir();
        let path = dir.path().join("phantom");
        std::fs::write(&path, vec![0x5Au8; size]).unwrap();
        let sw = Arc::new(Switches::default());
        let cache = PageCache::builder().mmap_mode(upcache::UffdMode::Minor).build();
        let store = Faulty {
            inner: FileStore::open(&path).unwrap(),
            sw: sw.clone(),
        };
        let file = cache.open_with_ops("phantom", StoreOps::new(store)).unwrap();
        // SAFETY: only this thread reads the mapping, below end of file.
        let map = unsafe { file.mmap(0, size, upcache::Share::Shared) }.unwrap();
        sw.phantom.store(true, Relaxed);
        for page in 0..4 {
            assert_eq!(map[page * PAGE_SIZE + 9], 0, "mapped page {page}");
        }
        let mut b = vec![1u8; size];
        assert_eq!(file.read_at(&mut b, 0).unwrap(), size);
        assert!(b.iter().all(|&x| x == 0), "read_at shows the same zeros");
        assert_eq!(file.stats().unfilled_pages, 4, "each unwritten page counted once");
    });
}

/// The same in `Missing` mode, through an engine's `read_folio` that
/// writes only the first page of a large folio and marks it uptodate:
/// the kernel found no page, raised a missing fault, the handler found
/// the folio uptodate and woke the thread, which faulted again.
#[test]
fn a_read_folio_that_leaves_pages_unwritten_maps_zeros_not_a_hang() {
    use upcache::aops::{AddressSpace, AddressSpaceOps, FolioGuard, WritebackControl};
    struct FirstPageOnly;
    impl AddressSpaceOps for FirstPageOnly {
        fn read_folio(&self, _m: &AddressSpace, mut f: FolioGuard) -> io::Result<()> {
            f.data_mut()[..PAGE_SIZE].fill(0x77);
            f.mark_uptodate();
            Ok(())
        }
        fn writepage(&self, _m: &AddressSpace, f: FolioGuard, _wbc: &mut WritebackControl) -> io::Result<()> {
            drop(f);
            Err(io::Error::from_raw_os_error(EIO))
        }
        fn initial_size(&self) -> io::Result<u64> {
            Ok(64 * PAGE_SIZE as u64)
        }
        fn set_size(&self, _size: u64) -> io::Result<()> {
            Ok(())
        }
        fn punch_hole(&self, _off: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn fsync(&self) -> io::Result<()> {
            Ok(())
        }
    }
    watchdog("a read_folio that leaves pages unwritten", 60, || {
        let size = 64 * PAGE_SIZE;
        let cache = PageCache::builder()
            .mmap_mode(upcache::UffdMode::Missing)
            .large_folios(true)
            .build();
        let file = cache.open_with_ops("first-page-only", FirstPageOnly).unwrap();
        // Read first, before any mapping: the fill goes through
        // `data_mut` (fills become page-atomic once a `Missing` mapping
        // exists), so the folio's other pages stay holes.
        let mut b = [0u8; 1];
        file.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 0x77);
        let as_ = file.address_space().unwrap();
        let folio_pages = as_.filemap_get_folio(PgOff(0)).unwrap().nr_pages() as usize;
        assert!(folio_pages > 1, "the read made one large folio ({folio_pages} pages)");
        // SAFETY: only this thread reads the mapping, below end of file.
        let map = unsafe { file.mmap(0, size, upcache::Share::Shared) }.unwrap();
        assert_eq!(map[9], 0x77, "the page the fill wrote");
        for page in 1..folio_pages.min(64) {
            assert_eq!(
                map[page * PAGE_SIZE + 9],
                0,
                "mapped page {page} that the fill never wrote"
            );
        }
        assert_eq!(
            file.stats().unfilled_pages as usize,
            folio_pages.min(64) - 1,
            "each unwritten page counted once"
        );
        // And when the fault's own fill leaves the hole (no read before
        // the mapping): a page other than the first, first.
        let fresh = cache.open_with_ops("first-page-only-2", FirstPageOnly).unwrap();
        // SAFETY: as above.
        let map = unsafe { fresh.mmap(0, size, upcache::Share::Shared) }.unwrap();
        assert_eq!(map[3 * PAGE_SIZE + 9], 0, "a page the fault's own fill never wrote");
        assert_eq!(map[9], 0x77, "the page it wrote");
        assert_eq!(fresh.stats().unfilled_pages, 1);
    });
}

/// A mapping whose VMA the user split (`madvise`, `mprotect`, a partial
/// `mlock`) is still served: `UFFDIO_CONTINUE` refuses a range that spans
/// two VMAs with `ENOENT`, which was taken for "page not in the memfd"
/// and skipped — every page of the fault-around window was skipped and
/// the thread woken into the same fault forever (found by review,
/// thirteenth session). Every mapping mode, both halves of the split.
#[test]
fn a_split_mapping_is_still_served() {
    for mode in [upcache::UffdMode::Minor, upcache::UffdMode::Missing] {
        watchdog(&format!("faults on a split {mode:?} mapping"), 60, move || {
            let dir = tempdir();
            let path = dir.path().join("f");
            std::fs::write(&path, vec![7u8; 64 * 1024]).unwrap();
            let cache = PageCache::builder()
                .mmap_mode(mode)
                .fault_around_bytes(64 * 1024)
                .build();
            let f = cache.open(&path).unwrap();
            // Cached, so `Minor` mode maps through CONTINUE.
            let mut b = vec![0u8; 64 * 1024];
            f.read_at(&mut b, 0).unwrap();
            let m = f.mmap_raw(0, 64 * 1024).unwrap();
            // SAFETY: advice on the second half of a live mapping this test
            // owns; MADV_RANDOM changes no contents, it splits the VMA.
            let r = unsafe { libc::madvise(m.as_mut_ptr().add(32 * 1024).cast(), 32 * 1024, libc::MADV_RANDOM) };
            assert_eq!(r, 0, "madvise: {}", io::Error::last_os_error());
            for page in [1usize, 9, 15, 0] {
                let mut x = [0u8; 1];
                m.read(page * PAGE_SIZE, &mut x);
                assert_eq!(x[0], 7, "page {page}");
            }
        });
    }
}

/// [`setup`] with the cache `cache` builds.
fn setup_with(content: &[u8], cache: PageCache) -> Setup {
    let dir = tempdir();
    let path = dir.path().join("faulty");
    std::fs::write(&path, content).unwrap();
    let sw = Arc::new(Switches::default());
    let store = Faulty {
        inner: FileStore::open(&path).unwrap(),
        sw: sw.clone(),
    };
    let file = cache.open_with_ops("faulty", StoreOps::new(store)).unwrap();
    (dir, path, cache, file, sw)
}

/// Store `byte` at `addr` of this process's own mapping the way the
/// kernel stores for a program (`process_vm_writev`): `false` (`EFAULT`)
/// where a CPU store would raise SIGBUS, so a test thread may hammer a
/// page that is poisoned part of the time.
fn kernel_store(addr: usize, byte: u8) -> bool {
    let local = libc::iovec {
        iov_base: &byte as *const u8 as *mut _,
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: 1,
    };
    // SAFETY: reads one byte of this frame; the kernel writes one byte at
    // `addr`, which the callers keep inside their live mapping (or fails
    // with EFAULT).
    unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) == 1 }
}

/// A read error's poison is cleared once a later read of the folio
/// succeeds. In `Missing` mode the kernel maps a cached page by itself,
/// and only a uffd-wp marker makes its first store fault to the cache:
/// the clear zapped the poison and armed the marker again with two system
/// calls, after the read had made the folio uptodate and clean, so a store
/// landing between them was mapped writable unseen, the folio stayed
/// clean, and its eviction dropped the store (page 3 of 1,024 rounds on
/// the first run). The store is made by the kernel (`process_vm_writev`
/// to our own mapping), which fails with `EFAULT` instead of raising
/// SIGBUS while the page is still poisoned; it is retried until it lands,
/// and wherever it lands it must reach the file.
#[test]
fn a_store_racing_the_clear_of_a_read_errors_poison_is_never_lost() {
    watchdog("store racing a poison clear", 120, || {
        use std::os::unix::fs::FileExt;
        let content: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8 + 1).collect();
        // One page per folio and no readahead: each round fails and
        // clears its own page.
        let (_dir, path, _cache, file, sw) = setup_with(
            &content,
            PageCache::builder()
                .readahead_bytes(4096)
                .readahead_max_bytes(4096)
                .build(),
        );
        // SAFETY: the mapping is written only by the kernel on the writer
        // thread's behalf, and read by this thread with `populate_page`.
        let map = unsafe { file.mmap_mut(0, content.len(), upcache::Share::Shared) }.unwrap();
        for page in 0..content.len() / PAGE_SIZE {
            let at = page * PAGE_SIZE + 7;
            sw.read_err.store(EIO, Relaxed);
            populate_page(&map, page * PAGE_SIZE).expect_err("a read error must fail the access");
            sw.read_err.store(0, Relaxed);
            let addr = map.as_ptr() as usize + at;
            let writer = std::thread::spawn(move || while !kernel_store(addr, 0xEE) {});
            // Reads the failed folio again, which clears the poison.
            let mut b = [0u8; 1];
            file.read_at(&mut b, at as u64).unwrap();
            writer.join().unwrap();
            // The folio must be dirty: evicting it writes the store back.
            file.advise(upcache::Advice::DontNeed, 0, content.len() as u64).unwrap();
            file.read_at(&mut b, at as u64).unwrap();
            assert_eq!(
                b[0], 0xEE,
                "page {page}: a store made as the poison was cleared was lost"
            );
        }
        file.fsync().unwrap();
        let disk = std::fs::File::open(&path).unwrap();
        for page in 0..content.len() / PAGE_SIZE {
            let mut d = [0u8; 1];
            disk.read_exact_at(&mut d, (page * PAGE_SIZE + 7) as u64).unwrap();
            assert_eq!(d[0], 0xEE, "page {page}: the store did not reach the file");
        }
    });
}

/// A truncate whose write-back fails keeps the folio straddling the new
/// end (64 KiB, made by readahead) and poisons its pages past the end in
/// `Missing`-mode mappings. Growing the file again clears that poison:
/// without large folios configured the clear zapped and re-armed the pages
/// without the folio lock, in a clean folio once an `fsync` had written
/// it, so a store landing between the zap and the re-arm was mapped
/// writable unseen and eviction dropped it. Same kernel-made store as
/// above, retried until it lands.
#[test]
fn a_store_racing_a_growth_over_a_kept_folio_is_never_lost() {
    watchdog("store racing a growth's poison clear", 120, || {
        use std::os::unix::fs::FileExt;
        let content: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        // Every miss reads the whole file: one 64 KiB folio.
        let (_dir, path, _cache, file, sw) =
            setup_with(&content, PageCache::builder().readahead_bytes(64 * 1024).build());
        let len = content.len() as u64;
        // SAFETY: the mapping is written by this thread while no other
        // thread runs, and by the kernel on the writer thread's behalf.
        let mut map = unsafe { file.mmap_mut(0, content.len(), upcache::Share::Shared) }.unwrap();
        let at = 5 * PAGE_SIZE + 7;
        let disk = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        for round in 0..2000 {
            // A dirty folio over the whole file (one 64 KiB folio).
            map[100] = round as u8;
            sw.write_err.store(EIO, Relaxed);
            let _ = file.truncate(10 * 1024);
            sw.write_err.store(0, Relaxed);
            // Written and clean now (the first call may report the failure).
            let _ = file.fsync();
            file.fsync().unwrap();
            let addr = map.as_ptr() as usize + at;
            let writer = std::thread::spawn(move || while !kernel_store(addr, 0xEE) {});
            file.truncate(len).unwrap();
            writer.join().unwrap();
            // Seen, the store dirtied the folio and reaches the file.
            file.fsync().unwrap();
            let mut b = [0u8; 1];
            disk.read_exact_at(&mut b, at as u64).unwrap();
            assert_eq!(b[0], 0xEE, "round {round}: a store made as the file grew was lost");
            // Start the next round from zeros on disk.
            disk.write_all_at(&[0], at as u64).unwrap();
        }
    });
}

/// A truncate whose write-back fails keeps the folio straddling the new
/// end, poisons its pages past the end in `Missing`-mode mappings and
/// zeroes them. A store the kernel makes for a program
/// (`process_vm_writev` here; a `read(2)` into the mapping alike) pins the
/// page before the truncate and may write it after: the kernel drops whole
/// pages past the end, so such a store lands in a page no longer in the
/// file, but the kept folio kept it, and the file, grown back, read the
/// store where the kernel reads zeros (round 9-60 of 1,000). A growth now
/// zeroes the cached pages it exposes. (The same truncate also poisons
/// before zeroing, and retries a poison a racing store undid: CPU stores
/// between the zap and the poison; not what this test reaches.)
#[test]
fn a_store_racing_a_truncate_that_keeps_its_folio_never_shows_after_growth() {
    watchdog("store racing a kept folio's truncate", 120, || {
        let content: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        // Every miss reads the whole file: one 64 KiB folio.
        let (_dir, _path, _cache, file, sw) =
            setup_with(&content, PageCache::builder().readahead_bytes(64 * 1024).build());
        let len = content.len() as u64;
        // SAFETY: the mapping is written by this thread while the writer
        // thread is stopped, and by the kernel on the writer's behalf.
        let mut map = unsafe { file.mmap_mut(0, content.len(), upcache::Share::Shared) }.unwrap();
        let at = 5 * PAGE_SIZE + 7;
        for round in 0..1000 {
            // A dirty folio over the whole file; page 5 mapped writable.
            map[100] = round as u8;
            map[at] = 1;
            sw.write_err.store(EIO, Relaxed);
            let stop = Arc::new(AtomicBool::new(false));
            let addr = map.as_ptr() as usize + at;
            let writer = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        kernel_store(addr, 0xEE);
                    }
                })
            };
            let _ = file.truncate(10 * 1024);
            stop.store(true, Relaxed);
            writer.join().unwrap();
            sw.write_err.store(0, Relaxed);
            let _ = file.fsync();
            file.fsync().unwrap();
            file.truncate(len).unwrap();
            let mut b = [0u8; 1];
            file.read_at(&mut b, at as u64).unwrap();
            assert_eq!(b[0], 0, "round {round}: a store past the new end survived the truncate");
        }
    });
}

/// An engine's `read_folio` that fills its folio with `fill_folio` from an
/// upcache mapping of another file of the same cache, at a page not cached
/// yet: once a `Missing` mapping exists the fill is one `pwrite` into the
/// cache's memfd, and the kernel faulted the source page in while holding
/// that memfd's inode lock, which the handler serving the fault needed for
/// its own fill (every fill and punch of the cache then hung). The source
/// is now copied out first.
#[test]
fn fill_folio_from_an_upcache_mapping_of_the_same_cache_completes() {
    use upcache::aops::{AddressSpace, AddressSpaceOps, FolioGuard, WritebackControl};
    struct FromMap(Arc<std::sync::OnceLock<upcache::Mmap>>);
    impl AddressSpaceOps for FromMap {
        fn read_folio(&self, m: &AddressSpace, mut f: FolioGuard) -> io::Result<()> {
            let src = self.0.get().expect("the source mapping");
            let pos = f.pos() as usize;
            let n = f.size().min(src.len() - pos);
            m.fill_folio(&mut f, &src[pos..pos + n])?;
            f.mark_uptodate();
            Ok(())
        }
        fn writepage(&self, _m: &AddressSpace, f: FolioGuard, _wbc: &mut WritebackControl) -> io::Result<()> {
            drop(f);
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn initial_size(&self) -> io::Result<u64> {
            Ok(16 * PAGE_SIZE as u64)
        }
        fn set_size(&self, _size: u64) -> io::Result<()> {
            Ok(())
        }
        fn punch_hole(&self, _off: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn fsync(&self) -> io::Result<()> {
            Ok(())
        }
    }
    watchdog("fill_folio from an upcache mapping", 60, || {
        let dir = tempdir();
        let path = dir.path().join("b");
        let content: Vec<u8> = (0..16 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &content).unwrap();
        let cache = PageCache::builder().mmap_mode(upcache::UffdMode::Missing).build();
        let b = cache.open(&path).unwrap();
        b.advise(upcache::Advice::Random, 0, 0).unwrap();
        let src = Arc::new(std::sync::OnceLock::new());
        // SAFETY: nothing writes file `b` while the test runs.
        let map_b = unsafe { b.mmap(0, 16 * PAGE_SIZE, upcache::Share::Shared) }.unwrap();
        assert!(src.set(map_b).is_ok());
        let a = cache.open_with_ops("a", FromMap(src.clone())).unwrap();
        // A `Missing` mapping of `a`: its fills are page-atomic now.
        let _map_a = a.mmap_raw(0, 16 * PAGE_SIZE).unwrap();
        let mut buf = vec![0u8; 16 * PAGE_SIZE];
        assert_eq!(a.read_at(&mut buf, 0).unwrap(), buf.len());
        assert!(buf == content, "a read what b's mapping holds");
    });
}

/// A read over a cached page and a page whose store read fails returns
/// the cached bytes (a short count), as `pread(2)` does; it returned `EIO`
/// with the buffer partly written. A read starting at the failing page
/// gets the error.
#[test]
fn a_read_across_a_failing_page_returns_the_bytes_before_it() {
    use common::{HookStore, StoreOp};
    let dir = tempdir();
    let path = dir.path().join("f");
    let content: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&path, &content).unwrap();
    let failing = Arc::new(AtomicBool::new(false));
    let f2 = failing.clone();
    let store = HookStore::new(&path, move |op, off, len| {
        if op == StoreOp::Read && f2.load(Relaxed) && off + len > PAGE_SIZE as u64 {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        Ok(())
    });
    let cache = PageCache::new();
    let file = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
    file.advise(upcache::Advice::Random, 0, 0).unwrap();
    let mut b = [0u8; 1];
    file.read_at(&mut b, 0).unwrap();
    failing.store(true, Relaxed);
    let mut buf = vec![0u8; 2 * PAGE_SIZE];
    assert_eq!(file.read_at(&mut buf, 0).unwrap(), PAGE_SIZE, "a short read");
    assert!(buf[..PAGE_SIZE] == content[..PAGE_SIZE]);
    let e = file.read_at(&mut buf, PAGE_SIZE as u64).unwrap_err();
    assert_eq!(e.raw_os_error(), EIO);
}

/// A mapped access whose read panicked in the store gets SIGBUS; once a
/// later read of the page succeeds (here `read_at`), the mapping serves it
/// again. The panic's poison was never cleared: only a folio marked with a
/// read error cleared its poison when read again, and a panicking read
/// left none.
#[test]
fn a_page_poisoned_by_a_panicking_read_is_served_once_read() {
    use common::{HookStore, StoreOp};
    watchdog("poison of a panicking read", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &content).unwrap();
        let panics = Arc::new(AtomicBool::new(true));
        let p2 = panics.clone();
        let store = HookStore::new(&path, move |op, _, _| {
            if op == StoreOp::Read && p2.swap(false, Relaxed) {
                panic!("the store's read panics once");
            }
            Ok(())
        });
        let cache = PageCache::new();
        let file = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
        let map = file.mmap_raw(0, 4 * PAGE_SIZE).unwrap();
        let at = 2 * PAGE_SIZE;
        assert_eq!(common::kernel_copy_out(&map, at), None, "the panicking read's page");
        assert!(!panics.load(Relaxed));
        let mut b = [0u8; 16];
        file.read_at(&mut b, at as u64).unwrap();
        assert_eq!(b[..], content[at..at + 16]);
        assert_eq!(
            common::kernel_copy_out(&map, at).as_deref(),
            Some(&content[at..at + 16]),
            "the page still raises SIGBUS after a read of it succeeded"
        );
    });
}

/// The engine's `readahead` panicking on the window read ahead after a
/// served fault: the fault's page stays served. The handler's catch of the
/// panic poisoned the page it had just served (the window's readahead runs
/// after the wake-up), so its next access raised SIGBUS.
#[test]
fn a_panicking_async_readahead_leaves_the_served_page_mapped() {
    use common::{HookStore, StoreOp};
    watchdog("a panicking async readahead", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        let pages = 64;
        let content: Vec<u8> = (0..pages * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &content).unwrap();
        // 64 KiB windows, sequential: the first fault reads pages 0-15
        // and leaves 16-31 to read ahead, whose read panics.
        let window = 16 * PAGE_SIZE as u64;
        let panics = Arc::new(AtomicUsize::new(0));
        // The poison lands only if the handler gets there before the
        // woken thread maps the page: several rounds, each a new cache.
        let rounds = 100;
        for round in 0..rounds {
            let p2 = panics.clone();
            let store = HookStore::new(&path, move |op, off, _| {
                if op == StoreOp::Read && off >= window {
                    p2.fetch_add(1, Relaxed);
                    panic!("the store's read panics past the first window");
                }
                Ok(())
            });
            let cache = PageCache::builder()
                .readahead_bytes(window)
                .readahead_max_bytes(window)
                .build();
            let file = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
            file.advise(upcache::Advice::Sequential, 0, 0).unwrap();
            let map = file.mmap_raw(0, pages * PAGE_SIZE).unwrap();
            for at in [0, PAGE_SIZE, 0] {
                assert_eq!(
                    common::kernel_copy_out(&map, at).as_deref(),
                    Some(&content[at..at + 16]),
                    "round {round}, byte {at}: a served page raised SIGBUS"
                );
            }
        }
        assert_eq!(panics.load(Relaxed), rounds, "one read ahead per round, each panicked");
    });
}
