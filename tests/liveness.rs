//! Regression tests for the liveness issue (#9): reclaim, truncate,
//! write_at and faults never deadlock or livelock. Each sequence hung
//! before its fix; every test runs under a watchdog.

#[macro_use]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;

use common::{gettid, run_child_per_mode, tempdir, watchdog, Gate, HookStore, StoreOp};
use upcache::{Advice, PageCache, Share, StoreOps, UffdMode, PAGE_SIZE};

const SIGBUS: i32 = 7;

fn byte(o: usize) -> u8 {
    (o % 251) as u8 + 1
}

/// limit 256 KiB; `WillNeed X; DontNeed X; WillNeed X; WillNeed 1 MiB`:
/// reclaim used to freeze the folio for one queue entry and then spin
/// forever looking it up for the duplicate entry.
#[test]
fn reclaim_with_a_duplicate_queue_entry_does_not_deadlock() {
    watchdog("reclaim duplicate entry", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, (0..4 << 20).map(byte).collect::<Vec<_>>()).unwrap();
        let cache = PageCache::builder().memory_limit(256 * 1024).build();
        let file = cache.open(&path).unwrap();
        file.advise(Advice::WillNeed, 0, 4096).unwrap();
        file.advise(Advice::DontNeed, 0, 4096).unwrap();
        file.advise(Advice::WillNeed, 0, 4096).unwrap();
        file.advise(Advice::WillNeed, 0, 1 << 20).unwrap();
        file.advise(Advice::WillNeed, 1 << 20, 2 << 20).unwrap();
        let mut b = vec![0u8; 4096];
        file.read_at(&mut b, 0).unwrap();
        assert!(b.iter().enumerate().all(|(i, &x)| x == byte(i)));
    });
}

/// Truncate down then up inside a large folio, then touch the pages past
/// the first truncation point through a mapping: zeros, no livelock (the
/// punched tail pages of a folio that stayed uptodate were never mapped).
#[test]
fn mapped_access_after_truncate_down_and_up_inside_a_large_folio() {
    watchdog("truncate down/up inside a large folio", 60, || {
        for mode in [UffdMode::Missing, UffdMode::Minor] {
            let dir = tempdir();
            let path = dir.path().join("f");
            let len = 256 * 1024;
            std::fs::write(&path, (0..len).map(byte).collect::<Vec<_>>()).unwrap();
            let cache = PageCache::builder().mmap_mode(mode).build();
            let file = cache.open(&path).unwrap();
            let mut b = vec![0u8; 64 * 1024];
            file.read_at(&mut b, 0).unwrap(); // a large folio at 0
            file.truncate(5000).unwrap();
            file.truncate(len as u64).unwrap();
            // SAFETY: only this thread touches the mapping.
            let map = unsafe { file.mmap(0, len, Share::Shared) }.unwrap();
            assert_eq!(map[4999], byte(4999), "{mode:?}");
            assert_eq!(map[5000], 0, "{mode:?}");
            for p in 2..16 {
                assert_eq!(map[p * PAGE_SIZE + 3], 0, "{mode:?} page {p}");
            }
            let mut r = vec![0u8; 16 * PAGE_SIZE];
            file.read_at(&mut r, 0).unwrap();
            assert!(r[5000..].iter().all(|&x| x == 0), "{mode:?}: read_at past the old cut");
            // The kept folio's pages stay in the page store: a fault that
            // had to give one memory (a hole truncate punched) is a bug,
            // even though the fault path now maps zeros instead of looping.
            assert_eq!(
                file.stats().unfilled_pages,
                0,
                "{mode:?}: truncate left holes in a kept folio"
            );
            drop(map);
        }
    });
}

/// `write_at` from a buffer that is a mapping of the same file (and
/// `read_at` into one) used to deadlock in `Minor` mode: the copy faulted
/// on the folio the writer held locked.
#[test]
fn write_at_and_read_at_through_a_mapping_of_the_same_file() {
    watchdog("write_at from own mapping", 60, || {
        for mode in [UffdMode::Minor, UffdMode::Missing] {
            let dir = tempdir();
            let path = dir.path().join("f");
            let len = 64 * PAGE_SIZE;
            std::fs::write(&path, (0..len).map(byte).collect::<Vec<_>>()).unwrap();
            let cache = PageCache::builder().mmap_mode(mode).readahead_bytes(4096).build();
            let file = cache.open(&path).unwrap();
            // SAFETY: only this thread touches the mapping, and `write_at`
            // reads it (no `&mut` to it exists meanwhile).
            let map = unsafe { file.mmap(0, len, Share::Shared) }.unwrap();
            // Source page 8 is not faulted yet; it lies in the folio written.
            file.write_at(&map[8 * PAGE_SIZE..9 * PAGE_SIZE], 8 * PAGE_SIZE as u64 + 100)
                .unwrap();
            let mut check = vec![0u8; 10];
            file.read_at(&mut check, 8 * PAGE_SIZE as u64 + 100).unwrap();
            assert_eq!(
                check[..],
                (0..10).map(|i| byte(8 * PAGE_SIZE + i)).collect::<Vec<_>>()[..]
            );
            // read_at into a mapping of the same file (not yet faulted).
            // SAFETY: only this thread touches the mapping.
            let mut wmap = unsafe { file.mmap_mut(0, len, Share::Shared) }.unwrap();
            let (a, b) = wmap.split_at_mut(32 * PAGE_SIZE);
            file.read_at(&mut b[..PAGE_SIZE], 20 * PAGE_SIZE as u64).unwrap();
            let _ = a;
            assert_eq!(wmap[32 * PAGE_SIZE + 1], byte(20 * PAGE_SIZE + 1), "{mode:?}");
            drop(wmap);
            drop(map);
        }
    });
}

/// Shrinking truncate under a shared writable mapping, then a touch of a
/// never-touched page past the new end: SIGBUS (it used to livelock in
/// `Missing` mode: POISON failed with EEXIST on the uffd-wp markers).
#[test]
fn shrinking_truncate_under_a_shared_writable_mapping_raises_sigbus() {
    for (mode, st) in run_child_per_mode("truncate_shared_mut") {
        assert_eq!(st.signal(), Some(SIGBUS), "{mode}: expected SIGBUS, got {st:?}");
    }
}

