//! Loom models of the fault engine's protocols, on the real folio lock,
//! flags, index and refcount code (the userfaultfd ioctls are modelled by
//! atomics: "PTE present", "PTE writable"):
//!
//! - fault vs truncate: no page is left mapped after truncate returns;
//! - map_pages' trylock vs a sleeping locker: map_pages never blocks, never
//!   maps a locked or not-uptodate folio, and never costs the sleeper its
//!   wake-up;
//! - page_mkwrite vs writeback (page_mkclean): a write through a mapping is
//!   never lost — the folio ends dirty or the store has the data.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use upcache::loom_support::{
    alloc_folio, end_writeback, mapping_id, set_writeback, test_clear_dirty, test_set_dirty, wait_refs_drained, Index,
};

#[test]
fn fault_vs_truncate_leaves_no_stale_mapping() {
    loom::model(|| {
        let index = Arc::new(Index::default());
        let i_size = Arc::new(AtomicU64::new(4096));
        // The PTE of page 0 in a user mapping.
        let pte = Arc::new(AtomicBool::new(false));
        let g = alloc_folio(1, 0);
        g.mark_uptodate();
        assert!(index.add(&g));
        drop(g);

        let fault = {
            let (index, i_size, pte) = (index.clone(), i_size.clone(), pte.clone());
            thread::spawn(move || {
                // filemap_fault: EOF check, lookup, lock, re-check mapping
                // and EOF under the lock, then map (CONTINUE) and unlock.
                if i_size.load(Ordering::Acquire) == 0 {
                    return; // SIGBUS
                }
                let Some(f) = index.lookup(0) else { return };
                let g = f.lock();
                if mapping_id(&g) != 1 || i_size.load(Ordering::Acquire) == 0 {
                    return; // truncated: retry -> SIGBUS
                }
                pte.store(true, Ordering::Release);
                drop(g);
            })
        };

        // truncate(0): i_size first, then lock, remove, unlock, drain the
        // references, punch (which zaps every PTE of the range).
        i_size.store(0, Ordering::Release);
        if let Some(f) = index.lookup(0) {
            let g = f.lock();
            g.wait_writeback();
            index.remove(&g);
            let f = g.unlock();
            wait_refs_drained(&f);
            pte.store(false, Ordering::Release);
        }
        // truncate has returned: nothing may map page 0 any more.
        fault.join().unwrap();
        assert!(
            !pte.load(Ordering::Acquire),
            "stale page mapped after truncate returned"
        );
    });
}

#[test]
fn map_pages_trylock_never_blocks_nor_maps_unready_folios() {
    loom::model(|| {
        let index = Arc::new(Index::default());
        let g = alloc_folio(1, 0);
        assert!(index.add(&g));
        let folio = g.unlock();
        let mapped = Arc::new(AtomicU32::new(0));

        // A reader that fills the folio under its lock (read_folio).
        let filler = {
            let f = folio.clone();
            thread::spawn(move || {
                let g = f.lock();
                if !g.is_uptodate() {
                    g.mark_uptodate();
                }
            })
        };
        // A sleeping locker (truncate, write_begin): must get its wake-up
        // even when map_pages' trylock/unlock interleave with its sleep.
        let sleeper = {
            let f = folio.clone();
            thread::spawn(move || {
                let g = f.lock();
                assert!(g.is_locked());
            })
        };
        // map_pages: skip anything not ready, trylock only.
        if let Some(f) = index.lookup(0) {
            if f.is_uptodate() && !f.is_locked() {
                if let Ok(g) = f.trylock() {
                    if mapping_id(&g) == 1 && g.is_uptodate() {
                        assert!(g.is_locked() && g.is_uptodate());
                        mapped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        filler.join().unwrap();
        sleeper.join().unwrap();
        assert!(!folio.is_locked());
        assert!(mapped.load(Ordering::Relaxed) <= 1);
    });
}

const WRITABLE: u64 = 1 << 32;

#[test]
fn page_mkwrite_vs_writeback_never_loses_a_write() {
    loom::model(|| {
        // Version 1 was written through the mapping: dirty, PTE writable.
        let g = alloc_folio(1, 0);
        g.mark_uptodate();
        assert!(test_set_dirty(&g));
        let folio = g.unlock();
        // The PTE's writable bit and the page's data in one word, so a user
        // store is atomic with the permission check, as the MMU makes it
        // (page_mkclean's TLB flush orders it against the protection).
        let pte = Arc::new(AtomicU64::new(WRITABLE | 1));
        let store = Arc::new(AtomicU64::new(0));

        let writer = {
            let (f, pte) = (folio.clone(), pte.clone());
            thread::spawn(move || loop {
                let v = pte.load(Ordering::Acquire);
                if v & WRITABLE != 0 {
                    if pte
                        .compare_exchange(v, WRITABLE | 2, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return;
                    }
                    continue;
                }
                // WP fault -> filemap_page_mkwrite: lock, dirty, unprotect.
                let g = f.clone().lock();
                test_set_dirty(&g);
                pte.fetch_or(WRITABLE, Ordering::AcqRel);
                drop(g);
            })
        };

        // write_cache_pages + folio_clear_dirty_for_io (page_mkclean) +
        // writepage.
        let g = folio.clone().lock();
        if test_clear_dirty(&g) {
            pte.fetch_and(!WRITABLE, Ordering::AcqRel);
            set_writeback(&g);
            let f = g.unlock();
            store.store(pte.load(Ordering::Acquire) & !WRITABLE, Ordering::Relaxed);
            end_writeback(&f);
        } else {
            drop(g);
        }

        writer.join().unwrap();
        let dirty = folio.is_dirty();
        let on_disk = store.load(Ordering::Relaxed);
        assert!(
            dirty || on_disk == 2,
            "lost mapped write: clean folio, store has {on_disk}"
        );
    });
}
