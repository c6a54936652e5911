//! Loom models that run the crate's real filemap code on a real
//! `AddressSpace` (real index, folio lock, refcount, `invalidate_lock`,
//! `i_rwsem`, folio memory in a real memfd, a real `StoreOps` over an
//! in-memory store). Only the user page table is modelled: the models'
//! "PTE" is set by the map callback while the folio is locked, and cleared
//! by the page store's punch (which, for real, zaps every mapping of the
//! range).
//!
//! - `filemap_fault` vs `truncate` and vs `punch_hole`: a fault returns
//!   only a folio still in the file, and no page stays mapped after
//!   truncate or punch returns;
//! - `read_at` vs `truncate`: a reader holding a folio reference never
//!   copies punched memory (truncate waits for references to drain);
//! - a `PageMut` write vs a `punch_hole` whose store refuses the punch:
//!   the punch drops only clean folios, so the write survives;
//! - `set_atomic_fill` (a `Missing` mapping being created) vs an engine's
//!   fill without `invalidate_lock`: no fill through folio memory is left
//!   running once it returns;
//! - `filemap_page_mkwrite` vs writeback (`write_and_wait_range`, with its
//!   `folio_clear_dirty_for_io` → `page_mkclean`): a write through a
//!   mapping is never lost — after both, one more writeback puts it in the
//!   store;
//! - a stale `filemap_page_mkwrite` (its folio evicted and replaced by
//!   one whose read failed) never dirties a folio that is not uptodate;
//! - reclaim's eviction (`evict_folio`: trylock, freeze the count, punch,
//!   unindex) vs `read_at` and vs `map_pages`: a reader never copies
//!   punched memory, and no evicted folio stays mapped;
//! - writeback (`write_and_wait_range`) vs a shrinking `truncate`: the
//!   `wb_lock` rule — no writeback runs between the store's shrink and the
//!   new `i_size`, so the store ends at the new size, never grown back by
//!   a write of a folio past it;
//! - a `PageRef` vs `write_at`: pinned bytes never change and the writer
//!   is woken when the pin goes; a second pin of the same folio by the
//!   reader does not wait for the writer that waits for its first pin; two
//!   `PageMut`s of one page exclude each other and neither update is lost;
//! - `filemap_map_pages` vs a folio lock holder that waits for the mapper:
//!   map_pages never blocks on a folio lock, and maps only locked, attached,
//!   uptodate folios;
//! - a `PageRef` holder's read miss vs a truncate waiting for that pin
//!   (latch coupling): the miss backs off or goes first, never hangs.
//!
//! Planted bugs these models kill (patches in `tests/mutants/`):
//! `filemap_fault` without its re-check of the folio's mapping, truncate
//! without `wait_refs_drained`, `map_pages` taking a blocking folio lock,
//! `folio_clear_dirty_for_io` without `page_mkclean`, eviction freezing
//! whatever count it finds, writeback without `wb_lock`, `copy_in_raw`
//! without `wait_pins_drained`, punch dropping a folio written during it.
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex, Notify};
use loom::thread;
use upcache::loom_support::{
    address_space, evict_folio, filemap_fault, filemap_map_pages, filemap_page_mkwrite, get_folio, mapping_id,
    on_mkclean, on_punch, user_store, Fault, MemStore,
};
use upcache::PAGE_SIZE;

const BYTE: u8 = 0xab;

/// The model PTE of page 0: the address of the folio it maps, 0 if none.
type Pte = Arc<AtomicUsize>;

fn folio_addr(f: &upcache::aops::Folio) -> usize {
    f as *const upcache::aops::Folio as usize
}

/// A file of `pages` pages of `BYTE`, page 0 cached and uptodate, and the
/// model PTE of page 0, cleared by every punch that covers it.
fn cached_page0(pages: usize) -> (std::sync::Arc<upcache::aops::AddressSpace>, Pte) {
    let store = std::sync::Arc::new(MemStore::filled(pages * PAGE_SIZE, BYTE));
    let m = address_space(store);
    let pte = Arc::new(AtomicUsize::new(0));
    {
        let pte = pte.clone();
        on_punch(&m, move |pos, _len| {
            if pos == 0 {
                pte.store(0, Ordering::Release);
            }
        });
    }
    // Populate the cache before the model's threads start.
    match filemap_fault(&m, 0) {
        Fault::Locked(g) => assert!(g.is_uptodate()),
        _ => panic!("populating fault failed"),
    }
    (m, pte)
}

