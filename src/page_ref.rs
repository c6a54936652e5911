//! Pinned, zero-copy page access: `read_cache_page` (the kernel's
//! `read_cache_folio`, vmcache's fix/unfix) for storage engines that want
//! a page's bytes in place instead of a copy.
//!
//! [`AddressSpace::read_cache_page`] returns a [`PageRef`]: one 4 KiB page,
//! read in if needed, **pinned** — reclaim skips its folio, truncate and
//! punch of it wait until the pin is dropped, and every write to its bytes
//! (`write_at`, a [`PageMut`], truncate's zeroing) waits too — so it derefs
//! to `&[u8]` soundly. [`AddressSpace::read_cache_page_mut`] returns a
//! [`PageMut`]: the page's folio locked (other writers and new pins wait),
//! existing pins drained, writeback finished (stable pages); it derefs to
//! `&mut [u8]` and marks the folio dirty on drop if it was written.
//!
//! A hit costs no system call and no copy: a lockless lookup, the folio
//! lock taken and released once to raise the pin count, and a decrement on
//! drop.
//!
//! # Locking
//!
//! | guard | holds while alive | waits for it |
//! |---|---|---|
//! | `PageRef` | a folio reference and a pin | `write_at`/`PageMut`/truncate/punch of the same folio; not readers, mapped reads, writeback |
//! | `PageMut` | the folio lock and a reference; `sb_start_write` | everything that locks the folio (faults on it, writeback, truncate, other `PageRef`s and `PageMut`s of the folio), `PageCache::freeze` |
//!
//! Guards are `!Send`, like `MutexGuard`: a thread that waits for a page it
//! pins or locks itself would wait forever, so each thread records what it
//! holds. Calls that would wait for the caller's own guard return an error
//! (`PageHeld`/`EDEADLK`: `write_at`, `truncate` or `punch_hole` over it,
//! growth that locks it, `freeze`, an integrity writeback such as `fsync`
//! that reaches a dirty folio this thread's `PageMut` holds; background
//! writeback skips locked folios); the rest panic with a message instead
//! of hanging (a second `PageMut` of the same folio, a `PageRef` of a folio
//! this thread's `PageMut` holds). Across threads, the engine orders its
//! page guards as it would any latches; and where another thread's
//! truncate, punch or write waits for a guard of this thread while it
//! holds a lock this thread's call needs (a read miss needs
//! `invalidate_lock`; a write, truncate or punch `i_rwsem`), the call
//! returns [`Error::GuardWaited`](crate::Error::GuardWaited) (`EDEADLK`)
//! instead of waiting: drop the guards and restart, as a latch-coupling
//! descent does ("Guard waits" in `address_space.rs`).
//!
//! # Why the constructors are `unsafe`
//!
//! Every writer inside the crate waits for pins and folio locks, but a
//! write through a user mapping does not: [`crate::MmapRaw::write`] is a
//! safe raw copy into mapped memory, and a mapping's stores go straight to
//! the page once it is writable. A `&[u8]` whose bytes such a store changes
//! (or a `&mut [u8]` such a load reads) is undefined behaviour. So, as
//! memmap2 does for `Mmap`, the constructors are `unsafe` with that one
//! contract: **while a guard lives, no mapping of the file writes its page
//! (and, for a `PageMut`, none reads it).** An engine that does not map
//! the pages it pins, or orders its mapped accesses after the guards, meets
//! it trivially. (Write-protecting pinned pages in every mapping, so that
//! mapped writers fault and wait like `write_at`, would make them safe; it
//! costs a write-protect ioctl per pin of a mapped dirty page and is left
//! for later.)

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use crate::address_space::AddressSpace;
use crate::error::{Error, Result};
use crate::folio::{Folio, FolioGuard, FolioRef};
use crate::types::{PgOff, PAGE_SHIFT, PAGE_SIZE};

/// One page guard this thread holds.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Held {
    /// The folio's address (identity).
    folio: usize,
    /// Through a `PageMut` (folio locked), else a `PageRef` (pinned).
    locked: bool,
    /// The folio's address space and byte range in the file.
    mapping: u64,
    start: u64,
    end: u64,
}

