//! Cache-wide writeback: sync_all, freeze/thaw (a consistent snapshot with
//! concurrent writers, buffered and mapped), the flusher's expiry, and
//! writer throttling past the dirty limit.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{tempdir, watchdog, Rng};
use upcache::{PageCache, Share, PAGE_SIZE};

#[test]
fn sync_all_writes_every_file() {
    let dir = tempdir();
    let cache = PageCache::new();
    let mut files = Vec::new();
    for i in 0..3 {
        let p = dir.path().join(format!("f{i}"));
        std::fs::write(&p, vec![0u8; 100_000]).unwrap();
        let f = cache.open(&p).unwrap();
        f.write_at(format!("file {i}").as_bytes(), 5000).unwrap();
        files.push((p, f));
    }
    assert!(cache.stats().dirty_bytes > 0);
    cache.sync_all().unwrap();
    assert_eq!(cache.stats().dirty_bytes, 0);
    for (i, (p, _)) in files.iter().enumerate() {
        let d = std::fs::read(p).unwrap();
        assert_eq!(&d[5000..5006], format!("file {i}").as_bytes());
    }
}

#[test]
fn freeze_is_a_consistent_snapshot_under_concurrent_writers() {
    // A failed assertion while frozen leaves the mapped writer blocked in
    // its fault and the scope waiting for it: the watchdog turns that
    // into a failure instead of a hang.
    watchdog("freeze snapshot", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        let size = 1 << 20;
        std::fs::write(&path, vec![0u8; size]).unwrap();
        let cache = PageCache::new();
        cache.start_fault_engine().expect("userfaultfd");
        let file = Arc::new(cache.open(&path).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            // Buffered writers.
            for t in 0..2u64 {
                let (file, stop) = (file.clone(), stop.clone());
                s.spawn(move || {
                    let mut rng = Rng::new(t);
                    let mut buf = vec![0u8; 2 * PAGE_SIZE];
                    while !stop.load(Relaxed) {
                        rng.fill(&mut buf);
                        let off = rng.below((size - buf.len()) as u64);
                        file.write_at(&buf, off).unwrap();
                    }
                });
            }
            // A writer through a shared mapping.
            {
                let (file, stop) = (file.clone(), stop.clone());
                s.spawn(move || {
                    // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
                    let mut map = unsafe { file.mmap_mut(0, size, Share::Shared) }.unwrap();
                    let mut rng = Rng::new(77);
                    while !stop.load(Relaxed) {
                        let off = rng.below(size as u64) as usize;
                        map[off] = map[off].wrapping_add(1);
                    }
                });
            }
            for round in 0..5 {
                cache.freeze().unwrap();
                assert!(cache.is_frozen());
                // Nothing can dirty the cache while frozen: it stays clean, and
                // the file on disk is exactly what the cache holds.
                for _ in 0..50 {
                    assert_eq!(cache.stats().dirty_bytes, 0, "round {round}: dirtied while frozen");
                }
                let disk = std::fs::read(&path).unwrap();
                let mut cached = vec![0u8; size];
                file.read_at(&mut cached, 0).unwrap();
                assert!(
                    disk == cached,
                    "round {round}: the frozen file on disk is not the cached file"
                );
                assert!(cache.thaw());
            }
            stop.store(true, Relaxed);
        });
        assert!(!cache.is_frozen());
        file.fsync().unwrap();
        assert_eq!(cache.stats().dirty_bytes, 0);
        assert!(cache.freeze().is_ok());
        assert!(cache.freeze().is_err(), "freezing twice is EBUSY");
        cache.thaw();
    });
}

#[test]
fn flusher_writes_back_expired_dirty_data() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let cache = PageCache::builder().dirty_expire(Duration::from_millis(50)).build();
    let file = cache.open(&path).unwrap();
    file.write_at(b"flushed by the flusher", 100).unwrap();
    assert!(cache.stats().dirty_bytes > 0);
    // Wait for the background flusher (a condition, with a generous cap).
    let deadline = Instant::now() + Duration::from_secs(30);
    while cache.stats().dirty_bytes > 0 {
        assert!(Instant::now() < deadline, "the flusher never wrote the expired data");
        std::thread::park_timeout(Duration::from_millis(5));
    }
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(&disk[100..122], b"flushed by the flusher");
}

#[test]
fn writers_are_throttled_past_the_dirty_limit() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; 8 << 20]).unwrap();
    let limit = 512 * 1024u64;
    let cache = PageCache::builder()
        .dirty_limit_bytes(limit)
        // The flusher stays asleep below the limit: the writer must throttle.
        .dirty_background_bytes(limit)
        .dirty_expire(Duration::from_secs(3600))
        .build();
    let file = cache.open(&path).unwrap();
    let buf = vec![7u8; 64 * 1024];
    for i in 0..128u64 {
        file.write_at(&buf, i * 64 * 1024).unwrap();
        let dirty = cache.stats().dirty_bytes;
        // One write's worth above the limit at most.
        assert!(
            dirty <= limit + 2 * buf.len() as u64,
            "dirty {dirty} past the limit {limit}"
        );
    }
    assert!(cache.stats().throttled > 0);
    file.fsync().unwrap();
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 7));
}

#[test]
fn mapped_writers_are_throttled_past_the_dirty_limit_without_hanging() {
    let dir = tempdir();
    let path = dir.path().join("f");
    let size = 8usize << 20;
    std::fs::write(&path, vec![0u8; size]).unwrap();
    let limit = 512 * 1024u64;
    let cache = PageCache::builder()
        .dirty_limit_bytes(limit)
        // The flusher sleeps below the limit: the writer reaches it.
        .dirty_background_bytes(limit)
        .dirty_expire(Duration::from_secs(3600))
        .build();
    cache.start_fault_engine().expect("userfaultfd");
    let file = cache.open(&path).unwrap();
    // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
    let mut map = unsafe { file.mmap_mut(0, size, Share::Shared) }.unwrap();
    for p in (0..size).step_by(PAGE_SIZE) {
        map[p] = 0xAB;
    }
    assert!(cache.stats().throttled > 0, "{}", cache.stats());
    map.flush().unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert!((0..size).step_by(PAGE_SIZE).all(|p| disk[p] == 0xAB));
}