#[test]
fn real_fault_vs_truncate() {
    loom::model(|| {
        let (m, pte) = cached_page0(1);
        let fault = {
            let (m, pte) = (m.clone(), pte.clone());
            thread::spawn(move || {
                if let Fault::Locked(g) = filemap_fault(&m, 0) {
                    // The caller maps what filemap_fault returns, under
                    // the folio lock: it must still be this file's.
                    assert_eq!(mapping_id(&g), m.id(), "filemap_fault returned a truncated folio");
                    assert!(g.is_uptodate());
                    pte.store(folio_addr(&g), Ordering::Release);
                    drop(g);
                }
            })
        };
        m.truncate(0).unwrap();
        fault.join().unwrap();
        assert_eq!(pte.load(Ordering::Acquire), 0, "page mapped after truncate returned");
        assert!(get_folio(&m, 0).is_none());
    });
}

#[test]
fn real_fault_vs_punch_hole() {
    loom::model(|| {
        let (m, pte) = cached_page0(2);
        let fault = {
            let (m, pte) = (m.clone(), pte.clone());
            thread::spawn(move || {
                if let Fault::Locked(g) = filemap_fault(&m, 0) {
                    // The caller maps what filemap_fault returns, under
                    // the folio lock: it must still be this file's.
                    assert_eq!(mapping_id(&g), m.id(), "filemap_fault returned a truncated folio");
                    assert!(g.is_uptodate());
                    pte.store(folio_addr(&g), Ordering::Release);
                    drop(g);
                }
            })
        };
        // Page 0 leaves the cache; i_size does not change, so only the
        // fault's re-check of the folio's mapping can notice.
        m.punch_hole(0, PAGE_SIZE as u64).unwrap();
        fault.join().unwrap();
        // A fault that ran after the punch maps a fresh folio; one that
        // raced with it must not have left the removed one mapped.
        let mapped = pte.load(Ordering::Acquire);
        if mapped != 0 {
            let now = get_folio(&m, 0).map(|f| folio_addr(&f));
            assert_eq!(
                Some(mapped),
                now,
                "a removed folio is still mapped after punch_hole returned"
            );
        }
    });
}

#[test]
fn real_read_vs_truncate_never_copies_punched_memory() {
    loom::model(|| {
        let (m, _pte) = cached_page0(1);
        let reader = {
            let m = m.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 8];
                let n = m.read_at(&mut buf, 0).unwrap();
                // All of it or nothing (EOF): never the zeros of a punched
                // page under a reader's reference.
                assert!(n == 0 || n == 8, "short read {n}");
                assert!(buf[..n].iter().all(|&b| b == BYTE), "read punched memory: {buf:?}");
            })
        };
        m.truncate(0).unwrap();
        reader.join().unwrap();
    });
}

#[test]
fn real_map_pages_never_blocks_on_a_folio_lock() {
    loom::model(|| {
        let (m, pte) = cached_page0(1);
        // A folio lock holder that waits for the mapper to finish (as a
        // read_folio may wait for the handler thread that is mapping): if
        // map_pages ever sleeps on the lock, neither can go on.
        let mapped_done = Arc::new(Notify::new());
        let holder = {
            let (m, done) = (m.clone(), mapped_done.clone());
            thread::spawn(move || {
                if let Some(f) = get_folio(&m, 0) {
                    let g = f.lock();
                    done.wait();
                    drop(g);
                }
            })
        };
        let id = m.id();
        filemap_map_pages(&m, 0..1, true, &mut |run, wp, folios| {
            assert_eq!(run, 0..1);
            assert!(
                wp,
                "a clean folio of a shared-writable mapping is mapped write-protected"
            );
            for g in folios {
                assert!(g.is_locked() && g.is_uptodate() && mapping_id(g) == id);
            }
            pte.store(folio_addr(&folios[0]), Ordering::Release);
        });
        mapped_done.notify();
        holder.join().unwrap();
    });
}