impl Held {
    fn of(f: &Folio, locked: bool) -> Held {
        Held {
            folio: f as *const Folio as usize,
            locked,
            mapping: f.mapping_id(),
            start: f.pos(),
            end: f.pos() + f.size() as u64,
        }
    }
}

crate::sync::thread_local! {
    /// The page guards this thread holds: the self-deadlock checks.
    /// (Not a `const` initializer: loom's `thread_local!` takes none.)
    #[allow(clippy::missing_const_for_thread_local)]
    static HELD: RefCell<Vec<Held>> = RefCell::new(Vec::new());
}

fn held_push(f: &Folio, locked: bool) {
    // `try_with`: nothing to record in a thread whose thread-locals are
    // being destroyed (`with` would panic, and a panic there aborts).
    let _ = HELD.try_with(|h| h.borrow_mut().push(Held::of(f, locked)));
}

fn held_pop(f: &Folio, locked: bool) {
    let addr = f as *const Folio as usize;
    let _ = HELD.try_with(|h| {
        let mut h = h.borrow_mut();
        if let Some(i) = h.iter().rposition(|e| e.folio == addr && e.locked == locked) {
            h.swap_remove(i);
        }
    });
}

fn held_by_me(f: &Folio, locked: Option<bool>) -> bool {
    let addr = f as *const Folio as usize;
    HELD.try_with(|h| {
        h.borrow()
            .iter()
            .any(|e| e.folio == addr && locked.is_none_or(|l| l == e.locked))
    })
    .unwrap_or(false)
}

/// Does this thread hold `f` locked through a [`PageMut`]?
pub(crate) fn locked_by_this_thread(f: &Folio) -> bool {
    held_by_me(f, Some(true))
}

/// Does this thread hold a page guard of `f`?
pub(crate) fn held_by_this_thread(f: &Folio) -> bool {
    held_by_me(f, None)
}

/// The byte range of a folio of `mapping` that overlaps `[start, end)`
/// and that this thread holds a page guard of, if any.
pub(crate) fn held_in_range(mapping: u64, start: u64, end: u64) -> Option<(u64, u64)> {
    HELD.try_with(|h| {
        h.borrow()
            .iter()
            .find(|e| e.mapping == mapping && e.start < end && start < e.end)
            .map(|e| (e.start, e.end))
    })
    .ok()
    .flatten()
}

/// Does this thread hold any page guard of `mapping`? (Its sleeps on
/// `i_rwsem` and `invalidate_lock` must be able to back off: "Guard
/// waits" in `address_space.rs`.)
pub(crate) fn holds_any(mapping: u64) -> bool {
    HELD.try_with(|h| h.borrow().iter().any(|e| e.mapping == mapping))
        .unwrap_or(false)
}

/// `Err(PageHeld)` if this thread holds a page guard of a folio of
/// `mapping` that overlaps bytes `[start, end)`: truncate and punch call
/// it before they change anything, since they would wait for that guard
/// forever.
pub(crate) fn check_range_unheld(mapping: u64, start: u64, end: u64) -> Result<()> {
    match held_in_range(mapping, start, end) {
        Some((s, e)) => Err(Error::PageHeld { offset: s, len: e - s }),
        None => Ok(()),
    }
}

/// Panic instead of sleeping forever for pins this very thread holds
/// (slow paths only: called when there is something to wait for). Paths
/// that could leave state half-changed check first with
/// [`check_range_unheld`] and return an error instead.
pub(crate) fn assert_not_pinned_here(f: &Folio, what: &str) {
    if held_by_me(f, None) {
        panic!(
            "upcache: this thread holds a PageRef/PageMut of the page cache folio at page index {} and tried to {what}: \
             it would wait for itself forever (drop the page guard first)",
            f.index().0
        );
    }
}