/// Found by the fsx test (seed 13, Missing, 256 KiB limit, op 14737): with
/// a dirty limit smaller than two folios, a mapped copy whose stores span
/// two folios (memcpy writes its head and tail last) ping-ponged: each write
/// fault was throttled until a flusher pass, and that pass cleaned and
/// re-protected the other folio. The copy took minutes. A throttled fault,
/// once released, earns its thread a few unthrottled write faults, so one
/// instruction's pages can all be writable at once.
#[test]
fn throttled_mapped_write_across_two_folios_completes() {
    watchdog("throttled mapped write across two folios", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 256 * 1024]).unwrap();
        for mode in [UffdMode::Missing, UffdMode::Minor] {
            // Dirty limit: 20 % of 256 KiB, less than one 64 KiB folio.
            let cache = PageCache::builder().mmap_mode(mode).memory_limit(256 * 1024).build();
            let file = cache.open(&path).unwrap();
            let map = file.mmap_raw(0, 256 * 1024).unwrap();
            let mut junk = vec![0u8; 128 * 1024];
            map.read(0, &mut junk);
            for round in 0..50u8 {
                let data = vec![round; 8000];
                map.write(65494, &data);
                let mut back = vec![0u8; 8000];
                file.read_at(&mut back, 65494).unwrap();
                assert!(back == data, "{mode:?} round {round}");
            }
            drop(map);
            file.close().unwrap();
        }
    });
}

/// Item 5 of the issue: direct reclaim never writes back, and neither
/// `read_at` nor mapped reads (`map_pages`) wait for a writeback. Half the
/// memory limit is dirty in a store whose writes block; reading 4x the
/// limit of other data (through `read_at` and a mapping) needs direct
/// reclaim all along, and must complete while every write is still
/// blocked: reclaim skips the dirty folios and evicts clean ones. (Before
/// the fix direct reclaim called `writepage` under the reclaim mutex, so
/// every reader stalled behind the store.)
#[test]
fn direct_reclaim_and_map_pages_never_wait_for_writeback() {
    watchdog("direct reclaim with a blocked store", 60, || {
        const LIMIT: u64 = 1 << 20;
        let dir = tempdir();
        let path = dir.path().join("f");
        let size = 5 * LIMIT as usize;
        std::fs::write(&path, (0..size).map(byte).collect::<Vec<u8>>()).unwrap();
        for mode in [UffdMode::Missing, UffdMode::Minor] {
            // Every store write blocks until the gate opens.
            let gate = Gate::new(false);
            let g = gate.clone();
            let store = HookStore::new(&path, move |op, _, _| {
                if op == StoreOp::Write {
                    g.pass();
                }
                Ok(())
            });
            let cache = PageCache::builder()
                .mmap_mode(mode)
                .memory_limit(LIMIT)
                .dirty_limit_bytes(LIMIT)
                .dirty_background_bytes(LIMIT / 4)
                .build();
            let file = cache.open_with_ops("blocked", StoreOps::new(store)).unwrap();
            let dirty = vec![0xAAu8; LIMIT as usize / 2];
            file.write_at(&dirty, 0).unwrap();
            let map = file.mmap_raw(0, size).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            for pass in 0..2 {
                let mut off = LIMIT as usize;
                while off < size {
                    let n = buf.len().min(size - off);
                    if pass == 0 {
                        file.read_at(&mut buf[..n], off as u64).unwrap();
                    } else {
                        map.read(off, &mut buf[..n]);
                    }
                    assert!((0..n).all(|i| buf[i] == byte(off + i)), "{mode:?} pass {pass} at {off}");
                    off += n;
                }
            }
            let st = cache.stats();
            assert!(
                st.bytes_cached <= LIMIT + LIMIT / 2,
                "{mode:?}: reclaim kept the limit: {st:?}"
            );
            // Open the gate; the dirty data must still reach the file.
            gate.open();
            drop(map);
            file.fsync().unwrap();
            assert!(std::fs::read(&path).unwrap()[..dirty.len()] == dirty[..], "{mode:?}");
            file.close().unwrap();
            std::fs::write(&path, (0..size).map(byte).collect::<Vec<u8>>()).unwrap();
        }
    });
}

/// Found by the stress test: one `read_at` larger than the memory limit
/// read the whole request ahead at once; reclaim evicted its head (the
/// oldest new folios) before the copy reached it, so the next miss read it
/// all again: it crawled (over a minute for 8 MiB under a 4 MiB limit) or
/// never finished. Readahead now takes one bounded chunk at a time.
#[test]
fn read_at_larger_than_the_memory_limit_completes() {
    watchdog("read_at of 4x the memory limit", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        let size = 8 << 20;
        let want: Vec<u8> = (0..size).map(byte).collect();
        std::fs::write(&path, &want).unwrap();
        let cache = PageCache::builder().memory_limit(2 << 20).build();
        let file = cache.open(&path).unwrap();
        for _ in 0..3 {
            let mut got = vec![0u8; size];
            assert_eq!(file.read_at(&mut got, 0).unwrap(), size);
            assert!(got == want);
        }
        assert!(cache.stats().bytes_cached <= 2 << 20);
    });
}

/// A program that installs a signal handler without `SA_RESTART` (a
/// profiler's `SIGPROF`) and gets signals into the fault handler threads:
/// a `read(2)` of the userfaultfd interrupted by one fails with `EINTR`.
/// A handler thread used to exit on it, and once every one had, each
/// fault hung. Runs in a child (signals to its handler threads only).
/// Since the pool grows spares when its handlers are stuck, the faults
/// alone no longer prove the handlers survived: the child checks that
/// every one is still alive.
#[test]
fn fault_handlers_survive_signals_that_interrupt_their_reads() {
    for (mode, st) in run_child_per_mode("signals") {
        assert!(st.success(), "{mode}: the child failed or hung: {st:?}");
    }
}

/// `freeze`, then the last `PageCache` handle goes while a `File` lives:
/// nothing could thaw the cache any more (`thaw` is a `PageCache` method),
/// and the next write parked for ever. The last handle's drop thaws.
#[test]
fn dropping_the_last_page_cache_handle_thaws_a_frozen_cache() {
    watchdog("write after the frozen cache's handle is gone", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        let clone = cache.clone();
        cache.freeze().unwrap();
        drop(cache);
        // Another handle lives: still frozen.
        assert!(clone.is_frozen());
        drop(clone);
        assert_eq!(file.write_at(b"x", 0).unwrap(), 1);
        file.fsync().unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[0], b'x');
    });
}

