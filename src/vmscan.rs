//! Reclaim under a memory limit (`mm/vmscan.c`), with an S3-FIFO
//! replacement policy.
//!
//! # Policy
//!
//! S3-FIFO (Yang et al., SOSP 2023): new folios enter a small FIFO (10 % of
//! the cache); a folio used again while there moves to the main FIFO,
//! otherwise it is evicted and remembered in a ghost FIFO; a folio whose
//! index is still a ghost when it is read back enters main directly. Main is
//! a CLOCK with a two-bit use counter (the folio's REFERENCED and ACTIVE
//! bits). A one-pass scan fills and drains the small FIFO without touching
//! the hot set in main: the policy is scan-resistant.
//!
//! Queue entries are `(address space id, page index)`, never pointers: an
//! entry whose folio is gone (truncated, replaced) is skipped when it
//! reaches the head, or dropped earlier by a compaction once the queues
//! have doubled since the last one (so they stay proportional to what is
//! cached even when reclaim never runs).
//!
//! # Eviction protocol (`__remove_mapping`)
//!
//! Trylock the folio; skip it if locked, dirty (it is written back first,
//! and evicted on a later pass), under writeback, or if `release_folio`
//! refuses. Then freeze the refcount from exactly "index + ours" to 0:
//! anybody else holding a reference (a reader copying, a fault mapping, a
//! waiter) makes it fail, and once frozen no lookup can take one. Frozen
//! folios are batched (up to 32); each run of adjacent ones in a file is
//! punched with one `fallocate` (which zaps it from every user mapping)
//! while they are still indexed, so that no new folio can appear at the
//! same file offset before the punch; then they leave the index and are
//! freed. A folio is never
//! evicted dirty: data is lost only by truncate.
//!
//! # Watermarks
//!
//! `limit` is hard: an allocation that would pass it first reclaims
//! directly, in the allocating thread, down to the high watermark (98 %).
//! Past the high watermark a background thread reclaims down to the low
//! watermark (95 %).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::thread::{JoinHandle, Thread};

use crate::address_space::{index_delete_folio, AddressSpace};
use crate::aops::WritebackControl;
use crate::folio::{FolioGuard, FolioRef};
use crate::fs_writeback::Spaces;
use crate::stats::CacheStats;
use crate::sync::{Arc, AtomicBool, Mutex, Ordering};
use crate::types::PgOff;

type Key = (u64, u64);

/// A queue entry: the folio's key and its identity (address). An entry
/// whose folio was dropped and replaced at the same index no longer
/// matches and is discarded when it reaches the head, so each folio has
/// one live entry (the kernel's PG_lru membership).
type Entry = (Key, usize);

/// Replacement policy of a cache with a memory limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplacementPolicy {
    /// S3-FIFO: small + main + ghost FIFOs (the default; scan-resistant).
    #[default]
    S3Fifo,
    /// CLOCK (second chance) over one FIFO: the classic LRU approximation,
    /// kept as the baseline the hit-ratio comparison measures against.
    Clock,
}

#[derive(Default)]
struct Queues {
    small: VecDeque<Entry>,
    main: VecDeque<Entry>,
    ghost: VecDeque<Key>,
    ghost_set: HashSet<Key>,
    /// Queue length past which `note_new` drops stale entries
    /// ([`Reclaimer::compact`]); 0 means `COMPACT_MIN`.
    compact_at: usize,
}

/// The queues are compacted when they pass this many entries, or twice
/// what the last compaction left, whichever is more: the cost of a
/// compaction is paid for by the insertions before it.
const COMPACT_MIN: usize = 1024;

/// The cache-wide reclaimer.
pub(crate) struct Reclaimer {
    policy: ReplacementPolicy,
    limit_pages: u64,
    high_pages: u64,
    low_pages: u64,
    queues: Mutex<Queues>,
    spaces: Arc<Spaces>,
    stats: Arc<CacheStats>,
    stop: AtomicBool,
    kswapd: Mutex<Option<(Thread, JoinHandle<()>)>>,
    /// Serializes reclaimers so they do not fight over the queue heads.
    shrinking: Mutex<()>,
}

