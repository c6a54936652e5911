//! Regression tests for the soundness issue (#7): lifetimes of folio
//! references and mappings, fork, panicking stores, shutdown with parked
//! faults. Each was seen to fail (crash, wrong bytes or hang) before its
//! fix; every test that can block runs under a watchdog.

#[macro_use]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{run_child_per_mode, tempdir, watchdog, Gate, HookStore, StoreOp};
use upcache::aops::PgOff;
use upcache::{PageCache, Share, StoreOps, UffdMode, PAGE_SIZE};

const SIGBUS: i32 = 7;

fn byte(o: usize) -> u8 {
    (o % 251) as u8 + 1
}

fn content(len: usize) -> Vec<u8> {
    (0..len).map(byte).collect()
}

/// A `FolioRef` outlives its `File` and `PageCache`: it must keep the page
/// store mapped (before the fix the bytes were read from unmapped memory,
/// or a write landed in whatever was mapped there next).
#[test]
fn folio_ref_outlives_file_and_cache() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, content(16 * PAGE_SIZE)).unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    let mut b = [0u8; 1];
    file.read_at(&mut b, 3 * PAGE_SIZE as u64).unwrap();
    let folio = file
        .address_space()
        .unwrap()
        .filemap_get_folio(PgOff(3))
        .expect("cached");
    drop(file);
    drop(cache);
    // Map and unmap plenty of memory so that a dangling view would be
    // reused by something else.
    let junk: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8; 64 << 20]).collect();
    let mut out = vec![0u8; PAGE_SIZE];
    let off = (3 * PAGE_SIZE as u64 - folio.pos()) as usize;
    folio.copy_out(off, &mut out);
    assert_eq!(out[..], content(16 * PAGE_SIZE)[3 * PAGE_SIZE..4 * PAGE_SIZE]);
    assert!(junk.iter().enumerate().all(|(i, v)| v.iter().all(|&x| x == i as u8)));
}

/// A mapping whose `File` and `PageCache` are gone still works, and its
/// writes reach the file when it is dropped (before the fix the address
/// space's drop discarded them).
#[test]
fn mapping_outlives_file_and_cache_and_its_writes_reach_the_file() {
    watchdog("mapping outlives file and cache", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, content(8 * PAGE_SIZE)).unwrap();
        for mode in [UffdMode::Missing, UffdMode::Minor] {
            let cache = PageCache::builder().mmap_mode(mode).build();
            let file = cache.open(&path).unwrap();
            // SAFETY: only this thread touches the mapping.
            let mut map = unsafe { file.mmap_mut(0, 8 * PAGE_SIZE, Share::Shared) }.unwrap();
            file.close().unwrap();
            drop(file);
            drop(cache);
            assert_eq!(map[5 * PAGE_SIZE + 7], byte(5 * PAGE_SIZE + 7), "{mode:?}");
            map[5 * PAGE_SIZE + 7] = 0xEE;
            map[100] = 0xDD;
            drop(map);
            let disk = std::fs::read(&path).unwrap();
            assert_eq!(disk[5 * PAGE_SIZE + 7], 0xEE, "{mode:?}: mapped write lost at drop");
            assert_eq!(disk[100], 0xDD, "{mode:?}");
            std::fs::write(&path, content(8 * PAGE_SIZE)).unwrap();
        }
    });
}

/// close, then open again while a mapping is alive: one address space, so
/// the new handle sees the mapping's writes (before the fix: a second,
/// incoherent cache of the same file).
#[test]
fn reopen_while_mapped_shares_one_address_space() {
    watchdog("reopen while mapped", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, content(4 * PAGE_SIZE)).unwrap();
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        // SAFETY: only this thread touches the mapping.
        let mut map = unsafe { file.mmap_mut(0, 4 * PAGE_SIZE, Share::Shared) }.unwrap();
        file.close().unwrap();
        drop(file);
        map[10] = 0x42;
        let again = cache.open(&path).unwrap();
        let mut b = [0u8; 1];
        again.read_at(&mut b, 10).unwrap();
        assert_eq!(b[0], 0x42, "a second open while mapped must see the mapping's write");
        again.write_at(&[0x43], 11).unwrap();
        assert_eq!(map[11], 0x43);
        drop(map);
        again.close().unwrap();
    });
}

