//! User mappings of cached files (`struct vm_area_struct`, `mm/mmap.c`):
//! [`Mmap`] / [`MmapMut`] handles, the per-file list of mappings
//! (`i_mmap`), and the operations truncate and writeback apply to every
//! mapping of a folio (zap, `page_mkclean`).
//!
//! A user mapping is a `mmap(2)` of the file's memfd at the file offset,
//! registered with the cache's userfaultfd:
//!
//! | mode | registered | who maps a cached page | upcache sees |
//! |---|---|---|---|
//! | [`UffdMode::Minor`] | MISSING + MINOR (+ WP if shared-writable) | upcache (`map_pages`, one `UFFDIO_CONTINUE` per run of folios) | every first touch of a page after a zap |
//! | [`UffdMode::Missing`] | MISSING (+ WP if shared-writable) | the kernel, with its own fault-around | only misses (pages absent from the memfd) and first writes |

use std::io;
use std::ops::{Deref, DerefMut, Range};

use crate::address_space::AddressSpace;
use crate::error::{Error, Result};
use crate::fault::{EngineShared, FaultEngine};
use crate::folio::Folio;
use crate::sync::{Arc, AtomicBool, AtomicU32, Mutex, Ordering, UnparkOp, WaitQueue};
use crate::types::{PgOff, MAX_FILE_SIZE, MAX_ORDER, PAGE_SHIFT, PAGE_SIZE};
use crate::uffd::{mode, UffdError};
use crate::vm_ops::{FilemapVmOps, VmOps};

/// How user mappings are registered with userfaultfd (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdMode {
    /// MISSING + MINOR (+ WP): upcache maps every page itself.
    Minor,
    /// MISSING (+ WP): upcache fills misses; the kernel maps cached pages.
    Missing,
}

/// How upcache learns that a shared-writable mapping wrote a page (set
/// per cache with [`PageCacheBuilder::dirty_tracking`](crate::PageCacheBuilder::dirty_tracking)).
///
/// | | [`WriteFault`](Self::WriteFault) (default) | [`Async`](Self::Async) |
/// |---|---|---|
/// | first write to a clean page | a write-protect userfault: a handler thread runs `page_mkwrite` (~7–47 µs here) | the kernel clears the page's uffd-wp bit itself (~1 µs) |
/// | the folio becomes dirty (`Stats`, flusher, fsync) | at that fault | when harvested: at the next writeback of its file (`fsync`, `flush`, `sync_all`), at the flusher's next pass (every `dirty_expire` / 4), when the mapping is dropped, or when reclaim looks at the folio |
/// | `freeze` | blocks first writes | refused (`Error::Unsupported`): mapped writes cannot be held back |
/// | dirty throttling of mapped writes | yes | no (`write_at` still is) |
/// | pages under writeback | stable (a write waits) | written back from a copy taken at writeback |
/// | mapping modes | both | [`UffdMode::Minor`] only |
///
/// `Async` needs swap and shmem THP off (checked at each shared writable
/// `mmap`; do not turn them on while such mappings exist): the kernel's
/// reclaim of a written shmem page, and the split or collapse of a large
/// shmem folio, unmap it and drop the page-table entry that records the
/// write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Write-protect faults served by upcache (`page_mkwrite`).
    #[default]
    WriteFault,
    /// `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN` (see the table above).
    Async,
}

/// Private or shared mapping (`MAP_PRIVATE` / `MAP_SHARED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// Writes reach the file (through the page cache).
    Shared,
    /// Writes are copied on write and never reach the file.
    Private,
}

const DEAD: u32 = 1 << 31;

/// A set of file page ranges (sorted, disjoint, not touching): the pages
/// of a mapping that may hold SIGBUS poison ([`VmArea`]'s
/// `poison_marks`).
#[derive(Default, Debug)]
struct PoisonMarks(Vec<(u64, u64)>);

impl PoisonMarks {
    /// Add `[a, b)`, merging with the ranges it overlaps or touches.
    fn add(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let (mut a, mut b) = (a, b);
        self.0.retain(|&(s, e)| {
            if e < a || s > b {
                return true;
            }
            a = a.min(s);
            b = b.max(e);
            false
        });
        let at = self.0.partition_point(|&(s, _)| s < a);
        self.0.insert(at, (a, b));
    }

    /// Take `[a, b)` out.
    fn remove(&mut self, a: u64, b: u64) {
        if a >= b || self.0.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(s, e) in &self.0 {
            if e <= a || s >= b {
                out.push((s, e));
                continue;
            }
            if s < a {
                out.push((s, a));
            }
            if e > b {
                out.push((b, e));
            }
        }
        self.0 = out;
    }

    /// The parts of `[a, b)` in the set.
    fn overlapping(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        self.0
            .iter()
            .filter(|&&(s, e)| s < b && e > a)
            .map(|&(s, e)| (s.max(a), e.min(b)))
            .collect()
    }
}

/// One user mapping of a file (`struct vm_area_struct`).
pub struct VmArea {
    start: usize,
    len: usize,
    /// The length asked for (the handle derefs to this many bytes).
    req_len: usize,
    pgoff: u64,
    writable: bool,
    shared: bool,
    mode: UffdMode,
    mapping: Arc<AddressSpace>,
    pub(crate) engine: Arc<EngineShared>,
    pub(crate) ops: Box<dyn VmOps>,
    /// Faults being handled (low bits) and DEAD.
    state: AtomicU32,
    wq: WaitQueue,
    /// Some page of this mapping was poisoned (SIGBUS) and must be zapped
    /// if the file grows over it.
    pub(crate) poisoned: AtomicBool,
    /// The file pages of this mapping that may hold SIGBUS poison:
    /// recorded before each `UFFDIO_POISON`, forgotten by every zap of
    /// them. Clearing poison zaps only these pages, never a mapped one (in
    /// a private mapping a zap discards the pages it copied on write).
    poison_marks: Mutex<PoisonMarks>,
    /// The mapping's own errseq cursor (the `f_wb_err` of the file a
    /// kernel VMA holds), sampled when it was made: `flush` reports each
    /// write-back error since then once, whoever else reported it.
    wb_err: crate::sync::AtomicU64,
}

impl std::fmt::Debug for VmArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmArea")
            .field("start", &format_args!("{:#x}", self.start))
            .field("len", &self.len)
            .field("pgoff", &self.pgoff)
            .field("writable", &self.writable)
            .field("shared", &self.shared)
            .field("mode", &self.mode)
            .finish()
    }
}

impl VmArea {
    /// First user address.
    pub fn start(&self) -> usize {
        self.start
    }
    /// Length in bytes of the mapped range (the request rounded up to
    /// pages; the handles deref to the requested length).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never empty (mappings have at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// One past the last user address.
    pub fn end(&self) -> usize {
        self.start + self.len
    }
    /// File page index mapped at `start`.
    pub fn pgoff(&self) -> PgOff {
        PgOff(self.pgoff)
    }
    /// The mapped file.
    pub fn mapping(&self) -> &AddressSpace {
        &self.mapping
    }
    /// Mapped writable?
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// `MAP_SHARED`?
    pub fn is_shared(&self) -> bool {
        self.shared
    }
    /// Registration mode.
    pub fn mode(&self) -> UffdMode {
        self.mode
    }
    /// Are first writes reported (shared-writable: page_mkwrite needed)?
    pub(crate) fn tracks_writes(&self) -> bool {
        self.shared && self.writable
    }

    /// Are first writes resolved by the kernel and harvested later
    /// ([`DirtyTracking::Async`])?
    pub(crate) fn tracks_writes_async(&self) -> bool {
        self.tracks_writes() && self.engine.cfg.wp_async
    }

