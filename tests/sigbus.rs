//! Faults that cannot be served end in SIGBUS for the faulting thread
//! (UFFDIO_POISON), never in a hang. Each case runs in a child process (the
//! test binary re-executed with `UPCACHE_CHILD=<case>`), and the parent
//! asserts the child died of SIGBUS — after the child checked everything
//! that must still work (a failed check exits with a panic instead).

#[macro_use]
mod common;

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;

use common::{tempdir, HookStore, Rng, StoreOp};
use upcache::aops::{AddressSpace, AddressSpaceOps, FolioGuard, WritebackControl};
use upcache::{PageCache, Share, StoreOps, UffdMode, PAGE_SIZE};

const SIGBUS: i32 = 7;

/// Run `case` in a child (killed, and the test failed, after 120 s).
fn run_child(case: &str, mode: UffdMode, large: bool, path: &Path) -> std::process::ExitStatus {
    common::run_child(
        "child_entry",
        case,
        &[
            ("UPCACHE_CHILD_MODE", format!("{mode:?}")),
            ("UPCACHE_CHILD_LARGE", if large { "1" } else { "0" }.to_string()),
            ("UPCACHE_CHILD_PATH", path.display().to_string()),
        ],
        120,
    )
}

fn assert_sigbus_with(case: &str, large: bool) {
    for mode in [UffdMode::Minor, UffdMode::Missing] {
        let dir = tempdir();
        let path = dir.path().join("f");
        let st = run_child(case, mode, large, &path);
        assert_eq!(
            st.signal(),
            Some(SIGBUS),
            "{case} ({mode:?}, large folios: {large}): child should die of SIGBUS, got {st:?}"
        );
    }
}

fn assert_sigbus(case: &str) {
    assert_sigbus_with(case, false);
}

/// `case` runs to its end (exit 0, no SIGBUS) in every mode, with and
/// without large folios.
fn assert_clean_exit(case: &str) {
    for large in [true, false] {
        for mode in [UffdMode::Minor, UffdMode::Missing] {
            let dir = tempdir();
            let st = run_child(case, mode, large, &dir.path().join("f"));
            assert!(
                st.success(),
                "{case} ({mode:?}, large folios: {large}): child should exit cleanly, got {st:?}"
            );
        }
    }
}

fn byte(o: usize) -> u8 {
    (o % 253) as u8 + 1
}

