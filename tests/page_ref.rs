//! Pinned, zero-copy page access (`File::get_page` / `get_page_mut`): the
//! bytes are the file's, in place; pins keep pages from reclaim and from
//! writers; `PageMut` is exclusive and dirties the page; a thread never
//! waits for its own guard (error or panic with a message, never a hang).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{tempdir, watchdog, Gate};
use upcache::{Advice, Error, PageCache, Share, UffdMode, PAGE_SIZE};

fn byte(o: usize) -> u8 {
    (o % 251) as u8 + 1
}

/// `get_page` for these tests. No mapping of the file touches a page
/// while a guard of it lives (the one test that maps a file uses the
/// mapping only when no guard is alive).
fn pin(file: &upcache::File, index: u64) -> upcache::Result<upcache::PageRef<'_>> {
    // SAFETY: see above.
    unsafe { file.get_page(index) }
}

/// `get_page_mut` for these tests (same reasoning as `pin`).
fn pin_mut(file: &upcache::File, index: u64) -> upcache::Result<upcache::PageMut<'_>> {
    // SAFETY: see `pin`.
    unsafe { file.get_page_mut(index) }
}

fn file_of(len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, (0..len).map(byte).collect::<Vec<_>>()).unwrap();
    (dir, path)
}

#[test]
fn get_page_returns_the_file_bytes_in_place() {
    let (_d, path) = file_of(64 * 1024 + 100);
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    for index in [0u64, 3, 16] {
        let page = pin(&file, index).unwrap();
        assert_eq!(page.len(), PAGE_SIZE);
        let base = index as usize * PAGE_SIZE;
        let want: Vec<u8> = (base..base + PAGE_SIZE)
            .map(|o| if o < 64 * 1024 + 100 { byte(o) } else { 0 })
            .collect();
        assert!(page[..] == want[..], "page {index} differs from the file");
    }
    // Zero-copy: two pins of one page see the same memory.
    let a = pin(&file, 2).unwrap();
    let b = pin(&file, 2).unwrap();
    assert_eq!(a.as_ptr(), b.as_ptr(), "get_page copied the page");
    let s = cache.stats();
    assert!(s.hits >= 2 && s.misses >= 1, "hits and misses not counted: {s:?}");
}

#[test]
fn get_page_past_end_of_file_is_an_error() {
    let (_d, path) = file_of(8192);
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    match pin(&file, 2) {
        Err(e @ Error::BeyondEof { .. }) => assert_eq!(e.raw_os_error(), libc::EINVAL),
        other => panic!("expected BeyondEof, got {other:?}"),
    }
    assert!(matches!(pin_mut(&file, u64::MAX), Err(Error::BeyondEof { .. })));
}

#[test]
fn get_page_reports_a_store_read_error() {
    use common::{HookStore, StoreOp};
    let (_d, path) = file_of(8192);
    let store = HookStore::new(&path, |op, _, _| match op {
        StoreOp::Read => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        _ => Ok(()),
    });
    let cache = PageCache::new();
    let file = cache
        .open_with_ops("f", upcache::StoreOps::new(Arc::new(store)))
        .unwrap();
    let e = pin(&file, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), libc::EIO, "{e}");
}

#[test]
fn page_mut_writes_reach_the_file_and_mappings() {
    watchdog("PageMut vs mappings", 60, || {
        for mode in [UffdMode::Missing, UffdMode::Minor] {
            let (_d, path) = file_of(16384);
            let cache = PageCache::builder().mmap_mode(mode).build();
            let file = cache.open(&path).unwrap();
            // SAFETY: only this thread touches the mapping, and not while a
            // page guard of the same page is alive.
            let map = unsafe { file.mmap(0, 16384, Share::Shared) }.unwrap();
            assert_eq!(map[4096 + 7], byte(4096 + 7));
            {
                let mut p = pin_mut(&file, 1).unwrap();
                p[7] = 0xee;
            }
            assert_eq!(map[4096 + 7], 0xee, "{mode:?}: mapping does not see the PageMut write");
            let mut b = [0u8; 1];
            file.read_at(&mut b, 4096 + 7).unwrap();
            assert_eq!(b[0], 0xee);
            // A guard that was only read does not dirty the page.
            let dirty = cache.stats().dirty_bytes;
            let v = pin_mut(&file, 2).unwrap()[0];
            assert_eq!(v, byte(2 * 4096));
            assert_eq!(cache.stats().dirty_bytes, dirty, "a read-only PageMut dirtied its page");
            file.fsync().unwrap();
            let disk = std::fs::read(&path).unwrap();
            assert_eq!(disk[4096 + 7], 0xee, "{mode:?}: fsync lost the PageMut write");
            assert_eq!(disk[4096 + 8], byte(4096 + 8));
        }
    });
}

#[test]
fn page_mut_past_end_of_file_bytes_read_as_zeros_after_growth() {
    let (_d, path) = file_of(100);
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    {
        let mut p = pin_mut(&file, 0).unwrap();
        p.fill(0xff);
    }
    file.truncate(8192).unwrap();
    let mut b = vec![0u8; 8192];
    file.read_exact_at(&mut b, 0).unwrap();
    assert!(b[..100].iter().all(|&x| x == 0xff));
    assert!(
        b[100..].iter().all(|&x| x == 0),
        "bytes written past EOF became file data"
    );
}