    /// Must cached pages be write-protected here before anyone touches
    /// them? In `Missing` mode the kernel maps cached pages itself, so a
    /// shared-writable mapping only learns of a first write if the page's
    /// PTE (or a PTE marker, for an unmapped page) is uffd-wp. Markers are
    /// set only where a folio is cached (at mmap for the folios already
    /// there, at `filemap_add_folio` for new ones), never for the whole
    /// range: page tables stay proportional to what is used (a 64 GiB
    /// reservation would otherwise cost 128 MiB of them).
    pub(crate) fn arms_write_notify(&self) -> bool {
        self.mode == UffdMode::Missing && self.tracks_writes()
    }

    /// Write-protect the pages of `[first, end)` that are cached (runs of
    /// occupied index slots; a slot being filled counts: the marker goes on
    /// before its data).
    pub(crate) fn arm_cached(&self, first: PgOff, end: PgOff) {
        let xa = &self.mapping.i_pages;
        let mut i = first.0;
        while let Some((j, _)) = xa.find_from(i, end.0) {
            let mut k = j + 1;
            while k < end.0 && !xa.load(k).is_null() {
                k += 1;
            }
            if let Some(r) = self.user_range(PgOff(j), PgOff(k)) {
                let _ = self.engine.uffd.writeprotect(r.start, r.len(), true);
            }
            i = k;
        }
    }
    /// File page index of user address `addr`, if the mapping covers it.
    #[inline]
    pub fn pgoff_of_addr(&self, addr: usize) -> Option<PgOff> {
        (addr >= self.start && addr - self.start < self.len).then(|| self.addr_to_pgoff(addr))
    }
    /// File page index of user address `addr`, which the caller knows lies
    /// inside the mapping (a fault's address).
    #[inline]
    pub(crate) fn addr_to_pgoff(&self, addr: usize) -> PgOff {
        debug_assert!(addr >= self.start && addr - self.start < self.len);
        PgOff(self.pgoff + ((addr - self.start) >> PAGE_SHIFT) as u64)
    }
    /// User address of file page `index`, if the mapping covers it.
    #[inline]
    pub fn pgoff_to_addr(&self, index: PgOff) -> Option<usize> {
        let pages = (self.len >> PAGE_SHIFT) as u64;
        (index.0 >= self.pgoff && index.0 < self.pgoff + pages)
            .then(|| self.start + (((index.0 - self.pgoff) as usize) << PAGE_SHIFT))
    }
    /// The user address range covering file pages `[first, end)`, clamped
    /// to the mapping; `None` if they do not overlap.
    ///
    /// On a hugetlb page store the range is widened to whole 2 MiB pages
    /// (the mapping's start, offset and length are multiples of them):
    /// the kernel maps, protects and zaps a huge page only whole.
    pub(crate) fn user_range(&self, first: PgOff, end: PgOff) -> Option<Range<usize>> {
        let pages = (self.len >> PAGE_SHIFT) as u64;
        let g = self.mapping.map_granule_pages();
        let (first, end) = (first.0 / g * g, end.0.saturating_add(g - 1) / g * g);
        let a = first.max(self.pgoff);
        let b = end.min(self.pgoff + pages);
        (a < b).then(|| {
            let s = self.start + (((a - self.pgoff) as usize) << PAGE_SHIFT);
            s..s + (((b - a) as usize) << PAGE_SHIFT)
        })
    }

    /// Enter fault handling; false once the mapping is being torn down.
    pub(crate) fn enter(&self) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & DEAD != 0 {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(v) => s = v,
            }
        }
    }

    /// Leave fault handling; wakes a teardown waiting for us.
    pub(crate) fn exit(&self) {
        let old = self.state.fetch_sub(1, Ordering::Release);
        if old == DEAD | 1 {
            self.wq
                .unpark_filter(self as *const _ as usize, 0, |_| UnparkOp::Unpark, |_| {});
        }
    }

    /// Mark dead and wait for the faults in flight to finish.
    fn kill_and_drain(&self) {
        self.state.fetch_or(DEAD, Ordering::AcqRel);
        loop {
            if self.state.load(Ordering::Acquire) == DEAD {
                return;
            }
            self.wq.park(self as *const _ as usize, 0, 0, || {
                self.state.load(Ordering::Acquire) != DEAD
            });
        }
    }

    /// `MADV_DONTNEED` the user range of file pages `[first, end)`: the
    /// next access faults again (truncate's tail, clearing poison). Locked
    /// mappings are zapped too ([`madv_dontneed`]). False if the kernel
    /// refused: the pages stay mapped.
    pub(crate) fn zap(&self, first: PgOff, end: PgOff) -> bool {
        let mut zapped = true;
        if let Some(r) = self.user_range(first, end) {
            // The records lock is held across the zap and the removal of
            // what it zapped: a poison installed in between (marked and
            // installed under the same lock, `with_poison_mark`) would
            // otherwise lose its record and never be cleared.
            let mut marks = self.poison_marks.lock();
            // SAFETY: the range lies inside our own live mapping (the VmArea
            // is alive and not yet unmapped: callers reach it through
            // `i_mmap`, which the handle's drop empties before munmap);
            // DONTNEED on a shared file mapping only drops page-table
            // entries, and private copies past EOF are meant to go.
            zapped = unsafe { madv_dontneed(r.start, r.len()) };
            if zapped {
                // The zap took any poison with it (whole huge pages on
                // hugetlb, as `user_range` widens).
                let g = self.mapping.map_granule_pages();
                marks.remove(first.0 / g * g, end.0.saturating_add(g - 1) / g * g);
            }
            drop(marks);
            if self.arms_write_notify() {
                // The kernel maps cached pages itself in this mode: re-arm
                // the cached ones (folios added meanwhile arm themselves).
                // DONTNEED keeps uffd-wp markers on empty entries, but a
                // present page's protection goes with it.
                self.arm_cached(first, end);
            }
        }
        zapped
    }

    /// Install SIGBUS poison on file pages `[first, end)` of this mapping
    /// (pages past end of file inside a large folio, present in the page
    /// store: a `Missing`-mode mapping would map them without asking us).
    /// A uffd-wp marker, an earlier poison or a page mapped meanwhile is
    /// zapped first, then the page is poisoned.
    ///
    /// On a hugetlb page store only whole 2 MiB pages are poisoned: the one
    /// holding end of file stays mapped whole (hugetlbfs semantics).
    pub(crate) fn poison_range(&self, first: PgOff, end: PgOff) {
        let g = self.mapping.map_granule_pages();
        let first = PgOff(first.0.div_ceil(g) * g);
        if first >= end {
            return;
        }
        let Some(r) = self.user_range(first, end) else {
            return;
        };
        let step = (g as usize) << PAGE_SHIFT;
        self.poisoned.store(true, Ordering::Relaxed);
        self.with_poison_mark(first, end, || {
            let uffd = &self.engine.uffd;
            if uffd.poison(r.start, r.len()).is_ok() {
                return;
            }
            for page in r.step_by(step) {
                // Something may be there: a uffd-wp marker (a write-notify
                // mapping arms its cached pages, past the end too, and
                // markers outlive zaps and punches), which POISON cannot
                // replace and MADV_DONTNEED keeps; or a page mapped
                // meanwhile. Un-protecting drops a marker (the page is past
                // end of file: nothing to write-notify), the zap drops a
                // page. Before, only the zap: the pages past the end stayed
                // unpoisoned, read as zeros, and a store there faulted for
                // ever (`tests/sigbus.rs`). The page is present in the
                // page store, so the kernel maps it again at any access
                // between the zap and the POISON: try again (a thread
                // storing there in a loop kept it mapped, and its stores
                // landed after the caller's zeroing:
                // `faults::a_store_racing_a_truncate_that_keeps_its_folio_never_shows_after_growth`).
                let mut placed = false;
                for _ in 0..64 {
                    if !matches!(uffd.poison(page, step), Err(UffdError::Exists { .. })) {
                        placed = true;
                        break;
                    }
                    let _ = uffd.writeprotect(page, step, false);
                    if !matches!(uffd.poison(page, step), Err(UffdError::Exists { .. })) {
                        placed = true;
                        break;
                    }
                    // SAFETY: the page lies inside our own live mapping
                    // (reached through `i_mmap` or by `do_mmap` before it
                    // returns); it is past end of file, so DONTNEED drops
                    // nothing the file holds.
                    unsafe { madv_dontneed(page, step) };
                }
                if !placed {
                    // The last round ended with the zap.
                    let _ = uffd.poison(page, step);
                }
            }
        });
    }

    /// Record that file pages `[first, end)` (widened to whole huge pages
    /// on hugetlb) may hold poison, and run `install` (the
    /// `UFFDIO_POISON`s) with the records locked: a zap of those pages
    /// (`zap`, which forgets what it zapped under the same lock) comes
    /// wholly before the mark, and the poison it would have missed is
    /// installed after it and recorded, or wholly after the poison, and
    /// takes it and its record together.
    pub(crate) fn with_poison_mark<R>(&self, first: PgOff, end: PgOff, install: impl FnOnce() -> R) -> R {
        self.mapping.any_poison.store(true, Ordering::Relaxed);
        let g = self.mapping.map_granule_pages();
        let mut marks = self.poison_marks.lock();
        marks.add(first.0 / g * g, end.0.saturating_add(g - 1) / g * g);
        install()
    }

    /// The recorded poison pages inside `[first, end)`, as ranges.
    fn poison_marks_in(&self, first: PgOff, end: PgOff) -> Vec<(u64, u64)> {
        self.poison_marks.lock().overlapping(first.0, end.0)
    }

    /// Write-protect the folio's pages in this mapping (`page_mkclean_one`).
    /// False if the kernel refused (`ENOMEM` for the page tables of the
    /// markers, `EAGAIN`): pages may still be mapped writable.
    pub(crate) fn mkclean(&self, folio: &Folio) -> bool {
        if let Some(r) = self.user_range(folio.index(), folio.index().add(folio.nr_pages())) {
            match self.engine.uffd.writeprotect(r.start, r.len(), true) {
                Ok(()) | Err(UffdError::Gone(_)) => {}
                Err(e) => {
                    eprintln!("upcache: page_mkclean failed, the folio stays dirty: {e}");
                    return false;
                }
            }
        }
        true
    }
}