/// A store that panics while serving a fault: the faulting thread gets
/// SIGBUS (before the fix the handler thread died and the faulting thread
/// hung forever).
#[test]
fn panicking_store_ends_the_fault_in_sigbus() {
    for (mode, st) in run_child_per_mode("panicking_store") {
        assert_eq!(st.signal(), Some(SIGBUS), "{mode}: expected SIGBUS, got {st:?}");
    }
}

/// After `fork`, a child touching the parent's mapping must not put a zero
/// page into the shared page store (before the fix the parent then read 0
/// where `read_at` returned the real byte). The child does not inherit
/// upcache mappings (`MADV_DONTFORK`), so its access faults.
#[test]
fn fork_does_not_corrupt_the_parent() {
    for (mode, st) in run_child_per_mode("fork") {
        assert_eq!(st.code(), Some(0), "{mode}: parent-side check failed: {st:?}");
    }
}

/// The children's side. A no-op unless `UPCACHE_CHILD` is set.
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
    let cache = PageCache::builder().mmap_mode(mode).readahead_bytes(4096).build();
    cache.start_fault_engine().expect("userfaultfd");
    match case.as_str() {
        "panicking_store" => {
            std::fs::write(&path, content(8 * PAGE_SIZE)).unwrap();
            let panic_now = Arc::new(AtomicBool::new(false));
            let flag = panic_now.clone();
            let store = HookStore::new(&path, move |op, _, _| {
                if op == StoreOp::Read && flag.load(Ordering::Relaxed) {
                    panic!("store panics on purpose");
                }
                Ok(())
            });
            let file = cache.open_with_ops("panicky", StoreOps::new(store)).unwrap();
            // SAFETY: only this thread touches the mapping.
            let map = unsafe { file.mmap(0, 8 * PAGE_SIZE, Share::Shared) }.unwrap();
            assert_eq!(map[1], byte(1), "a healthy fault first");
            panic_now.store(true, Ordering::Relaxed);
            let _ = std::hint::black_box(map[5 * PAGE_SIZE]);
        }
        "drop_during_fault" => drop_during_fault(mode, &path),
        "fork" => {
            std::fs::write(&path, content(16 * PAGE_SIZE)).unwrap();
            let file = cache.open(&path).unwrap();
            // SAFETY: only this thread touches the mapping (the forked
            // child does not inherit it).
            let map = unsafe { file.mmap(0, 16 * PAGE_SIZE, Share::Shared) }.unwrap();
            assert_eq!(map[0], byte(0));
            let addr = map.as_ptr() as usize + 9 * PAGE_SIZE;
            // SAFETY: the forked child only reads one byte and exits with
            // `_exit` (async-signal-safe); a fault there is a signal.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: as above.
                unsafe {
                    let v = std::ptr::read_volatile(addr as *const u8);
                    libc::_exit(v as i32);
                }
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            let mut b = [0u8; 1];
            file.read_at(&mut b, 9 * PAGE_SIZE as u64).unwrap();
            assert_eq!(b[0], byte(9 * PAGE_SIZE), "read_at");
            assert_eq!(
                map[9 * PAGE_SIZE],
                byte(9 * PAGE_SIZE),
                "parent's mapping after the child's touch"
            );
            // A second mapping (the kernel maps present pages itself in
            // Missing mode) must not see a zero page either.
            // SAFETY: only this thread touches the mapping.
            let map2 = unsafe { file.mmap(0, 16 * PAGE_SIZE, Share::Shared) }.unwrap();
            assert_eq!(map2[9 * PAGE_SIZE], byte(9 * PAGE_SIZE), "new mapping");
            std::process::exit(0);
        }
        "folio_ref_overflow" => {
            std::fs::write(&path, content(PAGE_SIZE)).unwrap();
            let file = cache.open(&path).unwrap();
            let mut b = [0u8; 1];
            file.read_at(&mut b, 0).unwrap();
            let r = file.address_space().unwrap().filemap_get_folio(PgOff(0)).unwrap();
            // Past 2^31 leaked references the count wrapped into the
            // DETACHED bit and the next drop freed the cached folio.
            for _ in 0..(1u64 << 30) + 16 {
                std::mem::forget(r.clone());
            }
            eprintln!("2^30 leaked folio references did not abort");
            std::process::exit(0);
        }
        "tls_drop" => {
            std::thread_local! {
                static SLOT: std::cell::RefCell<Option<upcache::File>> = const { std::cell::RefCell::new(None) };
            }
            let c = cache.clone();
            let p = path.clone();
            std::fs::write(&path, content(4 * PAGE_SIZE)).unwrap();
            std::thread::spawn(move || {
                // The slot's destructor is registered first, so it runs
                // after upcache's own thread-locals are gone.
                SLOT.with(|s| *s.borrow_mut() = Some(c.open(&p).unwrap()));
                SLOT.with(|s| s.borrow().as_ref().unwrap().write_at(b"tls!", 0).unwrap());
            })
            .join()
            .unwrap();
            drop(cache);
            assert_eq!(&std::fs::read(&path).unwrap()[..4], b"tls!", "the write was lost");
            std::process::exit(0);
        }
        other => panic!("unknown child case {other}"),
    }
    std::process::exit(0);
}

