//! The buffered read and write paths (`mm/filemap.c`): `filemap_read`,
//! synchronous readahead, `generic_perform_write` with the generic
//! `write_begin` / `write_end`.

use std::io;
use std::ops::Range;

use crate::address_space::AddressSpace;
use crate::aops::ReadaheadControl;
use crate::error::{Error, Result};
use crate::folio::FolioGuard;
use crate::types::{PgOff, PAGE_SHIFT, PAGE_SIZE};

/// On-demand readahead state of one file (`struct file_ra_state`).
#[derive(Debug, Default)]
pub(crate) struct RaState {
    /// First page after the last window read.
    next: u64,
    /// Size of the last window (pages); 0 before the first.
    size: u64,
    /// First page of the window read ahead, left absent as the marker.
    hole: Option<u64>,
    /// Set by [`AddressSpace::advise`].
    advice: Advice,
}

/// Access-pattern advice for a file (`posix_fadvise` / `madvise`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Advice {
    /// No advice: on-demand readahead ramps up on sequential misses.
    #[default]
    Normal,
    /// Sequential access: read ahead the largest window from the first miss.
    Sequential,
    /// Random access: no readahead, read only what is asked for.
    Random,
    /// The range will be needed soon: read it into the cache now.
    WillNeed,
    /// The range is not needed: write it back and drop its clean folios.
    DontNeed,
}

impl AddressSpace {
    /// Check that `[pos, pos + len)` ends within the largest file the
    /// store can hold (`inode_newsize_ok`, `generic_write_checks`).
    pub(crate) fn check_range_max(&self, pos: u64, len: u64) -> Result<u64> {
        let max = self.max_file_size();
        match pos.checked_add(len) {
            Some(end) if end <= max => Ok(end),
            _ => Err(Error::FileTooLarge { offset: pos, len, max }),
        }
    }
}

/// The kernel's `rw_verify_area`: file offsets are `loff_t`, signed, so a
/// range starting past `i64::MAX` or ending past it is `EINVAL` (checked
/// before anything else, an empty write's success included).
pub(crate) fn rw_verify_area(pos: u64, len: u64) -> Result<()> {
    match pos.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(Error::InvalidArgument {
            what: "a file range past i64::MAX (EINVAL, as the kernel's loff_t)",
        }),
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error())
}

impl AddressSpace {
    /// `filemap_read`: copy file bytes at `pos` into `buf` through the cache.
    /// Returns the bytes read: fewer than asked at end of file, or when the
    /// read of a later page fails (the bytes before it, as `pread(2)`; the
    /// next read reports the failure); 0 at or past end of file.
    ///
    /// # Locking
    /// Takes nothing on a hit (lockless lookup, copy without the folio lock).
    /// On a miss takes `invalidate_lock` shared to create and read folios,
    /// and may sleep on folio locks and I/O.
    ///
    /// # Errors
    /// The store's read error (the folio stays cached, not uptodate);
    /// [`Error::InvalidArgument`] if `buf` shares memory with the bytes it
    /// would receive (a [`PageMut`](crate::PageMut) of the same page).
    /// [`Error::Reentrant`] (`EDEADLK`) from inside an engine callback for
    /// this file ([`AddressSpaceOps`](crate::aops::AddressSpaceOps)).
    /// [`Error::GuardWaited`](crate::Error::GuardWaited) (`EDEADLK`) when
    /// this thread holds a page guard of the file that another thread's
    /// truncate, punch or write waits for while it holds a lock this call
    /// needs (on a miss; drop the guards and retry).
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<usize> {
        self.check_reentry("read_at")?;
        rw_verify_area(pos, buf.len() as u64)?;
        if crate::mmap::overlaps_user_mapping(buf.as_ptr(), buf.len()) {
            // Copying into an upcache mapping can fault into this very
            // file while we hold a folio reference that truncate waits
            // for: read into a bounce buffer, copy out with nothing held.
            let mut bounce = vec![0u8; buf.len()];
            let n = self.read_at_locked_out(&mut bounce, pos)?;
            buf[..n].copy_from_slice(&bounce[..n]);
            return Ok(n);
        }
        self.read_at_locked_out(buf, pos)
    }