/// Validate a mapping request; returns the length rounded to the
/// mapping's page size (`granule` bytes: 4 KiB, or 2 MiB on a hugetlb
/// page store).
fn check_map_range(offset: u64, len: usize, granule: usize) -> Result<usize> {
    if len == 0 {
        return Err(Error::InvalidArgument {
            what: "mmap of zero length",
        });
    }
    if offset % PAGE_SIZE as u64 != 0 {
        return Err(Error::InvalidArgument {
            what: "mmap offset not page-aligned",
        });
    }
    if offset % granule as u64 != 0 {
        return Err(Error::InvalidArgument {
            what: "mmap offset of a hugetlb cache's file not a multiple of 2 MiB",
        });
    }
    let plen = len.checked_next_multiple_of(granule).ok_or(Error::InvalidArgument {
        what: "mmap length overflows",
    })?;
    match offset.checked_add(plen as u64) {
        Some(end) if end <= MAX_FILE_SIZE => Ok(plen),
        _ => Err(Error::FileTooLarge {
            offset,
            len: plen as u64,
            max: MAX_FILE_SIZE,
        }),
    }
}

/// Create, register and publish a mapping.
pub(crate) fn do_mmap(
    engine: &Arc<FaultEngine>,
    mapping: &Arc<AddressSpace>,
    offset: u64,
    len: usize,
    writable: bool,
    share: Share,
    mode: UffdMode,
) -> Result<Arc<VmArea>> {
    let hugetlb = mapping.store.is_hugetlb();
    let plen = check_map_range(offset, len, (mapping.map_granule_pages() as usize) << PAGE_SHIFT)?;
    if hugetlb && mode == UffdMode::Missing {
        // The kernel maps a page present in the memfd without asking us,
        // and a hugetlbfs page is present from its allocation on, before
        // its fill (which goes through the view: hugetlbfs has no write
        // path to fill it page-atomically).
        return Err(Error::InvalidArgument {
            what: "UffdMode::Missing is not available on a hugetlb cache; use UffdMode::Minor",
        });
    }
    if hugetlb && writable && share == Share::Private {
        // hugetlbfs drops a private mapping's copied pages when the page
        // under them is punched (shmem and ext4 keep them), and the cache
        // punches to evict: the mapping would lose its writes to reclaim.
        return Err(Error::Unsupported {
            what: "a private writable mapping of a hugetlb cache (hugetlbfs drops a private \
                   mapping's copied pages when the cache evicts or punches the page under them); \
                   map it shared, or read-only, or use a cache without hugetlb(true)",
        });
    }
    if mode == UffdMode::Missing {
        // The past-EOF walk below takes `i_rwsem`, which ranks above folio
        // locks and waits for writers that may wait for this thread's
        // page guards.
        crate::page_ref::check_range_unheld(mapping.id(), 0, u64::MAX)?;
    }
    if mode == UffdMode::Missing && mapping.ra.min_order < MAX_ORDER && crate::page_store::shmem_thp_possible() {
        // See ARCHITECTURE.md "Large folios": with large shmem folios a
        // punch of a smaller upcache folio may leave zeroed pages present,
        // which the kernel would map into a Missing-mode mapping without
        // asking us. With upcache's own large folios every shmem folio
        // lies inside one upcache folio, punched whole.
        return Err(Error::InvalidArgument {
            what: "UffdMode::Missing needs shmem THP off (/sys/kernel/mm/transparent_hugepage/shmem_enabled \
                   and hugepages-*/shmem_enabled set to never, advise or deny) or a cache built with \
                   large_folios(true); use UffdMode::Minor",
        });
    }
    if engine.shared().cfg.wp_async && share == Share::Shared && writable {
        if mode == UffdMode::Missing {
            // The kernel maps cached pages itself in this mode, so an
            // evicted page could be remapped between reclaim's check and
            // its punch (wp_async.rs, "Why eviction compares bytes").
            return Err(Error::InvalidArgument {
                what: "DirtyTracking::Async works with UffdMode::Minor mappings only",
            });
        }
        if !hugetlb && crate::page_store::shmem_thp_possible() {
            // Splitting or collapsing a large shmem folio unmaps its pages
            // from every mapping, and a written PTE leaves no marker: the
            // record of the write would be lost (wp_async.rs).
            return Err(Error::Unsupported {
                what: "DirtyTracking::Async needs shmem THP off (/sys/kernel/mm/transparent_hugepage/shmem_enabled \
                       and hugepages-*/shmem_enabled set to never, advise or deny): splitting a large shmem \
                       folio drops the record of mapped writes",
            });
        }
        if !hugetlb && crate::wp_async::swap_active() {
            return Err(Error::Unsupported {
                what: "DirtyTracking::Async needs swap off (the kernel's reclaim of a written \
                       shmem page drops the record of the write); build the cache with \
                       DirtyTracking::WriteFault or swapoff",
            });
        }
    }
    if mode == UffdMode::Missing {
        // The kernel will map cached pages of this file itself: from now
        // on every fill must be page-atomic.
        mapping.set_atomic_fill();
    }
    let shared = share == Share::Shared;
    let prot = if writable {
        rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
    } else {
        rustix::mm::ProtFlags::READ
    };
    let flags = if shared {
        rustix::mm::MapFlags::SHARED
    } else {
        rustix::mm::MapFlags::PRIVATE
    } | rustix::mm::MapFlags::NORESERVE;
    // Mapped inaccessible, and given its protection only once registered
    // (the end of this function): in a process that called
    // `mlockall(MCL_FUTURE)` the kernel fills in every accessible new
    // mapping inside `mmap` itself, before the registration could ask us —
    // zero pages of the memfd for uncached offsets, writable PTEs that no
    // write-notify sees (`tests/mlockall.rs`). An inaccessible mapping is
    // not filled in, and `mprotect` of a shared one fills in nothing; a
    // private writable one's fill-in stops at its first userfault (which
    // cannot wait there) and leaves the pages to later faults.
    //
    // SAFETY: a fresh mapping (null hint, no MAP_FIXED; or inside its own
    // reservation) aliases no Rust object; the memfd outlives it (the
    // VmArea holds the AddressSpace).
    let addr = unsafe {
        if mapping.ra.min_order > 0 {
            // Large folios: PMD-aligned, so that huge pages map with PMDs
            // even if shmem THP was off when the mapping was made.
            crate::page_store::mmap_pmd_aligned(
                plen,
                rustix::mm::ProtFlags::empty(),
                flags,
                mapping.store.memfd(),
                mapping.store.memfd_offset(offset),
            )
        } else {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                plen,
                rustix::mm::ProtFlags::empty(),
                flags,
                mapping.store.memfd(),
                mapping.store.memfd_offset(offset),
            )
            .map_err(Into::into)
        }
    }
    .map_err(Error::Io)? as usize;
    // A child of a storage engine does not inherit its cache mappings: a
    // forked child touching an uncached page would otherwise fault it in
    // as a zero page of the shared memfd (the uffd registration is not
    // inherited), corrupting the parent's view. The child gets SIGSEGV.
    // SAFETY: our own fresh mapping; MADV_DONTFORK changes only fork(2)'s
    // treatment of it.
    if unsafe { libc::madvise(addr as *mut _, plen, libc::MADV_DONTFORK) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: our own fresh mapping, never handed out.
        let _ = unsafe { rustix::mm::munmap(addr as *mut _, plen) };
        return Err(Error::Io(e));
    }
    let vma = Arc::new(VmArea {
        start: addr,
        len: plen,
        req_len: len,
        pgoff: offset >> PAGE_SHIFT,
        writable,
        shared,
        mode,
        mapping: mapping.clone(),
        engine: engine.shared().clone(),
        ops: Box::new(FilemapVmOps),
        state: AtomicU32::new(0),
        wq: WaitQueue::new(),
        poisoned: AtomicBool::new(false),
        poison_marks: Mutex::new(PoisonMarks::default()),
        wb_err: crate::sync::AtomicU64::new(mapping.wb_err.sample()),
    });
    let mut modes = mode::MISSING;
    if mode == UffdMode::Minor {
        modes |= mode::MINOR;
    }
    if vma.tracks_writes() {
        modes |= mode::WP;
    }
    engine.shared().insert(vma.clone());
    // An async-tracked mapping joins `i_mmap` only once registered: a
    // harvest that listed it before would scan a range that is not yet
    // registered for WP_ASYNC (`PAGEMAP_SCAN` fails with EPERM, and an
    // fsync with it). Nothing is mapped before this returns. The others
    // join first (the `Missing`-mode arming handshake below needs it).
    let publish = |vma: &Arc<VmArea>| {
        let mut i_mmap = mapping.i_mmap.lock();
        if vma.arms_write_notify() {
            mapping.nr_wp_armed.fetch_add(1, Ordering::Relaxed);
        }
        if vma.tracks_writes_async() {
            // Release: pairs with the Acquire in `has_wp_async`.
            mapping.nr_wp_async.fetch_add(1, Ordering::Release);
        }
        i_mmap.push(vma.clone());
    };
    if !vma.tracks_writes_async() {
        publish(&vma);
    }
    register_user_range(addr, plen);
    if let Err(e) = engine.shared().uffd.register(addr, plen, modes) {
        {
            unpublish(&vma, false);
        }
        unregister_user_range(addr);
        // SAFETY: our own fresh mapping, never handed out.
        let _ = unsafe { rustix::mm::munmap(addr as *mut _, plen) };
        return Err(Error::Io(e));
    }
    if vma.tracks_writes_async() {
        publish(&vma);
    }
    if vma.arms_write_notify() {
        // The kernel maps cached pages itself in this mode: write-protect
        // every cached page of the range (PTE markers on shmem) so that
        // first writes still reach page_mkwrite. Folios created from now
        // on are armed by `filemap_add_folio` before they are filled; the
        // xa_lock round trip orders this walk after any such insert that
        // did not see the new count. Nothing faults on the range before
        // this returns: nobody else knows its address.
        drop(mapping.i_pages.lock());
        vma.arm_cached(vma.pgoff(), vma.pgoff().add((plen >> PAGE_SHIFT) as u64));
    }
    if mode == UffdMode::Missing {
        // Cached folios may reach past end of file (the last one of a
        // large-folio file, one a failed write left, one truncate kept for
        // an async-tracked mapping or a failed write-back); their pages
        // there are present and must raise SIGBUS here too (without large
        // folios this read zeros after an async-tracked truncate,
        // `tests/sigbus.rs`). `i_rwsem` shared keeps the size still (only
        // `write_at` and truncate change it, holding it exclusive), so no
        // growth races this walk. Folios added from now on poison
        // themselves: `filemap_add_folio` lists `i_mmap` after inserting
        // (this mapping is in it, and registered), and the xa_lock round
        // trip orders this walk after any insert that listed it earlier,
        // before it was registered.
        let _i = mapping.inode_lock_shared();
        drop(mapping.i_pages.lock());
        let eof = mapping.size().div_ceil(PAGE_SIZE as u64);
        let end = vma.pgoff().0 + (plen >> PAGE_SHIFT) as u64;
        let mut i = eof.max(vma.pgoff().0);
        while let Some((j, _)) = mapping.i_pages.find_from(i, end) {
            match mapping.filemap_get_folio(PgOff(j)) {
                Some(f) => {
                    let fend = f.index().0 + f.nr_pages();
                    vma.poison_range(PgOff(j.max(eof)), PgOff(fend));
                    i = fend;
                }
                None => i = j + 1,
            }
        }
    }
    // Registered, armed and poisoned: now accessible (see the `mmap`
    // above). Nobody else knows the address yet.
    // SAFETY: our own mapping, never handed out; no Rust reference into it.
    if let Err(e) = unsafe { rustix::mm::mprotect(addr as *mut _, plen, mprotect_flags(prot)) } {
        do_munmap(&vma);
        return Err(Error::Io(e.into()));
    }
    Ok(vma)
}

