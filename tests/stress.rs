//! Stress test (issue #9): 8 threads on one file with a 4 MiB memory limit
//! (the file is 8 MiB, so reclaim runs all the time), both mapping modes.
//! Each thread owns a 1 MiB region and runs read_at, write_at, mapped reads
//! and writes (one shared mapping of the whole file), punch, fsync and
//! advise(DontNeed/WillNeed) anywhere in the file; the last thread also
//! truncates its region down and back up (inside large folios: the default
//! largest folio is 2 MiB and straddles two regions). Every read of a
//! thread's own region is checked against that thread's model; at the end
//! the whole file, through the cache and on disk, must equal the models.
//! Every thread is under a watchdog: a hang fails the test.
//!
//! `UPCACHE_STRESS_SECS` sets the duration (default 5 s; the README's long
//! run uses 60).

mod common;

use std::time::{Duration, Instant};

use common::{tempdir, watchdog, Rng};
use upcache::{Advice, DirtyTracking, PageCache, UffdMode, PAGE_SIZE};

const THREADS: usize = 8;
const REGION: u64 = 1 << 20;
const LIMIT: u64 = 4 << 20;

fn secs() -> u64 {
    std::env::var("UPCACHE_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

fn run(mode: UffdMode, seed: u64) {
    run_with(mode, DirtyTracking::WriteFault, seed)
}

fn run_with(mode: UffdMode, tracking: DirtyTracking, seed: u64) {
    run_cfg(mode, tracking, false, seed)
}

fn run_cfg(mode: UffdMode, tracking: DirtyTracking, large: bool, seed: u64) {
    run_store(mode, tracking, large, false, seed)
}

/// With `large`: 2 MiB folios, each thread's region 4 MiB and the limit
/// 16 MiB (the large-folio floor), so reclaim still runs. `hugetlb`: the
/// same on the hugetlb page store (implies `large`).
fn run_store(mode: UffdMode, tracking: DirtyTracking, large: bool, hugetlb: bool, seed: u64) {
    let large = large || hugetlb;
    let (region, limit) = if large { (4 * REGION, 16 << 20) } else { (REGION, LIMIT) };
    let size = THREADS as u64 * region;
    let t0 = Instant::now();
    let dir = tempdir();
    let path = dir.path().join("stress");
    std::fs::write(&path, vec![0u8; size as usize]).unwrap();
    let cache = PageCache::builder()
        .mmap_mode(mode)
        .dirty_tracking(tracking)
        .memory_limit(limit)
        .large_folios(large)
        .hugetlb(hugetlb)
        .build();
    cache
        .start_fault_engine()
        .expect("userfaultfd must be available (see README)");
    let file = cache.open(&path).unwrap();
    let map = file.mmap_raw(0, size as usize).unwrap();
    eprintln!("{mode:?}: setup took {:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(secs());
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (file, map) = (&file, &map);
                s.spawn(move || {
                    let base = t as u64 * region;
                    let last = t == THREADS - 1;
                    let mut model = vec![0u8; region as usize];
                    let mut rng = Rng::new(seed * 31 + t as u64);
                    let mut buf = vec![0u8; 5 * PAGE_SIZE];
                    let mut ops = 0u64;
                    while Instant::now() < deadline {
                        ops += 1;
                        let ctx = format!("{mode:?} thread {t} op {ops}");
                        // Bytes of the region inside the file (the last
                        // thread's region shrinks and grows).
                        let len = model.len() as u64;
                        let off = rng.below(len.max(1));
                        let n = (1 + rng.below(buf.len() as u64)).min(len - off.min(len)) as usize;
                        match rng.below(100) {
                            0..=24 if n > 0 => {
                                let got = file.read_at(&mut buf[..n], base + off).unwrap();
                                assert_eq!(got, n, "{ctx}: read_at length");
                                assert!(buf[..n] == model[off as usize..][..n], "{ctx}: read_at bytes at {off}");
                            }
                            25..=44 if n > 0 => {
                                rng.fill(&mut buf[..n]);
                                assert_eq!(file.write_at(&buf[..n], base + off).unwrap(), n, "{ctx}");
                                model[off as usize..][..n].copy_from_slice(&buf[..n]);
                            }
                            45..=64 if n > 0 => {
                                map.read((base + off) as usize, &mut buf[..n]);
                                assert!(buf[..n] == model[off as usize..][..n], "{ctx}: mapped read at {off}");
                            }
                            65..=79 if n > 0 => {
                                rng.fill(&mut buf[..n]);
                                map.write((base + off) as usize, &buf[..n]);
                                model[off as usize..][..n].copy_from_slice(&buf[..n]);
                            }
                            80..=84 if n > 0 => {
                                let plen = 1 + rng.below(64 * 1024).min(len - off - 1);
                                file.punch_hole(base + off, plen).unwrap();
                                model[off as usize..(off + plen) as usize].fill(0);
                            }
                            85..=86 => file.fsync().unwrap(),
                            87..=92 => {
                                let adv = if rng.below(2) == 0 {
                                    Advice::DontNeed
                                } else {
                                    Advice::WillNeed
                                };
                                let o = rng.below(size);
                                file.advise(adv, o, 1 + rng.below(512 * 1024)).unwrap();
                            }
                            93..=99 if last => {
                                // Down (inside the region, often inside a
                                // large folio) or back up to full size.
                                let new = if rng.below(2) == 0 { rng.below(region) } else { region };
                                file.truncate(base + new).unwrap();
                                model.resize(new as usize, 0);
                            }
                            _ => {}
                        }
                    }
                    if last {
                        file.truncate(size).unwrap();
                        model.resize(region as usize, 0);
                    }
                    (model, ops)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(t, h)| {
                let (m, ops) = h.join().unwrap();
                eprintln!(
                    "{mode:?} thread {t}: {ops} ops, joined {:?} after the deadline",
                    deadline.elapsed()
                );
                assert!(ops > 10, "a thread made almost no progress ({ops} ops)");
                m
            })
            .collect()
    });
    let t_end = std::time::Instant::now();
    let want: Vec<u8> = models.concat();
    let mut got = vec![0u8; size as usize];
    assert_eq!(file.read_at(&mut got, 0).unwrap(), size as usize);
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{mode:?}: byte {i} (thread {}) is {} through the cache, model {}",
            i as u64 / region,
            got[i],
            want[i]
        );
    }
    drop(map);
    file.fsync().unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(disk.len() as u64, size);
    if let Some(i) = (0..disk.len()).find(|&i| disk[i] != want[i]) {
        panic!("{mode:?}: byte {i} is {} on disk, model {}", disk[i], want[i]);
    }
    file.close().unwrap();
    eprintln!("{mode:?}: final checks took {:?}", t_end.elapsed());
}

