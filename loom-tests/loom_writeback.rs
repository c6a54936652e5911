//! Loom models of writeback on the crate's real code (a real
//! `AddressSpace` over an in-memory store):
//!
//! - an integrity sync racing a failing background writeback either wrote
//!   the data or reports the error;
//! - reclaim never evicts a folio whose write failed after its checks.
//!
//! (Until 2026-11-27 this file also re-enacted three protocols on the
//! folio primitives with the path written in the test; the real-code
//! models in `loom_filemap.rs` cover them and the copies were removed.)
#![cfg(loom)]

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