/// `MADV_DONTNEED_LOCKED` (Linux 5.18; not in every libc crate).
const MADV_DONTNEED_LOCKED: libc::c_int = 24;

/// Zap `[start, start + len)` of one of our mappings, locked or not:
/// `MADV_DONTNEED_LOCKED`, which an `mlock`ed (or `mlockall`ed) mapping
/// does not refuse, as the kernel's own truncate and hole punch zap
/// locked mappings too. Plain `MADV_DONTNEED`, which a locked mapping
/// refuses with `EINVAL`, left poison in place in one
/// (`tests/mlockall.rs`). Every kernel the crate runs on has it
/// (`UFFDIO_POISON` needs 6.6; this, 5.18). False if refused.
///
/// # Safety
/// The range lies inside a live mapping of ours whose page-table entries
/// may be dropped (shared pages fault back in; private copies go).
unsafe fn madv_dontneed(start: usize, len: usize) -> bool {
    // SAFETY: the caller's contract.
    unsafe { libc::madvise(start as *mut _, len, MADV_DONTNEED_LOCKED) == 0 }
}

/// `mprotect(2)`'s flags for a mapping's protection.
fn mprotect_flags(prot: rustix::mm::ProtFlags) -> rustix::mm::MprotectFlags {
    rustix::mm::MprotectFlags::from_bits_truncate(prot.bits())
}