/// What happened to one queue entry.
enum Outcome {
    /// Evictable: locked, its count frozen, still indexed; punched and
    /// freed with the rest of the batch.
    Frozen(Arc<AddressSpace>, FolioGuard),
    /// Not evictable now: keep it, at the tail.
    Keep,
    /// Entry stale (folio gone): drop it.
    Gone,
    /// Used since last seen: give it another round.
    Used,
    /// Dirty, seen by background reclaim: keep it, and write it back once
    /// the `shrinking` mutex is released (never under it: direct
    /// reclaimers wait on that mutex, and must not wait for I/O).
    WriteBack(Arc<AddressSpace>, FolioRef),
}

impl Reclaimer {
    pub(crate) fn new(
        limit_bytes: u64,
        policy: ReplacementPolicy,
        stats: Arc<CacheStats>,
        spaces: Arc<Spaces>,
    ) -> Arc<Reclaimer> {
        let limit = (limit_bytes / crate::types::PAGE_SIZE as u64).max(64);
        let r = Arc::new(Reclaimer {
            policy,
            limit_pages: limit,
            high_pages: limit * 98 / 100,
            low_pages: limit * 95 / 100,
            queues: Mutex::new(Queues::default()),
            spaces,
            stats,
            stop: AtomicBool::new(false),
            kswapd: Mutex::new(None),
            shrinking: Mutex::new(()),
        });
        let me = r.clone();
        let h = std::thread::Builder::new()
            .name("upcache-kswapd".into())
            .spawn(move || me.kswapd_main())
            .expect("spawn reclaim thread");
        *r.kswapd.lock() = Some((h.thread().clone(), h));
        r
    }

    /// Entries in the small and main queues.
    pub(crate) fn queue_len(&self) -> usize {
        let q = self.queues.lock();
        q.small.len() + q.main.len()
    }

    /// The hard limit in bytes.
    pub(crate) fn limit_bytes(&self) -> u64 {
        self.limit_pages * crate::types::PAGE_SIZE as u64
    }

