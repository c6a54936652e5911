//! Writeback (`mm/page-writeback.c`): `write_cache_pages`, integrity
//! tagging, waiting for writeback, and the write-and-wait behind fsync.

use std::io;

use crate::address_space::AddressSpace;
use crate::aops::{SyncMode, WritebackControl};
use crate::folio::{FolioGuard, FolioRef};
use crate::sync::Ordering;
use crate::types::{PgOff, PAGE_SHIFT};
use crate::xarray::Tag;

/// Folios fetched per index-lock hold.
const BATCH: usize = 16;

/// The page range of `wbc`, with its start moved back to the head of the
/// folio that overlaps the range's first byte: tags live on folio heads, so
/// a walk from the range's first index would skip a large folio that
/// starts before it (and `sync_range` would return Ok without writing it).
fn folio_range(mapping: &AddressSpace, wbc: &WritebackControl) -> (u64, u64) {
    let (start, end) = page_range(wbc);
    let head = mapping
        .filemap_get_folio(PgOff(start))
        .map_or(start, |f| f.index().0.min(start));
    (head, end)
}

fn page_range(wbc: &WritebackControl) -> (u64, u64) {
    let start = wbc.range_start >> PAGE_SHIFT;
    let end = if wbc.range_end == u64::MAX {
        u64::MAX
    } else {
        (wbc.range_end >> PAGE_SHIFT) + 1
    };
    (start, end)
}

/// `tag_pages_for_writeback`: copy DIRTY to TOWRITE over the range, so an
/// integrity sync writes exactly what was dirty when it started and cannot
/// be livelocked by new dirtying.
fn tag_pages_for_writeback(mapping: &AddressSpace, start: u64, end: u64) {
    let mut xa = mapping.i_pages.lock();
    for i in xa.tagged(Tag::Dirty, start, end, usize::MAX) {
        xa.set_tag(i, Tag::ToWrite);
    }
}