/// Every live upcache user mapping of the process, over all caches:
/// start → end. `read_at` / `write_at` consult it to copy through a bounce
/// buffer when the caller's buffer lies in such a mapping (see
/// [`overlaps_user_mapping`]).
#[cfg(not(loom))]
static USER_MAPPINGS: crate::sync::RwLock<std::collections::BTreeMap<usize, usize>> =
    crate::sync::const_rwlock(std::collections::BTreeMap::new());
#[cfg(not(loom))]
static NR_USER_MAPPINGS: crate::sync::AtomicUsize = crate::sync::AtomicUsize::new(0);

#[cfg(not(loom))]
fn register_user_range(start: usize, len: usize) {
    // A live mapping's address is never handed out again before its
    // entry goes (`do_munmap`), so nothing is replaced here; counted only
    // if new all the same.
    if USER_MAPPINGS.write().insert(start, start + len).is_none() {
        NR_USER_MAPPINGS.fetch_add(1, Ordering::Release);
    }
}

#[cfg(not(loom))]
fn unregister_user_range(start: usize) {
    if USER_MAPPINGS.write().remove(&start).is_some() {
        NR_USER_MAPPINGS.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(loom)]
fn register_user_range(_: usize, _: usize) {}
#[cfg(loom)]
fn unregister_user_range(_: usize) {}

/// Does `[ptr, ptr + len)` overlap an upcache user mapping (of any file, of
/// any cache)?
///
/// `generic_perform_write` copies from the user buffer with page faults
/// disabled, so a buffer that is a mapping of the file being written can
/// never fault while a folio lock is held. A userspace copy cannot disable
/// faults, and a fault on an upcache mapping needs folio locks and
/// `invalidate_lock`: copying from (or into) such a buffer while holding
/// them deadlocks. So `write_at` / `read_at` copy through a bounce buffer,
/// filled or drained with no lock held, whenever this returns true. One
/// relaxed load when no mapping exists.
pub(crate) fn overlaps_user_mapping(ptr: *const u8, len: usize) -> bool {
    #[cfg(not(loom))]
    {
        if len == 0 || NR_USER_MAPPINGS.load(Ordering::Acquire) == 0 {
            return false;
        }
        let a = ptr as usize;
        let b = a.saturating_add(len);
        let m = USER_MAPPINGS.read();
        m.range(..b).next_back().is_some_and(|(_, &end)| end > a)
    }
    #[cfg(loom)]
    {
        let _ = (ptr, len);
        false
    }
}

/// Take `vma` out of the engine's table and `i_mmap`. `unmapping`: an
/// async-tracked mapping on its way out through `unmap_async`, which drops
/// `nr_wp_async` itself once its pending pages are drained.
fn unpublish(vma: &Arc<VmArea>, unmapping: bool) {
    vma.engine.remove(vma);
    let mut i_mmap = vma.mapping.i_mmap.lock();
    let before = i_mmap.len();
    i_mmap.retain(|v| !Arc::ptr_eq(v, vma));
    if i_mmap.len() != before && vma.arms_write_notify() {
        vma.mapping.nr_wp_armed.fetch_sub(1, Ordering::Relaxed);
    }
    if i_mmap.len() != before && vma.tracks_writes_async() && !unmapping {
        vma.mapping.nr_wp_async.fetch_sub(1, Ordering::Release);
    }
}

/// Tear a mapping down: stop new faults, wait for faults in flight, unmap,
/// then wake threads still blocked on faults in the range.
///
/// The order matters. Unregistering first (as the kernel's munmap path
/// would suggest) lets a thread blocked on a fault retry its access on a
/// range that is still mapped but no longer registered: the kernel then
/// faults a *zero page into the shared memfd*, which later `Missing`-mode
/// mappings would serve as file data. Unmapping first turns such a retry
/// into SIGSEGV (an access to memory the program unmapped) and leaves the
/// memfd alone; munmap also drops the range's registration.
fn do_munmap(vma: &Arc<VmArea>) {
    if vma.tracks_writes_async() {
        // The mapping's last harvest and its removal from `i_mmap` under one
        // `harvest_lock` (wp_async.rs); `unpublish` leaves the count of
        // async mappings to `unmap_async`, which drops it after draining.
        vma.mapping().unmap_async(vma, || unpublish(vma, true));
    } else {
        unpublish(vma, false);
    }
    vma.kill_and_drain();
    // Unregistered before the munmap, never after: once unmapped, the
    // kernel may hand the same address to another thread's new mapping,
    // whose registration a later removal by address would delete (its
    // `read_at`/`write_at` buffers would then skip the bounce and could
    // fault on the folio the copy holds locked: a hang).
    unregister_user_range(vma.start);
    // SAFETY: the handle owning this mapping is being dropped, so no Rust
    // reference into it remains; no handler thread is inside a fault on it
    // (drained above) and new faults find it dead.
    let _ = unsafe { rustix::mm::munmap(vma.start as *mut _, vma.len) };
    // Wake threads still blocked on faults in the range (UFFDIO_WAKE
    // needs no registration).
    let _ = vma.engine.uffd.wake(vma.start, vma.len);
}

/// A new mapping of the same file range as `vma`, `new_len` bytes long
/// (memmap2's `remap` with `may_move`): the caller swaps it in and unmaps
/// the old one. Shared mappings lose nothing (their pages are the cache's);
/// a private mapping would lose its copy-on-write pages, so it is refused.
fn remap_vma(vma: &Arc<VmArea>, engine: &Arc<FaultEngine>, new_len: usize) -> Result<Arc<VmArea>> {
    // As `File::mmap`: a new mapping takes `i_rwsem`, which a
    // `write_begin`/`write_end` callback runs under.
    vma.mapping().check_reentry("remap")?;
    if !vma.shared {
        return Err(Error::InvalidArgument {
            what: "remap of a private mapping would lose its copy-on-write pages; map again instead",
        });
    }
    do_mmap(
        engine,
        &vma.mapping,
        vma.pgoff << PAGE_SHIFT,
        new_len,
        vma.writable,
        Share::Shared,
        vma.mode,
    )
}

/// A read-only mapping of a cached file; derefs to `&[u8]`.
///
/// ```
/// # fn main() -> upcache::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("f");
/// # std::fs::write(&path, b"mapped through upcache")?;
/// let cache = upcache::PageCache::new();
/// let file = cache.open(&path)?;
/// // SAFETY: nothing writes the file while the slice is used.
/// let map = unsafe { file.mmap(0, 22, upcache::Share::Shared) }?;
/// assert_eq!(&map[..6], b"mapped");
/// # Ok(()) }
/// ```
///
/// Like memmap2's `Mmap`, the bytes may change under the slice when the
/// file is written (through `write_at` or another mapping): that is the
/// point of a shared cache. Accessing a page past end of file raises SIGBUS,
/// as with a kernel mapping.
pub struct Mmap {
    vma: Arc<VmArea>,
    _engine: Arc<FaultEngine>,
}

/// A writable mapping; derefs to `&mut [u8]`. Shared mappings write into
/// the page cache (dirtying folios through page_mkwrite); private ones copy
/// on write.
pub struct MmapMut {
    vma: Arc<VmArea>,
    _engine: Arc<FaultEngine>,
}

impl Mmap {
    pub(crate) fn new(vma: Arc<VmArea>, engine: Arc<FaultEngine>) -> Mmap {
        Mmap { vma, _engine: engine }
    }

    /// Grow or shrink the mapping to `new_len` bytes from the same file
    /// offset (memmap2's `remap` with `may_move`; the address may change).
    /// Only shared mappings.
    ///
    /// # Errors
    /// As [`MmapMut::remap`].
    ///
    /// # Safety
    /// As [`File::mmap`](crate::File::mmap), for the new range.
    pub unsafe fn remap(&mut self, new_len: usize) -> Result<()> {
        let new = remap_vma(&self.vma, &self._engine, new_len)?;
        let old = std::mem::replace(&mut self.vma, new);
        do_munmap(&old);
        Ok(())
    }
    /// The mapping's description.
    pub fn vma(&self) -> &VmArea {
        &self.vma
    }
}

impl MmapMut {
    pub(crate) fn new(vma: Arc<VmArea>, engine: Arc<FaultEngine>) -> MmapMut {
        MmapMut { vma, _engine: engine }
    }

    /// Grow or shrink the mapping to `new_len` bytes from the same file
    /// offset (memmap2's `remap` with `may_move`): the address may change;
    /// written bytes are kept (they are the cache's pages). Only shared
    /// mappings.
    ///
    /// # Errors
    /// `EINVAL` for a private mapping or a bad length; as
    /// [`File::mmap`](crate::File::mmap) for the new range. On error the
    /// old mapping stays.
    ///
    /// # Safety
    /// As [`File::mmap_mut`](crate::File::mmap_mut), for the new range.
    pub unsafe fn remap(&mut self, new_len: usize) -> Result<()> {
        let new = remap_vma(&self.vma, &self._engine, new_len)?;
        let old = std::mem::replace(&mut self.vma, new);
        do_munmap(&old);
        Ok(())
    }
    /// The mapping's description.
    pub fn vma(&self) -> &VmArea {
        &self.vma
    }

    /// `msync(MS_SYNC)`: integrity writeback of the mapped range and the
    /// store's sync. Errors recorded by earlier writeback of these pages are
    /// returned here too.
    ///
    /// # Errors
    /// The write or sync error.
    pub fn flush(&self) -> Result<()> {
        flush_vma(&self.vma)
    }

    /// `msync(MS_SYNC)` of `len` bytes at `off` (every folio overlapping
    /// them is written).
    ///
    /// # Errors
    /// `EINVAL` for a range outside the mapping; the write or sync error.
    pub fn flush_range(&self, off: usize, len: usize) -> Result<()> {
        flush_vma_range(&self.vma, off, len)
    }

    /// `msync(MS_ASYNC)` of the whole mapping: start writeback of its dirty
    /// folios and return without waiting for writeback already in flight
    /// or syncing the store. Nothing is durable until a `flush` or `fsync`.
    ///
    /// # Errors
    /// A write error of the writeback it started.
    pub fn flush_async(&self) -> Result<()> {
        flush_vma_range_async(&self.vma, 0, self.vma.len)
    }

    /// [`flush_async`](Self::flush_async) of `len` bytes at `off`.
    ///
    /// # Errors
    /// `EINVAL` for a range outside the mapping; a write error.
    pub fn flush_async_range(&self, off: usize, len: usize) -> Result<()> {
        flush_vma_range_async(&self.vma, off, len)
    }
}

/// `msync(MS_ASYNC)` of `len` bytes at `off`: cleansing writeback of every
/// folio overlapping the range, no wait, no store sync.
fn flush_vma_range_async(vma: &VmArea, off: usize, len: usize) -> Result<()> {
    vma.mapping().check_reentry("flush_async")?;
    let Some((start, end)) = flush_file_range(vma, off, len)? else {
        return Ok(());
    };
    let mut wbc = crate::aops::WritebackControl::all(start, end);
    wbc.sync_mode = crate::aops::SyncMode::None;
    vma.mapping().writepages(&mut wbc).map_err(Error::Writeback)
}

/// The file bytes (first, last inclusive) that flushing `len` bytes at
/// `off` of the mapping covers; `None` if there is nothing to write (a
/// private mapping, an empty range).
///
/// # Errors
/// `EINVAL` for a range outside the mapping.
fn flush_file_range(vma: &VmArea, off: usize, len: usize) -> Result<Option<(u64, u64)>> {
    if off.checked_add(len).is_none_or(|e| e > vma.len) {
        return Err(Error::InvalidArgument {
            what: "flush range outside the mapping",
        });
    }
    if !vma.shared || len == 0 {
        return Ok(None);
    }
    let start = (vma.pgoff << PAGE_SHIFT) + off as u64;
    Ok(Some((start, start + len as u64 - 1)))
}

fn flush_vma(vma: &VmArea) -> Result<()> {
    flush_vma_range(vma, 0, vma.len)
}

/// `msync(MS_SYNC)` of `len` bytes at `off` into the mapping.
fn flush_vma_range(vma: &VmArea, off: usize, len: usize) -> Result<()> {
    // From inside an engine callback for this file: the write-back would
    // wait for the callback's own folio, and the store's sync for the
    // sync lock an `fsync` callback runs under (it hung there).
    vma.mapping().check_reentry("flush")?;
    let Some((start, end)) = flush_file_range(vma, off, len)? else {
        return Ok(());
    };
    vma.mapping()
        .sync_range_checked_since(start, end, &vma.wb_err)
        .map_err(Error::Writeback)
}

impl Mmap {
    /// `msync(MS_SYNC)` (a read-only shared mapping has nothing of its own
    /// to flush, but the range's dirty folios are written).
    ///
    /// # Errors
    /// The write or sync error.
    pub fn flush(&self) -> Result<()> {
        flush_vma(&self.vma)
    }
}

impl Deref for Mmap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `start..start+len` is our live mapping for as long as the
        // handle exists (munmap happens in Drop). Faults on it are served by
        // the engine (or end in SIGBUS past EOF, as with any file mapping).
        unsafe { std::slice::from_raw_parts(self.vma.start as *const u8, self.vma.req_len) }
    }
}