/// Dropping the last `PageCache` handle while another thread's `write_at`
/// is inside the freeze gate, waiting for this thread's pin: the drop's
/// thaw took the gate exclusive even though nothing was frozen, and waited
/// for the writer, which waited for the pin (found reviewing the fix
/// above). It thaws only a frozen cache now.
#[test]
fn dropping_the_last_page_cache_handle_never_waits_for_writers() {
    watchdog("drop of the last PageCache handle during a write", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let cache = PageCache::new();
        let file = Arc::new(cache.open(&path).unwrap());
        // SAFETY: nothing maps the file.
        let page = unsafe { file.get_page(0) }.unwrap();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                tid_tx.send(gettid()).unwrap();
                file.write_at(b"x", 0).unwrap();
            })
        };
        // The writer waits for the pin, inside the gate.
        common::wait_until_parked(tid_rx.recv().unwrap(), || writer.is_finished());
        drop(cache);
        drop(page);
        writer.join().unwrap();
        let mut b = [0u8; 1];
        file.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], b'x');
    });
}

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
    let cache = PageCache::builder().mmap_mode(mode).build();
    cache.start_fault_engine().expect("userfaultfd");
    match case.as_str() {
        "truncate_shared_mut" => {
            let len = 64 * PAGE_SIZE;
            std::fs::write(&path, (0..len).map(byte).collect::<Vec<_>>()).unwrap();
            let file = cache.open(&path).unwrap();
            // SAFETY: only this thread touches the mapping.
            let mut map = unsafe { file.mmap_mut(0, len, Share::Shared) }.unwrap();
            map[0] = 1;
            // Cache page 40 (never touched through the mapping): in
            // `Missing` mode that arms a uffd-wp marker on it, which the
            // truncation below keeps and POISON then refuses with EEXIST.
            let mut b = [0u8; 1];
            file.read_at(&mut b, 40 * PAGE_SIZE as u64).unwrap();
            file.truncate(8 * PAGE_SIZE as u64).unwrap();
            let _ = std::hint::black_box(map[40 * PAGE_SIZE]);
        }
        "signals" => {
            extern "C" fn ignore(_: libc::c_int) {}
            // SAFETY: a handler that does nothing is async-signal-safe;
            // flags 0: no SA_RESTART, so interrupted calls fail with EINTR.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = 0;
                assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
            }
            let len = 32 << 20;
            std::fs::write(&path, (0..len).map(byte).collect::<Vec<_>>()).unwrap();
            let file = cache.open(&path).unwrap();
            // One fault per page: many reads of the userfaultfd.
            file.advise(Advice::Random, 0, len as u64).unwrap();
            let handlers: Vec<i32> = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|e| {
                    let e = e.unwrap();
                    let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                    comm.starts_with("upcache-fault")
                        .then(|| e.file_name().to_str().unwrap().parse().unwrap())
                })
                .collect();
            assert!(!handlers.is_empty(), "no fault handler threads found");
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flood = {
                let stop = stop.clone();
                let handlers = handlers.clone();
                std::thread::spawn(move || {
                    let mut sent = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        for &tid in &handlers {
                            // SAFETY: signals a thread of this process; its
                            // handler (above) does nothing.
                            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
                            sent += 1;
                        }
                    }
                    sent
                })
            };
            // SAFETY: only this thread touches the mapping.
            let map = unsafe { file.mmap(0, len, Share::Shared) }.unwrap();
            for p in (0..len).step_by(PAGE_SIZE) {
                assert_eq!(map[p + 7], byte(p + 7), "{mode:?}: page {}", p / PAGE_SIZE);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let sent = flood.join().unwrap();
            assert!(sent > 0);
            // Every handler is still there: the pool's rescuer would start
            // spares for handlers that died, and the faults above could
            // all be served even so.
            for tid in &handlers {
                assert!(
                    std::path::Path::new(&format!("/proc/self/task/{tid}")).exists(),
                    "{mode:?}: fault handler thread {tid} exited"
                );
            }
            eprintln!(
                "{mode:?}: {sent} signals sent to the fault handlers, {} faults served",
                len / PAGE_SIZE
            );
        }
        other => panic!("unknown child case {other}"),
    }
    std::process::exit(0);
}

/// Wait until thread `tid` of this process sleeps in a userfault.
fn wait_in_userfault(tid: i32) {
    let path = format!("/proc/self/task/{tid}/wchan");
    loop {
        let w = std::fs::read_to_string(&path).unwrap_or_default();
        if w.trim() == "handle_userfault" {
            return;
        }
        std::thread::yield_now();
    }
}