/// Run child case `case` once (one mapping mode: it maps nothing) on a
/// fresh path, under a `secs` watchdog.
fn run_child_once(case: &str, secs: u64) -> std::process::ExitStatus {
    let dir = tempdir();
    let env = [
        ("UPCACHE_CHILD_MODE", "Missing".to_string()),
        ("UPCACHE_CHILD_PATH", dir.path().join("f").display().to_string()),
    ];
    common::run_child("child_entry", case, &env, secs)
}

/// Leaking `FolioRef` clones from safe code (`mem::forget`) must never
/// wrap the reference count: past 2^31 it carried into the DETACHED bit,
/// and dropping the original then freed a folio the index still held
/// (use after free). Like `Arc`, upcache aborts past 2^30.
#[test]
fn leaked_folio_references_abort_before_the_count_wraps() {
    let st = run_child_once("folio_ref_overflow", 300);
    assert_eq!(st.signal(), Some(libc::SIGABRT), "expected an abort, got {st:?}");
}

/// A `File` dropped by a thread-local's destructor, after upcache's own
/// thread-locals were destroyed: its final write-back ran an engine
/// callback whose bookkeeping used `LocalKey::with`, which panics there,
/// and a panic in a thread-local destructor aborts the process (the
/// write was lost).
#[test]
fn a_file_dropped_by_a_thread_local_destructor_is_written_back() {
    let st = run_child_once("tls_drop", 60);
    assert_eq!(st.code(), Some(0), "expected a clean exit, got {st:?}");
}

/// A write fault parked by `freeze` must be answered when the cache goes
/// away (before the fix it hung forever: no thaw, no flusher left).
#[test]
fn parked_write_fault_is_answered_after_the_cache_is_dropped() {
    watchdog("parked fault after shutdown", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, content(4 * PAGE_SIZE)).unwrap();
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        // SAFETY: the writer thread is the only one touching the mapping
        // while it runs; the main thread reads after joining it.
        let map = unsafe { file.mmap_mut(0, 4 * PAGE_SIZE, Share::Shared) }.unwrap();
        assert_eq!(map[0], byte(0));
        cache.freeze().unwrap();
        let addr = map.as_ptr() as usize;
        let writer = std::thread::spawn(move || {
            // SAFETY: the mapping outlives this thread (joined below).
            unsafe { std::ptr::write_volatile((addr + 2 * PAGE_SIZE) as *mut u8, 0x77) };
        });
        file.close().unwrap();
        drop(file);
        drop(cache);
        writer.join().unwrap();
        assert_eq!(map[2 * PAGE_SIZE], 0x77);
        drop(map);
        assert_eq!(std::fs::read(&path).unwrap()[2 * PAGE_SIZE], 0x77);
    });
}

