//! Loom model of large folios' past-end-of-file poison (`src/mmap.rs`,
//! `poison_past_eof` and `unpoison_growth`) on the crate's real code: a
//! real `AddressSpace` whose folios are all of order 1 (two pages, the
//! models' stand-in for 2 MiB), its real `read_at` (readahead creating the
//! folio that reaches past end of file, which poisons its page there) and
//! its real `write_at` growing the file through another folio (which
//! clears poison below the new end). Only the `Missing`-mode mapping's
//! page table is modelled: a set of poisoned pages, changed under the real
//! `i_mmap` lock as the real poison and zap are.
//!
//! - a write that grows the file, racing the readahead of the folio that
//!   held the old end, never leaves a page below the new end poisoned
//!   (the poisoner reads the size again after poisoning, and the grower
//!   holds the old end's folio locked while it clears);
//! - the page past the end stays poisoned when nothing grows the file.
//!
//! Planted bug it kills (patch in `tests/mutants/`): `poison_past_eof`
//! without the second read of the size.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use upcache::loom_support::{
    address_space_min_order, filemap_map_pages, on_punch, on_unmap, set_async_mapping, set_poison_table, MemStore,
};
use upcache::PAGE_SIZE;

const P: u64 = PAGE_SIZE as u64;

/// Poisoned file pages of the modelled mapping.
type Table = Arc<Mutex<Vec<bool>>>;

fn poisoned_table(m: &upcache::aops::AddressSpace) -> Table {
    let t: Table = Arc::new(Mutex::new(vec![false; 8]));
    let (tp, tu) = (t.clone(), t.clone());
    set_poison_table(
        m,
        move |pos, len| {
            for p in pos / P..(pos + len) / P {
                tp.lock().unwrap()[p as usize] = true;
            }
        },
        move |pos, len| {
            for p in pos / P..((pos + len) / P).min(8) {
                tu.lock().unwrap()[p as usize] = false;
            }
        },
    );
    t
}

#[test]
fn growth_racing_the_readahead_of_the_old_end_leaves_no_poison_below_the_new_end() {
    let mut b = loom::model::Builder::new();
    b.max_branches = 20_000;
    b.check(|| {
        // Pages 0..2 and 10 bytes of page 2: the folio [2, 4) reaches past
        // the end (page 3).
        let store = std::sync::Arc::new(MemStore::filled(2 * PAGE_SIZE + 10, 7));
        let m = address_space_min_order(store, 1);
        let table = poisoned_table(&m);
        let reader = {
            let m = m.clone();
            thread::spawn(move || {
                let mut b = [0u8; 1];
                assert_eq!(m.read_at(&mut b, 2 * P).unwrap(), 1);
                assert_eq!(b[0], 7);
            })
        };
        // Grows the file to 4 pages + 1 byte through the folio [4, 6).
        m.write_at(&[9], 4 * P).unwrap();
        reader.join().unwrap();
        let eof_pages = m.size().div_ceil(P);
        assert_eq!(eof_pages, 5);
        let t = table.lock().unwrap();
        for p in 0..eof_pages {
            assert!(
                !t[p as usize],
                "page {p} below the end ({eof_pages} pages) left poisoned: {t:?}"
            );
        }
        assert!(
            t[5],
            "page 5, past the new end inside the written folio, is poisoned: {t:?}"
        );
    });
}

#[test]
fn the_page_past_the_end_of_a_large_folio_is_poisoned() {
    loom::model(|| {
        let store = std::sync::Arc::new(MemStore::filled(2 * PAGE_SIZE + 10, 7));
        let m = address_space_min_order(store, 1);
        let table = poisoned_table(&m);
        let mut b = [0u8; 1];
        assert_eq!(m.read_at(&mut b, 2 * P).unwrap(), 1);
        let t = table.lock().unwrap();
        assert_eq!(t[..4], [false, false, false, true], "{t:?}");
    });
}

/// `map_pages` racing a truncate that keeps the large folio straddling the
/// new end (a file with async-tracked mappings keeps it, its tail zeroed):
/// no page past the new end may stay mapped once truncate returns. The
/// mapper reads the size before it locks the folio; the truncate zaps the
/// pages past the end before it locks the folio. So the mapper must read
/// the size again under the folio lock, and the truncate must zap again
/// with the kept folio locked (the kernel's second `unmap_mapping_range`).
#[test]
fn map_pages_vs_truncate_keeping_the_folio_maps_nothing_past_the_end() {
    loom::model(|| {
        let store = std::sync::Arc::new(MemStore::filled(2 * PAGE_SIZE, 7));
        let m = address_space_min_order(store, 1);
        // An async-tracked mapping that saw no writes: truncate keeps the
        // straddling folio.
        set_async_mapping(&m, |_| Vec::new(), |_, _| {});
        // The modelled PTE of page 1 (past the new end).
        let pte1 = Arc::new(AtomicBool::new(false));
        {
            let pte1 = pte1.clone();
            on_unmap(&m, move |pos, len| {
                if pos <= P && P < pos + len {
                    pte1.store(false, Ordering::Release);
                }
            });
        }
        {
            let pte1 = pte1.clone();
            on_punch(&m, move |pos, len| {
                if pos <= P && P < pos + len {
                    pte1.store(false, Ordering::Release);
                }
            });
        }
        let mut b = [0u8; 1];
        assert_eq!(m.read_at(&mut b, 0).unwrap(), 1);
        let mapper = {
            let (m, pte1) = (m.clone(), pte1.clone());
            thread::spawn(move || {
                filemap_map_pages(&m, 0..2, false, &mut |run, _, _| {
                    if run.contains(&1) {
                        pte1.store(true, Ordering::Release);
                    }
                });
            })
        };
        m.truncate(P).unwrap();
        mapper.join().unwrap();
        assert!(
            !pte1.load(Ordering::Acquire),
            "page 1 is past the end (1 page) but still mapped after truncate returned"
        );
    });
}