    /// `read_at` into a buffer that is not an upcache mapping.
    fn read_at_locked_out(&self, buf: &mut [u8], pos: u64) -> Result<usize> {
        let mut done = 0usize;
        // The next readahead window, read once the page that missed has
        // been copied out: reading it first could charge enough pages to
        // reclaim that very page, and the reader would miss it again, read
        // it again, and so on (seen as an fsx run stuck for minutes under a
        // 256 KiB limit with 2 MiB windows). Holding the folio across the
        // read instead is not allowed: readahead takes `invalidate_lock`,
        // and truncate waits for folio references with it held.
        let mut pending: Option<Range<u64>> = None;
        // When a read accesses the same folio several times (a stream of
        // small reads, or one read across a large folio), only the first
        // access marks it accessed, as `filemap_read` does: otherwise a
        // sequential stream makes every large folio look reused, reclaim
        // keeps what was already read and evicts what was read ahead.
        let mut last = self.read_prev.load(crate::sync::Ordering::Relaxed);
        while done < buf.len() {
            let p = match pos.checked_add(done as u64) {
                Some(p) if p < self.size() => p,
                _ => break,
            };
            let index = PgOff::of_byte(p);
            let folio = match self.filemap_get_folio(index) {
                Some(f) => {
                    self.stats.hit();
                    f
                }
                None => {
                    self.stats.miss();
                    let want = (((buf.len() - done) as u64) + (p & ((1 << PAGE_SHIFT) - 1))).div_ceil(1 << PAGE_SHIFT);
                    match self.page_cache_sync_readahead(index, want) {
                        // No thread to hand it to here: read it after the
                        // copy below.
                        Ok(Some(next)) => pending = Some(next),
                        Ok(None) => {}
                        // No memory for the folio (a hugetlb store's empty
                        // pool) after some bytes were read: a short read,
                        // as `filemap_read` returns what it copied.
                        Err(_) if done > 0 => break,
                        Err(e) => return Err(e),
                    }
                    continue;
                }
            };
            if !folio.is_uptodate() {
                drop(folio);
                match self.filemap_update_folio(index) {
                    Ok(()) => {}
                    // After some bytes: a short read, as `filemap_read`
                    // returns what it copied; the next read gets the error.
                    Err(_) if done > 0 => break,
                    Err(e) => return Err(e),
                }
                continue;
            }
            // Re-read i_size now that the folio is uptodate, so that we never
            // copy bytes a racing truncate has cut off.
            let size = self.size();
            if p >= size {
                break;
            }
            let off = (p - folio.pos()) as usize;
            let n = (folio.size() - off).min(buf.len() - done).min((size - p) as usize);
            if folio.bytes_overlap(off, &buf[done..done + n]) {
                // The buffer is these very bytes (a `PageMut` of the page):
                // the copy would read what it writes, under the caller's
                // `&mut`.
                return Err(Error::InvalidArgument {
                    what: "read_at into the bytes it reads (a PageMut of the same page): read into a separate buffer",
                });
            }
            folio.copy_out(off, &mut buf[done..done + n]);
            if !(folio.pos() <= last && last - folio.pos() < folio.size() as u64) {
                folio.mark_accessed();
            }
            last = p + n as u64 - 1;
            done += n;
            drop(folio);
            if let Some(next) = pending.take() {
                // Read ahead for later: its failure (no memory for a folio
                // nobody asked for yet) is not this read's; the read that
                // needs the folio meets it, as in the kernel.
                let _ = self.page_cache_async_readahead(next);
            }
        }
        self.read_prev.store(last, crate::sync::Ordering::Relaxed);
        if let Some(next) = pending {
            // Stopped early (end of file): read the window all the same,
            // the stream is sequential.
            let _ = self.page_cache_async_readahead(next);
        }
        Ok(done)
    }

    /// Bring the folio at `index` uptodate, reading it if needed
    /// (`filemap_update_page`). `Ok` also when the folio vanished: the caller
    /// looks again.
    ///
    /// # Locking
    /// Caller holds no folio reference. Takes `invalidate_lock` shared, then
    /// the folio lock; `read_folio` unlocks. A caller holding page guards
    /// gets `GuardWaited` instead of sleeping for a truncate that waits
    /// for one of them.
    pub(crate) fn filemap_update_folio(&self, index: PgOff) -> Result<()> {
        let _inv = self.invalidate_lock_shared_or_bail()?;
        let Some(g) = self.filemap_lock_folio_invalidate_held(index) else {
            return Ok(());
        };
        if g.is_uptodate() {
            return Ok(());
        }
        self.read_folio_sync(g).map_err(Error::Io)
    }