#[test]
fn page_mut_is_exclusive() {
    watchdog("PageMut exclusion", 60, || {
        let (_d, path) = file_of(4096);
        let cache = PageCache::new();
        let file = Arc::new(cache.open(&path).unwrap());
        let n = 2000u32;
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let file = file.clone();
                std::thread::spawn(move || {
                    for _ in 0..n {
                        let mut p = pin_mut(&file, 0).unwrap();
                        let v = u32::from_ne_bytes(p[..4].try_into().unwrap());
                        p[..4].copy_from_slice(&(v + 1).to_ne_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let p = pin(&file, 0).unwrap();
        let start = u32::from_ne_bytes([byte(0), byte(1), byte(2), byte(3)]);
        assert_eq!(
            u32::from_ne_bytes(p[..4].try_into().unwrap()),
            start + 2 * n,
            "lost updates"
        );
    });
}

#[test]
fn a_pinned_page_survives_reclaim_and_dont_need() {
    watchdog("pinned page vs reclaim", 120, || {
        let (_d, path) = file_of(8 << 20);
        let cache = PageCache::builder().memory_limit(512 * 1024).build();
        let file = cache.open(&path).unwrap();
        let page = pin(&file, 5).unwrap();
        let ptr = page.as_ptr();
        file.advise(Advice::DontNeed, 0, 8 << 20).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        for off in (0..8 << 20).step_by(buf.len()) {
            file.read_exact_at(&mut buf, off as u64).unwrap();
        }
        assert!(cache.stats().evicted_bytes > 0, "reclaim did not run");
        let want: Vec<u8> = (5 * PAGE_SIZE..6 * PAGE_SIZE).map(byte).collect();
        assert!(page[..] == want[..], "a pinned page changed under reclaim");
        drop(page);
        // The same folio is still cached: pinning kept it.
        let again = pin(&file, 5).unwrap();
        assert_eq!(again.as_ptr(), ptr);
    });
}

#[test]
fn write_at_waits_for_a_pin_of_another_thread() {
    watchdog("write_at vs pin", 60, || {
        let (_d, path) = file_of(8192);
        let cache = PageCache::new();
        let file = Arc::new(cache.open(&path).unwrap());
        let page = pin(&file, 0).unwrap();
        let gate = Gate::new(true);
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (file, gate, done) = (file.clone(), gate.clone(), done.clone());
            std::thread::spawn(move || {
                gate.pass();
                file.write_at(&[0x11; 16], 0).unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        gate.wait_arrived();
        // Not synchronization: a window in which the write must not land.
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            assert_eq!(page[0], byte(0), "write_at changed pinned bytes");
            assert!(!done.load(Ordering::SeqCst), "write_at finished under a pin");
            std::hint::spin_loop();
        }
        drop(page);
        writer.join().unwrap();
        assert_eq!(pin(&file, 0).unwrap()[0], 0x11, "the write did not land");
    });
}

/// A `PageMut` of a page another thread pins waits for that pin. It used
/// to panic ("would wait for itself"): the waiting thread's own new guard
/// record was taken for a pin of its own.
#[test]
fn page_mut_waits_for_a_pin_of_another_thread() {
    watchdog("get_page_mut vs another thread's pin", 60, || {
        let (_d, path) = file_of(8192);
        let cache = PageCache::new();
        let file = Arc::new(cache.open(&path).unwrap());
        let page = pin(&file, 0).unwrap();
        let writer = {
            let file = file.clone();
            common::spawn_tracked(move || {
                let mut g = pin_mut(&file, 0).unwrap();
                g[0] = 0x22;
            })
        };
        writer.wait_parked();
        assert_eq!(page[0], byte(0), "a PageMut changed pinned bytes");
        drop(page);
        writer
            .join()
            .expect("get_page_mut panicked instead of waiting for the pin");
        assert_eq!(pin(&file, 0).unwrap()[0], 0x22, "the write did not land");
    });
}

#[test]
fn truncate_waits_for_a_pin_of_another_thread_and_never_frees_it_early() {
    watchdog("truncate vs pin", 60, || {
        let (_d, path) = file_of(8192);
        let cache = PageCache::new();
        let file = Arc::new(cache.open(&path).unwrap());
        let page = pin(&file, 1).unwrap();
        let gate = Gate::new(true);
        let t = {
            let (file, gate) = (file.clone(), gate.clone());
            std::thread::spawn(move || {
                gate.pass();
                file.truncate(0).unwrap();
            })
        };
        gate.wait_arrived();
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            assert_eq!(page[0], byte(4096), "truncate freed or zeroed a pinned page");
            std::hint::spin_loop();
        }
        drop(page);
        t.join().unwrap();
        assert!(matches!(pin(&file, 1), Err(Error::BeyondEof { .. })));
    });
}

/// While a truncate waits for another thread's pin on a folio it drops,
/// the folio's pages past the new end are still in the page store, and a
/// `Missing`-mode mapping maps such pages by itself: they must raise
/// SIGBUS there, as the kernel's do once the size is published (they
/// showed the old bytes until the pin went).
#[test]
fn a_truncate_waiting_for_a_pin_shows_no_page_past_the_new_end() {
    watchdog("truncate waiting for a pin vs a mapping", 60, || {
        let (_d, path) = file_of(4 * 4096);
        let cache = PageCache::new();
        let file = Arc::new(cache.open(&path).unwrap());
        let map = file.mmap_raw(0, 4 * 4096).unwrap();
        for at in [0, 2 * 4096, 3 * 4096] {
            let got = common::kernel_copy_out(&map, at).expect("a page below the end raised SIGBUS");
            assert_eq!(got[0], byte(at));
        }
        let page = pin(&file, 3).unwrap();
        let t = {
            let file = file.clone();
            common::spawn_tracked(move || file.truncate(4096).unwrap())
        };
        t.wait_parked();
        assert!(!t.done(), "truncate finished under a pin");
        assert_eq!(
            file.len().unwrap(),
            4096,
            "the truncate sleeps before publishing the size"
        );
        for at in [2 * 4096, 3 * 4096] {
            assert_eq!(
                common::kernel_copy_out(&map, at),
                None,
                "byte {at}, past the new end, is visible while the truncate waits for a pin"
            );
        }
        assert_eq!(page[0], byte(3 * 4096), "truncate changed a pinned page");
        drop(page);
        t.join().unwrap();
        assert_eq!(common::kernel_copy_out(&map, 3 * 4096), None);
        assert_eq!(common::kernel_copy_out(&map, 0).unwrap()[0], byte(0));
        // Grown back, the pages read zeros: the poison went with the size.
        file.truncate(4 * 4096).unwrap();
        for at in [2 * 4096, 3 * 4096] {
            assert_eq!(
                common::kernel_copy_out(&map, at),
                Some(vec![0; 16]),
                "byte {at} after growth"
            );
        }
    });
}

/// A thread holding a page guard calls into the file while another
/// thread's truncate, punch or write waits for that guard, holding the
/// locks the call needs (latch coupling across a truncate): the call
/// returns `GuardWaited` (`EDEADLK`) instead of waiting for a thread that
/// waits for it. It used to hang: a read miss waited for `invalidate_lock`,
/// a write for `i_rwsem`.
#[test]
fn a_guard_holders_call_during_a_truncate_waiting_for_its_guard_is_an_error_not_a_hang() {
    type Op = fn(&upcache::File) -> upcache::Result<()>;
    let waiters: [(&str, Op); 3] = [
        ("truncate", |f| f.truncate(2 * 4096)),
        ("punch", |f| f.punch_hole(3 * 4096, 4096)),
        ("write", |f| f.write_at(&[9; 16], 3 * 4096).map(drop)),
    ];
    let calls: [(&str, Op); 3] = [
        ("a read miss", |f| pin(f, 0).map(drop)),
        ("a write", |f| f.write_at(&[7; 16], 4096).map(drop)),
        ("a punch", |f| f.punch_hole(4096, 4096)),
    ];
    for (wname, waiter) in waiters {
        for (cname, call) in calls {
            for locked in [false, true] {
                watchdog(
                    &format!("{cname} while a {wname} waits for the caller's guard (PageMut: {locked})"),
                    60,
                    move || {
                        let (_d, path) = file_of(4 * 4096);
                        let cache = PageCache::new();
                        let file = Arc::new(cache.open(&path).unwrap());
                        file.advise(Advice::Random, 0, 0).unwrap();
                        let page: Box<dyn std::ops::Deref<Target = [u8]> + '_> = if locked {
                            Box::new(pin_mut(&file, 3).unwrap())
                        } else {
                            Box::new(pin(&file, 3).unwrap())
                        };
                        let t = {
                            let file = file.clone();
                            common::spawn_tracked(move || waiter(&file))
                        };
                        t.wait_parked();
                        assert!(!t.done(), "the {wname} finished under a pin");
                        match call(&file) {
                            // A write holds no `invalidate_lock`: a read miss
                            // does not wait for it.
                            Ok(()) if wname == "write" && cname == "a read miss" => {}
                            Err(Error::GuardWaited { offset, .. }) => assert_eq!(offset, 3 * 4096),
                            other => panic!("{cname}: {other:?}"),
                        }
                        assert_eq!(page[0], byte(3 * 4096));
                        drop(page);
                        t.join().unwrap().unwrap();
                        call(&file).unwrap();
                    },
                );
            }
        }
    }
}

/// A guard holder's call waits, and succeeds, when the truncate in its way
/// waits for another thread's guard, not for the caller's.
#[test]
fn a_guard_holders_miss_waits_for_a_truncate_that_waits_for_another_thread() {
    watchdog("guard holder's miss vs a truncate waiting for another pin", 60, || {
        let (_d, path) = file_of(4 * 4096);
        let cache = PageCache::new();
        let file = Arc::new(cache.open(&path).unwrap());
        file.advise(Advice::Random, 0, 0).unwrap();
        let mine = pin(&file, 0).unwrap();
        let me = common::gettid();
        let missed = Arc::new(AtomicBool::new(false));
        // Another thread pins page 3 and lets go once this thread sleeps
        // in its miss.
        let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
        let other = {
            let (file, missed) = (file.clone(), missed.clone());
            std::thread::spawn(move || {
                let page = pin(&file, 3).unwrap();
                pinned_tx.send(()).unwrap();
                common::wait_until_parked(me, || missed.load(Ordering::SeqCst));
                drop(page);
            })
        };
        pinned_rx.recv().unwrap();
        let t = {
            let file = file.clone();
            common::spawn_tracked(move || file.truncate(2 * 4096).unwrap())
        };
        t.wait_parked();
        // A write of this thread's page queues for `i_rwsem` behind the
        // truncate: it will wait for this thread's pin, but it never holds
        // `invalidate_lock`, so the miss below must not back off for it.
        let w = {
            let file = file.clone();
            common::spawn_tracked(move || file.write_at(&[0x5a; 8], 0).unwrap())
        };
        w.wait_parked();
        let got = pin(&file, 1).map(|p| p[0]);
        missed.store(true, Ordering::SeqCst);
        assert_eq!(got.unwrap(), byte(4096), "a miss that nothing waits for failed");
        assert_eq!(mine[0], byte(0));
        assert!(!w.done(), "the write did not wait for the pin");
        drop(mine);
        other.join().unwrap();
        t.join().unwrap();
        w.join().unwrap();
        assert_eq!(pin(&file, 0).unwrap()[0], 0x5a);
    });
}

/// A write or truncate that queued for `i_rwsem` while another truncate
/// shrank the file finds a lower end once it holds the lock, and its
/// growth then waits for a guard below the range it announced (it read
/// the size before the lock). It announces the wider range under the lock
/// and wakes the guard holders asleep on it: the holder's write returns
/// `GuardWaited`; it slept for good before.
#[test]
fn a_guard_holder_backs_off_from_a_write_whose_range_grew_under_the_lock() {
    type Op = fn(&upcache::File) -> upcache::Result<()>;
    let waiters: [(&str, Op); 2] = [
        ("write", |f| f.write_at(&[9; 16], 3 * 4096 + 100).map(drop)),
        ("truncate", |f| f.truncate(3 * 4096)),
    ];
    for (wname, waiter) in waiters {
        watchdog(&format!("guard holder vs a {wname} whose range grew"), 60, move || {
            use common::{HookStore, StoreOp};
            let (_d, path) = file_of(4 * 4096);
            // The first truncate's resize waits at the gate, holding
            // i_rwsem with the old size still published.
            let gate = Gate::new(false);
            let (g2, first) = (gate.clone(), Arc::new(AtomicBool::new(true)));
            let store = HookStore::new(&path, move |op, _, _| {
                if op == StoreOp::SetLen && first.swap(false, Ordering::SeqCst) {
                    g2.pass();
                }
                Ok(())
            });
            let cache = PageCache::new();
            let file = Arc::new(cache.open_with_ops("f", upcache::StoreOps::new(store)).unwrap());
            file.advise(Advice::Random, 0, 0).unwrap();
            let space = file.address_space().unwrap();
            // P pins page 3, so the first truncate then waits, holding
            // i_rwsem.
            let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
            let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
            let p = {
                let file = file.clone();
                std::thread::spawn(move || {
                    let page = pin(&file, 3).unwrap();
                    pinned_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    drop(page);
                })
            };
            pinned_rx.recv().unwrap();
            // Page 1 cached, so that pinning it below is a hit.
            file.read_at(&mut [0u8; 1], 4096).unwrap();
            let t2 = {
                let file = file.clone();
                common::spawn_tracked(move || file.truncate(4096 + 2048).unwrap())
            };
            gate.wait_arrived();
            // W reads the old size (16 KiB), announces what that needs
            // (nothing near page 1) and queues for i_rwsem.
            let w = {
                let file = file.clone();
                common::spawn_tracked(move || waiter(&file))
            };
            w.wait_parked();
            assert_eq!(file.len().unwrap(), 4 * 4096);
            gate.open();
            // The truncate dropped page 3 and waits for P's pin; page 1 is
            // zeroed past the new end by now: pin it.
            while !(file.len().unwrap() == 4096 + 2048
                && space.filemap_get_folio(upcache::aops::PgOff(3)).is_none()
                && common::parked(t2.tid))
            {
                std::thread::yield_now();
            }
            let page = pin(&file, 1).unwrap();
            release_tx.send(()).unwrap();
            p.join().unwrap();
            t2.join().unwrap();
            // W holds i_rwsem now and grows the file from 6 KiB, over page 1.
            while space.inode_lock_state() != upcache::aops::LockState::Exclusive {
                assert!(!w.done(), "the {wname} did not wait for the pin");
                std::thread::yield_now();
            }
            match file.write_at(&[7; 16], 0) {
                Err(Error::GuardWaited { offset, .. }) => assert_eq!(offset, 4096),
                other => panic!("{wname}: {other:?}"),
            }
            assert_eq!(page[0], byte(4096));
            drop(page);
            w.join().unwrap().unwrap();
        });
    }
}

/// A read that found a folio not uptodate waits for its lock, holding
/// `invalidate_lock` shared, while another thread reads the folio in and
/// keeps it as a `PageMut`. A truncate elsewhere in the file then queues
/// for `invalidate_lock` behind the read, and the `PageMut` holder's own
/// read miss queues behind the truncate: each waited for the next, for
/// good. The read announces the folio it sleeps on, so the holder's miss
/// returns `GuardWaited`.
#[test]
fn a_page_mut_holders_miss_backs_off_from_a_read_asleep_on_its_folio() {
    use common::{HookStore, StoreOp};
    watchdog("PageMut holder's miss vs a read asleep on its folio", 60, || {
        let (_d, path) = file_of(8 * 4096);
        let gate = Gate::new(false);
        let g2 = gate.clone();
        let store = HookStore::new(&path, move |op, off, _| {
            if op == StoreOp::Read && off == 0 {
                g2.pass();
            }
            Ok(())
        });
        let cache = PageCache::new();
        let file = Arc::new(cache.open_with_ops("f", upcache::StoreOps::new(store)).unwrap());
        file.advise(Advice::Random, 0, 0).unwrap();
        let space = file.address_space().unwrap();
        // G (this thread) makes page 0's folio and reads it; the store's
        // read waits at the gate, with the folio locked.
        let (guard_tx, guard_rx) = std::sync::mpsc::channel();
        let (miss_tx, miss_rx) = std::sync::mpsc::channel::<()>();
        let g = {
            let file = file.clone();
            std::thread::spawn(move || {
                let mut page = pin_mut(&file, 0).unwrap();
                page[0] = 0x33;
                guard_tx.send(()).unwrap();
                miss_rx.recv().unwrap();
                let r = pin(&file, 5).map(drop);
                drop(page);
                r
            })
        };
        gate.wait_arrived();
        // R: a read of page 0 finds it not uptodate and sleeps on its lock
        // with `invalidate_lock` shared.
        let r = {
            let file = file.clone();
            common::spawn_tracked(move || {
                let mut b = [0u8; 1];
                file.read_at(&mut b, 0).map(|_| b[0])
            })
        };
        while space.invalidate_lock_state() == upcache::aops::LockState::Unlocked || !common::parked(r.tid) {
            assert!(!r.done(), "the read did not wait for the folio");
            std::thread::yield_now();
        }
        gate.open();
        guard_rx.recv().unwrap();
        // T: a truncate of page 7 queues for `invalidate_lock` behind R.
        let t = {
            let file = file.clone();
            common::spawn_tracked(move || file.truncate(7 * 4096).unwrap())
        };
        t.wait_parked();
        assert!(!t.done(), "the truncate did not wait for the read");
        // G misses on page 5.
        miss_tx.send(()).unwrap();
        match g.join().unwrap() {
            Err(Error::GuardWaited { offset, .. }) => assert_eq!(offset, 0),
            other => panic!("the PageMut holder's miss: {other:?}"),
        }
        assert_eq!(r.join().unwrap().unwrap(), 0x33);
        t.join().unwrap();
    });
}

/// The page guards a thread holds are recorded per file; a file of
/// another cache is another file, even the first one opened there as the
/// guarded file was here (file ids used to be counted per cache, so a
/// guard of one cache's first file refused a truncate of another's).
#[test]
fn a_guard_of_one_cache_does_not_refuse_operations_of_another() {
    watchdog("guards of two caches", 60, || {
        let (d, path) = file_of(3 * 4096);
        let other_path = d.path().join("other");
        std::fs::write(&other_path, vec![7u8; 3 * 4096]).unwrap();
        let (a, b) = (PageCache::new(), PageCache::new());
        let (file_a, file_b) = (a.open(&path).unwrap(), b.open(&other_path).unwrap());
        let page = pin_mut(&file_a, 1).unwrap();
        file_b.write_at(&[1], 4096).unwrap();
        file_b.truncate(4096).unwrap();
        file_b.punch_hole(0, 4096).unwrap();
        assert_eq!(file_b.len().unwrap(), 4096);
        drop(page);
        // The guarded file itself still refuses.
        let _page = pin(&file_a, 1).unwrap();
        assert!(matches!(file_a.truncate(4096), Err(Error::PageHeld { .. })));
    });
}

#[test]
fn own_guard_gives_an_error_or_a_panic_never_a_hang() {
    watchdog("self-deadlock detection", 60, || {
        let (_d, path) = file_of(3 * 4096);
        // Single-page folios: the checks below are per folio.
        let cache = PageCache::builder().max_folio_order(0).build();
        let file = cache.open(&path).unwrap();
        let page = pin(&file, 1).unwrap();
        // truncate / punch over a page this thread pins: EDEADLK, nothing
        // changed.
        let e = file.truncate(4096).unwrap_err();
        assert!(matches!(e, Error::PageHeld { .. }), "{e}");
        assert_eq!(e.raw_os_error(), libc::EDEADLK);
        assert_eq!(file.len().unwrap(), 3 * 4096, "a refused truncate changed the size");
        assert!(matches!(file.punch_hole(4096, 10), Err(Error::PageHeld { .. })));
        // Beyond the pinned folio both work.
        file.truncate(2 * 4096 + 10).unwrap();
        file.punch_hole(2 * 4096, 10).unwrap();
        // write_at into the pinned page from the same thread: EDEADLK too,
        // not a hang (it used to be a panic with a message).
        let e = file.write_at(&[1], 4096).unwrap_err();
        assert!(matches!(e, Error::PageHeld { .. }), "{e}");
        assert_eq!(page[0], byte(4096));
        drop(page);
        // A PageMut, then a second PageMut or a pin of the same page.
        let m = pin_mut(&file, 0).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(pin(&file, 0))));
        assert!(r.is_err(), "pinning a page this thread holds as PageMut returned");
        drop(m);
        // Everything still works afterwards.
        file.write_at(&[7], 4096).unwrap();
        assert_eq!(pin(&file, 1).unwrap()[0], 7);
    });
}

/// A WAL engine's store: `write_barrier` "syncs the log" up to the folio's
/// LSN; every page write checks that the log is durable up to the LSN of
/// the change it carries.
struct WalStore {
    file: upcache::FileStore,
    durable: std::sync::atomic::AtomicU64,
    log_syncs: std::sync::atomic::AtomicU64,
    page_lsn: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    violations: std::sync::atomic::AtomicU64,
    written: std::sync::atomic::AtomicU64,
    /// 0: allow; 1: refuse cleansing writeback; 2: refuse everything.
    refuse: std::sync::atomic::AtomicU8,
}

impl WalStore {
    /// Over the file at `path`, with nothing logged yet; `refuse` as the field.
    fn new(path: &std::path::Path, refuse: u8) -> WalStore {
        WalStore {
            file: upcache::FileStore::open(path).unwrap(),
            durable: 0.into(),
            log_syncs: 0.into(),
            page_lsn: Default::default(),
            violations: 0.into(),
            written: 0.into(),
            refuse: refuse.into(),
        }
    }
}

impl upcache::BackingStore for WalStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        self.file.read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let durable = self.durable.load(Ordering::SeqCst);
        let lsns = self.page_lsn.lock().unwrap();
        for p in off / 4096..(off + buf.len() as u64).div_ceil(4096) {
            if lsns.get(&p).copied().unwrap_or(0) > durable {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.written.fetch_add(1, Ordering::SeqCst);
        self.file.write_all_at(buf, off)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, size: u64) -> std::io::Result<()> {
        self.file.set_len(size)
    }
    fn write_barrier(&self, private: u64, mode: upcache::aops::SyncMode) -> std::io::Result<bool> {
        match self.refuse.load(Ordering::SeqCst) {
            1 if mode == upcache::aops::SyncMode::None => return Ok(false),
            2 => return Ok(false),
            _ => {}
        }
        if private > self.durable.load(Ordering::SeqCst) {
            self.log_syncs.fetch_add(1, Ordering::SeqCst);
            self.durable.fetch_max(private, Ordering::SeqCst);
        }
        Ok(true)
    }
}

#[test]
fn writeback_waits_for_the_log_up_to_each_page_lsn() {
    let (_d, path) = file_of(16 * 4096);
    let store = Arc::new(WalStore::new(&path, 1));
    let cache = PageCache::new();
    let file = cache
        .open_with_ops("wal", upcache::StoreOps::new(store.clone()))
        .unwrap();
    for i in 0..16u64 {
        let mut p = pin_mut(&file, i).unwrap();
        p[0] = 0xa0 + i as u8;
        p.set_lsn(100 + i);
        store.page_lsn.lock().unwrap().insert(i, 100 + i);
    }
    // Cleansing writeback the engine refuses: nothing written, all dirty.
    file.writeback(1 << 20).unwrap();
    assert_eq!(store.written.load(Ordering::SeqCst), 0, "a refused folio was written");
    assert_eq!(cache.stats().dirty_bytes, 16 * 4096);
    // Integrity refused outright: the sync fails, the data stays dirty.
    store.refuse.store(2, Ordering::SeqCst);
    assert!(file.fsync().is_err(), "fsync succeeded though the barrier refused it");
    assert_eq!(store.written.load(Ordering::SeqCst), 0);
    assert_eq!(cache.stats().dirty_bytes, 16 * 4096, "refused data was dropped");
    // Allowed: every page written after its LSN was made durable.
    store.refuse.store(0, Ordering::SeqCst);
    file.fsync().unwrap();
    assert!(store.written.load(Ordering::SeqCst) > 0);
    assert_eq!(
        store.violations.load(Ordering::SeqCst),
        0,
        "a page reached the store before its log"
    );
    assert!(store.durable.load(Ordering::SeqCst) >= 115);
    assert!(store.log_syncs.load(Ordering::SeqCst) >= 1);
    let disk = std::fs::read(&path).unwrap();
    for i in 0..16 {
        assert_eq!(disk[i * 4096], 0xa0 + i as u8);
    }
}

/// `launder_folio` writes a folio's bytes to the store like `writepage`:
/// the engine's write barrier (its log durable up to the folio's LSN) comes
/// first there too, and a refusal leaves the store untouched.
#[test]
fn launder_folio_waits_for_the_log_too() {
    use upcache::aops::AddressSpaceOps;
    let (_d, path) = file_of(4 * 4096);
    let store = Arc::new(WalStore::new(&path, 2));
    let ops = Arc::new(upcache::StoreOps::new(store.clone()));
    let cache = PageCache::new();
    let file = cache.open_with_ops("wal-launder", ops.clone()).unwrap();
    {
        let mut p = pin_mut(&file, 1).unwrap();
        p[0] = 0x5a;
        p.set_lsn(77);
        store.page_lsn.lock().unwrap().insert(1, 77);
    }
    let m = file.address_space().unwrap();
    let mut g = m.filemap_lock_folio(upcache::aops::PgOff(1)).expect("cached");
    assert!(
        ops.launder_folio(m, &mut g).is_err(),
        "a refused barrier must fail the launder"
    );
    assert_eq!(
        store.written.load(Ordering::SeqCst),
        0,
        "laundered past a refused barrier"
    );
    store.refuse.store(0, Ordering::SeqCst);
    ops.launder_folio(m, &mut g).unwrap();
    drop(g);
    assert_eq!(
        store.violations.load(Ordering::SeqCst),
        0,
        "a page reached the store before its log"
    );
    assert!(store.durable.load(Ordering::SeqCst) >= 77);
    assert_eq!(std::fs::read(&path).unwrap()[4096], 0x5a);
}

/// Dirty throttling never waits for a folio lock: a `PageMut` holds its
/// folio's lock while the engine runs, and the engine may dirty more
/// pages meanwhile (a B-tree split holds the parent while it writes the
/// children). Throttled past the dirty limit, the cleansing writeback used
/// to lock every dirty folio of the file in turn: the guard's own thread
/// panicked ("would wait for itself"), and two such threads deadlocked.
#[test]
fn throttling_skips_folios_that_page_guards_hold() {
    watchdog("throttling vs page guards", 60, || {
        let (_d, path) = file_of(16 << 20);
        let cache = PageCache::builder().dirty_limit_bytes(256 * 1024).build();
        let file = Arc::new(cache.open(&path).unwrap());
        let go = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let file = file.clone();
                let go = go.clone();
                std::thread::spawn(move || {
                    // Each holds a dirty page of its own (dirtied before:
                    // a guard dirties its page only when dropped), then
                    // dirties many more (every one past the limit is
                    // throttled).
                    file.write_at(&[9], t * 1024 * PAGE_SIZE as u64 + 100).unwrap();
                    let mut held = pin_mut(&file, t * 1024).unwrap();
                    held[0] = 0xA0 + t as u8;
                    go.wait();
                    for i in 0..200u64 {
                        let mut p = pin_mut(&file, 2048 + t * 1024 + i * 4).unwrap();
                        p[1] = t as u8 + 1;
                    }
                    drop(held);
                })
            })
            .collect();
        for t in threads {
            t.join()
                .expect("a thread holding a page guard was throttled into a panic");
        }
        file.fsync().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        for t in 0..2usize {
            assert_eq!(on_disk[t * 1024 * PAGE_SIZE], 0xA0 + t as u8);
            for i in 0..200usize {
                assert_eq!(on_disk[(2048 + t * 1024 + i * 4) * PAGE_SIZE + 1], t as u8 + 1);
            }
        }
        assert!(
            cache.stats().throttled > 0,
            "the dirty limit was reached: {}",
            cache.stats()
        );
    });
}

