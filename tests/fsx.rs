//! fsx-style differential test (issue #8): one seeded stream of operations
//! drives three things at once and compares them after every step:
//!
//! - upcache: a `File`, a shared `MmapRaw` of it (the cache's mapping mode),
//!   short-lived private mappings, a store (`FileStore` or `DirectFileStore`),
//!   sometimes a small memory limit;
//! - the kernel twin: a second real file written with `pwrite`, `ftruncate`,
//!   `fallocate(PUNCH_HOLE)` and a memmap2 shared mapping where upcache's
//!   mapping is written;
//! - a model: a `Vec<u8>`.
//!
//! Operations: read_at, write_at (extending, with holes), mapped reads and
//! writes, private-mapping copy-on-write, truncate up and down (inside large
//! folios), punch, fsync, sync_range, `flush_range` of a mapped sub-range,
//! background writeback, advise(DontNeed/WillNeed), close and reopen (with
//! and without a live mapping), drop and rebuild the whole `PageCache`.
//! Checks: the affected range after each op; the whole file (upcache, twin)
//! every 512 ops; the file **on disk** after every fsync (all of it), every
//! sync_range and flush (the range), every close and rebuild (all of it).
//!
//! Replay: `UPCACHE_TEST_SEED=S`; length: `UPCACHE_TEST_OPS=N` per
//! configuration (default 20,000). On a failure the last 40 operations are
//! printed. The long run of the README (`UPCACHE_TEST_OPS=125000`, 8
//! configurations) is 10^6 operations.

mod common;

use std::collections::VecDeque;
use std::fs::File as StdFile;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::{ops_count, seed, tempdir, watchdog, Rng};
use upcache::{
    Advice, DirectFileStore, DirtyTracking, File, MmapMut, MmapRaw, PageCache, Share, StoreOps, UffdMode, PAGE_SIZE,
};

/// Largest file size the stream makes.
const MAX: u64 = 512 * 1024;
/// Length of the long-lived mappings (file offsets `0..MAP`).
const MAP: usize = MAX as usize;
/// A small budget: half the largest file, so reclaim runs all the time.
const LIMIT: u64 = 256 * 1024;

#[derive(Clone, Copy, Debug)]
struct Config {
    mode: UffdMode,
    tracking: DirtyTracking,
    limit: Option<u64>,
    direct: bool,
    large: bool,
    /// The hugetlb page store (`PageCacheBuilder::hugetlb`).
    hugetlb: bool,
}

struct World {
    cfg: Config,
    path: PathBuf,
    twin_path: PathBuf,
    cache: Option<PageCache>,
    file: Option<File>,
    map: Option<MmapRaw>,
    twin: StdFile,
    twin_map: memmap2::MmapRaw,
    model: Vec<u8>,
    log: VecDeque<String>,
    counts: [usize; 17],
    /// The size at which a mapped store put bytes past end of file (in
    /// its page): mapped reads of that page past the end are unspecified
    /// until the size changes (the kernel zeroes them at write-back,
    /// upcache keeps them), and growing must read zeros there.
    eof_garbage_at: Option<u64>,
    /// A long-lived private writable mapping of the file and its kernel
    /// twin (`MAP_PRIVATE` of the twin file): the same private writes go
    /// to both, and below end of file they must read the same across every
    /// other operation (copies kept across eviction and punch, dropped
    /// past a truncate, pages never written following the file).
    pmap: Option<(MmapMut, memmap2::MmapMut)>,
}

impl World {
    fn new_cache(cfg: Config) -> PageCache {
        let mut b = PageCache::builder()
            .mmap_mode(cfg.mode)
            .dirty_tracking(cfg.tracking)
            .large_folios(cfg.large)
            .hugetlb(cfg.hugetlb);
        if let Some(l) = cfg.limit {
            b = b.memory_limit(l);
        }
        let cache = b.build();
        cache
            .start_fault_engine()
            .expect("userfaultfd must be available (see README): this test cannot run without it");
        cache
    }

    fn open(&self, cache: &PageCache) -> File {
        if self.cfg.direct {
            let store = DirectFileStore::open(&self.path).expect("O_DIRECT on the test directory's filesystem");
            cache.open_with_ops("fsx-direct", StoreOps::new(store)).unwrap()
        } else {
            cache.open(&self.path).unwrap()
        }
    }