/// Panic instead of sleeping forever on a folio lock this thread holds
/// through a `PageMut`.
pub(crate) fn assert_not_locked_here(f: &Folio) {
    if held_by_me(f, Some(true)) {
        panic!(
            "upcache: this thread holds a PageMut of the page cache folio at page index {} and waited for its lock: \
             it would wait for itself forever (drop the PageMut first)",
            f.index().0
        );
    }
}

/// A pinned, read-only page of a file (see the module docs). Derefs to
/// the page's `PAGE_SIZE` bytes; bytes past end of file read as zeros
/// (unless a shared mapping wrote there: README, "Mappings: semantics").
pub struct PageRef<'a> {
    folio: FolioRef,
    /// Byte offset of the page in its folio.
    off: usize,
    index: u64,
    _mapping: PhantomData<&'a AddressSpace>,
    /// `!Send`: the self-deadlock record is per thread.
    _not_send: PhantomData<*const ()>,
}

impl PageRef<'_> {
    /// The page index in the file.
    pub fn index(&self) -> u64 {
        self.index
    }
}

impl Deref for PageRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the page lies inside the folio (`off + PAGE_SIZE <=
        // size`, checked at creation), whose memory stays mapped and
        // unpunched while we hold a reference (truncate waits for it,
        // reclaim's freeze fails on it). The folio is uptodate and pinned,
        // so every crate path that writes its bytes (`copy_in_raw`,
        // `zero_raw`) waits for the pin to go; fills only write folios
        // that are not uptodate; writes through user mappings are excluded
        // by `read_cache_page`'s safety contract.
        unsafe { std::slice::from_raw_parts(self.folio.as_ptr().add(self.off), PAGE_SIZE) }
    }
}

impl Drop for PageRef<'_> {
    fn drop(&mut self) {
        held_pop(&self.folio, false);
        self.folio.unpin();
    }
}

impl std::fmt::Debug for PageRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageRef").field("index", &self.index).finish()
    }
}

/// A locked, writable page of a file (see the module docs). Derefs to the
/// page's `PAGE_SIZE` bytes; dropping it marks the folio dirty if it was
/// borrowed mutably, zeroes any bytes written past end of file, and unlocks.
pub struct PageMut<'a> {
    mapping: &'a AddressSpace,
    folio: Option<FolioGuard>,
    off: usize,
    index: u64,
    written: bool,
    _sb: Option<crate::fs_writeback::GateGuard<'a>>,
    _not_send: PhantomData<*const ()>,
}

impl PageMut<'_> {
    /// The page index in the file.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Record the LSN (or any engine word) of the change made through this
    /// guard: the folio keeps the largest value, and write-back first calls
    /// [`AddressSpaceOps::write_barrier`](crate::aops::AddressSpaceOps::write_barrier)
    /// / [`BackingStore::write_barrier`](crate::BackingStore::write_barrier)
    /// with it, so a WAL engine makes its log durable up to it before the
    /// page reaches the store.
    pub fn set_lsn(&self, lsn: u64) {
        self.guard().set_private_max(lsn);
    }

    fn guard(&self) -> &FolioGuard {
        self.folio.as_ref().expect("PageMut used after drop")
    }
}

impl Deref for PageMut<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let g = self.guard();
        // SAFETY: in the folio (checked at creation), memory kept by our
        // reference; we hold the folio lock with no pin left, so no crate
        // path writes these bytes but us, and `&self` forbids our own
        // writes while the slice lives.
        unsafe { std::slice::from_raw_parts(g.as_ptr().add(self.off), PAGE_SIZE) }
    }
}

impl DerefMut for PageMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.written = true;
        let g = self.guard();
        // SAFETY: as in `deref`; new pins and every other crate writer
        // need the folio lock we hold, pins that existed were drained
        // when the guard was made,
        // writeback (which reads these bytes) finished before we got the
        // lock and cannot start without it, and `&mut self` makes this the
        // only slice. Lockless `read_at` copies may observe the write
        // partially, as with `write_at` (raw copies, no reference);
        // mapped readers are excluded by `read_cache_page_mut`'s contract.
        unsafe { std::slice::from_raw_parts_mut(g.as_ptr().add(self.off), PAGE_SIZE) }
    }
}