/// A thread that holds a `PageMut` (which holds the cache's freeze gate
/// shared) can take more guards and write while another thread waits in
/// `freeze`: the freeze waits for it, not the other way round. The gate
/// used to be a writer-preferring lock taken again by the same thread: it
/// blocked behind the waiting freeze, which waited for it.
#[test]
fn a_page_guard_holder_goes_on_while_a_freeze_waits_for_it() {
    watchdog("page guards vs a waiting freeze", 60, || {
        let (_d, path) = file_of(8 << 20);
        let cache = Arc::new(PageCache::new());
        let file = cache.open(&path).unwrap();
        let freezing = Arc::new(AtomicBool::new(false));
        let held = pin_mut(&file, 0).unwrap();
        let freezer = {
            let cache = cache.clone();
            let freezing = freezing.clone();
            std::thread::spawn(move || {
                freezing.store(true, Ordering::SeqCst);
                cache.freeze().unwrap();
                cache.thaw();
            })
        };
        // Go on working until the freezer has certainly queued (it does
        // so a few microseconds after raising the flag).
        let mut i = 1u64;
        let mut after = 0;
        while after < 2000 {
            if freezing.load(Ordering::SeqCst) {
                after += 1;
            }
            let mut p = pin_mut(&file, 1000 + i % 1000).unwrap();
            p[0] = 7;
            drop(p);
            i += 1;
        }
        file.write_at(b"still writing", 1500 * PAGE_SIZE as u64).unwrap();
        drop(held);
        freezer.join().unwrap();
    });
}