    /// Call `read_folio` and wait for it to end. Returns EIO if the folio is
    /// still not uptodate. `invalidate_lock` held shared; folio locked.
    pub(crate) fn read_folio_sync(&self, g: FolioGuard) -> io::Result<()> {
        let f = g.folio().clone();
        let had_error = f.has_error();
        self.stats.read_io();
        let r = self.in_engine("read_folio", || self.ops.read_folio(self, g));
        // An asynchronous store unlocks at completion.
        f.wait_unlocked();
        match r {
            Err(e) => {
                self.stats.read_error();
                Err(e)
            }
            Ok(()) if !f.is_uptodate() => {
                self.stats.read_error();
                Err(eio())
            }
            Ok(()) => {
                // Mapped accesses got SIGBUS for it: a read error, or a
                // panic while serving the fault, which leaves no error
                // mark (its poison stayed for good:
                // `faults::a_page_poisoned_by_a_panicking_read_is_served_once_read`).
                // Below end of file: pages past it keep their poison.
                let eof = PgOff(self.size().div_ceil(PAGE_SIZE as u64));
                let end = f.index().add(f.nr_pages());
                if had_error || self.any_mapping_poisoned(f.index(), if end < eof { end } else { eof }) {
                    self.clear_poison_of_reread_folio(f);
                }
                Ok(())
            }
        }
    }

    /// Mapped accesses got SIGBUS poison for a folio whose read failed;
    /// a new read of it succeeded: clear the poison, with the folio
    /// locked and, where a mapping that arms write notification holds
    /// that poison, dirty. The
    /// zap leaves a poisoned page of a `Missing`-mode mapping empty, and
    /// the kernel maps a store to it writable by itself until the zap's
    /// re-arm installs a uffd-wp marker (`VmArea::zap`): in a clean folio
    /// that store went unseen and eviction dropped it
    /// (`faults::a_store_racing_the_clear_of_a_read_errors_poison_is_never_lost`).
    /// Dirty, it is written back, and no write-back can clean the folio
    /// before the re-arm while it is locked (as `unpoison_growth` does
    /// for large folios). Costs one write-back of the re-read folio, on
    /// this error path only. A folio truncated meanwhile had its poison
    /// cleared by its removal.
    fn clear_poison_of_reread_folio(&self, f: crate::folio::FolioRef) {
        let g = f.lock();
        if g.mapping_id() != self.id() || !g.is_uptodate() {
            return;
        }
        // Only where the clear zaps a page the kernel maps by itself: a
        // write-notifying mapping that got SIGBUS here (not for every
        // re-read while such a mapping exists: each dirtying costs a
        // write-back, and an `EIO` from `fsync` if the store's writes fail).
        if !g.is_dirty() && self.armed_mapping_poisoned(g.index(), g.index().add(g.nr_pages())) {
            self.folio_mark_dirty(&g);
        }
        self.clear_read_error_poison(g.index(), g.nr_pages());
    }