    /// Stop and join the background thread (the cache is going away).
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let h = self.kswapd.lock().take();
        if let Some((t, h)) = h {
            t.unpark();
            let _ = h.join();
        }
    }

    fn cached_pages(&self) -> u64 {
        self.stats.cached_pages()
    }

    /// Before allocating `pages`: reclaim directly if the hard limit would
    /// be passed; wake the background reclaimer past the high watermark.
    ///
    /// # Locking
    /// Called from `filemap_add_folio`, possibly with `invalidate_lock`
    /// shared or `i_rwsem` held and a new folio locked: reclaim only
    /// trylocks folios and takes no address-space lock.
    pub(crate) fn charge(&self, pages: u64) {
        let now = self.cached_pages() + pages;
        if now > self.limit_pages {
            self.shrink(now.saturating_sub(self.high_pages), true);
        }
        if self.cached_pages() + pages > self.high_pages {
            if let Some((t, _)) = &*self.kswapd.lock() {
                t.unpark();
            }
        }
    }

    /// A folio was added.
    pub(crate) fn note_new(&self, id: u64, index: PgOff, folio: usize) {
        let key = (id, index.0);
        let entry = (key, folio);
        let mut q = self.queues.lock();
        if self.policy == ReplacementPolicy::Clock || q.ghost_set.remove(&key) {
            q.main.push_back(entry);
        } else {
            q.small.push_back(entry);
        }
        if q.small.len() + q.main.len() > q.compact_at.max(COMPACT_MIN) {
            let files = self.compact(&mut q);
            // Any last reference to a file goes after the queue lock: its
            // drop writes the file back and uncharges its folios.
            drop(q);
            drop(files);
        }
    }

    /// Drop the entries whose folio is gone (truncated, punched, evicted
    /// by `advise(DontNeed)`, its file closed). They used to wait for
    /// reclaim to reach them, and reclaim runs only near the limit: a file
    /// written and truncated over and over (a recycled log) under a limit
    /// it never approached grew the queues without bound
    /// (tests/reclaim.rs,
    /// `reclaim_queues_do_not_grow_with_folios_that_are_gone`). A folio
    /// found frozen keeps its entry (`consider` explains why). Returns
    /// the files looked at, for the caller to drop once the queue lock is
    /// released.
    fn compact(&self, q: &mut Queues) -> HashMap<u64, Option<Arc<AddressSpace>>> {
        let mut files: HashMap<u64, Option<Arc<AddressSpace>>> = HashMap::new();
        let guard = crate::sync::epoch::pin();
        let mut live = |&((id, index), ident): &Entry| -> bool {
            let Some(m) = files.entry(id).or_insert_with(|| self.spaces.get(id)) else {
                return false;
            };
            match m.try_get_folio_pinned(PgOff(index), &guard) {
                crate::address_space::Lookup::Found(f) => f.index().0 == index && &*f as *const _ as usize == ident,
                crate::address_space::Lookup::Absent => false,
                crate::address_space::Lookup::Busy => true,
            }
        };
        q.small.retain(&mut live);
        q.main.retain(&mut live);
        q.compact_at = 2 * (q.small.len() + q.main.len());
        files
    }

    fn kswapd_main(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let now = self.cached_pages();
            if now > self.high_pages {
                // An engine panic in background writeback (`writepage`, its
                // write barrier) must not end kswapd: allocators wait for it.
                let freed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.shrink(now - self.low_pages, false)
                }))
                .unwrap_or_else(|_| {
                    eprintln!("upcache: a reclaim pass panicked (an engine operation); kswapd goes on");
                    0
                });
                if freed == 0 {
                    // Nothing evictable now (locked, in use, dirty and
                    // being written): sleep until the next charge wakes
                    // us, rather than rescan the queues in a loop while
                    // holding the mutex direct reclaimers need.
                    std::thread::park();
                }
            } else {
                std::thread::park();
            }
        }
    }

    /// Free at least `want` pages if possible; returns pages freed.
    ///
    /// Works in batches: up to `BATCH` evictable folios are frozen, then
    /// each run of adjacent ones (per file) is punched with one `fallocate`
    /// (64 KiB costs ~0.9 µs/page here against ~3 µs for a lone 4 KiB page),
    /// then they leave the index and are freed.
    pub(crate) fn shrink(&self, want: u64, direct: bool) -> u64 {
        const BATCH: usize = 32;
        let _one = self.shrinking.lock();
        let mut freed = 0;
        // Two full passes over both queues at most: past that, everything
        // left is pinned, dirty-and-failing or locked.
        let mut budget = {
            let q = self.queues.lock();
            2 * (q.small.len() + q.main.len()) + 64
        };
        let mut frozen: Vec<(Entry, bool, Arc<AddressSpace>, FolioGuard)> = Vec::new();
        // Every address space this pass looked at, kept until `shrinking`
        // is released: a file whose last user went meanwhile is dropped
        // (and written back) here, after the batch, never under the mutex
        // nor while other folios are frozen.
        let mut seen: HashMap<u64, Arc<AddressSpace>> = HashMap::new();
        let mut to_write: Vec<(Arc<AddressSpace>, FolioRef)> = Vec::new();
        let mut frozen_pages = 0;
        while freed + frozen_pages < want && budget > 0 {
            budget -= 1;
            let ((key, ident), from_small) = {
                let mut q = self.queues.lock();
                let total = q.small.len() + q.main.len();
                let from_small = !q.small.is_empty() && (q.main.is_empty() || q.small.len() * 10 >= total);
                let k = if from_small {
                    q.small.pop_front()
                } else {
                    q.main.pop_front()
                };
                match k {
                    Some(k) => (k, from_small),
                    None => break,
                }
            };
            match self.consider(key, ident, from_small, direct, &mut seen) {
                Outcome::Frozen(m, g) => {
                    frozen_pages += g.nr_pages();
                    frozen.push(((key, ident), from_small, m, g));
                    if frozen.len() == BATCH {
                        freed += self.evict_batch(std::mem::take(&mut frozen));
                        frozen_pages = 0;
                    }
                }
                Outcome::Gone => {}
                Outcome::Used => self.queues.lock().main.push_back((key, ident)),
                // Not evictable now (dirty, locked, under writeback, in
                // use): it goes to the main queue's tail, never back to the
                // small one. A small queue full of dirty folios would
                // otherwise be all that reclaim looks at (it prefers the
                // small queue while that holds 10 % or more), and the clean
                // folios behind it in main would never be evicted.
                Outcome::Keep => self.requeue((key, ident), false),
                Outcome::WriteBack(m, f) => {
                    self.requeue((key, ident), false);
                    to_write.push((m, f));
                }
            }
        }
        freed += self.evict_batch(frozen);
        drop(_one);
        drop(seen);
        // Background reclaim's writeback, outside the mutex; the folios
        // are evicted on a later pass once clean.
        for (m, f) in to_write {
            m.reclaim_writepage(f);
        }
        freed
    }

    fn requeue(&self, key: Entry, from_small: bool) {
        let mut q = self.queues.lock();
        if from_small {
            q.small.push_back(key)
        } else {
            q.main.push_back(key)
        }
    }

    /// Punch, unindex and free a batch of frozen folios; returns pages freed.
    fn evict_batch(&self, mut batch: Vec<(Entry, bool, Arc<AddressSpace>, FolioGuard)>) -> u64 {
        batch.sort_by_key(|(_, _, m, g)| (m.id(), g.pos()));
        let mut freed = 0;
        // Evicted folios whose read had failed: their poison is cleared
        // once the whole batch is done (nothing frozen any more).
        let mut errored = Vec::new();
        // Runs are taken off the front of the sorted batch.
        let i = 0;
        while !batch.is_empty() {
            // The run of adjacent folios of one file at the front.
            let mut j = i + 1;
            while j < batch.len()
                && batch[j].2.id() == batch[i].2.id()
                && batch[j - 1].3.pos() + batch[j - 1].3.size() as u64 == batch[j].3.pos()
            {
                j += 1;
            }
            let m = batch[i].2.clone();
            let start = batch[i].3.pos();
            let end = batch[j - 1].3.pos() + batch[j - 1].3.size() as u64;
            let punched = m.punch_memory(start, end - start).is_ok();
            for (key, from_small, m, g) in batch.drain(i..j).collect::<Vec<_>>() {
                if punched {
                    let (had_error, index) = (g.has_error(), g.index());
                    let n = m.finish_eviction(g);
                    freed += n;
                    if had_error {
                        errored.push((m, index, n));
                    }
                    if from_small {
                        self.remember_ghost(key.0);
                    }
                } else {
                    // Could not free the memory: give the folio back.
                    g.unfreeze_refs(2);
                    drop(g);
                    self.requeue(key, from_small);
                }
            }
        }
        for (m, index, n) in errored {
            m.clear_read_error_poison(index, n);
        }
        freed
    }

    fn remember_ghost(&self, key: Key) {
        let mut q = self.queues.lock();
        q.ghost.push_back(key);
        q.ghost_set.insert(key);
        let cap = self.limit_pages as usize;
        while q.ghost.len() > cap {
            if let Some(old) = q.ghost.pop_front() {
                q.ghost_set.remove(&old);
            }
        }
    }

    fn consider(
        &self,
        (id, index): Key,
        ident: usize,
        from_small: bool,
        direct: bool,
        seen: &mut HashMap<u64, Arc<AddressSpace>>,
    ) -> Outcome {
        let Some(m) = self.spaces.get(id) else {
            return Outcome::Gone;
        };
        seen.entry(id).or_insert_with(|| m.clone());
        // Never wait on a frozen folio: it may be one this reclaimer froze
        // itself for another entry of the same index (a stale entry of a
        // folio that was dropped and re-added), still in this batch.
        let f = {
            let guard = crate::sync::epoch::pin();
            match m.try_get_folio_pinned(PgOff(index), &guard) {
                crate::address_space::Lookup::Found(f) => f,
                crate::address_space::Lookup::Absent => return Outcome::Gone,
                // Frozen by someone evicting it (this reclaimer, for a
                // stale duplicate entry; or `advise(DontNeed)`): look again
                // later. Dropping the entry would lose the folio for good
                // if that eviction fails and unfreezes it.
                crate::address_space::Lookup::Busy => return Outcome::Keep,
            }
        };
        if f.index().0 != index || &*f as *const _ as usize != ident {
            // A stale entry (its folio was dropped; this one is newer and
            // has its own entry).
            return Outcome::Gone;
        }
        if f.use_count() > 0 {
            if from_small || self.policy == ReplacementPolicy::Clock {
                f.clear_uses();
            } else {
                f.dec_use();
            }
            return Outcome::Used;
        }
        if f.is_dirty() {
            if direct {
                // Direct reclaim never writes back (nor does the kernel's):
                // it runs in allocating threads that may hold locks and
                // would stall them on I/O. Kick the flusher and move on.
                if let Some(wb) = &m.wb {
                    wb.wake_flusher();
                }
                return Outcome::Keep;
            }
            // Background reclaim writes it back (after dropping the
            // `shrinking` mutex); it is evicted on a later pass once clean.
            return Outcome::WriteBack(m, f);
        }
        match m.freeze_for_eviction(f) {
            Some(g) => Outcome::Frozen(m, g),
            None => Outcome::Keep,
        }
    }
}