/// Pages of one folio pinned in turn by a thread while another thread's
/// write to a third page of that folio waits for the pins: the second pin
/// does not wait for the writer (which waits for the first pin). Before,
/// the second `get_page` slept on the folio lock the writer held: a
/// deadlock (reported as "would wait for itself").
#[test]
fn a_second_pin_of_a_folio_does_not_wait_for_a_writer_waiting_for_the_first() {
    watchdog("pins of one folio vs a waiting writer", 60, || {
        let (_d, path) = file_of(1 << 20);
        let cache = PageCache::new();
        let file = Arc::new(cache.open(&path).unwrap());
        let first = pin(&file, 0).unwrap();
        let m = file.address_space().unwrap();
        let folio = m.filemap_get_folio(upcache::aops::PgOff(0)).unwrap();
        assert!(folio.nr_pages() >= 4, "pages 0-2 share a folio");
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || file.write_at(b"W", 2 * PAGE_SIZE as u64).unwrap())
        };
        // The writer locks the folio, then waits for the pin to drain.
        while !folio.is_locked() {
            std::hint::spin_loop();
        }
        let second = pin(&file, 1).unwrap();
        assert_eq!(second[0], byte(PAGE_SIZE));
        assert_eq!(first[0], byte(0));
        drop(first);
        drop(second);
        writer.join().unwrap();
        let mut b = [0u8; 1];
        file.read_at(&mut b, 2 * PAGE_SIZE as u64).unwrap();
        assert_eq!(&b, b"W");
    });
}