    /// `page_cache_sync_readahead` (on-demand readahead, `mm/readahead.c`):
    /// a miss at `index` wanting at least `req_pages`. Reads a window
    /// synchronously and returns the window to read next, asynchronously,
    /// when the access pattern is sequential.
    ///
    /// The per-file state ramps the window up (doubling from
    /// `readahead_bytes` to `readahead_max_bytes`) while misses continue
    /// where the last window ended. The async window is read without its
    /// first page: that hole is the marker (the kernel's PG_readahead). A
    /// reader reaching it misses again, which reads the one page and starts
    /// the following window — so a sequential stream keeps one window in
    /// flight ahead of it, even in `Missing` mode where the kernel maps
    /// cached pages without telling us.
    ///
    /// # Locking
    /// Caller holds no folio reference. Takes `invalidate_lock` shared.
    ///
    /// # Errors
    /// Only failures to map the page store; read errors are left on the
    /// folios and reported by whoever needs them.
    pub(crate) fn page_cache_sync_readahead(&self, index: PgOff, req_pages: u64) -> Result<Option<Range<u64>>> {
        // A large read is read ahead one bounded chunk at a time (the
        // caller copies it out, then misses again): reading all of a read
        // larger than the memory limit at once would evict its own head
        // before the copy reached it, again and again.
        let chunk = self.ra_chunk_pages();
        // With large folios the windows are whole folios: start the window
        // at the folio holding `index`, so that windows (and the marker
        // holes between them) fall on folio boundaries.
        let mp = self.ra.min_pages();
        let req_pages = req_pages + (index.0 & (mp - 1));
        let index = PgOff(index.0 & !(mp - 1));
        let req_pages = req_pages.min(chunk);
        // Windows too are at most a chunk (a quarter of a memory limit):
        // a window larger than what reclaim leaves cached would evict its
        // own first pages before the reader reached them, and every one
        // would be read twice or more (4.75x the file for a sequential
        // read under a 256 KiB limit with 2 MiB windows,
        // `tests/reclaim.rs`).
        let init = self.ra.window_pages.min(chunk);
        let max = self.ra.max_pages.max(init).min(chunk).max(init);
        let (sync, next) = {
            let mut st = self.ra_state.lock();
            if st.advice == Advice::Random {
                ((index.0, req_pages.max(1)), None)
            } else if st.advice == Advice::Sequential && st.hole != Some(index.0) {
                let start = index.0 + max;
                st.size = max;
                st.next = start + max;
                st.hole = Some(start);
                ((index.0, req_pages.max(max)), Some(start..start + max))
            } else if st.hole == Some(index.0) {
                // The stream reached the marker of the window read ahead.
                let size = (st.size * 2).min(max);
                let start = st.next;
                st.size = size;
                st.next = start + size;
                st.hole = Some(start);
                ((index.0, req_pages.max(1)), Some(start..start + size))
            } else if st.size > 0 && index.0 == st.next {
                // Sequential, but nothing was read ahead: ramp up.
                let size = (st.size * 2).min(max);
                let start = index.0 + size;
                st.size = size;
                st.next = start + size;
                st.hole = Some(start);
                ((index.0, req_pages.max(size)), Some(start..start + size))
            } else {
                st.size = init;
                st.next = index.0 + init;
                st.hole = None;
                ((index.0, req_pages.max(init)), None)
            }
        };
        self.page_cache_ra_range(PgOff(sync.0), sync.0.saturating_add(sync.1))?;
        Ok(next)
    }

    /// `page_cache_async_readahead`: read a window returned by
    /// [`page_cache_sync_readahead`](Self::page_cache_sync_readahead),
    /// leaving its first page as the marker hole.
    ///
    /// # Locking
    /// As `page_cache_sync_readahead`.
    ///
    /// # Errors
    /// As `page_cache_sync_readahead`.
    pub(crate) fn page_cache_async_readahead(&self, window: Range<u64>) -> Result<()> {
        // With large folios the marker is the window's whole first folio.
        let first = (window.start + 1).next_multiple_of(self.ra.min_pages());
        self.page_cache_ra_range(PgOff(first), window.end)
    }

