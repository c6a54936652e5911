//! `struct address_space`: one cached file's folios, size and locks.
//!
//! # Lock ordering
//!
//! ```text
//! i_rwsem                           (write_at, truncate, punch_hole)
//!   invalidate_lock                 (truncate/punch exclusive;
//!                                    read_at miss, readahead, write_begin's
//!                                    partial read: shared)
//!     folio lock                    (filemap_update_folio, write_begin,
//!                                    write_cache_pages, truncate)
//!       xa_lock (index + tags)      (filemap_add_folio, filemap_remove_folio,
//!                                    folio_mark_dirty, start/end writeback)
//!       page store chunk lock       (filemap_add_folio -> PageStore::view_ptr)
//! ```
//!
//! Edges with an example caller each:
//! - `i_rwsem → invalidate_lock`: `truncate` (both exclusive); `write_at` →
//!   `generic_write_begin` takes invalidate shared for a partial-folio read.
//! - `invalidate_lock → folio lock`: `filemap_update_folio` (read_at slow
//!   path), `page_cache_sync_readahead` (folios created locked), truncate.
//! - `folio lock → xa_lock`: `folio_mark_dirty` in `generic_write_end`,
//!   `filemap_remove_folio` in truncate.
//! - `WRITEBACK` is not a lock: `folio_start_writeback` sets it and drops the
//!   folio lock; nobody holds anything across the I/O. Waiting for it
//!   (`wait_writeback`) is done with the folio lock held (truncate), which
//!   is safe because ending writeback takes only `xa_lock`.
//! - The epoch guard is not a lock: held only around lookups, never across a
//!   sleep.
//! - Folio references: nobody may sleep on `i_rwsem` or `invalidate_lock`
//!   while holding a folio reference, because truncate waits, with both
//!   held, for the references of the folios it removed to drain (so that it
//!   can punch their memory). The read path drops its reference before
//!   taking `invalidate_lock`. Page guards are the exception the API
//!   allows (an engine descends a tree holding them): see "Guard waits".
//!
//! # Guard waits
//!
//! A [`PageRef`](crate::PageRef) or [`PageMut`](crate::PageMut) is held
//! across calls, and truncate, punch and `write_at` wait for the guards of
//! what they change while holding `i_rwsem` (and truncate and punch
//! `invalidate_lock` exclusive). A guard holder that then sleeps on one of
//! those locks (a read miss takes `invalidate_lock` shared; a write,
//! truncate or punch takes `i_rwsem`) would wait for a thread that waits
//! for it. So:
//!
//! | who | does |
//! |---|---|
//! | truncate, punch, `write_at` | before taking `i_rwsem`, announce the bytes whose guards they may wait for (`waits_for_guards`: truncate from the folio holding the new or old end on, punch its range, a write its range or, growing, from the old end's folio on); withdraw after releasing |
//! | a thread holding guards of the file | takes those locks through `RwSem::read_or_bail`/`write_or_bail`: try; if the lock is taken and an announced range overlaps one of its guards (for `invalidate_lock`, only truncate's and punch's: a write holds `i_rwsem` alone), return [`Error::GuardWaited`] (`EDEADLK`), else sleep until a release and try again |
//! | a thread holding none | takes them as before (`read`/`write`) |
//!
//! An announcement precedes its announcer's locks, so a guard holder that
//! finds a lock taken by a thread that will wait for its guard always
//! sees the range; one it sleeps for announced nothing it holds, and so
//! does not wait for it. Loom: `real_guard_holders_miss_vs_truncate_backs_off`,
//! `real_guard_holders_miss_vs_an_unrelated_truncate_waits_and_succeeds`.
//! The size a truncate or write reads before `i_rwsem` may be stale: under
//! the lock it computes its range again and, if it reaches lower,
//! announces that too (which wakes guard holders asleep on either lock to
//! look again). A fill that sleeps on a folio lock with `invalidate_lock`
//! shared announces that folio for the sleep
//! (`filemap_lock_folio_invalidate_held`): the lock may be a `PageMut`'s.
//! Not covered: a `PageMut` holder's truncate or punch waits for
//! `invalidate_lock` exclusive behind a fault or read that holds it shared
//! and waits for that `PageMut`'s folio lock (the kernel's order:
//! `invalidate_lock` above folio locks); a truncate waits for `wb_lock`
//! behind an `fsync` that waits for a `PageMut`, outside its range; `mmap`
//! by a guard holder is refused outright (`PageHeld`), as before. A back
//! off may be needless (a range is withdrawn only after the release that
//! wakes its bailers): the caller retries.
//!
//! # Lockless lookup protocol (the kernel's "lockless page cache protocol")
//!
//! | lookup (`filemap_get_folio`) | removal (`filemap_remove_folio` + truncate) |
//! |---|---|
//! | pin the epoch | lock the folio (and hold invalidate exclusive) |
//! | `p = load(index)`; none → miss | under `xa_lock`: clear every slot of the folio, its tags; `mapping = 0` |
//! | `try_get(p)`; count 0 → retry | drop the cache's reference (count ≥ 1: the remover's) |
//! | `load(index) == p` again, else put and retry | unlock the folio; wait until only the remover's reference is left |
//! | unpin; the caller that needs stability locks it and re-checks `mapping == self` | punch the memfd range; put the last reference → freed through the epoch |
//!
//! A lookup that wins the `try_get` before removal holds a reference, so the
//! folio (and its memory) outlives its use; one that loses sees count 0 or a
//! changed slot and retries. The epoch keeps the `Folio` struct itself alive
//! for the window between `load` and `try_get`. A folio is never recycled,
//! so "the same pointer in the slot" means "the same folio".
//!
//! # Field protection
//!
//! | field | protected by |
//! |---|---|
//! | `i_pages` slots | writers: `xa_lock`; readers: epoch + refcount protocol |
//! | tags | `xa_lock` |
//! | `i_size` | written under `i_rwsem` (write_end, truncate); read lockless, re-read after a folio is uptodate |
//! | `nrpages` | atomic, changed under `xa_lock` |
//! | `wb_err` | atomic errseq |
//! | `ra` | immutable |

use std::io;
use std::ptr::NonNull;

use crate::aops::AddressSpaceOps;
use crate::error::Error;
use crate::errseq::ErrSeq;
use crate::filemap::RaState;
use crate::folio::{Folio, FolioGuard, FolioRef};
use crate::fs_writeback::Writeback as CacheWriteback;
use crate::mmap::VmArea;
use crate::page_store::{PageMemfd, PageStore};
use crate::rwsem::{RwSem, RwSemReadGuard, RwSemWriteGuard};
use crate::stats::{CacheStats, FileStats, Stats};
use crate::sync::{epoch, Arc, AtomicBool, AtomicU64, Mutex, Ordering, RwLock, WaitQueue};
use crate::types::{PgOff, MAX_ORDER, PAGE_SHIFT, PAGE_SIZE};
use crate::vmscan::Reclaimer;
use crate::xarray::{Tag, XArray};

crate::sync::thread_local! {
    /// The engine callbacks this thread is inside: (file id, callback).
    /// (Not a `const` initializer: loom's `thread_local!` takes none.)
    #[allow(clippy::missing_const_for_thread_local)]
    static IN_ENGINE: std::cell::RefCell<Vec<(u64, &'static str)>> = std::cell::RefCell::new(Vec::new());
}

/// The innermost engine callback this thread is inside for a file whose
/// id `is_ours` accepts (see [`AddressSpace::check_reentry`]).
pub(crate) fn engine_callback_for(is_ours: impl Fn(u64) -> bool) -> Option<&'static str> {
    IN_ENGINE
        .try_with(|s| s.borrow().iter().rev().find(|(m, _)| is_ours(*m)).map(|(_, cb)| *cb))
        .ok()
        .flatten()
}