impl Drop for PageMut<'_> {
    fn drop(&mut self) {
        let Some(g) = self.folio.take() else { return };
        held_pop(&g, true);
        if self.written {
            // Bytes past EOF must stay zero (a later extension exposes
            // them), as the kernel zeroes them on writeback.
            let page_pos = self.index << PAGE_SHIFT;
            let size = self.mapping.size();
            if page_pos + PAGE_SIZE as u64 > size {
                let from = size.saturating_sub(page_pos) as usize;
                g.zero_raw(self.off + from, PAGE_SIZE - from);
            }
            self.mapping.folio_mark_dirty(&g);
        }
        drop(g);
        if self.written {
            if let Some(wb) = &self.mapping.wb {
                // A failure is the write-back's (kept for fsync); the
                // guard's write is done.
                let _ = wb.balance_dirty_pages(self.mapping);
            }
        }
    }
}

impl std::fmt::Debug for PageMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageMut").field("index", &self.index).finish()
    }
}

impl AddressSpace {
    /// The folio covering page `index`, locked, uptodate, still in this
    /// file and inside `i_size`; read in (with readahead) if needed.
    fn lock_uptodate_folio(&self, index: u64) -> Result<FolioGuard> {
        if index >= crate::types::MAX_FILE_SIZE >> PAGE_SHIFT {
            // Past the largest file (and `byte()` would wrap).
            return Err(Error::BeyondEof {
                offset: index.saturating_mul(crate::types::PAGE_SIZE as u64),
                size: self.size(),
            });
        }
        let idx = PgOff(index);
        let mut counted = false;
        loop {
            let size = self.size();
            if idx.byte() >= size {
                return Err(Error::BeyondEof {
                    offset: idx.byte(),
                    size,
                });
            }
            let Some(f) = self.filemap_get_folio(idx) else {
                if !counted {
                    counted = true;
                    self.stats.miss();
                }
                if let Some(next) = self.page_cache_sync_readahead(idx, 1)? {
                    // Not this pin's folio: its failure is a later read's.
                    let _ = self.page_cache_async_readahead(next);
                }
                continue;
            };
            if !counted {
                counted = true;
                self.stats.hit();
            }
            if !f.is_uptodate() {
                drop(f);
                self.filemap_update_folio(idx)?;
                continue;
            }
            let g = f.lock();
            // Re-check under the lock: truncate detaches folios under it,
            // after lowering i_size.
            if g.mapping_id() != self.id() || idx.byte() >= self.size() {
                continue;
            }
            debug_assert!(g.is_uptodate());
            g.mark_accessed();
            return Ok(g);
        }
    }