    fn file(&self) -> &File {
        self.file.as_ref().unwrap()
    }
    fn map(&self) -> &MmapRaw {
        self.map.as_ref().unwrap()
    }
    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    fn note(&mut self, s: String) {
        if self.log.len() == 40 {
            self.log.pop_front();
        }
        self.log.push_back(s);
    }

    fn set_model_len(&mut self, new: u64) {
        self.model.resize(new as usize, 0);
    }

    /// The on-disk bytes of `[off, end)` (clamped to the model) must equal
    /// the model's.
    fn check_disk_range(&self, off: u64, end: u64, what: &str) {
        let end = end.min(self.size());
        if off >= end {
            return;
        }
        let disk = StdFile::open(&self.path).unwrap();
        let mut got = vec![0u8; (end - off) as usize];
        let n = disk.read_at(&mut got, off).unwrap();
        // The file on disk may be shorter than the range only where the
        // model holds zeros (a hole that a later extending write, not yet
        // synced, will cover): ranged syncs do not promise the size.
        if let Some(i) = (off as usize + n..end as usize).find(|&i| self.model[i] != 0) {
            panic!(
                "{what}: on-disk file ends at {} but byte {i} of the synced range is {}",
                off as usize + n,
                self.model[i]
            );
        }
        got.truncate(n);
        if let Some(i) = (0..got.len()).find(|&i| got[i] != self.model[off as usize + i]) {
            panic!(
                "{what}: on-disk byte {} is {}, model {}",
                off as usize + i,
                got[i],
                self.model[off as usize + i]
            );
        }
    }

    fn check_disk_all(&self, what: &str) {
        let disk = std::fs::read(&self.path).unwrap();
        assert_eq!(disk.len(), self.model.len(), "{what}: on-disk length");
        if let Some(i) = (0..disk.len()).find(|&i| disk[i] != self.model[i]) {
            panic!("{what}: on-disk byte {i} is {}, model {}", disk[i], self.model[i]);
        }
    }

    fn check_range(&self, off: u64, len: usize, what: &str) {
        let mut got = vec![0u8; len];
        let n = self.file().read_at(&mut got, off).unwrap();
        let expect = self.size().saturating_sub(off).min(len as u64) as usize;
        assert_eq!(n, expect, "{what}: read_at length at {off}+{len}");
        if let Some(i) = (0..n).find(|&i| got[i] != self.model[off as usize + i]) {
            panic!(
                "{what}: read_at byte {} is {}, model {}",
                off as usize + i,
                got[i],
                self.model[off as usize + i]
            );
        }
    }

    fn check_all(&self, what: &str) {
        assert_eq!(self.file().len().unwrap(), self.size(), "{what}: len()");
        self.check_range(0, MAP, what);
        let twin = std::fs::read(&self.twin_path).unwrap();
        assert!(twin == self.model, "{what}: the kernel twin disagrees with the model");
    }