/// Readahead tunables of one file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RaConfig {
    /// Pages read on a miss (the on-demand window).
    pub(crate) window_pages: u64,
    /// Largest window sequential readahead ramps up to (pages).
    pub(crate) max_pages: u64,
    /// Largest folio order readahead allocates.
    pub(crate) max_order: u8,
    /// Smallest folio order of this file (`mapping_min_folio_order`): 0,
    /// or [`MAX_ORDER`] with [large folios](crate::PageCacheBuilder::large_folios),
    /// where every folio is a naturally aligned 2 MiB block of the page
    /// store, so that each shmem folio lies inside one upcache folio.
    pub(crate) min_order: u8,
}

impl RaConfig {
    /// Pages of the smallest folio.
    pub(crate) fn min_pages(&self) -> u64 {
        1 << self.min_order
    }
}

/// State of a reader-writer lock, for assertions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockState {
    /// Nobody holds it.
    Unlocked,
    /// Held shared by at least one thread.
    Shared,
    /// Held exclusive.
    Exclusive,
}

/// One cached file.
pub struct AddressSpace {
    id: u64,
    /// Signalled when this address space's drop is over (see [`Eviction`]).
    pub(crate) eviction: Arc<Eviction>,
    /// Bumped under `i_mmap` by every clear of SIGBUS poison
    /// (`zap_mappings` of poisoned mappings), found or not: a fault that
    /// decided SIGBUS before a clear answers with a retry instead
    /// (`fault::sigbus_read`).
    pub(crate) poison_clears: AtomicU64,
    /// Some mapping of this file has recorded SIGBUS poison
    /// (`VmArea::mark_poison`); set once, never cleared. Folio creation
    /// then clears the poison of its range (`filemap_add_folio`).
    pub(crate) any_poison: AtomicBool,
    name: String,
    pub(crate) i_pages: XArray,
    i_size: AtomicU64,
    /// The largest size the store can hold (`sb->s_maxbytes`): the
    /// store's [`max_file_size`](crate::aops::AddressSpaceOps::max_file_size)
    /// at open, at most [`MAX_FILE_SIZE`](crate::MAX_FILE_SIZE). Writes,
    /// truncates and punches are checked against it.
    s_maxbytes: u64,
    invalidate_lock: RwSem,
    i_rwsem: RwSem,
    /// Byte ranges whose page guards a holder (or waiter) of `i_rwsem` or
    /// `invalidate_lock` may wait for: "Guard waits" in the module docs.
    /// Each: the bytes, and whether the announcer holds `invalidate_lock`
    /// exclusive too while it waits (truncate, punch) or only `i_rwsem`
    /// (`write_at`).
    guard_waits: Mutex<Vec<GuardWait>>,
    nrpages: AtomicU64,
    pub(crate) ops: Box<dyn crate::aops::OpsAny>,
    pub(crate) store: Arc<PageStore>,
    pub(crate) wb_err: ErrSeq,
    pub(crate) stats: FileStats,
    pub(crate) ra: RaConfig,
    /// The user mappings of this file (`i_mmap`), for page_mkclean and zaps.
    pub(crate) i_mmap: Mutex<Vec<Arc<VmArea>>>,
    /// How many of them are shared-writable `Missing`-mode mappings, where
    /// the kernel maps cached pages itself: each new folio is
    /// write-protected in them before it is filled (see
    /// `filemap_add_folio` and `mmap::arm_write_notify`).
    pub(crate) nr_wp_armed: crate::sync::AtomicUsize,
    /// Shared-writable mappings whose first writes the kernel resolves
    /// itself (`DirtyTracking::Async`): their writes become dirty folios
    /// only when harvested (`wp_async.rs`).
    pub(crate) nr_wp_async: crate::sync::AtomicUsize,
    /// Serializes harvests of this file's async mappings from the
    /// `PAGEMAP_SCAN` that re-protects a written page to the
    /// `folio_mark_dirty` that records it (see `wp_async.rs`).
    pub(crate) harvest_lock: Mutex<crate::wp_async::HarvestState>,
    /// `HarvestState::pending` is not empty (written under `harvest_lock`;
    /// read by `has_wp_async`).
    pub(crate) harvest_pending: AtomicBool,
    /// Write back from a copy (`Writeback::data`): set for every file of a
    /// cache with `DirtyTracking::Async`, whose mappings' writes are never
    /// held back while a store reads the folio.
    pub(crate) bounce_writeback: bool,
    /// The store can write (false for a file cached from a read-only
    /// descriptor): the writing entry points refuse with `ReadOnly`.
    pub(crate) store_writable: bool,
    /// On-demand readahead state.
    pub(crate) ra_state: Mutex<RaState>,
    /// Last byte the previous `read_at` copied (`ra->prev_pos`): a read
    /// that continues inside the same folio does not mark it accessed
    /// again. Racy on purpose (a hint, like the kernel's).
    pub(crate) read_prev: AtomicU64,
    /// The cache's reclaimer, when it has a memory limit.
    pub(crate) reclaim: Option<Arc<Reclaimer>>,
    /// The cache's flusher, freeze gate and dirty throttling.
    pub(crate) wb: Option<Arc<CacheWriteback>>,
    /// Some mapping lets the kernel map cached pages itself (`Missing`
    /// mode): fills must then make each page visible only when complete.
    atomic_fill: AtomicBool,
    /// Serializes `set_atomic_fill`: a second caller returns only once the
    /// first has waited for the fills in flight.
    atomic_fill_switch: Mutex<()>,
    /// Held shared by every writeback of the file (`writepages`, reclaim's
    /// writeback with a trylock), exclusive by truncate around the store's
    /// shrink and the new `i_size`: no folio past the new end can be
    /// written (growing the file back) in between.
    pub(crate) wb_lock: RwLock<()>,
    /// Held across the store's sync and the recording of its error
    /// (`store_sync`): all handles share the store, and a store (a kernel
    /// file) reports a failed sync to one caller only, so a second sync
    /// running while the first fails would succeed and its `fsync` return
    /// before the error is recorded.
    pub(crate) sync_lock: Mutex<()>,
    /// A write-back ended since the store's last sync began: the store
    /// may hold bytes it has not made durable. Set at the end of every
    /// write-back (`end_writeback`), cleared when a store sync starts; the
    /// last user's drop syncs the store while it is set.
    pub(crate) unsynced: AtomicBool,
    /// When the file first became dirty since its last flush (ms on the
    /// flusher's clock; 0: clean), the kernel's `dirtied_when`.
    dirtied_when: AtomicU64,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("i_size", &self.size())
            .field("nrpages", &self.nrpages())
            .finish()
    }
}

