//! Large folios (`PageCacheBuilder::large_folios`): every folio is a
//! naturally aligned 2 MiB block; reclaim, truncate and hole punches work
//! at that granularity and never lose or expose bytes; with shmem THP on
//! (set here for one test, as root, and restored) the page store's pages
//! are 2 MiB huge pages and `Missing`-mode mappings map them with PMDs.

mod common;

use std::sync::Arc;

use common::thp::{shmem_pmd_mapped_kib, ShmemThp};
use common::{tempdir, watchdog, Rng};
use upcache::{PageCache, Share, UffdMode, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const FOLIO: u64 = 2 * MIB;

fn large(limit: Option<u64>, mode: UffdMode) -> PageCache {
    let mut b = PageCache::builder().large_folios(true).mmap_mode(mode);
    if let Some(l) = limit {
        b = b.memory_limit(l);
    }
    let cache = b.build();
    cache
        .start_fault_engine()
        .expect("userfaultfd must be available (see README): this test cannot run without it");
    cache
}

#[test]
fn a_miss_caches_the_whole_aligned_2mib_folio() {
    let dir = tempdir();
    let path = dir.path().join("f");
    let size = 5 * MIB + 100;
    let mut init = vec![0u8; size as usize];
    Rng::new(1).fill(&mut init);
    std::fs::write(&path, &init).unwrap();
    let cache = large(None, UffdMode::Missing);
    let file = cache.open(&path).unwrap();
    file.advise(upcache::Advice::Random, 0, 0).unwrap();
    let mut b = [0u8; 10];
    file.read_at(&mut b, 3 * MIB + 5).unwrap();
    assert_eq!(b[..], init[(3 * MIB + 5) as usize..][..10]);
    let st = file.stats();
    assert_eq!((st.folios, st.bytes_cached), (1, FOLIO), "one 2 MiB folio: {st}");
    // The last folio reaches past end of file; reading it caches 2 MiB
    // and returns only the bytes below the end.
    let mut tail = vec![0u8; 300];
    assert_eq!(file.read_at(&mut tail, 5 * MIB).unwrap(), 100);
    assert_eq!(tail[..100], init[5 * MIB as usize..]);
    let st = file.stats();
    assert_eq!((st.folios, st.bytes_cached), (2, 2 * FOLIO), "{st}");
}

#[test]
fn punch_and_truncate_inside_a_large_folio_zero_and_keep_the_rest() {
    for mode in [UffdMode::Missing, UffdMode::Minor] {
        let dir = tempdir();
        let path = dir.path().join("f");
        let size = 4 * MIB as usize;
        let mut model = vec![0u8; size];
        Rng::new(2).fill(&mut model);
        std::fs::write(&path, &model).unwrap();
        let cache = large(None, mode);
        let file = cache.open(&path).unwrap();
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let mut map = unsafe { file.mmap_mut(0, size, Share::Shared) }.unwrap();
        assert!(map[..] == model[..], "{mode:?}: initial contents");
        map[7 * PAGE_SIZE + 3] = 0x5A;
        model[7 * PAGE_SIZE + 3] = 0x5A;
        // A punch of three pages inside the first folio, one across the
        // folio boundary.
        file.punch_hole(3 * PAGE_SIZE as u64 + 17, 3 * PAGE_SIZE as u64)
            .unwrap();
        model[3 * PAGE_SIZE + 17..6 * PAGE_SIZE + 17].fill(0);
        file.punch_hole(FOLIO - 100, 300).unwrap();
        model[FOLIO as usize - 100..FOLIO as usize + 200].fill(0);
        assert!(map[..] == model[..], "{mode:?}: after punches, through the mapping");
        let mut back = vec![0u8; size];
        file.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{mode:?}: after punches, through read_at");
        // Truncate inside the second folio, then grow back: the cut bytes
        // read as zeros.
        let cut = FOLIO as usize + 5 * PAGE_SIZE + 9;
        file.truncate(cut as u64).unwrap();
        file.truncate(size as u64).unwrap();
        model[cut..].fill(0);
        assert!(
            map[..] == model[..],
            "{mode:?}: after truncate and growth, through the mapping"
        );
        file.fsync().unwrap();
        drop(map);
        drop(file);
        assert!(std::fs::read(&path).unwrap() == model, "{mode:?}: the file on disk");
    }
}

/// Reclaim at 2 MiB granularity under a limit of 8 folios: a file of 20
/// folios written at random through a `Missing`-mode mapping and
/// `write_at`, read back through both, then on disk after fsync.
fn reclaim_scenario(mode: UffdMode, seed: u64) -> PageCache {
    let dir = tempdir();
    let path = dir.path().join("big");
    let size = 20 * FOLIO as usize;
    let mut model = vec![0u8; size];
    Rng::new(seed).fill(&mut model);
    std::fs::write(&path, &model).unwrap();
    let limit = 16 * MIB;
    let cache = large(Some(limit), mode);
    let file = Arc::new(cache.open(&path).unwrap());
    // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
    let mut map = unsafe { file.mmap_mut(0, size, Share::Shared) }.unwrap();
    let mut rng = Rng::new(seed + 1);
    for i in 0..3000 {
        let off = rng.below(size as u64 - 64) as usize;
        let v = (i % 251) as u8 + 1;
        if rng.below(2) == 0 {
            map[off] = v;
        } else {
            file.write_at(&[v; 64], off as u64).unwrap();
            model[off..off + 64].fill(v);
        }
        model[off] = v;
        let check = rng.below(size as u64) as usize;
        assert_eq!(map[check], model[check], "{mode:?}: byte {check} after op {i}");
    }
    // Memory stays within the limit plus one folio in flight per thread.
    assert!(
        cache.stats().bytes_cached <= limit + 2 * FOLIO,
        "{mode:?}: {} bytes cached, limit {limit}",
        cache.stats().bytes_cached
    );
    assert!(cache.stats().evicted_bytes > 0, "{mode:?}: reclaim ran");
    assert!(map[..] == model[..], "{mode:?}: the whole mapping");
    file.fsync().unwrap();
    drop(map);
    assert!(std::fs::read(&path).unwrap() == model, "{mode:?}: the file on disk");
    cache
}

#[test]
fn reclaim_in_2mib_folios_keeps_every_write() {
    for (mode, seed) in [(UffdMode::Missing, 3), (UffdMode::Minor, 4)] {
        watchdog("large-folio reclaim", 300, move || drop(reclaim_scenario(mode, seed)));
    }
}

#[test]
fn with_shmem_thp_on_missing_mode_maps_huge_pages_and_loses_nothing() {
    let Some(thp) = ShmemThp::always() else {
        let msg = "SKIPPED: cannot set /sys/kernel/mm/transparent_hugepage/shmem_enabled (needs root and THP); \
                   the large-folio THP path is NOT tested";
        eprintln!("\n*** {msg} ***\n");
        assert!(std::env::var_os("UPCACHE_REQUIRE_THP").is_none(), "{msg}");
        return;
    };
    // A cache without large folios must not use Missing mode now.
    let small = PageCache::builder().build();
    small.start_fault_engine().unwrap();
    let dir = tempdir();
    let path = dir.path().join("small");
    std::fs::write(&path, vec![1u8; 8 * PAGE_SIZE]).unwrap();
    let f = small.open(&path).unwrap();
    // SAFETY: never dereferenced.
    let m = unsafe { f.mmap(0, 8 * PAGE_SIZE, Share::Shared) }.unwrap();
    assert_eq!(
        m.vma().mode(),
        UffdMode::Minor,
        "default cache falls back to Minor under shmem THP"
    );
    drop(m);
    // SAFETY: never dereferenced.
    let refused = unsafe { f.mmap_with_mode(0, 8 * PAGE_SIZE, Share::Shared, UffdMode::Missing) };
    assert!(
        refused.is_err(),
        "Missing mode refused for small folios under shmem THP"
    );

    // Large folios: huge pages, mapped with PMDs.
    let path = dir.path().join("huge");
    let size = 8 * FOLIO as usize;
    let mut content = vec![0u8; size];
    Rng::new(5).fill(&mut content);
    std::fs::write(&path, &content).unwrap();
    let cache = large(None, UffdMode::Missing);
    let file = cache.open(&path).unwrap();
    let mut back = vec![0u8; size];
    file.read_at(&mut back, 0).unwrap();
    assert!(back == content);
    // The folios are huge pages now; the mapping is made with shmem THP
    // off again (the kernel would not align it then): upcache aligns it.
    drop(thp);
    // SAFETY: the mapping is only read, through short-lived borrows.
    let map = unsafe { file.mmap(0, size, Share::Shared) }.unwrap();
    let before = shmem_pmd_mapped_kib();
    let mut sum = 0u64;
    for o in (0..size).step_by(PAGE_SIZE) {
        assert_eq!(map[o], content[o]);
        sum += map[o] as u64;
    }
    std::hint::black_box(sum);
    let after = shmem_pmd_mapped_kib();
    assert!(
        after >= before + 2048,
        "no PMD mapping of a 2 MiB shmem folio: ShmemPmdMapped {before} -> {after} KiB"
    );
    drop(map);
    // A mapping at a file offset that is not 2 MiB-aligned is placed at an
    // address congruent to it, so the folios after it still map with PMDs.
    // (Its length is not `size - off`: the kernel places a mapping at the
    // top of a free gap, and a gap ending 2 MiB-aligned would then make
    // the start congruent to `off` by chance.)
    let off = 3 * PAGE_SIZE;
    let len = size - off - PAGE_SIZE;
    // SAFETY: the mapping is only read, through short-lived borrows.
    let map = unsafe { file.mmap(off as u64, len, Share::Shared) }.unwrap();
    assert_eq!(
        map.as_ptr() as usize % FOLIO as usize,
        off,
        "mapping address not congruent to its file offset modulo 2 MiB"
    );
    let before = shmem_pmd_mapped_kib();
    for o in (0..len).step_by(PAGE_SIZE) {
        assert_eq!(map[o], content[o + off]);
    }
    assert!(shmem_pmd_mapped_kib() >= before + 2048, "offset mapping got no PMD");
    drop(map);
    drop(file);
    // And the same reclaim, write and truncate work as with 4 KiB pages.
    let _thp = ShmemThp::always().expect("shmem_enabled writable a moment ago");
    drop(reclaim_scenario(UffdMode::Missing, 6));
}

/// Growing a file of large folios locks the folio holding the old end:
/// a thread holding a page guard of it gets `PageHeld` (EDEADLK) before
/// anything changes, not a panic or a hang; so does a `Missing`-mode
/// mapping of the file (its past-EOF walk takes `i_rwsem`).
#[test]
fn growth_and_mmap_under_a_page_guard_of_the_last_folio_fail_cleanly() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![3u8; 3 * PAGE_SIZE]).unwrap();
    let cache = large(None, UffdMode::Missing);
    let file = cache.open(&path).unwrap();
    // SAFETY: nothing maps the file while the guard lives.
    let page = unsafe { file.get_page_mut(0) }.unwrap();
    let held = |r: upcache::Result<()>| matches!(r, Err(upcache::Error::PageHeld { .. }));
    assert!(held(file.truncate(3 * MIB)), "truncate up");
    assert!(
        held(file.write_at(&[1; 10], 5 * MIB).map(drop)),
        "write_at past the end"
    );
    // SAFETY: never dereferenced (refused).
    let mapped = unsafe { file.mmap(0, 4 * PAGE_SIZE, Share::Shared) };
    assert!(held(mapped.map(drop)), "mmap");
    assert_eq!(file.len().unwrap(), 3 * PAGE_SIZE as u64, "nothing changed");
    drop(page);
    file.truncate(3 * MIB).unwrap();
    file.write_at(&[1; 10], 5 * MIB).unwrap();
    assert_eq!(file.len().unwrap(), 5 * MIB + 10);
}