/// Bad calls by a page-guard holder are errors, not hangs: `freeze` from
/// a thread holding a `PageMut` would wait for that thread (`EDEADLK`),
/// and `thaw` from it returns at once (not frozen: the freeze would have
/// waited for it). A second `freeze` is `EBUSY`, not `EIO`.
#[test]
fn freeze_and_thaw_by_a_page_guard_holder_return() {
    watchdog("freeze by a PageMut holder", 60, || {
        let (_d, path) = file_of(1 << 20);
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        let g = pin_mut(&file, 3).unwrap();
        let e = cache.freeze().unwrap_err();
        assert_eq!(e.raw_os_error(), 35, "EDEADLK: {e}");
        assert!(!cache.thaw());
        drop(g);
        cache.freeze().unwrap();
        assert_eq!(cache.freeze().unwrap_err().raw_os_error(), 16, "EBUSY");
        assert!(cache.thaw());
    });
}

/// A page index past the largest file is `BeyondEof`, at once: its byte
/// offset used to wrap to a small one inside the file, and `get_page`
/// looked for a folio there forever (holding the freeze gate, for
/// `get_page_mut`).
#[test]
fn page_indices_past_the_largest_file_are_beyond_eof() {
    watchdog("get_page of a huge index", 60, || {
        let (_d, path) = file_of(1 << 20);
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        for index in [1u64 << 32, 1 << 52, u64::MAX / 2] {
            assert!(matches!(pin(&file, index), Err(Error::BeyondEof { .. })), "{index}");
            assert!(matches!(pin_mut(&file, index), Err(Error::BeyondEof { .. })), "{index}");
        }
    });
}

