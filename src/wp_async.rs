//! Asynchronous dirty tracking ([`DirtyTracking::Async`]):
//! `UFFD_FEATURE_WP_ASYNC` lets the kernel resolve the first write to a
//! write-protected page itself (it clears the PTE's uffd-wp bit, ~1 µs,
//! no message), and `PAGEMAP_SCAN` later reports the pages whose bit is
//! clear and sets it again (`fs/proc/task_mmu.c`). A write becomes a dirty
//! folio only when such a scan *harvests* it.
//!
//! # Invariant
//!
//! For every async-tracked mapping of a file and every page of a folio
//! that is not DIRTY, either the page's PTE has been write-protected (bit
//! set, or a PTE marker) since the folio's bytes last matched the store,
//! or the page reads as written to `PAGEMAP_SCAN` and a harvest will dirty
//! the folio. Who keeps it:
//!
//! | step | how |
//! |---|---|
//! | mapping a clean folio (`map_pages`, fault) | `UFFDIO_CONTINUE` with `MODE_WP` (as with write faults) |
//! | writeback (`folio_clear_dirty_for_io`) | `page_mkclean` write-protects before the bytes are copied for the store |
//! | harvest | scan-and-protect into `pending`, then `folio_mark_dirty` of each pending folio it can lock, under `harvest_lock` |
//! | eviction | [`AddressSpace::evict_check_mapped_writes`], below |
//! | punch's drop of a folio | `harvest_locked_folio`: eviction's check, the folio locked; written → dirty, written back before the drop |
//! | munmap | a last scan of the mapping before it leaves `i_mmap`, then an integrity drain |
//!
//! # Why harvests are serialized, and what `pending` is for
//!
//! A scan re-protects what it reports. If harvest B re-protected a written
//! page and harvest A (an `fsync`) then scanned, A would find the page
//! clean and could finish before B marks the folio dirty: a lost `fsync`.
//! So the record of a reported page moves from the page table to
//! `HarvestState::pending` under `harvest_lock`, and from `pending` to the
//! folio's DIRTY bit under `harvest_lock` and the folio lock, taken by
//! *trylock*: a folio another thread holds locked stays pending. A
//! background harvest (the flusher, cleansing writeback) leaves it; an
//! integrity harvest drops `harvest_lock`, waits for that folio's lock,
//! and drains again, returning only when nothing of its range is pending.
//! No thread ever waits for a folio lock while holding `harvest_lock`, so a
//! thread that holds a `PageMut` and calls `fsync` (its own folio is
//! marked dirty directly: its guard holds the lock) cannot deadlock with a
//! harvest waiting for that folio. Reclaim, which holds a folio lock,
//! try-locks `harvest_lock` and treats a pending page as written.
//!
//! # Why eviction compares bytes
//!
//! The kernel moves a PTE's dirty bit to the folio atomically when it
//! unmaps a page (`try_to_unmap`); userspace has no such call. Between a
//! scan that finds a page clean and the punch that frees it, a write is
//! resolved by the kernel without telling anyone and the punch would throw
//! it away. So eviction (folio locked, count frozen: no new mapping of it
//! can appear, faults wait) copies the bytes, scans (written → dirty, keep
//! the folio; a page a harvest left pending counts as written), zaps the
//! folio from every async mapping (later accesses
//! fault to a handler and wait for the frozen folio), and compares: equal
//! bytes mean every write that landed between the copy and the zap left
//! the folio as the store has it, so punching loses nothing.
//!
//! # What the kernel must not do
//!
//! Reclaiming a written shmem page, or splitting or collapsing a large
//! shmem folio, unmaps it and drops the record of the write (only uffd-wp
//! *protected* PTEs leave a marker), so `Async` is refused while swap or
//! shmem THP is on (checked at `mmap`). An `MADV_DONTNEED` of a mapping by
//! the program has the same effect: don't. upcache's own zaps scan first
//! (`zap_mappings`), except eviction's, which compares bytes instead; a
//! zap the kernel refuses keeps the folio (a guard: zaps use
//! `MADV_DONTNEED_LOCKED`, which even `mlock`ed mappings do not refuse).
//!
//! [`DirtyTracking::Async`]: crate::DirtyTracking::Async