impl Deref for MmapMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: as for `Mmap`.
        unsafe { std::slice::from_raw_parts(self.vma.start as *const u8, self.vma.req_len) }
    }
}

impl DerefMut for MmapMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `Mmap`; the mapping is writable and `&mut self`
        // makes this the only slice through this handle.
        unsafe { std::slice::from_raw_parts_mut(self.vma.start as *mut u8, self.vma.req_len) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        do_munmap(&self.vma);
    }
}

impl Drop for MmapMut {
    fn drop(&mut self) {
        do_munmap(&self.vma);
    }
}

/// A shared, writable mapping handed out as a pointer and a length, like
/// `memmap2::MmapRaw`: safe to create and to share between threads
/// (`Send + Sync`), because it never hands out a Rust reference to the
/// mapped bytes. Read and write it with [`read`](Self::read) /
/// [`write`](Self::write) (bounds-checked copies) or through
/// [`as_mut_ptr`](Self::as_mut_ptr) in your own `unsafe` code.
///
/// Writes dirty the cached folios (through page_mkwrite) and reach the file
/// at [`flush`](Self::flush), `fsync`, or when the last user of the file
/// goes. Touching bytes past end of file raises SIGBUS, as with any file
/// mapping.
///
/// ```
/// # fn main() -> upcache::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("f");
/// # std::fs::write(&path, vec![0u8; 8192])?;
/// let cache = upcache::PageCache::new();
/// let file = cache.open(&path)?;
/// let raw = std::sync::Arc::new(file.mmap_raw(0, 8192)?); // safe to create
/// let t = { let raw = raw.clone(); std::thread::spawn(move || raw.write(4096, b"from a thread")) };
/// raw.write(0, b"from main");
/// t.join().unwrap();
/// raw.flush_range(0, 8192)?;
/// let disk = std::fs::read(&path)?;
/// assert_eq!(&disk[4096..4109], b"from a thread");
/// # Ok(()) }
/// ```
pub struct MmapRaw {
    vma: Arc<VmArea>,
    _engine: Arc<FaultEngine>,
}