/// Call an engine operation from eviction (reclaim, `DontNeed`), where
/// other folios of a reclaim batch may be frozen: a panic must not unwind through them (their guards would
/// drop a frozen count, leaving it wrapped and the pages stuck for every
/// later truncate). The panic is reported and `fallback` used.
fn engine_call<T>(file: &str, op: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            eprintln!("upcache: {file}: the engine's {op} panicked while a folio was evicted (release_folio: the folio is kept; free_folio: it is freed)");
            fallback
        }
    }
}

impl AddressSpace {
    /// Background reclaim's `pageout`: start writeback of one dirty folio
    /// if that needs no waiting (the writeback lock and the folio lock are
    /// taken by trylock). Nothing held on entry.
    fn reclaim_writepage(self: &Arc<Self>, f: FolioRef) {
        if let Some(_wb) = self.wb_lock.try_read() {
            if let Ok(g) = f.trylock() {
                if g.mapping_id() == self.id()
                    && g.is_dirty()
                    && !g.is_writeback()
                    && matches!(self.write_barrier(&g, crate::aops::SyncMode::None), Ok(true))
                    && self.folio_clear_dirty_for_io(&g)
                {
                    self.stats.write_io();
                    let mut wbc = WritebackControl::none(g.nr_pages() as i64);
                    wbc.for_background = true;
                    let folio = g.folio().clone();
                    if let Err(e) = crate::page_writeback::call_writepage(|| {
                        self.in_engine("writepage", || self.ops.writepage(self, g, &mut wbc))
                    }) {
                        crate::page_writeback::keep_dirty_after_failed_writepage(self, &folio, &wbc, &e);
                    }
                }
            }
        }
    }