use std::io;
use std::ops::Range;

use crate::address_space::AddressSpace;
use crate::folio::FolioGuard;
use crate::mmap::VmArea;
use crate::sync::{Arc, MutexGuard, Ordering};
use crate::types::{PgOff, PAGE_SHIFT};

/// Is any swap device active? (`Async` tracking is refused then.)
pub(crate) fn swap_active() -> bool {
    std::fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().skip(1).any(|l| !l.trim().is_empty()))
}

/// One async-tracked mapping as harvest and eviction see it: a user page
/// table whose written pages can be reported (and protected again) and
/// whose entries can be zapped. For real a [`VmArea`]; in the loom models
/// a page table the model keeps (`loom_support::on_scan`, `on_zap`).
pub(crate) trait AsyncPtes {
    /// Report each run of file pages of `[first, end)` written since it
    /// was last write-protected, and protect it again (`PAGEMAP_SCAN` with
    /// `PM_SCAN_WP_MATCHING`).
    ///
    /// # Errors
    /// The scan's error (what it reported before failing was passed on).
    fn scan_written(&self, first: PgOff, end: PgOff, f: &mut dyn FnMut(Range<u64>)) -> io::Result<()>;
    /// Drop the page-table entries of file pages `[first, end)`; false if
    /// they could not be dropped.
    fn zap(&self, first: PgOff, end: PgOff) -> bool;
    /// Does it map any of file pages `[first, end)`?
    #[cfg_attr(loom, allow(dead_code))]
    fn covers(&self, first: PgOff, end: PgOff) -> bool;
}

impl AsyncPtes for VmArea {
    fn scan_written(&self, first: PgOff, end: PgOff, f: &mut dyn FnMut(Range<u64>)) -> io::Result<()> {
        let (Some(r), Some(pm)) = (self.user_range(first, end), &self.engine.pagemap) else {
            return Ok(());
        };
        pm.scan_written_and_protect(r.start, r.end, |run| {
            let a = self.addr_to_pgoff(run.start).0;
            f(a..a + (run.len() >> PAGE_SHIFT) as u64);
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("PAGEMAP_SCAN of a mapping of {}: {e}", self.mapping().name()),
            )
        })
    }
    fn zap(&self, first: PgOff, end: PgOff) -> bool {
        VmArea::zap(self, first, end)
    }
    fn covers(&self, first: PgOff, end: PgOff) -> bool {
        self.user_range(first, end).is_some()
    }
}

impl<T: AsyncPtes + ?Sized> AsyncPtes for Arc<T> {
    fn scan_written(&self, first: PgOff, end: PgOff, f: &mut dyn FnMut(Range<u64>)) -> io::Result<()> {
        (**self).scan_written(first, end, f)
    }
    fn zap(&self, first: PgOff, end: PgOff) -> bool {
        (**self).zap(first, end)
    }
    fn covers(&self, first: PgOff, end: PgOff) -> bool {
        (**self).covers(first, end)
    }
}

/// The loom models' page table (one mapping of the whole file).
#[cfg(loom)]
pub(crate) struct LoomPtes(Arc<crate::page_store::PageStore>);

#[cfg(loom)]
impl AsyncPtes for LoomPtes {
    fn scan_written(&self, first: PgOff, end: PgOff, f: &mut dyn FnMut(Range<u64>)) -> io::Result<()> {
        if let Some(hook) = self.0.on_scan.get() {
            for run in hook(first.0..end.0) {
                f(run);
            }
        }
        Ok(())
    }
    fn zap(&self, first: PgOff, end: PgOff) -> bool {
        crate::page_store::call_pte_hook(&self.0.on_zap, first.byte(), (end.0 - first.0) << PAGE_SHIFT);
        true
    }
    fn covers(&self, _: PgOff, _: PgOff) -> bool {
        true
    }
}