impl AddressSpace {
    // One argument per cache-wide part a file hangs off; two callers (the
    // cache and the loom models).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        name: String,
        ops: Box<dyn crate::aops::OpsAny>,
        stats: Arc<CacheStats>,
        ra: RaConfig,
        reclaim: Option<Arc<Reclaimer>>,
        wb: Option<Arc<CacheWriteback>>,
        memfd: &Arc<PageMemfd>,
    ) -> io::Result<AddressSpace> {
        assert!(id != 0, "mapping id 0 means detached");
        let size = ops.initial_size()?;
        if size > crate::types::MAX_FILE_SIZE {
            return Err(io::Error::from_raw_os_error(rustix::io::Errno::FBIG.raw_os_error()));
        }
        // A store that reports less than the file it holds still keeps
        // that file readable: the limit only stops growth past it.
        let s_maxbytes = ops.max_file_size().clamp(size, crate::types::MAX_FILE_SIZE);
        Ok(AddressSpace {
            id,
            store: Arc::new(PageStore::new(memfd)?),
            name,
            i_pages: XArray::new(),
            i_size: AtomicU64::new(size),
            s_maxbytes,
            invalidate_lock: RwSem::new(),
            i_rwsem: RwSem::new(),
            guard_waits: Mutex::new(Vec::new()),
            nrpages: AtomicU64::new(0),
            ops,
            wb_err: ErrSeq::new(),
            stats: FileStats::new(stats),
            ra,
            i_mmap: Mutex::new(Vec::new()),
            nr_wp_armed: crate::sync::AtomicUsize::new(0),
            nr_wp_async: crate::sync::AtomicUsize::new(0),
            harvest_lock: Mutex::new(Default::default()),
            harvest_pending: AtomicBool::new(false),
            bounce_writeback: false,
            store_writable: true,
            ra_state: Mutex::new(RaState::default()),
            read_prev: AtomicU64::new(u64::MAX),
            reclaim,
            wb,
            dirtied_when: AtomicU64::new(0),
            wb_lock: RwLock::new(()),
            sync_lock: Mutex::new(()),
            unsynced: AtomicBool::new(false),
            atomic_fill: AtomicBool::new(false),
            atomic_fill_switch: Mutex::new(()),
            eviction: Arc::new(Eviction::default()),
            poison_clears: AtomicU64::new(0),
            any_poison: AtomicBool::new(false),
        })
    }

    /// Unique id of this address space in its cache.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Name used in messages (the path, usually).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `i_size_read`: the file size.
    #[inline]
    pub fn size(&self) -> u64 {
        // Acquire: pairs with the Release in `set_size_locked`.
        self.i_size.load(Ordering::Acquire)
    }

    /// The largest size this file can have (`sb->s_maxbytes`): the
    /// store's [`max_file_size`](crate::aops::AddressSpaceOps::max_file_size)
    /// when the file was opened, at most
    /// [`MAX_FILE_SIZE`](crate::MAX_FILE_SIZE). A write starting at or past
    /// it, a truncate or a punch past it fail with `EFBIG`; a write that
    /// crosses it is cut short there.
    pub fn max_file_size(&self) -> u64 {
        self.s_maxbytes
    }

    /// `i_size_write`. `i_rwsem` held exclusive.
    pub(crate) fn set_size_locked(&self, size: u64) {
        self.i_size.store(size, Ordering::Release);
    }

    /// Pages cached.
    pub fn nrpages(&self) -> u64 {
        self.nrpages.load(Ordering::Relaxed)
    }

    pub(crate) fn nrpages_sub(&self, n: u64) {
        self.nrpages.fetch_sub(n, Ordering::Relaxed);
    }

    /// This file's counters (hits, misses, faults, I/O, dirty and
    /// writeback bytes, evictions, throttling); the cache's
    /// [`PageCache::stats`](crate::PageCache::stats) sums every file.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    /// Pages of this file that the page store holds but no folio accounts
    /// for: present while their index holds no folio, or while it holds a
    /// folio that is neither uptodate nor locked (a fill in flight holds
    /// the lock). A `Missing`-mode mapping would map such a page, without
    /// asking upcache, with whatever bytes it holds. Folios being evicted
    /// (frozen: their punch is under way) count as accounting for their
    /// pages. Empty on a hugetlb store (its folios hold their huge page
    /// from creation). A test aid (`tests/fault_injection.rs` checks it
    /// after every operation): it walks the whole file.
    #[doc(hidden)]
    pub fn stray_store_pages(&self) -> Vec<u64> {
        if self.store.is_hugetlb() {
            return Vec::new();
        }
        // Is page `i` present and not accounted for? Read in that order
        // (presence, then the index): a page seen present and then found
        // with no folio may still be one whose eviction (punch first,
        // then unindex) ran between the two reads, so a page counts only
        // if it is seen stray twice more, each time with a fresh look at
        // the page store.
        let stray = |i: u64| {
            if !self.store.page_present(i << PAGE_SHIFT) {
                return false;
            }
            let guard = epoch::pin();
            match self.try_get_folio_pinned(PgOff(i), &guard) {
                Lookup::Found(f) => !f.is_uptodate() && !f.is_locked(),
                Lookup::Absent => true,
                Lookup::Busy => false,
            }
        };
        let mut out = Vec::new();
        for r in self.store.data_extents() {
            for i in r.start >> PAGE_SHIFT..r.end.div_ceil(PAGE_SIZE as u64) {
                if stray(i) && stray(i) && stray(i) {
                    out.push(i);
                }
            }
        }
        out
    }

    /// The converse of [`stray_store_pages`](Self::stray_store_pages):
    /// pages below end of file of an uptodate, unlocked folio that the
    /// page store does not hold. A fault on such a page finds the folio
    /// ready but nothing to map, and is served again and again. Each page
    /// counts only if seen so three times in a row (a folio being evicted
    /// or truncated loses its pages before it leaves the index). Empty on
    /// a hugetlb store. A test aid, like `stray_store_pages`.
    #[doc(hidden)]
    pub fn holes_in_uptodate_folios(&self) -> Vec<u64> {
        if self.store.is_hugetlb() {
            return Vec::new();
        }
        let hole = |i: u64| {
            let guard = epoch::pin();
            let ready = match self.try_get_folio_pinned(PgOff(i), &guard) {
                Lookup::Found(f) => f.is_uptodate() && !f.is_locked(),
                Lookup::Absent | Lookup::Busy => false,
            };
            ready && (i << PAGE_SHIFT) < self.size() && !self.store.page_present(i << PAGE_SHIFT)
        };
        let mut out = Vec::new();
        let mut i = 0;
        while let Some((j, _)) = self.i_pages.find_from(i, u64::MAX) {
            if hole(j) && hole(j) && hole(j) {
                out.push(j);
            }
            i = j + 1;
        }
        out
    }

    /// A page of an uptodate folio that the page store does not hold: its
    /// fill marked the folio uptodate without writing that page (an
    /// engine's `read_folio` that fills part of
    /// [`FolioGuard::data_mut`](crate::aops::FolioGuard::data_mut), a
    /// store whose read claims bytes it never wrote). Such a page reads as
    /// zeros through the engine view (`read_at`), but the kernel cannot
    /// map it: it raises a missing fault again, and `UFFDIO_CONTINUE`
    /// fails with `EFAULT`. So the fault path gives it memory, zeros, and
    /// mapped readers see what `read_at` sees instead of faulting forever
    /// (`tests/faults.rs`, `..._maps_zeros_not_a_hang`).
    ///
    /// # Locking
    /// The caller holds the lock of the uptodate folio covering `index`
    /// (nothing punches its pages meanwhile; the fill never overwrites).
    pub(crate) fn fill_hole_in_uptodate_folio(&self, index: PgOff) -> bool {
        let pos = index.byte();
        if self.store.page_present(pos) {
            return false;
        }
        if let Err(e) = self.store.fill_hole(pos) {
            eprintln!("upcache: could not give page {} of a file memory: {e}", index.0);
            return false;
        }
        self.stats.unfilled_page();
        true
    }

    /// Bytes of memory the folio store holds (memfd blocks).
    pub fn memory_bytes(&self) -> u64 {
        if self.store.is_hugetlb() {
            // hugetlbfs answers SEEK_DATA with "all data"; every folio of
            // it holds its huge page from creation (`filemap_add_folio`).
            return self.nrpages() << crate::types::PAGE_SHIFT;
        }
        self.store.allocated_bytes()
    }

    /// Pages a user mapping of this file maps, write-protects and poisons
    /// as one: 1, or 512 on a hugetlb page store (one 2 MiB page-table
    /// entry; [`PageCacheBuilder::hugetlb`](crate::PageCacheBuilder::hugetlb)).
    pub(crate) fn map_granule_pages(&self) -> u64 {
        if self.store.is_hugetlb() {
            1 << crate::types::MAX_ORDER
        } else {
            1
        }
    }

    /// Number of folios tagged dirty.
    pub fn nr_dirty_folios(&self) -> usize {
        self.i_pages.lock().count(Tag::Dirty)
    }

    /// Run an engine callback (an `AddressSpaceOps` method, and through
    /// it the store) for this file, recording on this thread that it is
    /// inside one: a call from it back into the cache for the same file
    /// ([`check_reentry`](Self::check_reentry)) fails with `EDEADLK`
    /// instead of waiting for itself. Popped on unwind too. In a thread
    /// whose thread-locals are being destroyed (a `File` dropped by a
    /// thread-local's destructor) the record is gone, and the callback
    /// runs unrecorded: `with` would panic there, which aborts the process
    /// and loses the file's dirty pages.
    pub(crate) fn in_engine<R>(&self, callback: &'static str, f: impl FnOnce() -> R) -> R {
        let pushed = IN_ENGINE
            .try_with(|s| s.borrow_mut().push((self.id(), callback)))
            .is_ok();
        struct Pop(bool);
        impl Drop for Pop {
            fn drop(&mut self) {
                if self.0 {
                    let _ = IN_ENGINE.try_with(|s| s.borrow_mut().pop());
                }
            }
        }
        let _pop = Pop(pushed);
        f()
    }

    /// `Err(ReadOnly)` if the store cannot write: a change would stay
    /// dirty for good, every write-back of it failing.
    pub(crate) fn check_writable(&self) -> Result<(), crate::Error> {
        if self.store_writable {
            Ok(())
        } else {
            Err(crate::Error::ReadOnly)
        }
    }

    /// `Err(Reentrant)` if this thread is inside an engine callback for
    /// this file: `op` (a blocking `File` or `AddressSpace` operation; each
    /// public one that can wait checks on entry) would wait for the
    /// folio, lock or write-back the callback is part of. The folio-level
    /// primitives (`filemap_lock_folio`, `folio_start_writeback`, ...) are
    /// not checked: callbacks use them, under the kernel's rules. The rule for
    /// engines: callbacks do I/O on the store, never call the cache for
    /// their own file (other files are fine).
    pub(crate) fn check_reentry(&self, op: &'static str) -> Result<(), crate::Error> {
        let id = self.id();
        match engine_callback_for(|m| m == id) {
            Some(callback) => Err(crate::Error::Reentrant { op, callback }),
            None => Ok(()),
        }
    }

    /// The engine's operations.
    pub fn ops(&self) -> &dyn AddressSpaceOps {
        self.ops.as_ops()
    }

    /// The operations as the engine's own type `T`, if they are one: the
    /// way back from a [`File`](crate::File) to the engine's store, e.g.
    /// `ops_as::<StoreOps<MyStore>>().map(StoreOps::store)`. `T` is the type
    /// given to `open_with_ops` (an `Arc<X>` stays an `Arc<X>`); files
    /// opened by path use `StoreOps<FileStore>`.
    pub fn ops_as<T: AddressSpaceOps>(&self) -> Option<&T> {
        self.ops.as_any().downcast_ref::<T>()
    }

    // ----- locks ----------------------------------------------------------

    /// Take `invalidate_lock` shared (`filemap_invalidate_lock_shared`).
    pub fn invalidate_lock_shared(&self) -> RwSemReadGuard<'_> {
        self.invalidate_lock.read()
    }

    /// Take `invalidate_lock` exclusive (`filemap_invalidate_lock`).
    pub fn invalidate_lock_exclusive(&self) -> RwSemWriteGuard<'_> {
        self.invalidate_lock.write()
    }

    /// Announce, until the returned value drops, that this thread may wait
    /// for the page guards of bytes `[start, end)` while it holds (or
    /// waits for) `i_rwsem` or `invalidate_lock`: a guard holder of that
    /// range then gets [`Error::GuardWaited`] from its calls that would
    /// sleep on those locks (see "Guard waits"). Taken before the locks.
    pub(crate) fn waits_for_guards(&self, start: u64, end: u64, invalidate: bool) -> GuardWaits<'_> {
        let wait = GuardWait { start, end, invalidate };
        self.guard_waits.lock().push(wait);
        // Guard holders asleep on either lock look again: an announcement
        // made while holding the locks (a truncate or write whose range
        // grew once it saw the size under `i_rwsem`, a write's read of a
        // folio under `invalidate_lock`) covers guards they slept with.
        self.i_rwsem.kick();
        self.invalidate_lock.kick();
        GuardWaits { mapping: self, wait }
    }

    /// `GuardWaited` if another thread announced that it may wait for a
    /// page guard this thread holds (`waits_for_guards`) while holding the
    /// lock this thread wants: `i_rwsem` (every announcer) or, with
    /// `invalidate`, `invalidate_lock` (truncate and punch; a write's wait
    /// does not block a read miss).
    fn guard_waited(&self, invalidate: bool) -> Option<Error> {
        let waits = self.guard_waits.lock();
        waits.iter().filter(|w| w.invalidate || !invalidate).find_map(|w| {
            crate::page_ref::held_in_range(self.id, w.start, w.end).map(|(offset, end)| Error::GuardWaited {
                offset,
                len: end - offset,
            })
        })
    }

    /// `inode_lock` for a call that a page guard holder may make: such a
    /// thread backs off instead of sleeping for a holder that waits for
    /// its guard.
    ///
    /// # Errors
    /// [`Error::GuardWaited`] (`EDEADLK`).
    pub(crate) fn inode_lock_or_bail(&self) -> Result<RwSemWriteGuard<'_>, Error> {
        if crate::page_ref::holds_any(self.id) {
            self.i_rwsem.write_or_bail(|| self.guard_waited(false))
        } else {
            Ok(self.i_rwsem.write())
        }
    }

    /// `invalidate_lock_shared` for a read miss that a page guard holder
    /// may make (as [`inode_lock_or_bail`](Self::inode_lock_or_bail)).
    ///
    /// # Errors
    /// [`Error::GuardWaited`] (`EDEADLK`).
    pub(crate) fn invalidate_lock_shared_or_bail(&self) -> Result<RwSemReadGuard<'_>, Error> {
        if crate::page_ref::holds_any(self.id) {
            self.invalidate_lock.read_or_bail(|| self.guard_waited(true))
        } else {
            Ok(self.invalidate_lock.read())
        }
    }

    /// Take `i_rwsem` shared (`inode_lock_shared`).
    pub(crate) fn inode_lock_shared(&self) -> RwSemReadGuard<'_> {
        self.i_rwsem.read()
    }

    /// Take `i_rwsem` exclusive (`inode_lock`).
    pub fn inode_lock(&self) -> RwSemWriteGuard<'_> {
        self.i_rwsem.write()
    }

    /// Who holds `invalidate_lock` (for assertions in tests and stores).
    pub fn invalidate_lock_state(&self) -> LockState {
        self.invalidate_lock.state()
    }

    /// Who holds `i_rwsem` (for assertions in tests and stores).
    pub fn inode_lock_state(&self) -> LockState {
        self.i_rwsem.state()
    }

    // ----- lookup -----------------------------------------------------------

    /// `filemap_get_folio` without flags: the folio covering `index`, with a
    /// reference, or `None`. Lockless (see the protocol in the module docs).
    ///
    /// # Locking
    /// Nothing needed; does not sleep.
    pub fn filemap_get_folio(&self, index: PgOff) -> Option<FolioRef> {
        let guard = epoch::pin();
        self.get_folio_pinned(index, &guard)
    }

    /// The lookup, under a guard the caller already holds (map_pages pins
    /// once for a whole fault-around window).
    pub(crate) fn get_folio_pinned(&self, index: PgOff, guard: &epoch::Guard) -> Option<FolioRef> {
        folio_lookup(&self.i_pages, index.0, guard)
    }

    /// The lookup for callers that must never wait (map_pages, reclaim):
    /// a frozen folio (being evicted) is reported as [`Lookup::Busy`]
    /// instead of spun on.
    pub(crate) fn try_get_folio_pinned(&self, index: PgOff, guard: &epoch::Guard) -> Lookup {
        folio_try_lookup(&self.i_pages, index.0, guard)
    }

    /// Look up and lock the folio covering `index`, re-checking that it
    /// still belongs to this file (`filemap_lock_folio`).
    ///
    /// # Locking
    /// May sleep on the folio lock.
    pub fn filemap_lock_folio(&self, index: PgOff) -> Option<FolioGuard> {
        loop {
            let f = self.filemap_get_folio(index)?;
            let g = f.lock();
            if g.mapping_id() == self.id {
                debug_assert!(g.contains(index));
                return Some(g);
            }
            // Truncated while we slept: look again.
        }
    }

    /// [`filemap_lock_folio`](Self::filemap_lock_folio) for a caller that
    /// holds `invalidate_lock` shared: a sleep on a folio lock may be a
    /// sleep on a [`PageMut`](crate::PageMut), whose holder's read miss
    /// may queue behind a truncate (or the switch to page-atomic fills)
    /// that waits for this caller's hold. The folio is announced while
    /// the caller sleeps ("Guard waits"), so that holder backs off.
    pub(crate) fn filemap_lock_folio_invalidate_held(&self, index: PgOff) -> Option<FolioGuard> {
        loop {
            let g = match self.filemap_get_folio(index)?.trylock() {
                Ok(g) => g,
                Err(f) => {
                    let _gw = self.waits_for_guards(f.pos(), f.pos() + f.size() as u64, true);
                    f.lock()
                }
            };
            if g.mapping_id() == self.id {
                debug_assert!(g.contains(index));
                return Some(g);
            }
            // Truncated while we slept: look again.
        }
    }

    /// `filemap_add_folio`: allocate a folio of `order` at `index`, insert it
    /// locked. `Ok(None)` if any page of it is already cached.
    ///
    /// # Locking
    /// Callers creating folios to fill from the store hold `invalidate_lock`
    /// shared (or `i_rwsem` for write_begin). Does not sleep except on the
    /// index lock and, with the new folio locked, on `harvest_lock` and
    /// `i_mmap` (folio lock → `harvest_lock` → `i_mmap`) when some mapping
    /// recorded poison (the clear of stale poison) or, with large folios, the
    /// folio reaches past end of file.
    ///
    /// # Errors
    /// Mapping the page store's view failed.
    pub(crate) fn filemap_add_folio(&self, index: PgOff, order: u8) -> io::Result<Option<FolioGuard>> {
        debug_assert!(order <= MAX_ORDER);
        debug_assert!(order >= self.ra.min_order);
        let n = 1u64 << order;
        debug_assert_eq!(index.0 % n, 0);
        if let Some(r) = &self.reclaim {
            r.charge(n);
        }
        let data = self.store.view_ptr(index.byte())?;
        if !self.i_pages.range_empty(&self.i_pages.lock(), index.0, n) {
            return Ok(None);
        }
        let guard = Folio::alloc_locked(self.id, index, order, data, Some(self.store.clone()));
        if !index_add_folio(&self.i_pages, &guard) {
            // Lost a race: nobody else saw it; drop the index's reference.
            guard.detach();
            index_put_ref(&guard);
            return Ok(None);
        }
        // A hugetlb store's memory is taken now, not at the first touch
        // (which raises SIGBUS when the pool is empty). Only once the
        // folio is indexed: a folio of the same range being evicted
        // punches before it leaves the index (vmscan.rs), so no punch
        // can free this allocation.
        if let Err(e) = self.store.allocate(index.byte(), n << crate::types::PAGE_SHIFT) {
            index_delete_folio(&self.i_pages, &guard);
            index_put_ref(&guard);
            return Err(e);
        }
        self.nrpages.fetch_add(n, Ordering::Relaxed);
        self.stats.folio_added(n);
        if let Some(r) = &self.reclaim {
            r.note_new(self.id, index, &*guard as *const Folio as usize);
        }
        // A mapped access that got SIGBUS because no folio could be made
        // here (an empty hugetlb pool, a failed view mapping) kept its
        // poison: nothing else clears it, where the kernel tries again at
        // every fault. Now that the folio exists the next access faults
        // to us again (below end of file; the folio is locked, so that
        // access waits for its fill). The read-error clear does exactly
        // this, counted in `poison_clears`: a fault that failed to create
        // the folio and decides SIGBUS while it fills retries.
        if self.any_poison.load(Ordering::Relaxed) {
            self.clear_read_error_poison(index, n);
        }
        // Read after `index_add_folio` took xa_lock: either a new mapping's
        // count is seen here, or that mapping's walk of the index (after it
        // took xa_lock) sees this folio (`mmap::arm_write_notify`).
        //
        // With large folios (`min_order > 0`) a folio may reach past the end
        // of the file: its pages there are present in the page store once
        // filled, and a `Missing`-mode mapping would map them without
        // asking us. They are poisoned instead of armed, before the fill.
        let split = if self.ra.min_order > 0 {
            let eof = self.size().div_ceil(crate::types::PAGE_SIZE as u64);
            eof.clamp(index.0, index.0 + n)
        } else {
            index.0 + n
        };
        if split > index.0 && self.nr_wp_armed.load(Ordering::Relaxed) != 0 {
            self.arm_write_notify(index, PgOff(split));
        }
        if split < index.0 + n {
            self.poison_past_eof(PgOff(split), index.add(n), None);
        }
        Ok(Some(guard))
    }

    /// The folio at `index`, locked, created (of the file's smallest order,
    /// not uptodate) if absent (`__filemap_get_folio(FGP_LOCK | FGP_CREAT)`).
    ///
    /// # Errors
    /// `EFBIG` for an index past the largest file
    /// ([`MAX_FILE_SIZE`](crate::MAX_FILE_SIZE)); mapping the page store's
    /// view failed.
    pub fn filemap_grab_folio(&self, index: PgOff) -> io::Result<FolioGuard> {
        if index.0 >= crate::types::MAX_FILE_SIZE >> crate::types::PAGE_SHIFT {
            // Past the largest file: no folio can exist there (its memory
            // would be another file's).
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        loop {
            if let Some(g) = self.filemap_lock_folio(index) {
                return Ok(g);
            }
            let first = PgOff(index.0 & !(self.ra.min_pages() - 1));
            if let Some(g) = self.filemap_add_folio(first, self.ra.min_order)? {
                return Ok(g);
            }
        }
    }

    /// `filemap_remove_folio`: take the folio out of the index. Folio locked,
    /// not under writeback. The cache's reference is dropped; the caller's
    /// guard keeps one.
    pub(crate) fn filemap_remove_folio(&self, folio: &FolioGuard) {
        debug_assert_eq!(folio.mapping_id(), self.id);
        debug_assert!(!folio.is_writeback());
        let n = folio.nr_pages();
        index_delete_folio(&self.i_pages, folio);
        self.nrpages.fetch_sub(n, Ordering::Relaxed);
        if folio.folio().is_dirty() {
            // Only truncate drops dirty folios; cancel the accounting.
            folio.test_clear_dirty();
            self.stats.dirty_sub(n);
        }
        self.stats.folio_removed(n);
        // An engine's panic here would leave the folio out of the index
        // with the index's reference never put: finish the removal.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.in_engine("free_folio", || self.ops.free_folio(self, folio))
        }))
        .is_err()
        {
            eprintln!(
                "upcache: {}: the engine's free_folio panicked; the folio is removed anyway",
                self.name
            );
        }
        if folio.has_error() {
            // Mapped accesses to it got SIGBUS (poison): with the folio
            // gone, the next access faults again and reads afresh.
            self.clear_read_error_poison(folio.index(), n);
        }
        index_put_ref(folio);
    }

    /// Clear the SIGBUS a mapped access to a folio whose read failed got
    /// (`UFFDIO_POISON` stays in the mapping): once the folio is read
    /// again, or gone, the page is served again, as the kernel retries a
    /// failed read at the next fault. Only below end of file (pages past it
    /// keep raising SIGBUS).
    pub(crate) fn clear_read_error_poison(&self, index: PgOff, nr: u64) {
        let eof = PgOff(self.size().div_ceil(crate::types::PAGE_SIZE as u64));
        let end = index.add(nr);
        let end = if end < eof { end } else { eof };
        if index < end {
            self.zap_poison(index, end);
        }
    }

    // ----- dirty / writeback --------------------------------------------------

    /// `folio_mark_dirty`: set DIRTY, tag it, account it, tell the engine.
    ///
    /// # Locking
    /// Folio locked (the guard proves it). Does not sleep.
    ///
    /// # Panics
    /// If the folio is not this file's (another file's, or one truncated
    /// away): its tags and counts would land in this file's.
    pub fn folio_mark_dirty(&self, folio: &FolioGuard) {
        self.assert_own_folio(folio, "folio_mark_dirty");
        self.mark_dirty_raw(folio);
    }

    /// The engine-facing folio methods change this file's index tags, its
    /// counts and (at write-back) the bytes past its end for the folio
    /// they are given: one of another file (or a folio truncated away)
    /// would corrupt both files (it zeroed another file's cached bytes and
    /// wrapped this file's dirty count).
    fn assert_own_folio(&self, folio: &Folio, what: &str) {
        assert!(
            folio.mapping_id() == self.id,
            "upcache: {what} on {}: the folio at page index {} is not this file's (another file's, or truncated away)",
            self.name,
            folio.index().0
        );
    }

    /// Dirty a folio the caller holds locked or under writeback.
    pub(crate) fn mark_dirty_raw(&self, folio: &Folio) {
        debug_assert!(folio.is_locked() || folio.is_writeback());
        if folio.test_set_dirty() {
            let idx = folio.index().0;
            self.i_pages.lock().set_tag(idx, Tag::Dirty);
            self.stats.dirty_add(folio.nr_pages());
            if let Some(wb) = &self.wb {
                if self.dirtied_when.load(Ordering::Relaxed) == 0 {
                    let _ = self
                        .dirtied_when
                        .compare_exchange(0, wb.now_ms(), Ordering::Relaxed, Ordering::Relaxed);
                }
            }
            self.in_engine("dirty_folio", || self.ops.dirty_folio(self, folio));
        }
    }

    /// Must folio fills be page-atomic? True once a `Missing`-mode mapping
    /// of the file was created: the kernel maps pages present in the memfd
    /// without asking upcache, so a page must not become present before its
    /// data is complete. Engines that fill folios themselves should then
    /// use [`fill_folio`](Self::fill_folio).
    pub fn needs_atomic_fill(&self) -> bool {
        self.atomic_fill.load(Ordering::Acquire)
    }

    /// Switch fills to page-atomic mode, then wait for fills in flight.
    /// The crate's own fills hold `invalidate_lock` shared, but an
    /// engine's need not (`filemap_grab_folio`, then `fill_folio` or
    /// `StoreOps::read_folio`); every fill, though, runs on a folio that is
    /// indexed, locked and not uptodate. So after the switch, lock (and
    /// unlock) each folio that is not uptodate: its fill, if one had
    /// decided on the non-atomic path, is over. A folio indexed after the
    /// walk passed its index is filled by a thread that reads the switch
    /// after the insertion: the SeqCst fences here and in
    /// `index_add_folio` make that read see it (a store-buffering pair:
    /// either the walk sees the folio, or its filler sees the switch).
    pub(crate) fn set_atomic_fill(&self) {
        let _one = self.atomic_fill_switch.lock();
        if self.atomic_fill.load(Ordering::Acquire) {
            return;
        }
        self.atomic_fill.store(true, Ordering::Release);
        // SeqCst: pairs with the fence in `index_add_folio`.
        crate::sync::fence(Ordering::SeqCst);
        drop(self.invalidate_lock_exclusive());
        let mut index = 0;
        while let Some((i, _)) = self.i_pages.find_from(index, u64::MAX) {
            index = i + 1;
            if let Some(f) = self.filemap_get_folio(PgOff(i)) {
                index = f.index().0 + f.nr_pages();
                if !f.is_uptodate() {
                    drop(f.lock());
                }
            }
        }
    }

    /// Fill a locked, not-uptodate folio with `data` (zero-padded to the
    /// folio size) the safe way for this file: through the engine view, or
    /// with `pwrite(2)` to the memfd when
    /// [`needs_atomic_fill`](Self::needs_atomic_fill). Does not mark it
    /// uptodate.
    ///
    /// # Errors
    /// `InvalidInput` if the folio is uptodate or not this file's; the
    /// memfd write's error.
    pub fn fill_folio(&self, folio: &mut FolioGuard, data: &[u8]) -> io::Result<()> {
        if folio.mapping_id() != self.id() {
            // The page-atomic branch writes this file's memory at the
            // folio's offset: another file's folio would have this file's
            // cached bytes overwritten (under its page guards, its
            // writeback, its mappings).
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fill_folio of a folio of another file (or one truncated away)",
            ));
        }
        if folio.is_uptodate() {
            // Its bytes are shared (page guards, writeback, mappings): only
            // the write paths may change them.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fill_folio of an uptodate folio",
            ));
        }
        let n = data.len().min(folio.size());
        if self.needs_atomic_fill() {
            // A source inside an upcache mapping is copied out first: the
            // kernel would fault it in while holding the memfd's inode
            // lock, which the handler serving that fault needs for its own
            // fill (every fill and punch of the cache hung).
            if n == folio.size() && !crate::mmap::overlaps_user_mapping(data.as_ptr(), n) {
                self.store.pwrite(folio.pos(), &data[..n])
            } else {
                let mut full = vec![0u8; folio.size()];
                full[..n].copy_from_slice(&data[..n]);
                self.store.pwrite(folio.pos(), &full)
            }
        } else {
            let d = folio.data_mut();
            d[..n].copy_from_slice(&data[..n]);
            d[n..].fill(0);
            Ok(())
        }
    }

    /// `inode->dirtied_when` (0: clean).
    pub(crate) fn dirtied_when(&self) -> u64 {
        self.dirtied_when.load(Ordering::Relaxed)
    }

    /// After a flusher pass that started from `seen`: clean → 0, still
    /// dirty → `now` (unless a dirtying raced and changed it).
    ///
    /// A folio dirtied between the count and the exchange saw `seen` and
    /// left the stamp alone (`mark_dirty_raw` stamps only a zero): the
    /// file would stay dirty with no stamp, skipped by expiry. So a clear
    /// is followed by a second count: the dirtying's tag is set under the
    /// index lock, which this count takes too, so either the count sees
    /// the tag (and the stamp is restored here) or the dirtying takes the
    /// lock after it and then reads the cleared stamp and sets its own.
    pub(crate) fn reset_dirtied_when(&self, seen: u64, now: u64) {
        let new = if self.nr_dirty_folios() == 0 { 0 } else { now };
        let swapped = self
            .dirtied_when
            .compare_exchange(seen, new, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if swapped && new == 0 && self.nr_dirty_folios() != 0 {
            let _ = self
                .dirtied_when
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// `sb_start_write`: enter a dirtying operation (sleeps while frozen).
    pub(crate) fn start_write(&self) -> Option<crate::fs_writeback::GateGuard<'_>> {
        self.wb.as_ref().map(|w| w.gate.start_write())
    }

    /// `folio_clear_dirty_for_io`: clear DIRTY before writing the folio and
    /// write-protect it in user mappings (`page_mkclean`). Returns whether
    /// it was dirty. The DIRTY tag stays until
    /// `folio_start_writeback`, so the folio cannot be missed by an
    /// integrity sync in between. The folio holding end of file gets the
    /// bytes past it zeroed (`zero_past_eof`).
    ///
    /// # Locking
    /// Folio locked.
    ///
    /// # Panics
    /// If the folio is not this file's (as
    /// [`folio_mark_dirty`](Self::folio_mark_dirty)).
    pub fn folio_clear_dirty_for_io(&self, folio: &FolioGuard) -> bool {
        self.assert_own_folio(folio, "folio_clear_dirty_for_io");
        if folio.test_clear_dirty() {
            self.stats.dirty_sub(folio.nr_pages());
            // Write-protect it in every shared-writable mapping first, so a
            // write during writeback faults and re-dirties it. Where that
            // failed, a later write would reach the folio unseen: it is
            // written now and stays dirty, to be written again.
            if !self.page_mkclean(folio) {
                self.mark_dirty_raw(folio);
            }
            self.zero_past_eof(folio);
            true
        } else {
            false
        }
    }

    /// What `block_write_full_folio` does at every write-back of the folio
    /// holding end of file: zero the bytes a mapping may have written past
    /// it (the rest of its page, or of its 2 MiB page on a hugetlb store,
    /// which is mapped whole), so that mappings and `get_page` read zeros
    /// there again. Those bytes never reach the store (a write-back stops
    /// at the size) and are zeroed anyway when the file grows over them
    /// (`pagecache_isize_extended`); this keeps the cache like the
    /// kernel's in between. The size cannot move past bytes of this folio
    /// meanwhile: growth updates it under the folio lock we hold
    /// (`generic_write_end`, `pagecache_isize_extended`). Skipped while a
    /// [`PageRef`](crate::PageRef) pins the folio (its `&[u8]` must not
    /// change, and waiting could wait for the caller's own pin) or the
    /// store may still be reading it (stable pages).
    fn zero_past_eof(&self, folio: &FolioGuard) {
        let size = self.size();
        let (pos, end) = (folio.pos(), folio.pos() + folio.size() as u64);
        let granule = PAGE_SIZE as u64 * self.map_granule_pages();
        if size <= pos || size >= end || size % granule == 0 || !folio.is_uptodate() || folio.is_writeback() {
            return;
        }
        let tail_end = (size / granule * granule + granule).min(end);
        let _ = folio.try_zero_raw((size - pos) as usize, (tail_end - size) as usize);
    }

    /// `folio_redirty_for_writepage`: the store cannot write the folio now;
    /// keep it dirty and unlock it.
    ///
    /// # Locking
    /// Folio locked on entry, unlocked on return.
    ///
    /// # Panics
    /// If the folio is not this file's (as
    /// [`folio_mark_dirty`](Self::folio_mark_dirty)).
    pub fn redirty_for_writepage(&self, wbc: &mut crate::aops::WritebackControl, folio: FolioGuard) {
        self.assert_own_folio(&folio, "redirty_for_writepage");
        let _ = wbc;
        self.mark_dirty_raw(&folio);
        drop(folio);
    }

    /// `folio_start_writeback`: set WRITEBACK, move tags (clear TOWRITE,
    /// clear DIRTY unless redirtied, set WRITEBACK) and unlock the folio.
    ///
    /// # Locking
    /// Folio locked on entry; unlocked on return, under writeback until the
    /// returned handle ends it.
    ///
    /// # Panics
    /// If the folio is not uptodate (only valid data is written back; and
    /// [`Writeback::data`] shares bytes that [`FolioGuard::data_mut`] may
    /// hand out only while the folio is not uptodate), or is already under
    /// writeback, or is not this file's (as
    /// [`folio_mark_dirty`](Self::folio_mark_dirty)).
    pub fn folio_start_writeback(&self, folio: FolioGuard) -> Writeback<'_> {
        self.assert_own_folio(&folio, "folio_start_writeback");
        assert!(
            folio.is_uptodate(),
            "folio_start_writeback of a folio that is not uptodate (index {})",
            folio.index().0
        );
        folio.set_writeback_bit();
        let idx = folio.index().0;
        {
            let mut xa = self.i_pages.lock();
            xa.clear_tag(idx, Tag::ToWrite);
            if !folio.is_dirty() {
                xa.clear_tag(idx, Tag::Dirty);
            }
            xa.set_tag(idx, Tag::Writeback);
        }
        self.stats.writeback_add(folio.nr_pages());
        let bounce = self.bounce_writeback.then(|| {
            let mut b = crate::backing::AlignedBuf::new(folio.size(), crate::types::PAGE_SIZE);
            // SAFETY: the folio's engine-view range is valid for `size()`
            // bytes (locked, so referenced); `b` is a distinct allocation
            // of that size. A mapped writer may be storing to the source:
            // a raw copy forms no reference to it.
            unsafe { std::ptr::copy_nonoverlapping(folio.as_ptr(), b.as_mut_slice().as_mut_ptr(), folio.size()) };
            b
        });
        Writeback {
            mapping: self,
            folio: Some(folio.unlock()),
            bounce,
        }
    }

    /// Record a writeback error for the next fsync of every open handle
    /// (`mapping_set_error`).
    pub fn set_error(&self, errno: i32) {
        self.wb_err.set(errno);
        // And for the cache's `sync_all` (`mapping_set_error` sets the
        // superblock's error word too).
        if let Some(wb) = &self.wb {
            wb.sb_err.set(errno);
        }
    }

    fn end_writeback(&self, folio: FolioRef) {
        // Before WRITEBACK clears: a sync that waited for this write-back
        // finds the flag set or clears it itself.
        // Release: pairs with the AcqRel swap in `store_sync`.
        self.unsynced.store(true, Ordering::Release);
        let n = folio.nr_pages();
        self.i_pages.lock().clear_tag(folio.index().0, Tag::Writeback);
        self.stats.writeback_sub(n);
        folio.clear_writeback_bit();
    }
}

