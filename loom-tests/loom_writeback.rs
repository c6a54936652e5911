//! Loom model: dirty vs writeback. A write that lands while the folio is
//! being written back is never lost: at the end the folio is dirty again
//! or the store holds the new data. Also: a truncate-style waiter that
//! waits for writeback under the folio lock sees it end.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::Arc;
use loom::thread;
use upcache::loom_support::{alloc_folio, end_writeback, set_writeback, test_clear_dirty, test_set_dirty};

#[test]
fn write_during_writeback_is_never_lost() {
    loom::model(|| {
        // Folio holds version 1, dirty; the store holds version 0.
        let g = alloc_folio(1, 0);
        let data = Arc::new(AtomicU32::new(1));
        let store = Arc::new(AtomicU32::new(0));
        assert!(test_set_dirty(&g));
        let folio = g.unlock();

        let writer = {
            let f = folio.clone();
            let data = data.clone();
            thread::spawn(move || {
                // write_begin/write_end: under the folio lock, copy, dirty.
                let g = f.lock();
                data.store(2, Ordering::Relaxed);
                test_set_dirty(&g);
                drop(g);
            })
        };

        // write_cache_pages + writepage.
        let g = folio.clone().lock();
        if test_clear_dirty(&g) {
            set_writeback(&g);
            let f = g.unlock();
            // The I/O: copies whatever the folio holds now.
            let v = data.load(Ordering::Relaxed);
            store.store(v, Ordering::Relaxed);
            end_writeback(&f);
        } else {
            drop(g);
        }

        writer.join().unwrap();
        let g = folio.clone().lock();
        let dirty = g.is_dirty();
        assert!(
            dirty || store.load(Ordering::Relaxed) == 2,
            "lost write: clean folio but the store has {}",
            store.load(Ordering::Relaxed)
        );
        assert!(!g.is_writeback());
    });
}

#[test]
fn truncate_waits_for_writeback_under_the_folio_lock() {
    loom::model(|| {
        let g = alloc_folio(1, 0);
        assert!(test_set_dirty(&g));
        let folio = g.unlock();
        let store = Arc::new(AtomicU32::new(0));
        let flusher = {
            let f = folio.clone();
            let store = store.clone();
            thread::spawn(move || {
                let g = f.lock();
                if test_clear_dirty(&g) {
                    set_writeback(&g);
                    let f = g.unlock();
                    store.store(1, Ordering::Relaxed);
                    end_writeback(&f);
                }
            })
        };
        // Truncate: lock, wait for writeback, then drop the folio. The I/O
        // may not still be running once we proceed.
        let g = folio.clone().lock();
        g.wait_writeback();
        assert!(!g.is_writeback());
        let was_dirty = g.is_dirty();
        let written = store.load(Ordering::Relaxed) == 1;
        // Either the flusher finished its write, or it never started it
        // (the folio is still dirty and the flusher will find it locked).
        assert!(written || was_dirty);
        drop(g);
        flusher.join().unwrap();
    });
}

#[test]
fn flusher_vs_truncate_never_writes_a_truncated_folio() {
    use upcache::loom_support::{mapping_id, wait_refs_drained, Index};
    loom::model(|| {
        let index = Arc::new(Index::default());
        let g = alloc_folio(1, 0);
        assert!(test_set_dirty(&g));
        assert!(index.add(&g));
        drop(g);
        // The file's bytes on disk for this folio: 0 = truncated away.
        let store = Arc::new(AtomicU32::new(9));

        let flusher = {
            let (index, store) = (index.clone(), store.clone());
            thread::spawn(move || {
                // write_cache_pages: look up, lock, re-check it is still in
                // the file, clear dirty, start writeback, unlock, write.
                if let Some(f) = index.lookup(0) {
                    let g = f.lock();
                    if mapping_id(&g) == 1 && test_clear_dirty(&g) {
                        set_writeback(&g);
                        let f = g.unlock();
                        store.store(1, Ordering::Release);
                        end_writeback(&f);
                    }
                }
            })
        };

        // truncate(0): lock, wait for writeback, remove, unlock, drain, and
        // only then cut the store.
        if let Some(f) = index.lookup(0) {
            let g = f.lock();
            g.wait_writeback();
            index.remove(&g);
            let f = g.unlock();
            wait_refs_drained(&f);
        }
        store.store(0, Ordering::Release);
        flusher.join().unwrap();
        assert_eq!(
            store.load(Ordering::Acquire),
            0,
            "flusher wrote a folio truncate had dropped"
        );
    });
}

/// An integrity sync without a handle's error cursor (`sync_all`,
/// `freeze`, a mapping's `flush`) vs a background writeback of the same
/// folio whose store write fails: the sync either wrote the data itself or
/// reports the error. The background writeback may start before the sync
/// tags the folio (then the sync skips it and only waits for it), and its
/// failure redirties the folio: before `sync_range_checked` looked at the
/// error word, the sync returned Ok with the data not in the store.
#[test]
fn real_sync_vs_a_failing_background_writeback_reports_or_writes() {
    loom::model(|| {
        let store = std::sync::Arc::new(upcache::loom_support::MemStore::filled(upcache::PAGE_SIZE, 0));
        let m = upcache::loom_support::address_space(store.clone());
        assert_eq!(m.write_at(&[7], 0).unwrap(), 1);
        store.fail_next_write();
        let bg = {
            let m = m.clone();
            loom::thread::spawn(move || {
                let mut wbc = upcache::aops::WritebackControl::none(i64::MAX);
                wbc.for_background = true;
                let _ = m.writepages(&mut wbc);
            })
        };
        let r = m.sync_range_checked(0, u64::MAX);
        bg.join().unwrap();
        assert!(
            r.is_err() || store.contents()[0] == 7,
            "the sync returned Ok but the data is not in the store"
        );
    });
}

/// Reclaim's eviction racing a writeback that fails: the eviction checks
/// DIRTY and WRITEBACK with the folio locked, but the writeback holds no
/// lock — it may fail, redirty the folio and end after those checks, then
/// drop its reference just before the eviction freezes the count. The
/// eviction must look again after the freeze: before, it punched the
/// folio whose write had just failed, and the data was gone (neither
/// cached nor in the store).
#[test]
fn real_evict_vs_a_failing_writeback_never_discards_the_data() {
    loom::model(|| {
        let store = std::sync::Arc::new(upcache::loom_support::MemStore::filled(upcache::PAGE_SIZE, 0));
        let m = upcache::loom_support::address_space(store.clone());
        assert_eq!(m.write_at(&[7], 0).unwrap(), 1);
        store.fail_next_write();
        let wb = {
            let m = m.clone();
            loom::thread::spawn(move || {
                let mut wbc = upcache::aops::WritebackControl::none(i64::MAX);
                wbc.for_background = true;
                let _ = m.writepages(&mut wbc);
            })
        };
        let evicted = upcache::loom_support::evict_folio(&m, 0);
        wb.join().unwrap();
        assert!(
            !evicted,
            "a folio whose write failed was evicted (store holds {})",
            store.contents()[0]
        );
    });
}