    /// One step on the long-lived private mapping: make it, write the
    /// same random bytes to it and to the kernel twin's, compare a range
    /// below end of file, or drop it.
    fn private_step(&mut self, rng: &mut Rng, ctx: &str) {
        let size = self.size() as usize;
        if self.pmap.is_none() {
            self.note(format!("{ctx}: private mapping made"));
            // SAFETY: only this thread touches the private mappings, and
            // only below end of file.
            let ours = unsafe { self.file().mmap_mut(0, MAP, Share::Private) }.unwrap();
            // SAFETY: as above, for the twin's.
            let theirs = unsafe { memmap2::MmapOptions::new().len(MAP).map_copy(&self.twin) }.unwrap();
            self.pmap = Some((ours, theirs));
            return;
        }
        let which = rng.below(8);
        let off = rng.below(size as u64) as usize;
        let len = (1 + rng.below(2 * PAGE_SIZE as u64) as usize).min(size - off);
        if which == 0 {
            self.note(format!("{ctx}: private mapping dropped"));
            self.pmap = None;
        } else if which <= 3 && size >= PAGE_SIZE {
            // Only pages wholly below end of file: the copy of the page
            // holding it would take the bytes past the end, which a shared
            // mapping's store may have left there (unspecified until a
            // write-back zeroes them, at different times here and in the
            // kernel: fsx found the two copies differing there once the
            // file grew).
            let below = size / PAGE_SIZE * PAGE_SIZE;
            let off = off % below;
            let len = len.min(below - off);
            self.note(format!("{ctx}: private write {off}+{len}"));
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf);
            let (ours, theirs) = self.pmap.as_mut().unwrap();
            ours[off..off + len].copy_from_slice(&buf);
            theirs[off..off + len].copy_from_slice(&buf);
        } else {
            self.note(format!("{ctx}: private compare below end of file"));
            let (ours, theirs) = self.pmap.as_ref().unwrap();
            if ours[..size] == theirs[..size] {
                return;
            }
            if let Some(i) = (0..size).find(|&i| ours[i] != theirs[i]) {
                panic!(
                    "{ctx}: private mapping byte {i} is {}, the kernel's private mapping has {} (file byte {})",
                    ours[i], theirs[i], self.model[i]
                );
            }
        }
    }

    fn reopen_map(&mut self) {
        self.map = Some(self.file().mmap_raw(0, MAP).unwrap());
    }

    fn step(&mut self, rng: &mut Rng, op: usize) {
        let size = self.size();
        // Bytes a mapping may touch without SIGBUS: up to the end of EOF's
        // page for reads, up to EOF for writes (bytes past EOF in the last
        // page are not file data, for the kernel either).
        let map_read_end = if self.eof_garbage_at == Some(size) {
            size
        } else {
            size.next_multiple_of(PAGE_SIZE as u64)
        };
        let ctx = format!("op {op}");
        match rng.below(100) {
            0..=17 => {
                self.counts[0] += 1;
                let off = rng.below(size + 2 * PAGE_SIZE as u64);
                let len = 1 + rng.below(5 * PAGE_SIZE as u64) as usize;
                self.note(format!("{ctx}: read_at {off}+{len}"));
                self.check_range(off, len, &ctx);
            }
            18..=35 => {
                self.counts[1] += 1;
                let off = rng.below(MAX - 1);
                let len = (1 + rng.below(5 * PAGE_SIZE as u64)).min(MAX - off) as usize;
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                self.note(format!("{ctx}: write_at {off}+{len}"));
                assert_eq!(self.file().write_at(&buf, off).unwrap(), len, "{ctx}");
                self.twin.write_all_at(&buf, off).unwrap();
                let end = off as usize + len;
                if end > self.model.len() {
                    self.model.resize(end, 0);
                }
                self.model[off as usize..end].copy_from_slice(&buf);
                self.check_range(off.saturating_sub(100), len + 200, &ctx);
            }
            36..=47 if map_read_end > 0 => {
                self.counts[2] += 1;
                let off = rng.below(map_read_end);
                let len = (1 + rng.below(3 * PAGE_SIZE as u64)).min(map_read_end - off) as usize;
                self.note(format!("{ctx}: mapped read {off}+{len}"));
                let mut got = vec![0u8; len];
                self.map().read(off as usize, &mut got);
                for (i, &b) in got.iter().enumerate() {
                    let o = off as usize + i;
                    let want = self.model.get(o).copied().unwrap_or(0);
                    assert_eq!(b, want, "{ctx}: mapped byte {o} (size {size})");
                }
            }
            48..=57 if size > 0 => {
                self.counts[3] += 1;
                let off = rng.below(size);
                let len = (1 + rng.below(3 * PAGE_SIZE as u64)).min(size - off) as usize;
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                self.note(format!("{ctx}: mapped write {off}+{len}"));
                self.map().write(off as usize, &buf);
                // SAFETY: in bounds of the twin mapping and below the twin's
                // EOF; only this thread touches it.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), self.twin_map.as_mut_ptr().add(off as usize), len)
                };
                self.model[off as usize..off as usize + len].copy_from_slice(&buf);
                self.check_range(off, len, &ctx);
            }
            58..=61 => {
                self.counts[4] += 1;
                // Half the time near the current size (inside its folio).
                let new = if rng.below(2) == 0 {
                    rng.below(MAX)
                } else {
                    (size + rng.below(64 * 1024)).saturating_sub(32 * 1024).min(MAX)
                };
                self.note(format!("{ctx}: truncate {size} -> {new}"));
                self.file().truncate(new).unwrap();
                self.twin.set_len(new).unwrap();
                self.set_model_len(new);
                self.check_range(new.saturating_sub(PAGE_SIZE as u64 + 7), 3 * PAGE_SIZE, &ctx);
            }
            62..=65 if size > 0 => {
                self.counts[5] += 1;
                let off = rng.below(size);
                let len = 1 + rng.below(96 * 1024);
                self.note(format!("{ctx}: punch {off}+{len}"));
                self.file().punch_hole(off, len).unwrap();
                // SAFETY: fallocate on our own fd; no memory involved.
                let r = unsafe {
                    libc::fallocate(
                        self.twin.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as i64,
                        len as i64,
                    )
                };
                assert_eq!(r, 0, "twin punch");
                let end = (off + len).min(size);
                self.model[off as usize..end as usize].fill(0);
                self.check_range(off.saturating_sub(10), (len as usize).min(64 * 1024) + 20, &ctx);
            }
            66..=67 => {
                self.counts[6] += 1;
                self.note(format!("{ctx}: fsync"));
                self.file().fsync().unwrap();
                self.check_disk_all(&format!("{ctx}: after fsync"));
            }
            68..=70 => {
                self.counts[7] += 1;
                let start = rng.below(size + 1);
                let end = start + 1 + rng.below(64 * 1024);
                self.note(format!("{ctx}: sync_range {start}..{end}"));
                self.file().sync_range(start, end).unwrap();
                self.check_disk_range(start, end, &format!("{ctx}: after sync_range"));
            }
            71..=73 if size > 0 => {
                self.counts[8] += 1;
                let off = rng.below(size);
                let len = (1 + rng.below(32 * 1024)).min(size - off) as usize;
                self.note(format!("{ctx}: mapping flush_range {off}+{len}"));
                self.map().flush_range(off as usize, len).unwrap();
                self.check_disk_range(off, off + len as u64, &format!("{ctx}: after flush_range"));
            }
            74..=76 => {
                self.counts[9] += 1;
                let n = 1 + rng.below(16) as i64;
                self.note(format!("{ctx}: writeback {n}"));
                self.file().writeback(n).unwrap();
            }
            77..=80 => {
                self.counts[10] += 1;
                let off = rng.below(MAX);
                let len = 1 + rng.below(128 * 1024);
                let adv = if rng.below(2) == 0 {
                    Advice::DontNeed
                } else {
                    Advice::WillNeed
                };
                self.note(format!("{ctx}: advise {adv:?} {off}+{len}"));
                self.file().advise(adv, off, len).unwrap();
                self.check_range(off, (len as usize).min(16 * 1024), &ctx);
            }
            82..=83 if size > 0 && !self.cfg.hugetlb => {
                self.counts[16] += 1;
                self.private_step(rng, &ctx);
            }
            81..=83 if size > 0 => {
                self.counts[11] += 1;
                let off = rng.below(size);
                let len = (1 + rng.below(2 * PAGE_SIZE as u64)).min(size - off) as usize;
                self.note(format!("{ctx}: private mapping, COW {off}+{len}"));
                // SAFETY: only this thread touches the private mapping, and
                // only below EOF.
                let p = unsafe { self.file().mmap_mut(0, MAP, Share::Private) };
                if self.cfg.hugetlb {
                    // hugetlbfs drops private copies when the cache evicts.
                    assert!(
                        matches!(p, Err(upcache::Error::Unsupported { .. })),
                        "{ctx}: a private writable mapping of a hugetlb cache is refused"
                    );
                    return;
                }
                let mut p = p.unwrap();
                let o = off as usize;
                assert!(p[o..o + len] == self.model[o..o + len], "{ctx}: private mapping read");
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                p[o..o + len].copy_from_slice(&buf);
                assert!(p[o..o + len] == buf[..], "{ctx}: private mapping sees its own write");
                drop(p);
                self.check_range(off, len, &format!("{ctx}: a private write must not reach the file"));
            }
            84 => {
                self.counts[12] += 1;
                let keep_map = rng.below(2) == 0;
                self.note(format!("{ctx}: close and reopen (mapping kept: {keep_map})"));
                if !keep_map {
                    self.map = None;
                }
                let f = self.file.take().unwrap();
                f.close().unwrap();
                drop(f);
                if !keep_map {
                    self.check_disk_all(&format!("{ctx}: after close"));
                }
                let f = self.open(self.cache.as_ref().unwrap());
                self.file = Some(f);
                if !keep_map {
                    self.reopen_map();
                }
                self.check_range(0, MAP, &ctx);
            }
            85 => {
                self.counts[13] += 1;
                self.note(format!("{ctx}: drop and rebuild the PageCache"));
                // A mapping would keep the old cache's copy of the file,
                // which the new cache does not share.
                self.pmap = None;
                self.map = None;
                self.file = None;
                self.cache = None;
                self.check_disk_all(&format!("{ctx}: after dropping the cache"));
                let cache = Self::new_cache(self.cfg);
                self.file = Some(self.open(&cache));
                self.cache = Some(cache);
                self.reopen_map();
            }
            86..=87 if size % PAGE_SIZE as u64 != 0 && size < MAP as u64 => {
                // A store past end of file, inside its page (allowed: the
                // page is mapped). Not file data: a later growth must read
                // zeros there (the kernel's `pagecache_isize_extended`).
                self.counts[15] += 1;
                let len = (size.next_multiple_of(PAGE_SIZE as u64) - size) as usize;
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                self.note(format!("{ctx}: mapped store past EOF {size}+{len}"));
                self.map().write(size as usize, &buf);
                // SAFETY: in bounds of the twin mapping, inside the page of
                // the twin's EOF (mapped); only this thread touches it.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), self.twin_map.as_mut_ptr().add(size as usize), len)
                };
                self.eof_garbage_at = Some(size);
                self.check_range(size.saturating_sub(100), 200, &ctx);
            }
            _ => {
                self.counts[14] += 1;
                let off = rng.below(size + 1);
                self.note(format!("{ctx}: read_at 64 KiB at {off}"));
                self.check_range(off, 64 * 1024, &ctx);
            }
        }
        if let Some(at) = self.eof_garbage_at.filter(|&at| at != self.size()) {
            // The size changed since a store past the old end: what the
            // file now holds there (zeros if it grew) must match, in
            // upcache and in the kernel twin.
            let page_end = at.next_multiple_of(PAGE_SIZE as u64);
            // Growth inside the same page leaves the stored bytes past the
            // new end (not file data, for the kernel either); any other
            // change clears them.
            let size = self.size();
            self.eof_garbage_at = (size > at && size < page_end).then_some(size);
            let len = (page_end - at) as usize;
            let what = format!("{ctx}: the bytes a mapped store left past the old end {at}");
            self.check_range(at, len, &what);
            let mut twin = vec![0u8; len];
            let n = self.twin.read_at(&mut twin, at).unwrap();
            let model = &self.model[(at as usize).min(self.model.len())..];
            assert!(twin[..n] == model[..n.min(model.len())], "{what}: the kernel twin");
        }
        if op % 512 == 511 {
            self.check_all(&format!("{ctx}: periodic whole-file check"));
        }
    }
}