/// A handler thread that blocks while serving one fault must not hold
/// other threads' faults it read in the same batch: another handler is
/// idle and would serve them. Here P holds a `PageMut` of page 0 of a
/// 2 MiB folio and faults on an uncached page; Q reads page 1 of the
/// guarded folio through the mapping (allowed: it waits for the guard).
/// Both faults are queued while the two handlers are busy; the first
/// handler to come free used to read both messages, block on Q's folio,
/// and strand P's fault — P never dropped its guard: deadlock, with the
/// second handler idle.
#[test]
fn a_handler_blocked_on_one_fault_does_not_strand_the_others() {
    watchdog("handler batch vs a blocked fault", 60, || {
        const MIB: usize = 1 << 20;
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![3u8; 64 * MIB]).unwrap();
        let (x1, x2, p_at) = (16 * MIB + 4096, 40 * MIB + 4096, 56 * MIB + 4096);
        let (gate1, gate2) = (Gate::new(false), Gate::new(false));
        let (g1, g2) = (gate1.clone(), gate2.clone());
        let covers = |off: u64, len: u64, at: usize| off <= at as u64 && (at as u64) < off + len;
        let store = HookStore::new(&path, move |op, off, len| {
            if op == StoreOp::Read && covers(off, len, x1) {
                g1.pass();
            }
            if op == StoreOp::Read && covers(off, len, x2) {
                g2.pass();
            }
            Ok(())
        });
        let cache = PageCache::builder()
            .mmap_mode(UffdMode::Minor)
            .large_folios(true)
            .fault_threads(2)
            .build();
        let file = Arc::new(cache.open_with_ops("batch", StoreOps::new(store)).unwrap());
        let map = Arc::new(file.mmap_raw(0, 64 * MIB).unwrap());
        let touch = |map: &Arc<upcache::MmapRaw>, at: usize| {
            let map = map.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                map.read(at, &mut b);
                b[0]
            })
        };
        // Both handlers busy in the store.
        let t1 = touch(&map, x1);
        gate1.wait_arrived();
        let t2 = touch(&map, x2);
        gate2.wait_arrived();
        // P: a guard on page 0, then a fault elsewhere.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let p = {
            let (file, map) = (file.clone(), map.clone());
            std::thread::spawn(move || {
                // SAFETY: no mapping reads or writes page 0 while the guard
                // lives (Q reads page 1 of the same folio).
                let mut g = unsafe { file.get_page_mut(0) }.unwrap();
                g[0] = 9;
                held_tx.send(gettid()).unwrap();
                go_rx.recv().unwrap();
                let mut b = [0u8; 1];
                map.read(p_at, &mut b);
                drop(g);
                b[0]
            })
        };
        let p_tid = held_rx.recv().unwrap();
        // Q: waits for P's guard inside its fault.
        let (q_tx, q_rx) = std::sync::mpsc::channel();
        let q = {
            let map = map.clone();
            std::thread::spawn(move || {
                q_tx.send(gettid()).unwrap();
                let mut b = [0u8; 1];
                map.read(4096, &mut b);
                b[0]
            })
        };
        wait_in_userfault(q_rx.recv().unwrap());
        go_tx.send(()).unwrap();
        wait_in_userfault(p_tid);
        // One handler comes free with Q's and P's faults both queued.
        gate1.open();
        assert_eq!(t1.join().unwrap(), 3);
        gate2.open();
        assert_eq!(t2.join().unwrap(), 3);
        assert_eq!(p.join().unwrap(), 3);
        assert_eq!(q.join().unwrap(), 3);
        let mut b = [0u8; 1];
        map.read(0, &mut b);
        assert_eq!(b[0], 9);
    });
}

/// The fault handler threads of this process (names `upcache-fault-*`).
fn fault_handler_tids() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            comm.starts_with("upcache-fault")
                .then(|| e.file_name().to_str().unwrap().parse().unwrap())
        })
        .collect()
}

/// Every fault handler blocked inside a fault (a guard, or
/// `invalidate_lock` held by a truncate waiting for a pin) while the thread
/// that would release it faults elsewhere: with a fixed pool nobody read
/// that fault, a deadlock the kernel cannot have (it serves a fault in the
/// faulting thread). Cases run in a child with one handler, so the pool's
/// only thread is known and observable.
#[test]
fn a_fault_is_served_while_every_handler_is_blocked() {
    let cases = [
        ("pool_guard", "Minor"),
        ("pool_truncate", "Minor"),
        ("pool_truncate", "Missing"),
    ];
    let failed: Vec<String> = cases
        .into_iter()
        .filter_map(|(case, mode)| {
            let dir = tempdir();
            let run = std::panic::catch_unwind(|| {
                common::run_child(
                    "pool_child",
                    case,
                    &[
                        ("UPCACHE_CHILD_MODE", mode.to_string()),
                        ("UPCACHE_CHILD_PATH", dir.path().display().to_string()),
                    ],
                    30,
                )
            });
            match run {
                Ok(st) if st.success() => None,
                Ok(st) => Some(format!("{case} ({mode}): the child failed: {st:?}")),
                Err(_) => Some(format!("{case} ({mode}): the child hung")),
            }
        })
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn pool_child() {
    let Ok(case) = std::env::var("UPCACHE_CHILD") else {
        return;
    };
    let mode = match std::env::var("UPCACHE_CHILD_MODE").unwrap().as_str() {
        "Minor" => UffdMode::Minor,
        _ => UffdMode::Missing,
    };
    let dir = std::path::PathBuf::from(std::env::var_os("UPCACHE_CHILD_PATH").unwrap());
    const MIB: usize = 1 << 20;
    let cache = PageCache::builder()
        .mmap_mode(mode)
        .large_folios(case == "pool_guard")
        .fault_threads(1)
        .fault_spin(std::time::Duration::ZERO)
        .build();
    cache.start_fault_engine().expect("userfaultfd");
    // The thread names itself once it runs.
    let handlers = loop {
        let h = fault_handler_tids();
        if !h.is_empty() {
            break h;
        }
        std::thread::yield_now();
    };
    assert_eq!(handlers.len(), 1, "one handler thread");
    let (a_path, b_path) = (dir.join("a"), dir.join("b"));
    std::fs::write(&a_path, (0..16 * MIB).map(byte).collect::<Vec<_>>()).unwrap();
    std::fs::write(&b_path, (0..4 * MIB).map(byte).collect::<Vec<_>>()).unwrap();
    let a = Arc::new(cache.open(&a_path).unwrap());
    let b = cache.open(&b_path).unwrap();
    let map_a = Arc::new(a.mmap_raw(0, 16 * MIB).unwrap());
    let map_b = Arc::new(b.mmap_raw(0, 4 * MIB).unwrap());
    let b_at = 3 * MIB + 5;
    // P holds a guard of A, then faults on B (uncached).
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let guard_page = if case == "pool_guard" { 0 } else { 12 * MIB / PAGE_SIZE };
    let p = {
        let (a, map_b) = (a.clone(), map_b.clone());
        let guarded = case == "pool_guard";
        std::thread::spawn(move || {
            let mut bytes = [0u8; 1];
            if guarded {
                // SAFETY: no mapping touches page 0 while the guard lives
                // (Q reads page 1 of the same folio).
                let g = unsafe { a.get_page_mut(guard_page as u64) }.unwrap();
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                map_b.read(b_at, &mut bytes);
                drop(g);
            } else {
                // SAFETY: as above (the truncate below drops the page).
                let g = unsafe { a.get_page(guard_page as u64) }.unwrap();
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                map_b.read(b_at, &mut bytes);
                drop(g);
            }
            bytes[0]
        })
    };
    held_rx.recv().unwrap();
    let mut blockers = Vec::new();
    if case == "pool_truncate" {
        // U: truncates A below the pinned page, waiting for the pin with
        // `invalidate_lock` held exclusive.
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let a = a.clone();
        let u = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            a.truncate(8 * MIB as u64).unwrap();
            0u8
        });
        common::wait_until_parked(tid_rx.recv().unwrap(), || u.is_finished());
        assert!(!u.is_finished(), "the truncate did not wait for the pin");
        blockers.push(u);
    }
    // Q: faults on A; its handler blocks (on the guarded folio, or on
    // `invalidate_lock`).
    let q_at = if case == "pool_guard" { 4096 + 3 } else { MIB + 3 };
    let (q_tx, q_rx) = std::sync::mpsc::channel();
    let q = {
        let map_a = map_a.clone();
        std::thread::spawn(move || {
            q_tx.send(gettid()).unwrap();
            let mut b = [0u8; 1];
            map_a.read(q_at, &mut b);
            b[0]
        })
    };
    wait_in_userfault(q_rx.recv().unwrap());
    common::wait_until_parked(handlers[0], || false);
    // P's fault: no handler is free to read it.
    eprintln!("{case}: the only handler is blocked; the guard holder faults on another file");
    go_tx.send(()).unwrap();
    assert_eq!(p.join().unwrap(), byte(b_at), "{case}: P's read of B");
    assert_eq!(q.join().unwrap(), byte(q_at), "{case}: Q's read of A");
    for u in blockers {
        u.join().unwrap();
        assert_eq!(a.len().unwrap(), 8 * MIB as u64);
    }
    std::process::exit(0);
}

