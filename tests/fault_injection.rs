//! Randomized fault injection: a seeded sequence of `write_at`,
//! `read_at`, truncate, punch, `fsync` and `sync_all` over a store that
//! fails reads, writes, syncs, hole punches and resizes at random (and returns
//! short reads),
//! under a memory limit that makes reclaim write back and evict while
//! the store fails. Checked against a model of the file after every step:
//!
//! - a read returns the model's bytes or an error, never other bytes, and
//!   never a short count of 0 before end of file;
//! - a write that returns `Ok(n)` wrote its first `n` bytes; one that
//!   fails wrote nothing; a hole punch that fails (its write-back of the
//!   range failed) punched nothing; a truncate the store refused changed
//!   neither the size nor a byte;
//! - **every `fsync` or `sync_all` that returns `Ok` left the model on
//!   disk**, byte for byte, whatever failed before it (upcache keeps the
//!   data of a failed write-back dirty, where the kernel drops it);
//! - at the end, with the store healed, one `fsync` may still report an
//!   error nobody saw, the next succeeds, `close` succeeds, and a fresh
//!   cache reads the model back.
//!
//! Nothing may hang (watchdog) or panic. `UPCACHE_TEST_OPS=N` for more
//! operations, `UPCACHE_TEST_SEED=S` to replay.

mod common;

use std::io::{self, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use common::{ops_count, seed, tempdir, watchdog, Rng};
use upcache::{
    BackingStore, DirectFileStore, DirtyTracking, FileStore, PageCache, PageCacheBuilder, Share, StoreOps, UffdMode,
    PAGE_SIZE,
};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// What the test sets and what the store did.
#[derive(Default)]
struct Switches {
    /// Inject failures (off while a mapped access may fault).
    on: AtomicBool,
    /// Read errors returned so far.
    read_errors: AtomicUsize,
    /// Vectored reads cut short so far.
    short_vectored: AtomicUsize,
}

/// A store that fails at random while `on`. The operations' thread and
/// the cache's own threads (flusher, reclaim) draw from two generators,
/// so the failures the operations meet do not depend on how many calls
/// the background threads happened to make: a seed replays the
/// operation stream and, as far as the background's effects on the
/// cache allow, the failures it met.
struct Chaos<S> {
    inner: S,
    rng: Mutex<Rng>,
    bg_rng: Mutex<Rng>,
    ops_thread: std::thread::ThreadId,
    sw: Arc<Switches>,
}

impl<S> Chaos<S> {
    /// This thread's generator.
    fn rng(&self) -> std::sync::MutexGuard<'_, Rng> {
        if std::thread::current().id() == self.ops_thread {
            self.rng.lock().unwrap()
        } else {
            self.bg_rng.lock().unwrap()
        }
    }
    /// Fail this call? (one chance in `one_in`)
    fn fail(&self, one_in: u64) -> bool {
        self.sw.on.load(Relaxed) && self.rng().below(one_in) == 0
    }
    fn read_error(&self) -> io::Error {
        self.sw.read_errors.fetch_add(1, Relaxed);
        io::Error::from_raw_os_error(EIO)
    }
}

impl<S: BackingStore> BackingStore for Chaos<S> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if self.fail(12) {
            return Err(self.read_error());
        }
        // Short reads: the cache must ask again for the rest.
        let n = if self.fail(4) {
            1 + self.rng().below(buf.len() as u64) as usize
        } else {
            buf.len()
        };
        self.inner.read_at(&mut buf[..n], off)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        if self.fail(12) {
            return Err(self.read_error());
        }
        // Short: only the first buffers of a batched readahead.
        let n = if bufs.len() > 1 && self.fail(4) {
            self.sw.short_vectored.fetch_add(1, Relaxed);
            1 + self.rng().below(bufs.len() as u64 - 1) as usize
        } else {
            bufs.len()
        };
        self.inner.read_vectored_at(&mut bufs[..n], off)
    }
    fn batch_readahead(&self) -> bool {
        self.inner.batch_readahead()
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.fail(6) {
            let e = if self.fail(2) { ENOSPC } else { EIO };
            return Err(io::Error::from_raw_os_error(e));
        }
        self.inner.write_all_at(buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.fail(8) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, size: u64) -> io::Result<()> {
        // Fails before touching the file: a failed resize resized nothing.
        if self.fail(10) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        self.inner.set_len(size)
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        // Fails before touching the file: a failed punch punched nothing.
        if self.fail(10) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        self.inner.punch_hole(off, len)
    }
}