/// The lockless lookup (see the protocol table in the module docs).
///
/// A folio frozen by an eviction is waited for by spinning, then by
/// yielding the CPU: reclaim keeps a batch of folios frozen while it calls
/// the engine's `release_folio` for the next one, which may block, and the
/// evicting thread may be the one this CPU should run.
pub(crate) fn folio_lookup(xa: &XArray, index: u64, guard: &epoch::Guard) -> Option<FolioRef> {
    let mut spins = 0u32;
    loop {
        match folio_try_lookup(xa, index, guard) {
            Lookup::Found(r) => return Some(r),
            Lookup::Absent => return None,
            Lookup::Busy if spins < 128 => {
                spins += 1;
                crate::sync::spin_loop();
            }
            Lookup::Busy => crate::sync::yield_now(),
        }
    }
}

/// Outcome of one lockless lookup attempt.
pub(crate) enum Lookup {
    /// A reference to the folio covering the index.
    Found(FolioRef),
    /// Nothing cached there.
    Absent,
    /// A folio is there but frozen (being evicted or freed): callers that
    /// must not wait (map_pages, reclaim) skip it; others look again.
    Busy,
}

/// One attempt of the lockless lookup that never spins on a frozen folio.
pub(crate) fn folio_try_lookup(xa: &XArray, index: u64, _guard: &epoch::Guard) -> Lookup {
    loop {
        let p = xa.load(index);
        if p.is_null() {
            return Lookup::Absent;
        }
        // SAFETY: `p` was loaded from the index while pinned; a folio is
        // freed only through the epoch after leaving the index, so it is
        // still allocated while `_guard` lives.
        let folio = unsafe { &*p };
        if !folio.try_get() {
            // Frozen by reclaim, or being freed while its slot is cleared.
            return Lookup::Busy;
        }
        // SAFETY: `try_get` gave us a reference.
        let r = unsafe { FolioRef::from_raw(NonNull::from(folio)) };
        if xa.load(index) != p {
            // Removed (and maybe replaced) between load and try_get.
            drop(r);
            continue;
        }
        return Lookup::Found(r);
    }
}