impl AddressSpace {
    /// Does any async-tracked mapping of this file exist?
    #[inline]
    pub(crate) fn has_wp_async(&self) -> bool {
        // Acquire: pairs with the Release increment in `do_mmap` and the
        // Release decrement in `unmap_async`, which comes after that
        // mapping's drain set `harvest_pending` (so a file whose last async
        // mapping left pages pending still reads true here).
        self.nr_wp_async.load(Ordering::Acquire) != 0 || self.harvest_pending.load(Ordering::Acquire)
    }

    /// Publish whether pages are pending; `harvest_lock` held (the state
    /// is `st`).
    pub(crate) fn note_pending(&self, st: &HarvestState) {
        // Release: pairs with the Acquire in `has_wp_async`.
        self.harvest_pending.store(!st.pending.is_empty(), Ordering::Release);
    }

    /// This file's async-tracked mappings that map any of `[first, end)`.
    #[cfg(not(loom))]
    fn async_ptes(&self, first: PgOff, end: PgOff) -> Vec<Arc<VmArea>> {
        self.i_mmap
            .lock()
            .iter()
            .filter(|v| v.tracks_writes_async() && v.covers(first, end))
            .cloned()
            .collect()
    }

    #[cfg(loom)]
    fn async_ptes(&self, _: PgOff, _: PgOff) -> Vec<LoomPtes> {
        if self.has_wp_async() {
            vec![LoomPtes(self.store.clone())]
        } else {
            Vec::new()
        }
    }

    /// Harvest: mark dirty every folio of file pages `[first, end)` that an
    /// async-tracked mapping wrote since the last harvest (and protect its
    /// pages again). Called before every writeback of the range
    /// ([`HarvestMode::Integrity`] for `SyncMode::All`) and by the flusher
    /// ([`HarvestMode::Background`]).
    ///
    /// # Locking
    /// Nothing held on entry (a `PageMut` of this thread may be); takes
    /// `harvest_lock`, then folio locks by trylock only; an integrity
    /// harvest waits for a busy folio's lock with `harvest_lock` dropped.
    ///
    /// # Errors
    /// A failed scan (the pages it reported before failing are recorded;
    /// writeback goes on and its caller reports the error).
    pub(crate) fn harvest_mapped_writes(&self, first: PgOff, end: PgOff, mode: HarvestMode) -> io::Result<()> {
        if !self.has_wp_async() {
            return Ok(());
        }
        let mut st = self.harvest_lock.lock();
        let mut res = Ok(());
        for p in self.async_ptes(first, end) {
            let r = scan_into(&p, first, end, &mut st);
            if res.is_ok() {
                res = r;
            }
        }
        self.drain_pending(st, first, end, mode);
        res
    }