/// One configuration: the cache, the store, and how large the file may
/// grow.
struct Config {
    name: &'static str,
    builder: fn() -> PageCacheBuilder,
    /// `DirectFileStore` (O_DIRECT, batched vectored readahead) instead
    /// of `FileStore`.
    direct: bool,
    max: u64,
}

fn run(cfg: &Config, seed: u64, ops: usize) {
    let dir = tempdir();
    let path = dir.path().join("chaos");
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; (cfg.max / 3) as usize + 123];
    rng.fill(&mut model);
    std::fs::write(&path, &model).unwrap();
    let sw = Arc::new(Switches::default());
    sw.on.store(true, Relaxed);
    let cache = (cfg.builder)().build();
    let rng_store = Mutex::new(Rng::new(seed ^ 0x5eed));
    let inner: Arc<dyn BackingStore + Send + Sync> = if cfg.direct {
        Arc::new(DirectFileStore::open(&path).unwrap())
    } else {
        Arc::new(FileStore::open(&path).unwrap())
    };
    let store = Chaos {
        inner,
        rng: rng_store,
        bg_rng: Mutex::new(Rng::new(seed ^ 0xb6)),
        ops_thread: std::thread::current().id(),
        sw: sw.clone(),
    };
    let file = cache.open_with_ops("chaos", StoreOps::new(store)).unwrap();
    cache
        .start_fault_engine()
        .expect("userfaultfd must be available (see README): this test cannot run without it");
    // SAFETY: the mapping is read and written only by this thread, through
    // short-lived borrows, below end of file.
    let mut map = unsafe { file.mmap_mut(0, cfg.max as usize, Share::Shared) }.unwrap();
    let as_ = file.address_space().unwrap();
    let max_io = 3 * PAGE_SIZE + 17;
    let mut buf = vec![0u8; max_io];
    let (mut synced_ok, mut errors) = (0usize, 0usize);
    // The last operations, printed when a check fails.
    let mut log: std::collections::VecDeque<String> = Default::default();
    let on_disk = |model: &[u8], ctx: &str, log: &std::collections::VecDeque<String>| {
        let disk = std::fs::read(&path).unwrap();
        let ctx = format!("{ctx}\nlast operations:\n{}", Vec::from(log.clone()).join("\n"));
        assert_eq!(
            disk.len(),
            model.len(),
            "{ctx}: file length on disk after a successful sync"
        );
        if disk == model {
            return;
        }
        if let Some(i) = (0..model.len()).find(|&i| disk[i] != model[i]) {
            panic!(
                "{ctx}: byte {i} on disk is {} after a successful sync, the file has {}",
                disk[i], model[i]
            );
        }
    };

    for op in 0..ops {
        let ctx = format!("{} seed {seed} op {op}", cfg.name);
        let size = model.len() as u64;
        // Mapped accesses stay inside the mapping and below end of file.
        let mapped = size.min(cfg.max);
        if log.len() == 40 {
            log.pop_front();
        }
        // Every page the page store holds belongs to a folio that is
        // uptodate (or locked for its fill): a `Missing`-mode mapping maps
        // any page present there without asking, so a stray page shows
        // bytes the file does not have. Checked here, after each step,
        // it fails at the step that left one (a mapped read finds it only
        // if one happens to land on it).
        // The size too: a refused truncate keeps the old one.
        assert_eq!(
            file.len().unwrap(),
            size,
            "{ctx}: file size\nlast operations:\n{}",
            Vec::from(log.clone()).join("\n")
        );
        let stray = as_.stray_store_pages();
        assert!(
            stray.is_empty(),
            "{ctx}: pages {stray:?} are in the page store with no uptodate folio\nlast operations:\n{}",
            Vec::from(log.clone()).join("\n")
        );
        let holes = as_.holes_in_uptodate_folios();
        assert!(
            holes.is_empty(),
            "{ctx}: pages {holes:?} of uptodate folios are missing from the page store\nlast operations:\n{}",
            Vec::from(log.clone()).join("\n")
        );
        let mut note = |what: String| log.push_back(format!("{op}: {what}"));
        match rng.below(100) {
            0..=29 => {
                let off = rng.below(cfg.max);
                let len = 1 + rng.below(max_io as u64) as usize;
                rng.fill(&mut buf[..len]);
                let r = file.write_at(&buf[..len], off);
                note(format!("write_at({off}, {len}) = {r:?}"));
                match r {
                    Ok(n) => {
                        assert!(n > 0 && n <= len, "{ctx}: write_at({len}) returned {n}");
                        let end = off as usize + n;
                        if end > model.len() {
                            model.resize(end, 0);
                        }
                        model[off as usize..end].copy_from_slice(&buf[..n]);
                    }
                    Err(e) => {
                        injected(&e, &ctx);
                        errors += 1
                    }
                }
            }
            30..=54 => {
                let off = rng.below(cfg.max);
                let len = 1 + rng.below(max_io as u64) as usize;
                let want = size.saturating_sub(off).min(len as u64) as usize;
                let read_errors = sw.read_errors.load(Relaxed);
                let r = file.read_at(&mut buf[..len], off);
                let failed = sw.read_errors.load(Relaxed) != read_errors;
                note(format!("read_at({off}, {len}) = {r:?}"));
                match r {
                    Ok(n) => {
                        assert!(
                            n <= want,
                            "{ctx}: read_at({off}, {len}) returned {n} bytes, {want} exist"
                        );
                        assert!(
                            want == 0 || n > 0,
                            "{ctx}: read_at({off}) returned 0 before end of file"
                        );
                        assert!(
                            n == 0 || buf[..n] == model[off as usize..off as usize + n],
                            "{ctx}: read_at({off}, {len}) returned bytes the file does not hold"
                        );
                        // Short only where a read of the store failed
                        // after progress.
                        assert!(
                            n == want || failed,
                            "{ctx}: read_at({off}, {len}) returned {n} of {want} bytes, no store read failed"
                        );
                    }
                    Err(e) => {
                        injected(&e, &ctx);
                        errors += 1
                    }
                }
            }
            // Mapped accesses, below end of file, with the store healthy
            // meanwhile (a fault whose read fails ends in SIGBUS): the
            // writes are tracked as dirty while write-back fails around
            // them; each page's later write-back may fail again.
            55..=61 if mapped > 0 => {
                let off = rng.below(mapped) as usize;
                let len = (1 + rng.below(max_io as u64) as usize).min(mapped as usize - off);
                note(format!("mapped write {off}+{len}"));
                rng.fill(&mut buf[..len]);
                sw.on.store(false, Relaxed);
                map[off..off + len].copy_from_slice(&buf[..len]);
                sw.on.store(true, Relaxed);
                model[off..off + len].copy_from_slice(&buf[..len]);
            }
            62..=64 if mapped > 0 => {
                let off = rng.below(mapped) as usize;
                let len = (1 + rng.below(max_io as u64) as usize).min(mapped as usize - off);
                note(format!("mapped read {off}+{len}"));
                sw.on.store(false, Relaxed);
                let seen = map[off..off + len].to_vec();
                sw.on.store(true, Relaxed);
                if let Some(i) = (0..len).find(|&i| seen[i] != model[off + i]) {
                    let mut again = vec![0u8; len];
                    let r = file.read_at(&mut again, off as u64);
                    sw.on.store(false, Relaxed);
                    let mapped_again = map[off + i];
                    sw.on.store(true, Relaxed);
                    panic!(
                        "{ctx}: mapped read {off}+{len}: byte {} is {}, the file has {} (mapped again: {mapped_again}; \
                         read_at then: {r:?}, byte {:?}); file size {size}; stats {:?}\nlast operations:\n{}",
                        off + i,
                        seen[i],
                        model[off + i],
                        r.as_ref().ok().filter(|&&n| n > i).map(|_| again[i]),
                        file.stats(),
                        Vec::from(log.clone()).join("\n")
                    );
                }
            }
            55..=64 => {}
            65..=69 => {
                let new = rng.below(cfg.max);
                // A refused resize (the store's set_len failed) changes
                // nothing: neither the size nor a byte.
                let r = file.truncate(new);
                note(format!("truncate({new}) = {r:?}"));
                match r {
                    Ok(()) => model.resize(new as usize, 0),
                    Err(e) => {
                        injected(&e, &ctx);
                        errors += 1
                    }
                }
            }
            70..=74 => {
                let off = rng.below(cfg.max);
                let len = 1 + rng.below(64 * 1024);
                // Writes the range back first (as ext4 does): fails, with
                // nothing punched, when that write-back fails.
                let r = file.punch_hole(off, len);
                note(format!("punch_hole({off}, {len}) = {r:?}"));
                match r {
                    Ok(()) => {
                        let end = (off + len).min(size);
                        if off < end {
                            model[off as usize..end as usize].fill(0);
                        }
                    }
                    Err(e) => {
                        injected(&e, &ctx);
                        errors += 1
                    }
                }
            }
            75..=89 => match file.fsync() {
                Ok(()) => {
                    note("fsync = Ok".into());
                    on_disk(&model, &format!("{ctx} (fsync)"), &log);
                    synced_ok += 1;
                }
                Err(e) => {
                    note(format!("fsync = {e}"));
                    injected(&e, &ctx);
                    errors += 1
                }
            },
            _ => match cache.sync_all() {
                Ok(()) => {
                    note("sync_all = Ok".into());
                    on_disk(&model, &format!("{ctx} (sync_all)"), &log);
                    synced_ok += 1;
                }
                Err(e) => {
                    note(format!("sync_all = {e}"));
                    injected(&e, &ctx);
                    errors += 1
                }
            },
        }
    }
    // Heal the store: at most one error left to report, then durable.
    sw.on.store(false, Relaxed);
    if file.fsync().is_err() {
        file.fsync()
            .unwrap_or_else(|e| panic!("{}: fsync after the store healed: {e}", cfg.name));
    }
    on_disk(&model, &format!("{} seed {seed}: end", cfg.name), &log);
    drop(map);
    let mut all = vec![0u8; model.len()];
    assert_eq!(file.read_at(&mut all, 0).unwrap(), model.len());
    assert!(all == model, "{}: cached contents at the end", cfg.name);
    file.close().unwrap();
    drop(cache);
    let fresh = PageCache::new();
    let f = fresh.open(&path).unwrap();
    let mut all = vec![0u8; model.len()];
    assert_eq!(f.read_at(&mut all, 0).unwrap(), model.len());
    assert!(all == model, "{}: contents read back by a fresh cache", cfg.name);
    eprintln!(
        "{} seed {seed}: {ops} ops, {synced_ok} successful syncs checked on disk, {errors} errors returned",
        cfg.name
    );
    if ops >= 500 {
        assert!(
            synced_ok > 0 && errors > 0,
            "{}: the run must exercise both outcomes",
            cfg.name
        );
        if cfg.direct {
            assert!(
                sw.short_vectored.load(Relaxed) > 0,
                "{}: batched readahead never met a short read",
                cfg.name
            );
        }
    }
}

