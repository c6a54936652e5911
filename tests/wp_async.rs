//! Asynchronous dirty tracking (`DirtyTracking::Async`): mapped writes to
//! clean pages are resolved by the kernel (no write-protect userfault) and
//! become dirty folios when harvested; none may be lost to fsync, munmap,
//! close or reclaim.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{tempdir, watchdog, Rng};
use upcache::{DirtyTracking, Error, PageCache, Share, UffdMode, PAGE_SIZE};

fn async_cache(limit: Option<u64>) -> PageCache {
    let mut b = PageCache::builder().dirty_tracking(DirtyTracking::Async);
    if let Some(l) = limit {
        b = b.memory_limit(l);
    }
    let cache = b.build();
    cache
        .start_fault_engine()
        .expect("userfaultfd must be available (see README): this test cannot run without it");
    cache
}

fn page_of(tag: u64, index: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    for (i, c) in p.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(tag ^ (index << 20) ^ i as u64).to_le_bytes());
    }
    p
}

fn disk_page(path: &std::path::Path, index: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut p = vec![0u8; PAGE_SIZE];
    f.read_exact_at(&mut p, index * PAGE_SIZE as u64).unwrap();
    p
}

#[test]
fn mapped_writes_reach_the_file_through_fsync_munmap_and_close() {
    watchdog("async basic", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        let pages = 256u64;
        std::fs::write(&path, vec![0u8; pages as usize * PAGE_SIZE]).unwrap();
        let cache = async_cache(None);
        let file = cache.open(&path).unwrap();
        let map = file.mmap_raw(0, pages as usize * PAGE_SIZE).unwrap();
        assert_eq!(map.vma().mode(), UffdMode::Minor, "Async implies Minor mode");

        // Round 1: first writes to clean pages, then fsync.
        for i in 0..pages {
            map.write(i as usize * PAGE_SIZE, &page_of(1, i));
        }
        file.fsync().unwrap();
        for i in 0..pages {
            assert!(
                disk_page(&path, i) == page_of(1, i),
                "round 1: page {i} not on disk after fsync"
            );
        }
        let s = file.stats();
        assert_eq!(s.faults_wp, 0, "no write-protect userfault in Async mode: {s}");
        assert!(s.harvested_bytes >= pages * PAGE_SIZE as u64, "{s}");
        assert_eq!(s.dirty_bytes, 0, "{s}");

        // Round 2: the same pages again (they were write-protected by the
        // harvest and by writeback): fsync must see the second writes.
        for i in (0..pages).step_by(3) {
            map.write(i as usize * PAGE_SIZE, &page_of(2, i));
        }
        file.fsync().unwrap();
        for i in (0..pages).step_by(3) {
            assert!(
                disk_page(&path, i) == page_of(2, i),
                "round 2: page {i} not on disk after fsync"
            );
        }

        // Round 3: write, drop the mapping without flushing, close: the
        // mapping's last harvest must have dirtied them.
        for i in (1..pages).step_by(5) {
            map.write(i as usize * PAGE_SIZE, &page_of(3, i));
        }
        drop(map);
        file.close().unwrap();
        drop(file);
        drop(cache);
        for i in (1..pages).step_by(5) {
            assert!(
                disk_page(&path, i) == page_of(3, i),
                "round 3: page {i} lost after munmap + close"
            );
        }
    });
}

#[test]
fn flush_and_sync_all_harvest_too() {
    watchdog("async flush", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 64 * PAGE_SIZE]).unwrap();
        let cache = async_cache(None);
        let file = cache.open(&path).unwrap();
        let map = file.mmap_raw(0, 64 * PAGE_SIZE).unwrap();
        map.write(5 * PAGE_SIZE, &page_of(7, 5));
        map.flush_range(5 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert!(disk_page(&path, 5) == page_of(7, 5), "flush_range");
        map.write(9 * PAGE_SIZE, &page_of(8, 9));
        cache.sync_all().unwrap();
        assert!(disk_page(&path, 9) == page_of(8, 9), "sync_all");
        map.write(11 * PAGE_SIZE, &page_of(9, 11));
        map.flush().unwrap();
        assert!(disk_page(&path, 11) == page_of(9, 11), "flush");
    });
}