#[test]
fn stress_8_threads_4mib_limit_missing() {
    watchdog("stress (Missing)", secs() + 120, || {
        run(UffdMode::Missing, common::seed(101))
    });
}

#[test]
fn stress_8_threads_4mib_limit_minor() {
    watchdog("stress (Minor)", secs() + 120, || {
        run(UffdMode::Minor, common::seed(102))
    });
}

#[test]
fn stress_8_threads_4mib_limit_minor_async_tracking() {
    watchdog("stress (Minor, async dirty tracking)", secs() + 120, || {
        run_with(UffdMode::Minor, DirtyTracking::Async, common::seed(103))
    });
}

#[test]
fn stress_8_threads_16mib_limit_missing_large_folios() {
    watchdog("stress (Missing, large folios)", secs() + 120, || {
        run_cfg(UffdMode::Missing, DirtyTracking::WriteFault, true, common::seed(104))
    });
}

#[test]
fn stress_8_threads_16mib_limit_minor_hugetlb() {
    let Some(_pool) = common::hugetlb_pool::pool_or_skip(24) else {
        return;
    };
    watchdog("stress (Minor, hugetlb page store)", secs() + 120, || {
        run_store(
            UffdMode::Minor,
            DirtyTracking::WriteFault,
            true,
            true,
            common::seed(105),
        )
    });
}
