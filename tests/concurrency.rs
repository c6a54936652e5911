//! Real threads on real files: concurrent writers, readers, syncs and
//! truncates. Synchronization is by joins only; assertions are on bytes.

mod common;

use std::sync::Arc;

use common::{tempdir, Rng};
use upcache::PageCache;

const REGION: usize = 96 * 1024;

#[test]
fn disjoint_writers_readers_and_syncers() {
    let dir = tempdir();
    let path = dir.path().join("f");
    let threads = 4;
    std::fs::write(&path, vec![0u8; REGION * threads]).unwrap();
    let cache = PageCache::new();
    let file = Arc::new(cache.open(&path).unwrap());
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let file = file.clone();
                s.spawn(move || {
                    let mut rng = Rng::new(t as u64 + 10);
                    let mut model = vec![0u8; REGION];
                    let base = (t * REGION) as u64;
                    let mut buf = vec![0u8; 9000];
                    for _ in 0..1500 {
                        let off = rng.below((REGION - buf.len()) as u64) as usize;
                        let len = 1 + rng.below(buf.len() as u64) as usize;
                        if rng.below(2) == 0 {
                            rng.fill(&mut buf[..len]);
                            file.write_at(&buf[..len], base + off as u64).unwrap();
                            model[off..off + len].copy_from_slice(&buf[..len]);
                        } else {
                            assert_eq!(file.read_at(&mut buf[..len], base + off as u64).unwrap(), len);
                            assert!(buf[..len] == model[off..off + len], "thread {t} read back");
                        }
                    }
                    model
                })
            })
            .collect();
        // Syncers run against the writers.
        for k in 0..2 {
            let file = file.clone();
            s.spawn(move || {
                for i in 0..200 {
                    if (i + k) % 2 == 0 {
                        file.fsync().unwrap();
                    } else {
                        file.writeback(16).unwrap();
                    }
                }
            });
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    file.fsync().unwrap();
    let disk = std::fs::read(&path).unwrap();
    for (t, m) in models.iter().enumerate() {
        assert!(disk[t * REGION..(t + 1) * REGION] == m[..], "region {t} on disk");
    }
    assert_eq!(cache.stats().dirty_bytes, 0);
}

fn pattern(off: u64) -> u8 {
    (off % 255) as u8 + 1
}

#[test]
fn readers_never_see_stale_bytes_across_truncate() {
    let dir = tempdir();
    let path = dir.path().join("t");
    let size = 512 * 1024u64;
    let content: Vec<u8> = (0..size).map(pattern).collect();
    std::fs::write(&path, &content).unwrap();
    let cache = PageCache::new();
    let file = Arc::new(cache.open(&path).unwrap());
    // The lowest truncation point completed so far: no write happens, so
    // every byte at or past it reads zero from then on, and every byte
    // below the final one keeps its original value.
    let cut = Arc::new(std::sync::atomic::AtomicU64::new(size));
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let file = file.clone();
            let cut = cut.clone();
            s.spawn(move || {
                let mut rng = Rng::new(t);
                let mut buf = vec![0u8; 16 * 1024];
                for _ in 0..2000 {
                    let off = rng.below(size);
                    let cut_before = cut.load(std::sync::atomic::Ordering::Acquire);
                    let n = file.read_at(&mut buf, off).unwrap();
                    for (i, &b) in buf[..n].iter().enumerate() {
                        let o = off + i as u64;
                        if o >= cut_before {
                            // Truncated away before this read began: a
                            // stale original byte here is the bug.
                            assert_eq!(b, 0, "byte {o} past a completed truncate to {cut_before}: stale");
                        } else {
                            assert!(b == pattern(o) || b == 0, "byte {o}: {b}");
                        }
                    }
                }
            });
        }
        let file = file.clone();
        let cut = cut.clone();
        s.spawn(move || {
            let mut rng = Rng::new(99);
            for _ in 0..200 {
                let l = rng.below(size);
                file.truncate(l).unwrap();
                cut.fetch_min(l, std::sync::atomic::Ordering::Release);
                file.truncate(size).unwrap();
            }
        });
    });
    // Below the lowest cut the original bytes, past it zeros: in the cache
    // and on disk.
    let low = cut.load(std::sync::atomic::Ordering::Acquire);
    let mut all = vec![0u8; size as usize];
    assert_eq!(file.read_at(&mut all, 0).unwrap() as u64, size);
    file.fsync().unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(disk.len() as u64, size);
    for (name, bytes) in [("cache", &all), ("disk", &disk)] {
        for (o, &b) in bytes.iter().enumerate() {
            let want = if (o as u64) < low { pattern(o as u64) } else { 0 };
            assert_eq!(b, want, "{name}: byte {o} (lowest cut {low})");
        }
    }
}
