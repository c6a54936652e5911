//! A page cache on the kernel's hugetlbfs pool (`PageCacheBuilder::hugetlb`):
//! 2 MiB folios mapped, protected and poisoned whole; memory taken from the
//! pool when a folio is created, so an empty pool is an error, not a SIGBUS
//! of the engine. Needs root (it sizes `/proc/sys/vm/nr_hugepages` and puts
//! it back); without it the test says so and fails where
//! `UPCACHE_REQUIRE_HUGETLB` is set (CI).

mod common;

use std::os::unix::process::ExitStatusExt;

use common::hugetlb_pool::{meminfo, pool_or_skip};
use common::{kernel_copy_out, run_child, tempdir, watchdog, Rng};
use upcache::{DirtyTracking, Error, PageCache, Share, UffdMode};

const HUGE: usize = 2 << 20;
/// `Shared_Hugetlb` of this process (KiB): hugetlbfs pages mapped shared.
fn shared_hugetlb_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Shared_Hugetlb:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn hugetlb_cache(tracking: DirtyTracking, limit: Option<u64>) -> PageCache {
    let mut b = PageCache::builder().hugetlb(true).dirty_tracking(tracking);
    if let Some(l) = limit {
        b = b.memory_limit(l);
    }
    let cache = b.build();
    cache
        .start_fault_engine()
        .expect("userfaultfd must be available (see README): this test cannot run without it");
    cache
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Rng::new(seed).fill(&mut v);
    v
}

/// Reads, mapped and `write_at` writes, fsync, and the end of file inside
/// the last 2 MiB page, for one dirty-tracking mode.
fn read_write_map_sync(tracking: DirtyTracking) {
    let dir = tempdir();
    let path = dir.path().join("f");
    let size = 5 * HUGE / 2 + 100; // end of file inside the third huge page
    let mut model = random_bytes(7, size);
    std::fs::write(&path, &model).unwrap();
    let cache = hugetlb_cache(tracking, None);
    let file = cache.open(&path).unwrap();

    let mut buf = vec![0u8; 10_000];
    file.read_at(&mut buf, HUGE as u64 - 5000).unwrap();
    assert!(
        buf[..] == model[HUGE - 5000..HUGE + 5000],
        "{tracking:?}: read_at across a folio edge"
    );
    assert_eq!(
        file.memory_bytes() % HUGE as u64,
        0,
        "{tracking:?}: memory in whole huge pages"
    );

    let before = shared_hugetlb_kib();
    let map = file.mmap_raw(0, 3 * HUGE).unwrap();
    assert_eq!(map.vma().mode(), UffdMode::Minor, "hugetlb caches map in Minor mode");
    let mut got = vec![0u8; size];
    map.read(0, &mut got);
    assert!(got == model, "{tracking:?}: the mapping shows the file");
    let s = file.stats();
    assert!(
        s.faults_fast + s.faults_slow <= 3,
        "{tracking:?}: one fault per 2 MiB page at most, got {s}"
    );
    assert!(
        shared_hugetlb_kib() >= before + 4096,
        "{tracking:?}: the mapping maps huge pages (Shared_Hugetlb {} KiB, before {before})",
        shared_hugetlb_kib()
    );
    // Past end of file inside the last huge page: zeros, as on hugetlbfs.
    let mut tail = vec![1u8; 3 * HUGE - size];
    map.read(size, &mut tail);
    assert!(tail.iter().all(|&b| b == 0), "{tracking:?}: zeros past end of file");

    // Writes: mapped at random places, `write_at` across a folio edge.
    let mut rng = Rng::new(11);
    for _ in 0..200 {
        let off = rng.below(size as u64 - 64) as usize;
        let data = random_bytes(rng.next_u64(), 64);
        map.write(off, &data);
        model[off..off + 64].copy_from_slice(&data);
    }
    let data = random_bytes(12, 9000);
    file.write_at(&data, 2 * HUGE as u64 - 4000).unwrap();
    model[2 * HUGE - 4000..2 * HUGE + 5000].copy_from_slice(&data);
    file.fsync().unwrap();
    assert!(
        std::fs::read(&path).unwrap() == model,
        "{tracking:?}: the file after fsync"
    );
    let s = file.stats();
    if tracking == DirtyTracking::Async {
        assert_eq!(s.faults_wp, 0, "async: no write-protect userfault: {s}");
    } else {
        assert!(s.faults_wp <= 3, "one write fault per 2 MiB page at most: {s}");
    }

    // Second round after the write-back: pages are clean and protected
    // again; the next writes must reach the file too.
    for k in 0..3 {
        let off = k * HUGE + 777;
        let data = random_bytes(20 + k as u64, 100);
        map.write(off, &data);
        model[off..off + 100].copy_from_slice(&data);
    }
    drop(map);
    file.fsync().unwrap();
    assert!(
        std::fs::read(&path).unwrap() == model,
        "{tracking:?}: second-round mapped writes after munmap + fsync"
    );
}