fn run(cfg: Config, seed: u64, ops: usize) {
    let dir = tempdir();
    let path = dir.path().join("upcache");
    let twin_path = dir.path().join("twin");
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; 200 * 1024 + 123];
    rng.fill(&mut model);
    std::fs::write(&path, &model).unwrap();
    std::fs::write(&twin_path, &model).unwrap();
    let twin = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&twin_path)
        .unwrap();
    let twin_map = memmap2::MmapOptions::new().len(MAP).map_raw(&twin).unwrap();
    let cache = World::new_cache(cfg);
    let mut w = World {
        cfg,
        path,
        twin_path,
        cache: None,
        file: None,
        map: None,
        twin,
        twin_map,
        model,
        log: VecDeque::new(),
        counts: [0; 17],
        eof_garbage_at: None,
        pmap: None,
    };
    w.file = Some(w.open(&cache));
    w.cache = Some(cache);
    w.reopen_map();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for op in 0..ops {
            let t = std::time::Instant::now();
            w.step(&mut rng, op);
            if t.elapsed() > std::time::Duration::from_millis(500) {
                // Diagnostics only (never asserted): a slow step is worth a look.
                eprintln!("fsx {cfg:?}: op {op} took {:?}: {}", t.elapsed(), w.log.back().unwrap());
            }
        }
        w.check_all("final");
        w.map = None;
        let f = w.file.take().unwrap();
        f.close().unwrap();
        w.check_disk_all("final, after close");
    }));
    if let Err(e) = res {
        eprintln!("fsx failure: {cfg:?}, seed {seed} (replay: UPCACHE_TEST_SEED={seed}); last operations:");
        for l in &w.log {
            eprintln!("  {l}");
        }
        std::panic::resume_unwind(e);
    }
    eprintln!("fsx {cfg:?} seed {seed}: {ops} ops, mix {:?}", w.counts);
    if ops >= 5000 {
        assert!(
            w.counts[..16].iter().all(|&c| c > 0) && (cfg.hugetlb || w.counts[16] > 0),
            "every kind of operation ran: {:?}",
            w.counts
        );
    }
}