#[test]
fn freeze_and_missing_mode_are_refused_with_clear_errors() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; 4 * PAGE_SIZE]).unwrap();
    let cache = async_cache(None);
    match cache.freeze() {
        Err(e @ Error::Unsupported { .. }) => {
            assert_eq!(e.raw_os_error(), libc::EOPNOTSUPP);
            assert!(e.to_string().contains("DirtyTracking::WriteFault"), "{e}");
        }
        other => panic!("freeze with Async tracking: {other:?}"),
    }
    assert!(!cache.is_frozen());
    let file = cache.open(&path).unwrap();
    // SAFETY: the mapping is never dereferenced.
    let r = unsafe { file.mmap_mut_with_mode(0, 4 * PAGE_SIZE, Share::Shared, UffdMode::Missing) };
    match r {
        Err(e @ Error::InvalidArgument { .. }) => assert!(e.to_string().contains("Minor"), "{e}"),
        other => panic!("Missing-mode shared-writable mapping with Async tracking: {other:?}"),
    }
    // Read-only and private mappings track no writes: allowed in any mode.
    // SAFETY: as above.
    unsafe { file.mmap_with_mode(0, 4 * PAGE_SIZE, Share::Shared, UffdMode::Missing) }.unwrap();
}

/// Two writers store through one shared mapping (disjoint pages, last
/// value per page known) while a reader streams the file with `read_at`
/// under a limit of 1/16 of it: reclaim evicts mapped, written folios all
/// the time. Every last write must be on disk after fsync.
#[test]
fn reclaim_never_drops_mapped_writes_it_has_not_seen() {
    watchdog("async reclaim", 240, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        let pages = 1024u64; // 4 MiB
        std::fs::write(&path, vec![0u8; pages as usize * PAGE_SIZE]).unwrap();
        let cache = Arc::new(async_cache(Some(256 * 1024)));
        let file = Arc::new(cache.open(&path).unwrap());
        let map = Arc::new(file.mmap_raw(0, pages as usize * PAGE_SIZE).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (file, stop) = (file.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    for off in (0..pages * PAGE_SIZE as u64).step_by(buf.len()) {
                        file.read_at(&mut buf, off).unwrap();
                    }
                }
            })
        };
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let map = map.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng::new(100 + w);
                    let mut last = vec![0u64; pages as usize];
                    for round in 1..=6000u64 {
                        let i = rng.below(pages / 2) * 2 + w;
                        map.write(i as usize * PAGE_SIZE, &page_of(round, i));
                        last[i as usize] = round;
                    }
                    last
                })
            })
            .collect();
        let lasts: Vec<Vec<u64>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        file.fsync().unwrap();
        let s = cache.stats();
        assert!(s.evicted_bytes > 0, "reclaim must have run: {s}");
        for i in 0..pages {
            let round = lasts[(i % 2) as usize][i as usize];
            let want = if round == 0 {
                vec![0u8; PAGE_SIZE]
            } else {
                page_of(round, i)
            };
            assert!(
                disk_page(&path, i) == want,
                "page {i}: last write (round {round}) lost; {s}"
            );
        }
        drop(map);
    });
}

/// One thread writes a page and fsyncs, then checks the disk; another
/// harvests all the time (`flush_async`, the flusher's path). A harvest
/// that re-protected the page must not let the fsync return before the
/// folio is dirty and written.
#[test]
fn fsync_is_not_overtaken_by_a_concurrent_harvest() {
    watchdog("async fsync vs harvest", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        let pages = 16u64;
        std::fs::write(&path, vec![0u8; pages as usize * PAGE_SIZE]).unwrap();
        let cache = async_cache(None);
        let file = Arc::new(cache.open(&path).unwrap());
        let map = Arc::new(file.mmap_raw(0, pages as usize * PAGE_SIZE).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let harvester = {
            let (map, stop) = (map.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    map.flush_async().unwrap();
                }
            })
        };
        for round in 1..=2000u64 {
            let i = round % pages;
            map.write(i as usize * PAGE_SIZE, &page_of(round, i));
            file.fsync().unwrap();
            assert!(
                disk_page(&path, i) == page_of(round, i),
                "round {round}: page {i} not on disk after fsync returned"
            );
        }
        stop.store(true, Ordering::Relaxed);
        harvester.join().unwrap();
    });
}

/// Found by fsx in the `Async` configuration: truncate removed a clean
/// large folio straddling the new end, dropping a mapped write below the
/// end that no harvest had seen. The folio must be kept (tail zeroed).
#[test]
fn truncate_inside_a_large_folio_keeps_unharvested_mapped_writes_below_the_end() {
    watchdog("async truncate", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 64 * PAGE_SIZE]).unwrap();
        let cache = async_cache(None);
        let file = cache.open(&path).unwrap();
        // Readahead brings pages 0.. in as large folios.
        let mut b = vec![0u8; 64 * 1024];
        file.read_at(&mut b, 0).unwrap();
        let map = file.mmap_raw(0, 64 * PAGE_SIZE).unwrap();
        let data = page_of(5, 5);
        map.write(5 * PAGE_SIZE, &data);
        let end = 5 * PAGE_SIZE as u64 + 100;
        file.truncate(end).unwrap();
        let mut got = vec![0u8; 100];
        file.read_at(&mut got, 5 * PAGE_SIZE as u64).unwrap();
        assert!(
            got[..] == data[..100],
            "mapped write below the new end lost by truncate"
        );
        drop(map);
        file.fsync().unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert_eq!(disk.len() as u64, end);
        assert!(disk[5 * PAGE_SIZE..] == data[..100], "not on disk after fsync");
    });
}

