//! Loom models of asynchronous dirty tracking (`DirtyTracking::Async`,
//! `src/wp_async.rs`) on the crate's real code: a real `AddressSpace`,
//! its real harvest (run before every writeback), its real eviction with
//! the scan–zap–compare check, and real writeback. Only the user page
//! table is modelled: a PTE with `present` and `written` bits behind a
//! lock that a user store holds across its check and its store (the
//! kernel resolves an async write-protect fault by clearing the uffd-wp
//! bit, then the store lands; a zap's TLB shootdown waits for stores in
//! flight).
//!
//! - an `fsync` (`write_and_wait_range`) racing a flusher harvest never
//!   returns without a write made before it (`harvest_lock`);
//! - eviction racing a mapped store never discards the store (the
//!   compare after the zap);
//! - a thread holding a `PageMut` of a written page and syncing another
//!   page, racing an `fsync` that must wait for that page, never
//!   deadlocks (no folio-lock wait under `harvest_lock`), and the write
//!   reaches the store;
//! - eviction keeps a folio whose written page a harvest left pending;
//! - a punch the store refuses, racing a mapped store, never loses it
//!   (punch's check of each folio it drops is eviction's).
//!
//! Planted bugs they kill (patches in `tests/mutants/`): a harvest without
//! `harvest_lock`; eviction without the compare.
#![cfg(loom)]

use loom::sync::{Arc, Mutex};
use loom::thread;
use upcache::loom_support::{
    address_space, evict_folio, filemap_fault, harvest, on_punch, set_async_mapping, user_store, Fault, MemStore,
};
use upcache::PAGE_SIZE;

#[derive(Default)]
struct Pte {
    present: bool,
    written: bool,
}

type PageTable = Arc<Mutex<Pte>>;

type Setup = (
    std::sync::Arc<MemStore>,
    std::sync::Arc<upcache::aops::AddressSpace>,
    PageTable,
);

/// A one-page file of zeros, cached, clean and mapped write-protected in
/// one async-tracked mapping whose page table is `pte`.
fn setup() -> Setup {
    setup_pages(1)
}

/// `setup` with a file of `pages` pages, all cached; the page table is
/// page 0's.
fn setup_pages(pages: usize) -> Setup {
    let store = std::sync::Arc::new(MemStore::filled(pages * PAGE_SIZE, 0));
    let m = address_space(store.clone());
    let pte: PageTable = Arc::new(Mutex::new(Pte::default()));
    {
        let (scan_pte, zap_pte, punch_pte) = (pte.clone(), pte.clone(), pte.clone());
        set_async_mapping(
            &m,
            move |pages| {
                let mut p = scan_pte.lock().unwrap();
                if pages.start == 0 && p.written {
                    p.written = false;
                    vec![0..1]
                } else {
                    Vec::new()
                }
            },
            move |pos, _| {
                if pos == 0 {
                    zap_pte.lock().unwrap().present = false;
                }
            },
        );
        on_punch(&m, move |pos, _| {
            if pos == 0 {
                punch_pte.lock().unwrap().present = false;
            }
        });
    }
    for i in 0..pages as u64 {
        match filemap_fault(&m, i) {
            Fault::Locked(g) => assert!(g.is_uptodate() && !g.is_dirty()),
            _ => panic!("populating fault failed"),
        }
    }
    // Mapped with UFFDIO_CONTINUE | MODE_WP (a clean folio).
    pte.lock().unwrap().present = true;
    (store, m, pte)
}

/// A user store of `v` to page 0: through the PTE if present (the kernel
/// clears the uffd-wp bit, the store lands), else a fault (the real
/// `filemap_fault`, then the page is mapped write-protected) and retry.
fn user_write(m: &upcache::aops::AddressSpace, pte: &PageTable, v: u8) {
    for _ in 0..3 {
        {
            let mut p = pte.lock().unwrap();
            if p.present {
                p.written = true;
                user_store(m, 0, v);
                return;
            }
        }
        if let Fault::Locked(g) = filemap_fault(m, 0) {
            // Mapped while the folio is locked: write-protected if clean.
            let mut p = pte.lock().unwrap();
            p.present = true;
            if g.is_dirty() {
                p.written = true;
            }
            drop(p);
            drop(g);
        }
    }
    panic!("the store never found its page mapped");
}