fn run_config(name: &'static str, cfg: Config, seed_base: u64) {
    let ops = ops_count(20_000);
    let s = seed(seed_base);
    watchdog(name, 900, move || run(cfg, s, ops));
}

#[test]
fn fsx_missing() {
    run_config(
        "fsx missing",
        Config {
            mode: UffdMode::Missing,
            tracking: DirtyTracking::WriteFault,
            limit: None,
            direct: false,
            large: false,
            hugetlb: false,
        },
        11,
    );
}

#[test]
fn fsx_minor() {
    run_config(
        "fsx minor",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::WriteFault,
            limit: None,
            direct: false,
            large: false,
            hugetlb: false,
        },
        12,
    );
}

#[test]
fn fsx_missing_memory_limit() {
    run_config(
        "fsx missing, memory limit",
        Config {
            mode: UffdMode::Missing,
            tracking: DirtyTracking::WriteFault,
            limit: Some(LIMIT),
            direct: false,
            large: false,
            hugetlb: false,
        },
        13,
    );
}

#[test]
fn fsx_minor_memory_limit() {
    run_config(
        "fsx minor, memory limit",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::WriteFault,
            limit: Some(LIMIT),
            direct: false,
            large: false,
            hugetlb: false,
        },
        14,
    );
}

#[test]
fn fsx_missing_direct() {
    run_config(
        "fsx missing, O_DIRECT",
        Config {
            mode: UffdMode::Missing,
            tracking: DirtyTracking::WriteFault,
            limit: None,
            direct: true,
            large: false,
            hugetlb: false,
        },
        15,
    );
}