#[test]
fn real_page_mkwrite_vs_writeback_never_loses_a_write() {
    loom::model(|| {
        // The store holds version 0; the cached folio is clean.
        let store = std::sync::Arc::new(MemStore::filled(PAGE_SIZE, 0));
        let m = address_space(store.clone());
        match filemap_fault(&m, 0) {
            Fault::Locked(g) => assert!(g.is_uptodate()),
            _ => panic!("populating fault failed"),
        }
        // The model MMU: the PTE's writable bit, behind a lock that a user
        // store holds across its permission check and its store, and that
        // page_mkclean takes to clear the bit (the TLB shootdown: once it
        // returns, no store through the old permission is in flight).
        let writable = Arc::new(Mutex::new(false));
        {
            let writable = writable.clone();
            on_mkclean(&m, move |_, _| *writable.lock().unwrap() = false);
        }
        // A user store of `v`: through the PTE if writable, else a WP
        // fault (the real page_mkwrite), which makes it writable.
        let store_byte = {
            let (m, writable) = (m.clone(), writable.clone());
            move |v: u8| loop {
                {
                    let w = writable.lock().unwrap();
                    if *w {
                        user_store(&m, 0, v);
                        return;
                    }
                }
                if let Fault::Locked(g) = filemap_page_mkwrite(&m, 0) {
                    assert!(g.is_dirty());
                    *writable.lock().unwrap() = true;
                    drop(g);
                }
            }
        };
        // Version 1 is written before the race (dirty, PTE writable).
        store_byte(1);

        let writer = thread::spawn(move || store_byte(2));
        m.write_and_wait_range(0, u64::MAX).unwrap();
        writer.join().unwrap();
        // Whatever the interleaving, the write is either in the store or
        // the folio is dirty: one more writeback must persist it.
        m.write_and_wait_range(0, u64::MAX).unwrap();
        assert_eq!(store.contents()[0], 2, "a write through the mapping was lost");
    });
}

/// A stale write fault: `page_mkwrite` for page 0 runs after the folio
/// whose page faulted was evicted and a new folio, whose read failed, took
/// its index (the fault message was queued meanwhile). It must never
/// dirty that folio, which is not uptodate (its write-back could never
/// start, and bytes nobody read would become file data): it reads it
/// first, or lets the thread fault again.
///
/// More branches than loom's default 1,000 per execution: the re-read of
/// the failed folio clears its poison with the folio locked (eighteenth
/// session), one lock round more on an already long path.
#[test]
fn real_stale_page_mkwrite_never_dirties_a_folio_that_is_not_uptodate() {
    let mut b = loom::model::Builder::new();
    b.max_branches = 20_000;
    b.check(|| {
        let store = std::sync::Arc::new(MemStore::filled(PAGE_SIZE, BYTE));
        let m = address_space(store.clone());
        match filemap_fault(&m, 0) {
            Fault::Locked(g) => assert!(g.is_uptodate()),
            _ => panic!("populating fault failed"),
        }
        let other = {
            let m = m.clone();
            thread::spawn(move || {
                evict_folio(&m, 0);
                store.fail_next_read();
                // Recreates the folio; its read fails (unless page_mkwrite's
                // own read took the failure).
                let _ = filemap_fault(&m, 0);
            })
        };
        if let Fault::Locked(g) = filemap_page_mkwrite(&m, 0) {
            assert!(g.is_uptodate(), "page_mkwrite returned a folio that is not uptodate");
            assert!(g.is_dirty());
        }
        other.join().unwrap();
        if let Some(f) = get_folio(&m, 0) {
            assert!(
                !(f.is_dirty() && !f.is_uptodate()),
                "a dirty folio that is not uptodate: {f:?}"
            );
        }
    });
}

#[test]
fn real_evict_vs_read_never_copies_punched_memory() {
    loom::model(|| {
        let (m, _pte) = cached_page0(1);
        let reader = {
            let m = m.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 8];
                // Evicted first: the read misses and reads the store again.
                assert_eq!(m.read_at(&mut buf, 0).unwrap(), 8);
                assert!(buf.iter().all(|&b| b == BYTE), "read evicted memory: {buf:?}");
            })
        };
        evict_folio(&m, 0);
        reader.join().unwrap();
    });
}

