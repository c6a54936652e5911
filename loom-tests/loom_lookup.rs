//! Loom model: the lockless lookup (epoch + refcount try-get + re-check)
//! against removal, reference draining, "punching" the memory and reuse of
//! the slot by a new folio. A lookup never returns a freed or foreign folio,
//! and never sees a folio's memory punched while it holds a reference.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::Arc;
use loom::thread;
use upcache::loom_support::{alloc_folio, mapping_id, wait_refs_drained, Index};

/// What the memory at the slot's file offset holds: the first folio's
/// bytes, a hole, or the second folio's bytes.
const OLD: u32 = 11;
const HOLE: u32 = 0;
const NEW: u32 = 22;

#[test]
fn lookup_vs_removal_and_slot_reuse() {
    loom::model(|| {
        let index = Arc::new(Index::default());
        let memory = Arc::new(AtomicU32::new(OLD));
        let g = alloc_folio(1, 0);
        assert!(index.add(&g));
        drop(g); // unlock, drop the creator's reference: the index's remains

        let reader = {
            let index = index.clone();
            let memory = memory.clone();
            thread::spawn(move || {
                if let Some(f) = index.lookup(0) {
                    assert!(f.ref_count() >= 1, "returned a folio with no reference");
                    assert_eq!(f.index().0, 0, "foreign folio");
                    // "Copy the data": it must be this folio's, never a hole.
                    let m = memory.load(Ordering::Acquire);
                    match mapping_id(&f) {
                        // The first folio, live or already removed: its
                        // memory is not punched while we hold a reference.
                        1 | 0 => assert_eq!(m, OLD, "memory punched under a reader"),
                        2 => assert_eq!(m, NEW),
                        other => panic!("foreign mapping {other}"),
                    }
                }
            })
        };

        // The remover: truncate's protocol, then the slot is reused.
        let old = index.lookup(0).expect("present");
        let g = old.lock();
        index.remove(&g);
        let old = g.unlock();
        wait_refs_drained(&old);
        memory.store(HOLE, Ordering::Release);
        drop(old);
        memory.store(NEW, Ordering::Release);
        let g2 = alloc_folio(2, 0);
        assert!(index.add(&g2));
        drop(g2);

        reader.join().unwrap();
        let f = index.lookup(0).expect("new folio indexed");
        assert_eq!(mapping_id(&f), 2);
    });
}