/// Two 4 MiB files, A (a plain file) and C (whose store refuses every
/// write while `refuse` is set), in a cache with a 1 MiB dirty limit and
/// large folios, and C dirtied past that limit: with C's write-backs all
/// failing, every write fault on A is throttled. `on_write(offset)` sees
/// each write C's store is asked for.
struct OverDirtyLimit {
    _dir: tempfile::TempDir,
    cache: PageCache,
    c: upcache::File,
    a: upcache::File,
    refuse: Arc<std::sync::atomic::AtomicBool>,
}

const MIB: usize = 1 << 20;

fn over_dirty_limit(
    builder: upcache::PageCacheBuilder,
    on_write: impl Fn(u64) + Send + Sync + 'static,
) -> OverDirtyLimit {
    let dir = tempdir();
    let (a_path, c_path) = (dir.path().join("a"), dir.path().join("c"));
    std::fs::write(&a_path, vec![1u8; 4 * MIB]).unwrap();
    std::fs::write(&c_path, vec![2u8; 4 * MIB]).unwrap();
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let r = refuse.clone();
    let store = HookStore::new(&c_path, move |op, off, _| {
        if op == StoreOp::Write {
            on_write(off);
            if r.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok(())
    });
    let cache = builder.large_folios(true).dirty_limit_bytes(MIB as u64).build();
    let c = cache.open_with_ops("c", StoreOps::new(store)).unwrap();
    let a = cache.open(&a_path).unwrap();
    let chunk = vec![9u8; 256 * 1024];
    let mut off = 0;
    while cache.stats().dirty_bytes <= MIB as u64 {
        assert!(off < 4 * MIB, "could not dirty C past the limit");
        let _ = c.write_at(&chunk, off as u64);
        off += chunk.len();
    }
    OverDirtyLimit {
        _dir: dir,
        cache,
        c,
        a,
        refuse,
    }
}

/// Throttled write faults were replayed by the flusher itself, which
/// waited for the folio lock: a fault on a folio a `PageMut` guards held
/// the flusher, so the guard holder's own throttled write fault, on
/// another folio, waited for a flusher pass that never came (a known
/// limit until the fourteenth session). Dirty memory stays past the limit
/// (file C's store refuses every write); Q's write to page 1 of a guarded
/// 2 MiB folio is throttled, then the holder P writes to the next folio.
/// Since throttling pauses are bounded (200 ms), a flusher that served Q's
/// fault would hold P for one pause only; so before P goes on, the
/// flusher must be seen making three more passes: it is never held by a
/// fault.
#[test]
fn a_throttled_fault_on_a_guarded_folio_does_not_stall_the_others() {
    watchdog("throttled fault on a guarded folio", 60, || {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        // Flusher passes, counted by their (failing) write of C's first
        // folio: every pass writes it, since it stays dirty.
        let passes = Arc::new(AtomicU64::new(0));
        let n = passes.clone();
        // A flusher pass every 10 ms (a quarter of the expiry).
        let builder = PageCache::builder().dirty_expire(std::time::Duration::from_millis(40));
        let OverDirtyLimit {
            _dir,
            cache: _cache,
            c,
            a,
            refuse,
        } = over_dirty_limit(builder, move |off| {
            if off == 0 && std::thread::current().name() == Some("upcache-flush") {
                n.fetch_add(1, Relaxed);
            }
        });
        let a = Arc::new(a);
        // One mapping each (from when a released fault's unthrottled
        // faults were its mapping's, and would have let P's through).
        let (map_p, map_q) = (a.mmap_raw(0, 4 * MIB).unwrap(), a.mmap_raw(0, 4 * MIB).unwrap());
        // Both folios of A cached and mapped clean: writes are WP faults.
        let mut b = [0u8; 1];
        map_q.read(4096, &mut b);
        map_p.read(2 * MIB + 4096, &mut b);
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let p = {
            let a = a.clone();
            std::thread::spawn(move || {
                // SAFETY: no mapping touches page 0 while the guard lives
                // (Q writes page 1 of the same folio).
                let mut g = unsafe { a.get_page_mut(0) }.unwrap();
                g[0] = b'g';
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                map_p.write(2 * MIB + 4096, b"p");
                drop(g);
                map_p
            })
        };
        held_rx.recv().unwrap();
        let q = std::thread::spawn(move || {
            map_q.write(4096, b"q");
            map_q
        });
        // Q's write fault is throttled (parked for the flusher).
        while a.stats().throttled == 0 {
            assert!(!q.is_finished(), "Q's write was not throttled");
            std::thread::yield_now();
        }
        // The pass under way, or the next, releases Q; three more passes
        // prove the flusher did not stay with Q's fault (which waits for
        // P's guard).
        let seen = passes.load(Relaxed);
        while passes.load(Relaxed) < seen + 3 {
            std::thread::yield_now();
        }
        go_tx.send(()).unwrap();
        let map_p = p.join().unwrap();
        let map_q = q.join().unwrap();
        let mut got = [0u8; 1];
        for (at, want) in [(0, b'g'), (4096, b'q'), (2 * MIB + 4096, b'p')] {
            a.read_at(&mut got, at as u64).unwrap();
            assert_eq!(got[0], want, "byte at {at}");
        }
        refuse.store(false, Relaxed);
        drop((map_p, map_q));
        let _ = c.fsync();
    });
}

/// The unthrottled write faults a throttled fault earns belong to its
/// thread. They used to be the mapping's, shared by all its threads: with
/// several writers throttled on one mapping, the others could spend them
/// before the released thread faulted again, and a store spanning two
/// folios could be throttled round after round. Here the thread that
/// never waited writes after one that did: it must wait too.
#[test]
fn unthrottled_faults_are_earned_by_the_thread_that_waited() {
    watchdog("throttle credit per thread", 60, || {
        let OverDirtyLimit {
            _dir,
            cache: _cache,
            c,
            a,
            refuse,
        } = over_dirty_limit(PageCache::builder(), |_| {});
        let map = Arc::new(a.mmap_raw(0, 4 * MIB).unwrap());
        // Two folios of A mapped clean: each first write is a WP fault.
        let mut b = [0u8; 1];
        map.read(4096, &mut b);
        map.read(2 * MIB + 4096, &mut b);
        let write_on_a_thread = |at: usize, v: u8| {
            let map = map.clone();
            std::thread::spawn(move || map.write(at, &[v])).join().unwrap();
        };
        write_on_a_thread(4096, b'x');
        assert_eq!(a.stats().throttled, 1, "the first writer was not throttled");
        write_on_a_thread(2 * MIB + 4096, b'y');
        assert_eq!(
            a.stats().throttled,
            2,
            "the second writer spent the unthrottled faults the first one earned"
        );
        let mut got = [0u8; 1];
        for (at, want) in [(4096, b'x'), (2 * MIB + 4096, b'y')] {
            a.read_at(&mut got, at as u64).unwrap();
            assert_eq!(got[0], want, "byte at {at}");
        }
        refuse.store(false, std::sync::atomic::Ordering::Relaxed);
        drop(map);
        let _ = c.fsync();
    });
}

/// Folios under write-back count against the dirty limit, as the
/// kernel's `balance_dirty_pages` counts `NR_WRITEBACK`: while C's dirty
/// folio was being written back (its dirty bit cleared for the I/O), dirty
/// memory read as zero, and a write fault on A, or a `write_at` to A, went
/// unthrottled. (The same window made
/// `unthrottled_faults_are_earned_by_the_thread_that_waited` fail when the
/// flusher happened to be writing C back.)
#[test]
fn folios_under_writeback_count_against_the_dirty_limit() {
    use std::sync::atomic::Ordering::Relaxed;
    watchdog("write-back counts against the dirty limit", 60, || {
        for case in ["write fault", "write_at"] {
            let gate = Gate::new(false);
            let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (g2, h2) = (gate.clone(), hold.clone());
            let OverDirtyLimit {
                _dir,
                cache,
                c,
                a,
                refuse,
            } = over_dirty_limit(PageCache::builder(), move |_| {
                if h2.load(Relaxed) {
                    g2.pass();
                }
            });
            let map = Arc::new(a.mmap_raw(0, 4 * MIB).unwrap());
            let mut b = [0u8; 1];
            map.read(4096, &mut b);
            hold.store(true, Relaxed);
            let c = Arc::new(c);
            let c2 = c.clone();
            let sync = std::thread::spawn(move || c2.fsync());
            gate.wait_arrived();
            let st = cache.stats();
            assert!(
                st.writeback_bytes > MIB as u64,
                "{case}: C is not under write-back: {st}"
            );
            assert!(st.dirty_bytes < MIB as u64, "{case}: C is still dirty: {st}");
            if case == "write_at" {
                a.write_at(b"x", 4096).unwrap();
            } else {
                let m2 = map.clone();
                std::thread::spawn(move || m2.write(4096, b"x")).join().unwrap();
            }
            // A `write_at` checks before it dirties (C's write-back alone
            // is past the limit) and after (A's dirty folio is too).
            let want = if case == "write_at" { 2 } else { 1 };
            assert_eq!(
                a.stats().throttled,
                want,
                "{case}: with C's write-back in flight past the limit, A's write was not throttled"
            );
            refuse.store(false, Relaxed);
            gate.open();
            let _ = sync.join().unwrap();
            a.read_at(&mut b, 4096).unwrap();
            assert_eq!(b[0], b'x');
            drop(map);
            let _ = c.fsync();
        }
    });
}

/// A throttled write fault waited for the end of a flusher pass, however
/// long: a pass blocked in an engine operation that waits for the
/// throttled thread (here the store's write of the log waits until the
/// log writer has written its records through a mapping; in an engine, a
/// write barrier waiting for a throttled log writer) never ended, and
/// neither did the fault. The kernel bounds each throttling pause
/// (`balance_dirty_pages`, 200 ms); so does upcache now.
#[test]
fn a_throttled_fault_is_released_while_the_flusher_is_blocked() {
    watchdog("throttled fault while the flusher is blocked", 60, || {
        const MIB: usize = 1 << 20;
        let dir = tempdir();
        let path = dir.path().join("log");
        std::fs::write(&path, vec![0u8; 2 * MIB]).unwrap();
        // Every write-back of the log waits until its writer is done.
        let done = Gate::new(false);
        let d = done.clone();
        let store = HookStore::new(&path, move |op, _, _| {
            if op == StoreOp::Write {
                d.pass();
            }
            Ok(())
        });
        // The flusher starts writing the log early, and blocks.
        let cache = PageCache::builder()
            .dirty_background_bytes(128 * 1024)
            .dirty_limit_bytes(MIB as u64)
            .build();
        let log = cache.open_with_ops("log", StoreOps::new(store)).unwrap();
        let map = log.mmap_raw(0, 2 * MIB).unwrap();
        // Past the limit even with a folio under write-back (the
        // flusher's, blocked), which no longer counts as dirty.
        let records = MIB + 256 * 1024;
        let writer = std::thread::spawn(move || {
            for off in (0..records).step_by(PAGE_SIZE) {
                map.write(off, &[(off / PAGE_SIZE) as u8 | 1; PAGE_SIZE]);
            }
            map
        });
        // The flusher is blocked in the store before the writer is done.
        done.wait_arrived();
        let map = writer.join().unwrap();
        assert!(log.stats().throttled > 0, "the writer was never throttled");
        done.open();
        drop(map);
        log.fsync().unwrap();
        let back = std::fs::read(&path).unwrap();
        for off in (0..records).step_by(PAGE_SIZE) {
            assert_eq!(back[off], (off / PAGE_SIZE) as u8 | 1, "page {}", off / PAGE_SIZE);
        }
    });
}

/// An engine's store that calls back into the cache for the file it is
/// serving (the rule is: callbacks do I/O on the store, never call the
/// cache) waited for itself: a `read_at` from the store's read waited for
/// the folio the read was filling, an `fsync` from the store's write for
/// the write-back it was part of, a `get_page` for the locked folio. Each
/// now fails with `EDEADLK`, and the outer operation completes. A call
/// for another file (a log's `fsync` from a data file's write) is allowed.
#[test]
fn engine_callbacks_calling_the_cache_for_their_own_file_get_edeadlk() {
    watchdog("engine callback re-entering the cache", 60, || {
        let dir = tempdir();
        let (path, log_path) = (dir.path().join("f"), dir.path().join("log"));
        std::fs::write(&path, vec![5u8; 64 * 1024]).unwrap();
        std::fs::write(&log_path, vec![0u8; 4096]).unwrap();
        type Map = std::sync::Mutex<upcache::MmapRaw>;
        type Files = (
            Arc<upcache::File>,
            Arc<upcache::File>,
            PageCache,
            Arc<upcache::File>,
            Map,
        );
        type Cell = std::sync::OnceLock<Files>;
        let files: Arc<Cell> = Arc::new(Cell::new());
        let nested = Arc::new(std::sync::Mutex::new(Vec::<(&str, i32)>::new()));
        let (f2, n2) = (files.clone(), nested.clone());
        let store = HookStore::new(&path, move |op, off, _| {
            let Some((file, log, cache, other, map)) = f2.get() else {
                return Ok(());
            };
            let errno = |r: upcache::Result<()>| r.err().map_or(0, |e| e.raw_os_error());
            let mut n = n2.lock().unwrap();
            match op {
                StoreOp::Read => {
                    let mut b = [0u8; 1];
                    n.push(("read_at", errno(file.read_at(&mut b, off).map(drop))));
                    // SAFETY: nothing maps the file.
                    n.push((
                        "get_page",
                        errno(unsafe { file.get_page(off / PAGE_SIZE as u64) }.map(drop)),
                    ));
                    // The same through the file's address space, which the
                    // callbacks are handed.
                    let space = file.address_space().unwrap();
                    n.push(("space read_at", errno(space.read_at(&mut b, off).map(drop))));
                    n.push((
                        "space read_cache_page",
                        // SAFETY: nothing maps the file.
                        errno(unsafe { space.read_cache_page(off / PAGE_SIZE as u64) }.map(drop)),
                    ));
                }
                StoreOp::Write => {
                    n.push(("fsync", errno(file.fsync())));
                    n.push(("write_at", errno(file.write_at(b"x", off).map(drop))));
                    let space = file.address_space().unwrap();
                    let io = |r: std::io::Result<()>| r.err().map_or(0, |e| e.raw_os_error().unwrap_or(-1));
                    n.push(("space write_at", errno(space.write_at(b"x", off).map(drop))));
                    n.push((
                        "space write_and_wait_range",
                        io(space.write_and_wait_range(0, u64::MAX)),
                    ));
                    n.push(("space sync_range_checked", io(space.sync_range_checked(0, u64::MAX))));
                    let mut wbc = upcache::aops::WritebackControl::all(0, u64::MAX);
                    n.push(("space writepages", io(space.writepages(&mut wbc))));
                    n.push(("space advise", errno(space.advise(Advice::DontNeed, 0, 0))));
                    n.push(("space punch_hole", errno(space.punch_hole(off, 4096))));
                    n.push(("space truncate", errno(space.truncate(off))));
                    // SAFETY: nothing maps the file.
                    let page_mut = unsafe { space.read_cache_page_mut(off / PAGE_SIZE as u64) };
                    n.push(("space read_cache_page_mut", errno(page_mut.map(drop))));
                    // Another file: allowed.
                    n.push(("log write_at", errno(log.write_at(b"L", 0).map(drop))));
                    n.push(("log fsync", errno(log.fsync())));
                    // A file of another cache, the first there as this
                    // file is here: allowed.
                    n.push(("other cache write_at", errno(other.write_at(b"O", 0).map(drop))));
                    n.push(("other cache fsync", errno(other.fsync())));
                    // The whole cache: it holds this file.
                    n.push(("sync_all", errno(cache.sync_all())));
                    n.push(("freeze", errno(cache.freeze())));
                }
                StoreOp::Sync => {
                    // A mapping of the file, flushed or moved from the
                    // store's sync (which holds the file's sync lock).
                    let mut map = map.lock().unwrap();
                    n.push(("map flush", errno(map.flush())));
                    n.push(("map flush_range", errno(map.flush_range(0, 4096))));
                    n.push(("map flush_async", errno(map.flush_async())));
                    n.push(("map remap", errno(map.remap(128 * 1024))));
                }
                _ => {}
            }
            Ok(())
        });
        let cache = PageCache::new();
        let file = Arc::new(cache.open_with_ops("f", StoreOps::new(store)).unwrap());
        let log = Arc::new(cache.open(&log_path).unwrap());
        let other_path = dir.path().join("other");
        std::fs::write(&other_path, vec![0u8; 4096]).unwrap();
        let other_cache = PageCache::new();
        let other = Arc::new(other_cache.open(&other_path).unwrap());
        let map = std::sync::Mutex::new(file.mmap_raw(0, 64 * 1024).unwrap());
        files
            .set((file.clone(), log.clone(), cache.clone(), other, map))
            .ok()
            .unwrap();
        let mut b = [0u8; 4];
        file.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [5; 4]);
        file.write_at(b"abcd", 8192).unwrap();
        file.fsync().unwrap();
        let n = nested.lock().unwrap().clone();
        let deadlk = libc::EDEADLK;
        for (op, want) in [
            ("read_at", deadlk),
            ("get_page", deadlk),
            ("space read_at", deadlk),
            ("space read_cache_page", deadlk),
            ("space write_at", deadlk),
            ("space write_and_wait_range", deadlk),
            ("space sync_range_checked", deadlk),
            ("space writepages", deadlk),
            ("space advise", deadlk),
            ("space punch_hole", deadlk),
            ("space truncate", deadlk),
            ("space read_cache_page_mut", deadlk),
            ("fsync", deadlk),
            ("write_at", deadlk),
            ("log write_at", 0),
            ("log fsync", 0),
            ("other cache write_at", 0),
            ("other cache fsync", 0),
            ("sync_all", deadlk),
            ("freeze", deadlk),
            ("map flush", deadlk),
            ("map flush_range", deadlk),
            ("map flush_async", deadlk),
            ("map remap", deadlk),
        ] {
            let got: Vec<i32> = n.iter().filter(|(o, _)| *o == op).map(|(_, e)| *e).collect();
            assert!(!got.is_empty(), "{op}: never called from the store");
            assert!(got.iter().all(|e| *e == want), "{op}: errno {got:?}, want {want}");
        }
        assert_eq!(std::fs::read(&path).unwrap()[8192..8196], *b"abcd");
    });
}