/// Item 1 of the issue with the safe API: two raw mappings of one page and
/// `write_at` see each other's writes, with no reference to shared bytes
/// (with two `MmapMut`s, `a[0]=1; b[0]=2; a[0]` returned 1 in release).
#[test]
fn two_raw_mappings_of_one_page_are_coherent() {
    watchdog("raw mappings", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, content(4 * PAGE_SIZE)).unwrap();
        for mode in [UffdMode::Missing, UffdMode::Minor] {
            let cache = PageCache::builder().mmap_mode(mode).build();
            let file = cache.open(&path).unwrap();
            let a = file.mmap_raw(0, 4 * PAGE_SIZE).unwrap();
            let b = file.mmap_raw(0, 4 * PAGE_SIZE).unwrap();
            a.write(0, &[1]);
            b.write(0, &[2]);
            let mut x = [0u8; 1];
            a.read(0, &mut x);
            assert_eq!(x[0], 2, "{mode:?}");
            file.write_at(&[3], 0).unwrap();
            b.read(0, &mut x);
            assert_eq!(x[0], 3, "{mode:?}");
            std::thread::scope(|s| {
                s.spawn(|| a.write(PAGE_SIZE, &[9; 16]));
            });
            b.read(PAGE_SIZE, &mut x);
            assert_eq!(x[0], 9, "{mode:?}");
            assert!(
                a.flush_range(4 * PAGE_SIZE, 1).is_err(),
                "range past the mapping is EINVAL"
            );
            a.flush_range(PAGE_SIZE, 16).unwrap();
            assert_eq!(std::fs::read(&path).unwrap()[PAGE_SIZE], 9, "{mode:?}");
            drop((a, b));
            file.close().unwrap();
            std::fs::write(&path, content(4 * PAGE_SIZE)).unwrap();
        }
    });
}

/// The page whose store read waits at the gate in `drop_during_fault`.
const GATE_AT: u64 = 9 * PAGE_SIZE as u64;

/// Where a thread sleeps in the kernel (`/proc/.../wchan`).
fn wchan(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default()
}

/// Item 3 of the issue: a mapping dropped while other threads fault on it.
/// In a child (see `drop_during_fault`): one handler thread; thread B's
/// fault is held inside the store (gated page), thread A's fault waits,
/// unread, in the userfaultfd queue. The mapping is dropped: it unpublishes
/// itself and waits for B's fault; then the gate opens. A and B are woken
/// with their range gone (SIGSEGV, which the child turns into a read of an
/// anonymous page). What must hold: no zero page reaches the page store (a
/// later Missing-mode mapping and `read_at` see the file's bytes), and no
/// thread stays blocked (the child's watchdog). Caveat, measured: with the
/// old order planted (unregister, then munmap) 50 rounds did not hit the
/// zero-page window here (the woken thread must run between two syscalls of
/// the dropper); the order itself is argued in `mmap::do_munmap`.
#[test]
fn dropping_a_mapping_while_another_thread_faults_on_it() {
    for (mode, st) in run_child_per_mode("drop_during_fault") {
        assert_eq!(st.code(), Some(0), "{mode}: {st:?}");
    }
}

extern "C" fn map_anon_on_segv(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; mmap is async-signal-safe.
    // The child unmapped this range itself, nothing else lives there.
    unsafe {
        let addr = (*info).si_addr() as usize & !(PAGE_SIZE - 1);
        libc::mmap(
            addr as *mut libc::c_void,
            PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
    }
}

fn drop_during_fault(mode: UffdMode, path: &std::path::Path) {
    // SAFETY: installing a handler in this single-purpose child process.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = map_anon_on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
    }
    // The window a wrong teardown order opens is short (a woken thread
    // must run between two syscalls of the dropper): repeat.
    let rounds = std::env::var("UPCACHE_DROP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    for _ in 0..rounds {
        drop_during_fault_once(mode, path);
    }
}

