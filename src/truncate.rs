//! Truncate and hole punch (`mm/truncate.c`): drop folios from the cache
//! under `i_rwsem` + `invalidate_lock` exclusive, zero partial folios, free
//! the memory, and pass the change on to the store.

use std::io;

use crate::address_space::AddressSpace;
use crate::aops::WritebackControl;
use crate::error::{Error, Result};
use crate::folio::{FolioGuard, FolioRef};
use crate::types::{PgOff, PAGE_SIZE};

impl AddressSpace {
    /// Write a locked folio back if it is dirty, and return it locked
    /// again (`None` if it left the file meanwhile), with the write's
    /// error: the engine's barrier error or refusal (`EAGAIN`), or the
    /// store's error from `writepage`. Used by truncate for a straddling
    /// folio and by punch (`clean_for_punch`), under `i_rwsem` and
    /// `invalidate_lock` exclusive: the folio cannot be removed by anyone
    /// else, only written back.
    fn write_back_locked(&self, g: FolioGuard) -> (Option<FolioGuard>, io::Result<()>) {
        if !g.is_dirty() && !self.redirty_after_failed_writepage(&g) {
            return (Some(g), Ok(()));
        }
        let index = g.index();
        match self.write_barrier(&g, crate::aops::SyncMode::All) {
            Ok(true) => {}
            // The engine could not allow it: the folio stays dirty, which
            // the caller treats as a failed write.
            Ok(false) => {
                let e = io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the engine's write barrier refused an integrity write (EAGAIN)",
                );
                return (Some(g), Err(e));
            }
            Err(e) => return (Some(g), Err(e)),
        }
        let mut res = Ok(());
        if self.folio_clear_dirty_for_io(&g) {
            self.stats.write_io();
            let mut wbc = WritebackControl::all(g.pos(), g.pos() + g.size() as u64 - 1);
            let f = g.folio().clone();
            if let Err(e) = crate::page_writeback::call_writepage(|| {
                self.in_engine("writepage", || self.ops.writepage(self, g, &mut wbc))
            }) {
                crate::page_writeback::keep_dirty_after_failed_writepage(self, &f, &wbc, &e);
                res = Err(e);
            }
        } else {
            drop(g);
        }
        let Some(g) = self.filemap_lock_folio(index) else {
            return (None, res);
        };
        g.wait_writeback();
        (Some(g), res)
    }

    /// Set the file size (`truncate(2)` / `ftruncate(2)`). Shrinking drops
    /// every cached byte past the new end (dirty or not) and zeroes the
    /// tail of a folio that straddles it; growing leaves a hole that reads
    /// as zeros.
    ///
    /// # Locking
    /// Takes `i_rwsem` and `invalidate_lock` exclusive; locks each folio
    /// and waits for its writeback.
    ///
    /// # Errors
    /// `EFBIG` past the largest file the store can hold
    /// ([`max_file_size`](Self::max_file_size)); the store's error from
    /// resizing.
    /// [`Error::ReadOnly`](crate::Error::ReadOnly) (`EBADF`) for a file cached from a
    /// read-only descriptor (its store cannot write);
    /// [`Error::Reentrant`](crate::Error::Reentrant) (`EDEADLK`) from inside an engine callback for
    /// this file ([`AddressSpaceOps`](crate::aops::AddressSpaceOps)).
    /// [`Error::GuardWaited`](crate::Error::GuardWaited) (`EDEADLK`) when
    /// this thread holds a page guard of the file that another thread's
    /// truncate, punch or write waits for while it holds a lock this call
    /// needs (nothing done; drop the guards and retry).
    pub fn truncate(&self, new_size: u64) -> Result<()> {
        self.check_reentry("truncate")?;
        self.check_writable()?;
        if new_size > i64::MAX as u64 {
            // `ftruncate(2)`: a negative `off_t`.
            return Err(Error::InvalidArgument {
                what: "truncate past i64::MAX (EINVAL, as ftruncate(2))",
            });
        }
        self.check_range_max(new_size, 0)?;
        // Growing a file of large folios locks the folio holding the old
        // end (`unpoison_growth`): a page guard of it held by this thread
        // is an error too, before anything changes.
        // Growing any file locks the page holding the old end
        // (`pagecache_isize_extended`) as well.
        let folio = self.ra.min_pages() << crate::types::PAGE_SHIFT;
        let from_at = |size: u64| {
            if self.ra.min_order > 0 {
                new_size.min(size / folio * folio)
            } else {
                new_size.min(size / PAGE_SIZE as u64 * PAGE_SIZE as u64)
            }
        };
        let from = from_at(self.size());
        crate::page_ref::check_range_unheld(self.id(), from, u64::MAX)?;
        // Guard holders of that range must not sleep on the locks below
        // for us ("Guard waits" in address_space.rs).
        let _gw = self.waits_for_guards(from, u64::MAX, true);
        let _sb = self.start_write();
        let _i = self.inode_lock_or_bail()?;
        let _inv = self.invalidate_lock_exclusive();
        let old = self.size();
        // The size read above may be stale (another truncate ran while we
        // waited for `i_rwsem`): a lower old end widens what we may wait
        // for. Check and announce it again before anything changes (the
        // announcement wakes guard holders asleep on the locks to look).
        let _gw_now = match from_at(old) {
            now if now < from => {
                crate::page_ref::check_range_unheld(self.id(), now, u64::MAX)?;
                Some(self.waits_for_guards(now, u64::MAX, true))
            }
            _ => None,
        };
        if new_size < old {
            {
                // Ask the store first: a size it refuses (EFBIG, EIO)
                // changes nothing. No writeback may run between the
                // store's shrink and the new i_size (it would write a
                // folio past the new end and grow the file back), so hold
                // `wb_lock` exclusive and wait for writeback in flight.
                let _wb = self.wb_lock.write();
                self.fdatawait_range(new_size, u64::MAX);
                self.in_engine("set_size", || self.ops.set_size(new_size))?;
                // i_size next (truncate_setsize): a reader or fault that
                // re-checks it after finding an uptodate folio stops at
                // the new end, and writeback clips to it.
                self.set_size_locked(new_size);
            }
            // Zap user mappings past the new end (the punch below zaps the
            // dropped folios; this also catches the pages of a folio that
            // straddles the new end), then drop the folios.
            let first = PgOff(new_size.div_ceil(PAGE_SIZE as u64));
            self.unmap_mapping_range(first, PgOff(old.div_ceil(PAGE_SIZE as u64)));
            self.truncate_inode_pages_range(new_size, u64::MAX, true)?;
        } else {
            self.in_engine("set_size", || self.ops.set_size(new_size))?;
            // Before the new size is seen: the old end's page reads zeros
            // past it.
            self.pagecache_isize_extended(old, new_size);
            if self.ra.min_order > 0 {
                // Large folios: the old last folio's pages past the old end
                // are present and poisoned; clear them before the new size
                // lets anyone read them (no folio can be created meanwhile:
                // `invalidate_lock` is held exclusive). The second clear,
                // after the size, takes pages a fault poisoned meanwhile.
                self.unpoison_growth(old, new_size);
            }
            self.set_size_locked(new_size);
            self.unpoison_growth(old, new_size);
        }
        Ok(())
    }

    /// `pagecache_isize_extended`: the file grows from `from` to `to`.
    /// Zero the bytes of the page holding the old end that lie past it, up
    /// to `to`: stores through a mapping (or a page guard) may have put
    /// bytes there while they were past end of file, and the grown range
    /// must read as zeros, as the kernel guarantees. Whole cached pages of
    /// the grown range are zeroed too: CPU stores cannot reach them (a
    /// mapping raises SIGBUS there, and pages past the end inside a kept
    /// or large folio are poisoned or not mapped), but a store the kernel
    /// made through a page pinned before a truncate can.
    ///
    /// # Locking
    /// `i_rwsem` exclusive, and the new size not yet published; locks the
    /// folio and waits for the page's pins (the caller has checked that
    /// this thread holds no guard of it: `PageHeld`).
    pub(crate) fn pagecache_isize_extended(&self, from: u64, to: u64) {
        // Every cached folio of the grown range, from the one holding the
        // old end (the rest of its page, or of its 2 MiB page on hugetlb,
        // where a mapping could store) on. Whole pages past the old end are
        // poisoned or unmapped, but a kernel-made store
        // (`process_vm_writev`, a `read(2)` into the mapping) pins the page
        // before a truncate and writes it after: where the truncate kept
        // the folio (its write-back failed, or async tracking), those bytes
        // stayed and showed once the file grew back
        // (`faults::a_store_racing_a_truncate_that_keeps_its_folio_never_shows_after_growth`).
        // The kernel drops such pages, so the late store lands in a page no
        // longer in the file.
        let mut at = from;
        while at < to {
            let Some((i, _)) = self
                .i_pages
                .find_from(at / PAGE_SIZE as u64, to.div_ceil(PAGE_SIZE as u64))
            else {
                break;
            };
            let start = (i * PAGE_SIZE as u64).max(at);
            let next = self.zero_cached_past_eof(start, to);
            at = next.max(start + PAGE_SIZE as u64);
        }
    }

    /// Zero `[from, to)` in the folio holding byte `from`, clipped to it,
    /// if it is cached and uptodate; returns the end of that folio (or
    /// `from` if there is none).
    fn zero_cached_past_eof(&self, from: u64, to: u64) -> u64 {
        let Some(g) = self.filemap_lock_folio(PgOff(from / PAGE_SIZE as u64)) else {
            return from;
        };
        let fend = g.pos() + g.size() as u64;
        let end = to.min(fend);
        if !g.is_uptodate() {
            // Its read failed (or has not run): nothing to clear, the read
            // zero-fills past the end. Writing zeros through the engine
            // view would put a page of zeros into the page store where a
            // failed fill freed it, which the kernel maps into `Missing`
            // mappings without asking (tests/faults.rs,
            // `extending_past_a_failed_last_folio_leaves_no_zeros_in_a_mapping`).
            return fend;
        }
        // A write-back in flight writes only below the old end (it clips
        // to the size), but the store may be reading the folio: stable
        // pages, as for every other change of folio bytes.
        g.wait_writeback();
        g.zero_raw((from - g.pos()) as usize, (end - from) as usize);
        fend
    }

    /// Deallocate `[off, off + len)`: it reads as zeros afterwards, the file
    /// size does not change (`fallocate(PUNCH_HOLE | KEEP_SIZE)`). The part
    /// past end of file is ignored.
    ///
    /// # Locking
    /// As [`truncate`](Self::truncate).
    ///
    /// A failed punch loses no data: what the range held stays readable
    /// (cached, or in the store, which has not punched). Bytes written
    /// into the range while the punch runs (a `PageMut`, a mapping) are
    /// ordered before it: zeroed if it succeeds, kept if it fails.
    ///
    /// # Errors
    /// `EINVAL` for a zero length, `EFBIG` for a range past the largest
    /// file the store can hold; the error of writing the range back (a folio written during
    /// the punch included), `EBUSY` if such a folio was written again
    /// during each of three write-backs; the store's error.
    /// [`Error::ReadOnly`](crate::Error::ReadOnly) (`EBADF`) for a file cached from a
    /// read-only descriptor (its store cannot write);
    /// [`Error::Reentrant`](crate::Error::Reentrant) (`EDEADLK`) from inside an engine callback for
    /// this file ([`AddressSpaceOps`](crate::aops::AddressSpaceOps)).
    /// [`Error::GuardWaited`](crate::Error::GuardWaited) (`EDEADLK`) when
    /// this thread holds a page guard of the file that another thread's
    /// truncate, punch or write waits for while it holds a lock this call
    /// needs (nothing done; drop the guards and retry).
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<()> {
        self.check_reentry("punch_hole")?;
        self.check_writable()?;
        if off > i64::MAX as u64 || len > i64::MAX as u64 {
            // `fallocate(2)`: a negative offset or length.
            return Err(Error::InvalidArgument {
                what: "punch_hole offset or length past i64::MAX (EINVAL, as fallocate(2))",
            });
        }
        if len == 0 {
            return Err(Error::InvalidArgument {
                what: "punch_hole of zero length",
            });
        }
        let end = self.check_range_max(off, len)?;
        crate::page_ref::check_range_unheld(self.id(), off, end)?;
        let _gw = self.waits_for_guards(off, end, true);
        let _sb = self.start_write();
        let _i = self.inode_lock_or_bail()?;
        let _inv = self.invalidate_lock_exclusive();
        let end = end.min(self.size());
        if off >= end {
            return Ok(());
        }
        // As ext4 does: write the range back first, so that the store has
        // seen every byte (and the size of an extending write whose tail
        // is punched), then drop the whole folios, then punch the store.
        // On any error nothing is lost: the cache still holds, or the store
        // re-reads, the data; the partial folios at the edges are zeroed
        // only once the store's punch succeeded.
        self.write_and_wait_range(off, end - 1).map_err(Error::Writeback)?;
        self.truncate_inode_pages_range(off, end, false)?;
        // The folios straddling the edges stay locked from before the
        // store's punch until their punched part is zeroed: a writeback of
        // one in between (dirtied meanwhile through a mapping:
        // page_mkwrite and async harvests take no `invalidate_lock`) would
        // write its old bytes of the range back over the store's hole.
        // Each waits for writeback already in flight first.
        let edges = self.lock_edge_folios(off, end);
        self.in_engine("punch_hole", || self.ops.punch_hole(off, end - off))?;
        for g in edges {
            let zs = (off.max(g.pos()) - g.pos()) as usize;
            let ze = (end.min(g.pos() + g.size() as u64) - g.pos()) as usize;
            if g.is_uptodate() {
                g.zero_raw(zs, ze - zs);
            }
            self.in_engine("invalidate_folio", || self.ops.invalidate_folio(self, &g, zs, ze - zs));
        }
        Ok(())
    }

    /// The cached folios holding byte `off` and byte `end - 1` that reach
    /// outside `[off, end)` (at most two), locked in index order, with no
    /// writeback in flight.
    ///
    /// # Locking
    /// `i_rwsem` and `invalidate_lock` exclusive (no folio can appear in
    /// the range).
    fn lock_edge_folios(&self, off: u64, end: u64) -> Vec<FolioGuard> {
        let mut edges: Vec<FolioGuard> = Vec::with_capacity(2);
        for pos in [off, end - 1] {
            if edges.iter().any(|g| g.pos() <= pos && pos < g.pos() + g.size() as u64) {
                continue;
            }
            if let Some(g) = self.filemap_lock_folio(PgOff(pos / PAGE_SIZE as u64)) {
                if g.pos() < off || g.pos() + g.size() as u64 > end {
                    g.wait_writeback();
                    edges.push(g);
                }
            }
        }
        edges
    }

    /// `truncate_inode_pages_range`: drop the folios inside `[start, end)`,
    /// zero the parts of folios that straddle its edges, then free the
    /// dropped folios' memory.
    ///
    /// # Locking
    /// `i_rwsem` and `invalidate_lock` held exclusive, so no folio can be
    /// created in the range meanwhile. Locks each folio, waits for its
    /// writeback, unlocks it after removal; then waits for transient
    /// references to drain before punching the memory (no reader may ever
    /// see a hole where its folio was).
    ///
    /// With `partial` false the folios that straddle an edge are left
    /// alone (punch zeroes them only after the store's punch succeeded).
    ///
    /// A large folio that straddles a truncation point (`end == u64::MAX`)
    /// is written back if dirty and then removed whole, as the kernel's
    /// `truncate_inode_partial_folio` does when it cannot split: its pages
    /// past the new end must fault again (SIGBUS, or zeros after the file
    /// grows back), which they cannot while the folio stays cached and
    /// uptodate. If its writeback fails it stays, with its tail zeroed. So
    /// does every such folio of a file with async-tracked mappings
    /// (`wp_async.rs`: it may hold mapped writes no harvest has seen yet).
    pub(crate) fn truncate_inode_pages_range(&self, start: u64, end: u64, partial: bool) -> io::Result<()> {
        let mut removed = Removed {
            mapping: self,
            folios: Vec::new(),
        };
        let mut failed: Option<io::Error> = None;
        let mut index = PgOff::of_byte(start).0;
        let end_index = end.div_ceil(PAGE_SIZE as u64);
        while let Some((i, _)) = self.i_pages.find_from(index, end_index) {
            let Some(g) = self.filemap_lock_folio(PgOff(i)) else {
                index = i + 1;
                continue;
            };
            index = g.index().0 + g.nr_pages();
            g.wait_writeback();
            let whole = g.pos() >= start && g.pos() + g.size() as u64 <= end;
            if !partial && !whole {
                continue;
            }
            let fstart = g.pos();
            let fend = fstart + g.size() as u64;
            if fstart >= start && fend <= end {
                let g = if partial {
                    g
                } else {
                    // A punch: the store has not punched yet, and may
                    // refuse. Write back what was written since the
                    // punch's own write-back, or stop before dropping it.
                    match self.clean_for_punch(g) {
                        Ok(Some(g)) => g,
                        Ok(None) => continue,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                };
                self.in_engine("invalidate_folio", || self.ops.invalidate_folio(self, &g, 0, g.size()));
                self.filemap_remove_folio(&g);
                removed.folios.push(g.unlock());
            } else if end == u64::MAX && crate::types::page_align_up(start) < fend {
                // A folio with whole pages past the new end: remove it whole.
                if let (Some(g), _) = self.write_back_locked(g) {
                    // With async-tracked mappings (checked after the
                    // writeback, which unlocked the folio: one may have been
                    // created and have written it meanwhile) the folio may
                    // hold mapped writes below the end that no harvest has
                    // seen; it looks clean, and removing it would drop
                    // them. Keep it with its tail zeroed; its pages past
                    // the end were zapped and fault to SIGBUS (`Minor` mode
                    // maps only below EOF).
                    if g.is_uptodate() && (g.is_dirty() || self.has_wp_async()) {
                        // The write failed, or unharvested mapped writes
                        // may be in it: keep the data below the end.
                        let zs = (start - fstart) as usize;
                        let first = PgOff(start.div_ceil(PAGE_SIZE as u64));
                        // Zap its pages past the end again, now that it is
                        // locked (the kernel's second `unmap_mapping_range`):
                        // a `map_pages` that read the old size and locked
                        // the folio before us may have mapped them after
                        // the first zap (`loom_large_folios`,
                        // `map_pages_vs_truncate_keeping_the_folio_...`).
                        // Before the zeroing: a store through such a stale
                        // mapping must not land after it.
                        self.unmap_mapping_range(first, g.index().add(g.nr_pages()));
                        // Its pages past the end stay present in the page
                        // store: `Missing`-mode mappings need poison there,
                        // installed before the zeroing. Until it is, the
                        // kernel maps those pages there by itself, and a
                        // store landing after the zeroing showed once the
                        // file grew back (`faults::a_store_racing_a_truncate_that_keeps_its_folio_never_shows_after_growth`).
                        self.poison_past_eof(first, g.index().add(g.nr_pages()), None);
                        g.zero_raw(zs, g.size() - zs);
                        self.in_engine("invalidate_folio", || {
                            self.ops.invalidate_folio(self, &g, zs, g.size() - zs)
                        });
                        continue;
                    }
                    self.in_engine("invalidate_folio", || self.ops.invalidate_folio(self, &g, 0, g.size()));
                    self.filemap_remove_folio(&g);
                    removed.folios.push(g.unlock());
                }
            } else if partial {
                let zs = (start.max(fstart) - fstart) as usize;
                let ze = (end.min(fend) - fstart) as usize;
                if g.is_uptodate() {
                    g.zero_raw(zs, ze - zs);
                }
                self.in_engine("invalidate_folio", || self.ops.invalidate_folio(self, &g, zs, ze - zs));
            }
        }
        let res = removed.finish();
        match failed {
            Some(e) => Err(e),
            None => res,
        }
    }

    /// A whole folio that `punch_hole` is about to drop, locked: make it
    /// clean first, so that a store that then refuses the punch loses
    /// nothing. The punch wrote the range back before it got here, but a
    /// `PageMut` or a write through a mapping may have dirtied the folio
    /// since (neither takes `invalidate_lock`). Async-tracked mappings are
    /// checked for this folio first, under its lock
    /// (`harvest_locked_folio`).
    ///
    /// Returns the folio locked and clean, `None` if it left the file
    /// while being written, or an error if it is still dirty after three
    /// writes, the punch then stopping before the store's punch with the
    /// folio kept: the last write's error (the store's, or the engine's
    /// barrier: `EAGAIN`), or `EBUSY` when each write succeeded and a
    /// writer dirtied the folio again while it was being written.
    ///
    /// # Locking
    /// `i_rwsem` and `invalidate_lock` exclusive; the folio locked, no
    /// writeback in flight. The lock is dropped while the store writes.
    fn clean_for_punch(&self, mut g: FolioGuard) -> io::Result<Option<FolioGuard>> {
        const WRITES: usize = 3;
        let mut last = Ok(());
        for written in 0..=WRITES {
            self.harvest_locked_folio(&g);
            if !g.is_dirty() && !self.redirty_after_failed_writepage(&g) {
                return Ok(Some(g));
            }
            if written == WRITES {
                break;
            }
            let (again, r) = self.write_back_locked(g);
            match again {
                Some(again) => g = again,
                None => return Ok(None),
            }
            last = r;
        }
        let pos = g.pos();
        Err(match last {
            // As the store or the engine gave it: its errno is the caller's.
            Err(e) => e,
            Ok(()) => io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "punch_hole: the folio at byte {pos} was written again during each of its write-backs \
                     (EBUSY); the punch stopped before the store's, the data stays cached"
                ),
            ),
        })
    }
}