/// Removal, first half: clear the folio's slots and tags and detach it.
/// Folio locked; the index still owns its reference (see `index_put_ref`).
pub(crate) fn index_delete_folio(xa: &XArray, folio: &FolioGuard) {
    let idx = folio.index().0;
    let mut locked = xa.lock();
    xa.store_range(&locked, idx, folio.nr_pages(), std::ptr::null());
    locked.clear_tag(idx, Tag::Dirty);
    locked.clear_tag(idx, Tag::ToWrite);
    folio.detach();
}

/// Removal, second half: drop the reference the index held.
pub(crate) fn index_put_ref(folio: &FolioGuard) {
    debug_assert_eq!(folio.mapping_id(), 0, "folio still indexed");
    // SAFETY: the index held one reference, given up here once (the folio
    // was just detached by `index_delete_folio`); the caller's guard holds
    // another, so this put does not free the folio.
    drop(unsafe { FolioRef::from_raw(NonNull::from(&**folio)) });
}

/// Insertion: store a new folio (from `Folio::alloc_locked`) in its slots.
/// `false` if any is occupied.
pub(crate) fn index_add_folio(xa: &XArray, folio: &FolioGuard) -> bool {
    let locked = xa.lock();
    if !xa.range_empty(&locked, folio.index().0, folio.nr_pages()) {
        return false;
    }
    xa.store_range(&locked, folio.index().0, folio.nr_pages(), &**folio as *const Folio);
    // SeqCst: pairs with the fence in `set_atomic_fill`: the folio's filler
    // (this thread, or one it hands the locked folio to) reads
    // `needs_atomic_fill` after this, and sees the switch unless the
    // switch's walk sees this folio.
    crate::sync::fence(Ordering::SeqCst);
    true
}