#[test]
fn fsx_minor_direct() {
    run_config(
        "fsx minor, O_DIRECT",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::WriteFault,
            limit: None,
            direct: true,
            large: false,
            hugetlb: false,
        },
        16,
    );
}

#[test]
fn fsx_missing_direct_memory_limit() {
    run_config(
        "fsx missing, O_DIRECT, memory limit",
        Config {
            mode: UffdMode::Missing,
            tracking: DirtyTracking::WriteFault,
            limit: Some(LIMIT),
            direct: true,
            large: false,
            hugetlb: false,
        },
        17,
    );
}

#[test]
fn fsx_minor_direct_memory_limit() {
    run_config(
        "fsx minor, O_DIRECT, memory limit",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::WriteFault,
            limit: Some(LIMIT),
            direct: true,
            large: false,
            hugetlb: false,
        },
        18,
    );
}

#[test]
fn fsx_minor_async() {
    run_config(
        "fsx minor, async dirty tracking",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::Async,
            limit: None,
            direct: false,
            large: false,
            hugetlb: false,
        },
        19,
    );
}

#[test]
fn fsx_minor_async_direct_memory_limit() {
    run_config(
        "fsx minor, async dirty tracking, O_DIRECT, memory limit",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::Async,
            limit: Some(LIMIT),
            direct: true,
            large: false,
            hugetlb: false,
        },
        20,
    );
}

/// Large folios: the whole file lives in one 2 MiB folio that reaches past
/// end of file; truncates and punches land inside it.
#[test]
fn fsx_missing_large_folios() {
    run_config(
        "fsx missing, large folios",
        Config {
            mode: UffdMode::Missing,
            tracking: DirtyTracking::WriteFault,
            limit: None,
            direct: false,
            large: true,
            hugetlb: false,
        },
        21,
    );
}

#[test]
fn fsx_minor_large_folios_direct() {
    run_config(
        "fsx minor, large folios, O_DIRECT",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::WriteFault,
            limit: None,
            direct: true,
            large: true,
            hugetlb: false,
        },
        22,
    );
}

#[test]
fn fsx_minor_async_large_folios() {
    run_config(
        "fsx minor, async dirty tracking, large folios",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::Async,
            limit: None,
            direct: false,
            large: true,
            hugetlb: false,
        },
        23,
    );
}

/// The hugetlb page store: the file lives in one 2 MiB hugetlbfs page that
/// is mapped, protected and poisoned whole; private mappings copy it on
/// write from the pool too.
#[test]
fn fsx_minor_hugetlb() {
    let Some(_pool) = common::hugetlb_pool::pool_or_skip(16) else {
        return;
    };
    run_config(
        "fsx minor, hugetlb",
        Config {
            mode: UffdMode::Minor,
            tracking: DirtyTracking::WriteFault,
            limit: Some(LIMIT),
            direct: false,
            large: false,
            hugetlb: true,
        },
        24,
    );
}