/// `write_cache_pages`: walk the dirty folios of `wbc`'s range and hand each
/// to `writepage`, locked, with its dirty bit cleared for I/O.
///
/// [`SyncMode::None`] skips folios under writeback and stops after
/// `nr_to_write` pages; [`SyncMode::All`] writes every folio tagged TOWRITE
/// at the start, waiting for writeback already in flight. Background
/// writeback ([`WritebackControl::for_background`]) also skips locked
/// folios.
///
/// # Locking
/// Nothing held on entry. Locks each folio (may sleep, except for
/// background writeback, which only try-locks); `writepage` unlocks it. No
/// folio reference is held while sleeping on another folio.
///
/// # Errors
/// The first error `writepage` returned; later folios are still written.
pub fn write_cache_pages(
    mapping: &AddressSpace,
    wbc: &mut WritebackControl,
    mut writepage: impl FnMut(FolioGuard, &mut WritebackControl) -> io::Result<()>,
) -> io::Result<()> {
    let (start, end) = folio_range(mapping, wbc);
    let tag = match wbc.sync_mode {
        SyncMode::All => {
            tag_pages_for_writeback(mapping, start, end);
            Tag::ToWrite
        }
        SyncMode::None => Tag::Dirty,
    };
    let mut first_err = None;
    let mut index = start;
    loop {
        let batch = mapping.i_pages.lock().tagged(tag, index, end, BATCH);
        if batch.is_empty() {
            break;
        }
        for i in batch {
            index = index.max(i + 1);
            let g = if wbc.for_background {
                // Background writeback never sleeps on a folio lock: a page
                // guard (`PageMut`) holds one while the engine runs, and
                // the engine may be the thread throttled here
                // (`balance_dirty_pages`), or wait for the thread that is.
                // The folio stays dirty for a later pass.
                match mapping.filemap_get_folio(PgOff(i)).map(|f| f.trylock()) {
                    Some(Ok(g)) if g.mapping_id() == mapping.id() => Some(g),
                    _ => None,
                }
            } else {
                match mapping.filemap_get_folio(PgOff(i)) {
                    // This thread's `PageMut` holds it: waiting for its lock
                    // would wait for ourselves. The folio stays dirty; the
                    // caller learns why.
                    Some(f) if crate::page_ref::locked_by_this_thread(&f) => {
                        first_err.get_or_insert(io::Error::from_raw_os_error(libc::EDEADLK));
                        continue;
                    }
                    Some(_) => mapping.filemap_lock_folio(PgOff(i)),
                    None => None,
                }
            };
            let Some(g) = g else {
                continue;
            };
            index = index.max(g.index().0 + g.nr_pages());
            if g.index().0 != i {
                continue;
            }
            if !g.is_dirty() && !mapping.redirty_after_failed_writepage(&g) {
                // Cleaned by someone else since it was tagged.
                if tag == Tag::ToWrite {
                    mapping.i_pages.lock().clear_tag(i, Tag::ToWrite);
                }
                continue;
            }
            if g.is_writeback() {
                if wbc.sync_mode == SyncMode::None {
                    continue;
                }
                g.wait_writeback();
            }
            match mapping.write_barrier(&g, wbc.sync_mode) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            }
            if !mapping.folio_clear_dirty_for_io(&g) {
                continue;
            }
            let nr = g.nr_pages() as i64;
            mapping.stats.write_io();
            let folio = g.folio().clone();
            if let Err(e) = call_writepage(|| writepage(g, wbc)) {
                keep_dirty_after_failed_writepage(mapping, &folio, wbc, &e);
                first_err.get_or_insert(e);
            }
            wbc.pages_written += nr as u64;
            wbc.nr_to_write = wbc.nr_to_write.saturating_sub(nr);
            if wbc.nr_to_write <= 0 && wbc.sync_mode == SyncMode::None {
                return first_err.map_or(Ok(()), Err);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Call an engine's `writepage`. A panic is its failure (`EIO`): by then
/// `folio_clear_dirty_for_io` has cleaned the folio, and an unwind through
/// the caller would leave it clean and unwritten; the folio's guard
/// (unlocked, or its `Writeback`, which ends with an error) has dropped,
/// and the caller keeps the folio dirty
/// ([`keep_dirty_after_failed_writepage`]).
pub(crate) fn call_writepage(f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        eprintln!("upcache: an engine writepage panicked; the folio stays dirty");
        Err(io::Error::other("the engine's writepage panicked (EIO)"))
    })
}

/// A `writepage` that failed must leave its folio dirty (redirtied, or
/// ended with `end_with_error`) or under writeback; one that dropped it
/// clean would lose its data (its DIRTY bit is gone, and nothing writes a
/// clean folio again). Dirty it again in that case. A background caller
/// that cannot take its lock records `err` for the next `fsync` instead.
pub(crate) fn keep_dirty_after_failed_writepage(
    mapping: &AddressSpace,
    folio: &FolioRef,
    wbc: &WritebackControl,
    err: &io::Error,
) {
    if folio.is_dirty() || folio.is_writeback() || folio.mapping_id() != mapping.id() {
        return;
    }
    let g = if wbc.for_background {
        // Never wait for the lock here (a throttled thread's own page
        // guard, or one another thread holds while it waits for this
        // thread, may hold it), but do not give up at once either:
        // reclaim try-locks folios and lets go as soon as it sees our
        // reference, and if we gave up it could evict the clean folio on
        // its next pass. A holder that keeps it past the retries (a page
        // guard) is left the data, clean, and the error is recorded for
        // the next `fsync` (a background caller drops it; the folio's
        // DIRTY tag stays, so the next write-back walk writes it again).
        let mut tries = 0;
        loop {
            match folio.clone().trylock() {
                Ok(g) => break g,
                Err(_) if tries < 1000 => {
                    tries += 1;
                    crate::sync::yield_now();
                }
                Err(_) => {
                    mapping.set_error(err.raw_os_error().unwrap_or(libc::EIO));
                    return;
                }
            }
        }
    } else {
        folio.clone().lock()
    };
    if !g.is_dirty() && !g.is_writeback() && g.mapping_id() == mapping.id() {
        mapping.mark_dirty_raw(&g);
    }
}

impl AddressSpace {
    /// A locked folio that is clean, not under writeback, and still tagged
    /// DIRTY was left so by a `writepage` that failed before starting
    /// writeback and unlocked it clean (the tag outlives
    /// `folio_clear_dirty_for_io` until `folio_start_writeback`), its
    /// caller not having dirtied it again yet
    /// (`keep_dirty_after_failed_writepage`, which may also have given up
    /// on the lock). The store may not have its bytes: dirty it again.
    /// Returns whether it did. Every path that treats a clean folio as
    /// safe to skip or drop asks this first: the write-back walk, and
    /// truncate and punch (`write_back_locked`).
    ///
    /// # Locking
    /// Folio locked.
    pub(crate) fn redirty_after_failed_writepage(&self, g: &FolioGuard) -> bool {
        if g.is_dirty() || g.is_writeback() || !self.i_pages.lock().has_tag(g.index().0, Tag::Dirty) {
            return false;
        }
        self.mark_dirty_raw(g);
        true
    }

    /// Ask the engine whether a locked dirty folio may be written now
    /// ([`AddressSpaceOps::write_barrier`](crate::aops::AddressSpaceOps::write_barrier)).
    /// `Ok(false)` means "skip it, it stays dirty"; in an integrity sync a
    /// refusal is the error `EAGAIN`.
    ///
    /// # Locking
    /// Folio locked.
    pub(crate) fn write_barrier(&self, g: &FolioGuard, mode: SyncMode) -> io::Result<bool> {
        match self.in_engine("write_barrier", || self.ops.write_barrier(self, g, mode)) {
            Ok(false) if mode == SyncMode::All => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{}: write_barrier refused an integrity writeback of the folio at byte {} (EAGAIN)",
                    self.name(),
                    g.pos()
                ),
            )),
            r => r,
        }
    }

    /// `filemap_fdatawait_range`: wait for writeback of every folio in
    /// `[start, end]` (bytes, inclusive) that is under writeback now.
    ///
    /// # Locking
    /// Nothing held; sleeps.
    ///
    /// # Hangs
    /// Called from inside an engine callback that writes a folio of this
    /// file back, it waits for that write; use
    /// [`write_and_wait_range`](Self::write_and_wait_range), which fails
    /// with `EDEADLK` there.
    pub fn fdatawait_range(&self, start: u64, end: u64) {
        let wbc = WritebackControl::all(start, end);
        let (s, e) = folio_range(self, &wbc);
        let mut index = s;
        loop {
            let batch = self.i_pages.lock().tagged(Tag::Writeback, index, e, BATCH);
            if batch.is_empty() {
                return;
            }
            for i in batch {
                index = i + 1;
                if let Some(f) = self.filemap_get_folio(PgOff(i)) {
                    f.wait_writeback();
                }
            }
        }
    }

    /// `filemap_write_and_wait_range`: integrity writeback of `[start, end]`
    /// (bytes, inclusive) through the engine's `writepages`, then wait.
    ///
    /// # Locking
    /// Nothing held; sleeps.
    ///
    /// # Errors
    /// The first write error of this call (also recorded for fsync).
    /// `EDEADLK` from inside an engine callback for this file
    /// ([`Error::Reentrant`](crate::Error::Reentrant)).
    pub fn write_and_wait_range(&self, start: u64, end: u64) -> io::Result<()> {
        self.check_reentry("write_and_wait_range")?;
        let mut wbc = WritebackControl::all(start, end);
        let harvested = self.harvest_wbc_range(&wbc);
        let r = {
            let _wb = self.wb_lock.read();
            self.in_engine("writepages", || self.ops.writepages(self, &mut wbc))
        };
        self.fdatawait_range(start, end);
        r.and(harvested)
    }

    /// An integrity sync of `[start, end]` for callers without a handle's
    /// error cursor (`sync_all`, `freeze`, the last user's drop): write and
    /// wait, sync the store, and fail if a write error was recorded for the
    /// file meanwhile. A write the walk did not start itself (a background
    /// writeback in flight, which it waited for) may have failed: its
    /// folio is dirty again and only the error word says so.
    ///
    /// # Errors
    /// The first write error, one recorded during the call, or the store's
    /// sync error.
    /// `EDEADLK` from inside an engine callback for this file
    /// ([`Error::Reentrant`](crate::Error::Reentrant)).
    pub fn sync_range_checked(&self, start: u64, end: u64) -> io::Result<()> {
        self.check_reentry("sync_range_checked")?;
        // `sample`, not `now`: an error nobody has seen yet is reported
        // too. With `now`, a failure of the same errno while an earlier one
        // is still unseen would leave the word unchanged (`errseq_set`
        // bumps nothing then) and this sync would return `Ok` with the
        // folio dirty (`tests/faults.rs`).
        let since = crate::sync::AtomicU64::new(self.wb_err.sample());
        self.sync_range_checked_since(start, end, &since)
    }

    /// `syncfs`'s part for this file: write and wait for every dirty
    /// folio, sync the store. Write and sync failures are recorded in the
    /// error words (the cache's too) and reported from there; what is
    /// returned here is the first error of the call, recorded or not.
    ///
    /// # Errors
    /// As `sync_range_checked`, without the error-word check.
    pub(crate) fn sync_for_syncfs(&self) -> io::Result<()> {
        self.check_reentry("sync_all")?;
        let written = self.write_and_wait_range(0, u64::MAX);
        let synced = self.store_sync();
        written.and(synced)
    }

    /// [`sync_range_checked`](Self::sync_range_checked) against a cursor
    /// of the caller's (a mapping's, sampled when it was made, as a
    /// kernel VMA's file holds `f_wb_err`): every error recorded since the
    /// cursor last reported one is reported once, whoever saw it first.
    ///
    /// # Errors
    /// As `sync_range_checked`.
    pub(crate) fn sync_range_checked_since(
        &self,
        start: u64,
        end: u64,
        since: &crate::sync::AtomicU64,
    ) -> io::Result<()> {
        let written = self.write_and_wait_range(start, end);
        let synced = self.store_sync();
        if let Some(errno) = self.wb_err.check_and_advance(since) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        written.and(synced)
    }

    /// The store's sync (`ops.fsync`). A failure is recorded in the error
    /// word like a failed write, so that it reaches every handle's next
    /// `fsync` once and the cache-wide syncs that have not seen it — as
    /// the kernel records a failed journal commit or device flush. (The
    /// bytes were handed to the store and upcache's folios are clean: it
    /// cannot know which of them the store lost.)
    ///
    /// One store sync of the file at a time, its error recorded before the
    /// next starts (`sync_lock`): the store reports a failed sync to one
    /// caller, and another handle's `fsync` syncing meanwhile would get
    /// `Ok` for bytes the failed sync covered.
    pub(crate) fn store_sync(&self) -> io::Result<()> {
        let _one = self.sync_lock.lock();
        // Cleared before the sync: a write-back ending during it sets it
        // again. AcqRel: pairs with the Release in `end_writeback`.
        self.unsynced.swap(false, Ordering::AcqRel);
        let r = self.in_engine("fsync", || self.ops.fsync());
        if let Err(e) = &r {
            self.set_error(e.raw_os_error().unwrap_or(libc::EIO));
            // The bytes are still not durable: the last user's drop
            // tries again.
            self.unsynced.store(true, Ordering::Release);
        }
        r
    }

    /// Writes through async-tracked mappings become dirty folios here
    /// (wp_async.rs), before any writeback walk looks for dirty folios.
    fn harvest_wbc_range(&self, wbc: &WritebackControl) -> io::Result<()> {
        let (first, end) = page_range(wbc);
        let mode = match wbc.sync_mode {
            SyncMode::All => crate::wp_async::HarvestMode::Integrity,
            SyncMode::None => crate::wp_async::HarvestMode::Background,
        };
        self.harvest_mapped_writes(PgOff(first), PgOff(end), mode)
    }

    /// `do_writepages`: run the engine's `writepages` with `wbc` (cleansing
    /// or integrity, as it says).
    ///
    /// # Errors
    /// The first write error.
    /// `EDEADLK` from inside an engine callback for this file
    /// ([`Error::Reentrant`](crate::Error::Reentrant)).
    pub fn writepages(&self, wbc: &mut WritebackControl) -> io::Result<()> {
        self.check_reentry("writepages")?;
        if wbc.sync_mode == SyncMode::None && wbc.nr_to_write <= 0 {
            return Ok(());
        }
        let harvested = self.harvest_wbc_range(wbc);
        let _wb = self.wb_lock.read();
        self.in_engine("writepages", || self.ops.writepages(self, wbc))
            .and(harvested)
    }
}