    /// `read_cache_page`: page `index` of the file, read in if needed and
    /// pinned (see [`PageRef`] and the module docs).
    ///
    /// # Locking
    /// Takes nothing on return but a pin. May sleep: on I/O, the folio
    /// lock (briefly), and `invalidate_lock` shared on a miss.
    ///
    /// # Errors
    /// [`Error::BeyondEof`] for a page at or past end of file; the store's
    /// read error; [`Error::Reentrant`] (`EDEADLK`) from inside an engine
    /// callback for this file; [`Error::GuardWaited`] (`EDEADLK`) for a
    /// miss while this thread holds another guard of the file that a
    /// truncate or punch waits for (drop the guards and retry).
    ///
    /// # Panics
    /// If this thread holds a [`PageMut`] of the same folio (it would wait
    /// for itself).
    ///
    /// # Safety
    /// While the returned guard lives, no mapping of this file (an
    /// [`MmapMut`](crate::MmapMut), [`MmapRaw::write`](crate::MmapRaw::write))
    /// may write the page's bytes. Writers through the crate's own paths
    /// wait for the pin and need no care.
    pub unsafe fn read_cache_page(&self, index: u64) -> Result<PageRef<'_>> {
        self.check_reentry("get_page")?;
        if let Some(r) = self.read_cache_page_fast(index) {
            return Ok(r);
        }
        let g = self.lock_uptodate_folio(index)?;
        g.pin_locked();
        let off = ((index - g.index().0) << PAGE_SHIFT) as usize;
        let folio = g.unlock();
        held_push(&folio, false);
        Ok(PageRef {
            folio,
            off,
            index,
            _mapping: PhantomData,
            _not_send: PhantomData,
        })
    }

    /// The hit path of `read_cache_page`: a cached, uptodate, unlocked
    /// folio pinned without its lock (see "Page pins" in `folio.rs`).
    /// `None`: take the slow path.
    fn read_cache_page_fast(&self, index: u64) -> Option<PageRef<'_>> {
        let idx = PgOff(index);
        let folio = self.filemap_get_folio(idx)?;
        if !folio.is_uptodate() {
            return None;
        }
        if !folio.try_pin_unlocked() {
            // Locked. A thread that already pins this folio (another page
            // of it) pins it again without the lock: the lock's holder may
            // be a writer waiting for that very pin to drain (B-tree
            // pages sharing a folio), and the first pin keeps it waiting.
            if !held_by_me(&folio, Some(false)) {
                return None;
            }
            folio.pin_nested();
        }
        // Re-check after pinning, as the slow path does under the lock:
        // truncate lowers i_size, then detaches the folio under its lock.
        if folio.mapping_id() != self.id() || idx.byte() >= self.size() {
            folio.unpin();
            return None;
        }
        self.stats.hit();
        folio.mark_accessed();
        let off = ((index - folio.index().0) << PAGE_SHIFT) as usize;
        held_push(&folio, false);
        Some(PageRef {
            folio,
            off,
            index,
            _mapping: PhantomData,
            _not_send: PhantomData,
        })
    }

    /// `read_cache_page` for writing: page `index`, read in if needed, its
    /// folio locked with no pin left and no writeback in flight (see
    /// [`PageMut`]). The file does not grow: write past end of file with
    /// `write_at` or `truncate` first.
    ///
    /// # Locking
    /// Holds `sb_start_write` and the folio lock until the guard drops. May
    /// sleep: I/O, `invalidate_lock` shared on a miss, the folio lock,
    /// writeback, pins, and dirty throttling on drop.
    ///
    /// # Errors
    /// As [`read_cache_page`](Self::read_cache_page);
    /// [`Error::ReadOnly`] (`EBADF`) for a file cached from a read-only
    /// descriptor.
    ///
    /// # Panics
    /// If this thread pins or locks the same folio through another guard.
    ///
    /// # Hangs
    /// The guard locks the page's whole folio (up to the readahead size,
    /// 2 MiB with large folios): a first touch through a mapping of any
    /// page of that folio waits in a fault handler until the guard drops.
    /// The guard's own thread must not touch the folio's other pages
    /// through a mapping (it would wait for itself); other threads that do
    /// wait, and each holds a fault handler thread meanwhile.
    ///
    /// # Safety
    /// While the returned guard lives, no mapping of this file may read or
    /// write the page's bytes (`MmapRaw::read`/`write`, a `Mmap`/`MmapMut`
    /// slice). The crate's own readers and writers wait or copy racily as
    /// with `write_at`, and need no care.
    pub unsafe fn read_cache_page_mut(&self, index: u64) -> Result<PageMut<'_>> {
        self.check_reentry("get_page_mut")?;
        self.check_writable()?;
        let sb = self.start_write();
        let g = self.lock_uptodate_folio(index)?;
        // Stable pages: the store may be reading these bytes.
        g.wait_writeback();
        let off = ((index - g.index().0) << PAGE_SHIFT) as usize;
        // Readers of the page that pinned it before we took the lock. Before
        // this guard's own record exists: the drain's self-check must see
        // only this thread's earlier guards, not take the new one for a pin
        // it would wait for (it panicked when another thread pinned the
        // page, `tests/page_ref.rs`).
        g.wait_pins_drained();
        held_push(&g, true);
        Ok(PageMut {
            mapping: self,
            folio: Some(g),
            off,
            index,
            written: false,
            _sb: sb,
            _not_send: PhantomData,
        })
    }
}