/// An error the test injected (EIO, ENOSPC), not one the cache made up.
fn injected(e: &upcache::Error, ctx: &str) {
    assert!(
        matches!(e.raw_os_error(), EIO | ENOSPC),
        "{ctx}: an error the store never returned: {e:?}"
    );
}

fn run_watched(cfg: Config, seed: u64, ops: usize) {
    // About 10 ms an operation in a debug build, 25x that as the limit.
    let secs = 120 + ops as u64 / 4;
    watchdog(cfg.name, secs, move || run(&cfg, seed, ops));
}

#[test]
fn fault_injection_small_folios_256k_limit() {
    run_watched(
        Config {
            name: "small folios, 256 KiB limit",
            builder: || PageCache::builder().mmap_mode(UffdMode::Minor).memory_limit(256 << 10),
            direct: false,
            max: 1 << 20,
        },
        seed(41),
        ops_count(4000),
    );
}

/// `Missing` mode, where the kernel maps every page present in the page
/// store without asking upcache. It found a write past end of file that
/// zeroed the old last page through the engine view while that page's
/// folio was not uptodate (its read had failed): the page store got a
/// page of zeros, a mapped read saw them, and a mapped write dirtied the
/// folio that was never read (its write-back then failed for good).
/// Reduced to `tests/faults.rs`,
/// `extending_past_a_failed_last_folio_leaves_no_zeros_in_a_mapping`.
#[test]
fn fault_injection_missing_mode_256k_limit() {
    run_watched(
        Config {
            name: "Missing mode, small folios, 256 KiB limit",
            builder: || {
                PageCache::builder()
                    .mmap_mode(UffdMode::Missing)
                    .memory_limit(256 << 10)
            },
            direct: false,
            max: 1 << 20,
        },
        seed(46),
        ops_count(4000),
    );
}

