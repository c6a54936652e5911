//! The B+tree example (`examples/btree.rs`) at small size: every key and
//! 100-row scans verified, then verified again after reopening the file in
//! a cache with a memory limit of a quarter of it.

mod common;

#[path = "../examples/btree.rs"]
#[allow(dead_code)]
mod btree;

use common::{tempdir, watchdog};

#[test]
fn btree_example_verifies_before_and_after_reopen() {
    watchdog("btree example", 120, || {
        let dir = tempdir();
        let report = btree::run(dir.path(), 20_000).unwrap();
        eprintln!("{report}");
    });
}

/// The same tree code over a plain byte slice (how the benchmark drives the
/// mapping sides) agrees with a sorted model, key by key and scan by scan.
#[test]
fn btree_over_a_slice_matches_a_model() {
    let keys = 5_000u64;
    let mut mem = vec![0u8; btree::capacity_pages(keys) as usize * upcache::PAGE_SIZE];
    let mut pages: &mut [u8] = &mut mem;
    btree::format(&mut pages);
    for i in 0..keys {
        let k = btree::key_at(i, keys);
        btree::insert(&mut pages, k, btree::value_of(k));
    }
    // Updates keep one entry per key.
    for k in (0..keys).step_by(7) {
        btree::insert(&mut pages, k * 3, 42);
    }
    let view: &[u8] = &mem;
    let mut out = Vec::new();
    for k in 0..keys {
        let want = if k % 7 == 0 { 42 } else { btree::value_of(k * 3) };
        assert_eq!(btree::get(view, k * 3), Some(want), "key {}", k * 3);
        assert_eq!(btree::get(view, k * 3 + 2), None);
    }
    btree::scan(view, 0, usize::MAX, &mut out);
    assert_eq!(out.len(), keys as usize, "a full scan sees every key once");
    assert!(out.windows(2).all(|w| w[0].0 < w[1].0), "a scan is in key order");
}
