//! Cache-wide counters and their snapshot.

use crate::sync::{AtomicU64, Ordering};
use crate::types::PAGE_SIZE;

/// Live counters shared by every address space of a cache. Relaxed: they are
/// statistics, never used for synchronization.
#[derive(Debug, Default)]
pub(crate) struct CacheStats {
    hits: Sharded,
    misses: Sharded,
    folios: AtomicU64,
    pages: AtomicU64,
    dirty_pages: AtomicU64,
    writeback_pages: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    write_errors: AtomicU64,
    read_errors: AtomicU64,
    faults_fast: AtomicU64,
    faults_slow: AtomicU64,
    faults_wp: AtomicU64,
    sigbus: AtomicU64,
    evicted_pages: AtomicU64,
    throttled: AtomicU64,
    harvested_pages: AtomicU64,
    direct_fallbacks: AtomicU64,
    unfilled_pages: AtomicU64,
}

/// A counter bumped on every cache hit: one `AtomicU64` shared by all
/// threads would bounce its cache line between CPUs on every lookup (it
/// halved two-thread pinned lookups, BENCHMARKS.md `kv`), so, like the
/// kernel's per-CPU `vm_event` counters, each thread adds to one of
/// `SHARDS` cache-line-sized slots and a snapshot sums them.
#[derive(Debug, Default)]
pub(crate) struct Sharded {
    shards: [Padded; SHARDS],
}

const SHARDS: usize = 16;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