/// The child's side. A no-op unless `UPCACHE_CHILD` is set.
#[test]
fn child_entry() {
    let Ok(case) = std::env::var("UPCACHE_CHILD") else {
        return;
    };
    let mode = match std::env::var("UPCACHE_CHILD_MODE").unwrap().as_str() {
        "Minor" => UffdMode::Minor,
        _ => UffdMode::Missing,
    };
    let path = std::path::PathBuf::from(std::env::var_os("UPCACHE_CHILD_PATH").unwrap());
    let large = std::env::var("UPCACHE_CHILD_LARGE").as_deref() == Ok("1");
    let cache = PageCache::builder().mmap_mode(mode).large_folios(large).build();
    cache.start_fault_engine().expect("userfaultfd");
    match case.as_str() {
        "beyond_eof" => {
            let size = 2 * PAGE_SIZE + 1000;
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<_>>()).unwrap();
            let file = cache.open(&path).unwrap();
            // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
            let map = unsafe { file.mmap(0, 8 * PAGE_SIZE, Share::Shared) }.unwrap();
            assert_eq!(map[PAGE_SIZE + 5], byte(PAGE_SIZE + 5));
            // The partial last page: data, then zeros up to the page end.
            assert_eq!(map[size - 1], byte(size - 1));
            assert_eq!(map[size + 10], 0);
            // A page wholly past EOF: SIGBUS.
            let _ = std::hint::black_box(map[5 * PAGE_SIZE]);
        }
        "after_truncate" => {
            let size = 64 * PAGE_SIZE;
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<_>>()).unwrap();
            let file = Arc::new(cache.open(&path).unwrap());
            // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
            let map = Arc::new(unsafe { file.mmap(0, size, Share::Shared) }.unwrap());
            assert!(map.iter().enumerate().all(|(o, &b)| b == byte(o)));
            let low = 16 * PAGE_SIZE + 100;
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let map = map.clone();
                    s.spawn(move || {
                        let mut rng = Rng::new(t);
                        for _ in 0..20_000 {
                            let o = rng.below(16 * PAGE_SIZE as u64) as usize;
                            assert_eq!(map[o], byte(o), "below the new EOF stays correct");
                        }
                    });
                }
                file.truncate(low as u64).unwrap();
            });
            assert_eq!(map[low - 1], byte(low - 1));
            assert_eq!(map[low + 1], 0, "tail of the last page reads zero");
            let _ = std::hint::black_box(map[40 * PAGE_SIZE]);
        }
        "beyond_eof_cached_first" => {
            let size = 2 * PAGE_SIZE + 1000;
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<_>>()).unwrap();
            let file = cache.open(&path).unwrap();
            // Cached before the mapping exists: the mapping must poison the
            // cached folio's pages past end of file itself.
            let mut b = [0u8; 1];
            file.read_at(&mut b, 5).unwrap();
            assert_eq!(b[0], byte(5));
            // SAFETY: the mapping is read only through short-lived borrows, never while another writer changes the same bytes.
            let map = unsafe { file.mmap(0, 8 * PAGE_SIZE, Share::Shared) }.unwrap();
            assert_eq!(map[size - 1], byte(size - 1));
            let _ = std::hint::black_box(map[5 * PAGE_SIZE]);
        }
        "beyond_eof_cached_first_writable_read" | "beyond_eof_cached_first_writable_store" => {
            // The same through a shared writable mapping, whose cached
            // pages are write-protected (uffd-wp markers on empty PTEs)
            // before the past-EOF walk poisons: POISON over a marker fails
            // with EEXIST, and MADV_DONTNEED keeps markers, so the pages
            // past the end stayed unpoisoned — a read returned 0 and a
            // store faulted for ever (page_mkwrite refuses past EOF).
            let size = 2 * PAGE_SIZE + 1000;
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<_>>()).unwrap();
            let file = cache.open(&path).unwrap();
            let mut b = [0u8; 1];
            file.read_at(&mut b, 5).unwrap();
            let map = file.mmap_raw(0, 8 * PAGE_SIZE).unwrap();
            map.read(size - 1, &mut b);
            assert_eq!(b[0], byte(size - 1));
            if case.ends_with("store") {
                map.write(5 * PAGE_SIZE, &[1]);
            } else {
                map.read(5 * PAGE_SIZE, &mut b);
            }
        }
        "append_while_reading" => {
            // A reader of the bytes a long append has made visible so far
            // (i_size grows folio by folio) must never get SIGBUS.
            std::fs::write(&path, vec![1u8; 1000]).unwrap();
            let file = Arc::new(cache.open(&path).unwrap());
            let len = 32 << 20;
            // SAFETY: the mapping is only read, through short-lived borrows, of bytes below the end of file.
            let map = Arc::new(unsafe { file.mmap(0, len, Share::Shared) }.unwrap());
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reader = {
                let (file, map, done) = (file.clone(), map.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        let size = file.len().unwrap() as usize;
                        if size > 1000 {
                            assert_eq!(map[size - 1], 2, "last visible byte");
                            reads += 1;
                        }
                    }
                    reads
                })
            };
            file.write_at(&vec![2u8; len - 1000], 1000).unwrap();
            done.store(true, std::sync::atomic::Ordering::Release);
            reader.join().unwrap();
            assert_eq!(map[len - 1], 2);
            std::process::exit(0);
        }
        "append_past_a_gap" => {
            // A write far past the end, into a folio it creates: the pages
            // of that folio below the write (a hole) and the old last
            // folio's tail read zeros, no SIGBUS.
            let size = 2 * PAGE_SIZE + 1000;
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<_>>()).unwrap();
            let file = cache.open(&path).unwrap();
            let mib = 1 << 20;
            // SAFETY: the mapping is read only through short-lived borrows, never while another writer changes the same bytes.
            let map = unsafe { file.mmap(0, 8 * mib, Share::Shared) }.unwrap();
            assert_eq!(map[size - 1], byte(size - 1));
            let at = 3 * mib + 5 * PAGE_SIZE;
            file.write_at(&[0xCD; 10], at as u64).unwrap();
            assert_eq!(map[at + 9], 0xCD);
            assert_eq!(map[3 * mib], 0, "hole inside the new folio");
            assert_eq!(map[size + 2 * PAGE_SIZE], 0, "old last folio's tail");
            assert_eq!(map[2 * mib + 7], 0, "hole between");
            std::process::exit(0);
        }
        "failed_append" => {
            // A write past the end that fails after the old last folio's
            // tail was cleared for it: the tail must raise SIGBUS again.
            let size = 2 * PAGE_SIZE + 1000;
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<_>>()).unwrap();
            let ops = FailingAppend {
                inner: StoreOps::new(upcache::FileStore::open(&path).unwrap()),
                from: 3 << 20,
            };
            let file = cache.open_with_ops("failing-append", ops).unwrap();
            // SAFETY: the mapping is read only through short-lived borrows, never while another writer changes the same bytes.
            let map = unsafe { file.mmap(0, 8 << 20, Share::Shared) }.unwrap();
            assert_eq!(map[size - 1], byte(size - 1));
            assert!(file.write_at(&[7; 10], 3 << 20).is_err(), "the store refuses the write");
            assert_eq!(file.len().unwrap(), size as u64);
            let _ = std::hint::black_box(map[5 * PAGE_SIZE]);
        }
        "grow" => {
            let size = 2 * PAGE_SIZE + 1000;
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<_>>()).unwrap();
            let file = cache.open(&path).unwrap();
            // SAFETY: the mapping is read only through short-lived borrows, never while another writer changes the same bytes.
            let map = unsafe { file.mmap(0, 16 * PAGE_SIZE, Share::Shared) }.unwrap();
            assert_eq!(map[size - 1], byte(size - 1));
            // Grow by a write past the end, then by truncate.
            file.write_at(&[0xAB; 10], 6 * PAGE_SIZE as u64).unwrap();
            assert_eq!(
                map[6 * PAGE_SIZE + 9],
                0xAB,
                "written bytes past the old end are mapped"
            );
            assert_eq!(map[4 * PAGE_SIZE], 0, "the hole below the write reads zeros");
            file.truncate(10 * PAGE_SIZE as u64).unwrap();
            assert_eq!(map[9 * PAGE_SIZE + 1], 0, "the truncate-grown tail reads zeros");
            let _ = std::hint::black_box(map[12 * PAGE_SIZE]);
        }
        "read_error" => {
            std::fs::write(&path, vec![9u8; 8 * PAGE_SIZE]).unwrap();
            let store = HookStore::new(&path, |op, _, _| match op {
                StoreOp::Read => Err(io::Error::from_raw_os_error(5)),
                _ => Ok(()),
            });
            let file = cache.open_with_ops("failing", StoreOps::new(store)).unwrap();
            // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
            let map = unsafe { file.mmap(0, 8 * PAGE_SIZE, Share::Shared) }.unwrap();
            let _ = std::hint::black_box(map[3 * PAGE_SIZE]);
        }
        "write_fault_vs_truncate" => {
            // A write fault on page 100 of a 2 MiB folio; while the handler
            // marks the folio dirty, a truncate to one page publishes the
            // new size. The handler then makes writable only the pages
            // below the new end: the faulting page is past it and its
            // thread must be woken to fault again (and get SIGBUS), not
            // left asleep in the kernel.
            let size = 2 << 20;
            std::fs::write(&path, vec![5u8; size]).unwrap();
            let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let ops = ShrinkWatch {
                inner: StoreOps::new(upcache::FileStore::open(&path).unwrap()),
                old: size as u64,
                entered: entered.clone(),
            };
            let file = Arc::new(cache.open_with_ops("shrinking", ops).unwrap());
            let map = Arc::new(file.mmap_raw(0, size).unwrap());
            let mut b = [0u8; 1];
            map.read(100 * PAGE_SIZE, &mut b);
            assert_eq!(b[0], 5);
            let writer = {
                let map = map.clone();
                std::thread::spawn(move || map.write(100 * PAGE_SIZE, &[7]))
            };
            while !entered.load(std::sync::atomic::Ordering::Acquire) {
                std::hint::spin_loop();
            }
            file.truncate(PAGE_SIZE as u64).unwrap();
            writer.join().unwrap();
        }
        "read_error_cleared_meanwhile" => {
            // A fault's read fails; before the handler answers it with
            // poison, another thread's read_at reads the folio again and
            // succeeds (finding no poison to clear yet). The poison must
            // not stay on a page whose data is now cached: later accesses
            // are served. Accesses are kernel-mode (`write(2)` from the
            // mapping into a pipe), so poison shows as EFAULT, not SIGBUS.
            std::fs::write(&path, vec![9u8; 8 * PAGE_SIZE]).unwrap();
            let latch = Arc::new((std::sync::Mutex::new((false, false)), std::sync::Condvar::new()));
            let ops = Arc::new(FailOnceLatched {
                inner: StoreOps::new(upcache::FileStore::open(&path).unwrap()),
                fail: true.into(),
                latched: false.into(),
                latch: latch.clone(),
            });
            let file = Arc::new(cache.open_with_ops("fail-once", ops.clone()).unwrap());
            // The folio of page 3 stays cached, failed, not uptodate.
            let mut b = [0u8; 1];
            assert!(file.read_at(&mut b, 3 * PAGE_SIZE as u64).is_err());
            // The fault's read of it fails, and waits before answering.
            ops.latched.store(true, std::sync::atomic::Ordering::SeqCst);
            let map = file.mmap_raw(0, 8 * PAGE_SIZE).unwrap();
            let addr = map.as_ptr() as usize + 3 * PAGE_SIZE;
            let mut fds = [0i32; 2];
            // SAFETY: `fds` has room for the two descriptors.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let (rd, wr) = (fds[0], fds[1]);
            let kernel_read = move || {
                // SAFETY: `addr` lies in the live mapping; write(2) only
                // reads one byte from it.
                unsafe { libc::write(wr, addr as *const libc::c_void, 1) }
            };
            let first = std::thread::spawn(kernel_read);
            {
                let (m, cv) = &*latch;
                let mut st = m.lock().unwrap();
                while !st.0 {
                    st = cv.wait(st).unwrap();
                }
            }
            file.read_at(&mut b, 3 * PAGE_SIZE as u64).unwrap();
            assert_eq!(b[0], 9);
            {
                let (m, cv) = &*latch;
                m.lock().unwrap().1 = true;
                cv.notify_all();
            }
            let _ = first.join().unwrap();
            assert_eq!(kernel_read(), 1, "the page stays poisoned though its data is cached");
            let mut got = [0u8; 1];
            // SAFETY: `rd` is the pipe's read end, `got` one writable byte.
            while unsafe { libc::read(rd, got.as_mut_ptr() as *mut libc::c_void, 1) } == 1 && got[0] != 9 {}
            assert_eq!(got[0], 9);
            std::process::exit(0);
        }
        "async_truncate_then_missing_map" => {
            // An async-tracked mapping makes truncate keep the folio that
            // straddles the new end (its tail zeroed, still present in the
            // page store). A `Missing`-mode mapping made afterwards must
            // still raise SIGBUS past the end: the kernel maps present
            // pages itself there. It read zeros.
            let size = 200 << 10;
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<_>>()).unwrap();
            let cache = PageCache::builder()
                .dirty_tracking(upcache::DirtyTracking::Async)
                .build();
            let file = cache.open(&path).unwrap();
            let mut b = vec![0u8; 64 << 10];
            file.read_at(&mut b, 0).unwrap();
            let raw = file.mmap_raw(0, 64 << 10).unwrap();
            file.truncate(5000).unwrap();
            // SAFETY: read only, by this thread, while nothing writes the file.
            let map = unsafe { file.mmap_with_mode(0, 64 << 10, Share::Shared, UffdMode::Missing) }.unwrap();
            assert_eq!(map[100], byte(100));
            drop(raw);
            let _ = std::hint::black_box(map[2 * PAGE_SIZE]);
        }
        other => panic!("unknown child case {other}"),
    }
    // Reaching this line means no SIGBUS: exit normally so the parent fails.
    std::process::exit(0);
}