fn drop_during_fault_once(mode: UffdMode, path: &std::path::Path) {
    let want = content(16 * PAGE_SIZE);
    std::fs::write(path, &want).unwrap();
    let gate = Gate::new(false);
    let g = gate.clone();
    let store = HookStore::new(path, move |op, o, l| {
        if op == StoreOp::Read && (o..o + l).contains(&GATE_AT) {
            g.pass();
        }
        Ok(())
    });
    let cache = PageCache::builder()
        .mmap_mode(mode)
        .fault_threads(1)
        .readahead_bytes(4096)
        .build();
    let file = cache.open_with_ops("gated", StoreOps::new(store)).unwrap();
    let map = file.mmap_raw(0, 16 * PAGE_SIZE).unwrap();
    let base = map.as_ptr() as usize;
    let spawn_reader = |page: usize| {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            // SAFETY: a user access to memory that may be unmapped under
            // it; the SIGSEGV handler above maps a page there.
            unsafe { std::ptr::read_volatile((base + page * PAGE_SIZE) as *const u8) }
        });
        (h, rx.recv().unwrap())
    };
    let (b, _) = spawn_reader(GATE_AT as usize / PAGE_SIZE);
    gate.wait_arrived();
    let (a, a_tid) = spawn_reader(3);
    while wchan(a_tid) != "handle_userfault" {
        std::thread::yield_now();
    }
    let space = file.address_space().unwrap();
    let dropper = std::thread::spawn(move || drop(map));
    while space.nr_mappings() != 0 {
        std::thread::yield_now();
    }
    gate.open();
    dropper.join().unwrap();
    for (h, page) in [(a, 3), (b, GATE_AT as usize / PAGE_SIZE)] {
        let got = h.join().unwrap();
        assert!(
            got == 0 || got == byte(page * PAGE_SIZE),
            "{mode:?}: page {page} read {got}"
        );
    }
    // SAFETY: only this thread touches the mapping.
    let fresh = unsafe { file.mmap_with_mode(0, 16 * PAGE_SIZE, Share::Shared, UffdMode::Missing) }.unwrap();
    for p in 0..16 {
        assert!(
            fresh[p * PAGE_SIZE..][..PAGE_SIZE] == want[p * PAGE_SIZE..][..PAGE_SIZE],
            "{mode:?}: a later mapping served wrong bytes on page {p} (zero page in the store)"
        );
    }
    let mut got = vec![0u8; 16 * PAGE_SIZE];
    file.read_at(&mut got, 0).unwrap();
    assert!(got == want, "{mode:?}: read_at served wrong bytes");
}

/// A cache holding a 16-page file (nothing cached yet).
fn sixteen_pages() -> (tempfile::TempDir, PageCache, upcache::File) {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, content(16 * PAGE_SIZE)).unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    (dir, cache, file)
}

/// The engine-facing `aops` surface cannot alias folio bytes from safe
/// code: writeback (which shares the bytes as `&[u8]`) needs an uptodate
/// folio, `FolioGuard::data_mut` (`&mut [u8]`) a folio that is not, and
/// `fill_folio` refuses an uptodate one (its bytes may be borrowed by page
/// guards and writeback). Before, a folio just created could be put under
/// writeback, relocked and handed out as `&mut [u8]` while `Writeback::data`
/// was alive.
#[test]
fn the_aops_surface_cannot_alias_folio_bytes() {
    let (_dir, _cache, file) = sixteen_pages();
    let m = file.address_space().unwrap();
    let g = m.filemap_grab_folio(PgOff(0)).unwrap();
    assert!(!g.is_uptodate());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(m.folio_start_writeback(g))));
    assert!(r.is_err(), "writeback of a folio that is not uptodate must be refused");
    let mut b = [0u8; 1];
    file.read_at(&mut b, 0).unwrap();
    let mut g = m.filemap_lock_folio(PgOff(0)).unwrap();
    assert!(g.is_uptodate());
    let e = m.fill_folio(&mut g, &[9u8; 16]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    drop(g);
    file.read_at(&mut b, 0).unwrap();
    assert_eq!(b[0], byte(0), "the refused fill changed nothing");
}