/// Calls that would wait for the caller's own page guard return errors,
/// never panic or hang: `write_at` over a page this thread pins
/// (`PageHeld`), `fsync` while this thread's `PageMut` holds a dirty folio
/// (`EDEADLK`; the folio stays dirty and the next `fsync` writes it).
#[test]
fn writes_and_syncs_over_own_page_guards_are_errors() {
    watchdog("writes over own guards", 60, || {
        let (_d, path) = file_of(1 << 20);
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        let p = pin(&file, 2).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            file.write_at(b"x", 2 * PAGE_SIZE as u64 + 9)
        }));
        assert!(
            matches!(r, Ok(Err(Error::PageHeld { .. }))),
            "write_at over a pinned page: {r:?}"
        );
        drop(p);
        file.write_at(b"y", 5 * PAGE_SIZE as u64).unwrap();
        let mut g = pin_mut(&file, 5).unwrap();
        g[1] = b'z';
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| file.fsync()));
        let e = r.expect("fsync must not panic").unwrap_err();
        assert_eq!(e.raw_os_error(), 35, "EDEADLK: {e}");
        drop(g);
        file.fsync().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[5 * PAGE_SIZE..5 * PAGE_SIZE + 2], b"yz");
    });
}

/// `read_at` into a `PageMut`'s own bytes copied the page onto itself with
/// `copy_nonoverlapping` (undefined behaviour: overlapping, and a foreign
/// read under the caller's live `&mut`). A destination that is the bytes
/// being read is a clear error; other pages' bytes are fine.
#[test]
fn read_at_into_the_bytes_it_reads_is_an_error() {
    let (_d, path) = file_of(4 * PAGE_SIZE);
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    let mut pm = pin_mut(&file, 3).unwrap();
    for pos in [3 * PAGE_SIZE as u64, 3 * PAGE_SIZE as u64 + 50] {
        let e = file
            .read_at(&mut pm[..100], pos)
            .expect_err("read_at into the bytes it reads");
        assert_eq!(e.raw_os_error(), libc::EINVAL, "{e}");
    }
    // Another page's bytes into the PageMut: an ordinary copy.
    assert_eq!(file.read_at(&mut pm[..100], 0).unwrap(), 100);
    assert_eq!(pm[99], byte(99));
    // Adjacent, not overlapping: also fine.
    assert_eq!(file.read_at(&mut pm[..100], 3 * PAGE_SIZE as u64 + 100).unwrap(), 100);
    assert_eq!(pm[0], byte(3 * PAGE_SIZE + 100));
    drop(pm);
    let mut b = [0u8; 10];
    assert_eq!(file.read_at(&mut b, 0).unwrap(), 10);
}