    /// Turn the pending pages of `[first, end)` into dirty folios. A folio
    /// another thread holds locked stays pending: a background harvest
    /// leaves it for later, an integrity harvest waits for the lock (with
    /// `harvest_lock` dropped, so the holder may harvest meanwhile) and
    /// tries again, returning only when none of the range is pending.
    pub(crate) fn drain_pending<'a>(
        &'a self,
        mut st: MutexGuard<'a, HarvestState>,
        first: PgOff,
        end: PgOff,
        mode: HarvestMode,
    ) {
        loop {
            let idxs: Vec<u64> = st.pending.range(first.0..end.0).copied().collect();
            let mut busy = None;
            for idx in idxs {
                if !st.pending.contains(&idx) {
                    // Went with a folio handled earlier in this pass.
                    continue;
                }
                let Some(f) = self.filemap_get_folio(PgOff(idx)) else {
                    // Truncated or punched since: the write went with it.
                    st.pending.remove(&idx);
                    continue;
                };
                let pages = f.index().0..f.index().0 + f.nr_pages();
                if crate::page_ref::locked_by_this_thread(&f) {
                    // A `PageMut` of this thread holds the lock: the folio
                    // cannot be truncated while it does.
                    if f.mapping_id() == self.id() && f.is_uptodate() {
                        self.mark_dirty_locked(&f);
                    }
                } else {
                    match f.trylock() {
                        Ok(g) => {
                            if g.mapping_id() == self.id() && g.is_uptodate() {
                                self.mark_dirty_locked(&g);
                            }
                        }
                        Err(f) => {
                            if busy.is_none() {
                                busy = Some(f);
                            }
                            continue;
                        }
                    }
                }
                st.remove_range(pages);
            }
            self.note_pending(&st);
            let (HarvestMode::Integrity, Some(f)) = (mode, busy) else {
                return;
            };
            drop(st);
            // Wait for the holder (never with `harvest_lock` held: it may be
            // a thread about to harvest itself).
            drop(f.lock());
            st = self.harvest_lock.lock();
        }
    }

    /// `folio_mark_dirty` for a harvested folio, locked by the caller (or by
    /// a `PageMut` of the caller's thread).
    fn mark_dirty_locked(&self, f: &crate::folio::Folio) {
        self.mark_dirty_raw(f);
        self.stats.harvested(f.nr_pages());
    }

    /// A mapping is being unmapped: its last scan and its removal from
    /// `i_mmap` under one `harvest_lock` (a concurrent harvest either scans
    /// it or finds its writes pending), then a background drain, and only
    /// then the count of async mappings drops.
    pub(crate) fn unmap_async(&self, vma: &VmArea, unpublish: impl FnOnce()) {
        let (first, end) = (PgOff(0), PgOff(u64::MAX));
        let mut st = self.harvest_lock.lock();
        if let Err(e) = scan_into(vma, first, end, &mut st) {
            eprintln!("upcache: the last harvest of an unmapped mapping failed: {e}");
        }
        unpublish();
        // Background: a folio another thread holds stays pending (waiting
        // here could deadlock a `PageMut` holder that waits for this
        // thread); `has_wp_async` stays true while anything is pending, so
        // the next fsync, flusher pass or eviction finishes the drain.
        self.drain_pending(st, first, end, HarvestMode::Background);
        self.nr_wp_async.fetch_sub(1, Ordering::Release);
    }

    /// Punch's check of a folio it is about to drop (`clean_for_punch`):
    /// [`check_mapped_writes`](Self::check_mapped_writes) under
    /// `harvest_lock`, marking the folio dirty if any async-tracked mapping
    /// wrote it, or if that cannot be told (a failed scan: the punch then
    /// writes it back, which loses nothing). A folio found clean was zapped
    /// from every async mapping after its bytes were compared, so no write
    /// can land unseen before it is unlocked (`Async` implies `Minor` mode,
    /// which maps a page only through its folio lock) — unless a zap was
    /// refused (none is: `MADV_DONTNEED_LOCKED` zaps `mlock`ed mappings
    /// too; the guard stays), where a store racing a punch the store then
    /// refuses could go unseen.
    ///
    /// # Locking
    /// `g` locked; takes `harvest_lock` (never waits for a folio lock
    /// under it).
    pub(crate) fn harvest_locked_folio(&self, g: &FolioGuard) {
        if !self.has_wp_async() {
            return;
        }
        let mut st = self.harvest_lock.lock();
        if self.check_mapped_writes(g, &mut st) == MappedWrites::Unknown {
            self.mark_dirty_locked(g);
        }
    }

    /// Eviction's check for async-tracked mappings (see the module docs):
    /// true if the frozen, locked, clean folio `g` holds nothing that the
    /// store lacks and no async mapping can write it any more. False if it
    /// was written (it is now DIRTY) or the check could not run now
    /// (`harvest_lock` busy); the caller unfreezes it.
    ///
    /// # Locking
    /// `g` locked with its count frozen; try-locks `harvest_lock`.
    pub(crate) fn evict_check_mapped_writes(&self, g: &FolioGuard) -> bool {
        if !self.has_wp_async() {
            return true;
        }
        let Some(mut st) = self.harvest_lock.try_lock() else {
            return false;
        };
        self.check_mapped_writes(g, &mut st) == MappedWrites::Clean { all_zapped: true }
    }

    /// Did an async-tracked mapping write the locked folio `g`, which no
    /// mapping can map anew while this runs (locked, or frozen)? Pending
    /// pages of it count as written. Otherwise: copy its bytes, scan every
    /// async mapping (written → dirty), zap it from each, and compare: a
    /// store that landed between the scan (which re-protects) and the zap
    /// left no record in the page table but changed the bytes (module
    /// docs, "Why eviction compares bytes"). A written folio is marked
    /// DIRTY here.
    ///
    /// # Locking
    /// `g` locked; `harvest_lock` held (`st`).
    fn check_mapped_writes(&self, g: &FolioGuard, st: &mut HarvestState) -> MappedWrites {
        let first = g.index();
        let end = first.add(g.nr_pages());
        if st.remove_range(first.0..end.0) {
            // Written, reported by a harvest that found it locked.
            self.note_pending(st);
            self.mark_dirty_locked(g);
            return MappedWrites::Written;
        }
        let ptes = self.async_ptes(first, end);
        if ptes.is_empty() {
            return MappedWrites::Clean { all_zapped: true };
        }
        let before = snapshot(g);
        let mut written = false;
        for p in &ptes {
            if p.scan_written(first, end, &mut |_| written = true).is_err() && !written {
                return MappedWrites::Unknown;
            }
        }
        let mut all_zapped = true;
        if !written {
            for p in &ptes {
                // A refused zap (none is expected: `MADV_DONTNEED_LOCKED`
                // zaps `mlock`ed mappings too) leaves pages mapped: a later store there is recorded in
                // that page table, but the other mappings were zapped, so
                // the compare below still has to run.
                all_zapped &= p.zap(first, end);
            }
            written = snapshot(g) != before;
        }
        if written {
            self.mark_dirty_locked(g);
            return MappedWrites::Written;
        }
        MappedWrites::Clean { all_zapped }
    }
}