/// A folio under writeback (`PG_writeback` set, folio unlocked). Ending it
/// (explicitly or by dropping the handle) clears the bit and wakes waiters.
pub struct Writeback<'a> {
    mapping: &'a AddressSpace,
    folio: Option<FolioRef>,
    /// The bytes as they were when writeback started, for a file that
    /// async-tracked mappings may write at any time (no stable pages).
    bounce: Option<crate::backing::AlignedBuf>,
}

impl Writeback<'_> {
    /// The folio.
    pub fn folio(&self) -> &FolioRef {
        self.folio.as_ref().expect("writeback already ended")
    }

    /// The folio's bytes, to hand to the store.
    ///
    /// Stable for as long as the handle lives: upcache keeps pages stable
    /// under writeback (the kernel's `stable_writes`, always on), so
    /// `write_at` and write faults wait for the writeback to end, and
    /// `folio_clear_dirty_for_io` write-protected the folio in every
    /// shared-writable mapping before writeback started. A file with
    /// mappings whose writes the kernel lets through at once
    /// ([`DirtyTracking::Async`](crate::DirtyTracking::Async)) is written
    /// from a copy taken when writeback started (page-aligned, so
    /// `O_DIRECT` stores still write directly); a write after the copy
    /// dirties the folio again.
    pub fn data(&self) -> &[u8] {
        let f = self.folio();
        if let Some(b) = &self.bounce {
            return &b.as_slice()[..f.size()];
        }
        // SAFETY: the folio's range of the page store view stays mapped while
        // we hold a reference (the folio keeps the store alive); WRITEBACK is
        // set, so no upcache writer and no user mapping writes the bytes
        // (stable pages, above) and truncate waits for writeback to end.
        unsafe { std::slice::from_raw_parts(f.as_ptr(), f.size()) }
    }

    /// `folio_end_writeback`: the write completed.
    pub fn end(mut self) {
        if let Some(f) = self.folio.take() {
            self.mapping.end_writeback(f);
        }
    }

    /// The write failed with `errno`: keep the data dirty (it will be
    /// retried), record the error for fsync, end writeback.
    pub fn end_with_error(mut self, errno: i32) {
        if let Some(f) = self.folio.take() {
            self.mapping.mark_dirty_raw(&f);
            self.mapping.set_error(errno);
            self.mapping.stats.write_error();
            self.mapping.end_writeback(f);
        }
    }
}