    /// Create the missing folios of `[index, end)` (clamped to EOF), using
    /// large folios where alignment allows, and read them with the engine's
    /// `readahead`.
    fn page_cache_ra_range(&self, index: PgOff, end: u64) -> Result<()> {
        let _inv = self.invalidate_lock_shared_or_bail()?;
        let eof_pages = self.size().div_ceil(1 << PAGE_SHIFT);
        let end = end.min(eof_pages);
        if index.0 >= end {
            return Ok(());
        }
        // Whole folios of at least the file's smallest order (a large folio
        // may reach past the end of the file; `filemap_add_folio` poisons
        // its pages there in `Missing`-mode mappings).
        let mp = self.ra.min_pages();
        let index = PgOff(index.0 & !(mp - 1));
        let end = end.next_multiple_of(mp);
        // Large folios for large windows: the order grows with the window
        // (up to `max_folio_order`), so a 1-page read gets an order-0 folio
        // and a sequential stream's big windows get big folios.
        let max_order = self.ra.max_order.min((end - index.0).ilog2() as u8);
        // Submit in chunks of at most the largest readahead window (and a
        // quarter of the memory limit): a huge read or WillNeed must not
        // lock more new folios at once than reclaim could ever make room
        // for (they are unevictable until read; a read_at of twice the
        // limit used to leave reclaim scanning in vain).
        let chunk = self.ra_chunk_pages();
        let mut batch = Vec::new();
        let mut batch_pages = 0;
        let mut i = index.0;
        'next: while i < end {
            if batch_pages >= chunk {
                self.submit_readahead(std::mem::take(&mut batch));
                batch_pages = 0;
            }
            if let Some(f) = self.filemap_get_folio(PgOff(i)) {
                i = f.index().0 + f.nr_pages();
                continue;
            }
            let mut order = max_order;
            loop {
                let n = 1u64 << order;
                if i % n == 0 && i + n <= end {
                    let added = match self.filemap_add_folio(PgOff(i), order) {
                        Ok(a) => a,
                        // No memory for a folio (a hugetlb page store's
                        // empty pool): as the kernel's readahead, stop
                        // here and read what was created; the window's
                        // first folio, the one asked for, fails the call.
                        Err(e) if i == index.0 => {
                            self.submit_readahead(batch);
                            return Err(e.into());
                        }
                        Err(_) => break 'next,
                    };
                    if let Some(g) = added {
                        g.set_fresh();
                        i += n;
                        batch.push(g);
                        batch_pages += n;
                        continue 'next;
                    }
                }
                if order <= self.ra.min_order {
                    // Someone inserted at `i` meanwhile: look again.
                    continue 'next;
                }
                order -= 1;
            }
        }
        self.submit_readahead(batch);
        Ok(())
    }

    /// Most pages one readahead call locks and reads at once: the largest
    /// window, and at most a quarter of the memory limit.
    fn ra_chunk_pages(&self) -> u64 {
        let mut chunk = self.ra.max_pages.max(1);
        if let Some(r) = &self.reclaim {
            chunk = chunk.min((r.limit_bytes() >> PAGE_SHIFT) / 4).max(1);
        }
        chunk.next_multiple_of(self.ra.min_pages())
    }

    /// Hand a batch of new, locked folios to the engine's `readahead`.
    fn submit_readahead(&self, batch: Vec<FolioGuard>) {
        if batch.is_empty() {
            return;
        }
        for _ in &batch {
            self.stats.read_io();
        }
        let mut rac = ReadaheadControl { folios: batch };
        self.in_engine("readahead", || self.ops.readahead(self, &mut rac));
        // Folios the engine did not take are unlocked, not uptodate.
        drop(rac);
    }

    /// `posix_fadvise`: `Normal`, `Sequential` and `Random` set the file's
    /// readahead behaviour; `WillNeed` reads `[off, off + len)` into the
    /// cache now; `DontNeed` starts writeback of the range and drops its
    /// clean folios that nobody is using (mapped pages are zapped and fault
    /// back in). A zero `len` means to the end of the file, as in
    /// posix_fadvise(2).
    ///
    /// # Locking
    /// `WillNeed` takes `invalidate_lock` shared; `DontNeed` trylocks folios.
    ///
    /// # Errors
    /// Write errors of `DontNeed`'s writeback (also kept for fsync).
    /// [`Error::Reentrant`] (`EDEADLK`) from inside an engine callback for
    /// this file ([`AddressSpaceOps`](crate::aops::AddressSpaceOps)).
    pub fn advise(&self, advice: Advice, off: u64, len: u64) -> Result<()> {
        self.check_reentry("advise")?;
        match advice {
            Advice::Normal | Advice::Sequential | Advice::Random => {
                let mut st = self.ra_state.lock();
                st.advice = advice;
                st.hole = None;
                st.size = 0;
                Ok(())
            }
            // Length 0: to the end of the file (posix_fadvise(2)).
            Advice::WillNeed | Advice::DontNeed if len == 0 => match self.size() {
                end if end > off => self.advise(advice, off, end - off),
                _ => Ok(()),
            },
            Advice::WillNeed => {
                let end = off.saturating_add(len).div_ceil(1 << PAGE_SHIFT);
                self.page_cache_ra_range(PgOff::of_byte(off), end)
            }
            Advice::DontNeed => {
                let last = off.saturating_add(len) - 1;
                let mut wbc = crate::aops::WritebackControl {
                    sync_mode: crate::aops::SyncMode::None,
                    nr_to_write: i64::MAX,
                    range_start: off,
                    range_end: last,
                    pages_written: 0,
                    for_background: false,
                };
                let written = self.writepages(&mut wbc);
                self.invalidate_clean_range(PgOff::of_byte(off), PgOff::of_byte(last).0 + 1);
                written.map_err(Error::Writeback)
            }
        }
    }

    /// `generic_perform_write` under `i_rwsem`: copy `buf` into the cache at
    /// `pos`, growing the file as needed. Returns `buf.len()`.
    ///
    /// # Locking
    /// Takes `i_rwsem` exclusive; `write_begin` / `write_end` lock each folio.
    ///
    /// # Errors
    /// `EFBIG` when `pos` is at or past the largest file the store can
    /// hold ([`max_file_size`](Self::max_file_size); a write starting
    /// below it and crossing it is cut short there and returns the shorter
    /// length, as the kernel's); past the dirty limit, the error of this
    /// file's write-back when it failed and left dirty memory past the
    /// limit (nothing written); a read error of a partial-folio
    /// read-modify-write (bytes already copied stay written: the returned
    /// error says nothing was written only when it came first).
    /// [`Error::ReadOnly`](crate::Error::ReadOnly) (`EBADF`) for a file cached from a
    /// read-only descriptor (its store cannot write);
    /// [`Error::Reentrant`] (`EDEADLK`) from inside an engine callback for
    /// this file ([`AddressSpaceOps`](crate::aops::AddressSpaceOps)).
    /// [`Error::GuardWaited`](crate::Error::GuardWaited) (`EDEADLK`) when
    /// this thread holds a page guard of the file that another thread's
    /// truncate, punch or write waits for while it holds a lock this call
    /// needs (nothing done; drop the guards and retry).
    pub fn write_at(&self, buf: &[u8], pos: u64) -> Result<usize> {
        self.check_reentry("write_at")?;
        self.check_writable()?;
        rw_verify_area(pos, buf.len() as u64)?;
        // As the kernel's generic_write_checks: an empty write succeeds
        // wherever it points; one starting below the largest file and
        // crossing it is cut short there.
        if buf.is_empty() {
            return Ok(0);
        }
        let max = self.max_file_size();
        if pos < max && buf.len() as u64 > max - pos {
            return self.write_at(&buf[..(max - pos) as usize], pos);
        }
        self.check_range_max(pos, buf.len() as u64)?;
        if crate::mmap::overlaps_user_mapping(buf.as_ptr(), buf.len()) {
            // The source is an upcache mapping: copying from it under the
            // folio lock could fault on that very folio. Fault it in now,
            // with no lock held, into a bounce buffer.
            let bounce = buf.to_vec();
            return self.write_at(&bounce, pos);
        }
        // A page guard of this thread over the range: the write would wait
        // for it (its pins, or its lock).
        crate::page_ref::check_range_unheld(self.id(), pos, pos + buf.len() as u64)?;
        // Growing a file locks the folio holding the old end (large
        // folios: `unpoison_growth`; a gap before `pos`:
        // `pagecache_isize_extended`), which may be one this thread holds
        // a page guard of: say so before changing anything.
        let folio = (self.ra.min_pages() << PAGE_SHIFT).max(PAGE_SIZE as u64);
        let growth_from = |size: u64| (pos + buf.len() as u64 > size).then(|| (size / folio * folio).min(pos));
        let mut waits = (pos, pos + buf.len() as u64);
        if let Some(from) = growth_from(self.size()) {
            crate::page_ref::check_range_unheld(self.id(), from, u64::MAX)?;
            waits = (from, u64::MAX);
        }
        if let Some(wb) = &self.wb {
            // Past the dirty limit with this file's write-back failing:
            // refuse to dirty more (nothing is written).
            wb.balance_dirty_pages(self).map_err(Error::Writeback)?;
        }
        // Guard holders of what this write may wait for must not sleep on
        // `i_rwsem` for it.
        let _gw = self.waits_for_guards(waits.0, waits.1, false);
        let _sb = self.start_write();
        let _i = self.inode_lock_or_bail()?;
        let old_size = self.size();
        // The size read above may be stale (a truncate ran while we waited
        // for `i_rwsem`): a growth it now makes locks an old end below
        // what we announced. Check and announce again first.
        let _gw_now = match growth_from(old_size) {
            Some(from) if from < waits.0 || waits.1 < u64::MAX => {
                crate::page_ref::check_range_unheld(self.id(), from, u64::MAX)?;
                Some(self.waits_for_guards(from, u64::MAX, false))
            }
            _ => None,
        };
        // With large folios the pages past the end of every folio were
        // poisoned when it was created (`filemap_add_folio`), and each
        // folio's `write_end` makes its bytes visible (`i_size`) before the
        // whole write is done: clear the poison before that, for the pages
        // between the old end and the write first (the old last folio's
        // tail, the gap), then for each folio just before its `write_end`.
        // A racing access past the old end may then map zeros instead of
        // raising SIGBUS while the write is in progress.
        // A write that starts past the end leaves a gap, which must read
        // as zeros: clear what mapped stores left past the old end.
        if pos > old_size {
            self.pagecache_isize_extended(old_size, pos);
        }
        let large = self.ra.min_order > 0;
        let mut unpoisoned = old_size;
        if large && pos > old_size {
            self.unpoison_growth(old_size, pos);
            unpoisoned = pos;
        }
        let mut done = 0usize;
        let mut first_err = None;
        while done < buf.len() {
            let p = pos + done as u64;
            let left = buf.len() - done;
            let mut g = match self.in_engine("write_begin", || self.ops.write_begin(self, p, left)) {
                Ok(g) => g,
                Err(e) => {
                    first_err = (done == 0).then_some(e);
                    break;
                }
            };
            // The engine's folio must hold byte `p` and be this file's: the
            // copy below is at `p - folio.pos()` in its memory.
            if g.mapping_id() != self.id() || p < g.pos() || p - g.pos() >= g.size() as u64 {
                drop(g);
                first_err = (done == 0).then(|| {
                    io::Error::other(format!(
                        "write_begin returned a folio that does not hold byte {p} of this file (EIO)"
                    ))
                });
                break;
            }
            // Stable pages, always: the bytes of a folio under writeback
            // are being read by the store; wait rather than change them.
            g.wait_writeback();
            let off = (p - g.pos()) as usize;
            let n = (g.size() - off).min(left);
            if !g.is_uptodate() && (off != 0 || n != g.size()) {
                // A folio that is not uptodate may be returned only for a
                // whole-folio overwrite (`generic_write_begin` reads it
                // first otherwise): the rest of it would become file data
                // unread (a page-atomic fill even writes `buf` at its start).
                drop(g);
                first_err = (done == 0).then(|| {
                    io::Error::other(format!(
                        "write_begin returned a folio that is not uptodate for a partial write at byte {p} (EIO)"
                    ))
                });
                break;
            }
            if !g.is_uptodate() && self.needs_atomic_fill() {
                // A whole-folio overwrite of an uncached folio: install it
                // page-atomically, or a kernel-mapped reader could see the
                // fresh zero page instead of old or new data.
                if let Err(e) = self.fill_folio(&mut g, &buf[done..done + n]) {
                    // Free what the failed fill installed: those bytes were
                    // never written (the next access reads the folio).
                    g.set_error();
                    first_err = (done == 0).then_some(e);
                    break;
                }
            } else {
                g.copy_in_raw(off, &buf[done..done + n]);
            }
            if large && p + n as u64 > unpoisoned {
                // The folio is locked: no writeback can clean it, and
                // `write_end` dirties it, so a mapped write between the zap
                // and its re-arming (`VmArea::zap`) is not lost.
                // From the old end: a folio created by this write was
                // poisoned whole past it, below `pos` too.
                let first = PgOff(old_size.div_ceil(PAGE_SIZE as u64)).max(g.index());
                let end = PgOff((p + n as u64).div_ceil(PAGE_SIZE as u64));
                if first < end {
                    self.zap_poison(first, end);
                }
                unpoisoned = p + n as u64;
            }
            // A folio whose read failed, overwritten whole: `write_end`
            // makes it uptodate (clearing its error) without a read, so
            // neither a read nor its removal would clear the SIGBUS poison
            // mapped accesses got for it; clear it here. While the folio
            // is locked, as the growth zap above: once unlocked, write-back
            // could clean it between the zap (which drops a `Missing`
            // mapping's write-notify markers) and their re-arming, and a
            // store in between would land in a clean folio unseen. A fault
            // meanwhile waits for the lock and finds the folio uptodate.
            if g.has_error() {
                self.clear_read_error_poison(g.index(), g.nr_pages());
            }
            // Never more than was copied in (an engine's count past it would
            // skip bytes of `buf` and overstate the result).
            let copied = self.in_engine("write_end", || self.ops.write_end(self, p, n, g)).min(n);
            done += copied;
            if copied < n {
                break;
            }
        }
        let size = self.size();
        if large {
            if pos > old_size && size > old_size {
                // Pages below the write may have been poisoned while it ran
                // (a fault or readahead that still saw the old size).
                self.unpoison_growth(old_size, pos.min(size));
            }
            if unpoisoned > size {
                // Cleared ahead of a size that did not come (a failed
                // `write_begin` or fill, a short `write_end`): its pages
                // past the end are present and must raise SIGBUS again.
                self.poison_cached_past_eof(PgOff(unpoisoned.div_ceil(PAGE_SIZE as u64)));
            }
        }
        if size > unpoisoned {
            self.unpoison_growth(unpoisoned, size);
        }
        if let Some(e) = first_err {
            return Err(Error::Io(e));
        }
        if let Some(wb) = &self.wb {
            // After the write: a failure is reported by the next write
            // (below) and by fsync.
            let _ = wb.balance_dirty_pages(self);
        }
        Ok(done)
    }
}