/// What [`AddressSpace::check_mapped_writes`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MappedWrites {
    /// Written through a mapping: the folio is DIRTY now.
    Written,
    /// Not written; zapped from every async mapping unless `all_zapped`
    /// is false.
    Clean { all_zapped: bool },
    /// A scan failed before anything was found: cannot tell.
    Unknown,
}

/// Scan `ptes` over `[first, end)` and add the written pages to `pending`.
pub(crate) fn scan_into(ptes: &dyn AsyncPtes, first: PgOff, end: PgOff, st: &mut HarvestState) -> io::Result<()> {
    ptes.scan_written(first, end, &mut |run| st.pending.extend(run))
}

/// How a harvest treats a folio another thread holds locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HarvestMode {
    /// Before an integrity writeback (`fsync`, `sync_range`, `flush`,
    /// munmap): wait for it; return only with nothing of the range pending.
    Integrity,
    /// The flusher, cleansing writeback: leave it pending for later.
    Background,
}

/// What `harvest_lock` guards: pages a scan reported written (and
/// re-protected) whose folio is not yet marked dirty because another
/// thread held its lock. Invariant: a page written through an async
/// mapping since its folio was last clean is written in the page table,
/// pending here, or its folio is DIRTY; every move between the three
/// happens under `harvest_lock`.
#[derive(Debug, Default)]
pub(crate) struct HarvestState {
    pending: std::collections::BTreeSet<u64>,
}

impl HarvestState {
    /// Drop the pending pages of `pages`; true if there were any.
    fn remove_range(&mut self, pages: Range<u64>) -> bool {
        let mut tail = self.pending.split_off(&pages.start);
        let mut rest = tail.split_off(&pages.end);
        self.pending.append(&mut rest);
        !tail.is_empty()
    }
}

/// A copy of the folio's bytes, taken with a raw copy (mapped writers may
/// be storing to them).
fn snapshot(g: &FolioGuard) -> Vec<u8> {
    let mut v = vec![0u8; g.size()];
    // SAFETY: the folio's engine-view range is valid for `size()` bytes
    // while we hold it (locked, so referenced); `v` is a distinct
    // allocation. The source may change under the copy (a mapped write):
    // a raw copy forms no reference to it, as `read_at` copies.
    unsafe { std::ptr::copy_nonoverlapping(g.as_ptr(), v.as_mut_ptr(), v.len()) };
    v
}
