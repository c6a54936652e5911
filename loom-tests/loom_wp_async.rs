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
//!   compare after the zap).
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

/// A one-page file of zeros, cached, clean and mapped write-protected in
/// one async-tracked mapping whose page table is `pte`.
fn setup() -> (
    std::sync::Arc<MemStore>,
    std::sync::Arc<upcache::aops::AddressSpace>,
    PageTable,
) {
    let store = std::sync::Arc::new(MemStore::filled(PAGE_SIZE, 0));
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
    match filemap_fault(&m, 0) {
        Fault::Locked(g) => assert!(g.is_uptodate() && !g.is_dirty()),
        _ => panic!("populating fault failed"),
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

#[test]
fn real_fsync_vs_flusher_harvest_never_loses_a_write() {
    loom::model(|| {
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
    loom::model(|| {
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