impl MmapRaw {
    pub(crate) fn new(vma: Arc<VmArea>, engine: Arc<FaultEngine>) -> MmapRaw {
        MmapRaw { vma, _engine: engine }
    }

    /// Grow or shrink the mapping to `new_len` bytes from the same file
    /// offset (memmap2's `remap` with `may_move`): the address may change,
    /// so raw pointers taken before are dangling; written bytes are kept.
    ///
    /// # Errors
    /// As [`File::mmap_raw`](crate::File::mmap_raw) for the new range. On
    /// error the old mapping stays.
    pub fn remap(&mut self, new_len: usize) -> Result<()> {
        let new = remap_vma(&self.vma, &self._engine, new_len)?;
        let old = std::mem::replace(&mut self.vma, new);
        do_munmap(&old);
        Ok(())
    }
    /// The mapping's description.
    pub fn vma(&self) -> &VmArea {
        &self.vma
    }
    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *const u8 {
        self.vma.start as *const u8
    }
    /// First byte of the mapping, writable.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.vma.start as *mut u8
    }
    /// Length asked for at creation.
    pub fn len(&self) -> usize {
        self.req_len()
    }
    /// Never empty (mappings have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.req_len() == 0
    }

    fn req_len(&self) -> usize {
        self.vma.req_len
    }

    fn check(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.vma.req_len),
            "MmapRaw access [{off}, {off}+{n}) out of bounds (len {})",
            self.vma.req_len
        );
    }

    /// Copy `buf.len()` mapped bytes at `off` into `buf`. Other threads may
    /// write the same bytes meanwhile; the copy then sees some of each.
    ///
    /// # Panics
    /// If the range is outside the mapping.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        self.check(off, buf.len());
        // SAFETY: in bounds of our live mapping (checked; munmap happens in
        // Drop); `buf` is a distinct allocation (a mapping of the same file
        // elsewhere is a different address range). No reference to the
        // mapped bytes is formed.
        unsafe { std::ptr::copy_nonoverlapping((self.vma.start + off) as *const u8, buf.as_mut_ptr(), buf.len()) }
    }

    /// Copy `data` into the mapping at `off`.
    ///
    /// # Panics
    /// If the range is outside the mapping.
    pub fn write(&self, off: usize, data: &[u8]) {
        self.check(off, data.len());
        // SAFETY: as in `read`; the mapping is shared-writable.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (self.vma.start + off) as *mut u8, data.len()) }
    }

    /// `msync(MS_SYNC)` of the whole mapping.
    ///
    /// # Errors
    /// The write or sync error.
    pub fn flush(&self) -> Result<()> {
        flush_vma_range(&self.vma, 0, self.vma.len)
    }

    /// `msync(MS_SYNC)` of `len` bytes at `off` (every folio overlapping
    /// them is written).
    ///
    /// # Errors
    /// `EINVAL` for a range outside the mapping; the write or sync error.
    pub fn flush_range(&self, off: usize, len: usize) -> Result<()> {
        flush_vma_range(&self.vma, off, len)
    }

    /// `msync(MS_ASYNC)`: start writeback of the mapping's dirty folios,
    /// without waiting or syncing the store (see [`MmapMut::flush_async`]).
    ///
    /// # Errors
    /// A write error of the writeback it started.
    pub fn flush_async(&self) -> Result<()> {
        flush_vma_range_async(&self.vma, 0, self.vma.len)
    }

    /// [`flush_async`](Self::flush_async) of `len` bytes at `off`.
    ///
    /// # Errors
    /// `EINVAL` for a range outside the mapping; a write error.
    pub fn flush_async_range(&self, off: usize, len: usize) -> Result<()> {
        flush_vma_range_async(&self.vma, off, len)
    }
}

impl Drop for MmapRaw {
    fn drop(&mut self) {
        do_munmap(&self.vma);
    }
}

impl std::fmt::Debug for MmapRaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MmapRaw").field(&*self.vma).finish()
    }
}

impl std::fmt::Debug for Mmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Mmap").field(&*self.vma).finish()
    }
}

impl std::fmt::Debug for MmapMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MmapMut").field(&*self.vma).finish()
    }
}

impl AddressSpace {
    /// `page_mkclean`: write-protect the folio in every shared-writable
    /// mapping, so the next write faults into page_mkwrite and re-dirties
    /// it. Folio locked (called from `folio_clear_dirty_for_io`).
    pub(crate) fn page_mkclean(&self, folio: &Folio) -> bool {
        #[cfg(loom)]
        crate::page_store::call_pte_hook(&self.store.on_mkclean, folio.pos(), folio.size() as u64);
        let vmas = self.i_mmap.lock();
        let mut all = true;
        for v in vmas.iter().filter(|v| v.tracks_writes()) {
            all &= v.mkclean(folio);
        }
        all
    }

    /// `unmap_mapping_range`: zap file pages `[first, end)` from every user
    /// mapping (their next access faults again).
    pub(crate) fn unmap_mapping_range(&self, first: PgOff, end: PgOff) {
        self.zap_mappings(first, end, false);
    }

    /// Zap file pages `[first, end)` from every mapping (`only_poisoned`:
    /// from those that installed SIGBUS poison). Async-tracked mappings
    /// are scanned first, under `harvest_lock` (taken before `i_mmap`), so
    /// that no record of a mapped write goes with the zapped PTEs.
    fn zap_mappings(&self, first: PgOff, end: PgOff, only_poisoned: bool) {
        let mut st = self.has_wp_async().then(|| self.harvest_lock.lock());
        let vmas = self.i_mmap.lock();
        if only_poisoned {
            // Under `i_mmap`, as `fault::sigbus_read` reads it.
            self.poison_clears.fetch_add(1, Ordering::Relaxed);
        }
        // The loom models' one `Missing`-mode mapping, which poisons
        // (`poison_past_eof`) under the same lock.
        #[cfg(loom)]
        if only_poisoned && end > first {
            crate::page_store::call_pte_hook(&self.store.on_unpoison, first.byte(), (end.0 - first.0) << PAGE_SHIFT);
        }
        #[cfg(loom)]
        if !only_poisoned && end > first {
            crate::page_store::call_pte_hook(&self.store.on_unmap, first.byte(), (end.0 - first.0) << PAGE_SHIFT);
        }
        for v in vmas
            .iter()
            .filter(|v| !only_poisoned || v.poisoned.load(Ordering::Relaxed))
        {
            // Clearing poison zaps only the pages that may hold it: a
            // mapped page zapped with them would lose the copy a private
            // mapping made of it, or (async tracking) a write made between
            // the scan and the zap.
            let ranges = if only_poisoned {
                v.poison_marks_in(first, end)
            } else {
                vec![(first.0, end.0)]
            };
            for (a, b) in ranges {
                let (a, b) = (PgOff(a), PgOff(b));
                if let Some(st) = st.as_deref_mut() {
                    if v.tracks_writes_async() {
                        if let Err(e) = crate::wp_async::scan_into(&**v, a, b, st) {
                            eprintln!("upcache: harvest before a zap failed: {e}");
                        }
                    }
                }
                v.zap(a, b);
            }
        }
        if let Some(st) = st.as_deref() {
            self.note_pending(st);
        }
    }