/// `fill_folio` of another file's folio is refused: in page-atomic mode
/// (a mapping exists) it wrote the caller's file's memory at that folio's
/// offset — cached, uptodate bytes a `PageRef` was reading (found by
/// review, thirteenth session).
#[test]
fn fill_folio_refuses_another_files_folio() {
    let (dir, cache, a) = sixteen_pages();
    let _map = a.mmap_raw(0, 16 * PAGE_SIZE).unwrap();
    let bp = dir.path().join("b");
    std::fs::write(&bp, content(16 * PAGE_SIZE)).unwrap();
    let b = cache.open(&bp).unwrap();
    let mut x = [0u8; 1];
    a.read_at(&mut x, 0).unwrap();
    // SAFETY: no mapping of `a` writes page 0 while the guard lives (the
    // mapping is never touched).
    let page = unsafe { a.get_page(0) }.unwrap();
    let (ma, mb) = (a.address_space().unwrap(), b.address_space().unwrap());
    assert!(ma.needs_atomic_fill());
    let mut g = mb.filemap_grab_folio(PgOff(0)).unwrap();
    let e = ma.fill_folio(&mut g, &[0x55u8; PAGE_SIZE]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert_eq!(page[0], byte(0), "a's cached page changed under its PageRef");
    drop((g, page));
}

/// Page indices past the largest file reach no folio: the index's slot
/// arithmetic used to wrap (index 2^32 is slot 0) and the folio's memory
/// was the next file's, in release builds.
#[test]
fn page_indices_past_the_largest_file_reach_no_folio() {
    let (_dir, _cache, file) = sixteen_pages();
    let mut b = [0u8; 1];
    file.read_at(&mut b, 0).unwrap();
    let m = file.address_space().unwrap();
    let past = upcache::MAX_FILE_SIZE >> 12;
    assert!(m.filemap_get_folio(PgOff(0)).is_some());
    assert!(m.filemap_get_folio(PgOff(past)).is_none(), "index {past} found folio 0");
    assert!(m.filemap_lock_folio(PgOff(past)).is_none());
    let e = m.filemap_grab_folio(PgOff(past)).map(|_| ()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(27), "EFBIG: {e}");
}

/// `Folio::copy_out` checks its range without overflow: `off + len`
/// wrapped in release builds, and the copy read before the folio
/// (another file's memory).
#[test]
fn folio_copy_out_range_cannot_wrap() {
    let (_dir, _cache, file) = sixteen_pages();
    let mut b = [0u8; 1];
    file.read_at(&mut b, 0).unwrap();
    let f = file.address_space().unwrap().filemap_get_folio(PgOff(0)).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut dst = [0u8; 4096];
        f.copy_out(usize::MAX - 4094, &mut dst);
    }));
    assert!(r.is_err(), "an overflowing range must be refused");
    let mut dst = [0u8; 4];
    f.copy_out(100, &mut dst);
    assert_eq!(dst, [byte(100), byte(101), byte(102), byte(103)]);
}

/// Engine operations whose `write_begin` hands back a folio that does not
/// hold the byte being written (here the next page's, or another file's).
/// `write_at` used to copy at `pos - folio.pos()`, which wrapped: in a
/// release build the copy landed before the folio, in another page of the
/// file or another file's region of the page store, from safe code.
struct WrongFolio {
    inner: StoreOps<upcache::FileStore>,
    other: Option<upcache::File>,
}