#[test]
fn real_evict_vs_map_pages_leaves_nothing_mapped() {
    loom::model(|| {
        let (m, pte) = cached_page0(1);
        let mapper = {
            let (m, pte) = (m.clone(), pte.clone());
            thread::spawn(move || {
                filemap_map_pages(&m, 0..1, false, &mut |_, _, folios| {
                    pte.store(folio_addr(&folios[0]), Ordering::Release);
                });
            })
        };
        let evicted = evict_folio(&m, 0);
        mapper.join().unwrap();
        let mapped = pte.load(Ordering::Acquire);
        if evicted {
            assert_eq!(mapped, 0, "an evicted folio is still mapped");
        } else if mapped != 0 {
            assert_eq!(Some(mapped), get_folio(&m, 0).map(|f| folio_addr(&f)));
        }
    });
}

#[test]
fn real_writeback_vs_truncate_never_grows_the_store_back() {
    loom::model(|| {
        let store = std::sync::Arc::new(MemStore::filled(2 * PAGE_SIZE, 0));
        let m = address_space(store.clone());
        // Page 1 is dirty in the cache.
        assert_eq!(m.write_at(&[7], PAGE_SIZE as u64).unwrap(), 1);
        let flusher = {
            let m = m.clone();
            thread::spawn(move || {
                let _ = m.write_and_wait_range(0, u64::MAX);
            })
        };
        m.truncate(PAGE_SIZE as u64).unwrap();
        flusher.join().unwrap();
        assert_eq!(
            store.contents().len(),
            PAGE_SIZE,
            "writeback of a folio past the new end grew the store back"
        );
    });
}

/// `punch_hole` of the first page of a two-page folio vs a mapped write
/// to its second page (`filemap_page_mkwrite`, which needs no
/// `invalidate_lock`) followed by background writeback (the flusher): no
/// writeback of the folio may run between punch's own writeback and the
/// zeroing of the folio's punched part, or it writes the old bytes of the
/// punched range back to the store after the store's punch (fsx found it
/// in CI: "on-disk byte 131072 is 148, model 0"). Punch holds `wb_lock`
/// exclusive across that window, as shrinking truncate does.
#[test]
fn real_punch_vs_mapped_write_and_flusher_leaves_the_hole_in_the_store() {
    loom::model(|| {
        let store = std::sync::Arc::new(MemStore::filled(2 * PAGE_SIZE, BYTE));
        let m = upcache::loom_support::address_space_min_order(store.clone(), 1);
        match filemap_fault(&m, 0) {
            Fault::Locked(g) => assert!(g.is_uptodate() && g.nr_pages() == 2),
            _ => panic!("populating fault failed"),
        }
        let writer = {
            let m = m.clone();
            thread::spawn(move || {
                if let Fault::Locked(g) = filemap_page_mkwrite(&m, 1) {
                    drop(g);
                }
                let mut wbc = upcache::aops::WritebackControl::none(i64::MAX);
                wbc.for_background = true;
                let _ = m.writepages(&mut wbc);
            })
        };
        m.punch_hole(0, PAGE_SIZE as u64).unwrap();
        writer.join().unwrap();
        m.write_and_wait_range(0, u64::MAX).unwrap();
        let c = store.contents();
        assert_eq!(c[0], 0, "the punched page came back in the store");
        assert_eq!(c[PAGE_SIZE], BYTE);
    });
}

/// A punch whose store refuses it changes nothing, even for a page
/// written during it: a `PageMut` write (no `invalidate_lock`, like a
/// mapped write) between the punch's write-back and its drop of the folio
/// must be written back before the drop (`clean_for_punch`), or the folio
/// kept. The old code dropped it dirty, the store refused, and the page
/// read the store's old bytes (mutant 117;
/// `tests/integrity.rs::failed_punch_keeps_a_page_mut_write_that_raced_it`).
#[test]
fn real_failed_punch_vs_page_mut_keeps_the_write() {
    // The punch's guard-wait announcement (a mutex, two wake checks) made
    // the path longer than loom's default 1,000 branches per execution.
    let mut model = loom::model::Builder::new();
    model.max_branches = 20_000;
    model.check(|| {
        let store = std::sync::Arc::new(MemStore::filled(PAGE_SIZE, BYTE));
        store.refuse_punches();
        let m = upcache::loom_support::address_space(store.clone());
        let mut b = [0u8; 1];
        m.read_at(&mut b, 0).unwrap();
        let writer = {
            let m = m.clone();
            thread::spawn(move || {
                // SAFETY: nothing maps the file.
                let mut page = unsafe { m.read_cache_page_mut(0) }.unwrap();
                page[0] = 0xcd;
            })
        };
        assert!(m.punch_hole(0, PAGE_SIZE as u64).is_err(), "the store refuses punches");
        writer.join().unwrap();
        m.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 0xcd, "a write during a failed punch was lost");
        m.write_and_wait_range(0, u64::MAX).unwrap();
        assert_eq!(store.contents()[0], 0xcd, "the write never reached the store");
    });
}