/// The same from a file's final write-back (its last handle dropped):
/// `PageCache::sync_all` waits for dying files, so from the dying file's
/// own store it would wait for the drop it is part of, and `freeze` syncs
/// the same way. Both fail with `EDEADLK` before doing anything (the
/// check of the whole cache; each file's own check cannot see the dying
/// file, which `sync_all` only waits for).
#[test]
fn sync_all_from_a_dying_files_write_back_gets_edeadlk() {
    watchdog("sync_all from a dying file's write-back", 60, || {
        let dir = tempdir();
        let path = dir.path().join("d");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let cell: Arc<std::sync::OnceLock<PageCache>> = Arc::new(std::sync::OnceLock::new());
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c2, g2) = (cell.clone(), got.clone());
        let store = HookStore::new(&path, move |op, _, _| {
            if op == StoreOp::Write {
                if let Some(cache) = c2.get() {
                    let e = |r: upcache::Result<()>| r.err().map_or(0, |e| e.raw_os_error());
                    g2.lock().unwrap().push((e(cache.sync_all()), e(cache.freeze())));
                }
            }
            Ok(())
        });
        let cache = PageCache::new();
        cell.set(cache.clone()).ok().unwrap();
        let d = cache.open_with_ops("d", StoreOps::new(store)).unwrap();
        let map = d.mmap_raw(0, 4096).unwrap();
        drop(d);
        // Dirtied after the handle is gone: the mapping is the last user,
        // and its drop's write-back is the address space's own (dying).
        map.write(0, b"x");
        drop(map);
        // The last reference may be a fault handler's, whose drop then
        // writes back on that thread: wait for the store's hook.
        while got.lock().unwrap().is_empty() {
            std::thread::yield_now();
        }
        assert_eq!(*got.lock().unwrap(), vec![(libc::EDEADLK, libc::EDEADLK)]);
        while std::fs::read(&path).unwrap()[0] != b'x' {
            std::thread::yield_now();
        }
    });
}