    /// The file grew from `old` to `new` bytes: clear SIGBUS poison that
    /// mappings installed past the old end.
    pub(crate) fn unpoison_growth(&self, old: u64, new: u64) {
        // From the first page wholly past the old end: poison is only ever
        // installed there, and the page holding the old end has valid,
        // possibly mapped and written, bytes (a zap would drop the record
        // of an async-tracked write to it).
        let first = PgOff(old.div_ceil(PAGE_SIZE as u64));
        let end = PgOff(new.div_ceil(PAGE_SIZE as u64));
        // Without large folios configured, cached folios past the old end
        // are poisoned only when a truncate whose write-back failed kept
        // the folio straddling its end (`truncate_inode_pages_range`; 64
        // KiB from readahead), which marked `any_poison` under `i_rwsem`,
        // held here too. Otherwise zap as they are.
        if first >= end || (self.ra.min_order == 0 && !self.any_poison.load(Ordering::Relaxed)) {
            self.zap_mappings(first, end, true);
            return;
        }
        // The pages may belong to cached folios, present
        // in the page store: once zapped, a `Missing`-mode mapping maps
        // them itself, and a write-notifying one re-arms them only after
        // the zap (`VmArea::zap`), so a write in between would go unseen.
        // So each cached folio is zapped locked and dirty: such a write
        // lands in a dirty folio that no writeback can clean meanwhile,
        // and the next writeback write-protects its pages again. The gaps
        // between cached folios are zapped as they are (their next access
        // is a miss, whose new folio arms itself before its fill).
        let armed = self.nr_wp_armed.load(Ordering::Relaxed) != 0;
        let mut i = first.0;
        while i < end.0 {
            let Some((j, _)) = self.i_pages.find_from(i, end.0) else {
                self.zap_mappings(PgOff(i), end, true);
                break;
            };
            if j > i {
                self.zap_mappings(PgOff(i), PgOff(j), true);
            }
            match self.filemap_lock_folio(PgOff(j)) {
                Some(g) => {
                    if armed && g.is_uptodate() && !g.is_dirty() {
                        self.folio_mark_dirty(&g);
                    }
                    let fend = g.index().0 + g.nr_pages();
                    self.zap_mappings(PgOff(j), PgOff(fend.min(end.0)), true);
                    i = fend;
                }
                // Being removed: its pages become holes.
                None => {
                    self.zap_mappings(PgOff(j), PgOff(j + 1), true);
                    i = j + 1;
                }
            }
        }
    }

    /// Poison again the pages past end of file of every cached folio from
    /// the end of file up to page `upto` (each locked meanwhile): poison
    /// cleared ahead of a growth that did not happen.
    pub(crate) fn poison_cached_past_eof(&self, upto: PgOff) {
        let eof = self.size().div_ceil(PAGE_SIZE as u64);
        let mut i = eof;
        while let Some((j, _)) = self.i_pages.find_from(i, upto.0) {
            match self.filemap_lock_folio(PgOff(j)) {
                Some(g) => {
                    let fend = g.index().0 + g.nr_pages();
                    self.poison_past_eof(PgOff(j.max(eof)), PgOff(fend), None);
                    i = fend;
                }
                None => i = j + 1,
            }
        }
    }

    /// Clear SIGBUS poison from file pages `[first, end)` in every mapping
    /// that installed some (a zap). With large folios the caller holds
    /// the folio of those pages locked and about to be dirtied
    /// (`write_at`, before its `write_end` publishes the new size).
    pub(crate) fn zap_poison(&self, first: PgOff, end: PgOff) {
        self.zap_mappings(first, end, true);
    }

    /// Does any mapping hold recorded SIGBUS poison in file pages
    /// `[first, end)`? (A read error's, or a panic's while serving a
    /// fault there.)
    pub(crate) fn any_mapping_poisoned(&self, first: PgOff, end: PgOff) -> bool {
        self.any_poison.load(Ordering::Relaxed)
            && self
                .i_mmap
                .lock()
                .iter()
                .any(|v| !v.poison_marks_in(first, end).is_empty())
    }

    /// Does a mapping that arms write notification hold recorded poison
    /// in file pages `[first, end)`? Clearing it there zaps and re-arms
    /// pages the kernel maps by itself (`Missing` mode), so the folio
    /// must be dirty (and locked) first.
    pub(crate) fn armed_mapping_poisoned(&self, first: PgOff, end: PgOff) -> bool {
        self.i_mmap
            .lock()
            .iter()
            .any(|v| v.arms_write_notify() && !v.poison_marks_in(first, end).is_empty())
    }

    /// Poison file pages `[first, end)`, past end of file inside a large
    /// folio the caller holds locked (new, or found by `do_mmap`), in
    /// every `Missing`-mode mapping (`only`: in that one): the kernel maps
    /// present page-store pages into those without asking us, and these
    /// must raise SIGBUS as the kernel's own past-EOF pages do. `Minor`
    /// mode maps only below end of file by itself.
    ///
    /// A write growing the file meanwhile (`unpoison_growth`) may have
    /// looked for poison before this installed it: the end is read again
    /// afterwards and pages now below it are cleared.
    pub(crate) fn poison_past_eof(&self, first: PgOff, end: PgOff, only: Option<&VmArea>) {
        {
            let vmas = self.i_mmap.lock();
            #[cfg(loom)]
            crate::page_store::call_pte_hook(&self.store.on_poison, first.byte(), (end.0 - first.0) << PAGE_SHIFT);
            for v in vmas.iter().filter(|v| v.mode() == UffdMode::Missing) {
                if only.is_none_or(|o| std::ptr::eq(o, &**v)) {
                    v.poison_range(first, end);
                }
            }
        }
        let eof = self.size().div_ceil(PAGE_SIZE as u64);
        if eof > first.0 {
            self.zap_mappings(first, PgOff(eof.min(end.0)), true);
        }
    }

    /// Free the folio memory of file bytes `[pos, pos + len)` (which also
    /// zaps it from every user mapping). Mappings where the kernel maps
    /// cached pages itself (`Missing` mode, shared-writable) lose their
    /// uffd-wp markers for PTEs that were writable; that is safe because a
    /// page comes back only in a new folio, which `filemap_add_folio`
    /// write-protects before it is filled.
    pub(crate) fn punch_memory(&self, pos: u64, len: u64) -> io::Result<()> {
        self.store.punch(pos, len)
    }

    /// Write-protect new folio pages `[first, end)` in every mapping that
    /// [arms write notification](VmArea::arms_write_notify). Called by
    /// `filemap_add_folio` with the new folio locked, before it is filled.
    pub(crate) fn arm_write_notify(&self, first: PgOff, end: PgOff) {
        let vmas = self.i_mmap.lock();
        for v in vmas.iter().filter(|v| v.arms_write_notify()) {
            if let Some(r) = v.user_range(first, end) {
                let _ = v.engine.uffd.writeprotect(r.start, r.len(), true);
            }
        }
    }

    /// Number of live user mappings.
    pub fn nr_mappings(&self) -> usize {
        self.i_mmap.lock().len()
    }
}

#[cfg(all(test, not(loom)))]
mod poison_marks_tests {
    use super::PoisonMarks;

    #[test]
    fn add_merges_and_remove_splits() {
        let mut m = PoisonMarks::default();
        m.add(10, 20);
        m.add(30, 40);
        m.add(20, 25); // touches: merged
        assert_eq!(m.0, vec![(10, 25), (30, 40)]);
        m.add(5, 35); // spans both
        assert_eq!(m.0, vec![(5, 40)]);
        m.remove(10, 12);
        assert_eq!(m.0, vec![(5, 10), (12, 40)]);
        assert_eq!(m.overlapping(8, 15), vec![(8, 10), (12, 15)]);
        assert_eq!(m.overlapping(40, 50), vec![]);
        m.remove(0, 100);
        assert!(m.0.is_empty());
        m.add(7, 7);
        assert!(m.0.is_empty(), "an empty range adds nothing");
    }
}