/// Latch coupling across a truncate: a thread holding a `PageRef` misses
/// on another page while a truncate waits for that pin, holding
/// `invalidate_lock` exclusive. The miss either runs before the truncate
/// takes the lock or backs off with `GuardWaited`; it never sleeps for the
/// truncate, and one already asleep when the truncate announces its range
/// is woken to back off (`RwSem::read_or_bail`, `waits_for_guards`; loom
/// reports the deadlock otherwise: mutants 176, 177).
#[test]
fn real_guard_holders_miss_vs_truncate_backs_off() {
    loom::model(|| {
        let store = std::sync::Arc::new(MemStore::filled(2 * PAGE_SIZE, BYTE));
        let m = address_space(store);
        // SAFETY: nothing maps the file.
        let page = unsafe { m.read_cache_page(1) }.unwrap();
        let truncate = {
            let m = m.clone();
            thread::spawn(move || m.truncate(PAGE_SIZE as u64).unwrap())
        };
        // SAFETY: as above.
        match unsafe { m.read_cache_page(0) } {
            Ok(p) => assert_eq!(p[0], BYTE),
            Err(upcache::Error::GuardWaited { offset, .. }) => assert_eq!(offset, PAGE_SIZE as u64),
            Err(e) => panic!("the miss failed: {e}"),
        }
        assert_eq!(page[0], BYTE, "truncate changed a pinned page");
        drop(page);
        truncate.join().unwrap();
    });
}

/// The same latch coupling where the truncate does not reach the guard:
/// the miss must not back off, and when it finds the truncate holding
/// `invalidate_lock` it sleeps until the release wakes it (a lost wake-up
/// is a deadlock here: mutant 177).
#[test]
fn real_guard_holders_miss_vs_an_unrelated_truncate_waits_and_succeeds() {
    loom::model(|| {
        let store = std::sync::Arc::new(MemStore::filled(3 * PAGE_SIZE, BYTE));
        let m = address_space(store);
        // SAFETY: nothing maps the file.
        let page = unsafe { m.read_cache_page(0) }.unwrap();
        let truncate = {
            let m = m.clone();
            thread::spawn(move || m.truncate(2 * PAGE_SIZE as u64).unwrap())
        };
        // SAFETY: as above.
        let p = unsafe { m.read_cache_page(1) }.expect("a miss no truncate waits for failed");
        assert_eq!((page[0], p[0]), (BYTE, BYTE));
        drop((p, page));
        truncate.join().unwrap();
    });
}

/// A `PageRef` (pinned page, `&[u8]` to folio memory) vs `write_at` of the
/// same bytes: the writer waits for the pin (`copy_in_raw` →
/// `wait_pins_drained`), so the pinned bytes never change under the
/// reader, the last `unpin` wakes the writer (no lost wake-up: loom
/// reports a deadlock otherwise), and the write lands afterwards. The
/// reader takes the lockless fast path (the page is cached): a pin raised
/// after the writer drained must see the lock and back off (mutants 31,
/// 32).
#[test]
fn real_page_ref_vs_write_at_never_changes_pinned_bytes() {
    // Four preemptions: a lockless pin that reads a stale lock bit needs
    // them (mutant 32 survives at two).
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(4);
    model.check(|| {
        let (m, _pte) = cached_page0(1);
        let reader = {
            let m = m.clone();
            thread::spawn(move || {
                // SAFETY: nothing maps the file.
                let page = unsafe { m.read_cache_page(0) }.unwrap();
                let first = page[0];
                thread::yield_now();
                assert_eq!(page[0], first, "pinned bytes changed under a PageRef");
                assert!(first == BYTE || first == 0xcd, "PageRef read {first:#x}");
            })
        };
        m.write_at(&[0xcd], 0).unwrap();
        reader.join().unwrap();
        let mut b = [0u8; 1];
        m.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 0xcd, "the write was lost");
    });
}