/// A mapped write past end of file (allowed inside the last huge page)
/// must not become file data when the file grows over it.
fn growth_zeroes_what_a_mapping_wrote_past_the_end() {
    let dir = tempdir();
    let path = dir.path().join("g");
    let size = HUGE / 2;
    std::fs::write(&path, random_bytes(3, size)).unwrap();
    let cache = hugetlb_cache(DirtyTracking::WriteFault, None);
    let file = cache.open(&path).unwrap();
    let map = file.mmap_raw(0, HUGE).unwrap();
    map.write(size + 8192, &[0xAB; 100]);
    file.write_at(&[1], HUGE as u64 - 1).unwrap(); // grows to the folio's end
    let mut got = vec![0u8; 100];
    file.read_at(&mut got, size as u64 + 8192).unwrap();
    assert!(
        got.iter().all(|&b| b == 0),
        "the grown range reads as zeros, got {:?}",
        &got[..8]
    );
    drop(map);
    file.fsync().unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert!(
        disk[size..HUGE - 1].iter().all(|&b| b == 0),
        "the grown range is zeros on disk"
    );
}

/// Mapped reads and writes through a memory limit below the file: reclaim
/// in 2 MiB pages loses nothing.
fn reclaim_keeps_every_write() {
    let dir = tempdir();
    let path = dir.path().join("r");
    let size = 20 * HUGE;
    let mut model = random_bytes(5, size);
    std::fs::write(&path, &model).unwrap();
    let limit = 8 * HUGE as u64;
    let cache = hugetlb_cache(DirtyTracking::WriteFault, Some(limit));
    let file = cache.open(&path).unwrap();
    let map = file.mmap_raw(0, size).unwrap();
    let mut rng = Rng::new(9);
    for round in 0..3 {
        for k in 0..20 {
            let off = k * HUGE + rng.below((HUGE - 16) as u64) as usize;
            let data = random_bytes(round * 100 + k as u64, 16);
            map.write(off, &data);
            model[off..off + 16].copy_from_slice(&data);
        }
    }
    let mut got = vec![0u8; size];
    map.read(0, &mut got);
    assert!(got == model, "the mapping after reclaim");
    assert!(cache.stats().evicted_bytes > 0, "reclaim ran: {}", cache.stats());
    assert!(
        cache.stats().bytes_cached <= limit + 2 * HUGE as u64,
        "within the limit: {}",
        cache.stats()
    );
    drop(map);
    file.fsync().unwrap();
    assert!(std::fs::read(&path).unwrap() == model, "the file after fsync");
}

/// A private writable mapping's copied pages are its own memory. On
/// hugetlbfs the kernel drops them when the page under them is punched
/// (unlike shmem and ext4, which keep them), and the cache punches to
/// evict: such a mapping lost its writes to `advise(DontNeed)`, reclaim
/// and `punch_hole`. It is refused; a private read-only mapping, which
/// copies nothing, still works.
fn private_writable_mappings_are_refused() {
    let dir = tempdir();
    let path = dir.path().join("p");
    let model = random_bytes(11, 3 * HUGE);
    std::fs::write(&path, &model).unwrap();
    let cache = hugetlb_cache(DirtyTracking::WriteFault, None);
    let file = cache.open(&path).unwrap();
    // SAFETY: never dereferenced (refused).
    let e = unsafe { file.mmap_mut(0, 3 * HUGE, Share::Private) }.unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("private"),
        "a private writable mapping of a hugetlb cache is refused, got {e}"
    );
    // SAFETY: only this thread touches the mapping; nothing writes the file.
    let p = unsafe { file.mmap(0, 3 * HUGE, Share::Private) }.unwrap();
    assert!(p[HUGE - 10..HUGE + 10] == model[HUGE - 10..HUGE + 10]);
    file.advise(upcache::Advice::DontNeed, 0, 3 * HUGE as u64).unwrap();
    file.punch_hole(HUGE as u64, HUGE as u64).unwrap();
    assert!(
        p[HUGE..HUGE + 10] == [0u8; 10],
        "a private read-only mapping follows the file"
    );
    assert!(p[..10] == model[..10]);
}