/// The generic `write_begin`: the folio covering `pos`, locked and ready for
/// `len` bytes at `pos` (read first when the write covers it only in part).
///
/// # Locking
/// `i_rwsem` exclusive. Takes `invalidate_lock` shared (before the folio
/// lock) around the partial-folio read.
///
/// # Errors
/// The read error of that partial-folio read.
pub fn generic_write_begin(mapping: &AddressSpace, pos: u64, len: usize) -> io::Result<FolioGuard> {
    let index = PgOff::of_byte(pos);
    loop {
        let mut g = mapping.filemap_grab_folio(index)?;
        if g.is_uptodate() {
            return Ok(g);
        }
        let off = (pos - g.pos()) as usize;
        let n = len.min(g.size() - off);
        if off == 0 && n == g.size() {
            // Whole-folio overwrite: write_end marks it uptodate.
            return Ok(g);
        }
        if g.pos() >= mapping.size() {
            // Entirely past EOF: zeros, no read. Through `fill_folio`:
            // with `Missing` mappings the pages must appear page-atomically
            // (`pwrite`), never through a `&mut` to memory the kernel may
            // already map.
            if let Err(e) = mapping.fill_folio(&mut g, &[]) {
                g.set_error();
                return Err(e);
            }
            g.mark_uptodate();
            return Ok(g);
        }
        // Read-modify-write. invalidate_lock ranks above the folio lock, so
        // drop the folio and take them in order, then look again.
        drop(g);
        let _inv = mapping.invalidate_lock_shared();
        if let Some(g) = mapping.filemap_lock_folio_invalidate_held(index) {
            if !g.is_uptodate() {
                mapping.read_folio_sync(g)?;
            }
        }
    }
}

/// The generic `write_end`: mark the folio uptodate and dirty, grow
/// `i_size`, unlock. Returns `copied`.
///
/// # Locking
/// `i_rwsem` exclusive; folio locked on entry, unlocked on return.
///
/// # Panics
/// If `[pos, pos + copied)` is not inside the folio.
pub fn generic_write_end(mapping: &AddressSpace, pos: u64, copied: usize, folio: FolioGuard) -> usize {
    if !folio.is_uptodate() {
        // Only a whole-folio overwrite gets here not uptodate.
        debug_assert_eq!(copied, folio.size());
        folio.mark_uptodate();
    }
    // The bytes written lie inside the folio (so below the largest file):
    // a size past it would let readahead create folios whose memory is
    // another file's.
    let end = pos
        .checked_add(copied as u64)
        .filter(|&e| pos >= folio.pos() && e <= folio.pos() + folio.size() as u64);
    let Some(end) = end else {
        panic!(
            "generic_write_end: {copied} bytes at {pos} are not inside the folio at {} ({} bytes)",
            folio.pos(),
            folio.size()
        );
    };
    mapping.folio_mark_dirty(&folio);
    if end > mapping.size() {
        mapping.set_size_locked(end);
    }
    drop(folio);
    copied
}