/// The folios a truncate or punch removed from the index and has not yet
/// punched out of the page store. Their memory may be reused by a new
/// folio at the same offset only once no reference (a `PageRef`, a
/// reader's copy) is left and it is punched, so `finish` waits, then
/// punches. Dropped unfinished — an engine callback (`invalidate_folio`,
/// `free_folio`, a write barrier) panicked in the middle of the loop — it
/// still finishes: otherwise a new folio's fill would change the bytes a
/// live `&[u8]` of a removed folio reads.
struct Removed<'a> {
    mapping: &'a AddressSpace,
    folios: Vec<FolioRef>,
}

impl Removed<'_> {
    /// Wait for the removed folios' references, then punch their memory,
    /// runs of adjacent folios with one call each.
    fn finish(&mut self) -> io::Result<()> {
        let folios = std::mem::take(&mut self.folios);
        let eof = self.mapping.size().div_ceil(PAGE_SIZE as u64);
        for f in &folios {
            let (first, end) = (f.index().0.max(eof), f.index().0 + f.nr_pages());
            if first < end && f.refs_busy() {
                // A truncate waiting for a reference (a `PageRef` may be
                // held for long): the folio's pages past the new end stay
                // present in the page store until the punch, and a
                // `Missing`-mode mapping would map them by itself, old
                // bytes where the kernel raises SIGBUS. Poison them first
                // (`page_ref::a_truncate_waiting_for_a_pin_shows_no_page_past_the_new_end`).
                self.mapping.poison_past_eof(PgOff(first), PgOff(end), None);
            }
            f.wait_refs_drained();
        }
        let mut res = Ok(());
        let mut run: Option<(u64, u64)> = None;
        for f in &folios {
            let (p, l) = (f.pos(), f.size() as u64);
            run = match run {
                Some((rp, rl)) if rp + rl == p => Some((rp, rl + l)),
                Some((rp, rl)) => {
                    res = res.and(self.mapping.punch_memory(rp, rl));
                    Some((p, l))
                }
                None => Some((p, l)),
            };
        }
        if let Some((rp, rl)) = run {
            res = res.and(self.mapping.punch_memory(rp, rl));
        }
        res
    }
}

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        if !self.folios.is_empty() {
            let _ = self.finish();
        }
    }
}