impl upcache::aops::AddressSpaceOps for WrongFolio {
    delegate_to_inner!(read_folio);
    delegate_to_inner!(writepage);
    fn write_begin(
        &self,
        m: &upcache::aops::AddressSpace,
        pos: u64,
        _len: usize,
    ) -> std::io::Result<upcache::aops::FolioGuard> {
        match &self.other {
            Some(o) => o
                .address_space()
                .unwrap()
                .filemap_grab_folio(PgOff(pos / PAGE_SIZE as u64)),
            None => m.filemap_grab_folio(PgOff(pos / PAGE_SIZE as u64 + 1)),
        }
    }
    delegate_to_inner!();
}

/// Engine operations whose `write_begin` returns the right folio without
/// reading it first (not uptodate) for a partial write.
struct UnreadFolio {
    inner: StoreOps<upcache::FileStore>,
}

impl upcache::aops::AddressSpaceOps for UnreadFolio {
    delegate_to_inner!(read_folio);
    delegate_to_inner!(writepage);
    fn write_begin(
        &self,
        m: &upcache::aops::AddressSpace,
        pos: u64,
        _len: usize,
    ) -> std::io::Result<upcache::aops::FolioGuard> {
        m.filemap_grab_folio(PgOff(pos / PAGE_SIZE as u64))
    }
    delegate_to_inner!();
}

/// A partial write into a folio that `write_begin` did not read made the
/// rest of the folio file data unread (zeros over the file's bytes); with
/// page-atomic fills `buf` even landed at the folio's start.
#[test]
fn write_begin_returning_an_unread_folio_for_a_partial_write_is_an_error() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, [1u8; 2 * PAGE_SIZE]).unwrap();
    let cache = PageCache::new();
    let ops = UnreadFolio {
        inner: StoreOps::new(upcache::FileStore::open(&path).unwrap()),
    };
    let file = cache.open_with_ops("unread", ops).unwrap();
    let e = file
        .write_at(&[9u8; 16], 8)
        .expect_err("a partial write into an unread folio succeeded");
    assert_eq!(e.raw_os_error(), libc::EIO, "{e}");
    let mut b = [0u8; PAGE_SIZE];
    file.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 1), "the file's bytes changed");
    file.fsync().unwrap();
    assert!(std::fs::read(&path).unwrap().iter().all(|&x| x == 1));
}

#[test]
fn write_begin_returning_a_folio_without_the_byte_is_an_error() {
    let dir = tempdir();
    let path = dir.path().join("f");
    let other_path = dir.path().join("g");
    std::fs::write(&path, [1u8; 3 * PAGE_SIZE]).unwrap();
    std::fs::write(&other_path, [2u8; 3 * PAGE_SIZE]).unwrap();
    let cache = PageCache::new();
    let other = cache.open(&other_path).unwrap();
    for wrong_file in [false, true] {
        let ops = WrongFolio {
            inner: StoreOps::new(upcache::FileStore::open(&path).unwrap()),
            other: wrong_file.then(|| cache.open(&other_path).unwrap()),
        };
        let file = cache.open_with_ops(&format!("wrong-{wrong_file}"), ops).unwrap();
        let mut before = [0u8; 3 * PAGE_SIZE];
        file.read_at(&mut before, 0).unwrap();
        // Long enough that the wrapped offset plus the length wraps back
        // into the folio's bounds (the release build's bounds check passed).
        let r = file.write_at(&[9u8; 2 * PAGE_SIZE], PAGE_SIZE as u64 + 8);
        let e = r.expect_err("a write through a folio without the byte succeeded");
        assert_eq!(e.raw_os_error(), libc::EIO, "{e}");
        let mut after = [0u8; 3 * PAGE_SIZE];
        file.read_at(&mut after, 0).unwrap();
        assert_eq!(before, after, "the write landed somewhere in the file");
        let mut o = [0u8; 3 * PAGE_SIZE];
        other.read_at(&mut o, 0).unwrap();
        assert!(o.iter().all(|&b| b == 2), "the write landed in another file");
    }
}

/// Engine operations whose first `writepage` panics (after
/// `folio_clear_dirty_for_io` cleaned the folio), over a plain file.
struct PanicOnceWritepage {
    inner: StoreOps<upcache::FileStore>,
    panicked: AtomicBool,
}