/// Mapped writes tracked by `UFFD_FEATURE_WP_ASYNC` and harvested by the
/// syncs, while those syncs' write-backs fail.
#[test]
fn fault_injection_async_tracking_256k_limit() {
    run_watched(
        Config {
            name: "async tracking, small folios, 256 KiB limit",
            builder: || {
                PageCache::builder()
                    .dirty_tracking(DirtyTracking::Async)
                    .memory_limit(256 << 10)
            },
            direct: false,
            max: 1 << 20,
        },
        seed(45),
        ops_count(4000),
    );
}

/// O_DIRECT: aligned bounce buffers, batched vectored readahead (cut
/// short at random), buffered tails.
#[test]
fn fault_injection_direct_store_256k_limit() {
    run_watched(
        Config {
            name: "direct store, small folios, 256 KiB limit",
            // `Minor`: a `Missing`-mode mapping makes every fill page-atomic
            // (one page at a time), which never takes the batched path.
            builder: || PageCache::builder().mmap_mode(UffdMode::Minor).memory_limit(256 << 10),
            direct: true,
            max: 1 << 20,
        },
        seed(44),
        ops_count(4000),
    );
}

#[test]
fn fault_injection_large_folios_16m_limit() {
    run_watched(
        Config {
            name: "large folios, 16 MiB limit",
            builder: || {
                PageCache::builder()
                    .large_folios(true)
                    .mmap_mode(UffdMode::Minor)
                    .memory_limit(16 << 20)
            },
            direct: false,
            max: 24 << 20,
        },
        seed(42),
        ops_count(2000),
    );
}

#[test]
fn fault_injection_hugetlb_16m_limit() {
    let Some(_pool) = common::hugetlb_pool::pool_or_skip(24) else {
        return;
    };
    run_watched(
        Config {
            name: "hugetlb, 16 MiB limit",
            builder: || PageCache::builder().hugetlb(true).memory_limit(16 << 20),
            direct: false,
            max: 24 << 20,
        },
        seed(43),
        ops_count(2000),
    );
}