/// An `mlock`ed mapping refuses `MADV_DONTNEED`; eviction ignored that once
/// and punched a folio still mapped writable, so a store after the check
/// was lost, and then kept such folios. Since the seventeenth session zaps
/// use `MADV_DONTNEED_LOCKED`, which a locked mapping does not refuse (the
/// kernel's own truncate zaps locked mappings too): eviction zaps and
/// evicts, and no write is lost.
#[test]
fn eviction_zaps_an_mlocked_async_mapping_and_loses_no_write() {
    watchdog("async mlock", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        let pages = 16usize;
        std::fs::write(&path, vec![0u8; pages * PAGE_SIZE]).unwrap();
        let cache = async_cache(None);
        let file = cache.open(&path).unwrap();
        let map = file.mmap_raw(0, pages * PAGE_SIZE).unwrap();
        map.write(0, &page_of(1, 0));
        file.fsync().unwrap();
        // SAFETY: mlock changes only residency of our own live mapping.
        let r = unsafe { libc::mlock(map.as_ptr() as *const _, pages * PAGE_SIZE) };
        assert_eq!(
            r,
            0,
            "mlock of 64 KiB failed ({}): this test needs RLIMIT_MEMLOCK >= 64 KiB",
            std::io::Error::last_os_error()
        );
        file.advise(upcache::Advice::DontNeed, 0, (pages * PAGE_SIZE) as u64)
            .unwrap();
        let s = file.stats();
        assert!(s.evicted_bytes > 0, "the locked mapping was not zapped: {s}");
        map.write(3 * PAGE_SIZE, &page_of(2, 3));
        let mut b = vec![0u8; PAGE_SIZE];
        map.read(0, &mut b);
        assert!(b == page_of(1, 0), "the evicted page reads back through the mapping");
        // SAFETY: as above.
        unsafe { libc::munlock(map.as_ptr() as *const _, pages * PAGE_SIZE) };
        file.fsync().unwrap();
        assert!(disk_page(&path, 0) == page_of(1, 0));
        assert!(
            disk_page(&path, 3) == page_of(2, 3),
            "a write after the eviction was lost"
        );
    });
}

/// Found in review: dropping a mapping drained what it left pending in
/// integrity mode, waiting for each busy folio's lock — a thread holding a
/// `PageMut` of a page the mapping wrote, and waiting for the dropping
/// thread, deadlocked with it. Dropping a mapping never waits for a folio
/// lock now; the write still reaches the file at the next fsync.
#[test]
fn dropping_a_mapping_never_waits_for_a_page_mut_holder() {
    watchdog("async munmap vs PageMut", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 8 * PAGE_SIZE]).unwrap();
        let cache = async_cache(None);
        let file = cache.open(&path).unwrap();
        let map = file.mmap_raw(0, 8 * PAGE_SIZE).unwrap();
        map.write(2 * PAGE_SIZE, &page_of(5, 2));
        // SAFETY: no mapping writes page 2 while the guard lives (the
        // mapping is only dropped meanwhile).
        let guard = unsafe { file.get_page_mut(2) }.unwrap();
        std::thread::spawn(move || drop(map)).join().unwrap();
        drop(guard);
        file.fsync().unwrap();
        assert!(disk_page(&path, 2) == page_of(5, 2), "the mapped write was lost");
    });
}

/// Found in review: a new async mapping joined `i_mmap` before its range
/// was registered, so a concurrent harvest's `PAGEMAP_SCAN` could fail
/// with EPERM and an fsync with it. fsync must never fail because another
/// thread is mapping the file.
#[test]
fn fsync_never_fails_while_another_thread_maps_the_file() {
    watchdog("async fsync vs mmap", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 16 * PAGE_SIZE]).unwrap();
        let cache = async_cache(None);
        let file = Arc::new(cache.open(&path).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let mapper = {
            let (file, stop) = (file.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 200 {
                    let m = file.mmap_raw(0, 16 * PAGE_SIZE).unwrap();
                    m.write((n % 16) as usize * PAGE_SIZE, &[n as u8; 8]);
                    drop(m);
                    n += 1;
                }
                n
            })
        };
        for i in 0..20_000 {
            if let Err(e) = file.fsync() {
                panic!("fsync {i} failed while another thread maps the file: {e}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        let n = mapper.join().unwrap();
        assert!(n >= 200);
    });
}
