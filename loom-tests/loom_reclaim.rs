//! Loom model: reclaim (trylock, refcount freeze, punch while indexed,
//! unindex, free) against a concurrent lookup that reads the folio's memory
//! and a fault that maps it. Eviction never drops a folio someone holds (a
//! holder never sees its memory punched), and no mapping of an evicted
//! folio survives the eviction.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use loom::sync::Arc;
use loom::thread;
use upcache::loom_support::{alloc_folio, freeze_refs, mapping_id, Index};

const DATA: u32 = 7;
const HOLE: u32 = 0;

#[test]
fn reclaim_vs_lookup_and_fault() {
    loom::model(|| {
        let index = Arc::new(Index::default());
        let memory = Arc::new(AtomicU32::new(DATA));
        let pte = Arc::new(AtomicBool::new(false));
        let g = alloc_folio(1, 0);
        g.mark_uptodate();
        assert!(index.add(&g));
        drop(g);

        // One thread does what read_at and map_pages do: look up, copy
        // while holding the reference, then trylock, re-check and map.
        let user = {
            let (index, memory, pte) = (index.clone(), memory.clone(), pte.clone());
            thread::spawn(move || {
                if let Some(f) = index.lookup(0) {
                    assert_eq!(memory.load(Ordering::Acquire), DATA, "folio evicted under a reader");
                    if let Ok(g) = f.trylock() {
                        if mapping_id(&g) == 1 && g.is_uptodate() {
                            pte.store(true, Ordering::Release);
                        }
                    }
                }
            })
        };

        // The evictor.
        let mut evicted = false;
        if let Some(f) = index.lookup(0) {
            if let Ok(g) = f.trylock() {
                if freeze_refs(&g, 2) {
                    // Punch while still indexed: frees memory, zaps PTEs.
                    memory.store(HOLE, Ordering::Release);
                    pte.store(false, Ordering::Release);
                    index.remove_frozen(g);
                    evicted = true;
                }
            }
        }
        user.join().unwrap();
        if evicted {
            assert!(index.lookup(0).is_none());
            assert!(!pte.load(Ordering::Acquire), "evicted folio still mapped");
        }
    });
}