/// Truncate with an async-tracked mapping keeps the folio straddling the
/// new end; a `Missing`-mode mapping made afterwards read zeros past the
/// end instead of raising SIGBUS (only large-folio files were poisoned
/// when a mapping was made).
#[test]
fn missing_mapping_after_an_async_truncate_raises_sigbus_past_eof() {
    assert_sigbus("async_truncate_then_missing_map");
}

#[test]
fn page_beyond_eof_raises_sigbus() {
    assert_sigbus("beyond_eof");
}

#[test]
fn truncate_under_readers_raises_sigbus_past_eof_only() {
    assert_sigbus("after_truncate");
}

/// With large folios the last folio reaches past end of file and its pages
/// there are present in the page store; they must still raise SIGBUS.
#[test]
fn page_beyond_eof_inside_a_large_folio_raises_sigbus() {
    assert_sigbus_with("beyond_eof", true);
}

/// Operations whose `write_begin` fails from byte `from` on (a store out
/// of space), over a plain file.
struct FailingAppend {
    inner: StoreOps<upcache::FileStore>,
    from: u64,
}

impl AddressSpaceOps for FailingAppend {
    fn read_folio(&self, m: &AddressSpace, f: FolioGuard) -> io::Result<()> {
        self.inner.read_folio(m, f)
    }
    fn writepage(&self, m: &AddressSpace, f: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()> {
        self.inner.writepage(m, f, wbc)
    }
    fn write_begin(&self, m: &AddressSpace, pos: u64, len: usize) -> io::Result<FolioGuard> {
        if pos >= self.from {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        upcache::aops::generic_write_begin(m, pos, len)
    }
    delegate_to_inner!();
}

/// Operations whose `read_folio` fails while `fail` is set, and whose
/// first failure with `latched` set first says so through the latch
/// (`.0`), unlocks the folio, and returns its error only once the latch
/// opens (`.1`).
struct FailOnceLatched {
    inner: StoreOps<upcache::FileStore>,
    fail: std::sync::atomic::AtomicBool,
    latched: std::sync::atomic::AtomicBool,
    latch: Arc<(std::sync::Mutex<(bool, bool)>, std::sync::Condvar)>,
}

impl AddressSpaceOps for FailOnceLatched {
    fn read_folio(&self, m: &AddressSpace, f: FolioGuard) -> io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.fail.load(SeqCst) {
            return self.inner.read_folio(m, f);
        }
        f.set_error();
        drop(f);
        if self.latched.swap(false, SeqCst) {
            self.fail.store(false, SeqCst);
            let (lock, cv) = &*self.latch;
            let mut st = lock.lock().unwrap();
            st.0 = true;
            cv.notify_all();
            while !st.1 {
                st = cv.wait(st).unwrap();
            }
        }
        Err(io::Error::from_raw_os_error(5))
    }
    fn writepage(&self, m: &AddressSpace, f: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()> {
        self.inner.writepage(m, f, wbc)
    }
    delegate_to_inner!();
}

/// Poison answering a failed read must not outlive the failure: a read
/// that succeeded meanwhile (before the poison was installed) leaves the
/// page served, not raising SIGBUS until the mapping goes.
#[test]
fn poison_for_a_read_error_cleared_meanwhile_does_not_stay() {
    assert_clean_exit("read_error_cleared_meanwhile");
}

/// Operations whose `dirty_folio` waits, the first time, until the file
/// shrinks below `old` (a truncate has published its new size).
struct ShrinkWatch {
    inner: StoreOps<upcache::FileStore>,
    old: u64,
    entered: Arc<std::sync::atomic::AtomicBool>,
}

impl AddressSpaceOps for ShrinkWatch {
    fn read_folio(&self, m: &AddressSpace, f: FolioGuard) -> io::Result<()> {
        self.inner.read_folio(m, f)
    }
    fn writepage(&self, m: &AddressSpace, f: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()> {
        self.inner.writepage(m, f, wbc)
    }
    fn dirty_folio(&self, m: &AddressSpace, _f: &upcache::aops::Folio) {
        if !self.entered.swap(true, std::sync::atomic::Ordering::AcqRel) {
            while m.size() >= self.old {
                std::hint::spin_loop();
            }
        }
    }
    delegate_to_inner!();
}

/// A write fault whose page a racing truncate cuts off while the fault is
/// being served ends in SIGBUS; it used to leave the faulting thread asleep
/// in the kernel for ever (`Minor` mode: only the pages below the new end
/// were made writable and woken).
#[test]
fn a_write_fault_cut_off_by_a_racing_truncate_raises_sigbus() {
    assert_sigbus_with("write_fault_vs_truncate", true);
}

/// A failed write past the end leaves the pages past the end poisoned.
#[test]
fn failed_append_leaves_the_old_tail_raising_sigbus() {
    assert_sigbus_with("failed_append", true);
    assert_sigbus_with("failed_append", false);
}

/// Growth past a gap unpoisons every page below the new end.
#[test]
fn append_past_a_gap_reads_zeros_below_it() {
    assert_clean_exit("append_past_a_gap");
}

/// A reader of an append in progress never sees SIGBUS below the end.
#[test]
fn reading_an_append_in_progress_never_raises_sigbus() {
    assert_clean_exit("append_while_reading");
}

#[test]
fn page_beyond_eof_inside_a_large_folio_cached_before_mmap_raises_sigbus() {
    assert_sigbus_with("beyond_eof_cached_first", true);
}

#[test]
fn page_beyond_eof_inside_a_large_folio_cached_before_a_writable_mmap_raises_sigbus() {
    assert_sigbus_with("beyond_eof_cached_first_writable_read", true);
    assert_sigbus_with("beyond_eof_cached_first_writable_store", true);
}

#[test]
fn truncate_inside_a_large_folio_raises_sigbus_past_eof_only() {
    assert_sigbus_with("after_truncate", true);
}

/// Growing the file clears the poison: the pages past the old end read
/// the new bytes (then a page past the new end still raises SIGBUS).
#[test]
fn growth_inside_a_large_folio_unpoisons_and_the_new_end_still_raises_sigbus() {
    assert_sigbus_with("grow", true);
    assert_sigbus_with("grow", false);
}

#[test]
fn failed_read_raises_sigbus_and_the_engine_keeps_serving() {
    // The parent's own engine serves a mapping before and after the child
    // died of its failed read.
    let dir = tempdir();
    let path = dir.path().join("healthy");
    let content: Vec<u8> = (0..64 * PAGE_SIZE).map(byte).collect();
    std::fs::write(&path, &content).unwrap();
    let cache = PageCache::new();
    cache.start_fault_engine().expect("userfaultfd");
    let file = cache.open(&path).unwrap();
    // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
    let map = unsafe { file.mmap(0, content.len(), Share::Shared) }.unwrap();
    assert_eq!(map[10], content[10]);
    assert_sigbus("read_error");
    assert!(map[..] == content[..], "parent's mapping still served");
}