impl Drop for Writeback<'_> {
    /// Dropped without [`end`](Writeback::end) or
    /// [`end_with_error`](Writeback::end_with_error) (an early return, a
    /// panic in the store): the write is not known to have happened, so it
    /// ends as a failure (`EIO`) and the data stays dirty.
    fn drop(&mut self) {
        if let Some(f) = self.folio.take() {
            self.mapping.mark_dirty_raw(&f);
            self.mapping.set_error(libc::EIO);
            self.mapping.stats.write_error();
            self.mapping.end_writeback(f);
        }
    }
}

/// One announcement of `waits_for_guards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GuardWait {
    start: u64,
    end: u64,
    /// The announcer also holds `invalidate_lock` exclusive.
    invalidate: bool,
}

/// A range announced by [`AddressSpace::waits_for_guards`]; withdrawn on
/// drop, after the locks taken after it were released.
pub(crate) struct GuardWaits<'a> {
    mapping: &'a AddressSpace,
    wait: GuardWait,
}

impl Drop for GuardWaits<'_> {
    fn drop(&mut self) {
        let mut waits = self.mapping.guard_waits.lock();
        if let Some(i) = waits.iter().position(|w| *w == self.wait) {
            waits.swap_remove(i);
        }
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        // Signal the end of the drop on every path, unwinding included (a
        // panicking engine `writepage`): an open of this file or a
        // `sync_all` waiting for it would wait for ever otherwise.
        struct Finish(Arc<Eviction>);
        impl Drop for Finish {
            fn drop(&mut self) {
                self.0.finish();
            }
        }
        let _finish = Finish(self.eviction.clone());
        // The last user (a handle, a mapping, a FolioRef's owner) is gone:
        // write back what is still dirty (mapped writes after close, a
        // handle dropped after a failed flush) before dropping the folios.
        // No dirty data is discarded silently: a failure is reported.
        // (Pages an async mapping wrote and a harvest left pending count:
        // `has_wp_async` stays true for them.)
        let dirty = self.nr_dirty_folios() > 0 || self.has_wp_async();
        // Acquire: pairs with the Release in `end_writeback`.
        if !dirty && self.unsynced.load(Ordering::Acquire) {
            // Nothing dirty, but write-backs (the flusher's, reclaim's,
            // a mapping's `flush_async`) gave the store bytes no sync has
            // covered: make them durable now, as `File::drop` would have.
            if let Err(e) = self.store_sync() {
                eprintln!(
                    "upcache: {}: the store's sync when the last user went failed ({e}); \
                     data written back since the last sync may not be durable",
                    self.name,
                );
            }
        }
        if dirty {
            // Checked against the error word too: a writeback that ended
            // with an error after the walk (an engine's asynchronous
            // `writepage`) left its folio dirty without failing the call.
            let r = self.sync_range_checked(0, u64::MAX);
            let left = self.nr_dirty_folios();
            if r.is_err() || left > 0 {
                let why = r.err().map_or_else(
                    || "folios still dirty after the write-back".to_string(),
                    |e| e.to_string(),
                );
                eprintln!(
                    "upcache: {}: writing back dirty data of the last user failed ({why}); \
                     {left} dirty folios are lost",
                    self.name,
                );
            }
        }
        let mut index = 0;
        while let Some((i, _)) = self.i_pages.find_from(index, u64::MAX) {
            match self.filemap_lock_folio(PgOff(i)) {
                Some(g) => {
                    index = g.index().0 + g.nr_pages();
                    g.wait_writeback();
                    self.filemap_remove_folio(&g);
                    // Give its memory back now, not when the epoch collector
                    // frees the folio struct (which holds the region): the
                    // memfd kept every byte of every closed file until then
                    // (`tests/reclaim.rs`,
                    // `closing_the_last_user_of_a_file_frees_its_memory`).
                    // Only if no reference but ours is left (as truncate
                    // waits for): an engine's `FolioRef` may still read it,
                    // and then the region's release frees it later.
                    if g.refs_drained() {
                        let _ = self.store.punch(g.pos(), g.size() as u64);
                    }
                }
                None => index = i + 1,
            }
        }
        // Last (`_finish`): an open of this file, or a `sync_all`, waiting
        // for the write-back above goes on.
    }
}