impl upcache::aops::AddressSpaceOps for PanicOnceWritepage {
    delegate_to_inner!(read_folio);
    fn writepage(
        &self,
        m: &upcache::aops::AddressSpace,
        f: upcache::aops::FolioGuard,
        wbc: &mut upcache::aops::WritebackControl,
    ) -> std::io::Result<()> {
        if !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("writepage (planted by the test)");
        }
        self.inner.writepage(m, f, wbc)
    }
    delegate_to_inner!();
}

/// A panicking engine `writepage` left its folio clean and unwritten (the
/// panic unwound through `fsync` after the folio's DIRTY bit was cleared):
/// the next `fsync` wrote nothing, and reclaim could drop the data. The
/// panic is now the write's failure: `fsync` reports it, the folio stays
/// dirty, and the next `fsync` writes it.
#[test]
fn a_panicking_writepage_fails_the_write_and_keeps_the_data_dirty() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, [1u8; PAGE_SIZE]).unwrap();
    let cache = PageCache::new();
    let ops = PanicOnceWritepage {
        inner: StoreOps::new(upcache::FileStore::open(&path).unwrap()),
        panicked: AtomicBool::new(false),
    };
    let file = cache.open_with_ops("panic-once", ops).unwrap();
    assert_eq!(file.write_at(b"new", 0).unwrap(), 3);
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| file.fsync()));
    assert!(
        matches!(first, Ok(Err(_))),
        "the first fsync should fail with an error, not unwind: {first:?}"
    );
    file.fsync().unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[..3], b"new", "the write was lost");
}

/// Engine operations whose `invalidate_folio` panics on its second call.
struct PanicOnSecondInvalidate {
    inner: StoreOps<upcache::FileStore>,
    calls: std::sync::atomic::AtomicUsize,
}

impl upcache::aops::AddressSpaceOps for PanicOnSecondInvalidate {
    delegate_to_inner!(read_folio);
    delegate_to_inner!(writepage);
    delegate_to_inner!();
    fn invalidate_folio(
        &self,
        _m: &upcache::aops::AddressSpace,
        _f: &upcache::aops::FolioGuard,
        _off: usize,
        _len: usize,
    ) {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 1 {
            panic!("engine bug in invalidate_folio (planted by the test)");
        }
    }
}

/// An engine callback that panics in the middle of a truncate must not
/// let a new folio reuse the memory of one already removed while a
/// `PageRef` still reads it: the removed folios' pins are still waited
/// for and their memory punched on the way out (found by review,
/// thirteenth session: the unwind skipped both, and a write at the same
/// offset changed the bytes under the live `&[u8]`).
#[test]
fn a_panicking_engine_in_truncate_keeps_pinned_pages_stable() {
    watchdog("truncate with a panicking invalidate_folio", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 2 * PAGE_SIZE]).unwrap();
        let cache = PageCache::builder().max_folio_order(0).build();
        let ops = PanicOnSecondInvalidate {
            inner: StoreOps::new(upcache::FileStore::open(&path).unwrap()),
            calls: Default::default(),
        };
        let f = cache.open_with_ops("f", ops).unwrap();
        let mut b = vec![0u8; 2 * PAGE_SIZE];
        f.read_at(&mut b, 0).unwrap();
        // SAFETY: the file has no mapping.
        let page = unsafe { f.get_page(0) }.unwrap();
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let f = &f;
            let t = s.spawn(move || {
                tx.send(common::gettid()).unwrap();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.truncate(0)));
                assert!(r.is_err(), "the planted panic");
                f.write_at(&[9u8; PAGE_SIZE], 0).unwrap();
            });
            common::wait_until_parked(rx.recv().unwrap(), || t.is_finished());
            assert_eq!(page[0], 1, "a pinned page changed under its PageRef");
            drop(page);
            t.join().unwrap();
        });
        let mut x = [0u8; 1];
        f.read_at(&mut x, 0).unwrap();
        assert_eq!(x[0], 9);
    });
}