/// `loom::model` with room for these models' long executions (the real
/// writeback, harvest and folio-lock paths, the lock's bounded spinning):
/// loom's default of 1,000 branches per execution is too few for the
/// PageMut model. Preemptions still come from `LOOM_MAX_PREEMPTIONS`.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 20_000;
    b.check(f);
}

#[test]
fn real_fsync_vs_flusher_harvest_never_loses_a_write() {
    model(|| {
        let (store, m, pte) = setup();
        let flusher = {
            let m = m.clone();
            thread::spawn(move || harvest(&m))
        };
        user_write(&m, &pte, 1);
        m.write_and_wait_range(0, u64::MAX).unwrap();
        assert_eq!(
            store.contents()[0],
            1,
            "fsync returned before a mapped write reached the store"
        );
        flusher.join().unwrap();
    });
}

#[test]
fn real_evict_vs_mapped_store_never_discards_it() {
    model(|| {
        let (store, m, pte) = setup();
        let writer = {
            let (m, pte) = (m.clone(), pte.clone());
            thread::spawn(move || user_write(&m, &pte, 1))
        };
        evict_folio(&m, 0);
        writer.join().unwrap();
        // Whatever the interleaving, the store is in the folio (dirty or
        // still mapped written) or in the store: one writeback (with its
        // harvest) must persist it.
        m.write_and_wait_range(0, u64::MAX).unwrap();
        assert_eq!(store.contents()[0], 1, "eviction discarded a mapped write");
    });
}

/// A punch whose store refuses it, racing a store through an
/// async-tracked mapping: the write survives (the punch drops only folios
/// it checked clean — scan, zap, compare, as eviction does — or wrote
/// back). A scan and zap without the compare let a store landing between
/// them go unseen, and the folio was dropped with it.
#[test]
fn real_failed_punch_vs_mapped_store_never_loses_it() {
    model(|| {
        let (store, m, pte) = setup();
        store.refuse_punches();
        let writer = {
            let (m, pte) = (m.clone(), pte.clone());
            thread::spawn(move || user_write(&m, &pte, 1))
        };
        assert!(m.punch_hole(0, PAGE_SIZE as u64).is_err(), "the store refuses punches");
        writer.join().unwrap();
        m.write_and_wait_range(0, u64::MAX).unwrap();
        assert_eq!(store.contents()[0], 1, "a failed punch lost a mapped write");
    });
}

#[test]
fn real_fsync_holding_a_page_mut_vs_fsync_never_deadlocks() {
    model(|| {
        let (store, m, pte) = setup_pages(2);
        // Written through the mapping, not harvested yet.
        user_write(&m, &pte, 1);
        let other = {
            let (m, store) = (m.clone(), store.clone());
            thread::spawn(move || {
                // The write happened before this fsync: it must wait for
                // the guard and write it.
                m.write_and_wait_range(0, u64::MAX).unwrap();
                assert_eq!(
                    store.contents()[0],
                    1,
                    "fsync returned without a mapped write made before it"
                );
            })
        };
        {
            // SAFETY: the model's mapping does not store to page 0 while
            // the guard lives.
            let _g = unsafe { m.read_cache_page_mut(0) }.unwrap();
            m.write_and_wait_range(PAGE_SIZE as u64, 2 * PAGE_SIZE as u64 - 1)
                .unwrap();
        }
        other.join().unwrap();
        m.write_and_wait_range(0, u64::MAX).unwrap();
        assert_eq!(store.contents()[0], 1, "a mapped write was lost");
    });
}

#[test]
fn real_evict_keeps_a_page_a_harvest_left_pending() {
    model(|| {
        let (store, m, pte) = setup();
        user_write(&m, &pte, 1);
        {
            // SAFETY: the model's mapping does not store to page 0 while
            // the guard lives.
            let _g = unsafe { m.read_cache_page_mut(0) }.unwrap();
            // The flusher's harvest finds the folio locked: the page stays
            // pending (its PTE is protected again).
            let flusher = {
                let m = m.clone();
                thread::spawn(move || harvest(&m))
            };
            flusher.join().unwrap();
        }
        evict_folio(&m, 0);
        m.write_and_wait_range(0, u64::MAX).unwrap();
        assert_eq!(store.contents()[0], 1, "eviction dropped a page a harvest left pending");
    });
}