    /// `invalidate_mapping_pages`: drop the clean, unused folios of pages
    /// `[first, end)`. Returns pages dropped.
    pub(crate) fn invalidate_clean_range(&self, first: PgOff, end: u64) -> u64 {
        let mut freed = 0;
        let mut i = first.0;
        while let Some((idx, _)) = self.i_pages.find_from(i, end) {
            i = idx + 1;
            if let Some(f) = self.filemap_get_folio(PgOff(idx)) {
                i = f.index().0 + f.nr_pages();
                if let Ok(Some(n)) = self.evict_folio(f) {
                    freed += n;
                }
            }
        }
        freed
    }

    /// First half of an eviction: trylock, check it is clean, idle and
    /// releasable, freeze its count from "index + ours" to zero. The folio
    /// stays indexed (lookups spin on the frozen count) until
    /// `finish_eviction`, after its memory is punched.
    fn freeze_for_eviction(&self, f: crate::folio::FolioRef) -> Option<FolioGuard> {
        let g = f.trylock().ok()?;
        // A folio whose read failed carries the record that mappings may
        // hold SIGBUS poison for its pages, which its re-read or its
        // removal clears (`clear_read_error_poison`): its evictor clears it
        // once no folio is frozen any more (a zap must not wait for
        // `harvest_lock` while a harvest may spin on a frozen folio).
        if g.mapping_id() != self.id()
            || g.is_dirty()
            || g.is_writeback()
            || !engine_call(self.name(), "release_folio", false, || {
                self.in_engine("release_folio", || self.ops.release_folio(self, &g))
            })
        {
            return None;
        }
        // Index + ours: anyone else (a reader mid-copy, a fault, a waiter)
        // keeps it.
        if !g.freeze_refs(2) {
            return None;
        }
        // Dirty and writeback again, now that nobody else holds it: a
        // writeback that failed after the checks above (it holds no lock)
        // redirtied the folio and ended before it dropped its reference,
        // which the freeze saw gone (the kernel's re-check after
        // `folio_ref_freeze` in `__remove_mapping`). A clean folio still
        // tagged DIRTY was left so by a `writepage` that failed before
        // starting writeback (`keep_dirty_after_failed_writepage`): the
        // store may not have its bytes, so it is dirty data too.
        if g.is_dirty() || g.is_writeback() || self.i_pages.lock().has_tag(g.index().0, crate::xarray::Tag::Dirty) {
            g.unfreeze_refs(2);
            return None;
        }
        // Writes through async-tracked mappings that no harvest has seen
        // yet (wp_async.rs): dirty it and keep it, or zap it from them.
        if !self.evict_check_mapped_writes(&g) {
            g.unfreeze_refs(2);
            return None;
        }
        Some(g)
    }