/// The kernel's `I_FREEING` and `__wait_on_freeing_inode`: set once an
/// address space's last user is gone and its drop has finished writing
/// back and dropping its folios. The file table and the cache's list of
/// address spaces keep it after their `Weak` stops upgrading, so that a
/// reopen of the file waits rather than building a second address space
/// over a store the dying one is still writing (the dying one's late
/// write would overwrite what the new one wrote and synced), and
/// `sync_all` waits rather than returning before that write is in the
/// store (`tests/integrity.rs`).
#[derive(Debug, Default)]
pub(crate) struct Eviction {
    done: AtomicBool,
    wq: WaitQueue,
}

impl Eviction {
    /// Has the drop finished?
    pub(crate) fn is_done(&self) -> bool {
        // Acquire: pairs with the Release in `finish`; the waiter then
        // sees the drop's store writes as done.
        self.done.load(Ordering::Acquire)
    }

    /// Wait until the drop has finished.
    ///
    /// # Locking
    /// Sleeps: hold nothing the dropping thread may need (the file table's
    /// lock, a folio of the file).
    pub(crate) fn wait(&self) {
        let key = self as *const Eviction as usize;
        while !self.is_done() {
            self.wq.park(key, 0, 0, || !self.done.load(Ordering::Relaxed));
        }
    }

    pub(crate) fn finish(&self) {
        // Release: pairs with the Acquire in `is_done`.
        self.done.store(true, Ordering::Release);
        WaitQueue::unpark_all(self as *const Eviction as usize, 0);
    }
}