fn bad_requests_are_errors() {
    let dir = tempdir();
    let path = dir.path().join("b");
    std::fs::write(&path, random_bytes(1, 3 * HUGE)).unwrap();
    let cache = hugetlb_cache(DirtyTracking::WriteFault, None);
    let file = cache.open(&path).unwrap();
    assert!(
        matches!(file.mmap_raw(4096, HUGE), Err(Error::InvalidArgument { .. })),
        "an offset inside a huge page is refused"
    );
    // SAFETY: never dereferenced.
    let missing = unsafe { file.mmap_with_mode(0, HUGE, Share::Shared, UffdMode::Missing) };
    assert!(
        matches!(missing, Err(Error::InvalidArgument { .. })),
        "Missing mode is refused on a hugetlb cache"
    );
}

#[test]
fn hugetlb_page_cache() {
    // The child cases of this binary run inside this test's pool.
    if std::env::var_os("UPCACHE_CHILD").is_some() {
        return;
    }
    let Some(_pool) = pool_or_skip(64) else { return };
    watchdog("hugetlb page cache", 120, || {
        let all_back = |what: &str| {
            assert_eq!(
                meminfo("HugePages_Free:"),
                64,
                "{what}: every huge page is back in the pool once the cache is dropped"
            )
        };
        read_write_map_sync(DirtyTracking::WriteFault);
        all_back("write-fault tracking");
        read_write_map_sync(DirtyTracking::Async);
        all_back("async tracking");
        growth_zeroes_what_a_mapping_wrote_past_the_end();
        all_back("growth");
        reclaim_keeps_every_write();
        all_back("reclaim");
        bad_requests_are_errors();
        all_back("bad requests");
        private_writable_mappings_are_refused();
        all_back("private copies");
        let st = run_child("child_entry", "signals", &[], 120);
        assert!(st.success(), "signals: the child failed: {st:?}");
        for case in ["past_eof", "pool_empty_fault"] {
            let st = run_child("child_entry", case, &[], 120);
            assert_eq!(
                st.signal(),
                Some(libc::SIGBUS),
                "{case}: the child dies of SIGBUS, got {st:?}"
            );
        }
    });
    // The pool emptied: every way in to a folio gets an error, not SIGBUS.
    drop(_pool);
    let Some(_pool) = pool_or_skip(2) else { return };
    watchdog("hugetlb pool exhausted", 120, || {
        let dir = tempdir();
        let path = dir.path().join("e");
        let model = random_bytes(2, 4 * HUGE);
        std::fs::write(&path, &model).unwrap();
        let cache = hugetlb_cache(DirtyTracking::WriteFault, None);
        let file = cache.open(&path).unwrap();
        let mut buf = vec![0u8; 100];
        file.read_at(&mut buf, 0).unwrap();
        file.read_at(&mut buf, HUGE as u64).unwrap();
        let e = file.read_at(&mut buf, 3 * HUGE as u64).unwrap_err();
        assert!(e.to_string().contains("huge page"), "read_at names the empty pool: {e}");
        let e = file.write_at(&buf, 2 * HUGE as u64).unwrap_err();
        assert!(
            e.to_string().contains("huge page"),
            "write_at names the empty pool: {e}"
        );
        // What is cached still reads.
        file.read_at(&mut buf, HUGE as u64 + 7).unwrap();
        assert!(buf[..] == model[HUGE + 7..HUGE + 107]);
    });
    drop(_pool);

    // A mapped access that got SIGBUS because the pool was empty is served
    // once a folio exists there: the kernel's hugetlbfs tries to allocate
    // again at every fault, but upcache's SIGBUS is poison in the mapping,
    // and nothing cleared it (the access kept failing after the pool had
    // pages again and the folio was cached).
    let Some(_pool) = pool_or_skip(2) else { return };
    watchdog("hugetlb SIGBUS of an empty pool does not stay", 120, || {
        let dir = tempdir();
        let path = dir.path().join("e");
        let model = random_bytes(3, 4 * HUGE);
        std::fs::write(&path, &model).unwrap();
        let cache = hugetlb_cache(DirtyTracking::WriteFault, None);
        let file = cache.open(&path).unwrap();
        let map = file.mmap_raw(0, 4 * HUGE).unwrap();
        let mut buf = vec![0u8; 100];
        file.read_at(&mut buf, 0).unwrap();
        file.read_at(&mut buf, HUGE as u64).unwrap();
        assert_eq!(meminfo("HugePages_Free:"), 0, "the pool is empty");
        // A kernel-mode access: poison shows as EFAULT instead of killing
        // the test with SIGBUS.
        let copy_out = |at: usize| kernel_copy_out(&map, at);
        assert_eq!(copy_out(3 * HUGE + 5), None, "no page for the access: SIGBUS (EFAULT)");
        file.advise(upcache::Advice::DontNeed, 0, HUGE as u64).unwrap();
        assert_eq!(meminfo("HugePages_Free:"), 1, "one page back in the pool");
        file.read_at(&mut buf, 3 * HUGE as u64).unwrap();
        assert!(buf[..] == model[3 * HUGE..3 * HUGE + 100]);
        let got = copy_out(3 * HUGE + 5).expect("the access is served once the folio exists");
        assert!(got[..] == model[3 * HUGE + 5..3 * HUGE + 21]);
    });
    drop(_pool);

    // One free page: a read of the first folio succeeds even though the
    // readahead window after it gets no page (a folio nobody asked for
    // must not fail the read), and so does a pin of it.
    let Some(_pool) = pool_or_skip(1) else { return };
    watchdog("hugetlb readahead without pages", 120, || {
        let dir = tempdir();
        let path = dir.path().join("ra");
        // Larger than the first sync window (four folios), so that an
        // async window follows it.
        let model = random_bytes(6, 8 * HUGE);
        std::fs::write(&path, &model).unwrap();
        let cache = hugetlb_cache(DirtyTracking::WriteFault, None);
        let file = cache.open(&path).unwrap();
        // Sequential: the first read also starts an async window, whose
        // first folio gets no page.
        file.advise(upcache::Advice::Sequential, 0, 0).unwrap();
        let mut buf = vec![0u8; 100];
        let n = file
            .read_at(&mut buf, 0)
            .expect("a read of a folio that got its page, with none left for readahead");
        assert_eq!(n, 100);
        assert!(buf[..] == model[..100]);
        // A long sequential read stops short where the pages run out.
        let mut big = vec![0u8; 3 * HUGE];
        let n = file.read_at(&mut big, 0).expect("a read that made progress returns it");
        assert!((HUGE..3 * HUGE).contains(&n), "short read, got {n}");
        assert!(big[..n] == model[..n]);
        // SAFETY: no mapping of the file exists, so nothing writes the
        // page while the guard lives.
        let page = unsafe { file.get_page(3) }.expect("a pin of a cached page");
        assert!(page[..] == model[3 * 4096..4 * 4096]);
    });
    drop(_pool);

    // A failed read keeps its folio's huge page: the retry needs no page
    // from the (now empty) pool. Before, the failed fill's page was
    // punched and the retry's `pread` into the unallocated view failed
    // with EFAULT (an engine copying with a store of its own got SIGBUS).
    let Some(_pool) = pool_or_skip(2) else { return };
    watchdog("hugetlb failed read keeps its page", 120, || {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempdir();
        let path = dir.path().join("err");
        let model = random_bytes(8, HUGE);
        std::fs::write(&path, &model).unwrap();
        let fail = Arc::new(AtomicBool::new(true));
        let f2 = fail.clone();
        let store = common::HookStore::new(&path, move |op, _, _| {
            if op == common::StoreOp::Read && f2.load(Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        });
        let cache = hugetlb_cache(DirtyTracking::WriteFault, None);
        let file = cache.open_with_ops("err", upcache::StoreOps::new(store)).unwrap();
        let mut buf = vec![0u8; 100];
        assert!(file.read_at(&mut buf, 0).is_err(), "the store fails the read");
        // Another file takes the other free page.
        let other_path = dir.path().join("other");
        std::fs::write(&other_path, random_bytes(9, HUGE)).unwrap();
        let other = cache.open(&other_path).unwrap();
        other.read_at(&mut buf, 0).unwrap();
        assert_eq!(meminfo("HugePages_Free:"), 0, "the pool is empty");
        fail.store(false, Ordering::SeqCst);
        file.read_at(&mut buf, 0)
            .expect("the retry reads into the folio's own page");
        assert!(buf[..] == model[..100]);
    });
}

#[test]
fn child_entry() {
    let Ok(case) = std::env::var("UPCACHE_CHILD") else {
        return;
    };
    let dir = tempdir();
    let path = dir.path().join("c");
    let size = HUGE + 100;
    std::fs::write(&path, random_bytes(4, size)).unwrap();
    let cache = hugetlb_cache(DirtyTracking::WriteFault, None);
    let file = cache.open(&path).unwrap();
    let map = file.mmap_raw(0, 3 * HUGE).unwrap();
    let mut b = [0u8; 1];
    match case.as_str() {
        "past_eof" => {
            // Inside the huge page holding end of file: served (zeros).
            map.read(2 * HUGE - 1, &mut b);
            assert_eq!(b[0], 0);
            // The next huge page lies wholly past the end: SIGBUS.
            map.read(2 * HUGE + 5, &mut b);
        }
        "pool_empty_fault" => {
            // Take every free huge page, then touch an uncached page.
            let other = hugetlb_cache(DirtyTracking::WriteFault, None);
            let hog_path = dir.path().join("hog");
            let free = meminfo("HugePages_Free:") as usize;
            std::fs::write(&hog_path, vec![1u8; free * HUGE]).unwrap();
            let hog = other.open(&hog_path).unwrap();
            let mut buf = vec![0u8; 1];
            for k in 0..free {
                hog.read_at(&mut buf, (k * HUGE) as u64).unwrap();
            }
            assert_eq!(meminfo("HugePages_Free:"), 0, "the pool is empty");
            map.read(HUGE + 5, &mut b);
        }
        "signals" => {
            // A process-wide timer signal every 20 µs (a profiler's
            // SIGPROF does the same), handled without SA_RESTART: every
            // folio creation allocates its huge page with `fallocate`,
            // which hugetlbfs interrupts with EINTR. Neither `read_at` nor
            // a mapped access may fail for it.
            extern "C" fn on_alarm(_: libc::c_int) {}
            // SAFETY: a handler that does nothing; plain libc calls on
            // this (child) process.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_alarm as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                assert_eq!(libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()), 0);
                let t = libc::itimerval {
                    it_interval: libc::timeval { tv_sec: 0, tv_usec: 20 },
                    it_value: libc::timeval { tv_sec: 0, tv_usec: 20 },
                };
                assert_eq!(libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut()), 0);
            }
            let model = random_bytes(4, size);
            let mut buf = [0u8; 16];
            for i in 0..2000 {
                file.advise(upcache::Advice::DontNeed, 0, 0).unwrap();
                let off = if i % 2 == 0 { 7 } else { HUGE + 7 };
                let n = file
                    .read_at(&mut buf, off as u64)
                    .unwrap_or_else(|e| panic!("read_at under signals, round {i}: {e}"));
                assert!(n == 16 && buf[..] == model[off..off + 16], "round {i}");
                file.advise(upcache::Advice::DontNeed, 0, 0).unwrap();
                map.read(off, &mut b);
                assert_eq!(b[0], model[off], "mapped read under signals, round {i}");
            }
            eprintln!("child {case}: 4000 folio creations under signals");
            std::process::exit(0);
        }
        other => panic!("unknown child case {other}"),
    }
    eprintln!("child {case}: no SIGBUS");
    std::process::exit(0);
}