    /// Second half, after the punch: unindex and free. Returns its pages.
    fn finish_eviction(&self, g: FolioGuard) -> u64 {
        let n = g.nr_pages();
        index_delete_folio(&self.i_pages, &g);
        self.nrpages_sub(n);
        self.stats.folio_removed(n);
        self.stats.evicted(n);
        engine_call(self.name(), "free_folio", (), || {
            self.in_engine("free_folio", || self.ops.free_folio(self, &g))
        });
        g.free_frozen();
        n
    }

    /// Evict one clean folio (see the module docs). `Ok(None)` if it is in
    /// use, locked, dirty, under writeback or its private state stays.
    pub(crate) fn evict_folio(&self, f: crate::folio::FolioRef) -> io::Result<Option<u64>> {
        let Some(g) = self.freeze_for_eviction(f) else {
            return Ok(None);
        };
        // Punch while still indexed, so no new folio can be created at
        // this offset before the punch.
        if let Err(e) = self.punch_memory(g.pos(), g.size() as u64) {
            g.unfreeze_refs(2);
            return Err(e);
        }
        let (errored, index) = (g.has_error(), g.index());
        let n = self.finish_eviction(g);
        if errored {
            // Gone from the index (nothing frozen any more): its pages'
            // next fault reads them again.
            self.clear_read_error_poison(index, n);
        }
        Ok(Some(n))
    }
}