#[cfg(not(loom))]
fn shard() -> usize {
    use std::cell::Cell;
    static NEXT: crate::sync::AtomicUsize = crate::sync::AtomicUsize::new(0);
    crate::sync::thread_local! {
        static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    MINE.try_with(|m| {
        if m.get() == usize::MAX {
            m.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        m.get()
    })
    .unwrap_or(0)
}

/// Loom: one slot (the models never read statistics).
#[cfg(loom)]
fn shard() -> usize {
    0
}

impl Sharded {
    #[inline]
    fn inc(&self) {
        self.shards[shard()].0.fetch_add(1, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.shards.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

macro_rules! counter {
    ($inc:ident, $field:ident) => {
        #[inline]
        pub(crate) fn $inc(&self) {
            self.$field.fetch_add(1, Ordering::Relaxed);
        }
    };
}

impl CacheStats {
    #[inline]
    pub(crate) fn hit(&self) {
        self.hits.inc();
    }
    #[inline]
    pub(crate) fn miss(&self) {
        self.misses.inc();
    }
    counter!(read_io, reads);
    counter!(write_io, writes);
    counter!(write_error, write_errors);
    counter!(read_error, read_errors);
    counter!(fault_fast, faults_fast);
    counter!(fault_slow, faults_slow);
    counter!(fault_wp, faults_wp);
    counter!(sigbus, sigbus);
    counter!(throttled, throttled);

    pub(crate) fn folio_added(&self, pages: u64) {
        self.folios.fetch_add(1, Ordering::Relaxed);
        self.pages.fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn folio_removed(&self, pages: u64) {
        self.folios.fetch_sub(1, Ordering::Relaxed);
        self.pages.fetch_sub(pages, Ordering::Relaxed);
    }
    pub(crate) fn evicted(&self, pages: u64) {
        self.evicted_pages.fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn direct_fallbacks(&self, n: u64) {
        self.direct_fallbacks.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn unfilled_page(&self) {
        self.unfilled_pages.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn harvested(&self, pages: u64) {
        self.harvested_pages.fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn dirty_add(&self, pages: u64) {
        self.dirty_pages.fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn dirty_sub(&self, pages: u64) {
        self.dirty_pages.fetch_sub(pages, Ordering::Relaxed);
    }
    pub(crate) fn writeback_add(&self, pages: u64) {
        self.writeback_pages.fetch_add(pages, Ordering::Relaxed);
    }
    pub(crate) fn writeback_sub(&self, pages: u64) {
        self.writeback_pages.fetch_sub(pages, Ordering::Relaxed);
    }

    /// Pages cached now (one load; reclaim's hot check).
    pub(crate) fn cached_pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// Bytes dirty now (one load; the background threshold's check).
    pub(crate) fn dirty_bytes(&self) -> u64 {
        self.dirty_pages.load(Ordering::Relaxed) * PAGE_SIZE as u64
    }

    /// Bytes dirty or under write-back now: what the dirty limit bounds
    /// (the kernel's `balance_dirty_pages` counts `NR_WRITEBACK` too; its
    /// background threshold does not). A folio's dirty bit is cleared for
    /// the I/O, so without the write-back part dirty memory read as zero
    /// while it was being written, and writers went unthrottled.
    pub(crate) fn dirty_and_writeback_bytes(&self) -> u64 {
        (self.dirty_pages.load(Ordering::Relaxed) + self.writeback_pages.load(Ordering::Relaxed)) * PAGE_SIZE as u64
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            hits: self.hits.sum(),
            misses: self.misses.sum(),
            folios: l(&self.folios),
            bytes_cached: l(&self.pages) * PAGE_SIZE as u64,
            dirty_bytes: l(&self.dirty_pages) * PAGE_SIZE as u64,
            writeback_bytes: l(&self.writeback_pages) * PAGE_SIZE as u64,
            read_ios: l(&self.reads),
            write_ios: l(&self.writes),
            read_errors: l(&self.read_errors),
            write_errors: l(&self.write_errors),
            faults_fast: l(&self.faults_fast),
            faults_slow: l(&self.faults_slow),
            faults_wp: l(&self.faults_wp),
            sigbus: l(&self.sigbus),
            evicted_bytes: l(&self.evicted_pages) * PAGE_SIZE as u64,
            throttled: l(&self.throttled),
            harvested_bytes: l(&self.harvested_pages) * PAGE_SIZE as u64,
            direct_fallbacks: l(&self.direct_fallbacks),
            unfilled_pages: l(&self.unfilled_pages),
        }
    }
}

/// One address space's counters: every event is counted for the file and
/// for its cache. Per-file counters live in the address space (their own
/// cache lines), so files do not contend with each other more than the
/// cache-wide counters already make them.
#[derive(Debug)]
pub(crate) struct FileStats {
    cache: crate::sync::Arc<CacheStats>,
    own: CacheStats,
}

impl FileStats {
    /// This file's own dirty bytes.
    pub(crate) fn own_dirty_bytes(&self) -> u64 {
        self.own.dirty_bytes()
    }
}

macro_rules! both {
    ($($name:ident),*) => {
        $(
            #[inline]
            pub(crate) fn $name(&self) {
                self.cache.$name();
                self.own.$name();
            }
        )*
    };
}

macro_rules! both_n {
    ($($name:ident),*) => {
        $(
            #[inline]
            pub(crate) fn $name(&self, n: u64) {
                self.cache.$name(n);
                self.own.$name(n);
            }
        )*
    };
}

impl FileStats {
    pub(crate) fn new(cache: crate::sync::Arc<CacheStats>) -> FileStats {
        FileStats {
            cache,
            own: CacheStats::default(),
        }
    }

    both!(
        hit,
        miss,
        read_io,
        write_io,
        write_error,
        read_error,
        fault_fast,
        fault_slow,
        fault_wp,
        sigbus,
        throttled,
        unfilled_page
    );
    both_n!(
        folio_added,
        folio_removed,
        evicted,
        harvested,
        direct_fallbacks,
        dirty_add,
        dirty_sub,
        writeback_add,
        writeback_sub
    );

    /// This file's counters.
    pub(crate) fn snapshot(&self) -> Stats {
        self.own.snapshot()
    }
}

/// A snapshot of a cache's counters ([`PageCache::stats`](crate::PageCache::stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Folio lookups on the read path that found the folio cached.
    pub hits: u64,
    /// Lookups that did not (each started a read from the store).
    pub misses: u64,
    /// Folios cached.
    pub folios: u64,
    /// Bytes cached.
    pub bytes_cached: u64,
    /// Bytes dirty.
    pub dirty_bytes: u64,
    /// Bytes under writeback.
    pub writeback_bytes: u64,
    /// Folio reads issued to the store (`read_folio` calls and readahead folios).
    pub read_ios: u64,
    /// Folio writes issued to the store (`writepage` calls).
    pub write_ios: u64,
    /// Failed folio reads.
    pub read_errors: u64,
    /// Failed folio writes.
    pub write_errors: u64,
    /// Faults resolved by `map_pages` alone (no sleeping, no I/O).
    pub faults_fast: u64,
    /// Faults that took the `filemap_fault` slow path.
    pub faults_slow: u64,
    /// Write-protect faults (`page_mkwrite`).
    pub faults_wp: u64,
    /// Faults answered with SIGBUS.
    pub sigbus: u64,
    /// Bytes evicted by reclaim.
    pub evicted_bytes: u64,
    /// Writes throttled past the dirty limit.
    pub throttled: u64,
    /// Bytes of folios that async dirty tracking
    /// ([`DirtyTracking::Async`](crate::DirtyTracking::Async)) found written
    /// through a mapping and marked dirty (a harvest, or reclaim's check).
    pub harvested_bytes: u64,
    /// Requests a direct-I/O store ([`DirectFileStore`](crate::DirectFileStore))
    /// served with buffered I/O instead, the kernel page cache included
    /// (unaligned tails only; 0 on an aligned workload).
    pub direct_fallbacks: u64,
    /// Pages of uptodate folios that their fill never wrote (an engine's
    /// `read_folio` that filled part of the folio, a store whose read
    /// claimed bytes it did not write), found by a fault and given zeros.
    /// Not 0: the engine's fill has a bug (the contract: fill every byte).
    pub unfilled_pages: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hits {} misses {} folios {} cached {} KiB dirty {} KiB writeback {} KiB reads {} writes {} read_errors {} write_errors {} faults fast {} slow {} wp {} sigbus {} evicted {} KiB throttled {} harvested {} KiB direct_fallbacks {} unfilled_pages {}",
            self.hits,
            self.misses,
            self.folios,
            self.bytes_cached / 1024,
            self.dirty_bytes / 1024,
            self.writeback_bytes / 1024,
            self.read_ios,
            self.write_ios,
            self.read_errors,
            self.write_errors,
            self.faults_fast,
            self.faults_slow,
            self.faults_wp,
            self.sigbus,
            self.evicted_bytes / 1024,
            self.throttled,
            self.harvested_bytes / 1024,
            self.direct_fallbacks,
            self.unfilled_pages
        )
    }
}