/// Operations whose `initial_size` runs a hook first (the rest is the
/// file store's).
struct SizeHookOps {
    inner: StoreOps<upcache::FileStore>,
    hook: Box<dyn Fn() + Send + Sync>,
}

impl upcache::aops::AddressSpaceOps for SizeHookOps {
    delegate_to_inner!(read_folio);
    delegate_to_inner!(writepage);
    fn initial_size(&self) -> std::io::Result<u64> {
        (self.hook)();
        self.inner.initial_size()
    }
    fn max_file_size(&self) -> u64 {
        self.inner.max_file_size()
    }
    fn set_size(&self, size: u64) -> std::io::Result<()> {
        self.inner.set_size(size)
    }
    fn punch_hole(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(off, len)
    }
    fn fsync(&self) -> std::io::Result<()> {
        self.inner.fsync()
    }
}

/// An engine's `initial_size` runs while the file is being opened. It ran
/// under the cache's file table lock, so one that opened another file of
/// the same cache (its log) deadlocked, and one that opened its own name
/// would wait for itself. Now the other file opens, and the same name gets
/// `EDEADLK`; the open itself completes.
#[test]
fn initial_size_may_open_other_files_of_the_cache() {
    watchdog("open from initial_size", 60, || {
        let dir = tempdir();
        let (data, log) = (dir.path().join("data"), dir.path().join("log"));
        std::fs::write(&data, vec![3u8; 8192]).unwrap();
        std::fs::write(&log, vec![4u8; 4096]).unwrap();
        let cache = PageCache::new();
        // Taken by the hook's one call: no cycle cache → file → ops → cache.
        let for_hook = std::sync::Mutex::new(Some((cache.clone(), log.clone())));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let ops = SizeHookOps {
            inner: StoreOps::new(upcache::FileStore::open(&data).unwrap()),
            hook: Box::new(move || {
                let Some((cache, log)) = for_hook.lock().unwrap().take() else {
                    return;
                };
                let log_len = cache.open(&log).map(|f| f.len().unwrap());
                let same = cache
                    .open_with_ops("data", StoreOps::new(upcache::FileStore::open(&log).unwrap()))
                    .map(drop);
                s2.lock()
                    .unwrap()
                    .push((log_len.ok(), same.err().map(|e| e.raw_os_error())));
            }),
        };
        let file = cache.open_with_ops("data", ops).unwrap();
        assert_eq!(file.len().unwrap(), 8192);
        assert_eq!(*seen.lock().unwrap(), vec![(Some(4096), Some(libc::EDEADLK))]);
        // The reservation is gone: the name opens again, to the same file.
        let again = cache
            .open_with_ops("data", StoreOps::new(upcache::FileStore::open(&log).unwrap()))
            .unwrap();
        let mut b = [0u8; 1];
        again.read_exact_at(&mut b, 8191).unwrap();
        assert_eq!(b, [3]);
    });
}
