//! Loom models of the eviction wait (`address_space::Eviction`, the
//! kernel's `I_FREEING` and `__wait_on_freeing_inode`) on the crate's real
//! code: a real `AddressSpace` whose last drop writes back its dirty page,
//! the real file-table half of `open` (`cache::open_in_table`) and the real
//! `sync_all` over the cache's list of address spaces.
//!
//! - an open racing the last user's drop returns either the live address
//!   space or, once the drop has written back, a new one that reads the
//!   written byte; the dying one never writes over what the new one
//!   wrote and synced;
//! - `sync_all` racing the last user's drop returns only once the drop's
//!   write is in the store;
//! - two opens of one name racing share one address space, built once:
//!   the build runs outside the table's lock under a reservation (the
//!   kernel's `I_NEW`) that the other open waits for.
//!
//! Planted bugs they kill (patches in `tests/mutants/`): the eviction
//! signal sent before the drop's write-back; a waiter that parks without
//! re-checking the flag (a lost wake-up, which loom reports as a
//! deadlock); an open that builds without reserving its key (mutant 150).
#![cfg(loom)]

use loom::thread;
use upcache::loom_support::{address_space, Files, MemStore, Spaces};
use upcache::PAGE_SIZE;

/// `loom::model` with room for the drop's write-back path (the default of
/// 1,000 branches per execution is too few).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 20_000;
    b.check(f);
}

/// A one-page file of zeros whose cached page holds 7, dirty.
fn dirty_space() -> (std::sync::Arc<MemStore>, std::sync::Arc<upcache::aops::AddressSpace>) {
    let store = std::sync::Arc::new(MemStore::filled(PAGE_SIZE, 0));
    let m = address_space(store.clone());
    assert_eq!(m.write_at(&[7], 0).unwrap(), 1);
    (store, m)
}

#[test]
fn real_open_vs_the_last_drop_never_sees_old_data_nor_loses_a_write() {
    model(|| {
        let (store, m) = dirty_space();
        let files = Files::default();
        let first = files.open("f", || m.clone());
        assert!(std::sync::Arc::ptr_eq(&first, &m));
        drop(first);
        // The last user goes: its drop writes 7 back, then signals.
        let last = thread::spawn(move || drop(m));
        let s = store.clone();
        let m2 = files.open("f", move || address_space(s));
        let mut b = [0u8; 1];
        assert_eq!(m2.read_at(&mut b, 0).unwrap(), 1);
        assert_eq!(b[0], 7, "a reopen read the store before the last drop's write-back");
        assert_eq!(m2.write_at(&[9], 0).unwrap(), 1);
        m2.write_and_wait_range(0, u64::MAX).unwrap();
        drop(m2);
        last.join().unwrap();
        assert_eq!(
            store.contents()[0],
            9,
            "the dying address space wrote over a newer, synced write"
        );
    });
}

#[test]
fn real_sync_all_vs_the_last_drop_returns_with_the_write_in_the_store() {
    model(|| {
        let (store, m) = dirty_space();
        let spaces = Spaces::default();
        spaces.register(&m);
        let last = thread::spawn(move || drop(m));
        spaces.sync_all().unwrap();
        assert_eq!(
            store.contents()[0],
            7,
            "sync_all returned before the last drop's write-back"
        );
        last.join().unwrap();
    });
}

#[test]
fn real_concurrent_opens_share_one_address_space() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    model(|| {
        let store = Arc::new(MemStore::filled(PAGE_SIZE, 0));
        let files = Arc::new(Files::default());
        let built = Arc::new(AtomicUsize::new(0));
        let (f2, s2, b2) = (files.clone(), store.clone(), built.clone());
        let other = thread::spawn(move || {
            f2.open("f", move || {
                b2.fetch_add(1, SeqCst);
                address_space(s2)
            })
        });
        let b1 = built.clone();
        let mine = files.open("f", move || {
            b1.fetch_add(1, SeqCst);
            address_space(store)
        });
        let theirs = other.join().unwrap();
        assert!(
            Arc::ptr_eq(&mine, &theirs),
            "two opens of one name built two address spaces (two incoherent copies)"
        );
        assert_eq!(built.load(SeqCst), 1, "the losing open built an address space too");
    });
}