/// Two `PageRef`s of one folio taken in turn by a reader while `write_at`
/// of another page of that folio waits for the first pin: the second pin
/// does not wait for the folio lock (the writer holds it and waits for the
/// reader: loom reports the deadlock when the nested pin is removed), and
/// neither pinned page changes while pinned.
#[test]
fn real_second_pin_of_a_folio_vs_a_writer_waiting_for_the_first() {
    loom::model(|| {
        let store = std::sync::Arc::new(MemStore::filled(2 * PAGE_SIZE, BYTE));
        let m = upcache::loom_support::address_space_min_order(store, 1);
        match filemap_fault(&m, 0) {
            Fault::Locked(g) => assert!(g.is_uptodate() && g.nr_pages() == 2),
            _ => panic!("populating fault failed"),
        }
        let reader = {
            let m = m.clone();
            thread::spawn(move || {
                // SAFETY: nothing maps the file.
                let p0 = unsafe { m.read_cache_page(0) }.unwrap();
                let a = p0[0];
                // SAFETY: as above.
                let p1 = unsafe { m.read_cache_page(1) }.unwrap();
                let b = p1[0];
                thread::yield_now();
                assert_eq!((p0[0], p1[0]), (a, b), "pinned bytes changed under a PageRef");
            })
        };
        m.write_at(&[0xcd], PAGE_SIZE as u64).unwrap();
        reader.join().unwrap();
        let mut b = [0u8; 1];
        m.read_at(&mut b, PAGE_SIZE as u64).unwrap();
        assert_eq!(b[0], 0xcd, "the write was lost");
    });
}

/// Two `PageMut`s of one page: read-modify-write under the guard is
/// exclusive (the folio lock), and both updates survive.
#[test]
fn real_page_mut_excludes_page_mut() {
    loom::model(|| {
        let (m, _pte) = cached_page0(1);
        let inc = |m: &upcache::aops::AddressSpace| {
            // SAFETY: nothing maps the file.
            let mut page = unsafe { m.read_cache_page_mut(0) }.unwrap();
            let v = page[0];
            thread::yield_now();
            page[0] = v.wrapping_add(1);
        };
        let t = {
            let m = m.clone();
            thread::spawn(move || inc(&m))
        };
        inc(&m);
        t.join().unwrap();
        let mut b = [0u8; 1];
        m.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], BYTE.wrapping_add(2), "a PageMut update was lost");
        assert!(m.nr_dirty_folios() == 1, "a written PageMut left the folio clean");
    });
}

/// Creating a `Missing`-mode mapping (`set_atomic_fill`) vs an engine's
/// fill of a folio it grabbed without `invalidate_lock` (public
/// `filemap_grab_folio`, then a write through the folio's memory, as
/// `fill_folio` and `StoreOps::read_folio` do when fills need not be
/// page-atomic). Once `set_atomic_fill` returns, no such fill may still be
/// running: the kernel maps a page of a `Missing` mapping as soon as its
/// first byte is in the memfd, and the mapping would show (and race) a
/// half-filled page. `set_atomic_fill` used to wait only for holders of
/// `invalidate_lock` (found by review, thirteenth session; mutant 130).
#[test]
fn real_set_atomic_fill_vs_a_fill_without_invalidate_lock() {
    loom::model(|| {
        let m = address_space(std::sync::Arc::new(MemStore::filled(PAGE_SIZE, BYTE)));
        // 0: not started, 1: writing through the folio's memory, 2: done.
        let state = Arc::new(AtomicUsize::new(0));
        let filler = {
            let (m, state) = (m.clone(), state.clone());
            thread::spawn(move || {
                let mut g = m.filemap_grab_folio(upcache::aops::PgOff(0)).unwrap();
                if !m.needs_atomic_fill() {
                    state.store(1, Ordering::SeqCst);
                    g.data_mut()[0] = 7;
                    state.store(2, Ordering::SeqCst);
                }
                g.mark_uptodate();
            })
        };
        upcache::loom_support::set_atomic_fill(&m);
        assert_ne!(
            state.load(Ordering::SeqCst),
            1,
            "a fill through the folio's memory runs after set_atomic_fill returned"
        );
        filler.join().unwrap();
    });
}
